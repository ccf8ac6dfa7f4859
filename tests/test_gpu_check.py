"""benchmarks/gpu_check.sh --smoke: the GPU check's CPU-sized mode runs and prints one JSON
object with every section's keys (the full mode needs a GPU and minutes)."""

from __future__ import annotations

import json
import os
import subprocess

from shared_paths import REPO_ROOT


def test_gpu_check_smoke(shared, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TWODQUANT_SHARED=str(shared))
  cmd = [str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--workdir", str(tmp_path),
         "--compile_cache", str(tmp_path / "xla")]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
  out = json.loads(lines[0])
  assert proc.returncode == 0, json.dumps(out, indent=1)[:3000]
  assert out["smoke"] is True and out["backend"] == "cpu"
  par = out["fp_parity"]
  assert par["ok"] and par["highest"]["pass_1e-4"] and set(par) >= {"highest", "default"}
  dobi = out["dobi"]
  assert dobi["bounds_total"] == 768 and dobi["bounds_equal"] == 768, dobi
  dqc = out["dqc_speed"]
  assert dqc["steps_per_s"] > 0 and dqc["loss_finite"] and dqc["microbatch"] >= 1
  assert {"microbatch", "bytes", "limit_bytes"} <= set(dqc["microbatch_info"])
  assert "peak_device_bytes" in dqc
  pipe = out["pipeline"]
  assert pipe["ok"], pipe
  assert set(pipe["stages"]) >= {"calibration_s", "dqc_s", "eval_s", "total_s"}
  assert set(pipe["datasets"]) == {"Set5", "Set14", "B100"}
  assert all(d["psnr"] > 10 for d in pipe["datasets"].values()), pipe["datasets"]
  for section in ("fp_parity", "dobi", "dqc_speed", "pipeline"):
    assert out[section]["wall_s"] >= 0


def test_planned_steps_fit_the_budget():
  """--plan_from/--budget_s: the pipeline's DQC steps are what is left of the budget after the
  estimated compiles, DOBI and evaluation, divided by the measured step time (100..3000)."""
  import sys
  sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
  import gpu_check  # pylint: disable=import-outside-toplevel
  prev = {"fp_parity": {"highest": {"first_call_s": {"a": 4.0, "b": 6.0}}},
          "dobi": {"device_seconds": 5.0}, "dqc_speed": {"compile_and_first_step_s": 50.0,
                                                        "s_per_step": 0.1}}
  steps, est = gpu_check.planned_steps(prev, 400.0)
  assert est == {"eval_s": 180.0, "dobi_s": 40.0, "dqc_compile_s": 50.0, "fixed_s": 30.0}
  assert steps == int((400 - 300) / 0.1)
  assert gpu_check.planned_steps(prev, 10_000.0)[0] == 3000  # never more than the paper's
  assert gpu_check.planned_steps(prev, 100.0)[0] == 100  # never fewer than 100
