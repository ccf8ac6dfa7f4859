"""Orthogonal matrices for rotating quantized tensors: Hadamard (Sylvester, Paley I, Kronecker
products) with random signs, and random orthogonal matrices where no Hadamard matrix is built.

A rotation R (R R^T = I) applied to a linear's input and folded into its weight, (x R)(R^T W) =
x W, spreads an outlier channel over all channels, so a per-tensor quantizer wastes fewer levels
on it. Hadamard matrices spread every channel evenly (all entries +-1/sqrt(n)); random signs
make the spreading differ from layer to layer. SwinIR-light needs orders 60 (= 59 + 1, Paley I)
and 120 (= 2 x 60) for the linears, and 10 for a head, where no Hadamard matrix exists (orders
above 2 are multiples of 4): there a random orthogonal matrix is used.

Pure numpy (float64) for the constructions; the randomness comes from an explicit JAX key.
"""

from __future__ import annotations

import functools

import jax
import numpy as np


def _is_prime(q: int) -> bool:
  return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def sylvester(k: int) -> np.ndarray:
  """The +-1 Hadamard matrix of order 2^k (Sylvester: H_{2n} = [[H, H], [H, -H]])."""
  h = np.ones((1, 1))
  for _ in range(k):
    h = np.block([[h, h], [h, -h]])
  return h


def paley1(q: int) -> np.ndarray:
  """The +-1 Hadamard matrix of order q + 1 for a prime q = 3 mod 4 (Paley construction I).

  With the Legendre symbol chi and Q_ij = chi(j - i) (antisymmetric since chi(-1) = -1),
  H = I + [[0, 1^T], [-1, Q]].
  """
  if not (_is_prime(q) and q % 4 == 3):
    raise ValueError(f"Paley construction I needs a prime q = 3 mod 4, got {q}")
  squares = {(i * i) % q for i in range(1, q)}
  chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)], np.float64)
  idx = np.arange(q)
  s = np.zeros((q + 1, q + 1))
  s[0, 1:] = 1
  s[1:, 0] = -1
  s[1:, 1:] = chi[(idx[None, :] - idx[:, None]) % q]
  return np.eye(q + 1) + s


@functools.lru_cache(maxsize=32)
def _hadamard_pm1(n: int) -> np.ndarray | None:
  """A +-1 Hadamard matrix of order n, or None when n = 2^k (q + 1) has no such factorisation."""
  k = 0
  while True:
    m = n >> k
    if m << k != n or m < 1:
      return None
    if m == 1:
      return sylvester(k)
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
      return np.kron(sylvester(k), paley1(m - 1))
    k += 1


def has_hadamard(n: int) -> bool:
  """Whether `hadamard(n)` can build order n (2^k, or 2^k (q + 1) with q a prime = 3 mod 4)."""
  return n >= 1 and _hadamard_pm1(n) is not None


def hadamard(n: int) -> np.ndarray:
  """The orthogonal (normalised) Hadamard matrix of order n, float64: H H^T = I."""
  h = _hadamard_pm1(n) if n >= 1 else None
  if h is None:
    raise ValueError(f"hadamard: no construction for order {n} (orders 2^k and 2^k (q + 1) with "
                     f"q a prime = 3 mod 4 are built); use random_orthogonal for it")
  return h / np.sqrt(n)


def random_signs(key: jax.Array, n: int) -> np.ndarray:
  """n random +-1 values (float64) from `key`."""
  return np.asarray(jax.random.rademacher(key, (n,)), np.float64)


def random_hadamard(key: jax.Array, n: int) -> np.ndarray:
  """diag(random signs) @ hadamard(n): orthogonal, every entry +-1/sqrt(n)."""
  return random_signs(key, n)[:, None] * hadamard(n)


def random_orthogonal(key: jax.Array, n: int) -> np.ndarray:
  """A random orthogonal matrix (float64): QR of a Gaussian, each column's sign fixed so that R's
  diagonal is positive (which makes the draw uniform over the orthogonal group)."""
  g = np.asarray(jax.random.normal(key, (n, n)), np.float64)
  q, r = np.linalg.qr(g)
  return q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]


def orthogonal(key: jax.Array, n: int) -> np.ndarray:
  """A random-signed Hadamard matrix where one of order n is built, else a random orthogonal one."""
  return random_hadamard(key, n) if has_hadamard(n) else random_orthogonal(key, n)
