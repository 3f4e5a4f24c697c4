"""Bad input: a clear exception naming the leaf, and nothing modified by a failed in-place call."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

import gradclip as gc
from conftest import importorskip

INPLACE = [gc.clip_by_global_norm_, gc.clip_by_norm_]


def _tree(xp):
    return {"encoder": [xp.array(np.full(3, 2.0), "float32") for _ in range(4)], "head": None}


@pytest.mark.parametrize("bad", [-1.0, math.nan, -math.inf])
@pytest.mark.parametrize("fn", [gc.clip_by_global_norm, gc.clip_by_norm, *INPLACE])
def test_bad_max_norm(xp, fn, bad):
    with pytest.raises(ValueError, match="max_norm must be a number >= 0"):
        fn(_tree(xp), bad)


@pytest.mark.parametrize("bad", [True, "1.0", None, [1.0]])
def test_max_norm_wrong_type(xp, bad):
    with pytest.raises(TypeError, match="max_norm"):
        gc.clip_by_global_norm(_tree(xp), bad)


@pytest.mark.parametrize("dtype", ["bool", "complex64"])
@pytest.mark.parametrize("fn", [gc.clip_by_global_norm, *INPLACE])
def test_max_norm_of_a_dtype_that_is_not_real(xp, fn, dtype):
    # float() took np.array(True) as 1 and dropped an imaginary part with a
    # warning (an error here); a device array was used as it was.
    tree = _tree(xp)
    host = np.array(1 + 1j if dtype == "complex64" else True).astype(dtype)
    bounds = [host, host[()], *([xp.array(host)] if xp.has(dtype) else [])]
    for bad in bounds:
        with pytest.raises(TypeError, match=r"max_norm must be a (real )?number; got"):
            fn(tree, bad)
    with pytest.raises(TypeError, match=r"eps must be a real number; got one of dtype <U3"):
        fn(tree, 1.0, eps=np.array("0.1"))
    assert all(np.array_equal(xp.numpy(x), np.full(3, 2.0)) for x in tree["encoder"])


@pytest.mark.parametrize("fn", [gc.clip_by_global_norm, gc.clip_by_norm, *INPLACE])
def test_max_norm_array_that_is_not_0d(xp, fn):
    # A (1,) or (2,) array would broadcast into the leaves, or flip their sign
    # unchecked (only 0-d arrays skip the >= 0 check, to spare a sync).
    tree = _tree(xp)
    for bad in (np.array([-1.0], "float32"), np.array([1.0, 1.0], "float32")):
        with pytest.raises(ValueError, match=r"max_norm must be a number or a 0-d array"):
            fn(tree, xp.array(bad))
    assert all(np.array_equal(xp.numpy(x), np.full(3, 2.0)) for x in tree["encoder"])


@pytest.mark.parametrize("fn", [gc.clip_by_global_norm, *INPLACE[:1]])
def test_given_global_norm_that_is_not_0d(xp, fn):
    # One global norm: a (1,) or (2,) array would broadcast into per-entry
    # scales, or fail between two leaves' writes.
    tree = _tree(xp)
    for bad in (np.array([20.0], "float32"), np.array([20.0, 20.0], "float32")):
        with pytest.raises(ValueError, match=r"norm= \(the global norm\) must be .* shape"):
            fn(tree, 1.0, norm=xp.array(bad))
    with pytest.raises(TypeError, match=r"norm= \(the global norm\) must be a number; got list"):
        fn(tree, 1.0, norm=[20.0])
    assert all(np.array_equal(xp.numpy(x), np.full(3, 2.0)) for x in tree["encoder"])


def test_bound_from_another_library():
    # A torch bound for NumPy leaves (or the reverse) is refused by name,
    # not failed on deep in the arithmetic.
    torch = importorskip("torch")
    tree = {"encoder": [np.full(3, 2.0, np.float32) for _ in range(4)], "head": None}
    for call in (
        lambda: gc.clip_by_global_norm_(tree, torch.tensor(1.0)),
        lambda: gc.clip_by_norm_(tree, torch.tensor(1.0)),
        lambda: gc.clip_by_value_(tree, lo=torch.tensor(-1.0)),
        lambda: gc.clip_by_global_norm_(tree, 1.0, norm=torch.tensor(5.0)),
    ):
        with pytest.raises(TypeError, match="is a torch array but the leaves are numpy arrays"):
            call()
    # clip_by_norm's norm= is one per leaf: the advice was "a number or a 0-d array"
    with pytest.raises(TypeError, match="pass it as a numpy array, or as numbers"):
        gc.clip_by_norm_(tree, 1.0, norm=torch.full((4,), 5.0))
    assert all(np.array_equal(x, np.full(3, 2.0)) for x in tree["encoder"])
    grads = [torch.full((3,), 2.0)]
    gc.clip_by_global_norm_(grads, np.asarray(1.0, np.float32))  # a NumPy 0-d bound: a number
    assert float(gc.global_norm(grads)) == pytest.approx(1.0, rel=1e-5)


def test_a_cpu_tensor_bound_is_checked():
    # Reading it costs no device sync, as a number's does not: a negative one
    # flipped the gradients, a NaN one made them NaN.
    torch = importorskip("torch")
    import gradclip.torch as gct

    grads = [torch.full((3,), 2.0)]
    for bad in (torch.tensor(-1.0), torch.tensor(math.nan)):
        params = [torch.nn.Parameter(torch.ones(3))]
        for fn, tree in (
            (gc.clip_by_global_norm_, grads),
            (gc.clip_by_norm_, grads),
            (gct.clip_grad_norm_, params),
        ):
            with pytest.raises(ValueError, match="max_norm must be a number >= 0; got tensor"):
                fn(tree, bad)
        with pytest.raises(ValueError, match="max_norm must be > 0; got tensor"):
            gc.per_example_clip([torch.ones(2, 3)], bad)
    assert grads[0].tolist() == [2.0] * 3
    learnt = torch.tensor(1.0, requires_grad=True)  # read without autograd's warning
    assert float(gc.clip_by_global_norm(grads, learnt)[1].scale.detach()) < 1
    # lo/hi too: a NaN one made every entry NaN, lo > hi gave all hi.
    with pytest.raises(ValueError, match="lo must not be NaN"):
        gc.clip_by_value_(grads, lo=torch.tensor(math.nan))
    with pytest.raises(ValueError, match="lo must be <= hi"):
        gc.clip_by_value_(grads, lo=torch.tensor(1.0), hi=torch.tensor(-1.0))
    assert grads[0].tolist() == [2.0] * 3


def test_an_int_bound_past_float64_is_inf():
    # float(10**400) raised a bare OverflowError naming no argument.
    tree = [np.full(3, 2.0)]
    assert float(gc.clip_by_global_norm(tree, 10**400)[1].scale) == 1.0
    np.testing.assert_array_equal(gc.clip_by_value(tree, lo=-(10**400), hi=10**400)[0], tree[0])
    with pytest.raises(ValueError, match="eps must be finite"):
        gc.clip_by_global_norm(tree, 1.0, eps=10**400)


@pytest.mark.parametrize("fused", [None, False])
def test_array_arguments_on_another_device_are_moved_beside_the_leaves(fused):
    # array-api-strict refused to combine them ("Arrays from two different
    # devices"); torch's clip moves its coefficient to the gradients' device.
    xs = importorskip("array_api_strict")
    other = xs.Device("device1")
    tree = [xs.asarray(np.array([3.0, 4.0], np.float32)), xs.asarray(np.zeros(2, np.float32))]
    on = functools.partial(xs.asarray, device=other)
    cases = [
        (gc.clip_by_global_norm, (on(1.0),), {}, [0.6, 0.8]),
        (gc.clip_by_global_norm, (1.0,), {"norm": on(10.0)}, [0.3, 0.4]),
        (gc.clip_by_norm, (on(1.0),), {}, [0.6, 0.8]),
        (gc.clip_by_norm, (1.0,), {"norm": on(np.array([10.0, 1.0], np.float32))}, [0.3, 0.4]),
        (gc.clip_by_value, (), {"lo": on(3.5), "hi": on(3.75)}, [3.5, 3.75]),
    ]
    for fn, args, kw, want in cases:
        out = fn(tree, *args, **kw, fused=fused)
        leaf = out[0][0] if isinstance(out, tuple) else out[0]
        assert leaf.device == tree[0].device
        np.testing.assert_allclose(np.asarray(leaf), want, rtol=1e-5, err_msg=fn.__name__)


@pytest.mark.parametrize("bad", [-1e-6, math.nan, math.inf])
def test_bad_eps(xp, bad):
    with pytest.raises(ValueError, match="eps"):
        gc.clip_by_global_norm(_tree(xp), 1.0, eps=bad)


@pytest.mark.parametrize("bad", [-1, -0.5, math.nan, "fro", None, True])
def test_unknown_ord(xp, bad):
    with pytest.raises(ValueError, match="ord must be"):
        gc.global_norm(_tree(xp), ord=bad)
    with pytest.raises(ValueError, match="ord must be"):
        gc.clip_by_global_norm(_tree(xp), 1.0, ord=bad)


@pytest.mark.parametrize("bad", ["ignore", "Zero", None])
def test_unknown_nonfinite(xp, bad):
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        gc.clip_by_global_norm(_tree(xp), 1.0, nonfinite=bad)
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        gc.global_norm(_tree(xp), nonfinite="skip")


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool", "uint8"])
def test_integer_and_bool_leaves(xp, dtype):
    tree = _tree(xp)
    tree["encoder"][3] = xp._to(np.ones(3, dtype=dtype))
    for fn in (gc.global_norm, gc.leaf_norms):
        with pytest.raises(TypeError, match=r"leaf \['encoder'\]\[3\] has dtype .*float16, bf"):
            fn(tree)
    with pytest.raises(TypeError, match=r"\['encoder'\]\[3\]"):
        gc.clip_by_global_norm(tree, 1.0)


def test_bounds_past_float32_do_not_warn(xp):
    # 1e300 rounds to inf in float32: no clipping; eps=1e300 scales by 0.
    tree = [xp._to(np.full(4, 2.0, np.float32))]
    out, stats = gc.clip_by_global_norm(tree, 1e300)
    assert float(xp.numpy(stats.scale)) == 1.0
    np.testing.assert_array_equal(xp.numpy(out[0]), 2.0)
    out, stats = gc.clip_by_global_norm(tree, 1.0, eps=1e300)
    assert float(xp.numpy(stats.scale)) == 0.0
    np.testing.assert_array_equal(xp.numpy(gc.clip_by_block_rms(tree, 1e300)[0]), 2.0)


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2", "float4_e2m1fn"])
def test_float8_and_narrower_leaves_are_named(name):
    ml_dtypes = importorskip("ml_dtypes")
    if not hasattr(ml_dtypes, name):
        pytest.skip(f"ml_dtypes {ml_dtypes.__version__} has no {name}")
    tree = {"w": np.ones(3, np.float32), "b": np.ones(2, dtype=getattr(ml_dtypes, name))}
    for fn in (gc.global_norm, gc.leaf_norms, lambda t: gc.clip_by_global_norm_(t, 1.0)):
        with pytest.raises(TypeError, match=r"leaf \['b'\] has dtype .*; gradients must be"):
            fn(tree)
    assert tree["b"].tolist() == [1.0, 1.0]


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning")
@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "complex32"])
def test_narrow_torch_leaves_are_named(dtype):
    # complex32's half parts went through the half-precision product, which
    # cast them to real: the imaginary parts were thrown away, in place too.
    torch = importorskip("torch")
    bad = torch.tensor([3.0, 4.0]).to(getattr(torch, dtype))
    grads = [torch.ones(3), bad]
    for fn in (gc.clip_by_global_norm, gc.clip_by_global_norm_):
        with pytest.raises(TypeError, match=r"leaf \[1\] has dtype .*; gradients must be"):
            fn(grads, 1.0)
    assert grads[0].tolist() == [1.0, 1.0, 1.0]


def test_fused_must_be_a_flag():
    for bad in (1, 0, "yes", np.bool_(True)):
        with pytest.raises(TypeError, match="fused must be None, True or False"):
            gc.global_norm([np.ones(3)], fused=bad)
        # One large buffer in place takes a lane of its own, which skipped the check.
        big = np.ones(1 << 17, np.float32)
        with pytest.raises(TypeError, match="fused must be None, True or False"):
            gc.clip_by_global_norm_(big, 1.0, fused=bad)
        assert np.all(big == 1)


@pytest.mark.parametrize("dtype", [np.longdouble, np.clongdouble])
@pytest.mark.parametrize("fused", [None, False])
def test_numpy_longdouble_leaves_are_named(dtype, fused):
    # Wider than the float64 accumulator: rejected by name, not a math error.
    if np.finfo(dtype).max == np.finfo(np.float64).max:
        pytest.skip("longdouble is float64 on this platform")
    tree = {"w": np.ones(3), "b": np.ones(2, dtype=dtype)}
    for fn in (gc.global_norm, gc.leaf_norms):
        with pytest.raises(TypeError, match=r"leaf \['b'\] has dtype .*; gradients must be"):
            fn(tree, fused=fused)
    with pytest.raises(TypeError, match=r"leaf \['b'\] has dtype"):
        gc.clip_by_global_norm_(tree, 1.0, fused=fused)
    np.testing.assert_array_equal(tree["w"], np.ones(3))


def test_non_array_leaf(xp):
    tree = _tree(xp)
    tree["encoder"][1] = 3.0
    with pytest.raises(
        TypeError, match=r"leaf \['encoder'\]\[1\] is a builtins.float, not an array"
    ):
        gc.clip_by_global_norm(tree, 1.0)


def test_named_pairs_get_a_hint(xp):
    pairs = [(f"encoder.{i}", x) for i, x in enumerate(_tree(xp)["encoder"])]
    with pytest.raises(
        TypeError,
        match=r"leaf \[0\]\[0\] is a builtins.str, not an array; "
        r"for named_parameters\(\) pairs pass the gradients by name",
    ):
        gc.clip_by_global_norm(pairs, 1.0)


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("fn", ["global_norm", "clip_by_global_norm", "clip_by_global_norm_"])
def test_masked_arrays_are_refused(fn, fused):
    """The fast path would count masked entries and the generic one would not."""
    good = np.ones(3, np.float32)
    masked = np.ma.masked_array(np.array([3.0, 4.0, 100.0], np.float32), mask=[0, 0, 1])
    args = () if fn == "global_norm" else (1.0,)
    with pytest.raises(TypeError, match=r"leaf \['m'\] is a numpy.ma.MaskedArray; .*filled\(0\)"):
        getattr(gc, fn)({"g": good, "m": masked}, *args, fused=fused)
    np.testing.assert_array_equal(good, np.ones(3, np.float32))


def test_two_array_libraries(xp):
    if xp.name == "numpy":
        pytest.skip("needs a second library; the numpy case is each other backend's test")
    tree = _tree(xp)
    tree["encoder"][2] = np.ones(3, np.float32)
    with pytest.raises(TypeError, match=r"leaf \['encoder'\]\[2\] is a numpy array but leaf"):
        gc.clip_by_global_norm(tree, 1.0)
    if xp.mutable:
        first = tree["encoder"][0]
        with pytest.raises(TypeError):
            gc.clip_by_global_norm_(tree, 0.1)
        np.testing.assert_array_equal(xp.numpy(first), [2.0, 2.0, 2.0])


def test_two_devices_torch():
    torch = importorskip("torch")
    tree = {"a": torch.ones(3), "b": torch.ones(3, device="meta")}
    with pytest.raises(ValueError, match=r"leaf \['b'\] is on meta but leaf \['a'\] is on cpu"):
        gc.clip_by_global_norm(tree, 1.0)
    with pytest.raises(ValueError, match="one device"):
        gc.clip_by_global_norm_(tree, 1.0)
    assert tree["a"].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("fn", [*INPLACE, lambda t, c: gc.clip_by_value_(t, c)])
def test_read_only_last_leaf_modifies_nothing(fn):
    leaves = [np.full(3, 5.0), np.full(2, 5.0), np.full(4, 5.0)]
    leaves[-1].flags.writeable = False
    with pytest.raises(ValueError, match=r"leaf \[2\] is read-only"):
        fn(leaves, 1.0)
    for x in leaves:
        np.testing.assert_array_equal(x, 5.0)


def test_read_only_numpy_scalar_and_broadcast():
    with pytest.raises(ValueError, match="NumPy scalar"):
        gc.clip_by_global_norm_([np.float32(3.0)], 1.0)
    base = np.ones(3)
    with pytest.raises(ValueError, match="read-only"):
        gc.clip_by_global_norm_({"b": np.broadcast_to(base, (4, 3))}, 1.0)


def test_read_only_array_api_strict():
    strict = importorskip("array_api_strict")
    host = np.full(3, 5.0)
    host.flags.writeable = False
    x = strict.asarray(host)
    if x._array.flags.writeable:
        pytest.skip("array_api_strict copied the buffer")
    with pytest.raises(ValueError, match="read-only"):
        gc.clip_by_global_norm_([strict.asarray(np.ones(2)), x], 1.0)


def test_overlapping_torch_tensor():
    torch = importorskip("torch")
    ok = torch.full((3,), 5.0)
    expanded = torch.ones(1, 3).expand(4, 3)
    with pytest.raises(ValueError, match=r"leaf \['x'\] has overlapping memory"):
        gc.clip_by_global_norm_({"ok": ok, "x": expanded}, 1.0)
    assert ok.tolist() == [5.0, 5.0, 5.0]


@pytest.mark.parametrize("fn", [gc.clip_by_global_norm_, gc.clip_by_norm_])
def test_windows_that_share_entries_are_refused(fn):
    # unfold's windows overlap with nonzero strides: the global clip scaled
    # shared entries two or three times, clip_by_norm_ once.
    torch = importorskip("torch")
    base = torch.arange(1.0, 6.0)
    with pytest.raises(ValueError, match=r"leaf \[0\] may have overlapping memory"):
        fn([base.unfold(0, 3, 1)], 1.0)
    assert base.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    host = np.arange(1.0, 6.0)
    windows = np.lib.stride_tricks.as_strided(host, (3, 3), (8, 8))
    with pytest.raises(ValueError, match=r"leaf \[0\] may have overlapping memory"):
        fn([windows], 1.0)
    assert host.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    # strided layouts that share nothing are still clipped in place
    grid = np.ones((4, 6))
    for view in (grid[::2, ::3], grid.T, grid[:, 1:][::-1]):
        fn([view], 1.0)


def _in_place_calls():
    from gradclip.adaptive import AGC, AdaGC, AutoClip, ZClip

    def adaptive(clipper):
        return lambda tree: clipper.update_(tree, clipper.init(tree), params=tree)

    return {
        "clip_by_global_norm_": lambda tree: gc.clip_by_global_norm_(tree, 1.0),
        "clip_by_norm_": lambda tree: gc.clip_by_norm_(tree, 1.0),
        "clip_by_value_": lambda tree: gc.clip_by_value_(tree, 0.01),
        "ZClip.update_": adaptive(ZClip()),
        "AutoClip.update_": adaptive(AutoClip()),
        "AdaGC.update_": adaptive(AdaGC()),
        "AGC.update_": adaptive(AGC(layout="torch")),
    }


@pytest.mark.parametrize("fn", list(_in_place_calls()))
def test_torch_parameters_are_refused_in_place(fn):
    # model.parameters() where gradients belong (torch's clip_grad_norm_ and
    # timm's adaptive_clip_grad take parameters): clipping them in place
    # would rewrite the weights and leave .grad as it was.
    torch = importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    model(torch.randn(16, 8)).pow(2).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    call = _in_place_calls()[fn]
    with pytest.raises(ValueError, match=r"leaf \[0\] is a tensor that requires grad.*p\.grad"):
        call(list(model.parameters()))
    for p, w, g in zip(model.parameters(), before, grads, strict=True):
        assert torch.equal(p.detach(), w) and torch.equal(p.grad, g)
    # A plain tensor that requires grad is a parameter too; its detached
    # view is how to clip weights on purpose (a max-norm constraint).
    leaf = torch.full((4,), 3.0, requires_grad=True)
    with pytest.raises(ValueError, match="requires grad"):
        call([leaf])
    gc.clip_by_global_norm_([leaf.detach()], 1.0)
    assert leaf.detach().tolist() == pytest.approx([0.5] * 4, rel=1e-6)


def test_torch_computed_gradients_are_clipped_in_place():
    # autograd.grad(create_graph=True) gives gradients that require grad but
    # are not leaves: gradients, not parameters.
    torch = importorskip("torch")
    x = torch.full((4,), 3.0, requires_grad=True)
    (g,) = torch.autograd.grad((x**2).sum() / 2, x, create_graph=True)
    assert g.requires_grad and not g.is_leaf
    gc.clip_by_global_norm_([g], 1.0)
    assert g.detach().tolist() == pytest.approx([0.5] * 4, rel=1e-6)


@pytest.mark.parametrize("name", ["jax", "dask"])
def test_immutable_arrays_rejected_in_place(name):
    if name == "jax":
        jnp = importorskip("jax.numpy")
        leaf = jnp.ones(3)
    else:
        da = importorskip("dask.array")
        leaf = da.ones(3)
    ok = np.full(3, 5.0)
    for fn in (gc.clip_by_global_norm_, gc.clip_by_norm_, lambda t, c: gc.clip_by_value_(t, c)):
        with pytest.raises(TypeError, match=rf"leaf \['g'\]\[0\] is a {name} array, which cannot"):
            fn({"g": [leaf, leaf]}, 1.0)
    with pytest.raises(TypeError):
        gc.clip_by_global_norm_({"a": ok, "b": leaf}, 1.0)
    np.testing.assert_array_equal(ok, 5.0)


def test_unknown_sizes_rejected_where_needed():
    # dask's shape after boolean indexing is NaN until computed: an rms and a
    # batch axis need it (NaN leaves, or a failed cast, before); norms do not.
    da = importorskip("dask.array")
    x = da.from_array(np.arange(1.0, 11.0).reshape(5, 2), chunks=(2, 2))
    tree = {"w": x[x[:, 0] > 2]}  # rows 3 to 10, no chunk left empty
    for fn in (gc.clip_by_block_rms, gc.per_example_clip):
        with pytest.raises(ValueError, match=r"leaf \['w'\] has shape \(nan, 2\), not known"):
            fn(tree, 1.0)
    assert float(gc.global_norm(tree)) == pytest.approx(math.sqrt(np.sum(np.arange(3.0, 11) ** 2)))


def test_clip_by_value_arguments(xp):
    tree = _tree(xp)
    with pytest.raises(TypeError, match="not both"):
        gc.clip_by_value(tree, 1.0, lo=0.0)
    with pytest.raises(TypeError, match="give clip_value"):
        gc.clip_by_value(tree)
    with pytest.raises(ValueError, match="lo must be <= hi"):
        gc.clip_by_value(tree, lo=1.0, hi=0.0)
    with pytest.raises(ValueError, match="clip_value must be a number >= 0"):
        gc.clip_by_value(tree, -1.0)
    with pytest.raises(ValueError, match="NaN"):
        gc.clip_by_value(tree, lo=math.nan)


def test_clip_by_value_complex(xp):
    if not xp.has("complex64"):
        pytest.skip(f"{xp.name} has no complex64")
    with pytest.raises(TypeError, match=r"leaf \[0\] is complex"):
        gc.clip_by_value([xp.array(np.ones(2), "complex64")], 1.0)


def test_bad_threshold(xp):
    with pytest.raises(ValueError, match="threshold"):
        gc.clip_by_block_rms(_tree(xp), -2.0)


def test_sparse_torch_gradient_is_named():
    torch = importorskip("torch")
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    tree = {"dense": torch.ones(2), "emb": emb.weight.grad}
    for fn in (gc.global_norm, gc.clip_by_global_norm_):
        with pytest.raises(TypeError, match=r"leaf \['emb'\] is a torch.sparse_coo tensor"):
            fn(tree) if fn is gc.global_norm else fn(tree, 1.0)
    assert tree["dense"].tolist() == [1.0, 1.0]
