"""Compact encoding of a tensor's kept entries (sparse uploads).

A sparse reply is one packed record (:mod:`splitmix.protocol.codec`) whose entries are, for a
masked tensor, two arrays:

- ``<key>::idx``: uint8, 1-D: which entries are kept. Byte 0 says how, the rest is the payload:
  ``0`` = bitmap (``np.packbits`` of the flat mask, little bit order, ⌈N/8⌉ bytes, padding bits 0);
  ``1``/``2``/``3``/``4`` = the kept flat indices delta-encoded (first index, then the gaps, each
  ≥ 1) as little-endian uint8/uint16/uint32/uint64, the smallest type that holds the largest gap.
  The encoder picks whichever of bitmap and deltas is smaller (the bitmap on a tie): deltas win
  above ~87.5 % sparsity when the gaps fit uint8 (1 byte per kept entry against N/8 bytes);
  an all-zero mask is the single byte ``1``.
- ``<key>::val``: the kept values in flat (C) order, 1-D, in the tensor's dtype; bfloat16 (which
  NumPy lacks) travels as its uint16 bit pattern. Values are copied bit for bit (−0.0, NaN
  payloads), so decoding is exact; entries off the mask decode to +0.0.

The server knows the dense shape and dtype it sent for ``<key>``, so it can check both arrays
(:func:`sparse_from_record`); nothing else is trusted. A tensor sent without a mask keeps the
plain ``<key>`` (dense), except that float32 tensors without a mask (batch norm, biases: many
tiny arrays) are concatenated into one entry ``::dense`` in sorted key order: each entry costs
an index line naming it, which for a Split-Mix base's ~30 tiny tensors adds up next to its
sparse weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord

from splitmix.protocol.codec import to_record, unpack

IDX_SUFFIX = "::idx"
VAL_SUFFIX = "::val"
DENSE_PACK = "::dense"  # float32 tensors without a mask, concatenated in sorted key order

BITMAP = 0
_DELTA_DTYPES: dict[int, np.dtype] = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 3: np.dtype("<u4"), 4: np.dtype("<u8")}

# torch dtype -> NumPy dtype of the values payload (its name is the Array's dtype)
_VALUE_DTYPES: dict[torch.dtype, np.dtype] = {
    torch.float32: np.dtype("<f4"),
    torch.float16: np.dtype("<f2"),
    torch.float64: np.dtype("<f8"),
    torch.bfloat16: np.dtype("<u2"),  # bit pattern
}
_TORCH_BY_NAME = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64, "bfloat16": torch.bfloat16}


class _Spec(Protocol):  # strategies.base.TensorSpec, without importing the server side
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> str: ...


# ---------------------------------------------------------------------------- indices


def _flat_mask(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.dtype != np.bool_:
        raise ValueError(f"mask must be bool, got {array.dtype}")
    return array.reshape(-1)


def _delta_tag(max_gap: int) -> int:
    for tag, dtype in _DELTA_DTYPES.items():
        if max_gap <= np.iinfo(dtype).max:
            return tag
    raise ValueError(f"gap {max_gap} does not fit in 64 bits")


def encode_indices(mask: torch.Tensor | np.ndarray) -> bytes:
    """The kept positions of a bool mask: bitmap or delta indices, whichever is smaller."""
    flat = _flat_mask(mask)
    bitmap = np.packbits(flat, bitorder="little").tobytes()
    indices = np.flatnonzero(flat)
    if indices.size == 0:
        return bytes([1])  # no deltas at all
    gaps = np.diff(indices, prepend=0)  # first index, then gaps ≥ 1
    tag = _delta_tag(int(gaps.max()))
    if indices.size * _DELTA_DTYPES[tag].itemsize < len(bitmap):
        return bytes([tag]) + gaps.astype(_DELTA_DTYPES[tag]).tobytes()
    return bytes([BITMAP]) + bitmap


def encode_index_list(indices: np.ndarray | torch.Tensor, numel: int) -> bytes:
    """Encode explicit flat indices (must be strictly increasing and in ``[0, numel)``)."""
    idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices).reshape(-1)
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be integers, got {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= numel):
        raise ValueError(f"index out of range [0, {numel})")
    if idx.size > 1 and not (np.diff(idx) > 0).all():
        raise ValueError("indices are not strictly increasing (unsorted or repeated)")
    mask = np.zeros(numel, dtype=bool)
    mask[idx] = True
    return encode_indices(mask)


def decode_indices(blob: bytes | np.ndarray, numel: int) -> np.ndarray:
    """Sorted flat int64 indices from :func:`encode_indices` output; ``ValueError`` if corrupt."""
    data = np.frombuffer(blob, dtype=np.uint8) if isinstance(blob, (bytes, bytearray, memoryview)) else np.asarray(blob)
    if data.dtype != np.uint8 or data.ndim != 1:
        raise ValueError("index blob must be 1-D uint8")
    if data.size == 0:
        raise ValueError("index blob is empty")
    tag, payload = int(data[0]), data[1:]
    if tag == BITMAP:
        if payload.size != (numel + 7) // 8:
            raise ValueError(f"bitmap holds {payload.size} bytes, {numel} entries need {(numel + 7) // 8}")
        bits = np.unpackbits(payload, bitorder="little")
        if bits[numel:].any():
            raise ValueError("bitmap has non-zero padding bits")
        return np.flatnonzero(bits[:numel]).astype(np.int64)
    if tag not in _DELTA_DTYPES:
        raise ValueError(f"unknown index format {tag}")
    dtype = _DELTA_DTYPES[tag]
    if payload.size % dtype.itemsize:
        raise ValueError(f"delta payload of {payload.size} bytes is not a multiple of {dtype.itemsize}")
    gaps = payload.view(dtype).astype(np.uint64)
    if gaps.size == 0:
        return np.zeros(0, dtype=np.int64)
    if gaps.size > numel or int(gaps.max()) >= max(numel, 1):
        raise ValueError(f"index out of range [0, {numel})")
    if (gaps[1:] == 0).any():
        raise ValueError("indices are not strictly increasing (unsorted or repeated)")
    indices = np.cumsum(gaps, dtype=np.uint64)  # ≤ numel · numel, no wrap for any real tensor
    if int(indices[-1]) >= numel:
        raise ValueError(f"index {int(indices[-1])} out of range [0, {numel})")
    return indices.astype(np.int64)


# ---------------------------------------------------------------------------- values


def _value_dtype(dtype: torch.dtype) -> np.dtype:
    if dtype not in _VALUE_DTYPES:
        raise ValueError(f"unsupported value dtype {dtype} (float32, float16, bfloat16, float64)")
    return _VALUE_DTYPES[dtype]


def _to_numpy_bits(values: torch.Tensor) -> np.ndarray:
    """Values as the NumPy array that travels (bfloat16 as its raw uint16 bits)."""
    values = values.detach().cpu().contiguous()
    if values.dtype == torch.bfloat16:
        return values.view(torch.int16).numpy().view(np.uint16)
    return values.numpy().astype(_value_dtype(values.dtype), copy=False)


def _from_numpy_bits(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, dtype=_value_dtype(dtype), copy=True))


def encode_sparse(tensor: torch.Tensor, mask: torch.Tensor) -> tuple[bytes, np.ndarray]:
    """(index blob, kept values in flat order) of ``tensor`` under the bool ``mask``."""
    if mask.shape != tensor.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from tensor shape {tuple(tensor.shape)}")
    _value_dtype(tensor.dtype)
    flat_mask = mask.detach().reshape(-1).to(device=tensor.device)
    if flat_mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {flat_mask.dtype}")
    return encode_indices(flat_mask), _to_numpy_bits(tensor.detach().reshape(-1)[flat_mask])


def decode_sparse_entries(
    index_blob: bytes | np.ndarray, values: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat int64 indices, values) after checking the counts agree; ``ValueError`` if not."""
    expected = _value_dtype(dtype)
    values = np.asarray(values)
    if values.ndim != 1 or values.dtype != expected:
        raise ValueError(f"values must be 1-D {expected}, got {values.ndim}-D {values.dtype}")
    indices = decode_indices(index_blob, math.prod(shape))
    if indices.size != values.size:
        raise ValueError(f"{indices.size} kept positions but {values.size} values")
    return torch.from_numpy(indices), _from_numpy_bits(values, dtype)


