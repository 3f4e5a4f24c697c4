"""gradclip.monitor.GradMonitor: measurements, anomalies, history, sinks and plots."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest

import gradclip as gc
from conftest import importorskip, ref_norm, selected_backends
from gradclip.monitor import GLOBAL, GradMonitor


def _only(name):
    """Skip unless backend ``name`` is selected and installed; return its module."""
    if name not in selected_backends():
        pytest.skip(f"GRADCLIP_TEST_BACKENDS leaves {name} out")
    return importorskip(name)


def _host_tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "encoder": [rng.standard_normal((4, 3)) * scale, None, rng.standard_normal(5) * scale],
        "head": rng.standard_normal(()) * scale,
    }


def _to(xp, host, dtype="float32"):
    return {
        "encoder": [xp.array(host["encoder"][0], dtype), None, xp.array(host["encoder"][2], dtype)],
        "head": xp.array(host["head"], dtype),
    }


NAMES = ["['encoder'][0]", "['encoder'][2]", "['head']"]


def _host_leaves(host, dtype="float32"):
    leaves = [host["encoder"][0], host["encoder"][2], np.asarray(host["head"])]
    return [x.astype(dtype).astype(np.float64) for x in leaves]


# ------------------------------------------------------------------ measurements


@pytest.mark.parametrize("ord", [2.0, 1.0, 0.5, math.inf, -math.inf, 0.0])
def test_norms_and_max_abs_match_numpy(xp, ord):
    mon = GradMonitor(log_every=3, ord=ord)
    refs = []
    for step in range(7):  # two full windows and a partial one
        host = _host_tree(step, scale=10.0**step)
        mon.update(_to(xp, host))
        refs.append(_host_leaves(host))
    assert mon.names == NAMES
    h = mon.history
    np.testing.assert_array_equal(h.step, np.arange(7))
    # ord 0 counts entries in a leaf, and leaves with a nonzero entry in a tree
    leaf_norm = np.count_nonzero if ord == 0 else lambda x: ref_norm([x], ord)
    want_norms = [[leaf_norm(x) for x in leaves] for leaves in refs]
    np.testing.assert_allclose(h.leaf_norms, want_norms, rtol=1e-6)
    want_max = [[np.abs(x).max() for x in leaves] for leaves in refs]
    np.testing.assert_allclose(h.max_abs, want_max, rtol=1e-6)
    np.testing.assert_allclose(h.global_norm, [ref_norm(leaves, ord) for leaves in refs], rtol=1e-6)
    np.testing.assert_array_equal(h.nonfinite, np.zeros((7, 3)))
    assert not h.has_clip.any() and np.isnan(h.scale).all()
    assert mon.anomalies == []


@pytest.mark.parametrize("ord", [2.0, math.inf, -math.inf, 0.0])
def test_global_norm_with_an_empty_leaf_is_gradclips(xp, ord):
    # For -inf the empty leaf's norm (0) was taken as the smallest.
    tree = {"a": xp.array(np.full(3, 2.0), "float32"), "e": xp.array(np.zeros(0), "float32")}
    mon = GradMonitor(ord=ord)
    mon.update(tree)
    assert mon.history.global_norm[0] == float(gc.global_norm(tree, ord=ord))
    assert mon.history.leaf_norms[0].tolist() == xp.numpy(gc.leaf_norms(tree, ord=ord)).tolist()


def test_overflow_safe_norms():
    """float32 leaves of 1e30: the naive sum of squares overflows, the monitor's does not."""
    mon = GradMonitor()
    mon.update([np.full(16, 1e30, np.float32), np.full(9, 1e-30, np.float32)])
    h = mon.history
    np.testing.assert_allclose(h.leaf_norms[0], [4e30, 3e-30], rtol=1e-6)
    np.testing.assert_allclose(h.global_norm, [4e30], rtol=1e-6)
    assert mon.anomalies == []


def test_clip_stats_recorded(xp):
    mon = GradMonitor(log_every=2)
    for step in range(4):
        tree = _to(xp, _host_tree(step, scale=0.1 if step % 2 else 10.0))
        _, stats = gc.clip_by_global_norm(tree, max_norm=1.0)
        mon.update(tree, stats if step != 3 else None)
        if step == 0:
            want_scale0 = float(stats.scale)
    h = mon.history
    np.testing.assert_array_equal(h.has_clip, [True, True, True, False])
    np.testing.assert_array_equal(h.clipped, [True, False, True, False])
    assert h.scale[0] == pytest.approx(want_scale0, rel=1e-6)
    assert h.scale[1] == 1.0 and np.isnan(h.scale[3])


