"""Gradients sharded over a device mesh: same results, same shardings, one all-reduce.

Needs 8 devices. ``nox -s jax_sharded`` runs this file on 8 CPU host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and sets
``GRADCLIP_REQUIRE_DEVICES=8``, which turns a shortfall into a failure rather
than a skip; elsewhere (one device) the module skips with the reason.
"""

from __future__ import annotations

import contextlib
import math
import os
import re

import numpy as np
import pytest

import gradclip as gc
from conftest import importorskip

jax = importorskip("jax")
jnp = jax.numpy
gcj = importorskip("gradclip.jax")
_fast = importorskip("gradclip.jax._fast")

P = jax.sharding.PartitionSpec
NEEDED = 8

if jax.device_count() < NEEDED:
    reason = f"needs {NEEDED} devices, JAX sees {jax.device_count()} (run nox -s jax_sharded)"
    if os.environ.get("GRADCLIP_REQUIRE_DEVICES"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((4, 2), ("data", "model"))


SPECS = {
    "both": ((64, 32), P("data", "model")),
    "rows": ((48, 6), P("data", None)),  # replicated over "model"
    "cols": ((5, 16), P(None, "model")),  # replicated over "data"
    "replicated": ((7, 3), P()),  # every device holds it whole
    "flat": ((4096,), P(("data", "model"))),
    "big": ((_fast.GATHER * 2,), P("data")),  # above the gather threshold
}


def _trees(mesh, scale=1.0, dtype=jnp.float32):
    """The same values sharded over the mesh and on one device."""
    rng = np.random.default_rng(0)
    host = {
        k: (rng.standard_normal(shape) * scale).astype(np.float32)
        for k, (shape, _) in SPECS.items()
    }
    sharded = {
        k: jax.device_put(jnp.asarray(v, dtype), jax.sharding.NamedSharding(mesh, SPECS[k][1]))
        for k, v in host.items()
    }
    single = {k: jax.device_put(jnp.asarray(v, dtype), jax.devices()[0]) for k, v in host.items()}
    return sharded, single


def _ref(single):
    flat = np.concatenate([np.asarray(v, np.float64).ravel() for v in single.values()])
    return float(np.sqrt(np.sum(flat**2)))


@pytest.mark.parametrize("scale", [1.0, 1e30, 1e-30])
def test_global_norm_matches_unsharded(mesh, scale):
    sharded, single = _trees(mesh, scale)
    got = gcj.global_norm(sharded)
    assert float(got) == pytest.approx(float(gcj.global_norm(single)), rel=1e-6)
    assert float(got) == pytest.approx(_ref(single), rel=1e-6)
    assert float(gc.global_norm(sharded)) == pytest.approx(_ref(single), rel=1e-6)


@pytest.mark.parametrize("max_norm", [1.0, 1e9])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_clip_matches_unsharded_and_keeps_shardings(mesh, max_norm, dtype):
    sharded, single = _trees(mesh, dtype=jnp.dtype(dtype))
    out, stats = gcj.clip_by_global_norm(sharded, max_norm)
    ref, ref_stats = gcj.clip_by_global_norm(single, max_norm)
    np.testing.assert_allclose(float(stats.norm), float(ref_stats.norm), rtol=1e-6)
    for k in sharded:
        assert out[k].sharding.is_equivalent_to(sharded[k].sharding, sharded[k].ndim), k
        np.testing.assert_allclose(
            np.asarray(out[k], np.float32),
            np.asarray(ref[k], np.float32),
            rtol=1e-2 if dtype == "bfloat16" else 1e-6,
        )


def test_donated_sharded_clip(mesh):
    sharded, _single = _trees(mesh)
    shardings = {k: v.sharding for k, v in sharded.items()}
    out, _ = gcj.clip_by_global_norm(sharded, 1.0, donate=True)
    assert all(v.is_deleted() for v in sharded.values())
    for k, v in out.items():
        assert v.sharding.is_equivalent_to(shardings[k], v.ndim), k
    assert _ref(out) == pytest.approx(1.0, rel=1e-5)


def _program_hlo(sharded):
    leaves = jax.tree_util.tree_leaves(sharded)
    layout = _fast.mesh_layout(leaves)
    assert layout is not None
    fn = _fast._compiled(True, (2.0, 1e-6, "propagate", None), layout, ())
    return fn.lower(leaves, 1.0, None).compile().as_text()


def _entry(hlo):
    """The ENTRY computation's text (the fallback branch lives in its own)."""
    start = hlo.index("ENTRY")
    return hlo[start : hlo.index("\n}", start)]


def test_one_all_reduce_and_no_gather(mesh):
    sharded, _ = _trees(mesh)
    hlo = _program_hlo(sharded)
    assert "all-gather" not in hlo
    assert "all-to-all" not in hlo
    assert _entry(hlo).count("all-reduce(") == 1, _entry(hlo)


def test_axis_name_inside_shard_map(mesh):
    host = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
    spec = P("data", "model")
    x = jax.device_put(jnp.asarray(host), jax.sharding.NamedSharding(mesh, spec))

    def local(v):
        (out,), stats = gcj.clip_by_global_norm([v], 1.0, axis_name=("data", "model"))
        return out, stats.norm, gcj.global_norm([v], axis_name=("data", "model"))

    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=(spec, P(), P())))
    out, norm, norm2 = fn(x)
    want = float(np.linalg.norm(host.astype(np.float64)))
    assert float(norm) == pytest.approx(want, rel=1e-6)
    assert float(norm2) == pytest.approx(want, rel=1e-6)
    assert float(np.linalg.norm(np.asarray(out, np.float64))) == pytest.approx(1.0, rel=1e-5)
    entry = _entry(fn.lower(x).compile().as_text())
    assert entry.count("all-reduce(") <= 2  # one per call: the clip and the norm
    assert "all-gather" not in entry


