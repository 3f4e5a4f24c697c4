"""gradclip.torch: the drop-ins for torch.nn.utils, checked against torch itself.

Every case runs on both CPU routes of the torch fast path (``_fast.USE_NUMPY_VIEWS``
True: zero-copy NumPy views; False: the ``torch._foreach_*`` route CUDA takes)
and compares with ``torch.nn.utils`` on an identical copy of a real module.

Deliberate differences from torch, and how the comparisons allow for them:

- torch takes the norm of float16/bfloat16 gradients in that dtype (and, for
  a mixed model, rounds each bfloat16 leaf's norm to bfloat16 before
  combining); gradclip's norm is float32 (float64 with a float64 leaf). So for
  half and mixed models our norm is compared with the float64 reference
  ``ref_norm`` within 1e-6, not with torch's rounded one.
- torch's clip coefficient for half gradients is computed from that rounded
  norm in the half dtype; gradclip computes it in float32 and rounds it once
  to the leaf dtype. The two coefficients can differ in the last bit of the
  half dtype, so clipped half gradients are compared with torch's within one
  ulp of the half dtype.
- gradclip's norm does not overflow or underflow (float32 grads of 1e20 or
  1e-25, float16 norms above 65504), where torch returns inf or 0.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings

import numpy as np
import pytest

import gradclip as gc
from conftest import importorskip, ref_norm

torch = importorskip("torch")
gct = importorskip("gradclip.torch")
_fast = importorskip("gradclip.torch._fast")

clip_grad_norm_ = gct.clip_grad_norm_
clip_grad_value_ = gct.clip_grad_value_
clip_grads_with_norm_ = gct.clip_grads_with_norm_
get_total_norm = gct.get_total_norm
unscale_clip_grad_norm_ = gct.unscale_clip_grad_norm_

NORM_TYPES = [2.0, 1.0, 0.5, 3.5, math.inf, -math.inf, 0.0]
FOREACH = [None, True, False]
DTYPES = ["float16", "bfloat16", "float32", "float64", "mixed"]
HALF = (torch.float16, torch.bfloat16)

# The mixed model: these parameters are cast after backward; the rest stay float32.
MIXED = {
    "emb.weight": torch.bfloat16,
    "lin1.weight": torch.float64,
    "ln.weight": torch.bfloat16,
    "ln.bias": torch.float64,
    "lin2.bias": torch.float64,
}

# ----------------------------------------------------------------------------- helpers


class Net(torch.nn.Module):
    """Embedding -> Linear -> LayerNorm -> tanh -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.lin1 = torch.nn.Linear(8, 32)
        self.ln = torch.nn.LayerNorm(32)
        self.lin2 = torch.nn.Linear(32, 4)

    def forward(self, idx):
        return self.lin2(torch.tanh(self.ln(self.lin1(self.emb(idx)))))


@functools.cache
def _trained(dtype: str) -> torch.nn.Module:
    """A Net with the gradients of one real backward (fixed seed); do not modify."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Net()
    if dtype != "mixed":
        model.to(getattr(torch, dtype))
    # Every embedding row is used, so no leaf is all zero and the -inf norm is > 0.
    idx = torch.arange(40) % 20
    # The 1/16 keeps every norm_type's norm below 65504 (0.5-norm about 45000),
    # so torch's float16 norm is finite and its clipping comparable to ours.
    loss = model(idx).float().pow(2).sum() / 16
    loss.backward()
    if dtype == "mixed":
        for name, p in model.named_parameters():
            if name in MIXED:
                p.data = p.data.to(MIXED[name])
                p.grad = p.grad.to(MIXED[name])
    return model


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    """An identical module, gradients included (deepcopy does not copy .grad)."""
    new = copy.deepcopy(model)
    for p, q in zip(model.parameters(), new.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    return new


def _grads(model):
    return [p.grad for p in model.parameters() if p.grad is not None]


def _ref(model, norm_type):
    return ref_norm([g.double().numpy() for g in _grads(model)], norm_type)


def _result_dtype(model):
    wide = any(g.dtype == torch.float64 for g in _grads(model))
    return torch.float64 if wide else torch.float32


def _ulp(t):
    """The spacing of ``t``'s dtype at each ``|t|``, as float64."""
    a = t.detach().abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).double()


def _assert_grad_close(ours, theirs, what=""):
    """rtol 1e-6 for float32/float64; within one ulp of the half dtype for float16/bfloat16."""
    if ours is None or theirs is None:  # a frozen parameter: both must have been skipped
        assert ours is None and theirs is None, what
        return
    assert ours.dtype == theirs.dtype, what
    if ours.dtype in HALF:
        diff = (ours.double() - theirs.double()).abs()
        worst = float((diff / _ulp(theirs)).max())
        assert worst <= 1.0, f"{what}: {worst} ulps of {ours.dtype} apart"
    else:
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0, msg=what)


def _assert_grads_close(ours_model, their_model):
    pairs = zip(ours_model.named_parameters(), their_model.parameters(), strict=True)
    for (name, a), b in pairs:
        _assert_grad_close(a.grad, b.grad, name)


def _assert_grads_equal(ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _params(*grads):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    return params


@pytest.fixture(params=["numpy_views", "foreach_route"])
def route(request, monkeypatch):
    """The CPU route of the torch fast path: NumPy views, or the foreach ops CUDA uses."""
    monkeypatch.setattr(_fast, "USE_NUMPY_VIEWS", request.param == "numpy_views")
    return request.param


# ----------------------------------------------------------------------------- 1. parity


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_grad_norm_matches_torch(request, route, dtype, norm_type, foreach):
    base = _trained(dtype)
    ref = _ref(base, norm_type)
    max_norm = ref / 4  # clipping is active for every norm_type
    ours, theirs = _copy(base), _copy(base)

    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm, norm_type, foreach=foreach)
    got = clip_grad_norm_(ours.parameters(), max_norm, norm_type, foreach=foreach)

    assert got.dtype == _result_dtype(base)
    assert got.shape == ()
    assert float(got) == pytest.approx(ref, rel=1e-6, abs=0)
    if dtype in ("float32", "float64"):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    elif dtype == "mixed":
        # torch rounds each bfloat16 leaf's norm to bfloat16 before combining:
        # its norm is off by up to bfloat16's precision. Clip torch's copy with
        # the exact norm, so what is compared is the scaling arithmetic.
        assert float(got) == pytest.approx(float(want), rel=2.0**-7)
        theirs = _copy(base)
        exact = torch.tensor(ref, dtype=torch.float64)
        torch.nn.utils.clip_grads_with_norm_(theirs.parameters(), max_norm, exact, foreach)
    _assert_grads_close(ours, theirs)
    # Clipping did something: no grad is left as it was (unless it is zero).
    for a, b in zip(ours.parameters(), base.parameters(), strict=True):
        assert not torch.equal(a.grad, b.grad) or not bool(b.grad.any())


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_matches_generic(request, route, dtype, norm_type):
    base = _trained(dtype)
    max_norm = _ref(base, norm_type) / 3
    fast, generic = _copy(base), _copy(base)
    got = clip_grad_norm_(fast.parameters(), max_norm, norm_type, foreach=None)
    want = clip_grad_norm_(generic.parameters(), max_norm, norm_type, foreach=False)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    _assert_grads_close(fast, generic)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_no_clipping_when_under_max_norm(route, dtype):
    base = _trained(dtype)
    ours, theirs = _copy(base), _copy(base)
    max_norm = 2 * _ref(base, 2.0)
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    stats = clip_grad_norm_(ours.parameters(), max_norm, return_stats=True)
    torch.testing.assert_close(stats.norm, want, rtol=1e-6, atol=0)
    assert not bool(stats.clipped)
    assert float(stats.scale) == 1.0
    _assert_grads_equal(_grads(ours), _grads(base))
    _assert_grads_equal(_grads(theirs), _grads(base))


