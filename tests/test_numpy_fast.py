"""The NumPy fast path (BLAS dots, threads, gathering) against the generic reference."""

from __future__ import annotations

import functools
import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import gradclip as gc
from conftest import (
    _make_numpy,
    assert_host_tail_is_array_tail,
    importorskip,
    np_dtype,
    ref_norm,
)
from gradclip import _blas, _core, _numpy
from gradclip._norms import Partial, Plan, host_norm, host_scale
from test_norms import test_accuracy_with_a_wide_range_of_squares as _wide_range_accuracy

TASK = _numpy._TASK


def _tree(dtypes=("float32",), seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    tree = {
        "big": rng.standard_normal(2 * TASK + 12345) * scale,  # several thread segments
        "mid": rng.standard_normal((300, 70)) * scale,
        "small": [rng.standard_normal(n) * scale for n in (1, 17, 900, 4000)],
        "scalar": np.asarray(-2.5),
        "strided": (rng.standard_normal((64, 90)) * scale)[:, ::3],
        "empty": np.zeros((0, 4)),
    }
    leaves = []

    def cast(a, i):
        a = np.asarray(a).astype(np_dtype(dtypes[i % len(dtypes)]))
        leaves.append(a)
        return a

    tree["big"] = cast(tree["big"], 0)
    tree["mid"] = cast(tree["mid"], 1)
    tree["small"] = [cast(a, i) for i, a in enumerate(tree["small"])]
    tree["scalar"] = cast(tree["scalar"], 2)
    tree["strided"] = tree["strided"].astype(np_dtype(dtypes[0]))[:, ::1]
    return tree


MIXES = [("float32",), ("float64",), ("float16", "float32"), ("bfloat16", "float32", "float64")]


@pytest.fixture(autouse=True)
def _needs_ml_dtypes():
    importorskip("ml_dtypes")


@pytest.mark.parametrize("dtypes", MIXES)
@pytest.mark.parametrize("ord", [2.0, 1.0, math.inf])
def test_norms_match_generic(dtypes, ord):
    tree = _tree(dtypes)
    fast = gc.global_norm(tree, ord=ord, fused=True)
    slow = gc.global_norm(tree, ord=ord, fused=False)
    assert fast.dtype == slow.dtype
    assert float(fast) == pytest.approx(float(slow), rel=1e-6)
    np.testing.assert_allclose(
        gc.leaf_norms(tree, ord=ord, fused=True),
        gc.leaf_norms(tree, ord=ord, fused=False),
        rtol=1e-6,
    )


@pytest.mark.parametrize("dtypes", MIXES)
@pytest.mark.parametrize("fn", ["clip_by_global_norm", "clip_by_norm"])
def test_clipping_matches_generic(dtypes, fn):
    tree = _tree(dtypes)
    fast, fstats = getattr(gc, fn)(tree, 2.0, fused=True)
    slow, sstats = getattr(gc, fn)(tree, 2.0, fused=False)
    for a, b in zip(gc._tree.flatten(fast).leaves, gc._tree.flatten(slow).leaves, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        rtol = 1e-6 if a.dtype in (np.float32, np.float64) else 1e-2
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=rtol)
    for f, s in zip(fstats, sstats, strict=True):
        np.testing.assert_allclose(np.asarray(f, np.float64), np.asarray(s, np.float64), rtol=1e-6)
    inplace = _tree(dtypes)
    getattr(gc, fn + "_")(inplace, 2.0)
    for a, b in zip(gc._tree.flatten(inplace).leaves, gc._tree.flatten(fast).leaves, strict=True):
        np.testing.assert_array_equal(a, b)


def test_block_rms_matches_generic():
    tree = _tree(("float32", "float64"))
    for a, b in zip(
        gc._tree.flatten(gc.clip_by_block_rms(tree, 0.5, fused=True)).leaves,
        gc._tree.flatten(gc.clip_by_block_rms(tree, 0.5, fused=False)).leaves,
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("odd", ["strided", "fortran", "float16", "big-endian", None])
def test_small_leaves_of_any_layout_are_gathered_right(odd):
    """Small leaves go through bytes.join when they can, np.concatenate when they cannot."""
    rng = np.random.default_rng(3)
    leaves = [rng.standard_normal(int(n)).astype(np.float32) for n in rng.integers(1, 3000, 400)]
    assert sum(x.size for x in leaves) > 2 * _numpy._GROUP  # several groups
    block = rng.standard_normal((40, 30)).astype(np.float32) * 100
    if odd is not None:
        leaves[150] = {
            "strided": block[:, ::2],
            "fortran": np.asfortranarray(block),
            "float16": block.astype(np.float16),
            "big-endian": block.astype(">f4"),
        }[odd]
    want = math.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in leaves))
    assert float(gc.global_norm(leaves, fused=True)) == pytest.approx(want, rel=1e-6)
    assert float(gc.global_norm(leaves[140:160], fused=True)) == pytest.approx(
        math.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in leaves[140:160])), rel=1e-6
    )


