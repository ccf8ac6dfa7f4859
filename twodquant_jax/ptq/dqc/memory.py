"""`dqc.microbatch = auto`: the largest microbatch whose compiled DQC step fits the device memory.

The step is lowered and compiled for candidate microbatches (divisors of the batch, largest
first); XLA's `memory_analysis()` of each (temp + arguments + outputs) is compared with what the
device offers: `memory_stats()['bytes_limit']` on an accelerator, the available RAM
(/proc/meminfo MemAvailable) on CPU, both with headroom. After a candidate that does not fit,
the next one tried is the largest whose size, extrapolated from the measured bytes per sample,
fits (then verified by its own compile), so usually one or two compiles decide. The step the
loop runs is the ordinary jitted one for the chosen microbatch (with the persistent compilation
cache on, as in the pipeline, its compile is a cache hit). The decision is cached in-process and,
when the persistent compilation cache is on, in `microbatch.json` of the project cache folder
(`cache.root()`; reused while its measured size still fits).
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
from twodquant_jax.ptq.dqc.step import (AUTO_MICROBATCH, DATA_AXIS, DQCSettings, init_state,
                                        jit_train_step)

# Fraction of the device's memory a step may plan to use (fragmentation, the data pipeline,
# other processes on a shared CPU host).
HEADROOM = 0.85
DECISIONS_FILE = "microbatch.json"


def _meminfo_available() -> int | None:
  try:
    for line in Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def device_memory_bytes(device: jax.Device) -> int:
  """Bytes a compiled step may use on `device`: its allocator's limit on an accelerator, the
  available RAM on CPU (MemAvailable; else total physical memory), times HEADROOM."""
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    if limit:
      return int(HEADROOM * (int(limit) - int(stats.get("bytes_in_use", 0))))
  avail = _meminfo_available()
  if avail is None:
    avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return int(HEADROOM * avail)


def mesh_device_bytes(mesh: Mesh) -> int:
  """Bytes one device of the mesh may use: CPU devices of this process share the host's RAM
  (config cpu_devices > 1), so each gets its share."""
  dev = mesh.devices.flat[0]
  total = device_memory_bytes(dev)
  if dev.platform == "cpu":
    local = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
    total //= max(1, local)
  return total


def compiled_bytes(compiled: Any) -> int:
  """temp + argument + output bytes of a compiled executable (XLA memory analysis, per device)."""
  m = compiled.memory_analysis()
  if m is None:
    raise RuntimeError("this backend gives no memory analysis; set dqc.microbatch to a number")
  return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
             - getattr(m, "alias_size_in_bytes", 0))


def candidates(batch: int, num_devices: int) -> list[int]:
  """Microbatch sizes to try, largest first: divisors of the batch that keep every microbatch
  spread over all devices (multiples of the device count), the whole batch first."""
  divs = [d for d in range(batch, 0, -1) if batch % d == 0 and d % num_devices == 0]
  return divs or [batch]


def _decision_key(settings: DQCSettings, batch: int, lr_size: int, mesh: Mesh) -> str:
  dev = mesh.devices.flat[0]
  fields = dataclasses.asdict(dataclasses.replace(settings, microbatch=AUTO_MICROBATCH, steps=1))
  return json.dumps({"settings": fields, "batch": batch, "lr_size": lr_size,
                     "platform": dev.platform, "kind": dev.device_kind,
                     "devices": int(mesh.devices.size), "jax": jax.__version__},
                    sort_keys=True, default=str)


def _decisions_path() -> Path | None:
  """<cache root>/microbatch.json while the persistent compilation cache is on (the decision
  is only worth keeping when the chosen step's compile is kept too), else None."""
  return cache.root() / DECISIONS_FILE if jax.config.jax_compilation_cache_dir else None


def _load_decision(key: str) -> dict | None:
  path = _decisions_path()
  if path is None or not path.is_file():
    return None
  try:
    return json.loads(path.read_text()).get(key)
  except (OSError, ValueError):
    return None


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


def train_step_fn(settings: DQCSettings, batch: int, lr_size: int, mesh: Mesh, params: Mapping,
                  quant: Mapping, limit_bytes: int | None = None
                  ) -> tuple[Callable, DQCSettings, dict[str, Any]]:
  """The step function for `settings`, its microbatch resolved when it is 'auto'.

  `params` and `quant` (the initial bounds) only give shapes; nothing is computed on them.

  Returns (step_fn(state, lr_u8, params) -> (state, metrics), the resolved settings, info with
  'microbatch', 'bytes', 'limit_bytes', 'compiles', 'cached'). An explicit microbatch returns the
  ordinary `jit_train_step` untouched.
  """
  if settings.microbatch != AUTO_MICROBATCH:
    return jit_train_step(settings, mesh), settings, {"microbatch": settings.microbatch}
  limit = int(limit_bytes) if limit_bytes else mesh_device_bytes(mesh)
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
  abstract = lambda tree, sh: jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a), sharding=sh), tree)
  state = jax.eval_shape(lambda: init_state(settings, quant))
  args = (abstract(state, repl),
          jax.ShapeDtypeStruct((batch, lr_size, lr_size, 3), jnp.uint8, sharding=data),
          abstract(params, repl))
  key = _decision_key(settings, batch, lr_size, mesh)
  memo = _memo(key)
  known = memo.get("decision") or _load_decision(key)
  if known and known["bytes"] <= limit:
    resolved = _with_microbatch(settings, int(known["microbatch"]), batch)
    info = dict(known, limit_bytes=limit, compiles=0, cached=True)
    logging.info("DQC microbatch auto: %d (cached decision, %.2f GB of %.2f GB)",
                 known["microbatch"], known["bytes"] / 1e9, limit / 1e9)
    return jit_train_step(resolved, mesh), resolved, info

  cands = candidates(batch, int(mesh.devices.size))
  tried: dict[int, int] = {}
  i = 0
  while True:
    mb = cands[i]
    resolved = _with_microbatch(settings, mb, batch)
    compiled = jit_train_step(resolved, mesh).lower(*args).compile()
    need = compiled_bytes(compiled)
    tried[mb] = need
    logging.info("DQC microbatch auto: %d needs %.2f GB (limit %.2f GB)", mb, need / 1e9,
                 limit / 1e9)
    if need <= limit or i == len(cands) - 1:
      break
    # Next: the largest smaller candidate whose linearly extrapolated size fits.
    per_sample = need / mb
    nxt = next((j for j in range(i + 1, len(cands)) if per_sample * cands[j] <= limit),
               len(cands) - 1)
    i = max(nxt, i + 1)
  if need > limit:
    logging.warning("DQC microbatch auto: even microbatch %d needs %.2f GB > %.2f GB available; "
                    "trying it anyway", mb, need / 1e9, limit / 1e9)
  decision = {"microbatch": mb, "bytes": need}
  memo["decision"] = decision
  _save_decision(key, decision)
  info = dict(decision, limit_bytes=limit, compiles=len(tried), cached=False,
              tried={str(k): v for k, v in tried.items()})
  # The loop calls the ordinary jitted step (whose dispatch handles the donated state as the
  # loop expects); with the persistent compilation cache on, its compile is a cache hit.
  del compiled
  return jit_train_step(resolved, mesh), resolved, info