def decode_sparse(
    index_blob: bytes | np.ndarray, values: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense tensor with +0.0 off the mask, bool mask), both of ``shape``."""
    indices, vals = decode_sparse_entries(index_blob, values, shape, dtype)
    numel = math.prod(shape)
    dense = torch.zeros(numel, dtype=dtype)
    mask = torch.zeros(numel, dtype=torch.bool)
    dense[indices] = vals
    mask[indices] = True
    return dense.view(shape), mask.view(shape)


# ---------------------------------------------------------------------------- ArrayRecord


def sparse_arrays(tensors: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The entries of a sparse reply: masked tensors as ``<key>::idx`` + ``<key>::val``, unmasked
    float32 ones concatenated in ``::dense``, the rest dense under their own key."""
    unknown = sorted(set(masks) - set(tensors))
    if unknown:
        raise KeyError(f"masks for tensors not sent, e.g. {unknown[:3]}")
    out: dict[str, np.ndarray] = {}
    packed = []
    for key in sorted(tensors):
        tensor = tensors[key]
        if key in masks:
            idx, val = encode_sparse(tensor, masks[key])
            out[key + IDX_SUFFIX] = np.frombuffer(idx, dtype=np.uint8)
            out[key + VAL_SUFFIX] = val
        elif tensor.dtype == torch.float32:
            packed.append(tensor.detach().cpu().reshape(-1))
        else:
            out[key] = tensor.detach().cpu().numpy()
    if packed:
        out[DENSE_PACK] = torch.cat(packed).numpy()
    return out


