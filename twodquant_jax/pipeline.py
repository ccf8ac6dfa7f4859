"""The job `main.py` runs: load the model, get bounds (calibrate / DQC / load), evaluate, report.

Data flows one way: checkpoint -> FP params; calibration images -> bounds (DOBI, DQC);
benchmarks -> SR images -> PSNR/SSIM -> results.json / results.md / figures in the workdir.
`results.json` is rewritten after every method, so an interrupted comparison keeps what it did.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from twodquant_jax import settings as run_settings
from twodquant_jax.data import patches
from twodquant_jax.data.benchmarks import load_benchmark
from twodquant_jax.data.images import save_png
from twodquant_jax.eval import predict as evaluate
from twodquant_jax.eval import ratios, validation
from twodquant_jax.io import bounds_file, convert, packed
from twodquant_jax.nn.swinir import SwinIR, variable_shapes
from twodquant_jax.ptq import methods as method_registry
from twodquant_jax.ptq import names as qnames
from twodquant_jax.ptq.dobi import calibrate_many
from twodquant_jax.ptq.dqc import loop as dqc_loop
from twodquant_jax.report import tables as report
from twodquant_jax.settings import calib_settings, dataset_names, methods_of, validate

def default_workdir(config: ml_collections.ConfigDict) -> Path:
  bits = "" if config.method in ("fp", "bicubic") else f"_w{config.bits}"
  return Path("runs") / f"x{config.scale}{bits}_{config.method}"


def load_params(config: ml_collections.ConfigDict) -> tuple[dict, dict, Path]:
  """FP params of the checkpoint (local path or the official download) and any bounds in it;
  with `model.packed`, the packed file's (dequantized) params and its bounds instead."""
  if config.model.packed:
    params, quant, _ = packed.load_packed(config.model.packed, config.scale, config.bits)
    return (jax.tree_util.tree_map(jnp.asarray, params), qnames.tree_to_dict(quant),
            Path(config.model.packed))
  path = convert.resolve_checkpoint(config.model.checkpoint or None, config.scale,
                                    config.model.cache_dir or None)
  shapes = variable_shapes(config.scale)["params"]
  params, bounds = convert.load_checkpoint(path, config.scale, shapes)
  return jax.tree_util.tree_map(jnp.asarray, params), bounds, path


def calibration_batch(config: ml_collections.ConfigDict) -> np.ndarray:
  """The uint8 LR calibration batch: a given .npz, else the first batch of the training stream."""
  if config.calib.batch_file:
    return patches.load_batch_file(config.calib.batch_file)["lr"]
  source = patches.load_patch_source(config.calib.root, config.calib.lr_size * config.scale)
  return patches.calibration_batch(source, config.seed, scale=config.scale,
                                   batch_size=config.calib.num_patches,
                                   lr_size=config.calib.lr_size, augment=config.calib.augment)["lr"]


def sr_predictor(config: ml_collections.ConfigDict, params: dict, quant: dict | None
                 ) -> evaluate.Predictor:
  """A Predictor for the FP model (quant None) or the fake-quantized one with these bounds."""
  if quant is None:
    fn, variables = evaluate.jitted_apply(config.scale), {"params": params}
  else:
    mode = "int" if config.eval.engine == "int" else "quant"  # integer engine or fake-quant
    fn = evaluate.jitted_apply(config.scale, mode, config.bits)
    variables = {"params": params, "quant": quant}
  return evaluate.Predictor(fn, config.scale, batch_size=config.eval.batch_size,
                            tile=config.eval.tile or None, tile_overlap=config.eval.tile_overlap,
                            variables=variables)


def evaluate_method(config, method: str, predict, datasets: dict, workdir: Path) -> dict:
  out = {}
  for name, images in datasets.items():
    on_image = None
    if config.eval.save_sr:
      folder = workdir / "sr" / method / name
      on_image = lambda img, sr, folder=folder: save_png(folder / f"{img.name}.png", sr)
    res = evaluate.evaluate_images(predict, images, config.scale, chunk=config.eval.batch_size,
                                   progress=_progress(config), desc=f"{method} {name}",
                                   on_image=on_image)
    logging.info("%-10s %-9s PSNR %.2f dB  SSIM %.4f  (%d images, %.1f s)", method, name,
                 res["psnr"], res["ssim"], res["num_images"], res["seconds"])
    out[name] = res
  return out


def _progress(config) -> bool:
  return bool(config.progress) and sys.stderr.isatty()


def _environment() -> dict[str, Any]:
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()], "python": platform.python_version(),
          "machine": platform.machine(), "processor": platform.processor()}


def write_results(workdir: Path, results: dict) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  tmp = workdir / "results.json.tmp"
  tmp.write_text(json.dumps(results, indent=1, default=float))
  tmp.replace(workdir / "results.json")
  (workdir / "results.md").write_text(report.results_markdown(results))


