"""Downloads into a local cache: resumable, checksum-verified, extracted atomically, mirrorable.

Used for the official weights (`data/weights.py`) and the data sets (`data/fetch.py`).

* `fetch` downloads a URL into `<dest>.part`, resuming a partial file with an HTTP Range request,
  verifies its sha256 (the published digest, else the one recorded on first download, see
  `ChecksumRecords`), and only then renames it to `dest`. A digest mismatch deletes the download.
* `ChecksumRecords`: trust on first use. Where no digest is published, the digest of the first
  download is written to `<cache>/checksums.json` and every later download (or cached file) of the
  same URL must match it.
* `atomic_dir` + `extract_images`: archives are unpacked into a temporary folder beside the target
  that is renamed into place only when complete, so a killed run never leaves a half set behind
  that a later run would take for a whole one.
* `mirror_url` replaces a URL's scheme and host with a mirror's, keeping the path.

Every failure is a `DownloadError` whose message is one line naming the URL, the cache path and
what to pass to use local files instead.

Why not a library: pooch 1.9 cannot resume a partial download (a cut transfer is deleted and the
retry sends no Range header, so a 3.5 GB DIV2K fetch cut at 90 % restarts from zero) and has no
trust-on-first-use digests (`known_hash=None` records nothing; a changed file passes later runs);
tensorflow-datasets 4.9's download manager sends no Range header either.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import socket
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable, Iterator

from absl import logging

from twodquant_jax import files
from twodquant_jax.progress import Progress

CHUNK = 1 << 20
USER_AGENT = "twodquant-jax"


class DownloadError(RuntimeError):
  """A file could not be downloaded, verified or unpacked (one-line message)."""


def sha256sum(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(CHUNK), b""):
      h.update(chunk)
  return h.hexdigest()


def one_line(text: object) -> str:
  """`text` with every run of whitespace (newlines included) folded into one space."""
  return " ".join(str(text).split())


def mirror_url(url: str, mirror: str | None) -> str:
  """`url` with its scheme and host replaced by the mirror's; the mirror's own path (if any) is
  put in front of the URL's path: ('https://a.org/x/y.zip', 'http://m:8000/pub') ->
  'http://m:8000/pub/x/y.zip'. No mirror: the URL unchanged."""
  if not mirror:
    return url
  m = urllib.parse.urlsplit(mirror)
  if m.scheme not in ("http", "https", "file") or (m.scheme != "file" and not m.netloc):
    raise ValueError(f"mirror {mirror!r} is not an http(s):// or file:// URL")
  u = urllib.parse.urlsplit(url)
  return urllib.parse.urlunsplit((m.scheme, m.netloc, m.path.rstrip("/") + u.path, u.query, ""))


class ChecksumRecords:
  """Trust-on-first-use digests, `{url: sha256}` in a JSON file (written atomically)."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)

  def _read(self) -> dict[str, str]:
    if not self.path.is_file():
      return {}
    try:
      data = json.loads(self.path.read_text())
    except (OSError, ValueError) as e:
      raise DownloadError(f"checksum records {self.path} are unreadable ({one_line(e)}); "
                          "delete the file to trust the next downloads afresh") from e
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

  def get(self, url: str) -> str | None:
    return self._read().get(url)

  def record(self, url: str, digest: str) -> None:
    with file_lock(self.path.with_name(f".{self.path.name}.lock")):  # runs sharing the cache
      data = self._read()
      data[url] = digest
      files.write_json(self.path, dict(sorted(data.items())))


def _open(url: str, offset: int, timeout: float):
  headers = {"User-Agent": USER_AGENT}
  if offset:
    headers["Range"] = f"bytes={offset}-"
  return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _transfer(url: str, part: Path, *, progress: bool, timeout: float) -> None:
  """Appends the rest of `url` to `part` (Range request from its size), or rewrites it from the
  start when the server ignores the range. Raises OSError-family errors on network failure."""
  offset = part.stat().st_size if part.is_file() else 0
  try:
    resp = _open(url, offset, timeout)
  except urllib.error.HTTPError as e:
    if e.code != 416 or not offset:  # 416: the range starts at or past the end: start again
      raise
    part.unlink()
    offset, resp = 0, _open(url, 0, timeout)
  with resp:
    status = getattr(resp, "status", None)
    start = 0
    if offset and status == 206:
      crange = resp.headers.get("Content-Range", "")
      start = offset if crange.startswith(f"bytes {offset}-") else 0
      if not start:
        raise DownloadError(f"{url}: the server answered a resume from byte {offset} with "
                            f"'Content-Range: {crange}'")
    if offset and not start:
      logging.info("%s: the server does not resume; downloading from the start", url)
    length = resp.headers.get("Content-Length")
    total = start + int(length) if length and length.isdigit() else None
    if offset and start:
      logging.info("%s: resuming at %.1f MB", url, start / 1e6)
    name = Path(urllib.parse.urlsplit(url).path).name or url
    with (Progress(total, name, initial=start, unit="B", bar=None if progress else False) as bar,
          open(part, "ab" if start else "wb") as f):
      for chunk in iter(lambda: resp.read(CHUNK), b""):
        f.write(chunk)
        bar.update(len(chunk))
  got = part.stat().st_size
  if total is not None and got != total:
    raise http.client.IncompleteRead(b"", total - got)


