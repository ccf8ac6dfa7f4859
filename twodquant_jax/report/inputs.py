"""What the report figures show: handed over by a run, or read back from a finished workdir.

`collect` assembles `FigureInputs` from what the pipeline holds in memory (bounds, the tensor
statistics of `ptq.stats`, the SR images it kept, the DQC records): pure, no disk, nothing
recomputed. `save_stats` stores the statistics beside the figures, so that `from_workdir` can
rebuild the same `FigureInputs` from a finished workdir (results.json, the bounds files it
names, dqc_log.jsonl, figures/stats.npz, the SR PNGs under sr/) and the figures can be redrawn:

  python -m twodquant_jax.report.inputs --workdir DIR    # writes DIR/figures/*.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging

from twodquant_jax import files
from twodquant_jax.data.benchmarks import BenchmarkImage, load_benchmark
from twodquant_jax.data.bicubic import imresize
from twodquant_jax.data.images import load_rgb, to_uint8
from twodquant_jax.eval.metrics import psnr_y
from twodquant_jax.formats import bounds_file
from twodquant_jax.methods import ALL, REGISTRY
from twodquant_jax.nn.names import quantizer_order, tree_to_dict
from twodquant_jax.settings import FigureSettings, figure_settings
from twodquant_jax.report.figures import METHOD_ORDER, FigureInputs, Visual, write_all

BICUBIC = "bicubic"  # the one row the report can make itself: a pure upscaling of the LR image
STATS_FILE = "stats.npz"  # under <workdir>/figures/
HIST_KEYS = ("counts", "edges", "min", "max", "numel")
KeptSRs = Mapping[tuple[str, str], Mapping[str, np.ndarray]]  # (dataset, image) -> method -> SR


def hist_names(settings: FigureSettings) -> list[str]:
  """The quantizers of `report.hist_quantizers` that exist (unknown ones logged)."""
  known = set(quantizer_order())
  for n in settings.hist_quantizers:
    if n not in known:
      logging.warning("figures: report.hist_quantizers: unknown quantizer %r", n)
  return [n for n in settings.hist_quantizers if n in known]


def _in_method_order(by_method: Mapping[str, Any]) -> dict[str, Any]:
  order = {m: k for k, m in enumerate(METHOD_ORDER)}
  return dict(sorted(by_method.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


# ---------------------------------------------------------------------------------------------
# From the run, in memory.


def bicubic_sr(lr: np.ndarray, scale: int) -> np.ndarray:
  """The Bicubic row's uint8 SR, as the evaluation makes it (float32 before rounding)."""
  return to_uint8(imresize(lr.astype(np.float64) / 255.0, scale).astype(np.float32))


def _image_psnr(results: Mapping, method: str, dataset: str, image: str) -> float | None:
  try:
    return float(results["methods"][method]["datasets"][dataset]["images"][image]["psnr"])
  except (KeyError, TypeError):
    return None


def visual(dataset: str, image: BenchmarkImage, results: Mapping, scale: int,
           kept: Mapping[str, np.ndarray]) -> Visual:
  """Bicubic, then every method of results in the paper's order, on one image: the SRs the run
  kept (Bicubic is made here when it was not); a method without one is left out, with a note.
  PSNR from results, else measured here."""
  methods = [BICUBIC] + [m for m in ALL if m != BICUBIC and m in results.get("methods", {})]
  srs: dict[str, np.ndarray] = {}
  for method in methods:
    if method in kept:
      srs[method] = np.asarray(kept[method])
    elif method == BICUBIC:
      srs[method] = bicubic_sr(image.lr, scale)
    else:
      logging.info("figures: no SR of %s/%s for %s; it is left out of the visual", dataset,
                   image.name, method)
  psnrs = {}
  for m, sr in srs.items():
    p = _image_psnr(results, m, dataset, image.name)
    psnrs[m] = p if p is not None else psnr_y(sr, image.hr, scale)
  return Visual(dataset, image.name, image.hr, srs, psnrs)


