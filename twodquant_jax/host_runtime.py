"""Host process settings that must be made before the JAX backend starts (main.py applies them).

Nothing here restarts or re-executes the process: what can only be chosen before Python starts
(the allocator) is the user's command line, and this module adapts to it.

1. `malloc` ('auto' | 'tcmalloc' | 'keep' | 'system'): the allocator XLA:CPU's host buffers come
from. XLA:CPU allocates each execution's temporary buffer with malloc and frees it afterwards
(7.5 GB for a batch-4 x4 DQC step), plus ~2.4 M small and medium blocks a step from its worker
threads. Under glibc's defaults the large block is a fresh `mmap` every step, page-faulted and
zero-filled again: a third of the step's CPU time on a 2-core machine
(docs/measured/speed-cpu-gpu.md).

- 'auto' (the default): tcmalloc if it is already loaded (the user preloaded it; Colab does),
  else 'keep', else (no glibc `mallopt`, e.g. musl or macOS) 'system'.
- 'keep': glibc stays, with three documented `mallopt` parameters: one arena (threads share the
  main heap, so large blocks come from `brk` there), no `mmap` for large blocks, no trimming.
  Freed buffers are reused by the next step; the resident size stays at its peak.
- 'tcmalloc': gperftools' tcmalloc, which must be preloaded (an allocator cannot be swapped in a
  running process); anything else is an error. Its per-thread caches serve the worker threads'
  blocks without glibc's arena lock and it reuses the large buffer: a batch-4 DQC step
  2.4 -> 2.2 s on 2 cores, no slow first steps, half the resident memory of 'keep'
  (docs/measured/speed-cpu-gpu.md). To use it (Debian/Ubuntu: `apt-get install
  libtcmalloc-minimal4`):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python main.py --config=...

  (`export TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=1099511627776` first silences its report of
  every block over 1 GB on stderr: XLA:CPU's step buffer is one.)

- 'system': glibc as it is.

2. `cpu_devices`: how many XLA devices the CPU backend shows. A data-parallel DQC step split over
two CPU devices of a 2-core machine runs its two halves concurrently and keeps both cores busy
(one device leaves ~17 % of the CPU time idle between its mostly sequential ops): 3.49 -> 2.96 s
per batch-4 step here; four devices were slower (3.35 s). 0 ('auto'): a count the user set in
`XLA_FLAGS=--xla_force_host_platform_device_count=N` (or JAX's own `JAX_NUM_CPU_DEVICES=N`) is
kept; else one device per usable core, dividing the DQC batch, for a single-process run that
trains DQC; else 1.

Both only take effect before the backend starts (the allocator's arenas are per thread, the
device count is read when the CPU client is made): call `apply` first thing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import sys
from pathlib import Path

import jax
from absl import logging

from twodquant_jax.settings import MALLOC_POLICIES, HostSettings

POLICIES = MALLOC_POLICIES
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
MAX_AUTO_CPU_DEVICES = 8  # measured: 2 on a 2-core machine; more cores are an untested guess
# XLA:CPU aborts the process when a device thread of an in-process collective has not left the
# rendezvous within this many seconds (default 40). On a 2-core machine loaded ~10x, a 2-device
# DQC run died that way ("Termination timeout for `all reduce ...` of 40 seconds exceeded").
# A slow thread should only slow the run, so `apply` raises the limit unless the user set it.
TERMINATE_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"
TERMINATE_TIMEOUT_S = 600
_TCMALLOC_NAMES = ("tcmalloc_minimal", "tcmalloc")
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
             "/usr/local/lib")
_EXAMPLE_TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"

# glibc <malloc.h> parameter numbers (stable ABI).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


# --- the allocator ---------------------------------------------------------------------------

def keep_freed_memory() -> bool:
  """Applies the 'keep' policy; returns whether it took effect (False off glibc, e.g. macOS)."""
  libc = _libc()
  mallopt = getattr(libc, "mallopt", None)
  if mallopt is None:  # not glibc (musl has no mallopt): nothing to tune
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  ok = all(mallopt(param, value) == 1 for param, value in
           ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  if not ok:
    logging.warning("host_malloc=keep: glibc refused a mallopt parameter; left as it was")
  return ok


def loaded_tcmalloc(maps: str | None = None) -> str | None:
  """Path of the tcmalloc mapped into this process (from /proc/self/maps), or None."""
  if maps is None:
    try:
      maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
      return None
  for line in maps.splitlines():
    fields = line.split(None, 5)
    path = fields[5] if len(fields) == 6 else ""
    if path.startswith("/") and "tcmalloc" in Path(path).name:
      return path
  return None


def find_tcmalloc() -> str | None:
  """An installed tcmalloc shared library in the usual system places (for the error message)."""
  if not sys.platform.startswith("linux"):
    return None
  for name in _TCMALLOC_NAMES:
    for folder in _LIB_DIRS:
      for candidate in sorted(Path(folder).glob(f"lib{name}.so*")):
        if candidate.is_file() and "debug" not in candidate.name:
          return str(candidate)
  return None


def malloc_plan(policy: str, loaded: str | None, installed: str | None) -> str:
  """The allocator to use: 'tcmalloc' (it is `loaded`, whatever the policy: a preload cannot be
  undone), 'keep' (tune glibc; 'system' where that is impossible) or 'system'.

  Pure decision (tested). 'tcmalloc' without it loaded is a ValueError whose one line is the
  command to run: with the `installed` library, or how to install one.
  """
  if policy not in POLICIES:
    raise ValueError(f"config.host_malloc must be one of {POLICIES}, got {policy!r}")
  if loaded:
    return "tcmalloc"
  if policy == "tcmalloc":
    how = (f"run LD_PRELOAD={installed} python main.py ..." if installed else
           f"apt-get install libtcmalloc-minimal4, then run LD_PRELOAD={_EXAMPLE_TCMALLOC} "
           "python main.py ...")
    raise ValueError(f"host_malloc=tcmalloc needs tcmalloc preloaded: {how} (or use "
                     "host_malloc=auto)")
  return "system" if policy == "system" else "keep"


def apply_malloc(policy: str) -> str:
  """Applies a malloc policy in this process; returns the allocator in use ('tcmalloc', 'keep'
  or 'system'). Never restarts the process."""
  loaded = loaded_tcmalloc()
  plan = malloc_plan(policy, loaded, None if loaded or policy != "tcmalloc" else find_tcmalloc())
  if plan == "keep" and not keep_freed_memory():
    return "system"
  return plan


def _libc():
  """glibc's handle, or None off glibc (macOS, musl: no mallopt / malloc_trim)."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc_trim  # pylint: disable=pointless-statement
  except (OSError, AttributeError):
    return None
  return libc


