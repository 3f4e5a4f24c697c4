"""FlatTree: one buffer per dtype, views as the tree, every function on the buffers."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradclip as gc
from conftest import importorskip, need, selected_backends
from gradclip._flat import unit

FLAT_BACKENDS = ("numpy", "torch", "torch_cuda", "cupy")
# The backends whose slices are writable views, which FlatTree needs; the
# others are tested to be rejected in test_rejections.
flat_backends = pytest.mark.parametrize(
    "xp", [b for b in selected_backends() if b in FLAT_BACKENDS], indirect=True
)


def _tree(xp, scale=3.0, mixed=False):
    rng = np.random.default_rng(1)

    def a(*shape, dtype="float32"):
        return xp.array(rng.standard_normal(shape) * scale, dtype)

    return {
        "w": a(4, 3),
        "b": [a(5), None, a()],
        "h": a(2, 2, dtype="float64" if mixed else "float32"),
        "e": a(0),
    }


def _leaves(tree):
    return [tree["w"], tree["b"][0], tree["b"][2], tree["e"], tree["h"]]


def _same_memory(xp, view, buffer):
    """Whether writing ``view`` writes ``buffer``."""
    before = xp.numpy(buffer).copy()
    view[...] = 7
    after = xp.numpy(buffer)
    changed = not np.array_equal(before, after)
    buffer[...] = xp.array(before)
    return changed


@flat_backends
def test_from_tree_copies_into_one_buffer_per_dtype(xp):
    tree = _tree(xp, mixed=True)
    flat = gc.FlatTree.from_tree(tree)
    buffers = flat.buffers
    assert len(buffers) == 2
    assert [b.shape for b in buffers.values()] == [(12 + 5 + 1 + 0,), (4,)]
    view = flat.tree
    assert view["b"][1] is None
    for got, want in zip(_leaves(view), _leaves(tree), strict=True):
        assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
        np.testing.assert_array_equal(xp.numpy(got), xp.numpy(want))
    # a copy: writing the source does not reach the FlatTree
    tree["w"][...] = 0
    assert xp.numpy(view["w"]).any()
    # the tree is views: writing a leaf writes the buffer, and the other way
    assert _same_memory(xp, view["w"], buffers[tree["w"].dtype])
    assert _same_memory(xp, view["h"], buffers[tree["h"].dtype])
    buffers[tree["h"].dtype][...] = 2
    np.testing.assert_array_equal(xp.numpy(flat.tree["h"]), np.full((2, 2), 2.0))


@flat_backends
def test_zeros_like(xp):
    tree = _tree(xp, mixed=True)
    flat = gc.FlatTree.zeros_like(tree)
    for got, want in zip(_leaves(flat.tree), _leaves(tree), strict=True):
        assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
        assert not xp.numpy(got).any()
    assert "5 leaves" in repr(flat)


@flat_backends
def test_copy_has_its_own_buffers(xp):
    flat = gc.FlatTree.from_tree(_tree(xp))
    other = flat.copy()
    gc.clip_by_global_norm_(other, 1e-3)
    assert float(gc.global_norm(other)) == pytest.approx(1e-3, rel=1e-4)
    assert float(gc.global_norm(flat)) > 1


@flat_backends
@pytest.mark.parametrize("build", ["from_tree", "zeros_like"])
def test_a_flattree_of_a_flattree_is_laid_out_like_its_tree(xp, build):
    # An accumulator made with zeros_like(flat): its .tree is the original
    # tree of views into its own buffers, not yet another FlatTree.
    flat = gc.FlatTree.from_tree(_tree(xp, mixed=True))
    new = getattr(gc.FlatTree, build)(flat)
    view = new.tree
    assert isinstance(view, dict) and view["b"][1] is None
    for got, want in zip(_leaves(view), _leaves(flat.tree), strict=True):
        assert tuple(got.shape) == tuple(want.shape) and got.dtype == want.dtype
        want_values = xp.numpy(want) if build == "from_tree" else np.zeros(want.shape)
        np.testing.assert_array_equal(xp.numpy(got), want_values)
    assert _same_memory(xp, view["w"], new.buffers[view["w"].dtype])


@flat_backends
def test_copies_and_pickles(xp):
    import copy
    import pickle

    flat = gc.FlatTree.from_tree(_tree(xp, mixed=True))
    shallow, deep = copy.copy(flat), copy.deepcopy(flat)
    gc.clip_by_global_norm_(flat, 1e-3)  # shared by the shallow copy only
    assert float(gc.global_norm(shallow)) == pytest.approx(1e-3, rel=1e-4)
    assert float(gc.global_norm(deep)) > 1
    if xp.name != "cupy":  # CuPy arrays pickle only where a GPU takes them back
        back = pickle.loads(pickle.dumps(deep))
        assert repr(back) == repr(deep)
        for got, want in zip(_leaves(back.tree), _leaves(deep.tree), strict=True):
            np.testing.assert_array_equal(xp.numpy(got), xp.numpy(want))
        assert {str(k) for k in back.buffers} == {str(k) for k in deep.buffers}


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_views_copied_with_their_flat_tree_stay_views(how):
    # A trainer's state holds the model (.grad = the FlatTree's views) and the
    # FlatTree: a copy of both must clip the copied gradients. The FlatTree
    # was copied on its own, and the copied .grad kept the old values.
    # (Plain pickle copies every torch storage apart; torch.save shares them.)
    import copy
    import io

    torch = importorskip("torch")
    model = torch.nn.Linear(3, 2)
    flat = gc.FlatTree.zeros_like(list(model.parameters()))
    for p, g in zip(model.parameters(), flat.tree, strict=True):
        p.grad = g
    model(torch.full((4, 3), 10.0)).sum().backward()  # autograd adds into the views
    state = {"grads": [p.grad for p in model.parameters()], "flat": flat}
    if how == "deepcopy":
        state = copy.deepcopy(state)
    else:
        saved = io.BytesIO()
        torch.save(state, saved)
        saved.seek(0)
        state = torch.load(saved, weights_only=False)
    gc.clip_by_global_norm_(state["flat"], 1e-3)
    copied = torch.cat([g.reshape(-1) for g in state["grads"]])
    assert float(torch.linalg.vector_norm(copied)) == pytest.approx(1e-3, rel=1e-4)
    assert float(gc.global_norm(flat)) > 1  # the original is untouched


@flat_backends
@pytest.mark.parametrize("ord", [2.0, 1.0, 3.0, math.inf, -math.inf, 0.0])
@pytest.mark.parametrize("mixed", [False, True])
def test_norms_equal_the_plain_tree(xp, ord, mixed):
    tree = _tree(xp, mixed=mixed)
    tree["b"][0][...] = 0  # a zero leaf: ord=0 counts leaves, not buffers
    flat = gc.FlatTree.from_tree(tree)
    for fn in (gc.global_norm, gc.leaf_norms):
        got, want = fn(flat, ord=ord), fn(tree, ord=ord)
        assert got.dtype == want.dtype
        np.testing.assert_allclose(xp.numpy(got), xp.numpy(want), rtol=1e-6)


@flat_backends
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("clip_by_global_norm", {"max_norm": 1.0}),
        ("clip_by_global_norm", {"max_norm": 1.0, "ord": 0.0}),
        ("clip_by_global_norm", {"max_norm": 1.0, "nonfinite": "raise"}),
        ("clip_by_norm", {"max_norm": 1.0}),
        ("clip_by_value", {"clip_value": 0.5}),
        ("clip_by_value", {"lo": -0.1, "nonfinite": "raise"}),
    ],
)
def test_functions_equal_the_plain_tree(xp, mixed, name, kwargs):
    """Functional forms return a new FlatTree; in-place forms write the buffers."""
    tree = _tree(xp, mixed=mixed)
    flat = gc.FlatTree.from_tree(tree)
    want = getattr(gc, name)(tree, **kwargs)
    got = getattr(gc, name)(flat, **kwargs)
    inplace = getattr(gc, name + "_")(flat, **kwargs)
    new = got[0] if isinstance(got, tuple) else got
    assert isinstance(new, gc.FlatTree)
    ref = want[0] if isinstance(want, tuple) else want
    for a, b, c in zip(_leaves(new.tree), _leaves(ref), _leaves(flat.tree), strict=True):
        np.testing.assert_allclose(xp.numpy(a), xp.numpy(b), rtol=1e-6)
        np.testing.assert_allclose(xp.numpy(c), xp.numpy(b), rtol=1e-6)
    leaf = new.tree["w"]  # the result's tree views its own buffers
    assert _same_memory(xp, leaf, new.buffers[leaf.dtype])
    if isinstance(got, tuple):
        for s_flat, s_tree, s_inplace in zip(got[1], want[1], inplace, strict=True):
            np.testing.assert_allclose(xp.numpy(s_flat), xp.numpy(s_tree), rtol=1e-6)
            np.testing.assert_allclose(xp.numpy(s_inplace), xp.numpy(s_tree), rtol=1e-6)


@flat_backends
@pytest.mark.parametrize("reduce", ["sum", "mean", None])
@pytest.mark.parametrize("per_layer", [False, True])
def test_per_example_clip_equals_the_plain_tree(xp, reduce, per_layer):
    """A sum or mean has no batch axis: it comes back as the plain tree, not a FlatTree."""
    rng = np.random.default_rng(2)
    tree = {
        "w": xp.array(rng.standard_normal((3, 4, 2)) * 3, "float32"),
        "b": [xp.array(rng.standard_normal((3, 5)), "float32"), None],
    }
    flat = gc.FlatTree.from_tree(tree)
    kw = {"reduce": reduce, "per_layer": per_layer, "eps": 0.0}
    want, want_stats = gc.per_example_clip(tree, 1.0, **kw)
    got, stats = gc.per_example_clip(flat, 1.0, **kw)
    assert isinstance(got, gc.FlatTree) is (reduce is None)
    got = got.tree if reduce is None else got
    assert got["b"][1] is None
    for a, b in ((got["w"], want["w"]), (got["b"][0], want["b"][0])):
        assert a.shape == b.shape
        np.testing.assert_allclose(xp.numpy(a), xp.numpy(b), rtol=1e-6)
    np.testing.assert_allclose(xp.numpy(stats.norm), xp.numpy(want_stats.norm), rtol=1e-6)


@flat_backends
def test_functional_leaves_the_input_alone(xp):
    flat = gc.FlatTree.from_tree(_tree(xp))
    before = {k: xp.numpy(b).copy() for k, b in flat.buffers.items()}
    new, _ = gc.clip_by_global_norm(flat, 1e-3)
    new_b = gc.clip_by_block_rms(flat, 1e-3)
    for k, b in flat.buffers.items():
        np.testing.assert_array_equal(xp.numpy(b), before[k])
    assert float(gc.global_norm(new)) == pytest.approx(1e-3, rel=1e-4)
    plain = gc.clip_by_block_rms(flat.tree, 1e-3)
    for a, b in zip(_leaves(new_b.tree), _leaves(plain), strict=True):
        np.testing.assert_allclose(xp.numpy(a), xp.numpy(b), rtol=1e-6)


@flat_backends
def test_global_functions_run_on_the_buffers(xp):
    flat = gc.FlatTree.from_tree(_tree(xp, mixed=True))
    whole = unit(flat, whole=True)
    assert len(whole.leaves) == 2
    for got, buffer in zip(whole.leaves, flat.buffers.values(), strict=True):
        assert got is buffer
    assert len(unit(flat, whole=False).leaves) == 5


@flat_backends
def test_raise_names_the_leaf_not_the_buffer(xp):
    tree = _tree(xp)
    tree["b"][0][2] = float("nan")
    flat = gc.FlatTree.from_tree(tree)
    before = xp.numpy(next(iter(flat.buffers.values()))).copy()
    with pytest.raises(gc.NonFiniteError, match=r"\['b'\]\[0\]"):
        gc.clip_by_global_norm_(flat, 1.0, nonfinite="raise")
    np.testing.assert_array_equal(xp.numpy(next(iter(flat.buffers.values()))), before)


@flat_backends
@pytest.mark.parametrize("fn", ["clip_by_value", "clip_by_value_"])
def test_a_buffer_is_named_by_its_first_leaf(xp, fn):
    need(xp, "complex64")
    tree = {"w": xp.array([1.0, 2.0], "float32"), "z": xp.array([1.0], "complex64")}
    flat = gc.FlatTree.from_tree(tree)
    with pytest.raises(TypeError, match=r"leaf \['z'\] \(in the FlatTree's .* buffer\) is complex"):
        getattr(gc, fn)(flat, 1.0)


@flat_backends
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "complex64"])
def test_other_dtypes(xp, dtype):
    need(xp, dtype)
    tree = [xp.array(np.arange(1.0, 7.0).reshape(2, 3), dtype), xp.array([2.0], "float32")]
    flat = gc.FlatTree.from_tree(tree)
    stats = gc.clip_by_global_norm_(flat, 1.0)
    want = gc.clip_by_global_norm(tree, 1.0)[1]
    assert float(stats.norm) == pytest.approx(float(want.norm), rel=1e-6)
    assert flat.tree[0].dtype == tree[0].dtype


@pytest.mark.parametrize(
    ("fn", "kwargs"),
    [
        ("clip_by_global_norm_", {}),
        ("clip_by_global_norm_", {"nonfinite": "raise"}),
        ("clip_by_global_norm_", {"ord": 0.0}),
        ("clip_by_norm_", {}),
        ("clip_by_value_", {}),
        ("clip_by_value_", {"nonfinite": "raise"}),
    ],
)
def test_a_buffer_made_read_only_is_not_written(fn, kwargs):
    # The leaf views were made while the buffer was writable and keep that
    # flag: calls run over them (per leaf, or to name a leaf) wrote the buffer.
    flat = gc.FlatTree.from_tree(
        {"w": np.full(4, 2.0, np.float32), "b": np.full(2, 2.0, np.float32)}
    )
    buffer = flat.buffers[np.dtype(np.float32)]
    buffer.flags.writeable = False
    with pytest.raises(ValueError, match=r"leaf \['b'\].* is read-only"):
        getattr(gc, fn)(flat, 0.5, **kwargs)
    assert np.all(buffer == 2.0)


def test_empty_tree():
    flat = gc.FlatTree.from_tree([None])
    assert flat.buffers == {}
    assert flat.tree == [None]
    assert float(gc.global_norm(flat)) == 0.0
    assert gc.clip_by_global_norm(flat, 1.0)[0] is flat


def test_rejections(xp):
    tree = [xp.array([1.0, 2.0], "float32")]
    if xp.name in FLAT_BACKENDS:
        with pytest.raises(TypeError, match=r"leaf \[1\] has dtype"):
            gc.FlatTree.from_tree([*tree, xp.array([1, 2], None)])
    else:
        with pytest.raises(TypeError, match="FlatTree holds NumPy, CuPy or torch"):
            gc.FlatTree.from_tree(tree)
    with pytest.raises(TypeError, match="from_tree"):
        gc.FlatTree(tree)


@pytest.mark.parametrize(
    ("fn", "kwargs"),
    [
        ("clip_by_norm", {}),
        ("clip_by_global_norm", {}),
        ("clip_by_global_norm", {"ord": 0}),
        ("clip_by_value", {"nonfinite": "raise"}),
        ("clip_by_block_rms", {}),
    ],
)
def test_a_gradient_through_a_functional_clip_of_a_flat_tree(fn, kwargs):
    # New leaves were copied into the new FlatTree under no_grad: the
    # gradient with respect to a learnable bound was silently 0. (And
    # clip_by_block_rms's threshold warned of torch 2.13's asarray.)
    torch = importorskip("torch")
    tree = [torch.tensor([3.0, 4.0]), torch.tensor([1.0], dtype=torch.float64), torch.ones(2)]
    flat = gc.FlatTree.from_tree(tree)
    call = getattr(gc, fn)

    def total(out):
        out = out[0] if isinstance(out, tuple) else out
        return sum(x.sum() for x in (out.tree if isinstance(out, gc.FlatTree) else out))

    bound = torch.tensor(1.0, requires_grad=True)
    (got,) = torch.autograd.grad(total(call(flat, bound, **kwargs)), bound)
    (want,) = torch.autograd.grad(total(call(flat.tree, bound, **kwargs)), bound)
    assert float(want) != 0.0
    assert float(got) == pytest.approx(float(want), rel=1e-6)
