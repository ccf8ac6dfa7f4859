"""DQC: distillation quantization calibration of the bounds (SPEC section 5).

The FP model is the teacher, the fake-quantized model the student; only the 'quant' collection
(the 768 bounds) is trained, with Adam, on random LR patches of the training set. Two losses:

- `reference`: the released code's loss, verbatim semantics (including its (B, B, L, C)
  broadcast of per-sample-normalised features and its extra 1/numel scalings), computed without
  materialising the broadcast;
- `paper`: Eq. 4-6 of the paper, L_O + lambda * L_F.

`train` runs the loop: one jitted, data-parallel step (batch sharded over all devices along a
'data' mesh axis, bounds and optimizer state replicated), step-indexed batches (step k uses
`sample_batch(seed, step=k)`, so a resumed run sees exactly the batches an uninterrupted one
would), orbax checkpoints with automatic resume, JSON-lines scalars, optional held-out validation,
and a hard stop (`NonFiniteError`) on a non-finite loss or bound that never checkpoints the bad
state.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from twodquant_jax.models.swinir import SwinIR
from twodquant_jax.quant.bounds import tree_to_dict

LOSSES = ("reference", "paper")
SCHEDULES = ("cosine", "constant")
DATA_AXIS = "data"
LOG_FILE = "dqc_log.jsonl"
CKPT_DIR = "dqc_ckpt"

Array = jnp.ndarray
Aux = dict[str, Any]


class NonFiniteError(RuntimeError):
  """The DQC loss or a bound became NaN/inf; the last good checkpoint is kept."""

  def __init__(self, step: int, what: str, checkpoint_step: int | None):
    kept = (f"the last good checkpoint (step {checkpoint_step}) is kept"
            if checkpoint_step is not None else "no checkpoint had been written yet")
    super().__init__(f"DQC stopped at step {step}: {what} became non-finite (NaN/inf); {kept}. "
                     "Lower config.dqc.lr or check the initial bounds (l < u).")
    self.step = step
    self.checkpoint_step = checkpoint_step


# ----------------------------------------------------------------------------------------------
# Losses (pure functions of the student's and the teacher's outputs and features).
# ----------------------------------------------------------------------------------------------


def reference_pixel_loss(out_q: Array, out: Array) -> Array:
  """The released code's l_pix: mean|O_q - O| / numel(O_q) * B."""
  numel = out_q.size
  return jnp.mean(jnp.abs(out_q - out)) / numel * out_q.shape[0]


def _per_sample_norm(f: Array) -> Array:
  return jnp.sqrt(jnp.sum(jnp.square(f.reshape(f.shape[0], -1)), axis=1))


def reference_feature_term_verbatim(f_q: Array, f: Array, weight: float = 5.0) -> Array:
  """The released code's feature term, literally: materialises the (B, B, L, C) broadcast.

  F / n with F (B, L, C) and n (B, 1, 1, 1) gives out[j, i] = F[i] / n[j]. For tests only: it
  needs B times the feature's memory.
  """
  b = f.shape[0]
  n_q = jax.lax.stop_gradient(_per_sample_norm(f_q)).reshape(b, 1, 1, 1)
  n = jax.lax.stop_gradient(_per_sample_norm(f)).reshape(b, 1, 1, 1)
  diff = f_q / n_q - f / n
  return weight * jnp.mean(jnp.square(diff)) / diff.size


def reference_feature_term(f_q: Array, f: Array, weight: float = 5.0) -> Array:
  """`reference_feature_term_verbatim` in O(B L C) memory and without cancellation.

  With a_j = 1/n_q,j, c_j = a_j - 1/n_j, d_i = F_q,i - F_i (norms detached):
  sum_{j,i} ||a_j F_q,i - F_i / n_j||^2 = sum_j a_j^2 sum_i ||d_i||^2
      + 2 sum_j a_j c_j sum_i <d_i, F_i> + sum_j c_j^2 sum_i ||F_i||^2,
  every piece of which is small when the student is close to the teacher (expanding the plain
  square instead would subtract numbers of order B^2 to get one of order 1e-3). The norm gap
  n - n_q is taken as -(2 <d, F> + ||d||^2) / (n + n_q), not as a difference of two rounded
  norms, so it stays accurate when F_q is very close to F.
  """
  b = f.shape[0]
  fq2, f2 = f_q.reshape(b, -1), f.reshape(b, -1)
  d = fq2 - f2
  dd = jnp.sum(d * d, axis=1)
  df = jnp.sum(d * f2, axis=1)
  ff = jnp.sum(f2 * f2, axis=1)
  sg = jax.lax.stop_gradient
  n_q, n = sg(_per_sample_norm(fq2)), sg(_per_sample_norm(f2))
  a = 1.0 / n_q
  c = sg(-(2.0 * df + dd) / (n + n_q)) / (n * n_q)  # (n - n_q) / (n n_q) = a - 1/n
  total = (jnp.sum(a * a) * jnp.sum(dd) + 2.0 * jnp.sum(a * c) * jnp.sum(df)
           + jnp.sum(c * c) * jnp.sum(ff))
  numel = float(b * b * fq2.shape[1])
  return weight * total / numel / numel


