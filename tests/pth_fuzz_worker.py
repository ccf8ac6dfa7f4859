"""Fuzz target for the `.pth` reader, run in a subprocess by tests/test_pth_hardening.py.

`python tests/pth_fuzz_worker.py OUT_DIR SEED COUNT SECONDS` mutates the data.pkl bytes and the
storage records of a valid small checkpoint COUNT times (or until SECONDS pass) and loads each
file. Every load must end in a CheckpointError naming the file, or return tensors that equal
an independent index-arithmetic gather from their storage. Any other exception exits 1 with the
reproducer; a crash (segfault) or hang is seen by the parent as a signal or a timeout. Prints one
JSON line of counts on success.
"""

from __future__ import annotations

import json
import re
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pth_craft  # noqa: E402
from twodquant_jax.formats import torch_pickle  # noqa: E402

INTERESTING = [-(1 << 63), -(1 << 31), -12, -2, -1, 0, 1, 2, 3, 4, 5, 11, 12, 13, 1 << 20,
               (1 << 31) - 1, 1 << 31, 1 << 32, (1 << 63) - 1, 1 << 64, 1 << 100]


def _mutate_pickle(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
  kind = int(rng.integers(4))
  ints = list(re.finditer(rb"I(-?\d+)\n", data))
  if kind == 0 and ints:  # one INT (offset, size, stride, numel) set to an edge value
    m = ints[int(rng.integers(len(ints)))]
    old = int(m.group(1))
    v = int(rng.choice([INTERESTING[int(rng.integers(len(INTERESTING)))],
                        old + int(rng.integers(-3, 4))]))
    return data[:m.start()] + b"I%d\n" % v + data[m.end():], f"int@{m.start()} {old}->{v}"
  pos = int(rng.integers(len(data)))
  if kind == 1:  # random bytes overwritten
    n = int(rng.integers(1, 4))
    new = bytes(rng.integers(0, 256, n, dtype=np.uint8))
    return data[:pos] + new + data[pos + n:], f"overwrite@{pos} {new.hex()}"
  if kind == 2:  # a byte inserted
    b = bytes([int(rng.integers(256))])
    return data[:pos] + b + data[pos:], f"insert@{pos} {b.hex()}"
  return data[:pos] + data[pos + 1:], f"delete@{pos}"  # a byte deleted


def _mutate_storages(storages: dict[str, np.ndarray], rng: np.random.Generator
                     ) -> tuple[dict[str, bytes], str]:
  """Raw storage records with one made shorter, longer, dropped, or swapped with another."""
  raw = {k: v.astype(v.dtype.newbyteorder("<")).tobytes() for k, v in storages.items()}
  keys = sorted(raw)
  key = keys[int(rng.integers(len(keys)))]
  kind = int(rng.integers(4))
  if kind == 0:
    n = int(rng.integers(1, 9))
    raw[key] = raw[key][:-n]
    return raw, f"storage {key} -{n} bytes"
  if kind == 1:
    n = int(rng.integers(1, 9))
    raw[key] = raw[key] + bytes(n)
    return raw, f"storage {key} +{n} bytes"
  if kind == 2:
    del raw[key]
    return raw, f"storage {key} dropped"
  other = keys[int(rng.integers(len(keys)))]
  raw[key], raw[other] = raw[other], raw[key]
  return raw, f"storages {key}<->{other} swapped"


def _write(path: Path, pkl: bytes, raw: dict[str, bytes]) -> None:
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr("archive/data.pkl", pkl)
    for k, b in raw.items():
      zf.writestr(f"archive/data/{k}", b)


def _check_calls(calls: list, rng: np.random.Generator) -> None:
  """Every tensor the reader returned equals the reference gather from its storage."""
  for storage, offset, size, stride, got in calls:
    size, stride = tuple(size), tuple(stride)
    if got.shape != size or got.dtype != storage.dtype:
      raise AssertionError(f"tensor {got.shape} {got.dtype}, asked {size} {storage.dtype}")
    if got.size == 0:  # nothing to compare (a zero dimension may sit beside a huge one)
      continue
    if got.size <= 4096:
      want = pth_craft.reference_gather(storage, offset, size, stride)
      np.testing.assert_array_equal(got, want)
    else:  # large (expanded) views: check 256 random elements
      for _ in range(256):
        idx = tuple(int(rng.integers(d)) for d in size)
        k = offset + sum(i * s for i, s in zip(idx, stride))
        assert 0 <= k < storage.size, (idx, k)
        assert got[idx] == storage[k], (idx, k)


def main(out_dir: str, seed: int, count: int, seconds: float) -> int:
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  storages, records, _ = pth_craft.small_checkpoint()
  numels = {k: v.size for k, v in storages.items()}
  pkl = pth_craft.tensor_pickle(records, numels)
  raw0 = {k: v.astype(v.dtype.newbyteorder("<")).tobytes() for k, v in storages.items()}

  calls: list = []
  real = torch_pickle._rebuild_tensor

  def recording(storage, offset, size, stride, *rest):
    t = real(storage, offset, size, stride, *rest)
    calls.append((storage, offset, size, stride, t))
    return t

  torch_pickle._rebuild_tensor = recording
  rng = np.random.default_rng(seed)
  counts = {"rejected": 0, "loaded": 0}
  start = time.monotonic()
  done = 0
  for i in range(count):
    if time.monotonic() - start > seconds:
      break
    if rng.random() < 0.75:
      data, what = _mutate_pickle(pkl, rng)
      raw = raw0
    else:
      data, (raw, what) = pkl, _mutate_storages(storages, rng)
    path = out / f"m{i}.pth"
    _write(path, data, raw)
    calls.clear()
    try:
      torch_pickle.load_pth(path)
    except torch_pickle.CheckpointError as e:
      if path.name not in str(e) or "\n" in str(e):
        print(f"mutation {i} ({what}): error does not name the file in one line: {e}")
        return 1
      counts["rejected"] += 1
    except BaseException as e:  # anything else is a bug in the reader
      print(f"mutation {i} ({what}): {type(e).__name__}: {e}")
      return 1
    else:
      try:
        _check_calls(calls, rng)
      except (AssertionError, IndexError) as e:
        print(f"mutation {i} ({what}): WRONG TENSOR: {e}")
        return 1
      counts["loaded"] += 1
    path.unlink()
    done += 1
  counts["mutations"] = done
  counts["seconds"] = round(time.monotonic() - start, 2)
  print(json.dumps(counts))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
