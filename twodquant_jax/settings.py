"""The config taken apart once, at the top: ConfigDict -> `RunSettings` (frozen dataclasses).

`parse` checks every value when it builds the settings, so a bad flag fails in a second with
one line naming the field, not after minutes of calibration. Modules below the pipeline never
see the ConfigDict; they get the typed block they need (`CalibSettings`, `DQCSettings`, ...),
all defined here. This module is a leaf: it imports only the method registry, does no I/O and
never touches JAX (files and downloads are the pipeline's `check_inputs` / `prepare`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import urllib.parse
from typing import Any, Mapping

import ml_collections

from twodquant_jax import methods as method_registry

ENGINES = ("fake", "int")  # eval.engine: fake-quant float forward | integer engine
CALIBRATIONS = ("minmax", "percentile", "dobi")  # the bound searches of ptq/dobi.py
LOSSES = ("reference", "paper")  # dqc.loss (ptq/dqc/loss.py)
SCHEDULES = ("cosine", "constant")  # dqc.schedule
REMAT_SETTINGS = ("auto", "off", "matmuls", "full")  # dqc.remat (nn/swinir.py REMAT_MODES + auto)
AUTO_MICROBATCH = -1  # DQCSettings.microbatch: resolved by ptq/dqc/memory.py before jitting
MALLOC_POLICIES = ("auto", "tcmalloc", "keep", "system")  # host_malloc (host_runtime.py)
TILE_BLENDS = ("center", "mean")
SCALES = (2, 3, 4)
FP_BITS = 32  # what a full-precision sweep cell's config says (as configs/fp_x*.py)


# ---------------------------------------------------------------------------------------------
# The typed blocks each layer receives.


@dataclasses.dataclass(frozen=True)
class CalibSettings:
  """How bounds are initialised. `strategy`: 'paper' (one-sided search for the attention map
  and fc2 input) or 'reference' (symmetric everywhere, as the released code runs); `tie`:
  'first' (released code, strict <) or 'last' (paper pseudo-code, <=)."""
  method: str = "dobi"
  num_candidates: int = 100
  strategy: str = "paper"
  tie: str = "last"
  percentile_low: float = 0.01
  percentile_high: float = 99.99
  search: str = "auto"  # sorted (host) | brute (XLA, f64 sums) | auto: brute on GPU; both exact

  def __post_init__(self):
    if self.method not in CALIBRATIONS:
      raise ValueError(f"calibration method must be one of {CALIBRATIONS}, got {self.method!r}")
    if self.strategy not in ("paper", "reference"):
      raise ValueError(f"dobi.strategy must be 'paper' or 'reference', got {self.strategy!r}")
    if self.tie not in ("first", "last"):
      raise ValueError(f"dobi.tie must be 'first' or 'last', got {self.tie!r}")
    if self.search not in ("auto", "sorted", "brute"):
      raise ValueError(f"dobi.search must be auto, sorted or brute, got {self.search!r}")
    if not 0 <= self.percentile_low < self.percentile_high <= 100:
      raise ValueError("percentiles must satisfy 0 <= low < high <= 100")


@dataclasses.dataclass(frozen=True)
class DQCSettings:
  """What the jitted DQC train step depends on (hashable: one compiled step per value)."""
  scale: int = 4
  bits: int = 4
  steps: int = 3000
  lr: float = 1e-2
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  schedule: str = "cosine"
  loss: str = "reference"
  feature_weight: float = 5.0
  remat: str = "auto"  # REMAT_SETTINGS: 'auto' is resolved by dqc.step.remat_mode
  microbatch: int = 0  # >0: gradients accumulated over microbatches of at most this size;
  # AUTO_MICROBATCH: the largest that fits the device (ptq/dqc/memory.py resolves it)
  arch: tuple[tuple[str, Any], ...] = ()  # SwinIR keyword overrides (tests: a tiny network)
  # The step as separately compiled pieces, each distinct Swin block compiled once
  # (`ptq/dqc/staged.py`), instead of one program with all 24 blocks unrolled.
  staged: bool = True
  # Learned weight rounding (students with arch rounding only; `ptq/rounding.py`): the
  # regulariser's weight, beta annealed start -> end after a warm-up fraction of the steps
  # without it, and the offsets' Adam learning rate (0: the bounds' lr, one Adam for both).
  rounding_weight: float = 1e-3
  rounding_beta_start: float = 20.0
  rounding_beta_end: float = 2.0
  rounding_warmup: float = 0.2
  rounding_lr: float = 0.0

  def __post_init__(self):
    if self.rounding_weight < 0 or self.rounding_lr < 0 or not 0 <= self.rounding_warmup < 1:
      raise ValueError("config.dqc.rounding_weight and rounding_lr must be >= 0 and "
                       f"rounding_warmup in [0, 1), got {self.rounding_weight}, "
                       f"{self.rounding_lr}, {self.rounding_warmup}")
    if self.loss not in LOSSES:
      raise ValueError(f"config.dqc.loss must be one of {LOSSES}, got {self.loss!r}")
    if self.remat not in REMAT_SETTINGS:
      raise ValueError(f"config.dqc.remat must be one of {REMAT_SETTINGS}, got {self.remat!r}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"config.dqc.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    if self.steps < 1:
      raise ValueError(f"config.dqc.steps must be >= 1, got {self.steps}")
    if self.microbatch < 0 and self.microbatch != AUTO_MICROBATCH:
      raise ValueError(f"config.dqc.microbatch must be 'auto' or >= 0, got {self.microbatch}")


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """Data and bookkeeping of a DQC run (what the step itself does not depend on)."""
  calib_root: str
  batch_size: int = 32
  lr_size: int = 64
  seed: int = 0
  augment: bool = True
  checkpoint_every: int = 200
  keep_checkpoints: int = 2
  log_every: int = 10
  val_every: int = 500
  data_workers: int = 0  # 0 = automatic
  progress_every_s: float = 30.0  # plain progress lines when there is no progress bar

  def __post_init__(self):
    for name in ("batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "val_every"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"config.dqc.{name} must be >= 1, got {getattr(self, name)}")
    if self.lr_size < 8 or self.lr_size % 8:
      raise ValueError(f"config.calib.lr_size must be a positive multiple of 8 (the window), "
                       f"got {self.lr_size}")

  def workers(self) -> int:
    return self.data_workers if self.data_workers > 0 else max(1, min(8, (os.cpu_count() or 2) - 1))


@dataclasses.dataclass(frozen=True)
class ValidationSettings:
  """Held-out DQC validation (dqc.val_*): a folder of images, not a test benchmark."""
  root: str = ""  # empty = no validation
  images: int = 10
  crop: int = 256  # HR crop (pixels) so one compile serves every image; 0 = whole images


@dataclasses.dataclass(frozen=True)
class FigureSettings:
  """The `report.*` settings: which quantizers get histograms, which images a visual."""
  scale: int
  bits: int
  hist_quantizers: tuple[str, ...] = ()
  visual_images: tuple[tuple[str, str], ...] = ()  # (dataset, image)
  calib_patches: int = 4  # 0 = all
  eval_batch_size: int = 1


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """Where the run's data comes from (data/fetch.py `resolve`)."""
  root: str = ""  # benchmark root; empty = the cache
  calib_root: str = ""  # calibration / DQC training images; empty = DIV2K in the cache
  datasets: tuple[str, ...] = ()
  need_calib: bool = False  # whether the run reads calibration images
  download: bool = True
  cache: str = ""
  mirror: str = ""
  # digests that replace the registry's for a mirror serving different files: ((url, sha256),),
  # read from `mirror_checksums_file` by the pipeline before any work
  mirror_checksums: tuple[tuple[str, str], ...] = ()
  progress: bool = True
  mirror_checksums_file: str = ""


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
  """How to join a multi-process run (config.distributed)."""
  coordinator: str = ""  # HOST:PORT of process 0's coordination service; "" = auto-detect
  num_processes: int = 0  # with coordinator: the number of processes
  process_id: int = -1  # with coordinator: this process's index in [0, num_processes)
  timeout_s: int = 100  # a peer silent this long (heartbeats) stops the others
  init_timeout_s: int = 300  # how long to wait for all processes to join (and to leave)
  auto: bool = True  # with no coordinator: use JAX's cluster auto-detection if a cluster is found

  def __post_init__(self):
    if self.timeout_s < 1 or self.init_timeout_s < 1:
      raise ValueError(f"config.distributed.timeout_s and init_timeout_s must be >= 1, got "
                       f"{self.timeout_s}, {self.init_timeout_s}")
    if not self.coordinator:
      if self.num_processes or self.process_id >= 0:
        raise ValueError("config.distributed.num_processes / process_id need "
                         "config.distributed.coordinator=HOST:PORT")
      return
    if not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", self.coordinator):
      raise ValueError(f"config.distributed.coordinator must be HOST:PORT, got "
                       f"{self.coordinator!r}")
    if self.num_processes < 1:
      raise ValueError(f"config.distributed.num_processes must be >= 1 with a coordinator, got "
                       f"{self.num_processes}")
    if not 0 <= self.process_id < self.num_processes:
      raise ValueError(f"config.distributed.process_id must be in [0, {self.num_processes}), got "
                       f"{self.process_id}")


