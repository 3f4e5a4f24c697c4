"""Rank processes for tests/test_torch_distributed.py (a helper module, not a test module).

:func:`main` runs in each spawned child: it joins a gloo process group on
localhost, runs every case of the job in order (the same order on every rank,
so the collectives match) and pickles the per-case results to
``{outdir}/rank{rank}.pkl``; on an exception it writes the traceback to
``{outdir}/rank{rank}.err`` and exits non-zero. The parent compares the
results with the single-process clip of the whole gradients.

A spawned child finds this module by name because pytest puts ``tests`` on
``sys.path`` (``pythonpath`` in pyproject.toml) and ``multiprocessing``
passes the parent's ``sys.path`` on. torch is imported only inside the
functions: ``--doctest-modules`` imports this file in sessions without torch.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import sys
import traceback
from datetime import timedelta
from typing import Any

import numpy as np

# Device meshes of this process, by name (created once: init_device_mesh is a collective).
_MESHES: dict[str, Any] = {}


def main(
    rank: int, world: int, port: int, outdir: str, cases: dict[str, dict], timeout_s: float
) -> None:
    """Run ``cases`` as rank ``rank`` of ``world`` and write the results (or the traceback).

    ``timeout_s`` bounds each collective, so a rank left waiting by a
    mismatched one raises (and the parent reports it) instead of hanging.
    """
    os.environ["OMP_NUM_THREADS"] = "1"
    # A rank killed by a signal (an abort in torch's C++) leaves no traceback
    # of its own: this file gets the Python stacks, and the parent reports them.
    fault = open(os.path.join(outdir, f"rank{rank}.fault"), "w")  # noqa: SIM115 (to the end)
    faulthandler.enable(fault, all_threads=True)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
        results = {}
        for name, spec in cases.items():
            try:
                results[name] = CHECKS[spec["check"]](rank, world, spec)
            except BaseException as exc:
                raise RuntimeError(f"rank {rank}: case {name!r} failed") from exc
        tmp = os.path.join(outdir, f"rank{rank}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(results, f)
        os.replace(tmp, os.path.join(outdir, f"rank{rank}.pkl"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        sys.stderr.flush()
        os._exit(1)  # skip interpreter teardown, which may block on a broken process group
    # Done: the results are written and the group destroyed. Skip interpreter
    # teardown here too: gloo's threads may still hold torch objects then, and
    # freeing them at finalization sometimes aborts the process ("terminate
    # called without an active exception", SIGABRT; pytorch PR 179291). A CI
    # run failed so once, after rank 0's last barrier (rank 1 had finished).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------- helpers


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _world_group() -> Any:
    import torch.distributed as dist

    return dist.group.WORLD


def _param(grad: Any, *, like: Any = None) -> Any:
    """A parameter (zeros shaped like ``like``, default the grad) holding ``grad``."""
    import torch

    p = torch.nn.Parameter(torch.zeros_like(grad if like is None else like))
    p.grad = grad
    return p


def _pieces(
    grads: list[np.ndarray], bounds: list[int], rank: int, *, none_if_empty: bool = False
) -> list[tuple[str, Any]]:
    """This rank's slices of the flattened gradients as ``(name, parameter)`` pairs.

    The gradients are laid end to end and rank ``r`` holds elements
    ``bounds[r]:bounds[r+1]`` (ZeRO's flat shard), kept as one parameter per
    original tensor it overlaps (FSDP's ``use_orig_params`` view). A rank
    holding nothing gets one zero-element parameter, or none at all with
    ``none_if_empty``.
    """
    import torch

    lo_r, hi_r = bounds[rank], bounds[rank + 1]
    out, start = [], 0
    for j, g in enumerate(grads):
        flat = g.reshape(-1)
        end = start + flat.size
        lo, hi = max(start, lo_r), min(end, hi_r)
        if lo < hi:
            out.append((f"p{j}", _param(torch.from_numpy(flat[lo - start : hi - start].copy()))))
        start = end
    if not out and not none_if_empty:
        out.append(("empty", _param(torch.zeros(0, dtype=torch.from_numpy(grads[0]).dtype))))
    return out


def _shard(pieces: list[tuple[str, Any]]) -> np.ndarray:
    # float16: an empty piece must not widen the dtype of the others when joined.
    return np.concatenate([_np(p.grad).reshape(-1) for _, p in pieces] or [np.zeros(0, np.float16)])


def _stats(stats: Any) -> dict[str, Any]:
    return {
        "norm": _np(stats.norm),
        "scale": _np(stats.scale),
        "clipped": bool(stats.clipped),
        "finite": bool(stats.finite),
    }


def _raised(call: Any) -> dict[str, Any]:
    """What ``call()`` raised (type, message, whether a NonFiniteError), or its result."""
    from gradclip import NonFiniteError

    try:
        result = call()
    except Exception as exc:
        return {
            "raised": type(exc).__name__,
            "message": str(exc),
            "nonfinite_error": isinstance(exc, NonFiniteError),
            "value_error": isinstance(exc, ValueError),
        }
    return {"raised": None, "result": result}


# ---------------------------------------------------------------- checks


def check_sharded(rank: int, world: int, spec: dict) -> dict[str, Any]:
    """ZeRO-like shards: the norm over the group and the clipped shard."""
    import torch

    from gradclip.torch import clip_grad_norm_, get_total_norm

    p, max_norm, group = spec["norm_type"], spec["max_norm"], _world_group()
    pieces = _pieces(spec["grads"], spec["bounds"], rank, none_if_empty=spec["none_if_empty"])
    grads = [q.grad.clone() for _, q in pieces]
    out: dict[str, Any] = {"before": _shard(pieces)}
    out["gtn"] = _np(get_total_norm(grads, p, process_group=group))
    out["gtn_generic"] = _np(get_total_norm(grads, p, foreach=False, process_group=group))
    # The generic (foreach=False) clip on a copy of the shard.
    copies = [(n, _param(q.grad.clone())) for n, q in pieces]
    out["norm_generic"] = _np(
        clip_grad_norm_(copies, max_norm, p, foreach=False, process_group=group)
    )
    out["shard_generic"] = _shard(copies)
    stats = clip_grad_norm_(pieces, max_norm, p, process_group=group, return_stats=True)
    out.update(_stats(stats))
    out["shard"] = _shard(pieces)
    assert all(q.grad.dtype == torch.from_numpy(spec["grads"][0]).dtype for _, q in pieces)
    return out


def check_all_empty(rank: int, world: int, spec: dict) -> dict[str, Any]:
    """No rank holds an element: the norm of nothing is 0, for -inf too."""
    import torch

    from gradclip.torch import clip_grad_norm_, get_total_norm

    group = _world_group()
    return {
        "gtn_none": _np(get_total_norm([], -float("inf"), process_group=group)),
        "gtn_empty": _np(get_total_norm([torch.zeros(0)], -float("inf"), process_group=group)),
        "clip_none": _np(clip_grad_norm_([], 1.0, process_group=group)),
    }


def check_overflow_elsewhere(rank: int, world: int, spec: dict) -> dict[str, Any]:
    """Rank 0 holds float64 gradients of 5e300, the others none (float32 norms, inf)."""
    import torch

    from gradclip.torch import clip_grad_norm_

    group = _world_group()
    pieces = []
    if rank == 0:
        pieces = [("w", _param(torch.tensor([3e300, 4e300], dtype=torch.float64)))]
    out: dict[str, Any] = {"before": _shard(pieces) if pieces else np.zeros(0)}
    out["clip"] = _raised(
        lambda: _np(clip_grad_norm_(pieces, 1.0, process_group=group, error_if_nonfinite=True))
    )
    out["after"] = _shard(pieces) if pieces else np.zeros(0)
    out["norm"] = _np(clip_grad_norm_(pieces, 1.0, process_group=group))
    return out


def check_replicated(rank: int, world: int, spec: dict) -> dict[str, Any]:
    """Sharded gradients plus gradients every rank holds whole (``replicated=``)."""
    import torch

    from gradclip.torch import clip_grad_norm_, get_total_norm

    p, max_norm, group = spec["norm_type"], spec["max_norm"], _world_group()

    def build() -> tuple[list, list]:
        pieces = _pieces(spec["grads"], spec["bounds"], rank)
        reps = [(f"r{k}", _param(torch.from_numpy(g.copy()))) for k, g in enumerate(spec["repl"])]
        for _, q in reps:
            q.is_replicated = True
        return pieces, reps

    out: dict[str, Any] = {}
    pieces, reps = build()
    tensors = [q.grad for _, q in pieces + reps]
    rep_grads = [q.grad for _, q in reps]
    out["over"] = _np(get_total_norm(tensors, p, process_group=group))
    out["gtn_set"] = _np(get_total_norm(tensors, p, process_group=group, replicated=rep_grads))
    out["gtn_pred"] = _np(
        get_total_norm(
            tensors, p, process_group=group, replicated=lambda t: any(t is r for r in rep_grads)
        )
    )
    # replicated= as a set of parameters.
    out["norm_set"] = _np(
        clip_grad_norm_(
            pieces + reps, max_norm, p, process_group=group, replicated={q for _, q in reps}
        )
    )
    out["shard_set"] = _shard(pieces)
    out["repl_set"] = [_np(q.grad) for _, q in reps]
    # replicated= as a predicate on parameters.
    pieces, reps = build()
    out["norm_pred"] = _np(
        clip_grad_norm_(
            pieces + reps,
            max_norm,
            p,
            process_group=group,
            replicated=lambda q: getattr(q, "is_replicated", False),
        )
    )
    out["shard_pred"] = _shard(pieces)
    out["repl_pred"] = [_np(q.grad) for _, q in reps]
    return out


def check_nonfinite(rank: int, world: int, spec: dict) -> dict[str, Any]:
    """A NaN or inf on one rank only, under one ``nonfinite`` policy."""
    from gradclip.torch import clip_grad_norm_, get_total_norm

    p, max_norm, group = spec["norm_type"], spec["max_norm"], _world_group()
    policy = spec["policy"]
    pieces = _pieces(spec["grads"], spec["bounds"], rank)
    kw = {"error_if_nonfinite": True} if policy == "error_if_nonfinite" else {"nonfinite": policy}
    out: dict[str, Any] = {"before": _shard(pieces)}
    if policy in ("error_if_nonfinite", "raise"):
        grads = [(f"{n}.grad", q.grad) for n, q in pieces]  # named, as in the clip's errors
        out["gtn"] = _raised(lambda: _np(get_total_norm(grads, p, process_group=group, **kw)))
    out["clip"] = _raised(
        lambda: _stats(
            clip_grad_norm_(pieces, max_norm, p, process_group=group, return_stats=True, **kw)
        )
    )
    out["after"] = _shard(pieces)
    return out


def check_ord0(rank: int, world: int, spec: dict) -> dict[str, Any]:
    """``norm_type=0`` with a process group raises on every rank, modifying nothing."""
    from gradclip.torch import clip_grad_norm_, get_total_norm

    group = _world_group()
    pieces = _pieces(spec["grads"], spec["bounds"], rank)
    out: dict[str, Any] = {"before": _shard(pieces)}
    out["clip"] = _raised(lambda: clip_grad_norm_(pieces, 1.0, 0, process_group=group))
    grads = [q.grad for _, q in pieces]
    out["gtn"] = _raised(lambda: get_total_norm(grads, 0.0, process_group=group))
    out["after"] = _shard(pieces)
    return out


def _mesh(name: str, world: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    if name not in _MESHES:
        if name == "1d":
            _MESHES[name] = init_device_mesh("cpu", (world,))
        elif name == "2d":
            _MESHES[name] = init_device_mesh("cpu", (2, world // 2))
        elif name == "2d_named":
            _MESHES[name] = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        elif name == "ranks01":  # a pipeline stage's mesh: the other ranks are not in it
            from torch.distributed.device_mesh import DeviceMesh

            _MESHES[name] = DeviceMesh("cpu", [0, 1])
        else:
            raise ValueError(name)
    return _MESHES[name]


def _placements(spec: list[str]) -> list[Any]:
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    out = []
    for s in spec:
        if s == "R":
            out.append(Replicate())
        elif s == "P":
            out.append(Partial())
        elif s.startswith("SS"):  # what FSDP2 gives a weight TP also shards on dim 0
            out.append(_StridedShard(int(s[2:]), split_factor=2))
        else:
            out.append(Shard(int(s[1:])))  # "S0", "S1"
    return out


def check_dtensor(rank: int, world: int, spec: dict) -> dict[str, Any]:
    """DTensor gradients (no process group): the mesh reduction of their local shards."""
    import torch
    from torch.distributed.tensor import distribute_tensor

    from gradclip.torch import clip_grad_norm_, clip_grads_with_norm_, get_total_norm

    p, max_norm = spec["norm_type"], spec["max_norm"]

    def model() -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
        params = []
        for k, entry in enumerate(spec["entries"]):
            mesh = _mesh(entry["mesh"], world)
            placements = _placements(entry["placements"])
            full = torch.from_numpy(entry["grad"].copy())
            q = torch.nn.Parameter(distribute_tensor(torch.zeros_like(full), mesh, placements))
            q.grad = distribute_tensor(full, mesh, placements)
            params.append((f"d{k}", q))
        plain = [
            (f"plain{k}", _param(torch.from_numpy(g.copy()))) for k, g in enumerate(spec["plain"])
        ]
        return params, plain

    out: dict[str, Any] = {}
    # The two-step split (torch's get_total_norm, then clip_grads_with_norm_),
    # on gradients of their own: the same shards as clip_grad_norm_'s.
    for foreach in (None, False):
        params, plain = model()
        norm = get_total_norm([q.grad for _, q in params + plain], p)
        clip_grads_with_norm_([q for _, q in params + plain], max_norm, norm, foreach=foreach)
        out[f"two_step_{foreach}"] = [_np(q.grad.to_local()) for _, q in params] + [
            _np(q.grad) for _, q in plain
        ]
    params, plain = model()
    out["local_before"] = [_np(q.grad.to_local()) for _, q in params]
    gtn = get_total_norm([q.grad for _, q in params + plain], p)
    # DTensors, as torch's: FSDP2 code calls .full_tensor() on the norm.
    out["gtn"] = _np(gtn.full_tensor())
    logged = clip_grad_norm_(params + plain, float("inf"), p)  # a finite norm: scale 1
    out["norm_types"] = [(type(n).__name__, [str(x) for x in n.placements]) for n in (gtn, logged)]
    stats = clip_grad_norm_(params + plain, max_norm, p, return_stats=True)
    out.update(_stats(stats))
    out["grad_is_dtensor"] = [type(q.grad).__name__ for _, q in params]
    out["local_after"] = [_np(q.grad.to_local()) for _, q in params]
    out["full_after"] = [_np(q.grad.full_tensor()) for _, q in params]
    out["plain_after"] = [_np(q.grad) for _, q in plain]
    return out


def check_dtensor_elsewhere(rank: int, world: int, spec: dict) -> dict[str, Any]:
    """A DTensor on a mesh of ranks 0 and 1: the other ranks hold nothing of it."""
    import torch
    from torch.distributed.tensor import distribute_tensor

    from gradclip.torch import clip_grad_norm_

    mesh = _mesh("ranks01", world)
    full = torch.arange(6.0)
    q = torch.nn.Parameter(distribute_tensor(torch.zeros(6), mesh, _placements(["S0"])))
    q.grad = distribute_tensor(full, mesh, _placements(["S0"]))
    norm = clip_grad_norm_([("w", q)], 1e9)
    local = norm.to_local() if hasattr(norm, "to_local") else norm
    return {"type": type(norm).__name__, "norm": _np(local)}


def check_dtensor_partial(rank: int, world: int, spec: dict) -> dict[str, Any]:
    """A gradient with a Partial placement (a pending sum) is refused on every rank."""
    import torch
    from torch.distributed.tensor import DTensor

    from gradclip.torch import clip_grad_norm_

    mesh = _mesh("1d", world)
    local = torch.full((3,), float(rank + 1))
    q = torch.nn.Parameter(DTensor.from_local(torch.zeros(3), mesh, _placements(["R"])))
    q.grad = DTensor.from_local(local, mesh, _placements(["P"]))
    out = {"clip": _raised(lambda: clip_grad_norm_([("w", q)], 1.0))}
    out["local_after"] = _np(q.grad.to_local())
    return out


CHECKS = {
    "sharded": check_sharded,
    "replicated": check_replicated,
    "nonfinite": check_nonfinite,
    "ord0": check_ord0,
    "all_empty": check_all_empty,
    "overflow_elsewhere": check_overflow_elsewhere,
    "dtensor": check_dtensor,
    "dtensor_partial": check_dtensor_partial,
    "dtensor_elsewhere": check_dtensor_elsewhere,
}
