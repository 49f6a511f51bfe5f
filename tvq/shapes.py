"""Static shape checks that raise `ValueError` naming expected and actual shapes.

Shapes are static under `jit`, `pmap` and `shard_map`, so these checks run at
trace time and cost nothing at run time.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def check_shape(
    name: str, array, axes: str, known: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Check `array` has one dimension per letter of `axes`, agreeing with `known`.

    Args:
      name: how the error message refers to the array, e.g. "vecs".
      array: anything with a `.shape` (or a Python scalar/sequence).
      axes: one letter per dimension, e.g. "BHLK".
      known: sizes already fixed by other arguments, e.g. {"H": 3}.

    Returns:
      `known` extended with the sizes of this array's axes.
    """
    known = dict(known or {})
    shape = tuple(np.shape(array))
    wanted = ", ".join(f"{a}={known[a]}" if a in known else a for a in axes)
    if len(shape) != len(axes) or any(
        a in known and known[a] != n for a, n in zip(axes, shape, strict=True)
    ):
        raise ValueError(
            f"{name} must have shape [{wanted}] ({len(axes)} dims), "
            f"got shape {list(shape)}"
        )
    return known | dict(zip(axes, shape, strict=True))


def check_scalar(name: str, array) -> None:
    """Check `array` holds exactly one number: shape [] or [1]."""
    shape = tuple(np.shape(array))
    if shape not in ((), (1,)):
        raise ValueError(f"{name} must have shape [] or [1], got shape {list(shape)}")


def check_integer(name: str, array) -> None:
    """Check `array` has an integer dtype (indices such as shortcodes)."""
    dtype = array.dtype if hasattr(array, "dtype") else np.asarray(array).dtype
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{name} must have an integer dtype, got {dtype}")
