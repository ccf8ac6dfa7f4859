"""FP / MinMax / Percentile / DOBI (optionally 2DQuant) at several bit widths: one table.

All bound initialisations come from one capture pass of the FP model (`calibrate_many`), and
methods with the same bit width share one compiled network per image size. Example (the
stand-in trained checkpoint, our DF2K stand-in for calibration):

  python benchmarks/bits_table.py --config=configs/x4_w4.py \\
    --config.model.checkpoint=../shared/reference/standin_x4.pth \\
    --config.data.root=../shared/data/benchmarks --config.eval.datasets=Set5,Set14 \\
    --config.calib.root=../shared/data/calib --workdir=runs/standin_bits --bits=2,3,4

Writes <workdir>/bits_table.{json,md}.
"""

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ imports `configs.base`

from absl import app, flags, logging
from ml_collections import config_flags

from twodquant_jax import pipeline
from twodquant_jax import settings as run_settings
from twodquant_jax.eval import predict as evaluate
from twodquant_jax.data.benchmarks import load_benchmark
from twodquant_jax.formats import bounds_file
from twodquant_jax.ptq.dobi import calibrate_many
from twodquant_jax.methods import LABELS

config_flags.DEFINE_config_file("config", None, "Base config (configs/*.py).")
flags.DEFINE_string("workdir", "runs/bits_table", "Output folder.")
flags.DEFINE_list("bits", ["2", "3", "4"], "Bit widths.")
flags.DEFINE_list("methods", ["minmax", "percentile", "dobi"], "Bound initialisations.")
FLAGS = flags.FLAGS


def main(_):
  logging.set_verbosity(logging.INFO)
  config = FLAGS.config
  workdir = Path(FLAGS.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  s = pipeline.check_inputs(run_settings.parse(config))
  params, _, ckpt = pipeline.load_params(s)
  s = pipeline.with_roots(s, pipeline.resolve_data(s))  # given folders, else the cache
  names = list(s.eval.datasets)
  datasets = {n: load_benchmark(s.data.root, n, s.scale) for n in names}
  rows = {"FP": pipeline.evaluate_method(s, "fp", pipeline.sr_predictor(
      s, params, None).predict, datasets, workdir)}
  rows["Bicubic"] = pipeline.evaluate_method(
      s, "bicubic", evaluate.bicubic_predict(s.scale), datasets, workdir, tiled=False)
  bits_list = [int(b) for b in FLAGS.bits]
  settings = {(m, b): (b, run_settings.calib_settings(config, m))
              for b in bits_list for m in FLAGS.methods}
  calibrated = calibrate_many(params, s.scale, pipeline.calibration_batch(s), settings)
  for b in bits_list:
    s_b = dataclasses.replace(s, bits=b)
    for m in FLAGS.methods:
      quant, _ = calibrated[(m, b)]
      bounds_file.save_bounds(workdir / f"bounds_{m}_w{b}.json", quant, {"method": m, "bits": b})
      rows[f"{LABELS[m]} W{b}"] = pipeline.evaluate_method(
          s_b, f"{m}_w{b}", pipeline.sr_predictor(s_b, params, quant).predict, datasets,
          workdir)
  table = ["| Method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for label, res in rows.items():
    table.append(f"| {label} | " + " | ".join(
        f"{res[n]['psnr']:.2f} / {res[n]['ssim']:.4f}" for n in names) + " |")
  seconds = time.perf_counter() - t0
  md = (f"# x{config.scale}, checkpoint `{ckpt}`: PSNR (dB) / SSIM on Y\n\n" + "\n".join(table)
        + f"\n\nCalibration: {config.calib.num_patches} patches from "
        f"`{s.calib.root or s.calib.batch_file}`"
        f" (seed {config.seed}); DOBI strategy {config.dobi.strategy}; {seconds:.0f} s.\n")
  (workdir / "bits_table.md").write_text(md)
  (workdir / "bits_table.json").write_text(json.dumps(
      {k: {n: {"psnr": v[n]["psnr"], "ssim": v[n]["ssim"]} for n in names}
       for k, v in rows.items()}, indent=1))
  print(md)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
