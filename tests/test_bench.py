"""The benchmark harness (``python -m gradclip bench``), run on shrunken trees.

The harness is only worth its numbers if every timed call clips fresh data,
so besides the report's shape these tests check what the timed calls leave
behind. optax is hidden in the whole-harness runs: XLA compiles a jitted
145- or 2000-leaf clip for seconds to minutes on a CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import optree
import pytest

import gradclip as gc
import gradclip.__main__ as cli
from conftest import importorskip
from gradclip import _bench

FACTOR = 16  # llm: d=32, vocab 2000; small: leaves of 1 to 128 elements; huge: 4M
QUICK = ("--reps", "2", "--budget", "0.001", "--size-factor", str(FACTOR))


@pytest.fixture
def hide(monkeypatch: pytest.MonkeyPatch):
    """Make the harness see the named libraries as not installed."""

    def hide(*names: str) -> None:
        installed = _bench._installed
        monkeypatch.setattr(_bench, "_installed", lambda n: n not in names and installed(n))

    return hide


def _data(tree) -> _bench._Data:
    leaves = optree.tree_leaves(tree)
    return _bench._Data("test", tree, leaves, _bench._norm(leaves))


# ----------------------------------------------------------------------- trees


def test_llm_tree_shape():
    sizes = _bench.tree_sizes("llm")  # ints in place of arrays: nothing is allocated
    leaves = optree.tree_leaves(sizes)
    assert len(leaves) == 145
    assert sum(leaves) == 54_212_608  # 32000*512 + 12 * 3_152_384
    assert sizes["embed"] == 32000 * 512
    assert len(sizes["blocks"]) == 12
    block = sizes["blocks"][0]
    assert block["attn"]["qkv_weight"] == 512 * 1536
    assert block["mlp"]["fc1_weight"] == block["mlp"]["fc2_weight"] == 512 * 2048
    assert set(block) == {"attn", "mlp", "ln1", "ln2"}


def test_small_and_huge_trees():
    small = optree.tree_leaves(_bench.tree_sizes("small"))
    assert len(small) == 2000
    assert 16 <= min(small) < 50 and 2000 < max(small) <= 2048
    assert small == optree.tree_leaves(_bench.tree_sizes("small"))  # fixed seed
    assert optree.tree_leaves(_bench.tree_sizes("huge")) == [2**26]


def test_make_tree_is_float32_normal_and_needs_clipping():
    tree = _bench.make_tree("llm", size_factor=FACTOR)
    leaves = optree.tree_leaves(tree)
    assert [x.size for x in leaves] == optree.tree_leaves(_bench.tree_sizes("llm", FACTOR))
    assert all(x.dtype == np.float32 for x in leaves)
    flat = np.concatenate([x.ravel() for x in leaves])
    assert abs(flat.mean()) < 0.01 and abs(flat.std() - 1) < 0.01
    assert _bench._norm(leaves) > 100  # far above max_norm=1
    again = optree.tree_leaves(_bench.make_tree("llm", size_factor=FACTOR))
    assert all(np.array_equal(a, b) for a, b in zip(leaves, again, strict=True))


def test_norm_reference_is_float64():
    x = np.full(3 * _bench._CHECK_CHUNK + 5, 3.0, np.float32)
    assert _bench._norm([x, np.array([4.0], np.float32)]) == math.sqrt(9.0 * (x.size) + 16.0)


# ------------------------------------------------------------- the timed calls


def test_result_check_rejects_rows_that_did_not_clip():
    def ok(after: float, before: float, max_norm: float) -> bool:
        return _bench._did_the_work(_bench._norm_error(after, before, max_norm))

    assert _bench._norm_error(1.0002, 500.0, 1.0) == pytest.approx(2e-4)
    assert ok(1.0, 500.0, 1.0) and ok(1.0005, 500.0, 1.0)  # float32 accumulation error
    assert ok(500.0, 500.0, 1e30)  # no clip: the norm unchanged
    assert not ok(500.0, 500.0, 1.0)  # not clipped
    assert not ok(0.0, 500.0, 1.0)  # zeroed
    assert not ok(250.0, 500.0, 1e30)  # scaled when it should not


def test_a_wrong_result_exits_1(hide, monkeypatch, capsys):
    # A missed target exits 0; a row that did not clip is a broken path.
    hide("torch", "optax")
    monkeypatch.setattr(gc, "clip_by_global_norm_", lambda *args, **kwargs: None)
    assert cli.main(["bench", "--tree", "huge", *QUICK]) == 1
    assert "WRONG RESULT: 2 rows" in capsys.readouterr().out


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_every_timed_call_starts_fresh_and_clips(backend, hide):
    if backend == "torch":
        importorskip("torch")
    hide("optax")
    ctx, rows, _ = _bench._plan(backend, "cpu")
    data = _data(_bench.make_tree("small", size_factor=FACTOR))
    for row in rows:
        for max_norm in (1.0, _bench.NO_CLIP):
            if ("clip" if max_norm == 1.0 else "noclip") not in row.cases:
                continue
            timed = row.make(ctx, data, max_norm)
            for _ in range(2):
                timed.fresh()  # untimed: the buffers hold the pristine gradients again
                assert _bench._norm(timed.result(None)) == pytest.approx(data.norm, rel=1e-6)
                out = timed.call()
                timed.done(out)
                after = _bench._norm(timed.result(out))
                if row.key == "read" or max_norm != 1.0:
                    assert after == pytest.approx(data.norm, rel=1e-6), row.label
                elif row.key in ("gradclip", "flattree"):
                    assert 1 - 1e-5 <= after <= 1 + 1e-5, row.label
                else:  # anchors: their float32 norms are less accurate
                    assert after == pytest.approx(1.0, rel=1e-3), row.label
    # the pristine source is never touched
    assert _bench._norm(data.leaves) == _bench._norm(
        optree.tree_leaves(_bench.make_tree("small", size_factor=FACTOR))
    )


def test_rows_are_timed_in_turns_until_each_has_its_calls(monkeypatch):
    """One call of each row a round, so a drift in the machine's speed reaches every row alike.

    Each round starts one row further on: no row always follows the same one.
    """
    log: list[str] = []
    clock = [0.0]  # seconds, advanced only by the calls: no timing in the test
    monkeypatch.setattr(_bench.time, "perf_counter", lambda: clock[0])

    def row(name: str, seconds: float = 0.0) -> _bench._Timed:
        def call() -> str:
            log.append(name)
            clock[0] += seconds
            return name

        fresh = lambda: log.append(f"fresh {name}")  # noqa: E731
        return _bench._Timed(fresh=fresh, call=call, done=lambda out: None, result=list)

    (a_times, a_out), (b_times, b_out) = _bench._time([row("a"), row("b")], reps=3, budget=0.0)
    ab, ba = ["fresh a", "a", "fresh b", "b"], ["fresh b", "b", "fresh a", "a"]
    assert log == ab + ba + ab
    assert (len(a_times), len(b_times), a_out, b_out) == (3, 3, "a", "b")
    # Past reps, a row goes on until it has run for the budget (fresh()
    # included), 20 times reps at most; the others go on without it.
    log.clear()
    timings = _bench._time([row("slow", 2.0), row("fast", 0.001)], reps=2, budget=5.0)
    assert [len(times) for times, _ in timings] == [3, 40]
    calls = [entry for entry in log if not entry.startswith("fresh")]
    assert calls[:6] == ["slow", "fast", "fast", "slow", "slow", "fast"]
    assert set(calls[6:]) == {"fast"}
    assert timings[0][0] == pytest.approx([2.0] * 3)


def test_jax_rows_donate_fresh_arrays_and_clip():
    importorskip("jax")
    importorskip("optax")
    ctx, rows, _ = _bench._plan("jax", "cpu")
    rng = np.random.default_rng(3)
    data = _data({"w": rng.standard_normal((8, 4), dtype=np.float32), "b": np.ones(4, np.float32)})
    keys = {r.key for r in rows}
    assert {"gradclip", "optax", "perleaf"} <= keys and "flattree" not in keys
    for row in (r for r in rows if r.key in ("gradclip", "optax", "perleaf")):
        for case, max_norm in (("clip", 1.0), ("noclip", _bench.NO_CLIP)):
            if case not in row.cases:
                continue  # perleaf: the clip case only
            result = _bench._run_row(ctx, data, row, case, max_norm, reps=3, budget=0.0)
            assert result["check_ok"], result
            assert result["reps"] == 3
    assert data.tree["b"].tolist() == [1.0] * 4  # donation never reached the NumPy source


def test_jax_compile_is_measured_on_its_own_and_reused_by_the_calls():
    importorskip("jax")
    importorskip("optax")
    ctx, rows, _ = _bench._plan("jax", "cpu")
    rng = np.random.default_rng(4)
    data = _data([rng.standard_normal(n, dtype=np.float32) for n in (5, 7, 9)])
    jax_rows = [r for r in rows if r.jax]
    assert {r.key for r in jax_rows} == {"gradclip", "gcjax", "optax", "perleaf"}
    assert not any(r.jax for r in rows if r.key not in ("gradclip", "gcjax", "optax", "perleaf"))
    for row in jax_rows:
        clip = _bench._run_row(ctx, data, row, "clip", 1.0, reps=2, budget=0.0, compile=True)
        assert clip["check_ok"], clip
        assert clip["xla_compiles"] >= 1  # XLA really compiled inside the measurement
        if row.key == "gcjax":  # its first call: compiled inside gradclip.jax, then run
            assert clip["lower_s"] is None and clip["compile_s"] > 0
        else:
            assert 0 < clip["lower_s"] < clip["compile_s"]
        assert 0 < clip["xla_compile_s"] <= clip["compile_s"]
        assert clip["warmup_compiles"] == 0  # the first call ran the executable measured
        # The other case reuses it: nothing measured, nothing compiled.
        noclip = _bench._run_row(ctx, data, row, "noclip", _bench.NO_CLIP, reps=2, budget=0.0)
        assert noclip["check_ok"] and noclip["warmup_compiles"] == 0
        assert all(noclip[f] is None for f in ("compile_s", "lower_s", "xla_compiles"))
        # Measured again without clearing JAX's caches, the "compile" is a cache
        # hit, and the count says so: this is why bench() clears them per tree.
        again = _bench._run_row(ctx, data, row, "clip", 1.0, reps=2, budget=0.0, compile=True)
        assert again["xla_compiles"] == 0


def _target_row(tree, case, key, median_ms, **fields):
    row = {
        "tree": tree,
        "case": case,
        "key": key,
        "median_ms": median_ms,
        "ratio_anchor": None,
        "ratio_torch": None,
        "ratio_optax": None,
        "compile_s": None,
        "xla_compiles": None,
        "check_ok": True,
    }
    return {**row, **fields}


def test_torch_targets_are_issue_6s():
    rows = [
        _target_row("llm", "clip", "dropin", 10.0, ratio_torch=0.97),
        _target_row("huge", "clip", "dropin", 10.0, ratio_torch=1.02),
        _target_row("small", "clip", "dropin", 10.0, ratio_torch=0.45),
        _target_row("small", "clip", "gradclip", 10.0, ratio_torch=0.1),  # not the drop-in
    ]
    targets = {
        t["target"]: (t["value"], t["met"], t["unit"]) for t in _bench._targets(rows, "torch")
    }
    torch_ = "torch clip_grad_norm_(foreach=True)"
    assert targets == {
        f"llm clip: gradclip.torch.clip_grad_norm_ <= 1x {torch_}": (0.97, True, "ratio"),
        f"huge clip: gradclip.torch.clip_grad_norm_ <= 1x {torch_}": (1.02, False, "ratio"),
        f"small clip: gradclip.torch.clip_grad_norm_ <= 0.5x {torch_}": (0.45, True, "ratio"),
    }


def test_jax_targets_are_issue_4s():
    rows = [
        _target_row("llm", "clip", "gradclip", 10.0, ratio_anchor=1.2, ratio_optax=0.9),
        _target_row("llm", "clip", "optax", 11.0, compile_s=2.0, xla_compiles=1),
        _target_row("small", "clip", "gradclip", 9.0, ratio_anchor=3.0, ratio_optax=0.31),
        _target_row("small", "clip", "optax", 29.0, compile_s=110.0, xla_compiles=1),
        _target_row("huge", "clip", "gradclip", 50.0, ratio_anchor=1.3, check_ok=False),
        _target_row("llm", "noclip", "gradclip", 5.0, ratio_anchor=1.1),
        _target_row("small", "noclip", "gradclip", 5.0, ratio_anchor=1.25),
        _target_row(
            "small", "clip", "gcjax", 20.0, ratio_optax=0.69, compile_s=4.5, xla_compiles=1
        ),
    ]
    small = rows[2]
    for compile_s, xla_compiles, value, met in (
        (4.0, 1, 4.0, True),
        (12.0, 2, 12.0, False),
        (0.01, 0, None, None),  # a cache hit measures nothing
    ):
        small.update(compile_s=compile_s, xla_compiles=xla_compiles)
        targets = {t["target"]: t for t in _bench._targets(rows, "jax")}
        assert len(targets) == 10
        compiled = targets["small: gradclip compile <= 10 s"]
        assert (compiled["value"], compiled["met"], compiled["unit"]) == (value, met, "s")
        assert compiled["optax_compile_s"] == 110.0
    met = {name: t["met"] for name, t in targets.items()}
    assert met == {
        "llm clip: gradclip <= 1x optax clip_by_global_norm": True,
        "llm clip: gradclip <= 1.25x floor": True,
        "huge clip: gradclip <= 1.25x floor": False,
        "small clip: gradclip <= 0.3x optax clip_by_global_norm": False,  # 0.31x
        "small: gradclip compile <= 10 s": None,
        "small clip: gradclip.jax <= 0.3x optax clip_by_global_norm": False,  # 0.69x
        "small: gradclip.jax compile <= 10 s": True,  # 4.5 s
        "llm no-clip: gradclip <= 1.2x one read pass": True,
        "huge no-clip: gradclip <= 1.2x one read pass": None,  # not run
        "small no-clip: gradclip <= 1.2x one read pass": False,
    }
    assert targets["small clip: gradclip <= 0.3x optax clip_by_global_norm"]["value"] == 0.31
    rows[4]["ratio_anchor"] = 1.0  # within the bound, but the result was wrong
    huge = {t["target"]: t for t in _bench._targets(rows, "jax")}
    assert huge["huge clip: gradclip <= 1.25x floor"]["met"] is False
    # optax skipped: the targets relative to it are not measured, the others are
    alone = [{**r, "ratio_optax": None} for r in rows if r["key"] != "optax"]
    unmeasured = {t["target"] for t in _bench._targets(alone, "jax") if t["value"] is None}
    assert unmeasured == {
        "llm clip: gradclip <= 1x optax clip_by_global_norm",
        "small clip: gradclip <= 0.3x optax clip_by_global_norm",
        "small clip: gradclip.jax <= 0.3x optax clip_by_global_norm",
        "small: gradclip compile <= 10 s",  # still a cache hit from above
        "huge no-clip: gradclip <= 1.2x one read pass",
    }
    # The torch targets bound the drop-in's row, absent here: none is measured.
    assert all(t["value"] is None for t in _bench._targets(rows, "torch"))
    line = _bench._target_line({**compiled, "value": 4.0, "met": True})
    assert line == "  PASS  small: gradclip compile <= 10 s: 4 s (optax 110 s)"


def test_peak_memory_sees_numpy_temporaries(hide):
    hide("torch", "optax")
    ctx, rows, _ = _bench._plan("numpy")
    naive = next(r for r in rows if r.key == "naive")
    leaf = np.ones(1 << 20, np.float32)
    timed = naive.make(ctx, _data([leaf]), 1.0)
    assert _bench._peak_bytes(timed) >= leaf.nbytes  # g * g allocates a full copy


# ------------------------------------------------------------------ the report


def test_report_json_and_tables(tmp_path: Path, hide, capsys):
    importorskip("torch")
    hide("optax")
    path = tmp_path / "out" / "bench.json"
    assert cli.main(["bench", "--tree", "small", "--json", str(path), *QUICK]) == 0
    out = capsys.readouterr().out
    report = json.loads(path.read_text())

    assert report["command"].startswith("python -m gradclip bench --backend numpy --tree small")
    assert set(report["machine"]) >= {"platform", "cpu", "cpu_count", "memory_bytes", "python"}
    assert report["machine"]["versions"]["numpy"] == np.__version__
    assert report["date"].endswith("+00:00")
    assert report["settings"]["size_factor"] == FACTOR
    assert report["trees"]["small"]["leaves"] == 2000
    assert any("optax" in note for note in report["notes"])

    rows = report["rows"]
    clip = {r["key"]: r for r in rows if r["case"] == "clip"}
    noclip = {r["key"]: r for r in rows if r["case"] == "noclip"}
    assert set(clip) == {"gradclip", "flattree", "torch", "naive", "floor"}
    assert set(noclip) == {"gradclip", "flattree", "torch", "naive", "read"}
    for r in rows:
        assert r["check_ok"], r
        assert r["reps"] >= 2 and len(r["times_ms"]) == r["reps"]
        assert 0 < r["min_ms"] <= r["median_ms"]
        assert r["ratio_anchor"] == pytest.approx(r["median_ms"] / clip["floor"]["median_ms"]) or (
            r["case"] == "noclip"
        )
        assert r["ratio_optax"] is None
    assert clip["floor"]["ratio_anchor"] == 1.0 and noclip["read"]["ratio_anchor"] == 1.0
    assert clip["torch"]["ratio_torch"] == 1.0
    assert 1 - 1e-5 <= clip["gradclip"]["norm_after"] <= 1.0 * (1 + 1e-5)
    assert abs(clip["gradclip"]["norm_error"]) <= 1e-5
    assert noclip["gradclip"]["norm_after"] == pytest.approx(noclip["gradclip"]["norm_before"])
    assert (
        clip["gradclip"]["peak_temp_bytes"] is not None and clip["torch"]["peak_temp_bytes"] is None
    )

    targets = {t["target"]: t for t in report["targets"]}
    assert len(targets) == 7
    small_ms = targets["small clip: gradclip <= 2.5 ms per call"]
    assert small_ms["value"] == clip["gradclip"]["median_ms"]
    assert small_ms["met"] is (small_ms["value"] <= 2.5)
    assert small_ms["ratio_torch"] == clip["gradclip"]["ratio_torch"]
    assert targets["llm clip: gradclip <= 1.25x floor"]["met"] is None  # llm not run

    assert "small: 2000 leaves" in out and "x anchor" in out
    assert "not measured" in out and ("PASS" in out or "MISS" in out)
    assert f"wrote {path}" in out
    assert "to warm up" not in out  # nothing here compiles for seconds


def test_missing_libraries_are_left_out_with_a_note(hide, capsys):
    hide("torch", "jax", "optax")
    report = _bench.bench("numpy", ["llm"], reps=2, budget=0.0, size_factor=FACTOR, progress=True)
    keys = {r["key"] for r in report["rows"]}
    assert keys == {"gradclip", "flattree", "naive", "floor", "read"}
    assert any("torch" in n for n in report["notes"]) and any("optax" in n for n in report["notes"])
    floor = next(r for r in report["rows"] if r["key"] == "floor")
    assert "NumPy" in floor["row"] and floor["check_ok"]
    assert all(r["ratio_torch"] is None and r["ratio_optax"] is None for r in report["rows"])
    assert report["trees"]["llm"] == {
        "leaves": 145,
        "elements": sum(optree.tree_leaves(_bench.tree_sizes("llm", FACTOR))),
        "norm": pytest.approx(report["rows"][0]["norm_before"]),
    }
    err = capsys.readouterr().err  # rich's bar, or a line per row, goes to stderr
    assert "Traceback" not in err


def test_jax_report_has_compile_times_floor_rows_and_targets():
    importorskip("jax")
    importorskip("optax")
    importorskip("torch")
    quick = {"reps": 2, "budget": 0.0, "size_factor": FACTOR, "progress": False, "device": "cpu"}
    report = _bench.bench("jax", ["llm"], skip=["naive"], **quick)
    clip = {r["key"]: r for r in report["rows"] if r["case"] == "clip"}
    noclip = {r["key"]: r for r in report["rows"] if r["case"] == "noclip"}
    # the same torch floor and read pass as the numpy backend's
    assert set(clip) == {"gradclip", "gcjax", "torch", "optax", "perleaf", "floor"}
    assert set(noclip) == {"gradclip", "gcjax", "torch", "optax", "read"}  # perleaf always writes
    assert "(torch)" in clip["floor"]["row"] and "(torch)" in noclip["read"]["row"]
    for r in report["rows"]:
        assert r["check_ok"], r
    for key in ("gradclip", "gcjax", "optax"):
        assert clip[key]["compile_s"] > 0 and clip[key]["xla_compiles"] >= 1, clip[key]
        assert clip[key]["warmup_compiles"] == noclip[key]["warmup_compiles"] == 0
        assert noclip[key]["compile_s"] is None
    assert clip["perleaf"]["compile_s"] > 0 and clip["perleaf"]["warmup_compiles"] == 0
    assert clip["torch"]["compile_s"] is None and clip["torch"]["warmup_compiles"] is None

    targets = {t["target"]: t for t in report["targets"]}
    vs_optax = targets["llm clip: gradclip <= 1x optax clip_by_global_norm"]
    assert vs_optax["value"] == clip["gradclip"]["ratio_optax"]
    assert vs_optax["value"] == pytest.approx(
        clip["gradclip"]["median_ms"] / clip["optax"]["median_ms"]
    )
    assert vs_optax["met"] is (vs_optax["value"] <= 1.0)
    floor = targets["llm clip: gradclip <= 1.25x floor"]
    assert floor["value"] == clip["gradclip"]["ratio_anchor"]
    read = targets["llm no-clip: gradclip <= 1.2x one read pass"]
    assert read["value"] == noclip["gradclip"]["ratio_anchor"]
    assert targets["small: gradclip compile <= 10 s"]["met"] is None  # small not run

    text = _bench.format_report({"command": "test", **report})
    assert "compile s" in text and "targets (gradclip rows):" in text
    assert "llm clip: gradclip <= 1x optax clip_by_global_norm: " in text
    assert "compiled again" not in text and "cache hit" not in text

    # Another run in the same process compiles again: caches are cleared per tree.
    again = _bench.bench("jax", ["llm"], skip=["optax", "torch", "naive", "perleaf"], **quick)
    assert {r["key"] for r in again["rows"]} == {"gradclip", "gcjax", "floor", "read"}
    for key in ("gradclip", "gcjax"):  # gradclip.jax's own cached jit objects too
        row = next(r for r in again["rows"] if r["key"] == key and r["case"] == "clip")
        assert row["xla_compiles"] >= 1 and row["compile_s"] > 0
    assert (
        "optax clip_by_global_norm (jit, donated): skipped on every tree (--skip)"
        in (again["notes"])
    )
    assert again["settings"]["skip"] == ["optax", "torch", "naive", "perleaf"]


def test_skip_leaves_anchors_out_on_the_trees_named(hide):
    importorskip("jax")
    importorskip("optax")
    hide("torch")
    report = _bench.bench(
        "numpy",
        ["llm", "huge"],
        skip=["optax:llm", "naive"],
        reps=2,
        budget=0.0,
        size_factor=FACTOR,
        progress=False,
    )
    keys = {
        tree: {r["key"] for r in report["rows"] if r["tree"] == tree} for tree in ("llm", "huge")
    }
    assert keys["llm"] == {"gradclip", "flattree", "floor", "read"}
    assert keys["huge"] == keys["llm"] | {"optax"}
    assert "optax clip_by_global_norm (jit, donated): skipped on llm (--skip)" in report["notes"]
    assert "naive NumPy loop: skipped on every tree (--skip)" in report["notes"]
    optax = next(r for r in report["rows"] if r["key"] == "optax" and r["case"] == "clip")
    assert optax["compile_s"] > 0  # measured on the numpy backend's JAX anchor too
    assert len(report["targets"]) == 7  # numpy's, unaffected


def test_skip_option(tmp_path: Path, hide, capsys):
    assert _bench._skip_entry("optax") == ("optax", None)
    assert _bench._skip_entry("optax:small") == ("optax", "small")
    parser = argparse.ArgumentParser()
    _bench.add_arguments(parser)  # parsed only: a bad entry accepted would not run anything
    assert parser.parse_args(["--skip", "torch", "--skip", "naive:huge"]).skip == [
        "torch",
        "naive:huge",
    ]
    assert parser.parse_args([]).skip == []
    for bad in ("gradclip", "floor", "optax:medium", "optax:", ":small"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["--skip", bad])
        assert exc.value.code == 2
        with pytest.raises(ValueError, match="--skip"):
            _bench.bench("numpy", [], skip=[bad], progress=False)
    err = capsys.readouterr().err
    assert "the row must be one of torch, optax, naive" in err
    assert "the tree must be one of llm, huge, small, dp" in err
    hide("torch")
    path = tmp_path / "bench.json"
    argv = ["bench", "--tree", "llm", "--skip", "optax", "--skip", "naive:llm"]
    assert cli.main([*argv, "--json", str(path), *QUICK]) == 0
    report = json.loads(path.read_text())
    assert " --skip optax --skip naive:llm" in report["command"]
    assert " --budget 0.001 --max-norm 1.0" in report["command"]  # as given, not rounded
    assert report["settings"]["skip"] == ["optax", "naive:llm"]
    assert {r["key"] for r in report["rows"]} == {"gradclip", "flattree", "floor", "read"}


def test_outputs_that_cannot_be_written_are_refused_before_the_run(tmp_path: Path, capsys):
    # A run of minutes that ended in a traceback lost its timings; argparse
    # refuses the path (exit 2) before anything is timed.
    afile = tmp_path / "afile"
    afile.write_text("")
    cases = [
        (["bench", "--json", str(tmp_path)], "is a directory"),
        (["bench", "--json", ""], "an empty path"),  # was accepted, then nothing written
        (["bench", "--json", str(afile / "x.json")], f"cannot make {afile}"),
        (["demo", "--out", str(tmp_path)], "is a directory"),
        # matplotlib refused .txt after the whole run; without it, .svg held a PNG
        (["demo", "--out", str(tmp_path / "curves.svg")], "must end in .png"),
        (["demo", "--steps", "0"], "--steps: must be > 0"),
        (["demo", "--seed", "-1"], "--seed: must be >= 0"),  # was NumPy's traceback
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    made = tmp_path / "new" / "dir" / "r.json"  # a missing directory is made
    assert _bench.output_path(str(made)) == str(made) and made.parent.is_dir()


def test_backends_that_cannot_run_exit_with_a_message(hide, monkeypatch):
    with pytest.raises(SystemExit, match="--backend numpy runs on the CPU only"):
        _bench._plan("numpy", "gpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        _bench._plan("numpy", "tpu")
    monkeypatch.setattr(_bench, "_torch_cuda", lambda: False)
    monkeypatch.setattr(_bench, "_jax_gpu", lambda: False)
    if _bench._installed("torch"):
        with pytest.raises(SystemExit, match=r"torch --device gpu: torch.cuda.is_available\(\)"):
            _bench._plan("torch", "gpu")
    if _bench._installed("jax"):
        with pytest.raises(SystemExit, match=r"jax --device gpu: jax.default_backend\(\) is not"):
            _bench._plan("jax", "gpu")
    hide("torch")
    with pytest.raises(SystemExit, match="needs torch"):
        _bench._plan("torch")
    with pytest.raises(ValueError, match="unknown backend"):
        _bench._plan("tensorflow")
    if _bench._installed("cupy"):
        with pytest.raises(SystemExit, match="--backend cupy runs on a GPU only"):
            _bench._plan("cupy", "cpu")
        if _bench._cuda_devices() == 0:
            with pytest.raises(SystemExit, match="needs a CUDA device"):
                _bench._plan("cupy")


def test_cli_rejects_bad_numbers(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--reps", "0"])
    assert exc.value.code == 2
    assert "must be > 0" in capsys.readouterr().err


def test_import_loads_no_optional_library():
    code = (
        "import sys, gradclip, gradclip.__main__, gradclip._bench\n"
        "heavy = ('torch', 'jax', 'jaxlib', 'optax', 'cupy', 'rich')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_benchmarks_driver_has_the_same_arguments():
    script = Path(__file__).parents[1] / "benchmarks" / "bench.py"
    out = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, check=True
    )
    for option in ("--backend", "--device", "--dtype", "--tree", "--json", "--reps", "--max-norm"):
        assert option in out.stdout
    assert "--size-factor" not in out.stdout  # for the tests only


# ------------------------------------------------ per-example clipping (issue 8)


def test_dp_tree_is_a_batch_of_the_scaled_down_llm_tree():
    sizes = _bench.tree_sizes("dp")
    leaves = optree.tree_leaves(sizes)
    llm = optree.tree_leaves(_bench.tree_sizes("llm", _bench.EXAMPLE_SIZE_FACTOR))
    assert len(leaves) == 145
    assert leaves == [_bench.EXAMPLE_BATCH * n for n in llm]
    assert sum(llm) == 216_448  # d=32, a 2000-token embedding
    assert sum(leaves) == 256 * 216_448
    assert sizes["embed"] == 256 * 2000 * 32
    assert "dp" not in _bench.TREES  # --tree all leaves it out
    assert _bench.tree_sizes("dp", gpu=True) == sizes  # the same size on a GPU
    with pytest.raises(ValueError, match="llm, huge, small, dp"):
        _bench.tree_sizes("medium")


def test_dp_examples_have_spread_norms_and_half_clip():
    tree = _bench.make_tree("dp", size_factor=FACTOR)
    leaves = optree.tree_leaves(tree)
    assert all(x.dtype == np.float32 and x.shape[0] == 256 for x in leaves)
    assert tree["blocks"][0]["attn"]["qkv_weight"].shape == (256, 2, 6)
    norms = _bench._example_norms(leaves, 256)
    want = np.exp(np.linspace(-1, 1, 256))
    assert np.sort(norms) == pytest.approx(want, rel=1e-6)  # float32 rounding only
    assert not np.array_equal(norms, np.sort(norms))  # shuffled
    assert np.count_nonzero(norms > 1) == 128
    assert np.min(np.abs(np.log(norms))) > 3e-3  # no example near the bound 1
    again = optree.tree_leaves(_bench.make_tree("dp", size_factor=FACTOR))
    assert all(np.array_equal(a, b) for a, b in zip(leaves, again, strict=True))


def test_dp_reference_and_its_check():
    data = _bench._example_data("dp", FACTOR)
    examples = data.examples
    assert examples is not None
    sums, count = examples.expected(1.0)
    assert count == 128
    # the reference by the book: every example scaled, then summed, in float64
    factor = np.minimum(1.0, 1.0 / examples.norms)
    for x, s in zip(data.leaves, sums, strict=True):
        assert s.shape == x.shape[1:]
        assert s == pytest.approx(np.tensordot(factor, x.astype(np.float64), axes=1), rel=1e-9)
    ok = examples.check([s.astype(np.float32) for s in sums], np.int32(128), 1.0)
    assert ok["check_ok"] and ok["norm_error"] < 1e-6
    assert ok["num_clipped"] == ok["num_clipped_expected"] == 128
    assert ok["norm_after"] == pytest.approx(ok["reference_norm"])
    # unclipped, or the right sum with the wrong count: both fail
    plain = [x.sum(axis=0) for x in data.leaves]
    assert not examples.check(plain, 128, 1.0)["check_ok"]
    assert not examples.check(sums, 127, 1.0)["check_ok"]
    # nothing to clip
    _, none = examples.expected(1e30)
    assert none == 0


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_dp_rows_clip_every_example_and_sum(backend):
    if backend != "numpy":
        importorskip(backend)
    if backend == "jax":
        importorskip("optax")
    ctx, _, _ = _bench._plan(backend, "cpu")
    rows, notes = _bench._example_plan(ctx)
    assert notes == []
    anchors = ["optax"] if backend == "jax" else ["naive", "einsum"]
    assert [r.key for r in rows] == ["gradclip", *anchors, "read"]
    assert all(r.cases == ("clip",) for r in rows)
    data = _bench._example_data("dp", FACTOR)
    for row in rows:
        result = _bench._run_row(ctx, data, row, "clip", 1.0, reps=2, budget=0.0, compile=row.jax)
        assert result["check_ok"], result
        if row.key == "read":  # read only: the batch's norm unchanged
            assert result["norm_after"] == pytest.approx(data.norm, rel=1e-6)
            continue
        assert result["num_clipped"] == result["num_clipped_expected"] == 128
        assert result["norm_error"] < 1e-5
        if row.jax:
            assert result["compile_s"] > 0 and result["xla_compiles"] >= 1
            assert result["warmup_compiles"] == 0
    # the pristine batch is never touched
    again = optree.tree_leaves(_bench.make_tree("dp", size_factor=FACTOR))
    assert all(np.array_equal(a, b) for a, b in zip(data.leaves, again, strict=True))


def test_dp_report_json_and_table(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch):
    importorskip("torch")
    path = tmp_path / "bench-dp.json"
    argv = ["bench", "--tree", "dp", "--skip", "torch", "--json", str(path), *QUICK]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads(path.read_text())
    assert report["command"].startswith("python -m gradclip bench --backend numpy --tree dp")
    assert report["settings"]["trees"] == ["dp"]
    info = report["trees"]["dp"]
    assert info["leaves"] == 145 and info["batch"] == 256
    assert info["elements"] == 256 * info["example_elements"]
    assert info["num_clipped"] == 128 and info["eps"] == 0.0
    assert info["example_norm_min"] == pytest.approx(math.exp(-1), rel=1e-6)
    assert info["example_norm_max"] == pytest.approx(math.e, rel=1e-6)
    assert report["targets"] == []
    # notes only about the rows of the trees run: none of the global clip's
    assert not any("clip_grad_norm_" in n or "clip_by_global_norm" in n for n in report["notes"])

    rows = {r["key"]: r for r in report["rows"]}
    assert set(rows) == {"gradclip", "naive", "einsum", "read"}
    assert all(r["case"] == "clip" and r["tree"] == "dp" for r in rows.values())
    assert rows["gradclip"]["row"] == "gradclip per_example_clip (numpy)"
    naive, read = rows["naive"]["median_ms"], rows["read"]["median_ms"]
    for r in rows.values():
        assert r["check_ok"], r
        assert r["reps"] >= 2 and len(r["times_ms"]) == r["reps"]
        assert r["ratio_naive"] == pytest.approx(r["median_ms"] / naive)
        assert r["ratio_anchor"] == pytest.approx(r["median_ms"] / read)
        assert r["ratio_torch"] is None and r["ratio_optax"] is None
        assert r["compile_s"] is None
    assert {rows[k]["num_clipped"] for k in ("gradclip", "naive", "einsum")} == {128}
    assert rows["gradclip"]["peak_temp_bytes"] is not None  # tracemalloc: a NumPy row

    assert "dp: 256 examples x 1,138 elements (145 leaves" in out
    assert "128 of 256 examples clipped; x anchor = x one read pass" in out
    assert "x naive" in out and "WRONG RESULT" not in out
    assert "targets: none set for per-example clipping (issue 8)" in out
    assert "dp: norm err = |sum - float64 reference sum|" in out
    assert "no clip (max_norm" not in out  # the clip case only

    # the docs render it: one column, dp's clip case
    spec = importlib.util.spec_from_file_location(
        "gradclip_docs", Path(__file__).parents[1] / "docs" / "_ext" / "gradclip_docs.py"
    )
    assert spec is not None and spec.loader is not None
    docs = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gradclip_docs", docs)  # its dataclasses look it up
    spec.loader.exec_module(docs)
    timing = docs._bench_tables(report)[0]  # (load() takes files in the repo only)
    result = docs.load(Path(__file__).parents[1] / "benchmarks/results/bench-dp-numpy-cpu.json")
    trees = dict(result.provenance)["trees"]
    assert trees.startswith("dp: 145 leaves, 55,410,688 elements (256 examples of 216,448; ")
    assert timing.header == ["row", "dp, clip"]
    assert [line[0] for line in timing.rows] == [
        "gradclip per_example_clip (numpy)",
        "naive NumPy: sums of squares, tensordot",
        "NumPy einsum sums of squares, tensordot",
        "one read pass: dot (torch)",
    ]


def test_dp_report_torch_and_jax():
    quick = {"reps": 2, "budget": 0.0, "size_factor": FACTOR, "progress": False, "device": "cpu"}
    importorskip("torch")
    report = _bench.bench("torch", ["dp"], **quick)
    rows = {r["key"]: r for r in report["rows"]}
    assert set(rows) == {"gradclip", "naive", "einsum", "read"}
    assert rows["naive"]["row"] == "naive torch: sums of squares, tensordot"
    assert rows["einsum"]["row"] == "torch einsum sums of squares, tensordot"
    assert rows["gradclip"]["ratio_naive"] == pytest.approx(
        rows["gradclip"]["median_ms"] / rows["naive"]["median_ms"]
    )
    assert all(r["check_ok"] for r in rows.values())

    importorskip("jax")
    importorskip("optax")
    report = _bench.bench("jax", ["dp"], **quick)
    rows = {r["key"]: r for r in report["rows"]}
    assert set(rows) == {"gradclip", "optax", "read"}
    assert rows["gradclip"]["row"] == "gradclip per_example_clip (jax, jit)"
    assert rows["optax"]["row"] == "optax per_example_global_norm_clip (jit)"
    for key in ("gradclip", "optax"):
        r = rows[key]
        assert r["check_ok"] and r["num_clipped"] == 128, r
        assert r["compile_s"] > 0 and r["xla_compiles"] >= 1 and r["warmup_compiles"] == 0
        assert r["ratio_optax"] == pytest.approx(r["median_ms"] / rows["optax"]["median_ms"])
        assert r["ratio_naive"] is None
    text = _bench.format_report({"command": "test", **report})
    assert "compile s" in text and "x optax" in text


def test_dp_with_the_global_trees_and_where_it_cannot_run(hide):
    hide("torch", "optax")
    quick = {"reps": 2, "budget": 0.0, "size_factor": FACTOR, "progress": False}
    report = _bench.bench("numpy", ["small", "dp"], skip=["naive:dp"], **quick)
    keys = {t: {r["key"] for r in report["rows"] if r["tree"] == t} for t in ("small", "dp")}
    assert keys["small"] == {"gradclip", "flattree", "naive", "floor", "read"}
    assert keys["dp"] == {"gradclip", "einsum", "read"}
    read = next(r for r in report["rows"] if r["tree"] == "dp" and r["key"] == "read")
    assert read["row"] == "one read pass: dot (NumPy: torch not installed)"
    assert "naive NumPy: sums of squares, tensordot: skipped on dp (--skip)" in report["notes"]
    assert len(report["targets"]) == 7  # the global trees' targets still apply
    with pytest.raises(SystemExit, match="--tree dp times float32 only"):
        _bench.bench("jax", ["dp"], dtype="bfloat16", **quick)
    parser = argparse.ArgumentParser()
    _bench.add_arguments(parser)
    assert parser.parse_args(["--tree", "dp", "--skip", "optax:dp"]).tree == "dp"


# ------------------------------------------------------------ the GPU (issue 5)
#
# No GPU here: the GPU plan runs with NumPy standing in for CuPy (the calls the
# harness makes have the same names and meaning in both), which checks the
# harness's own logic: trees, rows, the floor from the copy, targets, report.


def test_gpu_trees_are_issue_5s_and_the_cpu_trees_unchanged():
    llm = _bench.tree_sizes("llm", gpu=True)
    leaves = optree.tree_leaves(llm)
    assert len(leaves) == 1 + 18 * 12
    assert llm["embed"] == 50304 * 2048
    assert len(llm["blocks"]) == 18
    block = llm["blocks"][0]
    assert block["attn"]["qkv_weight"] == 2048 * 6144
    assert block["mlp"]["fc1_weight"] == block["mlp"]["fc2_weight"] == 2048 * 8192
    total = sum(leaves)
    assert total == 50304 * 2048 + 18 * (12 * 2048**2 + 13 * 2048) == 1_009_471_488
    assert abs(total / 1e9 - 1) < 0.01  # "llm at 1B parameters"
    assert optree.tree_leaves(_bench.tree_sizes("huge", gpu=True)) == [2**30]
    small = optree.tree_leaves(_bench.tree_sizes("small", gpu=True))
    assert small == optree.tree_leaves(_bench.tree_sizes("small"))
    assert len(small) == 2000
    # the CPU trees, which the recorded results were taken on, stay as they were
    assert sum(optree.tree_leaves(_bench.tree_sizes("llm"))) == 54_212_608
    assert optree.tree_leaves(_bench.tree_sizes("huge")) == [2**26]


def test_gpu_floor_is_three_passes_at_the_copy_bandwidth():
    floor_ms, bandwidth = _bench._gpu_floor(4 * 10**9, 2.0)  # 4 GB copied in 2 ms
    assert bandwidth == pytest.approx(4e12)  # read and write: 8 GB in 2 ms
    assert floor_ms == pytest.approx(3.0)  # 12 GB at 4 TB/s: 1.5x the copy
    copy = {"median_ms": 2.0, "min_ms": 1.8, "times_ms": [2.0, 1.8, 2.2], "warmup_s": 9.0}
    row, bw = _bench._floor_from_copy({**copy, "key": "copy", "row": "copy"}, 4 * 10**9)
    assert bw == bandwidth
    assert row["key"] == "floor" and row["derived_from"] == "copy"
    assert row["median_ms"] == pytest.approx(3.0) and row["min_ms"] == pytest.approx(2.7)
    assert row["times_ms"] == pytest.approx([3.0, 2.7, 3.3])
    assert row["warmup_s"] == 0.0


def _gpu_target_rows(changes=None):
    rows = [
        _target_row("llm", "clip", "gradclip", 5.0, ratio_anchor=1.1),  # 90.9% of the floor's
        _target_row("huge", "clip", "gradclip", 5.0, ratio_anchor=1.25),  # 80%
        _target_row("small", "clip", "gradclip", 0.05, ratio_torch=0.25),
        _target_row("llm", "noclip", "gradclip", 2.0, ratio_anchor=1.1),
        _target_row("huge", "noclip", "gradclip", 2.0, ratio_anchor=1.2),
        _target_row("small", "noclip", "gradclip", 0.03, ratio_anchor=1.0),
    ]
    for (tree, case), fields in (changes or {}).items():
        next(r for r in rows if (r["tree"], r["case"]) == (tree, case)).update(fields)
    return rows


def test_cupy_targets_are_issue_5s():
    targets = {t["target"]: t for t in _bench._targets(_gpu_target_rows(), "cupy")}
    assert {name: t["met"] for name, t in targets.items()} == {
        "llm clip: gradclip >= 85% of the floor's bandwidth": True,
        "huge clip: gradclip >= 85% of the floor's bandwidth": False,
        "small clip: gradclip <= 0.06 ms per call": True,
        "small clip: gradclip >= 3x faster than torch clip_grad_norm_(foreach=True)": True,
        "llm no-clip: gradclip <= 1.15x one read pass": True,
        "huge no-clip: gradclip <= 1.15x one read pass": False,
        "small no-clip: gradclip <= 1.15x one read pass": True,
    }
    llm = targets["llm clip: gradclip >= 85% of the floor's bandwidth"]
    assert llm["value"] == pytest.approx(1 / 1.1) and llm["unit"] == "fraction"
    assert llm["at_least"] and llm["limit"] == 0.85
    speedup = targets["small clip: gradclip >= 3x faster than torch clip_grad_norm_(foreach=True)"]
    assert speedup["value"] == pytest.approx(4.0) and speedup["unit"] == "speedup"
    assert _bench._target_line(llm) == (
        "  PASS  llm clip: gradclip >= 85% of the floor's bandwidth: 90.9%"
    )
    assert _bench._target_line(speedup).endswith("(foreach=True): 4x faster")
    ms = targets["small clip: gradclip <= 0.06 ms per call"]
    assert _bench._target_line(ms) == (
        "  PASS  small clip: gradclip <= 0.06 ms per call: 0.05 ms (0.25x torch foreach)"
    )

    # slower than 60 us, or under 3x torch's speed, or a wrong result: missed
    for fields in ({"median_ms": 0.07}, {"ratio_torch": 0.4}, {"check_ok": False}):
        rows = _gpu_target_rows({("small", "clip"): fields})
        met = {t["target"]: t["met"] for t in _bench._targets(rows, "cupy")}
        assert not (
            met["small clip: gradclip <= 0.06 ms per call"]
            and met["small clip: gradclip >= 3x faster than torch clip_grad_norm_(foreach=True)"]
        ), fields
    # torch or the floor did not run: those targets are not measured
    rows = _gpu_target_rows({("small", "clip"): {"ratio_torch": None}})
    rows = [{**r, "ratio_anchor": None} if r["case"] == "clip" else r for r in rows]
    unmeasured = {t["target"] for t in _bench._targets(rows, "cupy") if t["value"] is None}
    assert unmeasured == {
        "llm clip: gradclip >= 85% of the floor's bandwidth",
        "huge clip: gradclip >= 85% of the floor's bandwidth",
        "small clip: gradclip >= 3x faster than torch clip_grad_norm_(foreach=True)",
    }


def test_bfloat16_runs_on_cupy_jax_and_torch_on_a_gpu(capsys):
    refused = "--dtype bfloat16 runs on --backend cupy, jax, or torch on a GPU"
    with pytest.raises(SystemExit, match=refused):
        _bench.bench("numpy", ["small"], dtype="bfloat16", progress=False)
    if _bench._installed("torch"):
        with pytest.raises(SystemExit, match=refused):
            _bench.bench("torch", ["small"], dtype="bfloat16", progress=False, device="cpu")
    with pytest.raises(ValueError, match="unknown dtype 'float16'"):
        _bench.bench("numpy", ["small"], dtype="float16", progress=False)
    with pytest.raises(SystemExit, match=refused):
        cli.main(["bench", "--tree", "small", "--dtype", "bfloat16"])
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--dtype", "float64"])  # not a choice
    assert exc.value.code == 2
    assert "invalid choice: 'float64'" in capsys.readouterr().err
    assert _bench._dtype("numpy", "float32") is np.float32
    ml_dtypes = importorskip("ml_dtypes")
    assert _bench._dtype("jax", "bfloat16", False) is ml_dtypes.bfloat16
    torch = importorskip("torch")
    assert _bench._dtype("torch", "bfloat16", True) is torch.bfloat16
    assert _bench._dtype("torch", "float32", True) is torch.float32


def _fake_reduction(in_params, out_params, *args, **kwargs):
    """cupy.ReductionKernel's sum of squares (_sumsq), in NumPy."""
    assert in_params == "T x" and args[1:4] == ("a + b", "y = a", "0")
    out = np.dtype(out_params.split()[0])

    def kernel(x):
        v = x.reshape(-1).astype(out)
        return np.asarray(np.dot(v, v), dtype=out)

    return kernel


