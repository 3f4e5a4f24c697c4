"""``import gradclip`` loads no torch, jax or cupy (they are detected, never imported)."""

from __future__ import annotations

import subprocess
import sys


def test_import_loads_no_backend():
    code = (
        "import sys, gradclip, numpy as np\n"
        "gradclip.clip_by_global_norm([np.ones(3)], 1.0)\n"
        "heavy = ('torch', 'jax', 'jaxlib', 'cupy', 'dask', 'ml_dtypes')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_api():
    import gradclip

    assert set(gradclip.__all__) >= {
        "global_norm",
        "leaf_norms",
        "clip_by_global_norm",
        "clip_by_global_norm_",
        "clip_by_value",
        "clip_by_value_",
        "clip_by_norm",
        "clip_by_norm_",
        "clip_by_block_rms",
        "ClipStats",
        "NonFiniteError",
    }
    assert all(hasattr(gradclip, name) for name in gradclip.__all__)
