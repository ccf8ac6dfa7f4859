"""Image file I/O and the small pixel conversions used by evaluation and calibration.

All images are numpy HxWx3 uint8 RGB arrays at the I/O boundary, so metrics and resizing see
one layout no matter how a PNG was stored (grayscale, palette, alpha, 16-bit, 1-bit).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union
import zlib

from absl import logging
import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

PathLike = Union[str, os.PathLike]

# File types read everywhere images are listed (benchmarks, calibration, validation).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def skipped_line(files: Sequence[PathLike], what: str, limit: int = 3) -> str:
  """One short line naming up to `limit` skipped files and how many more (for the log)."""
  names = [Path(f).name for f in files]
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return f"skipped {len(names)} {what}: {', '.join(names[:limit])}{more}"


# Modes PIL can convert to RGB itself without any question of value range.
_PIL_TO_RGB_MODES = ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La")


def check_min_size(img: np.ndarray, min_hw: Union[int, Sequence[int]], what: str) -> None:
  """Raises ValueError naming ``what`` when ``img`` is smaller than ``min_hw`` (H, W)."""
  if isinstance(min_hw, (int, np.integer)):
    min_h = min_w = int(min_hw)
  else:
    min_h, min_w = (int(v) for v in min_hw)
  h, w = img.shape[:2]
  if h < min_h or w < min_w:
    raise ValueError(
        f"{what} is {h}x{w} (HxW), smaller than the minimum {min_h}x{min_w} it needs.")


def _sixteen_bit_to_uint8(arr: np.ndarray) -> np.ndarray:
  """Maps 0..65535 to 0..255 with rounding (values outside that range are clipped)."""
  arr = np.clip(arr.astype(np.float64), 0.0, 65535.0)
  return np.round(arr * (255.0 / 65535.0)).astype(np.uint8)


def _pil_to_rgb(img: Image.Image, path: PathLike) -> np.ndarray:
  """Converts a loaded PIL image of any common mode to HxWx3 uint8 RGB."""
  mode = img.mode
  if mode == "RGB":
    return np.asarray(img, dtype=np.uint8)
  if mode == "RGBA":
    note = "dropped the alpha channel"
    arr = np.asarray(img, dtype=np.uint8)[..., :3]
  elif mode in ("L", "LA", "1"):
    note = {"L": "replicated grayscale to RGB",
            "LA": "dropped the alpha channel and replicated grayscale to RGB",
            "1": "mapped 1-bit 0/1 to 0/255 and replicated to RGB"}[mode]
    gray = np.asarray(img.convert("L"), dtype=np.uint8)
    arr = np.repeat(gray[..., None], 3, axis=-1)
  elif mode in ("P", "PA"):
    note = "expanded the palette to RGB (any transparency dropped)"
    arr = np.asarray(img.convert("RGBA"), dtype=np.uint8)[..., :3]
  elif mode.startswith("I;16") or mode == "I":
    note = "scaled 16-bit values 0..65535 to 0..255 and replicated to RGB"
    gray = _sixteen_bit_to_uint8(np.asarray(img))
    arr = np.repeat(gray[..., None], 3, axis=-1)
  elif mode in _PIL_TO_RGB_MODES:
    note = f"converted {mode} to RGB with PIL"
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
  else:
    raise ValueError(f"Unsupported image mode {mode!r} in {path}.")
  logging.info("load_rgb: %s has mode %s: %s.", path, mode, note)
  return np.ascontiguousarray(arr)


def load_rgb(path: PathLike, min_hw: Union[int, Sequence[int], None] = None) -> np.ndarray:
  """Reads an image file as HxWx3 uint8 RGB, converting other modes, with clear errors.

  Raises FileNotFoundError for a missing file and ValueError (naming the path) for a file that
  is not an image, is truncated or corrupt, or is smaller than ``min_hw``.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"Image file not found: {path}")
  try:
    with Image.open(path) as img:
      img.load()  # decode now so truncation is reported here, not later
      arr = _pil_to_rgb(img, path)
  except UnidentifiedImageError as e:
    raise ValueError(f"Not a readable image file: {path} ({e})") from e
  except (OSError, SyntaxError, EOFError, zlib.error) as e:
    raise ValueError(f"Truncated or corrupt image file: {path} ({e})") from e
  if arr.ndim != 3 or arr.shape[-1] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
    raise ValueError(f"Image {path} decoded to an unexpected shape {arr.shape}.")
  if min_hw is not None:
    check_min_size(arr, min_hw, f"Image {path}")
  return arr


def save_png(path: PathLike, img: np.ndarray) -> None:
  """Writes an HxWx3 uint8 array as a PNG, creating parent folders."""
  img = np.asarray(img)
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(
        f"save_png expects an HxWx3 uint8 array, got shape {img.shape} dtype {img.dtype} "
        f"(for {path}).")
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(img, mode="RGB").save(path, format="PNG")


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
  """Crops H and W down to multiples of ``scale``, keeping the top-left corner."""
  if int(scale) != scale or scale < 1:
    raise ValueError(f"mod_crop scale must be a positive integer, got {scale}.")
  scale = int(scale)
  h, w = img.shape[:2]
  return img[:h - h % scale, :w - w % scale, ...]


def to_uint8(x: np.ndarray) -> np.ndarray:
  """Float [0, 1] -> uint8: clip, scale by 255, round half to even (BasicSR's tensor2img).

  The arithmetic stays in the input's float dtype (float32 for network outputs), like
  BasicSR's ``(x.clamp(0, 1) * 255).round()`` on a float32 tensor.
  """
  x = np.asarray(x)
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"to_uint8 expects a float array in [0, 1], got {x.dtype}.")
  scaled = np.clip(x, 0, 1) * x.dtype.type(255.0)
  return np.round(scaled).astype(np.uint8)
