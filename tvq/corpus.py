"""Byte-level corpora from your own files: built once, memory-mapped, streamed.

`load_corpus(sources, cache_dir)` turns folders, glob patterns and files into
one byte stream on disk and opens it memory-mapped; nothing holds the whole
corpus in memory, and building it reads one file at a time.

Documents. Every regular file below a folder (recursively, skipping names
that start with "."), every match of a glob pattern, and every file named is
a document. Its *key* is its path relative to the folder given, to the
pattern's last directory without wildcards, or its bare name for a file
named. Files that contain a NUL byte are skipped as binary, empty files as
empty (both listed in the index); a file that cannot be read raises a
ValueError.

The stream. Each document is preceded by a separator, the NUL byte (0), so
the model learns where documents start and end (generation can stop at it,
and a prompt prefixed with it starts a document). Training documents come
first, ordered by (CRC-32 of the key, key, path), then the held-out ones in
the same order.

The split. A document is held out when CRC-32(key) < heldout_fraction * 2^32:
a deterministic choice that never changes with the other files, and that
only adds files as the fraction grows (0.05 holds out about one file in 20).
When that leaves either split empty (one file, or a few), the split falls
back to bytes: the last ceil(heldout_fraction * n) bytes of the stream are
held out, cut into pieces at the document boundaries they cross (a
document the cut runs through is split "both" in the index).

Batches for truncated backpropagation. The training split, N bytes, is read
as B continuous streams, one per row of the global batch: row r starts at
(shift + r floor(N / B)) mod N and batch j of an epoch holds its bytes
[j L, j L + L] (inputs, and targets one byte later). So the attention state
a row ends a batch with belongs to the text the row continues with in the
next batch. An epoch is floor((floor(N / B) - 1) / L) batches; each epoch
draws a new shift from (seed, epoch), reading wraps around the end of the
split, and the state starts afresh at each epoch's first batch. Batch i is a
pure function of (corpus, i, seed), so a run resumes exactly from the number
of batches it has consumed; with several processes each process reads its
own rows.

Files under cache_dir/<key of the sources>/: corpus.bin (the stream, uint8)
and index.json (every document's path, key, split, offset, size and SHA-256;
the skipped files; the two splits' byte ranges; the SHA-256 of the stream).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

SEPARATOR = 0
INDEX_VERSION = 1
CHUNK = 1 << 20
MAGIC = set("*?[")


# ------------------------------------------------------------ finding files


def _has_magic(part: str) -> bool:
    return bool(MAGIC & set(part))


def _visible(rel: Path) -> bool:
    return not any(part.startswith(".") for part in rel.parts)


def resolve_sources(sources: Sequence[str | os.PathLike]) -> list[tuple[Path, str]]:
    """[(absolute path, key)] of every file the sources name, sorted by path.

    ValueError if there are no sources, a source matches nothing, or no file
    is found at all.
    """
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    if not sources:
        raise ValueError("no data sources given: pass folders, glob patterns or files")
    found: dict[Path, str] = {}
    for source in sources:
        source = os.fspath(source)
        path = Path(source).expanduser()
        if _has_magic(source):
            parts = path.parts
            n_plain = next(i for i, p in enumerate(parts) if _has_magic(p))
            base = Path(*parts[:n_plain]) if n_plain else Path(".")
            matches = [
                Path(m)
                for m in glob.glob(str(path), recursive=True)
                if Path(m).is_file()
            ]
            pairs = [(m, m.relative_to(base).as_posix()) for m in matches]
            pairs = [(m, k) for m, k in pairs if _visible(Path(k))]
        elif path.is_dir():
            pairs = []
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    file = Path(root) / name
                    if not name.startswith(".") and file.is_file():
                        pairs.append((file, file.relative_to(path).as_posix()))
        elif path.is_file():
            pairs = [(path, path.name)]
        elif path.exists():
            raise ValueError(f"{source}: not a regular file or a folder")
        else:
            raise ValueError(f"{source}: no such file or folder")
        if not pairs:
            raise ValueError(f"{source}: no files match")
        for file, key in pairs:
            found.setdefault(file.resolve(), key)
    return sorted(found.items())


def heldout_by_key(key: str, fraction: float) -> bool:
    """Whether the document with this key is held out (CRC-32 below the fraction)."""
    return zlib.crc32(key.encode()) < fraction * 2**32


def _order(key: str, path: Path) -> tuple:
    return (zlib.crc32(key.encode()), key, str(path))


# ----------------------------------------------------------------- building


def _check_fraction(fraction) -> float:
    if not isinstance(fraction, int | float) or not 0.0 < fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {fraction!r}")
    return float(fraction)


def _copy_document(src: Path, out) -> tuple[str, int] | str:
    """Append src to out after a separator: (sha256, size), or why it was skipped."""
    start = out.tell()
    out.write(bytes([SEPARATOR]))
    sha, size = hashlib.sha256(), 0
    try:
        with open(src, "rb") as f:
            while chunk := f.read(CHUNK):
                if SEPARATOR in chunk:
                    out.seek(start)
                    out.truncate()
                    return "binary (contains a NUL byte)"
                out.write(chunk)
                sha.update(chunk)
                size += len(chunk)
    except OSError as e:
        raise ValueError(f"cannot read {src}: {e.strerror or e}") from e
    if not size:
        out.seek(start)
        out.truncate()
        return "empty"
    return sha.hexdigest(), size


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def build_corpus(
    sources: Sequence[str | os.PathLike],
    directory: str | os.PathLike,
    heldout_fraction: float = 0.05,
) -> Corpus:
    """Build the corpus of `sources` into a new `directory`; return it opened.

    The directory is written under a temporary name and renamed when
    complete, so an interrupted build leaves nothing that looks finished.
    """
    fraction = _check_fraction(heldout_fraction)
    files = resolve_sources(sources)
    directory = Path(directory)
    if directory.exists():
        raise ValueError(f"{directory} exists: build_corpus writes a new folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp-", dir=directory.parent))
    try:
        index = _write_stream(files, tmp / "corpus.bin", fraction)
        index["sources"] = [os.fspath(s) for s in sources]
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
        tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Corpus.open(directory)


def _write_stream(files, out_path: Path, fraction: float) -> dict:
    held = {path: heldout_by_key(key, fraction) for path, key in files}
    order = sorted(files, key=lambda pk: (held[pk[0]], *_order(pk[1], pk[0])))
    documents, skipped = [], []
    with open(out_path, "w+b") as out:
        for path, key in order:
            result = _copy_document(path, out)
            if isinstance(result, str):
                skipped.append(dict(path=str(path), key=key, reason=result))
                continue
            sha, size = result
            split = "heldout" if held[path] else "train"
            offset = out.tell() - size
            documents.append(
                dict(path=str(path), key=key, split=split, offset=offset, size=size,
                     sha256=sha)
            )  # fmt: skip
        n = out.tell()
    if not documents:
        reasons = sorted({s["reason"] for s in skipped})
        raise ValueError(
            f"the corpus is empty: {len(skipped)} file(s) found, all skipped "
            f"({', '.join(reasons)})"
        )
    n_train = sum(d["size"] + 1 for d in documents if d["split"] == "train")
    split_by = "file"
    if n_train in (0, n):
        split_by = "bytes"
        n_train = n - math.ceil(fraction * n)
        for d in documents:
            first, end = d["offset"], d["offset"] + d["size"]
            d["split"] = (
                "train" if end <= n_train else "heldout" if first >= n_train else "both"
            )
    return dict(
        version=INDEX_VERSION,
        separator=SEPARATOR,
        heldout_fraction=fraction,
        split_by=split_by,
        n_bytes=n,
        train=[0, n_train],
        heldout=[n_train, n],
        sha256=_file_sha256(out_path),
        documents=documents,
        skipped=skipped,
    )


# ----------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class Document:
    """A held-out stretch of the stream to evaluate from its first byte."""

    key: str
    start: int  # offset of its first byte in corpus.bin
    size: int


@dataclasses.dataclass
class Corpus:
    """A built corpus: the memory-mapped stream and its index."""

    directory: Path
    data: np.memmap  # [n_bytes] uint8
    index: dict

    @classmethod
    def open(cls, directory: str | os.PathLike) -> Corpus:
        """Open a corpus built by `build_corpus`; ValueError if incomplete."""
        directory = Path(directory)
        index_path, data_path = directory / "index.json", directory / "corpus.bin"
        if not index_path.is_file() or not data_path.is_file():
            raise ValueError(
                f"{directory} is not a built corpus (needs index.json and corpus.bin)"
            )
        index = json.loads(index_path.read_text())
        if index.get("version") != INDEX_VERSION:
            raise ValueError(
                f"{index_path}: index version {index.get('version')!r}, this tvq "
                f"reads version {INDEX_VERSION}"
            )
        size = data_path.stat().st_size
        if size != index["n_bytes"]:
            raise ValueError(
                f"{data_path} holds {size} bytes, its index says {index['n_bytes']}"
            )
        data = np.memmap(data_path, np.uint8, mode="r")
        return cls(directory=directory, data=data, index=index)

    @property
    def digest(self) -> str:
        """SHA-256 of the whole stream: equal digests, equal batches."""
        return self.index["sha256"]

    @property
    def train_range(self) -> tuple[int, int]:
        return tuple(self.index["train"])

    @property
    def n_train(self) -> int:
        start, end = self.train_range
        return end - start

    def heldout_documents(self, max_bytes: int | None = None) -> list[Document]:
        """The held-out stretches in stream order (the first max_bytes bytes of them).

        With a split by files, every held-out document; with a split by bytes,
        the pieces of the held-out tail between separators.
        """
        lo, hi = self.index["heldout"]
        docs = []
        for d in self.index["documents"]:
            start = max(d["offset"], lo)
            end = min(d["offset"] + d["size"], hi)
            if end > start:
                docs.append(Document(d["key"], start, end - start))
        if max_bytes is not None:
            kept, total = [], 0
            for doc in docs:
                if total >= max_bytes:
                    break
                size = min(doc.size, max_bytes - total)
                kept.append(dataclasses.replace(doc, size=size))
                total += size
            docs = kept
        if not docs:
            raise ValueError(f"the corpus in {self.directory} has no held-out bytes")
        return docs

    def summary(self) -> str:
        """One line: documents, bytes and how the split was made."""
        n_heldout = sum(d.size for d in self.heldout_documents())
        skipped = len(self.index["skipped"])
        how = "by file" if self.index["split_by"] == "file" else "by bytes (tail)"
        return (
            f"corpus: {len(self.index['documents'])} files, "
            f"{self.index['n_bytes']:,} bytes with separators; train "
            f"{self.n_train:,}, held out {n_heldout:,} (split {how}); "
            f"{skipped} file(s) skipped"
        )


def sources_key(files: list[tuple[Path, str]], heldout_fraction: float) -> str:
    """16 hex digits naming a corpus: the files, their sizes and times, the fraction."""
    h = hashlib.sha256()
    for path, key in files:
        st = path.stat()
        h.update(f"{path}\0{key}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(repr(float(heldout_fraction)).encode())
    return h.hexdigest()[:16]


def load_corpus(
    sources: Sequence[str | os.PathLike],
    cache_dir: str | os.PathLike,
    heldout_fraction: float = 0.05,
) -> Corpus:
    """The corpus of `sources`, built under cache_dir the first time, then reused.

    The cache entry is named by `sources_key`: a file that changes (size or
    modification time) gives a new entry, so a stale stream is never read.
    """
    fraction = _check_fraction(heldout_fraction)
    files = resolve_sources(sources)
    directory = Path(cache_dir) / sources_key(files, fraction)
    if (directory / "index.json").is_file():
        return Corpus.open(directory)
    return build_corpus(sources, directory, fraction)


# ----------------------------------------------------------------- batches


def batches_per_epoch(corpus: Corpus, batch_size: int, sequence_len: int) -> int:
    """Batches of B rows x L bytes before the streams wrap; ValueError if none."""
    row = corpus.n_train // batch_size
    n = (row - 1) // sequence_len
    if n < 1:
        need = batch_size * (sequence_len + 1)
        raise ValueError(
            f"the training split holds {corpus.n_train:,} bytes, fewer than one "
            f"sequence per row: global_batch_size {batch_size} x (sequence_len "
            f"{sequence_len} + 1) = {need:,}; add text or make them smaller"
        )
    return n


def epoch_shift(corpus: Corpus, epoch: int, seed: int) -> int:
    """Where the streams of an epoch start, in [0, N): a function of (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    return int(rng.integers(corpus.n_train))


def train_batch(
    corpus: Corpus,
    index: int,
    *,
    batch_size: int,
    sequence_len: int,
    seed: int,
    rows: slice = slice(None),
) -> dict[str, np.ndarray]:
    """Batch `index` of the training streams: inputs, targets, loss_mask [R, L].

    R is the number of `rows` of the global batch of batch_size rows (all by
    default). Every position counts in the loss.
    """
    if index < 0:
        raise ValueError(f"batch index must be >= 0, got {index}")
    n_epoch = batches_per_epoch(corpus, batch_size, sequence_len)
    epoch, j = divmod(index, n_epoch)
    start, end = corpus.train_range
    n = end - start
    row_len = n // batch_size
    shift = epoch_shift(corpus, epoch, seed)
    row_ids = np.arange(batch_size)[rows]
    offsets = shift + row_ids * row_len + j * sequence_len
    positions = (offsets[:, None] + np.arange(sequence_len + 1)) % n + start
    window = np.asarray(corpus.data[positions.ravel()], np.int32)
    window = window.reshape(len(row_ids), sequence_len + 1)
    return dict(
        inputs=window[:, :-1],
        targets=window[:, 1:],
        loss_mask=np.ones([len(row_ids), sequence_len], np.int32),
    )


def starts_epoch(
    corpus: Corpus, index: int, batch_size: int, sequence_len: int
) -> bool:
    """Whether batch `index` begins new streams (the carried state starts afresh)."""
    return index % batches_per_epoch(corpus, batch_size, sequence_len) == 0


def stream_batches(
    corpus: Corpus,
    documents: Sequence[Document],
    *,
    batch_size: int,
    chunk_len: int,
    rows: slice = slice(None),
) -> Iterator[tuple[bool, dict[str, np.ndarray]]]:
    """Held-out documents as streams, chunk by chunk: (starts a group, batch).

    Documents go longest first into groups of batch_size rows (empty rows
    padded, loss_mask 0); each group is read from the documents' first bytes
    in chunks of chunk_len positions, so a model's state carries from chunk to
    chunk over whole documents and starts afresh with each group. Position p
    of a document predicts its byte p from the bytes before it, the first
    from the separator. Batches are [R, chunk_len] for the R rows in `rows`.
    """
    docs = sorted(documents, key=lambda d: -d.size)
    row_ids = np.arange(batch_size)[rows]
    data = corpus.data
    for g in range(0, len(docs), batch_size):
        group = docs[g : g + batch_size]
        mine = [group[r] if r < len(group) else None for r in row_ids]
        n_chunk = math.ceil(group[0].size / chunk_len)
        for c in range(n_chunk):
            inputs = np.zeros([len(row_ids), chunk_len], np.int32)
            targets = np.zeros_like(inputs)
            mask = np.zeros_like(inputs)
            for i, doc in enumerate(mine):
                if doc is None:
                    continue
                lo = c * chunk_len
                hi = min(lo + chunk_len, doc.size)
                if hi <= lo:
                    continue
                span = np.asarray(data[doc.start + lo : doc.start + hi], np.int32)
                targets[i, : hi - lo] = span
                mask[i, : hi - lo] = 1
                inputs[i, 1 : hi - lo] = span[:-1]
                inputs[i, 0] = SEPARATOR if lo == 0 else data[doc.start + lo - 1]
            yield c == 0, dict(inputs=inputs, targets=targets, loss_mask=mask)
