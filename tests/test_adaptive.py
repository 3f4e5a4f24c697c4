"""gradclip.adaptive: ZClip, AutoClip, AGC and AdaGC against their references, on every backend."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import gradclip as gc
from conftest import importorskip, selected_backends
from gradclip.adaptive import AGC, AdaGC, AutoClip, ZClip

# A run's gradient norms: steady around 3, with spikes and a slow drift.
SPIKES = {30: 40.0, 34: 15.0, 41: 80.0}


def _sequence(steps=48, seed=0, nan_at=None):
    rng = np.random.default_rng(seed)
    shapes = [(6, 5), (5,), (3, 4)]
    out = []
    for t in range(steps):
        scale = 0.5 * (1 + 0.01 * t) * SPIKES.get(t, 1.0) * (1 + 0.2 * rng.standard_normal())
        tree = [rng.standard_normal(s) * scale for s in shapes]
        if t == nan_at:
            tree[1][2] = np.nan
        out.append(tree)
    return out


def _f32_norm(tree):
    """The float64 norm of the leaves rounded to float32, as the backends hold them."""
    return math.sqrt(
        sum(float(np.sum(np.asarray(a, np.float32).astype(np.float64) ** 2)) for a in tree)
    )


def _settle(state):
    """Dask: persist the state, whose graph would otherwise grow with every step."""
    return type(state)(*(x.persist() if hasattr(x, "persist") else x for x in state))


def _run(clipper, xp, seq, *, inplace=False, params=None):
    """Norms, scales and clipped leaves (NumPy, float64) of a run on backend ``xp``."""
    state = clipper.init([xp.array(a, "float32") for a in seq[0]])
    rows = []
    for tree in seq:
        leaves = [xp.array(a, "float32") for a in tree]
        if inplace:
            state, stats = clipper.update_(leaves, state, params)
            out = leaves
        else:
            out, state, stats = clipper.update(leaves, state, params)
        state = _settle(state)
        rows.append(
            (
                np.asarray(xp.numpy(stats.norm), np.float64),
                np.asarray(xp.numpy(stats.scale), np.float64),
                [xp.numpy(x).astype(np.float64) for x in out],
            )
        )
    return rows, state


# ---------------------------------------------------------------------- ZClip


ZCLIP_CONFIGS = {
    "zscore-adaptive": {},
    "zscore-mean": {"clip_option": "mean"},
    "percentile": {"mode": "percentile"},
    "skip-update": {"skip_update_on_spike": True},
    "no-cap": {"max_grad_norm": None},
    "factor": {"clip_factor": 0.7, "z_thresh": 2.0, "alpha": 0.9},
}


@pytest.mark.parametrize("config", list(ZCLIP_CONFIGS))
def test_zclip_matches_the_zclip_package(config):
    torch = importorskip("torch")
    zclip = importorskip("zclip")
    kwargs = {"warmup_steps": 10, "max_grad_norm": 30.0, **ZCLIP_CONFIGS[config]}
    seq = _sequence()
    model = torch.nn.ParameterList(
        [torch.nn.Parameter(torch.zeros(a.shape, dtype=torch.float32)) for a in seq[0]]
    )
    theirs = zclip.ZClip(**kwargs)
    ours = ZClip(**kwargs)
    state = ours.init([p.detach() for p in model])
    clipped_steps = 0
    for t, tree in enumerate(seq):
        grads = [torch.tensor(a, dtype=torch.float32) for a in tree]
        for p, g in zip(model, grads, strict=True):
            p.grad = g.clone()
        their_norm = theirs.step(model)
        state, stats = ours.update_(grads, state)
        assert float(stats.norm) == pytest.approx(their_norm, rel=1e-6), t
        clipped_steps += bool(stats.clipped)
        for p, g in zip(model, grads, strict=True):
            torch.testing.assert_close(g, p.grad, rtol=2e-6, atol=0, msg=f"step {t}")
    assert clipped_steps >= 2  # the spikes were clipped: the comparison meant something
    if theirs.mean is not None:
        assert float(state.mean) == pytest.approx(theirs.mean, rel=1e-5)
        assert float(state.var) == pytest.approx(theirs.var, rel=1e-4)


def test_zclip_same_on_every_backend(xp):
    clipper = ZClip(warmup_steps=10, max_grad_norm=30.0)
    seq = _sequence()
    ref, _ = _run(clipper, _NumpyF32(), seq)
    got, state = _run(clipper, xp, seq)
    for t, (a, b) in enumerate(zip(got, ref, strict=True)):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5, err_msg=str(t))
        np.testing.assert_allclose(a[1], b[1], rtol=1e-5, err_msg=str(t))
        for x, y in zip(a[2], b[2], strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    assert int(np.asarray(xp.numpy(state.skipped))) == 0


def test_zclip_statistics_do_not_overflow(xp):
    # ZClip is scale-free: norms 1e19 times larger clip the same steps by the
    # same factors. The variance of such norms is past float32's range; it
    # was kept as such, came out inf, and no spike was seen after the warm-up.
    clipper = ZClip(warmup_steps=10, max_grad_norm=None)
    seq = _sequence()
    ref, _ = _run(clipper, xp, seq)
    got, state = _run(clipper, xp, [[a * 1e19 for a in tree] for tree in seq])
    assert sum(float(r[1]) < 1 for r in ref) >= 2  # spikes were clipped
    for t, (a, b) in enumerate(zip(got, ref, strict=True)):
        np.testing.assert_allclose(a[1], b[1], rtol=1e-4, err_msg=str(t))
    std = float(np.asarray(xp.numpy(state.std)))
    assert math.isfinite(std) and std > 1e18


def test_zclip_warmup_mean_does_not_overflow():
    # 25 float32 norms of 2e37 sum past float32's range: the mean was inf,
    # then the deviation, for good, and no spike was seen again.
    clipper = ZClip(warmup_steps=25, max_grad_norm=None)
    state = clipper.init([np.ones(4, np.float32)])
    for i in range(25):
        value = 1e37 * (1 + 0.01 * (i % 3))
        _, state, _ = clipper.update([np.full(4, value, np.float32)], state)
    assert 2e37 < float(state.mean) < 2.1e37 and math.isfinite(float(state.std))
    _, state, stats = clipper.update([np.full(4, 1e38, np.float32)], state)  # a 10x spike
    assert bool(stats.clipped)


@pytest.mark.parametrize(
    "clipper",
    [
        ZClip(alpha=np.float64(0.97), warmup_steps=2),
        ZClip(z_thresh=np.float64(2.5), warmup_steps=2),
    ],
    ids=["alpha", "z_thresh"],
)
def test_zclip_state_keeps_its_dtype(clipper):
    # A float64 hyperparameter promoted a float32 state to float64, and a
    # state whose dtype changes breaks lax.scan.
    grads = [np.ones(4, np.float32)]
    state = clipper.init(grads)
    want = [x.dtype for x in state]
    for scale in (1.0, 1.1, 0.9, 50.0):
        _, state, _ = clipper.update([g * scale for g in grads], state)
        assert [x.dtype for x in state] == want


def test_zclip_loads_a_state_dict_with_the_variance():
    # ZClipState kept the variance before it kept the deviation.
    clipper = ZClip(warmup_steps=3)
    grads = [np.ones(3, np.float32)]
    state = clipper.init(grads)
    for scale in (1.0, 2.0, 3.0, 4.0):
        _, state, _ = clipper.update([g * scale for g in grads], state)
    saved = clipper.state_dict(state)
    old = {k: v for k, v in saved.items() if k != "std"} | {"var": np.asarray(saved["std"]) ** 2}
    loaded = clipper.load_state_dict(old, grads)
    np.testing.assert_allclose(loaded.std, state.std, rtol=1e-6)


def test_zclip_nan_never_enters_the_statistics():
    torch = importorskip("torch")
    zclip = importorskip("zclip")
    seq = _sequence(nan_at=20)
    ours = ZClip(warmup_steps=10, nonfinite="skip")
    state = ours.init(seq[0])
    for t, tree in enumerate(seq):
        before = state
        out, state, stats = ours.update(tree, state)
        if t == 20:
            assert not bool(stats.finite) and float(stats.scale) == 1.0
            assert float(state.mean) == float(before.mean)
            assert float(state.var) == float(before.var)
            np.testing.assert_array_equal(out[1], tree[1])
    assert int(state.skipped) == 1
    assert math.isfinite(float(state.mean)) and math.isfinite(float(state.var))
    # The zclip package's statistics are NaN from that step on.
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(a.shape)) for a in seq[0]])
    theirs = zclip.ZClip(warmup_steps=10)
    for tree in seq:
        for p, a in zip(model, tree, strict=True):
            p.grad = torch.tensor(a, dtype=torch.float32)
        theirs.step(model)
    assert math.isnan(theirs.mean)


def test_zclip_under_jit():
    jax = importorskip("jax")
    jnp = jax.numpy
    clipper = ZClip(warmup_steps=10, max_grad_norm=30.0)
    seq = _sequence()
    step = jax.jit(clipper.update)
    state = clipper.init([jnp.asarray(a, jnp.float32) for a in seq[0]])
    ref, _ = _run(clipper, _NumpyF32(), seq)
    for t, tree in enumerate(seq):
        out, state, stats = step([jnp.asarray(a, jnp.float32) for a in tree], state)
        assert float(stats.norm) == pytest.approx(float(ref[t][0]), rel=1e-5)
        np.testing.assert_allclose(np.asarray(out[0]), ref[t][2][0], rtol=1e-5, atol=1e-7)


def test_zclip_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="mode"):
        ZClip(mode="median")
    assert ZClip(mode="Percentile") == ZClip(mode="percentile")  # as the zclip package
    ZClip(mode="percentile", clip_option=None)  # which ignores clip_option there
    with pytest.raises(ValueError, match="clip_option"):
        ZClip(clip_option="max")
    with pytest.raises(ValueError, match="warmup_steps"):
        ZClip(warmup_steps=0)


NAN = float("nan")
BAD_HYPERPARAMETERS = [
    (ZClip, "z_thresh", NAN),
    (ZClip, "z_thresh", 0.0),
    (ZClip, "clip_factor", -1.0),
    (ZClip, "eps", -1.0),
    (ZClip, "alpha", NAN),
    (ZClip, "max_grad_norm", NAN),
    (ZClip, "warmup_steps", 2.5),
    (AutoClip, "percentile", NAN),
    (AutoClip, "history_size", 0.5),
    (AdaGC, "max_grad_norm", -1.0),
    (AdaGC, "max_grad_norm", NAN),
    (AdaGC, "max_grad_norm", None),
    (AdaGC, "warmup_steps", 1.5),
    (AdaGC, "relative", NAN),
]


@pytest.mark.parametrize(("cls", "field", "value"), BAD_HYPERPARAMETERS)
def test_bad_hyperparameters_raise(cls, field, value):
    # (A negative clip_factor or max_grad_norm reversed the gradient; a NaN
    # z_thresh or eps turned spike detection off, silently.)
    extra = {"layout": "jax"} if cls is AGC else {}
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        cls(**{field: value}, **extra)


def test_agc_rejects_bad_hyperparameters():
    for field, value in (("clipping", NAN), ("eps", -1.0)):
        with pytest.raises(ValueError, match=rf"^{field} must be"):
            AGC(layout="jax", **{field: value})
    g, w = [np.ones((2, 3))], [np.ones((2, 3))]
    for axis in (2, -3, (0, 3)):  # were taken modulo the rank: another axis, silently
        with pytest.raises(
            ValueError, match=r"AGC.update: axis -?\d is out of range for leaf \[0\]"
        ):
            AGC(axis=axis).update(g, (), params=w)
    # An axis named twice: refused on a leaf that is one unit larger than a
    # block too, which is reduced in flat blocks (it was clipped, in place).
    for n in (6, 2**20 + 5):
        g = [np.ones(n, np.float32)]
        with pytest.raises(ValueError, match=r"AGC.update_: axis \(0, -1\) names an axis twice"):
            AGC(axis=(0, -1)).update_(g, (), params=[np.full(n, 0.01, np.float32)])
        np.testing.assert_array_equal(g[0], 1.0)


def test_adagc_warmup_does_not_overflow(xp):
    # The global norm from the per-leaf ones: their squares overflow float32.
    g = {"a": xp.array(np.full(4, 1e20), "float32"), "b": xp.array(np.full(4, 1e20), "float32")}
    want, _ = gc.clip_by_global_norm(g, max_norm=1.0)
    clipper = AdaGC(warmup_steps=10)
    out, state, _ = clipper.update(g, clipper.init(g))
    for k in g:
        np.testing.assert_allclose(xp.numpy(out[k]), xp.numpy(want[k]), rtol=1e-6)
    np.testing.assert_allclose(xp.numpy(state.ema), [0.5**0.5] * 2, rtol=1e-6)


@pytest.mark.parametrize("value", [1e20, 1e-25])
def test_agc_stats_do_not_overflow(xp, value):
    # The tree's norm from its unit norms: squared in float32 (JAX without
    # x64) they overflowed past 1.8e19 (norm inf, scale 0, finite True) and
    # vanished below 1e-23.
    g = [xp.array(np.full((3, 4), value), "float32"), xp.array(np.full(5, value), "float32")]
    p = [xp.array(np.ones((3, 4)), "float32"), xp.array(np.ones(5), "float32")]
    agc = AGC(layout="jax")
    _, _, stats = agc.update(g, agc.init(g), params=p)
    np.testing.assert_allclose(float(xp.numpy(stats.norm)), value * math.sqrt(17), rtol=1e-6)
    clipped = value > 1
    want = 0.01 * math.sqrt(17) / (value * math.sqrt(17)) if clipped else 1.0
    np.testing.assert_allclose(float(xp.numpy(stats.scale)), want, rtol=1e-5)
    assert bool(xp.numpy(stats.clipped)) == clipped and bool(xp.numpy(stats.finite))


# ------------------------------------------------------------------- AutoClip


@pytest.mark.parametrize(("percentile", "size"), [(10.0, 1000), (50.0, 1000), (90.0, 7)])
def test_autoclip_matches_numpy_percentile(xp, percentile, size):
    clipper = AutoClip(percentile=percentile, history_size=size)
    seq = _sequence(steps=30)
    got, _ = _run(clipper, xp, seq)
    history = []
    for t, tree in enumerate(seq):
        norm = math.sqrt(
            sum(float(np.sum(np.asarray(a, np.float32).astype(np.float64) ** 2)) for a in tree)
        )
        history.append(norm)
        threshold = np.percentile(history[-size:], percentile)
        want = min(1.0, threshold / (norm + 1e-6))
        assert float(got[t][1]) == pytest.approx(want, rel=1e-5), t


def test_autoclip_skips_nan_and_counts_it():
    seq = _sequence(steps=12, nan_at=5)
    clipper = AutoClip(percentile=50.0, history_size=100)
    _, state = _run(clipper, _NumpyF32(), seq)
    assert int(state.skipped) == 1 and int(state.count) == 11
    assert np.all(np.isfinite(np.asarray(state.history)))


# ------------------------------------------------------------------------ AGC


def _timm_agc(params, grads, clip_factor=0.01, eps=1e-3):
    """timm's adaptive_clip_grad (timm/utils/agc.py), in float64 NumPy."""
    out = []
    for p, g in zip(params, grads, strict=True):
        axes = None if p.ndim <= 1 else tuple(range(1, p.ndim))
        p_norm = np.sqrt(np.sum(p**2, axis=axes, keepdims=axes is not None))
        g_norm = np.sqrt(np.sum(g**2, axis=axes, keepdims=axes is not None))
        max_norm = np.maximum(p_norm, eps) * clip_factor
        clipped = g * (max_norm / np.maximum(g_norm, 1e-6))
        out.append(np.where(g_norm < max_norm, g, clipped))
    return out


