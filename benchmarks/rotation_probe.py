"""Per-layer 2-bit error with and without rotation and smoothing, and what the quantizers see.

On the stand-in x4 weights and 8 calibration patches, for every Swin block and each of
  qkv, proj, fc1, fc2   the linear alone: x W against Q(x) Q(W) (q, k and v pooled for qkv),
  q.k                   the attention logits q k^T against Q(q) Q(k)^T,
  A.v                   the attention output A v against A Q(v),
with per-tensor bounds of each quantizer from the MSE-best clipping (the DOBI search: symmetric,
one-sided for the post-GELU fc2 input, as the calibration does), it reports the signal-to-error
ratio (dB, higher is better; bias left out: it adds no error). Variants: the plain student,
each rotation kind alone (measured on the rows whose tensors it changes), smoothed (alpha 0.5),
and smoothed then rotated with DEFAULT_KINDS. It also reports, per quantized tensor, the median
kurtosis and max|x - mean| / std. DEFAULT_KINDS of ptq/rotation.py is picked from the
'rotated - plain' column (the kinds whose rows gain in sum).

  PYTHONPATH=$PWD:$PWD/benchmarks python benchmarks/rotation_probe.py \
      --out=docs/measured/rotation.json --md=docs/measured/rotation.md
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from shared_paths import shared_dir
from twodquant_jax import files
from twodquant_jax.data import patches
from twodquant_jax.formats import convert
from twodquant_jax.nn.quantizer import CALIB, fake_quant
from twodquant_jax.nn.student import Student, plain
from twodquant_jax.nn.swinir import SwinIR, variable_shapes
from twodquant_jax.ptq import rotation, search, smooth

flags.DEFINE_integer("patches", 8, "Calibration patches (64x64 LR).")
flags.DEFINE_integer("bits", 2, "Bits of every quantizer.")
flags.DEFINE_integer("seed", 0, "Calibration batch seed and rotation key.")
flags.DEFINE_integer("search_sample", 1 << 18, "Elements a bound search sees (plus min, max).")
flags.DEFINE_string("out", "docs/measured/rotation.json", "JSON output.")
flags.DEFINE_string("md", "docs/measured/rotation.md", "Markdown output.")
FLAGS = flags.FLAGS

ROWS = ("qkv", "proj", "fc1", "fc2", "q.k", "A.v")
AFFECTS = {"qkv": ("qkv",), "fc1": ("fc1",), "fc2": ("fc2",), "attn_qk": ("qkv", "q.k"),
           "attn_v": ("qkv", "proj", "A.v")}  # rows whose tensors a kind changes
TENSORS_OF = {"qkv": ("x_qkv", "w_qkv"), "fc1": ("x_fc1", "w_fc1"), "fc2": ("x_fc2", "w_fc2"),
              "attn_qk": ("q", "k", "w_qkv"), "attn_v": ("v", "x_proj", "w_qkv", "w_proj")}
STAT_NAMES = ("x_qkv", "x_proj", "x_fc1", "x_fc2", "q", "k", "v",
              "w_qkv", "w_proj", "w_fc1", "w_fc2")


def bounds(x: np.ndarray, bits: int, one_sided: bool, rng: np.random.Generator) -> jnp.ndarray:
  """MSE-best per-tensor bounds (the DOBI search) on a sample of x that keeps its min and max."""
  flat = np.asarray(x, np.float32).reshape(-1)
  if flat.size > FLAGS.search_sample:
    flat = np.concatenate([rng.choice(flat, FLAGS.search_sample, replace=False),
                           [flat.min(), flat.max()]])
  return search.dobi_bounds(jnp.asarray(flat), bits,
                            direction="one_sided" if one_sided else "symmetric")


def quantized(x, bits, rng, one_sided=False):
  b = bounds(x, bits, one_sided, rng)
  return fake_quant(jnp.asarray(x), b[0], b[1], bits)


def sqnr(ref: jnp.ndarray, got: jnp.ndarray) -> float:
  ref, got = jnp.asarray(ref, jnp.float32), jnp.asarray(got, jnp.float32)
  return float(10 * jnp.log10(jnp.sum(ref ** 2) / jnp.sum((ref - got) ** 2)))


@jax.jit
def _moments(x):
  x = x.reshape(-1)
  d = x - jnp.mean(x)
  var = jnp.mean(d * d)
  return jnp.mean((d * d) ** 2) / var ** 2, jnp.max(jnp.abs(d)) / jnp.sqrt(var)


def stats(x) -> tuple[float, float]:
  """(kurtosis, max|x - mean| / std) of the whole tensor."""
  k, m = _moments(jnp.asarray(x, jnp.float32))
  return float(k), float(m)


def captured_blocks(student: Student, lr: np.ndarray):
  """Yields each Swin block's captured tensors (the 'calib' subtree), RSTB by RSTB."""
  model = student.module(4, "capture")
  variables = student.variables()
  shallow, tokens = jax.jit(lambda v, x: model.apply(v, x, method=SwinIR.embed))(
      variables, smooth.as_unit(lr))
  hw = tuple(shallow.shape[1:3])
  stage = model.stage(0)

  @jax.jit
  def run(v, tokens):
    (out, _), state = stage.apply(v, tokens, hw, mutable=[CALIB])
    return out, state[CALIB]

  for i in range(len(model.depths)):
    name = model.stage_name(i)
    tokens, calib = run({c: t[name] for c, t in variables.items()}, tokens)
    for blk in sorted(calib["residual_group"], key=lambda k: int(k[7:])):
      yield calib["residual_group"][blk]
    del calib


