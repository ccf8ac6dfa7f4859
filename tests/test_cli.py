"""The command line and the report: configs load and take overrides, bad values fail cleanly,
a tiny end-to-end `main.py` run writes a consistent results.json / results.md (the figures and
their inputs: tests/test_report.py)."""

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from twodquant_jax import pipeline, settings
from twodquant_jax.data.images import load_rgb, save_png
from twodquant_jax.eval.metrics import psnr_y
from shared_paths import REPO_ROOT

CONFIGS = ["fp_x2", "fp_x3", "fp_x4"] + [f"x{s}_w{b}" for s in (2, 3, 4) for b in (2, 3, 4)]


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
  """Config files import `configs.base`, which needs the repo root on sys.path (as main.py has)."""
  monkeypatch.syspath_prepend(str(REPO_ROOT))


def _expected(name: str) -> tuple[int, int | None, str]:
  m = re.fullmatch(r"fp_x(\d)", name)
  if m:
    return int(m.group(1)), None, "fp"
  m = re.fullmatch(r"x(\d)_w(\d)", name)
  return int(m.group(1)), int(m.group(2)), "2dquant"


@pytest.mark.parametrize("name", CONFIGS)
def test_config_module_loads(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  scale, bits, method = _expected(name)
  assert (config.scale, config.method) == (scale, method)
  if bits is not None:
    assert config.bits == bits
  settings.parse(config)


def _parse(argv: list[str]) -> flags.FlagValues:
  """Parses like main.py on a fresh FlagValues; overrides are found in `sys_argv`.

  ml_collections (1.1.0, the latest) loads config files with the deprecated
  `SourceFileLoader.load_module()`; that one DeprecationWarning from its loader is silenced
  here (every other warning still shows), since the fix belongs upstream.
  """
  fv = flags.FlagValues()
  argv = ["main.py"] + argv
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"the load_module\(\) method is deprecated",
                            category=DeprecationWarning)
    fv(argv)
  return fv


@pytest.mark.parametrize("name", CONFIGS)
def test_config_file_flag_with_overrides(name):
  path = str(REPO_ROOT / "configs" / f"{name}.py")
  fv = _parse([f"--config={path}", "--config.dqc.steps=500", "--config.bits=3",
               "--config.report.figures=True", "--config.eval.datasets=Set5"])
  c = fv.config
  assert (c.dqc.steps, c.bits, c.report.figures, c.eval.datasets) == (500, 3, True, "Set5")
  assert c.scale == _expected(name)[0]
  assert _parse([f"--config={path}"]).config.dqc.steps == 3000  # defaults untouched


def test_config_override_type_errors_in_process():
  path = str(REPO_ROOT / "configs" / "x4_w2.py")
  with pytest.raises(flags.IllegalFlagValueError):
    _parse([f"--config={path}", "--config.bits=abc"])


def _main(args: list[str], **kw) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(REPO_ROOT / "main.py")] + args, cwd=REPO_ROOT,
                        capture_output=True, text=True, env=env, **kw)


@pytest.mark.parametrize("override,message", [
    ("--config.bits=abc", "invalid literal"),
    ("--config.method=bogus", "config.method must be"),
    ("--config.scale=5", "config.scale must be 2, 3 or 4"),
    ("--config.nosuch=1", "unknown config field 'nosuch'"),
])
def test_main_rejects_bad_values_cleanly(override, message, tmp_path):
  r = _main(["--config=configs/x4_w2.py", override, f"--workdir={tmp_path / 'w'}"], timeout=120)
  assert r.returncode != 0
  assert message in r.stderr + r.stdout
  assert "Traceback" not in r.stderr
  assert not (tmp_path / "w").exists()


def _tiny_benchmark(root: Path, benchmarks: Path, size: int = 48) -> None:
  """<root>/Set5/HR: 2 crops of Set5 HR images (no LR folder: LR is made by bicubic)."""
  for name in ("baby", "bird"):
    hr = load_rgb(benchmarks / "Set5" / "HR" / f"{name}.png")
    y, x = hr.shape[0] // 3, hr.shape[1] // 3
    save_png(root / "Set5" / "HR" / f"{name}.png", hr[y:y + size, x:x + size])