def _agc_tree(seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(8, 5), (5,), (3, 3, 4, 6), ()]
    params = [rng.standard_normal(s) for s in shapes]
    grads = [rng.standard_normal(s) * rng.choice([0.001, 0.5], size=s) for s in shapes]
    return params, grads


def test_agc_torch_layout_matches_timm(xp):
    params, grads = _agc_tree()
    want = _timm_agc(params, grads)
    agc = AGC(layout="torch")
    g = [xp.array(a, "float64") if xp.has("float64") else xp.array(a, "float32") for a in grads]
    p = [xp.array(a, "float64") if xp.has("float64") else xp.array(a, "float32") for a in params]
    out, _, stats = agc.update(g, agc.init(g), params=p)
    for a, b in zip(out, want, strict=True):
        np.testing.assert_allclose(xp.numpy(a), b, rtol=1e-5, atol=1e-12)
    assert bool(stats.clipped)


@pytest.mark.parametrize("layout", ["torch", "jax"])
def test_agc_on_dask_rows_of_unknown_count(layout):
    # Boolean indexing leaves dask's row count NaN: the torch layout's row
    # norms were raveled for the stats, which dask refuses at that shape.
    da = importorskip("dask.array")
    params, grads = _agc_tree()
    pick = lambda a: a[a[:, 0] > -10] if a.ndim == 2 else a  # noqa: E731 (every row)
    lazy = [pick(da.from_array(a, chunks=2)) for a in grads]
    weights = [pick(da.from_array(a, chunks=2)) for a in params]
    assert any(math.isnan(a.shape[0]) for a in lazy)
    agc = AGC(layout=layout)
    out, _, stats = agc.update(lazy, agc.init(lazy), params=weights)
    want, _, want_stats = agc.update(grads, agc.init(grads), params=params)
    for a, b in zip(out, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-12)
    for a, b in zip(stats, want_stats, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-12)