def test_max_norm_as_a_tensor(route):
    base = _trained("float32")
    max_norm = _ref(base, 2.0) / 5
    ours, theirs = _copy(base), _copy(base)
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    got = clip_grad_norm_(ours.parameters(), torch.tensor(max_norm))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    _assert_grads_close(ours, theirs)


# ----------------------------------------------------------------------------- 2. the others


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_get_total_norm_matches_torch(request, route, dtype, norm_type, foreach):
    base = _trained(dtype)
    grads = [g.clone() for g in _grads(base)]
    got = get_total_norm(grads, norm_type, foreach=foreach)
    want = torch.nn.utils.get_total_norm(grads, norm_type, foreach=foreach)
    assert got.dtype == _result_dtype(base)
    assert float(got) == pytest.approx(_ref(base, norm_type), rel=1e-6, abs=0)
    if dtype in ("float32", "float64"):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    else:  # torch's norm is rounded to (a leaf's) half dtype
        assert float(got) == pytest.approx(float(want), rel=2.0**-7)
    _assert_grads_equal(grads, _grads(base))  # read only


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_grads_with_norm_matches_torch(route, dtype, foreach):
    base = _trained(dtype)
    total = torch.tensor(_ref(base, 2.0), dtype=_result_dtype(base))
    max_norm = float(total) / 7
    ours, theirs = _copy(base), _copy(base)
    assert clip_grads_with_norm_(ours.parameters(), max_norm, total, foreach) is None
    torch.nn.utils.clip_grads_with_norm_(theirs.parameters(), max_norm, total, foreach)
    _assert_grads_close(ours, theirs)
    assert not torch.equal(_grads(ours)[0], _grads(base)[0])


def test_clip_grads_with_norm_takes_a_norm_that_requires_grad(route):
    # A norm taken under autograd is used as a value, silently, as torch does.
    base = _trained("float32")
    total = torch.tensor(_ref(base, 2.0), requires_grad=True) * 1.0
    ours, theirs = _copy(base), _copy(base)
    clip_grads_with_norm_(ours.parameters(), 1.0, total)  # warnings are errors here
    torch.nn.utils.clip_grads_with_norm_(theirs.parameters(), 1.0, total)
    _assert_grads_close(ours, theirs)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_grad_value_matches_torch(route, dtype, foreach):
    base = _trained(dtype)
    clip_value = 0.5 * float(max(g.abs().max() for g in _grads(base)))
    ours, theirs = _copy(base), _copy(base)
    assert clip_grad_value_(ours.parameters(), clip_value, foreach) is None
    torch.nn.utils.clip_grad_value_(theirs.parameters(), clip_value, foreach)
    _assert_grads_equal(_grads(ours), _grads(theirs))  # a clamp is exact
    assert max(float(g.abs().max()) for g in _grads(ours)) <= clip_value


# ----------------------------------------------------------------------------- 3. torch's limits


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 0.5, 3.5])
@pytest.mark.parametrize("value", [1e20, 1e-25])
def test_float32_extremes_clip_correctly(route, value, norm_type, foreach):
    # torch's float32 sum of squares overflows to inf at 1e20 (clipping then
    # zeroes every grad) and underflows to 0 at 1e-25 (no clipping at all).
    g1 = (torch.linspace(0.5, 2.0, 1000, dtype=torch.float64) * value).float()
    g2 = torch.full((37,), -value, dtype=torch.float32)
    params = _params(g1, g2)
    ref = ref_norm([g1.double().numpy(), g2.double().numpy()], norm_type)
    max_norm = ref / 8
    # eps=1e-6 would swamp a norm of 1e-23: clip the tiny gradients with eps=0.
    eps = 0.0 if value < 1 else 1e-6
    got = clip_grad_norm_(params, max_norm, norm_type, foreach=foreach, eps=eps)
    assert got.dtype == torch.float32
    assert math.isfinite(float(got)) and float(got) > 0
    assert float(got) == pytest.approx(ref, rel=1e-6)
    factor = max_norm / (ref + eps)
    for p, g in zip(params, (g1, g2), strict=True):
        assert bool(torch.isfinite(p.grad).all()) and bool((p.grad != 0).all())
        torch.testing.assert_close(p.grad.double(), g.double() * factor, rtol=1e-6, atol=0)
    clipped = ref_norm([p.grad.double().numpy() for p in params], norm_type)
    assert clipped == pytest.approx(max_norm, rel=1e-6)


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, math.inf])
def test_float16_norm_above_65504(request, route, norm_type, foreach):
    # 300 * sqrt(100_000) = 94868 > 65504: torch's float16 norm is inf.
    g1 = torch.full((100_000,), 300.0, dtype=torch.float16)
    g2 = torch.full((7,), -2.0, dtype=torch.float16)
    ref = ref_norm([g1.double().numpy(), g2.double().numpy()], norm_type)
    assert get_total_norm([g1, g2], norm_type, foreach=foreach).dtype == torch.float32
    assert float(get_total_norm([g1, g2], norm_type, foreach=foreach)) == pytest.approx(
        ref, rel=1e-6
    )
    params = _params(g1, g2)
    # A clip factor of about 1e-3, a normal float16 (see the subnormal case below).
    max_norm = ref / 1000
    got = clip_grad_norm_(params, max_norm, norm_type, foreach=foreach)
    assert float(got) == pytest.approx(ref, rel=1e-6)
    factor = max_norm / (ref + 1e-6)
    for p, g in zip(params, (g1, g2), strict=True):
        exact = g.double() * factor
        # the float32 factor times the gradient, rounded once: within one ulp.
        assert bool(((p.grad.double() - exact).abs() <= _ulp(p.grad)).all())


