"""Host process settings that must be made before the JAX backend starts (main.py applies them).

1. `malloc` ('auto' | 'tcmalloc' | 'keep' | 'system'): the allocator XLA:CPU's host buffers come
from. XLA:CPU allocates each execution's temporary buffer with malloc and frees it afterwards
(7.5 GB for a batch-4 x4 DQC step), plus ~2.4 M small and medium blocks a step from its worker
threads. Under glibc's defaults the large block is a fresh `mmap` every step, page-faulted and
zero-filled again: a third of the step's CPU time on a 2-core machine
(docs/measured/issue11_figures.md).

- 'tcmalloc': the process re-executes itself once with gperftools' tcmalloc in `LD_PRELOAD`
  (`preload_allocator`; the library must be installed, e.g. `apt-get install
  libtcmalloc-minimal4`, or named by $TWODQUANT_TCMALLOC). Its per-thread caches serve the
  worker threads' blocks without glibc's arena lock and it reuses the large buffer: a batch-4
  DQC step 2.4 -> 2.2 s on 2 cores, no slow first steps, half the resident memory of 'keep'
  (docs/measured/issue11_figures.md, session 4). An allocator can only
  be swapped before the process starts, hence the re-exec (Colab already preloads tcmalloc).
- 'keep': glibc stays, with three documented `mallopt` parameters: one arena (threads share the
  main heap, so large blocks come from `brk` there), no `mmap` for large blocks, no trimming.
  Freed buffers are reused by the next step; the resident size stays at its peak.
- 'auto' (the default): tcmalloc when it is installed, else 'keep'. 'system': glibc as it is.

2. `cpu_devices`: how many XLA devices the CPU backend shows. A data-parallel DQC step split over
two CPU devices of a 2-core machine runs its two halves concurrently and keeps both cores busy
(one device leaves ~17 % of the CPU time idle between its mostly sequential ops): 3.5 -> 2.96 s
per batch-4 step here; four devices were slower (3.35 s). `auto_cpu_devices` picks it.

All of this only takes effect before the backend starts (the allocator's arenas are per thread,
the device count is read when the CPU client is made): call `preload_allocator` and `apply` first
thing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path
from typing import Mapping

import jax
from absl import logging

from twodquant_jax.settings import MALLOC_POLICIES, HostSettings

POLICIES = MALLOC_POLICIES
TCMALLOC_ENV = "TWODQUANT_TCMALLOC"  # a user's libtcmalloc path (otherwise it is searched for)
PRELOADED_ENV = "TWODQUANT_PRELOADED"  # set on the re-executed process: what it preloaded
_TCMALLOC_NAMES = ("tcmalloc_minimal", "tcmalloc")
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
             "/usr/local/lib")
MAX_AUTO_CPU_DEVICES = 8  # measured: 2 on a 2-core machine; more cores are an untested guess

# glibc <malloc.h> parameter numbers (stable ABI).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_memory() -> bool:
  """Applies the 'keep' policy; returns whether it took effect (False off glibc, e.g. macOS)."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  ok = all(mallopt(param, value) == 1 for param, value in
           ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  if not ok:
    logging.warning("host_malloc=keep: glibc refused a mallopt parameter; left as it was")
  return ok


def loaded_tcmalloc(maps: str | None = None) -> str | None:
  """Path of the tcmalloc mapped into this process (from /proc/self/maps), or None. The library
  this process was re-executed with (`$TWODQUANT_PRELOADED`) counts whatever its name."""
  if maps is None:
    try:
      maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
      return None
  preloaded = os.environ.get(PRELOADED_ENV, "")
  preloaded = os.path.realpath(preloaded) if preloaded else ""
  for line in maps.splitlines():
    fields = line.split(None, 5)
    path = fields[5] if len(fields) == 6 else ""
    if path.startswith("/") and ("tcmalloc" in Path(path).name or path == preloaded):
      return path
  return None


def find_tcmalloc(env: Mapping[str, str] | None = None) -> str | None:
  """An installed tcmalloc shared library: $TWODQUANT_TCMALLOC, else the usual system places."""
  env = os.environ if env is None else env
  if env.get(TCMALLOC_ENV):
    path = Path(env[TCMALLOC_ENV]).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f"${TCMALLOC_ENV} names {path}, which is not a file")
    return str(path.resolve())
  if not sys.platform.startswith("linux"):
    return None
  for name in _TCMALLOC_NAMES:
    for folder in _LIB_DIRS:
      for candidate in sorted(Path(folder).glob(f"lib{name}.so*")):
        if candidate.is_file() and "debug" not in candidate.name:
          return str(candidate.resolve())
  return None


