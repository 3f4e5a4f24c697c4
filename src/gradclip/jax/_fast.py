"""The JAX fast path: one compiled program per call, overflow-safe at float32 cost.

The top-level functions dispatch here for JAX leaves (``_api._FAST_PATHS``),
and :mod:`gradclip.jax` calls these functions inside its own ``jax.jit``.
Everything is traced ``jax.numpy``/``lax`` code, so it also runs inlined in a
caller's ``jit``, ``vmap`` or ``shard_map``.

Global p-norms (the common case) are taken in one pass: each leaf's
``sum(|g|**p)`` in the accumulator dtype (float32 unless a leaf is float64),
XLA's tree-shaped reduction keeping the rounding error near 1e-8. The sum is
exact enough whenever it is finite and not so small that entries flushed to
zero could matter; only otherwise (overflow, underflow, or a NaN/inf entry)
does a conditional (:func:`_unless`) run the two-pass scaled reduction of :mod:`gradclip._norms`,
so the overflow safety the contract promises costs one comparison on the
common path. Small leaves are concatenated per dtype before reducing: XLA on
the CPU spends microseconds per kernel at run time and milliseconds per
distinct kernel at compile time, so a tree of 2000 biases costs one reduction,
not 2000.

The write is skipped on the device (``lax.cond``) when the scale is exactly 1.

Leaves sharded with a ``NamedSharding`` are reduced inside ``shard_map``: each
device sums its own shards (a replicated copy is counted on one device only)
and one ``psum`` of the partial sums gives every device the global norm; the
gradients themselves never move. Code already inside ``shard_map`` passes
``axis_name`` for the same reduction.
"""

from __future__ import annotations

import functools
import importlib
import math
import operator
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import _compat, _core
from .._norms import Partial, Plan, root
from .._stats import ClipStats

# Typed Any on purpose: mypy runs where JAX is not installed (the lint
# session) as well as where it is, and must see the same types in both.
jax: Any = importlib.import_module("jax")
jnp: Any = importlib.import_module("jax.numpy")
lax: Any = jax.lax

__all__ = [
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "global_norm",
    "leaf_norms",
    "per_example_clip",
]

# Leaves below this many elements are concatenated (per dtype) for the norm.
# Copying them costs less than a kernel each; larger leaves are reduced where
# they are, since copying them would cost a read and a write.
GATHER = 1 << 16

# Mantissa bits of the accumulators: a sum at least 2**(normal_exp2 + 42 +
# bits) cannot have lost more than one rounding unit to entries flushed to
# zero (at most 2**42 of them, each below the smallest normal).
_MANTISSA = {jnp.dtype(jnp.float32): 24, jnp.dtype(jnp.float64): 53}

Axes = tuple[str, ...] | None


def _trusted_above(plan: Plan) -> float:
    """The least plain sum of powers not suspected of losing entries to underflow."""
    return float(2.0 ** (plan._acc_info.normal_exp2 + 42 + _MANTISSA[jnp.dtype(plan.acc)]))


# ----------------------------------------------------------- compile options

# XLA's CPU backend compiles one kernel per distinct leaf shape (identical
# kernels are compiled once), and with its default fusion emitters each costs
# about 10 ms here: an MLIR module built for it, then LLVM at -O2. A tree of
# 2000 leaves of 1277 sizes takes 16-22 s to compile whatever the program
# does (a lone multiply per leaf takes 18 s). Its legacy emitters at LLVM -O0
# compile that tree in 2-5 s. Their code is not vectorized, which costs
# nothing measurable on leaves this small (launching a kernel costs more than
# its loop; the step took 19.8 against 20.1 ms) but about 0.7 ns an element on
# large ones (a 64M-element leaf clipped in 71 ms instead of 31, leaves of
# 2K-6K elements 27% slower). So only trees of many small leaves take them.
# XLA has since removed the legacy emitters (jaxlib 0.11 refuses the option):
# there -O0 alone is taken, 13 s instead of 20 on a tree of 1556 sizes, at the
# same run time. Both are options of the CPU compiler: a program compiled for
# another platform never gets them.
FAST_COMPILE: dict[str, Any] = {
    "xla_cpu_use_fusion_emitters": False,
    "xla_backend_optimization_level": 0,
}
_MANY_SHAPES = 256  # distinct leaf types (shape, dtype), each a kernel of its own
_SMALL_MEAN = 2048  # elements, averaged over those types
_REJECTED: list[str] = []  # the message of an XLA that refused FAST_COMPILE, once seen
_NO_SUCH_OPTION = re.compile(r"No such compile option: '([^']+)'")

