"""Level-1 BLAS routines from SciPy by dtype, imported on first use (importing
`scipy.linalg` costs about 0.25 s, which `import fedloom` should not pay).

`dot(dtype)` gives `f(x, y) -> float`, the inner product; `axpy(dtype)` gives
`f(x, y, a=...) -> y`, `y += a * x` in place for a contiguous `y`. Both return None for a dtype
BLAS does not cover (float16): callers then use NumPy. Neither sets NumPy's floating-point error
state, so an overflow yields `inf` without a warning.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np


@functools.cache
def _routines() -> dict[tuple[str, np.dtype[Any]], Callable[..., Any]]:
    from scipy.linalg import blas

    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    return {
        ("dot", f32): blas.sdot,
        ("dot", f64): blas.ddot,
        ("axpy", f32): blas.saxpy,
        ("axpy", f64): blas.daxpy,
    }


def dot(dtype: np.dtype[Any]) -> Callable[..., float] | None:
    """The BLAS inner product for `dtype`, or None."""
    return _routines().get(("dot", dtype))


def axpy(dtype: np.dtype[Any]) -> Callable[..., Any] | None:
    """The BLAS `y += a * x` for `dtype`, or None."""
    return _routines().get(("axpy", dtype))
