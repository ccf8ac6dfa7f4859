"""How far tiled evaluation falls below whole-image evaluation, per tile overlap and blend.

  PYTHONPATH=$PWD python benchmarks/tile_overlap.py \
      --checkpoint=../shared/reference/standin_x4.pth \
      --images=../shared/data/benchmarks/Set14/HR/barbara.png,... [--bounds=bounds.json --bits=2]

Runs each image whole and as 64x64 LR tiles at each overlap (each tile once; both blends
'center' and 'mean' are stitched from the same tile outputs) and prints one JSON line per
(overlap, blend): the mean PSNR(Y) gap tiled - whole over the images, and the worst image.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from twodquant_jax.data.bicubic import imresize
from twodquant_jax.data.images import load_rgb, mod_crop, to_uint8
from twodquant_jax.eval import predict as ev
from twodquant_jax.eval.metrics import psnr_y
from twodquant_jax.formats import bounds_file, convert
from twodquant_jax.nn.swinir import variable_shapes


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--checkpoint", required=True)
  ap.add_argument("--images", required=True, help="comma-separated HR image paths")
  ap.add_argument("--scale", type=int, default=4)
  ap.add_argument("--bounds", default="", help="bounds.json: evaluate the fake-quantized model")
  ap.add_argument("--bits", type=int, default=2)
  ap.add_argument("--tile", type=int, default=64)
  ap.add_argument("--overlaps", default="8,16,32,48")
  ap.add_argument("--batch", type=int, default=4, help="tiles per call (fixed: one compile)")
  a = ap.parse_args()
  s = a.scale
  params, _ = convert.load_checkpoint(a.checkpoint, s, variable_shapes(s)["params"])
  variables = {"params": jax.tree_util.tree_map(jnp.asarray, params)}
  if a.bounds:
    like = variable_shapes(s, "quant", a.bits)["quant"]
    variables["quant"] = bounds_file.load_bounds(a.bounds, like)
    fn = ev.jitted_apply(s, "quant", a.bits)
  else:
    fn = ev.jitted_apply(s)
  run = lambda x: np.asarray(fn(variables, jnp.asarray(x)))
  overlaps = [int(o) for o in a.overlaps.split(",")]
  gaps: dict[tuple[int, str], list[float]] = {}
  t0 = time.perf_counter()
  for path in a.images.split(","):
    hr = mod_crop(load_rgb(path), s)
    lr = imresize(hr, 1.0 / s, matlab_exact=True)
    x = ev.flip_pad(lr.astype(np.float32) / 255.0)
    h, w = lr.shape[:2]
    whole = psnr_y(to_uint8(run(x[None])[0][:h * s, :w * s]), hr, s)
    for o in overlaps:
      boxes, (th, tw) = ev.tile_boxes(x.shape[:2], a.tile, o)
      outs = []
      for k in range(0, len(boxes), a.batch):
        chunk = boxes[k:k + a.batch]
        tiles = [x[i:i + th, j:j + tw] for i, j in chunk]
        tiles += [tiles[-1]] * (a.batch - len(tiles))  # pad the last call to the fixed batch
        outs.extend(run(np.stack(tiles))[:len(chunk)])
      for blend in ("center", "mean"):
        sr = ev.stitch(outs, boxes, x.shape[:2], (th, tw), s, blend)[:h * s, :w * s]
        gaps.setdefault((o, blend), []).append(psnr_y(to_uint8(sr), hr, s) - whole)
    print(json.dumps({"image": Path(path).name, "lr": [h, w], "whole_psnr": round(whole, 4),
                      "gaps": {f"{o}/{b}": round(g[-1], 4) for (o, b), g in gaps.items()},
                      "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
  for (o, blend), g in sorted(gaps.items()):
    print(json.dumps({"tile": a.tile, "overlap": o, "blend": blend, "quant": bool(a.bounds),
                      "mean_gap_db": round(float(np.mean(g)), 4),
                      "worst_gap_db": round(float(np.min(g)), 4), "images": len(g)}))


if __name__ == "__main__":
  main()
