"""One ``xp`` fixture over every installed backend.

``GRADCLIP_TEST_BACKENDS`` (comma-separated, set by each nox session) narrows
the list; without it every installed backend is used. CuPy and ``torch_cuda``
(torch tensors on the current CUDA device) are only exercised where a CUDA
device exists; elsewhere their cases skip with the reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

ALL_BACKENDS = ("numpy", "array_api_strict", "torch", "torch_cuda", "jax", "jax64", "dask", "cupy")
_MODULE = {"jax64": "jax", "dask": "dask.array", "torch_cuda": "torch"}


def _installed(name: str) -> bool:
    module = _MODULE.get(name, name)
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def selected_backends() -> list[str]:
    env = os.environ.get("GRADCLIP_TEST_BACKENDS")
    names = [n.strip() for n in env.split(",") if n.strip()] if env else list(ALL_BACKENDS)
    unknown = set(names) - set(ALL_BACKENDS)
    if unknown:
        raise ValueError(f"GRADCLIP_TEST_BACKENDS: unknown backends {sorted(unknown)}")
    return [n for n in names if _installed(n)]


def _cupy_device_reason() -> str | None:
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return None
    except Exception as exc:  # CUDA driver missing: cupy raises its own errors
        return f"CuPy has no CUDA device here ({type(exc).__name__})"
    return "CuPy has no CUDA device here"


@dataclass
class Backend:
    """One array library as the tests see it."""

    name: str
    ns: Any  # the array namespace (what gradclip uses internally)
    dtypes: tuple[str, ...]
    mutable: bool
    _to: Any = field(repr=False)
    _from: Any = field(repr=False)

    def array(self, a: Any, dtype: str | None = None) -> Any:
        """A backend array holding the values of ``a`` (cast to ``dtype``)."""
        a = np.asarray(a)
        if dtype is not None:
            a = a.astype(np_dtype(dtype))
        return self._to(a)

    def numpy(self, a: Any) -> np.ndarray:
        """Back to NumPy (bfloat16 becomes float32)."""
        return self._from(a)

    def has(self, dtype: str) -> bool:
        return dtype in self.dtypes

    def __str__(self) -> str:
        return self.name


def np_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


FLOATS = ("float16", "bfloat16", "float32", "float64", "complex64", "complex128")


def _make_numpy() -> Backend:
    import array_api_compat.numpy as ns

    dtypes = FLOATS if _installed("ml_dtypes") else tuple(d for d in FLOATS if d != "bfloat16")
    return Backend("numpy", ns, dtypes, True, lambda a: a.copy(), _np_from)


def _np_from(a: Any) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype.name == "bfloat16" else a


def _make_strict() -> Backend:
    import array_api_strict as ns

    dtypes = ("float32", "float64", "complex64", "complex128")
    return Backend("array_api_strict", ns, dtypes, True, ns.asarray, lambda a: np.asarray(a))


def _make_torch(device: str = "cpu") -> Backend:
    import array_api_compat.torch as ns
    import torch

    def to(a: np.ndarray) -> Any:
        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.astype(np.float32)).to(device, torch.bfloat16)
        return torch.from_numpy(a.copy()).to(device)

    def back(t: Any) -> np.ndarray:
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()

    name = "torch" if device == "cpu" else "torch_cuda"
    return Backend(name, ns, FLOATS, True, to, back)


def _torch_cuda_reason() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "torch sees no CUDA device here"


def _make_jax(x64: bool) -> Backend:
    import jax.numpy as jnp

    dtypes = FLOATS if x64 else ("float16", "bfloat16", "float32", "complex64")

    def to(a: np.ndarray) -> Any:
        if a.dtype.name == "bfloat16":
            return jnp.asarray(a.astype(np.float32)).astype(jnp.bfloat16)
        return jnp.asarray(a)

    def back(a: Any) -> np.ndarray:
        if a.dtype == jnp.bfloat16:
            a = a.astype(jnp.float32)
        return np.asarray(a)

    return Backend("jax64" if x64 else "jax", jnp, dtypes, False, to, back)


def _make_dask() -> Backend:
    import array_api_compat.dask.array as ns
    import dask.array as da

    dtypes = ("float16", "float32", "float64", "complex64", "complex128")

    def back(a: Any) -> np.ndarray:
        # dask evaluates lazily, so NumPy's warnings for inf * 0 (which the
        # "propagate" policy performs on purpose) surface here, at compute time.
        with np.errstate(all="ignore"):
            return np.asarray(a)

    return Backend("dask", ns, dtypes, False, lambda a: da.from_array(a.copy(), chunks=-1), back)


def _make_cupy() -> Backend:
    import array_api_compat.cupy as ns
    import cupy

    dtypes = ("float16", "float32", "float64", "complex64", "complex128")
    return Backend("cupy", ns, dtypes, True, cupy.asarray, cupy.asnumpy)


_FACTORIES = {
    "numpy": _make_numpy,
    "array_api_strict": _make_strict,
    "torch": _make_torch,
    "torch_cuda": lambda: _make_torch("cuda"),
    "jax": lambda: _make_jax(False),
    "jax64": lambda: _make_jax(True),
    "dask": _make_dask,
    "cupy": _make_cupy,
}


@pytest.fixture(params=selected_backends())
def xp(request: pytest.FixtureRequest) -> Any:
    """The backend under test: a :class:`Backend` with its namespace in ``.ns``."""
    name = request.param
    device_reason = {"cupy": _cupy_device_reason, "torch_cuda": _torch_cuda_reason}.get(name)
    reason = device_reason and device_reason()
    if reason:
        pytest.skip(reason)
    backend = _FACTORIES[name]()
    if name.startswith("jax"):
        import jax

        previous = jax.config.jax_enable_x64
        jax.config.update("jax_enable_x64", name == "jax64")
        try:
            yield backend
        finally:
            jax.config.update("jax_enable_x64", previous)
    else:
        yield backend


@pytest.fixture
def mutable_xp(xp: Backend) -> Backend:
    """Backends whose arrays can be clipped in place."""
    if not xp.mutable:
        pytest.skip(
            f"{xp.name} arrays are immutable; in-place forms reject them (tested separately)"
        )
    return xp


def need(xp: Backend, *dtypes: str) -> None:
    """Skip when the backend lacks one of ``dtypes``."""
    missing = [d for d in dtypes if not xp.has(d)]
    if missing:
        pytest.skip(f"{xp.name} has no {', '.join(missing)}")


def _wide(x: Any) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def ref_norm(leaves: list[np.ndarray], ord: float) -> float:
    """float64 NumPy reference with torch's get_total_norm semantics."""
    mags = [np.abs(_wide(x)).ravel() for x in leaves]
    if not mags or sum(m.size for m in mags) == 0:
        return 0.0
    if ord == 0:
        return float(sum(1 for m in mags if np.count_nonzero(m)))
    flat = np.concatenate(mags)
    if np.isinf(ord):
        return float(flat.max() if ord > 0 else flat.min())
    top = flat.max()
    if top == 0 or not np.isfinite(top):
        return float(np.sum(flat**ord) ** (1 / ord))
    return float(top * np.sum((flat / top) ** ord) ** (1 / ord))