def test_record_clip_after_inplace_clip(mutable_xp):
    """update() before an in-place clip sees the unclipped gradients; record_clip adds the stats."""
    xp = mutable_xp
    host = _host_tree(0, scale=10.0)
    tree = _to(xp, host)
    mon = GradMonitor()
    mon.update(tree)
    stats = gc.clip_by_global_norm_(tree, max_norm=1.0)
    mon.record_clip(stats)
    h = mon.history
    assert h.global_norm[0] == pytest.approx(ref_norm(_host_leaves(host), 2.0), rel=1e-6)
    assert h.global_norm[0] > 5.0  # measured before clipping
    assert bool(h.clipped[0]) and h.scale[0] == pytest.approx(float(stats.scale), rel=1e-6)
    with pytest.raises(RuntimeError, match="call update"):
        mon.record_clip(stats)  # the step was flushed by reading the history


def test_record_clip_takes_stats_of_another_library(xp):
    # An empty tree's stats are NumPy's: they were put on the CPU, and the
    # window's stack of a CUDA monitor's rows then failed (flush, below).
    mon = GradMonitor()
    mon.update(_to(xp, _host_tree(0)))
    mon.record_clip(gc.clip_by_global_norm({}, 1.0)[1])
    h = mon.history
    assert h.scale[0] == 1.0 and not h.clipped[0]


def test_record_clip_takes_jax_stats_into_a_torch_monitor():
    # torch.asarray of a JAX bool raised ("buffer length (1 bytes)"), and of
    # a JAX 0-d float gave a 1-d tensor.
    torch, jnp = importorskip("torch"), importorskip("jax.numpy")
    mon = GradMonitor()
    for scale in (2.0, 0.5):
        mon.update([torch.ones(2)])
        mon.record_clip(gc.clip_by_global_norm([jnp.ones(2) * scale], 1.0)[1])
    h = mon.history
    np.testing.assert_allclose(h.scale, [1 / (2 * math.sqrt(2) + 1e-6), 1.0], rtol=1e-6)
    assert h.clipped.tolist() == [True, False]


def test_leaves_of_two_libraries_are_refused_in_either_order():
    # jit took a NumPy leaf after a JAX one as JAX's, where NumPy first raised.
    jnp = importorskip("jax.numpy")
    for tree in ({"a": jnp.ones(2), "b": np.ones(2)}, {"a": np.ones(2), "b": jnp.ones(2)}):
        with pytest.raises(TypeError, match=r"leaf \['b'\] is a .* array but leaf \['a'\]"):
            GradMonitor().update(tree)


def test_per_leaf_clip_stats():
    mon = GradMonitor()
    tree = [np.array([3.0, 4.0]), np.array([0.5])]
    _, stats = gc.clip_by_norm(tree, 1.0)
    mon.update(tree, stats)
    h = mon.history
    assert h.scale[0] == pytest.approx(1.0 / (5.0 + 1e-6)) and bool(h.clipped[0])


# ------------------------------------------------------------------ anomalies


@pytest.mark.parametrize("ord", [2.0, math.inf])
def test_nonfinite_flagged_with_leaf_name(xp, ord):
    # NaN/inf norms are flagged as such, not as threshold crossings.
    mon = GradMonitor(log_every=2, threshold=1e4, leaf_threshold=1e4, ord=ord)
    big = 2**20 + 3  # more than one block on eager backends
    for step in range(5):
        w = np.ones((4, 3))
        b = np.ones(big)
        if step == 1:
            b[[0, 2**20 + 1, 2**20 + 2]] = np.nan  # in two blocks
        if step == 3:
            w[0, 0] = np.inf
            w[2, 1] = -np.inf
        mon.update({"w": xp.array(w, "float32"), "b": xp.array(b, "float32")})
    assert mon.anomalies == [
        {"step": 1, "leaf": "['b']", "kind": "nan", "value": 3},
        {"step": 3, "leaf": "['w']", "kind": "inf", "value": 2},
    ]
    h = mon.history
    want = np.zeros((5, 2), int)
    want[1, 0], want[3, 1] = 3, 2
    np.testing.assert_array_equal(h.nonfinite, want)
    want[3, 1] = 0
    np.testing.assert_array_equal(h.nan, want)
    assert np.isinf(h.max_abs[3, 1]) and np.isinf(h.global_norm[3])
    if ord == 2.0 or not xp.name.startswith("jax"):
        # (XLA on the CPU drops NaN from max reductions: the counts above,
        # not the max, are what the monitor relies on there.)
        assert np.isnan(h.global_norm[1]) and np.isnan(h.leaf_norms[1, 0])


