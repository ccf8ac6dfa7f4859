"""The `.pth` reader against crafted files: every view it rebuilds stays inside its storage.

Files are written by tests/pth_craft.py in torch's zip layout (the layout of
../shared/reference/*.pth). Each crafted record that could make numpy read outside the stored
bytes (negative strides, offsets or extents past the storage, huge shapes, unknown dtypes) must
end in a one-line CheckpointError naming the file; a bounded fuzz run in a subprocess checks that
no mutation of a valid file crashes, hangs or returns a wrong tensor.
"""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import pth_craft
from pth_craft import TensorRecord
from twodquant_jax.formats.torch_pickle import CheckpointError, load_pth

HERE = Path(__file__).resolve().parent


def _storages():
  return {"0": np.arange(16, dtype=np.float32)}


def test_crafted_layout_matches_the_reference_file(reference, tmp_path):
  """The crafted pickle uses the same globals and persistent ids as a real torch file."""
  with zipfile.ZipFile(reference / "swinir_light_x4_random.pth") as zf:
    real = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
  for token in (b"collections\nOrderedDict", b"torch._utils\n_rebuild_tensor_v2",
                b"torch\nFloatStorage", b"storage"):
    assert token.replace(b"\n", b" ") in real.replace(b"\n", b" ")


def test_valid_small_checkpoint_reads_exactly(tmp_path):
  storages, records, expected = pth_craft.small_checkpoint()
  sd = load_pth(pth_craft.write_pth(tmp_path / "ok.pth", storages, records))["params"]
  assert list(sd) == [r.name for r in records]
  for name, want in expected.items():
    got = sd[name]
    assert got.shape == np.shape(want) and got.dtype == np.asarray(want).dtype, name
    np.testing.assert_array_equal(got, want)
    assert got.flags.owndata or got.base is None or got.size == 0  # a copy, not a view of bytes


@pytest.mark.parametrize("record,message", [
    # a large negative stride made numpy read far before the buffer: SIGSEGV
    (TensorRecord("t", "0", 15, (4, 4), (-(1 << 40), 1)), "negative stride"),
    # a small negative stride silently read the bytes before the storage
    (TensorRecord("t", "0", 0, (4,), (-1,)), "negative stride"),
    (TensorRecord("t", "0", 3, (2, 2), (-1, 1)), "negative stride"),
    (TensorRecord("t", "0", -2, (4,), (1,)), "storage offset"),
    (TensorRecord("t", "0", 16, (1,), (1,)), "out of bounds"),  # offset at the end
    (TensorRecord("t", "0", 1 << 62, (1,), (1,)), "out of bounds"),
    (TensorRecord("t", "0", 1, (16,), (1,)), "out of bounds"),  # extent one past the end
    (TensorRecord("t", "0", 0, (4, 4), (5, 1)), "out of bounds"),  # stride overruns
    (TensorRecord("t", "0", 0, (2, 3), (1 << 62, 1)), "out of bounds"),
    (TensorRecord("t", "0", 16, (), ()), "out of bounds"),  # scalar past the end
    (TensorRecord("t", "0", 0, (-1, 4), (4, 1)), "negative dimension"),
    (TensorRecord("t", "0", 0, (4, 4), (4,)), "strides"),  # rank mismatch
    (TensorRecord("t", "0", 0, (1 << 20, 1 << 20), (0, 0)), "more elements"),  # 1e12 copies
    (TensorRecord("t", "0", 0, (1,) * 40, (1,) * 40), "at most 16"),
    (TensorRecord("t", "0", 20, (0, 4), (4, 1)), "past its storage"),
    (TensorRecord("t", "0", 0, (4,), (1,), storage_type="ComplexFloatStorage"),
     "does not accept"),  # unknown dtype
    (TensorRecord("t", "0", 0, (4,), (1,), numel=17), "truncated or corrupt"),
    (TensorRecord("t", "0", 0, (4,), (1,), numel=-1), "bad size"),
    (TensorRecord("t", "0", 0, (4,), (1,), numel=1 << 62), "bad size"),
    (TensorRecord("t", "9", 0, (4,), (1,)), "missing"),
    (TensorRecord("t", "../0", 0, (4,), (1,)), "bad storage key"),
])
def test_crafted_records_are_rejected(tmp_path, record, message):
  path = pth_craft.write_pth(tmp_path / "crafted.pth", _storages(), [record])
  with pytest.raises(CheckpointError, match=message) as e:
    load_pth(path)
  assert "crafted.pth" in str(e.value) and "\n" not in str(e.value)


def test_stride_zero_expansion_within_bounds_is_read(tmp_path):
  """Legal torch views that are not contiguous still load: broadcast (stride 0), overlap."""
  records = [TensorRecord("bcast", "0", 2, (3, 4), (0, 1)),
             TensorRecord("overlap", "0", 0, (5, 4), (3, 1))]
  sd = load_pth(pth_craft.write_pth(tmp_path / "views.pth", _storages(), records))["params"]
  s = np.arange(16, dtype=np.float32)
  np.testing.assert_array_equal(sd["bcast"], np.broadcast_to(s[2:6], (3, 4)))
  np.testing.assert_array_equal(sd["overlap"], np.stack([s[3 * i:3 * i + 4] for i in range(5)]))


def test_storage_with_wrong_byte_count_is_rejected(tmp_path):
  path = pth_craft.write_pth(tmp_path / "odd.pth", {"0": np.arange(3, dtype=np.uint8)},
                             [TensorRecord("t", "0", 0, (3,), (1,), "HalfStorage", numel=1)])
  with pytest.raises(CheckpointError, match="odd.pth.*bytes"):
    load_pth(path)


def test_buffer_opcodes_are_refused_before_unpickling(tmp_path):
  """A protocol-5 bytearray (found by the fuzzer: CPython then printed "deallocated bytearray
  object has exported buffers") is refused by the opcode scan."""
  pkl = b"\x80\x05\x96" + (3).to_bytes(8, "little") + b"abc\x98."
  path = pth_craft.write_pth(tmp_path / "buf.pth", {}, [], pickle_bytes=pkl)
  with pytest.raises(CheckpointError, match="buf.pth.*BYTEARRAY8"):
    load_pth(path)


def test_fuzzed_checkpoints_never_crash_hang_or_misread(tmp_path):
  """200 seeded mutations of data.pkl and the storage records, in a subprocess (a segfault
  or hang fails this test instead of killing pytest)."""
  env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
  try:
    r = subprocess.run([sys.executable, str(HERE / "pth_fuzz_worker.py"), str(tmp_path), "12",
                        "200", "30"], capture_output=True, text=True, timeout=90, env=env)
  except subprocess.TimeoutExpired:
    pytest.fail("the fuzzed reader hung (no answer within 90 s)")
  assert r.returncode == 0, f"rc {r.returncode} (negative = killed by a signal): " + \
      (r.stdout + r.stderr)[-2000:]
  assert not r.stderr.strip(), r.stderr[-2000:]  # nothing printed behind our back either
  counts = json.loads(r.stdout.strip().splitlines()[-1])
  assert counts["mutations"] == 200
  assert counts["rejected"] > 0 and counts["loaded"] > 0  # both outcomes were exercised
