"""Flax modules that put fake quantizers into the network.

Every quantizer is a `FakeQuant` module whose two bounds live in the 'quant' variable collection
(never in 'params'). The network runs in one of four modes, a static attribute:
  'fp'      quantizers are the identity and hold no variables (the full-precision model);
  'capture' quantizers are the identity and `sow` what they see into 'calib' (for DOBI etc.);
  'quant'   quantizers apply Eq. (1) with their bounds (the fake-quantized student);
  'int'     the integer engine: quantizers return int8 codes (`intmath.Coded`, same bounds and
            rounding as 'quant') and every quantized matmul runs on them (`qmatmul`).

The float matmuls `bmm` and `linear` rewrite their gradients into forms that XLA:CPU runs fast
(optimization barriers, transposed copies, chunked sums). The rewrites are measured on XLA:CPU
only, so they are traced on the CPU backend only; elsewhere the plain matmul and its ordinary
gradient are used (`matmul_vjps` forces either, e.g. for tests).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from twodquant_jax.nn.intmath import Coded, encode, int_matmul
from twodquant_jax.nn.quantizer import (BOUNDS, CALIB, fake_quant, rounding_offset_init,
                                        soft_round_quant)

MODES = ("fp", "capture", "quant", "int")
ROUNDING = "rounding"  # collection of the learned-rounding offsets (SwinIR.rounding)
OFFSET = "offset"  # variable name inside each weight quantizer's 'rounding' entry
VJP_PATHS = ("auto", "cpu", "plain")  # matmul gradients: by backend, XLA:CPU's forms, plain
# `checkpoint_name`s of the float matmul outputs and the attention probabilities: what a Swin
# block rematerialised with remat 'matmuls' keeps for the backward pass (`swinir.remat_policy`).
MATMUL_OUT = "matmul_out"
ATTN_PROBS = "attn_probs"


def check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"quantization mode must be one of {MODES}, got {mode!r}")


def qmatmul(a, b) -> jnp.ndarray:
  """a @ b: on integer codes when both are `Coded` ('int' mode), else the float matmul."""
  if isinstance(a, Coded) and isinstance(b, Coded):
    return int_matmul(a, b)
  if isinstance(a, Coded) or isinstance(b, Coded):
    raise TypeError("qmatmul: both operands or neither must be integer codes")
  return bmm(a, b)


_VJP_PATH = contextvars.ContextVar("twodquant_matmul_vjps", default="auto")


@contextlib.contextmanager
def matmul_vjps(path: str) -> Iterator[None]:
  """Traces `bmm` and `linear` inside with the given gradient form: 'cpu' (the XLA:CPU rewrites),
  'plain' (jnp.matmul) or 'auto' (by `jax.default_backend()`). Decided when a function is
  traced: a function jitted before keeps the form it was traced with."""
  if path not in VJP_PATHS:
    raise ValueError(f"matmul_vjps: path must be one of {VJP_PATHS}, got {path!r}")
  token = _VJP_PATH.set(path)
  try:
    yield
  finally:
    _VJP_PATH.reset(token)


def _cpu_vjps() -> bool:
  """Whether `bmm` / `linear` being traced now take the XLA:CPU gradient forms."""
  path = _VJP_PATH.get()
  return jax.default_backend() == "cpu" if path == "auto" else path == "cpu"


def bmm(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Batched a @ b ([..., m, k] @ [..., k, n]); on XLA:CPU with the gradient of `_bmm_cpu`."""
  return _bmm_cpu(a, b) if _cpu_vjps() else jnp.matmul(a, b)


