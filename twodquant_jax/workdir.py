"""Who may write a workdir: one run at a time (a lock file), and not over a different run's results.

`claim(workdir, config_dict, overwrite)` refuses, before anything is written, when the workdir's
finished run (its results.json) was made with a config that differs in a field that changes
results, unless `overwrite`; then it takes `<workdir>/.lock` (PID, host, start time) for the
run's duration. A lock left by a process that is gone (same host) is named and replaced; a live
one, or one from another host, stops the run with a line saying which process holds it.

A claim that created the workdir removes it again when the run leaves nothing in it but the
lock (a first run that failed before any work, e.g. a failed download).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from absl import logging
from flax import traverse_util

LOCK_FILE = ".lock"

# Config fields that do not change any number in results.json: a rerun may differ in them.
NEUTRAL_FIELDS = ("progress", "overwrite", "report", "eval.save_sr", "model.cache_dir",
                  "dqc.data_workers", "eval.batch_size", "eval.batch_pixels")


class WorkdirError(RuntimeError):
  """The workdir is in use by another run, or holds a different run's results."""


def _normalise(config_dict: Mapping) -> dict[str, Any]:
  """As results.json stores it (JSON round trip: tuples become lists), minus neutral fields."""
  flat = traverse_util.flatten_dict(json.loads(json.dumps(dict(config_dict), default=float)),
                                    sep=".")
  return {k: v for k, v in flat.items()
          if not any(k == n or k.startswith(n + ".") for n in NEUTRAL_FIELDS)}


def config_differences(old: Mapping, new: Mapping) -> list[str]:
  """Fields (dotted) whose values differ between two config dicts, ignoring neutral fields and
  fields only one of them has (added or removed since the older run: it could not set them)."""
  a, b = _normalise(old), _normalise(new)
  return sorted(k for k in set(a) & set(b) if a[k] != b[k])


def check_finished_run(workdir: Path, config_dict: Mapping, overwrite: bool) -> None:
  """Raises WorkdirError when workdir/results.json was made with a config differing in a field
  that changes results (and `overwrite` is False). Reads only."""
  path = Path(workdir) / "results.json"
  if overwrite or not path.is_file():
    return
  try:
    old = json.loads(path.read_text()).get("config")
  except (json.JSONDecodeError, OSError, AttributeError) as e:
    raise WorkdirError(f"{path} is unreadable ({e}); use another --workdir or pass "
                       "--config.overwrite=True to replace it") from e
  if not isinstance(old, Mapping):
    return
  diff = config_differences(old, config_dict)
  if diff:
    shown = ", ".join(f"{k} ({_normalise(old).get(k)!r} -> {_normalise(config_dict).get(k)!r})"
                      for k in diff[:4])
    more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
    raise WorkdirError(f"{workdir} holds the results of a run with a different config ({shown}"
                       f"{more}); use another --workdir, or pass --config.overwrite=True to "
                       "replace them")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def _read_lock(path: Path) -> dict | None:
  try:
    info = json.loads(path.read_text())
    return info if isinstance(info, dict) else None
  except (OSError, json.JSONDecodeError):
    return None


def acquire(workdir: Path) -> Path:
  """Creates workdir/.lock atomically (O_EXCL) holding this process's PID and host.

  A lock of a process that no longer runs on this host is stale: it is named in the log and
  replaced. Raises WorkdirError when a live run (or a run on another host) holds the lock.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / LOCK_FILE
  me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
  for _ in range(3):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      info = _read_lock(path)
      if info is None:
        time.sleep(0.2)  # being written right now? look once more before giving up
        info = _read_lock(path)
      if info is None:
        raise WorkdirError(f"{path} exists but is unreadable; if no run uses {workdir}, "
                           "delete it and start again") from None
      pid, host = info.get("pid"), info.get("host")
      if host == me["host"] and isinstance(pid, int) and not _alive(pid):
        logging.warning("workdir: removing the stale lock %s of PID %d on %s (that process is "
                        "gone)", path, pid, host)
        with contextlib.suppress(FileNotFoundError):
          path.unlink()
        continue
      started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
      where = "" if host == me["host"] else " (another host: cannot check it; delete the lock " \
          "if that run is gone)"
      raise WorkdirError(f"{workdir} is in use by PID {pid} on {host} since {started} "
                         f"({path}){where}; wait for it, use another --workdir, or delete "
                         "the lock if that PID is not a run of this project")
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    return path
  raise WorkdirError(f"could not take the lock {path}: it keeps reappearing")


def release(path: Path) -> None:
  """Removes the lock if it is still this process's."""
  info = _read_lock(path)
  if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
    with contextlib.suppress(FileNotFoundError):
      Path(path).unlink()


def _missing_folders(path: Path) -> list[Path]:
  """`path` and those of its parents that do not exist yet, innermost first."""
  missing = []
  for p in (path, *path.parents):
    if p.exists():
      break
    missing.append(p)
  return missing


@contextlib.contextmanager
def claim(workdir: str | Path, config_dict: Mapping, overwrite: bool = False) -> Iterator[Path]:
  """Checks the finished run (before writing anything), then holds the lock while in the block.

  Folders the claim had to create are removed on the way out when they hold nothing (the lock
  gone): a run that failed before writing leaves no empty workdir behind. A workdir that existed
  before is never removed.
  """
  workdir = Path(workdir)
  check_finished_run(workdir, config_dict, overwrite)
  created = _missing_folders(workdir.absolute())
  lock = acquire(workdir)
  try:
    yield workdir
  finally:
    release(lock)
    for folder in created:  # innermost first; stops at the first one that holds something
      try:
        folder.rmdir()
      except OSError:
        break
