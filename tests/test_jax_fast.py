"""The JAX fast path (gradclip.jax, and the top-level functions on JAX leaves).

Each case is checked against the generic array-API path (``fused=False``) or a
float64 NumPy reference. The sharded cases live in test_jax_sharding.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import numpy as np
import pytest

import gradclip as gc
from conftest import importorskip

jax = importorskip("jax")
jnp = jax.numpy
gcj = importorskip("gradclip.jax")
_fast = importorskip("gradclip.jax._fast")


def ref_norm(leaves, p=2.0):
    flat = np.concatenate([np.abs(np.asarray(x, np.float64)).ravel() for x in leaves])
    if math.isinf(p):
        return flat.max()
    return float(np.sum(flat**p) ** (1 / p))


def _tree(rng, dtype=jnp.float32, scale=1.0):
    """A mix of leaves above and below the gather threshold, one empty."""
    sizes = [(300, 300), (7,), (1,), (0,), (50, 40), (_fast.GATHER,), (3, 5, 2)]
    return {
        f"l{i}": jnp.asarray(rng.standard_normal(s) * scale, dtype) for i, s in enumerate(sizes)
    }


def _leaves(tree):
    return jax.tree_util.tree_leaves(tree)


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, 0.5, math.inf])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_fast_matches_generic_and_float64(p, dtype):
    tree = _tree(np.random.default_rng(1), jnp.dtype(dtype))
    fast = gc.global_norm(tree, ord=p)
    generic = gc.global_norm(tree, ord=p, fused=False)
    want = ref_norm(_leaves(tree), p)
    assert fast.dtype == jnp.float32
    assert float(fast) == pytest.approx(want, rel=2e-6)
    assert float(fast) == pytest.approx(float(generic), rel=2e-6)


@pytest.mark.parametrize("nonfinite", ["propagate", "zero", "skip"])
@pytest.mark.parametrize("max_norm", [0.5, 1e9])
def test_clip_matches_generic(nonfinite, max_norm):
    tree = _tree(np.random.default_rng(2))
    tree["l1"] = tree["l1"].at[3].set(jnp.inf)
    tree["l0"] = tree["l0"].at[0, 0].set(jnp.nan)
    out, stats = gcj.clip_by_global_norm(tree, max_norm, nonfinite=nonfinite)
    ref, ref_stats = gc.clip_by_global_norm(tree, max_norm, nonfinite=nonfinite, fused=False)
    for field in ("norm", "scale", "clipped", "finite"):
        np.testing.assert_allclose(
            np.asarray(getattr(stats, field)), np.asarray(getattr(ref_stats, field)), rtol=1e-6
        )
    for k in tree:
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref[k]), rtol=1e-6)


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        (1e30, "float32"),  # squares overflow float32
        (1e-30, "float32"),  # squares underflow (and XLA flushes subnormals)
        (1e35, "bfloat16"),  # squares overflow the float32 accumulator
        (300.0, "float16"),
        (1e-6, "float16"),
    ],
)
def test_overflow_and_underflow_take_the_scaled_branch(value, dtype):
    leaves = [jnp.full((1000,), value, dtype), jnp.full((_fast.GATHER + 3,), value, dtype)]
    want = ref_norm(leaves)
    assert float(gcj.global_norm(leaves)) == pytest.approx(want, rel=1e-6)
    out, stats = gcj.clip_by_global_norm(leaves, 1.0)
    assert float(stats.norm) == pytest.approx(want, rel=1e-6)
    assert ref_norm(out) == pytest.approx(min(want, 1.0), rel=1e-2)  # bfloat16 rounding


def test_tiny_leaves_next_to_normal_ones_do_not_trigger_a_wrong_norm():
    leaves = [jnp.full(10, 1e-30, jnp.float32), jnp.asarray([3.0, 4.0], jnp.float32)]
    assert float(gcj.global_norm(leaves)) == pytest.approx(5.0, rel=1e-7)
    leaves = [jnp.full(10, 1e-30, jnp.float32)]  # alone, the tiny leaf is the whole norm
    assert float(gcj.global_norm(leaves)) == pytest.approx(math.sqrt(10) * 1e-30, rel=1e-6)


def test_float32_sum_of_many_entries_is_accurate():
    # A sequential float32 sum stalls at 2**24; the norm must still be exact.
    x = jnp.ones((1 << 25,), jnp.float32)
    assert float(gcj.global_norm([x])) == pytest.approx(2**12.5, rel=1e-6)


def test_ord_as_an_array_scalar():
    # The programs are cached by their options: a jnp scalar ord (unhashable)
    # is parsed to a float first, as the top-level functions do.
    tree = [jnp.asarray([3.0, 4.0])]
    for p in (jnp.float32(2.0), np.float64(2.0), "2"):
        assert float(gcj.global_norm(tree, p)) == 5.0
        assert float(gcj.leaf_norms(tree, p)[0]) == 5.0
        assert float(gcj.clip_by_global_norm(tree, 1.0, ord=p)[1].norm) == 5.0
        assert float(gcj.clip_by_norm(tree, 1.0, ord=p)[1].norm[0]) == 5.0


def test_complex_leaves():
    z = jnp.asarray([3 + 4j, 1e30 + 0j], jnp.complex64)
    assert float(gcj.global_norm([z])) == pytest.approx(1e30, rel=1e-6)
    out, _ = gcj.clip_by_global_norm([jnp.asarray([3 + 4j], jnp.complex64)], 1.0)
    np.testing.assert_allclose(np.asarray(out[0]), [0.6 + 0.8j], rtol=1e-6)


def test_all_zero_and_empty_trees():
    assert float(gcj.global_norm([jnp.zeros(5)])) == 0.0
    _, stats = gcj.clip_by_global_norm([jnp.zeros(5), jnp.zeros(0)], 1.0)
    assert float(stats.norm) == 0.0
    assert float(stats.scale) == 1.0


def test_donate_writes_into_the_input_buffers():
    x = jnp.arange(1.0, 100_001.0, dtype=jnp.float32)
    pointer = x.unsafe_buffer_pointer()
    (out,), stats = gcj.clip_by_global_norm([x], 1.0, donate=True)
    assert x.is_deleted()
    assert out.unsafe_buffer_pointer() == pointer
    assert ref_norm([out]) == pytest.approx(1.0, rel=1e-5)
    # With nothing to clip the leaves come back unchanged, and still in place.
    y = jnp.asarray([0.3, 0.4], jnp.float32)
    (same,), stats = gcj.clip_by_global_norm([y], 1.0, donate=True)
    np.testing.assert_array_equal(np.asarray(same), np.float32([0.3, 0.4]))
    assert not bool(stats.clipped)


@pytest.mark.parametrize("fn", ["clip_by_global_norm", "clip_by_norm", "clip_by_value"])
def test_donating_one_array_twice_names_the_leaves(fn):
    # Tied weights: XLA raised "Attempt to donate the same buffer twice",
    # naming no leaf.
    tied = jnp.ones(3)
    tree = {"embed": tied, "head": tied}
    with pytest.raises(ValueError, match=r"leaf \['head'\] is \(or shares the buffer of\) leaf"):
        getattr(gcj, fn)(tree, 1.0, donate=True)
    assert not tied.is_deleted()
    out = getattr(gcj, fn)(tree, 1.0)  # without donating: each leaf on its own
    leaves = jax.tree.leaves(out[0] if isinstance(out, tuple) else out)
    np.testing.assert_array_equal(np.asarray(leaves[0]), np.asarray(leaves[1]))


def test_donating_two_arrays_of_one_buffer_names_the_leaves():
    # jax.device_put of tied weights gives two arrays of one buffer: XLA's
    # "Attempt to donate the same buffer twice" came through, naming no leaf.
    w = jnp.full(4, 3.0)
    tree = jax.device_put({"embed": w, "unembed": w}, jax.devices()[0])
    assert tree["embed"] is not tree["unembed"]
    with pytest.raises(ValueError, match=r"leaf \['unembed'\] is \(or shares the buffer of\)"):
        gcj.clip_by_global_norm(tree, 1.0, donate=True)
    assert not tree["embed"].is_deleted()


@pytest.mark.parametrize(
    "clip",
    [
        lambda t: gcj.clip_by_global_norm(t, 1.0, donate=True)[0],
        lambda t: gcj.clip_by_norm(t, 1.0, donate=True)[0],
        lambda t: gcj.clip_by_block_rms(t, 1.0, donate=True),
        lambda t: gcj.clip_by_value(t, 1.0, donate=True),
    ],
)
def test_grad_through_a_donating_call(clip):
    # The backward pass read the forward pass's donated inputs: "Array has
    # been deleted" for clip_by_norm and clip_by_block_rms.
    def loss(tree):
        return sum(jnp.sum(jnp.sin(x)) for x in clip(tree))

    tree = [jnp.asarray([3.0, -1.0, 2.0, 0.5]), jnp.asarray([1.0, 4.0, -2.0])]
    got = jax.grad(loss)(tree)
    want = jax.grad(lambda t: sum(jnp.sum(jnp.sin(x)) for x in clip(t)))(
        [jnp.array(x) for x in tree]
    )
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not any(x.is_deleted() for x in tree)
    # Under vmap alone the batched arrays are still donated, as documented.
    batched = jnp.ones((3, 4))
    jax.vmap(lambda t: clip([t, t * 2.0]))(batched)
    assert batched.is_deleted()


@pytest.mark.parametrize(
    ("fn", "args"),
    [
        ("clip_by_global_norm", (1.0,)),
        ("clip_by_norm", (1.0,)),
        ("clip_by_value", (0.5,)),
        ("clip_by_block_rms", (0.5,)),
    ],
)
def test_raise_checks_first_then_donates(fn, args):
    # nonfinite="raise" names the bad leaf before the program runs, so a
    # failed call donated nothing, and a passing call donates as asked.
    bad = {"w": jnp.ones(5), "b": jnp.asarray([1.0, jnp.inf])}
    with pytest.raises(gc.NonFiniteError, match=r"leaf \['b'\]"):
        getattr(gcj, fn)(bad, *args, nonfinite="raise", donate=True)
    assert not any(x.is_deleted() for x in bad.values())
    good = {"w": jnp.arange(1.0, 1001.0), "b": jnp.full((3,), 2.0)}
    want = getattr(gcj, fn)(good, *args)
    pointer = good["w"].unsafe_buffer_pointer()
    got = getattr(gcj, fn)(good, *args, nonfinite="raise", donate=True)
    assert good["w"].is_deleted()
    out = got if fn in ("clip_by_value", "clip_by_block_rms") else got[0]
    assert out["w"].unsafe_buffer_pointer() == pointer
    expected = want if fn in ("clip_by_value", "clip_by_block_rms") else want[0]
    for key in ("w", "b"):
        np.testing.assert_array_equal(np.asarray(out[key]), np.asarray(expected[key]))


def test_raise_with_a_given_norm_checks_that_norm():
    grads = [jnp.asarray([1.0, jnp.nan])]
    out, _ = gcj.clip_by_global_norm(grads, 1.0, norm=2.0, nonfinite="raise")
    assert np.isnan(np.asarray(out[0])[1])  # as in the generic path: the norm is what is checked
    with pytest.raises(gc.NonFiniteError, match="the given norm is not finite"):
        gcj.clip_by_global_norm([jnp.ones(2)], 1.0, norm=jnp.inf, nonfinite="raise")
    with pytest.raises(gc.NonFiniteError, match=r"leaf \[1\]"):
        gc.clip_by_norm([jnp.ones(2), jnp.ones(2)], 1.0, norm=jnp.asarray([1.0, jnp.nan]),
                        nonfinite="raise")  # fmt: skip


def test_nan_norm_reaches_every_leaf():
    # The skip-the-write branch must not swallow a NaN scale (torch's arithmetic).
    out, stats = gcj.clip_by_global_norm([jnp.asarray([1.0, jnp.nan]), jnp.ones(3)], 1.0)
    assert math.isnan(float(stats.scale))
    assert np.isnan(np.asarray(out[1])).all()


def _branching_over_leaves(platform: str) -> int:
    """Conditionals of two or more branches returning leaves, in a clip lowered for ``platform``."""
    leaves = [jnp.ones((12345,), jnp.float32), jnp.ones((3, 7), jnp.float32)]
    traced = jax.jit(lambda t: gcj.clip_by_global_norm(t, 1.0)).trace(leaves)
    found = 0

    def walk(op) -> None:
        nonlocal found
        if op.operation.name in ("stablehlo.case", "stablehlo.if") and len(op.regions) > 1:
            found += any("12345" in str(r.type) for r in op.results)
        for region in op.regions:
            for block in region:
                for inner in block:
                    walk(inner)

    walk(traced.lower(lowering_platforms=(platform,)).compiler_ir("stablehlo").operation)
    return found


@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_the_write_is_skipped_on_every_platform(platform):
    # One conditional skips the write when the scale is 1. Kept on GPUs too: on
    # an H100 without it (stop 28) a 3.76 GiB tree took 7.95 ms unclipped,
    # against 4.9 ms with it (stop 24), and 8.0 ms clipped either way.
    assert _branching_over_leaves(platform) == 1


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="XLA's GPU passes made the select")
def test_the_norms_fallback_stays_a_conditional_on_a_gpu():
    # XLA's ConditionalSimplifier rewrote the lax.cond of the norm's two-pass
    # fallback into a select of both branches on GPUs: every call read the
    # tree three times (an H100's llm norm: 4.0 ms, the one-pass sum 2.0 ms).
    leaves = [jnp.ones(1 << 20), jnp.ones(1 << 16)]
    for fn in (gc.global_norm, lambda g: gc.clip_by_global_norm(g, 1.0)):
        hlo = jax.jit(fn).lower(leaves).compile().as_text()
        assert hlo.count(" conditional(") == (1 if fn is gc.global_norm else 2)


def test_under_vmap_each_example_gets_its_own_scale():
    batch = {"w": jnp.asarray([[3.0, 4.0], [0.3, 0.4], [30.0, 40.0]])}
    out, stats = jax.vmap(lambda t: gcj.clip_by_global_norm(t, 1.0))(batch)
    np.testing.assert_allclose(np.asarray(stats.norm), [5.0, 0.5, 50.0], rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(out["w"]), [[0.6, 0.8], [0.3, 0.4], [0.6, 0.8]], rtol=1e-5
    )


def test_inside_jit_and_grad():
    tree = _tree(np.random.default_rng(3))
    jitted = jax.jit(lambda t, m: gcj.clip_by_global_norm(t, m)[1].norm)
    assert float(jitted(tree, 1.0)) == pytest.approx(ref_norm(_leaves(tree)), rel=1e-6)
    x = jnp.asarray([3.0, -4.0, 12.0])
    g = jax.grad(lambda v: gcj.global_norm([v]))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(x) / 13.0, rtol=1e-6)
    g = jax.grad(lambda v: gcj.global_norm([v * 1e30]))(x)  # through the scaled branch
    np.testing.assert_allclose(np.asarray(g), np.asarray(x) / 13.0 * 1e30, rtol=1e-5)


@pytest.mark.parametrize(("p", "scale"), [(100.0, 1.0), (3.5, 1e30), (3.5, 1.0)])
def test_grad_where_the_one_pass_sum_overflows(p, scale):
    # The one-pass sum of a**p overflows (ord=100 near 4, ord=3.5 near 1e30)
    # and the scaled branch gives the norm; the gradient must be that of
    # the generic path, not 0 * inf = NaN from the discarded sum.
    x = jnp.asarray([3.0, -4.0]) * scale
    weights = jnp.asarray([1.0, 2.0])

    def clipped(fused):
        return lambda v: jnp.sum(
            gc.clip_by_global_norm([v], 1.0, ord=p, eps=0.0, fused=fused)[0][0] * weights
        )

    for f in (lambda v: gcj.global_norm([v], p), clipped(None)):
        assert np.all(np.isfinite(np.asarray(jax.grad(f)(x))))
    want = jax.grad(lambda v: gc.global_norm([v], p, fused=False))(x)
    np.testing.assert_allclose(
        np.asarray(jax.grad(lambda v: gcj.global_norm([v], p))(x)), np.asarray(want), rtol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(jax.grad(clipped(None))(x)), np.asarray(jax.grad(clipped(False))(x)), rtol=1e-5
    )


def test_registered_pytree_nodes():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Params:
        w: jax.Array
        b: jax.Array

    params = Params(jnp.asarray([3.0, 4.0]), jnp.asarray([12.0]))
    out, stats = gcj.clip_by_global_norm(params, 1.0)
    assert isinstance(out, Params)
    assert float(stats.norm) == pytest.approx(13.0)


def test_max_norm_array_does_not_recompile():
    tree = [jnp.asarray([3.0, 4.0])]
    _fast._compiled.cache_clear()
    for m in (1.0, 2.0, jnp.float32(3.0)):
        gcj.clip_by_global_norm(tree, m)
    assert _fast._compiled.cache_info().currsize == 1


def test_many_small_leaves_are_reduced_together():
    # 500 leaves below the gather threshold: one concatenation and a handful
    # of reductions in the program gradclip emits, not one per leaf (a sum
    # per leaf emits 500). Counted before XLA's passes, on any platform: after
    # them, a GPU's text names each reduction fusion several times, and its
    # horizontal fusion would hide reductions per leaf anyway.
    rng = np.random.default_rng(4)
    host = [np.float32(rng.standard_normal(int(n))) for n in rng.integers(16, 2048, 500)]
    leaves = [jnp.asarray(x) for x in host]
    emitted = jax.jit(gc.global_norm).lower(leaves).as_text()
    assert 0 < emitted.count("stablehlo.reduce") < 20
    # And XLA's CPU compiler keeps them together (it compiles a kernel per reduction).
    cpu = jax.devices("cpu")[0]
    on_cpu = [jax.device_put(x, cpu) for x in host]
    hlo = jax.jit(gc.global_norm).lower(on_cpu).compile().as_text()
    assert 0 < hlo.count(" reduce(") + hlo.count("reduce_fusion") < 20
    assert float(gcj.global_norm(leaves)) == pytest.approx(ref_norm(leaves), rel=1e-6)


def test_errors_name_the_leaf():
    with pytest.raises(TypeError, match=r"\['b'\].*int32"):
        gcj.clip_by_global_norm({"a": jnp.ones(2), "b": jnp.ones(2, jnp.int32)}, 1.0)
    with pytest.raises(ValueError, match="max_norm"):
        gcj.clip_by_global_norm([jnp.ones(2)], -1.0)
    with pytest.raises(gc.NonFiniteError, match=r"\['b'\]"):
        gcj.global_norm({"a": jnp.ones(2), "b": jnp.asarray([jnp.nan])}, nonfinite="raise")


def test_axis_name_inside_shard_map_on_one_device():
    mesh = jax.make_mesh((1,), ("d",))
    spec = jax.sharding.PartitionSpec("d")
    x = jax.device_put(jnp.asarray([3.0, 4.0, 12.0]), jax.sharding.NamedSharding(mesh, spec))

    def local(v):
        out, stats = gcj.clip_by_global_norm([v], 1.0, axis_name="d")
        return out[0], stats.norm

    _out, norm = jax.shard_map(
        local, mesh=mesh, in_specs=spec, out_specs=(spec, jax.sharding.PartitionSpec())
    )(x)
    assert float(norm) == pytest.approx(13.0)
    with pytest.raises(ValueError, match="axis_name"):
        gcj.global_norm([x], ord=math.inf, axis_name="d")


@pytest.mark.parametrize(
    ("fn", "args"),
    [
        (gcj.leaf_norms, ()),
        (gcj.clip_by_norm, (1.0,)),
        (gcj.clip_by_value, (0.5,)),
        (gcj.clip_by_block_rms, (0.5,)),
    ],
)
def test_per_leaf_functions_match_the_top_level(fn, args):
    tree = _tree(np.random.default_rng(5))
    got = fn(tree, *args)
    want = getattr(gc, fn.__name__)(tree, *args, fused=False)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


@pytest.mark.parametrize(
    ("fn", "args"),
    [
        ("global_norm", ()),
        ("leaf_norms", ()),
        ("clip_by_global_norm", (1.0,)),
        ("clip_by_norm", (1.0,)),
        ("clip_by_value", (1.0,)),
        ("per_example_clip", (1.0,)),
    ],
)
@pytest.mark.parametrize("fused", [None, False])
def test_raise_under_jit_says_why_and_what_to_use(fn, args, fused):
    tree = [jnp.ones((4, 3)), jnp.ones((4,))]
    kw = {} if fn == "per_example_clip" else {"fused": fused}

    def call(policy):
        return lambda g: getattr(gc, fn)(g, *args, nonfinite=policy, **kw)

    # fused=False raised JAX's bare TracerBoolConversionError, and the norms
    # suggested "skip", which they refuse.
    with pytest.raises(TypeError, match=r'nonfinite="raise".*jax\.jit') as caught:
        jax.jit(call("raise"))(tree)
    (instead,) = re.findall(r'use nonfinite="(\w+)"', str(caught.value))
    jax.jit(call(instead))(tree)  # what it suggests runs under jit
    call("raise")(tree)  # outside a transform it checks and returns


@pytest.mark.parametrize("fn", ["clip_by_global_norm", "clip_by_norm"])
def test_raise_refuses_an_overflowing_norm_before_the_donated_program(fn):
    # The leaves are finite, the float32 norm is inf: the norm is checked
    # by a pass of its own, before the program that would donate them runs.
    tree = {"big": jnp.full(8, 2e38, jnp.float32), "small": jnp.ones(3, jnp.float32)}
    with pytest.raises(gc.NonFiniteError, match="overflows float32"):
        getattr(gcj, fn)(tree, 1.0, nonfinite="raise", donate=True)
    assert not tree["big"].is_deleted()
    np.testing.assert_array_equal(np.asarray(tree["big"]), np.full(8, 2e38, np.float32))
    _, stats = getattr(gcj, fn)({"small": tree["small"]}, 1.0, nonfinite="raise", donate=True)
    np.testing.assert_allclose(np.asarray(stats.norm), math.sqrt(3.0), rtol=1e-6)


def test_a_number_bound_of_a_half_precision_leaf_is_rounded_once():
    # Passed to the compiled program, the bound became a float32 that the
    # clamp rounded again: 1 + 2**-11 + 2**-40 gave float16 1.0 there and
    # 1.001 on the generic path (and in NumPy).
    lo = 1 + 2.0**-11 + 2.0**-40
    host = [np.array([-52.7, 0.19, 2.0], np.float16), np.array([-1.0, 3.0], np.float32)]
    want = [np.maximum(h, np.asarray(lo, h.dtype)) for h in host]
    assert want[0][0] == np.float16(1.001)
    tree = [jnp.asarray(h) for h in host]
    for clip in (
        functools.partial(gc.clip_by_value, fused=True),
        functools.partial(gc.clip_by_value, fused=False),
        gcj.clip_by_value,
        jax.jit(gcj.clip_by_value, static_argnames="lo"),
    ):
        for got, w in zip(clip(tree, lo=lo), want, strict=True):
            np.testing.assert_array_equal(np.asarray(got), w)
    got = gcj.clip_by_value((x for x in tree), hi=-lo)  # a generator, negated bound
    np.testing.assert_array_equal(np.asarray(got[0]), np.minimum(host[0], -want[0][0]))


def test_a_negative_zero_bound_is_not_a_positive_zero_one():
    # Baked into the program, -0.0 took the program compiled for 0.0 (equal
    # keys of its cache): +0 where a fresh process, and the generic path, give -0.
    x = [jnp.asarray([-1.0, 2.0], jnp.float16)]
    for lo in (0.0, -0.0):
        want = gc.clip_by_value(x, lo=lo, fused=False)[0]
        for got in (gc.clip_by_value(x, lo=lo)[0], gcj.clip_by_value(x, lo=lo)[0]):
            np.testing.assert_array_equal(np.signbit(np.asarray(got)), np.signbit(want))


def test_per_example_clip_takes_every_number_type_without_compiling():
    tree = {"w": jnp.ones((3, 4))}
    program = gcj._program(
        "per_example",
        False,
        tuple(
            sorted(
                {
                    "axis": 0,
                    "reduce": "sum",
                    "per_layer": False,
                    "split": "uniform",
                    "eps": 1e-6,
                    "nonfinite": "propagate",
                }.items()
            )
        ),
        (),
    )
    gcj.per_example_clip(tree, 1.0)
    size = program._cache_size()
    for bound in (2, np.float32(0.5), np.int64(3), np.float64(0.25)):
        gcj.per_example_clip(tree, bound)
    assert program._cache_size() == size  # int and NumPy numbers compiled anew


def test_value_and_rms_bounds_are_arguments_of_the_program():
    host = np.array([-3.0, 0.2, 9.0], np.float32)
    x = [jnp.asarray(host)]
    static = (("nonfinite", "propagate"),)
    sizes = []
    for c in (1.0, 2.0):
        np.testing.assert_array_equal(np.asarray(gcj.clip_by_value(x, c)[0]), np.clip(host, -c, c))
        out = gcj.clip_by_value(x, lo=jnp.asarray(-c / 2), hi=c)[0]
        np.testing.assert_array_equal(np.asarray(out), np.clip(host, -c / 2, c))
        rms = float(jnp.sqrt(jnp.mean(gcj.clip_by_block_rms(x, jnp.asarray(c))[0] ** 2)))
        assert rms == pytest.approx(c, rel=1e-6)
        programs = (gcj._program(body, False, static, ()) for body in ("value", "block_rms"))
        sizes.append([p._cache_size() for p in programs])
    assert sizes[1] == sizes[0]  # new bounds, nothing compiled
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        gcj.clip_by_block_rms(x, -1.0)


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("reduce", ["sum", None])
def test_per_example_clip_compiled_matches_the_top_level(per_layer, reduce):
    rng = np.random.default_rng(3)
    tree = {"w": jnp.asarray(rng.standard_normal((6, 4, 3)), jnp.float32), "b": jnp.ones((6, 5))}
    kwargs = {"reduce": reduce, "per_layer": per_layer, "split": "uniform", "eps": 1e-6}
    static = tuple(sorted({**kwargs, "axis": 0, "nonfinite": "propagate"}.items()))
    program = gcj._program("per_example", False, static, ())
    sizes = []
    for bound in (0.5, 2.0):
        got, gstats = gcj.per_example_clip(tree, bound, **kwargs)
        sizes.append(program._cache_size())
        want, wstats = gc.per_example_clip(tree, bound, **kwargs)
        for a, b in zip(_leaves(got), _leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
        for a, b in zip(gstats, wstats, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    assert sizes[1] == sizes[0]  # a new bound, nothing compiled
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        gcj.per_example_clip(tree, [1.0, 0.0] if per_layer else 0.0, per_layer=per_layer)


@pytest.mark.parametrize("array", [np.asarray, jnp.asarray])
def test_per_example_clip_takes_per_layer_bounds_as_a_1d_array(array):
    # As the top-level function does: one bound per leaf, in flattening order.
    tree = {"a": jnp.asarray([[3.0, 4.0], [0.3, 0.4]]), "b": jnp.asarray([[12.0], [1.0]])}
    bounds = array([1.0, 2.0])
    _, want = gc.per_example_clip(tree, bounds, per_layer=True, eps=0.0)
    _, got = gcj.per_example_clip(tree, bounds, per_layer=True, eps=0.0)
    np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(want.scale))
    if array is np.asarray:  # host values are checked; device ones would need a sync
        with pytest.raises(ValueError, match="max_norm must be > 0"):
            gcj.per_example_clip(tree, array([1.0, -2.0]), per_layer=True)


def test_per_example_clip_donates_when_it_keeps_the_examples():
    grads = {"w": jnp.ones((4, 3)) * 2.0}
    kept = grads["w"]
    out, stats = gcj.per_example_clip(grads, 1.0, reduce=None, donate=True)
    assert kept.is_deleted()
    np.testing.assert_allclose(np.asarray(out["w"]), 1 / np.sqrt(3), rtol=1e-5)
    assert int(stats.num_clipped) == 4


def _many_shapes(rng):
    """Leaves of 256 distinct small sizes on the CPU: XLA compiles a kernel for each.

    Committed to the CPU device whatever the default backend, so that the
    programs over them compile for the CPU, whose options these tests are about.
    """
    cpu = jax.devices("cpu")[0]
    sizes = range(1, _fast._MANY_SHAPES + 1)
    return [jax.device_put(np.float32(rng.standard_normal(n) * 10), cpu) for n in sizes]


def _fast_compile():
    """The part of FAST_COMPILE this XLA's CPU compiler has (it has -O0 at least)."""
    options = dict(_fast._accepted(tuple(sorted(_fast.FAST_COMPILE.items()))))
    assert options.get("xla_backend_optimization_level") == 0
    return options


