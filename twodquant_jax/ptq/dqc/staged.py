"""The DQC step as separately compiled pieces, so each distinct pair of Swin blocks compiles once.

Why: compiled as one program (`step.jit_train_step`), the step holds all 24 Swin blocks
unrolled, forward and backward, and XLA compiles for 28-45 s on a CPU (168 s on an H200),
longer than many DQC runs train. Here the same step is a pure function of (state, batch,
params) composed of jitted pieces, called in order from Python:

  teacher forward | student embedding | per pair of Swin blocks: forward returning its VJP
  (a pytree of the residuals that `remat_mode` keeps) | per RSTB: conv + skip, with its VJP |
  tail + loss and its gradient w.r.t. the last tokens and the 4 features | the VJPs applied
  in reverse | Adam (`step.apply_gradients`).

Identical block pairs share a piece, so the 24 blocks (12 identical (unshifted, shifted)
pairs) compile once, forward and backward. Values equal the one-program step's up to float
order: XLA fuses a pair alone differently, so a fake-quant input within an ulp of a level
boundary can land on the other level (as for `SwinIR.scan_blocks`). Microbatches run one
after another, as in `step.microbatched_value_and_grad` (same split, same loss shares, same
coefficients).

On a multi-device CPU mesh the pieces that all-reduce (a pair's backward, the loss) are waited
for before the next one is dispatched: XLA:CPU may run independent programs concurrently, and
two all-reduces in flight in different orders on two devices would deadlock.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from twodquant_jax import compile_cache
from twodquant_jax.nn import swinir
from twodquant_jax.nn.layers import ROUNDING
from twodquant_jax.ptq.dqc import step as dqc_step
from twodquant_jax.ptq.dqc.loss import LOSS_FUNCTIONS
from twodquant_jax.settings import AUTO_MICROBATCH, DQCSettings

Array = jnp.ndarray
BLOCK_PATH = ("residual_group",)  # RSTB i's blocks: <collection>['layers_i']['residual_group']


def _block_variables(tree: Mapping, i: int, j: int) -> Any:
  return tree[swinir.SwinIR.stage_name(i)][BLOCK_PATH[0]][f"blocks_{j}"]


def _has_block(tree: Mapping, i: int, j: int) -> bool:
  return f"blocks_{j}" in tree.get(swinir.SwinIR.stage_name(i), {}).get(BLOCK_PATH[0], {})


def _split_variables(params: Any, quant: Any) -> tuple[dict, dict, dict, dict]:
  """(teacher params, student variables not trained, trained collections, student arch)."""
  trained = dqc_step.trained_collections(quant)
  if isinstance(params, dqc_step.StudentWeights):
    return params.teacher, {"params": params.params, **params.extra}, trained, dict(params.arch)
  return params, {"params": params}, trained, {}


def _trained_tree(quant: Any, grads: dict) -> Any:
  """Gradients {collection: tree} in the form of the trained tree `quant`."""
  if isinstance(quant, dqc_step.Trainables):
    return dqc_step.Trainables(quant=grads["quant"], rounding=grads[ROUNDING])
  return grads["quant"]


class _Runner:
  """Calls a piece, or (compile mode) compiles it for abstract arguments and returns abstract
  outputs, recording each compiled piece's memory analysis."""

  def __init__(self, compile_only: bool, sync: bool, compiled: dict | None = None):
    self.compile_only = compile_only
    self.sync = sync
    self.memory: list[tuple[str, Any, Any]] = []  # (piece, group, memory analysis) per call
    self.group: Any = None  # what the calls belong to: None (the whole step) or a microbatch
    # (piece, argument signature) -> compiled; the step's own, so a second `compile` of the
    # same step (the planner's, then the loop's) compiles nothing.
    self._compiled = {} if compiled is None else compiled
    self.compiles: collections.Counter = collections.Counter()  # distinct compiles per piece

  def __call__(self, name: str, fn: Callable, *args, collective: bool = False):
    if not self.compile_only:
      out = fn(*args)
      if collective and self.sync:
        jax.block_until_ready(out)
      return out
    leaves, tree = jax.tree_util.tree_flatten(args)
    key = (fn, tree, tuple((jnp.shape(a), jnp.result_type(a), getattr(a, "sharding", None))
                           for a in leaves))
    if key not in self._compiled:
      self._compiled[key] = fn.lower(*args).compile()
      self.compiles[name] += 1
    compiled = self._compiled[key]
    self.memory.append((name, self.group, compiled.memory_analysis()))
    return compiled.out_info


