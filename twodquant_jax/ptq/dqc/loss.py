"""DQC losses: pure functions of the student's and the teacher's outputs and features.

- `reference`: the released code's loss, verbatim semantics (including its (B, B, L, C)
  broadcast of per-sample-normalised features and its extra 1/numel scalings), computed without
  materialising the broadcast;
- `paper`: Eq. 4-6 of the paper, L_O + lambda * L_F.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from twodquant_jax.settings import LOSSES

Array = jnp.ndarray
Aux = dict[str, Any]


def reference_pixel_loss(out_q: Array, out: Array) -> Array:
  """The released code's l_pix: mean|O_q - O| / numel(O_q) * B."""
  numel = out_q.size
  return jnp.mean(jnp.abs(out_q - out)) / numel * out_q.shape[0]


def per_sample_norm(f: Array) -> Array:
  return jnp.sqrt(jnp.sum(jnp.square(f.reshape(f.shape[0], -1)), axis=1))


def reference_feature_term_verbatim(f_q: Array, f: Array, weight: float = 5.0) -> Array:
  """The released code's feature term, literally: materialises the (B, B, L, C) broadcast.

  F / n with F (B, L, C) and n (B, 1, 1, 1) gives out[j, i] = F[i] / n[j]. For tests only: it
  needs B times the feature's memory.
  """
  b = f.shape[0]
  n_q = jax.lax.stop_gradient(per_sample_norm(f_q)).reshape(b, 1, 1, 1)
  n = jax.lax.stop_gradient(per_sample_norm(f)).reshape(b, 1, 1, 1)
  diff = f_q / n_q - f / n
  return weight * jnp.mean(jnp.square(diff)) / diff.size


def reference_feature_term(f_q: Array, f: Array, weight: float = 5.0) -> Array:
  """`reference_feature_term_verbatim` in O(B L C) memory and without cancellation.

  With a_j = 1/n_q,j, c_j = a_j - 1/n_j, d_i = F_q,i - F_i (norms detached):
  sum_{j,i} ||a_j F_q,i - F_i / n_j||^2 = sum_j a_j^2 sum_i ||d_i||^2
      + 2 sum_j a_j c_j sum_i <d_i, F_i> + sum_j c_j^2 sum_i ||F_i||^2,
  every piece of which is small when the student is close to the teacher (expanding the plain
  square instead would subtract numbers of order B^2 to get one of order 1e-3). The norm gap
  n - n_q is taken as -(2 <d, F> + ||d||^2) / (n + n_q), not as a difference of two rounded
  norms, so it stays accurate when F_q is very close to F.
  """
  b = f.shape[0]
  fq2, f2 = f_q.reshape(b, -1), f.reshape(b, -1)
  d = fq2 - f2
  dd = jnp.sum(d * d, axis=1)
  df = jnp.sum(d * f2, axis=1)
  ff = jnp.sum(f2 * f2, axis=1)
  sg = jax.lax.stop_gradient
  n_q, n = sg(per_sample_norm(fq2)), sg(per_sample_norm(f2))
  a = 1.0 / n_q
  c = sg(-(2.0 * df + dd) / (n + n_q)) / (n * n_q)  # (n - n_q) / (n n_q) = a - 1/n
  total = (jnp.sum(a * a) * jnp.sum(dd) + 2.0 * jnp.sum(a * c) * jnp.sum(df)
           + jnp.sum(c * c) * jnp.sum(ff))
  numel = float(b * b * fq2.shape[1])
  return weight * total / numel / numel


def reference_loss(out_q: Array, out: Array, feats_q: Sequence[Array], feats: Sequence[Array],
                   feature_weight: float = 5.0) -> tuple[Array, Aux]:
  """The released code's DQC loss: l_pix + sum of the 4 feature terms (weight 5 there)."""
  l_pix = reference_pixel_loss(out_q, out)
  terms = jnp.stack([reference_feature_term(fq, f, feature_weight)
                     for fq, f in zip(feats_q, feats)])
  l_feature = jnp.sum(terms)
  return l_pix + l_feature, {"l_pix": l_pix, "l_feature_terms": terms, "l_feature": l_feature}


def _safe_norm(x: Array, axis: int) -> Array:
  """L2 norm whose gradient is 0 (not NaN) where the vector is exactly 0."""
  sq = jnp.sum(jnp.square(x), axis=axis)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def paper_loss(out_q: Array, out: Array, feats_q: Sequence[Array], feats: Sequence[Array],
               feature_weight: float = 5.0) -> tuple[Array, Aux]:
  """Paper Eq. 4-6: L_O + lambda * L_F, both averaged over the batch.

  L_O: per-image mean |O - O_q|. L_F: sum over the 4 features of the per-image
  ||F/||F|| - F_q/||F_q|| ||_2 / (C H W). The norms are differentiated (the paper does not
  detach them; the released code's loss does).
  """
  b = out.shape[0]
  l_pix = jnp.mean(jnp.mean(jnp.abs(out - out_q).reshape(b, -1), axis=1))
  terms = []
  for fq, f in zip(feats_q, feats):
    fq2, f2 = fq.reshape(b, -1), f.reshape(b, -1)
    unit = f2 / _safe_norm(f2, 1)[:, None]
    unit_q = fq2 / _safe_norm(fq2, 1)[:, None]
    terms.append(jnp.mean(_safe_norm(unit - unit_q, 1) / f2.shape[1]))
  terms = jnp.stack(terms)
  l_feature = jnp.sum(terms)
  return l_pix + feature_weight * l_feature, {"l_pix": l_pix, "l_feature_terms": terms,
                                              "l_feature": l_feature}


LOSS_FUNCTIONS: dict[str, Callable] = {"reference": reference_loss, "paper": paper_loss}
