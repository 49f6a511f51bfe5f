"""Forward + backward of tvq against the reference implementation, same weights.

The reference is the paper's code (repository transformer-vq/transformer_vq,
branch main), taken from a checkout of your own: nothing of it ships with tvq.
Pass the folder that holds its package, e.g. `--reference-src
~/transformer_vq/src`. On jax 0.10 its two `jnp.clip(..., a_min=...)` calls
(nn/attn.py, nn/vq.py) need `min=` instead, and it imports `chex`: install
that into a scratch folder (`pip install --target /tmp/refdeps chex toolz`)
and put the folder on PYTHONPATH.

The model is that of benchmarks/model.py (d_model 256, d_k 128, d_v 512, one
head, one layer of two GAUs, S = T = M = 512, batch 1), in float32 (and, with
--bf16, also tvq's dtype="bfloat16"). tvq's random parameters are copied into
the reference's parameter tree, both models' log-probabilities are compared
(they must agree to 1e-5, relative), and then the gradient of each one's training loss
(l_lm + c_beta l_commit + l_codebook) is timed: jitted, after a warm-up run,
variants interleaved, best of --rounds rounds of --repeats runs each, in one
process.

Usage: python benchmarks/reference.py --reference-src DIR [--lengths 8192]
                                      [--rounds 3] [--repeats 1] [--bf16]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import one_device  # noqa: F401  (drops forced devices before JAX starts)

# isort: split
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from machine import cpu_summary  # noqa: E402  (benchmarks/machine.py)
from model import make_config  # noqa: E402  (benchmarks/model.py)

import tvq  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--reference-src",
        type=Path,
        required=True,
        help="folder holding the reference's transformer_vq package",
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[8192])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per round")
    p.add_argument("--bf16", action="store_true", help="also tvq in bfloat16")
    return p.parse_args(argv)


def import_reference(src: Path):
    """The reference's Transformer, config class, VQSpec and loss_fn."""
    if not (src / "transformer_vq" / "nn" / "attn.py").is_file():
        raise ValueError(
            f"--reference-src must hold transformer_vq/nn/attn.py, got {src}"
        )
    sys.path.insert(0, str(src.resolve()))
    model = importlib.import_module("transformer_vq.nn.model")
    types = importlib.import_module("transformer_vq.nn.types")
    vq = importlib.import_module("transformer_vq.nn.vq")
    loss = importlib.import_module("transformer_vq.ops.loss")
    return model.Transformer, types.TransformerConfig, vq.VQSpec, loss.loss_fn


def reference_params(params: dict) -> dict:
    """tvq's {"params": ...} tree, renamed to the reference's params."""
    p = params["params"]
    out = dict(
        token_embedder=dict(embs=p["embs"], bias_out=p["bias_out"]),
        out_ln=p["out_ln"],
    )
    for name, layer in p.items():
        if name.startswith("layers_"):
            index = name.removeprefix("layers_")
            out[f"transformer_layers_{index}"] = {
                f"scanned_{gau}": layer[gau] for gau in ("attn1", "attn2")
            }
    return out


def reference_config(rconfig_cls, config):
    """The reference's config with the benchmark model's fields."""
    fields = {name: getattr(config, name) for name in rconfig_cls.__dataclass_fields__}
    fields.update(global_batch_size=1, d_ff=0, p_nucleus=1.0, no_emb=False)
    return rconfig_cls.create(**fields)


def tvq_loss(config, inputs, targets, mask, spec):
    """params -> (loss, logprobs) of tvq's model."""
    model = tvq.Transformer(config)
    state = tvq.Transformer.initial_state(config, inputs.shape[0], max_len=0)

    def loss(params):
        out = model.apply(params, inputs, state, spec)
        return tvq.loss_fn(out, targets, mask, config)["loss"], out["logprobs"]

    return loss


def ref_loss(ref, config, inputs, targets, mask):
    """params -> (loss, logprobs) of the reference's model."""
    rmodel, rconfig_cls, rspec_cls, rloss = ref
    rconfig = reference_config(rconfig_cls, config)
    state = rmodel.initial_state(rconfig, inputs.shape[0])
    n_block = inputs.shape[1] // config.block_len
    spec = rspec_cls(jnp.ones([1]), jnp.full([1], n_block), mask)
    batch = dict(
        inputs=inputs, targets=targets, loss_mask=mask, doc_ids=jnp.zeros_like(inputs)
    )

    def loss(params):
        value, out = rloss(params, rconfig, batch, state, spec, None)
        return value, out["logprobs"]

    return loss


def timed_grad(loss):
    """The jitted gradient of loss's first output: what is timed."""
    return jax.jit(jax.grad(lambda params: loss(params)[0]))


def bind(fn, params):
    """fn(params), as a function of nothing."""
    return lambda: fn(params)


def best_times(fns: dict, rounds: int, repeats: int) -> tuple[dict, dict]:
    """Best wall time and best process CPU time of each fn(), interleaved
    round by round. CPU time (all threads) is steadier than wall time on a
    machine shared with other work."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    wall, cpu = dict.fromkeys(fns, float("inf")), dict.fromkeys(fns, float("inf"))
    for r in range(rounds):
        for name, fn in fns.items():
            for _ in range(repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                jax.block_until_ready(fn())
                wall[name] = min(wall[name], time.perf_counter() - start)
                cpu[name] = min(cpu[name], time.process_time() - start_cpu)
        print(
            f"round {r + 1}: "
            + ", ".join(f"{n} {wall[n]:.3f} s ({cpu[n]:.3f} CPU s)" for n in fns),
            flush=True,
        )
    return wall, cpu


def main(argv=None):
    args = parse_args(argv)
    ref = import_reference(args.reference_src)
    print(f"jax {jax.__version__}; {cpu_summary()}")
    for length in args.lengths:
        config = make_config("vq", length)
        tokens = jax.random.randint(jax.random.key(0), (1, length + 1), 0, 256)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        mask = jnp.ones([1, length], jnp.float32)
        n_block = length // config.block_len
        spec = tvq.VQSpec(jnp.ones([1]), jnp.full([1], n_block), mask)
        state = tvq.Transformer.initial_state(config, 1, max_len=0)
        params = tvq.Transformer(config).init(jax.random.key(1), inputs, state, spec)
        rparams = reference_params(params)
        losses = {"reference": (ref_loss(ref, config, inputs, targets, mask), rparams)}
        losses["tvq"] = (tvq_loss(config, inputs, targets, mask, spec), params)
        if args.bf16:
            bf16 = config.replace(dtype=jnp.dtype("bfloat16"))
            losses["tvq bf16"] = (tvq_loss(bf16, inputs, targets, mask, spec), params)
        _, want = jax.jit(losses["reference"][0])(rparams)
        for name, (loss, p) in losses.items():
            _, got = jax.jit(loss)(p)
            err = float(jnp.max(jnp.abs(got - want)))
            print(f"L={length} {name}: max |logprobs - reference's| = {err:.2e}")
            if name == "tvq":
                np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
        fns = {name: bind(timed_grad(loss), p) for name, (loss, p) in losses.items()}
        wall, cpu = best_times(fns, args.rounds, args.repeats)
        for name in fns:
            print(
                f"L={length} {name:10s} {wall[name]:8.3f} s "
                f"{wall['reference'] / wall[name]:5.2f}x the reference "
                f"(CPU time {cpu[name]:.3f} s, {cpu['reference'] / cpu[name]:.2f}x)"
            )


if __name__ == "__main__":
    main()
