"""python -m tvq.lm end to end on a tiny corpus: train, Ctrl-C, resume, eval, sample.

The references: an uninterrupted run for the interrupted one; held-out bits
per byte from one forward pass per document (or per sequence_len piece for
dense attention), without the batching of `tvq.lm`; generation called
directly for the sample.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import tvq
from tvq import checkpoint as ck
from tvq import corpus as tc
from tvq import lm
from tvq.sample import generate

TINY = [
    "n_layer=1", "d_model=16", "d_k=8", "d_v=16", "n_code=8", "block_len=8",
    "mem_len=8", "sequence_len=32", "update_len=16", "global_batch_size=8",
    "n_warmup_step=2",
]  # fmt: skip
WORDS = "the of and to in is was for on that with as by at from it an are".split()


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(0)
    for i in range(30):
        words = rng.choice(WORDS, rng.integers(40, 200))
        (root / f"doc{i:02d}.txt").write_text(" ".join(words) + "\n")
    return root


def train_argv(text_dir, workdir, n_max_step, *extra):
    sets = [x for s in [*TINY, f"n_max_step={n_max_step}"] for x in ("--set", s)]
    return [
        sys.executable, "-m", "tvq.lm", "train", "--data", str(text_dir),
        "--workdir", str(workdir), "--no-progress", "--eval-every", "40", *sets,
        *extra,
    ]  # fmt: skip


def final_params(workdir, step):
    return ck.load_params(workdir / "checkpoints", step=step)[1]


def max_diff(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


def metric_rows(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    for row in rows:
        row.pop("tokens_per_second")  # a timing: differs from run to run
    return rows


@pytest.mark.timeout(600)
def test_interrupted_run_resumes_to_the_same_parameters(text_dir, tmp_path):
    n_max_step = 300  # 150 batches: long enough to interrupt halfway
    straight = tmp_path / "straight"
    done = subprocess.run(
        train_argv(text_dir, straight, n_max_step), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "new run:" in done.stdout and "done: step 300" in done.stdout

    broken = tmp_path / "broken"
    proc = subprocess.Popen(
        train_argv(text_dir, broken, n_max_step), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    metrics = broken / "metrics.jsonl"
    while not (metrics.exists() and metrics.stat().st_size):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == lm.INTERRUPTED, err[-3000:]
    saved = int(re.search(r"saved step (\d+); run the same command again", out)[1])
    assert 0 < saved < n_max_step

    again = subprocess.run(
        train_argv(text_dir, broken, n_max_step), capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from step {saved}\n" in again.stdout
    err = max_diff(final_params(straight, 300), final_params(broken, 300))
    print(f"interrupted at step {saved}: max |params - uninterrupted| = {err:.1e}")
    assert err <= 1e-6
    assert metric_rows(broken) == metric_rows(straight)
    # Training moved the parameters from the checkpoint it resumed from.
    with ck.RunCheckpoints(straight / "checkpoints", read_only=True) as run:
        first = run.steps()[0]
    assert max_diff(final_params(straight, first), final_params(straight, 300)) > 1e-3

    check_eval_command(text_dir, straight)
    check_sample(straight)


def brute_bits(config, params, corpus, piece_len=None) -> float:
    """Bits per byte, one forward pass per held-out document (or piece of it)."""
    config = config.replace(is_train=False)
    model = tvq.Transformer(config)
    t = config.block_len
    total, count = 0.0, 0
    for doc in corpus.heldout_documents():
        content = np.asarray(corpus.data[doc.start : doc.start + doc.size], np.int64)
        inputs = np.r_[0, content[:-1]]
        step = piece_len or len(content)
        for lo in range(0, len(content), step):
            x, y = inputs[lo : lo + step], content[lo : lo + step]
            padded = np.zeros(math.ceil(len(x) / t) * t, np.int32)
            padded[: len(x)] = x
            state = tvq.Transformer.initial_state(config, 1, len(padded))
            out = model.apply({"params": params}, padded[None], state)
            logprobs = np.asarray(out["logprobs"][0, : len(x)], np.float64)
            total -= logprobs[np.arange(len(y)), y].sum()
            count += len(y)
    return total / count / math.log(2)


def check_eval_command(text_dir, workdir):
    result = lm.evaluate(workdir, [str(text_dir)])
    config, params = ck.load_params(workdir / "checkpoints")
    corpus = tc.load_corpus([text_dir], workdir / "corpus")
    want = brute_bits(config, params, corpus)
    assert result["n_bytes"] == sum(d.size for d in corpus.heldout_documents())
    np.testing.assert_allclose(result["bits_per_byte"], want, rtol=1e-5)
    assert want < 4.0  # it learned: uniform bytes would be 8 bits


def check_sample(workdir):
    out = lm.sample_text(workdir, "the ", max_new_bytes=60, seed=3, temperature=0.8)
    config, params = ck.load_params(workdir / "checkpoints")
    prompt = np.frombuffer(b"\0the ", np.uint8).astype(np.int32)[None]
    tokens = generate(
        config.replace(is_train=False), params, prompt, max_new_tokens=60,
        rng=jax.random.key(3), p_nucleus=config.p_nucleus, temperature=0.8,
    )  # fmt: skip
    new = bytes(np.asarray(tokens[0, 5:], np.uint8))
    want = new.split(b"\0")[0]  # up to the separator, the end of a document
    assert out == want and len(out) <= 60


def test_commands_in_process(text_dir, tmp_path, capsys):
    """train (dense), eval and sample through main(), and their output."""
    workdir = tmp_path / "dense"
    sets = [x for s in [*TINY, "n_max_step=8", "attention=dense"] for x in ("--set", s)]
    argv = ["train", "--data", str(text_dir), "--workdir", str(workdir),
            "--no-progress", "--eval-every", "2", *sets]  # fmt: skip
    assert lm.main(argv) == 0
    out = capsys.readouterr().out
    assert "new run:" in out and "done: step 8" in out
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert all("heldout_bits_per_byte" in r for r in rows[1::2])
    assert lm.main(["eval", "--workdir", str(workdir), "--data", str(text_dir)]) == 0
    out = capsys.readouterr().out
    assert "key/value buffer reset every sequence_len bytes" in out
    printed = float(re.search(r"^bits per byte: (\d+\.\d{4})$", out, re.M)[1])
    config, params = ck.load_params(workdir / "checkpoints")
    corpus = tc.load_corpus([text_dir], workdir / "corpus")
    want = brute_bits(config, params, corpus, piece_len=config.sequence_len)
    assert abs(printed - want) < 1e-4 + 1e-5 * want
    argv = ["sample", "--workdir", str(workdir), "--prompt", "the",
            "--max-new-bytes", "20", "--no-stop", "--top-k", "5"]  # fmt: skip
    assert lm.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("the") and len(printed.encode()) <= 3 + 20 * 3 + 1


def test_bad_command_lines(text_dir, tmp_path, capsys):
    def error_of(argv) -> str:
        assert lm.main(argv) == 2
        return capsys.readouterr().err

    base = ["train", "--data", str(text_dir), "--workdir", str(tmp_path / "w")]
    assert "--set d_modle: unknown config field; known: agg_cache" in error_of(
        [*base, "--set", "d_modle=3"]
    )
    assert "--set d_model=wide: not a valid int (or none)" in error_of(
        [*base, "--set", "d_model=wide"]
    )
    assert "nowhere: no such file or folder" in error_of(
        ["train", "--data", str(tmp_path / "nowhere"), "--workdir", str(tmp_path / "x")]
    )
    sets = [x for s in [*TINY, "n_max_step=2"] for x in ("--set", s)]
    assert lm.main([*base, "--no-progress", *sets]) == 0
    capsys.readouterr()
    message = error_of([*base, "--no-progress", *sets, "--set", "lr_max=0.5"])
    assert "lr_max: saved 0.003, given 0.5" in message
    assert "or train in a new --workdir" in message
    message = error_of([*base, "--no-progress", *sets, "--seed", "1"])
    assert "seed: saved 0, now 1" in message


def test_presets_and_overrides():
    for name in lm.PRESETS:
        config = lm.make_config(name)
        assert config.n_vocab == 256 and config.is_train
    enwik8 = lm.make_config("enwik8", dtype="bfloat16")
    assert enwik8.dtype == np.dtype("bfloat16") and enwik8.param_dtype == np.float32
    assert (enwik8.sequence_len, enwik8.block_len, enwik8.n_code) == (8192, 512, 512)
    pairs = ["n_max_step=400", "e_tie=true", "lr_max=1e-3", "grad_clip=none",
             "dtype=bfloat16", "attention=dense"]  # fmt: skip
    got = lm.parse_overrides(pairs)
    assert got == dict(n_max_step=400, e_tie=True, lr_max=1e-3, grad_clip=None,
                       dtype="bfloat16", attention="dense")  # fmt: skip
    config = lm.make_config("cpu", got)
    assert config.n_max_step == 400 and config.grad_clip is None
    with pytest.raises(ValueError, match="--set needs key=value, got 'd_model'"):
        lm.parse_overrides(["d_model"])
    with pytest.raises(
        ValueError, match=r"unknown preset 'gpu'; presets: \['cpu', 'enwik8'\]"
    ):
        lm.make_config("gpu")
    with pytest.raises(ValueError, match="byte models need n_vocab >= 256, got 100"):
        lm.make_config("cpu", dict(n_vocab=100))


def test_several_processes_argv():
    argv = ["train", "--data", "x", "--processes", "2", "--workdir", "w"]
    child = lm._child_argv(argv, 2, 1, 5555)
    assert child[1:] == ["-m", "tvq.lm", "train", "--data", "x", "--workdir", "w",
                         "--coordinator", "127.0.0.1:5555", "--num-processes", "2",
                         "--process-id", "1"]  # fmt: skip
    assert os.path.basename(child[0]).startswith("python")
