"""optax gradient transformations whose state records what they did.

Each transform here wraps the top-level gradclip function of the same name
(:func:`gradclip.clip_by_global_norm` and friends, so it gets their
overflow-safe norms and whatever fast path they dispatch to) and keeps the
last :class:`~gradclip.ClipStats` in its state, next to counters of
non-finite steps. :func:`find_stats` digs the stats out of any optimizer
state built around one (``optax.chain``, ``optax.named_chain``,
``optax.MultiSteps``, ``optax.inject_hyperparams``, ...), so the norm before
clipping can be logged from outside the chain (optax issue #326).

The state is a :class:`ClipState` of arrays only, with no Python branch on a
value and no host sync in ``update``: it can be carried through ``jax.jit``,
``jax.lax.scan`` and ``jax.vmap``, and ``init`` returns the same structure,
shapes and dtypes as ``update``.

Unlike ``import gradclip``, importing this module imports jax and optax.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import gradclip as gc

from . import _api, _compat, _core
from . import adaptive as _adaptive
from ._norms import Plan
from ._stats import ClipStats

__all__ = [
    "AdaptiveState",
    "ClipState",
    "PerExampleState",
    "adagc",
    "adaptive",
    "agc",
    "autoclip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "find_all_states",
    "find_state",
    "find_stats",
    "per_example_clip",
    "zclip",
]

_DEFAULT_ORD = 2.0
_DEFAULT_EPS = 1e-6


class ClipState(NamedTuple):
    """The state of every transform in :mod:`gradclip.optax`.

    Attributes
    ----------
    stats : ClipStats
        What the last ``update`` saw and did (before ``init``'s first update:
        norm 0, scale 1, not clipped, finite). 0-d arrays for
        :func:`clip_by_global_norm` and :func:`clip_by_value`, 1-d arrays with
        one entry per leaf for :func:`clip_by_norm` and
        :func:`clip_by_block_rms`; each transform's docstring says what
        ``norm`` holds. With ``nonfinite="skip"``, ``stats.finite`` False
        means the update was replaced by zeros.
    notfinite_count : array
        int32, 0-d: consecutive steps whose gradients held a NaN or an
        infinity (0 after a finite step), as in ``optax.apply_if_finite``.
        Counted under every ``nonfinite`` policy.
    last_finite : array
        bool, 0-d: whether the last step's gradients were all finite.
    total_notfinite : array
        int32, 0-d: all steps so far whose gradients were not finite.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import gradclip.optax as gco
    >>> state = gco.clip_by_global_norm(1.0).init({"w": jnp.zeros(2)})
    >>> float(state.stats.norm), float(state.stats.scale), int(state.total_notfinite)
    (0.0, 1.0, 0)
    """

    stats: ClipStats
    notfinite_count: Any
    last_finite: Any
    total_notfinite: Any


# --------------------------------------------------------------------- validation


def _no_array(value: Any, name: str, what: str) -> None:
    """Reject a JAX array where gradclip needs a Python number, saying why."""
    if isinstance(value, jax.Array):
        raise TypeError(
            f"{name} must be a Python number, not a JAX array: {what}. Under "
            f"optax.inject_hyperparams, pass static_args=({name!r},) so that it stays one"
        )


def _check_max_norm(max_norm: Any) -> None:
    if isinstance(max_norm, jax.Array) and max_norm.ndim != 0:
        raise ValueError(f"max_norm must be a scalar; got an array of shape {max_norm.shape}")


def _check_static(ord: Any, eps: Any) -> tuple[Any, Any]:
    """Fill in the defaults (``None`` keeps ``inject_hyperparams`` from making arrays)."""
    ord = _DEFAULT_ORD if ord is None else ord
    eps = _DEFAULT_EPS if eps is None else eps
    _no_array(ord, "ord", "it chooses the norm at trace time")
    _no_array(eps, "eps", "gradclip takes eps as a Python float")
    return ord, eps


_RAISE_UNDER_TRACE = (
    'nonfinite="raise" must look at the gradient values on the host, which is impossible '
    "while JAX traces the update (jax.jit, jax.vmap, jax.lax.scan, optax.MultiSteps). "
    'Use nonfinite="skip" (the update becomes zeros and the step is counted in the state) '
    'or nonfinite="zero", or call update outside jit'
)


# ---------------------------------------------------------------------- machinery

# (updates, nonfinite policy) -> (new updates, ClipStats)
_Apply = Callable[[Any, str], tuple[Any, ClipStats]]


def _initial_stats(shapes: ClipStats) -> ClipStats:
    return ClipStats(
        norm=jnp.zeros(shapes.norm.shape, shapes.norm.dtype),
        scale=jnp.ones(shapes.scale.shape, shapes.scale.dtype),
        clipped=jnp.zeros(shapes.clipped.shape, bool),
        finite=jnp.ones(shapes.finite.shape, bool),
    )


def _like(stats: ClipStats, ref: ClipStats) -> ClipStats:
    """``stats`` as arrays of ``ref``'s dtypes, so update's state matches init's."""
    out = []
    for field, value, want in zip(ClipStats._fields, stats, ref, strict=True):
        value = jnp.asarray(value)
        if value.shape != want.shape:
            raise ValueError(
                f"the updates give stats.{field} of shape {value.shape}, but the state was "
                f"initialised with shape {want.shape}: init and update must see trees with "
                "the same leaves"
            )
        out.append(value.astype(want.dtype))
    return ClipStats(*out)


