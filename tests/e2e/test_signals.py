"""SIGTERM ends `splitmix simulate` within seconds, with every Ray process it started, keeping
the last completed round's checkpoint (server/shutdown.py); after a SIGKILL the next run ends
the Ray processes left behind. The helpers are tested on plain processes (fast); the signals on
real runs (slow: Ray starts in 30-90 s on a busy 2-core machine)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.shutdown import _stat, descendants, kill_tree, orphaned_ray_processes, reap_orphaned_ray_processes

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"  # a zombie has ended (this container's init may never reap it)


def _wait_until(condition, deadline_s: float, what: str) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline_s:.0f} s: {what}")
        time.sleep(0.1)


def _sigkill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def test_kill_tree_ends_every_descendant_but_not_the_root():
    # root shell → sleep, subshell → 2 sleeps; once they are killed the root starts one more sleep
    root = subprocess.Popen(["bash", "-c", "sleep 300 & (sleep 300 & sleep 300 & wait) & wait; sleep 300"], start_new_session=True)
    try:
        _wait_until(lambda: len(descendants(root.pid)) == 4, 60, "the shell's 4 descendants started")
        below = descendants(root.pid)
        assert kill_tree(root.pid) == 4
        _wait_until(lambda: not any(_alive(pid) for pid in below), 30, "the killed descendants gone")
        assert root.poll() is None and _alive(root.pid)
    finally:
        os.killpg(root.pid, signal.SIGKILL)
        root.wait()


def _spawn_detached(env_pid: int, title: str) -> int:
    """A ``sleep`` named ``title`` with RAY_RAYLET_PID=``env_pid``, orphaned (its shell exits)."""
    out = subprocess.run(
        ["bash", "-c", f'(export RAY_RAYLET_PID={env_pid}; exec -a "{title}" sleep 300) >/dev/null 2>&1 & echo $!'],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


def test_orphaned_ray_processes_are_those_whose_raylet_is_gone():
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs: a killed run's raylet
    raylet = subprocess.Popen(["bash", "-c", "exec -a raylet sleep 300"])  # a live session's raylet
    # a raylet's child, whatever its RAY_RAYLET_PID says (a pid of another namespace, say)
    parent = subprocess.Popen(
        ["bash", "-c", f'(export RAY_RAYLET_PID={gone.pid}; exec -a "ray::IDLE" sleep 300) >/dev/null 2>&1 & echo $!; exec -a raylet sleep 300'],
        stdout=subprocess.PIPE,
        text=True,
    )
    spawned = []
    try:
        child = int(parent.stdout.readline())  # type: ignore[union-attr]
        spawned.append(child)
        for pid in (raylet.pid, parent.pid):
            _wait_until(lambda pid=pid: _cmd(pid).startswith("raylet"), 30, "the fake raylets named")
        orphan = _spawn_detached(gone.pid, "ray::DashboardAgent")
        live = _spawn_detached(raylet.pid, "ray::RuntimeEnvAgent")
        other = _spawn_detached(gone.pid, "sleep")  # not a Ray process: never touched
        spawned += [orphan, live, other]
        for pid in (orphan, child):
            _wait_until(lambda pid=pid: _cmd(pid).startswith("ray::"), 30, "the fake Ray processes named")
        found = orphaned_ray_processes()
        assert orphan in found and live not in found and other not in found and child not in found
        assert orphan in reap_orphaned_ray_processes()
        _wait_until(lambda: not _alive(orphan), 30, "the orphan ended")
        assert _alive(live) and _alive(other) and _alive(child)
    finally:
        _sigkill(spawned)
        for proc in (raylet, parent):
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------------- real runs
TINY = "num-clients=2 local-epochs=1 pgd-steps=1 eval-pgd-steps=1 eval-lambdas='0,1'"


def _simulate(args: list[str], log: Path) -> subprocess.Popen:
    """``splitmix simulate ARGS`` in its own process group, its output to ``log`` (a file: a pipe
    nobody reads while the run goes on could fill up and stall it)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "splitmix.cli", "simulate", *args],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _kill_group(proc: subprocess.Popen | None) -> None:
    """Teardown: the run's process group holds Ray's processes too (unless they left it)."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:  # the group is empty: everything ended
        pass
    proc.wait()


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _sessions(pids) -> set[str]:
    """Ray session names (``session_<date>_<time>_<pid>``) in these processes' command lines."""
    return {m for pid in pids for m in re.findall(r"session_\d{4}-\d\d-\d\d_[\d_-]+\d", _cmd(pid))}