def to_sparse_record(tensors: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A sparse reply as one packed ArrayRecord (:func:`splitmix.protocol.codec.to_record`)."""
    return to_record(sparse_arrays(tensors, masks))


def _unpack_dense(flat: np.ndarray, expected: Mapping[str, _Spec]) -> dict[str, tuple[None, torch.Tensor]]:
    """The ``::dense`` pack → the expected keys sent neither plain nor sparse (sorted order)."""
    if flat.dtype != np.float32 or flat.ndim != 1:
        raise ValueError(f"'{DENSE_PACK}' is {flat.dtype} {flat.shape}, expected 1-D float32")
    not_f32 = sorted(k for k, spec in expected.items() if str(spec.dtype) != "float32")
    if not_f32:
        raise ValueError(f"tensor '{not_f32[0]}' is missing (only float32 tensors travel in '{DENSE_PACK}')")
    sizes = {k: math.prod(int(d) for d in expected[k].shape) for k in sorted(expected)}
    if sum(sizes.values()) != flat.shape[0]:
        raise ValueError(f"'{DENSE_PACK}' holds {flat.shape[0]} values, the {len(sizes)} tensor(s) not sent otherwise need {sum(sizes.values())}")
    values = torch.from_numpy(flat.copy())
    if not torch.isfinite(values).all():
        raise ValueError(f"'{DENSE_PACK}' contains NaN or Inf")
    out, offset = {}, 0
    for key, size in sizes.items():
        out[key] = (None, values[offset : offset + size].view(tuple(int(d) for d in expected[key].shape)))
        offset += size
    return out


def sparse_from_arrays(arrays: Mapping[str, np.ndarray], expected: Mapping[str, _Spec]) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
    """Check and decode a sparse reply's entries: ``{key: (mask or None if sent dense, values)}``.

    ``expected`` maps each tensor key to what the server sent (``shape``, ``dtype`` name). Each
    key must come either dense (its plain key, that shape and dtype) or as both sparse arrays;
    any other key, a mixed pair, wrong dtypes, inconsistent counts, out-of-range or repeated
    indices, or NaN/Inf values raise ``ValueError`` naming the key.
    """
    keys = set(arrays)
    allowed = {k for key in expected for k in (key, key + IDX_SUFFIX, key + VAL_SUFFIX)} | {DENSE_PACK}
    extra = sorted(keys - allowed)
    if extra:
        raise ValueError(f"unexpected {len(extra)} array(s), e.g. {extra[:3]}")
    out: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
    if DENSE_PACK in keys:
        out.update(_unpack_dense(arrays[DENSE_PACK], {k: s for k, s in expected.items() if not (keys & {k, k + IDX_SUFFIX, k + VAL_SUFFIX})}))
    for key in sorted(set(expected) - set(out)):
        spec = expected[key]
        shape = tuple(int(d) for d in spec.shape)
        dtype = _TORCH_BY_NAME.get(str(spec.dtype))
        has_dense, has_idx, has_val = key in keys, key + IDX_SUFFIX in keys, key + VAL_SUFFIX in keys
        try:
            if has_dense and not (has_idx or has_val):
                array = arrays[key]
                if array.shape != shape or array.dtype.name != str(spec.dtype):
                    raise ValueError(f"is {array.dtype} {array.shape}, expected {spec.dtype} {shape}")
                values = torch.from_numpy(array.copy())
                mask = None
            elif has_idx and has_val and not has_dense:
                if dtype is None:
                    raise ValueError(f"dtype {spec.dtype} cannot travel sparse")
                idx_array, val_array = arrays[key + IDX_SUFFIX], arrays[key + VAL_SUFFIX]
                if idx_array.dtype != np.uint8 or idx_array.ndim != 1:
                    raise ValueError(f"index array is {idx_array.dtype} {idx_array.shape}, expected 1-D uint8")
                if val_array.dtype != _value_dtype(dtype) or val_array.ndim != 1:
                    raise ValueError(f"value array is {val_array.dtype} {val_array.shape}, expected 1-D {_value_dtype(dtype).name}")
                values, mask = decode_sparse(idx_array, val_array, shape, dtype)
            else:
                raise ValueError("missing" if not (has_dense or has_idx or has_val) else "must come either dense or as ::idx and ::val")
            if values.is_floating_point() and not torch.isfinite(values).all():
                raise ValueError("contains NaN or Inf")
        except (ValueError, TypeError) as err:
            raise ValueError(f"tensor '{key}': {err}") from None
        out[key] = (mask, values)
    return out


def sparse_from_record(record: ArrayRecord, expected: Mapping[str, _Spec]) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
    """:func:`sparse_from_arrays` of a packed record (a malformed buffer: ``ValueError`` too)."""
    return sparse_from_arrays(unpack(record), expected)
