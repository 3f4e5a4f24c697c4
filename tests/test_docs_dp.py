"""The runnable examples of docs/dp.md (its ```python blocks) run and print what they show.

Its ``{doctest}`` blocks run in ``nox -s docs``; these need torch, jax or
optax and run in the sessions that have them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import importorskip

DOC = Path(__file__).resolve().parents[1] / "docs" / "dp.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.M | re.S)


def test_the_page_has_runnable_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index, capsys):
    block = BLOCKS[index]
    for name in ("torch", "jax", "optax"):
        if re.search(rf"^import {name}\b", block, flags=re.M):
            importorskip(name)
    exec(compile(block, f"{DOC.name} block {index}", "exec"), {})
    assert capsys.readouterr().out  # every example prints what it shows
