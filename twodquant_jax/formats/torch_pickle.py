"""Reads PyTorch `.pth` files (the zip-pickle format of torch >= 1.6) into numpy, without torch.

Only the objects a state dict needs are accepted (tensors, ordered dicts, plain containers);
anything else in the pickle is refused, so loading a checkpoint never runs foreign code.
"""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np


class CheckpointError(ValueError):
  """A file that is not a readable PyTorch checkpoint, or not the one expected."""


_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": None,  # handled specially below (numpy has no bfloat16)
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
  """Stands for `torch.<Name>Storage` in the pickle; only ever used as a persistent-id tag."""
  __slots__ = ("name",)

  def __init__(self, name: str):
    self.name = name


# Bounds on what one checkpoint may ask for (a SwinIR-light checkpoint is ~4 MB; these leave
# room for any real model while stopping a crafted file from exhausting memory).
_MAX_DIMS = 16
_MAX_STORAGE_BYTES = 1 << 32  # 4 GiB per storage record
_MAX_PICKLE_BYTES = 1 << 28  # 256 MiB of data.pkl
_MAX_EXPANDED_ELEMENTS = 1 << 24  # elements a stride-0 (expanded) tensor may add beyond its storage


def _show(v: Any, limit: int) -> str:
  """A value from the file for an error message: one line, at most `limit` characters."""
  return " ".join(repr(v).split())[:limit]


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _int_tuple(v: Any, what: str) -> tuple[int, ...]:
  if not isinstance(v, (tuple, list)) or len(v) > _MAX_DIMS or not all(_is_int(x) for x in v):
    raise CheckpointError(f"a tensor's {what} is not a tuple of at most {_MAX_DIMS} integers: "
                          f"{_show(v, 80)}")
  return tuple(v)


def _rebuild_tensor(storage, offset, size, stride, *unused) -> np.ndarray:
  """The numpy counterpart of torch._utils._rebuild_tensor_v2: a strided view, copied.

  Every argument comes from the file, so all of it is checked before numpy sees a stride:
  the storage is one the loader read, the offset and strides are non-negative, every element
  the view can address lies inside the storage, and the element count is bounded.
  """
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise CheckpointError(f"a tensor's storage is not a storage record ({type(storage).__name__})")
  if not _is_int(offset) or offset < 0:
    raise CheckpointError(f"a tensor has a bad storage offset {_show(offset, 40)}")
  size, stride = _int_tuple(size, "shape"), _int_tuple(stride, "stride")
  if len(size) != len(stride):
    raise CheckpointError(f"a tensor has shape {size} but {len(stride)} strides {stride}")
  if any(d < 0 for d in size):
    raise CheckpointError(f"a tensor has a negative dimension in its shape {size}")
  if any(st < 0 for st in stride):
    raise CheckpointError(f"a tensor has a negative stride {stride}")
  numel = 1
  for d in size:
    numel *= d
  if numel > max(storage.size, _MAX_EXPANDED_ELEMENTS):
    raise CheckpointError(f"a tensor of shape {size} has more elements ({numel}) than its "
                          f"storage holds ({storage.size})")
  if numel == 0:
    if offset > storage.size:
      raise CheckpointError(f"an empty tensor's offset {offset} is past its storage "
                            f"({storage.size} values)")
    return np.zeros(size, storage.dtype)
  last = offset + sum((d - 1) * st for d, st in zip(size, stride))  # the largest index used
  if last >= storage.size:
    raise CheckpointError(f"a tensor (offset {offset}, shape {size}, stride {stride}) reaches "
                          f"value {last} of a storage of {storage.size}: out of bounds")
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                         strides=tuple(st * item for st in stride),
                                         writeable=False)
  return np.array(view)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
  return data