def test_agc_jax_layout_matches_optax():
    jax = importorskip("jax")
    optax = importorskip("optax")
    jnp = jax.numpy
    params, grads = _agc_tree(1)
    rng = np.random.default_rng(4)
    for shape in [(4, 3, 5), (2, 3, 3, 4, 5), (1, 7, 1)]:  # multi-head, DHWIO, a vector
        params.append(rng.standard_normal(shape))
        grads.append(rng.standard_normal(shape) * rng.choice([0.001, 0.5], size=shape))
    p = [jnp.asarray(a, jnp.float32) for a in params]
    g = [jnp.asarray(a, jnp.float32) for a in grads]
    tx = optax.adaptive_grad_clip(0.01, eps=1e-3)
    want, _ = tx.update(g, tx.init(p), p)
    agc = AGC(layout="jax")
    got, _, _ = jax.jit(agc.update)(g, agc.init(g), p)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


def test_agc_layouts_agree_on_transposed_weights():
    params, grads = _agc_tree(2)
    agc_t, agc_j = AGC(layout="torch"), AGC(layout="jax")
    p, g = params[0], grads[0]  # (out=8, in=5) in torch's layout
    out_t, _, _ = agc_t.update([g], agc_t.init([g]), params=[p])
    out_j, _, _ = agc_j.update([g.T], agc_j.init([g.T]), params=[p.T])
    np.testing.assert_allclose(out_j[0].T, out_t[0], rtol=1e-12)
    conv = params[2]  # OIHW (3, 3, 4, 6) -> HWIO
    gc_ = grads[2]
    out_t, _, _ = agc_t.update([gc_], (), params=[conv])
    hwio = (2, 3, 1, 0)
    out_j, _, _ = agc_j.update([gc_.transpose(hwio)], (), params=[conv.transpose(hwio)])
    np.testing.assert_allclose(out_j[0].transpose(np.argsort(hwio)), out_t[0], rtol=1e-12)


