"""The data a run needs as local folders: given folders as they are, else sets in a download cache.

`resolve(DataSettings)` returns the benchmark root and the calibration folder. A given
`data.root` / `calib.root` is used as it is (nothing is downloaded into it). Otherwise the sets
live in `<cache>/<Name>/HR/*.png` (cache: `data.cache`, else `$TWODQUANT_CACHE/data`, else
`~/.cache/twodquant_jax/data`); a missing set is downloaded (`data/sources.py` says from where)
unless `download` is off, in which case the network is never touched.

A set folder appears in the cache only complete: it is assembled in a hidden temporary folder
and renamed into place (`download.atomic_dir`), with a `source.json` manifest (file names and
sizes) that every later run checks; a set that fails the check is fetched again. Downloads go to
`<cache>/downloads/<Name>/` (resumable `.part` files) and are deleted once unpacked. Manga109
is never downloaded: a missing Manga109 is reported with where to put it and left out.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import urllib.parse
from pathlib import Path

from absl import logging

from twodquant_jax import cache as cache_root
from twodquant_jax.data import download, sources
from twodquant_jax.data.download import DownloadError
from twodquant_jax.settings import DataSettings
from twodquant_jax.files import write_json

SUBDIR = "data"  # <cache root>/data, unless data.cache names another folder
MANIFEST = "source.json"
RECORDS = "checksums.json"
IMAGE_SUFFIXES = (".png",)


@dataclasses.dataclass(frozen=True)
class DataRoots:
  data_root: Path
  calib_root: Path
  datasets: tuple[str, ...]  # the requested sets that are available, in the requested order
  missing: tuple[str, ...]  # requested sets left out (Manga109 when it is not there)


def is_complete(folder: Path) -> bool:
  """A set folder with HR images: every file its manifest lists, at its size (a folder without
  manifest, put there by hand, counts when it holds any PNG)."""
  hr = Path(folder) / "HR"
  if not hr.is_dir():
    return False
  manifest = Path(folder) / MANIFEST
  if not manifest.is_file():
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in hr.iterdir())
  try:
    files = json.loads(manifest.read_text())["files"]
  except (OSError, ValueError, KeyError, TypeError):
    return False
  return bool(files) and all((hr / n).is_file() and (hr / n).stat().st_size == size
                             for n, size in files.items())


def _local_flag(name: str) -> str:
  if name == sources.CALIB_SET:
    return "--config.calib.root=DIR (a folder of training images)"
  return f"--config.data.root=DIR (holding {name}/HR/*.png)"


def ensure(name: str, s: DataSettings) -> Path:
  """`<cache>/<name>` holding `HR/*.png`, downloaded and laid out first when missing."""
  cache = cache_root.subdir(SUBDIR, s.cache)
  folder = cache / name
  if is_complete(folder):
    return folder
  hint = f"to use local data instead pass {_local_flag(name)}"
  if name not in sources.SOURCES:
    raise DownloadError(f"{name} is not in the cache {cache} and has no download source (known: "
                        f"{', '.join(sources.SOURCES)}): put it in {folder / 'HR'}/ or {hint}")
  src = sources.SOURCES[name]
  if not src.downloadable:
    raise DownloadError(f"{name} is not downloadable ({src.licence}): put its HR PNGs in "
                        f"{folder / 'HR'}/ or pass {_local_flag(name)}")
  if not s.download:
    raise DownloadError(f"{name} is not in the cache {cache} and --config.data.download=False "
                        f"(nothing is downloaded): run once with downloads on, or {hint}")
  with download.file_lock(cache / f".{name}.lock"):  # another run may be fetching it right now
    if is_complete(folder):
      return folder
    return _fetch_set(src, folder, s, hint)


def _fetch_set(src: sources.Source, folder: Path, s: DataSettings, hint: str) -> Path:
  """Downloads `src` and lays it out as `folder/HR` (caller holds the set's lock)."""
  name, cache = src.name, folder.parent
  if folder.exists():
    logging.warning("%s is incomplete (files missing or changed); fetching it again", folder)
  overrides = dict(s.mirror_checksums)
  records = download.ChecksumRecords(cache / RECORDS)
  downloads = cache / "downloads" / name
  t0 = time.perf_counter()
  logging.info("%s: fetching into %s (%s)", name, folder, src.about)
  try:
    with download.atomic_dir(folder) as tmp:
      hr = tmp / "HR"
      hr.mkdir()
      for remote in src.remotes:
        fname = Path(urllib.parse.urlsplit(remote.url).path).name
        path = download.fetch(download.mirror_url(remote.url, s.mirror), downloads / fname,
                              sha256=overrides.get(remote.url, remote.sha256),
                              records=None if remote.url in overrides else records,
                              key=remote.url, hint=hint, progress=s.progress)
        if src.kind == "files":
          shutil.copyfile(path, hr / fname)
        else:
          download.extract_images(path, hr, folder=src.folder, suffixes=IMAGE_SUFFIXES)
      files = {p.name: p.stat().st_size for p in sorted(hr.iterdir())}
      if not files:
        raise DownloadError(f"{name}: the download holds no PNG images"
                            f"{f' in a folder {src.folder!r}' if src.folder else ''} "
                            f"(cache: {cache}; {hint})")
      if len(files) != src.images:
        logging.warning("%s: %d images, expected %d", name, len(files), src.images)
      write_json(tmp / MANIFEST, {
          "name": name, "urls": [r.url for r in src.remotes], "mirror": s.mirror,
          "licence": src.licence, "files": files})
    shutil.rmtree(downloads, ignore_errors=True)  # unpacked: the archives are not kept
  finally:  # partial downloads stay for the next run to resume; empty folders go
    for d in (downloads, downloads.parent):
      if d.is_dir() and not any(d.iterdir()):
        d.rmdir()
  logging.info("%s: %d images in %s (%.1f s)", name, len(files), folder / "HR",
               time.perf_counter() - t0)
  return folder


def resolve(s: DataSettings) -> DataRoots:
  """The benchmark root and calibration folder of a run, downloading missing sets (see module)."""
  cache = cache_root.subdir(SUBDIR, s.cache)
  missing: list[str] = []
  if s.root:
    data_root, datasets = Path(s.root).expanduser(), list(s.datasets)
  else:
    data_root, datasets = cache, []
    for name in s.datasets:
      src = sources.SOURCES.get(name)
      if not is_complete(cache / name) and src is not None and not src.downloadable:
        logging.warning("%s is missing and is not downloaded (%s): put its HR PNGs in %s/ "
                        "(or in <root>/%s/HR/ with --config.data.root=<root>) to evaluate on "
                        "it; leaving it out of this run", name, src.licence, cache / name / "HR",
                        name)
        missing.append(name)
        continue
      ensure(name, s)
      datasets.append(name)
    if s.datasets and not datasets:
      raise DownloadError(f"none of the requested sets ({', '.join(s.datasets)}) is available "
                          f"in the cache {cache}: pass --config.data.root=DIR (holding "
                          "<Name>/HR/*.png) or --config.eval.datasets=Set5,Set14,B100,Urban100")
  if s.calib_root:
    calib_root = Path(s.calib_root).expanduser()
  elif s.need_calib:
    calib_root = ensure(sources.CALIB_SET, s) / "HR"
  else:  # not read by this run; where it would be
    calib_root = cache / sources.CALIB_SET / "HR"
  return DataRoots(data_root, calib_root, tuple(datasets), tuple(missing))
