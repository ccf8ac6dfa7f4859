"""Speed of the DQC train step (SwinIR-light student + FP teacher, Adam on the 768 bounds).

Reports the compile time of the jitted data-parallel step, then steps/s over `--steps` steps on
a fixed device-resident batch (the step alone), and the host's batch-making rate (PatchSource
crops + bicubic LR), which bounds the real loop's speed when it is slower than the step.

  python benchmarks/dqc_speed.py                      # batch 32, 64x64 LR, x4, 2 bits
  python benchmarks/dqc_speed.py --batch 4 --steps 5  # a CPU-sized run
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from twodquant_jax.io import convert
from twodquant_jax.paths import shared_dir
from twodquant_jax.ptq import names as qnames
from twodquant_jax.ptq.dqc import loss as dqc_loss
from twodquant_jax.ptq.dqc import step as dqc_step


def _params(settings: dqc_step.DQCSettings, seed: int) -> dict:
  """The reference random-weight checkpoint if present, else seeded random weights."""
  model = settings.model("fp")
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
  capture = jax.jit(lambda p, x: settings.model("capture").apply(
      {"params": p}, x, mutable=["calib"])[1]["calib"])
  seen = qnames.leaves_by_name(capture(params, x), "input")
  return qnames.dict_to_tree({k: [float(jnp.min(v)), float(jnp.max(v))]
                               for k, v in seen.items()})


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
  ap.add_argument("--remat", action="store_true",
                  help="wrap each Swin block in jax.checkpoint (config dqc.remat)")
  ap.add_argument("--data_batches", type=int, default=2,
                  help="batches cut from ../shared/data/calib to time the host side (0: skip)")
  args = ap.parse_args()

  settings = dqc_step.DQCSettings(scale=args.scale, bits=args.bits,
                                  steps=max(args.steps, 1) + 1, loss=args.loss,
                                  remat=args.remat, microbatch=args.microbatch)
  mesh = dqc_step.data_mesh()
  dqc_step.check_batch_size(args.batch, mesh)
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(dqc_step.DATA_AXIS))
  rng = np.random.default_rng(args.seed)
  lr = rng.integers(0, 256, (args.batch, args.lr_size, args.lr_size, 3), dtype=np.uint8)
  params = _params(settings, args.seed)
  quant = _minmax_bounds(settings, params, lr[:2].astype(np.float32) / 255.0)
  params = jax.device_put(params, repl)
  state = jax.device_put(dqc_step.init_state(settings, quant), repl)
  batch = jax.device_put(lr, data)

  step = dqc_step.jit_train_step(settings, mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, params).compile()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  state, m = compiled(state, batch, params)  # warm-up
  jax.block_until_ready(m)
  warmup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, m = compiled(state, batch, params)
  jax.block_until_ready((state, m))
  run_s = time.perf_counter() - t0

  result = {
      "device": str(jax.devices()[0].device_kind), "num_devices": mesh.devices.size,
      "backend": jax.default_backend(), "batch": args.batch, "lr_size": args.lr_size,
      "scale": args.scale, "bits": args.bits, "loss": args.loss, "steps": args.steps,
      "compile_s": round(compile_s, 2), "first_step_s": round(warmup_s, 3),
      "steps_per_s": round(args.steps / run_s, 4), "s_per_step": round(run_s / args.steps, 4),
      "loss_finite": bool(m["finite"]),
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
