"""The torch fast path on the CPU: large float32 leaves reduced by torch's row norms.

``TorchPlan`` takes float32 CPU leaves of 16K elements or more
through ``torch.linalg.vector_norm`` of 16K-element rows and falls back to the
overflow-safe path where a row norm may be wrong. Each case is compared with
the generic path (``fused=False``) and a float64 reference.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

import gradclip as gc
from conftest import assert_host_tail_is_array_tail, importorskip, ref_norm
from gradclip import _blas, _numpy
from gradclip.adaptive import AGC, AdaGC, AutoClip, QuantileBound, ZClip
from gradclip.monitor import GradMonitor

torch = importorskip("torch")

import gradclip.torch as gct  # noqa: E402
from gradclip.torch import _fast  # noqa: E402  (after the skip)

N = (1 << 20) + 12_345  # rows plus a tail


def _leaf(fill):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(N).astype(np.float32)
    return torch.from_numpy(fill(x))


def _zero_rows(x):
    x[: 40 * _fast._ROW] = 0  # whole rows of zeros, as in an embedding's gradient
    return x


def _one_huge_row(x):
    x[5 * _fast._ROW + 7] = 3e20  # its row's float32 sum of squares overflows
    return x


def _one_tiny_row(x):
    x[: 3 * _fast._ROW] *= 1e-25  # rows whose squares underflow in float32
    return x


def _all_tiny(x):
    return x * np.float32(1e-25)  # every float32 square underflows to 0


def _tiny_tail(x):
    x[-12_345:] *= 1e-25
    return x


def _nan(x):
    x[123_456] = np.nan
    return x


CASES = {
    "random": lambda x: x,
    "zero_rows": _zero_rows,
    "one_huge_row": _one_huge_row,
    "one_tiny_row": _one_tiny_row,
    "all_tiny": _all_tiny,
    "tiny_tail": _tiny_tail,
    "nan": _nan,
}


@pytest.mark.parametrize("case", list(CASES))
def test_row_norms_match_the_reference(case):
    big = _leaf(CASES[case])
    small = torch.full((300,), 2.0 * float(big[-1].abs()))  # of the big leaf's magnitude
    tree = [small, big]
    got = float(gc.global_norm(tree))
    generic = float(gc.global_norm(tree, fused=False))
    if case == "nan":
        assert math.isnan(got) and math.isnan(generic)
        return
    want = ref_norm([t.numpy() for t in tree], 2.0)
    assert got == pytest.approx(want, rel=1e-6)
    assert got == pytest.approx(generic, rel=1e-6)
    params = [t.clone() for t in tree]
    stats = gc.clip_by_global_norm_(params, 0.5 * want, eps=0.0)
    assert bool(stats.clipped)
    assert ref_norm([t.numpy() for t in params], 2.0) == pytest.approx(0.5 * want, rel=1e-6)


def test_rows_are_used_for_large_float32_leaves(monkeypatch):
    seen = []
    real = _fast._rows_sumsqs
    counted = lambda xs: seen.extend(map(torch.numel, xs)) or real(xs)  # noqa: E731
    monkeypatch.setattr(_fast, "_rows_sumsqs", counted)
    gc.global_norm([torch.ones(N), torch.ones(10), torch.ones(N, dtype=torch.float64)])
    assert seen == [N]  # not the small leaf, not float64


@pytest.mark.parametrize("blas", ["dsdot", "widened"])
def test_row_sums_with_and_without_dsdot(monkeypatch, blas):
    # The rows' norms are squared and added by dsdot, or widened by NumPy
    # where BLAS has no accurate one; a tail shorter than a row is added too.
    if blas == "widened":
        monkeypatch.setattr(_blas, "dsdot", lambda: None)
    elif _blas.dsdot() is None:
        pytest.skip("NumPy's BLAS has no accurate dsdot here")
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(n).astype(np.float32) for n in (N, 3 * _fast._ROW + 5)]
    xs[0][::4099] = 3000.0
    totals = _fast._rows_sumsqs([torch.from_numpy(x) for x in xs])
    for x, total in zip(xs, totals, strict=True):
        assert total == pytest.approx(ref_norm([x], 2.0) ** 2, rel=1e-6)
    # A sum that overflows, or one that may have lost squares to underflow: None.
    big, tiny = np.full(N, 1e30, np.float32), np.full(N, 1e-25, np.float32)
    assert _fast._rows_sumsqs([torch.from_numpy(big), torch.from_numpy(tiny)]) == [None, None]


def test_row_check_rejects_rows_too_long_for_float32_sums(monkeypatch):
    # torch adds a row's squares in float32: 16K-entry rows (this path's rows
    # before) lose 6e-5 of the squares after a large one; 128-entry rows pass.
    assert _fast._rows_accurate()
    monkeypatch.setattr(_fast, "_ROW", 1 << 14)
    assert not _fast._rows_accurate.__wrapped__()


def test_without_accurate_rows_large_leaves_take_numpy(monkeypatch):
    seen = []
    monkeypatch.setattr(_fast, "_rows_accurate", lambda: False)
    monkeypatch.setattr(_fast, "_rows_sumsqs", lambda xs: seen.extend(xs) or [None] * len(xs))
    x = np.ones(N, np.float32)
    x[::16384] = 4096.0
    want = ref_norm([x], 2.0)
    assert float(gc.global_norm([torch.from_numpy(x)])) == pytest.approx(want, rel=1e-6)
    assert seen == []


def test_large_non_contiguous_float32_leaves_are_reduced_and_clipped():
    # torch's row norms need a flat view; these leaves have none and go to
    # the NumPy views (a channels_last conv weight's gradient is one).
    rng = np.random.default_rng(1)
    base = torch.from_numpy(rng.standard_normal((256, 192), dtype=np.float32))
    conv = torch.from_numpy(rng.standard_normal((64, 64, 3, 3), dtype=np.float32))
    tree = [
        base.t(),  # transposed
        base[:, ::2],  # strided
        conv.contiguous(memory_format=torch.channels_last),
    ]
    assert not any(t.is_contiguous() for t in tree) and min(t.numel() for t in tree) >= _fast._ROW
    want = ref_norm([t.numpy() for t in tree], 2.0)
    assert float(gc.global_norm(tree)) == pytest.approx(want, rel=1e-6)
    assert float(gc.global_norm(tree, fused=False)) == pytest.approx(want, rel=1e-6)
    grads = [base.clone().t(), conv.clone().contiguous(memory_format=torch.channels_last)]
    total = ref_norm([t.numpy() for t in grads], 2.0)
    gc.clip_by_global_norm_(grads, 1.0, eps=0.0)
    assert ref_norm([t.numpy() for t in grads], 2.0) == pytest.approx(1.0, rel=1e-6)
    assert np.allclose(grads[0].numpy(), base.t().numpy() / total, rtol=1e-6)


def test_drop_in_on_a_channels_last_model():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(64, 64, 3).to(memory_format=torch.channels_last)
    x = torch.randn(1, 64, 8, 8).to(memory_format=torch.channels_last)
    model(x).square().sum().backward()
    assert not model.weight.grad.is_contiguous()
    ours = [p.grad.clone() for p in model.parameters()]
    want = torch.nn.utils.get_total_norm(ours)
    from gradclip.torch import clip_grad_norm_

    got = clip_grad_norm_(model.parameters(), 1.0)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    coef = torch.clamp(1.0 / (want + 1e-6), max=1.0)  # torch's clip_grads_with_norm_
    for p, g in zip(model.parameters(), ours, strict=True):
        torch.testing.assert_close(p.grad, g * coef, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fused", [None, True, False])
def test_functional_clip_is_differentiable(fused):
    # torch's autograd of one foreach multiply by a 0-d scale that requires
    # grad fails on a group of two or more tensors; the fast path takes the
    # per-tensor product there, as the generic path does.
    leaves = [torch.tensor([3.0, 4.0]), torch.tensor([12.0]), torch.tensor([[1.0, -2.0]])]
    weights = [1.0, 2.0, -1.0]

    def loss(clip):
        xs = [x.clone().requires_grad_() for x in leaves]
        out = clip(xs)
        total = sum(w * torch.sin(o).sum() for w, o in zip(weights, out, strict=True))
        return torch.autograd.grad(total, xs)

    def by_hand(xs):
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in xs]))
        scale = torch.clamp(1.0 / (norm + 1e-6), max=1.0)
        return [x * scale for x in xs]

    got = loss(lambda xs: gc.clip_by_global_norm(xs, 1.0, fused=fused)[0])
    for g, w in zip(got, loss(by_hand), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def _small_tree(seed, shapes, dtypes):
    rng = np.random.default_rng(seed)
    return [
        torch.from_numpy(rng.standard_normal(s, dtype=np.float64)).to(d)
        for s, d in zip(shapes, dtypes, strict=True)
    ]


def _shape(ndim, n):
    """``(1, ..., 1, n)`` of ``ndim`` dimensions; ``()`` (one entry) for 0."""
    return (1,) * (ndim - 1) + (n,) if ndim else ()


def test_small_leaves_gathered_by_torch_sum_as_numpys_gather():
    # Small CPU tensors are gathered by torch in the groups NumPy's path
    # gathers (several here: 6M elements of leaves under 16K), and dotted the
    # same way: the same norm, bit for bit, whatever their ndims.
    from gradclip import _numpy

    rng = np.random.default_rng(0)
    sizes = rng.integers(1, _numpy._SMALL, 800)
    assert sum(sizes) > 4 * _numpy._GROUP
    for ndims in ([1], [2], [1, 2], [0, 1, 3]):
        shapes = [_shape(ndims[i % len(ndims)], int(n)) for i, n in enumerate(sizes)]
        for dtypes in ([torch.float32], [torch.float64], [torch.float16, torch.float32]):
            tree = _small_tree(1, shapes, [dtypes[i % len(dtypes)] for i in range(len(shapes))])
            got = gc.global_norm(tree)
            assert got.dtype == (torch.float64 if dtypes == [torch.float64] else torch.float32)
            as_numpy = gc.global_norm([t.numpy() for t in tree])
            want = ref_norm([t.numpy() for t in tree], 2.0)
            assert float(got) == pytest.approx(want, rel=1e-6)
            assert float(got) == float(as_numpy), (ndims, dtypes)


def test_mid_sized_leaves_are_dotted_as_numpy_dots_them():
    # float32 leaves from NumPy's _SMALL up to _DIRECT elements are dotted
    # where they are, one dsdot each, beside gathered small ones: the same
    # norm as NumPy's path, bit for bit. (A float64 leaf makes the norm
    # float64, which shows the sums' last bits.)
    from gradclip import _numpy

    rng = np.random.default_rng(4)
    sizes = [*rng.integers(1, _numpy._SMALL, 300), *rng.integers(_numpy._SMALL, _fast._DIRECT, 12)]
    rng.shuffle(sizes)
    shapes = [(int(n),) if i % 2 else (1, int(n)) for i, n in enumerate(sizes)]
    tree = _small_tree(2, [*shapes, (3,)], [torch.float32] * len(shapes) + [torch.float64])
    want = ref_norm([t.numpy() for t in tree], 2.0)
    got = float(gc.global_norm(tree))
    assert got == pytest.approx(want, rel=1e-6)
    assert got == float(gc.global_norm([t.numpy() for t in tree]))
    stats = gc.clip_by_global_norm_(tree, 1.0)
    assert float(stats.norm) == got


@pytest.mark.parametrize("dtypes", [["float32"], ["float64"], ["bfloat16"], ["float16", "float32"]])
@pytest.mark.parametrize("policy", ["propagate", "skip"])
def test_the_host_tail_is_the_tensor_tail_bit_for_bit(monkeypatch, dtypes, policy):
    # The drop-in on CPU tensors takes the norm and scale from its float sum
    # in NumPy scalars (see the helper).
    kinds = [getattr(torch, d) for d in dtypes]
    sizes = [3, 700, 5000, 12_000]  # gathered
    each = [kinds[i % len(kinds)] for i in range(len(sizes))]
    if torch.float32 in kinds:  # float32 leaves dotted where they are, and by rows
        sizes, each = [*sizes, 20_000, _fast._DIRECT + 5], [*each, torch.float32, torch.float32]
    tree = _small_tree(5, [(n,) for n in sizes], each)

    def clip(max_norm, eps):
        grads = [t.clone() for t in tree]
        params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        stats = gct.clip_grad_norm_(params, max_norm, eps=eps, nonfinite=policy, return_stats=True)
        return stats, grads

    def as_bytes(t):
        return t.reshape(-1).view(torch.uint8).numpy().tobytes()

    norm_of = functools.partial(gct.get_total_norm, tree)
    assert_host_tail_is_array_tail(monkeypatch, _fast.TorchPlan, norm_of, clip, as_bytes)


def test_the_host_tail_takes_torchs_float64_sqrt(monkeypatch):
    # torch's float64 sqrt (SLEEF's) is 1 ulp off the correctly rounded root
    # for about 1% of values, this one among them: the host tail takes
    # torch's, so the norm does not depend on the policy or the path.
    values = [0.5917326051339428, -1.6003820559378816, -0.4459212672219349]
    g = torch.tensor(values, dtype=torch.float64)
    norms = []
    for kwargs in ({}, {"error_if_nonfinite": True}, {"foreach": False}):
        p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        p.grad = g.clone()
        with monkeypatch.context() as m:
            if not kwargs:  # the host tail
                m.setattr(_fast.TorchPlan, "total", lambda *a: pytest.fail("the tensor tail ran"))
            norms.append(gct.clip_grad_norm_([p], 0.3, eps=0.0).item().hex())
    assert norms == [torch.sqrt((g * g).sum()).item().hex()] * 3


@pytest.mark.parametrize("kwargs", [{}, {"error_if_nonfinite": True}, {"nonfinite": "skip"}])
def test_float64_sums_that_overflow_only_when_added(kwargs):
    # A gathered leaf's float64 sum of squares and a NumPy view's are each
    # finite, their total is not: they are redone scaled, not added to inf
    # (which zeroed the gradients, or raised, or skipped the step).
    v = 1.2e153
    small = torch.full((100,), v, dtype=torch.float64)  # 1.44e308
    large = torch.zeros(2 * _numpy._SMALL, dtype=torch.float64)
    large[:70] = v  # 1.01e308
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in (small, large)]
    for p, g in zip(params, (small, large), strict=True):
        p.grad = g.clone()
    stats = gct.clip_grad_norm_(params, 1.0, return_stats=True, **kwargs)
    want = math.sqrt(170) * v
    assert float(stats.norm) == pytest.approx(want, rel=1e-12) and bool(stats.finite)
    assert float(params[0].grad[0]) == pytest.approx(1 / math.sqrt(170), rel=1e-12)


@pytest.mark.parametrize("inplace", [True, False])
def test_value_clipping_by_foreach_clamps_is_the_generic_clamp(monkeypatch, inplace):
    # Number bounds, "propagate": torch's foreach clamps, a dtype at a time,
    # with each bound rounded once into the dtype first; the same bits as the
    # generic path (NaN kept, float16 and bfloat16 bounds past a midpoint).
    from gradclip import _core

    rng = np.random.default_rng(3)
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    tree = [
        torch.from_numpy(rng.standard_normal(n) * 3).to(dtypes[i % 4])
        for i, n in enumerate([5, 300, 7, 1000, 0, 64, 3, 9])
    ]
    tree[1][4] = math.nan
    bounds = [
        {"clip_value": 1 + 2.0**-11 + 2.0**-40},  # past float16's midpoint above 1
        {"lo": -1 - 2.0**-8 - 2.0**-40, "hi": 2.5},  # past bfloat16's below -1
        {"hi": 0.1},
        {"lo": -0.3},
    ]
    fn = gc.clip_by_value_ if inplace else gc.clip_by_value

    def run(fused, kwargs):
        grads = [t.clone() for t in tree]
        out = fn(grads, fused=fused, **kwargs)
        return grads if inplace else out

    tail = _core.clip_by_value
    for kwargs in bounds:
        want = run(False, kwargs)
        with monkeypatch.context() as m:
            m.setattr(_core, "clip_by_value", lambda *a, **k: pytest.fail("the generic clamp ran"))
            got = run(None, kwargs)
        for g, w, t in zip(got, want, tree, strict=True):
            assert (g.dtype, g.shape) == (w.dtype, w.shape)
            if t.numel():  # bits, NaN too; a functional clamp's are new tensors
                assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)), kwargs
                assert inplace or g.data_ptr() != t.data_ptr()
    # Array bounds and the other policies take the generic clamp.
    calls = []
    monkeypatch.setattr(_core, "clip_by_value", lambda *a, **k: calls.append(1) or tail(*a, **k))
    run(None, {"clip_value": torch.tensor(0.5)})
    run(None, {"clip_value": 0.5, "nonfinite": "zero"})
    assert len(calls) == 2


def test_small_leaves_of_one_work_dtype_are_gathered_a_dtype_at_a_time():
    # float64 and float16 leaves (both dotted in float64) are gathered
    # apart, a buffer per torch dtype: one buffer in the first leaf's dtype
    # would round the float64 leaf to float16.
    tree = [
        torch.full((5,), 1 / 3, dtype=torch.float16),
        torch.full((7,), 1 / 3, dtype=torch.float64),
    ]
    want = ref_norm([t.numpy() for t in tree], 2.0)
    for order in (tree, tree[::-1]):
        assert float(gc.global_norm(order)) == pytest.approx(want, rel=1e-12)


def test_gather_takes_leaves_of_any_ndim_and_layout():
    layouts = [
        [(4, 8), (3,)],
        [(8, 4), (3,)],
        [(32,), (1, 3)],
        [(32,), (3,)],
        [(2, 16), (3, 1)],
        [(2, 2, 8), (3,)],
        [(32,), (1, 1, 3)],
        [(32,), (3,), (1, 5)],
        [(32,), (), (5,)],
        [(1, 32), (1, 3), (5,)],
    ]
    for seed, shapes in enumerate(layouts):
        tree = _small_tree(seed, shapes, [torch.float32] * len(shapes))
        want = ref_norm([t.numpy() for t in tree], 2.0)
        assert float(gc.global_norm(tree)) == pytest.approx(want, rel=1e-6), shapes
        gc.clip_by_global_norm_(tree, 0.5 * want, eps=0.0)
        assert ref_norm([t.numpy() for t in tree], 2.0) == pytest.approx(0.5 * want, rel=1e-6)
        # a strided leaf (a transposed or reversed view) is gathered as it reads
        tree[0] = tree[0].t() if tree[0].dim() == 2 else tree[0].flip(0)
        assert float(gc.global_norm(tree)) == pytest.approx(0.5 * want, rel=1e-6), shapes


def test_gather_copies_on_the_calling_thread(monkeypatch):
    # Each torch.cat of the gather copies fewer elements than torch's
    # GRAIN_SIZE (or one tensor), so that torch runs its serial kernel: a
    # parallel copy waits for a pool thread, which a busy machine's
    # scheduler can hold back for milliseconds a call.
    calls = []
    cat = torch.cat

    def counted(tensors, *, out):
        calls.append((len(tensors), out.numel()))
        return cat(tensors, out=out)

    monkeypatch.setattr(torch, "cat", counted)
    sizes = np.random.default_rng(2).integers(1, 16384, 600)
    tree = [torch.ones(int(n)) if i % 2 else torch.ones(1, int(n)) for i, n in enumerate(sizes)]
    assert float(gc.global_norm(tree)) == pytest.approx(math.sqrt(sum(sizes)), rel=1e-6)
    assert sum(n for _, n in calls) == sum(sizes)  # every leaf is gathered
    assert all(n < _fast._SERIAL or k == 1 for k, n in calls)
    assert len(calls) < 2 * sum(sizes) / _fast._SERIAL + 10  # and not one a tensor


def test_small_leaves_gathered_in_inference_mode():
    # What is gathered under torch.inference_mode() is an inference tensor,
    # and the same layout is gathered again outside it.
    tree = _small_tree(5, [(40,), (6, 7)], [torch.float32] * 2)
    want = ref_norm([t.numpy() for t in tree], 2.0)
    with torch.inference_mode():
        assert float(gc.global_norm(tree)) == pytest.approx(want, rel=1e-6)
    assert float(gc.global_norm(tree)) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize(
    ("value", "dtype"),
    [(1e30, "float32"), (1e-30, "float32"), (1e200, "float64"), (1e-200, "float64")],
)
def test_small_leaves_past_their_squares_range_are_redone(value, dtype):
    # A gathered group whose dot overflowed (1e200**2) or lost its squares to
    # underflow (1e-200**2 is 0) is reduced again by the overflow-safe path.
    dtype = getattr(torch, dtype)
    tree = [torch.full((n,), value, dtype=dtype) for n in (100, 15, 7)]
    want = value * math.sqrt(122.0)
    assert float(gc.global_norm(tree)) == pytest.approx(want, rel=1e-6, abs=0)
    stats = gc.clip_by_global_norm_(tree, 0.5 * want, eps=0.0)
    assert float(stats.norm) == pytest.approx(want, rel=1e-6, abs=0)
    assert float(tree[0][0]) == pytest.approx(0.5 * value, rel=1e-6, abs=0)


def test_a_norm_does_not_depend_on_the_trees_before_it():
    # A tree's norm is the same bits whatever trees of the same sizes and
    # other ndims were gathered before, and whatever its leaves' ndims.
    # One square of 1e16 among many of 0.49, which the order of adding rounds.
    sizes = np.random.default_rng(7).integers(1, 300, 400)
    flat = [torch.full((1,), 1e8, dtype=torch.float64)]
    flat += [torch.full((int(n),), 0.7, dtype=torch.float64) for n in sizes]
    mixed = [t.view(1, -1) if i % 3 == 1 else t for i, t in enumerate(flat)]
    alone = float(gc.global_norm(flat))
    assert float(gc.global_norm(mixed)) == alone
    assert float(gc.global_norm(flat)) == alone


def test_threads_gather_trees_of_one_size_and_other_ndims():
    # Two threads clipping trees of the same sizes at once, one of them of
    # mixed ndims: each is gathered by its own leaves' ndims.
    from concurrent.futures import ThreadPoolExecutor

    sizes = range(50, 1050, 5)
    layouts = [[(n,) for n in sizes], [(n,) if i % 2 else (1, n) for i, n in enumerate(sizes)]]
    trees = [_small_tree(seed, s, [torch.float32] * len(s)) for seed, s in enumerate(layouts)]
    trees[1] = [t * 100.0 for t in trees[1]]
    wants = [float(gc.global_norm(t, fused=False)) for t in trees]

    def norms(k):
        return {float(gc.global_norm(trees[k])) for _ in range(200)}

    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(norms, [0, 1]))
    for found, want in zip(got, wants, strict=True):
        assert len(found) == 1
        assert found.pop() == pytest.approx(want, rel=1e-6)


def test_views_of_one_tensor_share_memory():
    # Their NumPy views have different bases (x and x.view(-1)): the scale
    # of in-place leaves that alias must still run them one after the other.
    from gradclip._numpy import _overlap

    x = torch.ones(8)
    assert _overlap([x.numpy(), x.view(-1).numpy()])
    assert not _overlap([x[:4].numpy(), x[4:].numpy()])
    assert not _overlap([torch.ones(8).numpy(), torch.ones(8).numpy()])


def _host_copies_to_cuda(fn, monkeypatch):
    """The blocking CPU-to-CUDA copies ``fn(params)`` makes, on fake CUDA tensors (no GPU).

    Such a copy waits for the stream (a host sync): torch.asarray of a Python
    number on a CUDA device is one (pytorch#120996). The kernel route is off:
    fake tensors have no memory for CuPy; this is the foreach/generic route.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    copies = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            target = kwargs.get("device")
            if (
                func is torch.ops.aten._to_copy.default
                and args[0].device.type == "cpu"
                and target is not None
                and torch.device(target).type == "cuda"
                and not kwargs.get("non_blocking", False)
            ):
                copies.append(func)
            return func(*args, **kwargs)

    monkeypatch.setattr(_fast, "kernel_route", lambda leaves: None)
    with FakeTensorMode():
        params = [torch.nn.Parameter(torch.zeros(8, 4, device="cuda")) for _ in range(3)]
        for p in params:
            p.grad = torch.randn(8, 4, device="cuda")
        with Log():
            fn(params)
    return len(copies)


def _quantile_bound_step(grads):
    # init made its two constants with torch.asarray of Python numbers.
    qb = QuantileBound()
    return qb.update(gc.leaf_norms(grads), qb.init(grads))


@pytest.mark.parametrize(
    "fn",
    [
        lambda ps: gct.clip_grad_norm_(ps, 1.0),
        lambda ps: gct.clip_grad_norm_(ps, 1.0, nonfinite="skip"),
        lambda ps: gct.clip_grads_with_norm_(ps, 1.0, 2.0),
        lambda ps: gc.clip_by_global_norm([p.grad for p in ps], 1.0, norm=2.0),
        lambda ps: gc.clip_by_value([p.grad for p in ps], 0.5),
        lambda ps: gc.clip_by_block_rms([p.grad for p in ps], 1.0),
        lambda ps: _quantile_bound_step([p.grad for p in ps]),
    ],
    ids=[
        "clip_grad_norm_",
        "skip",
        "clip_grads_with_norm_",
        "given-norm",
        "clip_by_value",
        "clip_by_block_rms",
        "QuantileBound",
    ],
)
def test_no_host_copy_to_cuda_for_constants(fn, monkeypatch):
    # Each constant made from a Python number was a blocking copy to the GPU:
    # 2 per leaf in clip_by_value, 1 or more per norm clip, where torch's own
    # clip_grad_norm_ and clip_grad_value_ make none. (Fake tensors cannot run
    # the in-place block writes of clip_grad_value_, "zero" or AutoClip's take.)
    assert (
        _host_copies_to_cuda(lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0), monkeypatch) == 0
    )
    assert _host_copies_to_cuda(fn, monkeypatch) == 0


