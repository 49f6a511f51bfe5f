"""The Python standard library as a byte corpus, and the compressors' yardstick.

Shared by `real_data.py` and `long_context.py`. The corpus is every .py file
under the running CPython's standard library (`sysconfig.get_paths()["stdlib"]`)
outside folders named test, tests, idlelib, site-packages or __pycache__,
copied into one folder (`stage`) so that `tvq.corpus` keys each file by its
path relative to the library: the held-out split (by a CRC-32 of that key) is
the same on every machine with the same Python version.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import lzma
import shutil
import sys
import sysconfig
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}


def stdlib_files() -> tuple[Path, list[Path]]:
    """(library root, its .py files outside SKIP_DIRS, sorted)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if p.is_file() and not SKIP_DIRS & set(p.relative_to(root).parts)
    )
    if not files:
        raise ValueError(f"no .py files found under {root}")
    return root, files


def stage(folder: Path) -> Path:
    """Copy the corpus files into folder/src (once); returns that folder."""
    root, files = stdlib_files()
    src = Path(folder) / "src"
    marker = src / ".complete"
    if marker.is_file():
        return src
    if src.exists():
        shutil.rmtree(src)
    for path in files:
        dest = src / path.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    marker.write_text(sys.version + "\n")
    return src


def heldout_bytes(corpus) -> bytes:
    """The held-out documents' bytes, concatenated in stream order (no separators)."""
    return b"".join(
        bytes(corpus.data[d.start : d.start + d.size])
        for d in corpus.heldout_documents()
    )


def compressor_bits(data: bytes) -> dict[str, float]:
    """Bits per byte of gzip -9, bz2 -9 and xz -9e (Python's modules) on data."""
    sizes = {
        "gzip -9": len(gzip.compress(data, compresslevel=9, mtime=0)),
        "bz2 -9": len(bz2.compress(data, compresslevel=9)),
        "xz -9e": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
    }
    return {name: 8 * size / len(data) for name, size in sizes.items()}


def write_file_list(corpus, path: Path) -> None:
    """CSV of every document: split, path, bytes, SHA-256."""
    lo, _ = corpus.index["heldout"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "path", "bytes", "sha256"])
        for d in corpus.index["documents"]:
            text = bytes(corpus.data[d["offset"] : d["offset"] + d["size"]])
            split = "heldout" if d["offset"] >= lo else "train"
            w.writerow([split, d["key"], d["size"], hashlib.sha256(text).hexdigest()])


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))