def _transform(apply: _Apply, nonfinite: str) -> Any:
    """A GradientTransformation running ``apply`` and keeping its stats in a ClipState."""
    skip = nonfinite == "skip"

    def init(params: Any) -> ClipState:
        # The stats' shapes and dtypes follow gradclip's rules (float64 when a
        # leaf is float64, one entry per leaf, ...): trace once to learn them.
        # "propagate" here: "raise" cannot be traced.
        return _new_state(jax.eval_shape(lambda p: apply(p, "propagate")[1], params))

    def update(updates: Any, state: ClipState, params: Any = None) -> tuple[Any, ClipState]:
        del params
        try:
            new, stats = apply(_jax_arrays(updates), nonfinite)
        except jax.errors.ConcretizationTypeError as exc:
            if nonfinite == "raise":
                raise TypeError(_RAISE_UNDER_TRACE) from exc
            raise
        return _record(new, stats, state, skip)

    return optax.GradientTransformation(init, update)


def _new_state(stats_shapes: ClipStats) -> ClipState:
    return ClipState(
        stats=_initial_stats(stats_shapes),
        notfinite_count=jnp.zeros([], jnp.int32),
        last_finite=jnp.array(True),
        total_notfinite=jnp.zeros([], jnp.int32),
    )


def _record(new: Any, stats: ClipStats, state: ClipState, skip: bool) -> tuple[Any, ClipState]:
    """Keep ``stats`` and count non-finite steps; with ``skip``, a bad step's update is zeros."""
    stats = _like(stats, state.stats)
    finite = jnp.all(stats.finite)
    if skip:
        # gradclip's "skip" leaves the leaves unchanged; optax.apply_if_finite
        # (which this mirrors) makes the update zeros instead.
        new = jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), new)
    bad = jnp.logical_not(finite)
    return new, ClipState(
        stats=stats,
        notfinite_count=jnp.where(
            bad, optax.safe_increment(state.notfinite_count), jnp.zeros([], jnp.int32)
        ),
        last_finite=finite,
        total_notfinite=jnp.where(
            bad, optax.safe_increment(state.total_notfinite), state.total_notfinite
        ),
    )


def _result_dtype(leaves: list[Any]) -> Any:
    """The result dtype by gradclip's rule: float64 when a leaf is float64, else float32.

    Without x64, JAX holds float64 as float32 (a NumPy float64 leaf asked
    jnp.zeros for float64, and JAX warned that it truncated it).
    """
    wide = any(jnp.dtype(x.dtype) == jnp.float64 for x in leaves)
    return jax.dtypes.canonicalize_dtype(jnp.float64 if wide else jnp.float32)


def _all_finite(leaves: list[Any]) -> Any:
    """1-d bool, one entry per leaf: every entry of the leaf is finite."""
    if not leaves:
        return jnp.zeros((0,), bool)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


# --------------------------------------------------------------------- transforms

_NONFINITE_DOC = """nonfinite : {"propagate", "raise", "zero", "skip"}, default "propagate"
        ``"skip"``: if any gradient entry is NaN or infinite, the update
        becomes zeros (as ``optax.apply_if_finite`` does) and the step is
        counted in the state. A stateful optimizer later in the chain still
        takes the step with those zeros (adam's moments decay and its update is
        not zero); wrap the whole chain in ``optax.apply_if_finite`` to leave
        it untouched. ``"propagate"`` and ``"zero"`` are passed to gradclip.
        ``"raise"`` raises :class:`~gradclip.NonFiniteError` from ``update``;
        it needs a host sync, so it works only when ``update`` is not traced
        (not under ``jax.jit``, ``jax.vmap`` or ``optax.MultiSteps``, where it
        raises ``TypeError``)."""


