"""Writing a file so that a reader never sees half of it: the one atomic-write helper.

Every file the project writes that a later run or a person reads (results, bounds, packed models,
tables, caches) goes through `atomic_write` or `atomic_path`: the content lands in a temporary
file beside the target and is renamed over it only when complete, so an interrupted run leaves
either the old file or the new one, never a truncated one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
  """Yields a temporary path beside `path`; renames it over `path` when the block succeeds and
  removes it when the block raises. For writers that want a path (safetensors, orbax, numpy)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  tmp_path = Path(tmp)
  try:
    yield tmp_path
    os.chmod(tmp_path, mode)
    os.replace(tmp_path, path)
  finally:
    with contextlib.suppress(FileNotFoundError):
      tmp_path.unlink()


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
  """Writes `data` (text as UTF-8, or bytes) to `path` atomically; returns the path."""
  with atomic_path(path) as tmp:
    if isinstance(data, bytes):
      tmp.write_bytes(data)
    else:
      tmp.write_text(data, encoding="utf-8")
  return Path(path)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
  """`obj` as JSON (numpy scalars as floats), written atomically."""
  return atomic_write(path, json.dumps(obj, indent=indent, default=float))
