"""Official SwinIR-light PyTorch checkpoints -> the Flax parameter tree (and quantizer bounds).

Reads the `.pth` without torch (`torch_pickle.load_pth`), maps every tensor to the Flax tree of
`models.swinir.SwinIR` (torch Linear (out, in) -> Dense kernel (in, out); Conv (O, I, kh, kw) ->
(kh, kw, I, O); LayerNorm weight -> scale), drops the `attn_mask` / `relative_position_index`
buffers (recomputed for the actual input size), and checks that every key is used and every
shape matches. Fetching the official release files is `data/weights.py`'s job.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from twodquant_jax.formats.torch_pickle import CheckpointError, load_pth
from twodquant_jax.nn.names import BOUND_KEY, QUANTIZER_STATE, path_from_name

_BUFFERS = re.compile(r"(attn_mask|relative_position_index)$")
_SPLIT_QKV = re.compile(r"^(.*\.attn\.qkv)\.([qkv])\.(weight|bias)$")


def state_dict_from(obj: Any, source: str = "checkpoint") -> dict[str, np.ndarray]:
  """The state dict inside a loaded checkpoint: {'params': sd}, {'params_ema': sd} or sd itself."""
  if isinstance(obj, Mapping):
    for key in ("params", "params_ema", "state_dict"):
      if key in obj and isinstance(obj[key], Mapping):
        return dict(obj[key])
    if obj and all(isinstance(v, np.ndarray) for v in obj.values()):
      return dict(obj)
  raise CheckpointError(f"{source}: no state dict found (expected {{'params': ...}} or a "
                        "mapping of parameter names to tensors)")


def _flax_path(key: str) -> tuple[tuple[str, ...], str] | None:
  """Maps a torch key to (Flax module path, kind) where kind says how to convert the tensor."""
  parts = key.split(".")
  name = parts[-1]
  mods = parts[:-1]
  if mods[:1] == ["upsample"] and mods[1:] == ["0"]:
    mods = ["upsample"]
  if mods == ["patch_embed", "norm"]:
    mods = ["patch_embed_norm"]
  out = list(path_from_name(".".join(mods))) if mods else []
  if name == "relative_position_bias_table":
    return tuple(out) + (name,), "table"
  leaf = out[-1] if out else ""
  if leaf.startswith("norm") or leaf.endswith("_norm"):
    return tuple(out) + ({"weight": "scale", "bias": "bias"}[name],), "copy"
  if name == "weight":
    return tuple(out) + ("kernel",), "kernel"
  if name == "bias":
    return tuple(out) + ("bias",), "copy"
  return None


def infer_scale(sd: Mapping[str, np.ndarray]) -> int:
  """The upscale factor from the pixelshuffledirect conv: 3 * s * s output channels."""
  w = sd.get("upsample.0.weight")
  if w is None:
    raise CheckpointError("no 'upsample.0.weight': not a SwinIR-light (pixelshuffledirect) "
                          "checkpoint")
  s = int(round((w.shape[0] / 3) ** 0.5))
  if 3 * s * s != w.shape[0]:
    raise CheckpointError(f"upsample.0.weight has {w.shape[0]} output channels, not 3*s*s")
  return s


def merge_split_qkv(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Folds the released 2DQuant code's split q/k/v linears back into the official qkv tensor."""
  out, parts = {}, {}
  for k, v in sd.items():
    m = _SPLIT_QKV.match(k)
    if m:
      parts.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
    else:
      out[k] = v
  for (base, kind), qkv in parts.items():
    if set(qkv) != set("qkv"):
      raise CheckpointError(f"{base}: split q/k/v {kind} incomplete ({sorted(qkv)})")
    out[f"{base}.{kind}"] = np.concatenate([qkv["q"], qkv["k"], qkv["v"]], axis=0)
  return out


def split_quant_bounds(sd: Mapping[str, np.ndarray]
                       ) -> tuple[dict[str, np.ndarray], dict[str, list[float]]]:
  """Separates `<quantizer>.lower_bound/.upper_bound` entries (authors' net_Q files) from weights.

  Returns (remaining state dict, {quantizer name: [lower, upper]}). Other quantizer buffers
  (e.g. bit widths) are dropped.
  """
  rest, bounds = {}, {}
  for k, v in sd.items():
    m = BOUND_KEY.match(k)
    if m:
      bounds.setdefault(m.group(1), [None, None])[m.group(2) == "upper_bound"] = float(
          np.asarray(v).reshape(-1)[0])
    elif QUANTIZER_STATE.search(k):
      continue
    else:
      rest[k] = v
  missing = [n for n, b in bounds.items() if None in b]
  if missing:
    raise CheckpointError(f"quantizers with only one bound in the checkpoint: {missing[:3]}")
  return rest, bounds


def convert_state_dict(sd: Mapping[str, np.ndarray], reference_params: Mapping,
                       source: str = "checkpoint") -> dict:
  """Builds the Flax 'params' tree from a torch state dict, checked against `reference_params`.

  `reference_params` is an initialised parameter tree of the target model (shapes only). Every
  checkpoint tensor must land on a parameter of the same shape, and every parameter must be set.
  """
  flat: dict[tuple[str, ...], np.ndarray] = {}
  unexpected = []
  for key, value in sd.items():
    if _BUFFERS.search(key):
      continue
    mapped = _flax_path(key)
    if mapped is None:
      unexpected.append(key)
      continue
    path, kind = mapped
    value = np.asarray(value, np.float32)
    if kind == "kernel":
      if value.ndim not in (2, 4):
        unexpected.append(f"{key} {value.shape}")
        continue
      value = value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
    flat[path] = np.ascontiguousarray(value)
  want = traverse_util.flatten_dict(reference_params)
  got = flat
  unexpected += [".".join(p) for p in got if p not in want]
  missing = [".".join(p) for p in want if p not in got]
  bad = [f"{'.'.join(p)}: checkpoint {got[p].shape} vs model {tuple(want[p].shape)}"
         for p in want if p in got and tuple(got[p].shape) != tuple(want[p].shape)]
  if unexpected or missing or bad:
    lines = []
    if missing:
      lines.append(f"missing ({len(missing)}): {', '.join(missing[:5])}")
    if unexpected:
      lines.append(f"unexpected ({len(unexpected)}): {', '.join(unexpected[:5])}")
    if bad:
      lines.append(f"shape mismatch ({len(bad)}): {'; '.join(bad[:5])}")
    raise CheckpointError(f"{source} does not fit SwinIR-light: " + " | ".join(lines))
  return traverse_util.unflatten_dict(flat)


def load_checkpoint(path: str | Path, scale: int, reference_params: Mapping
                    ) -> tuple[dict, dict[str, list[float]]]:
  """Reads a SwinIR-light `.pth` for `scale`: returns (Flax params, quantizer bounds if any).

  Raises CheckpointError for a file that is not a checkpoint, is truncated, holds another
  network, or is for another scale than the config's.
  """
  sd = state_dict_from(load_pth(path), str(path))
  sd, bounds = split_quant_bounds(merge_split_qkv(sd))
  got = infer_scale(sd)
  if got != scale:
    raise CheckpointError(f"{path} is an x{got} checkpoint but the config asks for x{scale}: "
                          f"use an x{got} config (e.g. configs/fp_x{got}.py) or the x{scale} file")
  return convert_state_dict(sd, reference_params, str(path)), bounds
