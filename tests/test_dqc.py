"""DQC: loss and gradient parity with the authors' code, the memory-efficient loss, the loop.

The loop tests (kill/resume, 1 vs 4 devices, non-finite stop) train the tiny network of
`dqc_tiny.py`; the parity test uses SwinIR-light and the authors' reference outputs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dqc_tiny
from twodquant_jax import settings as run_settings
from twodquant_jax.data import patches
from twodquant_jax.formats import convert
from twodquant_jax.nn.swinir import SwinIR
from shared_paths import REPO_ROOT
from twodquant_jax.nn import names as qnames
from twodquant_jax.formats import bounds_file
from twodquant_jax.ptq.dqc import checkpoint as dqc_ckpt
from twodquant_jax.ptq.dqc import loop as dqc_loop
from twodquant_jax.ptq.dqc import loss as dqc_loss
from twodquant_jax.ptq.dqc import step as dqc_step

TINY_SCRIPT = Path(__file__).with_name("dqc_tiny.py")


def _rel(a, b) -> float:
  return abs(float(a) - float(b)) / abs(float(b))


# ---- a. Parity with the authors' DQC step (loss terms and all 768 bound gradients). ----


@pytest.mark.slow
def test_reference_loss_and_gradients_match_authors(reference):
  ref = json.loads((reference / "ref2dq_x4_w4_random_b4.json").read_text())
  step = ref["dqc_step"]
  shapes = jax.eval_shape(lambda: SwinIR(upscale=4).init(jax.random.key(0),
                                                         jnp.zeros((1, 8, 8, 3))))
  params, _ = convert.load_checkpoint(reference / "swinir_light_x4_random.pth", 4,
                                      shapes["params"])
  like = jax.eval_shape(lambda: SwinIR(upscale=4, mode="quant", bits=4).init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["quant"])
  quant = bounds_file.load_bounds(reference / "ref2dq_x4_w4_random_b4.json", like)
  x = np.load(reference / "calib_x4.npz")["lr"][:4].astype(np.float32) / 255.0
  settings = run_settings.DQCSettings(scale=4, bits=4, loss="reference")

  grad_fn = jax.jit(jax.value_and_grad(
      lambda q: dqc_step.distillation_loss(params, q, x, settings), has_aux=True))
  (loss, aux), grads = grad_fn(quant)

  # l_pix is the mean |O_q - O| of a 4-bit network: float32 builds of this same code land
  # 2.6e-5 .. 1.8e-4 from the authors' value (flipped round() ties), float64 at 1.6e-4.
  assert _rel(aux["l_pix"], step["l_pix"]) < 5e-4
  assert _rel(loss, step["loss"]) < 5e-4
  assert _rel(aux["l_feature"], step["l_feature"]) < 1e-3
  for ours, theirs in zip(np.asarray(aux["l_feature_terms"]), step["l_feature_terms"]):
    assert _rel(ours, theirs) < 1e-3

  flat = qnames.leaves_by_name(grads, "bounds")
  names = sorted(flat)
  assert len(names) == 384
  ours = np.array([float(flat[n][i]) for n in names for i in (0, 1)])
  theirs = np.array([step["grad"][f"{n}.{side}"] for n in names
                     for side in ("lower_bound", "upper_bound")])
  # The gradient of a 4-bit network is sensitive to float32 rounding: an ulp of difference
  # flips a few round() ties and the sign of |O_q - O| at a few pixels. Two float32 builds of
  # this same JAX code (XLA at optimisation level 0 vs default) differ by 0.4 % (L2) and up to
  # 13 % on single large bounds, and float64 vs float32 by 0.5 %: the same as we differ from the
  # authors' PyTorch. So compare at that noise floor; a real rule error (e.g. dropping the
  # (t - r)/(2^N - 1) term of the bound gradients) gives 24 % L2 and fails 186 bounds here.
  scale = np.abs(theirs).max()
  rel_l2 = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
  cosine = ours @ theirs / (np.linalg.norm(ours) * np.linalg.norm(theirs))
  assert rel_l2 < 1.5e-2, rel_l2
  assert cosine > 0.9999, cosine
  big = np.abs(theirs) > 1e-2 * scale
  assert np.all(np.sign(ours[big]) == np.sign(theirs[big]))
  assert np.median(np.abs(ours - theirs)[big] / np.abs(theirs[big])) < 1e-2
  tol = np.maximum(0.05 * np.abs(theirs), 1e-2 * scale)
  bad = [(names[i // 2], ours[i], theirs[i]) for i in np.flatnonzero(np.abs(ours - theirs) > tol)]
  assert not bad, bad[:5]


# ---- b. The memory-efficient reference loss is the verbatim one; the paper loss is Eq. 4-6. --


def _features(rng, b=3, length=16, c=5, noise=0.05):
  f = rng.standard_normal((b, length, c)).astype(np.float32)
  f_q = (f * (1 + noise * rng.standard_normal((b, 1, 1))) +
         noise * rng.standard_normal(f.shape)).astype(np.float32)
  return jnp.asarray(f_q), jnp.asarray(f)


def _verbatim_float64(f_q, f, weight=5.0):
  """The torch broadcast form in float64, and its gradient w.r.t. f_q (norms detached)."""
  f_q, f = np.asarray(f_q, np.float64), np.asarray(f, np.float64)
  b = f.shape[0]
  n_q = np.sqrt((f_q ** 2).sum(axis=(1, 2))).reshape(b, 1, 1, 1)
  n = np.sqrt((f ** 2).sum(axis=(1, 2))).reshape(b, 1, 1, 1)
  d = f_q / n_q - f / n  # (B, B, L, C): out[j, i] = F[i] / n[j]
  scale = weight / d.size / d.size
  return scale * np.sum(d ** 2), scale * np.sum(2 * d / n_q, axis=0)


@pytest.mark.parametrize("noise", [0.3, 1e-2, 1e-4])
def test_reference_feature_term_equals_verbatim_broadcast(noise):
  f_q, f = _features(np.random.default_rng(0), noise=noise)
  value64, grad64 = _verbatim_float64(f_q, f)
  verbatim = dqc_loss.reference_feature_term_verbatim(f_q, f, 5.0)
  fast = dqc_loss.reference_feature_term(f_q, f, 5.0)
  np.testing.assert_allclose(verbatim, value64, rtol=1e-3)  # the float32 verbatim form itself
  np.testing.assert_allclose(fast, value64, rtol=1e-5)  # no cancellation in the fast form
  g_verbatim = jax.grad(dqc_loss.reference_feature_term_verbatim)(f_q, f, 5.0)
  g_fast = jax.grad(dqc_loss.reference_feature_term)(f_q, f, 5.0)
  atol = 1e-4 * np.abs(grad64).max()
  np.testing.assert_allclose(g_verbatim, grad64, rtol=5e-2, atol=atol)
  np.testing.assert_allclose(g_fast, grad64, rtol=1e-4, atol=atol)


def test_reference_loss_against_numpy():
  rng = np.random.default_rng(1)
  out = rng.uniform(size=(2, 8, 8, 3))
  out_q = out + 0.01 * rng.standard_normal(out.shape)
  feats = [_features(rng, b=2, noise=0.1) for _ in range(4)]
  loss, aux = dqc_loss.reference_loss(jnp.asarray(out_q, jnp.float32), jnp.asarray(out, jnp.float32),
                                 [fq for fq, _ in feats], [f for _, f in feats])
  l_pix = np.mean(np.abs(out_q - out)) / out.size * 2
  terms = []
  for f_q, f in feats:
    f_q, f = np.asarray(f_q, np.float64), np.asarray(f, np.float64)
    n_q = np.sqrt((f_q ** 2).sum(axis=(1, 2))).reshape(2, 1, 1, 1)
    n = np.sqrt((f ** 2).sum(axis=(1, 2))).reshape(2, 1, 1, 1)
    d = f_q / n_q - f / n  # (B, B, L, C), as torch broadcasts
    terms.append(5 * np.mean(d ** 2) / d.size)
  np.testing.assert_allclose(aux["l_pix"], l_pix, rtol=1e-5)
  np.testing.assert_allclose(aux["l_feature_terms"], terms, rtol=1e-4)
  np.testing.assert_allclose(loss, l_pix + sum(terms), rtol=1e-5)


def test_paper_loss_against_numpy():
  rng = np.random.default_rng(2)
  b = 3
  out = rng.uniform(size=(b, 8, 8, 3))
  out_q = out + 0.01 * rng.standard_normal(out.shape)
  feats = [_features(rng, b=b, length=16 * (i + 1), c=5, noise=0.1) for i in range(4)]
  loss, aux = dqc_loss.paper_loss(jnp.asarray(out_q, jnp.float32), jnp.asarray(out, jnp.float32),
                             [fq for fq, _ in feats], [f for _, f in feats], feature_weight=2.5)
  l_o = np.mean([np.mean(np.abs(out[i] - out_q[i])) for i in range(b)])
  terms = []
  for f_q, f in feats:
    f_q, f = np.asarray(f_q, np.float64), np.asarray(f, np.float64)
    per_image = [np.linalg.norm(f[i] / np.linalg.norm(f[i]) - f_q[i] / np.linalg.norm(f_q[i]))
                 / f[i].size for i in range(b)]
    terms.append(np.mean(per_image))
  np.testing.assert_allclose(aux["l_pix"], l_o, rtol=1e-5)
  np.testing.assert_allclose(aux["l_feature_terms"], terms, rtol=1e-4)
  np.testing.assert_allclose(loss, l_o + 2.5 * sum(terms), rtol=1e-5)
  # Identical features: finite gradients (a plain sqrt would give NaN at 0).
  same = [f for _, f in feats]
  g = jax.grad(lambda fs: dqc_loss.paper_loss(out, out, fs, same)[0])(same)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in g)


def test_settings_are_checked():
  with pytest.raises(ValueError, match="loss"):
    run_settings.DQCSettings(loss="l2")
  with pytest.raises(ValueError, match="schedule"):
    run_settings.DQCSettings(schedule="linear")
  with pytest.raises(ValueError, match="multiple of the number of devices"):
    dqc_step.check_batch_size(3, dqc_step.data_mesh([jax.devices()[0]] * 2))


def test_cosine_schedule_is_pytorch_cosine_annealing():
  sched = dqc_step.make_schedule(run_settings.DQCSettings(steps=10, lr=1e-2))
  for t in (0, 3, 9):
    np.testing.assert_allclose(sched(t), 1e-2 * (1 + np.cos(np.pi * t / 10)) / 2, rtol=1e-6)


# ---- c, d, e. The training loop on the tiny network. ----


def _subprocess_env(devices: int = 1) -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
  env["JAX_PLATFORMS"] = "cpu"
  flags = env.get("XLA_FLAGS", "")
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  return env


def _log_steps(workdir: Path) -> list[int]:
  path = workdir / dqc_ckpt.LOG_FILE
  if not path.exists():
    return []
  steps = []
  for line in path.read_text().splitlines():
    try:
      steps.append(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError):
      pass
  return steps


def _checkpoint_bounds(workdir: Path, step: int) -> dict[str, np.ndarray]:
  import orbax.checkpoint as ocp
  manager = dqc_ckpt.checkpoint_manager(workdir, read_only=True)
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  finally:
    manager.close()
  return {k: np.asarray(v, np.float32) for k, v in meta["bounds"].items()}


@pytest.fixture(scope="module")
def tiny():
  return dqc_tiny.tiny_setup()


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory, benchmarks, calib_dir):
  """40 steps at batch 4 in one go (with a held-out validation pass every 20 steps)."""
  workdir = tmp_path_factory.mktemp("dqc_full")
  config = dqc_tiny.tiny_config(40, 4, calib_root=calib_dir)
  config.dqc.val_root = str(benchmarks / "Set14")
  config.dqc.val_images = 2
  config.dqc.val_every = 20
  config.dqc.val_crop = 64
  final, info = dqc_tiny.train(*tiny, config, workdir)
  return dqc_tiny.as_dict(final), info, workdir


@pytest.mark.slow
def test_uninterrupted_run(uninterrupted):
  final, info, workdir = uninterrupted
  assert info["steps_run"] == 40 and info["resumed_from"] is None
  assert np.isfinite(info["final_loss"]) and info["steps_per_s"] > 0
  assert 0 < info["compile_seconds"] < info["first_step_seconds"]
  assert [v["step"] for v in info["validation"]] == [20, 40]
  assert all(np.isfinite(v["psnr"]) for v in info["validation"])
  assert _log_steps(workdir) == list(range(1, 41))
  assert all(np.isfinite(v).all() for v in final.values())


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(tiny, uninterrupted, tmp_path, calib_dir):
  workdir = tmp_path / "run"
  workdir.mkdir()
  proc = subprocess.Popen(
      [sys.executable, str(TINY_SCRIPT), str(workdir), "40", "4", "0.15"],
      env=_subprocess_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 150
    while max(_log_steps(workdir), default=0) < 25:
      assert proc.poll() is None, "the run ended before it could be killed"
      assert time.monotonic() < deadline, "the run did not reach step 25 in time"
      time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(_log_steps(workdir))
  assert 25 <= killed_at < 40

  final, info = dqc_tiny.train(*tiny, dqc_tiny.tiny_config(40, 4, calib_root=calib_dir), workdir)
  assert 20 <= info["resumed_from"] <= killed_at
  assert info["steps_run"] == 40 - info["resumed_from"]
  assert _log_steps(workdir) == list(range(1, 41))  # the killed run's extra lines are dropped
  expected = uninterrupted[0]
  got = dqc_tiny.as_dict(final)
  assert got.keys() == expected.keys()
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


@pytest.mark.slow
def test_one_vs_four_devices(tiny, tmp_path, calib_dir):
  """5 data-parallel steps on 4 (fake CPU) devices give the bounds of 5 single-device steps.

  (Longer runs drift apart: a float32 reduction-order difference eventually flips a round()
  of the 4-bit student, after which the two trajectories separate like any two float32 runs.)
  """
  (tmp_path / "four").mkdir()
  proc = subprocess.Popen([sys.executable, str(TINY_SCRIPT), str(tmp_path / "four"), "5", "4"],
                          env=_subprocess_env(devices=4), cwd=REPO_ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    one, _ = dqc_tiny.train(*tiny, dqc_tiny.tiny_config(5, 4, calib_root=calib_dir),
                            tmp_path / "one")
    out, err = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 0, err[-3000:]
  assert "devices 4" in out
  one = dqc_tiny.as_dict(one)
  four = dict(np.load(tmp_path / "four" / "result.npz"))
  assert one.keys() == four.keys()
  for name in one:
    np.testing.assert_allclose(four[name], one[name], rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path, calib_dir):
  config = dqc_tiny.tiny_config(10, 2, calib_root=calib_dir)
  config.dqc.lr = 1e30  # the first update is finite, the next forward overflows
  config.dqc.schedule = "constant"
  config.dqc.checkpoint_every = 1
  with pytest.raises(dqc_loop.NonFiniteError, match=r"DQC stopped at step \d+") as err:
    dqc_tiny.train(*tiny, config, tmp_path)
  step, kept = err.value.step, err.value.checkpoint_step
  assert step >= 2 and kept == step - 1
  manager = dqc_ckpt.checkpoint_manager(tmp_path, read_only=True)
  try:
    assert manager.latest_step() == kept
  finally:
    manager.close()
  bounds = _checkpoint_bounds(tmp_path, kept)
  assert len(bounds) == 32 and all(np.isfinite(v).all() for v in bounds.values())
  # Restarting resumes from the good checkpoint and stops again at the same step.
  with pytest.raises(dqc_loop.NonFiniteError) as again:
    dqc_tiny.train(*tiny, config, tmp_path)
  assert again.value.step == step


# ---- Microbatched gradient accumulation equals the whole-batch loss and gradient. ----


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["reference", "paper"])
def test_microbatches_equal_whole_batch(loss):
  """Both losses, on the tiny network: microbatches of 2 reproduce the batch of 6 (the
  reference loss couples samples through its (B, B) broadcast of detached norms)."""
  params, quant = dqc_tiny.tiny_setup()
  x = jnp.asarray(np.random.default_rng(3).random((6, 16, 16, 3)), jnp.float32)
  arch = tuple(sorted(dqc_tiny.ARCH.items()))
  whole = run_settings.DQCSettings(scale=dqc_tiny.SCALE, bits=dqc_tiny.BITS, loss=loss, arch=arch)
  micro = run_settings.DQCSettings(scale=dqc_tiny.SCALE, bits=dqc_tiny.BITS, loss=loss, arch=arch,
                          microbatch=2)
  (l_w, aux_w), g_w = jax.jit(jax.value_and_grad(
      lambda q: dqc_step.distillation_loss(params, q, x, whole), has_aux=True))(quant)
  (l_m, aux_m), g_m = jax.jit(
      lambda q: dqc_step.microbatched_value_and_grad(params, q, x, micro))(quant)
  np.testing.assert_allclose(l_m, l_w, rtol=1e-5)
  np.testing.assert_allclose(aux_m["l_pix"], aux_w["l_pix"], rtol=1e-5)
  np.testing.assert_allclose(aux_m["l_feature_terms"], aux_w["l_feature_terms"], rtol=1e-4)
  gw = np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(g_w)])
  gm = np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(g_m)])
  assert np.abs(gw).max() > 0
  np.testing.assert_allclose(gm, gw, rtol=1e-4, atol=1e-5 * np.abs(gw).max())
  assert [dqc_step.microbatch_size(b, m) for b, m in [(32, 8), (12, 8), (5, 2), (4, 8)]] == [8, 6, 1, 4]


@pytest.mark.slow
def test_loss_falls_and_every_bound_group_moves(tiny, uninterrupted, calib_dir):
  """DQC learns: over 40 steps the loss on a held-out batch falls and every kind of bound (weight / activation /
  attention operand, lower and upper) is trained. A broken gradient path (e.g. the STE or the
  bound gradients zeroed, or the optimizer not applied) fails here."""
  final, _, _ = uninterrupted
  params, quant0 = tiny
  config = dqc_tiny.tiny_config(40, 4, calib_root=calib_dir)
  source = patches.load_patch_source(config.calib.root, config.calib.lr_size * dqc_tiny.SCALE)
  held_out = patches.sample_batch(source, 99, 0, 16, scale=dqc_tiny.SCALE,
                                  lr_size=config.calib.lr_size)["lr"].astype(np.float32) / 255.0
  settings = run_settings.dqc_settings(config, dqc_tiny.ARCH)
  loss = jax.jit(lambda q: dqc_step.distillation_loss(params, q, held_out, settings)[0])
  before, after = float(loss(quant0)), float(loss(qnames.dict_to_tree(final)))
  # Measured: 2.01e-5 -> 1.18e-5 (0.59x) on this held-out batch (seed 99, never trained on).
  assert after < 0.8 * before, (before, after)
  initial = dqc_tiny.as_dict(tiny[1])
  groups: dict[tuple[str, int], list[float]] = {}
  for name, b0 in initial.items():
    for side in (0, 1):
      rel = abs(final[name][side] - b0[side]) / max(abs(b0[1] - b0[0]), 1e-12)
      groups.setdefault((qnames.quantizer_kind(name), side), []).append(float(rel))
  assert len(groups) == 6, sorted(groups)
  for group, moves in groups.items():
    moved = np.mean(np.asarray(moves) > 1e-4)
    assert moved >= 0.5, (group, moved)  # most bounds of every group were trained
