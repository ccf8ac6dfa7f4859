"""benchmarks/gpu_check.sh --smoke: the GPU check's CPU-sized mode runs every section and prints
one JSON object whose values are right for a CPU run (the full mode needs a GPU and minutes)."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from shared_paths import REPO_ROOT


@pytest.mark.slow
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
  sections = ("fp_parity", "dobi", "dqc_speed", "compiler_options", "pipeline")
  assert all(out[s]["ok"] for s in sections), {s: out[s].get("error") for s in sections}
  par = out["fp_parity"]
  # XLA:CPU computes float32 matmuls in full float32 at either precision: both match PyTorch.
  for precision in ("highest", "default"):
    assert par[precision]["pass_1e-4"], par[precision]
    assert list(par[precision]["max_abs_diff"]) == ["baby"]  # smoke: one image
  dobi = out["dobi"]
  assert dobi["bounds_total"] == 768 and dobi["bounds_equal"] == 768, dobi
  dqc = out["dqc_speed"]
  assert dqc["steps_per_s"] > 0 and dqc["loss_finite"]
  info = dqc["microbatch_info"]  # auto microbatch: a divisor of the batch whose step fits
  assert info["microbatch"] == dqc["microbatch"] and dqc["batch"] % dqc["microbatch"] == 0
  assert 0 < info["bytes"] <= info["limit_bytes"], info
  opts = out["compiler_options"]  # each candidate against the defaults, from one lowering
  assert set(opts["options"]) == {"default", "fast_compile"}, opts["options"]
  for part in ("dqc", "eval_fp", "eval_quant"):
    assert all(opts[part][k]["compile_s"] > 0 for k in opts["options"]), opts[part]
  assert opts["dqc"]["fast_compile"]["median_step_s"] > 0
  assert opts["eval_fp"]["fast_compile"]["median_call_s"] > 0
  pipe = out["pipeline"]  # 2DQuant end to end: DOBI start, DQC, evaluation, from a cold cache
  assert pipe["method"] == "2dquant" and pipe["cold_compile_cache"] and pipe["dqc_steps"] == 2
  stages = pipe["stages"]
  assert pipe["dqc_steps_per_s"] > 0 and np.isfinite(pipe["dqc_final_loss"])
  assert 0 < stages["calibration_s"] < stages["total_s"], stages
  assert 0 < stages["dqc_compile_s"] < stages["dqc_s"] < stages["total_s"], stages
  assert 0 < stages["eval_s"] < stages["total_s"], stages
  assert stages["eval_compiles"] >= 1 and 0 < stages["eval_compile_s"] < stages["eval_s"], stages
  assert set(pipe["datasets"]) == {"Set5", "Set14", "B100"}
  assert all(d["psnr"] > 10 for d in pipe["datasets"].values()), pipe["datasets"]
  assert all(0 < out[s]["wall_s"] <= out["wall_s"] for s in sections), out


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
