"""Time gradclip against torch, optax, a naive NumPy loop and a memory-bound floor.

The same harness as ``python -m gradclip bench`` (it lives in
``gradclip._bench``, so it also runs from an installed wheel), with the same
arguments:

    python benchmarks/bench.py [--backend numpy|torch|jax|cupy]
                               [--tree llm|huge|small|all] [--json PATH]
                               [--reps N] [--budget SECONDS] [--max-norm X]

``nox -s bench`` records ``benchmarks/results/bench-numpy-cpu.json``.
"""

from __future__ import annotations

import sys

from gradclip._bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