def release_heap() -> bool:
  """Returns the heap's free pages to the system (glibc `malloc_trim(0)`); False where there is
  no glibc or tcmalloc serves malloc.

  The 'keep' policy never trims on its own (that is what keeps a DQC step's buffer mapped from one
  step to the next), so without this the resident size after evaluation stays at its peak:
  `malloc_trim(0)` releases every whole free page, also inside the heap (MADV_DONTNEED), while
  the heap's layout stays: the next DQC step's buffer reuses those addresses (page faults on the
  first step only). Call it at the pipeline's release points (before and after DQC).
  """
  libc = None if loaded_tcmalloc() else _libc()
  if libc is None:
    return False
  libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
  libc.malloc_trim(0)
  return True


# --- the resident size -----------------------------------------------------------------------

def resident_bytes(status: str | None = None) -> dict[str, int] | None:
  """{'rss': resident bytes now, 'peak': the process's high-water mark} from /proc/self/status
  (VmRSS, VmHWM), or None off Linux."""
  if status is None:
    try:
      status = Path("/proc/self/status").read_text()
    except OSError:
      return None
  found = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, flags=re.M))
  if "VmRSS" not in found:
    return None
  rss = int(found["VmRSS"]) * 1024
  return {"rss": rss, "peak": int(found.get("VmHWM", 0)) * 1024 or rss}


