"""The method registry: every results row, its label, and where its bounds come from.

One place answers "is this method quantized, which calibration search starts it, and is it
refined by DQC", so the pipeline, the reports and the sweep never keep their own lists.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  label: str  # as in the paper's tables
  calibration: str | None = None  # the bound search that initialises it (ptq.dobi.METHODS)
  dqc: bool = False  # bounds refined by DQC from the calibration's

  @property
  def quantized(self) -> bool:
    return self.calibration is not None


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("fp", "FP"),
    Method("bicubic", "Bicubic"),
    Method("minmax", "MinMax", calibration="minmax"),
    Method("percentile", "Percentile", calibration="percentile"),
    Method("dobi", "DOBI", calibration="dobi"),
    Method("2dquant", "2DQuant", calibration="dobi", dqc=True),
)}
ALL = tuple(REGISTRY)  # the paper's row order
QUANTIZED = tuple(n for n, m in REGISTRY.items() if m.quantized)
LABELS = {n: m.label for n, m in REGISTRY.items()}


def parse(spec: str) -> tuple[str, ...]:
  """'all', one method, or a comma-separated list -> the methods in the paper's row order."""
  asked = [m.strip() for m in spec.split(",") if m.strip()]
  unknown = [m for m in asked if m not in ALL + ("all",)]
  if not asked or unknown or ("all" in asked and len(asked) > 1):
    raise ValueError(f"config.method must be 'all' or one or more (comma-separated) of {ALL}, "
                     f"got {spec!r}")
  return ALL if asked == ["all"] else tuple(m for m in ALL if m in asked)
