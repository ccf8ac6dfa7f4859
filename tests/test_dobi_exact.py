"""DOBI's two searches give identical bounds on real data, so bounds do not depend on the backend
(the default is 'brute' on GPU, 'sorted' on CPU)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twodquant_jax.formats import convert
from twodquant_jax.nn.swinir import SwinIR
from twodquant_jax.ptq import search
from twodquant_jax.ptq.dobi import CalibSettings, bounds_for, iter_captured

# A subset, to keep the brute force fast on 2 CPU cores: every quantizer of the first Swin
# block (16 of the 384: every kind of quantizer, attention map included).
SUBSET = re.compile(r"^layers\.0\.residual_group\.blocks\.0\.")


@pytest.fixture(scope="module")
def captured(reference):
  shapes = jax.eval_shape(lambda: SwinIR(upscale=4).init(jax.random.key(0),
                                                         jnp.zeros((1, 8, 8, 3))))
  params, _ = convert.load_checkpoint(reference / "swinir_light_x4_random.pth", 4,
                                      shapes["params"])
  lr = np.load(reference / "calib_x4.npz")["lr"][:4]
  _, inputs, _ = next(iter_captured(params, 4, lr))
  subset = {k: np.asarray(v) for k, v in inputs.items() if SUBSET.search(k)}
  assert len(subset) == 16, sorted(subset)
  return subset


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_brute_and_sorted_bounds_are_identical(captured, bits):
  sorted_cfg = CalibSettings(strategy="paper", search="sorted")
  brute_cfg = CalibSettings(strategy="paper", search="brute")
  differ = []
  for name, x in sorted(captured.items()):
    a = np.asarray(bounds_for(x, name, bits, sorted_cfg))
    b = np.asarray(bounds_for(x, name, bits, brute_cfg))
    if not np.array_equal(a, b):
      differ.append((name, a.tolist(), b.tolist()))
  assert not differ, differ


def test_brute_errors_are_float64_exact():
  """With float64 sums the brute errors equal the sorted method's to float64 rounding (float32
  sums are ~1e-7 off: enough to reorder near-ties)."""
  rng = np.random.default_rng(0)
  x = (rng.standard_t(2.0, 300_000) * 0.3).astype(np.float32)
  for bits in (2, 4):
    _, _, want = search.dobi_errors_np(x, bits, 100)
    with jax.enable_x64(True):
      _, _, got = search.dobi_errors_brute(jnp.asarray(x), bits, 100)
      got = np.asarray(got)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12)
