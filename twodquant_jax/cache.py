"""The project's cache folder, in one place: downloads, data sets, XLA compiles, memory plans.

`root()` is $TWODQUANT_CACHE, else ~/.cache/twodquant_jax; every cache the package writes is a
sub-folder of it (`subdir`), so a test or a user can move all of them with one variable.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "TWODQUANT_CACHE"


def root() -> Path:
  """$TWODQUANT_CACHE, else ~/.cache/twodquant_jax (not created)."""
  env = os.environ.get(ENV, "")
  return Path(env).expanduser() if env else Path.home() / ".cache" / "twodquant_jax"


def subdir(name: str, override: str | os.PathLike = "") -> Path:
  """`override` when given ('~' expanded), else <root>/<name> (not created)."""
  return Path(override).expanduser() if str(override) else root() / name