@pytest.fixture
def fake_cupy(monkeypatch: pytest.MonkeyPatch):
    """NumPy playing CuPy on one CUDA device, torch's CUDA being its CPU."""
    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1,
        getDevice=lambda: 0,
        getDeviceProperties=lambda i: {"name": b"Fake GPU", "major": 9, "minor": 0},
        runtimeGetVersion=lambda: 13000,
        driverGetVersion=lambda: 13000,
        deviceSynchronize=lambda: None,
    )
    pool = types.SimpleNamespace(free_all_blocks=lambda: None)
    fake = types.SimpleNamespace(
        float32=np.float32,
        float64=np.float64,
        empty=np.empty,
        copyto=np.copyto,
        asarray=np.asarray,
        asnumpy=np.asarray,
        sqrt=np.sqrt,
        sum=np.sum,
        minimum=np.minimum,
        tensordot=np.tensordot,
        count_nonzero=np.count_nonzero,
        random=types.SimpleNamespace(default_rng=np.random.default_rng),
        ReductionKernel=_fake_reduction,
        get_default_memory_pool=lambda: pool,
        cuda=types.SimpleNamespace(runtime=runtime),
    )
    load, installed = _bench._load, _bench._installed
    monkeypatch.setattr(_bench, "_load", lambda name: fake if name == "cupy" else load(name))
    monkeypatch.setattr(_bench, "_installed", lambda name: name == "cupy" or installed(name))
    monkeypatch.setattr(_bench, "_memcpy", np.copyto)  # cudaMemcpyAsync
    monkeypatch.setattr(_bench, "_torch_cuda", lambda: True)
    _bench._sumsq.cache_clear()  # kernels are cached per process
    yield fake
    _bench._sumsq.cache_clear()


