"""The config taken apart at the top: the ConfigDict -> the typed settings each layer receives.

Modules below the pipeline never see the ConfigDict; they get `CalibSettings`, `DQCSettings`,
`LoopSettings`. `validate` checks every value before any work, so a bad flag fails in a second
with one line, not after minutes of calibration.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import ml_collections

from twodquant_jax import host_runtime
from twodquant_jax.report.inputs import FigureSettings
from twodquant_jax.data import fetch as data_cache
from twodquant_jax.data.download import mirror_url
from twodquant_jax.data import patches
from twodquant_jax.distributed import DistributedSettings
from twodquant_jax import methods as method_registry
from twodquant_jax.ptq.dobi import CalibSettings
from twodquant_jax.ptq.dqc.loop import LoopSettings
from twodquant_jax.ptq.dqc.step import AUTO_MICROBATCH, DQCSettings


ENGINES = ("fake", "int")  # eval.engine: fake-quant float forward | integer engine


def methods_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The methods to run, in the paper's row order."""
  return method_registry.parse(config.method)


def dataset_names(config: ml_collections.ConfigDict) -> list[str]:
  names = [n.strip() for n in str(config.eval.datasets).split(",") if n.strip()]
  if not names:
    raise ValueError("config.eval.datasets is empty: name at least one benchmark "
                     "(e.g. --config.eval.datasets=Set5,Set14)")
  return names


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


def dqc_settings(config: ml_collections.ConfigDict, arch: Mapping[str, Any] | None = None
                 ) -> DQCSettings:
  """What the DQC step depends on; `arch` overrides SwinIR attributes (tests: a tiny net)."""
  d = config.dqc
  arch_items = tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                            for k, v in (arch or {}).items()))
  return DQCSettings(scale=int(config.scale), bits=int(config.bits), steps=int(d.steps),
                     lr=float(d.lr), b1=float(d.b1), b2=float(d.b2), eps=float(d.eps),
                     schedule=str(d.schedule), loss=str(d.loss),
                     feature_weight=float(d.feature_weight), remat=bool(d.remat),
                     microbatch=parse_microbatch(d.microbatch), arch=arch_items)


def parse_microbatch(value: Any) -> int:
  """config.dqc.microbatch: 'auto' -> AUTO_MICROBATCH, else a non-negative integer (int or str)."""
  if str(value).strip().lower() == "auto":
    return AUTO_MICROBATCH
  try:
    return int(str(value).strip())
  except ValueError:
    raise ValueError(f"config.dqc.microbatch must be 'auto' or an integer >= 0, got {value!r}"
                     ) from None


def loop_settings(config: ml_collections.ConfigDict) -> LoopSettings:
  d = config.dqc
  return LoopSettings(calib_root=str(config.calib.root), batch_size=int(d.batch_size),
                      lr_size=int(config.calib.lr_size), seed=int(config.seed),
                      augment=bool(d.augment), checkpoint_every=int(d.checkpoint_every),
                      keep_checkpoints=int(d.keep_checkpoints), log_every=int(d.log_every),
                      val_every=int(d.val_every), data_workers=int(d.data_workers))


def figure_settings(config: ml_collections.ConfigDict) -> FigureSettings:
  """The `report.*` settings, parsed: 'a,b' quantizer lists and 'dataset/image' entries."""
  split = lambda v: [p.strip() for p in str(v or "").split(",") if p.strip()]
  visuals = []
  for item in split(config.report.visual_images):
    if "/" not in item:
      raise ValueError(f"config.report.visual_images: {item!r} is not <dataset>/<image>")
    visuals.append(tuple(item.split("/", 1)))
  return FigureSettings(scale=int(config.scale), bits=int(config.bits),
                        hist_quantizers=tuple(split(config.report.hist_quantizers)),
                        visual_images=tuple(visuals),
                        calib_patches=int(config.report.calib_patches),
                        eval_batch_size=int(config.eval.batch_size))
def calibration_images_needed(method: str, batch_file: str = "", bounds_given: bool = False
                              ) -> bool:
  """Whether a run of `method` (a config.method string) reads calib.root: DQC's training stream,
  or calibration without a batch file; never when bounds are given."""
  methods = method_registry.parse(method)
  if bounds_given:
    return False
  if "2dquant" in methods:
    return True
  return any(method_registry.REGISTRY[m].quantized for m in methods) and not batch_file


