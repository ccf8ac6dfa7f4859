"""The whole Table 3 as one resumable job: every (scale, bit width) cell, then the table.

A cell is one `pipeline.run` in its own sub-workdir: `x{s}_fp/` holds the FP and Bicubic rows
(once per scale), `x{s}_w{b}/` the quantized methods at b bits. A cell is finished when its
results.json says "complete": true with every method of the cell; a rerun skips finished cells
(and says so), and a cell cut short reruns, its DQC resuming from its orbax checkpoint. The
checkpoint and benchmarks are read once per scale and shared by the cells of that scale.
`sweep.shard=i/n` runs the cells i, i+n, i+2n, ... so n machines can split a sweep over a
shared workdir; `sweep.collect=True` only builds table3.json / table3.md from what is finished.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any, Mapping

from absl import logging

from twodquant_jax import distributed, files, pipeline
from twodquant_jax import methods as method_registry
from twodquant_jax.report import table3
from twodquant_jax.settings import RunSettings, SweepSettings, cell_settings

DEFAULT_WORKDIR = Path("runs") / "sweep"


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of the sweep: a scale and a bit width (None: the full-precision rows)."""
  scale: int
  bits: int | None
  methods: tuple[str, ...]

  @property
  def name(self) -> str:
    return f"x{self.scale}_fp" if self.bits is None else f"x{self.scale}_w{self.bits}"

  def describe(self) -> dict[str, Any]:
    return {"cell": self.name, "scale": self.scale, "bits": self.bits,
            "methods": list(self.methods)}


def cells(settings: SweepSettings) -> list[Cell]:
  """All cells in table order: per scale, the full-precision cell, then each bit width."""
  quant = method_registry.quantized(settings.methods)
  fp = tuple(m for m in settings.methods if m not in quant)
  out = []
  for scale in settings.scales:
    if fp:
      out.append(Cell(scale, None, fp))
    if quant:
      out += [Cell(scale, b, quant) for b in settings.bits]
  return out


def shard_cells(all_cells: list[Cell], shard: tuple[int, int]) -> list[Cell]:
  """The i-th of n interleaved slices (cells i, i+n, ...): shards get a mix of scales/bits."""
  index, count = shard
  return all_cells[index::count]


def settings_of(settings: RunSettings, cell: Cell) -> RunSettings:
  """The run settings of a cell, derived from the parsed sweep's (settings.cell_settings)."""
  return cell_settings(settings, cell.scale, cell.bits, cell.methods)


def finished(cell_dir: Path, cell: Cell) -> dict | None:
  """The cell's results if results.json is complete and holds every method of the cell."""
  path = cell_dir / "results.json"
  try:
    results = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  if not results.get("complete") or results.get("scale") != cell.scale:
    return None
  if cell.bits is not None and results.get("bits") != cell.bits:
    return None
  methods = results.get("methods", {})
  if any("datasets" not in methods.get(m, {}) for m in cell.methods):
    return None
  return results


def run(settings: RunSettings, workdir: str | Path | None = None) -> dict:
  """Runs this shard's unfinished cells, then writes table3.json / table3.md; returns the table
  (process 0; {} on the others). `settings`: a parsed sweep config (settings.sweep set).

  In a multi-process run every process runs the same cells (process 0 decides which are
  finished); only process 0 writes.
  """
  sweep = settings.sweep
  workdir = Path(workdir) if workdir else DEFAULT_WORKDIR
  all_cells = cells(sweep)
  if not sweep.collect:
    mine = shard_cells(all_cells, sweep.shard)
    logging.info("sweep: %d of %d cells in shard %d/%d: %s", len(mine), len(all_cells),
                 *sweep.shard, ", ".join(c.name for c in mine))
    for scale, group in itertools.groupby(mine, key=lambda c: c.scale):
      todo = []
      for cell in group:
        cell_dir = workdir / cell.name
        if distributed.agree(finished(cell_dir, cell) is not None):
          logging.info("skipping %s: finished (%s)", cell.name, cell_dir / "results.json")
        else:
          todo.append(cell)
      if not todo:
        continue
      # The checkpoint, benchmarks and calibration batch of this scale: read once.
      calib = any(c.bits is not None for c in todo)
      logging.info("sweep: reading the x%d checkpoint, benchmarks%s", scale,
                   " and calibration batch" if calib else "")
      first = pipeline.check_inputs(settings_of(settings, todo[0]))
      inputs = pipeline.prepare(first, calibration=calib)
      for cell in todo:
        logging.info("sweep: running %s (%s) in %s", cell.name, ", ".join(cell.methods),
                     workdir / cell.name)
        pipeline.run(settings_of(settings, cell), workdir / cell.name, inputs=inputs)
      del inputs
  return collect(workdir, all_cells)


def collect(workdir: Path, all_cells: list[Cell]) -> dict:
  """Builds and writes <workdir>/table3.json and table3.md from the finished cells; returns the
  table. Process 0 alone does this (the others return {}: they may not see its files yet)."""
  if not distributed.is_primary():
    return {}
  results: Mapping[str, dict | None] = {c.name: finished(workdir / c.name, c) for c in all_cells}
  table = table3.build([c.describe() for c in all_cells], results)
  files.write_json(workdir / "table3.json", table)
  files.atomic_write(workdir / "table3.md", table3.markdown(table))
  if table["missing"]:
    logging.warning("sweep: %d of %d cells not finished: %s (run their shards, then "
                    "--config.sweep.collect=True)", len(table["missing"]), len(all_cells),
                    ", ".join(table["missing"]))
  logging.info("sweep: wrote %s and %s", workdir / "table3.json", workdir / "table3.md")
  return table
