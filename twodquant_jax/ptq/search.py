"""Per-tensor bound initialisation: DOBI (SPEC section 4), MinMax and Percentile.

DOBI scores K candidate bound pairs by the quantization error ||x - fake_quant(x, l_i, u_i)||_2 on
the whole tensor and keeps the best. Two interchangeable implementations, selected by `method`:

- 'sorted' (default; exact and fast on CPU): sorts x on the host (numpy). Since the level a value
  rounds to is monotone in the value, every candidate's quantization bins are contiguous runs of
  the sorted tensor, whose edges a bracketed binary search finds with the exact float32 level
  computation of PyTorch (clip, subtract, true divide, round half to even). All candidates' edges
  cut the sorted tensor into elementary segments; one float64 pass gets each segment's count n,
  A = sum(x - c) and B = sum((x - c)^2) about its own first value c (no cancellation), and a
  candidate's error is the sum over segments of B + 2 d A + n d^2 with d = c - q (q: the segment's
  quantized value under that candidate, computed in float32 as PyTorch does: s * j, then + l).
  Cost: one sort plus O(K 2^N log n) search and O(K * segments) scoring, instead of K passes
  over x. The error is exact to float64 rounding (tests: 1e-15 relative to a float64 brute force),
  where PyTorch sums float32 terms: only candidates whose errors agree to ~1e-6 relative could be
  ordered differently. Large tensors are cut into fixed-size pieces (errors add over pieces),
  sorted and scored on threads.
- 'brute' (pure XLA; meant for accelerators and as a cross-check): scans over chunks of candidates,
  vmapped within a chunk, one fused pass over x per chunk. Levels are PyTorch's float32 ones,
  levels, quantized values are float32(s * j) + l as in PyTorch (no fused multiply-add),
  and the squared errors are summed in float64 (64-bit types enabled for the call): exact to
  float64 rounding like 'sorted', so the two give identical bounds on every backend (tested on
  the calibration data; before, float32 sums made near-ties resolve differently on CPU and GPU).
  Called under a caller's trace without 64-bit types, the sums stay float32.

Candidates are computed as the released code does, in float32: step = (max - min) / (2K)
(one-sided 'reference': (max - min) / K), l_i = min + i * step, u_i = max - i * step.

Both methods are pure functions of x. Called eagerly (the calibration loop), 'sorted' runs numpy
directly; under a JAX trace it becomes a `jax.pure_callback` (vmapped sequentially).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from twodquant_jax.nn.quantizer import check_bits, num_levels

DIRECTIONS = ("symmetric", "one_sided")
ONE_SIDED_STEPS = ("paper", "reference")
TIES = ("first", "last")
METHODS = ("sorted", "brute")

# Host pass over sorted data is done in float64 pieces of this many elements (bounds the memory).
_HOST_CHUNK = 1 << 20
# Tensors are sorted and scored in pieces of at least this many elements (on threads when several).
_PIECE = 1 << 20


def _check_args(bits: int, num_candidates: int, direction: str, one_sided_step: str, tie: str,
                method: str) -> None:
  check_bits(bits)
  if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
    raise ValueError(f"num_candidates must be a positive int, got {num_candidates!r}")
  for value, allowed, what in ((direction, DIRECTIONS, "direction"),
                               (one_sided_step, ONE_SIDED_STEPS, "one_sided_step"),
                               (tie, TIES, "tie"), (method, METHODS, "method")):
    if value not in allowed:
      raise ValueError(f"{what} must be one of {allowed}, got {value!r}")


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _host_call(fn: Callable[[np.ndarray], np.ndarray], x, out_size: int) -> jnp.ndarray:
  """Runs a numpy function of x: directly when x is concrete, via pure_callback under a trace."""
  if _is_traced(x):
    out = jax.ShapeDtypeStruct((out_size,), jnp.float32)
    return jax.pure_callback(lambda a: np.asarray(fn(np.asarray(a)), np.float32), out,
                             jnp.asarray(x, jnp.float32), vmap_method="sequential")
  return jnp.asarray(fn(np.asarray(x, np.float32)), jnp.float32)


# ----------------------------------------------------------------------------- candidates

def candidate_bounds_np(mn: np.float32, mx: np.float32, num_candidates: int,
                        direction: str = "symmetric", one_sided_step: str = "paper"
                        ) -> tuple[np.ndarray, np.ndarray]:
  """The K candidate (l_i, u_i), float32, computed op by op as the released PyTorch code does."""
  mn, mx = np.float32(mn), np.float32(mx)
  k = num_candidates
  if direction == "one_sided" and one_sided_step == "reference":
    step = np.float32(mx - mn) / np.float32(k)
  else:
    step = np.float32(mx - mn) / np.float32(2 * k)
  delta = np.arange(k, dtype=np.float32) * np.float32(step)
  uppers = (mx - delta).astype(np.float32)
  if direction == "symmetric":
    lowers = (mn + delta).astype(np.float32)
  else:
    lowers = np.full(k, mn, np.float32)
  return lowers, uppers


def _candidate_bounds_jnp(mn: jnp.ndarray, mx: jnp.ndarray, num_candidates: int, direction: str,
                          one_sided_step: str) -> tuple[jnp.ndarray, jnp.ndarray]:
  """As candidate_bounds_np, under XLA: true division, and no multiply-add contraction."""
  k = num_candidates
  denom = k if (direction == "one_sided" and one_sided_step == "reference") else 2 * k
  width = mx - mn
  step = width / (jnp.float32(denom) + width * jnp.float32(0))  # true division (see quantizer)
  # i * step must be rounded to float32 before the add/subtract, as in PyTorch; compiled into one
  # loop, LLVM contracts mn + i * step into a fused multiply-add (one rounding). Sorting the
  # (already ascending) products is a no-op that XLA does not fuse with elementwise ops, which
  # keeps the product materialised. (An optimization_barrier is removed before fusion on CPU.)
  delta = jax.lax.sort(jnp.arange(k, dtype=jnp.float32) * step)
  uppers = mx - delta
  lowers = mn + delta if direction == "symmetric" else jnp.full((k,), mn, jnp.float32)
  return lowers, uppers


def _pick(errors: np.ndarray | jnp.ndarray, tie: str, xp) -> int:
  """Index of the minimum error: the first ('first', strict <) or last ('last', <=) one.

  Non-finite errors (degenerate candidates, e.g. a zero step) count as +inf; if all are, index 0
  (the min/max pair) is returned.
  """
  errors = xp.where(xp.isnan(errors), xp.inf, errors)
  if tie == "first":
    return xp.argmin(errors)
  return errors.shape[0] - 1 - xp.argmin(errors[::-1])


# ----------------------------------------------------------------------------- 'sorted'

def _level_np(v: np.ndarray, lowers: np.ndarray, uppers: np.ndarray, steps: np.ndarray
              ) -> np.ndarray:
  """round((clip(v, l, u) - l) / s) in float32, exactly as the PyTorch forward computes it."""
  v_c = np.minimum(np.maximum(v, lowers), uppers)
  return np.rint((v_c - lowers) / steps)


def _bin_edges(y: np.ndarray, lowers: np.ndarray, uppers: np.ndarray, steps: np.ndarray,
               levels: int) -> np.ndarray:
  """For sorted y: edges[i, j-1] = first index whose level under candidate i is >= j, j=1..levels.

  The level is monotone in the value, so this is a binary search with the exact float32 level
  predicate. It starts from a bracket around the real-valued threshold l + (j - 1/2) s, widened
  far beyond the float32 rounding error of the level computation (relative 2^-23 in t = (v-l)/s,
  i.e. < (levels + 1) 1.2e-7 in t), so the bracket provably holds the edge and the search
  usually needs a few steps only.
  """
  n = y.shape[0]
  k = lowers.shape[0]
  target = np.broadcast_to(np.arange(1, levels + 1, dtype=np.float32), (k, levels))
  l64, s64 = lowers.astype(np.float64)[:, None], steps.astype(np.float64)[:, None]
  thr = l64 + (target.astype(np.float64) - 0.5) * s64
  margin = 1e-5 * ((levels + 1) * s64 + np.abs(l64) + np.abs(uppers.astype(np.float64)[:, None]))
  lo = np.searchsorted(y, (thr - margin).astype(np.float32), side="left")
  hi = np.searchsorted(y, (thr + margin).astype(np.float32), side="right")
  l, u, s = lowers[:, None], uppers[:, None], steps[:, None]
  while True:
    active = lo < hi
    if not active.any():
      return lo
    mid = (lo + hi) // 2
    ge = _level_np(y[np.minimum(mid, n - 1)], l, u, s) >= target
    hi = np.where(active & ge, mid, hi)
    lo = np.where(active & ~ge, mid + 1, lo)


def _segment_moments(y: np.ndarray, starts: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Counts and float64 moments of the segments [starts[m], starts[m+1]) of sorted y.

  `starts` is strictly increasing with starts[0] == 0; the last segment ends at len(y). Each
  segment is centred on its first value c_m, so A_m = sum(y - c_m) and B_m = sum((y - c_m)^2)
  carry no cancellation. Works in chunks so the float64 temporaries stay small.
  Returns (counts, A, B).
  """
  n = y.shape[0]
  counts = np.diff(np.append(starts, n))
  centers = y[starts].astype(np.float64)
  a = np.zeros(starts.shape[0], np.float64)
  b = np.zeros(starts.shape[0], np.float64)
  for c0 in range(0, n, _HOST_CHUNK):
    c1 = min(c0 + _HOST_CHUNK, n)
    first = int(np.searchsorted(starts, c0, side="right")) - 1
    last = int(np.searchsorted(starts, c1, side="left"))
    local = np.maximum(starts[first:last] - c0, 0)
    z = y[c0:c1].astype(np.float64)
    z -= np.repeat(centers[first:last], np.diff(np.append(local, c1 - c0)))
    a[first:last] += np.add.reduceat(z, local)
    z *= z
    b[first:last] += np.add.reduceat(z, local)
  return counts, a, b