@pytest.mark.parametrize("foreach", [None, False])
def test_float16_clip_factor_below_the_normal_range(route, foreach):
    # Rounded to float16 first, a factor of 1e-6 became 1.013e-6 (a subnormal
    # with a few significant bits): the clipped gradients were 1.3% too large.
    # torch multiplies by the float32 factor and rounds once, as we now do.
    g = torch.full((250_000,), 2000.0, dtype=torch.float16)  # norm 1e6
    (ours,) = _params(g)
    (theirs,) = _params(g)
    norm = clip_grad_norm_([ours], 1.0, foreach=foreach)
    assert float(norm) == pytest.approx(1e6, rel=1e-3)
    torch.nn.utils.clip_grads_with_norm_([theirs], 1.0, norm, foreach=foreach)
    exact = g.double() * (1.0 / (float(norm) + 1e-6))  # the factor from our own norm
    assert bool(((theirs.grad.double() - exact).abs() <= _ulp(theirs.grad)).all())  # torch: ok
    assert bool(((ours.grad.double() - exact).abs() <= _ulp(ours.grad)).all())


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("dtype", HALF)
def test_half_grads_clipped_bit_for_bit_as_torch(route, dtype, foreach):
    g = (torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    ours, theirs = _params(g), _params(g)
    norm = torch.tensor(123.456, dtype=torch.float32)
    clip_grads_with_norm_(ours, 1.0, norm, foreach=foreach)
    torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, norm, foreach=foreach)
    _assert_grads_equal([p.grad for p in ours], [p.grad for p in theirs])


def test_float16_grads_that_require_grad():
    # Default settings: such tensors have no NumPy view, so the foreach route runs.
    g = torch.full((100_000,), 300.0, dtype=torch.float16).requires_grad_()
    ref = ref_norm([g.detach().double().numpy()], 2.0)
    assert float(get_total_norm([g.detach()])) == pytest.approx(ref, rel=1e-6)  # viewed
    assert float(get_total_norm([g]).detach()) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("foreach", [None, False])
def test_norm_of_grads_that_require_grad_is_detached_like_torch(foreach):
    def param():
        w = torch.nn.Parameter(torch.zeros(5))
        w.grad = torch.arange(5.0).requires_grad_()
        return w

    assert torch.nn.utils.clip_grad_norm_([param()], 1.0, foreach=foreach).grad_fn is None
    assert torch.nn.utils.get_total_norm([param().grad], foreach=foreach).grad_fn is None
    w = param()
    assert get_total_norm([w.grad], foreach=foreach).grad_fn is None
    assert clip_grad_norm_([w], 1.0, foreach=foreach).grad_fn is None


# ----------------------------------------------------------------------------- 4. non-finite