def clip_by_global_norm(
    max_norm: Any,
    *,
    ord: float | None = None,
    eps: float | None = None,
    nonfinite: str = "propagate",
) -> Any:
    """``optax.clip_by_global_norm`` with an overflow-safe norm and stats in its state.

    Every leaf of the update is multiplied by ``min(1, max_norm / (norm +
    eps))``, where ``norm`` is the norm of all leaves together
    (:func:`gradclip.clip_by_global_norm`). ``optax.clip_by_global_norm`` has
    no eps (pass ``eps=0`` to match it) and overflows to a zero update for
    float32 gradients of 1e30; this transform clips them.

    Parameters
    ----------
    max_norm : float or 0-d JAX array
        The largest global norm allowed. A Python number is checked here
        (negative or NaN raises ``ValueError``); an array (for example from
        ``optax.inject_hyperparams``) is used as is.
    ord : float, optional
        The norm, as for :func:`gradclip.global_norm`; ``None`` means 2.0.
        ``None`` rather than 2.0 is the default so that
        ``optax.inject_hyperparams``, which turns every numeric argument into
        an array, leaves it alone.
    eps : float, optional
        Added to the norm before dividing; ``None`` means 1e-6.
    {nonfinite}

    Returns
    -------
    optax.GradientTransformation
        Its state is a :class:`ClipState` whose ``stats`` hold 0-d arrays:
        the global norm before clipping, the scale, ``clipped`` and
        ``finite``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import gradclip.optax as gco
    >>> params = {{"w": jnp.zeros(2)}}
    >>> tx = optax.chain(gco.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({{"w": jnp.array([30.0, 40.0])}}, state, params)
    >>> updates["w"]
    Array([-0.06, -0.08], dtype=float32)
    >>> stats = gco.find_stats(state)
    >>> float(stats.norm), bool(stats.clipped)
    (50.0, True)
    """
    _check_max_norm(max_norm)
    ord, eps = _check_static(ord, eps)
    gc.clip_by_global_norm([], max_norm, ord=ord, eps=eps, nonfinite=nonfinite)  # validates

    def apply(updates: Any, policy: str) -> tuple[Any, ClipStats]:
        out: tuple[Any, ClipStats] = gc.clip_by_global_norm(
            updates, max_norm, ord=ord, eps=eps, nonfinite=policy
        )
        return out

    return _transform(apply, nonfinite)


def clip_by_norm(
    max_norm: Any,
    *,
    ord: float | None = None,
    eps: float | None = None,
    nonfinite: str = "propagate",
) -> Any:
    """Clip each leaf of the update on its own to norm ``max_norm``.

    Leaf ``i`` is multiplied by ``min(1, max_norm / (norm_i + eps))``
    (:func:`gradclip.clip_by_norm`, ``tf.clip_by_norm`` on every leaf).

    Parameters
    ----------
    max_norm : float or 0-d JAX array
        The largest norm allowed for each leaf, as for
        :func:`clip_by_global_norm`.
    ord : float, optional
        As for :func:`clip_by_global_norm`; ``None`` means 2.0.
    eps : float, optional
        As for :func:`clip_by_global_norm`; ``None`` means 1e-6.
    {nonfinite}
        With ``"skip"``, one non-finite leaf makes the whole update zeros.

    Returns
    -------
    optax.GradientTransformation
        Its state is a :class:`ClipState` whose ``stats`` hold 1-d arrays,
        one entry per leaf in ``jax.tree.leaves`` order: each leaf's norm
        before clipping, its scale, ``clipped`` and ``finite``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import gradclip.optax as gco
    >>> tx = gco.clip_by_norm(1.0, eps=0.0)
    >>> grads = {{"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}}
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> updates["a"]
    Array([0.6, 0.8], dtype=float32)
    >>> state.stats.norm
    Array([5. , 0.5], dtype=float32)
    """
    _check_max_norm(max_norm)
    ord, eps = _check_static(ord, eps)
    gc.clip_by_norm([], max_norm, ord=ord, eps=eps, nonfinite=nonfinite)  # validates

    def apply(updates: Any, policy: str) -> tuple[Any, ClipStats]:
        out: tuple[Any, ClipStats] = gc.clip_by_norm(
            updates, max_norm, ord=ord, eps=eps, nonfinite=policy
        )
        return out

    return _transform(apply, nonfinite)


