"""Evaluation in bucket shapes equals per-size evaluation, for the FP, fake-quant and int models.

Images of different sizes share one compiled canvas, each told its own size (`valid_hw`): the
3x3 convolutions see zeros outside the image and the shifted windows wrap around the image, so
every valid output pixel is the one the image alone gives.
"""

import functools

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twodquant_jax.data.benchmarks import load_benchmark
from twodquant_jax.data.images import to_uint8
from twodquant_jax.eval import metrics
from twodquant_jax.eval import predict as ev
from twodquant_jax.formats import bounds_file, convert
from twodquant_jax.nn.swinir import SwinIR, variable_shapes

ARCH = (("embed_dim", 12), ("depths", (2, 2)), ("num_heads", (2, 2)))
ODD_SIZES = [(7, 5), (33, 77), (129, 65), (16, 40)]


@functools.lru_cache(maxsize=None)
def _perturbed_init(scale: int):
  """(init key, noise key) -> tiny SwinIR params, each perturbed by 0.05 N(0, 1), jitted once per
  scale for every seed. Compiled without LLVM optimisation: this is random test data, run once,
  and XLA's optimised code generation for the PRNG took 9 of its 11 CPU s (eagerly, one compile
  per op and shape, some 20 CPU s per call)."""
  model = SwinIR(upscale=scale, **dict(ARCH))

  def make(init_key, noise_key):
    params = model.init(init_key, jnp.zeros((1, 8, 8, 3)))["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(noise_key, len(leaves))
    leaves = [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, leaves)
  return jax.jit(make, compiler_options={"xla_backend_optimization_level": 0})


def _tiny_variables(scale: int, seed: int = 0) -> dict:
  """Random tiny SwinIR params with every parameter perturbed (no trivial LayerNorm or bias)."""
  return {"params": _perturbed_init(scale)(jax.random.key(seed), jax.random.key(seed + 1))}


def _shrunk_minmax_bounds(scale: int, params: dict, lr: np.ndarray) -> dict:
  """Bounds 10% inside each quantizer's min/max on `lr`: values clip at both ends, and the
  attention map's lower bound is above 0 (masked attention entries quantize to it)."""
  model = SwinIR(upscale=scale, mode="capture", **dict(ARCH))
  _, state = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["calib"]))(
      params, jnp.asarray(lr, jnp.float32) / 255.0)
  flat = flax.traverse_util.flatten_dict(jax.device_get(state["calib"]))
  bounds = {}
  for path, x in flat.items():
    lo, hi = float(np.min(x)), float(np.max(x))
    bounds[path[:-1] + ("bounds",)] = jnp.array([lo + 0.1 * (hi - lo), hi - 0.1 * (hi - lo)],
                                                jnp.float32)
  return flax.traverse_util.unflatten_dict(bounds)


def _predictors(scale, mode, variables, arch=(), **kw):
  fn = ev.jitted_apply(scale, mode, 4, arch)
  per_size = ev.Predictor(fn, scale, variables=variables, **kw)
  bucket = ev.Predictor(fn, scale, variables=variables,
                        bucket_apply=ev.bucket_apply(scale, mode, 4, arch), **kw)
  return per_size, bucket


def _psnr(sr: np.ndarray, hr: np.ndarray, scale: int) -> float:
  return metrics.psnr_y(to_uint8(sr), hr, crop_border=scale)


def _assert_same(got, want, hrs, scale):
  for g, w, hr in zip(got, want, hrs):
    assert g.shape == w.shape
    assert np.abs(g - w).max() <= 1e-5
    assert abs(_psnr(g, hr, scale) - _psnr(w, hr, scale)) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fp", "quant", "int"])
def test_mixed_size_bucket_batch_equals_per_size(mode):
  """Odd sizes in ONE call (one bucket, one batch of mixed sizes) give the per-size outputs."""
  s = 2
  rng = np.random.default_rng(0)
  lrs = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in ODD_SIZES]
  hrs = [rng.integers(0, 256, (h * s, w * s, 3), np.uint8) for h, w in ODD_SIZES]
  variables = _tiny_variables(s)
  if mode != "fp":
    calib = np.concatenate([lrs[2][:64, :64], lrs[1][:32, :64]], axis=0)[None]  # 96x64
    variables["quant"] = _shrunk_minmax_bounds(s, variables["params"], calib)
  per_size, bucket = _predictors(s, mode, variables, ARCH, batch_pixels=None)
  bucket.bucket_batch, bucket.compile_pixels = len(lrs), 10 ** 9  # all in one call
  want, got = per_size.predict(lrs), bucket.predict(lrs)
  assert bucket.compiled_shapes == {(len(lrs), 136, 80, 3)}
  assert len(per_size.compiled_shapes) == len(lrs)
  _assert_same(got, want, hrs, s)


