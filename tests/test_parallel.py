"""tvq.parallel: every data-parallel form of the codebook step is the global EMA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import brute_ema
from jax.sharding import PartitionSpec as P

from tvq.parallel import (
    apply_sgd1,
    codebook_grads,
    make_data_mesh,
    make_vq_spec,
    pmap_codebook_grads,
    shard_map_codebook_grads,
    sharded_codebook_grads,
)

GAMMA = 0.9
H, S, K, BLOCK_LEN = 2, 5, 3, 4
TOL = dict(rtol=0.0, atol=1e-9)
jit_codebook_grads = jax.jit(
    codebook_grads, static_argnames=("n_device", "n_block_per_update")
)


def problem(batch, n_block, seed=0, dtype=np.float64):
    """Params, vecs, shortcodes and a loss mask with padding, as NumPy arrays."""
    rng = np.random.default_rng(seed)
    length = n_block * BLOCK_LEN
    params = {
        "c_sum": rng.normal(size=(H, S, K)).astype(dtype),
        "c_count": rng.uniform(1.0, 3.0, size=(H, S)).astype(dtype),
    }
    vecs = rng.normal(size=(batch, H, length, K)).astype(dtype)
    shortcodes = rng.integers(0, S, size=(batch, H, length), dtype=np.int32)
    mask = (rng.uniform(size=(batch, length)) > 0.25).astype(dtype)
    return params, vecs, shortcodes, mask


def assert_is_global_ema(params, grads, vecs, shortcodes, mask):
    """One SGD(lr=1) step on grads equals the EMA over the whole batch (float64)."""
    want_sum, want_count = brute_ema(
        vecs, shortcodes, params["c_sum"], params["c_count"], GAMMA, mask
    )
    new = apply_sgd1(params, grads)
    np.testing.assert_allclose(np.asarray(new["c_sum"]), want_sum, **TOL)
    np.testing.assert_allclose(np.asarray(new["c_count"]), want_count, **TOL)


def pmap_grads(n_device, n_block, params, vecs, shortcodes, mask):
    """The reference recipe on the first n_device devices; device 0's copy."""

    def rep(x):
        return np.broadcast_to(x, (n_device, *x.shape))

    def split(x):
        return x.reshape(n_device, x.shape[0] // n_device, *x.shape[1:])

    step = pmap_codebook_grads(GAMMA, n_block_per_update=n_block)
    grads = step(jax.tree.map(rep, params), split(vecs), split(shortcodes), split(mask))
    return jax.tree.map(lambda g: g[0], grads)


@pytest.mark.parametrize("n_block", [1, 2, 3])
@pytest.mark.parametrize("n_device", [1, 2, 4, 8])
def test_device_by_block_matrix_is_global_ema(n_device, n_block):
    params, vecs, shortcodes, mask = problem(2 * n_device, n_block, seed=n_block)
    mesh = make_data_mesh(n_device)
    forms = {
        "pmap": pmap_grads(n_device, n_block, params, vecs, shortcodes, mask),
        "shard_map": shard_map_codebook_grads(mesh, GAMMA, n_block_per_update=n_block)(
            params, vecs, shortcodes, mask
        ),
        "jit": sharded_codebook_grads(mesh, GAMMA, n_block_per_update=n_block)(
            params, vecs, shortcodes, mask
        ),
    }
    for name, grads in forms.items():
        assert grads["c_sum"].dtype == jnp.float64, name
        assert_is_global_ema(params, grads, vecs, shortcodes, mask)


def test_one_device_codebook_grads_is_global_ema_for_each_block_count():
    for n_block in (1, 2, 3):
        params, vecs, shortcodes, mask = problem(3, n_block)
        grads = jit_codebook_grads(
            params, vecs, shortcodes, GAMMA, mask, n_block_per_update=n_block
        )
        assert_is_global_ema(params, grads, vecs, shortcodes, mask)


def test_loss_mask_none_means_all_positions():
    params, vecs, shortcodes, _ = problem(4, 1)
    ones = np.ones(vecs.shape[:1] + vecs.shape[2:3])
    mesh = make_data_mesh(4)
    for grads in (
        jit_codebook_grads(params, vecs, shortcodes, GAMMA),
        shard_map_codebook_grads(mesh, GAMMA)(params, vecs, shortcodes),
        sharded_codebook_grads(mesh, GAMMA)(params, vecs, shortcodes),
    ):
        assert_is_global_ema(params, grads, vecs, shortcodes, ones)


def test_naive_shard_map_port_is_off_by_the_device_count():
    """pmean(grad(...)) under shard_map: grad of a replicated input is pre-summed."""
    params, vecs, shortcodes, mask = problem(8, 1)
    mesh = make_data_mesh(8)

    def naive(params, vecs, shortcodes, mask):
        grads = codebook_grads(params, vecs, shortcodes, GAMMA, mask, n_device=8)
        return jax.lax.pmean(grads, "data")

    naive = jax.jit(
        jax.shard_map(
            naive,
            mesh=mesh,
            in_specs=(P(), P("data"), P("data"), P("data")),
            out_specs=P(),
        )
    )
    right = shard_map_codebook_grads(mesh, GAMMA)(params, vecs, shortcodes, mask)
    wrong = naive(params, vecs, shortcodes, mask)
    for k in params:
        np.testing.assert_allclose(
            np.asarray(wrong[k]), 8 * np.asarray(right[k]), rtol=1e-12
        )


def test_explicit_axis_mesh_and_float32():
    """jax.make_mesh's default (Explicit) axes work too; float32 stays float32."""
    params, vecs, shortcodes, mask = problem(8, 2, dtype=np.float32)
    mesh = jax.make_mesh((8,), ("data",))
    grads = shard_map_codebook_grads(mesh, GAMMA, n_block_per_update=2)(
        params, vecs, shortcodes, mask
    )
    assert grads["c_sum"].dtype == jnp.float32
    want_sum, want_count = brute_ema(
        vecs, shortcodes, params["c_sum"], params["c_count"], GAMMA, mask
    )
    new = apply_sgd1(params, grads)
    np.testing.assert_allclose(np.asarray(new["c_sum"]), want_sum, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new["c_count"]), want_count, atol=1e-5)