GPU_FACTOR = 256  # llm: d=8, vocab 196; huge: 4M; small: leaves of 1 to 8 elements


def test_gpu_trees_are_drawn_on_the_device(fake_cupy):
    data = _bench._device_data("llm", GPU_FACTOR, np.float32)
    sizes = optree.tree_leaves(_bench.tree_sizes("llm", GPU_FACTOR, gpu=True))
    assert [x.size for x in data.leaves] == sizes
    assert [x.size for x in optree.tree_leaves(data.tree)] == sizes  # flattening order
    assert data.tree["blocks"][0]["attn"]["qkv_weight"].shape == (8, 24)
    assert data.source.size == sum(sizes) and data.nbytes == 4 * sum(sizes)
    # every leaf is a view into the one pristine buffer, laid out in order
    assert all(np.shares_memory(x, data.source) for x in data.leaves)
    assert np.array_equal(np.concatenate([x.ravel() for x in data.leaves]), data.source)
    assert abs(data.source.mean()) < 0.05 and abs(data.source.std() - 1) < 0.05
    assert data.norm == pytest.approx(_bench._norm([data.source]), rel=1e-12)
    assert data.measure is _bench._device_norm
    assert data.flat() is data.source
    again = _bench._device_data("llm", GPU_FACTOR, np.float32)
    assert np.array_equal(again.source, data.source)  # fixed seed

    ml_dtypes = importorskip("ml_dtypes")
    bf16 = _bench._device_data("llm", GPU_FACTOR, ml_dtypes.bfloat16)
    assert bf16.source.dtype == ml_dtypes.bfloat16 and bf16.nbytes == 2 * sum(sizes)
    # the float32 tree, rounded
    assert np.array_equal(bf16.source, data.source.astype(ml_dtypes.bfloat16))
    assert bf16.norm == pytest.approx(data.norm, rel=1e-2)


