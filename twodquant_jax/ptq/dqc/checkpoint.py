"""DQC run state on disk: orbax checkpoints of the `DQCState`, the run identity a checkpoint
must match to be resumed, and the JSON-lines scalar log."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding

from twodquant_jax import files

if TYPE_CHECKING:  # annotations only: the step module sits above this one
  from twodquant_jax.ptq.dqc.step import DQCState  # pylint: disable=g-import-not-at-top

LOG_FILE = "dqc_log.jsonl"
CKPT_DIR = "dqc_ckpt"


def fingerprint(tree: Mapping) -> str:
  """sha256 of a tree's leaf paths and float32 bytes (identifies the weights / initial bounds)."""
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
  for path, v in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.asarray(v, np.float32).tobytes())
  return h.hexdigest()


def checkpoint_manager(workdir: str | Path, keep: int = 2, read_only: bool = False
                       ) -> ocp.CheckpointManager:
  """The orbax manager of <workdir>/dqc_ckpt (items 'state' = DQCState, 'meta' = JSON).

  A writing manager also removes the temporary folders of saves cut short by a kill. In a
  multi-process run every process calls it (and save/restore) with the same folder, which must
  be on storage all processes see; orbax's multi-process mode makes process 0 the primary host
  that writes the metadata and synchronises the others with barriers.
  """
  multiprocess = ocp.options.MultiprocessingOptions(primary_host=0)
  if read_only:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                           multiprocessing_options=multiprocess)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True,
                                           cleanup_tmp_directories=True,
                                           multiprocessing_options=multiprocess)
  return ocp.CheckpointManager(Path(workdir).resolve() / CKPT_DIR, options=options,
                               item_names=("state", "meta"))


def save_checkpoint(manager: ocp.CheckpointManager, state: DQCState, meta: Mapping) -> None:
  manager.save(int(state.step), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))), force=True)


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, like: DQCState,
                       sharding: NamedSharding | None = None) -> tuple[DQCState, dict]:
  """Restores checkpoint `step` as (a DQCState shaped like `like`, meta)."""
  def abstract(x):
    return jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=sharding)

  target = jax.tree_util.tree_map(abstract, like)
  got = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  return got["state"], got["meta"]


def identity_mismatch(saved: Mapping[str, Any], identity: Mapping[str, Any]) -> dict:
  """{key: (saved, now)} for every field where a checkpoint's run identity differs."""
  return {k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v}


def truncate_log(path: Path, last_step: int) -> list[dict[str, Any]]:
  """Keeps only the log lines of steps <= last_step (a resumed run rewrites the rest); returns
  their records."""
  if not path.exists():
    return []
  kept, records = [], []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
      if record.get("step", 0) <= last_step:
        kept.append(line)
        records.append(record)
    except (json.JSONDecodeError, AttributeError):  # a line cut by a kill
      continue
  files.atomic_write(path, "".join(k + "\n" for k in kept))
  return records


def append_log(path: Path, record: Mapping[str, Any]) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record, default=float) + "\n")