@pytest.mark.parametrize("ord", [2.0, 1.0])
@pytest.mark.parametrize("nonfinite", ["propagate", "skip"])
def test_per_device_clip_inside_shard_map(mesh, ord, nonfinite):
    # No axis_name: each device clips its own shard by that shard's norm.
    # The norm's two branches (one pass, scaled) must agree on what varies
    # over the mesh, or lax.cond refuses them.
    host = np.random.default_rng(2).standard_normal((64, 32)).astype(np.float32)
    spec = P("data", "model")
    x = jax.device_put(jnp.asarray(host), jax.sharding.NamedSharding(mesh, spec))

    def local(v):
        (out,), stats = gc.clip_by_global_norm([v], 1.0, ord=ord, nonfinite=nonfinite)
        return out, stats.finite[None]

    fn = jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=(spec, P(("data", "model"))))
    out, finite = fn(x)
    assert np.asarray(finite).all()
    for rows in np.split(np.arange(64), 4):  # every shard's own norm is clipped to 1
        for cols in np.split(np.arange(32), 2):
            shard = np.asarray(out, np.float64)[np.ix_(rows, cols)]
            assert np.linalg.norm(shard.ravel(), ord) == pytest.approx(1.0, rel=1e-5)


def test_axis_name_overflow_goes_through_the_scaled_branch(mesh):
    host = np.full((64, 32), 1e30, np.float32)
    spec = P("data", "model")
    x = jax.device_put(jnp.asarray(host), jax.sharding.NamedSharding(mesh, spec))
    fn = jax.shard_map(
        lambda v: gcj.global_norm([v], axis_name=("data", "model")),
        mesh=mesh,
        in_specs=spec,
        out_specs=P(),
    )
    assert float(fn(x)) == pytest.approx(1e30 * math.sqrt(64 * 32), rel=1e-6)


def _gathered_sizes(hlo):
    """The element counts of every all-gather's result in ``hlo``."""
    shapes = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", hlo)
    return [math.prod(int(d) for d in shape.split(",") if d) for shape in shapes]


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_sharded_inside_a_callers_jit(axis_type):
    # Inside jit the arrays are tracers: XLA's partitioner places the
    # reductions. The results are still the unsharded ones. On an Explicit
    # mesh the tracers carry their specs and no leaf is gathered. On an Auto
    # mesh the specs are blank; leaves below GATHER elements are raveled and
    # concatenated, which gathers the sharded ones, and larger leaves never
    # are. (Reducing the small ones one by one instead took a 2000-leaf tree
    # from 25 s to 446 s to compile.)
    types = (getattr(jax.sharding.AxisType, axis_type),) * 2
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=types)
    sharded, single = _trees(mesh)
    fn = jax.jit(lambda t: gc.clip_by_global_norm(t, 1.0))
    out, stats = fn(sharded)
    assert float(stats.norm) == pytest.approx(_ref(single), rel=1e-6)
    for k in sharded:
        assert out[k].sharding.is_equivalent_to(sharded[k].sharding, sharded[k].ndim), k
    gathered = _gathered_sizes(fn.lower(sharded).compile().as_text())
    if axis_type == "Explicit":
        assert gathered == []
    else:
        small = [math.prod(shape) for shape, spec in SPECS.values() if spec != P()]
        assert gathered and all(n < _fast.GATHER for n in gathered), gathered
        assert sum(gathered) <= sum(n for n in small if n < _fast.GATHER)


