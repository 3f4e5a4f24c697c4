"""Clipping 1 GB of float32 NumPy gradients in place allocates at most 64 MB."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import gradclip as gc

LIMIT = 64 * 2**20


@pytest.mark.slow
def test_inplace_clip_of_1gb_allocates_under_64mb():
    # 1 GiB of float32: one 512 MB leaf, a strided 128 MB view and many smaller ones.
    rng = np.random.default_rng(0)
    big = np.empty(2**27, np.float32)
    for start in range(0, big.size, 2**22):
        big[start : start + 2**22] = rng.standard_normal(2**22, dtype=np.float32)
    base = np.ones((2**13, 2**13), np.float32)  # 256 MB, of which a strided half is clipped
    leaves = [big, base[:, ::2], *(np.full(2**20, 0.5, np.float32) for _ in range(96))]
    total = sum(x.nbytes for x in leaves)
    assert total >= 2**30 - 2**20
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        stats = gc.clip_by_global_norm_(leaves, max_norm=1.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert bool(stats.clipped)
    assert peak <= LIMIT, f"peak temporaries {peak / 2**20:.1f} MB"
    print(f"\n1 GiB in place: peak temporaries {peak / 2**20:.2f} MiB")
    assert float(gc.global_norm(leaves)) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_array_equal(base[:, 1::2], 1.0)  # the other half untouched


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.ones((2**24, 2), np.float32).T,  # two rows of 16M
        lambda: np.ones((4, 2**12, 2**12), np.float32)[:, :, : 2**11],  # rows of 8M
    ],
)
@pytest.mark.parametrize("fn", ["global_norm", "clip_by_global_norm_", "clip_by_value_"])
def test_strided_leaves_with_long_rows_are_read_in_chunks(make, fn):
    # No flat view: the leaf was cut along its first axis only, one row at
    # least a block, and each block flattened (a copy) and squared in
    # float64: 256 MiB for the 128 MiB leaf.
    x = make()
    call = getattr(gc, fn)
    args = (0.5,) if fn == "clip_by_value_" else (1.0,) if fn.startswith("clip") else ()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        call([x], *args)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= LIMIT / 2, f"peak temporaries {peak / 2**20:.1f} MiB"
    want = {"global_norm": 1.0, "clip_by_global_norm_": x.size**-0.5, "clip_by_value_": 0.5}[fn]
    assert x.min() == x.max() == pytest.approx(want, rel=1e-5)


def test_np_sum_of_squares_would_allocate_a_copy():
    """The guard is real: the naive expression is caught by the same measurement."""
    x = np.ones(2**22, np.float32)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        np.sum(x * x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak >= x.nbytes


@pytest.mark.parametrize(
    ("fn", "dtype", "nonfinite"),
    [
        ("clip_by_block_rms", "float16", "propagate"),
        ("clip_by_block_rms", "float32", "zero"),
        ("clip_by_norm", "float32", "zero"),
        ("clip_by_norm", "complex64", "propagate"),
        ("clip_by_global_norm", "float16", "zero"),
        ("clip_by_value", "float32", "propagate"),
        ("clip_by_value", "float32", "zero"),
        ("clip_by_value", "float16", "skip"),
    ],
)
def test_functional_clips_allocate_their_outputs_and_blocks(fn, dtype, nonfinite):
    # The new leaves were made whole by the generic product: a float16
    # leaf's float32 copy (clip_by_block_rms never took the NumPy path's
    # multiply into the output), nonfinite="zero"'s masks and selections,
    # a complex leaf's selection, a clamp's two steps: one to three times
    # the leaf more.
    x = np.full(2**24 if dtype == "float16" else 2**23, 3.0, dtype)
    call = getattr(gc, fn)
    call([x[:8]], 1.0, nonfinite=nonfinite)  # warm up
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = call([x], 1.0, nonfinite=nonfinite)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    new = out[0] if isinstance(out, tuple) else out
    assert peak <= new[0].nbytes + LIMIT / 2, f"peak {peak / 2**20:.1f} MiB"
    factor = {"clip_by_block_rms": 1 / 3, "clip_by_value": 1 / 3}.get(fn, 1 / (3 * x.size**0.5))
    want = x[:8] * factor
    np.testing.assert_allclose(new[0][:8], want.astype(dtype), rtol=1e-3)


@pytest.mark.parametrize(
    ("fn", "kwargs"),
    [
        ("clip_by_norm", {}),
        ("clip_by_global_norm", {"ord": 0}),
        ("clip_by_global_norm", {"nonfinite": "raise"}),
        ("clip_by_value", {"nonfinite": "raise"}),
        ("clip_by_block_rms", {}),
    ],
)
def test_functional_clips_of_a_flat_tree_hold_their_result_once(fn, kwargs):
    # Calls that work leaf by leaf made new leaves, then copied them into
    # the new FlatTree's buffers: the result held twice.
    flat = gc.FlatTree.from_tree([np.full(2**23, 3.0, np.float32) for _ in range(2)])
    (buffer,) = flat.buffers.values()
    call = getattr(gc, fn)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = call(flat, 1.0, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    new = out[0] if isinstance(out, tuple) else out
    assert isinstance(new, gc.FlatTree)
    assert peak <= buffer.nbytes + LIMIT / 2, f"peak {peak / 2**20:.1f} MiB"
    assert np.all(buffer == 3.0)  # the input as it was
    (result,) = new.buffers.values()
    assert result is not buffer
    assert 0 < float(result[0]) < 3.0
    assert np.all(result == result[0])


@pytest.mark.parametrize(
    ("shape", "layout"),
    [((2**12, 2**12), "torch"), ((2**12, 2**12), "jax"), ((2**24,), "torch")],
)
@pytest.mark.parametrize("inplace", [True, False])
def test_agc_reads_and_writes_a_block_at_a_time(shape, layout, inplace):
    # Unit norms and products over the whole leaf: its float32 magnitudes,
    # their ratios and squares, the product and the result, several times
    # the leaf (512 MB of temporaries for a 256 MB leaf in place).
    from gradclip.adaptive import AGC

    rng = np.random.default_rng(0)
    w = np.ones(shape, np.float32)
    g = rng.standard_normal(shape, dtype=np.float32)
    g[: shape[0] // 2] *= 1e-4  # within the bound: kept as they are
    agc = AGC(clipping=0.01, layout=layout)
    copy = g.copy()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        if inplace:
            stats = agc.update_([g], agc.init([g]), params=[w])[1]
            out = g
        else:
            (out,), _, stats = agc.update([g], agc.init([g]), params=[w])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    extra = 0 if inplace else g.nbytes
    assert peak <= extra + LIMIT / 2, f"peak {peak / 2**20:.1f} MiB"
    if not inplace:
        np.testing.assert_array_equal(g, copy)  # the input as it was
    # The same unit norms and products as the whole-leaf computation.
    unit = (1,) if layout == "torch" and len(shape) == 2 else (0,) if len(shape) == 2 else None
    gn = np.sqrt(np.sum(copy.astype(np.float64) ** 2, axis=unit, keepdims=True))
    bound = 0.01 * np.sqrt(np.sum(w.astype(np.float64) ** 2, axis=unit, keepdims=True))
    expect = np.where(gn < bound, copy, copy * (bound / gn))
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=0)
    assert bool(stats.clipped)
