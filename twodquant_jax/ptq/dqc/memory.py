"""`dqc.microbatch = auto`: the largest microbatch whose DQC step fits the memory the run has.

The step is lowered and compiled for candidate microbatches (divisors of the batch, largest
first) and XLA's `memory_analysis()` of each (temp + arguments + outputs, per device) gives its
need. What is compared with the limit depends on the device:

- CPU: the process's resident size is what the kernel kills, so the plan is the resident size
  the process will hold: the measured resident baseline (VmRSS, just before DQC) plus the step's
  need on every local device times STEP_FACTOR plus STEP_MARGIN (both measured: the step's
  resident growth over the baseline, including the executable and XLA:CPU's worker threads'
  blocks, docs/measured/memory.md). The limit is the process's: $TWODQUANT_MEMORY_LIMIT_GB when
  set (to plan for less than the machine has, or to test this), else what it holds now plus
  HEADROOM x the available RAM (/proc/meminfo MemAvailable).
- an accelerator: the step's need against `memory_stats()['bytes_limit']` (minus what is in
  use), times HEADROOM.

When even the smallest candidate does not fit, `MemoryLimitError` (a ValueError: main.py prints
its one line) names what to change; the pipeline asks before DOBI and again, with the resident
size then, before DQC. A numeric microbatch is checked the same way before DOBI
(`check_explicit`: its one line names --config.dqc.microbatch). After a candidate that does not fit, the next one tried is the
largest whose size, extrapolated from the measured bytes per sample, fits (then verified by its
own compile), so usually one or two compiles decide. The step the loop runs is the ordinary
jitted one for the chosen microbatch (with the persistent compilation cache on, as in the
pipeline, its compile is a cache hit). The XLA need per candidate is cached in-process and,
when the persistent compilation cache is on, in `microbatch.json` of the project cache folder
(`cache.root()`); the fit is decided again each time against the resident size then.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from twodquant_jax import cache, files
from twodquant_jax.ptq.dqc.staged import staged_train_step
from twodquant_jax.ptq.dqc.step import (AUTO_MICROBATCH, DATA_AXIS, DQCSettings, init_state,
                                        jit_train_step, microbatch_size, remat_mode)

from twodquant_jax import host_runtime

# Fraction of the available RAM (or an accelerator's free memory) a plan may use: other
# processes on a shared host, fragmentation.
HEADROOM = 0.85
# The process's memory limit in GB, to plan for less than the machine has (a shared host, a
# container's cgroup limit) and to test the planner.
LIMIT_ENV = "TWODQUANT_MEMORY_LIMIT_GB"
# A CPU DQC run's resident growth over the baseline before it, measured (docs/measured/memory.md):
# STEP_FACTOR x XLA's bytes per device x local devices (the step's buffers with the allocator's
# slack; the compile's heap is reused by them) + STEP_MARGIN (the loop: patch prefetcher,
# checkpointer, thread stacks). glibc under 'keep' holds ~2x the step's buffers (1.98 measured:
# a freed buffer that a small block was then cut from no longer fits the next step's, so two
# steps' buffers alternate); tcmalloc and glibc's own mmap hold ~1.2x (1.17-1.18 measured).
# Each further microbatch of a step adds ROUND_FACTOR (glibc 'keep', batch 32 in microbatches of
# 4, i.e. 8 per step: 2.67x in one run, >= 3.80x in a second (killed at 21.3 GB at step 5, still
# growing); batch 4 in microbatches of 2: 2.01x. 0.3 plans 1.48x, <= 1.10x and 1.18x of them;
# tcmalloc not measured, given the same). With dqc.remat the step's XLA need
# is ~8x smaller (0.31 against 2.69 GB per device at batch 4) and the growth over it 1.36x; the
# same factor 2.0 then plans 1.40x the peak, inside the 1.5x the planner promises. tcmalloc
# (preloaded) holds 0.97-1.02x XLA's need (dqc_speed --batch 4, remat matmuls and off): 1.2
# plans 1.27x and 1.21x of those peaks (docs/measured/memory.md).
STEP_FACTOR = {"glibc": 2.0, "tcmalloc": 1.2}
# Per dqc.remat mode (`remat_mode`), where it differs from STEP_FACTOR. 'full': the step's
# buffers are small and glibc holds less over them: 1.36x measured at batch 4, <= 1.29x at
# batch 32 (its peak was DOBI's); 1.4 plans 1.21x and >= 1.14x of them. 'matmuls': 2.04x over a
# 1.16 GB baseline (dqc_speed --batch 4), 2.55x over the README demo's trimmed 0.49 GB (the
# compile's and the loop's heap come back on top of the step's 2 x 1.23 GB); 2.6 plans 1.08x
# and 1.29x of them.
REMAT_STEP_FACTOR = {"full": {"glibc": 1.4, "tcmalloc": 1.2},
                     "matmuls": {"glibc": 2.6, "tcmalloc": 1.2}}
# The staged step (`dqc.staged`, `staged.StagedStep.need_bytes`): its pieces free their buffers
# as they finish, and the process grew 1.00x (batch 4) and 1.27x (batch 8) XLA's need per device
# (dqc_speed, remat matmuls, glibc 'keep'; tcmalloc not measured, given the same); 1.4 plans
# 1.41x and 1.15x of those peaks.
STAGED_STEP_FACTOR = {"glibc": 1.4, "tcmalloc": 1.4}
ROUND_FACTOR = 0.3
STEP_MARGIN = 0.4e9
DECISIONS_FILE = "microbatch.json"


class MemoryLimitError(ValueError):
  """The DQC step cannot fit the memory limit at any microbatch (one line: what to change)."""
  names_remedy = True  # main.py prints the message as it is


def _meminfo_available() -> int | None:
  try:
    for line in Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def env_limit_bytes(environ: Mapping[str, str] | None = None) -> int | None:
  """$TWODQUANT_MEMORY_LIMIT_GB in bytes, or None when unset; a bad value is a one-line error."""
  value = (os.environ if environ is None else environ).get(LIMIT_ENV, "").strip()
  if not value:
    return None
  try:
    gb = float(value)
  except ValueError:
    gb = -1.0
  if not gb > 0:
    raise ValueError(f"{LIMIT_ENV}={value!r} is not a positive number of GB; fix or unset it")
  return int(gb * 1e9)


@dataclasses.dataclass(frozen=True)
class Budget:
  """What a step's XLA need (bytes per device) is planned against.

  planned(need, rounds) = baseline + (factor + per_round * (rounds - 1)) * devices * need
  + margin, which must be <= limit (`rounds`: the microbatches of one step).
  """
  limit: int  # bytes the process (CPU) or one device (accelerator) may use
  baseline: int = 0  # resident bytes before the step (CPU)
  devices: int = 1  # local devices sharing the limit (CPU devices share the host's RAM)
  factor: float = 1.0
  margin: int = 0
  per_round: float = 0.0
  source: str = ""  # where the limit comes from, for the messages

  def planned(self, need: int, rounds: int = 1) -> int:
    factor = self.factor + self.per_round * (rounds - 1)
    return int(self.baseline + factor * self.devices * need + self.margin)

  def fits(self, need: int, rounds: int = 1) -> bool:
    return self.planned(need, rounds) <= self.limit


def host_budget(local_devices: int, environ: Mapping[str, str] | None = None,
                resident: int | None = None, remat: str = "off") -> Budget:
  """The CPU budget of a step with remat mode `remat` ('staged' for the staged step,
  `footprint`): the process's limit
  ($TWODQUANT_MEMORY_LIMIT_GB, else resident now +
  HEADROOM x MemAvailable, else x physical memory) and its resident baseline now."""
  if resident is None:
    now = host_runtime.resident_bytes()
    resident = now["rss"] if now else 0
  limit = env_limit_bytes(environ)
  source = f"{LIMIT_ENV}"
  if limit is None:
    avail = _meminfo_available()
    if avail is None:
      avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit, source = int(resident + HEADROOM * avail), "resident + available RAM"
  factors = (STAGED_STEP_FACTOR if remat == "staged" else
             REMAT_STEP_FACTOR.get(remat, STEP_FACTOR))
  factor = factors["tcmalloc" if host_runtime.loaded_tcmalloc() else "glibc"]
  return Budget(limit=limit, baseline=resident, devices=max(1, local_devices), factor=factor,
                margin=int(STEP_MARGIN), per_round=ROUND_FACTOR, source=source)


def device_memory_bytes(device: jax.Device) -> int:
  """Bytes a compiled step may use on an accelerator `device`: its allocator's limit minus what
  is in use, times HEADROOM (0 when the device reports no limit)."""
  stats = device.memory_stats() or {}
  limit = stats.get("bytes_limit")
  return int(HEADROOM * (int(limit) - int(stats.get("bytes_in_use", 0)))) if limit else 0


def mesh_budget(mesh: Mesh, limit_bytes: int | None = None, remat: str = "off") -> Budget:
  """The budget of a step on `mesh`: the host's (CPU devices of this process share its RAM),
  or one accelerator's memory. `limit_bytes` replaces the limit (tests, callers that know)."""
  dev = mesh.devices.flat[0]
  if dev.platform != "cpu":
    limit = int(limit_bytes) if limit_bytes else device_memory_bytes(dev)
    if limit:
      return Budget(limit=limit, source=f"{dev.platform} memory")
  local = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
  budget = host_budget(local, remat=remat)
  return dataclasses.replace(budget, limit=int(limit_bytes)) if limit_bytes else budget


