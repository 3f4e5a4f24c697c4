"""``GradMonitor``: per-leaf gradient norms, anomalies and history, on any backend.

Each :meth:`GradMonitor.update` measures every leaf of a gradient tree with
gradclip's own reductions (overflow-safe norms, the backends' fused fast
paths) and keeps the results on the device, in the leaves' namespace. Only
every ``log_every`` steps is the window stacked and copied to the host, where
anomalies are detected and the rows go to the sinks (JSONL, CSV, a
TensorBoard-style writer). Between those boundaries nothing forces a
device-to-host sync, so monitoring JAX, CuPy or CUDA torch gradients does not
stall the device.

The module imports no array library beyond NumPy, and matplotlib only inside
:meth:`GradMonitor.plot`.
"""

from __future__ import annotations

import csv as _csv
import functools
import json
import math
import operator
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, MappingView
from typing import Any, NamedTuple

import numpy as np
import optree

from . import _api, _compat
from ._api import _eager, global_norm, leaf_norms
from ._flat import FlatTree, unit
from ._norms import parse_ord
from ._stats import ClipStats
from ._tree import Flat, Paths, _plain_array

__all__ = ["GLOBAL", "GradMonitor", "History"]

#: The name anomalies of the global norm carry in place of a leaf path.
GLOBAL = "<global>"

# The spread below which a series counts as constant, relative to its mean:
# a leaf whose norm never moves would otherwise make every rounding-level
# change a spike of infinite z-score.
_MIN_REL_STD = 1e-2


class History(NamedTuple):
    """What a :class:`GradMonitor` has recorded, as NumPy arrays on the host.

    ``T`` is the number of recorded steps and ``n`` the number of leaves
    (their names are :attr:`GradMonitor.names`).

    Attributes
    ----------
    step : ndarray of int64, shape (T,)
        The step of each row.
    global_norm : ndarray of float64, shape (T,)
        The norm of all leaves taken together (the norm of the per-leaf
        norms, which is torch's ``get_total_norm`` for every ``ord``).
    leaf_norms : ndarray of float64, shape (T, n)
        Each leaf's norm.
    max_abs : ndarray of float64, shape (T, n)
        Each leaf's largest magnitude: NaN where the leaf holds a NaN.
    nonfinite : ndarray of int64, shape (T, n)
        How many NaN or infinite entries each leaf holds.
    nan : ndarray of int64, shape (T, n)
        How many NaN entries each leaf holds.
    scale : ndarray of float64, shape (T,)
        The clip scale from the step's :class:`~gradclip.ClipStats`, NaN on
        steps recorded without one.
    clipped : ndarray of bool, shape (T,)
        Whether the step was clipped (False on steps without stats).
    has_clip : ndarray of bool, shape (T,)
        Whether the step was recorded with a :class:`~gradclip.ClipStats`.

    Examples
    --------
    >>> import numpy as np
    >>> from gradclip.monitor import GradMonitor
    >>> monitor = GradMonitor()
    >>> monitor.update({"w": np.array([3.0, 4.0]), "b": np.array([np.nan])})
    >>> history = monitor.history
    >>> history.step, history.leaf_norms, history.nan, history.has_clip
    (array([0]), array([[nan,  5.]]), array([[1, 0]]), array([False]))
    """

    step: np.ndarray
    global_norm: np.ndarray
    leaf_norms: np.ndarray
    max_abs: np.ndarray
    nonfinite: np.ndarray
    nan: np.ndarray
    scale: np.ndarray
    clipped: np.ndarray
    has_clip: np.ndarray


def _is_named(tree: Any) -> bool:
    """Whether ``tree`` is ``named_parameters()``-style ``(name, tensor)`` pairs.

    A pytree never holds strings as leaves (gradclip rejects them), so a
    sequence of 2-tuples that each start with a string cannot be a gradient
    tree.
    """
    return (
        isinstance(tree, list | tuple)
        and len(tree) > 0
        and all(
            type(item) is tuple and len(item) == 2 and isinstance(item[0], str) for item in tree
        )
    )


def _grad(x: Any) -> Any:
    """The array to measure: a torch parameter (a leaf tensor that requires grad) gives ``.grad``.

    A frozen parameter has no gradient: it is skipped, not measured by value.
    A tensor that requires grad but is not a leaf (a gradient taken with
    ``create_graph=True``) has no ``.grad`` either: it is measured by value.
    """
    if getattr(x, "requires_grad", False) is True and x.is_leaf:
        return x.grad
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.nn.Parameter):
        return x.grad
    return x


def _check_stats(stats: Any) -> None:
    if not isinstance(stats, ClipStats):
        raise TypeError(f"stats must be a gradclip.ClipStats; got {type(stats).__name__}")
    shape = tuple(getattr(stats.scale, "shape", ()))
    if len(shape) > 1:
        raise ValueError(f"stats.scale must be 0-d or 1-d; got shape {shape}")


def _tag(name: str) -> str:
    """A TensorBoard tag for a leaf path: ``['encoder'][0]`` becomes ``encoder/0``."""
    return "/".join(re.findall(r"[\w.\-]+", name)) or "root"


def _tags(names: list[str]) -> list[str]:
    """Distinct TensorBoard tags for the leaves (see :func:`_distinct`).

    ``['a b']`` and ``['a']['b']`` both give ``a/b``, and TensorBoard would
    draw the two leaves as one curve. No :func:`_tag` holds a ``~``.
    """
    return _distinct(map(_tag, names))