def preload_target(policy: str, env: Mapping[str, str], loaded: str | None,
                   found: str | None) -> str | None:
  """The library this process should re-execute itself with, or None to go on as it is.

  Pure decision (tested): `loaded` is the tcmalloc already in the process, `found` an installed
  one. Raises ValueError for 'tcmalloc' when none can be had; a re-executed process whose
  preload did not take (env names it, yet it is not loaded) never re-executes again.
  """
  if policy not in POLICIES:
    raise ValueError(f"config.host_malloc must be one of {POLICIES}, got {policy!r}")
  if policy not in ("auto", "tcmalloc") or loaded:
    return None
  if env.get(PRELOADED_ENV):
    if policy == "tcmalloc":
      raise ValueError(f"host_malloc=tcmalloc: {env[PRELOADED_ENV]} was preloaded but is not "
                       "in the process (not a tcmalloc library?)")
    return None
  if found is None and policy == "tcmalloc":
    raise ValueError("host_malloc=tcmalloc: no libtcmalloc found; install it (e.g. apt-get "
                     f"install libtcmalloc-minimal4), set ${TCMALLOC_ENV}, or use "
                     "host_malloc=auto")
  return found


def preload_allocator(policy: str) -> None:
  """For 'auto'/'tcmalloc': re-executes this very command with tcmalloc in LD_PRELOAD when it is
  installed and not yet loaded (does not return then). Call before any real work."""
  loaded = loaded_tcmalloc()
  target = preload_target(policy, os.environ, loaded, None if loaded else find_tcmalloc())
  if target is None:
    if policy == "auto" and os.environ.get(PRELOADED_ENV) and not loaded:
      logging.warning("host_malloc=auto: preloading %s did not take; using glibc (keep)",
                      os.environ[PRELOADED_ENV])
    return
  env = dict(os.environ)
  env["LD_PRELOAD"] = ":".join(p for p in (target, env.get("LD_PRELOAD", "")) if p)
  env[PRELOADED_ENV] = target
  # tcmalloc reports every block over 1 GB on stderr; XLA:CPU's step buffer is one such block.
  env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 50))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def apply_malloc(policy: str) -> str:
  """Applies a malloc policy in this process; returns the allocator now in use: 'tcmalloc'
  (loaded, whatever the policy: an LD_PRELOAD cannot be undone), 'keep' (glibc tuned) or
  'system'. 'auto' without tcmalloc means 'keep'; 'tcmalloc' without it loaded is an error
  (`preload_allocator` has to run first)."""
  if policy not in POLICIES:
    raise ValueError(f"host_malloc must be one of {POLICIES}, got {policy!r}")
  if loaded_tcmalloc():
    return "tcmalloc"
  if policy == "tcmalloc":
    raise ValueError("host_malloc=tcmalloc: tcmalloc is not loaded in this process "
                     "(host_runtime.preload_allocator re-executes with it)")
  if policy in ("auto", "keep") and keep_freed_memory():
    return "keep"
  return "system"


def usable_cores() -> int:
  """CPU cores this process may run on (its affinity mask, else the machine's count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def auto_cpu_devices(batch_size: int, cores: int | None = None) -> int:
  """CPU devices for a data-parallel DQC batch: the largest divisor of the batch that is at most
  the number of usable cores (and MAX_AUTO_CPU_DEVICES), so every device gets whole samples."""
  cap = max(1, min(cores or usable_cores(), MAX_AUTO_CPU_DEVICES, batch_size))
  return max(d for d in range(1, cap + 1) if batch_size % d == 0)


def apply(settings: HostSettings) -> dict:
  """Applies both settings; returns what took effect. Call before anything touches a device:
  with malloc 'auto' or 'tcmalloc' it may re-execute the process first (`preload_allocator`)."""
  preload_allocator(settings.malloc)
  malloc = apply_malloc(settings.malloc)
  devices = settings.cpu_devices or (auto_cpu_devices(settings.dqc_batch)
                                     if settings.dqc_batch >= 1 else 1)
  if devices > 1:
    jax.config.update("jax_num_cpu_devices", devices)
  return {"malloc": malloc, "cpu_devices": devices}