class StagedStep:
  """`step.train_step` for a settings and mesh, as pieces: (state, lr_u8, params) ->
  (state, metrics), the state donated to the last piece (Adam) as `jit_train_step` donates it.
  `compile(state, lr_u8, params)` (arrays or ShapeDtypeStructs with shardings) compiles every
  piece ahead and returns the step; `need_bytes` is XLA's estimate of a step's memory."""

  def __init__(self, settings: DQCSettings, mesh: Mesh):
    if settings.microbatch == AUTO_MICROBATCH:
      raise ValueError("microbatch 'auto' must be resolved before the step is built "
                       "(ptq.dqc.memory.train_step_fn)")
    self.settings = settings
    self.mesh = mesh
    self.remat = dqc_step.remat_mode(settings)
    self.data = NamedSharding(mesh, P(dqc_step.DATA_AXIS))
    self.sync = mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"
    self._pieces: dict[Any, Callable] = {}
    self._compiled: dict[Any, Any] = {}  # the pieces' compiles (`_Runner`)
    self.last_memory: list[tuple[str, Any, Any]] = []  # `_Runner.memory` of the last compile
    self._last_compiles: collections.Counter = collections.Counter()

  # -- pieces (jitted once per distinct static part; jit caches per shape) -------------------
  def _piece(self, key: Any, make: Callable[[], Callable]) -> Callable:
    if key not in self._pieces:
      self._pieces[key] = make()
    return self._pieces[key]

  def _jit(self, fn: Callable, **kw) -> Callable:
    return jax.jit(fn, compiler_options=compile_cache.compiler_options("train"), **kw)

  def _student(self, arch: tuple) -> swinir.SwinIR:
    """The student SwinIR of `arch` (its attributes give the pieces' modules)."""
    return self._piece(("student", arch), lambda: dqc_step.model_for(
        dataclasses.replace(self.settings, remat="off"), "quant", arch))

  def _teacher(self) -> Callable:
    def run(teacher_params, x_u8):
      x = x_u8.astype(jnp.float32) / 255.0
      return dqc_step.teacher_outputs(teacher_params, x, self.settings)
    return self._piece("teacher", lambda: self._jit(run))

  def _embed(self, arch: tuple) -> Callable:
    model = self._student(arch)

    def run(variables, x_u8):
      return model.apply(variables, x_u8.astype(jnp.float32) / 255.0, method=swinir.SwinIR.embed)
    return self._piece(("embed", arch), lambda: self._jit(run))

  def _blocks_forward(self, arch: tuple, i: int, shifts: tuple[int, ...]) -> Callable:
    """Consecutive Swin blocks of RSTB i with these shifts, forward, returning their VJP: one
    piece per (unshifted, shifted) pair, which all pairs of all RSTBs share."""
    model = self._student(arch)
    blocks = [swinir.SwinBlock(model.embed_dim, model.num_heads[i], model.window_size, shift,
                               model.mlp_ratio, model.mode, model.bits, tuple(model.rotate),
                               model.weight_channels, model.rounding, parent=None)
              for shift in shifts]
    policy = swinir.remat_policy(self.remat) if self.remat != "off" else None

    def run(trained, fixed, tokens, hw):
      def f(trained, tokens):
        for block, t, v in zip(blocks, trained, fixed):
          one = lambda t, x, block=block, v=v: block.apply({**v, **t}, x, hw)
          tokens = (jax.checkpoint(one, policy=policy) if self.remat != "off" else one)(
              t, tokens)
        return tokens
      return jax.vjp(f, trained, tokens)
    return self._piece(("blocks", arch, model.num_heads[i], shifts),
                       lambda: self._jit(run, static_argnums=(3,)))

  def _conv_forward(self, arch: tuple) -> Callable:
    conv = swinir._conv(self._student(arch).embed_dim)  # pylint: disable=protected-access

    def run(conv_params, feat, x_in, hw):
      b, _, c = feat.shape
      f = lambda feat: conv.apply({"params": conv_params},
                                  feat.reshape(b, hw[0], hw[1], c)).reshape(b, -1, c)
      y, vjp = jax.vjp(f, feat)
      return y + x_in, vjp
    return self._piece(("conv", arch), lambda: self._jit(run, static_argnums=(3,)))

  def _loss_grad(self, arch: tuple, b: int) -> Callable:
    settings = self.settings
    model = self._student(arch)

    def run(tokens, feats, shallow, variables, out, tfeats, coef, out_hw):
      def f(tokens, feats):
        out_q = model.apply(variables, tokens, shallow, out_hw, method=swinir.SwinIR.tail)
        if out.shape[0] == b:  # the whole batch
          return LOSS_FUNCTIONS[settings.loss](out_q, out, feats, tfeats, settings.feature_weight)
        return dqc_step.part_loss(out_q, out, feats, tfeats, settings, b=b, coef=coef)
      return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(tokens, feats)
    return self._piece(("loss", arch, b), lambda: self._jit(run, static_argnums=(7,)))

  def _apply_vjp(self) -> Callable:
    return self._piece("vjp", lambda: self._jit(lambda vjp, ct: vjp(ct)))

  def _add(self) -> Callable:
    return self._piece("add", lambda: self._jit(
        lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)))

  def _microbatches(self, m: int) -> Callable:
    def split(x):  # as step.microbatched_value_and_grad: microbatch k holds k, M+k, 2M+k, ...
      b = x.shape[0]
      return jnp.swapaxes(x.reshape((b // m, m) + x.shape[1:]), 0, 1)
    data = NamedSharding(self.mesh, P(None, dqc_step.DATA_AXIS))
    return self._piece(("split", m), lambda: self._jit(split, out_shardings=data))

  def _take(self) -> Callable:
    return self._piece("take", lambda: self._jit(lambda xs, k: xs[k], out_shardings=self.data))

  def _stats(self) -> Callable:
    return self._piece("stats", lambda: self._jit(dqc_step.feature_stats))

  def _coefficients(self) -> Callable:
    return self._piece("coef", lambda: self._jit(lambda *st: dqc_step.coefficients(
        jnp.stack(st))))

  def _update(self) -> Callable:
    settings = self.settings
    return self._piece("update", lambda: self._jit(
        lambda state, loss, aux, grads: dqc_step.apply_gradients(state, loss, aux, grads,
                                                                 settings),
        donate_argnums=(0,)))

  # -- the step ---------------------------------------------------------------------------
  def _student_forward(self, run: _Runner, arch: tuple, fixed, trained, x_u8, keep: bool):
    """(tokens, shallow, features, saved VJPs) of the student on x_u8."""
    shallow, tokens = run("embed", self._embed(arch), {"params": fixed["params"]}, x_u8)
    hw = tuple(shallow.shape[1:3])
    feats, saved = [], []
    model = self._student(arch)
    for i, depth in enumerate(model.depths):
      x_in, vjps = tokens, []
      for j0 in range(0, depth, 2):  # (unshifted, shifted) pairs; an odd depth ends alone
        js = tuple(range(j0, min(j0 + 2, depth)))
        pick = lambda tree: tuple({c: _block_variables(t, i, j) for c, t in tree.items()
                                   if _has_block(t, i, j)} for j in js)
        shifts = tuple(0 if j % 2 == 0 else model.window_size // 2 for j in js)
        tokens, vjp = run(f"blocks{len(js)}", self._blocks_forward(arch, i, shifts),
                          pick(trained), pick(fixed), tokens, hw)
        if keep:
          vjps.append((js, vjp))
      feats.append(tokens)
      conv_params = fixed["params"][swinir.SwinIR.stage_name(i)]["conv"]
      tokens, cvjp = run("conv", self._conv_forward(arch), conv_params, tokens, x_in, hw)
      if keep:
        saved.append((vjps, cvjp))
    return tokens, shallow, feats, saved

  def _value_and_grad(self, run: _Runner, arch: tuple, fixed, trained, x_u8, teacher, coef,
                      b: int):
    """(loss, aux) and the gradients {collection: tree} of one (micro)batch's loss share."""
    tokens, shallow, feats, saved = self._student_forward(run, arch, fixed, trained, x_u8, True)
    out, tfeats = teacher
    (loss, aux), (ct, ct_feats) = run("loss", self._loss_grad(arch, b), tokens, feats, shallow,
                                      {"params": fixed["params"]}, out, tfeats, coef,
                                      tuple(x_u8.shape[1:3]), collective=True)
    grads: dict = {c: {} for c in trained}
    for i in reversed(range(len(saved))):
      vjps, cvjp = saved[i]
      (ct_feat,) = run("conv_back", self._apply_vjp(), cvjp, ct)
      ct_feat = run("add", self._add(), ct_feat, ct_feats[i])
      blocks = {c: {} for c in trained}
      for js, vjp in reversed(vjps):
        g, ct_feat = run(f"blocks{len(js)}_back", self._apply_vjp(), vjp, ct_feat,
                         collective=True)
        for j, gj in zip(js, g):
          for c in trained:
            blocks[c][f"blocks_{j}"] = gj[c]
      ct = run("add", self._add(), ct, ct_feat)  # the RSTB's skip connection
      for c in trained:
        grads[c][swinir.SwinIR.stage_name(i)] = {BLOCK_PATH[0]: blocks[c]}
    return (loss, aux), grads

  def _run(self, run: _Runner, state, lr_u8, params):
    settings = self.settings
    teacher_params, fixed, trained, arch = _split_variables(params, state.quant)
    arch = tuple(sorted(arch.items()))
    nf = len(self._student(arch).depths)
    b = lr_u8.shape[0]
    mb = (dqc_step.microbatch_size(b, settings.microbatch)
          if settings.microbatch and settings.microbatch < b else b)
    if mb == b:
      parts = [lr_u8]
    else:
      xs = run("split", self._microbatches(b // mb), lr_u8)
      parts = [run("take", self._take(), xs, jnp.int32(k)) for k in range(b // mb)]
    teach = [run("teacher", self._teacher(), teacher_params, x) for x in parts]
    coef = jnp.zeros((nf, 3), jnp.float32)
    if mb < b and settings.loss == "reference":  # the batch-wide coefficients first
      stats = []
      for k, (x, t) in enumerate(zip(parts, teach)):
        run.group = ("stats", k)
        feats = self._student_forward(run, arch, fixed, trained, x, False)[2]
        run.group = None
        stats.append(run("stats", self._stats(), feats, t[1]))
      coef = run("coef", self._coefficients(), *stats, collective=True)
    total = None
    for k, (x, t) in enumerate(zip(parts, teach)):
      run.group = ("grad", k)
      value, grads = self._value_and_grad(run, arch, fixed, trained, x, t, coef, b)
      run.group = None
      total = (value, grads) if total is None else run("add", self._add(), total, (value, grads))
    (loss, aux), grads = total
    return run("update", self._update(), state, loss, aux, _trained_tree(state.quant, grads))

  def __call__(self, state: dqc_step.DQCState, lr_u8: Array, params: Any
               ) -> tuple[dqc_step.DQCState, dict[str, Array]]:
    return self._run(_Runner(False, self.sync), state, lr_u8, params)

  def compile(self, state: Any, lr_u8: Any, params: Any) -> "StagedStep":
    """Compiles every piece for these (abstract or concrete) arguments, without running any,
    and keeps their memory analyses (`need_bytes`); returns the step."""
    abstract = lambda a: (a if isinstance(a, jax.ShapeDtypeStruct) else
                          jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a),
                                               sharding=getattr(a, "sharding", None)))
    runner = _Runner(True, False, self._compiled)
    self._run(runner, *jax.tree_util.tree_map(abstract, (state, lr_u8, params)))
    self.last_memory, self._last_compiles = runner.memory, runner.compiles
    return self

  def compile_counts(self) -> tuple[dict[str, int], dict[str, int]]:
    """From the last `compile`: ({piece: compiles it needed}, {piece: calls in a step})."""
    return dict(self._last_compiles), dict(collections.Counter(n for n, _, _ in self.last_memory))

  def need_bytes(self) -> int:
    """XLA's memory need of a step per device, from the last `compile`: the outputs of the
    pieces of the whole step (the teacher's outputs, the microbatches, the gradients) and of
    its heaviest microbatch (the residuals its pair forwards keep until the backward; an
    over-estimate, since a piece's outputs are freed once consumed), plus the largest piece's
    temporaries and arguments."""
    if not self.last_memory:
      raise RuntimeError("StagedStep.need_bytes: compile the step first")
    per_group: dict[Any, int] = collections.defaultdict(int)
    for _, group, m in self.last_memory:
      per_group[group] += int(m.output_size_in_bytes)
    shared = per_group.pop(None, 0)
    work = max(int(m.temp_size_in_bytes + m.argument_size_in_bytes)
               for _, _, m in self.last_memory)
    return shared + max(per_group.values(), default=0) + work


@functools.lru_cache(maxsize=8)
def staged_train_step(settings: DQCSettings, mesh: Mesh) -> StagedStep:
  """The `StagedStep` of `settings` on `mesh` (one per value: its pieces keep their compiles)."""
  return StagedStep(settings, mesh)