def _distinct(names: Iterable[str]) -> list[str]:
    """The names, where one that an earlier leaf holds gets ``~2``, ``~3``, ...

    The files key a leaf's columns by its name; named pairs chained from two
    modules' ``named_parameters()`` repeat names (``weight``).
    """
    out: list[str] = []
    taken: set[str] = set()
    for base in names:
        tag, k = base, 1
        while tag in taken:
            k += 1
            tag = f"{base}~{k}"
        taken.add(tag)
        out.append(tag)
    return out


def _nonfinite_counts(xp: Any, leaves: list[Any]) -> Any:
    """Each leaf's count of NaN/inf entries, then of NaN entries (1-d, ``2 * n``).

    NaN is counted on its own because a max cannot tell: XLA on the CPU
    (``xla_cpu_enable_fast_min_max``) drops NaN from ``max`` reductions.
    """
    chunk = _compat.chunk_elems(xp)

    def count(a: Any) -> tuple[Any, Any]:
        bad = _compat.count_nonzero(xp, xp.logical_not(xp.isfinite(a)))
        return _compat.as_array(bad), _compat.as_array(_compat.count_nonzero(xp, xp.isnan(a)))

    bad, nan = [], []
    for x in leaves:
        if chunk is None or math.prod(x.shape) <= chunk:
            b, n = count(x)
        else:
            # Eager backends count block by block: a whole-leaf mask of a
            # 1 GB leaf would allocate 256 MB.
            parts = [count(block.flat) for block in _compat.blocks(xp, x, chunk)]
            b = functools.reduce(operator.add, [q[0] for q in parts])
            n = functools.reduce(operator.add, [q[1] for q in parts])
        bad.append(b)
        nan.append(n)
    return xp.stack(bad + nan)


def _all_finite(xp: Any, leaves: list[Any], norms: Any, maxabs: Any, p: float, jax: bool) -> Any:
    """0-d bool: every entry of every leaf is finite."""
    if 0 < p < math.inf:
        # A p-norm is a sum, and NaN/inf survive sums on every backend.
        return xp.all(xp.isfinite(norms))
    if not jax:
        return xp.all(xp.isfinite(maxabs))
    # XLA on the CPU drops NaN from max (xla_cpu_enable_fast_min_max), and a
    # max-abs of 1 would hide it; x * 0 is NaN exactly where x is not finite.
    return xp.all(xp.isfinite(xp.stack([xp.sum(x * 0) for x in leaves])))


def _measure(
    leaves: list[Any], *, p: float, fused: bool | None, skip: str | None
) -> tuple[Any, Any]:
    """One step's device row ``[global, norms..., max_abs...]`` and non-finite and NaN counts.

    Plain array-API code over gradclip's public reductions, so it runs eagerly
    on every backend and traced under ``jax.jit``. ``skip`` says how to skip
    the counting pass over every gradient when all are finite: ``"host"``
    (arrays in host memory, where a look at a value is free), ``"cond"``
    (JAX on the CPU, under ``jit``: ``lax.cond``) or ``None`` (always count:
    on an accelerator, skipping would need a sync, and counting fuses with
    the norms).
    """
    xp = _compat.namespace(leaves[0])
    norms = leaf_norms(leaves, p, fused=fused)
    maxabs = leaf_norms(leaves, math.inf, fused=fused)
    # The norm of the per-leaf norms is the global norm for every ord
    # (torch's get_total_norm), overflow-safe like the per-leaf ones. For
    # ord 0 that is the number of leaves with a nonzero entry: the vector of
    # counts given as one leaf would be counted twice (0 or 1).
    if p == 0:
        total = xp.sum(xp.astype(norms != 0, norms.dtype))
    elif p == -math.inf and any(math.prod(x.shape) == 0 for x in leaves):
        # An empty leaf's norm is 0, but global_norm leaves it out of -inf (it
        # holds no entry): one more pass, in this corner only.
        total = global_norm(leaves, p, fused=fused)
    else:
        total = global_norm(norms, p)
    row = xp.concat([xp.reshape(total, (1,)), norms, maxabs])
    if skip is None:
        return row, _nonfinite_counts(xp, leaves)
    finite = _all_finite(xp, leaves, norms, maxabs, p, jax=skip == "cond")
    if skip == "host":
        if bool(finite):
            zero = xp.zeros((2 * len(leaves),), dtype=xp.int64, device=_compat.device_of(leaves[0]))
            return row, zero
        return row, _nonfinite_counts(xp, leaves)
    # ``int`` is JAX's default integer, the dtype count_nonzero returns.
    zeros = xp.zeros((2 * len(leaves),), dtype=int)
    counts = sys.modules["jax"].lax.cond(
        finite, lambda: zeros, lambda: xp.astype(_nonfinite_counts(xp, leaves), zeros.dtype)
    )
    return row, counts


@functools.cache
def _jitted(p: float, fused: bool | None, cpu: bool) -> Any:
    # JAX: one compiled call per step instead of a dispatch per reduction.
    # jax is imported by the time JAX arrays reach us.
    jax = sys.modules["jax"]
    return jax.jit(functools.partial(_measure, p=p, fused=fused, skip="cond" if cpu else None))


def _jax_on_cpu(x: Any) -> bool:
    return all(d.platform == "cpu" for d in x.devices())


def _host_backend(xp: Any, x: Any) -> bool:
    """Whether arrays of ``xp`` live in host memory, so reading one costs no sync."""
    name = _compat.backend_name(xp)
    if name in ("numpy", "array_api_strict"):
        return True
    return name == "torch" and getattr(x.device, "type", None) == "cpu"