def test_agc_in_place_and_errors(mutable_xp):
    xp = mutable_xp
    params, grads = _agc_tree(3)
    want = _timm_agc(params[:2], grads[:2])
    g = [xp.array(a, "float32") for a in grads[:2]]
    agc = AGC(layout="torch")
    agc.update_(g, agc.init(g), params=[xp.array(a, "float32") for a in params[:2]])
    for a, b in zip(g, want, strict=True):
        np.testing.assert_allclose(xp.numpy(a), b, rtol=1e-5, atol=1e-7)
    with pytest.raises(TypeError, match="params="):
        agc.update(g, (), None)
    with pytest.raises(ValueError, match=r"leaf \[1\] has shape"):
        agc.update(g, (), params=[xp.array(params[0], "float32")] * 2)
    # Parameters from another library: named, before anything is written.
    other = np if xp.name != "numpy" else importorskip("torch")
    before = [xp.numpy(a).copy() for a in g]
    with pytest.raises(TypeError, match=r"parameter of leaf \[1\] is a (numpy|torch) array"):
        agc.update_(g, (), params=[g[0], other.ones(params[1].shape)])
    for a, b in zip(g, before, strict=True):
        np.testing.assert_array_equal(xp.numpy(a), b)
    with pytest.raises(ValueError, match="layout"):
        AGC()
    six = [xp.array(np.ones((2,) * 6), "float32")]
    with pytest.raises(ValueError, match=r"leaf \[0\] has 6 dimensions"):
        AGC(layout="jax").update(six, (), params=six)
    # An empty tree comes back as itself, like every other gradclip function.
    assert agc.update({}, (), params={})[0] == {}


def test_agc_skips_the_parameters_of_none_gradients(xp):
    # A frozen or unused parameter has grad None; timm skips it, and
    # [p.grad for p in params] must still pair with params.
    params, grads = _agc_tree(6)
    agc = AGC(layout="torch")
    p = [xp.array(a, "float32") for a in params]
    g = [xp.array(a, "float32") for a in grads]
    want, _, want_stats = agc.update([g[0], g[2]], (), params=[p[0], p[2]])
    out, _, stats = agc.update([g[0], None, g[2], None], (), params=p)
    assert out[1] is None and out[3] is None
    for a, b in zip((out[0], out[2]), want, strict=True):
        np.testing.assert_array_equal(xp.numpy(a), xp.numpy(b))
    np.testing.assert_array_equal(xp.numpy(stats.norm), xp.numpy(want_stats.norm))
    # By the gradients' structure: a None may stand for a whole frozen subtree.
    tree = {"frozen": None, "b": g[0], "c": g[2]}
    weights = {"frozen": {"w": p[1], "v": p[3]}, "b": p[0], "c": p[2]}
    out, _, _ = agc.update(tree, (), params=weights)
    assert out["frozen"] is None
    np.testing.assert_array_equal(xp.numpy(out["b"]), xp.numpy(want[0]))
    np.testing.assert_array_equal(xp.numpy(out["c"]), xp.numpy(want[1]))
    # Structures that do not match still fail, clearly.
    with pytest.raises(ValueError, match="gradient"):
        agc.update([g[0], None, g[2]], (), params=p)
    with pytest.raises(ValueError, match="gradient"):
        agc.update({"a": None, "b": g[0]}, (), params={"b": p[0], "c": p[1], "d": p[2]})
    # A None parameter pairs by position too: g[0] has none here, though
    # the counts agree and the one parameter there has its shape.
    with pytest.raises(ValueError, match=r"gradient at \[0\] has no parameter"):
        agc.update([g[0], None], (), params=[None, p[0]])


def test_agc_in_place_skips_none_gradients(mutable_xp):
    xp = mutable_xp
    params, grads = _agc_tree(7)
    agc = AGC(layout="torch")
    p = [xp.array(a, "float32") for a in params[:3]]
    g = [xp.array(grads[0], "float32"), None, xp.array(grads[2], "float32")]
    want, _, _ = agc.update([g[0], g[2]], (), params=[p[0], p[2]])
    agc.update_(g, (), params=iter(p))  # model.parameters() is a generator
    np.testing.assert_array_equal(xp.numpy(g[0]), xp.numpy(want[0]))
    np.testing.assert_array_equal(xp.numpy(g[2]), xp.numpy(want[1]))


def test_agc_builds_no_autograd_graph_from_torch_parameters():
    torch = importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    (model(torch.randn(5, 4)) * 100).sum().backward()
    params = list(model.parameters())
    agc = AGC(layout="torch")
    out, _, stats = agc.update([p.grad for p in params], (), params=params)
    for x in (*out, *stats):
        assert not x.requires_grad and x.grad_fn is None
    out[0].numpy()  # what a graph would forbid
    assert bool(stats.clipped)