@pytest.mark.parametrize("value", [1e30, 1e-30, 3e-39])
@pytest.mark.parametrize("size", [5, 3 * 2**17 + 1])
def test_float32_dot_overflow_and_underflow_fall_back(value, size):
    """A float32 dot overflows at ~1e19 and loses entries below ~1e-19: those leaves are redone."""
    leaves = [np.full(size, value, np.float32), np.full(7, value, np.float32)]
    held = float(np.float32(value))
    want = held * math.sqrt(size + 7)
    assert float(gc.global_norm(leaves)) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(
        gc.leaf_norms(leaves), [held * math.sqrt(size), held * math.sqrt(7)], rtol=1e-5
    )
    stats = gc.clip_by_global_norm_(leaves, want / 2, eps=0.0)
    assert float(stats.scale) == pytest.approx(0.5, rel=1e-5)
    np.testing.assert_allclose(leaves[0], held / 2, rtol=1e-5)


def test_float64_extremes_fall_back():
    leaves = [np.full(3 * 2**17, 1e200), np.full(9, 1e-200)]
    assert float(gc.global_norm(leaves)) == pytest.approx(1e200 * math.sqrt(3 * 2**17), rel=1e-12)
    assert float(gc.global_norm(leaves[1:])) == pytest.approx(3e-200, rel=1e-12)


