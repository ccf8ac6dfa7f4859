"""The settings leaf: `settings.parse` checks every field once, in one line naming it; the
module imports nothing heavy; and no code outside the method registry tests method names."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from shared_paths import REPO_ROOT
from twodquant_jax import methods, settings


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
  monkeypatch.syspath_prepend(str(REPO_ROOT))


def _config(fields=None, method="2dquant"):
  """x4 W2 `method` with `fields` ({"dqc.loss": "l2", ...}) changed."""
  from configs import base
  c = base.get_config(scale=4, bits=2, method=method)
  c.update_from_flattened_dict(fields or {})
  return c


@pytest.mark.parametrize("fields,message", [
    ({"scale": 5}, "config.scale must be 2, 3 or 4"),
    ({"bits": 9}, "config.bits must be between 2 and 8"),
    ({"method": "fp,nope"}, "config.method must be"),
    ({"method": "dobi,2dquant+rot", "model.bounds": "b.json"},
     "config.model.bounds: method '2dquant\\+rot' changes the network"),
    ({"eval.engine": "float"}, "config.eval.engine must be one of"),
    ({"eval.tile": 12}, "config.eval.tile must be a positive multiple of 8"),
    ({"eval.datasets": " , "}, "config.eval.datasets is empty"),
    ({"dqc.loss": "l2"}, "config.dqc.loss must be one of"),
    ({"dqc.schedule": "linear"}, "config.dqc.schedule must be one of"),
    ({"dqc.microbatch": "some"}, "config.dqc.microbatch must be 'auto' or an integer"),
    ({"dqc.log_every": 0}, "config.dqc.log_every must be >= 1"),
    ({"dqc.val_images": 0}, "config.dqc.val_images must be an integer >= 1"),
    ({"dobi.strategy": "fast"}, "dobi.strategy must be 'paper' or 'reference'"),
    ({"dobi.num_candidates": 0}, "config.dobi.num_candidates must be an integer >= 1"),
    ({"calib.lr_size": 20}, "config.calib.lr_size must be a positive multiple of 8"),
    ({"host_malloc": "jemalloc"}, "config.host_malloc must be one of"),
    ({"cpu_devices": "many"}, "config.cpu_devices must be 'auto' or a positive int"),
    ({"data.mirror": "ftp://m"}, "config.data.mirror 'ftp://m' is not an http"),
    ({"data.mirror_checksums": "x.json"}, "config.data.mirror_checksums replaces"),
    ({"distributed.num_processes": 2}, "need config.distributed.coordinator"),
    ({"report.figures": True, "report.visual_images": "baby"}, "config.report.visual_images"),
    ({"seed": -1}, "config.seed must be an integer >= 0"),
])
def test_parse_rejects_each_bad_field_in_one_line(fields, message):
  with pytest.raises(ValueError, match=message) as e:
    settings.parse(_config(fields))
  assert "\n" not in str(e.value)


def test_parse_builds_what_a_run_needs():
  s = settings.parse(_config(method="all"))
  assert s.methods == methods.ALL and s.quantized == methods.quantized(methods.ALL)
  assert set(s.calibrations) == set(methods.quantized(methods.ALL))
  assert s.calibrations["2dquant"].method == "dobi"
  assert (s.dqc.scale, s.dqc.bits, s.loop.batch_size) == (4, 2, 32)
  assert s.host == settings.HostSettings("auto", 0, 32) and s.figures is None
  assert s.config_dict == _config(method="all").to_dict()  # as given, for results.json
  fp = settings.parse(_config({"bits": 32}, method="fp"))  # no quantized method: bits unchecked
  assert fp.dqc is None and fp.loop is None and fp.calibrations == {}
  given = settings.parse(_config({"model.bounds": "b.json"}))  # given bounds: no calibration, DQC
  assert given.dqc is None and given.calibrations == {} and not given.data.need_calib


def test_settings_module_imports_only_the_registry():
  """settings.py is a leaf: importing it loads no JAX and no package module but methods."""
  code = ("import json, sys; import twodquant_jax.settings; "
          "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('jax', 'jaxlib', 'flax', 'numpy', 'twodquant_jax'))))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO_ROOT, check=True).stdout
  assert json.loads(out) == ["twodquant_jax", "twodquant_jax.methods", "twodquant_jax.settings"]


def _name_tests(path) -> list[str]:
  """Comparisons in `path` with a method name literal ('x' == m, m in ('a', 'b'), ...). Two
  other vocabularies share some of the words and are not method tests: a model's `mode` or
  `.mode` ('fp', nn/layers.py) and a calibration search's `.method` (settings.CALIBRATIONS)."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if not isinstance(node, ast.Compare):
      continue
    operands = [node.left, *node.comparators]
    for x in operands:
      items = x.elts if isinstance(x, (ast.Tuple, ast.List, ast.Set)) else [x]
      for item in items:
        if not (isinstance(item, ast.Constant) and item.value in methods.REGISTRY):
          continue
        others = [o for o in operands if o is not x]
        if any((isinstance(o, ast.Name) and o.id == "mode") or
               (isinstance(o, ast.Attribute) and (o.attr == "mode" or (
                   o.attr == "method" and item.value in settings.CALIBRATIONS)))
               for o in others):
          continue
        found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {ast.unparse(node)}")
  return found


def test_no_method_name_tests_outside_the_registry():
  paths = [p for p in sorted((REPO_ROOT / "twodquant_jax").rglob("*.py"))
           if p != REPO_ROOT / "twodquant_jax" / "methods.py"] + [REPO_ROOT / "main.py"]
  found = [f for p in paths for f in _name_tests(p)]
  assert found == [], "ask twodquant_jax/methods.py instead:\n" + "\n".join(found)
