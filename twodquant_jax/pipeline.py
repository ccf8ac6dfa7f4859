"""The job `main.py` runs: load the model, get bounds (calibrate / DQC / load), evaluate, report.

Data flows one way: checkpoint -> FP params; calibration images -> bounds (DOBI, DQC);
benchmarks -> SR images -> PSNR/SSIM -> a `RunRecord` -> results.json / results.md / figures in
the workdir. `run` takes parsed `RunSettings` (settings.parse); `check_inputs` and `prepare` are
its explicit I/O steps (paths, downloads, loading). results.json is rewritten after every
method, so an interrupted comparison keeps what it did.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from twodquant_jax import compile_cache, distributed, files, host_runtime
from twodquant_jax import methods as method_registry
from twodquant_jax import workdir as workdir_guard
from twodquant_jax.data import download, fetch, patches, weights
from twodquant_jax.data.benchmarks import load_benchmark
from twodquant_jax.data.images import save_png, to_uint8
from twodquant_jax.eval import predict as evaluate
from twodquant_jax.eval import ratios, validation
from twodquant_jax.formats import bounds_file, convert, packed
from twodquant_jax.eval.metrics import psnr_y
from twodquant_jax.nn import names as qnames
from twodquant_jax.nn import student as students
from twodquant_jax.nn.student import Student
from twodquant_jax.nn.swinir import SwinIR, variable_shapes
from twodquant_jax.ptq import bias_correction, dobi_reuse, rounding, stages, stats
from twodquant_jax.ptq.dobi import calibrate_many
from twodquant_jax.ptq.dqc import checkpoint as dqc_checkpoint
from twodquant_jax.ptq.dqc import loop as dqc_loop
from twodquant_jax.ptq.dqc import memory as dqc_memory
from twodquant_jax.ptq.dqc import step as dqc_step
from twodquant_jax.report import figures
from twodquant_jax.report import inputs as figure_inputs
from twodquant_jax.report import tables as report
from twodquant_jax.report.record import MethodRecord, RunRecord
from twodquant_jax.settings import RunSettings, calibration_images_needed


def default_workdir(settings: RunSettings) -> Path:
  bits = f"_w{settings.bits}" if settings.quantized else ""
  return Path("runs") / f"x{settings.scale}{bits}_{settings.method_spec}"


# ---------------------------------------------------------------------------------------------
# Inputs: checked before any work, then read (the explicit I/O steps of a run).


def _mirror_checksums(path: str) -> tuple[tuple[str, str], ...]:
  """The {original URL: sha256} JSON file of data.mirror_checksums, checked."""
  try:
    data = json.loads(Path(path).expanduser().read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"config.data.mirror_checksums: cannot read {path} as JSON ({e})") from e
  if not isinstance(data, dict) or not all(
      isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)
      for v in data.values()):
    raise ValueError(f"config.data.mirror_checksums: {path} must hold {{\"<original URL>\": "
                     "\"<sha256 hex>\"}")
  return tuple(sorted((str(k), v) for k, v in data.items()))


def check_inputs(settings: RunSettings) -> RunSettings:
  """Every file or folder the run will read exists (FileNotFoundError naming the field) and the
  small ones parse (the calibration batch file, data.mirror_checksums), so a typo fails in a
  second, before the workdir is touched. Returns the settings with the mirror digests read."""
  s, quantized = settings, bool(settings.quantized)
  calibrates = quantized and not s.model.bounds
  wanted = [("model.packed", s.model.packed, "file"),
            ("model.checkpoint", "" if s.model.packed else s.model.checkpoint, "file"),
            ("model.bounds", s.model.bounds, "file"),
            ("data.root", s.data.root, "dir")]
  if calibrates:
    wanted += [("calib.batch_file", s.calib.batch_file, "file")]
    if not s.calib.batch_file:
      wanted += [("calib.root", s.calib.root, "dir")]
  if s.dqc is not None:
    wanted += [("calib.root", s.calib.root, "dir"), ("dqc.val_root", s.validation.root, "dir")]
  for field, value, kind in wanted:
    if not value:
      continue
    path = Path(str(value)).expanduser()
    if not (path.is_file() if kind == "file" else path.is_dir()):
      raise FileNotFoundError(f"config.{field}: {'file' if kind == 'file' else 'folder'} "
                              f"not found: {path}")
  if calibrates and s.calib.batch_file:
    patches.load_batch_file(s.calib.batch_file)  # small: a bad one fails now, named
  if s.data.mirror_checksums_file and not s.data.mirror_checksums:
    data = dataclasses.replace(s.data,
                               mirror_checksums=_mirror_checksums(s.data.mirror_checksums_file))
    s = dataclasses.replace(s, data=data)
  return s


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What a run reads before any work: FP params, bounds stored in the checkpoint, the
  checkpoint's path, the local data roots, the benchmarks and (optionally) the calibration
  batch. A sweep reads them once per scale and shares them between the cells of that scale."""
  params: dict
  ckpt_bounds: dict
  ckpt_path: Path
  roots: fetch.DataRoots
  datasets: dict
  calib_lr: np.ndarray | None = None  # None: made when needed
  packed_student: Student | None = None  # model.packed: the file's network (params = its weights)
  # The FP model's SR of every benchmark image (uint8), {dataset: {image: SR}}, filled by the
  # first run that needs them (the "vs FP" column) and shared by a sweep's cells of this scale.
  fp_srs: dict = dataclasses.field(default_factory=dict)