def _small(bad=math.nan):
    """A Sequential with real gradients and one bad entry in ``2.weight.grad``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        x = torch.randn(8, 6)
    model(x).pow(2).sum().backward()
    if bad is not None:
        model[2].weight.grad[1, 2] = bad
    return model


BAD = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize(
    "kwargs", [{"error_if_nonfinite": True}, {"nonfinite": "raise"}], ids=["error_if", "raise"]
)
def test_raise_names_the_parameter_and_modifies_nothing(route, kwargs, bad, foreach):
    model = _small(bad)
    before = [g.clone() for g in _grads(model)]
    with pytest.raises(gc.NonFiniteError, match=r"leaf 2\.weight\.grad;"):
        clip_grad_norm_(model.named_parameters(), 0.1, foreach=foreach, **kwargs)
    _assert_grads_equal(_grads(model), before)
    with pytest.raises(gc.NonFiniteError, match=r"tensors\[2\]"):
        get_total_norm(_grads(model), foreach=foreach, **kwargs)
    # Finite gradients: no error, the clip happens.
    fine = _small(None)
    clip_grad_norm_(fine.named_parameters(), 0.1, foreach=foreach, **kwargs)
    assert float(get_total_norm(_grads(fine))) == pytest.approx(0.1, rel=1e-5)


def test_error_if_nonfinite_is_a_runtime_error_like_torch():
    # Drop-in code written for torch catches RuntimeError.
    model = _small(math.nan)
    with pytest.raises(RuntimeError):
        torch.nn.utils.clip_grad_norm_(_copy(model).parameters(), 0.1, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match=r"2\.weight\.grad"):
        clip_grad_norm_(model.named_parameters(), 0.1, error_if_nonfinite=True)
    with pytest.raises(RuntimeError):
        get_total_norm(_grads(model), error_if_nonfinite=True)


@pytest.mark.parametrize("foreach", [None, False])
def test_error_if_nonfinite_raises_on_a_norm_past_float32(route, foreach):
    # Finite float32 gradients whose norm (6e38) is past float32's range:
    # torch raises, and so must the drop-in, not zero the gradients.
    def params():
        p = torch.nn.Parameter(torch.zeros(4))
        p.grad = torch.full((4,), 3e38)
        return [p]

    theirs = params()
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, error_if_nonfinite=True, foreach=foreach)
    ours = params()
    with pytest.raises(RuntimeError, match=r"overflows torch\.float32"):
        clip_grad_norm_(ours, 1.0, error_if_nonfinite=True, foreach=foreach)
    _assert_grads_equal([ours[0].grad], [theirs[0].grad])  # neither modified
    with pytest.raises(RuntimeError, match="overflows"):
        get_total_norm([ours[0].grad], error_if_nonfinite=True, foreach=foreach)


@pytest.mark.parametrize("kwargs", [{"nonfinite": "zero"}, {}], ids=["zero", "complex"])
def test_in_place_writes_bump_the_version_counter(route, kwargs):
    # A gradient kept for a double backward (create_graph=True) and then
    # clipped: autograd must see the write, as after torch's own clip, and
    # refuse the stale saved tensor. Writes through NumPy views (nonfinite=
    # "zero", complex gradients) do not bump the counter by themselves.
    dtype = torch.float32 if kwargs else torch.complex64
    x = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=dtype))
    # autograd.grad, not backward(create_graph=True), which warns of a cycle
    (x.grad,) = torch.autograd.grad((x.abs() ** 2).sum(), x, create_graph=True)
    penalty = (x.grad.abs() ** 2).sum()
    before = x.grad._version
    clip_grad_norm_([x], 1.0, **kwargs)
    assert x.grad._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        penalty.backward()


@pytest.mark.parametrize("foreach", FOREACH)
def test_inf_norm_with_an_empty_gradient(route, foreach):
    # torch's foreach max raises on an empty tensor; the empty leaf counts
    # for nothing on every route, as on the generic one.
    grads = [torch.zeros(0), torch.tensor([-4.0, 1.0])]
    assert float(get_total_norm(grads, math.inf, foreach=foreach)) == 4.0
    params = _params(*grads)
    assert float(clip_grad_norm_(params, 1.0, math.inf, foreach=foreach)) == 4.0
    assert params[1].grad.tolist() == pytest.approx([-1.0, 0.25], rel=1e-6)
    # Only empty ones (a rank's empty shard): no foreach norm of no tensors.
    assert float(get_total_norm(grads[:1], math.inf, foreach=foreach)) == 0.0


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, -math.inf, 0.0])
@pytest.mark.parametrize("bad", BAD)
def test_zero_drops_nonfinite_entries(route, bad, norm_type, foreach):
    model = _small(bad)
    theirs = _copy(model)
    for g in _grads(theirs):
        g.copy_(torch.where(torch.isfinite(g), g, torch.zeros_like(g)))
    max_norm = _ref(theirs, norm_type) / 4
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm, norm_type)
    stats = clip_grad_norm_(
        model.parameters(),
        max_norm,
        norm_type,
        foreach=foreach,
        nonfinite="zero",
        return_stats=True,
    )
    torch.testing.assert_close(stats.norm, want, rtol=1e-6, atol=0)
    assert not bool(stats.finite)
    assert bool(stats.clipped)
    _assert_grads_close(model, theirs)
    assert float(model[2].weight.grad[1, 2]) == 0.0
    got = get_total_norm(_grads(_small(bad)), norm_type, foreach=foreach, nonfinite="zero")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("bad", [*BAD, None])
def test_skip_leaves_nonfinite_grads_unchanged(route, bad, foreach):
    model = _small(bad)
    before = [g.clone() for g in _grads(model)]
    stats = clip_grad_norm_(
        model.parameters(), 0.1, foreach=foreach, nonfinite="skip", return_stats=True
    )
    if bad is None:  # finite: clipped as usual
        theirs = _small(None)
        want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.1)
        torch.testing.assert_close(stats.norm, want, rtol=1e-6, atol=0)
        assert bool(stats.finite) and bool(stats.clipped)
        _assert_grads_close(model, theirs)
        return
    assert not bool(stats.finite)
    assert not math.isfinite(float(stats.norm))
    assert float(stats.scale) == 1.0
    assert not bool(stats.clipped)
    _assert_grads_equal(_grads(model), before)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, math.inf])
@pytest.mark.parametrize("bad", BAD)
def test_propagate_matches_torch_arithmetic(route, bad, norm_type, foreach):
    model = _small(bad)
    theirs = _copy(model)
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.1, norm_type, foreach=foreach)
    got = clip_grad_norm_(model.parameters(), 0.1, norm_type, foreach=foreach)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    if math.isnan(bad):
        assert math.isnan(float(got))
    else:
        assert float(got) == math.inf
    for a, b in zip(_grads(model), _grads(theirs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0, equal_nan=True)


def test_error_if_nonfinite_conflicts_with_another_policy():
    model = _small(math.nan)
    before = [g.clone() for g in _grads(model)]
    for policy in ("zero", "skip", "propagate"):
        with pytest.raises(ValueError, match="error_if_nonfinite"):
            clip_grad_norm_(model.parameters(), 0.1, error_if_nonfinite=True, nonfinite=policy)
    with pytest.raises(ValueError, match="error_if_nonfinite"):
        get_total_norm(_grads(model), error_if_nonfinite=True, nonfinite="zero")
    _assert_grads_equal(_grads(model), before)


# ----------------------------------------------------------------------------- 5. inputs


def test_params_without_grad_are_skipped(route):
    model = _copy(_trained("float32"))
    model.lin1.bias.grad = None  # trainable but unused this step
    theirs = _copy(model)
    max_norm = _ref(model, 2.0) / 4
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    got = clip_grad_norm_(model.parameters(), max_norm)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert model.lin1.bias.grad is None
    for a, b in zip(model.parameters(), theirs.parameters(), strict=True):
        if a.grad is not None:
            _assert_grad_close(a.grad, b.grad)


def test_frozen_parameters_are_skipped():
    model = _copy(_trained("float32"))
    model.emb.requires_grad_(False)  # a frozen layer, as in fine-tuning
    model.emb.weight.grad = None
    theirs = _copy(model)
    max_norm = _ref(model, 2.0) / 4
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    got = clip_grad_norm_(model.parameters(), max_norm)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    _assert_grads_close(model, theirs)


@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_"])
def test_plain_tensors_are_not_parameters(fn):
    model = _copy(_trained("float32"))
    grads = [p.grad for p in model.parameters()]
    before = [g.clone() for g in grads]
    args = {
        "clip_grad_norm_": (1.0,),
        "clip_grad_value_": (0.01,),
        "clip_grads_with_norm_": (1.0, torch.tensor(100.0)),
    }[fn]
    with pytest.raises(TypeError, match=r"parameters\[0\] is a tensor .*not a parameter"):
        getattr(gct, fn)(grads, *args)
    _assert_grads_equal(grads, before)


@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grad_value_", "get_total_norm"])
def test_computed_gradients_are_not_parameters(fn):
    # autograd.grad(create_graph=True) gives gradients that require grad: they
    # have a grad_fn and never a .grad, so torch would clip nothing.
    x = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    (g,) = torch.autograd.grad((x**3).sum(), x, create_graph=True)
    before = g.detach().clone()
    call = {
        "clip_grad_norm_": lambda: clip_grad_norm_([g], 1e-3),
        "clip_grad_value_": lambda: clip_grad_value_([g], 1e-3),
        "get_total_norm": lambda: get_total_norm([g]),
    }[fn]
    if fn == "get_total_norm":  # takes the gradients themselves
        assert float(call()) == pytest.approx(float(torch.linalg.vector_norm(before)), rel=1e-6)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own, for reading .grad of a non-leaf
        with pytest.raises(TypeError, match=r"parameters\[0\] is a tensor .*has a grad_fn"):
            call()
    assert torch.equal(g.detach(), before)


@pytest.mark.parametrize("fn", ["clip_grad_norm_", "get_total_norm"])
def test_tuples_that_are_not_named_pairs_raise(fn):
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    for p in (*a.parameters(), *b.parameters()):
        p.grad = torch.full_like(p, 10.0)
    if fn == "clip_grad_norm_":
        items = list(zip(a.parameters(), b.parameters(), strict=True))
        mixed = [("weight", a.weight), a.bias]
        what = "parameters"
    else:
        items = [(a.weight.grad, b.weight.grad)]
        mixed = [("weight", a.weight.grad), a.bias.grad]
        what = "tensors"
    pair = r"tuple \((Parameter|Tensor), (Parameter|Tensor)\), not a \(name, tensor\) pair"
    with pytest.raises(TypeError, match=rf"{what}\[0\] is {pair}"):
        getattr(gct, fn)(items, 1.0)
    with pytest.raises(TypeError, match=rf"{what}\[1\] is (Parameter|Tensor) of shape \(2,\)"):
        getattr(gct, fn)(mixed, 1.0)
    assert all(bool((p.grad == 10.0).all()) for p in (*a.parameters(), *b.parameters()))


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 0.0])
def test_inv_scale_with_no_gradients(route, norm_type):
    frozen = torch.nn.Parameter(torch.zeros(2))  # unused: its .grad is None
    for params in ([frozen], []):
        got = clip_grad_norm_(params, 1.0, norm_type, inv_scale=torch.tensor(0.5))
        assert float(got) == 0.0


@pytest.mark.parametrize("foreach", [None, False])
def test_clip_grad_value_errors_name_the_parameter(foreach):
    # The second parameter has no .grad: the bad one is parameters[2], not
    # the second gradient, and the error names this function.
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]
    params.append(torch.nn.Parameter(torch.ones(3, dtype=torch.complex64)))
    params[0].grad, params[2].grad = torch.full((3,), 2.0), torch.ones(3, dtype=torch.complex64)
    message = r"^clip_grad_value_: leaf parameters\[2\]\.grad is complex"
    with pytest.raises(TypeError, match=message):
        clip_grad_value_(params, 0.5, foreach)
    assert torch.equal(params[0].grad, torch.full((3,), 2.0))
    weight = torch.nn.Parameter(torch.ones(2, 2))
    bias = torch.nn.Parameter(torch.ones(2).to("meta"))
    weight.grad, bias.grad = torch.ones(2, 2), torch.ones(2).to("meta")
    with pytest.raises(ValueError, match=r"^clip_grad_value_: leaf bias\.grad is on meta"):
        clip_grad_value_([("weight", weight), ("bias", bias)], 0.5, foreach)
    assert torch.equal(weight.grad, torch.ones(2, 2))


def test_get_total_norm_rejects_parameters():
    model = _trained("float32")
    with pytest.raises(TypeError, match=r"tensors\[0\] is an nn.Parameter"):
        get_total_norm(model.parameters())
    with pytest.raises(TypeError, match=r"emb\.weight is an nn.Parameter"):
        get_total_norm(model.named_parameters())


def test_a_single_tensor(route):
    g = torch.tensor([[3.0, -4.0], [12.0, 0.0]])
    (ours,) = _params(g)
    (theirs,) = _params(g)
    want = torch.nn.utils.clip_grad_norm_(theirs, 2.0)
    got = clip_grad_norm_(ours, 2.0)
    assert float(got) == pytest.approx(13.0, rel=1e-7)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=0)
    torch.testing.assert_close(get_total_norm(g), torch.tensor(13.0), rtol=1e-7, atol=0)
    clip_grad_value_(ours, 0.1)
    torch.testing.assert_close(ours.grad.abs().max(), torch.tensor(0.1))
    (again,) = _params(g)
    clip_grads_with_norm_(again, 1.3, torch.tensor(13.0))
    torch.testing.assert_close(again.grad, g / 10, rtol=1e-6, atol=0)


def test_a_generator(route):
    base = _trained("float32")
    ours, theirs = _copy(base), _copy(base)
    max_norm = _ref(base, 2.0) / 4
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    got = clip_grad_norm_((p for p in ours.parameters()), max_norm)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    _assert_grads_close(ours, theirs)
    norm = get_total_norm(p.grad for p in base.parameters())
    assert float(norm) == pytest.approx(_ref(base, 2.0), rel=1e-6)


def test_empty_inputs():
    for got in (
        clip_grad_norm_([], 1.0),
        clip_grad_norm_(iter([]), 1.0, norm_type=math.inf),
        get_total_norm([]),
        get_total_norm([], -math.inf),
    ):
        torch.testing.assert_close(got, torch.nn.utils.get_total_norm([]), rtol=0, atol=0)
        assert got.dtype == torch.float32 and float(got) == 0.0
    stats = clip_grad_norm_([], 1.0, return_stats=True)
    assert isinstance(stats, gc.ClipStats)
    assert float(stats.norm) == 0.0 and float(stats.scale) == 1.0
    assert not bool(stats.clipped) and bool(stats.finite)
    # Parameters that all lack a gradient are an empty input too.
    w = torch.nn.Parameter(torch.ones(3))
    assert float(clip_grad_norm_([w], 1.0)) == 0.0
    assert w.grad is None


@pytest.mark.parametrize("foreach", [None, False])
def test_return_stats(route, foreach):
    base = _trained("float32")
    model = _copy(base)
    plain = _copy(base)
    max_norm = _ref(base, 2.0) / 4
    stats = clip_grad_norm_(model.parameters(), max_norm, foreach=foreach, return_stats=True)
    norm = clip_grad_norm_(plain.parameters(), max_norm, foreach=foreach)
    assert isinstance(stats, gc.ClipStats)
    for field in stats:
        assert isinstance(field, torch.Tensor)
        assert field.shape == ()
    assert stats.norm.dtype == torch.float32 and stats.scale.dtype == torch.float32
    assert stats.clipped.dtype == torch.bool and stats.finite.dtype == torch.bool
    torch.testing.assert_close(stats.norm, norm, rtol=0, atol=0)
    torch.testing.assert_close(
        stats.scale, torch.tensor(max_norm / (float(norm) + 1e-6)), rtol=1e-6, atol=0
    )
    assert bool(stats.clipped) and bool(stats.finite)
    _assert_grads_equal(_grads(model), _grads(plain))


@pytest.mark.parametrize("max_norm", [-1.0, -1e-30, math.nan])
def test_bad_max_norm_modifies_nothing(max_norm):
    model = _copy(_trained("float32"))
    before = [g.clone() for g in _grads(model)]
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_(model.parameters(), max_norm)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grads_with_norm_(model.parameters(), max_norm, torch.tensor(1.0))
    _assert_grads_equal(_grads(model), before)


def test_bad_total_norm_modifies_nothing():
    # One norm: a (2,) tensor would scale entry by entry, or fail between writes.
    model = _copy(_trained("mixed"))
    before = [g.clone() for g in _grads(model)]
    cases = [(torch.tensor([13.0, 26.0]), ValueError), (torch.tensor([13.0]), ValueError)]
    cases += [([13.0], TypeError), (None, TypeError)]
    for total_norm, error in cases:
        for foreach in FOREACH:
            with pytest.raises(error, match="total_norm must be a number"):
                clip_grads_with_norm_(model.parameters(), 1.0, total_norm, foreach=foreach)
    _assert_grads_equal(_grads(model), before)


def test_foreach_is_taken_for_its_truth_like_torch():
    model, theirs = _copy(_trained("float32")), _copy(_trained("float32"))
    torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.1, foreach=False)
    clip_grad_norm_(model.parameters(), 0.1, foreach=0)
    _assert_grads_close(model, theirs)
    for call in (
        lambda f: clip_grad_norm_([], 1.0, foreach=f),
        lambda f: get_total_norm([], foreach=f),
        lambda f: clip_grad_value_([], 1.0, foreach=f),
    ):
        call(1)
        call(np.True_)  # a NumPy bool: a flag too
        with pytest.raises(TypeError, match="foreach must be None or a bool; got 'yes'"):
            call("yes")  # checked with no gradients too


@pytest.mark.parametrize("mixed", [False, True], ids=["float32", "mixed"])
def test_negative_bit_grads_are_scaled_and_the_rest_with_them(route, mixed):
    # x.conj().imag is a view with the negative bit, which torch's foreach
    # refuses to write: with a float64 group written first, a refusal left
    # the gradients half clipped.
    for foreach in FOREACH:
        first = torch.tensor([3.0, 4.0], dtype=torch.float64 if mixed else torch.float32)
        params = _params(first, torch.zeros(1))
        params[1].grad = torch.tensor([1 + 12j]).conj().imag  # -12, as a negative-bit view
        assert params[1].grad.is_neg()
        norm = clip_grad_norm_(params, 1.0, foreach=foreach)
        assert float(norm) == 13.0
        torch.testing.assert_close(params[0].grad, first / 13.0, rtol=1e-6, atol=0)
        torch.testing.assert_close(params[1].grad, torch.tensor([-12.0 / 13.0]), rtol=1e-6, atol=0)


def test_bad_norm_type_modifies_nothing():
    model = _copy(_trained("float32"))
    before = [g.clone() for g in _grads(model)]
    with pytest.raises(ValueError, match="ord must be"):
        clip_grad_norm_(model.parameters(), 1.0, norm_type=-2.0)
    _assert_grads_equal(_grads(model), before)


# ----------------------------------------------------------------------------- 6. AMP


def _mlp():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 2)
        )


def _amp_setup():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    return model, opt, scaler


def _backward(model, opt, scaler, x, y, autocast):
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    loss = torch.nn.functional.mse_loss(out.float(), y)
    scaler.scale(loss).backward()


@pytest.mark.parametrize("autocast", [True, False], ids=["bf16_autocast", "fp32"])
def test_amp_training_loop_matches_unscale_then_clip(route, autocast):
    ours, theirs = _amp_setup(), _amp_setup()
    gen = torch.Generator().manual_seed(7)
    max_norm = 0.5
    inf_step = 3
    clipped_steps = 0
    for step in range(7):
        x = torch.randn(32, 8, generator=gen)
        y = torch.randn(32, 2, generator=gen) * 4
        before = [p.detach().clone() for p in ours[0].parameters()]
        scale_before = ours[2].get_scale()
        norms = []
        for i, (model, opt, scaler) in enumerate((ours, theirs)):
            _backward(model, opt, scaler, x, y, autocast)
            if step == inf_step:
                model[0].weight.grad[2, 5] = math.inf
            if i == 0:
                norms.append(unscale_clip_grad_norm_(scaler, opt, max_norm))
            else:
                scaler.unscale_(opt)
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            scaler.step(opt)
            scaler.update()
        got, want = norms
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0, equal_nan=True)
        assert ours[2].get_scale() == theirs[2].get_scale()
        for a, b in zip(ours[0].parameters(), theirs[0].parameters(), strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
        if step == inf_step:
            assert float(got) == math.inf
            assert ours[2].get_scale() == scale_before / 2
            _assert_grads_equal([p.detach() for p in ours[0].parameters()], before)
        else:
            assert math.isfinite(float(got))
            clipped_steps += float(got) > max_norm
            changed = any(
                not torch.equal(p.detach(), q)
                for p, q in zip(ours[0].parameters(), before, strict=True)
            )
            assert changed
    assert clipped_steps > 0  # the clip was active in some step
    assert ours[2].get_scale() != 2.0**10  # the scale grew and backed off


def test_unscale_clip_twice_raises():
    model, opt, scaler = _amp_setup()
    _backward(model, opt, scaler, torch.ones(4, 8), torch.zeros(4, 2), False)
    unscale_clip_grad_norm_(scaler, opt, 1.0)
    grads = [g.clone() for g in _grads(model)]
    with pytest.raises(RuntimeError, match="already been called"):
        unscale_clip_grad_norm_(scaler, opt, 1.0)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)  # torch's own unscale_ sees the recorded state
    _assert_grads_equal(_grads(model), grads)
    scaler.step(opt)
    scaler.update()
    # After update() a new step may unscale again.
    _backward(model, opt, scaler, torch.ones(4, 8), torch.zeros(4, 2), False)
    assert math.isfinite(float(unscale_clip_grad_norm_(scaler, opt, 1.0)))


def test_unscale_clip_names_the_parameter_at_fault():
    # It named parameters[i] among those with a gradient, not the one at
    # fault; the optimizer's own names are taken where it has them.
    for named, name in [(False, r"param_groups\[0\]\['params'\]\[6\]"), (True, r"3\.bias")]:
        model, _, scaler = _amp_setup()
        frozen = torch.nn.Parameter(torch.zeros(3))  # no gradient: skipped
        params = model.named_parameters() if named else model.parameters()
        opt = torch.optim.SGD([("frozen", frozen) if named else frozen, *params], lr=0.1)
        _backward(model, opt, scaler, torch.ones(4, 8), torch.zeros(4, 2), False)
        model[3].bias.grad[0] = math.nan
        with pytest.raises(gc.NonFiniteError, match=rf"{name}\.grad"):
            unscale_clip_grad_norm_(scaler, opt, 1.0, nonfinite="raise")


def test_unscale_clip_refuses_fp16_grads_as_unscale_does():
    model, _, scaler = _amp_setup()
    model = model.half()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.scale(model(torch.ones(4, 8, dtype=torch.float16)).float().sum()).backward()
    grads = [g.clone() for g in _grads(model)]
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.unscale_(opt)
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        unscale_clip_grad_norm_(scaler, opt, 1.0)
    _assert_grads_equal(_grads(model), grads)


def test_an_empty_generator_warns_as_torch_does():
    for fn in (torch.nn.utils.clip_grad_norm_, clip_grad_norm_):
        with pytest.warns(UserWarning, match="`parameters` is an empty generator") as caught:
            fn((p for p in []), 1.0)
        assert caught[0].filename == __file__  # the caller's line, as torch's (not a wrapper's)


def test_an_infinite_norm_under_an_infinite_bound_as_torch():
    # max_norm=inf to log the norm: an overflowed step's grads become NaN in
    # torch (inf / inf); they were left as they were.
    def models():
        model = torch.nn.Linear(2, 1)
        model.weight.grad = torch.tensor([[3.0, math.inf]])
        model.bias.grad = torch.tensor([1.0])
        return model

    ours, theirs = models(), models()
    norm = clip_grad_norm_(ours.parameters(), math.inf)
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), math.inf)
    assert torch.equal(norm, want)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True)
        assert torch.isnan(a.grad).all()
    ours, theirs = models(), models()
    clip_grads_with_norm_(ours.parameters(), math.inf, torch.tensor(math.inf))
    torch.nn.utils.clip_grads_with_norm_(theirs.parameters(), math.inf, torch.tensor(math.inf))
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True)


def test_only_clip_grad_norm_warns_of_an_empty_generator():
    # Under filterwarnings=error a step with no gradients (all frozen) raised.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(get_total_norm(t for t in [])) == 0.0
        clip_grads_with_norm_((p for p in []), 1.0, torch.tensor(0.0))
        clip_grad_value_((p for p in []), 1.0)  # torch's raises a RuntimeError of its own here
        torch.nn.utils.get_total_norm(t for t in [])
        torch.nn.utils.clip_grads_with_norm_((p for p in []), 1.0, torch.tensor(0.0))


@pytest.mark.parametrize("eager_first", [True, False])
def test_a_compiled_step_runs_the_drop_in_at_a_graph_break(eager_first):
    # Dynamo traced into the NumPy views of the CPU path and, once the drop-in
    # had run eagerly, failed inside itself (AssertionError: Expected np.nditer base).
    torch.manual_seed(0)
    models = [torch.nn.Linear(8, 1) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]

    def backward_and_clip(k, clip, x, y):
        torch.nn.functional.mse_loss(models[k](x), y).backward()
        return clip(models[k].parameters(), 0.5)

    def step(k, clip, x, y, run=backward_and_clip):
        opts[k].zero_grad()
        norm = run(k, clip, x, y)
        opts[k].step()  # outside the compiled part: dynamo's tracing of SGD warns
        return norm

    batches = [(torch.randn(4, 8), torch.randn(4, 1)) for _ in range(3)]
    if eager_first:
        step(0, clip_grad_norm_, *batches[0])
        step(1, torch.nn.utils.clip_grad_norm_, *batches[0])
    compiled = torch.compile(backward_and_clip, backend="eager")
    for x, y in batches[1:]:
        got = step(0, clip_grad_norm_, x, y, run=compiled)
        want = step(1, torch.nn.utils.clip_grad_norm_, x, y)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_no_gradients_give_a_norm_in_the_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for got in (get_total_norm([]), clip_grad_norm_([torch.nn.Parameter(torch.ones(2))], 1.0)):
            assert got.dtype == torch.nn.utils.get_total_norm([]).dtype == torch.float64
    finally:
        torch.set_default_dtype(previous)


def test_no_gradients_give_stats_on_the_bounds_device():
    # The norm was torch's tensor(0.0) on the CPU beside a scale and clipped
    # flag on the bound's device (meta here, for CUDA): stats that would not stack.
    bound = torch.tensor(1.0, device="meta")
    for params in ([], [torch.nn.Parameter(torch.ones(2))]):
        stats = clip_grad_norm_(params, bound, return_stats=True)
        assert {x.device.type for x in stats} == {"meta"}
    stats = clip_grad_norm_([], 1.0, return_stats=True)  # a number: the CPU, as torch
    assert {x.device.type for x in stats} == {"cpu"}


def test_unscale_clip_skips_optimizer_tensors_without_grad(route):
    # An optimizer may hold a plain tensor that gets no gradient (frozen);
    # GradScaler.unscale_ and clip_grad_norm_ skip it, and so must this.
    model, _, scaler = _amp_setup()
    frozen = torch.zeros(3)
    opt = torch.optim.SGD([*model.parameters(), frozen], lr=0.1)
    _backward(model, opt, scaler, torch.ones(4, 8), torch.full((4, 2), 3.0), False)
    theirs = _copy(model)
    for p in theirs.parameters():  # unscale_ by a power of two: exact
        p.grad.mul_(1.0 / scaler.get_scale())
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.1)
    norm = unscale_clip_grad_norm_(scaler, opt, 0.1)
    torch.testing.assert_close(norm, want, rtol=1e-6, atol=0)
    _assert_grads_close(model, theirs)


def test_unscale_clip_with_a_disabled_scaler(route):
    model, opt, _ = _amp_setup()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    _backward(model, opt, scaler, torch.ones(4, 8), torch.full((4, 2), 3.0), False)
    theirs = _copy(model)
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.1)
    stats = unscale_clip_grad_norm_(scaler, opt, 0.1, return_stats=True)
    torch.testing.assert_close(stats.norm, want, rtol=1e-6, atol=0)
    assert bool(stats.clipped)
    _assert_grads_close(model, theirs)


@pytest.mark.parametrize("bad", [-1 / 1024, 0.0, math.inf, math.nan, torch.tensor(-0.5)])
def test_inv_scale_must_be_positive(bad):
    # A negative one gave a negative norm and flipped the gradients.
    model = _trained("float32")
    before = [g.clone() for g in _grads(model)]
    for fn in (
        lambda: clip_grad_norm_(model.parameters(), 1.0, inv_scale=bad),
        lambda: gct.clip_grads_with_norm_(model.parameters(), 1.0, 5.0, inv_scale=bad),
    ):
        with pytest.raises(ValueError, match="inv_scale must be a number > 0 and finite"):
            fn()
    for g, b in zip(_grads(model), before, strict=True):
        torch.testing.assert_close(g, b, rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["0.1", True, torch.tensor(True), torch.tensor(1 + 1j), [0.5]])
def test_inv_scale_must_be_a_real_number(bad):
    # float() took "0.1" and True (as 1) where max_norm refuses them.
    model = _trained("float32")
    before = [g.clone() for g in _grads(model)]
    with pytest.raises(TypeError, match="clip_grad_norm_: inv_scale must be a"):
        clip_grad_norm_(model.parameters(), 1.0, inv_scale=bad)
    for g, b in zip(_grads(model), before, strict=True):
        torch.testing.assert_close(g, b, rtol=0, atol=0)


@pytest.mark.parametrize("inv", [1 / 3, 1e-46, 1e39])
def test_a_number_inv_scale_is_exact_for_float64_gradients(inv):
    # It was made a float32 tensor: 1/3 rounded (3e-8 off), 1e-46 refused as
    # 0.0 and 1e39 as inf, though both are float64 numbers.
    grads = [torch.tensor([3.0, 4.0, 12.0], dtype=torch.float64) * 3.0**k for k in range(2)]
    ours, theirs = _params(*grads), _params(*grads)
    for p in theirs:
        p.grad.mul_(inv)
    want = torch.nn.utils.clip_grad_norm_(theirs, 1e300)
    got = clip_grad_norm_(ours, 1e300, inv_scale=inv)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
def test_inv_scale_keeps_a_norm_whose_loss_scaled_one_overflows(route, norm_type, foreach):
    # float64 gradients of 1e308 under a loss scale of 65536: the unscaled
    # norm (3e303 at ord 2) is in range. inv_scale was applied after the
    # scaled norm had become inf: finite True, every gradient zeroed.
    inv = 1 / 65536
    scaled = [
        torch.full((4,), 1e308, dtype=torch.float64),
        torch.full((3,), -5e307, dtype=torch.float64),
    ]
    ours, theirs = _params(*scaled), _params(*(g * inv for g in scaled))
    stats = clip_grad_norm_(ours, 1.0, norm_type, foreach=foreach, inv_scale=inv, return_stats=True)
    want = clip_grad_norm_(theirs, 1.0, norm_type, foreach=foreach)
    assert math.isfinite(float(want))
    torch.testing.assert_close(stats.norm, want, rtol=1e-15, atol=0)
    assert bool(stats.finite)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-15, atol=0)


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("scale", [1024.0, 3.0])
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_inv_scale_equals_unscale_then_clip(route, dtype, scale, foreach):
    base = _copy(_trained(dtype))
    for g in _grads(base):
        g.mul_(scale)
    ours, theirs = _copy(base), _copy(base)
    inv = torch.tensor(scale, dtype=torch.float64).reciprocal().float()
    for g in _grads(theirs):
        g.mul_(inv)  # what GradScaler.unscale_ does
    ref = _ref(theirs, 2.0)
    max_norm = ref / 4
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm, foreach=foreach)
    got = clip_grad_norm_(ours.parameters(), max_norm, foreach=foreach, inv_scale=inv)
    assert got.dtype == _result_dtype(base)
    # The unscaled norm of the scaled gradients (unscale_ rounds each product first).
    unscaled = _ref(base, 2.0) * float(inv)
    assert float(got) == pytest.approx(unscaled, rel=1e-6)
    if dtype != "bfloat16":
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-6, atol=0)
        _assert_grads_close(ours, theirs)
        return
    # torch's norm is a bfloat16, and unscale-then-clip rounds three times (g * inv,
    # the bfloat16 clip factor, g * factor): 2.3 ulps from the exact product here.
    # One pass rounds the factor and the product: within one ulp of exact.
    assert float(got) == pytest.approx(float(want), rel=2.0**-7)
    factor = float(inv) * max_norm / (unscaled + 1e-6)
    for g, a, b in zip(_grads(base), _grads(ours), _grads(theirs), strict=True):
        exact = g.double() * factor
        assert bool(((a.double() - exact).abs() <= _ulp(a)).all())
        assert bool(((a.double() - b.double()).abs() <= 3 * _ulp(b)).all())


# ----------------------------------------------------------------------------- FlatTree .grad


def _flat_grad_model():
    """A model whose .grad are a FlatTree's views, a copy with its own .grad, and the FlatTree.

    The FlatTree must be kept: its views alone do not keep it alive.
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    twin = copy.deepcopy(model)
    flat = gc.FlatTree.zeros_like([p.detach() for p in model.parameters()])
    for p, view in zip(model.parameters(), flat.tree, strict=True):
        p.grad = view
    for m in (model, twin):
        (m(torch.ones(5, 8)) * 40.0).square().sum().backward()
    assert all(p.grad is v for p, v in zip(model.parameters(), flat.tree, strict=True))
    return model, twin, flat


