"""One command that proves the GPU path; prints ONE JSON object (see gpu_check.sh).

Sections (each timed; a failing section records its error and the others still run):
  fp_parity    FP SwinIR-light x4 on GPU vs reference/parity_x4_random.npz (official PyTorch
               outputs) at matmul_precision 'highest' and 'default' (TF32 on GPUs that have it);
  dobi         DOBI bounds (paper strategy, 2 bits, standin_x4.pth, calib_x4.npz lr[:4]) computed
               on the default device (search 'brute', float64 sums) vs on the CPU (search
               'sorted'): how many of the 768 bounds are equal;
  dqc_speed    DQC steps/s at batch 32 (64x64 LR, x4, 2 bits) with dqc.microbatch=auto, and the
               device's peak memory, for the staged step (the default) and, besides it, the
               one-program step (dqc.staged=False: 'one_program'), with their compile seconds;
  compiler_options  compile seconds and step / call time of the DQC step (batch 32, whole batch)
               and of the FP and fake-quant bucket evaluation function (one 128x128 LR image)
               under each of this backend's candidate compiler options
               (`compile_cache.CANDIDATE_OPTIONS`; GPU: GEMM autotuning on and off), each
               compiled cold from one lowering, steps / calls timed alternately;
  pipeline     the full x4 W2 2DQuant run on standin_x4.pth (DOBI on 32 patches, DQC 3000 steps
               at batch 32, eval Set5/Set14/B100) with the wall time of each stage, from a cold
               compilation cache (a fresh folder; in-memory caches of earlier sections cleared).

`--smoke`: CPU-sized (tiny sizes, a 2-RSTB network for the DQC speed and the compiler options,
2 DQC steps at batch 2 on 16x16 patches in the pipeline, one small image per dataset) so CI can
check the script and its JSON keys end to end.

The shared data is found from --shared, else $TWODQUANT_SHARED, else <repo>/shared, else
<repo>/../shared. Needed: reference/{parity_x4_random.npz, calib_x4.npz,
swinir_light_x4_random.pth, standin_x4.pth}, data/calib, data/benchmarks/{Set5,Set14,B100}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

SECTIONS = ("fp_parity", "dobi", "dqc_speed", "compiler_options", "pipeline")
TINY_ARCH = {"embed_dim": 12, "depths": (1, 1), "num_heads": (2, 2)}


def find_shared(arg: str) -> Path:
  env = os.environ.get("TWODQUANT_SHARED", "")
  for cand in (arg, env, REPO / "shared", REPO.parent / "shared"):
    if cand and (Path(cand) / "reference").is_dir():
      return Path(cand).resolve()
  raise FileNotFoundError("shared data not found: pass --shared PATH or set TWODQUANT_SHARED "
                          "(a folder with reference/ and data/)")


def _params(path: Path, scale: int = 4) -> dict:
  from twodquant_jax.formats import convert
  from twodquant_jax.nn.swinir import variable_shapes
  return convert.load_checkpoint(path, scale, variable_shapes(scale)["params"])[0]


def fp_parity(shared: Path, smoke: bool, precisions: tuple[str, ...] = ("highest", "default")
              ) -> dict:
  from twodquant_jax.eval.predict import Predictor
  from twodquant_jax.nn.swinir import SwinIR
  ref = np.load(shared / "reference" / "parity_x4_random.npz")
  params = jax.device_put(_params(shared / "reference" / "swinir_light_x4_random.pth"))
  model = SwinIR(upscale=4)
  names = ("baby",) if smoke else ("baby", "woman", "bird")
  out = {}
  for precision in precisions:
    with jax.default_matmul_precision(precision):
      pred = Predictor(lambda x: model.apply({"params": params}, x), 4)
      srs, first_s, again_s = [], {}, {}
      for n in names:  # one image at a time: compile + run, then run again (the eval's cost)
        t0 = time.perf_counter()
        srs += pred.predict([ref[f"{n}_lr"]])
        first_s[n] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        pred.predict([ref[f"{n}_lr"]])
        again_s[n] = round(time.perf_counter() - t0, 3)
    errs = {n: float(np.abs(sr - ref[f"{n}_sr"]).max()) for n, sr in zip(names, srs)}
    out[precision] = {"max_abs_diff": errs, "pass_1e-4": all(e <= 1e-4 for e in errs.values()),
                      "first_call_s": first_s, "second_call_s": again_s,
                      "lr_shapes": {n: list(ref[f"{n}_lr"].shape) for n in names}}
  return out


def dobi(shared: Path, smoke: bool) -> dict:
  from twodquant_jax.nn import names as qnames
  from twodquant_jax.ptq.dobi import CalibSettings, calibrate_many
  calibrate = lambda p, scale, bits, lr, cfg: calibrate_many(p, scale, lr, {"_": (bits, cfg)})["_"]
  lr = np.load(shared / "reference" / "calib_x4.npz")["lr"][:4]
  if smoke:
    lr = lr[:1, :16, :16]
  params = _params(shared / "reference" / "standin_x4.pth")
  # At the pipeline's matmul precision: the GPU default (TF32) changes the captured activations
  # themselves, and with them most bounds.
  with jax.default_matmul_precision("highest"):
    t0 = time.perf_counter()
    dev, _ = calibrate(jax.device_put(params), 4, 2, lr, CalibSettings(search="brute"))
    dev_s = time.perf_counter() - t0
    cpu = jax.devices("cpu")[0]
    t0 = time.perf_counter()
    with jax.default_device(cpu):
      host, _ = calibrate(jax.device_put(params, cpu), 4, 2, lr, CalibSettings(search="sorted"))
    cpu_s = time.perf_counter() - t0
  a = {k: np.asarray(v) for k, v in qnames.leaves_by_name(dev, "bounds").items()}
  b = {k: np.asarray(v) for k, v in qnames.leaves_by_name(host, "bounds").items()}
  equal = sum(int(np.sum(a[k] == b[k])) for k in a)
  differ = sorted(k for k in a if not np.array_equal(a[k], b[k]))
  # How far apart the differing bounds are, relative to their quantizer's range.
  rel = [float(np.max(np.abs(a[k] - b[k])) / max(float(np.ptp(b[k])), 1e-12)) for k in differ]
  return {"device_backend": jax.default_backend(), "patches": int(lr.shape[0]),
          "bounds_total": 2 * len(a), "bounds_equal": equal,
          "quantizers_differing": differ[:20], "quantizers_differing_count": len(differ),
          "max_rel_diff": max(rel, default=0.0),
          "median_rel_diff": float(np.median(rel)) if rel else 0.0,
          "device_seconds": round(dev_s, 2),
          "cpu_seconds": round(cpu_s, 2)}


def dqc_speed(shared: Path, smoke: bool) -> dict:
  from twodquant_jax.ptq.dqc import memory as dqc_memory
  from twodquant_jax.ptq.dqc import step as dqc_step
  batch, lr_size, steps = (4, 16, 2) if smoke else (32, 64, 20)
  from configs.base import get_config
  from twodquant_jax import settings as run_settings
  # The pipeline's own DQC settings (steps 3000 etc.), so its compile is a persistent-cache hit.
  settings = run_settings.dqc_settings(get_config(scale=4, bits=2), dict(TINY_ARCH) if smoke
                                       else None)
  assert settings.microbatch == run_settings.AUTO_MICROBATCH
  params, lr, quant = _dqc_inputs(shared, smoke, settings, batch, lr_size)
  mesh = dqc_step.data_mesh()
  from jax.sharding import NamedSharding, PartitionSpec as P
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(dqc_step.DATA_AXIS))
  params = jax.device_put(params, repl)
  x = jax.device_put(lr, data)
  out = {}
  # The default (staged: pieces) and, on a real run, the one-program step (dqc.staged=False),
  # to choose the GPU default from compile and step times.
  for staged in ((True,) if smoke else (True, False)):
    s = dataclasses.replace(settings, staged=staged)
    state = jax.device_put(dqc_step.init_state(s, quant), repl)
    with jax.default_matmul_precision("highest"):
      t0 = time.perf_counter()
      fn, resolved, info = dqc_memory.train_step_fn(s, batch, lr_size, mesh, params, quant)
      fn = dqc_memory.compile_step(fn, state, x, params)
      compile_s = time.perf_counter() - t0
      state, m = fn(state, x, params)
      jax.block_until_ready(m)
      first_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      for _ in range(steps):
        state, m = fn(state, x, params)
      jax.block_until_ready((state, m))
      run_s = time.perf_counter() - t0
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    out["staged" if staged else "one_program"] = {
        "batch": batch, "lr_size": lr_size, "steps_timed": steps,
        "steps_per_s": round(steps / run_s, 4), "s_per_step": round(run_s / steps, 4),
        "compile_s": round(compile_s, 2), "compile_and_first_step_s": round(first_s, 2),
        "microbatch": int(info["microbatch"]), "microbatch_info": info,
        "peak_device_bytes": stats.get("peak_bytes_in_use"),
        "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "loss_finite": bool(m["finite"])}
  return {**out["staged"], **({"one_program": out["one_program"]} if "one_program" in out else {})}


def compiler_options(shared: Path, smoke: bool) -> dict:
  import dataclasses
  from configs.base import get_config
  import compile_options as co
  from twodquant_jax import compile_cache
  from twodquant_jax import settings as run_settings
  sets = {"default": {}, **compile_cache.CANDIDATE_OPTIONS.get(compile_cache.backend_kind(), {})}
  batch, lr_size, steps = (2, 16, 2) if smoke else (32, 64, 10)
  arch = dict(TINY_ARCH) if smoke else None
  settings = dataclasses.replace(
      run_settings.dqc_settings(get_config(scale=4, bits=2), arch), microbatch=0, steps=steps + 2)
  params, lr, quant = _dqc_inputs(shared, smoke, settings, batch, lr_size)
  out = {"options": sets, "dqc_settings": {"batch": batch, "lr_size": lr_size,
                                            "remat": settings.remat, "arch": settings.arch}}
  with jax.default_matmul_precision("highest"):
    out["dqc"] = co.dqc_compare(settings, params, quant, lr, sets, steps)
    for mode in ("fp", "quant"):
      out[f"eval_{mode}"] = co.eval_compare(params, quant, mode, sets, scale=4, bits=2,
                                            lr_size=16 if smoke else 128, arch=settings.arch)
  return out


def _dqc_inputs(shared: Path, smoke: bool, settings, batch: int, lr_size: int):
  """(params, uint8 LR batch from calib_x4.npz, min/max bounds): the stand-in x4 weights, or in
  smoke mode a random network of `settings.arch`."""
  from twodquant_jax.ptq.dqc import step as dqc_step
  if smoke:
    params = jax.jit(dqc_step.model_for(settings, "fp").init)(
        jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  else:
    params = _params(shared / "reference" / "standin_x4.pth")
  lr = np.load(shared / "reference" / "calib_x4.npz")["lr"]
  lr = np.resize(lr[:, :lr_size, :lr_size], (batch, lr_size, lr_size, 3)).astype(np.uint8)
  return params, lr, _minmax_bounds(settings, params, lr)


def _minmax_bounds(settings, params, lr: np.ndarray) -> dict:
  """Min/max bounds of every quantizer's input on two images of `lr` (a DQC start)."""
  from twodquant_jax.nn import names as qnames
  from twodquant_jax.ptq.dqc import step as dqc_step
  capture = jax.jit(lambda p, x: dqc_step.model_for(settings, "capture").apply(
      {"params": p}, x, mutable=["calib"])[1]["calib"])
  seen = qnames.leaves_by_name(capture(params, lr[:2].astype(np.float32) / 255.0), "input")
  return qnames.dict_to_tree({k: [float(jnp.min(v)), float(jnp.max(v))]
                              for k, v in seen.items()})


