"""CuPy raw-kernel path: multi-tensor norm, scale and clamp kernels for CUDA.

The top-level functions use it for CuPy arrays (``fused=None`` or ``True``);
nothing here is public. ``_kernels.cu`` holds the CUDA source, compiled with
NVRTC on first use and cached per device; ``_launch`` builds the tables and
launches; ``_fast`` implements the functions of :mod:`gradclip._core`.
"""