def clip_by_block_rms(threshold: Any, *, nonfinite: str = "propagate") -> Any:
    """``optax.clip_by_block_rms``: divide each leaf by ``max(1, rms / threshold)``.

    The clipping is :func:`gradclip.clip_by_block_rms` (an overflow-safe rms,
    so float32 leaves of 1e30 are clipped rather than zeroed). The stats come
    from :func:`gradclip.leaf_norms`, one more read of the update unless XLA
    fuses the two reductions.

    Parameters
    ----------
    threshold : float or 0-d array
        The largest rms allowed for each leaf, ``>= 0``. It may be scheduled
        (``optax.inject_hyperparams``): an array value is used as is, unchecked.
    {nonfinite}
        With ``"skip"``, one non-finite leaf makes the whole update zeros.

    Returns
    -------
    optax.GradientTransformation
        Its state is a :class:`ClipState` whose ``stats`` hold 1-d arrays,
        one entry per leaf in ``jax.tree.leaves`` order: ``norm`` is the
        leaf's **rms** before clipping (0 for an empty leaf), ``scale`` the
        factor ``1 / max(1, rms / threshold)`` (1 for a non-finite leaf under
        ``"skip"``), ``clipped`` is ``scale < 1`` and ``finite`` says whether
        every entry of the leaf was finite.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import gradclip.optax as gco
    >>> tx = gco.clip_by_block_rms(1.0)
    >>> grads = {{"w": jnp.array([2.0, -2.0]), "b": jnp.array([0.5])}}
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> updates["w"]
    Array([ 1., -1.], dtype=float32)
    >>> state.stats.norm  # rms of "b", then of "w"
    Array([0.5, 2. ], dtype=float32)
    """
    gc.clip_by_block_rms([], threshold, nonfinite=nonfinite)  # validates
    t = threshold if isinstance(threshold, jax.Array) else float(threshold)

    def apply(updates: Any, policy: str) -> tuple[Any, ClipStats]:
        new = gc.clip_by_block_rms(updates, t, nonfinite=policy)
        leaves = jax.tree.leaves(updates)
        # The rms as the clip takes it (a norm past float32 with an rms
        # within it is not inf).
        plan = Plan(jnp, 2.0, leaves, zero_nonfinite=policy == "zero")
        roots = [_core.block_rms(plan, plan.leaf(i), x.size) for i, x in enumerate(leaves)]
        rms = jnp.stack(roots) if roots else jnp.zeros((0,), plan.res)
        # gradclip's generic arithmetic, so stats.scale is the factor it applied.
        scale = _core.rms_scale(plan, rms, t)
        finite = _all_finite(leaves)
        if policy == "skip":
            scale = jnp.where(finite, scale, jnp.ones((), scale.dtype))
        return new, ClipStats(rms, scale, scale < 1, finite)

    return _transform(apply, nonfinite)


def clip_by_value(
    clip_value: Any = None,
    *,
    lo: Any = None,
    hi: Any = None,
    nonfinite: str = "propagate",
) -> Any:
    """``optax.clip``: clamp every entry to ``[-clip_value, clip_value]`` or ``[lo, hi]``.

    The clamping is :func:`gradclip.clip_by_value` (NaN stays NaN and
    ``±inf`` goes to the bound under ``"propagate"``).

    Parameters
    ----------
    clip_value : float or 0-d array, optional
        Symmetric bound, ``>= 0``.
    lo, hi : float or 0-d array, optional
        One-sided or asymmetric bounds, instead of ``clip_value``. Each may
        be scheduled (``optax.inject_hyperparams``): an array value is used
        as is, unchecked.
    {nonfinite}

    Returns
    -------
    optax.GradientTransformation
        Its state is a :class:`ClipState` whose ``stats`` hold 0-d arrays:
        ``norm`` is the largest magnitude ``max |g|`` before clamping (the
        global inf-norm; NaN if an entry is NaN, except under ``"zero"``,
        where non-finite entries count as 0), ``scale`` the ratio of that
        inf-norm after clamping to before (``min(1, clip_value / norm)`` for a
        symmetric bound; 1 for a zero update), ``clipped`` whether any entry
        lay outside the bounds, ``finite`` whether every entry was finite.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import gradclip.optax as gco
    >>> tx = gco.clip_by_value(0.5)
    >>> grads = [jnp.array([-3.0, 0.2, 1.0])]
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> updates
    [Array([-0.5,  0.2,  0.5], dtype=float32)]
    >>> float(state.stats.norm), float(state.stats.scale), bool(state.stats.clipped)
    (3.0, 0.1666666716337204, True)
    """
    gc.clip_by_value([], clip_value, lo=lo, hi=hi, nonfinite=nonfinite)  # validates
    low, high = _api._value_bounds(clip_value, lo, hi)

    def apply(updates: Any, policy: str) -> tuple[Any, ClipStats]:
        new = gc.clip_by_value(updates, clip_value, lo=lo, hi=hi, nonfinite=policy)
        return new, _value_stats(jax.tree.leaves(updates), low, high, policy)

    return _transform(apply, nonfinite)