def prepare(settings: RunSettings, calibration: bool = False) -> Inputs:
  """Reads the checkpoint (downloading the official one if none is given), resolves the data
  roots (downloading missing sets), reads the benchmarks and, with `calibration`, the
  calibration batch (it depends on the scale, not the bits)."""
  params, ckpt_bounds, ckpt_path, packed_student = _load_model(settings)
  calibration = calibration and not settings.model.bounds
  roots = resolve_data(settings, has_bounds=bool(ckpt_bounds), calibration=calibration)
  datasets = {n: load_benchmark(roots.data_root, n, settings.scale)  # bad images fail first
              for n in roots.datasets}
  calib_lr = calibration_batch(settings, roots.calib_root) if calibration else None
  return Inputs(params, ckpt_bounds, ckpt_path, roots, datasets, calib_lr, packed_student)


def resolve_data(settings: RunSettings, has_bounds: bool = False, calibration: bool = False
                 ) -> fetch.DataRoots:
  """The run's local benchmark root, calibration folder and available sets (data/fetch.py);
  `has_bounds`: the checkpoint holds bounds, so no calibration images are read;
  `calibration`: the calibration batch is read now (a sweep's shared inputs) even if these
  settings' own methods would not read it."""
  need = calibration_images_needed(settings.methods, settings.calib.batch_file,
                                   settings.bounds_given or has_bounds)
  need = need or (calibration and not settings.calib.batch_file)
  return fetch.resolve(dataclasses.replace(settings.data, need_calib=need))


def with_roots(settings: RunSettings, roots: fetch.DataRoots) -> RunSettings:
  """The settings with the resolved local data roots and available sets (pure)."""
  s = settings
  return dataclasses.replace(
      s, data=dataclasses.replace(s.data, root=str(roots.data_root),
                                  calib_root=str(roots.calib_root)),
      calib=dataclasses.replace(s.calib, root=str(roots.calib_root)),
      loop=dataclasses.replace(s.loop, calib_root=str(roots.calib_root)) if s.loop else None,
      eval=dataclasses.replace(s.eval, datasets=tuple(roots.datasets)))


def load_params(settings: RunSettings) -> tuple[dict, dict, Path]:
  """FP params of the checkpoint (local path or the official download) and any bounds in it;
  with `model.packed`, the packed file's (dequantized) params and its bounds instead."""
  return _load_model(settings)[:3]


def _load_model(settings: RunSettings) -> tuple[dict, dict, Path, Student | None]:
  """`load_params`, and with `model.packed` the file's network (a `Student`: its weights,
  extra collections and SwinIR options, all the file records) and bounds {name: array}."""
  s = settings
  if s.model.packed:
    net, quant, _ = packed.load_student(s.model.packed, s.scale, s.bits)
    on_device = lambda tree: jax.tree_util.tree_map(jnp.asarray, tree)
    net = Student(on_device(net.params), on_device(dict(net.extra)), net.arch)
    bounds = {k: np.asarray(v) for k, v in qnames.leaves_by_name(quant, qnames.BOUNDS).items()}
    return dict(net.params), bounds, Path(s.model.packed), net
  path = weights.resolve_checkpoint(s.model.checkpoint or None, s.scale,
                                    s.model.cache_dir or None, mirror=s.data.mirror,
                                    progress=_progress(s), download_ok=s.data.download,
                                    mirror_digests=dict(s.data.mirror_checksums))
  shapes = variable_shapes(s.scale)["params"]
  params, bounds = convert.load_checkpoint(path, s.scale, shapes)
  return jax.tree_util.tree_map(jnp.asarray, params), bounds, path, None