@pytest.mark.parametrize("where", ["first", "last"])
def test_uncommitted_leaf_beside_sharded_leaves(mesh, where):
    # jnp.ones(3) is not committed to a device: jit places it beside the
    # sharded leaves, so it is not "on another device". A committed one is.
    sharded, single = _trees(mesh)
    loose = jnp.linspace(0.5, 2.0, 3)
    assert not loose.committed
    tree = {"0": loose, **sharded} if where == "first" else {**sharded, "~": loose}
    want = math.hypot(_ref(single), float(np.linalg.norm(np.asarray(loose, np.float64))))
    assert float(gc.global_norm(tree)) == pytest.approx(want, rel=1e-6)
    out, stats = gc.clip_by_global_norm(tree, 1.0)
    assert float(stats.norm) == pytest.approx(want, rel=1e-6)
    for k in sharded:
        assert out[k].sharding.is_equivalent_to(sharded[k].sharding, sharded[k].ndim), k
    stray = jax.device_put(loose, jax.devices()[3])
    with pytest.raises(ValueError, match=r"leaf \['~'\] is on .*move them to one device"):
        gc.global_norm({**tree, "~": stray})


@pytest.mark.parametrize("bad", ["both", "replicated"])  # split leaves stay whole, others join
def test_raise_names_the_bad_sharded_leaf(mesh, bad):
    sharded, _ = _trees(mesh)
    assert float(gcj.global_norm(sharded, nonfinite="raise")) > 0
    host = np.array(sharded[bad])
    host[0, 1] = np.nan
    sharded[bad] = jax.device_put(host, sharded[bad].sharding)
    with pytest.raises(gc.NonFiniteError, match=rf"leaf \['{bad}'\];"):
        gcj.clip_by_global_norm(sharded, 1.0, nonfinite="raise")


@pytest.fixture(scope="module")
def explicit_mesh():
    explicit = (jax.sharding.AxisType.Explicit,) * 2
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=explicit)


@pytest.mark.parametrize("fused", [None, False])
def test_leaf_on_an_explicit_mesh_whose_halves_do_not_divide(explicit_mesh, fused):
    # 8200 = 8 * 1025: the float32 sum's pairwise halving sliced it into
    # halves of 4100 and 2050, which JAX refuses to cut over 8 devices; the
    # fast path traces that sum in its lax.cond's scaled branch.
    host = np.linspace(-1.0, 3.0, 8200, dtype=np.float32)
    x = jax.device_put(host, jax.sharding.NamedSharding(explicit_mesh, P(("data", "model"))))
    want = float(np.linalg.norm(host.astype(np.float64)))
    with jax.set_mesh(explicit_mesh):
        norm = jax.jit(lambda t: gc.global_norm(t, fused=fused))([x])
        _, stats = jax.jit(lambda t: gc.clip_by_global_norm(t, 1.0, fused=fused))([x])
        leaf = jax.jit(lambda t: gc.leaf_norms(t, fused=fused))([x])
    for got in (norm, stats.norm, leaf[0]):
        assert float(got) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_per_example_sum_over_a_batch_sharded_on_an_explicit_mesh(explicit_mesh, reduce):
    # The sum over examples was a matmul contracting the sharded batch axis,
    # which JAX refuses without an out_sharding.
    host = {"w": np.arange(24.0, dtype=np.float32).reshape(8, 3), "b": np.ones(8, np.float32)}
    want, want_stats = gc.per_example_clip(host, 1.0, reduce=reduce)
    spec = jax.sharding.NamedSharding(explicit_mesh, P("data"))
    sharded = {k: jax.device_put(v, spec) for k, v in host.items()}
    with jax.set_mesh(explicit_mesh):
        for got, stats in (
            gc.per_example_clip(sharded, 1.0, reduce=reduce),
            jax.jit(lambda t: gc.per_example_clip(t, 1.0, reduce=reduce))(sharded),
        ):
            np.testing.assert_allclose(np.asarray(stats.norm), want_stats.norm, rtol=1e-6)
            for k in host:
                np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-6)


