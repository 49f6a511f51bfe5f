"""The codebook step on several processes, over JAX's distributed runtime.

`launch_local_cluster` starts `n_process` copies of this module on 127.0.0.1
(with `tvq.cluster.run_local_processes`), each with `n_local_device` CPU
devices, and returns what process 0 computed. Each copy joins the cluster
(`tvq.cluster.join_cluster`), builds a mesh over all processes' devices, and
runs `shard_map_codebook_grads` and `sharded_codebook_grads` on it (`worker`),
feeding in only its own rows of the batch of `demo_problem`.

One process by hand (all of them must be started):
  python -m tvq.distributed_demo --port 12345 --process-id 0 --n-process 2 \
      --n-local-device 4 --out /tmp/result.npz

Training on several processes is `python -m tvq.lm train --processes N`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tvq.cluster import join_cluster, run_local_processes, set_cpu_devices
from tvq.parallel import (
    make_data_mesh,
    shard_map_codebook_grads,
    sharded_codebook_grads,
)

DEMO_SIZES = dict(batch=16, n_head=2, length=12, n_code=6, d_k=3)
C_GAMMA = 0.9


def demo_problem(seed: int = 0) -> dict[str, np.ndarray]:
    """The global batch every process draws the same way, in float64.

    Returns c_sum [H, S, K], c_count [H, S], vecs [B, H, L, K], shortcodes
    [B, H, L] (int32) and loss_mask [B, L] with a few padded positions.
    """
    b, h, length, s, k = (
        DEMO_SIZES[n] for n in ("batch", "n_head", "length", "n_code", "d_k")
    )
    rng = np.random.default_rng(seed)
    return dict(
        c_sum=rng.normal(size=(h, s, k)),
        c_count=rng.uniform(1.0, 3.0, size=(h, s)),
        vecs=rng.normal(size=(b, h, length, k)),
        shortcodes=rng.integers(0, s, size=(b, h, length), dtype=np.int32),
        loss_mask=(rng.uniform(size=(b, length)) > 0.25).astype(np.float64),
    )


def worker(
    process_id: int,
    n_process: int,
    n_local_device: int,
    port: int,
    out: str,
    n_block_per_update: int = 2,
    seed: int = 0,
) -> None:
    """One process: join the cluster, run both sharded forms, process 0 saves.

    Must run in a fresh process: the device settings below only take effect
    before JAX's first computation.
    """
    jax.config.update("jax_platforms", "cpu")  # a demo of CPU devices
    set_cpu_devices(n_local_device)
    jax.config.update("jax_enable_x64", True)
    join_cluster(f"127.0.0.1:{port}", n_process, process_id, timeout=60)
    mesh = make_data_mesh()  # every device of every process
    problem = demo_problem(seed)
    rows = problem["vecs"].shape[0] // n_process
    mine = slice(process_id * rows, (process_id + 1) * rows)

    def global_array(x, split):
        """Global array from this process's part: its rows (split) or a replica."""
        sharding = NamedSharding(mesh, P("data") if split else P())
        local = x[mine] if split else x
        return jax.make_array_from_process_local_data(sharding, local, x.shape)

    params = {k: global_array(problem[k], False) for k in ("c_sum", "c_count")}
    batch = [
        global_array(problem[k], True) for k in ("vecs", "shortcodes", "loss_mask")
    ]
    results = {}
    for name, make in (
        ("shard_map", shard_map_codebook_grads),
        ("jit", sharded_codebook_grads),
    ):
        step = make(mesh, C_GAMMA, n_block_per_update=n_block_per_update)
        grads = step(params, *batch)
        for k, g in grads.items():
            # Replicated output: every process holds the whole array locally.
            results[f"{name}_{k}"] = np.asarray(g.addressable_data(0))
    if process_id == 0:
        results["n_global_device"] = np.array(jax.device_count())
        np.savez(out, **results)
    jax.distributed.shutdown()


def launch_local_cluster(
    workdir: str | os.PathLike,
    n_process: int = 2,
    n_local_device: int = 4,
    n_block_per_update: int = 2,
    timeout: float = 120.0,
) -> dict[str, np.ndarray]:
    """Run `worker` in n_process subprocesses on 127.0.0.1; return process 0's arrays.

    Each process logs to workdir/process_<i>.log. Processes still running at
    the deadline, or when any process fails, are killed; failures raise
    RuntimeError with the log tails.
    """
    workdir = Path(workdir)
    out = workdir / "result.npz"
    out.unlink(missing_ok=True)

    def command(process_id: int, port: int) -> list:
        flags = {
            "--port": port,
            "--process-id": process_id,
            "--n-process": n_process,
            "--n-local-device": n_local_device,
            "--n-block-per-update": n_block_per_update,
            "--out": out,
        }
        argv = [sys.executable, "-m", "tvq.distributed_demo"]
        return argv + [x for flag in flags.items() for x in flag]

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    run_local_processes(command, n_process, workdir, timeout=timeout, env=env)
    if not out.exists():
        raise RuntimeError(f"process 0 exited without writing {out}")
    with np.load(out) as f:
        return dict(f)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--n-process", type=int, required=True)
    parser.add_argument("--n-local-device", type=int, required=True)
    parser.add_argument("--n-block-per-update", type=int, default=2)
    parser.add_argument("--out", required=True)
    a = parser.parse_args(argv)
    worker(
        a.process_id, a.n_process, a.n_local_device, a.port, a.out, a.n_block_per_update
    )


if __name__ == "__main__":
    main()
