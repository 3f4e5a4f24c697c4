"""Drop-ins for ``torch.nn.utils``'s gradient clipping, faster and safer.

``clip_grad_norm_``, ``get_total_norm``, ``clip_grads_with_norm_`` and
``clip_grad_value_`` take torch's arguments and give torch's results (within
1e-6 wherever torch is right), plus:

- a norm that does not overflow or underflow: float32 gradients of 1e20 give
  the right norm and clip (torch returns ``inf`` and zeroes them);
- ``nonfinite=`` policies ("propagate", "raise", "zero", "skip") with no host
  sync except for "raise";
- ``return_stats=True`` for a :class:`~gradclip.ClipStats` to log;
- ``process_group=`` / ``replicated=`` and DTensor gradients: the norm of
  gradients sharded over ranks (FSDP, ZeRO), one all-reduce per group;
- ``inv_scale=`` and :func:`unscale_clip_grad_norm_`: AMP's unscaling fused
  into the clipping pass, one pass over memory fewer than
  ``scaler.unscale_`` followed by ``clip_grad_norm_``;
- a clear error, naming the item, when plain tensors with no ``.grad`` are
  passed where parameters are expected (torch silently does nothing).

The norm is float32 for float16/bfloat16/float32 gradients and float64 when
any is float64 (torch returns a float16 norm for float16 gradients, which
overflows at 65504).

Importing this module imports torch; ``import gradclip`` does not.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias, TypeVar, cast

import numpy as np
import torch

from .. import _api, _compat, _core
from .._flat import owner_of
from .._norms import Partial, Plan, parse_ord
from .._stats import NonFiniteError
from .._tree import Flat, Paths
from . import _dist, _fast

__all__ = [
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "unscale_clip_grad_norm_",
]

_Tensors: TypeAlias = "torch.Tensor | Iterable[Any]"
_F = TypeVar("_F", bound=Callable[..., Any])
_PARAM_TYPES = frozenset({torch.nn.Parameter, torch.Tensor})
_grad = operator.attrgetter("grad")
# gradclip's and torch's directories: frames a warning does not name
_INTERNAL = tuple(os.path.dirname(str(m.__file__)) + os.sep for m in (_api, torch))


def _no_grad(fn: _F) -> _F:
    """Run ``fn`` under ``torch.no_grad()``, as torch's clipping functions are, and eagerly.

    Under ``torch.compile`` the call is a graph break: dynamo traced into the
    NumPy views of the CPU path and failed inside itself (``Expected
    np.nditer base``) once the function had run eagerly in the process.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return fn(*args, **kwargs)

    disable: Any = torch.compiler.disable  # untyped
    return cast(_F, disable(wrapper))


# ------------------------------------------------------------------ inputs


def _items(
    tensors: _Tensors, fn: str, what: str, warn_empty: bool = False
) -> tuple[list[Any], list[str] | None]:
    """The tensors of a tensor or iterable, and their names if given as ``named_parameters()``.

    ``warn_empty``: warn of an empty generator, as torch's ``clip_grad_norm_``
    does (and no other function of torch.nn.utils).
    """
    if isinstance(tensors, torch.Tensor):
        return [tensors], None
    if isinstance(tensors, str | bytes) or not isinstance(tensors, Iterable):
        raise TypeError(f"{fn}: {what} must be a tensor or an iterable of tensors; got {tensors!r}")
    items = list(tensors)
    if warn_empty and not items and isinstance(tensors, types.GeneratorType):
        # torch's words: a model.parameters() consumed before the call
        warnings.warn(
            f"`{what}` is an empty generator, no gradient clipping will occur.",
            stacklevel=_caller_level(),
        )
    if items and isinstance(items[0], tuple):  # model.named_parameters()
        for i, item in enumerate(items):
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError(
                    f"{fn}: {what}[{i}] is {_kind(item)}, not a (name, tensor) pair; {what} "
                    "holding tuples must be such pairs, as named_parameters() gives"
                )
        return [t for _, t in items], [name for name, _ in items]
    return items, None


def _caller_level() -> int:
    """``warnings.warn``'s stacklevel for the first frame outside gradclip and torch.

    A fixed level counted gradclip's own wrappers, and torch.compile's around
    them: the warning named gradclip's line, where torch's names the caller's.
    """
    frame: Any = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


