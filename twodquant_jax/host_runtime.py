"""Host process settings that must be made before the JAX backend starts (main.py applies them).

1. `malloc` ('keep' | 'system'): keep freed memory in the process instead of handing it back to
the kernel. Why: XLA:CPU allocates each execution's temporary buffer with malloc and frees it
afterwards (7.5 GB for a batch-4 x4 DQC step). glibc serves blocks that large with a fresh
`mmap` (from any thread's own arena, whatever `M_MMAP_THRESHOLD` says) and `munmap`s them on
free, so every step page-faults and zero-fills the whole buffer again: 1.8 M page faults and
~3.4 s of kernel time per step on a 2-core machine, a third of the step's CPU time
(docs/measured/issue11_figures.md).

`keep_freed_memory()` sets three documented glibc `mallopt` parameters: one arena (threads share
the main heap, so large blocks come from `brk` there), no `mmap` for large blocks, no trimming.
Freed buffers are then reused by the next step. The resident size stays at its peak (the step's
own working set), which is why this is a setting (`host_malloc`: 'keep' | 'system').

2. `cpu_devices`: how many XLA devices the CPU backend shows. A data-parallel DQC step split over
two CPU devices of a 2-core machine runs its two halves concurrently and keeps both cores busy
(one device leaves ~17 % of the CPU time idle between its mostly sequential ops): 3.5 -> 2.96 s
per batch-4 step here; four devices were slower (3.35 s). `auto_cpu_devices` picks it.

Both only take effect before the backend starts (the allocator's arenas are per thread, the
device count is read when the CPU client is made): call `apply` first thing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import sys

import jax
from absl import logging

POLICIES = ("keep", "system")
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


def apply_malloc(policy: str) -> bool:
  """Applies a malloc policy ('keep', or 'system' which changes nothing); returns whether the
  'keep' policy took effect."""
  if policy not in POLICIES:
    raise ValueError(f"host_malloc must be one of {POLICIES}, got {policy!r}")
  return keep_freed_memory() if policy == "keep" else False


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


@dataclasses.dataclass(frozen=True)
class HostSettings:
  """config.host_malloc and the resolved config.cpu_devices (settings.host_settings)."""
  malloc: str = "keep"
  cpu_devices: int = 1

  def __post_init__(self):
    if self.malloc not in POLICIES:
      raise ValueError(f"config.host_malloc must be one of {POLICIES}, got {self.malloc!r}")
    if isinstance(self.cpu_devices, bool) or not isinstance(self.cpu_devices, int) or \
        self.cpu_devices < 1:
      raise ValueError(f"config.cpu_devices must be 'auto' or a positive int, got "
                       f"{self.cpu_devices!r}")


def apply(settings: HostSettings) -> dict:
  """Applies both settings; returns what took effect. Call before anything touches a device."""
  kept = apply_malloc(settings.malloc)
  if settings.cpu_devices > 1:
    jax.config.update("jax_num_cpu_devices", settings.cpu_devices)
  return {"malloc_keep": kept, "cpu_devices": settings.cpu_devices}