@dataclasses.dataclass(frozen=True)
class HostSettings:
  """config.host_malloc and config.cpu_devices (host_runtime.apply)."""
  malloc: str = "auto"
  cpu_devices: int = 0  # 0 = auto
  dqc_batch: int = 0  # the DQC batch size when this single-process run trains DQC, else 0

  def __post_init__(self):
    if self.malloc not in MALLOC_POLICIES:
      raise ValueError(f"config.host_malloc must be one of {MALLOC_POLICIES}, got "
                       f"{self.malloc!r}")
    for name in ("cpu_devices", "dqc_batch"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"config.{name} must be 'auto' or a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  checkpoint: str = ""  # local .pth; empty = the official download
  cache_dir: str = ""
  bounds: str = ""  # given bounds: evaluated as they are
  packed: str = ""  # a packed low-bit file (weights and bounds)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  datasets: tuple[str, ...]
  batch_size: int = 8
  batch_pixels: int = 0  # 0 = no budget
  tile: int = 0  # 0 = whole images
  tile_overlap: int = 16
  tile_blend: str = "center"
  save_sr: bool = False
  engine: str = "fake"
  buckets: bool = True  # a few compiled shapes for every image size (eval/predict.py)
  vs_fp: bool = True  # quantized rows: PSNR against the FP model's SR too (the "vs FP" column)


@dataclasses.dataclass(frozen=True)
class CalibSource:
  """Where the calibration batch comes from (config.calib)."""
  root: str = ""
  batch_file: str = ""
  num_patches: int = 32
  lr_size: int = 64
  augment: bool = True


@dataclasses.dataclass(frozen=True)
class SweepSettings:
  scales: tuple[int, ...]
  bits: tuple[int, ...]
  methods: tuple[str, ...]
  shard: tuple[int, int] = (0, 1)  # (index, count)
  collect: bool = False


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """Everything one run needs, checked. `config_dict` is the config exactly as given:
  results.json stores it and the workdir lock compares a rerun with it."""
  scale: int
  bits: int
  methods: tuple[str, ...]  # in the paper's row order
  method_spec: str  # config.method as given ('all', 'dobi,2dquant', ...)
  seed: int
  progress: bool
  matmul_precision: str
  overwrite: bool
  compile_cache: str
  model: ModelSettings
  data: DataSettings
  eval: EvalSettings
  calib: CalibSource
  calibrations: Mapping[str, CalibSettings]  # per quantized method (empty with given bounds)
  dqc: DQCSettings | None  # None: this run trains no DQC
  loop: LoopSettings | None
  validation: ValidationSettings
  figures: FigureSettings | None  # None: report.figures off
  export_packed: bool
  host: HostSettings
  distributed: DistributedSettings
  sweep: SweepSettings | None
  config_dict: Mapping[str, Any]

  @property
  def quantized(self) -> tuple[str, ...]:
    return tuple(m for m in self.methods if method_registry.REGISTRY[m].quantized)

  @property
  def bounds_given(self) -> bool:
    """The bounds come from model.bounds or a packed file: no calibration, no DQC."""
    return bool(self.model.bounds or self.model.packed)


# ---------------------------------------------------------------------------------------------
# Each config block, parsed and checked.


def dataset_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  names = [n.strip() for n in str(config.eval.datasets).split(",") if n.strip()]
  if not names:
    raise ValueError("config.eval.datasets is empty: name at least one benchmark "
                     "(e.g. --config.eval.datasets=Set5,Set14)")
  return tuple(names)


def calib_settings(config: ml_collections.ConfigDict, method: str) -> CalibSettings:
  """Calibration settings of a method; dobi.tie 'auto' follows the strategy (paper: last
  minimum, reference: first minimum, as each source does)."""
  tie = config.dobi.tie
  if tie == "auto":
    tie = "first" if config.dobi.strategy == "reference" else "last"
  return CalibSettings(method=method_registry.REGISTRY[method].calibration,
                       num_candidates=int(config.dobi.num_candidates),
                       strategy=config.dobi.strategy, tie=tie, search=config.dobi.search,
                       percentile_low=float(config.percentile.low),
                       percentile_high=float(config.percentile.high))


def parse_microbatch(value: Any) -> int:
  """config.dqc.microbatch: 'auto' -> AUTO_MICROBATCH, else a non-negative integer (int or str)."""
  if str(value).strip().lower() == "auto":
    return AUTO_MICROBATCH
  try:
    return int(str(value).strip())
  except ValueError:
    raise ValueError(f"config.dqc.microbatch must be 'auto' or an integer >= 0, got {value!r}"
                     ) from None


def parse_remat(value: Any) -> str:
  """config.dqc.remat: a REMAT_SETTINGS name; True / False (the older boolean, e.g.
  `--config.dqc.remat=True`) mean 'full' / 'off'."""
  text = str(value).strip().lower()
  return {"true": "full", "1": "full", "false": "off", "0": "off"}.get(text, text)


def dqc_settings(config: ml_collections.ConfigDict, arch: Mapping[str, Any] | None = None
                 ) -> DQCSettings:
  """What the DQC step depends on; `arch` overrides SwinIR attributes (tests: a tiny net)."""
  d = config.dqc
  arch_items = tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                            for k, v in (arch or {}).items()))
  return DQCSettings(scale=int(config.scale), bits=int(config.bits), steps=int(d.steps),
                     lr=float(d.lr), b1=float(d.b1), b2=float(d.b2), eps=float(d.eps),
                     schedule=str(d.schedule), loss=str(d.loss),
                     feature_weight=float(d.feature_weight), remat=parse_remat(d.remat),
                     microbatch=parse_microbatch(d.microbatch), arch=arch_items,
                     staged=bool(d.get("staged", True)),
                     rounding_weight=float(d.get("rounding_weight", 1e-3)),
                     rounding_beta_start=float(d.get("rounding_beta_start", 20.0)),
                     rounding_beta_end=float(d.get("rounding_beta_end", 2.0)),
                     rounding_warmup=float(d.get("rounding_warmup", 0.2)),
                     rounding_lr=float(d.get("rounding_lr", 0.0)))


