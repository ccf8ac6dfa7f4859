"""dqc.microbatch=auto plans the resident size a run will really hold, and stops a run that
cannot fit with one line (ptq/dqc/memory.py).

The tiny network of dqc_tiny.py trains in a fresh interpreter (the resident size is
per-process); its peak is the interpreter's own high-water mark (VmHWM: ru_maxrss would carry
the forking test process's peak across fork+exec on Linux) and is compared with the plan.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from shared_paths import REPO_ROOT
from twodquant_jax.ptq.dqc import memory as dqc_memory
from twodquant_jax.ptq.dqc import step as dqc_step

TINY_RUN = r"""
import json, sys, tempfile
from pathlib import Path
import dqc_tiny
from twodquant_jax import host_runtime
from twodquant_jax.ptq.dqc import memory
host_runtime.apply_malloc("keep")  # as main.py
params, quant = dqc_tiny.tiny_setup()
config = dqc_tiny.tiny_config(steps=3, batch_size=4, calib_root=Path(sys.argv[1]))
config.dqc.microbatch = "auto"
try:
  _, info = dqc_tiny.train(params, quant, config, tempfile.mkdtemp())
except memory.MemoryLimitError as e:
  print(json.dumps({"error": str(e)}))
  sys.exit(3)
status = Path("/proc/self/status").read_text()
peak = int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) * 1024
print(json.dumps({"plan": info["microbatch"], "peak": peak}))
"""


def _tiny_run(calib_dir, limit_gb: float | None = None) -> tuple[int, dict]:
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", dqc_memory.LIMIT_ENV)}
  env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"),
                                       str(REPO_ROOT / "benchmarks")])
  if limit_gb is not None:
    env[dqc_memory.LIMIT_ENV] = str(limit_gb)
  out = subprocess.run([sys.executable, "-c", TINY_RUN, str(calib_dir)], env=env,
                       capture_output=True, text=True, timeout=600)
  lines = out.stdout.strip().splitlines()
  assert lines, out.stderr[-2000:]
  return out.returncode, json.loads(lines[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")
def test_plan_is_the_real_peak_within_half(calib_dir):
  """The plan covers the run's measured peak resident size and is at most 1.5x of it."""
  rc, out = _tiny_run(calib_dir)
  assert rc == 0, out
  planned, peak = out["plan"]["planned_bytes"], out["peak"]
  assert out["plan"]["baseline_bytes"] > 0  # the resident baseline is part of the plan
  assert peak <= planned <= 1.5 * peak, (planned / 1e9, peak / 1e9)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")
def test_a_limit_below_the_smallest_microbatch_stops_with_one_line(calib_dir):
  """Just above the resident baseline, no microbatch fits: one line naming what to change,
  before any step runs."""
  rc, out = _tiny_run(calib_dir, limit_gb=0.05)
  assert rc == 3, out
  msg = out["error"]
  assert "\n" not in msg and "--config.dqc.batch_size" in msg and dqc_memory.LIMIT_ENV in msg


def test_budget_plans_baseline_plus_every_device():
  b = dqc_memory.Budget(limit=10_000, baseline=1_000, devices=2, factor=1.5, margin=100)
  assert b.planned(1_000) == 1_000 + 3_000 + 100 and b.fits(1_000)
  assert not b.fits(3_000)  # 1000 + 9000 + 100 > 10000
  rounds = dataclasses.replace(b, per_round=0.25)  # each further microbatch holds more
  assert rounds.planned(1_000, rounds=1) == b.planned(1_000)
  assert rounds.planned(1_000, rounds=5) == 1_000 + int((1.5 + 4 * 0.25) * 2 * 1_000) + 100


def test_memory_limit_environment_variable():
  assert dqc_memory.env_limit_bytes({}) is None
  assert dqc_memory.env_limit_bytes({dqc_memory.LIMIT_ENV: "2.5"}) == 2_500_000_000
  budget = dqc_memory.host_budget(2, {dqc_memory.LIMIT_ENV: "3"}, resident=1_000_000_000)
  assert (budget.limit, budget.baseline, budget.devices) == (3_000_000_000, 1_000_000_000, 2)
  for bad in ("zero", "-1", "0"):
    with pytest.raises(ValueError, match=dqc_memory.LIMIT_ENV):
      dqc_memory.env_limit_bytes({dqc_memory.LIMIT_ENV: bad})


def test_the_stop_is_one_line_in_main():
  sys.path.insert(0, str(REPO_ROOT))
  import main  # pylint: disable=g-import-not-at-top
  budget = dqc_memory.Budget(limit=4_000_000_000, baseline=3_000_000_000, devices=2,
                             margin=500_000_000, source=dqc_memory.LIMIT_ENV)
  line = main.fail_line(dqc_memory._too_big(budget, 2, 1_000_000_000))  # pylint: disable=protected-access
  assert "\n" not in line and line.startswith("FATAL MemoryLimitError: DQC needs about 5.5 GB")
  assert "fix, replace or remove" not in line  # the message's own remedy, not the generic one


