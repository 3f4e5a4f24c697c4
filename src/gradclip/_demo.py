"""``python -m gradclip demo``: an RNN with exploding gradients, with and without clipping.

The classic experiment (Pascanu, Mikolov and Bengio, 2013): a vanilla tanh
RNN learns the adding problem (sum the two marked numbers of a sequence),
whose gradients explode through time. It is trained three ways from the same
initialisation on the same batches: plain SGD, SGD with global-norm clipping
(:func:`gradclip.clip_by_global_norm`), and SGD with
:class:`gradclip.adaptive.ZClip`. Without clipping the loss blows up within a
few steps; with either clipper the model learns.

The NumPy run uses hand-written backpropagation through time, so the base
install runs it; ``--backend torch`` and ``--backend jax`` compute the same
gradients with those libraries' autodiff. The curves are saved as a PNG:
with matplotlib (the ``plot`` extra) labelled, without it as plain line
plots drawn here (loss above, gradient norm below, log scale, one colour per
run).
"""

from __future__ import annotations

import importlib.util
import math
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import gradclip
from gradclip.adaptive import ZClip

__all__ = ["Run", "run_demo"]

METHODS = ("no clipping", "clip_by_global_norm", "ZClip")
COLOURS = {
    "no clipping": (214, 39, 40),
    "clip_by_global_norm": (31, 119, 180),
    "ZClip": (44, 160, 44),
}
DIVERGED = 1e4  # a loss above this (or not finite) ends a run


@dataclass
class Run:
    """One training run's history."""

    method: str
    loss: list[float] = field(default_factory=list)
    norm: list[float] = field(default_factory=list)
    clipped: int = 0
    diverged_at: int | None = None

    def final_loss(self) -> float:
        tail = self.loss[-100:]
        return float(np.mean(tail)) if tail else math.nan


def adding_batch(
    rng: np.random.Generator, batch: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (value, marker) of shape (batch, length, 2) and the sums of the marked values."""
    values = rng.uniform(0.0, 1.0, (batch, length))
    marks = np.zeros((batch, length))
    rows = np.arange(batch)
    marks[rows, rng.integers(0, length // 2, batch)] = 1.0
    marks[rows, rng.integers(length // 2, length, batch)] = 1.0
    x = np.stack([values, marks], axis=-1).astype(np.float32)
    y = (values * marks).sum(axis=1, keepdims=True).astype(np.float32)
    return x, y


def init_params(rng: np.random.Generator, hidden: int, radius: float) -> dict[str, np.ndarray]:
    """A recurrent matrix of spectral radius ``radius`` (orthogonal, scaled): gradients explode."""
    q, _ = np.linalg.qr(rng.standard_normal((hidden, hidden)))
    return {
        "Wx": (rng.standard_normal((2, hidden)) * 0.5).astype(np.float32),
        "Wh": (q * radius).astype(np.float32),
        "b": np.zeros(hidden, np.float32),
        "Wo": (rng.standard_normal((hidden, 1)) / math.sqrt(hidden)).astype(np.float32),
        "bo": np.zeros(1, np.float32),
    }


def numpy_loss_and_grads(
    p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> tuple[float, dict[str, np.ndarray]]:
    """Mean squared error of the last step's output, and its gradients by hand-written BPTT."""
    batch, length, _ = x.shape
    hs = [np.zeros((batch, p["Wh"].shape[0]), np.float32)]
    for t in range(length):
        hs.append(np.tanh(x[:, t] @ p["Wx"] + hs[-1] @ p["Wh"] + p["b"]))
    err = hs[-1] @ p["Wo"] + p["bo"] - y
    loss = float(np.mean(err**2))
    d = 2.0 * err / batch
    g = {"Wo": hs[-1].T @ d, "bo": d.sum(0)}
    gx, gh, gb = np.zeros_like(p["Wx"]), np.zeros_like(p["Wh"]), np.zeros_like(p["b"])
    dh = d @ p["Wo"].T
    for t in range(length, 0, -1):
        da = dh * (1.0 - hs[t] ** 2)
        gx += x[:, t - 1].T @ da
        gh += hs[t - 1].T @ da
        gb += da.sum(0)
        dh = da @ p["Wh"].T
    g.update(Wx=gx, Wh=gh, b=gb)
    return loss, g


# Each backend: (to its arrays, loss-and-grads, SGD step).
Backend = tuple[Callable[[Any], Any], Callable[..., Any], Callable[..., Any]]


def _sgd(p: dict[str, Any], g: dict[str, Any], lr: float) -> dict[str, Any]:
    return {k: p[k] - lr * g[k] for k in p}


def _numpy_backend() -> Backend:
    return (lambda a: a, numpy_loss_and_grads, _sgd)


def _torch_backend() -> Backend:
    import torch

    def loss_and_grads(p: dict[str, Any], x: Any, y: Any) -> tuple[float, dict[str, Any]]:
        q = {k: v.detach().requires_grad_() for k, v in p.items()}
        h = torch.zeros((x.shape[0], q["Wh"].shape[0]))
        for t in range(x.shape[1]):
            h = torch.tanh(x[:, t] @ q["Wx"] + h @ q["Wh"] + q["b"])
        loss = torch.mean((h @ q["Wo"] + q["bo"] - y) ** 2)
        grads = torch.autograd.grad(loss, list(q.values()))
        return float(loss.detach()), dict(zip(q, grads, strict=True))

    return (torch.from_numpy, loss_and_grads, _sgd)


def _jax_backend() -> Backend:
    import jax
    import jax.numpy as jnp

    def loss(p: dict[str, Any], x: Any, y: Any) -> Any:
        def cell(h: Any, xt: Any) -> tuple[Any, None]:
            return jnp.tanh(xt @ p["Wx"] + h @ p["Wh"] + p["b"]), None

        h, _ = jax.lax.scan(cell, jnp.zeros((x.shape[0], p["Wh"].shape[0])), jnp.swapaxes(x, 0, 1))
        return jnp.mean((h @ p["Wo"] + p["bo"] - y) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss))

    def loss_and_grads(p: dict[str, Any], x: Any, y: Any) -> tuple[float, dict[str, Any]]:
        value, grads = value_and_grad(p, x, y)
        return float(value), grads

    step = jax.jit(lambda p, g, lr: jax.tree.map(lambda a, b: a - lr * b, p, g))
    return (jnp.asarray, loss_and_grads, step)


