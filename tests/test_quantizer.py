"""fake_quant: forward vs SPEC Eq. (1) in numpy; gradients vs the SPEC rule written out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twodquant_jax.nn.quantizer import fake_quant

BITS = (2, 3, 4, 8)
F32 = np.float32
EPS32 = float(np.finfo(np.float32).eps)


def _ref_f64(v, l, u, bits):
  """Eq. (1) in float64 from the float32 inputs, cast to float32 at the end."""
  v, l, u = np.float64(v), np.float64(l), np.float64(u)
  s = (u - l) / (2 ** bits - 1)
  t = (np.clip(v, l, u) - l) / s
  return F32(s * np.rint(t) + l), t


def _ref_f32(v, l, u, bits):
  """Eq. (1) op by op in float32 (as PyTorch computes it): the scale, t = (v_c - l)/s, round(t)."""
  l, u = F32(l), F32(u)
  s = F32((u - l) / F32(2 ** bits - 1))
  t = (np.minimum(np.maximum(v.astype(F32), l), u) - l) / s
  return s, t, np.rint(t)


def _inputs(bits, rng, n=4000):
  """Random values plus values exactly on l and u and beyond them, for random bounds."""
  l = F32(rng.uniform(-3.0, -0.1))
  u = F32(rng.uniform(0.1, 3.0))
  v = (rng.standard_normal(n) * 1.5).astype(F32)
  v[:4] = [l, u, l - 1, u + 1]
  return v, l, u


def _exact_tie_case(bits):
  """Bounds with an exactly representable step s = 1/4, and values exactly at (k + 1/2) s."""
  levels = 2 ** bits - 1
  l = F32(-1.5)
  u = F32(l + levels * 0.25)  # exact: s = (u - l) / levels = 0.25
  k = np.arange(levels, dtype=np.float64)
  v = (l + (k + 0.5) * 0.25).astype(F32)
  return v, l, u, k


@pytest.mark.parametrize("bits", BITS)
def test_forward_matches_eq1_in_float64(bits):
  rng = np.random.default_rng(bits)
  v, l, u = _inputs(bits, rng)
  got = np.asarray(fake_quant(jnp.asarray(v), l, u, bits))
  want, t = _ref_f64(v, l, u, bits)
  # float32 and float64 may round differently where t sits within rounding error of a .5 tie.
  away = np.abs(np.abs(t - np.floor(t)) - 0.5) > 1e-4
  assert away.mean() > 0.99
  tol = 8 * EPS32 * (abs(float(l)) + abs(float(u)))
  np.testing.assert_allclose(got[away], want[away], rtol=0, atol=tol)
  # On the bounds: v = l maps to l, v = u to (about) u; outside, they clip.
  np.testing.assert_allclose(got[:4], [l, u, l, u], rtol=0, atol=tol)


@pytest.mark.parametrize("bits", BITS)
def test_forward_is_float32_op_by_op(bits):
  """Each element equals s * round(t) + l with the float32 s and t of a true IEEE division.

  XLA may fuse the final multiply-add (one rounding instead of two), so either is accepted; the
  level round(t) and the scale must be exact (no reciprocal multiplication).
  """
  rng = np.random.default_rng(10 + bits)
  v, l, u = _inputs(bits, rng, n=200_000)
  got = np.asarray(jax.jit(fake_quant, static_argnums=3)(jnp.asarray(v), l, u, bits))
  s, _, r = _ref_f32(v, l, u, bits)
  separate = (s * r).astype(F32) + l
  fused = (np.float64(s) * np.float64(r) + np.float64(l)).astype(F32)
  assert np.all((got == separate) | (got == fused))


@pytest.mark.parametrize("bits", BITS)
def test_forward_exact_half_ties_round_to_even(bits):
  v, l, u, k = _exact_tie_case(bits)
  got = np.asarray(fake_quant(jnp.asarray(v), l, u, bits))
  r = np.where(k % 2 == 0, k, k + 1)  # (k + 1/2) rounds to the even neighbour
  want = (l + r * 0.25).astype(F32)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got, _ref_f64(v, l, u, bits)[0])


def test_forward_with_constant_bounds_under_jit():
  """Bounds baked into a jitted function as constants still give the true division."""
  v, l, u, _ = _exact_tie_case(4)
  x = np.concatenate([v, np.linspace(-2, 3, 1001, dtype=F32)])
  got = np.asarray(jax.jit(lambda x: fake_quant(x, F32(-1.5), F32(2.25), 4))(x))
  s, _, r = _ref_f32(x, F32(-1.5), F32(2.25), 4)
  np.testing.assert_array_equal(got, (s * r).astype(F32) + F32(-1.5))


def _loss(v, l, u, w, bits):
  return jnp.sum(w * fake_quant(v, l, u, bits))


_grads = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)), static_argnums=4)


def _rule_grads(v, l, u, w, bits):
  """The SPEC rule written out (module doc of quantizer.py): float64 sums of float32 terms."""
  levels = 2 ** bits - 1
  _, t, r = _ref_f32(v, l, u, bits)
  t, r, w = t.astype(np.float64), r.astype(np.float64), w.astype(np.float64)
  dv = w * ((v >= l) & (v <= u))
  dl = np.sum(w * ((v <= l) + (t - r) / levels))
  du = np.sum(w * ((v >= u) + (r - t) / levels))
  return dv, dl, du


@pytest.mark.parametrize("bits", BITS)
def test_gradients_follow_spec_rule(bits):
  rng = np.random.default_rng(20 + bits)
  v, l, u = _inputs(bits, rng)
  v[4:8] = [l, l, u, u]  # more elements exactly on the bounds
  tv, tl, tu, k = _exact_tie_case(bits)
  w = rng.standard_normal(v.shape).astype(F32)
  gv, gl, gu = _grads(v, l, u, w, bits)
  assert gl.shape == () and gu.shape == ()
  dv, dl, du = _rule_grads(v, l, u, w, bits)
  np.testing.assert_allclose(np.asarray(gv), dv, rtol=1e-6, atol=1e-6)
  scale = np.sum(np.abs(w))
  np.testing.assert_allclose(float(gl), dl, rtol=1e-5, atol=1e-6 * scale)
  np.testing.assert_allclose(float(gu), du, rtol=1e-5, atol=1e-6 * scale)
  # On the bounds, both the v path and the bound path receive the gradient.
  on = [0, 1, 4, 5, 6, 7]
  np.testing.assert_allclose(np.asarray(gv)[on], w[on], rtol=1e-6)
  # Exact ties: STE gradients at v = l + (k + 1/2) s, including the t - r = -/+ 1/2 terms.
  ones = jnp.ones(tv.shape, jnp.float32)
  gv, gl, gu = _grads(tv, tl, tu, ones, bits)
  r = np.where(k % 2 == 0, k, k + 1)
  levels = 2 ** bits - 1
  np.testing.assert_allclose(np.asarray(gv), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(gl), np.sum((k + 0.5 - r) / levels), atol=1e-5)
  np.testing.assert_allclose(float(gu), np.sum((r - k - 0.5) / levels), atol=1e-5)


@pytest.mark.parametrize("bits", BITS)
def test_gradients_match_finite_differences_of_ste_surrogate(bits):
  """With round' = 1, v_q = s (t + c) + l with c = round(t) - t held fixed, i.e.
  v_q = clip(v, l, u) + c (u - l) / (2^N - 1): a smooth function of (l, u) away from v = l, u.
  Its central differences in float64 must equal the custom-VJP gradients.
  """
  rng = np.random.default_rng(30 + bits)
  levels = 2 ** bits - 1
  l, u = F32(-1.1), F32(1.7)
  v = (rng.standard_normal(3000) * 1.3).astype(F32)
  v = v[(np.abs(v - l) > 1e-2) & (np.abs(v - u) > 1e-2)]  # clip is smooth near these points
  w = rng.standard_normal(v.shape).astype(F32)
  _, t, r = _ref_f32(v, l, u, bits)
  c = r.astype(np.float64) - t.astype(np.float64)

  def surrogate(lo, hi):
    return np.sum(w * (np.clip(np.float64(v), lo, hi) + c * (hi - lo) / levels))

  h = 1e-4
  fd_l = (surrogate(l + h, u) - surrogate(l - h, u)) / (2 * h)
  fd_u = (surrogate(l, u + h) - surrogate(l, u - h)) / (2 * h)
  fd_v = w * ((v > l) & (v < u))  # d/dv of the surrogate
  gv, gl, gu = _grads(v, l, u, w, bits)
  scale = np.sum(np.abs(w))
  np.testing.assert_allclose(float(gl), fd_l, rtol=1e-5, atol=2e-6 * scale)
  np.testing.assert_allclose(float(gu), fd_u, rtol=1e-5, atol=2e-6 * scale)
  np.testing.assert_allclose(np.asarray(gv), fd_v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", BITS)
def test_jit_and_vmap(bits):
  rng = np.random.default_rng(40 + bits)
  v = jnp.asarray(rng.standard_normal((3, 5, 7)).astype(F32))
  lows = jnp.asarray([-1.0, -0.5, -2.0], jnp.float32)
  highs = jnp.asarray([1.0, 0.7, 0.3], jnp.float32)
  eager = np.stack([np.asarray(fake_quant(v[i], lows[i], highs[i], bits)) for i in range(3)])
  # Compiled code may fuse s * r + l into one multiply-add: up to one rounding apart from eager.
  ulp = 2 * EPS32 * 2.0
  jitted = jax.jit(fake_quant, static_argnums=3)
  np.testing.assert_allclose(np.asarray(jitted(v[0], lows[0], highs[0], bits)), eager[0],
                             rtol=0, atol=ulp)
  batched = jax.jit(jax.vmap(fake_quant, in_axes=(0, 0, 0, None)), static_argnums=3)
  np.testing.assert_allclose(np.asarray(batched(v, lows, highs, bits)), eager, rtol=0, atol=ulp)
  w = jnp.asarray(rng.standard_normal((3, 5, 7)).astype(F32))
  per = [_grads(v[i], lows[i], highs[i], w[i], bits) for i in range(3)]
  grad = jax.grad(_loss, argnums=(0, 1, 2))
  vg = jax.jit(jax.vmap(grad, in_axes=(0, 0, 0, 0, None)), static_argnums=4)(v, lows, highs, w,
                                                                             bits)
  assert vg[1].shape == (3,) and vg[2].shape == (3,)
  for i in range(3):
    for a, b in zip(per[i], vg):
      np.testing.assert_allclose(np.asarray(b[i]), np.asarray(a), rtol=1e-6, atol=1e-6)


def test_shapes_dtype_and_bad_bits():
  x = jnp.zeros((2, 3, 4), jnp.float32)
  y = fake_quant(x, -1.0, 1.0, 4)
  assert y.shape == x.shape and y.dtype == jnp.float32
  for bad in (0, 4.0, True, 17):
    with pytest.raises(ValueError):
      fake_quant(x, -1.0, 1.0, bad)


@pytest.mark.parametrize("rows", [512, 24])  # 512: chunked weight gradient; 24: one dot
def test_linear_gradients_match_the_plain_matmul(rows):
  """nn.layers.linear sums its kernel gradient over row chunks; both gradients must equal those
  of x @ kernel (up to float32 summation order)."""
  from twodquant_jax.nn.layers import linear
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, rows // 2, 12)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((12, 7)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((2, rows // 2, 7)), jnp.float32)
  f = lambda fn: jax.grad(lambda x, k: jnp.sum(jnp.tanh(fn(x, k)) * w), argnums=(0, 1))(x, k)
  (dx, dk), (dx0, dk0) = f(linear), f(lambda a, b: a @ b)
  np.testing.assert_allclose(np.asarray(linear(x, k)), np.asarray(x @ k), rtol=0, atol=0)
  np.testing.assert_allclose(np.asarray(dx), np.asarray(dx0), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dk), np.asarray(dk0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,k,n", [(16, 5, 16), (16, 16, 5)])  # q k^T shape, attn v shape
def test_bmm_gradients_match_the_plain_matmul(m, k, n):
  """nn.layers.bmm computes the b-gradient from a transposed copy of the smaller operand (both
  branches: a narrow as q, g narrow as attn v's output); values and both gradients must equal
  those of a @ b."""
  from twodquant_jax.nn.layers import bmm
  rng = np.random.default_rng(4)
  a = jnp.asarray(rng.standard_normal((3, 2, m, k)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((3, 2, k, n)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 2, m, n)), jnp.float32)
  f = lambda fn: jax.grad(lambda a, b: jnp.sum(jnp.tanh(fn(a, b)) * w), argnums=(0, 1))(a, b)
  (da, db), (da0, db0) = f(bmm), f(lambda a, b: a @ b)
  np.testing.assert_array_equal(np.asarray(bmm(a, b)), np.asarray(a @ b))
  np.testing.assert_allclose(np.asarray(da), np.asarray(da0), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(db), np.asarray(db0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["cpu", "plain"])
def test_matmul_vjp_paths_agree_and_are_taken(path):
  """Both gradient forms of nn.layers.bmm / linear (XLA:CPU's rewrites, the plain matmul) give
  the values and gradients of a @ b; forcing one really traces it (the rewrites are the only
  source of optimization barriers)."""
  from twodquant_jax.nn import layers
  rng = np.random.default_rng(5)
  a = jnp.asarray(rng.standard_normal((3, 2, 16, 5)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((3, 2, 5, 16)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((2, 256, 12)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((12, 7)), jnp.float32)
  loss = lambda fn, u, v: jnp.sum(jnp.tanh(fn(u, v)) ** 2)
  grads = lambda fn, u, v: jax.grad(lambda u, v: loss(fn, u, v), argnums=(0, 1))(u, v)
  for fn, u, v in ((layers.bmm, a, b), (layers.linear, x, k)):
    with layers.matmul_vjps(path):
      out, got = fn(u, v), grads(fn, u, v)
      jaxpr = str(jax.make_jaxpr(lambda u, v: grads(fn, u, v))(u, v))
    assert ("optimization_barrier" in jaxpr) == (path == "cpu"), jaxpr
    np.testing.assert_array_equal(np.asarray(out), np.asarray(u @ v))
    for g, g0 in zip(got, grads(lambda p, q: p @ q, u, v)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="path"):
    with layers.matmul_vjps("gpu"):
      pass


def test_matmul_vjps_follow_the_backend(monkeypatch):
  """'auto': the XLA:CPU rewrites on the CPU backend only, the plain matmul on any other."""
  from twodquant_jax.nn import layers
  a = jnp.ones((2, 4, 3), jnp.float32)
  b = jnp.ones((2, 3, 4), jnp.float32)
  barrier = lambda: "optimization_barrier" in str(jax.make_jaxpr(
      jax.grad(lambda a, b: jnp.sum(layers.bmm(a, b)), argnums=1))(a, b))
  monkeypatch.setattr(layers.jax, "default_backend", lambda: "cpu")
  assert barrier()
  monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
  assert not barrier()
