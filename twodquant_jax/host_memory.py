"""Host malloc policy: keep freed memory in the process instead of handing it back to the kernel.

Why: XLA:CPU allocates each execution's temporary buffer with malloc and frees it afterwards
(7.5 GB for a batch-4 x4 DQC step). glibc serves blocks that large with a fresh `mmap` (from any
thread's own arena, whatever `M_MMAP_THRESHOLD` says) and `munmap`s them on free, so every step
page-faults and zero-fills the whole buffer again: 1.8 M page faults and ~3.4 s of kernel time
per step on a 2-core machine, a third of the step's CPU time (docs/measured/issue11_figures.md).

`keep_freed_memory()` sets three documented glibc `mallopt` parameters: one arena (threads share
the main heap, so large blocks come from `brk` there), no `mmap` for large blocks, no trimming.
Freed buffers are then reused by the next step. The resident size stays at its peak (the step's
own working set), which is why this is a setting (`host_malloc`: 'keep' | 'system').

It only affects threads that have not allocated yet: call it at startup, before the JAX backend
starts its thread pools (main.py does, before anything touches a device).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

POLICIES = ("keep", "system")

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


def apply(policy: str) -> bool:
  """Applies `policy` ('keep' or 'system', the latter changes nothing); returns whether the
  'keep' policy took effect."""
  if policy not in POLICIES:
    raise ValueError(f"host_malloc must be one of {POLICIES}, got {policy!r}")
  return keep_freed_memory() if policy == "keep" else False