def loop_settings(config: ml_collections.ConfigDict) -> LoopSettings:
  d = config.dqc
  return LoopSettings(calib_root=str(config.calib.root), batch_size=int(d.batch_size),
                      lr_size=int(config.calib.lr_size), seed=int(config.seed),
                      augment=bool(d.augment), checkpoint_every=int(d.checkpoint_every),
                      keep_checkpoints=int(d.keep_checkpoints), log_every=int(d.log_every),
                      val_every=int(d.val_every), data_workers=int(d.data_workers))


def figure_settings(config: Mapping[str, Any]) -> FigureSettings:
  """The `report.*` settings, parsed: 'a,b' quantizer lists and 'dataset/image' entries.
  `config`: a ConfigDict, or the plain dict results.json stores (re-plotting a workdir)."""
  report = config["report"]
  split = lambda v: [p.strip() for p in str(v or "").split(",") if p.strip()]
  visuals = []
  for item in split(report.get("visual_images")):
    if "/" not in item:
      raise ValueError(f"config.report.visual_images: {item!r} is not <dataset>/<image>")
    visuals.append(tuple(item.split("/", 1)))
  return FigureSettings(scale=int(config["scale"]), bits=int(config["bits"]),
                        hist_quantizers=tuple(split(report.get("hist_quantizers"))),
                        visual_images=tuple(visuals),
                        calib_patches=int(report.get("calib_patches", 4)),
                        eval_batch_size=int(config["eval"]["batch_size"]))


