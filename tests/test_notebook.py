"""The Colab notebook is valid and its offline cells run, in order, on tiny local data."""

import sys
import time
import types
from pathlib import Path

import nbformat
import pytest

from twodquant_jax.data.images import load_rgb, save_png
from shared_paths import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "2dquant_colab.ipynb"


def _tags(cell) -> set[str]:
  return set(cell.get("metadata", {}).get("tags", []))


@pytest.fixture(scope="module")
def notebook():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  return nb


def test_notebook_structure(notebook):
  code = [c for c in notebook.cells if c.cell_type == "code"]
  params = [c for c in code if "parameters" in _tags(c)]
  assert len(params) == 1 and code[0] is params[0]  # the settings come first
  network = [c for c in code if "network" in _tags(c)]
  assert network, "cells that download must be tagged 'network'"
  text = "\n".join(c.source for c in network)
  assert "pip install" in text and "[cuda12]" in text and "git clone" in text
  assert "fetch_official" in text
  offline = "\n".join(c.source for c in code if "network" not in _tags(c))
  assert "pipeline.run" in offline and "results.md" in offline and "Image(" in offline
  for c in code:  # shell and magic lines only where the network is used anyway
    if "network" not in _tags(c):
      assert not any(l.lstrip().startswith(("!", "%")) for l in c.source.splitlines())


def _display_stub(monkeypatch) -> None:
  """IPython is not a dependency of the package: stand in for IPython.display if missing."""
  try:
    import IPython.display  # noqa: F401
  except ImportError:
    mod = types.ModuleType("IPython.display")
    mod.display = lambda *a, **k: None
    mod.Markdown = mod.Image = lambda *a, **k: (a, k)
    monkeypatch.setitem(sys.modules, "IPython", types.ModuleType("IPython"))
    monkeypatch.setitem(sys.modules, "IPython.display", mod)


@pytest.mark.slow
def test_offline_cells_run(notebook, tmp_path, monkeypatch, reference, benchmarks):
  root = tmp_path / "bench"
  for name in ("baby", "bird"):
    hr = load_rgb(benchmarks / "Set5" / "HR" / f"{name}.png")
    save_png(root / "Set5" / "HR" / f"{name}.png", hr[96:144, 96:144])
  overrides = {
      "CHECKPOINT": str(reference / "swinir_light_x4_random.pth"),
      "DATA_ROOT": str(root), "DATASETS": "Set5", "METHOD": "fp", "DQC_STEPS": 2,
      "CALIB_ROOT": str(tmp_path / "no_training_images"),
      "CALIB_BATCH_FILE": str(reference / "calib_x4.npz"),
      "WORKDIR": str(tmp_path / "run"), "FAST": True,
  }
  monkeypatch.chdir(REPO_ROOT)
  monkeypatch.syspath_prepend(str(REPO_ROOT))
  _display_stub(monkeypatch)
  ns: dict = {"__name__": "__notebook__"}
  t0 = time.perf_counter()
  ran = 0
  for i, cell in enumerate(notebook.cells):
    if cell.cell_type != "code" or "network" in _tags(cell):
      continue
    exec(compile(cell.source, f"<notebook cell {i}>", "exec"), ns)  # noqa: S102
    ran += 1
    if "parameters" in _tags(cell):
      assert set(overrides) <= set(ns), "the settings cell must define every override"
      ns.update(overrides)
  print(f"notebook offline cells: {time.perf_counter() - t0:.1f} s")
  assert ran >= 5
  run = Path(overrides["WORKDIR"])
  assert (run / "results.json").is_file() and (run / "results.md").is_file()
  assert list(ns["results"]["methods"]) == ["fp"]
  assert ns["config"].report.figures and ns["config"].report.visual_images == "Set5/baby"
  assert (run / "figures" / "visual_Set5_baby.png").is_file()
