"""The torch fast path's CUDA-kernel route, run on the CPU over the emulated kernels.

On CUDA tensors with CuPy installed, ``gradclip.torch._fast.TorchPlan`` hands
the norm and the scale to gradclip's CUDA kernels through DLPack. Here the
route is given the CPU emulation of those kernels (``tests/cuda_emulator``)
over NumPy views of CPU tensors, so everything but DLPack and the stream runs:
the partials built from the kernels' norms, the per-leaf and global paths,
the scale kernel, and the drop-ins on top. The results must equal the generic
path's. The real route runs in ``tests/test_torch_gpu.py`` where there is a GPU.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest

import cuda_emulator
import gradclip as gc
from conftest import importorskip

torch = importorskip("torch")
ml_dtypes = importorskip("ml_dtypes")

import gradclip.torch as gct  # noqa: E402  (after the skips)
from gradclip.torch import _fast  # noqa: E402

THREADS, CHUNK, SMALLK = 4, 256, 2  # small chunks: many blocks per leaf, as on a GPU
ORDS = [2.0, 1.0, 3.5, math.inf, -math.inf, 0.0]
DTYPES = ["float16", "bfloat16", "float32", "float64", "mixed"]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    problem = cuda_emulator.compiler_problem()
    if problem:
        pytest.skip(problem)
    library = cuda_emulator.build(tmp_path_factory.mktemp("emulator"), THREADS)
    return cuda_emulator.EmuDevice(library, THREADS, CHUNK, SMALLK)


def _view(t):
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@pytest.fixture
def kernels(emu, monkeypatch):
    """Route CPU tensors to the emulated kernels; the device's launches are recorded."""

    def route(leaves):
        arrays = [_view(x) for x in leaves]  # views: the tensors keep the memory
        return _fast.Kernels(
            emu,
            _fast.Leaves(
                tuple(map(emu.ptr, arrays)),
                tuple(a.size for a in arrays),
                tuple(a.dtype for a in arrays),
            ),
            contextlib.nullcontext,
            lambda a: torch.from_numpy(np.array(a)),
            lambda t: _view(t.contiguous()),
        )

    monkeypatch.setattr(_fast, "USE_NUMPY_VIEWS", False)
    monkeypatch.setattr(_fast, "kernel_route", route)
    emu.launches.clear()
    return emu


def _grads(dtype, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(300,), (17, 40), (1,), (0,), (1000,), (5, 5)]
    kinds = {"mixed": ["float32", "float16", "float64", "bfloat16", "float32", "float16"]}
    names = kinds.get(dtype, [dtype] * len(sizes))
    return [
        torch.from_numpy(rng.standard_normal(s) * 3).to(getattr(torch, d))
        for s, d in zip(sizes, names, strict=True)
    ]


def _params(grads):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    return params


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_grad_norm_matches_generic(kernels, dtype, ord):
    grads = _grads(dtype)
    ref_params, params = _params(grads), _params(grads)
    want = gct.get_total_norm(grads, ord, foreach=False)
    max_norm = 0.25 * float(want) if float(want) > 0 else 1.0
    ref = gct.clip_grad_norm_(ref_params, max_norm, ord, foreach=False)
    versions = [p.grad._version for p in params]
    got = gct.clip_grad_norm_(params, max_norm, ord)
    # The kernel writes behind torch's back; autograd must still see them.
    assert all(p.grad._version > v for p, v in zip(params, versions, strict=True))
    assert got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    for p, q in zip(params, ref_params, strict=True):
        # One rounding to the leaf dtype on both sides (the kernel rounds the
        # scale as the generic path does): equal, or 1 ulp off for halves.
        tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(p.grad.dtype, 1e-6)
        torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=0)
    assert any(name.startswith("gc_norm") for name in kernels.launches)
    assert "gc_scale" in kernels.launches


@pytest.mark.parametrize("dtype", ["float32", "mixed"])
def test_per_leaf_and_top_level_functions(kernels, dtype):
    grads = _grads(dtype)
    for ord in (2.0, math.inf):
        np.testing.assert_allclose(
            gc.leaf_norms(grads, ord).numpy(), gc.leaf_norms(grads, ord, fused=False).numpy(),
            rtol=1e-6,
        )  # fmt: skip
    ours, ref = [g.clone() for g in grads], [g.clone() for g in grads]
    got = gc.clip_by_norm_(ours, 1.0)
    want = gc.clip_by_norm_(ref, 1.0, fused=False)
    torch.testing.assert_close(got.scale, want.scale, rtol=1e-6, atol=0)
    for a, b in zip(ours, ref, strict=True):
        tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(a.dtype, 1e-6)
        torch.testing.assert_close(a, b, rtol=tol, atol=0)


