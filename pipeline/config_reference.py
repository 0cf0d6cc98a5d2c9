"""docs/config.md, generated from the config declarations: ``python -m pipeline.config_reference > docs/config.md``.

A test compares the committed file with this output, so the page cannot drift from the code.
"""

from __future__ import annotations

from cpt_core.typed_config import reference
from data_prep.config import config_reference as prepare_reference

from .config import config_reference as train_reference
from .runfile import ExportSection, MergeSection, RunSection

HEADER = """# Config reference

Generated from the config dataclasses (`pipeline/runfile.py`, `data_prep/config.py`, with the
build and reading options of `data_prep/build.py` and `data_prep/readers.py`, and
`pipeline/config.py`) by `python -m pipeline.config_reference > docs/config.md`; do not edit by hand.
`python -m pipeline.train --help-config` prints the training part.

A run file (`cpt run RUN.yaml`) is the training config below, with the data-prep config under
`data:` (its `out` is the run's `prep/` and its `tokenizer` defaults to `model.path`), `deepspeed`
naming a preset of `ds_configs/` (`zero3_bf16`, `zero3_offload`, `zero3_cpu`) or a JSON path, and
these keys besides:
"""


def render() -> str:
    run = [
        reference(RunSection, "Run file: top level"),
        reference(ExportSection, "Run file: `export`", "export."),
        reference(MergeSection, "Run file: `merge`", "merge."),
    ]
    return "\n".join([HEADER, *run, "## Data prep", "", prepare_reference(), "## Training", "", train_reference()])


if __name__ == "__main__":
    print(render(), end="")