def test_compile_options_only_for_many_small_distinct_leaves():
    many = _many_shapes(np.random.default_rng(5))
    assert gcj.compiler_options(many) == _fast_compile()
    assert gcj.compiler_options(many[:-1]) == {}  # one distinct shape too few
    assert gcj.compiler_options([many[-1]] * 300) == {}  # one shape: one kernel, compiled once
    # 257 shapes, but a large leaf: -O0 code is slow on it
    assert gcj.compiler_options([*many, jnp.ones(600_000, device=many[0].device)]) == {}
    seen = []
    jax.jit(lambda tree: seen.append(gcj.compiler_options(tree)))(many)
    assert seen == [{}]  # a trace: its caller compiles the program


def test_compile_options_only_for_programs_compiled_for_the_cpu(monkeypatch):
    # The options are the CPU compiler's: they follow the platform jax.jit
    # compiles for, that of the committed leaves, else of the default device.
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        loose = [jnp.asarray(np.asarray(x)) for x in _many_shapes(np.random.default_rng(5))]
        assert not any(x.committed for x in loose)
        assert gcj.compiler_options(loose) == _fast_compile()
    on_cpu = jax.default_backend() == "cpu"
    assert gcj.compiler_options(loose) == (_fast_compile() if on_cpu else {})
    # Moved to a GPU's default device if there is one: no CPU options for its compile.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert gcj.compiler_options(loose) == {}
    committed = [jax.device_put(x, cpu) for x in loose]
    assert gcj.compiler_options(committed) == _fast_compile()  # jit compiles these for the CPU
    assert gcj.compiler_options([*loose, committed[0]]) == _fast_compile()  # moved to the CPU


