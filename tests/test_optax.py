"""gradclip.optax: transforms inside optax.chain, MultiSteps, inject_hyperparams, jit and vmap."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradclip as gc
from conftest import importorskip

jax = importorskip("jax")
optax = importorskip("optax")
gco = importorskip("gradclip.optax")
jnp = jax.numpy

RTOL = 1e-6


def _tree(seed=0, scale=1.0, dtype="float32"):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(scale * rng.standard_normal((8, 4)), dtype),
        "b": jnp.asarray(scale * rng.standard_normal(4), dtype),
        "layers": [jnp.asarray(scale * rng.standard_normal((3, 3)), dtype)],
    }


def _close(got, want, rtol=RTOL):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(got_leaves, want_leaves, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=0)


def _zeros(tree):
    return all(not np.any(np.asarray(x)) for x in jax.tree.leaves(tree))


def _np_norm(tree):
    return float(
        np.linalg.norm(
            np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])
        )
    )


TRANSFORMS = {
    "global_norm": lambda **kw: gco.clip_by_global_norm(1.0, **kw),
    "norm": lambda **kw: gco.clip_by_norm(1.0, **kw),
    "block_rms": lambda **kw: gco.clip_by_block_rms(0.5, **kw),
    "value": lambda **kw: gco.clip_by_value(0.5, **kw),
    "value_lo_hi": lambda **kw: gco.clip_by_value(lo=-0.2, hi=1.0, **kw),
}


# ------------------------------------------------------------------ against optax


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 100.0])
def test_global_norm_in_chain_with_sgd_matches_optax(max_norm):
    params = _tree(9)
    ours = optax.chain(gco.clip_by_global_norm(max_norm, eps=0.0), optax.sgd(0.1))
    ref = optax.chain(optax.clip_by_global_norm(max_norm), optax.sgd(0.1))
    s_ours, s_ref = ours.init(params), ref.init(params)
    for step in range(3):
        grads = _tree(step, scale=2.0**step)
        u_ours, s_ours = ours.update(grads, s_ours, params)
        u_ref, s_ref = ref.update(grads, s_ref, params)
        _close(u_ours, u_ref)
        stats = gco.find_stats(s_ours)
        norm = _np_norm(grads)
        assert float(stats.norm) == pytest.approx(norm, rel=RTOL)
        assert bool(stats.clipped) == (norm > max_norm)
        assert float(stats.scale) == pytest.approx(min(1.0, max_norm / norm), rel=RTOL)
        assert bool(stats.finite)


def test_adam_chain_under_jit_matches_optax():
    params = _tree(1)
    ours = optax.chain(gco.clip_by_global_norm(1.0, eps=0.0), optax.adam(1e-2))
    ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    step_ours, step_ref = jax.jit(ours.update), jax.jit(ref.update)
    s_ours, s_ref = ours.init(params), ref.init(params)
    p_ours, p_ref = params, params
    for step in range(5):
        grads = _tree(10 + step, scale=[0.01, 10.0][step % 2])
        u_ours, s_ours = step_ours(grads, s_ours, p_ours)
        u_ref, s_ref = step_ref(grads, s_ref, p_ref)
        _close(u_ours, u_ref, rtol=1e-5)  # adam divides by sqrt(nu) + eps
        p_ours, p_ref = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_ref, u_ref)
        assert float(gco.find_stats(s_ours).norm) == pytest.approx(_np_norm(grads), rel=RTOL)
    _close(p_ours, p_ref, rtol=1e-5)


def test_block_rms_matches_optax():
    grads = _tree(2, scale=3.0)
    grads["small"] = jnp.full(5, 0.01, jnp.float32)  # below the threshold: untouched
    tx = gco.clip_by_block_rms(0.5)
    got, state = tx.update(grads, tx.init(grads))
    want, _ = optax.clip_by_block_rms(0.5).update(grads, optax.EmptyState())
    _close(got, want)
    leaves = jax.tree.leaves(grads)
    rms = [float(np.sqrt(np.mean(np.asarray(x, np.float64) ** 2))) for x in leaves]
    np.testing.assert_allclose(np.asarray(state.stats.norm), rms, rtol=RTOL)
    np.testing.assert_allclose(
        np.asarray(state.stats.scale), [1 / max(1.0, r / 0.5) for r in rms], rtol=RTOL
    )
    assert list(np.asarray(state.stats.clipped)) == [r > 0.5 for r in rms]
    assert np.asarray(state.stats.clipped).any() and not np.asarray(state.stats.clipped).all()


def test_value_matches_optax_clip():
    grads = _tree(3, scale=2.0)
    tx = gco.clip_by_value(0.5)
    got, state = tx.update(grads, tx.init(grads))
    want, _ = optax.clip(0.5).update(grads, optax.EmptyState())
    _close(got, want)
    top = max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(grads))
    assert float(state.stats.norm) == pytest.approx(top, rel=RTOL)
    assert float(state.stats.scale) == pytest.approx(0.5 / top, rel=RTOL)
    assert bool(state.stats.clipped) and bool(state.stats.finite)


def test_clip_by_norm_per_leaf():
    grads = {"big": jnp.asarray([3.0, 4.0]), "small": jnp.asarray([0.3, 0.4]), "e": jnp.zeros(0)}
    tx = gco.clip_by_norm(1.0, eps=0.0)
    got, state = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(np.asarray(got["big"]), [0.6, 0.8], rtol=RTOL)
    np.testing.assert_allclose(np.asarray(got["small"]), [0.3, 0.4], rtol=RTOL)
    # leaves in jax.tree.leaves order: big, e, small
    np.testing.assert_allclose(np.asarray(state.stats.norm), [5.0, 0.0, 0.5], rtol=RTOL)
    assert list(np.asarray(state.stats.clipped)) == [True, False, False]
    assert state.stats.finite.shape == (3,)


# ------------------------------------------------------------------- overflow


def test_float32_1e30_global_norm_clips_where_optax_zeroes():
    grads = {"w": jnp.full((10, 10), 1e30, jnp.float32), "b": jnp.full(3, -2e30, jnp.float32)}
    # optax's sum of squares overflows to inf, so its clipped update is zeros.
    bad, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    assert _zeros(bad)
    tx = gco.clip_by_global_norm(1.0, eps=0.0)
    got, state = tx.update(grads, tx.init(grads))
    norm = _np_norm(grads)
    assert float(state.stats.norm) == pytest.approx(norm, rel=1e-6)
    for k in grads:
        want = np.asarray(grads[k], np.float64) / norm
        np.testing.assert_allclose(np.asarray(got[k]), want, rtol=1e-5)
    assert _np_norm(got) == pytest.approx(1.0, rel=1e-5)


def test_float32_1e30_block_rms_clips_where_optax_zeroes():
    grads = [jnp.full(16, 1e30, jnp.float32), jnp.asarray([0.1, -0.1], jnp.float32)]
    bad, _ = optax.clip_by_block_rms(1.0).update(grads, optax.EmptyState())
    assert _zeros(bad[0])
    tx = gco.clip_by_block_rms(1.0)
    got, state = jax.jit(tx.update)(grads, tx.init(grads))
    np.testing.assert_allclose(np.asarray(got[0]), np.ones(16), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got[1]), [0.1, -0.1], rtol=RTOL)
    np.testing.assert_allclose(np.asarray(state.stats.norm), [1e30, 0.1], rtol=1e-5)


def test_block_rms_stats_where_the_norm_is_past_float32():
    # 10000 entries of 1e37: the rms is 1e37, the 2-norm 1e39. The clip was
    # right, but the stats took the rms as leaf_norms / sqrt(n): inf, scale 0.
    grads = {"w": jnp.full((10_000,), 1e37, jnp.float32)}
    tx = gco.clip_by_block_rms(1.0)
    got, state = jax.jit(tx.update)(grads, tx.init(grads))
    np.testing.assert_allclose(np.asarray(state.stats.norm), [1e37], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state.stats.scale), [1e-37], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got["w"]), 1.0, rtol=1e-5)


# ----------------------------------------------------------- state and tracing


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("nonfinite", ["propagate", "zero", "skip"])
def test_init_matches_update_structure(name, nonfinite):
    tx = TRANSFORMS[name](nonfinite=nonfinite)
    params = _tree(4)
    state = tx.init(params)
    _, new = jax.jit(tx.update)(_tree(5, scale=3.0), state)
    assert jax.tree.structure(state) == jax.tree.structure(new)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new), strict=True):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    assert isinstance(new, gco.ClipState) and isinstance(new.stats, gc.ClipStats)
    per_leaf = name in ("norm", "block_rms")
    assert new.stats.norm.shape == ((3,) if per_leaf else ())  # w, b, layers[0]
    assert new.stats.norm.dtype == jnp.float32


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_scan_carries_the_state(name):
    tx = optax.chain(TRANSFORMS[name](nonfinite="skip"), optax.adam(1e-3))
    params = _tree(6)
    batch = jax.tree.map(lambda *xs: jnp.stack(xs), *[_tree(i, scale=2.0) for i in range(4)])

    def step(carry, grads):
        p, s = carry
        u, s = tx.update(grads, s, p)
        return (optax.apply_updates(p, u), s), gco.find_stats(s).norm

    (_, state), norms = jax.lax.scan(step, (params, tx.init(params)), batch)
    last = jax.tree.map(lambda x: x[-1], batch)
    _, ref = TRANSFORMS[name](nonfinite="skip").update(last, gco.find_state(tx.init(params)))
    np.testing.assert_allclose(np.asarray(norms[-1]), np.asarray(ref.stats.norm), rtol=RTOL)
    np.testing.assert_allclose(
        np.asarray(gco.find_stats(state).norm), np.asarray(ref.stats.norm), rtol=RTOL
    )


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_vmap_over_trees_and_states(name):
    tx = TRANSFORMS[name]()
    trees = [_tree(i, scale=0.5 * (i + 1)) for i in range(3)]
    batch = jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
    states = jax.vmap(tx.init)(batch)
    out, new = jax.jit(jax.vmap(tx.update))(batch, states)
    for i, tree in enumerate(trees):
        want, want_state = tx.update(tree, tx.init(tree))
        _close(jax.tree.map(lambda x, i=i: x[i], out), want)
        _close(jax.tree.map(lambda x, i=i: x[i], new), want_state)


def test_vmap_stats_differ_per_example():
    tx = gco.clip_by_global_norm(1.0)
    batch = {"w": jnp.asarray([[0.3, 0.4], [3.0, 4.0]])}
    _, state = jax.vmap(tx.update)(batch, jax.vmap(tx.init)(batch))
    np.testing.assert_allclose(np.asarray(state.stats.norm), [0.5, 5.0], rtol=RTOL)
    assert list(np.asarray(state.stats.clipped)) == [False, True]


def test_multisteps_matches_optax():
    params = _tree(7)
    k = 3
    ours = optax.MultiSteps(
        optax.chain(gco.clip_by_global_norm(1.0, eps=0.0), optax.sgd(0.1)), every_k_schedule=k
    )
    ref = optax.MultiSteps(
        optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)), every_k_schedule=k
    )
    s_ours, s_ref = ours.init(params), ref.init(params)
    seen = []
    for step in range(2 * k):
        grads = _tree(20 + step, scale=0.5)
        seen.append(grads)
        u_ours, s_ours = jax.jit(ours.update)(grads, s_ours, params)
        u_ref, s_ref = ref.update(grads, s_ref, params)
        _close(u_ours, u_ref)
        if step % k == k - 1:  # the inner optimizer ran on the mean of the last k
            mean = jax.tree.map(lambda *xs: sum(xs) / k, *seen[-k:])
            stats = gco.find_stats(s_ours)
            assert float(stats.norm) == pytest.approx(_np_norm(mean), rel=1e-5)
            assert not _zeros(u_ours)
        else:
            assert _zeros(u_ours)


def test_inject_hyperparams_max_norm():
    grads = {"w": jnp.asarray([3.0, 4.0])}
    tx = optax.inject_hyperparams(gco.clip_by_global_norm)(max_norm=1.0, nonfinite="skip")
    state = tx.init(grads)
    assert set(state.hyperparams) == {"max_norm"}  # ord and eps stay Python defaults
    update = jax.jit(tx.update)
    out, state = update(grads, state)
    np.testing.assert_allclose(np.asarray(out["w"]), [0.6, 0.8], rtol=1e-5)
    state.hyperparams["max_norm"] = jnp.asarray(2.5)
    out, state = update(grads, state)
    np.testing.assert_allclose(np.asarray(out["w"]), [1.5, 2.0], rtol=1e-5)
    stats = gco.find_stats(state)
    assert float(stats.norm) == pytest.approx(5.0)
    assert float(stats.scale) == pytest.approx(0.5, rel=1e-5)


def test_inject_hyperparams_with_a_schedule():
    grads = [jnp.asarray([30.0, 40.0])]
    schedule = optax.linear_schedule(1.0, 5.0, transition_steps=4)
    tx = optax.inject_hyperparams(gco.clip_by_norm)(max_norm=schedule)
    state = tx.init(grads)
    norms = []
    for _ in range(3):
        out, state = jax.jit(tx.update)(grads, state)
        norms.append(_np_norm(out))
    np.testing.assert_allclose(norms, [1.0, 2.0, 3.0], rtol=1e-5)


def test_inject_hyperparams_schedules_value_and_rms_bounds():
    grads = [jnp.asarray([-3.0, 3.0])]
    steps = []
    for make, kwargs in [
        (gco.clip_by_value, {"clip_value": optax.linear_schedule(1.0, 2.0, 1)}),
        (gco.clip_by_value, {"lo": -0.5, "hi": optax.linear_schedule(1.0, 2.0, 1)}),
        (gco.clip_by_block_rms, {"threshold": optax.linear_schedule(1.0, 2.0, 1)}),
    ]:
        tx = optax.inject_hyperparams(make)(**kwargs)
        state = tx.init(grads)
        update = jax.jit(tx.update)
        outs = []
        for _ in range(2):
            out, state = update(grads, state)
            outs.append(np.asarray(out[0]))
        assert update._cache_size() == 1  # a new bound compiles nothing
        steps.append(outs)
    np.testing.assert_allclose(steps[0], [[-1.0, 1.0], [-2.0, 2.0]])
    np.testing.assert_allclose(steps[1], [[-0.5, 1.0], [-0.5, 2.0]])
    np.testing.assert_allclose(steps[2], [[-1.0, 1.0], [-2.0, 2.0]], rtol=1e-6)
    # The stats follow the scheduled bound too.
    tx = optax.inject_hyperparams(gco.clip_by_value)(clip_value=optax.linear_schedule(1.0, 2.0, 1))
    state = tx.init(grads)
    _, state = tx.update(grads, state)
    assert float(gco.find_stats(state).scale) == pytest.approx(1 / 3)
    with pytest.raises(TypeError, match=r"static_args=\('eps',\)"):
        optax.inject_hyperparams(gco.clip_by_global_norm)(max_norm=1.0, eps=0.0).init(grads)


def test_float64_params_give_float64_stats():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        grads = {"a": jnp.asarray([3.0, 4.0], jnp.float64), "b": jnp.ones(2, jnp.float32)}
        tx = gco.clip_by_global_norm(1.0)
        state = tx.init(grads)
        assert state.stats.norm.dtype == jnp.float64
        _, new = jax.jit(tx.update)(grads, state)
        assert new.stats.norm.dtype == jnp.float64
        assert float(new.stats.norm) == pytest.approx(math.sqrt(27.0), rel=1e-12)
    finally:
        jax.config.update("jax_enable_x64", previous)


def test_adagc_state_keeps_its_dtype_through_scan():
    # float32 params, float64 gradients (x64): the EMA stayed float32 in init
    # and became float64 in update, which lax.scan refuses as a carry.
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        params = {"w": jnp.ones(3, jnp.float32)}
        grads = jnp.ones((2, 3), jnp.float64)
        tx = gco.adagc(warmup_steps=1)
        state = tx.init(params)

        def step(s, g):
            return tx.update({"w": g}, s, params)[1], None

        final, _ = jax.lax.scan(step, state, grads)
        assert final.clipper.ema.dtype == state.clipper.ema.dtype == jnp.float32
    finally:
        jax.config.update("jax_enable_x64", previous)


def test_update_with_a_different_tree_is_a_clear_error():
    tx = gco.clip_by_norm(1.0)
    state = tx.init([jnp.ones(2), jnp.ones(3)])
    with pytest.raises(ValueError, match="same leaves"):
        tx.update([jnp.ones(2)], state)


# ------------------------------------------------------------------- nonfinite

_STEPS = ["ok", "nan", "inf", "nan", "ok", "ok", "inf", "ok"]


def _grads(kind, seed):
    g = _tree(seed, scale=2.0)
    if kind == "nan":
        g["b"] = g["b"].at[1].set(jnp.nan)
    elif kind == "inf":
        g["layers"][0] = g["layers"][0].at[0, 2].set(-jnp.inf)
    return g


@pytest.mark.parametrize("jit", [False, True])
def test_skip_counts_like_apply_if_finite(jit):
    ours = gco.clip_by_global_norm(1.0, eps=0.0, nonfinite="skip")
    ref = optax.apply_if_finite(optax.clip_by_global_norm(1.0), max_consecutive_errors=100)
    wrap = jax.jit if jit else (lambda f: f)
    up_ours, up_ref = wrap(ours.update), wrap(ref.update)
    s_ours, s_ref = ours.init(_tree()), ref.init(_tree())
    counts = []
    for seed, kind in enumerate(_STEPS):
        grads = _grads(kind, seed)
        u_ours, s_ours = up_ours(grads, s_ours)
        u_ref, s_ref = up_ref(grads, s_ref)
        _close(u_ours, u_ref)
        assert _zeros(u_ours) == (kind != "ok")
        for field in ("notfinite_count", "last_finite", "total_notfinite"):
            assert int(getattr(s_ours, field)) == int(getattr(s_ref, field)), (seed, field)
            assert getattr(s_ours, field).dtype == getattr(s_ref, field).dtype
        assert bool(s_ours.stats.finite) == (kind == "ok")
        counts.append(int(s_ours.notfinite_count))
    assert counts == [0, 1, 2, 3, 0, 0, 1, 0]
    assert int(s_ours.total_notfinite) == 4


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_skip_zeroes_every_transform(name):
    tx = TRANSFORMS[name](nonfinite="skip")
    update = jax.jit(tx.update)
    state = tx.init(_tree())
    for seed, kind in enumerate(_STEPS[:4]):
        grads = _grads(kind, seed)
        out, state = update(grads, state)
        assert _zeros(out) == (kind != "ok"), (seed, kind)
        if kind == "ok":
            want, _ = TRANSFORMS[name]().update(grads, tx.init(grads))
            _close(out, want)
    assert int(state.notfinite_count) == 3
    assert int(state.total_notfinite) == 3
    assert not bool(state.last_finite)


def test_skip_in_a_chain_zeroes_the_gradient_not_the_step():
    # Documented: a stateful optimizer after the clip still steps on zeros.
    params = {"w": jnp.ones(2)}
    tx = optax.chain(gco.clip_by_global_norm(1.0, nonfinite="skip"), optax.sgd(0.1, momentum=0.9))
    state = tx.init(params)
    _, state = tx.update({"w": jnp.asarray([1.0, 1.0])}, state, params)
    out, state = tx.update({"w": jnp.asarray([jnp.nan, 1.0])}, state, params)
    assert np.all(np.isfinite(np.asarray(out["w"]))) and not _zeros(out)  # momentum
    assert int(gco.find_state(state).total_notfinite) == 1


def test_propagate_and_zero_pass_through_and_count():
    grads = _grads("nan", 0)
    for policy in ("propagate", "zero"):
        tx = gco.clip_by_global_norm(1.0, nonfinite=policy)
        out, state = tx.update(grads, tx.init(grads))
        want, want_stats = gc.clip_by_global_norm(grads, 1.0, nonfinite=policy)
        _close(out, want)
        _close(state.stats, want_stats)
        assert int(state.total_notfinite) == 1 and not bool(state.last_finite)
    assert np.isnan(np.asarray(out["b"])).sum() == 0  # "zero" dropped the NaN


def test_value_stats_with_nonfinite_and_bounds():
    tx = gco.clip_by_value(lo=-1.0, hi=2.0)
    grads = [jnp.asarray([jnp.nan, -4.0, 0.5]), jnp.asarray([1.0])]
    out, state = tx.update(grads, tx.init(grads))
    np.testing.assert_array_equal(np.asarray(out[0]), [np.nan, -1.0, 0.5])
    assert math.isnan(float(state.stats.norm))
    assert bool(state.stats.clipped)  # -4 was clamped though a NaN is present
    assert not bool(state.stats.finite)
    tx = gco.clip_by_value(lo=-1.0, hi=2.0, nonfinite="zero")
    _, state = tx.update(grads, tx.init(grads))
    assert float(state.stats.norm) == 4.0
    assert float(state.stats.scale) == pytest.approx(0.25)  # max |g|: 4 before, 1 after
    tx = gco.clip_by_value(lo=0.5)  # raising small entries: the inf-norm can grow
    _, state = tx.update([jnp.asarray([0.1, 0.2])], tx.init([jnp.zeros(2)]))
    assert bool(state.stats.clipped) and float(state.stats.scale) == pytest.approx(2.5)
    tx = gco.clip_by_value(1.0)
    _, state = tx.update([jnp.asarray([0.1, -0.2])], tx.init([jnp.zeros(2)]))
    assert not bool(state.stats.clipped) and float(state.stats.scale) == 1.0


@pytest.mark.parametrize("jit", [False, True])
def test_value_stats_use_the_bound_the_leaf_has(jit):
    # The extremes were compared with the unrounded bound: float16 0.09998
    # is not past 0.09995, which rounds to it, yet clipped was True and the
    # scale 0.9997, with the update unchanged.
    for kwargs, x in [
        ({"clip_value": 0.09995}, jnp.asarray([0.0999755859375, -0.02], jnp.float16)),
        ({"hi": 1.005}, jnp.asarray([1.0078125, 0.5], jnp.bfloat16)),
        ({"lo": -1.005}, jnp.asarray([-1.0078125, 0.5], jnp.bfloat16)),
    ]:
        tx = gco.clip_by_value(**kwargs)
        update = jax.jit(tx.update) if jit else tx.update
        out, state = update([x], tx.init([x]))
        np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(x))
        assert not bool(state.stats.clipped) and float(state.stats.scale) == 1.0
        assert float(state.stats.norm) == float(jnp.max(jnp.abs(x)))


@jax.tree_util.register_pytree_node_class
class _Box:
    """A JAX-registered node (as flax's FrozenDict or an equinox module is)."""

    def __init__(self, w):
        self.w = w

    def tree_flatten(self):
        return (self.w,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


@pytest.mark.parametrize(
    "make",
    [
        lambda: gco.clip_by_global_norm(1.0),
        lambda: gco.clip_by_norm(1.0),
        lambda: gco.clip_by_value(0.5),
        lambda: gco.clip_by_block_rms(1.0),
    ],
)
def test_an_eager_update_takes_numpy_updates(make):
    # As optax's transforms do: clip_by_block_rms raised "sharding='cpu' must
    # be a Sharding", and NumPy leaves in a JAX-registered node made the
    # node one leaf ("leaf <root> is a _Box, not an array").
    host = np.array([3.0, 4.0], np.float32)
    tx = make()
    for wrap in (lambda w: {"w": w}, _Box):
        want, want_state = tx.update(wrap(jnp.asarray(host)), tx.init(wrap(jnp.asarray(host))))
        got, state = tx.update(wrap(host), tx.init(wrap(host)))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert isinstance(a, jax.Array)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want_state), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_raise_outside_and_inside_jit():
    tx = gco.clip_by_global_norm(1.0, nonfinite="raise")
    state = tx.init(_tree())
    out, _ = tx.update(_tree(1), state)  # finite: fine outside jit
    assert _np_norm(out) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(gc.NonFiniteError, match=r"\['b'\]"):
        tx.update(_grads("nan", 0), state)
    with pytest.raises(TypeError, match=r'nonfinite="raise".*jax\.jit'):
        jax.jit(tx.update)(_tree(1), state)


@pytest.mark.parametrize("name", ["zclip", "autoclip", "adagc"])
def test_adaptive_raise_inits_and_raises_outside_jit(name):
    tx = getattr(gco, name)(nonfinite="raise")
    params = _tree()
    state = tx.init(params)  # traced to learn the stats' shapes: must not raise
    _, state = tx.update(_tree(1), state, params)
    with pytest.raises(gc.NonFiniteError, match=r"\['b'\]"):
        tx.update(_grads("nan", 0), state, params)


@pytest.mark.parametrize("name", ["zclip", "autoclip", "adagc"])
def test_adaptive_zero_counts_the_bad_step(name):
    # "zero" takes the NaN as 0 for the norm, but the step is still not finite:
    # counted, as clip_by_global_norm(nonfinite="zero") counts it.
    tx = getattr(gco, name)(nonfinite="zero")
    params = _tree()
    state = tx.init(params)
    out, state = jax.jit(tx.update)(_grads("nan", 0), state, params)
    clip = gco.find_state(state)
    assert not bool(jnp.all(clip.stats.finite))
    assert int(clip.total_notfinite) == 1 and int(clip.notfinite_count) == 1
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))