def calibration_batch(settings: RunSettings, calib_root: str | Path | None = None
                      ) -> np.ndarray:
  """The uint8 LR calibration batch: a given .npz, else the first batch of the training stream
  (of `calib_root`, default calib.root)."""
  c = settings.calib
  if c.batch_file:
    return patches.load_batch_file(c.batch_file)["lr"]
  source = patches.load_patch_source(calib_root or c.root, c.lr_size * settings.scale)
  return patches.calibration_batch(source, settings.seed, scale=settings.scale,
                                   batch_size=c.num_patches, lr_size=c.lr_size,
                                   augment=c.augment)["lr"]


# ---------------------------------------------------------------------------------------------
# Evaluation.


def arch_key(net: Student) -> tuple:
  """A student's SwinIR options as a hashable key (lists as tuples) for the jitted functions."""
  freeze = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
  return tuple(sorted((k, freeze(v)) for k, v in dict(net.arch).items()))


def sr_predictor(settings: RunSettings, net: Student | dict, quant: dict | None
                 ) -> evaluate.Predictor:
  """A Predictor for the FP model (quant None: `net`'s params, unquantized) or the quantized
  network `net` (a method's `Student`; plain FP params are the paper's) with these bounds."""
  s, e = settings, settings.eval
  net = net if isinstance(net, Student) else students.plain(net)
  if quant is None:
    kind, variables = (s.scale,), {"params": net.params}
  else:
    mode = "int" if e.engine == "int" else "quant"  # integer engine or fake-quant
    kind, variables = (s.scale, mode, s.bits, arch_key(net)), net.variables(quant)
    if not kind[-1]:
      kind = kind[:-1]  # the paper's methods: the same compiled functions as before
  return evaluate.Predictor(evaluate.jitted_apply(*kind), s.scale, batch_size=e.batch_size,
                            tile=e.tile or None, tile_overlap=e.tile_overlap,
                            variables=variables, batch_pixels=e.batch_pixels or None,
                            tile_blend=e.tile_blend,
                            bucket_apply=evaluate.bucket_apply(*kind) if e.buckets else None)


def evaluate_method(settings: RunSettings, method: str, predict, datasets: dict, workdir: Path,
                    kept: dict | None = None, tiled: bool = True,
                    fp_srs: dict | None = None, keep_fp: dict | None = None) -> dict:
  """PSNR/SSIM of `method` on every dataset; SR images are saved (eval.save_sr) and those of
  the visual-comparison images kept in `kept[(dataset, image)][method]` for the figures.
  `tiled`: the predictor cuts large images into eval.tile tiles (recorded per dataset).
  `fp_srs` ({dataset: {image: FP SR}}): also the PSNR (Y, crop = scale) of each SR against the
  FP model's, per image and averaged ('vs_fp'); `keep_fp`: store this method's SRs there (the
  FP row, for the quantized rows after it)."""
  out = {}
  keep = set(settings.figures.visual_images) if kept is not None and settings.figures else set()
  for name, images in datasets.items():
    folder = workdir / "sr" / method / name
    vs_fp: dict[str, float] = {}
    reference = (fp_srs or {}).get(name)
    store = keep_fp.setdefault(name, {}) if keep_fp is not None else None

    def on_image(img, sr, folder=folder, name=name, vs_fp=vs_fp, reference=reference,
                 store=store):
      if settings.eval.save_sr and distributed.is_primary():
        save_png(folder / f"{img.name}.png", sr)
      if (name, img.name) in keep:
        kept.setdefault((name, img.name), {})[method] = sr
      if reference is not None:
        vs_fp[img.name] = psnr_y(sr, reference[img.name], settings.scale)
      if store is not None:
        store[img.name] = sr
    res = evaluate.evaluate_images(predict, images, settings.scale,
                                   chunk=settings.eval.batch_size, progress=_progress(settings),
                                   desc=f"{method} {name}", on_image=on_image)
    res["tiled"] = tiling_record(settings, images) if tiled else None
    if vs_fp:
      res["vs_fp"] = float(np.mean(list(vs_fp.values())))
      for image, value in vs_fp.items():
        res["images"][image]["vs_fp"] = value
    logging.info("%-10s %-9s PSNR %.2f dB  SSIM %.4f%s  (%d images, %.1f s)", method, name,
                 res["psnr"], res["ssim"],
                 f"  vs FP {res['vs_fp']:.2f} dB" if "vs_fp" in res else "",
                 res["num_images"], res["seconds"])
    out[name] = res
  return out


