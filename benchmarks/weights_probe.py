"""What the weight-side stages give at low bits: FP-fidelity of DOBI / 2DQuant with per-channel
weight bounds, learned rounding and bias correction, at one DQC budget for every DQC row.

FP-fidelity = PSNR(Y, crop = scale) of the quantized model's SR against the FP model's SR of
the same LR image, both rounded to uint8 (as tests/test_pipeline.py computes it). Each DQC row
trains in its own folder under --workdir (orbax checkpoints: a rerun resumes), and every
finished row is kept in the JSON, so a cut run loses at most one row.

  python benchmarks/weights_probe.py --steps 100 --batch 4 --lr_size 32 --sets Set5
writes docs/measured/weights.json and weights.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from shared_paths import shared_dir
from twodquant_jax import settings as run_settings
from twodquant_jax.data import patches
from twodquant_jax.data.benchmarks import load_benchmark
from twodquant_jax.data.images import to_uint8
from twodquant_jax.eval import predict
from twodquant_jax.eval.metrics import psnr_y
from twodquant_jax.formats import convert
from twodquant_jax.nn.student import Student, plain
from twodquant_jax.nn.swinir import variable_shapes
from twodquant_jax.ptq import bias_correction, rounding
from twodquant_jax.ptq.dobi import calibrate_many
from twodquant_jax.ptq.dqc import loop as dqc_loop
from twodquant_jax.ptq.stages import StageInputs
from twodquant_jax.settings import CalibSettings

REPO = Path(__file__).resolve().parents[1]


def sr_images(student: Student, quant, scale: int, bits: int, lrs) -> list[np.ndarray]:
  """uint8 SRs (as the evaluation rounds them) of the student (fake-quant with `quant`, or FP when quant is None)."""
  arch = tuple(sorted(dict(student.arch).items()))
  if quant is None:
    fn, variables = predict.jitted_apply(scale), {"params": student.params}
  else:
    fn, variables = predict.jitted_apply(scale, "quant", bits, arch), student.variables(quant)
  srs = predict.Predictor(fn, scale, variables=variables, batch_size=1).predict(lrs)
  return [to_uint8(sr) for sr in srs]


def fidelity(srs, fp_srs, scale: int) -> float:
  return float(np.mean([psnr_y(a, b, scale) for a, b in zip(srs, fp_srs)]))


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--bits", type=int, default=2)
  ap.add_argument("--steps", type=int, default=100)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--lr_size", type=int, default=32)
  ap.add_argument("--calib_patches", type=int, default=8)
  ap.add_argument("--sets", default="Set5")
  ap.add_argument("--rounding_weight", type=float, default=1e-2)
  ap.add_argument("--rounding_lr", type=float, default=0.0)
  ap.add_argument("--rows", default="dobi,dobi+pc,2dquant,2dquant+pc,2dquant+pc+round,"
                  "2dquant+pc+round+bias")
  ap.add_argument("--workdir", default="/tmp/weights_probe")
  ap.add_argument("--out", default=str(REPO / "docs" / "measured" / "weights"))
  a = ap.parse_args()
  scale, bits, shared = 4, a.bits, shared_dir()
  out_json = Path(a.out + ".json")
  results = json.loads(out_json.read_text()) if out_json.exists() else {}
  setup = {k: getattr(a, k) for k in ("bits", "steps", "batch", "lr_size", "calib_patches",
                                      "rounding_weight", "rounding_lr")}
  if results.get("setup") != setup:
    results = {"setup": setup, "rows": {}}

  params, _ = convert.load_checkpoint(shared / "reference" / "standin_x4.pth", scale,
                                      variable_shapes(scale)["params"])
  params = jax.tree_util.tree_map(jnp.asarray, params)
  c = base.get_config(scale=scale, bits=bits)
  c.calib.root = str(shared / "data" / "calib")
  c.calib.lr_size = a.lr_size
  c.dqc.steps, c.dqc.batch_size, c.dqc.microbatch = a.steps, a.batch, "0"
  c.dqc.checkpoint_every, c.dqc.log_every = max(a.steps // 2, 1), 10
  c.dqc.rounding_weight, c.dqc.rounding_lr = a.rounding_weight, a.rounding_lr
  dqc, loop = run_settings.dqc_settings(c), run_settings.loop_settings(c)
  source = patches.load_patch_source(c.calib.root, a.lr_size * scale)
  calib = patches.calibration_batch(source, int(c.seed), scale=scale,
                                    batch_size=a.calib_patches, lr_size=a.lr_size)["lr"]
  sets = {name: load_benchmark(shared / "data" / "benchmarks", name, scale)
          for name in a.sets.split(",")}
  lrs = {name: [im.lr for im in images] for name, images in sets.items()}
  fp = plain(params)
  fp_srs = {name: sr_images(fp, None, scale, bits, l) for name, l in lrs.items()}

  students = {"": fp, "pc": Student(params, {}, {"weight_channels": True})}
  t0 = time.perf_counter()
  dobi = {k: calibrate_many(s, scale, calib, {"d": (bits, CalibSettings(method="dobi"))})["d"][0]
          for k, s in students.items()}
  print(f"DOBI (plain and per-channel): {time.perf_counter() - t0:.0f} s", flush=True)
  stage_inputs = StageInputs(fp_params=params, calib_lr=calib.astype(np.float32) / 255.0,
                             scale=scale, bits=bits, key=jax.random.key(0))
  made: dict[str, tuple[Student, dict, float]] = {}

  def build(row: str) -> tuple[Student, dict, float]:
    if row in made:
      return made[row]
    pc = "+pc" in row
    student, quant, seconds = students["pc" if pc else ""], dobi["pc" if pc else ""], 0.0
    if row.startswith("2dquant"):
      base_row = row.replace("+bias", "")
      if base_row != row:
        student, quant, seconds = build(base_row)
      else:
        if "+round" in row:
          student = Student(params, {}, {**dict(student.arch), "rounding": True})
        t = time.perf_counter()
        student, quant, info = dqc_loop.train_student(
            params, student, quant, dqc, loop, Path(a.workdir) / row.replace("+", "_"))
        seconds = time.perf_counter() - t
        if "+round" in row:
          codes = rounding.learned_codes(student, quant, bits)
          student = rounding.bake(student, quant, bits)
          print(f"{row}: {sum(v.size for v in codes.values())} weights baked", flush=True)
    if "+bias" in row:
      student = bias_correction.bias_correct(student, quant, stage_inputs)
    made[row] = (student, quant, seconds)
    return made[row]

  for row in a.rows.split(","):
    if row in results["rows"]:
      print(row, results["rows"][row], "(kept)")
      continue
    student, quant, seconds = build(row)
    got = {name: fidelity(sr_images(student, quant, scale, bits, l), fp_srs[name], scale)
           for name, l in lrs.items()}
    results["rows"][row] = {"vs_fp": got, "dqc_seconds": round(seconds, 1)}
    print(row, results["rows"][row], flush=True)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=1))

  names = a.sets.split(",")
  lines = [f"# Weight-side stages at W{bits} (x4 standin_x4.pth): FP-fidelity (dB)", "",
           f"DOBI on {a.calib_patches} calibration patches of {a.lr_size}x{a.lr_size} LR; "
           f"every DQC row {a.steps} steps at batch {a.batch} on {a.lr_size}x{a.lr_size} LR "
           "patches (reference loss, cosine lr 1e-2); learned rounding: regulariser weight "
           f"{a.rounding_weight}, offsets lr {a.rounding_lr or 'as the bounds'}.", "",
           "Command: `python benchmarks/weights_probe.py " + " ".join(
               f"--{k} {v}" for k, v in setup.items()) + f" --sets {a.sets}`", "",
           "| row | " + " | ".join(f"{n} vs FP" for n in names) + " |",
           "|---|" + "---|" * len(names)]
  for row, r in results["rows"].items():
    lines.append(f"| {row} | " + " | ".join(f"{r['vs_fp'][n]:.2f}" for n in names) + " |")
  Path(a.out + ".md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
