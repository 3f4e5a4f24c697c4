"""gradclip.per_example_clip: DP-SGD's per-example clipping on every backend.

Every backend is checked against a float64 NumPy reference (which is also
Opacus's flat-clipping formula, eps 1e-6); JAX against optax's
``per_example_global_norm_clip`` and ``per_example_layer_norm_clip``.
"""

from __future__ import annotations

import functools
import math
import tracemalloc
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradclip as gc
from conftest import importorskip, need, np_dtype

B = 6
SHAPES = [(B, 3, 4), (B, 5), (B,), (B, 2, 1, 3)]
# Relative tolerance of a result held in each dtype.
RTOL = {
    "float16": 2e-3,
    "bfloat16": 1.6e-2,
    "float32": 2e-6,
    "float64": 1e-12,
    "complex64": 2e-6,
    "complex128": 1e-12,
}


def _tree(dtype="float32", *, seed=0, scale=None, shapes=SHAPES):
    """Per-example gradients whose norms straddle 1: examples 0, 2, 4 need clipping."""
    rng = np.random.default_rng(seed)
    scale = np.array([3.0, 0.1, 2.0, 0.2, 5.0, 0.05]) if scale is None else np.asarray(scale)
    out = []
    for shape in shapes:
        a = rng.standard_normal(shape)
        if dtype.startswith("complex"):
            a = a + 1j * rng.standard_normal(shape)
        out.append(a * scale.reshape((-1,) + (1,) * (len(shape) - 1)) / 4)
    return out


def _rounded(xp, leaves, dtype):
    """The leaves as ``xp`` holds them, back in float64 NumPy (the reference's input)."""
    arrays = [xp.array(a, dtype) for a in leaves]
    return arrays, [
        xp.numpy(a).astype(np.complex128 if "complex" in dtype else np.float64) for a in arrays
    ]


def ref_clip(leaves, bound, *, axis=0, reduce="sum", per_layer=False, eps=1e-6):
    """float64 reference: Opacus's flat clipping (``per_layer=False``) and its per-layer form.

    ``factor_i = min(1, C / (norm_i + eps))``; ``sum_i factor_i * g_i``.
    """
    moved = [np.moveaxis(np.asarray(g), axis, 0) for g in leaves]
    batch = moved[0].shape[0]
    mags = [np.abs(g.reshape(batch, -1)) for g in moved]
    # Each example scaled by its largest entry, so 1e300 does not overflow.
    tops = np.stack([m.max(axis=1, initial=0.0) for m in mags])
    safe = np.where(tops > 0, tops, 1.0)
    sq = np.stack([np.sum((m / s[:, None]) ** 2, axis=1) for m, s in zip(mags, safe, strict=True)])
    if per_layer:
        bounds = np.broadcast_to(np.asarray(bound, np.float64).reshape(-1, 1), sq.shape)
        norms = tops * np.sqrt(sq)
        factors = np.minimum(1.0, bounds / (norms + eps))
    else:
        top = tops.max(axis=0)
        ratio = np.where(top > 0, tops / np.where(top > 0, top, 1.0), 0.0)
        norms = top * np.sqrt(np.sum(ratio**2 * sq, axis=0))
        factors = np.minimum(1.0, bound / (norms + eps))
    out = []
    for k, g in enumerate(moved):
        f = factors[k] if per_layer else factors
        clipped = g * f.reshape((-1,) + (1,) * (g.ndim - 1))
        if reduce is None:
            out.append(np.moveaxis(clipped, 0, axis))
        else:
            out.append(clipped.sum(axis=0) / (batch if reduce == "mean" else 1))
    return out, norms, factors


def _close(xp, got, want, rtol):
    got = xp.numpy(got).astype(np.complex128 if np.iscomplexobj(want) else np.float64)
    scale = max(float(np.max(np.abs(want))) if np.size(want) else 0.0, 1e-300)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


# ------------------------------------------------------------------ flat clipping


@pytest.mark.parametrize(
    "dtype", ["float16", "bfloat16", "float32", "float64", "complex64", "complex128"]
)
@pytest.mark.parametrize("reduce", ["sum", "mean", None])
def test_flat_matches_float64_reference(xp, dtype, reduce):
    need(xp, dtype)
    arrays, wide = _rounded(xp, _tree(dtype), dtype)
    out, stats = gc.per_example_clip(arrays, 1.0, reduce=reduce)
    want, norms, factors = ref_clip(wide, 1.0, reduce=reduce)
    rtol = RTOL[dtype]
    for got, w in zip(out, want, strict=True):
        assert str(got.dtype).endswith(dtype)
        _close(xp, got, w, 4 * rtol)
    res = "float64" if dtype in ("float64", "complex128") else "float32"
    assert str(stats.norm.dtype).endswith(res)
    _close(xp, stats.norm, norms, 1e-6 if res == "float32" else 1e-12)
    _close(xp, stats.scale, factors, 1e-6 if res == "float32" else 1e-12)
    np.testing.assert_array_equal(xp.numpy(stats.clipped), factors < 1)
    np.testing.assert_array_equal(xp.numpy(stats.clipped), [True, False] * 3)
    assert int(xp.numpy(stats.num_clipped)) == 3
    assert xp.numpy(stats.finite).all() and xp.numpy(stats.finite).shape == (B,)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("reduce", ["sum", None])
