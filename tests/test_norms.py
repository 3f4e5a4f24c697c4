"""global_norm and leaf_norms against a float64 NumPy reference, on every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradclip as gc
from conftest import FLOATS, importorskip, need, ref_norm, selected_backends
from gradclip._norms import by_max

ORDS = [2.0, 1.0, 0.5, 3.0, 7.5, math.inf, -math.inf, 0.0]


def _tree(xp, dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"embed": (7, 5), "layers": [(3, 4), (4,), ()], "head": (6,)}
    leaves = {
        "embed": rng.standard_normal(shapes["embed"]),
        "layers": [rng.standard_normal(s) * 3 for s in shapes["layers"]],
        "head": np.zeros(6),
    }
    leaves["head"][2] = -5.0
    if dtype.startswith("complex"):
        leaves["embed"] = leaves["embed"] + 1j * rng.standard_normal(shapes["embed"])
    arr = lambda a: xp.array(a, dtype)  # noqa: E731
    tree = {
        "embed": arr(leaves["embed"]),
        "skip": None,
        "layers": [arr(a) for a in leaves["layers"]],
        "head": arr(leaves["head"]),
    }
    # The reference sees exactly the values the backend holds (after rounding),
    # in flattening order: dict keys sorted, as optree and jax.tree_util do.
    ref = [xp.numpy(tree["embed"]), xp.numpy(tree["head"]), *(xp.numpy(a) for a in tree["layers"])]
    return tree, ref


def _tol(dtype):
    return 1e-12 if dtype in ("float64", "complex128") else 1e-6


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_global_norm_matches_reference(xp, dtype, ord):
    need(xp, dtype)
    tree, ref = _tree(xp, dtype)
    got = gc.global_norm(tree, ord=ord)
    assert got.shape == ()
    np.testing.assert_allclose(float(got), ref_norm(ref, ord), rtol=_tol(dtype))


@pytest.mark.parametrize("ord", ORDS)
def test_leaf_norms_matches_reference(xp, ord):
    tree, ref = _tree(xp)
    got = xp.numpy(gc.leaf_norms(tree, ord=ord))
    want = [ref_norm([r], ord) if r.size else 0.0 for r in ref]
    if ord == 0:  # per leaf, ord 0 counts nonzero entries (torch's vector_norm)
        want = [float(np.count_nonzero(r)) for r in ref]
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize(
    ("dtypes", "expected"),
    [
        (("float16",), "float32"),
        (("bfloat16",), "float32"),
        (("float32",), "float32"),
        (("float16", "bfloat16", "float32"), "float32"),
        (("complex64",), "float32"),
        (("float32", "float64"), "float64"),
        (("float16", "complex128"), "float64"),
    ],
)
def test_result_dtype(xp, dtypes, expected):
    need(xp, *dtypes, expected)
    tree = [xp.array(np.ones(3), d) for d in dtypes]
    want = getattr(xp.ns, expected)
    assert gc.global_norm(tree).dtype == want
    assert gc.leaf_norms(tree).dtype == want
    _, stats = gc.clip_by_global_norm(tree, 1.0)
    assert stats.norm.dtype == want
    assert stats.scale.dtype == want


# float16 leaves of 300 overflow a float16 sum of squares; float32 leaves of
# 1e30 overflow and of 1e-30 underflow a float32 one; bfloat16 has float32's
# range. torch and optax return inf or 0 for all of these.
EXTREMES = [("float16", 300.0), ("float32", 1e30), ("float32", 1e-30), ("bfloat16", 1e30)]


@pytest.mark.parametrize("ord", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize(("dtype", "value"), EXTREMES)
def test_norm_does_not_overflow_or_underflow(xp, dtype, value, ord):
    need(xp, dtype)
    leaves = [xp.array(np.full(1000, value), dtype), xp.array(np.full((10, 10), -value), dtype)]
    held = float(xp.numpy(leaves[0])[0])  # the value after rounding to dtype
    n = 1100
    true = held * (n ** (1 / ord) if math.isfinite(ord) else 1.0)
    norm = float(gc.global_norm(leaves, ord=ord))
    assert norm == pytest.approx(true, rel=1e-5)
    # eps=0: with torch's eps of 1e-6, a norm of 1e-29 would never clip.
    clipped, stats = gc.clip_by_global_norm(leaves, max_norm=true / 4, ord=ord, eps=0.0)
    assert bool(stats.clipped)
    assert bool(stats.finite)
    assert float(stats.scale) == pytest.approx(0.25, rel=1e-5)
    scale = 0.25
    rtol = 1e-2 if dtype in ("float16", "bfloat16") else 1e-5
    for got in clipped:
        np.testing.assert_allclose(
            np.abs(xp.numpy(got)).astype(np.float64), held * scale, rtol=rtol
        )


def test_float64_leaves_do_not_overflow(xp):
    need(xp, "float64")
    leaves = [xp.array(np.full(4, 1e200)), xp.array(np.full(4, 1e-200))]
    assert float(gc.global_norm(leaves)) == pytest.approx(2e200, rel=1e-12)
    assert float(gc.global_norm([leaves[1]])) == pytest.approx(2e-200, rel=1e-12)


@pytest.mark.parametrize("ord", [2.0, 1.0, 3.0, 0.5, math.inf])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_largest_finite_entry(xp, dtype, ord):
    # Its log2 rounds up to the dtype's maxexp (1024.0 for float64): the
    # scaling exponent must stay one below, where 2**exp is finite.
    need(xp, dtype)
    big = float(np.finfo(dtype).max)
    leaves = [xp.array(np.array([big, 0.0]), dtype), xp.array(np.array([-big]), dtype)]
    norm = lambda t: float(xp.numpy(gc.global_norm(t, ord=ord)))  # noqa: E731
    assert norm(leaves[:1]) == pytest.approx(big, rel=1e-6)
    assert norm(leaves) == (big if ord == math.inf else math.inf)  # else 2**(1/ord) * big


@pytest.mark.parametrize("shape", [(0,), (5,)])
def test_empty_or_zero_leaf_beside_tiny_float64(xp, shape):
    # An empty or all-zero leaf's exponent must not become the common one: the
    # tiny leaf's sum of squares would be rescaled to 0.
    need(xp, "float64")
    leaves = [xp.array(np.zeros(shape)), xp.array(np.full(3, 1e-300))]
    assert float(gc.global_norm(leaves)) == pytest.approx(math.sqrt(3) * 1e-300, rel=1e-12)
    clipped, stats = gc.clip_by_global_norm(leaves[::-1], 1e-301, eps=0.0)
    assert bool(stats.clipped)
    assert float(gc.global_norm(clipped)) == pytest.approx(1e-301, rel=1e-9)


@pytest.mark.parametrize("first", ["zeros", "tiny"])
def test_large_zero_leaf_beside_tiny_float32(xp, first):
    # Leaves too large to be gathered into one buffer (the JAX path's
    # GATHER): the zero leaf's exponent must not become the common one.
    n = 70_000
    tiny, zeros = xp.array(np.full(n, 1e-30), "float32"), xp.array(np.zeros(n), "float32")
    leaves = [zeros, tiny] if first == "zeros" else [tiny, zeros]
    want = math.sqrt(n) * float(xp.numpy(tiny)[0])
    assert float(gc.global_norm(leaves)) == pytest.approx(want, rel=1e-6)
    _, stats = gc.clip_by_global_norm(leaves, want / 2, eps=0.0)
    assert float(stats.scale) == pytest.approx(0.5, rel=1e-6)


def _norms_match(xp, host, dtype, ord, fused):
    """Leaves of ``dtype`` from ``host`` arrays, their global and leaf norms checked; and refs."""
    leaves = [xp.array(h, dtype) for h in host]
    ref = [xp.numpy(x) for x in leaves]
    got = gc.global_norm(leaves, ord=ord, fused=fused)
    np.testing.assert_allclose(float(got), ref_norm(ref, ord), rtol=1e-6)
    per_leaf = xp.numpy(gc.leaf_norms(leaves, ord=ord, fused=fused))
    np.testing.assert_allclose(per_leaf, [ref_norm([r], ord) for r in ref], rtol=1e-6)
    return leaves, ref


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("ord", [100.0, 500.0, 1100.0, 5000.0, 1e6])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_large_ord_does_not_overflow(xp, dtype, ord, fused):
    # With the largest entry scaled into [1, 2), its ord-th power overflows a
    # float64 sum from ord ~1000 (a float32 one from ~85): torch returns inf
    # there and clipping zeroes the gradients.
    need(xp, dtype)
    rng = np.random.default_rng(3)
    host = [rng.uniform(-3.9, 3.9, 5000), np.zeros(70), np.array([1e-3, -3.8, 3.89])]
    if dtype == "float64":
        host[1] = np.full(70, 1e-300)
    leaves, ref = _norms_match(xp, host, dtype, ord, fused)
    clipped, stats = gc.clip_by_global_norm(leaves, 1.0, ord=ord, eps=0.0, fused=fused)
    assert float(stats.scale) == pytest.approx(1 / ref_norm(ref, ord), rel=1e-6)
    assert float(gc.global_norm(clipped, ord=ord)) == pytest.approx(1.0, rel=1e-2)


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize(
    ("dtype", "big", "ord"), [("float32", 1e38, 100.0), ("float64", 1e308, 1e3)]
)
def test_large_ord_at_the_top_of_the_range(xp, dtype, big, ord, fused):
    # Each block is divided by its largest entry there; XLA on the CPU did
    # that as a multiply by 1 / top, subnormal for top >= 2**126 (float32),
    # so flushed to 0: the generic path gave a norm of 0 and clipped nothing.
    need(xp, dtype)
    host = [np.array([big, 1.0]), np.array([big / 3]), np.zeros(3)]
    leaves, _ = _norms_match(xp, host, dtype, ord, fused)
    _, stats = gc.clip_by_global_norm(leaves, 1.0, ord=ord, fused=fused)
    assert bool(stats.clipped)


def test_norm_of_subnormals(xp):
    if xp.name.startswith("jax"):
        pytest.skip("XLA on CPU flushes float32 subnormals to zero")
    tiny = np.float32(1e-44)  # float32 subnormal
    got = float(gc.global_norm([xp.array(np.full(4, tiny), "float32")]))
    assert got == pytest.approx(2 * float(tiny), rel=0.1)  # subnormals carry few bits
    assert got > 0


def _flushes_float32_subnormals(xp, ord, fused):
    """Whether the path that reduces float32 leaves flushes their subnormals to 0.

    XLA runs with denormals flushed on the CPU, not on the GPU (an H100 gave
    1e-40). CuPy compiles its elementwise kernels, which the generic path is
    made of, with ``-ftz=true`` (cupy/cupy#8382); gradclip's own kernels keep
    subnormals, but leave the ords that divide by the largest entry to the
    generic path.
    """
    if xp.name.startswith("jax"):
        import jax

        return jax.default_backend() == "cpu"
    return xp.name == "cupy" and (fused is False or by_max(ord))


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("ord", [100.0, 1000.0])
@pytest.mark.parametrize("value", [1e-40, 1e-45])
def test_one_subnormal_with_a_large_ord(xp, value, ord, fused):
    # Large ords divide each block by its largest entry. XLA on the CPU
    # flushes a subnormal one to 0, and every entry with it: 0 / 0 made the
    # norm NaN, and the gradients NaN, on JAX's fast path.
    x = xp.array(np.array([value], np.float32), "float32")
    norm = float(gc.global_norm([x], ord=ord, fused=fused))
    want = 0.0 if _flushes_float32_subnormals(xp, ord, fused) else float(np.float32(value))
    assert norm == pytest.approx(want, rel=1e-6, abs=0.0)
    (out,), stats = gc.clip_by_global_norm([x], 1.0, ord=ord, fused=fused)
    assert bool(stats.finite) and float(stats.scale) == 1.0
    assert float(out[0]) in (0.0, float(np.float32(value)))


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize(("value", "ord"), [(5e-324, 30.0), (1e-320, 100.0), (1e-310, 500.0)])
def test_float64_subnormals_with_a_large_ord(xp, value, ord, fused):
    # The scale 2**-exp once stopped at 2**1022, leaving subnormal entries
    # near 2**-51, whose 30th power is 0: the norm came out 0.
    need(xp, "float64")
    if xp.name.startswith("jax"):
        pytest.skip("XLA on CPU flushes subnormals to zero")
    leaves = [xp.array(np.full(4, value), "float64"), xp.array(np.ones(3), "float64")]
    want = value * 4 ** (1 / ord)
    np.testing.assert_allclose(
        float(gc.leaf_norms(leaves, ord=ord, fused=fused)[0]), want, rtol=1e-6
    )
    _, stats = gc.clip_by_norm(leaves, 1.0, ord=ord, fused=fused)
    np.testing.assert_allclose(float(stats.norm[0]), want, rtol=1e-6)


def test_complex_uses_modulus(xp):
    need(xp, "complex64")
    z = xp.array(np.array([3 + 4j, 0, -6 - 8j]), "complex64")
    assert float(gc.global_norm([z])) == pytest.approx(math.hypot(5, 10), rel=1e-6)
    assert float(gc.global_norm([z], ord=math.inf)) == pytest.approx(10.0)


def test_deterministic(xp):
    rng = np.random.default_rng(1)
    tree = [xp.array(rng.standard_normal(n), "float32") for n in (3_000_001, 17, 5000)]
    first = gc.global_norm(tree)
    norms = [xp.numpy(gc.global_norm(tree)) for _ in range(5)]
    assert all(n.tobytes() == xp.numpy(first).tobytes() for n in norms)
    outs = [xp.numpy(gc.clip_by_global_norm(tree, 1.0)[0][0]) for _ in range(3)]
    assert all(o.tobytes() == outs[0].tobytes() for o in outs)


@pytest.mark.parametrize("tree", [[], {}, (), [None], {"a": None, "b": [None]}])
def test_empty_tree(tree):
    assert float(gc.global_norm(tree)) == 0.0
    assert gc.leaf_norms(tree).shape == (0,)
    out, stats = gc.clip_by_global_norm(tree, 1.0)
    assert out == tree
    assert (float(stats.norm), float(stats.scale), bool(stats.clipped), bool(stats.finite)) == (
        0.0,
        1.0,
        False,
        True,
    )
    assert gc.clip_by_global_norm_(tree, 1.0).scale == 1.0
    assert gc.clip_by_value(tree, 1.0) == tree


def test_empty_and_zero_size_leaves(xp):
    tree = [xp.array(np.zeros((0, 3)), "float32"), xp.array(np.array([2.0]), "float32")]
    for ord in ORDS:
        assert float(gc.global_norm(tree, ord=ord)) == pytest.approx(1.0 if ord == 0 else 2.0)
    assert xp.numpy(gc.leaf_norms(tree, ord=-math.inf)).tolist() == [0.0, 2.0]
    only_empty = [xp.array(np.zeros((0,)), "float32")]
    assert float(gc.global_norm(only_empty, ord=-math.inf)) == 0.0


def _one_large_square(shape: tuple[int, ...], every: int) -> np.ndarray:
    """float32 ones with 4096 every ``every`` entries: float32 sums lose the ones after it."""
    x = np.ones(shape, np.float32)
    x.reshape(-1)[::every] = 4096.0
    return x


def test_accuracy_with_a_wide_range_of_squares(xp):
    """float32 leaves where a large square precedes many small ones: within 1e-6.

    A float32 dot of such a leaf drops the small squares (BLAS ``sdot`` over
    131072 entries: 1e-5 off here, torch's 16K-entry row norms 6e-5); the
    fast paths add in float64 or in pieces short enough not to.
    """
    large = _one_large_square((1 << 20,), 16384)  # the threaded large-leaf path
    small = [_one_large_square((1000,), 1000) for _ in range(300)]  # gathered small leaves
    for leaves in ([large], small):
        want = ref_norm(leaves, 2.0)
        got = float(gc.global_norm([xp.array(x) for x in leaves]))
        assert abs(got - want) / want <= 1e-6
    rows = _one_large_square((8, 70000), 16384)
    want = np.sqrt(np.einsum("ij,ij->i", rows.astype(np.float64), rows.astype(np.float64)))
    _, stats = gc.per_example_clip([xp.array(rows)], 1.0)
    np.testing.assert_allclose(xp.numpy(stats.norm), want, rtol=1e-6)


@pytest.mark.slow
def test_accuracy_64m_float32(xp):
    """A 64M-element float32 N(0,1) leaf: relative error <= 1e-6 (np.dot is ~3e-4 off)."""
    rng = np.random.default_rng(2)
    host = rng.standard_normal(64 * 2**20, dtype=np.float32)
    want = math.sqrt(float(np.dot(host.astype(np.float64), host.astype(np.float64))))
    leaf = xp.array(host)
    del host
    got = float(gc.global_norm([leaf]))
    assert abs(got - want) / want <= 1e-6


@pytest.mark.parametrize("ord", [2.0, 3.0, 1.0, math.inf, -math.inf, 0.0])
def test_a_device_without_float64(ord):
    # array-api-strict's "no_float64" device, as torch's MPS: every norm
    # asked for a float64 accumulator there and failed; they accumulate in
    # float32, overflow-safe (1e30 squared is past float32).
    xs = importorskip("array_api_strict")
    if "array_api_strict" not in selected_backends():
        pytest.skip("GRADCLIP_TEST_BACKENDS leaves array_api_strict out")
    device = xs.Device("no_float64")
    host = [np.array([3e30, 4e30], np.float32), np.array([[1e-30, 0.0]], np.float32)]
    tree = [xs.asarray(h, device=device) for h in host]
    want = gc.global_norm(host, ord)
    norm = gc.global_norm(tree, ord)
    assert norm.device == device and norm.dtype == xs.float32
    np.testing.assert_allclose(np.asarray(norm.to_device(xs.Device("CPU_DEVICE"))), want, rtol=1e-6)
    out, stats = gc.clip_by_global_norm(tree, 1e30, ord=ord)
    assert out[0].device == stats.scale.device == device
    got = gc.clip_by_norm(tree, 1e30, ord=ord)[1].norm
    np.testing.assert_allclose(
        np.asarray(got.to_device(xs.Device("CPU_DEVICE"))), gc.leaf_norms(host, ord), rtol=1e-6
    )
