"""The facts of the reference Transformer-VQ quantizer tests, checked on tvq.

Every expected value is computed independently of tvq: in closed form or by the
NumPy references in helpers.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import jax_utils
from flax.training import common_utils
from helpers import (
    TOL64,
    brute_ema,
    brute_nearest,
    make_config,
    make_spec,
    scaled_one_hot_codebook,
)
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from tvq import LearnableVQ, VQSpec, get_codewords, get_shortcodes

N_DEVICE = 8
GAMMA = 0.99


def test_num_devices():
    assert jax.device_count() == N_DEVICE
    assert jax.local_device_count() == N_DEVICE


# Scaled one-hot codebook: codebook[h, s] = (h + 1) e_s, vecs = last l codewords.
H, L, S, D = 3, 5, 7, 11


@pytest.fixture
def one_hot_setup():
    codebook = scaled_one_hot_codebook(H, S, D)
    vecs = codebook[None, :, S - L :, :]
    return jnp.asarray(codebook), jnp.asarray(vecs)


def expected_last_codes(h: int, l: int, s: int) -> np.ndarray:
    """[1, h, l] shortcodes s-l, ..., s-1 in every head."""
    return np.tile(np.arange(s - l, s)[None, None, :], (1, h, 1))


def test_get_shortcodes_scaled_one_hot(one_hot_setup):
    codebook, vecs = one_hot_setup
    shortcodes, errs2 = get_shortcodes(vecs=vecs, codebook=codebook)
    assert shortcodes.shape == (1, H, L)
    assert shortcodes.dtype == jnp.int32
    np.testing.assert_array_equal(shortcodes, expected_last_codes(H, L, S))
    np.testing.assert_allclose(errs2, np.zeros([1, H, L]), atol=1e-12)


def test_get_codewords_scaled_one_hot(one_hot_setup):
    codebook, vecs = one_hot_setup
    shortcodes, _ = get_shortcodes(vecs=vecs, codebook=codebook)
    codewords = get_codewords(shortcodes=shortcodes, codebook=codebook)
    np.testing.assert_array_equal(codewords, vecs)


def test_get_codebook_ema_targets_closed_form(one_hot_setup):
    c_sum, codewords = one_hot_setup
    c_count = jnp.ones([H, S], dtype=jnp.float64)
    vecs = codewords + 0.1
    shortcodes, _ = get_shortcodes(vecs=vecs, codebook=c_sum)
    np.testing.assert_array_equal(shortcodes, expected_last_codes(H, L, S))

    # Code s-l+i of head h receives exactly one vector, vecs[0, h, i].
    c_sum_np = np.asarray(c_sum)
    c_sum_expected = GAMMA * c_sum_np + (1 - GAMMA) * np.pad(
        np.asarray(vecs[0]), ((0, 0), (S - L, 0), (0, 0))
    )
    c_count_expected = GAMMA * 1.0 + (1 - GAMMA) * np.pad(
        np.ones([H, L]), ((0, 0), (S - L, 0))
    )
    c_sum_tgt, c_count_tgt = LearnableVQ.get_codebook_ema_targets(
        vecs=vecs,
        shortcodes=shortcodes,
        c_sum=c_sum,
        c_count=c_count,
        c_gamma=GAMMA,
        vq_spec=make_spec(batch=1, length=L),
    )
    np.testing.assert_allclose(c_sum_tgt, c_sum_expected, **TOL64)
    np.testing.assert_allclose(c_count_tgt, c_count_expected, **TOL64)


# EMA update as an SGD step: h, l, s, d = 3, 22, 11, 41.
EH, EL, ES, ED = 3, 22, 11, 41


def codebook_loss(params, vecs, shortcodes, vq_spec):
    return LearnableVQ.get_codebook_loss(
        vecs=vecs,
        shortcodes=shortcodes,
        c_sum=params["c_sum"],
        c_count=params["c_count"],
        c_gamma=GAMMA,
        vq_spec=vq_spec,
    )


codebook_grad = jax.jit(jax.grad(codebook_loss))


def ema_problem(batch: int, random_codebook: bool, seed: int = 0):
    """params, vecs, shortcodes and the expected EMA update of the whole batch."""
    rng = np.random.default_rng(seed)
    if random_codebook:
        c_sum = rng.normal(size=[EH, ES, ED])
    else:
        c_sum = scaled_one_hot_codebook(EH, ES, ED)
    c_count = 2.0 * np.ones([EH, ES])
    vecs = rng.normal(size=[batch, EH, EL, ED])
    shortcodes, _ = brute_nearest(vecs, c_sum / c_count[..., None])
    shortcodes = shortcodes.astype(np.int32)
    expected = brute_ema(vecs, shortcodes, c_sum, c_count, GAMMA)
    params = dict(c_sum=jnp.asarray(c_sum), c_count=jnp.asarray(c_count))
    return params, jnp.asarray(vecs), jnp.asarray(shortcodes), expected


def sgd_step(params, grads):
    """One SGD step with learning rate 1."""
    return jax.tree_util.tree_map(lambda p, g: p - g, params, grads)


def average(*trees):
    return jax.tree_util.tree_map(lambda *xs: sum(xs) / len(xs), *trees)


def assert_ema_update(new_params, expected):
    c_sum_expected, c_count_expected = expected
    np.testing.assert_allclose(new_params["c_sum"], c_sum_expected, **TOL64)
    np.testing.assert_allclose(new_params["c_count"], c_count_expected, **TOL64)


def block_slices(length: int, n_block: int):
    size = length // n_block
    return [slice(i * size, (i + 1) * size) for i in range(n_block)]


def test_codebook_loss_value_is_zero():
    params, vecs, shortcodes, _ = ema_problem(batch=1, random_codebook=False)
    loss = jax.jit(codebook_loss)(params, vecs, shortcodes, make_spec(1, EL))
    assert loss.shape == ()
    assert float(loss) == 0.0


def test_codebook_loss_sgd_is_ema_one_block():
    params, vecs, shortcodes, expected = ema_problem(batch=1, random_codebook=False)
    # The seed problem must exercise several codes, not just one.
    assert len(np.unique(np.asarray(shortcodes))) > 1
    grads = codebook_grad(params, vecs, shortcodes, make_spec(1, EL))
    assert_ema_update(sgd_step(params, grads), expected)


def test_codebook_loss_sgd_is_ema_two_blocks():
    params, vecs, shortcodes, expected = ema_problem(batch=1, random_codebook=False)
    grads = []
    for block_id, blk in enumerate(block_slices(EL, 2)):
        spec = make_spec(1, EL // 2, n_block_per_update=2, block_id=block_id)
        grads.append(
            codebook_grad(params, vecs[:, :, blk], shortcodes[:, :, blk], spec)
        )
    assert_ema_update(sgd_step(params, average(*grads)), expected)


# Across 8 devices with pmap + pmean (the reference recipe), batch 3 per device.
MB = 3 * N_DEVICE


@functools.partial(jax.pmap, axis_name="devices")
def pmap_grad(params, vecs, shortcodes, vq_spec):
    grads = jax.grad(codebook_loss)(params, vecs, shortcodes, vq_spec)
    return jax.lax.pmean(grads, axis_name="devices")


def sharded_spec(batch: int, length: int, n_block_per_update: int) -> VQSpec:
    """VQSpec with a leading device axis: one [] / [B/8, L] slice per device."""
    local = batch // N_DEVICE
    return VQSpec.create(
        n_device=jnp.full([N_DEVICE], N_DEVICE, dtype=jnp.int32),
        n_block_per_update=jnp.full([N_DEVICE], n_block_per_update, dtype=jnp.int32),
        loss_mask=jnp.ones([N_DEVICE, local, length], dtype=jnp.int32),
    )


@pytest.fixture(scope="module")
def multidev_problem():
    return ema_problem(batch=MB, random_codebook=True, seed=1)


@pytest.mark.parametrize("n_block", [1, 2])
def test_codebook_loss_sgd_is_ema_pmap(multidev_problem, n_block):
    params, vecs, shortcodes, expected = multidev_problem
    grads = []
    for blk in block_slices(EL, n_block):
        g = pmap_grad(
            jax_utils.replicate(params),
            common_utils.shard(vecs[:, :, blk]),
            common_utils.shard(shortcodes[:, :, blk]),
            sharded_spec(MB, EL // n_block, n_block),
        )
        # pmean leaves the same gradient on every device.
        for leaf in jax.tree_util.tree_leaves(g):
            np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
        grads.append(jax_utils.unreplicate(g))
    assert_ema_update(sgd_step(params, average(*grads)), expected)


# Across 8 devices with shard_map: batch sharded over "data", params replicated.
MESH = Mesh(np.array(jax.devices()), ("data",))
SPEC_SPECS = VQSpec(n_device=P(), n_block_per_update=P(), loss_mask=P("data"))
IN_SPECS = (P(), P("data"), P("data"), SPEC_SPECS)


def _shard_map(fn):
    return jax.jit(jax.shard_map(fn, mesh=MESH, in_specs=IN_SPECS, out_specs=P()))


@_shard_map
def shard_map_grad_naive(params, vecs, shortcodes, vq_spec):
    """Direct port of the pmap recipe: pmean of per-shard gradients. Wrong by 8x."""
    grads = jax.grad(codebook_loss)(params, vecs, shortcodes, vq_spec)
    return jax.lax.pmean(grads, axis_name="data")


@_shard_map
def shard_map_grad_divide(params, vecs, shortcodes, vq_spec):
    """Gradient of a replicated input is already summed over devices: divide."""
    grads = jax.grad(codebook_loss)(params, vecs, shortcodes, vq_spec)
    n = jax.lax.axis_size("data")
    return jax.tree_util.tree_map(lambda g: g / n, grads)


@_shard_map
def shard_map_mean_loss(params, vecs, shortcodes, vq_spec):
    return jax.lax.pmean(codebook_loss(params, vecs, shortcodes, vq_spec), "data")


shard_map_grad_outside = jax.jit(jax.grad(shard_map_mean_loss))


def replicated_spec(batch: int, length: int, n_block_per_update: int) -> VQSpec:
    return make_spec(batch, length, N_DEVICE, n_block_per_update)


@pytest.mark.parametrize(
    "grad_fn",
    [shard_map_grad_divide, shard_map_grad_outside],
    ids=["grad_inside_divide", "grad_outside_of_pmean_loss"],
)
@pytest.mark.parametrize("n_block", [1, 2])
def test_codebook_loss_sgd_is_ema_shard_map(multidev_problem, grad_fn, n_block):
    params, vecs, shortcodes, expected = multidev_problem
    grads = []
    for blk in block_slices(EL, n_block):
        spec = replicated_spec(MB, EL // n_block, n_block)
        grads.append(grad_fn(params, vecs[:, :, blk], shortcodes[:, :, blk], spec))
    assert_ema_update(sgd_step(params, average(*grads)), expected)


def test_shard_map_naive_pmean_of_grads_is_8x(multidev_problem):
    params, vecs, shortcodes, _ = multidev_problem
    spec = replicated_spec(MB, EL, 1)
    naive = shard_map_grad_naive(params, vecs, shortcodes, spec)
    correct = shard_map_grad_divide(params, vecs, shortcodes, spec)
    for name in ("c_sum", "c_count"):
        assert np.all(np.asarray(correct[name]) != 0.0)
        ratio = np.asarray(naive[name]) / np.asarray(correct[name])
        np.testing.assert_allclose(ratio, N_DEVICE, rtol=1e-10)


# LearnableVQ.__call__ with the reference fixture's config.
QB = 3


@pytest.fixture(scope="module")
def quantizer():
    config = make_config(block_len=100, is_train=True)
    module = LearnableVQ(config)
    length = config.block_len
    rng = np.random.default_rng(0)
    shape = [1, config.n_head, config.n_code, config.d_k]
    init_vecs = jnp.asarray(rng.normal(size=shape), dtype=jnp.float32)
    params = jax.jit(module.init)(
        {"params": jax.random.key(1)}, init_vecs, make_spec(1, config.n_code)
    )["params"]
    shape = [QB, config.n_head, length, config.d_k]
    vecs = jnp.asarray(rng.normal(size=shape), dtype=jnp.float64)
    spec = make_spec(QB, length)

    def loss(name, params_, vecs_):
        return module.apply({"params": params_}, vecs_, spec)[name]

    return config, params, vecs, spec, loss


def test_vector_quantizer_param_shapes(quantizer):
    config, params, *_ = quantizer
    assert params["c_sum"].shape == (config.n_head, config.n_code, config.d_k)
    assert params["c_count"].shape == (config.n_head, config.n_code)
    assert params["c_sum"].dtype == jnp.float32
    np.testing.assert_array_equal(params["c_count"], 1.0)


def test_vector_quantizer_commit_loss_grad(quantizer):
    config, params, vecs, _, loss = quantizer
    grad_fn = jax.jit(jax.grad(functools.partial(loss, "l_commit"), argnums=1))
    grad = grad_fn(params, vecs)
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad))
    assert np.any(grad != 0.0)
    # l_commit = sum_h mean_{b,l} |x - c(x)|^2, so its gradient is 2 (x - c) / (B L).
    codebook = np.asarray(params["c_sum"]) / np.asarray(params["c_count"])[..., None]
    idx, _ = brute_nearest(vecs, codebook)
    heads = np.arange(config.n_head)[None, :, None]
    codewords = codebook[heads, idx]
    expected = 2.0 * (np.asarray(vecs) - codewords) / (QB * config.block_len)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_vector_quantizer_codebook_loss_grad(quantizer):
    config, params, vecs, _, loss = quantizer
    grads = jax.jit(jax.grad(functools.partial(loss, "l_codebook")))(params, vecs)
    for leaf in jax.tree_util.tree_leaves(grads):
        assert np.any(np.asarray(leaf) != 0.0)
    c_sum = np.asarray(params["c_sum"], dtype=np.float64)
    c_count = np.asarray(params["c_count"], dtype=np.float64)
    idx, _ = brute_nearest(vecs, c_sum / c_count[..., None])
    c_sum_tgt, c_count_tgt = brute_ema(vecs, idx, c_sum, c_count, config.c_gamma)
    np.testing.assert_allclose(grads["c_sum"], c_sum - c_sum_tgt, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        grads["c_count"], c_count - c_count_tgt, rtol=1e-5, atol=1e-7
    )
