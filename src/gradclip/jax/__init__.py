"""gradclip's functions compiled with ``jax.jit``: pytree in, pytree out.

Each function here is the top-level function of the same name compiled as one
XLA program (cached per tree structure, shapes and static options), with two
additions: ``donate=True`` lets XLA write the result into the gradients'
buffers, and ``axis_name=`` (global norms only) reduces across the devices of
a ``shard_map``. The top-level functions take the same path for JAX leaves.

Any JAX-registered pytree works (dicts, flax ``FrozenDict``, equinox modules).
Nothing branches in Python on a value and nothing syncs with the host, except
``nonfinite="raise"``, which must look at the values to name the bad leaf: a
compiled pass reads one finite flag per leaf, and then the program runs.

Global norms take one pass over the gradients in float32 and fall back to a
scaled two-pass reduction, on the device, only when the float32 sum overflows
or underflows: float32 gradients of 1e30 or 1e-30 get the right norm, as
everywhere in gradclip. Arrays sharded with a ``NamedSharding`` keep their
sharding, and their norm costs one all-reduce of partial sums.

XLA compiles a kernel per distinct leaf shape; on the CPU, trees of hundreds
of small leaves of distinct shapes are compiled with options that make that
several times cheaper (:func:`compiler_options`, which a caller's own
``jax.jit`` can take too).

Examples
--------
>>> import jax.numpy as jnp
>>> import gradclip.jax as gcj
>>> grads = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([1e30, 0.0])}
>>> clipped, stats = gcj.clip_by_global_norm(grads, 1.0)
>>> stats.norm  # optax and torch return inf here and zero the gradients
Array(1.e+30, dtype=float32)
>>> clipped["b"]
Array([1., 0.], dtype=float32)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _api, _compat
from .._norms import parse_ord
from .._stats import ClipStats, PerExampleStats
from .._tree import _materialise
from . import _fast
from ._fast import jax

__all__ = [
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "compiler_options",
    "global_norm",
    "leaf_norms",
    "per_example_clip",
]


def _extra(**kw: Any) -> dict[str, Any]:
    """The options only the JAX path takes, passed on only when set."""
    return {k: v for k, v in kw.items() if v is not None}


def _norm(tree: Any, *, ord: float, nonfinite: str, axis_name: Any, layout: Any) -> Any:
    return _api._global_norm(
        "gradclip.jax.global_norm",
        tree,
        ord,
        nonfinite=nonfinite,
        fused=True,
        **_extra(axis_name=axis_name, layout=layout),
    )


def _clip(
    tree: Any,
    max_norm: Any,
    norm: Any,
    *,
    per_leaf: bool,
    axis_name: Any = None,
    layout: Any = None,
    **kw: Any,
) -> Any:
    fn = "gradclip.jax.clip_by_norm" if per_leaf else "gradclip.jax.clip_by_global_norm"
    return _api._clip_norm(
        fn,
        tree,
        max_norm,
        norm=norm,
        fused=True,
        inplace=False,
        per_leaf=per_leaf,
        **kw,
        **_extra(axis_name=axis_name, layout=layout),
    )


def _value(
    tree: Any, lo: Any, hi: Any, *, nonfinite: str, baked: tuple[tuple[str, float], ...]
) -> Any:
    bounds = {"lo": lo, "hi": hi, **dict(baked)}
    return _api.clip_by_value(tree, **bounds, nonfinite=nonfinite, fused=True)


def _block_rms(tree: Any, threshold: Any, *, nonfinite: str) -> Any:
    return _api.clip_by_block_rms(tree, threshold, nonfinite=nonfinite, fused=True)


def _per_example(tree: Any, max_norm: Any, **kw: Any) -> Any:
    return _api.per_example_clip(tree, max_norm, **kw)


_BODIES: dict[str, Callable[..., Any]] = {
    "norm": _norm,
    "leaf_norms": lambda tree, **kw: _api.leaf_norms(tree, fused=True, **kw),
    "clip": functools.partial(_clip, per_leaf=False),
    "clip_per_leaf": functools.partial(_clip, per_leaf=True),
    "value": _value,
    "block_rms": _block_rms,
    "per_example": _per_example,
}


# Bounded: a number bound of a half-precision tree is part of the key
# (see _fast.baked_bounds), and a schedule of numbers gives a key a step.
@functools.lru_cache(maxsize=256)
def _program(
    body: str, donate: bool, static: tuple[tuple[str, Any], ...], options: _fast.Options
) -> Any:
    fn = functools.partial(_BODIES[body], **dict(static))
    return _fast.jit_with(fn, options, donate_argnums=(0,) if donate else ())


def _layout(tree: Any) -> Any:
    """The mesh and specs of a tree of sharded arrays, seen before ``jit`` hides them."""
    return _fast.mesh_layout(jax.tree_util.tree_leaves(tree))


# The public name of each body, for nonfinite="raise"'s messages.
_NAMES = {
    "norm": "global_norm",
    "clip": "clip_by_global_norm",
    "clip_per_leaf": "clip_by_norm",
    "value": "clip_by_value",
    "block_rms": "clip_by_block_rms",
    "per_example": "per_example_clip",
}


# The bodies that reduce sharded leaves inside shard_map (see _layout).
_SHARDED = frozenset({"norm", "clip"})


def _buffers(x: Any) -> Any:
    """What identifies ``x``'s device memory, which two arrays may share.

    ``jax.device_put`` of a tree that holds one array twice gives two.
    """
    try:
        return tuple(s.data.unsafe_buffer_pointer() for s in x.addressable_shards)
    except (AttributeError, RuntimeError, ValueError):  # a NumPy leaf, a deleted array
        return id(x)


def _owned_by_a_transform(leaves: list[Any]) -> bool:
    """Whether a caller's transform other than ``vmap`` traces a leaf: its buffers are not ours.

    A caller's jit ignores donation, and under grad the forward pass's
    inputs are read again by the backward pass ("Array has been deleted").
    Under vmap alone the batched arrays are donated. (Batch tracers are
    known by name: jax exports no type for them.)
    """
    if not any(issubclass(t, jax.core.Tracer) for t in set(map(type, leaves))):
        return False
    for x in leaves:
        while type(x).__name__ == "BatchTracer":
            x = x.val
        if isinstance(x, jax.core.Tracer):
            return True
    return False


def _refuse_donating_twice(tree: Any, fn: str) -> None:
    """Raise, naming the leaves, for one buffer given twice (tied weights) with ``donate``."""
    flat = _api._prepare(tree, f"gradclip.jax.{fn}").flat
    first: dict[Any, int] = {}
    for i, x in enumerate(flat.leaves):
        j = first.setdefault(_buffers(x), i)
        if j != i:
            raise ValueError(
                f"gradclip.jax.{fn}: donate=True, but leaf {flat.paths[i]} is (or shares the "
                f"buffer of) leaf {flat.paths[j]}, and XLA cannot donate one buffer twice; pass "
                "donate=False, or the array once"
            )


def _call(body: str, donate: bool, dynamic: tuple[Any, ...], **static: Any) -> Any:
    tree, *rest = dynamic
    tree = _materialise(tree)  # a generator or dict view, as at the top level
    fn = _NAMES.get(body, body)
    if body in _SHARDED:
        static["layout"] = _layout(tree)
    leaves = jax.tree_util.tree_leaves(tree)
    if not all(issubclass(t, jax.Array) for t in set(map(type, leaves))):
        # A leaf of another library, or no array at all, raises naming the
        # leaf, as at the top level (jit would take them in silently); a
        # tree of NumPy arrays alone goes to the device as jit does.
        _api._prepare(tree, f"gradclip.jax.{fn}")
    if donate and _owned_by_a_transform(leaves):
        donate = False
    if donate and len(set(map(id, leaves))) < len(leaves):
        _refuse_donating_twice(tree, fn)
    if "eps" in static:  # a float: a key of the programs' cache (an array is not hashable)
        static["eps"] = _api._check_eps(static["eps"])
    if "ord" in static:  # a float, hashable for the programs' cache (a jnp 2.0 is not)
        static["ord"] = parse_ord(static["ord"])
    if static.get("nonfinite") == "raise":
        # Naming the leaf that holds a NaN needs its value on the host: the
        # leaves (or a given norm) are checked first, then the program runs,
        # compiled and donated like any other, with nothing left to raise.
        flat = _api._prepare(tree, f"gradclip.jax.{fn}").flat
        given = rest[1] if body.startswith("clip") else None
        _fast.check_raise(fn, flat.leaves, flat.paths, given, static.get("ord", 2.0))
        static["nonfinite"] = "propagate"
    make = functools.partial(_program, body, donate, tuple(sorted(static.items())))
    try:
        with _compat.quiet(None):  # a Python bound past float32 is rounded to inf, unwarned
            return _fast.run_compiled(make, leaves, tree, *rest)
    except jax.errors.JaxRuntimeError as err:
        # Two arrays of one buffer: found only here, as reading every leaf's
        # buffer first costs 2 us a leaf. XLA has run nothing, deleted nothing.
        if donate and "same buffer twice" in str(err):
            _refuse_donating_twice(tree, fn)
        raise


def global_norm(
    tree: Any, ord: float = 2.0, *, nonfinite: str = "propagate", axis_name: Any = None
) -> Any:
    """:func:`gradclip.global_norm`, compiled.

    Parameters
    ----------
    tree : pytree of JAX arrays
        Any JAX-registered pytree.
    ord : float, default 2.0
        As for :func:`gradclip.global_norm`.
    nonfinite : {"propagate", "raise", "zero"}, default "propagate"
        As for :func:`gradclip.global_norm`; ``"raise"`` reads a finite flag
        per leaf on the host before the compiled program runs.
    axis_name : hashable or tuple, optional
        Inside ``shard_map``: the mesh axes the leaves are sharded over. Each
        device passes its own shards and gets the norm of the whole tree,
        through one ``psum`` of partial sums. Every shard is counted, so pass
        leaves that are split, not replicated, over these axes. Needs a
        finite ``ord > 0``.

    Returns
    -------
    jax.Array
        0-d, float32 (float64 when a leaf is float64).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import gradclip.jax as gcj
    >>> gcj.global_norm([jnp.array([3.0, 4.0]), jnp.array([12.0])])
    Array(13., dtype=float32)
    """
    return _call(
        "norm",
        False,
        (tree,),
        ord=ord,
        nonfinite=nonfinite,
        axis_name=axis_name,
    )


def leaf_norms(tree: Any, ord: float = 2.0, *, nonfinite: str = "propagate") -> Any:
    """:func:`gradclip.leaf_norms`, compiled.

    Parameters
    ----------
    tree : pytree of JAX arrays
        Any JAX-registered pytree.
    ord : float, default 2.0
        As for :func:`gradclip.leaf_norms`.
    nonfinite : {"propagate", "raise", "zero"}, default "propagate"
        As for :func:`gradclip.leaf_norms`.

    Returns
    -------
    jax.Array
        One norm per leaf, in ``jax.tree_util`` flattening order.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import gradclip.jax as gcj
    >>> gcj.leaf_norms({"a": jnp.array([3.0, 4.0]), "b": jnp.array([-2.0])})
    Array([5., 2.], dtype=float32)
    """
    return _call("leaf_norms", False, (tree,), ord=ord, nonfinite=nonfinite)


def clip_by_global_norm(
    tree: Any,
    max_norm: Any,
    *,
    ord: float = 2.0,
    eps: float = 1e-6,
    nonfinite: str = "propagate",
    norm: Any = None,
    axis_name: Any = None,
    donate: bool = False,
) -> tuple[Any, ClipStats]:
    """:func:`gradclip.clip_by_global_norm`, compiled.

    Parameters
    ----------
    tree : pytree of JAX arrays
        Any JAX-registered pytree.
    max_norm : float or 0-d array
        As for :func:`gradclip.clip_by_global_norm`; an array is an argument
        of the compiled program, so changing it does not recompile.
    ord, eps, nonfinite, norm
        As for :func:`gradclip.clip_by_global_norm`.
    axis_name : hashable or tuple, optional
        As for :func:`global_norm`: inside ``shard_map``, the norm of the
        whole tree through one ``psum``.
    donate : bool, default False
        Donate ``tree``'s buffers: the clipped leaves are written into them
        and ``tree`` must not be used afterwards (``jax.jit``'s
        ``donate_argnums``; under ``jax.vmap`` the batched arrays are
        donated). Ignored inside a caller's ``jit`` or ``grad``, which own
        the buffers (a traced leaf is not donated). One array given twice
        (tied weights) cannot be donated: that raises ``ValueError``.

    Returns
    -------
    tree : pytree
        Same structure and shardings as ``tree``.
    stats : ClipStats
        0-d arrays: ``norm`` before clipping, ``scale``, ``clipped``, ``finite``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import gradclip.jax as gcj
    >>> grads = {"w": jnp.array([3.0, 4.0])}
    >>> clipped, stats = gcj.clip_by_global_norm(grads, 1.0, eps=0.0, donate=True)
    >>> clipped["w"], bool(stats.clipped)
    (Array([0.6, 0.8], dtype=float32), True)
    """
    max_norm = _api._check_bound(max_norm, "max_norm")
    return _call(  # type: ignore[no-any-return]
        "clip",
        donate,
        (tree, max_norm, norm),
        ord=ord,
        eps=eps,
        nonfinite=nonfinite,
        axis_name=axis_name,
    )


def clip_by_norm(
    tree: Any,
    max_norm: Any,
    *,
    ord: float = 2.0,
    eps: float = 1e-6,
    nonfinite: str = "propagate",
    norm: Any = None,
    donate: bool = False,
) -> tuple[Any, ClipStats]:
    """:func:`gradclip.clip_by_norm` (each leaf on its own), compiled.

    Parameters
    ----------
    tree : pytree of JAX arrays
        Any JAX-registered pytree.
    max_norm, ord, eps, nonfinite, norm
        As for :func:`gradclip.clip_by_norm`.
    donate : bool, default False
        As for :func:`clip_by_global_norm`.

    Returns
    -------
    tree : pytree
        Same structure as ``tree``.
    stats : ClipStats
        Per-leaf 1-d arrays.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import gradclip.jax as gcj
    >>> clipped, stats = gcj.clip_by_norm([jnp.array([3.0, 4.0]), jnp.array([0.5])], 1.0)
    >>> stats.clipped
    Array([ True, False], dtype=bool)
    """
    max_norm = _api._check_bound(max_norm, "max_norm")
    return _call(  # type: ignore[no-any-return]
        "clip_per_leaf", donate, (tree, max_norm, norm), ord=ord, eps=eps, nonfinite=nonfinite
    )


def clip_by_value(
    tree: Any,
    clip_value: Any = None,
    *,
    lo: Any = None,
    hi: Any = None,
    nonfinite: str = "propagate",
    donate: bool = False,
) -> Any:
    """:func:`gradclip.clip_by_value`, compiled.

    Parameters
    ----------
    tree : pytree of real floating JAX arrays
        Any JAX-registered pytree.
    clip_value, lo, hi, nonfinite
        As for :func:`gradclip.clip_by_value`. The bounds are arguments of the
        compiled program, so a new value (a number or a 0-d array) does not
        recompile; except a number bound of a tree with float16 or bfloat16
        leaves that float32 cannot hold exactly (0.1), which is baked in, so
        that it is rounded once to their dtype (a float32 argument would be
        rounded twice). Pass a 0-d array to change it without compiling.
    donate : bool, default False
        As for :func:`clip_by_global_norm`.

    Returns
    -------
    pytree
        Same structure as ``tree``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import gradclip.jax as gcj
    >>> gcj.clip_by_value([jnp.array([-3.0, 0.2, 9.0])], 1.0)
    [Array([-1. ,  0.2,  1. ], dtype=float32)]
    """
    low, high = _api._value_bounds(clip_value, lo, hi)
    tree = _materialise(tree)
    baked = _fast.baked_bounds(jax.tree_util.tree_leaves(tree), lo=low, hi=high)
    bounds = (None if k in baked else v for k, v in (("lo", low), ("hi", high)))
    return _call("value", donate, (tree, *bounds), nonfinite=nonfinite, baked=tuple(baked.items()))


def clip_by_block_rms(
    tree: Any, threshold: Any, *, nonfinite: str = "propagate", donate: bool = False
) -> Any:
    """:func:`gradclip.clip_by_block_rms` (``optax.clip_by_block_rms``), compiled.

    Parameters
    ----------
    tree : pytree of JAX arrays
        Any JAX-registered pytree.
    threshold, nonfinite
        As for :func:`gradclip.clip_by_block_rms`; ``threshold`` is an
        argument of the compiled program, as ``clip_by_value``'s bounds are.
    donate : bool, default False
        As for :func:`clip_by_global_norm`.

    Returns
    -------
    pytree
        Same structure as ``tree``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import gradclip.jax as gcj
    >>> out = gcj.clip_by_block_rms([jnp.array([3.0, 4.0])], 1.0)  # rms 3.54 -> 1
    >>> float(jnp.sqrt(jnp.mean(out[0] ** 2)))
    1.0
    """
    threshold = _api._check_bound(threshold, "threshold")
    return _call("block_rms", donate, (tree, threshold), nonfinite=nonfinite)


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
    donate: bool = False,
) -> tuple[Any, PerExampleStats]:
    """:func:`gradclip.per_example_clip` (DP-SGD's clipping step), compiled.

    Parameters
    ----------
    tree : pytree of JAX arrays
        Any JAX-registered pytree, every leaf with the examples on ``axis``.
    max_norm : float, 0-d array, or (with ``per_layer``) one bound per leaf
        As for :func:`gradclip.per_example_clip`. The bounds are arguments of
        the compiled program, so a new value does not recompile; numbers are
        checked (``> 0``) before the call, arrays are not.
    axis, reduce, per_layer, split, eps, nonfinite
        As for :func:`gradclip.per_example_clip`.
    donate : bool, default False
        As for :func:`clip_by_global_norm`. Only ``reduce=None`` returns
        arrays of the gradients' shapes that XLA can write into the donated
        buffers; with a reduction JAX warns that they went unused.

    Returns
    -------
    tree : pytree
        The clipped examples summed (or averaged) over the batch, or with
        ``reduce=None`` the clipped examples themselves.
    stats : PerExampleStats
        As for :func:`gradclip.per_example_clip`.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import gradclip.jax as gcj
    >>> grads = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}  # two examples
    >>> summed, stats = gcj.per_example_clip(grads, 1.0, eps=0.0)
    >>> summed["w"], stats.num_clipped
    (Array([0.90000004, 1.2       ], dtype=float32), Array(1, dtype=int32))
    """
    # Host values are checked here, as under jit they are tracers; a 1-d
    # array holds one bound per leaf (device ones go unchecked: a sync).
    for leaf in jax.tree_util.tree_leaves(max_norm):
        for bound in leaf if getattr(leaf, "ndim", 0) == 1 else [leaf]:
            _api._check_positive(bound, "max_norm")
    if isinstance(max_norm, int | np.number):  # a float, as the others: one program for all
        max_norm = float(max_norm)
    return _call(  # type: ignore[no-any-return]
        "per_example",
        donate,
        (tree, max_norm),
        axis=axis,
        reduce=reduce,
        per_layer=per_layer,
        split=split,
        eps=eps,
        nonfinite=nonfinite,
    )


def compiler_options(tree: Any) -> dict[str, Any]:
    """The XLA options gradclip.jax compiles its programs over ``tree`` with.

    XLA's CPU backend compiles a kernel for each distinct leaf shape, about
    10 ms apiece with its defaults: a tree of 2000 leaves of 1277 sizes
    takes 16-22 s to compile, however little the program does per leaf.
    For concrete arrays of at least 256 distinct shapes averaging at most
    2048 elements, in a program compiled for the CPU, gradclip.jax compiles
    with the legacy emitters at LLVM ``-O0`` instead, which takes that tree
    in 2-5 s and runs as fast on leaves that small (their code is not
    vectorized, which large leaves would pay for: they keep XLA's defaults,
    and this returns ``{}``). Where XLA no longer has the legacy emitters
    (jaxlib 0.11 on), ``-O0`` alone is left, which takes two thirds of the time.
    Programs compiled for another platform (committed to a GPU, or on a
    GPU default device) get ``{}``: these are the CPU compiler's options.

    Inside a caller's ``jit`` the caller compiles the whole program; pass
    these to its ``jax.jit(..., compiler_options=...)`` to get the same.

    Parameters
    ----------
    tree : pytree of JAX arrays
        Any JAX-registered pytree.

    Returns
    -------
    dict
        Options for ``jax.jit(compiler_options=...)``; empty for XLA's defaults.

    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import gradclip.jax as gcj
    >>> cpu = jax.devices("cpu")[0]
    >>> tree = [jnp.ones(n, device=cpu) for n in range(1, 301)]
    >>> gcj.compiler_options(tree)["xla_backend_optimization_level"]
    0
    >>> gcj.compiler_options({"w": jnp.ones((512, 512), device=cpu)})
    {}
    """
    return dict(_fast.compile_options(jax.tree_util.tree_leaves(tree)))
