"""Matmul FLOPs of one training step of tvq.Transformer, forward and backward.

What `benchmarks/model.py` divides its times by. Counting 2 M N K per
[M, K] x [K, N] product, and only products (normalizations, softmax, the
cache's scatter-adds and the optimizer are elementwise work), the gradient of
the training loss runs, per GAU of a call of P positions (N = B P rows, H
heads, widths D, K, V, window M, block T):

- projections: x W_q, x W_kvg, (r W_r for the M + 1 distances), out W_o;
  backward, each weight's gradient and (but for W_r, whose input is a
  constant table) its input's;
- attention (`attention_flops`): its forward products, and backward two
  products per forward product (both operands' cotangents), but one for the
  products whose other operand is a constant: q against the codewords, the
  codebook being a stop-gradient. The nearest-code distances and, in the
  dense form, the far keys' recomputed scores are counted where they run;

and once per model the logits, x E^T (tied) or x W_out, forward and both
gradients.

`tests/test_flops.py` checks every count against a tally of the products the
jitted gradient runs (`tests/flop_tally.py`).
"""

from __future__ import annotations

from tvq.config import TransformerConfig
from tvq.dense import CHUNK_LEN


def attention_flops(config: TransformerConfig, length: int) -> dict[str, int]:
    """Forward and backward matmul FLOPs of one GAU's attention for one batch
    element over a call of `length` positions from position 0 with no state
    carried (the training call of `benchmarks/model.py`), all heads.

    Returns dict(forward=..., backward=...).
    """
    h, k, v = config.n_head, config.d_k, config.d_v
    t, m, n = config.block_len, config.mem_len, length
    rel = 2 * n * (m + 1) * k  # (q + v).r_d: by distance, every position
    if config.attention == "vq":
        s, w = config.n_code, m + t
        window = 2 * n * w * (k + v)  # scores and weighted values
        codes = 2 * n * s * (k + v) if config.agg_cache else 0
        nearest = 2 * n * s * k  # distances to the codewords, no gradient
        forward = nearest + window + codes + rel
        # Scores: dq and dk; values: dp and dv; codes: dq only (the codebook
        # is a stop-gradient), dp and d(means); relative terms: dq_pos, dr.
        backward = 2 * window + (2 * n * s * (k + 2 * v) if config.agg_cache else 0)
        backward += 2 * rel
    elif config.attention == "dense":
        w = m + t
        window = 2 * n * w * (k + v)
        chunk = min(CHUNK_LEN, n)
        far_keys = sum(
            -(-max(start - m, 0) // chunk) * chunk for start in range(0, n, t)
        )
        far = 2 * t * far_keys * (k + v)
        forward = window + far + rel
        # Window: autodiff, two products each; far part: flash attention's
        # backward, the scores recomputed (1) then dp, dq, dk, dv.
        backward = 2 * window + 2 * t * far_keys * (3 * k + 2 * v) + 2 * rel
    elif config.attention == "dense_full":
        full = 2 * n * n * (k + v)
        forward = full + rel
        backward = 2 * full + 2 * rel
    else:
        raise ValueError(
            "config.attention must be 'vq', 'dense' or 'dense_full', "
            f"got {config.attention!r}"
        )
    return dict(forward=h * forward, backward=h * backward)


def train_step_flops(
    config: TransformerConfig, length: int, batch_size: int = 1
) -> dict[str, int]:
    """Matmul FLOPs of the loss gradient of one call of `length` positions.

    Returns dict(forward, backward, total, attention, projections, logits),
    the last three summed over forward and backward (see the module
    docstring for what each counts).
    """
    d, h, k, v = config.d_model, config.n_head, config.d_k, config.d_v
    n = batch_size * length
    gau_proj = 2 * n * d * h * (k + k + 2 * v) + 2 * n * h * v * d  # q, kvg, out
    r_proj = 2 * (config.mem_len + 1) * d * h * k
    attention = attention_flops(config, length)
    per_gau_forward = gau_proj + r_proj + batch_size * attention["forward"]
    per_gau_backward = 2 * gau_proj + r_proj + batch_size * attention["backward"]
    n_gau = 2 * config.n_layer
    logits = 2 * n * d * config.n_vocab
    forward = n_gau * per_gau_forward + logits
    backward = n_gau * per_gau_backward + 2 * logits
    return dict(
        forward=forward,
        backward=backward,
        total=forward + backward,
        attention=n_gau * batch_size * (attention["forward"] + attention["backward"]),
        projections=n_gau * (3 * gau_proj + 2 * r_proj),
        logits=3 * logits,
    )