def test_thresholds(xp):
    mon = GradMonitor(log_every=4, threshold=10.0, leaf_threshold=6.0, z_threshold=None)
    norms = [1.0, 7.0, 12.0, 3.0, 5.0]  # leaf w; leaf b is fixed at 2
    for w in norms:
        tree = {"w": xp.array([w, 0.0], "float32"), "b": xp.array([2.0], "float32")}
        mon.update(tree)
    got = [(a["step"], a["leaf"], a["kind"]) for a in mon.anomalies]
    assert got == [
        (1, "['w']", "threshold"),
        (2, GLOBAL, "threshold"),
        (2, "['w']", "threshold"),
    ]
    assert mon.anomalies[1]["value"] == pytest.approx(math.hypot(12.0, 2.0), rel=1e-6)
    assert mon.anomalies[1]["threshold"] == 10.0


def _noisy_norms(steps, seed):
    rng = np.random.default_rng(seed)
    return 1.0 + 0.1 * rng.standard_normal(steps)


def test_a_norm_past_float32_of_finite_entries_is_flagged(xp):
    # 4 entries of 3e38: a norm of 6e38, inf in float32, with no NaN/inf
    # entry to flag; a clip by it scales by 0. No threshold is needed.
    mon = GradMonitor()
    mon.update([xp.array(np.full(4, 3e38), "float32"), xp.array(np.ones(2), "float32")])
    found = {(a["leaf"], a["kind"]) for a in mon.anomalies}
    assert found == {(GLOBAL, "overflow"), ("[0]", "overflow")}
    # An inf entry is an "inf" anomaly, not an overflow too.
    mon = GradMonitor()
    mon.update([xp.array(np.array([np.inf, 1.0]), "float32")])
    assert [(a["leaf"], a["kind"]) for a in mon.anomalies] == [("[0]", "inf")]


def test_spike_flagged_only_at_the_spike(xp):
    spike_at = 28  # the first step of a window: the statistics carry across flushes
    w_norms = _noisy_norms(40, 1)
    w_norms[spike_at] *= 20.0
    # A smaller spike soon after: seen because the first entered the moving
    # statistics capped, not at full size.
    w_norms[spike_at + 3] *= 5.0
    b_norms = 0.05 * _noisy_norms(40, 2)
    direction = np.array([0.6, 0.8])
    mon = GradMonitor(log_every=7)  # spike detection carries across windows
    for w, b in zip(w_norms, b_norms, strict=True):
        tree = {"w": xp.array(direction * w, "float64"), "b": xp.array([b], "float64")}
        if not xp.has("float64"):
            tree = {k: xp.array(xp.numpy(v), "float32") for k, v in tree.items()}
        mon.update(tree)
    spikes = [(a["step"], a["leaf"]) for a in mon.anomalies if a["kind"] == "spike"]
    assert spikes == [(t, leaf) for t in (spike_at, spike_at + 3) for leaf in (GLOBAL, "['w']")]
    assert all(a["kind"] == "spike" for a in mon.anomalies)
    w_spike = next(a for a in mon.anomalies if a["leaf"] == "['w']")
    assert w_spike["value"] == pytest.approx(w_norms[spike_at], rel=1e-5)
    assert w_spike["z"] > 6.0


def test_spike_during_warmup_not_flagged():
    norms = _noisy_norms(40, 3)
    norms[5] *= 20.0
    for warmup, flagged in [(20, False), (4, True)]:
        mon = GradMonitor(log_every=10, warmup=warmup)
        for v in norms:
            mon.update([np.array([v])])
        steps = {a["step"] for a in mon.anomalies if a["kind"] == "spike"}
        assert steps == ({5} if flagged else set())


