"""Developer sessions for gradclip.

Plain ``nox`` runs ``lint``, ``docs`` (the Sphinx site under -W, then the
doctests of its pages), one ``tests`` session per backend (CPU only),
``jax_sharded`` (sharded JAX arrays on 8 CPU host devices) and ``gpu`` (the
CuPy kernels on a CUDA device, in the Python that already has CuPy; it skips,
saying why, where there is no device).
``nox -s bench`` (never run by plain ``nox``) times gradclip against its
anchors and records ``benchmarks/results/bench-{numpy,jax,torch}-cpu.json``;
arguments after ``--`` replace that default, e.g. ``nox -s bench -- --tree small``.
``nox -l`` lists them; ``nox -s "tests(jax)"`` runs one; arguments after ``--``
go to pytest, e.g. ``nox -s "tests(numpy)" -- -x -k global_norm``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import nox

nox.needs_version = ">=2025.2.9"  # nox.project.dependency_groups
# "tests" runs every backend parametrisation; jax_sharded needs a process of
# its own, since XLA's device count is fixed when JAX starts.
# "docs" builds the site and runs its doctests: about 1.5 minutes in a fresh
# venv on a 2-core machine (35 s reused), so a broken docs build fails CI.
nox.options.sessions = ["lint", "docs", "tests", "jax_sharded", "gpu"]
# Reuse venvs between runs; every run still pip-installs, so a changed
# pyproject.toml or pin is picked up (a fresh clone simply builds them).
nox.options.reuse_venv = "yes"

PYPROJECT = nox.project.load_toml("pyproject.toml")

# Never let pip choose torch on its own: an unpinned torch resolves to the CUDA
# build and downloads gigabytes of nvidia-* wheels. The pin matches the CPU
# wheel the machines carry (pip prefers 2.13.0+cpu over 2.13.0 for ==2.13.0).
TORCH_VERSION = os.environ.get("GRADCLIP_TORCH_VERSION", "2.13.0")

# session id -> (packages to install, value of GRADCLIP_TEST_BACKENDS that
# tests/conftest.py reads to choose which backends its ``xp`` fixture covers).
BACKENDS: dict[str, tuple[tuple[str, ...], str]] = {
    # matplotlib: GradMonitor.plot and the demo's labelled curves (the plot extra).
    "numpy": (("matplotlib>=3.8",), "numpy"),
    "array-api-strict": (("array-api-strict>=2.2",), "array_api_strict"),
    # zclip: the reference gradclip.adaptive.ZClip is tested against (it
    # requires torch>=2.0, which the pin in the same install satisfies).
    "torch": ((f"torch=={TORCH_VERSION}", "zclip==1.0.0"), "torch"),
    "jax": (("jax>=0.7", "optax>=0.2.4"), "jax,jax64"),
    "dask": (("dask[array]>=2024.8",), "dask"),
    # CuPy imports without a GPU; tests that need a device skip with a reason.
    "cupy": (("cupy-cuda13x>=14.0", "nvidia-cuda-nvrtc>=13,<14"), "cupy"),
}


# torch (pinned), jax and optax: what the docs and bench sessions import.
ALL_LIBRARIES = (f"torch=={TORCH_VERSION}", "jax>=0.7", "optax>=0.2.4")


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff (lint + format check) and mypy --strict over src/."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"), "-e", ".")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")  # files = ["src"] in pyproject.toml


@nox.session
@nox.parametrize("backend", list(BACKENDS), ids=list(BACKENDS))
def tests(session: nox.Session, backend: str) -> None:
    """The test suite on one array backend (CPU)."""
    packages, selector = BACKENDS[backend]
    session.install(*nox.project.dependency_groups(PYPROJECT, "test"), *packages, "-e", ".")
    env = {"GRADCLIP_TEST_BACKENDS": selector}
    session.run("pytest", *session.posargs, env=env)
    if backend == "array-api-strict":
        # Again under the 2023.12 standard, which has no count_nonzero and
        # takes no Python scalars in elementwise functions.
        session.run(
            "pytest", *session.posargs, env={**env, "ARRAY_API_STRICT_API_VERSION": "2023.12"}
        )


@nox.session
def jax_sharded(session: nox.Session) -> None:
    """Sharded JAX gradients on 8 CPU host devices: tests/test_jax_sharding.py."""
    packages, _ = BACKENDS["jax"]
    session.install(*nox.project.dependency_groups(PYPROJECT, "test"), *packages, "-e", ".")
    env = {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        # Fewer devices than that is a failure here, not a skip.
        "GRADCLIP_REQUIRE_DEVICES": "8",
    }
    session.run("pytest", "tests/test_jax_sharding.py", *session.posargs, env=env)


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation (docs/): sphinx-build -W to docs/_build/html, then its doctests.

    torch, jax and optax are installed so that the API pages of gradclip.torch,
    gradclip.jax and gradclip.optax import, and the pages' ``{doctest}``
    blocks run on them. The doctests are Sphinx's doctest builder over the
    pages; the docstrings' own examples run in the tests sessions
    (``--doctest-modules``). Arguments after ``--`` go to the HTML build.
    """
    session.install(*nox.project.dependency_groups(PYPROJECT, "docs"), *ALL_LIBRARIES, "-e", ".")
    env = {"JAX_PLATFORMS": "cpu"}
    doctrees = "docs/_build/doctrees"
    # -E: autodoc pages depend on src/, which Sphinx does not track; read afresh.
    session.run(
        "sphinx-build", "-W", "--keep-going", "-E", "-b", "html", "-d", doctrees,
        "docs", "docs/_build/html", *session.posargs, env=env,
    )  # fmt: skip
    session.run(
        "sphinx-build", "-W", "--keep-going", "-b", "doctest", "-d", doctrees,
        "docs", "docs/_build/doctest", env=env,
    )  # fmt: skip


