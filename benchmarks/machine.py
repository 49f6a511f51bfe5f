"""What the benchmarks ran on: the CPU, its matrix flags, its matmul rates.

A time means little without the machine's own speed beside it. `cpu_summary`
names the CPU and the flags that decide how fast bfloat16 products can run
(avx512_bf16: bf16 dot products in AVX-512; amx_bf16: the AMX tile unit).
`matmul_rates` times one square float32 matmul and the same in bfloat16 with
float32 accumulation, the two kinds of product tvq's models run.
"""

from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp

FLAGS = ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_summary() -> str:
    """'<model name>, N CPUs, flags: ...' from /proc/cpuinfo where there is one."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    have = [flag for flag in FLAGS if flag in flags] or ["none of " + " ".join(FLAGS)]
    return f"{name}, {os.cpu_count()} CPUs, flags: {' '.join(have)}"


def matmul(a, b):
    """a @ b with float32 accumulation (and result), whatever the input dtype."""
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def matmul_rates(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of an [n, n] x [n, n] matmul: float32, and bf16 inputs with float32
    accumulation. Best of `repeats` runs after a warm-up run."""
    fn = jax.jit(matmul)
    key_a, key_b = jax.random.split(jax.random.key(0))
    rates = {}
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        a = jax.random.normal(key_a, (n, n), dtype)
        b = jax.random.normal(key_b, (n, n), dtype)
        jax.block_until_ready(fn(a, b))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(a, b))
            best = min(best, time.perf_counter() - start)
        rates[name] = 2 * n**3 / best / 1e9
    return rates