def linear(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """x @ kernel (x: [..., in], kernel: [in, out]); on XLA:CPU with `_linear_cpu`'s gradient."""
  return _linear_cpu(x, kernel) if _cpu_vjps() else jnp.matmul(x, kernel)


def _transposed(x: jnp.ndarray) -> jnp.ndarray:
  """x with its last two axes swapped as a real copy: the optimization barrier keeps XLA from
  folding the transpose back into the consuming dot's dimension numbers."""
  return jax.lax.optimization_barrier(x.swapaxes(-2, -1))


@jax.custom_vjp
def _bmm_cpu(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Batched a @ b whose b-gradient avoids a transposed-lhs dot (XLA:CPU).

  The plain gradient a^T g contracts over a's rows: XLA:CPU cannot hand that form to YNNPACK
  and runs it in Eigen (with operand packing). Here the SMALLER of a and g is transposed into a
  copy (q in q k^T, the output gradient in attn v: 64x10 per head, against the 64x64 map), and
  the dot is an ordinary row-major one. Same products and sums, so bit-identical gradients;
  the two attention-gradient dots per Swin block: 3.8 -> 2.2 ms each at 768 heads.
  """
  return a @ b


def _bmm_fwd(a, b):
  return a @ b, (a, b)


def _bmm_bwd(res, g):
  a, b = res
  da = g @ b.swapaxes(-2, -1)
  # The barrier on each product too: without it XLA gives the dot an output layout that absorbs
  # the transpose or sum after it, and the dot is a transposed one again (4.9 vs 2.2 ms).
  if a.shape[-1] <= g.shape[-1]:  # a is the narrow one: db = (a^T) g
    db = jax.lax.optimization_barrier(_transposed(a) @ g)
  else:  # g is: db = ((g^T) a)^T, the final transpose on the small result
    db = jax.lax.optimization_barrier(_transposed(g) @ a).swapaxes(-2, -1)
  return da, db


_bmm_cpu.defvjp(_bmm_fwd, _bmm_bwd)


def _dense(x, kernel) -> jnp.ndarray:
  """A quantized linear's matmul: on integer codes in 'int' mode, else `linear`."""
  if isinstance(x, Coded) or isinstance(kernel, Coded):
    return qmatmul(x, kernel)
  return checkpoint_name(linear(x, kernel), MATMUL_OUT)


def _row_chunk(rows: int) -> int:
  """Rows per chunk of the weight-gradient sum (0: do not chunk)."""
  return next((c for c in (256, 128, 64) if rows % c == 0 and rows > c), 0)


@jax.custom_vjp
def _linear_cpu(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """x @ kernel whose kernel gradient is summed in chunks (XLA:CPU).

  The forward is the plain matmul. The kernel's gradient x^T g contracts over every token (16 k
  rows at batch 4): as one dot XLA:CPU runs it in Eigen with a transposed copy of g, and
  recomputes g's whole producer chain (GELU backward, quantizer masks) a second time to make
  it. Summed as a batched matmul over 256-row chunks, then over the chunks, it stays in YNNPACK:
  a 60->120 linear with GELU, fwd+bwd at batch 4, 20.7 -> 11.9 ms on a 2-core CPU (the
  gradient differs from the one-dot sum by 1e-7 relative: summation order). Each chunk's x^T is
  a real copy (as in `_bmm_cpu`), so the chunk dots are row-major too: 2.0 -> 1.2 ms at 8 k rows.
  """
  return x @ kernel


def _linear_fwd(x, kernel):
  return x @ kernel, (x, kernel)


def _linear_bwd(res, g):
  x, kernel = res
  dx = g @ kernel.T
  k, n = kernel.shape
  x2, g2 = x.reshape(-1, k), g.reshape(-1, n)
  c = _row_chunk(x2.shape[0])
  if c:  # per chunk (x^T) g with x^T a real copy: a row-major dot, see `_bmm_cpu`
    xt = _transposed(x2.reshape(-1, c, k))
    dk = jax.lax.optimization_barrier(xt @ g2.reshape(-1, c, n)).sum(0)
  else:
    dk = x2.T @ g2
  return dx, dk


_linear_cpu.defvjp(_linear_fwd, _linear_bwd)


class FakeQuant(nn.Module):
  """One two-bound fake quantizer (paper Eq. 1), identity in 'fp'/'capture' mode; in 'int' mode
  it returns the int8 codes (`Coded`) instead of their float values.

  `channels` (weights only): one pair of bounds per output channel (last axis), 'quant' bounds
  of shape (2, out) instead of (2,). `rounding` (weights only, 'quant' mode): learned rounding,
  the code floor((w - l) / s) + h(V) with V from the 'rounding' collection (created from the
  weight and the bounds when that collection is mutable); such a student is baked
  (`ptq.rounding.bake`) before 'int' mode or export.

  Which calibration rule a quantizer gets (e.g. the paper's one-sided DOBI for the attention map
  and the fc2 input) is decided from its name by the calibration code, not here.
  """
  mode: str = "fp"
  bits: int = 4
  channels: bool = False
  rounding: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if self.mode == "fp":
      return x
    if self.mode == "capture":
      self.sow(CALIB, "input", x, reduce_fn=lambda _, new: new, init_fn=lambda: None)
      return x
    shape = (2, x.shape[-1]) if self.channels else (2,)
    bounds = self.variable("quant", BOUNDS, lambda: jnp.broadcast_to(
        jnp.array([-1.0, 1.0], jnp.float32).reshape((2,) + (1,) * (len(shape) - 1)), shape))
    lower, upper = bounds.value[0], bounds.value[1]
    if self.rounding and self.mode == "quant":
      offset = self.variable(ROUNDING, OFFSET,
                             lambda: rounding_offset_init(x, lower, upper, self.bits))
      return soft_round_quant(x, lower, upper, offset.value, self.bits)
    if self.rounding:
      raise ValueError("learned rounding runs in 'quant' mode only: bake it into the weights "
                       "(ptq.rounding.bake) before the integer engine")
    if self.mode == "int":
      return encode(x, lower, upper, self.bits)
    return fake_quant(x, lower, upper, self.bits)


ROTATION = "rotation"  # collection of the run-time input rotations (`rotate_input`)


def rotate_input(module: nn.Module, x: jnp.ndarray) -> jnp.ndarray:
  """x @ R with `module`'s orthogonal 'rotation' matrix R (in, in): a float op in every mode,
  before the input quantizer (as LayerNorm is); the weight holds R^T W (ptq/rotation.py)."""
  eye = lambda: jnp.eye(x.shape[-1], dtype=jnp.float32)
  return linear(x, module.variable(ROTATION, "matrix", eye).value)


class QuantDense(nn.Module):
  """A Dense layer (torch Linear layout transposed) with weight and input-activation quantizers.

  Parameters 'kernel' (in, out) and 'bias' match the official checkpoint's linear layers. With
  `rotate`, the input is first rotated (`rotate_input`).
  """
  features: int
  mode: str = "fp"
  bits: int = 4
  rotate: bool = False
  weight_channels: bool = False  # per-output-channel weight bounds
  rounding: bool = False  # learned weight rounding

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    if self.rotate:
      x = rotate_input(self, x)
    x = FakeQuant(self.mode, self.bits, name="act_quantizer")(x)
    kernel = FakeQuant(self.mode, self.bits, self.weight_channels, self.rounding,
                       name="weight_quantizer")(kernel)
    return _dense(x, kernel) + bias


class _QuantPair(nn.Module):
  """Weight and input quantizers of one of the q/k/v slices of the qkv linear."""
  mode: str
  bits: int
  weight_channels: bool = False
  rounding: bool = False

  def setup(self):
    self.act_quantizer = FakeQuant(self.mode, self.bits)
    self.weight_quantizer = FakeQuant(self.mode, self.bits, self.weight_channels, self.rounding)

  def __call__(self, x: jnp.ndarray, kernel: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
    return _dense(self.act_quantizer(x), self.weight_quantizer(kernel)) + bias


class QuantQKV(nn.Module):
  """The qkv linear, stored whole as in the checkpoint, quantized as three separate linears.

  In 'quant', 'int' (and 'capture') mode rows 0-59 / 60-119 / 120-179 of the torch weight
  (columns of our kernel) are q, k and v, each with its own weight and input quantizer, as in the
  released 2DQuant code. In 'fp' mode it is one matmul, exactly the official network.
  """
  features: int
  mode: str = "fp"
  bits: int = 4
  rotate: bool = False  # one input rotation shared by q, k and v (`rotate_input`)
  weight_channels: bool = False  # per-output-channel weight bounds (each slice its own)
  rounding: bool = False  # learned weight rounding

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> Sequence[jnp.ndarray]:
    dim = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (dim, 3 * self.features))
    bias = self.param("bias", nn.initializers.zeros, (3 * self.features,))
    if self.rotate:
      x = rotate_input(self, x)
    if self.mode == "fp":
      out = x @ kernel + bias
      return tuple(out[..., i * self.features:(i + 1) * self.features] for i in range(3))
    outs = []
    for i, part in enumerate("qkv"):
      sl = slice(i * self.features, (i + 1) * self.features)
      outs.append(_QuantPair(self.mode, self.bits, self.weight_channels, self.rounding,
                             name=part)(x, kernel[:, sl], bias[sl]))
    return tuple(outs)