@pytest.mark.parametrize("layout", ["jax", "torch"])
@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0)])
def test_agc_passes_zero_size_leaves_unchanged(xp, layout, shape):
    # optax.adaptive_grad_clip passes them; a unit with no entries has no norm.
    params, grads = _agc_tree(5)
    agc = AGC(layout=layout)
    g = [xp.array(np.zeros(shape), "float32"), xp.array(grads[0], "float32")]
    p = [xp.array(np.zeros(shape), "float32"), xp.array(params[0], "float32")]
    out, _, stats = agc.update(g, (), params=p)
    assert tuple(out[0].shape) == shape
    alone, _, want = agc.update(g[1:], (), params=p[1:])
    np.testing.assert_array_equal(xp.numpy(out[1]), xp.numpy(alone[0]))
    for name in ("norm", "scale", "clipped", "finite"):
        got, ref = (np.asarray(xp.numpy(getattr(s, name))) for s in (stats, want))
        np.testing.assert_array_equal(got, ref, err_msg=name)
    # A tree of nothing but empty leaves: nothing to clip, a norm of 0.
    out, _, stats = agc.update(g[:1], (), params=p[:1])
    assert tuple(out[0].shape) == shape
    assert float(np.asarray(xp.numpy(stats.norm))) == 0.0
    assert float(np.asarray(xp.numpy(stats.scale))) == 1.0


# ---------------------------------------------------------------------- AdaGC


def _adagc_reference(seq, relative, beta, warmup, cap):
    ema = None
    out = []
    for t, tree in enumerate(seq):
        norms = np.array(
            [np.sqrt(np.sum(np.asarray(a, np.float32).astype(np.float64) ** 2)) for a in tree]
        )
        if t < warmup:
            total = math.sqrt(float(np.sum(norms**2)))
            scales = np.full(len(tree), min(1.0, cap / (total + 1e-6)))
        else:
            thr = relative * ema
            scales = np.where(norms > thr, thr / np.where(norms > thr, norms, 1.0), 1.0)
        clipped = norms * scales
        if ema is None:
            ema = clipped
        elif t < warmup:  # the paper's Algorithm 1: the smallest clipped norm
            ema = np.minimum(ema, clipped)
        else:
            ema = beta * ema + (1 - beta) * clipped
        out.append(scales)
    return out


def test_adagc_matches_its_definition(xp):
    seq = _sequence(steps=30)
    clipper = AdaGC(warmup_steps=5, max_grad_norm=2.0)
    want = _adagc_reference(seq, 1.05, 0.98, 5, 2.0)
    state = clipper.init([xp.array(a, "float32") for a in seq[0]])
    for t, tree in enumerate(seq):
        out, state, stats = clipper.update([xp.array(a, "float32") for a in tree], state)
        state = _settle(state)
        np.testing.assert_allclose(xp.numpy(stats.scale), want[t], rtol=1e-5, err_msg=str(t))
        for a, b, s in zip(out, tree, want[t], strict=True):
            np.testing.assert_allclose(
                xp.numpy(a), np.asarray(b, np.float32) * s, rtol=2e-5, atol=1e-7
            )


def test_adagc_keeps_a_steady_tiny_gradient_unclipped(xp):
    # 1e-6 was added to each tensor's norm against its EMA: a tensor whose
    # norm is below it was clipped every step, and the EMA of its clipped
    # norms fell with the scale (to 3.8e-5 after 1000 steps here).
    tree = [xp.array(np.full(100, 0.01), "float32"), xp.array(np.full(100, 1e-7), "float32")]
    clipper = AdaGC(warmup_steps=1, max_grad_norm=1.0)
    state = clipper.init(tree)
    for _ in range(300):
        _, state, stats = clipper.update(tree, state)
        state = _settle(state)
    np.testing.assert_array_equal(xp.numpy(stats.scale), [1.0, 1.0])
    np.testing.assert_allclose(xp.numpy(state.ema), [0.1, 1e-6], rtol=1e-5)


def test_adagc_without_warmup_starts_the_ema_from_the_first_step(xp):
    # warmup_steps=0 behaves like 1: the first step has no EMA to clip
    # against, so it is clipped globally and its norms start the EMAs.
    seq = _sequence(steps=8)
    want = _adagc_reference(seq, 1.05, 0.98, 1, 2.0)
    clipper = AdaGC(warmup_steps=0, max_grad_norm=2.0)
    state = clipper.init([xp.array(a, "float32") for a in seq[0]])
    for t, tree in enumerate(seq):
        _, state, stats = clipper.update([xp.array(a, "float32") for a in tree], state)
        state = _settle(state)
        np.testing.assert_allclose(xp.numpy(stats.scale), want[t], rtol=1e-5, err_msg=str(t))
    assert np.all(np.asarray(xp.numpy(state.ema)) > 0)


def test_adagc_warmup_propagates_nan_as_clip_by_global_norm(xp):
    import gradclip as gc

    tree = [np.full(4, 3.0), np.array([np.nan, 1.0, 1.0, 1.0])]
    clipper = AdaGC(warmup_steps=5, max_grad_norm=1.0)  # nonfinite="propagate"
    leaves = [xp.array(a, "float32") for a in tree]
    out, state, stats = clipper.update(leaves, clipper.init(leaves))
    want, _ = gc.clip_by_global_norm([xp.array(a, "float32") for a in tree], 1.0)
    for a, b in zip(out, want, strict=True):
        np.testing.assert_array_equal(xp.numpy(a), xp.numpy(b))  # NaN, as torch gives
    assert np.all(np.isnan(xp.numpy(stats.scale)))
    assert int(np.asarray(xp.numpy(state.skipped))) == 1


def test_adagc_after_warmup_propagates_nan_as_clip_by_norm(xp):
    import gradclip as gc

    clipper = AdaGC(warmup_steps=1, max_grad_norm=100.0)  # nonfinite="propagate"
    leaves = [xp.array(np.full(4, 3.0), "float32"), xp.array(np.ones(4), "float32")]
    _, state, _ = clipper.update(leaves, clipper.init(leaves))
    tree = [np.array([np.nan, 1.0, 1.0, 1.0]), np.full(4, 10.0)]
    out, state, stats = clipper.update([xp.array(a, "float32") for a in tree], _settle(state))
    scale = np.asarray(xp.numpy(stats.scale))
    assert np.isnan(scale[0]) and 0 < scale[1] < 1  # the finite leaf is still clipped
    assert np.all(np.isnan(xp.numpy(out[0])))
    _, want = gc.clip_by_norm([xp.array(tree[0], "float32")], 1.0)
    assert np.isnan(np.asarray(xp.numpy(want.scale))[0])  # the same arithmetic
    assert int(np.asarray(xp.numpy(state.skipped))) == 1


