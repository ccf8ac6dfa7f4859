"""A/B timing helper: import the package as it is at another git revision, beside the working tree.

`load(rev)` extracts `twodquant_jax/` at `rev` (`git archive`) into a temporary folder as the
package `twodquant_jax_<hash>` (its absolute imports rewritten), so old and new code can be
compiled and timed alternately in ONE process: on a loaded machine only ratios measured that way
mean something.
"""

from __future__ import annotations

import importlib
import io
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load(rev: str):
  """The `twodquant_jax` package at git revision `rev`, imported under another name."""
  sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, check=True,
                       capture_output=True, text=True).stdout.strip()
  name = f"twodquant_jax_{sha}"
  if name in sys.modules:
    return sys.modules[name]
  root = Path(tempfile.mkdtemp(prefix="ab_pkg_"))
  tar = subprocess.run(["git", "archive", rev, "twodquant_jax"], cwd=REPO, check=True,
                       capture_output=True).stdout
  with tarfile.open(fileobj=io.BytesIO(tar)) as t:
    t.extractall(root, filter="data")
  (root / "twodquant_jax").rename(root / name)
  for py in (root / name).rglob("*.py"):
    py.write_text(re.sub(r"\btwodquant_jax\b", name, py.read_text()))
  sys.path.insert(0, str(root))
  return importlib.import_module(name)


def module(pkg, dotted: str):
  """Submodule `dotted` (e.g. 'ptq.dqc.step') of a package returned by `load`, or of the
  current one when `pkg` is None."""
  base = pkg.__name__ if pkg is not None else "twodquant_jax"
  return importlib.import_module(f"{base}.{dotted}")
