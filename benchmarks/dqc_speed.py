"""Speed of the DQC train step (SwinIR-light student + FP teacher, Adam on the 768 bounds).

Reports the compile time of the jitted data-parallel step, then steps/s over `--steps` steps on
a fixed device-resident batch (the step alone), and the host's batch-making rate (PatchSource
crops + bicubic LR), which bounds the real loop's speed when it is slower than the step.

  python benchmarks/dqc_speed.py                      # batch 32, 64x64 LR, x4, 2 bits
  python benchmarks/dqc_speed.py --batch 4 --steps 5  # a CPU-sized run
  python benchmarks/dqc_speed.py --batch 4 --steps 4 --compare HEAD~1  # A/B in one process
  python benchmarks/dqc_speed.py --batch 4 --steps 6 --compare_remat off  # remat auto vs off, A/B
  python benchmarks/dqc_speed.py --batch 4 --steps 6 --compare_staged  # staged vs one program, A/B

With `--compare REV`, the step of the package at git revision REV (see `ab_package.py`) is
compiled too (`--compare_remat MODE`: this package's step with remat MODE), and the two are
timed alternately on the same state and batch, so the ratio holds on a loaded machine; it also
reports whether their first-step losses are bit-identical, and each step's CPU seconds (all
threads), steadier than wall time on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from twodquant_jax import host_runtime
from twodquant_jax.settings import REMAT_SETTINGS
from twodquant_jax.formats import convert
from shared_paths import shared_dir
from twodquant_jax.nn import names as qnames
from twodquant_jax.ptq.dqc import loss as dqc_loss
from twodquant_jax.ptq.dqc import memory as dqc_memory
from twodquant_jax.ptq.dqc import step as dqc_step


def _params(settings: dqc_step.DQCSettings, seed: int) -> dict:
  """The reference random-weight checkpoint if present, else seeded random weights."""
  model = dqc_step.model_for(settings, "fp")
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  try:
    path = shared_dir() / "reference" / f"swinir_light_x{settings.scale}_random.pth"
    if path.is_file():
      return convert.load_checkpoint(path, settings.scale, shapes)[0]
  except FileNotFoundError:
    pass
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def _minmax_bounds(settings: dqc_step.DQCSettings, params: dict, x: np.ndarray) -> dict:
  """Min/max bounds of every quantizer input on `x` (realistic ranges for the timing)."""
  capture = jax.jit(lambda p, x: dqc_step.model_for(settings, "capture").apply(
      {"params": p}, x, mutable=["calib"])[1]["calib"])
  seen = qnames.leaves_by_name(capture(params, x), "input")
  return qnames.dict_to_tree({k: [float(jnp.min(v)), float(jnp.max(v))]
                               for k, v in seen.items()})


def _memory(compiled, before: dict, compiled_rss: dict, after: dict, mesh, rounds: int,
            remat: str) -> dict:
  """Resident sizes around the step (GB) and what ptq/dqc/memory.py would plan for it."""
  gb = lambda b: round(b / 1e9, 3)
  staged = hasattr(compiled, "need_bytes")  # the pieces' estimate; no single analysis
  need = compiled.need_bytes() if staged else dqc_memory.compiled_bytes(compiled)
  m = None if staged else compiled.memory_analysis()
  local = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
  budget = dqc_memory.host_budget(local, resident=before["rss"], remat=remat)
  return {"rss_before_gb": gb(before["rss"]), "peak_before_gb": gb(before["peak"]),
          "rss_compiled_gb": gb(compiled_rss["rss"]), "peak_compiled_gb": gb(compiled_rss["peak"]),
          "rss_after_gb": gb(after["rss"]), "peak_gb": gb(after["peak"]),
          **({} if m is None else {"xla_temp_gb": gb(m.temp_size_in_bytes),
                                   "xla_args_gb": gb(m.argument_size_in_bytes),
                                   "xla_out_gb": gb(m.output_size_in_bytes)}),
          "xla_need_per_device_gb": gb(need),
          "devices": local, "planned_gb": gb(budget.planned(need, rounds)),
          "growth_over_xla_need": round((after["peak"] - before["rss"]) / (need * local), 3)}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--lr_size", type=int, default=64)
  ap.add_argument("--scale", type=int, default=4)
  ap.add_argument("--bits", type=int, default=2)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--loss", default="reference", choices=dqc_loss.LOSSES)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--microbatch", type=int, default=0,
                  help="accumulate gradients over microbatches of this size (config dqc.microbatch)")
  ap.add_argument("--remat", default="auto", choices=REMAT_SETTINGS,
                  help="what the Swin blocks keep for the backward pass (config dqc.remat)")
  ap.add_argument("--compare_remat", default="", choices=("",) + REMAT_SETTINGS,
                  help="also time the step with this remat setting, alternately (A/B)")
  ap.add_argument("--staged", default=True, action=argparse.BooleanOptionalAction,
                  help="the step as separately compiled pieces (config dqc.staged)")
  ap.add_argument("--compare_staged", action="store_true",
                  help="also time the other choice of --staged, alternately (A/B)")
  ap.add_argument("--compare", default="",
                  help="git revision whose step is timed alternately with this one (A/B)")
  ap.add_argument("--data_batches", type=int, default=2,
                  help="batches cut from ../shared/data/calib to time the host side (0: skip)")
  ap.add_argument("--host_malloc", default="auto", choices=host_runtime.POLICIES,
                  help="host malloc policy, as config host_malloc (twodquant_jax/host_runtime.py)")
  ap.add_argument("--cpu_devices", default="auto",
                  help="XLA CPU devices, as config cpu_devices ('auto': per usable core, "
                       "dividing the batch)")
  args = ap.parse_args()
  host = host_runtime.apply(host_runtime.HostSettings(
      args.host_malloc, 0 if args.cpu_devices == "auto" else int(args.cpu_devices),
      dqc_batch=args.batch))

  kw = dict(scale=args.scale, bits=args.bits, steps=max(args.steps, 1) + 1, loss=args.loss,
            remat=args.remat, microbatch=args.microbatch)
  settings = dqc_step.DQCSettings(**kw)
  rng = np.random.default_rng(args.seed)
  lr = rng.integers(0, 256, (args.batch, args.lr_size, args.lr_size, 3), dtype=np.uint8)
  params = _params(settings, args.seed)
  quant = _minmax_bounds(settings, params, lr[:2].astype(np.float32) / 255.0)
  variants = {"new": (dqc_step, {**kw, "staged": args.staged})}
  if args.compare:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import ab_package  # pylint: disable=g-import-not-at-top
    variants["old"] = (ab_package.module(ab_package.load(args.compare), "ptq.dqc.step"), kw)
  elif args.compare_remat:
    variants["old"] = (dqc_step, {**kw, "remat": args.compare_remat, "staged": args.staged})
  elif args.compare_staged:
    variants["old"] = (dqc_step, {**kw, "staged": not args.staged})
  runs = {}
  before = host_runtime.resident_bytes() or {"rss": 0, "peak": 0}
  for key, (mod, kw_) in variants.items():
    s_ = mod.DQCSettings(**kw_)
    mesh = mod.data_mesh()
    mod.check_batch_size(args.batch, mesh)
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(mod.DATA_AXIS))
    dparams = jax.device_put(params, repl)
    own = jax.tree_util.tree_map(np.array, quant)  # private copies: the step donates its state
    state = jax.device_put(mod.init_state(s_, own), repl)
    batch = jax.device_put(lr, data)
    t0, c0 = time.perf_counter(), time.process_time()
    if mod is dqc_step:  # this package: the step the loop would run
      compiled = dqc_memory.compile_step(dqc_memory.train_step(s_, mesh), state, batch, dparams)
    else:
      compiled = mod.jit_train_step(s_, mesh).lower(state, batch, dparams).compile()
    compile_s, compile_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    compiled_rss = host_runtime.resident_bytes() or {"rss": 0, "peak": 0}
    t0 = time.perf_counter()
    state, m = compiled(state, batch, dparams)  # warm-up
    jax.block_until_ready(m)
    runs[key] = {"compiled": compiled, "state": state, "batch": batch, "params": dparams,
                 "compile_s": compile_s, "compile_cpu_s": compile_cpu_s,
                 "compiled_rss": compiled_rss, "first_step_s": time.perf_counter() - t0,
                 "first_loss": np.asarray(m["loss"]), "times": [],
                 "first_quant": jax.tree_util.tree_map(np.asarray, state.quant), "m": m,
                 "cpu_times": []}
  for _ in range(args.steps):
    for r in runs.values():  # alternate the variants step by step
      t0, c0 = time.perf_counter(), time.process_time()
      r["state"], r["m"] = r["compiled"](r["state"], r["batch"], r["params"])
      jax.block_until_ready((r["state"], r["m"]))
      r["times"].append(time.perf_counter() - t0)
      r["cpu_times"].append(time.process_time() - c0)
  after = host_runtime.resident_bytes() or {"rss": 0, "peak": 0}
  new = runs["new"]
  run_s = sum(new["times"])
  compile_s, warmup_s, m = new["compile_s"], new["first_step_s"], new["m"]
  mesh = dqc_step.data_mesh()

  result = {
      "device": str(jax.devices()[0].device_kind), "num_devices": mesh.devices.size,
      "backend": jax.default_backend(), "batch": args.batch, "lr_size": args.lr_size,
      "scale": args.scale, "bits": args.bits, "loss": args.loss, "steps": args.steps,
      "microbatch": args.microbatch, "remat": dqc_step.remat_mode(settings),
      "host_malloc": host["malloc"],
      "staged": args.staged, "compile_s": round(compile_s, 2),
      "compile_cpu_s": round(new["compile_cpu_s"], 2), "first_step_s": round(warmup_s, 3),
      "steps_per_s": round(args.steps / run_s, 4), "s_per_step": round(run_s / args.steps, 4),
      "median_s_per_step": round(statistics.median(new["times"]), 4),
      "step_times_s": [round(t, 3) for t in new["times"]],
      # CPU seconds (all threads) per step: steadier than wall time on a shared machine.
      "median_cpu_s_per_step": round(statistics.median(new["cpu_times"]), 4),
      "loss_finite": bool(m["finite"]),
      "memory": _memory(new["compiled"], before, new["compiled_rss"], after, mesh,
                        rounds=args.batch // dqc_step.microbatch_size(args.batch, args.microbatch)
                        if args.microbatch else 1,
                        remat=dqc_memory.footprint(dqc_step.DQCSettings(**variants["new"][1]))),
  }
  if "old" in runs:
    old = runs["old"]
    lq = [np.asarray(v) for v in jax.tree_util.tree_leaves(new["first_quant"])]
    lo = [np.asarray(v) for v in jax.tree_util.tree_leaves(old["first_quant"])]
    result["compare"] = {
        "rev": args.compare or (f"remat={args.compare_remat}" if args.compare_remat
                                else f"staged={not args.staged}"),
        "old_compile_s": round(old["compile_s"], 2),
        "old_compile_cpu_s": round(old["compile_cpu_s"], 2),
        "old_median_s_per_step": round(statistics.median(old["times"]), 4),
        "old_median_cpu_s_per_step": round(statistics.median(old["cpu_times"]), 4),
        "old_step_times_s": [round(t, 3) for t in old["times"]],
        "old_s_per_step": round(sum(old["times"]) / args.steps, 4),
        "speedup_median": round(statistics.median(old["times"]) /
                                statistics.median(new["times"]), 3),
        "speedup_total": round(sum(old["times"]) / run_s, 3),
        "first_loss_bit_identical": bool(new["first_loss"] == old["first_loss"]),
        "first_loss_new_old": [float(new["first_loss"]), float(old["first_loss"])],
        "bounds_after_step1_max_abs_diff": float(max(np.max(np.abs(a - b))
                                                     for a, b in zip(lq, lo))),
    }
  if args.data_batches:
    from twodquant_jax.data import patches
    source = patches.load_patch_source(shared_dir() / "data" / "calib",
                                       args.lr_size * args.scale)
    t0 = time.perf_counter()
    for k in range(args.data_batches):
      patches.sample_batch(source, args.seed, k, args.batch, scale=args.scale,
                           lr_size=args.lr_size)
    per_batch = (time.perf_counter() - t0) / args.data_batches
    result["host_batches_per_s_one_thread"] = round(1.0 / per_batch, 3)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