_TOP_LEVEL = {
    "clip_by_global_norm_": lambda gs: gc.clip_by_global_norm_(gs, 1.0).norm,
    "clip_by_global_norm": lambda gs: gc.clip_by_global_norm(gs, 1.0),
    "global_norm": lambda gs: gc.global_norm(gs),
    "leaf_norms": lambda gs: gc.leaf_norms(gs, ord=1.0),
    "clip_by_norm_": lambda gs: gc.clip_by_norm_(gs, 1.0).norm,
    "clip_by_norm": lambda gs: gc.clip_by_norm(gs, 1.0),
    "clip_by_value_": lambda gs: gc.clip_by_value_(gs, 0.1),
    "clip_by_value": lambda gs: gc.clip_by_value(gs, lo=-0.1, hi=0.2),
    "clip_by_block_rms": lambda gs: gc.clip_by_block_rms(gs, 0.5),
    "per_example_clip": lambda gs: gc.per_example_clip(gs, 1.0),
}


@pytest.mark.parametrize("name", list(_TOP_LEVEL))
def test_top_level_functions_run_eagerly_under_torch_compile(name):
    # Dynamo traced into the NumPy views of the CPU path and, once any gradclip
    # call had run eagerly in the process, failed inside itself (AssertionError:
    # Expected np.nditer base). Each call is now a graph break, as in gradclip.torch.
    clip = _TOP_LEVEL[name]
    gc.clip_by_global_norm_([torch.ones(3)], 1.0)  # an eager call first

    def step(gs):
        gs = [g * 2 for g in gs]  # traced before and after the call
        out = clip(gs)
        return gs, out, gs[0].sum() + 1

    def grads():
        torch.manual_seed(0)
        return [torch.randn(4, 8), torch.randn(4, 3), torch.randn(4)]

    compiled = torch.compile(step, backend="eager")
    want = step(grads())
    for _ in range(2):
        torch.testing.assert_close(compiled(grads()), want, rtol=0, atol=0)