def _stop_and_check(proc: subprocess.Popen, expect: set[str], sig: signal.Signals = signal.SIGTERM) -> float:
    """Signal ``proc``; assert it exits with 128 + ``sig`` within 60 s, and that no process of its Ray
    session is left: neither one listed before the signal nor any other carrying its raylet's
    pid or session folder. ``expect``: names the listing must hold (the check is not vacuous)."""
    before = descendants(proc.pid)
    names = " ".join(_cmd(pid) for pid in before)
    assert all(name in names for name in expect), names
    raylets = [pid for pid in before if "raylet" in _cmd(pid).split(" ")[0]]
    sessions = _sessions(before)
    assert raylets and sessions
    sent = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"splitmix simulate still runs 60 s after {sig.name}") from None
    took = time.monotonic() - sent
    assert proc.returncode == 128 + sig, f"exit code {proc.returncode}"

    def leftovers() -> list[int]:
        from server.shutdown import _environ, _pids

        mine = [pid for pid in before if _alive(pid)]
        for pid in _pids():
            if not _alive(pid) or pid in mine:
                continue
            if any(_environ(pid).get("RAY_RAYLET_PID") == str(r) for r in raylets) or any(s in _cmd(pid) for s in sessions):
                mine.append(pid)
        return mine

    _wait_until(lambda: not leftovers(), 30, f"no process of the run's Ray session left: {[(p, _cmd(p)[:60]) for p in leftovers()]}")
    return took


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_after_round_1_stops_within_seconds_and_the_run_resumes(tmp_path):
    from server.store import load_checkpoint

    run = tmp_path / "run"
    rounds = 4  # the signal follows the first checkpoint by a fraction of a second; a round takes > 1 s
    proc = _simulate(["--run-config", f"{TINY} num-rounds={rounds} out-dir='{tmp_path}' run-name=run"], tmp_path / "run.log")
    resumed = None
    try:
        _wait_until(lambda: (run / "checkpoint.safetensors").exists() or proc.poll() is not None, 600, "round 1's checkpoint written")
        assert proc.poll() is None, "the run ended before round 1's checkpoint"
        took = _stop_and_check(proc, {"raylet", "gcs_server", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::ClientAppActor"})
        print(f"\nSIGTERM after round 1: exited after {took:.1f} s")
        _, _, saved = load_checkpoint(run / "checkpoint.safetensors")
        done = int(saved["round"])
        assert 1 <= done < rounds

        assert "stopped by SIGTERM" in (tmp_path / "run.log").read_text()
        resumed = _simulate(["--resume", str(run)], tmp_path / "resume.log")
        resumed.wait(timeout=600)
        out = (tmp_path / "resume.log").read_text()
        assert resumed.returncode == 0, out
        assert out.strip().splitlines()[-1] == str(run)
        assert f"after round {done}/{rounds}" in " ".join(out.split())  # "resuming RUN after round 1/4" (folded by rich)
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [row["round"] for row in metrics] == list(range(1, rounds + 1))
        assert (run / "model.safetensors").stat().st_size > 0
    finally:
        _kill_group(proc)
        _kill_group(resumed)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])  # Ray takes SIGTERM during ray.init, not SIGINT
def test_a_signal_while_ray_starts_stops_within_seconds(tmp_path, sig):
    proc = _simulate(["--run-config", f"{TINY} num-rounds=2 out-dir='{tmp_path}' run-name=run"], tmp_path / "run.log")
    try:  # Ray's GCS and raylet run, the clients are not ready: ray.init (or Flower's start) is under way
        _wait_until(
            lambda: any("raylet" in _cmd(p).split(" ")[0] for p in descendants(proc.pid)) or proc.poll() is not None, 600, "Ray's raylet started"
        )
        assert proc.poll() is None
        took = _stop_and_check(proc, {"raylet", "gcs_server"}, sig)
        print(f"\n{sig.name} while Ray starts: exited after {took:.1f} s")
        assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
        assert f"stopped by {sig.name}" in (tmp_path / "run.log").read_text()
    finally:
        _kill_group(proc)
