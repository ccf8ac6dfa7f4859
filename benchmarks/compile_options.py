"""XLA:CPU compiler options against compile time and step time, in one process, cold.

  PYTHONPATH=$PWD:$PWD/benchmarks python benchmarks/compile_options.py \
      [--parts dqc,eval_fp,eval_quant --remat --scan --steps 4 --options=all] [--out=x.json]

The DQC train step (stand-in x4 weights, min/max bounds, 2 bits, batch 4 of 64x64 LR, as
`compile_speed.py`) and the bucket evaluation function (FP and fake-quant, 1x64x64 LR) are
lowered once, then compiled once per option set of `OPTION_SETS`
(`Lowered.compile(compiler_options=...)`), with no persistent compilation cache. Compile wall
and CPU seconds are recorded; DQC steps (and evaluation calls) are then timed alternately over
the option sets on the same state and batch, so their ratios hold on a shared machine. Outputs
are compared with the default options' (bounds after one step; SR images), bit for bit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from compile_speed import _cpu_timed, _load, _setup, _timed, add_args
from twodquant_jax import host_runtime
from twodquant_jax.eval import predict
from twodquant_jax.ptq.dqc import step as dqc_step

# Candidate XLA:CPU option sets (names of jaxlib 0.10's DebugOptions fields).
OPTION_SETS = {
    "default": {},
    "O1": {"xla_backend_optimization_level": 1},
    "O0": {"xla_backend_optimization_level": 0},
    "no_expensive": {"xla_llvm_disable_expensive_passes": True},
    "O1_no_expensive": {"xla_backend_optimization_level": 1,
                        "xla_llvm_disable_expensive_passes": True},
    "split4": {"xla_cpu_parallel_codegen_split_count": 4},
    "fast_compile": {"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_COMPILE"},
}


def _max_diff(a, b) -> float:
  return float(max(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
                   for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))))


def dqc_compare(s: dqc_step.DQCSettings, params, quant, lr: np.ndarray, sets: dict,
                steps: int) -> dict:
  """The DQC step of settings `s` (whole batch at once: microbatch 0 unless `s` says) lowered
  once, compiled under each option set; compile seconds, then `steps` steps timed alternately."""
  mesh = dqc_step.data_mesh()
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(dqc_step.DATA_AXIS))
  dparams, batch = jax.device_put(params, repl), jax.device_put(lr, data)
  state0 = dqc_step.init_state(s, jax.tree_util.tree_map(np.array, quant))
  fresh = lambda: jax.device_put(jax.tree_util.tree_map(jnp.array, state0), repl)
  lowered, lower_s, lower_cpu = _cpu_timed(
      lambda: dqc_step.jit_train_step(s, mesh).lower(fresh(), batch, dparams))
  runs = {}
  for key, opts in sets.items():
    load0 = _load()
    compiled, wall, cpu = _cpu_timed(lambda: lowered.compile(compiler_options=opts or None))
    (state, m), first = _timed(lambda: jax.block_until_ready(compiled(fresh(), batch, dparams)))
    runs[key] = {"compiled": compiled, "state": state, "times": [], "compile_s": wall,
                 "compile_cpu_s": cpu, "first_step_s": first, "load": [load0, _load()],
                 "loss1": float(m["loss"]),
                 "quant1": jax.tree_util.tree_map(np.asarray, state.quant)}
    print(f"compile_options: DQC step compiled with {key}: {wall:.1f} s wall, {cpu:.1f} s CPU",
          file=sys.stderr, flush=True)
  for _ in range(steps):
    for r in runs.values():
      (r["state"], _), t = _timed(
          lambda: jax.block_until_ready(r["compiled"](r["state"], batch, dparams)))
      r["times"].append(t)
  base = runs["default"]
  return {"trace_lower_s": round(lower_s, 2), "trace_lower_cpu_s": round(lower_cpu, 2),
          **{k: {"compile_s": round(r["compile_s"], 2), "compile_cpu_s": round(r["compile_cpu_s"], 2),
                 "compile_cpu_speedup": round(base["compile_cpu_s"] / r["compile_cpu_s"], 2),
                 "first_step_s": round(r["first_step_s"], 3),
                 "median_step_s": round(statistics.median(r["times"]), 4),
                 "step_ratio": round(statistics.median(r["times"])
                                     / statistics.median(base["times"]), 3),
                 "step_times_s": [round(t, 3) for t in r["times"]],
                 "loss1_diff": abs(r["loss1"] - base["loss1"]),
                 "bounds1_max_abs_diff": _max_diff(r["quant1"], base["quant1"]),
                 "load": r["load"]} for k, r in runs.items()}}


def eval_compare(params, quant, mode: str, sets: dict, *, scale: int, bits: int, lr_size: int,
                 arch: tuple = (), calls: int = 5) -> dict:
  """The bucket evaluation function (1 x lr_size^2 LR) lowered once, compiled under each option
  set; compile seconds, then `calls` calls timed alternately, outputs against the default's."""
  variables = {"params": params} if mode == "fp" else {"params": params, "quant": quant}
  x = np.random.default_rng(1).uniform(size=(1, lr_size, lr_size, 3)).astype(np.float32)
  hw = np.array([[lr_size, lr_size]], np.int32)
  fn = predict.bucket_apply(scale, mode, bits, arch).fn
  lowered, lower_s, lower_cpu = _cpu_timed(lambda: fn.lower(variables, x, hw))
  runs = {}
  for key, opts in sets.items():
    exe, wall, cpu = _cpu_timed(lambda: lowered.compile(compiler_options=opts or None))
    runs[key] = {"exe": exe, "out": np.asarray(exe(variables, x, hw)), "times": [],
                 "compile_s": wall, "compile_cpu_s": cpu}
  for _ in range(calls):
    for r in runs.values():
      r["times"].append(_timed(lambda: jax.block_until_ready(r["exe"](variables, x, hw)))[1])
  base = runs["default"]
  return {"trace_lower_s": round(lower_s, 2), "trace_lower_cpu_s": round(lower_cpu, 2),
          **{k: {"compile_s": round(r["compile_s"], 2), "compile_cpu_s": round(r["compile_cpu_s"], 2),
                 "compile_cpu_speedup": round(base["compile_cpu_s"] / r["compile_cpu_s"], 2),
                 "median_call_s": round(statistics.median(r["times"]), 4),
                 "call_ratio": round(statistics.median(r["times"])
                                     / statistics.median(base["times"]), 3),
                 "out_max_abs_diff": float(np.max(np.abs(r["out"] - base["out"])))}
             for k, r in runs.items()}}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_args(ap, steps=4)
  ap.add_argument("--scan", action="store_true", help="scan_blocks (pairs and RSTBs)")
  ap.add_argument("--options", default="all", help="comma-separated OPTION_SETS keys")
  args = ap.parse_args()
  keys = list(OPTION_SETS) if args.options == "all" else ["default"] + [
      k for k in args.options.split(",") if k != "default"]
  sets = {k: OPTION_SETS[k] for k in keys}
  host = host_runtime.apply(host_runtime.HostSettings("auto", 0, dqc_batch=args.batch))
  lr = np.random.default_rng(0).integers(0, 256, (args.batch, args.lr_size, args.lr_size, 3),
                                         dtype=np.uint8)
  params, quant = _setup(args.scale, args.bits, lr)
  arch = (("scan_blocks", args.scan),)
  result = {"device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
            "host": host, "batch": args.batch, "lr_size": args.lr_size, "remat": args.remat,
            "scan": args.scan, "options": sets, "load_start": _load()}
  for part in args.parts.split(","):
    if part == "dqc":
      s = dqc_step.DQCSettings(scale=args.scale, bits=args.bits, steps=args.steps + 2,
                               remat="full" if args.remat else "off", arch=arch)
      result[part] = dqc_compare(s, params, quant, lr, sets, args.steps)
    else:
      result[part] = eval_compare(params, quant, part[len("eval_"):], sets, scale=args.scale,
                                  bits=args.bits, lr_size=args.lr_size, arch=arch)
    print(json.dumps({part: result[part]}), flush=True)
  result["load_end"] = _load()
  text = json.dumps(result, indent=1)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