def calibration_images_needed(methods: tuple[str, ...], batch_file: str = "",
                              bounds_given: bool = False) -> bool:
  """Whether a run of `methods` reads calib.root: DQC's training stream, or calibration without
  a batch file; never when bounds are given."""
  if bounds_given:
    return False
  if method_registry.trains_dqc(methods):
    return True
  return bool(method_registry.quantized(methods)) and not batch_file


def _check_mirror(mirror: str) -> None:
  m = urllib.parse.urlsplit(mirror)
  if m.scheme not in ("http", "https", "file") or (m.scheme != "file" and not m.netloc):
    raise ValueError(f"config.data.mirror {mirror!r} is not an http(s):// or file:// URL")


def data_settings(config: ml_collections.ConfigDict, methods: tuple[str, ...] | None = None
                  ) -> DataSettings:
  """Where the run's data comes from (local folders or the download cache)."""
  d = config.data
  if d.mirror:
    _check_mirror(str(d.mirror))
  if d.mirror_checksums and not d.mirror:
    raise ValueError("config.data.mirror_checksums replaces published digests and is only "
                     "accepted together with config.data.mirror")
  methods = method_registry.parse(config.method) if methods is None else methods
  need = calibration_images_needed(methods, config.calib.batch_file,
                                   bool(config.model.bounds or config.model.packed))
  return DataSettings(root=str(d.root), calib_root=str(config.calib.root),
                      datasets=dataset_names(config), need_calib=need,
                      download=bool(d.download), cache=str(d.cache), mirror=str(d.mirror),
                      progress=bool(config.progress),
                      mirror_checksums_file=str(d.mirror_checksums or ""))