def _tiny_benchmarks(shared: Path, root: Path) -> Path:
  """One 64x64 HR crop of the first image of each dataset (smoke mode)."""
  from twodquant_jax.data.images import load_rgb, save_png
  for name in ("Set5", "Set14", "B100"):
    src = sorted((shared / "data" / "benchmarks" / name / "HR").glob("*.png"))[0]
    save_png(root / name / "HR" / src.name, np.ascontiguousarray(load_rgb(src)[:64, :64]))
  return root


def cold_compile_cache(folder: Path) -> str:
  """Points the persistent compilation cache at a new empty `folder` and clears jax's in-memory
  caches, so what follows compiles everything (as a first run on a fresh machine)."""
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  from twodquant_jax import compile_cache
  jax.clear_caches()
  compilation_cache.reset_cache()  # the next compile opens the cache at the new folder
  return str(compile_cache.enable(str(folder)))


def pipeline(shared: Path, smoke: bool, workdir: Path, dqc_steps: int = 3000,
             cold: bool = True) -> dict:
  from configs.base import get_config
  from twodquant_jax import pipeline as run_pipeline
  from twodquant_jax import settings as run_settings
  c = get_config(scale=4, bits=2, method="2dquant")
  c.model.checkpoint = str(shared / "reference" / "standin_x4.pth")
  c.calib.root = str(shared / "data" / "calib")
  c.data.root = str(shared / "data" / "benchmarks")
  c.eval.datasets = "Set5,Set14,B100"
  c.progress = False
  c.dqc.steps, c.dqc.batch_size, c.calib.num_patches = dqc_steps, 32, 32
  if smoke:
    c.dqc.steps, c.dqc.batch_size, c.dqc.microbatch = min(dqc_steps, 2), 2, "0"
    c.calib.num_patches, c.calib.lr_size = 1, 16
    c.data.root = str(_tiny_benchmarks(shared, workdir / "bench"))
  # Cold: a fresh cache folder (the pipeline then fills it, as a first run does).
  c.compile_cache = (cold_compile_cache(workdir / f"xla_cold_{time.time_ns()}") if cold
                     else jax.config.jax_compilation_cache_dir or "")
  t0 = time.perf_counter()
  res = run_pipeline.run(run_settings.parse(c), workdir / "run")
  total = time.perf_counter() - t0
  entry = res["methods"]["2dquant"]
  calib = entry.get("calibration", {})
  dqc = entry.get("dqc", {})
  stages = {"calibration_s": calib.get("seconds_total"), "dqc_s": dqc.get("seconds"),
            "dqc_compile_s": dqc.get("compile_seconds"), "method_s": entry.get("seconds"),
            "eval_compiles": entry.get("eval_compiles"), "eval_compile_s": entry.get("eval_compile_s"),
            "results_seconds_total": res.get("seconds_total"), "total_s": round(total, 2)}
  stages["eval_s"] = (entry["seconds"] - (dqc.get("seconds") or 0.0)
                      if entry.get("seconds") is not None else None)
  scores = {n: {"psnr": d.get("psnr"), "ssim": d.get("ssim"), "seconds": d.get("seconds")}
            for n, d in entry.get("datasets", {}).items()}
  return {"method": "2dquant", "dqc_steps": c.dqc.steps, "dqc_batch": c.dqc.batch_size,
          "calib_patches": c.calib.num_patches, "cold_compile_cache": cold, "stages": stages,
          "datasets": scores, "dqc_steps_per_s": dqc.get("steps_per_s"),
          "dqc_microbatch": dqc.get("microbatch"), "dqc_final_loss": dqc.get("final_loss")}


