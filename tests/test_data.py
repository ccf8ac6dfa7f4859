"""Image loading (mode conversions, clear errors) and benchmark-set loading."""

import numpy as np
from PIL import Image
import pytest

from twodquant_jax.data.benchmarks import BenchmarkImage
from twodquant_jax.data.benchmarks import list_benchmarks
from twodquant_jax.data.benchmarks import load_benchmark
from twodquant_jax.data.bicubic import imresize
from twodquant_jax.data.images import check_min_size
from twodquant_jax.data.images import load_rgb
from twodquant_jax.data.images import mod_crop
from twodquant_jax.data.images import save_png
from twodquant_jax.data.images import to_uint8


def _rng(seed=0):
  return np.random.default_rng(seed)


# ---- load_rgb mode conversions. ----

def test_grayscale_is_replicated(tmp_path):
  gray = _rng().integers(0, 256, size=(9, 13), dtype=np.uint8)
  Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
  img = load_rgb(tmp_path / "g.png")
  assert img.shape == (9, 13, 3) and img.dtype == np.uint8
  for c in range(3):
    np.testing.assert_array_equal(img[..., c], gray)


def test_gray_alpha_drops_alpha(tmp_path):
  la = _rng(1).integers(0, 256, size=(6, 7, 2), dtype=np.uint8)
  Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
  img = load_rgb(tmp_path / "la.png")
  for c in range(3):
    np.testing.assert_array_equal(img[..., c], la[..., 0])


def test_rgba_drops_alpha_without_compositing(tmp_path):
  rgba = _rng(2).integers(0, 256, size=(8, 5, 4), dtype=np.uint8)
  rgba[0, 0, 3] = 0  # fully transparent pixel keeps its colour
  Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
  np.testing.assert_array_equal(load_rgb(tmp_path / "a.png"), rgba[..., :3])


def test_16_bit_is_scaled_with_rounding(tmp_path):
  values = np.array([[0, 128, 129, 257, 32896, 65535]], dtype=np.uint16)
  # 65535 / 255 = 257, so v -> round(v / 257): 128 -> 0.498 -> 0, 129 -> 0.502 -> 1.
  expected = np.array([[0, 0, 1, 1, 128, 255]], dtype=np.uint8)
  Image.fromarray(values).save(tmp_path / "d.png")
  assert Image.open(tmp_path / "d.png").mode.startswith("I")
  img = load_rgb(tmp_path / "d.png")
  for c in range(3):
    np.testing.assert_array_equal(img[..., c], expected)


def test_palette_is_expanded(tmp_path):
  idx = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
  palette = [10, 20, 30, 200, 100, 0, 5, 250, 128] + [0] * (256 * 3 - 9)
  p = Image.fromarray(idx, mode="P")
  p.putpalette(palette)
  p.save(tmp_path / "p.png")
  assert Image.open(tmp_path / "p.png").mode == "P"
  colours = np.array(palette[:9], dtype=np.uint8).reshape(3, 3)
  np.testing.assert_array_equal(load_rgb(tmp_path / "p.png"), colours[idx])


def test_one_bit_maps_to_0_and_255(tmp_path):
  bits = _rng(3).random((7, 9)) > 0.5
  Image.fromarray(bits).save(tmp_path / "b.png")
  assert Image.open(tmp_path / "b.png").mode == "1"
  img = load_rgb(tmp_path / "b.png")
  np.testing.assert_array_equal(img[..., 1], np.where(bits, 255, 0).astype(np.uint8))


# ---- load_rgb errors. ----

def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.png"):
    load_rgb(tmp_path / "nope.png")


def test_text_file_named_png(tmp_path):
  path = tmp_path / "notes.png"
  path.write_text("this is not an image\n")
  with pytest.raises(ValueError) as e:
    load_rgb(path)
  assert str(path) in str(e.value)


def test_truncated_png(tmp_path):
  rgb = _rng(4).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)  # noise: compresses badly
  good = tmp_path / "good.png"
  Image.fromarray(rgb).save(good)
  data = good.read_bytes()
  bad = tmp_path / "cut.png"
  bad.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError) as e:
    load_rgb(bad)
  assert str(bad) in str(e.value)
  np.testing.assert_array_equal(load_rgb(good), rgb)


def test_min_size(tmp_path):
  Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "s.png")
  assert load_rgb(tmp_path / "s.png", min_hw=(4, 6)).shape == (4, 6, 3)
  with pytest.raises(ValueError, match="s.png"):
    load_rgb(tmp_path / "s.png", min_hw=5)
  with pytest.raises(ValueError, match="thing"):
    check_min_size(np.zeros((3, 10)), (4, 4), "thing")


# ---- Small helpers. ----

def test_save_png_round_trip_creates_dirs(tmp_path):
  img = _rng(5).integers(0, 256, size=(5, 8, 3), dtype=np.uint8)
  path = tmp_path / "a" / "b" / "x.png"
  save_png(path, img)
  np.testing.assert_array_equal(load_rgb(path), img)
  with pytest.raises(ValueError):
    save_png(tmp_path / "y.png", img.astype(np.float32))


