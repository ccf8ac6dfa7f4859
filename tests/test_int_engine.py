"""The integer engine: int8 matmuls with float corrections equal a float64 reference, its codes are
fake_quant's, and the 'int' network equals the fake-quant network on a real checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twodquant_jax.eval.predict import jitted_apply
from twodquant_jax.formats import bounds_file, convert
from twodquant_jax.nn.intmath import encode, int_matmul
from twodquant_jax.nn.quantizer import fake_quant, quant_codes
from twodquant_jax.nn.swinir import SwinBlock, variable_shapes


def _ref64(x, lo, hi, bits):
  """float64 fake-quant value of x: the codes from the float32 rounding, the rest in float64."""
  q = np.asarray(quant_codes(jnp.asarray(x), lo, hi, bits), np.float64)
  lo64, hi64 = float(np.float32(lo)), float(np.float32(hi))
  return (hi64 - lo64) / (2 ** bits - 1) * q + lo64


@pytest.mark.parametrize("bits", [2, 3, 4, 7, 8])
@pytest.mark.parametrize("batched", [False, True])
def test_int_matmul_equals_float64_reference(bits, batched):
  rng = np.random.default_rng(bits)
  # Bounds far from 0 on one side: the case where uncentred corrections cancel badly.
  la, ua, lw, uw = -2.4, 2.7, -0.05, 0.06
  if batched:
    a = rng.normal(0, 1.2, (3, 2, 17, 60)).astype(np.float32)
    w = rng.normal(0, 0.03, (3, 2, 60, 9)).astype(np.float32)
  else:
    a = rng.normal(0, 1.2, (5, 17, 60)).astype(np.float32)
    w = rng.normal(0, 0.03, (60, 33)).astype(np.float32)
  got = np.asarray(jax.jit(lambda a, w: int_matmul(encode(a, la, ua, bits),
                                                   encode(w, lw, uw, bits)))(a, w))
  want = _ref64(a, la, ua, bits) @ _ref64(w, lw, uw, bits)
  assert got.shape == want.shape and got.dtype == np.float32
  scale = np.abs(_ref64(a, la, ua, bits)) @ np.abs(_ref64(w, lw, uw, bits))
  err = np.abs(got - want) / scale
  assert err.max() < 3e-7, f"relative error {err.max():.2e}"


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_are_fake_quant_codes(bits):
  x = jnp.linspace(-3.0, 4.0, 1001)
  c = encode(x, -2.0, 3.0, bits)
  assert c.codes.dtype == jnp.int8
  np.testing.assert_allclose(c.values(), fake_quant(x, -2.0, 3.0, bits), rtol=0, atol=1e-6)
  q = np.asarray(c.codes, np.int32)
  assert q.max() - q.min() == 2 ** bits - 1  # every level used, none lost to int8 overflow


@pytest.fixture(scope="module")
def random_x4(reference):
  params, _ = convert.load_checkpoint(reference / "swinir_light_x4_random.pth", 4,
                                      variable_shapes(4)["params"])
  quant = bounds_file.load_bounds(reference / "ref2dq_x4_w4_random_b4.json",
                                  variable_shapes(4, "quant", 4)["quant"])
  return params, quant


def parity_crops(reference):
  """Two 16x16 LR crops of the parity images as a float batch (2, 16, 16, 3)."""
  ref = np.load(reference / "parity_x4_random.npz")
  crops = [ref["baby_lr"][8:24, 20:36], ref["bird_lr"][30:46, 30:46]]
  return jnp.asarray(np.stack(crops).astype(np.float32) / 255.0)


@pytest.mark.slow
def test_int_network_equals_fake_quant(reference, random_x4):
  """Random x4 checkpoint, the authors' 4-bit bounds: the whole SwinIR-light in 'int' mode."""
  params, quant = random_x4
  x = parity_crops(reference)
  variables = {"params": params, "quant": quant}
  with jax.default_matmul_precision("highest"):  # as the pipeline: test_packed's compiles serve
    fake = np.asarray(jitted_apply(4, "quant", 4)(variables, x))
    eng = np.asarray(jitted_apply(4, "int", 4)(variables, x))
  diff = np.abs(fake - eng)
  print(f"int engine vs fake-quant: mean {diff.mean():.2e}, max {diff.max():.2e}")
  assert diff.mean() <= 1e-4 and diff.max() <= 1e-2


@pytest.mark.parametrize("bits", [2, 8])
def test_int_block_equals_fake_quant_at_other_bits(random_x4, bits):
  """One shifted Swin block (all 16 quantizers) at 2 and 8 bits (int8 offset), same bounds."""
  params, quant = random_x4
  blk = ("layers_1", "residual_group", "blocks_1")
  p, q = params, quant
  for k in blk:
    p, q = p[k], q[k]
  x = jax.random.normal(jax.random.key(bits), (2, 16 * 16, 60))
  out = {}
  for mode in ("quant", "int"):
    block = SwinBlock(60, 6, 8, 4, 2.0, mode, bits)
    out[mode] = np.asarray(jax.jit(lambda v, x: block.apply(v, x, (16, 16)))(
        {"params": p, "quant": q}, x))
  diff = np.abs(out["quant"] - out["int"])
  assert diff.mean() <= 1e-5 and diff.max() <= 1e-2, (diff.mean(), diff.max())