def _value_stats(leaves: list[Any], lo: Any, hi: Any, policy: str) -> ClipStats:
    """ClipStats for value clipping, from the signed extremes of the input.

    Clamping is monotonic, so the extremes after clamping are the clamped
    extremes: no second pass over the clamped update is needed.
    """
    res = _result_dtype(leaves)
    finite = jnp.all(_all_finite(leaves))
    if sum(math.prod(x.shape) for x in leaves) == 0:
        one = jnp.ones((), res)
        return ClipStats(jnp.zeros((), res), one, jnp.array(False), finite)
    if policy == "zero":
        leaves = [jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x)) for x in leaves]
    nan = jnp.any(jnp.stack([jnp.any(jnp.isnan(x)) for x in leaves]))

    def extremes(x: Any) -> tuple[Any, ...]:
        """Largest and smallest entry before and after the clamp, and whether it moved one.

        NaN-free, so that one NaN does not hide entries outside the bounds;
        against the bounds rounded to the leaf's dtype, as the clamp has them
        (float16 0.09998 is inside a bound of 0.09995, which rounds to it).
        """
        top = jnp.max(x, where=~jnp.isnan(x), initial=-jnp.inf)
        bot = jnp.min(x, where=~jnp.isnan(x), initial=jnp.inf)
        moved, top_after, bot_after = jnp.array(False), top, bot
        if hi is not None:
            hi_x = jnp.asarray(hi, x.dtype)
            moved = moved | (top > hi_x)
            top_after, bot_after = jnp.minimum(top_after, hi_x), jnp.minimum(bot_after, hi_x)
        if lo is not None:
            lo_x = jnp.asarray(lo, x.dtype)
            moved = moved | (bot < lo_x)
            top_after, bot_after = jnp.maximum(top_after, lo_x), jnp.maximum(bot_after, lo_x)
        return top, bot, top_after, bot_after, moved

    with _compat.quiet(jnp):  # a bound past float16's range rounds to inf, as in the clamp
        tops, bots, tops_after, bots_after, moved = zip(*map(extremes, leaves), strict=True)
    top, top_after = (jnp.max(jnp.stack([v.astype(res) for v in t])) for t in (tops, tops_after))
    bot, bot_after = (jnp.min(jnp.stack([v.astype(res) for v in b])) for b in (bots, bots_after))
    clipped = jnp.any(jnp.stack(moved))
    # All-NaN input leaves top = -inf, bot = inf: no magnitude seen, norm NaN below.
    seen = top >= bot
    before = jnp.where(seen, jnp.maximum(jnp.abs(top), jnp.abs(bot)), jnp.zeros((), res))
    after = jnp.where(seen, jnp.maximum(jnp.abs(top_after), jnp.abs(bot_after)), jnp.zeros((), res))
    one = jnp.ones((), res)
    scale = _compat.ratio_or_one(jnp, after, before)
    norm = jnp.where(nan, jnp.array(jnp.nan, res), before)
    if policy == "skip":
        # gradclip leaves a non-finite tree unchanged: nothing was clamped.
        scale = jnp.where(finite, scale, one)
        clipped = clipped & finite
    return ClipStats(norm, scale, clipped, finite)


for _f in (clip_by_global_norm, clip_by_norm, clip_by_block_rms, clip_by_value):
    _f.__doc__ = (_f.__doc__ or "").format(nonfinite=_NONFINITE_DOC)


# ------------------------------------------------------------------- per example


class PerExampleState(NamedTuple):
    """The state of :func:`per_example_clip`: a summary of the last update's examples.

    Each field is 0-d, or ``(n_leaves,)`` with ``per_layer=True`` (one entry
    per leaf in ``jax.tree.leaves`` order). Before the first update: zeros.

    Attributes
    ----------
    num_clipped : array
        int32: examples whose gradient was clipped.
    batch_size : array
        int32, 0-d: examples in the update.
    mean_norm : array
        The mean of the per-example norms before clipping.
    max_norm : array
        The largest per-example norm before clipping.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import gradclip.optax as gco
    >>> state = gco.per_example_clip(1.0).init({"w": jnp.zeros(2)})
    >>> int(state.num_clipped), int(state.batch_size), float(state.max_norm)
    (0, 0, 0.0)
    """

    num_clipped: Any
    batch_size: Any
    mean_norm: Any
    max_norm: Any


