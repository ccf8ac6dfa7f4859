"""The method registry: every results row, its label, and how its network and bounds are made.

One place answers "is this method quantized, does it run the network, which network does it
quantize (the stages applied to the FP weights before calibration, the SwinIR options), which
calibration search starts it, is it bias-corrected, and is it refined by DQC from another
method's bounds", so the pipeline, the reports and the sweep never test method names themselves.

The paper's six rows come first and `method=all` names exactly them. The rows beyond the paper
(selected by `method=beyond`, or all rows by `method=all+`) each add one change to DOBI or
2DQuant (DOBI + DQC); `2dquant++` combines per-channel bounds, rotation and (at 3 bits or more,
where it pays inside the combination) smoothing, and `+ch+rot` is the same without smoothing
(docs/beyond.md has the measurements behind each choice):
  - `+ch`: per-output-channel weight bounds (each weight row gets its own [l, u]);
  - `+rot`: orthogonal (Hadamard with random signs) rotations of the quantized tensors;
  - `+smooth`: SmoothQuant-style channel scaling folded into LayerNorm and v;
  - `+bc`: bias correction after calibration (the mean output shift of each quantized linear);
  - `+round`: learned rounding of the weights, trained with the bounds in DQC.
A DQC row quantizes the network its start (`init_from`) calibrated, with its own `arch` added
(e.g. learned rounding, which only DQC trains).
"""

from __future__ import annotations

import dataclasses
from typing import Any

Arch = tuple[tuple[str, Any], ...]  # SwinIR keyword attributes, as sorted (name, value) pairs


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  label: str  # as in the paper's tables
  calibration: str | None = None  # the bound search that initialises it (ptq.dobi.METHODS)
  dqc: bool = False  # bounds refined by DQC, starting from `init_from`'s bounds
  init_from: str | None = None  # the method whose bounds (and network) DQC starts from
  network: bool = True  # False: no SR network at all (bicubic upsampling)
  stages: tuple[str, ...] = ()  # ptq.stages applied to the FP weights before calibration
  arch: Arch = ()  # SwinIR options of its network (e.g. weight_channels, rounding)
  bias_correct: bool = False  # biases corrected for the weight quantization after calibration
  paper: bool = False  # one of the paper's Table-3 rows

  @property
  def quantized(self) -> bool:
    return self.calibration is not None

  @property
  def changes_network(self) -> bool:
    """Its network is not the FP weights with plain bounds: its bounds alone cannot rebuild it
    (a bounds file is not enough; its packed file is)."""
    return bool(self.stages or self.arch or self.bias_correct)


def _arch(**kw: Any) -> Arch:
  return tuple(sorted(kw.items()))


_CH = _arch(weight_channels=True)
REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("fp", "FP", paper=True),
    Method("bicubic", "Bicubic", network=False, paper=True),
    Method("minmax", "MinMax", calibration="minmax", paper=True),
    Method("percentile", "Percentile", calibration="percentile", paper=True),
    Method("dobi", "DOBI", calibration="dobi", paper=True),
    Method("2dquant", "2DQuant", calibration="dobi", dqc=True, init_from="dobi", paper=True),
    # Beyond the paper: DOBI with one change (also the starts of the DQC rows below).
    Method("dobi+ch", "DOBI + per-channel W", calibration="dobi", arch=_CH),
    Method("dobi+rot", "DOBI + rotation", calibration="dobi", stages=("rotate",)),
    Method("dobi+smooth", "DOBI + smoothing", calibration="dobi", stages=("smooth",)),
    Method("dobi+bc", "DOBI + bias corr.", calibration="dobi", bias_correct=True),
    Method("dobi+ch+rot", "DOBI + per-channel W + rotation", calibration="dobi",
           stages=("rotate",), arch=_CH),
    Method("dobi++", "DOBI++", calibration="dobi", stages=("smooth_w3", "rotate"), arch=_CH),
    # 2DQuant (DOBI + DQC) with one change, then all that pay off together.
    Method("2dquant+ch", "2DQuant + per-channel W", calibration="dobi", dqc=True,
           init_from="dobi+ch", arch=_CH),
    Method("2dquant+rot", "2DQuant + rotation", calibration="dobi", dqc=True,
           init_from="dobi+rot", stages=("rotate",)),
    Method("2dquant+smooth", "2DQuant + smoothing", calibration="dobi", dqc=True,
           init_from="dobi+smooth", stages=("smooth",)),
    Method("2dquant+bc", "2DQuant + bias corr.", calibration="dobi", dqc=True,
           init_from="dobi+bc", bias_correct=True),
    Method("2dquant+round", "2DQuant + learned rounding", calibration="dobi", dqc=True,
           init_from="dobi", arch=_arch(rounding=True)),
    Method("2dquant+ch+rot", "2DQuant + per-channel W + rotation", calibration="dobi",
           dqc=True, init_from="dobi+ch+rot", stages=("rotate",), arch=_CH),
    Method("2dquant++", "2DQuant++", calibration="dobi", dqc=True, init_from="dobi++",
           stages=("smooth_w3", "rotate"), arch=_CH),
)}
ROWS = tuple(REGISTRY)  # every row, in table order (the paper's first)
ALL = tuple(n for n, m in REGISTRY.items() if m.paper)  # the paper's rows: method=all
BEYOND = tuple(n for n in ROWS if n not in ALL)  # method=beyond
SELECTORS = {"all": ALL, "all+": ROWS, "beyond": BEYOND}
QUANTIZED = tuple(n for n, m in REGISTRY.items() if m.quantized)
LABELS = {n: m.label for n, m in REGISTRY.items()}