Options = tuple[tuple[str, Any], ...]  # hashable, for the caches of jitted programs
_aval = operator.attrgetter("aval")
_shape = operator.attrgetter("shape")
_committed = operator.attrgetter("committed")


@functools.cache
def _accepted(options: Options) -> Options:
    """The ``options`` this XLA's CPU compiler knows: a tiny program compiled with them, once.

    An option XLA no longer has is refused by name at compile time; it is
    dropped and the rest tried again. Any other refusal drops them all.
    """
    cpu = jax.devices("cpu")[0]
    arg = jax.ShapeDtypeStruct((), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(cpu))
    kept = dict(options)
    while kept:
        try:
            jax.jit(lambda x: x + 1, compiler_options=kept).lower(arg).compile()
        except jax.errors.JaxRuntimeError as err:
            missing = _NO_SUCH_OPTION.search(str(err))
            if missing is None or missing.group(1) not in kept:
                return ()
            del kept[missing.group(1)]
        else:
            break
    return tuple(sorted(kept.items()))


def _platform(leaves: Sequence[Any]) -> str | None:
    """The platform ``jax.jit`` compiles a program over these concrete arrays for.

    That of the committed ones, if any (``jit`` moves the others there, and
    refuses committed arrays on two devices); else that of the default device,
    where uncommitted arrays are put, whatever device they were made on.
    """
    held = next(filter(_committed, leaves), None)
    if held is not None:
        platforms = {d.platform for d in held.devices()}
        return platforms.pop() if len(platforms) == 1 else None
    device = jax.config.jax_default_device
    if device is None:
        return str(jax.default_backend())
    return device if isinstance(device, str) else str(device.platform)


def compile_options(leaves: Sequence[Any]) -> Options:
    """The XLA options a top-level program over ``leaves`` compiles with: ``()`` or FAST_COMPILE.

    FAST_COMPILE (the part of it this XLA has) where the leaves are concrete
    arrays compiled for the CPU (a trace's program is its caller's to
    compile) of at least 256 distinct types whose mean size is at most 2048
    elements.
    """
    if len(leaves) < _MANY_SHAPES or _REJECTED:
        return ()
    first = leaves[0]
    if set(map(type, leaves)) != {type(first)} or isinstance(first, jax.core.Tracer):
        return ()
    if not isinstance(first, jax.Array):
        return ()
    # 0.3 ms on 2000 leaves; jax.typeof costs 4 ms, an aval's .size 0.4 ms
    kinds = set(map(_aval, leaves))
    if len(kinds) < _MANY_SHAPES:
        return ()
    if sum(map(math.prod, map(_shape, kinds))) > _SMALL_MEAN * len(kinds):
        return ()
    if _platform(leaves) != "cpu":  # 0.1 ms on 2000 leaves
        return ()
    return _accepted(tuple(sorted(FAST_COMPILE.items())))


def run_compiled(make: Callable[[Options], Any], leaves: Sequence[Any], *args: Any) -> Any:
    """``make(options)(*args)``, with ``options`` from :func:`compile_options` where they apply.

    Two refusals fall back to XLA's defaults, before anything has run:
    concrete leaves inside a caller's ``jit`` (constants it closed over)
    make a nested ``jit``, which takes no options; and an XLA that no longer
    has one of them refuses it at compile time (remembered, not retried).
    """
    options = compile_options(leaves)
    if options:
        try:
            return make(options)(*args)
        except ValueError as err:  # the nested jit, refused as it is traced
            if "compiler_options" not in str(err):
                raise
        except jax.errors.JaxRuntimeError as err:
            if "compile option" not in str(err):
                raise
            _REJECTED.append(str(err))
    return make(())(*args)


def jit_with(fn: Callable[..., Any], options: Options, **kwargs: Any) -> Any:
    return jax.jit(fn, compiler_options=dict(options) or None, **kwargs)


# ------------------------------------------------------------------ sharding


def _axes(axis_name: Any) -> Axes:
    if axis_name is None:
        return None
    return tuple(axis_name) if isinstance(axis_name, tuple | list) else (axis_name,)


def _psum(x: Any, axes: Axes) -> Any:
    return x if axes is None else lax.psum(x, axes)


def _pmax(x: Any, axes: Axes) -> Any:
    return x if axes is None else lax.pmax(x, axes)


def _primary(replicated: tuple[str, ...]) -> Any:
    """0-d bool: this device holds the copy of a replicated leaf that is counted."""
    flag = jnp.asarray(True)
    for name in replicated:
        flag = flag & (lax.axis_index(name) == 0)
    return flag


