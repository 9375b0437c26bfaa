"""Load test of ``splitmix serve``: N concurrent clients asking for mixed widths and λ.

Starts ``splitmix serve RUN`` as a real subprocess on a free loopback port (RUN: ``--run``, or a
tiny run trained here in-process in a few seconds), reads ``/models``, then N worker threads —
each with its own keep-alive ``httpx.Client``, like independent users — send ``POST /predict``
requests, each for a width and λ drawn (seeded) from what the run serves, with a batch of images.
Every reply is checked (HTTP 200, the width/λ asked for, one prediction and one probability row
per input). A warm-up pass builds each (width, λ) model once before the timed phase.

Prints throughput (requests/s and images/s), latency p50/p95/p99/max (ms), and failures, then
the lines ``throughput_req_s``, ``latency_p50_ms``, ``latency_p99_ms`` and ``failures``
(``tools/bench_record.py`` stores them); exits non-zero if any request failed or the server did not stop cleanly. The server is stopped with
SIGTERM (uvicorn's graceful shutdown) at the end.

    python bench/serve_load.py                        # 8 workers, 10 s, batch 8, λ ∈ {0, .25, .5, .75, 1}
    python bench/serve_load.py --run runs/<name> --workers 16 --requests 2000
    python bench/serve_load.py --continuous-lambda    # any λ in [0, 1]: defeats the model cache

``--continuous-lambda`` draws λ uniformly: each request then builds a new mixture unless it hits
the run's 64-entry model cache, which shows what uncached serving costs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_tiny_run(out_dir: Path) -> Path:
    """A 1-round, 4-client Split-Mix run (half the clients adversarial, so λ ∈ [0, 1] is served),
    trained in-process with the real client code (the test suite's in-process grid)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import InProcessGrid  # noqa: E402  (sets Flower's task identity for messages)

    from server.federation import run_federation
    from splitmix.config import load_config

    cfg = load_config(
        None,
        {
            "num-clients": 4,
            "num-rounds": 1,
            "local-epochs": 1,
            "pgd-steps": 1,
            "eval-pgd-steps": 1,
            "eval-lambdas": "0,1",
            "out-dir": str(out_dir),
            "run-name": "serve-load",
        },
    )
    return run_federation(InProcessGrid(4), cfg, report=lambda text: print(f"  train: {text}", file=sys.stderr))


class Server:
    """``splitmix serve`` in its own process group on a free loopback port."""

    def __init__(self, run: Path, compile: bool, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        args = [sys.executable, "-m", "splitmix.cli", "serve", str(run), "--host", "127.0.0.1", "--port", str(self.port)]
        if compile:
            args.append("--compile")
        with open(log, "w") as out:
            self.proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 120.0) -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout:.0f}s:\n{self.log.read_text()[-2000:]}")

    def stop(self, grace: float = 15.0) -> tuple[int | None, bool]:
        """SIGTERM, then SIGKILL after ``grace`` s; returns (exit code, stopped cleanly).

        uvicorn shuts down gracefully on SIGTERM and then re-raises the signal, so a clean stop
        exits with −15 after logging "Application shutdown complete"."""
        if self.proc.poll() is not None:  # died before we asked
            return self.proc.returncode, False
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10), False
        clean = code in (0, -signal.SIGTERM) and "Application shutdown complete" in self.log.read_text()
        return code, clean


def lambda_levels(models: dict, lambdas: list[float] | None) -> list[float]:
    lo, hi = models["robustness_range"]
    if lambdas is None:
        return [lo, hi]
    return [lam for lam in lambdas if lo <= lam <= hi] or [lo]


def make_requests(models: dict, count: int, batch: int, lambdas: list[float] | None, seed: int) -> list[dict]:
    """``count`` request bodies: widths cycle through the served ones, λ from ``lambdas`` (or
    uniform in the served range), base selection 'first' or 'best', random images in [0, 1]."""
    rng = random.Random(seed)
    gen = np.random.default_rng(seed)
    widths = [row["width"] for row in models["widths"]]
    lo, hi = models["robustness_range"]
    levels = lambda_levels(models, lambdas)
    pool = [gen.random((batch, *models["input_shape"]), dtype=np.float32).round(4).tolist() for _ in range(4)]
    bodies = []
    for i in range(count):
        lam = rng.uniform(lo, hi) if lambdas is None else rng.choice(levels)
        bodies.append({"width": widths[i % len(widths)], "robustness": lam, "select": rng.choice(("first", "best")), "inputs": pool[i % len(pool)]})
    return bodies


def warm_up_requests(models: dict, batch: int, lambdas: list[float] | None) -> list[dict]:
    """Every (width, λ level, selection) once."""
    inputs = np.random.default_rng(12345).random((batch, *models["input_shape"]), dtype=np.float32).round(4).tolist()
    return [
        {"width": row["width"], "robustness": lam, "select": select, "inputs": inputs}
        for row in models["widths"]
        for lam in lambda_levels(models, lambdas)
        for select in ("first", "best")
    ]


def check_reply(body: dict, reply: httpx.Response) -> str | None:
    if reply.status_code != 200:
        return f"HTTP {reply.status_code}: {reply.text[:200]}"
    data = reply.json()
    n = len(body["inputs"])
    if abs(data.get("width", -1) - body["width"]) > 1e-9 or abs(data.get("robustness", -1) - body["robustness"]) > 1e-9:
        return f"asked width {body['width']} λ {body['robustness']}, got {data.get('width')} λ {data.get('robustness')}"
    if len(data.get("predictions", [])) != n or len(data.get("probabilities", [])) != n:
        return f"{len(data.get('predictions', []))} predictions for {n} inputs"
    return None


