"""Static checks of the container deployment (no Docker engine here): docker-compose.yml parsed
and cross-checked against the Dockerfile, the certificate script and Flower 1.42's own argument
parsers; node configs validated; certificate and connection helpers."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from flwr.app import Context, Message, RecordDict
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

from deploy.certificates import certificate_hosts, generate_certificates, generate_node_keys
from deploy.local import LocalDeployment, write_connection
from splitmix.node_config import NodeConfigError, parse_node_config_string, validate_node_config

pytestmark = pytest.mark.slow  # end-to-end: real processes (Ray, SuperLink, subprocesses)

ROOT = Path(__file__).resolve().parents[2]
# ${VAR:-default} → default: the file as compose reads it with none of its variables set.
COMPOSE = yaml.safe_load(re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", (ROOT / "docker-compose.yml").read_text()))
SERVICES = COMPOSE["services"]
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()
SUPERNODES = sorted(name for name in SERVICES if name.startswith("supernode-"))


def _flag(command: list[str], name: str) -> str:
    for i, arg in enumerate(command):
        if arg == name:
            return command[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise KeyError(name)


def _mounts(service: dict) -> dict[str, str]:
    """container path -> host path (without the :ro suffix)."""
    out = {}
    for volume in service.get("volumes", []):
        host, container, *_ = volume.split(":")
        out[container] = host
    return out


def _host_file(service: dict, container_path: str) -> str:
    """The host path that provides ``container_path`` (a file mount or a mounted folder)."""
    mounts = _mounts(service)
    if container_path in mounts:
        return mounts[container_path]
    for target, host in mounts.items():
        if container_path.startswith(target.rstrip("/") + "/"):
            return host.rstrip("/") + container_path[len(target.rstrip("/")) :]
    raise AssertionError(f"{container_path} is not mounted")


def test_compose_topology_one_superlink_and_a_node_per_budget():
    assert SERVICES["superlink"]["command"][0] == "flower-superlink"
    assert len(SUPERNODES) == 4
    budgets, partitions = [], []
    for name in SUPERNODES:
        command = SERVICES[name]["command"]
        assert command[:3] == ["splitmix", "supernode", "--warm"]  # node config checked before flower-supernode starts; warm ClientApp
        node = validate_node_config(parse_node_config_string(_flag(command, "--node-config")), num_clients=4)
        budgets.append(node.budget)
        partitions.append(node.partition_id)
        assert SERVICES[name]["depends_on"]["register-nodes"]["condition"] == "service_completed_successfully"
        assert SERVICES[name]["restart"] == "unless-stopped" and "healthcheck" in SERVICES[name]
    assert sorted(budgets) == [0.125, 0.25, 0.5, 1.0]
    assert sorted(partitions) == [0, 1, 2, 3]
    assert SERVICES["register-nodes"]["depends_on"]["superlink"]["condition"] == "service_healthy"
    run_config = tomllib.loads((ROOT / "docker" / "deployment.toml").read_text())
    assert run_config["num-clients"] == 4


def test_compose_commands_parse_with_flower_1_42():
    link = _parse_args_run_superlink().parse_args(SERVICES["superlink"]["command"][1:])
    assert link.ssl_certfile and link.ssl_keyfile and link.ssl_ca_certfile and not link.insecure  # TLS on
    assert link.enable_supernode_auth
    assert link.runtime_dependency_install is False  # containers need no network at run time
    for name in SUPERNODES:
        node = _parse_args_run_supernode().parse_args(SERVICES[name]["command"][3:])
        assert node.superlink == f"superlink:{link.port}" and not node.insecure
        assert node.root_certificates and node.auth_supernode_private_key


def test_compose_ports_and_health_checks_agree():
    link = _parse_args_run_superlink().parse_args(SERVICES["superlink"]["command"][1:])
    assert SERVICES["superlink"]["ports"] == [f"{link.port}:{link.port}"]
    assert f"localhost:{link.port}/health" in " ".join(SERVICES["superlink"]["healthcheck"]["test"])
    assert f"--superlink=superlink:{link.port}" in SERVICES["register-nodes"]["command"]
    for name in SUPERNODES:
        node = _parse_args_run_supernode().parse_args(SERVICES[name]["command"][3:])
        assert f"127.0.0.1:{node.port}/health" in " ".join(SERVICES[name]["healthcheck"]["test"])
    assert "EXPOSE 8000" in DOCKERFILE


def test_compose_mounts_match_the_certificate_script(tmp_path):
    """Every certificate/key a command reads is mounted read-only from the file the script makes."""
    script = (ROOT / "docker" / "generate_certs.sh").read_text()
    assert "deploy certs --out certificates" in script and "deploy keys --out keys" in script
    made = generate_certificates(tmp_path / "certificates")
    keys = generate_node_keys(tmp_path / "keys", [f"supernode-{i}" for i in range(4)])
    made_files = {str(p.relative_to(tmp_path)) for p in made.values()}
    made_files |= {str(p.relative_to(tmp_path)) for pair in keys.values() for p in pair}
    link = SERVICES["superlink"]
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert _host_file(link, _flag(link["command"], flag)).removeprefix("./") in made_files
    for name in SUPERNODES:
        service = SERVICES[name]
        for flag in ("--root-certificates", "--auth-supernode-private-key"):
            assert _host_file(service, _flag(service["command"], flag)).removeprefix("./") in made_files
        assert _host_file(service, _flag(service["command"], "--auth-supernode-private-key")) == f"./keys/{name}"
        assert all(v.endswith(":ro") for v in service["volumes"])
    for path in SERVICES["register-nodes"]["command"]:
        if path.endswith(".pub"):
            assert _host_file(SERVICES["register-nodes"], path).removeprefix("./") in made_files
    # The SuperLink's certificate is valid for the compose service name.
    assert "superlink" in certificate_hosts(made["server_cert"])
    assert _mounts(link)["/app/runs"] == "./runs"  # results reach the host


def test_dockerfile_installs_the_project_once_as_flower_uid():
    assert DOCKERFILE.startswith("#") and "ARG BASE_IMAGE=python:3.11-slim\nFROM ${BASE_IMAGE}" in DOCKERFILE
    assert re.search(r"pip install --no-cache-dir --no-deps \. ", DOCKERFILE)
    assert "useradd --uid 49999" in DOCKERFILE and "USER app" in DOCKERFILE and "WORKDIR /app" in DOCKERFILE
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for package in {p.split(".")[0] for p in packages}:  # every top-level package pip installs
        assert f"COPY {package} ./{package}" in DOCKERFILE
    build = COMPOSE["x-splitmix"]["build"]
    assert build == {"context": ".", "dockerfile": "docker/Dockerfile", "args": {"BASE_IMAGE": "python:3.11-slim"}}


def test_dockerfile_takes_pip_settings_only_as_build_secrets():
    """The index URL and CA bundle reach pip through RUN --mount=type=secret (not ARG/ENV/COPY,
    which would keep them in the image's history or a layer)."""
    pip_runs = [block for block in DOCKERFILE.split("\nRUN ") if "pip install" in block]
    assert len(pip_runs) == 3
    for block in pip_runs:
        assert "--mount=type=secret,id=pip_index_url" in block and "--mount=type=secret,id=ca_bundle" in block
    assert not re.search(r"^(ARG|ENV)\b.*(INDEX_URL|CERT|CA_BUNDLE)", DOCKERFILE, re.M)
    script = (ROOT / "docker" / "pip_secrets.sh").read_text()
    assert "/run/secrets/pip_index_url" in script and "PIP_CERT=/run/secrets/ca_bundle" in script


def test_health_probe_imports_only_the_standard_library():
    """Every health check runs docker/healthcheck.py with python3 -I -S (no site-packages)."""
    probe = ["python3", "-I", "-S", "/usr/local/bin/splitmix-health"]
    checks = [SERVICES[name]["healthcheck"]["test"][1:5] for name in ["superlink", *SUPERNODES]]
    assert all(check == probe for check in checks)
    assert 'CMD ["python3", "-I", "-S", "/usr/local/bin/splitmix-health"]' in DOCKERFILE
    assert "COPY docker/healthcheck.py /usr/local/bin/splitmix-health" in DOCKERFILE
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-X", "importtime", str(ROOT / "docker" / "healthcheck.py"), "http://127.0.0.1:9/health"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "127.0.0.1:9/health" in result.stderr  # nothing listens there: unhealthy, says why
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()[1:] if line.startswith("import time:")}
    assert imported and imported <= set(sys.stdlib_module_names) | {"encodings"}