@pytest.mark.parametrize("nonfinite", ["zero", "skip"])
def test_autoclip_on_dask_does_no_invalid_arithmetic_in_a_lazy_compute(nonfinite):
    # With no finite norm recorded yet every slot is +inf, and the percentile
    # interpolated between them (inf - inf) before being thrown away: NumPy's
    # warning in the caller's compute(), an error here.
    dask = importorskip("dask")
    da = importorskip("dask.array")
    clipper = AutoClip(nonfinite=nonfinite)
    tree = [da.from_array(np.array([1.0, np.nan, 3.0], np.float32), chunks=2)]
    out, state, stats = clipper.update(tree, clipper.init(tree))
    out, state, stats = dask.compute(out, state, stats)  # a warning here is an error
    assert int(state.skipped) == 1 and int(state.count) == 0
    assert float(stats.scale) == 1.0


@pytest.mark.parametrize("nonfinite", ["propagate", "zero", "skip"])
@pytest.mark.parametrize(
    "clipper",
    [ZClip(warmup_steps=1), AutoClip(), AdaGC(warmup_steps=1)],
    ids=["zclip", "autoclip", "adagc"],
)
@pytest.mark.parametrize("entries", [[np.inf, 1.0], [3e38, 3e38]], ids=["inf", "overflow"])
def test_an_inf_norm_is_counted_not_warned(xp, clipper, nonfinite, entries):
    """inf gradients (inf - inf in a statistic) raise no NumPy warning (errors here).

    Under every policy the step is counted and kept out of the statistics:
    under "zero" too, whose norm (the inf taken as 0) is finite. So is a
    step of finite entries whose float32 norm overflows, which "zero" took
    in (its norm of inf made ZClip's mean inf and AdaGC's EMA NaN for good).
    """
    clipper = dataclasses.replace(clipper, nonfinite=nonfinite)
    bad = [xp.array(entries, "float32")]
    for first in (True, False):  # AutoClip's empty history; the others after warm-up
        state = clipper.init(bad)
        if not first:
            _, state, _ = clipper.update([xp.array([1.0, 1.0], "float32")], state)
        before = state
        out, state, stats = clipper.update(bad, state)
        assert int(np.asarray(xp.numpy(state.skipped))) == 1
        assert not np.asarray(xp.numpy(stats.finite)).all()
        for name in state._fields:  # the statistics are as they were
            if name != "skipped":
                kept = xp.numpy(getattr(before, name)), xp.numpy(getattr(state, name))
                np.testing.assert_array_equal(*kept, err_msg=name)
        got = xp.numpy(out[0])
        if nonfinite == "zero" and np.isinf(entries).any():
            # (An overflowed norm is clip_by_global_norm's arithmetic: scale
            # 0, or NaN under AutoClip's empty history's infinite bound.)
            assert np.isfinite(got).all()
        if nonfinite == "skip":  # the gradients come back unchanged
            np.testing.assert_array_equal(got, np.asarray(entries, np.float32))


@pytest.mark.parametrize(
    "clipper",
    [ZClip(), AutoClip(), AGC(layout="jax"), AdaGC()],
    ids=["zclip", "autoclip", "agc", "adagc"],
)
def test_a_tree_without_arrays_passes_through(clipper):
    # As clip_by_global_norm({}) does; it raised "the tree has no array leaves"
    # (AGC: an IndexError), so optax.tree_map_params failed on its placeholder.
    for empty in ({}, [], {"a": None}):
        state = clipper.init(empty)
        out, new, stats = clipper.update(empty, state, params=empty)
        assert out == empty and new is state
        want = gc.clip_by_global_norm(empty, 1.0)[1]
        shape = (0,) if isinstance(clipper, AdaGC) else ()
        for got, w in zip(stats, want, strict=True):
            assert np.shape(got) == shape
            if not shape:
                assert got == w
        assert clipper.update_(empty, state, params=empty)[0] is state
    # (p.grad for p in params) on a step where no grad is set: its list, as
    # clip_by_global_norm gives, not the generator it had used up
    state = clipper.init({})
    out, _, _ = clipper.update((g for g in [None, None]), state, params=iter([None, None]))
    assert out == [None, None]


def _only(name):
    if name not in selected_backends():
        pytest.skip(f"GRADCLIP_TEST_BACKENDS leaves {name} out")
    return importorskip(name)


def test_agc_on_another_array_api_strict_device():
    # Its eps constants were made on the default device, and meeting the
    # leaves' raised "Arrays from two different devices".
    xp = _only("array_api_strict")
    device = xp.Device("device1")
    g = [xp.asarray([[3.0, 4.0], [0.01, 0.0]], device=device)]
    w = [xp.asarray([[1.0, 1.0], [1.0, 1.0]], device=device)]
    clipper = AGC(layout="torch", clipping=0.1)
    out, _, stats = clipper.update(g, clipper.init(g), params=w)
    assert out[0].device == stats.norm.device == device
    want = np.array([[3.0, 4.0], [0.01, 0.0]]) * np.array([[0.1 * 2**0.5 / 5], [1.0]])
    host = out[0].to_device(xp.Device("CPU_DEVICE"))
    np.testing.assert_allclose(np.asarray(host), want, rtol=1e-6)


@pytest.mark.parametrize("clipper", [ZClip(warmup_steps=1), AutoClip()], ids=["zclip", "autoclip"])
def test_raise_reads_the_norm_once(clipper):
    # The norm was checked where it was computed, then again as the given
    # norm of the clip: two computes of a dask graph (two host syncs) a step.
    _only("dask")
    da = importorskip("dask.array")
    from dask.callbacks import Callback

    computes = []

    class Count(Callback):
        def _start(self, dsk):
            computes.append(1)

    clipper = dataclasses.replace(clipper, nonfinite="raise")
    g = [da.from_array(np.full(4, 2.0, np.float32), chunks=2)]
    state = clipper.init(g)
    with Count():
        for _ in range(3):
            _, state, _ = clipper.update(g, state)
    assert len(computes) == 3


# ------------------------------------------------------------------ state dicts


