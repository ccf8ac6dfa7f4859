"""The job `main.py` runs: load the model, get bounds (calibrate / DQC / load), evaluate, report.

Data flows one way: checkpoint -> FP params; calibration images -> bounds (DOBI, DQC);
benchmarks -> SR images -> PSNR/SSIM -> results.json / results.md / figures in the workdir.
`results.json` is rewritten after every method, so an interrupted comparison keeps what it did.
"""

from __future__ import annotations

import dataclasses
import functools
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

from twodquant_jax import distributed
from twodquant_jax.report import inputs as figure_inputs
from twodquant_jax import compile_cache, host_runtime
from twodquant_jax import settings as run_settings
from twodquant_jax import workdir as workdir_guard
from twodquant_jax.data import patches
from twodquant_jax.data.benchmarks import load_benchmark
from twodquant_jax.data.images import save_png
from twodquant_jax.eval import predict as evaluate
from twodquant_jax.eval import ratios, validation
from twodquant_jax.formats import bounds_file, convert, packed
from twodquant_jax.data import download, weights
from twodquant_jax.nn.swinir import SwinIR, variable_shapes
from twodquant_jax import methods as method_registry
from twodquant_jax.nn import names as qnames
from twodquant_jax.ptq.dobi import calibrate_many
from twodquant_jax.ptq.dqc import checkpoint as dqc_checkpoint
from twodquant_jax.ptq.dqc import loop as dqc_loop
from twodquant_jax.report import figures
from twodquant_jax.report import tables as report
from twodquant_jax.settings import calib_settings, dataset_names, methods_of, validate

def default_workdir(config: ml_collections.ConfigDict) -> Path:
  bits = "" if config.method in ("fp", "bicubic") else f"_w{config.bits}"
  return Path("runs") / f"x{config.scale}{bits}_{config.method}"


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What a run reads before any work: FP params, bounds stored in the checkpoint, the
  checkpoint's path, the benchmarks and (optionally) the calibration batch. A sweep loads them
  once per scale and shares them between the cells of that scale."""
  params: dict
  ckpt_bounds: dict
  ckpt_path: Path
  datasets: dict
  calib_lr: np.ndarray | None = None  # None: made when needed
  local: ml_collections.ConfigDict | None = None  # the loading config, data roots made local


def load_inputs(config: ml_collections.ConfigDict, calibration: bool = False) -> Inputs:
  """Reads the checkpoint and the benchmarks of `config` (its scale and eval.datasets), and
  with `calibration` the calibration batch too (it depends on the scale, not the bits)."""
  params, ckpt_bounds, ckpt_path = load_params(config)
  config = run_settings.with_local_data(config, has_bounds=bool(ckpt_bounds))  # downloads
  datasets = {n: load_benchmark(config.data.root, n, config.scale)  # bad images fail first
              for n in dataset_names(config)}
  calib_lr = calibration_batch(config) if calibration and not config.model.bounds else None
  return Inputs(params, ckpt_bounds, ckpt_path, datasets, calib_lr, config)


def load_params(config: ml_collections.ConfigDict) -> tuple[dict, dict, Path]:
  """FP params of the checkpoint (local path or the official download) and any bounds in it;
  with `model.packed`, the packed file's (dequantized) params and its bounds instead."""
  if config.model.packed:
    params, quant, _ = packed.load_packed(config.model.packed, config.scale, config.bits)
    return (jax.tree_util.tree_map(jnp.asarray, params), qnames.tree_to_dict(quant),
            Path(config.model.packed))
  path = weights.resolve_checkpoint(config.model.checkpoint or None, config.scale,
                                    config.model.cache_dir or None, mirror=config.data.mirror,
                                    progress=_progress(config),
                                    download_ok=bool(config.data.download),
                                    mirror_digests=run_settings.mirror_digests(config))
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
                            variables=variables, batch_pixels=config.eval.batch_pixels or None,
                            tile_blend=config.eval.tile_blend)


def evaluate_method(config, method: str, predict, datasets: dict, workdir: Path,
                    kept: dict | None = None) -> dict:
  """PSNR/SSIM of `method` on every dataset; SR images are saved (eval.save_sr) and those of
  the visual-comparison images kept in `kept[(dataset, image)][method]` for the figures."""
  out = {}
  keep = set(run_settings.figure_settings(config).visual_images) if kept is not None else set()
  for name, images in datasets.items():
    folder = workdir / "sr" / method / name

    def on_image(img, sr, folder=folder, name=name):
      if config.eval.save_sr and distributed.is_primary():
        save_png(folder / f"{img.name}.png", sr)
      if (name, img.name) in keep:
        kept.setdefault((name, img.name), {})[method] = sr
    res = evaluate.evaluate_images(predict, images, config.scale, chunk=config.eval.batch_size,
                                   progress=_progress(config), desc=f"{method} {name}",
                                   on_image=on_image)
    res["tiled"] = tiling_record(config, images) if method != "bicubic" else None
    logging.info("%-10s %-9s PSNR %.2f dB  SSIM %.4f  (%d images, %.1f s)", method, name,
                 res["psnr"], res["ssim"], res["num_images"], res["seconds"])
    out[name] = res
  return out