def planned_steps(prev: dict, budget_s: float) -> tuple[int, dict]:
  """DQC steps for the pipeline section so that it ends within `budget_s`, estimated from an
  earlier run's JSON of the other sections on the same machine (the data of all sections does
  not fit one transfer to a lent GPU machine, so they may run as two calls)."""
  first = prev["fp_parity"]["highest"]["first_call_s"]
  compile_s = sum(first.values()) / len(first)  # one FP eval shape: compile + run
  est = {"eval_s": 24 * 1.5 * compile_s,  # ~20 distinct batch shapes in Set5/14/B100 at x4
         "dobi_s": 8.0 * prev["dobi"]["device_seconds"],  # 32 patches instead of 4
         "dqc_compile_s": prev["dqc_speed"]["compile_and_first_step_s"], "fixed_s": 30.0}
  steps = int((budget_s - sum(est.values())) / prev["dqc_speed"]["s_per_step"])
  return max(100, min(3000, steps)), {k: round(v, 1) for k, v in est.items()}


# What each section reads from the shared folder (data/calib: a prefix of its sorted images).
SECTION_FILES = {
    "fp_parity": ["reference/parity_x4_random.npz", "reference/swinir_light_x4_random.pth"],
    "dobi": ["reference/calib_x4.npz", "reference/standin_x4.pth"],
    "dqc_speed": ["reference/calib_x4.npz", "reference/standin_x4.pth"],
    "compiler_options": ["reference/calib_x4.npz", "reference/standin_x4.pth"],
    "pipeline": ["reference/standin_x4.pth", "data/benchmarks/Set5", "data/benchmarks/Set14",
                 "data/benchmarks/B100", "data/calib"],
}


