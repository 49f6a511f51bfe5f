"""Training on 2 processes x 4 CPU devices gives the parameters of 1 process x 8.

`python -m tvq.lm train --processes 2 --cpu-devices 4` starts two processes
joined by jax.distributed on loopback (`tvq.cluster`); each reads its own
half of every batch and they save one checkpoint together. The reference is
the same command in one process with 8 CPU devices.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from tvq import checkpoint as ck

TINY = [
    "n_layer=1", "d_model=16", "d_k=8", "d_v=16", "n_code=8", "block_len=8",
    "mem_len=8", "sequence_len=32", "update_len=16", "global_batch_size=8",
    "n_warmup_step=2", "n_max_step=6",
]  # fmt: skip


@pytest.mark.timeout(480)
def test_two_processes_train_like_one(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        words = rng.choice(["alpha", "beta", "gamma", "delta", "\n"], 300)
        (text / f"{i}.txt").write_text(" ".join(words))
    sets = [x for s in TINY for x in ("--set", s)]

    def train(workdir, *devices):
        argv = [sys.executable, "-m", "tvq.lm", "train", "--data", str(text),
                "--workdir", str(workdir), "--no-progress", "--eval-every", "2",
                *sets, *devices]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert "done: step 6" in done.stdout
        return ck.load_params(workdir / "checkpoints", step=6)[1]

    two = train(tmp_path / "two", "--processes", "2", "--cpu-devices", "4")
    one = train(tmp_path / "one", "--cpu-devices", "8")
    pairs = list(zip(jax.tree.leaves(two), jax.tree.leaves(one), strict=True))
    err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in pairs)
    print(f"max |params 2x4 processes - 1x8| after 6 steps: {err:.2e}")
    assert err < 1e-5
    # Both runs logged the same losses, from the same batches.
    rows = [
        [
            json.loads(x)
            for x in (tmp_path / w / "metrics.jsonl").read_text().splitlines()
        ]
        for w in ("two", "one")
    ]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [2, 4, 6]
    for a, b in zip(*rows, strict=True):
        assert abs(a["train_bits_per_byte"] - b["train_bits_per_byte"]) < 1e-4
