"""Stage 1: bound initialisation from one full-precision pass of the calibration batch.

`calibrate_many` runs the student (`nn.student.Student`: the FP params for the paper's methods;
rotated or otherwise changed weights, with their extra collections, beyond it) one RSTB at a time with its quantizers in 'capture' mode (each
sows the tensor it sees; weights are sown too), then searches every quantizer's bounds with a
jitted search (`quant/search.py`): DOBI (paper Sec. 3.2), or the MinMax / Percentile baselines.
With `weight_channels` in the student's arch, each weight quantizer gets one pair of bounds per
output channel: the same search run on each column of the kernel alone.
Going RSTB by RSTB keeps memory at a quarter of the captured tensors (32 patches of 64x64 give
~2.7 GB per RSTB, of which the attention maps are most).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from twodquant_jax.nn.swinir import SwinIR
from twodquant_jax.ptq import search
from twodquant_jax.nn.names import (dict_to_tree, is_bmm_operand, is_one_sided, is_weight,
                                     leaves_by_name, quant_names, shared_input_of)
from twodquant_jax.nn.quantizer import CALIB
from twodquant_jax.nn.student import Student, plain
from twodquant_jax.progress import Progress
from twodquant_jax.settings import CALIBRATIONS, CalibSettings

METHODS = CALIBRATIONS


def torch_order(name: str, x: jnp.ndarray) -> np.ndarray:
  """The tensor in the released PyTorch code's memory order (its error-norm accumulation order):
  torch Linear weights are (out, in), our kernels (in, out); its q/k/v BMM operands are laid out
  (windows, tokens, heads, head_dim), ours (windows, heads, tokens, head_dim)."""
  x = np.asarray(x)
  if is_weight(name):
    return x.T
  if is_bmm_operand(name):
    return x.transpose(0, 2, 1, 3)
  return x


def bounds_for(x: jnp.ndarray, name: str, bits: int, cfg: CalibSettings) -> jnp.ndarray:
  """[lower, upper] for quantizer `name` from the FP tensor it sees.

  Strategy 'paper': exact errors, one-sided search for the attention map and fc2 input.
  Strategy 'reference': as the released code runs: symmetric search everywhere, and candidates
  whose errors are within float32 noise decided by its float32 error norm (`search.py`).
  """
  if cfg.method == "minmax":
    return search.minmax_bounds(x)
  if cfg.method == "percentile":
    return search.percentile_bounds(x, cfg.percentile_low, cfg.percentile_high)
  if cfg.strategy == "reference":
    return jnp.asarray(search.dobi_bounds_torch_f32(
        torch_order(name, x), bits, num_candidates=cfg.num_candidates, direction="symmetric",
        tie=cfg.tie))
  one_sided = is_one_sided(name)
  impl = cfg.search
  if impl == "auto":
    impl = "sorted" if jax.default_backend() == "cpu" else "brute"
  return search.dobi_bounds(x, bits, num_candidates=cfg.num_candidates,
                            direction="one_sided" if one_sided else "symmetric",
                            one_sided_step="paper", tie=cfg.tie, method=impl)


def as_student(student: Student | Mapping[str, Any]) -> Student:
  """A `Student`, or bare FP params as the paper's student (`student.plain`)."""
  return student if isinstance(student, Student) else plain(student)