@pytest.mark.slow
def test_canvas_padding_content_does_not_reach_the_image():
  """An image inside a canvas of garbage gives its own outputs; a full-size image with
  valid_hw = the canvas gives the default path's (shifted windows wrap the whole canvas)."""
  s = 3
  variables = _tiny_variables(s, seed=3)
  model = SwinIR(upscale=s, **dict(ARCH))
  rng = np.random.default_rng(1)
  canvas = rng.normal(0, 4, (2, 48, 56, 3)).astype(np.float32)
  image = rng.random((24, 32, 3), np.float32)
  canvas[0, :24, :32] = image
  apply = jax.jit(model.apply)  # one compile per shape (eagerly: one per op and shape)
  out = apply(variables, canvas, valid_hw=np.array([[24, 32], [48, 56]]))
  alone = apply(variables, image[None])
  full = apply(variables, canvas[1:])
  assert np.abs(out[0, :24 * s, :32 * s] - alone[0]).max() <= 1e-5
  assert np.abs(out[1] - full[0]).max() <= 1e-5


@pytest.fixture(scope="module")
def standin(reference):
  params, _ = convert.load_checkpoint(reference / "standin_x4.pth", 4,
                                      variable_shapes(4)["params"])
  return {"params": params}


@pytest.fixture(scope="module")
def small_real_images(benchmarks):
  """Set5 bird (72x72 padded) and Set14 comic (96x64) at x4: two sizes, one bucket."""
  set5 = {im.name: im for im in load_benchmark(benchmarks, "Set5", 4)}
  set14 = {im.name: im for im in load_benchmark(benchmarks, "Set14", 4)}
  return [set5["bird"], set14["comic"]]


@pytest.mark.slow
def test_standin_fp_bucket_equals_per_size(standin, small_real_images):
  per_size, bucket = _predictors(4, "fp", standin)
  lrs = [im.lr for im in small_real_images]
  want, got = per_size.predict(lrs), bucket.predict(lrs)
  _assert_same(got, want, [im.hr for im in small_real_images], 4)
  assert bucket.compile_stats()["compiles"] == len(bucket.buckets) == 1
  assert per_size.compile_stats()["compiles"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["quant", "int"])
def test_real_quantized_bucket_equals_per_size(mode, reference, small_real_images):
  """The authors' 2DQuant bounds (attention lower bounds above 0) on the random x4 model."""
  params, _ = convert.load_checkpoint(reference / "swinir_light_x4_random.pth", 4,
                                      variable_shapes(4)["params"])
  quant = bounds_file.load_bounds(reference / "ref2dq_x4_w4_random_b4.json",
                                  variable_shapes(4, "quant", 4)["quant"])
  per_size, bucket = _predictors(4, mode, {"params": params, "quant": quant})
  lrs = [im.lr for im in small_real_images]
  _assert_same(bucket.predict(lrs), per_size.predict(lrs), [im.hr for im in small_real_images], 4)


@pytest.mark.slow
def test_tiled_bucket_equals_tiled_per_size():
  s = 2
  rng = np.random.default_rng(2)
  lrs = [rng.integers(0, 256, hw + (3,), np.uint8) for hw in [(70, 45), (20, 30)]]
  variables = _tiny_variables(s, seed=5)
  per_size, bucket = _predictors(s, "fp", variables, ARCH, tile=32, tile_overlap=8)
  want, got = per_size.predict(lrs), bucket.predict(lrs)
  for g, w in zip(got, want):
    assert g.shape == w.shape and np.abs(g - w).max() <= 1e-5
  assert all(b[0] <= 32 and b[1] <= 32 for b in bucket.buckets)  # tiles, not whole images


def test_compiles_are_counted_and_shared_per_model_kind():
  s = 3  # a model kind no other test compiles
  variables = _tiny_variables(s, seed=7)
  rng = np.random.default_rng(3)
  lrs = [rng.integers(0, 256, hw + (3,), np.uint8) for hw in [(8, 8), (16, 8), (8, 24)]]
  make = lambda: ev.Predictor(ev.jitted_apply(s, "fp", 4, ARCH), s, variables=variables,
                              bucket_apply=ev.bucket_apply(s, "fp", 4, ARCH),
                              compile_pixels=10 ** 9)
  first = make()
  assert first.plan([lr.shape[:2] for lr in lrs]) == [(16, 24)]
  assert first.compile_stats()["compiles"] == 1 and first.compile_stats()["compile_s"] > 0
  first.predict(lrs)
  assert first.compile_stats()["compiles"] == 1  # planned: nothing new
  second = make()
  second.predict(lrs)
  assert second.compile_stats()["compiles"] == 0  # the same kind's executable is reused


def test_plan_buckets_holds_every_size_within_the_cap():
  rng = np.random.default_rng(4)
  sizes = {(8 * int(h), 8 * int(w)): int(n)
           for h, w, n in zip(rng.integers(1, 40, 30), rng.integers(1, 40, 30),
                              rng.integers(1, 20, 30))}
  for compile_pixels, cap in [(0, 100), (1 << 16, 4), (1 << 16, 8), (10 ** 12, 100)]:
    buckets = ev.plan_buckets(sizes, compile_pixels, cap)
    assert all(any(b[0] >= h and b[1] >= w for b in buckets) for h, w in sizes)
    assert len(buckets) <= cap
  assert len(ev.plan_buckets(sizes, 0, 100)) == len(sizes)  # no merge is free
  biggest = (max(h for h, _ in sizes), max(w for _, w in sizes))
  assert ev.plan_buckets(sizes, 10 ** 12, 100) == [biggest]