@pytest.mark.parametrize("name", ["zclip", "autoclip", "adagc", "agc"])
def test_adaptive_takes_numpy_params_and_a_numpy_state(name):
    # NumPy params (a checkpoint) make a JAX state, and a state restored as
    # NumPy arrays still updates eagerly.
    tx = getattr(gco, name)()
    params = jax.tree.map(np.asarray, _tree())
    state = tx.init(params)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
    _, state = tx.update(_tree(1), state, params)
    state = jax.tree.map(np.asarray, state)
    out, state = tx.update(_tree(2), state, params)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves((out, state)))


@pytest.mark.parametrize("name", [*TRANSFORMS, "zclip", "autoclip", "adagc", "agc", "per_example"])
def test_tree_map_params_over_a_chain(name):
    # optax.tree_map_params inits with a placeholder node that has no leaves:
    # gradclip refused it as a leaf that is not an array.
    if name in TRANSFORMS:
        clip = TRANSFORMS[name]()
    elif name == "per_example":
        clip = gco.per_example_clip(1.0)
    else:
        clip = getattr(gco, name)()
    tx = optax.chain(clip, optax.adam(1e-3))
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    state = tx.init(params)
    mapped = optax.tree_map_params(tx, lambda p: p.astype(jnp.bfloat16), state)
    adam = mapped[1][0]
    assert jax.tree.map(lambda x: x.dtype, adam.mu) == {"w": jnp.bfloat16, "b": jnp.bfloat16}
    assert jax.tree.structure(mapped) == jax.tree.structure(state)


