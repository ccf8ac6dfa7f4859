"""Compression/speedup ratios from the actual x4 model equal the paper's Table 2."""

import jax
import jax.numpy as jnp
import pytest

from twodquant_jax.nn.swinir import SwinIR
from twodquant_jax.eval import ratios


@pytest.fixture(scope="module")
def x4():
  model = SwinIR(upscale=4)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
  return model, params["params"]


def test_parameter_counts(x4):
  _, params = x4
  c = ratios.param_counts(params)
  assert c["linear_weight"] == 691_200  # qkv, proj, fc1, fc2 weights of the 24 blocks
  assert c["linear_weight"] + c["other"] == 897_228
  assert c["bias_table"] == 24 * 225 * 6


@pytest.mark.parametrize("bits,compression,speedup", [(4, 3.07, 3.99), (3, 3.31, 4.47),
                                                      (2, 3.60, 5.08)])
def test_paper_table2(x4, bits, compression, speedup):
  model, params = x4
  r = ratios.ratios(params, model, bits, (128, 128))
  assert round(r["compression"], 2) == compression
  assert round(r["speedup"], 2) == speedup


def test_mac_counts_by_type(x4):
  model, _ = x4
  macs = ratios.mac_counts(model, 128, 128)
  assert macs == {"linear": 14_344_519_680, "conv": 2_326_855_680, "other": 74_711_040}
  # MACs scale with the number of pixels.
  half = ratios.mac_counts(model, 64, 128)
  assert all(2 * half[k] == macs[k] for k in macs)
