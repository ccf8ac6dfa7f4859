"""Tests for the calibration batch / DQC patch stream (twodquant_jax.data.patches)."""

import threading

import numpy as np
import pytest

from twodquant_jax.data import patches
from twodquant_jax.data.bicubic import imresize
from twodquant_jax.data.images import load_rgb, save_png

SCALE = 4
HR = 64 * SCALE


@pytest.fixture(scope="module")
def source(calib_dir):
  return patches.load_patch_source(calib_dir, HR)


def _dihedral(img):
  """All 8 flips/rotations of an HxWxC image, in (hflip, rot) order."""
  return [np.rot90(img[:, ::-1] if f else img, k=r, axes=(0, 1)) for f in (0, 1)
          for r in range(4)]


def test_source_lists_sorted_images_and_skips_small_ones(source, calib_dir):
  all_files = sorted(p.name for p in calib_dir.glob("*.png"))
  assert list(source.names) == sorted(source.names)
  assert set(source.names) <= set(all_files)
  assert 0 < len(source) < len(all_files)  # T91 has images under 256 pixels
  assert source.min_hw >= HR
  assert all(min(s) >= HR for s in source.shapes)


def test_deterministic_per_seed_and_step(source):
  a = patches.sample_batch(source, 7, 3, 4, scale=SCALE)
  b = patches.sample_batch(source, 7, 3, 4, scale=SCALE)
  for k in ("lr", "hr"):
    np.testing.assert_array_equal(a[k], b[k])
  c = patches.sample_batch(source, 7, 4, 4, scale=SCALE)
  d = patches.sample_batch(source, 8, 3, 4, scale=SCALE)
  assert not np.array_equal(a["hr"], c["hr"])
  assert not np.array_equal(a["hr"], d["hr"])


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_shapes_and_dtypes(source, scale):
  batch = patches.sample_batch(source, 0, 0, 3, scale=scale, lr_size=16)
  assert set(batch) == {"lr", "hr"}
  assert batch["lr"].shape == (3, 16, 16, 3) and batch["lr"].dtype == np.uint8
  assert batch["hr"].shape == (3, 16 * scale, 16 * scale, 3) and batch["hr"].dtype == np.uint8


def test_calibration_batch_is_step_zero(source):
  a = patches.calibration_batch(source, 5, scale=SCALE, batch_size=2, lr_size=16)
  b = patches.sample_batch(source, 5, 0, 2, scale=SCALE, lr_size=16)
  np.testing.assert_array_equal(a["hr"], b["hr"])


def test_lr_is_bicubic_of_hr(source):
  batch = patches.sample_batch(source, 1, 0, 4, scale=SCALE, augment=False)
  for lr, hr in zip(batch["lr"], batch["hr"]):
    np.testing.assert_array_equal(imresize(hr, 1 / SCALE, matlab_exact=False), lr)


def test_augmentation_keeps_crops_and_correspondence(source):
  plain = patches.sample_batch(source, 2, 5, 16, scale=SCALE, augment=False)
  aug = patches.sample_batch(source, 2, 5, 16, scale=SCALE, augment=True)
  transforms = []
  for i in range(16):
    # The augmented patch is one of the 8 flips/rotations of the same crop, the same for LR/HR.
    hr_k = [k for k, t in enumerate(_dihedral(plain["hr"][i])) if np.array_equal(t, aug["hr"][i])]
    lr_k = [k for k, t in enumerate(_dihedral(plain["lr"][i])) if np.array_equal(t, aug["lr"][i])]
    assert hr_k and set(hr_k) & set(lr_k), i
    transforms.append(hr_k[0])
    diff = np.abs(imresize(aug["hr"][i], 1 / SCALE, matlab_exact=False).astype(int) - aug["lr"][i])
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999
  assert len(set(transforms)) > 2  # augmentation really happens


def test_lazy_source_gives_the_same_batches(source, calib_dir):
  lazy = patches.load_patch_source(calib_dir, HR, in_memory=False)
  assert lazy.images is None and lazy.names == source.names and lazy.shapes == source.shapes
  a = patches.sample_batch(source, 3, 1, 2, scale=SCALE)
  b = patches.sample_batch(lazy, 3, 1, 2, scale=SCALE)
  for k in ("lr", "hr"):
    np.testing.assert_array_equal(a[k], b[k])


