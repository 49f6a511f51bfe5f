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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_einsum(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _low_einsum_fwd(spec, a, b):
    return _low_einsum(spec, a, b), (a, b)


def _low_einsum_bwd(spec, residuals, ct):
    # For "A,B->C" (every index of A in B or C, as in matmuls): dA = dC.B
    # summed as "C,B->A", dB = A.dC as "A,C->B"; both products low precision.
    a, b = residuals
    (spec_a, spec_b), spec_c = spec.split("->")[0].split(","), spec.split("->")[1]
    ct = ct.astype(a.dtype)
    f32 = dict(preferred_element_type=jnp.float32)
    d_a = jnp.einsum(f"{spec_c},{spec_b}->{spec_a}", ct, b, **f32)
    d_b = jnp.einsum(f"{spec_a},{spec_c}->{spec_b}", a, ct, **f32)
    return d_a.astype(a.dtype), d_b.astype(b.dtype)


_low_einsum.defvjp(_low_einsum_fwd, _low_einsum_bwd)


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
        return einsum("...i,ij->...j", lhs, rhs, dtype)

    return dot