def _kind(item: Any) -> str:
    """``Tensor of shape (2,)``, ``tuple (Tensor, Tensor)``: what an item is, in short."""
    if isinstance(item, tuple):
        return f"tuple ({', '.join(type(x).__name__ for x in item)})"
    if isinstance(item, torch.Tensor):
        return f"{type(item).__name__} of shape {tuple(item.shape)}"
    return type(item).__name__


def _grad_names(given: list[str] | None, n: int) -> list[str]:
    """``name.grad`` of ``n`` parameters, named (``named_parameters()``) or not."""
    if given is not None:
        return [f"{name}.grad" for name in given]
    return [f"parameters[{i}].grad" for i in range(n)]


def _flat(leaves: list[Any], names: list[str]) -> Flat:
    return Flat(leaves, Paths(lambda: names), list)


def _grads(
    parameters: _Tensors, fn: str, replicated: Any = None, warn_empty: bool = False
) -> tuple[Flat, list[Any], Callable[[int], bool] | None]:
    """The ``.grad`` of each parameter (``None`` skipped), named; and which are replicated.

    A tensor with no ``.grad`` that does not require grad is not a parameter:
    torch would skip it and clip nothing, the classic mistake of passing
    ``[p.grad for p in params]``. That raises here.
    """
    params, given = _items(parameters, fn, "parameters", warn_empty)
    if set(map(type, params)) <= _PARAM_TYPES:  # the common case, with no per-item bytecode
        grads = list(map(_grad, params))
        if not any(map(operator.is_, grads, itertools.repeat(None))):
            return (
                Flat(grads, Paths(lambda: _grad_names(given, len(grads))), list),
                params,
                _replicated(replicated, params, fn),
            )
    grads, names, owners = [], [], []
    for i, p in enumerate(params):
        label = given[i] if given is not None else f"parameters[{i}]"
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{fn}: {label} is a {type(p).__name__}, not a tensor")
        g = p.grad
        if g is None:
            # A frozen nn.Parameter (requires_grad False) is skipped, as torch does.
            # A tensor computed by autograd (a grad_fn: the gradients of
            # autograd.grad(create_graph=True)) never gets a .grad: no parameter either.
            computed = p.grad_fn is not None
            if computed or not (p.requires_grad or isinstance(p, torch.nn.Parameter)):
                why = "is computed (it has a grad_fn)" if computed else "does not require grad"
                raise TypeError(
                    f"{fn}: {label} is a tensor with no .grad that {why}, so it is not a "
                    "parameter; this function clips parameters' .grad. To clip gradient "
                    "tensors themselves use gradclip.clip_by_global_norm_(grads, max_norm) "
                    "(or get_total_norm(grads) and clip_grads_with_norm_ on the parameters)"
                )
            continue  # a parameter without a gradient (frozen or unused): torch skips it too
        grads.append(g)
        names.append(f"{label}.grad")
        owners.append(p)
    if not grads:  # every parameter, for the device of an empty rank's all-reduce (_plan)
        owners = params
    return _flat(grads, names), owners, _replicated(replicated, owners, fn)


def _replicated(replicated: Any, owners: list[Any], fn: str) -> Callable[[int], bool] | None:
    """``replicated=`` (a predicate on parameters, or parameters) as a predicate on grad indices."""
    if replicated is None:
        return None
    if callable(replicated) and not isinstance(replicated, torch.Tensor):
        return lambda i: bool(replicated(owners[i]))
    if isinstance(replicated, torch.Tensor):
        replicated = [replicated]
    try:
        ids = {id(p) for p in replicated}
    except TypeError:
        raise TypeError(
            f"{fn}: replicated= must be a predicate on parameters or an iterable of parameters"
        ) from None
    return lambda i: id(owners[i]) in ids


def _whole(
    flat: Flat, foreach: bool | None, p: float = 2.0, policy: str = "propagate", group: Any = None
) -> Flat:
    """The buffers of the :class:`~gradclip.FlatTree` whose views the gradients are; else ``flat``.

    Gradients set to a FlatTree's views (``p.grad = view``, kept by
    ``optimizer.zero_grad(set_to_none=False)``, as apex and DeepSpeed keep
    their contiguous gradient buffers) are clipped as the top-level
    functions clip a FlatTree: one pass over each buffer. Only where the
    gradients are all of its views, in its order: one ``._base`` read and
    an identity check. Not for results that are per tensor (``norm_type=0``
    counts tensors; ``"raise"`` names one), not for ``foreach=False`` (the
    per-tensor reference), and not with a process group or ``replicated=``.
    """
    leaves = flat.leaves
    if not leaves or foreach is False or p == 0 or policy == "raise" or group is not None:
        return flat
    base = leaves[0]._base
    owner = None if base is None else owner_of(base)
    if owner is None:
        return flat
    views = owner._flat.leaves
    if len(views) != len(leaves) or not all(map(operator.is_, leaves, views)):
        return flat
    return owner._unit(whole=True)