def fetch(url: str, dest: str | os.PathLike, *, sha256: str | None = None,
          records: ChecksumRecords | None = None, key: str | None = None, hint: str = "",
          progress: bool = True, timeout: float = 60.0, offline: bool = False) -> Path:
  """Downloads `url` to `dest` once; returns `dest`.

  The digest `dest` must have is `sha256` (a published one) if given, else the one `records`
  holds for `key` (default: `url`; pass the original URL as `key` when `url` is a mirror's),
  else none yet: then the first download's digest is recorded (trust on first use). A cached
  `dest` that does not match is downloaded again. The transfer goes to `<dest>.part`, which a
  later call resumes; it is renamed to `dest` only after the digest matched. `offline`: never
  touch the network (a missing or bad `dest` is an error).
  """
  dest = Path(dest)
  key = key or url
  expected = sha256 or (records.get(key) if records is not None else None)
  origin = "published" if sha256 else f"recorded on first download in {records.path}" if (
      expected and records is not None) else ""
  where = f"cache: {dest.parent}" + (f"; {hint}" if hint else "")
  if dest.is_file():
    if expected is None:
      if records is not None:
        records.record(key, sha256sum(dest))
      return dest
    if sha256sum(dest) == expected:
      return dest
    logging.warning("cached %s does not have the expected sha256; downloading it again", dest)
    dest.unlink()
  if offline:
    raise DownloadError(f"{dest} is not in the cache and downloads are off "
                        f"(--config.data.download=False), so {url} was not fetched ({where})")
  dest.parent.mkdir(parents=True, exist_ok=True)
  part = dest.with_name(dest.name + ".part")
  logging.info("downloading %s -> %s", url, dest)
  t0 = time.perf_counter()
  try:
    _transfer(url, part, progress=progress, timeout=timeout)
  except DownloadError as e:
    raise DownloadError(f"{one_line(e)} ({where})") from e
  except (OSError, http.client.HTTPException, ValueError) as e:
    reason = e.reason if isinstance(e, urllib.error.URLError) and not isinstance(
        e, urllib.error.HTTPError) else e
    if isinstance(reason, socket.timeout):
      reason = f"timed out after {timeout:.0f} s"
    kept = " (partial file kept; the next run resumes it)" if part.is_file() else ""
    raise DownloadError(f"could not download {url}: {one_line(reason)}{kept} ({where})") from e
  got = sha256sum(part)
  if expected is not None and got != expected:
    part.unlink()
    raise DownloadError(f"downloaded {url} has sha256 {got}, expected {expected} ({origin}); "
                        f"the download was deleted ({where})")
  os.replace(part, dest)
  if expected is None and records is not None:
    records.record(key, got)
  logging.info("downloaded %s (%.1f MB, %.1f s, sha256 %s)", dest.name, dest.stat().st_size / 1e6,
               time.perf_counter() - t0, got[:16])
  return dest


# ------------------------------------------------------------------------------------------------
# Atomic folders and archive extraction.


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
  """An exclusive advisory lock on `path` (created if missing) for the block, so that two runs
  sharing a cache take turns; a no-op where `fcntl` is missing (Windows)."""
  try:
    import fcntl
  except ImportError:  # pragma: no cover - not POSIX
    yield
    return
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _partials(target: Path) -> list[Path]:
  return sorted(target.parent.glob(f".{target.name}.partial-*"))


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
  """Yields a fresh temporary folder beside `target`; renames it to `target` when the block
  ends without an exception, else deletes it. Leftovers of a killed earlier run (hidden
  `.<name>.partial-*` folders) are deleted first; `target` itself never exists half-written."""
  target = Path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  for old in _partials(target):
    logging.info("removing %s (left by an interrupted run)", old)
    shutil.rmtree(old, ignore_errors=True)
  tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
  tmp.chmod(0o755)  # mkdtemp makes it private; the set is as readable as any other folder
  try:
    yield tmp
    if target.exists():
      shutil.rmtree(target)
    os.replace(tmp, target)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)


def _members(archive: Path) -> Iterator[tuple[str, Callable[[], object]]]:
  """(member path, opener) for every regular file of a zip or tar(.gz) archive."""
  if zipfile.is_zipfile(archive):
    with zipfile.ZipFile(archive) as z:
      for info in z.infolist():
        if not info.is_dir():
          yield info.filename, lambda info=info: z.open(info)
    return
  try:
    tar = tarfile.open(archive)
  except tarfile.TarError as e:
    raise DownloadError(f"{archive} is neither a zip nor a tar archive ({one_line(e)})") from e
  with tar:
    for info in tar:
      if info.isfile():
        yield info.name, lambda info=info: tar.extractfile(info)


def extract_images(archive: str | os.PathLike, out_dir: str | os.PathLike, *,
                   folder: str = "", suffixes: tuple[str, ...] = (".png",)) -> list[str]:
  """Copies the archive's images into `out_dir`, flat, by file name; returns the names.

  `folder`: only members whose parent folder has this name (e.g. 'DIV2K_train_HR'); empty = the
  images at any depth. Only base names are written (no path from the archive is ever joined to
  `out_dir`), so a hostile member path cannot escape it; two members with the same name are an
  error. macOS resource forks (`__MACOSX/`, `._*`) are skipped.
  """
  archive, out_dir = Path(archive), Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  names: list[str] = []
  seen: set[str] = set()
  try:
    for member, opener in _members(archive):
      parts = [p for p in member.replace("\\", "/").split("/") if p not in ("", ".")]
      if not parts or "__MACOSX" in parts or parts[-1].startswith("._"):
        continue
      if not parts[-1].lower().endswith(suffixes) or (folder and folder not in parts[:-1]):
        continue
      name = parts[-1]
      if name in seen:
        raise DownloadError(f"{archive}: two images named {name!r} ({member})")
      seen.add(name)
      with opener() as src, open(out_dir / name, "wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK)
      names.append(name)
  except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
    raise DownloadError(f"could not unpack {archive} ({one_line(e)})") from e
  return sorted(names)