# The clippers with statistics in their state, with short warm-ups.
STATEFUL = pytest.mark.parametrize(
    "clipper", [ZClip(warmup_steps=5), AutoClip(history_size=16), AdaGC(warmup_steps=3)],
    ids=["zclip", "autoclip", "adagc"],
)  # fmt: skip


@STATEFUL
def test_state_dict_round_trips_across_backends(xp, clipper):
    seq = _sequence(steps=12)
    _, numpy_state = _run(clipper, _NumpyF32(), seq[:8])
    saved = clipper.state_dict(numpy_state)
    assert all(isinstance(v, np.ndarray) for v in saved.values())
    like = [xp.array(a, "float32") for a in seq[0]]
    # like=model.parameters(), a generator: init used it up, and the state
    # came back in NumPy (or failed: torch dtypes to np.array).
    state = clipper.load_state_dict(saved, (a for a in like))
    assert {type(v) for v in state} == {type(like[0])}
    state = clipper.load_state_dict(saved, like)
    again = clipper.state_dict(state)
    assert saved.keys() == again.keys()
    for k in saved:
        np.testing.assert_array_equal(saved[k], again[k])
    # Continuing on the new backend gives the run's own next steps.
    ref, _ = _run(clipper, _NumpyF32(), seq)
    for t in range(8, 12):
        _, state, stats = clipper.update([xp.array(a, "float32") for a in seq[t]], state)
        scale = np.asarray(xp.numpy(stats.scale), np.float64)
        np.testing.assert_allclose(scale, ref[t][1], rtol=1e-5, err_msg=str(t))
    with pytest.raises(KeyError, match="lacks"):
        clipper.load_state_dict({}, like)


@STATEFUL
def test_a_state_dict_loads_onto_another_torch_device(clipper):
    # torch.asarray(a 0-d NumPy array, device=..., copy=True) raises "can't
    # alias tensor from device 'cpu'": every load onto CUDA tensors failed
    # (found on a GPU). The meta device takes the same path with no GPU.
    torch = importorskip("torch")
    saved = clipper.state_dict(clipper.init([np.ones(3, np.float32)]))
    state = clipper.load_state_dict(saved, [torch.zeros(3, device="meta")])
    for k, v in state._asdict().items():
        assert v.device.type == "meta", k
        assert tuple(v.shape) == saved[k].shape, k


@STATEFUL
def test_a_state_dict_of_the_backends_arrays_loads(xp, clipper):
    # torch.load(..., map_location="cuda") gives CUDA tensors and CuPy users
    # keep CuPy arrays: np.array refuses both (Tensor.numpy(); CuPy's implicit
    # conversion). A torch tensor that requires grad is refused alike, on the CPU.
    seq = _sequence(steps=6)
    _, state = _run(clipper, _NumpyF32(), seq)
    saved = clipper.state_dict(state)
    like = [xp.array(a, "float32") for a in seq[0]]
    given = {k: xp.array(v, v.dtype.name) for k, v in saved.items()}
    if xp.name == "torch":
        given = {k: v.double().requires_grad_() for k, v in given.items()}
    again = clipper.state_dict(clipper.load_state_dict(given, like))
    for k in saved:
        np.testing.assert_array_equal(again[k], saved[k], err_msg=k)


@STATEFUL
def test_state_dicts_are_copies_in_init_dtypes(xp, clipper):
    # A float64 run's state resumed on float32 leaves took float64 (and its
    # norms with it); a dict through JSON gave int64 counts; and the dicts
    # were views of the state (a CPU tensor's .numpy(), NumPy arrays).
    seq = _sequence(steps=8)
    _, state = _run(clipper, _NumpyF32(), seq)
    saved = {k: v.astype(np.float64) for k, v in clipper.state_dict(state).items()}
    like = [xp.array(a, "float32") for a in seq[0]]
    loaded = clipper.load_state_dict(saved, like)
    for k, ref in clipper.init(like)._asdict().items():
        assert getattr(loaded, k).dtype == ref.dtype, k
    _, _, stats = clipper.update(like, loaded)
    assert stats.norm.dtype == like[0].dtype
    out = clipper.state_dict(loaded)
    for k, v in out.items():
        v[...] = 7  # neither the state nor the dict it was loaded from
        assert not np.any(xp.numpy(getattr(loaded, k)) == 7), k
    for v in saved.values():
        assert not np.any(v == 7)
        v[...] = 7
    assert not any(np.any(v == 7) for v in clipper.state_dict(loaded).values())


@STATEFUL
def test_a_state_of_another_library_is_refused_by_name(xp, clipper):
    if xp.name == "numpy":
        pytest.skip("the state here is NumPy's")
    state = clipper.init([np.ones(3, np.float32)])
    grads = [xp.array(np.ones(3), "float32")]
    with pytest.raises(TypeError, match=r"update: the state's \w+ is a numpy array but"):
        clipper.update(grads, state)


def test_load_state_dict_checks_shapes_against_the_hyperparameters(xp):
    like = [xp.array(np.ones(3), "float32")]
    saved = AutoClip(history_size=3).state_dict(AutoClip(history_size=3).init(like))
    with pytest.raises(ValueError, match=r"history.*\(3,\).*\(8,\).*history_size=8"):
        AutoClip(history_size=8).load_state_dict(saved, like)
    saved = ZClip(warmup_steps=1).state_dict(ZClip(warmup_steps=1).init(like))
    with pytest.raises(ValueError, match=r"buffer.*\(1,\).*\(25,\).*warmup_steps=25"):
        ZClip(warmup_steps=25).load_state_dict(saved, like)
    two = [xp.array(np.ones(3), "float32"), xp.array(np.ones(2), "float32")]
    saved = AdaGC().state_dict(AdaGC().init(two))
    with pytest.raises(ValueError, match=r"ema.*\(2,\).*\(1,\).*per leaf"):
        AdaGC().load_state_dict(saved, like)
    # A (1,) array does not broadcast into a 0-d field.
    clipper = AutoClip(history_size=4)
    saved = clipper.state_dict(clipper.init(like))
    with pytest.raises(ValueError, match=r"count.*\(1,\).*\(\)"):
        clipper.load_state_dict({**saved, "count": np.zeros(1, np.int32)}, like)
    with pytest.raises(KeyError, match="mean"):
        clipper.load_state_dict({**saved, "mean": np.zeros(())}, like)  # ZClip's, not AutoClip's


