"""Integer matmuls on quantization codes, with the float affine corrections of two-bound quantizers.

A quantized tensor is x = s * q + l with integer codes q in [0, 2^b - 1], s = (u - l) / (2^b - 1)
and l the lower bound (nn/quantizer.fake_quant, same rounding). Any integer shift z of the codes
keeps that form: x = s * (q - z) + (l + s z). For a = s_a q_a + l_a and w = s_w q_w + l_w over K
terms,
  y = s_a s_w Σ q_a q_w + s_a l_w Σ q_a + l_a s_w Σ q_w + K l_a l_w,
whose only O(M N K) part, Σ q_a q_w, runs as `lax.dot_general` on int8 codes with int32 results.

Which codes go into int8 (the offset): we store q' = q - z with the zero point
z = clip(round(-l / s), 2^b - 128, 128), and use l' = l + s z in the formula. The clip keeps q' in
[-128, 127] for every b in 2..8 (so 8-bit codes 0..255 become -128..127: z = 128 is forced there);
where it does not bind, |l'| <= s / 2, so the three correction terms are small next to the integer
one and the float sum does not cancel (with z = 0, K l_a l_w can be 50x the result and the engine
lost ~6 bits against the fake-quant matmul, enough to flip codes at the next quantizer). The integer
sums are exact in float32 while K * 128^2 < 2^24 (K < 1024; SwinIR-light's largest K is 120).

Per-output-channel weight bounds (`SwinIR.weight_channels`) give a kernel (K, N) one s_w, l_w and
z per column: `Coded.scale` and `base` are then (N,) vectors, and every term of the formula
above broadcasts over the output columns unchanged (activations stay per tensor).
"""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp
from jax import lax

from twodquant_jax.nn.quantizer import check_bits, quant_codes, quant_step


def zero_point(lower: jnp.ndarray, step: jnp.ndarray, bits: int) -> jnp.ndarray:
  """z = clip(round(-l / s), 2^b - 128, 128) as float32: the code that stands nearest to 0."""
  if not 2 <= check_bits(bits) <= 8:
    raise ValueError(f"the integer engine supports 2..8 bits, got {bits}")
  return jnp.clip(jnp.round(-lower / step), 2 ** bits - 128, 128)


@flax.struct.dataclass
class Coded:
  """A quantized tensor as int8 codes: value = scale * codes + base (module doc)."""
  codes: jnp.ndarray  # int8 q - z
  scale: jnp.ndarray  # float32 s: 0-d, or (N,) per output column of a weight
  base: jnp.ndarray   # float32 l + s z, shaped as scale

  def swapaxes(self, a: int, b: int) -> "Coded":
    return self.replace(codes=self.codes.swapaxes(a, b))

  def values(self) -> jnp.ndarray:
    """The float tensor the codes stand for (fake_quant's output, up to rounding)."""
    return self.scale * self.codes.astype(jnp.float32) + self.base


def encode(x: jnp.ndarray, lower: jnp.ndarray, upper: jnp.ndarray, bits: int) -> Coded:
  """Quantizes x to int8 codes with bounds [lower, upper] at `bits` bits (fake_quant's rounding)."""
  lower = jnp.asarray(lower, jnp.float32)
  upper = jnp.asarray(upper, jnp.float32)
  s = quant_step(lower, upper, bits)
  z = zero_point(lower, s, bits)
  q = quant_codes(x, lower, upper, bits)
  return Coded(codes=(q - z).astype(jnp.int8), scale=s, base=lower + s * z)


def int_matmul(a: Coded, w: Coded) -> jnp.ndarray:
  """`a.values() @ w.values()` computed on the integer codes; float32 result.

  a: (..., M, K). w: (K, N) (a linear layer's kernel, whose scale and base may be (N,) per
  column), or (..., K, N) with the same leading (batch) dims as a (attention's batched
  matmuls). Returns (..., M, N).
  """
  qa, qw = a.codes, w.codes
  k = qa.shape[-1]
  if qw.ndim == 2:
    dims = (((qa.ndim - 1,), (0,)), ((), ()))
  else:
    if qw.ndim != qa.ndim or qw.shape[:-2] != qa.shape[:-2]:
      raise ValueError(f"int_matmul: batch dims differ, {qa.shape} @ {qw.shape}")
    batch = tuple(range(qa.ndim - 2))
    dims = (((qa.ndim - 1,), (qw.ndim - 2,)), (batch, batch))
  if qw.shape[-2] != k:
    raise ValueError(f"int_matmul: contracting dims differ, {qa.shape} @ {qw.shape}")
  acc = lax.dot_general(qa, qw, dims, preferred_element_type=jnp.int32)  # Σ q_a q_w
  sum_a = jnp.sum(qa, axis=-1, dtype=jnp.int32)[..., None]  # Σ q_a: (..., M, 1)
  sum_w = jnp.sum(qw, axis=-2, dtype=jnp.int32)  # Σ q_w: (N,) or (..., N)
  if qw.ndim > 2:
    sum_w = sum_w[..., None, :]
  f = jnp.float32
  return (a.scale * w.scale * acc.astype(f) + a.scale * w.base * sum_a.astype(f)
          + a.base * w.scale * sum_w.astype(f) + k * a.base * w.base)
