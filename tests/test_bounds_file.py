"""A bounds file must fit the run: other bits, another scale or another quantizer count is refused
in one line naming both values, for our bounds.json, the authors' JSON and their net_Q .pth."""

import json
import logging

import numpy as np
import pytest

from configs import base
from twodquant_jax import pipeline, settings
from twodquant_jax.formats import bounds_file
from twodquant_jax.formats.torch_pickle import load_pth
from twodquant_jax.nn import names as qnames
from twodquant_jax.nn.swinir import variable_shapes
from pth_craft import STORAGE_NAMES, TensorRecord, write_pth

AUTHORS_JSON = "ref2dq_x4_w4_random_b4.json"  # records "scale": 4, "bit": 4


@pytest.fixture(scope="module")
def like():
  return variable_shapes(4, "quant", 4)["quant"]


def _ours(reference, tmp_path, drop: int = 0):
  """Our bounds.json of the authors' x4 W4 bounds (meta bits=4, scale=4), less `drop` entries."""
  bounds = json.loads((reference / AUTHORS_JSON).read_text())["bounds"]
  for name in sorted(bounds)[:drop]:
    del bounds[name]
  path = tmp_path / "bounds.json"
  bounds_file.save_bounds(path, qnames.dict_to_tree(bounds), {"bits": 4, "scale": 4})
  return path


def _net_q(reference, tmp_path, drop: int = 0):
  """An authors'-style quantized checkpoint: the x4 network's state dict plus
  `<quantizer>.lower_bound/.upper_bound` (1-element tensors), with no bit width recorded."""
  sd = dict(load_pth(reference / "swinir_light_x4_random.pth")["params"])
  bounds = json.loads((reference / AUTHORS_JSON).read_text())["bounds"]
  for name in sorted(bounds)[drop:]:
    sd[f"{name}.lower_bound"] = np.float32([bounds[name][0]])
    sd[f"{name}.upper_bound"] = np.float32([bounds[name][1]])
  storages, records = {}, []
  for i, (name, t) in enumerate(sd.items()):
    t = np.ascontiguousarray(t)
    storages[str(i)] = t.ravel()
    strides = [s // t.itemsize for s in t.strides]
    records.append(TensorRecord(name, str(i), 0, t.shape, strides, STORAGE_NAMES[t.dtype]))
  return write_pth(tmp_path / "net_Q_x4.pth", storages, records)


def _refused(path, like, message, **run):
  with pytest.raises(ValueError, match=message) as e:
    bounds_file.load_bounds(path, like, **run)
  assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_matching_files_load(reference, tmp_path, like):
  want = json.loads((reference / AUTHORS_JSON).read_text())["bounds"]
  for path in (_ours(reference, tmp_path), reference / AUTHORS_JSON, _net_q(reference, tmp_path)):
    got = qnames.tree_to_dict(bounds_file.load_bounds(path, like, bits=4, scale=4))
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(got)],
                               rtol=1e-6)


@pytest.mark.parametrize("which", ["ours", "authors_json"])
def test_other_bits_or_scale_is_refused(reference, tmp_path, like, which):
  path = _ours(reference, tmp_path) if which == "ours" else reference / AUTHORS_JSON
  _refused(path, like, r"holds W4 bounds, but this run is W2 \(config.bits=2\): pass a W2 "
           r"bounds file or --config.bits=4", bits=2, scale=4)
  _refused(path, like, r"holds x4 bounds, but this run is x3 \(config.scale=3\): pass an x3 "
           r"bounds file or --config.scale=4", bits=4, scale=3)


def test_net_q_scale_is_checked_and_assumed_bits_logged(reference, tmp_path, like, caplog):
  path = _net_q(reference, tmp_path)
  _refused(path, like, r"holds x4 bounds, but this run is x2 \(config.scale=2\)", bits=4,
           scale=2)
  with caplog.at_level(logging.INFO):
    bounds_file.load_bounds(path, like, bits=3, scale=4)
  assert any("records no bits; assuming W3 (config.bits=3)" in r.getMessage()
             for r in caplog.records)


@pytest.mark.parametrize("which", ["ours", "net_q"])
def test_other_quantizer_count_is_refused(reference, tmp_path, like, which):
  make = _ours if which == "ours" else _net_q
  path = make(reference, tmp_path, drop=2)
  _refused(path, like, "holds 382 quantizer bounds, but this model has 384 quantizers",
           bits=4, scale=4)


def test_a_run_refuses_bounds_of_other_bits(reference, benchmarks, tmp_path):
  """The pipeline passes the run's bits and scale: a W2 run given W4 bounds stops before any
  evaluation, naming the file and both bit widths."""
  hr = tmp_path / "bench" / "Set5" / "HR"
  hr.mkdir(parents=True)
  (hr / "baby.png").write_bytes((benchmarks / "Set5" / "HR" / "baby.png").read_bytes())
  c = base.get_config(scale=4, bits=2, method="dobi")
  c.data.root, c.eval.datasets, c.progress = str(tmp_path / "bench"), "Set5", False
  c.model.checkpoint = str(reference / "swinir_light_x4_random.pth")
  c.model.bounds = str(reference / AUTHORS_JSON)
  with pytest.raises(ValueError, match=r"holds W4 bounds, but this run is W2 \(config.bits=2\)"):
    pipeline.run(settings.parse(c), tmp_path / "run")
  assert not (tmp_path / "run" / "results.md").exists()
