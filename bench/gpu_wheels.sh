#!/usr/bin/env bash
# Wheels for what a bare GPU machine's Python lacks, downloaded where pip works, into .whl/ (git-ignored), for
# bench/gpu_checks.sh to install there without a network. The lent machines' image has Python 3.12 with
# torch, triton, accelerate, pyarrow, tokenizers, safetensors, sentencepiece, pandas and pytest, and not
# DeepSpeed, datasets or a transformers recent enough for packed documents (pyproject.toml).
#   bash bench/gpu_wheels.sh [PYTHON_VERSION]      # default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}
dest=.whl
mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
done
binary=(--no-deps --only-binary=:all: --python-version "$py" --implementation cp "${platforms[@]}" -d "$dest")
# versions as tested here (pip list of the CI venv); --no-deps: each one needed is named
python3 -m pip download -q "${binary[@]}" \
    transformers==5.24.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
# DeepSpeed publishes a source distribution only; it installs without compiling (its ops build at first use)
python3 -m pip download -q --no-deps --no-binary=:all: -d "$dest" deepspeed==0.19.8
ls -1 "$dest"
du -sh "$dest"
