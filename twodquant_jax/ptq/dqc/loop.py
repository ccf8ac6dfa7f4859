"""The DQC loop: state, data, steps, and periodic log / validation / checkpoint.

Batches are step-indexed (step k uses `sample_batch(seed, step=k)`), so a resumed run sees
exactly the batches an uninterrupted one would. Orbax checkpoints resume automatically; a
non-finite loss or bound stops the run (`NonFiniteError`) without ever checkpointing the bad
state.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from twodquant_jax import distributed
from twodquant_jax.data import patches
from twodquant_jax.ptq.dqc import checkpoint as ckpt
from twodquant_jax.ptq.dqc import memory as dqc_memory
from twodquant_jax.nn.layers import ROUNDING
from twodquant_jax.nn.student import Student
from twodquant_jax.ptq import rounding as rounding_lib
from twodquant_jax.ptq.dqc.step import (DATA_AXIS, DQCState, StudentWeights, Trainables,
                                        bounds_of, check_batch_size, data_mesh, init_state,
                                        make_schedule, student_weights)
from twodquant_jax.settings import DQCSettings, LoopSettings
from twodquant_jax.nn.names import leaves_by_name
from twodquant_jax.nn.quantizer import BOUNDS
from twodquant_jax.progress import Progress


class NonFiniteError(RuntimeError):
  """The DQC loss or a bound became NaN/inf; the last good checkpoint is kept."""

  def __init__(self, step: int, what: str, checkpoint_step: int | None):
    kept = (f"the last good checkpoint (step {checkpoint_step}) is kept"
            if checkpoint_step is not None else "no checkpoint had been written yet")
    super().__init__(f"DQC stopped at step {step}: {what} became non-finite (NaN/inf); {kept}. "
                     "Lower config.dqc.lr or check the initial bounds (l < u).")
    self.step = step
    self.checkpoint_step = checkpoint_step


def run_identity(settings: DQCSettings, loop: LoopSettings, params: Any, quant0: Any
                 ) -> dict[str, Any]:
  """What a checkpoint must agree on to be resumed (all but the step count and bookkeeping),
  in its JSON form (tuples as lists), as it is stored in and read back from a checkpoint.
  The rounding settings count only for a student with learned rounding, and the student's
  options only for a `StudentWeights` student (so the paper's identities are unchanged)."""
  # Not the step count, nor how the step is compiled (`staged`: the same step, in pieces).
  ident = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("steps", "staged")}
  if not isinstance(quant0, Trainables):
    ident = {k: v for k, v in ident.items() if not k.startswith("rounding_")}
  ident.update(seed=loop.seed, batch_size=loop.batch_size, lr_size=loop.lr_size,
               augment=loop.augment, calib_root=loop.calib_root,
               params=ckpt.fingerprint(params), initial_bounds=ckpt.fingerprint(quant0))
  if isinstance(params, StudentWeights):
    ident["student_arch"] = [list(kv) for kv in params.arch]
  return json.loads(json.dumps(ident, default=list))


def bounds_json(quant: Any) -> dict[str, list]:
  """{quantizer name: [lower, upper]} (per-channel bounds: two lists), sorted by name."""
  flat = leaves_by_name(bounds_of(quant), BOUNDS)
  return {k: np.asarray(flat[k], np.float64).tolist() for k in sorted(flat)}


def train_student(fp_params: Mapping, student: Student, quant: Mapping, settings: DQCSettings,
                  loop: LoopSettings, workdir: str | Path, **kwargs
                  ) -> tuple[Student, dict, dict[str, Any]]:
  """DQC of a `Student` against the FP teacher: (the student, with its trained rounding offsets
  when it has learned rounding, the final bounds, info). kwargs as `train`; with learned
  rounding `validate` receives `Trainables`. Offsets start at round-to-nearest's fractions
  (`rounding.init_offsets`) unless the student already holds some."""
  if student.arch.get("rounding") and ROUNDING not in student.extra:
    student = rounding_lib.init_offsets(student, quant, settings.bits)
  final, info = train(fp_params, quant, settings, loop, workdir, student=student, **kwargs)
  if isinstance(final, Trainables):
    student = dataclasses.replace(student, extra={**student.extra, ROUNDING: final.rounding})
  return student, bounds_of(final), info


