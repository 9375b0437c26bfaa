"""The packed tensor format (splitmix/protocol/codec.py): the exact bytes, exact round trips of
every dtype, zero-copy views, and a ValueError naming each kind of corruption."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from splitmix.protocol.codec import DTYPES, MAGIC, MAX_INDEX_BYTES, PACKED, STYPE, pack_bytes, to_record, to_tensors, unpack, unpack_bytes


def rebuild(data: bytes, edit: Callable[[list], object] = lambda index: None, payload: Callable[[bytes], bytes] = lambda p: p) -> bytes:
    """A packed buffer with its index edited in place by ``edit`` and its payload by ``payload``
    (the prefix is rebuilt, so the index length and padding stay consistent)."""
    (length,) = struct.unpack("<I", data[8:12])
    index = json.loads(data[12 : 12 + length])
    body = data[-(-(12 + length) // 8) * 8 :]
    edit(index)
    head = json.dumps(index, separators=(",", ":")).encode()
    prefix = MAGIC + struct.pack("<I", len(head)) + head
    return prefix + bytes(-len(prefix) % 8) + payload(body)


def as_record(data: bytes) -> ArrayRecord:
    return ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)})


def test_the_bytes_are_the_documented_layout():
    data = pack_bytes({"a": np.array([1.0, -2.0, 0.5], np.float16), "b": torch.tensor(7, dtype=torch.int64)})
    index = b'[["a","float16",[3],0],["b","int64",[],8]]'  # b: 6 bytes of a, rounded up to 8
    prefix = b"SMXPACK\x01" + struct.pack("<I", 42) + index  # 12 + 42 = 54 bytes
    payload = struct.pack("<3e", 1.0, -2.0, 0.5) + b"\0\0" + struct.pack("<q", 7)
    assert data == prefix + b"\0\0" + payload  # the payload starts at 56
    record = to_record({"a": np.array([1.0, -2.0, 0.5], np.float16), "b": torch.tensor(7)})
    assert list(record.keys()) == [PACKED]
    array = record[PACKED]
    assert (array.dtype, tuple(array.shape), array.stype, array.data) == ("uint8", (72,), STYPE, data)
    with pytest.raises(TypeError):  # not .npy: Flower's own reader refuses it
        array.numpy()


def test_every_dtype_round_trips_bit_for_bit():
    tensors = {
        "f32": np.array([-0.0, np.inf, -np.inf, 1.4e-45, 3.4028235e38, 1 / 3], np.float32),
        "nan": np.array([0x7FC00001, 0xFFC12345], np.uint32).view(np.float32),  # NaN payloads kept
        "f16": np.array([6e-8, 65504.0, -0.0], np.float16),
        "f64": np.array([[np.pi, -1e-308], [5e-324, 1e308]], np.float64),
        "i8": np.array([-128, 127], np.int8),
        "u8": np.array([0, 255], np.uint8),
        "i16": np.array([-32768, 32767], np.int16),
        "u16": np.array([0, 65535], np.uint16),  # bfloat16 bit patterns of sparse values
        "i32": np.array([-(2**31), 2**31 - 1], np.int32),
        "i64": np.array([-(2**63), 2**63 - 1], np.int64),
        "bool": np.array([[True, False, True]]),  # masks
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.float64(2.5),
    }
    assert {t.dtype.name for t in tensors.values()} == set(DTYPES)
    back = unpack(to_record(tensors))
    assert list(back) == sorted(tensors)  # the encoder writes keys sorted: bytes independent of dict order
    assert pack_bytes(dict(reversed(tensors.items()))) == pack_bytes(tensors)
    for key, value in tensors.items():
        got = back[key]
        assert got.dtype.name == value.dtype.name and got.shape == value.shape, key
        assert got.tobytes() == np.asarray(value).tobytes(), key
    big_endian = unpack(to_record({"w": np.array([1.5, -2.0], ">f8")}))["w"]  # stored little-endian
    assert big_endian.dtype.str == "<f8" and big_endian.tolist() == [1.5, -2.0]


def test_torch_tensors_any_layout_and_writable_copies():
    w = torch.arange(6, dtype=torch.float32).view(2, 3)
    record = to_record({"t": w.t(), "s": torch.tensor(3.0), "m": torch.tensor([True, False])})  # transposed: not contiguous
    tensors = to_tensors(record)
    assert tensors["t"].tolist() == [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    assert tensors["s"].shape == () and tensors["s"].item() == 3.0
    assert tensors["m"].dtype == torch.bool and tensors["m"].tolist() == [True, False]
    tensors["t"] += 10  # writable, and a copy: the record is unchanged
    assert unpack(record)["t"].tolist() == [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    with pytest.raises(ValueError, match="tensor 'b': dtype torch.bfloat16 cannot be packed"):
        to_record({"b": torch.zeros(2, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match="tensor 'c': dtype complex64"):
        to_record({"c": np.zeros(2, np.complex64)})


def test_unpack_returns_read_only_views_of_the_buffer():
    data = pack_bytes({"a": np.array([1.0, 2.0], np.float32), "b": np.array([3, 4, 5], np.int32)})
    views = unpack_bytes(data)
    base = np.frombuffer(data, np.uint8).ctypes.data
    start = len(data) - 20  # payload: a (8 bytes) then b (12 bytes) from offset 8
    assert views["a"].ctypes.data == base + start and views["b"].ctypes.data == base + start + 8
    assert not views["a"].flags.writeable and views["b"].tolist() == [3, 4, 5]


GOOD = pack_bytes({"a": np.array([1.0, 2.0], np.float32), "b": np.array([3], np.int64), "m": np.array([True, False])})


@pytest.mark.parametrize(
    "data, message",
    [
        (GOOD[:-1], r"'m' \(bool \(2,\) at offset 16\) runs past the buffer's end \(truncated\)"),
        (GOOD[:30], r"index of \d+ bytes runs past the buffer's \d+ bytes \(truncated\)"),
        (GOOD + b"\0", "buffer holds 19 payload bytes, the index declares 18"),
        (b"SMXPACK\x02" + GOOD[8:], "bad magic or version"),
        (b"", "bad magic"),
        (MAGIC + struct.pack("<I", MAX_INDEX_BYTES + 1), "exceeds the limit"),
        (MAGIC + struct.pack("<I", 3) + b"[[\xff", "not valid JSON"),
        (MAGIC + struct.pack("<I", 2) + b"{}\0\0", "not a list"),
        (rebuild(GOOD, lambda i: i[0].pop()), r"\['a', 'float32', \[2\]\] is not \[key, dtype, shape, offset\]"),
        (rebuild(GOOD, lambda i: i[1].__setitem__(0, "a")), "duplicate key 'a'"),
        (rebuild(GOOD, lambda i: i[1].__setitem__(1, "float128")), "tensor 'b': unknown dtype 'float128'"),
        (rebuild(GOOD, lambda i: i[1].__setitem__(1, "object")), "tensor 'b': unknown dtype 'object'"),
        (rebuild(GOOD, lambda i: i[0].__setitem__(2, [-2])), r"tensor 'a': shape \[-2\] is not a list of non-negative integers"),
        (rebuild(GOOD, lambda i: i[0].__setitem__(2, [2.0])), "non-negative integers"),
        (rebuild(GOOD, lambda i: i[0].__setitem__(2, [True, 2])), "non-negative integers"),
        (rebuild(GOOD, lambda i: i[0].__setitem__(2, [2**40])), "runs past the buffer's end"),
        (rebuild(GOOD, lambda i: i[1].__setitem__(3, 0)), "tensor 'b': offset 0 overlaps the previous tensor \\(which ends at 8\\)"),
        (rebuild(GOOD, lambda i: i[1].__setitem__(3, 16)), "tensor 'b': offset 16, expected 8"),
        (rebuild(GOOD, lambda i: i[1].__setitem__(3, 9)), "tensor 'b': offset 9, expected 8"),
        (rebuild(GOOD, lambda i: i[1].__setitem__(3, "8")), "tensor 'b': offset 8 is not an integer"),
        (rebuild(GOOD, payload=lambda p: p[:16] + b"\x02\x00"), "tensor 'm': bool values other than 0 and 1"),
    ],
)
def test_corruption_raises_a_value_error_naming_it(data, message):
    with pytest.raises(ValueError, match=message):
        unpack_bytes(data)
    with pytest.raises(ValueError, match=message):
        to_tensors(as_record(data))


def test_rebuild_without_edits_is_the_identity():
    assert rebuild(GOOD) == GOOD  # so each corruption above differs from a valid buffer only by its edit
    assert {k: v.tolist() for k, v in unpack_bytes(GOOD).items()} == {"a": [1.0, 2.0], "b": [3], "m": [True, False]}


def test_records_must_hold_exactly_one_packed_array():
    good = as_record(GOOD)
    assert unpack(good)["b"].tolist() == [3]
    with pytest.raises(ValueError, match="expected the one array 'packed', got 2"):
        unpack(ArrayRecord({PACKED: good[PACKED], "w": Array(np.zeros(2, np.float32))}))
    with pytest.raises(ValueError, match="got 1 array"):
        unpack(ArrayRecord({"w": Array(np.zeros(2, np.float32))}))  # Flower's own per-tensor .npy form
    with pytest.raises(ValueError, match="expected splitmix.packed uint8"):
        unpack(ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(GOOD),), stype="numpy.ndarray", data=GOOD)}))
    with pytest.raises(ValueError, match="expected splitmix.packed uint8"):
        unpack(ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(GOOD) + 1,), stype=STYPE, data=GOOD)}))
    assert unpack(to_record({})) == {} and len(to_record({})[PACKED].data) == 16  # 12 + "[]", padded to 16
