"""Data-parallel codebook updates: the EMA-as-gradient step on several devices.

Each device takes the gradient of `LearnableVQ.get_codebook_loss` on its shard of
the batch, for each block of the update, with its statistics scaled by
n_device * n_block_per_update. Averaging those gradients over devices and blocks
and taking one SGD step with learning rate 1 gives the EMA update on the
statistics of the whole global batch.

Three equivalent ways to run the step on a set of devices:
  pmap_codebook_grads: the reference recipe, `jax.pmap` and `lax.pmean`;
  shard_map_codebook_grads: the same per-device program under `jax.shard_map`;
  sharded_codebook_grads: the global program under `jax.jit`, with the data laid
    out by `NamedSharding`, so the compiler inserts the all-reduce.

Params are a dict {"c_sum": [H, S, K], "c_count": [H, S]}, named after
LearnableVQ's parameters. Axes: B batch, H heads, L length (n_block_per_update
blocks of equal length), S codes, K key width, D devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tvq.shapes import check_shape
from tvq.vq import LearnableVQ, VQSpec

Params = dict[str, jax.Array]


def make_vq_spec(
    loss_mask: jax.Array, n_device: int = 1, n_block_per_update: int = 1
) -> VQSpec:
    """VQSpec for one device and one block: [B, L] loss_mask, counts as [1] arrays."""
    check_shape("loss_mask", loss_mask, "BL")
    return VQSpec(
        n_device=jnp.array([n_device], jnp.int32),
        n_block_per_update=jnp.array([n_block_per_update], jnp.int32),
        loss_mask=loss_mask,
    )


def codebook_grads(
    params: Params,
    vecs: jax.Array,
    shortcodes: jax.Array,
    c_gamma: float,
    loss_mask: jax.Array | None = None,
    *,
    n_device: int = 1,
    n_block_per_update: int = 1,
) -> Params:
    """One device's codebook-loss gradient, averaged over the blocks of the update.

    Args:
      params: {"c_sum": [H, S, K], "c_count": [H, S]}.
      vecs: [B, H, L, K] this device's vectors; L is cut into n_block_per_update
        blocks of equal length, each with its own loss, as in the reference.
      shortcodes: [B, H, L] integer codes of vecs.
      c_gamma: EMA decay.
      loss_mask: [B, L], 1 for real positions and 0 for padding; None: all ones.
      n_device: how many devices' gradients will be averaged with this one
        (1 for a program that already sees the global batch).
      n_block_per_update: how many blocks the update is cut into.

    Returns:
      Gradients with the structure of params. Averaged over devices, they are
      (1 - c_gamma) * (params - statistics of the global batch).
    """
    dims = check_shape("vecs", vecs, "BHLK")
    dims = check_shape("shortcodes", shortcodes, "BHL", dims)
    dims = check_shape("params['c_sum']", params["c_sum"], "HSK", dims)
    check_shape("params['c_count']", params["c_count"], "HS", dims)
    if loss_mask is None:
        loss_mask = jnp.ones((dims["B"], dims["L"]), vecs.dtype)
    check_shape("loss_mask", loss_mask, "BL", dims)
    n_block = n_block_per_update
    if n_block < 1 or dims["L"] % n_block:
        raise ValueError(
            f"vecs length L={dims['L']} (shape {list(vecs.shape)}) must split into "
            f"n_block_per_update={n_block} blocks of equal length"
        )

    def block_grads(vecs_n, shortcodes_n, mask_n):
        spec = make_vq_spec(mask_n, n_device, n_block)

        def loss(p):
            return LearnableVQ.get_codebook_loss(
                vecs_n, shortcodes_n, p["c_sum"], p["c_count"], c_gamma, spec
            )

        return jax.grad(loss)(params)

    # Split L into [n_block, block_len] and move the block axis to the front.
    b, h, length, k = vecs.shape
    t = length // n_block
    vecs_b = jnp.moveaxis(vecs.reshape(b, h, n_block, t, k), 2, 0)
    shortcodes_b = jnp.moveaxis(shortcodes.reshape(b, h, n_block, t), 2, 0)
    mask_b = jnp.moveaxis(loss_mask.reshape(b, n_block, t), 1, 0)
    grads = jax.vmap(block_grads)(vecs_b, shortcodes_b, mask_b)
    return jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)


def apply_sgd1(params: Params, grads: Params) -> Params:
    """One SGD step with learning rate 1: params - grads, leaf by leaf."""
    return jax.tree.map(lambda p, g: p - g, params, grads)


def make_data_mesh(n_device: int | None = None, axis: str = "data") -> Mesh:
    """1-D mesh over the first n_device devices (all by default), axis type Auto."""
    devices = jax.devices()
    n_device = len(devices) if n_device is None else n_device
    if not 1 <= n_device <= len(devices):
        raise ValueError(f"n_device must be in [1, {len(devices)}], got {n_device}")
    return jax.make_mesh(
        (n_device,), (axis,), axis_types=(AxisType.Auto,), devices=devices[:n_device]
    )


def pmap_codebook_grads(
    c_gamma: float, *, n_block_per_update: int = 1, axis_name: str = "devices"
):
    """The reference recipe: `jax.pmap` of per-device gradients and `lax.pmean`.

    Returns a function of (params, vecs, shortcodes, loss_mask) with a leading
    device axis D on every argument: params replicated ({"c_sum": [D, H, S, K],
    "c_count": [D, H, S]}, e.g. from flax.jax_utils.replicate), vecs
    [D, B/D, H, L, K], shortcodes [D, B/D, H, L] and loss_mask [D, B/D, L]
    (e.g. from flax.training.common_utils.shard). It returns the averaged
    gradients, replicated: the same [D, ...] structure as params.
    """

    def step(params, vecs, shortcodes, loss_mask):
        grads = codebook_grads(
            params,
            vecs,
            shortcodes,
            c_gamma,
            loss_mask,
            n_device=jax.lax.axis_size(axis_name),
            n_block_per_update=n_block_per_update,
        )
        return jax.lax.pmean(grads, axis_name)

    return jax.pmap(step, axis_name=axis_name)


def _on_mesh(mesh: Mesh, axis: str, fn):
    """Wrap fn(params, vecs, shortcodes, loss_mask) to take global arrays.

    The wrapper checks the batch splits evenly over the mesh axis, fills in an
    all-ones [B, L] loss_mask for None, replicates params and splits the batch
    over `axis` before calling fn.
    """
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(axis))
    n_device = mesh.shape[axis]

    def run(params, vecs, shortcodes, loss_mask=None):
        dims = check_shape("vecs", vecs, "BHLK")
        if dims["B"] % n_device:
            raise ValueError(
                f"vecs batch B={dims['B']} (shape {list(vecs.shape)}) must be "
                f"divisible by the {n_device} devices of mesh axis {axis!r}"
            )
        if loss_mask is None:
            loss_mask = jnp.ones((dims["B"], dims["L"]), vecs.dtype)
        check_shape("loss_mask", loss_mask, "BL", dims)
        return fn(
            jax.device_put(params, repl),
            *jax.device_put((vecs, shortcodes, loss_mask), data),
        )

    return run


def shard_map_codebook_grads(
    mesh: Mesh, c_gamma: float, *, n_block_per_update: int = 1, axis: str = "data"
):
    """The pmap recipe ported to `jax.shard_map` over one axis of a mesh.

    Returns a function of global arrays (params, vecs [B, H, L, K], shortcodes
    [B, H, L], loss_mask [B, L] or None) that splits the batch over `axis`,
    replicates params, and returns the averaged gradients (replicated). Global
    jax.Arrays already laid out this way, as in multi-process runs, are used as
    they are.

    Under shard_map, params enter replicated (device-invariant), and the
    gradient with respect to an invariant input is already summed over the
    axis, so `pmean(grad(...))` would return n_device times the average. Casting
    params to device-varying first keeps each gradient per-device, as under pmap.
    """
    n_device = mesh.shape[axis]

    def local(params, vecs, shortcodes, loss_mask):
        params = jax.tree.map(lambda p: jax.lax.pcast(p, axis, to="varying"), params)
        grads = codebook_grads(
            params,
            vecs,
            shortcodes,
            c_gamma,
            loss_mask,
            n_device=n_device,
            n_block_per_update=n_block_per_update,
        )
        return jax.lax.pmean(grads, axis)

    mapped = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(axis), P(axis), P(axis)), out_specs=P()
    )
    return _on_mesh(mesh, axis, jax.jit(mapped))


def sharded_codebook_grads(
    mesh: Mesh, c_gamma: float, *, n_block_per_update: int = 1, axis: str = "data"
):
    """The global program under `jax.jit`, with the batch sharded over `axis`.

    Same arguments and result as `shard_map_codebook_grads`, but the function is
    the single-device computation on the whole batch (n_device=1): the data's
    NamedSharding tells the compiler to split the work and sum the statistics.
    """
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(axis))

    def global_grads(params, vecs, shortcodes, loss_mask):
        return codebook_grads(
            params,
            vecs,
            shortcodes,
            c_gamma,
            loss_mask,
            n_device=1,
            n_block_per_update=n_block_per_update,
        )

    compiled = jax.jit(
        global_grads, in_shardings=(repl, data, data, data), out_shardings=repl
    )
    return _on_mesh(mesh, axis, compiled)
