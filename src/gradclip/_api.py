"""Public functions: validation, namespace inference and dispatch.

Each function flattens the tree, checks every leaf (naming the offending one
by its pytree path), picks the implementation, and rebuilds the tree. The
arithmetic lives in :mod:`gradclip._core` (the generic array-API reference)
or in a backend fast path registered in ``_FAST_PATHS``.
"""

from __future__ import annotations

import functools
import importlib
import math
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np

from . import _compat, _core
from ._flat import FlatTree, structure, unit
from ._norms import parse_ord
from ._stats import ClipStats, PerExampleStats
from ._tree import Flat, flatten

__all__ = [
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_global_norm_",
    "clip_by_norm",
    "clip_by_norm_",
    "clip_by_value",
    "clip_by_value_",
    "global_norm",
    "leaf_norms",
    "per_example_clip",
]

NONFINITE = ("propagate", "raise", "zero", "skip")

# backend name -> module implementing the functions of ``_core`` faster.
# A module is imported only when a tree of that backend is clipped.
_FAST_PATHS: dict[str, str] = {
    "numpy": "._numpy",
    "jax": ".jax._fast",
    "cupy": ".cupy._fast",
    "torch": ".torch._fast",
}


_F = TypeVar("_F", bound=Callable[..., Any])
_modules = sys.modules
_disable: Any = None  # torch.compiler.disable, once Dynamo is seen loaded


def _dynamo_disable() -> Any:
    """``torch.compiler.disable`` where Dynamo is loaded, else ``None``; kept once found.

    Kept so that traced calls read no ``sys.modules``: Dynamo wraps a dict
    it reads item by item, and a module imported meanwhile (``dictionary
    changed size during iteration``) failed the compile.
    """
    global _disable
    if _disable is None and _modules.get("torch._dynamo") is not None:
        _disable = _modules["torch"].compiler.disable
    return _disable


def _eager(fn: _F) -> _F:
    """``fn`` run eagerly under ``torch.compile`` (a graph break), as gradclip.torch's drop-ins.

    Dynamo traced into gradclip, into the NumPy views of the torch CPU path,
    and failed inside itself (``AssertionError: Expected np.nditer base``).
    ``import gradclip`` imports no torch, so ``torch.compiler.disable`` is
    applied at the first call once Dynamo is loaded; before that nothing can
    be compiling. Not ``torch.compiler.is_compiling()``: it is False in the
    frames a graph break runs, yet Dynamo compiles the frames they call.
    """
    disabled: Any = None

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal disabled
        if disabled is None:
            disable = _dynamo_disable()
            if disable is None:
                return fn(*args, **kwargs)
            disabled = disable(fn)
        return disabled(*args, **kwargs)

    return cast(_F, wrapper)


@dataclass(frozen=True)
class _Prepared:
    flat: Flat
    xp: Any  # None for a tree with no array leaves
    backend: str


def _describe(x: Any) -> str:
    return type(x).__module__.split(".")[0] + "." + type(x).__qualname__


def _prepare(tree: Any, fn: str, *, inplace: bool = False, whole: bool = False) -> _Prepared:
    """Flatten ``tree`` and check every leaf before anything is computed or written.

    ``whole``: the result does not depend on where one leaf ends and the next
    begins, so a :class:`~gradclip.FlatTree` is processed as its buffers.
    """
    return _check(unit(tree, whole=whole), fn, inplace=inplace)


def _check(flat: Flat, fn: str, *, inplace: bool = False, gradients: bool = False) -> _Prepared:
    """Check every leaf of a flattened tree (see :func:`_prepare`).

    ``gradients``: the leaves are ``.grad`` tensors (gradclip.torch), which
    may require grad (a double backward) without being parameters.
    """
    backend = _plain(flat.leaves, inplace, gradients) if flat.leaves else None
    if backend is not None:
        return _Prepared(flat, _compat.namespace(flat.leaves[0]), backend)
    paths = flat.paths  # computed only if an error message needs them
    xp: Any = None
    backend = ""
    first = placed = 0
    where: Any = None
    checked: type | None = None  # trees hold thousands of leaves of one type
    good_dtypes: set[Any] = set()
    for i, x in enumerate(flat.leaves):
        kind = type(x)
        if kind is not checked:
            if not _compat.is_array(x):
                # A str leaf is most often the name half of named_parameters().
                hint = (
                    "; for named_parameters() pairs pass the gradients by name, "
                    "{name: p.grad for name, p in model.named_parameters()}"
                    if isinstance(x, str)
                    else ""
                )
                raise TypeError(f"{fn}: leaf {paths[i]} is a {_describe(x)}, not an array{hint}")
            if isinstance(x, np.ma.MaskedArray):
                # The fast path reads the raw buffer, masked entries too; the
                # generic one would follow np.ma's rules: two answers, so neither.
                raise TypeError(
                    f"{fn}: leaf {paths[i]} is a numpy.ma.MaskedArray; gradclip does not apply "
                    "masks: pass leaf.filled(0) to clip only the unmasked entries"
                )
            leaf_xp = _compat.namespace(x)
            name = _compat.backend_name(leaf_xp)
            if xp is None:
                xp, backend, first = leaf_xp, name, i
            elif name != backend:
                raise TypeError(
                    f"{fn}: leaf {paths[i]} is a {name} array but leaf {paths[first]} is a "
                    f"{backend} array; one call clips arrays of one library"
                )
            if inplace and name in _compat.IMMUTABLE_BACKENDS:
                raise TypeError(
                    f"{fn}: leaf {paths[i]} is a {name} array, which cannot be modified in place; "
                    f"use the functional form {fn.rstrip('_')}, which returns new arrays"
                )
            checked = kind
        if x.dtype not in good_dtypes:
            if _compat.dtype_info(xp, x.dtype) is None:
                raise TypeError(
                    f"{fn}: leaf {paths[i]} has dtype {x.dtype}; gradients must be "
                    "float16, bfloat16, float32, float64, complex64 or complex128"
                )
            good_dtypes.add(x.dtype)
        if backend == "torch" and x.layout is not _compat.torch_strided():
            raise TypeError(
                f"{fn}: leaf {paths[i]} is a {x.layout} tensor; gradclip clips dense (strided) "
                "tensors, as torch's clip_grad_norm_ does (convert with .to_dense())"
            )
        if kind is not np.ndarray:  # NumPy arrays all live on the host
            key = _compat.device_key(x)
            if where is None:
                where, placed = key, i
            elif key is not None and key != where:
                raise ValueError(
                    f"{fn}: leaf {paths[i]} is on {_fmt_device(key)} but leaf {paths[placed]} is "
                    f"on {_fmt_device(where)}; move them to one device first"
                )
        if inplace and backend == "torch" and x.requires_grad and x.is_leaf and not gradients:
            # model.parameters() where gradients belong, as torch's
            # clip_grad_norm_ and timm's adaptive_clip_grad take them: clipped
            # in place, the weights would change and their .grad would not.
            raise ValueError(
                f"{fn}: leaf {paths[i]} is a tensor that requires grad: a parameter, not a "
                "gradient. Pass the gradients ([p.grad for p in model.parameters()]) or use "
                "gradclip.torch.clip_grad_norm_(model.parameters(), max_norm); to clip the "
                "weights themselves, pass p.detach()"
            )
        if inplace and not (kind is np.ndarray and x.flags.writeable and x.flags.c_contiguous):
            problem = _compat.writable_problem(x)
            if problem is not None:
                raise ValueError(f"{fn}: leaf {paths[i]} {problem}; it cannot be clipped in place")
    return _Prepared(flat, xp, backend)


