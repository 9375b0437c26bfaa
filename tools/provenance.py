"""Where a result came from: code version, package versions, machine, date, wall time, command.

``provenance(started, wall_s, command)`` returns a JSON-ready record (``commit``, ``dirty``,
``versions``, ``machine``, ``date`` in UTC ISO 8601, ``wall_s``, ``command``); ``splitmix experiment``
puts it in every method entry of ``comparison.json`` so a committed result names the commit,
the hardware and the command that produced it. Nothing here fails: what cannot be found is
``"unknown"`` (git) or ``None`` (packages, machine details).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "torchvision", "flwr", "numpy", "ray", "flwr-datasets")


def _git(*args: str, root: Path = ROOT) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(root: Path = ROOT) -> dict[str, Any]:
    """``{"commit": <HEAD sha>, "dirty": <uncommitted changes to tracked files?>}``; ``"unknown"``/``None`` outside a checkout."""
    head = _git("rev-parse", "HEAD", root=root)
    if head is None:
        return {"commit": "unknown", "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no", root=root)  # new files (run folders, records) change no code
    return {"commit": head.strip(), "dirty": None if status is None else bool(status.strip())}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _total_ram_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def _gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    try:
        return str(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 (a broken driver must not fail the record)
        return None


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine() or None,
        "cpu_count": os.cpu_count(),
        "ram_bytes": _total_ram_bytes(),
        "gpu": _gpu_name(),
    }


def utc_iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds")


def provenance(started: float, wall_s: float, command: str) -> dict[str, Any]:
    """The record for a result: ``started`` is a ``time.time()`` stamp, ``wall_s`` seconds."""
    return {
        **git_state(),
        "versions": package_versions(),
        "machine": machine(),
        "date": utc_iso(started),
        "wall_s": float(wall_s),
        "command": command,
    }
