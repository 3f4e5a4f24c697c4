"""Clipping functions, their in-place forms and the nonfinite policies, on every backend."""

from __future__ import annotations

import math

import numpy as np
import optree
import pytest

import gradclip as gc
from conftest import FLOATS, importorskip, need, np_dtype, ref_norm


def _leaves(xp, dtype="float32", seed=0, scale=10.0):
    rng = np.random.default_rng(seed)
    host = [rng.standard_normal(s) * scale for s in [(4, 3), (5,), ()]]
    if dtype.startswith("complex"):
        host[0] = host[0] + 1j * host[0][::-1]
    leaves = [xp.array(h, dtype) for h in host]
    return leaves, [
        xp.numpy(x).astype(np.complex128 if "complex" in dtype else np.float64) for x in leaves
    ]


def _rtol(dtype):
    return {"float16": 2e-3, "bfloat16": 1.6e-2}.get(dtype, 1e-6)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("ord", [2.0, 1.0, math.inf])
def test_clip_by_global_norm(xp, dtype, ord):
    need(xp, dtype)
    leaves, ref = _leaves(xp, dtype)
    tree = {"a": leaves[0], "b": [leaves[1], None, leaves[2]]}
    out, stats = gc.clip_by_global_norm(tree, max_norm=2.0, ord=ord)
    norm = ref_norm(ref, ord)
    scale = min(1.0, 2.0 / (norm + 1e-6))
    assert out["b"][1] is None
    assert float(stats.norm) == pytest.approx(norm, rel=1e-6)
    assert float(stats.scale) == pytest.approx(scale, rel=1e-6)
    assert bool(stats.clipped) and bool(stats.finite)
    for got, want, orig in zip([out["a"], out["b"][0], out["b"][2]], ref, leaves, strict=True):
        assert got.dtype == orig.dtype
        assert tuple(got.shape) == tuple(orig.shape)
        np.testing.assert_allclose(xp.numpy(got), want * scale, rtol=_rtol(dtype), atol=1e-30)
    # functional: inputs untouched
    np.testing.assert_array_equal(xp.numpy(leaves[0]), xp.numpy(xp.array(ref[0], dtype)))


def _check_half_scaling(xp, dtype, max_norm, clip):
    need(xp, dtype)
    rng = np.random.default_rng(3)
    host = np.full(1000, 60000.0) if max_norm < 0.1 else rng.standard_normal(5000) * 3
    leaf = xp.array(host, dtype)
    before = xp.numpy(leaf).astype(np.float32)
    out, scale = clip(leaf, max_norm)
    want = (before * np.float32(xp.numpy(scale))).astype(np_dtype(dtype))
    np.testing.assert_array_equal(xp.numpy(out).astype(np.float64), want.astype(np.float64))


HALF_CASES = pytest.mark.parametrize(
    ("dtype", "max_norm"), [("float16", 0.37), ("bfloat16", 0.37), ("float16", 0.01)]
)


@HALF_CASES
@pytest.mark.parametrize("fused", [None, False])
def test_half_leaves_are_scaled_in_float32_and_rounded_once(xp, dtype, max_norm, fused):
    """As torch's ``mul_`` does: the float32 scale times the leaf, rounded once.

    Rounding the scale to float16/bfloat16 first put 8% of bfloat16 products
    1 ulp off torch's, and made a float16 scale below 6e-8 zero: 60000s
    clipped to 0.01 (a scale of 5e-9) all became 0.
    """

    def clip(leaf, max_norm):
        out, stats = gc.clip_by_global_norm([leaf], max_norm, fused=fused)
        return out[0], stats.scale

    _check_half_scaling(xp, dtype, max_norm, clip)


@HALF_CASES
@pytest.mark.parametrize("fused", [None, False])
def test_half_leaves_in_place_are_scaled_in_float32(mutable_xp, dtype, max_norm, fused):
    def clip(leaf, max_norm):
        return leaf, gc.clip_by_global_norm_([leaf], max_norm, fused=fused).scale

    _check_half_scaling(mutable_xp, dtype, max_norm, clip)


def test_no_clip_when_under_max_norm(xp):
    leaves, ref = _leaves(xp, scale=0.01)
    out, stats = gc.clip_by_global_norm(leaves, max_norm=1.0)
    assert float(stats.scale) == 1.0
    assert not bool(stats.clipped)
    for got, want in zip(out, ref, strict=True):
        np.testing.assert_array_equal(xp.numpy(got), want.astype(np.float32))


@pytest.mark.parametrize("dtype", FLOATS)
def test_inplace_equals_functional(mutable_xp, dtype):
    xp = mutable_xp
    need(xp, dtype)
    leaves, _ = _leaves(xp, dtype)
    expected, stats_f = gc.clip_by_global_norm(leaves, 1.0)
    stats_i = gc.clip_by_global_norm_(leaves, 1.0)
    for got, want in zip(leaves, expected, strict=True):
        np.testing.assert_array_equal(xp.numpy(got), xp.numpy(want))
    assert float(stats_i.norm) == float(stats_f.norm)


