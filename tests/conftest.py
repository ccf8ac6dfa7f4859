"""Shared test fixtures: the private cache, and the read-only ../shared folder (reference data).

Tests that need ../shared ask for it through the fixtures below (`shared`, `reference`,
`benchmarks`, `shared_file`), never at import or collection time. Without ../shared those tests
skip with one line saying what is missing, and every other test still runs; in CI (the
environment variable CI is "true") a missing folder or file is a failure instead, so CI can never
pass by skipping the parity tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, NoReturn

import pytest

from twodquant_jax import compile_cache, host_runtime
from shared_paths import shared_path

# As main.py: reuse freed host memory (XLA:CPU's per-call buffers), before any backend starts.
host_runtime.apply_malloc("keep")


def in_ci() -> bool:
  """True where CI runs the tests (CI=true, as GitHub Actions, GitLab and most others set it)."""
  return os.environ.get("CI", "").strip().lower() == "true"


def missing(reason: str) -> NoReturn:
  """Skips the test for lack of reference data, or fails it in CI."""
  if in_ci():
    pytest.fail(f"{reason} (CI=true: the reference data is required)", pytrace=False)
  pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
  """Every cache the package writes (downloads, XLA compiles, microbatch decisions) goes to a
  fresh folder: tests neither read the user's ~/.cache nor leave anything in it.

  The persistent compilation cache is on for the whole session, in that folder's xla/ (where
  `pipeline.run` and the `main.py` subprocesses put theirs too, through $TWODQUANT_CACHE): a
  network compiled again (after `jax.clear_caches()`, in another jitted function, in a
  subprocess) is loaded instead. It starts empty, so every session compiles everything once."""
  old = os.environ.get("TWODQUANT_CACHE")
  os.environ["TWODQUANT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
  compile_cache.enable(compile_cache.DEFAULT)
  yield
  if old is None:
    os.environ.pop("TWODQUANT_CACHE", None)
  else:
    os.environ["TWODQUANT_CACHE"] = old


@pytest.fixture(scope="session")
def shared() -> Path:
  """The ../shared folder (or $TWODQUANT_SHARED); skips the test when it is missing."""
  path = shared_path()
  if not path.is_dir():
    missing(f"needs ../shared (reference data); not found at {path}")
  return path


@pytest.fixture(scope="session")
def shared_file(shared: Path) -> Callable[[str], Path]:
  """A function: shared_file('reference/calib_x4.npz') is that path inside ../shared; the test
  skips (fails in CI) when it is missing."""
  def get(relative: str) -> Path:
    path = shared / relative
    if not path.exists():
      missing(f"needs ../shared/{relative} (reference data); not found at {path}")
    return path
  return get


@pytest.fixture(scope="session")
def reference(shared_file) -> Path:
  return shared_file("reference")


@pytest.fixture(scope="session")
def benchmarks(shared_file) -> Path:
  return shared_file("data/benchmarks")


@pytest.fixture(scope="session")
def calib_dir(shared_file) -> Path:
  """The calibration / DQC training images (291 PNGs standing in for DF2K)."""
  return shared_file("data/calib")