@pytest.fixture
def planned(monkeypatch):
    """How many tensors each drop-in call's plan held (a FlatTree's buffers, or every .grad)."""
    seen = []
    real = gct._plan

    def spy(prep, *args, **kwargs):
        seen.append(len(prep.flat.leaves))
        return real(prep, *args, **kwargs)

    monkeypatch.setattr(gct, "_plan", spy)
    return seen


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_grads_that_are_a_flattrees_views_are_clipped_through_its_buffers(planned, norm_type):
    # .grad set to a FlatTree's views (kept by zero_grad(set_to_none=False)):
    # one pass over the buffer, torch's results.
    model, twin, _owner = _flat_grad_model()
    got = clip_grad_norm_(model.parameters(), 1.0, norm_type)
    want = torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0, norm_type)
    assert planned == [1]
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    assert float(get_total_norm([p.grad for p in model.parameters()], norm_type)) == pytest.approx(
        float(torch.nn.utils.get_total_norm([q.grad for q in twin.parameters()], norm_type)),
        rel=1e-6,
    )
    clip_grads_with_norm_(model.parameters(), 0.5, got)
    torch.nn.utils.clip_grads_with_norm_(twin.parameters(), 0.5, want)
    clip_grad_value_(model.parameters(), 1e-3)
    torch.nn.utils.clip_grad_value_(twin.parameters(), 1e-3)
    assert planned == [1, 1, 1]  # clip_grad_value_ makes no plan
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


