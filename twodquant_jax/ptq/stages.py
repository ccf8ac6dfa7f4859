"""Stages that change the network before calibration, by name (the registry's `stages`).

A stage takes the student built so far and what it may measure on, and returns the changed
student: e.g. rotations folded into the weights (plus the run-time rotations as a 'rotation'
collection), or channel scaling folded into LayerNorm. The FP teacher never changes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np

from twodquant_jax.nn.student import Student
from twodquant_jax.ptq import rotation, smooth


@dataclasses.dataclass(frozen=True)
class StageInputs:
  """fp_params: the teacher's weights; calib_lr: calibration LR patches (N, h, w, 3) in [0, 1];
  key: the stage's PRNG key (random signs etc.); options: the stage's settings by name."""
  fp_params: Mapping[str, Any]
  calib_lr: np.ndarray
  scale: int
  bits: int
  key: jax.Array
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


Stage = Callable[[Student, StageInputs], Student]

STAGES: dict[str, Stage] = {
    "rotate": lambda s, i: rotation.rotate(
        s, i.key, i.options.get("rotate_kinds", rotation.DEFAULT_KINDS)),
    "smooth": lambda s, i: smooth.smooth(
        s, i.calib_lr, i.scale, i.bits, i.options.get("smooth_alpha", smooth.DEFAULT_ALPHA)),
    # Smoothing at 3 bits or more only (2DQuant++): next to per-channel bounds and rotation it
    # cost 0.18-0.26 dB vs FP at W2 (2-bit weights cannot take the range it moves into them)
    # and gained 0.01-0.31 at W3/W4 (docs/beyond.md).
    "smooth_w3": lambda s, i: STAGES["smooth"](s, i) if i.bits >= 3 else s,
}


def apply(names: tuple[str, ...], student: Student, inputs: StageInputs) -> Student:
  """The stages `names`, in order, each with its own key folded from `inputs.key`."""
  for i, name in enumerate(names):
    if name not in STAGES:
      raise ValueError(f"unknown stage {name!r}; known: {sorted(STAGES)}")
    student = STAGES[name](student, dataclasses.replace(inputs,
                                                        key=jax.random.fold_in(inputs.key, i)))
  return student
