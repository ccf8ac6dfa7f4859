"""Compression and speedup ratios of a quantized SwinIR-light (paper Table 2), from the model.

Parameters are counted from the actual parameter tree, grouped by op type; MACs follow SwinIR's
own `flops()` accounting per op type for a given LR input size (the paper's way: a 128x128 LR
input for x4). Quantized ops are the linear layers (qkv, proj, fc1, fc2) and the two batched
matmuls of attention (q@k^T, attn@v); their cost is scaled by bits/32.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from flax import traverse_util

from twodquant_jax.nn.swinir import SwinIR

_LINEARS = ("qkv", "proj", "fc1", "fc2")


def param_counts(params: Mapping) -> dict[str, int]:
  """Parameter counts by kind: 'linear_weight' (quantized), 'bias_table', 'other'."""
  counts = {"linear_weight": 0, "bias_table": 0, "other": 0}
  for path, v in traverse_util.flatten_dict(params).items():
    n = int(np.prod(np.shape(v)))
    if path[-1] == "relative_position_bias_table":
      counts["bias_table"] += n
    elif path[-1] == "kernel" and len(path) >= 2 and path[-2] in _LINEARS:
      counts["linear_weight"] += n
    else:
      counts["other"] += n
  return counts


def compression_ratio(params: Mapping, bits: int) -> float:
  """FP32 size over quantized size, counting parameters as the paper does (bias tables excluded;
  only the linear weights shrink to `bits`)."""
  c = param_counts(params)
  total = c["linear_weight"] + c["other"]
  return total / (c["other"] + c["linear_weight"] * bits / 32)


def mac_counts(model: SwinIR, h: int, w: int) -> dict[str, int]:
  """MACs by op type for an h x w LR input, with SwinIR's flops() formulas.

  'linear': qkv, q@k^T, attn@v, proj, fc1, fc2 over all blocks (quantized);
  'conv': conv_first, the 'tail' term (H*W*3*C*C, as SwinIR counts it), the RSTB convs;
  'other': LayerNorms and the upsampler conv.
  """
  c, ws, hw = model.embed_dim, model.window_size, h * w
  n = ws * ws
  nw = hw // n
  linear = conv = other = 0
  other += hw * c  # patch_embed norm
  for depth, heads in zip(model.depths, model.num_heads):
    hd = c // heads
    attn = n * c * 3 * c + heads * n * hd * n + heads * n * n * hd + n * c * c
    mlp = int(2 * hw * c * c * model.mlp_ratio)
    linear += depth * (nw * attn + mlp)
    other += depth * 2 * hw * c  # norm1, norm2
    conv += hw * c * c * 9  # RSTB conv
  conv += hw * 3 * c * 9 + hw * 3 * c * c  # conv_first, 'tail'
  other += hw * c * 3 * 9  # upsampler as SwinIR counts it
  return {"linear": linear, "conv": conv, "other": other}


def speedup_ratio(macs: Mapping[str, int], bits: int) -> float:
  """Total MACs over the cost with the linear/BMM MACs at bits/32 (paper Table 2)."""
  total = sum(macs.values())
  return total / (macs["linear"] * bits / 32 + macs["conv"] + macs["other"])


def ratios(params: Mapping, model: SwinIR, bits: int, lr_hw: tuple[int, int] = (128, 128)
           ) -> dict[str, float]:
  """Both ratios plus the counts behind them, for reports."""
  macs = mac_counts(model, *lr_hw)
  counts = param_counts(params)
  return {"bits": bits, "compression": compression_ratio(params, bits),
          "speedup": speedup_ratio(macs, bits), "params": counts, "macs": macs,
          "macs_input_hw": list(lr_hw)}
