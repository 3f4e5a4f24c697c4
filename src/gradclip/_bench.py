"""Benchmark harness: ``python -m gradclip bench``.

Times gradclip against anchors side by side, on the same data in one run, and
prints ratios: torch ``clip_grad_norm_(foreach=True)``, optax
``clip_by_global_norm`` under ``jax.jit``, the naive NumPy loop a researcher
writes, and a *floor*, the least a global-norm clip can cost: one dot and one
in-place multiply over a single flat buffer of the same size. The case
where nothing needs clipping (``scale == 1``) is timed on its own against one
read pass over that buffer.

Every timed call gets fresh gradients that need clipping, copied in untimed
from a pristine source; after each row the harness checks, untimed, that the
row really clipped (or, with nothing to clip, left the norm unchanged). On
the CPU the rows of a tree's case are timed in turns, one call each a round,
so that drifts in the shared machine's memory bandwidth reach every row
alike; on a GPU, where each row's buffers are sized to the device, each row
is timed alone. JAX
rows are compiled once per tree, from scratch (JAX's in-memory caches are
cleared before each tree), and that compile is timed on its own and reported
as ``compile_s``: XLA takes minutes on a CPU for optax's clip of the
2000-leaf tree (``--skip optax:small`` leaves that anchor out; jaxlib 0.10's
persistent cache crashes loading that program). ``--backend jax`` also times
the least any jitted clip of the tree costs, whatever its norm: every leaf
multiplied by the scale, known in advance (``perleaf``), since XLA runs and
compiles one kernel per leaf it writes. Those rows are jitted as a user's
step is, with XLA's default options; ``gcjax`` calls gradclip.jax's own
compiled function, which picks its options by the tree
(:func:`gradclip.jax.compiler_options`), and its compile is its first call.

GPUs (``--device gpu``; the default wherever the backend sees one): ``--backend
cupy`` always runs on a CUDA GPU (issue 5), ``--backend torch`` where
``torch.cuda.is_available()`` (issue 6) and ``--backend jax`` where
``jax.default_backend()`` is a GPU (issue 4); ``--device cpu`` keeps torch and
JAX on the CPU. On a GPU the trees have sizes of their own: ``llm`` at 1.01e9
elements, ``huge`` at 2**30, ``small`` the same 2000 leaves, in float32 or,
with ``--dtype bfloat16``, bfloat16. Their data is drawn on the device (a
1B-element tree never exists on the host): by ``cupy.random``, or a seeded
``torch.Generator``, into one flat buffer whose views are the leaves; under
JAX by ``jax.random`` leaf by leaf, except that leaves of at most
``_HOST_LEAF`` elements are drawn on the host and put on the device (each
distinct shape costs an XLA compile, and the ``small`` tree has a thousand).
Their float64 reference norm is computed there too (CuPy and torch: float64
sums on the device; JAX, whose x64 mode is off: float32 sums of rows of
``_ROW`` elements, added on the host in float64). The floor is measured, not
assumed: 3x the tree's bytes (the norm's read, the scale's read and its
write) divided by the device-to-device copy bandwidth timed in the same run
(``cudaMemcpyAsync`` under CuPy, ``copy_`` under torch, a jitted
``jnp.copy`` under JAX), with a flat buffer's sum of squares and in-place
multiply timed beside it. Anchors: under CuPy, torch's
``clip_grad_norm_(foreach=True)`` on the very same buffers (zero-copy through
DLPack) and a naive CuPy loop; under torch, ``clip_grad_norm_(foreach=True)``
and a naive torch loop; under JAX, optax's ``clip_by_global_norm`` (jit,
donated). JAX's flat buffer (floor, copy and read pass) is a draw of its own,
the same size, checked against its own norm: splitting one buffer into 2000
JAX arrays would take XLA minutes to compile. A JAX run on a GPU touches
neither torch nor CuPy, and a CuPy or torch run never imports JAX: JAX
preallocates 75% of the GPU's memory when it starts (unless
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` is set before it is imported), which
its own trees fit in (float32 ``llm``: about 16 GB at most) but which the
other libraries' would not share. Calls are timed by wall clock around the
call and a device synchronisation, so a small tree's time includes its host
overhead. ``--dtype bfloat16`` runs on ``cupy``, on ``jax`` (on the CPU too,
with the CPU trees rounded) and on ``torch`` on a GPU.

``--tree dp`` times per-example clipping (issue 8, DP-SGD's clipping step), a
different operation from the global-norm clip, so ``--tree all`` leaves it
out: a batch of 256 examples over the ``llm`` tree's structure scaled down 16
times (145 leaves, d=32, a 2000-token embedding: 216,448 elements per example,
55.4M in all, float32), every leaf with the batch on axis 0. The examples'
norms are spaced evenly in log from e**-1 to e (shuffled), so ``max_norm`` 1
clips exactly half of them. Its rows sum the clipped examples with
``eps=0`` (optax has none): gradclip's ``per_example_clip(..., reduce="sum")``
and, under ``--backend jax``, optax's ``per_example_global_norm_clip``, both
under ``jax.jit`` (not donated: the sum is far smaller than its input, so
XLA could not reuse the buffers), compiled once and timed on its own; under
``--backend numpy`` or ``torch`` a naive loop in the same library (each
example's sum of squares over its non-batch axes, ``min(1, C / norm)``, a
``tensordot`` over the batch), and the same with the sums of squares by
``einsum`` (no squared copy); under ``--backend cupy`` the naive loop in
CuPy. Their anchor is one read pass over a flat buffer of the same size (a
dot, or on a GPU the backend's read pass), the least any per-example clip
can cost. The check compares each row's sum with a float64 NumPy reference
and its count of clipped examples with the reference's. On a GPU the dp
tree keeps its CPU size (55.4M elements, so the CPU and GPU tables compare
directly); it is drawn on the host, put on the device once, untimed, and the
timed calls leave their sums there (only the check reads them back).

Targets (PASS/MISS) are the ones of the issue that built each fast path:
issue 3's for ``--backend numpy``, issue 4's for ``--backend jax``, issue 5's
for ``--backend cupy``, issue 6's for ``--backend torch`` (on a GPU the same
ratios, labelled so), checked against the gradclip rows. JAX on a GPU has
no target of its own: issue 4's ``llm`` bound against optax is printed as
information.

torch, jax, optax, cupy, ml_dtypes and rich are optional and imported only
inside functions (through :func:`importlib.import_module`, so they are typed
``Any`` and the lint environment needs none of them); rows whose library is
missing are left out with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import tracemalloc
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optree

import gradclip as gc

__all__ = [
    "EXAMPLE_TREES",
    "TREES",
    "add_arguments",
    "bench",
    "format_report",
    "make_tree",
    "run",
    "tree_sizes",
]

TREES = ("llm", "huge", "small")  # --tree all: the global-norm clip's trees
# Per-example clipping's tree (issue 8): run only when named, not by --tree all.
EXAMPLE_TREES = ("dp",)
ALL_TREES = (*TREES, *EXAMPLE_TREES)
EXAMPLE_BATCH = 256  # examples in the dp tree, on axis 0 of every leaf
EXAMPLE_SIZE_FACTOR = 16  # the dp tree is the llm tree's structure, divided by this
EXAMPLE_SPREAD = 1.0  # the examples' norms run from exp(-this) to exp(this)
EXAMPLE_EPS = 0.0  # optax's per_example_global_norm_clip has no eps
_EXAMPLE_TOL = 1e-4  # a per-example sum's relative distance from the float64 reference
BACKENDS = ("numpy", "torch", "jax", "cupy")
DEVICES = ("cpu", "gpu")  # --device; numpy runs on the CPU only, cupy on a GPU only
# bfloat16: --backend cupy, jax (CPU or GPU) and torch on a GPU (ml_dtypes'
# type for NumPy, CuPy and JAX; torch's own).
DTYPES = ("float32", "bfloat16")
CASES = ("clip", "noclip")
NO_CLIP = 1e30  # max_norm of the no-clip case: far above any norm here, so scale == 1
EPS = 1e-6  # gradclip's and torch's default
SEED = 0
_MAX_REPS_FACTOR = 20  # fast rows run up to this many times --reps, within the budget
_CHECK_CHUNK = 1 << 20  # elements widened to float64 at a time by the result check
_GPU_CHUNK = 1 << 26  # elements drawn (as float32) or reduced per launch on the GPU
# JAX on a GPU: leaves of at most this many elements are drawn on the host and
# put on the device, and read back there for the reference norm. Each leaf
# shape drawn or reduced on the device costs an XLA compile, and the small
# tree has a thousand shapes (2.1M elements in all); the big leaves are few.
_HOST_LEAF = 1 << 20
_ROW = 4096  # JAX's reference norm: float32 sums of rows this long, added in float64
_JAX_GPU_PLATFORMS = ("gpu", "cuda", "rocm")  # what jax.default_backend() says on a GPU
# The GPU floor: a global-norm clip reads every byte twice (the norm, then the
# scale) and writes it once; a device-to-device copy reads it once and writes
# it once, so the floor takes FLOOR_PASSES / COPY_PASSES of the copy's time.
FLOOR_PASSES = 3
COPY_PASSES = 2
SKIPPABLE = ("torch", "optax", "naive", "perleaf")  # anchors --skip may leave out
# What jax.monitoring reports once per XLA compilation (jax._src.dispatch's
# BACKEND_COMPILE_EVENT); a persistent-cache hit does not report it.
_XLA_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

Tree = Any  # a nested dict/list of arrays (optree's stubs cannot type it more closely)


def _load(name: str) -> Any:
    """Import an optional library (typed ``Any``: it may be absent where mypy runs)."""
    return importlib.import_module(name)


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package broken, or None in sys.modules
        return False


def _torch() -> Any:
    torch = _load("torch")
    torch.set_num_threads(os.cpu_count() or 1)  # every torch row uses all the cores
    return torch


# Where a backend finds its GPU. The tests replace these to run the GPU plans
# on the CPU (torch's "GPU" then is its CPU device, JAX's its default device).


def _torch_cuda() -> bool:
    """Whether torch sees a CUDA device."""
    return bool(_torch().cuda.is_available())


def _torch_gpu() -> Any:
    """The torch device the GPU trees live on."""
    return _torch().device("cuda")


def _torch_sync() -> None:
    """Wait for torch's work on the GPU."""
    _torch().cuda.synchronize()


def _jax_gpu() -> bool:
    """Whether JAX's default backend is a GPU (this starts JAX's backends)."""
    return str(_load("jax").default_backend()) in _JAX_GPU_PLATFORMS


def _jax_device(gpu: bool) -> Any:
    """The JAX device the rows run on: the default one (a GPU), or the CPU."""
    jax = _load("jax")
    return jax.devices()[0] if gpu else jax.devices("cpu")[0]


def _cuda_devices() -> int:
    try:
        return int(_load("cupy").cuda.runtime.getDeviceCount())
    except Exception:  # no driver or no CUDA runtime: cupy raises its own error types
        return 0


def _resolve_device(backend: str, device: str | None) -> str:
    """``--device`` for ``backend``: ``"cpu"`` or ``"gpu"``, or a clear exit where it cannot run.

    ``None`` picks the GPU where the backend sees one (numpy: never; cupy:
    always, and it exits without one).
    """
    if device is not None and device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    if backend == "numpy":
        if device == "gpu":
            raise SystemExit("gradclip bench: --backend numpy runs on the CPU only")
        return "cpu"
    if backend == "cupy":
        if device == "cpu":
            raise SystemExit("gradclip bench: --backend cupy runs on a GPU only")
        if _cuda_devices() == 0:
            raise SystemExit("gradclip bench: --backend cupy needs a CUDA device; none found")
        return "gpu"
    if device == "cpu":  # asked for: JAX's backends are not even started here
        return "cpu"
    sees = _torch_cuda() if backend == "torch" else _jax_gpu()
    if device == "gpu" and not sees:
        if backend == "torch":
            what = "torch.cuda.is_available() is False"
        else:
            what = "jax.default_backend() is not a GPU"
        raise SystemExit(f"gradclip bench: --backend {backend} --device gpu: {what}")
    return "gpu" if sees else "cpu"


# ------------------------------------------------------------------------ trees


