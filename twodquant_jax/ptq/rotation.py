"""The 'rotate' stage: orthogonal rotations folded into the student's weights.

Kinds (each switchable, `rotate_kinds`):
  'qkv', 'fc1', 'fc2'  run-time: the linear's input x becomes x R (`SwinIR.rotate`, R in the
                       'rotation' collection, one per block and linear) and its kernel R^T W, so
                       x W is unchanged and the input quantizer sees x R.
  'attn_qk'            offline: per head, q and k both rotated by one orthogonal R_h, folded into
                       the q and k columns (and biases) of the qkv kernel: (q R_h)(k R_h)^T = q k^T.
  'attn_v'             offline: per head, v's columns rotated by R'_h (v columns and bias) and
                       R'_h^T folded into the proj kernel's rows of that head, so the v operand
                       and the proj input are rotated and the block output is unchanged.
  'attn'               both attention kinds. The attention map itself is never rotated.

Matrices: random-signed Hadamard where one of the order is built (60, 120), a random orthogonal
matrix per head (order 10 has no Hadamard matrix). One matrix per block and kind, drawn from the
stage key: independent signs per layer cost nothing (each is folded into its own weights) and
the scanned network stacks them like the params.

Folds run in float64 and round once to float32, so the rotated FP network equals the plain one to
float32 rounding (tests/test_rotation.py).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from twodquant_jax.nn import rotation
from twodquant_jax.nn.layers import ROTATION
from twodquant_jax.nn.student import Student
from twodquant_jax.nn.swinir import ROTATE_KINDS

KINDS = ("qkv", "fc1", "fc2", "attn_qk", "attn_v")
ALIASES = {"attn": ("attn_qk", "attn_v")}
# Chosen by benchmarks/rotation_probe.py (docs/measured/rotation.md): the kinds whose rotation
# lowered the stand-in's per-layer 2-bit output error (fc1 +0.50 dB, attn_v +0.26 dB proj and
# +0.42 dB A.v). The others raised it: qkv -0.04, fc2 -1.24 (its post-GELU input is asymmetric,
# which the one-sided bounds exploit), attn_qk -2.23 on q k^T (q and k are flatter than a
# Gaussian, kurtosis 2.4 and 2.9, and a rotation makes them Gaussian).
DEFAULT_KINDS = ("fc1", "attn_v")

Tree = dict[str, Any]


def expand_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
  """Kinds with aliases expanded, checked, in KINDS order."""
  if isinstance(kinds, str):
    kinds = (kinds,)
  out = set()
  for k in kinds:
    if k not in KINDS and k not in ALIASES:
      raise ValueError(f"rotate_kinds: unknown kind {k!r}; choose from {KINDS + tuple(ALIASES)}")
    out.update(ALIASES.get(k, (k,)))
  return tuple(k for k in KINDS if k in out)


def mutable_copy(tree: Mapping) -> Tree:
  """A nested-dict copy of a variable tree (leaves shared, dicts new), safe to assign into."""
  return {k: mutable_copy(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def block_paths(params: Mapping) -> Iterator[tuple[int, tuple[str, ...]]]:
  """(RSTB index, path of a Swin block's params) for every block, in network order."""
  layers = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k[7:]))
  for layer in layers:
    group = params[layer]["residual_group"]
    for block in sorted(group, key=lambda k: int(k[7:])):
      yield int(layer[7:]), (layer, "residual_group", block)


def subtree(tree: Mapping, path: Sequence[str]) -> Any:
  """tree[path[0]][path[1]]..."""
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: Tree, path: Sequence[str], value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def f64(x) -> np.ndarray:
  """A float64 copy (folds write into it)."""
  return np.array(x, np.float64)


def f32(x: np.ndarray) -> jnp.ndarray:
  """A folded float64 result rounded once to a float32 parameter."""
  return jnp.asarray(np.asarray(x, np.float32))


def _fold_block(blk: Tree, keys: Mapping[str, jax.Array], num_heads: int) -> Tree:
  """Rotates one block's params (in place, new leaves); returns its 'rotation' entries."""
  attn, mlp = blk["attn"], blk["mlp"]
  qkv_k, qkv_b = f64(attn["qkv"]["kernel"]), f64(attn["qkv"]["bias"])
  proj_k = f64(attn["proj"]["kernel"])
  c = qkv_k.shape[0]
  hd = c // num_heads
  runtime: Tree = {}
  for kind, key in keys.items():
    if kind in ROTATE_KINDS:
      layer = attn["qkv"] if kind == "qkv" else mlp[kind]
      w = f64(layer["kernel"]) if kind != "qkv" else qkv_k
      r = rotation.orthogonal(key, w.shape[0])
      w = r.T @ w
      if kind == "qkv":
        qkv_k = w
      else:
        layer["kernel"] = f32(w)
      _set(runtime, ("attn", "qkv") if kind == "qkv" else ("mlp", kind), {"matrix": f32(r)})
      continue
    for h in range(num_heads):
      r = rotation.orthogonal(jax.random.fold_in(key, h), hd)
      sl = slice(h * hd, (h + 1) * hd)
      parts = (0, 1) if kind == "attn_qk" else (2,)
      for p in parts:
        cols = slice(p * c + sl.start, p * c + sl.stop)
        qkv_k[:, cols] = qkv_k[:, cols] @ r
        qkv_b[cols] = qkv_b[cols] @ r
      if kind == "attn_v":
        proj_k[sl] = r.T @ proj_k[sl]
  attn["qkv"]["kernel"], attn["qkv"]["bias"] = f32(qkv_k), f32(qkv_b)
  attn["proj"]["kernel"] = f32(proj_k)
  return runtime


def rotate(student: Student, key: jax.Array, kinds: Sequence[str]) -> Student:
  """The student with rotations of `kinds` (module doc) folded in; its FP output is unchanged.

  Run-time kinds add their matrices to `extra['rotation']` and their names to `arch['rotate']`.
  """
  kinds = expand_kinds(kinds)
  before = tuple(student.arch.get("rotate", ()))
  again = sorted(set(before) & set(kinds))
  if again:
    raise ValueError(f"rotate: the student's {again} inputs are rotated already; "
                     f"list each kind once in rotate_kinds")
  params = mutable_copy(student.params)
  extra = mutable_copy(student.extra)
  table = mutable_copy(extra.get(ROTATION, {}))
  num_heads = student.module(4).num_heads
  for b, (layer, path) in enumerate(block_paths(params)):
    block_key = jax.random.fold_in(key, b)
    keys = {k: jax.random.fold_in(block_key, KINDS.index(k)) for k in kinds}
    runtime = _fold_block(subtree(params, path), keys, num_heads[layer])
    if runtime:
      merged = mutable_copy(subtree(table, path)) if _has(table, path) else {}
      _deep_update(merged, runtime)
      _set(table, path, merged)
  runtime_kinds = tuple(k for k in ROTATE_KINDS if k in before or k in kinds)
  if table:
    extra[ROTATION] = table
  arch = {**student.arch, "rotate": runtime_kinds} if runtime_kinds else dict(student.arch)
  return Student(params=params, extra=extra, arch=arch)


def _has(tree: Mapping, path: Sequence[str]) -> bool:
  for k in path:
    if not isinstance(tree, Mapping) or k not in tree:
      return False
    tree = tree[k]
  return True


def _deep_update(dst: Tree, src: Mapping) -> None:
  for k, v in src.items():
    if isinstance(v, Mapping) and isinstance(dst.get(k), Mapping):
      dst[k] = mutable_copy(dst[k])
      _deep_update(dst[k], v)
    else:
      dst[k] = v
