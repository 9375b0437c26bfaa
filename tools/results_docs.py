"""Result tables in the docs, generated from committed results (``results/<name>.json``).

``splitmix experiment NAME --results results`` copies an experiment's ``comparison.json`` to
``results/NAME.json``. A markdown file shows it through a region

```markdown
<!-- results:NAME -->
(generated: do not edit by hand)
<!-- /results:NAME -->
```

whose body is :func:`table_markdown` of that JSON: the same headline table as the experiment's
``comparison.md``. ``python -m tools.results_docs --update docs/results.md`` rewrites every
region from ``results/``; ``--check`` (and ``tests/unit/test_results_docs.py``, over README.md
and docs/*.md) reports every region that differs from its JSON, or names a JSON that is missing.
This module reads JSON only: no torch, no plotting.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from itertools import zip_longest
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "results"
REGION = re.compile(r"<!-- results:(?P<name>[A-Za-z0-9_.\-]+) -->\n(?P<body>.*?)<!-- /results:(?P=name) -->", re.S)
OPENING = re.compile(r"<!-- results:(?P<name>[A-Za-z0-9_.\-]+) -->")
BUDGET_MARK = "†"
EDGE_MARK = "‡"


def served_widths(comparison: dict[str, Any]) -> list[str]:
    """Every width some method serves, narrowest first."""
    return sorted({w for c in comparison.values() for w in c.get("accuracy", {})}, key=float)


def breaks_budget(comparison: dict[str, Any], width: str) -> bool:
    """True when some method serving ``width`` records that not every client's budget can train it."""
    for c in comparison.values():
        respecting = c.get("budget_respecting_widths")
        if respecting is not None and width in c.get("accuracy", {}) and width not in respecting:
            return True
    return False


def _cell(stats: dict[str, Any] | None) -> str:
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}" if stats else "—"


def _lr_cell(c: dict[str, Any]) -> str:
    lr = c.get("lr")
    if lr is None:
        return "—"
    at_edge = bool(c.get("tuning", {}).get("at_edge"))
    return f"{lr:g}" + (f" {EDGE_MARK}" if at_edge else "")


def _provenance_line(comparison: dict[str, Any]) -> str | None:
    record = next((c["provenance"] for c in comparison.values() if c.get("provenance")), None)
    if record is None:
        return None
    commit = str(record.get("commit", "unknown"))
    commit = commit[:7] if commit != "unknown" else commit
    dirty = " (uncommitted changes)" if record.get("dirty") else ""
    m = record.get("machine") or {}
    hardware = f"{m.get('cpu_count')} CPUs"
    if m.get("ram_bytes"):
        hardware += f", {m['ram_bytes'] / 2**30:.0f} GiB"
    hardware += f", {m['gpu']}" if m.get("gpu") else ", no GPU"
    return f"{record.get('date', '?')} · commit `{commit}`{dirty} · {hardware} · `{record.get('command', '?')}`"


def _freeze_cell(freeze: dict[str, Any] | None) -> str:
    if not freeze:
        return "—"
    if not freeze.get("quartiles"):
        return "none froze"
    q1, median, q3 = freeze["quartiles"]
    return f"{median:g} ({q1:g}–{q3:g})"


def _table_cell(cell: Any) -> str:
    if isinstance(cell, dict) and "mean" in cell:
        return _cell(cell)
    if isinstance(cell, float):
        return f"{cell:.3f}"
    return "—" if cell is None else str(cell)


