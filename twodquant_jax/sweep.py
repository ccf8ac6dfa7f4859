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

import copy
import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Any, Mapping

import ml_collections
from absl import logging

from twodquant_jax import distributed, pipeline
from twodquant_jax import methods as method_registry
from twodquant_jax.report import table3

DEFAULT_WORKDIR = Path("runs") / "sweep"
FP_BITS = 32  # what the full-precision cell's config says (as configs/fp_x*.py)


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


@dataclasses.dataclass(frozen=True)
class SweepSettings:
  scales: tuple[int, ...]
  bits: tuple[int, ...]
  methods: tuple[str, ...]
  shard: tuple[int, int] = (0, 1)  # (index, count)
  collect: bool = False


def _ints(text: str, field: str) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in str(text).split(",") if v.strip())
  except ValueError:
    values = ()
  if not values or len(set(values)) != len(values):
    raise ValueError(f"config.sweep.{field} must be distinct comma-separated integers, e.g. "
                     f"'2,3,4', got {text!r}")
  return values


def sweep_settings(config: ml_collections.ConfigDict) -> SweepSettings:
  """config.sweep, checked (one-line ValueError naming the field)."""
  s = config.sweep
  scales, bits = _ints(s.scales, "scales"), _ints(s.bits, "bits")
  if any(v not in (2, 3, 4) for v in scales):
    raise ValueError(f"config.sweep.scales must be among 2, 3, 4, got {s.scales!r}")
  if any(not 2 <= b <= 8 for b in bits):
    raise ValueError(f"config.sweep.bits must be between 2 and 8, got {s.bits!r}")
  try:
    methods = method_registry.parse(str(s.methods))
  except ValueError as e:
    raise ValueError(str(e).replace("config.method", "config.sweep.methods")) from None
  shard = (0, 1)
  if str(s.shard).strip():
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(s.shard))
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
      raise ValueError(f"config.sweep.shard must be 'i/n' with 0 <= i < n (e.g. 0/2), got "
                       f"{s.shard!r}")
    shard = (int(m.group(1)), int(m.group(2)))
  return SweepSettings(tuple(sorted(scales)), tuple(sorted(bits)), methods, shard,
                       bool(s.collect))


def cells(settings: SweepSettings) -> list[Cell]:
  """All cells in table order: per scale, the full-precision cell, then each bit width."""
  fp = tuple(m for m in settings.methods if not method_registry.REGISTRY[m].quantized)
  quant = tuple(m for m in settings.methods if method_registry.REGISTRY[m].quantized)
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


def cell_config(config: ml_collections.ConfigDict, cell: Cell) -> ml_collections.ConfigDict:
  """The sweep's config with the cell's scale, bits and methods ("{scale}" in
  model.checkpoint / model.bounds formatted with the scale)."""
  c = copy.deepcopy(config.to_dict())
  c.update(scale=cell.scale, bits=FP_BITS if cell.bits is None else cell.bits,
           method=",".join(cell.methods))
  for key in ("checkpoint", "bounds"):
    c["model"][key] = str(c["model"][key]).replace("{scale}", str(cell.scale))
  return ml_collections.ConfigDict(c)


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


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the sweep block and every cell's config before any work."""
  settings = sweep_settings(config)
  for cell in cells(settings):
    pipeline.validate(cell_config(config, cell))


def run(config: ml_collections.ConfigDict, workdir: str | Path | None = None) -> dict:
  """Runs this shard's unfinished cells, then writes table3.json / table3.md; returns the table
  (process 0; {} on the others).

  In a multi-process run every process runs the same cells (process 0 decides which are
  finished); only process 0 writes.
  """
  settings = sweep_settings(config)
  workdir = Path(workdir) if workdir else DEFAULT_WORKDIR
  all_cells = cells(settings)
  if not settings.collect:
    mine = shard_cells(all_cells, settings.shard)
    logging.info("sweep: %d of %d cells in shard %d/%d: %s", len(mine), len(all_cells),
                 *settings.shard, ", ".join(c.name for c in mine))
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
      inputs = pipeline.load_inputs(cell_config(config, todo[0]), calibration=calib)
      for cell in todo:
        logging.info("sweep: running %s (%s) in %s", cell.name, ", ".join(cell.methods),
                     workdir / cell.name)
        pipeline.run(cell_config(config, cell), workdir / cell.name, inputs=inputs)
      del inputs
  return collect(workdir, all_cells)


def collect(workdir: Path, all_cells: list[Cell]) -> dict:
  """Builds and writes <workdir>/table3.json and table3.md from the finished cells; returns the
  table. Process 0 alone does this (the others return {}: they may not see its files yet)."""
  if not distributed.is_primary():
    return {}
  results: Mapping[str, dict | None] = {c.name: finished(workdir / c.name, c) for c in all_cells}
  table = table3.build([c.describe() for c in all_cells], results)
  workdir.mkdir(parents=True, exist_ok=True)
  tmp = workdir / "table3.json.tmp"
  tmp.write_text(json.dumps(table, indent=1))
  tmp.replace(workdir / "table3.json")
  (workdir / "table3.md").write_text(table3.markdown(table))
  if table["missing"]:
    logging.warning("sweep: %d of %d cells not finished: %s (run their shards, then "
                    "--config.sweep.collect=True)", len(table["missing"]), len(all_cells),
                    ", ".join(table["missing"]))
  logging.info("sweep: wrote %s and %s", workdir / "table3.json", workdir / "table3.md")
  return table