def per_example_clip(
    max_norm: Any,
    *,
    reduce: str = "sum",
    per_layer: bool = False,
    split: str = "uniform",
    eps: float | None = None,
) -> Any:
    """DP-SGD's per-example clipping as a transform: batched updates in, one update out.

    The updates hold a batch of per-example gradients on axis 0 of every
    leaf (from ``jax.vmap(jax.grad(loss))``); each example is clipped by
    :func:`gradclip.per_example_clip` and the batch summed (or averaged), so
    the result has the params' shapes. The noise of DP-SGD is the caller's
    to add after it (``optax.add_noise`` or their own). optax's
    ``per_example_global_norm_clip`` and ``per_example_layer_norm_clip``
    are the functions this matches (with ``eps=0``).

    Parameters
    ----------
    max_norm : float, 0-d JAX array, or (with ``per_layer``) one bound per leaf
        As for :func:`gradclip.per_example_clip`; an array can come from a
        :class:`~gradclip.adaptive.QuantileBound` state through
        ``optax.inject_hyperparams``.
    reduce : {"sum", "mean"}, default "sum"
        How the clipped examples are combined.
    per_layer : bool, default False
        Clip each leaf's part of an example to its own bound.
    split : {"uniform", "size"}, default "uniform"
        How a total bound is shared between leaves with ``per_layer``.
    eps : float, optional
        Added to each norm before dividing; ``None`` means 1e-6.

    Returns
    -------
    optax.GradientTransformation
        Its state is a :class:`PerExampleState`.

    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import gradclip.optax as gco
    >>> params = {"w": jnp.zeros(2)}
    >>> per_example = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}  # 2 examples
    >>> tx = optax.chain(gco.per_example_clip(1.0, reduce="mean", eps=0.0), optax.sgd(1.0))
    >>> updates, state = tx.update(per_example, tx.init(params), params)
    >>> updates["w"]  # -(0.2 * [3, 4] + [0.3, 0.4]) / 2
    Array([-0.45, -0.6 ], dtype=float32)
    >>> int(state[0].num_clipped), float(state[0].max_norm)
    (1, 5.0)
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(
            f"reduce must be 'sum' or 'mean' here (the update must take the params' shapes); "
            f"got {reduce!r}"
        )
    eps = _DEFAULT_EPS if eps is None else eps
    _no_array(eps, "eps", "gradclip takes eps as a Python float")
    gc.per_example_clip([], max_norm, per_layer=True, split=split, eps=eps)  # validates

    def init(params: Any) -> PerExampleState:
        # Checked as the update will check it, naming a leaf that is no float array.
        leaves = _api._prepare(params, "gradclip.optax.per_example_clip.init").flat.leaves
        shape = (len(leaves),) if per_layer else ()
        res = _result_dtype(leaves)
        # One array per field: a jitted step cannot donate one buffer twice.
        return PerExampleState(
            jnp.zeros(shape, jnp.int32),
            jnp.zeros((), jnp.int32),
            jnp.zeros(shape, res),
            jnp.zeros(shape, res),
        )

    def update(updates: Any, state: PerExampleState, params: Any = None) -> tuple[Any, Any]:
        del params
        out, stats = gc.per_example_clip(
            updates, max_norm, reduce=reduce, per_layer=per_layer, split=split, eps=eps
        )
        batch = stats.norm.shape[-1]
        dtype = state.mean_norm.dtype
        if batch:
            mean = jnp.mean(stats.norm, axis=-1).astype(dtype)
            top = jnp.max(stats.norm, axis=-1).astype(dtype)
        else:
            mean = top = jnp.zeros_like(state.mean_norm)
        counts = jnp.asarray(stats.num_clipped, jnp.int32)
        return out, PerExampleState(counts, jnp.asarray(batch, jnp.int32), mean, top)

    return optax.GradientTransformation(init, update)


# ------------------------------------------------------------ adaptive clipping


class AdaptiveState(NamedTuple):
    """The state of :func:`adaptive` transforms: the clipper's own, and a :class:`ClipState`.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import gradclip.optax as gco
    >>> from gradclip.adaptive import AutoClip
    >>> state = gco.adaptive(AutoClip(history_size=4)).init({"w": jnp.zeros(2)})
    >>> type(state.clipper).__name__, state.clipper.history.shape, float(state.clip.stats.norm)
    ('AutoClipState', (4,), 0.0)
    """

    clipper: Any  # ZClipState, AutoClipState, AdaGCState or AGCState
    clip: ClipState


def adaptive(clipper: Any) -> Any:
    """A :mod:`gradclip.adaptive` clipper as an ``optax.GradientTransformation``.

    The clipper's statistics live in the optimizer state, next to a
    :class:`ClipState` that :func:`find_stats` finds. ``update`` needs
    ``params`` for :class:`~gradclip.adaptive.AGC`. With the clipper's
    ``nonfinite="skip"``, a non-finite step's update becomes zeros, as for
    the other transforms here.

    :func:`zclip`, :func:`autoclip`, :func:`agc` and :func:`adagc` work
    under ``optax.inject_hyperparams``, so a float hyperparameter can follow
    a schedule. ``warmup_steps`` and ``history_size`` size the state: they
    are taken from it after ``init``, and a jitted ``init`` needs them static
    (``static_args=("warmup_steps",)``). AGC's ``axis`` must stay static
    (``static_args=("axis",)``).

    Parameters
    ----------
    clipper : ZClip, AutoClip, AGC or AdaGC
        The hyperparameters.

    Returns
    -------
    optax.GradientTransformation

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import gradclip.optax as gco
    >>> from gradclip.adaptive import ZClip
    >>> tx = optax.chain(gco.adaptive(ZClip(warmup_steps=2)), optax.sgd(0.1))
    >>> params = {"w": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> for g in (1.0, 1.2, 100.0):
    ...     updates, state = tx.update({"w": jnp.full(3, g)}, state, params)
    >>> bool(gco.find_stats(state).clipped)
    True
    """
    skip = getattr(clipper, "nonfinite", "propagate") == "skip"

    # Traced in init to learn the stats' shapes: "raise" cannot be traced (it
    # reads the norm on the host), and the shapes do not depend on the policy.
    traced = clipper
    if getattr(clipper, "nonfinite", None) == "raise":
        traced = dataclasses.replace(clipper, nonfinite="propagate")

    def init(params: Any) -> AdaptiveState:
        params = _jax_arrays(params)
        inner = clipper.init(params)
        shapes = jax.eval_shape(lambda p, s: traced.update(p, s, p)[2], params, inner)
        return AdaptiveState(inner, _new_state(shapes))

    def update(updates: Any, state: AdaptiveState, params: Any = None) -> tuple[Any, Any]:
        updates, inner, params = _jax_arrays((updates, state.clipper, params))
        new, inner, stats = clipper.update(updates, inner, params)
        new, clip = _record(new, stats, state.clip, skip)
        return new, AdaptiveState(inner, clip)

    return optax.GradientTransformation(init, update)


def _jax_arrays(tree: Any) -> Any:
    """NumPy leaves as JAX arrays (no copy for JAX ones): optax states are JAX arrays.

    The clippers keep their state in the namespace of the arrays ``init``
    saw, and refuse a state of another library: NumPy params (a checkpoint)
    or a state restored as NumPy must not make an eager update fail. So
    must NumPy updates: optax's own transforms take them (and return JAX
    arrays), and inside a JAX-registered node (a flax ``FrozenDict``) only
    JAX arrays let gradclip see the node as one.
    """
    if all(issubclass(t, jax.Array) for t in set(map(type, jax.tree.leaves(tree)))):
        return tree  # the common case, without a call per leaf
    return jax.tree.map(jnp.asarray, tree)


def zclip(**hyperparameters: Any) -> Any:
    """:class:`gradclip.adaptive.ZClip` as a transform (see :func:`adaptive`).

    Parameters
    ----------
    **hyperparameters
        :class:`~gradclip.adaptive.ZClip`'s fields.

    Returns
    -------
    optax.GradientTransformation

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import gradclip.optax as gco
    >>> tx = optax.chain(gco.zclip(warmup_steps=3, max_grad_norm=None), optax.sgd(0.1))
    >>> params = {"w": jnp.ones(4)}
    >>> state = tx.init(params)
    >>> for g in (1.0, 1.1, 0.9, 1.0, 50.0):  # a spike after the warm-up
    ...     updates, state = tx.update({"w": jnp.full(4, g)}, state, params)
    >>> stats = gco.find_stats(state)
    >>> bool(stats.clipped), round(float(stats.norm))
    (True, 100)
    """
    return adaptive(_adaptive.ZClip(**hyperparameters))


def autoclip(**hyperparameters: Any) -> Any:
    """:class:`gradclip.adaptive.AutoClip` as a transform (see :func:`adaptive`).

    Parameters
    ----------
    **hyperparameters
        :class:`~gradclip.adaptive.AutoClip`'s fields.

    Returns
    -------
    optax.GradientTransformation

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import gradclip.optax as gco
    >>> tx = optax.chain(gco.autoclip(percentile=50.0), optax.sgd(0.1))
    >>> params = {"w": jnp.ones(4)}
    >>> state = tx.init(params)
    >>> for g in (1.0, 1.0, 1.0, 8.0):  # clipped at the median norm so far
    ...     updates, state = tx.update({"w": jnp.full(4, g)}, state, params)
    >>> float(jnp.linalg.norm(updates["w"])) < 0.21
    True
    """
    return adaptive(_adaptive.AutoClip(**hyperparameters))


def agc(**hyperparameters: Any) -> Any:
    """:class:`gradclip.adaptive.AGC` as a transform; ``layout`` defaults to "jax" here.

    Parameters
    ----------
    **hyperparameters
        :class:`~gradclip.adaptive.AGC`'s fields.

    Returns
    -------
    optax.GradientTransformation
        Its ``update`` needs ``params``, as ``optax.adaptive_grad_clip``'s does.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import gradclip.optax as gco
    >>> tx = gco.agc(clipping=0.01)
    >>> params = {"w": jnp.ones((3, 2))}  # in x out: a unit per column, norm sqrt(3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.full((3, 2), 10.0)}, state, params)
    >>> [round(float(n), 4) for n in jnp.linalg.norm(updates["w"], axis=0)]  # 0.01 * sqrt(3)
    [0.0173, 0.0173]
    """
    if hyperparameters.get("layout") is None and hyperparameters.get("axis") is None:
        hyperparameters["layout"] = "jax"
    return adaptive(_adaptive.AGC(**hyperparameters))


def adagc(**hyperparameters: Any) -> Any:
    """:class:`gradclip.adaptive.AdaGC` as a transform (see :func:`adaptive`).

    Parameters
    ----------
    **hyperparameters
        :class:`~gradclip.adaptive.AdaGC`'s fields.

    Returns
    -------
    optax.GradientTransformation
        Its stats hold one entry per leaf.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import gradclip.optax as gco
    >>> tx = optax.chain(gco.adagc(warmup_steps=2), optax.sgd(0.1))
    >>> params = {"a": jnp.ones(4), "b": jnp.ones(4)}
    >>> state = tx.init(params)
    >>> for g in (0.1, 0.1, 0.1, 5.0):  # "b" spikes after the warm-up
    ...     grads = {"a": jnp.full(4, 0.1), "b": jnp.full(4, g)}
    ...     updates, state = tx.update(grads, state, params)
    >>> gco.find_stats(state).clipped.tolist()
    [False, True]
    """
    return adaptive(_adaptive.AdaGC(**hyperparameters))


def _keywords_of(cls: type) -> inspect.Signature:
    """The clipper's fields as keyword-only parameters with their defaults."""
    params = inspect.signature(cls).parameters.values()
    return inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params])


