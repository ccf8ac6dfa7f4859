"""Rotations and channel scaling folded into the student: orthogonal matrices, the same FP output,
the integer engine and the scanned network on a rotated student, and what calibration sees.

Most checks run a small network (2 RSTBs of 4 blocks, width 12, 2 heads: orders 12 and 24 are
Paley / Kronecker Hadamard matrices, the head dimension 6 a random orthogonal one) with its
params perturbed so every bias and LayerNorm weight is non-trivial; one runs the stand-in x4
weights on the parity images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twodquant_jax.formats import convert
from twodquant_jax.nn import names as qnames
from twodquant_jax.nn import rotation as nrot
from twodquant_jax.nn.student import Student
from twodquant_jax.nn.swinir import SwinIR, variable_shapes
from twodquant_jax.ptq import rotation, smooth, stages

ARCH = {"embed_dim": 12, "depths": (4, 4), "num_heads": (2, 2), "window_size": 4}
KEY = jax.random.key(7)


def _max_diff(a, b) -> float:
  return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))


def _assert_same_fp(got, want) -> None:
  """Equal to float32 rounding: max |diff| <= 1e-5 on the small network's outputs scaled to
  max |want| = 1 (its outputs reach ~5, not an image's [0, 1]; the stand-in test is absolute)."""
  scale = max(1.0, float(jnp.max(jnp.abs(want))))
  assert _max_diff(got, want) <= 1e-5 * scale, (_max_diff(got, want), scale)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 24, 60, 64, 120, 6, 10])
def test_matrices_are_orthogonal(n):
  r = nrot.orthogonal(jax.random.key(n), n)
  assert r.shape == (n, n)
  np.testing.assert_allclose(r @ r.T, np.eye(n), atol=1e-12)
  if nrot.has_hadamard(n):  # a Hadamard matrix: every entry +-1/sqrt(n)
    np.testing.assert_allclose(np.abs(r), 1 / np.sqrt(n), atol=1e-12)


def test_hadamard_orders():
  assert all(nrot.has_hadamard(n) for n in (60, 120, 12, 24, 32))
  assert not any(nrot.has_hadamard(n) for n in (6, 10, 28))  # 28 needs Paley II
  with pytest.raises(ValueError, match="order 10"):
    nrot.hadamard(10)
  signs = [nrot.random_hadamard(jax.random.key(i), 60) for i in (0, 1)]
  assert not np.array_equal(signs[0], signs[1])  # the key draws the signs


