"""The staged DQC step (`ptq/dqc/staged.py`) computes what the one-program step computes.

It is the default step of every DQC run (`dqc.staged`), so it is checked against
`step.jit_train_step` for both losses, whole batches and microbatches, the paper's student and a
changed one (rotation, per-channel bounds, learned rounding), on a small network whose blocks
repeat (2 RSTBs of 2 blocks). Multi-device staged runs: `test_dqc.py::test_one_vs_four_devices`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dqc_tiny
from twodquant_jax.nn import names as qnames
from twodquant_jax.nn.layers import ROUNDING
from twodquant_jax.nn.student import Student
from twodquant_jax.ptq import rotation
from twodquant_jax.ptq import rounding as rounding_lib
from twodquant_jax.ptq.dqc import memory as dqc_memory
from twodquant_jax.ptq.dqc import staged
from twodquant_jax.ptq.dqc import step as dqc_step
from twodquant_jax.settings import DQCSettings

ARCH = {"embed_dim": 12, "depths": (2, 2), "num_heads": (2, 2)}
BITS = 4


def _minmax(student: Student, x) -> dict:
  """Min/max bounds of every quantizer input of `student` on x."""
  seen = jax.jit(lambda v, x: student.module(4, "capture", BITS).apply(
      v, x, mutable=["calib"])[1])(student.variables(), x)
  inputs = qnames.leaves_by_name(seen["calib"], "input")
  return qnames.dict_to_tree({k: [float(jnp.min(v)), float(jnp.max(v))]
                              for k, v in inputs.items()})


@pytest.fixture(scope="module")
def setup():
  """(params, bounds, a uint8 LR batch of 4) of the small network, seeded."""
  shapes = jax.eval_shape(Student({}, arch=ARCH).module(4).init, jax.random.key(0),
                          jnp.zeros((1, 16, 16, 3)))["params"]
  params = dqc_tiny.random_params(shapes, np.random.default_rng(0))
  lr = (np.random.default_rng(5).uniform(size=(4, 16, 16, 3)) * 255).astype(np.uint8)
  return params, _minmax(Student(params, arch=ARCH), jnp.asarray(lr, jnp.float32) / 255.0), lr


def _settings(**kw) -> DQCSettings:
  return DQCSettings(scale=4, bits=BITS, steps=10, arch=tuple(sorted(ARCH.items())), **kw)


def _both(settings: DQCSettings, params, quant, lr):
  """(state, metrics) after one step of the one-program and of the staged step."""
  mesh = dqc_step.data_mesh()
  out = {}
  for name, fn in (("one", dqc_step.jit_train_step(settings, mesh)),
                   ("staged", staged.StagedStep(settings, mesh))):
    state = dqc_step.init_state(settings, jax.tree_util.tree_map(np.array, quant))
    out[name] = jax.device_get(fn(state, jnp.asarray(lr), params))
  return out["one"], out["staged"]


def _assert_same(one, got):
  """Equal losses and equal gradients: after one step, Adam's first moment is (1 - b1) times
  the gradient and its second (1 - b2) times its square. (The bounds themselves move by about
  +-lr wherever the gradient is not 0, whatever its size, so a float-order difference in a
  gradient that is nearly 0 can move a bound the other way: they are not compared.)"""
  (s1, m1), (s2, m2) = one, got
  assert bool(m1["finite"]) and bool(m2["finite"])
  for key in ("loss", "l_pix", "l_feature"):
    np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, err_msg=key)
  # Each trained collection against its own largest moment: the rounding offsets' gradients
  # are far smaller than the bounds', and a zeroed one must not hide under the bounds' scale.
  groups: dict = {}
  for (path, b), a in zip(jax.tree_util.tree_flatten_with_path(s1.opt_state)[0],
                          jax.tree_util.tree_leaves(s2.opt_state)):
    if np.ndim(b):
      groups.setdefault("rounding" in jax.tree_util.keystr(path), []).append((a, b))
  for moments in groups.values():
    scale = max(float(np.max(np.abs(b))) for _, b in moments)
    assert scale > 0
    for a, b in moments:
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("loss", ["reference", "paper"])
@pytest.mark.parametrize("microbatch", [0, 2])
def test_staged_step_equals_one_program(setup, loss, microbatch):
  params, quant, lr = setup
  settings = _settings(loss=loss, microbatch=microbatch)
  _assert_same(*_both(settings, params, quant, lr))


def test_staged_step_equals_one_program_for_a_changed_student(setup):
  """Rotated (run-time rotations of qkv/fc1/fc2, folded attention rotations), per-channel
  weight bounds and learned rounding: the trained tree is then bounds and offsets."""
  params, _, lr = setup
  x = jnp.asarray(lr, jnp.float32) / 255.0
  student = rotation.rotate(Student(params, arch={**ARCH, "weight_channels": True}),
                            jax.random.key(2), rotation.KINDS)
  quant = _minmax(student, x)
  student = Student(student.params, student.extra, {**dict(student.arch), "rounding": True})
  student = rounding_lib.init_offsets(student, quant, BITS)
  weights = dqc_step.student_weights(params, student)
  trained = dqc_step.Trainables(quant=quant, rounding=student.extra[ROUNDING])
  one, got = _both(_settings(microbatch=2), weights, trained, lr)
  assert any("rounding" in jax.tree_util.keystr(path)
             for path, _ in jax.tree_util.tree_flatten_with_path(one[0].opt_state)[0])
  _assert_same(one, got)


def test_each_distinct_block_compiles_once(setup):
  """The 4 blocks (2 RSTBs of an (unshifted, shifted) pair) compile as one forward and one
  backward piece, called twice each, and the planner's memory need of the staged step is XLA's,
  within the one-program step's order."""
  params, quant, lr = setup
  settings = _settings()
  mesh = dqc_step.data_mesh()
  step = staged.StagedStep(settings, mesh)
  state = dqc_step.init_state(settings, quant)
  step.compile(state, jnp.asarray(lr), params)
  compiles, calls = step.compile_counts()
  assert {k: v for k, v in compiles.items() if k.startswith("block")} == {
      "blocks2": 1, "blocks2_back": 1}
  assert calls["blocks2"] == calls["blocks2_back"] == 2
  # Compiled again for the same arguments (the planner's, then the loop's): nothing to compile.
  step.compile(state, jnp.asarray(lr), params)
  again, _ = step.compile_counts()
  assert sum(again.values()) == 0 and sum(compiles.values()) > 0
  need = step.need_bytes()
  one = dqc_memory.compiled_bytes(dqc_step.jit_train_step(settings, mesh).lower(
      state, jnp.asarray(lr), params).compile())
  assert 0.3 * one < need < 3 * one


