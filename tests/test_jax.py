"""JAX: the functions run under jax.jit and jax.vmap, and jax.grad goes through global_norm."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradclip as gc
from conftest import importorskip

jax = importorskip("jax")
jnp = jax.numpy


def _tree():
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32), "b": jnp.full(4, 3.0)}


@pytest.mark.parametrize("nonfinite", ["propagate", "zero", "skip"])
def test_clip_by_global_norm_under_jit(nonfinite):
    tree = _tree()
    fn = jax.jit(lambda t: gc.clip_by_global_norm(t, 1.0, nonfinite=nonfinite))
    out, stats = fn(tree)
    ref, ref_stats = gc.clip_by_global_norm(tree, 1.0, nonfinite=nonfinite)
    assert isinstance(stats, gc.ClipStats)
    np.testing.assert_allclose(np.asarray(stats.norm), np.asarray(ref_stats.norm), rtol=1e-6)
    for k in tree:
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref[k]), rtol=1e-6)


@pytest.mark.parametrize("ord", [2.0, 1.0, 3.0, math.inf, -math.inf, 0.0])
def test_norms_under_jit(ord):
    tree = _tree()
    got = jax.jit(lambda t: gc.global_norm(t, ord=ord))(tree)
    assert float(got) == pytest.approx(float(gc.global_norm(tree, ord=ord)), rel=1e-6)
    per = jax.jit(lambda t: gc.leaf_norms(t, ord=ord))(tree)
    np.testing.assert_allclose(np.asarray(per), np.asarray(gc.leaf_norms(tree, ord=ord)), rtol=1e-6)


def test_other_functions_under_jit():
    tree = _tree()
    jax.jit(lambda t: gc.clip_by_norm(t, 1.0))(tree)
    jax.jit(lambda t: gc.clip_by_value(t, 0.5, nonfinite="skip"))(tree)
    jax.jit(lambda t: gc.clip_by_block_rms(t, 0.5))(tree)
    out = jax.jit(lambda t, m: gc.clip_by_global_norm(t, m)[0])(tree, jnp.float32(2.0))
    assert float(gc.global_norm(out)) == pytest.approx(2.0, rel=1e-5)


def test_overflow_safe_under_jit():
    tree = [jnp.full(100, 1e30, jnp.float32), jnp.full(3, 1.5e38, jnp.bfloat16)]
    got = jax.jit(gc.global_norm)(tree)
    assert float(got) == pytest.approx(float(np.linalg.norm([1e30] * 100 + [1.5e38] * 3)), rel=1e-2)


def test_grad_through_global_norm():
    x = jnp.asarray([3.0, -4.0, 12.0], jnp.float32)
    g = jax.grad(lambda v: gc.global_norm({"v": v}))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(x) / 13.0, rtol=1e-6)
    big = x * 1e30  # the scaled path: gradient is still x / ||x||
    g = jax.grad(lambda v: gc.global_norm([v]))(big)
    np.testing.assert_allclose(np.asarray(g), np.asarray(x) / 13.0, rtol=1e-6)


def test_grad_through_clip():
    x = jnp.asarray([3.0, 4.0], jnp.float32)
    g = jax.grad(lambda v: jnp.sum(gc.clip_by_global_norm([v], 1.0, eps=0.0)[0][0]))(x)
    # d/dx sum(x / |x|) = (1 - x * sum(x) / |x|^2) / |x|
    want = (1 - np.asarray(x) * 7 / 25) / 5
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5)


@pytest.mark.parametrize("fn", ["clip_by_global_norm", "clip_by_norm", "clip_by_block_rms"])
@pytest.mark.parametrize("fused", [None, False])
def test_grad_through_a_clip_that_zeroes_nan(fn, fused):
    # The NaN entry's product is thrown away; its derivative must not be taken
    # (NaN * 0 made every entry's gradient NaN).
    def loss(v):
        out = getattr(gc, fn)([v], 1.0, nonfinite="zero", fused=fused)
        return jnp.sum(out[0] if fn == "clip_by_block_rms" else out[0][0])

    x = jnp.asarray([jnp.nan, 3.0, 4.0], jnp.float32)
    got = np.asarray(jax.grad(loss)(x))
    want = np.asarray(jax.grad(loss)(jnp.asarray([0.0, 3.0, 4.0])))
    assert got[0] == 0.0
    np.testing.assert_allclose(got[1:], want[1:], rtol=1e-5)


@pytest.mark.parametrize(
    "clip",
    [
        lambda v, **kw: gc.clip_by_global_norm([v], 1.0, eps=0.0, **kw)[0][0],
        lambda v, **kw: gc.clip_by_global_norm([v], 1.0, eps=0.0, ord=3.0, **kw)[0][0],
        lambda v, **kw: gc.clip_by_norm([v], 1.0, eps=0.0, **kw)[0][0],
        lambda v, **kw: gc.clip_by_block_rms([v], 1.0, **kw)[0],
    ],
    ids=["global", "global-ord3", "norm", "block_rms"],
)
@pytest.mark.parametrize("fused", [None, False])
def test_grad_through_a_clip_of_a_huge_norm(clip, fused):
    """clip(s * x) == clip(x) for s >= 1, so its gradient at s * x is the one at x over s.

    At s = 1e20 the derivative of ``1 / norm`` (``norm ** -2``) is 0 in
    float32: the path through the norm was dropped, silently.
    """
    x = jnp.asarray([3.0, 4.0], jnp.float32)
    weights = jnp.asarray([1.0, 2.0])

    def loss(v):
        return jnp.sum(jnp.sin(clip(v, fused=fused)) * weights)

    want = np.asarray(jax.grad(loss)(x))
    got = np.asarray(jax.grad(loss)(x * 1e20)) * 1e20
    # float32 terms that nearly cancel: 1e-5 apart; without the fix, O(1) apart
    np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.mark.parametrize(
    "clip",
    [
        lambda t, **kw: gc.clip_by_global_norm(t, 1.0, **kw)[0],
        lambda t, **kw: gc.clip_by_global_norm(t, 1.0, ord=3.0, **kw)[0],
        lambda t, **kw: gc.clip_by_norm(t, 1.0, **kw)[0],
        lambda t, **kw: gc.clip_by_block_rms(t, 1.0, **kw),
        lambda t, **kw: gc.per_example_clip(t, 1.0, reduce=None)[0],
    ],
    ids=["global", "global-ord3", "norm", "block_rms", "per_example"],
)
@pytest.mark.parametrize("fused", [None, False])
def test_grad_through_a_clip_where_a_norm_is_zero(clip, fused):
    # At a zero norm the clip is the identity; the root's infinite
    # derivative there met a zero cotangent and made the gradient NaN (an
    # unused bias, a padded example, a frozen layer: the whole meta-gradient).
    weights = {"w": jnp.asarray([[1.0, -2.0], [0.5, 3.0]]), "z": jnp.arange(6.0).reshape(2, 3)}

    def loss(t):
        return sum(jnp.sum(x * weights[k]) for k, x in clip(t, fused=fused).items())

    zeros = {"w": jnp.zeros((2, 2)), "z": jnp.zeros((2, 3))}
    got = jax.grad(loss)(zeros)
    for k in zeros:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(weights[k]))
    # An all-zero leaf (or example) beside others: as next to entries of 1e-20,
    # where the clip is the same map and its derivative is defined.
    mixed = {"w": jnp.asarray([[0.0, 0.0], [3.0, 4.0]]), "z": jnp.zeros((2, 3))}
    near = {"w": mixed["w"].at[0].set(1e-20), "z": jnp.full((2, 3), 1e-20)}
    got, want = jax.grad(loss)(mixed), jax.grad(loss)(near)
    for k in mixed:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6, atol=1e-12)


def test_grad_through_agc_where_a_unit_is_zero():
    # As above, for AGC's unit norms: a zero unit passes through unchanged,
    # so its gradient is 1 (it was NaN, as optax.adaptive_grad_clip's is).
    from gradclip.adaptive import AGC

    clipper = AGC(clipping=0.05, layout="jax")
    params = {"w": jnp.ones((2, 2)), "z": jnp.ones(3)}
    state = clipper.init(params)

    def loss(g):
        return sum(jnp.sum(x) for x in jax.tree.leaves(clipper.update(g, state, params)[0]))

    got = jax.grad(loss)({"w": jnp.asarray([[0.0, 1.0], [0.0, 1.0]]), "z": jnp.zeros(3)})
    np.testing.assert_array_equal(np.asarray(got["z"]), np.ones(3))
    np.testing.assert_array_equal(np.asarray(got["w"][:, 0]), np.ones(2))
    assert np.all(np.isfinite(np.asarray(got["w"])))


def test_grad_through_adagc_of_an_all_zero_tree():
    # The clip is the identity at a zero tree; the global norm's sqrt had an
    # infinite derivative there, and the gradient came out NaN.
    from gradclip.adaptive import AdaGC

    clipper = AdaGC(warmup_steps=1, max_grad_norm=1.0)
    zero = {"a": jnp.zeros(3), "b": jnp.zeros(2)}

    def loss(g, state):
        return sum(jnp.sum(x) for x in jax.tree.leaves(clipper.update(g, state)[0]))

    state = clipper.init(zero)
    for _ in range(3):  # in the warm-up, then after it
        got = jax.grad(loss)(zero, state)
        for k in zero:
            np.testing.assert_array_equal(np.asarray(got[k]), np.ones(zero[k].shape))
        _, state, _ = clipper.update({"a": jnp.ones(3), "b": jnp.ones(2)}, state)


@pytest.mark.parametrize("fused", [None, False])
def test_grad_of_an_ord_1_norm_by_a_zero_leaf(fused):
    # Through the scaled reduction (entries of 1e-30) a zero leaf's
    # cotangent missed its weight: 2**100 (7.9e-31 here), or 2 at entries of 3.
    for value in (3.0, 1e-30):
        tree = {"a": jnp.full(3, value), "z": jnp.zeros(3)}
        got = np.asarray(jax.grad(lambda t: gc.global_norm(t, ord=1, fused=fused))(tree)["z"])
        assert np.all((got >= -1) & (got <= 1)), (value, got)  # a subgradient of |x| at 0


def test_vmap_over_a_batch_of_trees():
    batch = {"w": jnp.arange(12.0).reshape(3, 4)}
    norms = jax.vmap(lambda t: gc.global_norm(t))(batch)
    np.testing.assert_allclose(
        np.asarray(norms), np.linalg.norm(np.arange(12.0).reshape(3, 4), axis=1), rtol=1e-6
    )


def test_first_call_under_a_transfer_guard():
    # A fresh process: the first JAX leaf gradclip sees must not make an array
    # to find jax.numpy (array-api-compat's jnp.empty(0), a transfer).
    import subprocess
    import sys

    code = (
        "import jax, jax.numpy as jnp, gradclip as gc\n"
        "g, m = {'w': jnp.ones(3)}, jnp.float32(1.0)\n"
        "with jax.transfer_guard('disallow'):\n"
        "    scale = gc.clip_by_global_norm(g, m)[1].scale\n"
        "print(float(scale) > 0)\n"  # outside: a GPU's guard refuses this read
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize(
    "fn",
    [
        "clip_by_value",
        "clip_by_global_norm",
        "clip_by_norm",
        "clip_by_block_rms",
        "per_example_clip",
    ],
)
def test_gradclip_jax_rounds_a_bound_past_float32_unwarned(fn):
    # The top-level functions round 1e39 to inf under gradclip's error state;
    # gradclip.jax's ran its program outside it: "overflow encountered in cast".
    import gradclip.jax as gcj

    x = [jax.numpy.array([1.0, -2.0])]
    got = getattr(gcj, fn)(x, 1e39)
    want = getattr(gc, fn)(x, 1e39)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
