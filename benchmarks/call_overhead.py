"""Per-call overhead of gradclip on tiny trees, for A/B runs of two checkouts.

Usage: ``python benchmarks/call_overhead.py SRC [SRC ...]``, each ``SRC`` a
checkout's ``src`` folder (``git worktree add /tmp/old REV`` gives an old
one). Each is timed in its own subprocess, twice, alternating, so the rows
of one run compare two versions' Python cost per call (validation,
dispatch) on trees where memory traffic is nothing: 10 leaves of 16 float32.
"""

from __future__ import annotations

import json
import subprocess
import sys

_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
import gradclip as gc, gradclip.torch as gct

tiny = [np.ones(16, np.float32) for _ in range(10)]
tensors = [torch.ones(16) for _ in range(10)]
params = [torch.nn.Parameter(torch.zeros(16)) for _ in range(10)]
for p in params:
    p.grad = torch.ones(16)
rows = {
    "numpy clip_by_global_norm_": lambda: gc.clip_by_global_norm_(tiny, 1e9),
    "numpy clip_by_value_": lambda: gc.clip_by_value_(tiny, 1e9),
    "torch clip_by_global_norm_": lambda: gc.clip_by_global_norm_(tensors, 1e9),
    "torch drop-in clip_grad_norm_": lambda: gct.clip_grad_norm_(params, 1e9),
}
out = {}
for name, f in rows.items():
    for _ in range(200):
        f()
    times = []
    for _ in range(3000):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    out[name] = float(np.median(times) * 1e6)
print(json.dumps(out))
"""


def main() -> None:
    sources = sys.argv[1:]
    results: dict[str, list[dict[str, float]]] = {src: [] for src in sources}
    for _ in range(2):
        for src in sources:
            run = subprocess.run(
                [sys.executable, "-c", _CHILD, src], capture_output=True, text=True, check=True
            )
            results[src].append(json.loads(run.stdout))
    names = list(results[sources[0]][0])
    print(f"{'median us per call':32s}" + "".join(f"{src[-40:]:>42s}" for src in sources))
    for name in names:
        cells = ["/".join(f"{r[name]:.1f}" for r in results[src]) for src in sources]
        print(f"{name:32s}" + "".join(f"{c:>42s}" for c in cells))


if __name__ == "__main__":
    main()
