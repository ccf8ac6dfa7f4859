"""Report figures (PNG): what the bounds look like and what they do to images.

Reporting receives what the run computed (`FigureInputs`: bounds, tensor histograms and
percentiles, SR crops, the DQC records; see `report.inputs`) and never calls back into the
pipeline or recomputes; `write_all` writes (atomically) into `<workdir>/figures/`:
  hist_<quantizer>.png    histograms (log-y) of the FP tensors some quantizers see on the
                          calibration batch, with every available method's bounds (paper Fig. 4);
  bound_percentiles.png   for all 384 quantizers, the percentile of the lower and upper bound in
                          the FP tensor's distribution after DOBI and after DQC (paper Fig. 5);
  visual_<set>_<img>.png  HR / Bicubic / FP / quantized crops with per-image PSNR;
  dqc_loss.png            the DQC loss curve (the records of dqc_log.jsonl).
A figure whose inputs are missing is skipped with a logged note. Plots use matplotlib's
object API on an Agg canvas (no pyplot, no display, no global backend switch).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from twodquant_jax.files import atomic_path
from twodquant_jax.methods import LABELS, QUANTIZED
from twodquant_jax.nn.names import KINDS, quantizer_kind, quantizer_order

KIND_COLORS = {"weight": "tab:blue", "activation": "tab:orange",
               "attention BMM operand": "tab:green"}
METHOD_ORDER = QUANTIZED  # the quantized methods, in the paper's row order
METHOD_STYLES = {"minmax": ("tab:gray", ":"), "percentile": ("tab:purple", "-."),
                 "dobi": ("tab:blue", "--"), "2dquant": ("tab:red", "-")}
CROP_FRACTION = 0.5  # crop side / shorter image side: about a quarter of the image area


def _label(method: str) -> str:
  return LABELS.get(method, method)


def _save(fig: Figure, path: Path) -> str:
  FigureCanvasAgg(fig)
  with atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110)
  logging.info("figure: wrote %s", path)
  return str(path)


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
      # Markers when there are few points, so a one-record log still shows something.
      lines += ax.plot(s, v, label=label, marker="o" if len(pts) < 30 else None, markersize=4,
                       **style)
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


@dataclasses.dataclass
class Visual:
  """One visual comparison: the HR image and each method's SR with its PSNR."""
  dataset: str
  image: str
  hr: np.ndarray
  srs: dict[str, np.ndarray]
  psnrs: dict[str, float]


@dataclasses.dataclass
class FigureInputs:
  """Everything the figures show, computed by the run (see `twodquant_jax.report.inputs`)."""
  scale: int
  bits: int
  bounds: dict[str, dict[str, list[float]]]  # {method: {quantizer: [l, u]}}
  hist_names: list[str] = dataclasses.field(default_factory=list)
  hists: dict[str, dict] = dataclasses.field(default_factory=dict)
  percentiles: dict[str, dict[str, tuple[float, float]]] = dataclasses.field(default_factory=dict)
  num_patches: int = 0
  visuals: list[Visual] = dataclasses.field(default_factory=list)
  dqc_records: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def write_all(inputs: FigureInputs, out_dir: str | Path) -> list[str]:
  """Writes every figure whose inputs are present into `out_dir`; returns the PNG paths."""
  out_dir = Path(out_dir)
  written: list[str] = []
  for name in inputs.hist_names:
    if name in inputs.hists:
      written.append(plot_histogram(
          name, inputs.hists[name], {m: b[name] for m, b in inputs.bounds.items() if name in b},
          out_dir / f"hist_{name}.png", num_patches=inputs.num_patches, bits=inputs.bits))
  pct = {m: p for m, p in inputs.percentiles.items() if p}
  if pct:
    written.append(plot_bound_percentiles(pct, out_dir / "bound_percentiles.png",
                                          num_patches=inputs.num_patches, bits=inputs.bits))
  else:
    logging.info("figures: skipping bound_percentiles.png (no bound percentiles)")
  for v in inputs.visuals:
    title = (f"{v.dataset}/{v.image}, x{inputs.scale}, quantized at W{inputs.bits}A{inputs.bits}:"
             f" the highest-gradient crop; PSNR(Y) per panel")
    written.append(plot_visual(v.hr, v.srs, v.psnrs, out_dir / f"visual_{v.dataset}_{v.image}.png",
                               title=title))
  if inputs.dqc_records:
    written.append(plot_dqc_loss(inputs.dqc_records, out_dir / "dqc_loss.png"))
  else:
    logging.info("figures: skipping dqc_loss.png (no DQC records)")
  return written
