"""Compiles and wall time of evaluation: the per-size path against the bucket path, in one run.

  PYTHONPATH=$PWD:$PWD/benchmarks python benchmarks/eval_compile.py \
      --checkpoint=../shared/reference/standin_x4.pth --root=../shared/data/benchmarks \
      --sets=Set5,Set14,B100 [--paths=per_size,bucket] [--out=eval_compile.json]

No persistent compilation cache (every compile is cold). Each path gets a fresh Predictor of the
FP model and scores the sets as the pipeline does (`evaluate_images`, chunks of
`--batch_size` images); the bucket path first plans its buckets for all the sets at once
(`Predictor.plan`, as the pipeline does). The two paths run back to back in this process, and the
load average is recorded around each, since the machine may be shared.

It also counts, without running anything, the compiles each path needs for the LR sizes of all
five benchmark sets at this scale: the sets found under --root, and for Urban100 and Manga109
(not stored here) the stand-in size lists below.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from twodquant_jax.data.benchmarks import load_benchmark
from twodquant_jax.eval import predict as ev
from twodquant_jax.formats import convert
from twodquant_jax.nn.swinir import variable_shapes

# HR sizes (H, W) standing in for the sets not stored here; not checked image by image against
# the published files. Manga109: 109 pages of 1170x827. Urban100: 100 photos 1024 pixels on the
# long side, the short side spread over 564..1024 (landscape and a quarter portrait).
MANGA109_HR = [(1170, 827)] * 109
URBAN100_HR = [(int(s), 1024) if k % 4 else (1024, int(s))
               for k, s in enumerate(np.linspace(564, 1024, 100).round())]


def per_size_shapes(lr_shapes: list[tuple[int, int]], scale_chunk: int, pred: ev.Predictor
                    ) -> set[tuple[int, ...]]:
  """The batch shapes the per-size path compiles for these LR shapes, fed in chunks."""
  shapes = set()
  m = pred.multiple
  for k in range(0, len(lr_shapes), scale_chunk):
    groups: dict[tuple[int, int], int] = {}
    for h, w in lr_shapes[k:k + scale_chunk]:
      hw = (-(-h // m) * m, -(-w // m) * m)
      groups[hw] = groups.get(hw, 0) + 1
    for hw, n in groups.items():
      per = ev.images_per_batch(hw, pred.batch_size, pred.batch_pixels)
      shapes.update((min(per, n - i), *hw, 3) for i in range(0, n, per))
  return shapes


def count_only(pred_kwargs: dict, sets: dict[str, list[tuple[int, int]]], chunk: int) -> dict:
  """Compiles per path for these LR shapes, and the bucket path's padded-pixel overhead."""
  per_size = set().union(*(per_size_shapes(s, chunk, ev.Predictor(**pred_kwargs))
                           for s in sets.values()))
  bucket = ev.Predictor(**pred_kwargs, bucket_apply=ev.bucket_apply(pred_kwargs["scale"]))
  shapes = [hw for s in sets.values() for hw in s]
  buckets = bucket.plan(shapes, compile_now=False)
  m = bucket.multiple
  own = sum((-(-h // m) * m) * (-(-w // m) * m) for h, w in shapes)
  used = sum(np.prod(bucket.bucket_of((-(-h // m) * m, -(-w // m) * m))) for h, w in shapes)
  return {"per_size_compiles": len(per_size), "bucket_compiles": len(buckets),
          "buckets": buckets, "bucket_pixels_over_exact": round(float(used / own), 3)}


def timed_eval(pred: ev.Predictor, datasets: dict, scale: int, chunk: int, plan: bool) -> dict:
  load = os.getloadavg()[0]
  start = time.perf_counter()
  if plan:
    pred.plan([img.lr.shape[:2] for images in datasets.values() for img in images])
  scores = {name: ev.evaluate_images(pred.predict, images, scale, chunk=chunk)
            for name, images in datasets.items()}
  wall = time.perf_counter() - start
  return {"wall_s": round(wall, 1), **pred.compile_stats(),
          "compile_s": round(pred.compile_stats()["compile_s"], 1),
          "buckets": pred.buckets or None,
          "load_before": round(load, 1), "load_after": round(os.getloadavg()[0], 1),
          "psnr": {n: r["psnr"] for n, r in scores.items()},
          "image_psnr": {n: {k: v["psnr"] for k, v in r["images"].items()}
                         for n, r in scores.items()}}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--checkpoint", required=True)
  ap.add_argument("--root", required=True, help="benchmark root with <set>/HR folders")
  ap.add_argument("--sets", default="Set5,Set14,B100")
  ap.add_argument("--scale", type=int, default=4)
  ap.add_argument("--paths", default="per_size,bucket", help="which paths to run, in order")
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--batch_pixels", type=int, default=ev.DEFAULT_BATCH_PIXELS)
  ap.add_argument("--out", default="")
  a = ap.parse_args()
  jax.config.update("jax_enable_compilation_cache", False)  # cold: compile_cache=""

  s = a.scale
  params, _ = convert.load_checkpoint(a.checkpoint, s, variable_shapes(s)["params"])
  datasets = {n: load_benchmark(a.root, n, s) for n in a.sets.split(",")}
  kwargs = dict(apply_fn=ev.jitted_apply(s), scale=s, batch_size=a.batch_size,
                batch_pixels=a.batch_pixels, variables={"params": params})
  lr_sizes = {n: [img.lr.shape[:2] for img in images] for n, images in datasets.items()}
  five = dict(lr_sizes)
  five["Urban100"] = [(h // s, w // s) for h, w in URBAN100_HR]
  five["Manga109"] = [(h // s, w // s) for h, w in MANGA109_HR]
  report = {"device": jax.devices()[0].device_kind, "cpus": os.cpu_count(),
            "counted": {"these_sets": count_only(kwargs, lr_sizes, a.batch_size),
                        "five_sets": count_only(kwargs, five, a.batch_size)}}
  print(json.dumps(report["counted"]), flush=True)
  for path in a.paths.split(","):
    bucket = ev.bucket_apply(s) if path == "bucket" else None
    pred = ev.Predictor(**kwargs, bucket_apply=bucket)
    report[path] = timed_eval(pred, datasets, s, a.batch_size, plan=bucket is not None)
    print(json.dumps({path: {k: v for k, v in report[path].items() if k != "image_psnr"}}),
          flush=True)
  if "per_size" in report and "bucket" in report:
    old, new = report["per_size"], report["bucket"]
    report["wall_ratio"] = round(old["wall_s"] / new["wall_s"], 2)
    report["max_image_psnr_diff_db"] = max(
        abs(old["image_psnr"][n][k] - new["image_psnr"][n][k])
        for n in old["image_psnr"] for k in old["image_psnr"][n])
    print(json.dumps({k: report[k] for k in ("wall_ratio", "max_image_psnr_diff_db")}))
  if a.out:
    with open(a.out, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  main()