def distributed_settings(config: ml_collections.ConfigDict) -> DistributedSettings:
  """config.distributed (absent in an old config: one process, auto-detection only)."""
  d = config.get("distributed")
  if d is None:
    return DistributedSettings()
  return DistributedSettings(coordinator=str(d.coordinator).strip(),
                             num_processes=int(d.num_processes), process_id=int(d.process_id),
                             timeout_s=int(d.timeout_s), init_timeout_s=int(d.init_timeout_s),
                             auto=bool(d.auto))


def trains_dqc(config: ml_collections.ConfigDict, methods: tuple[str, ...]) -> bool:
  """Whether this run trains DQC: a DQC-refined method is among `methods` and no bounds are
  given (model.bounds / model.packed are evaluated as they are)."""
  return (method_registry.trains_dqc(methods) and not config.model.bounds
          and not config.model.packed)


def host_settings(config: ml_collections.ConfigDict, methods: tuple[str, ...] | None = None
                  ) -> HostSettings:
  """config.host_malloc and config.cpu_devices ('auto' = 0: host_runtime picks as many CPU
  devices as the usable cores, up to a divisor of `dqc_batch`, when that is set)."""
  methods = method_registry.parse(config.method) if methods is None else methods
  given = config.get("cpu_devices", "auto")
  devices = 0  # 'auto'
  if given != "auto":
    try:
      devices = int(given) if isinstance(given, (str, int)) and not isinstance(given, bool) else 0
    except ValueError:
      devices = 0
    if devices < 1:
      raise ValueError(f"config.cpu_devices must be 'auto' or a positive int, got {given!r}")
  dist = distributed_settings(config)
  single = not dist.coordinator and not dist.num_processes
  batch = int(config.dqc.batch_size)
  dqc_batch = batch if trains_dqc(config, methods) and single and batch >= 1 else 0
  return HostSettings(malloc=config.get("host_malloc", "auto"), cpu_devices=devices,
                      dqc_batch=dqc_batch)


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
  if any(v not in SCALES for v in scales):
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