def drive(url: str, bodies_for_worker: list[list[dict]], duration: float | None, timeout: float) -> tuple[list[float], list[str], float]:
    """Each worker thread sends its bodies in a loop for ``duration`` seconds, or (None) once
    through. Returns all latencies (s), failure descriptions, and the wall time."""
    latencies: list[list[float]] = [[] for _ in bodies_for_worker]
    failures: list[list[str]] = [[] for _ in bodies_for_worker]
    start_gate = threading.Barrier(len(bodies_for_worker) + 1)
    deadline: float | None = None  # set before the gate opens

    def worker(i: int) -> None:
        bodies = bodies_for_worker[i]
        payloads = [json.dumps(b).encode() for b in bodies]  # serialised once, outside the timing
        with httpx.Client(base_url=url, timeout=timeout, headers={"content-type": "application/json"}) as client:
            start_gate.wait()
            j = 0
            while True:
                if deadline is None and j >= len(bodies):
                    return
                if deadline is not None and time.perf_counter() >= deadline:
                    return
                body, payload = bodies[j % len(bodies)], payloads[j % len(bodies)]
                t0 = time.perf_counter()
                try:
                    reply = client.post("/predict", content=payload)
                    problem = check_reply(body, reply)
                except (httpx.HTTPError, ValueError) as err:
                    problem = f"{type(err).__name__}: {err}"
                latencies[i].append(time.perf_counter() - t0)
                if problem:
                    failures[i].append(problem)
                j += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(bodies_for_worker))]
    for t in threads:
        t.start()
    start = time.perf_counter()
    if duration is not None:
        deadline = start + duration
    start_gate.wait()  # all clients created: go
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return [x for xs in latencies for x in xs], [f for fs in failures for f in fs], elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a finished run folder (default: train a tiny one)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of timed load (ignored with --requests)")
    parser.add_argument("--requests", type=int, default=0, help="send exactly this many requests in total instead")
    parser.add_argument("--batch", type=int, default=8, help="images per request")
    parser.add_argument("--lambdas", default="0,0.25,0.5,0.75,1", help="λ levels clients ask for")
    parser.add_argument("--continuous-lambda", action="store_true", help="λ uniform in the served range instead")
    parser.add_argument("--compile", action="store_true", help="pass --compile to splitmix serve")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.workers < 1 or args.batch < 1:
        parser.error("--workers and --batch must be at least 1")

    scratch = Path(tempfile.mkdtemp(prefix="serve-load-"))
    run = args.run
    if run is None:
        t0 = time.perf_counter()
        run = train_tiny_run(scratch / "runs")
        print(f"trained a tiny run in {time.perf_counter() - t0:.1f}s: {run}")
    server = Server(run, args.compile, scratch / "server.log")
    try:
        print(f"server ready in {server.wait_ready():.1f}s at {server.url} (pid {server.proc.pid})")
        models = httpx.get(f"{server.url}/models", timeout=10).json()
        widths = [row["width"] for row in models["widths"]]
        lambdas = None if args.continuous_lambda else [float(v) for v in args.lambdas.split(",") if v.strip()]
        print(
            f"run {run.name}: {models['method']}, widths {', '.join(f'{w:g}' for w in widths)}, "
            f"λ range {models['robustness_range']}, input {'×'.join(map(str, models['input_shape']))}"
        )

        # Warm-up: every (width, λ level, select) once, so the timed phase measures serving, not building.
        warm = warm_up_requests(models, args.batch, lambdas)
        t0 = time.perf_counter()
        _, warm_failures, _ = drive(server.url, [warm[i :: args.workers] for i in range(args.workers)], None, args.timeout)
        print(f"warm-up: {len(warm)} requests in {time.perf_counter() - t0:.1f}s, {len(warm_failures)} failed")

        per_worker = max(1, -(-args.requests // args.workers)) if args.requests else 256
        bodies = make_requests(models, per_worker * args.workers, args.batch, lambdas, args.seed)
        split = [bodies[i :: args.workers] for i in range(args.workers)]
        if args.requests:  # exactly --requests in total
            split = [b[: args.requests // args.workers + (1 if i < args.requests % args.workers else 0)] for i, b in enumerate(split)]
        latencies, failures, elapsed = drive(server.url, split, None if args.requests else args.duration, args.timeout)
        failures = warm_failures + failures
    finally:
        code, graceful = server.stop()

    ms = np.asarray(latencies) * 1000.0
    count = len(latencies)
    print(
        f"load: {args.workers} workers, {count} requests × {args.batch} images in {elapsed:.2f}s "
        f"({'λ continuous' if lambdas is None else 'λ ∈ {' + ', '.join(f'{v:g}' for v in lambdas) + '}'}, "
        f"{len(widths)} widths, select first/best)"
    )
    print(f"throughput: {count / elapsed:.1f} req/s, {count * args.batch / elapsed:.0f} images/s")
    if count:
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        print(f"latency ms: p50 {p50:.1f}  p95 {p95:.1f}  p99 {p99:.1f}  max {ms.max():.1f}  mean {ms.mean():.1f}")
    print(f"server stopped: exit code {code}, {'graceful shutdown on SIGTERM' if graceful else 'NOT clean'}")
    for problem in failures[:5]:
        print(f"  failure: {problem}")
    print(f"throughput_req_s: {count / elapsed:.1f}")
    if count:
        print(f"latency_p50_ms: {p50:.1f}")
        print(f"latency_p99_ms: {p99:.1f}")
    print(f"failures: {len(failures)}")
    ok = not failures and graceful and count > 0
    if ok:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    else:
        print(f"server log: {scratch / 'server.log'}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
