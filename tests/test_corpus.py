"""tvq.corpus: the byte stream, the split, the batches, and bad input.

References are written independently: the stream by joining the files in
Python in the documented order, the split from zlib.crc32, the batches from
a row's stream read byte by byte, the held-out streams by concatenating each
row's chunks back into documents.
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib

import numpy as np
import pytest

from tvq import corpus as tc


def write_files(root, texts: dict[str, bytes]):
    for name, data in texts.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def random_texts(n: int, seed: int = 0, lo=50, hi=400) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"abcdefghij klmnop\n", np.uint8)
    return {
        f"d{i % 3}/file{i:02d}.txt": bytes(rng.choice(letters, rng.integers(lo, hi)))
        for i in range(n)
    }


def expected_stream(texts: dict[str, bytes], fraction: float) -> tuple[bytes, int]:
    """The stream by the documented rule, and where the held-out part starts."""

    def order(key):
        return (zlib.crc32(key.encode()), key)

    held = {k for k in texts if zlib.crc32(k.encode()) < fraction * 2**32}
    train = sorted((k for k in texts if k not in held), key=order)
    heldout = sorted(held, key=order)
    stream = b"".join(b"\0" + texts[k] for k in train + heldout)
    boundary = sum(len(texts[k]) + 1 for k in train)
    return stream, boundary


def test_stream_split_and_index(tmp_path):
    texts = random_texts(40)
    write_files(tmp_path / "src", texts)
    fraction = 0.2
    corpus = tc.build_corpus([tmp_path / "src"], tmp_path / "c", fraction)
    stream, boundary = expected_stream(texts, fraction)
    assert 0 < boundary < len(stream)  # both splits hold files
    assert bytes(corpus.data) == stream
    assert corpus.train_range == (0, boundary)
    assert corpus.index["split_by"] == "file"
    assert corpus.digest == hashlib.sha256(stream).hexdigest()
    for doc in corpus.index["documents"]:
        content = texts[doc["key"]]
        assert stream[doc["offset"] : doc["offset"] + doc["size"]] == content
        assert stream[doc["offset"] - 1] == 0  # the separator before it
        assert doc["sha256"] == hashlib.sha256(content).hexdigest()
    held = {d.key for d in corpus.heldout_documents()}
    assert held == {k for k in texts if zlib.crc32(k.encode()) < fraction * 2**32}


def test_larger_fraction_only_adds_heldout_files(tmp_path):
    texts = random_texts(40)
    write_files(tmp_path / "src", texts)
    small = tc.build_corpus([tmp_path / "src"], tmp_path / "a", 0.1)
    large = tc.build_corpus([tmp_path / "src"], tmp_path / "b", 0.3)
    small_keys, large_keys = (
        {d.key for d in c.heldout_documents()} for c in (small, large)
    )
    assert small_keys < large_keys


def test_sources_folder_glob_and_files(tmp_path):
    write_files(tmp_path, {"a/x.txt": b"x1", "a/sub/y.md": b"y22", "a/.hidden": b"h",
                           "a/.git/config": b"g", "b/z.txt": b"z333"})  # fmt: skip
    found = tc.resolve_sources([tmp_path / "a"])
    assert [k for _, k in found] == ["sub/y.md", "x.txt"]
    found = tc.resolve_sources([str(tmp_path / "a" / "**" / "*.md")])
    assert [k for _, k in found] == ["sub/y.md"]
    found = tc.resolve_sources([tmp_path / "b" / "z.txt", tmp_path / "a" / "x.txt"])
    assert sorted(k for _, k in found) == ["x.txt", "z.txt"]
    # A file named twice (here also through a folder) is one document.
    found = tc.resolve_sources([tmp_path / "a", tmp_path / "a" / "x.txt"])
    assert len(found) == 2


def test_binary_and_empty_files_are_skipped(tmp_path):
    texts = random_texts(10)
    texts["bin.dat"] = b"text\0more text"
    texts["empty.txt"] = b""
    write_files(tmp_path / "src", texts)
    corpus = tc.build_corpus([tmp_path / "src"], tmp_path / "c", 0.3)
    reasons = {s["key"]: s["reason"] for s in corpus.index["skipped"]}
    assert reasons == {"bin.dat": "binary (contains a NUL byte)", "empty.txt": "empty"}
    kept = {k: v for k, v in texts.items() if k not in reasons}
    assert bytes(corpus.data) == expected_stream(kept, 0.3)[0]


def test_one_file_is_split_by_bytes(tmp_path):
    data = bytes(np.random.default_rng(1).integers(1, 256, 5000, dtype=np.uint8))
    write_files(tmp_path, {"one.bin": data})
    corpus = tc.build_corpus([tmp_path / "one.bin"], tmp_path / "c", 0.1)
    n = len(data) + 1
    cut = n - math.ceil(0.1 * n)
    assert corpus.index["split_by"] == "bytes"
    assert corpus.train_range == (0, cut)
    (doc,) = corpus.heldout_documents()
    assert (doc.start, doc.size) == (cut, n - cut)
    assert bytes(corpus.data[doc.start :]) == data[cut - 1 :]


def test_load_corpus_reuses_and_rebuilds(tmp_path):
    write_files(tmp_path / "src", random_texts(6))
    first = tc.load_corpus([tmp_path / "src"], tmp_path / "cache")
    again = tc.load_corpus([tmp_path / "src"], tmp_path / "cache")
    assert again.directory == first.directory
    (tmp_path / "src" / "d0" / "file00.txt").write_bytes(b"changed text")
    changed = tc.load_corpus([tmp_path / "src"], tmp_path / "cache")
    assert changed.directory != first.directory
    assert b"changed text" in bytes(changed.data)


# ------------------------------------------------------------------- batches


def circular_stream(corpus) -> np.ndarray:
    start, end = corpus.train_range
    return np.asarray(corpus.data[start:end], np.int64)


@pytest.mark.parametrize("seed", [0, 3])
def test_rows_are_continuous_streams(tmp_path, seed):
    write_files(tmp_path / "src", random_texts(30, lo=100, hi=200))
    corpus = tc.build_corpus([tmp_path / "src"], tmp_path / "c", 0.1)
    b, length = 4, 16
    n_epoch = tc.batches_per_epoch(corpus, b, length)
    stream = circular_stream(corpus)
    n = len(stream)
    assert n_epoch == (n // b - 1) // length
    for epoch in range(2):
        batches = [
            tc.train_batch(corpus, epoch * n_epoch + j, batch_size=b,
                           sequence_len=length, seed=seed)
            for j in range(n_epoch)
        ]  # fmt: skip
        starts = []
        for r in range(b):
            row = np.concatenate([x["inputs"][r] for x in batches])
            # Row r is one contiguous stretch of the circular stream.
            begin = int(np.flatnonzero(
                [np.array_equal(np.take(stream, np.arange(s, s + 64), mode="wrap"),
                                row[:64]) for s in range(n)]
            )[0])  # fmt: skip
            want = np.take(stream, begin + np.arange(len(row)), mode="wrap")
            np.testing.assert_array_equal(row, want)
            for x in batches:
                np.testing.assert_array_equal(x["targets"][r, :-1], x["inputs"][r, 1:])
            starts.append(begin)
        # Rows start n // b apart, so their streams never overlap in an epoch.
        gaps = np.diff(starts) % n
        assert (gaps == n // b).all()
        assert all(
            tc.starts_epoch(corpus, epoch * n_epoch + j, b, length) == (j == 0)
            for j in range(n_epoch)
        )


def test_batches_are_a_function_of_index_and_seed(tmp_path):
    write_files(tmp_path / "src", random_texts(30))
    corpus = tc.build_corpus([tmp_path / "src"], tmp_path / "c", 0.1)
    kw = dict(batch_size=8, sequence_len=16)
    a = tc.train_batch(corpus, 5, seed=1, **kw)
    np.testing.assert_array_equal(
        a["inputs"], tc.train_batch(corpus, 5, seed=1, **kw)["inputs"]
    )
    assert not np.array_equal(
        a["inputs"], tc.train_batch(corpus, 5, seed=2, **kw)["inputs"]
    )
    # Each process reads its own rows of the same global batch.
    half = tc.train_batch(corpus, 5, seed=1, rows=slice(4, 8), **kw)
    np.testing.assert_array_equal(half["inputs"], a["inputs"][4:])
    assert a["loss_mask"].all() and a["inputs"].dtype == np.int32


@pytest.mark.parametrize("rows", [slice(None), slice(2, 4)])
def test_heldout_streams_rebuild_every_document(tmp_path, rows):
    texts = random_texts(40, lo=10, hi=300)
    write_files(tmp_path / "src", texts)
    corpus = tc.build_corpus([tmp_path / "src"], tmp_path / "c", 0.4)
    docs = corpus.heldout_documents()
    b, chunk = 4, 32
    seen = {}
    group, rows_of_group = -1, []
    for first, batch in tc.stream_batches(corpus, docs, batch_size=b, chunk_len=chunk,
                                          rows=rows):  # fmt: skip
        if first:
            group += 1
            rows_of_group.append([[] for _ in range(batch["inputs"].shape[0])])
        for r, parts in enumerate(rows_of_group[group]):
            parts.append({k: v[r] for k, v in batch.items()})
    by_size = sorted(docs, key=lambda d: -d.size)
    row_ids = np.arange(b)[rows]
    for g, group_rows in enumerate(rows_of_group):
        for r, parts in zip(row_ids, group_rows, strict=True):
            inputs = np.concatenate([p["inputs"] for p in parts])
            targets = np.concatenate([p["targets"] for p in parts])
            mask = np.concatenate([p["loss_mask"] for p in parts]).astype(bool)
            if g * b + r >= len(by_size):
                assert not mask.any()
                continue
            doc = by_size[g * b + r]
            content = np.frombuffer(texts[doc.key], np.uint8)
            np.testing.assert_array_equal(targets[mask], content)
            np.testing.assert_array_equal(inputs[: doc.size], np.r_[0, content[:-1]])
            assert mask[: doc.size].all() and not mask[doc.size :].any()
            seen[doc.key] = True
    if rows == slice(None):
        assert set(seen) == {d.key for d in docs}


def test_heldout_budget_keeps_the_first_bytes(tmp_path):
    write_files(tmp_path / "src", random_texts(40))
    corpus = tc.build_corpus([tmp_path / "src"], tmp_path / "c", 0.4)
    docs = corpus.heldout_documents()
    cut = corpus.heldout_documents(max_bytes=docs[0].size + 7)
    assert [d.size for d in cut] == [docs[0].size, 7]
    assert cut[1].start == docs[1].start


# ---------------------------------------------------------------- bad input


def test_bad_sources(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no data sources given"):
        tc.resolve_sources([])
    with pytest.raises(ValueError, match=r"nothing\.txt: no such file or folder"):
        tc.resolve_sources([tmp_path / "nothing.txt"])
    with pytest.raises(ValueError, match=r"\*\.zzz: no files match"):
        tc.resolve_sources([str(tmp_path / "*.zzz")])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="empty_dir: no files match"):
        tc.resolve_sources([tmp_path / "empty_dir"])
    write_files(tmp_path / "bad", {"a.bin": b"\0\1", "b.txt": b""})
    with pytest.raises(
        ValueError, match=re.escape("the corpus is empty: 2 file(s) found, all skipped")
    ):
        tc.build_corpus([tmp_path / "bad"], tmp_path / "c1")
    write_files(tmp_path / "ok", {"a.txt": b"hello"})

    def unreadable(path, mode="r", *args, **kwargs):
        if str(path).endswith("a.txt"):
            raise PermissionError(13, "Permission denied")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(tc, "open", unreadable, raising=False)
    with pytest.raises(ValueError, match=r"cannot read .*a\.txt: Permission denied"):
        tc.build_corpus([tmp_path / "ok"], tmp_path / "c2")
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"heldout_fraction must lie in \(0, 1\)"):
        tc.build_corpus([tmp_path / "ok"], tmp_path / "c3", 1.0)


def test_corpus_shorter_than_one_sequence(tmp_path):
    write_files(tmp_path / "src", {"a.txt": b"x" * 300})
    corpus = tc.build_corpus([tmp_path / "src"], tmp_path / "c", 0.1)
    n = corpus.n_train
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"the training split holds {n:,} bytes, fewer than one sequence per "
            "row: global_batch_size 8 x (sequence_len 64 + 1) = 520"
        ),
    ):
        tc.train_batch(corpus, 0, batch_size=8, sequence_len=64, seed=0)


def test_incomplete_corpus_directory(tmp_path):
    write_files(tmp_path / "src", random_texts(5))
    corpus = tc.build_corpus([tmp_path / "src"], tmp_path / "c", 0.3)
    with open(corpus.directory / "corpus.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="holds 10 bytes, its index says"):
        tc.Corpus.open(corpus.directory)
    (corpus.directory / "index.json").unlink()
    with pytest.raises(ValueError, match="is not a built corpus"):
        tc.Corpus.open(corpus.directory)
