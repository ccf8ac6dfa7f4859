"""Beyond 2DQuant, side by side at the same budget: one JSON and one Markdown table.

Rows: MinMax, DOBI, 2DQuant, each stage beyond the paper alone (on DOBI + DQC) and their
combination (methods.py); columns per set: HR PSNR / SSIM on Y and "vs FP" (the PSNR of the
quantized SR against the FP model's SR of the same input: FP-fidelity, which separates methods
on the weak stand-in where HR PSNR barely does). Every DQC row gets the same calibration
patches (the first batch of the training stream) and the same DQC steps x batch (the stream is
a function of (seed, step)); codes stay in [0, 2^b - 1] and the checkpoint is the last iterate.

  python benchmarks/beyond.py --out=runs/beyond                  # W2, W3, W4, every row
  python benchmarks/beyond.py --bits=2 --rows=2dquant,2dquant++   # a subset

Each row runs as one `pipeline.run` in <out>/w<b>/<row>/ (its DQC checkpoints resume there),
in the order of --rows, all sharing the checkpoint, benchmarks, calibration batch and the FP SRs
(made once, kept in <out>/fp_srs.npz for later runs); rows already in <out>/beyond.json are not
recomputed (delete a row there, or the file, to redo it). A row is done when it has every set
of --datasets, so `--datasets=Set5,Set14` first and B100 later completes a table in two passes
(the second resumes each row's finished DQC and only evaluates). Writes <out>/beyond.json and
<out>/beyond.md. It also records and prints, per quantizer kind, the kurtosis and max/std of the
tensors the quantizers see before and after rotation (--statistics).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ imports `configs.base`

import numpy as np
from absl import app, flags, logging

from configs import base
from twodquant_jax import files, pipeline
from twodquant_jax import settings as run_settings
from twodquant_jax.methods import LABELS, REGISTRY

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ROWS = ("minmax", "dobi", "2dquant", "2dquant+ch", "2dquant+rot", "2dquant+smooth",
        "2dquant+bc", "2dquant+round", "2dquant+ch+rot", "2dquant++")
PUBLISHED = (  # x4 W2A2 Set5 PSNR on the official weights (ANCHORS.md), for the README
    ("CompSRT", 31.44), ("CondiQuant", 30.64), ("2DQuant", 29.53))

flags.DEFINE_string("out", "runs/beyond", "Output folder (beyond.json, beyond.md, w<b>/).")
flags.DEFINE_list("bits", ["2", "3", "4"], "Bit widths.")
flags.DEFINE_list("rows", list(ROWS), "Methods (rows), methods.py names.")
flags.DEFINE_integer("steps", 200, "DQC steps of every DQC row.")
flags.DEFINE_integer("batch", 4, "DQC batch size of every DQC row.")
flags.DEFINE_integer("lr_size", 16, "LR patch size of the calibration batch and DQC.")
flags.DEFINE_integer("num_patches", 8, "Calibration patches (DOBI and the stages).")
flags.DEFINE_list("datasets", ["Set5", "Set14", "B100"], "Benchmark sets.")
flags.DEFINE_string("checkpoint", str(SHARED / "reference" / "standin_x4.pth"), "FP weights.")
flags.DEFINE_string("data_root", str(SHARED / "data" / "benchmarks"), "Benchmark root.")
flags.DEFINE_string("calib_root", str(SHARED / "data" / "calib"), "Calibration images.")
flags.DEFINE_bool("statistics", True, "Per-quantizer kurtosis and max/std, plain and rotated.")
flags.DEFINE_enum("remat", "off", ["off", "matmuls", "full"],
                  "config dqc.remat of every DQC row. The table was measured with 'off'; the CPU "
                  "default 'matmuls' takes another float path through the same step, and DQC's "
                  "200 steps amplify its last-bit differences (docs/measured/beyond.md).")
flags.DEFINE_integer("seed", 0, "config seed of every row (calibration patches, rotation signs, "
                     "DQC batches): other seeds give the spread of each row.")
flags.DEFINE_bool("staged", False, "config dqc.staged of every DQC row. The table was measured "
                  "with the one-program step; the staged step is the same step on another float "
                  "path.")
FLAGS = flags.FLAGS


def setup() -> dict:
  """What every number of the table depends on (a different setup starts a new table)."""
  return {"checkpoint": FLAGS.checkpoint, "scale": 4, "steps": FLAGS.steps,
          "batch": FLAGS.batch, "lr_size": FLAGS.lr_size, "num_patches": FLAGS.num_patches,
          "calib_root": FLAGS.calib_root, "seed": FLAGS.seed,
          **({"remat": FLAGS.remat} if FLAGS.remat != "off" else {}),
          **({"staged": True} if FLAGS.staged else {})}


def done(table: dict, key: str, row: str) -> bool:
  """Whether the table holds `row` at `key` on every set of --datasets."""
  entry = table["rows"].get(key, {}).get(row, {})
  return all(n in entry.get("datasets", {}) for n in FLAGS.datasets)


def config(bits: int, methods: list[str]):
  c = base.get_config(scale=4, bits=bits, method=",".join(methods))
  c.model.checkpoint, c.data.root = FLAGS.checkpoint, FLAGS.data_root
  c.eval.datasets = ",".join(FLAGS.datasets)
  c.calib.root, c.calib.num_patches = FLAGS.calib_root, FLAGS.num_patches
  c.calib.lr_size = FLAGS.lr_size
  c.dqc.steps, c.dqc.batch_size, c.dqc.microbatch = FLAGS.steps, FLAGS.batch, "0"
  c.dqc.remat, c.dqc.staged = FLAGS.remat, FLAGS.staged
  c.seed = FLAGS.seed
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
    old = rows.get(method, {}).get("datasets", {})  # sets of an earlier run stay
    rows[method] = {
        "datasets": {**old, **{n: {k: d[k] for k in ("psnr", "ssim", "vs_fp") if k in d}
                               for n, d in entry["datasets"].items()}},
        "seconds": entry.get("seconds"),
        "dqc_seconds": (entry.get("dqc") or {}).get("seconds")}


def summary_markdown(table: dict, names: tuple[str, ...] = ("Set5", "Set14", "B100")) -> str:
  """The README's table: a row per method, a column per bit width and set, "HR PSNR / vs FP"."""
  keys = sorted(k for k in table["rows"] if k != "fp")
  head = [f"{k.upper()}A{k[1:]} {n}" for k in keys for n in names]
  lines = ["| HR PSNR / vs FP (dB) | " + " | ".join(head) + " |",
           "|---|" + "---|" * len(head)]
  fp = table["rows"].get("fp", {}).get("fp", {}).get("datasets", {})
  lines.append("| FP | " + " | ".join(f"{fp[n]['psnr']:.2f} / -" if n in fp else "-"
                                      for _ in keys for n in names) + " |")
  for method in [m for m in REGISTRY if any(m in table["rows"][k] for k in keys)]:
    cells = []
    for k in keys:
      d = table["rows"][k].get(method, {}).get("datasets", {})
      cells += [f"{d[n]['psnr']:.2f} / {d[n]['vs_fp']:.2f}" if "vs_fp" in d.get(n, {}) else "-"
                for n in names]
    lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def markdown(table: dict) -> str:
  """One table per bit width: PSNR / SSIM and vs FP per set, and vs FP against 2DQuant."""
  s = table["setup"]
  lines = ["# Beyond 2DQuant: stand-in SwinIR-light x4, PSNR (dB) / SSIM on Y and vs FP", "",
           f"Checkpoint `{Path(s['checkpoint']).name}`; calibration: {s['num_patches']} patches "
           f"of {s['lr_size']}x{s['lr_size']} LR; DQC: {s['steps']} steps at batch {s['batch']} "
           f"({s['lr_size']}x{s['lr_size']} LR patches) for every DQC row; last iterate; codes "
           "in [0, 2^b - 1].", ""]
  names = [n for n in ("Set5", "Set14", "B100", "Urban100", "Manga109")
           if any(n in r.get("datasets", {}) for rows in table["rows"].values()
                  for r in rows.values())]
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
  if "statistics" in table:
    lines += [statistics_markdown(table["statistics"])]
  lines += ["## All bit widths (the README's table)", "", summary_markdown(table)]
  lines += ["Published x4 W2A2 Set5 PSNR on the official weights (not this stand-in): "
            + ", ".join(f"{n} {v:.2f}" for n, v in PUBLISHED) + " (ANCHORS.md: CompSRT's codes "
            "are not clamped to 2^b levels; 2DQuant and CompSRT select checkpoints on Set5).", ""]
  return "\n".join(lines)