def compiled_bytes(compiled: Any) -> int:
  """temp + argument + output bytes of a compiled executable (XLA memory analysis, per device)."""
  m = compiled.memory_analysis()
  if m is None:
    raise RuntimeError("this backend gives no memory analysis; set dqc.microbatch to a number")
  return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
             - getattr(m, "alias_size_in_bytes", 0))


def footprint(settings: DQCSettings) -> str:
  """What sets the step's growth over XLA's need on a host: 'staged' (`dqc.staged`), else the
  remat mode (`host_budget`'s `remat`)."""
  return "staged" if settings.staged else remat_mode(settings)


def train_step(settings: DQCSettings, mesh: Mesh) -> Callable:
  """The step the loop runs: (state, lr_u8, params) -> (state, metrics), staged
  (`staged.StagedStep`, `dqc.staged`) or one jitted program (`step.jit_train_step`)."""
  return staged_train_step(settings, mesh) if settings.staged else jit_train_step(settings, mesh)


def compile_step(step_fn: Callable, *args) -> Callable:
  """`step_fn` (from `train_step`) compiled ahead for `args` (arrays or ShapeDtypeStructs)."""
  if hasattr(step_fn, "need_bytes"):  # a StagedStep: compiles its pieces
    return step_fn.compile(*args)
  return step_fn.lower(*args).compile()


