"""The paper's Table 3 from the results.json of a sweep's cells (JSON and Markdown).

It only reads results dicts: which cells exist, how they are run and where they live is the
sweep's business. A cell is one run (one scale, one bit width or the full-precision rows);
`build` lays their rows out as Table 3 (per scale: FP and Bicubic, then every method at every
bit width; PSNR and SSIM per dataset) and lists the cells that have no finished results.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from twodquant_jax.methods import LABELS, ROWS


def build(cells: Sequence[Mapping[str, Any]], results: Mapping[str, Mapping | None]) -> dict:
  """Table 3 as a dict.

  Args:
    cells: the sweep's cells in table order, each {"cell": name, "scale": s, "bits": b (None
      for the full-precision rows), "methods": [method, ...]}.
    results: cell name -> its finished results.json dict, or None when it is missing.

  Returns:
    {"scales": {"4": {"datasets": [...], "rows": [row, ...]}}, "missing": [cell names],
    "finished": [cell names]}, a row being {"method", "label", "bits" ("32/32" or "b/b"),
    "cell", "datasets": {name: {"psnr", "ssim", and for quantized rows "vs_fp": PSNR against
    the FP model's SR}} (empty for a missing cell)}.
  """
  table: dict[str, Any] = {"scales": {}, "missing": [], "finished": []}
  order = {m: i for i, m in enumerate(ROWS)}
  for cell in cells:
    name, scale = cell["cell"], str(cell["scale"])
    got = results.get(name)
    (table["finished"] if got is not None else table["missing"]).append(name)
    block = table["scales"].setdefault(scale, {"datasets": [], "rows": []})
    bits = "32/32" if cell["bits"] is None else f"{cell['bits']}/{cell['bits']}"
    for method in sorted(cell["methods"], key=lambda m: order.get(m, len(order))):
      entry = (got or {}).get("methods", {}).get(method, {})
      datasets = {n: {"psnr": float(d["psnr"]), "ssim": float(d["ssim"]),
                      **({"vs_fp": float(d["vs_fp"])} if "vs_fp" in d else {})}
                  for n, d in entry.get("datasets", {}).items()}
      for n in datasets:
        if n not in block["datasets"]:
          block["datasets"].append(n)
      block["rows"].append({"method": method, "label": LABELS.get(method, method),
                            "bits": bits, "cell": name, "datasets": datasets})
  return table


def markdown(table: Mapping[str, Any]) -> str:
  """Table 3 in Markdown: one table per scale, PSNR (dB) and SSIM columns per dataset, and
  "vs FP" (PSNR against the FP model's SR) where a row recorded it."""
  lines = ["# SwinIR-light: PSNR (dB) / SSIM on Y (paper Table 3 layout)", ""]
  for scale, block in table["scales"].items():
    names = block["datasets"] or ["(no results)"]
    fid = {n for n in names if any("vs_fp" in r["datasets"].get(n, {}) for r in block["rows"])}
    cols = [c for n in names for c in ([f"{n} PSNR", f"{n} SSIM"]
                                       + ([f"{n} vs FP"] if n in fid else []))]
    lines += [f"## x{scale}", "", "| Method | W/A | " + " | ".join(cols) + " |",
              "|---|---|" + "---:|" * len(cols)]
    for row in block["rows"]:
      cells = []
      for n in names:
        d = row["datasets"].get(n)
        cells += [f"{d['psnr']:.2f}", f"{d['ssim']:.4f}"] if d else ["-", "-"]
        if n in fid:
          cells.append(f"{d['vs_fp']:.2f}" if d and "vs_fp" in d else "-")
      lines.append(f"| {row['label']} | {row['bits']} | " + " | ".join(cells) + " |")
    lines.append("")
    if fid:
      lines += ["vs FP: PSNR (dB, Y, crop = scale) of the quantized SR against the FP model's SR "
                "of the same input.", ""]
  if table["missing"]:
    lines.append(f"Missing cells (no finished results.json): {', '.join(table['missing'])}.")
  else:
    lines.append(f"All {len(table['finished'])} cells finished.")
  return "\n".join(lines) + "\n"
