"""The Table-3 sweep: cells, shards, the combined table, and skipping finished cells.

The end-to-end test runs 2 tiny cells (x4 FP and x4 W2 MinMax on two 48x48 Set5 crops, a
2-patch calibration batch, the random-weight SwinIR-light checkpoint) in-process.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from twodquant_jax import pipeline, settings, sweep
from shared_paths import REPO_ROOT
from twodquant_jax.report import table3

from test_cli import _main, _tiny_benchmark


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
  monkeypatch.syspath_prepend(str(REPO_ROOT))


def _config(**sweep_fields):
  from configs import sweep as sweep_config
  c = sweep_config.get_config()
  for k, v in sweep_fields.items():
    setattr(c.sweep, k, v)
  return c


def test_cells_and_shards():
  all_cells = sweep.cells(settings.parse(_config()).sweep)
  names = [c.name for c in all_cells]
  assert names == [f"x{s}_{b}" for s in (2, 3, 4) for b in ("fp", "w2", "w3", "w4")]
  assert all(c.methods == ("fp", "bicubic") for c in all_cells if c.bits is None)
  assert all(c.methods == ("minmax", "percentile", "dobi", "2dquant")
             for c in all_cells if c.bits is not None)
  # 3 interleaved shards: disjoint, together every cell, each with a mix of scales.
  shards = [sweep.shard_cells(all_cells, (i, 3)) for i in range(3)]
  assert sorted(c.name for s in shards for c in s) == sorted(names)
  assert [c.name for c in shards[1]] == ["x2_w2", "x3_fp", "x3_w4", "x4_w3"]
  only = sweep.cells(settings.parse(_config(scales="4", bits="3", methods="dobi")).sweep)
  assert [(c.name, c.methods) for c in only] == [("x4_w3", ("dobi",))]
  c = _config()
  c.model.checkpoint = "ckpt_x{scale}.pth"
  parsed = settings.parse(c)
  fp = sweep.settings_of(parsed, sweep.Cell(3, None, ("fp",)))
  assert (fp.scale, fp.bits, fp.methods, fp.dqc, fp.model.checkpoint) == (
      3, 32, ("fp",), None, "ckpt_x3.pth")
  given = fp.config_dict
  assert (given["scale"], given["bits"], given["method"]) == (3, 32, "fp")
  assert given["model"]["checkpoint"] == "ckpt_x3.pth"
  w2 = sweep.settings_of(parsed, sweep.Cell(2, 2, ("dobi", "2dquant")))
  assert (w2.dqc.scale, w2.dqc.bits, set(w2.calibrations)) == (2, 2, {"dobi", "2dquant"})
  assert parsed.config_dict["model"]["checkpoint"] == "ckpt_x{scale}.pth"  # the sweep's: as given


@pytest.mark.parametrize("field,value,message", [
    ("scales", "4,5", "config.sweep.scales must be among 2, 3, 4"),
    ("scales", "", "config.sweep.scales must be distinct"),
    ("bits", "1", "config.sweep.bits must be between 2 and 8"),
    ("methods", "fp,nope", "config.sweep.methods must be"),
    ("shard", "2/2", "config.sweep.shard must be 'i/n'"),
    ("shard", "1", "config.sweep.shard must be 'i/n'"),
])
def test_bad_sweep_values(field, value, message):
  with pytest.raises(ValueError, match=message):
    settings.parse(_config(**{field: value}))


def test_table_marks_missing_cells():
  cells = [{"cell": "x4_fp", "scale": 4, "bits": None, "methods": ["fp"]},
           {"cell": "x4_w2", "scale": 4, "bits": 2, "methods": ["dobi", "minmax"]}]
  fp = {"methods": {"fp": {"datasets": {"Set5": {"psnr": 30.0, "ssim": 0.9}}}}}
  table = table3.build(cells, {"x4_fp": fp, "x4_w2": None})
  assert table["missing"] == ["x4_w2"] and table["finished"] == ["x4_fp"]
  rows = table["scales"]["4"]["rows"]
  assert [(r["method"], r["bits"]) for r in rows] == [("fp", "32/32"), ("minmax", "2/2"),
                                                      ("dobi", "2/2")]
  md = table3.markdown(table)
  assert "| FP | 32/32 | 30.00 | 0.9000 |" in md
  assert "| DOBI | 2/2 | - | - |" in md
  assert "Missing cells (no finished results.json): x4_w2." in md


@pytest.mark.slow
def test_sweep_of_two_tiny_cells(tmp_path, reference, benchmarks, monkeypatch, caplog):
  root, workdir = tmp_path / "bench", tmp_path / "sweep"
  _tiny_benchmark(root, benchmarks)
  batch = tmp_path / "calib.npz"
  np.savez(batch, lr=np.load(reference / "calib_x4.npz")["lr"][:2])
  c = _config(scales="4", bits="2", methods="fp,minmax")
  c.model.checkpoint = str(reference / "swinir_light_x4_random.pth")
  c.data.root = str(root)
  c.eval.datasets = "Set5"
  c.calib.batch_file = str(batch)
  c.progress = False

  loads = []
  real_prepare = pipeline.prepare
  monkeypatch.setattr(pipeline, "prepare", lambda s, **kw: loads.append(s.scale) or
                      real_prepare(s, **kw))
  caplog.set_level(logging.INFO)
  table = sweep.run(settings.parse(c), workdir)
  assert loads == [4]  # the checkpoint is read once for both cells of the scale

  # The combined table is the cells' results.json, row for row.
  assert table["missing"] == [] and table["finished"] == ["x4_fp", "x4_w2"]
  assert json.loads((workdir / "table3.json").read_text()) == table
  rows = table["scales"]["4"]["rows"]
  assert [(r["method"], r["bits"], r["cell"]) for r in rows] == [
      ("fp", "32/32", "x4_fp"), ("minmax", "2/2", "x4_w2")]
  for row in rows:
    results = json.loads((workdir / row["cell"] / "results.json").read_text())
    assert results["complete"] is True
    got = results["methods"][row["method"]]["datasets"]["Set5"]
    fidelity = {"vs_fp": got["vs_fp"]} if row["method"] != "fp" else {}
    assert row["datasets"]["Set5"] == {"psnr": got["psnr"], "ssim": got["ssim"], **fidelity}
  md = (workdir / "table3.md").read_text()
  fp = rows[0]["datasets"]["Set5"]
  assert f"| FP | 32/32 | {fp['psnr']:.2f} | {fp['ssim']:.4f} |" in md
  assert rows[1]["datasets"]["Set5"]["psnr"] < fp["psnr"]  # W2 MinMax is worse than FP
  assert f"| {rows[1]['datasets']['Set5']['vs_fp']:.2f} |" in md and "Set5 vs FP" in md

  # A rerun skips both cells (nothing is read or run) and rebuilds the same table.
  caplog.clear()
  before = {p: p.stat().st_mtime_ns for p in workdir.glob("*/results.json")}
  assert sweep.run(settings.parse(c), workdir) == table
  assert loads == [4]
  assert {p: p.stat().st_mtime_ns for p in workdir.glob("*/results.json")} == before
  skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
  assert skipped == [f"skipping x4_fp: finished ({workdir / 'x4_fp' / 'results.json'})",
                     f"skipping x4_w2: finished ({workdir / 'x4_w2' / 'results.json'})"]

  # An unfinished cell (killed before its end) is not skipped, and collect names it missing.
  results = json.loads((workdir / "x4_w2" / "results.json").read_text())
  (workdir / "x4_w2" / "results.json").write_text(json.dumps({**results, "complete": False}))
  c.sweep.collect = True
  table = sweep.run(settings.parse(c), workdir)
  assert table["missing"] == ["x4_w2"] and loads == [4]
  assert "Missing cells (no finished results.json): x4_w2." in (workdir / "table3.md").read_text()


def test_main_rejects_bad_sweep_values_cleanly(tmp_path):
  r = _main(["--config=configs/sweep.py", "--config.sweep.shard=2/2",
             f"--workdir={tmp_path / 'w'}"], timeout=120)
  assert r.returncode != 0
  assert "config.sweep.shard must be 'i/n'" in r.stderr + r.stdout
  assert "Traceback" not in r.stderr
  assert not (tmp_path / "w").exists()