def importorskip(name: str) -> Any:
    """Like pytest.importorskip, but checks the spec first (no warnings)."""
    if not _installed(name):
        pytest.skip(f"{name} is not installed", allow_module_level=True)
    return importlib.import_module(name)


def assert_host_tail_is_array_tail(monkeypatch, plan_cls, norm_of, clip, as_bytes) -> None:
    """The host tail (``Plan.host_total``, ``Plan.host_clip``) has the 0-d array tail's bits.

    Where a fast path's plan reduced every leaf into one float sum, the norm,
    and a clip's norm and scale, come from it in NumPy scalars. ``norm_of()``
    is the tree's global norm; ``clip(max_norm, eps)`` clips fresh copies in
    place and returns ``(stats, grads)``; ``as_bytes`` gives an array's bits.
    Bounds either side of the norm and at it, with and without eps.
    """
    from gradclip import _core

    with monkeypatch.context() as m:
        m.setattr(plan_cls, "total", lambda *a: pytest.fail("the array tail ran"))
        quick = norm_of()
    with monkeypatch.context() as m:
        m.setattr(plan_cls, "host_total", lambda *a: None)
        want = norm_of()
    assert (quick.dtype, as_bytes(quick)) == (want.dtype, as_bytes(want))
    norm = float(quick)
    top = float(np.finfo(np.float64 if "64" in str(quick.dtype) else np.float32).max) / 2
    calls = []
    tail = _core._scale_from_norm
    monkeypatch.setattr(_core, "_scale_from_norm", lambda *a: calls.append(1) or tail(*a))
    for max_norm in (1e-30, 0.1, norm / 3, norm, norm * (1 + 1e-7), 2 * norm, 1e300):
        for eps in (0.0, 1e-6):
            calls.clear()
            stats, grads = clip(max_norm, eps)
            with monkeypatch.context() as m:
                m.setattr(plan_cls, "host_clip", lambda *a: None)
                want_stats, want_grads = clip(max_norm, eps)
            assert len(calls) == 1 + (max_norm >= top)  # the host tail, where it can
            for got, ref in zip(stats, want_stats, strict=True):
                assert got.shape == ()
                assert (got.dtype, as_bytes(got)) == (ref.dtype, as_bytes(ref)), (max_norm, eps)
            assert list(map(as_bytes, grads)) == list(map(as_bytes, want_grads))
            if max_norm <= norm / 3 or max_norm >= 2 * norm:  # well away from the norm
                assert bool(stats.clipped) == (max_norm <= norm / 3)
