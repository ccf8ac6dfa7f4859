"""Statistics of the FP tensors the quantizers see on the calibration batch.

What the report figures show about the bounds (paper Fig. 4 and 5): a histogram of some
quantizers' FP tensors, and for every quantizer where its lower and upper bound fall in that
tensor's distribution. They come from the same capture pass as the bound search
(`dobi.iter_captured`), so the pipeline computes them while it holds the FP params and the
calibration batch, and hands the numbers to the report.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from twodquant_jax.ptq import dobi

HIST_BINS = 200


@jax.jit
def bound_fractions(x: jnp.ndarray, lowers: jnp.ndarray, uppers: jnp.ndarray
                    ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Share of the elements of x below each lower bound (clipped up) and at or below each upper
  bound (not clipped down): the bounds' percentiles, exact integer counts."""
  flat = x.reshape(-1)
  below = jax.lax.map(lambda v: jnp.sum(flat < v, dtype=jnp.int32), lowers)
  upto = jax.lax.map(lambda v: jnp.sum(flat <= v, dtype=jnp.int32), uppers)
  return below.astype(jnp.float32) / flat.size, upto.astype(jnp.float32) / flat.size


def tensor_stats(params: Mapping, scale: int, lr: np.ndarray,
                 bounds: Mapping[str, Mapping[str, Sequence[float]]],
                 hist_names: Iterable[str], hist_bounds: Mapping | None = None
                 ) -> tuple[dict, dict]:
  """One streamed pass over the captured FP tensors.

  Returns (hists, percentiles): hists[name] = {'counts', 'edges', 'min', 'max', 'numel'} for
  `hist_names` (bins span the data and every bound of `hist_bounds`, default `bounds`);
  percentiles[method][name] = (percentile of the lower bound, of the upper bound) for the
  methods of `bounds`: the share (%) of elements below l (clipped up), and at or below u.
  """
  hist_bounds = bounds if hist_bounds is None else hist_bounds
  hist_names = set(hist_names)
  hists: dict[str, dict] = {}
  pct: dict[str, dict[str, tuple[float, float]]] = {m: {} for m in bounds}
  for _, captured, _ in dobi.iter_captured(params, scale, lr):
    for name, x in captured.items():
      methods = [m for m in bounds if name in bounds[m]]
      if methods:
        below, upto = bound_fractions(x, jnp.asarray([bounds[m][name][0] for m in methods]),
                                      jnp.asarray([bounds[m][name][1] for m in methods]))
        below, upto = np.asarray(below) * 100.0, np.asarray(upto) * 100.0
        for k, m in enumerate(methods):
          pct[m][name] = (float(below[k]), float(upto[k]))
      if name in hist_names:
        hists[name] = _histogram(x, [b[name] for b in hist_bounds.values() if name in b])
    del captured
  return hists, pct


def _histogram(x: jnp.ndarray, bounds: Sequence[Sequence[float]]) -> dict:
  """HIST_BINS bins over the data and the bounds (2 % margin), so every bound line lands on the
  plot even where it lies outside the data."""
  lo, hi = float(jnp.min(x)), float(jnp.max(x))
  span = [lo, hi] + [v for b in bounds for v in b[:2]]
  a, b = min(span), max(span)
  pad = 0.02 * (b - a) if b > a else 1e-3
  counts, edges = jnp.histogram(x.reshape(-1), bins=HIST_BINS, range=(a - pad, b + pad))
  return {"counts": np.asarray(counts), "edges": np.asarray(edges), "min": lo, "max": hi,
          "numel": int(x.size)}