def test_source_errors(tmp_path, source):
  with pytest.raises(FileNotFoundError, match="not found"):
    patches.load_patch_source(tmp_path / "missing", 64)
  with pytest.raises(FileNotFoundError, match="No image files"):
    patches.load_patch_source(tmp_path, 64)
  rng = np.random.default_rng(0)
  save_png(tmp_path / "small.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
  with pytest.raises(ValueError, match="too small"):
    patches.load_patch_source(tmp_path, 64)
  save_png(tmp_path / "big.png", rng.integers(0, 256, (70, 80, 3), dtype=np.uint8))
  small_ok = patches.load_patch_source(tmp_path, 64)
  assert small_ok.names == ("big.png",)
  with pytest.raises(ValueError, match="min_size=128"):
    patches.sample_batch(small_ok, 0, 0, 1, scale=2)
  with pytest.raises(ValueError, match="positive integer"):
    patches.sample_batch(source, 0, 0, 0, scale=SCALE)


def batch_from_sources(folder, sources, *, scale: int, lr_size: int = 64) -> dict:
  """Rebuilds a batch from the reference's ``file:y:x`` records with the package's own patch
  cutting (plain HR crops, no augmentation, bicubic LR)."""
  cache = {}
  lrs, hrs = [], []
  for entry in sources:
    name, y, x = entry.rsplit(":", 2)
    y, x = int(y), int(x)
    if name not in cache:
      cache[name] = load_rgb(folder / name)
    lr, hr = patches.make_patch_pair(cache[name], y, x, lr_size * scale, scale)
    lrs.append(lr)
    hrs.append(hr)
  return {"lr": np.stack(lrs), "hr": np.stack(hrs)}


def test_reproduces_reference_calibration_batch(reference, calib_dir):
  ref = patches.load_batch_file(reference / "calib_x4.npz")
  assert ref["lr"].shape == (32, 64, 64, 3) and ref["hr"].shape == (32, 256, 256, 3)
  ours = batch_from_sources(calib_dir, list(ref["source"]), scale=4)
  np.testing.assert_array_equal(ours["hr"], ref["hr"])  # plain crops: no flip / rotation
  diff = np.abs(ours["lr"].astype(int) - ref["lr"])
  assert diff.max() <= 1
  # Only float ties (x.5 exactly in float64; the reference ran in float32) may differ.
  assert (diff == 0).mean() >= 0.9999


def test_load_batch_file_errors(tmp_path):
  lr = np.zeros((2, 8, 8, 3), np.uint8)
  hr = np.zeros((2, 16, 16, 3), np.uint8)
  np.savez(tmp_path / "ok.npz", lr=lr)
  got = patches.load_batch_file(tmp_path / "ok.npz")
  assert got["hr"] is None and got["lr"].shape == lr.shape
  with pytest.raises(FileNotFoundError):
    patches.load_batch_file(tmp_path / "missing.npz")
  (tmp_path / "junk.npz").write_text("not an archive")
  cases = {
      "npy": None,
      "nolr": dict(hr=hr),
      "dtype": dict(lr=lr.astype(np.float32)),
      "shape": dict(lr=lr[..., :1]),
      "ndim": dict(lr=lr[0]),
      "hrcount": dict(lr=lr, hr=hr[:1]),
      "hrdtype": dict(lr=lr, hr=hr.astype(np.int16)),
      "hrsize": dict(lr=lr, hr=hr[:, :15]),
  }
  np.save(tmp_path / "npy.npy", lr)
  with pytest.raises(ValueError, match="not a readable"):
    patches.load_batch_file(tmp_path / "junk.npz")
  with pytest.raises(ValueError, match=".npy"):
    patches.load_batch_file(tmp_path / "npy.npy")
  for name, arrays in cases.items():
    if arrays is None:
      continue
    np.savez(tmp_path / f"{name}.npz", **arrays)
    with pytest.raises(ValueError):
      patches.load_batch_file(tmp_path / f"{name}.npz")


@pytest.mark.parametrize("num_workers", [1, 3])
def test_prefetch_matches_direct_sampling(source, num_workers):
  kw = dict(scale=SCALE, lr_size=16)
  put_calls = []

  def put(batch):
    put_calls.append(threading.current_thread().name)
    return {k: v + 0 for k, v in batch.items()}

  with patches.prefetch_stream(source, 11, 5, 2, num_steps=6, buffer=2, num_workers=num_workers,
                               put=put, **kw) as stream:
    got = list(stream)
  assert len(got) == 6 and len(put_calls) == 6
  assert threading.current_thread().name not in put_calls  # ran in the background
  for i, batch in enumerate(got):
    want = patches.sample_batch(source, 11, 5 + i, 2, **kw)
    for k in ("lr", "hr"):
      np.testing.assert_array_equal(batch[k], want[k])


def test_prefetch_reraises_producer_errors(source):
  calls = []

  def put(batch):
    calls.append(1)
    if len(calls) == 2:
      raise RuntimeError("boom in producer")
    return batch

  stream = patches.prefetch_stream(source, 0, 0, 1, scale=SCALE, lr_size=16, put=put)
  next(stream)
  with pytest.raises(RuntimeError, match="boom in producer"):
    next(stream)
  with pytest.raises(StopIteration):
    next(stream)
  assert not stream._thread.is_alive()  # pylint: disable=protected-access


def test_prefetch_close_stops_an_endless_stream(source):
  stream = patches.prefetch_stream(source, 0, 100, 1, scale=SCALE, lr_size=16, buffer=1)
  first = next(stream)
  np.testing.assert_array_equal(
      first["hr"], patches.sample_batch(source, 0, 100, 1, scale=SCALE, lr_size=16)["hr"])
  stream.close()
  assert not stream._thread.is_alive()  # pylint: disable=protected-access
  with pytest.raises(StopIteration):
    next(stream)