def _tensors(tensors: _Tensors, fn: str) -> Flat:
    """Gradient tensors given directly (``get_total_norm``); Parameters are a mistake here."""
    items, given = _items(tensors, fn, "tensors")
    leaves, names = [], []
    for i, t in enumerate(items):
        label = given[i] if given is not None else f"tensors[{i}]"
        if t is None:
            continue
        if isinstance(t, torch.nn.Parameter):
            raise TypeError(
                f"{fn}: {label} is an nn.Parameter; get_total_norm takes gradients, such as "
                "[p.grad for p in model.parameters() if p.grad is not None] (for the norm of the "
                "weights themselves, pass p.detach())"
            )
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {label} is a {type(t).__name__}, not a tensor")
        leaves.append(t)
        names.append(label)
    return _flat(leaves, names)


def _policy(error_if_nonfinite: bool, nonfinite: str | None) -> str:
    if nonfinite is None:
        return "raise" if error_if_nonfinite else "propagate"
    _api._check_nonfinite(nonfinite)
    if error_if_nonfinite and nonfinite != "raise":
        raise ValueError(
            f'error_if_nonfinite=True asks for nonfinite="raise", but nonfinite={nonfinite!r} '
            "was given; pass one of them"
        )
    return nonfinite


def _fused(foreach: Any) -> bool | None:
    """The ``fused=`` of a ``foreach=``: None picks, true is the grouped fast path.

    torch tests ``foreach`` for truth, so ``foreach=1`` is taken as it is
    there; a value that is not a bool or an integer is a mistake.
    """
    if foreach is None:
        return None
    if not isinstance(foreach, bool | int | np.bool_):
        raise TypeError(f"foreach must be None or a bool; got {foreach!r}")
    return bool(foreach)


def _plan(
    prep: Any,
    p: float,
    policy: str,
    foreach: bool | None,
    owners: list[Any],
    group: Any = None,
    bound: Any = None,
) -> Plan:
    """The plan for the gradients; with none, an empty plan whose norm is 0.

    A rank may hold no gradients at all (an empty ZeRO or FSDP shard); it must
    still take part in the all-reduce, with tensors where the group's backend
    wants them: the parameters' device (``owners`` are then every parameter
    given), else CUDA where the group reduces CUDA tensors with NCCL, else the
    CPU. ``get_backend_config``, not ``get_backend``: a group made with no
    backend named reports "undefined", and "cpu:gloo,cuda:nccl" is no "nccl"
    either; a CPU tensor there went through gloo while the other ranks waited
    in NCCL. With no group, torch's norm of nothing, ``torch.tensor(0.0)``:
    the default dtype, on the CPU, or on the device of a tensor ``bound``
    (max_norm), where the scale and flags are, so that the stats stack.
    """
    zero = policy == "zero"
    if prep.xp is None:
        plan = Plan(_compat.namespace(torch.empty(0)), p, [], zero_nonfinite=zero)
        if group is None:
            plan.res = torch.get_default_dtype()
            if _compat.is_array(bound):
                plan.device = _compat.device_of(bound)
            return plan
        plan.device = next((t.device for t in owners), None)
        if plan.device is None and "nccl" in torch.distributed.get_backend_config(group):
            plan.device = torch.device("cuda", torch.cuda.current_device())
        return plan
    plan_cls = Plan if _api._impl(prep, foreach) is _core else _fast.TorchPlan
    return plan_cls(prep.xp, p, prep.flat.leaves, zero_nonfinite=zero)


# ------------------------------------------------------------------ the norm


