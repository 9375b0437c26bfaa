"""Run the ServerApp/ClientApp on Flower's deployment engine as local processes on loopback.

The same topology as ``docker-compose.yml``, without Docker: one ``flower-superlink`` (TLS,
SuperNode authentication; in-memory state unless ``persistent_state``), N ``flower-supernode`` processes (each with its own
partition/budget ``--node-config``, its own registered key and Runtime API port), and the
``flwr`` CLI submitting the app with ``flwr run``. Used by ``splitmix deploy local`` and the
deployment tests.

Every process gets its own ``FLWR_HOME`` (Flower installs the run's FAB there) and a marker in
its environment, inherited by the SuperExec/ServerApp/ClientApp processes Flower spawns, so
teardown can find and stop anything left behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import tomli_w

from deploy.certificates import generate_certificates, generate_node_keys
from splitmix.node_config import parse_node_config_string, validate_node_config

BUDGET_CYCLE = ("1", "1/2", "1/4", "1/8")  # the compose file's four client profiles
MARKER = "SPLITMIX_DEPLOYMENT"


class DeploymentError(RuntimeError):
    """A deployment step failed; the message says which and where its log is."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def default_node_configs(num_nodes: int) -> list[str]:
    """Node i holds partition i of ``num_nodes`` with budgets cycling 1, 1/2, 1/4, 1/8."""
    return [f'partition-id={i} num-partitions={num_nodes} budget="{BUDGET_CYCLE[i % len(BUDGET_CYCLE)]}"' for i in range(num_nodes)]


def bin_path(name: str) -> str:
    """A console script installed next to this Python (the venv's Flower executables)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def marked_processes(marker: str) -> list[int]:
    """PIDs of live processes whose environment carries ``MARKER=marker`` (Linux /proc)."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                status = (entry / "status").read_text()
                if "\nState:\tZ" not in status:  # zombies are already dead
                    found.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return sorted(found)


@dataclass
class RunOutcome:
    run_id: int
    status: str
    run_dir: Path
    seconds: float


