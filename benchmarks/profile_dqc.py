"""Where the DQC step's time goes on this backend: per-op (per XLA fusion / thunk) times.

Runs the jitted batch-4 DQC step (as `dqc_speed.py` builds it) under `jax.profiler.trace`, reads
back the Perfetto trace and groups the XLA op events by a category derived from the compiled
HLO of each fusion (matmul, softmax / exp, fake-quant rounding, transposes / copies, reductions,
other elementwise).

  PYTHONPATH=$PWD python benchmarks/profile_dqc.py --batch 4 --steps 2
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dqc_speed  # noqa: E402  (a sibling script, not a package)
from twodquant_jax import host_runtime
from twodquant_jax.ptq.dqc import step as dqc_step


def _categories(hlo_text: str) -> dict[str, str]:
  """Maps each computation / instruction name of the optimized HLO to a coarse category."""
  comps: dict[str, str] = {}
  cur, body = None, []
  for line in hlo_text.splitlines():
    m = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if m and "=" not in line.split("{")[0]:
      cur, body = m.group(1), []
      continue
    if line.strip() == "}" and cur:
      comps[cur] = "\n".join(body)
      cur = None
      continue
    if cur:
      body.append(line)

  def cat(text: str) -> str:
    if re.search(r"\b(dot|convolution)\(", text):
      return "matmul/conv"
    if "round-nearest-even" in text:
      return "fake-quant"
    if re.search(r"\bexponential\(", text):
      return "softmax/exp"
    if re.search(r"\berf\(|\btanh\(", text):
      return "gelu"
    if re.search(r"\breduce\(", text):
      return "reduce"
    if re.search(r"\b(transpose|copy)\(", text) and not re.search(
        r"\b(add|multiply|subtract|divide|select|compare|maximum|minimum)\(", text):
      return "transpose/copy"
    return "elementwise/other"

  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+\s+(\w[\w\-]*)\((.*)$", line)
    if not m:
      continue
    name, op, rest = m.groups()
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    if op == "fusion" and called and called.group(1) in comps:
      out[name] = cat(comps[called.group(1)])
    elif op in ("dot", "convolution", "custom-call"):
      out[name] = "matmul/conv"
    elif op in ("transpose", "copy"):
      out[name] = "transpose/copy"
    elif op in ("reduce",):
      out[name] = "reduce"
    else:
      out[name] = op
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--lr_size", type=int, default=64)
  ap.add_argument("--bits", type=int, default=2)
  ap.add_argument("--steps", type=int, default=2)
  ap.add_argument("--microbatch", type=int, default=0)
  ap.add_argument("--top", type=int, default=30)
  ap.add_argument("--rev", default="", help="profile the package at this git revision instead")
  ap.add_argument("--out", default="", help="also write the JSON summary here")
  ap.add_argument("--host_malloc", default="auto", choices=host_runtime.POLICIES)
  ap.add_argument("--cpu_devices", type=int, default=1, help="XLA CPU devices (config cpu_devices)")
  args = ap.parse_args()
  host_runtime.apply(host_runtime.HostSettings(args.host_malloc, args.cpu_devices))

  step_mod = dqc_step
  if args.rev:
    import ab_package  # pylint: disable=g-import-not-at-top
    step_mod = ab_package.module(ab_package.load(args.rev), "ptq.dqc.step")
  settings = step_mod.DQCSettings(scale=4, bits=args.bits, steps=100, microbatch=args.microbatch)
  mesh = step_mod.data_mesh()
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(step_mod.DATA_AXIS))
  rng = np.random.default_rng(0)
  lr = rng.integers(0, 256, (args.batch, args.lr_size, args.lr_size, 3), dtype=np.uint8)
  params = dqc_speed._params(settings, 0)
  quant = dqc_speed._minmax_bounds(settings, params, lr[:2].astype(np.float32) / 255.0)
  params = jax.device_put(params, repl)
  state = jax.device_put(step_mod.init_state(settings, quant), repl)
  batch = jax.device_put(lr, data)
  compiled = step_mod.jit_train_step(settings, mesh).lower(state, batch, params).compile()
  cats = _categories(compiled.as_text())
  state, m = compiled(state, batch, params)
  jax.block_until_ready(m)

  tmp = Path(tempfile.mkdtemp(prefix="dqc_prof_"))
  with jax.profiler.trace(str(tmp), create_perfetto_trace=True):
    for _ in range(args.steps):
      state, m = compiled(state, batch, params)
    jax.block_until_ready((state, m))
  trace_file = next(tmp.rglob("*.trace.json.gz"))
  events = json.loads(gzip.open(trace_file).read())
  events = events.get("traceEvents", events) if isinstance(events, dict) else events
  by_name = collections.Counter()
  count = collections.Counter()
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    by_name[e["name"]] += e["dur"] / 1e6 / args.steps
    count[e["name"]] += 1
  known = {n: t for n, t in by_name.items() if n in cats}
  by_cat = collections.Counter()
  for n, t in known.items():
    by_cat[cats[n]] += t
  total = sum(known.values())
  by_prefix = collections.Counter()
  for n, t in known.items():
    by_prefix[f"{cats[n]}: {re.sub(r'[.][0-9]+$', '', n)}"] += t
  summary = {
      "batch": args.batch, "bits": args.bits, "microbatch": args.microbatch,
      "op_seconds_per_step": round(total, 3),
      "by_category_s": {k: round(v, 3) for k, v in by_cat.most_common()},
      "by_kind_s": {k: round(v, 3) for k, v in by_prefix.most_common(args.top)},
      "top_ops_s": [(n, cats[n], round(t, 4), count[n] // args.steps)
                    for n, t in collections.Counter(known).most_common(args.top)],
      "unmatched_top": [(n, round(t, 4)) for n, t in by_name.most_common(12) if n not in cats],
  }
  print(json.dumps(summary, indent=1))
  if args.out:
    Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
  main()
