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

import jax
import numpy as np

from tvq.corpus import stream_batches
from tvq.model import Transformer
from tvq.train import carries_state, eval_step

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


def write_file_list(corpus, path: Path, scores: dict | None = None) -> None:
    """CSV of every document: split, path, bytes, SHA-256; for held-out ones
    also the model's bits per byte (from `scores`, of `score_files`) and each
    compressor's on that file alone."""
    lo, _ = corpus.index["heldout"]
    names = ["gzip -9", "bz2 -9", "xz -9e"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "path", "bytes", "sha256", "model_bpb", *names])
        for d in corpus.index["documents"]:
            text = bytes(corpus.data[d["offset"] : d["offset"] + d["size"]])
            split = "heldout" if d["offset"] >= lo else "train"
            row = [split, d["key"], d["size"], hashlib.sha256(text).hexdigest()]
            if split == "heldout" and scores is not None:
                bits, n = scores[d["key"]]
                per_file = compressor_bits(text)
                row += [round(bits / n, 4), *(round(per_file[k], 4) for k in names)]
            w.writerow(row)


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


def score_files(config, params, corpus, documents, batch_size: int = 8) -> dict:
    """{key: (bits, bytes)}: the model's total bits on each document, as a stream.

    Each document is read from its first byte in chunks of sequence_len, the
    attention state carried from chunk to chunk over the whole document
    (attention="vq"; dense attention starts a fresh buffer every chunk, as
    `tvq.lm.evaluate`).
    """
    config = config.replace(is_train=False)
    chunk = config.sequence_len
    carry = carries_state(config)
    fresh = Transformer.initial_state(config, batch_size, None if carry else chunk)
    step = jax.jit(lambda p, batch, s: eval_step(config, p, batch, s))
    docs = sorted(documents, key=lambda d: -d.size)
    totals = {d.key: [0.0, 0] for d in docs}
    state, group = None, -1
    for first, batch in stream_batches(
        corpus, docs, batch_size=batch_size, chunk_len=chunk
    ):
        group += first
        if first or not carry:
            state = fresh
        out = step(params, batch, state)
        state = out["attn_state"]
        nll = np.asarray(out["nll"], np.float64)
        mask = batch["loss_mask"] != 0
        for row, doc in enumerate(docs[group * batch_size : (group + 1) * batch_size]):
            totals[doc.key][0] += nll[row][mask[row]].sum() / np.log(2.0)
            totals[doc.key][1] += int(mask[row].sum())
    return {k: (bits, n) for k, (bits, n) in totals.items()}