def step_need(settings: DQCSettings, mesh: Mesh, args: tuple) -> int:
  """XLA's memory need per device of the step of `settings` (compiled for abstract `args`)."""
  compiled = compile_step(train_step(settings, mesh), *args)
  return compiled.need_bytes() if hasattr(compiled, "need_bytes") else compiled_bytes(compiled)


def candidates(batch: int, num_devices: int) -> list[int]:
  """Microbatch sizes to try, largest first: divisors of the batch that keep every microbatch
  spread over all devices (multiples of the device count), the whole batch first."""
  divs = [d for d in range(batch, 0, -1) if batch % d == 0 and d % num_devices == 0]
  return divs or [batch]


def _decision_key(settings: DQCSettings, batch: int, lr_size: int, mesh: Mesh) -> str:
  dev = mesh.devices.flat[0]
  fields = dataclasses.asdict(dataclasses.replace(settings, microbatch=AUTO_MICROBATCH, steps=1))
  return json.dumps({"needs": 2, "settings": fields, "batch": batch, "lr_size": lr_size,
                     "platform": dev.platform, "kind": dev.device_kind,
                     "devices": int(mesh.devices.size), "jax": jax.__version__},
                    sort_keys=True, default=str)


def _decisions_path() -> Path | None:
  """<cache root>/microbatch.json while the persistent compilation cache is on (the decision
  is only worth keeping when the chosen step's compile is kept too), else None."""
  return cache.root() / DECISIONS_FILE if jax.config.jax_compilation_cache_dir else None


def _load_decision(key: str) -> dict[int, int]:
  """{microbatch: XLA bytes per device} measured before for `key` ({} when none)."""
  path = _decisions_path()
  if path is None or not path.is_file():
    return {}
  try:
    entry = json.loads(path.read_text()).get(key) or {}
    return {int(k): int(v) for k, v in entry.items()}
  except (OSError, ValueError, TypeError, AttributeError):
    return {}


