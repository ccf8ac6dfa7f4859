"""Reads PyTorch `.pth` files (the zip-pickle format of torch >= 1.6) into numpy, without torch.

Only the objects a state dict needs are accepted (tensors, ordered dicts, plain containers);
anything else in the pickle is refused, so loading a checkpoint never runs foreign code.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
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
  def __init__(self, name: str):
    self.name = name


def _rebuild_tensor(storage, offset, size, stride, *unused) -> np.ndarray:
  """The numpy counterpart of torch._utils._rebuild_tensor_v2 (a strided view, copied)."""
  size, stride = tuple(size), tuple(stride)
  if not size:
    return np.array(storage[offset])
  needed = offset + 1 + sum((s - 1) * st for s, st in zip(size, stride)) if all(size) else 0
  if needed > storage.size:
    raise CheckpointError("a tensor in the checkpoint points past the end of its storage")
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=tuple(st * item for st in stride))
  return np.array(view)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
  return data


class _Unpickler(pickle.Unpickler):
  """An unpickler that knows only the classes a state dict is made of."""

  def __init__(self, file, zf: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self._zf = zf
    self._prefix = prefix
    self._cache: dict[str, np.ndarray] = {}

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
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise CheckpointError(f"unexpected persistent id in checkpoint: {pid!r}")
    _, storage_type, key, _location, numel = pid
    if key in self._cache:
      return self._cache[key]
    try:
      raw = self._zf.read(f"{self._prefix}/data/{key}")
    except KeyError as e:
      raise CheckpointError(f"storage {key} is missing from the checkpoint archive") from e
    name = storage_type.name if isinstance(storage_type, _StorageType) else str(storage_type)
    if name == "BFloat16Storage":
      arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
      arr = np.frombuffer(raw, _STORAGE_DTYPES[name])
    if arr.size != numel:
      raise CheckpointError(f"storage {key} holds {arr.size} values, the pickle says {numel}: "
                            "the file is truncated or corrupt")
    self._cache[key] = arr
    return arr


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
      with zf.open(pkls[0]) as f:
        return _Unpickler(f, zf, prefix).load()
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from None
  except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, OSError, ValueError) as e:
    raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({e})") from e