def test_inplace_blocks_and_strided_leaves(mutable_xp):
    """Leaves larger than one block, and non-contiguous views, are written in place."""
    xp = mutable_xp
    rng = np.random.default_rng(3)
    big = xp.array(rng.standard_normal(3 * 2**20 + 5), "float32")
    base = xp.array(rng.standard_normal((2**11, 2**10)), "float32")
    strided = base[:, ::2]  # a view: 1M elements, not contiguous
    ref = [xp.numpy(big).astype(np.float64), xp.numpy(strided).astype(np.float64)]
    stats = gc.clip_by_global_norm_([big, strided], max_norm=3.0)
    scale = 3.0 / (ref_norm(ref, 2.0) + 1e-6)
    assert float(stats.scale) == pytest.approx(scale, rel=1e-6)
    np.testing.assert_allclose(xp.numpy(big), ref[0] * scale, rtol=1e-6)
    np.testing.assert_allclose(xp.numpy(strided), ref[1] * scale, rtol=1e-6)
    np.testing.assert_allclose(xp.numpy(base)[:, 1::2], xp.numpy(base)[:, 1::2])  # untouched half


def test_zero_d_and_single_array(xp):
    x = xp.array(np.array(-8.0), "float32")
    out, stats = gc.clip_by_global_norm(x, 2.0)
    assert tuple(out.shape) == ()
    assert float(out) == pytest.approx(-2.0, rel=1e-6)
    assert float(stats.norm) == 8.0
    if xp.mutable:
        gc.clip_by_global_norm_(x, 2.0)
        assert float(x) == pytest.approx(-2.0, rel=1e-6)


def test_generator_is_consumed_once(xp):
    leaves, _ = _leaves(xp)
    gen = (x for x in leaves)
    out, _ = gc.clip_by_global_norm(gen, 1.0)
    assert isinstance(out, list) and len(out) == 3
    assert list(gen) == []
    if xp.mutable:
        gc.clip_by_global_norm_((x for x in leaves), 1.0)
        assert float(gc.global_norm(leaves)) == pytest.approx(1.0, rel=1e-5)


def test_max_norm_zero_and_inf(xp):
    leaves, ref = _leaves(xp)
    out, _ = gc.clip_by_global_norm(leaves, 0.0)
    assert all(np.all(xp.numpy(o) == 0) for o in out)
    out, stats = gc.clip_by_global_norm(leaves, math.inf)
    assert float(stats.scale) == 1.0
    np.testing.assert_array_equal(xp.numpy(out[0]), ref[0].astype(np.float32))


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("bound", ["python", "array", "1e39"])
@pytest.mark.parametrize("fn", ["clip_by_global_norm", "clip_by_norm"])
def test_an_infinite_norm_under_an_infinite_bound_is_nan(xp, fn, bound, fused):
    # inf / (inf + eps) is NaN in torch's arithmetic ("propagate"): max_norm=inf
    # to log the norm without clipping still shows an overflowed step. It
    # was a scale of 1, the gradients left as they were. A bound of 1e39 is
    # inf in float32 too (torch's too); the generic path took it as finite.
    leaves = [xp.array([3.0, math.inf], "float32"), xp.array([1.0, 2.0], "float32")]
    limit = {"python": math.inf, "1e39": 1e39}.get(bound)
    if limit is None:
        limit = xp.ns.asarray(math.inf, dtype=xp.ns.float32)
    out, stats = getattr(gc, fn)(leaves, limit, fused=fused)
    scale = xp.numpy(stats.scale)
    if fn == "clip_by_global_norm":
        assert np.isnan(scale) and all(np.all(np.isnan(xp.numpy(x))) for x in out)
    else:  # only the leaf with the infinite norm
        assert np.isnan(scale[0]) and scale[1] == 1.0
        np.testing.assert_array_equal(xp.numpy(out[1]), [1.0, 2.0])


def test_max_norm_as_array(xp):
    leaves, ref = _leaves(xp)
    limit = xp.ns.asarray(2.0, dtype=xp.ns.float32)
    _, stats = gc.clip_by_global_norm(leaves, limit)
    assert float(stats.scale) == pytest.approx(2.0 / (ref_norm(ref, 2) + 1e-6), rel=1e-6)


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("fn", ["clip_by_global_norm", "clip_by_norm"])
def test_nan_array_max_norm_gives_nan_not_a_silent_no_op(xp, fn, fused):
    # A NaN device bound cannot be checked without a sync: it makes the scale
    # NaN, as in torch's clip_grad_norm_, never 1. A NumPy 0-d bound, or a
    # CPU tensor, is read.
    leaves, _ = _leaves(xp)
    limit = xp.ns.asarray(math.nan, dtype=xp.ns.float32)
    cpu_tensor = type(limit).__module__ == "torch" and limit.device.type == "cpu"
    if xp.name == "numpy" or cpu_tensor:
        with pytest.raises(ValueError, match="max_norm must be a number >= 0"):
            getattr(gc, fn)(leaves, limit, fused=fused)
        return
    out, stats = getattr(gc, fn)(leaves, limit, fused=fused)
    assert np.all(np.isnan(xp.numpy(stats.scale)))
    assert all(np.all(np.isnan(xp.numpy(x))) for x in out)


