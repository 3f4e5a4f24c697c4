"""Where the GPU paths spend their time: a diagnostic for a GPU session, not a benchmark.

    python3 benchmarks/gpu_profile.py host    # cProfile of the small tree's calls
    python3 benchmarks/gpu_profile.py kernels # the kernels alone, by CUDA events
    python3 benchmarks/gpu_profile.py small   # the small tree's clip, split into its parts

``host``: 30 calls of ``gradclip.clip_by_global_norm`` on the benchmark's
small tree (2000 leaves) as CuPy arrays and as a FlatTree of them, and of
``gradclip.torch.clip_grad_norm_`` on it as CUDA tensors: first their wall time
per call, then under cProfile the functions with the most own time.

``small``: the in-place clip of the small tree (2000 leaves), and of a
FlatTree of it, by ``cupyx.profiler.benchmark`` (host and GPU time per call),
beside the host steps it takes before its two launches. Run under ``ncu``
(``gpu_session.sh profile-small``) for each kernel's own time.

``kernels``: ``global_norm`` (the norm kernel), the in-place clip with no
clip to do (norm kernel, then a scale kernel that writes nothing) and the
clip into a new array (norm kernel, then a scale kernel that writes) on one
leaf of 2**28 elements, float32 and bfloat16, each against a device-to-device
copy of the same bytes and CuPy's own sum of squares, in GB/s.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

import cupy as cp
import numpy as np

import gradclip as gc
from gradclip import _bench


def _host() -> None:
    import torch

    import gradclip.torch as gct

    sizes = _bench.tree_sizes("small", gpu=True)
    rng = np.random.default_rng(0)
    host = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    cupy_tree = [cp.asarray(h) for h in host]
    torch_tree = [torch.tensor(h, device="cuda", requires_grad=True) for h in host]
    for p in torch_tree:
        p.grad = torch.ones_like(p)
    flat = gc.FlatTree.from_tree(cupy_tree)
    calls = {
        "cupy FlatTree clip_by_global_norm_": lambda: gc.clip_by_global_norm_(flat, 1.0),
        "cupy clip_by_global_norm": lambda: gc.clip_by_global_norm(cupy_tree, 1.0),
        "cupy clip_by_global_norm_": lambda: gc.clip_by_global_norm_(cupy_tree, 1e30),
        "torch clip_grad_norm_": lambda: gct.clip_grad_norm_(torch_tree, 1.0),
    }
    for name, call in calls.items():
        for _ in range(3):  # compile, cache the layout
            call()
        cp.cuda.Device().synchronize()
        start = time.perf_counter()
        for _ in range(30):
            call()
        cp.cuda.Device().synchronize()
        print(f"\n===== {name}: {(time.perf_counter() - start) / 30 * 1e6:.0f} us per call")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(30):
            call()
        cp.cuda.Device().synchronize()
        prof.disable()
        print(f"\n===== {name}: 30 calls")
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def _small() -> None:
    from cupyx.profiler import benchmark

    from gradclip import _api
    from gradclip.cupy import _fast, _launch

    sizes = _bench.tree_sizes("small", gpu=True)
    rng = np.random.default_rng(0)
    tree = [cp.asarray(rng.standard_normal(n).astype(np.float32)) for n in sizes]
    flat = gc.FlatTree.from_tree([cp.asarray(x) for x in tree])
    dev = _fast._device(tree, None)
    steps = {
        "clip_by_global_norm_(tree)": lambda: gc.clip_by_global_norm_(tree, 1.0),
        "clip_by_global_norm_(FlatTree)": lambda: gc.clip_by_global_norm_(flat, 1.0),
        "global_norm(tree)": lambda: gc.global_norm(tree),
        "  _api._plain": lambda: _api._plain(tree, True),
        "  _launch.supported": lambda: _launch.supported(tree),
        "  _launch.layout (cached)": lambda: _launch.layout(dev, tree),
    }
    print(f"===== small tree: {len(tree)} leaves, host and GPU time per call (median us)")
    for name, fn in steps.items():
        r = benchmark(fn, n_repeat=200, n_warmup=5)
        cpu, gpu = (float(np.median(t)) * 1e6 for t in (r.cpu_times, r.gpu_times[0]))
        print(f"  {name:34s} cpu {cpu:9.1f}  gpu {gpu:9.1f}")


def _events(fn, reps: int = 20) -> float:
    """Median milliseconds of ``fn`` on the current stream."""
    fn()
    times = []
    for _ in range(reps):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def _rows(x: cp.ndarray) -> None:
    y = cp.empty_like(x)
    rows = {
        "copy (read + write)": (lambda: y.__setitem__(..., x), 2),
        "cupy sum of squares": (lambda: cp.sum(cp.square(x.astype(np.float32, copy=False))), 1),
        "gradclip global_norm": (lambda: gc.global_norm(x), 1),
        "gradclip clip_ no clip": (lambda: gc.clip_by_global_norm_([x], 1e30), 1),
        "gradclip clip (new array)": (lambda: gc.clip_by_global_norm([x], 1e-3), 3),
    }
    print(f"\n===== one leaf of {x.size} {x.dtype.name} ({x.nbytes / 2**30:.2f} GiB)")
    for name, (fn, passes) in rows.items():
        ms = _events(fn)
        print(f"  {name:26s} {ms:8.3f} ms  {passes * x.nbytes / ms / 1e6:7.0f} GB/s")


def _kernels() -> None:
    import ml_dtypes

    for dtype in (np.float32, ml_dtypes.bfloat16):
        _rows(cp.random.standard_normal(1 << 28, dtype=np.float32).astype(dtype))
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    {"host": _host, "kernels": _kernels, "small": _small}[sys.argv[1]]()
