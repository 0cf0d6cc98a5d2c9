"""Data prep throughput: raw tokenizer vs this pipeline vs the usual Hugging Face recipe.

All three run in this process on the same corpus (the embedded stdlib sample,
repeated to --repeat copies with a per-copy tag so dedup keeps them) and the
same SentencePiece tokenizer, one thread each:
  1. raw     — ``encode_batch`` over texts already in memory: the ceiling;
  2. ours    — ``build_source`` (checksum, read gz, parse, validate, dedup,
               tokenize, pack, write Arrow) + ``mix``, from the jsonl.gz file;
  3. hf      — ``load_dataset('json')`` → ``.map(tokenize)`` → ``.map(group_texts)``
               → ``save_to_disk``, the recipe of the HF run_clm example.
Then ours with 2 workers, and peak RSS of a build at 1x and 10x the corpus
(separate processes) to show that memory does not grow with the corpus.
Then the same with the Hugging Face tokenizer users bring (SmolLM2's, from
pipeline.real_models, or --hf-tokenizer DIR): its own batch encode
(``tokenizer(texts, add_special_tokens=False)``, one thread) against this
pipeline with one worker, which also applies the tokenizer's start
convention, encodes control-token literals as text and counts them.

    python -m bench.data_prep [--repeat 8] [--seq-len 1024] [--hf-tokenizer DIR]
Last line: ratio_vs_raw_tokenizer=<x> ratio_vs_hf_recipe=<y> ratio_vs_raw_hf_tokenizer=<z>
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.harness import finish, table, timed
from cpt_core.logs import setup_logging
from data_prep.build import BuildOptions, SourceSpec, build_source, load_build
from data_prep.mix import mix
from data_prep.sample import SampleSizes, train_sample_tokenizer, write_sample_corpora
from data_prep.tokenizer import load_tokenizer
from pipeline.real_models import materialise

log = logging.getLogger("bench.data_prep")


def make_corpus(root: Path, repeat: int) -> tuple[Path, Path, list[str]]:
    sample = write_sample_corpora(root / "sample", SampleSizes())
    model = train_sample_tokenizer([sample["domain"], sample["general"]], root / "spm.model", 4096)
    base = [json.loads(line)["text"] for line in gzip.open(sample["domain"], "rt", encoding="utf-8")]
    texts = [f"# copy {k}\n{t}" for k in range(repeat) for t in base]
    return write_corpus(root / f"corpus-x{repeat}.jsonl.gz", texts), model, texts


def write_corpus(path: Path, texts: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path


def best_of(runs: int, fn, *args):
    """Fastest of ``runs`` calls: the least disturbed by other work on the machine."""
    results = [fn(*args) for _ in range(runs)]
    return min(results, key=lambda r: r[0])


def time_raw(model: Path, texts: list[str]) -> tuple[float, int]:
    tok = load_tokenizer(model)
    batches = range(0, len(texts), 1024)
    return timed(lambda: sum(len(ids) + 1 for i in batches for ids in tok.encode_batch(texts[i : i + 1024])))  # + EOS


def time_raw_hf(tokenizer_dir: Path, texts: list[str]) -> tuple[float, int]:
    from transformers import AutoTokenizer  # imported before the timer below: its import is not throughput

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    return timed(
        lambda: sum(
            len(ids) + 1
            for i in range(0, len(texts), 1024)  # + EOS
            for ids in tok(texts[i : i + 1024], add_special_tokens=False)["input_ids"]
        )
    )


def time_ours(corpus: Path, model: Path, work: Path, seq_len: int, workers: int) -> tuple[float, int]:
    shutil.rmtree(work, ignore_errors=True)
    spec = SourceSpec(name="bench", role="domain", paths=(str(corpus),), holdout_fraction=0.0)

    def build_and_mix() -> Path:
        out = build_source(spec, BuildOptions(seq_len=seq_len), str(model), work / "cache", workers=workers, quiet=True)
        mix([str(out)], work / "mixture", general_ratio=0.0, quiet=True)
        return out

    seconds, out = timed(build_and_mix)
    return seconds, load_build(out)["tokens_train"]


def time_hf_recipe(corpus: Path, model: Path, work: Path, seq_len: int) -> tuple[float, int]:
    import datasets  # already imported by main before any timer (a one-off cost)

    shutil.rmtree(work, ignore_errors=True)
    tok = load_tokenizer(model)
    datasets.disable_progress_bars()

    def tokenize(batch):
        return {"input_ids": [ids + [tok.eos_id] for ids in tok.encode_batch(batch["text"])]}

    def group_texts(batch):  # as in transformers' examples/pytorch/language-modeling/run_clm.py
        flat = [t for ids in batch["input_ids"] for t in ids]
        total = len(flat) // seq_len * seq_len
        return {"input_ids": [flat[i : i + seq_len] for i in range(0, total, seq_len)]}

    def recipe() -> int:
        raw = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(work / "hf_cache"))
        tokenized = raw.map(tokenize, batched=True, remove_columns=["text"])
        n = sum(len(ids) for ids in tokenized["input_ids"])
        tokenized.map(group_texts, batched=True).save_to_disk(str(work / "hf_out"))
        return n

    return timed(recipe)


def peak_rss_mb(corpus: Path, model: Path, work: Path, seq_len: int) -> tuple[float, float]:
    """Peak RSS (MB) of a build's reader process and of its largest worker, in a fresh process tree."""
    shutil.rmtree(work, ignore_errors=True)
    code = (
        "import sys, resource; from data_prep.build import *; "
        f"build_source(SourceSpec(name='m', role='domain', paths=({str(corpus)!r},), holdout_fraction=0.0), "
        f"BuildOptions(seq_len={seq_len}), {str(model)!r}, {str(work)!r}, quiet=True); "
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so it would count this bench
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
        "print(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    main_kb, worker_kb = out.stdout.strip().splitlines()[-1].split()
    return int(main_kb) / 1024, int(worker_kb) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=8, help="copies of the ~4 MB stdlib sample in the corpus")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3, help="timed runs per step; the fastest is reported")
    p.add_argument("--skip-rss", action="store_true", help="skip the 1x vs 10x peak-RSS measurement")
    p.add_argument("--hf-tokenizer", type=Path, help="Hugging Face tokenizer dir (default: SmolLM2's, materialised)")
    args = p.parse_args()
    setup_logging(logging.WARNING)
    import datasets  # noqa: F401  imported before any timer: a one-off cost, not throughput

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    root = Path(tempfile.mkdtemp(prefix="bench-data-prep-"))
    try:
        corpus, model, texts = make_corpus(root, args.repeat)
        mb = corpus.stat().st_size / 2**20
        raw_s, raw_tok = best_of(args.runs, time_raw, model, texts)
        ours_s, ours_tok = best_of(args.runs, time_ours, corpus, model, root / "ours1", args.seq_len, 1)
        ours2_s, _ = best_of(args.runs, time_ours, corpus, model, root / "ours2", args.seq_len, 2)
        hf_s, hf_tok = best_of(args.runs, time_hf_recipe, corpus, model, root / "hf", args.seq_len)
        assert raw_tok == ours_tok == hf_tok, (raw_tok, ours_tok, hf_tok)  # same work, or the ratios mean nothing
        rows = [
            ("raw tokenizer encode_batch (1 thread)", raw_s),
            ("this pipeline, 1 worker", ours_s),
            ("this pipeline, 2 workers", ours2_s),
            ("HF recipe (map+group_texts+save)", hf_s),
        ]
        print(
            f"\nbest of {args.runs} runs each; corpus: {len(texts):,} docs, {raw_tok:,} tokens ({mb:.1f} MB jsonl.gz), "
            f"seq_len {args.seq_len}, "
            f"{os.cpu_count()} cores"
        )
        cells = [(name, f"{s:.2f}", f"{raw_tok / s:,.0f}", f"{raw_s / s:.2f}") for name, s in rows]
        print(table(("step", "seconds", "tokens/s", "vs raw"), cells))
        print(f"\nworker speed-up (2 vs 1): {ours_s / ours2_s:.2f}x")
        if not args.skip_rss:
            small = write_corpus(root / "rss-1x.jsonl.gz", texts[: len(texts) // 10 or 1])
            rss1 = peak_rss_mb(small, model, root / "rss1", args.seq_len)
            rss10 = peak_rss_mb(corpus, model, root / "rss10", args.seq_len)
            print(
                f"peak RSS of a build (reader / worker): {rss1[0]:.0f} / {rss1[1]:.0f} MB at 1x, "
                f"{rss10[0]:.0f} / {rss10[1]:.0f} MB at 10x ({rss10[0] / rss1[0]:.2f}x / {rss10[1] / rss1[1]:.2f}x)"
            )
        hf_dir = args.hf_tokenizer or materialise("smollm2")
        hf_raw_s, hf_raw_tok = best_of(args.runs, time_raw_hf, hf_dir, texts)
        hf_ours_s, hf_ours_tok = best_of(args.runs, time_ours, corpus, hf_dir, root / "ours_hf", args.seq_len, 1)
        start_ids = len(load_tokenizer(hf_dir).bos_ids) * len(texts)  # ours starts documents as the tokenizer does
        assert hf_ours_tok == hf_raw_tok + start_ids, (hf_raw_tok, hf_ours_tok)
        print(f"\nHugging Face tokenizer {hf_dir}: {hf_raw_tok:,} tokens, best of {args.runs}")
        hf_rows = (("raw HF batch encode (1 thread)", hf_raw_s), ("this pipeline, 1 worker", hf_ours_s))
        cells = [(name, f"{s:.2f}", f"{hf_raw_tok / s:,.0f}", f"{hf_raw_s / s:.2f}") for name, s in hf_rows]
        print(table(("step", "seconds", "tokens/s", "vs raw"), cells))
        figures = {
            "ratio_vs_raw_tokenizer": raw_s / ours_s,
            "ratio_vs_hf_recipe": hf_s / ours_s,
            "ratio_vs_raw_hf_tokenizer": hf_raw_s / hf_ours_s,
        }
        finish("data_prep", figures, {"seconds": dict(rows), "hf_seconds": dict(hf_rows), "tokens": raw_tok})
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
