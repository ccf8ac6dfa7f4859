"""The config taken apart at the top: the ConfigDict -> the typed settings each layer receives.

Modules below the pipeline never see the ConfigDict; they get `CalibSettings`, `DQCSettings`,
`LoopSettings`. `validate` checks every value before any work, so a bad flag fails in a second
with one line, not after minutes of calibration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import ml_collections

from twodquant_jax.ptq import methods as method_registry
from twodquant_jax.ptq.dobi import CalibSettings
from twodquant_jax.ptq.dqc.loop import LoopSettings
from twodquant_jax.ptq.dqc.step import DQCSettings


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
                     microbatch=int(d.microbatch), arch=arch_items)


def loop_settings(config: ml_collections.ConfigDict) -> LoopSettings:
  d = config.dqc
  return LoopSettings(calib_root=str(config.calib.root), batch_size=int(d.batch_size),
                      lr_size=int(config.calib.lr_size), seed=int(config.seed),
                      augment=bool(d.augment), checkpoint_every=int(d.checkpoint_every),
                      keep_checkpoints=int(d.keep_checkpoints), log_every=int(d.log_every),
                      val_every=int(d.val_every), data_workers=int(d.data_workers))


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (one line, naming the field) for any bad setting, before any work."""
  if config.scale not in (2, 3, 4):
    raise ValueError(f"config.scale must be 2, 3 or 4, got {config.scale}")
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
  if "2dquant" in methods and not config.model.bounds and not config.model.packed:
    dqc_settings(config)
    loop_settings(config)