ADAPTIVE_HYPERPARAMETERS = {
    "zclip": {"warmup_steps": 3, "z_thresh": 1.5, "max_grad_norm": 5.0},
    "autoclip": {"percentile": 50.0, "history_size": 4},
    "agc": {"clipping": 0.05},
    "adagc": {"warmup_steps": 2, "relative": 1.01, "max_grad_norm": 5.0},
}


@pytest.mark.parametrize("name", sorted(ADAPTIVE_HYPERPARAMETERS))
def test_adaptive_under_inject_hyperparams(name):
    # Every number becomes a (traced) array there: the steps match the
    # transform built with plain numbers, under jit and eagerly.
    kwargs = ADAPTIVE_HYPERPARAMETERS[name]
    factory = getattr(gco, name)
    plain, injected = factory(**kwargs), optax.inject_hyperparams(factory)(**kwargs)
    params = _tree()
    a, b = plain.init(params), injected.init(params)
    assert set(b.hyperparams) >= set(kwargs)
    for step in range(6):
        grads = _tree(step, scale=4.0 if step == 4 else 1.0)  # a spike at step 4
        update = jax.jit(injected.update) if step % 2 else injected.update
        want, a = plain.update(grads, a, params)
        got, b = update(grads, b, params)
        _close(got, want, rtol=1e-6)
    _close(gco.find_stats(b), gco.find_stats(a), rtol=1e-6)


