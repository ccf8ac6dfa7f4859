"""Shared test fixtures: the ../shared folder, found relative to the repo root."""

import os
from pathlib import Path

import pytest

from twodquant_jax import host_runtime
from shared_paths import shared_dir

# As main.py: reuse freed host memory (XLA:CPU's per-call buffers), before any backend starts.
host_runtime.apply_malloc("keep")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
  """Every cache the package writes (downloads, XLA compiles, microbatch decisions) goes to a
  fresh folder: tests neither read the user's ~/.cache nor leave anything in it."""
  old = os.environ.get("TWODQUANT_CACHE")
  os.environ["TWODQUANT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
  yield
  if old is None:
    os.environ.pop("TWODQUANT_CACHE", None)
  else:
    os.environ["TWODQUANT_CACHE"] = old


@pytest.fixture(scope="session")
def shared() -> Path:
  try:
    return shared_dir()
  except FileNotFoundError as e:  # fail loudly, never skip
    pytest.fail(str(e))


@pytest.fixture(scope="session")
def reference(shared: Path) -> Path:
  return shared / "reference"


@pytest.fixture(scope="session")
def benchmarks(shared: Path) -> Path:
  return shared / "data" / "benchmarks"
