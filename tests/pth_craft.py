"""Writes torch-format `.pth` zips without torch, with any (also invalid) tensor records.

The pickle is assembled from protocol-2 opcodes the way `torch.save` lays it out (checked
against ../shared/reference/*.pth): `{'params': OrderedDict(name -> _rebuild_tensor_v2(
persistent('storage', torch.<T>Storage, key, 'cpu', numel), offset, size, stride, False,
OrderedDict()))}`, and every storage is the raw little-endian bytes in `<prefix>/data/<key>`.
Used by the reader-hardening tests and the fuzz worker.
"""

from __future__ import annotations

import dataclasses
import struct
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
                 np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage",
                 np.dtype(np.int32): "IntStorage", np.dtype(np.int16): "ShortStorage",
                 np.dtype(np.int8): "CharStorage", np.dtype(np.uint8): "ByteStorage",
                 np.dtype(np.bool_): "BoolStorage"}


@dataclasses.dataclass
class TensorRecord:
  """One `_rebuild_tensor_v2` call: the storage it names and the view it asks for."""
  name: str
  key: str
  offset: int
  size: Sequence[int]
  stride: Sequence[int]
  storage_type: str = "FloatStorage"
  numel: int | None = None  # the storage's numel written in the pickle; None = the true one


def _str(s: str) -> bytes:
  b = s.encode()
  return b"X" + struct.pack("<I", len(b)) + b


def _int(v: int) -> bytes:
  return b"I" + str(int(v)).encode() + b"\n"  # protocol-0 INT: any sign and size


def _tuple(vals: Sequence[int]) -> bytes:
  return b"(" + b"".join(_int(v) for v in vals) + b"t"


def _global(module: str, name: str) -> bytes:
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def tensor_pickle(records: Sequence[TensorRecord], numels: dict[str, int]) -> bytes:
  """data.pkl bytes for `{'params': OrderedDict(records)}`."""
  out = [b"\x80\x02", b"}", _str("params"), _global("collections", "OrderedDict"), b")R", b"("]
  for r in records:
    numel = numels.get(r.key, 4) if r.numel is None else r.numel
    pid = (b"(" + _str("storage") + _global("torch", r.storage_type) + _str(r.key) + _str("cpu")
           + _int(numel) + b"t")
    out += [_str(r.name), _global("torch._utils", "_rebuild_tensor_v2"), b"(", pid, b"Q",
            _int(r.offset), _tuple(r.size), _tuple(r.stride), b"\x89",
            _global("collections", "OrderedDict"), b")R", b"tR"]
  out += [b"u", b"s", b"."]  # SETITEMS into the OrderedDict, SETITEM into the dict, STOP
  return b"".join(out)


def write_pth(path: Path, storages: dict[str, np.ndarray], records: Sequence[TensorRecord],
              *, pickle_bytes: bytes | None = None, prefix: str = "archive") -> Path:
  """Writes the zip: `<prefix>/data.pkl`, `<prefix>/data/<key>` per storage, `version`."""
  path = Path(path)
  numels = {k: int(np.asarray(v).size) for k, v in storages.items()}
  data = tensor_pickle(records, numels) if pickle_bytes is None else pickle_bytes
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr(f"{prefix}/data.pkl", data)
    zf.writestr(f"{prefix}/byteorder", "little")
    for key, arr in storages.items():
      zf.writestr(f"{prefix}/data/{key}", np.ascontiguousarray(arr).astype(
          np.asarray(arr).dtype.newbyteorder("<")).tobytes())
    zf.writestr(f"{prefix}/version", "3\n")
  return path


def small_checkpoint() -> tuple[dict[str, np.ndarray], list[TensorRecord], dict[str, np.ndarray]]:
  """A valid small checkpoint with the view kinds real files hold, and the tensors it means.

  Returns (storages, records, expected): a contiguous 4-D weight, a transposed 2-D view, a
  slice at an offset sharing a storage, a scalar, an int64 buffer, a bool mask, an empty one.
  """
  w = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2) / 7
  m = np.arange(12, dtype=np.float32).reshape(3, 4) - 5
  idx = np.arange(6, dtype=np.int64) * 1000003
  mask = np.array([True, False, True, True])
  storages = {"0": w.ravel(), "1": m.ravel(), "2": idx, "3": mask}
  records = [
      TensorRecord("w", "0", 0, (2, 3, 2, 2), (12, 4, 2, 1)),
      TensorRecord("m_t", "1", 0, (4, 3), (1, 4)),
      TensorRecord("m_row2", "1", 8, (4,), (1,)),
      TensorRecord("scalar", "0", 5, (), ()),
      TensorRecord("idx", "2", 0, (2, 3), (3, 1), "LongStorage"),
      TensorRecord("mask", "3", 1, (3,), (1,), "BoolStorage"),
      TensorRecord("empty", "1", 12, (0, 4), (4, 1)),
  ]
  expected = {"w": w, "m_t": m.T, "m_row2": m[2], "scalar": np.float32(w.ravel()[5]),
              "idx": idx.reshape(2, 3), "mask": mask[1:], "empty": np.zeros((0, 4), np.float32)}
  return storages, records, expected


def reference_gather(storage: np.ndarray, offset: int, size: Sequence[int],
                     stride: Sequence[int]) -> np.ndarray:
  """The strided view by plain index arithmetic (an oracle independent of as_strided);
  raises IndexError when any element lies outside the storage."""
  size, stride = tuple(size), tuple(stride)
  if 0 in size:
    return np.zeros(size, storage.dtype)
  flat = []
  for idx in np.ndindex(*size) if size else [()]:
    k = offset + sum(i * s for i, s in zip(idx, stride))
    if not 0 <= k < storage.size:
      raise IndexError(f"element {idx} at storage index {k} outside 0..{storage.size - 1}")
    flat.append(storage[k])
  return np.array(flat, storage.dtype).reshape(size)