def _total(
    plan: Plan,
    names: Paths | list[str],
    policy: str,
    scopes: list[_dist.Scope] | None,
    inv_scale: Any,
    parts: list[Partial] | None = None,
) -> tuple[Any, Any]:
    """The global norm (result dtype, unscaled by ``inv_scale``) and the finite flag.

    ``parts``: the plan's global partials, where the caller has them already.

    With ``policy="raise"`` (torch's ``error_if_nonfinite``) a norm that is
    not finite raises, as in torch, though every value is: one past the
    result dtype's range (float32 gradients near 3e38) would make the scale 0
    and zero the gradients.
    """
    xp = plan.xp
    if scopes is None and (inv_scale is None or plan.kind == "zero" or not plan.leaves):
        # (The count of nonzero gradients, ord=0, does not change with a scale,
        # and no gradients have the norm 0.)
        if parts is None:
            parts = _core._reduce(plan, names, policy, per_leaf=False)
        norm, finite = plan.host_total() or plan.total(parts)
    else:
        if scopes is None:
            merged = plan.merge(_core._reduce(plan, names, policy, per_leaf=False))
            size = plan.size()
        else:
            merged = _all_reduced(plan, names, policy, scopes)
            size = 1  # ranks hold different sizes; an empty whole is handled there
        factor = None if inv_scale is None else xp.astype(inv_scale, plan.acc)
        norm = plan.norm(merged, size, dtype=plan.acc, factor=factor)
        norm, finite = xp.astype(norm, plan.res), plan.finite(merged)
    if policy == "raise":
        over = xp.logical_not(xp.isfinite(norm))
        if scopes is not None:
            # Every rank raises or none: a rank's dtype (float32 where it holds
            # no gradients) may overflow where another's does not.
            over = _dist.on_any_rank(plan, over, [s.group for s in scopes])
        if bool(over):
            what = (
                f"is {float(norm)}: it overflows {norm.dtype}"
                if scopes is None
                else f"overflows the dtype of this rank or another of the group (here it is "
                f"{float(norm)}, {norm.dtype})"
            )
            raise NonFiniteError(
                f"the total norm of order {plan.p} {what}, though every gradient value is "
                "finite; nothing was modified"
            )
    return norm, finite


def _all_reduced(
    plan: Plan, names: Paths | list[str], policy: str, scopes: list[_dist.Scope]
) -> Partial:
    """The rank's partials all-reduced over their scopes' groups: the same on every rank."""
    xp = plan.xp
    # Every rank must reach the all-reduce, so "raise" is decided after it.
    per_leaf = (
        policy == "raise"
        or len(scopes) > 1
        or any(len(s.members) != len(plan.leaves) for s in scopes)
    )
    parts = plan.leaf_parts() if per_leaf else plan.global_parts()
    # Without per-leaf parts there is one scope, holding every leaf.
    own = [[parts[i] for i in s.members] for s in scopes] if per_leaf else [parts]
    merged = _dist.reduce_scopes(plan, [s.group for s in scopes], own)
    if policy == "raise" and not bool(plan.finite(merged)):
        bad = [i for i, q in enumerate(parts) if not bool(plan.finite(q))] if per_leaf else []
        if bad:
            _core.raise_nonfinite(names, bad)
        raise NonFiniteError(
            "non-finite gradient values on another rank of the process group; nothing was modified"
        )
    if plan.kind == "-inf":
        # A min of +inf over finite entries means no rank held any: the
        # norm of nothing is 0, as for one process.
        empty = xp.isinf(merged.value) & plan.finite(merged)
        merged = merged._replace(value=xp.where(empty, plan.const(0.0), merged.value))
    return merged


def _check_inv_scale(inv_scale: Any, fn: str) -> Any:
    if inv_scale is None:
        return None
    if not isinstance(inv_scale, torch.Tensor):
        # float64: rounded to each use's dtype there (a float32 one rounded
        # 1/3 for float64 gradients, and 1e-46 to 0). Checked as max_norm is:
        # float() would take "0.1" and True.
        value = _api._scalar_bound(inv_scale, f"{fn}: inv_scale", allow_array=False)
        inv_scale = torch.tensor(value, dtype=torch.float64)
    elif not _api._real(inv_scale, True):
        raise TypeError(
            f"{fn}: inv_scale must be a real number; got one of dtype {inv_scale.dtype}"
        )
    if inv_scale.numel() != 1:
        shape = tuple(inv_scale.shape)
        raise ValueError(f"{fn}: inv_scale must hold one number; got shape {shape}")
    # Read only where that is free: a CUDA scale (a GradScaler's) would sync.
    if inv_scale.device.type == "cpu" and not 0 < float(inv_scale) < math.inf:
        raise ValueError(
            f"{fn}: inv_scale must be a number > 0 and finite (1 / the loss scale); "
            f"got {float(inv_scale)}"
        )
    return inv_scale.reshape(())


