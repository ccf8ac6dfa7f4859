"""TFDS without TensorFlow: build benchmark sets as array_record and read them back."""

import numpy as np
import pytest

from twodquant_jax.data import tfds_data
from twodquant_jax.data.benchmarks import load_benchmark
from twodquant_jax.data.images import load_rgb
from twodquant_jax.data.images import save_png


def _assert_same(got, want):
  assert [g.name for g in got] == [w.name for w in want]
  for g, w in zip(got, want):
    assert g.lr.dtype == np.uint8 and g.hr.dtype == np.uint8
    np.testing.assert_array_equal(g.lr, w.lr, err_msg=g.name)
    np.testing.assert_array_equal(g.hr, w.hr, err_msg=g.name)


@pytest.mark.parametrize("scale", [4, 3])
def test_set5_round_trip_equals_folder_loader(benchmarks, tmp_path, scale):
  builder = tfds_data.prepare_benchmark(benchmarks, "Set5", scale, tmp_path)
  assert builder.is_prepared()
  files = [p.name for p in builder.data_path.iterdir()]
  assert any(".array_record" in f for f in files), files
  # Random access through the builder's data source, as a TFDS user would read it.
  source = builder.as_data_source("test")
  assert len(source) == 5
  record = source[0]
  assert set(record) == {"hr", "lr", "name"} and record["name"] == b"baby"
  # Reading needs only the data_dir, not the image folder.
  got = tfds_data.load_benchmark_tfds(tmp_path, "Set5", scale)
  _assert_same(got, load_benchmark(benchmarks, "Set5", scale))
  # Preparing again reuses the data.
  tfds_data.prepare_benchmark(benchmarks, "Set5", scale, tmp_path)
  _assert_same(tfds_data.load_benchmark_tfds(tmp_path, "Set5", scale), got)


def test_set_without_official_lr(benchmarks, tmp_path):
  # A two-image set (one of them single-channel): LR comes from bicubic downscaling.
  root = tmp_path / "sets"
  for name in ("bridge", "baboon"):
    save_png(root / "Tiny" / "HR" / f"{name}.png",
             load_rgb(benchmarks / "Set14" / "HR" / f"{name}.png")[:99, :130])
  for exact in (True, False):  # two configs side by side in one data_dir
    tfds_data.prepare_benchmark(root, "Tiny", 2, tmp_path / "tfds", matlab_exact=exact)
  for exact in (True, False):
    got = tfds_data.load_benchmark_tfds(tmp_path / "tfds", "Tiny", 2, matlab_exact=exact)
    _assert_same(got, load_benchmark(root, "Tiny", 2, matlab_exact=exact))
    assert got[0].hr.shape == (98, 130, 3) and got[0].lr.shape == (49, 65, 3)


def test_unprepared_set_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="prepare_benchmark"):
    tfds_data.load_benchmark_tfds(tmp_path, "Set5", 4)


def test_div2k_unavailable_is_a_clear_error(tmp_path):
  with pytest.raises(RuntimeError, match="tfds build div2k/bicubic_x4"):
    tfds_data.div2k_data_source(4, data_dir=tmp_path, download=False)