def tiling_record(config: ml_collections.ConfigDict, images) -> dict | None:
  """How a dataset's numbers were made: None = whole images, else the tile, overlap and the
  names of the images that were cut into tiles (tiled PSNR is a little lower, see README)."""
  tile = int(config.eval.tile or 0)
  names = [im.name for im in images
           if tile and max(-(-s // 8) * 8 for s in im.lr.shape[:2]) > tile]
  if not names:
    return None
  return {"tile": tile, "tile_overlap": int(config.eval.tile_overlap),
          "tile_blend": str(config.eval.tile_blend), "images": names}


def _progress(config) -> bool:
  return bool(config.progress) and sys.stderr.isatty()


def _environment() -> dict[str, Any]:
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()], "python": platform.python_version(),
          "machine": platform.machine(), "processor": platform.processor(),
          "host_malloc": "tcmalloc" if host_runtime.loaded_tcmalloc() else "glibc"}


def write_results(workdir: Path, results: dict) -> None:
  """results.json (atomically) and results.md; only process 0 writes in a multi-process run."""
  if not distributed.is_primary():
    return
  workdir.mkdir(parents=True, exist_ok=True)
  tmp = workdir / "results.json.tmp"
  tmp.write_text(json.dumps(results, indent=1, default=float))
  tmp.replace(workdir / "results.json")
  (workdir / "results.md").write_text(report.results_markdown(results))


def run(config: ml_collections.ConfigDict, workdir: str | Path | None = None, *,
        inputs: Inputs | None = None) -> dict:
  """Runs the configured method(s) end to end and writes the workdir; returns the results.

  Every setting and input path is checked first; the workdir is locked for the run and a
  different run's results are not replaced unless config.overwrite (twodquant_jax/workdir.py).
  `inputs`: the checkpoint and benchmarks already loaded for this config (a sweep's cells
  share them); None reads them. results.json says "complete": true only once all is done.
  """
  validate(config)
  run_settings.check_paths(config)
  compile_cache.enable(config.compile_cache)
  workdir = Path(workdir) if workdir else default_workdir(config)
  if not distributed.is_primary():  # process 0 holds the lock and writes; the others compute
    return _run(config, workdir, inputs)
  with workdir_guard.claim(workdir, config.to_dict(), overwrite=bool(config.overwrite)):
    return _run(config, workdir, inputs)


def _run(config: ml_collections.ConfigDict, workdir: Path, inputs: Inputs | None) -> dict:
  t_start = time.perf_counter()
  with jax.default_matmul_precision(config.matmul_precision):
    given = config.to_dict()  # as the user gave it: what a rerun is compared with
    if inputs is None:  # loaded here: its data roots are already this run's
      inputs = load_inputs(config)
      config = inputs.local
    else:  # shared by a sweep's cells: this cell's roots (a cache check; fetches what it lacks)
      config = run_settings.with_local_data(config, has_bounds=bool(inputs.ckpt_bounds))
    params, ckpt_bounds, ckpt_path = inputs.params, inputs.ckpt_bounds, inputs.ckpt_path
    datasets = inputs.datasets
    results: dict[str, Any] = {
        "complete": False, "config": given, "checkpoint": str(ckpt_path),
        "data": {"root": config.data.root, "calib_root": config.calib.root,
                 "datasets": list(datasets)},
        "scale": config.scale,
        "bits": config.bits, "methods": {}, "environment": _environment(),
        "ratios": ratios.ratios(params, SwinIR(upscale=config.scale), config.bits),
    }
    calib_lr = functools.cache(
        lambda: inputs.calib_lr if inputs.calib_lr is not None else calibration_batch(config))
    bounds = _initial_bounds(config, params, ckpt_bounds, results, calib_lr, workdir)
    kept: dict = {} if config.report.figures else None
    for method in methods_of(config):
      t0 = time.perf_counter()
      entry = results["methods"].setdefault(method, {})
      quant = None
      if method == "bicubic":
        predict = evaluate.bicubic_predict(config.scale)
      else:
        if method == "2dquant" and "2dquant" not in bounds:
          if "dobi" not in methods_of(config) and distributed.is_primary():  # keep the start
            bounds_file.save_bounds(workdir / "bounds_dobi.json", bounds["dobi"],
                                {"method": "dobi", "bits": config.bits, "scale": config.scale,
                                 "identity": entry.get("dobi_identity")})
          bounds["2dquant"], entry["dqc"] = run_dqc(config, params, bounds["dobi"], workdir)
        quant = bounds.get(method)
        if quant is not None:
          entry["bounds_file"] = _save_bounds(config, workdir, method, quant)
          entry["engine"] = config.eval.engine
          if config.export.packed:
            entry["packed"] = _export_packed(config, workdir, method, params, quant, ckpt_path,
                                             results["ratios"])
        predict = sr_predictor(config, params, quant).predict
      entry["datasets"] = evaluate_method(config, method, predict, datasets, workdir, kept)
      entry["seconds"] = time.perf_counter() - t0
      results["seconds_total"] = time.perf_counter() - t_start
      write_results(workdir, results)
    if config.report.figures and distributed.is_primary():
      make_figures(config, workdir, results, params, datasets, calib_lr, kept)
  results["seconds_total"] = time.perf_counter() - t_start
  results["complete"] = True
  write_results(workdir, results)
  return results


def make_figures(config: ml_collections.ConfigDict, workdir: Path, results: dict, params: dict,
                 datasets: dict, calib_lr, kept: dict | None = None) -> list[str]:
  """Hands what the run computed to the report figures (<workdir>/figures/*.png)."""
  try:
    lr = calib_lr()
  except (OSError, ValueError) as e:
    logging.info("figures: no calibration batch (%s)", e)
    lr = None
  inputs = figure_inputs.collect(run_settings.figure_settings(config), workdir, results,
                                 params=params, calib_lr=lr, datasets=datasets,
                                 default_method=config.method, kept_srs=kept)
  return figures.write_all(inputs, workdir / "figures")


def _initial_bounds(config, params, ckpt_bounds, results, calib_lr, workdir: Path | None = None
                    ) -> dict[str, dict]:
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
    given = bounds_file.load_bounds(config.model.bounds, like, bits=config.bits,
                                    scale=config.scale)
    source = config.model.bounds
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
  lr = calib_lr()
  if "2dquant" in wanted and "dobi" not in methods and workdir is not None:
    if _reuse_dobi(config, params, lr, workdir, like, bounds, results):
      init.remove("dobi")
  if not init:
    return bounds
  calibrated = calibrate_many(params, config.scale, lr,
                              {m: (config.bits, calib_settings(config, m)) for m in init},
                              progress=_progress(config))
  for m, (quant, info) in calibrated.items():
    bounds[m] = distributed.from_primary(quant, f"{m} bounds")  # identical on every process
    if m in methods:
      results["methods"].setdefault(m, {})["calibration"] = info
    else:  # DOBI only as the start of 2DQuant
      results["methods"].setdefault("2dquant", {})["calibration"] = info
  return bounds


def dqc_validator(config: ml_collections.ConfigDict, params: dict, model: SwinIR):
  """bounds -> held-out PSNR on `dqc.val_root` images, or None when no folder is set."""
  if not config.dqc.val_root:
    return None
  images = validation.load_validation_images(config.dqc.val_root, config.scale,
                                             int(config.dqc.val_images), int(config.dqc.val_crop))
  return lambda quant: validation.validate_psnr(params, quant, images, model)


def _reuse_dobi(config, params, lr, workdir: Path, like, bounds: dict, results: dict) -> bool:
  """Loads <workdir>/bounds_dobi.json into bounds['dobi'] when it was made from the same weights,
  calibration batch and settings (a resumed 2DQuant run), instead of recomputing DOBI. Records
  the identity in results either way, so the file written later carries it."""
  identity = workdir_guard.dobi_identity(
      config.bits, config.scale, dataclasses.asdict(calib_settings(config, "dobi")),
      dqc_checkpoint.fingerprint(params), lr)
  entry = results["methods"].setdefault("2dquant", {})
  entry["dobi_identity"] = identity
  path = workdir / "bounds_dobi.json"
  if not workdir_guard.reusable_bounds(path, identity):
    return False
  bounds["dobi"] = bounds_file.load_bounds(path, like)
  entry["calibration"] = {"method": "dobi", "reused": str(path)}
  logging.info("DOBI: reusing %s (same weights, calibration batch and settings)", path)
  return True


def run_dqc(config: ml_collections.ConfigDict, params: dict, quant0: dict, workdir: Path
            ) -> tuple[dict, dict]:
  """DQC from the DOBI bounds, with held-out validation when `dqc.val_root` is set."""
  settings = run_settings.dqc_settings(config)
  return dqc_loop.train(params, quant0, settings, run_settings.loop_settings(config), workdir,
                        progress=_progress(config),
                        validate=dqc_validator(config, params, settings.model("quant")))


def _export_packed(config, workdir: Path, method: str, params: dict, quant: dict,
                   source: Path, ratio: dict) -> dict:
  """Writes model_<method>_x{s}_w{b}.safetensors and logs its size against the paper's ratio."""
  info = packed.export_packed(workdir / packed.packed_filename(method, config.scale, config.bits),
                              params, quant, scale=config.scale, bits=config.bits, method=method,
                              source_sha256=download.sha256sum(source))
  logging.info("%s", packed.summary_line(info, ratio["compression"],
                                         ratio["params"]["bias_table"]))
  return info


def _save_bounds(config, workdir: Path, method: str, quant: dict) -> str:
  """bounds.json for a single-method run (dobi or 2dquant), else bounds_<method>.json."""
  single = len(methods_of(config)) == 1 and method in ("dobi", "2dquant")
  fname = "bounds.json" if single else f"bounds_{method}.json"
  if distributed.is_primary():
    bounds_file.save_bounds(workdir / fname, quant, {"method": method, "bits": config.bits,
                                                     "scale": config.scale})
  return fname
