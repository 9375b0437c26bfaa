"""Stopping ``splitmix simulate`` on SIGTERM/SIGINT at once, without leaving Ray processes behind.

Why this is needed (measured with Ray 2.55 and Flower 1.42): ``ray.init`` replaces the driver's
SIGTERM handler with ``sys.exit``, and once its core worker is up a C++ handler aborts on SIGTERM.
The first lands a SystemExit in Flower's main thread while Flower's ServerApp thread (not a
daemon) keeps waiting for replies, so a driver signalled while Ray was starting ran on for more
than 120 s; the second kills the driver without cleanup. And a driver that dies without cleanup
(an abort, SIGKILL) leaves Ray's DashboardAgent and RuntimeEnvAgent running for about a minute:
its raylet and gcs_server die with it (Ray starts them with a parent-death signal), the agents
notice the dead raylet but first wait for the dead GCS.

What this module does instead: :func:`stop_on_signals` installs one handler for SIGTERM and SIGINT
(:meth:`SignalGuard.install` puts it back after ``ray.init`` took SIGTERM) that freezes and kills
every process below the driver (gcs_server, raylet, the agents, the workers: all are its
descendants when it started Ray itself; a joined cluster's processes are not, and are left alone),
says so in one line on stderr and ends the driver with exit code 128 + the signal. The server
writes every file it keeps atomically or line by line (``server/store.py``), so the last completed
round's ``checkpoint.safetensors`` stays and ``splitmix simulate --resume`` continues from it.
After a SIGKILL nothing in the driver runs; :func:`reap_orphaned_ray_processes` (called when the
next simulation starts) ends the Ray processes whose raylet is gone.

Linux only (``/proc``); elsewhere the helpers find no processes and the signals keep Ray's handling.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PROC = "/proc"


def _stat(pid: int) -> tuple[str, int] | None:
    """``(state, parent pid)`` of a live process, or None (gone, or not readable)."""
    try:
        with open(f"{_PROC}/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir(_PROC) if name.isdigit()]
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, …), parents first."""
    children: dict[int, list[int]] = {}
    for child in _pids():
        stat = _stat(child)
        if stat is not None and stat[0] != "Z":
            children.setdefault(stat[1], []).append(child)
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop(0)
        found.append(child)
        todo += children.get(child, [])
    return found


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
    except OSError:  # already gone (or never ours)
        return False
    return True


def kill_tree(pid: int) -> int:
    """SIGKILL every process below ``pid``; returns how many. The tree is frozen first (SIGSTOP,
    repeated until no new process turns up), so a raylet cannot start a worker between the
    listing and the kill, and no process is orphaned out of the listing."""
    frozen: set[int] = set()
    while True:
        new = [child for child in descendants(pid) if child not in frozen]
        if not new:
            break
        for child in new:
            _signal(child, signal.SIGSTOP)
            frozen.add(child)
    return sum(_signal(child, signal.SIGKILL) for child in frozen)


def _environ(pid: int) -> dict[str, str]:
    try:
        with open(f"{_PROC}/{pid}/environ", "rb") as fh:
            raw = fh.read()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _cmdline(pid: int) -> str:
    try:
        with open(f"{_PROC}/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _is_raylet(pid: int) -> bool:
    """A live raylet; a dying one counts as gone: its leader thread is a zombie while its other
    threads still exit, and its command line stays readable until the last one has."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z" and "raylet" in _cmdline(pid).split(" ", 1)[0]


def _pid_namespace(pid: int) -> str:
    try:
        return os.readlink(f"{_PROC}/{pid}/ns/pid")
    except OSError:
        return ""


def orphaned_ray_processes() -> list[int]:
    """This user's Ray agents and workers (process title ``ray::…``) whose raylet is gone: what
    a killed driver leaves behind. Never listed: a process whose parent is a raylet, or whose
    raylet (``RAY_RAYLET_PID``) still runs, since it belongs to a live Ray session (another run,
    a cluster), and a process in another pid namespace (a container), whose pids mean other
    processes."""
    uid, me, found = os.getuid(), os.getpid(), []
    namespace = _pid_namespace(me)
    for pid in _pids():
        stat = _stat(pid)
        if pid == me or stat is None or not _cmdline(pid).startswith("ray::"):
            continue
        try:
            if os.stat(f"{_PROC}/{pid}").st_uid != uid or _pid_namespace(pid) != namespace:
                continue
        except OSError:
            continue
        raylet = _environ(pid).get("RAY_RAYLET_PID", "")
        if raylet.isdigit() and not _is_raylet(int(raylet)) and not _is_raylet(stat[1]):
            found.append(pid)
    return found


def reap_orphaned_ray_processes() -> list[int]:
    """SIGKILL :func:`orphaned_ray_processes`; returns the pids that were signalled."""
    return [pid for pid in orphaned_ray_processes() if _signal(pid, signal.SIGKILL)]


class SignalGuard:
    """The SIGTERM/SIGINT handler of a simulation run (see the module docstring)."""

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}

    def install(self) -> None:
        """(Re-)install the handler; only the main thread can, elsewhere this does nothing."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            old = signal.signal(sig, self._handle)
            self.previous.setdefault(sig, old)

    def restore(self) -> None:
        for sig, old in self.previous.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self.previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.stop(signum)

    def stop(self, signum: int) -> None:
        """End every process below this one, then this one (exit code 128 + ``signum``)."""
        for sig in STOP_SIGNALS:  # a second Ctrl-C while stopping must not interrupt the cleanup
            signal.signal(sig, signal.SIG_IGN)
        killed = kill_tree(os.getpid())
        name = signal.Signals(signum).name
        message = (
            f"stopped by {name}: ended {killed} Ray process(es); the run folder (if one was made) keeps the last completed round's "
            "checkpoint.safetensors (continue with `splitmix simulate --resume RUN`)\n"
        )
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os.write(2, message.encode())
        os._exit(128 + signum)  # Flower's ServerApp thread cannot be stopped from here; nothing it writes is torn


@contextmanager
def stop_on_signals() -> Iterator[SignalGuard]:
    """SIGTERM/SIGINT end the run and its Ray processes at once while inside this block."""
    guard = SignalGuard()
    guard.install()
    try:
        yield guard
    finally:
        guard.restore()
