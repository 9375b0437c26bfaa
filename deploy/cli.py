"""``splitmix deploy ...`` and ``splitmix supernode``: the deployment commands.

- ``deploy certs`` / ``deploy keys``: TLS certificates and SuperNode key pairs.
- ``deploy connect``: add a SuperLink connection (e.g. ``deployment``) to ``$FLWR_HOME/config.toml``
  so ``flwr run . deployment`` targets it.
- ``deploy register``: register SuperNode public keys on an auth-enabled SuperLink (idempotent:
  the compose file runs it on every ``up``).
- ``deploy health``: exit 0 when a SuperLink/SuperNode answers ``/health`` (container health checks).
- ``deploy local``: the whole topology as local processes on loopback, one run, teardown.
- ``supernode``: validate ``--node-config`` and then exec ``flower-supernode`` with the same
  arguments, so a typo in a node's profile stops it at start with a message naming the key;
  ``--warm``: one long-lived ClientApp process for every message (``deploy/warm_clientapp.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from rich.console import Console

from splitmix.node_config import NodeConfigError, parse_node_config_string, validate_node_config


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def _flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))


def cmd_certs(args: argparse.Namespace) -> int:
    from deploy.certificates import DEFAULT_HOSTS, generate_certificates

    hosts = list(DEFAULT_HOSTS) + list(args.host or [])
    paths = generate_certificates(args.out, hosts, days=args.days)
    for role, path in paths.items():
        print(f"{role}: {path}")
    print(f"valid for: {', '.join(dict.fromkeys(hosts))}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from deploy.certificates import generate_node_keys

    names = args.names or [f"supernode-{i}" for i in range(args.nodes)]
    for name, (private, public) in generate_node_keys(args.out, names).items():
        print(f"{name}: {private} (private), {public} (public)")
    return 0


def cmd_connect(args: argparse.Namespace) -> int:
    from deploy.local import write_connection

    if not args.insecure and not args.ca:
        _err("give --ca PATH (the deployment's ca.crt) or --insecure")
        return 2
    path = write_connection(_flwr_home(), args.name, args.address, None if args.insecure else args.ca)
    print(f"connection '{args.name}' → {args.address} written to {path}; now: flwr run . {args.name}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    """Register each public key; a key already registered counts as done."""
    with tempfile.TemporaryDirectory(prefix="splitmix-register-") as home:
        return _register_keys(Path(home), args)


def _register_keys(home: Path, args: argparse.Namespace) -> int:
    from deploy.local import bin_path, write_connection

    write_connection(home, "target", args.superlink, args.ca)
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    deadline = time.monotonic() + args.wait
    failed = 0
    for key in args.keys:
        while True:
            proc = subprocess.run(
                [bin_path("flwr"), "supernode", "register", str(key), "target", "--format", "json"], env=env, capture_output=True, text=True
            )
            text = proc.stdout + proc.stderr
            if proc.returncode == 0 and '"success": true' in proc.stdout:
                print(f"{key}: registered as node {json.loads(proc.stdout[proc.stdout.find('{') :]).get('node-id')}")
                break
            if "already in use" in text:
                print(f"{key}: already registered")
                break
            if time.monotonic() > deadline:  # the SuperLink may still be starting: retry until --wait
                _err(f"{key}: registration failed: {text.strip()[-500:]}")
                failed += 1
                break
            time.sleep(2.0)
    return 1 if failed else 0


def cmd_health(args: argparse.Namespace) -> int:
    context = ssl.create_default_context(cafile=args.ca) if args.ca else None
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout, context=context) as response:
            return 0 if response.status == 200 else 1
    except Exception as exc:  # unreachable, TLS failure, HTTP error
        _err(f"{args.url}: {exc}")
        return 1


def cmd_local(args: argparse.Namespace) -> int:
    from deploy.local import DeploymentError, LocalDeployment, default_node_configs, marked_processes
    from splitmix.config import ConfigError, RunConfig, parse_overrides

    err = Console(stderr=True)
    say = lambda text: err.print(text, highlight=False)  # noqa: E731
    node_configs = args.node_config or default_node_configs(args.nodes)
    try:
        overrides = {"num-clients": len(node_configs), "num-rounds": args.rounds, "min-train-clients": 1, **parse_overrides(args.run_config)}
        cfg = RunConfig.from_mapping(overrides)
        for text in node_configs:
            validate_node_config(parse_node_config_string(text), cfg.federation.num_clients)
    except (ConfigError, NodeConfigError) as exc:
        _err(str(exc))
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="splitmix-deploy-")).resolve()
    out_dir = Path(cfg.system.out_dir).resolve()
    run_config = {**overrides, "out-dir": str(out_dir), "run-name": cfg.system.run_name or time.strftime("deploy-%Y%m%d-%H%M%S")}
    deployment = LocalDeployment(
        workdir, node_configs, app_dir=Path(args.app), tls=not args.insecure, auth=not (args.insecure or args.no_auth), warm=args.warm, say=say
    )
    seen = [0]

    def progress() -> None:  # echo the rounds as the ServerApp writes them (whole lines only)
        metrics = out_dir / run_config["run-name"] / "metrics.jsonl"
        if metrics.exists():
            lines = metrics.read_text().split("\n")[:-1]  # the part after the last newline may be half-written
            for line in lines[seen[0] :]:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                say(
                    f"round {row['round']}/{cfg.federation.num_rounds}: valid {row.get('valid')}/{row.get('sampled')}, "
                    f"failures {row.get('failures')}, train {row.get('train-seconds', 0):.1f}s"
                )
            seen[0] = len(lines)

    try:
        with deployment:
            outcome = deployment.run(run_config, timeout=args.timeout, on_poll=progress)
            progress()
    except DeploymentError as exc:
        _err(f"{exc}")
        return 1
    say(
        f"run {outcome.run_id}: {outcome.status} in {outcome.seconds:.0f}s; "
        f"processes left: {len(marked_processes(deployment.marker))}; logs in {deployment.logs}"
    )
    if outcome.status != "finished:completed" or not (outcome.run_dir / "summary.json").exists():
        _err(f"run ended {outcome.status}; see {deployment.logs}")
        return 1
    print(outcome.run_dir, flush=True)  # last stdout line: the run folder
    return 0


def cmd_supernode(argv: list[str]) -> int:
    """Validate ``--node-config`` in ``argv``, then replace this process by flower-supernode; with
    ``--warm``, run flower-supernode (``--isolation process``) as a child and every ClientApp
    message in this one long-lived process (``deploy/warm_clientapp.py``)."""
    parser = argparse.ArgumentParser(prog="splitmix supernode", add_help=False)
    parser.add_argument("--node-config", default=None)
    parser.add_argument("--warm", action="store_true")
    parser.add_argument("--isolation", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", default="9094")
    known, _ = parser.parse_known_args(argv)
    if known.node_config is None:
        _err('--node-config is required (e.g. --node-config "partition-id=0 num-partitions=4 budget=0.5")')
        return 2
    try:
        validate_node_config(parse_node_config_string(known.node_config))
    except NodeConfigError as exc:
        _err(str(exc))
        return 2
    sys.stdout.flush()
    if known.warm:
        if known.isolation not in (None, "process"):
            _err(f"--warm runs the ClientApps itself (--isolation process), not with --isolation {known.isolation}")
            return 2
        from deploy.warm_clientapp import supervise

        host = "127.0.0.1" if known.host in ("0.0.0.0", "", "::") else known.host
        rest = [a for a in argv if a != "--warm"]
        return supervise(rest, address=f"{host}:{known.port}")
    os.execvp("flower-supernode", ["flower-supernode", *argv])
    return 0  # not reached


def register(sub: argparse._SubParsersAction) -> None:
    deploy = sub.add_parser("deploy", help="deployment helpers: certificates, keys, connections, a local SuperLink+SuperNodes run")
    dsub = deploy.add_subparsers(dest="deploy_command", required=True)

    p = dsub.add_parser("certs", help="generate a CA and the SuperLink's TLS certificate")
    p.add_argument("--out", default="certificates")
    p.add_argument("--host", action="append", help="extra DNS name or IP the SuperLink is reached under (repeatable)")
    p.add_argument("--days", type=int, default=365)
    p.set_defaults(func=cmd_certs)

    p = dsub.add_parser("keys", help="generate ECDSA key pairs for SuperNode authentication")
    p.add_argument("--out", default="keys")
    p.add_argument("--nodes", type=int, default=4, help="supernode-0 … supernode-(N-1)")
    p.add_argument("--names", nargs="*", help="explicit key names instead of --nodes")
    p.set_defaults(func=cmd_keys)

    p = dsub.add_parser("connect", help="add a SuperLink connection to $FLWR_HOME/config.toml (for `flwr run . NAME`)")
    p.add_argument("name", nargs="?", default="deployment")
    p.add_argument("--address", default="127.0.0.1:8000", help="HOST:PORT of the SuperLink")
    p.add_argument("--ca", help="the deployment's ca.crt")
    p.add_argument("--insecure", action="store_true", help="no TLS (only for a SuperLink started with --insecure)")
    p.set_defaults(func=cmd_connect)

    p = dsub.add_parser("register", help="register SuperNode public keys on a SuperLink (idempotent)")
    p.add_argument("keys", nargs="+", type=Path, help="public key files (*.pub)")
    p.add_argument("--superlink", default="superlink:8000")
    p.add_argument("--ca", required=True)
    p.add_argument("--wait", type=float, default=60.0, help="seconds to keep retrying while the SuperLink starts")
    p.set_defaults(func=cmd_register)

    p = dsub.add_parser("health", help="exit 0 if URL (a /health endpoint) answers 200")
    p.add_argument("url")
    p.add_argument("--ca", help="CA to verify an https URL with")
    p.add_argument("--timeout", type=float, default=3.0)
    p.set_defaults(func=cmd_health)

    p = dsub.add_parser("local", help="run the app on a local SuperLink + N SuperNodes (TLS, node auth) and tear down")
    p.add_argument("--nodes", type=int, default=4, help="SuperNodes (budgets cycle 1, 1/2, 1/4, 1/8)")
    p.add_argument("--node-config", action="append", help="one SuperNode's --node-config (repeat per node; overrides --nodes)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--run-config", default="", help='run-config overrides, e.g. "local-epochs=1 adv-fraction=0"')
    p.add_argument("--app", default=".", help="the Flower app directory (this project)")
    p.add_argument("--workdir", help="certificates, keys, state and logs (default: a temp folder)")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--no-auth", action="store_true", help="TLS without SuperNode authentication")
    p.add_argument("--warm", action="store_true", help="one long-lived ClientApp process per SuperNode (splitmix supernode --warm)")
    p.add_argument("--insecure", action="store_true", help="no TLS, no authentication (debugging only)")
    p.set_defaults(func=cmd_local)
