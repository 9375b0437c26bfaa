"""CPU per container health check, measured inside the running compose stack.

Brings up ``docker-compose.yml`` (the image from docker/build_image.sh, generated certificates
and keys, its own project name and port), then, in the SuperLink container and in one SuperNode
container, runs that service's own health check command (read from the container's
configuration, as the engine runs it) ``--checks`` times as child processes of one Python
process, and reads their user + system CPU from ``getrusage(RUSAGE_CHILDREN)``. Each check must
exit 0 (the service answered 200). Also prints the image's size. ``down -v`` at the end.

    python bench/health_probe.py [--checks 20]

Lines ``probe_cpu_s_superlink``, ``probe_cpu_s_supernode`` (CPU seconds per check; target < 0.2)
and ``image_gb`` end the output (``tools/bench_record.py`` stores them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.compose import ComposeStack, build_image, docker_unavailable  # noqa: E402

# Runs inside the container with its python3: the probe N times, then the children's CPU.
MEASURE = """
import json, resource, subprocess, sys
command, n = json.loads(sys.argv[1]), int(sys.argv[2])
codes = [subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode for _ in range(n)]
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"codes": codes, "cpu_s": usage.ru_utime + usage.ru_stime}))
"""


def health_command(stack: ComposeStack, service: str) -> list[str]:
    """The container's HEALTHCHECK test as the engine runs it (``CMD`` form)."""
    proc = subprocess.run(
        ["docker", "inspect", "-f", "{{json .Config.Healthcheck.Test}}", stack.container(service)], capture_output=True, text=True, check=True
    )
    test = json.loads(proc.stdout)
    if not test or test[0] != "CMD":
        raise SystemExit(f"{service}: expected a CMD health check, got {test}")
    return list(test[1:])


def cpu_per_check(stack: ComposeStack, service: str, checks: int) -> float:
    command = health_command(stack, service)
    proc = stack.exec(service, "python3", "-I", "-S", "-c", MEASURE, json.dumps(command), str(checks), timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{service}: measuring failed: {proc.stderr.strip()[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if any(result["codes"]):
        raise SystemExit(f"{service}: a health check failed (exit codes {result['codes']})")
    print(f"{service}: {checks} checks `{' '.join(command)}`: {result['cpu_s']:.3f} s CPU")
    return float(result["cpu_s"]) / checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", type=int, default=20)
    args = parser.parse_args()
    reason = docker_unavailable()
    if reason:
        raise SystemExit(f"health_probe: {reason}")
    image = build_image()
    size = subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", image], capture_output=True, text=True, check=True)
    work = Path(tempfile.mkdtemp(prefix="splitmix-health-"))
    stack = ComposeStack(work / "compose", image=image, say=lambda text: print(text, flush=True))
    with stack:
        superlink = cpu_per_check(stack, "superlink", args.checks)
        supernode = cpu_per_check(stack, "supernode-0", args.checks)
    print(f"probe_cpu_s_superlink: {superlink:.4f}")
    print(f"probe_cpu_s_supernode: {supernode:.4f}")
    print(f"image_gb: {int(size.stdout.strip()) / 1e9:.2f}")


if __name__ == "__main__":
    main()