def fp_outputs(settings: RunSettings, params: dict, datasets: dict, cache: dict) -> dict:
  """The FP model's SR of every image of `datasets` ({dataset: {image: uint8 SR}}), computed
  for the datasets `cache` lacks and kept there (about 3 bytes per HR pixel)."""
  missing = {n: images for n, images in datasets.items() if n not in cache}
  if missing:
    predict = sr_predictor(settings, params, None).predict
    for name, images in missing.items():
      out = {}
      for k in range(0, len(images), settings.eval.batch_size):  # bounded float memory
        chunk = images[k:k + settings.eval.batch_size]
        out.update({im.name: to_uint8(sr) for im, sr in zip(chunk, predict([im.lr for im in chunk]))})
      cache[name] = out
      logging.info("fp        %-9s kept the FP SRs of %d images (the vs FP column)", name,
                   len(out))
  return {n: cache[n] for n in datasets}


def tiling_record(settings: RunSettings, images) -> dict | None:
  """How a dataset's numbers were made: None = whole images, else the tile, overlap and the
  names of the images that were cut into tiles (tiled PSNR is a little lower, see README)."""
  e = settings.eval
  tile = int(e.tile or 0)
  names = [im.name for im in images
           if tile and max(-(-s // 8) * 8 for s in im.lr.shape[:2]) > tile]
  if not names:
    return None
  return {"tile": tile, "tile_overlap": int(e.tile_overlap), "tile_blend": str(e.tile_blend),
          "images": names}


def _progress(settings: RunSettings) -> bool:
  return settings.progress and sys.stderr.isatty()


def _environment() -> dict[str, Any]:
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()], "python": platform.python_version(),
          "machine": platform.machine(), "processor": platform.processor(),
          "host_malloc": "tcmalloc" if host_runtime.loaded_tcmalloc() else "glibc"}


def write_results(workdir: Path, record: RunRecord) -> None:
  """results.json and results.md, atomically; only process 0 writes in a multi-process run."""
  if not distributed.is_primary():
    return
  results = record.to_json()
  files.write_json(workdir / "results.json", results)
  files.atomic_write(workdir / "results.md", report.results_markdown(results))


# ---------------------------------------------------------------------------------------------
# The run.


def run(settings: RunSettings, workdir: str | Path | None = None, *,
        inputs: Inputs | None = None) -> dict:
  """Runs the configured method(s) end to end and writes the workdir; returns the results (as
  written to results.json).

  Every input path is checked first; the workdir is locked for the run and a different run's
  results are not replaced unless config.overwrite (twodquant_jax/workdir.py). `inputs`: the
  checkpoint and benchmarks already read for these settings (a sweep's cells share them); None
  reads them. results.json says "complete": true only once all is done.
  """
  settings = check_inputs(settings)
  compile_cache.enable(settings.compile_cache)
  workdir = Path(workdir) if workdir else default_workdir(settings)
  if not distributed.is_primary():  # process 0 holds the lock and writes; the others compute
    return _run(settings, workdir, inputs)
  with workdir_guard.claim(workdir, settings.config_dict, overwrite=settings.overwrite):
    return _run(settings, workdir, inputs)


def _run(settings: RunSettings, workdir: Path, inputs: Inputs | None) -> dict:
  t_start = time.perf_counter()
  shared = inputs is not None  # a sweep's (or benchmark's) runs share the inputs: FP SRs too
  with jax.default_matmul_precision(settings.matmul_precision):
    if inputs is None:  # read here: its data roots are this run's
      inputs = prepare(settings)
      roots = inputs.roots
    else:  # shared by a sweep's cells: this cell's roots (a cache check; fetches what it lacks)
      roots = resolve_data(settings, has_bounds=bool(inputs.ckpt_bounds))
    s = with_roots(settings, roots)
    params, datasets = inputs.params, inputs.datasets
    record = RunRecord(
        config=dict(settings.config_dict), checkpoint=str(inputs.ckpt_path),
        data={"root": s.data.root, "calib_root": s.calib.root, "datasets": list(datasets)},
        scale=s.scale, bits=s.bits, environment=_environment(),
        ratios=ratios.ratios(params, SwinIR(upscale=s.scale), s.bits))
    for method in s.methods:  # rows in the paper's order
      record.method(method)
    calib_lr = functools.cache(
        lambda: inputs.calib_lr if inputs.calib_lr is not None else calibration_batch(s))
    host_runtime.log_resident("inputs read")  # memory: stage boundary
    check_dqc_memory(s, params, inputs.ckpt_bounds)  # memory: stop now, not in DQC
    bounds, nets = _initial_bounds(s, params, inputs.ckpt_bounds, record, calib_lr, workdir,
                                   inputs.packed_student)
    host_runtime.log_resident("bounds initialised")  # memory: stage boundary
    dqc_records: list[dict] = []
    kept: dict | None = {} if s.figures else None
    # The "vs FP" column: the FP model's SRs (none with a packed file: no FP model).
    vs_fp = s.eval.vs_fp and inputs.packed_student is None and (bool(s.quantized) or shared)
    for method in s.methods:
      t0 = time.perf_counter()
      entry, spec = record.method(method), method_registry.REGISTRY[method]
      quant = fp_srs = keep_fp = None
      if not spec.network:
        predict = evaluate.bicubic_predict(s.scale)
      else:
        if spec.dqc and method not in bounds:
          predictor = predict = None  # memory: release point, before DQC
          release_memory("before DQC")
          bounds[method], nets[method], entry.dqc = refine(s, method, params, bounds, nets,
                                                           entry, workdir)
          release_memory("after DQC")  # memory: release point, after DQC
          records = entry.dqc.pop("records", [])
          dqc_records = records if spec.paper else dqc_records
        quant = bounds.get(method)
        net = nets.get(method, students.plain(params))
        if quant is not None:
          entry.bounds_file = _save_bounds(s, workdir, method, quant)
          entry.engine = s.eval.engine
          if s.export_packed:
            entry.packed = _export_packed(s, workdir, method, net, quant, inputs.ckpt_path,
                                          record.ratios)
          if vs_fp:
            fp_srs = fp_outputs(s, params, datasets, inputs.fp_srs)
        elif vs_fp and not all(n in inputs.fp_srs for n in datasets):
          keep_fp = inputs.fp_srs  # the FP row: its SRs serve the quantized rows after it
        predictor = sr_predictor(s, net, quant)
        predictor.plan([im.lr.shape[:2] for images in datasets.values() for im in images])
        predict = predictor.predict
      entry.datasets = evaluate_method(s, method, predict, datasets, workdir, kept,
                                       tiled=spec.network, fp_srs=fp_srs, keep_fp=keep_fp)
      if spec.network:
        compiled = predictor.compile_stats()
        entry.eval_compiles, entry.eval_compile_s = compiled["compiles"], compiled["compile_s"]
      entry.seconds = time.perf_counter() - t0
      record.seconds_total = time.perf_counter() - t_start
      write_results(workdir, record)
      host_runtime.log_resident(f"{method} evaluated")  # memory: stage boundary
    if s.figures and distributed.is_primary():
      make_figures(s, workdir, record, params, bounds, datasets, calib_lr, kept, dqc_records)
  record.seconds_total = time.perf_counter() - t_start
  record.complete = True
  write_results(workdir, record)
  return record.to_json()


def release_memory(stage: str) -> None:
  """Memory release point: drops every compiled evaluation executable (finished methods and
  image sizes; a later evaluation recompiles, from the persistent cache when it is on) and
  returns the heap's free pages to the system, then logs the resident size."""
  dropped = evaluate.release_executables()
  host_runtime.release_heap()
  host_runtime.log_resident(f"{stage} ({dropped} evaluation executables released)")


def check_dqc_memory(settings: RunSettings, params: dict, ckpt_bounds: dict) -> None:
  """Before DOBI: when the run trains DQC, plans its microbatch now ('auto') or checks the one set,
  so a step that cannot fit the memory stops the run with one line before any work
  (ptq/dqc/memory.py; planned again, with the resident size then, when DQC starts)."""
  s = settings
  trains = any(method_registry.REGISTRY[m].dqc for m in s.methods)
  if not trains or s.dqc is None or s.loop is None or s.bounds_given or ckpt_bounds:
    return
  quant = variable_shapes(s.scale, "quant", s.bits)["quant"]
  check = (dqc_memory.plan if s.dqc.microbatch == dqc_step.AUTO_MICROBATCH
           else dqc_memory.check_explicit)
  check(s.dqc, s.loop.batch_size, s.loop.lr_size, dqc_step.data_mesh(), params, quant)


def refine(settings: RunSettings, method: str, params: dict, bounds: dict[str, dict],
           nets: dict[str, Student], entry: MethodRecord, workdir: Path
           ) -> tuple[dict, Student, dict]:
  """DQC of `method` from its start's bounds and network (the start's bounds kept as
  bounds_<start>.json when the start is no row of the run: a resumed run reuses it, the figures
  show it). Returns the bounds, the network to evaluate and export, and DQC's info."""
  spec = method_registry.REGISTRY[method]
  start = spec.init_from
  if start not in settings.methods:
    entry.start_bounds_file = f"bounds_{start}.json"
    if distributed.is_primary():
      save_bounds(workdir / entry.start_bounds_file, bounds[start],
                              {"method": start, "bits": settings.bits, "scale": settings.scale,
                               "identity": entry.dobi_identity})
  return run_dqc(settings, params, nets[method], bounds[start],
                 workdir / method_registry.dqc_folder(method))


def make_figures(settings: RunSettings, workdir: Path, record: RunRecord, params: dict,
                 bounds: dict[str, dict], datasets: dict, calib_lr: Callable[[], np.ndarray],
                 kept: dict | None, dqc_records: list[dict]) -> list[str]:
  """The report figures (<workdir>/figures/*.png) from what the run holds in memory; the tensor
  statistics are also saved so the workdir can be re-plotted (report.inputs.from_workdir)."""
  fig = settings.figures
  try:
    lr = calib_lr()
    lr = lr[:fig.calib_patches] if fig.calib_patches > 0 else lr
  except (OSError, ValueError) as e:
    logging.info("figures: no calibration batch (%s)", e)
    lr = None
  order = {m: k for k, m in enumerate(method_registry.ROWS)}
  all_bounds = {m: qnames.tree_to_dict(b)  # the paper's networks: bounds of the FP tensors
                for m, b in sorted(bounds.items(), key=lambda kv: order[kv[0]])
                if not method_registry.REGISTRY[m].changes_network}
  shown = {m: b for m, b in all_bounds.items() if m in method_registry.dqc_chain()}
  hist_names = figure_inputs.hist_names(fig)
  hists, pct, num_patches = {}, {}, 0
  if lr is not None and (hist_names or shown):
    hists, pct = stats.tensor_stats(params, settings.scale, lr, shown, hist_names, all_bounds)
    num_patches = len(lr)
  inputs = figure_inputs.collect(fig, results=record.to_json(), bounds=all_bounds,
                                 dqc_records=dqc_records, kept_srs=kept, datasets=datasets,
                                 hists=hists, percentiles=pct, num_patches=num_patches)
  paths = figures.write_all(inputs, workdir / "figures")
  figure_inputs.save_stats(workdir, hists, pct, num_patches)
  return paths


def _initial_bounds(settings: RunSettings, params: dict, ckpt_bounds: dict, record: RunRecord,
                    calib_lr: Callable[[], np.ndarray], workdir: Path | None = None,
                    packed_net: Student | None = None
                    ) -> tuple[dict[str, dict], dict[str, Student]]:
  """Bounds before DQC and the network of every method to run (and of every DQC start): loaded
  from a file or the checkpoint when given, else calibrated. Each method's network is the FP
  weights changed by its stages (`ptq.stages`, e.g. rotations folded into the weights) with its
  SwinIR options; methods of the same network (MinMax, Percentile, DOBI and the start of
  2DQuant) share ONE capture pass of it on the calibration batch. Bias-corrected methods get
  their corrected network after calibration; a DQC row quantizes its start's network with its
  own options added. Records where the bounds came from."""
  s = settings
  if not s.quantized:
    return {}, {}
  plain = students.plain(params)
  if packed_net is not None or s.model.bounds or ckpt_bounds:
    # Given bounds are evaluated as they are (2DQuant: the calibrated model, no further DQC).
    if packed_net is not None:
      given, source = _bounds_tree(ckpt_bounds), s.model.packed
    else:
      like = variable_shapes(s.scale, "quant", s.bits)["quant"]
      changed = [m for m in s.quantized if method_registry.REGISTRY[m].changes_network]
      if changed:  # settings.parse refuses model.bounds with these; a checkpoint's bounds too
        raise ValueError(f"config.method {changed[0]!r} changes the network: bounds alone "
                         "cannot rebuild it; evaluate its packed file (config.model.packed)")
      if s.model.bounds:
        given = bounds_file.load_bounds(s.model.bounds, like, bits=s.bits, scale=s.scale)
        source = s.model.bounds
      else:
        given, source = qnames.dict_to_tree(ckpt_bounds, like), "checkpoint"
    for m in s.quantized:
      record.method(m).bounds_from = str(source)
    return {m: given for m in s.quantized}, {m: packed_net or plain for m in s.quantized}
  init = list(method_registry.calibrations_needed(s.quantized))
  lr = calib_lr()
  inputs = stage_inputs(s, params, lr)
  nets = _networks(init, plain, inputs)
  bounds: dict[str, dict] = {}
  for refined in (m for m in s.quantized if method_registry.REGISTRY[m].dqc):
    start = method_registry.REGISTRY[refined].init_from
    if start not in s.methods and start in init and workdir is not None:
      reused, entry = reuse_start(s, params, lr, workdir, None, start, nets[start])
      record.methods[refined] = dataclasses.replace(record.method(refined), **entry)
      if reused is not None:
        bounds[start] = reused
        init.remove(start)
  groups: dict[tuple, list[str]] = {}
  for m in init:
    groups.setdefault(method_registry.network_key(m), []).append(m)
  for group in groups.values():
    calibrated = _calibrate(nets[group[0]], s.scale, lr,
                            {m: (s.bits, _calib(s, m)) for m in group}, progress=_progress(s))
    for m, (quant, info) in calibrated.items():
      bounds[m] = distributed.from_primary(quant, f"{m} bounds")  # identical on every process
      if m in s.methods:
        record.method(m).calibration = info
      else:  # only as the start of the methods DQC refines from it
        for refined in s.quantized:
          if method_registry.REGISTRY[refined].init_from == m:
            record.method(refined).calibration = info
  for m in list(bounds):
    if method_registry.REGISTRY[m].bias_correct:
      nets[m] = bias_correct(nets[m], bounds[m], inputs)
  for m in s.quantized:
    spec = method_registry.REGISTRY[m]
    if spec.dqc:  # the start's network, with the row's own options (e.g. learned rounding)
      start = nets[spec.init_from]
      nets[m] = dataclasses.replace(start, arch={**dict(start.arch), **dict(spec.arch)})
  return bounds, nets


def stage_inputs(settings: RunSettings, params: dict, lr_u8: np.ndarray) -> stages.StageInputs:
  """What the stages may measure on: the FP weights and the calibration batch in [0, 1]; the
  key (random signs) depends on the seed only, so every method with a stage gets the same."""
  return stages.StageInputs(fp_params=params, calib_lr=np.asarray(lr_u8, np.float32) / 255.0,
                            scale=settings.scale, bits=settings.bits,
                            key=jax.random.key(settings.seed))


def _networks(methods: list[str], plain: Student, inputs: stages.StageInputs
              ) -> dict[str, Student]:
  """The network of each method: its stages applied to the FP weights, with its SwinIR
  options; methods with the same stages and options share one `Student`."""
  built: dict[tuple, Student] = {}
  out = {}
  for m in methods:
    key = method_registry.network_key(m)
    if key not in built:
      spec = method_registry.REGISTRY[m]
      base = dataclasses.replace(plain, arch=dict(spec.arch)) if spec.arch else plain
      built[key] = stages.apply(spec.stages, base, inputs) if spec.stages else base
    out[m] = built[key]
  return out


def _calibrate(net: Student, scale: int, lr: np.ndarray, settings: dict, progress: bool
               ) -> dict[str, tuple[dict, dict]]:
  """calibrate_many on the network `net` (one capture pass for every entry of `settings`)."""
  return calibrate_many(net, scale, lr, settings, progress=progress)


def bias_correct(net: Student, quant: dict, inputs: stages.StageInputs) -> Student:
  """The network with its biases corrected for the weight quantization with `quant`."""
  return bias_correction.bias_correct(net, quant, inputs)


def _bounds_tree(bounds: dict) -> dict:
  """{name: [l, u] or (2, out) array} -> the 'quant' collection (names already checked)."""
  return traverse_util.unflatten_dict({
      qnames.path_from_name(n) + (qnames.BOUNDS,): jnp.asarray(v, jnp.float32)
      for n, v in bounds.items()})


def _calib(settings: RunSettings, method: str):
  """The calibration settings of `method` (one of the run's, or a DQC start outside it)."""
  if method in settings.calibrations:
    return settings.calibrations[method]
  some = next(iter(settings.calibrations.values()))
  return dataclasses.replace(some, method=method_registry.REGISTRY[method].calibration)


def reuse_start(settings: RunSettings, params: dict, lr: np.ndarray, workdir: Path, like,
                start: str, net: Student | None = None) -> tuple[dict | None, dict[str, Any]]:
  """The DQC start's bounds from <workdir>/bounds_<start>.json when that file was made from the
  same network, calibration batch and settings (a resumed 2DQuant run), else None; and the
  refined method's record fields (the start's identity, which the file written later carries,
  and the reused file). `net`: the start's network (default: the FP weights, unchanged);
  `like`: its bounds tree (None: from the network)."""
  net = net or students.plain(params)
  calib = dataclasses.asdict(_calib(settings, start))
  if net.extra or net.arch:  # a changed network: what it is belongs to the identity
    calib["network"] = {"arch": repr(sorted(dict(net.arch).items())),
                        "extra": dqc_checkpoint.fingerprint(dict(net.extra))}
  identity = dobi_reuse.dobi_identity(
      settings.bits, settings.scale, calib, dqc_checkpoint.fingerprint(net.params), lr)
  if like is None:
    like = quant_like(net, settings.scale, settings.bits)
  path = workdir / f"bounds_{start}.json"
  per_tensor = all(tuple(x.shape) == (2,) for x in jax.tree_util.tree_leaves(like))
  if not per_tensor or not dobi_reuse.reusable_bounds(path, identity):
    return None, {"dobi_identity": identity}
  logging.info("%s: reusing %s (same network, calibration batch and settings)", start, path)
  return bounds_file.load_bounds(path, like), {
      "dobi_identity": identity, "calibration": {"method": start, "reused": str(path)}}


def quant_like(net: Student, scale: int, bits: int) -> dict:
  """The shapes of the network's 'quant' collection (bounds per tensor, or per channel)."""
  model = net.module(scale, "quant", bits)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
  return shapes["quant"]


def dqc_validator(settings: RunSettings, params: dict, model: SwinIR):
  """bounds -> held-out PSNR on `dqc.val_root` images, or None when no folder is set."""
  v = settings.validation
  if not v.root:
    return None
  images = validation.load_validation_images(v.root, settings.scale, v.images, v.crop)
  return lambda quant: validation.validate_psnr(params, quant, images, model)


def run_dqc(settings: RunSettings, params: dict, net: Student, quant0: dict, workdir: Path
            ) -> tuple[dict, Student, dict]:
  """DQC of the network `net` from the start's bounds against the FP teacher `params`, with
  held-out validation when `dqc.val_root` is set (the paper's network only). Returns the
  bounds, the network to evaluate and export (learned rounding baked into its weights: plain
  round-to-nearest then gives the learned codes) and the info (with the log `records`)."""
  # The paper's 2DQuant, exactly as before. A stage that changed only the weights (smoothing,
  # bias correction) has no extra collection and no option, yet a network of its own.
  if net.params is params and not net.extra and not net.arch:
    student = dqc_step.model_for(settings.dqc, "quant")
    quant, info = dqc_loop.train(params, quant0, settings.dqc, settings.loop, workdir,
                                 progress=_progress(settings),
                                 validate=dqc_validator(settings, params, student))
    return quant, net, info
  net, quant, info = dqc_loop.train_student(params, net, quant0, settings.dqc, settings.loop,
                                            workdir, progress=_progress(settings))
  if dict(net.arch).get("rounding"):
    net = rounding.bake(net, quant, settings.bits)
  return quant, net, info


def _export_packed(settings: RunSettings, workdir: Path, method: str, net: Student,
                   quant: dict, source: Path, ratio: dict) -> dict:
  """Writes model_<method>_x{s}_w{b}.safetensors (the network `net` runs: its weights, extra
  collections and options) and logs its size against the paper's ratio."""
  s = settings
  info = packed.export_packed(workdir / packed.packed_filename(method, s.scale, s.bits),
                              net.params, quant, scale=s.scale, bits=s.bits, method=method,
                              source_sha256=download.sha256sum(source), extra=net.extra,
                              arch=net.arch)
  logging.info("%s", packed.summary_line(info, ratio["compression"],
                                         ratio["params"]["bias_table"]))
  return info


def _save_bounds(settings: RunSettings, workdir: Path, method: str, quant: dict) -> str:
  """bounds.json for a single-method run of the DQC chain (DOBI or 2DQuant), else
  bounds_<method>.json."""
  single = len(settings.methods) == 1 and method in method_registry.dqc_chain()
  fname = "bounds.json" if single else f"bounds_{method}.json"
  if distributed.is_primary():
    save_bounds(workdir / fname, quant, {"method": method, "bits": settings.bits,
                                                     "scale": settings.scale})
  return fname


def save_bounds(path: Path, quant: dict, meta: dict) -> None:
  """bounds.json: {name: [l, u]} (formats/bounds_file.py) for per-tensor bounds; a network
  with per-channel weight bounds writes {name: [l, u] or [[l per channel], [u per channel]]}
  (read back from its packed file, not from this file)."""
  leaves = qnames.leaves_by_name(quant, qnames.BOUNDS)
  if all(np.shape(v) == (2,) for v in leaves.values()):
    bounds_file.save_bounds(path, quant, meta)
    return
  files.write_json(path, {"bounds": {k: np.asarray(v, np.float64).tolist()
                                     for k, v in sorted(leaves.items())}, "meta": dict(meta)})