def _kurtosis_max_std(x) -> tuple[float, float]:
  """(kurtosis, max|x - mean| / std) of a whole tensor, in float64."""
  x = np.asarray(x, np.float64).ravel()
  d = x - x.mean()
  var = float(np.mean(d * d)) or 1e-30
  return float(np.mean(d ** 4) / var ** 2), float(np.max(np.abs(d)) / np.sqrt(var))


def quantizer_statistics(bits: int) -> dict:
  """Per quantizer kind (e.g. 'mlp.fc1.act_quantizer'), the median over the 24 blocks of the
  kurtosis and max/std of the tensor it sees, on the plain and on the rotated network (the
  'rotate' stage as the +rot rows build it, same key and calibration batch): what rotation
  changes in the quantizers' inputs."""
  from twodquant_jax.nn import student  # pylint: disable=g-import-not-at-top
  from twodquant_jax.ptq import dobi, stages  # pylint: disable=g-import-not-at-top
  s = run_settings.parse(config(bits, ["dobi"]))
  params, _, _ = pipeline.load_params(s)
  lr = pipeline.calibration_batch(s)
  plain = student.plain(params)
  nets = {"plain": plain,
          "rotated": stages.apply(("rotate",), plain, pipeline.stage_inputs(s, params, lr))}
  out: dict = {}
  for label, net in nets.items():
    per_kind: dict[str, list] = {}
    for _, tensors, _ in dobi.iter_captured(net, 4, lr):
      for name, x in tensors.items():
        kind = name.split(".", 5)[-1]  # drop layers.i.residual_group.blocks.j
        per_kind.setdefault(kind, []).append(_kurtosis_max_std(x))
    for kind, values in per_kind.items():
      out.setdefault(kind, {})[label] = [float(np.median([v[0] for v in values])),
                                         float(np.median([v[1] for v in values]))]
  return out