def test_heavily_clipped_half_examples_do_not_vanish(xp, dtype, reduce):
    # Scales of 1.6e-6 and 1.6e-8: in float16 a subnormal (1% off) and 0, so
    # the example vanished from the sum. They multiply in float32 and round
    # once, as clip_by_global_norm does; 2**20 + 5 columns take more than
    # one float32 block on the eager backends.
    need(xp, dtype)
    cols = 2**20 + 5
    host = np.zeros((2, cols))
    host[0] = 500.0
    host[1, -3:] = 1.0
    x = xp.array(host, dtype)
    for bound in (0.05 * math.sqrt(cols / 4096), 5e-4 * math.sqrt(cols / 4096)):
        out, _ = gc.per_example_clip([x], bound, eps=0.0, reduce=reduce)
        got = xp.numpy(out[0]).astype(np.float64)
        factors = np.minimum(1.0, bound / np.linalg.norm(host, axis=1))
        want = host * factors[:, None]
        want = (want if reduce is None else want.sum(axis=0)).astype(np_dtype(dtype))
        np.testing.assert_array_equal(got, want.astype(np.float64))
        assert got.ravel()[0] != 0


@pytest.mark.parametrize("per_layer", [False, True])
def test_a_mean_of_examples_with_tiny_scales(xp, per_layer):
    # The mean divided each scale (5e-38 here) by the batch before the sum:
    # a subnormal factor, which XLA flushes to 0, so the mean of clipped
    # examples of norm 1 came out 0 on JAX (and a few digits off elsewhere).
    host = np.full((8, 4), 1e37, np.float32)
    x = xp.array(host, "float32")
    strided = xp.array(np.ascontiguousarray(host.T), "float32").T
    for leaf in (x, strided):
        out, stats = gc.per_example_clip([leaf], 1.0, eps=0.0, per_layer=per_layer, reduce="mean")
        assert float(np.max(xp.numpy(stats.scale))) < 2**-120  # a normal float32 scale
        np.testing.assert_allclose(xp.numpy(out[0]), np.full(4, 0.5), rtol=1e-6)


def test_opacus_flat_formula(xp):
    """Opacus: clip_factor = (C / (norm + 1e-6)).clamp(max=1); einsum("i,i...", factor, g)."""
    arrays, wide = _rounded(xp, _tree(), "float32")
    out, _ = gc.per_example_clip(arrays, 0.7)
    norms = np.sqrt(sum(np.sum(g.reshape(B, -1) ** 2, axis=1) for g in wide))
    factor = np.clip(0.7 / (norms + 1e-6), None, 1.0)
    for got, g in zip(out, wide, strict=True):
        _close(xp, got, np.einsum("i,i...", factor, g), 1e-5)


@pytest.mark.parametrize("axis", [1, -1])
def test_batch_on_another_axis(xp, axis):
    base = _tree(shapes=[(B, 3, 4), (B, 5), (B, 2)])
    leaves = [np.moveaxis(g, 0, axis) for g in base]
    arrays, wide = _rounded(xp, leaves, "float32")
    for reduce in ("sum", None):
        out, stats = gc.per_example_clip(arrays, 1.0, axis=axis, reduce=reduce)
        want, norms, _ = ref_clip(wide, 1.0, axis=axis, reduce=reduce)
        for got, w in zip(out, want, strict=True):
            _close(xp, got, w, 1e-5)
        _close(xp, stats.norm, norms, 1e-6)


@pytest.mark.parametrize("reduce", ["sum", None])
@pytest.mark.parametrize("dtype", ["float16", "float32", "complex64"])
def test_strided_leaves_match_their_contiguous_copies(xp, dtype, reduce):
    """Views no reshape can flatten give the results of their contiguous copies.

    Eager backends take them a group of examples at a time rather than
    copying the leaf (see :func:`test_a_strided_leaf_is_not_copied`).
    """
    need(xp, dtype)
    leaves = _tree(dtype, shapes=[(B, 4, 3, 5), (B, 6, 2), (B, 4, 5)])
    leaves[2] = np.ascontiguousarray(leaves[2].transpose(1, 0, 2))
    arrays, _ = _rounded(xp, leaves, dtype)
    views = [
        xp.ns.permute_dims(arrays[0], (0, 3, 1, 2)),
        arrays[1][:, ::2, :],
        xp.ns.permute_dims(arrays[2], (1, 0, 2)),  # the batch axis is not the outermost
    ]
    copies = [xp.array(np.ascontiguousarray(xp.numpy(v)), dtype) for v in views]
    out, stats = gc.per_example_clip(views, 1.0, reduce=reduce)
    want, want_stats = gc.per_example_clip(copies, 1.0, reduce=reduce)
    assert int(stats.num_clipped) == 3
    for got, w in zip(out, want, strict=True):
        assert tuple(got.shape) == tuple(w.shape)
        _close(xp, got, xp.numpy(w), RTOL[dtype])
    _close(xp, stats.norm, xp.numpy(want_stats.norm), 1e-6)


def test_device_array_bound(xp):
    arrays, wide = _rounded(xp, _tree(), "float32")
    bound = xp.ns.asarray(0.5, dtype=xp.ns.float32)
    out, _ = gc.per_example_clip(arrays, bound)
    for got, w in zip(out, ref_clip(wide, 0.5)[0], strict=True):
        _close(xp, got, w, 1e-5)