_dtype = operator.attrgetter("dtype")
_flag_bits = operator.attrgetter("flags.num")
_WRITABLE_C = 0x0001 | 0x0400  # NumPy's NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_WRITEABLE


_device_id = operator.attrgetter("data.device_id")
_requires_grad = operator.attrgetter("requires_grad")
_device = operator.attrgetter("device")
_is_cpu = operator.attrgetter("is_cpu")
_layout = operator.attrgetter("layout")


def _plain(leaves: list[Any], inplace: bool, gradients: bool = False) -> str | None:
    """``"numpy"``, ``"cupy"`` or ``"torch"`` if every leaf is a valid array of it (no loop).

    Trees of thousands of small leaves are common and cheap to clip, so the
    per-leaf checks below would cost more than the clipping. ``None`` sends
    the tree through them, and they name the leaf at fault if there is one.
    A C-contiguous array has no zero strides, so it can be written in place.
    Each pass over 2000 tensors costs about 0.1 ms here.
    """
    kinds = set(map(type, leaves))
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if kind is np.ndarray:
        backend = "numpy"
    elif kind.__module__ == "cupy" and kind.__name__ == "ndarray":
        backend = "cupy"  # CuPy arrays have no read-only flag
    elif kind.__module__ == "torch" and kind.__name__ == "Tensor":
        backend = "torch"  # plain tensors (a .grad), not Parameters or DTensors
    else:
        return None
    xp = _compat.namespace(leaves[0])
    if not all(_compat.dtype_info(xp, d) is not None for d in set(map(_dtype, leaves))):
        return None
    if backend == "cupy" and len(set(map(_device_id, leaves))) != 1:
        return None
    if backend == "torch":
        tensor: Any = kind
        # (is_cpu first: reading .device makes a torch.device, twice the cost)
        one_device = all(map(_is_cpu, leaves)) or len(set(map(_device, leaves))) == 1
        if not one_device or {*map(_layout, leaves)} != {_compat.torch_strided()}:
            return None
        if inplace and (
            not all(map(tensor.is_contiguous, leaves))
            or any(map(tensor.is_inference, leaves))
            # parameters, where gradients belong? (see _check)
            or (not gradients and any(map(_requires_grad, leaves)))
        ):
            return None
        return backend
    if inplace:
        if backend == "numpy":  # both flags from one flags object, which costs 0.1 us a leaf
            if any(bits & _WRITABLE_C != _WRITABLE_C for bits in set(map(_flag_bits, leaves))):
                return None
        elif not _compat.cupy_c_contiguous(leaves):
            return None
    return backend


def _known_sizes(prep: _Prepared, fn: str) -> None:
    """Raise where a leaf's shape is not known until it is computed.

    dask gives NaN for such a dimension (after boolean indexing, say) and
    the array API ``None``. The global norms do not need the sizes; an rms
    (``clip_by_block_rms``) and a batch axis (``per_example_clip``) do, and
    would be NaN or fail in a cast without this.
    """
    if prep.backend in ("numpy", "cupy", "torch", "jax"):  # shapes always known
        return
    for i, x in enumerate(prep.flat.leaves):
        if any(map(_compat.unknown_size, x.shape)):
            raise ValueError(
                f"{fn}: leaf {prep.flat.paths[i]} has shape {tuple(x.shape)}, not known until "
                f"it is computed; {fn} needs each leaf's size (dask: x.compute_chunk_sizes())"
            )


def _numpy_buffer(tree: Any) -> np.ndarray | None:
    """The one writable NumPy array a tree is: a bare array, or a FlatTree's only buffer."""
    if isinstance(tree, FlatTree):
        buffers = tree._buffers
        tree = next(iter(buffers.values())) if len(buffers) == 1 else None
    if type(tree) is np.ndarray and tree.flags.writeable:
        return tree
    return None


def _working_copy(tree: Any, *bounds: Any) -> FlatTree | None:
    """A copy of a FlatTree for a functional call over its leaves to clip in place.

    Such a call's new leaves became a new FlatTree by a copy into new
    buffers: the result was held twice (512 MB for 256 MB of gradients). A
    copy clipped in place holds it once. ``None`` for any other tree, and
    where a buffer or a bound requires grad: the result must keep the
    autograd graph (``FlatTree._from_leaves`` joins such leaves), and an
    in-place clip does not.
    """
    if not isinstance(tree, FlatTree):
        return None
    if any(getattr(a, "requires_grad", False) for a in (*tree._buffers.values(), *bounds)):
        return None
    return tree.copy()


def _fmt_device(key: Any) -> str:
    if isinstance(key, frozenset):
        return ", ".join(sorted(str(d) for d in key))
    return str(key)


def _check_fused(fused: Any) -> None:
    if fused is not None and type(fused) is not bool:  # 1 == True, but 1 is not a flag
        raise TypeError(f"fused must be None, True or False; got {fused!r}")


def _impl(prep: _Prepared, fused: bool | None) -> Any:
    """The module that computes: a registered fast path, or the generic core."""
    _check_fused(fused)
    module = _FAST_PATHS.get(prep.backend)
    if fused is False or (module is None and fused is None):
        return _core
    if module is None:
        raise ValueError(
            f"fused=True, but there is no fast path for {prep.backend} arrays; "
            "use fused=None (fast path when there is one) or fused=False (generic path)"
        )
    return _load(module)


@functools.cache
def _load(module: str) -> Any:
    # Cached: import_module's lookup costs more than clipping a small tree.
    return importlib.import_module(module, __package__)