def test_agc_under_inject_hyperparams_follows_a_schedule():
    tx = optax.inject_hyperparams(gco.agc)(clipping=optax.linear_schedule(0.01, 0.1, 1))
    params = {"w": jnp.ones((4, 2))}
    state = tx.init(params)
    grads = {"w": jnp.full((4, 2), 10.0)}
    first, state = tx.update(grads, state, params)  # clipping 0.01: unit norm 0.02
    second, state = tx.update(grads, state, params)  # clipping 0.1: unit norm 0.2
    np.testing.assert_allclose(float(jnp.linalg.norm(first["w"][:, 0])), 0.02, rtol=1e-5)
    np.testing.assert_allclose(float(jnp.linalg.norm(second["w"][:, 0])), 0.2, rtol=1e-5)


def test_agc_axis_is_static_under_inject_hyperparams():
    with pytest.raises(TypeError, match=r"static_args=\('axis',\)"):
        optax.inject_hyperparams(gco.agc)(axis=0).init({"w": jnp.ones((4, 2))})
    tx = optax.inject_hyperparams(gco.agc, static_args=("axis",))(axis=0)
    params = {"w": jnp.ones((4, 2))}
    tx.update({"w": jnp.ones((4, 2))}, tx.init(params), params)


@pytest.mark.parametrize(
    ("name", "field"), [("zclip", "warmup_steps"), ("autoclip", "history_size")]
)
def test_state_sizes_are_static_under_a_jitted_inject_hyperparams_init(name, field):
    params = {"w": jnp.ones(3)}
    injected = optax.inject_hyperparams(getattr(gco, name))
    with pytest.raises(TypeError, match=rf"{field} sizes the state.*static_args=\('{field}',\)"):
        jax.jit(injected(**{field: 2}).init)(params)
    state = jax.jit(
        optax.inject_hyperparams(getattr(gco, name), static_args=(field,))(**{field: 2}).init
    )(params)
    assert jax.tree_util.tree_leaves(state)