def test_constant_norms():
    """A constant series has zero spread: rounding-level changes are no spikes, jumps are."""
    mon = GradMonitor(log_every=50)
    for step in range(50):
        wobble = 1.0 + 1e-6 * (step in (30, 35))
        jump = 1.0 + 2.0 * (step == 45)
        mon.update([np.full(3, wobble, np.float32), np.full(3, jump, np.float32)])
    assert {(a["step"], a["leaf"]) for a in mon.anomalies} == {(45, "[1]"), (45, GLOBAL)}


# ----------------------------------------------------------------- backends


def test_jax_no_host_transfer_between_boundaries(monkeypatch):
    jax = _only("jax")
    jnp = jax.numpy
    array_impl = type(jnp.zeros(1))
    reads = []

    def spy(name, orig):
        if isinstance(orig, property):
            return property(lambda self: (reads.append(name), orig.fget(self))[1])
        return lambda self, *a, **k: (reads.append(name), orig(self, *a, **k))[1]

    hooks = ("_value", "__array__", "item", "tolist", "__dlpack__")
    missing = [h for h in hooks if h not in array_impl.__dict__]
    if missing:
        pytest.skip(f"jax's ArrayImpl has no {missing}; cannot watch host reads")
    trees = [_to_jax(jnp, _host_tree(i, scale=i + 1.0)) for i in range(6)]
    stats = [gc.clip_by_global_norm(t, max_norm=1.0)[1] for t in trees]
    for name in hooks:
        monkeypatch.setattr(array_impl, name, spy(name, array_impl.__dict__[name]))
    mon = GradMonitor(log_every=4)
    with jax.transfer_guard("disallow"):
        for tree, st in zip(trees[:4], stats[:4], strict=True):
            mon.update(tree, st)
        assert reads == []  # a whole window, compiled and recorded on the device
        mon.update(trees[4], stats[4])  # starts a window: the first goes to the host
        assert reads
        reads.clear()
        mon.update(trees[5], stats[5])
        assert reads == []
    monkeypatch.undo()
    h = mon.history
    np.testing.assert_allclose(h.global_norm, [float(st.norm) for st in stats], rtol=1e-6)
    np.testing.assert_allclose(h.scale, [float(st.scale) for st in stats], rtol=1e-6)


def test_update_inside_jit_says_to_call_it_outside():
    # It raised AttributeError: JAX's ConcretizationTypeError, rebuilt from a
    # message string to name the leaf, takes a tracer, not a string.
    jax = _only("jax")
    mon = GradMonitor()

    @jax.jit
    def step(g):
        mon.update(g)
        return g

    with pytest.raises(TypeError, match=r"traced .*call update outside the transform"):
        step({"a": jax.numpy.ones(3)})
    mon.update({"a": jax.numpy.ones(3)})  # nothing was recorded: the first step starts here
    assert mon.history.step.tolist() == [0]


def _to_jax(jnp, host):
    return {
        "encoder": [
            jnp.asarray(host["encoder"][0], jnp.float32),
            None,
            jnp.asarray(host["encoder"][2], jnp.float32),
        ],
        "head": jnp.asarray(host["head"], jnp.float32),
    }


def test_a_gradient_with_a_graph_is_measured_by_value():
    # torch.autograd.grad(create_graph=True) gives a non-leaf tensor that
    # requires grad: it has no .grad (torch warns on reading it).
    torch = importorskip("torch")
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    (g,) = torch.autograd.grad((w**3).sum(), [w], create_graph=True)
    mon = GradMonitor()
    mon.update({"w": g, "other": torch.ones(2)})
    assert mon.names == ["['other']", "['w']"]
    np.testing.assert_allclose(mon.history.leaf_norms[0], [math.sqrt(2), math.sqrt(153)])