def test_gpu_copy_row_copies_and_leaves_the_norm(fake_cupy):
    importorskip("torch")
    ctx, rows, _ = _bench._plan("cupy")
    data = _bench._device_data("small", GPU_FACTOR, np.float32)
    copy = next(r for r in rows if r.key == "copy")
    timed = copy.make(ctx, data, 1.0)
    timed.fresh()
    assert not timed.result(None)[0].any()  # zeroed before every call
    timed.done(timed.call())
    assert np.array_equal(timed.result(None)[0], data.source)
    result = _bench._run_row(ctx, data, copy, "clip", 1.0, reps=2, budget=0.0)
    assert result["check_ok"] and result["norm_after"] == pytest.approx(data.norm)


def _gpu_tree(report: dict, name: str) -> tuple[dict, list[dict], dict, dict]:
    """A GPU report's facts on one float32 tree (sizes checked), its rows, and them by case."""
    sizes = optree.tree_leaves(_bench.tree_sizes(name, GPU_FACTOR, gpu=True))
    info = report["trees"][name]
    assert info["leaves"] == len(sizes) and info["elements"] == sum(sizes)
    assert info["dtype"] == "float32" and info["bytes"] == 4 * sum(sizes)
    rows = [r for r in report["rows"] if r["tree"] == name]
    clip = {r["key"]: r for r in rows if r["case"] == "clip"}
    noclip = {r["key"]: r for r in rows if r["case"] == "noclip"}
    return info, rows, clip, noclip


