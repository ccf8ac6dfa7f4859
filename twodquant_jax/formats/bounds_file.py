"""Bounds files: `bounds.json` ({"bounds": {name: [lower, upper]}, "meta": {...}}), the authors'
reference JSON and their quantized checkpoints (`net_Q_*.pth`), read into the 'quant' collection.

Bounds are only meaningful for the bit width, scale and quantizer set they were searched for, so
`load_bounds` refuses a file that records other bits or another scale than the run's, or holds
another number of quantizers, in one line naming both values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from absl import logging

from twodquant_jax import files
from twodquant_jax.formats.convert import infer_scale, split_quant_bounds, state_dict_from
from twodquant_jax.formats.torch_pickle import CheckpointError, load_pth
from twodquant_jax.nn.names import QuantTree, dict_to_tree, quant_names, tree_to_dict


def save_bounds(path: str | Path, quant: QuantTree, meta: Mapping | None = None) -> None:
  """Writes bounds.json: {"bounds": {name: [l, u]}, "meta": {...}} (atomically)."""
  files.write_json(path, {"bounds": tree_to_dict(quant), "meta": dict(meta or {})})


def _read(path: Path) -> tuple[dict, dict[str, Any]]:
  """({name: [l, u]}, what the file records of {'bits', 'scale'}) of any bounds file."""
  if path.suffix in (".pth", ".pt"):
    sd = state_dict_from(load_pth(path), str(path))
    rest, bounds = split_quant_bounds(sd)
    if not bounds:
      raise ValueError(f"{path} holds no quantizer bounds (<quantizer>.lower_bound entries)")
    try:  # a net_Q file holds the whole network: its upsampler gives the scale
      return bounds, {"scale": infer_scale(rest)}
    except CheckpointError:
      return bounds, {}
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not a JSON bounds file ({e})") from e
  bounds = data.get("bounds", data) if isinstance(data, dict) else None
  if not isinstance(bounds, dict) or not all(
      isinstance(v, (list, tuple)) and len(v) == 2 for v in bounds.values()):
    raise ValueError(f"{path}: expected {{name: [lower, upper]}} (optionally under 'bounds')")
  meta = data.get("meta") if isinstance(data.get("meta"), dict) else data  # ours, else authors'
  recorded = {"bits": meta.get("bits", meta.get("bit")), "scale": meta.get("scale")}
  return bounds, {k: int(v) for k, v in recorded.items() if str(v).isdigit()}


def load_bounds(path: str | Path, like: QuantTree | None = None, *, bits: int | None = None,
                scale: int | None = None) -> dict:
  """Reads bounds from our bounds.json, the authors' reference JSON (a 'bounds' entry) or a
  plain {name: [l, u]} JSON, or from the authors' quantized checkpoint (`net_Q_*.pth`, whose
  state dict holds `<quantizer>.lower_bound/.upper_bound`). Returns the 'quant' collection.

  `bits` / `scale` (the run's), when given, must equal what the file records (a file that
  records none is assumed to fit, and the assumption is logged); with `like`, the file must
  hold exactly the model's quantizers. A mismatch is a ValueError of one line.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"bounds file not found: {path}")
  bounds, recorded = _read(path)
  checks = (("bits", bits, "W{}", "a W{} bounds file"),
            ("scale", scale, "x{}", "an x{} bounds file"))
  for field, want, label, fix in checks:
    if want is None:
      continue
    got = recorded.get(field)
    if got is None:
      logging.info("bounds file %s records no %s; assuming %s (config.%s=%d)", path, field,
                   label.format(want), field, want)
    elif got != int(want):
      raise ValueError(f"bounds file {path} holds {label.format(got)} bounds, but this run is "
                       f"{label.format(want)} (config.{field}={want}): pass {fix.format(want)} "
                       f"or --config.{field}={got}")
  if like is not None:
    want_n = len(quant_names(like))
    if len(bounds) != want_n:
      raise ValueError(f"bounds file {path} holds {len(bounds)} quantizer bounds, but this model "
                       f"has {want_n} quantizers: pass a bounds file made for this model")
  return dict_to_tree(bounds, like)
