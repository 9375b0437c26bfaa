"""Run a benchmark a few times and store its figures as a results record (``results/NAME.json``).

A benchmark in ``bench/`` prints its figures as ``key: number`` lines (``startup_s: 4.8``,
``mix_vs_dense_throughput: 1.02``). This runs the command ``--runs`` times, one after another,
keeps those lines from each run, and writes a ``"kind": "table"`` record (see
``tools/results_docs.py``): one row per figure, one column per run, then mean ± std, with the
load average before each run (a 2-core machine is often shared: a figure measured under load
says so) and the provenance (commit, versions, machine, date, command). A run that exits
non-zero stops the recording: nothing is written.

    python -m tools.bench_record simulation-efficiency --runs 3 \\
        --caption "…" -- python bench/simulation_efficiency.py

Docs show the record through a ``<!-- results:NAME -->`` region (``python -m tools.results_docs
--update docs/results.md``), so every benchmark number in the docs has a committed source.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tools.provenance import provenance

ROOT = Path(__file__).resolve().parents[1]
FIGURE = re.compile(r"^(?P<key>[a-z][a-z0-9_]*): (?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


def figures(output: str) -> dict[str, float]:
    """The ``key: number`` lines of a benchmark's output (the last one wins for a repeated key)."""
    found: dict[str, float] = {}
    for line in output.splitlines():
        match = FIGURE.match(line.strip())
        if match:
            found[match["key"]] = float(match["value"])
    return found


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def record(runs: list[dict[str, float]], loads: list[float | None], caption: str, notes: list[str], meta: dict[str, Any]) -> dict[str, Any]:
    """The results record of ``runs`` (each: figure → value); figures missing from a run are "—"."""
    keys = list(dict.fromkeys(k for run in runs for k in run))
    rows: list[list[Any]] = []
    for key in keys:
        values = [run.get(key) for run in runs]
        present = [v for v in values if v is not None]
        summary = {"mean": statistics.fmean(present), "std": statistics.stdev(present) if len(present) > 1 else 0.0, "n": len(present)}
        rows.append([key, *values, summary])
    rows.append(["load average (1 min) before the run", *[None if x is None else round(x, 2) for x in loads], None])
    return {
        "kind": "table",
        "caption": caption,
        "columns": ["figure", *[f"run {i + 1}" for i in range(len(runs))], "mean ± std"],
        "rows": rows,
        "notes": notes,
        "provenance": meta,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m tools.bench_record NAME [--runs N] [--caption TEXT] [--note TEXT …] -- COMMAND …", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m tools.bench_record", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="results/NAME.json")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--caption", default="")
    parser.add_argument("--note", action="append", default=[], help="a note under the table (repeatable)")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command or args.runs < 1:
        parser.error("give a command after -- and --runs ≥ 1")
    started, runs, loads = time.time(), [], []
    for i in range(args.runs):
        loads.append(load_average())
        print(f"--- run {i + 1}/{args.runs}: {shlex.join(command)} (load {loads[-1]})", flush=True)
        done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)
        sys.stdout.write(done.stdout)
        if done.returncode != 0:
            print(f"run {i + 1} exited with {done.returncode}: nothing recorded", file=sys.stderr)
            return 1
        runs.append(figures(done.stdout))
        if not runs[-1]:
            print(f"run {i + 1} printed no 'key: number' line: nothing recorded", file=sys.stderr)
            return 1
    meta = provenance(started, time.time() - started, f"python -m tools.bench_record {shlex.join(argv)}")
    out = args.results / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record(runs, loads, args.caption, args.note, meta), indent=1) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
