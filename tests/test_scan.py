"""The scanned SwinIR (`scan_blocks=True`) computes what the unrolled one does, with its variables.

A small network (2 RSTBs of 4 blocks: two (unshifted, shifted) pairs per RSTB, so both the pair
scan and the RSTB scan take more than one step) keeps the compiles short; one check runs the
real stand-in network. Both paths are jitted: eager and jitted runs of a fake-quantized network
may round differently, which is not what these tests are about.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twodquant_jax.formats import convert
from twodquant_jax.nn import names as qnames
from twodquant_jax.nn.swinir import SwinIR, variable_shapes
from twodquant_jax.ptq.dqc import memory as dqc_memory
from twodquant_jax.ptq.dqc import step as dqc_step
from twodquant_jax.settings import DQCSettings

ARCH = {"embed_dim": 12, "depths": (4, 4), "num_heads": (2, 2), "window_size": 4}
BITS = 4


def _tree_max_diff(a, b) -> float:
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  return max(float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y)))) for x, y in zip(la, lb))


def _minmax(model_kw: dict, params, x) -> dict:
  """Min/max bounds of every quantizer input on x (realistic ranges: few clipped values)."""
  seen = jax.jit(lambda p, x: SwinIR(mode="capture", **model_kw).apply(
      {"params": p}, x, mutable=["calib"])[1])(params, x)
  inputs = qnames.leaves_by_name(seen["calib"], "input")
  return jax.tree_util.tree_map(jnp.asarray, qnames.dict_to_tree(
      {k: [float(jnp.min(v)), float(jnp.max(v))] for k, v in inputs.items()}))


@pytest.fixture(scope="module")
def tiny():
  """(params, bounds, x) of the small network, seeded."""
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 16, 16, 3)), jnp.float32)
  # Jitted without LLVM optimisation: random test data, run once (eagerly some 20 CPU s, most
  # of it one compile per op; optimised, the PRNG's code generation takes 9 CPU s).
  init = jax.jit(SwinIR(**ARCH).init, compiler_options={"xla_backend_optimization_level": 0})
  params = init(jax.random.key(1), x)["params"]
  return params, _minmax(ARCH, params, x), x


def _variables(mode, params, quant):
  return {"params": params} if mode == "fp" else {"params": params, "quant": quant}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fp", "quant", "int"])
def test_scanned_equals_unrolled(tiny, mode):
  """Output and the 4 RSTB features, on whole images and on a bucket canvas (valid_hw)."""
  params, quant, x = tiny
  variables = _variables(mode, params, quant)
  valid_hw = jnp.array([[16, 8], [8, 12]], jnp.int32)
  outs = {}
  for scan in (False, True):
    model = SwinIR(mode=mode, bits=BITS, scan_blocks=scan, **ARCH)
    outs[scan] = jax.jit(lambda v, x: (model.apply(v, x, return_features=True),
                                       model.apply(v, x, valid_hw=valid_hw)))(variables, x)
  assert _tree_max_diff(outs[False], outs[True]) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["off", "full"])
def test_dqc_gradients_equal(tiny, remat):
  """The DQC loss and its gradient w.r.t. every bound, scanned vs unrolled, with and without
  remat (remat wraps each block in jax.checkpoint inside the scan)."""
  params, quant, x = tiny
  got = {}
  for scan in (False, True):
    arch = tuple(sorted({**ARCH, "scan_blocks": scan}.items()))
    settings = DQCSettings(scale=4, bits=BITS, remat=remat, arch=arch)
    fn = jax.jit(jax.value_and_grad(
        lambda q: dqc_step.distillation_loss(params, q, x, settings)[0]))
    got[scan] = fn(quant)
  (loss0, g0), (loss, g) = got[False], got[True]
  scale = max(float(jnp.max(jnp.abs(v))) for v in jax.tree_util.tree_leaves(g0))
  assert scale > 0
  assert abs(float(loss) - float(loss0)) <= 1e-5 * abs(float(loss0))
  assert _tree_max_diff(g, g0) <= 1e-5 * scale


@pytest.mark.parametrize("remat", ["matmuls", "full"])
def test_remat_gives_the_plain_gradient(tiny, remat):
  """A rematerialised student (dqc.remat 'matmuls': matmul outputs and attention probabilities
  kept; 'full': only block inputs) gives the DQC loss and bound gradients of the plain one."""
  params, quant, x = tiny
  got = {}
  for mode in ("off", remat):
    settings = DQCSettings(scale=4, bits=BITS, remat=mode, arch=tuple(sorted(ARCH.items())))
    got[mode] = jax.jit(jax.value_and_grad(
        lambda q, s=settings: dqc_step.distillation_loss(params, q, x, s)[0]))(quant)
  (loss0, g0), (loss, g) = got["off"], got[remat]
  scale = max(float(jnp.max(jnp.abs(v))) for v in jax.tree_util.tree_leaves(g0))
  assert scale > 0
  assert abs(float(loss) - float(loss0)) <= 1e-6 * abs(float(loss0))
  assert _tree_max_diff(g, g0) <= 1e-5 * scale


def test_remat_lowers_the_step_memory(tiny):
  """XLA's memory need of the compiled DQC step (per device, as the planner reads it) falls
  from remat 'off' to 'matmuls' to 'full'. Unrolled 'matmuls' needs the memory-optimised
  scheduler of the step's compiler options: XLA:CPU's default one recomputes early and keeps
  everything."""
  params, quant, _ = tiny
  mesh = dqc_step.data_mesh()
  budget = dqc_memory.Budget(limit=10**15)
  need = {}
  for mode in ("off", "matmuls", "full"):
    settings = DQCSettings(scale=4, bits=BITS, remat=mode, microbatch=0,
                           arch=tuple(sorted(ARCH.items())))
    need[mode] = dqc_memory.check_explicit(settings, 2 * mesh.devices.size, 32, mesh, params,
                                           quant, budget)["bytes"]
  assert need["full"] < need["matmuls"] < 0.9 * need["off"], need


def test_capture_is_unchanged(tiny):
  """'capture' mode (DOBI's FP tensors) runs unrolled: the same sown tensors either way."""
  params, _, x = tiny
  got = [jax.jit(lambda p, x, s=scan: SwinIR(mode="capture", scan_blocks=s, **ARCH).apply(
      {"params": p}, x, mutable=["calib"])[1])(params, x) for scan in (False, True)]
  assert jax.tree_util.tree_structure(got[0]) == jax.tree_util.tree_structure(got[1])
  assert _tree_max_diff(got[0], got[1]) == 0.0


@pytest.mark.parametrize("mode", ["fp", "quant"])
def test_variable_tree_unchanged(mode):
  """init gives the same variables (names, shapes) scanned or not; quantizer names are the
  authors' 384."""
  shapes = {scan: jax.eval_shape(lambda s=scan: SwinIR(mode=mode, scan_blocks=s).init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 3)))) for scan in (False, True)}
  same = jax.tree_util.tree_map(lambda a, b: a.shape == b.shape, shapes[False], shapes[True])
  assert jax.tree_util.tree_structure(shapes[False]) == jax.tree_util.tree_structure(shapes[True])
  assert all(jax.tree_util.tree_leaves(same))
  assert jax.tree_util.tree_structure(variable_shapes(4, mode)) == jax.tree_util.tree_structure(
      shapes[True])
  if mode == "quant":
    assert len(qnames.leaves_by_name(shapes[True]["quant"], "bounds")) == 384


@pytest.mark.slow
def test_standin_scanned_equals_unrolled(reference):
  """The real network with the stand-in weights: FP and fake-quant outputs agree."""
  shapes = variable_shapes(4)["params"]
  params = convert.load_checkpoint(reference / "standin_x4.pth", 4, shapes)[0]
  x = jnp.asarray(np.random.default_rng(2).uniform(size=(1, 16, 24, 3)), jnp.float32)
  quant = _minmax({}, params, x)
  for mode in ("fp", "quant"):
    variables = _variables(mode, params, quant)
    outs = [jax.jit(lambda v, x, s=scan: SwinIR(mode=mode, bits=2, scan_blocks=s).apply(
        v, x, return_features=True))(variables, x) for scan in (False, True)]
    assert _tree_max_diff(outs[0], outs[1]) <= 1e-5, mode
