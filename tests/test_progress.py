"""The progress helper's log lines (no terminal): count, rate from the first update on, time left,
postfix values, byte counts for downloads, and a label that changes (DQC's compile)."""

import logging

import pytest

from twodquant_jax import progress


@pytest.fixture
def clock(monkeypatch):
  now = [0.0]
  monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
  return now


def test_rate_excludes_what_came_before_the_first_update(clock):
  """A 100 s compile before the first step must not enter the rate: 2 s/it, not 35 s/it."""
  p = progress.Progress(10, "DQC (compiling)", bar=False, every_s=1e9)
  clock[0] = 100.0
  p.set_description("DQC")
  p.update(1, loss=0.5)
  clock[0] = 104.0
  p.update(1, loss=0.25)
  p.update(1, loss=0.125)
  assert p.line() == "DQC 3/10 (30 %), 2.00 s/it, about 14 s left, loss 0.125"


def test_bytes_show_megabytes_and_speed(clock):
  p = progress.Progress(100_000_000, "big.zip", initial=40_000_000, unit="B", bar=False)
  p.update(10_000_000)
  clock[0] = 2.0
  p.update(20_000_000)
  assert p.line() == "big.zip 70.0 MB of 100.0 MB (70 %), 10.0 MB/s, about 3 s left"


def test_logs_every_period_and_at_the_end(clock, caplog):
  p = progress.Progress(4, "eval", bar=False, every_s=10.0)
  with caplog.at_level(logging.INFO):
    for t in (1.0, 5.0, 12.0, 13.0):
      clock[0] = t
      p.update(1)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval ")]
  assert [line.split(",")[0] for line in lines] == ["eval 3/4 (75 %)", "eval 4/4 (100 %)"]
