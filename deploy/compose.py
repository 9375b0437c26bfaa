"""Drive ``docker-compose.yml`` from Python: the container test and ``bench/deploy_round.py``.

``ComposeStack`` is a ``LocalDeployment`` whose SuperLink and SuperNodes are the compose
services instead of local processes; submitting runs, polling their status and the ``flwr`` CLI
plumbing are inherited. Each stack gets its own compose project name, certificates, keys, run
folder and host port (the compose file reads them from ``SPLITMIX_*`` variables), so it never
touches a user's ``./certificates`` or a stack already running, and ``stop`` removes its
containers, network and volume (``down -v``).

Compose v2 (``docker compose``) is used when present, else v1 (``docker-compose``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.certificates import DEFAULT_HOSTS, generate_certificates, generate_node_keys
from deploy.local import DeploymentError, LocalDeployment, RunOutcome, free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
CONTAINER_UID = 49999  # the image's user (docker/Dockerfile), as in Flower's images
SUPERNODES = [f"supernode-{i}" for i in range(4)]  # the compose file's four SuperNodes


def _run(args: list[str], timeout: float = 120.0, **kwargs: Any) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(args, 127, "", f"{type(exc).__name__}: {exc}")


def docker_unavailable() -> str | None:
    """Why the container deployment cannot run here, or None when it can."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    info = _run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=60)
    if info.returncode != 0:
        said = (info.stderr or info.stdout).strip().splitlines() or ["no output"]
        return f"no docker engine answers `docker info` ({said[-1]})"
    if compose_command() is None:
        return "neither `docker compose` (v2) nor `docker-compose` (v1) is installed"
    return None


def _container_main_pid(container: str) -> int | None:
    """The host PID of a running container's main process when this host's PID namespace holds
    it (checked: the process's cgroup names the container), else None (a remote or VM engine)."""
    proc = _run(["docker", "inspect", "-f", "{{.Id}} {{.State.Pid}}", container])
    cid, _, pid = proc.stdout.strip().partition(" ")
    if proc.returncode != 0 or not pid.isdigit() or int(pid) <= 0:
        return None
    try:
        cgroups = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    return int(pid) if cid and cid in cgroups else None


def compose_command() -> list[str] | None:
    """``docker compose`` (v2) when it answers, else ``docker-compose`` (v1), else None."""
    if shutil.which("docker") and _run(["docker", "compose", "version"], timeout=60).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose") and _run(["docker-compose", "version"], timeout=60).returncode == 0:
        return ["docker-compose"]
    return None


