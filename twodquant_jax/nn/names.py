"""Quantizer names: the one place that knows how our 'quant' collection maps to the authors' module paths.

A quantizer is named as in the released 2DQuant code, e.g.
`layers.0.residual_group.blocks.3.attn.qkv.k.act_quantizer` or `...attn.mymodule_a`; the Flax
path is the same with `layers_0` / `blocks_3`. Bounds files (`formats/bounds_file.py`) key bounds by these names.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from twodquant_jax.nn.quantizer import BOUNDS

QuantTree = Mapping  # the 'quant' variable collection
_INDEXED = re.compile(r"^(layers|blocks)_(\d+)$")
_ONE_SIDED = re.compile(r"(\.mymodule_a|\.mlp\.fc2\.act_quantizer)$")
_WEIGHT = re.compile(r"\.weight_quantizer$")
_BMM_OPERAND = re.compile(r"\.mymodule_[qkv]$")
# A quantizer's state-dict entry in the authors' quantized checkpoints (net_Q_*.pth).
BOUND_KEY = re.compile(r"^(.*(?:_quantizer|mymodule_[qkva]))\.(lower_bound|upper_bound)$")
QUANTIZER_STATE = re.compile(r"(_quantizer|mymodule_[qkva])\.")

# The 16 quantizers of one Swin block, in the released code's module order.
BLOCK_QUANTIZERS = (
    "attn.qkv.q.weight_quantizer", "attn.qkv.q.act_quantizer",
    "attn.qkv.k.weight_quantizer", "attn.qkv.k.act_quantizer",
    "attn.qkv.v.weight_quantizer", "attn.qkv.v.act_quantizer",
    "attn.proj.weight_quantizer", "attn.proj.act_quantizer",
    "attn.mymodule_q", "attn.mymodule_k", "attn.mymodule_v", "attn.mymodule_a",
    "mlp.fc1.weight_quantizer", "mlp.fc1.act_quantizer",
    "mlp.fc2.weight_quantizer", "mlp.fc2.act_quantizer",
)
KINDS = ("weight", "activation", "attention BMM operand")


def quantizer_order(num_layers: int = 4, num_blocks: int = 6) -> list[str]:
  """All quantizer names in the released code's order (index 0..383 for SwinIR-light)."""
  return [f"layers.{i}.residual_group.blocks.{j}.{q}" for i in range(num_layers)
          for j in range(num_blocks) for q in BLOCK_QUANTIZERS]


def quantizer_kind(name: str) -> str:
  """'weight', 'activation' (a linear's input) or 'attention BMM operand' (q, k, v, softmax)."""
  if is_weight(name):
    return "weight"
  if ".mymodule_" in name:
    return "attention BMM operand"
  return "activation"


def is_bmm_operand(name: str) -> bool:
  """q, k or v of the attention BMMs (not the softmax map)."""
  return bool(_BMM_OPERAND.search(name))


def shared_input_of(name: str) -> str | None:
  """k and v input quantizers see the very tensor the q one sees (the LayerNorm output)."""
  for part in (".qkv.k.act_quantizer", ".qkv.v.act_quantizer"):
    if name.endswith(part):
      return name[: -len(part)] + ".qkv.q.act_quantizer"
  return None


def name_from_path(path: tuple[str, ...]) -> str:
  """Flax module path -> the authors' dotted module name."""
  out = []
  for p in path:
    m = _INDEXED.match(p)
    out += [m.group(1), m.group(2)] if m else [p]
  return ".".join(out)


def path_from_name(name: str) -> tuple[str, ...]:
  """The authors' dotted module name -> Flax module path."""
  parts, out, i = name.split("."), [], 0
  while i < len(parts):
    if parts[i] in ("layers", "blocks") and i + 1 < len(parts) and parts[i + 1].isdigit():
      out.append(f"{parts[i]}_{parts[i + 1]}")
      i += 2
    else:
      out.append(parts[i])
      i += 1
  return tuple(out)


def is_one_sided(name: str) -> bool:
  """The exponential-like tensors of the paper: post-softmax attention map and post-GELU fc2 input."""
  return bool(_ONE_SIDED.search(name))


def is_weight(name: str) -> bool:
  return bool(_WEIGHT.search(name))


def leaves_by_name(tree: Mapping, leaf: str) -> dict[str, object]:
  """{quantizer name: value} for every `leaf` entry of a nested tree (e.g. 'bounds', 'input')."""
  return {name_from_path(path[:-1]): v for path, v in traverse_util.flatten_dict(tree).items()
          if path[-1] == leaf}


def tree_to_dict(quant: QuantTree) -> dict[str, list[float]]:
  """The 'quant' collection -> {name: [lower, upper]} (Python floats), sorted by name."""
  flat = leaves_by_name(quant, BOUNDS)
  return {k: [float(v) for v in np.asarray(flat[k])] for k in sorted(flat)}


def dict_to_tree(bounds: Mapping[str, Sequence[float]], like: QuantTree | None = None) -> dict:
  """{name: [lower, upper]} -> the 'quant' collection; with `like`, names must match exactly."""
  if like is not None:
    want, got = set(leaves_by_name(like, BOUNDS)), set(bounds)
    if want != got:
      missing, extra = sorted(want - got), sorted(got - want)
      raise ValueError(f"bounds do not match the model's quantizers: {len(missing)} missing "
                       f"(e.g. {missing[:2]}), {len(extra)} unknown (e.g. {extra[:2]})")
  return traverse_util.unflatten_dict({path_from_name(name) + (BOUNDS,): jnp.asarray(
      [lo, hi], jnp.float32) for name, (lo, hi) in bounds.items()})


def quant_names(quant_like: QuantTree) -> list[str]:
  return sorted(leaves_by_name(quant_like, BOUNDS))
