"""The results of a run as a typed record: the pipeline fills it and writes `to_json()` as
results.json (the layout the sweep's `finished`, report/table3.py and the tests read)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class MethodRecord:
  """One results row. A field left None is absent from results.json."""
  bounds_from: str | None = None  # given bounds: the file (or "checkpoint") they came from
  dobi_identity: dict | None = None  # what the DQC start depends on (DOBI reuse on resume)
  calibration: dict | None = None  # the calibration pass's info (or the reused file)
  start_bounds_file: str | None = None  # the DQC start's bounds, saved when not a row itself
  dqc: dict | None = None  # the DQC loop's info
  bounds_file: str | None = None  # the bounds file written in the workdir
  engine: str | None = None  # quantized forward: fake | int
  packed: dict | None = None  # the packed export's info
  datasets: dict | None = None  # per dataset: psnr, ssim, images, ...
  eval_compiles: int | None = None  # network functions compiled for this row's evaluation
  eval_compile_s: float | None = None  # seconds spent compiling them
  seconds: float | None = None

  def to_json(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None}


@dataclasses.dataclass
class RunRecord:
  """A whole run: what it evaluated and how (results.json)."""
  config: dict  # the config as given
  checkpoint: str
  data: dict  # root, calib_root, datasets (the resolved locations)
  scale: int
  bits: int
  environment: dict
  ratios: dict
  methods: dict[str, MethodRecord] = dataclasses.field(default_factory=dict)
  complete: bool = False
  seconds_total: float | None = None

  def method(self, name: str) -> MethodRecord:
    """The record of `name` (created empty on first use)."""
    return self.methods.setdefault(name, MethodRecord())

  def to_json(self) -> dict[str, Any]:
    """results.json: complete, config, checkpoint, data, scale, bits, methods (those with any
    entry), environment, ratios, seconds_total."""
    out = {"complete": self.complete, "config": self.config, "checkpoint": self.checkpoint,
           "data": self.data, "scale": self.scale, "bits": self.bits,
           "methods": {m: r.to_json() for m, r in self.methods.items() if r.to_json()},
           "environment": self.environment, "ratios": self.ratios}
    if self.seconds_total is not None:
      out["seconds_total"] = self.seconds_total
    return out