def test_precomputed_norm(xp):
    leaves, ref = _leaves(xp)
    out, stats = gc.clip_by_global_norm(leaves, 1.0, norm=100.0)
    assert float(stats.norm) == 100.0
    np.testing.assert_allclose(xp.numpy(out[1]), ref[1] / (100 + 1e-6), rtol=1e-6)
    norm = gc.global_norm(leaves)
    out2, _ = gc.clip_by_global_norm(leaves, 1.0, norm=norm)
    out3, _ = gc.clip_by_global_norm(leaves, 1.0)
    np.testing.assert_array_equal(xp.numpy(out2[0]), xp.numpy(out3[0]))


@pytest.mark.parametrize("ord", [2.0, math.inf])
def test_clip_by_norm_per_leaf(xp, ord):
    leaves, ref = _leaves(xp)
    leaves.append(xp.array(np.array([0.1, 0.2]), "float32"))
    ref.append(np.array([0.1, 0.2], np.float32).astype(np.float64))
    out, stats = gc.clip_by_norm(leaves, 1.5, ord=ord)
    norms = [ref_norm([r], ord) for r in ref]
    scales = [min(1.0, 1.5 / (n + 1e-6)) for n in norms]
    np.testing.assert_allclose(xp.numpy(stats.norm), norms, rtol=1e-6)
    np.testing.assert_allclose(xp.numpy(stats.scale), scales, rtol=1e-6)
    assert xp.numpy(stats.clipped).tolist() == [True, True, True, False]
    for got, want, s in zip(out, ref, scales, strict=True):
        np.testing.assert_allclose(xp.numpy(got), want * s, rtol=1e-6)
    if xp.mutable:
        stats_i = gc.clip_by_norm_(leaves, 1.5, ord=ord)
        for got, want in zip(leaves, out, strict=True):
            np.testing.assert_array_equal(xp.numpy(got), xp.numpy(want))
        np.testing.assert_array_equal(xp.numpy(stats_i.norm), xp.numpy(stats.norm))