def _sorted_errors(y: np.ndarray, lowers: np.ndarray, uppers: np.ndarray, steps: np.ndarray,
                   levels_q: np.ndarray) -> np.ndarray:
  """Squared quantization error (float64) of every candidate on sorted float32 y.

  levels_q[i, j] is candidate i's quantized value for level j (float64 of the float32 value).
  """
  n = y.shape[0]
  k, num_bins = levels_q.shape
  edges = _bin_edges(y, lowers, uppers, steps, num_bins - 1)  # starts of bins 1..levels
  # Elementary segments: every bin of every candidate is a union of consecutive ones.
  starts = np.unique(np.concatenate([[0], edges.reshape(-1)]))
  starts = starts[starts < n]
  counts, a, b = _segment_moments(y, starts)
  centers = y[starts].astype(np.float64)
  m = starts.shape[0]
  # Candidate i's bin index steps up by one at each of its edges (edges < n are segment starts):
  # count the edges at each segment start, then a running sum gives each segment's bin.
  pos = np.searchsorted(starts, edges)  # == m for edges at n (empty top bins)
  errors = np.empty(k, np.float64)
  block = max(1, min(k, (1 << 22) // (m + 1)))  # bounds the (block, segments) temporaries
  for i0 in range(0, k, block):
    i1 = min(i0 + block, k)
    flat = (pos[i0:i1] + (m + 1) * np.arange(i1 - i0)[:, None]).reshape(-1)
    steps_at = np.bincount(flat, minlength=(i1 - i0) * (m + 1)).reshape(i1 - i0, m + 1)
    bins = np.cumsum(steps_at[:, :m], axis=1)
    # Over a segment, sum (y - q)^2 = B + 2 d A + n d^2 with d = c - q.
    d = centers[None, :] - np.take_along_axis(levels_q[i0:i1], bins, axis=1)
    errors[i0:i1] = np.sum(b + d * (2.0 * a + counts * d), axis=1)
  return errors


def dobi_errors_np(x: np.ndarray, bits: int, num_candidates: int = 100,
                   direction: str = "symmetric", one_sided_step: str = "paper"
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(lowers, uppers, squared errors) of all DOBI candidates on x, by the sorted method (numpy).

  Large tensors are cut into fixed-size pieces (errors add up over pieces), each sorted and scored
  on a thread: memory stays at about one extra copy of x, and all cores are used.
  """
  x = np.asarray(x, np.float32).reshape(-1)
  if x.size == 0:
    raise ValueError("cannot search bounds of an empty tensor")
  lowers, uppers = candidate_bounds_np(np.min(x), np.max(x), num_candidates, direction,
                                       one_sided_step)
  levels = num_levels(bits)
  steps = ((uppers - lowers) / np.float32(levels)).astype(np.float32)
  valid = np.isfinite(steps) & (steps >= np.finfo(np.float32).tiny)
  steps = np.where(valid, steps, np.float32(1))
  # Quantized values q_ij = s_i * j + l_i: float32 product, then float32 sum (PyTorch's order).
  j = np.arange(levels + 1, dtype=np.float32)
  levels_q = ((steps[:, None] * j[None, :]).astype(np.float32)
              + lowers[:, None]).astype(np.float64)

  # Scoring a piece costs O(K 2^N) on top of its size: keep pieces well above that. The size
  # depends only on (K, bits), so results do not depend on the machine.
  piece = max(_PIECE, 64 * num_candidates * (levels + 1))

  def piece_errors(p0: int) -> np.ndarray:
    y = np.sort(x[p0:p0 + piece])
    return _sorted_errors(y, lowers, uppers, steps, levels_q)

  piece_starts = range(0, x.size, piece)
  workers = min(len(piece_starts), os.cpu_count() or 1)
  if workers > 1:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      parts = list(pool.map(piece_errors, piece_starts))
  else:
    parts = [piece_errors(p0) for p0 in piece_starts]
  errors = functools.reduce(np.add, parts)  # fixed order: deterministic
  return lowers, uppers, np.where(valid, errors, np.inf)


def _dobi_sorted_np(x: np.ndarray, bits: int, num_candidates: int, direction: str,
                    one_sided_step: str, tie: str) -> np.ndarray:
  lowers, uppers, errors = dobi_errors_np(x, bits, num_candidates, direction, one_sided_step)
  i = int(_pick(errors, tie, np))
  return np.array([lowers[i], uppers[i]], np.float32)


# ----------------------------------------------------------------------------- 'brute'

@functools.partial(jax.jit, static_argnames=("bits", "num_candidates", "direction",
                                             "one_sided_step", "chunk"))
def dobi_errors_brute(x: jnp.ndarray, bits: int, num_candidates: int = 100,
                      direction: str = "symmetric", one_sided_step: str = "paper",
                      chunk: int = 2) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """(lowers, uppers, squared errors) of all DOBI candidates on x, by brute force under XLA.

  Scans over chunks of `chunk` candidates (vmapped inside a chunk), so memory stays at a few
  copies of x. Each element's level is the float32 PyTorch computation (clip, subtract, true
  divide, round half to even) and its quantized value is float32(s * j) + l (the product
  rounded to float32 before the sum, as in PyTorch and the sorted method).
  With 64-bit types enabled (`dobi_bounds` enables them for concrete inputs) the squared
  differences are summed in float64, so the errors are exact to float64 rounding like the
  sorted method's and both pick the same candidate; otherwise they are float32 sums.
  """
  x = jnp.asarray(x, jnp.float32).reshape(-1)
  lowers, uppers = _candidate_bounds_jnp(jnp.min(x), jnp.max(x), num_candidates, direction,
                                         one_sided_step)
  levels = num_levels(bits)
  steps = uppers - lowers
  steps = steps / (jnp.float32(levels) + steps * jnp.float32(0))  # true division
  valid = jnp.isfinite(steps) & (steps >= jnp.finfo(jnp.float32).tiny)
  safe_steps = jnp.where(valid, steps, jnp.float32(1))
  acc = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
  xw = x.astype(acc)
  k = num_candidates
  padded = -(-k // chunk) * chunk
  pad = lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], padded - k, axis=0)]).reshape(
      (-1, chunk) + a.shape[1:])
  # Padding candidates repeat the last one; their errors are dropped.

  def one(lower, upper, step):
    v_c = jnp.minimum(jnp.maximum(x, lower), upper)
    r = jnp.round((v_c - lower) / (step + v_c * jnp.float32(0)))  # true division
    if acc == jnp.float64:
      # s * r is exact in float64 (24-bit s, integer r < 2^17); rounding it to float32 is
      # PyTorch's float32 product, and the float32 sum follows (no fused multiply-add).
      q = (step.astype(acc) * r.astype(acc)).astype(jnp.float32) + lower
    else:
      q = step * r + lower  # may be contracted to one multiply-add (one ulp)
    return jnp.sum(jnp.square(xw - q.astype(acc)))

  def body(carry, args):
    return carry, jax.vmap(one)(*args)

  _, errors = jax.lax.scan(body, None, (pad(lowers), pad(uppers), pad(safe_steps)))
  errors = jnp.where(valid, errors.reshape(-1)[:k], jnp.inf)
  return lowers, uppers, errors


@functools.partial(jax.jit, static_argnames=("bits", "num_candidates", "direction",
                                             "one_sided_step", "tie"))
def _dobi_brute(x, bits, num_candidates, direction, one_sided_step, tie):
  lowers, uppers, errors = dobi_errors_brute(x, bits, num_candidates, direction, one_sided_step)
  i = _pick(errors, tie, jnp)
  return jnp.stack([lowers[i], uppers[i]])


# ----------------------------------------------------------------------------- public API

def dobi_bounds(x: jnp.ndarray, bits: int, num_candidates: int = 100,
                direction: str = "symmetric", one_sided_step: str = "paper",
                tie: str = "first", method: str = "sorted") -> jnp.ndarray:
  """DOBI bounds [lower, upper] (float32, shape (2,)) of the whole tensor x (SPEC section 4).

  Args:
    x: tensor of any shape (float32).
    bits: static Python int N.
    num_candidates: K search points.
    direction: 'symmetric' (l_i = min + i*step, u_i = max - i*step) or 'one_sided' (l = min).
    one_sided_step: one-sided step (max - min)/(2K) ('paper', Algorithm 1) or (max - min)/K
      ('reference', the released code's unused variant). Ignored for 'symmetric'.
    tie: 'first' keeps the first minimum (released code, strict <), 'last' the last (paper, <=).
    method: 'sorted' (exact, host numpy; fast on CPU) or 'brute' (XLA; for accelerators; exact
      float64 error sums for concrete x, so both give the same bounds).
  """
  _check_args(bits, num_candidates, direction, one_sided_step, tie, method)
  if method == "brute":
    if _is_traced(x):  # float64 sums only if the caller enabled 64-bit types
      return _dobi_brute(x, bits, num_candidates, direction, one_sided_step, tie)
    with jax.enable_x64(True):  # exact (float64) error sums, as the sorted method
      return _dobi_brute(jnp.asarray(x, jnp.float32), bits, num_candidates, direction,
                         one_sided_step, tie)
  fn = functools.partial(_dobi_sorted_np, bits=bits, num_candidates=num_candidates,
                         direction=direction, one_sided_step=one_sided_step, tie=tie)
  return _host_call(fn, x, 2)


def minmax_bounds(x: jnp.ndarray) -> jnp.ndarray:
  """[min, max] of the whole tensor (float32, shape (2,))."""
  x = jnp.asarray(x, jnp.float32)
  return jnp.stack([jnp.min(x), jnp.max(x)])


def percentile_bounds(x: jnp.ndarray, low_pct: float, high_pct: float) -> jnp.ndarray:
  """[low_pct, high_pct] percentiles of the whole tensor (in percent, numpy's linear method).

  Computed on the host by numpy (a partial sort), which is much faster than a full sort under XLA
  on CPU for tensors of tens of millions of elements.
  """
  low_pct, high_pct = float(low_pct), float(high_pct)
  if not 0.0 <= low_pct <= high_pct <= 100.0:
    raise ValueError(f"need 0 <= low_pct <= high_pct <= 100, got {low_pct}, {high_pct}")

  def fn(a: np.ndarray) -> np.ndarray:
    return np.percentile(a.reshape(-1), [low_pct, high_pct]).astype(np.float32)

  return _host_call(fn, x, 2)


# ----------------------------------------------------------------------------- torch float32 norm

# Candidates whose exact error is within a relative margin of the best are re-scored with the
# released code's float32 arithmetic. Its torch.norm drifts from the exact value by about 1e-9
# per element summed into one of its 8 lanes (measured: 4e-4 relative at 6 M elements, 6e-3 at
# 50 M), far more than the gaps between neighbouring candidates near the optimum. The margin is
# four times that drift on the squared error, at least 1e-3 and at most 5e-2.
_TORCH_LANES = 8
_TORCH_DRIFT_PER_ELEMENT = 1e-9


def torch_f32_window(num_elements: int) -> float:
  """Relative margin on the squared error within which float32 accumulation can reorder."""
  drift = 2 * _TORCH_DRIFT_PER_ELEMENT * num_elements / _TORCH_LANES
  return float(min(5e-2, max(1e-3, 4 * drift)))


def torch_f32_norm(d: np.ndarray) -> np.float32:
  """||d||_2 accumulated as PyTorch (2.x, CPU) does for `torch.norm` of a dense float32 tensor:
  squares summed sequentially in 8 float32 lanes over memory order, lanes folded pairwise.

  `d` must be given in PyTorch's memory order. Matches torch.norm to about 1 ulp.
  """
  sq = np.square(np.ascontiguousarray(d, np.float32).reshape(-1))
  m = sq.size // _TORCH_LANES * _TORCH_LANES
  lanes = np.add.reduce(sq[:m].reshape(-1, _TORCH_LANES), axis=0)  # sequential per lane
  while lanes.size > 1:
    half = lanes.size // 2
    lanes = (lanes[:half] + lanes[half:]).astype(np.float32)
  total = np.float32(lanes[0] if lanes.size else 0.0)
  for v in sq[m:]:
    total = np.float32(total + v)
  return np.sqrt(total)


def fake_quant_np(x: np.ndarray, lower: np.float32, upper: np.float32, bits: int) -> np.ndarray:
  """The released code's `quant()` in numpy float32, op by op (clamp, -l, /s, round, *s, +l)."""
  s = np.float32((np.float32(upper) - np.float32(lower)) / np.float32(num_levels(bits)))
  r = np.round((np.clip(x, lower, upper) - np.float32(lower)) / s)
  return (r * s + np.float32(lower)).astype(np.float32)


def dobi_bounds_torch_f32(x_torch_order: np.ndarray, bits: int, num_candidates: int = 100,
                          direction: str = "symmetric", one_sided_step: str = "paper",
                          tie: str = "first") -> np.ndarray:
  """DOBI as the released code computes it, float32 rounding of its error norm included.

  The exact errors (sorted method) rank the candidates; those within `torch_f32_window` of the
  best are re-scored with `torch_f32_norm`, which decides as the authors' code would. Only the
  decision between near-equal candidates can change (checked against their reference bounds).
  `x_torch_order` is the tensor laid out in PyTorch's memory order (the accumulation order).
  """
  _check_args(bits, num_candidates, direction, one_sided_step, tie, "sorted")
  x = np.asarray(x_torch_order, np.float32).reshape(-1)
  lowers, uppers, errors = dobi_errors_np(x, bits, num_candidates, direction, one_sided_step)
  best = np.nanmin(np.where(np.isfinite(errors), errors, np.nan)) if np.isfinite(
      errors).any() else np.inf
  near = np.flatnonzero(errors <= best * (1 + torch_f32_window(x.size)))
  if near.size <= 1:
    i = int(_pick(errors, tie, np))
  else:
    norms = np.array([torch_f32_norm(x - fake_quant_np(x, lowers[j], uppers[j], bits))
                      for j in near], np.float64)
    i = int(near[_pick(norms, tie, np)])
  return np.array([lowers[i], uppers[i]], np.float32)