def test_compiled_calls_read_no_sys_modules(monkeypatch):
    # Dynamo wraps a dict it reads item by item: with sys.modules, a module
    # imported meanwhile failed the compile ("dictionary changed size during
    # iteration", seen after test_validation and test_torch_dropin had run).
    from gradclip import _api

    gc.global_norm([torch.ones(3)])  # eager, with Dynamo loaded (by gradclip.torch)

    class Unreadable(dict):
        def get(self, *args):
            raise AssertionError("sys.modules read")

        def __getitem__(self, key):
            raise AssertionError("sys.modules read")

    monkeypatch.setattr(_api, "_modules", Unreadable())
    compiled = torch.compile(lambda gs: gc.leaf_norms(gs)[0] + 1, backend="eager")
    assert float(compiled([torch.full((4,), 0.5)])) == 2.0


@pytest.mark.parametrize(
    "clipper",
    [ZClip(), AutoClip(), AdaGC(), AGC(layout="torch")],
    ids=["zclip", "autoclip", "adagc", "agc"],
)
def test_adaptive_clippers_and_the_monitor_run_eagerly_under_torch_compile(clipper):
    # They call gradclip's internals, not the wrapped top-level functions:
    # Dynamo traced into them and failed (a lru_cache warning, under errors).
    gc.clip_by_global_norm_([torch.ones(3)], 1.0)  # an eager call first
    torch.manual_seed(0)
    grads = [torch.randn(4, 8), torch.randn(8)]
    params = [torch.randn(4, 8), torch.randn(8)] if isinstance(clipper, AGC) else None
    state, monitor = clipper.init(grads), GradMonitor()

    def step(gs):
        _, stats = clipper.update_(gs, state, params)
        monitor.update(gs, stats)
        return stats.norm

    want = step([g.clone() for g in grads])
    got = torch.compile(step, backend="eager")([g.clone() for g in grads])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(monitor.history.global_norm) == 2


def test_a_flat_tree_is_clipped_eagerly_under_torch_compile():
    # Its tensors are out of Dynamo's sight, so the call's own frame is not
    # compiled at the graph break: checking torch.compiler.is_compiling()
    # there was not enough, and Dynamo compiled the frames it called.
    torch.manual_seed(0)
    flat = gc.FlatTree.from_tree({"w": torch.randn(4, 8), "b": torch.randn(3)})
    want = gc.global_norm(flat)
    compiled = torch.compile(lambda: gc.clip_by_global_norm_(flat, 1.0).norm, backend="eager")
    torch.testing.assert_close(compiled(), want, rtol=0, atol=0)
    torch.testing.assert_close(gc.global_norm(flat), torch.tensor(1.0), rtol=1e-5, atol=0)
