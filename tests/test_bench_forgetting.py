"""bench.forgetting's comparison of a budget row with its lever's fixed weights at equal forgetting."""

from __future__ import annotations

from bench.forgetting import ROWS, fixed_line, without_weights


def results(rows: dict[str, tuple[float, float]]) -> dict:
    """Two seeds per row, each at the given (general ppl, domain ppl); base 100 / 200."""
    return {
        "base": {"ppl/general": 100.0, "ppl/domain": 200.0},
        "rows": {name: {str(s): {"ppl/general": g, "ppl/domain": d} for s in (0, 1)} for name, (g, d) in rows.items()},
    }


def test_a_budget_row_is_compared_with_the_line_between_the_fixed_weights_around_its_forgetting():
    row = next(r for r in ROWS if r.name == "+ replay KL (w 1.5), budget 5%, PI")
    # naive learns 100 points of domain ppl; w 3: +4% general, 80 learned; w 2: +6%, 90 learned
    data = results(
        {
            "naive CPT": (130.0, 100.0),
            "+ replay KL (w 3)": (104.0, 120.0),
            "+ replay KL (w 2)": (106.0, 110.0),
            "+ mix + KD": (101.0, 150.0),  # another lever: not on the line
            row.name: (105.0, 117.0),  # +5%, 83 learned: the line gives 85 there
        }
    )
    line = fixed_line(data, row)
    assert "learns 0.830 at +5.0%" in line and "learns 0.850: -0.020 at equal forgetting" in line
    data["rows"][row.name] = results({row.name: (103.0, 117.0)})["rows"][row.name]
    assert "outside its fixed rows' range (+4.0% to +6.0%)" in fixed_line(data, row)
    assert fixed_line(results({"naive CPT": (130.0, 100.0), row.name: (105.0, 117.0)}), row) is None


def test_fixed_siblings_share_the_lever_and_lr_but_not_the_weight():
    by_name = {r.name: r for r in ROWS}
    budget, fixed = by_name["+ replay KL (w 1.5), budget 5%, PI"], by_name["+ replay KL (w 3)"]
    assert without_weights(budget.extra) == without_weights(fixed.extra)
    assert without_weights(by_name["+ mix + KD"].extra) != without_weights(fixed.extra)
    assert by_name["+ replay KL (w 1.5), 3x lr"].lr_mult != budget.lr_mult  # and so not on the 1x line
