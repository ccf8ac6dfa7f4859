"""Multi-process runs on JAX's own runtime (`jax.distributed`): start-up, who writes, agreement.

Every process runs the same job. DQC's step is one jitted data-parallel program over the
devices of all processes (each process cuts its own rows of every batch, ptq/dqc/loop.py); the
rest (calibration, evaluation) is computed by every process, with the values that must agree
(DOBI's bounds, a sweep's skip decisions) taken from process 0. Only process 0 writes results,
bounds, figures and logs; orbax checkpoints are written in orbax's multi-process mode.

A dead peer stops the others: JAX's coordination service misses its heartbeats for
`timeout_s` seconds and terminates every other process with "Terminating process because the
JAX distributed service detected fatal errors ... another task died" (exit status 134).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging

from twodquant_jax.settings import DistributedSettings

# Environment variables that JAX's cluster auto-detection reads (besides its own).
_CLUSTER_HINT_VARS = ("JAX_COORDINATOR_ADDRESS",)


def detected_cluster() -> str | None:
  """The name of a cluster environment JAX's auto-detection would use (SLURM, Open MPI, a Cloud
  TPU pod, Kubernetes jobs...), or None (e.g. on a laptop, where initialize would not return)."""
  for var in _CLUSTER_HINT_VARS:
    if os.environ.get(var):
      return var
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
      if not env.opt_in_only_method and env.is_env_present():
        return env.__name__
  except Exception as e:  # pylint: disable=broad-except  # private API: never fatal
    logging.info("distributed: cluster auto-detection unavailable (%s)", e)
  return None


def initialize(settings: DistributedSettings) -> bool:
  """Joins the multi-process run the settings (or the detected cluster) describe.

  Returns True for a run of several processes. Must come before any other JAX call that
  touches devices. With no coordinator and no detected cluster this is a no-op (one process).
  """
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  kwargs: dict[str, Any] = dict(initialization_timeout=settings.init_timeout_s,
                                heartbeat_timeout_seconds=settings.timeout_s,
                                shutdown_timeout_seconds=settings.init_timeout_s)
  if settings.coordinator:
    kwargs.update(coordinator_address=settings.coordinator,
                  num_processes=settings.num_processes, process_id=settings.process_id)
    how = f"coordinator {settings.coordinator}"
  else:
    cluster = detected_cluster() if settings.auto else None
    if cluster is None:
      return False
    how = f"auto-detected {cluster}"
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process
  jax.distributed.initialize(**kwargs)
  if jax.process_index() != 0:  # one log: the others report warnings and errors only
    logging.set_verbosity(logging.WARNING)
  logging.info("distributed: process %d of %d (%s); %d local / %d global devices; a peer "
               "silent for %d s stops this run", jax.process_index(), jax.process_count(), how,
               jax.local_device_count(), jax.device_count(), settings.timeout_s)
  return jax.process_count() > 1


def is_primary() -> bool:
  """True on the process that writes files (process 0; the only one in a 1-process run)."""
  return jax.process_index() == 0


def from_primary(tree: Any, what: str = "values") -> Any:
  """Process 0's copy of a pytree of arrays on every process (the tree itself with one process).

  Logs a warning when this process's own copy differed (e.g. another GPU model computed a
  different float rounding), so a mismatch is visible but never silently splits the run.
  """
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  host = jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
  shared = jax.tree_util.tree_map(np.asarray, multihost_utils.broadcast_one_to_all(host))
  same = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(host),
                                                   jax.tree_util.tree_leaves(shared)))
  if not same:
    logging.warning("distributed: process %d's %s differed from process 0's; using process 0's",
                    jax.process_index(), what)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(host),
                                      jax.tree_util.tree_leaves(shared))


def agree(flag: bool) -> bool:
  """Process 0's boolean on every process (e.g. "this sweep cell is finished")."""
  return bool(from_primary(np.asarray(flag, np.int32), "decision"))
