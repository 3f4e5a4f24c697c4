"""The CuPy raw kernels where there is no GPU.

- The CUDA source compiles with NVRTC for sm_80 and sm_90 with no warning,
  and with CuPy's -ftz=true nothing in it flushes float32 subnormals (the
  ``cupy`` nox session installs NVRTC, and there this must run).
- The kernels, built for the CPU by ``tests/cuda_emulator``, run under the real
  launcher and fast path (``gradclip.cupy._fast`` with ``device=``) over NumPy
  leaves, and must agree with the generic path: bit for bit where the
  arithmetic is exact, else within 1e-6 (the contract). Small chunks make
  leaves span many blocks and send long leaves down the whole-block merge.

The same comparisons on a real GPU are in ``tests/test_cupy_gpu.py``.
"""

from __future__ import annotations

import math
import os
import re
import sys

import array_api_compat.numpy as xp
import numpy as np
import pytest

import cuda_emulator
from conftest import importorskip, ref_norm
from gradclip import NonFiniteError, _core
from gradclip.cupy import _fast, _launch

ml_dtypes = pytest.importorskip("ml_dtypes")

BF16 = np.dtype(ml_dtypes.bfloat16)
REAL = ("float16", "bfloat16", "float32", "float64")
DTYPES = (*REAL, "complex64", "complex128")
ORDS = (2.0, 1.0, 3.5, math.inf, -math.inf, 0.0)
# Few threads and small chunks, so that leaves span several blocks, the
# four-packs-deep loops run, and leaves of more than SMALLK chunks (700, 2500)
# are merged by the whole last block.
THREADS, CHUNK, SMALLK = 4, 256, 2
SIZES = (5, 0, 1, 96, 97, 700, 300, 2500)


def _dtype(name: str) -> np.dtype:
    return BF16 if name == "bfloat16" else np.dtype(name)


def _exact(ord: float, dtypes: tuple[str, ...]) -> bool:
    """Whether the norms must agree bit for bit: counts, and max/min of real magnitudes.

    A complex magnitude is a hypot, which libraries round differently (1 ulp).
    """
    return ord == 0 or (math.isinf(ord) and not any(d.startswith("complex") for d in dtypes))


def _required() -> bool:
    """The cupy session must run the compile check, not skip it."""
    return "cupy" in os.environ.get("GRADCLIP_TEST_BACKENDS", "").split(",")


# ------------------------------------------------------------- compile check


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvrtc_compiles_without_warnings(arch: str) -> None:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # no cupy, or no NVRTC library to load
        if _required():
            pytest.fail(f"the cupy session needs NVRTC for the compile check: {exc!r}")
        pytest.skip(f"NVRTC not available: {exc!r}")
    program = nvrtc.createProgram(_launch.source(), "_kernels.cu", [], [])
    # As cupy.RawModule compiles it: CuPy appends -ftz=true to every compile
    # (cupy/cuda/compiler.py), after the caller's options. No -Werror: NVRTC
    # 13.0 rejects every spelling of it (NVRTC_ERROR_INVALID_OPTION), and a
    # warning is in the log, which must be empty.
    options = [*_launch.OPTIONS, f"--gpu-architecture={arch}", "-ftz=true"]
    try:
        nvrtc.compileProgram(program, options)
    except nvrtc.NVRTCError:
        pytest.fail(f"_kernels.cu does not compile for {arch}:\n{nvrtc.getProgramLog(program)}")
    assert nvrtc.getProgramLog(program).strip() == ""
    cubin = nvrtc.getCUBIN(program)
    for kernel in (*_launch._NORM_KERNELS.values(), "gc_given", "gc_scale", "gc_clamp_kernel"):
        assert kernel.encode() in cubin
    ptx = nvrtc.getPTX(program).decode()
    flushing = _flushing(ptx)
    assert not flushing, f"{len(flushing)} float32 instructions flush subnormals: {flushing[:5]}"
    # No state in local memory: a running sum passed by reference to the
    # out-of-line rescale lived there, a load and a store per element.
    local = sorted(set(re.findall(r"\b(?:ld|st)\.local\S*", ptx)))
    assert not local, f"the kernels use local memory: {local}"


_HIGH_WORD = re.compile(r"mov\.b32\s+%f\d+,\s*%r\d+;")


def _flushing(ptx: str) -> list[str]:
    """The float32 instructions in ``ptx`` that flush subnormals (``.ftz``), but for CUDA's own.

    CUDA's float64 functions (exp2, pow, log) test the high word of a double
    moved into a float32 register (``abs`` and ``setp`` only), which is safe
    under -ftz, and ``rcp/rsqrt.approx.ftz.f64`` exist only in that form.
    Anything else, a multiply or a conversion, would flush a float32
    subnormal entry, norm or scale to zero (the kernels' own float32
    arithmetic goes through PTX without .ftz, or through float64).
    """
    bad = []
    written: dict[str, str] = {}  # register -> the last instruction that wrote it
    for line in ptx.splitlines():
        op, _, args = line.strip().partition(" ")
        if ".ftz" in op and ".f32" in op:
            regs = re.findall(r"%f\d+", args)
            sources = regs if op.startswith("setp.") else regs[1:]
            safe = op.startswith(("abs.", "setp.")) and all(
                _HIGH_WORD.match(written.get(r, "")) or written.get(r, "").startswith("abs.ftz.f32")
                for r in sources
            )
            if not safe:
                bad.append(line.strip())
        if dest := re.match(r"\s*(%f\d+),", args):
            written[dest.group(1)] = line.strip()
    return bad


