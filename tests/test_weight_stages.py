"""Weight-side stages beyond the paper: per-output-channel weight bounds, learned rounding (its
codes, baking, DQC with it) and bias correction, on the tiny network of `dqc_tiny.py`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dqc_tiny
from twodquant_jax import settings as run_settings
from twodquant_jax.data import patches
from twodquant_jax.nn import names as qnames
from twodquant_jax.nn.layers import ROUNDING
from twodquant_jax.nn.quantizer import (fake_quant, hard_round_codes, quant_codes, quant_step,
                                        soft_round_quant)
from twodquant_jax.nn.student import Student
from twodquant_jax.ptq import bias_correction, rounding, search
from twodquant_jax.ptq.dobi import calibrate_many
from twodquant_jax.ptq.dqc import loop as dqc_loop
from twodquant_jax.ptq.dqc import step as dqc_step
from twodquant_jax.ptq.stages import StageInputs
from twodquant_jax.settings import CalibSettings

ARCH = dqc_tiny.ARCH
SCALE = dqc_tiny.SCALE


@pytest.fixture(scope="module")
def tiny_params():
  return dqc_tiny.tiny_setup()[0]


def _lr(seed: int, n: int = 2, size: int = 16) -> np.ndarray:
  return (np.random.default_rng(seed).uniform(size=(n, size, size, 3)) * 255).astype(np.uint8)


def _calibrate(student: Student, bits: int, method: str = "dobi") -> dict:
  return calibrate_many(student, SCALE, _lr(0), {"_": (bits, CalibSettings(method=method))})["_"][0]


def _weight_bounds(quant):
  return {k: v for k, v in qnames.leaves_by_name(quant, "bounds").items() if qnames.is_weight(k)}


# ---- per-channel bounds ----


def test_per_channel_fake_quant_is_per_column_and_sums_gradients():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(0, 0.1, (7, 5)), jnp.float32)
  lo = jnp.asarray(-0.1 - 0.05 * rng.random(5), jnp.float32)
  hi = jnp.asarray(0.1 + 0.05 * rng.random(5), jnp.float32)
  g = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
  f = lambda l, u: jnp.sum(g * fake_quant(w, l, u, 2))
  got, (gl, gu) = fake_quant(w, lo, hi, 2), jax.grad(f, argnums=(0, 1))(lo, hi)
  for j in range(5):
    col = lambda l, u: jnp.sum(g[:, j] * fake_quant(w[:, j], l, u, 2))
    np.testing.assert_array_equal(got[:, j], fake_quant(w[:, j], lo[j], hi[j], 2))
    want_l, want_u = jax.grad(col, argnums=(0, 1))(lo[j], hi[j])
    np.testing.assert_allclose([gl[j], gu[j]], [want_l, want_u], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["dobi", "minmax"])
def test_per_channel_search_equals_the_search_on_each_channel_alone(tiny_params, method):
  plain_q = _calibrate(Student(tiny_params, {}, ARCH), 2, method)
  pc_q = _calibrate(Student(tiny_params, {}, {**ARCH, "weight_channels": True}), 2, method)
  flat_plain = qnames.leaves_by_name(plain_q, "bounds")
  flat_pc = qnames.leaves_by_name(pc_q, "bounds")
  slices = {qnames.name_from_path(q): (k, c) for q, k, c in rounding.weight_slices(
      pc_q, tiny_params)}
  assert slices and set(slices) == set(_weight_bounds(pc_q))
  for name, b in flat_pc.items():
    if name not in slices:  # activations stay per tensor, as without per-channel weights
      np.testing.assert_array_equal(b, flat_plain[name], err_msg=name)
      continue
    kpath, cols = slices[name]
    kernel = np.asarray(rounding.at_path(tiny_params, kpath))[:, cols]
    assert b.shape == (2, kernel.shape[1]), name
    for j in range(kernel.shape[1]):
      want = (search.dobi_bounds(kernel[:, j], 2) if method == "dobi"
              else search.minmax_bounds(kernel[:, j]))
      np.testing.assert_array_equal(b[:, j], want, err_msg=f"{name}[{j}]")


# ---- learned rounding: codes in range, baking ----


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rounding_codes_stay_in_range(bits):
  rng = np.random.default_rng(bits)
  w = jnp.asarray(rng.normal(0, 0.2, (9, 6)), jnp.float32)
  lo = jnp.asarray(-0.05 * (1 + rng.random(6)), jnp.float32)  # narrow: many weights outside
  hi = jnp.asarray(0.05 * (1 + rng.random(6)), jnp.float32)
  offsets = jnp.asarray(rng.normal(0, 5, (9, 6)), jnp.float32)
  top = 2 ** bits - 1
  codes = np.asarray(hard_round_codes(w, lo, hi, offsets, bits))
  assert codes.min() == 0 and codes.max() == top  # both ends reached, none beyond
  soft = (np.asarray(soft_round_quant(w, lo, hi, offsets, bits)) - np.asarray(lo)) / np.asarray(
      quant_step(lo, hi, bits))
  assert soft.min() >= -1e-5 and soft.max() <= top + 1e-4
  assert np.abs(soft - np.round(soft)).max() > 0.01  # soft codes are not all integers


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("channels", [False, True])
def test_bake_reproduces_the_learned_codes(tiny_params, bits, channels):
  arch = {**ARCH, "weight_channels": channels, "rounding": True}
  quant = _calibrate(Student(tiny_params, {}, arch), bits)
  student = rounding.init_offsets(Student(tiny_params, {}, arch), quant, bits)
  rng = np.random.default_rng(bits)
  student = dataclasses.replace(student, extra={ROUNDING: jax.tree_util.tree_map(
      lambda v: v + jnp.asarray(rng.normal(0, 3, v.shape), jnp.float32),
      student.extra[ROUNDING])})
  learned = rounding.learned_codes(student, quant, bits)
  baked = rounding.bake(student, quant, bits)
  assert baked.arch["rounding"] is False and ROUNDING not in baked.extra
  changed = 0
  for qpath, kpath, cols in rounding.weight_slices(quant, baked.params):
    b = rounding.at_path(quant, qpath)["bounds"]
    w = jnp.asarray(rounding.at_path(baked.params, kpath))[:, cols]
    rtn = np.asarray(quant_codes(w, b[0], b[1], bits))
    np.testing.assert_array_equal(rtn, learned[qpath], err_msg=str(qpath))
    w0 = jnp.asarray(rounding.at_path(tiny_params, kpath))[:, cols]
    changed += int(np.sum(np.asarray(quant_codes(w0, b[0], b[1], bits)) != learned[qpath]))
  assert changed > 0  # the offsets did change codes against round-to-nearest


def test_baked_network_equals_hard_rounding_network(tiny_params):
  """With saturated offsets (h exactly 0 or 1) the rounding student's output is the baked one's."""
  arch = {**ARCH, "weight_channels": True, "rounding": True}
  quant = _calibrate(Student(tiny_params, {}, arch), 3)
  student = rounding.init_offsets(Student(tiny_params, {}, arch), quant, 3)
  rng = np.random.default_rng(5)
  hard = jax.tree_util.tree_map(
      lambda v: jnp.where(v + jnp.asarray(rng.normal(0, 2, v.shape)) >= 0, 10.0, -10.0),
      student.extra[ROUNDING])
  student = dataclasses.replace(student, extra={ROUNDING: hard})
  baked = rounding.bake(student, quant, 3)
  x = jnp.asarray(_lr(1), jnp.float32) / 255.0
  soft_out = student.module(SCALE, "quant", 3).apply(student.variables(quant), x)
  baked_out = baked.module(SCALE, "quant", 3).apply(baked.variables(quant), x)
  np.testing.assert_allclose(baked_out, soft_out, atol=2e-5)


# ---- the integer engine on a per-channel, baked student ----


def test_int_engine_equals_fake_quant_for_per_channel_baked_student(tiny_params):
  arch = {**ARCH, "weight_channels": True, "rounding": True}
  quant = _calibrate(Student(tiny_params, {}, arch), 4)
  student = rounding.init_offsets(Student(tiny_params, {}, arch), quant, 4)
  baked = rounding.bake(student, quant, 4)
  x = jnp.asarray(_lr(2), jnp.float32) / 255.0
  out = {m: np.asarray(jax.jit(baked.module(SCALE, m, 4).apply)(baked.variables(quant), x))
         for m in ("quant", "int")}
  diff = np.abs(out["quant"] - out["int"])
  assert diff.mean() <= 1e-4 and diff.max() <= 1e-2, (diff.mean(), diff.max())


# ---- DQC with per-channel bounds and learned rounding ----


def _dqc_config(steps, calib_dir):
  c = dqc_tiny.tiny_config(steps, 4, calib_root=calib_dir)
  c.dqc.bits = 2
  c.bits = 2
  c.dqc.checkpoint_every = 4
  c.dqc.rounding_weight = 1e-3
  return c


@pytest.mark.slow
def test_dqc_with_rounding_learns_and_resumes(tiny_params, tmp_path, calib_dir):
  """Per-channel bounds + learned rounding at W2: the loss on a held-out batch falls (bounds
  and offsets both move), and a run cut after step 5 and resumed from its step-4 checkpoint
  ends where the uninterrupted run ends (orbax restores the offsets and their Adam state)."""
  arch = {**ARCH, "weight_channels": True, "rounding": True}
  student0 = Student(tiny_params, {}, arch)
  quant0 = _calibrate(student0, 2)
  config = _dqc_config(8, calib_dir)
  settings = run_settings.dqc_settings(config, ARCH)
  loop = run_settings.loop_settings(config)
  student, quant, info = dqc_loop.train_student(tiny_params, student0, quant0, settings, loop,
                                                tmp_path / "full")
  assert info["steps_run"] == 8

  source = patches.load_patch_source(config.calib.root, config.calib.lr_size * SCALE)
  held = patches.sample_batch(source, 99, 0, 8, scale=SCALE, lr_size=config.calib.lr_size)
  x = jnp.asarray(held["lr"], jnp.float32) / 255.0
  weights = dqc_step.student_weights(tiny_params, student)
  start = rounding.init_offsets(student0, quant0, 2)
  loss = jax.jit(lambda q: dqc_step.distillation_loss(weights, q, x, settings)[0])
  before = float(loss(dqc_step.Trainables(quant0, start.extra[ROUNDING])))
  after = float(loss(dqc_step.Trainables(quant, student.extra[ROUNDING])))
  assert after < 0.9 * before, (before, after)
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(
      jax.tree_util.tree_leaves(student.extra[ROUNDING]),
      jax.tree_util.tree_leaves(start.extra[ROUNDING]))]
  assert min(moved) > 0, moved

  class Cut(Exception):
    pass

  def cut(step, _):
    if step == 5:  # after step 4's checkpoint: the run dies here
      raise Cut

  with pytest.raises(Cut):
    dqc_loop.train_student(tiny_params, student0, quant0, settings, loop, tmp_path / "cut",
                           callback=cut)
  resumed, quant_r, info_r = dqc_loop.train_student(tiny_params, student0, quant0, settings,
                                                     loop, tmp_path / "cut")
  assert info_r["resumed_from"] == 4 and info_r["steps_run"] == 4
  for a, b in zip(jax.tree_util.tree_leaves((quant_r, resumed.extra[ROUNDING])),
                  jax.tree_util.tree_leaves((quant, student.extra[ROUNDING]))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---- bias correction ----


def test_bias_correction_restores_the_mean_output(tiny_params):
  """For the first linear (its input is the same with or without quantized weights before it),
  the corrected bias makes the mean of x Q(W) + b' over the calibration batch equal that of
  x W + b."""
  quant = _calibrate(Student(tiny_params, {}, ARCH), 2)
  lr = _lr(0)
  inputs = StageInputs(fp_params=tiny_params, calib_lr=lr.astype(np.float32) / 255.0,
                       scale=SCALE, bits=2, key=jax.random.key(0))
  corrected = bias_correction.bias_correct(Student(tiny_params, {}, ARCH), quant, inputs)
  means = bias_correction.input_means(Student(tiny_params, {}, ARCH), SCALE, inputs.calib_lr)
  blk = ("layers_0", "residual_group", "blocks_0", "attn", "qkv")
  name = "layers.0.residual_group.blocks.0.attn.qkv.q.act_quantizer"
  w = np.asarray(rounding.at_path(tiny_params, blk + ("kernel",)))[:, :12]
  b = np.asarray(rounding.at_path(quant, blk + ("q", "weight_quantizer", "bounds")))
  qw = np.asarray(fake_quant(jnp.asarray(w), b[0], b[1], 2))
  bias0 = np.asarray(rounding.at_path(tiny_params, blk + ("bias",)))[:12]
  bias1 = np.asarray(rounding.at_path(corrected.params, blk + ("bias",)))[:12]
  assert np.abs(bias1 - bias0).max() > 1e-4
  np.testing.assert_allclose(means[name] @ qw + bias1, means[name] @ w + bias0, atol=1e-5)


# ---- DQC of a network whose weights a stage changed ----


def test_pipeline_dqc_trains_the_network_a_stage_changed(tiny_params, tmp_path, calib_dir):
  """A stage that changes only the weights (smoothing, bias correction: no extra collection, no
  SwinIR option) still gives DQC a network of its own: `pipeline.run_dqc` trains the smoothed
  student, so its bounds equal `train_student`'s on that student, and differ from those of the
  paper's student (the FP weights) started from the same bounds."""
  from twodquant_jax import pipeline  # pylint: disable=g-import-not-at-top
  from twodquant_jax.ptq import smooth  # pylint: disable=g-import-not-at-top
  smoothed = smooth.smooth(Student(tiny_params, {}, ARCH), _lr(0), SCALE, 2)
  net = Student(smoothed.params, {}, {})  # as the pipeline builds a '+smooth' row's network
  quant0 = _calibrate(smoothed, 2)
  config = _dqc_config(2, calib_dir)
  settings = dataclasses.replace(run_settings.parse(config),
                                 dqc=run_settings.dqc_settings(config, ARCH))
  quant, _, _ = pipeline.run_dqc(settings, tiny_params, net, quant0, tmp_path / "run")
  _, want, _ = dqc_loop.train_student(tiny_params, Student(smoothed.params, {}, {}), quant0,
                                      settings.dqc, settings.loop, tmp_path / "student")
  paper, _ = dqc_loop.train(tiny_params, quant0, settings.dqc, settings.loop, tmp_path / "paper")
  leaves = lambda t: [np.asarray(x) for x in jax.tree_util.tree_leaves(t)]
  for a, b in zip(leaves(quant), leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert max(np.abs(a - b).max() for a, b in zip(leaves(quant), leaves(paper))) > 1e-6
