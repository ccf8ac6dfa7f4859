"""The DQC train step: a pure function over a `DQCState` (step, bounds, Adam state).

Only the 'quant' collection (the 768 bounds) is trained, with Adam, against the FP teacher.
The student is the FP params themselves (the paper) or a `nn.student.Student` passed as
`StudentWeights` (its own params, extra collections and SwinIR options next to the teacher's
params); with learned rounding (arch 'rounding') the trained tree is `Trainables` (bounds and
rounding offsets) and the loss gets the rounding regulariser.
The batch is sharded over a 1-D 'data' mesh, the state replicated; XLA inserts the gradient
all-reduce. `microbatched_value_and_grad` gives the whole-batch loss and gradient in the memory
of one microbatch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from twodquant_jax import compile_cache
from twodquant_jax.nn.layers import ROUNDING
from twodquant_jax.nn.swinir import SwinIR
from twodquant_jax.ptq import rounding as rounding_lib
from twodquant_jax.ptq.dqc.loss import LOSS_FUNCTIONS, Aux, paper_loss, per_sample_norm
from twodquant_jax.settings import AUTO_MICROBATCH, DQCSettings
DATA_AXIS = "data"

Array = jnp.ndarray


def model_for(settings: DQCSettings, mode: str = "fp",
              student_arch: Mapping[str, Any] | Sequence = ()) -> SwinIR:
  """The teacher ('fp') or the student ('quant', its blocks rematerialised as
  `remat_mode(settings)` says); `student_arch`: the student's own SwinIR options (e.g.
  weight_channels), never the teacher's.

  Swin blocks scanned (`SwinIR.scan_blocks`) only with remat 'full': on XLA:CPU the scanned
  step compiles 1.5x faster, but without remat runs 1.3-1.4x slower (its stacked residuals),
  with full remat about as fast (docs/measured/compile-scan.md). `arch` may still set
  `scan_blocks`."""
  remat = remat_mode(settings)
  arch = {"scan_blocks": remat == "full", **dict(settings.arch)}
  if mode != "fp":
    arch.update(dict(student_arch))
  return SwinIR(upscale=settings.scale, mode=mode, bits=settings.bits,
                remat=remat if mode == "quant" else "off", **arch)


def remat_mode(settings: DQCSettings, backend: str | None = None) -> str:
  """dqc.remat resolved: 'auto' is 'matmuls' on XLA:CPU, where the step's memory is the host's
  (and glibc holds about twice XLA's need), else 'off' (a GPU has the memory; recomputing costs
  it time). Other values as given (`swinir.REMAT_MODES`)."""
  if settings.remat != "auto":
    return settings.remat
  return "matmuls" if compile_cache.backend_kind(backend) == "cpu" else "off"


@flax.struct.dataclass
class StudentWeights:
  """What a step needs of a `Student` and its teacher, as one pytree argument: the teacher's FP
  params, the student's params and extra collections, its SwinIR options (static)."""
  teacher: Any
  params: Any
  extra: Any
  arch: tuple = flax.struct.field(pytree_node=False, default=())


@flax.struct.dataclass
class Trainables:
  """The trained tree of a student with learned rounding: the bounds and the offsets."""
  quant: Any
  rounding: Any


def student_weights(fp_params: Mapping, student) -> StudentWeights:
  """`StudentWeights` of a `nn.student.Student` (arch items sorted, lists as tuples)."""
  arch = tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                      for k, v in dict(student.arch).items()))
  extra = {k: v for k, v in dict(student.extra).items() if k != ROUNDING}
  return StudentWeights(teacher=fp_params, params=student.params, extra=extra, arch=arch)


def bounds_of(quant: Any) -> Any:
  """The 'quant' collection of a trained tree (bounds, or `Trainables`)."""
  return quant.quant if isinstance(quant, Trainables) else quant


def _teacher_params(params: Any) -> Any:
  return params.teacher if isinstance(params, StudentWeights) else params


def trained_collections(quant: Any) -> dict:
  """The trained tree (bounds, or `Trainables`) as the student's variable collections."""
  if isinstance(quant, Trainables):
    return {"quant": quant.quant, ROUNDING: quant.rounding}
  return {"quant": quant}


def _student_apply(params: Any, quant: Any, settings: DQCSettings):
  """(student module, its variables) for the step's `params` and trained tree `quant`."""
  trained = trained_collections(quant)
  if isinstance(params, StudentWeights):
    return (model_for(settings, "quant", params.arch),
            {"params": params.params, **params.extra, **trained})
  return model_for(settings, "quant"), {"params": params, **trained}


@flax.struct.dataclass
class DQCState:
  """Everything a DQC step changes: the step count, the bounds and Adam's state."""
  step: Array
  quant: Any
  opt_state: Any


