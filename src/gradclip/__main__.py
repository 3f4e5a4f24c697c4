"""Command-line entry point: ``python -m gradclip demo`` and ``python -m gradclip bench``.

``demo`` trains a vanilla RNN on the adding problem, whose gradients explode,
three ways: without clipping, with :func:`gradclip.clip_by_global_norm` and
with :class:`gradclip.adaptive.ZClip`; it prints progress and a summary table
and saves the loss and gradient-norm curves as a PNG (see
:mod:`gradclip._demo`). NumPy by default; ``--backend torch|jax`` when
installed.

``bench`` times gradclip against torch, optax, a naive NumPy loop and a
memory-bound floor on the same data and prints the ratios (see
:mod:`gradclip._bench`).

Examples
--------
Run it from a shell::

    python -m gradclip demo
    gradclip demo --backend torch --out rnn.png
    python -m gradclip bench --tree small --reps 5
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import (
    _bench,  # imports torch/jax/cupy/rich only inside its functions
    _demo,
)


def _png_path(text: str) -> str:
    """``demo --out``: the curves are always a PNG, with or without matplotlib."""
    path = _bench.output_path(text)
    if not path.lower().endswith(".png"):
        raise argparse.ArgumentTypeError(f"{text} must end in .png (the curves are a PNG)")
    return path


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
        "demo", help="an RNN with exploding gradients, trained with and without clipping"
    )
    p_demo.add_argument(
        "--backend", choices=list(_demo.BACKENDS), default="numpy", help="default numpy"
    )
    p_demo.add_argument(
        "--steps", type=_bench.positive(int), default=3000, help="SGD steps (default 3000)"
    )
    p_demo.add_argument(
        "--seed", type=_bench.positive(int, zero=True), default=0, help="random seed (default 0)"
    )
    p_demo.add_argument(
        "--out",
        type=_png_path,
        default="gradclip-demo.png",
        help="the PNG of the curves (gradclip-demo.png)",
    )
    p_bench = commands.add_parser(
        "bench",
        help="time gradclip against torch, optax, a NumPy loop and a memory-bound floor",
        description="Time gradclip against anchors side by side and print the ratios.",
    )
    _bench.add_arguments(p_bench)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench.run(args)
    return _demo.run_demo(args.backend, steps=args.steps, seed=args.seed, out=args.out)


if __name__ == "__main__":
    raise SystemExit(main())