def _run(prep: _Prepared, fused: bool | None, fn: str, **kwargs: Any) -> Any:
    """Call ``fn`` of the chosen implementation on the prepared leaves.

    An array argument (a device bound, a given norm, a list of per-layer
    bounds) must come from the leaves' library: one from another would fail
    deep in the arithmetic. One on another device is moved beside them.
    """
    leaves = prep.flat.leaves

    def beside(name: str, value: Any) -> Any:
        if isinstance(value, int | float | str | None) or not _compat.is_array(value):
            return value
        other = _compat.backend_name(_compat.namespace(value))
        if other != prep.backend:
            raise TypeError(
                f"{name} is a {other} array but the leaves are {prep.backend} arrays; "
                f"pass it as a {prep.backend} array, or as numbers"
            )
        return _compat.beside(value, leaves[0])

    for name, given in kwargs.items():
        if isinstance(given, list):
            kwargs[name] = [beside(name, value) for value in given]
        else:
            kwargs[name] = beside(name, given)
    if kwargs.get("nonfinite") == "raise":  # the generic path would fail to read a trace
        _compat.refuse_traced_raise(fn, leaves)
    impl = getattr(_impl(prep, fused), fn)
    with _compat.quiet(prep.xp), _compat.current_device(leaves[0]):
        return impl(prep.xp, leaves, prep.flat.paths, **kwargs)


def _check_nonfinite(nonfinite: str, allowed: tuple[str, ...] = NONFINITE) -> str:
    if nonfinite not in allowed:
        raise ValueError(
            f"nonfinite must be one of {', '.join(map(repr, allowed))}; got {nonfinite!r}"
        )
    return nonfinite


def _scalar_bound(value: Any, name: str, *, allow_array: bool = True) -> Any:
    """A bound as a float, or a 0-d device array: its value unchecked, as reading it would sync."""
    if type(value) is float:  # the common case, without the array checks
        return value
    device = _compat.is_array(value) and not isinstance(value, np.ndarray | np.generic)
    number = isinstance(value, int | float | np.number | np.ndarray) and not isinstance(value, bool)
    if not (number or (device and allow_array)):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}")
    if not _real(value, device):
        # float() would take np.array(True) as 1, np.array("2.5") as 2.5, and
        # drop a complex number's imaginary part with a warning
        raise TypeError(f"{name} must be a real number; got one of dtype {value.dtype}")
    shape = tuple(getattr(value, "shape", ()))  # known without a sync
    if shape:
        what = "a number or a 0-d array" if allow_array else "a number"
        raise ValueError(f"{name} must be {what}; got an array of shape {shape}")
    if device:
        return value
    try:
        return float(value)
    except OverflowError:  # an int past float64: inf, as a float past float32 rounds
        return math.inf if value > 0 else -math.inf


def _real(value: Any, device: bool) -> bool:
    """Whether a bound's dtype, if it has one, is an integer or real floating one."""
    if device:
        xp = _compat.namespace(value)
        return bool(xp.isdtype(value.dtype, ("integral", "real floating")))
    dtype = getattr(value, "dtype", None)
    return dtype is None or dtype.kind in "iuf"


def _host_value(v: Any) -> float | None:
    """A checked bound's value where reading it is free: a number, or a CPU tensor's."""
    if isinstance(v, float):
        return v
    if type(v).__module__ == "torch" and v.device.type == "cpu":
        try:
            return float(v.detach())  # no device to wait for (a device array is used unread)
        except RuntimeError:  # a value inside torch.func.vmap has none to read
            return None
    return None


def _check_bound(value: Any, name: str, *, allow_array: bool = True) -> Any:
    """A bound ``>= 0`` (not NaN), or a 0-d device array (see :func:`_scalar_bound`)."""
    v = _scalar_bound(value, name, allow_array=allow_array)
    h = _host_value(v)
    if h is not None and not h >= 0:
        raise ValueError(f"{name} must be a number >= 0; got {value!r}")
    return v


def _check_eps(eps: Any) -> float:
    e = _check_bound(eps, "eps", allow_array=False)
    if math.isinf(e):
        raise ValueError(f"eps must be finite; got {eps!r}")
    return float(e)


def _empty_stats(per_leaf: bool) -> ClipStats:
    shape = (0,) if per_leaf else ()
    return ClipStats(
        norm=np.zeros(shape, np.float32),
        scale=np.ones(shape, np.float32),
        clipped=np.zeros(shape, bool),
        finite=np.ones(shape, bool),
    )


# ---------------------------------------------------------------------------- norms


@_eager
def global_norm(
    tree: Any, ord: float = 2.0, *, nonfinite: str = "propagate", fused: bool | None = None
) -> Any:
    """The norm of all leaves of ``tree`` taken as one vector.

    Parameters
    ----------
    tree : pytree of arrays
        NumPy, CuPy, JAX, PyTorch, dask or array-API-strict arrays, all of one
        library and on one device. ``None`` leaves are skipped; an iterator
        (such as a generator of gradients) is consumed once.
    ord : float, default 2.0
        Any ``p > 0``, ``inf``, ``-inf`` or ``0``, with the results of
        ``torch.nn.utils.get_total_norm``: the ``ord``-norm of the vector of
        per-leaf norms. For ``ord=0`` that is the number of leaves holding any
        nonzero entry, as in torch. One exception: for ``ord=-inf`` (the
        smallest ``|x|``) an empty leaf holds no entry and is left out, where
        :func:`leaf_norms` gives it 0 (torch refuses both).
    nonfinite : {"propagate", "raise", "zero"}, default "propagate"
        ``"propagate"`` lets NaN/inf through the arithmetic; ``"raise"`` raises
        :class:`~gradclip.NonFiniteError` naming the leaf (one host sync, so
        not under ``jax.jit``), or where every value is finite but the norm
        overflows its dtype (float32 gradients near 1e38);
        ``"zero"`` treats NaN/inf entries as 0.
    fused : bool or None, default None
        ``None`` uses a backend fast path when there is one, ``True`` requires
        one, ``False`` uses the generic array-API path.

    Returns
    -------
    array
        0-d, in the leaves' namespace and on their device: float32 for
        float16/bfloat16/float32 trees, float64 when any leaf is float64 or
        complex128. It does not overflow or underflow while the true norm is
        representable (torch and optax return inf or 0 for float32 leaves of
        1e30 or 1e-30). An empty tree has norm 0.

    Examples
    --------
    >>> import numpy as np
    >>> import gradclip as gc
    >>> grads = {"w": np.array([3.0, 4.0], np.float32), "b": None}
    >>> gc.global_norm(grads)
    array(5., dtype=float32)
    >>> gc.global_norm([np.full(4, 1e30, np.float32)])  # float32 overflows at ~3e38
    array(2.e+30, dtype=float32)
    >>> gc.global_norm(grads, ord=float("inf"))
    array(4., dtype=float32)
    """
    return _global_norm("global_norm", tree, ord, nonfinite=nonfinite, fused=fused)