def measure_block(c: dict, bits: int, rng, rows=ROWS) -> tuple[dict, dict]:
  """(SQNR per row, stats per quantized tensor) of one block's captured tensors, for `rows`
  and the tensors they quantize."""
  inp = lambda *p: np.asarray(_at(c, p + ("input",)))
  q_of = lambda x, one_sided=False: quantized(x, bits, rng, one_sided)
  err, tensors = {}, {}
  if "qkv" in rows:
    x = inp("attn", "qkv", "q", "act_quantizer")
    ws = [inp("attn", "qkv", part, "weight_quantizer") for part in "qkv"]
    xq = q_of(x)
    err["qkv"] = sqnr(jnp.stack([jnp.asarray(x) @ w for w in ws]),
                      jnp.stack([xq @ q_of(w) for w in ws]))
    tensors.update(x_qkv=x, w_qkv=np.concatenate(ws, 1))
  for row, path, one_sided in (("proj", ("attn", "proj"), False), ("fc1", ("mlp", "fc1"), False),
                               ("fc2", ("mlp", "fc2"), True)):
    if row in rows:
      x, w = inp(*path, "act_quantizer"), inp(*path, "weight_quantizer")
      err[row] = sqnr(jnp.asarray(x) @ w, q_of(x, one_sided) @ q_of(w))
      tensors.update({f"x_{row}": x, f"w_{row}": w})
  if "q.k" in rows:
    q, k = inp("attn", "mymodule_q"), inp("attn", "mymodule_k")
    err["q.k"] = sqnr(jnp.asarray(q) @ jnp.asarray(k).swapaxes(-1, -2),
                      q_of(q) @ q_of(k).swapaxes(-1, -2))
    tensors.update(q=q, k=k)
  if "A.v" in rows:
    v, att = inp("attn", "mymodule_v"), jnp.asarray(inp("attn", "mymodule_a"))
    err["A.v"] = sqnr(att @ jnp.asarray(v), att @ q_of(v))
    tensors.update(v=v)
  return err, {n: stats(t) for n, t in tensors.items()}