def _prepared(
    flat: Flat, fn: str, inplace: bool, process_group: Any, replicated: Any
) -> tuple[Any, list[_dist.Scope] | None]:
    """Validate the gradients (naming the bad one) and find their reduction scopes."""
    found = None
    # DTensors exist only once torch.distributed is initialised: without it
    # (or a group) nothing is reduced, and no leaf need be looked at for it.
    dist = torch.distributed
    if process_group is not None or (dist.is_available() and dist.is_initialized()):
        found = _dist.scopes(
            flat.leaves, flat.paths, fn, group=process_group, replicated=replicated
        )
    scopes = None
    if found is not None:
        flat = _flat(found[0], list(flat.paths))
        scopes = found[1]
    return _api._check(flat, fn, inplace=inplace, gradients=True), scopes


@_no_grad
def get_total_norm(
    tensors: _Tensors,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    nonfinite: str | None = None,
    process_group: Any = None,
    replicated: Any = None,
) -> Any:
    """The norm of gradient tensors taken together: ``torch.nn.utils.get_total_norm``.

    Parameters
    ----------
    tensors : Tensor or iterable of Tensors
        Gradients (not parameters: an ``nn.Parameter`` here raises
        ``TypeError``). ``None`` entries are skipped.
    norm_type : float, default 2.0
        Any ``p > 0``, ``inf``, ``-inf`` or ``0``, as in torch.
    error_if_nonfinite : bool, default False
        Raise :class:`~gradclip.NonFiniteError` (a ``RuntimeError``) naming
        the tensor if any value is NaN or inf; the same as
        ``nonfinite="raise"``.
    foreach : bool or None, default None
        ``None`` or ``True``: the grouped fast path (BLAS dots and
        ``torch._foreach_*`` ops on the CPU, gradclip's kernels on CUDA with
        CuPy, ``torch._foreach_*`` elsewhere); ``False``: the generic
        per-tensor path.
    nonfinite : {"propagate", "raise", "zero"}, optional
        As for :func:`gradclip.global_norm`; ``"zero"`` leaves NaN/inf out of
        the norm.
    process_group : ProcessGroup, optional
        Each rank holds a shard of the gradients: the norm is all-reduced
        over the group, so every rank gets the whole gradients' norm.
        DTensor gradients are reduced over their own mesh with or without it.
    replicated : callable or iterable of tensors, optional
        With ``process_group``: tensors every rank holds whole, counted once
        (a predicate on the tensors, or the tensors themselves).

    Returns
    -------
    Tensor
        0-d: float32 for float16/bfloat16/float32 gradients, float64 when
        any is float64. Overflow-safe: float32 gradients of 1e30 give 2e30
        for four of them, where torch gives ``inf``.

    Examples
    --------
    >>> import torch
    >>> from gradclip.torch import get_total_norm
    >>> get_total_norm([torch.tensor([3.0, 4.0]), torch.tensor([12.0])])
    tensor(13.)
    >>> get_total_norm([torch.full((4,), 1e30)])
    tensor(2.0000e+30)
    """
    fn = "get_total_norm"
    foreach = _fused(foreach)
    policy = _policy(error_if_nonfinite, nonfinite)
    _api._check_nonfinite(policy, ("propagate", "raise", "zero"))
    p = parse_ord(norm_type)
    flat = _tensors(tensors, fn)
    pred = None
    if replicated is not None:
        pred = _replicated(replicated, flat.leaves, fn)
    else:
        flat = _whole(flat, foreach, p, policy, process_group)
    prep, scopes = _prepared(flat, fn, False, process_group, pred)
    plan = _plan(prep, p, policy, foreach, flat.leaves, process_group)
    norm = _total(plan, prep.flat.paths, policy, scopes, None)[0]
    return norm if scopes is None else _dist.replicate_like(norm, flat.leaves)


def _scale_grads(
    plan: Plan, norm: Any, finite: Any, max_norm: Any, policy: str, inv_scale: Any, eps: float
) -> Any:
    """Multiply every gradient by ``inv_scale * min(1, max_norm / (norm + eps))`` in one pass."""
    xp = plan.xp
    if not isinstance(max_norm, float):
        max_norm = _compat.beside(max_norm, norm)
    scale = _core._scale_from_norm(plan, norm, max_norm, eps)
    if policy == "skip":
        scale = xp.where(finite, scale, plan.const(1.0, plan.res))
    factor = scale if inv_scale is None else scale * xp.astype(inv_scale, plan.res)
    plan.scale_leaves(factor, per_leaf=False, zero=policy == "zero", inplace=True)
    return scale


