"""Where gradclip.jax's clip spends time beyond optax's on a GPU: a diagnostic, not a benchmark.

    python3 benchmarks/gpu_jax_probe.py [--tree llm|huge|small] [--reps N] [--hlo DIR]

On an H100 (stop 28) the benchmark's ``llm`` tree took 8.0 ms to clip
against optax's 6.4 ms and 4.4 ms for the per-leaf multiply alone, clipped
or not: about one copy of the tree more than the norm's read and the
scale's read and write. Stop 35 found why with this probe: XLA turned the
``lax.cond`` of the norm's two-pass fallback into a select, so both branches
ran; ``_fast._unless`` (a ``lax.switch``) replaced it. This times, side by
side and jitted with the gradients donated as the benchmark does:

- optax's ``clip_by_global_norm`` and gradclip's, clipped and not;
- gradclip's with ``_fast._unless`` replaced by a plain ``lax.cond`` (as
  before stop 35) and by its one-pass branch alone (no fallback at all);
- the norm alone: gradclip's ``global_norm`` (the same three ways) and a
  plain sum of squares.

For each it counts, in the optimized HLO, the ``copy`` instructions of
100000 entries or more and the conditionals; ``--hlo DIR`` writes each
program's HLO there.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import gradclip as gc
from gradclip import _bench
from gradclip.jax import _fast

_BIG_COPY = re.compile(r"= \w+\[\d{6,}\]\S* copy\(")


real_unless = _fast._unless
_CONDS: dict[str, Callable[..., Any]] = {
    # The one-pass sum alone: the cost of the fallback's conditional.
    "one pass": lambda ok, fast, fallback: fast(),
    # What _unless replaced: XLA on the GPU turned this into a select.
    "lax.cond": lambda ok, fast, fallback: lax.cond(ok, fast, fallback),
}


@contextlib.contextmanager
def _norm_cond(kind: str) -> Iterator[None]:
    """``_fast._unless`` (the norm's fallback) replaced by ``_CONDS[kind]``."""
    _fast._unless = _CONDS[kind]
    try:
        yield
    finally:
        _fast._unless = real_unless


def _optax(g: Any, m: float) -> Any:
    return optax.clip_by_global_norm(m).update(g, optax.EmptyState())[0]


def _sumsq(g: Any) -> Any:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in g))


def _row(
    name: str, fn: Callable[..., Any], src: list[Any], args: tuple[Any, ...], **kw: Any
) -> None:
    donate: bool = kw.get("donate", True)
    reps: int = kw["reps"]
    jax.clear_caches()  # a fresh trace: _one_pass_norm patches what tracing sees
    jitted = jax.jit(lambda g, *a: fn(g, *a), donate_argnums=0 if donate else ())
    copy = jax.jit(lambda s: [x + 0 for x in s])  # fresh buffers to donate (not constants)

    def fresh() -> Any:
        return jax.block_until_ready(copy(src)) if donate else src

    start = time.perf_counter()
    text = jitted.lower(fresh(), *args).compile().as_text()
    compiled = time.perf_counter() - start
    if kw.get("hlo"):
        Path(kw["hlo"], re.sub(r"\W+", "_", name).strip("_") + ".hlo").write_text(text)
    copies = len(_BIG_COPY.findall(text))
    conds = text.count(" conditional(")
    jax.block_until_ready(jitted(fresh(), *args))  # the first call compiles through jit's cache
    times = []
    for _ in range(reps):
        g = fresh()
        t = time.perf_counter()
        jax.block_until_ready(jitted(g, *args))
        times.append(time.perf_counter() - t)
        del g
    print(
        f"{name:52s} median {np.median(times) * 1e3:8.3f} ms  min {min(times) * 1e3:8.3f}"
        f"  compile {compiled:5.1f} s  big copies {copies}  conditionals {conds}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default="llm", choices=["llm", "huge", "small"])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--hlo", default=None, help="a folder for the optimized HLO of each row")
    parser.add_argument("--shrink", type=int, default=1, help="every dimension divided by this")
    opts = parser.parse_args()
    gpu = jax.default_backend() == "gpu"
    sizes = jax.tree.leaves(_bench.tree_sizes(opts.tree, opts.shrink, gpu=gpu))
    key = jax.random.PRNGKey(0)
    src = [jax.random.normal(jax.random.fold_in(key, i), (n,)) for i, n in enumerate(sizes)]
    jax.block_until_ready(src)
    print(
        f"{opts.tree}: {len(sizes)} leaves, {sum(sizes) / 1e6:.1f}M float32 on {jax.devices()[0]}"
    )
    kw = {"reps": opts.reps, "hlo": opts.hlo}
    clip = gc.clip_by_global_norm
    for m, case in ((1.0, "clip"), (1e30, "no clip")):
        _row(f"optax clip_by_global_norm, {case}", _optax, src, (m,), **kw)
        _row(f"gradclip, {case}", clip, src, (m,), **kw)
        for kind in _CONDS:
            with _norm_cond(kind):
                _row(f"gradclip, norm cond: {kind}, {case}", clip, src, (m,), **kw)
    _row("norm: sum of squares", _sumsq, src, (), donate=False, **kw)
    _row("norm: gradclip global_norm", gc.global_norm, src, (), donate=False, **kw)
    for kind in _CONDS:
        with _norm_cond(kind):
            _row(f"norm: global_norm, cond: {kind}", gc.global_norm, src, (), donate=False, **kw)


if __name__ == "__main__":
    main()