# ------------------------------------------------------------- overflow safety


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_norms_do_not_overflow_or_underflow(xp, dtype):
    """Examples of 1e30, 1e-30, 0 (padding) and 1 in one batch: every norm right."""
    need(xp, dtype)
    big, small = {"float16": (300.0, 1e-4), "float32": (1e30, 1e-30), "float64": (1e300, 1e-300)}[
        dtype
    ]
    scale = [big, small, 0.0, 1.0]
    leaves = _tree(dtype, scale=scale, shapes=[(4, 40, 30), (4, 7)])
    arrays, wide = _rounded(xp, leaves, dtype)
    out, stats = gc.per_example_clip(arrays, 1.0)
    want, norms, _ = ref_clip(wide, 1.0)
    got = xp.numpy(stats.norm).astype(np.float64)
    assert np.isfinite(got).all() and got[2] == 0 and got[1] > 0
    np.testing.assert_allclose(got, norms, rtol=1e-6 if dtype != "float64" else 1e-12)
    for g, w in zip(out, want, strict=True):
        _close(xp, g, w, 2 * RTOL[dtype])
    # Per layer, every leaf's own norm is right too.
    _, stats = gc.per_example_clip(arrays, 1.0, per_layer=True)
    norms = ref_clip(wide, [1.0, 1.0], per_layer=True)[1]
    np.testing.assert_allclose(
        xp.numpy(stats.norm), norms, rtol=1e-6 if dtype != "float64" else 1e-12
    )


# -------------------------------------------------------------- per-layer clipping


@pytest.mark.parametrize("split", ["uniform", "size"])
def test_per_layer_split_of_a_total(xp, split):
    arrays, wide = _rounded(xp, _tree(), "float32")
    out, stats = gc.per_example_clip(arrays, 1.5, per_layer=True, split=split, reduce="mean")
    sizes = np.array([math.prod(s[1:]) for s in SHAPES], np.float64)
    bounds = (
        1.5 / math.sqrt(len(SHAPES)) * np.ones(len(SHAPES))
        if split == "uniform"
        else 1.5 * np.sqrt(sizes / sizes.sum())
    )
    assert np.sum(bounds**2) == pytest.approx(1.5**2)
    want, norms, factors = ref_clip(wide, bounds, per_layer=True, reduce="mean")
    for got, w in zip(out, want, strict=True):
        _close(xp, got, w, 1e-5)
    assert xp.numpy(stats.norm).shape == (len(SHAPES), B)
    _close(xp, stats.norm, norms, 1e-6)
    _close(xp, stats.scale, factors, 1e-6)
    np.testing.assert_array_equal(xp.numpy(stats.num_clipped), (factors < 1).sum(axis=1))


def test_per_layer_given_bounds(xp):
    leaves = dict(zip("abcd", _tree(), strict=True))
    arrays = {k: xp.array(v, "float32") for k, v in leaves.items()}
    wide = [xp.numpy(arrays[k]).astype(np.float64) for k in "abcd"]
    bounds = {"a": 0.5, "b": 0.1, "c": 2.0, "d": 0.3}
    want = ref_clip(wide, list(bounds.values()), per_layer=True)[0]
    for each in (bounds, list(bounds.values()), np.array(list(bounds.values()), np.float32)):
        out, _ = gc.per_example_clip(arrays, each, per_layer=True)
        for k, w in zip("abcd", want, strict=True):
            _close(xp, out[k], w, 1e-5)


# --------------------------------------------------------------------- bad input


def test_bad_input_names_the_leaf():
    g = {"w": np.ones((4, 3)), "b": np.ones((5,))}
    with pytest.raises(
        ValueError,
        match=r"leaf \['w'\] has 4 examples on axis 0 but leaf \['b'\] has 5; every leaf",
    ):
        gc.per_example_clip(g, 1.0)
    with pytest.raises(
        ValueError, match=r"axis=2 is out of range for leaf \['b'\], which has 1 dimension"
    ):
        gc.per_example_clip({"w": np.ones((4, 3, 2)), "b": np.ones(4)}, 1.0, axis=2)
    with pytest.raises(ValueError, match=r"axis=-3 is out of range for leaf \[1\]"):
        gc.per_example_clip([np.ones((2, 2, 2)), np.ones((2, 2))], 1.0, axis=-3)
    with pytest.raises(ValueError, match=r"out of range for leaf \['s'\], which has 0 dimensions"):
        gc.per_example_clip({"s": np.ones(())}, 1.0)
    for bad in (0.0, -1.0, 0):
        with pytest.raises(ValueError, match="max_norm must be > 0"):
            gc.per_example_clip([np.ones((2, 2))], bad)
    with pytest.raises(ValueError, match="max_norm must be > 0; got nan"):
        gc.per_example_clip([np.ones((2, 2))], float("nan"))
    with pytest.raises(ValueError, match=r"max_norm for leaf \['b'\] must be > 0"):
        gc.per_example_clip(g | {"b": np.ones((4, 2))}, {"w": 1.0, "b": 0.0}, per_layer=True)
    with pytest.raises(ValueError, match="max_norm holds 3 bounds but the tree has 2 leaves"):
        gc.per_example_clip([np.ones((2, 2))] * 2, [1.0, 1.0, 1.0], per_layer=True)
    with pytest.raises(TypeError, match="one bound per leaf needs per_layer=True"):
        gc.per_example_clip([np.ones((2, 2))] * 2, [1.0, 1.0])
    with pytest.raises(ValueError, match="reduce must be"):
        gc.per_example_clip([np.ones((2, 2))], 1.0, reduce="max")
    with pytest.raises(ValueError, match="split must be"):
        gc.per_example_clip([np.ones((2, 2))], 1.0, per_layer=True, split="even")
    with pytest.raises(ValueError, match="nonfinite must be one of 'propagate', 'raise'"):
        gc.per_example_clip([np.ones((2, 2))], 1.0, nonfinite="zero")
    with pytest.raises(TypeError, match="axis must be an int"):
        gc.per_example_clip([np.ones((2, 2))], 1.0, axis=True)
    with pytest.raises(TypeError, match=r"leaf \[0\] has dtype int64"):
        gc.per_example_clip([np.ones((2, 2), np.int64)], 1.0)


