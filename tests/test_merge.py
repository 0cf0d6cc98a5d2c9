"""Merging after training: exact at the ends, streamed a shard at a time, and to a forgetting budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import merge

from .train_helpers import make_prep


def tiny_llama(out: Path, seed: int, vocab: int = 512, shard: str | None = None, like: Path | None = None) -> Path:
    """A small Llama saved as safetensors; ``like``: that model's weights moved by seeded noise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = LlamaForCausalLM(config)
    if like is not None:
        model = LlamaForCausalLM.from_pretrained(str(like))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(out), safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    return out


def weights(model: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for f in sorted(model.glob("*.safetensors")):
        found.update(load_file(str(f)))
    return found


def test_alpha_0_is_the_base_and_alpha_1_the_tuned_model_bitwise_in_the_tuned_layout(tmp_path):
    base = tiny_llama(tmp_path / "base", 0)  # one file
    tuned = tiny_llama(tmp_path / "tuned", 1, shard="40KB")  # several shards
    assert len(list(tuned.glob("model-*.safetensors"))) > 2
    b, t = weights(base), weights(tuned)
    for alpha, expected in ((0.0, b), (1.0, t)):
        out = merge.interpolate(base, tuned, alpha, tmp_path / f"a{alpha}")
        got = weights(out)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
        assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in tuned.glob("*.safetensors"))
        assert json.loads((out / "merge.json").read_text())["alpha"] == alpha
        assert (out / "config.json").read_text() == (tuned / "config.json").read_text()
    half = weights(merge.interpolate(base, tuned, 0.5, tmp_path / "half"))
    assert all(torch.allclose(half[k], (b[k] + t[k]) / 2, atol=1e-7) for k in half)


def test_a_sharded_model_merges_one_shard_at_a_time(tmp_path, monkeypatch):
    base = tiny_llama(tmp_path / "base", 0, shard="60KB")
    tuned = tiny_llama(tmp_path / "tuned", 1, shard="40KB")  # the two split differently
    shards = json.loads((tuned / merge.INDEX).read_text())["weight_map"]
    loaded, written = [], []
    original_open, original_save = merge.safe_open, merge.save_file

    class Counting:
        def __init__(self, *a, **kw):
            self.inner = original_open(*a, **kw)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, key):
            loaded.append(key)
            return self.handle.get_tensor(key)

        def keys(self):
            return self.handle.keys()

    def saving(tensors, path, metadata=None):
        written.append((Path(path).name, sorted(tensors), list(loaded)))
        loaded.clear()
        original_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(merge, "safe_open", Counting)
    monkeypatch.setattr(merge, "save_file", saving)
    merge.interpolate(base, tuned, 0.3, tmp_path / "out")
    assert len(written) == len(set(shards.values())) > 2
    for name, keys, read in written:
        assert keys == sorted(k for k, f in shards.items() if f == name)
        assert sorted(read) == sorted(keys * 2)  # this shard's tensors from each model, and nothing else


def test_the_search_finds_the_largest_alpha_within_the_budget_in_few_scorings():
    calls = []

    def rise(alpha):
        calls.append(alpha)
        return 0.1 * alpha

    alpha, tried = merge.largest_within(rise, 0.05)
    assert 0.5 * (1 - 1 / 32) <= alpha <= 0.5 and 0.1 * alpha <= 0.05 and len(calls) <= 7
    assert merge.largest_within(lambda a: 0.01 * a, 0.05) == (1.0, [(1.0, 0.01)])  # within budget: no merge
    # a run that forgot fast (the probe at +5% by alpha 0.03): found to 1/32 of itself, not of 1
    alpha, tried = merge.largest_within(lambda a: 0.05 * a / 0.03, 0.05)
    assert 0.03 * (1 - 1 / 32) <= alpha <= 0.03 and len(tried) <= 12
    assert merge.largest_within(lambda a: 1.0, 0.05)[0] == 0.0  # nothing within the budget: the base