def test_a_gradient_with_a_graph_keeps_no_graph_alive():
    # The row of norms and the recorded stats of a create_graph=True
    # gradient held its graph, and the activations it saved, until the
    # window's flush: up to log_every steps of them.
    torch = importorskip("torch")
    import weakref

    mon = GradMonitor(log_every=100)
    refs = []
    for _ in range(2):
        w = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 64))
        h = torch.sin(w) * 3.0  # saved for the double backward
        (g,) = torch.autograd.grad((h**2).sum(), [w], create_graph=True)
        grads = [g, g * 2.0]
        stats = gc.clip_by_global_norm(grads, 1.0)[1]
        assert stats.norm.requires_grad  # the stats come from the graph too
        mon.update(grads, stats)
        refs.append(weakref.ref(h))
        del w, h, g, grads, stats
    assert [r() for r in refs] == [None, None]
    assert len(mon.history.step) == 2


def test_torch_named_parameters():
    torch = _only("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)  # frozen: no gradient, skipped
    mon = GradMonitor(log_every=2)
    want = []
    for step in range(3):
        model.zero_grad()
        model(torch.randn(5, 3) * (step + 1)).square().sum().backward()
        mon.update(model.named_parameters())
        want.append([p.grad.norm().item() for p in model.parameters() if p.grad is not None])
    assert mon.names == ["0.weight", "0.bias", "2.weight"]
    np.testing.assert_allclose(mon.history.leaf_norms, want, rtol=1e-6)
    # A plain tensor that requires grad is read through .grad too.
    leaf = torch.ones(3, requires_grad=True)
    (leaf * 2.0).sum().backward()
    mon = GradMonitor()
    mon.update({"x": leaf})
    np.testing.assert_allclose(mon.history.leaf_norms, [[2.0 * math.sqrt(3.0)]], rtol=1e-6)
    # Unnamed parameters are read through .grad too, named by position.
    mon = GradMonitor()
    mon.update(model.parameters())
    assert mon.names == ["[0]", "[1]", "[2]"]
    np.testing.assert_allclose(mon.history.leaf_norms[0], want[-1], rtol=1e-6)


def test_named_pairs_from_dict_items():
    mon = GradMonitor()
    grads = {"layer.weight": np.array([3.0, 4.0]), "layer.bias": np.array([1.0])}
    mon.update(grads.items())
    assert mon.names == ["layer.weight", "layer.bias"]
    np.testing.assert_allclose(mon.history.leaf_norms, [[5.0, 1.0]])


def test_a_named_pair_holding_a_subtree_is_refused(xp):
    # dense's two leaves were measured under one name: every later column
    # moved by one, and the files failed to write at the next flush.
    dense = {"kernel": xp.array(np.full(4, 5.0)), "bias": xp.array(np.full(2, 6.0))}
    for pairs in ([("a", xp.array(np.ones(4))), ("dense", dense)], [("dense", dense)]):
        with pytest.raises(TypeError, match=r"leaf dense is a builtins.dict, not an array"):
            GradMonitor().update(pairs)


def test_a_later_step_with_a_leaf_that_is_not_an_array_names_it():
    mon = GradMonitor()
    mon.update({"a": np.ones(2), "b": np.ones(2)})
    with pytest.raises(TypeError, match=r"leaf \['a'\] is a builtins.float, not an array"):
        mon.update({"a": 3.0, "b": np.ones(2)})  # was array-api-compat's message, no leaf
    assert mon.history.step.tolist() == [0]


def test_repeated_names_get_their_own_columns(tmp_path):
    # Two modules' named_parameters() chained both hold "weight": the JSONL
    # kept one of each name and the CSV rows fell out of step with the header.
    pairs = [("weight", np.ones(4)), ("bias", np.ones(2)), ("weight", np.full(4, 3.0))]
    pairs.append(("bias", np.full(2, 4.0)))
    mon = GradMonitor(jsonl=tmp_path / "s.jsonl", csv=tmp_path / "s.csv")
    mon.update(pairs)
    mon.flush()
    assert mon.names == ["weight", "bias", "weight", "bias"]
    want = {"weight": 2.0, "bias": math.sqrt(2), "weight~2": 6.0, "bias~2": 4 * math.sqrt(2)}
    (rec,) = map(json.loads, (tmp_path / "s.jsonl").read_text().splitlines())
    assert rec["leaf_norms"] == pytest.approx(want)
    with open(tmp_path / "s.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert None not in row  # no cells past the header's columns
    assert {k: float(row[f"norm:{k}"]) for k in want} == pytest.approx(want)
    assert row["anomalies"] == "[]"


def test_flat_tree():
    grads = {"w": np.full((2, 2), 1.5, np.float32), "b": np.array([4.0], np.float32)}
    mon = GradMonitor()
    mon.update(gc.FlatTree.from_tree(grads))
    assert mon.names == ["['b']", "['w']"]
    np.testing.assert_allclose(mon.history.leaf_norms, [[4.0, 3.0]])


def test_changed_leaves_raise():
    mon = GradMonitor()
    mon.update({"a": np.ones(2), "b": np.ones(2)})
    with pytest.raises(ValueError, match="leaves changed"):
        mon.update({"a": np.ones(2)})
    mon = GradMonitor()
    mon.update([("a", np.ones(2))])
    with pytest.raises(ValueError, match="leaves changed"):
        mon.update([("b", np.ones(2))])
    with pytest.raises(ValueError, match="nothing to measure"):
        GradMonitor().update([None])


def test_other_leaves_of_the_same_count_raise(xp):
    # Recording them under the first step's names would mislabel every norm.
    mon = GradMonitor(log_every=10)
    mon.update({"encoder": xp.array(np.ones(4), "float32"), "head": xp.array(np.zeros(2))})
    with pytest.raises(ValueError, match=r"leaves changed.*\['decoder'\]"):
        mon.update({"decoder": xp.array(np.ones(4), "float32"), "norm": xp.array(np.zeros(2))})
    a, b = xp.array(np.ones(2), "float32"), xp.array(np.ones(3), "float32")
    mon = GradMonitor(log_every=10)
    mon.update([a, None, b])
    mon.update([a, None, b])
    with pytest.raises(ValueError, match=r"leaves changed.*\[1\]"):
        mon.update([a, b, None])  # a None moved: leaf [2] became [1]
    assert mon.history.step.tolist() == [0, 1]  # nothing recorded by the failed calls


def test_other_parameters_with_grads_raise():
    torch = _only("torch")
    params = [torch.nn.Parameter(torch.ones(2)) for _ in range(3)]
    params[0].grad, params[1].grad = torch.ones(2), torch.ones(2)
    mon = GradMonitor(log_every=10)
    mon.update(params)
    params[1].grad, params[2].grad = None, torch.ones(2)
    with pytest.raises(ValueError, match=r"leaves changed.*\[2\]"):
        mon.update(params)


def test_bad_stats_record_nothing():
    mon = GradMonitor()
    bad = gc.ClipStats(*(np.ones((2, 2)) for _ in range(4)))
    with pytest.raises(ValueError, match=r"stats.scale must be 0-d or 1-d; got shape \(2, 2\)"):
        mon.update([np.ones(2)], bad)
    assert mon.history.step.size == 0


def test_bad_leaf_named_by_its_path():
    mon = GradMonitor()
    with pytest.raises(TypeError, match=r"leaf \['b'\]\[1\] has dtype int64"):
        mon.update({"a": np.ones(2), "b": [np.ones(3), np.arange(3)]})
    with pytest.raises(TypeError, match="leaf count has dtype"):
        mon.update([("w", np.ones(2)), ("count", np.arange(2))])
    mon.update({"a": np.ones(2)})  # nothing was recorded by the failed calls
    assert mon.names == ["['a']"] and mon.history.step.tolist() == [0]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"log_every": 0}, ValueError),
        ({"log_every": 1.5}, TypeError),
        ({"threshold": -1.0}, ValueError),
        ({"threshold": "big"}, TypeError),
        ({"z_threshold": 0.0}, ValueError),
        ({"warmup": 0}, ValueError),
        ({"beta": 1.0}, ValueError),
        ({"ord": -1}, ValueError),
        ({"writer": object()}, TypeError),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        GradMonitor(**kwargs)


