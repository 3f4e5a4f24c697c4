"""gradclip.torch on CUDA tensors: the CuPy-kernel route against the generic path.

Runs where torch sees a CUDA device and CuPy is installed (the ``gpu`` nox
session); elsewhere it skips, saying why. ``tests/test_torch_kernels.py``
runs the same route's logic on the CPU over the emulated kernels.
"""

from __future__ import annotations

import math
import warnings

import pytest

import gradclip as gc
from conftest import importorskip

torch = importorskip("torch")
importorskip("cupy")
if not torch.cuda.is_available():
    pytest.skip("torch sees no CUDA device", allow_module_level=True)

import gradclip.torch as gct  # noqa: E402  (after the skips)
from gradclip.torch import _fast  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
HALF_RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _grads(dtype, sizes=(3000, 1, 0, 70_000, 4096), seed=0, scale=3.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [
        (torch.randn(n, generator=g, device="cuda", dtype=torch.float64) * scale).to(dtype)
        for n in sizes
    ]


def _params(grads):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    return params


def test_the_kernels_take_cuda_tensors():
    plan = _fast.TorchPlan(gc._compat.namespace(torch.empty(0)), 2.0, _grads(torch.float32))
    assert plan._kernels is not None


def test_bfloat16_without_ml_dtypes_takes_another_route(monkeypatch):
    # The route types bfloat16 bits with ml_dtypes, which neither gradclip
    # nor torch requires: without it, its import failed every bf16 call.
    find_spec = _fast.importlib.util.find_spec
    monkeypatch.setattr(
        _fast.importlib.util,
        "find_spec",
        lambda n, *a: None if n == "ml_dtypes" else find_spec(n, *a),
    )
    grads = _grads(torch.bfloat16)
    assert _fast.TorchPlan(gc._compat.namespace(grads[0]), 2.0, grads)._kernels is None
    params, ref = _params(grads), _params(grads)
    got = gct.clip_grad_norm_(params, 1.0)
    want = gct.clip_grad_norm_(ref, 1.0, foreach=False)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("ord", [2.0, 1.0, 3.5, math.inf, -math.inf, 0.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_grad_norm_matches_generic(dtype, ord):
    grads = _grads(dtype)
    params, ref_params = _params(grads), _params(grads)
    total = float(gct.get_total_norm(grads, ord, foreach=False))
    max_norm = 0.25 * total if total > 0 else 1.0
    want = gct.clip_grad_norm_(ref_params, max_norm, ord, foreach=False)
    got = gct.clip_grad_norm_(params, max_norm, ord)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=HALF_RTOL.get(dtype, 1e-6), atol=0)


def test_overflow_safe_where_torch_is_not():
    grads = [torch.full((1 << 20,), 1e20, device="cuda")]
    assert math.isinf(float(torch.nn.utils.get_total_norm(grads)))
    assert float(gct.get_total_norm(grads)) == pytest.approx(1e20 * 1024, rel=1e-6)


def test_non_default_stream_and_bit_identical_runs():
    grads = _grads(torch.float32, sizes=(1 << 22, 333, 1 << 16))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        norms = [gct.get_total_norm(grads) for _ in range(20)]
        params = _params(grads)
        gct.clip_grad_norm_(params, 1.0)
    stream.synchronize()
    assert len({float(n) for n in norms}) == 1
    assert float(gct.get_total_norm([p.grad for p in params])) == pytest.approx(1.0, rel=1e-5)


def test_amp_loop_on_cuda():
    model = torch.nn.Linear(64, 8).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    for step in range(3):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(torch.randn(16, 64, device="cuda")).float().pow(2).mean()
        scaler.scale(loss).backward()
        if step == 1:
            model.weight.grad[0, 0] = math.inf
        stats = gct.unscale_clip_grad_norm_(scaler, opt, 1.0, return_stats=True)
        scaler.step(opt)
        scaler.update()
        assert bool(stats.finite) == (step != 1)
    assert scaler.get_scale() == 2.0**11


@pytest.mark.parametrize("inplace", [True, False], ids=["in place", "functional"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_leaves_off_the_kernels_are_multiplied_in_float32(dtype, inplace):
    """Strided CUDA leaves go to torch's foreach multiply, not the kernels.

    There too a float16/bfloat16 leaf is multiplied by the float32 scale and
    rounded once: CUDA's foreach multiply by a 0-d tensor would round the
    scale to the leaf's dtype first, 1 ulp off in many entries.
    """
    g = torch.Generator(device="cuda").manual_seed(3)
    grads = [
        (torch.randn(300, 70, generator=g, device="cuda") * 3).to(dtype).t(),  # strided
        (torch.randn(5000, generator=g, device="cuda") * 3).to(dtype),
    ]
    before = [x.clone() for x in grads]
    plan = _fast.TorchPlan(gc._compat.namespace(grads[0]), 2.0, grads)
    assert plan._kernels is None  # a strided leaf keeps the tree off the kernels
    if inplace:
        stats = gc.clip_by_global_norm_(grads, 1.0)
        out = grads
    else:
        out, stats = gc.clip_by_global_norm(grads, 1.0)
    scale = stats.scale.to(torch.float32)
    assert float(scale) < 1.0
    for x, x0 in zip(out, before, strict=True):
        want = (x0.to(torch.float32) * scale).to(dtype)
        assert torch.equal(x, want)
        assert not torch.equal(want, x0 * scale.to(dtype))  # the case this test is about


@pytest.mark.parametrize("route", ["kernels", "foreach"])
@pytest.mark.parametrize(
    "call",
    [
        lambda ps: gct.clip_grad_norm_(ps, 1.0),
        lambda ps: gct.clip_grad_norm_(ps, 1.0, nonfinite="skip"),
        lambda ps: gct.clip_grad_value_(ps, 0.5),
        lambda ps: gct.get_total_norm([p.grad for p in ps]),
        lambda ps: gc.clip_by_block_rms([p.grad for p in ps], 1.0),
    ],
    ids=["clip_grad_norm_", "skip", "clip_grad_value_", "get_total_norm", "block_rms"],
)
def test_no_host_sync(call, route, monkeypatch):
    # Constants made from Python numbers by torch.asarray were blocking copies
    # to the device (pytorch#120996); torch's own clips make none.
    if route == "foreach":
        monkeypatch.setattr(_fast, "kernel_route", lambda leaves: None)
    params = _params(_grads(torch.float32))
    call(params)  # compiled and cached before the check
    torch.cuda.synchronize()
    try:
        with warnings.catch_warnings():
            # torch warns once per process that the mode is a prototype; as an
            # error it left the mode set, failing this worker's later tests.
            warnings.filterwarnings("ignore", "Synchronization debug mode", UserWarning)
            torch.cuda.set_sync_debug_mode("error")
        call(params)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("foreach", [None, False])
def test_a_bound_on_another_device(foreach):
    # A CUDA bound beside CPU gradients met them in the arithmetic ("Expected
    # all tensors to be on the same device"); a CPU 0-d bound beside CUDA
    # gradients stays a scalar (moving it would wait for the stream).
    for grads_on, bound_on in (("cpu", "cuda"), ("cuda", "cpu")):
        grads = [torch.full((4,), 2.0, device=grads_on)]
        bound = torch.tensor(1.0, device=bound_on)
        params = _params(grads)
        stats = gct.clip_grad_norm_(params, bound, foreach=foreach, return_stats=True)
        assert {x.device.type for x in stats} == {grads_on}
        assert params[0].grad.cpu().tolist() == pytest.approx([0.5] * 4, rel=1e-5)
        fused = None if foreach is None else False
        out, stats = gc.clip_by_global_norm(grads, bound, fused=fused)
        assert {x.device.type for x in stats} == {grads_on}
        assert out[0].cpu().tolist() == pytest.approx([0.5] * 4, rel=1e-5)
