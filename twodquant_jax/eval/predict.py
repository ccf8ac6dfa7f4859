"""Benchmark evaluation: BasicSR flip padding, batched jitted inference, tiling, PSNR/SSIM (Y).

A `Predictor` turns uint8 LR images into float SR images. With a model's `bucket_apply` it runs
them in a few bucket shapes: images of different padded sizes share one compiled function per
bucket (the network is told each image's own size, `SwinIR(valid_hw=...)`, so the outputs equal
the per-size ones); without it, one jitted function per distinct padded size and batch. Images
larger than `tile` are cut into overlapping tiles that are batched and stitched back.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import weakref
from typing import Callable, Iterable, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from twodquant_jax import compile_cache
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


def eval_jit(fn: Callable) -> Callable:
  """jax.jit with the evaluation compiler options of this backend (`compile_cache`: no GEMM
  autotuning on a GPU, XLA's defaults elsewhere)."""
  return jax.jit(fn, compiler_options=compile_cache.compiler_options("eval"))


@functools.lru_cache(maxsize=None)
def jitted_apply(scale: int, mode: str = "fp", bits: int = 4, arch: tuple = ()) -> Callable:
  """One jitted `(variables, x) -> SR` per model kind, shared by every Predictor of that kind.

  Parameters and bounds are arguments, not constants, so methods with the same bit width (MinMax,
  Percentile, DOBI, 2DQuant) reuse one compilation per image size.
  """
  model = SwinIR(upscale=scale, mode=mode, bits=bits, **dict(arch))
  return eval_jit(lambda variables, x: model.apply(variables, x))


# Every live BucketApply (weakly held), so `release_executables` reaches those a Predictor still
# references after their lru_cache entry is cleared.
_BUCKET_APPLIES: "weakref.WeakSet[BucketApply]" = weakref.WeakSet()


class BucketApply:
  """A model kind's bucket function `(variables, x, valid_hw) -> SR` and its executables.

  Executables are compiled ahead of time, one per batch shape and variables layout, and shared
  by every Predictor of the kind (methods with the same bit width compile once), like jax.jit's
  own cache, but counted and timed.
  """

  def __init__(self, fn: Callable):
    self.fn = fn
    self._executables: dict[tuple, Callable] = {}
    _BUCKET_APPLIES.add(self)

  def has(self, layout: tuple, shape: tuple[int, ...]) -> bool:
    return (layout, shape) in self._executables

  def executable(self, variables: Mapping, layout: tuple, shape: tuple[int, ...]
                 ) -> tuple[Callable, float | None]:
    """The executable for NHWC batches of `shape`, and its compile seconds (None: cached)."""
    key = (layout, shape)
    if key in self._executables:
      return self._executables[key], None
    start = time.perf_counter()
    exe = self.fn.lower(variables, jax.ShapeDtypeStruct(shape, jnp.float32),
                        jax.ShapeDtypeStruct((shape[0], 2), jnp.int32)).compile()
    self._executables[key] = exe
    return exe, time.perf_counter() - start


@functools.lru_cache(maxsize=None)
def bucket_apply(scale: int, mode: str = "fp", bits: int = 4, arch: tuple = ()) -> BucketApply:
  """The bucket counterpart of `jitted_apply`: `(variables, x, valid_hw) -> SR` per model kind."""
  model = SwinIR(upscale=scale, mode=mode, bits=bits, **dict(arch))
  return BucketApply(eval_jit(lambda variables, x, valid_hw:
                              model.apply(variables, x, valid_hw=valid_hw)))


def release_executables() -> int:
  """Drops every cached evaluation executable (all model kinds and image sizes) and jax's own
  caches; returns how many bucket executables were dropped. The pipeline calls it before DQC:
  finished methods' executables are not needed again (a later evaluation recompiles them, from
  the persistent compilation cache when it is on)."""
  dropped = 0
  for kind in list(_BUCKET_APPLIES):
    dropped += len(kind._executables)  # pylint: disable=protected-access
    kind._executables.clear()  # pylint: disable=protected-access
  bucket_apply.cache_clear()
  jitted_apply.cache_clear()
  jax.clear_caches()
  return dropped


def variables_layout(variables: Mapping) -> tuple:
  """Tree structure, shapes and dtypes of `variables`: what an executable was compiled for."""
  leaves, tree = jax.tree_util.tree_flatten(variables)
  return tree, tuple((np.shape(a), np.dtype(getattr(a, "dtype", type(a))).str) for a in leaves)


def plan_buckets(sizes: Mapping[tuple[int, int], int], compile_pixels: float, max_buckets: int
                 ) -> list[tuple[int, int]]:
  """Bucket shapes for padded sizes {(h, w): count}: few compiles, few wasted pixels.

  Starts from one bucket per size and greedily merges the two buckets (into their elementwise
  max) whose merge costs the fewest extra pixels, while a merge costs less than a compile
  (`compile_pixels` LR pixels of inference) or more than `max_buckets` remain.
  """
  hs = np.array([hw[0] for hw in sizes], np.int64)
  ws = np.array([hw[1] for hw in sizes], np.int64)
  ns = np.array(list(sizes.values()), np.int64)
  while len(hs) > 1:
    h2, w2 = np.maximum(hs[:, None], hs[None]), np.maximum(ws[:, None], ws[None])
    own = ns * hs * ws
    extra = (ns[:, None] + ns[None]) * h2 * w2 - own[:, None] - own[None]
    np.fill_diagonal(extra, np.iinfo(np.int64).max)
    i, j = np.unravel_index(np.argmin(extra), extra.shape)
    if extra[i, j] >= compile_pixels and len(hs) <= max_buckets:
      break
    hs[i], ws[i], ns[i] = h2[i, j], w2[i, j], ns[i] + ns[j]
    hs, ws, ns = np.delete(hs, j), np.delete(ws, j), np.delete(ns, j)
  return sorted(zip(hs.tolist(), ws.tolist()))


# Inference pixels one compile is worth: on a 2-core CPU SwinIR-light x4 compiles in ~6 s and runs
# an 80x120 LR image in ~0.8 s (~70 k pixels per compile); on a GPU a compile (9-10 s) outweighs
# the inference of whole data sets. Buckets are merged while the merge wastes fewer pixels.
COMPILE_PIXELS = {"cpu": 1 << 16}
GPU_COMPILE_PIXELS = 1 << 24
DEFAULT_MAX_BUCKETS = 4


def default_compile_pixels() -> int:
  """`COMPILE_PIXELS` of the default backend (the GPU value for accelerators)."""
  return COMPILE_PIXELS.get(jax.default_backend(), GPU_COMPILE_PIXELS)


def default_bucket_batch() -> int:
  """Images per bucket call: 1 on the CPU, where a batch runs no faster per image (SwinIR-light
  x4 at 80x120: 2.2 s per image alone, 2.6 s each in a batch of 6, measured on a loaded 2-core
  machine) and a part-filled batch would compute blanks; on accelerators the pixel budget's."""
  return 1 if jax.default_backend() == "cpu" else 1 << 30


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

  With `bucket_apply` (and `variables`) images run in bucket shapes instead: `plan` (or the first
  `predict` that meets a size no bucket holds) picks a few shapes with `plan_buckets`, each
  compiled once for a fixed batch; images of different sizes share a call, each told its own
  size, so the results equal the per-size path's. `compile_stats()` counts the compiles.

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
  bucket_apply: BucketApply | None = None
  compile_pixels: int | None = None  # None: default_compile_pixels()
  max_buckets: int = DEFAULT_MAX_BUCKETS
  on_compile: Callable[[str], None] | None = None  # told "compiling ..." before each compile
  bucket_batch: int | None = None  # images per bucket call (capped as above); None: default_bucket_batch()

  def __post_init__(self):
    if self.tile is not None and (self.tile % self.multiple or self.tile <= self.tile_overlap):
      raise ValueError(f"eval.tile must be a multiple of {self.multiple} larger than the overlap "
                       f"({self.tile_overlap}), got {self.tile}")
    if self.batch_size < 1 or (self.batch_pixels is not None and self.batch_pixels < 1):
      raise ValueError(f"eval.batch_size and eval.batch_pixels must be positive, got "
                       f"{self.batch_size} and {self.batch_pixels}")
    if self.bucket_apply is not None and self.variables is None:
      raise ValueError("Predictor: bucket_apply needs the model's variables")
    if self.bucket_batch is not None and self.bucket_batch < 1:
      raise ValueError(f"Predictor: bucket_batch must be positive, got {self.bucket_batch}")
    if self.variables is None:
      self._call = eval_jit(self.apply_fn)
    else:
      self._call = functools.partial(self.apply_fn, self.variables)
      self._layout = variables_layout(self.variables)
    if self.compile_pixels is None:
      self.compile_pixels = default_compile_pixels()
    if self.bucket_batch is None:
      self.bucket_batch = default_bucket_batch()
    self.compiled_shapes: set[tuple[int, ...]] = set()
    self.buckets: list[tuple[int, int]] = []
    self._compiles, self._compile_s = 0, 0.0

  def compile_stats(self) -> dict:
    """{'compiles': functions this Predictor compiled, 'compile_s': seconds spent compiling}.

    Bucket path: ahead-of-time compiles, timed alone. Per-size path: each new batch shape, timed
    with its first call (compile plus one run)."""
    return {"compiles": self._compiles, "compile_s": self._compile_s}

  def _compiling(self, shape: tuple[int, ...]) -> None:
    what = f"compiling {'x'.join(map(str, shape[:3]))}"
    logging.info("eval: %s", what)
    if self.on_compile is not None:
      self.on_compile(what)

  def _run(self, batch: np.ndarray) -> np.ndarray:
    """The per-size path: one jitted call on a batch of same-size images."""
    new = batch.shape not in self.compiled_shapes
    self.compiled_shapes.add(batch.shape)
    if new:
      self._compiling(batch.shape)
      start = time.perf_counter()
    out = np.asarray(self._call(jnp.asarray(batch)))
    if new:
      self._compiles += 1
      self._compile_s += time.perf_counter() - start
    return out

  def _run_tiled(self, x: np.ndarray) -> np.ndarray:
    """x: one padded float image (H, W, 3) larger than the tile; returns (sH, sW, 3)."""
    boxes, (th, tw) = tile_boxes(x.shape[:2], self.tile, self.tile_overlap)
    per = images_per_batch((th, tw), self.batch_size, self.batch_pixels)
    outs = []
    for k in range(0, len(boxes), per):
      chunk = boxes[k:k + per]
      outs.extend(self._run(np.stack([x[i:i + th, j:j + tw] for i, j in chunk])))
    return stitch(outs, boxes, x.shape[:2], (th, tw), self.scale, self.tile_blend)

  def _tiled(self, hw: tuple[int, int]) -> bool:
    return self.tile is not None and max(hw) > self.tile

  def predict(self, lrs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """uint8 LR images (H, W, 3) -> float32 SR images (sH, sW, 3), unclipped, in input order."""
    padded = [flip_pad(lr.astype(np.float32) / 255.0, self.multiple) for lr in lrs]
    if self.bucket_apply is not None:
      results = self._predict_in_buckets(padded)
    else:
      results = self._predict_per_size(padded)
    s = self.scale
    return [r[:lr.shape[0] * s, :lr.shape[1] * s] for r, lr in zip(results, lrs)]

  def _predict_per_size(self, padded: list[np.ndarray]) -> list[np.ndarray]:
    results: list[np.ndarray | None] = [None] * len(padded)
    groups: dict[tuple[int, int], list[int]] = {}
    for idx, p in enumerate(padded):
      if self._tiled(p.shape[:2]):
        results[idx] = self._run_tiled(p)
      else:
        groups.setdefault(p.shape[:2], []).append(idx)
    for hw, idxs in groups.items():
      per = images_per_batch(hw, self.batch_size, self.batch_pixels)
      for k in range(0, len(idxs), per):
        chunk = idxs[k:k + per]
        for idx, sr in zip(chunk, self._run(np.stack([padded[i] for i in chunk]))):
          results[idx] = sr
    return results

  # --- the bucket path -----------------------------------------------------------------------

  def _pieces(self, hw: tuple[int, int]) -> list[tuple[int, int]]:
    """The (h, w) of what a padded image of size hw runs as: itself, or its tiles."""
    if not self._tiled(hw):
      return [hw]
    boxes, thw = tile_boxes(hw, self.tile, self.tile_overlap)
    return [thw] * len(boxes)

  def bucket_of(self, hw: tuple[int, int]) -> tuple[int, int] | None:
    """The smallest bucket that holds an (h, w) piece, or None."""
    fits = [b for b in self.buckets if b[0] >= hw[0] and b[1] >= hw[1]]
    return min(fits, key=lambda b: (b[0] * b[1], b), default=None)

  def _batch_shape(self, bucket: tuple[int, int]) -> tuple[int, int, int, int]:
    """A bucket's one compiled batch shape; a call with fewer pieces fills the rest with blanks."""
    per = images_per_batch(bucket, min(self.batch_size, self.bucket_batch), self.batch_pixels)
    return (per, *bucket, 3)

  def _add_buckets(self, piece_sizes: Iterable[tuple[int, int]]) -> None:
    """Plans buckets for the pieces that no bucket holds yet."""
    homeless: dict[tuple[int, int], int] = {}
    for hw in piece_sizes:
      if self.bucket_of(hw) is None:
        homeless[hw] = homeless.get(hw, 0) + 1
    if homeless:
      room = max(1, self.max_buckets - len(self.buckets))
      self.buckets.extend(plan_buckets(homeless, self.compile_pixels, room))

  def plan(self, lr_shapes: Iterable[Sequence[int]], compile_now: bool = True) -> list:
    """Picks the buckets for LR images of these shapes (pass every data set of the run, so they
    share buckets) and, with `compile_now`, compiles them; returns the bucket shapes."""
    if self.bucket_apply is None:
      return []
    m = self.multiple
    sizes = [piece for shape in lr_shapes
             for piece in self._pieces((-(-shape[0] // m) * m, -(-shape[1] // m) * m))]
    self._add_buckets(sizes)
    if compile_now:
      for bucket in self.buckets:
        self._executable(self._batch_shape(bucket))
    return list(self.buckets)

  def _executable(self, shape: tuple[int, ...]) -> Callable:
    if not self.bucket_apply.has(self._layout, shape):
      self._compiling(shape)
    exe, seconds = self.bucket_apply.executable(self.variables, self._layout, shape)
    if seconds is not None:
      self._compiles += 1
      self._compile_s += seconds
    return exe

  def _predict_in_buckets(self, padded: list[np.ndarray]) -> list[np.ndarray]:
    pieces, owners = [], []  # owners[i]: (first piece, tile boxes or None, tile shape)
    for p in padded:
      hw = p.shape[:2]
      if self._tiled(hw):
        boxes, (th, tw) = tile_boxes(hw, self.tile, self.tile_overlap)
        owners.append((len(pieces), boxes, (th, tw)))
        pieces.extend(p[i:i + th, j:j + tw] for i, j in boxes)
      else:
        owners.append((len(pieces), None, hw))
        pieces.append(p)
    outs = self._run_pieces(pieces)
    results = []
    for (first, boxes, thw), p in zip(owners, padded):
      if boxes is None:
        results.append(outs[first])
      else:
        tiles = outs[first:first + len(boxes)]
        results.append(stitch(tiles, boxes, p.shape[:2], thw, self.scale, self.tile_blend))
    return results

  def _run_pieces(self, pieces: list[np.ndarray]) -> list[np.ndarray]:
    """Runs float pieces (h, w, 3) of any sizes in the buckets; returns their (sh, sw, 3)."""
    self._add_buckets(p.shape[:2] for p in pieces)
    queues: dict[tuple[int, int], list[int]] = {b: [] for b in self.buckets}
    for k, p in enumerate(pieces):
      queues[self.bucket_of(p.shape[:2])].append(k)
    order = sorted(queues, key=lambda b: (b[0] * b[1], b), reverse=True)
    outs: list[np.ndarray | None] = [None] * len(pieces)
    for n, bucket in enumerate(order):
      per = self._batch_shape(bucket)[0]
      while queues[bucket]:
        batch, queues[bucket] = queues[bucket][:per], queues[bucket][per:]
        for smaller in order[n + 1:]:  # free slots take pieces of buckets this one holds
          if smaller[0] <= bucket[0] and smaller[1] <= bucket[1]:
            take = per - len(batch)
            batch, queues[smaller] = batch + queues[smaller][:take], queues[smaller][take:]
        for k, sr in zip(batch, self._call_bucket(bucket, [pieces[k] for k in batch])):
          outs[k] = sr
    return outs

  def _call_bucket(self, bucket: tuple[int, int], batch: list[np.ndarray]) -> list[np.ndarray]:
    """One compiled call: the pieces top-left in a zero canvas, free slots left as blanks."""
    shape = self._batch_shape(bucket)
    x = np.zeros(shape, np.float32)
    valid = np.tile(np.array(bucket, np.int32), (shape[0], 1))
    for slot, p in enumerate(batch):
      x[slot, :p.shape[0], :p.shape[1]] = p
      valid[slot] = p.shape[:2]
    self.compiled_shapes.add(shape)
    out = np.asarray(self._executable(shape)(self.variables, jnp.asarray(x), jnp.asarray(valid)))
    s = self.scale
    return [out[slot, :p.shape[0] * s, :p.shape[1] * s] for slot, p in enumerate(batch)]


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