# ------------------------------------------------------------------ emulation


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> cuda_emulator.EmuDevice:
    if not _required() and "GRADCLIP_TEST_BACKENDS" in os.environ:
        # They need no CuPy, but once per CI run is enough: the cupy session.
        pytest.skip("the emulated kernels run in the cupy session")
    problem = cuda_emulator.compiler_problem()
    if problem:
        pytest.skip(problem)
    library = cuda_emulator.build(tmp_path_factory.mktemp("emulator"), THREADS)
    return cuda_emulator.EmuDevice(library, THREADS, CHUNK, SMALLK)


def _tree(dtype: str, sizes: tuple[int, ...] = SIZES, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        x = rng.standard_normal(n) * 3
        if dtype.startswith("complex"):
            x = x + 1j * rng.standard_normal(n)
        out.append(x.astype(_dtype(dtype)))
    return out


def _names(leaves: list[np.ndarray]) -> list[str]:
    return [f"[{i}]" for i in range(len(leaves))]


def _copy(leaves: list[np.ndarray]) -> list[np.ndarray]:
    return [x.copy() for x in leaves]


def _both(
    dev: cuda_emulator.EmuDevice, fn: str, leaves: list[np.ndarray], **kwargs: object
) -> tuple[object, object]:
    """``fn`` through the emulated kernels and through the generic path, on copies.

    Non-contiguous leaves are passed as they are. NumPy's NaN warnings are
    silenced as the public functions silence them.
    """

    def copies() -> list[np.ndarray]:
        return [x.copy() if x.flags.c_contiguous else x for x in leaves]

    with np.errstate(all="ignore"):
        fast = getattr(_fast, fn)(xp, copies(), _names(leaves), device=dev, **kwargs)
        ref = getattr(_core, fn)(xp, copies(), _names(leaves), **kwargs)
    return fast, ref


def _close(a: object, b: object, exact: bool = False) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    if exact:
        np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=1e-6)


def _leaves_close(fast: list[np.ndarray], ref: list[np.ndarray], exact: bool) -> None:
    for a, b in zip(fast, ref, strict=True):
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        if exact:
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
        else:
            wide = np.complex128 if a.dtype.kind == "c" else np.float64
            # One rounding in the leaf's dtype apart when the scales differ in the last bit.
            rtol = {2: 1e-2, 4: 1e-6}.get(a.real.itemsize, 1e-12)
            a, b = a.astype(wide), b.astype(wide)
            if a.dtype.kind == "c":
                # The generic path multiplies by a complex scale, so a NaN or
                # inf in one component makes both NaN; the kernel scales the
                # components apart. The same entries are non-finite.
                np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
                a, b = np.where(np.isfinite(a), a, 0), np.where(np.isfinite(b), b, 0)
            np.testing.assert_allclose(a, b, rtol=rtol, atol=0)


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_match_generic(dev: cuda_emulator.EmuDevice, dtype: str, ord: float) -> None:
    leaves = _tree(dtype)
    exact = _exact(ord, (dtype,))
    for fn in ("global_norm", "leaf_norms"):
        fast, ref = _both(dev, fn, leaves, p=ord, nonfinite="propagate")
        _close(fast, ref, exact)
    assert float(fast_global(dev, leaves, ord)) == pytest.approx(ref_norm(leaves, ord), rel=1e-6)


@pytest.mark.parametrize("fn", ["global_norm", "clip_by_global_norm"])
def test_very_large_ord_takes_the_generic_path(dev: cuda_emulator.EmuDevice, fn: str) -> None:
    # The kernels scale by powers of two, and (1.9 * 2**e / 2**e)**2000
    # overflows float64: such ords go to the generic path, which scales by
    # each block's maximum, and launch nothing.
    leaves = _tree("float32")
    kwargs = {"p": 2000.0, "nonfinite": "propagate"}
    if fn == "clip_by_global_norm":
        kwargs.update(max_norm=0.5, eps=1e-6, norm=None, inplace=False)
    launched = len(dev.launches)
    fast, _ = _both(dev, fn, leaves, **kwargs)
    assert len(dev.launches) == launched
    norm = fast if fn == "global_norm" else fast[1].norm
    assert np.isfinite(norm)
    assert float(norm) == pytest.approx(ref_norm(leaves, 2000.0), rel=1e-6)


def fast_global(dev: cuda_emulator.EmuDevice, leaves: list[np.ndarray], ord: float) -> object:
    return _fast.global_norm(xp, leaves, _names(leaves), p=ord, nonfinite="propagate", device=dev)


@pytest.mark.parametrize("ord", ORDS)
def test_mixed_dtypes(dev: cuda_emulator.EmuDevice, ord: float) -> None:
    leaves = [_tree(d, (150,), seed=i)[0] for i, d in enumerate(DTYPES)]
    fast, ref = _both(dev, "leaf_norms", leaves, p=ord, nonfinite="propagate")
    assert np.asarray(fast).dtype == np.float64  # a float64 leaf widens the result
    _close(fast, ref, exact=_exact(ord, DTYPES))
    assert float(fast_global(dev, leaves, ord)) == pytest.approx(ref_norm(leaves, ord), rel=1e-6)


