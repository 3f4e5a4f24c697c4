"""Developer sessions for gradclip.

Plain ``nox`` runs ``lint``, one ``tests`` session per backend (CPU only) and
``jax_sharded`` (sharded JAX arrays on 8 CPU host devices).
``nox -s bench`` (never run by plain ``nox``) times gradclip against its
anchors and records ``benchmarks/results/bench-{numpy,jax}-cpu.json``;
arguments after ``--`` replace that default, e.g. ``nox -s bench -- --tree small``.
``nox -l`` lists them; ``nox -s "tests(jax)"`` runs one; arguments after ``--``
go to pytest, e.g. ``nox -s "tests(numpy)" -- -x -k global_norm``.
"""

from __future__ import annotations

import os

import nox

nox.needs_version = ">=2025.2.9"  # nox.project.dependency_groups
# "tests" runs every backend parametrisation; jax_sharded needs a process of
# its own, since XLA's device count is fixed when JAX starts.
nox.options.sessions = ["lint", "tests", "jax_sharded"]
# Reuse venvs between runs; every run still pip-installs, so a changed
# pyproject.toml or pin is picked up (a fresh clone simply builds them).
nox.options.reuse_venv = "yes"

PYPROJECT = nox.project.load_toml("pyproject.toml")

# Never let pip choose torch on its own: an unpinned torch resolves to the CUDA
# build and downloads gigabytes of nvidia-* wheels. The pin matches the CPU
# wheel the machines carry (pip prefers 2.13.0+cpu over 2.13.0 for ==2.13.0).
# For the same reason the package's [torch] extra is never installed here.
TORCH_VERSION = os.environ.get("GRADCLIP_TORCH_VERSION", "2.13.0")

# session id -> (packages to install, value of GRADCLIP_TEST_BACKENDS that
# tests/conftest.py reads to choose which backends its ``xp`` fixture covers).
BACKENDS: dict[str, tuple[tuple[str, ...], str]] = {
    "numpy": ((), "numpy"),
    "array-api-strict": (("array-api-strict>=2.2",), "array_api_strict"),
    "torch": ((f"torch=={TORCH_VERSION}",), "torch"),
    "jax": (("jax>=0.7", "optax>=0.2.4"), "jax,jax64"),
    "dask": (("dask[array]>=2024.8",), "dask"),
    # CuPy imports without a GPU; tests that need a device skip with a reason.
    "cupy": (("cupy-cuda13x>=14.0", "nvidia-cuda-nvrtc>=13,<14"), "cupy"),
}


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
    session.run("pytest", *session.posargs, env={"GRADCLIP_TEST_BACKENDS": selector})


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
def bench(session: nox.Session) -> None:
    """``python -m gradclip bench`` with torch, jax and optax as anchors (not in plain nox)."""
    session.install(
        *nox.project.dependency_groups(PYPROJECT, "bench"),
        f"torch=={TORCH_VERSION}",
        "jax>=0.7",
        "optax>=0.2.4",
        "-e",
        ".",
    )
    if session.posargs:
        session.run("python", "-m", "gradclip", "bench", *session.posargs)
        return
    for backend in ("numpy", "jax"):
        json_path = f"benchmarks/results/bench-{backend}-cpu.json"
        session.run(
            "python", "-m", "gradclip", "bench", "--backend", backend, "--tree", "all",
            "--json", json_path,
        )  # fmt: skip