# ------------------------------------------------------------------ FlatTree


FLAT_BACKENDS = ("numpy", "torch", "torch_cuda", "cupy")  # as in test_flat.py


@pytest.mark.parametrize(
    "xp", [b for b in selected_backends() if b in FLAT_BACKENDS], indirect=True
)
@pytest.mark.parametrize(
    "clipper",
    [ZClip(warmup_steps=3), AutoClip(history_size=4), AdaGC(warmup_steps=2), AGC(layout="torch")],
    ids=["zclip", "autoclip", "adagc", "agc"],
)
@pytest.mark.parametrize("inplace", [False, True], ids=["functional", "inplace"])
def test_clippers_take_a_flat_tree(xp, clipper, inplace):
    """init, update(_), state_dict and load_state_dict on a FlatTree: as on its tree."""
    seq = _sequence(steps=6)
    weights = [xp.array(np.full(np.shape(a), 20.0), "float32") for a in seq[0]]
    params = gc.FlatTree.from_tree(weights) if isinstance(clipper, AGC) else None
    plain = _run(clipper, xp, seq, inplace=inplace, params=params and weights)[0]
    flat = gc.FlatTree.from_tree([xp.array(a, "float32") for a in seq[0]])
    state = clipper.load_state_dict(clipper.state_dict(clipper.init(flat)), flat)
    for t, tree in enumerate(seq):
        for view, a in zip(flat.tree, tree, strict=True):
            view[...] = xp.array(a, "float32")
        if inplace:
            state, stats = clipper.update_(flat, state, params)
            out = flat
        else:
            out, state, stats = clipper.update(flat, state, params)
        assert isinstance(out, gc.FlatTree)
        np.testing.assert_array_equal(np.asarray(xp.numpy(stats.norm), np.float64), plain[t][0])
        for got, want in zip(out.tree, plain[t][2], strict=True):
            np.testing.assert_array_equal(xp.numpy(got).astype(np.float64), want)


class _NumpyF32:
    """The reference backend for the runs above: NumPy float32."""

    def array(self, a, dtype=None):
        return np.asarray(a, np.float32)

    def numpy(self, a):
        return np.asarray(a)

    def has(self, dtype):
        return True


# ------------------------------------------------------------------- optax


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("zclip", {"warmup_steps": 10, "max_grad_norm": 30.0}),
        ("autoclip", {"percentile": 50.0, "history_size": 16}),
        ("adagc", {"warmup_steps": 5, "max_grad_norm": 2.0}),
        ("agc", {"clipping": 0.05}),
    ],
)
def test_optax_transforms_match_the_clippers(name, kwargs):
    jax = importorskip("jax")
    optax = importorskip("optax")
    import gradclip.adaptive as ga
    import gradclip.optax as gco

    jnp = jax.numpy
    seq = _sequence(steps=20)
    params = [jnp.ones(a.shape, jnp.float32) for a in seq[0]]
    tx = optax.chain(getattr(gco, name)(**kwargs), optax.identity())
    clipper = {
        "zclip": ga.ZClip,
        "autoclip": ga.AutoClip,
        "adagc": ga.AdaGC,
        "agc": lambda **k: ga.AGC(layout="jax", **k),
    }[name](**kwargs)
    state, ref_state = tx.init(params), clipper.init(params)
    step = jax.jit(tx.update)
    for tree in seq:
        grads = [jnp.asarray(a, jnp.float32) for a in tree]
        got, state = step(grads, state, params)
        want, ref_state, ref_stats = clipper.update(grads, ref_state, params)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
        stats = gco.find_stats(state)
        np.testing.assert_allclose(np.asarray(stats.norm), np.asarray(ref_stats.norm), rtol=1e-6)


@pytest.mark.parametrize("value", [1e-200, 1e200])
def test_agc_stats_of_complex128_gradients_are_float64(xp, value):
    # The result dtype looked for float64 leaves only: complex128 ones got
    # float32 stats, 0 or inf where the norm is 3e-200 or 3e200.
    if not xp.has("complex128"):
        pytest.skip(f"{xp} has no complex128")
    g = [xp.array(np.full((2, 3), value * (1 + 1j)), "complex128")]
    w = [xp.array(np.ones((2, 3)), "float64")]
    clipper = AGC(layout="torch", clipping=1e300)  # nothing clipped
    _, _, stats = clipper.update(g, clipper.init(g), params=w)
    norm = xp.numpy(stats.norm)
    assert norm.dtype == np.float64
    np.testing.assert_allclose(norm, value * 12**0.5, rtol=1e-12)


@pytest.mark.parametrize("layout", ["torch", "jax"])
def test_agc_of_leaves_larger_than_a_block(xp, layout):
    # Eager backends read and write such leaves a piece of whole units at a
    # time (one unit larger than a block: flat blocks); the same results.
    rng = np.random.default_rng(5)
    shapes = [(1100, 1000), (1000, 1100), (2**20 + 7,)]
    grads = [
        rng.standard_normal(s) * rng.choice([1e-4, 1.0], size=s[:1] + (1,) * (len(s) - 1))
        for s in shapes
    ]
    params = [rng.standard_normal(s) for s in shapes]
    axes = [(1,) if layout == "torch" else (0,), (1,) if layout == "torch" else (0,), None]
    want = []
    for g, w, ax in zip(grads, params, axes, strict=True):
        gn = np.sqrt(np.sum(g**2, axis=ax, keepdims=True))
        bound = 0.01 * np.maximum(np.sqrt(np.sum(w**2, axis=ax, keepdims=True)), 1e-3)
        want.append(np.where(gn < bound, g, g * (bound / gn)))
    g = [xp.array(a, "float32") for a in grads]
    p = [xp.array(a, "float32") for a in params]
    agc = AGC(clipping=0.01, layout=layout)
    out, _, stats = agc.update(g, agc.init(g), params=p)
    for a, b in zip(out, want, strict=True):
        np.testing.assert_allclose(xp.numpy(a), b, rtol=2e-5, atol=1e-12)
    if xp.mutable:
        agc.update_(g, agc.init(g), params=p)
        for a, b in zip(g, out, strict=True):
            np.testing.assert_array_equal(xp.numpy(a), xp.numpy(b))
    assert bool(stats.clipped)
