"""Sphinx helpers for the gradclip docs: benchmark tables read from JSON, optional figures.

The tables come straight from the files ``python -m gradclip bench --json``
writes (``benchmarks/results/*.json``), at build time, so the benchmarks page
cannot drift from the recorded results. The table-making half needs no
Sphinx; run it to see the same tables as Markdown::

    python docs/_ext/gradclip_docs.py benchmarks/results/bench-numpy-cpu.json

Directives (MyST syntax)::

    ```{bench-results} benchmarks/results/bench-numpy-cpu.json
    ```

    ```{figure-if-exists} _static/demo.png
    :alt: ...

    Shown instead when the file is missing (Markdown).
    ```
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

REPO = Path(__file__).resolve().parents[2]

# Row keys written by gradclip._bench, in display order. "floor" (clip case)
# and "read" (no-clip case) are the same memory-bound anchor line.
ROW_ORDER = ("gradclip", "dropin", "flattree", "torch", "optax", "naive", "einsum", "floor")
CASES = (("clip", "clip"), ("noclip", "no clip"))


@dataclass
class Table:
    """A titled table of strings; ``header`` and every row have the same length."""

    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)


@dataclass
class Result:
    """One results file: where and how it was recorded, and its tables."""

    name: str
    provenance: list[tuple[str, str]]
    notes: list[str]
    tables: list[Table]


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 1 else f"{value:.1f}"


def _machine(m: dict[str, Any]) -> str:
    cpus = m.get("cpu_count", m.get("cpus"))
    parts = [m.get("cpu") or m.get("processor") or "?"]
    if cpus:
        parts.append(f"{cpus} cores")
    parts.append(f"GPU: {m['gpu']}" if m.get("gpu") else "no GPU")
    if m.get("platform"):
        parts.append(m["platform"])
    if m.get("python"):
        parts.append(f"Python {m['python']}")
    return ", ".join(parts)


def _versions(m: dict[str, Any]) -> str:
    versions = m.get("versions") or {k: m[k] for k in ("numpy",) if k in m}
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def _bench_tables(data: dict[str, Any]) -> list[Table]:
    trees = data["settings"]["trees"]
    rows = data["rows"]
    by_key: dict[tuple[str, str, str], dict[str, Any]] = {}
    labels: dict[str, list[str]] = {}
    for r in rows:
        key = "floor" if r["key"] == "read" else r["key"]
        by_key[(key, r["tree"], r["case"])] = r
        names = labels.setdefault(key, [])
        if r["row"] not in names:
            names.append(r["row"])
    keys = [k for k in ROW_ORDER if k in labels] + [k for k in labels if k not in ROW_ORDER]

    # A column per tree and case that has rows: the per-example tree (dp)
    # has its clip case only.
    columns = [
        (tree, case, name)
        for tree in trees
        for case, name in CASES
        if any(r["tree"] == tree and r["case"] == case for r in rows)
    ]
    header = ["row"] + [f"{tree}, {name}" for tree, _, name in columns]
    timing = Table("Median milliseconds per call (lower is better)", header)
    for key in keys:
        line = [" / ".join(labels[key])]
        for tree, case, _ in columns:
            r = by_key.get((key, tree, case))
            cell = _ms(r["median_ms"]) if r else "-"
            if r and not r.get("check_ok", True):
                cell += " (result check failed)"
            line.append(cell)
        timing.rows.append(line)
    tables = [timing]

    compiled = [r for r in rows if r.get("compile_s") is not None]
    if compiled:
        t = Table("First call: trace and compile seconds", ["row", "tree", "compile s"])
        for r in compiled:
            t.rows.append([r["row"], r["tree"], f"{r['compile_s']:.2f}"])
        tables.append(t)

    targets = [t for t in data.get("targets", []) if t.get("value") is not None]
    if targets:
        t = Table("Targets", ["target", "measured", "met"])
        for tg in targets:
            unit = "x" if tg["unit"] == "ratio" else f" {tg['unit']}"
            t.rows.append([tg["target"], f"{tg['value']:.3g}{unit}", "yes" if tg["met"] else "no"])
        tables.append(t)
    return tables


def _plain_tables(data: dict[str, Any]) -> list[Table]:
    """Files of named measurements (the foundation accuracy/memory run)."""
    tables = []
    for name, values in data.items():
        if name == "machine" or not isinstance(values, dict):
            continue
        t = Table(name.replace("_", " "), ["measurement", "value"])
        for k, v in values.items():
            t.rows.append([k, f"{v:.3g}" if isinstance(v, float) else str(v)])
        tables.append(t)
    return tables


def load(path: str | Path, command: str | None = None) -> Result:
    """Read one results file into tables; ``path`` is absolute or relative to the repo.

    ``command``: how the file was made, for files that do not record it.
    """
    p = Path(path)
    if not p.is_absolute():
        p = REPO / p
    data = json.loads(p.read_text())
    machine = data.get("machine") or {}
    provenance = [("file", str(p.relative_to(REPO)))]
    if data.get("command") or command:
        provenance.append(("command", data.get("command") or command))
    if data.get("date"):
        provenance.append(("recorded", data["date"]))
    provenance.append(("machine", _machine(machine)))
    if _versions(machine):
        provenance.append(("versions", _versions(machine)))
    if "settings" in data:
        s = data["settings"]
        provenance.append(
            (
                "settings",
                f"{s['dtype']} gradients, max_norm {s['max_norm']:g} "
                f"(no clip: {s['no_clip_max_norm']:g}), at least {s['reps']} timed "
                f"calls or {s['budget_s']:g} s per row, seed {s['seed']}",
            )
        )
    if "trees" in data:
        sizes = []
        for tree, info in data["trees"].items():
            n = info["leaves"]
            size = f"{tree}: {n} {'leaf' if n == 1 else 'leaves'}, {info['elements']:,} elements"
            if info.get("batch"):  # per-example clipping (the dp tree)
                size += (
                    f" ({info['batch']} examples of {info['example_elements']:,}; "
                    f"max_norm {info['max_norm']:g} clips {info['num_clipped']})"
                )
            sizes.append(size)
        provenance.append(("trees", "; ".join(sizes)))
    tables = _bench_tables(data) if "rows" in data else _plain_tables(data)
    return Result(p.name, provenance, list(data.get("notes") or []), tables)


def to_markdown(result: Result) -> str:
    """The tables as Markdown (what the directive renders, for a terminal)."""
    out = [f"## {result.name}", ""]
    out += [f"- {k}: {v}" for k, v in result.provenance]
    out += [f"- note: {n}" for n in result.notes]
    for t in result.tables:
        out += ["", f"**{t.title}**", "", "| " + " | ".join(t.header) + " |"]
        out.append("|" + " --- |" * len(t.header))
        out += ["| " + " | ".join(r) + " |" for r in t.rows]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------ Sphinx


def setup(app: Any) -> dict[str, Any]:
    """Register the directives."""
    from docutils import nodes
    from docutils.parsers.rst import directives
    from sphinx.util.docutils import SphinxDirective

    def table_node(t: Table) -> Any:
        table = nodes.table(classes=["gradclip-bench"])
        table += nodes.title(text=t.title)
        group = nodes.tgroup(cols=len(t.header))
        table += group
        for _ in t.header:
            group += nodes.colspec(colwidth=1)

        def row(cells: list[str]) -> Any:
            r = nodes.row()
            for c in cells:
                r += nodes.entry("", nodes.paragraph(text=c))
            return r

        head = nodes.thead()
        head += row(t.header)
        body = nodes.tbody()
        for cells in t.rows:
            body += row(cells)
        group += head
        group += body
        return table

    class BenchResults(SphinxDirective):
        """Render one ``benchmarks/results/*.json`` file: provenance, then its tables."""

        required_arguments = 1
        has_content = False
        # for files that do not record the command that made them
        option_spec: ClassVar[dict[str, Any]] = {"command": directives.unchanged}

        def run(self) -> list[Any]:
            path = REPO / self.arguments[0]
            self.env.note_dependency(str(path))
            result = load(path, self.options.get("command"))
            items = nodes.bullet_list()
            for key, value in result.provenance + [("note", n) for n in result.notes]:
                para = nodes.paragraph()
                para += nodes.strong(text=f"{key}: ")
                para += (
                    nodes.literal(text=value) if key in ("file", "command") else nodes.Text(value)
                )
                items += nodes.list_item("", para)
            return [items, *(table_node(t) for t in result.tables)]

    class FigureIfExists(SphinxDirective):
        """An image when the file exists; otherwise the directive's content."""

        required_arguments = 1
        has_content = True
        option_spec: ClassVar[dict[str, Any]] = {
            "alt": directives.unchanged,
            "width": directives.unchanged,
        }

        def run(self) -> list[Any]:
            rel = self.arguments[0]
            source_dir = Path(self.env.doc2path(self.env.docname)).parent
            # Noted even when missing, so the page is rebuilt once the file appears.
            self.env.note_dependency(str(source_dir / rel))
            if (source_dir / rel).is_file():
                return [
                    nodes.image(
                        uri=rel,
                        alt=self.options.get("alt", ""),
                        **({"width": self.options["width"]} if "width" in self.options else {}),
                    )
                ]
            container = nodes.container(classes=["gradclip-placeholder"])
            self.state.nested_parse(self.content, self.content_offset, container)
            return [container]

    app.add_directive("bench-results", BenchResults)
    app.add_directive("figure-if-exists", FigureIfExists)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}


if __name__ == "__main__":
    for arg in sys.argv[1:] or sorted(str(p) for p in (REPO / "benchmarks/results").glob("*.json")):
        print(to_markdown(load(arg)))
