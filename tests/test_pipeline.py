"""End to end: `pipeline.run` with MinMax, DOBI and 2DQuant on a tiny set, on a real trained
checkpoint. Guards the method as a whole: if calibration or DQC broke (no bounds file, DQC not
improving on its DOBI start), this fails even where every unit test still passes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from configs import base
from twodquant_jax import pipeline, settings
from twodquant_jax.data.images import load_rgb, save_png
from twodquant_jax.eval.metrics import psnr_y
from twodquant_jax.report import tables

SCALE, BITS = 4, 2
IMAGES = (("baby", 160, 160), ("bird", 100, 60))  # Set5 HR crops (name, y, x), 96x96
# 2DQuant++ over 2DQuant in vs FP on this setup. Measured: 2DQuant 50.27, 2DQuant++ 54.48 dB
# (+4.22; 40 DQC steps at batch 4, 16x16 patches, 4 calibration patches; the staged DQC step,
# 2DQuant++ without smoothing at W2; before both changes 49.83 / 53.55, +3.72); about half of it.
MARGIN_DB = 2.0


def _tiny_benchmark(root, benchmarks) -> None:
  for name, y, x in IMAGES:
    hr = load_rgb(benchmarks / "Set5" / "HR" / f"{name}.png")[y:y + 96, x:x + 96]
    save_png(root / "Tiny" / "HR" / f"{name}.png", hr)


@pytest.mark.slow
def test_2dquant_beats_dobi_end_to_end(tmp_path, reference, benchmarks, shared):
  _tiny_benchmark(tmp_path / "bench", benchmarks)
  c = base.get_config(scale=SCALE, bits=BITS, method="fp,minmax,dobi,2dquant")
  c.model.checkpoint = str(reference / "standin_x4.pth")
  c.data.root = str(tmp_path / "bench")
  c.eval.datasets = "Tiny"
  c.eval.save_sr = True
  c.calib.root = str(shared / "data" / "calib")
  c.calib.num_patches = 4
  c.calib.lr_size = 16
  c.dqc.steps = 40
  c.dqc.batch_size = 4
  c.dqc.microbatch = "0"
  c.dqc.checkpoint_every = 40
  c.dqc.log_every = 10
  c.progress = False
  c.report.figures, c.report.visual_images, c.report.calib_patches = True, "Tiny/baby", 1
  workdir = tmp_path / "run"
  results = pipeline.run(settings.parse(c), workdir)

  assert sorted(results["methods"]) == ["2dquant", "dobi", "fp", "minmax"]
  for m in ("minmax", "dobi", "2dquant"):
    saved = json.loads((workdir / f"bounds_{m}.json").read_text())["bounds"]
    assert len(saved) == 384 and np.isfinite(list(saved.values())).all(), m
    # Searched bounds are ordered; DQC may cross a pair (the method does not constrain l < u:
    # here 3 attention-map pairs of RSTB 1 end crossed, as the released code allows too).
    assert m == "2dquant" or all(lo < hi for lo, hi in saved.values()), m

  def to_fp(method: str) -> float:  # PSNR(Y) of a method's SR against the FP model's SR
    return float(np.mean([psnr_y(load_rgb(workdir / "sr" / method / "Tiny" / f"{n}.png"),
                                 load_rgb(workdir / "sr" / "fp" / "Tiny" / f"{n}.png"), SCALE)
                          for n, _, _ in IMAGES]))

  got = {m: to_fp(m) for m in ("minmax", "dobi", "2dquant")}
  print("PSNR against the FP output:", got)
  # Measured: MinMax 43.89, DOBI 46.52, 2DQuant 49.83 dB (40 DQC steps at batch 4, 16x16
  # patches). DQC must improve on its own DOBI start by a clear margin, and DOBI on MinMax.
  assert got["2dquant"] > got["dobi"] + 2.0, got
  assert got["dobi"] > got["minmax"], got

  # The report is made from what the run holds: DQC's log records (not results.json), the
  # bounds of the DOBI -> 2DQuant chain and the kept SRs.
  log = [json.loads(line) for line in (workdir / "dqc_log.jsonl").read_text().splitlines()]
  assert [r["step"] for r in log] == list(range(10, 41, 10))
  dqc = results["methods"]["2dquant"]["dqc"]
  assert "records" not in dqc
  # The step's compile is timed alone, and is part of the first step's time.
  assert 0 < dqc["compile_seconds"] < dqc["first_step_seconds"], dqc
  figs = {p.name for p in (workdir / "figures").iterdir()}
  assert {"dqc_loss.png", "bound_percentiles.png", "visual_Tiny_baby.png"} <= figs, figs


def _tiny_config(tmp_path, reference, benchmarks, shared, method: str):
  _tiny_benchmark(tmp_path / "bench", benchmarks)
  c = base.get_config(scale=SCALE, bits=BITS, method=method)
  c.model.checkpoint = str(reference / "standin_x4.pth")
  c.data.root, c.eval.datasets, c.progress = str(tmp_path / "bench"), "Tiny", False
  c.calib.root, c.calib.num_patches, c.calib.lr_size = str(shared / "data" / "calib"), 4, 16
  return c


@pytest.mark.slow
def test_vs_fp_is_the_psnr_against_the_fp_output(tmp_path, reference, benchmarks, shared):
  """The "vs FP" column: each quantized row's PSNR (Y, crop = scale) against the FP model's SR,
  per image and averaged; absent for FP itself; the same whether or not FP is a row of the
  run (then the FP SRs are made first, not reported)."""
  c = _tiny_config(tmp_path, reference, benchmarks, shared, "fp,dobi")
  c.eval.save_sr = True
  r1 = pipeline.run(settings.parse(c), tmp_path / "a")
  fp, dobi = (r1["methods"][m]["datasets"]["Tiny"] for m in ("fp", "dobi"))
  assert "vs_fp" not in fp and all("vs_fp" not in v for v in fp["images"].values())
  sr = lambda m, n: load_rgb(tmp_path / "a" / "sr" / m / "Tiny" / f"{n}.png")
  direct = {n: psnr_y(sr("dobi", n), sr("fp", n), SCALE) for n, _, _ in IMAGES}
  assert {n: v["vs_fp"] for n, v in dobi["images"].items()} == direct
  assert dobi["vs_fp"] == pytest.approx(np.mean(list(direct.values())))
  assert 30 < dobi["vs_fp"] < 80  # a quantized SR: close to the FP one, not identical
  md = (tmp_path / "a" / "results.md").read_text()
  assert "Tiny vs FP" in md and f"{dobi['vs_fp']:.2f}" in md
  c = _tiny_config(tmp_path, reference, benchmarks, shared, "dobi")
  r2 = pipeline.run(settings.parse(c), tmp_path / "b")
  assert r2["methods"]["dobi"]["datasets"]["Tiny"]["vs_fp"] == dobi["vs_fp"]
  assert list(r2["methods"]) == ["dobi"]


def test_results_markdown_vs_fp_columns():
  entry = lambda psnr, vs=None: {"datasets": {"Set5": {"psnr": psnr, "ssim": 0.8, **(
      {"vs_fp": vs} if vs is not None else {})}}}
  md = tables.results_markdown({"scale": 4, "bits": 2, "methods": {
      "fp": entry(29.0), "dobi": entry(28.9, 47.25), "2dquant++": entry(29.0, 55.5)}})
  lines = [line for line in md.splitlines() if line.startswith("|")]
  assert lines[0] == "| Method | Bits (W/A) | Set5 | Set5 vs FP |"
  assert lines[2].startswith("| FP | 32/32 |") and lines[2].endswith("| - |")
  assert lines[3].endswith("| 47.25 |") and lines[4].endswith("| 55.50 |")
  assert "2DQuant++" in lines[4]


@pytest.mark.slow
def test_combined_method_beats_2dquant_end_to_end(tmp_path, reference, benchmarks, shared):
  """On the small setup above, the combination of the stages beyond the paper (2DQuant++) is
  closer to the FP model than 2DQuant at the same bits and the same DQC budget, by a margin
  measured on this setup; its packed file runs on the integer engine from the file alone."""
  c = _tiny_config(tmp_path, reference, benchmarks, shared, "2dquant,2dquant++")
  c.dqc.steps, c.dqc.batch_size, c.dqc.microbatch = 40, 4, "0"
  c.dqc.checkpoint_every, c.dqc.log_every = 40, 10
  c.export.packed = True
  results = pipeline.run(settings.parse(c), tmp_path / "run")
  got = {m: results["methods"][m]["datasets"]["Tiny"]["vs_fp"] for m in ("2dquant", "2dquant++")}
  print("vs FP:", got)
  assert got["2dquant++"] > got["2dquant"] + MARGIN_DB, got
  # The packed file of the changed network, alone, on the integer engine: the same numbers.
  c2 = _tiny_config(tmp_path, reference, benchmarks, shared, "2dquant++")
  c2.model.packed = str(tmp_path / "run" / "model_2dquant++_x4_w2.safetensors")
  c2.model.checkpoint, c2.eval.engine = "/nonexistent.pth", "int"
  again = pipeline.run(settings.parse(c2), tmp_path / "int")["methods"]["2dquant++"]
  want = results["methods"]["2dquant++"]["datasets"]["Tiny"]["psnr"]
  assert abs(again["datasets"]["Tiny"]["psnr"] - want) < 0.01
