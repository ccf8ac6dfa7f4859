"""MATLAB-style bicubic resize: against Set5's official LR, the reference calib LR, invariants."""

from pathlib import Path

import numpy as np
import pytest

from twodquant_jax.data.bicubic import imresize
from twodquant_jax.data.bicubic import resize_matrix
from twodquant_jax.data.images import load_rgb
from twodquant_jax.data.images import mod_crop


def _set5_pairs(benchmarks: Path, scale: int):
  hr_files = sorted((benchmarks / "Set5" / "HR").glob("*.png"))
  assert len(hr_files) == 5
  for hr_path in hr_files:
    hr = mod_crop(load_rgb(hr_path), scale)
    lr = load_rgb(benchmarks / "Set5" / "LR_bicubic" / f"X{scale}" / f"{hr_path.stem}x{scale}.png")
    yield hr_path.stem, hr, lr


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_set5_matches_official_lr_within_two_levels(benchmarks, scale):
  diffs = []
  for stem, hr, lr in _set5_pairs(benchmarks, scale):
    out = imresize(hr, 1.0 / scale)
    assert out.dtype == np.uint8
    assert out.shape == lr.shape, stem
    diffs.append(np.abs(out.astype(np.int16) - lr.astype(np.int16)).ravel())
  diffs = np.concatenate(diffs)
  assert diffs.max() <= 2
  assert np.mean(diffs > 0) < 0.2


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_set5_matlab_exact_reproduces_official_lr(benchmarks, scale):
  # MATLAB keeps uint8 between its two passes; rounding there too gives the official files.
  for stem, hr, lr in _set5_pairs(benchmarks, scale):
    np.testing.assert_array_equal(imresize(hr, 1.0 / scale, matlab_exact=True), lr, err_msg=stem)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_matches_reference_calibration_lr(reference, scale):
  # calib_x{s}.npz holds LR made from its HR crops by BasicSR's imresize (float32, one rounding).
  data = np.load(reference / f"calib_x{scale}.npz")
  hr, lr = data["hr"][:8], data["lr"][:8]
  out = np.stack([imresize(h, 1.0 / scale) for h in hr])
  diff = np.abs(out.astype(np.int16) - lr.astype(np.int16))
  assert diff.max() <= 1
  assert np.mean(diff > 0) < 1e-3


@pytest.mark.parametrize("scale", [1 / 2, 1 / 3, 1 / 4, 2.0, 3.0])
def test_constant_image_stays_constant(scale):
  const_u8 = np.full((37, 29, 3), 137, dtype=np.uint8)
  out = imresize(const_u8, scale)
  assert out.dtype == np.uint8
  assert np.all(out == 137)
  const_f = np.full((37, 29), 0.3, dtype=np.float64)
  out_f = imresize(const_f, scale)
  assert out_f.dtype == np.float64
  np.testing.assert_allclose(out_f, 0.3, rtol=0, atol=1e-12)


def test_float_path_is_not_rounded_and_uint8_path_rounds_it():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, size=(24, 30, 3), dtype=np.uint8)
  out_f = imresize(img.astype(np.float64), 0.25)
  assert np.any(np.abs(out_f - np.round(out_f)) > 1e-3)  # genuinely fractional values
  np.testing.assert_array_equal(imresize(img, 0.25), np.round(np.clip(out_f, 0, 255)))
  out_f32 = imresize(img.astype(np.float32), 0.25)
  assert out_f32.dtype == np.float32


def test_float_path_does_not_clip_overshoot():
  # A sharp step overshoots below 0 / above 1 with the negative lobes of the cubic kernel.
  img = np.zeros((16, 16), dtype=np.float64)
  img[:, 8:] = 1.0
  out = imresize(img, 2.0)
  assert out.min() < 0.0 and out.max() > 1.0


@pytest.mark.parametrize("shape,scale,expected", [
    ((7, 10), 1 / 4, (2, 3)),
    ((255, 256), 1 / 3, (85, 86)),
    ((5, 5), 2.0, (10, 10)),
    ((20, 20), 1 / 4, (5, 5)),
])
def test_output_size_is_ceil(shape, scale, expected):
  assert imresize(np.zeros(shape, dtype=np.uint8), scale).shape == expected


def test_gray_equals_each_channel():
  rng = np.random.default_rng(1)
  img = rng.integers(0, 256, size=(21, 18, 3), dtype=np.uint8)
  out = imresize(img, 1 / 3)
  for c in range(3):
    np.testing.assert_array_equal(imresize(img[..., c], 1 / 3), out[..., c])


@pytest.mark.parametrize("n_in,scale", [(12, 0.25), (13, 1 / 3), (9, 2.0), (1, 0.5)])
def test_resize_matrix_rows_sum_to_one(n_in, scale):
  m = resize_matrix(n_in, int(np.ceil(round(n_in * scale, 9))), scale)
  np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-12)


def test_rejects_bad_input():
  with pytest.raises(ValueError):
    imresize(np.zeros((4, 4, 3, 1), dtype=np.uint8), 0.5)
  with pytest.raises(ValueError):
    imresize(np.zeros((4, 4), dtype=np.int32), 0.5)
  with pytest.raises(ValueError):
    imresize(np.zeros((4, 4), dtype=np.uint8), 0.0)
