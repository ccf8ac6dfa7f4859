"""Host settings. host_malloc=keep: freed large blocks are reused instead of being unmapped and
faulted back in. host_malloc=auto/tcmalloc: tcmalloc is used only when the user preloaded it,
and the process never re-executes itself. cpu_devices=auto keeps a count set in XLA_FLAGS.

Each allocator case runs in a fresh interpreter (the policy must be set before other threads
allocate, and is process-wide). It allocates (malloc, as XLA:CPU does) and touches a 256 MB
buffer, frees it, then allocates and touches another: under glibc's defaults the second buffer
is a fresh mmap (one page fault per 4 KB page, ~65 k), under 'keep' it is the freed block again
(almost no faults).
"""

import json
import os
import shutil
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
  return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


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
    host_runtime.HostSettings(cpu_devices=-1)
  with pytest.raises(ValueError, match="dqc_batch"):
    host_runtime.HostSettings(dqc_batch=-4)


def test_auto_cpu_devices_divides_the_batch():
  assert host_runtime.auto_cpu_devices(4, cores=2) == 2
  assert host_runtime.auto_cpu_devices(32, cores=2) == 2
  assert host_runtime.auto_cpu_devices(3, cores=2) == 1  # 2 does not divide 3
  assert host_runtime.auto_cpu_devices(6, cores=4) == 3
  assert host_runtime.auto_cpu_devices(32, cores=64) == host_runtime.MAX_AUTO_CPU_DEVICES
  assert host_runtime.auto_cpu_devices(1, cores=16) == 1


def test_malloc_plan():
  lib = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
  plan = host_runtime.malloc_plan
  for policy in host_runtime.POLICIES:  # preloaded by the user: kept and reported
    assert plan(policy, lib, None) == "tcmalloc"
  assert plan("auto", None, lib) == "keep"  # installed but not loaded: glibc, in-process
  assert plan("auto", None, None) == "keep"
  assert plan("keep", None, lib) == "keep" and plan("system", None, lib) == "system"
  with pytest.raises(ValueError, match="jemalloc"):
    plan("jemalloc", None, lib)


def test_tcmalloc_not_preloaded_is_one_line_with_the_command():
  with pytest.raises(ValueError) as found:
    host_runtime.malloc_plan("tcmalloc", None, "/opt/lib/libtcmalloc.so.4")
  msg = str(found.value)
  assert "\n" not in msg
  assert "needs tcmalloc preloaded" in msg
  assert "run LD_PRELOAD=/opt/lib/libtcmalloc.so.4 python main.py" in msg
  with pytest.raises(ValueError) as missing:
    host_runtime.malloc_plan("tcmalloc", None, None)
  assert "apt-get install libtcmalloc-minimal4" in str(missing.value)
  assert "LD_PRELOAD=" in str(missing.value) and "\n" not in str(missing.value)


def test_apply_never_reexecutes(monkeypatch):
  """Every policy is applied in this very process: no exec* call, whatever is installed."""
  def refuse(*args, **kwargs):
    raise AssertionError(f"the process re-executed itself: {args[:2]}")
  for name in ("execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp"):
    monkeypatch.setattr(os, name, refuse)
  monkeypatch.setattr(host_runtime, "find_tcmalloc", lambda: "/usr/lib/libtcmalloc_minimal.so.4")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  in_use = host_runtime.loaded_tcmalloc() and "tcmalloc"
  for policy in ("auto", "keep", "system"):
    applied = host_runtime.apply(host_runtime.HostSettings(malloc=policy))
    assert applied["malloc"] == (in_use or ("system" if policy == "system" else "keep"))
    assert applied["cpu_devices"] == 1
  if not in_use:
    with pytest.raises(ValueError, match="LD_PRELOAD=/usr/lib/libtcmalloc_minimal.so.4"):
      host_runtime.apply(host_runtime.HostSettings(malloc="tcmalloc"))


def test_loaded_tcmalloc_reads_the_memory_map():
  maps = ("7f00-7f10 r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libm.so.6\n"
          "7f20-7f30 r-xp 00000000 08:01 43 /usr/lib/x86_64-linux-gnu/libtcmalloc.so.4.5.10\n"
          "7f40-7f50 rw-p 00000000 00:00 0 \n")
  assert host_runtime.loaded_tcmalloc(maps) == "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4.5.10"
  assert host_runtime.loaded_tcmalloc(maps.splitlines()[0]) is None


PRELOADED_PROBE = r"""
import json, os
from twodquant_jax import host_runtime
print("start", os.getpid(), flush=True)
print(json.dumps({policy: host_runtime.apply_malloc(policy) for policy in host_runtime.POLICIES}
                 | {"loaded": host_runtime.loaded_tcmalloc(), "pid": os.getpid()}))
"""