def test_nonfinite(xp):
    leaves = _tree()
    leaves[1][3, 2] = np.nan
    arrays = [xp.array(a, "float32") for a in leaves]
    out, stats = gc.per_example_clip(arrays, 1.0, reduce=None)
    finite = xp.numpy(stats.finite)
    np.testing.assert_array_equal(finite, [True, True, True, False, True, True])
    assert (
        np.isnan(xp.numpy(stats.norm)[3]) and np.isfinite(np.delete(xp.numpy(stats.norm), 3)).all()
    )
    clipped = xp.numpy(out[0])
    assert np.isnan(clipped[3]).all() and np.isfinite(np.delete(clipped, 3, axis=0)).all()
    # The advice names a policy per_example_clip takes (not "zero" or "skip").
    with pytest.raises(gc.NonFiniteError, match=r"leaf \[1\].*nonfinite=\"propagate\"") as info:
        gc.per_example_clip(arrays, 1.0, nonfinite="raise")
    assert "zero" not in str(info.value)


def test_an_inf_entry_zeroes_its_example_and_is_nan_in_the_sum(xp):
    # The docstring's "propagate": norm inf, scale 0 (torch's and Opacus's arithmetic).
    w = np.ones((3, 2), np.float32)
    w[1, 0] = np.inf
    tree = {"w": xp.array(w, "float32"), "b": xp.array(np.ones(3), "float32")}
    total, stats = gc.per_example_clip(tree, 1.0, eps=0.0)
    np.testing.assert_array_equal(xp.numpy(stats.finite), [True, False, True])
    np.testing.assert_array_equal(xp.numpy(stats.scale)[1], 0.0)
    got = xp.numpy(total["w"])
    assert np.isnan(got[0]) and got[1] == pytest.approx(2 / math.sqrt(3), rel=1e-6)
    assert float(xp.numpy(total["b"])) == pytest.approx(2 / math.sqrt(3), rel=1e-6)


def test_size_split_leaves_an_empty_leaf_unclipped(xp):
    # Its share of C is 0: it has nothing to clip, and counts nothing clipped (as optax).
    tree = {"w": xp.array(np.ones((4, 3)), "float32"), "e": xp.array(np.ones((4, 0)), "float32")}
    _, stats = gc.per_example_clip(tree, 1.0, per_layer=True, split="size")
    np.testing.assert_array_equal(xp.numpy(stats.num_clipped), [0, 4])  # "e", then "w"
    np.testing.assert_array_equal(xp.numpy(stats.scale)[0], np.ones(4))


def test_per_layer_bounds_are_checked_against_the_tree():
    g = {"w": np.ones((2, 4)), "b": np.ones((2, 1))}
    for bounds in ({"x": 0.5, "a": 3.0}, {"w": [0.5], "b": (3.0,)}):
        with pytest.raises(ValueError, match=r"max_norm's bounds are at .* but the tree's"):
            gc.per_example_clip(g, bounds, per_layer=True)
    torch = importorskip("torch")
    for bounds in (torch.tensor([0.5, 3.0]), [torch.tensor(0.5), 3.0]):
        with pytest.raises(TypeError, match="max_norm is a torch array but the leaves are numpy"):
            gc.per_example_clip(g, bounds, per_layer=True)