def test_mod_crop():
  img = np.arange(7 * 10 * 3).reshape(7, 10, 3)
  np.testing.assert_array_equal(mod_crop(img, 3), img[:6, :9])
  np.testing.assert_array_equal(mod_crop(img[..., 0], 4), img[:4, :8, 0])
  assert mod_crop(img, 1).shape == img.shape


def test_float_conversions():
  all_levels = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(to_uint8(all_levels.astype(np.float32) / 255.0), all_levels)
  np.testing.assert_array_equal(to_uint8(np.array([-0.5, 1.7, np.float64(0.5 / 255)])),
                                [0, 255, 0])  # clipped; 0.5 rounds half to even -> 0
  assert to_uint8(np.array([2.5 / 255]))[0] == 2  # half to even, not half up
  assert to_uint8(np.array([3.5 / 255]))[0] == 4


# ---- Benchmarks. ----

@pytest.mark.parametrize("scale", [2, 3, 4])
def test_set5_uses_official_lr(benchmarks, scale):
  images = load_benchmark(benchmarks, "Set5", scale)
  assert [im.name for im in images] == ["baby", "bird", "butterfly", "head", "woman"]
  for im in images:
    assert isinstance(im, BenchmarkImage)
    assert im.hr.dtype == np.uint8 and im.lr.dtype == np.uint8
    assert im.hr.shape[0] == im.lr.shape[0] * scale and im.hr.shape[1] == im.lr.shape[1] * scale
    official = load_rgb(benchmarks / "Set5" / "LR_bicubic" / f"X{scale}" / f"{im.name}x{scale}.png")
    np.testing.assert_array_equal(im.lr, official)
    full = load_rgb(benchmarks / "Set5" / "HR" / f"{im.name}.png")
    np.testing.assert_array_equal(im.hr, full[:im.hr.shape[0], :im.hr.shape[1]])


def test_generated_lr_without_lr_folder(tmp_path):
  hr_dir = tmp_path / "Urban100" / "HR"
  sizes = {"a": (20, 20), "b": (23, 21), "c": (37, 50)}
  for stem, (h, w) in sizes.items():
    save_png(hr_dir / f"{stem}.png", _rng(len(stem) + h).integers(0, 256, (h, w, 3), np.uint8))
  images = load_benchmark(tmp_path, "Urban100", 4)
  assert [im.name for im in images] == ["a", "b", "c"]
  expected_lr = {"a": (5, 5), "b": (5, 5), "c": (9, 12)}
  for im in images:
    assert im.lr.shape == expected_lr[im.name] + (3,)
    assert im.hr.shape == (im.lr.shape[0] * 4, im.lr.shape[1] * 4, 3)
    np.testing.assert_array_equal(im.lr, imresize(im.hr, 0.25, matlab_exact=True))
  assert list_benchmarks(tmp_path) == ["Urban100"]


def test_too_small_hr_is_a_clear_error(tmp_path):
  save_png(tmp_path / "Tiny" / "HR" / "t.png", np.zeros((3, 9, 3), np.uint8))
  with pytest.raises(ValueError, match="t.png"):
    load_benchmark(tmp_path, "Tiny", 4)


def test_missing_or_empty_set(tmp_path):
  with pytest.raises(FileNotFoundError, match="Manga109"):
    load_benchmark(tmp_path, "Manga109", 2)
  (tmp_path / "Empty" / "HR").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="no images"):
    load_benchmark(tmp_path, "Empty", 2)


def test_lr_folder_with_wrong_shape_or_missing_file(tmp_path):
  save_png(tmp_path / "S" / "HR" / "x.png", np.zeros((24, 24, 3), np.uint8))
  save_png(tmp_path / "S" / "LR_bicubic" / "X2" / "xx2.png", np.zeros((7, 8, 3), np.uint8))
  with pytest.raises(ValueError, match="xx2.png"):
    load_benchmark(tmp_path, "S", 2)
  (tmp_path / "S" / "LR_bicubic" / "X4").mkdir()
  with pytest.raises(FileNotFoundError, match="xx4.png"):
    load_benchmark(tmp_path, "S", 4)


def test_set14_with_single_channel_bridge(benchmarks):
  images = load_benchmark(benchmarks, "Set14", 3)
  assert len(images) == 14
  bridge = {im.name: im for im in images}["bridge"]
  assert bridge.hr.shape == (510, 510, 3) and bridge.lr.shape == (170, 170, 3)
  assert np.array_equal(bridge.hr[..., 0], bridge.hr[..., 1])
  assert np.array_equal(bridge.hr[..., 0], bridge.hr[..., 2])
  for im in images:
    assert im.hr.shape == (im.lr.shape[0] * 3, im.lr.shape[1] * 3, 3)


def test_list_benchmarks_on_shared(benchmarks):
  assert list_benchmarks(benchmarks) == ["Set5", "Set14", "B100"]
