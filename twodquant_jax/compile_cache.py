"""The persistent XLA compilation cache: compiled steps survive the process, so a second run of
the same configuration (or a resumed one) does not recompile (about a minute per DQC step on CPU).

Set once at startup by `pipeline.run` from `config.compile_cache` ('default': `xla/` in the
project cache, $TWODQUANT_CACHE or ~/.cache/twodquant_jax; a path; empty: off).
"""

from __future__ import annotations

from pathlib import Path

import jax

from twodquant_jax import cache

DEFAULT = "default"  # <$TWODQUANT_CACHE or ~/.cache/twodquant_jax>/xla, beside the other caches


def enable(cache_dir: str) -> Path | None:
  """Turns the persistent compilation cache on in `cache_dir` (created; '~' expanded), caching
  every compile (also the fast CPU ones and small entries). Empty string: leaves it off.
  Returns the folder, or None when off."""
  if not cache_dir:
    return None
  path = cache.subdir("xla", "" if cache_dir == DEFAULT else cache_dir).resolve()
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


# Compiler options, per use and backend kind, in one place. Only measured choices are set:
# - evaluation on a GPU turns XLA's GEMM autotuning off: an evaluation runs each compiled shape a
#   handful of times, so autotuned kernels never pay back their search (an H200, matmul precision
#   'highest': 25-27 s -> 9-10 s per compile, calls 3-4 -> 4-7 ms; docs/measured/gpu/);
# - the DQC step on XLA:CPU uses the memory-optimised scheduler: XLA's need for a batch-4 step
#   2.69 -> 2.34 GB per device at the same step time (4.35 vs 4.46 CPU s, A/B in one process),
#   and without it a rematerialised unrolled step keeps its recomputation alive and saves
#   nothing (2.77 GB; docs/measured/memory.md#remat); the DQC step keeps the defaults elsewhere;
# - XLA:CPU: none of the backend options tried lowers the compile (docs/measured/compile-options.md).
COMPILER_OPTIONS = {("eval", "gpu"): {"xla_gpu_autotune_level": 0},
                    ("train", "cpu"): {"xla_cpu_scheduler_type":
                                       "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}}

# What `gpu_check.sh --only compiler_options` compares against the defaults, per backend kind
# (`benchmarks/compile_options.py` tries more on the CPU).
CANDIDATE_OPTIONS = {
    "gpu": {"autotune_off": {"xla_gpu_autotune_level": 0}},
    "cpu": {"fast_compile": {"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_COMPILE"}},
}


def backend_kind(backend: str | None = None) -> str:
  """'gpu' for CUDA / ROCm, else the backend's name ('cpu', 'tpu')."""
  backend = backend or jax.default_backend()
  return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def compiler_options(use: str, backend: str | None = None) -> dict | None:
  """The compiler options for `use` ('eval' or 'train') on `backend` (default: jax's), or None
  for XLA's defaults; pass to `jax.jit(..., compiler_options=...)`."""
  return COMPILER_OPTIONS.get((use, backend_kind(backend)))