def test_flattree_grads_of_two_dtypes_use_both_buffers(planned):
    rng = np.random.default_rng(0)
    values = [rng.standard_normal(n) for n in (5, 7, 3)]
    dtypes = [torch.float32, torch.float64, torch.float32]
    params = [
        torch.nn.Parameter(torch.zeros(len(v), dtype=d))
        for v, d in zip(values, dtypes, strict=True)
    ]
    flat = gc.FlatTree.zeros_like([p.detach() for p in params])
    for p, view, v in zip(params, flat.tree, values, strict=True):
        p.grad = view
        view.copy_(torch.from_numpy(v))
    assert len(flat.buffers) == 2
    got = clip_grad_norm_(params, 1.0)
    assert planned == [2] and got.dtype == torch.float64
    want = ref_norm(
        [
            np.asarray(v, dtype=np.float32 if d == torch.float32 else np.float64)
            for v, d in zip(values, dtypes, strict=True)
        ],
        2.0,
    )
    assert float(got) == pytest.approx(want, rel=1e-6)
    assert float(get_total_norm([p.grad for p in params])) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("case", ["subset", "reordered", "foreach_false", "ord0", "dead_owner"])
def test_flattree_grads_take_the_per_tensor_route_where_they_must(planned, case):
    # Only all of a FlatTree's views, in its order, make its buffers stand in;
    # ord=0 counts tensors and foreach=False is the per-tensor reference.
    model, twin, flat = _flat_grad_model()
    params, others = list(model.parameters()), list(twin.parameters())
    kwargs = {}
    if case == "subset":
        params, others = params[1:], others[1:]
    elif case == "reordered":
        params, others = params[::-1], others[::-1]
    elif case == "foreach_false":
        kwargs = {"foreach": False}
    elif case == "ord0":
        kwargs = {"norm_type": 0.0}
    else:
        del flat  # the views keep the buffer alive, not the FlatTree
        import gc as pygc

        pygc.collect()
    got = clip_grad_norm_(params, 1.0, **kwargs)
    want = torch.nn.utils.clip_grad_norm_(others, 1.0, **kwargs)
    assert planned == [len(params)]
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_flattree_grads_that_are_not_finite_are_named_by_parameter():
    model, _, _owner = _flat_grad_model()
    model[2].weight.grad[1, 1] = math.nan
    with pytest.raises(gc.NonFiniteError, match=r"parameters\[2\]\.grad"):
        clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
    stats = clip_grad_norm_(model.parameters(), 1.0, nonfinite="skip", return_stats=True)
    assert not bool(stats.finite) and torch.isnan(model[2].weight.grad[1, 1])