def test_empty_inputs(xp):
    out, stats = gc.per_example_clip({"a": None}, 1.0)
    assert out == {"a": None} and stats.norm.shape == (0,) and int(stats.num_clipped) == 0
    _, stats = gc.per_example_clip({"a": None}, 1.0, per_layer=True)  # (K, B): it was (0,)
    assert [tuple(np.shape(x)) for x in stats] == [(0, 0)] * 3 + [(0,), (0, 0)]
    arrays = [xp.array(np.zeros((0, 3)), "float32"), xp.array(np.zeros((0,)), "float32")]
    out, stats = gc.per_example_clip(arrays, 1.0, reduce="mean")
    np.testing.assert_array_equal(xp.numpy(out[0]), np.zeros(3))
    assert xp.numpy(stats.norm).shape == (0,)
    arrays = [xp.array(np.zeros((3, 0)), "float32"), xp.array(np.ones((3, 1)), "float32")]
    out, stats = gc.per_example_clip(arrays, 0.5)
    np.testing.assert_allclose(xp.numpy(stats.norm), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(xp.numpy(out[1]), [1.5], rtol=1e-5)
    # An empty leaf of three dimensions, the batch on either side of the empty one.
    for shape, other, axis in (((3, 0, 2), (3, 4), 0), ((2, 0, 3), (4, 3), -1)):
        arrays = [xp.array(np.zeros(shape), "float32"), xp.array(np.ones(other), "float32")]
        for reduce in ("sum", None):
            out, stats = gc.per_example_clip(arrays, 1.0, axis=axis, reduce=reduce)
            want = shape if reduce is None else tuple(np.sum(np.zeros(shape), axis=axis).shape)
            assert tuple(out[0].shape) == want
            np.testing.assert_allclose(xp.numpy(stats.norm), [2.0] * 3, rtol=1e-6)


def test_empty_leaf_in_dask_chunks():
    # dask cannot reshape (3, 0, 2) to (3, 0) across chunks of 2.
    da = importorskip("dask.array")
    host = {"w": np.zeros((3, 0, 2), np.float32), "b": np.ones((3, 4), np.float32)}
    want, _ = gc.per_example_clip(host, 1.0)
    got, _ = gc.per_example_clip({k: da.from_array(v, chunks=2) for k, v in host.items()}, 1.0)
    for k in host:
        np.testing.assert_array_equal(np.asarray(got[k]), want[k])


# ---------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 9),
    widths=st.lists(st.integers(1, 20), min_size=1, max_size=4),
    log_scale=st.floats(-30, 30),
    bound=st.floats(1e-3, 1e3),
    per_layer=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_every_clipped_example_is_within_its_bound(
    batch, widths, log_scale, bound, per_layer, seed
):
    rng = np.random.default_rng(seed)
    scales = 10.0 ** (log_scale + rng.uniform(-3, 3, batch))
    leaves = [
        (rng.standard_normal((batch, w)) * scales[:, None]).astype(np.float32) for w in widths
    ]
    out, stats = gc.per_example_clip(leaves, bound, reduce=None, per_layer=per_layer)
    wide = [o.astype(np.float64) for o in out]
    if per_layer:
        bounds = bound / math.sqrt(len(widths))
        for g in wide:
            assert (np.linalg.norm(g, axis=1) <= bounds * (1 + 1e-6)).all()
    else:
        norms = np.sqrt(sum(np.sum(g**2, axis=1) for g in wide))
        assert (norms <= bound * (1 + 1e-6)).all()
    # Examples already within the bound are left as they were.
    keep = ~stats.clipped if not per_layer else ~stats.clipped.any(axis=0)
    for g, o in zip(leaves, out, strict=True):
        np.testing.assert_array_equal(o[keep], g[keep])


# ------------------------------------------------------------------------- memory


def _peak(*args, **kwargs):
    """``per_example_clip(*args, **kwargs)`` and the most memory NumPy held meanwhile."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out, stats = gc.per_example_clip(*args, **kwargs)
        return out, stats, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_no_per_example_copy():
    """The sum of a 256 MiB leaf allocates its result and bounded blocks, not a copy."""
    g = np.empty((32, 2**21), np.float32)
    rng = np.random.default_rng(0)
    for row in g:
        row[:] = rng.standard_normal(2**21, dtype=np.float32)
    _, stats, peak = _peak([g], 1.0)
    assert int(stats.num_clipped) == 32
    # The output (8 MiB) plus float64 temporaries of about one example (16 MiB each).
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.1f} MiB for a {g.nbytes / 2**20:.0f} MiB leaf"


def test_an_all_zero_leaf_is_not_copied():
    """Examples of zeros (a frozen layer's) are checked a block of rows at a time.

    Every example's sum of 0 made it a suspect, and rows[suspects] copied
    the whole leaf to look for a nonzero entry: 128 MiB more here.
    """
    g = np.zeros((32, 2**20), np.float32)
    gc.per_example_clip([g[:2]], 1.0)  # warm up
    out, stats, peak = _peak([g], 1.0)
    assert not np.asarray(stats.num_clipped) and not out[0].any()
    assert peak < 0.25 * g.nbytes, (
        f"peak {peak / 2**20:.1f} MiB for a {g.nbytes / 2**20:.0f} MiB leaf"
    )


@pytest.mark.parametrize("reduce", ["sum", None])
def test_a_strided_leaf_is_not_copied(reduce):
    """A Fortran-ordered leaf, which no reshape to (batch, -1) can view, is not copied whole.

    Before, it was: 49 MiB more for this 49 MiB leaf, summed or not.
    """
    rng = np.random.default_rng(0)
    g = np.asfortranarray(rng.standard_normal((128, 200, 500), dtype=np.float32))
    gc.per_example_clip([g[:2]], 1.0, reduce=reduce)  # warm up
    out, _, peak = _peak([g], 1.0, reduce=reduce)
    # The output plus the norm's float64 blocks (about 23 MiB).
    limit = out[0].nbytes + 0.6 * g.nbytes
    assert peak < limit, f"peak {peak / 2**20:.1f} MiB for a {g.nbytes / 2**20:.0f} MiB leaf"


@pytest.mark.parametrize("reduce", ["sum", None])
@pytest.mark.parametrize("axis", [0, -1, 1])
def test_half_precision_sum_widens_blocks_not_the_leaf(axis, reduce):
    """A float16 leaf is summed in float32 a block at a time, wherever its batch axis is.

    With the batch last, every column block held all the rows: the float32
    copy was the whole leaf, twice its own bytes (103 MB for 51 MB here).
    Unsummed, the blocks were gathered, then joined: the result held twice.
    """
    host = np.random.default_rng(0).standard_normal((256, 100_000)).astype(np.float16)
    g = {0: host, -1: np.ascontiguousarray(host.T), 1: host.T.reshape(200, 256, 500)}[axis]
    warm = g[:2] if axis == 0 else g[..., :2]
    gc.per_example_clip([warm], 1.0, axis=axis, reduce=reduce)
    out, stats, peak = _peak([g], 1.0, axis=axis, reduce=reduce)
    mib = 2**20
    limit = 0.75 * g.nbytes + out[0].nbytes
    assert peak < limit, f"peak {peak / mib:.1f} MiB for a {g.nbytes / mib:.0f} MiB leaf"
    scale = np.asarray(stats.scale, np.float64)
    if reduce is None:
        column = tuple(-1 if d == axis % g.ndim else 1 for d in range(g.ndim))
        want = g.astype(np.float64) * scale.reshape(column)
    else:
        want = np.tensordot(scale, g.astype(np.float64), axes=([0], [axis]))
    np.testing.assert_allclose(out[0].astype(np.float64), want, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("case", ["float16", "float32 of 1e30", "transposed"])
def test_an_example_larger_than_a_block_is_reduced_a_block_at_a_time(case):
    """Examples of 8M entries off the BLAS path: each was widened, and squared, whole.

    Its float64 magnitudes and their squares made the temporaries about
    twelve times a float16 example: 192 MiB for this 64 MiB leaf.
    """
    n = 2**23
    if case == "transposed":
        g = np.full((n, 4), 0.5, np.float32).T
    else:
        g = np.full((4, n), 1e30 if case == "float32 of 1e30" else 0.5, np.dtype(case.split()[0]))
    gc.per_example_clip([g[:, :8]], 1.0, reduce="sum")  # warm up
    _, stats, peak = _peak([g], 1.0, reduce="sum")
    assert peak < 48 * 2**20, f"peak {peak / 2**20:.1f} MiB for {g.nbytes / 2**20:.0f} MiB"
    value = float(g[0, 0])
    np.testing.assert_allclose(np.asarray(stats.norm), [value * n**0.5] * 4, rtol=1e-6)


# ---------------------------------------------------------------------------- JAX


def _jax():
    return importorskip("jax"), importorskip("jax.numpy")


def test_matches_optax_per_example_clips():
    _, jnp = _jax()
    optax = importorskip("optax")
    leaves = [jnp.asarray(g, jnp.float32) for g in _tree()]
    want, count = optax.per_example_global_norm_clip(leaves, 0.8)
    out, stats = gc.per_example_clip(leaves, 0.8, eps=0.0)
    for a, b in zip(out, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7)
    assert int(stats.num_clipped) == int(count)
    for uniform, split in ((True, "uniform"), (False, "size")):
        want, counts = optax.per_example_layer_norm_clip(leaves, 0.8, uniform=uniform)
        out, stats = gc.per_example_clip(leaves, 0.8, eps=0.0, per_layer=True, split=split)
        for a, b in zip(out, want, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(stats.num_clipped), np.asarray(counts))


def test_per_layer_bounds_in_a_jax_registered_node():
    # A node JAX knows and optree does not (flax's FrozenDict, an equinox
    # module): float bounds in it were one leaf to optree, and refused.
    import dataclasses

    jax, jnp = _jax()
    importorskip("optax")
    from gradclip import optax as gco

    @functools.partial(jax.tree_util.register_dataclass, data_fields=["w", "b"], meta_fields=[])
    @dataclasses.dataclass
    class Params:
        w: Any
        b: Any

    w, b = (jnp.asarray(g, jnp.float32) for g in _tree(shapes=[(B, 3), (B,)]))
    grads = Params(w, b)
    want, _ = gc.per_example_clip([w, b], [0.5, 0.2], per_layer=True)
    out, _ = gc.per_example_clip(grads, Params(0.5, 0.2), per_layer=True)
    transform = gco.per_example_clip(Params(0.5, 0.2), per_layer=True)
    updates, _ = transform.update(grads, transform.init(Params(w[0], b[0])))
    for got in (out, updates):
        assert isinstance(got, Params)
        np.testing.assert_array_equal(got.w, want[0])
        np.testing.assert_array_equal(got.b, want[1])


def test_jit_and_vmap():
    jax, jnp = _jax()
    micro = np.stack(
        [np.stack(_tree(seed=s, shapes=[(B, 3, 4)]))[0] for s in range(3)]
    )  # (3, B, 3, 4)
    leaves = {"w": jnp.asarray(micro, jnp.float32)}
    bound = jnp.asarray(0.9, jnp.float32)

    def clip(tree, c):
        return gc.per_example_clip(tree, c, reduce="mean")

    eager = [clip({"w": leaves["w"][i]}, bound) for i in range(3)]
    jitted = jax.jit(clip)({"w": leaves["w"][0]}, bound)
    np.testing.assert_allclose(jitted[0]["w"], eager[0][0]["w"], rtol=1e-6)
    mapped, stats = jax.jit(jax.vmap(clip, in_axes=(0, None)))(leaves, bound)
    assert stats.norm.shape == (3, B)
    for i in range(3):
        np.testing.assert_allclose(mapped["w"][i], eager[i][0]["w"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(stats.norm[i], eager[i][1].norm, rtol=1e-6)


@pytest.mark.parametrize(
    "scale", [[1.0, 0.5, 0.0, 2.0], [1e30, 1.0, 0.0, 1e-30], [1e-25, 0.0, 1e-30, 0.0]]
)
@pytest.mark.parametrize("per_layer", [False, True])
def test_fast_paths_match_generic(xp, scale, per_layer):
    """The fast paths' norms (NumPy's and torch's BLAS dots, JAX's one-pass sums, each
    redone by the scaled reduction only where needed) against the generic core's."""
    from gradclip import _core

    leaves = [xp.array(g, "float32") for g in _tree(scale=scale, shapes=[(4, 50, 20), (4, 3)])]
    bounds = [0.6, 0.8] if per_layer else 1.0
    fast, fstats = gc.per_example_clip(leaves, bounds, per_layer=per_layer)
    ref, rstats = _core.per_example_clip(
        xp.ns,
        leaves,
        ["0", "1"],
        max_norm=bounds,
        axes=(0, 0),
        batch=4,
        per_layer=per_layer,
        reduce="sum",
        eps=1e-6,
        nonfinite="propagate",
    )
    for a, b in zip(fast, ref, strict=True):
        _close(xp, a, xp.numpy(b).astype(np.float64), 1e-6)
    norms = xp.numpy(fstats.norm)
    np.testing.assert_allclose(norms, xp.numpy(rstats.norm), rtol=1e-6, atol=0)
    # Every example's norm is found, however large or small; padding's is 0.
    np.testing.assert_array_equal(norms > 0, np.broadcast_to(np.array(scale) > 0, norms.shape))
    assert np.isfinite(norms).all()


# ------------------------------------------------------------------ QuantileBound


def _andrew(norms_seq, noises, *, c0, gamma, lr, geometric=True, lo=0.0, hi=math.inf, size=None):
    """float64 reference of Andrew et al. 2021's bound update (Opacus's AdaClip)."""
    c, out = c0, []
    for norms, noise in zip(norms_seq, noises, strict=True):
        b = (np.sum(np.asarray(norms) <= c) + noise) / (len(norms) if size is None else size)
        c = c * math.exp(-lr * (b - gamma)) if geometric else c - lr * (b - gamma)
        c = min(max(c, lo), hi)
        out.append((c, b))
    return out


def test_quantile_bound_follows_the_paper(xp):
    from gradclip.adaptive import QuantileBound

    rng = np.random.default_rng(1)
    seq = [rng.lognormal(0.0, 0.5, 32) for _ in range(40)]
    noises = rng.normal(0.0, 2.0, 40)
    qb = QuantileBound(initial=0.1, target_quantile=0.7, learning_rate=0.3, max_bound=5.0)
    grads = [xp.array(np.ones((32, 3)), "float32")]
    state = qb.init(grads)
    want = _andrew(seq, noises, c0=0.1, gamma=0.7, lr=0.3, hi=5.0)
    for norms, noise, (c, b) in zip(seq, noises, want, strict=True):
        # Round the reference's inputs the way the backend holds them.
        state = qb.update(xp.array(norms, "float32"), state, noise=float(noise))
        assert float(xp.numpy(state.bound)) == pytest.approx(c, rel=1e-5)
        assert float(xp.numpy(state.fraction)) == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert int(xp.numpy(state.count)) == 40
    # After 40 steps the bound sits near the 0.7 quantile of the norms.
    assert float(xp.numpy(state.bound)) == pytest.approx(
        np.quantile(np.concatenate(seq), 0.7), rel=0.3
    )
    # Linear update, clamped, with the expected batch size of Poisson sampling.
    qb = QuantileBound(initial=1.0, geometric=False, learning_rate=0.5, min_bound=0.2)
    state = qb.init(grads)
    want = _andrew(seq[:5], [0.0] * 5, c0=1.0, gamma=0.5, lr=0.5, geometric=False, lo=0.2, size=30)
    for norms, (c, _) in zip(seq[:5], want, strict=True):
        state = qb.update(xp.array(norms, "float32"), state, batch_size=30)
        assert float(xp.numpy(state.bound)) == pytest.approx(c, rel=1e-5)
    # The state round-trips through NumPy into another backend.
    loaded = qb.load_state_dict(qb.state_dict(state), [np.ones(2, np.float32)])
    assert float(loaded.bound) == pytest.approx(c, rel=1e-6) and int(loaded.count) == 5


def test_quantile_bound_drives_per_example_clip(xp):
    """The bound stays on the device: per_example_clip takes state.bound as max_norm."""
    from gradclip.adaptive import QuantileBound

    qb = QuantileBound(initial=0.5)
    leaves = _tree()
    arrays, wide = _rounded(xp, leaves, "float32")
    state = qb.init(arrays)
    total, stats = gc.per_example_clip(arrays, state.bound)
    for got, w in zip(total, ref_clip(wide, 0.5)[0], strict=True):
        _close(xp, got, w, 1e-5)
    state = qb.update(stats, state)
    unclipped = np.sum(ref_clip(wide, 0.5)[1] <= 0.5) / B
    assert float(xp.numpy(state.bound)) == pytest.approx(
        0.5 * math.exp(-0.2 * (unclipped - 0.5)), rel=1e-6
    )


def test_quantile_bound_bad_input():
    from gradclip.adaptive import QuantileBound

    for kwargs, match in (
        ({"target_quantile": 1.5}, "target_quantile must be in"),
        ({"learning_rate": -1.0}, "learning_rate must be >= 0"),
        ({"initial": 0.0}, "initial must be > 0"),
        ({"initial": 9.0, "max_bound": 2.0}, "initial must be > 0 and in"),
        ({"geometric": False}, "needs min_bound > 0"),
    ):
        with pytest.raises(ValueError, match=match):
            QuantileBound(**kwargs)
    qb = QuantileBound()
    state = qb.init([np.ones((4, 2))])
    _, stats = gc.per_example_clip([np.ones((4, 2))] * 2, 1.0, per_layer=True)
    with pytest.raises(ValueError, match="norms must be 1-d"):
        qb.update(stats, state)
    # An empty batch (Poisson sampling) divides 0 by 0 without batch_size=.
    _, stats = gc.per_example_clip([np.ones((0, 2))], 1.0)
    with pytest.raises(ValueError, match=r"an empty batch.*batch_size="):
        qb.update(stats, state)
    # none of the 4 expected unclipped: below the target quantile, the bound grows
    assert float(qb.update(stats, state, batch_size=4).bound) > float(state.bound)
    # Norms of another library than the state's (or a list) raised an AttributeError.
    with pytest.raises(TypeError, match="norms is a list but the state holds ndarrays"):
        qb.update([1.0, 2.0], state)


def test_quantile_bound_under_jit():
    jax, jnp = _jax()
    from gradclip.adaptive import QuantileBound

    qb = QuantileBound(initial=1.0)
    grads = {"w": jnp.asarray(np.stack(_tree(shapes=[(B, 3)]))[0], jnp.float32)}

    @jax.jit
    def step(grads, state, noise):
        total, stats = gc.per_example_clip(grads, state.bound, reduce="mean")
        return total, qb.update(stats, state, noise=noise)

    state = qb.init(grads)
    eager = qb.init(grads)
    for noise in (0.5, -1.0, 0.0):
        _, state = step(grads, state, jnp.asarray(noise, jnp.float32))
        _, stats = gc.per_example_clip(grads, eager.bound, reduce="mean")
        eager = qb.update(stats, eager, noise=noise)
        np.testing.assert_allclose(state.bound, eager.bound, rtol=1e-6)


# -------------------------------------------------------------------------- optax


def test_optax_transform_in_a_jitted_chain():
    jax, jnp = _jax()
    optax = importorskip("optax")
    import gradclip.optax as gco

    leaves = [jnp.asarray(g, jnp.float32) for g in _tree()]
    params = [jnp.zeros(g.shape[1:], jnp.float32) for g in leaves]
    for per_layer, uniform, split in ((False, None, "uniform"), (True, False, "size")):
        tx = optax.chain(
            gco.per_example_clip(0.8, reduce="mean", per_layer=per_layer, split=split, eps=0.0),
            optax.sgd(0.5),
        )
        state = tx.init(params)
        updates, new_state = jax.jit(tx.update)(leaves, state, params)
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        assert all(
            a.shape == b.shape and a.dtype == b.dtype
            for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True)
        )
        if per_layer:
            sums, counts = optax.per_example_layer_norm_clip(leaves, 0.8, uniform=uniform)
        else:
            sums, counts = optax.per_example_global_norm_clip(leaves, 0.8)
        for u, s in zip(updates, sums, strict=True):
            np.testing.assert_allclose(u, -0.5 * np.asarray(s) / B, rtol=2e-6, atol=1e-8)
        summary = new_state[0]
        np.testing.assert_array_equal(summary.num_clipped, np.asarray(counts))
        assert int(summary.batch_size) == B
        _, stats = gc.per_example_clip(leaves, 0.8, per_layer=per_layer, split=split, eps=0.0)
        np.testing.assert_allclose(summary.max_norm, np.max(stats.norm, axis=-1), rtol=1e-6)
        np.testing.assert_allclose(summary.mean_norm, np.mean(stats.norm, axis=-1), rtol=1e-6)