# ------------------------------------------------------------------ find_stats


def test_find_stats_in_nested_states():
    clip = gco.clip_by_global_norm(1.0)
    params = _tree()
    grads = _tree(3, scale=4.0)
    want = _np_norm(grads)
    # The clip comes first wherever it sits, so it sees the raw gradients.
    builds = {
        "[0]": optax.chain(clip, optax.adam(1e-3)),
        "['clip']": optax.named_chain(("clip", clip), ("adam", optax.adam(1e-3))),
        ".inner_opt_state[1]": optax.MultiSteps(
            optax.chain(optax.identity(), clip, optax.sgd(0.1)), 1
        ),
        ".inner_state": optax.inject_hyperparams(gco.clip_by_global_norm)(max_norm=1.0),
        ".inner_state[0]": optax.apply_if_finite(optax.chain(clip, optax.sgd(0.1)), 3),
        ".inner_opt_state.inner_state[1]": optax.MultiSteps(
            optax.inject_hyperparams(
                lambda learning_rate: optax.chain(optax.identity(), clip, optax.sgd(learning_rate))
            )(learning_rate=0.1),
            1,
        ),
        "": clip,
    }
    for path, tx in builds.items():
        state = tx.init(params)
        assert list(gco.find_all_states(state)) == [path]
        assert float(gco.find_stats(state).norm) == 0.0  # init
        _, state = tx.update(grads, state, params)
        assert float(gco.find_stats(state).norm) == pytest.approx(want, rel=RTOL), path
        assert gco.find_state(state) is gco.find_all_states(state)[path]


