"""The packed tensor format: every tensor of a message in ONE Flower ``Array``.

Flower 1.42 moves a message as separate objects (RecordDict → ArrayRecord → Array → ArrayChunk),
each pushed and pulled with its own request on every hop (ServerApp → SuperLink → SuperNode →
ClientApp). One ``Array`` per tensor made a Split-Mix message of 8 bases × 39 tensors ~600
objects, and pulling it took far longer than training on it. Here a message's tensors travel as
one byte buffer, so a message is a handful of objects whatever the model:

    ArrayRecord {PACKED: Array(dtype="uint8", shape=(n,), stype=STYPE, data=buffer)}

    buffer = MAGIC (8 bytes, the last one the version)
           | index length L (uint32, little-endian)
           | index: L bytes of UTF-8 JSON, a list of [key, dtype, shape, offset] (the encoder
             writes the keys sorted)
           | zero padding to a multiple of ALIGN
           | payload: each tensor's bytes, C order, little-endian, at its offset (relative to the
             payload's start); tensors follow in index order, each starting at the previous one's
             end rounded up to ALIGN (the encoder pads with zeros; decoding ignores padding),
             nothing after the last

Decoding (:func:`unpack`) trusts nothing: the magic, the index size, every entry (a unique string
key, a dtype from :data:`DTYPES`, non-negative integer dimensions, the offset the layout above
gives) and the payload's length are checked, and any mismatch raises ``ValueError`` naming it. It
returns read-only NumPy views of the buffer (no copy); :func:`to_tensors` copies the payload once
for tensors that training updates in place. This module is the format's only home: the sparse
codec and the server build on :func:`to_record` / :func:`unpack`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

PACKED = "packed"  # the ArrayRecord key of the one Array
STYPE = "splitmix.packed"  # the Array's serialisation type (not .npy: Array.numpy() refuses it)
MAGIC = b"SMXPACK\x01"
ALIGN = 8  # every tensor starts at a multiple of the largest itemsize, so views are aligned
MAX_INDEX_BYTES = 1 << 24  # an index beyond 16 MiB (~200k tensors) is refused before parsing
_FIXED = len(MAGIC) + 4

# dtype name in the index -> the NumPy dtype of the payload (always little-endian)
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "bool": "|b1",
        "uint8": "|u1",
        "int8": "|i1",
        "uint16": "<u2",
        "int16": "<i2",
        "int32": "<i4",
        "int64": "<i8",
        "float16": "<f2",
        "float32": "<f4",
        "float64": "<f8",
    }.items()
}


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _as_numpy(key: str, value: torch.Tensor | np.ndarray) -> tuple[str, np.ndarray]:
    """(dtype name, C-contiguous little-endian array) of one tensor; ``ValueError`` if its
    dtype cannot travel."""
    try:
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    except TypeError:  # a torch dtype NumPy lacks (bfloat16)
        raise ValueError(f"tensor '{key}': dtype {value.dtype} cannot be packed (allowed: {', '.join(DTYPES)})") from None
    name = array.dtype.name
    dtype = DTYPES.get(name)
    if dtype is None:
        raise ValueError(f"tensor '{key}': dtype {array.dtype} cannot be packed (allowed: {', '.join(DTYPES)})")
    if array.dtype != dtype or not array.flags.c_contiguous:  # (ascontiguousarray would make 0-d 1-d)
        array = array.astype(dtype, order="C")
    return name, array


def pack_bytes(tensors: Mapping[str, torch.Tensor | np.ndarray]) -> bytes:
    """The packed buffer of ``tensors`` in sorted key order, so the bytes (and the byte counts in
    a run's metrics) do not depend on the order a dict was built in (a resumed run loads its
    weights sorted); one copy of each tensor's bytes."""
    index: list[list] = []
    parts: list[bytes | memoryview] = []
    end = 0
    for key in sorted(tensors):
        name, array = _as_numpy(key, tensors[key])
        start = _align(end)
        if start > end:
            parts.append(bytes(start - end))
        index.append([key, name, list(array.shape), start])
        if array.nbytes:
            parts.append(array.reshape(-1).data)
        end = start + array.nbytes
    head = json.dumps(index, separators=(",", ":")).encode()
    prefix = MAGIC + struct.pack("<I", len(head)) + head
    return b"".join([prefix, bytes(_align(len(prefix)) - len(prefix)), *parts])


def to_record(tensors: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """``tensors`` as a message's ArrayRecord: one packed Array."""
    data = pack_bytes(tensors)
    return ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)})


