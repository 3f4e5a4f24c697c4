"""The torch drop-in on the ``small`` tree with ``.grad`` set to a FlatTree's views.

Usage: ``python benchmarks/flat_grad.py``. Times
``gradclip.torch.clip_grad_norm_`` on 2000 parameters whose ``.grad`` are
the views of one :class:`gradclip.FlatTree` (clipped through its buffer),
the same drop-in on 2000 separate ``.grad`` tensors, and torch's
``clip_grad_norm_(foreach=True)`` on those. Rows take turns from a rotating
start, with fresh gradients copied in, untimed, before every call.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import gradclip as gc
import gradclip.torch as gct
from gradclip import _bench


def main() -> None:
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    src = [
        torch.from_numpy(rng.standard_normal(n).astype(np.float32))
        for n in _bench.tree_sizes("small")
    ]
    flat = gc.FlatTree.zeros_like(src)  # kept alive: the drop-in finds it from the views
    rows: dict[str, tuple[list[Any], Callable[[list[Any]], Any]]] = {
        "drop-in, .grad = FlatTree views": (
            _bench.torch_params(list(flat._flat.leaves)),
            lambda ps: gct.clip_grad_norm_(ps, 1.0),
        ),
        "drop-in, separate .grad": (
            _bench.torch_params([s.clone() for s in src]),
            lambda ps: gct.clip_grad_norm_(ps, 1.0),
        ),
        "torch clip_grad_norm_(foreach=True)": (
            _bench.torch_params([s.clone() for s in src]),
            lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=True),
        ),
    }
    names = list(rows)
    times = _bench.take_turns(
        {k: _bench.torch_turn(params, src, call) for k, (params, call) in rows.items()}, turns=100
    )
    ref = float(np.median(times[names[-1]]))
    print(
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, gradclip {gc.__version__}"
    )
    for k in names:
        median = float(np.median(times[k]))
        print(
            f"{k:38s} median {median * 1e3:7.3f} ms  min {min(times[k]) * 1e3:7.3f} ms"
            f"  {median / ref:5.2f}x torch"
        )


if __name__ == "__main__":
    main()