def test_find_stats_none_and_several():
    params = _tree()
    with pytest.raises(LookupError, match=r"no gradclip\.optax state"):
        gco.find_stats(optax.adam(1e-3).init(params))
    tx = optax.chain(gco.clip_by_value(1.0), optax.adam(1e-3), gco.clip_by_global_norm(1.0))
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"2 gradclip.optax states.*'\[0\]', '\[2\]'"):
        gco.find_stats(state)
    _, state = tx.update(_tree(1, scale=5.0), state, params)
    found = gco.find_all_states(state)
    assert list(found) == ["[0]", "[2]"]
    assert float(found["[0]"].stats.norm) > 1.0  # inf-norm of the raw gradient
    assert float(found["[2]"].stats.norm) > 0.0


# -------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: gco.clip_by_global_norm(-1.0), ValueError, "max_norm must be a number >= 0"),
        (lambda: gco.clip_by_global_norm(float("nan")), ValueError, "max_norm"),
        (lambda: gco.clip_by_global_norm(True), TypeError, "max_norm must be a number"),
        (lambda: gco.clip_by_global_norm("1"), TypeError, "max_norm"),
        (lambda: gco.clip_by_global_norm(jnp.ones(2)), ValueError, "max_norm must be a scalar"),
        (lambda: gco.clip_by_global_norm(1.0, nonfinite="ignore"), ValueError, "nonfinite"),
        (lambda: gco.clip_by_global_norm(1.0, ord=-1.0), ValueError, "ord must be"),
        (lambda: gco.clip_by_global_norm(1.0, eps=-1.0), ValueError, "eps must be"),
        (lambda: gco.clip_by_global_norm(1.0, ord=jnp.asarray(2.0)), TypeError, "static_args"),
        (lambda: gco.clip_by_norm(-0.5), ValueError, "max_norm must be a number >= 0"),
        (lambda: gco.clip_by_norm(1.0, nonfinite="nan"), ValueError, "nonfinite"),
        (lambda: gco.clip_by_block_rms(-1.0), ValueError, "threshold"),
        (lambda: gco.clip_by_block_rms(1.0, nonfinite=None), ValueError, "nonfinite"),
        (lambda: gco.clip_by_value(-1.0), ValueError, "clip_value"),
        (lambda: gco.clip_by_value(), TypeError, "give clip_value"),
        (lambda: gco.clip_by_value(1.0, lo=0.0), TypeError, "not both"),
        (lambda: gco.clip_by_value(lo=1.0, hi=0.0), ValueError, "lo must be <= hi"),
        (lambda: gco.clip_by_value(1.0, nonfinite="drop"), ValueError, "nonfinite"),
    ],
)
def test_bad_input_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    ("make", "batched"),
    [
        (lambda: gco.clip_by_global_norm(1.0), False),
        (lambda: gco.zclip(warmup_steps=2), False),
        (lambda: gco.autoclip(history_size=4), False),
        (lambda: gco.adagc(warmup_steps=2), False),
        (lambda: gco.agc(clipping=0.1, layout="jax"), False),
        (lambda: gco.per_example_clip(1.0, per_layer=True), True),
    ],
    ids=["global", "zclip", "autoclip", "adagc", "agc", "per_example"],
)
def test_the_state_can_be_donated_to_a_jitted_step(make, batched):
    # init gave two fields one array (ZClip's mean and std, the counters):
    # XLA refused "to donate the same buffer twice".
    params = _tree()
    tx = optax.chain(make(), optax.adam(1e-3))
    state = tx.init(params)
    buffers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
    assert len(set(buffers)) == len(buffers)
    step = jax.jit(tx.update, donate_argnums=(1,))
    for k in range(3):
        grads = _tree(seed=k + 1)
        if batched:  # a batch of two examples on axis 0
            grads = jax.tree.map(lambda g: jnp.stack([g, 2 * g]), grads)
        _, state = step(grads, state, params)
    jax.block_until_ready(state)
