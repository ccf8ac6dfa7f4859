"""The method registry: the paper's rows unchanged, the rows beyond it well formed, selectors."""

import pytest

from twodquant_jax import methods


def test_the_paper_rows_and_all_are_unchanged():
  assert methods.parse("all") == ("fp", "bicubic", "minmax", "percentile", "dobi", "2dquant")
  assert methods.parse("2dquant,fp") == ("fp", "2dquant")
  paper = [methods.REGISTRY[m] for m in methods.ALL]
  assert all(not m.changes_network for m in paper)
  assert methods.REGISTRY["2dquant"].init_from == "dobi"


def test_selectors_and_errors():
  assert set(methods.parse("beyond")) == set(methods.ROWS) - set(methods.ALL)
  assert methods.parse("all+") == methods.ROWS and methods.parse("all+")[:6] == methods.ALL
  assert methods.parse("2dquant++,dobi") == ("dobi", "2dquant++")
  for bad in ("all,dobi", "beyond,2dquant", "nope", ""):
    with pytest.raises(ValueError, match="config.method must be one of"):
      methods.parse(bad)


def test_every_new_row_changes_one_thing_and_dqc_rows_quantize_their_start():
  for name in methods.BEYOND:
    m = methods.REGISTRY[name]
    assert m.quantized and m.changes_network and not m.paper, name
    if m.dqc:
      start = methods.REGISTRY[m.init_from]
      assert start.quantized and not start.dqc, name
      # the network DQC trains is the one its start calibrated, plus the row's own options
      assert (m.stages, m.bias_correct) == (start.stages, start.bias_correct), name
      assert set(start.arch) <= set(m.arch), name
  assert len(set(methods.LABELS.values())) == len(methods.LABELS)


def test_network_sharing_and_dqc_folders():
  key = methods.network_key
  assert key("minmax") == key("dobi") == key("2dquant") == key("percentile")
  assert key("dobi+rot") == key("2dquant+rot") != key("dobi")
  assert methods.dqc_folder("2dquant") == ""  # the paper's run keeps its layout
  folders = {methods.dqc_folder(m) for m in methods.ROWS if methods.REGISTRY[m].dqc}
  assert len(folders) == sum(methods.REGISTRY[m].dqc for m in methods.ROWS)


def test_every_stage_a_row_names_is_registered():
  from twodquant_jax.ptq import stages  # pylint: disable=g-import-not-at-top
  named = {s for m in methods.REGISTRY.values() for s in m.stages}
  assert named <= set(stages.STAGES), sorted(named - set(stages.STAGES))
