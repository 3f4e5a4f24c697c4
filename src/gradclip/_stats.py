"""Result and error types shared by every backend."""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["ClipStats", "NonFiniteError", "PerExampleStats"]


class ClipStats(NamedTuple):
    """What a clipping call saw and did.

    Every field is an array in the leaves' namespace and on their device, so
    logging it never forces a device-to-host sync until you ask for a value.
    A ``NamedTuple`` is a pytree in JAX and optree, so a ``ClipStats`` can be
    returned from ``jax.jit`` and kept in optimizer state.

    Attributes
    ----------
    norm : array
        The norm before clipping: float32 for float16/bfloat16/float32 trees,
        float64 when a float64 (or complex128) leaf is present. 0-d for
        global clipping, 1-d (one entry per leaf) for :func:`clip_by_norm`.
    scale : array
        The factor every leaf was multiplied by, ``min(1, max_norm / (norm +
        eps))``, or 1 where ``nonfinite="skip"`` left the leaves unchanged.
    clipped : array
        Boolean, ``scale < 1``.
    finite : array
        Boolean, whether every gradient entry was finite on input.

    Examples
    --------
    >>> import numpy as np
    >>> import gradclip as gc
    >>> _, stats = gc.clip_by_global_norm([np.array([3.0, 4.0])], max_norm=1.0)
    >>> stats.norm, bool(stats.clipped), bool(stats.finite)
    (array(5.), True, True)
    """

    norm: Any
    scale: Any
    clipped: Any
    finite: Any


class PerExampleStats(NamedTuple):
    """What :func:`gradclip.per_example_clip` saw and did, example by example.

    Arrays in the leaves' namespace and on their device, like
    :class:`ClipStats`. With ``B`` examples and ``K`` leaves, flat clipping
    gives ``(B,)`` arrays and a 0-d count; ``per_layer=True`` gives ``(K, B)``
    arrays (row ``k`` for leaf ``k``) and ``(K,)`` counts, as optax's
    ``per_example_layer_norm_clip`` counts per layer.

    Attributes
    ----------
    norm : array
        Each example's 2-norm before clipping (across all leaves, or per leaf),
        float32 (float64 when a leaf is float64), overflow-safe.
    scale : array
        The factor each example was multiplied by, ``min(1, C / (norm + eps))``.
    clipped : array
        Boolean, ``scale < 1``.
    num_clipped : array
        int32: how many examples were clipped (per leaf with ``per_layer``).
    finite : array
        Boolean: every entry of the example (in that leaf) was finite.

    Examples
    --------
    >>> import numpy as np
    >>> import gradclip as gc
    >>> g = {"w": np.array([[3.0, 4.0], [0.3, 0.4]])}  # 2 examples on axis 0
    >>> total, stats = gc.per_example_clip(g, max_norm=1.0, eps=0.0)
    >>> stats.norm, int(stats.num_clipped)
    (array([5. , 0.5]), 1)
    """

    norm: Any
    scale: Any
    clipped: Any
    num_clipped: Any
    finite: Any


class NonFiniteError(FloatingPointError, RuntimeError):
    """Raised by ``nonfinite="raise"`` before any gradient is modified.

    The message names the first leaf (by pytree path) that holds a NaN or an
    infinity; where every value is finite, the norm that overflowed its
    dtype (float32 gradients near 1e38, whose clip would zero them). Checking
    needs one device-to-host transfer, which is why
    ``"raise"`` is not the default policy. It is a ``RuntimeError`` too, as
    torch's ``clip_grad_norm_(error_if_nonfinite=True)`` raises.

    Examples
    --------
    >>> import numpy as np
    >>> import gradclip as gc
    >>> gc.global_norm({"w": np.array([1.0, np.nan])}, nonfinite="raise")
    Traceback (most recent call last):
    ...
    gradclip.NonFiniteError: non-finite gradient values in leaf ['w']; nothing...
    """

    __module__ = "gradclip"  # as tracebacks name it: where users import it from
