"""Speed settings: dqc.microbatch=auto (memory-fitted microbatch) and the persistent
compilation cache (a second process finds its compiles)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import dqc_tiny
from twodquant_jax import host_runtime
from twodquant_jax import settings as run_settings
from shared_paths import REPO_ROOT
from twodquant_jax.ptq.dqc import memory as dqc_memory
from twodquant_jax.ptq.dqc import step as dqc_step


def _tiny(batch: int):
  params, quant = dqc_tiny.tiny_setup()
  arch = tuple(sorted(dqc_tiny.ARCH.items()))
  settings = run_settings.DQCSettings(scale=dqc_tiny.SCALE, bits=dqc_tiny.BITS, arch=arch,
                                      microbatch=run_settings.AUTO_MICROBATCH)
  lr = np.random.default_rng(0).integers(0, 256, (batch, dqc_tiny.LR_SIZE, dqc_tiny.LR_SIZE, 3),
                                         dtype=np.uint8)
  return params, quant, settings, dqc_step.data_mesh(), lr


def _state(settings, quant):
  """A fresh state on private copies of the bounds (the step donates its state)."""
  return dqc_step.init_state(settings, jax.tree_util.tree_map(np.array, quant))


@pytest.mark.slow
def test_auto_microbatch_fits_the_memory_limit():
  batch = 6
  params, quant, settings, mesh, lr = _tiny(batch)
  # Plenty of memory: the whole batch in one piece, from one compile.
  fn, resolved, info = dqc_memory.train_step_fn(settings, batch, dqc_tiny.LR_SIZE, mesh, params,
                                                quant, limit_bytes=1 << 40)
  assert resolved.microbatch == 0 and info["microbatch"] == batch and info["compiles"] == 1
  whole_bytes = info["bytes"]
  # Just too little for the whole batch: a smaller divisor that fits, found by compiling.
  settings2 = dataclasses.replace(settings, lr=2e-2)  # a distinct decision key (no memo hit)
  fn2, resolved2, info2 = dqc_memory.train_step_fn(settings2, batch, dqc_tiny.LR_SIZE, mesh,
                                                   params, quant, limit_bytes=whole_bytes - 1)
  assert resolved2.microbatch in (1, 2, 3) and info2["bytes"] < whole_bytes
  assert info2["bytes"] <= whole_bytes - 1 or resolved2.microbatch == 1
  # The memo returns the decision without compiling again.
  _, resolved3, info3 = dqc_memory.train_step_fn(settings2, batch, dqc_tiny.LR_SIZE, mesh,
                                                 params, quant, limit_bytes=whole_bytes - 1)
  assert info3["cached"] and info3["compiles"] == 0 and resolved3 == resolved2
  # The returned steps run and give the same loss (microbatches are exact up to float order).
  _, m = fn2(_state(resolved2, quant), lr, params)
  _, m_whole = fn(_state(resolved, quant), lr, params)
  np.testing.assert_allclose(float(m["loss"]), float(m_whole["loss"]), rtol=1e-5)


def test_microbatch_setting_parses():
  c = dqc_tiny.tiny_config(steps=2, batch_size=4)
  assert c.dqc.microbatch == "auto"
  assert run_settings.parse(c).dqc.microbatch == run_settings.AUTO_MICROBATCH
  c.dqc.microbatch = "8"  # what --config.dqc.microbatch=8 gives for a string field
  assert run_settings.parse(c).dqc.microbatch == 8
  c.dqc.microbatch = "eight"
  with pytest.raises(ValueError, match="config.dqc.microbatch"):
    run_settings.parse(c)
  with pytest.raises(ValueError, match="resolved"):
    dqc_step.train_step(None, np.zeros((1, 8, 8, 3), np.uint8), {},
                        run_settings.DQCSettings(microbatch=run_settings.AUTO_MICROBATCH))


_CACHE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax import monitoring
    from twodquant_jax import compile_cache
    events = []
    monitoring.register_event_listener(lambda event, **kw: events.append(event))
    compile_cache.enable(sys.argv[1])
    jax.jit(lambda x: jnp.tanh(x @ x.T) * 0.5).lower(np.ones((32, 32), np.float32)).compile()
    print(json.dumps({k: events.count("/jax/compilation_cache/" + k)
                      for k in ("cache_hits", "cache_misses")}))
""")


def test_compile_cache_is_used_by_a_second_process(tmp_path):
  """JAX's own cache events: the first process misses and writes an entry; a second process
  with the same cache folder hits it (no compile, no new entry)."""
  cache = tmp_path / "xla"
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")

  def run() -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, str(cache)], env=env, check=True,
                         capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])

  first = run()
  assert first["cache_hits"] == 0 and first["cache_misses"] >= 1, first
  entries = sorted(p.name for p in cache.rglob("*") if p.is_file())
  assert len(entries) >= first["cache_misses"], entries  # one entry per compile, at least
  assert run() == {"cache_hits": first["cache_misses"], "cache_misses": 0}
  assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == entries


def test_compile_cache_config_default_and_off(tmp_path):
  from configs.base import get_config  # pylint: disable=g-import-not-at-top
  from twodquant_jax import compile_cache  # pylint: disable=g-import-not-at-top
  assert get_config().compile_cache == compile_cache.DEFAULT
  assert compile_cache.enable("") is None


def test_cpu_devices_of_one_host_share_its_memory(monkeypatch):
  """With config cpu_devices > 1 the CPU devices of this process are one host: the plan counts
  each device's compiled step against the one process limit."""
  from types import SimpleNamespace
  monkeypatch.setenv(dqc_memory.LIMIT_ENV, "12")
  dev = jax.devices("cpu")[0]
  one = SimpleNamespace(devices=np.array([dev], dtype=object))
  two = SimpleNamespace(devices=np.array([dev, dev], dtype=object))
  b1, b2 = dqc_memory.mesh_budget(one), dqc_memory.mesh_budget(two)
  assert (b1.devices, b2.devices) == (1, 2) and b1.limit == b2.limit == 12_000_000_000
  assert b2.planned(10**9) - b1.planned(10**9) == pytest.approx(b1.factor * 10**9, abs=1e7)


def test_cpu_devices_setting_resolves():
  from configs.base import get_config
  c = get_config(scale=4, bits=2)
  c.dqc.batch_size = 32
  host = lambda: run_settings.parse(c).host
  # 'auto' (0): host_runtime splits the DQC batch of this single-process DQC run.
  assert host() == run_settings.HostSettings("auto", cpu_devices=0, dqc_batch=32)
  assert host_runtime.cpu_device_plan(host(), None, cores=2) == (2, "auto")
  c.model.bounds = "given.json"  # bounds given: no DQC, nothing to split
  assert host().dqc_batch == 0
  c.model.bounds = ""
  c.method = "dobi"  # no DQC: nothing to split
  assert host().dqc_batch == 0
  c.method = "2dquant"
  c.distributed.coordinator, c.distributed.num_processes = "localhost:1234", 2
  c.distributed.process_id = 0
  assert host().dqc_batch == 0  # a multi-process run: the processes split the batch
  c.distributed.coordinator, c.distributed.num_processes = "", 0
  c.distributed.process_id = -1
  c.cpu_devices = "3"  # as --config.cpu_devices=3 gives it (a string)
  assert host().cpu_devices == 3
  for bad in ("zero", "0", "-1"):
    c.cpu_devices = bad
    with pytest.raises(ValueError, match="config.cpu_devices"):
      host()
