"""The run folder: everything one run produces, in one place.

```
runs/<name>/
  config.json          resolved run config (+ Split-Mix spec) — enough to repeat the run
  metrics.jsonl        one JSON object per round (training, communication, accuracy per width)
  metrics.csv          the same, flat, for spreadsheets
  events.jsonl         rejected replies, failed clients, failed rounds (only when there are any)
  model.safetensors    final global weights (all bases, "base{i}.<path>"), written atomically
  summary.json         per-width accuracy / robust accuracy / params / MACs
  checkpoint.safetensors  the last completed round: global weights, strategy state, RNG states
                       (one file, replaced atomically each round; `splitmix simulate --resume`)
  rewind.safetensors   the served weights after round `rewind-round` (early training; IMP in
                       `splitmix prune` rewinds to them), written once; none when rewind-round = 0
  accuracy_per_width.png, robustness.png
```
JSON, CSV and weights are written via a temporary file and ``os.replace`` (fsynced), so a crash
never leaves a torn file; ``metrics.jsonl`` and ``events.jsonl`` are appended line by line.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
REWIND = "rewind.safetensors"
CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "splitmix-checkpoint-1"


def _atomic_write(path: Path, write) -> None:
    """Write to a temp file in the same folder, fsync it, rename over ``path``, fsync the folder."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load safetensors weights; a damaged file is reported as such (nothing is unpickled)."""
    if not path.is_file():
        raise FileNotFoundError(f"no weights at '{path}'")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"checkpoint '{path}' is damaged or not a safetensors file: {err}") from None


def save_checkpoint(path: Path, weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], state: dict) -> None:
    """One file holding everything a resumed run needs (weights under ``weights/``, other
    tensors such as RNG states under ``extra/``, the JSON ``state`` in the header), written via a
    temporary file + fsync + rename: a crash at any point leaves the previous checkpoint intact."""
    out = {f"weights/{k}": v.detach().cpu().contiguous() for k, v in weights.items()}
    out.update({f"extra/{k}": v.detach().cpu().contiguous() for k, v in tensors.items()})
    metadata = {"format": CHECKPOINT_FORMAT, "round": str(state["round"]), "state": json.dumps(state, sort_keys=True)}
    _atomic_write(path, lambda tmp: save_file(out, str(tmp), metadata=metadata))


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """``(weights, tensors, state)`` of :func:`save_checkpoint`; a damaged file raises ValueError."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at '{path}'")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            if metadata.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"format {metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
            state = json.loads(metadata["state"])
            weights: dict[str, torch.Tensor] = {}
            tensors: dict[str, torch.Tensor] = {}
            for key in fh.keys():
                group, name = key.split("/", 1)
                (weights if group == "weights" else tensors)[name] = fh.get_tensor(key)
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise ValueError(f"checkpoint '{path}' is damaged or not a checkpoint: {err}") from None
    return weights, tensors, state


class RunStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    @classmethod
    def create(cls, out_dir: str | Path, run_name: str = "") -> RunStore:
        name = run_name or time.strftime("%Y%m%d-%H%M%S")
        root = Path(out_dir) / name
        suffix = 1
        while root.exists() and not run_name:
            suffix += 1
            root = Path(out_dir) / f"{name}-{suffix}"
        return cls(root.resolve())

    def write_json(self, name: str, data: Any) -> Path:
        path = self.root / name
        _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))
        return path

    def append_round(self, row: dict[str, Any]) -> None:
        with open(self.root / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")

    def append_events(self, server_round: int, problems: list[str]) -> None:
        """Rejected replies, failed clients and failed rounds, one JSON line each (events.jsonl)."""
        if not problems:
            return
        with open(self.root / "events.jsonl", "a") as fh:
            for problem in problems:
                fh.write(json.dumps({"round": server_round, "problem": problem}) + "\n")

    def rounds(self) -> list[dict[str, Any]]:
        path = self.root / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_csv(self) -> Path:
        rows = self.rounds()
        path = self.root / "metrics.csv"
        columns = sorted({key for row in rows for key in row})

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)

        _atomic_write(path, write)
        return path

    def save_checkpoint(self, weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], state: dict) -> Path:
        path = self.root / CHECKPOINT
        save_checkpoint(path, weights, tensors, state)
        return path

    def load_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
        return load_checkpoint(self.root / CHECKPOINT)

    def truncate(self, last_round: int) -> None:
        """Drop metrics/events lines of rounds after ``last_round`` (written after the last
        checkpoint by a run that was then interrupted); rewritten atomically."""
        for name in ("metrics.jsonl", "events.jsonl"):
            path = self.root / name
            if not path.exists():
                continue
            kept = []
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a torn last line
                    continue
                if int(row.get("round", 0)) <= last_round:
                    kept.append(line)
            text = "".join(line + "\n" for line in kept)
            _atomic_write(path, lambda tmp, text=text: tmp.write_text(text))

    def save_weights(self, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
        path = self.root / WEIGHTS
        save_weights(path, state, metadata)
        return path

    def save_rewind(self, served: dict[str, torch.Tensor], server_round: int) -> Path:
        """The early-training weights IMP rewinds to (``rewind.safetensors``): the *served* state,
        as ``model.safetensors`` holds it at the end, so both build the same model."""
        path = self.root / REWIND
        save_weights(path, served, {"round": str(server_round), "kind": "rewind"})
        return path