def _save_decision(key: str, value: dict) -> None:
  path = _decisions_path()
  if path is None:
    return
  try:
    table = json.loads(path.read_text()) if path.is_file() else {}
  except (OSError, ValueError):
    table = {}
  table[key] = value
  files.write_json(path, table)


def _with_microbatch(settings: DQCSettings, mb: int, batch: int) -> DQCSettings:
  return dataclasses.replace(settings, microbatch=0 if mb >= batch else mb)


@functools.lru_cache(maxsize=16)
def _memo(key: str) -> dict:
  return {}


def _known_needs(key: str) -> dict[int, int]:
  """{microbatch: XLA bytes per device} measured for `key`: in this process, else on disk."""
  return dict(_memo(key).get("needs") or _load_decision(key))


def _remember(key: str, needs: dict[int, int]) -> None:
  _memo(key)["needs"] = dict(needs)
  _save_decision(key, {str(k): v for k, v in needs.items()})


def _abstract_args(settings: DQCSettings, batch: int, lr_size: int, mesh: Mesh, params: Mapping,
                   quant: Mapping) -> tuple:
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
  abstract = lambda tree, sh: jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a), sharding=sh), tree)
  state = jax.eval_shape(lambda q: init_state(settings, q), quant)  # arrays or shapes
  return (abstract(state, repl),
          jax.ShapeDtypeStruct((batch, lr_size, lr_size, 3), jnp.uint8, sharding=data),
          abstract(params, repl))


def _too_big(budget: Budget, mb: int, need: int, rounds: int = 1,
             explicit: int | None = None) -> MemoryLimitError:
  """The one-line stop; `explicit`: the user's numeric dqc.microbatch, which is then named."""
  gb = lambda b: f"{b / 1e9:.1f} GB"
  planned = budget.planned(need, rounds)
  resident = (f"{gb(budget.baseline)} resident now + " if budget.baseline else "")
  at = (f"at --config.dqc.microbatch={explicit} (microbatch {mb})" if explicit is not None
        else f"even at microbatch {mb}")
  change = ("lower --config.dqc.microbatch (or set it to auto), --config.dqc.batch_size or "
            if explicit is not None else "lower --config.dqc.batch_size or ")
  return MemoryLimitError(
      f"DQC needs about {gb(planned)} {at} ({resident}"
      f"{gb(planned - budget.baseline)} for the step) but the limit is "
      f"{gb(budget.limit)} ({budget.source}): {change}"
      f"--config.calib.lr_size, or free memory (or raise {LIMIT_ENV})")


