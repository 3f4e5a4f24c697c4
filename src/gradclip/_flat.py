"""``FlatTree``: a gradient tree stored in one contiguous buffer per dtype.

Sharded optimizers (apex, FSDP, ZeRO) keep their gradients in flat buffers so
that a norm or a scale is one pass over one array instead of one call per
leaf. A ``FlatTree`` does the same for any tree: its leaves are views into
its buffers, so code that reads or writes ``flat.tree`` reads or writes the
buffers, and gradclip's functions work on the buffers directly.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import _compat
from ._tree import Flat, Paths, flatten

__all__ = ["FlatTree"]

# Backends whose slices are views that can be written through. JAX and dask
# arrays are immutable, and array-api-strict does not promise views.
_BACKENDS = ("numpy", "cupy", "torch")

# The torch buffers of live FlatTrees, by id: the drop-ins of gradclip.torch
# find the FlatTree of gradients set to its views through their ``._base``.
_owners: dict[int, tuple[weakref.ref[Any], weakref.ref[FlatTree]]] = {}


def _register(flat: FlatTree) -> None:
    """Record ``flat`` as the owner of its torch buffers (the first owner stays: copies share)."""
    for buffer in flat._buffers.values():
        key = id(buffer)
        if owner_of(buffer) is not None:
            continue

        def forget(_: Any, key: int = key) -> None:
            _owners.pop(key, None)

        _owners[key] = (weakref.ref(buffer, forget), weakref.ref(flat))


def owner_of(buffer: Any) -> FlatTree | None:
    """The live FlatTree whose buffer ``buffer`` (a torch tensor) is, if there is one."""
    known = _owners.get(id(buffer))
    if known is None or known[0]() is not buffer:
        return None
    return known[1]()


@dataclass(frozen=True)
class _Slot:
    """Where one leaf lives: buffer key, offset and shape."""

    key: Any
    start: int
    shape: tuple[int, ...]

    @property
    def stop(self) -> int:
        return self.start + math.prod(self.shape)


class FlatTree:
    """A tree of gradients stored in one contiguous 1-d buffer per dtype.

    Build one with :meth:`from_tree` (copies the leaves in) or
    :meth:`zeros_like`. ``.tree`` is the tree of views into the buffers (hand
    it to the code that writes the gradients), and ``.buffers`` is the flat
    storage. The top-level gradclip functions, the adaptive clippers and
    :class:`~gradclip.monitor.GradMonitor` accept a ``FlatTree`` in place of
    a tree: norms and scales run over the buffers, one pass each, and the
    functional forms return a new ``FlatTree``. The drop-ins of
    :mod:`gradclip.torch` take parameters; where their ``.grad`` are all of
    a live FlatTree's views, in its order, they clip its buffers the same
    way. NumPy, CuPy and torch arrays.

    Examples
    --------
    >>> import numpy as np
    >>> import gradclip as gc
    >>> grads = {"w": np.full((2, 2), 1.5, np.float32), "b": np.array([4.0], np.float32)}
    >>> flat = gc.FlatTree.from_tree(grads)
    >>> flat.buffers
    {dtype('float32'): array([4. , 1.5, 1.5, 1.5, 1.5], dtype=float32)}
    >>> stats = gc.clip_by_global_norm_(flat, max_norm=1.0)  # one pass over one buffer
    >>> float(stats.norm)
    5.0
    >>> flat.tree["w"]  # the views see the clipped values
    array([[0.29999995, 0.29999995],
           [0.29999995, 0.29999995]], dtype=float32)
    """

    __slots__ = ("__weakref__", "_buffers", "_flat", "_slots", "_xp")
    _xp: Any  # the array namespace; None for a tree with no arrays
    _buffers: dict[Any, Any]
    _slots: list[_Slot]
    _flat: Flat  # the views, with the original tree's paths and structure

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("use FlatTree.from_tree(tree) or FlatTree.zeros_like(tree)")

    @classmethod
    def from_tree(cls, tree: Any) -> FlatTree:
        """Copy the leaves of ``tree`` into new flat buffers.

        Parameters
        ----------
        tree : pytree of arrays
            Floating-point NumPy, CuPy or torch arrays of one library on one
            device; ``None`` leaves are kept as ``None``.

        Returns
        -------
        FlatTree
            Leaves are grouped by dtype, in flattening order.
        """
        return cls._build(tree, "FlatTree.from_tree", copy=True)

    @classmethod
    def zeros_like(cls, tree: Any) -> FlatTree:
        """Zero-filled flat buffers laid out like ``tree`` (nothing is copied).

        Parameters
        ----------
        tree : pytree of arrays
            As for :meth:`from_tree`.

        Returns
        -------
        FlatTree

        Examples
        --------
        >>> import numpy as np
        >>> import gradclip as gc
        >>> flat = gc.FlatTree.zeros_like([np.ones(2), np.ones(3, np.float32)])
        >>> {str(k): b.shape for k, b in flat.buffers.items()}
        {'float64': (2,), 'float32': (3,)}
        """
        return cls._build(tree, "FlatTree.zeros_like", copy=False)

    @classmethod
    def _build(cls, tree: Any, fn: str, *, copy: bool) -> FlatTree:
        # The validation of gradclip's functions, with its leaf-naming errors.
        from ._api import _prepare  # _api dispatches on FlatTree: import here

        prep = _prepare(tree, fn)
        if prep.xp is not None and prep.backend not in _BACKENDS:
            raise TypeError(
                f"{fn}: {prep.backend} arrays cannot be views into a shared buffer; "
                "FlatTree holds NumPy, CuPy or torch arrays"
            )
        xp, leaves = prep.xp, prep.flat.leaves
        sizes: dict[Any, int] = {}
        slots = []
        for x in leaves:
            start = sizes.get(x.dtype, 0)
            slots.append(_Slot(x.dtype, start, tuple(x.shape)))
            sizes[x.dtype] = start + math.prod(x.shape)
        # A FlatTree given here is laid out like its own tree, not like itself:
        # prep.flat would rebuild a FlatTree from the new views, a copy.
        like = tree._flat if isinstance(tree, FlatTree) else prep.flat
        if not leaves:
            return cls._adopt(xp, {}, [], like)
        device = _compat.device_of(leaves[0])
        with _compat.current_device(leaves[0]):
            buffers = {key: xp.zeros((n,), dtype=key, device=device) for key, n in sizes.items()}
            self = cls._adopt(xp, buffers, slots, like)
            if copy:
                with _compat.no_grad(xp):
                    for view, x in zip(self._flat.leaves, leaves, strict=True):
                        view[...] = x
        return self

    @classmethod
    def _adopt(cls, xp: Any, buffers: dict[Any, Any], slots: list[_Slot], like: Flat) -> FlatTree:
        """A FlatTree over ``buffers``, with the structure and paths of ``like``."""
        self = object.__new__(cls)
        self._xp, self._buffers, self._slots = xp, buffers, slots
        self._flat = Flat(_views(xp, buffers, slots), like.paths, like.unflatten)
        if buffers and _compat.backend_name(xp) == "torch":
            _register(self)
        return self

    # -- accessors ---------------------------------------------------------------
    @property
    def tree(self) -> Any:
        """The tree, its leaves views into :attr:`buffers`."""
        return self._flat.unflatten(self._flat.leaves)

    @property
    def buffers(self) -> dict[Any, Any]:
        """The flat storage: one contiguous 1-d array per dtype, keyed by dtype."""
        return dict(self._buffers)

    def copy(self) -> FlatTree:
        """A FlatTree with the same layout and copies of the buffers.

        Returns
        -------
        FlatTree

        Examples
        --------
        >>> import numpy as np
        >>> import gradclip as gc
        >>> flat = gc.FlatTree.from_tree({"w": np.array([3.0, 4.0])})
        >>> backup = flat.copy()
        >>> _ = gc.clip_by_global_norm_(flat, 1.0, eps=0)
        >>> flat.tree["w"], backup.tree["w"]
        (array([0.6, 0.8]), array([3., 4.]))
        """
        with self._on_device():
            buffers = {key: self._xp.asarray(b, copy=True) for key, b in self._buffers.items()}
        return self._adopt(self._xp, buffers, self._slots, self._flat)

    def _on_device(self) -> Any:
        """The buffers' device made current where the library needs that (CuPy)."""
        return _compat.current_device(next(iter(self._buffers.values()), None))

    def __copy__(self) -> FlatTree:
        # The same buffers, as a shallow copy of the tree would share its leaves.
        return self._adopt(self._xp, dict(self._buffers), self._slots, self._flat)

    def __deepcopy__(self, memo: dict[int, Any]) -> FlatTree:
        # Through memo: torch keeps a view copied in the same deepcopy (a
        # model's .grad set to one of .tree's views) a view of the new buffer.
        buffers = copy.deepcopy(self._buffers, memo)
        return self._adopt(self._xp, buffers, self._slots, self._flat)

    def __reduce__(self) -> tuple[Any, ...]:
        # The namespace (a module) and the tree's unflatten (a closure) do not
        # pickle: the buffers do, and the tree's structure as a tree of leaf
        # numbers. torch pickles a view (a .grad) and its buffer as one storage.
        skeleton = self._flat.unflatten(list(range(len(self._slots))))
        return (_unpickle, (self._buffers, self._slots, skeleton))

    def __repr__(self) -> str:
        sizes = ", ".join(f"{key}: {b.shape[0]}" for key, b in self._buffers.items())
        return f"FlatTree({len(self._slots)} leaves; {sizes})"

    # -- what gradclip's functions work on ------------------------------------------
    def _unit(self, whole: bool) -> Flat:
        """The arrays a gradclip function works on, and how to rebuild its result.

        ``whole`` functions (global norms, global scaling, value clipping) run
        over the buffers; the others, and any call that must name a leaf,
        run over the views. Either way, a result holding the same arrays is
        this FlatTree, and new arrays become a new FlatTree of this layout.
        """
        if not whole:
            leaves = self._flat.leaves
            if any(map(_compat.read_only, self._buffers.values())):
                # Views made before a buffer was made read-only stay
                # writable (NumPy copies the flag only when a view is
                # made): in-place calls must see them read-only, as they
                # see the buffers.
                leaves = _views(self._xp, self._buffers, self._slots)
            return Flat(leaves, self._flat.paths, self._from_leaves)
        keys = list(self._buffers)
        return Flat(
            [self._buffers[key] for key in keys],
            Paths(lambda: self._buffer_names(keys)),
            lambda new: self._from_buffers(dict(zip(keys, new, strict=True))),
        )

    def _buffer_names(self, keys: list[Any]) -> list[str]:
        """A buffer's name in errors: its first leaf (what is wrong is wrong with them all)."""
        paths = self._flat.paths
        first: dict[Any, int] = {}
        for i, slot in enumerate(self._slots):
            first.setdefault(slot.key, i)
        return [f"{paths[first[key]]} (in the FlatTree's {key} buffer)" for key in keys]

    def _from_buffers(self, buffers: dict[Any, Any]) -> FlatTree:
        if all(b is self._buffers[key] for key, b in buffers.items()):
            return self
        return self._adopt(self._xp, buffers, self._slots, self._flat)

    def _from_leaves(self, leaves: Sequence[Any]) -> FlatTree:
        if all(new is old for new, old in zip(leaves, self._flat.leaves, strict=True)):
            return self
        xp = self._xp
        if any(getattr(x, "requires_grad", False) for x in leaves):
            # Part of an autograd graph (a learnable bound): joined, so that
            # the buffers and their views keep it; copied under no_grad, a
            # gradient through the result was silently 0.
            buffers = {
                key: xp.concat(
                    [
                        xp.reshape(x, (-1,))
                        for x, s in zip(leaves, self._slots, strict=True)
                        if s.key == key
                    ]
                )
                for key in self._buffers
            }
            return self._adopt(xp, buffers, self._slots, self._flat)
        with self._on_device():
            out = self._adopt(
                self._xp,
                {key: self._xp.empty_like(b) for key, b in self._buffers.items()},
                self._slots,
                self._flat,
            )
            with _compat.no_grad(self._xp):
                for view, x in zip(out._flat.leaves, leaves, strict=True):
                    view[...] = x
        return out


def structure(tree: Any, flat: Flat) -> Callable[[Sequence[Any]], Any]:
    """Rebuild ``tree``'s plain structure from new leaves of any shape (a FlatTree's too)."""
    return tree._flat.unflatten if isinstance(tree, FlatTree) else flat.unflatten


def unit(tree: Any, *, whole: bool) -> Flat:
    """Flatten ``tree``; a :class:`FlatTree` gives its buffers or its views."""
    if isinstance(tree, FlatTree):
        return tree._unit(whole)
    return flatten(tree)


def _views(xp: Any, buffers: dict[Any, Any], slots: list[_Slot]) -> list[Any]:
    """The leaves: views into the buffers."""
    return [xp.reshape(buffers[s.key][s.start : s.stop], s.shape) for s in slots]


def _unpickle(buffers: dict[Any, Any], slots: list[_Slot], skeleton: Any) -> FlatTree:
    """A pickled FlatTree (see ``FlatTree.__reduce__``)."""
    xp = _compat.namespace(next(iter(buffers.values()))) if buffers else None
    return FlatTree._adopt(xp, buffers, slots, flatten(skeleton))