def mesh_layout(leaves: Sequence[Any]) -> tuple[Any, tuple[Any, ...]] | None:
    """``(mesh, specs)`` when every leaf is a concrete array sharded over one mesh.

    ``None`` for tracers (inside a caller's ``jit`` shardings are XLA's to
    propagate), single-device arrays, and mixed meshes.
    """
    mesh = None
    specs = []
    for x in leaves:
        sharding = getattr(x, "sharding", None)
        if isinstance(x, jax.core.Tracer) or not isinstance(sharding, jax.sharding.NamedSharding):
            return None
        if mesh is None:
            mesh = sharding.mesh
        elif sharding.mesh != mesh:
            return None
        specs.append(sharding.spec)
    if mesh is None or mesh.size == 1:
        return None
    return mesh, tuple(specs)


def _replicated(mesh: Any, spec: Any) -> tuple[str, ...]:
    """The mesh axes a leaf with ``spec`` is replicated over."""
    used: set[str] = set()
    for entry in spec:
        if entry is not None:
            used.update(entry if isinstance(entry, tuple) else (entry,))
    return tuple(name for name in mesh.axis_names if name not in used)


# --------------------------------------------------------------------- norms


def _partition(
    leaves: Sequence[Any], groups: Sequence[Any]
) -> tuple[list[int], dict[Any, list[int]]]:
    """Indices of the leaves reduced whole (large or split), and of the rest per ``(dtype, group)``.

    Empty leaves go with the small ones: they add nothing, but their dtype
    still sets the norm's (float64 where any leaf is float64).
    """
    whole: list[int] = []
    small: dict[Any, list[int]] = {}
    for i, (x, group) in enumerate(zip(leaves, groups, strict=True)):
        if x.size >= GATHER or _split(x):
            whole.append(i)
        else:
            small.setdefault((x.dtype, group), []).append(i)
    return whole, small


