"""Speed of the SwinIR-light forward: FP, fake-quant (float) and the integer engine, in one run.

Each model is jitted once per input shape and timed after compilation: the median of `--repeats`
calls, each blocked until ready, the three models interleaved call by call so that a change in
the machine's load hits them alike. Inputs: LR batches of 8x64x64 and 1x256x256 by default. Prints
a table with the ratios against FP and writes JSON (`--out`). The weights are the reference
random checkpoint (or `--checkpoint`), the bounds are `--bounds` or MinMax on the input itself:
speed does not depend on their values.

  python benchmarks/engine_speed.py --out engine_speed.json
  python benchmarks/engine_speed.py --shapes 1x64x64 --repeats 2   # quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from twodquant_jax import host_runtime
from twodquant_jax.eval.predict import jitted_apply
from twodquant_jax.formats import bounds_file, convert
from twodquant_jax.nn.swinir import SwinIR, variable_shapes
from shared_paths import shared_dir
from twodquant_jax.nn import names as qnames

ENGINES = (("fp", "fp"), ("fake", "quant"), ("int", "int"))  # (label, SwinIR mode)


def _minmax(params: dict, scale: int, x: jnp.ndarray) -> dict:
  capture = jax.jit(lambda p, x: SwinIR(upscale=scale, mode="capture").apply(
      {"params": p}, x, mutable=["calib"])[1]["calib"])
  seen = qnames.leaves_by_name(capture(params, x), "input")
  return qnames.dict_to_tree({k: [float(jnp.min(v)), float(jnp.max(v))] for k, v in seen.items()})


def _seconds(fn, variables, x) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(variables, x))
  return time.perf_counter() - t0


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--scale", type=int, default=4)
  ap.add_argument("--bits", type=int, default=4)
  ap.add_argument("--shapes", default="8x64x64,1x256x256", help="LR inputs BxHxW, comma-separated")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--checkpoint", default="", help="SwinIR-light .pth (default: reference random)")
  ap.add_argument("--bounds", default="", help="bounds file (default: MinMax on the input)")
  ap.add_argument("--out", default="", help="write the results as JSON here")
  args = ap.parse_args()
  host_runtime.apply(host_runtime.HostSettings())  # as main.py: the default allocator, first thing

  ckpt = Path(args.checkpoint) if args.checkpoint else (
      shared_dir() / "reference" / f"swinir_light_x{args.scale}_random.pth")
  params, _ = convert.load_checkpoint(ckpt, args.scale, variable_shapes(args.scale)["params"])
  params = jax.tree_util.tree_map(jnp.asarray, params)
  rng = np.random.default_rng(0)
  rows = []
  for spec in args.shapes.split(","):
    b, h, w = (int(v) for v in spec.lower().split("x"))
    x = jnp.asarray(rng.uniform(0, 1, (b, h, w, 3)).astype(np.float32))
    if args.bounds:
      like = variable_shapes(args.scale, "quant", args.bits)["quant"]
      quant = bounds_file.load_bounds(args.bounds, like)
    else:
      quant = _minmax(params, args.scale, x[:1])
    row = {"input": [b, h, w]}
    runs = {}
    for label, mode in ENGINES:  # compile (first call) of each
      variables = {"params": params} if mode == "fp" else {"params": params, "quant": quant}
      runs[label] = (jitted_apply(args.scale, mode, args.bits), variables)
      row[label] = {"first_call_seconds": _seconds(*runs[label], x), "times": []}
    for _ in range(args.repeats):  # interleaved, so load changes hit all three alike
      for label in runs:
        row[label]["times"].append(_seconds(*runs[label], x))
    for label in runs:
      sec = statistics.median(row[label]["times"])
      row[label].update(seconds=sec, lr_pixels_per_s=b * h * w / sec)
      print(f"{spec:>10} {label:>5}: {sec * 1e3:9.1f} ms/call (median of {args.repeats}; "
            f"first call {row[label]['first_call_seconds']:.1f} s)", flush=True)
    row["fake_over_fp"] = row["fake"]["seconds"] / row["fp"]["seconds"]
    row["int_over_fp"] = row["int"]["seconds"] / row["fp"]["seconds"]
    row["int_over_fake"] = row["int"]["seconds"] / row["fake"]["seconds"]
    rows.append(row)

  print("\n| LR input | FP (ms) | fake-quant (ms) | int engine (ms) | fake/FP | int/FP | int/fake |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {'x'.join(map(str, r['input']))} | {r['fp']['seconds'] * 1e3:.1f} | "
          f"{r['fake']['seconds'] * 1e3:.1f} | {r['int']['seconds'] * 1e3:.1f} | "
          f"{r['fake_over_fp']:.2f} | {r['int_over_fp']:.2f} | {r['int_over_fake']:.2f} |")
  result = {"scale": args.scale, "bits": args.bits, "repeats": args.repeats, "rows": rows,
            "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "machine": platform.machine(),
            "checkpoint": str(ckpt)}
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
