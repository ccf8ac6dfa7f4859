"""Bad inputs end early and cleanly: settings and paths are checked before any work, bad files
are named in one line, the workdir is locked and not overwritten by a different run, a resumed
2DQuant run reuses its DOBI bounds, and evaluation batches by a pixel budget."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twodquant_jax import pipeline, settings, workdir as wd
from twodquant_jax.data import benchmarks
from twodquant_jax.data.images import load_rgb, save_png
from twodquant_jax.eval import predict as ev
from twodquant_jax.formats import bounds_file
from twodquant_jax.formats.torch_pickle import CheckpointError
from shared_paths import REPO_ROOT


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
  monkeypatch.syspath_prepend(str(REPO_ROOT))


def _config(tmp_path, reference, benchmarks_dir, method="fp", **fields):
  """An FP x4 config on a 2-image Set5 crop folder with the random reference checkpoint."""
  from configs import base
  root = tmp_path / "bench"
  if not root.exists():
    for name in ("baby", "bird"):
      hr = load_rgb(benchmarks_dir / "Set5" / "HR" / f"{name}.png")
      save_png(root / "Set5" / "HR" / f"{name}.png", hr[40:88, 40:88])
  c = base.get_config(scale=4, bits=2, method=method)
  c.model.checkpoint = str(reference / "swinir_light_x4_random.pth")
  c.data.root = str(root)
  c.eval.datasets = "Set5"
  c.calib.batch_file = str(reference / "calib_x4.npz")
  c.calib.root = str(tmp_path)
  c.progress = False
  for k, v in fields.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _run(c, workdir):
  """A run as main.py makes it: the config parsed (and checked) first."""
  return pipeline.run(settings.parse(c), workdir)


# --- settings: every value checked first, named correctly

@pytest.mark.parametrize("method,field,value,message", [
    ("2dquant", "dqc.steps", -1, "config.dqc.steps must be >= 1"),
    ("2dquant", "dqc.batch_size", 0, "config.dqc.batch_size must be >= 1"),
    ("minmax", "calib.num_patches", 0, "config.calib.num_patches must be >= 1"),
    ("fp", "eval.datasets", "", "config.eval.datasets is empty"),
    ("fp", "eval.datasets", " , ", "config.eval.datasets is empty"),
    ("fp", "eval.batch_size", 0, "config.eval.batch_size must be an integer >= 1"),
    ("fp", "eval.batch_pixels", -5, "config.eval.batch_pixels must be an integer >= 0"),
    ("fp", "eval.tile_overlap", 64, "larger than config.eval.tile_overlap"),
    ("fp", "eval.tile_blend", "max", "config.eval.tile_blend must be 'center' or 'mean'"),
    ("minmax", "calib.lr_size", 4, "config.calib.lr_size must be an integer >= 8"),
])
def test_bad_settings_fail_before_any_work(tmp_path, reference, benchmarks, method, field,
                                           value, message):
  c = _config(tmp_path, reference, benchmarks, method, **{field: value, "eval.tile": 64}
              if field == "eval.tile_overlap" else {field: value})
  if field == "calib.num_patches":
    c.calib.batch_file = ""
  work = tmp_path / "w"
  with pytest.raises(ValueError, match=message):
    _run(c, work)
  assert not work.exists()  # nothing written: no bounds_dobi.json, no empty results.json


def test_missing_paths_are_named_before_any_work(tmp_path, reference, benchmarks):
  c = _config(tmp_path, reference, benchmarks, "2dquant", **{"dqc.val_root": str(tmp_path / "nv")})
  with pytest.raises(FileNotFoundError, match="config.dqc.val_root: folder not found"):
    _run(c, tmp_path / "w")
  c = _config(tmp_path, reference, benchmarks, **{"model.checkpoint": str(tmp_path / "no.pth")})
  with pytest.raises(FileNotFoundError, match="config.model.checkpoint: file not found"):
    _run(c, tmp_path / "w")
  assert not (tmp_path / "w").exists()


# --- bad files: named, before any compute

def test_tiny_image_is_rejected_at_load_naming_the_file(tmp_path, reference, benchmarks):
  c = _config(tmp_path, reference, benchmarks)
  save_png(tmp_path / "bench" / "Set5" / "HR" / "tiny.png", np.zeros((5, 5, 3), np.uint8))
  with pytest.raises(ValueError, match=r"tiny.png.*5x5.*minimum 20x20"):
    _run(c, tmp_path / "w")
  assert benchmarks_min_ok(4)
  assert not (tmp_path / "w" / "results.json").exists()


def benchmarks_min_ok(scale):
  """The smallest accepted HR side leaves an 11x11 SSIM window after the border crop."""
  side = benchmarks.min_hr_side(scale)
  return side % scale == 0 and side - 2 * scale >= 11 and side - scale - 2 * scale < 11


def test_other_image_formats_are_read_and_duplicates_named(tmp_path):
  hr = np.random.default_rng(0).integers(0, 256, (24, 24, 3), np.uint8)
  folder = tmp_path / "B" / "HR"
  save_png(folder / "a.png", hr)
  from PIL import Image
  Image.fromarray(hr).save(folder / "b.bmp")
  Image.fromarray(hr).save(folder / "c.tif")
  (folder / "notes.txt").write_text("x")
  imgs = benchmarks.load_benchmark(tmp_path, "B", 2)
  assert [i.name for i in imgs] == ["a", "b", "c"]
  np.testing.assert_array_equal(imgs[1].hr, hr)
  Image.fromarray(hr).save(folder / "a.jpg")
  with pytest.raises(ValueError, match="a.jpg.*same image name|a.png.*a.jpg"):
    benchmarks.load_benchmark(tmp_path, "B", 2)


def test_skipped_patch_images_make_one_short_line():
  from twodquant_jax.data.images import skipped_line
  line = skipped_line([f"t91_t{i}.png (100x100)" for i in range(72)], "images smaller than X")
  assert line.startswith("skipped 72 images smaller than X: t91_t0.png") and "69 more" in line
  assert len(line) < 120


def _main(args, env_extra=None, timeout=300):
  env = {k: v for k, v in os.environ.items() if k != "TWODQUANT_DEBUG"}
  env.update({"JAX_PLATFORMS": "cpu", **(env_extra or {})})
  return subprocess.run([sys.executable, str(REPO_ROOT / "main.py")] + args, cwd=REPO_ROOT,
                        capture_output=True, text=True, env=env, timeout=timeout)


def test_main_file_errors_are_one_line(tmp_path, reference, benchmarks):
  """A 0-byte PNG ends in one line naming it (no traceback); TWODQUANT_DEBUG=1 shows it."""
  _config(tmp_path, reference, benchmarks)  # makes the benchmark folder
  (tmp_path / "bench" / "Set5" / "HR" / "empty.png").write_bytes(b"")
  args = ["--config=configs/fp_x4.py", f"--workdir={tmp_path / 'w'}",
          f"--config.model.checkpoint={reference / 'swinir_light_x4_random.pth'}",
          f"--config.data.root={tmp_path / 'bench'}", "--config.eval.datasets=Set5"]
  r = _main(args)
  assert r.returncode == 1
  lines = [l for l in r.stderr.splitlines() if l.startswith("FATAL")]
  assert len(lines) == 1 and "empty.png" in lines[0] and "Traceback" not in r.stderr, r.stderr
  r = _main(args, {"TWODQUANT_DEBUG": "1"})
  assert r.returncode == 1 and "Traceback" in r.stderr and "empty.png" in r.stderr


@pytest.mark.parametrize("bad", ["truncated", "not_zip"])
def test_corrupt_checkpoint_named(tmp_path, reference, benchmarks, bad):
  data = (reference / "swinir_light_x4_random.pth").read_bytes()
  ck = tmp_path / f"{bad}.pth"
  ck.write_bytes(data[: len(data) // 3] if bad == "truncated" else b"<html>404</html>")
  c = _config(tmp_path, reference, benchmarks, **{"model.checkpoint": str(ck)})
  with pytest.raises(CheckpointError, match=f"{bad}.pth"):
    _run(c, tmp_path / "w")
  import main as cli
  line = cli.fail_line(CheckpointError(f"{ck}: corrupt"))
  assert "\n" not in line and f"{bad}.pth" in line and "--config.model.checkpoint" in line


def test_bad_batch_file_named(tmp_path, reference, benchmarks):
  bad = tmp_path / "batch.npz"
  np.savez(bad, lr=np.zeros((2, 8, 8), np.uint8))
  c = _config(tmp_path, reference, benchmarks, "minmax", **{"calib.batch_file": str(bad)})
  with pytest.raises(ValueError, match="batch.npz.*'lr' must have shape"):
    _run(c, tmp_path / "w")


# --- the workdir lock and the overwrite guard

def _lock(workdir: Path, pid: int, host: str | None = None) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / wd.LOCK_FILE).write_text(json.dumps(
      {"pid": pid, "host": host or socket.gethostname(), "started": 0}))


def test_live_lock_refuses_and_names_the_holder(tmp_path):
  _lock(tmp_path, os.getppid())
  with pytest.raises(wd.WorkdirError, match=f"in use by PID {os.getppid()}"):
    wd.acquire(tmp_path)
  _lock(tmp_path, 1, "elsewhere")
  with pytest.raises(wd.WorkdirError, match="another host"):
    wd.acquire(tmp_path)
  (tmp_path / wd.LOCK_FILE).write_text("{garb")
  with pytest.raises(wd.WorkdirError, match="unreadable"):
    wd.acquire(tmp_path)


def test_stale_lock_is_named_and_replaced(tmp_path, caplog):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  _lock(tmp_path, int(dead))
  with caplog.at_level("WARNING"):
    path = wd.acquire(tmp_path)
  assert "stale lock" in caplog.text and dead in caplog.text
  assert json.loads(path.read_text())["pid"] == os.getpid()
  with pytest.raises(wd.WorkdirError, match="in use by PID"):  # held now: a second run waits
    wd.acquire(tmp_path)
  wd.release(path)
  assert not path.exists()


def test_run_refuses_live_lock_before_writing(tmp_path, reference, benchmarks):
  c = _config(tmp_path, reference, benchmarks)
  work = tmp_path / "w"
  _lock(work, os.getppid())
  with pytest.raises(wd.WorkdirError, match="in use"):
    _run(c, work)
  assert sorted(p.name for p in work.iterdir()) == [wd.LOCK_FILE]


def test_different_config_refuses_unless_overwrite(tmp_path):
  from configs import base
  old = base.get_config(scale=4, bits=2)
  (tmp_path / "results.json").write_text(json.dumps({"config": old.to_dict()}, default=float))
  before = sorted(p.name for p in tmp_path.iterdir())
  new = base.get_config(scale=4, bits=3)
  with pytest.raises(wd.WorkdirError, match=r"different config \(bits \(2 -> 3\)"):
    with wd.claim(tmp_path, new.to_dict()):
      pytest.fail("must refuse")
  assert sorted(p.name for p in tmp_path.iterdir()) == before  # refused before writing
  with wd.claim(tmp_path, new.to_dict(), overwrite=True):
    assert (tmp_path / wd.LOCK_FILE).is_file()
  assert not (tmp_path / wd.LOCK_FILE).exists()
  same = base.get_config(scale=4, bits=2)
  same.progress, same.report.figures, same.eval.batch_size = False, True, 1  # no effect on numbers
  with wd.claim(tmp_path, same.to_dict()):
    pass
  older = old.to_dict()
  del older["eval"]["tile_blend"]  # a results.json written before a field existed
  assert wd.config_differences(older, base.get_config(scale=4, bits=2).to_dict()) == []


def test_failed_first_run_leaves_no_empty_workdir(tmp_path, reference, benchmarks):
  """A run that fails before writing anything (here: a set missing from the cache, downloads
  off) removes the workdir folders its claim created; a workdir that existed is kept."""
  from twodquant_jax.data.download import DownloadError
  c = _config(tmp_path, reference, benchmarks, **{"data.root": "", "data.download": False,
                                                  "data.cache": str(tmp_path / "cache")})
  work = tmp_path / "new" / "w"
  with pytest.raises(DownloadError, match="Set5"):
    _run(c, work)
  assert not (tmp_path / "new").exists()
  work.mkdir(parents=True)
  with pytest.raises(DownloadError, match="Set5"):
    _run(c, work)
  assert work.is_dir() and list(work.iterdir()) == []


def test_claim_removes_only_the_folders_it_made_and_left_empty(tmp_path):
  new = tmp_path / "a" / "b"
  with pytest.raises(RuntimeError):
    with wd.claim(new, {}):
      assert (new / wd.LOCK_FILE).is_file()
      raise RuntimeError("failed before writing")
  assert not (tmp_path / "a").exists()
  with wd.claim(new, {}):
    (new / "results.json").write_text("{}")
  assert sorted(p.name for p in new.iterdir()) == ["results.json"]  # work kept, lock gone
  (tmp_path / "c").mkdir()
  with wd.claim(tmp_path / "c" / "d", {}):
    pass
  assert (tmp_path / "c").is_dir() and not (tmp_path / "c" / "d").exists()


# --- DOBI reuse on resume

def test_resumed_2dquant_reuses_dobi_of_the_same_identity(tmp_path, reference, benchmarks):
  c = _config(tmp_path, reference, benchmarks, "2dquant")
  params = {"a": jnp.ones((3,)), "b": jnp.arange(4.0)}
  lr = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
  like = None  # (the run passes the model's quantizer tree; the check is tested elsewhere)
  quant = bounds_file.load_bounds(reference / "ref2dq_x4_w4_random_b4.json", like)
  reuse = lambda c, params, lr: pipeline.reuse_start(settings.parse(c), params, lr, tmp_path,
                                                     like, "dobi")
  got, entry = reuse(c, params, lr)
  assert got is None and set(entry) == {"dobi_identity"}
  bounds_file.save_bounds(tmp_path / "bounds_dobi.json", quant,
                          {"method": "dobi", "identity": entry["dobi_identity"]})
  got, entry = reuse(c, params, lr)
  assert entry["calibration"]["reused"].endswith("bounds_dobi.json")
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])
  np.testing.assert_array_equal(flat(got), flat(quant))  # the saved bounds, exactly
  # any change in what DOBI depends on: recompute
  assert reuse(c, params, lr[::-1])[0] is None
  assert reuse(c, {**params, "a": jnp.zeros(3)}, lr)[0] is None
  c.dobi.num_candidates = 50
  assert reuse(c, params, lr)[0] is None


# --- evaluation memory budget and tiling

def test_pixel_budget_splits_batches_and_keeps_results():
  """Same-size images go in calls of at most batch_pixels LR pixels (at least one image), and
  the numbers do not depend on the split."""
  s = 2
  fn = lambda x: jnp.repeat(jnp.repeat(jnp.sin(x * 3.0), s, axis=1), s, axis=2)
  lrs = list(np.random.default_rng(0).integers(0, 256, (5, 40, 24, 3), np.uint8))
  one = ev.Predictor(fn, s, batch_size=8, batch_pixels=None)
  budget = ev.Predictor(fn, s, batch_size=8, batch_pixels=2 * 40 * 24)
  big = ev.Predictor(fn, s, batch_size=8, batch_pixels=100)  # smaller than one image
  ref = one.predict(lrs)
  for p in (budget, big):
    for a, b in zip(p.predict(lrs), ref):
      np.testing.assert_array_equal(a, b)
  assert one.compiled_shapes == {(5, 40, 24, 3)}
  assert budget.compiled_shapes == {(2, 40, 24, 3), (1, 40, 24, 3)}
  assert big.compiled_shapes == {(1, 40, 24, 3)}
  assert ev.images_per_batch((296, 208), 8, ev.DEFAULT_BATCH_PIXELS) == 1  # a Manga109 page
  assert ev.images_per_batch((128, 128), 8, ev.DEFAULT_BATCH_PIXELS) == 4


def test_center_and_mean_blend_stitch_exactly_and_tiling_is_recorded():
  s = 3
  fn = lambda x: jnp.repeat(jnp.repeat(x * 2.0 - 0.5, s, axis=1), s, axis=2)
  lr = np.random.default_rng(1).integers(0, 256, (45, 70, 3), np.uint8)
  whole = ev.Predictor(fn, s).predict([lr])[0]
  for blend in ("center", "mean"):
    for overlap in (0, 8, 16):
      tiled = ev.Predictor(fn, s, tile=24, tile_overlap=overlap, tile_blend=blend).predict([lr])[0]
      np.testing.assert_allclose(tiled, whole, atol=1e-6)
  # 'center' keeps each pixel from one tile: a tile-dependent output shows which one
  boxes, thw = ev.tile_boxes((40, 40), 24, 8)
  outs = [np.full((24, 24, 3), k, np.float32) for k in range(len(boxes))]
  out = ev.stitch(outs, boxes, (40, 40), thw, 1, "center")
  assert set(np.unique(out)) == set(range(len(boxes)))
  assert out[0, 0, 0] == 0 and out[-1, -1, 0] == len(boxes) - 1 and out[19, 0, 0] == 0
  assert out[20, 0, 0] == 2  # rows split in the middle of the overlap [16, 24)

  from configs import base
  from twodquant_jax.data.benchmarks import BenchmarkImage
  c = base.get_config()
  imgs = [BenchmarkImage("small", np.zeros((30, 30, 3), np.uint8), None),
          BenchmarkImage("large", np.zeros((100, 60, 3), np.uint8), None)]
  assert pipeline.tiling_record(settings.parse(c), imgs) is None
  c.eval.tile = 64
  assert pipeline.tiling_record(settings.parse(c), imgs) == {
      "tile": 64, "tile_overlap": c.eval.tile_overlap, "tile_blend": "center",
      "images": ["large"]}


def test_third_party_info_logs_are_filtered_but_ours_and_warnings_kept():
  import logging as std
  import main as cli
  f = cli._OwnInfoOnly()
  rec = lambda level, path: std.LogRecord("absl", level, path, 1, "m", (), None)
  orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert not f.filter(rec(std.INFO, orbax))
  assert f.filter(rec(std.WARNING, orbax))
  assert f.filter(rec(std.INFO, str(REPO_ROOT / "twodquant_jax" / "pipeline.py")))
  assert f.filter(rec(std.INFO, str(REPO_ROOT / "main.py")))
