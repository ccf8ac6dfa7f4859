"""The persistent XLA compilation cache: compiled steps survive the process, so a second run of
the same configuration (or a resumed one) does not recompile (about a minute per DQC step on CPU).

Set once at startup by `pipeline.run` from `config.compile_cache` ('default': `xla/` in the
project cache, $TWODQUANT_CACHE or ~/.cache/twodquant_jax; a path; empty: off).
"""

from __future__ import annotations

from pathlib import Path

import jax

from twodquant_jax import cache

DEFAULT = "default"  # <$TWODQUANT_CACHE or ~/.cache/twodquant_jax>/xla, beside the other caches


def enable(cache_dir: str) -> Path | None:
  """Turns the persistent compilation cache on in `cache_dir` (created; '~' expanded), caching
  every compile (also the fast CPU ones and small entries). Empty string: leaves it off.
  Returns the folder, or None when off."""
  if not cache_dir:
    return None
  path = cache.subdir("xla", "" if cache_dir == DEFAULT else cache_dir).resolve()
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