def test_optax_transform_takes_an_injected_bound():
    jax, jnp = _jax()
    optax = importorskip("optax")
    import gradclip.optax as gco

    leaves = [jnp.asarray(g, jnp.float32) for g in _tree()]
    params = [jnp.zeros(g.shape[1:], jnp.float32) for g in leaves]
    tx = optax.inject_hyperparams(gco.per_example_clip)(max_norm=1.0)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for bound in (1.0, 0.3):
        state.hyperparams["max_norm"] = jnp.asarray(bound, jnp.float32)
        updates, state = update(leaves, state, params)
        want, _ = gc.per_example_clip(leaves, bound)
        terms, _ = gc.per_example_clip(leaves, bound, reduce=None)
        for u, w, t in zip(updates, want, terms, strict=True):
            # A sum over the batch, taken by two programs that XLA fuses (and
            # so rounds) differently: where the examples cancel (0.0054 from
            # terms of 0.68 in all, on a GPU) they differ by a rounding error
            # of the terms, not of the sum. Seen: 0.16 ulp of sum(|terms|).
            u, w = np.asarray(u, np.float64), np.asarray(w, np.float64)
            ulps = 8 * np.finfo(np.float32).eps * np.sum(np.abs(np.asarray(t, np.float64)), axis=0)
            off = np.abs(u - w) - (ulps + 1e-6 * np.abs(w))
            assert np.all(off <= 0), f"{u} != {w}, off by {np.abs(u - w)}, allowed {ulps}"