@_no_grad
def clip_grad_norm_(
    parameters: _Tensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    nonfinite: str | None = None,
    process_group: Any = None,
    replicated: Any = None,
    inv_scale: Any = None,
    eps: float = 1e-6,
    return_stats: bool = False,
) -> Any:
    """Clip the parameters' gradients in place: ``torch.nn.utils.clip_grad_norm_``.

    Every ``.grad`` is multiplied by ``min(1, max_norm / (total_norm + 1e-6))``
    in its own dtype, with the total norm computed as by
    :func:`get_total_norm` (overflow-safe, float32 or float64). No host sync
    unless ``error_if_nonfinite`` or ``nonfinite="raise"`` asks for one.

    Parameters
    ----------
    parameters : Tensor or iterable of Tensors
        Parameters (``model.parameters()`` or ``model.named_parameters()``,
        whose names then appear in errors). A parameter whose ``.grad`` is
        None is skipped; a tensor with no ``.grad`` that does not require
        grad raises ``TypeError`` (torch silently clips nothing).
    max_norm : float or 0-d Tensor
        The largest total norm allowed, ``>= 0``.
    norm_type : float, default 2.0
        As for :func:`get_total_norm`.
    error_if_nonfinite : bool, default False
        As for :func:`get_total_norm`; nothing is modified when it raises.
    foreach : bool or None, default None
        As for :func:`get_total_norm`.
    nonfinite : {"propagate", "raise", "zero", "skip"}, optional
        As for :func:`gradclip.clip_by_global_norm`; the default follows
        ``error_if_nonfinite``. ``"skip"`` leaves the gradients unchanged
        (bar ``inv_scale``) when any value is NaN or inf.
    process_group, replicated : optional
        As for :func:`get_total_norm`: the norm of gradients sharded over
        ranks; every rank gets the same norm and scale, in the result dtype
        of its own gradients. A rank that holds float64 gradients while
        another holds none computes them in float64 and the other in
        float32: a rounding apart, or inf where the norm is past float32
        (``error_if_nonfinite`` then raises on every rank). Agreeing on a
        dtype would cost a host sync, so give every rank the same gradient
        dtypes.
    inv_scale : float or 0-d Tensor, optional
        ``1 / scale``, for code that scales the loss itself: the gradients
        are unscaled and clipped in one pass, and the norm returned is the
        unscaled one. A ``torch.amp.GradScaler`` is not told, so its
        ``step`` would unscale again (and its ``update`` raise after a
        plain ``optimizer.step``): with a GradScaler use
        :func:`unscale_clip_grad_norm_`, which tells it. Must be > 0; a
        number or a CPU tensor is checked (a CUDA one is not, which would
        cost a host sync).
    eps : float, default 1e-6
        Added to the norm before dividing, as torch does.
    return_stats : bool, default False
        Return a :class:`~gradclip.ClipStats` instead of the norm.

    Returns
    -------
    Tensor or ClipStats
        The total norm before clipping (0-d), or the stats.

    Examples
    --------
    >>> import torch
    >>> from gradclip.torch import clip_grad_norm_
    >>> layer = torch.nn.Linear(2, 1)
    >>> layer.weight.grad = torch.tensor([[3.0, 4.0]])
    >>> layer.bias.grad = torch.tensor([0.0])
    >>> clip_grad_norm_(layer.parameters(), max_norm=1.0)
    tensor(5.)
    >>> layer.weight.grad
    tensor([[0.6000, 0.8000]])
    >>> stats = clip_grad_norm_(layer.parameters(), 10.0, return_stats=True)
    >>> bool(stats.clipped)
    False
    """
    fn = "clip_grad_norm_"
    foreach = _fused(foreach)
    policy = _policy(error_if_nonfinite, nonfinite)
    p = parse_ord(norm_type)
    max_norm = _api._check_bound(max_norm, "max_norm")
    eps = _api._check_eps(eps)
    inv_scale = _check_inv_scale(inv_scale, fn)
    flat, owners, pred = _grads(parameters, fn, replicated, warn_empty=True)
    if pred is None:
        flat = _whole(flat, foreach, p, policy, process_group)
    prep, scopes = _prepared(flat, fn, True, process_group, pred)
    plan = _plan(prep, p, policy, foreach, owners, process_group, bound=max_norm)
    parts = quick = None
    if scopes is None and inv_scale is None and policy in ("propagate", "skip"):
        parts = plan.global_parts()  # (what _core._reduce gives for these policies)
        quick = plan.host_clip(max_norm, eps)
    if quick is not None:  # every value finite: "skip" keeps the scale
        norm, scale, unit = quick
        finite = plan.const(True, torch.bool)
        if not unit:
            plan.scale_leaves(scale, per_leaf=False, zero=False, inplace=True)
    else:
        norm, finite = _total(plan, prep.flat.paths, policy, scopes, inv_scale, parts)
        scale = _scale_grads(plan, norm, finite, max_norm, policy, inv_scale, eps)
    if return_stats:
        return _core._stats(norm, scale, finite)
    return norm if scopes is None else _dist.replicate_like(norm, flat.leaves)