def _structure(tree: Any, leaves: list[Any]) -> Any:
    """A key of ``tree``'s structure, equal for two trees whose leaves have the same paths.

    Compared every step, so it costs no Python per leaf: ``(list, n)`` for a
    list or tuple of NumPy, CuPy or torch arrays (the common
    ``[p.grad for p in params]``; others, Parameters too, get a treedef), the
    ``Paths`` object of a :class:`~gradclip.FlatTree` (the same object for
    the same FlatTree), else the treedef of the library that ``flatten``
    walked the tree with.
    """
    kind = type(tree)
    if (kind is list or kind is tuple) and all(map(_plain_array, set(map(type, tree)))):
        return kind, len(tree)
    if isinstance(tree, FlatTree):
        return tree._flat.paths
    jax = sys.modules.get("jax")
    if jax is not None and any(isinstance(x, jax.Array) for x in leaves[:1]):
        return jax.tree_util.tree_structure(tree)
    return optree.tree_structure(tree)


def _same_key(a: Any, b: Any) -> bool:
    # Keys of different kinds never match; Paths objects only by identity.
    return a is b or (type(a) is type(b) and not isinstance(a, Paths) and bool(a == b))


def _check_limit(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a number or None; got {type(value).__name__}")
    v = float(value)
    if not v >= 0 or math.isinf(v):
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    return v


class GradMonitor:
    """Record per-leaf gradient statistics every step and flag anomalies by leaf name.

    Each :meth:`update` measures, per leaf, the norm, the largest magnitude
    and the numbers of NaN/inf and of NaN entries, and the global norm, with
    gradclip's overflow-safe reductions and fast paths. The measurements stay
    on the device in the leaves' namespace. Once ``log_every`` steps are
    recorded, the next :meth:`update` first copies that window to the host
    (one transfer per array), detects anomalies, appends the rows to
    :attr:`history` and writes them to the sinks; in between, :meth:`update`
    forces no device-to-host sync, so JAX, CuPy and CUDA torch run ahead
    undisturbed. (For NumPy and CPU torch arrays, where reading a value is
    free, it checks whether anything is non-finite before counting.) Reading
    :attr:`history` or :attr:`anomalies`, or calling :meth:`flush`,
    :meth:`to_jsonl`, :meth:`to_csv` or :meth:`plot`, flushes the partial
    window first.

    Anomalies, each a dict with ``step``, ``leaf`` (the leaf's name, or
    ``"<global>"`` for the global norm), ``kind`` and ``value``:

    - ``"nan"`` / ``"inf"``: the leaf holds NaN entries (``"nan"``), or
      infinite ones and no NaN (``"inf"``); ``value`` is how many entries
      are NaN or infinite.
    - ``"overflow"``: an infinite norm of finite entries (float32 gradients
      near 1e38, whose norm is past float32): a clip by it scales by 0;
      ``value`` is the norm.
    - ``"threshold"``: a finite norm above ``threshold`` (global norm) or
      ``leaf_threshold`` (each leaf); ``value`` is the norm, and the dict
      also holds the ``threshold``.
    - ``"spike"``: a norm more than ``z_threshold`` standard deviations above
      that series' exponential moving mean, once ``warmup`` finite values
      have been seen; ``value`` is the norm and ``z`` the z-score. Spikes
      enter the moving statistics capped at the threshold, so one spike
      neither hides the next nor stays flagged; non-finite values are left
      out. The spread is at least 1% of the mean, so a series that is nearly
      constant is not flagged for rounding-level changes (and a series
      that has only been 0 is not z-scored at all).

    Parameters
    ----------
    log_every : int, default 100
        Steps per window: how often measurements go to the host and the sinks.
    threshold : float, optional
        Flag steps whose global norm exceeds it.
    leaf_threshold : float, optional
        Flag leaves whose norm exceeds it.
    z_threshold : float or None, default 6.0
        Flag spikes above this z-score; ``None`` turns spike detection off.
    warmup : int, default 20
        Finite values a series needs before its spikes are flagged.
    beta : float, default 0.98
        Decay of the moving mean and variance (``1 / (1 - beta)`` steps of
        memory); over a series' first ``1 / (1 - beta)`` finite values, its
        plain running mean and variance are used.
    ord : float, default 2.0
        The norm, as for :func:`gradclip.leaf_norms`.
    fused : bool or None, default None
        As for :func:`gradclip.leaf_norms`.
    writer : object, optional
        A TensorBoard ``SummaryWriter`` or anything with
        ``add_scalar(tag, value, step)``: at each flush it receives, per step,
        ``{prefix}/global_norm``, ``{prefix}/scale`` and ``{prefix}/clipped``
        (steps with clip stats), ``{prefix}/nonfinite`` (the total count),
        ``{prefix}/anomalies`` (how many were flagged), and per leaf
        ``{prefix}/norm/<leaf>`` and ``{prefix}/max_abs/<leaf>``, the leaf's
        name turned into a tag (``['encoder'][0]`` becomes ``encoder/0``; a
        tag an earlier leaf took gets ``~2``, ``~3``, ...).
    prefix : str, default "grad"
        The first part of the writer's tags.
    jsonl, csv : str or path-like, optional
        Files that receive the rows at every flush, in the formats of
        :meth:`to_jsonl` and :meth:`to_csv`. Each is truncated at its first
        flush.

    Attributes
    ----------
    names : list of str
        The leaves' names, fixed by the first :meth:`update`: pytree paths
        such as ``['encoder'][0]``, or the names of ``(name, tensor)`` pairs.

    Notes
    -----
    Pass the gradients as the clip call saw them, before clipping. With an
    in-place clip, call :meth:`update` first and hand the clip's stats to
    :meth:`record_clip`. :meth:`update` is stateful Python: call it outside
    ``jax.jit``, on the jitted step's outputs.

    Examples
    --------
    >>> import numpy as np
    >>> import gradclip as gc
    >>> from gradclip.monitor import GradMonitor
    >>> monitor = GradMonitor(log_every=4, threshold=12.0)
    >>> for step in range(8):
    ...     grads = {"w": np.full(4, 1.0 + step), "b": np.array([0.5, -0.5])}
    ...     if step == 6:
    ...         grads["b"][1] = np.nan
    ...     clipped, stats = gc.clip_by_global_norm(grads, max_norm=10.0)
    ...     monitor.update(grads, stats)
    >>> monitor.names
    ["['b']", "['w']"]
    >>> history = monitor.history
    >>> history.leaf_norms[:3]
    array([[0.70710678, 2.        ],
           [0.70710678, 4.        ],
           [0.70710678, 6.        ]])
    >>> history.max_abs[5], history.nonfinite[6]
    (array([0.5, 6. ]), array([1, 0]))
    >>> history.step[history.clipped]  # a NaN norm gives a NaN scale: not "clipped"
    array([4, 5, 7])
    >>> for anomaly in monitor.anomalies:
    ...     print(anomaly)
    {'step': 5, 'leaf': '<global>', 'kind': 'threshold', 'value': 12.02..., 'threshold': 12.0}
    {'step': 6, 'leaf': "['b']", 'kind': 'nan', 'value': 1}
    {'step': 7, 'leaf': '<global>', 'kind': 'threshold', 'value': 16.01..., 'threshold': 12.0}

    ``named_parameters()``-style pairs work too (torch parameters are read
    through their ``.grad``):

    >>> monitor = GradMonitor(log_every=10)
    >>> monitor.update([("layer.weight", np.ones((2, 2))), ("layer.bias", np.zeros(2))])
    >>> monitor.names, monitor.history.global_norm
    (['layer.weight', 'layer.bias'], array([2.]))
    """

    def __init__(
        self,
        log_every: int = 100,
        *,
        threshold: float | None = None,
        leaf_threshold: float | None = None,
        z_threshold: float | None = 6.0,
        warmup: int = 20,
        beta: float = 0.98,
        ord: float = 2.0,
        fused: bool | None = None,
        writer: Any = None,
        prefix: str = "grad",
        jsonl: str | os.PathLike[str] | None = None,
        csv: str | os.PathLike[str] | None = None,
    ) -> None:
        if isinstance(log_every, bool) or not isinstance(log_every, int | np.integer):
            raise TypeError(f"log_every must be an int; got {type(log_every).__name__}")
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1; got {log_every}")
        if isinstance(warmup, bool) or not isinstance(warmup, int | np.integer) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1; got {warmup!r}")
        z = _check_limit(z_threshold, "z_threshold")
        if z is not None and z <= 0:
            raise ValueError(f"z_threshold must be > 0 or None; got {z_threshold!r}")
        number = isinstance(beta, int | float | np.integer | np.floating)
        if isinstance(beta, bool) or not number or not 0 < beta < 1:
            raise ValueError(f"beta must be a number in (0, 1); got {beta!r}")
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(
                "writer must have an add_scalar(tag, value, step) method, "
                f"like torch.utils.tensorboard.SummaryWriter; got {type(writer).__name__}"
            )
        self._p = parse_ord(ord)
        self._fused = fused
        self.log_every = int(log_every)
        self.threshold = _check_limit(threshold, "threshold")
        self.leaf_threshold = _check_limit(leaf_threshold, "leaf_threshold")
        self.z_threshold = z
        self.warmup = int(warmup)
        self.beta = float(beta)
        self.writer = writer
        self.prefix = prefix
        self._sinks: dict[str, Any] = {"jsonl": jsonl, "csv": csv}
        self._sink_started: set[str] = set()

        self.names: list[str] = []
        self._key: Any = None  # the first step's tree structure (see _structure)
        self._xp: Any = None
        self._started = False
        self._next_step = 0
        # The window on the device: one entry per step since the last flush.
        self._steps: list[int] = []
        self._rows: list[Any] = []
        self._counts: list[Any] = []
        self._clip: list[Any] = []
        # The host side: flushed windows, and the moving statistics of
        # [global, leaf 0, leaf 1, ...] for spike detection.
        self._windows: list[History] = []
        self._row_anomalies: list[list[dict[str, Any]]] = []
        self._anomalies: list[dict[str, Any]] = []
        self._mean = np.zeros(0)
        self._var = np.zeros(0)
        self._seen = np.zeros(0, np.int64)

    # ------------------------------------------------------------------ recording
    def _leaves(self, tree: Any) -> tuple[list[Any], Any, Callable[[], list[str]]]:
        """The arrays to measure, a key of the tree's structure, and their names.

        Two trees with equal keys have the same leaves under the same names.
        The key is a treedef (one walk in C, no Python per leaf); the names,
        a string per leaf, are only computed when the keys differ.
        """
        if isinstance(tree, Iterator | MappingView):
            tree = list(tree)  # type: ignore[arg-type]  # a MappingView is iterable
        if _is_named(tree):
            names, leaves = [], []
            for name, value in tree:
                g = _grad(value)
                if g is not None:
                    names.append(name)
                    leaves.append(g)
            return leaves, names, lambda: names
        flat = unit(tree, whole=False)
        leaves = [_grad(x) for x in flat.leaves]
        key = _structure(tree, flat.leaves)
        if any(g is None for g in leaves):
            # Parameters without a gradient are skipped, as None leaves are;
            # which ones are kept is part of the structure.
            keep = [i for i, g in enumerate(leaves) if g is not None]
            return (
                [leaves[i] for i in keep],
                (key, tuple(keep)),
                lambda: [flat.paths[i] for i in keep],
            )
        return leaves, key, lambda: list(flat.paths)

    def _check_same_leaves(self, key: Any, names: Callable[[], list[str]]) -> None:
        """Raise unless this step's leaves are the first step's, naming the first that is not."""
        if _same_key(key, self._key):
            return
        now = names()
        if now == self.names:  # another container with the same leaves (a tuple for a list)
            return
        first = self.names
        # The first position whose name differs; else the shorter list's end.
        pairs = enumerate(zip(first, now, strict=False))
        i = next((i for i, (a, b) in pairs if a != b), min(len(first), len(now)))
        had = first[i] if i < len(first) else "no leaf"
        has = now[i] if i < len(now) else "no leaf"
        raise ValueError(
            f"GradMonitor.update: the leaves changed at leaf {i}: the first step had {had}, "
            f"this one has {has} ({len(first)} leaves then, {len(now)} now). "
            "Use a new GradMonitor for a different tree."
        )

    @_eager  # a graph break under torch.compile, as the top-level functions
    def update(self, tree: Any, stats: ClipStats | None = None, *, step: int | None = None) -> None:
        """Measure one step's gradients (and the clip call's stats, if given).

        Parameters
        ----------
        tree : pytree of arrays, or iterable of (name, array) pairs
            The gradients, as for :func:`gradclip.leaf_norms`, or
            ``named_parameters()``-style pairs (a ``dict.items()`` view
            works). Tensors that require grad (torch parameters) are read
            through ``.grad``; leaves without one are skipped. The leaves must
            be the same every step.
        stats : ClipStats, optional
            What the clip call of this step returned: its ``scale`` and
            ``clipped`` are recorded (per-leaf stats from
            :func:`gradclip.clip_by_norm` as the smallest scale and whether
            any leaf was clipped).
        step : int, optional
            The step number; by default one more than the last (from 0).

        Raises
        ------
        ValueError
            If the tree holds no arrays, or its leaves differ from the first
            step's (the message names the first leaf that differs).
        OSError
            If a sink's file cannot be written when the window is flushed;
            the window stays in :attr:`history` and this step is recorded.
        """
        leaves, key, names = self._leaves(tree)
        if not leaves:
            raise ValueError(
                "GradMonitor.update: nothing to measure; the tree holds no arrays "
                "(parameters without a .grad are skipped)"
            )
        kinds = set(map(type, leaves))  # one check per type: trees hold thousands of leaves
        if len(kinds) > 1 or not _compat.is_array(leaves[0]):
            # A named pair's value must be an array: a sub-tree there would
            # be measured as several leaves under one name.
            for i, x in enumerate(leaves):
                if not _compat.is_array(x):
                    raise TypeError(
                        f"GradMonitor.update: leaf {names()[i]} is a {_api._describe(x)}, "
                        "not an array"
                    )
        if _compat.traced(leaves):
            raise TypeError(
                "GradMonitor.update: the gradients are traced (inside jax.jit, vmap or grad); "
                "the monitor keeps its history on the host side, so call update outside the "
                "transform, on the gradients the jitted step returns"
            )
        if self._started:
            self._check_same_leaves(key, names)
        if step is None:
            step = self._next_step
        elif isinstance(step, bool) or not isinstance(step, int | np.integer):
            raise TypeError(f"step must be an int; got {type(step).__name__}")
        if stats is not None:
            _check_stats(stats)  # before anything is recorded
        if self._started and _compat.namespace(leaves[0]) is not self._xp:
            raise TypeError(
                "GradMonitor.update: the leaves are arrays of another library than the first "
                f"step's ({_compat.backend_name(self._xp)})"
            )
        first_names = None if self._started else names()
        row, counts = self._measure(leaves, self.names if first_names is None else first_names)
        if first_names is not None:
            self._start(leaves, first_names, key)
        try:
            if len(self._rows) >= self.log_every:
                self._flush()  # may raise: a sink's file cannot be written
        finally:  # this step is recorded all the same
            self._next_step = int(step) + 1
            self._steps.append(int(step))
            self._rows.append(row)
            self._counts.append(counts)
            self._clip.append(None)
            if stats is not None:
                self.record_clip(stats)

    def _measure(self, leaves: list[Any], names: list[str]) -> tuple[Any, Any]:
        """Run :func:`_measure`; errors name the leaf by its path, not by its index."""
        try:
            xp = _compat.namespace(leaves[0])
            if _compat.backend_name(xp) == "jax":
                if len(set(map(type, leaves))) > 1:  # jit would take a NumPy leaf as JAX's
                    _api._check(Flat(leaves, Paths(lambda: names), list), "leaf_norms")
                measure = _jitted(self._p, self._fused, _jax_on_cpu(leaves[0]))
                return measure(leaves)  # type: ignore[no-any-return]
            skip = "host" if _host_backend(xp, leaves[0]) else None
            with _compat.quiet(xp), _compat.current_device(leaves[0]), _compat.no_grad(xp):
                return _measure(leaves, p=self._p, fused=self._fused, skip=skip)
        except (TypeError, ValueError) as exc:
            # The reductions see the flat list of leaves, so their messages
            # say "leaf [3]": put the leaf's own name there.
            msg = re.sub(
                r"leaf \[(\d+)\]",
                lambda m: f"leaf {names[int(m[1])]}" if int(m[1]) < len(names) else m[0],
                str(exc),
            )
            if type(exc) not in (TypeError, ValueError):  # a subclass may take other arguments
                raise
            raise type(exc)(f"GradMonitor.update: {msg}") from exc

    def _start(self, leaves: list[Any], names: list[str], key: Any) -> None:
        self._started = True
        self.names = list(names)
        self._key = key
        self._xp = _compat.namespace(leaves[0])
        size = len(leaves) + 1
        self._mean = np.zeros(size)
        self._var = np.zeros(size)
        self._seen = np.zeros(size, np.int64)

    @_eager
    def record_clip(self, stats: ClipStats) -> None:
        """Attach a clip call's stats to the step last recorded by :meth:`update`.

        For in-place clipping, which changes the gradients: call
        :meth:`update` before clipping, then this with the stats. Nothing is
        read from the device.

        Parameters
        ----------
        stats : ClipStats
            As for :meth:`update`.
        """
        _check_stats(stats)
        if not self._rows:
            raise RuntimeError(
                "GradMonitor.record_clip: no step to attach the stats to; call update() "
                "first (and record_clip before the next flush)"
            )
        xp = self._xp
        scale, clipped = stats.scale, stats.clipped
        if _compat.namespace(scale) is not xp:
            # Stats of another library (an empty tree's are NumPy's), put where
            # the window is: flush stacks them with the rest.
            # Through NumPy: torch.asarray reads a JAX array's buffer wrongly
            # (a bool's byte as a float32, a 0-d array as 1-d).
            device = _compat.device_of(self._rows[-1])
            scale, clipped = (
                xp.asarray(_compat.to_numpy(v), device=device) for v in (scale, clipped)
            )
        dtype = self._rows[-1].dtype
        if scale.ndim == 1:  # per-leaf stats (clip_by_norm)
            scale, clipped = xp.min(scale), xp.any(clipped)
        with _compat.current_device(self._rows[-1]), _compat.no_grad(xp):
            self._clip[-1] = xp.stack([xp.astype(scale, dtype), xp.astype(clipped, dtype)])

    # ------------------------------------------------------------------- flushing
    def flush(self) -> None:
        """Copy the window to the host, detect anomalies, and write the sinks.

        This is the one place that transfers from the device; :meth:`update`
        calls it every ``log_every`` steps. Call it at the end of training
        (or use the monitor as a context manager) so the last, partial window
        reaches the sinks.
        """
        self._flush()

    def __enter__(self) -> GradMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        xp, n = self._xp, len(self.names)
        clips = [c for c in self._clip if c is not None]
        with _compat.current_device(self._rows[0]):
            rows = _compat.to_numpy(xp.stack(self._rows)).astype(np.float64)
            counts = _compat.to_numpy(xp.stack(self._counts)).astype(np.int64)
            clip = _compat.to_numpy(xp.stack(clips)) if clips else None
        size = len(self._rows)
        scale = np.full(size, np.nan)
        clipped = np.zeros(size, bool)
        has_clip = np.array([c is not None for c in self._clip])
        if clip is not None:
            scale[has_clip] = clip[:, 0]
            clipped[has_clip] = clip[:, 1] != 0
        window = History(
            step=np.array(self._steps, np.int64),
            global_norm=rows[:, 0],
            leaf_norms=rows[:, 1 : n + 1],
            max_abs=rows[:, n + 1 :],
            nonfinite=counts[:, :n],
            nan=counts[:, n:],
            scale=scale,
            clipped=clipped,
            has_clip=has_clip,
        )
        self._steps, self._rows, self._counts, self._clip = [], [], [], []
        anomalies = self._detect(window)
        self._windows.append(window)
        self._row_anomalies.extend(anomalies)
        for found in anomalies:
            self._anomalies.extend(found)
        self._write_sinks(window, anomalies)

    def _detect(self, window: History) -> list[list[dict[str, Any]]]:
        """Flag anomalies row by row, updating the moving statistics (host only)."""
        names = [GLOBAL, *_distinct(self.names)]
        series = np.concatenate([window.global_norm[:, None], window.leaf_norms], axis=1)
        out = []
        z_limit = self.z_threshold
        for t in range(series.shape[0]):
            step = int(window.step[t])
            x = series[t]
            found: list[dict[str, Any]] = []
            finite = np.isfinite(x)
            # z-scores against the statistics of the steps before this one.
            std = np.maximum(np.sqrt(self._var), _MIN_REL_STD * np.abs(self._mean))
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.where(std > 0, (x - self._mean) / std, 0.0)
            ready = self._seen >= self.warmup
            spike = finite & ready & (z > z_limit) if z_limit is not None else np.zeros_like(finite)
            for i, name in enumerate(names):
                # the leaf's NaN/inf entries, or (the global norm) the tree's
                bad = window.nonfinite[t, i - 1] if i else window.nonfinite[t].sum()
                if np.isinf(x[i]) and not bad:
                    found.append(
                        {"step": step, "leaf": name, "kind": "overflow", "value": float(x[i])}
                    )
                if i > 0 and bad > 0:
                    kind = "nan" if window.nan[t, i - 1] > 0 else "inf"
                    found.append(
                        {
                            "step": step,
                            "leaf": name,
                            "kind": kind,
                            "value": int(window.nonfinite[t, i - 1]),
                        }
                    )
                limit = self.threshold if i == 0 else self.leaf_threshold
                if limit is not None and finite[i] and x[i] > limit:
                    found.append(
                        {
                            "step": step,
                            "leaf": name,
                            "kind": "threshold",
                            "value": float(x[i]),
                            "threshold": limit,
                        }
                    )
                if spike[i]:
                    found.append(
                        {
                            "step": step,
                            "leaf": name,
                            "kind": "spike",
                            "value": float(x[i]),
                            "z": float(z[i]),
                        }
                    )
            # A spike enters the statistics capped at the threshold; NaN/inf not at all.
            if z_limit is not None:
                x = np.where(spike, self._mean + z_limit * std, x)
            self._seen += finite
            alpha = np.maximum(1.0 - self.beta, 1.0 / np.maximum(self._seen, 1))
            delta = np.where(finite, x - self._mean, 0.0)
            step_alpha = np.where(finite, alpha, 0.0)
            self._mean = self._mean + step_alpha * delta
            self._var = np.where(
                finite, (1.0 - step_alpha) * (self._var + step_alpha * delta * delta), self._var
            )
            out.append(found)
        return out

    # ---------------------------------------------------------------------- access
    @property
    def history(self) -> History:
        """Every recorded step as NumPy arrays (flushes the window first)."""
        self._flush()
        n = len(self.names)
        if not self._windows:
            empty = np.zeros(0)
            return History(
                step=np.zeros(0, np.int64),
                global_norm=empty,
                leaf_norms=np.zeros((0, n)),
                max_abs=np.zeros((0, n)),
                nonfinite=np.zeros((0, n), np.int64),
                nan=np.zeros((0, n), np.int64),
                scale=empty,
                clipped=np.zeros(0, bool),
                has_clip=np.zeros(0, bool),
            )
        if len(self._windows) > 1:
            self._windows = [
                History(*(np.concatenate(parts) for parts in zip(*self._windows, strict=True)))
            ]
        return self._windows[0]

    @property
    def anomalies(self) -> list[dict[str, Any]]:
        """Every anomaly flagged so far, in step order (flushes the window first)."""
        self._flush()
        return list(self._anomalies)

    # ---------------------------------------------------------------------- output
    def _records(self, window: History, anomalies: list[list[dict[str, Any]]]) -> Iterator[Any]:
        """One JSON-ready dict per row."""
        names = _distinct(self.names)
        for t in range(window.step.shape[0]):
            yield {
                "step": int(window.step[t]),
                "global_norm": float(window.global_norm[t]),
                "scale": float(window.scale[t]) if window.has_clip[t] else None,
                "clipped": bool(window.clipped[t]) if window.has_clip[t] else None,
                "leaf_norms": dict(zip(names, window.leaf_norms[t].tolist(), strict=True)),
                "max_abs": dict(zip(names, window.max_abs[t].tolist(), strict=True)),
                "nonfinite": dict(zip(names, window.nonfinite[t].tolist(), strict=True)),
                "anomalies": [{k: v for k, v in a.items() if k != "step"} for a in anomalies[t]],
            }

    def _csv_header(self) -> list[str]:
        names = _distinct(self.names)
        return [
            "step",
            "global_norm",
            "scale",
            "clipped",
            *(f"norm:{name}" for name in names),
            *(f"max_abs:{name}" for name in names),
            *(f"nonfinite:{name}" for name in names),
            "anomalies",
        ]

    def _csv_rows(self, window: History, anomalies: list[list[dict[str, Any]]]) -> Iterator[Any]:
        for rec in self._records(window, anomalies):
            yield [
                rec["step"],
                rec["global_norm"],
                "" if rec["scale"] is None else rec["scale"],
                "" if rec["clipped"] is None else int(rec["clipped"]),
                *rec["leaf_norms"].values(),
                *rec["max_abs"].values(),
                *rec["nonfinite"].values(),
                json.dumps(rec["anomalies"]),
            ]

    def _write_jsonl(self, path: Any, mode: str, window: History, anomalies: Any) -> None:
        with open(path, mode, encoding="utf-8") as f:
            for rec in self._records(window, anomalies):
                f.write(json.dumps(rec) + "\n")

    def _write_csv(
        self, path: Any, mode: str, window: History, anomalies: Any, header: bool
    ) -> None:
        with open(path, mode, encoding="utf-8", newline="") as f:
            writer = _csv.writer(f)
            if header:
                writer.writerow(self._csv_header())
            writer.writerows(self._csv_rows(window, anomalies))

    def _write_sinks(self, window: History, anomalies: list[list[dict[str, Any]]]) -> None:
        for kind, path in self._sinks.items():
            if path is None:
                continue
            first = kind not in self._sink_started
            mode = "w" if first else "a"
            if kind == "jsonl":
                self._write_jsonl(path, mode, window, anomalies)
            else:
                self._write_csv(path, mode, window, anomalies, header=first)
            self._sink_started.add(kind)  # once written: a failed first write left no header
        if self.writer is not None:
            self._write_scalars(window, anomalies)

    def _write_scalars(self, window: History, anomalies: list[list[dict[str, Any]]]) -> None:
        add, pre = self.writer.add_scalar, self.prefix
        tags = _tags(self.names)
        for t in range(window.step.shape[0]):
            step = int(window.step[t])
            add(f"{pre}/global_norm", float(window.global_norm[t]), step)
            if window.has_clip[t]:
                add(f"{pre}/scale", float(window.scale[t]), step)
                add(f"{pre}/clipped", float(window.clipped[t]), step)
            add(f"{pre}/nonfinite", int(window.nonfinite[t].sum()), step)
            add(f"{pre}/anomalies", len(anomalies[t]), step)
            for i, tag in enumerate(tags):
                add(f"{pre}/norm/{tag}", float(window.leaf_norms[t, i]), step)
                add(f"{pre}/max_abs/{tag}", float(window.max_abs[t, i]), step)

    def to_jsonl(self, path: str | os.PathLike[str]) -> None:
        """Write every recorded step to ``path``, one JSON object per line.

        Each line holds ``step``, ``global_norm``, ``scale`` and ``clipped``
        (``null`` on steps without clip stats), ``leaf_norms``, ``max_abs``
        and ``nonfinite`` (objects keyed by leaf name; a name an earlier
        leaf holds gets ``~2``, ``~3``, ...) and ``anomalies`` (a
        list of the step's anomaly dicts, without their ``step``). NaN and
        infinities are written as Python's ``json`` writes them (``NaN``,
        ``Infinity``), which ``json.loads`` reads back.

        Parameters
        ----------
        path : str or path-like
            The file to (over)write.
        """
        history = self.history
        self._write_jsonl(path, "w", history, self._row_anomalies)

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write every recorded step to ``path`` as CSV, one row per step.

        Columns: ``step``, ``global_norm``, ``scale``, ``clipped`` (1/0;
        both empty on steps without clip stats), then ``norm:<leaf>``,
        ``max_abs:<leaf>`` and ``nonfinite:<leaf>`` for every leaf (named
        as in :meth:`to_jsonl`), and ``anomalies``, the step's anomalies as
        a JSON list.

        Parameters
        ----------
        path : str or path-like
            The file to (over)write.
        """
        history = self.history
        self._write_csv(path, "w", history, self._row_anomalies, header=True)

    def plot(self, path: str | os.PathLike[str] | None = None) -> Any:
        """Draw the global norm over the steps and a heatmap of the per-leaf norms.

        The top panel shows the global norm, with clipped steps, spikes and
        non-finite steps marked (and ``threshold`` as a line); the bottom one
        shows ``log10`` of every leaf's norm, one row per leaf. Rendered with
        matplotlib's Agg backend, without pyplot.

        Parameters
        ----------
        path : str or path-like, optional
            Where to save the figure (the format follows the extension, e.g.
            ``.png`` or ``.pdf``).

        Returns
        -------
        matplotlib.figure.Figure
            The figure, for further changes.

        Raises
        ------
        ImportError
            If matplotlib is not installed (``pip install gradclip[plot]``).
        ValueError
            If nothing has been recorded yet.
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError(
                "GradMonitor.plot needs matplotlib: pip install gradclip[plot]"
            ) from exc
        h = self.history
        if h.step.shape[0] == 0:
            raise ValueError("GradMonitor.plot: nothing recorded yet; call update() first")
        steps = h.step
        n = len(self.names)
        fig = Figure(figsize=(10, 4 + min(n, 40) * 0.15), layout="constrained")
        FigureCanvasAgg(fig)
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1, 1.5])
        top.plot(steps, h.global_norm, color="tab:blue", linewidth=1, label="global norm")
        positive = h.global_norm[np.isfinite(h.global_norm)]
        if positive.size and (positive > 0).all():
            top.set_yscale("log")
        if h.clipped.any():
            top.scatter(
                steps[h.clipped],
                h.global_norm[h.clipped],
                marker="v",
                s=16,
                color="tab:orange",
                label="clipped",
                zorder=3,
            )
        spike_steps = sorted({a["step"] for a in self._anomalies if a["kind"] == "spike"})
        if spike_steps:
            at = np.isin(steps, spike_steps)
            top.scatter(
                steps[at],
                h.global_norm[at],
                marker="^",
                s=36,
                color="tab:red",
                label="spike",
                zorder=4,
            )
        bad = np.flatnonzero(h.nonfinite.sum(axis=1) > 0)
        for j, t in enumerate(bad[:200]):
            top.axvline(steps[t], color="black", linestyle=":", label="NaN/inf" if j == 0 else None)
        if self.threshold is not None:
            top.axhline(self.threshold, color="tab:gray", linestyle="--", label="threshold")
        top.set_ylabel(f"global norm (ord={self._p:g})")
        top.legend(loc="upper left", fontsize="small")

        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log10(np.where(h.leaf_norms > 0, h.leaf_norms, np.nan))
        data = np.ma.masked_invalid(logs.T)
        if data.count() == 0:
            data = np.ma.masked_array(np.zeros_like(logs.T), mask=np.ones_like(logs.T, bool))
        lo, hi = (float(data.min()), float(data.max())) if data.count() else (0.0, 1.0)
        # A column per recorded step, holding it however the steps are spaced
        # (a resumed run, sparse updates): edges halfway between steps.
        if steps.shape[0] == 1:
            edges = np.array([steps[0] - 0.5, steps[0] + 0.5])
        else:
            mid = (steps[1:] + steps[:-1]) / 2
            edges = np.concatenate([[2 * steps[0] - mid[0]], mid, [2 * steps[-1] - mid[-1]]])
        image = bottom.pcolormesh(
            edges,
            np.arange(n + 1) - 0.5,
            data,
            vmin=lo,
            vmax=hi if hi > lo else lo + 1,
            cmap="viridis",
        )
        fig.colorbar(image, ax=bottom, label="log10 leaf norm")
        if n <= 40:
            bottom.set_yticks(range(n), self.names, fontsize="x-small")
        bottom.set_ylabel("leaf")
        bottom.set_xlabel("step")
        if path is not None:
            fig.savefig(path, dpi=100)
        return fig