def generic_table_markdown(record: dict[str, Any]) -> str:
    """A ``{"kind": "table", "caption", "columns", "rows", "notes", "provenance"}`` record (a study
    that is not a per-width comparison): caption, table (cells: text, numbers, {mean, std}), notes."""
    head = "| " + " | ".join(record["columns"]) + " |\n|" + "---|" * len(record["columns"]) + "\n"
    body = "\n".join("| " + " | ".join(_table_cell(c) for c in row) + " |" for row in record["rows"])
    notes = list(record.get("notes", []))
    line = _provenance_line({"study": record})
    if line:
        notes.append(f"Provenance: {line}.")
    return f"{record['caption']}\n\n" + head + body + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def table_markdown(results_json: dict[str, Any], name: str) -> str:
    """The table of a results record: :func:`generic_table_markdown` for ``"kind": "table"``,
    else the headline table of an experiment's ``comparison.json``: per width and method, the mean
    client test accuracy (the paper's metric) at the round with the best validation client
    accuracy, mean ± std over seeds; then lr, communication, storage and the optional rows."""
    if results_json.get("kind") == "table":
        return generic_table_markdown(results_json)
    comparison = results_json
    methods = list(comparison)
    widths = served_widths(comparison)
    seeds = sorted({c.get("seeds") for c in comparison.values()} - {None})
    over = f"{seeds[0]} seeds" if len(seeds) == 1 else "seeds (" + ", ".join(f"{m}: {comparison[m].get('seeds')}" for m in methods) + ")"
    title = (
        f"{name}: mean client test accuracy (each client's own test split, λ = 0) at the round with the best "
        f"validation client accuracy, mean ± std over {over}\n\n"
    )
    head = "| width | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods) + "\n"
    rows = []
    missing_client = False
    for w in widths:
        cells = []
        for m in methods:
            c = comparison[m]
            if w not in c.get("accuracy", {}):
                cells.append("—")  # the method does not serve this width
            else:  # served; "n/a" when its runs recorded no per-client accuracy
                stats = c.get("client_accuracy", {}).get(w)
                cells.append(_cell(stats) if stats else "n/a")
                missing_client |= not stats
        label = f"{w} {BUDGET_MARK}" if breaks_budget(comparison, w) else w
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    rows.append("| lr | " + " | ".join(_lr_cell(comparison[m]) for m in methods) + " |")
    mb = lambda v: f"{v / 1e6:.2f}"
    rows.append("| upload MB/round | " + " | ".join(mb(comparison[m]["upload_bytes_per_round"]) for m in methods) + " |")
    rows.append("| download MB/round | " + " | ".join(mb(comparison[m]["download_bytes_per_round"]) for m in methods) + " |")
    rows.append("| storage MB | " + " | ".join(mb(comparison[m]["storage_bytes"]) for m in methods) + " |")
    top = widths[-1] if widths else None
    if top is not None and all((comparison[m].get("robust_accuracy") or {}).get(top) for m in methods):
        rows.append(f"| robust acc @{top} | " + " | ".join(f"{comparison[m]['robust_accuracy'][top]['mean']:.3f}" for m in methods) + " |")
    if any("robust_gap" in comparison[m] for m in methods):
        rows.append(
            f"| robust gap @{top} (train − test) | "
            + " | ".join(f"{comparison[m]['robust_gap']['mean']:.3f}" if "robust_gap" in comparison[m] else "—" for m in methods)
            + " |"
        )
    if any("train_flops_fraction" in comparison[m] for m in methods):
        rows.append(
            "| training FLOPs saved | "
            + " | ".join(
                f"{1 - comparison[m]['train_flops_fraction']['mean']:.0%}" if "train_flops_fraction" in comparison[m] else "0%" for m in methods
            )
            + " |"
        )
    if any("patch_similarity" in comparison[m] for m in methods):
        fmt = lambda m, i: f"{comparison[m]['patch_similarity'][i]:.3f}" if "patch_similarity" in comparison[m] else "—"
        rows.append("| patch similarity, block 1 | " + " | ".join(fmt(m, 0) for m in methods) + " |")
        rows.append("| patch similarity, last block | " + " | ".join(fmt(m, -1) for m in methods) + " |")
    if any("mask_freeze" in comparison[m] for m in methods):
        rows.append("| mask freeze round, median (IQR) | " + " | ".join(_freeze_cell(comparison[m].get("mask_freeze")) for m in methods) + " |")
        rows.append(
            "| masks frozen / still searching | "
            + " | ".join(
                f"{sum(f['frozen'])} / {sum(f['searching_last_round'])}" if (f := comparison[m].get("mask_freeze")) else "—" for m in methods
            )
            + " |"
        )
    rows.append("| wall s/run | " + " | ".join(f"{comparison[m]['wall_s']:.0f}" if comparison[m].get("wall_s") else "—" for m in methods) + " |")
    notes = ["— : the method does not serve this width."]
    if missing_client:
        notes.append("n/a : served, but the runs recorded no per-client accuracy.")
    if any(breaks_budget(comparison, w) for w in widths):
        respecting = sorted({w for c in comparison.values() for w in (c.get("budget_respecting_widths") or [])}, key=float)
        notes.append(
            f"{BUDGET_MARK} : some client's budget cannot train this width (widths every client can train: {', '.join(respecting) or 'none'})."
        )
    tuned = [m for m in methods if comparison[m].get("tuning")]
    if tuned:
        t = comparison[tuned[0]]["tuning"]
        notes.append(
            f"lr: chosen per method by validation client accuracy over the grid {t['grid']} "
            f"(tuning seed {t.get('seed')}, not a reported seed); `[method.<m>] lr-grid` may differ per method."
        )
        if any(comparison[m]["tuning"].get("at_edge") for m in tuned):
            notes.append(f"{EDGE_MARK} : the best lr sits at an edge of its grid: widen the grid.")
    line = _provenance_line(comparison)
    if line:
        notes.append(f"Provenance: {line}.")
    return title + head + "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _region(name: str, table: str) -> str:
    return f"<!-- results:{name} -->\n\n{table.rstrip()}\n\n<!-- /results:{name} -->"


