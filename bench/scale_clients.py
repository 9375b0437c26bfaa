"""Start-up, round time and server memory against the number of clients (default 1,000 and 100,000).

Each size runs in a fresh subprocess (``splitmix simulate``'s engine: Flower's Simulation
Engine on a local Ray instance) with the same rounds: ``--rounds`` rounds in which
``--train-per-round`` clients train (``fraction-train = train/clients``), clean evaluation only.
Reported per size:

- peak RSS of the *server* process — the driver that runs ``run_simulation``: the ServerApp
  (strategy, round loop, evaluation) and Flower's in-process SuperLink state and simulation
  engine — from ``getrusage(RUSAGE_SELF).ru_maxrss``;
- peak RSS of the client actors (``ray::ClientAppActor`` processes under this driver), summed,
  sampled every 0.25 s — separate processes, not server memory;
- start-up: from the ``simulate()`` call until the server is ready to train (Ray, Flower's
  registration of the nodes, the derived profiles; no message per node), the per-round train
  seconds (round 1 also starts the actors), and total wall time. ``startup_s_<n>:``,
  ``steady_round_s_<n>:``, ``examples_per_round_<n>:`` (the examples the round's clients hold)
  and ``round_vs_smallest:`` (steady-state train round at the largest size / at the smallest) are
  printed before the last line. Evaluation: the same seeded 100 clients, final round only.

The last line is ``rss_growth: X`` with X = peak RSS at the largest size / peak RSS at the
smallest − 1 (target X < 0.25).

Data: an MNIST-format folder written here (the digits images upsampled to 28×28 with noise,
60,000 train / 2,000 test images), IID over the clients. At 100,000 clients 40,000 hold no
example (never sampled) and the rest hold one, on which the recipe takes no step (BatchNorm needs
two): there a round measures the framework's own cost per sampled client, not training.

``--trace`` records tracemalloc snapshots in the server process after start-up and after the
last round (slow: use it with fewer clients, e.g. ``--clients 100,2000``) and prints which
allocation sites grow with the number of clients (largest size minus smallest).

    python bench/scale_clients.py                          # 1,000 and 100,000 clients, 3 rounds
    python bench/scale_clients.py --clients 100,1000,2000 --trace
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- data
def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    with open(path, "wb") as fh:
        fh.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        fh.write(array.astype(np.uint8).tobytes())


def write_mnist_like(root: Path, train: int = 60_000, test: int = 2_000, seed: int = 0) -> Path:
    """An MNIST raw folder from scikit-learn's digits (8×8 → 28×28, noise): learnable, offline."""
    import torch
    from sklearn.datasets import load_digits
    from torch.nn import functional as F

    raw = root / "MNIST" / "raw"
    if (raw / "t10k-labels-idx1-ubyte").exists():
        return root
    raw.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    images = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)[:, 0].numpy()
    rng = np.random.default_rng(seed)
    for prefix, count in (("train", train), ("t10k", test)):
        pick = rng.integers(0, len(images), count)
        x = np.clip(images[pick] + rng.normal(0.0, 0.1, (count, 28, 28)), 0.0, 1.0) * 255.0
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", x.round(), 2051)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", digits.target[pick], 2049)
    return root


# --------------------------------------------------------------------------- child: one size
def _rss_kib(pid: int | str = "self") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


