"""Pytree handling: optree for containers, jax.tree_util for JAX-registered nodes."""

from __future__ import annotations

import collections
import operator

import numpy as np
import pytest

import gradclip as gc
from conftest import importorskip
from gradclip._tree import flatten

Pair = collections.namedtuple("Pair", "w b")


def test_structure_preserved_exactly(xp):
    one = lambda: xp.array(np.full(2, 4.0), "float32")  # noqa: E731
    tree = collections.OrderedDict(
        z=(one(), [one(), None]),
        a={"nt": Pair(one(), None), "dd": collections.defaultdict(list, {"k": one()})},
        e=[],
    )
    out, _ = gc.clip_by_global_norm(tree, 1.0)
    assert type(out) is collections.OrderedDict and list(out) == ["z", "a", "e"]
    assert type(out["z"]) is tuple and type(out["z"][1]) is list and out["z"][1][1] is None
    assert type(out["a"]["nt"]) is Pair and out["a"]["nt"].b is None
    assert type(out["a"]["dd"]) is collections.defaultdict
    assert out["e"] == []


def test_paths_in_messages():
    flat = flatten(
        {"encoder": [np.ones(1), None, np.ones(1), np.ones(1)], "nt": Pair(np.ones(1), None)}
    )
    assert flat.paths == ["['encoder'][0]", "['encoder'][2]", "['encoder'][3]", "['nt'].w"]
    assert flatten(np.ones(2)).paths == ["<root>"]


def test_dict_views_and_iterators():
    grads = {"a": np.full(2, 3.0), "b": np.full(2, 4.0)}
    _, stats = gc.clip_by_global_norm(grads.values(), 1.0)
    assert float(stats.norm) == pytest.approx(np.sqrt(50))
    assert float(gc.global_norm(iter([grads["a"]]))) == pytest.approx(np.sqrt(18))


def test_jax_registered_node():
    jax = importorskip("jax")
    jnp = jax.numpy

    @jax.tree_util.register_pytree_node_class
    class Module:  # stands in for a flax/equinox module
        def __init__(self, w, b):
            self.w, self.b = w, b

        def tree_flatten(self):
            return (self.w, self.b), None

        @classmethod
        def tree_unflatten(cls, aux, children):
            return cls(*children)

    tree = {"layer": Module(jnp.full(3, 2.0), jnp.full(1, 2.0))}
    out, stats = gc.clip_by_global_norm(tree, 1.0)
    assert isinstance(out["layer"], Module)
    assert float(stats.norm) == pytest.approx(4.0)
    np.testing.assert_allclose(np.asarray(out["layer"].w), 0.5, rtol=1e-6)
    flat = flatten(tree)
    assert flat.paths[0].startswith("['layer']")


def test_jax_tree_with_none_and_tuple():
    jnp = importorskip("jax.numpy")
    tree = (jnp.ones(2), None, {"x": jnp.ones(2)})
    out, _ = gc.clip_by_global_norm(tree, 100.0)
    assert type(out) is tuple and out[1] is None and set(out[2]) == {"x"}


@pytest.mark.parametrize("kind", [list, tuple])
def test_a_sequence_of_arrays_flattens_as_optree_does(kind, xp):
    """Lists and tuples of arrays skip optree's walk; the result must not show it."""
    optree = importorskip("optree")
    seq = kind(xp.array(np.ones(n), "float32") for n in (1, 2, 3))
    flat = flatten(seq)
    leaves, spec = optree.tree_flatten(seq)
    assert all(map(operator.is_, flat.leaves, leaves)) and len(leaves) == 3
    assert list(flat.paths) == [a.codify("") for a in spec.accessors()]
    rebuilt = flat.unflatten(["a", "b", "c"])
    assert rebuilt == optree.tree_unflatten(spec, ["a", "b", "c"])
    assert type(rebuilt) is kind
    # Not only arrays (None, nested lists, numbers): optree walks them.
    one = xp.array(np.ones(2), "float32")
    mixed = kind([one, None, [one], 3.0])
    assert len(flatten(mixed).leaves) == 3


def test_dict_keys_of_mixed_types_with_jax_imported():
    # jax.tree_util cannot sort {0: ..., "head": ...}; optree can, and a NumPy
    # tree must not stop working because jax was imported somewhere.
    importorskip("jax")
    tree = {0: np.array([3.0], np.float32), "head": np.array([4.0], np.float32)}
    assert float(gc.global_norm(tree)) == 5.0
    out, _ = gc.clip_by_global_norm(tree, 1.0, eps=0.0)
    assert set(out) == {0, "head"} and float(out["head"][0]) == pytest.approx(0.8)
