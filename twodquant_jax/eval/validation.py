"""Held-out validation during DQC: a few training-distribution images (never a test set),
scored by the fake-quantized model, so a long DQC run shows whether the bounds still improve."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from twodquant_jax.data.bicubic import imresize
from twodquant_jax.data.images import load_rgb, mod_crop, to_uint8
from twodquant_jax.data.patches import IMAGE_EXTENSIONS
from twodquant_jax.eval.metrics import psnr_y
from twodquant_jax.eval.predict import flip_pad, jitted_apply
from twodquant_jax.nn.swinir import SwinIR


def _arch(model: SwinIR) -> tuple:
  """The SwinIR attributes that differ from SwinIR-light's (a tiny test network)."""
  light = SwinIR()
  return tuple((k, getattr(model, k)) for k in ("embed_dim", "depths", "num_heads")
               if getattr(model, k) != getattr(light, k))


def load_validation_images(root: str | Path, scale: int, num: int, crop: int
                           ) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """Up to `num` held-out (name, lr, hr) pairs from HR images in `root` (or `root`/HR).

  HR is center-cropped to `crop` (rounded down to a multiple of 8*scale; 0 = mod-crop only),
  so one compiled forward serves every image; LR is the MATLAB-style bicubic downscale.
  """
  root = Path(root)
  folder = root / "HR" if (root / "HR").is_dir() else root
  if not folder.is_dir():
    raise FileNotFoundError(f"config.dqc.val_root: no such folder {folder}")
  files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)[:num]
  if not files:
    raise FileNotFoundError(f"config.dqc.val_root: no images in {folder}")
  out = []
  for p in files:
    hr = mod_crop(load_rgb(p), scale)
    if crop:
      side = (min(crop, *hr.shape[:2]) // (8 * scale)) * 8 * scale
      if side == 0:
        continue
      y, x = (hr.shape[0] - side) // 2, (hr.shape[1] - side) // 2
      hr = hr[y:y + side, x:x + side]
    out.append((p.stem, imresize(hr, 1.0 / scale), hr))
  return out


def validate_psnr(params: Mapping, quant: Mapping, images: Sequence[tuple[str, np.ndarray,
                                                                          np.ndarray]],
                  model: SwinIR) -> float:
  """Mean PSNR (Y, crop border = scale) of the fake-quantized `model` on held-out images."""
  scale = model.upscale
  sr_fn = jitted_apply(scale, "quant", model.bits, _arch(model))
  psnrs = []
  for _, lr, hr in images:
    x = flip_pad(lr.astype(np.float32) / 255.0)[None]
    sr = np.asarray(sr_fn({"params": params, "quant": quant}, x))[0, :hr.shape[0], :hr.shape[1]]
    psnrs.append(psnr_y(to_uint8(sr), hr, crop_border=scale))
  return float(np.mean(psnrs))