def _positive(config: ml_collections.ConfigDict, field: str, minimum: int = 1) -> None:
  value = config
  for part in field.split("."):
    value = value[part]
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"config.{field} must be an integer >= {minimum}, got {value!r}")


def _check_ranges(config: ml_collections.ConfigDict, calibrates: bool, dqc: bool) -> None:
  """Numeric fields the typed blocks do not check themselves, each named in its error."""
  _positive(config, "eval.batch_size")
  _positive(config, "eval.batch_pixels", 0)
  _positive(config, "seed", 0)
  _positive(config, "eval.tile_overlap", 0)
  if config.eval.tile_blend not in TILE_BLENDS:
    raise ValueError(f"config.eval.tile_blend must be 'center' or 'mean', got "
                     f"{config.eval.tile_blend!r}")
  if config.eval.tile and config.eval.tile <= config.eval.tile_overlap:
    raise ValueError(f"config.eval.tile ({config.eval.tile}) must be larger than "
                     f"config.eval.tile_overlap ({config.eval.tile_overlap})")
  if calibrates:
    _positive(config, "dobi.num_candidates")
    _positive(config, "calib.lr_size", 8)
  if dqc:
    _positive(config, "dqc.val_images")
    _positive(config, "dqc.val_crop", 0)
    _positive(config, "dqc.data_workers", 0)


# ---------------------------------------------------------------------------------------------
# The whole run.


def parse(config: ml_collections.ConfigDict) -> RunSettings:
  """The config, checked and typed. Raises ValueError (one line, naming the field) for any bad
  value. A config with a `sweep` block gets `sweep` set; its cells are `cell_settings`."""
  if "sweep" in config:
    sweep = sweep_settings(config)
    quantized = method_registry.quantized(sweep.methods)
    return _parse_run(config, sweep.scales[0], sweep.bits[0] if quantized else FP_BITS,
                      sweep.methods, sweep)
  return _parse_run(config, config.scale, config.bits, method_registry.parse(config.method),
                    None)


