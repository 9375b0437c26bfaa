"""The service's body limit under an oversized upload: memory of ``splitmix serve`` while curl
sends a 100 MiB chunked body (no Content-Length), and a body announced over the limit.

Starts ``splitmix serve RUN`` as a real subprocess on a free loopback port (RUN: ``--run``, or a
tiny run trained here in-process, as in ``bench/serve_load.py``), sends one valid request so the
model is built and the allocator settles, then reads the server's VmRSS / VmHWM from
``/proc/PID/status`` (VmHWM reset first through ``/proc/PID/clear_refs``, so it is the peak from
here on) and runs, ``--repeat`` times,

    head -c 104857600 /dev/zero | curl -H 'Transfer-Encoding: chunked' \\
        -H 'Content-Type: application/json' --data-binary @- http://127.0.0.1:PORT/predict

then once with a 9 MiB body that announces its Content-Length. Prints each reply's status, how
many bytes curl managed to upload, and the server's memory after each; the last line is

    chunked_413_rss_growth_mb: X

X = max(VmRSS, VmHWM) after the uploads − VmRSS before, in MB (10^6 bytes). Exits non-zero if a
reply is not 413 or X ≥ 50.

    python bench/serve_body_limit.py [--run runs/<name>] [--repeat 3] [--mib 100]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from serve_load import Server, train_tiny_run  # bench/ is on sys.path when run as a script

GROWTH_LIMIT_MB = 50.0


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024  # kB
    return fields


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def curl(command: str) -> tuple[int, int, str, float, int]:
    """Run a ``curl -w '%{http_code} %{size_upload}'`` pipeline; returns (HTTP status, bytes
    uploaded, reply body, seconds, curl's exit code). curl may exit non-zero (55/56: the server
    closed the connection while it was still sending) after it has the whole reply."""
    with tempfile.NamedTemporaryFile(suffix=".json") as body:
        t0 = time.perf_counter()
        done = subprocess.run(
            f"{command} -o {body.name} -w '%{{http_code}} %{{size_upload}}'", shell=True, capture_output=True, text=True, timeout=600
        )
        seconds = time.perf_counter() - t0
        status, uploaded = (done.stdout.split() + ["0", "0"])[:2]
        return int(status), int(float(uploaded)), Path(body.name).read_text(), seconds, done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a finished run folder (default: train a tiny one)")
    parser.add_argument("--repeat", type=int, default=3, help="chunked uploads to send, one after another")
    parser.add_argument("--mib", type=int, default=100, help="size of each chunked upload in MiB")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="serve-body-limit-"))
    run = args.run
    if run is None:
        run = train_tiny_run(scratch / "runs")
        print(f"trained a tiny run: {run}")
    server = Server(run, compile=False, log=scratch / "server.log")
    statuses: list[int] = []
    try:
        server.wait_ready()
        pid = server.proc.pid
        models = httpx.get(f"{server.url}/models", timeout=30).json()
        c, h, w = models["input_shape"]
        valid = {"width": models["widths"][0]["width"], "inputs": [[[[0.5] * w] * h] * c] * 8}
        assert httpx.post(f"{server.url}/predict", json=valid, timeout=120).status_code == 200
        before = memory(pid)
        peak_reset = reset_peak(pid)
        print(f"server pid {pid}: VmRSS {before['VmRSS'] / 1e6:.1f} MB, VmHWM {before['VmHWM'] / 1e6:.1f} MB before the uploads")
        print(f"VmHWM reset to the current RSS: {'yes' if peak_reset else 'no (the peak includes start-up)'}")

        size = args.mib * 1024 * 1024
        chunked = (
            f"head -c {size} /dev/zero | curl -sS -H 'Transfer-Encoding: chunked' -H 'Content-Type: application/json' "
            f"--data-binary @- {server.url}/predict"
        )
        print(f"$ {chunked}")
        after = before
        for i in range(args.repeat):
            status, uploaded, body, seconds, code = curl(chunked)
            after = memory(pid)
            statuses.append(status)
            print(
                f"chunked {args.mib} MiB #{i + 1}: HTTP {status} in {seconds:.2f}s, curl uploaded {uploaded / 2**20:.1f} MiB "
                f"(curl exit {code}); server VmRSS {after['VmRSS'] / 1e6:.1f} MB, VmHWM {after['VmHWM'] / 1e6:.1f} MB"
            )
        print(f"  reply: {json.loads(body)['detail'] if body.startswith('{') else body[:200]!r}")

        announced = scratch / "9mib.bin"
        announced.write_bytes(b"0" * (9 * 1024 * 1024))
        fixed = f"curl -sS -H 'Content-Type: application/json' --data-binary @{shlex.quote(str(announced))} {server.url}/predict"
        status, uploaded, body, seconds, code = curl(fixed)
        statuses.append(status)
        print(f"$ {fixed}")
        print(f"Content-Length 9 MiB: HTTP {status} in {seconds:.2f}s, curl uploaded {uploaded / 2**20:.1f} MiB (curl exit {code})")
        print(f"  reply: {json.loads(body)['detail'] if body.startswith('{') else body[:200]!r}")
        after = memory(pid)
    finally:
        exit_code, graceful = server.stop()

    rss_growth = (after["VmRSS"] - before["VmRSS"]) / 1e6
    peak_growth = (after["VmHWM"] - before["VmRSS"]) / 1e6
    growth = max(rss_growth, peak_growth)
    print(f"server VmRSS growth {rss_growth:.1f} MB, peak (VmHWM) over the starting RSS {peak_growth:.1f} MB")
    print(f"server stopped: exit code {exit_code}, {'graceful' if graceful else 'NOT clean'}")
    ok = all(s == 413 for s in statuses) and growth < GROWTH_LIMIT_MB
    if not ok:
        print(f"FAILED: statuses {statuses} (want all 413), growth {growth:.1f} MB (want < {GROWTH_LIMIT_MB:g}); log {scratch / 'server.log'}")
    else:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    print(f"chunked_413_rss_growth_mb: {growth:.1f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
