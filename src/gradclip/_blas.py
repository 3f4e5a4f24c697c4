"""BLAS ``dsdot`` from the library NumPy links: float32 dots added in float64.

``np.dot`` of float32 vectors is BLAS ``sdot``, which adds in float32: after a
large square, the small ones round away (one 4096 among 131071 ones: a sum
of squares 1.2e-4 off). ``dsdot`` takes the same float32 vectors and returns
a float64 sum. OpenBLAS adds each 32-element block in float32 and the blocks
in float64, so its error stays near 2e-7 whatever the length or the spread
of the values. It runs at memory speed, as fast as ``sdot`` here, and
releases the GIL, since ctypes does around every foreign call.

NumPy does not expose it, so it is found through ctypes in the BLAS library
NumPy has loaded (or bundles). Only the ILP64 symbols are tried, where the
integer arguments are certainly 64-bit. The function found must pass
:func:`accurate` before it is used. Without one, float32 leaves are widened
to float64 before the dot, which is exact but slower.

:func:`short_sdot` checks the other way to stay accurate in float32: dots
short enough that each lane of the kernel adds only a few squares.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from collections.abc import Callable, Iterator

import numpy as np

__all__ = ["PIECE", "Dsdot", "accurate", "dsdot", "short_sdot"]

# (n, x, x stride, y, y stride) -> the float64 sum of x * y; x and y are
# addresses, or bytes (ctypes passes their own).
Dsdot = Callable[[int, int | bytes, int, int | bytes, int], float]

# NumPy's wheels link scipy-openblas (ILP64 symbols with a suffix); MKL's
# ILP64 interface has the _64 suffix.
_NAMES = ("scipy_cblas_dsdot64_", "cblas_dsdot64_", "cblas_dsdot_64")
_TOLERANCE = 2.0**-20  # relative, on a sum of squares: 5e-7 on the norm
# The longest vector gradclip._numpy hands dsdot, and the length it is checked at.
PIECE = 1 << 20


def _libraries() -> Iterator[str]:
    """Paths of BLAS libraries NumPy has loaded (Linux) or bundles (its wheels)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and "blas" in os.path.basename(fields[5]).lower():
                    yield fields[5].strip()
    except OSError:  # not Linux
        pass
    root = os.path.dirname(np.__file__)
    for pattern in ("../numpy.libs/*blas*", ".dylibs/*blas*"):
        yield from sorted(glob.glob(os.path.join(root, pattern)))


def accurate(sumsq: Callable[[np.ndarray], float], n: int) -> bool:
    """Whether ``sumsq`` adds float32 squares to within 2**-20, on vectors of up to ``n``.

    The vectors are the cases that float32 accumulation gets wrong: one
    large square before many small ones (``sdot`` over 131072 entries:
    1.2e-4 off; 32 lanes of 8 entries each: 4e-7), values falling from 1e8
    to 1e-8, and lengths that leave a kernel's tail.
    """
    one_big = np.ones(n, np.float32)
    one_big[0] = 4096.0
    spread = np.exp(np.linspace(18.0, -18.0, n)).astype(np.float32)
    for x in (one_big, spread, spread[:1], spread[:31], spread[:33], spread[1::2]):
        x = np.ascontiguousarray(x)
        wide = x.astype(np.float64)
        want = float(np.dot(wide, wide))  # float32 squares are exact in float64
        if not abs(sumsq(x) - want) <= _TOLERANCE * want:
            return False
    return sumsq(one_big[:0]) == 0.0


def _call(fn: Dsdot) -> Callable[[np.ndarray], float]:
    return lambda x: fn(x.size, x.ctypes.data, 1, x.ctypes.data, 1)


@functools.cache
def dsdot() -> Dsdot | None:
    """The BLAS ``dsdot`` NumPy's library has, if it passes :func:`accurate`; else ``None``."""
    for path in dict.fromkeys(_libraries()):  # in order, once each
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _NAMES:
            fn = getattr(lib, name, None)
            if fn is None:
                continue
            fn.restype = ctypes.c_double
            n, address = ctypes.c_int64, ctypes.c_void_p  # n and strides: 64-bit (ILP64)
            fn.argtypes = [n, address, n, address, n]
            if accurate(_call(fn), PIECE):
                return fn  # type: ignore[no-any-return]
    return None


@functools.cache
def short_sdot(n: int) -> bool:
    """Whether ``np.dot`` of float32 vectors of up to ``n`` entries passes :func:`accurate`.

    BLAS kernels add in many lanes at once (OpenBLAS's AVX2 ``sdot``: 32),
    so a short vector puts only a few squares in each lane: 256 entries,
    8 each, an error of at most about 13 float32 roundings (8e-7).
    """
    return accurate(lambda x: float(np.dot(x, x)), n)