def parse(spec: str) -> tuple[str, ...]:
  """'all' (the paper's six rows), 'all+' (every row), 'beyond' (the rows beyond the paper),
  one method, or a comma-separated list -> the methods in table order."""
  asked = [m.strip() for m in spec.split(",") if m.strip()]
  unknown = [m for m in asked if m not in ROWS and m not in SELECTORS]
  if not asked or unknown or (any(m in SELECTORS for m in asked) and len(asked) > 1):
    raise ValueError(f"config.method must be one of {tuple(SELECTORS)} or one or more "
                     f"(comma-separated) of {ROWS}, got {spec!r}")
  if asked[0] in SELECTORS:
    return SELECTORS[asked[0]]
  return tuple(m for m in ROWS if m in asked)


def quantized(methods: tuple[str, ...]) -> tuple[str, ...]:
  """The quantized methods among `methods`, in their order."""
  return tuple(m for m in methods if REGISTRY[m].quantized)


def trains_dqc(methods: tuple[str, ...]) -> bool:
  """Whether one of `methods` is refined by DQC (when its bounds are not given)."""
  return any(REGISTRY[m].dqc for m in methods)


def calibrations_needed(methods: tuple[str, ...]) -> tuple[str, ...]:
  """The methods whose bounds a calibration pass must compute for `methods`: every quantized
  method not refined by DQC, and the start of every refined one, in table order."""
  wanted = {m for m in methods if REGISTRY[m].quantized and not REGISTRY[m].dqc}
  wanted |= {REGISTRY[m].init_from for m in methods if REGISTRY[m].dqc}
  return tuple(m for m in ROWS if m in wanted)


def network_key(method: str) -> tuple[tuple[str, ...], Arch]:
  """What a method's calibrated network depends on (its stages and SwinIR options): methods
  with the same key quantize the same network and share one capture pass."""
  m = REGISTRY[method]
  return m.stages, m.arch


def dqc_folder(method: str) -> str:
  """Where a DQC row keeps dqc_ckpt/ and dqc_log.jsonl, relative to the workdir: the workdir
  itself for the paper's 2DQuant (as before), `dqc_<method>/` for the others, so several DQC
  rows share a workdir."""
  return "" if REGISTRY[method].paper else f"dqc_{method}"


def dqc_chain(methods: tuple[str, ...] = ALL) -> tuple[str, ...]:
  """The DQC-refined methods among `methods` and the methods they start from (2DQuant and
  DOBI): their bounds get bound-percentile figures and a single-method run names its bounds
  file bounds.json."""
  refined = [m for m in methods if REGISTRY[m].dqc]
  chain = set(refined) | {REGISTRY[m].init_from for m in refined}
  chain |= {s for s in methods for r in ALL if REGISTRY[r].dqc and REGISTRY[r].init_from == s}
  return tuple(m for m in ROWS if m in chain)