@pytest.mark.parametrize("scale", [1.0, 1e30])  # the one-pass sum, and the scaled fallback
def test_fast_compile_gives_the_bits_of_xla_defaults(monkeypatch, scale):
    monkeypatch.setattr(_fast, "_REJECTED", [])
    tree = _many_shapes(np.random.default_rng(6))
    tree[7] = tree[7] * scale
    # Inside the caller's jit: compiled with XLA's defaults.
    want, want_stats = jax.jit(lambda t: gc.clip_by_global_norm(t, 1.0))(tree)
    static = {"axis_name": None, "eps": 1e-6, "layout": None, "nonfinite": "propagate", "ord": 2.0}
    options = tuple(sorted(_fast_compile().items()))
    fast = gcj._program("clip", True, tuple(static.items()), options)
    norm = ref_norm(tree)
    got, stats = gcj.clip_by_global_norm(tree, 1.0, donate=True)
    assert _fast._REJECTED == []  # XLA took the options: no fallback to its defaults
    assert fast._cache_size() == 1  # this program ran, compiled with these options
    assert float(stats.norm) == float(want_stats.norm) == pytest.approx(norm, rel=1e-6)
    assert float(stats.scale) == float(want_stats.scale)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_constants_inside_a_callers_jit_compile_with_its_options():
    # Concrete leaves inside a trace: gradclip's program is nested in the
    # caller's and takes no options of its own (jax refuses them there).
    tree = _many_shapes(np.random.default_rng(7))
    got, stats = jax.jit(lambda bound: gc.clip_by_global_norm(tree, bound))(1.0)
    want, want_stats = gc.clip_by_global_norm(tree, 1.0)
    assert float(stats.norm) == float(want_stats.norm)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_options_this_xla_lacks_are_left_out(monkeypatch):
    # XLA removes options (jaxlib 0.11 has no xla_cpu_use_fusion_emitters):
    # the rest are still taken.
    monkeypatch.setattr(_fast, "FAST_COMPILE", {**_fast.FAST_COMPILE, "xla_no_such_option": 1})
    monkeypatch.setattr(_fast, "_REJECTED", [])
    tree = _many_shapes(np.random.default_rng(8))
    options = gcj.compiler_options(tree)
    assert "xla_no_such_option" not in options
    assert options.get("xla_backend_optimization_level") == 0
    _, stats = gcj.clip_by_global_norm(tree, 1.0)
    assert _fast._REJECTED == []
    assert float(stats.norm) == pytest.approx(ref_norm(tree), rel=1e-6)


