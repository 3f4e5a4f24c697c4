"""gradclip.torch over real torch.distributed ranks: gloo process groups on localhost.

Each world size (2 and 4) is one job: ``world`` processes started with the
``spawn`` context run :func:`torch_dist_workers.main`, which joins a gloo
group at ``tcp://127.0.0.1:<free port>``, runs every case below in the same
order on every rank and pickles the results to a temporary folder. The tests
here compare them with the single-process clip of the whole (unsharded)
gradients: gradclip's own, ``torch.nn.utils.clip_grad_norm_`` where torch is
right, and a float64 NumPy reference. A child's exception fails the tests with
its traceback; a child that hangs (a collective that never matches) is killed
after a timeout and fails them too.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import multiprocessing.connection
import pickle
import socket
import time
import types
from typing import Any

import numpy as np
import pytest

from conftest import importorskip, ref_norm, selected_backends

torch = importorskip("torch")

if "torch" not in selected_backends():
    pytest.skip("GRADCLIP_TEST_BACKENDS leaves torch out", allow_module_level=True)
if not torch.distributed.is_available():
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)
if not torch.distributed.is_gloo_available():
    pytest.skip("this torch build has no gloo backend", allow_module_level=True)

import gradclip.torch as gct  # noqa: E402
import torch_dist_workers  # noqa: E402  (needs the skips above: it is only useful with gloo)

INF = math.inf
NORMS = {"p2": 2.0, "p1": 1.0, "p3": 3.0, "pinf": INF, "pminf": -INF}
# One job per world size takes about 10 s, mostly starting the processes.
# A collective that never matches raises in the ranks after COLLECTIVE_TIMEOUT_S;
# the parent kills whatever still runs after TIMEOUT_S.
COLLECTIVE_TIMEOUT_S = 45.0
TIMEOUT_S = 120.0

# The model: gradients laid end to end are 94 elements long.
SHAPES = [(7, 5), (5,), (3, 4, 2), (11,), (1,), (6, 3)]
STARTS = np.cumsum([0] + [math.prod(s) for s in SHAPES])  # 0 35 40 64 75 76 94
# Rank r holds flat elements bounds[r]:bounds[r+1]; the cuts fall inside tensors.
BOUNDS = {2: [0, 61, 94], 4: [0, 23, 23, 70, 94]}  # rank 1 of 4 holds nothing
EMPTY_FIRST = {2: [0, 0, 94], 4: [0, 0, 40, 41, 94]}  # rank 0 holds nothing
BAD_INDEX = 80  # a flat index on the last rank, inside tensor p5
BAD_NAME = "p5.grad"
# LayerNorm-like parameters that every rank holds whole.
REPL_SHAPES = [(9,), (9,)]


def _grads(dtype: str = "float32", scale: Any = 1.0, seed: int = 0) -> list[np.ndarray]:
    """Gradients of SHAPES; ``scale`` is one number or one per tensor."""
    rng = np.random.default_rng(seed)
    scales = np.broadcast_to(np.asarray(scale, dtype=np.float64), (len(SHAPES),))
    return [(rng.standard_normal(s) * c).astype(dtype) for s, c in zip(SHAPES, scales, strict=True)]


# Magnitudes in different binades on different ranks: their float64 sums carry
# different exponents, which must be brought to a common one before the SUM.
SPREAD = np.array([1.0, 40.0, 0.02, 300.0, 1.0, 0.005])


def _sharded(
    dtype, p, *, scale=1.0, bounds=BOUNDS, max_norm=None, torch_ok=True, seed=0, none=False
):
    """A sharded case; ``none``: a rank holding nothing passes no parameters at all."""

    def spec(world):
        grads = _grads(dtype, scale, seed)
        bound = max_norm if max_norm is not None else 0.25 * ref_norm(grads, p)
        return {
            "check": "sharded",
            "grads": grads,
            "bounds": bounds[world],
            "norm_type": p,
            "max_norm": bound,
            "torch_ok": torch_ok,
            "none_if_empty": none,
        }

    return spec


SHARDED = {
    **{f"f32-{k}": _sharded("float32", p) for k, p in NORMS.items()},
    **{f"f64-{k}": _sharded("float64", p) for k, p in NORMS.items()},
    "f32-p2-noclip": _sharded("float32", 2.0, max_norm=1e3),
    "f32-p2-empty-first": _sharded("float32", 2.0, bounds=EMPTY_FIRST),
    "f64-pminf-empty-first": _sharded("float64", -INF, bounds=EMPTY_FIRST),
    # A rank with no gradients at all still takes part in the all-reduces.
    **{
        f"f32-{k}-none-first": _sharded("float32", p, bounds=EMPTY_FIRST, none=True)
        for k, p in NORMS.items()
    },
    # float32 gradients of 1e20: torch's float32 norm overflows to inf here.
    "f32-overflow-p2": _sharded("float32", 2.0, scale=1e20, max_norm=1.0, torch_ok=False),
    "f32-overflow-p3": _sharded("float32", 3.0, scale=1e20, max_norm=1.0, torch_ok=False),
    "f32-underflow-p2": _sharded("float32", 2.0, scale=1e-30, torch_ok=False),
    # float64 sums carry a power-of-two exponent, all-reduced (MAX) first.
    "f64-huge-p2": _sharded("float64", 2.0, scale=1e300, max_norm=1.0, torch_ok=False),
    "f64-huge-p3": _sharded("float64", 3.0, scale=1e300, max_norm=1.0, torch_ok=False),
    "f64-tiny-p2-empty-first": _sharded(
        "float64", 2.0, scale=1e-300, bounds=EMPTY_FIRST, max_norm=1.0, torch_ok=False
    ),
    # Each rank's float64 sum of squares is finite (up to 1.4e308), their SUM
    # is not: such sums are redone scaled on each rank (see _numpy._HUGE).
    "f64-sums-overflow-p2": _sharded("float64", 2.0, scale=1.69e153, max_norm=1.0, torch_ok=False),
    "f64-spread-huge-p2": _sharded("float64", 2.0, scale=SPREAD * 1e250, torch_ok=False),
    "f64-spread-tiny-p3": _sharded("float64", 3.0, scale=SPREAD * 1e-250, torch_ok=False),
    "f64-spread-p1": _sharded("float64", 1.0, scale=SPREAD),
    # Partials of very large ord carry their largest magnitude, not a power
    # of two (whose ord-th power overflows): the MAX all-reduce is of those.
    "f32-spread-p2000": _sharded("float32", 2000.0, scale=SPREAD, torch_ok=False),
    "f64-spread-p5000-empty-first": _sharded(
        "float64", 5000.0, scale=SPREAD * 1e200, bounds=EMPTY_FIRST, torch_ok=False
    ),
}


def _replicated(dtype, p):
    def spec(world):
        rng = np.random.default_rng(1)
        return {
            "check": "replicated",
            "grads": _grads(dtype),
            "bounds": BOUNDS[world],
            "repl": [(rng.standard_normal(s) * 2).astype(dtype) for s in REPL_SHAPES],
            "norm_type": p,
            "max_norm": 1.0,
        }

    return spec


REPLICATED = {
    "f32-p2": _replicated("float32", 2.0),
    "f32-p1": _replicated("float32", 1.0),
    "f32-pinf": _replicated("float32", INF),
    "f64-p2": _replicated("float64", 2.0),
}


def _nonfinite(policy, p, bad=math.nan):
    def spec(world):
        grads = _grads()
        j = int(np.searchsorted(STARTS, BAD_INDEX, side="right")) - 1
        grads[j].reshape(-1)[BAD_INDEX - STARTS[j]] = bad
        assert f"p{j}.grad" == BAD_NAME and BOUNDS[world][-2] <= BAD_INDEX
        return {
            "check": "nonfinite",
            "grads": grads,
            "bounds": BOUNDS[world],
            "norm_type": p,
            "max_norm": 1.0,
            "policy": policy,
        }

    return spec


NONFINITE = {
    "error_if_nonfinite-p2": _nonfinite("error_if_nonfinite", 2.0),
    "raise-pinf": _nonfinite("raise", INF),
    "raise-pminf-inf": _nonfinite("raise", -INF, bad=INF),
    "skip-p2": _nonfinite("skip", 2.0),
    "skip-pminf-inf": _nonfinite("skip", -INF, bad=-INF),
    "propagate-p2": _nonfinite("propagate", 2.0),
    "propagate-pinf": _nonfinite("propagate", INF),
    "propagate-pminf": _nonfinite("propagate", -INF),
    "zero-p2": _nonfinite("zero", 2.0),
}


def _dtensor(p, entries, *, dtype="float32", scale=1.0, plain=0, max_norm=1.0, min_world=2):
    """``entries``: (shape, mesh name, placements) of each DTensor gradient."""

    def spec(world):
        rng = np.random.default_rng(2)
        return {
            "check": "dtensor",
            "entries": [
                {
                    "grad": (rng.standard_normal(shape) * scale).astype(dtype),
                    "mesh": mesh,
                    "placements": placements,
                }
                for shape, mesh, placements in entries
            ],
            # Plain tensors next to the DTensors: each rank holds them whole.
            "plain": [rng.standard_normal((4,)).astype(dtype) for _ in range(plain)],
            "norm_type": p,
            "max_norm": max_norm,
        }

    spec.min_world = min_world
    return spec


# At 4 ranks the (3,) tensor leaves one rank with an empty shard; at 2 the
# shards are uneven.
MESH1 = [
    ((10, 3), "1d", ["S0"]),
    ((5,), "1d", ["R"]),
    ((3,), "1d", ["S0"]),
    ((4, 6), "1d", ["S1"]),
]
MESH2 = [
    ((8, 6), "2d", ["S0", "R"]),
    ((6,), "2d", ["R", "S0"]),
    ((4, 6), "2d", ["S0", "S1"]),
    ((5,), "2d", ["R", "R"]),
    ((3, 5), "2d", ["S1", "S0"]),
]
MESH2_NAMED = [(shape, "2d_named", placements) for shape, _, placements in MESH2]

DTENSOR = {
    **{f"mesh1-f32-{k}": _dtensor(p, MESH1) for k, p in NORMS.items()},
    "mesh1-f64-p2": _dtensor(2.0, MESH1, dtype="float64"),
    "mesh1-f64-huge-p2": _dtensor(2.0, MESH1, dtype="float64", scale=1e300),
    "mesh1-f32-overflow-p2": _dtensor(2.0, MESH1, scale=1e20),
    "mesh1-plain-p2": _dtensor(2.0, MESH1, plain=2),
    # _StridedShard is no Shard subclass, and was refused.
    "mesh1-strided-p2": _dtensor(2.0, [((8, 3), "1d", ["SS0"]), *MESH1[:2]]),
    "mesh2-f32-p2": _dtensor(2.0, MESH2, min_world=4),
    "mesh2-f32-pinf": _dtensor(INF, MESH2, min_world=4),
    "mesh2-f32-pminf": _dtensor(-INF, MESH2, min_world=4),
    "mesh2-f64-p2": _dtensor(2.0, MESH2, dtype="float64", min_world=4),
    "mesh2-named-f32-p2": _dtensor(2.0, MESH2_NAMED, min_world=4),
    # Two meshes in one call: two all-reduces, merged.
    "mesh1-and-mesh2-p2": _dtensor(2.0, MESH1[:2] + MESH2[:3], plain=1, min_world=4),
}


@functools.cache
def build_cases(world: int) -> dict[str, dict]:
    """Every case of the job for ``world`` ranks, in the order the ranks run them."""
    cases: dict[str, dict] = {}
    for group, table in (
        ("sharded", SHARDED),
        ("replicated", REPLICATED),
        ("nonfinite", NONFINITE),
        ("dtensor", DTENSOR),
    ):
        for name, make in table.items():
            if world >= getattr(make, "min_world", 2):
                cases[f"{group}/{name}"] = make(world)
    cases["ord0"] = {"check": "ord0", "grads": _grads(), "bounds": BOUNDS[world]}
    cases["all_empty"] = {"check": "all_empty"}
    cases["overflow_elsewhere"] = {"check": "overflow_elsewhere"}
    cases["dtensor_partial"] = {"check": "dtensor_partial"}
    if world >= 4:
        cases["dtensor_elsewhere"] = {"check": "dtensor_elsewhere"}
    return cases


# ---------------------------------------------------------------- the job


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, cases: dict[str, dict], outdir: Any) -> list[dict[str, Any]]:
    """Run the job on ``world`` spawned ranks; their results, or a failure with their tracebacks."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(
            target=torch_dist_workers.main,
            args=(rank, world, port, str(outdir), cases, COLLECTIVE_TIMEOUT_S),
            name=f"gradclip-rank{rank}",
            daemon=True,
        )
        for rank in range(world)
    ]
    start = time.monotonic()
    for proc in procs:
        proc.start()
    failed_at = None
    while True:
        alive = [proc for proc in procs if proc.exitcode is None]
        if not alive:
            break
        now = time.monotonic()
        if failed_at is None and any(proc.exitcode not in (None, 0) for proc in procs):
            failed_at = now  # the others may wait forever in a collective: a moment, no more
        if now - start > TIMEOUT_S or (failed_at is not None and now - failed_at > 10):
            break
        multiprocessing.connection.wait([proc.sentinel for proc in alive], timeout=0.5)
    hung = [rank for rank, proc in enumerate(procs) if proc.exitcode is None]
    for rank in hung:
        procs[rank].kill()
    for proc in procs:
        proc.join(10)
    problems = []
    for rank, proc in enumerate(procs):
        err = outdir / f"rank{rank}.err"
        if err.exists():
            problems.append(f"--- rank {rank} raised:\n{err.read_text()}")
        elif rank in hung:
            why = "after another rank failed" if failed_at is not None else "deadlock?"
            problems.append(f"--- rank {rank} was killed unfinished ({why})")
        elif proc.exitcode != 0:
            fault = outdir / f"rank{rank}.fault"
            stacks = fault.read_text() if fault.exists() else ""
            problems.append(f"--- rank {rank} exited with code {proc.exitcode}\n{stacks}")
        proc.close()
    if problems:
        elapsed = time.monotonic() - start
        head = f"the {world}-rank job failed after {elapsed:.0f} s (timeout {TIMEOUT_S:.0f} s):\n"
        raise RuntimeError(head + "\n".join(problems))
    return [pickle.loads((outdir / f"rank{r}.pkl").read_bytes()) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """``ranks(world)``: one dict of case results per rank; the job runs once per world size."""
    done: dict[int, Any] = {}

    def get(world: int) -> list[dict[str, Any]]:
        if world not in done:
            try:
                done[world] = _launch(
                    world, build_cases(world), tmp_path_factory.mktemp(f"world{world}")
                )
            except RuntimeError as exc:
                done[world] = exc
        if isinstance(done[world], RuntimeError):
            pytest.fail(str(done[world]), pytrace=False)
        return done[world]

    return get


def _case(ranks, world: int, name: str) -> list[dict[str, Any]]:
    return [r[name] for r in ranks(world)]


def _case_spec(world: int, name: str) -> dict[str, Any]:
    return build_cases(world)[name]


# ---------------------------------------------------------------- references


def _tol(dtype) -> float:
    return 1e-12 if np.dtype(dtype) == np.float64 else 1e-6


def _single(grads: list[np.ndarray], p: float, max_norm: float, *, nn_utils: bool = False):
    """The single-process clip of the whole gradients: (norm, clipped gradients)."""
    params = [
        torch.nn.Parameter(torch.zeros(g.shape, dtype=torch.from_numpy(g).dtype)) for g in grads
    ]
    for q, g in zip(params, grads, strict=True):
        q.grad = torch.from_numpy(g.copy())
    clip = torch.nn.utils.clip_grad_norm_ if nn_utils else gct.clip_grad_norm_
    norm = clip(params, max_norm, p)
    return norm.numpy(), [q.grad.numpy() for q in params]


def _ref_clipped(grads: list[np.ndarray], p: float, max_norm: float) -> list[np.ndarray]:
    """float64 reference: each gradient times min(1, max_norm / (norm + 1e-6)), in its dtype."""
    scale = min(1.0, max_norm / (ref_norm(grads, p) + 1e-6))
    return [(g.astype(np.float64) * scale).astype(g.dtype) for g in grads]


def _flat(grads: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([g.reshape(-1) for g in grads])


def _same_on_every_rank(values: list[np.ndarray]) -> np.ndarray:
    """Bitwise the same 0-d array on every rank (dtype included); that array."""
    first = values[0]
    for rank, v in enumerate(values):
        assert v.dtype == first.dtype and v.tobytes() == first.tobytes(), (
            f"rank {rank} got {v!r}, rank 0 got {first!r}"
        )
    return first


# ---------------------------------------------------------------- 1. sharded


@pytest.mark.parametrize("name", list(SHARDED))
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_flat_gradients(ranks, world, name):
    spec = _case_spec(world, f"sharded/{name}")
    res = _case(ranks, world, f"sharded/{name}")
    grads, p, max_norm = spec["grads"], spec["norm_type"], spec["max_norm"]
    dtype = grads[0].dtype
    tol = _tol(dtype)

    norm = _same_on_every_rank([r["norm"] for r in res])
    assert norm.dtype == dtype  # float32 grads: float32 norm; float64: float64
    want = ref_norm(grads, p)
    single_norm, single_grads = _single(grads, p, max_norm)
    np.testing.assert_allclose(norm, want, rtol=tol)
    np.testing.assert_allclose(norm, single_norm, rtol=tol)
    if spec["torch_ok"]:
        torch_norm, torch_grads = _single(grads, p, max_norm, nn_utils=True)
        np.testing.assert_allclose(norm, torch_norm, rtol=1e-6)
    # The other routes agree: get_total_norm, and the generic (foreach=False) path.
    for key in ("gtn", "gtn_generic", "norm_generic"):
        np.testing.assert_allclose(_same_on_every_rank([r[key] for r in res]), norm, rtol=tol)
    scale = _same_on_every_rank([r["scale"] for r in res])
    assert all(r["clipped"] == bool(scale < 1) and r["finite"] for r in res)
    assert bool(scale < 1) == (want > max_norm)

    # Ranks' shards, in rank order, are the whole gradients.
    np.testing.assert_array_equal(np.concatenate([r["before"] for r in res]), _flat(grads))
    clipped = np.concatenate([r["shard"] for r in res])
    assert clipped.dtype == dtype
    np.testing.assert_allclose(clipped, _flat(single_grads), rtol=tol, atol=0)
    np.testing.assert_allclose(clipped, _flat(_ref_clipped(grads, p, max_norm)), rtol=tol, atol=0)
    generic = np.concatenate([r["shard_generic"] for r in res])
    np.testing.assert_allclose(generic, clipped, rtol=tol, atol=0)
    if spec["torch_ok"]:
        np.testing.assert_allclose(clipped, _flat(torch_grads), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- 2. replicated=


@pytest.mark.parametrize("name", list(REPLICATED))
@pytest.mark.parametrize("world", [2, 4])
def test_replicated_counted_once(ranks, world, name):
    spec = _case_spec(world, f"replicated/{name}")
    res = _case(ranks, world, f"replicated/{name}")
    grads, repl, p = spec["grads"], spec["repl"], spec["norm_type"]
    tol = _tol(grads[0].dtype)
    whole = grads + repl
    want = ref_norm(whole, p)
    single_norm, single_grads = _single(whole, p, spec["max_norm"])
    np.testing.assert_allclose(single_norm, want, rtol=tol)
    for key in ("gtn_set", "gtn_pred", "norm_set", "norm_pred"):
        got = _same_on_every_rank([r[key] for r in res])
        np.testing.assert_allclose(got, want, rtol=tol, err_msg=key)

    # Without replicated= every rank's copy counts: the norm of `world` copies.
    over = _same_on_every_rank([r["over"] for r in res])
    np.testing.assert_allclose(over, ref_norm(grads + repl * world, p), rtol=tol)
    if math.isinf(p):
        assert over == want  # a max is blind to duplicates
    else:
        assert not np.isclose(over, want, rtol=1e-3), "the test cannot tell over-counting apart"

    n = len(grads)
    for how in ("set", "pred"):
        clipped = np.concatenate([r[f"shard_{how}"] for r in res])
        np.testing.assert_allclose(clipped, _flat(single_grads[:n]), rtol=tol, atol=0)
        for rank, r in enumerate(res):
            for k, g in enumerate(r[f"repl_{how}"]):
                np.testing.assert_array_equal(g, res[0][f"repl_{how}"][k], err_msg=f"rank {rank}")
                np.testing.assert_allclose(g, single_grads[n + k], rtol=tol, atol=0)


# ---------------------------------------------------------------- 3./4. nonfinite


def _unchanged(res):
    for rank, r in enumerate(res):
        np.testing.assert_array_equal(r["after"], r["before"], err_msg=f"rank {rank} modified")


@pytest.mark.parametrize(
    "name", [n for n in NONFINITE if n.split("-")[0] in ("raise", "error_if_nonfinite")]
)
@pytest.mark.parametrize("world", [2, 4])
def test_nonfinite_raise_on_every_rank(ranks, world, name):
    res = _case(ranks, world, f"nonfinite/{name}")
    holder = world - 1  # BAD_INDEX lies on the last rank
    for key in ("gtn", "clip"):
        for rank, r in enumerate(res):
            out = r[key]
            assert out["raised"] is not None, f"{key}: rank {rank} did not raise"
            assert out["nonfinite_error"], f"{key}: rank {rank} raised {out['raised']}"
            if rank == holder:
                assert BAD_NAME in out["message"], out["message"]
            else:
                assert "another rank" in out["message"], out["message"]
            assert "nothing was modified" in out["message"]
    _unchanged(res)


@pytest.mark.parametrize("name", [n for n in NONFINITE if n.startswith("skip")])
@pytest.mark.parametrize("world", [2, 4])
def test_nonfinite_skip_on_every_rank(ranks, world, name):
    res = _case(ranks, world, f"nonfinite/{name}")
    for rank, r in enumerate(res):
        assert r["clip"]["raised"] is None, r["clip"]
        stats = r["clip"]["result"]
        assert stats["finite"] is False, f"rank {rank}"
        assert stats["scale"] == 1 and stats["clipped"] is False, f"rank {rank}: {stats}"
    _same_on_every_rank([r["clip"]["result"]["norm"] for r in res])
    _unchanged(res)


@pytest.mark.parametrize("name", [n for n in NONFINITE if n.startswith("propagate")])
@pytest.mark.parametrize("world", [2, 4])
def test_nonfinite_propagate_nan_on_every_rank(ranks, world, name):
    # A NaN on one rank makes the norm NaN everywhere, even for inf/-inf,
    # whose MAX/MIN all-reduce may drop a NaN (gloo's max is not NaN-aware).
    res = _case(ranks, world, f"nonfinite/{name}")
    for rank, r in enumerate(res):
        stats = r["clip"]["result"]
        assert np.isnan(stats["norm"]), f"rank {rank}: {stats}"
        assert stats["finite"] is False


@pytest.mark.parametrize("world", [2, 4])
def test_nonfinite_zero(ranks, world):
    spec = _case_spec(world, "nonfinite/zero-p2")
    res = _case(ranks, world, "nonfinite/zero-p2")
    grads = [np.where(np.isfinite(g), g, 0).astype(g.dtype) for g in spec["grads"]]
    norm = _same_on_every_rank([r["clip"]["result"]["norm"] for r in res])
    np.testing.assert_allclose(norm, ref_norm(grads, 2.0), rtol=1e-6)
    clipped = np.concatenate([r["after"] for r in res])
    assert clipped[BAD_INDEX] == 0
    np.testing.assert_allclose(clipped, _flat(_ref_clipped(grads, 2.0, 1.0)), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- 5. ord=0


@pytest.mark.parametrize("world", [2, 4])
def test_ord0_with_process_group_raises_everywhere(ranks, world):
    res = _case(ranks, world, "ord0")
    for rank, r in enumerate(res):
        for key in ("clip", "gtn"):
            assert r[key]["value_error"], f"rank {rank} {key}: {r[key]}"
            assert "ord=0" in r[key]["message"]
    _unchanged(res)


@pytest.mark.parametrize("world", [2, 4])
def test_no_rank_holds_anything(ranks, world):
    for r in _case(ranks, world, "all_empty"):
        assert r == {"gtn_none": 0.0, "gtn_empty": 0.0, "clip_none": 0.0}


@pytest.mark.parametrize(
    ("reported", "config", "want"),
    [
        ("nccl", "cuda:nccl", "cuda"),
        ("undefined", "cpu:gloo,cuda:nccl", "cuda"),  # init_process_group() with no backend
        ("cpu:gloo,cuda:nccl", "cpu:gloo,cuda:nccl", "cuda"),
        ("gloo", "cpu:gloo,cuda:gloo", None),
    ],
)
def test_an_empty_rank_reduces_where_the_group_does(monkeypatch, reported, config, want):
    # A rank with no gradients still joins the all-reduce. Its tensors stayed
    # on the CPU unless get_backend said exactly "nccl": then they went through
    # gloo, or nowhere, while the other ranks waited in NCCL. (No NCCL here:
    # the choice itself, with the group's reports as torch gives them.)
    group = object()
    monkeypatch.setattr(torch.distributed, "get_backend", lambda g: reported)
    monkeypatch.setattr(torch.distributed, "get_backend_config", lambda g: config)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    nothing = types.SimpleNamespace(xp=None)
    plan = gct._plan(nothing, 2.0, "propagate", None, [], group)
    assert (plan.device and plan.device.type) == want
    # First the device of the parameters, which have no .grad on this rank.
    params = [torch.nn.Parameter(torch.zeros(3, device="meta"))]
    _, owners, _ = gct._grads(params, "clip_grad_norm_")
    assert gct._plan(nothing, 2.0, "propagate", None, owners, group).device.type == "meta"


@pytest.mark.parametrize("world", [2, 4])
def test_a_norm_past_one_ranks_dtype_raises_on_every_rank(ranks, world):
    # Rank 0's float64 norm is 5e300; the others hold nothing and work in
    # float32, where it is inf. error_if_nonfinite raised there alone, while
    # rank 0 clipped: now every rank raises, and nothing is modified.
    res = _case(ranks, world, "overflow_elsewhere")
    for rank, r in enumerate(res):
        assert r["clip"]["nonfinite_error"], f"rank {rank}: {r['clip']}"
        assert "overflows the dtype of this rank or another" in r["clip"]["message"]
    _unchanged(res)
    assert float(res[0]["norm"]) == pytest.approx(5e300, rel=1e-12)
    assert all(np.isinf(r["norm"]) for r in res[1:])  # documented: float32 on empty ranks


# ---------------------------------------------------------------- 6. DTensor


def _dtensor_names(world):
    return [n for n, make in DTENSOR.items() if world >= make.min_world]


@pytest.mark.parametrize(("world", "name"), [(w, n) for w in (2, 4) for n in _dtensor_names(w)])
def test_dtensor_gradients(ranks, world, name):
    spec = _case_spec(world, f"dtensor/{name}")
    res = _case(ranks, world, f"dtensor/{name}")
    grads = [e["grad"] for e in spec["entries"]] + spec["plain"]
    p, max_norm = spec["norm_type"], spec["max_norm"]
    dtype = grads[0].dtype
    tol = _tol(dtype)

    norm = _same_on_every_rank([r["norm"] for r in res])
    assert norm.dtype == dtype
    np.testing.assert_allclose(norm, ref_norm(grads, p), rtol=tol)
    single_norm, single_grads = _single(grads, p, max_norm)
    np.testing.assert_allclose(norm, single_norm, rtol=tol)
    np.testing.assert_allclose(_same_on_every_rank([r["gtn"] for r in res]), norm, rtol=tol)
    scale = _same_on_every_rank([r["scale"] for r in res])

    n = len(spec["entries"])
    for rank, r in enumerate(res):
        assert r["grad_is_dtensor"] == ["DTensor"] * n
        for kind, placements in r["norm_types"]:  # get_total_norm's, clip_grad_norm_'s
            assert kind == "DTensor" and set(placements) == {"R"}, r["norm_types"]
        # Each rank clipped its own shard in place ...
        for before, after in zip(r["local_before"], r["local_after"], strict=True):
            want = (before.astype(np.float64) * float(scale)).astype(dtype)
            np.testing.assert_allclose(after, want, rtol=tol, atol=0, err_msg=f"rank {rank}")
        # ... and the shards make up the single-process result on every rank.
        for k, full in enumerate(r["full_after"]):
            np.testing.assert_allclose(full, single_grads[k], rtol=tol, atol=0)
        for k, g in enumerate(r["plain_after"]):
            np.testing.assert_allclose(g, single_grads[n + k], rtol=tol, atol=0)
        # get_total_norm then clip_grads_with_norm_: the same shards. Plain
        # tensors beside DTensors, or two meshes, raised (a DTensor multiply
        # of mixed operands), and foreach=False had scaled the DTensors first.
        for foreach in (None, False):
            for k, got in enumerate(r[f"two_step_{foreach}"]):
                want = r["local_after"][k] if k < n else r["plain_after"][k - n]
                np.testing.assert_allclose(got, want, rtol=tol, atol=0, err_msg=f"{foreach} {k}")


def test_dtensor_on_a_mesh_without_this_rank(ranks):
    # A pipeline stage's DTensor (mesh of ranks 0 and 1) passed on every rank:
    # ranks 2 and 3 raised IndexError in torch's DeviceMesh.get_group.
    res = _case(ranks, 4, "dtensor_elsewhere")
    want = math.sqrt(sum(k * k for k in range(6)))
    for rank, r in enumerate(res):
        if rank < 2:
            assert r["type"] == "DTensor"
            np.testing.assert_allclose(r["norm"], want, rtol=1e-6)
        else:  # nothing of it here: a plain norm of nothing
            assert r["type"] == "Tensor" and float(r["norm"]) == 0.0


@pytest.mark.parametrize("world", [2, 4])
def test_dtensor_partial_placement_raises(ranks, world):
    res = _case(ranks, world, "dtensor_partial")
    for rank, r in enumerate(res):
        assert r["clip"]["value_error"], f"rank {rank}: {r['clip']}"
        assert "Partial" in r["clip"]["message"] and "w.grad" in r["clip"]["message"]
        np.testing.assert_array_equal(r["local_after"], np.full(3, rank + 1.0, np.float32))