def test_numpy_numbers_as_arguments():
    assert GradMonitor(beta=np.float32(0.5), warmup=np.int64(3)).beta == 0.5  # beta was refused


def test_import_loads_no_backend_or_matplotlib():
    code = (
        "import sys, gradclip.monitor; "
        "print(sorted(m for m in ('torch', 'jax', 'cupy', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -------------------------------------------------------------------- output


def _run_with_everything(**kwargs):
    """Twelve steps with clip stats on some, a NaN, a threshold crossing and a spike."""
    mon = GradMonitor(log_every=5, threshold=30.0, warmup=5, **kwargs)
    norms = _noisy_norms(12, 4) * 10
    norms[9] *= 5.0
    for step, w in enumerate(norms):
        tree = {"w": np.array([w, 0.0]), "b": np.array([0.25, -0.5])}
        if step == 7:
            tree["b"][0] = np.nan
        if step % 3 == 0:
            _, stats = gc.clip_by_global_norm(tree, max_norm=10.0)
            mon.update(tree, stats, step=100 + step)
        else:
            mon.update(tree, step=100 + step)
    return mon


def _same(a, b):
    return (a is None and b is None) or a == b or (math.isnan(a) and math.isnan(b))


def test_jsonl_round_trip(tmp_path):
    stream = tmp_path / "stream.jsonl"
    mon = _run_with_everything(jsonl=stream)
    mon.flush()
    path = tmp_path / "out.jsonl"
    mon.to_jsonl(path)
    assert path.read_text() == stream.read_text()  # streamed at each flush, same rows
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    h = mon.history
    assert [r["step"] for r in rows] == h.step.tolist() == list(range(100, 112))
    for t, r in enumerate(rows):
        assert _same(r["global_norm"], h.global_norm[t])
        assert list(r["leaf_norms"]) == mon.names
        assert all(
            _same(r["leaf_norms"][k], v) for k, v in zip(mon.names, h.leaf_norms[t], strict=True)
        )
        assert all(_same(r["max_abs"][k], v) for k, v in zip(mon.names, h.max_abs[t], strict=True))
        assert list(r["nonfinite"].values()) == h.nonfinite[t].tolist()
        if h.has_clip[t]:
            assert r["scale"] == h.scale[t] and r["clipped"] == bool(h.clipped[t])
        else:
            assert r["scale"] is None and r["clipped"] is None
    from_rows = [{"step": r["step"], **a} for r in rows for a in r["anomalies"]]
    assert from_rows == mon.anomalies
    kinds = {(a["step"], a["kind"]) for a in mon.anomalies}
    assert {(107, "nan"), (109, "threshold"), (109, "spike")} <= kinds


def test_a_sink_that_fails_to_write_loses_no_step(tmp_path):
    # The sink was marked started before its first write, which failed: the
    # file, once writable, got no header. And update() raised before the
    # step was measured: that step was lost, and the next took its number.
    path = tmp_path / "later" / "log.csv"
    mon = GradMonitor(log_every=1, csv=path)
    mon.update([np.ones(2)])
    with pytest.raises(FileNotFoundError):
        mon.update([np.ones(2) * 2], gc.clip_by_global_norm([np.ones(2) * 2], 1.0)[1])
    path.parent.mkdir()
    mon.update([np.ones(2) * 3])
    mon.flush()
    h = mon.history
    assert h.step.tolist() == [0, 1, 2]
    np.testing.assert_allclose(h.global_norm, np.sqrt(2) * np.array([1, 2, 3]))
    assert h.has_clip.tolist() == [False, True, False]
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))  # a header: the first write that succeeded wrote it
    assert [int(r["step"]) for r in rows] == [1, 2]  # step 0's window could not be written


