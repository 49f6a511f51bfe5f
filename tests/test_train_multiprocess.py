"""Training on 2 processes x 4 CPU devices gives the parameters of 1 process x 8.

`launch_local_cluster(task="train")` runs `tvq.distributed_demo.train_demo` in
two processes over jax.distributed on loopback, each feeding its own half of
every batch; this test runs the same function on this process's 8 devices.
"""

from __future__ import annotations

import numpy as np
import pytest

import tvq
from tvq.distributed_demo import TRAIN_DEMO, launch_local_cluster, train_demo

N_STEP = 3  # batches, two optimizer steps each


@pytest.mark.timeout(480)
def test_two_processes_train_like_one(tmp_path):
    cluster = launch_local_cluster(
        tmp_path,
        n_process=2,
        n_local_device=4,
        task="train",
        n_step=N_STEP,
        timeout=400,
    )
    assert int(cluster.pop("n_global_device")) == 8
    one = train_demo(tvq.make_data_mesh(8), N_STEP)
    assert cluster.keys() == one.keys()
    assert any("c_sum" in k for k in one)
    err = max(float(np.max(np.abs(cluster[k] - one[k]))) for k in one)
    print(f"max |params 2x4 processes - 1x8| after {2 * N_STEP} steps: {err:.2e}")
    assert err < 1e-5
    # Training moved the parameters: a start-state comparison would fail.
    start = train_demo(tvq.make_data_mesh(8), 0)
    assert max(float(np.max(np.abs(start[k] - one[k]))) for k in one) > 1e-3
    assert TRAIN_DEMO["sequence_len"] // TRAIN_DEMO["update_len"] == 2
