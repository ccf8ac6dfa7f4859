"""The 'smooth' stage: per-channel scaling that moves activation range into the weights.

For a linear y = x W with per-tensor quantizers, a few input channels with a large range force a
coarse step on all of them. With s_j = max|x_j|^a / max|W_j|^(1-a) (W_j: the kernel's row j;
SmoothQuant), y = (x / s)(diag(s) W): the input channels become more alike, the weight rows
absorb the range. The division is folded into what produces x, so it costs nothing at run time:
  qkv   x = norm1(.): norm1's scale and bias divided by s, the qkv kernel's rows multiplied;
  fc1   x = norm2(.): the same with norm2 and fc1;
  proj  x = attn @ v, linear in v: v's kernel columns and bias divided by s, proj's rows
        multiplied (the v operand quantizer sees the scaled v too).
fc2's input comes out of GELU, which a scaling does not pass through: left alone.

max|x_j| is measured on the calibration patches with one capture pass of the student. Run it
before 'rotate': a run-time rotation of the qkv or fc1 input sits between the LayerNorm and the
linear, so the scaling could no longer fold into the LayerNorm.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from twodquant_jax.nn.quantizer import CALIB
from twodquant_jax.nn.student import Student
from twodquant_jax.ptq.rotation import block_paths, f32, f64, mutable_copy, subtree

DEFAULT_ALPHA = 0.5
KINDS = ("qkv", "fc1", "proj")
_INPUTS = {"qkv": ("attn", "qkv", "q", "act_quantizer"), "fc1": ("mlp", "fc1", "act_quantizer"),
           "proj": ("attn", "proj", "act_quantizer")}
_S_RANGE = (1e-4, 1e4)  # a dead channel (max 0) must not blow a scale up


def as_unit(lr: np.ndarray) -> jnp.ndarray:
  """LR patches as float32 in [0, 1]: uint8 ones (the pipeline's calibration batch) / 255."""
  lr = np.asarray(lr)
  return jnp.asarray(lr.astype(np.float32) / 255.0 if lr.dtype == np.uint8 else lr, jnp.float32)


def channel_absmax(student: Student, scale: int, bits: int, lr: np.ndarray) -> dict:
  """{block path: {kind: max |x_j| per input channel}} of the qkv, fc1 and proj inputs, from one
  capture pass of `student` on lr (N, h, w, 3) (`as_unit`). Reduced inside the jit, so only the
  per-channel maxima leave it."""
  module = student.module(scale, "capture", bits)
  paths = [p for _, p in block_paths(student.params)]

  @jax.jit
  def run(variables, x):
    calib = module.apply(variables, x, mutable=[CALIB])[1][CALIB]
    return [{k: jnp.max(jnp.abs(subtree(calib, p + q)["input"]).reshape(
        -1, subtree(calib, p + q)["input"].shape[-1]), axis=0) for k, q in _INPUTS.items()}
            for p in paths]

  out = run(student.variables(), as_unit(lr))
  return {p: {k: f64(v) for k, v in m.items()} for p, m in zip(paths, out)}


def smoothing_scales(x_absmax: np.ndarray, kernel: np.ndarray, alpha: float) -> np.ndarray:
  """s_j = max|x_j|^alpha / max_k |W_jk|^(1 - alpha), clipped to a sane range; kernel (in, out)."""
  w_absmax = np.max(np.abs(f64(kernel)), axis=1)
  tiny = 1e-12
  s = np.maximum(x_absmax, tiny) ** alpha / np.maximum(w_absmax, tiny) ** (1.0 - alpha)
  return np.clip(s, *_S_RANGE)


def _fold_block(blk: dict, absmax: Mapping[str, np.ndarray], alpha: float) -> None:
  """Folds the three scalings into one block's params (new leaves)."""
  attn, mlp = blk["attn"], blk["mlp"]
  qkv_k, qkv_b = f64(attn["qkv"]["kernel"]), f64(attn["qkv"]["bias"])
  c = qkv_k.shape[0]
  for kind, norm, layer in (("qkv", blk["norm1"], None), ("fc1", blk["norm2"], mlp["fc1"])):
    kernel = qkv_k if layer is None else f64(layer["kernel"])
    s = smoothing_scales(absmax[kind], kernel, alpha)
    norm["scale"], norm["bias"] = f32(f64(norm["scale"]) / s), f32(f64(norm["bias"]) / s)
    if layer is None:
      qkv_k = kernel * s[:, None]
    else:
      layer["kernel"] = f32(kernel * s[:, None])
  s = smoothing_scales(absmax["proj"], attn["proj"]["kernel"], alpha)
  qkv_k[:, 2 * c:] /= s[None, :]
  qkv_b[2 * c:] /= s
  attn["proj"]["kernel"] = f32(f64(attn["proj"]["kernel"]) * s[:, None])
  attn["qkv"]["kernel"], attn["qkv"]["bias"] = f32(qkv_k), f32(qkv_b)


def smooth(student: Student, lr: np.ndarray, scale: int, bits: int,
           alpha: float = DEFAULT_ALPHA) -> Student:
  """The student with SmoothQuant scalings (module doc) folded in; its FP output is unchanged.

  lr: calibration LR patches (N, h, w, 3), uint8 or in [0, 1], on which the input ranges are
  measured.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"smooth_alpha must lie in [0, 1], got {alpha}")
  rotated = sorted(set(student.arch.get("rotate", ())) & {"qkv", "fc1"})
  if rotated:
    raise ValueError(f"smooth: the student's {rotated} inputs are rotated at run time, so the "
                     f"scaling cannot fold into LayerNorm; list 'smooth' before 'rotate'")
  absmax = channel_absmax(student, scale, bits, lr)
  params = mutable_copy(student.params)
  for _, path in block_paths(params):
    _fold_block(subtree(params, path), absmax[path], alpha)
  return Student(params=params, extra=student.extra, arch=student.arch)