def test_clip_by_norm_precomputed(xp):
    leaves, ref = _leaves(xp)
    out, stats = gc.clip_by_norm(leaves, 1.0, norm=xp.ns.asarray([2.0, 0.5, 4.0]))
    np.testing.assert_allclose(xp.numpy(out[0]), ref[0] / (2 + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(xp.numpy(out[1]), ref[1], rtol=1e-6)
    assert xp.numpy(stats.clipped).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="one norm per leaf"):
        gc.clip_by_norm(leaves, 1.0, norm=xp.ns.asarray([1.0]))


def test_clip_by_block_rms(xp):
    leaves, ref = _leaves(xp)
    out = gc.clip_by_block_rms({"x": leaves}, 2.0)["x"]
    for got, want in zip(out, ref, strict=True):
        rms = math.sqrt(np.mean(want**2))
        np.testing.assert_allclose(xp.numpy(got), want / max(1.0, rms / 2.0), rtol=1e-6)


@pytest.mark.parametrize("fused", [None, False])
def test_clip_by_block_rms_extreme(xp, fused):
    leaf = xp.array(np.full(8, 1e30), "float32")
    out = gc.clip_by_block_rms([leaf], 1.0, fused=fused)[0]
    np.testing.assert_allclose(xp.numpy(out), 1.0, rtol=1e-6)
    # An rms of 1e37 whose norm (1e39) is past float32: inf / sqrt(n) zeroed it.
    leaf = xp.array(np.full(10_000, 1e37), "float32")
    out = gc.clip_by_block_rms([leaf], 1.0, fused=fused)[0]
    np.testing.assert_allclose(xp.numpy(out), 1.0, rtol=1e-6)


@pytest.mark.parametrize("fused", [None, False])
def test_clip_by_block_rms_threshold_zero(xp, fused):
    # An all-zero leaf's rms of 0 is within threshold 0 (0 / 0 made it NaN,
    # as in optax); a NaN stays NaN and a nonzero leaf becomes 0.
    host = [np.array([1.0, 2.0]), np.zeros(3), np.array([np.nan, 1.0])]
    tree = [xp.array(x, "float32") for x in host]
    out = gc.clip_by_block_rms(tree, 0.0, fused=fused)
    np.testing.assert_array_equal(xp.numpy(out[0]), [0.0, 0.0])
    np.testing.assert_array_equal(xp.numpy(out[1]), [0.0, 0.0, 0.0])
    assert np.all(np.isnan(xp.numpy(out[2])))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_clip_by_value(xp, dtype):
    need(xp, dtype)
    host = np.array([-3.0, -0.25, 0.0, 0.5, 9.0])
    x = xp.array(host, dtype)
    np.testing.assert_array_equal(xp.numpy(gc.clip_by_value([x], 0.5)[0]), np.clip(host, -0.5, 0.5))
    np.testing.assert_array_equal(
        xp.numpy(gc.clip_by_value([x], lo=0.0)[0]), np.clip(host, 0, None)
    )
    np.testing.assert_array_equal(
        xp.numpy(gc.clip_by_value([x], hi=1.0)[0]), np.clip(host, None, 1)
    )
    assert gc.clip_by_value([x], 0.5)[0].dtype == x.dtype
    if xp.mutable:
        gc.clip_by_value_([x], lo=-1.0, hi=2.0)
        np.testing.assert_array_equal(xp.numpy(x), np.clip(host, -1, 2))


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("array", [False, True], ids=["number", "float64-array"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_bound_is_rounded_once_to_a_narrow_dtype(xp, dtype, array, fused):
    # A bound just past a midpoint of the narrow dtype's values rounds up,
    # 1 + 2**-11 + 2**-40 to 1.001 in float16 (NumPy's float16 rounding),
    # but through float32 (as torch, XLA and ml_dtypes convert float64) it
    # falls on the midpoint, whose tie goes to even: 1.0.
    need(xp, dtype, *(["float64"] if array else []))
    digits = {"float16": 11, "bfloat16": 8}[dtype]
    bound = 1 + 2.0**-digits + 2.0**-40
    rounded = 1 + 2.0 ** (1 - digits)  # rounded once
    host = np.array([-3.0, 0.5, 9.0])
    want = np.array([-rounded, 0.5, rounded])
    lo, hi = -bound, bound
    if array:
        lo, hi = xp.array(np.array(lo), "float64"), xp.array(np.array(hi), "float64")
    x = xp.array(host, dtype)

    def check(got):
        np.testing.assert_array_equal(xp.numpy(got).astype(np.float64), want)

    check(gc.clip_by_value([x], lo=lo, hi=hi, fused=fused)[0])
    if xp.mutable:
        gc.clip_by_value_([x], lo=lo, hi=hi, fused=fused)
        check(x)


def _nearest_even(value: float, narrow: np.dtype) -> float:
    """The value of ``narrow`` nearest ``value``, a tie to the even one: by exact fractions."""
    from fractions import Fraction

    top = np.nextafter(narrow.type(np.inf), narrow.type(0))  # the largest finite value
    if not math.isfinite(value):
        return value
    # at or past the midpoint of the largest value and the next power of two: inf
    if abs(value) >= float(top) + (float(top) - float(np.nextafter(top, -top))) / 2:
        return math.copysign(math.inf, value)
    cast = np.asarray(value).astype(narrow)  # at most one value off
    cands = [cast, np.nextafter(cast, top), np.nextafter(cast, -top)]

    def key(c):
        bits = int(np.asarray(c).view(np.uint16))
        return (abs(Fraction(float(c)) - Fraction(value)), bits & 1)

    return float(min(cands, key=key))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_narrow_rounding_is_to_the_nearest_even_value(xp, dtype):
    # Numbers on the host and float64 arrays on the backend round once.
    need(xp, dtype, "float64")
    from gradclip import _compat

    narrow = np.dtype(np_dtype(dtype))
    top = np.nextafter(narrow.type(np.inf), narrow.type(0))
    rng = np.random.default_rng(11)
    grid = np.concatenate([rng.standard_normal(300), 10.0 ** rng.uniform(-9, 38, 300)])
    with np.errstate(over="ignore"):  # past float16: inf, dropped below
        grid = grid.astype(narrow)
    grid = grid[np.isfinite(grid)]
    ups = np.nextafter(grid, top).astype(np.float64)
    grid = grid.astype(np.float64)
    mids = (grid + ups) / 2  # midpoints, exact in float64
    values = np.concatenate([grid, mids, mids * (1 + 2.0**-40), mids * (1 - 2.0**-40), -mids])
    edges = [0.0, -0.0, 2.0**-30, 6e-8, 65504.0, 65519.9, 65520.0, 3.39e38, 3.4e38, 1e39]
    values = np.concatenate([values, edges, [math.inf, -math.inf, math.nan]])
    want = np.array([_nearest_even(v, narrow) for v in values.tolist()])
    info = _compat.dtype_info(np, narrow)
    host = np.array([_compat._round_once_host(v, info) for v in values.tolist()])
    np.testing.assert_array_equal(host, want)
    a = xp.array(values, "float64")
    with np.errstate(over="ignore"):  # the cast of 1e38 to float16, as under gradclip's own
        got = xp.numpy(_compat.round_once(xp.ns, a, xp.array([1.0], dtype).dtype))
    np.testing.assert_array_equal(got.astype(np.float64), want)


@pytest.mark.parametrize("fused", [None, False])
def test_bounds_may_be_0d_arrays(xp, fused):
    # A schedule's value (optax.inject_hyperparams) arrives as a 0-d array.
    host = np.array([-3.0, -0.25, 0.0, 0.5, 9.0])
    x = xp.array(host, "float32")
    half, one = xp.array(0.5, "float32"), xp.array(1.0, "float32")
    for kwargs, want in [
        ({"clip_value": half}, np.clip(host, -0.5, 0.5)),
        ({"lo": xp.array(-1.0, "float32"), "hi": 2.0}, np.clip(host, -1, 2)),
        ({"hi": one}, np.clip(host, None, 1)),
    ]:
        out = gc.clip_by_value([x], fused=fused, **kwargs)[0]
        np.testing.assert_array_equal(xp.numpy(out), want)
        if xp.mutable:
            y = xp.array(host, "float32")
            gc.clip_by_value_([y], fused=fused, **kwargs)
            np.testing.assert_array_equal(xp.numpy(y), want)
    leaves, _ = _leaves(xp)
    for got, want in zip(
        gc.clip_by_block_rms(
            leaves, xp.array(2.0, "float64" if xp.has("float64") else "float32"), fused=fused
        ),
        gc.clip_by_block_rms(leaves, 2.0, fused=fused),
        strict=True,
    ):
        np.testing.assert_allclose(xp.numpy(got), xp.numpy(want), rtol=1e-6)
        assert got.dtype == want.dtype
    with pytest.raises(ValueError, match="clip_value must be a number or a 0-d array"):
        gc.clip_by_value([x], xp.array([0.5, 1.0], "float32"))
    with pytest.raises(ValueError, match="threshold must be a number or a 0-d array"):
        gc.clip_by_block_rms([x], xp.array([0.5, 1.0], "float32"))


def test_an_unsigned_bound_is_negated_without_wrapping(xp):
    # -clip_value of a uint8 2 is 254: lo > hi set every entry to 2.
    host = np.array([-3.0, -0.5, 0.2, 7.0], np.float32)
    want = np.clip(host, -2, 2)
    for dtype in ("uint8", "uint32"):
        bound = xp.array(np.array(2), dtype)
        for fused in (None, False):
            out = gc.clip_by_value([xp.array(host, "float32")], bound, fused=fused)[0]
            np.testing.assert_array_equal(xp.numpy(out), want)
            if xp.mutable:
                y = xp.array(host, "float32")
                gc.clip_by_value_([y], bound, fused=fused)
                np.testing.assert_array_equal(xp.numpy(y), want)


# ----------------------------------------------------------------- nonfinite policies


def _poisoned(xp, bad):
    good = xp.array(np.array([3.0, 4.0]), "float32")
    poisoned = xp.array(np.array([1.0, bad, 2.0]), "float32")
    return {"good": good, "poisoned": poisoned}


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_propagate_is_torch_arithmetic(xp, bad):
    tree = _poisoned(xp, bad)
    out, stats = gc.clip_by_global_norm(tree, 1.0)
    assert not bool(stats.finite)
    good = xp.numpy(out["good"])
    if math.isnan(bad):  # NaN norm -> NaN scale -> NaN everywhere
        assert math.isnan(float(stats.norm)) and np.all(np.isnan(good))
    else:  # inf norm -> scale 0 -> zeros, and inf * 0 = NaN
        assert float(stats.norm) == math.inf and float(stats.scale) == 0.0
        np.testing.assert_array_equal(good, [0.0, 0.0])
        assert np.isnan(xp.numpy(out["poisoned"])[1])


@pytest.mark.parametrize("bad", [math.nan, -math.inf])
def test_raise_names_leaf_and_modifies_nothing(xp, bad):
    tree = _poisoned(xp, bad)
    with pytest.raises(gc.NonFiniteError, match=r"\['poisoned'\]"):
        gc.clip_by_global_norm(tree, 1.0, nonfinite="raise")
    with pytest.raises(gc.NonFiniteError, match=r"\['poisoned'\]"):
        gc.global_norm(tree, nonfinite="raise")
    with pytest.raises(gc.NonFiniteError, match=r"\['poisoned'\]"):
        gc.clip_by_value(tree, 1.0, nonfinite="raise")
    if xp.mutable:
        with pytest.raises(gc.NonFiniteError):
            gc.clip_by_global_norm_(tree, 1.0, nonfinite="raise")
        with pytest.raises(gc.NonFiniteError):
            gc.clip_by_norm_(tree, 1.0, nonfinite="raise")
        with pytest.raises(gc.NonFiniteError):
            gc.clip_by_value_(tree, 1.0, nonfinite="raise")
        np.testing.assert_array_equal(xp.numpy(tree["good"]), [3.0, 4.0])
        np.testing.assert_array_equal(xp.numpy(tree["poisoned"]), [1.0, bad, 2.0])


@pytest.mark.parametrize("fused", [None, False])
def test_raise_refuses_a_norm_that_overflows_and_modifies_nothing(xp, fused):
    # Every entry is finite, but the float32 norm of entries near 1e38 is
    # inf: a clip's scale of 0 would zero the gradients. "raise" raises, as
    # torch's error_if_nonfinite does on such a norm.
    host = {"big": np.full(8, 2e38), "small": np.array([3.0, 4.0])}
    tree = {k: xp.array(v, "float32") for k, v in host.items()}
    with pytest.raises(gc.NonFiniteError, match="norm overflows float32"):
        gc.clip_by_global_norm(tree, 1.0, nonfinite="raise", fused=fused)
    with pytest.raises(gc.NonFiniteError, match="norm overflows float32"):
        gc.global_norm(tree, nonfinite="raise", fused=fused)
    with pytest.raises(gc.NonFiniteError, match=r"norm of leaf \['big'\] overflows float32"):
        gc.clip_by_norm(tree, 1.0, nonfinite="raise", fused=fused)
    with pytest.raises(gc.NonFiniteError, match=r"norm of leaf \['big'\] overflows float32"):
        gc.leaf_norms(tree, nonfinite="raise", fused=fused)
    small = {"small": tree["small"]}  # and a norm in range passes
    norms = xp.numpy(gc.clip_by_norm(small, 1.0, nonfinite="raise", fused=fused)[1].norm)
    np.testing.assert_allclose(norms, [5.0], rtol=1e-6)
    if xp.mutable:
        with pytest.raises(gc.NonFiniteError):
            gc.clip_by_global_norm_(tree, 1.0, nonfinite="raise", fused=fused)
        with pytest.raises(gc.NonFiniteError):
            gc.clip_by_norm_(tree, 1.0, nonfinite="raise", fused=fused)
        for k, v in host.items():
            np.testing.assert_array_equal(xp.numpy(tree[k]), v.astype(np.float32))


def test_raise_passes_finite_trees(xp):
    leaves, _ = _leaves(xp)
    _, stats = gc.clip_by_global_norm(leaves, 1.0, nonfinite="raise")
    assert bool(stats.finite)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_zero_drops_nonfinite_entries(xp, bad):
    tree = _poisoned(xp, bad)
    out, stats = gc.clip_by_global_norm(tree, 1.0, nonfinite="zero")
    norm = math.sqrt(9 + 16 + 1 + 4)
    assert float(stats.norm) == pytest.approx(norm, rel=1e-6)
    assert not bool(stats.finite)  # reports what it found
    np.testing.assert_allclose(
        xp.numpy(out["poisoned"]), np.array([1.0, 0.0, 2.0]) / norm, rtol=1e-6
    )
    assert float(gc.global_norm(tree, nonfinite="zero")) == pytest.approx(norm, rel=1e-6)
    assert xp.numpy(gc.clip_by_value(tree, 1.5, nonfinite="zero")["poisoned"]).tolist() == [
        1,
        0,
        1.5,
    ]
    if xp.mutable:
        gc.clip_by_global_norm_(tree, 1.0, nonfinite="zero")
        np.testing.assert_allclose(xp.numpy(tree["poisoned"]), [1 / norm, 0, 2 / norm], rtol=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_skip_leaves_everything_unchanged(xp, bad):
    tree = _poisoned(xp, bad)
    out, stats = gc.clip_by_global_norm(tree, 1.0, nonfinite="skip")
    assert not bool(stats.finite)
    assert float(stats.scale) == 1.0 and not bool(stats.clipped)
    np.testing.assert_array_equal(xp.numpy(out["good"]), [3.0, 4.0])
    np.testing.assert_array_equal(xp.numpy(out["poisoned"]), [1.0, bad, 2.0])
    vals = gc.clip_by_value(tree, 0.5, nonfinite="skip")
    np.testing.assert_array_equal(xp.numpy(vals["good"]), [3.0, 4.0])
    _, per_leaf = gc.clip_by_norm(tree, 1.0, nonfinite="skip")
    assert xp.numpy(per_leaf.finite).tolist() == [True, False]
    assert xp.numpy(per_leaf.clipped).tolist() == [True, False]
    if xp.mutable:
        gc.clip_by_global_norm_(tree, 1.0, nonfinite="skip")
        np.testing.assert_array_equal(xp.numpy(tree["good"]), [3.0, 4.0])


@pytest.mark.parametrize("fused", [None, False])
def test_skip_leaves_infinite_complex_entries_unchanged(xp, fused):
    # x * (1 + 0j) makes inf + nanj: the skipped leaf must come back as it was.
    need(xp, "complex64")
    z = np.array([1 + 1j, complex(math.inf, 1.0), complex(2.0, -math.inf)], np.complex64)
    tree = {"z": xp.array(z, "complex64"), "w": xp.array(np.array([3.0, 4.0]), "float32")}
    for per_leaf in (False, True):
        fn = gc.clip_by_norm if per_leaf else gc.clip_by_global_norm
        out, _ = fn(tree, 1.0, nonfinite="skip", fused=fused)
        assert xp.numpy(out["z"]).tobytes() == z.tobytes()


@pytest.mark.parametrize("dtype", ["float32", "complex64"])
@pytest.mark.parametrize("max_norm", [1.0, 0.0])
@pytest.mark.parametrize("nonfinite", ["zero", "skip"])
@pytest.mark.parametrize("fn", ["clip_by_global_norm", "clip_by_norm", "clip_by_block_rms"])
def test_zero_and_skip_do_no_invalid_arithmetic_in_a_lazy_compute(fn, nonfinite, max_norm, dtype):
    """dask runs the arithmetic in the caller's ``compute()``, outside gradclip's errstate.

    inf * 0 (a zero bound) and inf + 0j times a factor + 0j (a complex
    leaf) would raise NumPy's invalid-value warning there, an error under
    ``-W error``, for entries that ``"zero"`` drops and ``"skip"`` keeps.
    """
    da = importorskip("dask.array")
    if fn == "clip_by_block_rms" and max_norm == 0:
        pytest.skip("a zero threshold divides by zero in optax's formula itself")
    host = {
        "a": np.array([[1.0, math.nan, math.inf], [-math.inf, 2.0, 0.0]], dtype),
        "b": np.array([3.0, 4.0], dtype),
    }
    clip = getattr(gc, fn)

    def clipped(tree):
        out = clip(tree, max_norm, nonfinite=nonfinite)
        return out[0] if isinstance(out, tuple) else out

    out = clipped({k: da.from_array(v, chunks=1) for k, v in host.items()})
    want = clipped(host)  # NumPy, at once: gradclip's errstate holds
    for key in host:
        got = np.asarray(out[key])  # the compute: a warning here is an error
        assert got.tobytes() == want[key].tobytes(), key


@pytest.mark.parametrize("ord", [2.0, 1.0, 3.0, math.inf, -math.inf, 0.0])
@pytest.mark.parametrize("picks", [False, True], ids=["empty", "some"])
@pytest.mark.parametrize("layout", ["beside", "alone", "rows"])
def test_dask_leaf_of_unknown_length(ord, picks, layout):
    # Boolean indexing gives a NaN length; a leaf that turned out empty made
    # the max/min of the scaled and inf norms raise at compute time, and,
    # alone, the global -inf norm was the min's identity (inf). Rows picked
    # from a leaf of several column chunks leave (1, 0) blocks, which dask's
    # own max cannot reduce ("zero-size array"), empty or not.
    da = importorskip("dask.array")
    if layout == "rows":
        x = da.from_array(np.arange(1.0, 25.0).reshape(8, 3), chunks=(3, 2))
        rows = np.array([True, False, False, False, False, False, True, True]) & picks
        leaf = x[da.from_array(rows, chunks=3)]
    else:
        x = da.from_array(np.array([1.0, 2.0, 3.0]), chunks=2)
        leaf = x[x > (1.5 if picks else 100.0)]
    assert math.isnan(leaf.shape[0])
    tree = [leaf] if layout == "alone" else [leaf, da.from_array(np.array([3.0, 4.0]), chunks=1)]
    host = [np.asarray(t.compute()) for t in tree]
    np.testing.assert_allclose(gc.global_norm(tree, ord).compute(), gc.global_norm(host, ord))
    np.testing.assert_allclose(gc.leaf_norms(tree, ord).compute(), gc.leaf_norms(host, ord))
    _, stats = gc.clip_by_global_norm(tree, 1.0, ord=ord, nonfinite="raise")
    np.testing.assert_allclose(stats.norm.compute(), gc.global_norm(host, ord))


def test_a_nan_in_a_dask_leaf_of_unknown_length_reaches_the_norm():
    da = importorskip("dask.array")
    x = da.from_array(np.array([1.0, math.nan, 3.0, 5.0]), chunks=2)
    leaf = x[x != 3.0]  # NaN != 3: kept
    for ord in (math.inf, -math.inf, 2.0):
        assert math.isnan(gc.global_norm([leaf], ord).compute()), ord


@pytest.mark.parametrize(
    ("dtype", "big", "ord"),
    [("float64", 1e200, 2.0), ("float64", 1e200, 3.0), ("float32", 1e30, 100.0)],
)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nonfinite_entry_beside_a_huge_one_does_not_warn_in_a_lazy_compute(dtype, big, ord, bad):
    # The NaN or inf made its block's maximum, which scales the block, NaN
    # or inf: the block went unscaled, and big's power overflowed, warned in
    # dask's compute() (outside gradclip's errstate) under "skip" too.
    da = importorskip("dask.array")
    host = np.array([big, bad, 3.0], dtype)
    out, stats = gc.clip_by_global_norm([da.from_array(host)], 1.0, ord=ord, nonfinite="skip")
    assert np.asarray(out[0]).tobytes() == host.tobytes()  # a warning: an error
    assert not bool(stats.finite)
    want = gc.global_norm([host], ord)
    assert np.asarray(gc.global_norm([da.from_array(host)], ord)).tobytes() == want.tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_0d_bound_past_the_dtype_is_not_warned_in_a_lazy_compute(dtype):
    # A float64 dask bound of 1e300 was cast lazily to the leaves' dtype (or
    # float32), which warned "overflow encountered in cast" in compute().
    da = importorskip("dask.array")
    host = np.full(3, 7.0, dtype)
    x = [da.from_array(host)]
    big = da.from_array(np.array(1e300))
    out = [
        gc.clip_by_global_norm(x, big)[0][0],
        gc.clip_by_norm(x, big)[0][0],
        gc.clip_by_block_rms(x, big)[0],
        gc.per_example_clip(x, big, reduce=None)[0][0],
        gc.clip_by_value(x, lo=-big, hi=big)[0],
    ]
    for got in out:
        assert np.asarray(got).tobytes() == host.tobytes()  # a warning: an error
    low = gc.clip_by_value(x, lo=-big, hi=da.from_array(np.array(3.0)))[0]
    np.testing.assert_array_equal(np.asarray(low), np.full(3, 3.0, dtype))


def test_a_norm_past_float32_is_not_warned_in_a_lazy_compute():
    # 1e4 entries of 1e37: the norm, 1e39, is past float32, the rms is not.
    # dask cast the float64 norm to float32 in the caller's compute(), which
    # warned "overflow encountered in cast".
    da = importorskip("dask.array")
    host = np.full(10_000, 1e37, np.float32)
    out = gc.clip_by_block_rms([da.from_array(host, chunks=4096)], 1e36)
    want = gc.clip_by_block_rms([host], 1e36)
    assert np.asarray(out[0]).tobytes() == want[0].tobytes()  # a warning: an error
    assert np.isinf(np.asarray(gc.global_norm([da.from_array(host)])))


@pytest.mark.parametrize(
    "fn", ["clip_by_global_norm", "clip_by_norm", "clip_by_block_rms", "per_example_clip"]
)
def test_a_bound_past_float32_is_rounded_before_a_lazy_compute(fn):
    """max_norm=1e300 is inf in float32: rounded in gradclip's errstate, not in compute()."""
    da = importorskip("dask.array")
    host = {"a": np.array([[3.0, 4.0], [1.0, 2.0]], np.float32)}
    out = getattr(gc, fn)({"a": da.from_array(host["a"], chunks=1)}, 1e300)
    want = getattr(gc, fn)(host, 1e300)  # NumPy, at once: gradclip's errstate holds
    for got, ref in zip(optree.tree_leaves(out), optree.tree_leaves(want), strict=True):
        assert np.asarray(got).tobytes() == np.asarray(ref).tobytes()  # a warning: an error


@pytest.mark.parametrize(
    ("fn", "kwargs", "dtype"),
    [
        ("clip_by_norm_", {}, "float32"),
        ("clip_by_global_norm_", {"nonfinite": "zero"}, "float32"),
        ("clip_by_global_norm_", {}, "complex64"),
    ],
    ids=["per-leaf", "zero", "complex"],
)
def test_torch_in_place_with_a_bound_that_requires_grad(fn, kwargs, dtype):
    # A learnable threshold makes the scale require grad; the in-place route
    # through NumPy views called .numpy() on it and raised RuntimeError.
    torch = importorskip("torch")
    dtype = getattr(torch, dtype)
    got, want = ([torch.full((4,), 2.0, dtype=dtype), torch.ones(3, dtype=dtype)] for _ in "ab")
    getattr(gc, fn)(got, torch.tensor(1.0, requires_grad=True), **kwargs)
    getattr(gc, fn)(want, 1.0, fused=False, **kwargs)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert float(got[0][0].abs()) < 1


def test_skip_still_clips_finite_trees(xp):
    leaves, _ = _leaves(xp)
    out, stats = gc.clip_by_global_norm(leaves, 1.0, nonfinite="skip")
    assert bool(stats.finite) and bool(stats.clipped)
    assert float(gc.global_norm(out)) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("ord", [-math.inf, 0.0])
def test_finite_flag_for_ords_that_hide_nonfinite(xp, ord):
    tree = _poisoned(xp, math.inf)
    _, stats = gc.clip_by_global_norm(tree, 1.0, ord=ord)
    assert not bool(stats.finite)


@pytest.mark.parametrize("ord", [math.inf, -math.inf])
@pytest.mark.parametrize("fused", [None, False])
def test_nan_in_a_large_leaf_reaches_max_and_min_norms(xp, ord, fused):
    # XLA on the CPU drops NaN from max/min reductions over more than a few
    # thousand entries; the norm must still be NaN, as NumPy's and torch's are.
    host = np.ones(100_000, np.float32)
    host[54_321] = np.nan
    tree = [xp.array(host, "float32"), xp.array(np.ones(3), "float32")]
    assert math.isnan(float(gc.global_norm(tree, ord=ord, fused=fused)))
    assert math.isnan(float(xp.numpy(gc.leaf_norms(tree, ord=ord, fused=fused))[0]))
    out, stats = gc.clip_by_global_norm(tree, 1.0, ord=ord, nonfinite="skip", fused=fused)
    assert not bool(stats.finite)
    # Equal values, NaN for NaN: a GPU's x * 1 turns a NaN into its canonical one.
    np.testing.assert_array_equal(xp.numpy(out[0]), host)


# ------------------------------------------------------------------------- fused


def test_fused_false_is_the_reference(xp):
    leaves, _ = _leaves(xp)
    a, sa = gc.clip_by_global_norm(leaves, 1.0, fused=False)
    b, sb = gc.clip_by_global_norm(leaves, 1.0)
    if xp.name.startswith("jax") or xp.name == "cupy":
        # JAX's fast path sums in float32 in XLA's order, CuPy's kernels in
        # float64 in their own block order, the reference in its own: equal
        # within rounding, not bit for bit.
        np.testing.assert_allclose(xp.numpy(sb.norm), xp.numpy(sa.norm), rtol=1e-6)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(xp.numpy(y), xp.numpy(x), rtol=2e-6)
        return
    assert xp.numpy(sa.norm).tobytes() == xp.numpy(sb.norm).tobytes()
    for x, y in zip(a, b, strict=True):
        assert xp.numpy(x).tobytes() == xp.numpy(y).tobytes()


def test_fused_true_without_a_fast_path_raises(xp):
    from gradclip import _api

    leaves, _ = _leaves(xp)
    backend = gc._compat.backend_name(xp.ns) if hasattr(gc, "_compat") else None
    if backend in _api._FAST_PATHS:
        pytest.skip(f"{backend} has a fast path")
    with pytest.raises(ValueError, match="no fast path"):
        gc.clip_by_global_norm(leaves, 1.0, fused=True)
    with pytest.raises(TypeError, match="fused"):
        gc.global_norm(leaves, fused="yes")


@pytest.mark.parametrize("fn", ["clip_by_global_norm_", "clip_by_value_"])
def test_strided_array_api_strict_leaf_in_place(fn):
    # A Fortran-order leaf over one block is walked in row slices; the
    # slices' index must be (slice, ...), which array-api-strict requires of
    # a 2-d array. It raised IndexError after writing the leaves before it.
    xs = importorskip("array_api_strict")
    small = xs.asarray(np.full(8, 3.0, np.float32))
    big = xs.asarray(np.asfortranarray(np.ones((1100, 1000), np.float32)))
    getattr(gc, fn)([small, big], 0.5, fused=False)
    np.testing.assert_allclose(
        np.asarray(big), 0.5 if fn == "clip_by_value_" else np.asarray(big)[0, 0]
    )
    if fn == "clip_by_global_norm_":
        assert float(gc.global_norm([small, big])) == pytest.approx(0.5, rel=1e-5)