def test_optax_transform_bad_input():
    importorskip("optax")
    import gradclip.optax as gco

    with pytest.raises(ValueError, match="reduce must be 'sum' or 'mean' here"):
        gco.per_example_clip(1.0, reduce=None)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        gco.per_example_clip(0.0)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        gco.per_example_clip(-1.0, per_layer=True)


def test_optax_transform_init_checks_the_params():
    # A float leaf gave a bare AttributeError from init, an int32 one passed
    # init; a NumPy float64 one made JAX warn that it truncated float64.
    importorskip("optax")
    jnp = _jax()[1]
    import gradclip.optax as gco

    tx = gco.per_example_clip(1.0)
    with pytest.raises(TypeError, match=r"init: leaf \['s'\] is a builtins.float, not an array"):
        tx.init({"w": jnp.ones(2), "s": 2.0})
    with pytest.raises(TypeError, match=r"init: leaf \['i'\] has dtype int32"):
        tx.init({"w": jnp.ones(2), "i": jnp.ones(2, jnp.int32)})
    assert tx.init({"w": np.ones(2)}).mean_norm.dtype == jnp.float32  # x64 is off


def test_find_stats_points_at_a_per_example_state():
    optax = importorskip("optax")
    jnp = _jax()[1]
    import gradclip.optax as gco

    state = optax.chain(gco.per_example_clip(1.0), optax.sgd(0.1)).init({"w": jnp.ones(2)})
    with pytest.raises(LookupError, match=r"a per_example_clip PerExampleState at '\[0\]'"):
        gco.find_stats(state)


def test_a_leaf_of_many_blocks_on_array_api_strict():
    # Examples are reduced in groups of a block's size: the last group's
    # slice stopped past the batch axis, which array-api-strict refuses.
    xs = importorskip("array_api_strict")
    host = np.ones((7, 300_000), np.float32)
    for per_layer in (False, True):
        out, stats = gc.per_example_clip([xs.asarray(host)], 1.0, per_layer=per_layer)
        np.testing.assert_allclose(np.asarray(stats.norm).reshape(-1), [np.sqrt(3e5)] * 7)
        np.testing.assert_allclose(np.asarray(out[0]), host[0] * 7 / np.sqrt(3e5), rtol=1e-5)
