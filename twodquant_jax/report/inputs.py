"""What the report figures show, gathered from a run: the bounds in the workdir, statistics of
the FP tensors on the calibration batch, the SR crops of the visual images and the DQC log.

The pipeline hands over what it already has (FP params, the calibration batch, the SR images
it produced while evaluating); only what is missing is computed here, from the lower layers
(`eval`, `ptq`), never by calling back into the pipeline. `report.figures` then only draws.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from twodquant_jax.data.images import load_rgb, to_uint8
from twodquant_jax.eval import predict
from twodquant_jax.formats import bounds_file
from twodquant_jax.nn.swinir import variable_shapes
from twodquant_jax.ptq import dobi
from twodquant_jax.nn.names import quantizer_order, tree_to_dict
from twodquant_jax.settings import FigureSettings
from twodquant_jax.report.figures import (HIST_BINS, METHOD_ORDER, FigureInputs, Visual,
                                          read_dqc_log)


def bound_files(workdir: str | Path, default_method: str, results: Mapping | None = None
                ) -> dict[str, Path]:
  """{method: bounds file} for the bounds in the workdir, in METHOD_ORDER.

  `bounds_<method>.json` names its method; `bounds.json` says it in its meta (else it is
  `default_method`'s). A method's `bounds_file` entry in results.json wins.
  """
  workdir = Path(workdir)
  found: dict[str, Path] = {}
  for path in sorted(workdir.glob("bounds*.json")):
    if path.name == "bounds.json":
      try:
        meta = json.loads(path.read_text()).get("meta") or {}
      except (json.JSONDecodeError, AttributeError):
        meta = {}
      method = meta.get("method") or default_method
    else:
      method = path.stem[len("bounds_"):]
    found.setdefault(method, path)
  for method, entry in ((results or {}).get("methods") or {}).items():
    f = entry.get("bounds_file") if isinstance(entry, Mapping) else None
    if f and (workdir / f).is_file():
      found[method] = workdir / f
  order = {m: k for k, m in enumerate(METHOD_ORDER)}
  return dict(sorted(found.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def load_bound_dicts(files: Mapping[str, Path]) -> dict[str, dict[str, list[float]]]:
  """{method: {quantizer: [lower, upper]}}; unreadable files are skipped with a note."""
  out = {}
  for method, path in files.items():
    try:
      out[method] = tree_to_dict(bounds_file.load_bounds(path))
    except (OSError, ValueError) as e:
      logging.warning("figures: skipping bounds %s (%s)", path, e)
  return out


@jax.jit
def bound_fractions(x: jnp.ndarray, lowers: jnp.ndarray, uppers: jnp.ndarray
                    ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Share of the elements of x below each lower bound (clipped up) and at or below each upper
  bound (not clipped down): the bounds' percentiles, exact integer counts."""
  flat = x.reshape(-1)
  below = jax.lax.map(lambda v: jnp.sum(flat < v, dtype=jnp.int32), lowers)
  upto = jax.lax.map(lambda v: jnp.sum(flat <= v, dtype=jnp.int32), uppers)
  return below.astype(jnp.float32) / flat.size, upto.astype(jnp.float32) / flat.size


def tensor_stats(params: Mapping, scale: int, lr: np.ndarray,
                 bounds: Mapping[str, Mapping[str, Sequence[float]]],
                 hist_names: Iterable[str], hist_bounds: Mapping | None = None
                 ) -> tuple[dict, dict]:
  """One streamed pass over the captured FP tensors.

  Returns (hists, percentiles): hists[name] = {'counts', 'edges', 'min', 'max', 'numel'} for
  `hist_names` (bins span the data and every bound of `hist_bounds`, default `bounds`);
  percentiles[method][name] = (percentile of the lower bound, of the upper bound) for the
  methods of `bounds`: the share (%) of elements below l (clipped up), and at or below u.
  """
  hist_bounds = bounds if hist_bounds is None else hist_bounds
  hist_names = set(hist_names)
  hists: dict[str, dict] = {}
  pct: dict[str, dict[str, tuple[float, float]]] = {m: {} for m in bounds}
  for _, captured, _ in dobi.iter_captured(params, scale, lr):
    for name, x in captured.items():
      methods = [m for m in bounds if name in bounds[m]]
      if methods:
        below, upto = bound_fractions(x, jnp.asarray([bounds[m][name][0] for m in methods]),
                                      jnp.asarray([bounds[m][name][1] for m in methods]))
        below, upto = np.asarray(below) * 100.0, np.asarray(upto) * 100.0
        for k, m in enumerate(methods):
          pct[m][name] = (float(below[k]), float(upto[k]))
      if name in hist_names:
        lo, hi = float(jnp.min(x)), float(jnp.max(x))
        span = [lo, hi] + [v for b in hist_bounds.values() if name in b for v in b[name][:2]]
        a, b = min(span), max(span)
        pad = 0.02 * (b - a) if b > a else 1e-3
        counts, edges = jnp.histogram(x.reshape(-1), bins=HIST_BINS, range=(a - pad, b + pad))
        hists[name] = {"counts": np.asarray(counts), "edges": np.asarray(edges), "min": lo,
                       "max": hi, "numel": int(x.size)}
    del captured
  return hists, pct


def _image_psnr(results: Mapping, method: str, dataset: str, image: str) -> float | None:
  try:
    return float(results["methods"][method]["datasets"][dataset]["images"][image]["psnr"])
  except (KeyError, TypeError):
    return None


def _sr_of(method: str, lr: np.ndarray, settings: FigureSettings, params: Mapping | None,
           bound_path: Path | None) -> np.ndarray | None:
  """The method's SR of one LR image, computed here (when the run did not keep it)."""
  if method == "bicubic":
    return to_uint8(predict.bicubic_predict(settings.scale)([lr])[0])
  if params is None:
    return None
  variables = {"params": params}
  if method != "fp":
    if bound_path is None:
      logging.info("figures: no bounds file for %s; it is left out of the visual", method)
      return None
    like = variable_shapes(settings.scale, "quant", settings.bits)["quant"]
    variables["quant"] = bounds_file.load_bounds(bound_path, like)
  fn = predict.jitted_apply(settings.scale, "fp" if method == "fp" else "quant", settings.bits)
  p = predict.Predictor(fn, settings.scale, batch_size=1, variables=variables)
  return to_uint8(p.predict([lr])[0])


def visual(dataset: str, image, workdir: Path, results: Mapping, settings: FigureSettings,
           params: Mapping | None, bound_paths: Mapping[str, Path],
           kept: Mapping[str, np.ndarray] | None = None) -> Visual:
  """Bicubic and every method in results on one image: `kept` SRs (from the run), else the
  PNG saved under <workdir>/sr, else computed here."""
  methods = ["bicubic"] + [m for m in ("fp",) + METHOD_ORDER if m in results.get("methods", {})]
  srs: dict[str, np.ndarray] = {}
  for method in methods:
    saved = workdir / "sr" / method / dataset / f"{image.name}.png"
    if kept and method in kept:
      srs[method] = kept[method]
    elif saved.is_file():
      srs[method] = load_rgb(saved)
    else:
      sr = _sr_of(method, image.lr, settings, params, bound_paths.get(method))
      if sr is not None:
        srs[method] = sr
  psnrs = {}
  for m, sr in srs.items():
    p = _image_psnr(results, m, dataset, image.name)
    psnrs[m] = p if p is not None else predict.score(sr, image.hr, settings.scale)[0]
  return Visual(dataset, image.name, image.hr, srs, psnrs)


def collect(settings: FigureSettings, workdir: str | Path, results: Mapping, *,
            params: Mapping | None, calib_lr: np.ndarray | None,
            datasets: Mapping[str, Sequence], default_method: str = "2dquant",
            kept_srs: Mapping[tuple[str, str], Mapping[str, np.ndarray]] | None = None
            ) -> FigureInputs:
  """Gathers the `FigureInputs` of a workdir. Inputs that are missing (no params, no
  calibration batch, an unknown image) leave their figures out, with a logged note."""
  workdir = Path(workdir)
  files = bound_files(workdir, default_method, results)
  bounds = load_bound_dicts(files)
  inputs = FigureInputs(scale=settings.scale, bits=int(results.get("bits", settings.bits)),
                        bounds=bounds)
  known = set(quantizer_order())
  for n in settings.hist_quantizers:
    if n not in known:
      logging.warning("figures: report.hist_quantizers: unknown quantizer %r", n)
  inputs.hist_names = [n for n in settings.hist_quantizers if n in known]
  pct_bounds = {m: b for m, b in bounds.items() if m in ("dobi", "2dquant")}
  if (inputs.hist_names or pct_bounds) and calib_lr is not None and params is not None:
    lr = calib_lr[:settings.calib_patches] if settings.calib_patches > 0 else calib_lr
    inputs.num_patches = len(lr)
    inputs.hists, inputs.percentiles = tensor_stats(params, settings.scale, lr, pct_bounds,
                                                    inputs.hist_names, bounds)
  else:
    logging.info("figures: skipping histograms and bound percentiles (no calibration batch, "
                 "FP params or quantizers to show)")
  for dataset, name in settings.visual_images:
    image = next((i for i in datasets.get(dataset, ()) if i.name == name), None)
    if image is None:
      logging.info("figures: skipping visual %s/%s (not among the evaluated images)", dataset,
                   name)
      continue
    inputs.visuals.append(visual(dataset, image, workdir, results, settings, params, files,
                                 (kept_srs or {}).get((dataset, name))))
  log_path = workdir / "dqc_log.jsonl"
  inputs.dqc_records = read_dqc_log(log_path) if log_path.is_file() else []
  return inputs
