"""Bias correction of the quantized linears, a post-calibration step ('bias_correct').

Quantizing a weight W to Q(W) shifts the layer's mean output by E[x] (Q(W) - W). Adding
E[x] (W - Q(W)) to the bias removes that shift for inputs distributed like the calibration
batch. E[x] is the per-channel mean of each linear's input as the unquantized student computes
it on the calibration patches (the same capture pass DOBI searches on): the FP inputs, not the
quantized ones, so the correction does not depend on the activation bounds it is combined with.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from twodquant_jax.nn.names import name_from_path
from twodquant_jax.nn.quantizer import BOUNDS, fake_quant
from twodquant_jax.nn.student import Student
from twodquant_jax.ptq import dobi
from twodquant_jax.ptq.rounding import at_path, weight_slices
from twodquant_jax.ptq.stages import StageInputs


def input_means(student: Student, scale: int, calib_lr: np.ndarray) -> dict[str, np.ndarray]:
  """{activation quantizer name: per-channel mean (in,) of its input} over the calibration
  batch (float LR patches in [0, 1]), from the unquantized student."""
  lr_u8 = np.asarray(calib_lr, np.float32) * 255.0  # iter_captured divides by 255
  means = {}
  for _, captured, _ in dobi.iter_captured(student, scale, lr_u8):
    for name, x in captured.items():
      if name.endswith(".act_quantizer"):
        means[name] = np.asarray(jnp.mean(x.reshape(-1, x.shape[-1]), axis=0), np.float64)
  return means


def bias_correct(student: Student, quant: Mapping, inputs: StageInputs) -> Student:
  """The student with E[x] (W - Q(W)) added to each quantized linear's bias (module doc).

  Q is the weight quantizer with the calibrated bounds `quant` at `inputs.bits` (per tensor or
  per channel). A student with unbaked learned rounding is refused: bake it first.
  """
  if student.arch.get("rounding"):
    raise ValueError("bias correction needs the final weights: bake the learned rounding "
                     "first (ptq.rounding.bake)")
  means = input_means(student, inputs.scale, inputs.calib_lr)
  params = jax.tree_util.tree_map(np.array, jax.device_get(dict(student.params)))
  for qpath, kpath, cols in weight_slices(quant, student.params):
    act = name_from_path(qpath[:-1] + ("act_quantizer",))
    kernel = at_path(params, kpath)[:, cols]
    b = jnp.asarray(at_path(quant, qpath)[BOUNDS], jnp.float32)
    err = kernel - np.asarray(fake_quant(jnp.asarray(kernel), b[0], b[1], inputs.bits))
    bias = at_path(params, kpath[:-1] + ("bias",))
    bias[cols] = (bias[cols] + means[act] @ err.astype(np.float64)).astype(bias.dtype)
  return dataclasses.replace(student, params=params)