def _buffers(leaves: Sequence[Any], groups: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """The arrays to reduce: large or sharded leaves whole, small ones concatenated.

    Small leaves are raveled and concatenated per ``(dtype, group)``, in the
    order of :func:`_partition`.

    ``groups[i]`` is hashable and separates leaves that may not be summed
    together (different replication on a mesh). Returns the buffers and each
    buffer's group, in a fixed order.
    """
    whole, small = _partition(leaves, groups)
    bufs = [leaves[i] for i in whole]  # reduced whole, in their own shapes
    keys = [groups[i] for i in whole]
    for (_, group), members in small.items():
        parts = [jnp.ravel(leaves[i]) for i in members]
        bufs.append(parts[0] if len(parts) == 1 else jnp.concatenate(parts))
        keys.append(group)
    return bufs, keys


def _split(x: Any) -> bool:
    """Whether ``x`` is split over an explicit mesh axis (it cannot be raveled as is)."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", ())
    return any(entry is not None for entry in spec)


def _masked_sum(values: list[Any], keys: list[Any], masks: dict[Any, Any]) -> Any:
    total = None
    for value, key in zip(values, keys, strict=True):
        mask = masks.get(key)
        term = value if mask is None else jnp.where(mask, value, jnp.zeros_like(value))
        total = term if total is None else total + term
    return total


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _power(a: Any, p: float) -> Any:
    """``a**p`` for the one-pass sum, whose derivative never multiplies 0 by inf."""
    return a**p


def _power_jvp(p: float, primals: tuple[Any], tangents: tuple[Any]) -> tuple[Any, Any]:
    (a,), (t,) = primals, tangents
    # Where p * a**(p - 1) overflows, so did the one-pass sum, and _unless
    # took the scaled branch, which gives that sum a zero cotangent: 0 * inf
    # would make the whole gradient NaN (jax.grad through a clip, ord=100).
    d = p * a ** (p - 1)
    return a**p, jnp.where(jnp.isfinite(d), d, jnp.zeros_like(d)) * t


_power.defjvp(_power_jvp)  # not as a decorator: jax is typed Any here


def _unless(ok: Any, fast: Callable[[], Any], fallback: Callable[[], Any]) -> Any:
    """``fast()`` where ``ok``, else ``fallback()``, with only the branch taken run.

    A ``lax.cond`` would do, but XLA's ConditionalSimplifier rewrites a
    conditional on a PRED whose branches hold only reductions and elementwise
    ops into a select of both, and it does on the GPU: the two-pass fallback
    then ran on every call (the llm tree's norm took 4.0 ms on an H100, the
    one-pass sum 2.0 ms). The rewrite takes a PRED only, and it sees one
    through the int32 ``convert`` of ``lax.cond``'s index; ``lax.switch``
    clamps its index, which hides the PRED and keeps the conditional (2.3 ms;
    ``test_the_norms_fallback_stays_a_conditional_on_a_gpu`` checks it).
    """
    return lax.switch(ok.astype(jnp.int32), [fallback, fast])


def _pnorm(leaves: Sequence[Any], p: float, zero: bool, axes: Axes, groups: Sequence[Any]) -> Any:
    """Global ``p``-norm (finite ``p > 0``) and the finite flag, overflow-safe."""
    bufs, keys = _buffers(leaves, groups)
    plan = Plan(jnp, p, bufs, zero_nonfinite=zero)
    masks = {key: _primary(key) for key in set(keys) if key}
    acc = jnp.dtype(plan.acc)
    tiny = _trusted_above(plan)
    size = sum(math.prod(x.shape) for x in leaves)
    if not bufs:
        return jnp.zeros((), plan.res), jnp.asarray(True)

    def powsum(i: int, b: Any) -> Any:
        a = plan._magnitude(b, plan.is_complex(i))
        if zero:
            a = jnp.where(jnp.isfinite(a), a, jnp.zeros_like(a))
        return jnp.sum(a * a if p == 2 else a if p == 1 else _power(a, p))

    total = _psum(_masked_sum([powsum(i, b) for i, b in enumerate(bufs)], keys, masks), axes)
    if zero:
        flags = [jnp.all(jnp.isfinite(b)) for b in bufs]
        finite = _psum(_masked_sum([(~f).astype(jnp.int32) for f in flags], keys, masks), axes) == 0

    def fast() -> tuple[Any, Any]:
        # True here either way; taken from the sum so that inside shard_map,
        # with no axis_name, it varies over the mesh as the other branch's does.
        return root(jnp, total, p).astype(plan.res), finite if zero else jnp.isfinite(total)

    def scaled() -> tuple[Any, Any]:
        # The two-pass reduction: each buffer scaled by a power of two near
        # its largest entry (by that entry, for very large p), the pairs
        # merged at the largest exponent.
        parts = [plan.leaf(i) for i in range(len(bufs))]
        none = jnp.asarray(plan.exp_none, acc)
        values = jnp.stack([q.value for q in parts])
        exps = jnp.stack([none if q.exp is None else q.exp for q in parts])
        # A sum of 0 (zeros, or a replica counted on another device) must not
        # set the common exponent, or it would flush the others' tiny sums.
        counted = jnp.stack([masks.get(k, True) for k in keys])  # not a replica elsewhere
        live = jnp.where(counted, plan.exp_live(values, exps), plan.exp_floor)
        terms, top = plan.at_top(values, exps, _pmax(jnp.max(live), axes))
        s = _psum(_masked_sum(list(terms), keys, masks), axes)
        norm = plan.norm(Partial(s, top, None), size)
        flag = finite if zero else jnp.isfinite(s)
        return norm, flag

    ok = jnp.isfinite(total) & (total >= tiny)
    return _unless(ok, fast, scaled)


def _leaf_groups(leaves: Sequence[Any], layout: Any) -> list[Any]:
    if layout is None:
        return [()] * len(leaves)
    mesh, specs = layout
    return [_replicated(mesh, spec) for spec in specs]


def _fast_ord(p: float) -> bool:
    """Whether the one-pass path covers this ``ord`` (else the generic core does)."""
    return p > 0 and not math.isinf(p)


# -------------------------------------------------------------------- scaling


def _scale_all(plan: Plan, scale: Any, zero: bool) -> Any:
    """Every leaf of ``plan`` times ``scale`` (:meth:`Plan.scaled`: the generic arithmetic)."""

    def mul(leaves: list[Any]) -> list[Any]:
        return [plan.scaled(i, x, scale, zero) for i, x in enumerate(leaves)]

    if zero:  # NaN/inf entries must become 0 even where the scale is 1
        return mul(plan.leaves)
    # Skip the write on the device when nothing needs clipping. NaN != 1, so
    # a NaN norm still reaches every leaf (torch's arithmetic). On GPUs too:
    # on an H100 a 3.76 GiB tree took 4.9 ms unclipped with the conditional
    # and 7.95 ms without it, and about 8 ms clipped either way.
    return lax.cond(scale != 1, mul, list, list(plan.leaves))


def _clip(
    leaves: list[Any],
    max_norm: Any,
    norm: Any,
    *,
    p: float,
    eps: float,
    nonfinite: str,
    axes: Axes,
    groups: Sequence[Any],
) -> tuple[list[Any], ClipStats]:
    plan = Plan(jnp, p, leaves)  # the dtype rules: result dtype, constants
    if norm is None:
        norm, finite = _pnorm(leaves, p, nonfinite == "zero", axes, groups)
    else:
        norm = jnp.asarray(norm, plan.res)
        finite = jnp.isfinite(norm)
    scale = _core._scale_from_norm(plan, norm, max_norm, eps)
    if nonfinite == "skip":
        scale = jnp.where(finite, scale, jnp.ones_like(scale))
    out = _scale_all(plan, scale, nonfinite == "zero")
    return out, ClipStats(norm, scale, scale < 1, finite)


# ------------------------------------------------------------ compiled entry


def _sharded(fn: Callable[..., Any], layout: Any, clips: bool) -> Callable[..., Any]:
    """``fn(leaves, *args, axes=...)`` run per device under ``shard_map``."""
    mesh, specs = layout
    spec = jax.sharding.PartitionSpec
    out_specs = (list(specs), spec()) if clips else spec()

    def call(leaves: list[Any], *args: Any) -> Any:
        return jax.shard_map(
            lambda ls, *a: fn(ls, *a, axes=tuple(mesh.axis_names)),
            mesh=mesh,
            in_specs=(list(specs), *(spec() for _ in args)),
            out_specs=out_specs,
            # The body reduces with explicit psums over every mesh axis; the
            # varying-axes type check would reject reshaping a shard.
            check_vma=False,
        )(leaves, *args)

    return call


@functools.cache
def _compiled(clips: bool, statics: tuple[Any, ...], layout: Any, options: Options) -> Any:
    """A jitted global norm ``(leaves)`` or clip ``(leaves, max_norm, norm)``."""
    p, eps, nonfinite, axes = statics

    def norm(leaves: list[Any], *, axes: Axes = axes) -> Any:
        return _pnorm(leaves, p, nonfinite == "zero", axes, _leaf_groups(leaves, layout))[0]

    def clip(leaves: list[Any], max_norm: Any, norm: Any, *, axes: Axes = axes) -> Any:
        groups = _leaf_groups(leaves, layout)
        return _clip(
            leaves, max_norm, norm, p=p, eps=eps, nonfinite=nonfinite, axes=axes, groups=groups
        )

    fn: Callable[..., Any] = clip if clips else norm
    return jit_with(fn if layout is None else _sharded(fn, layout, clips), options)


@functools.lru_cache(maxsize=256)  # bounded: see gradclip.jax._program
def _generic(fn: str, statics: tuple[tuple[str, Any], ...], options: Options) -> Any:
    """The generic reference ``_core.<fn>`` compiled as one program."""
    impl = getattr(_core, fn)

    def run(leaves: list[Any], dynamic: dict[str, Any]) -> Any:
        return impl(jnp, leaves, (), **dict(statics), **dynamic)

    return jit_with(run, options)


def _finite(leaves: list[Any]) -> Any:
    bufs, _ = _buffers(leaves, [()] * len(leaves))
    return jnp.stack([jnp.all(jnp.isfinite(b)) for b in bufs])


@functools.cache
def _finite_flags(options: Options) -> Any:
    """A flag per buffer of :func:`_buffers` (large leaves, small ones concatenated), one pass.

    One reduction per leaf, as this used to be, took 75 s to compile on a
    tree of 2000 small leaves (a kernel per distinct shape, see
    FAST_COMPILE); grouped, about a second, and it runs no slower.
    """
    return jit_with(_finite, options)


def _nonfinite_leaves(leaves: Sequence[Any]) -> list[int]:
    """Indices of the leaves holding a NaN or an infinity: one compiled pass, then the host.

    Where a group of small leaves is flagged, its members are read back and
    checked one by one; the call raises then, so the copy costs no step.
    """
    whole, small = _partition(leaves, [()] * len(leaves))
    if not (whole or small):
        return []  # only empty leaves
    flags = np.asarray(run_compiled(_finite_flags, leaves, list(leaves)))
    bad = [i for i, ok in zip(whole, flags[: len(whole)], strict=True) if not ok]
    for members, ok in zip(small.values(), flags[len(whole) :], strict=True):
        if not ok:
            bad += [i for i in members if not np.isfinite(np.asarray(leaves[i])).all()]
    return sorted(bad)


def check_finite(fn: str, leaves: Sequence[Any], names: Sequence[str], norm: Any = None) -> None:
    """``nonfinite="raise"``, before the compiled ``"propagate"`` program runs.

    One compiled pass reads a flag per leaf back to the host, to name the bad
    leaf (or, when ``norm`` is given, that norm is checked, as in the generic
    path). The program itself then compiles, and donates, as any other.
    """
    _compat.refuse_traced_raise(fn, leaves)
    if norm is not None:
        _core.check_given(jnp, jnp.asarray(norm, Plan(jnp, 2.0, list(leaves)).res), names)
    elif leaves:
        _core.raise_nonfinite(names, _nonfinite_leaves(leaves), fn)


# What nonfinite="raise" checks besides the leaves: the norm each function takes.
_MEASURED = {
    "global_norm": "global",
    "clip_by_global_norm": "global",
    "leaf_norms": "leaf",
    "clip_by_norm": "leaf",
}


def check_raise(
    fn: str, leaves: Sequence[Any], names: Sequence[str], norm: Any = None, p: float = 2.0
) -> None:
    """``nonfinite="raise"``: :func:`check_finite`, then the norms (unless given).

    A norm past its dtype raises (:func:`gradclip._core.check_overflow`):
    a clip's scale would zero the gradients, and a donated program cannot
    raise after it has run. One more compiled pass, for the norms alone.
    """
    check_finite(fn, leaves, names, norm)
    if norm is None and leaves and fn in _MEASURED:
        measure = global_norm if _MEASURED[fn] == "global" else leaf_norms
        norms = measure(jnp, list(leaves), names, p=p, nonfinite="propagate")
        _core.check_overflow(jnp, norms, names)


# Arguments that may be arrays (a schedule's value): passed to the compiled
# program, not baked into it, so a new value compiles nothing.
_DYNAMIC = ("max_norm", "norm", "threshold", "lo", "hi")


def baked_bounds(leaves: Sequence[Any], **bounds: Any) -> dict[str, float]:
    """The value bounds to bake into the program rather than pass to it.

    A number bound of a half-precision leaf: passed, it would be a float32
    (or float64) that the clamp rounds again to the leaf's dtype, where the
    generic path rounds the number once (1 + 2**-11 + 2**-40 is 1.001 in
    float16, but 1.0 through float32). Each new value compiles anew.
    """
    # A float32 number is rounded once all the same; and -0.0 and 0.0, equal
    # keys of the program cache, must not be baked. The bounds are looked at
    # first: most (0.5, 1.0) are float32s, and then no leaf need be.
    with np.errstate(over="ignore"):  # past float32: inf either way
        inexact = {
            k: v for k, v in bounds.items() if isinstance(v, float) and float(np.float32(v)) != v
        }
    if inexact and any(getattr(getattr(x, "dtype", None), "itemsize", 0) == 2 for x in leaves):
        return inexact
    return {}


def _call_generic(fn: str, leaves: list[Any], names: Sequence[str], **kwargs: Any) -> Any:
    """``_core.<fn>`` on the leaves, compiled (``nonfinite="raise"`` checked first)."""
    kwargs["nonfinite"] = _raise_first(
        fn, leaves, names, kwargs["nonfinite"], kwargs.get("norm"), None, kwargs.get("p", 2.0)
    )
    baked = baked_bounds(leaves, **{k: kwargs[k] for k in ("lo", "hi") if k in kwargs})
    dynamic = {k: kwargs.pop(k) for k in _DYNAMIC if k in kwargs and k not in baked}
    make = functools.partial(_generic, fn, tuple(sorted(kwargs.items())))
    return run_compiled(make, leaves, list(leaves), dynamic)


# ------------------------------------------------------- the _core interface


def global_norm(
    xp: Any,
    leaves: list[Any],
    names: Sequence[str],
    *,
    p: float,
    nonfinite: str,
    axis_name: Any = None,
    layout: Any = None,
) -> Any:
    """:func:`gradclip._core.global_norm`, in one pass for finite ``p > 0``.

    ``layout``: the ``(mesh, specs)`` of the caller's concrete leaves, when
    they are tracers here (gradclip.jax compiles around this function).
    """
    axes = _axes(axis_name)
    nonfinite = _raise_first("global_norm", leaves, names, nonfinite, None, axes, p)
    if not _fast_ord(p):
        _no_axes(axes, p, nonfinite)
        return _call_generic("global_norm", leaves, names, p=p, nonfinite=nonfinite)
    if axes is None and layout is None:
        layout = mesh_layout(leaves)
    make = functools.partial(_compiled, False, (p, 0.0, nonfinite, axes), layout)
    return run_compiled(make, leaves, list(leaves))


def clip_by_global_norm(
    xp: Any,
    leaves: list[Any],
    names: Sequence[str],
    *,
    max_norm: Any,
    p: float,
    eps: float,
    nonfinite: str,
    norm: Any,
    inplace: bool,
    axis_name: Any = None,
    layout: Any = None,
) -> tuple[list[Any], ClipStats]:
    """:func:`gradclip._core.clip_by_global_norm`, in one pass for finite ``p > 0``."""
    axes = _axes(axis_name)
    nonfinite = _raise_first("clip_by_global_norm", leaves, names, nonfinite, norm, axes, p)
    if not _fast_ord(p):
        _no_axes(axes, p, nonfinite)
        return _call_generic(  # type: ignore[no-any-return]
            "clip_by_global_norm",
            leaves,
            names,
            max_norm=max_norm,
            p=p,
            eps=eps,
            nonfinite=nonfinite,
            norm=norm,
            inplace=inplace,
        )
    if axes is not None or norm is not None:
        layout = None  # already per device, or nothing to reduce
    elif layout is None:
        layout = mesh_layout(leaves)
    make = functools.partial(_compiled, True, (p, eps, nonfinite, axes), layout)
    return run_compiled(make, leaves, list(leaves), max_norm, norm)  # type: ignore[no-any-return]


def _raise_first(
    fn: str,
    leaves: Sequence[Any],
    names: Sequence[str],
    nonfinite: str,
    norm: Any = None,
    axes: Axes = None,
    p: float = 2.0,
) -> str:
    """``nonfinite="raise"`` checked now (:func:`check_raise`); the policy the program runs."""
    if nonfinite != "raise":
        return nonfinite
    _no_axes(axes, p, nonfinite)
    check_raise(fn, leaves, names, norm, p)
    return "propagate"


def _no_axes(axes: Axes, p: float, nonfinite: str) -> None:
    if axes is not None:
        raise ValueError(
            f"axis_name= needs a finite ord > 0 and nonfinite other than 'raise'; "
            f"got ord={p}, nonfinite={nonfinite!r}"
        )


def _generic_entry(fn: str) -> Callable[..., Any]:
    def call(xp: Any, leaves: list[Any], names: Sequence[str], **kwargs: Any) -> Any:
        return _call_generic(fn, leaves, names, **kwargs)

    call.__name__ = fn
    call.__doc__ = f":func:`gradclip._core.{fn}`, compiled as one program."
    return call


# The per-leaf functions: the generic reference, compiled.
leaf_norms = _generic_entry("leaf_norms")
clip_by_norm = _generic_entry("clip_by_norm")
clip_by_block_rms = _generic_entry("clip_by_block_rms")
clip_by_value = _generic_entry("clip_by_value")


# ---------------------------------------------------------------- per example


def _explicit_spec(x: Any) -> tuple[Any, ...] | None:
    """``x``'s spec, one entry per axis, where its mesh has Explicit axes (else ``None``).

    On such a mesh JAX types shardings, and refuses an operation whose
    operands' shardings disagree or whose result sharding is ambiguous.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    types = getattr(getattr(sharding, "mesh", None), "axis_types", ())
    if jax.sharding.AxisType.Explicit not in types:
        return None
    spec: tuple[Any, ...] = tuple(getattr(sharding, "spec", ()))
    return spec + (None,) * (int(x.ndim) - len(spec))


def _on_mesh_of(x: Any, *spec: Any) -> Any:
    """A ``NamedSharding`` of ``spec`` on ``x``'s mesh.

    Not a bare ``PartitionSpec``: JAX takes one only under ``jax.set_mesh``,
    and the caller need not be under it.
    """
    mesh = (jax.typeof(x) if isinstance(x, jax.core.Tracer) else x).sharding.mesh
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def _along(v: Any, x: Any, axis: int) -> Any:
    """The ``(batch,)`` array ``v`` sharded as ``x``'s ``axis`` (on Explicit meshes)."""
    spec = _explicit_spec(x)
    if spec is None or _explicit_spec(v) == (spec[axis],):
        return v
    return jax.sharding.reshard(v, _on_mesh_of(x, spec[axis]))


def _combine(plan: Plan, x: Any, scale: Any, axis: int, reduce: str | None) -> Any:
    """:func:`gradclip._core._combine` without reshaping the leaf to ``(batch, rest)``.

    The reshape merged the axes after the batch one, which JAX refuses on an
    Explicit mesh where one of them is sharded, and which gathered it on an
    Auto mesh. The sum is a ``tensordot`` over the batch axis (a dot, which
    XLA partitions over the other axes), not a product summed over it:
    that reduction, unreshaped, ran 45x slower on the CPU.
    """
    factors = _along(_core._factors(plan, x, scale), x, axis)
    work = x.astype(factors.dtype)
    if reduce is None:
        others = tuple(d for d in range(x.ndim) if d != axis)
        return (work * jnp.expand_dims(factors, others)).astype(x.dtype)
    spec = _explicit_spec(x)
    out = None if spec is None else _on_mesh_of(x, *spec[:axis], *spec[axis + 1 :])
    y = jnp.tensordot(factors, work, axes=([0], [axis]), out_sharding=out)
    if reduce == "mean" and x.shape[axis]:  # after the sum (see _core.per_example_clip)
        y = y / x.shape[axis]
    return y.astype(x.dtype)


def _row_sums(plan: Plan, axes: Sequence[int], square: bool) -> list[Any]:
    """Each leaf's per-example ``sum(|g|**2)`` (or ``sum(|g|)``) in the accumulator, one pass."""
    out = []
    for i, x in enumerate(plan.leaves):
        a = plan._magnitude(x, plan.is_complex(i))
        others = tuple(d for d in range(x.ndim) if d != axes[i])
        out.append(jnp.sum(a * a if square else a, axis=others))
    return out


def _example_parts(plan: Plan, axes: Sequence[int], batch: int, per_layer: bool) -> list[Partial]:
    """The per-example partials of every leaf, in one pass where that is exact.

    The generic reduction scales each example by a power of two near its
    largest entry: two passes, and XLA on the CPU runs them 15x slower than
    one plain sum of squares. So, as for the global norm, the plain sums are
    taken first, and the scaled reduction runs (:func:`_unless`) only where they
    overflowed or may have lost entries to underflow. An all-zero example
    (a padded one) has a sum of 0 either way: a sum of ``|g|`` tells it apart
    from an underflow before falling back.
    """
    parts = range(len(plan.leaves))

    def common(v: Any) -> Any:
        # Leaves may shard their batch axes differently; their per-example
        # partials are added and stacked, so they share the first one's.
        return v if v is None or not parts else _along(v, plan.leaves[0], axes[0])

    def exact() -> list[Partial]:
        return [Partial(*map(common, plan.example_part(i, axes[i], batch))) for i in parts]

    if not any(map(plan._needs_scaling, parts)):
        return exact()
    acc = jnp.dtype(plan.acc)
    tiny = _trusted_above(plan)
    sums = [common(v) for v in _row_sums(plan, axes, square=True)]

    def checked(values: list[Any]) -> list[Any]:
        # Flat clipping needs the total right; per-layer clipping every leaf's.
        return values if per_layer else [functools.reduce(jnp.add, values)]

    # Exponents of 0 shaped and sharded as the sums: the branches of a cond
    # must agree, and a batch sharded over an explicit mesh stays sharded.
    def plain() -> list[tuple[Any, Any]]:
        return [(v, jnp.zeros_like(v, acc)) for v in sums]

    def scaled() -> list[tuple[Any, Any]]:
        pairs = [(q.value, q.exp) for q in exact()]
        return [(v, jnp.zeros_like(v, acc) if e is None else e) for v, e in pairs]

    def zero_or_scaled() -> list[tuple[Any, Any]]:
        l1 = checked([common(v) for v in _row_sums(plan, axes, square=False)])
        fine = [
            jnp.all(jnp.isfinite(s) & ((s >= tiny) | (a == 0)))
            for s, a in zip(checked(sums), l1, strict=True)
        ]
        return _unless(jnp.all(jnp.stack(fine)), plain, scaled)  # type: ignore[no-any-return]

    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(s) & (s >= tiny)) for s in checked(sums)]))
    pairs = _unless(ok, plain, zero_or_scaled)
    return [Partial(v, e, None) for v, e in pairs]