def run(config: ml_collections.ConfigDict, workdir: str | Path | None = None) -> dict:
  """Runs the configured method(s) end to end and writes the workdir; returns the results."""
  validate(config)
  workdir = Path(workdir) if workdir else default_workdir(config)
  workdir.mkdir(parents=True, exist_ok=True)
  t_start = time.perf_counter()
  with jax.default_matmul_precision(config.matmul_precision):
    params, ckpt_bounds, ckpt_path = load_params(config)
    datasets = {n: load_benchmark(config.data.root, n, config.scale)
                for n in dataset_names(config)}
    results: dict[str, Any] = {
        "config": config.to_dict(), "checkpoint": str(ckpt_path), "scale": config.scale,
        "bits": config.bits, "methods": {}, "environment": _environment(),
        "ratios": ratios.ratios(params, SwinIR(upscale=config.scale), config.bits),
    }
    bounds = _initial_bounds(config, params, ckpt_bounds, results)
    for method in methods_of(config):
      t0 = time.perf_counter()
      entry = results["methods"].setdefault(method, {})
      quant = None
      if method == "bicubic":
        predict = evaluate.bicubic_predict(config.scale)
      else:
        if method == "2dquant" and "2dquant" not in bounds:
          if "dobi" not in methods_of(config):  # keep the starting point (figures, reruns)
            bounds_file.save_bounds(workdir / "bounds_dobi.json", bounds["dobi"],
                                {"method": "dobi", "bits": config.bits, "scale": config.scale})
          bounds["2dquant"], entry["dqc"] = run_dqc(config, params, bounds["dobi"], workdir)
        quant = bounds.get(method)
        if quant is not None:
          entry["bounds_file"] = _save_bounds(config, workdir, method, quant)
          entry["engine"] = config.eval.engine
          if config.export.packed:
            entry["packed"] = _export_packed(config, workdir, method, params, quant, ckpt_path,
                                             results["ratios"])
        predict = sr_predictor(config, params, quant).predict
      entry["datasets"] = evaluate_method(config, method, predict, datasets, workdir)
      entry["seconds"] = time.perf_counter() - t0
      results["seconds_total"] = time.perf_counter() - t_start
      write_results(workdir, results)
    if config.report.figures:
      report.make_figures(config, workdir, results, params=params, datasets=datasets)
  results["seconds_total"] = time.perf_counter() - t_start
  write_results(workdir, results)
  return results


def _initial_bounds(config, params, ckpt_bounds, results) -> dict[str, dict]:
  """Bounds before DQC for the methods to run: loaded from a file or the checkpoint when given,
  else MinMax / Percentile / DOBI (also DOBI for 2DQuant) from ONE capture pass of the FP model
  on the calibration batch. Records where they came from in results['methods']."""
  methods = methods_of(config)
  wanted = {m for m in methods if method_registry.REGISTRY[m].quantized}
  if not wanted:
    return {}
  like = variable_shapes(config.scale, "quant", config.bits)["quant"]
  given = None
  if config.model.bounds:
    given, source = bounds_file.load_bounds(config.model.bounds, like), config.model.bounds
  elif ckpt_bounds:
    given, source = qnames.dict_to_tree(ckpt_bounds, like), config.model.packed or "checkpoint"
  bounds: dict[str, dict] = {}
  if given is not None:
    # Given bounds are evaluated as they are (2DQuant: the calibrated model, no further DQC).
    for m in wanted:
      bounds[m] = given
      results["methods"].setdefault(m, {})["bounds_from"] = str(source)
    return bounds
  if "2dquant" in wanted:
    wanted.add("dobi")
  init = sorted(wanted - {"2dquant"})
  if not init:
    return bounds
  calibrated = calibrate_many(params, config.scale, calibration_batch(config),
                              {m: (config.bits, calib_settings(config, m)) for m in init},
                              progress=_progress(config))
  for m, (quant, info) in calibrated.items():
    bounds[m] = quant
    if m in methods:
      results["methods"].setdefault(m, {})["calibration"] = info
    else:  # DOBI only as the start of 2DQuant
      results["methods"].setdefault("2dquant", {})["calibration"] = info
  return bounds


def run_dqc(config: ml_collections.ConfigDict, params: dict, quant0: dict, workdir: Path
            ) -> tuple[dict, dict]:
  """DQC from the DOBI bounds, with held-out validation when `dqc.val_root` is set."""
  settings = run_settings.dqc_settings(config)
  validate_fn = None
  if config.dqc.val_root:
    images = validation.load_validation_images(config.dqc.val_root, config.scale,
                                               int(config.dqc.val_images),
                                               int(config.dqc.val_crop))
    model = settings.model("quant")
    validate_fn = lambda quant: validation.validate_psnr(params, quant, images, model)
  return dqc_loop.train(params, quant0, settings, run_settings.loop_settings(config), workdir,
                        progress=_progress(config), validate=validate_fn)


def _export_packed(config, workdir: Path, method: str, params: dict, quant: dict,
                   source: Path, ratio: dict) -> dict:
  """Writes model_<method>_x{s}_w{b}.safetensors and logs its size against the paper's ratio."""
  info = packed.export_packed(workdir / packed.packed_filename(method, config.scale, config.bits),
                              params, quant, scale=config.scale, bits=config.bits, method=method,
                              source_sha256=convert.sha256sum(source))
  logging.info("%s", packed.summary_line(info, ratio["compression"],
                                         ratio["params"]["bias_table"]))
  return info


def _save_bounds(config, workdir: Path, method: str, quant: dict) -> str:
  """bounds.json for a single-method run (dobi or 2dquant), else bounds_<method>.json."""
  single = len(methods_of(config)) == 1 and method in ("dobi", "2dquant")
  fname = "bounds.json" if single else f"bounds_{method}.json"
  bounds_file.save_bounds(workdir / fname, quant, {"method": method, "bits": config.bits,
                                               "scale": config.scale})
  return fname