def test_gpu_report_rows_floor_and_targets(fake_cupy, tmp_path: Path, capsys):
    importorskip("torch")
    path = tmp_path / "bench-cupy.json"
    argv = ["bench", "--backend", "cupy", "--tree", "all", "--json", str(path), "--reps", "2"]
    assert cli.main([*argv, "--budget", "0.001", "--size-factor", str(GPU_FACTOR)]) == 0
    out = capsys.readouterr().out
    report = json.loads(path.read_text())

    assert report["settings"]["dtype"] == "float32" and report["settings"]["backend"] == "cupy"
    assert report["machine"]["gpu_device"]["name"] == "Fake GPU"
    assert report["machine"]["gpu_device"]["compute_capability"] == "9.0"
    assert any("optax" in note and "not a GPU anchor" in note for note in report["notes"])
    assert not any("FAILED" in note for note in report["notes"])
    for name in _bench.TREES:
        info, rows, clip, noclip = _gpu_tree(report, name)
        assert set(clip) == {"gradclip", "flattree", "torch", "naive", "flat", "copy", "floor"}
        assert set(noclip) == {"gradclip", "flattree", "torch", "naive", "read"}
        assert clip["torch"]["row"] == "torch clip_grad_norm_(foreach=True), same memory (DLPack)"
        assert clip["naive"]["row"] == "naive CuPy loop"
        for r in rows:
            assert r["check_ok"], r
        # the floor: 3x the bytes at the copy's bandwidth, 1.5x the copy's time
        copy, floor = clip["copy"], clip["floor"]
        assert floor["median_ms"] == pytest.approx(1.5 * copy["median_ms"])
        assert floor["ratio_anchor"] == 1.0
        assert clip["gradclip"]["ratio_anchor"] == pytest.approx(
            clip["gradclip"]["median_ms"] / floor["median_ms"]
        )
        assert info["floor_ms"] == floor["median_ms"]
        assert info["copy_gb_per_s"] == pytest.approx(
            2 * info["bytes"] / (copy["median_ms"] / 1e3) / 1e9
        )
        assert noclip["read"]["ratio_anchor"] == 1.0
        assert clip["torch"]["ratio_torch"] == 1.0

    targets = {t["target"]: t for t in report["targets"]}
    assert len(targets) == 7
    assert all(t["value"] is not None for t in targets.values())
    llm_clip = next(r for r in report["rows"] if r["key"] == "gradclip" and r["tree"] == "llm")
    bandwidth = targets["llm clip: gradclip >= 85% of the floor's bandwidth"]
    assert bandwidth["value"] == pytest.approx(1 / llm_clip["ratio_anchor"])

    assert "backend cupy, float32" in out and ", GPU Fake GPU" in out  # the GPU model
    assert report["machine"]["gpu"] == "Fake GPU"
    assert "x floor (3x bytes / copy bandwidth)" in out and "GB/s" in out
    assert "floor: 3x bytes / copy bandwidth" in out
    assert "targets (gradclip rows, float32):" in out
    assert "floor (GPU): 3 passes over the tree's bytes" in out


