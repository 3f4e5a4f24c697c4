"""The one place that imports ``array_api_compat`` and knows backend quirks.

Nothing here imports torch, jax, cupy or dask: backends are detected from the
arrays we are given (``array_api_compat`` looks at ``sys.modules``), never
imported.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import operator
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import array_api_compat as aac
import numpy as np

__all__ = [
    "IMMUTABLE_BACKENDS",
    "Block",
    "as_array",
    "asarray",
    "backend_name",
    "beside",
    "blocks",
    "chunk_elems",
    "current_device",
    "device_key",
    "device_of",
    "divide",
    "dtype_info",
    "has_float64",
    "no_grad",
    "is_array",
    "namespace",
    "quiet",
    "to_numpy",
    "torch_strided",
    "traced",
    "view",
    "writable_problem",
]

# Backends whose arrays cannot be written in place: JAX arrays are immutable,
# and dask arrays are lazy graphs, not buffers a caller holds.
IMMUTABLE_BACKENDS = frozenset({"jax", "dask"})

# Elements per block when a backend evaluates eagerly: each block's float64
# temporaries stay at a few MB, so clipping a 1 GB tree in place allocates far
# less than the 64 MB the contract allows.
_CHUNK = 1 << 20


# Trees hold thousands of leaves of a handful of types and dtypes: these
# lookups are cached so the per-leaf cost of validation stays near a dict hit.
_NAMESPACE_BY_TYPE: dict[type, Any] = {}
_DTYPE_INFO: dict[tuple[int, Any], DtypeInfo | None] = {}


def is_array(x: Any) -> bool:
    """Whether ``x`` is an array of a library we can dispatch on."""
    return type(x) in _NAMESPACE_BY_TYPE or bool(aac.is_array_api_obj(x))


def namespace(x: Any) -> Any:
    """The array-API namespace of one array (it depends only on the type)."""
    kind = type(x)
    xp = _NAMESPACE_BY_TYPE.get(kind)
    if xp is None:
        # jax.numpy is JAX's array-API namespace; array-api-compat finds it
        # by making an array (jnp.empty(0)), a host-to-device transfer that
        # jax.transfer_guard("disallow") refuses.
        xp = importlib.import_module("jax.numpy") if aac.is_jax_array(x) else aac.array_namespace(x)
        _NAMESPACE_BY_TYPE[kind] = xp
    return xp


def backend_name(xp: Any) -> str:
    """A short name for ``xp``: numpy, torch, jax, cupy, dask, array_api_strict."""
    checks = (
        ("numpy", aac.is_numpy_namespace),
        ("torch", aac.is_torch_namespace),
        ("jax", aac.is_jax_namespace),
        ("cupy", aac.is_cupy_namespace),
        ("dask", aac.is_dask_namespace),
        ("array_api_strict", aac.is_array_api_strict_namespace),
    )
    for name, check in checks:
        if check(xp):
            return name
    return str(getattr(xp, "__name__", repr(xp)))


def as_array(value: Any) -> Any:
    """``value`` as an array: NumPy reductions return scalars, not 0-d arrays."""
    return np.asarray(value) if isinstance(value, np.generic) else value


def divide(xp: Any, a: Any, b: Any) -> Any:
    """``a / b``, whose derivative stays representable on JAX where ``b`` is huge.

    JAX differentiates ``a / b`` through ``b ** -2``, which is 0 in float32
    for ``b`` above 2**64 (a clip's norm of 1e20): ``jax.grad`` then drops
    the path through the norm, silently. Here the tangent is
    ``da / b - (a / b) * (db / b)``, whose transpose (``jax.grad``) takes
    each factor in range. Other libraries divide as they do: torch takes a
    number over a tensor as the tensor's reciprocal times the number, as its
    own ``clip_grad_norm_`` does (see ``Plan.host_reciprocal``).
    """
    if backend_name(xp) != "jax":
        return a / b
    return _jax_divide()(a, b)


def _div(a: Any, b: Any) -> Any:
    return a / b


def _div_jvp(primals: tuple[Any, Any], tangents: tuple[Any, Any]) -> tuple[Any, Any]:
    (a, b), (da, db) = primals, tangents
    out = a / b
    return out, da / b - out * (db / b)


@functools.cache
def _jax_divide() -> Any:
    div = sys.modules["jax"].custom_jvp(_div)
    div.defjvp(_div_jvp)  # not as decorators: jax is typed Any here
    return div


def where(xp: Any, cond: Any, x: Any, y: Any) -> Any:
    """``xp.where(cond, x, y)`` in ``x``'s dtype.

    CuPy 14 has no ``where`` loop for ml_dtypes' bfloat16 and picks its
    float32 one; the values are bfloat16's, so the cast back is exact.
    Tensors of one dtype go to ``torch.where`` itself: array-api-compat's
    wrapper fixes up the promotion of its operands first, two ``Tensor.to``
    calls and two ``result_type`` ones, 5 us where ``torch.where`` takes 2
    (a fifth of a 10-tensor clip's Python, five ``where`` in all).
    """
    if getattr(xp, "__name__", None) == "array_api_compat.torch":
        tensor = sys.modules["torch"].Tensor
        if isinstance(x, tensor) and isinstance(y, tensor) and x.dtype == y.dtype:
            return sys.modules["torch"].where(cond, x, y)
    out = xp.where(cond, x, y)
    return out if out.dtype == x.dtype else xp.astype(out, x.dtype)


def device_of(x: Any) -> Any:
    """The device to create constants on, or ``None`` to let the library choose."""
    # JAX places constants itself and a sharded array has no single device;
    # under jit ``x`` is a tracer with no device at all.
    if aac.is_jax_array(x):
        return None
    return aac.device(x)


def current_device(x: Any) -> contextlib.AbstractContextManager[Any]:
    """Make ``x``'s device the current one while gradclip works on it (CuPy only).

    CuPy creates arrays and runs kernels on the *current* device, whatever
    device the operands live on, and array-api-compat's ``zeros(device=...)``
    for CuPy ignores the device. Leaves on device 1 while device 0 is
    current would get constants, scratch and results on device 0 (and peer
    reads, or an error where there is no peer access). Entering the current
    device costs no switch. Every other library places arrays by ``device=``.
    """
    if aac.is_cupy_array(x):
        return x.device  # type: ignore[no-any-return]  # cupy.cuda.Device is a context manager
    return contextlib.nullcontext()


def beside(value: Any, leaf: Any) -> Any:
    """An array argument (a device bound, a given norm) moved onto ``leaf``'s device.

    torch's own clip moves its coefficient to each gradient's device, and a
    CuPy kernel must not read a bound from another GPU's memory. A CPU 0-d
    tensor stays beside CUDA leaves: torch takes it as a scalar, where a copy
    would wait for the stream. JAX places (or refuses) it under jit itself.
    """
    if aac.is_jax_array(leaf):
        return value
    there, here = aac.device(value), aac.device(leaf)
    if there == here:
        return value
    if aac.is_torch_array(value) and value.ndim == 0 and there.type == "cpu":
        return value
    return aac.to_device(value, here)


def device_key(x: Any) -> Any:
    """A hashable description of where ``x`` lives, or ``None`` if unknowable."""
    if type(x) is np.ndarray:
        return "cpu"
    if aac.is_jax_array(x):
        jax = sys.modules["jax"]
        # An uncommitted array (jnp.ones(3), not device_put) goes wherever the
        # computation runs: jit moves it beside sharded leaves.
        if isinstance(x, jax.core.Tracer) or not x.committed:
            return None
        return frozenset(x.devices())
    return str(aac.device(x))


class DtypeInfo:
    """What the norm code needs to know about one floating dtype."""

    __slots__ = ("complex", "float64", "max_exp2", "normal_exp2", "tiny_exp2")

    def __init__(
        self,
        *,
        complex: bool,
        float64: bool,
        max_exp2: float,
        normal_exp2: float,
        tiny_exp2: float,
    ):
        self.complex = complex
        self.float64 = float64
        self.max_exp2 = max_exp2  # log2 of the largest finite value
        self.normal_exp2 = normal_exp2  # log2 of the smallest normal value
        self.tiny_exp2 = tiny_exp2  # log2 of the smallest subnormal value

    @property
    def narrow(self) -> bool:
        """Fewer significand bits than float32 (float16, bfloat16): scaled in float32."""
        return self.normal_exp2 - self.tiny_exp2 < 23


def _ml_dtypes_finfo(dtype: Any) -> Any:
    # NumPy has no bfloat16; ml_dtypes adds it (and float8 types) as kind "V"
    # dtypes that numpy's isdtype and finfo reject.
    ml_dtypes = sys.modules.get("ml_dtypes")
    if ml_dtypes is None or getattr(dtype, "kind", None) != "V":
        return None
    try:
        return ml_dtypes.finfo(dtype)
    except (TypeError, ValueError):
        return None


def dtype_info(xp: Any, dtype: Any) -> DtypeInfo | None:
    """Describe a floating or complex dtype; ``None`` for anything else."""
    key = (id(xp), dtype)
    try:
        return _DTYPE_INFO[key]
    except KeyError:
        info = _DTYPE_INFO[key] = _dtype_info(xp, dtype)
        return info
    except TypeError:  # an unhashable dtype object
        return _dtype_info(xp, dtype)


def _dtype_info(xp: Any, dtype: Any) -> DtypeInfo | None:
    fi = _ml_dtypes_finfo(dtype)
    if fi is not None:
        is_complex = False
    else:
        try:
            if xp.isdtype(dtype, "real floating"):
                is_complex = False
            elif xp.isdtype(dtype, "complex floating"):
                is_complex = True
            else:
                return None
        except TypeError:
            return None
        fi = xp.finfo(dtype)
    max_v = float(fi.max)
    normal = float(fi.smallest_normal)
    if math.isinf(max_v) or normal == 0:
        # NumPy's longdouble and clongdouble: wider than the float64
        # accumulator, and no other library or kernel takes them.
        return None
    if fi.bits < 16:
        # float8/float6/float4 (ml_dtypes, torch): scales rounded to 2-4
        # significant bits, formats without inf (float8_e4m3fn overflows to
        # NaN), and no kernel for them. Training keeps their gradients wider.
        return None
    if is_complex and fi.bits < 32:
        # torch's complex32 (chalf): half-precision parts, which the float32
        # product of the half-precision dtypes would cast to real, and no
        # kernel takes.
        return None
    return DtypeInfo(
        complex=is_complex,
        float64=max_v > 1e300,
        max_exp2=math.log2(max_v),
        normal_exp2=math.log2(normal),
        tiny_exp2=math.log2(normal * float(fi.eps)),
    )


def has_float64(xp: Any, device: Any) -> bool:
    """Whether float64 arithmetic is available for this namespace and device."""
    name = backend_name(xp)
    if name in ("numpy", "cupy", "dask"):
        return True
    if name == "torch":
        # Apple's MPS backend has no float64.
        return getattr(device, "type", None) != "mps"
    # JAX disables float64 unless ``jax_enable_x64`` is set; array-api-strict
    # has devices without it ("no_float64", like MPS). The namespace says.
    info = getattr(xp, "__array_namespace_info__", None)
    if info is None:
        return True
    kinds = info().dtypes(device=device, kind="real floating")
    return "float64" in kinds


def unknown_extreme(a: Any, largest: bool) -> Any:
    """The max (``largest``) or min of a dask array of magnitudes of unknown shape.

    dask gives a NaN length after boolean indexing. Such an array may turn
    out empty, where max and min have no identity (they raise at compute
    time), and dask's own reduction fails where a block is empty along the
    reduced axes beside others that are not (a ``(1, 0)`` block of a
    ``(nan, 3)`` array). So each block's extreme starts from the identity
    over magnitudes: 0 for the max, inf for the min.
    """
    fn = np.max if largest else np.min
    block = functools.partial(fn, keepdims=True, initial=0.0 if largest else math.inf)
    ones = tuple((1,) * len(c) for c in a.chunks)
    parts = a.map_blocks(block, chunks=ones, dtype=a.dtype)
    return parts.max() if largest else parts.min()


def reductions_drop_nan(xp: Any) -> bool:
    """Whether ``xp.max``/``xp.min`` may skip NaN entries (JAX: XLA's CPU reductions)."""
    return backend_name(xp) == "jax"


def warns_later(xp: Any) -> bool:
    """Whether ``xp``'s arithmetic runs later, in NumPy, outside :func:`quiet` (dask)."""
    return backend_name(xp) == "dask"


def chunk_elems(xp: Any) -> int | None:
    """Block size for eager backends; ``None`` where the compiler fuses (JAX, dask)."""
    return None if backend_name(xp) in IMMUTABLE_BACKENDS else _CHUNK


def view(xp: Any, x: Any, shape: tuple[int, ...]) -> Any | None:
    """``x`` reshaped to ``shape`` as a view of its memory, or ``None`` if there is none."""
    name = backend_name(xp)
    try:
        if name == "torch":
            return x.view(shape)  # raises when the strides do not allow a view
        return xp.reshape(x, shape, copy=False)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, TypeError):
        return None


class Block(NamedTuple):
    """A bounded piece of a leaf: ``target[index]``, also given flattened."""

    target: Any
    index: Any
    shape: tuple[int, ...]
    flat: Any

    def write(self, xp: Any, new_flat: Any) -> None:
        """Store ``new_flat`` (1-D, the block's size) back into the leaf."""
        self.target[self.index] = xp.reshape(new_flat, self.shape)


def blocks(xp: Any, x: Any, chunk: int | None) -> Iterator[Block]:
    """Split ``x`` into blocks of at most ``chunk`` elements (``None``: one block).

    Writing a block back with :meth:`Block.write` updates ``x`` in place on
    mutable backends. Contiguous arrays are walked through a flat view;
    strided ones fall back to slices along axis 0.
    """
    shape = tuple(x.shape)
    size = math.prod(shape)
    if size == 0:
        return
    if chunk is None:
        # Compiled backends reduce a leaf whole, in any shape: reshaping a JAX
        # array sharded over an explicit mesh would need an output sharding.
        yield Block(x, ..., shape, x)
        return
    if size <= chunk:
        yield Block(x, ..., shape, xp.reshape(x, (-1,)))
        return
    flat = view(xp, x, (-1,))
    if flat is not None:
        for start in range(0, size, chunk):
            stop = min(start + chunk, size)
            yield Block(flat, slice(start, stop), (stop - start,), flat[start:stop])
        return
    yield from _row_blocks(xp, x, chunk, ())


def _row_blocks(xp: Any, x: Any, chunk: int, lead: tuple[int, ...]) -> Iterator[Block]:
    """Blocks of the strided ``x[lead]`` (``lead``: integer indices) along its first axis.

    A row of more than ``chunk`` elements is split along its own first axis
    in turn: whole, its flattened copy would be a full-size temporary (a
    transposed (16M, 2) leaf has two rows of 16M).
    """
    shape = tuple(x.shape)[len(lead) :]
    row = math.prod(shape[1:])
    if row > chunk:
        for i in range(shape[0]):
            yield from _row_blocks(xp, x, chunk, (*lead, i))
        return
    rows = max(1, chunk // row)
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])
        index = (*lead, slice(start, stop), ...)  # array-api-strict refuses a bare slice on 2-d+
        piece = x[index]
        yield Block(x, index, (stop - start, *shape[1:]), xp.reshape(piece, (-1,)))


_C_CONTIGUOUS = operator.attrgetter("_c_contiguous")
_FLAGS_C_CONTIGUOUS = operator.attrgetter("flags.c_contiguous")


def cupy_c_contiguous(leaves: Sequence[Any]) -> bool:
    """Whether every one of ``leaves``, CuPy arrays, is C-contiguous.

    CuPy builds a ``Flags`` object on each ``x.flags``: 0.2 us a leaf, 0.4 ms
    for 2000 leaves, read twice a clip. Its ndarray holds the bit itself as
    ``_c_contiguous`` (a CuPy without it gets the flags).

    Examples
    --------
    >>> import numpy as np
    >>> cupy_c_contiguous([np.zeros(3), np.zeros((3, 2)).T])  # NumPy has only the flags
    False
    >>> cupy_c_contiguous([])
    True
    """
    if not leaves:
        return True
    get = _C_CONTIGUOUS if hasattr(leaves[0], "_c_contiguous") else _FLAGS_C_CONTIGUOUS
    return all(map(get, leaves))


def ratio_or_one(xp: Any, num: Any, den: Any) -> Any:
    """``num / den``, and exactly 1 where they are equal or ``den`` is 0 (0-d or elementwise).

    A scale reported from a norm or an extreme before and after a clip: XLA
    on the GPU divides to within an ulp, and gave 0.99999994 for ``x / x``
    where nothing was clipped (an H100).

    Examples
    --------
    >>> import numpy as np
    >>> ratio_or_one(np, np.array([1.0, 3.0, 2.0]), np.array([2.0, 3.0, 0.0]))
    array([0.5, 1. , 1. ])
    """
    one = xp.ones_like(den)
    changed = (den > 0) & (num != den)
    return xp.where(changed, num / xp.where(changed, den, one), one)


def read_only(x: Any) -> bool:
    """Whether ``x`` refuses writes: a NumPy array with ``flags.writeable`` False, or JAX's."""
    return not aac.is_writeable_array(x)


def writable_problem(x: Any) -> str | None:
    """Why ``x`` cannot be written in place, or ``None`` if it can."""
    if isinstance(x, np.generic):
        return "is a NumPy scalar, which is immutable"
    if type(x).__module__.startswith("array_api_strict"):
        x = x._array  # the wrapped NumPy array carries the writeable flag
    if read_only(x):
        return "is read-only (flags.writeable is False)"
    if aac.is_torch_array(x) and x.is_inference():
        torch = sys.modules["torch"]
        if not torch.is_inference_mode_enabled():
            return "is an inference tensor, which cannot be modified outside inference mode"
    shape = tuple(x.shape)
    if math.prod(shape) == 0:
        return None  # nothing to write (NumPy gives empty arrays zero strides)
    if aac.is_torch_array(x):
        if x.is_contiguous():
            return None
        strides, itemsize = tuple(x.stride()), 1  # torch counts strides in elements
    else:  # NumPy (array-api-strict's too) and CuPy count them in bytes
        flags = getattr(x, "flags", None)
        if flags is not None and (flags.c_contiguous or flags.f_contiguous):
            return None
        strides, itemsize = tuple(getattr(x, "strides", ())), x.itemsize
    if _may_self_overlap(shape, strides, itemsize):
        if any(s == 0 and n > 1 for s, n in zip(strides, shape, strict=False)):
            return "has overlapping memory (a zero stride, e.g. from broadcasting or expand)"
        return (
            f"may have overlapping memory (strides {strides} for shape {shape}, e.g. from "
            "unfold or as_strided): entries written twice would be scaled twice"
        )
    return None


def _may_self_overlap(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> bool:
    """Whether two entries of a strided array might share memory (``False``: they cannot).

    Sufficient, not necessary: with its dimensions ordered by stride, each
    stride must step past everything the smaller ones reach. Layouts made by
    slicing, transposing and reshaping pass; unfold's windows do not.
    """
    reach = itemsize
    # (strict=False: an array type without strides has none to check)
    for step, n in sorted((abs(s), n) for s, n in zip(strides, shape, strict=False) if n > 1):
        if step < reach:
            return True
        reach += step * (n - 1)
    return False


def traced(leaves: Sequence[Any]) -> bool:
    """Whether any leaf is a JAX tracer (inside jit, vmap or grad): no values to read."""
    jax = sys.modules.get("jax")
    return jax is not None and any(isinstance(x, jax.core.Tracer) for x in leaves)


def refuse_traced_raise(fn: str, leaves: Sequence[Any]) -> None:
    """Refuse ``nonfinite="raise"`` on traced JAX arrays (jit, vmap, grad): no values to read.

    JAX's own TracerBoolConversionError would not say which option caused it.
    """
    if not traced(leaves):
        return
    if fn in ("global_norm", "leaf_norms"):  # they take no "skip"
        instead = 'nonfinite="propagate" (a non-finite norm shows it)'
    else:
        other = "propagate" if fn == "per_example_clip" else "skip"
        instead = f'nonfinite="{other}" and read stats.finite (or optax.apply_if_finite)'
    raise TypeError(
        f'gradclip.{fn}: nonfinite="raise" reads the gradients on the host, which cannot '
        f"happen inside jax.jit, vmap or grad. Under a transform use {instead}, or call it "
        "outside the transform"
    )


def unknown_size(n: Any) -> bool:
    """Whether a dimension is not known until computed: dask's NaN, or the array API's None."""
    return n is None or n != n


def count_nonzero(xp: Any, x: Any) -> Any:
    """The number of nonzero entries of ``x``, a 0-d integer array.

    ``count_nonzero`` came in the 2024.12 standard; older namespaces (as
    array-api-strict set to 2023.12) sum a mask instead.
    """
    if getattr(xp, "__array_api_version__", "2024.12") >= "2024.12":
        return xp.count_nonzero(x)
    # astype to bool is the nonzero test (NaN too); the sum widens int8 to the
    # default integer.
    return xp.sum(xp.astype(xp.astype(x, xp.bool), xp.int8))


def asarray(xp: Any, value: Any, dtype: Any = None, device: Any = None) -> Any:
    """``xp.asarray``, where a Python number becomes a 0-d array made on ``device``.

    ``torch.asarray`` of a number on a CUDA device copies it from the host
    and waits for the stream (pytorch#120996): every constant of a clip was
    a host sync. ``torch.full`` fills it on the device. (CuPy's ``asarray``
    stages the copy through pinned memory without waiting.)
    """
    if isinstance(value, float) and dtype is not None:
        value = number_in(xp, value, dtype)  # then exact in a narrow dtype
    if aac.is_torch_namespace(xp):
        torch = sys.modules["torch"]
        if isinstance(value, torch.Tensor):
            # torch 2.13's asarray of a tensor that requires grad (a
            # learnable bound) warns that it now keeps the graph; .to keeps it.
            return value.to(dtype=dtype, device=device)
        if isinstance(value, int | float):
            try:
                return torch.full((), value, dtype=dtype, device=device)
            except RuntimeError:  # past the dtype's range: asarray rounds it to inf
                pass
    return xp.asarray(value, dtype=dtype, device=device)


def number_in(xp: Any, value: float, dtype: Any) -> float:
    """``value`` rounded once into ``dtype`` where that is narrow (float16, bfloat16), else as is.

    The result is exact in ``dtype``: a library's own conversion of it
    rounds nothing (see :func:`_round_once_host`).
    """
    info = dtype_info(xp, dtype)
    return _round_once_host(value, info) if info is not None and info.narrow else value


def _round_once_host(value: float, info: DtypeInfo) -> float:
    """A number rounded once, to nearest even, into a narrow dtype (float16, bfloat16).

    torch, XLA and ml_dtypes convert a float64 to these through float32,
    rounding twice: 1 + 2**-11 + 2**-40 became 1.0 in float16, not 1.001 (a
    clip_by_value bound just past a midpoint), and 1 + 2**-8 + 2**-40 became
    1.0 in bfloat16. Here the quotient by the value's quantum (a power of
    two, so exact) is rounded by ``round``, which ties to even.
    """
    if not math.isfinite(value) or value == 0.0:
        return value
    digits = info.normal_exp2 - info.tiny_exp2 + 1  # significand bits, the implicit one too
    quantum = 2.0 ** max(math.frexp(value)[1] - digits, info.tiny_exp2)
    out = round(value / quantum) * quantum
    return out if abs(out) <= 2.0**info.max_exp2 else math.copysign(math.inf, value)


def round_once(xp: Any, value: Any, dtype: Any) -> Any:
    """A float64 array rounded once into a narrow dtype (see :func:`_round_once_host`).

    Of the library's cast and its neighbour toward ``value``, the nearer
    wins; a tie keeps the cast, which rounded the exact midpoint (a float32
    then) to even. Infinity stands for ``2**emax`` there, where the range
    ends. No value is read: this runs on a device and under ``jax.jit``.
    """
    info = dtype_info(xp, dtype)
    assert info is not None  # a narrow float dtype
    device = device_of(value)
    wide_dtype = value.dtype

    def const(v: float, of: Any = wide_dtype) -> Any:
        return asarray(xp, v, of, device)

    out = xp.astype(value, dtype)
    finite = xp.isfinite(value)
    # Non-finite values become 0 before any arithmetic: dask would warn of
    # inf - inf in the caller's compute().
    v = where(xp, finite, value, const(0.0))
    wide = xp.astype(out, wide_dtype)
    edge = const(2.0 ** math.ceil(info.max_exp2))
    wide = where(xp, xp.isinf(wide), xp.sign(wide) * edge, wide)
    wide = where(xp, finite, wide, const(0.0))
    # Toward the largest finite value, not inf: nextafter(max, inf) would
    # overflow, and inf is never the nearer (or the cast already).
    top = float(2.0**info.max_exp2)
    toward = where(xp, v > wide, const(top, dtype), const(-top, dtype))
    other = xp.nextafter(out, toward)
    nearer = xp.abs(v - xp.astype(other, wide_dtype)) < xp.abs(v - wide)
    return where(xp, finite & nearer, other, out)


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy copy of an array of any backend (an explicit device-to-host transfer).

    A copy, writable, that shares no memory with ``x``: a CPU tensor's
    ``.numpy()``, a NumPy array and DLPack are views, and JAX's host copy
    of a CPU array may be its read-only buffer.
    """
    name = backend_name(namespace(x))
    if name == "cupy":
        return np.asarray(x.get())  # a new host array
    if name == "torch":
        host = x.detach().cpu().numpy()
    elif name == "array_api_strict":
        host = np.from_dlpack(x)
    elif name == "jax":
        # An explicit transfer: jax.transfer_guard("disallow") lets it through
        # and stops implicit ones.
        host = sys.modules["jax"].device_get(x)
    else:
        # dask computes here, and NumPy warns about the NaN/inf arithmetic
        # that the "propagate" policy performs on purpose.
        with np.errstate(all="ignore"):
            host = np.asarray(x)
    return np.array(host, copy=True)


def torch_strided() -> Any:
    """``torch.strided``, the layout of dense tensors (torch is imported by then)."""
    return sys.modules["torch"].strided


def quiet(xp: Any) -> contextlib.AbstractContextManager[Any]:
    """Silence NumPy's floating-point warnings for NaN/inf arithmetic.

    Non-finite values are part of the contract (``nonfinite=`` and
    ``ClipStats.finite`` report them); NumPy-backed namespaces would otherwise
    warn on ``inf * 0`` in ``"propagate"`` mode, as torch and JAX do not.
    Every backend gets it: JAX and dask round Python bounds into float32
    through NumPy (``max_norm=1e300`` becomes inf, and warned), and NumPy's
    error state touches no other library's arithmetic.
    """
    return np.errstate(all="ignore")


@contextlib.contextmanager
def no_grad(xp: Any) -> Iterator[None]:
    """Autograd off (torch) while gradclip writes or measures.

    torch needs it to write leaf tensors in place; and a measurement of
    gradients taken with ``create_graph=True`` must not keep their graph
    (and its saved activations) alive.
    """
    if backend_name(xp) == "torch":
        with sys.modules["torch"].no_grad():
            yield
    else:
        yield