def collect(settings: FigureSettings, *, results: Mapping,
            bounds: Mapping[str, Mapping[str, Sequence[float]]],
            dqc_records: Sequence[Mapping], kept_srs: KeptSRs | None,
            datasets: Mapping[str, Sequence[BenchmarkImage]], hists: Mapping,
            percentiles: Mapping, num_patches: int) -> FigureInputs:
  """The `FigureInputs` of a run, from what it computed (no disk, nothing recomputed).

  bounds: {method: {quantizer: [l, u]}}; hists, percentiles, num_patches: `ptq.stats`'
  statistics on the calibration batch; kept_srs: the SRs of the visual images; datasets: the
  evaluated images. What is missing leaves its figure (or visual panel) out, with a note.
  """
  inputs = FigureInputs(
      scale=settings.scale, bits=int(results.get("bits", settings.bits)),
      bounds=_in_method_order({m: {n: [float(v) for v in lu[:2]] for n, lu in b.items()}
                               for m, b in bounds.items()}))
  inputs.hist_names = [n for n in settings.hist_quantizers if n in set(quantizer_order())]
  inputs.hists = {n: dict(hists[n]) for n in inputs.hist_names if n in hists}
  missing = [n for n in inputs.hist_names if n not in hists]
  if missing:
    logging.info("figures: no statistics for %s; their histograms are skipped", missing)
  inputs.percentiles = _in_method_order(
      {m: {n: (float(lo), float(hi)) for n, (lo, hi) in p.items()}
       for m, p in percentiles.items() if p})
  inputs.num_patches = int(num_patches)
  for dataset, name in settings.visual_images:
    image = next((i for i in datasets.get(dataset, ()) if i.name == name), None)
    if image is None:
      logging.info("figures: skipping visual %s/%s (not among the evaluated images)", dataset,
                   name)
      continue
    inputs.visuals.append(visual(dataset, image, results, settings.scale,
                                 (kept_srs or {}).get((dataset, name), {})))
  inputs.dqc_records = sorted((dict(r) for r in dqc_records), key=lambda r: r["step"])
  return inputs


def save_stats(workdir: str | Path, hists: Mapping, percentiles: Mapping, num_patches: int
               ) -> Path:
  """Writes <workdir>/figures/stats.npz (compressed, atomically): the statistics that
  `from_workdir` reads back. Keys: 'num_patches', 'hist:<quantizer>:<field>',
  'pct:<method>:names' and 'pct:<method>:values' (N, 2)."""
  arrays = {"num_patches": np.asarray(int(num_patches))}
  for name, h in hists.items():
    for key in HIST_KEYS:
      arrays[f"hist:{name}:{key}"] = np.asarray(h[key])
  for method, p in percentiles.items():
    arrays[f"pct:{method}:names"] = np.asarray(list(p), dtype=str)
    arrays[f"pct:{method}:values"] = np.asarray(list(p.values()), np.float64).reshape(-1, 2)
  path = Path(workdir) / "figures" / STATS_FILE
  with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.savez_compressed(f, **arrays)
  return path


# ---------------------------------------------------------------------------------------------
# From a finished workdir.


def load_stats(workdir: str | Path) -> tuple[dict, dict, int]:
  """(hists, percentiles, num_patches) as `save_stats` wrote them; empty when absent."""
  path = Path(workdir) / "figures" / STATS_FILE
  if not path.is_file():
    logging.info("figures: no %s; histograms and bound percentiles are skipped", path)
    return {}, {}, 0
  hists: dict[str, dict] = {}
  names: dict[str, list[str]] = {}
  values: dict[str, np.ndarray] = {}
  with np.load(path, allow_pickle=False) as z:
    num_patches = int(z["num_patches"])
    for key in z.files:
      kind, _, rest = key.partition(":")
      owner, _, field = rest.rpartition(":")
      if kind == "hist":
        a = z[key]
        hists.setdefault(owner, {})[field] = (a if a.ndim else
                                              int(a) if field == "numel" else float(a))
      elif kind == "pct" and field == "names":
        names[owner] = [str(n) for n in z[key]]
      elif kind == "pct" and field == "values":
        values[owner] = z[key]
  pct = {m: {n: (float(lo), float(hi)) for n, (lo, hi) in zip(names[m], values[m])}
         for m in names}
  return hists, pct, num_patches


def read_dqc_log(path: str | Path) -> list[dict[str, Any]]:
  """The records of dqc_log.jsonl (lines cut by a kill are dropped), sorted by step."""
  records = []
  for line in Path(path).read_text().splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(rec, dict) and "step" in rec:
      records.append(rec)
  return sorted(records, key=lambda r: r["step"])