def _load(results_dir: Path, name: str) -> dict[str, Any]:
    return json.loads((Path(results_dir) / f"{name}.json").read_text())


def _unclosed(text: str) -> list[str]:
    closed = {m.start() for m in REGION.finditer(text)}
    return [m.group("name") for m in OPENING.finditer(text) if m.start() not in closed]


def update_docs(doc_path: str | Path, results_dir: str | Path = RESULTS_DIR) -> list[str]:
    """Rewrite every ``results:NAME`` region of ``doc_path`` from ``results_dir/NAME.json``;
    returns the names. Raises FileNotFoundError (a missing JSON) or ValueError (an unclosed region)
    before writing anything."""
    doc_path, results_dir = Path(doc_path), Path(results_dir)
    text = doc_path.read_text()
    unclosed = _unclosed(text)
    if unclosed:
        raise ValueError(f"{doc_path}: region(s) {unclosed} have no closing <!-- /results:NAME -->")
    names = [m.group("name") for m in REGION.finditer(text)]
    missing = [n for n in names if not (results_dir / f"{n}.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{doc_path}: no results for region(s) {missing} in {results_dir}")
    new = REGION.sub(lambda m: _region(m.group("name"), table_markdown(_load(results_dir, m.group("name")), m.group("name"))), text)
    if new != text:
        doc_path.write_text(new)
    return names


def check_docs(doc_path: str | Path, results_dir: str | Path = RESULTS_DIR) -> list[str]:
    """Every way the ``results:NAME`` regions of ``doc_path`` differ from ``results_dir``: one
    line per differing table line, missing JSON or unclosed region; empty when all agree."""
    doc_path, results_dir = Path(doc_path), Path(results_dir)
    text = doc_path.read_text()
    problems = [f"{doc_path}: region results:{n} has no closing <!-- /results:{n} -->" for n in _unclosed(text)]
    for m in REGION.finditer(text):
        name = m.group("name")
        source = results_dir / f"{name}.json"
        if not source.is_file():
            problems.append(f"{doc_path}: region results:{name} names {source}, which does not exist")
            continue
        want = table_markdown(_load(results_dir, name), name).strip("\n").splitlines()
        have = m.group("body").strip("\n").splitlines()
        first_line = text.count("\n", 0, m.start("body")) + 1 + (len(m.group("body")) - len(m.group("body").lstrip("\n")))
        for i, (h, w) in enumerate(zip_longest(have, want)):
            if (h or "").rstrip() != (w or "").rstrip():
                problems.append(f"{doc_path}:{first_line + i}: results:{name}: doc has {h!r}, {source.name} gives {w!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.results_docs", description="result tables in markdown, generated from results/*.json")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--update", nargs="+", metavar="DOC", help="rewrite every <!-- results:NAME --> region of these files")
    action.add_argument("--check", nargs="+", metavar="DOC", help="report regions that differ from their JSON (exit 1)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of <name>.json files (default: the project's results/)")
    args = parser.parse_args(argv)
    if args.update:
        try:
            for doc in args.update:
                names = update_docs(doc, args.results)
                print(f"{doc}: {len(names)} region(s) updated" + (f" ({', '.join(names)})" if names else ""))
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    problems = [p for doc in args.check for p in check_docs(doc, args.results)]
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
