"""Compile time of the scanned SwinIR against the unrolled one, in one process, cold.

  PYTHONPATH=$PWD:$PWD/benchmarks python benchmarks/compile_speed.py \
      [--batch 4 --lr_size 64 --steps 4 --parts dqc,eval_fp,eval_quant] [--out=compile_speed.json]

Three variants of `SwinIR`: 'unrolled' (scan_blocks=False), 'pairs' (each RSTB's block pairs in
a lax.scan) and 'layers' (pairs and the 4 RSTBs scanned, the default). For each it compiles the
DQC train step as `dqc_speed.py` builds it (stand-in weights ../shared/reference/standin_x4.pth,
min/max bounds, 2 bits, batch 4 of 64x64 LR) and the evaluation function
`eval.predict.jitted_apply` for FP and fake-quant (1x64x64 LR). No persistent compilation cache
is used (every compile is cold). Trace+lower and compile are timed apart, in wall and in this
process's CPU seconds (steadier on a shared machine); the DQC steps are then timed alternately
on the same state and batch, so their ratios hold on a loaded machine; the load average is
recorded around each compile. Bounds after one step and evaluation outputs are compared too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from shared_paths import shared_dir
from twodquant_jax import host_runtime
from twodquant_jax.eval import predict
from twodquant_jax.formats import convert
from twodquant_jax.nn import names as qnames
from twodquant_jax.ptq.dqc import step as dqc_step

VARIANTS = {"unrolled": (("scan_blocks", False),),
            "pairs": (("scan_blocks", True), ("scan_layers", False)),  # block pairs scanned
            "layers": (("scan_blocks", True),)}  # block pairs and RSTBs scanned (the default)


def _load() -> list[float]:
  return [round(v, 2) for v in os.getloadavg()]


def _timed(fn):
  """(fn(), wall seconds)."""
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def _cpu_timed(fn):
  """(fn(), wall seconds, this process's CPU seconds): compiling is mostly one thread, so its
  CPU seconds move less than its wall seconds when other processes share the cores."""
  c0 = time.process_time()
  out, wall = _timed(fn)
  return out, wall, time.process_time() - c0


def _setup(scale: int, bits: int, lr: np.ndarray) -> tuple[dict, dict]:
  """(stand-in params, min/max bounds of every quantizer input on two images of `lr`)."""
  settings = dqc_step.DQCSettings(scale=scale, bits=bits)
  shapes = jax.eval_shape(dqc_step.model_for(settings, "fp").init, jax.random.key(0),
                          jnp.zeros((1, 8, 8, 3)))["params"]
  path = shared_dir() / "reference" / f"standin_x{scale}.pth"
  params = convert.load_checkpoint(path, scale, shapes)[0]
  capture = jax.jit(lambda p, x: dqc_step.model_for(settings, "capture").apply(
      {"params": p}, x, mutable=["calib"])[1]["calib"])
  seen = qnames.leaves_by_name(capture(params, lr[:2].astype(np.float32) / 255.0), "input")
  quant = qnames.dict_to_tree({k: [float(jnp.min(v)), float(jnp.max(v))]
                               for k, v in seen.items()})
  return params, jax.tree_util.tree_map(jnp.asarray, quant)


def _dqc(args, params, quant, lr) -> dict:
  """Compile seconds of each variant's DQC step, then alternate steady steps."""
  mesh = dqc_step.data_mesh()
  dqc_step.check_batch_size(args.batch, mesh)
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(dqc_step.DATA_AXIS))
  dparams, batch = jax.device_put(params, repl), jax.device_put(lr, data)
  runs = {}
  for key, scan in VARIANTS.items():
    s = dqc_step.DQCSettings(scale=args.scale, bits=args.bits, steps=args.steps + 2,
                             remat="full" if args.remat else "off", arch=scan)
    state = jax.device_put(dqc_step.init_state(s, jax.tree_util.tree_map(np.array, quant)), repl)
    load0 = _load()
    lowered, lower_s, lower_cpu = _cpu_timed(
        lambda: dqc_step.jit_train_step(s, mesh).lower(state, batch, dparams))
    compiled, seconds, cpu = _cpu_timed(lowered.compile)
    (state, m), first = _timed(lambda: jax.block_until_ready(compiled(state, batch, dparams)))
    runs[key] = {"compiled": compiled, "state": state, "times": [], "compile_s": seconds,
                 "compile_cpu_s": cpu, "trace_lower_s": lower_s, "trace_lower_cpu_s": lower_cpu,
                 "first_step_s": first, "load_before_after": [load0, _load()],
                 "first_loss": float(m["loss"]),
                 "first_quant": jax.tree_util.tree_map(np.asarray, state.quant)}
  for _ in range(args.steps):
    for r in runs.values():
      (r["state"], _), t = _timed(
          lambda: jax.block_until_ready(r["compiled"](r["state"], batch, dparams)))
      r["times"].append(t)
  out = {k: {"trace_lower_s": round(r["trace_lower_s"], 2),
             "trace_lower_cpu_s": round(r["trace_lower_cpu_s"], 2),
             "compile_s": round(r["compile_s"], 2), "compile_cpu_s": round(r["compile_cpu_s"], 2),
             "first_step_s": round(r["first_step_s"], 3),
             "median_s_per_step": round(statistics.median(r["times"]), 4),
             "step_times_s": [round(t, 3) for t in r["times"]], "first_loss": r["first_loss"],
             "load_before_after_compile": r["load_before_after"]} for k, r in runs.items()}
  base = runs["unrolled"]
  for key, r in runs.items():
    if key == "unrolled":
      continue
    diffs = [np.max(np.abs(x - y) / np.maximum(np.abs(x), 1e-12))
             for x, y in zip(jax.tree_util.tree_leaves(base["first_quant"]),
                             jax.tree_util.tree_leaves(r["first_quant"]))]
    total = lambda r: r["compile_s"] + r["trace_lower_s"]
    total_cpu = lambda r: r["compile_cpu_s"] + r["trace_lower_cpu_s"]
    out[key].update({
        "lower_compile_speedup_wall": round(total(base) / total(r), 2),
        "lower_compile_speedup_cpu": round(total_cpu(base) / total_cpu(r), 2),
        "step_time_ratio_over_unrolled": round(
            statistics.median(r["times"]) / statistics.median(base["times"]), 3),
        "bounds_after_step1_max_rel_diff": float(max(diffs))})
  return out