def test_csv_round_trip(tmp_path):
    stream = tmp_path / "stream.csv"
    mon = _run_with_everything(csv=stream)
    mon.flush()
    path = tmp_path / "out.csv"
    mon.to_csv(path)
    assert path.read_text() == stream.read_text()
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    h = mon.history
    assert [int(r["step"]) for r in rows] == h.step.tolist()
    for t, r in enumerate(rows):
        assert _same(float(r["global_norm"]), h.global_norm[t])
        for i, name in enumerate(mon.names):
            assert _same(float(r[f"norm:{name}"]), h.leaf_norms[t, i])
            assert _same(float(r[f"max_abs:{name}"]), h.max_abs[t, i])
            assert int(r[f"nonfinite:{name}"]) == h.nonfinite[t, i]
        if h.has_clip[t]:
            assert float(r["scale"]) == h.scale[t] and int(r["clipped"]) == h.clipped[t]
        else:
            assert r["scale"] == r["clipped"] == ""
    from_rows = [{"step": int(r["step"]), **a} for r in rows for a in json.loads(r["anomalies"])]
    assert from_rows == mon.anomalies


def test_tensorboard_hook():
    class Writer:  # the duck type SummaryWriter satisfies
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, value, step))

    writer = Writer()
    mon = GradMonitor(log_every=3, writer=writer, prefix="g")
    for step in range(5):
        tree = {"enc": [np.array([3.0, 4.0 * step])], "b": np.array([1.0])}
        _, stats = gc.clip_by_global_norm(tree, max_norm=4.0)
        mon.update(tree, stats)
        if step < 3:
            assert writer.calls == []  # nothing is written before the window is full
    assert {step for _, _, step in writer.calls} == {0, 1, 2}
    mon.flush()
    calls = {(tag, step): value for tag, value, step in writer.calls}
    assert {step for _, step in calls} == {0, 1, 2, 3, 4}
    assert calls[("g/global_norm", 2)] == pytest.approx(math.sqrt(9 + 64 + 1))
    assert calls[("g/norm/enc/0", 2)] == pytest.approx(math.hypot(3.0, 8.0))
    assert calls[("g/max_abs/b", 4)] == 1.0
    assert calls[("g/clipped", 0)] == 0.0 and calls[("g/clipped", 4)] == 1.0
    assert calls[("g/scale", 4)] == pytest.approx(4.0 / (math.sqrt(9 + 256 + 1) + 1e-6))
    assert calls[("g/nonfinite", 1)] == 0 and calls[("g/anomalies", 1)] == 0


