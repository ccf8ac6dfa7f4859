"""Beyond 2DQuant, side by side at the same budget: one JSON and one Markdown table.

Rows: MinMax, DOBI, 2DQuant, each stage beyond the paper alone (on DOBI + DQC) and their
combination (methods.py); columns per set: HR PSNR / SSIM on Y and "vs FP" (the PSNR of the
quantized SR against the FP model's SR of the same input: FP-fidelity, which separates methods
on the weak stand-in where HR PSNR barely does). Every DQC row gets the same calibration
patches (the first batch of the training stream) and the same DQC steps x batch (the stream is
a function of (seed, step)); codes stay in [0, 2^b - 1] and the checkpoint is the last iterate.

  python benchmarks/beyond.py --out=runs/beyond                  # W2, W3, W4, every row
  python benchmarks/beyond.py --bits=2 --rows=2dquant,2dquant++   # a subset

Each bit width runs as one `pipeline.run` in <out>/w<b>/ (one FP evaluation, one capture pass
per network, DQC checkpoints that a rerun resumes); rows already in <out>/beyond.json are not
recomputed (delete a row there, or the file, to redo it). Writes <out>/beyond.json and
<out>/beyond.md. With rot's statistics module present it also prints per-quantizer kurtosis and
max/std before and after rotation.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ imports `configs.base`

from absl import app, flags, logging

from configs import base
from twodquant_jax import files, pipeline
from twodquant_jax import settings as run_settings
from twodquant_jax.methods import LABELS, REGISTRY

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ROWS = ("minmax", "dobi", "2dquant", "2dquant+ch", "2dquant+rot", "2dquant+smooth",
        "2dquant+bc", "2dquant+round", "2dquant++")
PUBLISHED = (  # x4 W2A2 Set5 PSNR on the official weights (ANCHORS.md), for the README
    ("CompSRT", 31.44), ("CondiQuant", 30.64), ("2DQuant", 29.53))

flags.DEFINE_string("out", "runs/beyond", "Output folder (beyond.json, beyond.md, w<b>/).")
flags.DEFINE_list("bits", ["2", "3", "4"], "Bit widths.")
flags.DEFINE_list("rows", list(ROWS), "Methods (rows), methods.py names.")
flags.DEFINE_integer("steps", 200, "DQC steps of every DQC row.")
flags.DEFINE_integer("batch", 4, "DQC batch size of every DQC row.")
flags.DEFINE_integer("lr_size", 32, "LR patch size of the calibration batch and DQC.")
flags.DEFINE_integer("num_patches", 8, "Calibration patches (DOBI and the stages).")
flags.DEFINE_list("datasets", ["Set5", "Set14", "B100"], "Benchmark sets.")
flags.DEFINE_string("checkpoint", str(SHARED / "reference" / "standin_x4.pth"), "FP weights.")
flags.DEFINE_string("data_root", str(SHARED / "data" / "benchmarks"), "Benchmark root.")
flags.DEFINE_string("calib_root", str(SHARED / "data" / "calib"), "Calibration images.")
FLAGS = flags.FLAGS


def setup() -> dict:
  """What every number of the table depends on (a different setup starts a new table)."""
  return {"checkpoint": FLAGS.checkpoint, "scale": 4, "steps": FLAGS.steps,
          "batch": FLAGS.batch, "lr_size": FLAGS.lr_size, "num_patches": FLAGS.num_patches,
          "datasets": list(FLAGS.datasets), "calib_root": FLAGS.calib_root, "seed": 0}


def config(bits: int, methods: list[str]):
  c = base.get_config(scale=4, bits=bits, method=",".join(methods))
  c.model.checkpoint, c.data.root = FLAGS.checkpoint, FLAGS.data_root
  c.eval.datasets = ",".join(FLAGS.datasets)
  c.calib.root, c.calib.num_patches = FLAGS.calib_root, FLAGS.num_patches
  c.calib.lr_size = FLAGS.lr_size
  c.dqc.steps, c.dqc.batch_size, c.dqc.microbatch = FLAGS.steps, FLAGS.batch, "0"
  c.dqc.checkpoint_every, c.dqc.log_every = 50, 25
  c.progress, c.overwrite = False, True  # rows may change between reruns of a bit width
  return c


def harvest(workdir: Path, table: dict, key: str) -> None:
  """Copies every evaluated row of <workdir>/results.json into table['rows'][key]."""
  try:
    results = json.loads((workdir / "results.json").read_text())
  except (OSError, ValueError):
    return
  rows = table["rows"].setdefault(key, {})
  for method, entry in results.get("methods", {}).items():
    if "datasets" not in entry:
      continue
    rows[method] = {
        "datasets": {n: {k: d[k] for k in ("psnr", "ssim", "vs_fp") if k in d}
                     for n, d in entry["datasets"].items()},
        "seconds": entry.get("seconds"),
        "dqc_seconds": (entry.get("dqc") or {}).get("seconds")}


def markdown(table: dict) -> str:
  """One table per bit width: PSNR / SSIM and vs FP per set, and vs FP against 2DQuant."""
  s = table["setup"]
  lines = ["# Beyond 2DQuant: stand-in SwinIR-light x4, PSNR (dB) / SSIM on Y and vs FP", "",
           f"Checkpoint `{Path(s['checkpoint']).name}`; calibration: {s['num_patches']} patches "
           f"of {s['lr_size']}x{s['lr_size']} LR; DQC: {s['steps']} steps at batch {s['batch']} "
           f"({s['lr_size']}x{s['lr_size']} LR patches) for every DQC row; last iterate; codes "
           "in [0, 2^b - 1].", ""]
  names = s["datasets"]
  fp = table["rows"].get("fp", {}).get("fp")
  for key in sorted(k for k in table["rows"] if k != "fp"):
    rows = table["rows"][key]
    ref = rows.get("2dquant", {}).get("datasets", {})
    lines += [f"## {key.upper()}A{key[1:]}", "",
              "| Method | " + " | ".join(f"{n} PSNR / SSIM | {n} vs FP" for n in names)
              + " | vs FP - 2DQuant (" + ", ".join(names) + ") |",
              "|---|" + "---|---:|" * len(names) + "---|"]
    if fp:
      lines.append("| FP | " + " | ".join(
          f"{fp['datasets'][n]['psnr']:.2f} / {fp['datasets'][n]['ssim']:.4f} | -"
          for n in names if n in fp["datasets"]) + " | |")
    for method in [m for m in REGISTRY if m in rows]:
      d = rows[method]["datasets"]
      cells = [f"{d[n]['psnr']:.2f} / {d[n]['ssim']:.4f} | {d[n].get('vs_fp', float('nan')):.2f}"
               if n in d else "- | -" for n in names]
      delta = [f"{d[n]['vs_fp'] - ref[n]['vs_fp']:+.2f}" if n in d and n in ref
               and "vs_fp" in ref[n] and "vs_fp" in d[n] else "-" for n in names]
      lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " | " + ", ".join(delta)
                   + " |")
    lines.append("")
  lines += ["Published x4 W2A2 Set5 PSNR on the official weights (not this stand-in): "
            + ", ".join(f"{n} {v:.2f}" for n, v in PUBLISHED) + " (ANCHORS.md: CompSRT's codes "
            "are not clamped to 2^b levels; 2DQuant and CompSRT select checkpoints on Set5).", ""]
  return "\n".join(lines)


def rotation_statistics(bits: int) -> None:
  """Per-quantizer kurtosis and max/std before and after rotation, when the rotation stage
  provides them (ptq.rotation.statistics)."""
  try:
    from twodquant_jax.ptq import rotation  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.info("no rotation statistics: twodquant_jax.ptq.rotation is not there")
    return
  if not hasattr(rotation, "statistics"):
    logging.info("no rotation statistics: ptq.rotation has no `statistics`")
    return
  s = run_settings.parse(config(bits, ["dobi"]))
  params, _, _ = pipeline.load_params(s)
  lr = pipeline.calibration_batch(s)
  print(rotation.statistics(params, 4, lr))


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.INFO)
  out = Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "beyond.json"
  table = json.loads(path.read_text()) if path.is_file() else {}
  if table.get("setup") != setup():
    if table:
      logging.warning("%s was made with another setup: starting a new table", path)
    table = {"setup": setup(), "rows": {}}
  unknown = [r for r in FLAGS.rows if r not in REGISTRY or not REGISTRY[r].quantized]
  if unknown:
    raise app.UsageError(f"--rows: not quantized methods of methods.py: {unknown}")
  rotation_statistics(int(FLAGS.bits[0]))
  for bits in (int(b) for b in FLAGS.bits):
    key = f"w{bits}"
    done = table["rows"].get(key, {})
    todo = [r for r in FLAGS.rows if r not in done]
    if "fp" not in table["rows"].get("fp", {}):
      todo = ["fp"] + todo
    if not todo:
      logging.info("W%d: every row is in %s", bits, path)
      continue
    workdir = out / key
    logging.info("W%d: running %s in %s", bits, ", ".join(todo), workdir)
    t0 = time.perf_counter()
    try:
      pipeline.run(run_settings.parse(config(bits, todo)), workdir)
    finally:  # keep what finished, also when a later row fails
      harvest(workdir, table, key)
      if "fp" in table["rows"][key]:
        table["rows"]["fp"] = {"fp": table["rows"][key].pop("fp")}
      table.setdefault("seconds", {})[key] = (table.get("seconds", {}).get(key, 0.0)
                                              + time.perf_counter() - t0)
      files.write_json(path, table)
      files.atomic_write(out / "beyond.md", markdown(table))
  print(markdown(table))


if __name__ == "__main__":
  app.run(main)