class Monitor(threading.Thread):
    """Samples this process's RSS and its Ray actors' RSS; prints a progress line now and then."""

    def __init__(self, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.every = every
        self.stop = threading.Event()
        self.peak_self = 0
        self.peak_actors = 0
        self.peak_actor = 0
        self.peak_ray_other = 0
        self.phase = "start"
        self.started = time.perf_counter()

    def run(self) -> None:
        me = os.getpid()
        last_print = 0.0
        while not self.stop.wait(self.every):
            self.peak_self = max(self.peak_self, _rss_kib())
            actors, other = [], 0
            for pid in _descendants(me):
                try:
                    name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                except OSError:
                    continue
                if name.startswith("ray::ClientAppActor"):
                    actors.append(_rss_kib(pid))
                else:
                    other += _rss_kib(pid)
            self.peak_actors = max(self.peak_actors, sum(actors))
            self.peak_actor = max(self.peak_actor, max(actors, default=0))
            self.peak_ray_other = max(self.peak_ray_other, other)
            now = time.perf_counter() - self.started
            if now - last_print >= 30:
                last_print = now
                print(
                    json.dumps(
                        {
                            "progress": round(now),
                            "phase": self.phase,
                            "rss_mib": _rss_kib() / 1024,
                            "peak_rss_mib": self.peak_self / 1024,
                            "actors_mib": sum(actors) / 1024,
                        }
                    ),
                    flush=True,
                )


def child(args: argparse.Namespace) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from server.simulation import simulate
    from splitmix.config import load_config
    from splitmix.data import partition_sizes

    n = args.clients_one
    base = {"dataset": "mnist", "data-root": str(args.data), "num-clients": n}
    trainable = int(partition_sizes(load_config(None, base).data_config()).trainable().sum())  # clients with data
    cfg = load_config(
        None,
        {
            "dataset": "mnist",
            "data-root": str(args.data),
            "num-clients": n,
            "num-rounds": args.rounds,
            "fraction-train": min(1.0, args.train_per_round / trainable),  # of the clients that hold data
            "min-train-clients": 2,
            "local-epochs": 1,
            "adv-fraction": 0.0,
            "eval-lambdas": "0",
            "eval-pgd-steps": 0,
            "eval-every": args.rounds,  # the final round only
            "eval-clients": min(n, 100),  # the same seeded 100-client evaluation at every size
            "out-dir": str(args.out),
            "run-name": f"clients-{n}",
            "round-timeout": 3600,
        },
    )
    monitor = Monitor()
    snapshots: dict[str, object] = {}
    if args.trace:
        import tracemalloc

        tracemalloc.start(8)
    base_rss = _rss_kib()
    monitor.start()
    events: list[tuple[float, str]] = []
    rss_at: dict[str, float] = {}

    def report(text: str) -> None:
        events.append((time.perf_counter() - monitor.started, text))
        rss_at["ready" if "clients ready" in text else "last"] = _rss_kib() / 1024
        print(json.dumps({"event": text, "t": round(events[-1][0], 1), "rss_mib": _rss_kib() / 1024}), flush=True)
        monitor.phase = text.split(";")[0][:40]
        if args.trace and ("clients ready" in text or text.startswith(f"round {args.rounds:>3}/")):
            import gc
            import tracemalloc

            gc.collect()
            key = "ready" if "clients ready" in text else "last"
            path = Path(args.out) / f"trace-{n}-{key}.bin"
            tracemalloc.take_snapshot().dump(str(path))
            snapshots[key] = str(path)

    t0 = time.perf_counter()
    error = None
    try:
        run = simulate(cfg, report=report)
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        error, run = f"{type(err).__name__}: {err}", None
    wall = time.perf_counter() - t0
    monitor.stop.set()
    monitor.join()
    result: dict[str, object] = {
        "clients": n,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "sampled_peak_rss_mib": monitor.peak_self / 1024,
        "rss_before_run_mib": base_rss / 1024,
        "rss_ready_mib": rss_at.get("ready"),  # after the profile query to every node
        "rss_last_round_mib": rss_at.get("last"),  # after the last round (outside evaluation)
        "actors_peak_mib": monitor.peak_actors / 1024,
        "actor_peak_mib": monitor.peak_actor / 1024,
        "ray_other_peak_mib": monitor.peak_ray_other / 1024,
        "wall_s": wall,
        "error": error,
        "traces": snapshots,
    }
    if run is not None:
        rounds = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((Path(run) / "summary.json").read_text())
        result.update(
            startup_s=summary["timing"]["startup_s"],
            ready_s=next((t for t, text in events if "clients ready" in text), None),
            round_train_s=[r["train-seconds"] for r in rounds],
            round_eval_s=[r["eval-seconds"] for r in rounds],
            valid=[r.get("valid", 0) for r in rounds],
            examples=[r.get("examples", 0) for r in rounds],
            accuracy=summary["widths"]["1.0"]["accuracy"],
        )
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- parent
def run_size(n: int, args: argparse.Namespace, data: Path, out: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--clients-one",
        str(n),
        "--rounds",
        str(args.rounds),
        "--train-per-round",
        str(args.train_per_round),
        "--data",
        str(data),
        "--out",
        str(out),
    ]
    if args.trace:
        cmd.append("--trace")
    print(f"--- {n} clients", flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    result: dict = {"clients": n, "error": "no result"}
    last: dict = {}
    deadline = time.monotonic() + args.timeout
    timer = threading.Timer(args.timeout, lambda: os.killpg(proc.pid, 9))
    timer.start()
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("RESULT "):
                result = json.loads(line[7:])
            elif line.startswith("{"):
                last = json.loads(line)
                print(f"    {line.strip()}", flush=True)
        proc.wait()
    finally:
        timer.cancel()
    if time.monotonic() > deadline and result.get("error") == "no result":
        result = {"clients": n, "error": f"killed after {args.timeout:.0f}s", "last": last, "peak_rss_mib": last.get("peak_rss_mib")}
    return result


def print_growth(results: list[dict], snapshots_key: str = "last") -> None:
    import tracemalloc

    small, large = results[0], results[-1]
    a, b = small.get("traces", {}).get(snapshots_key), large.get("traces", {}).get(snapshots_key)
    if not a or not b:
        return
    extra = large["clients"] - small["clients"]
    diff = tracemalloc.Snapshot.load(b).compare_to(tracemalloc.Snapshot.load(a), "lineno")
    total = sum(d.size_diff for d in diff)
    print(
        f"tracemalloc ({snapshots_key}): {total / 2**20:+.1f} MiB traced for +{extra} clients "
        f"({total / extra:,.0f} B per client); largest growing sites:"
    )
    for d in diff[:15]:
        frame = d.traceback[0]
        name = frame.filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
        print(f"  {d.size_diff / 2**20:+8.2f} MiB {d.count_diff:+9d} blocks  {d.size_diff / extra:8,.0f} B/client  {name}:{frame.lineno}")
    by_file = tracemalloc.Snapshot.load(b).compare_to(tracemalloc.Snapshot.load(a), "filename")
    print("  by file:")
    for d in by_file[:8]:
        name = d.traceback[0].filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
        print(f"  {d.size_diff / 2**20:+8.2f} MiB  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1000,100000", help="comma-separated sizes (first = baseline, last = compared)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-per-round", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per size before the child is killed")
    parser.add_argument("--trace", action="store_true", help="tracemalloc in the server process (slow)")
    parser.add_argument("--keep", type=Path, help="keep data and run folders here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--clients-one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0

    sizes = [int(v) for v in args.clients.split(",") if v.strip()]
    work = args.keep or Path(tempfile.mkdtemp(prefix="scale-clients-"))
    data = write_mnist_like(work / "data")
    results = []
    for n in sizes:
        result = run_size(n, args, data, work / "runs")
        results.append(result)
        if result.get("error"):
            print(f"{n:>6} clients: FAILED ({result['error']}); peak server RSS so far {result.get('peak_rss_mib')} MiB")
            continue
        rounds = ", ".join(f"{t:.2f}" for t in result["round_train_s"])
        steady = result["round_train_s"][1:] or result["round_train_s"]
        result["steady_round_s"] = sum(steady) / len(steady)
        print(
            f"{n:>6} clients: peak server RSS {result['peak_rss_mib']:.0f} MiB (before the run {result['rss_before_run_mib']:.0f}, "
            f"after start-up {result['rss_ready_mib']:.0f}, after the last round {result['rss_last_round_mib']:.0f}); "
            f"actors peak {result['actors_peak_mib']:.0f} MiB in all (largest {result['actor_peak_mib']:.0f}), other Ray processes "
            f"{result['ray_other_peak_mib']:.0f} MiB; start-up {result['ready_s']:.1f}s (simulate() call to clients ready; "
            f"profiles {result['startup_s']:.2f}s), rounds {rounds}s (train; round 1 starts the actors), "
            f"valid {result['valid']}, wall {result['wall_s']:.0f}s, acc@1 {result['accuracy']:.3f}",
            flush=True,
        )
    if args.trace:
        print_growth(results, "ready")
        print_growth(results, "last")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    a, b = results[0], results[-1]
    if len(results) > 1 and not a.get("error") and not b.get("error"):
        # The peak includes the server's evaluation, which does not depend on the client count;
        # the RSS after the last round shows what the clients themselves cost the server.
        extra = b["clients"] - a["clients"]
        delta = b["rss_last_round_mib"] - a["rss_last_round_mib"]
        print(
            f"server RSS after the last round (outside evaluation): {a['rss_last_round_mib']:.0f} → {b['rss_last_round_mib']:.0f} MiB "
            f"({delta:+.0f} MiB, {delta * 2**20 / extra / 1024:.1f} KiB per added client, "
            f"growth {b['rss_last_round_mib'] / a['rss_last_round_mib'] - 1:.3f})"
        )
        for r in results:  # figures as `key: number` lines (tools/bench_record.py)
            print(f"startup_s_{r['clients']}: {r['ready_s']:.1f}")
            print(f"steady_round_s_{r['clients']}: {r['steady_round_s']:.2f}")
            print(f"examples_per_round_{r['clients']}: {statistics.mean(r['examples']):.0f}")
        ratio = b["steady_round_s"] / a["steady_round_s"]
        print(f"steady-state train round, {b['clients']} vs {a['clients']} clients:")
        print(f"round_vs_smallest: {ratio:.2f}")
    first, last = results[0].get("peak_rss_mib"), results[-1].get("peak_rss_mib")
    if not first or not last or results[-1].get("error"):
        print("rss_growth: nan")
        return 1
    print(f"rss_growth: {last / first - 1:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