def needs_calibration_images(config: ml_collections.ConfigDict, has_bounds: bool = False) -> bool:
  """`calibration_images_needed` for a config (`has_bounds`: the checkpoint holds bounds)."""
  return calibration_images_needed(config.method, config.calib.batch_file,
                                   bool(config.model.bounds) or has_bounds)


def _mirror_checksums(path: str) -> tuple[tuple[str, str], ...]:
  """The {original URL: sha256} JSON file of data.mirror_checksums, checked."""
  try:
    data = json.loads(Path(path).expanduser().read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"config.data.mirror_checksums: cannot read {path} as JSON ({e})") from e
  if not isinstance(data, dict) or not all(
      isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in data.values()):
    raise ValueError(f"config.data.mirror_checksums: {path} must hold {{\"<original URL>\": "
                     "\"<sha256 hex>\"}")
  return tuple(sorted((str(k), v) for k, v in data.items()))


def mirror_digests(config: ml_collections.ConfigDict) -> dict[str, str]:
  """{original URL: sha256} of data.mirror_checksums (only with data.mirror), else {}."""
  d = config.data
  return dict(_mirror_checksums(d.mirror_checksums)) if d.mirror and d.mirror_checksums else {}


def data_settings(config: ml_collections.ConfigDict, has_bounds: bool = False
                  ) -> data_cache.DataSettings:
  """Where the run's data comes from (local folders or the download cache)."""
  d = config.data
  if d.mirror:
    mirror_url("https://example.org/x", d.mirror)  # raises ValueError for a bad mirror URL
  if d.mirror_checksums and not d.mirror:
    raise ValueError("config.data.mirror_checksums replaces published digests and is only "
                     "accepted together with config.data.mirror")
  return data_cache.DataSettings(
      root=str(d.root), calib_root=str(config.calib.root),
      datasets=tuple(dataset_names(config)),
      need_calib=needs_calibration_images(config, has_bounds), download=bool(d.download),
      cache=str(d.cache), mirror=str(d.mirror),
      mirror_checksums=_mirror_checksums(d.mirror_checksums) if d.mirror_checksums else (),
      progress=bool(config.progress))


def with_local_data(config: ml_collections.ConfigDict, has_bounds: bool = False
                    ) -> ml_collections.ConfigDict:
  """A copy of `config` whose data.root / calib.root are local folders and whose eval.datasets
  are the available sets; missing sets are downloaded first (`data/fetch.py`)."""
  got = data_cache.resolve(data_settings(config, has_bounds))
  out = config.copy_and_resolve_references()
  out.data.root = str(got.data_root)
  out.calib.root = str(got.calib_root)
  out.eval.datasets = ",".join(got.datasets)
  return out
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
  """Whether this run trains DQC: 2DQuant is among the methods and its bounds are not given."""
  return "2dquant" in methods and not config.model.bounds and not config.model.packed