@pytest.mark.slow
def test_main_end_to_end_fp(tmp_path, reference, benchmarks):
  root, workdir = tmp_path / "bench", tmp_path / "run"
  _tiny_benchmark(root, benchmarks)
  t0 = time.perf_counter()
  r = _main(["--config=configs/fp_x4.py", f"--workdir={workdir}",
             f"--config.model.checkpoint={reference / 'swinir_light_x4_random.pth'}",
             f"--config.data.root={root}", "--config.eval.datasets=Set5",
             "--config.eval.save_sr=True", "--config.report.figures=True",
             "--config.report.visual_images=Set5/baby",
             f"--config.calib.batch_file={reference / 'calib_x4.npz'}",
             "--config.report.calib_patches=1"], timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  print(f"main.py end to end: {time.perf_counter() - t0:.1f} s")

  results = json.loads((workdir / "results.json").read_text())
  assert results["complete"] is True
  assert results["checkpoint"] == str(reference / "swinir_light_x4_random.pth")
  assert results["config"]["method"] == "fp" and results["config"]["eval"]["save_sr"] is True
  assert results["environment"]["backend"] == "cpu"  # the subprocess ran with JAX_PLATFORMS=cpu
  assert (results["scale"], list(results["methods"])) == (4, ["fp"])
  # Full precision: 32-bit weights and activations, so neither ratio gains anything.
  r = results["ratios"]
  assert r["bits"] == 32 and r["compression"] == pytest.approx(1.0)
  assert r["speedup"] == pytest.approx(1.0)
  fp = results["methods"]["fp"]  # two images of different sizes share at most two buckets
  assert 1 <= fp["eval_compiles"] <= 2 and fp["eval_compile_s"] > 0
  d = results["methods"]["fp"]["datasets"]["Set5"]
  assert d["num_images"] == 2 and set(d["images"]) == {"baby", "bird"}
  for name, v in d["images"].items():  # each score is that of the saved SR against its HR
    sr = load_rgb(workdir / "sr" / "fp" / "Set5" / f"{name}.png")
    hr = load_rgb(root / "Set5" / "HR" / f"{name}.png")[:sr.shape[0], :sr.shape[1]]
    assert v["psnr"] == pytest.approx(psnr_y(sr, hr, 4), abs=1e-9)
  assert all(set(v) == {"psnr", "ssim"} for v in d["images"].values())
  for metric in ("psnr", "ssim"):  # the dataset score is the mean of its images' scores
    assert d[metric] == pytest.approx(np.mean([v[metric] for v in d["images"].values()]))

  md = (workdir / "results.md").read_text()
  row = next(line for line in md.splitlines() if line.startswith("| FP |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[1] == "32/32"
  assert cells[2] == f"{d['psnr']:.2f} / {d['ssim']:.4f}"
  assert "Set5" in md
  assert "Compression ratio 1.00x, speedup ratio 1.00x at 32 bits" in md

  assert (workdir / "sr" / "fp" / "Set5" / "baby.png").is_file()
  figs = sorted(p.name for p in (workdir / "figures").glob("*.png"))
  assert "visual_Set5_baby.png" in figs
  assert any(f.startswith("hist_") for f in figs)  # FP histograms, no bounds in an FP run
  assert "bound_percentiles.png" not in figs and "dqc_loss.png" not in figs


@pytest.mark.slow
def test_rerun_of_the_same_command_is_not_refused(tmp_path, reference, benchmarks, monkeypatch):
  """The workdir guard compares a rerun with the config as the user gave it, not with the data
  locations the run resolved (with no data.root the sets come from the download cache): resuming
  or repeating the same command must not be refused as 'a different config'."""
  from configs import base
  root = tmp_path / "bench"
  _tiny_benchmark(root, benchmarks)
  real = pipeline.resolve_data

  def as_if_from_the_cache(s, **kw):  # what an empty data.root resolves to
    return dataclasses.replace(real(s, **kw), data_root=root)

  monkeypatch.setattr(pipeline, "resolve_data", as_if_from_the_cache)
  c = base.get_config(scale=4, bits=4, method="fp")
  c.model.checkpoint = str(reference / "swinir_light_x4_random.pth")
  c.data.root = str(tmp_path / "elsewhere")  # stands for "" (the cache): never read as such
  (tmp_path / "elsewhere").mkdir()
  c.eval.datasets = "Set5"
  c.progress = False
  first = pipeline.run(settings.parse(c), tmp_path / "run")
  assert first["config"]["data"]["root"] == str(tmp_path / "elsewhere")
  assert first["data"]["root"] == str(root)
  second = pipeline.run(settings.parse(c), tmp_path / "run")  # the same command again
  assert second["methods"]["fp"]["datasets"]["Set5"]["psnr"] == pytest.approx(
      first["methods"]["fp"]["datasets"]["Set5"]["psnr"], abs=1e-12)