def _at(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def main(_):
  t0 = time.perf_counter()
  ref_dir = shared_dir()
  params, _ = convert.load_checkpoint(ref_dir / "reference" / "standin_x4.pth", 4,
                                      variable_shapes(4)["params"])
  source = patches.load_patch_source(ref_dir / "data" / "calib", 64 * 4)
  lr = patches.calibration_batch(source, FLAGS.seed, scale=4, batch_size=FLAGS.patches)["lr"]
  key = jax.random.key(FLAGS.seed)
  base = plain(params)
  smoothed = smooth.smooth(base, lr, 4, FLAGS.bits)
  # Each kind alone (its rows only), so a row shows its own kind and no other's weight folds.
  variants = {"plain": (base, ROWS), "smoothed": (smoothed, ROWS)}
  for kind in rotation.KINDS:
    variants[f"rotated {kind}"] = (rotation.rotate(base, key, (kind,)), AFFECTS[kind])
  variants["smoothed+rotated"] = (rotation.rotate(smoothed, key, rotation.DEFAULT_KINDS), ROWS)
  result = {"bits": FLAGS.bits, "patches": FLAGS.patches, "seed": FLAGS.seed,
            "search_sample": FLAGS.search_sample, "variants": {}}
  for name, (student, rows) in variants.items():
    rng = np.random.default_rng(FLAGS.seed)
    errs, sts = [], []
    for c in captured_blocks(student, lr):
      e, s = measure_block(c, FLAGS.bits, rng, rows)
      errs.append(e)
      sts.append(s)
    result["variants"][name] = {
        "sqnr_db_mean": {r: float(np.mean([e[r] for e in errs])) for r in rows},
        "sqnr_db_per_block": {r: [e[r] for e in errs] for r in rows},
        "kurtosis_median": {n: float(np.median([s[n][0] for s in sts])) for n in sts[0]},
        "max_over_std_median": {n: float(np.median([s[n][1] for s in sts])) for n in sts[0]},
    }
    print(f"{name}: {result['variants'][name]['sqnr_db_mean']} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
  plain_db = result["variants"]["plain"]["sqnr_db_mean"]
  gain = {k: {r: result["variants"][f"rotated {k}"]["sqnr_db_mean"][r] - plain_db[r]
              for r in AFFECTS[k]} for k in rotation.KINDS}
  result["rotation_gain_db"] = gain
  result["kinds_that_pay"] = [k for k in rotation.KINDS if sum(gain[k].values()) > 0]
  result["default_kinds"] = list(rotation.DEFAULT_KINDS)
  result["seconds"] = time.perf_counter() - t0
  files.write_json(Path(FLAGS.out), result)
  Path(FLAGS.md).write_text(markdown(result))
  print(markdown(result))


def markdown(r: dict) -> str:
  v = r["variants"]
  plain_db, smooth_db = v["plain"]["sqnr_db_mean"], v["smoothed"]["sqnr_db_mean"]
  lines = [f"# Rotation and smoothing: per-layer {r['bits']}-bit error on the stand-in", "",
           "Command (2-core CPU, shared with other jobs):", "",
           "    PYTHONPATH=$PWD:$PWD/benchmarks python benchmarks/rotation_probe.py \\",
           "        --out=docs/measured/rotation.json --md=docs/measured/rotation.md", "",
           f"`standin_x4.pth`, {r['patches']} calibration patches (64x64 LR, seed {r['seed']}), "
           f"every quantizer at {r['bits']} bits with per-tensor MSE-best bounds (the DOBI search, "
           f"one-sided for the fc2 input, on {r['search_sample']} sampled elements plus min and "
           "max). Each linear alone (q, k, v pooled for qkv), the attention logits q k^T with q "
           "and k quantized (q.k), and A v with v quantized (A.v): signal-to-error ratio of the "
           "output in dB (higher is better), mean over the 24 blocks. Each rotation kind is "
           "applied alone and measured on the rows it changes; smoothing is SmoothQuant with "
           f"alpha 0.5 (no smoothing of fc2: GELU). Took {r['seconds']:.0f} s.", "",
           "| layer | plain | kind | rotated | rotated - plain | smoothed | smoothed - plain "
           "| smoothed + rotated (default kinds) | - plain |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
  both = v["smoothed+rotated"]["sqnr_db_mean"]
  for row in ROWS:
    for kind in rotation.KINDS:
      if row not in AFFECTS[kind]:
        continue
      rot = v[f"rotated {kind}"]["sqnr_db_mean"][row]
      lines.append(f"| {row} | {plain_db[row]:.2f} | {kind} | {rot:.2f} | "
                   f"{rot - plain_db[row]:+.2f} | {smooth_db[row]:.2f} | "
                   f"{smooth_db[row] - plain_db[row]:+.2f} | {both[row]:.2f} | "
                   f"{both[row] - plain_db[row]:+.2f} |")
  lines += ["", "Net gain of each kind over the rows it changes (dB): " + ", ".join(
      f"{k} {sum(g.values()):+.2f}" for k, g in r["rotation_gain_db"].items()) + ".",
            f"Kinds that pay: {', '.join(r['kinds_that_pay']) or 'none'} "
            f"(DEFAULT_KINDS of ptq/rotation.py: {', '.join(r['default_kinds'])}).", "",
            "Per quantized tensor, the median over the 24 blocks of kurtosis / max|x - mean| "
            "over std (x_: linear inputs, q k v: attention operands, w_: weights); a rotated "
            "column shows the tensors its kind changes:", "",
            "| tensor | plain | smoothed | smoothed + rotated | rotated (kind) |",
            "|---|---:|---:|---:|---:|"]
  fmt = lambda n, s: f"{v[n]['kurtosis_median'][s]:.2f} / {v[n]['max_over_std_median'][s]:.2f}"
  for s in STAT_NAMES:
    rot = [f"{fmt(f'rotated {k}', s)} ({k})" for k in rotation.KINDS
           if s in TENSORS_OF[k]]
    lines.append(f"| {s} | {fmt('plain', s)} | {fmt('smoothed', s)} | "
                 f"{fmt('smoothed+rotated', s)} | {'; '.join(rot)} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  app.run(main)
