"""Bounds files: `bounds.json` ({"bounds": {name: [lower, upper]}, "meta": {...}}), the authors'
reference JSON and their quantized checkpoints (`net_Q_*.pth`), read into the 'quant' collection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from twodquant_jax.formats.convert import split_quant_bounds, state_dict_from
from twodquant_jax.formats.torch_pickle import load_pth
from twodquant_jax.nn.names import QuantTree, dict_to_tree, tree_to_dict


def save_bounds(path: str | Path, quant: QuantTree, meta: Mapping | None = None) -> None:
  """Writes bounds.json: {"bounds": {name: [l, u]}, "meta": {...}} (atomically)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps({"bounds": tree_to_dict(quant), "meta": dict(meta or {})}, indent=1))
  tmp.replace(path)


def load_bounds(path: str | Path, like: QuantTree | None = None) -> dict:
  """Reads bounds from our bounds.json, the authors' reference JSON (a 'bounds' entry) or a
  plain {name: [l, u]} JSON, or from the authors' quantized checkpoint (`net_Q_*.pth`, whose
  state dict holds `<quantizer>.lower_bound/.upper_bound`). Returns the 'quant' collection."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"bounds file not found: {path}")
  if path.suffix in (".pth", ".pt"):
    _, bounds = split_quant_bounds(state_dict_from(load_pth(path), str(path)))
    if not bounds:
      raise ValueError(f"{path} holds no quantizer bounds (<quantizer>.lower_bound entries)")
  else:
    try:
      data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not a JSON bounds file ({e})") from e
    bounds = data.get("bounds", data) if isinstance(data, dict) else None
    if not isinstance(bounds, dict) or not all(
        isinstance(v, (list, tuple)) and len(v) == 2 for v in bounds.values()):
      raise ValueError(f"{path}: expected {{name: [lower, upper]}} (optionally under 'bounds')")
  return dict_to_tree(bounds, like)
