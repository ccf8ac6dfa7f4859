"""The Table-3-style Markdown table of a run, from its results (results.json)."""

from __future__ import annotations

from typing import Mapping

from twodquant_jax.formats.packed import summary_line as packed_summary
from twodquant_jax.methods import LABELS, REGISTRY


def results_markdown(results: Mapping) -> str:
  """PSNR/SSIM per method (rows) and dataset (columns), in the layout of the paper's Table 3,
  then per dataset the quantized rows' PSNR against the FP model's SR ("vs FP") when recorded."""
  methods = results["methods"]
  datasets: list[str] = []
  for entry in methods.values():
    for name in entry.get("datasets", {}):
      if name not in datasets:
        datasets.append(name)
  fidelity = [n for n in datasets
              if any("vs_fp" in e.get("datasets", {}).get(n, {}) for e in methods.values())]
  scale, bits = results["scale"], results["bits"]
  head = ("| Method | Bits (W/A) | " + " | ".join(datasets + [f"{n} vs FP" for n in fidelity])
          + " |")
  sep = "|---|---|" + "---|" * (len(datasets) + len(fidelity))
  rows = [f"# SwinIR-light x{scale}: PSNR (dB) / SSIM on Y", "", head, sep]
  order = {m: i for i, m in enumerate(LABELS)}
  for method, entry in sorted(methods.items(), key=lambda kv: order.get(kv[0], len(order))):
    quantized = method in REGISTRY and REGISTRY[method].quantized
    b = f"{bits}/{bits}" if quantized else "32/32"
    cells = []
    for name in datasets:
      d = entry.get("datasets", {}).get(name)
      cells.append(f"{d['psnr']:.2f} / {d['ssim']:.4f}" if d else "-")
    for name in fidelity:
      d = entry.get("datasets", {}).get(name, {})
      cells.append(f"{d['vs_fp']:.2f}" if "vs_fp" in d else "-")
    rows.append(f"| {LABELS.get(method, method)} | {b} | " + " | ".join(cells) + " |")
  if fidelity:
    rows += ["", "vs FP: PSNR (dB, Y, crop = scale) of each quantized SR against the FP "
             "model's SR of the same input (FP-fidelity: what quantization loses)."]
  r = results.get("ratios")
  if r:
    rows += ["", f"Compression ratio {r['compression']:.2f}x, speedup ratio {r['speedup']:.2f}x "
             f"at {r['bits']} bits (paper Table 2 counting, {r['macs_input_hw'][0]}x"
             f"{r['macs_input_hw'][1]} LR input)."]
  for entry in methods.values():
    if "packed" in entry:
      rows += ["", packed_summary(entry["packed"], r["compression"] if r else None,
                                  r["params"]["bias_table"] if r else 0)]
  rows += ["", f"Checkpoint: `{results.get('checkpoint', '?')}`; total time "
           f"{results.get('seconds_total', float('nan')):.1f} s."]
  return "\n".join(rows) + "\n"
