"""Several JAX processes as one runtime: joining a cluster, and a local launcher.

`join_cluster` makes this process one of n_process, with
`jax.distributed.initialize`; it must run before JAX's first computation.
After it, `jax.devices()` lists every process's devices, and a mesh over
them (`tvq.make_data_mesh()`) spans the cluster.

`run_local_processes` starts n_process commands on this machine, one per
process id, each told the same free loopback port for the coordinator, and
waits for them: what `python -m tvq.lm train --processes N` and
`tvq.distributed_demo.launch_local_cluster` use. On several machines, start
the same command on each with the coordinator's address instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_cpu_devices(n_device: int) -> None:
    """Make JAX's CPU backend show n_device devices (before its first computation).

    For trying data parallelism without accelerators; other backends are
    unaffected, and nothing here selects the CPU backend.
    """
    if not isinstance(n_device, int) or n_device < 1:
        raise ValueError(
            f"the number of CPU devices must be an int >= 1, got {n_device!r}"
        )
    jax.config.update("jax_num_cpu_devices", n_device)


def join_cluster(
    coordinator_address: str,
    n_process: int,
    process_id: int,
    timeout: int = 120,
) -> None:
    """Join a cluster of n_process processes as process_id (0 is the coordinator).

    CPU collectives go through gloo, so that processes without accelerators
    can all-reduce too.
    """
    if not 0 <= process_id < n_process:
        raise ValueError(
            f"process_id must lie in [0, n_process={n_process}), got {process_id}"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=n_process,
        process_id=process_id,
        initialization_timeout=timeout,
    )


def run_local_processes(
    command: Callable[[int, int], Sequence[str]],
    n_process: int,
    log_dir: str | os.PathLike,
    *,
    timeout: float | None = None,
    env: dict | None = None,
    echo_first: bool = False,
    accept: Sequence[int] = (0,),
) -> list[int]:
    """Run command(process_id, port) for every process id; wait for all of them.

    Args:
      command: the argv of process i, given i and the coordinator's port on
        127.0.0.1 (the same for all).
      n_process: how many processes.
      log_dir: process i writes its output to log_dir/process_<i>.log (with
        echo_first, process 0 writes to this process's stdout and stderr).
      timeout: seconds before every process still running is killed.
      env: their environment (default: this process's).
      echo_first: see log_dir.
      accept: exit codes that are not failures.

    Returns the exit codes. When one process fails (an exit code not in
    accept), or at the timeout, the others are killed and a RuntimeError
    reports every exit code with the end of each log. While they run, Ctrl-C
    reaches them (they share the terminal) and this process waits for them.
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    previous = signal.getsignal(signal.SIGINT)
    try:
        for i in range(n_process):
            argv = [str(x) for x in command(i, port)]
            if echo_first and i == 0:
                out = None
            else:
                out = open(log_dir / f"process_{i}.log", "w")
                logs.append(out)
            procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=out))
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the processes handle it
        deadline = None if timeout is None else time.monotonic() + timeout
        ok = (None, *accept)
        while any(p.poll() is None for p in procs):
            failed = any(p.poll() not in ok for p in procs)
            late = deadline is not None and time.monotonic() > deadline
            if failed or late:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
        signal.signal(signal.SIGINT, previous)
    codes = [p.returncode for p in procs]
    if any(c not in accept for c in codes):
        tails = "\n".join(
            f"--- process {i} (exit code {c}) ---\n"
            + _tail(log_dir / f"process_{i}.log", echo_first and i == 0)
            for i, c in enumerate(codes)
        )
        raise RuntimeError(
            f"local cluster of {n_process} processes failed or timed out "
            f"(timeout {timeout} s):\n{tails}"
        )
    return codes


def _tail(path: Path, echoed: bool) -> str:
    if echoed:
        return "(its output went to this process's terminal)\n"
    return path.read_text(errors="replace")[-3000:]
