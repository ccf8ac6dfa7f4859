"""Report figures (PNG) for a workdir: what the bounds look like and what they do to images.

`make_all` writes into `<workdir>/figures/`:
  hist_<quantizer>.png    histograms (log-y) of the FP tensors some quantizers see on the
                          calibration batch, with every available method's bounds (paper Fig. 4);
  bound_percentiles.png   for all 384 quantizers, the percentile of the lower and upper bound in
                          the FP tensor's distribution after DOBI and after DQC (paper Fig. 5);
  visual_<set>_<img>.png  HR / Bicubic / FP / quantized crops with per-image PSNR;
  dqc_loss.png            the DQC loss curve from dqc_log.jsonl.
A figure whose inputs are missing is skipped with a logged note. Plots use matplotlib's
object API on an Agg canvas (no pyplot, no display, no global backend switch).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from twodquant_jax.ptq.methods import LABELS

# The 16 quantizers of one Swin block, in the released code's module order.
BLOCK_QUANTIZERS = (
    "attn.qkv.q.weight_quantizer", "attn.qkv.q.act_quantizer",
    "attn.qkv.k.weight_quantizer", "attn.qkv.k.act_quantizer",
    "attn.qkv.v.weight_quantizer", "attn.qkv.v.act_quantizer",
    "attn.proj.weight_quantizer", "attn.proj.act_quantizer",
    "attn.mymodule_q", "attn.mymodule_k", "attn.mymodule_v", "attn.mymodule_a",
    "mlp.fc1.weight_quantizer", "mlp.fc1.act_quantizer",
    "mlp.fc2.weight_quantizer", "mlp.fc2.act_quantizer",
)
KINDS = ("weight", "activation", "attention BMM operand")
KIND_COLORS = {"weight": "tab:blue", "activation": "tab:orange",
               "attention BMM operand": "tab:green"}
METHOD_ORDER = ("minmax", "percentile", "dobi", "2dquant")
METHOD_STYLES = {"minmax": ("tab:gray", ":"), "percentile": ("tab:purple", "-."),
                 "dobi": ("tab:blue", "--"), "2dquant": ("tab:red", "-")}
HIST_BINS = 200
CROP_FRACTION = 0.5  # crop side / shorter image side: about a quarter of the image area


def quantizer_order(num_layers: int = 4, num_blocks: int = 6) -> list[str]:
  """All quantizer names in the released code's order (index 0..383 for SwinIR-light)."""
  return [f"layers.{i}.residual_group.blocks.{j}.{q}" for i in range(num_layers)
          for j in range(num_blocks) for q in BLOCK_QUANTIZERS]


def quantizer_kind(name: str) -> str:
  """'weight', 'activation' (a linear's input) or 'attention BMM operand' (q, k, v, softmax)."""
  if name.endswith(".weight_quantizer"):
    return "weight"
  if ".mymodule_" in name:
    return "attention BMM operand"
  return "activation"


def _label(method: str) -> str:
  return LABELS.get(method, method)


def _save(fig: Figure, path: Path) -> str:
  path.parent.mkdir(parents=True, exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=110)
  logging.info("figure: wrote %s", path)
  return str(path)


# ---------------------------------------------------------------------------------------------
# Inputs found in the workdir.


def bound_files(workdir: str | Path, config: ml_collections.ConfigDict,
                results: Mapping | None = None) -> dict[str, Path]:
  """{method: bounds file} for the bounds in the workdir, in METHOD_ORDER.

  `bounds_<method>.json` names its method; `bounds.json` says it in its meta (else it is the
  configured method's). A method's `bounds_file` entry in results.json wins.
  """
  workdir = Path(workdir)
  found: dict[str, Path] = {}
  for path in sorted(workdir.glob("bounds*.json")):
    if path.name == "bounds.json":
      try:
        meta = json.loads(path.read_text()).get("meta") or {}
      except (json.JSONDecodeError, AttributeError):
        meta = {}
      method = meta.get("method") or config.method
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
  from twodquant_jax.ptq import names as qnames
  from twodquant_jax.io import bounds_file
  out = {}
  for method, path in files.items():
    try:
      out[method] = qnames.tree_to_dict(bounds_file.load_bounds(path))
    except (OSError, ValueError) as e:
      logging.warning("figures: skipping bounds %s (%s)", path, e)
  return out


