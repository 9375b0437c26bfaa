"""``splitmix`` command line: simulate, experiment, models, query, serve, deploy, supernode."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from deploy import cli as deploy_cli
from splitmix.config import ConfigError, load_config
from tools import compress, ntk_study, prune, topology_search
from tools import l2o as l2o_cli


def _fail(message: str) -> None:
    """Errors go to stderr unwrapped (rich would fold long lines at the terminal width)."""
    print(f"error: {message}" if not message.startswith("config error") else message, file=sys.stderr, flush=True)


def _summary_table(summary: dict) -> Table:
    lam = summary["robust_lambda"]
    table = Table(title=f"{summary['method']} per width ({summary['dataset']}, {summary['model']}, {summary['rounds']} rounds)")
    for column in ("width", "bases", "params", "MACs", "client acc (λ=0)", "pooled acc", f"robust acc (λ={lam:g})"):
        table.add_column(column, justify="right")
    for width, row in summary["widths"].items():
        robust, client = row["robust_accuracy"], row.get("client_accuracy")
        table.add_row(
            width,
            str(row["bases"]),
            f"{row['params']:,}",
            f"{row['macs']:,}",
            "-" if client is None else f"{client['mean']:.4f} ± {client['std']:.4f}",
            f"{row['accuracy']:.4f}",
            "-" if robust is None else f"{robust:.4f}",
        )
    return table


def _overrides(args: argparse.Namespace) -> str:
    """Every ``--run-config`` option as one override string: a key repeated within one option
    or across several is then one error (``parse_overrides``), never a silent last-one-wins."""
    return " ".join(args.run_config)


def cmd_simulate(args: argparse.Namespace) -> int:
    from server import simulation

    err = Console(stderr=True)
    try:
        if args.resume is not None:
            if args.config is not None or args.run_config:
                raise ConfigError("--resume takes the run's own config.json; --config/--run-config cannot change it")
            cfg = simulation.resume_config(args.resume)
        else:
            cfg = load_config(args.config, _overrides(args))
    except ConfigError as exc:
        _fail(f"config error: {exc}")
        return 2
    if args.resume is not None:
        from server.federation import resume_blocker

        if not (Path(args.resume) / "checkpoint.safetensors").is_file():
            _fail(f"run '{args.resume}' has no checkpoint.safetensors (no round completed?); nothing to resume")
            return 2
        reason = resume_blocker(cfg, args.resume)
        if reason is not None:
            _fail(f"cannot resume run '{args.resume}' exactly: {reason}, which the server does not checkpoint")
            return 2
    from splitmix.data import DataError

    try:
        run_dir = simulation.simulate(cfg, report=lambda text: err.print(text, highlight=False), quiet_flower=not args.verbose, resume=args.resume)
    except (DataError, FileNotFoundError) as exc:  # missing dataset or learned-optimizer artifact: one line, before Ray starts
        _fail(str(exc))
        return 2
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    Console(width=120).print(_summary_table(summary))
    print(run_dir, flush=True)  # the last line of stdout: the run folder
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from splitmix.config import parse_overrides
    from tools.experiment import in_process_runner, load_experiment, run_experiment

    err = Console(stderr=True)
    try:
        experiment = load_experiment(args.experiment)
        extra = parse_overrides(_overrides(args)) if args.run_config else None
        if extra:
            experiment.check_extra(extra, Path(args.out_dir))
    except ConfigError as exc:
        _fail(f"config error: {exc}")
        return 2
    command = ["splitmix", "experiment", args.experiment, "--out-dir", str(args.out_dir)]
    command += ["--run-config", _overrides(args)] if args.run_config else []
    command += ["--results", str(args.results)] if args.results else []
    command += ["--in-process"] if args.in_process else []
    report = lambda text: err.print(text, highlight=False)  # noqa: E731
    root = run_experiment(
        experiment,
        args.out_dir,
        extra,
        runner=in_process_runner(report) if args.in_process else None,
        report=report,
        results_dir=args.results,
        command=shlex.join(command),
    )
    print((root / "comparison.md").read_text())
    print(root, flush=True)  # the last line of stdout: the experiment folder
    return 0


def _open_run(folder: str, err: Console, compile: bool = False):
    from server.query import QueryError, load_run

    try:
        return load_run(folder, compile=compile)
    except (QueryError, ValueError, FileNotFoundError) as exc:  # unknown folder, damaged checkpoint
        _fail(str(exc))
        return None


def cmd_models(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    run = _open_run(args.run, err)
    if run is None:
        return 2
    lo, hi = run.robustness_range()
    table = Table(title=f"{run.method_name} run {run.folder.name}: servable models (robustness λ in [{lo:g}, {hi:g}])")
    for column in ("width", "bases", "params", "MACs", "accuracy (λ=0)", f"robust acc (λ={run.summary['robust_lambda']:g})"):
        table.add_column(column, justify="right")
    for row in run.table():
        robust = row["robust_accuracy"]
        table.add_row(
            f"{row['width']:g}",
            str(row["bases"]),
            f"{row['params']:,}",
            f"{row['macs']:,}",
            f"{row['accuracy']:.4f}",
            "-" if robust is None else f"{robust:.4f}",
        )
    Console(width=120).print(table)
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from server.query import QueryError

    err = Console(stderr=True)
    run = _open_run(args.run, err)
    if run is None:
        return 2
    try:
        card = run.export(args.width, args.robustness, args.out, select=args.select)
    except QueryError as exc:
        _fail(str(exc))
        return 2
    print(json.dumps(card, indent=2))
    print(Path(args.out).resolve(), flush=True)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from server.service import serve

    err = Console(stderr=True)
    run = _open_run(args.run, err, compile=args.compile)
    if run is None:
        return 2
    serve(run, args.host, args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitmix", description="Split-Mix federated learning on Flower.")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a Split-Mix simulation on Flower's simulation engine")
    sim.add_argument("--config", type=Path, help="TOML file with run-config keys (flat, or a pyproject)")
    sim.add_argument(
        "--run-config", action="append", type=str, default=[], help='overrides, e.g. "num-rounds=5 dataset=digits" (may be repeated; a key only once)'
    )
    sim.add_argument("--verbose", action="store_true", help="show Flower's INFO logs")
    sim.add_argument("--resume", metavar="RUN", help="continue an interrupted run folder after its last checkpoint")
    sim.set_defaults(func=cmd_simulate)
    exp = sub.add_parser("experiment", help="run every method × seed of an experiment and compare them")
    exp.add_argument("experiment", help="experiment name (configs/<name>.toml) or path to its TOML file")
    exp.add_argument("--out-dir", default="experiments", help="where experiment folders go")
    exp.add_argument("--run-config", action="append", type=str, default=[], help="overrides applied to every run (may be repeated; a key only once)")
    exp.add_argument("--results", type=Path, default=None, metavar="DIR", help="also copy comparison.json to DIR/<name>.json (e.g. results/)")
    exp.add_argument(
        "--in-process",
        action="store_true",
        help="clients one after another in this process (no Ray; for small runs, where Ray's start-up dominates)",
    )
    exp.set_defaults(func=cmd_experiment)
    models = sub.add_parser("models", help="list the models a finished run can serve")
    models.add_argument("run", help="a run folder written by `splitmix simulate`")
    models.set_defaults(func=cmd_models)
    query = sub.add_parser("query", help="build and export the model of a given width and robustness")
    query.add_argument("run", help="a run folder written by `splitmix simulate`")
    query.add_argument("--width", type=float, required=True, help="a width the run serves (see `splitmix models`)")
    query.add_argument("--robustness", type=float, default=0.0, help="λ in [0, 1] (default 0)")
    query.add_argument("--select", choices=("first", "best"), default="first", help="the first k bases, or the best k by accuracy")
    query.add_argument("--out", required=True, help="output folder (safetensors, model card, .pt2)")
    query.set_defaults(func=cmd_query)
    srv = sub.add_parser("serve", help="serve predictions of a finished run over HTTP")
    srv.add_argument("run", help="a run folder written by `splitmix simulate`")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8080)
    srv.add_argument("--compile", action="store_true", help="torch.compile each served model (faster; its first request takes seconds)")
    srv.set_defaults(func=cmd_serve)
    deploy_cli.register(sub)
    ntk_study.register(sub)
    prune.register(sub)
    topology_search.register(sub)
    compress.add_compress_parser(sub)
    l2o_cli.register(sub)
    sub.add_parser("supernode", help="check --node-config, then run flower-supernode with the same arguments", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["supernode"]:  # every other argument belongs to flower-supernode
        return deploy_cli.cmd_supernode(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
