"""Record the foundation's accuracy and memory figures, with the machine they came from.

- accuracy: relative error of ``global_norm`` on one 64M-element float32
  N(0,1) leaf against a float64 reference, on every installed backend, next
  to a plain float32 ``np.dot`` (the anchor);
- memory: peak temporaries (tracemalloc) while clipping 1 GiB of float32
  NumPy gradients in place, next to ``np.sum(x * x)`` on one 64 MiB leaf.

Usage: ``python benchmarks/accuracy_memory.py [--json PATH]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import tracemalloc

import numpy as np

import gradclip as gc

N = 64 * 2**20


def machine() -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def backends(host: np.ndarray):
    yield "numpy", host
    if importlib.util.find_spec("array_api_strict"):
        import array_api_strict

        yield "array_api_strict", array_api_strict.asarray(host)
    if importlib.util.find_spec("torch"):
        import torch

        yield "torch", torch.from_numpy(host)
    if importlib.util.find_spec("jax"):
        import jax
        import jax.numpy as jnp

        yield "jax (float32 accumulator)", jnp.asarray(host)
        jax.config.update("jax_enable_x64", True)
        yield "jax (jax_enable_x64)", jnp.asarray(host)
        jax.config.update("jax_enable_x64", False)
    if importlib.util.find_spec("dask"):
        import dask.array as da

        yield "dask", da.from_array(host, chunks=2**24)


def accuracy() -> dict[str, float]:
    host = np.random.default_rng(2).standard_normal(N, dtype=np.float32)
    wide = host.astype(np.float64)
    want = math.sqrt(float(np.dot(wide, wide)))
    del wide
    rows = {"np.dot float32 (anchor)": abs(math.sqrt(float(np.dot(host, host))) - want) / want}
    for name, leaf in backends(host):
        rows[f"gradclip {name}"] = abs(float(gc.global_norm([leaf])) - want) / want
    generic = float(gc.global_norm([host], fused=False))
    rows["gradclip numpy (generic path, fused=False)"] = abs(generic - want) / want
    return rows


def peak(fn) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def memory() -> dict[str, float]:
    leaves = [np.full(2**24, 3.0, np.float32) for _ in range(16)]  # 16 x 64 MiB = 1 GiB
    one = leaves[0].copy()
    mib = 2**20

    def fast() -> None:
        gc.clip_by_global_norm_(leaves, 1.0)

    def generic() -> None:
        gc.clip_by_global_norm_(leaves, 1.0, fused=False)

    return {
        "gradclip clip_by_global_norm_ 1 GiB (MiB)": peak(fast) / mib,
        "gradclip generic path (fused=False) 1 GiB (MiB)": peak(generic) / mib,
        "np.sum(x * x) on one 64 MiB leaf (MiB)": peak(lambda: np.sum(one * one)) / mib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    result = {
        "machine": machine(),
        "relative_error_64M_float32": accuracy(),
        "peak_temporaries": memory(),
    }
    for section in ("relative_error_64M_float32", "peak_temporaries"):
        print(section)
        for k, v in result[section].items():
            print(f"  {k:<48} {v:.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
