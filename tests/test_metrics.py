"""PSNR/SSIM on Y against independent float64 computations written here from the formulas."""

import math

import numpy as np
import pytest

from twodquant_jax.data.images import load_rgb
from twodquant_jax.data.images import mod_crop
from twodquant_jax.data.images import to_uint8
from twodquant_jax.eval.metrics import psnr_y
from twodquant_jax.eval.metrics import rgb_to_y
from twodquant_jax.eval.metrics import ssim_y

SCALE = 4


# ---- Independent reference implementations (different code paths from the module). ----

def _ref_y(img):
  """BT.601 Y per channel, written out term by term."""
  f = img.astype(np.float64)
  return 16.0 + 65.481 * f[..., 0] / 255.0 + 128.553 * f[..., 1] / 255.0 + 24.966 * f[..., 2] / 255.0


def _ref_crop(img, b):
  h, w = img.shape[:2]
  return img[b:h - b, b:w - b]


def _ref_psnr(sr, hr, b):
  d = _ref_y(_ref_crop(sr, b)) - _ref_y(_ref_crop(hr, b))
  return 10.0 * math.log10(255.0 ** 2 / float(np.sum(d * d) / d.size))


def _ref_window():
  """The 11x11 window built directly in 2-D: exp(-(i^2 + j^2) / (2 sigma^2)), normalised."""
  t = np.arange(11, dtype=np.float64) - 5.0
  w2 = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2.0 * 1.5 ** 2))
  return w2 / w2.sum()


def _ref_filter_shifted_sums(x, win):
  """'Valid' 2-D correlation as a sum of 121 shifted, weighted copies."""
  h, w = x.shape
  out = np.zeros((h - 10, w - 10), dtype=np.float64)
  for di in range(11):
    for dj in range(11):
      out += win[di, dj] * x[di:di + h - 10, dj:dj + w - 10]
  return out


def _ref_ssim_shifted(sr, hr, b):
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  x, y = _ref_y(_ref_crop(sr, b)), _ref_y(_ref_crop(hr, b))
  win = _ref_window()
  mx, my = _ref_filter_shifted_sums(x, win), _ref_filter_shifted_sums(y, win)
  vx = _ref_filter_shifted_sums(x * x, win) - mx * mx
  vy = _ref_filter_shifted_sums(y * y, win) - my * my
  cxy = _ref_filter_shifted_sums(x * y, win) - mx * my
  m = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
  return float(m.mean())


def _ref_ssim_loop(x, y):
  """SSIM of two Y arrays by an explicit loop over windows, with weighted moments per window."""
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  win = _ref_window()
  vals = []
  for i in range(x.shape[0] - 10):
    for j in range(x.shape[1] - 10):
      px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
      mx, my = np.sum(win * px), np.sum(win * py)
      vx = np.sum(win * (px - mx) ** 2)  # centred form: a different formula from E[x^2]-mu^2
      vy = np.sum(win * (py - my) ** 2)
      cxy = np.sum(win * (px - mx) * (py - my))
      vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
  return float(np.mean(vals))


# ---- Tests. ----

@pytest.fixture(scope="module")
def sr_hr_pairs(reference, benchmarks):
  data = np.load(reference / f"parity_x{SCALE}_random.npz")
  pairs = {}
  for name in ("woman", "bird"):
    sr = to_uint8(data[f"{name}_sr"])
    hr = mod_crop(load_rgb(benchmarks / "Set5" / "HR" / f"{name}.png"), SCALE)
    assert sr.shape == hr.shape, name
    pairs[name] = (sr, hr)
  return pairs


@pytest.mark.parametrize("name", ["woman", "bird"])
def test_psnr_matches_independent_computation(sr_hr_pairs, name):
  sr, hr = sr_hr_pairs[name]
  got = psnr_y(sr, hr, crop_border=SCALE)
  assert math.isfinite(got)
  assert got == pytest.approx(_ref_psnr(sr, hr, SCALE), rel=1e-12)
  # The crop matters: the uncropped value is a different number.
  assert psnr_y(sr, hr, crop_border=0) != pytest.approx(got, rel=1e-9)


