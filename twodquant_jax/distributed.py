"""Multi-process runs on JAX's own runtime (`jax.distributed`): start-up, who writes, agreement.

Every process runs the same job. DQC's step is one jitted data-parallel program over the
devices of all processes (each process cuts its own rows of every batch, ptq/dqc/loop.py); the
rest (calibration, evaluation) is computed by every process, with the values that must agree
(DOBI's bounds, a sweep's skip decisions) taken from process 0. Only process 0 writes results,
bounds, figures and logs; orbax checkpoints are written in orbax's multi-process mode.

A dead peer stops the others: JAX's coordination service misses its heartbeats for
`timeout_s` seconds and terminates every other process with "Terminating process because the
JAX distributed service detected fatal errors ... another task died" (exit status 134).

Processes meet (`meet`) before each first collective: XLA:CPU's Gloo collectives wait only 30 s
for a peer (to set up a communicator, and in each operation), so two processes that reach the
same step a minute apart, e.g. one compiled it slower on a loaded machine, would fail there.
The meeting is a barrier of JAX's coordination service (no collective); it waits up to
`init_timeout_s`, so a slow compile only delays the run. A process that misses it stops with
`PeerError`, one line, and leaves at once (`exit_now`: JAX's shutdown barrier would only wait
for the missing peer and then abort with a stack dump).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, NoReturn

import jax
import numpy as np
from absl import logging

from twodquant_jax.settings import DistributedSettings

# Environment variables that JAX's cluster auto-detection reads (besides its own).
_CLUSTER_HINT_VARS = ("JAX_COORDINATOR_ADDRESS",)
_BARRIER_PREFIX = "twodquant:"
# The settings this process joined its run with: process-wide like the run itself (JAX keeps its
# coordination client the same way); `meet` reads its limit here.
_JOINED: dict[str, "DistributedSettings"] = {}


class PeerError(RuntimeError):
  """The processes of a multi-process run did not meet in time (one is slow, stuck or gone)."""


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
  _JOINED["settings"] = settings  # `meet`'s limit, as long as the process is in the run
  if jax.process_index() != 0:  # one log: the others report warnings and errors only
    logging.set_verbosity(logging.WARNING)
  logging.info("distributed: process %d of %d (%s); %d local / %d global devices; a peer "
               "silent for %d s stops this run", jax.process_index(), jax.process_count(), how,
               jax.local_device_count(), jax.device_count(), settings.timeout_s)
  return jax.process_count() > 1


def meet(name: str, timeout_s: float | None = None) -> float:
  """Waits until every process has reached `name` (a no-op with one process); returns the seconds
  this one waited. `timeout_s` defaults to the run's config.distributed.init_timeout_s.

  Call it right before a first collective, after anything slow (compiling) that comes before it.
  Every process must pass the same names in the same order. Raises PeerError when the limit
  passes without every process there.
  """
  if jax.process_count() == 1:
    return 0.0
  if timeout_s is None:
    timeout_s = _JOINED.get("settings", DistributedSettings()).init_timeout_s
  # No public barrier in jax 0.10 (multihost_utils.sync_global_devices is itself a collective).
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  t0 = time.monotonic()
  try:
    client.wait_at_barrier(_BARRIER_PREFIX + name, int(timeout_s * 1000))
  except jax.errors.JaxRuntimeError as e:
    first = (str(e).strip() or type(e).__name__).splitlines()[0].split(". ")[0]
    raise PeerError(
        f"process {jax.process_index()} of {jax.process_count()}: the processes did not all "
        f"reach '{name}' within {timeout_s:g} s ({first}); if one is only slow (compiling on a "
        "busy machine) raise config.distributed.init_timeout_s, else see the other processes' "
        "logs") from e
  waited = time.monotonic() - t0
  logging.info("distributed: every process reached '%s' (waited %.1f s)", name, waited)
  return waited


def exit_now(status: int) -> NoReturn:
  """Ends this process at once with `status`, after flushing its output and logs.

  For a run whose processes failed to meet (PeerError): a normal exit would first wait in JAX's
  shutdown barrier for the peers, which are not coming, then abort with a C++ stack dump. Call
  it after the error line is written; `finally` blocks have run by then.
  """
  logging.flush()
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  os._exit(status)  # pylint: disable=protected-access


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
  meet(f"from_primary {what}")  # the broadcast is a collective: arrive together
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