def _global_norm(
    fn: str, tree: Any, ord: float, *, nonfinite: str, fused: bool | None, **extra: Any
) -> Any:
    """:func:`global_norm`; ``extra`` goes to the implementation (``axis_name`` for JAX)."""
    p = parse_ord(ord)
    _check_nonfinite(nonfinite, ("propagate", "raise", "zero"))
    prep = _prepare(tree, fn, whole=p != 0 and nonfinite != "raise")
    if prep.xp is None:
        return _empty_stats(False).norm
    return _run(prep, fused, "global_norm", p=p, nonfinite=nonfinite, **extra)


@_eager
def leaf_norms(
    tree: Any, ord: float = 2.0, *, nonfinite: str = "propagate", fused: bool | None = None
) -> Any:
    """The norm of each leaf, as a 1-d array in flattening order.

    Flattening order is optree's and ``jax.tree_util``'s: sequences in order,
    dict keys sorted, ``None`` leaves skipped.

    Parameters
    ----------
    tree : pytree of arrays
        As for :func:`global_norm`.
    ord : float, default 2.0
        As for :func:`global_norm`; ``ord=0`` counts each leaf's nonzeros.
    nonfinite : {"propagate", "raise", "zero"}, default "propagate"
        As for :func:`global_norm`.
    fused : bool or None, default None
        As for :func:`global_norm`.

    Returns
    -------
    array
        Shape ``(n_leaves,)``, same dtype rule as :func:`global_norm` (one
        dtype for all entries).

    Examples
    --------
    >>> import numpy as np
    >>> import gradclip as gc
    >>> gc.leaf_norms({"a": np.array([3.0, 4.0]), "b": np.array([-2.0])})
    array([5., 2.])
    """
    p = parse_ord(ord)
    _check_nonfinite(nonfinite, ("propagate", "raise", "zero"))
    prep = _prepare(tree, "leaf_norms")
    if prep.xp is None:
        return _empty_stats(True).norm
    return _run(prep, fused, "leaf_norms", p=p, nonfinite=nonfinite)


# ------------------------------------------------------------------ norm clipping


def _clip_norm(
    fn: str,
    tree: Any,
    max_norm: Any,
    *,
    ord: float,
    eps: float,
    nonfinite: str,
    norm: Any,
    fused: bool | None,
    inplace: bool,
    per_leaf: bool,
    **extra: Any,
) -> tuple[Any, ClipStats]:
    """The norm-clipping functions; ``extra`` goes to the implementation."""
    p = parse_ord(ord)
    max_norm = _check_bound(max_norm, "max_norm")
    eps = _check_eps(eps)
    _check_nonfinite(nonfinite)
    _check_fused(fused)  # here too: the one-buffer lane below does not reach _impl
    if not per_leaf and norm is not None:
        # One global norm; a 1-d array would broadcast into per-entry scales.
        norm = _scalar_bound(norm, f"{fn}: norm= (the global norm)")
    if inplace and not per_leaf and p == 2 and nonfinite == "propagate" and norm is None:
        buffer = _numpy_buffer(tree)
        if buffer is not None and fused is not False and isinstance(max_norm, float) and not extra:
            # One NumPy buffer: the fast path's lane for it, without the tree
            # machinery (None where the full path must do it).
            with _compat.quiet(np):
                stats = _load(_FAST_PATHS["numpy"]).clip_buffer_(buffer, max_norm, eps)
            if stats is not None:
                return tree, stats
    whole = not per_leaf and p != 0 and nonfinite != "raise"
    copy = None if inplace or whole else _working_copy(tree, max_norm, norm)
    if copy is not None:
        kwargs = dict(ord=ord, eps=eps, nonfinite=nonfinite, norm=norm, fused=fused)
        stats = _clip_norm(fn, copy, max_norm, **kwargs, inplace=True, per_leaf=per_leaf, **extra)
        return copy, stats[1]
    prep = _prepare(tree, fn, inplace=inplace, whole=whole)
    if prep.xp is None:
        return prep.flat.unflatten([]), _empty_stats(per_leaf)
    leaves, stats = _run(
        prep,
        fused,
        "clip_by_norm" if per_leaf else "clip_by_global_norm",
        max_norm=max_norm,
        p=p,
        eps=eps,
        nonfinite=nonfinite,
        norm=norm,
        inplace=inplace,
        **extra,
    )
    return prep.flat.unflatten(leaves), stats


_NORM_CLIP_PARAMS = """
    Parameters
    ----------
    tree : pytree of arrays
        As for :func:`global_norm`.
    max_norm : float or 0-d array
        The largest norm allowed, ``>= 0``. A Python or NumPy number, or a
        CPU tensor, is checked (negative or NaN raises ``ValueError``); a
        device array is used as is, since checking it would need a host sync.
    ord : float, default 2.0
        As for :func:`global_norm`.
    eps : float, default 1e-6
        Added to the norm before dividing, as torch does. optax's
        ``clip_by_global_norm`` has no eps: pass ``eps=0`` to match it.
    nonfinite : {"propagate", "raise", "zero", "skip"}, default "propagate"
        ``"propagate"``: torch's arithmetic (a NaN norm makes NaN gradients).
        ``"raise"``: raise :class:`~gradclip.NonFiniteError` naming the leaf
        before anything is modified (one host sync, so not under ``jax.jit``),
        also where the norm overflows though every value is finite (its scale
        of 0 would zero the gradients). ``"zero"``: NaN/inf entries become 0
        before the norm. ``"skip"``: if anything is
        non-finite, leaves are left unchanged and ``stats.finite`` is False;
        no sync (:func:`clip_by_norm` decides it per leaf).
    norm : array or float, optional
        A norm computed elsewhere (for example already all-reduced across
        processes); the leaves are then only scaled, not reduced. The
        ``nonfinite`` policies and ``stats.finite`` then look at that norm,
        not the leaves: a NaN entry anywhere makes an all-reduced 2-norm NaN,
        but a NaN leaf beside a finite given norm is scaled as it is.
    fused : bool or None, default None
        As for :func:`global_norm`."""