BACKENDS: dict[str, Callable[[], Backend]] = {
    "numpy": _numpy_backend,
    "torch": _torch_backend,
    "jax": _jax_backend,
}


def train(
    backend: str,
    method: str,
    *,
    steps: int,
    seed: int,
    length: int = 20,
    hidden: int = 32,
    batch: int = 32,
    lr: float = 0.2,
    radius: float = 1.0,
    max_norm: float = 1.0,
) -> Run:
    """Train one RNN with ``method`` and return its history."""
    to, loss_and_grads, sgd = BACKENDS[backend]()
    rng = np.random.default_rng(seed)
    params = {k: to(v) for k, v in init_params(rng, hidden, radius).items()}
    data = np.random.default_rng(seed + 1)
    zclip = ZClip(warmup_steps=25, max_grad_norm=5.0)
    state = zclip.init(params)  # used by the ZClip run only
    run = Run(method)
    for i in range(steps):
        x, y = adding_batch(data, batch, length)
        with np.errstate(all="ignore"):
            loss, grads = loss_and_grads(params, to(x), to(y))
        if method == "clip_by_global_norm":
            grads, stats = gradclip.clip_by_global_norm(grads, max_norm)
        elif method == "ZClip":
            grads, state, stats = zclip.update(grads, state)
        else:
            stats = None
        norm = gradclip.global_norm(grads) if stats is None else stats.norm
        run.loss.append(loss)
        run.norm.append(float(norm))  # the demo prints it: a host read is what it wants
        run.clipped += int(stats is not None and bool(stats.clipped))
        if not math.isfinite(loss) or loss > DIVERGED:
            run.diverged_at = i + 1
            break
        with np.errstate(all="ignore"):
            params = sgd(params, grads, lr)
    return run