def train(params: Mapping, quant: Mapping, settings: DQCSettings, loop: LoopSettings,
          workdir: str | Path, *, student: Student | None = None, progress: bool = False,
          mesh: Mesh | None = None,
          validate: Callable[[Mapping], float] | None = None,
          callback: Callable[[int, dict[str, Any]], None] | None = None,
          ) -> tuple[dict, dict[str, Any]]:
  """Runs DQC from the initial bounds `quant` (DOBI's), resuming from <workdir>/dqc_ckpt.

  Args:
    params: the FP model's 'params' (the teacher; and the student, unless `student`).
    quant: initial 'quant' collection (bounds).
    student: the `Student` to train (default: the FP params, the paper). With learned rounding
      (arch 'rounding') its 'rounding' collection trains too, and the final tree returned (and
      passed to `validate`) is `Trainables` (see `train_student`).
    settings, loop: the step's and the loop's settings.
    workdir: where dqc_ckpt/ and dqc_log.jsonl go.
    progress: show a bar on a terminal (else, and always without a terminal, a progress line
      in the log every `loop.progress_every_s` seconds).
    mesh: the device mesh (default: all devices on one 'data' axis).
    validate: bounds -> held-out PSNR, called every `loop.val_every` steps and at the end.
    callback: called as callback(step, scalars) after every completed, finite step.

  Returns:
    (final bounds, info) with info keys steps, steps_run, seconds, steps_per_s,
    compile_seconds (the step's lowering and compile alone; a persistent-cache hit is quick),
    first_step_seconds (compile + one step), final_loss, resumed_from, devices, validation,
    records (every dqc_log.jsonl record of the run, resumed steps included; process 0 only).

  Raises:
    NonFiniteError: the loss or a bound became non-finite (the last good checkpoint is kept).
    ValueError: a checkpoint in workdir from a different run.
  """
  if student is not None:
    if student.arch.get("rounding"):
      if ROUNDING not in student.extra:
        raise ValueError("a student with learned rounding needs its offsets: "
                         "use train_student (or rounding.init_offsets)")
      quant = Trainables(quant=quant, rounding=student.extra[ROUNDING])
    params = student_weights(params, student)
  mesh = mesh or data_mesh()
  check_batch_size(loop.batch_size, mesh)
  repl = NamedSharding(mesh, P())
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  log_path = workdir / ckpt.LOG_FILE
  schedule = make_schedule(settings)
  step_fn, _, memory_info = dqc_memory.train_step_fn(settings, loop.batch_size, loop.lr_size,
                                                     mesh, params, quant)
  put = lambda tree: jax.device_put(jax.tree_util.tree_map(jnp.asarray, tree), repl)
  params = put(params)
  # Steps donate the state's buffers: start from copies, so the caller's bounds stay alive.
  state = put(jax.tree_util.tree_map(jnp.array, init_state(settings, quant)))
  identity = run_identity(settings, loop, params, state.quant)

  manager = ckpt.checkpoint_manager(workdir, loop.keep_checkpoints)
  state, meta = _resume(manager, state, identity, settings.steps, repl)
  start = int(state.step)
  resumed_from = start if meta else None
  seconds_before = float(meta.get("seconds", 0.0))
  final_loss = float(meta.get("loss", float("nan")))
  writer = jax.process_index() == 0  # one log for a multi-process run
  records = ckpt.truncate_log(log_path, start) if writer else []  # the resumed run's log
  validation: list[dict[str, float]] = []
  last_saved = resumed_from
  # Until the first step returns, the bar says the wait is the compile.
  bar = Progress(settings.steps, "DQC (compiling)", initial=start, every_s=loop.progress_every_s,
                 bar=None if progress else False)
  t0 = time.perf_counter()
  first_step_seconds = t_after_first = compile_seconds = None

  def finish(step: int, state: DQCState, metrics: Mapping) -> None:
    """Host side of completed step `step`: finiteness, log, progress, validation, checkpoint.

    `state` is read only at validation / checkpoint steps, which are finished before the next
    step is dispatched (a deferred step's state has been donated to the next step by then).
    """
    nonlocal final_loss, last_saved
    m = jax.device_get(metrics)
    if not bool(m["finite"]):
      manager.wait_until_finished()
      what = "the loss" if not bool(m["loss_finite"]) else "a bound (or the Adam state)"
      raise NonFiniteError(step, what, last_saved)
    final_loss = float(m["loss"])
    seconds = seconds_before + time.perf_counter() - t0
    bar.update(1, loss=final_loss)
    record = None
    if step % loop.log_every == 0 or step == settings.steps:
      record = {"step": step, "loss": final_loss, "l_pix": float(m["l_pix"]),
                "l_feature": float(m["l_feature"]), "lr": float(schedule(step - 1)),
                "seconds": round(seconds, 3)}
    if validate is not None and (step % loop.val_every == 0 or step == settings.steps):
      psnr = validate(jax.device_get(state.quant))  # host copy: a local computation everywhere
      validation.append({"step": step, "psnr": psnr})
      record = {**(record or {"step": step}), "val_psnr": psnr}
      logging.info("DQC step %d: held-out PSNR(Y) %.3f dB", step, psnr)
    if record is not None and writer:
      ckpt.append_log(log_path, record)
      records.append(record)
    if callback is not None:
      callback(step, {k: v.item() for k, v in m.items()})
    if state is not None and (step % loop.checkpoint_every == 0 or step == settings.steps):
      ckpt.save_checkpoint(manager, state, {
          "step": step, "steps": settings.steps, "seconds": seconds, "loss": final_loss,
          "identity": identity, "bounds": bounds_json(state.quant)})
      last_saved = step

  stream = None
  try:
    if start < settings.steps:
      stream = _batches(loop, settings.scale, start, settings.steps - start, mesh)
    pending = None  # (step, state, metrics) of the last dispatched step, checked one step later
    for k in range(start, settings.steps):
      batch = next(stream)
      if k == start:
        step_fn, compile_seconds = _compile_and_meet(step_fn, state, batch, params)
      new_state, metrics = step_fn(state, batch, params)
      if pending is not None:
        finish(*pending)  # overlaps with step k running on the device
      # A non-finite step returns its input state, which was donated: keep the returned one.
      state, pending = new_state, (k + 1, new_state, metrics)
      if first_step_seconds is None:
        jax.block_until_ready(metrics)
        first_step_seconds = time.perf_counter() - t0
        t_after_first = time.perf_counter()
        bar.set_description("DQC")
      periodic = (k + 1) % loop.checkpoint_every == 0 or (
          validate is not None and (k + 1) % loop.val_every == 0)
      if periodic or k + 1 == settings.steps:
        finish(*pending)  # needs the state of step k + 1 itself
        pending = None
    manager.wait_until_finished()
  finally:
    bar.close()
    if stream is not None:
      stream.close()
    manager.close()

  steps_run = settings.steps - start
  timed = steps_run - 1
  rate = (timed / (time.perf_counter() - t_after_first)
          if timed > 0 and t_after_first is not None else float("nan"))
  if steps_run == 0:
    logging.info("DQC: checkpoint already at step %d of %d; nothing to train", start,
                 settings.steps)
  info = {"steps": settings.steps, "steps_run": steps_run, "seconds": time.perf_counter() - t0,
          "steps_per_s": rate, "compile_seconds": compile_seconds,
          "first_step_seconds": first_step_seconds,
          "final_loss": final_loss, "resumed_from": resumed_from,
          "devices": [str(d) for d in mesh.devices.flat], "batch_size": loop.batch_size,
          "loss": settings.loss, "schedule": settings.schedule, "validation": validation,
          "microbatch": memory_info, "records": records}
  return jax.device_get(state.quant), info


