"""Host settings. host_malloc=keep: freed large blocks are reused instead of being unmapped and
faulted back in. host_malloc=auto/tcmalloc: the process re-executes itself once with the library
preloaded, and only when it has one and has not got it loaded yet.

Each case runs in a fresh interpreter (the policy must be set before other threads allocate, and
is process-wide). It allocates (malloc, as XLA:CPU does) and touches a 256 MB buffer, frees it, then allocates and touches
another: under glibc's defaults the second buffer is a fresh mmap (one page fault per 4 KB page,
~65 k), under 'keep' it is the freed block again (almost no faults).
"""

import json
import os
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


def _glibc_env() -> dict:
  """This environment without a preloaded allocator (e.g. Colab's tcmalloc): glibc's malloc."""
  return {k: v for k, v in os.environ.items()
          if k not in ("LD_PRELOAD", host_runtime.PRELOADED_ENV)}


def _probe(policy: str) -> dict:
  out = subprocess.run([sys.executable, "-c", PROBE, policy], capture_output=True, text=True,
                       check=True, timeout=120, env=_glibc_env())
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc policy (Linux)")
def test_keep_reuses_freed_memory():
  system, keep = _probe("system"), _probe("keep")
  assert (system["applied"], keep["applied"]) == ("system", "keep")
  assert system["faults"] > PAGES // 2, system  # the default: every page faulted in again
  assert keep["faults"] < PAGES // 20, keep  # keep: the freed block is reused


def test_unknown_policy_is_refused():
  with pytest.raises(ValueError, match="host_malloc"):
    host_runtime.apply_malloc("jemalloc")
  with pytest.raises(ValueError, match="host_malloc"):
    host_runtime.HostSettings(malloc="jemalloc")
  with pytest.raises(ValueError, match="cpu_devices"):
    host_runtime.HostSettings(cpu_devices=-1)  # 0 is auto


def test_auto_cpu_devices_divides_the_batch():
  assert host_runtime.auto_cpu_devices(4, cores=2) == 2
  assert host_runtime.auto_cpu_devices(32, cores=2) == 2
  assert host_runtime.auto_cpu_devices(3, cores=2) == 1  # 2 does not divide 3
  assert host_runtime.auto_cpu_devices(6, cores=4) == 3
  assert host_runtime.auto_cpu_devices(32, cores=64) == host_runtime.MAX_AUTO_CPU_DEVICES
  assert host_runtime.auto_cpu_devices(1, cores=16) == 1


def test_preload_decision():
  lib, env = "/usr/lib/libtcmalloc_minimal.so.4", {}
  target = host_runtime.preload_target
  assert target("auto", env, None, lib) == lib  # installed, not loaded: re-execute with it
  assert target("tcmalloc", env, None, lib) == lib
  assert target("auto", env, lib, lib) is None  # already loaded (e.g. Colab's LD_PRELOAD)
  assert target("auto", env, None, None) is None  # none installed: go on with glibc
  assert target("keep", env, None, lib) is None and target("system", env, None, lib) is None
  with pytest.raises(ValueError, match="no libtcmalloc found"):
    target("tcmalloc", env, None, None)
  tried = {host_runtime.PRELOADED_ENV: lib}  # re-executed, yet not loaded: never loop
  assert target("auto", tried, None, lib) is None
  with pytest.raises(ValueError, match="not in the process"):
    target("tcmalloc", tried, None, lib)
  with pytest.raises(ValueError, match="host_malloc"):
    target("jemalloc", env, None, lib)


def test_loaded_tcmalloc_reads_the_memory_map():
  maps = ("7f00-7f10 r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libm.so.6\n"
          "7f20-7f30 r-xp 00000000 08:01 43 /usr/lib/x86_64-linux-gnu/libtcmalloc.so.4.5.10\n"
          "7f40-7f50 rw-p 00000000 00:00 0 \n")
  assert host_runtime.loaded_tcmalloc(maps) == "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4.5.10"
  assert host_runtime.loaded_tcmalloc(maps.splitlines()[0]) is None


REEXEC_PROBE = r"""
import json, os, sys
from twodquant_jax import host_runtime
print("start", flush=True)
host_runtime.preload_allocator(sys.argv[1])  # re-executes this command when it has to
print(json.dumps({"argv": sys.argv[1:], "malloc": host_runtime.apply_malloc(sys.argv[1]),
                  "as_system": host_runtime.apply_malloc("system"),
                  "loaded": host_runtime.loaded_tcmalloc(),
                  "ld_preload": os.environ.get("LD_PRELOAD", "")}))
"""


def _mapped_libm() -> str:
  paths = [ln.split()[-1] for ln in open("/proc/self/maps") if "/libm.so" in ln or "/libm-" in ln]
  if not paths:
    pytest.fail("no libm mapped into this Python: cannot build the stand-in allocator")
  return paths[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc (Linux)")
def test_reexec_preloads_the_named_library_once(tmp_path):
  """The re-exec mechanism, with a copy of libm standing in for tcmalloc (named by
  $TWODQUANT_TCMALLOC, as a user would name theirs): the command runs twice (once before the
  exec), its arguments survive, and the library is mapped into the second run."""
  import shutil
  fake = tmp_path / "libstandin_alloc.so"
  shutil.copy(_mapped_libm(), fake)
  env = {**_glibc_env(), host_runtime.TCMALLOC_ENV: str(fake)}
  out = subprocess.run([sys.executable, "-c", REEXEC_PROBE, "tcmalloc", "--an=arg"], env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert lines.count("start") == 2, lines  # ran, re-executed, ran again
  res = json.loads(lines[-1])
  assert res["argv"] == ["tcmalloc", "--an=arg"]
  assert res["loaded"] == os.path.realpath(fake) and res["malloc"] == "tcmalloc"
  assert res["as_system"] == "tcmalloc"  # what is in use, whatever the policy says
  assert res["ld_preload"].split(":")[0] == os.path.realpath(fake)
  # A bad name is one clear error, not a loop or a crash of the dynamic loader.
  env[host_runtime.TCMALLOC_ENV] = str(tmp_path / "missing.so")
  out = subprocess.run([sys.executable, "-c", REEXEC_PROBE, "tcmalloc"], env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "which is not a file" in out.stderr
  assert out.stdout.strip().splitlines() == ["start"]