# optax.inject_hyperparams binds its arguments to the factory's signature:
# **hyperparameters alone would reach the clipper as one argument of that name.
for _factory, _cls in (
    (zclip, _adaptive.ZClip),
    (autoclip, _adaptive.AutoClip),
    (agc, _adaptive.AGC),
    (adagc, _adaptive.AdaGC),
):
    _factory.__signature__ = _keywords_of(_cls)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------- finding


def find_all_states(opt_state: Any) -> dict[str, ClipState]:
    """Every :class:`ClipState` in a nested optimizer state, keyed by its path.

    The state is walked as a JAX pytree, so anything optax builds is searched:
    ``optax.chain`` tuples, ``optax.named_chain`` dicts, ``optax.MultiSteps``
    (``inner_opt_state``), ``optax.inject_hyperparams`` (``inner_state``),
    ``optax.masked``, ``optax.apply_if_finite`` and their nestings.

    Parameters
    ----------
    opt_state : pytree
        The state returned by an optimizer's ``init`` or ``update``.

    Returns
    -------
    dict of str to ClipState
        In pytree flattening order; the keys are ``jax.tree_util.keystr``
        paths such as ``"[0]"`` or ``".inner_opt_state[1]"`` (``""`` when
        ``opt_state`` is itself a ``ClipState``). Empty when there is none.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import gradclip.optax as gco
    >>> tx = optax.chain(gco.clip_by_value(1.0), optax.adam(1e-3), gco.clip_by_norm(1.0))
    >>> list(gco.find_all_states(tx.init([jnp.zeros(3)])))
    ['[0]', '[2]']
    """
    found = jax.tree_util.tree_flatten_with_path(
        opt_state, is_leaf=lambda x: isinstance(x, ClipState)
    )[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in found if isinstance(leaf, ClipState)}