def _eval(args, params, quant, mode: str) -> dict:
  """Compile seconds of `jitted_apply` (1 x lr_size^2 LR) per variant, and the output gap."""
  variables = {"params": params} if mode == "fp" else {"params": params, "quant": quant}
  x = np.random.default_rng(1).uniform(size=(1, args.lr_size, args.lr_size, 3)).astype(np.float32)
  out, res = {}, {}
  for key, scan in VARIANTS.items():
    fn = predict.jitted_apply(args.scale, mode, args.bits, scan)
    load0 = _load()
    exe, seconds, cpu = _cpu_timed(lambda: fn.lower(variables, x).compile())
    res[key] = np.asarray(exe(variables, x))
    calls = [_timed(lambda: jax.block_until_ready(exe(variables, x)))[1] for _ in range(3)]
    out[key] = {"lower_compile_s": round(seconds, 2), "lower_compile_cpu_s": round(cpu, 2),
                "median_call_s": round(statistics.median(calls), 4),
                "load_before_after": [load0, _load()]}
  for key in VARIANTS:
    if key != "unrolled":
      out[key]["speedup_wall"] = round(out["unrolled"]["lower_compile_s"] /
                                       out[key]["lower_compile_s"], 2)
      out[key]["speedup_cpu"] = round(out["unrolled"]["lower_compile_cpu_s"] /
                                      out[key]["lower_compile_cpu_s"], 2)
      out[key]["output_max_abs_diff"] = float(np.max(np.abs(res["unrolled"] - res[key])))
  return out


def add_args(ap: argparse.ArgumentParser, steps: int) -> None:
  """The arguments this script shares with compile_options.py."""
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--lr_size", type=int, default=64)
  ap.add_argument("--scale", type=int, default=4)
  ap.add_argument("--bits", type=int, default=2)
  ap.add_argument("--steps", type=int, default=steps)
  ap.add_argument("--remat", action="store_true", help="config dqc.remat=full (else off)")
  ap.add_argument("--parts", default="dqc,eval_fp,eval_quant")
  ap.add_argument("--out", default="")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_args(ap, steps=5)
  args = ap.parse_args()
  host = host_runtime.apply(host_runtime.HostSettings("auto", 0, dqc_batch=args.batch))
  lr = np.random.default_rng(0).integers(0, 256, (args.batch, args.lr_size, args.lr_size, 3),
                                         dtype=np.uint8)
  params, quant = _setup(args.scale, args.bits, lr)
  result = {"device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
            "cpu_count": os.cpu_count(), "host": host, "batch": args.batch,
            "lr_size": args.lr_size, "scale": args.scale, "bits": args.bits,
            "remat": args.remat, "load_start": _load()}
  for part in args.parts.split(","):
    if part == "dqc":
      result["dqc"] = _dqc(args, params, quant, lr)
    elif part.startswith("eval_"):
      result[part] = _eval(args, params, quant, part[len("eval_"):])
    else:
      raise SystemExit(f"--parts: unknown part {part!r} (dqc, eval_fp, eval_quant)")
    print(json.dumps({part: result[part]}), flush=True)
  result["load_end"] = _load()
  text = json.dumps(result, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