def test_docker_compose_config_accepts_the_file():
    """Compose v2 (`docker compose`) or v1 (`docker-compose`), whichever is installed."""
    from deploy.compose import compose_command

    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed here")
    result = subprocess.run([*command, "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_pyproject_keeps_no_federations_table():
    """Flower 1.42 moves a [tool.flwr.federations] table out of pyproject.toml (rewriting it)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "federations" not in pyproject["tool"]["flwr"]


# ----------------------------------------------------------------------------- node configs
@pytest.mark.parametrize(
    "text, key",
    [
        ("budget=0.5", "partition-id"),
        ("partition-id=0 budget=2.5", "budget"),
        ('partition-id=0 budget="fast"', "budget"),
        ("partition-id=0 budgte=0.5", "budgte"),
        ("partition-id=4 num-partitions=4", "partition-id"),
        ("partition-id=-1", "partition-id"),
        ('partition-id=0 adversarial="maybe"', "adversarial"),
        ("partition-id=inf", "partition-id"),
        ('partition-id=0 budget="nan"', "budget"),
    ],
)
def test_invalid_node_config_is_named(text, key):
    with pytest.raises(NodeConfigError, match=key):
        validate_node_config(parse_node_config_string(text))


def test_node_config_budget_forms():
    forms = {"budget=0.5": 0.5, 'budget="0.5"': 0.5, 'budget="1/4"': 0.25, 'budget="8"': 0.125, 'budget="8d3"': 0.375, "budget=1": 1.0}
    for text, width in forms.items():
        assert validate_node_config(parse_node_config_string(f"partition-id=0 {text}")).budget == width
    with pytest.raises(NodeConfigError, match="num-clients=4"):
        validate_node_config({"partition-id": 0, "num-partitions": 5}, num_clients=4)


def test_splitmix_supernode_refuses_invalid_node_config_before_starting():
    result = subprocess.run(
        [sys.executable, "-m", "splitmix.cli", "supernode", "--insecure", "--node-config", "partition-id=0 budget=3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 2 and "budget=3" in result.stderr and "(0, 1]" in result.stderr


def test_deploy_local_refuses_invalid_node_config_before_starting(tmp_path):
    with pytest.raises(NodeConfigError, match="budget"):
        LocalDeployment(tmp_path, ["partition-id=0 budget=0"])
    assert not any(tmp_path.iterdir())  # nothing was started or written


def test_client_with_invalid_node_config_is_reported_by_the_server(in_process_grid, ask_connected):
    """A node whose config is wrong answers the profile query with an error naming the key; the
    server records it and goes on with the valid nodes."""
    from splitmix.config import RunConfig

    cfg = RunConfig.from_mapping({"num-clients": 3, "min-train-clients": 1})
    method = cfg.make_method()
    grid = in_process_grid(3)
    grid.contexts[1002] = Context(run_id=1, node_id=1002, node_config={"partition-id": 2, "budget": 7.0}, state=RecordDict(), run_config={})

    from clients import app as client_app

    def deliver(msg: Message, ctx: Context) -> Message:
        try:
            return client_app.query(msg, ctx)
        except Exception as exc:  # Flower turns a ClientApp exception into an error reply
            from flwr.app import Error

            return Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)

    grid_send = grid.send_and_receive

    def send_and_receive(messages, *, timeout=None):
        out = []
        for msg in messages:
            if msg.metadata.message_type == "query":
                out.append(deliver(msg, grid.contexts[msg.metadata.dst_node_id]))
            else:
                out.extend(grid_send([msg], timeout=timeout))
        return out

    grid.send_and_receive = send_and_receive
    strategy = method.strategy(cfg.client_task(method.spec).to_json(), 1.0, 1, 0, lambda r: 0.05)
    stats = ask_connected(strategy, grid, timeout=10)
    assert sorted(p.partition_id for p in strategy.profiles.values()) == [0, 1]
    assert stats.failures == 1 and "node 1002" in stats.problems[0] and "budget=7.0" in stats.problems[0]


# ----------------------------------------------------------------------------- helpers
def test_certificates_cover_requested_hosts_and_chain_to_the_ca(tmp_path):
    paths = generate_certificates(tmp_path, ["superlink", "127.0.0.1", "fl.example.org"])
    assert set(certificate_hosts(paths["server_cert"])) == {"superlink", "127.0.0.1", "fl.example.org"}
    ca = x509.load_pem_x509_certificate(paths["ca_cert"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    server.verify_directly_issued_by(ca)
    assert paths["server_key"].stat().st_mode & 0o777 == 0o600


def test_write_connection_for_flwr_run_deployment(tmp_path):
    path = write_connection(tmp_path, "deployment", "10.0.0.5:8000", tmp_path / "ca.crt")
    write_connection(tmp_path, "other", "127.0.0.1:9000", None)
    config = tomllib.loads(path.read_text())
    assert config["superlink"]["default"] == "deployment"
    assert config["superlink"]["deployment"] == {"address": "10.0.0.5:8000", "root-certificates": str((tmp_path / "ca.crt").resolve())}
    assert config["superlink"]["other"] == {"address": "127.0.0.1:9000", "insecure": True}


def test_warm_clientapp_loads_a_new_fab_instead_of_the_cached_modules(tmp_path):
    """A warm ClientApp process keeps the app's modules between messages, but a run with another
    FAB must get that FAB's code: ``switch_to`` drops the previous app's modules and folder."""
    import importlib

    from deploy.warm_clientapp import WarmApp

    old, new = tmp_path / "app-old", tmp_path / "app-new"
    for folder, version in ((old, 1), (new, 2)):
        (folder / "warmpkg").mkdir(parents=True)
        (folder / "warmpkg" / "__init__.py").write_text("")
        (folder / "warmpkg" / "code.py").write_text(f"VERSION = {version}\n")
    app = WarmApp()
    try:
        app.switch_to("hash-old", old)
        sys.path.insert(0, str(old))  # as Flower's load_app does for the installed FAB
        assert importlib.import_module("warmpkg.code").VERSION == 1
        app.switch_to("hash-new", new)
        sys.path.insert(0, str(new))
        assert str(old) not in sys.path
        assert importlib.import_module("warmpkg.code").VERSION == 2
    finally:
        sys.path[:] = [p for p in sys.path if p not in (str(old), str(new))]
        for name in [n for n in sys.modules if n == "warmpkg" or n.startswith("warmpkg.")]:
            del sys.modules[name]


def test_supernode_idle_poll_is_read_and_bounded():
    """SPLITMIX_SUPERNODE_POLL: default 0.5 s, a number in [0.05, 60], else one line naming it."""
    from deploy.warm_clientapp import DEFAULT_IDLE_POLL, idle_poll_seconds

    assert idle_poll_seconds({}) == DEFAULT_IDLE_POLL == 0.25
    assert idle_poll_seconds({"SPLITMIX_SUPERNODE_POLL": "2.5"}) == 2.5
    for bad in ("0", "61", "fast", "nan"):
        with pytest.raises(SystemExit, match=f"SPLITMIX_SUPERNODE_POLL = '{bad}': allowed: seconds between 0.05 and 60"):
            idle_poll_seconds({"SPLITMIX_SUPERNODE_POLL": bad})


def test_supernode_clock_shortens_the_idle_poll_and_the_local_waits(monkeypatch):
    """Flower's SuperNode loop sleeps 3 s after an empty poll (→ the idle poll) and 0.5 s while
    it waits on its own state (→ 20 ms); other names are the time module's."""
    from deploy import warm_clientapp

    slept: list[float] = []
    monkeypatch.setattr(warm_clientapp.time, "sleep", slept.append)
    clock = warm_clientapp.SuperNodeClock(idle_poll=0.5)
    for seconds in (3, 0.5, 0.01, 10):
        clock.sleep(seconds)
    assert slept == [0.5, 0.02, 0.01, 0.5]
    assert clock.monotonic is warm_clientapp.time.monotonic