def _compile_and_meet(step_fn, state: DQCState, batch: jax.Array, params: Mapping
                      ) -> tuple[Callable, float]:
  """Compiles the step ahead of its first call, timed alone (results.json's compile_seconds),
  and returns (the compiled step, seconds). Multi-process: then waits for every process to have
  compiled it, so the first step's collectives start together however far apart the compiles
  finish (see `distributed.meet`)."""
  logging.info("DQC: compiling the step")
  t0 = time.perf_counter()
  compiled = dqc_memory.compile_step(step_fn, state, batch, params)
  seconds = time.perf_counter() - t0
  logging.info("DQC: step compiled in %.1f s", seconds)
  if jax.process_count() > 1:
    logging.info("DQC: waiting for the other processes to compile")
    distributed.meet("dqc step compiled")
  return compiled, seconds


def _resume(manager, state: DQCState, identity: Mapping, steps: int, sharding
            ) -> tuple[DQCState, dict]:
  """The latest checkpoint's state and meta if there is one (it must be of this run)."""
  latest = manager.latest_step()
  if latest is None:
    return state, {}
  restored, meta = ckpt.restore_checkpoint(manager, latest, state, sharding)
  diff = ckpt.identity_mismatch(meta["identity"], identity)
  if diff:
    raise ValueError(f"{manager.directory} holds a checkpoint of a different DQC run "
                     f"(differs in {diff}); delete it or use another workdir")
  if meta.get("steps") != steps:
    logging.warning("DQC: checkpoint was made for %s steps, now %d", meta.get("steps"), steps)
  logging.info("DQC: resuming from the checkpoint of step %d in %s", latest, manager.directory)
  return restored, meta


def process_rows(sharding: NamedSharding, batch_size: int) -> list[int]:
  """The rows of a global batch that live on this process's devices, in global order (all rows
  in a single-process run)."""
  shape = (batch_size, 1)
  rows: set[int] = set()
  for index in sharding.addressable_devices_indices_map(shape).values():
    rows.update(range(batch_size)[index[0]])
  return sorted(rows)


def _batches(loop: LoopSettings, scale: int, start: int, num_steps: int, mesh: Mesh):
  """The prefetched, step-indexed stream of uint8 LR batches, sharded along 'data'.

  Each process cuts only its own rows of every (seed, step) batch and the global array is
  assembled from the processes' parts, so N processes train on exactly the batches of one.
  """
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  rows = process_rows(sharding, loop.batch_size)
  source = patches.load_patch_source(loop.calib_root, loop.lr_size * scale)
  global_shape = (loop.batch_size, loop.lr_size, loop.lr_size, 3)
  return patches.prefetch_stream(
      source, loop.seed, start, loop.batch_size, scale=scale, lr_size=loop.lr_size,
      augment=loop.augment, num_steps=num_steps, buffer=4, num_workers=loop.workers(),
      indices=rows, put=lambda b: jax.make_array_from_process_local_data(
          sharding, b["lr"], global_shape))
