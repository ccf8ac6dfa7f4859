"""DOBI speed and parity against the authors' code on this machine.

Runs our DOBI ('reference' strategy, first-minimum ties: what the authors' code does) on
`calib_x4.npz` lr[:4] with the random x4 checkpoint, twice: the first run includes jit
compilation, the second is the steady-state time to compare with the authors' 128.5 s
(`authors_dobi_seconds_2cpu` in ../shared/reference/ref2dq_x4_w4_random_b4.json). Then the
full 32 patches once (unless --skip_full). Prints the bound parity with the reference files.

  python benchmarks/dobi_speed.py [--skip_full]
"""

import json
import sys
import time

import jax
import numpy as np
from absl import app, flags

from twodquant_jax import host_runtime
from twodquant_jax.formats import convert
from twodquant_jax.nn.swinir import variable_shapes
from shared_paths import shared_dir
from twodquant_jax.nn.names import tree_to_dict
from twodquant_jax.ptq.dobi import CalibSettings, calibrate_many

flags.DEFINE_bool("skip_full", False, "Skip the 32-patch run.")
FLAGS = flags.FLAGS


def calibrate_one(params, scale, bits, lr, cfg):
  """One bound initialisation: calibrate_many with a single entry."""
  return calibrate_many(params, scale, lr, {"_": (bits, cfg)})["_"]


def parity(ours: dict, ref: dict) -> tuple[float, int]:
  worst, bad = 0.0, 0
  for name, (lo, hi) in ref.items():
    rel = max(abs(ours[name][0] - lo) / max(abs(lo), 1e-12),
              abs(ours[name][1] - hi) / max(abs(hi), 1e-12))
    worst, bad = max(worst, rel), bad + (rel > 1e-5)
  return worst, bad


def main(_):
  host_runtime.apply(host_runtime.HostSettings())  # as main.py: the default allocator, first thing
  ref_dir = shared_dir() / "reference"
  params, _ = convert.load_checkpoint(ref_dir / "swinir_light_x4_random.pth", 4,
                                      variable_shapes(4)["params"])
  lr = np.load(ref_dir / "calib_x4.npz")["lr"]
  cfg = CalibSettings(strategy="reference", tie="first")
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})", flush=True)
  runs = [("lr[:4]", lr[:4], "ref2dq_x4_w4_random_b4.json")] * 2
  if not FLAGS.skip_full:
    runs.append(("lr[:32]", lr, "ref2dq_x4_w4_random.json"))
  for k, (what, batch, ref_file) in enumerate(runs):
    ref = json.loads((ref_dir / ref_file).read_text())
    t0 = time.perf_counter()
    quant, info = calibrate_one(params, 4, 4, batch, cfg)
    wall = time.perf_counter() - t0
    worst, bad = parity(tree_to_dict(quant), ref["bounds"])
    label = "first run, incl. jit compile" if k == 0 else "steady state"
    authors = ref.get("authors_dobi_seconds_2cpu")
    print(f"{what:8s} {label:30s} {wall:7.1f} s (forward {info['seconds_forward']:.1f} s, "
          f"search {info['seconds_search']:.1f} s); authors: "
          f"{authors if authors else 'n/a'} s; bounds vs reference: worst rel {worst:.1e}, "
          f"{bad}/384 beyond 1e-5", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(app.run(main))