def test_an_xla_without_the_options_compiles_with_its_defaults(monkeypatch):
    # Options that passed the probe but that the program's compile refuses.
    monkeypatch.setattr(_fast, "_accepted", lambda options: (("xla_no_such_option", 1),))
    monkeypatch.setattr(_fast, "_REJECTED", [])
    tree = _many_shapes(np.random.default_rng(8))
    want = ref_norm(tree)
    out, stats = gcj.clip_by_global_norm(tree, 1.0, donate=True)  # the refused compile ran nothing
    assert "xla_no_such_option" in _fast._REJECTED[0]
    assert float(stats.norm) == pytest.approx(want, rel=1e-6)
    assert float(gc.global_norm(out)) == pytest.approx(1.0, rel=1e-5)
    assert gcj.compiler_options(tree) == {}  # not tried again


def test_raise_names_the_bad_leaf_among_many_small_ones():
    many = _many_shapes(np.random.default_rng(9))
    cpu = many[0].device
    tree = [*many, jnp.ones(_fast.GATHER, device=cpu), jnp.ones(3, jnp.bfloat16, device=cpu)]
    tree[100] = tree[100].at[-1].set(jnp.nan)
    tree[-2] = tree[-2].at[5].set(-jnp.inf)
    with pytest.raises(gc.NonFiniteError, match=r"leaf \[100\] \(and 1 more\)"):
        gcj.global_norm(tree, nonfinite="raise")
    tree[100], tree[-2] = many[100], jnp.ones(_fast.GATHER, device=cpu)
    tree[-1] = tree[-1].at[1].set(jnp.nan)  # alone in its dtype's group
    with pytest.raises(gc.NonFiniteError, match=rf"leaf \[{len(tree) - 1}\];"):
        gc.clip_by_global_norm(tree, 1.0, nonfinite="raise")
    assert float(gcj.global_norm([jnp.ones(0)] * 2, nonfinite="raise")) == 0.0  # nothing to flag


