"""The quantized network a method runs: its own weights, fixed extra variables and static options.

The paper's methods quantize the FP weights as they are, so their student is the FP params with
no extras. Methods beyond the paper change the network before calibration (rotations folded into
the weights, channel scaling folded into LayerNorm, learned rounding, per-channel weight bounds):
their student carries the changed params, the variable collections those changes add (e.g.
'rotation', 'rounding') and the SwinIR attributes that switch them on. Calibration, DQC,
evaluation and export take a `Student`, so each change is written once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from twodquant_jax.nn.swinir import SwinIR


@dataclasses.dataclass(frozen=True)
class Student:
  """params: the student's weights; extra: further collections ({} for the paper's methods);
  arch: SwinIR keyword attributes (e.g. {'rotate': ('fc1',), 'weight_channels': True})."""
  params: Mapping[str, Any]
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  arch: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def variables(self, quant: Mapping | None = None) -> dict:
    """The variables of `module`: params, the extras and, when given, the bounds ('quant')."""
    out = {"params": self.params, **self.extra}
    if quant is not None:
      out["quant"] = quant
    return out

  def module(self, scale: int, mode: str = "fp", bits: int = 4, **kw: Any) -> SwinIR:
    """The SwinIR that runs this student (`kw`: further attributes, e.g. remat)."""
    return SwinIR(upscale=scale, mode=mode, bits=bits, **{**dict(self.arch), **kw})


def plain(params: Mapping[str, Any]) -> Student:
  """The paper's student: the FP weights, unchanged."""
  return Student(params)