def test_merge_to_budget_holds_the_probe_rise_and_refuses_a_prep_without_probe(sample, tmp_path):
    from data_prep.tokenizer import load_tokenizer

    vocab = load_tokenizer(sample.tokenizer).vocab_size
    base = tiny_llama(tmp_path / "base", 0, vocab=vocab)
    tuned = tiny_llama(tmp_path / "tuned", 1, vocab=vocab, like=base)
    no_probe = make_prep(sample, tmp_path / "prep0")
    with pytest.raises(Exception, match="no probe documents"):
        merge.merge_to_budget(base, tuned, no_probe, 0.02, tmp_path / "out0")
    prep = make_prep(sample, tmp_path / "prep", probe_docs=4)
    full = merge.search_alpha(base, tuned, prep, 10.0, max_docs=8)  # a budget nothing exceeds: alpha 1
    budget = full["tried"][0]["probe_rise"] / 3
    assert full["alpha"] == 1.0 and budget > 0
    summary = merge.merge_to_budget(base, tuned, prep, budget, tmp_path / "out", max_docs=8)
    tried = {t["alpha"]: t["probe_rise"] for t in summary["tried"]}
    assert 0 < summary["alpha"] < 1 and tried[summary["alpha"]] <= budget
    assert min(r for a, r in tried.items() if a > summary["alpha"]) > budget  # just above it, over the budget
    saved = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert saved["alpha"] == summary["alpha"] and saved["to_budget"]["tried"] == summary["tried"]


def test_a_first_window_search_scores_what_the_first_windows_of_base_and_tuned_say(sample, tmp_path):
    import datasets

    from data_prep.prep_dir import PrepDir
    from data_prep.tokenizer import load_tokenizer
    from pipeline.eval import load_hf
    from pipeline.evaluation.perplexity import document_losses, logits_of, perplexity_change

    vocab = load_tokenizer(sample.tokenizer).vocab_size
    base = tiny_llama(tmp_path / "base", 0, vocab=vocab)
    tuned = tiny_llama(tmp_path / "tuned", 1, vocab=vocab, like=base)
    prep = make_prep(sample, tmp_path / "prep", probe_docs=4)
    index = PrepDir(prep).read()
    probe = datasets.load_from_disk(str(index.probe))
    assert max(len(d) for d in probe["input_ids"]) > index.seq_len  # a window short of some documents
    cpu = torch.device("cpu")
    found = merge.search_alpha(base, tuned, prep, 10.0, device=cpu, whole_documents=False)
    first, whole = found["tried"][0], merge.search_alpha(base, tuned, prep, 10.0, device=cpu)["tried"][0]

    def scored(model: Path) -> torch.Tensor:
        forward = logits_of(load_hf(model).float())
        return document_losses(forward, probe["input_ids"], probe["loss_mask"], index.seq_len, whole_documents=False)

    expected = perplexity_change(scored(base), scored(tuned))[0]
    assert found["first_window"] and first["probe_rise"] == pytest.approx(expected, rel=1e-4)
    assert first["probe_rise"] != pytest.approx(whole["probe_rise"], rel=1e-4)
    args = ["--base", str(base), "--tuned", str(tuned), "--alpha", "0.5", "--out", str(tmp_path / "m")]
    assert merge.main([*args, "--first-window"]) != 0 and not (tmp_path / "m").exists()


def test_a_base_that_stores_its_tied_output_embedding_merges_with_an_export_that_does_not(tmp_path):
    base = tiny_llama(tmp_path / "base", 0)
    tuned = tiny_llama(tmp_path / "tuned", 1)
    stored = weights(base)
    stored["lm_head.weight"] = stored["model.embed_tokens.weight"].clone()  # as some checkpoints keep it
    from safetensors.torch import save_file

    save_file(stored, str(base / "model.safetensors"), metadata={"format": "pt"})
    out = weights(merge.interpolate(base, tuned, 1.0, tmp_path / "out"))
    assert out.keys() == weights(tuned).keys()