def host_settings(config: ml_collections.ConfigDict) -> host_runtime.HostSettings:
  """config.host_malloc and config.cpu_devices ('auto' = 0: host_runtime.apply decides, splitting
  dqc.batch_size when this single-process run trains DQC)."""
  given = config.get("cpu_devices", "auto")
  devices = 0
  if given != "auto":
    try:
      devices = int(given)
    except ValueError:
      devices = -1
    if devices < 1 or isinstance(given, bool):
      raise ValueError(f"config.cpu_devices must be 'auto' or a positive int, got {given!r}")
  trains = trains_dqc(config, methods_of(config))
  single = not config.distributed.coordinator and not config.distributed.num_processes
  batch = int(config.dqc.batch_size)
  return host_runtime.HostSettings(malloc=config.get("host_malloc", "auto"), cpu_devices=devices,
                                   dqc_batch=batch if trains and single and batch >= 1 else 0)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (one line, naming the field) for any bad setting, before any work."""
  if config.scale not in (2, 3, 4):
    raise ValueError(f"config.scale must be 2, 3 or 4, got {config.scale}")
  distributed_settings(config)
  methods = methods_of(config)
  dataset_names(config)
  quantized = [m for m in methods if method_registry.REGISTRY[m].quantized]
  if quantized and not 2 <= config.bits <= 8:
    raise ValueError(f"config.bits must be between 2 and 8 for quantization, got {config.bits}")
  if config.eval.tile and (config.eval.tile < 0 or config.eval.tile % 8):
    raise ValueError(f"config.eval.tile must be a positive multiple of 8, got {config.eval.tile}")
  if quantized and not config.model.bounds:
    if not config.calib.batch_file and int(config.calib.num_patches) < 1:
      raise ValueError(f"config.calib.num_patches must be >= 1, got {config.calib.num_patches}")
    for m in quantized:
      calib_settings(config, m)
  if config.report.figures:
    figure_settings(config)
  host_settings(config)
  if config.eval.engine not in ENGINES:
    raise ValueError(f"config.eval.engine must be one of {ENGINES}, got {config.eval.engine!r}")
  if not isinstance(config.export.packed, bool):
    raise ValueError(f"config.export.packed must be True or False, got {config.export.packed!r}")
  if config.model.packed:
    if config.model.bounds:
      raise ValueError("config.model.packed and config.model.bounds are exclusive: a packed "
                       "file holds its own bounds")
    if len(quantized) != len(methods):
      raise ValueError(f"config.model.packed evaluates a quantized model: config.method must "
                       f"name quantized methods only (one of {method_registry.QUANTIZED}), "
                       f"got {config.method!r}")
    if not Path(config.model.packed).is_file():
      raise ValueError(f"config.model.packed: file not found: {config.model.packed}")
  if trains_dqc(config, methods):
    dqc_settings(config)
    loop_settings(config)
  data_settings(config)
  _check_ranges(config, quantized and not config.model.bounds, "2dquant" in methods)


def _positive(config: ml_collections.ConfigDict, field: str, minimum: int = 1) -> None:
  value = config
  for part in field.split("."):
    value = value[part]
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"config.{field} must be an integer >= {minimum}, got {value!r}")


def _check_ranges(config: ml_collections.ConfigDict, calibrates: bool, dqc: bool) -> None:
  """Numeric fields the typed settings do not check themselves, each named in its error."""
  _positive(config, "eval.batch_size")
  _positive(config, "eval.batch_pixels", 0)
  _positive(config, "seed", 0)
  _positive(config, "eval.tile_overlap", 0)
  if config.eval.tile_blend not in ("center", "mean"):
    raise ValueError(f"config.eval.tile_blend must be 'center' or 'mean', got "
                     f"{config.eval.tile_blend!r}")
  if config.eval.tile and config.eval.tile <= config.eval.tile_overlap:
    raise ValueError(f"config.eval.tile ({config.eval.tile}) must be larger than "
                     f"config.eval.tile_overlap ({config.eval.tile_overlap})")
  if calibrates:
    _positive(config, "dobi.num_candidates")
    _positive(config, "calib.lr_size", 8)
  if dqc and not config.model.bounds:
    _positive(config, "dqc.val_images")
    _positive(config, "dqc.val_crop", 0)
    _positive(config, "dqc.data_workers", 0)


def check_paths(config: ml_collections.ConfigDict) -> None:
  """Every file or folder the run will read exists (FileNotFoundError naming the field), so a
  typo fails in a second, not after calibration."""
  methods = methods_of(config)
  quantized = any(method_registry.REGISTRY[m].quantized for m in methods)
  wanted = [("model.packed", config.model.packed, "file"),
            ("model.checkpoint", "" if config.model.packed else config.model.checkpoint, "file"),
            ("model.bounds", config.model.bounds, "file"),
            ("data.root", config.data.root, "dir")]
  if quantized and not config.model.bounds:
    wanted += [("calib.batch_file", config.calib.batch_file, "file")]
    if not config.calib.batch_file:
      wanted += [("calib.root", config.calib.root, "dir")]
  if "2dquant" in methods and not config.model.bounds:
    wanted += [("calib.root", config.calib.root, "dir"),
               ("dqc.val_root", config.dqc.val_root, "dir")]
  for field, value, kind in wanted:  # (the batch file itself is read and checked below)
    if not value:
      continue
    path = Path(str(value)).expanduser()
    if not (path.is_file() if kind == "file" else path.is_dir()):
      raise FileNotFoundError(f"config.{field}: {'file' if kind == 'file' else 'folder'} "
                              f"not found: {path}")
  if quantized and not config.model.bounds and config.calib.batch_file:
    patches.load_batch_file(config.calib.batch_file)  # small: a bad one fails now, named