def make_schedule(settings: DQCSettings) -> optax.Schedule:
  """Cosine annealing to 0 over `steps` (paper; PyTorch CosineAnnealingLR) or constant (code)."""
  if settings.schedule == "cosine":
    return optax.cosine_decay_schedule(settings.lr, decay_steps=settings.steps, alpha=0.0)
  return optax.constant_schedule(settings.lr)


def make_optimizer(settings: DQCSettings, quant: Any = None) -> optax.GradientTransformation:
  """Adam as PyTorch defines it (eps outside the sqrt, no weight decay). For `Trainables` with
  `settings.rounding_lr` > 0, the offsets get their own Adam at that learning rate (same
  schedule shape); otherwise one Adam serves the whole trained tree."""
  adam = lambda lr: optax.adam(lr, b1=settings.b1, b2=settings.b2, eps=settings.eps)
  if not isinstance(quant, Trainables) or not settings.rounding_lr:
    return adam(make_schedule(settings))
  rounding_schedule = make_schedule(dataclasses.replace(settings, lr=settings.rounding_lr))
  labels = lambda t: Trainables(quant=jax.tree_util.tree_map(lambda _: "quant", t.quant),
                                rounding=jax.tree_util.tree_map(lambda _: "rounding", t.rounding))
  return optax.multi_transform({"quant": adam(make_schedule(settings)),
                                "rounding": adam(rounding_schedule)}, labels)


def init_state(settings: DQCSettings, quant: Any) -> DQCState:
  """Step 0 with the initial (DOBI) bounds (or `Trainables`) and a fresh Adam state."""
  quant = jax.tree_util.tree_map(jnp.asarray, quant)
  return DQCState(step=jnp.zeros((), jnp.int32), quant=quant,
                  opt_state=make_optimizer(settings, quant).init(quant))


def teacher_outputs(params: Mapping, x: Array, settings: DQCSettings) -> tuple[Array, list]:
  """The FP teacher's (output, features) on x, gradient-free. They do not depend on the bounds,
  so a step computes them once per batch and shares them between its passes."""
  teacher = model_for(settings, "fp")
  return jax.lax.stop_gradient(teacher.apply({"params": _teacher_params(params)}, x,
                                             return_features=True))


def _forward_pair(params: Mapping, quant: Mapping, x: Array, settings: DQCSettings,
                  teacher: tuple[Array, list] | None = None):
  """(out_q, out, feats_q, feats): the student's and the (gradient-free) teacher's outputs."""
  out, feats = teacher if teacher is not None else teacher_outputs(params, x, settings)
  student, variables = _student_apply(params, quant, settings)
  out_q, feats_q = student.apply(variables, x, return_features=True)
  return out_q, out, feats_q, feats


def distillation_loss(params: Mapping, quant: Mapping, x: Array, settings: DQCSettings,
                      teacher: tuple[Array, list] | None = None) -> tuple[Array, Aux]:
  """DQC loss of the student (bounds `quant`) against the FP teacher on float images x in [0, 1].

  `params`: the FP params (the paper's student) or `StudentWeights`; `quant`: the bounds or
  `Trainables`. The rounding regulariser is not part of it (`train_step` adds it).

  Differentiate w.r.t. `quant` only; the teacher is under stop_gradient (pass its precomputed
  `teacher_outputs` to skip recomputing them).
  """
  out_q, out, feats_q, feats = _forward_pair(params, quant, x, settings, teacher)
  return LOSS_FUNCTIONS[settings.loss](out_q, out, feats_q, feats, settings.feature_weight)


def _pair_stats(f_q: Array, f: Array) -> Array:
  """Per-sample (n_q, n, ||d||^2, <d, F>, ||F||^2) of a feature pair, d = F_q - F: (B, 5)."""
  b = f.shape[0]
  fq2, f2 = f_q.reshape(b, -1), f.reshape(b, -1)
  d = fq2 - f2
  return jnp.stack([per_sample_norm(fq2), per_sample_norm(f2), jnp.sum(d * d, axis=1),
                    jnp.sum(d * f2, axis=1), jnp.sum(f2 * f2, axis=1)], axis=1)


def microbatch_size(batch: int, limit: int) -> int:
  """The largest divisor of `batch` that is at most `limit` (microbatches must tile the batch)."""
  return max(d for d in range(1, max(1, min(batch, limit)) + 1) if batch % d == 0)


def _tree_add(acc, new):
  return jax.tree_util.tree_map(jnp.add, acc, new)