def reference_loss(out_q: Array, out: Array, feats_q: Sequence[Array], feats: Sequence[Array],
                   feature_weight: float = 5.0) -> tuple[Array, Aux]:
  """The released code's DQC loss: l_pix + sum of the 4 feature terms (weight 5 there)."""
  l_pix = reference_pixel_loss(out_q, out)
  terms = jnp.stack([reference_feature_term(fq, f, feature_weight)
                     for fq, f in zip(feats_q, feats)])
  l_feature = jnp.sum(terms)
  return l_pix + l_feature, {"l_pix": l_pix, "l_feature_terms": terms, "l_feature": l_feature}


def _safe_norm(x: Array, axis: int) -> Array:
  """L2 norm whose gradient is 0 (not NaN) where the vector is exactly 0."""
  sq = jnp.sum(jnp.square(x), axis=axis)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def paper_loss(out_q: Array, out: Array, feats_q: Sequence[Array], feats: Sequence[Array],
               feature_weight: float = 5.0) -> tuple[Array, Aux]:
  """Paper Eq. 4-6: L_O + lambda * L_F, both averaged over the batch.

  L_O: per-image mean |O - O_q|. L_F: sum over the 4 features of the per-image
  ||F/||F|| - F_q/||F_q|| ||_2 / (C H W). The norms are differentiated (the paper does not
  detach them; the released code's loss does).
  """
  b = out.shape[0]
  l_pix = jnp.mean(jnp.mean(jnp.abs(out - out_q).reshape(b, -1), axis=1))
  terms = []
  for fq, f in zip(feats_q, feats):
    fq2, f2 = fq.reshape(b, -1), f.reshape(b, -1)
    unit = f2 / _safe_norm(f2, 1)[:, None]
    unit_q = fq2 / _safe_norm(fq2, 1)[:, None]
    terms.append(jnp.mean(_safe_norm(unit - unit_q, 1) / f2.shape[1]))
  terms = jnp.stack(terms)
  l_feature = jnp.sum(terms)
  return l_pix + feature_weight * l_feature, {"l_pix": l_pix, "l_feature_terms": terms,
                                              "l_feature": l_feature}


LOSS_FUNCTIONS: dict[str, Callable] = {"reference": reference_loss, "paper": paper_loss}


# ----------------------------------------------------------------------------------------------
# Settings, model loss, optimizer, train step.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DQCSettings:
  """What the jitted train step depends on (hashable: one compiled step per distinct value)."""
  scale: int = 4
  bits: int = 4
  steps: int = 3000
  lr: float = 1e-2
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  schedule: str = "cosine"
  loss: str = "reference"
  feature_weight: float = 5.0
  remat: bool = False
  microbatch: int = 0  # >0: gradients accumulated over microbatches of at most this size
  arch: tuple[tuple[str, Any], ...] = ()  # SwinIR keyword overrides (tests: a tiny network)

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"config.dqc.loss must be one of {LOSSES}, got {self.loss!r}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"config.dqc.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    if self.steps < 1:
      raise ValueError(f"config.dqc.steps must be >= 1, got {self.steps}")
    if self.microbatch < 0:
      raise ValueError(f"config.dqc.microbatch must be >= 0, got {self.microbatch}")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  arch: Mapping[str, Any] | None = None) -> "DQCSettings":
    d = config.dqc
    arch_items = tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                              for k, v in (arch or {}).items()))
    return cls(scale=int(config.scale), bits=int(config.bits), steps=int(d.steps),
               lr=float(d.lr), b1=float(d.b1), b2=float(d.b2), eps=float(d.eps),
               schedule=str(d.schedule), loss=str(d.loss),
               feature_weight=float(d.feature_weight), remat=bool(d.get("remat", False)),
               microbatch=int(d.get("microbatch", 8)), arch=arch_items)

  def model(self, mode: str = "fp") -> SwinIR:
    """The teacher ('fp') or the student ('quant', rematerialised blocks if `remat`)."""
    return SwinIR(upscale=self.scale, mode=mode, bits=self.bits,
                  remat=self.remat and mode == "quant", **dict(self.arch))