def test_tensorboard_tags_are_distinct():
    class Writer:
        def __init__(self):
            self.tags = set()

        def add_scalar(self, tag, value, step):
            self.tags.add(tag)

    writer = Writer()
    mon = GradMonitor(log_every=1, writer=writer, prefix="g")
    # Three paths that read as the tag a/b: each leaf gets a curve of its own.
    mon.update({"a b": np.array([1.0]), "a": {"b": np.array([2.0])}, "a/b": np.array([3.0])})
    mon.flush()
    norms = sorted(t for t in writer.tags if t.startswith("g/norm/"))
    assert norms == ["g/norm/a/b", "g/norm/a/b~2", "g/norm/a/b~3"]


def test_torch_summary_writer(tmp_path):
    _only("torch")
    importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=tmp_path) as writer:
        mon = GradMonitor(log_every=2, writer=writer)
        for step in range(3):
            mon.update({"w": np.array([1.0 + step])})
        mon.flush()
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_plot_writes_png(tmp_path):
    importorskip("matplotlib")
    mon = _run_with_everything()
    path = tmp_path / "grads.png"
    fig = mon.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    top, heat = fig.axes[:2]
    labels = {t.get_text() for t in top.get_legend().get_texts()}
    assert {"global norm", "clipped", "spike", "NaN/inf", "threshold"} <= labels
    assert heat.collections[0].get_array().shape == (2, 12)  # one row per leaf


def test_plot_columns_sit_at_their_steps(tmp_path):
    # An image with even columns drew step 10's norm over x = 250..750 for
    # steps 0, 10, 1000. Each step's column now spans halfway to its neighbours.
    importorskip("matplotlib")
    mon = GradMonitor()
    for step, value in ((0, 1.0), (10, 10.0), (1000, 100.0)):
        mon.update([np.full(4, value)], step=step)
    heat = mon.plot(tmp_path / "g.png").axes[1]
    mesh = heat.collections[0]
    spans = [(p.vertices[:4, 0].min(), p.vertices[:4, 0].max()) for p in mesh.get_paths()]
    np.testing.assert_allclose(spans, [(-5.0, 5.0), (5.0, 505.0), (505.0, 1495.0)])
    np.testing.assert_allclose(
        np.asarray(mesh.get_array()).ravel(), [0.3010, 1.3010, 2.3010], atol=1e-4
    )


def test_plot_without_matplotlib(monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    mon = GradMonitor()
    mon.update([np.ones(2)])
    with pytest.raises(ImportError, match=r"pip install gradclip\[plot\]"):
        mon.plot()


def test_plot_needs_data():
    importorskip("matplotlib")
    with pytest.raises(ValueError, match="nothing recorded"):
        GradMonitor().plot()