def calibration_lr(config: ml_collections.ConfigDict) -> np.ndarray | None:
  """The first `report.calib_patches` LR patches of the calibration batch, or None if absent."""
  from twodquant_jax import pipeline
  try:
    lr = pipeline.calibration_batch(config)
  except (OSError, ValueError) as e:
    logging.info("figures: no calibration batch (%s)", e)
    return None
  n = int(config.report.get("calib_patches", 4) or 0)
  return lr[:n] if n > 0 else lr


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


# ---------------------------------------------------------------------------------------------
# Statistics of the captured FP tensors, one RSTB at a time.


@jax.jit
def _bound_fractions(x: jnp.ndarray, lowers: jnp.ndarray, uppers: jnp.ndarray
                     ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Share of the elements of x below each lower bound (clipped up) and at or below each upper
  bound (not clipped down): the bounds' percentiles, exact integer counts."""
  flat = x.reshape(-1)
  below = jax.lax.map(lambda v: jnp.sum(flat < v, dtype=jnp.int32), lowers)
  upto = jax.lax.map(lambda v: jnp.sum(flat <= v, dtype=jnp.int32), uppers)
  return below.astype(jnp.float32) / flat.size, upto.astype(jnp.float32) / flat.size


def tensor_stats(params: Mapping, config: ml_collections.ConfigDict, lr: np.ndarray,
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
  from twodquant_jax.ptq import dobi
  hist_names = set(hist_names)
  hists: dict[str, dict] = {}
  pct: dict[str, dict[str, tuple[float, float]]] = {m: {} for m in bounds}
  for _, captured, _ in dobi.iter_captured(params, config.scale, lr):
    for name, x in captured.items():
      methods = [m for m in bounds if name in bounds[m]]
      if methods:
        below, upto = _bound_fractions(x, jnp.asarray([bounds[m][name][0] for m in methods]),
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


# ---------------------------------------------------------------------------------------------
# (a) histograms with bounds, (b) bound percentiles.


def plot_histogram(name: str, hist: Mapping, bounds: Mapping[str, Sequence[float]],
                   path: Path, *, num_patches: int, bits: int) -> str:
  """Histogram (log-y) of one quantizer's FP tensor with each method's [l, u] as lines."""
  fig = Figure(figsize=(8.5, 4.6))
  ax = fig.add_subplot()
  edges, counts = hist["edges"], np.maximum(hist["counts"], 0)
  ax.stairs(counts, edges, fill=True, color="0.6", alpha=0.8,
            label=f"FP values ({hist['numel']:,} elements)")
  for method, (lo, hi) in bounds.items():
    color, style = METHOD_STYLES.get(method, ("black", "-"))
    ax.axvline(lo, color=color, linestyle=style, linewidth=1.8,
               label=f"{_label(method)} [l, u] = [{lo:.4g}, {hi:.4g}]")
    ax.axvline(hi, color=color, linestyle=style, linewidth=1.8)
  ax.set_yscale("log")
  ax.set_ylim(bottom=0.8)
  ax.set_xlabel("value of the FP tensor the quantizer sees")
  ax.set_ylabel("count (log scale)")
  short = name.replace(".residual_group", "")
  kind = quantizer_kind(name)
  seen = ("the weight itself" if kind == "weight"
          else f"its input on the calibration batch ({num_patches} patches)")
  ax.set_title(f"{short}\n{kind} quantizer: {seen}; bounds at {bits} bits", fontsize=10)
  ax.legend(fontsize=8, loc="upper right")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return _save(fig, path)


def plot_bound_percentiles(pct: Mapping[str, Mapping[str, tuple[float, float]]],
                           path: Path, *, num_patches: int, bits: int) -> str:
  """Scatter of bound percentiles over quantizer index: rows = methods, columns = l / u."""
  order = quantizer_order()
  methods = list(pct)
  height = 3.4 * len(methods) + 1.0
  fig = Figure(figsize=(13, height))
  axes = fig.subplots(len(methods), 2, squeeze=False, sharex=True)
  for r, method in enumerate(methods):
    for c, which in enumerate(("lower", "upper")):
      ax = axes[r][c]
      for kind in KINDS:
        idx = [i for i, n in enumerate(order) if n in pct[method] and quantizer_kind(n) == kind]
        ys = [pct[method][order[i]][c] for i in idx]
        ax.scatter(idx, ys, s=9, color=KIND_COLORS[kind], marker="v" if c == 0 else "^",
                   label=f"{kind} ({len(idx)})")
      for b in range(96, len(order), 96):
        ax.axvline(b - 0.5, color="0.7", linewidth=0.8, linestyle=":")
      ax.set_title(f"{_label(method)}: {which} bound", fontsize=10)
      ax.set_ylabel("% of values below l" if c == 0 else "% of values at or below u")
      ax.grid(alpha=0.3)
      if r == len(methods) - 1:
        ax.set_xlabel("quantizer index (dotted lines: RSTB boundaries)")
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.suptitle(f"Percentile of each quantizer's lower (v) and upper (^) bound within its FP "
               f"tensor ({bits} bits; calibration batch, {num_patches} patches)", fontsize=11)
  fig.legend(handles, [f"kind: {l}" for l in labels], loc="upper center",
             bbox_to_anchor=(0.5, 1 - 0.35 / height), ncol=3, fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / height))
  return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# (c) visual comparison.


def best_crop(hr: np.ndarray, size: int, step: int = 1) -> tuple[int, int]:
  """Top-left (y, x) of the size x size window of HR with the highest gradient energy."""
  g = hr.astype(np.float64).mean(axis=-1)
  e = np.zeros_like(g)
  e[:, :-1] += np.diff(g, axis=1) ** 2
  e[:-1, :] += np.diff(g, axis=0) ** 2
  integral = np.pad(e.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
  h, w = g.shape
  ys = np.arange(0, h - size + 1, step)
  xs = np.arange(0, w - size + 1, step)
  sums = (integral[ys[:, None] + size, xs[None, :] + size] - integral[ys[:, None], xs[None, :] + size]
          - integral[ys[:, None] + size, xs[None, :]] + integral[ys[:, None], xs[None, :]])
  i, j = np.unravel_index(int(np.argmax(sums)), sums.shape)
  return int(ys[i]), int(xs[j])


def _image_psnr(results: Mapping, method: str, dataset: str, image: str) -> float | None:
  try:
    return float(results["methods"][method]["datasets"][dataset]["images"][image]["psnr"])
  except (KeyError, TypeError):
    return None


def _quant_like(config: ml_collections.ConfigDict):
  from twodquant_jax.nn.swinir import variable_shapes
  return variable_shapes(config.scale, "quant", config.bits)["quant"]


def sr_images(config: ml_collections.ConfigDict, workdir: Path, results: Mapping,
              params: Callable[[], Mapping], bound_paths: Mapping[str, Path], lr: np.ndarray,
              dataset: str, image: str) -> dict[str, np.ndarray]:
  """{method: uint8 SR image} for Bicubic and every method in results: the saved PNG under
  <workdir>/sr when there is one, else the method run here on this one image."""
  from twodquant_jax import pipeline
  from twodquant_jax.eval import predict as evaluate
  from twodquant_jax.data.images import load_rgb, to_uint8
  from twodquant_jax.ptq import names as qnames
  from twodquant_jax.io import bounds_file
  methods = ["bicubic"] + [m for m in ("fp",) + METHOD_ORDER
                           if m in results.get("methods", {})]
  out: dict[str, np.ndarray] = {}
  for method in methods:
    saved = workdir / "sr" / method / dataset / f"{image}.png"
    if saved.is_file():
      out[method] = load_rgb(saved)
      continue
    if method == "bicubic":
      predict = evaluate.bicubic_predict(config.scale)
    else:
      quant = None
      if method != "fp":
        if method not in bound_paths:
          logging.info("figures: no bounds file for %s; it is left out of the visual", method)
          continue
        quant = bounds_file.load_bounds(bound_paths[method], _quant_like(config))
      predict = pipeline.sr_predictor(config, params(), quant).predict
    out[method] = to_uint8(predict([lr])[0])
  return out


def plot_visual(hr: np.ndarray, srs: Mapping[str, np.ndarray], psnrs: Mapping[str, float],
                path: Path, *, title: str) -> str:
  """Thumbnail with the crop box, then the same crop of HR and of every method's SR."""
  h, w = hr.shape[:2]
  size = max(8, int(min(h, w) * CROP_FRACTION))
  y, x = best_crop(hr, size, step=max(1, size // 16))
  panels = [("HR", hr, None)] + [(_label(m), img, psnrs.get(m)) for m, img in srs.items()]
  ncols = min(4, len(panels) + 1)
  nrows = math.ceil((len(panels) + 1) / ncols)
  fig = Figure(figsize=(3.2 * ncols, 3.5 * nrows + 0.5))
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  ax = axes[0]
  ax.imshow(hr)
  ax.add_patch(Rectangle((x - 0.5, y - 0.5), size, size, fill=False, edgecolor="red",
                         linewidth=2, label=f"crop {size}x{size} at ({y}, {x})"))
  ax.set_title(f"HR {h}x{w} (full image)", fontsize=10)
  ax.set_xlabel("x (px)", fontsize=8)
  ax.set_ylabel("y (px)", fontsize=8)
  ax.tick_params(labelsize=7)
  ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
  for ax, (label, img, psnr) in zip(axes[1:], panels):
    ax.imshow(img[y:y + size, x:x + size], interpolation="nearest")
    ax.set_title(label if psnr is None else f"{label}\n{psnr:.2f} dB", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
  for ax in axes[len(panels) + 1:]:
    ax.set_axis_off()
  fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# (d) DQC loss curve.


def plot_dqc_loss(records: Sequence[Mapping], path: Path) -> str:
  """Loss and its terms (log-y) with the learning rate, plus held-out PSNR when logged."""
  val = [r for r in records if r.get("val_psnr") is not None]
  fig = Figure(figsize=(9, 4.6 if not val else 7.6))
  axes = fig.subplots(2 if val else 1, 1, squeeze=False).ravel()
  ax = axes[0]
  lines = []
  for key, style, label in (("loss", dict(color="black", linewidth=3.0, alpha=0.45), "total loss"),
                            ("l_pix", dict(color="tab:blue", linewidth=1.2), "L_pix (output)"),
                            ("l_feature", dict(color="tab:orange", linewidth=1.2),
                             "L_feature (sum of 4 terms)")):
    pts = [(r["step"], r[key]) for r in records
           if isinstance(r.get(key), (int, float)) and r[key] > 0 and math.isfinite(r[key])]
    if pts:
      s, v = zip(*pts)
      lines += ax.plot(s, v, label=label, **style)
  ax.set_yscale("log")
  ax.set_xlabel("DQC step")
  ax.set_ylabel("loss (log scale)")
  ax.grid(alpha=0.3, which="both")
  lr_pts = [(r["step"], r["lr"]) for r in records if isinstance(r.get("lr"), (int, float))]
  if lr_pts:
    ax2 = ax.twinx()
    s, v = zip(*lr_pts)
    lines += ax2.plot(s, v, color="tab:gray", linestyle="--", linewidth=1.0,
                      label="learning rate (right)")
    ax2.set_ylabel("learning rate")
  ax.legend(lines, [l.get_label() for l in lines], fontsize=8, loc="upper right")
  ax.set_title("DQC: distillation loss during bound training", fontsize=11)
  if val:
    ax = axes[1]
    ax.plot([r["step"] for r in val], [r["val_psnr"] for r in val], "o-", color="tab:green",
            label="held-out PSNR(Y)")
    ax.set_xlabel("DQC step")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("Held-out validation", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


# ---------------------------------------------------------------------------------------------


def _split(s: str) -> list[str]:
  return [p.strip() for p in str(s or "").split(",") if p.strip()]


def make_all(config: ml_collections.ConfigDict, workdir: str | Path, results: Mapping, *,
             params: Mapping | None = None, datasets: Mapping[str, Sequence] | None = None
             ) -> list[str]:
  """Writes every figure whose inputs exist into <workdir>/figures; returns the PNG paths.

  `params` are the FP params (loaded from config.model.checkpoint when None and needed);
  `datasets` maps set names to their `BenchmarkImage`s (sets missing there are loaded from
  config.data.root for the visual comparison).
  """
  workdir = Path(workdir)
  out_dir = workdir / "figures"
  written: list[str] = []
  cache: dict[str, Any] = {}

  def get_params() -> Mapping:
    if params is not None:
      return params
    if "params" not in cache:
      from twodquant_jax import pipeline
      cache["params"] = pipeline.load_params(config)[0]
    return cache["params"]

  files = bound_files(workdir, config, results)
  bounds = load_bound_dicts(files)
  bits = int(results.get("bits", config.bits))

  # (a) and (b): one streamed pass over the captured calibration tensors.
  hist_names = _split(config.report.hist_quantizers)
  pct_bounds = {m: b for m, b in bounds.items() if m in ("dobi", "2dquant")}
  if not hist_names and not pct_bounds:
    logging.info("figures: no histogram quantizers and no DOBI/2DQuant bounds: skipping "
                 "histograms and bound percentiles")
  else:
    lr = calibration_lr(config)
    if lr is None:
      logging.info("figures: skipping histograms and bound percentiles (no calibration batch)")
    else:
      known = set(quantizer_order())
      for n in hist_names:
        if n not in known:
          logging.warning("figures: report.hist_quantizers: unknown quantizer %r", n)
      with jax.default_matmul_precision(config.matmul_precision):
        hists, pct = tensor_stats(get_params(), config, lr, pct_bounds,
                                  [n for n in hist_names if n in known], bounds)
      for name in hist_names:
        if name in hists:
          written.append(plot_histogram(
              name, hists[name], {m: b[name] for m, b in bounds.items() if name in b},
              out_dir / f"hist_{name}.png", num_patches=len(lr), bits=bits))
      pct = {m: p for m, p in pct.items() if p}
      if pct:
        written.append(plot_bound_percentiles(pct, out_dir / "bound_percentiles.png",
                                              num_patches=len(lr), bits=bits))
      else:
        logging.info("figures: skipping bound_percentiles.png (no DOBI or 2DQuant bounds in %s)",
                     workdir)

  # (c) visual comparison.
  for item in _split(config.report.visual_images):
    if "/" not in item:
      logging.warning("figures: report.visual_images entry %r is not <dataset>/<image>", item)
      continue
    dataset, image = item.split("/", 1)
    images = (datasets or {}).get(dataset)
    if images is None:
      try:
        from twodquant_jax.data.benchmarks import load_benchmark
        images = load_benchmark(config.data.root, dataset, config.scale)
      except (OSError, ValueError) as e:
        logging.info("figures: skipping visual %s (%s)", item, e)
        continue
    img = next((i for i in images if i.name == image), None)
    if img is None:
      logging.info("figures: skipping visual %s (no image %r in %s)", item, image, dataset)
      continue
    with jax.default_matmul_precision(config.matmul_precision):
      srs = sr_images(config, workdir, results, get_params, files, img.lr, dataset, image)
    from twodquant_jax.eval import predict as evaluate
    psnrs = {}
    for m, sr in srs.items():
      p = _image_psnr(results, m, dataset, image)
      psnrs[m] = p if p is not None else evaluate.score(sr, img.hr, config.scale)[0]
    title = (f"{dataset}/{image}, x{config.scale}, quantized at W{bits}A{bits}: the "
             f"highest-gradient crop; PSNR(Y) per panel")
    written.append(plot_visual(img.hr, srs, psnrs, out_dir / f"visual_{dataset}_{image}.png",
                               title=title))

  # (d) DQC loss.
  log_path = workdir / "dqc_log.jsonl"
  records = read_dqc_log(log_path) if log_path.is_file() else []
  if records:
    written.append(plot_dqc_loss(records, out_dir / "dqc_loss.png"))
  else:
    logging.info("figures: skipping dqc_loss.png (no records in %s)", log_path)
  return written
