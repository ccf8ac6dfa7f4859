"""Random LR/HR training patches from an image folder: DOBI's calibration batch and DQC's stream.

SPEC section 5: DQC trains on random 64x64 LR patches (HR patch 64*s) of the training set with
random horizontal flips and rotations by multiples of 90 degrees; DOBI calibrates on the first
batch of that stream. Patches are made the way BasicSR's generated-LR pipelines make them: crop
the HR image, then bicubic-downscale the crop (MATLAB-style ``imresize``), so LR and HR always
correspond exactly (any HR position works; no alignment to the scale is needed).

Every batch is a pure function of ``(seed, step)``: each step draws from its own
``np.random.default_rng([seed, step])``, so a resumed run (or a second host) sees exactly the
batches an uninterrupted run would, without replaying earlier steps.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import os
from pathlib import Path
import queue
import threading
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from absl import logging
import numpy as np
from PIL import Image

from twodquant_jax.data.bicubic import imresize
from twodquant_jax.data.images import IMAGE_EXTENSIONS, load_rgb, skipped_line

PathLike = Union[str, os.PathLike]
Batch = dict[str, Any]



@dataclasses.dataclass(frozen=True, eq=False)
class PatchSource:
  """A fixed, sorted list of training images to cut patches from.

  Attributes:
    root: the folder the images came from.
    names: file names (relative to ``root``), sorted; the index space of ``sample_batch``.
    shapes: (H, W) of each image.
    images: the decoded HxWx3 uint8 images when loaded into memory, else None (each patch then
      re-reads its image from disk, for folders too large for RAM such as full-size DF2K).
    min_hw: the smallest side over all images: patches up to this size can be cut from any image.
  """
  root: Path
  names: tuple[str, ...]
  shapes: tuple[tuple[int, int], ...]
  images: Optional[tuple[np.ndarray, ...]]
  min_hw: int

  def __len__(self) -> int:
    return len(self.names)

  def image(self, index: int) -> np.ndarray:
    """The HxWx3 uint8 image ``index`` (from memory, or read from disk)."""
    if self.images is not None:
      return self.images[index]
    return load_rgb(self.root / self.names[index])


def _image_files(folder: Path) -> list[Path]:
  """Sorted image files directly inside ``folder``."""
  return sorted(p for p in folder.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_patch_source(folder: PathLike, min_size: int, *, in_memory: bool = True) -> PatchSource:
  """Lists (and by default decodes) every image in ``folder`` that is at least ``min_size``.

  Args:
    folder: a folder of training images (PNG, JPEG, ...), not searched recursively.
    min_size: the HR patch side the source will be used with (``lr_size * scale``); smaller
      images are skipped with a logged note, since no patch can be cut from them.
    in_memory: decode all images once now (fast sampling); False keeps only names and sizes
      and decodes per patch (for folders too large for RAM).

  Returns:
    The PatchSource, images sorted by file name.

  Raises:
    FileNotFoundError: the folder is missing or holds no image files.
    ValueError: no image is large enough, or an image cannot be read.
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"Training image folder not found: {folder}")
  if int(min_size) != min_size or min_size < 1:
    raise ValueError(f"min_size must be a positive integer, got {min_size}.")
  files = _image_files(folder)
  if not files:
    raise FileNotFoundError(
        f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in training image folder {folder}.")
  names, shapes, images, skipped = [], [], [], []
  for path in files:
    if in_memory:
      img = load_rgb(path)
      h, w = img.shape[:2]
    else:
      try:
        with Image.open(path) as pil:  # reads the header only
          w, h = pil.size
      except (OSError, SyntaxError) as e:
        raise ValueError(f"Not a readable image file: {path} ({e})") from e
      img = None
    if min(h, w) < min_size:
      skipped.append(f"{path.name} ({h}x{w})")
      continue
    names.append(path.name)
    shapes.append((h, w))
    images.append(img)
  if skipped:  # one short line, once per process (calibration and DQC both list the folder)
    logging.log_first_n(logging.INFO, "load_patch_source: %s in %s (of %d)", 1, skipped_line(
        skipped, f"images smaller than the {min_size}x{min_size} HR patch"), folder, len(files))
  if not names:
    raise ValueError(
        f"No image in {folder} is at least {min_size}x{min_size} pixels (the HR patch size); "
        f"all {len(files)} were too small.")
  return PatchSource(root=folder, names=tuple(names), shapes=tuple(shapes),
                     images=tuple(images) if in_memory else None,
                     min_hw=min(min(s) for s in shapes))


def _augment(img: np.ndarray, hflip: bool, rot: int) -> np.ndarray:
  """Horizontal flip (optional) then counter-clockwise rotation by ``rot`` * 90 degrees."""
  if hflip:
    img = img[:, ::-1]
  return np.ascontiguousarray(np.rot90(img, k=rot, axes=(0, 1)))


def make_patch_pair(hr_image: np.ndarray, y: int, x: int, hr_size: int,
                    scale: int) -> tuple[np.ndarray, np.ndarray]:
  """Crops ``hr_size`` square HR at (y, x) and makes its LR by bicubic ``imresize(crop, 1/s)``."""
  h, w = hr_image.shape[:2]
  if not (0 <= y <= h - hr_size and 0 <= x <= w - hr_size):
    raise ValueError(
        f"A {hr_size}x{hr_size} crop at y={y}, x={x} does not fit in a {h}x{w} image.")
  hr = np.ascontiguousarray(hr_image[y:y + hr_size, x:x + hr_size])
  # One rounding at the end (BasicSR's float imresize), as the reference calibration LR.
  lr = imresize(hr, 1.0 / scale, matlab_exact=False)
  return lr, hr


def _check_sizes(scale: int, lr_size: int, batch_size: int) -> int:
  """Validates the patch geometry; returns the HR patch side."""
  for what, v in (("scale", scale), ("lr_size", lr_size), ("batch_size", batch_size)):
    if int(v) != v or v < 1:
      raise ValueError(f"{what} must be a positive integer, got {v}.")
  return int(lr_size) * int(scale)


def sample_batch(source: PatchSource, seed: int, step: int, batch_size: int, *, scale: int,
                 lr_size: int = 64, augment: bool = True,
                 indices: Optional[Sequence[int]] = None) -> Batch:
  """The batch of training step ``step``: a pure function of (source, seed, step, sizes).

  Each patch draws, from ``np.random.default_rng([seed, step])`` in order: an image index, the
  HR crop's top and left, a horizontal-flip bit and a rotation (0-3 quarter turns). The flip and
  rotation are drawn even when ``augment`` is False so turning augmentation off keeps the same
  crops. The same flip/rotation is applied to the LR and HR patch.

  ``indices`` (rows of the batch, each in [0, batch_size)) makes only those samples, equal to
  the same rows of the whole batch: every draw is made, but only these patches are cut. A
  process of a multi-process run uses it to make just its share of the global batch.

  Returns:
    dict(lr=uint8 (N, lr_size, lr_size, 3), hr=uint8 (N, lr_size*s, lr_size*s, 3)), N =
    batch_size or len(indices).
  """
  hr_size = _check_sizes(scale, lr_size, batch_size)
  if int(seed) < 0 or int(step) < 0:
    raise ValueError(f"seed and step must be non-negative, got seed={seed}, step={step}.")
  if source.min_hw < hr_size:
    raise ValueError(
        f"The patch source has images smaller than the {hr_size}x{hr_size} HR patch (smallest "
        f"side {source.min_hw}); build it with load_patch_source(folder, min_size={hr_size}).")
  rows = range(batch_size) if indices is None else [int(i) for i in indices]
  bad = [i for i in rows if not 0 <= i < batch_size]
  if bad or not rows:
    raise ValueError(f"indices must be a non-empty list of rows in [0, {batch_size}), got "
                     f"{list(rows)}.")
  rng = np.random.default_rng([int(seed), int(step)])
  draws = []
  for _ in range(batch_size):  # all draws, in order, so any row is the same in any subset
    index = int(rng.integers(len(source)))
    h, w = source.shapes[index]
    y = int(rng.integers(h - hr_size + 1))
    x = int(rng.integers(w - hr_size + 1))
    draws.append((index, y, x, bool(rng.integers(2)), int(rng.integers(4))))
  lrs, hrs = [], []
  for row in rows:
    index, y, x, hflip, rot = draws[row]
    lr, hr = make_patch_pair(source.image(index), y, x, hr_size, scale)
    if augment:
      lr, hr = _augment(lr, hflip, rot), _augment(hr, hflip, rot)
    lrs.append(lr)
    hrs.append(hr)
  return {"lr": np.stack(lrs), "hr": np.stack(hrs)}


def calibration_batch(source: PatchSource, seed: int, *, scale: int, batch_size: int = 32,
                      lr_size: int = 64, augment: bool = True) -> Batch:
  """DOBI's calibration batch: the first (step 0) batch of the DQC stream (SPEC section 5)."""
  return sample_batch(source, seed, 0, batch_size, scale=scale, lr_size=lr_size,
                      augment=augment)


def _check_image_stack(arr: np.ndarray, key: str, path: Path) -> None:
  """Raises ValueError unless ``arr`` is a non-empty N x h x w x 3 uint8 array."""
  if arr.dtype != np.uint8:
    raise ValueError(f"{path}: '{key}' must be uint8, got {arr.dtype}.")
  if arr.ndim != 4 or arr.shape[-1] != 3 or min(arr.shape) == 0:
    raise ValueError(f"{path}: '{key}' must have shape (N, h, w, 3) with N, h, w > 0, "
                     f"got {arr.shape}.")


def load_batch_file(path: PathLike) -> dict[str, Optional[np.ndarray]]:
  """Reads a saved calibration batch (.npz with ``lr``, optional ``hr`` and ``source``).

  Returns:
    dict(lr=uint8 (N, h, w, 3), hr=uint8 (N, h*s, w*s, 3) or None, source=str array or None).

  Raises:
    FileNotFoundError: no such file.
    ValueError: not an .npz archive, no ``lr``, or wrong dtype/shape (``hr`` must hold N images
      an integer factor s larger than ``lr`` on both sides).
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"Calibration batch file not found: {path}")
  try:
    data = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f"{path} is not a readable .npz archive ({e}).") from e
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise ValueError(f"{path} holds a single .npy array; expected an .npz archive with 'lr'.")
  with data:
    try:
      arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as e:  # e.g. pickled object arrays, truncation
      raise ValueError(f"{path}: cannot read its arrays ({e}).") from e
  if "lr" not in arrays:
    raise ValueError(f"{path} has no 'lr' array (it holds {sorted(arrays)}).")
  lr = arrays["lr"]
  _check_image_stack(lr, "lr", path)
  hr = arrays.get("hr")
  if hr is not None:
    _check_image_stack(hr, "hr", path)
    n, h, w = lr.shape[:3]
    s = hr.shape[1] // h
    if hr.shape[0] != n or s < 1 or hr.shape[1:3] != (h * s, w * s):
      raise ValueError(f"{path}: 'hr' {hr.shape} is not N={n} images an integer factor larger "
                       f"than 'lr' {lr.shape}.")
  source = arrays.get("source")
  if source is not None and (source.dtype.kind not in "US" or source.shape != (lr.shape[0],)):
    raise ValueError(f"{path}: 'source' must be N={lr.shape[0]} strings, got {source.dtype} "
                     f"{source.shape}.")
  return {"lr": lr, "hr": hr, "source": source}


class _Raised:
  """Carries an exception from the producer thread to the consumer."""

  def __init__(self, error: BaseException):
    self.error = error


_END = object()


def _offer(q: queue.Queue, stop: threading.Event, item: Any) -> bool:
  """Puts ``item`` on ``q``, waiting for room; False if ``stop`` is set meanwhile."""
  while not stop.is_set():
    try:
      q.put(item, timeout=0.05)
      return True
    except queue.Full:
      continue
  return False


def _produce(make: Callable[[int], Any], steps: Iterator[int], num_workers: int,
             q: queue.Queue, stop: threading.Event) -> None:
  """Producer loop: makes batches in step order (``num_workers`` in flight) and queues them.

  A module-level function holding no reference to the PrefetchStream, so dropping the stream
  lets it be collected, which stops this loop.
  """
  try:
    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
      pending: collections.deque = collections.deque()
      try:
        while not stop.is_set():
          while len(pending) < num_workers:
            step = next(steps, None)
            if step is None:
              break
            pending.append(pool.submit(make, step))
          if not pending:
            break
          if not _offer(q, stop, pending.popleft().result()):
            return
      finally:
        for future in pending:
          future.cancel()
    _offer(q, stop, _END)
  except BaseException as e:  # pylint: disable=broad-except
    _offer(q, stop, _Raised(e))


class PrefetchStream:
  """Iterator over batches of steps start_step, start_step + 1, ..., made in a background thread.

  At most ``buffer`` finished batches wait in a bounded queue, so host memory stays bounded
  while the accelerator consumes one batch and the next ones are being cut. An exception in
  the producer is re-raised by ``next()``; ``close()`` (also on ``with`` exit, or when the
  stream is garbage collected) stops the thread.
  """

  def __init__(self, make: Callable[[int], Any], start_step: int, num_steps: Optional[int],
               buffer: int, num_workers: int):
    if buffer < 1 or num_workers < 1:
      raise ValueError(f"buffer and num_workers must be >= 1, got {buffer}, {num_workers}.")
    if num_steps is not None and num_steps < 0:
      raise ValueError(f"num_steps must be >= 0 or None, got {num_steps}.")
    self._queue: queue.Queue = queue.Queue(maxsize=buffer)
    self._stop = threading.Event()
    self._done = False
    steps: Iterator[int] = itertools.count(start_step)
    if num_steps is not None:
      steps = iter(range(start_step, start_step + num_steps))
    self._thread = threading.Thread(
        target=_produce, args=(make, steps, num_workers, self._queue, self._stop),
        name="prefetch_stream", daemon=True)
    self._thread.start()

  def __iter__(self) -> "PrefetchStream":
    return self

  def __next__(self) -> Any:
    if self._done:
      raise StopIteration
    item = self._queue.get()
    if item is _END:
      self.close()
      raise StopIteration
    if isinstance(item, _Raised):
      self.close()
      raise item.error
    return item

  def close(self) -> None:
    """Stops the producer and waits for it to finish its current batch."""
    self._done = True
    self._stop.set()
    self._thread.join()
    while True:  # drop queued batches (device buffers, if ``put`` made them)
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break

  def __enter__(self) -> "PrefetchStream":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def __del__(self) -> None:
    stop = getattr(self, "_stop", None)
    if stop is not None:
      stop.set()


def prefetch_stream(source: PatchSource, seed: int, start_step: int, batch_size: int, *,
                    scale: int, lr_size: int = 64, augment: bool = True,
                    num_steps: Optional[int] = None, buffer: int = 2, num_workers: int = 1,
                    put: Optional[Callable[[Batch], Any]] = None,
                    indices: Optional[Sequence[int]] = None) -> PrefetchStream:
  """Batches ``sample_batch(source, seed, step, ...)`` for step = start_step, start_step+1, ...

  Args:
    source: the training images.
    seed: the stream's seed; with ``start_step`` it makes a resumed run see the same batches.
    start_step: the first step to produce.
    batch_size, scale, lr_size, augment: as in ``sample_batch``.
    num_steps: stop after this many batches (None: endless).
    buffer: finished batches that may wait for the consumer (the queue bound).
    num_workers: batches cut in parallel (threads: PNG decoding and numpy resizing release the
      GIL); order is always step order.
    put: optional function applied to each batch in the background thread, e.g.
      ``lambda b: jax.device_put(b, sharding)`` so host-to-device copies overlap compute too.
    indices: make only these rows of every batch (as in ``sample_batch``).

  Returns:
    An iterator (use it in a ``with`` block or call ``close()`` to stop the thread early).
  """
  _check_sizes(scale, lr_size, batch_size)

  def make(step: int) -> Any:
    batch = sample_batch(source, seed, step, batch_size, scale=scale, lr_size=lr_size,
                         augment=augment, indices=indices)
    return put(batch) if put is not None else batch

  return PrefetchStream(make, int(start_step), num_steps, buffer, num_workers)