@pytest.mark.parametrize("nonfinite", ["propagate", "zero", "skip", "raise"])
def test_nonfinite_policies(kernels, nonfinite):
    grads = _grads("float32")
    grads[4][7] = math.nan
    grads[0][3] = math.inf
    params, ref_params = _params(grads), _params(grads)
    if nonfinite == "raise":
        with pytest.raises(gc.NonFiniteError, match=r"parameters\[0\]\.grad"):
            gct.clip_grad_norm_(params, 1.0, nonfinite="raise")
        for p, g in zip(params, grads, strict=True):
            torch.testing.assert_close(p.grad, g, equal_nan=True, rtol=0, atol=0)
        return
    got = gct.clip_grad_norm_(params, 1.0, nonfinite=nonfinite, return_stats=True)
    want = gct.clip_grad_norm_(
        ref_params, 1.0, nonfinite=nonfinite, foreach=False, return_stats=True
    )
    for field in ("norm", "scale", "clipped", "finite"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), equal_nan=True)
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True, rtol=1e-6, atol=0)


@pytest.mark.parametrize("nonfinite", ["propagate", "raise"])
def test_neg_inf_norm_with_an_empty_leaf(kernels, nonfinite):
    # "raise" takes per-leaf partials; the empty leaf's was its norm, 0, and
    # the min over leaves was 0: nothing clipped.
    grads = [torch.full((3,), 2.0), torch.zeros(0)]
    params = _params(grads)
    norm = gct.clip_grad_norm_(params, 1.0, norm_type=-math.inf, nonfinite=nonfinite)
    assert float(norm) == 2.0
    torch.testing.assert_close(params[0].grad, torch.full((3,), 1.0), rtol=1e-6, atol=0)
    assert gct.get_total_norm(grads, -math.inf, error_if_nonfinite=True) == 2.0
    assert float(gc.leaf_norms(grads, ord=-math.inf)[1]) == 0.0  # an empty leaf's own norm


@pytest.mark.parametrize("alias", ["same", "overlapping", "disjoint"])
def test_tensors_sharing_memory_are_scaled_one_after_the_other(kernels, alias):
    # As on the CuPy path: one scale launch over tensors sharing memory
    # would race on a GPU; they are scaled in turn, shared entries twice.
    buf = torch.ones(3000)
    grads = {
        "same": [buf, buf],
        "overlapping": [buf[:2000], buf[1000:]],
        "disjoint": [buf[:1500], buf[1500:]],
    }[alias]
    gc.clip_by_global_norm_(grads, 1.0, norm=torch.tensor(2.0), eps=0.0)
    assert ("gc_scale" in kernels.launches) == (alias == "disjoint")
    want = torch.full((3000,), 0.5)
    want[{"same": slice(0, 3000), "overlapping": slice(1000, 2000)}.get(alias, slice(0, 0))] = 0.25
    torch.testing.assert_close(buf, want, rtol=0, atol=0)


def test_extremes_do_not_overflow(kernels):
    huge64 = torch.full((3,), 1e300, dtype=torch.float64)
    grads = [torch.full((1000,), 1e30), torch.full((10,), 1e-30), huge64]
    norm = gct.get_total_norm(grads)
    want = math.sqrt(3) * 1e300  # the float64 leaf dominates
    assert float(norm) == pytest.approx(want, rel=1e-12)
    only32 = gct.get_total_norm(grads[:2])
    assert float(only32) == pytest.approx(math.sqrt(1000) * 1e30, rel=1e-6)


def test_amp_inv_scale(kernels):
    grads = _grads("float32")
    params, ref_params = _params(grads), _params(grads)
    got = gct.clip_grad_norm_(params, 1.0, inv_scale=torch.tensor(2.0**-10))
    for q in ref_params:
        q.grad.mul_(2.0**-10)
    want = gct.clip_grad_norm_(ref_params, 1.0, foreach=False)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_block_rms_past_double(kernels, dtype):
    """A leaf whose norm is past double (4 entries of 1e308) but whose rms is not."""
    grads = [torch.full((4,), 1e308, dtype=dtype), torch.full((3,), 2.0)]
    got = gc.clip_by_block_rms(grads, 1e300)
    want = gc.clip_by_block_rms(grads, 1e300, fused=False)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert float(got[0][0].real) == pytest.approx(1e300, rel=1e-12)
    assert any(name.startswith("gc_norm") for name in kernels.launches)