def _read_results(workdir: Path) -> dict:
  path = workdir / "results.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: --workdir must be the workdir of a run")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); rerun the run that wrote it") from e


def _bound_files(workdir: Path, results: Mapping) -> dict[str, Path]:
  """{method: bounds file} named in results: each method's `bounds_file`, and the calibration
  bounds a DQC method started from (`start_bounds_file`) under its calibration's name."""
  found: dict[str, Path] = {}
  for method, entry in (results.get("methods") or {}).items():
    if not isinstance(entry, Mapping):
      continue
    if entry.get("bounds_file"):
      found[method] = workdir / entry["bounds_file"]
    spec = REGISTRY.get(method)
    if entry.get("start_bounds_file") and spec is not None and spec.dqc:
      found.setdefault(spec.calibration, workdir / entry["start_bounds_file"])
  return found


def _load_bounds(files_of: Mapping[str, Path]) -> dict[str, dict[str, list[float]]]:
  """{method: {quantizer: [l, u]}}; a missing or unreadable file is left out with a note."""
  out = {}
  for method, path in files_of.items():
    try:
      out[method] = tree_to_dict(bounds_file.load_bounds(path))
    except (OSError, ValueError) as e:
      logging.warning("figures: skipping the bounds of %s (%s)", method, e)
  return out


def _visual_datasets(results: Mapping, settings: FigureSettings
                     ) -> dict[str, list[BenchmarkImage]]:
  """The benchmark sets of the visual images, from the data root the run used."""
  root = (results.get("data") or {}).get("root")
  out = {}
  for dataset in dict.fromkeys(d for d, _ in settings.visual_images):
    try:
      if not root:
        raise FileNotFoundError("results.json names no data root")
      out[dataset] = load_benchmark(root, dataset, settings.scale)
    except (OSError, ValueError) as e:
      logging.info("figures: skipping the visuals of %s (%s)", dataset, e)
  return out


def _saved_srs(workdir: Path, results: Mapping, settings: FigureSettings) -> dict:
  """{(dataset, image): {method: SR}} of the PNGs under <workdir>/sr (eval.save_sr)."""
  kept: dict[tuple[str, str], dict[str, np.ndarray]] = {}
  for dataset, image in settings.visual_images:
    for method in dict.fromkeys([BICUBIC, *(results.get("methods") or {})]):
      png = workdir / "sr" / method / dataset / f"{image}.png"
      if png.is_file():
        kept.setdefault((dataset, image), {})[method] = load_rgb(png)
  return kept


def from_workdir(workdir: str | Path) -> FigureInputs:
  """The `FigureInputs` of a finished workdir, read back without recomputing anything: what the
  run did not save (statistics, SR PNGs, a benchmark no longer there) is left out, with a note.
  """
  workdir = Path(workdir)
  results = _read_results(workdir)
  try:
    settings = figure_settings(results["config"])
  except (KeyError, TypeError) as e:
    raise ValueError(f"{workdir / 'results.json'} lacks the run's config ({e!r} missing); "
                     "rerun with this version to redraw its figures") from e
  log = workdir / "dqc_log.jsonl"
  hists, percentiles, num_patches = load_stats(workdir)
  return collect(settings, results=results,
                 bounds=_load_bounds(_bound_files(workdir, results)),
                 dqc_records=read_dqc_log(log) if log.is_file() else [],
                 kept_srs=_saved_srs(workdir, results, settings),
                 datasets=_visual_datasets(results, settings), hists=hists,
                 percentiles=percentiles, num_patches=num_patches)


def main(argv: Sequence[str] | None = None) -> list[str]:
  """`python -m twodquant_jax.report.inputs --workdir DIR`: redraws DIR/figures/*.png."""
  parser = argparse.ArgumentParser(
      prog="python -m twodquant_jax.report.inputs",
      description="Redraws the figures of a finished workdir into <workdir>/figures from what "
                  "the run saved (nothing is recomputed).")
  parser.add_argument("--workdir", required=True, help="the workdir of a finished run")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  try:
    inputs = from_workdir(args.workdir)
  except (OSError, ValueError) as e:
    parser.exit(2, f"error: {e}\n")
  return write_all(inputs, Path(args.workdir) / "figures")  # each path is logged


if __name__ == "__main__":
  main(sys.argv[1:])