def log_resident(stage: str) -> dict[str, int] | None:
  """Logs `memory <stage>: resident X GB (peak Y GB)` (a progress line too); returns the sizes."""
  now = resident_bytes()
  if now is not None:
    logging.info("memory %s: resident %.2f GB (peak %.2f GB)", stage, now["rss"] / 1e9,
                 now["peak"] / 1e9)
  return now


# --- the CPU device count --------------------------------------------------------------------

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


def flagged_cpu_devices(xla_flags: str) -> int | None:
  """The CPU device count named in an XLA_FLAGS value (the last one counts, as in XLA), or None."""
  counts = re.findall(rf"(?:^|\s){DEVICE_COUNT_FLAG}=(\S*)", xla_flags)
  if not counts:
    return None
  if not counts[-1].isdigit() or int(counts[-1]) < 1:
    raise ValueError(f"XLA_FLAGS {DEVICE_COUNT_FLAG}={counts[-1]} is not a positive count; fix "
                     "or remove it")
  return int(counts[-1])


def preset_cpu_devices(xla_flags: str, jax_num_cpu_devices: int) -> tuple[int, str] | None:
  """A CPU device count the user set before `apply`, and where: JAX's jax_num_cpu_devices
  ($JAX_NUM_CPU_DEVICES; -1 = unset), which JAX itself prefers, else XLA_FLAGS' count."""
  if jax_num_cpu_devices >= 1:
    return jax_num_cpu_devices, "JAX_NUM_CPU_DEVICES"
  flagged = flagged_cpu_devices(xla_flags)
  return None if flagged is None else (flagged, f"XLA_FLAGS {DEVICE_COUNT_FLAG}")


def cpu_device_plan(settings: HostSettings, preset: tuple[int, str] | None, cores: int
                    ) -> tuple[int, str]:
  """(device count, where it comes from: the `preset`'s place, 'config' or 'auto'). Pure
  decision (tested). A count the user preset wins over 'auto'; a different explicit count is
  a ValueError."""
  if preset is not None:
    count, where = preset
    if settings.cpu_devices and settings.cpu_devices != count:
      raise ValueError(f"config.cpu_devices={settings.cpu_devices} conflicts with {where}={count}"
                       "; drop one of them (or make them equal)")
    return count, where
  if settings.cpu_devices:
    return settings.cpu_devices, "config"
  return (auto_cpu_devices(settings.dqc_batch, cores) if settings.dqc_batch else 1), "auto"


def apply(settings: HostSettings) -> dict:
  """Applies both settings in this process; returns what took effect: {'malloc': allocator,
  'cpu_devices': count}. Call before anything touches a device."""
  malloc = apply_malloc(settings.malloc)
  preset = preset_cpu_devices(os.environ.get("XLA_FLAGS", ""), jax.config.jax_num_cpu_devices)
  devices, source = cpu_device_plan(settings, preset, usable_cores())
  if preset is not None:
    logging.info("host: %d CPU device(s), as %s sets", devices, source)
  elif devices > 1:
    jax.config.update("jax_num_cpu_devices", devices)
  if devices > 1:
    os.environ["XLA_FLAGS"] = with_terminate_timeout(os.environ.get("XLA_FLAGS", ""))
  return {"malloc": malloc, "cpu_devices": devices}


def with_terminate_timeout(xla_flags: str) -> str:
  """XLA_FLAGS with the collective termination limit raised to TERMINATE_TIMEOUT_S, unless the
  user's flags already set it."""
  if TERMINATE_FLAG in xla_flags:
    return xla_flags
  return f"{xla_flags} {TERMINATE_FLAG}={TERMINATE_TIMEOUT_S}".strip()