def _parse_run(config: ml_collections.ConfigDict, scale: int, bits: int,
               methods: tuple[str, ...], sweep: SweepSettings | None) -> RunSettings:
  if scale not in SCALES:
    raise ValueError(f"config.scale must be 2, 3 or 4, got {scale}")
  dist = distributed_settings(config)
  datasets = dataset_names(config)
  quantized = method_registry.quantized(methods)
  m = config.model
  if quantized and not 2 <= bits <= 8:
    raise ValueError(f"config.bits must be between 2 and 8 for quantization, got {bits}")
  if config.eval.tile and (config.eval.tile < 0 or config.eval.tile % 8):
    raise ValueError(f"config.eval.tile must be a positive multiple of 8, got {config.eval.tile}")
  calibrations = {}
  if quantized and not m.bounds:
    if not config.calib.batch_file and int(config.calib.num_patches) < 1:
      raise ValueError(f"config.calib.num_patches must be >= 1, got {config.calib.num_patches}")
    calibrations = {q: calib_settings(config, q) for q in quantized}
  figures = None
  if config.report.figures:
    figures = dataclasses.replace(figure_settings(config), scale=int(scale), bits=int(bits))
  host = host_settings(config, methods)
  if config.eval.engine not in ENGINES:
    raise ValueError(f"config.eval.engine must be one of {ENGINES}, got {config.eval.engine!r}")
  if not isinstance(config.export.packed, bool):
    raise ValueError(f"config.export.packed must be True or False, got {config.export.packed!r}")
  if m.packed:
    if m.bounds:
      raise ValueError("config.model.packed and config.model.bounds are exclusive: a packed "
                       "file holds its own bounds")
    if len(quantized) != len(methods):
      raise ValueError(f"config.model.packed evaluates a quantized model: config.method must "
                       f"name quantized methods only (one of {method_registry.QUANTIZED}), "
                       f"got {config.method!r}")
  changed = [q for q in quantized if method_registry.REGISTRY[q].changes_network]
  if m.bounds and changed:
    raise ValueError(f"config.model.bounds: method {changed[0]!r} changes the network (stages, "
                     "options or bias correction), so bounds alone cannot rebuild it: evaluate "
                     "its packed file (config.model.packed) instead")
  dqc = loop = None
  if trains_dqc(config, methods):
    dqc = dataclasses.replace(dqc_settings(config), scale=int(scale), bits=int(bits))
    loop = loop_settings(config)
  data = data_settings(config, methods)
  _check_ranges(config, bool(quantized) and not m.bounds,
                method_registry.trains_dqc(methods) and not m.bounds)
  e = config.eval
  return RunSettings(
      scale=int(scale), bits=int(bits), methods=methods, method_spec=str(config.method),
      seed=int(config.seed), progress=bool(config.progress),
      matmul_precision=str(config.matmul_precision), overwrite=bool(config.overwrite),
      compile_cache=str(config.compile_cache),
      model=ModelSettings(str(m.checkpoint), str(m.cache_dir), str(m.bounds), str(m.packed)),
      data=data,
      eval=EvalSettings(datasets=datasets, batch_size=int(e.batch_size),
                        batch_pixels=int(e.batch_pixels), tile=int(e.tile or 0),
                        tile_overlap=int(e.tile_overlap), tile_blend=str(e.tile_blend),
                        save_sr=bool(e.save_sr), engine=str(e.engine),
                        buckets=bool(e.get("buckets", True)), vs_fp=bool(e.get("vs_fp", True))),
      calib=CalibSource(str(config.calib.root), str(config.calib.batch_file),
                        int(config.calib.num_patches), int(config.calib.lr_size),
                        bool(config.calib.augment)),
      calibrations=calibrations, dqc=dqc, loop=loop,
      validation=ValidationSettings(str(config.dqc.val_root), int(config.dqc.val_images),
                                    int(config.dqc.val_crop)),
      figures=figures, export_packed=bool(config.export.packed), host=host, distributed=dist,
      sweep=sweep, config_dict=config.to_dict())


def cell_settings(settings: RunSettings, scale: int, bits: int | None,
                  methods: tuple[str, ...]) -> RunSettings:
  """The settings of one sweep cell, derived from the parsed sweep's (no re-validation): its
  scale, bits (None: the full-precision rows) and methods, "{scale}" in model.checkpoint /
  model.bounds formatted, and its config_dict as a run with these values would store it."""
  bits = FP_BITS if bits is None else bits
  fmt = lambda path: path.replace("{scale}", str(scale))
  given = copy.deepcopy(dict(settings.config_dict))
  given.update(scale=scale, bits=bits, method=",".join(methods))
  given["model"] = {**given["model"], "checkpoint": fmt(str(given["model"]["checkpoint"])),
                    "bounds": fmt(str(given["model"]["bounds"]))}
  model = dataclasses.replace(settings.model, checkpoint=fmt(settings.model.checkpoint),
                              bounds=fmt(settings.model.bounds))
  trains = settings.dqc is not None and method_registry.trains_dqc(methods)
  need_calib = calibration_images_needed(methods, settings.calib.batch_file,
                                         settings.bounds_given)
  return dataclasses.replace(
      settings, scale=scale, bits=bits, methods=methods, method_spec=",".join(methods),
      model=model, data=dataclasses.replace(settings.data, need_calib=need_calib),
      calibrations={m: c for m, c in settings.calibrations.items() if m in methods},
      dqc=dataclasses.replace(settings.dqc, scale=scale, bits=bits) if trains else None,
      loop=settings.loop if trains else None,
      figures=(dataclasses.replace(settings.figures, scale=scale, bits=bits)
               if settings.figures else None),
      sweep=None, config_dict=given)
