"""Hypothesis properties of clip_by_global_norm, on every backend."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import gradclip as gc

values = st.floats(-1e6, 1e6, allow_nan=False, width=32)
leaf = st.integers(1, 40).flatmap(lambda n: arrays(np.float32, n, elements=values))
trees = st.lists(leaf, min_size=1, max_size=5)
# Backends are swapped by the xp fixture, not per example: that is safe here.
common = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _norm(leaves):
    return math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in leaves))


@common
@given(host=trees, max_norm=st.floats(1e-3, 1e3))
def test_scale_in_unit_interval_and_norm_bounded(xp, host, max_norm):
    out, stats = gc.clip_by_global_norm([xp.array(h) for h in host], max_norm)
    scale = float(stats.scale)
    assert 0 < scale <= 1
    assert bool(stats.clipped) == (scale < 1)
    assert _norm([xp.numpy(o) for o in out]) <= max_norm * (1 + 1e-5) or scale == 1


@common
@given(host=trees, max_norm=st.floats(1e-3, 1e3))
def test_direction_preserved(xp, host, max_norm):
    out, _ = gc.clip_by_global_norm([xp.array(h) for h in host], max_norm)
    a = np.concatenate([h.astype(np.float64) for h in host])
    b = np.concatenate([xp.numpy(o).astype(np.float64) for o in out])
    if np.linalg.norm(a) == 0 or np.linalg.norm(b) == 0:
        return
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert cos >= 1 - 1e-6


@common
@given(host=trees, max_norm=st.floats(1e-3, 1e3), eps=st.sampled_from([0.0, 1e-6]))
def test_clipping_twice_changes_nothing(xp, host, max_norm, eps):
    once, _ = gc.clip_by_global_norm([xp.array(h) for h in host], max_norm, eps=eps)
    twice, stats = gc.clip_by_global_norm(once, max_norm, eps=eps)
    # eps keeps a clipped norm just under max_norm, so a second pass may shrink
    # it again by about eps / max_norm; with eps=0 only rounding is left.
    rtol = 1e-6 + 2 * eps / max_norm
    assert float(stats.scale) >= 1 - rtol
    for a, b in zip(once, twice, strict=True):
        np.testing.assert_allclose(xp.numpy(b), xp.numpy(a), rtol=rtol, atol=0)