@_eager
def clip_by_global_norm(
    tree: Any,
    max_norm: Any,
    *,
    ord: float = 2.0,
    eps: float = 1e-6,
    nonfinite: str = "propagate",
    norm: Any = None,
    fused: bool | None = None,
) -> tuple[Any, ClipStats]:
    """Scale all leaves together so that their global norm is at most ``max_norm``.

    Every leaf is multiplied, in its own dtype, by
    ``scale = min(1, max_norm / (norm + eps))`` (float16 and bfloat16 leaves
    by the float32 scale, rounded once, as torch does); there is no Python branch on
    the value, so this runs under ``jax.jit`` and forces no host sync. This is
    ``torch.nn.utils.clip_grad_norm_`` (same result within 1e-6) and
    ``optax.clip_by_global_norm`` (which has no ``eps``), with a norm that does
    not overflow in float16/bfloat16/float32.
    {params}

    Returns
    -------
    tree : pytree
        New arrays, same structure as ``tree``.
    stats : ClipStats
        ``norm`` (before clipping), ``scale``, ``clipped`` and ``finite``.

    See Also
    --------
    clip_by_global_norm_ : the in-place form for NumPy, CuPy and torch.

    Examples
    --------
    >>> import numpy as np
    >>> import gradclip as gc
    >>> grads = {{"w": np.array([3.0, 4.0]), "b": np.array([0.0])}}
    >>> clipped, stats = gc.clip_by_global_norm(grads, max_norm=1.0)
    >>> clipped["w"]
    array([0.6, 0.8])
    >>> float(stats.norm), bool(stats.clipped)
    (5.0, True)
    """
    return _clip_norm(
        "clip_by_global_norm",
        tree,
        max_norm,
        ord=ord,
        eps=eps,
        nonfinite=nonfinite,
        norm=norm,
        fused=fused,
        inplace=False,
        per_leaf=False,
    )


@_eager
def clip_by_global_norm_(
    tree: Any,
    max_norm: Any,
    *,
    ord: float = 2.0,
    eps: float = 1e-6,
    nonfinite: str = "propagate",
    norm: Any = None,
    fused: bool | None = None,
) -> ClipStats:
    """In-place :func:`clip_by_global_norm` for NumPy, CuPy and torch arrays.

    Every leaf is checked before any is written: read-only buffers, leaves
    whose elements overlap (a zero stride), JAX or dask arrays, and any
    invalid argument raise with nothing modified. Two leaves that share
    memory (the same array twice) are not detected: both count in the norm
    and the shared memory is scaled twice, as torch's foreach clip does.
    (Not so for one memory mapped twice, as two ``np.memmap`` of one file:
    the threads scaling large NumPy leaves see two separate buffers, and
    an entry may be scaled once.)
    NumPy leaves are processed in blocks, so clipping 1 GB of gradients
    allocates only a few MB of temporaries.
    {params}

    Returns
    -------
    ClipStats
        ``norm`` (before clipping), ``scale``, ``clipped`` and ``finite``.

    Examples
    --------
    >>> import numpy as np
    >>> import gradclip as gc
    >>> grads = [np.array([3.0, 4.0]), np.array([12.0])]
    >>> stats = gc.clip_by_global_norm_(grads, max_norm=6.5)
    >>> grads[1], float(stats.norm)
    (array([6.]), 13.0)
    """
    return _clip_norm(
        "clip_by_global_norm_",
        tree,
        max_norm,
        ord=ord,
        eps=eps,
        nonfinite=nonfinite,
        norm=norm,
        fused=fused,
        inplace=True,
        per_leaf=False,
    )[1]


@_eager
def clip_by_norm(
    tree: Any,
    max_norm: Any,
    *,
    ord: float = 2.0,
    eps: float = 1e-6,
    nonfinite: str = "propagate",
    norm: Any = None,
    fused: bool | None = None,
) -> tuple[Any, ClipStats]:
    """Scale each leaf on its own so that its norm is at most ``max_norm``.

    Like ``tf.clip_by_norm`` applied to every leaf: leaf ``i`` is multiplied
    by ``min(1, max_norm / (norm_i + eps))``. TensorFlow computes
    ``t * max_norm / max(norm, max_norm)``, which has no eps. ``"skip"`` is
    decided per leaf: a non-finite leaf is left unchanged, the others are
    clipped.
    {params}

    Returns
    -------
    tree : pytree
        New arrays, same structure as ``tree``.
    stats : ClipStats
        Per-leaf 1-d arrays: each leaf's ``norm``, ``scale``, ``clipped``
        and ``finite``. With ``norm=``, give one norm per leaf.

    Examples
    --------
    >>> import numpy as np
    >>> import gradclip as gc
    >>> clipped, stats = gc.clip_by_norm([np.array([3.0, 4.0]), np.array([0.5])], 1.0)
    >>> clipped
    [array([0.6, 0.8]), array([0.5])]
    >>> stats.clipped
    array([ True, False])
    """
    return _clip_norm(
        "clip_by_norm",
        tree,
        max_norm,
        ord=ord,
        eps=eps,
        nonfinite=nonfinite,
        norm=norm,
        fused=fused,
        inplace=False,
        per_leaf=True,
    )


@_eager
def clip_by_norm_(
    tree: Any,
    max_norm: Any,
    *,
    ord: float = 2.0,
    eps: float = 1e-6,
    nonfinite: str = "propagate",
    norm: Any = None,
    fused: bool | None = None,
) -> ClipStats:
    """In-place :func:`clip_by_norm` for NumPy, CuPy and torch arrays.

    Every leaf is checked before any is written, as for
    :func:`clip_by_global_norm_`.
    {params}

    Returns
    -------
    ClipStats
        Per-leaf 1-d arrays, as for :func:`clip_by_norm`.

    Examples
    --------
    >>> import numpy as np
    >>> import gradclip as gc
    >>> grads = [np.array([3.0, 4.0]), np.array([0.5])]
    >>> stats = gc.clip_by_norm_(grads, 1.0)
    >>> grads[0]
    array([0.6, 0.8])
    """
    return _clip_norm(
        "clip_by_norm_",
        tree,
        max_norm,
        ord=ord,
        eps=eps,
        nonfinite=nonfinite,
        norm=norm,
        fused=fused,
        inplace=True,
        per_leaf=True,
    )[1]


for _f in (clip_by_global_norm, clip_by_global_norm_, clip_by_norm, clip_by_norm_):
    _f.__doc__ = (_f.__doc__ or "").format(params=_NORM_CLIP_PARAMS)


