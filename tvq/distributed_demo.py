"""Data-parallel steps on several processes, over JAX's distributed runtime.

`launch_local_cluster` starts `n_process` copies of this module on 127.0.0.1, each
with `n_local_device` CPU devices, and returns what process 0 computed. Each copy
joins the cluster with `jax.distributed.initialize`, builds a mesh over all
processes' devices, and runs one of two tasks on it, feeding in only its own
rows of each global batch:

  "codebook" (`worker`): `shard_map_codebook_grads` and `sharded_codebook_grads`
    on the batch of `demo_problem`;
  "train" (`train_worker`): `n_step` batches of `tvq.train.train` on a tiny
    Transformer-VQ (`train_demo`), saving the final parameters.

One process by hand (all of them must be started):
  python -m tvq.distributed_demo --port 12345 --process-id 0 --n-process 2 \
      --n-local-device 4 --out /tmp/result.npz [--task train --n-step 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tvq.config import TransformerConfig
from tvq.parallel import (
    make_data_mesh,
    shard_map_codebook_grads,
    sharded_codebook_grads,
)

DEMO_SIZES = dict(batch=16, n_head=2, length=12, n_code=6, d_k=3)
C_GAMMA = 0.9
TASKS = ("codebook", "train")
# The "train" task: a tiny Transformer-VQ, two update windows per batch.
TRAIN_DEMO = dict(
    n_vocab=16, d_model=16, d_k=8, d_v=16, n_head=2, n_code=8, n_layer=1,
    block_len=4, mem_len=4, sequence_len=16, update_len=8, global_batch_size=16,
    agg_cache=True, grad_thru_cache=True, pe_abs=False, pe_lam=10_000,
    c_beta=1e-2, c_gamma=0.9, e_tie=True, e_preln=True, e_scale=1.0,
    p_dropemb=0.0, p_dropsin=0.0, p_dropres=0.0, p_droplyr=0.0, is_train=True,
    grad_clip=1.0, optimizer="adamw", lr_max=1e-2, lr_schedule="cosine",
    wd_lam=1e-4, n_warmup_step=2, n_max_step=20,
)  # fmt: skip


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


def train_demo_batches(n_step: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """n_step global batches of random tokens for the "train" task, [B, L] each.

    The loss counts 3 of every 4 positions; the codebook sees every position.
    """
    b, length, n = (
        TRAIN_DEMO[k] for k in ("global_batch_size", "sequence_len", "n_vocab")
    )
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_step):
        inputs = rng.integers(0, n, size=(b, length), dtype=np.int32)
        batches.append(
            dict(
                inputs=inputs,
                targets=np.roll(inputs, -1, axis=1),
                loss_mask=(np.arange(length) % 4 != 0)[None]
                .repeat(b, 0)
                .astype(np.int32),
                codebook_mask=np.ones((b, length), np.int32),
            )
        )
    return batches


def train_demo(mesh, n_step: int, rows: slice = slice(None), seed: int = 0) -> dict:
    """Train the "train" task's model for n_step batches on `mesh`; return its params.

    `rows` are this process's rows of every global batch (all of them with one
    process). Returns {parameter path: NumPy array}, read from this process's
    replica.
    """
    from tvq.train import init_train_state, train

    config = TransformerConfig.create(**TRAIN_DEMO)
    state = init_train_state(config, jax.random.key(seed))
    local = [
        {k: v[rows] for k, v in batch.items()}
        for batch in train_demo_batches(n_step, seed)
    ]
    state, _ = train(
        config, state, local, rng=jax.random.key(seed), mesh=mesh, progress=False
    )
    return {
        jax.tree_util.keystr(path): np.asarray(x.addressable_data(0))
        for path, x in jax.tree_util.tree_leaves_with_path(state.params)
    }


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
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n_local_device)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_x64", True)
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=n_process,
        process_id=process_id,
        initialization_timeout=60,
    )
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


def train_worker(
    process_id: int,
    n_process: int,
    n_local_device: int,
    port: int,
    out: str,
    n_step: int = 3,
    seed: int = 0,
) -> None:
    """One process of the "train" task: join, train on its rows, process 0 saves.

    The same setup as `worker`; must also run in a fresh process.
    """
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n_local_device)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_x64", True)
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=n_process,
        process_id=process_id,
        initialization_timeout=60,
    )
    rows = TRAIN_DEMO["global_batch_size"] // n_process
    mine = slice(process_id * rows, (process_id + 1) * rows)
    results = train_demo(make_data_mesh(), n_step, mine, seed)
    if process_id == 0:
        results["n_global_device"] = np.array(jax.device_count())
        np.savez(out, **results)
    jax.distributed.shutdown()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local_cluster(
    workdir: str | os.PathLike,
    n_process: int = 2,
    n_local_device: int = 4,
    n_block_per_update: int = 2,
    timeout: float = 120.0,
    task: str = "codebook",
    n_step: int = 3,
) -> dict[str, np.ndarray]:
    """Run a task in n_process subprocesses on 127.0.0.1; return process 0's arrays.

    task "codebook" runs `worker` (n_block_per_update blocks per update), "train"
    runs `train_worker` (n_step batches; the result holds the parameters by
    path). Each process logs to workdir/process_<i>.log. Processes still running at the
    deadline, or when any process fails, are killed; failures raise RuntimeError
    with the log tails.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    workdir = Path(workdir)
    out = workdir / "result.npz"
    out.unlink(missing_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    procs, logs = [], []
    try:
        for i in range(n_process):
            log = open(workdir / f"process_{i}.log", "w")
            logs.append(log)
            flags = {
                "--port": port,
                "--process-id": i,
                "--n-process": n_process,
                "--n-local-device": n_local_device,
                "--n-block-per-update": n_block_per_update,
                "--task": task,
                "--n-step": n_step,
                "--out": out,
            }
            cmd = [sys.executable, "-m", "tvq.distributed_demo"]
            cmd += [str(x) for flag in flags.items() for x in flag]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            failed = any(p.poll() not in (None, 0) for p in procs)
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if any(codes) or not out.exists():
        tails = "\n".join(
            f"--- process {i} (exit code {c}) ---\n"
            + (workdir / f"process_{i}.log").read_text()[-3000:]
            for i, c in enumerate(codes)
        )
        raise RuntimeError(f"local cluster failed or timed out ({timeout} s):\n{tails}")
    with np.load(out) as f:
        return dict(f)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--n-process", type=int, required=True)
    parser.add_argument("--n-local-device", type=int, required=True)
    parser.add_argument("--n-block-per-update", type=int, default=2)
    parser.add_argument("--task", choices=TASKS, default="codebook")
    parser.add_argument("--n-step", type=int, default=3)
    parser.add_argument("--out", required=True)
    a = parser.parse_args(argv)
    args = (a.process_id, a.n_process, a.n_local_device, a.port, a.out)
    if a.task == "train":
        train_worker(*args, n_step=a.n_step)
    else:
        worker(*args, a.n_block_per_update)


if __name__ == "__main__":
    main()