@pytest.fixture(scope="module")
def tiny():
  """(student, x) of the small network with perturbed params, seeded."""
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 16, 16, 3)), jnp.float32)
  params = SwinIR(**ARCH).init(jax.random.key(1), x)["params"]
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree_util.tree_unflatten(tree, [
      p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return Student(params, arch=ARCH), x


def _fp(student, x):
  return jax.jit(lambda v, x: student.module(4).apply(v, x))(student.variables(), x)


CASES = [("qkv",), ("fc1",), ("fc2",), ("attn_qk",), ("attn_v",), ("attn",),
         rotation.KINDS, "smooth", "smooth+all"]


def _changed(student, case, x):
  if case in ("smooth", "smooth+all"):
    student = smooth.smooth(student, np.asarray(x), 4, 2)
  if case != "smooth":
    student = rotation.rotate(student, KEY, rotation.KINDS if case == "smooth+all" else case)
  return student


@pytest.mark.parametrize("case", CASES, ids=lambda c: c if isinstance(c, str) else "+".join(c))
def test_rotated_fp_equals_plain(tiny, case):
  student, x = tiny
  changed = _changed(student, case, x)
  assert jax.tree_util.tree_structure(changed.params) == jax.tree_util.tree_structure(
      student.params)
  moved = max(_max_diff(a, b) for a, b in zip(jax.tree_util.tree_leaves(changed.params),
                                               jax.tree_util.tree_leaves(student.params)))
  assert moved > 1e-2  # the weights did change
  _assert_same_fp(_fp(changed, x), _fp(student, x))


def test_runtime_kinds_and_matrices(tiny):
  student, x = tiny
  r = rotation.rotate(student, KEY, ("fc2", "attn", "qkv"))
  assert r.arch["rotate"] == ("qkv", "fc2")
  mats = qnames.leaves_by_name(r.extra["rotation"], "matrix")
  assert len(mats) == 2 * 8  # one per block and run-time kind
  assert len({np.asarray(m).tobytes() for m in mats.values()}) == len(mats)  # own signs each
  for m in mats.values():
    np.testing.assert_allclose(np.asarray(m) @ np.asarray(m).T, np.eye(m.shape[0]), atol=1e-6)
  # A second stage adds its kind next to the first one's matrices.
  r2 = rotation.rotate(r, KEY, ("fc1",))
  assert r2.arch["rotate"] == ("qkv", "fc1", "fc2")
  assert len(qnames.leaves_by_name(r2.extra["rotation"], "matrix")) == 3 * 8
  _assert_same_fp(_fp(r2, x), _fp(student, x))
  with pytest.raises(ValueError, match="rotated already"):
    rotation.rotate(r, KEY, ("qkv",))
  with pytest.raises(ValueError, match="unknown kind"):
    rotation.rotate(student, KEY, ("proj",))
  with pytest.raises(ValueError, match="before 'rotate'"):
    smooth.smooth(r, np.asarray(x), 4, 2)


def test_capture_sees_rotated_inputs(tiny):
  """Calibration (the capture pass) sees x R at a rotated input, and the folded weight R^T W."""
  student, x = tiny
  r = rotation.rotate(student, KEY, ("fc1",))
  cap = lambda s: s.module(4, "capture").apply(s.variables(), x, mutable=["calib"])[1]["calib"]
  plain_c, rot_c = cap(student), cap(r)
  path = ("layers_1", "residual_group", "blocks_3", "mlp", "fc1")
  get = lambda t, q: np.asarray(rotation.subtree(t, path + (q, "input")))
  rmat = np.asarray(rotation.subtree(r.extra["rotation"], path)["matrix"])
  np.testing.assert_allclose(get(rot_c, "act_quantizer"), get(plain_c, "act_quantizer") @ rmat,
                             atol=1e-5)
  np.testing.assert_allclose(get(rot_c, "weight_quantizer"),
                             rmat.T @ get(plain_c, "weight_quantizer"), atol=1e-5)


def test_smoothing_balances_channels(tiny):
  """alpha = 0.5: after the fold, each input channel's max |x_j| equals its weight row's max
  (for qkv, the rows as they were before v's columns took proj's scaling)."""
  student, x = tiny
  s = smooth.smooth(student, np.asarray(x), 4, 2, alpha=0.5)
  absmax = smooth.channel_absmax(s, 4, 2, np.asarray(x))
  before = smooth.channel_absmax(student, 4, 2, np.asarray(x))
  for path, kinds in absmax.items():
    blk, old = rotation.subtree(s.params, path), rotation.subtree(student.params, path)
    qkv = np.array(blk["attn"]["qkv"]["kernel"])
    c = qkv.shape[0]
    qkv[:, 2 * c:] *= smooth.smoothing_scales(before[path]["proj"], old["attn"]["proj"]["kernel"],
                                              0.5)
    kernels = {"qkv": qkv, "fc1": blk["mlp"]["fc1"]["kernel"], "proj": blk["attn"]["proj"]["kernel"]}
    for kind, ax in kinds.items():
      aw = np.max(np.abs(np.asarray(kernels[kind])), axis=1)
      np.testing.assert_allclose(ax, aw, rtol=1e-4)
      assert not np.allclose(ax, before[path][kind], rtol=1e-2)  # the inputs did change


def _minmax_bounds(student, x):
  seen = student.module(4, "capture").apply(student.variables(), x, mutable=["calib"])[1]
  inputs = qnames.leaves_by_name(seen["calib"], "input")
  return jax.tree_util.tree_map(jnp.asarray, qnames.dict_to_tree(
      {k: [float(jnp.min(v)), float(jnp.max(v))] for k, v in inputs.items()}))


@pytest.mark.parametrize("bits", [2, 4])
def test_int_engine_equals_fake_quant_on_rotated(tiny, bits):
  student, x = tiny
  r = rotation.rotate(smooth.smooth(student, np.asarray(x), 4, bits), KEY, rotation.KINDS)
  variables = r.variables(_minmax_bounds(r, x))
  out = {mode: np.asarray(jax.jit(lambda v, x, m=mode: r.module(4, m, bits).apply(v, x))(
      variables, x)) for mode in ("quant", "int")}
  diff = np.abs(out["quant"] - out["int"])
  assert diff.mean() <= 1e-4 and diff.max() <= 1e-2, (diff.mean(), diff.max())
  # Not trivially equal: without the rotation matrices the network computes something else.
  unrotated = Student(r.params, arch=ARCH).variables(variables["quant"])
  other = np.asarray(jax.jit(lambda v, x: Student(r.params, arch=ARCH).module(4, "quant", bits)
                             .apply(v, x))(unrotated, x))
  assert np.abs(other - out["quant"]).mean() > 1e-3


@pytest.mark.parametrize("mode", ["fp", "quant"])
def test_scanned_rotated_equals_unrolled(tiny, mode):
  student, x = tiny
  r = rotation.rotate(student, KEY, rotation.KINDS)
  variables = r.variables(None if mode == "fp" else _minmax_bounds(r, x))
  outs = [jax.jit(lambda v, x, s=scan: r.module(4, mode, 4, scan_blocks=s).apply(
      v, x, return_features=True))(variables, x) for scan in (False, True)]
  for a, b in zip(jax.tree_util.tree_leaves(outs[0]), jax.tree_util.tree_leaves(outs[1])):
    _assert_same_fp(b, a)


def test_stages_are_registered(tiny):
  student, x = tiny
  inputs = stages.StageInputs(fp_params=student.params, calib_lr=np.asarray(x), scale=4, bits=2,
                              key=KEY, options={"rotate_kinds": ("fc2",)})
  out = stages.apply(("smooth", "rotate"), student, inputs)
  assert out.arch["rotate"] == ("fc2",)
  _assert_same_fp(_fp(out, x), _fp(student, x))
  default = stages.apply(("rotate",), student, stages.StageInputs(
      fp_params=student.params, calib_lr=np.asarray(x), scale=4, bits=2, key=KEY))
  assert default.arch.get("rotate", ()) == tuple(
      k for k in rotation.DEFAULT_KINDS if k in ("qkv", "fc1", "fc2"))


def test_smoothing_in_the_combination_starts_at_3_bits(tiny):
  """Stage `smooth_w3` (2DQuant++): the student unchanged at 2 bits, `smooth` itself at 3."""
  student, x = tiny
  inputs = lambda bits: stages.StageInputs(fp_params=student.params, calib_lr=np.asarray(x),
                                           scale=4, bits=bits, key=KEY)
  assert stages.apply(("smooth_w3",), student, inputs(2)) is student
  got = stages.apply(("smooth_w3",), student, inputs(3))
  want = stages.apply(("smooth",), student, inputs(3))
  leaves = lambda s: jax.tree_util.tree_leaves(s.params)
  assert any(not np.array_equal(a, b) for a, b in zip(leaves(got), leaves(student)))
  for a, b in zip(leaves(got), leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_standin_rotated_fp_equals_plain(reference):
  """The stand-in x4 weights, smoothed on 2 calibration patches and rotated (every kind), on
  crops of the three parity images: the FP output is the plain one's."""
  params, _ = convert.load_checkpoint(reference / "standin_x4.pth", 4,
                                      variable_shapes(4)["params"])
  ref = np.load(reference / "parity_x4_random.npz")
  x = jnp.asarray(np.stack([ref["baby_lr"][:32, :32], ref["woman_lr"][40:72, 20:52],
                            ref["bird_lr"][30:62, 30:62]]).astype(np.float32) / 255.0)
  calib = np.load(reference / "calib_x4.npz")["lr"][:2, :32, :32]
  base = Student(params)
  changed = rotation.rotate(smooth.smooth(base, calib, 4, 2), KEY, rotation.KINDS)
  assert _max_diff(_fp(changed, x), _fp(base, x)) <= 1e-5