def test_make_vq_spec_shapes():
    spec = make_vq_spec(jnp.ones((2, 3)), n_device=4, n_block_per_update=3)
    assert spec.n_device.shape == (1,) and int(spec.n_device[0]) == 4
    assert int(spec.n_block_per_update[0]) == 3 and spec.loss_mask.shape == (2, 3)
    with pytest.raises(ValueError, match=r"loss_mask must have shape \[B, L\]"):
        make_vq_spec(jnp.ones((2, 3, 1)))


def test_bad_inputs_raise_value_errors_naming_shapes():
    params, vecs, shortcodes, mask = problem(6, 2)
    mesh = make_data_mesh(4)
    for make in (shard_map_codebook_grads, sharded_codebook_grads):
        with pytest.raises(
            ValueError, match=r"B=6 \(shape \[6, 2, 8, 3\]\).*4 devices"
        ):
            make(mesh, GAMMA)(params, vecs, shortcodes, mask)
    with pytest.raises(ValueError, match=r"L=8 \(shape \[6, 2, 8, 3\]\).*=3 blocks"):
        codebook_grads(params, vecs, shortcodes, GAMMA, n_block_per_update=3)
    with pytest.raises(ValueError, match=r"loss_mask must have shape \[B=6, L=8\]"):
        codebook_grads(params, vecs, shortcodes, GAMMA, mask[:3])
    with pytest.raises(
        ValueError, match=r"shortcodes must have shape \[B=6, H=2, L=8\]"
    ):
        codebook_grads(params, vecs, shortcodes[:, :1], GAMMA)
    with pytest.raises(ValueError, match=r"params\['c_count'\] must have shape"):
        codebook_grads({**params, "c_count": mask}, vecs, shortcodes, GAMMA)
    with pytest.raises(ValueError, match=r"n_device must be in \[1, 8\], got 9"):
        make_data_mesh(9)
