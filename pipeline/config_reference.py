"""docs/config.md, generated from the config declarations: ``python -m pipeline.config_reference > docs/config.md``.

A test compares the committed file with this output, so the page cannot drift from the code.
"""

from __future__ import annotations

from data_prep.config import config_reference as prepare_reference

from .config import config_reference as train_reference

HEADER = """# Config reference

Generated from the config dataclasses (`data_prep/config.py`, with the build and reading
options of `data_prep/build.py` and `data_prep/readers.py`, and `pipeline/config.py`) by
`python -m pipeline.config_reference > docs/config.md`; do not edit by hand.
`python -m pipeline.train --help-config` prints the training part.
"""


def render() -> str:
    return "\n".join([HEADER, "## Data prep", "", prepare_reference(), "## Training", "", train_reference()])


if __name__ == "__main__":
    print(render(), end="")