# What the gpu session needs from the interpreter it runs in (it installs
# nothing), checked in a subprocess: the modules, then a CUDA device.
GPU_MODULES = ("numpy", "array_api_compat", "optree", "ml_dtypes", "pytest", "hypothesis", "cupy")
GPU_PROBE = """
import importlib.util, sys
missing = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]
if missing:
    sys.exit("it lacks " + ", ".join(missing))
import cupy
try:
    count = cupy.cuda.runtime.getDeviceCount()
except Exception as exc:  # no driver: CuPy raises its own errors
    sys.exit(f"CuPy sees no CUDA device ({type(exc).__name__}: {exc})")
if count < 1:
    sys.exit("CuPy sees no CUDA device")
"""


def _gpu_python() -> tuple[str | None, list[str]]:
    """The first interpreter with CuPy, pytest and a CUDA device, and why the others were not."""
    chosen = os.environ.get("GRADCLIP_GPU_PYTHON")
    found = (
        [chosen] if chosen else [sys.executable, shutil.which("python3"), shutil.which("python")]
    )
    reasons = []
    for python in dict.fromkeys(p for p in found if p):
        try:
            probe = subprocess.run(
                [python, "-c", GPU_PROBE, *GPU_MODULES], capture_output=True, text=True, timeout=300
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            reasons.append(f"{python}: {exc}")
            continue
        if probe.returncode == 0:
            return python, reasons
        lines = (probe.stderr or probe.stdout).strip().splitlines()
        reasons.append(f"{python}: {lines[-1] if lines else f'exit status {probe.returncode}'}")
    return None, reasons


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """The CuPy kernels on a CUDA device: tests/test_cupy_gpu.py, then the suite on GPU arrays.

    The second run is the whole suite on CuPy arrays and, where that Python
    also has a CUDA torch, on CUDA tensors (the ``torch_cuda`` backend), plus
    tests/test_torch_gpu.py (gradclip.torch on CUDA tensors through the kernels).

    GPU machines may have no network, so this makes no virtualenv and installs
    nothing: it runs pytest in the first Python that has CuPy, pytest,
    ml_dtypes and gradclip's dependencies and sees a CUDA device
    (``GRADCLIP_GPU_PYTHON`` if set, else nox's own Python, ``python3``,
    ``python``), importing gradclip from ``src/``. Where there is none it skips
    with the reasons, so plain ``nox`` stays green on CPU machines. JAX is kept
    on the CPU (as in the CPU sessions) and off the GPU's memory. Arguments
    after ``--`` go to both pytest runs (exit status 5, nothing collected,
fails as everywhere). Without nox, the same runs are::

        PYTHONPATH=src python -m pytest tests/test_cupy_gpu.py
        PYTHONPATH=src GRADCLIP_TEST_BACKENDS=cupy,torch_cuda JAX_PLATFORMS=cpu \\
            python -m pytest tests src -q --ignore=tests/test_cupy_gpu.py
    """
    python, reasons = _gpu_python()
    if python is None:
        session.skip("no Python here runs CuPy on a CUDA device; " + "; ".join(reasons))
    env = {
        "PYTHONPATH": os.pathsep.join(
            filter(None, [os.path.abspath("src"), os.environ.get("PYTHONPATH")])
        ),
        "GRADCLIP_TEST_BACKENDS": "cupy,torch_cuda",
        "JAX_PLATFORMS": "cpu",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    }
    session.log(f"using {python}")
    session.run(python, "-m", "pytest", "tests/test_cupy_gpu.py", *session.posargs, env=env)
    session.run(
        python, "-m", "pytest", "tests", "src", "-q", "--ignore=tests/test_cupy_gpu.py",
        *session.posargs, env=env,
    )  # fmt: skip


@nox.session
def bench(session: nox.Session) -> None:
    """``python -m gradclip bench`` with torch, jax and optax as anchors (not in plain nox)."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "bench"), *ALL_LIBRARIES, "-e", ".")
    if session.posargs:
        session.run("python", "-m", "gradclip", "bench", *session.posargs)
        return
    for backend in ("numpy", "jax", "torch"):
        json_path = f"benchmarks/results/bench-{backend}-cpu.json"
        # --device cpu: torch and jax would take a GPU where they see one,
        # and put its timings in a file named for the CPU.
        session.run(
            "python", "-m", "gradclip", "bench", "--backend", backend, "--device", "cpu",
            "--tree", "all", "--json", json_path,
        )  # fmt: skip
