"""Benchmark evaluation: BasicSR flip padding, batched jitted inference, tiling, PSNR/SSIM (Y).

A `Predictor` turns uint8 LR images into float SR images with one jitted function per distinct
padded size; images of the same padded size are batched, and images larger than `tile` are cut
into overlapping tiles of one shape that are batched and stitched back (averaged in overlaps).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from twodquant_jax.eval import metrics
from twodquant_jax.data.benchmarks import BenchmarkImage
from twodquant_jax.data.images import to_uint8
from twodquant_jax.nn.swinir import SwinIR
from twodquant_jax.progress import Progress


def flip_pad(img: np.ndarray, multiple: int = 8) -> np.ndarray:
  """BasicSR test-time padding: append the flipped image below, then right, crop to a multiple.

  Images smaller than half the padding repeat the mirror (the plain concat would be too short).
  Nothing is padded when the size is already a multiple.
  """
  h, w = img.shape[:2]
  th, tw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
  while img.shape[0] < th:
    img = np.concatenate([img, img[::-1]], axis=0)
  img = img[:th]
  while img.shape[1] < tw:
    img = np.concatenate([img, img[:, ::-1]], axis=1)
  return img[:, :tw]


def _starts(size: int, tile: int, overlap: int) -> list[int]:
  if size <= tile:
    return [0]
  stride = tile - overlap
  return list(range(0, size - tile, stride)) + [size - tile]


def tile_boxes(hw: tuple[int, int], tile: int, overlap: int
               ) -> tuple[list[tuple[int, int]], tuple[int, int]]:
  """Top-left corners of the tiles covering an (H, W) image, and the tile shape."""
  th, tw = min(tile, hw[0]), min(tile, hw[1])
  boxes = [(i, j) for i in _starts(hw[0], th, overlap) for j in _starts(hw[1], tw, overlap)]
  return boxes, (th, tw)


def _owned(starts: list[int], size: int, tile: int) -> list[tuple[int, int]]:
  """The [lo, hi) span each tile keeps along one axis under 'center' blending: the overlap of
  two neighbours is split at its middle, so every kept pixel is at least half the overlap away
  from an inner tile edge (where window attention lacks context)."""
  spans = []
  for k, a in enumerate(starts):
    lo = 0 if k == 0 else (a + starts[k - 1] + tile) // 2
    hi = size if k == len(starts) - 1 else (starts[k + 1] + a + tile) // 2
    spans.append((lo, hi))
  return spans


def stitch(outs: Sequence[np.ndarray], boxes: Sequence[tuple[int, int]], hw: tuple[int, int],
           tile_hw: tuple[int, int], scale: int, blend: str = "center") -> np.ndarray:
  """Assembles SR tiles of an (H, W) LR image into (sH, sW, 3).

  blend 'center': each SR pixel comes from the tile where it is farthest from an inner edge
  (closest to whole-image results); 'mean': overlaps are averaged (edge pixels count equally).
  """
  (h, w), (th, tw), s = hw, tile_hw, scale
  if blend == "center":
    rows = dict(zip(sorted({i for i, _ in boxes}),
                    _owned(sorted({i for i, _ in boxes}), h, th)))
    cols = dict(zip(sorted({j for _, j in boxes}),
                    _owned(sorted({j for _, j in boxes}), w, tw)))
    out = np.zeros((h * s, w * s, 3), np.float32)
    for (i, j), sr in zip(boxes, outs):
      (r0, r1), (c0, c1) = rows[i], cols[j]
      out[r0 * s:r1 * s, c0 * s:c1 * s] = sr[(r0 - i) * s:(r1 - i) * s, (c0 - j) * s:(c1 - j) * s]
    return out
  if blend != "mean":
    raise ValueError(f"eval.tile_blend must be 'center' or 'mean', got {blend!r}")
  out = np.zeros((h * s, w * s, 3), np.float64)
  weight = np.zeros((h * s, w * s, 1), np.float64)
  for (i, j), sr in zip(boxes, outs):
    out[i * s:(i + th) * s, j * s:(j + tw) * s] += sr
    weight[i * s:(i + th) * s, j * s:(j + tw) * s] += 1
  return (out / weight).astype(np.float32)


# On a GPU each distinct padded image size compiles the whole network: 25-27 s on an H200 at
# matmul_precision 'highest', most of it XLA's GEMM autotuning. An evaluation runs each compiled
# size a handful of times, so autotuned kernels never pay back their search: without it 9-10 s
# per size, 0.004-0.007 s per call instead of 0.003-0.004 s (gpu_check fp_parity on an H200,
# docs/measured/gpu/). Training steps (compiled once, run thousands of times) keep it.
EVAL_GPU_COMPILER_OPTIONS = {"xla_gpu_autotune_level": 0}


def eval_jit(fn: Callable) -> Callable:
  """jax.jit for evaluation calls: no GEMM autotuning on a GPU (see above); plain jit elsewhere."""
  gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
  return jax.jit(fn, compiler_options=EVAL_GPU_COMPILER_OPTIONS if gpu else None)


@functools.lru_cache(maxsize=None)
def jitted_apply(scale: int, mode: str = "fp", bits: int = 4, arch: tuple = ()) -> Callable:
  """One jitted `(variables, x) -> SR` per model kind, shared by every Predictor of that kind.

  Parameters and bounds are arguments, not constants, so methods with the same bit width (MinMax,
  Percentile, DOBI, 2DQuant) reuse one compilation per image size.
  """
  model = SwinIR(upscale=scale, mode=mode, bits=bits, **dict(arch))
  return eval_jit(lambda variables, x: model.apply(variables, x))


# LR pixels per jitted call by default: one 256x256 LR image (a Manga109 page at x4, 296x208
# padded, runs alone; Set5/Set14/B100 images still share a call).
DEFAULT_BATCH_PIXELS = 256 * 256


def images_per_batch(hw: tuple[int, int], batch_size: int, batch_pixels: int | None) -> int:
  """How many images of padded size `hw` go in one call: the budget's share, at least one."""
  if batch_pixels is None:
    return batch_size
  return max(1, min(batch_size, batch_pixels // max(1, hw[0] * hw[1])))


@dataclasses.dataclass
class Predictor:
  """Runs a super-resolution function over uint8 images with padding, batching, tiling.

  Either `apply_fn(x)` (jitted here) or, with `variables`, an already jitted
  `apply_fn(variables, x)` such as `jitted_apply(...)`; it is traced once per distinct batch
  shape. `tile` (LR pixels, a multiple of `multiple`) caps the size fed at once; None never tiles.

  Memory: a jitted call's peak memory grows with the LR pixels it holds (SwinIR-light at x4:
  ~50 KB per padded LR pixel on the CPU backend, measured), so a batch holds at most
  `batch_pixels` padded LR pixels and at most `batch_size` images or tiles. An image larger
  than the budget runs alone (tile it to bound memory further). None = no pixel budget.
  """
  apply_fn: Callable
  scale: int
  multiple: int = 8
  batch_size: int = 8
  tile: int | None = None
  tile_overlap: int = 16
  variables: Mapping | None = None
  batch_pixels: int | None = DEFAULT_BATCH_PIXELS
  tile_blend: str = "center"

  def __post_init__(self):
    if self.tile is not None and (self.tile % self.multiple or self.tile <= self.tile_overlap):
      raise ValueError(f"eval.tile must be a multiple of {self.multiple} larger than the overlap "
                       f"({self.tile_overlap}), got {self.tile}")
    if self.batch_size < 1 or (self.batch_pixels is not None and self.batch_pixels < 1):
      raise ValueError(f"eval.batch_size and eval.batch_pixels must be positive, got "
                       f"{self.batch_size} and {self.batch_pixels}")
    if self.variables is None:
      self._call = eval_jit(self.apply_fn)
    else:
      self._call = functools.partial(self.apply_fn, self.variables)
    self.compiled_shapes: set[tuple[int, ...]] = set()

  def _run(self, batch: np.ndarray) -> np.ndarray:
    self.compiled_shapes.add(batch.shape)
    return np.asarray(self._call(jnp.asarray(batch)))

  def _run_tiled(self, x: np.ndarray) -> np.ndarray:
    """x: one padded float image (H, W, 3) larger than the tile; returns (sH, sW, 3)."""
    boxes, (th, tw) = tile_boxes(x.shape[:2], self.tile, self.tile_overlap)
    per = images_per_batch((th, tw), self.batch_size, self.batch_pixels)
    outs = []
    for k in range(0, len(boxes), per):
      chunk = boxes[k:k + per]
      outs.extend(self._run(np.stack([x[i:i + th, j:j + tw] for i, j in chunk])))
    return stitch(outs, boxes, x.shape[:2], (th, tw), self.scale, self.tile_blend)

  def predict(self, lrs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """uint8 LR images (H, W, 3) -> float32 SR images (sH, sW, 3), unclipped, in input order."""
    padded = [flip_pad(lr.astype(np.float32) / 255.0, self.multiple) for lr in lrs]
    results: list[np.ndarray | None] = [None] * len(lrs)
    groups: dict[tuple[int, int], list[int]] = {}
    for idx, p in enumerate(padded):
      if self.tile is not None and max(p.shape[:2]) > self.tile:
        results[idx] = self._run_tiled(p)
      else:
        groups.setdefault(p.shape[:2], []).append(idx)
    for hw, idxs in groups.items():
      per = images_per_batch(hw, self.batch_size, self.batch_pixels)
      for k in range(0, len(idxs), per):
        chunk = idxs[k:k + per]
        for idx, sr in zip(chunk, self._run(np.stack([padded[i] for i in chunk]))):
          results[idx] = sr
    s = self.scale
    return [r[:lr.shape[0] * s, :lr.shape[1] * s] for r, lr in zip(results, lrs)]


def score(sr: np.ndarray, hr: np.ndarray, scale: int) -> tuple[float, float]:
  """PSNR and SSIM on Y, crop border = scale, of a uint8 SR image against its HR."""
  return (metrics.psnr_y(sr, hr, crop_border=scale), metrics.ssim_y(sr, hr, crop_border=scale))


def evaluate_images(predict: Callable[[Sequence[np.ndarray]], list[np.ndarray]],
                    images: Sequence[BenchmarkImage], scale: int, *, chunk: int = 8,
                    progress: bool = False, desc: str = "eval",
                    on_image: Callable[[BenchmarkImage, np.ndarray], None] | None = None) -> dict:
  """Scores one dataset: {'psnr', 'ssim', 'images': {name: {'psnr', 'ssim'}}, 'seconds'}.

  `predict` maps uint8 LR images to float SR images; `on_image(img, sr_uint8)` is called per
  image (e.g. to save PNGs). Averages are over images, as in the paper.
  """
  start = time.perf_counter()
  per_image = {}
  with Progress(len(images), desc, bar=None if progress else False) as bar:
    for k in range(0, len(images), chunk):
      batch = images[k:k + chunk]
      for img, sr in zip(batch, predict([b.lr for b in batch])):
        sr8 = to_uint8(sr)
        if sr8.shape != img.hr.shape:
          raise ValueError(f"{img.name}: SR shape {sr8.shape} != HR shape {img.hr.shape}")
        psnr, ssim = score(sr8, img.hr, scale)
        per_image[img.name] = {"psnr": psnr, "ssim": ssim}
        if on_image is not None:
          on_image(img, sr8)
        bar.update(1)
  vals = list(per_image.values())
  return {
      "psnr": float(np.mean([v["psnr"] for v in vals])) if vals else float("nan"),
      "ssim": float(np.mean([v["ssim"] for v in vals])) if vals else float("nan"),
      "num_images": len(vals),
      "images": per_image,
      "seconds": time.perf_counter() - start,
  }


def bicubic_predict(scale: int) -> Callable[[Iterable[np.ndarray]], list[np.ndarray]]:
  """The 'Bicubic' row: MATLAB-style bicubic upscaling of the LR image."""
  from twodquant_jax.data.bicubic import imresize

  def predict(lrs):
    return [imresize(lr.astype(np.float64) / 255.0, scale).astype(np.float32) for lr in lrs]

  return predict