def test_gpu_rows_that_fail_are_reported_and_the_others_run(fake_cupy, monkeypatch, capsys):
    def broken(ctx, data, max_norm):
        raise MemoryError("out of device memory")

    monkeypatch.setattr(_bench, "_naive_row", broken)
    quick = {"reps": 2, "budget": 0.0, "size_factor": GPU_FACTOR, "progress": False}
    report = _bench.bench("cupy", ["small"], skip=["torch"], **quick)
    failed = [note for note in report["notes"] if "FAILED" in note]
    assert failed == [
        f"small {case}: naive CuPy loop: FAILED, row left out: MemoryError: out of device memory"
        for case in _bench.CASES
    ]
    assert report["failed"] == [f"small {case}: naive CuPy loop" for case in _bench.CASES]
    assert "Traceback" in capsys.readouterr().err
    keys = {r["key"] for r in report["rows"]}
    assert keys == {"gradclip", "flattree", "flat", "copy", "floor", "read"}
    # a script running the harness (benchmarks/gpu_session.sh) sees the failure
    argv = ["bench", "--backend", "cupy", "--tree", "small", "--skip", "torch", "--reps", "2"]
    assert cli.main([*argv, "--budget", "0.001", "--size-factor", str(GPU_FACTOR)]) == 1
    # on the CPU backends a failing row still stops the run
    with pytest.raises(MemoryError):
        _bench.bench("numpy", ["small"], skip=["torch", "optax"], **quick)


def test_gpu_bfloat16_report(fake_cupy):
    ml_dtypes = importorskip("ml_dtypes")
    # NumPy cannot hand bfloat16 to torch through DLPack (CuPy can): torch is skipped here.
    quick = {"reps": 2, "budget": 0.0, "size_factor": GPU_FACTOR, "progress": False}
    report = _bench.bench("cupy", ["llm"], skip=["torch"], dtype="bfloat16", **quick)
    assert report["settings"]["dtype"] == "bfloat16"
    info = report["trees"]["llm"]
    assert info["dtype"] == "bfloat16" and info["bytes"] == 2 * info["elements"]
    assert not any("FAILED" in note for note in report["notes"]), report["notes"]
    for r in report["rows"]:
        assert r["check_ok"], r
    text = _bench.format_report({"command": "test", **report})
    assert "backend cupy, bfloat16" in text and "MiB bfloat16" in text
    assert ml_dtypes.bfloat16 is _bench._dtype("cupy", "bfloat16")


# ------------------------------------------- torch and JAX on a GPU (issues 4, 6, 8)
#
# Their GPU plans run here on the CPU: torch's "CUDA device" is its CPU device
# (the harness asks _torch_gpu() where to put tensors), JAX's GPU is its
# default device, and the "is there a GPU" checks say yes. JAX's host/device
# split is made small (_HOST_LEAF), so the device-drawn leaves and the chunked
# reference norm (_ROW) run too.

QUICK_GPU = {"reps": 2, "budget": 0.0, "size_factor": GPU_FACTOR, "progress": False}


@pytest.fixture
def fake_torch_cuda(monkeypatch: pytest.MonkeyPatch):
    """torch's CPU playing its CUDA device; yields the list of device syncs made."""
    torch = importorskip("torch")
    syncs: list[int] = []
    monkeypatch.setattr(_bench, "_torch_cuda", lambda: True)
    monkeypatch.setattr(_bench, "_torch_gpu", lambda: torch.device("cpu"))
    monkeypatch.setattr(_bench, "_torch_sync", lambda: syncs.append(1))
    props = types.SimpleNamespace(
        name="Fake CUDA",
        major=9,
        minor=0,
        multi_processor_count=132,
        total_memory=80 * 2**30,
        L2_cache_size=50 * 2**20,
    )
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    return syncs


@pytest.fixture
def fake_jax_gpu(monkeypatch: pytest.MonkeyPatch):
    """JAX's default device (the CPU here) playing a GPU."""
    jax = importorskip("jax")
    monkeypatch.setattr(_bench, "_jax_gpu", lambda: True)
    monkeypatch.setattr(_bench, "_HOST_LEAF", 64)  # llm: 4 of its leaf shapes drawn by JAX
    monkeypatch.setattr(_bench, "_ROW", 16)  # partial sums, and tails
    _bench._jax_partials.cache_clear()  # traced with the old _ROW
    jax.clear_caches()
    yield jax
    _bench._jax_partials.cache_clear()


def _shared(x, source) -> bool:
    return x.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()


def test_device_option_picks_the_gpu_where_the_backend_sees_one(monkeypatch, fake_torch_cuda):
    assert _bench._resolve_device("numpy", None) == "cpu"
    assert _bench._resolve_device("torch", None) == "gpu"  # the fake CUDA
    assert _bench._resolve_device("torch", "cpu") == "cpu"
    monkeypatch.setattr(_bench, "_torch_cuda", lambda: False)
    assert _bench._resolve_device("torch", None) == "cpu"
    for sees, want in ((True, "gpu"), (False, "cpu")):
        monkeypatch.setattr(_bench, "_jax_gpu", lambda sees=sees: sees)
        assert _bench._resolve_device("jax", None) == want
    monkeypatch.setattr(_bench, "_jax_gpu", lambda: pytest.fail("JAX's backends started"))
    assert _bench._resolve_device("jax", "cpu") == "cpu"
    parser = argparse.ArgumentParser()
    _bench.add_arguments(parser)
    assert parser.parse_args([]).device is None
    assert parser.parse_args(["--device", "gpu"]).device == "gpu"
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "tpu"])