def check_explicit(settings: DQCSettings, batch: int, lr_size: int, mesh: Mesh,
                   params: Mapping, quant: Mapping, budget: Budget | None = None
                   ) -> dict[str, Any]:
  """For a numeric dqc.microbatch (0: the whole batch): its step's plan against `budget`
  (default: `mesh_budget`), raising MemoryLimitError (one line naming --config.dqc.microbatch)
  when it cannot fit. Compiles the step once, unless `plan` or an earlier check measured the
  same step (the decisions `plan` keeps: in this process, and on disk with the compilation
  cache on)."""
  if settings.microbatch == AUTO_MICROBATCH:
    raise ValueError("check_explicit is for a numeric dqc.microbatch; 'auto' is planned by plan")
  budget = budget or mesh_budget(mesh, remat=footprint(settings))
  mb = (microbatch_size(batch, settings.microbatch)
        if 0 < settings.microbatch < batch else batch)
  key = _decision_key(settings, batch, lr_size, mesh)
  needs = _known_needs(key)
  if mb not in needs:
    args = _abstract_args(settings, batch, lr_size, mesh, params, quant)
    needs[mb] = step_need(_with_microbatch(settings, mb, batch), mesh, args)
    _remember(key, needs)
  need = needs[mb]
  if not budget.fits(need, batch // mb):
    raise _too_big(budget, mb, need, batch // mb, explicit=settings.microbatch)
  info = {"microbatch": mb, "bytes": need, "planned_bytes": budget.planned(need, batch // mb),
          "limit_bytes": budget.limit, "baseline_bytes": budget.baseline}
  logging.info("DQC microbatch %d (set): planned %.2f GB (%.2f GB resident + step) of %.2f GB",
               mb, info["planned_bytes"] / 1e9, budget.baseline / 1e9, budget.limit / 1e9)
  return info


def plan(settings: DQCSettings, batch: int, lr_size: int, mesh: Mesh, params: Mapping,
         quant: Mapping, budget: Budget | None = None) -> tuple[DQCSettings, dict[str, Any]]:
  """The settings with microbatch 'auto' resolved against `budget` (default: `mesh_budget`),
  and the plan: 'microbatch', 'bytes' (XLA's need per device), 'planned_bytes' (what the
  process or device will hold), 'limit_bytes', 'baseline_bytes', 'compiles', 'cached'.

  `params` and `quant` (the initial bounds) only give shapes; nothing is computed on them.
  Raises MemoryLimitError (one line) when even the smallest microbatch does not fit.
  """
  budget = budget or mesh_budget(mesh, remat=footprint(settings))
  key = _decision_key(settings, batch, lr_size, mesh)
  needs = _known_needs(key)
  cached = bool(needs)
  cands = candidates(batch, int(mesh.devices.size))
  args = None
  compiles = 0

  def need_of(mb: int) -> int:
    nonlocal args, compiles
    if mb not in needs:
      if args is None:
        args = _abstract_args(settings, batch, lr_size, mesh, params, quant)
      needs[mb] = step_need(_with_microbatch(settings, mb, batch), mesh, args)
      compiles += 1
      logging.info("DQC microbatch auto: %d needs %.2f GB per device, %.2f GB planned "
                   "(limit %.2f GB)", mb, needs[mb] / 1e9,
                   budget.planned(needs[mb], batch // mb) / 1e9, budget.limit / 1e9)
    return needs[mb]

  if not budget.fits(0):  # the baseline alone is over the limit: no compile can help
    raise _too_big(budget, cands[-1], 0)
  i = 0
  while True:
    mb = cands[i]
    need = need_of(mb)
    if budget.fits(need, batch // mb):
      break
    if i == len(cands) - 1:
      raise _too_big(budget, mb, need, batch // mb)
    # Next: the largest smaller candidate whose linearly extrapolated size fits.
    per_sample = need / mb
    nxt = next((j for j in range(i + 1, len(cands))
                if budget.fits(int(needs.get(cands[j], per_sample * cands[j])),
                               batch // cands[j])),
               len(cands) - 1)
    i = max(nxt, i + 1)
  if compiles:
    _remember(key, needs)
  info = {"microbatch": mb, "bytes": need, "planned_bytes": budget.planned(need, batch // mb),
          "limit_bytes": budget.limit, "baseline_bytes": budget.baseline,
          "limit_source": budget.source, "compiles": compiles, "cached": cached and not compiles,
          "tried": {str(k): v for k, v in sorted(needs.items())}}
  logging.info("DQC microbatch auto: %d, planned %.2f GB (%.2f GB resident + step) of %.2f GB",
               mb, info["planned_bytes"] / 1e9, budget.baseline / 1e9, budget.limit / 1e9)
  return _with_microbatch(settings, mb, batch), info


def train_step_fn(settings: DQCSettings, batch: int, lr_size: int, mesh: Mesh, params: Mapping,
                  quant: Mapping, limit_bytes: int | None = None
                  ) -> tuple[Callable, DQCSettings, dict[str, Any]]:
  """The step function for `settings`, its microbatch resolved when it is 'auto' (`plan`).

  `limit_bytes`: plan XLA's need per device against this many bytes instead of the process's
  budget (no baseline or margin; tests and callers that know their device).

  Returns (step_fn(state, lr_u8, params) -> (state, metrics), the resolved settings, the plan).
  An explicit microbatch returns the ordinary `jit_train_step` untouched.
  """
  if settings.microbatch != AUTO_MICROBATCH:
    return train_step(settings, mesh), settings, {"microbatch": settings.microbatch}
  budget = Budget(limit=int(limit_bytes), source="limit_bytes") if limit_bytes else None
  resolved, info = plan(settings, batch, lr_size, mesh, params, quant, budget)
  # The loop calls the ordinary jitted step (whose dispatch handles the donated state as the
  # loop expects); with the persistent compilation cache on, its compile is a cache hit.
  return train_step(resolved, mesh), resolved, info
