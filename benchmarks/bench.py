"""Time gradclip against torch, optax, a naive NumPy loop and a memory-bound floor.

``python -m gradclip bench`` under another name (the harness lives in
``gradclip._bench``, so it also runs from an installed wheel), with the same
arguments:

    python benchmarks/bench.py [--backend numpy|torch|jax|cupy] [--device cpu|gpu]
                               [--tree llm|huge|small|all|dp] [--json PATH]
                               [--dtype float32|bfloat16] [--reps N]
                               [--budget SECONDS] [--max-norm X] [--skip ROW[:TREE]]

``nox -s bench`` records ``benchmarks/results/bench-{numpy,jax,torch}-cpu.json``.
``--tree dp`` times per-example clipping (issue 8) and runs only when named;
its results are ``benchmarks/results/bench-dp-{numpy,torch,jax}-cpu.json``.

On a GPU machine ``--backend cupy`` always, and ``--backend torch`` and
``--backend jax`` by default (``--device cpu`` keeps them on the CPU), time
1B-element trees drawn on the device, in float32 or ``--dtype bfloat16``;
their results go to ``benchmarks/results/bench-{cupy,torch,jax}-gpu*.json``
and ``benchmarks/results/bench-dp-{cupy,torch,jax}-gpu.json``
(``benchmarks/gpu_session.sh`` runs them in stages).
"""

from __future__ import annotations

import sys

from gradclip.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