def test_device_cpu_keeps_torch_on_the_cpu(fake_torch_cuda, tmp_path: Path, hide):
    hide("optax")
    path = tmp_path / "bench.json"
    argv = ["bench", "--backend", "torch", "--device", "cpu", "--tree", "small"]
    assert cli.main([*argv, "--json", str(path), *QUICK]) == 0
    report = json.loads(path.read_text())
    assert report["settings"]["device"] == "cpu"
    assert " --device cpu" in report["command"]
    assert "gpu_device" not in report["machine"]
    keys = {r["key"] for r in report["rows"]}
    assert keys == {"gradclip", "dropin", "flattree", "torch", "naive", "floor", "read"}
    assert report["trees"]["small"]["elements"] == sum(
        optree.tree_leaves(_bench.tree_sizes("small", FACTOR))
    )
    assert not fake_torch_cuda  # no CUDA sync on the CPU


def test_torch_gpu_trees_are_drawn_on_the_device(fake_torch_cuda, monkeypatch):
    import torch

    monkeypatch.setattr(_bench, "_GPU_CHUNK", 1000)  # several chunks drawn and summed
    ctx, _, _ = _bench._plan("torch")
    assert ctx.gpu and ctx.anchor is ctx.arrays
    data = _bench._gpu_data(ctx, "llm", GPU_FACTOR, torch.float32)
    sizes = optree.tree_leaves(_bench.tree_sizes("llm", GPU_FACTOR, gpu=True))
    assert [x.numel() for x in data.leaves] == sizes
    assert data.tree["blocks"][0]["attn"]["qkv_weight"].shape == (8, 24)
    assert data.source.numel() == sum(sizes) and data.nbytes == 4 * sum(sizes)
    assert all(_shared(x, data.source) for x in data.leaves)  # views into one buffer
    flat = torch.cat([x.reshape(-1) for x in data.leaves])
    assert torch.equal(flat, data.source)
    assert abs(float(flat.mean())) < 0.05 and abs(float(flat.std()) - 1) < 0.05
    assert data.device and data.measure is _bench._torch_norm
    assert data.norm == pytest.approx(_bench._norm([data.source.numpy()]), rel=1e-12)
    again = _bench._gpu_data(ctx, "llm", GPU_FACTOR, torch.float32)
    assert torch.equal(again.source, data.source)  # a seeded generator
    bf16 = _bench._gpu_data(ctx, "llm", GPU_FACTOR, torch.bfloat16)
    assert bf16.source.dtype == torch.bfloat16 and bf16.nbytes == 2 * sum(sizes)
    assert torch.equal(bf16.source, data.source.to(torch.bfloat16))  # the float32 tree, rounded


def test_torch_gpu_report(fake_torch_cuda, tmp_path: Path, capsys):
    path = tmp_path / "bench-torch-gpu.json"
    argv = ["bench", "--backend", "torch", "--tree", "all", "--json", str(path), "--reps", "2"]
    assert cli.main([*argv, "--budget", "0.001", "--size-factor", str(GPU_FACTOR)]) == 0
    out = capsys.readouterr().out
    report = json.loads(path.read_text())

    assert report["settings"]["device"] == "gpu" and "--device" not in report["command"]
    device = report["machine"]["gpu_device"]
    assert device["name"] == report["machine"]["gpu"] == "Fake CUDA"
    assert device["backend"] == "torch" and device["compute_capability"] == "9.0"
    assert "optax clip_by_global_norm: not a GPU anchor (issue 6), row left out" in report["notes"]
    assert not any("FAILED" in note for note in report["notes"])
    for name in _bench.TREES:
        info, rows, clip, noclip = _gpu_tree(report, name)
        both = {"gradclip", "dropin", "flattree", "torch", "naive"}
        assert set(clip) == both | {"flat", "copy", "floor"}
        assert set(noclip) == both | {"read"}
        assert clip["torch"]["row"] == "torch clip_grad_norm_(foreach=True)"
        assert clip["naive"]["row"] == "naive torch loop"
        assert noclip["read"]["row"] == "one read pass: vector_norm (torch)"
        assert clip["copy"]["row"] == "device-to-device copy, one flat buffer (torch copy_)"
        for r in rows:
            assert r["check_ok"], r
            assert r["norm_before"] == info["norm"]
        assert 1 - 1e-5 <= clip["gradclip"]["norm_after"] <= 1 + 1e-5
        assert clip["floor"]["median_ms"] == pytest.approx(1.5 * clip["copy"]["median_ms"])
        assert info["floor_ms"] == clip["floor"]["median_ms"]
        assert clip["dropin"]["ratio_torch"] == pytest.approx(
            clip["dropin"]["median_ms"] / clip["torch"]["median_ms"]
        )
    assert fake_torch_cuda  # every timed call waited for the device

    targets = {t["target"]: t for t in report["targets"]}
    torch_ = "torch clip_grad_norm_(foreach=True)"
    assert set(targets) == {
        f"llm clip on the GPU: gradclip.torch.clip_grad_norm_ <= 1x {torch_}",
        f"huge clip on the GPU: gradclip.torch.clip_grad_norm_ <= 1x {torch_}",
        f"small clip on the GPU: gradclip.torch.clip_grad_norm_ <= 0.5x {torch_}",
    }
    small = next(
        r for r in report["rows"] if (r["tree"], r["case"], r["key"]) == ("small", "clip", "dropin")
    )
    assert targets[f"small clip on the GPU: gradclip.torch.clip_grad_norm_ <= 0.5x {torch_}"][
        "value"
    ] == pytest.approx(small["ratio_torch"])
    assert all(t["value"] is not None for t in targets.values())

    assert "backend torch, float32, on the GPU" in out and ", GPU Fake CUDA" in out
    assert "targets (gradclip rows, float32):" in out
    assert "llm clip on the GPU: gradclip.torch.clip_grad_norm_ <= 1x" in out
    assert "floor (GPU): 3 passes over the tree's bytes" in out and "GB/s" in out


def test_torch_gpu_bfloat16(fake_torch_cuda):
    report = _bench.bench("torch", ["llm"], dtype="bfloat16", **QUICK_GPU)
    info = report["trees"]["llm"]
    assert info["dtype"] == "bfloat16" and info["bytes"] == 2 * info["elements"]
    assert report["settings"]["dtype"] == "bfloat16"
    assert not any("FAILED" in note for note in report["notes"]), report["notes"]
    keys = {r["key"] for r in report["rows"]}
    assert keys == {"gradclip", "dropin", "flattree", "torch", "naive", "flat", "copy", "floor"} | {
        "read"
    }
    for r in report["rows"]:
        assert r["check_ok"], r


def test_gpu_checks_catch_rows_that_do_not_do_the_work(fake_torch_cuda, monkeypatch):
    import torch

    ctx, rows, _ = _bench._plan("torch")
    data = _bench._gpu_data(ctx, "small", GPU_FACTOR, torch.float32)
    by_key = {r.key: r for r in rows}
    assert _bench._run_row(ctx, data, by_key["naive"], "clip", 1.0, 2, 0.0)["check_ok"]
    assert _bench._run_row(ctx, data, by_key["copy"], "clip", 1.0, 2, 0.0)["check_ok"]
    monkeypatch.setattr(_bench, "_naive_torch", lambda grads, max_norm: None)  # clips nothing
    bad = _bench._run_row(ctx, data, by_key["naive"], "clip", 1.0, 2, 0.0)
    assert not bad["check_ok"] and bad["norm_after"] == pytest.approx(data.norm)
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src: self)  # copies nothing
    bad = _bench._run_row(ctx, data, by_key["copy"], "clip", 1.0, 2, 0.0)
    assert not bad["check_ok"] and bad["norm_after"] == 0.0


def test_torch_and_jax_gpu_targets_are_labelled():
    rows = [
        _target_row("llm", "clip", "dropin", 10.0, ratio_torch=0.97),
        _target_row("small", "clip", "dropin", 10.0, ratio_torch=0.6),
        _target_row("llm", "clip", "gradclip", 10.0, ratio_optax=0.8),
    ]
    gpu = {t["target"]: t["met"] for t in _bench._targets(rows, "torch", gpu=True)}
    torch_ = "torch clip_grad_norm_(foreach=True)"
    assert gpu == {
        f"llm clip on the GPU: gradclip.torch.clip_grad_norm_ <= 1x {torch_}": True,
        f"huge clip on the GPU: gradclip.torch.clip_grad_norm_ <= 1x {torch_}": None,
        f"small clip on the GPU: gradclip.torch.clip_grad_norm_ <= 0.5x {torch_}": False,
    }
    (jax,) = _bench._targets(rows, "jax", gpu=True)
    assert jax["target"] == (
        "llm clip on the GPU: gradclip <= 1x optax clip_by_global_norm "
        "(issue 4's CPU target, for information)"
    )
    assert jax["value"] == 0.8 and jax["met"] is True
    assert len(_bench._targets(rows, "jax")) == 10  # the CPU's issue 4 targets
    assert _bench._targets(rows, "cupy", gpu=True) == _bench._targets(rows, "cupy")


