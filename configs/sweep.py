"""The whole Table 3 as one resumable sweep: every (scale, bits) cell of the chosen methods.

`python main.py --config=configs/sweep.py --workdir=runs/table3` runs the cells into
runs/table3/x{s}_fp/ (FP and Bicubic rows, once per scale) and runs/table3/x{s}_w{b}/, then
writes runs/table3/table3.json and table3.md. Everything in configs/base.py applies to every
cell (e.g. --config.eval.datasets=Set5 --config.dqc.steps=500); `scale`, `bits` and `method`
are set per cell. A model.checkpoint containing "{scale}" is formatted per scale.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config(scale=4, bits=4, method="all")
  c.sweep = ml_collections.ConfigDict()
  c.sweep.scales = "2,3,4"  # comma-separated upscaling factors
  c.sweep.bits = "2,3,4"  # comma-separated bit widths (weights and activations)
  c.sweep.methods = "all"  # 'all' or comma-separated methods (fp, bicubic, minmax, ...)
  c.sweep.shard = ""  # "i/n": run only the i-th (0-based) of n interleaved slices of the cells
  c.sweep.collect = False  # only build table3.json / table3.md from the finished cells
  return c