def prepare_shared(src: Path, dest: Path, sections: list[str], limit_mb: float) -> dict:
  """Copies what `sections` read from `src` into `dest` (the repo's shared/, which the GPU
  machine's tool carries, within `limit_mb` with the repo): every file, and as many of
  data/calib's sorted images as still fit (at least 32, for DOBI's 32 patches)."""
  import shutil
  paths = sorted({p for s in sections for p in SECTION_FILES[s]})
  files = [f for p in paths if p != "data/calib"
           for f in ([src / p] if (src / p).is_file() else sorted((src / p).rglob("*")))
           if f.is_file()]
  used = sum(f.stat().st_size for f in files)
  calib = []
  if "data/calib" in paths:
    room = limit_mb * 2 ** 20 - used
    for f in sorted((src / "data" / "calib").glob("*.png")):
      if f.stat().st_size > room:
        break
      calib.append(f)
      room -= f.stat().st_size
    if len(calib) < 32:
      raise SystemExit(f"--prepare_shared: only {len(calib)} calibration images fit in "
                       f"{limit_mb} MB; raise --prepare_limit_mb or run fewer sections")
  for f in files + calib:
    target = dest / f.relative_to(src)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(f, target)
  size = sum(f.stat().st_size for f in files + calib)
  return {"dest": str(dest), "files": len(files) + len(calib), "calib_images": len(calib),
          "mb": round(size / 2 ** 20, 1)}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true", help="CPU-sized run (CI)")
  ap.add_argument("--shared", default="", help="the shared data folder (see module doc)")
  ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
  ap.add_argument("--workdir", default="", help="pipeline workdir (default: a temp folder)")
  ap.add_argument("--compile_cache", default="default",
                  help="persistent compilation cache shared by the sections ('' = off)")
  ap.add_argument("--pipeline_dqc_steps", type=int, default=3000,
                  help="DQC steps of the pipeline section (the paper's 3000; fewer only to fit "
                       "a time limit, and the JSON says how many ran)")
  ap.add_argument("--pipeline_cache", default="cold", choices=("cold", "shared"),
                  help="the pipeline section's compilation cache: 'cold' (a fresh folder, "
                       "in-memory caches cleared: the issue's measurement) or 'shared' (the one "
                       "--compile_cache set, warm from earlier sections or runs)")
  ap.add_argument("--fp_precisions", default="highest,default",
                  help="matmul precisions of the fp_parity section")
  ap.add_argument("--plan_from", default="",
                  help="with --budget_s: a JSON of this script's other sections from the same "
                       "machine, to size the pipeline's DQC steps (see planned_steps)")
  ap.add_argument("--budget_s", type=float, default=0.0)
  ap.add_argument("--json_out", default="",
                  help="also write the JSON here, rewritten after every section (a run cut "
                       "short by a time limit keeps the finished sections)")
  ap.add_argument("--prepare_shared", default="",
                  help="copy what the --only sections read from the shared folder into this "
                       "folder (e.g. shared, the repo's), then exit; run before the GPU call")
  ap.add_argument("--prepare_limit_mb", type=float, default=62.0,
                  help="size limit of --prepare_shared's copy (the GPU tool carries 64 MiB "
                       "with the repo); data/calib is cut to fit")
  args = ap.parse_args(argv)
  from twodquant_jax import host_runtime
  host_runtime.apply(host_runtime.HostSettings())  # as main.py: the default allocator, first thing
  wanted = [s for s in args.only.split(",") if s]
  bad = [s for s in wanted if s not in SECTIONS]
  if bad:
    ap.error(f"unknown sections {bad}; choose from {SECTIONS}")
  if args.prepare_shared:
    src, dest = find_shared(args.shared), Path(args.prepare_shared).resolve()
    if src == dest:
      ap.error(f"--prepare_shared: {dest} is the source; pass --shared=<the full shared folder>")
    print(json.dumps(prepare_shared(src, dest, wanted, args.prepare_limit_mb)))
    return 0
  t_start = time.perf_counter()
  plan = None
  if args.plan_from and args.budget_s > 0:
    steps, est = planned_steps(json.loads(Path(args.plan_from).read_text()), args.budget_s)
    args.pipeline_dqc_steps = min(args.pipeline_dqc_steps, steps)
    plan = {"budget_s": args.budget_s, "estimates": est, "dqc_steps": args.pipeline_dqc_steps}
  out = {"smoke": args.smoke, "backend": jax.default_backend(),
         "device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
         "jax": jax.__version__}
  if plan:
    out["plan"] = plan
  shared = find_shared(args.shared)
  from twodquant_jax import compile_cache
  compile_cache.enable(args.compile_cache)
  work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
  for name in wanted:
    t0 = time.perf_counter()
    try:
      if name == "pipeline":
        result = pipeline(shared, args.smoke, work, args.pipeline_dqc_steps,
                          cold=args.pipeline_cache == "cold")
      elif name == "fp_parity":
        result = fp_parity(shared, args.smoke, tuple(args.fp_precisions.split(",")))
      else:
        result = globals()[name](shared, args.smoke)
      out[name] = {"ok": True, **result}
    except Exception as e:  # pylint: disable=broad-except
      out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                   "trace": traceback.format_exc(limit=4)[-1500:]}
    out[name]["wall_s"] = round(time.perf_counter() - t0, 2)
    out["wall_s"] = round(time.perf_counter() - t_start, 2)
    print(f"gpu_check: {name} done in {out[name]['wall_s']} s (ok={out[name]['ok']})",
          file=sys.stderr, flush=True)
    if args.json_out:
      Path(args.json_out).write_text(json.dumps(out, default=str, indent=1))
  out["wall_s"] = round(time.perf_counter() - t_start, 2)
  if args.json_out:
    Path(args.json_out).write_text(json.dumps(out, default=str, indent=1))
  print(json.dumps(out, default=str))
  return 0 if all(out[s]["ok"] for s in wanted) else 1


if __name__ == "__main__":
  sys.exit(main())
