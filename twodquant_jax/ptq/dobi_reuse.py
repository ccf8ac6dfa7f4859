"""The identity of a DOBI result, so a resumed 2DQuant run reuses `bounds_dobi.json` instead of
recomputing DOBI: the bounds file's meta carries the identity it was made with."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np


def dobi_identity(bits: int, scale: int, calib_settings: Mapping[str, Any],
                  params_fingerprint: str, calib_lr: np.ndarray) -> dict[str, Any]:
  """What a DOBI result depends on: bits, scale, the calibration settings, the FP weights
  (their fingerprint) and the exact calibration batch (sha256 of its uint8 bytes and shape)."""
  lr = np.ascontiguousarray(calib_lr, np.uint8)
  h = hashlib.sha256(str(lr.shape).encode())
  h.update(lr.tobytes())
  return json.loads(json.dumps({"bits": int(bits), "scale": int(scale),
                                "params": params_fingerprint, "calib_batch": h.hexdigest(),
                                "calib_settings": dict(calib_settings)}))


def reusable_bounds(path: Path, identity: Mapping) -> bool:
  """True when `path` is a bounds file whose meta carries exactly this identity."""
  if not Path(path).is_file():
    return False
  try:
    meta = json.loads(Path(path).read_text()).get("meta", {})
  except (OSError, json.JSONDecodeError, AttributeError):
    return False
  return isinstance(meta, Mapping) and meta.get("identity") == identity
