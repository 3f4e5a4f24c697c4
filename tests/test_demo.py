"""`python -m gradclip demo` runs on the base install and shows clipping at work."""

from __future__ import annotations

import subprocess
import sys


def _numpy_rows(out: str) -> list[list[str]]:
    """The step rows of the numpy table: step, norm, scale, clipped, finite[, note]."""
    section = out.split("backend: numpy\n", 1)[1].split("\n\n", 1)[0]
    return [line.split() for line in section.splitlines() if line.split()[0].isdigit()]


def test_demo_runs_and_clips() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gradclip", "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "backend: numpy" in out

    rows = _numpy_rows(out)
    assert len(rows) == 12
    assert [r[0] for r in rows] == [str(i) for i in range(1, 13)]
    clipped = [r for r in rows if r[3] == "yes"]
    nonfinite = [r for r in rows if r[4] == "no"]
    assert clipped, "no step was clipped"
    assert all(float(r[2]) < 1 for r in clipped)
    # exactly one NaN step: reported as non-finite, skipped (scale 1, not clipped)
    assert len(nonfinite) == 1
    assert nonfinite[0][1] == "nan"
    assert float(nonfinite[0][2]) == 1.0
    assert nonfinite[0][3] == "no"
    assert "non-finite" in out
