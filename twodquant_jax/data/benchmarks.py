"""Loading the SR benchmark sets (Set5, Set14, B100, Urban100, Manga109) as LR/HR pairs.

Layout per set: ``<root>/<Name>/HR/*.png`` (or .jpg/.bmp/.tif/.webp) and optionally the
official LR images in
``<root>/<Name>/LR_bicubic/X{s}/<stem>x{s}.png``. HR is mod-cropped to a multiple of s (SPEC
section 6); without official LR images the LR is made by MATLAB-style bicubic downscaling of
the mod-cropped HR, which is how the official ones were made.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Union

from absl import logging
import numpy as np

from twodquant_jax.data.bicubic import imresize
from twodquant_jax.data.images import IMAGE_EXTENSIONS
from twodquant_jax.data.images import load_rgb
from twodquant_jax.data.images import skipped_line
from twodquant_jax.data.images import mod_crop

PathLike = Union[str, os.PathLike]

KNOWN_BENCHMARKS = ("Set5", "Set14", "B100", "Urban100", "Manga109")


SSIM_WINDOW = 11  # the SSIM window of eval/metrics.py (BasicSR's), in HR pixels


def min_hr_side(scale: int) -> int:
  """The smallest mod-cropped HR side that can be scored: the border crop of `scale` pixels
  on each side must leave an SSIM window, a multiple of `scale` (so the LR side is whole)."""
  return -(-(2 * scale + SSIM_WINDOW) // scale) * scale


@dataclasses.dataclass(frozen=True)
class BenchmarkImage:
  """One evaluation pair: ``lr`` (h, w, 3) and ``hr`` (h*s, w*s, 3), both uint8 RGB."""
  name: str
  lr: np.ndarray
  hr: np.ndarray


def _hr_files(root: Path, name: str) -> list[Path]:
  """The sorted HR PNGs of a set, or a clear error saying what was expected."""
  hr_dir = root / name / "HR"
  if not hr_dir.is_dir():
    present = list_benchmarks(root) if root.is_dir() else []
    raise FileNotFoundError(
        f"Benchmark {name!r}: expected HR images in {hr_dir}/*.png but that folder does not "
        f"exist (sets present under {root}: {present or 'none'}).")
  entries = sorted(p for p in hr_dir.iterdir() if p.is_file() and not p.name.startswith("."))
  files = [p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS]
  if not files:
    raise FileNotFoundError(f"Benchmark {name!r}: no images ({', '.join(IMAGE_EXTENSIONS)}) "
                            f"in {hr_dir}.")
  others = [p for p in entries if p.suffix.lower() not in IMAGE_EXTENSIONS]
  if others:
    logging.warning("Benchmark %s: %s in %s", name, skipped_line(others, "non-image files"),
                    hr_dir)
  stems: dict[str, Path] = {}
  for p in files:
    if p.stem in stems:
      raise ValueError(f"Benchmark {name!r}: {stems[p.stem].name} and {p.name} in {hr_dir} "
                       "are the same image name; keep one of them.")
    stems[p.stem] = p
  return files


def _official_lr(lr_dir: Path, stem: str, scale: int, hr: np.ndarray) -> np.ndarray:
  """Reads the official LR of ``stem`` and checks it is exactly HR / scale."""
  lr_path = next((p for ext in IMAGE_EXTENSIONS
                  for p in (lr_dir / f"{stem}x{scale}{ext}",) if p.is_file()),
                 lr_dir / f"{stem}x{scale}.png")
  if not lr_path.is_file():
    raise FileNotFoundError(
        f"Official LR folder {lr_dir} exists but has no {lr_path.name} for HR image {stem!r}.")
  lr = load_rgb(lr_path)
  expected = (hr.shape[0] // scale, hr.shape[1] // scale, 3)
  if lr.shape != expected:
    raise ValueError(
        f"LR image {lr_path} is {lr.shape}, expected {expected} (mod-cropped HR {hr.shape} / "
        f"{scale}).")
  return lr


def load_benchmark(root: PathLike, name: str, scale: int, *,
                   matlab_exact: bool = True) -> list[BenchmarkImage]:
  """Loads benchmark set ``name`` at ``scale`` as (lr, hr) uint8 RGB pairs, sorted by name.

  Official LR images are used when ``LR_bicubic/X{scale}`` exists; otherwise LR is
  ``imresize(hr, 1 / scale)`` (``matlab_exact`` is passed to ``imresize``; the default, True,
  reproduces MATLAB's own LR files exactly, as the benchmark LR of the paper were made). An HR image
  smaller than ``min_hr_side(scale)`` on either side is an error naming the file, raised while
  loading, before any inference (it could not be scored).
  """
  if int(scale) != scale or scale < 1:
    raise ValueError(f"scale must be a positive integer, got {scale}.")
  scale = int(scale)
  root = Path(root)
  lr_dir = root / name / "LR_bicubic" / f"X{scale}"
  use_official = lr_dir.is_dir()
  images = []
  for hr_path in _hr_files(root, name):
    hr = load_rgb(hr_path)
    side = min_hr_side(scale)
    if min(hr.shape[:2]) < side:  # found now, before any inference
      raise ValueError(
          f"HR image {hr_path} is {hr.shape[0]}x{hr.shape[1]}, smaller than the minimum "
          f"{side}x{side} at x{scale} (the scores crop {scale} pixels per side and SSIM needs "
          f"{SSIM_WINDOW}x{SSIM_WINDOW}); remove or replace it.")
    hr = mod_crop(hr, scale)
    if use_official:
      lr = _official_lr(lr_dir, hr_path.stem, scale, hr)
    else:
      lr = imresize(hr, 1.0 / scale, matlab_exact=matlab_exact)
    images.append(BenchmarkImage(name=hr_path.stem, lr=lr, hr=hr))
  return images


def list_benchmarks(root: PathLike) -> list[str]:
  """Names of the sets under ``root`` that have an ``HR`` folder: known sets first."""
  root = Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"Benchmark root folder not found: {root}")
  present = sorted(p.name for p in root.iterdir() if (p / "HR").is_dir())
  known = [n for n in KNOWN_BENCHMARKS if n in present]
  return known + [n for n in present if n not in KNOWN_BENCHMARKS]