def test_jax_gpu_trees_are_drawn_on_the_device(fake_jax_gpu):
    jax = fake_jax_gpu
    ctx, _, _ = _bench._plan("jax")
    assert ctx.gpu and ctx.anchor is None
    data = _bench._gpu_data(ctx, "llm", GPU_FACTOR, np.float32)
    sizes = optree.tree_leaves(_bench.tree_sizes("llm", GPU_FACTOR, gpu=True))
    assert [x.size for x in data.leaves] == sizes
    assert [x.size for x in optree.tree_leaves(data.tree)] == sizes
    assert all(isinstance(x, jax.Array) for x in data.leaves)  # on the device, not NumPy
    assert {x.size for x in data.leaves if x.size > 64} == {1568, 192, 256}  # drawn by JAX
    assert data.source.size == sum(sizes) and isinstance(data.source, jax.Array)
    host = [np.asarray(x) for x in data.leaves]
    flat = np.concatenate([x.ravel() for x in host])
    assert abs(flat.mean()) < 0.05 and abs(flat.std() - 1) < 0.05
    assert data.device and data.measure is _bench._jax_norm
    assert data.norm == pytest.approx(_bench._norm(host), rel=1e-6)
    assert data.flat_norm == pytest.approx(_bench._norm([np.asarray(data.source)]), rel=1e-6)
    assert data.flat_norm != data.norm  # a draw of its own
    again = _bench._gpu_data(ctx, "llm", GPU_FACTOR, np.float32)
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(again.leaves, host, strict=True))
    ml_dtypes = importorskip("ml_dtypes")
    bf16 = _bench._gpu_data(ctx, "llm", GPU_FACTOR, ml_dtypes.bfloat16)
    assert all(x.dtype == ml_dtypes.bfloat16 for x in bf16.leaves)
    assert bf16.nbytes == 2 * sum(sizes)
    for a, b in zip(bf16.leaves, host, strict=True):  # the float32 tree, rounded
        assert np.array_equal(np.asarray(a), b.astype(ml_dtypes.bfloat16))


def test_jax_gpu_rows_keep_their_data_on_the_device(fake_jax_gpu, monkeypatch):
    jax = fake_jax_gpu
    importorskip("optax")
    ctx, rows, notes = _bench._plan("jax")
    assert [r.key for r in rows] == ["gradclip", "optax", "perleaf", "flat", "copy", "read"]
    # The jax nox session has no torch: then that is the note instead.
    why = "not a JAX GPU anchor" if _bench._installed("torch") else "torch not installed"
    assert any(why in n for n in notes)
    data = _bench._gpu_data(ctx, "huge", GPU_FACTOR, np.float32)
    for row in rows:
        case = "noclip" if row.key == "read" else "clip"
        max_norm = _bench.NO_CLIP if case == "noclip" else 1.0
        timed = row.make(ctx, data, max_norm)
        timed.fresh()
        out = timed.call()
        timed.done(out)
        # the timed call leaves its result on the device, and so does the check
        assert all(isinstance(x, jax.Array) for x in optree.tree_leaves(out)), row.key
        assert all(isinstance(x, jax.Array) for x in timed.result(out)), row.key
        result = _bench._run_row(ctx, data, row, case, max_norm, 2, 0.0, compile=row.jax)
        assert result["check_ok"], result
        flat = row.key in ("flat", "copy", "read")
        assert result["norm_before"] == (data.flat_norm if flat else data.norm)
    copy = next(r for r in rows if r.key == "copy").make(ctx, data, 1.0)
    out = copy.call()
    assert out.unsafe_buffer_pointer() != data.source.unsafe_buffer_pointer()  # a real copy
    # a floor that does not clip fails its check
    monkeypatch.setattr(_bench, "_floor_jax", lambda buf, max_norm: buf * 1.0)
    flat_row = next(r for r in rows if r.key == "flat")
    bad = _bench._run_row(ctx, data, flat_row, "clip", 1.0, 2, 0.0)
    assert not bad["check_ok"] and bad["norm_after"] == pytest.approx(data.flat_norm, rel=1e-6)


def test_jax_gpu_report(fake_jax_gpu, capsys):
    jax = fake_jax_gpu
    importorskip("optax")
    report = _bench.bench("jax", ["llm", "huge"], **QUICK_GPU)
    assert report["settings"]["device"] == "gpu"
    device = report["machine"]["gpu_device"]
    assert device["backend"] == "jax" and device["name"] == jax.devices()[0].device_kind
    assert report["machine"]["gpu"] == device["name"]
    assert not any("FAILED" in note for note in report["notes"]), report["notes"]
    for name in ("llm", "huge"):
        info = report["trees"][name]
        assert info["elements"] == sum(
            optree.tree_leaves(_bench.tree_sizes(name, GPU_FACTOR, gpu=True))
        )
        assert info["dtype"] == "float32" and info["flat_norm"] != info["norm"]
        clip = {r["key"]: r for r in report["rows"] if r["tree"] == name and r["case"] == "clip"}
        noclip = {
            r["key"]: r for r in report["rows"] if r["tree"] == name and r["case"] == "noclip"
        }
        assert set(clip) == {"gradclip", "optax", "perleaf", "flat", "copy", "floor"}
        assert set(noclip) == {"gradclip", "optax", "read"}
        for r in [*clip.values(), *noclip.values()]:
            assert r["check_ok"], r
        for key in ("gradclip", "optax"):
            assert clip[key]["compile_s"] > 0 and clip[key]["xla_compiles"] >= 1
            assert clip[key]["warmup_compiles"] == noclip[key]["warmup_compiles"] == 0
        assert clip["copy"]["norm_before"] == info["flat_norm"]
        assert clip["floor"]["median_ms"] == pytest.approx(1.5 * clip["copy"]["median_ms"])
        assert clip["gradclip"]["ratio_optax"] == pytest.approx(
            clip["gradclip"]["median_ms"] / clip["optax"]["median_ms"]
        )
    (target,) = report["targets"]
    llm = next(r for r in report["rows"] if r["key"] == "gradclip" and r["tree"] == "llm")
    assert target["value"] == llm["ratio_optax"]
    text = _bench.format_report({"command": "test", **report})
    assert "backend jax, float32, on the GPU" in text
    assert "(the floor's flat buffer: " in text
    assert "issue 4's CPU target, for information" in text
    assert "naive NumPy loop: runs on the host, not a GPU anchor" in text


def test_jax_gpu_bfloat16(fake_jax_gpu):
    importorskip("optax")
    importorskip("ml_dtypes")
    report = _bench.bench("jax", ["huge"], dtype="bfloat16", **QUICK_GPU)
    info = report["trees"]["huge"]
    assert info["dtype"] == "bfloat16" and info["bytes"] == 2 * info["elements"]
    assert not any("FAILED" in note for note in report["notes"]), report["notes"]
    assert {r["key"] for r in report["rows"]} == {
        "gradclip",
        "optax",
        "perleaf",
        "flat",
        "copy",
        "floor",
        "read",
    }
    for r in report["rows"]:
        assert r["check_ok"], r


def test_jax_bfloat16_on_the_cpu():
    importorskip("jax")
    importorskip("optax")
    importorskip("torch")
    ml_dtypes = importorskip("ml_dtypes")
    quick = {"reps": 2, "budget": 0.0, "size_factor": FACTOR, "progress": False}
    report = _bench.bench("jax", ["huge"], dtype="bfloat16", device="cpu", **quick)
    info = report["trees"]["huge"]
    assert info["elements"] == 2**26 // FACTOR  # the CPU tree, rounded
    assert info["dtype"] == "bfloat16" and info["bytes"] == 2 * info["elements"]
    want = _bench._norm([_bench.make_tree("huge", FACTOR)["weight"].astype(ml_dtypes.bfloat16)])
    assert info["norm"] == want
    keys = {(r["case"], r["key"]) for r in report["rows"]}
    assert keys == {
        *(
            ("clip", k)
            for k in ("gradclip", "gcjax", "torch", "optax", "perleaf", "naive", "floor")
        ),
        *(("noclip", k) for k in ("gradclip", "gcjax", "torch", "optax", "naive", "read")),
    }
    for r in report["rows"]:
        assert r["check_ok"], r
    text = _bench.format_report({"command": "test", **report})
    assert (
        "backend jax, bfloat16, on the CPU" in text and "targets (gradclip rows, bfloat16):" in text
    )
    assert "MiB bfloat16" in text


# --------------------------------------------------- dp on a GPU (issue 8)


def test_dp_on_cupy(fake_cupy):
    report = _bench.bench("cupy", ["dp"], **QUICK_GPU)
    rows = {r["key"]: r for r in report["rows"]}
    assert set(rows) == {"gradclip", "naive", "read"}
    assert rows["gradclip"]["row"] == "gradclip per_example_clip (cupy)"
    assert rows["naive"]["row"] == "naive CuPy: sums of squares, tensordot"
    assert rows["read"]["row"] == "one read pass: sum of squares (cupy)"
    info = report["trees"]["dp"]
    assert info["batch"] == 256 and info["elements"] == 256 * info["example_elements"]
    assert info["num_clipped"] == 128 and "floor_ms" not in info
    for r in rows.values():
        assert r["check_ok"], r
    assert rows["gradclip"]["num_clipped"] == rows["naive"]["num_clipped"] == 128
    assert report["targets"] == []


def test_dp_data_on_a_gpu_is_views_of_one_buffer_put_once(fake_torch_cuda):
    ctx, _, _ = _bench._plan("torch")
    host = _bench._example_data("dp", FACTOR)
    data = _bench._example_device_data(ctx, host)
    assert data.device and data.measure is _bench._torch_norm
    assert data.examples is host.examples  # the reference stays on the host
    assert all(_shared(x, data.source) for x in data.leaves)
    assert all(np.array_equal(x.numpy(), h) for x, h in zip(data.leaves, host.leaves, strict=True))
    assert data.norm == host.norm


def test_dp_on_torch_gpu(fake_torch_cuda):
    report = _bench.bench("torch", ["dp"], **QUICK_GPU)
    assert report["settings"]["device"] == "gpu"
    rows = {r["key"]: r for r in report["rows"]}
    assert set(rows) == {"gradclip", "naive", "einsum", "read"}
    assert rows["read"]["row"] == "one read pass: vector_norm (torch)"
    for r in rows.values():
        assert r["check_ok"], r
    assert {rows[k]["num_clipped"] for k in ("gradclip", "naive", "einsum")} == {128}
    assert fake_torch_cuda


def test_dp_on_jax_gpu(fake_jax_gpu):
    importorskip("optax")
    report = _bench.bench("jax", ["dp"], **QUICK_GPU)
    assert report["settings"]["device"] == "gpu"
    rows = {r["key"]: r for r in report["rows"]}
    assert set(rows) == {"gradclip", "optax", "read"}
    assert rows["read"]["row"] == "one read pass: sum of squares (jit)"
    for r in rows.values():
        assert r["check_ok"], r
    assert rows["gradclip"]["num_clipped"] == rows["optax"]["num_clipped"] == 128
    assert rows["read"]["norm_after"] == pytest.approx(rows["read"]["norm_before"], rel=1e-5)
