"""Mixed precision: large products in a low-precision dtype, sums in float32.

With config.dtype="bfloat16" the projections and the attention products take
bfloat16 inputs and accumulate in float32 (`preferred_element_type`), as the
bf16 matrix units of CPUs (AVX512-BF16, AMX) and accelerators do natively.
Everything else (softmax statistics, normalizations, the cache's counts and
means, the codebook and its EMA, the parameters) stays in float32.

The backward pass of such a product would, left to autodiff, multiply a
float32 cotangent by a bfloat16 operand, which runs at float32 speed: here the
cotangent is rounded to the product's dtype first, so the backward products
run in bfloat16 too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def accumulator(*dtypes) -> jnp.dtype:
    """float32 at least: float64 stays float64, anything narrower gets float32."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def is_low(dtype) -> bool:
    """Whether products in `dtype` need the float32 accumulation of this module."""
    return dtype is not None and jnp.finfo(dtype).bits < 32


def product(spec: str, a, b):
    """jnp.einsum(spec, a, b) summed in float32, for low-precision a and b.

    XLA's CPU backend runs a bf16 product fast (AMX, AVX512-BF16) when the
    left operand's contracted axes are its last ones, and at float32 speed or
    below when they lead, as in every weight gradient x^T dy. Such a left
    operand is laid out again first (`transposed`), or the operands trade
    places when that suffices.
    """
    spec_a, spec_b, spec_c = parse(spec)
    summed = [i for i in spec_a if i in spec_b and i not in spec_c]
    if summed and not trailing(spec_a, summed):
        if trailing(spec_b, summed):
            a, b, spec_a, spec_b = b, a, spec_b, spec_a
        else:
            kept = [i for i in spec_a if i not in summed]
            a = transposed(a, spec_a, "".join(kept + summed))
            spec_a = "".join(kept + summed)
    out = f"{spec_a},{spec_b}->{spec_c}"
    return jnp.einsum(out, a, b, preferred_element_type=jnp.float32)


def parse(spec):
    """ "ab,bc->ac" -> ("ab", "bc", "ac")."""
    inputs, out = spec.split("->")
    spec_a, spec_b = inputs.split(",")
    return spec_a, spec_b, out


def trailing(spec, axes):
    """Whether `axes` are the last len(axes) letters of `spec`."""
    return set(spec[len(spec) - len(axes) :]) == set(axes)


def transposed(x, spec, target):
    """x (axes named by `spec`) with its axes in the order `target`, written
    out in that order in memory.

    A plain transpose feeding a product is folded into the product by XLA
    (the operand is read strided, slowly); splitting the first moved axis in
    two and merging it back after the transpose makes a real copy.
    """
    moved = next(i for i, (s, t) in enumerate(zip(spec, target, strict=True)) if s != t)
    n = x.shape[moved]
    split = next(f for f in (64, 32, 16, 8, 4, 2, 1) if n % f == 0)
    shape = (*x.shape[:moved], n // split, split, *x.shape[moved + 1 :])
    axes = [spec.index(i) for i in target]
    # Axis k of x is axis k (or k, k + 1 for the split one) of the reshape.
    order = []
    for k in axes:
        order += [k, k + 1] if k == moved else [k + (k > moved)]
    out = jnp.transpose(x.reshape(shape), order)
    return out.reshape([x.shape[k] for k in axes])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_einsum(spec, a, b):
    return product(spec, a, b)


def _low_einsum_fwd(spec, a, b):
    # With symbolic zeros, a.perturbed says whether a needs a cotangent: none
    # is computed for constants (the codebook, the sinusoid table).
    flags = tuple(() if x.perturbed else None for x in (a, b))
    return _low_einsum(spec, a.value, b.value), (a.value, b.value, flags)


def _low_einsum_bwd(spec, residuals, ct):
    # For "A,B->C" (every index of A in B or C, as in matmuls): dA = dC.B
    # summed as "C,B->A", dB = A.dC as "A,C->B"; both products low precision.
    a, b, (needs_a, needs_b) = residuals
    spec_a, spec_b, spec_c = parse(spec)
    ct = ct.astype(a.dtype)
    d_a = d_b = None
    if needs_a is not None:
        d_a = product(f"{spec_c},{spec_b}->{spec_a}", ct, b).astype(a.dtype)
    if needs_b is not None:
        d_b = product(f"{spec_a},{spec_c}->{spec_b}", a, ct).astype(b.dtype)
    return d_a, d_b


_low_einsum.defvjp(_low_einsum_fwd, _low_einsum_bwd, symbolic_zeros=True)


def einsum(spec: str, a, b, dtype=None):
    """jnp.einsum(spec, a, b) with the inputs in `dtype` (None: as they are)
    and the result in float32 at least.

    A low-precision dtype (bfloat16) also rounds the cotangent to it in the
    backward pass, so both passes run low-precision products.
    """
    if is_low(dtype):
        return _low_einsum(spec, a.astype(dtype), b.astype(dtype))
    out = accumulator(a.dtype, b.dtype)
    return jnp.einsum(spec, a, b, preferred_element_type=out)


def dot_general(dtype):
    """A `lax.dot_general` for flax's nn.Dense(dot_general=...): inputs in
    `dtype`, result in float32, backward products in `dtype` too."""

    def dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        del precision, preferred_element_type  # the dtype decides both
        (lc, rc), (lb, rb) = dimension_numbers
        if lb or rb or list(rc) != [0] or list(lc) != [lhs.ndim - 1]:
            raise ValueError(
                "tvq.precision.dot_general handles x @ kernel only, got "
                f"dimension_numbers {dimension_numbers}"
            )
        rows = lhs.reshape(-1, lhs.shape[-1])
        out = einsum("ni,ij->nj", rows, rhs, dtype)
        return out.reshape(*lhs.shape[:-1], rhs.shape[-1])

    return dot
