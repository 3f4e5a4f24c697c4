"""Pytree flattening with leaf paths.

optree does the walking for ordinary containers (list, tuple, dict,
namedtuple, OrderedDict, defaultdict, None). When JAX is already imported and
the tree holds JAX arrays or nodes that only JAX knows about (flax
``FrozenDict``, equinox modules), ``jax.tree_util`` does it instead, so those
registrations are honoured. ``None`` is an empty node in both libraries: it is
skipped and comes back as ``None``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, MappingView, Sequence
from dataclasses import dataclass
from typing import Any

import optree

__all__ = ["Flat", "flatten"]


@dataclass(frozen=True)
class Flat:
    """A flattened tree: its leaves, their paths, and how to rebuild it."""

    leaves: list[Any]
    paths: list[str]
    unflatten: Callable[[Sequence[Any]], Any]


def _materialise(tree: Any) -> Any:
    # ``model.parameters()``-style generators and dict views are consumed once
    # into a list; the caller gets a list back from functional calls.
    if isinstance(tree, Iterator | MappingView):
        return list(tree)  # type: ignore[arg-type]  # every MappingView is iterable
    return tree


def _jax_flatten(tree: Any) -> Flat | None:
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    tu = jax.tree_util
    pairs, treedef = tu.tree_flatten_with_path(tree)
    leaves = [leaf for _, leaf in pairs]
    if not any(isinstance(leaf, jax.Array) for leaf in leaves):
        return None
    return Flat(
        leaves=leaves,
        paths=[tu.keystr(path) or "<root>" for path, _ in pairs],
        unflatten=lambda new: tu.tree_unflatten(treedef, list(new)),
    )


def flatten(tree: Any) -> Flat:
    """Flatten ``tree`` into leaves with printable paths such as ``['encoder'][3]``.

    Parameters
    ----------
    tree : pytree
        Nested lists, tuples, dicts and namedtuples of arrays, a single array,
        or an iterator of arrays (consumed once).

    Returns
    -------
    Flat
        ``leaves`` in a fixed order, ``paths`` as strings, and ``unflatten``
        which rebuilds a tree of the same structure from new leaves.

    Examples
    --------
    >>> import numpy as np
    >>> flat = flatten({"encoder": [np.zeros(2), None, np.ones(3)]})
    >>> flat.paths
    ["['encoder'][0]", "['encoder'][2]"]
    >>> flat.unflatten([1, 2])
    {'encoder': [1, None, 2]}
    """
    tree = _materialise(tree)
    if "jax" in sys.modules:
        flat = _jax_flatten(tree)
        if flat is not None:
            return flat
    accessors, leaves, treedef = optree.tree_flatten_with_accessor(tree)
    paths = [accessor.codify("") or "<root>" for accessor in accessors]
    return Flat(
        leaves=list(leaves),
        paths=paths,
        unflatten=lambda new: optree.tree_unflatten(treedef, list(new)),
    )