@pytest.mark.parametrize(
    ("dtype", "value"),
    [
        ("float16", 300.0),  # squares overflow float16
        ("bfloat16", 1e30),
        ("float32", 1e30),  # squares overflow float32
        ("float32", 1e-30),  # squares underflow float32
        ("float64", 1e200),  # squares overflow float64
        ("float64", 1e-200),
        ("float64", 5e-324),  # subnormal
        ("complex128", 1e200),
    ],
)
@pytest.mark.parametrize("ord", [2.0, 1.0, 3.5])
def test_norm_does_not_overflow_or_underflow(
    dev: cuda_emulator.EmuDevice, dtype: str, value: float, ord: float
) -> None:
    leaves = [np.full(n, value, _dtype(dtype)) for n in (700, 3)]
    got = float(fast_global(dev, leaves, ord))
    assert math.isfinite(got)
    assert got > 0
    assert got == pytest.approx(ref_norm(leaves, ord), rel=1e-6)


@pytest.mark.parametrize("ord", [0.01, 0.001])
def test_small_ord_does_not_overflow(dev: cuda_emulator.EmuDevice, ord: float) -> None:
    # The scaled sum of 2000 entries to the power 1/p (2000**100) overflows
    # though the norm (1e-150 * 2000**100 = 1.3e180) does not: taken in logs.
    leaves = [np.full(2000, 1e-150), np.full(3, 2e-150)]
    log_want = math.log(1e-150) + math.log(2000 + 3 * 2.0**ord) / ord
    for fn in ("global_norm", "leaf_norms"):
        fast, ref = _both(dev, fn, leaves, p=ord, nonfinite="propagate")
        _close(fast, ref)
    got = float(fast_global(dev, leaves, ord))
    if ord == 0.01:
        assert got == pytest.approx(math.exp(log_want), rel=1e-6)
    else:  # 1e-150 * 2003**1000: past float64, inf on both paths
        assert log_want > math.log(sys.float_info.max)
        assert got == math.inf


@pytest.mark.parametrize("dtype", ["float64", "complex128"])
@pytest.mark.parametrize(("big", "tiny"), [(2.0, 5e-324), (1e300, 1e-300)])
def test_small_ord_counts_entries_far_below_the_largest(
    dev: cuda_emulator.EmuDevice, dtype: str, big: float, tiny: float
) -> None:
    # Scaled by the largest entry of its thread, the tiny one came out as 0,
    # though at p = 0.01 its p-th power adds 6e-4 (or 1e-3) to the sum: the
    # norm of [2, 5e-324] was 2.0, not 2.1195.
    x = np.zeros(4 * THREADS, dtype=dtype)
    x[0], x[2 * THREADS] = big, tiny  # one thread's: it reads 16-byte packs THREADS apart
    leaves = [x]
    want = big * math.exp(math.log1p(math.exp(0.01 * (math.log(tiny) - math.log(big)))) / 0.01)
    fast, ref = _both(dev, "global_norm", leaves, p=0.01, nonfinite="propagate")
    _close(fast, ref)
    assert float(fast) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(("value", "ord"), [(5e-324, 30.0), (1e-320, 100.0), (1e-310, 500.0)])
def test_float64_subnormals_with_a_large_ord(
    dev: cuda_emulator.EmuDevice, value: float, ord: float
) -> None:
    # Scaled by at most 2**1023, subnormal entries came out below 2**-51 and
    # their 30th power was 0: the norm was 0.
    leaves = [np.full(700, value), np.ones(3), np.full(5, value)]
    fast, ref = _both(dev, "leaf_norms", leaves, p=ord, nonfinite="propagate")
    _close(fast, ref)
    assert float(fast[0]) > 0
    assert float(fast[0]) == pytest.approx(ref_norm(leaves[:1], ord), rel=1e-3)


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "complex64"])
def test_float32_subnormals(dev: cuda_emulator.EmuDevice, dtype: str, ord: float) -> None:
    # Norms, scales and clipped entries of float32 subnormals (bfloat16 shares
    # their range), bit for bit with the generic path; on a GPU the same
    # arithmetic must not flush them (test_nvrtc_compiles_without_warnings).
    leaves = [np.full(700, 3e-39).astype(_dtype(dtype)), np.full(3, 1e-40).astype(_dtype(dtype))]
    for fn in ("global_norm", "leaf_norms"):
        fast, ref = _both(dev, fn, leaves, p=ord, nonfinite="propagate")
        _close(fast, ref, exact=_exact(ord, (dtype,)))
        assert (np.asarray(fast) > 0).all()
    norm = float(fast_global(dev, leaves, ord))
    for fn in ("clip_by_global_norm", "clip_by_norm"):
        kwargs = {"max_norm": norm / 4, "p": ord, "eps": 0.0, "nonfinite": "propagate"}
        (fast, fstats), (ref, rstats) = _both(dev, fn, leaves, inplace=False, norm=None, **kwargs)
        for a, b in zip(fstats, rstats, strict=True):
            _close(a, b, exact=bool(np.all(fstats.norm == rstats.norm)))
        assert np.asarray(fstats.clipped).any()
        _leaves_close(fast, ref, exact=bool(np.all(fstats.scale == rstats.scale)))


