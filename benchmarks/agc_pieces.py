"""Time ``AGC(layout="torch")`` in place and functional on the llm tree's shapes (NumPy).

Run it against two checkouts (``PYTHONPATH=<checkout>/src``) to compare them;
results: ``benchmarks/results/agc-pieces-cpu-stop40.txt``.
"""

from __future__ import annotations

import time

import numpy as np

import gradclip
from gradclip.adaptive import AGC

BLOCK = [(512, 1536), (512, 512), (512, 2048), (2048, 512), (1536,), (512,), (2048,)]
BLOCK += [(512,)] * 3


def main() -> None:
    rng = np.random.default_rng(0)
    shapes = [(32000, 512)] + BLOCK * 12
    g = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    w = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    agc = AGC(layout="torch")
    for name in ("update_", "update"):
        times = []
        for _ in range(7):
            fresh = [x.copy() for x in g]
            start = time.perf_counter()
            getattr(agc, name)(fresh, (), params=w)
            times.append(time.perf_counter() - start)
        where = gradclip.__file__.split("/src/")[0]
        print(f"{where} {name} median {1e3 * sorted(times)[3]:.1f} ms")


if __name__ == "__main__":
    main()