def make_schedule(settings: DQCSettings) -> optax.Schedule:
  """Cosine annealing to 0 over `steps` (paper; PyTorch CosineAnnealingLR) or constant (code)."""
  if settings.schedule == "cosine":
    return optax.cosine_decay_schedule(settings.lr, decay_steps=settings.steps, alpha=0.0)
  return optax.constant_schedule(settings.lr)


def make_optimizer(settings: DQCSettings) -> optax.GradientTransformation:
  """Adam as PyTorch defines it (eps outside the sqrt, no weight decay)."""
  return optax.adam(make_schedule(settings), b1=settings.b1, b2=settings.b2, eps=settings.eps)


def distillation_loss(params: Mapping, quant: Mapping, x: Array, settings: DQCSettings
                      ) -> tuple[Array, Aux]:
  """DQC loss of the student (bounds `quant`) against the FP teacher on float images x in [0, 1].

  Differentiate w.r.t. `quant` only; the teacher is under stop_gradient.
  """
  teacher, student = settings.model("fp"), settings.model("quant")
  out, feats = jax.lax.stop_gradient(
      teacher.apply({"params": params}, x, return_features=True))
  out_q, feats_q = student.apply({"params": params, "quant": quant}, x, return_features=True)
  return LOSS_FUNCTIONS[settings.loss](out_q, out, feats_q, feats, settings.feature_weight)


def _pair_stats(f_q: Array, f: Array) -> Array:
  """Per-sample (n_q, n, ||d||^2, <d, F>, ||F||^2) of a feature pair, d = F_q - F: (B, 5)."""
  b = f.shape[0]
  fq2, f2 = f_q.reshape(b, -1), f.reshape(b, -1)
  d = fq2 - f2
  return jnp.stack([_per_sample_norm(fq2), _per_sample_norm(f2), jnp.sum(d * d, axis=1),
                    jnp.sum(d * f2, axis=1), jnp.sum(f2 * f2, axis=1)], axis=1)


def microbatch_size(batch: int, limit: int) -> int:
  """The largest divisor of `batch` that is at most `limit` (microbatches must tile the batch)."""
  return max(d for d in range(1, max(1, min(batch, limit)) + 1) if batch % d == 0)


