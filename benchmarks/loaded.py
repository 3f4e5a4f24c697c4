"""The torch drop-in against torch's foreach clip, on an idle machine and on a busy one.

Usage: ``python benchmarks/loaded.py [--clip norm|value] [--busy N] [--turns T] [--json PATH]``.

A training process rarely has the CPU to itself: data loader workers keep
the other cores busy. A CPU op that splits its work over torch's (or
BLAS's) thread pool then waits, at every call, for a pool thread that the
scheduler may hold back for a few milliseconds. This times
``gradclip.torch.clip_grad_norm_`` and ``torch.nn.utils.clip_grad_norm_(
foreach=True)`` side by side on the ``small`` tree (2000 tensors) and on a
ten-layer MLP's 20 tensors, first with the machine idle, then with ``N``
processes (default: one a core) spinning in pure Python. Rows take turns
from a rotating start, with fresh gradients copied in, untimed, before
every call. It prints the medians, the means (where the stalls show) and
the ratios, and writes them to ``--json`` with the machine description.
``--clip value`` times ``clip_grad_value_`` (0.5) against torch's instead;
``--busy 0`` runs the idle machine only.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from typing import Any

import numpy as np
import torch

import gradclip as gc
import gradclip.torch as gct
from gradclip import _bench


def _spin(stop: Any) -> None:
    while not stop.is_set():
        sum(range(10_000))


def _trees() -> dict[str, list[Any]]:
    rng = np.random.default_rng(0)
    small = [
        torch.from_numpy(rng.standard_normal(n, dtype=np.float32))
        for n in _bench.tree_sizes("small")
    ]
    mlp = torch.nn.Sequential(*[torch.nn.Linear(128, 128) for _ in range(10)])
    mlp(torch.randn(32, 128)).square().sum().backward()
    return {
        "small (2000 tensors)": small,
        "MLP (20 tensors)": [p.grad.clone() for p in mlp.parameters()],
    }


CALLS = {
    "norm": {
        "gradclip.torch.clip_grad_norm_": lambda ps: gct.clip_grad_norm_(ps, 1.0),
        "torch clip_grad_norm_(foreach=True)": lambda ps: torch.nn.utils.clip_grad_norm_(
            ps, 1.0, foreach=True
        ),
    },
    "value": {
        "gradclip.torch.clip_grad_value_": lambda ps: gct.clip_grad_value_(ps, 0.5),
        "torch clip_grad_value_(foreach=True)": lambda ps: torch.nn.utils.clip_grad_value_(
            ps, 0.5, foreach=True
        ),
    },
}


def _time(src: list[Any], turns: int, clip: str) -> dict[str, list[float]]:
    calls = CALLS[clip]
    rows = {
        k: _bench.torch_turn(_bench.torch_params([g.clone() for g in src]), src, call)
        for k, call in calls.items()
    }
    return _bench.take_turns(rows, turns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clip", choices=list(CALLS), default="norm")
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    trees = _trees()
    results: list[dict[str, Any]] = []
    for busy in dict.fromkeys((0, args.busy)):
        stop = multiprocessing.Event()
        hogs = [multiprocessing.Process(target=_spin, args=(stop,)) for _ in range(busy)]
        for hog in hogs:
            hog.start()
        try:
            time.sleep(0.5 if busy else 0.0)
            for tree, src in trees.items():
                times = _time(src, args.turns, args.clip)
                ref = times[list(CALLS[args.clip])[1]]  # torch's
                print(f"\n{tree}, {busy} busy processes, {torch.get_num_threads()} torch threads")
                for row, ts in times.items():
                    median, mean = statistics.median(ts), statistics.fmean(ts)
                    x_median = median / statistics.median(ref)
                    x_mean = mean / statistics.fmean(ref)
                    print(
                        f"  {row:38s} median {median * 1e3:8.3f} ms ({x_median:5.2f}x)"
                        f"  mean {mean * 1e3:8.3f} ms ({x_mean:5.2f}x)"
                        f"  max {max(ts) * 1e3:8.3f} ms"
                    )
                    results.append(
                        {
                            "tree": tree,
                            "busy": busy,
                            "row": row,
                            "median_ms": median * 1e3,
                            "mean_ms": mean * 1e3,
                            "max_ms": max(ts) * 1e3,
                            "x_torch_median": x_median,
                            "x_torch_mean": x_mean,
                        }
                    )
        finally:
            stop.set()
            for hog in hogs:
                hog.join()
    if args.json:
        out = {
            "command": "python benchmarks/loaded.py "
            + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None),
            "gradclip": gc.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": _bench._machine(),
            "torch_threads": torch.get_num_threads(),
            "turns": args.turns,
            "results": results,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