def test_leaves_of_other_libraries_and_array_eps_raise():
    # jit would take a NumPy leaf beside JAX ones, or a Python float, silently.
    mixed = {"w": jnp.array([3.0, 4.0]), "b": np.array([1.0], np.float32)}
    with pytest.raises(TypeError, match=r"leaf \['b'\] is a numpy array"):
        gcj.clip_by_global_norm(mixed, 1.0)
    with pytest.raises(TypeError, match=r"leaf \['c'\] is a builtins.float, not an array"):
        gcj.global_norm({"w": jnp.array([3.0, 4.0]), "c": 2.0})
    with pytest.raises(TypeError, match="eps must be a number"):  # was: unhashable type
        gcj.clip_by_global_norm([jnp.array([3.0, 4.0])], 1.0, eps=jnp.array(1e-6))
    # NumPy leaves alone go to the device, as jit takes them.
    norm = gcj.global_norm({"b": np.array([3.0, 4.0], np.float32)})
    assert float(norm) == 5.0


@pytest.mark.parametrize("others", [True, False], ids=["beside-float32", "alone"])
def test_an_empty_float64_leaf_makes_the_norm_float64(others):
    # The fast path dropped empty leaves before choosing the result dtype:
    # the norm came back float32 beside a float64 scale.
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        tree = {"emb": jnp.zeros((0, 4), jnp.float64)}
        if others:
            tree["w"] = jnp.full(3, 2.0, jnp.float32)
        want = gc.global_norm(tree, fused=False)
        assert want.dtype == jnp.float64
        assert gc.global_norm(tree).dtype == jnp.float64
        _, stats = gc.clip_by_global_norm(tree, 1.0)
        assert stats.norm.dtype == stats.scale.dtype == jnp.float64
        assert float(stats.norm) == float(want)
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.mark.parametrize("fn", ["global_norm", "clip_by_global_norm", "clip_by_norm"])
def test_generators_and_dict_views_as_at_the_top_level(fn):
    # The leaf check consumed the generator; jit was then given it empty.
    grads = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([12.0])}
    args = () if fn == "global_norm" else (1.0,)
    for make in (lambda: iter(grads.values()), grads.values):
        got = getattr(gcj, fn)(make(), *args)
        want = getattr(gc, fn)(list(grads.values()), *args)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
