"""FP SwinIR-light parity with the official PyTorch outputs, and its building blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twodquant_jax.formats import convert
from twodquant_jax.eval.predict import Predictor, flip_pad
from twodquant_jax.nn import swinir
from twodquant_jax.nn.swinir import SwinIR


def load_params(reference, scale):
  model = SwinIR(upscale=scale)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
  params, bounds = convert.load_checkpoint(
      reference / f"swinir_light_x{scale}_random.pth", scale, shapes["params"])
  assert bounds == {}
  return model, params


@pytest.mark.parametrize("scale", [pytest.param(2, marks=pytest.mark.slow),
                                   pytest.param(3, marks=pytest.mark.slow), 4])
def test_parity_with_official_outputs(reference, scale):
  """Flip-padded official LR -> our model == official PyTorch output (max abs <= 1e-4)."""
  model, params = load_params(reference, scale)
  ref = np.load(reference / f"parity_x{scale}_random.npz")
  predictor = Predictor(lambda x: model.apply({"params": params}, x), scale)
  names = ("baby", "woman", "bird")
  outs = predictor.predict([ref[f"{n}_lr"] for n in names])
  for name, out in zip(names, outs):
    want = ref[f"{name}_sr"]
    assert out.shape == want.shape
    err = np.abs(out - want).max()
    assert err <= 1e-4, f"x{scale} {name}: max abs diff {err}"


def test_parameter_count_is_swinir_light(reference):
  _, params = load_params(reference, 4)
  n = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params))
  tables = 24 * 225 * 6
  assert n - tables == 897_228  # SPEC section 7: x4 parameters without the bias tables


def test_flip_pad_matches_basicsr_rule():
  img = np.arange(5 * 6 * 1).reshape(5, 6, 1)
  out = flip_pad(img, 8)
  assert out.shape == (8, 8, 1)
  np.testing.assert_array_equal(out[:5, :6], img)
  np.testing.assert_array_equal(out[5:8, :6], img[::-1][:3])  # rows 4, 3, 2
  np.testing.assert_array_equal(out[:, 6:8], out[:, :6][:, ::-1][:, :2])
  same = np.zeros((16, 8, 3))
  assert flip_pad(same, 8).shape == (16, 8, 3)
  tiny = np.arange(2 * 3).reshape(2, 3, 1)  # smaller than half the padding: mirror repeats
  assert flip_pad(tiny, 8).shape == (8, 8, 1)


def test_shift_mask_and_position_index():
  idx = swinir.relative_position_index(8)
  assert idx.shape == (64, 64) and idx.min() == 0 and idx.max() == 15 * 15 - 1
  assert idx[0, 0] == idx[5, 5] == 7 * 15 + 7  # zero offset is the table centre
  mask = swinir.shifted_window_mask(16, 24, 8, 4)
  assert mask.shape == (6, 64, 64)
  assert set(np.unique(mask)) <= {0.0, -100.0}
  assert (mask[0] == 0).all()  # the top-left window is one region
  assert (mask[-1] != 0).any()  # the bottom-right window mixes 4 regions


def test_pixel_shuffle_matches_torch_semantics():
  s, c = 3, 2
  x = np.random.default_rng(0).normal(size=(1, 2, 4, c * s * s)).astype(np.float32)
  out = np.asarray(swinir.pixel_shuffle(jnp.asarray(x), s))
  for h in range(2):
    for w in range(4):
      for ch in range(c):
        for i in range(s):
          for j in range(s):
            assert out[0, h * s + i, w * s + j, ch] == x[0, h, w, ch * s * s + i * s + j]


def test_tiling_stitches_exactly():
  """With a position-wise upscaler, tiled inference must equal whole-image inference exactly:
  this checks tile placement, overlap averaging and cropping (for the network itself tiles see
  less context, which is the documented price of tiling)."""
  s = 3
  fn = lambda x: jnp.repeat(jnp.repeat(x * 2.0 - 0.5, s, axis=1), s, axis=2)
  lr = np.random.default_rng(1).integers(0, 256, (45, 70, 3), np.uint8)
  whole = Predictor(fn, s).predict([lr])[0]
  pred = Predictor(fn, s, tile=24, tile_overlap=8, batch_size=3)
  tiled = pred.predict([lr])[0]
  assert tiled.shape == (45 * s, 70 * s, 3)
  np.testing.assert_allclose(tiled, whole, atol=1e-6)
  assert {shape[1:3] for shape in pred.compiled_shapes} == {(24, 24)}
  with pytest.raises(ValueError, match="multiple of 8"):
    Predictor(fn, s, tile=20)


def test_model_rejects_bad_input_shape(reference):
  model, params = load_params(reference, 4)
  with pytest.raises(ValueError, match="NHWC"):
    model.apply({"params": params}, jnp.zeros((1, 3, 16, 16)))


@pytest.mark.slow
def test_tiny_5x5_image_gives_a_correct_size_result(reference):
  """A 5x5 LR image is flip-padded to 8x8 and cropped back: a (20, 20, 3) finite x4 result."""
  model, params = load_params(reference, 4)
  lr = np.load(reference / "parity_x4_random.npz")["baby_lr"][:5, :5]
  pred = Predictor(lambda x: model.apply({"params": params}, x), 4)
  (sr,) = pred.predict([lr])
  assert sr.shape == (20, 20, 3) and np.isfinite(sr).all()
  assert pred.compiled_shapes == {(1, 8, 8, 3)}
  direct = jax.eval_shape(model.apply, {"params": params},
                          jnp.asarray(lr[None] / 255.0, jnp.float32))
  assert direct.shape == (1, 20, 20, 3)  # the model's own reflect padding handles it too