def microbatched_value_and_grad(params: Mapping, quant: Mapping, x: Array,
                                settings: DQCSettings) -> tuple[tuple[Array, Aux], Mapping]:
  """The DQC loss of the whole batch and its gradient, computed microbatch by microbatch.

  Memory is that of one microbatch. The paper loss is a batch mean of per-image terms, so its
  pieces add up. The reference loss couples the samples only through the detached per-sample
  norms (its (B, B) broadcast): a first, gradient-free pass collects those, then each
  microbatch's share of `reference_feature_term`'s expansion is differentiated with the
  batch-wide coefficients as constants. Values equal the whole-batch loss up to float order.
  """
  b = x.shape[0]
  mb = microbatch_size(b, settings.microbatch)
  # Microbatch m holds samples m, M+m, 2M+m, ... (M microbatches): with the batch sharded in
  # contiguous blocks over devices, every microbatch still spans all devices (data parallel).
  xs = jnp.swapaxes(x.reshape((mb, b // mb) + x.shape[1:]), 0, 1)
  teacher, student = settings.model("fp"), settings.model("quant")
  nf = len(teacher.depths)  # one feature per RSTB

  def forward(q, xm):
    out, feats = jax.lax.stop_gradient(
        teacher.apply({"params": params}, xm, return_features=True))
    out_q, feats_q = student.apply({"params": params, "quant": q}, xm, return_features=True)
    return out_q, out, feats_q, feats

  def add(acc, new):
    return jax.tree_util.tree_map(jnp.add, acc, new)

  zeros = jax.tree_util.tree_map(jnp.zeros_like, quant)
  if settings.loss == "paper":
    def body(carry, xm):
      def loss_fn(q):
        out_q, out, feats_q, feats = forward(q, xm)
        loss, aux = paper_loss(out_q, out, feats_q, feats, settings.feature_weight)
        w = mb / b
        return loss * w, jax.tree_util.tree_map(lambda v: v * w, aux)
      (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(quant)
      return add(carry, ((loss, aux), g)), None
    aux0 = {"l_pix": 0.0, "l_feature_terms": jnp.zeros(nf), "l_feature": 0.0}
    init = ((jnp.zeros(()), jax.tree_util.tree_map(jnp.asarray, aux0)), zeros)
    (value, grads), _ = jax.lax.scan(body, init, xs)
    return value, grads

  def stats(xm):
    out_q, out, feats_q, feats = forward(quant, xm)
    return jnp.stack([_pair_stats(fq, f) for fq, f in zip(feats_q, feats)])  # (nf, mb, 5)

  st = jax.lax.stop_gradient(jax.lax.map(stats, xs))  # (M, nf, mb, 5)
  st = jnp.moveaxis(st, 1, 0).reshape(nf, b, 5)
  n_q, n, dd, df = st[..., 0], st[..., 1], st[..., 2], st[..., 3]
  a = 1.0 / n_q
  c = -(2.0 * df + dd) / (n + n_q) / (n * n_q)
  coef = jnp.stack([jnp.sum(a * a, 1), 2.0 * jnp.sum(a * c, 1), jnp.sum(c * c, 1)], 1)  # (nf, 3)

  def body(carry, xm):
    def loss_fn(q):
      out_q, out, feats_q, feats = forward(q, xm)
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
    (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(quant)
    return add(carry, ((loss, aux), g)), None

  aux0 = {"l_pix": jnp.zeros(()), "l_feature_terms": jnp.zeros(nf), "l_feature": jnp.zeros(())}
  (value, grads), _ = jax.lax.scan(body, ((jnp.zeros(()), aux0), zeros), xs)
  return value, grads


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all (or the given) devices along the batch ('data') axis."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if batch_size < 1 or batch_size % n:
    raise ValueError(f"config.dqc.batch_size ({batch_size}) must be a positive multiple of the "
                     f"number of devices ({n}) for data-parallel DQC")


def _all_finite(tree: Any) -> Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


@functools.lru_cache(maxsize=8)
def make_train_step(settings: DQCSettings, mesh: Mesh) -> Callable:
  """The jitted data-parallel step (params, quant, opt_state, lr_uint8) -> (quant, opt_state, m).

  The uint8 batch is sharded along 'data', everything else is replicated; XLA inserts the
  gradient all-reduce. If the loss or a new bound is non-finite, the returned state is the
  input state (so it can never be saved) and m['finite'] is False.
  """
  tx = make_optimizer(settings)
  repl = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P(DATA_AXIS))

  def step(params, quant, opt_state, lr_u8):
    x = lr_u8.astype(jnp.float32) / 255.0
    if settings.microbatch and settings.microbatch < x.shape[0]:
      (loss, aux), grads = microbatched_value_and_grad(params, quant, x, settings)
    else:
      (loss, aux), grads = jax.value_and_grad(
          lambda q: distillation_loss(params, q, x, settings), has_aux=True)(quant)
    updates, new_opt = tx.update(grads, opt_state, quant)
    new_quant = optax.apply_updates(quant, updates)
    loss_ok = jnp.isfinite(loss)
    ok = loss_ok & _all_finite(new_quant) & _all_finite(new_opt)
    keep = lambda new, old: jnp.where(ok, new, old)
    new_quant = jax.tree_util.tree_map(keep, new_quant, quant)
    new_opt = jax.tree_util.tree_map(keep, new_opt, opt_state)
    metrics = {"loss": loss, "l_pix": aux["l_pix"], "l_feature": aux["l_feature"],
               "loss_finite": loss_ok, "finite": ok}
    return new_quant, new_opt, metrics

  return jax.jit(step, in_shardings=(repl, repl, repl, data), out_shardings=(repl, repl, repl))


# ----------------------------------------------------------------------------------------------
# Checkpoints, log, validation.
# ----------------------------------------------------------------------------------------------


def _fingerprint(tree: Mapping) -> str:
  """sha256 of a tree's leaf paths and float32 bytes (identifies the weights / initial bounds)."""
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
  for path, v in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.asarray(v, np.float32).tobytes())
  return h.hexdigest()


def _run_identity(config: ml_collections.ConfigDict, settings: DQCSettings, params: Mapping,
                  quant0: Mapping) -> dict[str, Any]:
  """What a checkpoint must agree on to be resumed (all but `steps`)."""
  ident = json.loads(json.dumps(dataclasses.asdict(settings)))  # tuples -> lists, as restored
  ident.pop("steps")
  ident.update(seed=int(config.seed), batch_size=int(config.dqc.batch_size),
               lr_size=int(config.calib.lr_size), augment=bool(config.dqc.augment),
               calib_root=str(config.calib.root), params=_fingerprint(params),
               initial_bounds=_fingerprint(quant0))
  return ident


def checkpoint_manager(workdir: str | Path, keep: int = 2, read_only: bool = False
                       ) -> ocp.CheckpointManager:
  """The orbax manager of <workdir>/dqc_ckpt (items 'state' = bounds + Adam state, 'meta').

  A writing manager also removes the temporary folders of saves cut short by a kill.
  """
  if read_only:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True,
                                           cleanup_tmp_directories=True)
  return ocp.CheckpointManager(Path(workdir).resolve() / CKPT_DIR, options=options,
                               item_names=("state", "meta"))


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, like: Mapping,
                       sharding: NamedSharding | None = None) -> tuple[dict, dict]:
  """Restores checkpoint `step` as ({'quant', 'opt_state'} shaped like `like`, meta)."""
  def abstract(x):
    return jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=sharding)

  target = jax.tree_util.tree_map(abstract, like)
  got = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  return got["state"], got["meta"]


