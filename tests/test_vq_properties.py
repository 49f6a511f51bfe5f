"""Properties of tvq's quantizer against brute-force NumPy, over many shapes."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TOL64, brute_ema, brute_nearest, make_config, make_spec

from tvq import LearnableVQ, codebook_from_stats, get_codewords, get_shortcodes

# (B, H, L, S, K): edge cases with a 1 in every axis, then random small shapes.
EDGE_SHAPES = [
    (1, 1, 1, 1, 1),
    (2, 3, 4, 1, 5),  # S = 1: every vector maps to code 0
    (2, 3, 1, 5, 4),  # L = 1
    (1, 2, 6, 5, 3),  # B = 1
    (3, 2, 4, 5, 1),  # K = 1
    (2, 1, 7, 9, 3),  # H = 1
]
_shape_rng = np.random.default_rng(20240101)
RANDOM_SHAPES = [
    tuple(int(n) for n in _shape_rng.integers(1, 8, size=5)) for _ in range(6)
]
SHAPES = EDGE_SHAPES + RANDOM_SHAPES

# One compilation per shape, shared by all seeds.
shortcodes_jit = jax.jit(get_shortcodes)
codewords_jit = jax.jit(get_codewords)


def shape_id(shape) -> str:
    return "B{}H{}L{}S{}K{}".format(*shape)


def random_problem(shape, seed: int, dtype=np.float64):
    b, h, l, s, k = shape
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=[b, h, l, k]).astype(dtype)
    codebook = rng.normal(size=[h, s, k]).astype(dtype)
    return vecs, codebook


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_shortcodes_and_errs2_match_brute_force(shape):
    for seed in range(3):
        vecs, codebook = random_problem(shape, seed)
        shortcodes, errs2 = shortcodes_jit(vecs, codebook)
        idx, dist2 = brute_nearest(vecs, codebook)
        assert shortcodes.shape == shape[:3]
        assert errs2.shape == shape[:3]
        assert shortcodes.dtype == jnp.int32
        np.testing.assert_array_equal(shortcodes, idx)
        np.testing.assert_allclose(errs2, dist2, rtol=1e-9, atol=1e-12)
        assert np.all(np.asarray(errs2) >= 0.0)


@pytest.mark.parametrize("shape", SHAPES[::3], ids=shape_id)
def test_shortcodes_float32_pick_a_nearest_code(shape):
    vecs, codebook = random_problem(shape, seed=7, dtype=np.float32)
    shortcodes, errs2 = shortcodes_jit(vecs, codebook)
    assert errs2.dtype == jnp.float32
    _, dist2 = brute_nearest(vecs, codebook)
    # Near-ties may resolve either way in float32: the chosen code's distance
    # must be the minimum up to float32 round-off.
    diff = vecs - codebook[np.arange(shape[1])[None, :, None], np.asarray(shortcodes)]
    chosen = np.sum(diff.astype(np.float64) ** 2, axis=-1)
    np.testing.assert_allclose(chosen, dist2, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(errs2, dist2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale", [1e2, 1e4])
def test_errs2_nonnegative_for_exact_large_codewords(scale):
    rng = np.random.default_rng(3)
    h, s, k = 2, 6, 16
    codebook = (scale * rng.normal(size=[h, s, k])).astype(np.float32)
    vecs = codebook[None]  # [1, H, L=S, K]: every vector is exactly a codeword
    # |x|^2 - 2 x.c + |c|^2 really does go negative here in float32.
    x2 = np.sum(vecs * vecs, axis=-1)
    expanded = x2 - 2.0 * np.einsum("bhlk,hlk->bhl", vecs, codebook) + x2
    assert np.any(expanded < 0.0)
    shortcodes, errs2 = shortcodes_jit(vecs, codebook)
    np.testing.assert_array_equal(shortcodes, np.tile(np.arange(s), (1, h, 1)))
    errs2 = np.asarray(errs2)
    assert np.all(errs2 >= 0.0)
    assert np.all(errs2 <= 1e-5 * x2)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_get_codewords_matches_per_head_indexing(shape):
    b, h, l, s, k = shape
    rng = np.random.default_rng(11)
    codebook = rng.normal(size=[h, s, k])
    shortcodes = rng.integers(0, s, size=[b, h, l]).astype(np.int32)
    expected = np.empty([b, h, l, k])
    for head in range(h):
        expected[:, head] = np.take(codebook[head], shortcodes[:, head], axis=0)
    codewords = codewords_jit(shortcodes, codebook)
    np.testing.assert_array_equal(codewords, expected)


@pytest.mark.parametrize("shortcode_dtype", [jnp.int32, jnp.int64, jnp.uint8])
def test_get_codewords_accepts_integer_dtypes(shortcode_dtype):
    codebook = jnp.arange(2 * 3 * 4, dtype=jnp.float64).reshape(2, 3, 4)
    shortcodes = jnp.array([[[2, 0], [1, 1]]], dtype=shortcode_dtype)
    out = codewords_jit(shortcodes, codebook)
    np.testing.assert_array_equal(out[0, 0], codebook[0, jnp.array([2, 0])])
    np.testing.assert_array_equal(out[0, 1], codebook[1, jnp.array([1, 1])])


# EMA targets and the loss mask.
ema_targets = jax.jit(LearnableVQ.get_codebook_ema_targets)


def masked_problem(shape, seed: int):
    vecs, codebook = random_problem(shape, seed)
    rng = np.random.default_rng(seed + 100)
    c_count = rng.uniform(0.5, 3.0, size=shape[1:2] + shape[3:4])
    c_sum = codebook * c_count[..., None]
    mask = (rng.uniform(size=[shape[0], shape[2]]) < 0.6).astype(np.int32)
    idx, _ = brute_nearest(vecs, codebook)
    return vecs, c_sum, c_count, mask, idx.astype(np.int32)


@pytest.mark.parametrize("shape", SHAPES[::3], ids=shape_id)
def test_ema_targets_match_brute_force_with_mask(shape):
    vecs, c_sum, c_count, mask, idx = masked_problem(shape, seed=5)
    spec = make_spec(shape[0], shape[2], loss_mask=jnp.asarray(mask))
    got = ema_targets(vecs, idx, c_sum, c_count, 0.9, spec)
    expected = brute_ema(vecs, idx, c_sum, c_count, 0.9, mask=mask)
    np.testing.assert_allclose(got[0], expected[0], **TOL64)
    np.testing.assert_allclose(got[1], expected[1], **TOL64)


@pytest.mark.parametrize("n_device, n_block", [(1, 1), (8, 1), (2, 3)])
def test_ema_targets_scale_statistics(n_device, n_block):
    shape = (3, 2, 5, 4, 3)
    vecs, c_sum, c_count, mask, idx = masked_problem(shape, seed=9)
    spec = make_spec(3, 5, n_device, n_block, loss_mask=jnp.asarray(mask))
    got_sum, got_count = ema_targets(vecs, idx, c_sum, c_count, 0.9, spec)
    sum_tgt, count_tgt = brute_ema(vecs, idx, c_sum, c_count, 0.9, mask=mask)
    # target = gamma p + (1 - gamma) n_device n_block stats
    scale = n_device * n_block
    np.testing.assert_allclose(
        got_sum, 0.9 * c_sum + scale * (sum_tgt - 0.9 * c_sum), **TOL64
    )
    np.testing.assert_allclose(
        got_count, 0.9 * c_count + scale * (count_tgt - 0.9 * c_count), **TOL64
    )


def test_ema_targets_masked_rows_equal_unmasked_subset():
    shape = (5, 2, 6, 4, 3)
    vecs, c_sum, c_count, _, idx = masked_problem(shape, seed=2)
    keep = np.array([1, 0, 1, 1, 0], dtype=np.int32)
    mask = np.repeat(keep[:, None], shape[2], axis=1)
    full = ema_targets(vecs, idx, c_sum, c_count, 0.99, make_spec(5, 6, loss_mask=mask))
    rows = keep.astype(bool)
    subset = ema_targets(
        vecs[rows], idx[rows], c_sum, c_count, 0.99, make_spec(int(rows.sum()), 6)
    )
    np.testing.assert_allclose(full[0], subset[0], **TOL64)
    np.testing.assert_allclose(full[1], subset[1], **TOL64)


def test_ema_targets_all_masked_is_pure_decay():
    shape = (2, 3, 4, 5, 2)
    vecs, c_sum, c_count, _, idx = masked_problem(shape, seed=4)
    spec = make_spec(2, 4, loss_mask=np.zeros([2, 4], np.int32))
    got_sum, got_count = ema_targets(vecs, idx, c_sum, c_count, 0.95, spec)
    np.testing.assert_allclose(got_sum, 0.95 * c_sum, **TOL64)
    np.testing.assert_allclose(got_count, 0.95 * c_count, **TOL64)


# The module: configs are module-level so jitted applies are reused.
MB, MH, ML, MS, MK = 3, 2, 7, 5, 4
CONFIG = make_config(
    n_head=MH,
    n_code=MS,
    d_k=MK,
    block_len=ML,
    param_dtype="float64",
    dtype="float64",
    is_train=True,
)
EVAL_CONFIG = CONFIG.replace(is_train=False)


@functools.partial(jax.jit, static_argnums=0)
def apply_vq(config, params, vecs, spec):
    return LearnableVQ(config).apply({"params": params}, vecs, spec)


def module_problem(seed: int, zero_counts: bool = False):
    rng = np.random.default_rng(seed)
    c_count = np.zeros([MH, MS]) if zero_counts else rng.uniform(0.5, 4.0, [MH, MS])
    params = dict(c_sum=jnp.asarray(rng.normal(size=[MH, MS, MK])), c_count=c_count)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    vecs = jnp.asarray(rng.normal(size=[MB, MH, ML, MK]))
    mask = (rng.uniform(size=[MB, ML]) < 0.6).astype(np.int32)
    return params, vecs, mask


def module_codebook(params) -> np.ndarray:
    c_count = np.maximum(np.asarray(params["c_count"]), 0.01)
    return np.asarray(params["c_sum"]) / c_count[..., None]


def test_commit_loss_normalisation_with_mask():
    params, vecs, mask = module_problem(seed=0)
    out = apply_vq(CONFIG, params, vecs, make_spec(MB, ML, loss_mask=mask))
    _, dist2 = brute_nearest(vecs, module_codebook(params))
    # Sum over heads and unmasked positions, divided by all B * L positions.
    expected = np.sum(dist2 * mask[:, None, :]) / (MB * ML)
    np.testing.assert_allclose(out["l_commit"], expected, **TOL64)
    np.testing.assert_allclose(out["errs2"], dist2, rtol=1e-9, atol=1e-12)


def test_masked_positions_contribute_nothing():
    params, vecs, mask = module_problem(seed=1)
    spec = make_spec(MB, ML, loss_mask=mask)
    garbage = np.random.default_rng(99).normal(scale=1e3, size=vecs.shape)
    moved = jnp.where(jnp.asarray(mask)[:, None, :, None] > 0, vecs, garbage)
    assert not np.allclose(moved, vecs)

    losses = jax.jit(jax.value_and_grad(codebook_loss_of_module))
    (a, ga), (b, gb) = losses(params, vecs, spec), losses(params, moved, spec)
    np.testing.assert_allclose(a, b, **TOL64)
    np.testing.assert_allclose(ga["c_sum"], gb["c_sum"], **TOL64)
    np.testing.assert_allclose(ga["c_count"], gb["c_count"], **TOL64)


def codebook_loss_of_module(params, vecs, spec):
    out = apply_vq(CONFIG, params, vecs, spec)
    return out["l_commit"] + out["l_codebook"]


def test_commit_loss_gradient_is_zero_on_masked_positions():
    params, vecs, mask = module_problem(seed=2)
    spec = make_spec(MB, ML, loss_mask=mask)
    grad = jax.jit(jax.grad(codebook_loss_of_module, argnums=1))(params, vecs, spec)
    grad = np.asarray(grad)
    masked = np.broadcast_to(mask[:, None, :, None] == 0, grad.shape)
    assert np.all(grad[masked] == 0.0)
    assert np.all(grad[~masked] != 0.0)


def test_straight_through_gradient():
    params, vecs, mask = module_problem(seed=3)
    spec = make_spec(MB, ML, loss_mask=mask)
    weights = jnp.asarray(np.random.default_rng(4).normal(size=vecs.shape))

    def weighted(v):
        return jnp.sum(weights * apply_vq(CONFIG, params, v, spec)["quantized"])

    out = apply_vq(CONFIG, params, vecs, spec)
    codebook = module_codebook(params)
    idx, _ = brute_nearest(vecs, codebook)
    codewords = codebook[np.arange(MH)[None, :, None], idx]
    np.testing.assert_array_equal(out["shortcodes"], idx)
    np.testing.assert_allclose(out["quantized"], codewords, **TOL64)
    grad = jax.jit(jax.grad(weighted))(vecs)
    np.testing.assert_array_equal(grad, weights)


def test_zero_counts_give_finite_outputs():
    params, vecs, mask = module_problem(seed=5, zero_counts=True)
    codebook = codebook_from_stats(params["c_sum"], params["c_count"])
    np.testing.assert_allclose(codebook, np.asarray(params["c_sum"]) / 0.01, **TOL64)
    out = apply_vq(CONFIG, params, vecs, make_spec(MB, ML, loss_mask=mask))
    for name, leaf in jax.tree_util.tree_leaves_with_path(out):
        assert np.all(np.isfinite(np.asarray(leaf))), name
    assert float(out["metrics"]["c_dead"]) == MS
    assert float(out["metrics"]["c_usage_max"]) == 0.0


def test_zero_counts_and_sums_give_finite_outputs():
    _, vecs, mask = module_problem(seed=6)
    params = dict(c_sum=jnp.zeros([MH, MS, MK]), c_count=jnp.zeros([MH, MS]))
    out = apply_vq(CONFIG, params, vecs, make_spec(MB, ML, loss_mask=mask))
    for name, leaf in jax.tree_util.tree_leaves_with_path(out):
        assert np.all(np.isfinite(np.asarray(leaf))), name
    np.testing.assert_allclose(out["metrics"]["c_entropy"], math.log(MS), rtol=1e-6)


def test_eval_mode_gives_zero_losses():
    params, vecs, mask = module_problem(seed=7)
    spec = make_spec(MB, ML, loss_mask=mask)
    out = apply_vq(EVAL_CONFIG, params, vecs, spec)
    assert float(out["l_commit"]) == 0.0
    assert float(out["l_codebook"]) == 0.0
    train_out = apply_vq(CONFIG, params, vecs, spec)
    assert float(train_out["l_commit"]) > 0.0
    # Quantization itself does not depend on is_train.
    np.testing.assert_array_equal(out["shortcodes"], train_out["shortcodes"])
    np.testing.assert_array_equal(out["quantized"], train_out["quantized"])


def entropy_nats(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)))


@pytest.mark.parametrize("seed", range(4))
def test_metrics_match_numpy(seed):
    params, vecs, mask = module_problem(seed=10 + seed)
    counts = np.asarray(params["c_count"])
    out = apply_vq(CONFIG, params, vecs, make_spec(MB, ML, loss_mask=mask))
    metrics = {k: float(v) for k, v in out["metrics"].items()}
    assert all(math.isfinite(v) for v in metrics.values())
    tol = dict(rtol=1e-6, atol=1e-7)  # metrics are float32
    np.testing.assert_allclose(metrics["c_usage_min"], counts.min(1).mean(), **tol)
    np.testing.assert_allclose(metrics["c_usage_max"], counts.max(1).mean(), **tol)
    np.testing.assert_allclose(metrics["c_usage_mean"], counts.mean(), **tol)
    np.testing.assert_allclose(metrics["c_dead"], (counts < 1).sum(1).mean(), **tol)
    entropies = [entropy_nats(c / c.sum()) for c in counts]
    np.testing.assert_allclose(metrics["c_entropy"], np.mean(entropies), **tol)
    assert metrics["c_entropy"] <= math.log(MS) + 1e-6
    norms = np.linalg.norm(module_codebook(params), axis=-1).mean()
    np.testing.assert_allclose(metrics["c_norm_mean"], norms, **tol)
    assert 0.0 <= metrics["relative_err_min"] <= metrics["relative_err_mean"]
    assert metrics["relative_err_mean"] <= metrics["relative_err_max"]


@pytest.mark.parametrize("seed", range(20))
def test_entropy_at_most_log_s(seed):
    rng = np.random.default_rng(seed)
    c_count = rng.exponential(size=[4, 9]) * (rng.uniform(size=[4, 9]) < 0.7)
    metrics = get_metrics(np.zeros([1, 4, 2, 3]), np.zeros([1, 4, 2]), c_count)
    assert math.isfinite(float(metrics["c_entropy"]))
    assert float(metrics["c_entropy"]) <= math.log(9) + 1e-6


@pytest.mark.parametrize("s", [1, 2, 7, 64])
def test_entropy_of_uniform_counts_is_log_s(s):
    metrics = get_metrics(np.ones([1, 2, 3, 4]), np.zeros([1, 2, 3]), np.ones([2, s]))
    np.testing.assert_allclose(float(metrics["c_entropy"]), math.log(s), atol=1e-6)


def get_metrics(vecs, errs2, c_count):
    h, s = c_count.shape
    c_sum = np.ones([h, s, vecs.shape[-1]])
    return jax.jit(LearnableVQ.get_quantization_metrics)(vecs, errs2, c_sum, c_count)


# jit / pmap compatibility: shape checks run at trace time and do not break tracing.
def test_get_shortcodes_under_jit_and_eval_shape():
    vecs, codebook = random_problem((2, 3, 4, 5, 6), seed=0)
    eager = get_shortcodes(jnp.asarray(vecs), jnp.asarray(codebook))
    jitted = jax.jit(get_shortcodes)(vecs, codebook)
    np.testing.assert_array_equal(jitted[0], eager[0])
    np.testing.assert_allclose(jitted[1], eager[1], **TOL64)
    shapes = jax.eval_shape(get_shortcodes, vecs, codebook)
    assert isinstance(shapes[0], jax.ShapeDtypeStruct)
    assert shapes[0].shape == (2, 3, 4)
    assert shapes[0].dtype == jnp.int32
    assert shapes[1].shape == (2, 3, 4)


def test_get_shortcodes_and_codewords_under_pmap():
    n = jax.local_device_count()
    vecs, codebook = random_problem((n * 2, 3, 4, 5, 6), seed=1)

    @functools.partial(jax.pmap, in_axes=(0, None))
    def quantize(v, c):
        shortcodes, errs2 = get_shortcodes(v, c)
        return shortcodes, errs2, get_codewords(shortcodes, c)

    shortcodes, errs2, codewords = quantize(vecs.reshape(n, 2, 3, 4, 6), codebook)
    idx, dist2 = brute_nearest(vecs, codebook)
    np.testing.assert_array_equal(shortcodes.reshape(idx.shape), idx)
    np.testing.assert_allclose(errs2.reshape(dist2.shape), dist2, rtol=1e-9, atol=1e-12)
    expected = codebook[np.arange(3)[None, :, None], idx]
    np.testing.assert_array_equal(codewords.reshape(expected.shape), expected)


def test_ties_go_to_the_first_code():
    rng = np.random.default_rng(11)
    codebook = rng.normal(size=(3, 16, 4))
    codebook[:, 8:] = codebook[:, :8]  # duplicated codewords tie exactly
    on_codes = np.broadcast_to(codebook[None, :, :8], (2, 3, 8, 4))
    vecs = np.concatenate([on_codes, rng.normal(size=(2, 3, 32, 4))], axis=2)
    codes, _ = jax.jit(get_shortcodes)(jnp.asarray(vecs), jnp.asarray(codebook))
    first = np.broadcast_to(np.arange(8), (2, 3, 8))
    np.testing.assert_array_equal(codes[:, :, :8], first)
    assert int(codes.max()) < 8


def test_relative_error_metrics_skip_masked_positions():
    rng = np.random.default_rng(21)
    vecs = rng.normal(size=[3, 2, 10, 4])
    errs2 = rng.uniform(size=[3, 2, 10])
    mask = rng.uniform(size=[3, 10]) < 0.6
    errs2[~np.broadcast_to(mask[:, None, :], errs2.shape)] = 1e6  # padding: huge
    c_sum, c_count = np.ones([2, 5, 4]), np.ones([2, 5])
    metrics = jax.jit(LearnableVQ.get_quantization_metrics)(
        vecs, errs2, c_sum, c_count, mask.astype(np.float64)
    )
    rel = np.sqrt(errs2) / (np.linalg.norm(vecs, axis=-1) + 0.01)  # [B, H, L]
    real = np.moveaxis(rel, 1, 0)[:, mask]  # [H, unmasked positions]
    for name, reduce in [("min", np.min), ("mean", np.mean), ("max", np.max)]:
        expected = reduce(real, axis=1).mean()
        np.testing.assert_allclose(metrics[f"relative_err_{name}"], expected, rtol=1e-6)

    none_real = jax.jit(LearnableVQ.get_quantization_metrics)(
        vecs, errs2, c_sum, c_count, np.zeros([3, 10])
    )
    for name in ("min", "mean", "max"):
        assert float(none_real[f"relative_err_{name}"]) == 0.0
