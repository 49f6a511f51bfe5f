"""Where the time of a Transformer-VQ training step goes, component by component.

Times, jitted and after a warm-up run, forward + backward of:

- step: the training loss of the benchmark model of `model.py` (one layer of
  two GAUs, d_model 256, d_k 128, d_v 512, S = T = M = 512, batch 1), its
  gradient with respect to the parameters;
- attention: `tvq.attention.vq_attention` alone on q, k, v of one GAU's shapes
  ([1, 1, L, 128] and [1, 1, L, 512]), gradient with respect to q, k and v;
- quantizer: the straight-through quantization of one GAU's keys
  (`get_shortcodes`, `get_codewords`), gradient with respect to the keys;

and reports `rest` = step - 2 x (attention + quantizer): the projections,
norms, gating, relative position terms, output head, loss and the glue
between them. Components run in isolation may overlap or fuse differently
inside the step, so `rest` is an estimate.

It imports whichever `tvq` comes first on the path, so the same script
profiles an older commit: `PYTHONPATH=/path/to/old/checkout python
benchmarks/profile.py` (the script prints which `tvq` it timed).

Usage: python benchmarks/profile.py [--length 8192] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import one_device  # noqa: F401  (drops forced devices before JAX starts)

# isort: split
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from machine import cpu_summary  # noqa: E402

import tvq  # noqa: E402
from tvq import vq  # noqa: E402
from tvq.attention import vq_attention  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args(argv)


def model_config(length: int):
    return tvq.TransformerConfig.create(
        n_vocab=256,
        d_model=256,
        d_k=128,
        d_v=512,
        n_head=1,
        n_code=512,
        n_layer=1,
        block_len=512,
        mem_len=512,
        sequence_len=length,
        update_len=length,
        global_batch_size=1,
        pe_abs=False,
        pe_lam=10_000,
        agg_cache=True,
        grad_thru_cache=True,
        e_tie=True,
        e_preln=True,
        e_scale=1.0,
        c_beta=1e-4,
        c_gamma=0.99,
        p_dropemb=0.0,
        p_dropsin=0.0,
        p_dropres=0.0,
        p_droplyr=0.0,
        is_train=True,
    )


def components(length: int) -> dict:
    """name -> a function of nothing that runs one jitted forward + backward."""
    config = model_config(length)
    keys = jax.random.split(jax.random.key(0), 6)
    tokens = jax.random.randint(keys[0], (1, length + 1), 0, 256)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = jnp.ones([1, length], jnp.float32)
    spec = tvq.VQSpec(jnp.ones([1]), jnp.full([1], length // config.block_len), mask)
    state = tvq.Transformer.initial_state(config, 1, max_len=0)
    model = tvq.Transformer(config)
    params = model.init(keys[1], inputs, state, spec)

    def loss(p):
        out = model.apply(p, inputs, state, spec)
        return tvq.loss_fn(out, targets, mask, config)["loss"]

    q = jax.random.normal(keys[2], (1, 1, length, 128)) / 128**0.5
    k = jax.random.normal(keys[3], (1, 1, length, 128))
    v = jax.random.normal(keys[4], (1, 1, length, 512))
    codebook = jax.random.normal(keys[5], (1, 512, 128))

    def attention(q, k, v):
        out = vq_attention(q, k, v, codebook, block_len=512, mem_len=512)
        return jnp.sum(out * v)

    def quantizer(k):
        z, _ = vq.get_shortcodes(k, codebook)
        k_hat = vq.st(vq.get_codewords(z, codebook)) + k - vq.st(k)
        return jnp.sum(k_hat * k)

    step = jax.jit(jax.grad(loss))
    attn = jax.jit(jax.grad(attention, argnums=(0, 1, 2)))
    quant = jax.jit(jax.grad(quantizer))
    return {
        "step": lambda: step(params),
        "attention": lambda: attn(q, k, v),
        "quantizer": lambda: quant(k),
    }


def main(argv=None):
    args = parse_args(argv)
    print(f"tvq from {tvq.__file__}; jax {jax.__version__}; {cpu_summary()}")
    fns = components(args.length)
    for fn in fns.values():
        jax.block_until_ready(fn())
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(args.rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], time.perf_counter() - start)
    best["rest"] = best["step"] - 2 * (best["attention"] + best["quantizer"])
    print(f"L = {args.length}, forward + backward, best of {args.rounds}:")
    for name, seconds in best.items():
        times = 2 if name in ("attention", "quantizer") else 1
        share = times * seconds / best["step"]
        note = " (x2: two GAUs)" if times == 2 else ""
        print(f"  {name:10s} {seconds:7.3f} s  {share:6.1%} of the step{note}")


if __name__ == "__main__":
    main()
