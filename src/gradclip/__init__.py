"""gradclip: gradient clipping for NumPy, CuPy, JAX and PyTorch arrays.

One core written against the Python array API standard, with backend fast
paths where the hot loop lives. ``import gradclip`` imports no torch, jax or
cupy: backends are detected from the arrays you pass.
"""

from ._api import (
    clip_by_block_rms,
    clip_by_global_norm,
    clip_by_global_norm_,
    clip_by_norm,
    clip_by_norm_,
    clip_by_value,
    clip_by_value_,
    global_norm,
    leaf_norms,
    per_example_clip,
)
from ._flat import FlatTree
from ._stats import ClipStats, NonFiniteError, PerExampleStats

__version__ = "0.1.0.dev0"

__all__ = [
    "ClipStats",
    "FlatTree",
    "NonFiniteError",
    "PerExampleStats",
    "__version__",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_global_norm_",
    "clip_by_norm",
    "clip_by_norm_",
    "clip_by_value",
    "clip_by_value_",
    "global_norm",
    "leaf_norms",
    "per_example_clip",
]
