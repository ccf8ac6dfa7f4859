"""Shared test fixtures: the ../shared folder, found relative to the repo root."""

from pathlib import Path

import pytest

from twodquant_jax.paths import shared_dir


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
