"""Norms of gradients sharded over ``torch.distributed`` ranks.

Each rank reduces the gradients it holds to one :class:`~gradclip._norms.Partial`
per process group; an all-reduce of the partials (SUM of ``sum |g|**p`` for
p-norms, MAX for ``inf``, MIN for ``-inf``) gives every rank the same total,
hence the same norm and scale. The reduced tensor is three numbers long:
the partial, a count of ranks that saw a non-finite value, and a count of
NaN partials (MAX and MIN may drop a NaN, which the norm must keep).

A p-norm's partial may carry a power-of-two exponent (float64 leaves are
accumulated that way, see :mod:`gradclip._norms`; for very large ``p``, the
largest magnitude instead), so for p-norms a MAX all-reduce of the exponents
comes first and the sums are added at that common scale. It runs whatever
the dtypes, so ranks holding different dtypes, or no gradients at all, make
the same collective calls: ``ord`` alone decides them.

DTensor gradients are reduced from their local shards over their device
mesh, one all-reduce per mesh (one per mesh dimension where a mesh of two or
more dimensions has no ``mesh_dim_names``, which torch needs to flatten it):
a shard counts on every rank where the mesh dimensions it is sharded on vary,
and once (at coordinate 0) along mesh dimensions where it is replicated.
``full_tensor()`` is never called.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .._norms import Partial, Plan

__all__ = ["Scope", "on_any_rank", "reduce_scopes", "scopes"]


def _torch() -> Any:
    return sys.modules["torch"]


@dataclass(frozen=True)
class Scope:
    """Leaves whose partials are reduced together over one process group."""

    group: Any  # a ProcessGroup, a tuple of them (reduced in turn), or None: this rank only
    members: tuple[int, ...]  # leaf indices that contribute on this rank


def _mesh_group(mesh: Any) -> Any:
    """A process group over every rank of ``mesh``, or a tuple of one group per mesh dimension.

    ``DeviceMesh._flatten`` needs ``mesh_dim_names`` (torch raises "Cannot
    flatten a DeviceMesh without mesh_dim_names!"), so an unnamed mesh is
    reduced one dimension after another: the same SUM, MAX or MIN on every rank.
    """
    if mesh.ndim == 1:
        return mesh.get_group()
    flatten = getattr(mesh, "_flatten", None)  # torch >= 2.5
    if flatten is not None and mesh.mesh_dim_names:
        return flatten().get_group()
    return tuple(mesh.get_group(mesh_dim=dim) for dim in range(mesh.ndim))


def on_any_rank(plan: Plan, flag: Any, groups: Sequence[Any]) -> Any:
    """Whether the 0-d bool ``flag`` holds on any rank of ``groups`` (a MAX all-reduce)."""
    xp = plan.xp
    packed = xp.astype(xp.reshape(flag, (1,)), plan.acc)
    for group in groups:
        if group is not None:
            _all_reduce(packed, _torch().distributed.ReduceOp.MAX, group)
    return packed[0] != 0


def _all_reduce(tensor: Any, op: Any, group: Any) -> None:
    """All-reduce ``tensor`` in place over ``group``, or over a tuple of groups in turn."""
    dist = _torch().distributed
    for g in group if isinstance(group, tuple) else (group,):
        dist.all_reduce(tensor, op=op, group=g)


def _dtensor_member(g: Any, name: str, fn: str) -> tuple[Any, Any, bool]:
    """The local shard of a DTensor gradient, its mesh, and whether it counts here.

    The mesh is ``None`` on a rank outside it, which holds nothing of ``g``
    and takes no part in the mesh's collectives (torch's ``get_group`` has
    no group to give it).
    """
    from torch.distributed.tensor import Replicate, Shard

    try:  # FSDP2 over tensor parallelism shards a dim-0 TP weight with it
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:
        sharded: tuple[type, ...] = (Shard,)
    else:  # not a Shard subclass; a distinct piece on each rank all the same
        sharded = (Shard, _StridedShard)

    mesh = g.device_mesh
    coords = mesh.get_coordinate()
    if coords is None:  # this rank is not in the mesh: it holds nothing of g
        return g.to_local(), None, False
    counts = True
    for dim, placement in enumerate(g.placements):
        if isinstance(placement, Replicate):
            counts = counts and coords[dim] == 0
        elif not isinstance(placement, sharded):
            raise ValueError(
                f"{fn}: leaf {name} is a DTensor with placement {placement} on mesh dimension "
                f"{dim}; only Shard and Replicate gradients can be clipped (redistribute a Partial "
                "gradient, which is a pending sum, before clipping)"
            )
    return g.to_local(), mesh, counts


def scopes(
    grads: Sequence[Any],
    names: Sequence[str],
    fn: str,
    *,
    group: Any,
    replicated: Callable[[int], bool] | None,
) -> tuple[list[Any], list[Scope]] | None:
    """The local tensors to clip and the reduction scopes, or ``None`` when nothing is distributed.

    ``group`` reduces the plain tensors; ``replicated(i)`` marks plain tensor
    ``i`` as held whole by every rank of ``group``, so it counts on its rank 0
    only. DTensors are reduced over their own mesh.
    """
    torch = _torch()
    dtensor_cls = None
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        dtensor_cls = DTensor
    has_dtensor = dtensor_cls is not None and any(isinstance(g, dtensor_cls) for g in grads)
    if group is None and not has_dtensor:
        return None
    rank0 = group is None or torch.distributed.get_rank(group) == 0
    locals_: list[Any] = []
    by_key: dict[Any, tuple[Any, list[int]]] = {}
    if group is not None:  # first, and even when this rank holds no plain tensor
        by_key[("group", id(group))] = (group, [])
    for i, g in enumerate(grads):
        if dtensor_cls is not None and isinstance(g, dtensor_cls):
            local, mesh, counts = _dtensor_member(g, names[i], fn)
            # a mesh without this rank: nothing to reduce with anyone
            key: Any = ("mesh", id(mesh)) if mesh is not None else ("local", None)
            target = mesh
        else:
            local = g
            counts = rank0 or replicated is None or not replicated(i)
            key, target = ("group", id(group)), group
        locals_.append(local)
        entry = by_key.setdefault(key, (target, []))
        if counts:
            entry[1].append(i)
    out = []
    for key, (target, members) in by_key.items():
        pg = target if key[0] != "mesh" else _mesh_group(target)
        out.append(Scope(pg, tuple(members)))
    return locals_, out


def replicate_like(value: Any, grads: Sequence[Any]) -> Any:
    """``value``, a norm, as a replicated DTensor where ``grads`` holds one (else as it is).

    torch's ``get_total_norm`` of DTensor gradients is a DTensor, and FSDP2
    code calls ``.full_tensor()`` on it. It goes on the first DTensor's mesh
    that holds this rank: on a mesh without it, ``from_local`` would leave an
    empty tensor, not the norm (a rank in no DTensor's mesh gets the tensor).
    """
    torch = _torch()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    from torch.distributed.tensor import DTensor, Replicate

    for g in grads:
        if isinstance(g, DTensor) and g.device_mesh.get_coordinate() is not None:
            mesh = g.device_mesh
            return DTensor.from_local(value, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return value


def reduce_scopes(plan: Plan, groups: Sequence[Any], parts: Sequence[Sequence[Partial]]) -> Partial:
    """All-reduce each group's local partials over it and merge them (the same on every rank).

    ``parts[k]``: this rank's partials for ``groups[k]`` (a scope's group).
    """
    torch = _torch()
    dist = torch.distributed
    xp = plan.xp
    kind = plan.kind
    if kind == "zero":
        raise ValueError(
            "ord=0 (torch's count of nonzero gradients) is not defined over shards: a tensor split "
            "over ranks would be counted once per rank; use ord > 0, inf or -inf"
        )
    op = {"p": dist.ReduceOp.SUM, "inf": dist.ReduceOp.MAX, "-inf": dist.ReduceOp.MIN}[kind]
    sign = -1.0 if kind == "-inf" else 1.0  # MIN of negated flags is -MAX of them
    reduced = []
    for group, mine in zip(groups, parts, strict=True):
        local = plan.merge(list(mine)) if mine else plan.identity()
        value = local.value
        exp = local.exp
        if group is not None and kind == "p":
            here = plan.const(plan.exp_none) if exp is None else exp
            # A rank whose sum is 0 (an empty shard, or zeros) must not raise
            # the common exponent: at 0 it would flush the other ranks' sums
            # of tiny float64 values (below 2**(-1074 / p)) to 0 when rescaled.
            top = plan.exp_live(value, here)
            _all_reduce(top, dist.ReduceOp.MAX, group)
            value, exp = plan.at_top(value, here, top)
        bad = xp.astype(xp.logical_not(plan.finite(local)), plan.acc)
        nan = xp.astype(xp.isnan(value), plan.acc)
        packed = xp.stack([value, sign * bad, sign * nan])
        if group is not None:
            _all_reduce(packed, op, group)
        value = xp.where(packed[2] != 0, plan.const(math.nan), packed[0])
        finite = packed[1] == 0
        reduced.append(Partial(value, exp, finite))
    return plan.merge(reduced) if len(reduced) > 1 else reduced[0]