def _entries(data: bytes | memoryview) -> tuple[int, list[tuple[str, np.dtype, tuple[int, ...], int]]]:
    """(payload start, checked entries) of a packed buffer; ``ValueError`` naming the problem."""
    if len(data) < _FIXED or bytes(data[: len(MAGIC)]) != MAGIC:
        raise ValueError("not a packed tensor buffer (bad magic or version)")
    (length,) = struct.unpack("<I", data[len(MAGIC) : _FIXED])
    if length > MAX_INDEX_BYTES:
        raise ValueError(f"index of {length} bytes exceeds the limit of {MAX_INDEX_BYTES}")
    if _FIXED + length > len(data):
        raise ValueError(f"index of {length} bytes runs past the buffer's {len(data)} bytes (truncated)")
    try:
        index = json.loads(bytes(data[_FIXED : _FIXED + length]).decode())
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"index is not valid JSON: {err}") from None
    if not isinstance(index, list):
        raise ValueError("index is not a list of [key, dtype, shape, offset]")
    payload = _align(_FIXED + length)
    entries: list[tuple[str, np.dtype, tuple[int, ...], int]] = []
    seen: set[str] = set()
    end = 0
    for item in index:
        if not (isinstance(item, list) and len(item) == 4 and isinstance(item[0], str)):
            raise ValueError(f"index entry {str(item)[:80]} is not [key, dtype, shape, offset]")
        key, name, shape, offset = item
        if key in seen:
            raise ValueError(f"duplicate key '{key}'")
        seen.add(key)
        if not isinstance(name, str) or name not in DTYPES:
            raise ValueError(f"tensor '{key}': unknown dtype {str(name)[:40]!r} (allowed: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"tensor '{key}': shape {str(shape)[:80]} is not a list of non-negative integers")
        if type(offset) is not int:
            raise ValueError(f"tensor '{key}': offset {str(offset)[:40]} is not an integer")
        if offset < end:
            raise ValueError(f"tensor '{key}': offset {offset} overlaps the previous tensor (which ends at {end})")
        if offset != _align(end):
            raise ValueError(f"tensor '{key}': offset {offset}, expected {_align(end)}")
        dtype = DTYPES[name]
        end = offset + math.prod(shape) * dtype.itemsize
        if payload + end > len(data):
            raise ValueError(f"tensor '{key}' ({name} {tuple(shape)} at offset {offset}) runs past the buffer's end (truncated)")
        entries.append((key, dtype, tuple(shape), offset))
    if len(data) != payload + end:
        raise ValueError(f"buffer holds {max(len(data) - payload, 0)} payload bytes, the index declares {end}")
    return payload, entries


def _views(buffer: np.ndarray, payload: int, entries: list[tuple[str, np.dtype, tuple[int, ...], int]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, dtype, shape, offset in entries:
        start = payload + offset
        view = buffer[start : start + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)
        if dtype.kind == "b" and view.size and buffer[start : start + view.size].max() > 1:
            raise ValueError(f"tensor '{key}': bool values other than 0 and 1")
        out[key] = view
    return out


def unpack_bytes(data: bytes) -> dict[str, np.ndarray]:
    """The tensors of a packed buffer as read-only views of it (no copy)."""
    payload, entries = _entries(data)
    return _views(np.frombuffer(data, dtype=np.uint8), payload, entries)


def _packed_data(record: ArrayRecord) -> bytes:
    keys = list(record.keys())
    if keys != [PACKED]:
        raise ValueError(f"expected the one array '{PACKED}', got {len(keys)} array(s), e.g. {keys[:3]}")
    array = record[PACKED]
    if array.stype != STYPE or str(array.dtype) != "uint8" or tuple(array.shape) != (len(array.data),):
        raise ValueError(f"'{PACKED}' is {array.stype} {array.dtype} {tuple(array.shape)}, expected {STYPE} uint8 ({len(array.data)},)")
    return array.data


def unpack(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The tensors of a packed ArrayRecord as read-only views (see :func:`unpack_bytes`)."""
    return unpack_bytes(_packed_data(record))


def record_bytes(record: ArrayRecord) -> int:
    """Bytes a record carries (index and payload): what a message's tensors cost on the wire."""
    return sum(len(array.data) for array in record.values())


def to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Decoded tensors, writable: the payload is copied once and each tensor is a view of that
    copy, so training can update them in place."""
    data = _packed_data(record)
    payload, entries = _entries(data)
    buffer = np.frombuffer(data, dtype=np.uint8).copy()
    return {key: torch.from_numpy(view) for key, view in _views(buffer, payload, entries).items()}
