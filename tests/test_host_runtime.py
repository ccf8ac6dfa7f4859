"""Host settings. host_malloc=keep: freed large blocks are reused instead of being unmapped and faulted back in.

Each case runs in a fresh interpreter (the policy must be set before other threads allocate, and
is process-wide). It allocates (malloc, as XLA:CPU does) and touches a 256 MB buffer, frees it, then allocates and touches
another: under glibc's defaults the second buffer is a fresh mmap (one page fault per 4 KB page,
~65 k), under 'keep' it is the freed block again (almost no faults).
"""

import json
import subprocess
import sys

import pytest

from twodquant_jax import host_runtime

PROBE = r"""
import ctypes, json, resource, sys
from twodquant_jax import host_runtime
applied = host_runtime.apply_malloc(sys.argv[1])
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
n = 256 * 2**20
a = libc.malloc(n); ctypes.memset(a, 1, n); libc.free(a)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = libc.malloc(n); ctypes.memset(b, 1, n)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults}))
"""

PAGES = 256 * 2**20 // 4096


def _probe(policy: str) -> dict:
  out = subprocess.run([sys.executable, "-c", PROBE, policy], capture_output=True, text=True,
                       check=True, timeout=120)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc policy (Linux)")
def test_keep_reuses_freed_memory():
  system, keep = _probe("system"), _probe("keep")
  assert not system["applied"] and keep["applied"]
  assert system["faults"] > PAGES // 2, system  # the default: every page faulted in again
  assert keep["faults"] < PAGES // 20, keep  # keep: the freed block is reused


def test_unknown_policy_is_refused():
  with pytest.raises(ValueError, match="host_malloc"):
    host_runtime.apply_malloc("tcmalloc")
  with pytest.raises(ValueError, match="host_malloc"):
    host_runtime.HostSettings(malloc="tcmalloc")
  with pytest.raises(ValueError, match="cpu_devices"):
    host_runtime.HostSettings(cpu_devices=0)


def test_auto_cpu_devices_divides_the_batch():
  assert host_runtime.auto_cpu_devices(4, cores=2) == 2
  assert host_runtime.auto_cpu_devices(32, cores=2) == 2
  assert host_runtime.auto_cpu_devices(3, cores=2) == 1  # 2 does not divide 3
  assert host_runtime.auto_cpu_devices(6, cores=4) == 3
  assert host_runtime.auto_cpu_devices(32, cores=64) == host_runtime.MAX_AUTO_CPU_DEVICES
  assert host_runtime.auto_cpu_devices(1, cores=16) == 1
