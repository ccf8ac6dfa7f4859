"""The one progress helper: a tqdm bar on a terminal, periodic log lines otherwise.

Long work (calibration, DQC, evaluation, downloads) reports through `Progress`, so a terminal
shows a live bar and a log file (or a notebook, or a batch job whose stderr is not a terminal)
gets a line every `every_s` seconds with the count, the rate and the time left.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from absl import logging


class Progress:
  """`with Progress(total, "DQC") as p: p.update(1, loss=0.1)`.

  bar: None = a tqdm bar exactly when stderr is a terminal; False = log lines only (a run whose
  progress is switched off still logs every `every_s`); True = a bar.
  unit 'B' shows byte counts (downloads) in MB.
  """

  def __init__(self, total: int | None, desc: str, *, initial: int = 0, bar: bool | None = None,
               every_s: float = 30.0, unit: str = "it"):
    self.total, self.desc, self.n, self.unit = total, desc, initial, unit
    self.every_s = every_s
    # The rate is timed from the first update on: what comes before it is mostly a compile or a
    # connection, and would skew the time left.
    self._start_n, self._t0 = initial, None
    self._last_log = time.perf_counter()
    self._postfix: dict[str, Any] = {}
    use_bar = sys.stderr.isatty() if bar is None else bar
    self._bar = None
    if use_bar:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      kw = dict(unit="B", unit_scale=True, unit_divisor=1024) if unit == "B" else {}
      self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                       leave=False, **kw)

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def set_description(self, desc: str) -> None:
    """A new label (e.g. 'DQC (compiling)'), shown at once on the bar and in the next log line."""
    self.desc = desc
    if self._bar is not None:
      self._bar.set_description(desc)

  def update(self, n: int = 1, **postfix: Any) -> None:
    """Advances by `n`; `postfix` values (loss=..., psnr=...) are shown beside the count."""
    self.n += n
    if self._t0 is None:  # the first update's items finished before the clock started
      self._start_n, self._t0 = self.n, time.perf_counter()
    self._postfix.update(postfix)
    if self._bar is not None:
      self._bar.update(n)
      if postfix:
        self._bar.set_postfix({k: _short(v) for k, v in self._postfix.items()}, refresh=False)
      return
    now = time.perf_counter()
    if now - self._last_log >= self.every_s or (self.total and self.n >= self.total):
      self._last_log = now
      logging.info("%s", self.line(now))

  def line(self, now: float | None = None) -> str:
    """'DQC 120/3000 (4 %), 2.31 s/it, about 1 h 50 min left, loss 0.0123'; with unit 'B':
    'DIV2K_train_HR.zip 350.0 MB of 3530.0 MB (10 %), 12.5 MB/s, about 4 min left'."""
    now = time.perf_counter() if now is None else now
    done = self.n - self._start_n
    elapsed = now - self._t0 if self._t0 is not None else 0.0
    if self.unit == "B":
      count = f"{self.n / 1e6:.1f} MB" + (f" of {self.total / 1e6:.1f} MB" if self.total else "")
    else:
      count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
    parts = [f"{self.desc} {count}"]
    if self.total:
      parts[0] += f" ({100 * self.n / self.total:.0f} %)"
    if done > 0 and elapsed > 0:
      rate = elapsed / done  # seconds per unit
      if self.unit == "B":
        parts.append(f"{done / elapsed / 1e6:.1f} MB/s")
      else:
        parts.append(f"{rate:.2f} s/{self.unit}" if rate >= 1 else
                     f"{1 / rate:.1f} {self.unit}/s")
      if self.total and self.n < self.total:
        parts.append(f"about {_duration(rate * (self.total - self.n))} left")
    parts += [f"{k} {_short(v)}" for k, v in self._postfix.items()]
    return ", ".join(parts)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


def _short(v: Any) -> str:
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds < 90:
    return f"{seconds} s"
  minutes = seconds // 60
  if minutes < 90:
    return f"{minutes} min"
  return f"{minutes // 60} h {minutes % 60} min"
