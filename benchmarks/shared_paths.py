"""Locating the read-only ../shared folder (data, reference outputs) relative to the repo root."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_path() -> Path:
  """Where the shared folder is expected: $TWODQUANT_SHARED, else ../shared beside the repo root."""
  env = os.environ.get("TWODQUANT_SHARED")
  return Path(env) if env else REPO_ROOT.parent / "shared"


def shared_dir() -> Path:
  """Returns ../shared beside the repo root (or $TWODQUANT_SHARED), raising if it is missing."""
  path = shared_path()
  if not path.is_dir():
    raise FileNotFoundError(
        f"The shared data folder was not found at {path}. Tests and local runs expect the "
        "read-only 'shared' folder beside the repository root (or set TWODQUANT_SHARED).")
  return path
