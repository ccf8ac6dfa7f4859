"""The official SwinIR-light release files: where they are, their digests, and the cached fetch.

`resolve_checkpoint` gives the checkpoint a run reads: a local file when one is given, else the
official file for the scale, downloaded once (`download.fetch`: published sha256, resumable,
mirrorable) into `<cache>/weights/` (`cache.subdir`) or `config.model.cache_dir`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from twodquant_jax import cache as cache_root
from twodquant_jax.data import download

SUBDIR = "weights"
RELEASE = "https://github.com/JingyunLiang/SwinIR/releases/download/v0.0/"
OFFICIAL = {
    2: ("002_lightweightSR_DIV2K_s64w8_SwinIR-S_x2.pth",
        "193b229909ca89cd8b55de9c9e7fce146ae759d59dfcd78d8feb9dd1d6fa0fd7"),
    3: ("002_lightweightSR_DIV2K_s64w8_SwinIR-S_x3.pth",
        "53af0cf0b15876752c1c2646a71444f739523b3d562e126d200521a817ab5d2c"),
    4: ("002_lightweightSR_DIV2K_s64w8_SwinIR-S_x4.pth",
        "09fad24e32ae62722e1a055efde9921328f4137981bab0a42a4a3a806306c58e"),
}


def fetch_official(scale: int, cache_dir: str | Path | None = None, *, mirror: str = "",
                   progress: bool = True, download_ok: bool = True,
                   mirror_digests: Mapping[str, str] | None = None) -> Path:
  """Returns the official SwinIR-light checkpoint for `scale`, downloading it once into the cache.

  Through `download.fetch`: verified against the published sha256, resumable, never left half
  written under its final name; `mirror` replaces the release host (same path);
  `download_ok=False` only accepts the cached file. `mirror_digests` ({original URL: sha256},
  only with a mirror) names the digest of a mirror's own version of the file.
  """
  if scale not in OFFICIAL:
    raise ValueError(f"no official SwinIR-light checkpoint for scale {scale} (2, 3 or 4)")
  name, digest = OFFICIAL[scale]
  cache = cache_root.subdir(SUBDIR, cache_dir or "")
  url = RELEASE + name
  if mirror and mirror_digests and url in mirror_digests:
    digest = mirror_digests[url]
  return download.fetch(download.mirror_url(url, mirror), cache / name, sha256=digest,
                        hint="to use a local file pass --config.model.checkpoint=/path/to/file.pth",
                        progress=progress, offline=not download_ok)


def resolve_checkpoint(checkpoint: str | None, scale: int, cache_dir: str | None = None, *,
                       mirror: str = "", progress: bool = True, download_ok: bool = True,
                       mirror_digests: Mapping[str, str] | None = None) -> Path:
  """A local path when given (must exist), else the official file for `scale` (downloaded, from
  `mirror` when given, unless `download_ok` is False)."""
  if checkpoint:
    path = Path(checkpoint).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f"checkpoint not found: {path}")
    return path
  return fetch_official(scale, cache_dir, mirror=mirror, progress=progress,
                        download_ok=download_ok, mirror_digests=mirror_digests)