def test_a_non_finite_gradient_keeps_the_state():
  """`step.apply_gradients` (the last piece of both steps): a NaN or inf in any one gradient
  leaf, with a finite loss, returns the input state and finite False; finite ones move it."""
  settings = _settings()
  quant = {f"q{i}": {"bounds": jnp.array([0.0, 1.0 + i])} for i in range(5)}
  state = dqc_step.init_state(settings, quant)
  aux = {"l_pix": jnp.zeros(()), "l_feature": jnp.zeros(())}
  fine = jax.tree_util.tree_map(lambda b: jnp.full_like(b, 0.1), quant)
  new, m = jax.jit(lambda s, g: dqc_step.apply_gradients(s, jnp.float32(1.0), aux, g, settings))(
      state, fine)
  assert bool(m["finite"]) and int(new.step) == 1
  assert float(jnp.max(jnp.abs(new.quant["q3"]["bounds"] - quant["q3"]["bounds"]))) > 0
  for bad in (jnp.nan, jnp.inf):
    grads = {**fine, "q3": {"bounds": jnp.array([0.1, bad])}}
    new, m = jax.jit(lambda s, g: dqc_step.apply_gradients(s, jnp.float32(1.0), aux, g,
                                                          settings))(state, grads)
    assert not bool(m["finite"]) and bool(m["loss_finite"])
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(state)):
      np.testing.assert_array_equal(a, b)