def microbatched_value_and_grad(params: Mapping, quant: Mapping, x: Array,
                                settings: DQCSettings) -> tuple[tuple[Array, Aux], Mapping]:
  """The DQC loss of the whole batch and its gradient, computed microbatch by microbatch.

  Memory is that of one microbatch. The paper loss is a batch mean of per-image terms, so its
  pieces add up. The reference loss couples the samples only through the detached per-sample
  norms (its (B, B) broadcast): a first, gradient-free pass collects those, then each
  microbatch's share of `reference_feature_term`'s expansion is differentiated with the
  batch-wide coefficients as constants. Values equal the whole-batch loss up to float order.
  The teacher runs once per microbatch, its outputs shared by the two passes (the student's
  forward is repeated: keeping its residuals across microbatches would cost the whole batch's
  memory).
  """
  b = x.shape[0]
  mb = microbatch_size(b, settings.microbatch)
  # Microbatch m holds samples m, M+m, 2M+m, ... (M microbatches): with the batch sharded in
  # contiguous blocks over devices, every microbatch still spans all devices (data parallel).
  xs = jnp.swapaxes(x.reshape((mb, b // mb) + x.shape[1:]), 0, 1)
  nf = len(model_for(settings, "fp").depths)  # one feature per RSTB
  # The teacher once per microbatch (small: its output and 4 features), shared by both passes.
  teach = jax.lax.map(lambda xm: teacher_outputs(params, xm, settings), xs)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, quant)
  aux0 = {"l_pix": jnp.zeros(()), "l_feature_terms": jnp.zeros(nf), "l_feature": jnp.zeros(())}
  coef = (_reference_coefficients(params, quant, xs, teach, settings, nf)
          if settings.loss == "reference" else None)

  def loss_fn(q, xm, tm):
    return part_loss(*_forward_pair(params, q, xm, settings, tm), settings, b=b, coef=coef)

  def body(carry, xt):
    return _tree_add(carry, jax.value_and_grad(loss_fn, has_aux=True)(quant, *xt)), None

  (value, grads), _ = jax.lax.scan(body, ((jnp.zeros(()), aux0), zeros), (xs, teach))
  return value, grads


def _reference_coefficients(params, quant, xs, teach, settings, nf) -> Array:
  """The batch-wide (nf, 3) coefficients of the reference feature term's expansion, from a
  gradient-free pass of the student over the microbatches (the detached per-sample norms)."""
  def stats(xt):
    xm, tm = xt
    out_q, out, feats_q, feats = _forward_pair(params, quant, xm, settings, tm)
    return feature_stats(feats_q, feats)  # (nf, mb, 5)

  return coefficients(jax.lax.map(stats, (xs, teach)))


def feature_stats(feats_q: Sequence[Array], feats: Sequence[Array]) -> Array:
  """(nf, B, 5) per-sample statistics of the feature pairs (`_pair_stats`), gradient-free."""
  return jax.lax.stop_gradient(jnp.stack([_pair_stats(fq, f) for fq, f in zip(feats_q, feats)]))


def coefficients(st: Array) -> Array:
  """The (nf, 3) coefficients of the reference feature term's expansion from the per-microbatch
  statistics st (M, nf, mb, 5) of the whole batch."""
  st = jax.lax.stop_gradient(st)
  nf = st.shape[1]
  st = jnp.moveaxis(st, 1, 0).reshape(nf, -1, 5)
  n_q, n, dd, df = st[..., 0], st[..., 1], st[..., 2], st[..., 3]
  a = 1.0 / n_q
  c = -(2.0 * df + dd) / (n + n_q) / (n * n_q)
  return jnp.stack([jnp.sum(a * a, 1), 2.0 * jnp.sum(a * c, 1), jnp.sum(c * c, 1)], 1)


def part_loss(out_q: Array, out: Array, feats_q: Sequence[Array], feats: Sequence[Array],
              settings: DQCSettings, b: int, coef: Array | None = None) -> tuple[Array, Aux]:
  """One microbatch's share of the loss of a whole batch of `b` images: the paper loss weighted
  by its share of the batch, or the reference loss with the batch-wide `coef` (`coefficients`)
  held constant. Microbatch shares add up to the whole batch's loss."""
  if settings.loss == "paper":
    w = out.shape[0] / b
    loss, aux = paper_loss(out_q, out, feats_q, feats, settings.feature_weight)
    return loss * w, jax.tree_util.tree_map(lambda v: v * w, aux)
  numel_out = float(b * np.prod(out.shape[1:]))
  l_pix = jnp.sum(jnp.abs(out_q - out)) / numel_out / numel_out * b
  terms = []
  for k, (fq, f) in enumerate(zip(feats_q, feats)):
    p = _pair_stats(fq, f)
    numel = float(b * b * np.prod(f.shape[1:]))
    part = (coef[k, 0] * jnp.sum(p[:, 2]) + coef[k, 1] * jnp.sum(p[:, 3])
            + coef[k, 2] * jnp.sum(p[:, 4]))
    terms.append(settings.feature_weight * part / numel / numel)
  terms = jnp.stack(terms)
  return l_pix + jnp.sum(terms), {"l_pix": l_pix, "l_feature_terms": terms,
                                  "l_feature": jnp.sum(terms)}


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all (or the given) devices along the batch ('data') axis."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if batch_size < 1 or batch_size % n:
    raise ValueError(f"config.dqc.batch_size ({batch_size}) must be a positive multiple of the "
                     f"number of devices ({n}) for data-parallel DQC")


def _all_finite(tree: Any) -> Array:
  """Whether every element of every leaf is finite: one flag over the leaves concatenated.

  XLA:CPU compile times over the ~1,150 leaves of a DQC state (the Adam update alone: 2.1 CPU s):
  this 2.8 s, a chain of per-leaf ANDs 7.0 s, a stack of the per-leaf flags 7.7 s."""
  return jnp.all(jnp.isfinite(jnp.concatenate([jnp.ravel(x)
                                               for x in jax.tree_util.tree_leaves(tree)])))


def train_step(state: DQCState, lr_u8: Array, params: Mapping, settings: DQCSettings
               ) -> tuple[DQCState, dict[str, Array]]:
  """One Adam step of the bounds on a uint8 LR batch.

  If the loss or a new bound is non-finite, the returned state is the input state (so it can
  never be saved) and metrics['finite'] is False.
  """
  if settings.microbatch == AUTO_MICROBATCH:
    raise ValueError("microbatch 'auto' must be resolved before the step is built "
                     "(ptq.dqc.memory.train_step_fn)")
  x = lr_u8.astype(jnp.float32) / 255.0
  if settings.microbatch and settings.microbatch < x.shape[0]:
    (loss, aux), grads = microbatched_value_and_grad(params, state.quant, x, settings)
  else:
    teacher = teacher_outputs(params, x, settings)  # outside the differentiated function
    (loss, aux), grads = jax.value_and_grad(
        lambda q: distillation_loss(params, q, x, settings, teacher), has_aux=True)(state.quant)
  return apply_gradients(state, loss, aux, grads, settings)


def apply_gradients(state: DQCState, loss: Array, aux: Aux, grads: Any, settings: DQCSettings
                    ) -> tuple[DQCState, dict[str, Array]]:
  """The step after the distillation gradient: the rounding regulariser (learned rounding),
  Adam, and the finiteness guard (a non-finite loss or bound returns the input state)."""
  l_round = jnp.zeros(())
  if isinstance(state.quant, Trainables):  # the rounding regulariser, once per batch
    beta = rounding_lib.beta_at(state.step, settings.steps, settings.rounding_beta_start,
                                settings.rounding_beta_end, settings.rounding_warmup)
    on = rounding_lib.regulariser_on(state.step, settings.steps, settings.rounding_warmup)
    l_round, g_round = jax.value_and_grad(rounding_lib.regulariser)(state.quant.rounding, beta)
    scale = settings.rounding_weight * on
    grads = grads.replace(rounding=jax.tree_util.tree_map(lambda g, r: g + scale * r,
                                                          grads.rounding, g_round))
    loss = loss + scale * l_round
  updates, new_opt = make_optimizer(settings, state.quant).update(grads, state.opt_state,
                                                                  state.quant)
  new = DQCState(step=state.step + 1, quant=optax.apply_updates(state.quant, updates),
                 opt_state=new_opt)
  loss_ok = jnp.isfinite(loss)
  # The barrier keeps XLA from fusing the flag's computation into each of the ~1,150 selects
  # (with it the update compiled in 3.6 CPU s; without, over 2 minutes).
  ok = jax.lax.optimization_barrier(loss_ok & _all_finite((new.quant, new.opt_state)))
  new = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, state)
  metrics = {"loss": loss, "l_pix": aux["l_pix"], "l_feature": aux["l_feature"],
             "l_round": l_round, "loss_finite": loss_ok, "finite": ok}
  return new, metrics


@functools.lru_cache(maxsize=8)
def jit_train_step(settings: DQCSettings, mesh: Mesh) -> Callable:
  """`train_step` jitted for `mesh`: (state, lr_u8, params) -> (state, metrics); the batch is
  sharded along 'data', state and params replicated, the state's buffers donated."""
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
  step = lambda state, lr_u8, params: train_step(state, lr_u8, params, settings)
  return jax.jit(step, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,), compiler_options=compile_cache.compiler_options("train"))
