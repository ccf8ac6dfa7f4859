"""Multi-process DQC on jax.distributed (CPU, gloo collectives, 127.0.0.1 only).

2 processes x 2 host devices train the tiny network of `dqc_tiny.py` on the same global
batches as 1 process x 4 devices and must end at the same bounds; a peer killed mid-DQC must
stop the survivor with an error within the configured timeout; a peer ready for the first step
past Gloo's 30 s only delays it (the processes meet after compiling), and one that misses the
meeting is one PeerError line. Every subprocess is bounded in
time and killed on the way out. The 2-process runs share a persistent compilation cache, so the
killed-peer run reuses the first run's compiled step.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from twodquant_jax import distributed, settings
from twodquant_jax.data import patches
from shared_paths import REPO_ROOT
from twodquant_jax.ptq.dqc import loop as dqc_loop
from twodquant_jax.ptq.dqc import step as dqc_step

TINY_SCRIPT = Path(__file__).with_name("dqc_tiny.py")
STEPS, BATCH = 3, 4


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, cache: Path) -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri"):
    env.pop(var, None)  # no accidental cluster auto-detection
  return env


def _start(args: list[str], devices: int, cache: Path) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(TINY_SCRIPT)] + args, env=_env(devices, cache),
                          cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
  """Waits for every process (at most `timeout` s in all), then kills any still running."""
  deadline = time.monotonic() + timeout
  out = []
  try:
    for p in procs:
      o, e = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
      out.append((p.returncode, o, e))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return out


def _dist(port: int, pid: int, timeout_s: int, die: int, workdir: Path) -> list[str]:
  return ["--dist", f"127.0.0.1:{port}", "2", str(pid), str(timeout_s), str(die),
          str(workdir), str(STEPS), str(BATCH)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("jax_cache")


@pytest.mark.slow
@pytest.mark.usefixtures("calib_dir")  # the processes train on ../shared/data/calib
def test_two_processes_match_one_process(tmp_path, cache):
  """3 DQC steps: 2 processes x 2 devices give the bounds of 1 process x 4 devices."""
  port = _free_port()
  procs = [_start(_dist(port, pid, 60, 0, tmp_path / "two"), 2, cache) for pid in (0, 1)]
  procs.append(_start([str(tmp_path / "one"), str(STEPS), str(BATCH)], 4, cache))
  results = _finish(procs, timeout=400)
  for rc, out, err in results:
    assert rc == 0, err[-3000:]
  assert all("devices 4 processes 2" in out for _, out, _ in results[:2])
  assert all("agree True" in out for _, out, _ in results[:2])  # process 0's decision
  assert "devices 4 processes 1" in results[2][1]
  two = dict(np.load(tmp_path / "two" / "result.npz"))
  one = dict(np.load(tmp_path / "one" / "result.npz"))
  assert two.keys() == one.keys() and len(one) == 32
  worst = max(float(np.max(np.abs(two[k] - one[k]) / np.abs(one[k]))) for k in one)
  print(f"2-process vs 1-process bounds: max relative difference {worst:.3g}")
  for name in one:
    np.testing.assert_allclose(two[name], one[name], rtol=1e-6, err_msg=name)
  # One log, written by process 0 alone; one orbax checkpoint of the last step.
  log = (tmp_path / "two" / "dqc_log.jsonl").read_text().splitlines()
  assert [int(re.search(r'"step": (\d+)', line).group(1)) for line in log] == [1, 2, 3]
  assert sorted(p.name for p in (tmp_path / "two" / "dqc_ckpt").iterdir()
                if p.name.isdigit()) == ["3"]


@pytest.mark.slow
@pytest.mark.usefixtures("calib_dir")  # the processes train on ../shared/data/calib
def test_killed_peer_stops_the_survivor(tmp_path, cache):
  """Process 1 kills itself after step 1: process 0 exits non-zero, saying a task died,
  within the 5 s heartbeat timeout (plus start-up), instead of waiting forever."""
  port = _free_port()
  procs = [_start(_dist(port, pid, 5, 1 if pid == 1 else 0, tmp_path), 2, cache)
           for pid in (0, 1)]
  t0 = time.monotonic()
  (rc1, out1, err1), = _finish(procs[1:], timeout=300)
  died = time.monotonic()
  (rc0, out0, err0), = _finish(procs[:1], timeout=90)
  print(f"survivor stopped {time.monotonic() - died:.1f} s after the peer died "
        f"({died - t0:.1f} s in), exit status {rc0}")
  assert rc1 == -9 and "step 1 process 1" in out1, err1[-3000:]  # it did die mid-DQC
  assert rc0 != 0
  assert re.search(r"another task died|tasks have crashed|stopped sending heartbeats", err0), \
      err0[-3000:]
  assert not (tmp_path / "result.npz").exists()


MEET_PROBE = r"""
import sys, time
from twodquant_jax import distributed
port, pid, late, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
distributed.initialize(distributed.DistributedSettings(
    coordinator=f"127.0.0.1:{port}", num_processes=2, process_id=pid, init_timeout_s=limit))