def summary(runs: list[Run]) -> str:
    """The table the demo prints."""
    lines = [
        f"{'method':<22}{'final loss':>12}{'max norm':>12}{'steps clipped':>15}  diverged",
        "-" * 72,
    ]
    for r in runs:
        diverged = f"yes (step {r.diverged_at})" if r.diverged_at else "no"
        lines.append(
            f"{r.method:<22}{r.final_loss():>12.4g}{max(r.norm):>12.4g}"
            f"{r.clipped:>9} of {len(r.loss):<5}  {diverged}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------ the plot


def save_plot(runs: list[Run], path: str) -> str:
    """Loss and gradient-norm curves to ``path``; matplotlib if installed, else plain lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _write_png(path, _draw(runs))
        return "plain lines; pip install gradclip[plot] for labelled axes"
    fig, (ax_loss, ax_norm) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for r in runs:
        colour = tuple(c / 255 for c in COLOURS[r.method])
        label = r.method + (f" (diverged at step {r.diverged_at})" if r.diverged_at else "")
        ax_loss.plot(r.loss, color=colour, label=label, lw=0.8)
        ax_norm.plot(r.norm, color=colour, lw=0.8)
    ax_loss.set(yscale="log", ylabel="loss (MSE)", title="RNN on the adding problem")
    ax_norm.set(yscale="log", ylabel="gradient norm (before clipping)", xlabel="step")
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
    return "matplotlib"


def _draw(runs: list[Run], width: int = 800, height: int = 600) -> np.ndarray:
    """Two log-scale panels (loss, norm) as an RGB image, white background."""
    img = np.full((height, width, 3), 255, np.uint8)
    steps = max(len(r.loss) for r in runs)
    panels = [(20, height // 2 - 10, "loss"), (height // 2 + 10, height - 20, "norm")]
    for top, bottom, key in panels:
        img[top, 40 : width - 20] = img[bottom, 40 : width - 20] = 0
        img[top : bottom + 1, 40] = img[top : bottom + 1, width - 20] = 0
        series = [np.asarray(getattr(r, key), np.float64) for r in runs]
        finite = np.concatenate([s[np.isfinite(s) & (s > 0)] for s in series])
        lo, hi = np.log10(finite.min()), np.log10(finite.max()) + 1e-9
        for r, s in zip(runs, series, strict=True):
            xs = 40 + np.arange(len(s)) * (width - 60) / max(steps - 1, 1)
            ok = np.isfinite(s) & (s > 0)
            ys = bottom - (np.log10(np.where(ok, s, 10**lo)) - lo) / (hi - lo) * (bottom - top)
            for i in range(1, len(s)):
                if ok[i - 1] and ok[i]:
                    _line(img, xs[i - 1], ys[i - 1], xs[i], ys[i], COLOURS[r.method])
    for k, r in enumerate(runs):  # a legend of coloured squares, in the order of METHODS
        img[30 + 14 * k : 40 + 14 * k, width - 40 : width - 30] = COLOURS[r.method]
    return img


def _line(
    img: np.ndarray, x0: float, y0: float, x1: float, y1: float, colour: tuple[int, ...]
) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.clip(np.round(np.linspace(x0, x1, n)).astype(int), 0, img.shape[1] - 1)
    ys = np.clip(np.round(np.linspace(y0, y1, n)).astype(int), 0, img.shape[0] - 1)
    img[ys, xs] = colour


def _write_png(path: str, img: np.ndarray) -> None:
    """An 8-bit RGB PNG, written with zlib alone."""
    height, width, _ = img.shape
    raw = b"".join(b"\x00" + img[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header))
        f.write(chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def run_demo(
    backend: str = "numpy", steps: int = 3000, seed: int = 0, out: str = "gradclip-demo.png"
) -> int:
    """Train the three runs, print progress and the table, save the plot; exit status."""
    if backend not in BACKENDS:
        raise SystemExit(f"gradclip demo: --backend must be one of {', '.join(BACKENDS)}")
    if importlib.util.find_spec(backend) is None:
        raise SystemExit(f"gradclip demo: --backend {backend} needs {backend}, not installed")
    print(
        f"gradclip {gradclip.__version__} demo: a tanh RNN (32 units) on the adding problem "
        f"(sequences of 20), SGD lr 0.2, {steps} steps, {backend}"
    )
    runs = []
    for method in METHODS:
        start = time.perf_counter()
        run = train(backend, method, steps=steps, seed=seed)
        what = f"diverged at step {run.diverged_at}" if run.diverged_at else "done"
        print(
            f"  {method:<22} {what:<24} loss {run.final_loss():.4g}  "
            f"({time.perf_counter() - start:.1f} s)"
        )
        runs.append(run)
    print()
    print(summary(runs))
    how = save_plot(runs, out)
    print(f"\nloss and gradient-norm curves: {out} ({how})")
    return 0