@functools.cache
def _per_example(statics: tuple[tuple[str, Any], ...], options: Options) -> Any:
    kwargs = dict(statics)

    def parts_of(plan: Plan) -> list[Partial]:
        return _example_parts(plan, kwargs["axes"], kwargs["batch"], kwargs["per_layer"])

    def run(leaves: list[Any], max_norm: Any) -> Any:
        # Full float32 products in the contraction: JAX's default lets GPUs
        # round them to TF32, 1e-3 off.
        with jax.default_matmul_precision("highest"):
            return _core.per_example_clip(
                jnp, leaves, (), max_norm=max_norm, parts_of=parts_of, combine=_combine, **kwargs
            )

    return jit_with(run, options)


def per_example_clip(xp: Any, leaves: list[Any], names: Sequence[str], **kwargs: Any) -> Any:
    """:func:`gradclip._core.per_example_clip`, compiled, with one-pass norms."""
    kwargs["nonfinite"] = _raise_first("per_example_clip", leaves, names, kwargs["nonfinite"])
    max_norm = kwargs.pop("max_norm")
    kwargs["axes"] = tuple(kwargs["axes"])
    make = functools.partial(_per_example, tuple(sorted(kwargs.items())))
    return run_compiled(make, leaves, list(leaves), max_norm)