@pytest.mark.parametrize("name", ["woman", "bird"])
def test_ssim_matches_independent_computation(sr_hr_pairs, name):
  sr, hr = sr_hr_pairs[name]
  got = ssim_y(sr, hr, crop_border=SCALE)
  assert -1.0 <= got < 1.0
  assert got == pytest.approx(_ref_ssim_shifted(sr, hr, SCALE), rel=1e-10, abs=1e-12)


def test_ssim_matches_window_loop_on_crop(sr_hr_pairs):
  sr, hr = sr_hr_pairs["bird"]
  sr_c, hr_c = sr[100:134, 60:90], hr[100:134, 60:90]  # 34x30 -> 26x22 after crop 4
  got = ssim_y(sr_c, hr_c, crop_border=SCALE)
  want = _ref_ssim_loop(_ref_y(sr_c[4:-4, 4:-4]), _ref_y(hr_c[4:-4, 4:-4]))
  assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_identical_images():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, size=(40, 36, 3), dtype=np.uint8)
  assert psnr_y(img, img, crop_border=4) == float("inf")
  assert ssim_y(img, img, crop_border=4) == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_one_grey_level_shift_by_hand():
  # Adding 1 to R, G and B changes Y by (65.481 + 128.553 + 24.966) / 255 = 219 / 255 everywhere.
  rng = np.random.default_rng(1)
  img = rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
  e = 219.0 / 255.0
  expected = 10.0 * math.log10(255.0 ** 2 / e ** 2)
  assert psnr_y(img + np.uint8(1), img, crop_border=2) == pytest.approx(expected, rel=1e-12)


def test_ssim_of_constant_images_by_hand():
  # With zero variance SSIM reduces to the luminance term (2ab + C1) / (a^2 + b^2 + C1).
  a_rgb, b_rgb = (200, 10, 30), (180, 40, 60)
  a = np.broadcast_to(np.array(a_rgb, np.uint8), (30, 30, 3)).copy()
  b = np.broadcast_to(np.array(b_rgb, np.uint8), (30, 30, 3)).copy()
  ya = 16 + (65.481 * 200 + 128.553 * 10 + 24.966 * 30) / 255
  yb = 16 + (65.481 * 180 + 128.553 * 40 + 24.966 * 60) / 255
  c1 = (0.01 * 255) ** 2
  expected = (2 * ya * yb + c1) / (ya ** 2 + yb ** 2 + c1)
  assert expected < 0.999  # the case is not trivially 1
  assert ssim_y(a, b, crop_border=3) == pytest.approx(expected, rel=1e-9)


def test_crop_border_removes_border_differences():
  rng = np.random.default_rng(2)
  hr = rng.integers(0, 256, size=(30, 30, 3), dtype=np.uint8)
  sr = hr.copy()
  sr[:3] = 0
  sr[:, -3:] = 255
  assert psnr_y(sr, hr, crop_border=3) == float("inf")
  assert psnr_y(sr, hr, crop_border=2) < 40.0


def test_rgb_to_y_extremes():
  y = rgb_to_y(np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0]], dtype=np.uint8))
  assert y.dtype == np.float64
  np.testing.assert_allclose(y, [16.0, 235.0, 16.0 + 65.481], rtol=0, atol=1e-12)


def test_errors():
  a = np.zeros((20, 20, 3), np.uint8)
  with pytest.raises(ValueError, match="shape"):
    psnr_y(a, np.zeros((20, 21, 3), np.uint8), crop_border=2)
  with pytest.raises(ValueError, match="shape"):
    ssim_y(a, np.zeros((21, 20, 3), np.uint8), crop_border=2)
  with pytest.raises(ValueError):
    ssim_y(a, a, crop_border=5)  # 10x10 left: smaller than the 11x11 window
  with pytest.raises(ValueError):
    psnr_y(a, a, crop_border=10)