class _Unpickler(pickle.Unpickler):
  """An unpickler that knows only the classes a state dict is made of."""

  def __init__(self, file, zf: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self._zf = zf
    self._prefix = prefix
    self._cache: dict[str, tuple[np.ndarray, str]] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise CheckpointError(f"the checkpoint holds an object this loader does not accept: "
                          f"{module}.{name} (only tensors and dicts are read)")

  def persistent_load(self, pid) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise CheckpointError(f"unexpected persistent id in checkpoint: {_show(pid, 80)}")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType) or storage_type.name not in _STORAGE_DTYPES:
      raise CheckpointError(f"unknown storage type {_show(storage_type, 40)} in checkpoint")
    if not isinstance(key, str) or not key.isalnum():
      raise CheckpointError(f"bad storage key {_show(key, 40)} in checkpoint")
    name = storage_type.name
    if key in self._cache:
      arr, cached_name = self._cache[key]
      if cached_name != name or arr.size != numel:
        raise CheckpointError(f"storage {key} is described twice, as {cached_name} and {name}")
      return arr
    itemsize = 2 if name == "BFloat16Storage" else np.dtype(_STORAGE_DTYPES[name]).itemsize
    if not _is_int(numel) or numel < 0 or numel * itemsize > _MAX_STORAGE_BYTES:
      raise CheckpointError(f"storage {key} has a bad size {_show(numel, 40)}")
    member = f"{self._prefix}/data/{key}" if self._prefix else f"data/{key}"
    try:
      info = self._zf.getinfo(member)
    except KeyError as e:
      raise CheckpointError(f"storage {key} is missing from the checkpoint archive") from e
    if info.file_size != numel * itemsize:  # checked before reading: no oversized decompression
      raise CheckpointError(f"storage {key} holds {info.file_size} bytes, the pickle says "
                            f"{numel} values of {itemsize} bytes: the file is truncated or corrupt")
    raw = self._zf.read(info)
    if len(raw) != numel * itemsize:
      raise CheckpointError(f"storage {key} is truncated")
    if name == "BFloat16Storage":
      arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    else:
      arr = np.frombuffer(raw, np.dtype(_STORAGE_DTYPES[name]).newbyteorder("<"))
      arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
    arr.flags.writeable = False
    self._cache[key] = (arr, name)
    return arr


# Protocol-5 buffer opcodes (mutable bytearrays, out-of-band buffers): never in a torch file, and
# a damaged pickle using them made CPython free a bytearray that a buffer still pointed at.
_DENIED_OPCODES = frozenset({"BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER"})


def _check_opcodes(data: bytes) -> None:
  """Walks the pickle's opcodes before running any (also rejects malformed opcode streams)."""
  for op, _, pos in pickletools.genops(data):
    if op.name in _DENIED_OPCODES:
      raise CheckpointError(f"data.pkl uses the {op.name} opcode at byte {pos}, which a "
                            "PyTorch checkpoint never does")


_CORRUPT = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, pickle.UnpicklingError,
            OSError, ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError,
            RecursionError, NotImplementedError, MemoryError)


def load_pth(path: str | Path) -> Any:
  """Loads a torch zip-pickle checkpoint into nested dicts of numpy arrays.

  Raises CheckpointError with the file name for a missing, truncated or foreign file.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as f:
      head = f.read(8)
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
      raise CheckpointError(
          f"{path}: a legacy (pre-1.6, non-zip) PyTorch file; re-save it with "
          "torch.save(obj, path) from a recent PyTorch, or use the official release file")
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (not a zip archive; truncated "
                          "download or a different kind of file?)")
  try:
    with zipfile.ZipFile(path) as zf:
      pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
      if not pkls:
        raise CheckpointError(f"{path}: zip archive without data.pkl: not a PyTorch checkpoint")
      prefix = pkls[0][: -len("/data.pkl")] if "/" in pkls[0] else ""
      if zf.getinfo(pkls[0]).file_size > _MAX_PICKLE_BYTES:
        raise CheckpointError(f"{pkls[0]} is larger than {_MAX_PICKLE_BYTES >> 20} MiB")
      data = zf.read(pkls[0])
      _check_opcodes(data)
      return _Unpickler(io.BytesIO(data), zf, prefix).load()
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from None
  except _CORRUPT as e:  # a damaged pickle can fail in any of these ways inside the unpickler
    detail = repr(str(e))[1:-1][:200]  # escaped: the text may quote raw pickle bytes
    raise CheckpointError(f"{path}: corrupt or truncated checkpoint "
                          f"({type(e).__name__}: {detail})") from e
