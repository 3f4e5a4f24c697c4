"""Command-line entry point: ``python -m gradclip demo`` and ``python -m gradclip bench``.

The demo builds a small synthetic gradient pytree whose magnitude explodes
geometrically over a dozen steps, with one step that holds a NaN, and clips it
with :func:`gradclip.clip_by_global_norm` on every installed backend: NumPy
always, PyTorch and JAX when importable, CuPy when importable and a GPU is
visible. Each step prints the norm, the scale applied, and whether the step was
clipped and finite.

``bench`` times gradclip against torch, optax, a naive NumPy loop and a
memory-bound floor on the same data and prints the ratios (see
:mod:`gradclip._bench`).

Examples
--------
Run it from a shell::

    python -m gradclip demo
    gradclip demo --steps 8
    python -m gradclip bench --tree small --reps 5
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optree

import gradclip

from . import _bench  # imports torch/jax/cupy/rich only inside its functions

MAX_NORM = 1.0
GROWTH = 2.5  # the gradient norm is multiplied by this every step
NAN_STEP = 8  # 1-based step whose gradients hold a NaN

Tree = Any  # a nested dict/list of arrays (optree's stubs cannot type it more closely)


def _base_tree(seed: int) -> Tree:
    """Gradients of a toy model: an embedding and a few dense layers (float32)."""
    rng = np.random.default_rng(seed)

    def g(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "embedding": g(256, 8),
        "layers": [{"w": g(8, 32), "b": g(32)}, {"w": g(32, 32), "b": g(32)}],
        "head": {"w": g(32, 4), "b": g(4)},
    }


def _steps(steps: int, seed: int) -> list[Tree]:
    """One gradient tree per step, its norm growing by ``GROWTH`` each step."""
    base = _base_tree(seed)
    norm0 = float(np.sqrt(sum(float(np.vdot(x, x)) for x in optree.tree_leaves(base))))
    trees = []
    for step in range(1, steps + 1):
        factor = np.float32(0.05 / norm0 * GROWTH ** (step - 1))
        tree: Tree = optree.tree_map(lambda x, f=factor: x * f, base)
        if step == NAN_STEP:
            tree["layers"][1]["w"][3, 7] = np.nan  # a single bad entry poisons the step
        trees.append(tree)
    return trees


# Each runner takes the NumPy trees and returns one ClipStats per step.
Runner = Callable[[list[Tree]], list[gradclip.ClipStats]]


def _clip(grads: Tree) -> tuple[Tree, gradclip.ClipStats]:
    """The call the demo makes on every backend (functional, so JAX works too)."""
    return gradclip.clip_by_global_norm(grads, max_norm=MAX_NORM, nonfinite="skip")


def _run_numpy(trees: list[Tree]) -> list[gradclip.ClipStats]:
    return [_clip(t)[1] for t in trees]


def _run_torch(trees: list[Tree]) -> list[gradclip.ClipStats]:
    import torch

    return [_clip(optree.tree_map(lambda x: torch.from_numpy(x.copy()), t))[1] for t in trees]


def _run_jax(trees: list[Tree]) -> list[gradclip.ClipStats]:
    import jax
    import jax.numpy as jnp

    clip = jax.jit(_clip)  # no host sync inside, so the whole clip compiles
    return [clip(optree.tree_map(jnp.asarray, t))[1] for t in trees]


def _run_cupy(trees: list[Tree]) -> list[gradclip.ClipStats]:
    import cupy

    return [_clip(optree.tree_map(cupy.asarray, t))[1] for t in trees]


def _has_gpu_cupy() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:  # no driver, no CUDA runtime, no device: all mean "skip cupy"
        return False


def _backends() -> list[tuple[str, Runner]]:
    """The backends to demo, detected without importing them at module level."""
    found: list[tuple[str, Runner]] = [("numpy", _run_numpy)]
    if importlib.util.find_spec("torch") is not None:
        found.append(("torch", _run_torch))
    if importlib.util.find_spec("jax") is not None:
        found.append(("jax (inside jax.jit)", _run_jax))
    if _has_gpu_cupy():
        found.append(("cupy (GPU)", _run_cupy))
    return found


def _print_table(name: str, stats: list[gradclip.ClipStats]) -> None:
    print(f"\nbackend: {name}")
    print(f"{'step':>4}  {'norm':>10}  {'scale':>10}  {'clipped':>7}  {'finite':>6}")
    for step, s in enumerate(stats, start=1):
        # float()/bool() pull each value to the host; only printing needs that.
        clipped, finite = bool(s.clipped), bool(s.finite)
        note = "  <- non-finite: leaves returned unchanged" if not finite else ""
        print(
            f"{step:>4}  {float(s.norm):>10.4g}  {float(s.scale):>10.4g}  "
            f"{'yes' if clipped else 'no':>7}  {'yes' if finite else 'no':>6}{note}"
        )
    n_clipped = sum(bool(s.clipped) for s in stats)
    n_bad = sum(not bool(s.finite) for s in stats)
    print(f"{name}: clipped {n_clipped} of {len(stats)} steps, skipped {n_bad} non-finite")


def demo(steps: int = 12, seed: int = 0) -> int:
    """Clip a synthetic exploding-gradient run on every installed backend.

    Parameters
    ----------
    steps : int, default 12
        Number of training steps to simulate.
    seed : int, default 0
        Seed of the NumPy random generator that makes the gradients.

    Returns
    -------
    int
        Exit status, 0 on success.
    """
    trees = _steps(steps, seed)
    size = sum(x.size for x in optree.tree_leaves(trees[0]))
    n_leaves = len(optree.tree_leaves(trees[0]))
    print(
        f"gradclip {gradclip.__version__} demo: "
        f'clip_by_global_norm(grads, max_norm={MAX_NORM}, nonfinite="skip")'
    )
    print(
        f"synthetic gradients: {size} float32 entries in {n_leaves} leaves, "
        f"norm x{GROWTH} per step, one NaN at step {NAN_STEP}"
    )
    for name, run in _backends():
        _print_table(name, run(trees))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gradclip`` command line.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        Exit status.
    """
    parser = argparse.ArgumentParser(prog="gradclip", description="Gradient clipping tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_demo = commands.add_parser(
        "demo", help="clip a synthetic exploding-gradient run on every installed backend"
    )
    p_demo.add_argument("--steps", type=int, default=12, help="steps to simulate (default 12)")
    p_demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p_bench = commands.add_parser(
        "bench",
        help="time gradclip against torch, optax, a NumPy loop and a memory-bound floor",
        description="Time gradclip against anchors side by side and print the ratios.",
    )
    _bench.add_arguments(p_bench)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench.run(args)
    return demo(steps=args.steps, seed=args.seed)


if __name__ == "__main__":
    raise SystemExit(main())