def iter_captured(student: Student | Mapping, scale: int, lr: np.ndarray
                  ) -> Iterator[tuple[int, dict[str, jnp.ndarray], float]]:
  """Runs the student (or bare FP params) unquantized, one RSTB at a time, and yields
  (rstb index, {quantizer name: the tensor it sees (weights: the weight slice)}, forward
  seconds). Only one RSTB's tensors are alive at a time."""
  student = as_student(student)
  x = jnp.asarray(np.asarray(lr, np.float32) / 255.0)
  fp = student.module(scale, "capture")
  if len(set(fp.depths)) != 1 or len(set(fp.num_heads)) != 1:
    raise NotImplementedError("capture assumes identical RSTBs")
  variables = student.variables()
  shallow, tokens = jax.jit(lambda v, x: fp.apply(v, x, method=SwinIR.embed))(variables, x)
  hw = tuple(shallow.shape[1:3])
  stage = fp.stage(0, mode="capture")  # identical stages: one compile serves all

  @jax.jit
  def run_layer(layer_variables, tokens):
    (out, _), state = stage.apply(layer_variables, tokens, hw, mutable=[CALIB])
    return out, state[CALIB]

  for i in range(len(fp.depths)):
    tf = time.perf_counter()
    name = fp.stage_name(i)
    layer_variables = {col: tree[name] for col, tree in variables.items() if name in tree}
    tokens, captured = run_layer(layer_variables, tokens)
    jax.block_until_ready(tokens)
    seconds = time.perf_counter() - tf
    yield i, leaves_by_name({fp.stage_name(i): captured}, "input"), seconds
    del captured


def channel_bounds(x: jnp.ndarray, name: str, bits: int, cfg: CalibSettings) -> np.ndarray:
  """Per-output-channel bounds (2, out) of a kernel x (in, out): `bounds_for` on each column
  alone (the exact per-tensor search, so a channel's bounds do not depend on the others)."""
  x = np.asarray(x, np.float32)
  cols = [np.asarray(bounds_for(jnp.asarray(x[:, j]), name, bits, cfg)) for j in range(x.shape[1])]
  return np.stack(cols, axis=1).astype(np.float32)


def calibrate_many(student: Student | Mapping, scale: int, lr: np.ndarray,
                   settings: Mapping[str, tuple[int, CalibSettings]], *, progress: bool = False
                   ) -> dict[str, tuple[dict, dict]]:
  """Several bound initialisations {key: (bits, settings)} from ONE capture pass of the student
  (a `Student`, or bare FP params: the paper's student).

  The FP tensors do not depend on the bit width or the method, so e.g. MinMax, Percentile and
  DOBI at 2, 3 and 4 bits share the forward passes. Returns {key: ('quant' collection, info)}.
  Quantizers whose inputs are the same tensor (q/k/v input quantizers) are searched once and
  share the result (the search is deterministic, so this changes nothing but the time).
  """
  t0 = time.perf_counter()
  student = as_student(student)
  per_channel = bool(student.arch.get("weight_channels", False))
  bounds: dict[str, dict[str, list]] = {k: {} for k in settings}
  search_s = {k: 0.0 for k in settings}
  forward_s = 0.0
  shapes = jax.eval_shape(lambda: student.module(scale, "quant").init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
  total = len(quant_names(shapes["quant"]))
  with Progress(total * len(settings), "bounds", bar=None if progress else False) as bar:
    for _, inputs, seconds in iter_captured(student, scale, lr):
      forward_s += seconds
      for key, (bits, cfg) in settings.items():
        ts = time.perf_counter()
        out = bounds[key]
        for name in sorted(inputs, key=lambda n: shared_input_of(n) is not None):
          shared = shared_input_of(name)
          if shared is not None and shared in out:
            out[name] = out[shared]
          elif per_channel and is_weight(name):
            out[name] = channel_bounds(inputs[name], name, bits, cfg).tolist()
          else:
            b = np.asarray(bounds_for(inputs[name], name, bits, cfg))
            out[name] = [float(b[0]), float(b[1])]
          bar.update(1)
        search_s[key] += time.perf_counter() - ts
      del inputs
  results = {}
  for key, (bits, cfg) in settings.items():
    if len(bounds[key]) != total:
      raise RuntimeError(f"captured {len(bounds[key])} quantizers, expected {total}")
    info = {"method": cfg.method, "bits": bits, "seconds_total": time.perf_counter() - t0,
            "seconds_forward": forward_s, "seconds_search": search_s[key],
            "num_patches": int(lr.shape[0]), "settings": dataclasses.asdict(cfg)}
    results[key] = (dict_to_tree(bounds[key]), info)
  return results