@_eager
def clip_by_block_rms(
    tree: Any, threshold: Any, *, nonfinite: str = "propagate", fused: bool | None = None
) -> Any:
    """Optax's ``clip_by_block_rms``: divide each leaf by ``max(1, rms / threshold)``.

    ``rms`` is each leaf's root mean square, computed with the overflow-safe
    norm, so float32 leaves of 1e30 are clipped correctly (optax's
    ``sqrt(mean(x**2))`` overflows there). An empty leaf has rms 0 (optax
    takes the mean of nothing, NaN).

    Parameters
    ----------
    tree : pytree of arrays
        As for :func:`global_norm`.
    threshold : float or 0-d array
        The largest rms allowed, ``>= 0``. As ``max_norm`` of
        :func:`clip_by_global_norm`: a device array (a schedule's value,
        ``optax.inject_hyperparams``) is used as is, unchecked.
    nonfinite : {"propagate", "raise", "zero", "skip"}, default "propagate"
        As for :func:`clip_by_global_norm`, decided per leaf for ``"skip"``.
    fused : bool or None, default None
        As for :func:`global_norm`.

    Returns
    -------
    pytree
        New arrays, same structure as ``tree``.

    Examples
    --------
    >>> import numpy as np
    >>> import gradclip as gc
    >>> gc.clip_by_block_rms({"w": np.array([2.0, -2.0]), "b": np.array([0.5])}, 1.0)
    {'w': array([ 1., -1.]), 'b': array([0.5])}
    """
    threshold = _check_bound(threshold, "threshold")
    _check_nonfinite(nonfinite)
    copy = _working_copy(tree, threshold)
    # (Only a FlatTree's copy is clipped in place; JAX leaves never are.)
    inplace = {} if copy is None else {"inplace": True}
    prep = _prepare(tree if copy is None else copy, "clip_by_block_rms", **inplace)
    if prep.xp is None:
        return prep.flat.unflatten([])
    _known_sizes(prep, "clip_by_block_rms")
    kwargs = dict(threshold=threshold, nonfinite=nonfinite, **inplace)
    return prep.flat.unflatten(_run(prep, fused, "clip_by_block_rms", **kwargs))


# ---------------------------------------------------------------------- value clipping


def _signed_bound(value: Any, name: str) -> Any:
    """``lo`` or ``hi``: any number but NaN, or a 0-d device array (see :func:`_scalar_bound`)."""
    v = _scalar_bound(value, name)
    h = _host_value(v)
    if h is not None and math.isnan(h):
        raise ValueError(f"{name} must not be NaN")
    return v


def _value_bounds(clip_value: Any, lo: Any, hi: Any) -> tuple[Any, Any]:
    if clip_value is not None:
        if lo is not None or hi is not None:
            raise TypeError("give either clip_value or lo=/hi=, not both")
        c = _check_bound(clip_value, "clip_value")
        if not isinstance(c, float) and _compat.namespace(c).isdtype(c.dtype, "unsigned integer"):
            # -c wraps around (2 becomes 254 in uint8): lo > hi, every entry
            # set to hi. Negated as a float, which the leaves round it to anyway.
            xp = _compat.namespace(c)
            wide = _compat.has_float64(xp, _compat.device_of(c))
            c = xp.astype(c, xp.float64 if wide else xp.float32)
        return -c, c
    if lo is None and hi is None:
        raise TypeError("give clip_value, or at least one of lo= and hi=")
    low, high = (None if v is None else _signed_bound(v, n) for n, v in (("lo", lo), ("hi", hi)))
    a, b = (None if v is None else _host_value(v) for v in (low, high))
    if a is not None and b is not None and a > b:
        raise ValueError(f"lo must be <= hi; got lo={lo!r}, hi={hi!r}")
    return low, high


def _clip_value(
    fn: str,
    tree: Any,
    clip_value: Any,
    lo: Any,
    hi: Any,
    nonfinite: str,
    fused: bool | None,
    inplace: bool,
) -> Any:
    low, high = _value_bounds(clip_value, lo, hi)
    _check_nonfinite(nonfinite)
    whole = nonfinite != "raise"
    copy = None if inplace or whole else _working_copy(tree, low, high)
    if copy is not None:  # (see _working_copy)
        return _clip_value(fn, copy, None, low, high, nonfinite, fused, inplace=True)
    prep = _prepare(tree, fn, inplace=inplace, whole=whole)
    return _clip_value_checked(fn, prep, low, high, nonfinite, fused, inplace)


def _clip_value_checked(
    fn: str,
    prep: _Prepared,
    low: Any,
    high: Any,
    nonfinite: str,
    fused: bool | None,
    inplace: bool,
) -> Any:
    """:func:`_clip_value` on checked leaves (``gradclip.torch`` names them after parameters)."""
    if prep.xp is None:
        return prep.flat.unflatten([])
    leaves = prep.flat.leaves

    def is_complex(dtype: Any) -> bool:
        info = _compat.dtype_info(prep.xp, dtype)
        return info is not None and info.complex

    if any(map(is_complex, set(map(_dtype, leaves)))):  # a dtype at a time, not a leaf
        i = next(i for i, x in enumerate(leaves) if is_complex(x.dtype))
        raise TypeError(
            f"{fn}: leaf {prep.flat.paths[i]} is complex; complex values have no order to clip by"
        )
    leaves = _run(
        prep, fused, "clip_by_value", lo=low, hi=high, nonfinite=nonfinite, inplace=inplace
    )
    return prep.flat.unflatten(leaves)


@_eager
def clip_by_value(
    tree: Any,
    clip_value: Any = None,
    *,
    lo: Any = None,
    hi: Any = None,
    nonfinite: str = "propagate",
    fused: bool | None = None,
) -> Any:
    """Clamp every entry to ``[-clip_value, clip_value]``, or to ``[lo, hi]``.

    ``torch.nn.utils.clip_grad_value_`` and ``optax.clip`` semantics: NaN
    stays NaN and ``±inf`` goes to the bound under ``"propagate"``.

    Parameters
    ----------
    tree : pytree of real floating arrays
        As for :func:`global_norm`; complex leaves raise ``TypeError``.
    clip_value : float or 0-d array, optional
        Symmetric bound, ``>= 0``.
    lo, hi : float or 0-d array, optional
        One-sided or asymmetric bounds, instead of ``clip_value``. A bound
        may be a device array (a schedule's value, ``optax.inject_hyperparams``):
        it is used as is, since checking it (``>= 0``, ``lo <= hi``, not NaN)
        would need a host sync.
    nonfinite : {"propagate", "raise", "zero", "skip"}, default "propagate"
        As for :func:`clip_by_global_norm`; ``"skip"`` leaves the whole tree
        unchanged when any entry is non-finite.
    fused : bool or None, default None
        As for :func:`global_norm`.

    Returns
    -------
    pytree
        New arrays, same structure as ``tree``.

    Examples
    --------
    >>> import numpy as np
    >>> import gradclip as gc
    >>> gc.clip_by_value([np.array([-3.0, 0.2, 7.0])], 0.5)
    [array([-0.5,  0.2,  0.5])]
    >>> gc.clip_by_value([np.array([-3.0, 0.2, 7.0])], lo=0.0)
    [array([0. , 0.2, 7. ])]
    """
    return _clip_value("clip_by_value", tree, clip_value, lo, hi, nonfinite, fused, False)


