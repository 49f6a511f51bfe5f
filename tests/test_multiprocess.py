"""Two processes x four CPU devices over jax.distributed: the update is the global EMA.

`launch_local_cluster` starts both workers on 127.0.0.1 on a free port, kills
whatever still runs after its timeout or after a failure, and raises with both
processes' logs; pytest-timeout bounds the whole test on top of that.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import brute_ema

from tvq.distributed_demo import C_GAMMA, demo_problem, launch_local_cluster


@pytest.mark.timeout(180)
def test_two_processes_give_the_global_ema(tmp_path):
    result = launch_local_cluster(
        tmp_path, n_process=2, n_local_device=4, n_block_per_update=2, timeout=120
    )
    assert int(result["n_global_device"]) == 8
    p = demo_problem()
    want_sum, want_count = brute_ema(
        p["vecs"], p["shortcodes"], p["c_sum"], p["c_count"], C_GAMMA, p["loss_mask"]
    )
    want = {"c_sum": want_sum, "c_count": want_count}
    for form in ("shard_map", "jit"):
        for k in ("c_sum", "c_count"):
            new = p[k] - result[f"{form}_{k}"]  # SGD with learning rate 1
            assert result[f"{form}_{k}"].dtype == np.float64
            np.testing.assert_allclose(new, want[k], rtol=0.0, atol=1e-12)


def test_failed_worker_is_reported_with_its_log(tmp_path):
    """6 devices cannot split a batch of 16: the workers stop, and we hear why."""
    with pytest.raises(RuntimeError, match=r"(?s)exit code -?[1-9].*Error"):
        launch_local_cluster(tmp_path, n_process=2, n_local_device=3, timeout=60)
