"""A tiny DQC setup for the training-loop tests, usable in-process and as a subprocess script.

The loop's properties (resume, data parallelism, non-finite stop) do not depend on the network's
size, and SwinIR-light's train step takes about a minute to compile on a 2-core CPU, so these
tests train a 2-RSTB, 12-channel SwinIR (same code, smaller attributes) from seeded random
weights, with min/max initial bounds.

Subprocess use: python tests/dqc_tiny.py WORKDIR STEPS BATCH [SLEEP_PER_STEP [CHECKPOINT_EVERY]]
(writes WORKDIR/result.npz with the final bounds, by quantizer name).
Multi-process: python tests/dqc_tiny.py --dist HOST:PORT NUM_PROCESSES PROCESS_ID TIMEOUT_S
[DIE_AFTER_STEP] WORKDIR STEPS BATCH ... joins a jax.distributed run first (process 0 writes
result.npz); with DIE_AFTER_STEP > 0 this process kills itself (SIGKILL) after that step.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
for _folder in (REPO_ROOT, REPO_ROOT / "benchmarks"):  # a subprocess script: `configs` and
  if str(_folder) not in sys.path:  # benchmarks/shared_paths.py are folders, not packages
    sys.path.insert(0, str(_folder))
from shared_paths import shared_dir  # pylint: disable=g-import-not-at-top
from twodquant_jax.nn import names as qnames
from twodquant_jax import pipeline
from twodquant_jax import settings as run_settings
from twodquant_jax.ptq.dqc import loop as dqc_loop
from twodquant_jax.ptq.dqc import step as dqc_step

from configs.base import get_config  # pylint: disable=g-import-not-at-top

ARCH = {"embed_dim": 12, "depths": (1, 1), "num_heads": (2, 2)}
SCALE, BITS, LR_SIZE = 4, 4, 16


def tiny_config(steps: int, batch_size: int, keep: int = 10, calib_root: str | Path = ""
                ) -> ml_collections.ConfigDict:
  """The DQC settings of the tiny runs; `calib_root` (the training images, ../shared/data/calib)
  is needed only to train: tests pass it from the `shared` fixture, never at import time."""
  c = get_config(scale=SCALE, bits=BITS)
  c.seed = 3
  if calib_root:
    c.calib.root = str(calib_root)
  c.calib.lr_size = LR_SIZE
  c.dqc.steps = steps
  c.dqc.batch_size = batch_size
  c.dqc.checkpoint_every = 5
  c.dqc.keep_checkpoints = keep
  c.dqc.log_every = 1
  c.dqc.data_workers = 1
  return c


def random_params(shapes, rng: np.random.Generator) -> dict:
  """Seeded weights without compiling `init`: LayerNorm scales near 1, fan-in scaled kernels."""
  def leaf(path, s):
    name = path[-1].key
    n = rng.standard_normal(s.shape).astype(np.float32)
    if name == "scale":
      return 1.0 + 0.1 * n
    if name == "bias":
      return 0.05 * n
    if name == "kernel":
      return n / np.sqrt(np.prod(s.shape[:-1]))
    return 0.02 * n

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def tiny_setup(seed: int = 0) -> tuple[dict, dict]:
  """(params, min/max bounds) of the tiny network, from `seed` only."""
  settings = run_settings.DQCSettings(scale=SCALE, bits=BITS, arch=tuple(sorted(ARCH.items())))
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(2, LR_SIZE, LR_SIZE, 3)).astype(np.float32)
  shapes = jax.eval_shape(dqc_step.model_for(settings, "fp").init, jax.random.key(0),
                          x)["params"]
  params = random_params(shapes, rng)
  capture = jax.jit(lambda p, x: dqc_step.model_for(settings, "capture").apply(
      {"params": p}, x, mutable=["calib"])[1])
  seen = capture(params, x)
  inputs = qnames.leaves_by_name(seen["calib"], "input")
  bounds = {name: [float(jnp.min(v)), float(jnp.max(v))] for name, v in inputs.items()}
  return params, qnames.dict_to_tree(bounds)


def as_dict(quant) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in qnames.leaves_by_name(quant, "bounds").items()}


def train(params, quant, config: ml_collections.ConfigDict, workdir, **kwargs):
  """`loop.train` on the tiny network with the settings the pipeline would take from `config`
  (kwargs: mesh, validate, callback, progress)."""
  run = run_settings.parse(config)
  settings = run_settings.dqc_settings(config, ARCH)
  validate = pipeline.dqc_validator(run, params, dqc_step.model_for(settings, "quant"))
  return dqc_loop.train(params, quant, settings, run.loop, workdir, validate=validate, **kwargs)


def _join(argv: list[str]) -> tuple[list[str], int]:
  """Consumes the --dist arguments: joins the run; returns the rest and DIE_AFTER_STEP (0)."""
  from twodquant_jax import distributed  # pylint: disable=g-import-not-at-top
  coordinator, n, pid, timeout, die = argv[2], int(argv[3]), int(argv[4]), int(argv[5]), int(argv[6])
  distributed.initialize(run_settings.DistributedSettings(
      coordinator=coordinator, num_processes=n, process_id=pid, timeout_s=timeout,
      init_timeout_s=300))
  return [argv[0]] + argv[7:], die


def main(argv: list[str]) -> None:
  die = 0
  if len(argv) > 1 and argv[1] == "--dist":
    argv, die = _join(argv)
  workdir, steps, batch = Path(argv[1]), int(argv[2]), int(argv[3])
  sleep = float(argv[4]) if len(argv) > 4 else 0.0
  config = tiny_config(steps, batch, calib_root=shared_dir() / "data" / "calib")
  if len(argv) > 5:
    config.dqc.checkpoint_every = int(argv[5])
  params, quant = tiny_setup()
  if jax.process_count() > 1:
    from twodquant_jax import distributed  # pylint: disable=g-import-not-at-top
    # As the pipeline does with DOBI's bounds; and a decision taken by process 0 alone.
    quant = distributed.from_primary(quant, "initial bounds")
    print("agree", distributed.agree(jax.process_index() == 0), flush=True)

  def callback(step, scalars):
    print("step", step, "process", jax.process_index(), flush=True)
    if die and step >= die:
      os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(sleep)

  final, info = train(params, quant, config, workdir, callback=callback)
  if jax.process_index() == 0:
    np.savez(workdir / "result.npz", **as_dict(final))
  print("devices", jax.device_count(), "processes", jax.process_count(), "resumed_from",
        info["resumed_from"], flush=True)


if __name__ == "__main__":
  main(sys.argv)
