"""`python -m gradclip demo`: an RNN with exploding gradients, without and with clipping."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from conftest import importorskip
from gradclip import _demo


def test_demo_runs_and_shows_clipping_work(tmp_path) -> None:
    out = tmp_path / "curves.png"
    proc = subprocess.run(
        [sys.executable, "-m", "gradclip", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {
        line[:22].strip(): line[22:].split()
        for line in proc.stdout.splitlines()
        if line[:22].strip() in _demo.METHODS and "of" in line
    }
    assert set(rows) == set(_demo.METHODS)
    assert rows["no clipping"][-3:-1] == ["yes", "(step"]  # it blows up
    for method in ("clip_by_global_norm", "ZClip"):
        loss, _, clipped, _, steps, diverged = rows[method]
        assert diverged == "no" and steps == "3000"
        assert float(loss) < 0.05  # it learns (predicting the mean scores about 0.17)
        assert int(clipped) > 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hand_written_bptt_matches_autograd() -> None:
    importorskip("torch")
    rng = np.random.default_rng(3)
    params = _demo.init_params(rng, hidden=8, radius=1.1)
    x, y = _demo.adding_batch(rng, batch=5, length=7)
    loss, grads = _demo.numpy_loss_and_grads(params, x, y)
    to, autograd, _ = _demo.BACKENDS["torch"]()
    t_loss, t_grads = autograd({k: to(v) for k, v in params.items()}, to(x), to(y))
    assert loss == pytest.approx(t_loss, rel=1e-5)
    for k, g in grads.items():
        np.testing.assert_allclose(g, t_grads[k].numpy(), rtol=1e-4, atol=1e-6, err_msg=k)


def test_a_backend_not_installed_exits_with_a_message(monkeypatch) -> None:
    monkeypatch.setattr(_demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="--backend torch needs torch, not installed"):
        _demo.run_demo("torch", steps=1)


def test_plain_png_without_matplotlib(tmp_path) -> None:
    runs = [_demo.train("numpy", m, steps=40, seed=0) for m in _demo.METHODS]
    img = _demo._draw(runs, width=200, height=120)
    path = tmp_path / "plain.png"
    _demo._write_png(str(path), img)
    data = path.read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (200, 120)
    start = data.index(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8 : start - 4])[0]
    raw = zlib.decompress(data[start : start + length])
    rows = np.frombuffer(raw, np.uint8).reshape(120, 1 + 200 * 3)[:, 1:].reshape(120, 200, 3)
    np.testing.assert_array_equal(rows, img)
    for colour in _demo.COLOURS.values():  # every run is drawn
        assert np.any(np.all(img == colour, axis=-1))
