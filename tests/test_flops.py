"""FLOP formulas against the products the code really runs.

tests/flop_tally.py evaluates a function's jaxpr primitive by primitive,
loops to their real trip counts, and adds up every dot_general: an
independent count. XLA's cost analysis is a second one where no loop hides
work (it counts a loop body once).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flop_tally import matmul_flops
from test_layer_reference import random_params, random_tokens, small_config

import tvq
from tvq.attention import vq_attention, vq_attention_flops
from tvq.flops import train_step_flops


def loss_grad(config, tokens):
    """params -> gradient of tvq.loss_fn's loss for one call from position 0."""
    spec = tvq.VQSpec(jnp.ones([1]), jnp.ones([1]), jnp.ones(tokens.shape))
    state = tvq.Transformer.initial_state(config, tokens.shape[0], max_len=0)

    def loss(params):
        out = tvq.Transformer(config).apply(params, tokens, state, spec)
        return tvq.loss_fn(out, tokens, jnp.ones(tokens.shape), config)["loss"]

    return jax.grad(loss)


# (block_len T, mem_len M, n_code S, length P, other fields)
STEPS = {
    "vq": (4, 4, 5, 16, dict(pe_abs=True)),
    "vq, M=1.5T, two layers": (4, 6, 3, 20, dict(n_layer=2, e_tie=False)),
    "vq, no aggcache": (4, 4, 5, 16, dict(agg_cache=False)),
    "dense": (4, 4, None, 16, dict(attention="dense")),
    "dense, M=0": (4, 0, None, 12, dict(attention="dense", n_layer=2)),
    "dense_full": (4, 4, None, 16, dict(attention="dense_full")),
}


@pytest.mark.parametrize("name", list(STEPS))
def test_train_step_flops_match_a_tally(name):
    t, m, s, length, extra = STEPS[name]
    config = small_config(t, m, s, is_train=True, **extra)
    params = random_params(config, seed=1)
    tokens = random_tokens(config, 2, length, seed=2)
    got = matmul_flops(loss_grad(config, tokens), params)
    counts = train_step_flops(config, length, batch_size=2)
    assert got == counts["total"], (got, counts)
    assert (
        counts["total"]
        == counts["attention"] + counts["projections"] + counts["logits"]
    )


@pytest.mark.parametrize(
    "length, n_code, block_len, d_k, d_v, mem_len",
    [
        (32, 6, 8, 4, 3, 8),
        (32, 6, 4, 4, 3, 0),
        (24, 5, 3, 2, 3, 4),
        (12, 4, 1, 2, 2, 2),
    ],
)
def test_vq_attention_flops_match_a_tally(length, n_code, block_len, d_k, d_v, mem_len):
    rng = np.random.default_rng(3)
    q, k = (rng.standard_normal([2, 3, length, d_k]) for _ in range(2))
    v = rng.standard_normal([2, 3, length, d_v])
    codebook = rng.standard_normal([3, n_code, d_k])

    def attend(q, k, v, c):
        return vq_attention(q, k, v, c, block_len=block_len, mem_len=mem_len)

    got = matmul_flops(attend, q, k, v, codebook)
    assert got == 2 * 3 * vq_attention_flops(
        length, n_code, block_len, d_k, d_v, mem_len
    )
