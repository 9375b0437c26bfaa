"""A node's Flower Context state, saved per round so a resumed simulation gets it back.

Sparse masks, a learned optimizer's moments and FedBN's local batch norm live in each node's
``context.state`` across rounds (Flower keeps it in the simulation process's memory). A run killed
mid-way loses them, so with a ``state-dir`` (the run folder's ``client-state/``, set by the server
in simulation) a client writes its state after every round it trains, as Flower's own protobuf
serialisation of the ``RecordDict`` (no pickle), one file per (partition, round), atomically.

On a fresh Context (a resumed run's new processes) the client loads the latest file of its
partition from a round **before** the current one: a client that had already trained the round
being redone when the run was killed gets the state it had before that round. For each partition
the newest file and the newest one before it are kept, which is enough for any resume point.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict
from flwr.common import serde
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

_LOADED = "node-state.loaded"  # marker in context.state: this Context has been restored once
_FILE = re.compile(r"^partition-(\d+)\.round-(\d+)\.pb$")


def _files(folder: Path, partition_id: int) -> list[tuple[int, Path]]:
    out = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = _FILE.match(path.name)
            if match and int(match.group(1)) == partition_id:
                out.append((int(match.group(2)), path))
    return sorted(out)


def save_node_state(folder: str | Path, partition_id: int, server_round: int, state: RecordDict) -> Path:
    """Write ``state`` for (partition, round) atomically; drop files no resume can need."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kept = RecordDict({k: v for k, v in state.items() if k != _LOADED})
    path = folder / f"partition-{partition_id}.round-{server_round}.pb"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(serde.recorddict_to_proto(kept).SerializeToString())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    older = [p for r, p in _files(folder, partition_id) if r < server_round]
    for stale in older[:-1]:  # keep the newest file before this round (a resume may redo this round)
        stale.unlink(missing_ok=True)
    return path


def load_node_state(folder: str | Path, partition_id: int, before_round: int) -> RecordDict | None:
    """The newest saved state of ``partition_id`` from a round < ``before_round`` (None: none)."""
    candidates = [p for r, p in _files(Path(folder), partition_id) if r < before_round]
    if not candidates:
        return None
    proto = ProtoRecordDict()
    proto.ParseFromString(candidates[-1].read_bytes())
    return serde.recorddict_from_proto(proto)


def restore_once(context_state: RecordDict, folder: str, partition_id: int, server_round: int) -> bool:
    """On a Context's first train message, fill it from the saved state (if any); True if restored."""
    if not folder or _LOADED in context_state:
        return False
    context_state[_LOADED] = ConfigRecord({"round": server_round})
    saved = load_node_state(folder, partition_id, server_round)
    if saved is None:
        return False
    for key, record in saved.items():
        context_state[key] = record
    return True