@dataclass
class LocalDeployment:
    """A SuperLink and SuperNodes as local processes; use as a context manager.

    ``node_configs``: one ``--node-config`` string per SuperNode. ``tls``/``auth`` default on
    (auth needs TLS). ``workdir`` holds certificates, keys, state, per-process FLWR_HOMEs, logs.
    """

    workdir: Path
    node_configs: list[str]
    app_dir: Path = Path(".")
    tls: bool = True
    auth: bool = True
    connection: str = "local-deployment"
    # Flower's SQLite state raised "database is locked" under heavy CPU load here (a run then
    # ends finished:failed); in-memory state is enough for a deployment that lives one command.
    persistent_state: bool = False
    # One long-lived ClientApp process per SuperNode (``splitmix supernode --warm``) instead of
    # a fresh ``flwr-clientapp`` per message.
    warm: bool = False
    say: Callable[[str], None] = lambda text: None
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    port: int = 0
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    node_ids: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.auth and not self.tls:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses --enable-supernode-auth with --insecure)")
        self.workdir = Path(self.workdir).resolve()
        self.app_dir = Path(self.app_dir).resolve()
        for text in self.node_configs:  # fail before anything starts
            validate_node_config(parse_node_config_string(text))
        self.certs = self.workdir / "certificates"
        self.keys = self.workdir / "keys"
        self.logs = self.workdir / "logs"

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def node_names(self) -> list[str]:
        return [f"supernode-{i}" for i in range(len(self.node_configs))]

    def start(self, timeout: float = 90.0) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.tls and not (self.certs / "ca.crt").exists():
            generate_certificates(self.certs)
        if self.auth:
            generate_node_keys(self.keys, self.node_names())
        self.port = self.port or free_port()
        self._write_cli_config()
        self.start_superlink()
        self._wait(lambda: self._healthy(), timeout, "the SuperLink to answer /health", "superlink")
        self.say(f"SuperLink up on 127.0.0.1:{self.port} ({'TLS' if self.tls else 'insecure'}{', node auth' if self.auth else ''})")
        for name, config in zip(self.node_names(), self.node_configs):
            if self.auth:
                self.node_ids[name] = self.register(self.keys / f"{name}.pub")
            self.start_supernode(name, config)
        self._wait(lambda: len(self.online_nodes()) >= len(self.node_configs), timeout, "every SuperNode to come online", self.node_names())
        self.say(f"{len(self.node_configs)} SuperNodes online")

    def stop(self, grace: float = 15.0) -> list[int]:
        """Stop nodes, then the link (SIGTERM, then SIGKILL), then anything still marked.

        Flower's children (ServerApp, ClientApp processes) exit after their parents; on a busy
        machine that takes seconds, so they get up to ``grace`` seconds to go on their own before
        the marker sweep kills them. Returns the PIDs that had to be killed by marker.
        """
        names = [n for n in self.processes if n != "superlink"] + (["superlink"] if "superlink" in self.processes else [])
        for name in names:
            try:
                self._terminate(self.processes[name], grace)
            except (subprocess.TimeoutExpired, OSError):  # the marker sweep below gets it
                pass
        self.processes.clear()
        deadline = time.monotonic() + grace
        while marked_processes(self.marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        leftovers = marked_processes(self.marker)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + max(grace, 10.0)
        while marked_processes(self.marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        return leftovers

    @staticmethod
    def _terminate(proc: subprocess.Popen, grace: float) -> None:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # each process leads its own group (start_new_session)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(max(grace, 10.0))

    # ------------------------------------------------------------------ processes
    def env(self, home: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "FLWR_HOME": str(self.workdir / "home" / home),
                MARKER: self.marker,
                "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "PYTHONUNBUFFERED": "1",
                # Flower spawns flower-superexec / flwr-serverapp / flwr-clientapp by name
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            }
        )
        return env

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "ab") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(args, cwd=self.workdir, env=self.env(name), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = proc
        return proc

    def superlink_args(self) -> list[str]:
        args = [bin_path("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port)]
        if self.persistent_state:
            args += ["--database", str(self.workdir / "superlink-state.db")]
        args += ["--disable-runtime-dependency-installation"]
        if self.tls:
            args += [
                "--ssl-ca-certfile",
                str(self.certs / "ca.crt"),
                "--ssl-certfile",
                str(self.certs / "server.pem"),
                "--ssl-keyfile",
                str(self.certs / "server.key"),
            ]
        else:
            args += ["--insecure"]
        if self.auth:
            args += ["--enable-supernode-auth"]
        return args

    def start_superlink(self) -> subprocess.Popen:
        return self._spawn("superlink", self.superlink_args())

    def supernode_args(self, name: str, node_config: str, root_certificates: Path | None = None, key: Path | None = None) -> list[str]:
        start = [bin_path("splitmix"), "supernode", "--warm"] if self.warm else [bin_path("flower-supernode")]
        args = [*start, "--superlink", f"127.0.0.1:{self.port}", "--node-config", node_config]
        args += ["--port", str(free_port()), "--max-wait-time", "120"]
        if self.tls:
            args += ["--root-certificates", str(root_certificates or self.certs / "ca.crt")]
        else:
            args += ["--insecure"]
        if self.auth:
            args += ["--auth-supernode-private-key", str(key or self.keys / name)]
        return args

    def start_supernode(self, name: str, node_config: str, **overrides: Any) -> subprocess.Popen:
        return self._spawn(name, self.supernode_args(name, node_config, **overrides))

    def kill_node(self, name: str) -> None:
        """SIGKILL a SuperNode and its children: a crash, not a graceful shutdown."""
        proc = self.processes.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)

    # ------------------------------------------------------------------ flwr CLI
    def _write_cli_config(self) -> None:
        """``$FLWR_HOME/config.toml`` of the CLI: one connection named ``self.connection``."""
        write_connection(self.workdir / "home" / "cli", self.connection, f"127.0.0.1:{self.port}", self.certs / "ca.crt" if self.tls else None)

    def flwr(self, *args: str, timeout: float = 120.0) -> dict:
        """Run a ``flwr`` CLI command with ``--format json``; returns the parsed JSON."""
        try:
            proc = subprocess.run(
                [bin_path("flwr"), *args, "--format", "json"], cwd=self.app_dir, env=self.env("cli"), capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"`flwr {' '.join(args)}` did not answer within {timeout:.0f}s; logs in {self.logs}") from None
        text = proc.stdout.strip()
        start = text.find("{")
        try:
            result = json.loads(text[start:]) if start >= 0 else {}
        except json.JSONDecodeError:
            result = {}
        if proc.returncode != 0 or not result.get("success", False):
            raise DeploymentError(
                f"`flwr {' '.join(args)}` failed (exit {proc.returncode}): "
                f"{(result.get('error-message') or proc.stderr or proc.stdout).strip()[-800:]}"
            )
        return result

    def register(self, public_key: Path) -> int:
        result = self.flwr("supernode", "register", str(public_key), self.connection)
        return int(result["node-id"])

    def online_nodes(self) -> list[int]:
        try:
            nodes = self.flwr("supernode", "list", self.connection)["nodes"]
        except (DeploymentError, KeyError):
            return []
        return [int(n["node-id"]) for n in nodes if n.get("status") == "online"]

    def submit(self, run_config: dict[str, Any]) -> int:
        """``flwr run <app> <connection> --run-config <file>``; returns the run id."""
        path = self.workdir / f"run-config-{uuid.uuid4().hex[:8]}.toml"
        path.write_text(tomli_w.dumps(run_config))
        result = self.flwr("run", str(self.app_dir), self.connection, "--run-config", str(path), timeout=300)
        return int(result["run-id"])

    def status(self, run_id: int) -> str:
        runs = self.flwr("ls", self.connection, "--run-id", str(run_id))["runs"]
        return str(runs[0]["status"]) if runs else "unknown"

    def wait_run(self, run_id: int, timeout: float, on_poll: Callable[[], None] | None = None, every: float = 5.0) -> str:
        """Poll until the run's status is ``finished:*``; stops the run on timeout.

        Each ``flwr ls`` is a new Python process (~1 s of CPU), so the status is asked every
        ``every`` seconds; ``on_poll`` (cheap, e.g. reading the run folder) runs every second.
        """
        deadline = time.monotonic() + timeout
        next_status = time.monotonic()
        while time.monotonic() < deadline:
            if time.monotonic() >= next_status:
                try:
                    status = self.status(run_id)
                except DeploymentError:
                    status = "unknown"
                if status.startswith("finished"):
                    return status
                next_status = time.monotonic() + every
            if on_poll:
                on_poll()
            self._check_alive("superlink")
            time.sleep(1.0)
        try:
            self.flwr("stop", str(run_id), self.connection)
        except DeploymentError:
            pass
        raise DeploymentError(f"run {run_id} did not finish in {timeout:.0f}s; logs in {self.logs}")

    def run(self, run_config: dict[str, Any], timeout: float = 600.0, on_poll: Callable[[], None] | None = None) -> RunOutcome:
        """Submit the app with ``run_config`` (its run folder forced under this workdir unless set)."""
        config = {"out-dir": str(self.workdir / "runs"), "run-name": f"deploy-{uuid.uuid4().hex[:8]}", **run_config}
        start = time.perf_counter()
        run_id = self.submit(config)
        self.say(f"submitted run {run_id}")
        status = self.wait_run(run_id, timeout, on_poll)
        return RunOutcome(run_id, status, Path(config["out-dir"]).resolve() / str(config["run-name"]), time.perf_counter() - start)

    # ------------------------------------------------------------------ helpers
    def _healthy(self) -> bool:
        scheme = "https" if self.tls else "http"
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(self.certs / "ca.crt")) if self.tls else False
        try:
            return httpx.get(f"{scheme}://127.0.0.1:{self.port}/health", verify=verify, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _check_alive(self, name: str) -> None:
        proc = self.processes.get(name)
        if proc is not None and proc.poll() is not None:
            raise DeploymentError(f"{name} exited with code {proc.returncode}; log: {self.logs / (name + '.log')}")

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str, processes: str | list[str]) -> None:
        """Poll ``ready``; fail early (naming its log) when one of ``processes`` has exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            for name in [processes] if isinstance(processes, str) else processes:
                self._check_alive(name)
            time.sleep(0.5)
        raise DeploymentError(f"timed out after {timeout:.0f}s waiting for {what}; logs in {self.logs}")


def write_connection(flwr_home: str | Path, name: str, address: str, root_certificates: str | Path | None) -> Path:
    """Add (or replace) SuperLink connection ``name`` in ``$FLWR_HOME/config.toml``.

    Flower 1.42 keeps connections there, not in pyproject.toml (a ``[tool.flwr.federations]``
    table is migrated out of pyproject.toml, rewriting the file), and wants an absolute path for
    ``root-certificates``.
    """
    import tomllib

    path = Path(flwr_home) / "config.toml"
    config: dict[str, Any] = tomllib.loads(path.read_text()) if path.exists() else {}
    superlink = config.setdefault("superlink", {})
    superlink.setdefault("default", name)
    entry: dict[str, Any] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    superlink[name] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path