def statistics_markdown(stats: dict) -> str:
  lines = ["Per-quantizer statistics (median over the 24 blocks, calibration batch): kurtosis "
           "and max|x - mean| / std, plain -> rotated.", "",
           "| quantizer | kurtosis plain | kurtosis rotated | max/std plain | max/std rotated |",
           "|---|---:|---:|---:|---:|"]
  for kind in sorted(stats):
    p, r = stats[kind]["plain"], stats[kind]["rotated"]
    lines.append(f"| {kind} | {p[0]:.2f} | {r[0]:.2f} | {p[1]:.2f} | {r[1]:.2f} |")
  return "\n".join(lines) + "\n"


def load_fp_srs(path: Path, cache: dict) -> None:
  """The FP SRs of an earlier run of this setup ({dataset: {image: uint8}}) into `cache`."""
  if path.is_file():
    with np.load(path) as data:
      for key in data.files:
        dataset, image = key.split("/", 1)
        cache.setdefault(dataset, {})[image] = data[key]


def save_fp_srs(path: Path, cache: dict) -> None:
  arrays = {f"{d}/{i}": sr for d, images in cache.items() for i, sr in images.items()}
  with files.atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)


def run_row(bits: int, row: str, out: Path, table: dict, inputs) -> None:
  """One row at `bits` in <out>/w<b>/<row>/ (DQC resumes from its checkpoint there), then its
  numbers into the table (also when it fails half-way: what finished is kept)."""
  key = "fp" if row == "fp" else f"w{bits}"
  workdir = out / key / row
  logging.info("W%d: running %s in %s", bits, row, workdir)
  t0 = time.perf_counter()
  try:
    pipeline.run(run_settings.parse(config(bits, [row])), workdir, inputs=inputs)
  finally:
    harvest(workdir, table, key)
    seconds = table.setdefault("seconds", {})
    seconds[key] = seconds[key] if isinstance(seconds.get(key), dict) else {}
    seconds[key][row] = time.perf_counter() - t0
    files.write_json(out / "beyond.json", table)
    files.atomic_write(out / "beyond.md", markdown(table))


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.INFO)
  out = Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "beyond.json"
  table = json.loads(path.read_text()) if path.is_file() else {}
  given = {k: v for k, v in table.get("setup", {}).items() if k != "datasets"}  # (older tables)
  if given != setup():
    if table:
      logging.warning("%s was made with another setup: starting a new table", path)
    table = {"rows": {}}
  table["setup"] = setup()
  unknown = [r for r in FLAGS.rows if r not in REGISTRY or not REGISTRY[r].quantized]
  if unknown:
    raise app.UsageError(f"--rows: not quantized methods of methods.py: {unknown}")
  if FLAGS.statistics and "statistics" not in table:
    table["statistics"] = quantizer_statistics(int(FLAGS.bits[0]))
    files.write_json(path, table)
  if "statistics" in table:
    print(statistics_markdown(table["statistics"]))
  # The checkpoint, benchmarks, calibration batch and FP SRs: read or made once, shared by
  # every row (one pipeline.run each, so each row is resumable on its own).
  todo = [(b, r) for b in (int(b) for b in FLAGS.bits) for r in FLAGS.rows
          if not done(table, f"w{b}", r)]
  if not todo:
    logging.info("every row is in %s", path)
  else:
    first = pipeline.check_inputs(run_settings.parse(config(todo[0][0], ["dobi"])))
    inputs = pipeline.prepare(first, calibration=True)
    fp_path = out / "fp_srs.npz"  # the FP SRs of this setup, for "vs FP"
    load_fp_srs(fp_path, inputs.fp_srs)
    saved = set(inputs.fp_srs)
    if not done(table, "fp", "fp"):
      run_row(todo[0][0], "fp", out, table, inputs)
    for bits, row in todo:
      if set(inputs.fp_srs) != saved:
        save_fp_srs(fp_path, inputs.fp_srs)
        saved = set(inputs.fp_srs)
      run_row(bits, row, out, table, inputs)
    if set(inputs.fp_srs) != saved:
      save_fp_srs(fp_path, inputs.fp_srs)
  files.atomic_write(out / "beyond.md", markdown(table))
  print(markdown(table))


if __name__ == "__main__":
  app.run(main)
