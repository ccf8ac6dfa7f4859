"""Learned (AdaRound-style) weight rounding: offsets, their regulariser, and baking.

With `SwinIR.rounding` each weight quantizer's code is clip(floor((w - l) / s) + h(V), 0, 2^N - 1)
with one offset V per weight element ('rounding' collection, `nn.quantizer.soft_round_quant`).
DQC trains V jointly with the bounds; the regulariser sum(1 - |2h - 1|^beta), beta annealed from
high to low, pushes every h to 0 or 1. At the end `bake` writes the hard codes (h = [V >= 0]) back
as weights: plain round-to-nearest of the baked weights with the same bounds gives the learned
codes exactly, so the baked student (arch rounding off) needs nothing new from the integer engine
or the packed file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from twodquant_jax.nn.layers import OFFSET, ROUNDING
from twodquant_jax.nn.quantizer import (BOUNDS, hard_round_codes, quant_step, rectified_sigmoid,
                                        rounding_offset_init)
from twodquant_jax.nn.student import Student

WEIGHT_QUANTIZER = "weight_quantizer"
QKV_PARTS = ("q", "k", "v")


def weight_slices(quant: Mapping, params: Mapping
                  ) -> Iterator[tuple[tuple[str, ...], tuple[str, ...], slice]]:
  """(weight quantizer path, kernel path in params, column slice) of every weight quantizer.

  A quantized linear's kernel is its 'kernel'; q/k/v quantize column thirds of the qkv kernel.
  """
  flat = traverse_util.flatten_dict(quant)
  for path in sorted(flat):
    if path[-1] != BOUNDS or path[-2] != WEIGHT_QUANTIZER:
      continue
    owner = path[:-2]
    if owner[-1] in QKV_PARTS and len(owner) > 1 and owner[-2] == "qkv":
      kernel = owner[:-1] + ("kernel",)
      width = at_path(params, kernel).shape[-1] // 3
      i = QKV_PARTS.index(owner[-1])
      yield path[:-1], kernel, slice(i * width, (i + 1) * width)
    else:
      yield path[:-1], owner + ("kernel",), slice(None)


def at_path(tree: Mapping, path: tuple[str, ...]) -> Any:
  """tree[path[0]][path[1]]..."""
  for k in path:
    tree = tree[k]
  return tree


def _bounds(quant: Mapping, qpath: tuple[str, ...]) -> tuple[jnp.ndarray, jnp.ndarray]:
  b = jnp.asarray(at_path(quant, qpath)[BOUNDS], jnp.float32)
  return b[0], b[1]


def init_offsets(student: Student, quant: Mapping, bits: int) -> Student:
  """The student with a fresh 'rounding' collection: h(V) = frac((w - l) / s) for every weight,
  so the soft-rounded weights start at the weights themselves (round-to-nearest's fractions)."""
  flat = {}
  for qpath, kpath, cols in weight_slices(quant, student.params):
    w = jnp.asarray(at_path(student.params, kpath))[:, cols]
    lower, upper = _bounds(quant, qpath)
    flat[qpath + (OFFSET,)] = rounding_offset_init(w, lower, upper, bits)
  return dataclasses.replace(student, extra={**student.extra,
                                             ROUNDING: traverse_util.unflatten_dict(flat)})


def regulariser(offsets: Mapping, beta: jnp.ndarray) -> jnp.ndarray:
  """mean over all offsets of 1 - |2 h(V) - 1|^beta: 0 when every h is 0 or 1.

  A mean (not AdaRound's sum) so that the weight does not scale with the number of weights.
  """
  leaves = jax.tree_util.tree_leaves(offsets)
  total = sum(jnp.sum(1.0 - jnp.abs(2.0 * rectified_sigmoid(v) - 1.0) ** beta) for v in leaves)
  return total / sum(v.size for v in leaves)


def beta_at(step: jnp.ndarray, steps: int, start: float, end: float, warmup: float) -> jnp.ndarray:
  """beta at `step`: `start` until `warmup` of the steps, then linear to `end` at the last."""
  t = jnp.clip((step / max(steps, 1) - warmup) / max(1.0 - warmup, 1e-9), 0.0, 1.0)
  return start + (end - start) * t


def regulariser_on(step: jnp.ndarray, steps: int, warmup: float) -> jnp.ndarray:
  """1.0 once the warm-up (free soft rounding) is over, else 0.0."""
  return (step >= warmup * steps).astype(jnp.float32)


def learned_codes(student: Student, quant: Mapping, bits: int) -> dict[tuple[str, ...], np.ndarray]:
  """{weight quantizer path: the hard learned codes (in, out) as int32}."""
  offsets = student.extra[ROUNDING]
  out = {}
  for qpath, kpath, cols in weight_slices(quant, student.params):
    w = jnp.asarray(at_path(student.params, kpath))[:, cols]
    lower, upper = _bounds(quant, qpath)
    v = at_path(offsets, qpath)[OFFSET]
    out[qpath] = np.asarray(hard_round_codes(w, lower, upper, v, bits)).astype(np.int32)
  return out


def bake(student: Student, quant: Mapping, bits: int) -> Student:
  """The student with its hard learned codes written back as weights (w = s * code + l) and
  rounding switched off (no 'rounding' collection, arch rounding False).

  Round-to-nearest of the baked weight gives the code back: (s * c + l - l) / s is within a few
  ulps of the integer c, far from a rounding tie; a value an ulp above u is clipped to u, whose
  code is 2^N - 1 = c. Tested at 2, 3 and 4 bits.
  """
  if ROUNDING not in student.extra:
    raise ValueError("bake: the student has no 'rounding' collection (nothing to bake)")
  codes = learned_codes(student, quant, bits)
  params = jax.tree_util.tree_map(np.array, jax.device_get(dict(student.params)))
  for qpath, kpath, cols in weight_slices(quant, student.params):
    lower, upper = _bounds(quant, qpath)
    s = quant_step(lower, upper, bits)
    kernel = at_path(params, kpath)
    kernel[:, cols] = np.asarray(s * jnp.asarray(codes[qpath], jnp.float32) + lower)
  extra = {k: v for k, v in student.extra.items() if k != ROUNDING}
  return Student(params, extra, {**dict(student.arch), "rounding": False})
