"""The runnable examples of the guides (their ```python blocks) run and print what they show.

The pages' ``{doctest}`` blocks run in ``nox -s docs``; these need torch,
jax or optax and run in the sessions that have them. Blocks fenced as
``{code-block} python`` need what this machine lacks (Lightning,
Accelerate, several processes) and are not run here; the distributed one of
torch.md is tested for real in test_torch_distributed.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import importorskip

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = ("torch.md", "dp.md")
BLOCKS = {
    page: re.findall(r"^```python\n(.*?)^```", (DOCS / page).read_text(), flags=re.M | re.S)
    for page in PAGES
}


@pytest.mark.parametrize("page", PAGES)
def test_the_page_has_runnable_examples(page):
    assert len(BLOCKS[page]) >= 2


@pytest.mark.parametrize(
    ("page", "index"), [(page, i) for page in PAGES for i in range(len(BLOCKS[page]))]
)
def test_example_runs(page, index, capsys):
    block = BLOCKS[page][index]
    for name in ("torch", "jax", "optax"):
        if re.search(rf"^import {name}\b", block, flags=re.M):
            importorskip(name)
    exec(compile(block, f"{page} block {index}", "exec"), {})
    assert capsys.readouterr().out  # every example prints what it shows