time.sleep(late)
try:
  print("met after", distributed.meet("probe"), flush=True)
except distributed.PeerError as e:
  print("PeerError:", e, flush=True)
  distributed.exit_now(3)  # as main.py does
"""


def _meet(late: float, limit: int, cache: Path) -> list[tuple[int, str, str]]:
  """Two 1-device processes meet; process 1 gets there `late` seconds after process 0."""
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-c", MEET_PROBE, str(port), str(pid),
                             str(late if pid else 0), str(limit)], env=_env(1, cache),
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for pid in (0, 1)]
  return _finish(procs, timeout=150)


LATE_STEP_PROBE = r"""
import sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from twodquant_jax import distributed
from twodquant_jax.ptq.dqc import loop
port, pid, late = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
distributed.initialize(distributed.DistributedSettings(
    coordinator=f"127.0.0.1:{port}", num_processes=2, process_id=pid, init_timeout_s=120))
mesh = Mesh(np.array(jax.devices()), ("data",))
repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
step = jax.jit(lambda s, b, p: (s + jnp.sum(b) * p, jnp.sum(b)), in_shardings=(repl, data, repl),
               out_shardings=(repl, repl), donate_argnums=(0,))
state, params = (jax.device_put(np.float32(v), repl) for v in (0.0, 2.0))
batch = jax.make_array_from_process_local_data(data, np.full((2,), pid + 1, np.float32), (4,))
time.sleep(late)  # as a compile finishing this much later on a busy machine
t0 = time.monotonic()
loop._compile_and_meet(step, state, batch, params)
print("waited", time.monotonic() - t0, "sum", float(step(state, batch, params)[1]), flush=True)
"""


@pytest.mark.slow
def test_a_step_compiled_late_only_delays_the_run(cache):
  """Process 1 is ready for the first step 35 s after process 0, more than the 30 s Gloo waits
  for a peer: the DQC loop's meeting after compiling holds process 0 back, and the step's
  cross-process sum (1 + 1 + 2 + 2) runs on both."""
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-c", LATE_STEP_PROBE, str(port), str(pid),
                             str(35 if pid else 0)], env=_env(2, cache), cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for pid in (0, 1)]
  results = _finish(procs, timeout=240)
  for rc, out, err in results:
    assert rc == 0 and "sum 6.0" in out, (out, err[-3000:])
  assert float(results[0][1].split("waited")[1].split()[0]) > 30  # held until process 1 came


@pytest.mark.slow
def test_a_peer_missing_the_meeting_is_one_line(cache):
  """A peer later than the limit: process 0 stops with PeerError, one line naming the setting."""
  t0 = time.monotonic()
  (rc0, out0, err0), _ = _meet(late=30, limit=4, cache=cache)
  assert rc0 == 3, (out0, err0[-3000:])
  line, = [ln for ln in out0.splitlines() if ln.startswith("PeerError")]
  assert "'probe'" in line and "config.distributed.init_timeout_s" in line
  assert "Check failure" not in err0, err0[-3000:]  # no abort in JAX's shutdown barrier
  assert time.monotonic() - t0 < 140  # it did not wait for process 1


def test_sample_batch_rows_are_rows_of_the_whole_batch(shared):
  source = patches.load_patch_source(shared / "data" / "benchmarks" / "Set5" / "HR", 32)
  whole = patches.sample_batch(source, 7, 11, 6, scale=2, lr_size=16)
  part = patches.sample_batch(source, 7, 11, 6, scale=2, lr_size=16, indices=[4, 1])
  for key in ("lr", "hr"):
    np.testing.assert_array_equal(part[key], whole[key][[4, 1]])
  with pytest.raises(ValueError, match="indices"):
    patches.sample_batch(source, 7, 11, 6, scale=2, lr_size=16, indices=[6])


def test_process_rows_single_process():
  mesh = dqc_step.data_mesh()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(dqc_step.DATA_AXIS))
  assert dqc_loop.process_rows(sharding, 8) == list(range(8))


def test_distributed_settings_and_no_cluster(monkeypatch):
  with pytest.raises(ValueError, match="HOST:PORT"):
    settings.DistributedSettings(coordinator="localhost", num_processes=2, process_id=0)
  with pytest.raises(ValueError, match="process_id"):
    settings.DistributedSettings(coordinator="10.0.0.1:1234", num_processes=2, process_id=2)
  with pytest.raises(ValueError, match="need config.distributed.coordinator"):
    settings.DistributedSettings(num_processes=2)
  settings.DistributedSettings(coordinator="[::1]:1234", num_processes=1, process_id=0)
  # No flags and no cluster: one process, without trying to connect anywhere.
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri"):
    monkeypatch.delenv(var, raising=False)
  assert distributed.detected_cluster() is None
  assert distributed.initialize(settings.DistributedSettings()) is False
  assert distributed.is_primary() and not jax.distributed.is_initialized()
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  assert distributed.detected_cluster() == "JAX_COORDINATOR_ADDRESS"
  tree = {"a": np.arange(3.0)}
  assert distributed.from_primary(tree) is tree and distributed.agree(True)
