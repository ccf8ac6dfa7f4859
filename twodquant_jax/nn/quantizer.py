"""Fake quantization (SPEC section 2, paper Eq. 1) with the released code's gradients.

Bounds are per tensor (0-d) for the paper; per output channel (shape (out,), broadcast against a
(in, out) kernel) with `SwinIR.weight_channels`: the backward sums each bound's gradient over
the elements it quantizes. Learned (AdaRound-style) rounding of weights is at the end.

Forward: v_c = clip(v, l, u); s = (u - l) / (2^N - 1); v_r = round((v_c - l) / s) (half to even);
v_q = s * v_r + l.

Backward: what the released code's autograd gives with round straight-through (identity
gradient) and clip passing the gradient to v where l <= v <= u (0 outside), to l where v <= l and
to u where v >= u, summed over the tensor (so at v == l both v and l receive it). Differentiating
the chain (s, the division, the affine back-map) through those two rules gives, for v_c,
t = (v_c - l) / s and r = round(t), the closed form that the `jax.custom_vjp` implements in one
elementwise pass (cheaper than differentiating op by op, and without its cancellations):
  d v_q / d v = [l <= v <= u],  d v_q / d l = [v <= l] + (t - r) / (2^N - 1),
  d v_q / d u = [v >= u] + (r - t) / (2^N - 1).

Exact division: XLA's algebraic simplifier rewrites `a / c` (c a constant) and `a / broadcast(s)`
into multiplications by the reciprocal, which is not bit-identical to a true division and moves
values across rounding ties. `_true_div` hides the divisor from that rewrite so the forward matches
PyTorch's IEEE division. (XLA on CPU still contracts `s * r + l` into one fused multiply-add, which
can change v_q by one ulp against PyTorch's separate multiply and add.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BOUNDS = "bounds"  # variable name inside each quantizer's 'quant' collection entry
CALIB = "calib"  # collection that 'capture' mode sows quantizer inputs into
MIN_BITS = 1
MAX_BITS = 16


def check_bits(bits: int) -> int:
  """Returns `bits` if it is a Python int in [MIN_BITS, MAX_BITS], else raises ValueError."""
  if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(f"bits must be a Python int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
  return bits


def num_levels(bits: int) -> int:
  """2^N - 1: the number of quantization steps between l and u."""
  return 2 ** check_bits(bits) - 1


def _sum_to_shape(g: jnp.ndarray, shape: tuple[int, ...]) -> jnp.ndarray:
  """Sums a broadcast gradient `g` back to the operand `shape` (the reverse of broadcasting)."""
  lead = g.ndim - len(shape)
  g = jnp.sum(g, axis=tuple(range(lead))) if lead else g
  axes = tuple(i for i, d in enumerate(shape) if d == 1 and g.shape[i] != 1)
  g = jnp.sum(g, axis=axes, keepdims=True) if axes else g
  return g.reshape(shape)


def _true_div(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """IEEE a / b that XLA keeps as a division (see module doc).

  The divisor becomes `b + a * 0`, which equals b for finite a but is neither a constant nor a
  broadcast, so the reciprocal rewrite does not apply. Differentiates as ordinary a / b.
  """
  return a / (b + a * jnp.zeros((), a.dtype))


def quant_step(lower: jnp.ndarray, upper: jnp.ndarray, bits: int) -> jnp.ndarray:
  """s = (u - l) / (2^N - 1), a true float division as in PyTorch."""
  width = upper - lower
  return _true_div(width, jnp.asarray(num_levels(bits), width.dtype))


def _forward(v, lower, upper, bits):
  """(s, t, r): Eq. 1 op by op as PyTorch computes it, up to the rounding; v_q = s * r + l."""
  s = quant_step(lower, upper, bits)
  v_c = jnp.minimum(jnp.maximum(v, lower), upper)
  t = _true_div(v_c - lower, s)
  return s, t, jnp.round(t)  # half to even, as torch.round


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fake_quant(v, lower, upper, bits):
  s, _, r = _forward(v, lower, upper, bits)
  return s * r + lower


def _fake_quant_fwd(v, lower, upper, bits):
  # Only the inputs are kept: the backward recomputes t and r inside its reduction loop, which
  # is cheaper than writing and re-reading a full-size residual (t - r) per quantizer.
  s, _, r = _forward(v, lower, upper, bits)
  return s * r + lower, (v, lower, upper)


def _sums_per_row(operands: tuple[jnp.ndarray, ...]) -> tuple[jnp.ndarray, ...]:
  """Sums of each operand over all its elements, as ONE variadic reduction.

  One XLA reduce over the tuple fuses the elementwise producers of all operands into a single
  pass over memory (three separate sums would each need their operand written out first). The
  sum runs over every axis but the first, then over the first: partial sums per row keep the
  float32 rounding error of a 6 M-element attention map near 1e-6 relative.
  """
  ndim = operands[0].ndim
  zero = tuple(jnp.zeros((), x.dtype) for x in operands)
  rows = jax.lax.reduce(operands, zero, lambda a, b: tuple(x + y for x, y in zip(a, b)),
                        tuple(range(1 if ndim >= 2 else 0, ndim)))
  return tuple(jnp.sum(x) for x in rows)


def _fake_quant_bwd(bits, res, g):
  """The module doc's closed-form gradients: the mask for v, and for the bounds the sums of g
  below l, of g above u and of g * (t - r), computed in one pass over (v, g)."""
  v, lower, upper = res
  zero = jnp.zeros_like(g)
  g_v = jnp.where((v >= lower) & (v <= upper), g, zero)
  _, t, r = _forward(v, lower, upper, bits)
  below, above, resid = jnp.where(v <= lower, g, zero), jnp.where(v >= upper, g, zero), g * (t - r)
  levels = jnp.asarray(num_levels(bits), g.dtype)
  if jnp.shape(lower) == jnp.shape(upper) == ():
    below, above, resid = _sums_per_row((below, above, resid))
    g_l, g_u = below + resid / levels, above - resid / levels
  else:  # bounds broadcast against v (per-channel weights): sum back to each bound's shape
    g_l = _sum_to_shape(below, jnp.shape(lower)) + _sum_to_shape(resid, jnp.shape(lower)) / levels
    g_u = _sum_to_shape(above, jnp.shape(upper)) - _sum_to_shape(resid, jnp.shape(upper)) / levels
  return g_v.astype(v.dtype), g_l.astype(lower.dtype), g_u.astype(upper.dtype)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def _as_float(v, lower, upper, bits: int):
  """Checks `bits`; v in its float dtype (float32 for integers), the bounds in the same dtype."""
  check_bits(bits)
  v = jnp.asarray(v)
  dtype = v.dtype if jnp.issubdtype(v.dtype, jnp.floating) else jnp.float32
  return v.astype(dtype), jnp.asarray(lower, dtype), jnp.asarray(upper, dtype)


def fake_quant(v: jnp.ndarray, lower: jnp.ndarray, upper: jnp.ndarray, bits: int) -> jnp.ndarray:
  """Fake-quantizes `v` to 2^bits levels on [lower, upper] (SPEC Eq. 1), differentiably.

  Args:
    v: tensor of any shape (float32).
    lower, upper: the bounds l < u, 0-d (or broadcastable to v; their gradients are summed back
      to their own shapes, i.e. over the whole tensor for scalars).
    bits: static Python int N.

  Returns:
    v_q with v's shape and dtype. Gradients follow the released code (module doc).
  """
  v, lower, upper = _as_float(v, lower, upper, bits)
  return _fake_quant(v, lower, upper, bits)


def quant_codes(v: jnp.ndarray, lower: jnp.ndarray, upper: jnp.ndarray, bits: int) -> jnp.ndarray:
  """The integer codes r in [0, 2^N - 1] that `fake_quant` rounds to, as floats (no gradient).

  Same operations as `fake_quant`'s forward, so fake_quant(v) == quant_step(l, u, N) * r + l
  (up to the fused multiply-add) with the very same r: what the integer engine computes with.
  """
  v, lower, upper = _as_float(v, lower, upper, bits)
  return _forward(v, lower, upper, bits)[2]


# ----------------------------------------------------------------------------- learned rounding
# AdaRound-style rounding of weights: the code is floor((w - l) / s) plus a learned h in [0, 1],
# h = rectified_sigmoid(offset), clipped to [0, 2^N - 1] so it never leaves the N-bit range.

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound's values)


def rectified_sigmoid(offset: jnp.ndarray) -> jnp.ndarray:
  """h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1): exactly 0 or 1 for large |V|."""
  return jnp.clip(jax.nn.sigmoid(offset) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _floor_t(v, lower, upper, bits):
  """(s, t) with t = (v - l) / s unclipped, the division as `fake_quant` does it."""
  s = quant_step(lower, upper, bits)
  return s, _true_div(v - lower, s)


def rounding_offset_init(v: jnp.ndarray, lower: jnp.ndarray, upper: jnp.ndarray, bits: int
                         ) -> jnp.ndarray:
  """The offsets V with h(V) = frac((v - l) / s): the soft code starts at t itself, so the
  soft-rounded weight starts at the weight (inside [l, u]) and h >= 1/2 where round-to-nearest
  rounds up."""
  v, lower, upper = _as_float(v, lower, upper, bits)
  _, t = _floor_t(v, lower, upper, bits)
  p = (t - jnp.floor(t) - GAMMA) / (ZETA - GAMMA)  # in [1/12, 11/12]: finite logits
  return jnp.log(p) - jnp.log1p(-p)


def soft_round_quant(v: jnp.ndarray, lower: jnp.ndarray, upper: jnp.ndarray,
                     offset: jnp.ndarray, bits: int) -> jnp.ndarray:
  """s * clip(floor(t) + h(V), 0, 2^N - 1) + l, t = (v - l) / s: the weight with learned rounding.

  Differentiable in V and in the bounds (floor is straight-through in t, so for codes inside
  the range the bounds get d/dl = 1 - (h - frac) / (2^N - 1)-type terms as with `fake_quant`;
  a clipped code depends on the bounds through s and l only). No gradient to v (weights fixed).
  """
  v, lower, upper = _as_float(v, lower, upper, bits)
  s, t = _floor_t(jax.lax.stop_gradient(v), lower, upper, bits)
  base = t + jax.lax.stop_gradient(jnp.floor(t) - t)
  codes = jnp.clip(base + rectified_sigmoid(offset), 0.0, float(num_levels(bits)))
  return s * codes + lower


def hard_round_codes(v: jnp.ndarray, lower: jnp.ndarray, upper: jnp.ndarray,
                     offset: jnp.ndarray, bits: int) -> jnp.ndarray:
  """The learned codes clip(floor(t) + [V >= 0], 0, 2^N - 1) (floats): what baking keeps."""
  v, lower, upper = _as_float(v, lower, upper, bits)
  _, t = _floor_t(v, lower, upper, bits)
  up = (jnp.asarray(offset) >= 0).astype(t.dtype)
  return jnp.clip(jnp.floor(t) + up, 0.0, float(num_levels(bits)))
