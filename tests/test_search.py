"""Bound search: DOBI against a plain numpy brute force, MinMax and Percentile against numpy."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twodquant_jax.ptq import search
from twodquant_jax.formats.torch_pickle import load_pth

F32 = np.float32


def _brute_np(x, bits, k=100, direction="symmetric", one_sided_step="paper"):
  """DOBI as the released code runs it: a loop over candidates, float32 fake quantization
  (PyTorch's op order), here with the error summed in float64. Returns (lowers, uppers, errors).
  """
  x = np.asarray(x, F32).reshape(-1)
  mn, mx = x.min(), x.max()
  denom = k if (direction == "one_sided" and one_sided_step == "reference") else 2 * k
  step = F32(mx - mn) / F32(denom)
  lowers, uppers, errors = [], [], []
  for i in range(k):
    lo = mn + F32(i) * step if direction == "symmetric" else mn
    hi = mx - F32(i) * step
    s = F32(hi - lo) / F32(2 ** bits - 1)
    r = np.rint((np.minimum(np.maximum(x, lo), hi) - lo) / s)
    q = F32(s) * r + lo
    lowers.append(lo)
    uppers.append(hi)
    errors.append(np.sum((x.astype(np.float64) - q.astype(np.float64)) ** 2))
  return np.array(lowers, F32), np.array(uppers, F32), np.array(errors)


def _pick(errors, tie):
  if tie == "first":
    return int(np.argmin(errors))
  return len(errors) - 1 - int(np.argmin(errors[::-1]))


def _tensor(kind, rng, n=19_968):  # 312 rows of 64
  if kind == "normal":
    return (rng.standard_normal(n) * 0.7 + 0.3).astype(F32)
  if kind == "heavy":  # Student t with 1.5 degrees of freedom: far outliers
    return rng.standard_t(1.5, n).astype(F32)
  # softmax rows, like a post-softmax attention map
  z = rng.standard_normal((n // 64, 64)) * 2.0
  e = np.exp(z - z.max(axis=1, keepdims=True))
  return (e / e.sum(axis=1, keepdims=True)).astype(F32).reshape(-1, 8, 64)


SEARCHES = [("symmetric", "paper"), ("one_sided", "paper"), ("one_sided", "reference")]


@pytest.mark.parametrize("kind", ["normal", "heavy", "softmax"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dobi_sorted_equals_numpy_brute_force(kind, bits):
  rng = np.random.default_rng(bits * 7 + len(kind))
  x = _tensor(kind, rng)
  for direction, one_sided_step in SEARCHES:
    lowers, uppers, errors = _brute_np(x, bits, 100, direction, one_sided_step)
    _, _, got_errors = search.dobi_errors_np(x, bits, 100, direction, one_sided_step)
    np.testing.assert_allclose(got_errors, errors, rtol=1e-12)
    for tie in ("first", "last"):
      i = _pick(errors, tie)
      got = np.asarray(search.dobi_bounds(jnp.asarray(x), bits, 100, direction, one_sided_step,
                                          tie))
      assert got.dtype == np.float32 and got.shape == (2,)
      np.testing.assert_array_equal(got, [lowers[i], uppers[i]])


@pytest.mark.parametrize("kind", ["normal", "heavy", "softmax"])
def test_dobi_brute_method_agrees(kind):
  """The XLA brute force sums float32 errors: it must pick the same candidate unless the best
  two are within its rounding (checked against the float64 reference errors)."""
  x = _tensor(kind, np.random.default_rng(100 + len(kind))).reshape(-1)  # one shape: one compile
  for bits in (2, 4):
    for direction, one_sided_step in SEARCHES[:2]:
      lowers, uppers, errors = _brute_np(x, bits, 100, direction, one_sided_step)
      got_l, got_u, got_errors = search.dobi_errors_brute(jnp.asarray(x), bits, 100, direction,
                                                          one_sided_step)
      np.testing.assert_array_equal(np.asarray(got_l), lowers)
      np.testing.assert_array_equal(np.asarray(got_u), uppers)
      np.testing.assert_allclose(np.asarray(got_errors), errors, rtol=1e-5)
      i, j = _pick(errors, "first"), _pick(np.asarray(got_errors), "first")
      assert j == i or errors[j] <= errors[i] * (1 + 1e-5)


def test_dobi_pieces_and_chunks(monkeypatch):
  """Tensors cut into pieces (scored on threads) and moments in chunks give the same errors."""
  x = _tensor("heavy", np.random.default_rng(5), n=30_001)
  monkeypatch.setattr(search, "_PIECE", 4096)  # K = 10 at 2 or 3 bits: pieces of 4096 or 5120
  monkeypatch.setattr(search, "_HOST_CHUNK", 1000)
  for bits in (2, 3):
    lowers, uppers, want = _brute_np(x, bits, k=10)
    _, _, got = search.dobi_errors_np(x, bits, 10)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    i = _pick(want, "last")
    np.testing.assert_array_equal(np.asarray(search.dobi_bounds(x, bits, 10, tie="last")),
                                  [lowers[i], uppers[i]])


@pytest.mark.parametrize("method", search.METHODS)
def test_exact_tie_first_vs_last(method):
  # Symmetric, K = 2, bits = 2, range [0, 12]: candidates [0, 12] (grid 0, 4, 8, 12) and [3, 9]
  # (grid 3, 5, 7, 9). Six 6s cost 6 * 2^2 = 24 on the first; on the second 0 and 12 clip
  # (3^2 + 3^2) and each 6 costs 1: 24 as well. All of it is exact in float32.
  x = np.array([0, 12, 6, 6, 6, 6, 6, 6], F32)
  _, _, errors = _brute_np(x, 2, k=2)
  np.testing.assert_array_equal(errors, [24.0, 24.0])
  first = search.dobi_bounds(x, 2, 2, tie="first", method=method)
  last = search.dobi_bounds(x, 2, 2, tie="last", method=method)
  np.testing.assert_array_equal(np.asarray(first), [0, 12])
  np.testing.assert_array_equal(np.asarray(last), [3, 9])
  # One-sided, K = 2: [0, 12] (grid 0, 4, 8, 12) vs [0, 9] (grid 0, 3, 6, 9): three 2s cost 3 * 4
  # on the first; on the second 12 clips (9) and each 2 costs 1: 12 both.
  y = np.array([0, 12, 2, 2, 2], F32)
  _, _, errors = _brute_np(y, 2, k=2, direction="one_sided")
  np.testing.assert_array_equal(errors, [12.0, 12.0])
  for tie, want in (("first", [0, 12]), ("last", [0, 9])):
    got = search.dobi_bounds(y, 2, 2, "one_sided", tie=tie, method=method)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_dobi_under_jit_and_vmap():
  rng = np.random.default_rng(9)
  xs = rng.standard_normal((3, 500)).astype(F32)
  eager = np.stack([np.asarray(search.dobi_bounds(x, 4)) for x in xs])
  jitted = jax.jit(lambda x: search.dobi_bounds(x, 4))
  np.testing.assert_array_equal(np.asarray(jitted(xs[0])), eager[0])
  np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(jitted))(xs)), eager)
  brute = jax.vmap(lambda x: search.dobi_bounds(x, 4, method="brute"))
  np.testing.assert_array_equal(np.asarray(brute(xs)), eager)


def test_dobi_constant_tensor_and_bad_args():
  x = np.full((4, 4), 0.5, F32)
  for method in search.METHODS:
    np.testing.assert_array_equal(np.asarray(search.dobi_bounds(x, 4, method=method)), [0.5, 0.5])
  with pytest.raises(ValueError):
    search.dobi_bounds(x, 4, direction="both")
  with pytest.raises(ValueError):
    search.dobi_bounds(x, 4, tie="middle")
  with pytest.raises(ValueError):
    search.dobi_bounds(x, 4, num_candidates=0)
  with pytest.raises(ValueError):
    search.dobi_bounds(x, 4, method="fast")


def _weight(state, name):
  module = name[: -len(".weight_quantizer")]
  parts = module.split(".")
  if parts[-2] == "qkv":  # q, k, v: rows 0-59, 60-119, 120-179 of the official qkv weight
    i = "qkv".index(parts[-1])
    return np.asarray(state[".".join(parts[:-1]) + ".weight"])[60 * i:60 * (i + 1)]
  return np.asarray(state[module + ".weight"])


@pytest.mark.parametrize("ref", ["ref2dq_x4_w4_random_b4", "ref2dq_x2_w2_random_b4",
                                 "ref2dq_x3_w3_random_b4"])
def test_dobi_weight_bounds_match_authors_code(reference, ref):
  """Weight quantizers see the weight itself: their DOBI bounds (symmetric, K = 100, first
  minimum) must be the authors' to float32 precision."""
  d = json.loads((reference / f"{ref}.json").read_text())
  state = load_pth(reference / d["checkpoint"])
  state = state.get("params", state)
  names = [n for n in d["bounds"] if n.endswith("weight_quantizer")]
  assert len(names) == 144
  for name in names:
    got = np.asarray(search.dobi_bounds(_weight(state, name), d["bit"], tie="first"))
    np.testing.assert_allclose(got, d["bounds"][name], rtol=1e-6, err_msg=name)


def test_minmax_and_percentile_bounds():
  rng = np.random.default_rng(11)
  x = rng.standard_t(3, (40, 50)).astype(F32)
  np.testing.assert_array_equal(np.asarray(search.minmax_bounds(x)), [x.min(), x.max()])
  for lo, hi in ((0.1, 99.9), (0.01, 99.99), (0.0, 100.0), (25.0, 75.0)):
    want = np.percentile(x, [lo, hi]).astype(F32)
    np.testing.assert_allclose(np.asarray(search.percentile_bounds(x, lo, hi)), want, rtol=1e-6)
    got = jax.jit(lambda x: search.percentile_bounds(x, lo, hi))(x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
  # numpy's linear interpolation: the 10th percentile of 0..10 is 1, of 0..9 is 0.9.
  np.testing.assert_allclose(np.asarray(search.percentile_bounds(np.arange(11, dtype=F32),
                                                                 10, 90)), [1, 9])
  np.testing.assert_allclose(np.asarray(search.percentile_bounds(np.arange(10, dtype=F32),
                                                                 10, 90)), [0.9, 8.1], rtol=1e-6)
  with pytest.raises(ValueError):
    search.percentile_bounds(x, 90, 10)
