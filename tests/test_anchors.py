"""Cross-checks against torch.nn.utils and optax, where installed.

Deliberate differences, also stated in the docstrings:

- torch takes the norm in the leaves' dtype (a float16 norm overflows at
  65504) and optax accumulates float32 squares (1e30 overflows); gradclip's
  norm is float32/float64 and overflow-safe, so the comparisons below use
  values where torch and optax are correct.
- optax's ``clip_by_global_norm`` has no eps: compare with ``eps=0``.
- optax's ``clip_by_block_rms`` takes the mean of an empty leaf (NaN);
  gradclip gives an empty leaf rms 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradclip as gc
from conftest import importorskip

ORDS = [2.0, 1.0, 0.5, 3.0, math.inf, -math.inf, 0.0]


def _torch_grads(torch, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 8), (8,), (3, 3, 3), ()]
    grads = [torch.randn(s, generator=g, dtype=torch.float64) * 4 for s in shapes]
    grads[1][::2] = 0.0
    grads.append(torch.zeros(5, dtype=torch.float64))
    return [t.to(dtype) for t in grads]


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_get_total_norm(ord, dtype):
    torch = importorskip("torch")
    tdtype = getattr(torch, dtype)
    grads = _torch_grads(torch, tdtype)
    # torch's norm of low-precision leaves is computed and rounded in that
    # dtype; compare against torch on float32 copies, where it is correct.
    wide = [g.float() if tdtype in (torch.float16, torch.bfloat16) else g for g in grads]
    want = torch.nn.utils.get_total_norm(wide, norm_type=ord, foreach=False)
    got = gc.global_norm(grads, ord=ord)
    assert got.dtype == (torch.float64 if dtype == "float64" else torch.float32)
    assert float(got) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("ord", [2.0, 1.0, math.inf])
def test_clip_grad_norm_on_a_module(ord, foreach):
    torch = importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Tanh(), torch.nn.Linear(30, 3))
    model(torch.randn(64, 20)).pow(2).sum().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    want = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5, norm_type=ord, foreach=foreach)
    stats = gc.clip_by_global_norm_(ours, 0.5, ord=ord)
    assert float(stats.norm) == pytest.approx(float(want), rel=1e-6)
    for a, p in zip(ours, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-6, atol=1e-9)


def _params_with_grads(torch, grads):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    return params


def test_torch_is_wrong_where_we_are_right():
    torch = importorskip("torch")
    big = [torch.full((10,), 1e30), torch.full((4,), 1e30)]
    assert math.isinf(float(torch.nn.utils.get_total_norm(big)))
    params = _params_with_grads(torch, big)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    assert all(bool((p.grad == 0).all()) for p in params)  # torch silently zeroes them
    out, stats = gc.clip_by_global_norm(big, 1.0)
    assert float(stats.norm) == pytest.approx(1e30 * math.sqrt(14), rel=1e-6)
    assert float(gc.global_norm(out)) == pytest.approx(1.0, rel=1e-5)


def test_clip_grad_value():
    torch = importorskip("torch")
    grads = _torch_grads(torch, torch.float32)
    params = _params_with_grads(torch, grads)
    torch.nn.utils.clip_grad_value_(params, 1.5)
    gc.clip_by_value_(grads, 1.5)
    for a, p in zip(grads, params, strict=True):
        torch.testing.assert_close(a, p.grad, rtol=0, atol=0)


def _optax_tree(jnp):
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.standard_normal((32, 16)) * 3, jnp.float32),
        "b": jnp.asarray(rng.standard_normal(16), jnp.float32),
        "s": jnp.asarray(2.5, jnp.float32),
    }


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_optax_clip_by_global_norm(max_norm):
    optax = importorskip("optax")
    jnp = importorskip("jax.numpy")
    tree = _optax_tree(jnp)
    want, _ = optax.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
    got, stats = gc.clip_by_global_norm(tree, max_norm, eps=0.0)
    assert float(stats.norm) == pytest.approx(float(optax.tree.norm(tree)), rel=1e-6)
    for k in tree:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6)


def test_optax_clip():
    optax = importorskip("optax")
    jnp = importorskip("jax.numpy")
    tree = _optax_tree(jnp)
    want, _ = optax.clip(1.0).update(tree, optax.EmptyState())
    got = gc.clip_by_value(tree, 1.0)
    for k in tree:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))


@pytest.mark.parametrize("threshold", [0.1, 1.0, 100.0])
def test_optax_clip_by_block_rms(threshold):
    optax = importorskip("optax")
    jnp = importorskip("jax.numpy")
    tree = _optax_tree(jnp)
    want, _ = optax.clip_by_block_rms(threshold).update(tree, optax.EmptyState())
    got = gc.clip_by_block_rms(tree, threshold)
    for k in tree:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6)