@_no_grad
def clip_grads_with_norm_(
    parameters: _Tensors,
    max_norm: float,
    total_norm: Any,
    foreach: bool | None = None,
    *,
    inv_scale: Any = None,
    eps: float = 1e-6,
) -> None:
    """Scale the parameters' gradients by ``min(1, max_norm / (total_norm + 1e-6))``.

    ``torch.nn.utils.clip_grads_with_norm_``: the second half of
    :func:`clip_grad_norm_`, for a norm computed (and perhaps all-reduced)
    elsewhere, such as by :func:`get_total_norm`.

    Parameters
    ----------
    parameters : Tensor or iterable of Tensors
        As for :func:`clip_grad_norm_`.
    max_norm : float or 0-d Tensor
        The largest total norm allowed, ``>= 0``.
    total_norm : float or 0-d Tensor
        The norm to clip by.
    foreach : bool or None, default None
        As for :func:`get_total_norm`.
    inv_scale : float or 0-d Tensor, optional
        As for :func:`clip_grad_norm_`: ``1 / scale``, applied in the same
        pass (``total_norm`` is the unscaled norm); a GradScaler is not told.
    eps : float, default 1e-6
        Added to the norm before dividing.

    Examples
    --------
    >>> import torch
    >>> from gradclip.torch import clip_grads_with_norm_, get_total_norm
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> w.grad = torch.tensor([3.0, 4.0])
    >>> clip_grads_with_norm_([w], 1.0, get_total_norm([w.grad]))
    >>> w.grad
    tensor([0.6000, 0.8000])
    """
    fn = "clip_grads_with_norm_"
    foreach = _fused(foreach)
    max_norm = _api._check_bound(max_norm, "max_norm")
    total_norm = _api._scalar_bound(total_norm, "total_norm")  # one norm: a 1-d one would broadcast
    eps = _api._check_eps(eps)
    inv_scale = _check_inv_scale(inv_scale, fn)
    flat, owners, _ = _grads(parameters, fn)
    flat = _whole(flat, foreach)
    # DTensor gradients are scaled through their local shards, as clip_grad_norm_
    # does: DTensor arithmetic refuses plain tensors beside them, or two meshes.
    prep, _ = _prepared(flat, fn, True, None, None)
    plan = _plan(prep, 2.0, "propagate", foreach, owners)
    if isinstance(total_norm, torch.Tensor):
        # A norm that requires grad (taken under autograd) is used as a value,
        # as torch does; torch.asarray would warn about copying its graph.
        total_norm = total_norm.detach()
        if hasattr(total_norm, "full_tensor"):  # get_total_norm's replicated DTensor
            total_norm = total_norm.full_tensor()
    norm = _compat.asarray(plan.xp, total_norm, plan.res, plan.device)
    _scale_grads(plan, norm, None, max_norm, "propagate", inv_scale, eps)


@_no_grad
def clip_grad_value_(parameters: _Tensors, clip_value: float, foreach: bool | None = None) -> None:
    """Clamp the parameters' gradients to ``[-clip_value, clip_value]`` in place.

    ``torch.nn.utils.clip_grad_value_``, with the same input checks as
    :func:`clip_grad_norm_` (plain tensors with no ``.grad`` raise).

    Parameters
    ----------
    parameters : Tensor or iterable of Tensors
        As for :func:`clip_grad_norm_`.
    clip_value : float
        The bound, ``>= 0``.
    foreach : bool or None, default None
        ``False`` takes the generic per-tensor path.

    Examples
    --------
    >>> import torch
    >>> from gradclip.torch import clip_grad_value_
    >>> w = torch.nn.Parameter(torch.zeros(3))
    >>> w.grad = torch.tensor([-3.0, 0.2, 7.0])
    >>> clip_grad_value_([w], 1.0)
    >>> w.grad
    tensor([-1.0000,  0.2000,  1.0000])
    """
    fn = "clip_grad_value_"
    foreach = _fused(foreach)
    low, high = _api._value_bounds(clip_value, None, None)
    flat, _, _ = _grads(parameters, fn)
    prep = _api._check(_whole(flat, foreach), fn, inplace=True, gradients=True)
    _api._clip_value_checked(fn, prep, low, high, "propagate", foreach, True)