@pytest.mark.parametrize("per_layer", [False, True])
def test_per_example_over_a_batch_sharded_on_an_explicit_mesh(per_layer):
    # Under explicit sharding the two branches of the norm's lax.cond must
    # agree on sharding: exponents of 0 made unsharded did not.
    explicit = (jax.sharding.AxisType.Explicit,) * 2
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=explicit)
    host = {"w": np.ones((8, 3), np.float32), "b": np.full((8,), 2.0, np.float32)}
    want, want_stats = gc.per_example_clip(host, 1.0, reduce=None, per_layer=per_layer)
    sharded = {
        k: jax.device_put(v, jax.sharding.NamedSharding(mesh, P("data"))) for k, v in host.items()
    }
    with jax.set_mesh(mesh):
        got, stats = gcj.per_example_clip(sharded, 1.0, reduce=None, per_layer=per_layer)
    np.testing.assert_allclose(np.asarray(stats.norm), want_stats.norm, rtol=1e-6)
    for k in host:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-6)
        assert got[k].sharding.spec[0] == "data"


PER_EXAMPLE_SPECS = {
    # Shardings on the axes after the batch one: the reshape to (batch, rest)
    # raised on an Explicit mesh and gathered the leaf on an Auto one.
    "rest": {"w": P(None, None, "model"), "b": P(None, "model")},
    "batch and rest": {"w": P("data", None, "model"), "b": P("data")},
    # Batch axes sharded differently: adding the leaves' per-example sums
    # raised on an Explicit mesh.
    "mixed batch": {"w": P("data"), "b": P("model")},
}


@pytest.mark.parametrize("under_mesh", [True, False], ids=["set_mesh", "no_mesh_context"])
@pytest.mark.parametrize("reduce", ["sum", None])
@pytest.mark.parametrize("case", PER_EXAMPLE_SPECS)
@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_per_example_keeps_other_shardings(axis_type, case, reduce, under_mesh):
    # Without jax.set_mesh, a sum on an Explicit mesh raised: the result
    # sharding was a bare PartitionSpec, which JAX takes only under a mesh.
    types = (getattr(jax.sharding.AxisType, axis_type),) * 2
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=types)
    rng = np.random.default_rng(5)
    host = {
        "w": rng.standard_normal((8, 6, 4)).astype(np.float32),
        "b": rng.standard_normal((8, 4)).astype(np.float32),
    }
    want, want_stats = gc.per_example_clip(host, 1.0, reduce=reduce)
    specs = PER_EXAMPLE_SPECS[case]
    put = {k: jax.sharding.NamedSharding(mesh, spec) for k, spec in specs.items()}
    tree = {k: jax.device_put(v, put[k]) for k, v in host.items()}
    fn = jax.jit(lambda t: gc.per_example_clip(t, 1.0, reduce=reduce))
    with jax.set_mesh(mesh) if under_mesh else contextlib.nullcontext():
        results = [gc.per_example_clip(tree, 1.0, reduce=reduce), fn(tree)]
        gathered = _gathered_sizes(fn.lower(tree).compile().as_text())
    for got, stats in results:
        np.testing.assert_allclose(np.asarray(stats.norm), want_stats.norm, rtol=1e-6)
        for k in host:
            np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-6, atol=1e-7)
            spec = specs[k] if reduce is None else P(*tuple(specs[k])[1:])
            if case != "mixed batch" or axis_type == "Explicit":  # Auto: XLA's choice
                assert got[k].sharding.is_equivalent_to(
                    jax.sharding.NamedSharding(mesh, spec), got[k].ndim
                ), (k, got[k].sharding.spec)
    if case != "mixed batch" or axis_type == "Explicit":
        assert all(n <= 8 for n in gathered), gathered  # per-example norms at most