def test_zero_leaves_and_zero_tree():
    tree = [np.zeros(TASK + 3, np.float32), np.zeros(10, np.float32), np.full(4, 2.0, np.float32)]
    assert float(gc.global_norm(tree)) == 4.0
    assert float(gc.global_norm(tree[:2])) == 0.0
    assert gc.leaf_norms(tree).tolist() == [0.0, 0.0, 4.0]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_in_large_and_small_leaves(bad):
    for size in (TASK + 5, 30):
        tree = {"a": np.ones(50, np.float32), "b": np.ones(size, np.float32)}
        tree["b"][size // 2] = bad
        fast = gc.global_norm(tree)
        slow = gc.global_norm(tree, fused=False)
        assert np.isnan(fast) if math.isnan(bad) else fast == np.inf
        assert np.array_equal(fast, slow, equal_nan=True)
        with pytest.raises(gc.NonFiniteError, match=r"\['b'\]"):
            gc.clip_by_global_norm_(tree, 1.0, nonfinite="raise")
        assert tree["a"][0] == 1.0
        stats = gc.clip_by_global_norm_(tree, 1.0, nonfinite="skip")
        assert not bool(stats.finite) and tree["a"][0] == 1.0


def test_threads_are_deterministic():
    rng = np.random.default_rng(5)
    tree = [
        rng.standard_normal(5 * TASK + 77, dtype=np.float32),
        rng.standard_normal(999, dtype=np.float32),
    ]
    first = gc.global_norm(tree).tobytes()
    assert all(gc.global_norm(tree).tobytes() == first for _ in range(10))


@pytest.mark.parametrize("alias", ["same", "overlapping", "foreign", "disjoint", "strided"])
def test_leaves_sharing_memory_are_scaled_one_after_the_other(monkeypatch, alias):
    # One array given twice is scaled twice, as torch's foreach clip does. On
    # threads, each reading entries before the other wrote them, some would
    # be scaled once: the runs over such leaves take one thread.
    base = np.ones(4 * TASK, np.float32)
    # Two arrays over memory NumPy does not own (as torch tensors' views are):
    # their bases differ, their memory does not.
    raw = bytearray(base.tobytes())
    foreign = [np.frombuffer(raw, np.float32)[: 3 * TASK], np.frombuffer(raw, np.float32)[TASK:]]
    leaves = {
        "same": [base, base],
        "overlapping": [base[: 3 * TASK], base[TASK:]],
        "foreign": foreign,
        "disjoint": [base[: 2 * TASK], base[2 * TASK :]],  # views, but no shared entry
        # a strided view is multiplied on the calling thread, beside the pool's runs
        "strided": [base, base[::2]],
    }[alias]
    if alias == "foreign":
        base = np.frombuffer(raw, np.float32)
        alias = "overlapping"
    seen = []
    run = _numpy._run
    monkeypatch.setattr(
        _numpy, "_run", lambda tasks, local=None: seen.append(len(tasks)) or run(tasks, local)
    )
    norm = float(gc.global_norm(leaves))
    seen.clear()
    gc.clip_by_global_norm_(leaves, norm / 2, eps=0.0)  # scale 0.5
    assert (seen[-1] == 1) == (alias != "disjoint")  # the scale's tasks (the norm's first)
    want = {"same": {0.25}, "overlapping": {0.5, 0.25}, "disjoint": {0.5}, "strided": {0.5, 0.25}}
    assert set(np.unique(base).tolist()) == want[alias]
    if alias == "overlapping":
        assert np.all(base[TASK : 3 * TASK] == 0.25)
    if alias == "strided":  # every other entry, and only those, twice
        assert np.all(base[::2] == 0.25)
        assert np.all(base[1::2] == 0.5)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_result_does_not_depend_on_the_thread_count(monkeypatch, threads):
    """Pieces start at fixed offsets and are added exactly (fsum): any split gives the same bits."""
    rng = np.random.default_rng(7)
    tree = [rng.standard_normal(n, dtype=np.float32) for n in (3 * TASK + 5, 40_000, 900, 17)]
    want = gc.global_norm(tree).tobytes(), gc.leaf_norms(tree).tobytes()
    monkeypatch.setattr(_numpy, "_THREADS", threads)
    monkeypatch.setattr(_numpy, "_pool", None)  # a pool sized for this thread count
    assert (gc.global_norm(tree).tobytes(), gc.leaf_norms(tree).tobytes()) == want
    out = [x.copy() for x in tree]
    gc.clip_by_global_norm_(out, 1.0)
    assert float(gc.global_norm(out)) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize(
    "sizes", [[5 * TASK + 3], [3, 2**17, 2**17 + 1, TASK - 1, 7 * 2**17], [2**17 + 5] * 9]
)
def test_runs_cover_every_leaf_once_in_fixed_pieces(monkeypatch, sizes):
    monkeypatch.setattr(_numpy, "_THREADS", 2)
    runs = _numpy._runs(list(enumerate(sizes)))
    covered = {i: [] for i in range(len(sizes))}
    for run in runs:
        for i, start, stop in run:
            assert start % _numpy._DOT == 0 and start < stop <= sizes[i]
            covered[i].append((start, stop))
    for i, ranges in covered.items():
        ranges.sort()
        assert ranges[0][0] == 0 and ranges[-1][1] == sizes[i]
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    totals = [sum(stop - start for _, start, stop in run) for run in runs]
    if sum(sizes) >= _numpy._PARALLEL:  # balanced to within a piece per leaf and run
        slack = _numpy._DOT * (len(sizes) + len(runs))
        assert len(runs) >= 2 and max(totals) - min(totals) <= slack


@pytest.mark.parametrize("size", [5, 2 * _numpy._SMALL])  # gathered, or dotted alone
@pytest.mark.parametrize("nonfinite", ["propagate", "raise"])  # summed by group or by leaf
def test_float64_sums_that_overflow_only_when_added(size, nonfinite):
    """Each leaf's sum of squares is finite, their total is not: the leaves are redone scaled."""
    leaves = [np.zeros(size) for _ in range(2)]
    for x in leaves:
        x[:2] = 9e153  # 2 * 8.1e307 fits in float64; 4 * 8.1e307 does not
    want = 9e153 * 2
    for fused in (None, False):
        norm = gc.global_norm(leaves, nonfinite=nonfinite, fused=fused)
        assert float(norm) == pytest.approx(want, rel=1e-12)
    _, stats = gc.clip_by_global_norm(leaves, 1.0, nonfinite=nonfinite)
    assert float(stats.norm) == pytest.approx(want, rel=1e-12) and bool(stats.finite)
    batch = [x.reshape(1, -1) for x in leaves]  # one example: per-example sums, added
    assert float(gc.per_example_clip(batch, 1.0)[1].norm[0]) == pytest.approx(want, rel=1e-12)


def test_accuracy_matches_contract():
    rng = np.random.default_rng(6)
    x = rng.standard_normal(8 * 2**20, dtype=np.float32)
    want = ref_norm([x], 2.0)
    assert abs(float(gc.global_norm([x])) - want) / want <= 1e-6


def test_no_write_when_scale_is_one():
    x = np.full(TASK + 1, 0.5, np.float32)
    before = x.copy()
    stats = gc.clip_by_global_norm_([x], 1e9)
    assert float(stats.scale) == 1.0
    np.testing.assert_array_equal(x, before)


def test_fused_true_uses_the_fast_path():
    assert "numpy" in gc._api._FAST_PATHS
    out, _ = gc.clip_by_global_norm([np.ones(3)], 1.0, fused=True)
    np.testing.assert_allclose(out[0], 1 / math.sqrt(3), rtol=1e-6)


def test_dsdot_is_found_where_numpy_links_scipy_openblas():
    blas = np.__config__.CONFIG["Build Dependencies"]["blas"]
    if blas.get("name") != "scipy-openblas":
        pytest.skip(f"NumPy's BLAS here is {blas.get('name')}")
    assert _blas.dsdot() is not None
    assert _blas.short_sdot(_numpy._SHORT)


def test_accuracy_check_rejects_float32_sums():
    assert not _blas.accurate(lambda x: float(np.dot(x, x)), 1 << 17)  # sdot
    assert not _blas.short_sdot(1 << 17)
    wide = lambda x: float(np.dot(x.astype(np.float64), x.astype(np.float64)))  # noqa: E731
    assert _blas.accurate(wide, 1 << 17)


@pytest.mark.parametrize("blas", ["dsdot", "widened"])
def test_wide_range_of_squares_with_and_without_dsdot(monkeypatch, blas):
    """Both ways float32 is dotted stay within 1e-6 where float32 sums do not."""
    if blas == "widened":  # NumPy on a BLAS without an accurate dsdot or short sdot
        monkeypatch.setattr(_blas, "dsdot", lambda: None)
        monkeypatch.setattr(_blas, "short_sdot", lambda n: False)
    elif _blas.dsdot() is None:
        pytest.skip("NumPy's BLAS has no accurate dsdot here")
    _wide_range_accuracy(_make_numpy())
    batch = [np.ones((4, 0), np.float32), np.full((4, 3), 2.0, np.float32)]  # an empty leaf
    _, stats = gc.per_example_clip(batch, 1.0)
    assert stats.norm.tolist() == [np.float32(math.sqrt(12.0))] * 4


def _buffer(dtype, size, kind, seed=0):
    x = (np.random.default_rng(seed).standard_normal(size) * 3).astype(dtype)
    if kind == "nan":
        x[size // 2] = np.nan
    elif kind == "zeros":
        x[:] = 0
    elif kind == "tiny":
        x *= np.finfo(dtype).tiny  # squares underflow: the plan redoes the sum
    elif kind == "huge":
        x *= 1e20 if dtype == "float32" else 1e160  # squares overflow: the plan redoes it
    return x


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("size", [_numpy._SMALL, 3 * _numpy._SMALL + 5, _numpy._PARALLEL + 7])
@pytest.mark.parametrize("kind", ["normal", "nan", "zeros", "tiny", "huge"])
@pytest.mark.parametrize("max_norm", [0.0, 0.5, 3e4, 1e30])
def test_one_buffer_lane_is_the_plan_bit_for_bit(dtype, size, kind, max_norm):
    """A bare array or a FlatTree's one buffer skips the tree machinery; nothing else changes."""
    want = _buffer(dtype, size, kind)
    want_stats = gc.clip_by_global_norm_([want], max_norm)  # a list: the plan's path
    bare = _buffer(dtype, size, kind)
    flat = gc.FlatTree.from_tree({"w": _buffer(dtype, size, kind)})
    for tree, out in ((bare, bare), (flat, flat.tree["w"])):
        stats = gc.clip_by_global_norm_(tree, max_norm)
        assert out.tobytes() == want.tobytes()
        for got, ref in zip(stats, want_stats, strict=True):
            assert type(got) is np.ndarray and (got.dtype, got.shape) == (ref.dtype, ())
            assert got.tobytes() == ref.tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_host_norm_and_scale_are_the_generic_arithmetic_bit_for_bit(dtype):
    """The norm and scale from a float sum of squares: what Plan.norm and _scale_from_norm give."""
    dtype = np.dtype(dtype)
    top = float(np.finfo(dtype).max) / 2
    plan = Plan(np, 2.0, [np.zeros(1, dtype)])
    sums = [0.0, 5e-324, 1e-300, 2.0**-149, 0.3, 1.0, 1.0 + 2.0**-40, 2.0, 1e6, 3.0**40, 1e76]
    bounds = [0.0, 1e-45, 1e-6, 0.5, 1.0, 1.0 - 2.0**-30, 1e3, 1e38, 1e300]
    # and random ones, where rounding each operand into dtype first shows
    rng = np.random.default_rng(0)
    ranges = ((-8, 8), (-3, 3), (-8, 0))  # sums, bounds, eps: powers of ten
    drawn = zip(*((10.0 ** rng.uniform(lo, hi, 3000)).tolist() for lo, hi in ranges), strict=True)
    taken = 0
    for sumsq, max_norm, eps in [*itertools.product(sums, bounds, [0.0, 1e-6, 5.0]), *drawn]:
        norm = host_norm(sumsq, dtype)
        scale = None if norm is None else host_scale(norm, max_norm, eps)
        if scale is None:  # only near the top of the range
            assert max(math.sqrt(sumsq), max_norm) >= top
            continue
        taken += 1
        want_norm = plan.norm(Partial(np.float64(sumsq), None, None), 1)
        want_scale = _core._scale_from_norm(plan, want_norm, max_norm, eps)
        for got, want in ((norm, want_norm), (scale, want_scale)):
            assert (got.dtype, got.tobytes()) == (want.dtype, want.tobytes()), (sumsq, max_norm)
    assert taken > 3000
    for sumsq in (math.nan, math.inf):  # NaN gradients, an overflowed sum: the generic path
        assert host_norm(sumsq, dtype) is None


@pytest.mark.parametrize("dtypes", [["float32"], ["float64"], ["float16", "float32"]])
@pytest.mark.parametrize("nonfinite", ["propagate", "skip"])
def test_the_host_tail_is_the_array_tail_bit_for_bit(monkeypatch, dtypes, nonfinite):
    # Where the fast path's dots give one float sum, the norm and scale come
    # from it in NumPy scalars (see the helper).
    sizes = [3, 700, 5000, 20_000, 70_000]  # gathered, and dotted in pieces
    rng = np.random.default_rng(5)
    tree = [rng.standard_normal(n).astype(dtypes[i % len(dtypes)]) for i, n in enumerate(sizes)]

    def clip(max_norm, eps):
        grads = [x.copy() for x in tree]
        return gc.clip_by_global_norm_(grads, max_norm, eps=eps, nonfinite=nonfinite), grads

    def as_bytes(x):
        assert type(x) is np.ndarray
        return x.tobytes()

    norm_of = functools.partial(gc.global_norm, tree)
    assert_host_tail_is_array_tail(monkeypatch, _numpy.NumpyPlan, norm_of, clip, as_bytes)


def test_addresses_of_writable_read_only_and_empty_arrays():
    x = np.arange(20_000, dtype=np.float32)
    frozen = x.copy()
    frozen.flags.writeable = False
    for a in (x, x[5:], frozen, frozen[7:], x[:0], np.frombuffer(x.tobytes(), np.float32)):
        assert _numpy._address(a) == a.ctypes.data
    # a read-only leaf is dotted where it is, too
    assert float(gc.global_norm(frozen)) == pytest.approx(ref_norm([x], 2.0), rel=1e-6)


def test_value_clipping_in_place_is_the_generic_clamp(monkeypatch):
    # In place, number bounds, "propagate": one np.maximum/np.minimum a leaf,
    # the bound made once per dtype; the same bits as the generic clamp.
    rng = np.random.default_rng(9)
    dtypes = ["float16", "bfloat16", "float32", "float64"]
    tree = [
        (rng.standard_normal(n) * 3).astype(np_dtype(dtypes[i % 4]))
        for i, n in enumerate([5, 300, 7, 900, 0, 40])
    ]
    tree[1][4] = np.nan
    tree.append(np.asarray(-7.0))  # 0-d
    tree.append((rng.standard_normal((6, 8)) * 3)[:, ::2])  # strided
    tree.append((rng.standard_normal(9) * 3).astype(">f4"))  # big-endian
    for kwargs in (
        {"clip_value": 1 + 2.0**-11 + 2.0**-40},  # past float16's midpoint above 1
        {"lo": -1 - 2.0**-8 - 2.0**-40, "hi": 2.5},  # past bfloat16's below -1
        {"hi": 0.1},
        {"lo": -3},
    ):
        want = [x.copy() for x in tree]
        gc.clip_by_value_(want, fused=False, **kwargs)
        got = [x.copy() for x in tree]
        with monkeypatch.context() as m:
            m.setattr(_core, "clip_by_value", lambda *a, **k: pytest.fail("the generic clamp ran"))
            gc.clip_by_value_(got, **kwargs)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and g.tobytes() == w.tobytes(), kwargs
    # A functional clamp and the other policies: the generic one. (A NumPy
    # 0-d bound is read as a number.)
    calls = []
    tail = _core.clip_by_value
    monkeypatch.setattr(_core, "clip_by_value", lambda *a, **k: calls.append(1) or tail(*a, **k))
    gc.clip_by_value(tree, 0.5)
    gc.clip_by_value_([x.copy() for x in tree], 0.5, nonfinite="zero")
    assert len(calls) == 2


def test_one_buffer_lane_skips_the_plan(monkeypatch):
    def plan_used(*args, **kwargs):
        raise AssertionError("the plan ran")

    monkeypatch.setattr(_numpy.NumpyPlan, "__post_init__", plan_used)
    x = np.full(_numpy._SMALL, 2.0, np.float32)
    stats = gc.clip_by_global_norm_(gc.FlatTree.from_tree([x.copy()]), 1.0)
    assert float(stats.norm) == 2.0 * math.sqrt(x.size) and bool(stats.clipped)
    gc.clip_by_global_norm_(x, 1.0)
    assert float(np.linalg.norm(x.astype(np.float64))) == pytest.approx(1.0, rel=1e-6)
    # Everything else takes the plan: other dtypes, small or strided buffers,
    # several buffers, other arguments.
    for call in (
        lambda: gc.clip_by_global_norm_(x.astype(np.float16), 1.0),
        lambda: gc.clip_by_global_norm_(x[: _numpy._SMALL - 1], 1.0),
        lambda: gc.clip_by_global_norm_(x[::2], 1.0),
        lambda: gc.clip_by_global_norm_(gc.FlatTree.from_tree([x, x.astype(np.float64)]), 1.0),
        lambda: gc.clip_by_global_norm_(x, 1.0, ord=3),
        lambda: gc.clip_by_global_norm_(x, 1.0, nonfinite="skip"),
        lambda: gc.clip_by_global_norm_(x, 1.0, norm=2.0),
    ):
        with pytest.raises(AssertionError, match="the plan ran"):
            call()


@pytest.mark.parametrize("fn", ["clip_by_global_norm", "clip_by_norm"])
def test_a_big_endian_leaf_comes_back_in_native_order(fn):
    # As the generic path's x * scale: np.empty_like kept the byte order.
    leaves = [np.arange(1.0, 6.0, dtype=">f8"), np.arange(1.0, 6.0, dtype=">f4")]
    fast, generic = (getattr(gc, fn)(leaves, 1.0, fused=f)[0] for f in (None, False))
    for a, b in zip(fast, generic, strict=True):
        assert a.dtype.str == b.dtype.str == a.dtype.newbyteorder("=").str
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fn", ["clip_by_global_norm", "clip_by_norm"])
def test_a_memmap_leaf_comes_back_as_an_array(fn, tmp_path):
    # np.empty_like kept the subclass: a np.memmap with no file, where the
    # generic path (and NumPy's own x * s) gives an ndarray.
    mapped = np.memmap(tmp_path / "g", np.float32, "w+", shape=(5,))
    mapped[:] = np.arange(1.0, 6.0)
    fast, generic = (getattr(gc, fn)([mapped], 1.0, fused=f)[0][0] for f in (None, False))
    assert type(fast) is type(generic) is np.ndarray
    np.testing.assert_array_equal(fast, generic)


class _Sub(np.ndarray):
    """An ndarray subclass that adds nothing."""


@pytest.mark.parametrize("fn", ["clip_by_global_norm", "clip_by_norm", "clip_by_block_rms"])
def test_an_ndarray_subclass_leaf_keeps_its_class(fn):
    # The fast path gave a plain ndarray where the generic path's x * s keeps the class.
    leaf = np.arange(1.0, 6.0, dtype=np.float32).view(_Sub)
    trees = [getattr(gc, fn)([leaf], 0.1, fused=f) for f in (None, False)]
    fast, generic = (t[0] if fn == "clip_by_block_rms" else t[0][0] for t in trees)
    assert type(fast) is type(generic) is _Sub
    np.testing.assert_array_equal(fast, generic)


_BIG = 1 << 23  # elements: past _numpy._PARALLEL, so the thread pool takes part


def test_an_error_on_the_calling_thread_stops_the_pool_first():
    # The pool went on taking tasks after the caller had the exception (a
    # KeyboardInterrupt in an in-place clip): it kept scaling the arrays, and
    # a retry at once read them half-scaled and scaled them twice.
    import time

    started = []

    def task(k):
        def run():
            started.append(k)
            time.sleep(0.005)

        return run

    def local():
        time.sleep(0.02)  # the pool has started on the tasks
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _numpy._run([task(k) for k in range(100)], local=local)
    seen = len(started)
    time.sleep(0.1)
    assert len(started) == seen < 100


def _python(script: str) -> list[str]:
    """What ``script`` prints, run in a fresh interpreter (which must exit 0)."""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_a_forked_child_makes_its_own_pool():
    # The child inherited the parent's executor but not its threads: tasks
    # were queued for no thread, and the call hung (multiprocessing workers).
    # In a fresh interpreter: JAX, imported by other tests, warns at a fork.
    if not hasattr(os, "fork"):
        pytest.skip("no os.fork here")
    assert _BIG >= _numpy._PARALLEL
    script = f"""
import os, signal
import numpy as np, gradclip as gc
big = [np.ones({_BIG}, np.float32)]
want = float(gc.global_norm(big))  # the parent's pool now exists
pid = os.fork()
if pid == 0:  # exit 0 if the norm comes, killed by the alarm if the call hangs
    signal.alarm(60)
    os._exit(0 if float(gc.global_norm(big)) == want else 1)
_, status = os.waitpid(pid, 0)
print(os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status)
"""
    status = _python(script)
    assert status[0] == "True", f"child status {status}"


def test_calls_at_interpreter_shutdown_run_on_the_calling_thread():
    # After the main thread ends, concurrent.futures refuses new work: a thread
    # left running, or an atexit hook, got RuntimeError from a large tree.
    script = f"""
import atexit, threading, time
import numpy as np, gradclip as gc
big = [np.ones({_BIG}, np.float32)]
def late(where):
    print(where, float(gc.global_norm(big)), flush=True)
atexit.register(late, "atexit")
threading.Thread(target=lambda: (time.sleep(0.5), late("thread"))).start()
"""
    want = f"{float(np.sqrt(np.float32(_BIG)))}"
    assert _python(script) == ["thread", want, "atexit", want]