def test_extremes_in_one_leaf(dev: cuda_emulator.EmuDevice) -> None:
    # A huge and a tiny entry in the same thread's share: rescaling keeps both.
    x = np.zeros(700)
    x[::2], x[1::2] = 1e-200, 1e150
    x[5] = 1e200
    leaves = [x, np.array([3e-300])]
    got = float(fast_global(dev, leaves, 2.0))
    assert got == pytest.approx(ref_norm(leaves, 2.0), rel=1e-12)


@pytest.mark.parametrize("ord", [2.0, 1.0, 3.0, 0.5])
def test_largest_finite_entry(dev: cuda_emulator.EmuDevice, ord: float) -> None:
    big = float(np.finfo(np.float64).max)
    assert float(fast_global(dev, [np.array([big, 0.0])], ord)) == pytest.approx(big, rel=1e-12)


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_by_global_norm_bit_for_bit(
    dev: cuda_emulator.EmuDevice, dtype: str, inplace: bool
) -> None:
    # Small integers: every sum is exact, so both paths reach the same scale
    # and every scaled entry is rounded once from the same product.
    rng = np.random.default_rng(1)
    leaves = [rng.integers(-8, 9, n).astype(_dtype(dtype)) for n in SIZES]
    kwargs = {"max_norm": 2.0, "p": 2.0, "eps": 1e-6, "nonfinite": "propagate", "norm": None}
    originals = _copy(leaves)
    (fast, fstats), (ref, rstats) = _both(
        dev, "clip_by_global_norm", leaves, inplace=inplace, **kwargs
    )
    for a, b in zip(fstats, rstats, strict=True):
        _close(a, b, exact=True)
    _leaves_close(fast, ref, exact=True)
    # The functional form wrote new arrays; the inputs (copies) are untouched either way.
    for x, y in zip(leaves, originals, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_by_global_norm(dev: cuda_emulator.EmuDevice, dtype: str, ord: float) -> None:
    leaves = _tree(dtype)
    kwargs = {"max_norm": 1.0, "p": ord, "eps": 1e-6, "nonfinite": "propagate", "norm": None}
    (fast, fstats), (ref, rstats) = _both(
        dev, "clip_by_global_norm", leaves, inplace=True, **kwargs
    )
    _close(fstats.norm, rstats.norm, exact=_exact(ord, (dtype,)))
    _close(fstats.scale, rstats.scale)
    _close(fstats.clipped, rstats.clipped, exact=True)
    _close(fstats.finite, rstats.finite, exact=True)
    _leaves_close(fast, ref, exact=bool(fstats.scale == rstats.scale))


def test_in_place_writes_the_leaves(dev: cuda_emulator.EmuDevice) -> None:
    leaves = _tree("float32")
    before = [x.__array_interface__["data"][0] for x in leaves]
    new, stats = _fast.clip_by_global_norm(
        xp, leaves, _names(leaves), max_norm=1.0, p=2.0, eps=1e-6, nonfinite="propagate",
        norm=None, inplace=True, device=dev,
    )  # fmt: skip
    assert [x.__array_interface__["data"][0] for x in new] == before
    assert float(fast_global(dev, leaves, 2.0)) == pytest.approx(1.0, rel=1e-5)
    assert bool(stats.clipped)


def test_no_clip_leaves_values(dev: cuda_emulator.EmuDevice) -> None:
    leaves = _tree("float16")
    originals = _copy(leaves)
    _, stats = _fast.clip_by_global_norm(
        xp, leaves, _names(leaves), max_norm=1e6, p=2.0, eps=1e-6, nonfinite="propagate",
        norm=None, inplace=True, device=dev,
    )  # fmt: skip
    assert float(stats.scale) == 1.0
    assert not bool(stats.clipped)
    _leaves_close(leaves, originals, exact=True)


@pytest.mark.parametrize("nonfinite", ["propagate", "zero", "skip"])
@pytest.mark.parametrize("per_leaf", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_policies(
    dev: cuda_emulator.EmuDevice, dtype: str, per_leaf: bool, nonfinite: str
) -> None:
    leaves = _tree(dtype)
    leaves[3][7] = np.nan
    leaves[5][600] = np.inf
    fn = "clip_by_norm" if per_leaf else "clip_by_global_norm"
    kwargs = {"max_norm": 1.0, "p": 2.0, "eps": 1e-6, "nonfinite": nonfinite, "norm": None}
    (fast, fstats), (ref, rstats) = _both(dev, fn, leaves, inplace=False, **kwargs)
    for a, b in zip(fstats, rstats, strict=True):
        _close(a, b)
    _leaves_close(fast, ref, exact=False)


@pytest.mark.parametrize("per_leaf", [False, True])
@pytest.mark.parametrize("dtype", REAL)
def test_skip_returns_the_leaves_bit_for_bit(
    dev: cuda_emulator.EmuDevice, dtype: str, per_leaf: bool
) -> None:
    # A functional call multiplied by the scale of 1: a half's NaN came back
    # as the canonical NaN, its payload lost (a GPU's multiply does that to
    # every dtype), where "skip" returns the leaves unchanged.
    leaves = _tree(dtype)
    bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[leaves[3].itemsize]
    payload = {2: 0x7E23, 4: 0x7FC00123, 8: 0x7FF8000000000123}[leaves[3].itemsize]
    if dtype == "bfloat16":
        payload = 0x7FC3
    leaves[3].view(bits)[7] = payload
    originals = _copy(leaves)
    fn = "clip_by_norm" if per_leaf else "clip_by_global_norm"
    kwargs = {"max_norm": 1.0, "p": 2.0, "eps": 1e-6, "nonfinite": "skip", "norm": None}
    (fast, _), (ref, _) = _both(dev, fn, leaves, inplace=False, **kwargs)
    _leaves_close(fast[3:4], originals[3:4], exact=True)
    if dtype != "bfloat16":  # (ml_dtypes' cast from float32 gives its canonical NaN)
        _leaves_close(ref[3:4], originals[3:4], exact=True)


@pytest.mark.parametrize("fn", ["global_norm", "clip_by_global_norm", "clip_by_norm"])
def test_raise_names_the_leaf_and_writes_nothing(dev: cuda_emulator.EmuDevice, fn: str) -> None:
    leaves = _tree("float32")
    leaves[5][600] = np.inf
    originals = _copy(leaves)
    kwargs: dict[str, object] = {"p": 2.0, "nonfinite": "raise"}
    if fn != "global_norm":
        kwargs |= {"max_norm": 1.0, "eps": 1e-6, "norm": None, "inplace": True}
    names = ["a", "b", "c", "d", "e", "weights['f']", "g", "h"]
    with pytest.raises(NonFiniteError, match=r"leaf weights\['f'\];"):
        getattr(_fast, fn)(xp, leaves, names, device=dev, **kwargs)
    _leaves_close(leaves, originals, exact=True)


@pytest.mark.parametrize("fn", ["global_norm", "leaf_norms", "clip_by_global_norm", "clip_by_norm"])
def test_raise_refuses_a_norm_that_overflows(dev: cuda_emulator.EmuDevice, fn: str) -> None:
    # Finite entries whose float32 norm is inf: a scale of 0 would zero them.
    leaves = _tree("float32")
    leaves[5][:] = 2e38
    originals = _copy(leaves)
    names = ["a", "b", "c", "d", "e", "weights['f']", "g", "h"]
    kwargs: dict[str, object] = {"p": 2.0, "nonfinite": "raise"}
    if fn.startswith("clip"):
        kwargs |= {"max_norm": 1.0, "eps": 1e-6, "norm": None, "inplace": True}
    per_leaf = fn in ("leaf_norms", "clip_by_norm")
    message = r"norm of leaf weights\['f'\] overflows" if per_leaf else "norm overflows"
    with pytest.raises(NonFiniteError, match=message):
        getattr(_fast, fn)(xp, leaves, names, device=dev, **kwargs)
    _leaves_close(leaves, originals, exact=True)


@pytest.mark.parametrize("inplace", [False, True])  # True: a FlatTree's copy
@pytest.mark.parametrize("nonfinite", ["propagate", "zero", "skip"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_by_block_rms(
    dev: cuda_emulator.EmuDevice, dtype: str, nonfinite: str, inplace: bool
) -> None:
    leaves = _tree(dtype)
    leaves[4][0] = np.nan
    kwargs = {"threshold": 0.5, "nonfinite": nonfinite, "inplace": inplace}
    fast, ref = _both(dev, "clip_by_block_rms", leaves, **kwargs)
    _leaves_close(fast, ref, exact=False)
    if inplace:
        functional, _ = _both(dev, "clip_by_block_rms", leaves, **{**kwargs, "inplace": False})
        _leaves_close(fast, functional, exact=True)


def test_block_rms_where_the_norm_overflows_float32(dev: cuda_emulator.EmuDevice) -> None:
    # 10**4 entries of 1e37: the norm (1e39) overflows float32, the rms
    # (1e37) does not. inf / sqrt(n) would zero the leaf.
    leaves = [np.full(10**4, 1e37, np.float32), np.full(7, 3.0, np.float32)]
    fast, ref = _both(dev, "clip_by_block_rms", leaves, threshold=1e36, nonfinite="propagate")
    _leaves_close(fast, ref, exact=True)
    np.testing.assert_allclose(np.asarray(fast[0]), 1e36, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(fast[1]), 3.0)


def test_block_rms_threshold_zero(dev: cuda_emulator.EmuDevice) -> None:
    # An all-zero leaf at threshold 0: 0 / 0 made its scale NaN.
    leaves = [np.array([1.0, 2.0], np.float32), np.zeros(5, np.float32), np.array([np.nan, 1.0])]
    fast, ref = _both(dev, "clip_by_block_rms", leaves, threshold=0.0, nonfinite="propagate")
    _leaves_close(fast, ref, exact=True)
    np.testing.assert_array_equal(np.asarray(fast[1]), 0.0)
    assert not np.isnan(np.asarray(fast[1])).any() and np.isnan(np.asarray(fast[2])).all()


@pytest.mark.parametrize("dtype", ["float64", "complex128"])
def test_block_rms_where_the_norm_overflows_float64(dev: cuda_emulator.EmuDevice, dtype) -> None:
    # 4 entries of 1e308: the norm (2e308) is past double, the rms is not. The
    # fallback took the rms from the norm in double, inf, and zeroed the leaf.
    leaves = [np.full(4, 1e308, dtype), np.full(3, 2.0, dtype)]
    fast, ref = _both(dev, "clip_by_block_rms", leaves, threshold=1.0, nonfinite="propagate")
    _leaves_close(fast, ref, exact=True)
    np.testing.assert_allclose(np.asarray(fast[0]), 1.0, rtol=1e-12)


def test_array_threshold_and_value_bounds(dev: cuda_emulator.EmuDevice) -> None:
    # A scheduled bound arrives as a 0-d device array: the rms kernel reads
    # the threshold on the device; the clamp kernel takes bounds by value, so
    # array bounds go to the generic path (no kernel launch, no sync).
    leaves = _tree("float32")
    threshold = np.asarray(0.5, np.float64)
    fast, ref = _both(dev, "clip_by_block_rms", leaves, threshold=threshold, nonfinite="skip")
    assert dev.launches[-2:] == ["gc_norm_p2", "gc_scale"]
    _leaves_close(fast, ref, exact=True)
    by_number, _ = _both(dev, "clip_by_block_rms", leaves, threshold=0.5, nonfinite="skip")
    _leaves_close(fast, by_number, exact=True)
    launched = len(dev.launches)
    kwargs = {"lo": np.asarray(-0.25, np.float32), "hi": 0.5, "nonfinite": "propagate"}
    fast, ref = _both(dev, "clip_by_value", leaves, inplace=False, **kwargs)
    assert len(dev.launches) == launched
    _leaves_close(fast, ref, exact=True)


@pytest.mark.parametrize("value", [2.0, math.nan], ids=["2", "nan"])
@pytest.mark.parametrize("per_leaf", [False, True])
def test_given_norm_and_array_bound(
    dev: cuda_emulator.EmuDevice, per_leaf: bool, value: float
) -> None:
    # A NaN array bound (unchecked: a device value) gives a NaN scale, not 1.
    leaves = _tree("float32")
    norm = np.linspace(0.5, 9.0, len(leaves)).astype(np.float32) if per_leaf else 7.5
    bound = np.asarray(value, np.float64)  # an array bound is cast to the result dtype
    fn = "clip_by_norm" if per_leaf else "clip_by_global_norm"
    kwargs = {"max_norm": bound, "p": 2.0, "eps": 1e-6, "nonfinite": "skip", "norm": norm}
    (fast, fstats), (ref, rstats) = _both(dev, fn, leaves, inplace=False, **kwargs)
    assert dev.launches[-2:] == ["gc_given", "gc_scale"]
    assert np.all(np.isnan(fstats.scale)) == math.isnan(value)
    for a, b in zip(fstats, rstats, strict=True):
        _close(a, b, exact=True)
    _leaves_close(fast, ref, exact=True)


@pytest.mark.parametrize("nonfinite", ["propagate", "zero", "skip"])
@pytest.mark.parametrize("fn", ["clip_by_global_norm", "clip_by_norm"])
@pytest.mark.parametrize("bound", [1e39, math.inf])
def test_a_bound_past_float32(
    dev: cuda_emulator.EmuDevice, bound: float, fn: str, nonfinite: str
) -> None:
    # A Python bound of 1e39 is inf in float32: an infinite float32 norm
    # under it is inf / inf, a NaN scale, as torch has it. The generic path
    # looked at the bound as given (finite) and gave 1 where the kernel gave NaN.
    leaves = [np.array([3e38, 3e38], np.float32), np.array([np.inf, 1.0], np.float32)]
    kwargs = {"max_norm": bound, "p": 2.0, "eps": 1e-6, "nonfinite": nonfinite, "norm": None}
    (fast, fstats), (ref, rstats) = _both(dev, fn, leaves, inplace=False, **kwargs)
    for a, b in zip([*fstats, *fast], [*rstats, *ref], strict=True):
        _close(a, b, exact=True)  # by value: NaNs of either sign (inf - inf, or a constant)


@pytest.mark.parametrize("per_leaf", [False, True])
def test_raise_with_a_non_finite_given_norm(dev: cuda_emulator.EmuDevice, per_leaf: bool) -> None:
    # The given norm is what "raise" checks, before any launch.
    leaves = _tree("float32")
    before = [x.copy() for x in leaves]
    norm = np.ones(len(leaves), np.float32) if per_leaf else np.float32(np.nan)
    if per_leaf:
        norm[2] = np.inf
    fn = "clip_by_norm" if per_leaf else "clip_by_global_norm"
    launched = len(dev.launches)
    message = r"leaf \[2\]" if per_leaf else "the given norm is not finite"
    with pytest.raises(NonFiniteError, match=message):
        getattr(_fast, fn)(
            xp, leaves, _names(leaves), max_norm=1.0, p=2.0, eps=1e-6, nonfinite="raise",
            norm=norm, inplace=True, device=dev,
        )  # fmt: skip
    assert len(dev.launches) == launched
    for x, y in zip(leaves, before, strict=True):
        np.testing.assert_array_equal(x, y)


def test_given_norm_shape_is_checked(dev: cuda_emulator.EmuDevice) -> None:
    leaves = _tree("float32")
    with pytest.raises(ValueError, match="one norm per leaf"):
        _fast.clip_by_norm(
            xp, leaves, _names(leaves), max_norm=1.0, p=2.0, eps=1e-6, nonfinite="propagate",
            norm=np.ones(3, np.float32), inplace=False, device=dev,
        )  # fmt: skip


@pytest.mark.parametrize("view", ["column", "reversed", "broadcast"])
def test_given_per_leaf_norms_as_a_view(dev: cuda_emulator.EmuDevice, view: str) -> None:
    # The kernels read the norms packed from the array's start: a column
    # gave leaf 1 the norm of row 0's second entry, a reversed or broadcast
    # view read past the array.
    leaves = [np.full(4, 3.0, np.float32) for _ in range(3)]
    norm = {
        "column": np.array([[10, 0], [20, 0], [0.5, 0]], np.float32)[:, 0],
        "reversed": np.array([0.5, 20, 10], np.float32)[::-1],
        "broadcast": np.broadcast_to(np.float32(20), (3,)),
    }[view]
    kwargs = {"max_norm": 1.0, "p": 2.0, "eps": 0.0, "nonfinite": "propagate", "inplace": False}
    fast, ref = _both(dev, "clip_by_norm", leaves, norm=norm, **kwargs)
    _leaves_close(fast[0], ref[0], exact=True)
    for field in ("norm", "scale"):
        _close(getattr(fast[1], field), getattr(ref[1], field), exact=True)


def test_clip_by_value_bounds_past_a_dtype_range_do_not_warn(dev: cuda_emulator.EmuDevice) -> None:
    # The bounds are rounded to every real dtype on the host; 1e5 is past
    # float16's range and 1e40 past float32's, even for leaves of neither.
    # Warnings are errors in this suite, and the call is made without the
    # errstate _both adds.
    leaves = [x.astype(np.float32) * 1e6 for x in _tree("float64")]
    fast = _fast.clip_by_value(
        xp, _copy(leaves), _names(leaves), lo=-1e40, hi=1e5, nonfinite="propagate",
        inplace=False, device=dev,
    )  # fmt: skip
    _, ref = _both(
        dev, "clip_by_value", leaves, lo=-1e40, hi=1e5, nonfinite="propagate", inplace=False
    )
    _leaves_close(fast, ref, exact=True)


@pytest.mark.parametrize("nonfinite", ["propagate", "zero", "skip"])
@pytest.mark.parametrize(("lo", "hi"), [(-0.1, 0.3), (None, 0.3), (-0.7, None)])
@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("dtype", REAL)
def test_clip_by_value_bit_for_bit(
    dev: cuda_emulator.EmuDevice,
    dtype: str,
    inplace: bool,
    lo: float | None,
    hi: float | None,
    nonfinite: str,
) -> None:
    leaves = _tree(dtype)
    leaves[3][7] = np.nan
    leaves[5][600] = -np.inf
    kwargs = {"lo": lo, "hi": hi, "nonfinite": nonfinite, "inplace": inplace}
    fast, ref = _both(dev, "clip_by_value", leaves, **kwargs)
    _leaves_close(fast, ref, exact=True)


def test_clip_by_value_raise(dev: cuda_emulator.EmuDevice) -> None:
    leaves = _tree("bfloat16")
    leaves[6][1] = np.nan
    originals = _copy(leaves)
    with pytest.raises(NonFiniteError, match=r"leaf \[6\]"):
        _fast.clip_by_value(
            xp, leaves, _names(leaves), lo=-1.0, hi=1.0, nonfinite="raise", inplace=True,
            device=dev,
        )  # fmt: skip
    _leaves_close(leaves, originals, exact=True)


def test_views_at_odd_offsets(dev: cuda_emulator.EmuDevice) -> None:
    # Leaves that share one buffer, at odd element offsets: only they are written.
    for dtype in ("float16", "bfloat16", "float64", "complex64"):
        buf = _tree(dtype, (2000,))[0]
        spans = [(3, 200), (201, 202), (203, 900), (905, 1999)]
        leaves = [buf[a:b] for a, b in spans]
        before = buf.copy()
        ref, _ = _core.clip_by_global_norm(
            xp, _copy(leaves), _names(leaves), max_norm=1.0, p=2.0, eps=1e-6,
            nonfinite="propagate", norm=None, inplace=True,
        )  # fmt: skip
        _fast.clip_by_global_norm(
            xp, leaves, _names(leaves), max_norm=1.0, p=2.0, eps=1e-6, nonfinite="propagate",
            norm=None, inplace=True, device=dev,
        )  # fmt: skip
        _leaves_close(leaves, ref, exact=False)
        for a, b in [(0, 3), (200, 201), (202, 203), (900, 905), (1999, 2000)]:
            np.testing.assert_array_equal(buf[a:b], before[a:b])


@pytest.mark.parametrize("alias", ["same", "overlapping", "disjoint"])
@pytest.mark.parametrize("per_leaf", [False, True])
def test_leaves_sharing_memory_are_scaled_one_after_the_other(
    dev: cuda_emulator.EmuDevice, alias: str, per_leaf: bool
) -> None:
    # In one launch, blocks of two leaves over the same memory would read
    # and write it at once on a GPU (the emulator runs blocks in turn):
    # some entries scaled once, others twice. Such trees are scaled leaf by
    # leaf: every shared entry twice, as torch's foreach clip does.
    buf = np.ones(3000, np.float32)
    leaves = {
        "same": [buf, buf],
        "overlapping": [buf[:2000], buf[1000:]],
        "disjoint": [buf[:1500], buf[1500:]],
    }[alias]
    fn = "clip_by_norm" if per_leaf else "clip_by_global_norm"
    dev.launches.clear()
    getattr(_fast, fn)(
        xp, leaves, _names(leaves), max_norm=1.0, p=2.0, eps=0.0, nonfinite="propagate",
        norm=np.full(2, 2.0, np.float32) if per_leaf else np.float32(2.0), inplace=True,
        device=dev,
    )  # fmt: skip
    assert ("gc_scale" in dev.launches) == (alias == "disjoint")
    twice = {"same": slice(0, 3000), "overlapping": slice(1000, 2000), "disjoint": slice(0, 0)}
    want = np.full(3000, 0.5, np.float32)
    want[twice[alias]] = 0.25
    np.testing.assert_array_equal(buf, want)


def test_non_contiguous_leaves_take_the_generic_path(dev: cuda_emulator.EmuDevice) -> None:
    leaves = [*_tree("float32"), np.ones((6, 4), np.float32).T]
    calls = len(dev.launches)
    fast, ref = _both(dev, "leaf_norms", leaves, p=2.0, nonfinite="propagate")
    assert len(dev.launches) == calls  # nothing launched
    _close(fast, ref, exact=True)


def test_only_empty_leaves(dev: cuda_emulator.EmuDevice) -> None:
    leaves = [np.zeros(0, np.float32), np.zeros((3, 0), np.float64)]
    for ord in ORDS:
        fast, ref = _both(dev, "global_norm", leaves, p=ord, nonfinite="propagate")
        _close(fast, ref, exact=True)
        assert float(fast) == 0.0


def test_deterministic_and_cached(dev: cuda_emulator.EmuDevice) -> None:
    leaves = _tree("float32", (700, 5, 1000, 33))
    first = np.asarray(_fast.leaf_norms(xp, leaves, _names(leaves), p=3.5, nonfinite="zero",
                                        device=dev)).copy()  # fmt: skip
    layouts = len(_launch._layouts)
    for _ in range(3):
        again = _fast.leaf_norms(xp, leaves, _names(leaves), p=3.5, nonfinite="zero", device=dev)
        np.testing.assert_array_equal(np.asarray(again).view(np.uint32), first.view(np.uint32))
    assert len(_launch._layouts) == layouts  # the table was built once


def test_table_layout() -> None:
    class Host:
        chunk, smallk = 4, 1

        def upload(self, host: np.ndarray) -> np.ndarray:
            return host

        def zeros(self, count: int, dtype: object) -> np.ndarray:
            return np.zeros(count, dtype)

    dtypes = [np.dtype(np.float32), np.dtype(np.complex128), np.dtype(np.float16)]
    lay = _launch.build(Host(), [100, 200, 300], [9, 0, 4], dtypes)  # type: ignore[arg-type]
    n = 3
    assert (lay.n, lay.chunks, lay.nbig, lay.total) == (3, 4, 1, 13)
    t = lay.table
    assert t[:n].tolist() == [100, 200, 300]
    assert t[n : 2 * n].tolist() == [9, 0, 4]
    assert t[2 * n : 3 * n].tolist() == [2, 5, 0]  # float32, complex128, float16
    assert t[3 * n : 4 * n + 1].tolist() == [0, 3, 3, 4]  # first chunk of each leaf
    assert t[4 * n + 1 : 4 * n + 5].tolist() == [0, 0, 0, 2]  # chunk -> leaf
    assert t[4 * n + 5 : 4 * n + 9].tolist() == [0, 4, 8, 0]  # chunk -> start
    assert t[4 * n + 9 : 4 * n + 10].tolist() == [0]  # the leaf of 3 chunks > smallk
    assert lay.out_offsets == [0, 48, 48]  # 36 bytes rounded up to 48
    assert lay.res == np.float64  # a complex128 leaf
    narrow = _launch.build(Host(), [100, 200], [9, 4], [dtypes[0], dtypes[2]])  # type: ignore[arg-type]
    assert narrow.res == np.float32


def test_contiguity_is_read_off_cupy_arrays_without_a_device() -> None:
    """CuPy's own contiguity bit, not a Flags object per leaf (views of host memory: no GPU)."""
    cp = importorskip("cupy")
    host = np.zeros(64, np.float32)
    memory = cp.cuda.UnownedMemory(host.ctypes.data, host.nbytes, host, device_id=0)
    base = cp.ndarray((8, 8), np.float32, memptr=cp.cuda.MemoryPointer(memory, 0))
    assert _launch.supported([base, base[1:], base[2]])
    for other in (base.T, base[:, ::2], base[:, 1:]):
        assert not other.flags.c_contiguous
        assert not _launch.supported([base, other])


def test_stream_key_tells_per_thread_default_streams_apart() -> None:
    """One workspace per stream; the per-thread default stream is one per thread."""
    import threading

    here = {ptr: _launch.stream_key(0, ptr) for ptr in (0, _launch.PER_THREAD_STREAM, 12345)}
    there: dict[int, object] = {}

    def other() -> None:
        there.update({ptr: _launch.stream_key(0, ptr) for ptr in here})

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert here[0] == there[0] and here[12345] == there[12345]
    assert here[_launch.PER_THREAD_STREAM] != there[_launch.PER_THREAD_STREAM]
    assert _launch.stream_key(0, 0) != _launch.stream_key(1, 0)