def _data_workers(config: ml_collections.ConfigDict) -> int:
  """Threads cutting batches (bicubic LR making is the host's cost); 0 = auto."""
  n = int(config.dqc.get("data_workers", 0))
  return n if n > 0 else max(1, min(8, (os.cpu_count() or 2) - 1))


def _truncate_log(path: Path, last_step: int) -> None:
  """Keeps only the log lines of steps <= last_step (a resumed run rewrites the rest)."""
  if not path.exists():
    return
  kept = []
  for line in path.read_text().splitlines():
    try:
      if json.loads(line).get("step", 0) <= last_step:
        kept.append(line)
    except json.JSONDecodeError:  # a line cut by a kill
      continue
  tmp = path.with_suffix(".tmp")
  tmp.write_text("".join(k + "\n" for k in kept))
  tmp.replace(path)


def _append_log(path: Path, record: Mapping[str, Any]) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record, default=float) + "\n")


def load_validation_images(root: str | Path, scale: int, num: int, crop: int
                           ) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """Up to `num` held-out (name, lr, hr) pairs from HR images in `root` (or `root`/HR).

  HR is center-cropped to `crop` (rounded down to a multiple of 8*scale; 0 = mod-crop only),
  so one compiled forward serves every image; LR is the MATLAB-style bicubic downscale.
  """
  from twodquant_jax.data.bicubic import imresize
  from twodquant_jax.data.images import load_rgb, mod_crop
  from twodquant_jax.data.patches import IMAGE_EXTENSIONS
  root = Path(root)
  folder = root / "HR" if (root / "HR").is_dir() else root
  if not folder.is_dir():
    raise FileNotFoundError(f"config.dqc.val_root: no such folder {folder}")
  files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)[:num]
  if not files:
    raise FileNotFoundError(f"config.dqc.val_root: no images in {folder}")
  out = []
  for p in files:
    hr = mod_crop(load_rgb(p), scale)
    if crop:
      side = (min(crop, *hr.shape[:2]) // (8 * scale)) * 8 * scale
      if side == 0:
        continue
      y, x = (hr.shape[0] - side) // 2, (hr.shape[1] - side) // 2
      hr = hr[y:y + side, x:x + side]
    out.append((p.stem, imresize(hr, 1.0 / scale), hr))
  return out


@functools.lru_cache(maxsize=8)
def _sr_quant(settings: DQCSettings) -> Callable:
  model = settings.model("quant")
  return jax.jit(lambda params, quant, x: model.apply({"params": params, "quant": quant}, x))


def validate_psnr(params: Mapping, quant: Mapping, images: Sequence[tuple[str, np.ndarray,
                                                                          np.ndarray]],
                  settings: DQCSettings) -> float:
  """Mean PSNR (Y, crop border = scale) of the fake-quantized model on held-out images."""
  from twodquant_jax.data.images import to_uint8
  from twodquant_jax.evaluate import flip_pad
  from twodquant_jax.metrics import psnr_y
  scale = settings.scale
  sr_fn = _sr_quant(settings)
  psnrs = []
  for _, lr, hr in images:
    x = flip_pad(lr.astype(np.float32) / 255.0)[None]
    sr = np.asarray(sr_fn(params, quant, x))[0, :hr.shape[0], :hr.shape[1]]
    psnrs.append(psnr_y(to_uint8(sr), hr, crop_border=scale))
  return float(np.mean(psnrs))


# ----------------------------------------------------------------------------------------------
# The training loop.
# ----------------------------------------------------------------------------------------------


def train(params: Mapping, quant: Mapping, *, config: ml_collections.ConfigDict,
          workdir: str | Path, progress: bool = False, mesh: Mesh | None = None,
          arch: Mapping[str, Any] | None = None,
          callback: Callable[[int, dict[str, Any]], None] | None = None,
          ) -> tuple[dict, dict[str, Any]]:
  """Runs DQC from the initial bounds `quant` (DOBI's), resuming from <workdir>/dqc_ckpt.

  Args:
    params: the FP model's 'params'.
    quant: initial 'quant' collection (bounds).
    config: the full run config (`config.dqc.*`, `config.calib.root/lr_size`, `config.scale`,
      `config.bits`, `config.seed`).
    workdir: where dqc_ckpt/ and dqc_log.jsonl go.
    progress: show a tqdm bar.
    mesh: the device mesh (default: all devices on one 'data' axis).
    arch: SwinIR keyword overrides (default: SwinIR-light; tests train a tiny network).
    callback: called as callback(step, scalars) after every completed, finite step (host side,
      one step behind the device).

  Returns:
    (final bounds, info) with info keys steps, steps_run, seconds, steps_per_s,
    first_step_seconds (compile + one step), final_loss, resumed_from, devices, validation.

  Raises:
    NonFiniteError: the loss or a bound became non-finite (the last good checkpoint is kept).
    ValueError: bad settings, or a checkpoint in workdir from a different run.
  """
  from twodquant_jax.data import patches
  settings = DQCSettings.from_config(config, arch)
  cfg = config.dqc
  batch_size, lr_size = int(cfg.batch_size), int(config.calib.lr_size)
  mesh = mesh or data_mesh()
  check_batch_size(batch_size, mesh)
  if lr_size % 8:
    raise ValueError(f"config.calib.lr_size must be a multiple of 8 (the window), got {lr_size}")
  repl = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  log_path = workdir / LOG_FILE
  schedule = make_schedule(settings)
  step_fn = make_train_step(settings, mesh)

  put = lambda tree: jax.device_put(jax.tree_util.tree_map(jnp.asarray, tree), repl)
  params = put(params)
  quant = put(quant)
  opt_state = put(make_optimizer(settings).init(quant))
  identity = _run_identity(config, settings, params, quant)

  manager = checkpoint_manager(workdir, int(cfg.keep_checkpoints))
  start, resumed_from, seconds_before, final_loss = 0, None, 0.0, float("nan")
  latest = manager.latest_step()
  if latest is not None:
    state, meta = restore_checkpoint(manager, latest, {"quant": quant, "opt_state": opt_state},
                                     repl)
    diff = {k: (meta["identity"].get(k), v) for k, v in identity.items()
            if meta["identity"].get(k) != v}
    if diff:
      raise ValueError(f"{manager.directory} holds a checkpoint of a different DQC run "
                       f"(differs in {diff}); delete it or use another workdir")
    if meta.get("steps") != settings.steps:
      logging.warning("DQC: checkpoint was made for %s steps, now %d", meta.get("steps"),
                      settings.steps)
    quant, opt_state = state["quant"], state["opt_state"]
    start, resumed_from = int(latest), int(latest)
    seconds_before = float(meta.get("seconds", 0.0))
    final_loss = float(meta.get("loss", float("nan")))
    logging.info("DQC: resuming from the checkpoint of step %d in %s", latest, manager.directory)
  _truncate_log(log_path, start)

  val_images = []
  if cfg.val_root:
    val_images = load_validation_images(cfg.val_root, settings.scale, int(cfg.val_images),
                                        int(cfg.get("val_crop", 256)))
  validation: list[dict[str, float]] = []

  def save(step: int, seconds: float, loss: float) -> None:
    meta = {"step": step, "steps": settings.steps, "seconds": seconds, "loss": loss,
            "identity": identity, "bounds": tree_to_dict(quant)}
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"quant": quant, "opt_state": opt_state}),
        meta=ocp.args.JsonSave(meta)), force=True)

  last_saved = start if resumed_from is not None else None
  first_step_seconds = None
  t0 = time.perf_counter()
  t_after_first = None
  bar = tqdm(total=settings.steps, initial=start, desc="DQC", disable=not progress,
             dynamic_ncols=True)

  def finish(step: int, metrics: Mapping) -> None:
    """Host side of a completed step: finiteness, log, progress, validation, checkpoint."""
    nonlocal final_loss, last_saved
    m = jax.device_get(metrics)
    if not bool(m["finite"]):
      what = "the loss" if not bool(m["loss_finite"]) else "a bound (or the Adam state)"
      manager.wait_until_finished()
      raise NonFiniteError(step, what, last_saved)
    final_loss = float(m["loss"])
    seconds = seconds_before + time.perf_counter() - t0
    bar.update(1)
    record = None
    if step % int(cfg.log_every) == 0 or step == settings.steps:
      record = {"step": step, "loss": final_loss, "l_pix": float(m["l_pix"]),
                "l_feature": float(m["l_feature"]), "lr": float(schedule(step - 1)),
                "seconds": round(seconds, 3)}
      bar.set_postfix(loss=f"{final_loss:.4g}")
    if val_images and (step % int(cfg.val_every) == 0 or step == settings.steps):
      psnr = validate_psnr(params, quant, val_images, settings)
      validation.append({"step": step, "psnr": psnr})
      record = {**(record or {"step": step}), "val_psnr": psnr}
      logging.info("DQC step %d: held-out PSNR(Y) %.3f dB", step, psnr)
    if record is not None:
      _append_log(log_path, record)
    if callback is not None:
      callback(step, {k: v.item() for k, v in m.items()})
    if step % int(cfg.checkpoint_every) == 0 or step == settings.steps:
      save(step, seconds, final_loss)
      last_saved = step

  stream = None
  try:
    if start < settings.steps:
      source = patches.load_patch_source(config.calib.root, lr_size * settings.scale)
      stream = patches.prefetch_stream(
          source, int(config.seed), start, batch_size, scale=settings.scale, lr_size=lr_size,
          augment=bool(cfg.augment), num_steps=settings.steps - start, buffer=4,
          num_workers=_data_workers(config),
          put=lambda b: jax.device_put(b["lr"], batch_sharding))
    pending = None  # (step, metrics) of the last dispatched step, checked one step later
    for k in range(start, settings.steps):
      batch = next(stream)
      quant_new, opt_new, metrics = step_fn(params, quant, opt_state, batch)
      if pending is not None:
        finish(*pending)  # overlaps with step k running on the device
      quant, opt_state = quant_new, opt_new
      pending = (k + 1, metrics)
      if first_step_seconds is None:
        jax.block_until_ready(metrics)
        first_step_seconds = time.perf_counter() - t0
        t_after_first = time.perf_counter()
      if (k + 1) % int(cfg.checkpoint_every) == 0 or (val_images and (k + 1) % int(
          cfg.val_every) == 0) or k + 1 == settings.steps:
        finish(*pending)  # needs the state of step k + 1 itself
        pending = None
    manager.wait_until_finished()
  finally:
    bar.close()
    if stream is not None:
      stream.close()
    manager.close()

  seconds = time.perf_counter() - t0
  steps_run = settings.steps - start
  timed = steps_run - 1
  rate = (timed / (time.perf_counter() - t_after_first)
          if timed > 0 and t_after_first is not None else float("nan"))
  info = {"steps": settings.steps, "steps_run": steps_run, "seconds": seconds,
          "steps_per_s": rate, "first_step_seconds": first_step_seconds,
          "final_loss": final_loss, "resumed_from": resumed_from,
          "devices": [str(d) for d in mesh.devices.flat], "batch_size": batch_size,
          "loss": settings.loss, "schedule": settings.schedule, "validation": validation}
  if steps_run == 0:
    logging.info("DQC: checkpoint already at step %d of %d; nothing to train", start,
                 settings.steps)
  return jax.device_get(quant), info