def build_image(tag: str = "splitmix-fl:latest", timeout: float = 3600.0) -> str:
    """``docker/build_image.sh``: builds (or finds up to date) the image; returns its tag."""
    proc = _run([str(ROOT / "docker" / "build_image.sh"), tag], timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise DeploymentError(f"docker/build_image.sh failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip().splitlines()[-1]


@dataclass
class ComposeStack(LocalDeployment):
    """The compose stack as a deployment (use as a context manager: ``down -v`` on exit)."""

    node_configs: list[str] = field(default_factory=list)  # fixed by the compose file
    app_dir: Path = ROOT
    image: str = "splitmix-fl:latest"
    project: str = field(default_factory=lambda: f"splitmix-test-{uuid.uuid4().hex[:8]}")
    connection: str = "compose"
    command: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.runs = self.workdir / "runs"
        self.data = self.workdir / "data"
        self.command = self.command or compose_command() or ["docker-compose"]

    def node_names(self) -> list[str]:
        return list(SUPERNODES)

    def compose_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "SPLITMIX_IMAGE": self.image,
            "SPLITMIX_CERTS": str(self.certs),
            "SPLITMIX_KEYS": str(self.keys),
            "SPLITMIX_RUNS": str(self.runs),
            "SPLITMIX_DATA": str(self.data),
            "SPLITMIX_PORT": str(self.port),
        }

    def compose(self, *args: str, timeout: float = 600.0) -> subprocess.CompletedProcess:
        return _run([*self.command, "-p", self.project, "-f", str(COMPOSE_FILE), *args], timeout=timeout, env=self.compose_env(), cwd=ROOT)

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 1200.0) -> None:
        """Certificates and keys (owned by the containers' uid), ``up -d`` without building, then
        wait until every SuperNode is healthy and online. The health checks and the waits are
        minutes long: a busy 2-core host starts torch-importing containers slowly."""
        self.logs.mkdir(parents=True, exist_ok=True)
        generate_certificates(self.certs, list(DEFAULT_HOSTS))
        generate_node_keys(self.keys, self.node_names())
        for folder in (self.runs, self.data):
            folder.mkdir(parents=True, exist_ok=True)
        self._hand_to_containers()
        self.port = self.port or free_port()
        self._write_cli_config()
        self.say(f"compose project {self.project}: up (port {self.port})")
        up = self.compose("up", "-d", "--no-build", timeout=timeout)
        if up.returncode != 0:
            raise DeploymentError(f"compose up failed (exit {up.returncode}): {(up.stderr or up.stdout).strip()[-2000:]}\n{self.service_logs()}")
        self._wait(lambda: all(self.health(name) == "healthy" for name in ["superlink", *SUPERNODES]), timeout, "every service to be healthy", [])
        self._wait(lambda: len(self.online_nodes()) >= len(SUPERNODES), timeout, "every SuperNode to come online", [])
        self.say(f"{len(SUPERNODES)} SuperNodes healthy and online")

    def _hand_to_containers(self) -> None:
        """The containers run as uid 49999: they must read the keys and write the run folder."""
        paths = [self.certs, self.keys, self.runs, self.data]
        if os.geteuid() == 0:
            for top in paths:
                for path in [top, *top.rglob("*")]:
                    os.chown(path, CONTAINER_UID, CONTAINER_UID)
        else:  # no chown without root: open the test's own temp folders up instead
            for top in paths:
                for path in [top, *top.rglob("*")]:
                    path.chmod(0o777 if path.is_dir() else 0o644)

    def stop(self, grace: float = 15.0) -> list[int]:
        """``down -v``: containers, network and the SuperLink's state volume; keeps the logs."""
        if self.logs.exists():
            (self.logs / "compose.log").write_text(self.service_logs())
        down = self.compose("down", "-v", "--remove-orphans", "-t", str(int(grace)), timeout=600)
        if down.returncode != 0:
            self.say(f"compose down failed: {down.stderr.strip()[-500:]}")
        return []

    # ------------------------------------------------------------------ services
    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service, timeout=120).stdout.strip()

    def health(self, service: str) -> str:
        cid = self.container(service)
        if not cid:
            return "missing"
        proc = _run(["docker", "inspect", "-f", "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}", cid])
        state, _, health = proc.stdout.strip().partition(" ")
        if state in ("exited", "dead"):
            raise DeploymentError(f"{service} {state}:\n{self.service_logs(service)}")
        return health or state

    def health_log(self, service: str) -> list[dict]:
        """The engine's record of the last health checks (start, end, exit code, output)."""
        proc = _run(["docker", "inspect", "-f", "{{json .State.Health.Log}}", self.container(service)])
        return json.loads(proc.stdout or "[]")

    def kill_node(self, name: str) -> None:
        """SIGKILL a SuperNode's container: a crash (``restart: unless-stopped`` leaves a killed
        container down)."""
        self.node_killer(name)()

    def node_killer(self, name: str) -> Callable[[], None]:
        """Prepare a crash of SuperNode ``name`` that lands at once when called.

        ``docker kill`` goes through the CLI and the engine: seconds on a busy host, long enough
        for a warm node to pull, train and answer a round it was meant to miss. Where this host
        sees the container's processes (a local engine), the returned function SIGKILLs the
        container's main process directly (the kernel then ends every process in its PID
        namespace); its restart policy is switched off first, so that the engine leaves it down
        as after ``docker kill``. Otherwise it runs ``docker kill``."""
        container = self.container(name)
        pid = _container_main_pid(container)

        def docker_kill() -> None:
            proc = _run(["docker", "kill", container], timeout=120)
            if proc.returncode != 0:
                raise DeploymentError(f"docker kill {name} failed: {proc.stderr.strip()}")

        if pid is None or _run(["docker", "update", "--restart", "no", container]).returncode != 0:
            return docker_kill

        def kill_now() -> None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # already gone
                pass
            except PermissionError:
                docker_kill()

        return kill_now

    def throttle_node(self, name: str, cpus: float) -> None:
        """Cap a SuperNode container at ``cpus`` CPUs (``docker update --cpus``): a slow device."""
        proc = _run(["docker", "update", "--cpus", str(cpus), self.container(name)], timeout=120)
        if proc.returncode != 0:
            raise DeploymentError(f"docker update --cpus {cpus} {name} failed: {proc.stderr.strip()}")

    def service_logs(self, service: str = "") -> str:
        proc = self.compose("logs", "--no-color", *([service] if service else []), timeout=300)
        return proc.stdout[-200_000:]

    def exec(self, service: str, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
        return _run(["docker", "exec", self.container(service), *args], timeout=timeout)

    def _check_alive(self, name: str) -> None:
        if name == "superlink":
            self.health("superlink")  # raises when the container exited

    # ------------------------------------------------------------------ runs
    def run(self, run_config: dict[str, Any], timeout: float = 1800.0, on_poll: Any = None) -> RunOutcome:
        """Submit the app; the ServerApp writes to /app/runs in the superlink container, which
        is ``self.runs`` here."""
        name = str(run_config.get("run-name") or f"compose-{uuid.uuid4().hex[:8]}")
        config = {**run_config, "out-dir": "/app/runs", "run-name": name}
        start = time.perf_counter()
        run_id = self.submit(config)
        self.say(f"submitted run {run_id}")
        status = self.wait_run(run_id, timeout, on_poll)
        return RunOutcome(run_id, status, self.runs / name, time.perf_counter() - start)