@_eager
def clip_by_value_(
    tree: Any,
    clip_value: Any = None,
    *,
    lo: Any = None,
    hi: Any = None,
    nonfinite: str = "propagate",
    fused: bool | None = None,
) -> None:
    """In-place :func:`clip_by_value` for NumPy, CuPy and torch arrays.

    Parameters
    ----------
    tree : pytree of real floating arrays
        Mutable arrays; every leaf is checked before any is written.
    clip_value : float or 0-d array, optional
        Symmetric bound, ``>= 0``.
    lo, hi : float or 0-d array, optional
        One-sided or asymmetric bounds, instead of ``clip_value``; as for
        :func:`clip_by_value`.
    nonfinite : {"propagate", "raise", "zero", "skip"}, default "propagate"
        As for :func:`clip_by_value`.
    fused : bool or None, default None
        As for :func:`global_norm`.

    Examples
    --------
    >>> import numpy as np
    >>> import gradclip as gc
    >>> g = np.array([-3.0, 0.2, 7.0])
    >>> gc.clip_by_value_([g], 1.0)
    >>> g
    array([-1. ,  0.2,  1. ])
    """
    _clip_value("clip_by_value_", tree, clip_value, lo, hi, nonfinite, fused, True)


# ---------------------------------------------------------------------- per example

_REDUCE = (None, "sum", "mean")
_SPLITS = ("uniform", "size")


def _check_positive(value: Any, what: str) -> Any:
    """A bound ``C > 0``, or a 0-d device array (see :func:`_scalar_bound`)."""
    v = _scalar_bound(value, what)
    h = _host_value(v)
    if h is not None and not h > 0:  # NaN too
        raise ValueError(f"{what} must be > 0; got {value!r}")
    return v


def _batch_axes(flat: Flat, axis: Any) -> tuple[list[int], int]:
    """Each leaf's batch axis (``axis`` made non-negative) and the common batch size."""
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"per_example_clip: axis must be an int; got {axis!r}")
    axes: list[int] = []
    batch = first = -1
    for i, x in enumerate(flat.leaves):
        ndim = len(x.shape)
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"per_example_clip: axis={axis} is out of range for leaf {flat.paths[i]}, "
                f"which has {ndim} dimension{'s' * (ndim != 1)} (shape {tuple(x.shape)}); "
                "every leaf carries the batch on that axis"
            )
        ax = int(axis) % ndim
        size = int(x.shape[ax])
        if batch < 0:
            batch, first = size, i
        elif size != batch:
            raise ValueError(
                f"per_example_clip: leaf {flat.paths[i]} has {size} examples on axis {axis} "
                f"but leaf {flat.paths[first]} has {batch}; every leaf must hold the same batch"
            )
        axes.append(ax)
    return axes, batch