# ------------------------------------------------------------------ AMP


@_no_grad
def unscale_clip_grad_norm_(
    scaler: Any,
    optimizer: Any,
    max_norm: float,
    norm_type: float = 2.0,
    *,
    nonfinite: str = "propagate",
    process_group: Any = None,
    replicated: Any = None,
    eps: float = 1e-6,
    return_stats: bool = False,
) -> Any:
    """``scaler.unscale_(optimizer)`` and :func:`clip_grad_norm_` in one pass over the gradients.

    Multiplies every gradient of ``optimizer`` by ``clip_scale / scaler_scale``
    at once and records, as ``scaler.unscale_`` does, whether any gradient was
    non-finite, so that ``scaler.step(optimizer)`` skips the step and
    ``scaler.update()`` lowers the scale. No host sync. With a disabled
    scaler it is :func:`clip_grad_norm_` on the optimizer's parameters.

    Parameters
    ----------
    scaler : torch.amp.GradScaler
        The scaler whose ``scale(loss).backward()`` produced the gradients.
    optimizer : torch.optim.Optimizer
        Its parameters' gradients are unscaled and clipped. As with
        ``unscale_``, call this once per optimizer per step.
    max_norm, norm_type, nonfinite, process_group, replicated, eps, return_stats
        As for :func:`clip_grad_norm_`.

    Returns
    -------
    Tensor or ClipStats
        The unscaled total norm, or the stats.

    Examples
    --------
    >>> import torch
    >>> from gradclip.torch import unscale_clip_grad_norm_
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    >>> scaler.scale(model(torch.ones(1, 4)).sum()).backward()
    >>> norm = unscale_clip_grad_norm_(scaler, opt, max_norm=1.0)
    >>> scaler.step(opt)
    >>> scaler.update()
    >>> round(float(norm), 4)  # the norm of the unscaled gradients
    2.2361
    """
    from torch.amp.grad_scaler import OptState

    # GradScaler.unscale_ skips parameters without a gradient, plain tensors
    # too: the mistake clip_grad_norm_ guards against (passing gradients)
    # cannot happen with an optimizer's parameters.
    # Named as in the optimizer (its param_names where it has them), so that
    # an error names the parameter at fault, not an index among those kept.
    params = [
        (name, p)
        for g, group in enumerate(optimizer.param_groups)
        for name, p in zip(
            group.get("param_names")
            or [f"param_groups[{g}]['params'][{j}]" for j in range(len(group["params"]))],
            group["params"],
            strict=True,
        )
        if p.grad is not None
    ]
    kwargs: dict[str, Any] = {
        "nonfinite": nonfinite,
        "process_group": process_group,
        "replicated": replicated,
        "eps": eps,
        "return_stats": True,
    }
    if not scaler.is_enabled():
        stats = clip_grad_norm_(params, max_norm, norm_type, **kwargs)
        return stats if return_stats else stats.norm
    scaler._check_scale_growth_tracker("unscale_")
    if any(p.grad.dtype == torch.float16 for _, p in params):
        raise ValueError("Attempting to unscale FP16 gradients.")  # as GradScaler.unscale_
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.UNSCALED:
        raise RuntimeError(
            "unscale_() has already been called on this optimizer since the last update()."
        )
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("unscale_() is being called after step().")
    # As GradScaler.unscale_: the reciprocal in float64, then float32.
    inv_scale = scaler._scale.double().reciprocal().float()
    stats = clip_grad_norm_(params, max_norm, norm_type, inv_scale=inv_scale, **kwargs)
    found_inf = torch.logical_not(stats.finite).to(torch.float32)
    devices = {p.grad.device for _, p in params} or {scaler._scale.device}
    state["found_inf_per_device"] = {d: found_inf.to(d) for d in devices}
    state["stage"] = OptState.UNSCALED
    return stats if return_stats else stats.norm
