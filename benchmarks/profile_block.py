"""Per-op profile of ONE Swin block's DQC work (student fwd+bwd w.r.t. the bounds, teacher fwd),
at SwinIR-light sizes: a fast stand-in for the whole step (seconds to compile, not minutes) to
find where time goes and to A/B a change (`--rev`).

  PYTHONPATH=$PWD python benchmarks/profile_block.py --batch 4 --shift 4
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ab_package  # noqa: E402
import profile_dqc  # noqa: E402


def build(pkg, batch: int, shift: int, bits: int):
  swinir = ab_package.module(pkg, "nn.swinir")
  hw = (64, 64)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, hw[0] * hw[1], 60)),
                  jnp.float32)
  mk = lambda mode: swinir.SwinBlock(60, 6, 8, shift, 2.0, mode, bits)
  fp, qm = mk("fp"), mk("quant")
  v = qm.init(jax.random.key(0), x[:1], hw)
  params = v["params"]
  cap = mk("capture").apply({"params": params}, x[:1], hw, mutable=["calib"])[1]["calib"]
  quant = jax.tree_util.tree_map(lambda a: a, v["quant"])
  flat_c = jax.tree_util.tree_leaves_with_path(cap)
  # min/max bounds from the capture
  def bounds_of(path_q):
    key = tuple(p.key for p in path_q[:-1])
    node = cap
    for k_ in key:
      node = node[k_]
    t = node["input"]
    return jnp.stack([jnp.min(t), jnp.max(t)])
  quant = jax.tree_util.tree_map_with_path(lambda p, a: bounds_of(p), quant)
  del flat_c

  def loss(q, x):
    y = jax.lax.stop_gradient(fp.apply({"params": params}, x, hw))
    yq = qm.apply({"params": params, "quant": q}, x, hw)
    return jnp.sum(jnp.square(yq - y))

  fn = jax.jit(jax.value_and_grad(loss))
  return fn, quant, x


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--shift", type=int, default=4)
  ap.add_argument("--bits", type=int, default=2)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--rev", default="", help="A/B against the package at this git revision")
  ap.add_argument("--profile", action="store_true",
                  help="print op time grouped by (category, the JAX op that produced it)")
  ap.add_argument("--top", type=int, default=40)
  args = ap.parse_args()
  from twodquant_jax import host_runtime
  host_runtime.apply(host_runtime.HostSettings())  # as main.py: the default allocator, first thing
  variants = {"new": None}
  if args.rev:
    variants["old"] = ab_package.load(args.rev)
  built = {}
  for k, pkg in variants.items():
    fn, quant, x = build(pkg, args.batch, args.shift, args.bits)
    c = fn.lower(quant, x).compile()
    out = c(quant, x)
    jax.block_until_ready(out)
    built[k] = (c, quant, x, out)
  times = collections.defaultdict(list)
  for _ in range(args.reps):
    for k, (c, quant, x, _) in built.items():
      t = time.perf_counter()
      jax.block_until_ready(c(quant, x))
      times[k].append(time.perf_counter() - t)
  res = {k: round(float(np.median(v)), 4) for k, v in times.items()}
  if "old" in built:
    res["speedup"] = round(res["old"] / res["new"], 3)
    res["loss_equal"] = bool(built["old"][3][0] == built["new"][3][0])
    g_new = np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(built["new"][3][1])])
    g_old = np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(built["old"][3][1])])
    res["grad_rel_l2"] = float(np.linalg.norm(g_new - g_old) / np.linalg.norm(g_old))
  print(json.dumps(res))
  if args.profile:
    c, quant, x, _ = built["new"]
    cats = profile_dqc._categories(c.as_text())
    tmp = Path(tempfile.mkdtemp(prefix="blk_prof_"))
    with jax.profiler.trace(str(tmp), create_perfetto_trace=True):
      for _ in range(2):
        jax.block_until_ready(c(quant, x))
    events = json.loads(gzip.open(next(tmp.rglob("*.trace.json.gz"))).read())
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    by = collections.Counter()
    for e in events:
      if e.get("ph") == "X" and e.get("name") in cats:
        by[(cats[e["name"]], e["name"])] += e["dur"] / 2e6
    meta = {}
    for line in c.as_text().splitlines():
      m = re.match(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s.*op_name="([^"]+)"', line)
      if m:
        meta[m.group(1)] = (m.group(2), m.group(3))
    by_src = collections.Counter()
    for (cat, name), t in by.items():
      src = meta.get(name, ("", "?"))[1]
      src = re.sub(r"^jit\(loss\)/", "", src)
      by_src[f"{cat:14s} {src}"] += t
    print(f"total op time per call: {sum(by.values()):.3f} s")
    for key, t in by_src.most_common(args.top):
      print(f"{t:8.4f} {key}")


if __name__ == "__main__":
  main()
