"""The README's and docs' commands and the README's run file: each `cpt` / `python -m` command names flags its
--help lists, and the run file checks clean once its paths are real (a real model directory, real corpora)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.runfile import check_run

from .train_helpers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def fenced(text: str, languages: tuple[str, ...] = ("bash", "sh", "")) -> list[str]:
    """The bodies of the fenced blocks opened with one of ``languages``."""
    blocks, body, language = [], [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if language is None:
                language, body = line[3:].strip(), []
            else:
                if language in languages:
                    blocks.append("\n".join(body) + "\n")
                language = None
        elif language is not None:
            body.append(line)
    return blocks


def commands(page: Path) -> list[list[str]]:
    """``[module, args...]`` of every `cpt` and `python -m` command in a page's shell blocks and inline code;
    placeholders (``cpt COMMAND``, ``bench.NAME``) are templates, not commands."""
    text = page.read_text()
    blocks = [block.replace("\\\n", " ") for block in fenced(text)]  # continued lines joined
    lines = [c.strip() for block in blocks for line in block.splitlines() for c in line.split("&&")]
    lines = [line for line in lines if line.startswith(("cpt ", "python -m "))]
    lines += re.findall(r"`((?:cpt|python -m) [^`]+)`", text)
    found = []
    for line in lines:
        words = shlex.split(line, comments=True)
        if words[:1] == ["cpt"] and len(words) > 1:
            module, args = f"pipeline {words[1]}", words[2:]
        elif words[:2] == ["python", "-m"] and len(words) > 2:
            module, args = words[2], words[3:]
        else:
            continue
        if not any(part.isupper() for part in re.split(r"[ .]", module)):
            found.append([module, *args])
    return found


def flags_by_command() -> dict[str, dict[str, set[str]]]:
    """{module: {flag: pages that use it}}, every command of every page."""
    found: dict[str, dict[str, set[str]]] = {}
    for page in PAGES:
        for module, *args in commands(page):
            flags = found.setdefault(module, {})
            for flag in (a.split("=")[0] for a in args if a.startswith("--")):
                flags.setdefault(flag, set()).add(str(page.relative_to(ROOT)))
    return found


FLAGS = flags_by_command()


def test_the_readme_shows_the_one_command_flow():
    shown = {words[0] for words in commands(ROOT / "README.md")}
    assert {"pipeline demo", "pipeline init", "pipeline check", "pipeline run", "pipeline plan"} <= shown, shown


@pytest.mark.parametrize("module", sorted(FLAGS))
def test_every_command_in_the_readme_and_docs_names_flags_its_command_has(module):
    helped = subprocess.run(
        [sys.executable, "-m", *module.split(), "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert helped.returncode == 0, helped.stderr[-2000:]
    for flag, pages in FLAGS[module].items():
        assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", helped.stdout), (flag, pages, helped.stdout)


@pytest.mark.real_model
def test_the_readme_run_file_checks_clean_with_real_paths(sample, smollm2, tmp_path):
    (run_file,) = fenced((ROOT / "README.md").read_text(), ("yaml",))
    for template, real in (
        ("/models/llama-3-8b", smollm2),
        ("data/law/*.jsonl.zst", sample.domain),
        ("data/web/*.parquet", sample.general),
    ):
        assert template in run_file
        run_file = run_file.replace(template, str(real))
    path = tmp_path / "law.yaml"
    path.write_text(run_file)
    run, problems = check_run(path)
    assert problems == [] and run is not None
    assert run.gpus == 8 and run.train.model.gradient_checkpointing