def _layer_bounds(max_norm: Any, split: str, prep: _Prepared, batch: int) -> list[Any]:
    """One bound per leaf: given (a tree, a sequence or a 1-d array), or split from ``C``."""
    flat = prep.flat
    leaves = flat.leaves
    if _one_bound(max_norm):
        total = _check_positive(max_norm, "max_norm")
        if split == "uniform":
            weights = [1 / math.sqrt(len(leaves))] * len(leaves)
        else:  # C * sqrt(D_k / D), D_k the size of one example of leaf k
            sizes = [math.prod(x.shape) // batch if batch else 0 for x in leaves]
            whole = sum(sizes) or 1
            # A leaf with no entries gets no bound (inf): 0 would clip nothing
            # yet count every example clipped.
            weights = [math.sqrt(d / whole) if d else math.inf for d in sizes]
        return [total * w for w in weights]
    if _compat.is_array(max_norm) and len(max_norm.shape) == 1:
        given = [max_norm[k] for k in range(max_norm.shape[0])]
    else:
        # Bounds for JAX leaves may sit in JAX-registered nodes (a flax
        # FrozenDict of floats), which only JAX's registry can open.
        bounds = flatten(max_norm, jax_nodes=prep.backend == "jax")
        given = bounds.leaves
        if not isinstance(max_norm, list | tuple) and list(bounds.paths) != list(flat.paths):
            # A tree of bounds pairs by path; a mis-keyed one would pair by order.
            raise ValueError(
                f"per_example_clip: max_norm's bounds are at {list(bounds.paths)} but the "
                f"tree's leaves at {list(flat.paths)}; give a tree of the same structure, "
                "or a sequence in flattening order"
            )
    if len(given) != len(leaves):
        raise ValueError(
            f"per_example_clip: max_norm holds {len(given)} bounds but the tree has "
            f"{len(leaves)} leaves; give one bound per leaf, or one total to split"
        )
    return [_check_positive(c, f"max_norm for leaf {flat.paths[k]}") for k, c in enumerate(given)]


def _one_bound(value: Any) -> bool:
    """Whether ``value`` is one number (or 0-d array), not a bound per leaf."""
    if isinstance(value, int | float | np.number):
        return True
    return _compat.is_array(value) and len(value.shape) == 0


def _empty_example_stats(per_layer: bool) -> PerExampleStats:
    """No leaves, so no examples: ``(K, B) = (0, 0)`` per layer, ``(0,)`` flat."""
    shape = (0, 0) if per_layer else (0,)
    stats = ClipStats(*(x.reshape(shape) for x in _empty_stats(True)))
    count = np.zeros((0,) if per_layer else (), np.int32)
    return PerExampleStats(stats.norm, stats.scale, stats.clipped, count, stats.finite)


@_eager
def per_example_clip(
    tree: Any,
    max_norm: Any,
    *,
    axis: int = 0,
    reduce: str | None = "sum",
    per_layer: bool = False,
    split: str = "uniform",
    eps: float = 1e-6,
    nonfinite: str = "propagate",
) -> tuple[Any, PerExampleStats]:
    """Clip every example's gradient to a norm bound, then sum (DP-SGD's clipping step).

    Every leaf holds a batch of per-example gradients on ``axis``. Example
    ``i`` is multiplied by ``min(1, C / (norm_i + eps))`` and the clipped
    examples are summed (or averaged) over the batch, in one contraction per
    leaf: no clipped per-example copy of the gradients is made. The norms
    are taken over each example's entries in one pass per leaf, with the
    overflow-safe accumulation of :func:`global_norm`.

    - Flat clipping (``per_layer=False``), as optax's
      ``per_example_global_norm_clip`` and Opacus's ``flat`` clipping:
      ``norm_i`` is example ``i``'s 2-norm across all leaves and ``C`` is
      ``max_norm``.
    - Per-layer clipping (``per_layer=True``), as optax's
      ``per_example_layer_norm_clip`` and Opacus's per-layer clipping: each
      leaf ``k`` is clipped on its own, to its own bound ``C_k``.

    Parameters
    ----------
    tree : pytree of arrays
        NumPy, CuPy, JAX, PyTorch, dask or array-API-strict arrays, as for
        :func:`global_norm`, each with the same number of examples on
        ``axis``.
    max_norm : float, 0-d array, or (with ``per_layer``) one bound per leaf
        The bound ``C > 0``. With ``per_layer=True`` either the bounds of
        the leaves (a tree of the same structure, a sequence or a 1-d array
        in flattening order) or a total that ``split`` shares out. A device
        array is used as is (checking it would need a host sync); it can be
        the ``bound`` of a :class:`~gradclip.adaptive.QuantileBound` state.
    axis : int, default 0
        The batch axis of every leaf (negative counts from the end).
    reduce : {"sum", "mean", None}, default "sum"
        ``"sum"`` adds the clipped examples (optax's result, the sum that
        DP-SGD noises); ``"mean"`` divides that by the batch size; ``None``
        returns the clipped examples, batch axis kept.
    per_layer : bool, default False
        Clip each leaf's part of each example on its own.
    split : {"uniform", "size"}, default "uniform"
        With ``per_layer`` and one total ``C`` for ``K`` leaves: ``"uniform"``
        gives every leaf ``C / sqrt(K)`` (optax's ``uniform=True``);
        ``"size"`` gives leaf ``k`` ``C * sqrt(D_k / D)``, where ``D_k`` is
        the size of one example of it and ``D`` their sum (optax's
        ``uniform=False``; a leaf with no entries gets no bound). Either way
        the bounds' squares add up to ``C**2``, so each clipped example's
        whole norm is at most ``C``.
    eps : float, default 1e-6
        Added to the norm before dividing, as Opacus does; optax has none
        (pass ``eps=0`` for its results).
    nonfinite : {"propagate", "raise"}, default "propagate"
        ``"propagate"``: torch's and Opacus's arithmetic. A NaN in an example
        makes its norm NaN, and so the sums it reaches; an inf makes its norm
        inf and its scale 0, so the inf entries become NaN in the sum and the
        example's other entries drop out. Either way its ``stats.finite``
        entry is False. ``"raise"``: raise
        :class:`~gradclip.NonFiniteError` naming the leaf first (a host sync).

    Returns
    -------
    tree : pytree
        The clipped sum (or mean): each leaf without its batch axis, in its
        own dtype. With ``reduce=None``, the clipped examples. For a
        :class:`~gradclip.FlatTree`: the sum or mean as a plain tree of its
        structure (it no longer fits the batched buffers), the clipped
        examples as a FlatTree.
    stats : PerExampleStats
        Each example's ``norm`` and ``scale``, which were ``clipped``, how
        many (``num_clipped``) and whether each was ``finite``: ``(B,)``
        arrays for flat clipping, ``(K, B)`` for per-layer clipping.

    Raises
    ------
    ValueError
        ``C <= 0``, leaves with different batch sizes, or an ``axis`` out of
        range for a leaf (the message names the leaf).

    Examples
    --------
    >>> import numpy as np
    >>> import gradclip as gc
    >>> grads = {"w": np.array([[3.0, 0.0], [0.3, 0.0]]), "b": np.array([[4.0], [0.4]])}
    >>> total, stats = gc.per_example_clip(grads, max_norm=1.0, eps=0.0)
    >>> total  # example 0 (norm 5) scaled by 1/5, example 1 (norm 0.5) kept
    {'w': array([0.9, 0. ]), 'b': array([1.2])}
    >>> stats.norm, stats.scale, int(stats.num_clipped)
    (array([5. , 0.5]), array([0.2, 1. ]), 1)

    Per-layer clipping with a total bound split evenly between the 2 leaves:

    >>> total, stats = gc.per_example_clip(grads, 1.0, per_layer=True, eps=0.0)
    >>> stats.norm  # row k: leaf k ("b", then "w") of each example
    array([[4. , 0.4],
           [3. , 0.3]])
    >>> stats.num_clipped  # each leaf's bound is 1/sqrt(2): both clip example 0
    array([1, 1], dtype=int32)
    """
    if reduce not in _REDUCE:
        raise ValueError(f"reduce must be 'sum', 'mean' or None; got {reduce!r}")
    if split not in _SPLITS:
        raise ValueError(f"split must be 'uniform' or 'size'; got {split!r}")
    eps = _check_eps(eps)
    _check_nonfinite(nonfinite, ("propagate", "raise"))
    fn = "per_example_clip"
    prep = _prepare(tree, fn)
    # A sum or mean has no batch axis: a FlatTree's result is its plain tree.
    rebuild = prep.flat.unflatten if reduce is None else structure(tree, prep.flat)
    if not per_layer and not _one_bound(max_norm):
        raise TypeError(
            f"per_example_clip: max_norm must be a number or a 0-d array; got "
            f"{type(max_norm).__name__} (one bound per leaf needs per_layer=True)"
        )
    if prep.xp is None:
        if _one_bound(max_norm):
            _check_positive(max_norm, "max_norm")
        return rebuild([]), _empty_example_stats(per_layer)
    _known_sizes(prep, fn)
    axes, batch = _batch_axes(prep.flat, axis)
    if per_layer:
        bounds = _layer_bounds(max_norm, split, prep, batch)
    else:
        bounds = _check_positive(max_norm, "max_norm")
    leaves, stats = _run(
        prep,
        None,
        fn,
        max_norm=bounds,
        axes=tuple(axes),
        batch=batch,
        per_layer=per_layer,
        reduce=reduce,
        eps=eps,
        nonfinite=nonfinite,
    )
    return rebuild(leaves), stats