RELEASE_PROBE = r"""
import ctypes, json
from twodquant_jax import host_runtime
host_runtime.apply_malloc("keep")
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
n = 256 * 2**20
keep = libc.malloc(64)  # a live block above the big one: the heap's top cannot simply shrink
a = libc.malloc(n); ctypes.memset(a, 1, n); guard = libc.malloc(64); libc.free(a)
kept = host_runtime.resident_bytes()["rss"]
released = host_runtime.release_heap()
print(json.dumps({"kept": kept, "after": host_runtime.resident_bytes()["rss"],
                  "released": released}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc (Linux)")
def test_release_heap_returns_what_keep_holds():
  """Under 'keep' a freed 256 MB block stays resident; release_heap gives its pages back."""
  env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
  env["PYTHONPATH"] = str(REPO_ROOT)
  out = subprocess.run([sys.executable, "-c", RELEASE_PROBE], env=env, capture_output=True,
                       text=True, check=True, timeout=120)
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got["released"], got
  assert got["kept"] - got["after"] > 200 * 2**20, got


def test_the_pipeline_stops_before_dobi_when_the_baseline_is_over_the_limit(monkeypatch):
  """check_dqc_memory (called before DOBI) plans from the config and the bounds' shapes alone;
  a limit under the resident size stops it at once, naming the setting."""
  from configs.base import get_config  # pylint: disable=g-import-not-at-top
  from twodquant_jax import pipeline, settings as run_settings  # pylint: disable=g-import-not-at-top
  from twodquant_jax.nn.swinir import variable_shapes  # pylint: disable=g-import-not-at-top
  c = get_config(scale=4, bits=2)
  c.method = "2dquant"
  c.dqc.batch_size = 4
  s = run_settings.parse(c)
  params = variable_shapes(4)["params"]
  monkeypatch.setenv(dqc_memory.LIMIT_ENV, "0.01")
  with pytest.raises(dqc_memory.MemoryLimitError, match="--config.dqc.batch_size"):
    pipeline.check_dqc_memory(s, params, {})
  monkeypatch.setenv(dqc_memory.LIMIT_ENV, "1000")  # shapes in, an XLA need out (no arrays)
  settings = dataclasses.replace(s.dqc, microbatch=run_settings.AUTO_MICROBATCH)
  args = dqc_memory._abstract_args(settings, 4, 8, dqc_step.data_mesh(), params,  # pylint: disable=protected-access
                                   variable_shapes(4, "quant", 2)["quant"])
  assert args[1].shape == (4, 8, 8, 3)


def test_an_explicit_microbatch_that_cannot_fit_stops_naming_the_setting():
  """A numeric dqc.microbatch is checked like 'auto' (before DOBI): its compiled step's plan
  against the limit; over it, one line naming --config.dqc.microbatch; under it, the plan."""
  import dqc_tiny  # pylint: disable=g-import-not-at-top
  params, quant = dqc_tiny.tiny_setup()
  settings = dqc_step.DQCSettings(scale=dqc_tiny.SCALE, bits=dqc_tiny.BITS, microbatch=2,
                                  arch=tuple(sorted(dqc_tiny.ARCH.items())))
  mesh = dqc_step.data_mesh()
  roomy = dqc_memory.Budget(limit=10**12, baseline=10**8, devices=2, factor=2.0, per_round=0.12)
  info = dqc_memory.check_explicit(settings, 4, dqc_tiny.LR_SIZE, mesh, params, quant, roomy)
  assert info["microbatch"] == 2 and info["bytes"] > 0
  assert info["planned_bytes"] == roomy.planned(info["bytes"], rounds=2)
  tight = dataclasses.replace(roomy, limit=info["planned_bytes"] - 1)
  with pytest.raises(dqc_memory.MemoryLimitError) as e:
    dqc_memory.check_explicit(settings, 4, dqc_tiny.LR_SIZE, mesh, params, quant, tight)
  msg = str(e.value)
  assert "\n" not in msg and "--config.dqc.microbatch=2" in msg, msg


def test_remat_plans_its_smaller_allocator_growth():
  """Under dqc.remat glibc holds less over the step's (small) buffers: the budget's factor."""
  env = {dqc_memory.LIMIT_ENV: "3"}
  plain = dqc_memory.host_budget(2, env, resident=10**9)
  remat = dqc_memory.host_budget(2, env, resident=10**9, remat="full")
  kind = "tcmalloc" if plain.factor == dqc_memory.STEP_FACTOR["tcmalloc"] else "glibc"
  assert remat.factor == dqc_memory.REMAT_STEP_FACTOR["full"][kind] <= plain.factor
  assert remat.planned(10**9) < plain.planned(10**9) or kind == "tcmalloc"