def _mapped_libm() -> str:
  paths = [ln.split()[-1] for ln in open("/proc/self/maps") if "/libm.so" in ln or "/libm-" in ln]
  if not paths:
    pytest.fail("no libm mapped into this Python: cannot build the stand-in allocator")
  return paths[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc (Linux)")
def test_a_preloaded_tcmalloc_is_kept_and_reported(tmp_path):
  """The user's LD_PRELOAD (a copy of libm standing in for tcmalloc, by its file name): every
  policy reports 'tcmalloc', and the command runs once, in one process."""
  fake = tmp_path / "libtcmalloc_standin.so"
  shutil.copy(_mapped_libm(), fake)
  env = {**_glibc_env(), "LD_PRELOAD": str(fake)}
  out = subprocess.run([sys.executable, "-c", PRELOADED_PROBE], env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 2 and lines[0].startswith("start"), lines  # ran once: no re-exec
  res = json.loads(lines[-1])
  assert res.pop("loaded") == str(fake) and int(lines[0].split()[1]) == res.pop("pid")
  assert res == {policy: "tcmalloc" for policy in host_runtime.POLICIES}


def test_cpu_device_plan():
  plan, settings = host_runtime.cpu_device_plan, host_runtime.HostSettings
  flags = (6, "XLA_FLAGS --xla_force_host_platform_device_count")
  assert plan(settings(dqc_batch=4), None, cores=2) == (2, "auto")
  assert plan(settings(dqc_batch=0), None, cores=2) == (1, "auto")  # no DQC here: one device
  assert plan(settings(cpu_devices=3, dqc_batch=4), None, cores=2) == (3, "config")
  assert plan(settings(dqc_batch=4), flags, cores=2) == flags  # the user's count wins
  assert plan(settings(cpu_devices=6), flags, cores=2) == flags
  with pytest.raises(ValueError, match="config.cpu_devices=2 conflicts with XLA_FLAGS"):
    plan(settings(cpu_devices=2), flags, cores=2)


def test_preset_cpu_devices():
  flag = host_runtime.DEVICE_COUNT_FLAG
  preset = host_runtime.preset_cpu_devices
  assert preset("", -1) is None and preset("--xla_dump_to=/tmp/x", -1) is None
  assert preset(f"{flag}=4", -1) == (4, f"XLA_FLAGS {flag}")
  assert preset(f"{flag}=4", 3) == (3, "JAX_NUM_CPU_DEVICES")  # JAX's own setting wins there too


def test_flagged_cpu_devices():
  flag = host_runtime.DEVICE_COUNT_FLAG
  assert host_runtime.flagged_cpu_devices("") is None
  assert host_runtime.flagged_cpu_devices("--xla_cpu_use_thunk_runtime=false") is None
  assert host_runtime.flagged_cpu_devices(f"--xla_dump_to=/tmp/x {flag}=4") == 4
  assert host_runtime.flagged_cpu_devices(f"{flag}=4 {flag}=2") == 2  # the last one, as XLA
  with pytest.raises(ValueError, match="XLA_FLAGS"):
    host_runtime.flagged_cpu_devices(f"{flag}=two")


def test_apply_keeps_the_users_device_count(monkeypatch):
  """XLA_FLAGS names 3 devices: auto keeps them and sets nothing itself; 2 is a conflict."""
  updates = []
  if host_runtime.jax.config.jax_num_cpu_devices >= 1:
    pytest.skip("JAX_NUM_CPU_DEVICES is set for this test run: it would win over XLA_FLAGS")
  monkeypatch.setattr(host_runtime.jax.config, "update", lambda *a: updates.append(a))
  monkeypatch.setenv("XLA_FLAGS", f"{host_runtime.DEVICE_COUNT_FLAG}=3")
  applied = host_runtime.apply(host_runtime.HostSettings(malloc="system", dqc_batch=4))
  assert applied["cpu_devices"] == 3 and updates == []
  with pytest.raises(ValueError, match="conflicts with XLA_FLAGS"):
    host_runtime.apply(host_runtime.HostSettings(malloc="system", cpu_devices=2))
  monkeypatch.delenv("XLA_FLAGS")
  assert host_runtime.apply(host_runtime.HostSettings(malloc="system", dqc_batch=4)) == {
      "malloc": host_runtime.apply_malloc("system"),
      "cpu_devices": host_runtime.auto_cpu_devices(4)}
  if host_runtime.auto_cpu_devices(4) > 1:
    assert updates == [("jax_num_cpu_devices", host_runtime.auto_cpu_devices(4))]


TERMINATE_PROBE = """
import sys
import jax, jax.numpy as jnp
from twodquant_jax import host_runtime
applied = host_runtime.apply(host_runtime.HostSettings(malloc="system", cpu_devices=2))
import os
total = jax.pmap(lambda x: jax.lax.psum(x, "i"), axis_name="i")(jnp.ones(2))
print(applied["cpu_devices"], float(total[0]), os.environ["XLA_FLAGS"])
"""


def test_several_cpu_devices_raise_the_collective_termination_limit():
  """A run split over CPU devices gets XLA's collective termination limit raised (once; a
  user's own value stays), and XLA accepts the flag: an unknown XLA flag aborts the process."""
  flag = host_runtime.TERMINATE_FLAG
  raised = host_runtime.with_terminate_timeout("--xla_foo=1")
  assert raised == f"--xla_foo=1 {flag}={host_runtime.TERMINATE_TIMEOUT_S}"
  assert host_runtime.with_terminate_timeout(raised) == raised
  assert host_runtime.with_terminate_timeout(f"{flag}=5") == f"{flag}=5"
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  out = subprocess.run([sys.executable, "-c", TERMINATE_PROBE], env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  devices, total, flags = out.stdout.split(maxsplit=2)
  assert (devices, float(total)) == ("2", 2.0)
  assert f"{flag}={host_runtime.TERMINATE_TIMEOUT_S}" in flags
