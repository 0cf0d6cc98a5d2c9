"""Shared fixtures: real text from Python's stdlib and a throwaway tokenizer trained on it."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

# Triton kernels run on the CPU through the interpreter, set before any test module imports triton; with
# CPT_TEST_DEVICE=cuda the kernel tests run compiled on the GPU instead (bench/gpu_checks.sh).
os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("CPT_TEST_DEVICE") == "cuda" else "1")

from data_prep.sample import SampleSizes, train_sample_tokenizer, write_sample_corpora

TINY = SampleSizes(
    domain_chars=150_000, general_chars=120_000, max_file_chars=12_000, instruction_examples=120, vocab_size=768
)


@dataclass(frozen=True)
class Sample:
    root: Path
    domain: Path
    general: Path
    instruction: Path
    tokenizer: Path

    def texts(self, role: str) -> list[str]:
        path = getattr(self, role)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="session")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    root = tmp_path_factory.mktemp("sample")
    paths = write_sample_corpora(root / "corpora", TINY)
    model = train_sample_tokenizer([paths["domain"], paths["general"]], root / "spm.model", TINY.vocab_size)
    return Sample(root, paths["domain"], paths["general"], paths["instruction"], model)


@pytest.fixture(scope="session")
def prep(sample: Sample, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small data_prep output: domain + 15% general, replay shard, holdouts."""
    from .train_helpers import make_prep

    return make_prep(sample, tmp_path_factory.mktemp("prep") / "prep")


@pytest.fixture(scope="session")
def reference(prep: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One uninterrupted 12-step run on 2 ZeRO-3 ranks: (config, run dir); tests must not change it.
    The launcher's output, a batch log (not a terminal), is kept as ``launcher.log`` beside the config."""
    from .train_helpers import run_training, write_config

    root = tmp_path_factory.mktemp("reference")
    config = write_config(root / "cpt.yaml", prep, root / "run")
    result = run_training(config)
    (root / "launcher.log").write_text(result.stdout + result.stderr)
    return config, root / "run"


@pytest.fixture
def lost(record_property: Callable[[str, object], None]) -> Callable[[int], int]:
    """Record how many items (documents, files, tensors) a reliability case lost, for bench/reliability.py.

    Tests record before they assert that the count is 0, so the bench can total what a failure lost.
    """

    def record(count: int) -> int:
        record_property("data_lost", count)
        return count

    return record


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a local HF directory (model + tokenizer): Llama, tied embeddings, ChatML, no BOS."""
    from pipeline.real_models import materialise

    return materialise("smollm2")


@pytest.fixture(scope="session")
def gemma3() -> Path:
    """Gemma-3-270m base's tokenizer (a 262k vocabulary; it adds <bos>); the weights are not needed here."""
    from pipeline.real_models import materialise

    return materialise("gemma3", tokenizer_only=True)


_SESSION_STARTED = 0.0


def pytest_sessionstart(session: pytest.Session) -> None:
    global _SESSION_STARTED
    import time

    _SESSION_STARTED = time.time()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the /dev/shm buffers of ranks this session killed on purpose (kill -9 tests cannot clean up).

    DeepSpeed's CPU all-reduce keeps 66 MB per rank in RAM-backed /dev/shm; ranks that exit remove their
    own (pipeline.runtime.distributed.release_shared_memory), killed ones cannot.
    """
    for buffer in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        try:
            if buffer.stat().st_mtime >= _SESSION_STARTED:
                buffer.unlink()
        except OSError:
            pass
