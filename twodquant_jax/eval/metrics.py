"""PSNR and SSIM on the Y channel, exactly as BasicSR/MATLAB compute them (SPEC section 6).

Published SR numbers use this convention (uint8 images, BT.601 Y, ``crop_border = s``, SSIM with
an 11x11 Gaussian window over the valid region); any deviation shifts PSNR by tenths of a dB,
so results are only comparable to the paper when computed this way.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_C1 = (0.01 * 255.0) ** 2
_SSIM_C2 = (0.03 * 255.0) ** 2


def rgb_to_y(img: np.ndarray) -> np.ndarray:
  """RGB in 0..255 (uint8 or float) -> float64 BT.601 luma Y in 16..235 (MATLAB rgb2ycbcr)."""
  img = np.asarray(img)
  if img.ndim < 1 or img.shape[-1] != 3:
    raise ValueError(f"rgb_to_y expects a ...x3 RGB array, got shape {img.shape}.")
  rgb = img.astype(np.float64) / 255.0
  return 16.0 + rgb @ np.array([65.481, 128.553, 24.966], dtype=np.float64)


def _y_pair(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> tuple[np.ndarray, np.ndarray]:
  """Checks shapes, removes ``crop_border`` pixels per side, and returns both Y channels."""
  sr = np.asarray(sr)
  hr = np.asarray(hr)
  if sr.shape != hr.shape:
    raise ValueError(f"SR and HR shapes differ: {sr.shape} vs {hr.shape}.")
  if sr.ndim != 3 or sr.shape[-1] != 3:
    raise ValueError(f"Expected HxWx3 RGB images, got shape {sr.shape}.")
  if crop_border < 0:
    raise ValueError(f"crop_border must be >= 0, got {crop_border}.")
  h, w = sr.shape[:2]
  if h <= 2 * crop_border or w <= 2 * crop_border:
    raise ValueError(f"Images of {h}x{w} leave nothing after crop_border={crop_border}.")
  if crop_border:
    sr = sr[crop_border:-crop_border, crop_border:-crop_border]
    hr = hr[crop_border:-crop_border, crop_border:-crop_border]
  return rgb_to_y(sr), rgb_to_y(hr)


def psnr_y(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> float:
  """PSNR (dB) on Y of two HxWx3 uint8 images after cropping; inf for identical images."""
  y_sr, y_hr = _y_pair(sr, hr, crop_border)
  mse = np.mean((y_sr - y_hr) ** 2)
  if mse == 0:
    return float("inf")
  return float(10.0 * np.log10(255.0 ** 2 / mse))


def _gaussian_1d() -> np.ndarray:
  """The normalised 11-tap Gaussian (sigma 1.5) whose outer product is the SSIM window."""
  t = np.arange(_SSIM_WINDOW, dtype=np.float64) - (_SSIM_WINDOW - 1) / 2.0
  g = np.exp(-(t ** 2) / (2.0 * _SSIM_SIGMA ** 2))
  return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
  """Separable 'valid' filtering of 2-D ``x`` with the window outer(g, g)."""
  rows = sliding_window_view(x, g.size, axis=0) @ g  # (H-10, W)
  return sliding_window_view(rows, g.size, axis=1) @ g  # (H-10, W-10)


def ssim_y(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> float:
  """Mean SSIM on Y of two HxWx3 uint8 images after cropping (BasicSR ``_ssim``).

  Filtering only over the valid region equals BasicSR's cv2.filter2D followed by cropping 5
  pixels per side.
  """
  y_sr, y_hr = _y_pair(sr, hr, crop_border)
  h, w = y_sr.shape
  if h < _SSIM_WINDOW or w < _SSIM_WINDOW:
    raise ValueError(
        f"SSIM needs at least {_SSIM_WINDOW}x{_SSIM_WINDOW} pixels after crop_border="
        f"{crop_border}, got {h}x{w}.")
  g = _gaussian_1d()
  mu1 = _filter_valid(y_sr, g)
  mu2 = _filter_valid(y_hr, g)
  mu1_sq = mu1 * mu1
  mu2_sq = mu2 * mu2
  mu12 = mu1 * mu2
  sigma1_sq = _filter_valid(y_sr * y_sr, g) - mu1_sq
  sigma2_sq = _filter_valid(y_hr * y_hr, g) - mu2_sq
  sigma12 = _filter_valid(y_sr * y_hr, g) - mu12
  ssim_map = ((2.0 * mu12 + _SSIM_C1) * (2.0 * sigma12 + _SSIM_C2)) / (
      (mu1_sq + mu2_sq + _SSIM_C1) * (sigma1_sq + sigma2_sq + _SSIM_C2))
  return float(ssim_map.mean())