def _build(
    name: str, make: Callable[[tuple[int, ...]], Any], size_factor: int, *, gpu: bool = False
) -> Tree:
    """The tree ``name`` with ``make(shape)`` as each leaf, sizes divided by ``size_factor``."""
    if name not in ALL_TREES:
        raise ValueError(f"unknown tree {name!r}; choose from {', '.join(ALL_TREES)}")
    if name == "dp":
        # The llm tree's structure scaled down, a batch of examples on axis 0;
        # the same on a GPU (see the module's docstring).
        factor = size_factor * EXAMPLE_SIZE_FACTOR
        return _build("llm", lambda shape: make((EXAMPLE_BATCH, *shape)), factor)
    if name == "llm":
        # CPU: a 12-block transformer with d=512 and a 32000-token embedding
        # (54.2M elements). GPU: a 1B-parameter model, 18 blocks with d=2048
        # and GPT-2's 50257-token vocabulary padded to 50304 (1.009e9 elements).
        d, vocab, blocks = (2048, 50304, 18) if gpu else (512, 32000, 12)
        d, vocab = max(1, d // size_factor), max(1, vocab // size_factor)

        def norm() -> dict[str, Any]:
            return {"weight": make((d,)), "bias": make((d,))}

        def block() -> dict[str, Any]:
            return {
                "attn": {
                    "qkv_weight": make((d, 3 * d)),
                    "qkv_bias": make((3 * d,)),
                    "out_weight": make((d, d)),
                    "out_bias": make((d,)),
                },
                "mlp": {
                    "fc1_weight": make((d, 4 * d)),
                    "fc1_bias": make((4 * d,)),
                    "fc2_weight": make((4 * d, d)),
                    "fc2_bias": make((d,)),
                },
                "ln1": norm(),
                "ln2": norm(),
            }

        return {"embed": make((vocab, d)), "blocks": [block() for _ in range(blocks)]}
    if name == "huge":
        return {"weight": make((max(1, (2**30 if gpu else 2**26) // size_factor),))}
    sizes = np.random.default_rng(SEED + 1).integers(16, 2048, size=2000, endpoint=True)
    return [make((max(1, int(s) // size_factor),)) for s in sizes]


def take_turns(
    rows: dict[str, tuple[Callable[[], Any], Callable[[], Any]]], turns: int
) -> dict[str, list[float]]:
    """Seconds per call of each row's ``(prepare, call)``, the rows taking turns.

    Each turn starts from the next row (no row always follows another) and
    runs every row's ``prepare`` untimed (fresh gradients, say), then its
    timed ``call``. For the scripts in ``benchmarks/``.
    """
    names = list(rows)
    times: dict[str, list[float]] = {k: [] for k in names}
    for turn in range(turns):
        first = turn % len(names)
        for k in names[first:] + names[:first]:
            prepare, call = rows[k]
            prepare()
            start = time.perf_counter()
            call()
            times[k].append(time.perf_counter() - start)
    return times


def torch_params(grads: list[Any]) -> list[Any]:
    """Parameters whose ``.grad`` are ``grads`` (for the drop-in's scripts)."""
    torch = _torch()
    params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    return params


def torch_turn(
    params: list[Any], src: list[Any], call: Callable[[list[Any]], Any]
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """A :func:`take_turns` row: ``src`` copied into the ``.grad``, then ``call(params)``."""
    grads = [p.grad for p in params]
    return (lambda: _torch()._foreach_copy_(grads, src)), (lambda: call(params))


def tree_sizes(name: str, size_factor: int = 1, *, gpu: bool = False) -> Tree:
    """The element count of every leaf of a benchmark tree, without allocating it.

    Parameters
    ----------
    name : {"llm", "huge", "small", "dp"}
        Which tree. ``dp``: the ``llm`` tree's structure with every dimension
        divided by 16, each leaf with a batch of 256 examples on axis 0
        (per-example clipping; the same size on a GPU).
    size_factor : int, default 1
        Every dimension (``small``: every leaf size; ``dp``: every dimension
        but the batch) is divided by this, at least 1 remaining; the tests
        use it to shrink the trees.
    gpu : bool, default False
        The trees of a GPU run (any backend): ``llm`` has 217 leaves and
        1.009e9 elements (18 blocks, d=2048, a 50304-token embedding) and
        ``huge`` 2**30 elements; ``small`` and ``dp`` are the same on both.

    Returns
    -------
    pytree of int
        The tree's structure with each leaf's size in its place.
    """
    return _build(name, math.prod, size_factor, gpu=gpu)


def make_tree(name: str, size_factor: int = 1, seed: int = SEED) -> Tree:
    """A benchmark tree of float32 N(0, 1) values from a fixed-seed generator.

    The CPU runs' trees, on the host (and the dp tree of every run); a GPU
    run draws its larger trees on the device instead (see :func:`tree_sizes`
    with ``gpu=True``).

    Parameters
    ----------
    name : {"llm", "huge", "small", "dp"}
        ``llm``: 145 leaves, 54.2M elements shaped like a 12-block transformer;
        ``huge``: one 2**26-element leaf; ``small``: 2000 leaves of 16 to 2048
        elements; ``dp``: 256 examples of a scaled-down ``llm`` tree, batch on
        axis 0, 55.4M elements (see :func:`_spread_examples`).
    size_factor : int, default 1
        As for :func:`tree_sizes`.
    seed : int, default 0
        Seed of the NumPy generator.

    Returns
    -------
    pytree of numpy.ndarray
        Its global norm is about the square root of its size, far above 1
        (``dp``: each example's norm is between e**-1 and e, half above 1).
    """
    rng = np.random.default_rng(seed)
    tree = _build(name, lambda shape: rng.standard_normal(shape, dtype=np.float32), size_factor)
    if name in EXAMPLE_TREES:
        _spread_examples(optree.tree_leaves(tree), rng)
    return tree


def _spread_examples(leaves: list[np.ndarray], rng: np.random.Generator) -> None:
    """Scale each example (axis 0) in place to a norm of its own, half of them above 1.

    The norms are ``exp(t)`` for ``t`` spaced evenly over
    ``[-EXAMPLE_SPREAD, EXAMPLE_SPREAD]``, in a shuffled order: with an even
    batch the middle two lie either side of 1, 0.8% apart, so ``max_norm`` 1
    clips exactly half the examples, with no example near enough to the bound
    for a float32 norm to disagree with a float64 one about it.
    """
    batch = leaves[0].shape[0]
    want = np.exp(np.linspace(-EXAMPLE_SPREAD, EXAMPLE_SPREAD, batch))
    factor = rng.permutation(want) / _example_norms(leaves, batch)
    for x in leaves:
        x *= factor.astype(np.float32).reshape((batch,) + (1,) * (x.ndim - 1))


def _squares(leaves: Iterable[np.ndarray]) -> float:
    """The sum of squares of every entry, in float64."""
    total = 0.0
    for x in leaves:
        flat = x.reshape(-1)
        for start in range(0, flat.size, _CHECK_CHUNK):
            piece = flat[start : start + _CHECK_CHUNK].astype(np.float64)
            total += float(np.dot(piece, piece))
    return total


def _norm(leaves: Iterable[np.ndarray]) -> float:
    """The global 2-norm in float64, the reference a row's result is checked against."""
    return math.sqrt(_squares(leaves))


def _rows(x: np.ndarray, batch: int) -> Iterator[tuple[slice, np.ndarray]]:
    """``x`` as ``(batch, -1)`` rows, a group of rows at a time, widened to float64."""
    rows = x.reshape(batch, -1)
    step = max(1, _CHECK_CHUNK // max(1, rows.shape[1]))
    for start in range(0, batch, step):
        where = slice(start, start + step)
        yield where, rows[where].astype(np.float64)


def _example_norms(leaves: Iterable[np.ndarray], batch: int) -> np.ndarray:
    """Each example's 2-norm across all leaves (batch on axis 0), in float64."""
    total = np.zeros(batch)
    for x in leaves:
        for where, piece in _rows(x, batch):
            total[where] += np.einsum("ij,ij->i", piece, piece)
    return np.sqrt(total)


def _example_sums(leaves: Iterable[np.ndarray], factor: np.ndarray) -> list[np.ndarray]:
    """``sum_i factor[i] * leaf[i]`` for every leaf, in float64 (the per-example reference)."""
    batch = factor.shape[0]
    out = []
    for x in leaves:
        total = np.zeros(x.shape[1:]).reshape(-1)
        for where, piece in _rows(x, batch):
            total += factor[where] @ piece
        out.append(total.reshape(x.shape[1:]))
    return out


@functools.cache
def _sumsq(out: str) -> Any:
    """A CuPy sum of squares over a whole array in one read pass, accumulated in ``out``.

    ``cupy.dot`` of two vectors is no read pass: with CuPy's default CUB
    accelerator it computes ``(a * b).sum()``, writing and re-reading a
    temporary the size of its input. A ReductionKernel maps each element on
    the fly (and CuPy runs it through CUB's block reduction when it can).
    """
    ctype = {"float32": "float", "float64": "double"}[out]
    # Named x and y, not in0 and out0: CuPy 14's CUB path gives a kernel
    # with other names its input and output types (type_in0_raw,
    # type_out0_raw), which it leaves out for in0/out0. It renames them by
    # plain text replacement, so neither letter may appear elsewhere below.
    return _load("cupy").ReductionKernel(
        "T x",
        f"{out} y",
        f"static_cast<{ctype}>(x) * static_cast<{ctype}>(x)",
        "a + b",
        "y = a",
        "0",
        f"gradclip_bench_sumsq_{out}",
    )


def _device_norm(leaves: Iterable[Any]) -> float:
    """:func:`_norm` for CuPy arrays, on the device: float64 sums, one host sync at the end."""
    total: Any = None
    for x in leaves:
        flat = x.reshape(-1)
        for start in range(0, flat.size, _GPU_CHUNK):
            part = _sumsq("float64")(flat[start : start + _GPU_CHUNK])
            total = part if total is None else total + part
    return 0.0 if total is None else math.sqrt(float(total))


def _torch_norm(leaves: Iterable[Any]) -> float:
    """:func:`_norm` for torch tensors, on their device: float64 sums, one host sync at the end.

    Widened to float64 ``_GPU_CHUNK`` elements at a time (512 MiB), so a
    1B-element leaf never needs a float64 copy of itself.
    """
    torch = _torch()
    total: Any = None
    for x in leaves:
        flat = x.reshape(-1)
        for start in range(0, flat.numel(), _GPU_CHUNK):
            piece = flat[start : start + _GPU_CHUNK].to(torch.float64)
            part = torch.dot(piece, piece)
            total = part if total is None else total + part
    return 0.0 if total is None else math.sqrt(float(total))


@functools.cache
def _jax_partials() -> Any:
    """A jitted function: the float32 sums of squares of a leaf's rows of ``_ROW`` elements.

    JAX computes in float32 unless x64 is switched on (a process-wide flag
    the harness leaves alone), so the reference norm of a JAX tree is built
    from many short float32 sums, each exact to about 1e-7, added on the
    host in float64: as good as a float64 sum for the check. One compile per
    leaf shape (the big leaves only: see ``_HOST_LEAF``).
    """
    jax, jnp = _load("jax"), _load("jax.numpy")

    def partials(x: Any) -> Any:
        flat = x.reshape(-1).astype(jnp.float32)
        n = flat.shape[0]
        whole = n - n % _ROW
        parts = [jnp.sum(jnp.square(flat[:whole].reshape(-1, _ROW)), axis=1)] if whole else []
        if whole < n:
            parts.append(jnp.sum(jnp.square(flat[whole:]), keepdims=True))
        return jnp.concatenate(parts)

    return jax.jit(partials)


def _jax_norm(leaves: Iterable[Any]) -> float:
    """:func:`_norm` for JAX arrays: big leaves summed on the device, small ones on the host.

    Leaves of at most ``_HOST_LEAF`` elements are read back (one batched
    transfer) and summed by :func:`_squares`; each bigger one is reduced on
    the device to ``size / _ROW`` float32 partial sums (:func:`_jax_partials`),
    which come back and are added in float64. Nothing big reaches the host.
    """
    jax = _load("jax")
    leaves = list(leaves)
    small = [x for x in leaves if math.prod(x.shape) <= _HOST_LEAF]
    total = _squares(np.asarray(x) for x in jax.device_get(small))
    partials = _jax_partials()
    for x in leaves:
        if math.prod(x.shape) > _HOST_LEAF:
            total += float(np.sum(np.asarray(partials(x), dtype=np.float64)))
    return math.sqrt(total)


@dataclass(frozen=True)
class _Shape:
    """A leaf's shape held whole: a tuple in its place would be a pytree node."""

    shape: tuple[int, ...]


def _device_source(size: int, dtype: Any) -> Any:
    """``size`` N(0, 1) values drawn on the GPU by ``cupy.random`` with a fixed seed.

    Drawn as float32 in chunks of ``_GPU_CHUNK`` (the generator has no
    bfloat16, and a 1B-element float32 temporary would cost 4 GiB) and
    rounded into ``dtype``: the bfloat16 trees are the float32 ones, rounded.
    """
    cp = _load("cupy")
    source = cp.empty(size, dtype=dtype)
    rng = cp.random.default_rng(SEED)
    for start in range(0, size, _GPU_CHUNK):
        piece = rng.standard_normal(min(_GPU_CHUNK, size - start), dtype=cp.float32)
        # "unsafe": float32 -> bfloat16 rounds, on purpose (older ml_dtypes
        # also refuse that cast as "same_kind").
        cp.copyto(source[start : start + piece.size], piece, casting="unsafe")
    return source


def _torch_source(size: int, dtype: Any) -> Any:
    """:func:`_device_source` for torch: a seeded ``torch.Generator`` on the GPU."""
    torch = _torch()
    device = _torch_gpu()
    source = torch.empty(size, dtype=dtype, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(SEED)
    for start in range(0, size, _GPU_CHUNK):
        n = min(_GPU_CHUNK, size - start)
        piece = torch.randn(n, generator=gen, device=device, dtype=torch.float32)
        source[start : start + n].copy_(piece)  # rounds into bfloat16 where asked
    return source


def _cupy_put(host: np.ndarray) -> Any:
    return _load("cupy").asarray(host)


def _torch_put(host: np.ndarray) -> Any:
    return _torch().from_numpy(host).to(_torch_gpu())


@functools.cache
def _jax_normal() -> Any:
    """A jitted ``normal(key, shape, dtype)``: N(0, 1) drawn as float32, rounded into ``dtype``."""
    jax, jnp = _load("jax"), _load("jax.numpy")

    def normal(key: Any, shape: tuple[int, ...], dtype: Any) -> Any:
        return jax.random.normal(key, shape, jnp.float32).astype(dtype)

    return jax.jit(normal, static_argnums=(1, 2))


# ------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class _Arrays:
    """How one array library holds the benchmark's data on one device."""

    pristine: Callable[[Any], Any]  # the read-only source (a view where possible)
    new: Callable[[Any], Any]  # a writable copy
    copy: Callable[[Any, Any], Any]  # copy(dst, src), in place
    sync: Callable[[], Any]  # wait for the device
    host: Callable[[Any], Any]  # what the result check reads: NumPy, or the GPU's arrays
    numpy: Callable[[Any], np.ndarray] = np.asarray  # a small result (dp's sums), on the host


def _is_bfloat16(dtype: Any) -> bool:
    return getattr(dtype, "name", None) == "bfloat16"


def _torch_from_numpy(h: np.ndarray) -> Any:
    """``torch.from_numpy``, also for ml_dtypes' bfloat16 (through its bits: zero-copy)."""
    torch = _torch()
    if _is_bfloat16(h.dtype):
        return torch.from_numpy(h.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(h)


def _torch_numpy(t: Any) -> np.ndarray:
    """A tensor as NumPy on the host; bfloat16 as ml_dtypes' bfloat16, through its bits."""
    torch = _torch()
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return np.asarray(t.view(torch.int16).numpy().view(_load("ml_dtypes").bfloat16))
    return np.asarray(t.numpy())


def _numpy_arrays() -> _Arrays:
    return _Arrays(lambda h: h, np.copy, np.copyto, lambda: None, np.asarray)


def _torch_arrays() -> _Arrays:
    """The CPU backends' torch tensors, over the NumPy source's memory."""
    return _Arrays(
        _torch_from_numpy,
        lambda h: _torch_from_numpy(h.copy()),
        lambda dst, src: dst.copy_(src),
        lambda: None,
        _torch_numpy,
        _torch_numpy,
    )


def _torch_gpu_arrays() -> _Arrays:
    """Tensors born on the GPU (torch): the GPU trees never pass through the host."""
    return _Arrays(
        lambda x: x,
        lambda x: x.clone(),
        lambda dst, src: dst.copy_(src),
        lambda: _torch_sync(),
        lambda x: x,  # checked on the device (_torch_norm)
        _torch_numpy,
    )


def _cupy_arrays() -> _Arrays:
    """CuPy arrays born on the device: the GPU trees never pass through the host."""
    cp = _load("cupy")
    return _Arrays(
        lambda x: x,
        lambda x: x.copy(),
        cp.copyto,
        cp.cuda.runtime.deviceSynchronize,  # every stream: torch's too
        lambda x: x,  # checked on the device (_device_norm)
        cp.asnumpy,
    )


def _memcpy(dst: Any, src: Any) -> None:
    """A device-to-device ``cudaMemcpyAsync`` of ``src`` into ``dst`` on CuPy's current stream."""
    dst.data.copy_from_device_async(src.data, src.nbytes)


def _release_gpu(backend: str) -> None:
    """Hand the memory a tree held back to the device (CuPy's pool, torch's cache).

    A JAX run frees its arrays when they are dropped; its allocator keeps the
    memory it preallocated.
    """
    if backend == "cupy":
        _load("cupy").get_default_memory_pool().free_all_blocks()
    elif backend == "torch" and "cupy" in sys.modules:
        # gradclip's torch fast path launches CuPy kernels on the tensors;
        # what they allocated sits in CuPy's pool. Best effort: freeing an
        # idle pool cannot lose a result.
        with contextlib.suppress(Exception):
            sys.modules["cupy"].get_default_memory_pool().free_all_blocks()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@dataclass
class _Examples:
    """The dp tree's per-example facts, and the float64 reference its rows are checked against."""

    leaves: list[np.ndarray]
    norms: np.ndarray  # each example's norm, float64
    _expected: dict[float, tuple[list[np.ndarray], int]] = field(default_factory=dict)

    def expected(self, max_norm: float) -> tuple[list[np.ndarray], int]:
        """The clipped sum of every leaf (float64) and the number of examples clipped."""
        if max_norm not in self._expected:
            factor = np.minimum(1.0, max_norm / (self.norms + EXAMPLE_EPS))
            count = int(np.count_nonzero(factor < 1))
            self._expected[max_norm] = _example_sums(self.leaves, factor), count
        return self._expected[max_norm]

    def check(self, sums: list[Any], count: Any, max_norm: float) -> dict[str, Any]:
        """A per-example row's result fields: its sum against the reference, and its count.

        ``norm_after`` is the norm of the row's sum and ``norm_error`` its
        distance from the reference sum, relative to the reference's norm.
        """
        want, want_count = self.expected(max_norm)
        diff = ref = after = 0.0
        for got, w in zip(sums, want, strict=True):
            g = np.asarray(got, dtype=np.float64)
            diff += float(np.sum(np.square(g - w)))
            ref += float(np.sum(np.square(w)))
            after += float(np.sum(np.square(g)))
        error = math.sqrt(diff / ref) if ref else math.sqrt(diff)
        count = int(count)
        return {
            "norm_after": math.sqrt(after),
            "norm_error": error,
            "check_ok": error <= _EXAMPLE_TOL and count == want_count,
            "reference_norm": math.sqrt(ref),
            "num_clipped": count,
            "num_clipped_expected": want_count,
        }


@dataclass
class _Data:
    """One benchmark tree: its pristine leaves and their float64 norm.

    On the CPU the leaves are NumPy arrays. On a GPU (``device``) they are
    the backend's arrays there: CuPy or torch views into ``source``, one flat
    buffer drawn on the device, or JAX arrays with a flat ``source`` of their
    own (``flat_norm``); ``measure`` (the result check) runs there. The dp
    tree has ``examples`` too, on the host.
    """

    name: str
    tree: Tree
    leaves: list[Any]
    norm: float
    source: Any = None
    measure: Callable[[list[Any]], float] = _norm
    examples: _Examples | None = None
    device: bool = False  # the leaves live on a GPU, and measure reads them there
    flat_norm: float | None = None  # the norm of flat(); None: the leaves' norm

    def __post_init__(self) -> None:
        if self.flat_norm is None:
            self.flat_norm = self.norm

    def flat(self) -> Any:
        """All leaves in one contiguous buffer (for the floor and the read pass)."""
        if self.source is not None:
            return self.source
        return np.concatenate([x.reshape(-1) for x in self.leaves])

    @property
    def nbytes(self) -> int:
        return sum(int(x.nbytes) for x in self.leaves)


def _host_data(name: str, size_factor: int, dtype: Any = np.float32) -> _Data:
    """A CPU run's tree: :func:`make_tree`'s NumPy arrays, rounded into ``dtype``."""
    tree = make_tree(name, size_factor)
    if np.dtype(dtype) != np.float32:
        tree = optree.tree_map(lambda x: x.astype(dtype), tree)
    leaves: list[np.ndarray] = optree.tree_leaves(tree)
    return _Data(name, tree, leaves, _norm(leaves))


def _example_data(name: str, size_factor: int) -> _Data:
    """The dp tree (per-example clipping), on the host, with its per-example reference."""
    data = _host_data(name, size_factor)
    data.examples = _Examples(data.leaves, _example_norms(data.leaves, EXAMPLE_BATCH))
    return data


def _views(source: Any, shapes: Sequence[tuple[int, ...]]) -> list[Any]:
    """Consecutive views into a flat CuPy array or torch tensor, one per shape."""
    leaves, start = [], 0
    for shape in shapes:
        n = math.prod(shape)
        leaves.append(source[start : start + n].reshape(shape))
        start += n
    return leaves


def _device_data(
    name: str,
    size_factor: int,
    dtype: Any,
    draw: Callable[[int, Any], Any] = _device_source,
    measure: Callable[[list[Any]], float] = _device_norm,
) -> _Data:
    """A GPU tree: views, in flattening order, into one buffer drawn on the device.

    CuPy's by default; torch's with ``draw=_torch_source, measure=_torch_norm``.
    """
    shapes, spec = optree.tree_flatten(_build(name, _Shape, size_factor, gpu=True))
    source = draw(sum(math.prod(s.shape) for s in shapes), dtype)
    leaves = _views(source, [s.shape for s in shapes])
    tree = optree.tree_unflatten(spec, leaves)
    return _Data(name, tree, leaves, measure([source]), source, measure, device=True)


def _jax_data(name: str, size_factor: int, dtype: Any, device: Any) -> _Data:
    """A GPU tree of JAX arrays on ``device``, and a flat buffer of the same size beside it.

    A leaf of more than ``_HOST_LEAF`` elements is drawn there by
    ``jax.random`` (a key folded from the seed and the leaf's index), the
    smaller ones on the host from a seeded NumPy generator and put there in
    one transfer. The flat buffer (the floor's, the copy's and the read
    pass's) is drawn there too, whole: the leaves cannot be views of it.
    """
    jax = _load("jax")
    shapes, spec = optree.tree_flatten(_build(name, _Shape, size_factor, gpu=True))
    kind = np.dtype(dtype)
    normal = _jax_normal()
    key = jax.random.key(SEED)
    rng = np.random.default_rng(SEED)
    leaves: list[Any] = [None] * len(shapes)
    host: dict[int, np.ndarray] = {}
    with jax.default_device(device):
        for i, s in enumerate(shapes):
            if math.prod(s.shape) > _HOST_LEAF:
                leaves[i] = normal(jax.random.fold_in(key, i), s.shape, kind)
            else:
                host[i] = rng.standard_normal(s.shape, dtype=np.float32).astype(kind)
        total = sum(math.prod(s.shape) for s in shapes)
        source = normal(jax.random.fold_in(key, len(shapes)), (total,), kind)
    for i, x in zip(host, jax.device_put(list(host.values()), device), strict=True):
        leaves[i] = x
    jax.block_until_ready((leaves, source))
    tree = optree.tree_unflatten(spec, leaves)
    return _Data(
        name,
        tree,
        leaves,
        _jax_norm(leaves),
        source,
        _jax_norm,
        device=True,
        flat_norm=_jax_norm([source]),
    )


@dataclass(frozen=True)
class _Timed:
    """A row ready to time: ``fresh`` untimed, then ``call`` and ``done`` timed."""

    fresh: Callable[[], None]  # fresh gradients into the buffers; the device idle after
    call: Callable[[], Any]  # the work being timed
    done: Callable[[Any], Any]  # wait for ``call``'s result (devices run asynchronously)
    result: Callable[[Any], list[Any]]  # what ``call`` produced, for _Data.measure
    # JAX rows: trace, lower and compile ``call``'s program ahead of time,
    # returning (seconds to trace and lower, seconds in all); see _measure_compile.
    # gradclip.jax's row has no lowering of its own to time: (None, first call).
    compile: Callable[[], tuple[float | None, float]] | None = None
    # Per-example rows: the result check's fields from ``call``'s output
    # (_Examples.check), in place of the norm check of ``result``.
    check: Callable[[Any], dict[str, Any]] | None = None
    # The norm ``result`` had before the call, where it is not the tree's
    # (a row over JAX's flat buffer, a draw of its own: _Data.flat_norm).
    reference: float | None = None


def _in_place(
    arrays: _Arrays, sources: list[Any], setup: Callable[[list[Any]], Callable[[], Any]]
) -> _Timed:
    """A row that modifies its own copies of ``sources``.

    ``setup(buffers)`` runs once, untimed, and returns the call to time.
    """
    src = [arrays.pristine(h) for h in sources]
    bufs = [arrays.new(h) for h in sources]

    def fresh() -> None:
        for dst, s in zip(bufs, src, strict=True):
            arrays.copy(dst, s)
        arrays.sync()

    return _Timed(
        fresh, setup(bufs), lambda _: arrays.sync(), lambda _: [arrays.host(b) for b in bufs]
    )


def _gradclip_jax(grads: Tree, max_norm: Any) -> Any:
    return gc.clip_by_global_norm(grads, max_norm)[0]


def _gcjax(grads: Tree, max_norm: Any) -> Any:
    """gradclip.jax's own program, donated: compiled with :func:`gradclip.jax.compiler_options`."""
    return _load("gradclip.jax").clip_by_global_norm(grads, max_norm, donate=True)[0]


def _optax_jax(grads: Tree, max_norm: Any) -> Any:
    tx = _load("optax").clip_by_global_norm(max_norm)
    return tx.update(grads, tx.init(grads))[0]


def _per_leaf_jax(grads: Tree, scale: Any) -> Any:
    """Every leaf times a scale known in advance: the least any jitted clip of a tree costs.

    Whatever its norm, a jitted clip that returns a new tree runs one XLA
    kernel per leaf to write it. On a CPU each kernel costs microseconds to
    launch, and each distinct leaf shape milliseconds to compile (identical
    kernels are compiled once), so on the ``small`` tree this row, not the
    bandwidth floor, bounds what gradclip and optax can reach.
    """
    return _load("jax").tree.map(lambda g: g * scale, grads)


def _floor_jax(buf: Any, max_norm: Any) -> Any:
    """JAX's floor on a GPU: a sum of squares, then a multiply, over one flat buffer.

    Accumulated in float32 (bfloat16 widened on the fly); the scale is cast
    to the buffer's dtype, as CuPy's floor does.
    """
    jnp = _load("jax.numpy")
    sq = jnp.sum(jnp.square(buf.astype(jnp.float32)))
    scale = jnp.minimum(1.0, max_norm / (jnp.sqrt(sq) + EPS))
    return buf * scale.astype(buf.dtype)


@functools.cache
def _jitted(fn: Callable[[Tree, Any], Any]) -> Any:
    # One jitted function per row, shared by the clip and no-clip cases:
    # max_norm is an argument, not a constant, so XLA compiles once per tree
    # (on the CPU that takes minutes for the 2000-leaf tree).
    return _load("jax").jit(fn, donate_argnums=0)


@functools.cache
def _jax_copy() -> Any:
    """A jitted copy: XLA must give its output a buffer of its own (the input is not donated)."""
    jax, jnp = _load("jax"), _load("jax.numpy")
    return jax.jit(jnp.copy)


@functools.cache
def _jax_sumsq() -> Any:
    """A jitted sum of squares in float32: one read pass over a flat buffer."""
    jax, jnp = _load("jax"), _load("jax.numpy")
    return jax.jit(lambda x: jnp.sum(jnp.square(x.astype(jnp.float32))))


def _jax_checked(data: _Data) -> Callable[[Any], Any]:
    """How a JAX row's output reaches ``data.measure``: as it is on a GPU, else as NumPy."""
    return (lambda x: x) if data.device else np.asarray


def _jax_row(
    ctx: _Context,
    data: _Data,
    fn: Callable[[Tree, Any], Any],
    max_norm: float,
    *,
    flat: bool = False,
    own_jit: bool = False,
) -> _Timed:
    """``fn(grads, max_norm)`` under ``jax.jit``, the grads donated and fresh every call.

    The grads are ``data.tree``, or with ``flat`` the flat buffer, copied
    onto the row's device (``jax.device_put(..., may_alias=False)``: from
    the host on a CPU, device to device on a GPU) before every call.
    ``own_jit``: ``fn`` compiles itself and donates (gradclip.jax); its
    compile is timed as its first call, which also runs the step once.
    """
    jax = _load("jax")
    jitted: Any = fn if own_jit else _jitted(fn)
    device = _jax_device(ctx.gpu)
    source = data.flat() if flat else data.tree  # concatenated once, not per call
    pending: list[Tree] = [None]

    def fresh() -> None:
        # may_alias=False: a donated input must never share the pristine memory.
        pending[0] = jax.device_put(source, device, may_alias=False)
        jax.block_until_ready(pending[0])

    def call() -> Any:
        grads, pending[0] = pending[0], None  # donated: hold no reference to it
        return jitted(grads, max_norm)

    def compile_() -> tuple[float | None, float]:
        fresh()
        start = time.perf_counter()
        if own_jit:  # no jitted function to lower: gradclip.jax builds it inside
            jax.block_until_ready(call())
            return None, time.perf_counter() - start
        # Lowered from the very arrays the timed calls get (the same avals,
        # weak types and placement), so the executable built here is the one
        # jax.jit's cache hands the first call: nothing is compiled twice.
        lowered = jitted.lower(pending[0], max_norm)
        traced = time.perf_counter()
        lowered.compile()
        end = time.perf_counter()
        pending[0] = None  # fresh() refills it before the first call
        return traced - start, end - start

    checked = _jax_checked(data)
    return _Timed(
        fresh,
        call,
        jax.block_until_ready,
        lambda out: [checked(x) for x in optree.tree_leaves(out)],
        compile_,
        reference=data.flat_norm if flat else None,
    )


def _jax_kept_row(ctx: _Context, data: _Data, fn: Any, result: Callable[[Any], Any]) -> _Timed:
    """``fn(flat)`` jitted over the flat buffer, put on the row's device once (not donated)."""
    jax = _load("jax")
    src = jax.block_until_ready(jax.device_put(data.flat(), _jax_device(ctx.gpu)))
    checked = _jax_checked(data)
    return _Timed(
        lambda: None,
        lambda: fn(src),
        jax.block_until_ready,
        lambda out: [checked(result(out))],
        reference=data.flat_norm,
    )


@dataclass(frozen=True)
class _Context:
    backend: str
    arrays: _Arrays | None  # the backend's arrays; None for jax (immutable)
    anchor: _Arrays | None  # where the torch rows run; None without a usable torch
    gpu: bool  # the GPU trees, on a GPU (cupy always; torch and jax by --device)


def _gradclip_row(ctx: _Context, data: _Data, max_norm: float) -> _Timed:
    if ctx.arrays is None:  # jax: functional, jitted, the input donated
        return _jax_row(ctx, data, _gradclip_jax, max_norm)
    structure = optree.tree_structure(data.tree)

    def setup(bufs: list[Any]) -> Callable[[], Any]:
        grads = optree.tree_unflatten(structure, bufs)  # the tree a user holds
        return lambda: gc.clip_by_global_norm_(grads, max_norm)

    return _in_place(ctx.arrays, data.leaves, setup)


def _flattree_row(ctx: _Context, data: _Data, max_norm: float) -> _Timed:
    arrays = ctx.arrays
    assert arrays is not None  # planned for in-place backends only
    pristine = optree.tree_map(arrays.pristine, data.tree)
    flat = gc.FlatTree.from_tree(pristine)
    if ctx.gpu:
        # Refilled leaf by leaf through the FlatTree's views, straight from
        # the pristine tree: a second FlatTree as the source would cost
        # another copy of a 1B-element tree in device memory.
        views: list[Any] = optree.tree_leaves(flat.tree)
        pairs = list(zip(views, data.leaves, strict=True))
    else:
        src = gc.FlatTree.from_tree(pristine)
        pairs = [(buf, src.buffers[dtype]) for dtype, buf in flat.buffers.items()]

    def fresh() -> None:
        for dst, s in pairs:
            arrays.copy(dst, s)
        arrays.sync()

    return _Timed(
        fresh,
        lambda: gc.clip_by_global_norm_(flat, max_norm),
        lambda _: arrays.sync(),
        lambda _: [arrays.host(b) for b in flat.buffers.values()],
    )


def _params_row(
    arrays: _Arrays, data: _Data, clip: Callable[[list[Any]], Any], *, alias: bool = False
) -> _Timed:
    """A row calling ``clip(parameters)``, whose ``.grad`` are the fresh gradients.

    With ``alias`` (on a GPU) each parameter's data is its gradient's memory:
    clip_grad_norm_ reads and writes only ``.grad``, and a parameter of its
    own would hold another copy of a 1B-element tree on the device.
    """
    torch = _torch()

    def setup(grads: list[Any]) -> Callable[[], Any]:
        # clip_grad_norm_ clips parameters' .grad (torch silently ignores
        # plain tensors), so the fresh gradients become these parameters' .grad.
        params = [torch.nn.Parameter(g if alias else torch.empty_like(g)) for g in grads]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        return lambda: clip(params)

    return _in_place(arrays, data.leaves, setup)


def _torch_row(ctx: _Context, data: _Data, max_norm: float) -> _Timed:
    assert ctx.anchor is not None
    torch = _torch()
    if ctx.backend == "cupy":
        return _in_place(ctx.anchor, data.leaves, _torch_dlpack_setup(max_norm))
    return _params_row(
        ctx.anchor,
        data,
        lambda ps: torch.nn.utils.clip_grad_norm_(ps, max_norm, foreach=True),
        alias=ctx.gpu,
    )


def _dropin_row(ctx: _Context, data: _Data, max_norm: float) -> _Timed:
    assert ctx.arrays is not None  # the torch backend's tensors
    clip_grad_norm_ = importlib.import_module("gradclip.torch").clip_grad_norm_
    return _params_row(ctx.arrays, data, lambda ps: clip_grad_norm_(ps, max_norm), alias=ctx.gpu)


def _torch_dlpack_setup(max_norm: float) -> Callable[[list[Any]], Callable[[], Any]]:
    """The torch row's setup under CuPy: the very CuPy buffers, zero-copy through DLPack."""
    torch = _torch()

    def setup(bufs: list[Any]) -> Callable[[], Any]:
        params = []
        for buf in bufs:
            # The parameter's data aliases its gradient: clip_grad_norm_ reads
            # and writes only .grad, and a separate torch.empty_like would
            # hold another copy of the whole tree on the device.
            p = torch.nn.Parameter(torch.from_dlpack(buf))
            p.grad = torch.from_dlpack(buf)
            params.append(p)
        return lambda: torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    return setup


def _gcjax_row(ctx: _Context, data: _Data, max_norm: float) -> _Timed:
    return _jax_row(ctx, data, _gcjax, max_norm, own_jit=True)


def _optax_row(ctx: _Context, data: _Data, max_norm: float) -> _Timed:
    return _jax_row(ctx, data, _optax_jax, max_norm)


def _per_leaf_row(ctx: _Context, data: _Data, max_norm: float) -> _Timed:
    # The scale a clip would find, taken from the tree's reference norm on
    # the host: the row writes what a clip writes, with no norm to compute.
    return _jax_row(ctx, data, _per_leaf_jax, min(1.0, max_norm / (data.norm + EPS)))


def _naive_row(ctx: _Context, data: _Data, max_norm: float) -> _Timed:
    if ctx.gpu:
        assert ctx.arrays is not None
        naive_gpu = _naive_torch if ctx.backend == "torch" else _naive_cupy
        return _in_place(ctx.arrays, data.leaves, lambda bufs: lambda: naive_gpu(bufs, max_norm))

    def naive(leaves: list[np.ndarray]) -> None:
        # What a researcher writes: a sum of squares, then scale every leaf.
        # The sums are float32 (float32 leaves: NumPy's own choice), so that
        # bfloat16 leaves are not summed in bfloat16.
        norm = np.sqrt(sum(np.sum(g * g, dtype=np.float32) for g in leaves))
        scale = min(1.0, max_norm / (norm + EPS))
        for g in leaves:
            g *= scale

    return _in_place(_numpy_arrays(), data.leaves, lambda bufs: lambda: naive(bufs))


def _naive_cupy(grads: list[Any], max_norm: float) -> None:
    """What a CuPy user writes: a reduction per leaf, then a multiply per leaf.

    The scale stays a 0-d device array, so nothing waits for the GPU. The
    sums are float32 (for float32 leaves that is CuPy's own choice), so that
    bfloat16 leaves are not summed in bfloat16; the scale is cast to the
    leaf's dtype (no copy for float32), as CuPy will not write a float32
    product into a bfloat16 array in place with every ml_dtypes.
    """
    cp = _load("cupy")
    norm = cp.sqrt(sum(cp.sum(g * g, dtype=cp.float32) for g in grads))
    scale = cp.minimum(max_norm / (norm + EPS), 1.0)
    for g in grads:
        g *= scale.astype(g.dtype, copy=False)


def _naive_torch(grads: list[Any], max_norm: float) -> None:
    """:func:`_naive_cupy` in torch: what a torch user writes without ``clip_grad_norm_``."""
    torch = _torch()
    norm = torch.sqrt(sum(torch.sum(g * g, dtype=torch.float32) for g in grads))
    scale = (max_norm / (norm + EPS)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))


def _flat_kernel(ctx: _Context, max_norm: float, write: bool) -> tuple[_Arrays, Callable[..., Any]]:
    """The dot, and with ``write`` the in-place scaling, over one buffer on the anchor device."""
    if ctx.gpu and ctx.backend == "cupy":
        cp = _load("cupy")
        assert ctx.arrays is not None

        def gpu(buf: Any) -> Any:
            sq = _sumsq("float32")(buf)  # one read pass, unlike cupy.dot (see _sumsq)
            if write:  # the scale stays on the device: no host sync
                scale = cp.minimum(max_norm / (cp.sqrt(sq) + EPS), 1.0)
                buf *= scale.astype(buf.dtype, copy=False)
            return sq

        return ctx.arrays, gpu
    if ctx.gpu:  # torch
        torch = _torch()
        assert ctx.arrays is not None

        def cuda(buf: Any) -> Any:
            # One read pass: on CUDA a bfloat16 tensor reduced into float32
            # is read as it is, not cast first (torch's make_reduction has a
            # special case for it; on the CPU it casts, hence the tests'
            # slowness only). The scale stays a tensor on the device: no sync.
            norm = torch.linalg.vector_norm(buf, dtype=torch.float32)
            if write:
                buf.mul_((max_norm / (norm + EPS)).clamp_(max=1.0))
            return norm

        return ctx.arrays, cuda
    if ctx.anchor is not None:
        torch = _torch()

        def cpu(buf: Any) -> Any:
            if buf.dtype == torch.float32:
                sq = torch.dot(buf, buf)
            else:
                # bfloat16 (jax --dtype bfloat16 on the CPU): torch.dot sums it
                # in bfloat16, slowly and wrongly, and vector_norm(dtype=float32)
                # casts a copy first on the CPU. This is one pass, summed in
                # float32 but rounded to bfloat16: 0.5% off, a floor all the same.
                sq = torch.linalg.vector_norm(buf).float().square()
            if write:  # the scale stays a tensor: no host sync
                buf.mul_((max_norm / (sq.sqrt() + EPS)).clamp_(max=1.0))
            return sq

        return ctx.anchor, cpu

    def host(buf: np.ndarray) -> Any:
        wide = buf if buf.dtype == np.float32 else buf.astype(np.float32)
        sq = np.dot(wide, wide)
        if write:
            np.multiply(buf, min(1.0, max_norm / (math.sqrt(sq) + EPS)), out=buf)
        return sq

    return _numpy_arrays(), host


def _flat_row(ctx: _Context, data: _Data, max_norm: float, *, write: bool) -> _Timed:
    arrays, kernel = _flat_kernel(ctx, max_norm, write)
    return _in_place(arrays, [data.flat()], lambda bufs: lambda: kernel(bufs[0]))


def _floor_row(ctx: _Context, data: _Data, max_norm: float) -> _Timed:
    if ctx.gpu and ctx.backend == "jax":
        return _jax_row(ctx, data, _floor_jax, max_norm, flat=True)
    return _flat_row(ctx, data, max_norm, write=True)


def _read_row(ctx: _Context, data: _Data, max_norm: float) -> _Timed:
    if ctx.gpu and ctx.backend == "jax":
        # Checked through the sum itself: its root is the flat buffer's norm.
        return _jax_kept_row(ctx, data, _jax_sumsq(), lambda sq: _load("jax.numpy").sqrt(sq)[None])
    return _flat_row(ctx, data, max_norm, write=False)


def _copy_row(ctx: _Context, data: _Data, max_norm: float) -> _Timed:
    """A device-to-device copy of the whole tree as one flat buffer: the GPU floor's yardstick."""
    if ctx.backend == "jax":
        return _jax_kept_row(ctx, data, _jax_copy(), lambda out: out)
    arrays = ctx.arrays
    assert arrays is not None  # planned on a GPU only
    src = data.flat()
    dst = arrays.new(src)
    if ctx.backend == "torch":
        zero, copy = dst.zero_, lambda: dst.copy_(src)
    else:
        zero, copy = (lambda: dst.view(np.uint8).fill(0)), (lambda: _memcpy(dst, src))

    def fresh() -> None:
        # Zeroed (as bytes under CuPy: any dtype) so that the check sees what the copy wrote.
        zero()
        arrays.sync()

    return _Timed(fresh, copy, lambda _: arrays.sync(), lambda _: [dst])


def _gpu_floor(nbytes: int, copy_ms: float) -> tuple[float, float]:
    """The GPU floor from a timed device-to-device copy of ``nbytes``.

    Parameters
    ----------
    nbytes : int
        The tree's size in bytes, which the copy moved.
    copy_ms : float
        Milliseconds the copy took.

    Returns
    -------
    floor_ms : float
        ``FLOOR_PASSES * nbytes / bandwidth``: the norm's read, the scale's
        read and its write, at the copy's speed.
    bandwidth : float
        Bytes per second the copy moved, reads and writes counted:
        ``COPY_PASSES * nbytes / copy time``.
    """
    bandwidth = COPY_PASSES * nbytes / (copy_ms / 1e3)
    return FLOOR_PASSES * nbytes / bandwidth * 1e3, bandwidth


_FLOOR_LABEL = "floor: 3x bytes / copy bandwidth"


def _floor_from_copy(copy: dict[str, Any], nbytes: int) -> tuple[dict[str, Any], float]:
    """The GPU floor's row, derived from the copy row; and the copy's bandwidth in bytes/s."""
    floor_ms, bandwidth = _gpu_floor(nbytes, copy["median_ms"])
    factor = floor_ms / copy["median_ms"]
    row = {
        **copy,
        "key": "floor",
        "row": _FLOOR_LABEL,
        "median_ms": floor_ms,
        "min_ms": copy["min_ms"] * factor,
        "times_ms": [t * factor for t in copy["times_ms"]],
        "warmup_s": 0.0,
        "derived_from": "copy",
    }
    return row, bandwidth


@dataclass(frozen=True)
class _Row:
    # stable id: gradclip, gcjax, dropin, flattree, torch, optax, perleaf, naive, floor, read;
    # GPU: flat, copy
    key: str
    label: str
    make: Callable[[_Context, _Data, float], _Timed]
    cases: tuple[str, ...] = CASES
    numpy_memory: bool = False  # tracemalloc sees NumPy's allocations only
    jax: bool = False  # jitted: its compile is measured (see _measure_compile)
    clips: bool = True  # False: the row must leave the norm unchanged (the copy)


def _backend_arrays(backend: str, gpu: bool) -> _Arrays | None:
    if backend == "numpy":
        return _numpy_arrays()
    if backend == "torch":
        return _torch_gpu_arrays() if gpu else _torch_arrays()
    if backend == "cupy":
        return _cupy_arrays()
    return None  # jax: no in-place buffers


# The GPU rows of the floor (its flat buffer and its copy) and the read pass,
# per backend: (flat, copy, read) labels.
_GPU_ANCHORS = {
    "cupy": (
        "one flat buffer: sum of squares + in-place mul (cupy)",
        "device-to-device copy, one flat buffer (cudaMemcpyAsync)",
        "one read pass: sum of squares (cupy)",
    ),
    "torch": (
        "one flat buffer: vector_norm + in-place mul_ (torch)",
        "device-to-device copy, one flat buffer (torch copy_)",
        "one read pass: vector_norm (torch)",
    ),
    "jax": (
        "one flat buffer: sum of squares + multiply (jit, donated)",
        "device-to-device copy, one flat buffer (jit, jnp.copy)",
        "one read pass: sum of squares (jit)",
    ),
}


def _read_label(ctx: _Context) -> str:
    if ctx.gpu:
        return _GPU_ANCHORS[ctx.backend][2]
    where = "torch" if ctx.anchor is not None else "NumPy: torch not installed"
    return f"one read pass: dot ({where})"


def _plan(backend: str, device: str | None = None) -> tuple[_Context, list[_Row], list[str]]:
    """The context, the rows that can run, and a note for each row left out.

    ``device`` is ``--device`` (None: the GPU where the backend sees one).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend != "numpy" and not _installed(backend):
        raise SystemExit(f"gradclip bench: --backend {backend} needs {backend}, not installed")
    gpu = _resolve_device(backend, device) == "gpu"
    notes: list[str] = []
    arrays = _backend_arrays(backend, gpu)
    anchor: _Arrays | None = None
    if not _installed("torch"):
        notes.append("torch clip_grad_norm_: torch not installed, row left out")
    elif not gpu:
        anchor = _torch_arrays()
    elif backend == "torch":
        anchor = arrays  # the same CUDA tensors
    elif backend == "jax":
        # JAX holds 75% of the GPU's memory from its start: torch beside it
        # would be timed in what is left, and is not issue 4's anchor.
        notes.append("torch clip_grad_norm_: not a JAX GPU anchor (issue 4), row left out")
    elif _torch_cuda():
        anchor = arrays  # torch clips the CuPy buffers themselves, through DLPack
    else:
        notes.append("torch clip_grad_norm_: torch sees no CUDA device, row left out")
    ctx = _Context(backend, arrays, anchor, gpu)

    host = backend == "numpy"
    rows = [
        _Row(
            "gradclip",
            f"gradclip ({backend}{', jit, donated' if backend == 'jax' else ''})",
            _gradclip_row,
            numpy_memory=host,
            jax=backend == "jax",
        )
    ]
    if backend == "jax" and not gpu:  # called as it is, not inside a jit of the caller's
        # (on a GPU it compiles as the gradclip row does: XLA's defaults)
        label = "gradclip.jax (its own jit, donated)"
        rows.append(_Row("gcjax", label, _gcjax_row, jax=True))
    if backend == "torch":  # the drop-in, called as torch's is: on parameters
        rows.append(_Row("dropin", "gradclip.torch.clip_grad_norm_", _dropin_row))
    if backend != "jax":  # a FlatTree's leaves are views: numpy, torch and cupy only
        label = f"gradclip FlatTree ({backend})"
        rows.append(_Row("flattree", label, _flattree_row, numpy_memory=host))
    if anchor is not None:
        label = "torch clip_grad_norm_(foreach=True)"
        if backend == "cupy":
            label += ", same memory (DLPack)"
        rows.append(_Row("torch", label, _torch_row))
    if gpu and backend != "jax":
        # Not one of issues 5's and 6's anchors, and importing jax on a GPU
        # would reserve 75% of its memory, which the 1B-element trees need.
        issue = "issue 5" if backend == "cupy" else "issue 6"
        notes.append(f"optax clip_by_global_norm: not a GPU anchor ({issue}), row left out")
    elif not (_installed("jax") and _installed("optax")):
        notes.append("optax clip_by_global_norm: jax or optax not installed, row left out")
    else:
        label = "optax clip_by_global_norm (jit, donated)"
        rows.append(_Row("optax", label, _optax_row, jax=True))
    if backend == "jax":
        label = "XLA per-leaf floor: x * scale (jit, donated)"
        rows.append(_Row("perleaf", label, _per_leaf_row, ("clip",), jax=True))
    if gpu:
        if backend == "jax":
            notes.append("naive NumPy loop: runs on the host, not a GPU anchor, row left out")
            notes.append(
                "floor, copy and read pass: over a flat buffer of JAX's own, the tree's "
                "size and dtype but a draw of its own (their norm_before is its norm)"
            )
        else:
            label = "naive CuPy loop" if backend == "cupy" else "naive torch loop"
            rows.append(_Row("naive", label, _naive_row))
        flat, copy, read = _GPU_ANCHORS[backend]
        # The floor itself is derived from the copy (see _floor_from_copy).
        rows.append(_Row("flat", flat, _floor_row, ("clip",)))
        rows.append(_Row("copy", copy, _copy_row, ("clip",), clips=False))
        rows.append(_Row("read", read, _read_row, ("noclip",)))
        return ctx, rows, notes
    rows.append(_Row("naive", "naive NumPy loop", _naive_row, numpy_memory=True))
    where = "torch" if anchor is not None else "NumPy: torch not installed"
    rows.append(_Row("floor", f"floor: dot + in-place mul ({where})", _floor_row, ("clip",)))
    rows.append(_Row("read", _read_label(ctx), _read_row, ("noclip",)))
    return ctx, rows, notes


# ------------------------------------------------- per-example clipping (issue 8)


def _example_timed(
    arrays: _Arrays,
    data: _Data,
    call: Callable[[], Any],
    unpack: Callable[[Any], tuple[list[Any], Any]],
    max_norm: float,
    done: Callable[[Any], Any] | None = None,
    compile: Callable[[], tuple[float, float]] | None = None,
) -> _Timed:
    """A per-example row: ``call()`` reads the pristine batch and returns new arrays.

    Nothing is modified, so no fresh copy is needed between calls.
    ``unpack(out)`` gives the summed leaves, in flattening order, and the
    count of clipped examples, which the check compares with the reference.
    """
    examples = data.examples
    assert examples is not None  # the dp tree's rows only

    def result(out: Any) -> list[Any]:
        return [arrays.host(x) for x in unpack(out)[0]]

    def check(out: Any) -> dict[str, Any]:
        # The sums are the size of one example: read back on the host.
        return examples.check([arrays.numpy(x) for x in unpack(out)[0]], unpack(out)[1], max_norm)

    return _Timed(
        lambda: None,
        call,
        done or (lambda _: arrays.sync()),
        result,
        compile,
        check,
    )


def _example_gradclip_jax(tree: Tree, max_norm: Any) -> Any:
    return gc.per_example_clip(tree, max_norm, eps=EXAMPLE_EPS)


def _example_optax_jax(leaves: list[Any], max_norm: Any) -> Any:
    return _load("optax").per_example_global_norm_clip(leaves, max_norm)


@functools.cache
def _jitted_kept(fn: Callable[[Any, Any], Any]) -> Any:
    # Not donated, unlike _jitted: the sum is far smaller than the batch, so
    # XLA could reuse none of the input's buffers (and would warn so).
    return _load("jax").jit(fn)


def _example_jax_row(
    ctx: _Context,
    data: _Data,
    fn: Callable[[Any, Any], Any],
    args: Any,
    unpack: Callable[[Any], tuple[list[Any], Any]],
    max_norm: float,
) -> _Timed:
    """``fn(args, max_norm)`` under ``jax.jit``, on arrays put on the row's device once, untimed.

    The timed calls leave their results there; only the check reads them back.
    """
    jax = _load("jax")
    jitted = _jitted_kept(fn)
    inputs = jax.block_until_ready(jax.device_put(args, _jax_device(ctx.gpu)))

    def compile_() -> tuple[float, float]:
        # Lowered from the very arrays the timed calls get: the executable
        # built here is the one jax.jit's cache hands the first call.
        start = time.perf_counter()
        lowered = jitted.lower(inputs, max_norm)
        traced = time.perf_counter()
        lowered.compile()
        return traced - start, time.perf_counter() - start

    return _example_timed(
        _numpy_arrays(),  # the results are read on the host, through np.asarray
        data,
        lambda: jitted(inputs, max_norm),
        unpack,
        max_norm,
        jax.block_until_ready,
        compile_,
    )


def _tree_and_count(out: Any) -> tuple[list[Any], Any]:
    """The summed leaves and the count of clipped examples, from ``(tree, PerExampleStats)``."""
    return optree.tree_leaves(out[0]), out[1].num_clipped


def _example_gradclip_row(ctx: _Context, data: _Data, max_norm: float) -> _Timed:
    if ctx.arrays is None:  # jax
        return _example_jax_row(
            ctx, data, _example_gradclip_jax, data.tree, _tree_and_count, max_norm
        )
    arrays = ctx.arrays
    tree = optree.tree_map(arrays.pristine, data.tree)  # only read: the call makes new arrays

    def call() -> Any:
        return gc.per_example_clip(tree, max_norm, eps=EXAMPLE_EPS)

    return _example_timed(arrays, data, call, _tree_and_count, max_norm)


def _example_optax_row(ctx: _Context, data: _Data, max_norm: float) -> _Timed:
    # optax takes a list of arrays, in the order gradclip flattens the tree.
    return _example_jax_row(ctx, data, _example_optax_jax, data.leaves, tuple, max_norm)


def _naive_examples_numpy(leaves: list[np.ndarray], max_norm: float) -> Any:
    """What a researcher writes in NumPy: per-example norms, factors, one tensordot per leaf."""
    sq = sum(np.sum(g * g, axis=tuple(range(1, g.ndim))) for g in leaves)
    factor = np.minimum(1.0, max_norm / (np.sqrt(sq) + EXAMPLE_EPS))
    return [np.tensordot(factor, g, axes=1) for g in leaves], np.count_nonzero(factor < 1)


def _naive_examples_torch(leaves: list[Any], max_norm: float) -> Any:
    """:func:`_naive_examples_numpy` in torch; the count stays a tensor (no sync)."""
    torch = _torch()
    sq = sum((g * g).sum(dim=tuple(range(1, g.ndim))) for g in leaves)
    factor = (max_norm / (sq.sqrt() + EXAMPLE_EPS)).clamp(max=1.0)
    return [torch.tensordot(factor, g, dims=1) for g in leaves], (factor < 1).sum()


def _naive_examples_cupy(leaves: list[Any], max_norm: float) -> Any:
    """:func:`_naive_examples_numpy` in CuPy; the count stays on the device (no sync)."""
    cp = _load("cupy")
    sq = sum(cp.sum(g * g, axis=tuple(range(1, g.ndim))) for g in leaves)
    factor = cp.minimum(1.0, max_norm / (cp.sqrt(sq) + EXAMPLE_EPS))
    return [cp.tensordot(factor, g, axes=1) for g in leaves], cp.count_nonzero(factor < 1)


def _einsum_examples_numpy(leaves: list[np.ndarray], max_norm: float) -> Any:
    """Hand-written with care: the sums of squares by ``einsum``, with no squared copy."""
    rows = [g.reshape(g.shape[0], -1) for g in leaves]
    sq = sum(np.einsum("bi,bi->b", r, r) for r in rows)
    factor = np.minimum(1.0, max_norm / (np.sqrt(sq) + EXAMPLE_EPS))
    return [np.tensordot(factor, g, axes=1) for g in leaves], np.count_nonzero(factor < 1)


def _einsum_examples_torch(leaves: list[Any], max_norm: float) -> Any:
    """:func:`_einsum_examples_numpy` in torch."""
    torch = _torch()
    rows = [g.reshape(g.shape[0], -1) for g in leaves]
    sq = sum(torch.einsum("bi,bi->b", r, r) for r in rows)
    factor = (max_norm / (sq.sqrt() + EXAMPLE_EPS)).clamp(max=1.0)
    return [torch.tensordot(factor, g, dims=1) for g in leaves], (factor < 1).sum()


_HAND_WRITTEN = {
    ("naive", "numpy"): _naive_examples_numpy,
    ("naive", "torch"): _naive_examples_torch,
    ("naive", "cupy"): _naive_examples_cupy,
    ("einsum", "numpy"): _einsum_examples_numpy,
    ("einsum", "torch"): _einsum_examples_torch,
}


def _hand_written_row(key: str) -> Callable[[_Context, _Data, float], _Timed]:
    """The make function of the hand-written per-example row ``key`` (naive or einsum)."""

    def make(ctx: _Context, data: _Data, max_norm: float) -> _Timed:
        arrays = ctx.arrays
        assert arrays is not None  # numpy, torch or cupy
        leaves = [arrays.pristine(x) for x in data.leaves]
        clip = _HAND_WRITTEN[key, ctx.backend]
        return _example_timed(arrays, data, lambda: clip(leaves, max_norm), tuple, max_norm)

    return make


def _example_plan(ctx: _Context) -> tuple[list[_Row], list[str]]:
    """The dp tree's rows (its clip case only), and a note for each row left out.

    gradclip's ``per_example_clip``; the anchor in the same library (optax
    under ``--backend jax``; under numpy and torch the naive loop, and the
    same with ``einsum`` sums of squares, which make no squared copy; under
    cupy the naive loop); and one read pass over a flat buffer as large as
    the batch, the section's anchor.
    """
    backend, host, jax = ctx.backend, ctx.backend == "numpy", ctx.backend == "jax"
    only = ("clip",)
    label = f"gradclip per_example_clip ({backend}{', jit' if jax else ''})"
    rows = [_Row("gradclip", label, _example_gradclip_row, only, numpy_memory=host, jax=jax)]
    notes: list[str] = []
    if not jax:
        lib = {"numpy": "NumPy", "torch": "torch", "cupy": "CuPy"}[backend]
        label = f"naive {lib}: sums of squares, tensordot"
        rows.append(_Row("naive", label, _hand_written_row("naive"), only, numpy_memory=host))
        if backend != "cupy":
            label = f"{lib} einsum sums of squares, tensordot"
            rows.append(_Row("einsum", label, _hand_written_row("einsum"), only, numpy_memory=host))
    elif _installed("optax"):
        label = "optax per_example_global_norm_clip (jit)"
        rows.append(_Row("optax", label, _example_optax_row, only, jax=True))
    else:
        notes.append("optax per_example_global_norm_clip: optax not installed, row left out")
    # It leaves the batch as it was: checked like the no-clip case's read pass.
    rows.append(_Row("read", _read_label(ctx), _read_row, only, clips=False))
    return rows, notes


def _example_device_data(ctx: _Context, data: _Data) -> _Data:
    """The dp tree on a GPU: under CuPy and torch, views into one buffer put there once.

    The reference (``examples``) stays on the host. Under JAX the rows put
    the batch on the device themselves (:func:`_example_jax_row`).
    """
    if ctx.backend == "jax":
        return data
    put, measure = (
        (_torch_put, _torch_norm) if ctx.backend == "torch" else (_cupy_put, _device_norm)
    )
    source = put(data.flat())
    leaves = _views(source, [x.shape for x in data.leaves])
    tree = optree.tree_unflatten(optree.tree_structure(data.tree), leaves)
    return _Data(data.name, tree, leaves, data.norm, source, measure, data.examples, device=True)


# -------------------------------------------------------------------- measuring


def _peak_bytes(timed: _Timed) -> int:
    """Peak temporary memory of one call, as tracemalloc sees it (NumPy allocations)."""
    timed.fresh()
    tracemalloc.start()
    try:
        timed.done(timed.call())
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _time(timeds: Sequence[_Timed], reps: int, budget: float) -> list[tuple[list[float], Any]]:
    """Each row's seconds per call and last result: ``reps`` calls at least, more within ``budget``.

    The rows take turns, one call each a round, and a row leaves the rounds
    once it has its calls. On a shared machine memory bandwidth drifts
    between phases seconds apart (a 256 MB multiply here: 6.5 ms in one,
    10.5 ms in the next); rows timed one after the other would each meet a
    different phase, and their ratios would measure the machine. In turns
    they meet the same ones.

    Each round starts one row further on, so no row always follows the same
    one. After a parallel torch op (the floor's ``dot`` and ``mul_``) torch's
    OpenMP workers spin on for about 10 ms of CPU here, and the NumPy clip of
    the ``small`` tree that always came next took 2.81 ms where it took 2.53
    after another NumPy call.
    """
    times: list[list[float]] = [[] for _ in timeds]
    spent = [0.0] * len(timeds)  # each row's seconds, its untimed fresh() included
    outs: list[Any] = [None] * len(timeds)
    active = list(range(len(timeds)))
    turn = 0
    while active:
        first, turn = turn % len(active), turn + 1
        for k in active[first:] + active[:first]:
            timed = timeds[k]
            # Release the last result untimed: freeing a JAX row's 200 MB output
            # costs milliseconds, and inside the timed call it would count.
            outs[k] = None
            start = time.perf_counter()
            timed.fresh()
            t0 = time.perf_counter()
            outs[k] = timed.call()
            timed.done(outs[k])
            end = time.perf_counter()
            times[k].append(end - t0)
            spent[k] += end - start
        active = [
            k
            for k in active
            if len(times[k]) < reps * _MAX_REPS_FACTOR
            and (len(times[k]) < reps or spent[k] < budget)
        ]
    return list(zip(times, outs, strict=True))


@contextlib.contextmanager
def _xla_compiles() -> Iterator[list[float]]:
    """Collect the seconds of every XLA compilation JAX reports inside the block."""
    monitoring = _load("jax.monitoring")
    seen: list[float] = []

    def listen(event: str, duration: float, **_: Any) -> None:
        if event == _XLA_COMPILE_EVENT:
            seen.append(duration)

    monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        monitoring.unregister_event_duration_listener(listen)


def _measure_compile(timed: _Timed) -> dict[str, Any]:
    """How long a JAX row's program takes to build, measured on its own, untimed otherwise.

    ``compile_s`` is the wall time of ``jitted.lower(grads, max_norm).compile()``:
    tracing, lowering to StableHLO and XLA's compilation, all a user waits
    for on the first call besides the step itself (``lower_s`` is the
    tracing and lowering part). :func:`bench` clears JAX's in-memory caches
    before each tree, so nothing compiled earlier in the process is reused;
    ``xla_compiles`` counts the XLA compilations JAX reported meanwhile, and
    0 means the time is a cache hit (a persistent cache, say), not a compile.
    The executable lands in jax.jit's cache: the first timed-path call reuses
    it, and ``warmup_compiles`` in the row shows that it did.
    """
    assert timed.compile is not None
    with _xla_compiles() as seen:
        lower_s, compile_s = timed.compile()
    return {
        "compile_s": compile_s,
        "lower_s": lower_s,
        "xla_compile_s": sum(seen),
        "xla_compiles": len(seen),
    }


_COMPILE_FIELDS = ("compile_s", "lower_s", "xla_compile_s", "xla_compiles")


def _norm_error(after: float, before: float, max_norm: float) -> float:
    """How far a row's result is from the norm a clip to ``max_norm`` must leave, relative."""
    want = min(before, max_norm)
    return (after - want) / want


def _did_the_work(error: float) -> bool:
    """Whether a row clipped (or, with scale 1, left the gradients alone).

    The bound is loose on purpose: float32 accumulation leaves torch's norm of
    54M entries off by 2e-4 and a plain float32 dot by 5e-4, and those rows
    still did the work. A row that skipped the clip is off by a factor of
    thousands, one that zeroed the gradients by -1. The error itself is
    reported.
    """
    return abs(error) <= 1e-2


# ---------------------------------------------------------------------- targets


@dataclass(frozen=True)
class _Target:
    tree: str
    case: str
    key: str
    limit: float
    # What is bounded: "anchor", the ratio to the section's anchor (the floor,
    # or with nothing to clip the read pass); "optax", the ratio to optax's
    # step time; "ms", milliseconds per call; "compile", seconds to compile.
    # At least ``limit``: "bandwidth", the fraction of the floor's bandwidth
    # reached (floor time / row time); "speedup", torch's time / the row's.
    # "torch": the ratio to torch clip_grad_norm_(foreach=True)'s time.
    per: str
    where: str = ""  # " on the GPU": a CPU issue's target, timed on a GPU
    note: str = ""  # appended in parentheses, e.g. that the target is informational

    def describe(self) -> str:
        text = self._describe()
        return f"{text} ({self.note})" if self.note else text

    def _describe(self) -> str:
        who = {
            "flattree": "gradclip FlatTree",
            "dropin": "gradclip.torch.clip_grad_norm_",
            "gcjax": "gradclip.jax",
        }.get(self.key, "gradclip")
        if self.per == "compile":
            return f"{self.tree}{self.where}: {who} compile <= {self.limit:g} s"
        case = ("clip" if self.case == "clip" else "no-clip") + self.where
        if self.per == "bandwidth":
            return f"{self.tree} {case}: {who} >= {self.limit:.0%} of the floor's bandwidth"
        if self.per == "speedup":
            return (
                f"{self.tree} {case}: {who} >= {self.limit:g}x faster than "
                "torch clip_grad_norm_(foreach=True)"
            )
        if self.per == "ms":
            bound = f"{self.limit:g} ms per call"
        elif self.per == "optax":
            bound = f"{self.limit:g}x optax clip_by_global_norm"
        elif self.per == "torch":
            bound = f"{self.limit:g}x torch clip_grad_norm_(foreach=True)"
        else:
            bound = f"{self.limit:g}x {'floor' if self.case == 'clip' else 'one read pass'}"
        return f"{self.tree} {case}: {who} <= {bound}"


def _inverse(value: float | None) -> float | None:
    return None if value is None or value <= 0 else 1.0 / value


# Per kind of target: the value it bounds (from the row), and that value's unit.
_VALUE: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "anchor": lambda r: r["ratio_anchor"],
    "optax": lambda r: r["ratio_optax"],
    "torch": lambda r: r["ratio_torch"],
    "ms": lambda r: r["median_ms"],
    "compile": lambda r: r["compile_s"],
    "bandwidth": lambda r: _inverse(r["ratio_anchor"]),
    "speedup": lambda r: _inverse(r["ratio_torch"]),
}
_AT_LEAST = frozenset({"bandwidth", "speedup"})  # met when value >= limit; the rest <=
_UNIT = {
    "anchor": "ratio",
    "optax": "ratio",
    "torch": "ratio",
    "ms": "ms",
    "compile": "s",
    "bandwidth": "fraction",
    "speedup": "speedup",
}
_FORMAT = {
    "ratio": "{:.3g}x",
    "ms": "{:.3g} ms",
    "s": "{:.3g} s",
    "fraction": "{:.1%}",
    "speedup": "{:.3g}x faster",
}

# Per backend: the targets of the issue that built its fast path, checked
# against the gradclip rows of that backend's run.
TARGETS: dict[str, tuple[_Target, ...]] = {
    # Issue 3: the NumPy fast path.
    "numpy": (
        _Target("llm", "clip", "gradclip", 1.25, "anchor"),
        _Target("huge", "clip", "gradclip", 1.25, "anchor"),
        _Target("small", "clip", "gradclip", 2.5, "ms"),
        _Target("small", "clip", "flattree", 1.3, "anchor"),
        *(_Target(tree, "noclip", "gradclip", 1.2, "anchor") for tree in TREES),
    ),
    # Issue 4: the jitted JAX path, against optax with fresh donated buffers
    # on both sides, and against the same torch floor and read pass.
    "jax": (
        _Target("llm", "clip", "gradclip", 1.0, "optax"),
        _Target("llm", "clip", "gradclip", 1.25, "anchor"),
        _Target("huge", "clip", "gradclip", 1.25, "anchor"),
        _Target("small", "clip", "gradclip", 0.3, "optax"),
        _Target("small", "clip", "gradclip", 10.0, "compile"),
        _Target("small", "clip", "gcjax", 0.3, "optax"),
        _Target("small", "clip", "gcjax", 10.0, "compile"),
        *(_Target(tree, "noclip", "gradclip", 1.2, "anchor") for tree in TREES),
    ),
    # Issue 6: the torch drop-in, called on parameters as torch's is, against
    # torch.nn.utils.clip_grad_norm_(foreach=True) on the same tensors (CPU).
    "torch": (
        _Target("llm", "clip", "dropin", 1.0, "torch"),
        _Target("huge", "clip", "dropin", 1.0, "torch"),
        _Target("small", "clip", "dropin", 0.5, "torch"),
    ),
    # Issue 5: the CuPy raw-kernel path on the GPU, the same for float32 and
    # bfloat16 (--dtype). The floor is 3x the bytes at the copy bandwidth
    # measured in the run; "60 us wall per call" includes the host's time.
    "cupy": (
        _Target("llm", "clip", "gradclip", 0.85, "bandwidth"),
        _Target("huge", "clip", "gradclip", 0.85, "bandwidth"),
        _Target("small", "clip", "gradclip", 0.060, "ms"),
        _Target("small", "clip", "gradclip", 3.0, "speedup"),
        *(_Target(tree, "noclip", "gradclip", 1.15, "anchor") for tree in TREES),
    ),
}


# On a GPU: issue 5's for CuPy; issue 6's, the same ratios as on the CPU, for
# torch; for JAX none was set (issue 4 asks for the comparison with optax), so
# its CPU bound against optax on the llm tree is shown as information.
GPU_TARGETS: dict[str, tuple[_Target, ...]] = {
    "cupy": TARGETS["cupy"],
    "torch": tuple(dataclasses.replace(t, where=" on the GPU") for t in TARGETS["torch"]),
    "jax": (
        _Target(
            "llm",
            "clip",
            "gradclip",
            1.0,
            "optax",
            where=" on the GPU",
            note="issue 4's CPU target, for information",
        ),
    ),
}


def _targets(rows: list[dict[str, Any]], backend: str, gpu: bool = False) -> list[dict[str, Any]]:
    """Each of ``backend``'s targets (on a GPU: ``GPU_TARGETS``), measured, and whether met.

    A target is unmeasured (``value`` None) when its row or its reference did
    not run, and a compile time counts only if XLA really compiled. A row
    whose result failed the check meets no target.
    """
    found = {(r["tree"], r["case"], r["key"]): r for r in rows}
    out = []
    for t in (GPU_TARGETS if gpu else TARGETS).get(backend, ()):
        row = found.get((t.tree, t.case, t.key))
        optax = found.get((t.tree, t.case, "optax"))
        value = met = None
        if row is not None:
            value = _VALUE[t.per](row)
            if t.per == "compile" and not row["xla_compiles"]:
                value = None  # a cache hit, not a compile: nothing was measured
            if value is not None:
                within = value >= t.limit if t.per in _AT_LEAST else value <= t.limit
                met = bool(within and row["check_ok"])
        out.append(
            {
                "target": t.describe(),
                "tree": t.tree,
                "case": t.case,
                "row": t.key,
                "limit": t.limit,
                "unit": _UNIT[t.per],
                "at_least": t.per in _AT_LEAST,
                "value": value,
                "met": met,
                "ratio_torch": None if row is None else row["ratio_torch"],
                "ratio_optax": None if row is None else row["ratio_optax"],
                "optax_compile_s": (
                    optax["compile_s"] if t.per == "compile" and optax is not None else None
                ),
            }
        )
    return out


# ------------------------------------------------------------------- the report


def _versions() -> dict[str, str | None]:
    """Installed versions, read from package metadata (nothing is imported)."""
    dists = importlib.metadata.packages_distributions()
    found: dict[str, str | None] = {"gradclip": gc.__version__}
    for module in ("numpy", "torch", "jax", "jaxlib", "optax", "cupy", "ml_dtypes", "rich"):
        names = dists.get(module, [])
        found[module] = importlib.metadata.version(names[0]) if names else None
    return found


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # not POSIX
        return None


def _gpu_name() -> str | None:
    """The GPU's model where torch or CuPy sees one (a CPU run's machine field)."""
    if _installed("torch") and _torch().cuda.is_available():
        return str(_torch().cuda.get_device_name(0))
    if _installed("cupy"):
        with warnings.catch_warnings():  # cupy warns at import about a missing CUDA toolkit
            warnings.simplefilter("ignore")
            if _cuda_devices() > 0:
                name = _load("cupy").cuda.runtime.getDeviceProperties(0)["name"]
                return name.decode() if isinstance(name, bytes) else str(name)
    return None


def _cupy_gpu() -> dict[str, Any]:
    runtime = _load("cupy").cuda.runtime
    index = int(runtime.getDevice())
    props = runtime.getDeviceProperties(index)
    name = props.get("name", b"")
    return {
        "index": index,
        "name": name.decode() if isinstance(name, bytes) else str(name),
        "compute_capability": f"{props.get('major')}.{props.get('minor')}",
        "multiprocessors": props.get("multiProcessorCount"),
        "memory_bytes": props.get("totalGlobalMem"),
        "l2_cache_bytes": props.get("l2CacheSize"),
        "cuda_runtime": int(runtime.runtimeGetVersion()),
        "cuda_driver": int(runtime.driverGetVersion()),
    }


def _torch_gpu_info() -> dict[str, Any]:
    torch = _torch()
    device = _torch_gpu()
    index = device.index if device.index is not None else 0
    props = torch.cuda.get_device_properties(index)
    return {
        "index": index,
        "name": str(props.name),
        "compute_capability": f"{props.major}.{props.minor}",
        "multiprocessors": getattr(props, "multi_processor_count", None),
        "memory_bytes": getattr(props, "total_memory", None),
        "l2_cache_bytes": getattr(props, "L2_cache_size", None),
        "cuda": torch.version.cuda,
    }


def _jax_gpu_info() -> dict[str, Any]:
    """What JAX says of its device (nothing else is loaded beside JAX on its GPU runs)."""
    device = _jax_device(True)
    stats = device.memory_stats() or {}
    return {
        "index": int(device.id),
        "name": str(device.device_kind),
        "platform": str(device.platform),
        "compute_capability": getattr(device, "compute_capability", None),
        "multiprocessors": getattr(device, "core_count", None),
        "memory_bytes": stats.get("bytes_limit"),  # what JAX's allocator may use
    }


def _gpu_device(backend: str) -> dict[str, Any]:
    """The GPU a run's backend runs on: its model, size and CUDA versions, as it reports them."""
    info = {"torch": _torch_gpu_info, "jax": _jax_gpu_info}.get(backend, _cupy_gpu)
    try:
        return {"backend": backend, **info()}
    except Exception as exc:  # a report without these beats losing the run's timings
        return {"backend": backend, "error": f"{type(exc).__name__}: {exc}"}


def _machine(gpu: bool = False, backend: str = "cupy") -> dict[str, Any]:
    """The machine; on a GPU run also the GPU, as the backend sees it (``gpu_device``)."""
    device = _gpu_device(backend) if gpu else None
    found = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        # A GPU run names its GPU as its backend sees it (a JAX run loads
        # neither torch nor CuPy: see the module's docstring).
        "gpu": device.get("name") if device is not None else _gpu_name(),
        "python": platform.python_version(),
        "hostname": platform.node(),
        "versions": _versions(),
    }
    if device is not None:
        found["gpu_device"] = device
    return found


class _Progress:
    """rich's progress bar on stderr when rich is installed, else a line per row."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.count = total, enabled, 0
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled and _installed("rich"):
            progress = _load("rich.progress")
            console = _load("rich.console").Console(stderr=True)
            # Tables go to stdout after the bar is gone: no redirection needed.
            self._bar = progress.Progress(
                *progress.Progress.get_default_columns(),
                progress.TimeElapsedColumn(),
                console=console,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("bench", total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def start(self, what: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=what)

    def done(self, what: str, summary: str) -> None:
        self.count += 1
        if self._bar is not None:
            self._bar.advance(self._task)
        elif self.enabled:
            width = len(str(self.total))
            print(f"[{self.count:>{width}}/{self.total}] {what}: {summary}", file=sys.stderr)


def _ratio(value: float, base: dict[str, Any] | None) -> float | None:
    return None if base is None else value / base["median_ms"]


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")


def _dtype(backend: str, dtype: str, gpu: bool | None = None) -> Any:
    """The dtype of ``--dtype`` on ``backend``, or a clear exit where it cannot run.

    NumPy-style (ml_dtypes' bfloat16) for numpy, cupy and jax; on a GPU run
    of torch (``gpu``; None: cupy's only) torch's own.
    """
    _check_dtype(dtype)
    gpu = backend == "cupy" if gpu is None else gpu
    if backend == "torch" and gpu:
        return getattr(_torch(), dtype)
    if dtype == "float32":
        return np.float32
    if backend == "numpy" or (backend == "torch" and not gpu):
        # NumPy's and torch's CPU results, and their targets, are float32
        # (NumPy has no bfloat16 arithmetic of its own).
        raise SystemExit(
            f"gradclip bench: --dtype {dtype} runs on --backend cupy, jax, or torch on a GPU; "
            f"--backend {backend} on the CPU times float32 trees"
        )
    if not _installed("ml_dtypes"):
        raise SystemExit(f"gradclip bench: --dtype {dtype} needs ml_dtypes, not installed")
    return getattr(_load("ml_dtypes"), dtype)


def bench(
    backend: str = "numpy",
    trees: Sequence[str] = TREES,
    *,
    reps: int = 15,
    budget: float = 1.0,
    max_norm: float = 1.0,
    size_factor: int = 1,
    skip: Sequence[str] = (),
    progress: bool = True,
    dtype: str = "float32",
    device: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return its report.

    Parameters
    ----------
    backend : {"numpy", "torch", "jax", "cupy"}, default "numpy"
        The arrays gradclip clips; the anchors run on the same device.
        On a GPU (``device``) the trees are the GPU's (see
        :func:`tree_sizes`), drawn on the device.
    trees : sequence of {"llm", "huge", "small", "dp"}
        The trees to time, in order. ``dp`` times per-example clipping
        instead (see the module's docstring): in its clip case only, with no
        targets, float32 only.
    reps : int, default 15
        Timed calls per row, at least.
    budget : float, default 1.0
        Seconds per row: after ``reps`` calls a row stops once it has run
        this long, and a fast row runs up to ``20 * reps`` calls within it.
    max_norm : float, default 1.0
        ``max_norm`` of the clip case (on ``dp``, each example's bound: 1
        clips half of them).
    size_factor : int, default 1
        Divide every tree's dimensions by this (for tests).
    skip : sequence of str, default ()
        Anchors to leave out, each ``ROW`` or ``ROW:TREE`` with ROW one of
        ``torch``, ``optax``, ``naive``: ``optax:small`` spares the two
        minutes XLA takes to compile optax's clip of the 2000-leaf tree on a
        CPU, and leaves the targets measured against it unmeasured.
    progress : bool, default True
        Show progress on stderr.
    dtype : {"float32", "bfloat16"}, default "float32"
        The trees' element type. ``bfloat16`` (ml_dtypes' type, which CuPy
        maps to CUDA's; torch's own) runs on ``cupy``, ``jax`` (the CPU
        trees rounded, on a CPU) and ``torch`` on a GPU; numpy, and torch
        on the CPU, exit with a message.
    device : {"cpu", "gpu"} or None, default None
        Where the arrays live: None picks the GPU where the backend sees one
        (``torch.cuda.is_available()``, ``jax.default_backend()``; cupy
        always, numpy never). numpy runs on the CPU only, cupy on a GPU only.

    Returns
    -------
    dict
        JSON-ready: ``machine``, ``date``, ``settings``, ``notes`` (rows left
        out, and on the GPU rows that failed), ``failed`` (those GPU rows'
        names), ``trees``, ``rows`` (figures and ratios) and ``targets``.
    """
    skipped = {_skip_entry(entry) for entry in skip}
    _check_dtype(dtype)
    examples = [name for name in trees if name in EXAMPLE_TREES]
    examples_only = bool(trees) and len(examples) == len(trees)
    if examples and dtype != "float32":
        raise SystemExit(f"gradclip bench: --tree {examples[0]} times float32 only")
    if backend == "numpy" and dtype != "float32":  # before numpy's plan loads torch
        _dtype(backend, dtype, False)
    ctx, global_plan, global_notes = _plan(backend, device)
    element = _dtype(backend, dtype, ctx.gpu)
    # On the GPU read first: after a scarce lease's timings nothing may fail.
    machine = _machine(gpu=True, backend=backend) if ctx.gpu else None
    # Each tree's rows: per-example clipping's for the dp tree, the global
    # clip's for the others; notes only about the rows of the trees run.
    example_plan, example_notes = _example_plan(ctx) if examples else ([], [])
    plans = {name: example_plan if name in EXAMPLE_TREES else global_plan for name in trees}
    notes = [] if examples_only else list(global_notes)
    notes += example_notes
    failed: list[str] = []  # GPU rows that raised (see the loop below)

    def runs(row: _Row, tree: str) -> bool:
        return (row.key, None) not in skipped and (row.key, tree) not in skipped

    for plan in (global_plan, example_plan):
        names = [name for name in trees if plans[name] is plan]
        for row in plan if names else ():
            off = [tree for tree in names if not runs(row, tree)]
            if off:
                where = "every tree" if len(off) == len(trees) else ", ".join(off)
                notes.append(f"{row.label}: skipped on {where} (--skip)")
    total = sum(len(row.cases) for name in trees for row in plans[name] if runs(row, name))
    rows: list[dict[str, Any]] = []
    tree_info: dict[str, Any] = {}
    started = time.perf_counter()
    with _Progress(total, progress) as bar:
        for name in trees:
            plan = plans[name]
            if name in EXAMPLE_TREES:
                data = _example_data(name, size_factor)
                if ctx.gpu:
                    data = _example_device_data(ctx, data)
            elif ctx.gpu:
                data = _gpu_data(ctx, name, size_factor, element)
            else:
                data = _host_data(name, size_factor, element)
            sizes = [math.prod(x.shape) for x in data.leaves]
            info: dict[str, Any] = {"leaves": len(sizes), "elements": sum(sizes), "norm": data.norm}
            if ctx.gpu or dtype != "float32":
                info.update(dtype=dtype, bytes=data.nbytes)
            if ctx.gpu and name not in EXAMPLE_TREES:
                info.update(copy_gb_per_s=None, floor_ms=None)
            if data.flat_norm != data.norm:  # JAX on a GPU: the floor's buffer is its own
                info.update(flat_norm=data.flat_norm)
            if data.examples is not None:
                norms = data.examples.norms
                info.update(
                    batch=int(norms.size),
                    example_elements=sum(sizes) // max(1, norms.size),
                    example_norm_min=float(norms.min()),
                    example_norm_median=float(np.median(norms)),
                    example_norm_max=float(norms.max()),
                    max_norm=max_norm,
                    num_clipped=data.examples.expected(max_norm)[1],
                    eps=EXAMPLE_EPS,
                )
            tree_info[name] = info
            if any(row.jax and runs(row, name) for row in plan):
                # Compile times from scratch: no executable, trace or lowering
                # left from an earlier tree or an earlier run in this process.
                _load("jax").clear_caches()
            compiled: set[str] = set()  # JAX rows compiled for this tree
            for case in CASES:
                bound = max_norm if case == "clip" else NO_CLIP
                section: list[dict[str, Any]] = []
                active = [row for row in plan if case in row.cases and runs(row, name)]
                # A JAX row compiles once per tree (max_norm is an argument):
                # measured in its first case, reused by the other.
                first = {row.key: row.jax and row.key not in compiled for row in active}
                compiled.update(row.key for row in active)
                if not ctx.gpu:
                    # Every row built and warmed up, then timed in turns (see
                    # _time). The CPU trees fit in memory five times over; the
                    # GPU's are sized to the device, one row's buffers at a time.
                    readies = []
                    for row in active:
                        bar.start(f"{name} {case}: {row.label} (warm-up)")
                        readies.append(_ready(ctx, data, row, bound, compile=first[row.key]))
                    bar.start(f"{name} {case}: {len(active)} rows, timed in turns")
                    timings = _time([ready.timed for ready in readies], reps, budget)
                    for row, ready, (times, out) in zip(active, readies, timings, strict=True):
                        done = _report(data, row, case, bound, ready, times, out)
                        section.append(done)
                        bar.done(f"{name} {case}: {row.label}", _summary(done))
                for row in active if ctx.gpu else ():  # one at a time
                    what = f"{name} {case}: {row.label}"
                    bar.start(what)
                    try:
                        done = _run_row(
                            ctx, data, row, case, bound, reps, budget, compile=first[row.key]
                        )
                    except Exception as exc:
                        # A GPU lease is short: one row that fails (out of
                        # memory, a dtype a library lacks) is reported, and
                        # the others still run.
                        traceback.print_exc(file=sys.stderr)
                        notes.append(f"{what}: FAILED, row left out: {type(exc).__name__}: {exc}")
                        failed.append(what)
                        bar.done(what, "FAILED")
                        continue
                    section.append(done)
                    bar.done(what, _summary(done))
                by_key = {r["key"]: r for r in section}
                if ctx.gpu and case == "clip" and "copy" in by_key:
                    floor, bandwidth = _floor_from_copy(by_key["copy"], data.nbytes)
                    section.append(floor)
                    by_key["floor"] = floor
                    info.update(copy_gb_per_s=bandwidth / 1e9, floor_ms=floor["median_ms"])
                # The clip case's floor; with nothing to clip, or per example
                # (whose floor is a read pass), one read pass.
                anchor = by_key.get("floor") or by_key.get("read")
                for r in section:
                    r["ratio_anchor"] = _ratio(r["median_ms"], anchor)
                    r["ratio_torch"] = _ratio(r["median_ms"], by_key.get("torch"))
                    r["ratio_optax"] = _ratio(r["median_ms"], by_key.get("optax"))
                    r["ratio_naive"] = _ratio(r["median_ms"], by_key.get("naive"))
                rows.extend(section)
            del data
            if ctx.gpu:
                _release_gpu(backend)
    return {
        "gradclip": gc.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine or _machine(),
        "settings": {
            "backend": backend,
            "trees": list(trees),
            "reps": reps,
            "budget_s": budget,
            "max_norm": max_norm,
            "no_clip_max_norm": NO_CLIP,
            "size_factor": size_factor,
            "skip": list(skip),
            "seed": SEED,
            "dtype": dtype,
            "device": "gpu" if ctx.gpu else "cpu",
        },
        "notes": notes,
        "failed": failed,
        "trees": tree_info,
        "rows": rows,
        # The targets bound the global clip's trees: none for a dp-only run.
        "targets": [] if examples_only else _targets(rows, backend, ctx.gpu),
        "wall_s": time.perf_counter() - started,
    }


def _gpu_data(ctx: _Context, name: str, size_factor: int, dtype: Any) -> _Data:
    """A global-norm tree drawn on the GPU, in the backend's arrays."""
    if ctx.backend == "jax":
        return _jax_data(name, size_factor, dtype, _jax_device(True))
    if ctx.backend == "torch":
        return _device_data(name, size_factor, dtype, _torch_source, _torch_norm)
    return _device_data(name, size_factor, dtype)


@dataclass
class _Ready:
    """A row built, compiled where it is a JAX row, and warmed up: ready to time."""

    timed: _Timed
    compiled: dict[str, Any]  # _COMPILE_FIELDS
    warmup_s: float
    warmup_compiles: int | None
    peak_temp_bytes: int | None


def _ready(
    ctx: _Context, data: _Data, row: _Row, max_norm: float, *, compile: bool = False
) -> _Ready:
    """Build one row's buffers and warm it up; ``compile``: first measure a JAX row's compile."""
    timed = row.make(ctx, data, max_norm)
    compiled: dict[str, Any] = dict.fromkeys(_COMPILE_FIELDS)
    if compile and timed.compile is not None:
        compiled = _measure_compile(timed)
    start = time.perf_counter()
    watch: contextlib.AbstractContextManager[list[float]]
    watch = _xla_compiles() if row.jax else contextlib.nullcontext([])
    with watch as again:
        timed.fresh()
        timed.done(timed.call())  # warm-up: first touches, thread pools, jit dispatch
    warmup = time.perf_counter() - start
    peak = _peak_bytes(timed) if row.numpy_memory else None
    return _Ready(timed, compiled, warmup, len(again) if row.jax else None, peak)


def _report(
    data: _Data,
    row: _Row,
    case: str,
    max_norm: float,
    ready: _Ready,
    times: list[float],
    out: Any,
) -> dict[str, Any]:
    """One row's figures, and the check of its last result."""
    timed = ready.timed
    before = data.norm if timed.reference is None else timed.reference
    if timed.check is not None:  # a per-example row: its sum against the reference
        checked = timed.check(out)
    else:
        after = data.measure(timed.result(out))
        # A row that does not clip (the GPU's copy) must leave the norm as it was.
        error = _norm_error(after, before, max_norm if row.clips else NO_CLIP)
        checked = {"norm_after": after, "norm_error": error, "check_ok": _did_the_work(error)}
    ms = [t * 1e3 for t in times]
    return {
        "tree": data.name,
        "case": case,
        "key": row.key,
        "row": row.label,
        "max_norm": max_norm,
        "median_ms": statistics.median(ms),
        "min_ms": min(ms),
        "reps": len(ms),
        "peak_temp_bytes": ready.peak_temp_bytes,
        "warmup_s": ready.warmup_s,
        **ready.compiled,
        "warmup_compiles": ready.warmup_compiles,
        "norm_before": before,
        **checked,
        "times_ms": ms,
    }


def _run_row(
    ctx: _Context,
    data: _Data,
    row: _Row,
    case: str,
    max_norm: float,
    reps: int,
    budget: float,
    *,
    compile: bool = False,
) -> dict[str, Any]:
    """Build one row, warm it up, time it alone, and check its result (see :func:`_ready`)."""
    ready = _ready(ctx, data, row, max_norm, compile=compile)
    [(times, out)] = _time([ready.timed], reps, budget)
    return _report(data, row, case, max_norm, ready, times, out)


def _summary(done: dict[str, Any]) -> str:
    summary = f"{done['median_ms']:.3f} ms"
    if done["compile_s"] is not None:
        summary += f", compiled in {done['compile_s']:.1f} s"
    return summary


# ---------------------------------------------------------------------- output


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


_HEAD = (
    "row",
    "median ms",
    "min ms",
    "reps",
    "x anchor",
    "x torch",
    "x optax",
    "x naive",
    "compile s",
    "peak MB",
    "norm err",
    "",
)


def _table(section: list[dict[str, Any]]) -> list[str]:
    """One section's rows as aligned text lines, a header first."""
    table = [_HEAD]
    for r in section:
        peak = r["peak_temp_bytes"]
        table.append(
            (
                r["row"],
                f"{r['median_ms']:.3f}",
                f"{r['min_ms']:.3f}",
                str(r["reps"]),
                _fmt(r["ratio_anchor"], ".2f", "x"),
                _fmt(r["ratio_torch"], ".2f", "x"),
                _fmt(r["ratio_optax"], ".2f", "x"),
                _fmt(r.get("ratio_naive"), ".2f", "x"),  # absent from older reports
                _fmt(r["compile_s"], ".2f"),
                _fmt(None if peak is None else peak / 2**20, ".1f"),
                f"{r['norm_error']:+.0e}" if r["norm_error"] else "0",
                "" if r["check_ok"] else "WRONG RESULT",
            )
        )
    widths = [max(len(cells[i]) for cells in table) for i in range(len(_HEAD))]
    return [
        "  "
        + "  ".join(
            [
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ]
        ).rstrip()
        for cells in table
    ]


def _target_line(t: dict[str, Any]) -> str:
    verdict = {True: "PASS", False: "MISS", None: "n/a "}[t["met"]]
    if t["value"] is None:
        return f"  {verdict}  {t['target']}: not measured"
    value = _FORMAT[t["unit"]].format(t["value"])
    if t["unit"] == "ms" and t["ratio_torch"] is not None:
        value += f" ({t['ratio_torch']:.2f}x torch foreach)"
    if t["unit"] == "s" and t["optax_compile_s"] is not None:
        value += f" (optax {t['optax_compile_s']:.3g} s)"
    return f"  {verdict}  {t['target']}: {value}"


def _example_header(name: str, info: dict[str, Any], max_norm: float) -> str:
    """The title line of a per-example tree's table."""
    return (
        f"{name}: {info['batch']} examples x {info['example_elements']:,} elements "
        f"({info['leaves']} leaves, {info['elements'] / 1e6:.1f}M in all), example norms "
        f"{info['example_norm_min']:.3g} to {info['example_norm_max']:.3g} "
        f"(median {info['example_norm_median']:.3g}) -- per-example clip "
        f"(max_norm={max_norm:g}, eps={info['eps']:g}, reduce='sum'): {info['num_clipped']} "
        f"of {info['batch']} examples clipped; x anchor = x one read pass"
    )


def format_report(report: dict[str, Any]) -> str:
    """The report as text: notes, one table per tree and case, then the targets.

    Parameters
    ----------
    report : dict
        What :func:`bench` returned.

    Returns
    -------
    str
        Lines ready to print.
    """
    s, machine = report["settings"], report["machine"]
    # Reports from before --device ran on a GPU under cupy only.
    gpu = s.get("device", "gpu" if s["backend"] == "cupy" else "cpu") == "gpu"
    lines = [
        f"gradclip {report['gradclip']} bench: backend {s['backend']}, {s['dtype']}, "
        f"on the {'GPU' if gpu else 'CPU'}, "
        f"at least {s['reps']} timed calls per row ({s['budget_s']:g} s budget); "
        f"{machine['cpu_count']} CPUs ({machine['cpu']})"
        + (f", GPU {machine['gpu']}" if machine["gpu"] else "")
    ]
    lines += [f"note: {n}" for n in report["notes"]]
    for name in s["trees"]:
        info = report["trees"][name]
        if name in EXAMPLE_TREES:
            lines += ["", _example_header(name, info, s["max_norm"])]
            lines += _table([r for r in report["rows"] if r["tree"] == name])
            continue
        size = f"{info['leaves']} leaves, {info['elements'] / 1e6:.1f}M elements"
        if "bytes" in info:  # a GPU run, or a dtype other than float32
            nbytes = info["bytes"]
            amount = f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
            size += f" ({amount} {info['dtype']})"
        if info.get("copy_gb_per_s") is not None:
            size += f", copy {info['copy_gb_per_s']:.0f} GB/s"
        norm = f"norm {info['norm']:.4g}"
        if "flat_norm" in info:
            norm += f" (the floor's flat buffer: {info['flat_norm']:.4g})"
        for case in CASES:
            if case == "clip":
                floor = "x floor (3x bytes / copy bandwidth)" if gpu else "x floor"
                what = f"clip (max_norm={s['max_norm']:g}); x anchor = {floor}"
            else:
                what = f"no clip (max_norm={NO_CLIP:g}, scale 1); x anchor = x one read pass"
            lines += ["", f"{name}: {size}, {norm} -- {what}"]
            lines += _table([r for r in report["rows"] if r["tree"] == name and r["case"] == case])
    if report["targets"]:
        typed = gpu or s["dtype"] != "float32"
        lines += ["", f"targets (gradclip rows{', ' + s['dtype'] if typed else ''}):"]
        lines += [_target_line(t) for t in report["targets"]]
    elif all(name in EXAMPLE_TREES for name in s["trees"]):
        lines += ["", "targets: none set for per-example clipping (issue 8)"]
    else:
        lines += ["", f"targets: none set for the {s['backend']} backend"]
    lines += [
        f"note: {r['tree']}: {r['row']} took {r['warmup_s']:.0f} s to warm up, untimed"
        for r in report["rows"]
        if r["warmup_s"] > 5
    ]
    lines += [
        f"note: {r['tree']}: {r['row']}: no XLA compile seen while compiling "
        "(a cache hit?): compile time not counted"
        for r in report["rows"]
        if r["xla_compiles"] == 0
    ]
    lines += [
        f"note: {r['tree']} {r['case']}: {r['row']} compiled again on its first call"
        for r in report["rows"]
        if r["warmup_compiles"]
    ]
    wrong = sum(not r["check_ok"] for r in report["rows"])
    if wrong:
        lines.append(f"WRONG RESULT: {wrong} rows left a norm that clipping to max_norm cannot")
    lines.append(
        "norm err: the norm after the call relative to min(norm, max_norm), minus 1 "
        "(float32 accumulation shows here); peak MB: tracemalloc, NumPy rows only"
    )
    if any(name in EXAMPLE_TREES for name in s["trees"]):
        lines.append(
            "dp: norm err = |sum - float64 reference sum| / |reference sum| (the read pass: "
            "its norm unchanged), and each row's count of clipped examples must be the "
            "reference's; jitted rows are not donated"
        )
    if gpu and any(r["key"] == "floor" for r in report["rows"]):
        lines.append(
            "floor (GPU): 3 passes over the tree's bytes (the norm's read, the scale's read "
            "and write) at the bandwidth of the device-to-device copy timed in this run "
            "(2 x bytes / copy time), so 1.5x the copy's time; '% of the floor's bandwidth' "
            "= floor time / row time. Times are wall clock, a device sync included"
        )
    if any(r["compile_s"] is not None for r in report["rows"]):
        lines.append(
            "compile s: jax.jit(f, donate_argnums=0).lower(grads, max_norm).compile(), "
            "wall time (trace, lower, XLA), JAX's caches cleared before each tree; "
            "once per tree, in the clip case (the no-clip case reuses the executable)"
            + (
                "; gradclip.jax, which compiles inside: its first call, one step included"
                if any(r["key"] == "gcjax" for r in report["rows"])
                else ""
            )
        )
    lines.append(f"{report['wall_s']:.0f} s in all")
    return "\n".join(lines)


# ---------------------------------------------------------------------- the CLI


def positive(kind: Callable[[str], Any], *, zero: bool = False) -> Callable[[str], Any]:
    """Type of an argument that must be > 0 (``zero``: >= 0, as a seed)."""

    def parse(text: str) -> Any:
        value = kind(text)
        if not (value >= 0 if zero else value > 0):
            raise argparse.ArgumentTypeError(f"must be {'>=' if zero else '>'} 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def output_path(text: str) -> str:
    """Type of an argument naming a file written at the end: checked before the run.

    Its directory is made if need be and must be writable, and the path must
    not be a directory: a run of minutes would otherwise end in a traceback,
    its results lost.
    """
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    directory = os.path.dirname(text) or "."
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot make {directory}: {err.strerror}") from None
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory")
    if not os.access(directory, os.W_OK):
        raise argparse.ArgumentTypeError(f"{directory} is not writable")
    return text


def _skip_entry(text: str) -> tuple[str, str | None]:
    """``ROW`` or ``ROW:TREE`` (see :func:`bench`'s ``skip``) as (row, tree or None)."""
    key, colon, tree = text.partition(":")
    if key not in SKIPPABLE:
        raise ValueError(f"--skip {text}: the row must be one of {', '.join(SKIPPABLE)}")
    if colon and tree not in ALL_TREES:
        raise ValueError(f"--skip {text}: the tree must be one of {', '.join(ALL_TREES)}")
    return key, tree or None


def _skip_arg(text: str) -> str:
    try:
        _skip_entry(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser``.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The ``bench`` subcommand's parser, or a parser of its own.
    """
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="numpy",
        help="arrays to clip (default numpy); cupy runs on a GPU, torch and jax on one "
        "where they see it (see --device), with GPU-sized trees (llm 1.01e9 elements, "
        "huge 2**30)",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default=None,
        help="where the arrays live (default: gpu where the backend sees one, i.e. "
        "torch.cuda.is_available() or jax.default_backend() is a GPU, else cpu); "
        "numpy runs on the cpu only, cupy on the gpu only",
    )
    parser.add_argument(
        "--tree",
        choices=(*ALL_TREES, "all"),
        default="all",
        help=f"tree to time (default all: {', '.join(TREES)}); dp times per-example "
        f"clipping instead, {EXAMPLE_BATCH} examples of a scaled-down llm tree (the same "
        "size on a GPU) against optax (jax) or a naive loop (numpy, torch, cupy), and "
        "runs only when named",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="element type of the trees (default float32); bfloat16 on --backend cupy, "
        "jax (CPU or GPU) and torch on a GPU",
    )
    parser.add_argument(
        "--json", metavar="PATH", type=output_path, help="also write the report as JSON to PATH"
    )
    parser.add_argument(
        "--reps", type=positive(int), default=15, help="timed calls per row, at least (default 15)"
    )
    parser.add_argument(
        "--budget",
        type=positive(float),
        default=1.0,
        help="seconds per row after which it stops adding calls beyond --reps (default 1)",
    )
    parser.add_argument(
        "--max-norm", type=positive(float), default=1.0, help="max_norm when clipping (default 1)"
    )
    parser.add_argument(
        "--skip",
        metavar="ROW[:TREE]",
        type=_skip_arg,
        action="append",
        default=[],
        help=(
            f"leave out an anchor ({', '.join(SKIPPABLE)}), on every tree or on one; "
            "repeatable. optax:small saves the ~2 minutes XLA takes to compile "
            "optax for the 2000-leaf tree, and leaves targets relative to it unmeasured"
        ),
    )
    # Divides every dimension: lets the tests run the whole harness in a second.
    parser.add_argument("--size-factor", type=positive(int), default=1, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed ``bench`` arguments, print it, and write the JSON.

    Parameters
    ----------
    args : argparse.Namespace
        From a parser set up by :func:`add_arguments`.

    Returns
    -------
    int
        Exit status: 0, also when a target is missed (that is reported, not an
        error); 1 when a row's result failed its check or a GPU row raised,
        so a script that runs the harness sees a broken path.
    """
    trees = TREES if args.tree == "all" else (args.tree,)
    report = bench(
        args.backend,
        trees,
        reps=args.reps,
        budget=args.budget,
        max_norm=args.max_norm,
        size_factor=args.size_factor,
        skip=args.skip,
        dtype=args.dtype,
        device=args.device,
    )
    command = (
        f"python -m gradclip bench --backend {args.backend} --tree {args.tree} "
        f"--reps {args.reps} --budget {args.budget!r} --max-norm {args.max_norm!r}"
    )
    if args.device is not None:
        command += f" --device {args.device}"
    if args.dtype != "float32":
        command += f" --dtype {args.dtype}"
    command += "".join(f" --skip {entry}" for entry in args.skip)
    if args.size_factor != 1:
        command += f" --size-factor {args.size_factor}"
    report = {"command": command, **report}
    print(format_report(report))
    if args.json is not None:  # its directory made by output_path
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        print(f"\nwrote {args.json}")
    return 1 if report["failed"] or not all(r["check_ok"] for r in report["rows"]) else 0
