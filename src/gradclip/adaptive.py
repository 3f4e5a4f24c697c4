"""Adaptive clipping: thresholds set from the run's own history of norms.

Every clipper is a frozen dataclass of hyperparameters with

- ``init(tree) -> state``: a NamedTuple of arrays in the leaves' namespace
  and on their device;
- ``update(tree, state, params=None) -> (tree, state, ClipStats)``: pure, no
  Python branch on a value, no host sync, so it runs under ``jax.jit``;
- ``update_(tree, state, params=None) -> (state, ClipStats)``: in place, for
  NumPy, CuPy and torch;
- ``state_dict(state)`` / ``load_state_dict(d, like)``: NumPy arrays, so a
  state saved from one backend loads into another.

With dask arrays, persist the state between steps (``x.persist()`` for
each field): it is a lazy graph that would otherwise grow with every step.

A step whose gradients hold a NaN or an infinity never enters the
statistics, under every ``nonfinite`` policy (``"zero"`` too, whose norm
counts those entries as 0): the step is counted in ``state.skipped``, its
``ClipStats.finite`` is False, and the history is left as it was (the
existing zclip and autoclip packages call ``.item()`` every step, and one NaN
poisons their means for good). What happens to the gradients of such a step
is the ``nonfinite`` policy of :func:`gradclip.clip_by_global_norm`.

The clippers:

- :class:`ZClip`: EMA z-score spike detection (Kumar et al., 2025), as the
  ``zclip`` package computes it;
- :class:`AutoClip`: the p-th percentile of past norms (Seetharaman et al.,
  2020), from a ring buffer on the device;
- :class:`AGC`: unitwise adaptive clipping (Brock et al., 2021), as
  ``optax.adaptive_grad_clip`` and timm's ``adaptive_clip_grad``;
- :class:`AdaGC`: per-tensor thresholds from an EMA of each tensor's own
  past norms (Wang et al., 2025);
- :class:`QuantileBound`: the per-example bound of DP-SGD
  (:func:`gradclip.per_example_clip`) moved toward a quantile of the
  per-example norms (Andrew et al., 2021; Opacus's ``AdaClip``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeGuard

import numpy as np
import optree

from . import _api, _compat, _core
from ._flat import FlatTree, unit
from ._norms import Plan, new_blockwise, root
from ._stats import ClipStats, PerExampleStats
from ._tree import Flat, _materialise, flatten

__all__ = [
    "AGC",
    "AGCState",
    "AdaGC",
    "AdaGCState",
    "AutoClip",
    "AutoClipState",
    "QuantileBound",
    "QuantileBoundState",
    "ZClip",
    "ZClipState",
]

_POLICIES = ("propagate", "zero", "skip", "raise")


# ---------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _namespace_of(tree: Any, fn: str) -> Iterator[tuple[Flat, Any, Any, Any]]:
    """``(leaves, xp, device, float dtype of the norm)`` of ``tree``, its device current.

    The leaves of a :class:`~gradclip.FlatTree` are its views, one per
    tensor. CuPy creates arrays on the current device whatever ``device=``
    says (see :func:`gradclip._compat.current_device`).
    """
    flat = unit(tree, whole=False)
    leaves = flat.leaves
    if not leaves:
        # An empty tree's state is NumPy's, as an empty tree's stats are:
        # optax.tree_map_params inits with a placeholder node that has no leaves.
        yield flat, _compat.namespace(np.empty(0)), "cpu", np.float32
        return
    xp = _api._check(flat, fn).xp
    infos = [_compat.dtype_info(xp, x.dtype) for x in leaves]
    res = xp.float64 if any(i is not None and i.float64 for i in infos) else xp.float32
    with _compat.current_device(leaves[0]):
        yield flat, xp, _compat.device_of(leaves[0]), res


@contextlib.contextmanager
def _stepping(state: Any) -> Iterator[None]:
    """A step's context: the state's device current, NaN/inf arithmetic silent.

    States hold arrays on the leaves' device (made current for CuPy). A NaN
    or inf norm is counted in the state and reported in ``ClipStats``, not
    by NumPy's warnings (``inf - inf`` in a statistic), as the plain
    functions do (:func:`gradclip._compat.quiet`).
    """
    with _compat.current_device(next(iter(state), None)), _compat.quiet(None):
        yield


def _norm_policy(nonfinite: str) -> str:
    """The ``nonfinite`` that computes the norm a clip policy needs."""
    return "zero" if nonfinite == "zero" else ("raise" if nonfinite == "raise" else "propagate")


def _state_dict(state: NamedTuple) -> dict[str, np.ndarray]:
    return {name: _compat.to_numpy(value) for name, value in state._asdict().items()}


def _load(d: dict[str, Any], like: Any, fn: str, ref: Any, why: Any) -> Any:
    """``d`` as a state like ``ref`` (init's for ``like``), every field checked against it.

    A field of another shape would fail steps later with a bare broadcast
    error, or (a ``(1,)`` array for a 0-d one) silently broadcast: ``why(field)``
    says which hyperparameter sets its shape.
    """
    with _namespace_of(like, fn) as (_, xp, device, _):
        return _load_fields(d, fn, ref, why, xp, device)


def _host(value: Any) -> np.ndarray:
    """A field of a state dict as a NumPy copy of its own, which the state may share.

    A dict saved with ``torch.save`` and loaded with ``map_location="cuda"``
    holds CUDA tensors, which ``np.array`` refuses (``Tensor.numpy()``).
    """
    return _compat.to_numpy(value) if _compat.is_array(value) else np.array(value)


def _load_fields(d: dict[str, Any], fn: str, ref: Any, why: Any, xp: Any, device: Any) -> Any:
    fields = type(ref)._fields
    if isinstance(ref, ZClipState) and "var" in d and "std" not in d:
        # Saved before ZClipState kept the deviation instead of the variance.
        d = {k: v for k, v in d.items() if k != "var"} | {"std": np.sqrt(_host(d["var"]))}
    missing = set(fields) - set(d)
    if missing:
        raise KeyError(f"{fn}: the state dict lacks {sorted(missing)}")
    extra = set(d) - set(fields)
    if extra:
        raise KeyError(
            f"{fn}: the state dict has {sorted(extra)}, which {type(ref).__name__} has not "
            f"(its fields are {list(fields)}): is it another clipper's?"
        )
    out = {}
    for k, want in zip(fields, ref, strict=True):
        value = _host(d[k])
        if value.shape != tuple(want.shape):
            raise ValueError(
                f"{fn}: {k!r} has shape {value.shape} but this clipper's is "
                f"{tuple(want.shape)}{why(k)}; the state was saved with other "
                "hyperparameters or for another tree"
            )
        # init's dtype (a float64 NumPy run's state loaded for float32
        # leaves, an int64 count through JSON). No copy=True: torch.asarray
        # refuses it for a 0-d NumPy array bound for another device ("can't
        # alias tensor from device 'cpu'"), and ``value`` is a copy already.
        new = xp.asarray(value, device=device)
        out[k] = xp.astype(new, want.dtype, copy=False)
    return type(ref)(**out)


def _number(value: Any) -> TypeGuard[float]:
    """Whether a hyperparameter is a number to check.

    An array (``optax.inject_hyperparams`` makes every number one, traced
    under ``jit``) is used as it is, unchecked: checking it would need its value.
    """
    return isinstance(value, int | float | np.number)


def _scalar(value: Any) -> Any:
    """A number hyperparameter as a float; an array as it is (see :func:`_number`)."""
    return float(value) if _number(value) else value


def _check(name: str, value: Any, ok: Callable[[float], bool], what: str) -> None:
    """Raise ``ValueError`` for a number hyperparameter that is not ``what`` (NaN never is)."""
    if value is None or (_number(value) and not ok(float(value))):
        raise ValueError(f"{name} must be {what}; got {value!r}")


def _check_count(name: str, value: Any, least: int) -> None:
    """A step count or a history length: an integer, at least ``least``."""
    if _number(value) and not (float(value).is_integer() and value >= least):
        raise ValueError(f"{name} must be an integer >= {least}; got {value!r}")


def _size(value: Any, name: str, fn: str) -> int:
    """A hyperparameter that sizes the state, as an int (it cannot be traced)."""
    try:
        return int(value)
    except TypeError as exc:  # a tracer: jax.jit of an inject_hyperparams init
        raise TypeError(
            f"{fn}: {name} sizes the state, so it must be a concrete number, not a traced "
            f"array (with optax.inject_hyperparams, pass static_args=({name!r},))"
        ) from exc


def _check_policy(nonfinite: str) -> None:
    if nonfinite not in _POLICIES:
        raise ValueError(f"nonfinite must be one of {_POLICIES}; got {nonfinite!r}")


class _NoLeaves(Exception):
    """The tree holds no arrays: :meth:`_Clipper.update` passes it through."""


def _prepared(tree: Any, state: Any, fn: str, inplace: bool, whole: bool) -> Any:
    """``tree`` flattened and checked once per step, for the norm and the clip.

    The state must be in the gradients' library (its arithmetic meets theirs).
    """
    prep = _api._prepare(tree, fn, inplace=inplace, whole=whole)
    if prep.xp is None:
        raise _NoLeaves
    for name, value in zip(state._fields, state, strict=True):
        other = _compat.backend_name(_compat.namespace(value))
        if other != prep.backend:
            raise TypeError(
                f"{fn}: the state's {name} is a {other} array but the gradients are "
                f"{prep.backend} arrays; make the state with init() on gradients like these "
                "(load_state_dict(d, like=grads) converts a saved one)"
            )
    return prep


def _leaves_finite(prep: Any) -> Any:
    """1-d bool, one entry per leaf: whether every entry is finite.

    Under ``nonfinite="zero"`` the norms count NaN/inf entries as 0, so they
    cannot tell a bad step: this is one more read of the gradients, and only
    that policy pays it.
    """
    xp = prep.xp
    return xp.stack([xp.all(xp.isfinite(x)) for x in prep.flat.leaves])


def _global_norm(
    tree: Any, state: Any, fn: str, nonfinite: str, inplace: bool
) -> tuple[Any, Any, Any]:
    """The prepared tree, its global 2-norm as the policy needs it, and whether it was finite."""
    prep = _prepared(tree, state, fn, inplace, whole=nonfinite != "raise")
    norm = _api._run(prep, None, "global_norm", p=2.0, nonfinite=_norm_policy(nonfinite))
    finite = prep.xp.isfinite(norm)
    if nonfinite == "zero":
        # Finite entries whose norm overflows (float32 leaves near 3e38) are
        # a bad step too: its inf would enter the statistics for good.
        return prep, norm, prep.xp.all(_leaves_finite(prep)) & finite
    return prep, norm, finite


def _clip(
    prep: Any, threshold: Any, norm: Any, finite: Any, nonfinite: str, inplace: bool
) -> tuple[Any, ClipStats]:
    """Scale the tree by ``min(1, threshold / (norm + 1e-6))`` (torch's clip) in one pass.

    Returns the new tree (``None`` in place) and the stats, whose ``finite``
    is ``finite`` (a given norm alone cannot tell it under ``"zero"``).
    """
    leaves, stats = _api._run(
        prep,
        None,
        "clip_by_global_norm",
        max_norm=threshold,
        p=2.0,
        eps=1e-6,
        # Under "raise" the norm was checked where it was computed: a second
        # check of the given norm would be a second host sync.
        nonfinite="propagate" if nonfinite == "raise" else nonfinite,
        norm=norm,
        inplace=inplace,
    )
    stats = stats._replace(finite=_compat.as_array(finite))
    return (None if inplace else prep.flat.unflatten(leaves)), stats


class _Stateful:
    """``state_dict`` and ``load_state_dict`` for a state held in ``_State`` (a NamedTuple)."""

    _State: Any
    # (field, the hyperparameter that sets its shape), for load_state_dict's errors.
    _sized_by: tuple[str, str] | None = None

    def init(self, tree: Any) -> Any:
        raise NotImplementedError

    def state_dict(self, state: Any) -> dict[str, np.ndarray]:
        """The state as NumPy arrays (loadable on any backend).

        ``torch.load`` (``weights_only=True``, its default since torch 2.6)
        refuses NumPy arrays in a checkpoint: save
        ``{k: torch.from_numpy(v) for k, v in d.items()}``, which
        :meth:`load_state_dict` takes as well.

        Examples
        --------
        >>> import numpy as np
        >>> from gradclip.adaptive import AutoClip
        >>> clipper = AutoClip(history_size=2)
        >>> state = clipper.init([np.ones(2)])
        >>> _, state, _ = clipper.update([np.array([3.0, 4.0])], state)
        >>> saved = clipper.state_dict(state)
        >>> saved["history"], saved["count"]
        (array([5., 0.]), array(1, dtype=int32))
        """
        return _state_dict(state)

    def load_state_dict(self, d: dict[str, Any], like: Any) -> Any:
        """A state from :meth:`state_dict`, in ``like``'s namespace and on its device.

        The fields may be NumPy arrays or arrays of any backend on any device
        (``torch.load(..., map_location="cuda")`` gives CUDA tensors); the
        state is a copy, which shares no memory with ``d``.

        Raises
        ------
        KeyError
            If ``d`` lacks a field of the state or has one it does not.
        ValueError
            If a field's shape is not the one :meth:`init` gives for ``like``
            (the state was saved with another ``history_size``,
            ``warmup_steps`` or tree); the message names the field.

        Examples
        --------
        >>> import numpy as np
        >>> from gradclip.adaptive import AutoClip
        >>> clipper = AutoClip(history_size=2)
        >>> saved = {"history": np.array([5.0, 0.0]), "count": np.array(1), "skipped": np.array(0)}
        >>> state = clipper.load_state_dict(saved, like=[np.ones(2)])
        >>> state.history, state.count.dtype
        (array([5., 0.]), dtype('int32'))
        """
        fn = f"{type(self).__name__}.load_state_dict"
        like = _materialise(like)  # model.parameters(): init would use the generator up
        return _load(d, like, fn, self.init(like), self._why_shape)

    def _why_shape(self, field: str) -> str:
        if self._sized_by is None or self._sized_by[0] != field:
            return ""
        name = self._sized_by[1]
        return f" ({name}={getattr(self, name)!r})"


class _Clipper(_Stateful):
    """What every clipper shares: ``update``, ``update_`` and the state dicts.

    A clipper defines ``_State`` (its NamedTuple) and ``_step(tree, state,
    params, inplace) -> (new tree or None, state, ClipStats)``.
    """

    def _step(
        self, tree: Any, state: Any, params: Any, inplace: bool
    ) -> tuple[Any, Any, ClipStats]:
        raise NotImplementedError

    # Whether the stats hold one entry per leaf (AdaGC) rather than one for the tree.
    _per_leaf = False

    @_api._eager  # a graph break under torch.compile, as the top-level functions
    def update(self, tree: Any, state: Any, params: Any = None) -> tuple[Any, Any, ClipStats]:
        """Clip ``tree`` (new arrays) and advance the state: ``(tree, state, stats)``.

        A tree with no arrays (``{}``; optax's placeholder in
        ``optax.tree_map_params``) passes through, the state unchanged and
        the stats those of :func:`gradclip.clip_by_global_norm` on it.

        Examples
        --------
        >>> import numpy as np
        >>> from gradclip.adaptive import AutoClip
        >>> clipper = AutoClip(percentile=50.0)
        >>> grads = {"w": np.array([3.0, 4.0])}
        >>> state = clipper.init(grads)
        >>> new, state, stats = clipper.update(grads, state)  # the history holds this norm
        >>> float(stats.norm), int(state.count), grads["w"]  # grads is left as it was
        (5.0, 1, array([3., 4.]))
        """
        # A generator is read once: the tree returned must be its list, even
        # when it held no arrays ((p.grad for p in params) with every grad None).
        tree = _materialise(tree)
        with _stepping(state):
            try:
                return self._step(tree, state, params, False)
            except _NoLeaves:
                return tree, state, _api._empty_stats(self._per_leaf)

    @_api._eager
    def update_(self, tree: Any, state: Any, params: Any = None) -> tuple[Any, ClipStats]:
        """Clip ``tree`` in place (NumPy, CuPy, torch) and advance the state: ``(state, stats)``.

        Examples
        --------
        >>> import numpy as np
        >>> from gradclip.adaptive import AutoClip
        >>> clipper = AutoClip(percentile=0.0)
        >>> state = clipper.init([np.ones(2)])
        >>> state, _ = clipper.update_([np.array([3.0, 4.0])], state)  # history: 5
        >>> grads = [np.array([30.0, 40.0])]
        >>> state, stats = clipper.update_(grads, state)  # clipped to about 5, the least seen
        >>> grads[0].round(4), float(stats.norm)
        (array([3., 4.]), 50.0)
        """
        with _stepping(state):
            try:
                _, state, stats = self._step(tree, state, params, True)
            except _NoLeaves:
                stats = _api._empty_stats(self._per_leaf)
        return state, stats


# ------------------------------------------------------------------------ ZClip


class ZClipState(NamedTuple):
    """ZClip's statistics: the warm-up buffer, then the EMA mean and standard deviation.

    The deviation is kept rather than the variance (the ``zclip`` package's
    ``var``), which overflows float32 once the norms spread past 1.8e19 and
    then stays inf, so that no spike is ever seen again. :attr:`var` gives
    the variance.

    Examples
    --------
    >>> import numpy as np
    >>> from gradclip.adaptive import ZClip
    >>> state = ZClip(warmup_steps=3).init([np.ones(2)])
    >>> state.buffer, int(state.count), int(state.skipped)
    (array([0., 0., 0.]), 0, 0)
    """

    count: Any  # finite norms seen during the warm-up (int32, stops at warmup_steps)
    buffer: Any  # (warmup_steps,) the warm-up norms
    mean: Any
    std: Any
    skipped: Any  # steps whose gradients held a NaN or an inf (int32)

    @property
    def var(self) -> Any:
        """The EMA variance, ``std**2`` (inf where that is past the dtype's range)."""
        return self.std * self.std


@dataclass(frozen=True)
class ZClip(_Clipper):
    """Adaptive clipping on z-scores of the gradient norm against its EMA.

    The ``zclip`` package's algorithm, step for step, with the statistics on
    the device: for ``warmup_steps`` steps the norms are collected (and
    clipped at ``max_grad_norm``); then their mean and variance start two
    EMAs. A norm whose z-score ``(norm - mean) / (std + eps)`` exceeds
    ``z_thresh`` is a spike and is clipped to

    - ``mode="zscore", clip_option="adaptive_scaling"`` (the default):
      ``clip_factor * (mean + z_thresh * std / (z / z_thresh))``;
    - ``clip_option="mean"``: the EMA mean;
    - ``mode="percentile"``: ``mean + z_thresh * std`` whenever the norm is
      above it.

    ``max_grad_norm`` caps the threshold in every case (None: no cap). The
    EMAs are then updated with the norm, or with the threshold on a spike
    (not at all with ``skip_update_on_spike``).

    Parameters
    ----------
    alpha : float, default 0.97
        EMA smoothing factor.
    z_thresh : float, default 2.5
        Spike threshold on the z-score (or the std multiplier in percentile mode).
    max_grad_norm : float or None, default 1.0
        The cap on every threshold, as in the ``zclip`` package.
    eps : float, default 1e-6
        Added to the std in the z-score.
    warmup_steps : int, default 25
        Norms collected before the EMAs start.
    mode : {"zscore", "percentile"}, default "zscore"
    clip_option : {"adaptive_scaling", "mean"}, default "adaptive_scaling"
        Used in zscore mode (ignored in percentile mode, as by zclip).
    clip_factor : float, default 1.0
        Multiplies the adaptive threshold.
    skip_update_on_spike : bool, default False
        Leave the EMAs unchanged on a spike.
    nonfinite : {"propagate", "zero", "skip", "raise"}, default "propagate"
        What a NaN/inf gradient does to the step, as in
        :func:`gradclip.clip_by_global_norm`; it never enters the statistics.

    Examples
    --------
    >>> import numpy as np
    >>> from gradclip.adaptive import ZClip
    >>> clipper = ZClip(warmup_steps=3, max_grad_norm=None)
    >>> grads = [np.ones(4)]
    >>> state = clipper.init(grads)
    >>> for scale in (1.0, 1.1, 0.9, 1.0):
    ...     _, state, stats = clipper.update([np.ones(4) * scale], state)
    >>> bool(stats.clipped)
    False
    >>> _, state, stats = clipper.update([np.ones(4) * 100.0], state)  # a spike
    >>> bool(stats.clipped), round(float(stats.norm), 1)
    (True, 200.0)
    """

    alpha: float = 0.97
    z_thresh: float = 2.5
    max_grad_norm: float | None = 1.0
    eps: float = 1e-6
    warmup_steps: int = 25
    mode: str = "zscore"
    clip_option: str = "adaptive_scaling"
    clip_factor: float = 1.0
    skip_update_on_spike: bool = False
    nonfinite: str = "propagate"

    def __post_init__(self) -> None:
        if isinstance(self.mode, str):  # the zclip package takes "ZSCORE" too
            object.__setattr__(self, "mode", self.mode.lower())
        if self.mode not in ("zscore", "percentile"):
            raise ValueError(f"mode must be 'zscore' or 'percentile'; got {self.mode!r}")
        if self.mode == "zscore" and self.clip_option not in ("adaptive_scaling", "mean"):
            raise ValueError(
                f"clip_option must be 'adaptive_scaling' or 'mean'; got {self.clip_option!r}"
            )
        _check("alpha", self.alpha, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
        _check("z_thresh", self.z_thresh, lambda v: v > 0, "> 0")
        _check("eps", self.eps, lambda v: v >= 0, ">= 0")
        _check("clip_factor", self.clip_factor, lambda v: v > 0, "> 0")
        _check_count("warmup_steps", self.warmup_steps, 1)
        if self.max_grad_norm is not None:
            _check("max_grad_norm", self.max_grad_norm, lambda v: v >= 0, ">= 0 or None")
        _check_policy(self.nonfinite)

    def init(self, tree: Any) -> ZClipState:
        """Empty statistics in the namespace and on the device of ``tree``'s leaves."""
        with _namespace_of(tree, "ZClip.init") as (_, xp, device, res):
            size = _size(self.warmup_steps, "warmup_steps", "ZClip.init")
            # One array per field: a jitted step that donates the state
            # cannot donate one buffer twice.
            return ZClipState(
                xp.zeros((), dtype=xp.int32, device=device),
                xp.zeros((size,), dtype=res, device=device),
                xp.zeros((), dtype=res, device=device),
                xp.zeros((), dtype=res, device=device),
                xp.zeros((), dtype=xp.int32, device=device),
            )

    _State = ZClipState
    _sized_by = ("buffer", "warmup_steps")

    def _step(
        self, tree: Any, state: ZClipState, params: Any, inplace: bool
    ) -> tuple[Any, ZClipState, ClipStats]:
        xp = _compat.namespace(state.mean)
        fn = "ZClip.update_" if inplace else "ZClip.update"
        prep, norm, finite = _global_norm(tree, state, fn, self.nonfinite, inplace)
        norm = xp.astype(norm, state.mean.dtype)
        w = state.buffer.shape[0]  # warmup_steps, as init sized it (an array here is traced)
        warm = state.count < w
        # The warm-up: collect the norm; the EMAs start from the buffer.
        take = warm & finite
        slots = xp.arange(w, dtype=xp.int32, device=_compat.device_of(state.buffer))
        buffer = xp.where(take & (slots == state.count), norm, state.buffer)
        count = state.count + xp.astype(take, xp.int32)
        start = take & (count == w)
        first_mean = xp.sum(buffer / w)  # not xp.mean: 25 norms of 2e37 summed past float32
        # The deviations' 2-norm, scaled by their largest (no square overflows).
        first_std = _hypot(xp, xp.abs(buffer - first_mean)) / math.sqrt(w)
        # After it: the spike test on the z-score.
        std = state.std
        if self.mode == "percentile":
            threshold = state.mean + self.z_thresh * std
            spike = norm > threshold
        else:
            z = (norm - state.mean) / (std + self.eps)
            spike = z > self.z_thresh
            if self.clip_option == "mean":
                threshold = state.mean
            else:
                # eta = z / z_thresh > 1 on a spike; elsewhere 1, to divide safely.
                eta = xp.where(spike, z / self.z_thresh, xp.ones_like(z))
                threshold = (state.mean + self.z_thresh * std / eta) * self.clip_factor
        spike = spike & ~warm & finite
        effective = xp.where(spike, threshold, norm)
        # The zclip package clips a spike at min(threshold, cap), anything
        # else (and every warm-up step) at the cap alone.
        cap = math.inf if self.max_grad_norm is None else _scalar(self.max_grad_norm)
        if isinstance(cap, float):  # the 2023.12 standard takes no Python scalars here
            cap = _compat.asarray(xp, cap, threshold.dtype, _compat.device_of(threshold))
        bound = xp.where(spike, xp.minimum(threshold, cap), cap)
        # EMA update with the norm, or the threshold on a spike.
        x = effective
        new_mean = self.alpha * state.mean + (1 - self.alpha) * x
        # sqrt(alpha * std**2 + (1 - alpha) * (x - new_mean)**2), likewise.
        # (alpha may be an array: an injected hyperparameter.)
        pair = xp.stack([self.alpha**0.5 * std, (1 - self.alpha) ** 0.5 * (x - new_mean)])
        new_std = _hypot(xp, xp.abs(pair))
        update = ~warm & finite
        if self.skip_update_on_spike:
            update = update & ~spike
        mean = xp.where(start, first_mean, xp.where(update, new_mean, state.mean))
        std = xp.where(start, first_std, xp.where(update, new_std, state.std))
        skipped = state.skipped + xp.astype(~finite, xp.int32)
        # In the state's dtype: a float64 hyperparameter (alpha=np.float64(...),
        # optax.inject_hyperparams) would promote it, and break lax.scan.
        mean, std = (xp.astype(v, state.mean.dtype) for v in (mean, std))
        new, stats = _clip(prep, bound, norm, finite, self.nonfinite, inplace)
        return new, ZClipState(count, buffer, mean, std, skipped), stats


# --------------------------------------------------------------------- AutoClip


class AutoClipState(NamedTuple):
    """AutoClip's history of norms: a ring buffer and how many it has seen.

    Examples
    --------
    >>> import numpy as np
    >>> from gradclip.adaptive import AutoClip
    >>> clipper = AutoClip(history_size=3)
    >>> state = clipper.init([np.ones(2)])
    >>> for value in (1.0, 2.0, 3.0, 4.0):
    ...     _, state, _ = clipper.update([np.array([value, 0.0])], state)
    >>> state.history, int(state.count)  # the fourth norm took the first slot
    (array([4., 2., 3.]), 4)
    """

    history: Any  # (history_size,) the last finite norms
    count: Any  # finite norms seen (int32; the buffer holds min(count, size))
    skipped: Any  # steps whose gradients held a NaN or an inf (int32)


@dataclass(frozen=True)
class AutoClip(_Clipper):
    """Clip at the ``percentile``-th percentile of the norms seen so far.

    AutoClip (Seetharaman et al., 2020) appends each step's norm to the
    history and clips the step at the percentile of that history (NumPy's
    linear interpolation, as the paper's ``np.percentile``). The paper keeps
    every norm; here the last ``history_size`` are kept in a ring buffer on
    the device, so the cost per step is bounded.

    Parameters
    ----------
    percentile : float, default 10.0
        The paper's recommended percentile.
    history_size : int, default 1000
        Norms kept.
    nonfinite : {"propagate", "zero", "skip", "raise"}, default "propagate"
        As for :class:`ZClip`.

    Examples
    --------
    >>> import numpy as np
    >>> from gradclip.adaptive import AutoClip
    >>> clipper = AutoClip(percentile=50.0, history_size=8)
    >>> state = clipper.init([np.ones(2)])
    >>> for value in (1.0, 2.0, 3.0):
    ...     out, state, stats = clipper.update([np.array([value, 0.0])], state)
    >>> float(stats.norm), round(float(stats.scale), 4)  # median of 1, 2, 3 is 2
    (3.0, 0.6667)
    """

    percentile: float = 10.0
    history_size: int = 1000
    nonfinite: str = "propagate"

    def __post_init__(self) -> None:
        _check("percentile", self.percentile, lambda v: 0.0 <= v <= 100.0, "in [0, 100]")
        _check_count("history_size", self.history_size, 1)
        _check_policy(self.nonfinite)

    def init(self, tree: Any) -> AutoClipState:
        """An empty history in the namespace and on the device of ``tree``'s leaves."""
        with _namespace_of(tree, "AutoClip.init") as (_, xp, device, res):
            size = _size(self.history_size, "history_size", "AutoClip.init")
            history = xp.zeros((size,), dtype=res, device=device)
            count, skipped = (xp.zeros((), dtype=xp.int32, device=device) for _ in range(2))
        return AutoClipState(history, count, skipped)  # distinct buffers (see ZClip.init)

    _State = AutoClipState
    _sized_by = ("history", "history_size")

    def _step(
        self, tree: Any, state: AutoClipState, params: Any, inplace: bool
    ) -> tuple[Any, AutoClipState, ClipStats]:
        xp = _compat.namespace(state.history)
        size = state.history.shape[0]  # history_size, as init sized it
        fn = "AutoClip.update_" if inplace else "AutoClip.update"
        prep, norm, finite = _global_norm(tree, state, fn, self.nonfinite, inplace)
        norm = xp.astype(norm, state.history.dtype)
        device = _compat.device_of(state.history)
        slots = xp.arange(size, dtype=xp.int32, device=device)
        history = xp.where(finite & (slots == state.count % size), norm, state.history)
        count = state.count + xp.astype(finite, xp.int32)
        # The percentile of the filled slots: empty ones sort last as +inf.
        held = xp.minimum(count, _compat.asarray(xp, size, xp.int32, device))
        ordered = xp.sort(
            xp.where(slots < held, history, _compat.asarray(xp, math.inf, history.dtype, device))
        )
        last = xp.maximum(held - 1, _compat.asarray(xp, 0, xp.int32, device))
        pos = (self.percentile / 100.0) * xp.astype(last, history.dtype)
        lo = xp.astype(xp.floor(pos), xp.int32)
        hi = xp.minimum(lo + 1, last)
        # Before the first finite norm there is no history: nothing is clipped.
        # The empty slots (+inf) are masked before the interpolation, whose
        # inf - inf dask would report in the user's compute().
        some = held > 0
        zero = _compat.asarray(xp, 0.0, history.dtype, device)
        v_lo = xp.where(some, xp.take(ordered, xp.reshape(lo, (1,)))[0], zero)
        v_hi = xp.where(some, xp.take(ordered, xp.reshape(hi, (1,)))[0], zero)
        frac = pos - xp.astype(lo, history.dtype)
        threshold = v_lo + (v_hi - v_lo) * frac
        threshold = xp.where(some, threshold, _compat.asarray(xp, math.inf, history.dtype, device))
        skipped = state.skipped + xp.astype(~finite, xp.int32)
        new, stats = _clip(prep, threshold, norm, finite, self.nonfinite, inplace)
        return new, AutoClipState(history, count, skipped), stats


# -------------------------------------------------------------------------- AGC


class AGCState(NamedTuple):
    """AGC keeps no statistics.

    Examples
    --------
    >>> import numpy as np
    >>> from gradclip.adaptive import AGC
    >>> AGC(layout="torch").init([np.ones(2)])
    AGCState()
    """


def _unit_axes(x: Any, layout: str, axis: Any, name: str, fn: str) -> tuple[int, ...] | None:
    """The axes one unit's norm is taken over (``None``: the whole leaf)."""
    ndim = len(x.shape)
    if axis is not None:
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        if not ndim:
            return None
        bad = [a for a in axes if not -ndim <= a < ndim]
        if bad:
            shape = tuple(x.shape)
            raise ValueError(
                f"{fn}: axis {bad[0]} is out of range for leaf {name} of shape {shape}"
            )
        unique = tuple(a % ndim for a in axes)
        if len(set(unique)) != len(unique):
            # The backends' reductions refuse them, but a leaf that is one
            # unit larger than a block is reduced in flat blocks, unchecked.
            shape = tuple(x.shape)
            raise ValueError(
                f"{fn}: axis {tuple(axes)} names an axis twice for leaf {name} of shape {shape}"
            )
        return unique
    if layout == "torch":  # timm: out x in weights, a unit per output row
        return None if ndim <= 1 else tuple(range(1, ndim))
    # optax: in x out weights (and HWIO kernels), a unit per output column
    if sum(1 for n in x.shape if n != 1) <= 1:
        return None
    if ndim in (2, 3):
        return (0,)
    if ndim == 4:  # HWIO
        return (0, 1, 2)
    if ndim == 5:  # DHWIO (Conv3D)
        return (0, 1, 2, 3)
    raise ValueError(
        f"AGC: leaf {name} has {ndim} dimensions; layout='jax' (optax) takes 0-5, "
        "pass axis= for others"
    )


def _pieces(x: Any, axes: tuple[int, ...] | None, chunk: int | None) -> list[Any] | None:
    """How AGC reads and writes a leaf on an eager backend: index tuples.

    Whole units (along the first axis not reduced) of about ``chunk``
    entries apiece, so that the widened magnitudes, their squares and the
    products stay a block's, not several times the leaf's. ``[...]``: the
    leaf in one piece (JAX and dask fuse; a small leaf). ``None``: the leaf
    is one unit larger than a block, read in flat blocks.
    """
    size = math.prod(x.shape)
    if chunk is None or size <= chunk:
        return [...]
    kept = [] if axes is None else [a for a in range(len(x.shape)) if a not in axes]
    if not kept:
        return None
    k, n = kept[0], x.shape[kept[0]]
    step = max(1, chunk * n // size)
    if step >= n:
        return [...]
    return [(slice(None),) * k + (slice(s, min(s + step, n)), ...) for s in range(0, n, step)]


def _magnitudes(xp: Any, x: Any, dtype: Any) -> Any:
    return xp.abs(xp.astype(x, dtype)) if not _is_complex(xp, x) else xp.astype(xp.abs(x), dtype)


def _unit_norm(xp: Any, x: Any, axes: tuple[int, ...] | None, dtype: Any) -> Any:
    """Each unit's 2-norm (keepdims), scaled by the unit's max so it cannot overflow."""
    a = _magnitudes(xp, x, dtype)
    m = xp.max(a, axis=axes, keepdims=True)
    return _by_max(xp, m, lambda safe: xp.sum((a / safe) ** 2, axis=axes, keepdims=True))


def _by_max(xp: Any, m: Any, squares: Callable[[Any], Any]) -> Any:
    """The norm from the units' max ``m`` and ``squares(safe)``: the sums of ``(|x| / safe)**2``."""
    live = xp.isfinite(m) & (m > 0)
    safe = xp.where(live, m, xp.ones_like(m))
    # root, not sqrt: a zero unit's gradient through the clip stays finite.
    return xp.where(live, safe * root(xp, squares(safe), 2.0), m)


def _unit_norms(
    xp: Any, x: Any, axes: tuple[int, ...] | None, dtype: Any, pieces: list[Any] | None
) -> Any:
    """:func:`_unit_norm`, a piece at a time (see :func:`_pieces`)."""
    if pieces is None:  # one unit: its max, then its sum of squares, block by block
        chunk = _compat.chunk_elems(xp)
        flats = [b.flat for b in _compat.blocks(xp, x, chunk)]
        m = xp.max(xp.stack([xp.max(_magnitudes(xp, b, dtype)) for b in flats]))

        def squares(safe: Any) -> Any:
            sums = [xp.sum((_magnitudes(xp, b, dtype) / safe) ** 2) for b in flats]
            return xp.sum(xp.stack(sums))

        return xp.reshape(_by_max(xp, m, squares), (1,) * len(x.shape))
    if len(pieces) == 1:
        return _unit_norm(xp, x, axes, dtype)
    norms = [_unit_norm(xp, x[i], axes, dtype) for i in pieces]
    return xp.concat(norms, axis=len(pieces[0]) - 2)  # the axis before the ellipsis


def _rescaled(
    xp: Any, g: Any, pieces: list[Any] | None, keep: Any, factor: Any, wide: Any, inplace: bool
) -> Any:
    """``g`` with each unit not kept multiplied by its factor, a piece at a time.

    In place, or a new array. (Called once every leaf's factors are known,
    so an in-place call that raises has written nothing.)
    """

    def new(piece: Any, k: Any, f: Any) -> Any:
        return _compat.where(xp, k, piece, xp.astype(xp.astype(piece, wide) * f, g.dtype))

    if pieces is None:  # one unit: one factor, flat blocks
        k, f = xp.reshape(keep, ()), xp.reshape(factor, ())
        chunk = _compat.chunk_elems(xp)
        if not inplace:
            return new_blockwise(xp, g, lambda b: new(b, k, f), chunk, _compat.device_of(g))
        for block in _compat.blocks(xp, g, chunk):
            block.write(xp, new(block.flat, k, f))
        return g
    if not inplace and len(pieces) == 1:
        return _compat.as_array(new(g, keep, factor))
    out = g if inplace else xp.empty(g.shape, dtype=g.dtype, device=_compat.device_of(g))
    for i in pieces:
        out[i] = new(g[i], keep[i], factor[i])
    return out


def _is_complex(xp: Any, x: Any) -> bool:
    info = _compat.dtype_info(xp, x.dtype)
    return bool(info is not None and info.complex)


@dataclass(frozen=True)
class AGC(_Clipper):
    """Unitwise adaptive gradient clipping (Brock et al., 2021).

    Each unit (an output neuron's weights) of each gradient is scaled down
    to ``clipping * max(|W_unit|, eps)`` where its norm exceeds that. Which
    axes make a unit depends on how weights are laid out:

    - ``layout="jax"``: in x out weights and HWIO (DHWIO) kernels, as
      ``optax.adaptive_grad_clip`` (a unit per column: axis 0 of 2-d and
      3-d leaves, axes 0-2 of 4-d ones, 0-3 of 5-d ones; vectors and
      scalars whole);
    - ``layout="torch"``: out x in weights and OIHW kernels, as timm's
      ``adaptive_clip_grad`` (a unit per row: every axis but 0);
    - ``axis=``: the axes to reduce, for every leaf.

    So a torch model and its JAX port, with transposed weights, get the same
    clipped gradients. Norms are taken in float32 (float64 for float64
    leaves), scaled by each unit's largest entry, so they do not overflow.

    Parameters
    ----------
    clipping : float, default 0.01
        The ratio of gradient to parameter norm allowed.
    eps : float, default 1e-3
        The smallest parameter norm used.
    layout : {"jax", "torch"}, optional
        Required unless ``axis`` is given.
    axis : int or tuple of int, optional
        Reduction axes for every leaf, instead of a layout.

    Examples
    --------
    >>> import numpy as np
    >>> from gradclip.adaptive import AGC
    >>> agc = AGC(clipping=0.1, layout="torch")
    >>> w = np.ones((2, 4))  # two units (rows) of norm 2
    >>> g = np.array([[1.0, 0, 0, 0], [0.1, 0, 0, 0]])
    >>> out, _, stats = agc.update([g], agc.init([g]), params=[w])
    >>> out[0][:, 0]  # row 0 clipped to 0.1 * 2, row 1 kept
    array([0.2, 0.1])
    """

    clipping: float = 0.01
    eps: float = 1e-3
    layout: str | None = None
    axis: Any = None

    def __post_init__(self) -> None:
        if self.axis is None and self.layout not in ("jax", "torch"):
            raise ValueError(
                "AGC needs layout='jax' (in x out weights, optax) or layout='torch' "
                f"(out x in weights, timm), or axis=; got layout={self.layout!r}"
            )
        if self.axis is not None and not isinstance(self.axis, int | tuple | list):
            raise TypeError(
                f"AGC: axis must be an int or a tuple of ints; got {type(self.axis).__name__} "
                "(with optax.inject_hyperparams, pass static_args=('axis',))"
            )
        _check("clipping", self.clipping, lambda v: v > 0, "> 0")
        _check("eps", self.eps, lambda v: v >= 0, ">= 0")

    def init(self, tree: Any) -> AGCState:
        """AGC has no state."""
        return AGCState()

    _State = AGCState

    def _step(
        self, tree: Any, state: AGCState, params: Any, inplace: bool
    ) -> tuple[Any, AGCState, ClipStats]:
        fn = "AGC.update_" if inplace else "AGC.update"
        if params is None:
            raise TypeError(f"{fn}: AGC needs params= (the parameters the gradients belong to)")
        tree, params = _materialise(tree), _materialise(params)
        # A FlatTree's views, one per tensor; a functional call returns a FlatTree.
        grads = unit(tree, whole=False)
        if not grads.leaves:
            raise _NoLeaves
        weights = _paired_params(_plain(tree), _plain(params), grads, fn)
        xp = _api._check(grads, fn, inplace=inplace).xp
        with _compat.current_device(grads.leaves[0]):  # CuPy: the leaves' device
            return self._clip_leaves(xp, grads, weights, fn, inplace, state)

    def _clip_leaves(
        self, xp: Any, grads: Flat, weights: list[Any], fn: str, inplace: bool, state: AGCState
    ) -> tuple[Any, AGCState, ClipStats]:
        """Each leaf's unitwise clip, and the stats of the whole tree."""
        acc = xp.float64 if _compat.has_float64(xp, _compat.device_of(grads.leaves[0])) else None
        backend = _compat.backend_name(xp)
        for i, (g, w) in enumerate(zip(grads.leaves, weights, strict=True)):
            _check_param(backend, g, w, grads.paths[i], fn)
        # nn.Parameters require grad: their norms would carry an autograd
        # graph into the clipped gradients (and forbid .numpy() on them).
        if backend == "torch":
            weights = [w.detach() for w in weights]
        chunk = _compat.chunk_elems(xp)
        out, todo, before, after, finite = list(grads.leaves), [], [], [], []
        for i, (g, w) in enumerate(zip(grads.leaves, weights, strict=True)):
            name = grads.paths[i]
            if not _shapes_agree(g.shape, w.shape):
                raise ValueError(
                    f"{fn}: leaf {name} has shape {tuple(g.shape)} but its parameter has "
                    f"{tuple(w.shape)}"
                )
            if 0 in tuple(g.shape):
                # No entries, no unit norm (the max has no identity): the leaf
                # comes back as it is, as from optax.adaptive_grad_clip.
                continue
            info = _compat.dtype_info(xp, g.dtype)
            dtype = xp.float64 if info is not None and info.float64 else xp.float32
            axes = _unit_axes(g, self.layout or "", self.axis, name, fn)
            pieces = _pieces(g, axes, chunk)
            g_norm = _unit_norms(xp, g, axes, dtype, pieces)
            w_norm = _unit_norms(xp, w, axes, dtype, pieces)
            device = _compat.device_of(g)  # array-api-strict has other devices than its default
            eps = _compat.asarray(xp, self.eps, dtype, device)
            max_norm = xp.maximum(w_norm, eps) * self.clipping
            factor = max_norm / xp.maximum(g_norm, _compat.asarray(xp, 1e-6, dtype, device))
            keep = g_norm < max_norm
            todo.append((i, pieces, keep, factor, _wide(xp, g, dtype)))
            wide = acc or dtype
            # Scaled by the largest unit norm: squared in float32 (JAX
            # without x64), unit norms past 1.8e19 made the norm inf.
            before.append(_hypot(xp, xp.astype(g_norm, wide)))
            clipped = xp.where(keep, g_norm, max_norm)
            after.append(_hypot(xp, xp.astype(clipped, wide)))
            finite.append(xp.all(xp.isfinite(g_norm)))
        infos = [_compat.dtype_info(xp, x.dtype) for x in out]
        res = xp.float64 if any(i is not None and i.float64 for i in infos) else xp.float32
        device = _compat.device_of(grads.leaves[0])
        if not before:  # every leaf is empty: a norm of 0, nothing clipped
            zero = xp.zeros((), dtype=acc or res, device=device)
            before, after, finite = [zero], [zero], [xp.isfinite(zero)]
        norm = _hypot(xp, xp.stack(before))
        norm_after = _hypot(xp, xp.stack(after))
        scale = _compat.ratio_or_one(xp, norm_after, norm)
        stats = ClipStats(
            *(
                _compat.as_array(v)
                for v in (
                    xp.astype(norm, res),
                    xp.astype(scale, res),
                    norm_after < norm,
                    xp.all(xp.stack(finite)),
                )
            )
        )
        with _compat.no_grad(xp) if inplace else contextlib.nullcontext():
            for i, pieces, keep, factor, wide in todo:
                out[i] = _rescaled(xp, out[i], pieces, keep, factor, wide, inplace)
        return (None if inplace else grads.unflatten(out)), state, stats

    def state_dict(self, state: AGCState) -> dict[str, np.ndarray]:
        """AGC has no state: an empty dict."""
        return {}

    def load_state_dict(self, d: dict[str, Any], like: Any) -> AGCState:
        """AGC has no state."""
        return AGCState()


def _paired_params(tree: Any, params: Any, grads: Flat, fn: str) -> list[Any]:
    """The parameter of each of ``grads.leaves``, in their order.

    A ``None`` gradient (a frozen or unused parameter, which timm skips) is
    a position in ``tree`` whose parameter, or subtree of parameters, is
    left out. Where the parameters have no ``None`` and the counts agree,
    the leaves pair in order, so a list of gradients goes with a tuple or a
    generator of parameters.
    """
    weights = flatten(params).leaves
    jax = sys.modules.get("jax")
    walk: Callable[[Any], tuple[list[Any], Any]]
    if jax is not None and any(isinstance(g, jax.Array) for g in grads.leaves):
        # jax.tree_util, so flax and equinox nodes are walked as flatten does.
        walk = functools.partial(jax.tree_util.tree_flatten, is_leaf=lambda x: x is None)
    else:
        walk = functools.partial(optree.tree_flatten, none_is_leaf=True)
    if len(weights) == len(grads.leaves) and len(walk(params)[0]) == len(weights):
        # No None parameter: the leaves pair in order. With one, they pair by
        # position, or [g, None] with [None, w] would put g with w.
        return weights
    full, spec = walk(tree)
    if type(tree) in (list, tuple) and type(params) in (list, tuple):
        # A list of gradients goes with a tuple of parameters, or a generator.
        params = type(tree)(params)
    try:
        paired = spec.flatten_up_to(params)
    except (ValueError, TypeError) as exc:
        why = str(exc)  # optree's ends with the whole subtree, arrays and all
        raise ValueError(
            f"{fn}: {len(grads.leaves)} gradient leaves but {len(weights)} parameters, "
            f"and params= does not have the gradients' structure: "
            f"{why if len(why) <= 300 else why[:300] + '...'}"
        ) from None
    out = [w for g, w in zip(full, paired, strict=True) if g is not None]
    for i, w in enumerate(out):
        if not _compat.is_array(w):
            raise ValueError(
                f"{fn}: the gradient at {grads.paths[i]} has no parameter array (got {type(w)})"
            )
    return out


def _check_param(backend: str, g: Any, w: Any, name: str, fn: str) -> None:
    """Raise unless parameter ``w`` of leaf ``name`` is a ``backend`` array on ``g``'s device."""
    where = f"{fn}: the parameter of leaf {name}"
    if not _compat.is_array(w):
        raise TypeError(f"{where} is a {type(w).__name__}, not an array")
    lib = _compat.backend_name(_compat.namespace(w))
    if lib != backend:
        raise TypeError(f"{where} is a {lib} array but the gradients are {backend} arrays")
    here, there = _compat.device_key(w), _compat.device_key(g)
    if None not in (here, there) and here != there:
        raise ValueError(f"{where} is on {here} but the gradient is on {there}")


def _plain(tree: Any) -> Any:
    """A :class:`~gradclip.FlatTree`'s tree of views; any other tree as it is."""
    return tree.tree if isinstance(tree, FlatTree) else tree


def _wide(xp: Any, g: Any, real: Any) -> Any:
    """The dtype a gradient is multiplied in: its own, widened to float32 for halves."""
    if _is_complex(xp, g):
        return xp.complex128 if real == xp.float64 else xp.complex64
    return real


# ------------------------------------------------------------------------ AdaGC


class AdaGCState(NamedTuple):
    """AdaGC's per-tensor EMAs of clipped norms.

    Examples
    --------
    >>> import numpy as np
    >>> from gradclip.adaptive import AdaGC
    >>> state = AdaGC().init({"w": np.ones(2), "b": np.ones(1)})
    >>> state.ema, int(state.count)
    (array([0., 0.]), 0)
    """

    ema: Any  # (n_leaves,)
    count: Any  # finite steps seen (int32)
    skipped: Any  # steps whose gradients held a NaN or an inf (int32)


@dataclass(frozen=True)
class AdaGC(_Clipper):
    """Per-tensor adaptive clipping against each tensor's own history (Wang et al., 2025).

    For ``warmup_steps`` steps the gradients are clipped together at
    ``max_grad_norm`` (global-norm clipping), and ``ema_i`` is the smallest
    clipped norm tensor ``i`` has had, as in the paper's Algorithm 1.
    Afterwards tensor ``i`` is scaled by ``min(1, relative * ema_i / norm_i)``,
    and ``ema_i`` is an EMA (factor ``beta``) of its clipped norms, started
    from that minimum. The paper's defaults: ``relative=1.05``, ``beta=0.98``. Its
    :class:`~gradclip.ClipStats` are per leaf, as from ``clip_by_norm``.

    As in the paper, a tensor whose gradient is exactly zero on a warm-up
    step gets a minimum, and so a threshold, of 0: every later gradient of
    it is scaled to 0, and its EMA stays 0. (LoRA's A matrices have zero
    gradients at the first step, B starting at 0.) Start the clipper after
    such steps, or leave those tensors out of its tree.

    Parameters
    ----------
    relative : float, default 1.05
        The threshold relative to a tensor's EMA.
    beta : float, default 0.98
        EMA factor.
    warmup_steps : int, default 100
        Steps of global clipping before the per-tensor thresholds apply.
        The first finite step is always one of them, since its norms start
        the EMAs: ``warmup_steps=0`` behaves like 1.
    max_grad_norm : float, default 1.0
        The global bound during the warm-up.
    nonfinite : {"propagate", "zero", "skip", "raise"}, default "propagate"
        As for :class:`ZClip`.

    Examples
    --------
    >>> import numpy as np
    >>> from gradclip.adaptive import AdaGC
    >>> clipper = AdaGC(warmup_steps=1, max_grad_norm=100.0)
    >>> tree = {"a": np.ones(4), "b": np.ones(4)}
    >>> state = clipper.init(tree)
    >>> _, state, _ = clipper.update(tree, state)  # warm-up: EMAs start at 2, 2
    >>> out, state, stats = clipper.update({"a": np.ones(4) * 10, "b": np.ones(4)}, state)
    >>> [round(float(v), 2) for v in stats.norm], [round(float(v), 3) for v in stats.scale]
    ([20.0, 2.0], [0.105, 1.0])
    """

    relative: float = 1.05
    beta: float = 0.98
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    nonfinite: str = "propagate"

    def __post_init__(self) -> None:
        _check("beta", self.beta, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
        _check("relative", self.relative, lambda v: v > 0, "> 0")
        _check_count("warmup_steps", self.warmup_steps, 0)
        _check("max_grad_norm", self.max_grad_norm, lambda v: v >= 0, ">= 0")
        _check_policy(self.nonfinite)

    def init(self, tree: Any) -> AdaGCState:
        """Zero EMAs, one per leaf, in the leaves' namespace and on their device."""
        with _namespace_of(tree, "AdaGC.init") as (flat, xp, device, res):
            n = len(flat.leaves)
            count, skipped = (xp.zeros((), dtype=xp.int32, device=device) for _ in range(2))
            # distinct buffers (see ZClip.init)
            return AdaGCState(xp.zeros((n,), dtype=res, device=device), count, skipped)

    _State = AdaGCState
    _per_leaf = True

    def _why_shape(self, field: str) -> str:
        return " (one entry per leaf of the tree)" if field == "ema" else ""

    def _step(
        self, tree: Any, state: AdaGCState, params: Any, inplace: bool
    ) -> tuple[Any, AdaGCState, ClipStats]:
        fn = "AdaGC.update_" if inplace else "AdaGC.update"
        xp = _compat.namespace(state.ema)
        prep = _prepared(tree, state, fn, inplace, whole=False)
        norms = _api._run(prep, None, "leaf_norms", p=2.0, nonfinite=_norm_policy(self.nonfinite))
        norms = xp.astype(norms, state.ema.dtype)
        if tuple(norms.shape) != tuple(state.ema.shape):
            raise ValueError(
                f"{fn}: the tree has {norms.shape[0]} leaves but the state {state.ema.shape[0]}"
            )
        zero = self.nonfinite == "zero"  # ("raise" raised in leaf_norms, before any write)
        leaf_finite = xp.isfinite(norms)  # an overflowed norm too (see _global_norm)
        if zero:
            leaf_finite = leaf_finite & _leaves_finite(prep)
        finite = xp.all(leaf_finite)
        one = xp.ones_like(norms)
        eps = 1e-6
        plan = Plan(prep.xp, 2.0, prep.flat.leaves, zero_nonfinite=zero)
        # Warm-up: global-norm clipping at max_grad_norm; after it, each
        # tensor against its own EMA. Both with clip_by_global_norm's
        # arithmetic (no overflow; a NaN norm gives a NaN scale, as in torch).
        total = _hypot(xp, norms)
        global_scale = _core._scale_from_norm(plan, total, _scalar(self.max_grad_norm), eps)
        # No eps against the EMA (the paper's min(1, relative * ema / norm)):
        # a tensor whose norm is below eps would be clipped on every step,
        # and its EMA, of clipped norms, would decay to 0 with it.
        own = _core._scale_from_norm(plan, norms, self.relative * state.ema, 0.0)
        # Until a finite step has started the EMAs there is no per-tensor
        # threshold (it would be 0 and zero the step, and the EMAs with it).
        first = state.count == 0
        warm = (state.count < self.warmup_steps) | first
        scales = xp.where(warm, global_scale * one, own)
        if self.nonfinite == "skip":
            scales = xp.where(finite, scales, one)
        clipped_norms = norms * scales
        # The warm-up keeps the smallest clipped norm (the paper's Algorithm 1):
        # norms fall fast early in training, and an EMA of them would leave
        # the first per-tensor thresholds far above the norms they clip.
        ema = xp.where(
            warm,
            xp.where(first, clipped_norms, xp.minimum(state.ema, clipped_norms)),
            self.beta * state.ema + (1 - self.beta) * clipped_norms,
        )
        # In the state's dtype: float64 leaves' scales (JAX with x64) would
        # promote it, and a state whose dtype changes breaks lax.scan.
        ema = xp.astype(xp.where(finite, ema, state.ema), state.ema.dtype)
        count = state.count + xp.astype(finite, xp.int32)
        skipped = state.skipped + xp.astype(~finite, xp.int32)
        scales = xp.astype(scales, plan.res)
        leaves = plan.scale_leaves(scales, per_leaf=True, zero=zero, inplace=inplace)
        stats = ClipStats(*(_compat.as_array(v) for v in (norms, scales, scales < 1, leaf_finite)))
        return prep.flat.unflatten(leaves), AdaGCState(ema, count, skipped), stats


def _shapes_agree(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Equal shapes, where a size not known until computed (dask's NaN, or None) matches any."""
    if len(a) != len(b):
        return False
    unknown = _compat.unknown_size
    return all(m == n or unknown(m) or unknown(n) for m, n in zip(a, b, strict=True))


def _hypot(xp: Any, norms: Any) -> Any:
    """The 2-norm of an array of norms (or magnitudes), scaled by their max.

    ``norms**2`` overflows float32 past 1.8e19 (and zeroed AdaGC's warm-up,
    and made ZClip's variance inf, for good).
    """
    # Not raveled: dask cannot reshape an array with unknown chunk sizes
    # (AGC's row norms of a boolean-masked leaf).
    if 0 in norms.shape:
        return xp.sum(norms)
    top = xp.max(norms)
    top = xp.where((top > 0) & xp.isfinite(top), top, xp.ones_like(top))  # NaN/inf pass on
    # root, not sqrt: jax.grad through an all-zero tree stays finite.
    return top * root(xp, xp.sum((norms / top) ** 2), 2.0)


# ----------------------------------------------------------------- QuantileBound


class QuantileBoundState(NamedTuple):
    """The adaptive per-example bound: the current ``C`` and what moved it.

    Examples
    --------
    >>> import numpy as np
    >>> from gradclip.adaptive import QuantileBound
    >>> state = QuantileBound(initial=1.0).init([np.ones((4, 2))])
    >>> float(state.bound), float(state.fraction), int(state.count)  # no step yet: NaN
    (1.0, nan, 0)
    """

    bound: Any  # 0-d: C for the next step
    fraction: Any  # 0-d: the last step's (noised) fraction of unclipped examples
    count: Any  # updates so far (int32)


@dataclass(frozen=True)
class QuantileBound(_Stateful):
    """An adaptive DP-SGD clipping bound that tracks a quantile of the per-example norms.

    Andrew et al., *Differentially Private Learning with Adaptive Clipping*
    (NeurIPS 2021), which Opacus implements as ``AdaClipDPOptimizer``: after
    each step the bound moves toward the ``target_quantile`` of the
    per-example norms,

    ``C <- C * exp(-learning_rate * (b - target_quantile))`` (geometric), or
    ``C <- C - learning_rate * (b - target_quantile)`` (linear),

    where ``b = (#{i : norm_i <= C} + noise) / batch_size`` is the fraction
    of examples the bound left unclipped. For privacy, ``noise`` must be a
    draw of ``N(0, sigma_b**2)``; the caller supplies it (drawn with their own
    generator and accounted for in their privacy budget). The update is
    pure array arithmetic, no Python branch on a value and no host sync, so
    it runs under ``jax.jit``; the state lives in the gradients' namespace.

    Parameters
    ----------
    initial : float, default 0.1
        The first bound, the paper's ``C_0``.
    target_quantile : float, default 0.5
        The fraction of examples to leave unclipped, the paper's ``gamma``.
    learning_rate : float, default 0.2
        The paper's ``eta_C``.
    geometric : bool, default True
        The paper's geometric update; ``False`` gives Opacus's linear one.
    min_bound, max_bound : float, default 0 and inf
        The bound is kept in ``[min_bound, max_bound]`` (Opacus's
        ``min_clipbound``/``max_clipbound``); ``min_bound`` must be > 0 for
        the linear update, which can otherwise reach 0.

    Examples
    --------
    >>> import numpy as np
    >>> import gradclip as gc
    >>> from gradclip.adaptive import QuantileBound
    >>> grads = [np.array([[3.0, 4.0], [0.0, 0.5], [1.0, 0.0], [6.0, 8.0]])]
    >>> qb = QuantileBound(initial=1.0)
    >>> state = qb.init(grads)
    >>> total, stats = gc.per_example_clip(grads, state.bound)
    >>> state = qb.update(stats, state, noise=0.0)  # 2 of 4 norms <= 1: b = 0.5
    >>> float(state.fraction), float(state.bound)
    (0.5, 1.0)
    >>> state = qb.update(np.array([0.1, 0.2, 0.3, 5.0]), state)  # b = 0.75: C shrinks
    >>> round(float(state.bound), 4)  # exp(-0.2 * 0.25)
    0.9512
    """

    initial: float = 0.1
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    geometric: bool = True
    min_bound: float = 0.0
    max_bound: float = math.inf
    _State = QuantileBoundState

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_quantile <= 1.0:
            raise ValueError(f"target_quantile must be in [0, 1]; got {self.target_quantile!r}")
        if not self.learning_rate >= 0:
            raise ValueError(f"learning_rate must be >= 0; got {self.learning_rate!r}")
        if not 0.0 <= self.min_bound <= self.max_bound:
            raise ValueError(
                f"need 0 <= min_bound <= max_bound; got {self.min_bound!r}, {self.max_bound!r}"
            )
        if not self.min_bound <= self.initial <= self.max_bound or not self.initial > 0:
            raise ValueError(
                f"initial must be > 0 and in [min_bound, max_bound]; got {self.initial!r}"
            )
        if not self.geometric and not self.min_bound > 0:
            raise ValueError("the linear update (geometric=False) needs min_bound > 0")

    def init(self, tree: Any) -> QuantileBoundState:
        """The initial bound, in the namespace and on the device of ``tree``'s leaves."""
        with _namespace_of(tree, "QuantileBound.init") as (_, xp, device, res):
            return QuantileBoundState(
                _compat.asarray(xp, float(self.initial), res, device),
                _compat.asarray(xp, math.nan, res, device),
                xp.zeros((), dtype=xp.int32, device=device),
            )

    @_api._eager
    def update(
        self, norms: Any, state: QuantileBoundState, *, noise: Any = 0.0, batch_size: Any = None
    ) -> QuantileBoundState:
        """The bound for the next step, from this step's per-example norms.

        Parameters
        ----------
        norms : PerExampleStats or 1-d array
            The stats of :func:`gradclip.per_example_clip` with flat clipping
            at ``state.bound``, or the per-example norms themselves.
        state : QuantileBoundState
            The state whose bound clipped this step.
        noise : float or 0-d array, default 0.0
            Added to the count of unclipped examples: ``N(0, sigma_b**2)``
            for the privacy of the count (0 gives the non-private update).
        batch_size : int or 0-d array, optional
            The divisor of the count: the expected batch size under Poisson
            sampling. Default: the number of norms, which must not be 0.
        """
        if isinstance(norms, PerExampleStats):
            norms = norms.norm
        xp = _compat.namespace(state.bound)
        if not _compat.is_array(norms) or _compat.namespace(norms) is not xp:
            raise TypeError(
                f"QuantileBound.update: norms is a {type(norms).__name__} but the state holds "
                f"{type(state.bound).__name__}s: pass the norms of the leaves init() was given"
            )
        if len(norms.shape) != 1:
            raise ValueError(
                "QuantileBound.update: norms must be 1-d, one per example (flat clipping); "
                f"got shape {tuple(norms.shape)}"
            )
        if batch_size is None and norms.shape[0] == 0:
            # The fraction would be 0 / 0, and the bound NaN from then on.
            raise ValueError(
                "QuantileBound.update: no norms (an empty batch); pass batch_size=, the "
                "expected batch size (under Poisson sampling, batches can be empty)"
            )
        with _stepping(state):
            dtype = state.bound.dtype
            norms = xp.astype(norms, dtype)
            # b_i = 1[norm_i <= C]: a NaN norm counts as clipped.
            unclipped = xp.sum(xp.astype(norms <= state.bound, dtype))
            size = norms.shape[0] if batch_size is None else batch_size
            fraction = (unclipped + noise) / size
            step = self.learning_rate * (fraction - self.target_quantile)
            bound = state.bound * xp.exp(-step) if self.geometric else state.bound - step
            bound = xp.clip(bound, float(self.min_bound), float(self.max_bound))
            return QuantileBoundState(
                xp.astype(bound, dtype), xp.astype(fraction, dtype), state.count + 1
            )
