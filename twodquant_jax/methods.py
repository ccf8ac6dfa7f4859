"""The method registry: every results row, its label, and where its bounds come from.

One place answers "is this method quantized, does it run the network, which calibration search
starts it, and is it refined by DQC from another method's bounds", so the pipeline, the reports
and the sweep never test method names themselves.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  label: str  # as in the paper's tables
  calibration: str | None = None  # the bound search that initialises it (ptq.dobi.METHODS)
  dqc: bool = False  # bounds refined by DQC, starting from `init_from`'s bounds
  init_from: str | None = None  # the method whose bounds DQC starts from
  network: bool = True  # False: no SR network at all (bicubic upsampling)

  @property
  def quantized(self) -> bool:
    return self.calibration is not None


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("fp", "FP"),
    Method("bicubic", "Bicubic", network=False),
    Method("minmax", "MinMax", calibration="minmax"),
    Method("percentile", "Percentile", calibration="percentile"),
    Method("dobi", "DOBI", calibration="dobi"),
    Method("2dquant", "2DQuant", calibration="dobi", dqc=True, init_from="dobi"),
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


def quantized(methods: tuple[str, ...]) -> tuple[str, ...]:
  """The quantized methods among `methods`, in their order."""
  return tuple(m for m in methods if REGISTRY[m].quantized)


def trains_dqc(methods: tuple[str, ...]) -> bool:
  """Whether one of `methods` is refined by DQC (when its bounds are not given)."""
  return any(REGISTRY[m].dqc for m in methods)


def calibrations_needed(methods: tuple[str, ...]) -> tuple[str, ...]:
  """The methods whose bounds a calibration pass must compute for `methods`: every quantized
  method not refined by DQC, and the start of every refined one, in the paper's row order."""
  wanted = {m for m in methods if REGISTRY[m].quantized and not REGISTRY[m].dqc}
  wanted |= {REGISTRY[m].init_from for m in methods if REGISTRY[m].dqc}
  return tuple(m for m in ALL if m in wanted)


def dqc_chain(methods: tuple[str, ...] = ALL) -> tuple[str, ...]:
  """The DQC-refined methods among `methods` and the methods they start from (2DQuant and
  DOBI): their bounds get bound-percentile figures and a single-method run names its bounds
  file bounds.json."""
  refined = [m for m in methods if REGISTRY[m].dqc]
  chain = set(refined) | {REGISTRY[m].init_from for m in refined}
  chain |= {s for s in methods for r in ALL if REGISTRY[r].dqc and REGISTRY[r].init_from == s}
  return tuple(m for m in ALL if m in chain)
