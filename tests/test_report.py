"""The report figures and their inputs: `collect` builds them from memory alone, `from_workdir`
reads the same back from a finished run, `ptq.stats` counts what it claims, and every figure
draws."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import base
from twodquant_jax import pipeline
from twodquant_jax import settings as run_settings
from twodquant_jax.data.benchmarks import BenchmarkImage
from twodquant_jax.data.images import load_rgb, save_png
from twodquant_jax.eval.metrics import psnr_y
from twodquant_jax.nn import names as qnames
from twodquant_jax.ptq import dobi, stats
from twodquant_jax.report import figures
from twodquant_jax.report import inputs as figure_inputs

HIST = qnames.quantizer_order()[:2]  # two real quantizer names


def _check_png(path: Path, min_side: int = 200) -> None:
  img = np.asarray(Image.open(path).convert("RGB"))
  assert min(img.shape[:2]) >= min_side, (path, img.shape)
  colors = np.unique(img.reshape(-1, 3)[::7], axis=0)
  assert len(colors) > 20, (path, len(colors))  # not a blank canvas


def _assert_same_inputs(a: figures.FigureInputs, b: figures.FigureInputs) -> None:
  """Field by field (arrays by value)."""
  assert (a.scale, a.bits, a.num_patches, a.hist_names) == (b.scale, b.bits, b.num_patches,
                                                             b.hist_names)
  assert a.bounds == b.bounds and list(a.bounds) == list(b.bounds)
  assert a.percentiles == b.percentiles and list(a.percentiles) == list(b.percentiles)
  assert a.dqc_records == b.dqc_records
  assert list(a.hists) == list(b.hists)
  for name in a.hists:
    assert set(a.hists[name]) == set(b.hists[name])
    for key, v in a.hists[name].items():
      np.testing.assert_array_equal(v, b.hists[name][key], err_msg=f"{name} {key}")
  assert [(v.dataset, v.image) for v in a.visuals] == [(v.dataset, v.image) for v in b.visuals]
  for va, vb in zip(a.visuals, b.visuals):
    np.testing.assert_array_equal(va.hr, vb.hr)
    assert list(va.srs) == list(vb.srs) and va.psnrs == vb.psnrs
    for m in va.srs:
      np.testing.assert_array_equal(va.srs[m], vb.srs[m], err_msg=m)


# ---------------------------------------------------------------------------------------------
# ptq.stats


def test_bound_fractions_counts():
  x = np.arange(10, dtype=np.float32).reshape(2, 5)
  below, upto = stats.bound_fractions(x, np.array([0.0, 2.5], np.float32),
                                      np.array([9.0, 4.0], np.float32))
  np.testing.assert_allclose(below, [0.0, 0.3])  # min -> 0 %: nothing is clipped up
  np.testing.assert_allclose(upto, [1.0, 0.5])  # max -> 100 %


def test_tensor_stats_against_numpy_counts(monkeypatch):
  """Percentiles and histograms of a small captured tensor equal a direct numpy count."""
  rng = np.random.default_rng(0)
  tensors = {HIST[0]: rng.standard_normal((3, 7, 5)).astype(np.float32),
             HIST[1]: rng.uniform(-2, 5, (4, 9)).astype(np.float32)}
  tensors[HIST[1]][0, :3] = 1.25  # ties at a bound: "at or below u" counts them
  seen = []

  def fake_capture(params, scale, lr):
    seen.append((scale, lr.shape))
    yield 0, {HIST[0]: tensors[HIST[0]]}, 0.0
    yield 1, {HIST[1]: tensors[HIST[1]]}, 0.0

  monkeypatch.setattr(dobi, "iter_captured", fake_capture)
  bounds = {"dobi": {HIST[0]: [-0.5, 0.7], HIST[1]: [0.0, 1.25]},
            "2dquant": {HIST[1]: [-1.0, 3.0]}}
  extra = {"minmax": {HIST[0]: [-9.0, 9.0]}}  # drawn in the histogram, no percentile
  hists, pct = stats.tensor_stats({}, 4, np.zeros((2, 8, 8, 3), np.uint8), bounds, [HIST[0]],
                                  {**bounds, **extra})
  assert seen == [(4, (2, 8, 8, 3))]
  assert set(pct) == {"dobi", "2dquant"} and set(pct["2dquant"]) == {HIST[1]}
  for m, b in bounds.items():
    for name, (lo, hi) in b.items():
      x = tensors[name]
      got = pct[m][name]
      want = (100.0 * np.sum(x < lo) / x.size, 100.0 * np.sum(x <= hi) / x.size)
      np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"{m} {name}")
  assert list(hists) == [HIST[0]]
  h, x = hists[HIST[0]], tensors[HIST[0]]
  assert (h["min"], h["max"], h["numel"]) == (float(x.min()), float(x.max()), x.size)
  assert len(h["counts"]) == stats.HIST_BINS and h["counts"].sum() == x.size
  assert h["edges"][0] < -9.0 and h["edges"][-1] > 9.0  # spans every bound, with a margin
  counts, _ = np.histogram(x, bins=h["edges"].astype(np.float64))
  assert np.abs(counts - h["counts"]).sum() <= 2  # an element on an edge may fall either side


# ---------------------------------------------------------------------------------------------
# collect: from memory only.


def _results(psnrs: dict[str, float | None]) -> dict:
  def entry(p):
    images = {"a": {"psnr": p, "ssim": 0.5}} if p is not None else {}
    return {"datasets": {"Tiny": {"images": images}}}
  return {"scale": 2, "bits": 4, "methods": {m: entry(p) for m, p in psnrs.items()}}


def test_collect_needs_no_disk(tmp_path, monkeypatch):
  """Everything lands in FigureInputs with every file read and the capture pass forbidden."""
  rng = np.random.default_rng(1)
  lr = rng.integers(0, 256, (8, 10, 3), np.uint8)
  hr = rng.integers(0, 256, (16, 20, 3), np.uint8)
  sr_fp, sr_q = (rng.integers(0, 256, (16, 20, 3), np.uint8) for _ in range(2))
  settings = run_settings.FigureSettings(
      scale=2, bits=4, hist_quantizers=(HIST[0], "no.such.quantizer"),
      visual_images=(("Tiny", "a"), ("Tiny", "missing"), ("Nowhere", "a")))
  hist = {"counts": np.arange(4), "edges": np.linspace(0, 1, 5), "min": 0.0, "max": 1.0,
          "numel": 6}
  records = [{"step": 3, "loss": 0.1}, {"step": 1, "loss": 0.3}, {"step": 2, "loss": 0.2}]

  def no_disk(*args, **kwargs):
    raise AssertionError(f"collect read a file: {args}")

  monkeypatch.chdir(tmp_path)  # an empty folder: nothing to find either
  for owner, name in ((builtins, "open"), (Path, "open"), (Path, "read_text"),
                      (Path, "read_bytes"), (np, "load"), (Image, "open"),
                      (dobi, "iter_captured"), (stats, "tensor_stats")):
    monkeypatch.setattr(owner, name, no_disk)
  got = figure_inputs.collect(
      settings, results=_results({"fp": 30.0, "dobi": 20.0, "2dquant": None}),
      bounds={"2dquant": {HIST[0]: np.array([-1.0, 1.0], np.float32)},
              "dobi": {HIST[0]: (-2.0, 2.0)}},
      dqc_records=records, kept_srs={("Tiny", "a"): {"fp": sr_fp, "2dquant": sr_q}},
      datasets={"Tiny": [BenchmarkImage("a", lr, hr)]},
      hists={HIST[0]: hist, HIST[1]: hist}, num_patches=3,
      percentiles={"2dquant": {HIST[0]: (1.0, 99.0)}, "dobi": {HIST[0]: (0.5, 99.5)},
                   "minmax": {}})
  monkeypatch.undo()

  assert (got.scale, got.bits, got.num_patches) == (2, 4, 3)
  assert got.bounds == {"dobi": {HIST[0]: [-2.0, 2.0]}, "2dquant": {HIST[0]: [-1.0, 1.0]}}
  assert list(got.bounds) == ["dobi", "2dquant"]  # the paper's order, whatever was given
  assert got.hist_names == [HIST[0]] and list(got.hists) == [HIST[0]]
  assert got.hists[HIST[0]] is not hist and got.hists[HIST[0]]["numel"] == 6
  assert got.percentiles == {"dobi": {HIST[0]: (0.5, 99.5)}, "2dquant": {HIST[0]: (1.0, 99.0)}}
  assert list(got.percentiles) == ["dobi", "2dquant"]
  assert [r["step"] for r in got.dqc_records] == [1, 2, 3]
  assert [(v.dataset, v.image) for v in got.visuals] == [("Tiny", "a")]
  v = got.visuals[0]
  # Bicubic made from the LR; DOBI kept no SR, so it is left out.
  assert list(v.srs) == ["bicubic", "fp", "2dquant"]
  np.testing.assert_array_equal(v.srs["fp"], sr_fp)
  np.testing.assert_array_equal(v.srs["bicubic"], figure_inputs.bicubic_sr(lr, 2))
  assert v.srs["bicubic"].shape == hr.shape and v.srs["bicubic"].dtype == np.uint8
  assert v.psnrs["fp"] == 30.0  # from results
  assert v.psnrs["2dquant"] == pytest.approx(psnr_y(sr_q, hr, 2))  # measured: not in results
  assert v.psnrs["bicubic"] == pytest.approx(psnr_y(v.srs["bicubic"], hr, 2))


def test_figures_skip_missing_inputs(tmp_path):
  settings = run_settings.FigureSettings(scale=4, bits=4, visual_images=(("Set5", "baby"),))
  got = figure_inputs.collect(settings, results={"methods": {}}, bounds={}, dqc_records=[],
                              kept_srs=None, datasets={}, hists={}, percentiles={},
                              num_patches=0)
  assert figures.write_all(got, tmp_path / "figures") == []
  assert not (tmp_path / "figures").exists()


def test_figure_settings_from_config_and_results():
  config = base.get_config(scale=3, bits=2, method="2dquant")
  config.report.visual_images = "Set5/baby, Set14/comic"
  config.eval.batch_size = 2
  fs = run_settings.figure_settings(config)
  assert fs.visual_images == (("Set5", "baby"), ("Set14", "comic"))
  assert (fs.scale, fs.bits, fs.eval_batch_size) == (3, 2, 2)
  assert len(fs.hist_quantizers) == 3
  # results.json holds the config as a plain dict: the same settings come back.
  assert run_settings.figure_settings(json.loads(json.dumps(config.to_dict()))) == fs
  config.report.visual_images = "baby"
  with pytest.raises(ValueError, match="config.report.visual_images: 'baby'"):
    run_settings.figure_settings(config)


def test_best_crop_and_quantizer_kinds():
  img = np.zeros((40, 60, 3), np.uint8)
  img[20:30, 35:45] = 255 * (np.indices((10, 10)).sum(0) % 2)[..., None]
  assert figures.best_crop(img, 10) == (20, 35)
  order = qnames.quantizer_order()
  assert len(order) == len(set(order)) == 384
  kinds = [qnames.quantizer_kind(n) for n in order]
  assert (kinds.count("weight"), kinds.count("activation"),
          kinds.count("attention BMM operand")) == (144, 144, 96)


# ---------------------------------------------------------------------------------------------
# from_workdir: a finished workdir read back.


def _fake_workdir(workdir: Path, reference: Path, benchmarks: Path) -> tuple[dict, dict]:
  """A finished all-methods workdir written by hand: bounds, a DQC log, SR PNGs (none for
  DOBI), saved statistics; returns (results, what the statistics were)."""
  hr = load_rgb(benchmarks / "Set5" / "HR" / "baby.png")[160:224, 160:224]
  save_png(workdir.parent / "bench" / "Tiny" / "HR" / "img.png", hr)
  dobi_b = json.loads((reference / "ref2dq_x4_w4_random_b4.json").read_text())["bounds"]
  rng = np.random.default_rng(0)
  f32 = lambda v: float(np.float32(v))  # bounds are float32, as a run writes them
  dq = {k: [f32(lo + 0.1 * (hi - lo) * rng.uniform(-1, 1)),
            f32(hi - 0.1 * (hi - lo) * rng.uniform(-1, 1))] for k, (lo, hi) in dobi_b.items()}
  (workdir / "bounds_dobi.json").write_text(json.dumps({"bounds": dobi_b}))
  (workdir / "bounds.json").write_text(json.dumps({"bounds": dq}))
  (workdir / "bounds_minmax.json").write_text("{not json")  # named, unreadable: left out
  with open(workdir / "dqc_log.jsonl", "w") as f:
    for step in range(10, 301, 10):
      loss = 1e-6 * (1 + 3 / np.sqrt(step))
      rec = {"step": step, "loss": loss, "l_pix": loss - 4e-12, "l_feature": 4e-12,
             "lr": 1e-2 * 0.5 * (1 + np.cos(np.pi * step / 300))}
      if step % 100 == 0:
        rec["val_psnr"] = 24 + step / 300
      f.write(json.dumps(rec) + "\n")
    f.write('{"step": 31')  # a line cut by a kill
  up = figure_inputs.bicubic_sr(load_rgb(workdir.parent / "bench" / "Tiny" / "HR" / "img.png")
                                [::4, ::4], 4)
  save_png(workdir / "sr" / "fp" / "Tiny" / "img.png", up)
  save_png(workdir / "sr" / "2dquant" / "Tiny" / "img.png", up[::-1].copy())
  names = qnames.quantizer_order()
  hists = {}
  for name in names[:2] + names[-1:]:
    x = rng.standard_normal(5000) * rng.uniform(0.1, 3)
    counts, edges = np.histogram(x, bins=stats.HIST_BINS)
    hists[name] = {"counts": counts.astype(np.int32), "edges": edges.astype(np.float32),
                   "min": float(x.min()), "max": float(x.max()), "numel": x.size}
  pct = {m: {n: (float(rng.uniform(0, 2)), float(rng.uniform(98, 100))) for n in names}
         for m in ("dobi", "2dquant")}
  figure_inputs.save_stats(workdir, hists, pct, 4)
  config = base.get_config(scale=4, bits=4, method="all")
  config.report.visual_images = "Tiny/img,Tiny/missing,Nowhere/img"
  config.report.hist_quantizers = ",".join(hists)
  per = lambda p: {"datasets": {"Tiny": {"psnr": p, "ssim": 0.5, "num_images": 1,
                                         "images": {"img": {"psnr": p, "ssim": 0.5}}}}}
  results = {"scale": 4, "bits": 4, "config": config.to_dict(),
             "data": {"root": str(workdir.parent / "bench"), "datasets": ["Tiny"]},
             "methods": {"fp": per(25.0), "bicubic": per(24.0),
                         "minmax": {**per(18.0), "bounds_file": "bounds_minmax.json"},
                         "dobi": {**per(20.0), "bounds_file": "bounds_dobi.json"},
                         "2dquant": {**per(22.0), "bounds_file": "bounds.json"}}}
  (workdir / "results.json").write_text(json.dumps(results))
  return results, {"hists": hists, "percentiles": pct, "bounds": {"dobi": dobi_b, "2dquant": dq}}


def test_from_workdir_reads_a_finished_workdir_back(tmp_path, reference, benchmarks):
  workdir = tmp_path / "wd"
  workdir.mkdir()
  _, saved = _fake_workdir(workdir, reference, benchmarks)
  got = figure_inputs.from_workdir(workdir)
  assert got.bounds == saved["bounds"] and list(got.bounds) == ["dobi", "2dquant"]
  assert got.percentiles == saved["percentiles"] and got.num_patches == 4
  assert list(got.hists) == list(saved["hists"])
  for name, h in saved["hists"].items():
    for key in figure_inputs.HIST_KEYS:
      np.testing.assert_array_equal(got.hists[name][key], h[key])
      assert type(got.hists[name][key]) is type(h[key]) or key in ("counts", "edges")
  assert [r["step"] for r in got.dqc_records] == list(range(10, 301, 10))
  (v,) = got.visuals  # Tiny/missing and Nowhere/img are left out
  assert list(v.srs) == ["bicubic", "fp", "2dquant"]  # DOBI saved no SR; bicubic is made
  assert v.psnrs == {"bicubic": 24.0, "fp": 25.0, "2dquant": 22.0}

  paths = figure_inputs.main(["--workdir", str(workdir)])
  names = sorted(Path(p).name for p in paths)
  assert len([n for n in names if n.startswith("hist_")]) == 3
  assert {"bound_percentiles.png", "visual_Tiny_img.png", "dqc_loss.png"} <= set(names)
  assert all(Path(p).parent == workdir / "figures" for p in paths)
  for p in paths:
    _check_png(Path(p))


@pytest.mark.parametrize("results,message", [
    (None, "results.json not found"),
    ("{cut", "results.json is not valid JSON"),
    ('{"methods": {}}', "results.json lacks the run's config"),
])
def test_from_workdir_cli_error_is_one_line(tmp_path, capsys, results, message):
  if results is not None:
    (tmp_path / "results.json").write_text(results)
  with pytest.raises(SystemExit) as e:
    figure_inputs.main(["--workdir", str(tmp_path)])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.slow
def test_from_workdir_reproduces_the_run(tmp_path, reference, benchmarks, shared, monkeypatch):
  """A real small 2DQuant run with figures: reading its workdir back gives the FigureInputs the
  run handed to the figures (bounds, DQC records, statistics, visuals), without recomputing."""
  root = tmp_path / "bench"
  hr = load_rgb(benchmarks / "Set5" / "HR" / "baby.png")[160:208, 160:208]
  save_png(root / "Tiny" / "HR" / "baby.png", hr)
  c = base.get_config(scale=4, bits=2, method="fp,2dquant")
  c.update_from_flattened_dict({  # tiny: 2 calibration patches, 3 DQC steps, one 48x48 image
      "model.checkpoint": str(reference / "standin_x4.pth"), "data.root": str(root),
      "eval.datasets": "Tiny", "eval.save_sr": True, "calib.root": str(shared / "data" / "calib"),
      "calib.num_patches": 2, "calib.lr_size": 16, "dqc.steps": 3, "dqc.batch_size": 2,
      "dqc.microbatch": "0", "dqc.log_every": 1, "report.figures": True,
      "report.visual_images": "Tiny/baby", "report.calib_patches": 2, "progress": False})
  handed: list[figures.FigureInputs] = []
  write_all = figures.write_all
  monkeypatch.setattr(figures, "write_all", lambda inputs, out: handed.append(inputs) or
                      write_all(inputs, out))
  workdir = tmp_path / "run"
  pipeline.run(run_settings.parse(c), workdir)
  (ran,) = handed
  assert list(ran.bounds) == ["dobi", "2dquant"]  # DQC's start is shown, as its own method
  assert list(ran.percentiles) == ["dobi", "2dquant"] and ran.num_patches == 2
  assert len(ran.hists) == 3 and [r["step"] for r in ran.dqc_records] == [1, 2, 3]
  assert list(ran.visuals[0].srs) == ["bicubic", "fp", "2dquant"]

  for png in (workdir / "figures").glob("*.png"):
    png.unlink()
  monkeypatch.undo()
  back = figure_inputs.from_workdir(workdir)
  _assert_same_inputs(ran, back)
  paths = figure_inputs.main(["--workdir", str(workdir)])
  assert {"bound_percentiles.png", "visual_Tiny_baby.png", "dqc_loss.png"} <= {
      Path(p).name for p in paths}
  for p in paths:
    _check_png(Path(p))