def find_state(opt_state: Any) -> ClipState:
    """The one :class:`ClipState` in a nested optimizer state.

    Parameters
    ----------
    opt_state : pytree
        The state returned by an optimizer's ``init`` or ``update``.

    Returns
    -------
    ClipState
        The stats and non-finite counters of the one gradclip transform.

    Raises
    ------
    LookupError
        If the state holds no gradclip transform's state.
    ValueError
        If it holds several; :func:`find_all_states` returns them all, by path.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import gradclip.optax as gco
    >>> tx = optax.MultiSteps(
    ...     optax.chain(gco.clip_by_global_norm(1.0, nonfinite="skip"), optax.sgd(0.1)), 2
    ... )
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> int(gco.find_state(state).total_notfinite)
    0
    """
    found = find_all_states(opt_state)
    if not found:
        per_example = jax.tree_util.tree_flatten_with_path(
            opt_state, is_leaf=lambda x: isinstance(x, PerExampleState)
        )[0]
        where = [jax.tree_util.keystr(p) for p, x in per_example if isinstance(x, PerExampleState)]
        if where:
            raise LookupError(
                "no ClipState in this optimizer state, but a per_example_clip PerExampleState "
                f"at {', '.join(repr(p) for p in where)}: per-example clipping keeps a summary "
                "of its examples, not ClipStats; read that state directly"
            )
        raise LookupError(
            f"no gradclip.optax state in this optimizer state (a {type(opt_state).__name__}); "
            "build the optimizer with a gradclip.optax transform, e.g. optax.chain("
            "gradclip.optax.clip_by_global_norm(1.0), optax.adam(1e-3))"
        )
    if len(found) > 1:
        paths = ", ".join(repr(p) for p in found)
        raise ValueError(
            f"{len(found)} gradclip.optax states in this optimizer state, at {paths}; "
            "find_all_states(opt_state) returns them all, keyed by these paths"
        )
    return next(iter(found.values()))


def find_stats(opt_state: Any) -> ClipStats:
    """The :class:`~gradclip.ClipStats` of the one gradclip transform in an optimizer state.

    ``find_state(opt_state).stats``: the norm before clipping, the scale,
    ``clipped`` and ``finite`` of the last update, for logging from outside
    an ``optax.chain`` (optax issue #326).

    Parameters
    ----------
    opt_state : pytree
        The state returned by an optimizer's ``init`` or ``update``.

    Returns
    -------
    ClipStats
        Arrays on the device; nothing is synced until you read a value.

    Raises
    ------
    LookupError
        If the state holds no gradclip transform's state.
    ValueError
        If it holds several (see :func:`find_all_states`).

    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import gradclip.optax as gco
    >>> tx = optax.named_chain(("clip", gco.clip_by_global_norm(1.0)), ("adam", optax.adam(1e-3)))
    >>> params = {"w": jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> _, state = jax.jit(tx.update)({"w": jnp.full(3, 4.0)}, state, params)
    >>> float(gco.find_stats(state).norm)
    6.928203...
    """
    return find_state(opt_state).stats
