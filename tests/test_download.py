"""Data downloads, offline: a loopback HTTP server (with Range support) serves small archives made
here, laid out like the real sources' paths, through `data.mirror`."""

import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import urllib.parse
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from twodquant_jax import pipeline, settings
from twodquant_jax.data import sources
from twodquant_jax.data.benchmarks import load_benchmark
from twodquant_jax.data import fetch as data_cache, download, weights
from twodquant_jax.data.download import DownloadError
from shared_paths import REPO_ROOT

SET14_URL = sources.SOURCES["Set14"].remotes[0].url
DIV2K_URL = sources.SOURCES["DIV2K"].remotes[0].url


class _Handler(BaseHTTPRequestHandler):
  """GET of files under `server.root`, honouring `Range: bytes=N-` when `server.ranges`."""

  def do_GET(self):  # noqa: N802 (http.server's name)
    srv = self.server
    rng = self.headers.get("Range")
    srv.requests.append((self.path, rng))
    path = srv.root / urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
    if not path.is_file():
      self.send_error(404)
      return
    data = path.read_bytes()
    start = 0
    m = re.fullmatch(r"bytes=(\d+)-", rng or "")
    if m and srv.ranges:
      start = int(m.group(1))
      if start >= len(data):
        self.send_response(416)
        self.send_header("Content-Range", f"bytes */{len(data)}")
        self.send_header("Content-Length", "0")
        self.end_headers()
        return
      self.send_response(206)
      self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    else:
      self.send_response(200)
    self.send_header("Content-Length", str(len(data) - start))
    self.end_headers()
    self.wfile.write(data[start:])

  def log_message(self, *args):  # keep the test output clean
    pass


@pytest.fixture
def server(tmp_path):
  srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  srv.root, srv.requests, srv.ranges = tmp_path / "mirror", [], True
  srv.root.mkdir()
  thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
  thread.start()
  srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
  yield srv
  srv.shutdown()
  srv.server_close()


def _png_bytes(seed: int, size: int = 24) -> bytes:
  img = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
  buf = io.BytesIO()
  from PIL import Image
  Image.fromarray(img).save(buf, format="PNG")
  return buf.getvalue()


def _serve(srv, url: str, data: bytes) -> Path:
  """Puts `data` where the mirror serves `url`'s path."""
  path = srv.root / urllib.parse.urlsplit(url).path.lstrip("/")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)
  return path


def _tar_gz(members: dict[str, bytes]) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    for name, data in members.items():
      z.writestr(name, data)
  return buf.getvalue()


SET14 = {f"Set14_HR/img_{i:03d}.png": _png_bytes(i) for i in range(1, 4)}
SET14["Set14_HR/more/img_004.png"] = _png_bytes(4)  # nested: laid out flat
SET14["Set14_HR/readme.txt"] = b"not an image"


def _settings(srv, cache: Path, **kw) -> data_cache.DataSettings:
  base = dict(datasets=("Set14",), cache=str(cache), mirror=srv.url, progress=False)
  return data_cache.DataSettings(**{**base, **kw})


def _leftovers(cache: Path) -> list[str]:
  """Downloads, partial files and partial folders under the cache."""
  return sorted(str(p.relative_to(cache)) for p in cache.rglob("*")
                if ".partial-" in p.name or p.name.endswith(".part") or "downloads" in p.parts)


def test_download_extract_layout_then_cache_only(server, tmp_path, benchmarks):
  set5 = {Path(r.url).name: (benchmarks / "Set5" / "HR" / Path(r.url).name).read_bytes()
          for r in sources.SOURCES["Set5"].remotes}
  for r in sources.SOURCES["Set5"].remotes:  # the real files: their digests are pinned
    _serve(server, r.url, set5[Path(r.url).name])
  _serve(server, SET14_URL, _tar_gz(SET14))
  div2k = {f"DIV2K_train_HR/{i:04d}.png": _png_bytes(100 + i, 40) for i in range(1, 3)}
  div2k["other/0003.png"] = _png_bytes(3)  # not in the HR folder: left out
  zip_bytes = _zip(div2k)
  # A test mirror holds a different DIV2K zip than the published one: its digest replaces it.
  over = ((DIV2K_URL, download.sha256sum(_serve(server, DIV2K_URL, zip_bytes))),)
  cache = tmp_path / "cache"
  s = _settings(server, cache, datasets=("Set5", "Set14", "Manga109"), need_calib=True,
                mirror_checksums=over)
  got = data_cache.resolve(s)
  assert got.data_root == cache and got.calib_root == cache / "DIV2K" / "HR"
  assert got.datasets == ("Set5", "Set14") and got.missing == ("Manga109",)
  assert {p.name: p.read_bytes() for p in (cache / "Set5" / "HR").iterdir()} == set5
  hr14 = sorted(p.name for p in (cache / "Set14" / "HR").iterdir())
  assert hr14 == ["img_001.png", "img_002.png", "img_003.png", "img_004.png"]
  assert (cache / "Set14" / "HR" / "img_004.png").read_bytes() == SET14[
      "Set14_HR/more/img_004.png"]
  assert sorted(p.name for p in got.calib_root.iterdir()) == ["0001.png", "0002.png"]
  assert [i.name for i in load_benchmark(got.data_root, "Set14", 2)] == [
      "img_001", "img_002", "img_003", "img_004"]
  records = json.loads((cache / "checksums.json").read_text())
  # Trust on first use only where no digest is published or given.
  assert records == {SET14_URL: download.sha256sum(server.root / urllib.parse.urlsplit(
      SET14_URL).path.lstrip("/"))}
  assert _leftovers(cache) == []
  assert len(server.requests) == 5 + 1 + 1
  # A second run reads the cache: not one request.
  server.requests.clear()
  assert data_cache.resolve(s) == got
  assert server.requests == []
  # A set whose files changed after it was laid out is fetched again.
  (cache / "Set14" / "HR" / "img_002.png").write_bytes(b"truncated")
  assert not data_cache.is_complete(cache / "Set14")
  data_cache.resolve(s)
  assert [p for p, _ in server.requests] == [urllib.parse.urlsplit(SET14_URL).path]
  assert (cache / "Set14" / "HR" / "img_002.png").read_bytes() == SET14["Set14_HR/img_002.png"]


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
def test_resumes_a_partial_download(server, tmp_path, ranges):
  server.ranges = ranges
  archive = _tar_gz(SET14)
  _serve(server, SET14_URL, archive)
  cache = tmp_path / "cache"
  part = cache / "downloads" / "Set14" / "Set14_HR.tar.gz.part"
  part.parent.mkdir(parents=True)
  half = len(archive) // 2
  part.write_bytes(archive[:half])
  data_cache.resolve(_settings(server, cache))
  assert server.requests == [(urllib.parse.urlsplit(SET14_URL).path, f"bytes={half}-")]
  assert len(list((cache / "Set14" / "HR").iterdir())) == 4
  # The recorded digest is the whole archive's, whether the server resumed (206) or not (200).
  assert download.ChecksumRecords(cache / "checksums.json").get(SET14_URL) == \
      download.hashlib.sha256(archive).hexdigest()
  assert _leftovers(cache) == []


def test_checksum_mismatch_is_one_line_and_leaves_nothing(server, tmp_path, benchmarks):
  cache = tmp_path / "cache"
  # Trust on first use: a recorded digest that the archive no longer matches.
  _serve(server, SET14_URL, _tar_gz(SET14))
  download.ChecksumRecords(cache / "checksums.json").record(SET14_URL, "0" * 64)
  with pytest.raises(DownloadError) as e:
    data_cache.resolve(_settings(server, cache))
  msg = str(e.value)
  assert "\n" not in msg and "sha256" in msg and "recorded on first download" in msg
  assert server.url + urllib.parse.urlsplit(SET14_URL).path in msg
  assert str(cache) in msg and "--config.data.root=" in msg
  assert not (cache / "Set14").exists() and _leftovers(cache) == []
  # A published (pinned) digest: Set5 served with one altered file.
  for r in sources.SOURCES["Set5"].remotes:
    _serve(server, r.url, (benchmarks / "Set5" / "HR" / Path(r.url).name).read_bytes())
  bird = sources.SOURCES["Set5"].remotes[1].url
  _serve(server, bird, _png_bytes(0))
  with pytest.raises(DownloadError, match=r"bird\.png has sha256 .*\(published\)"):
    data_cache.resolve(_settings(server, cache, datasets=("Set5",)))
  # Nothing of the bad file; the one verified before it is kept for the next run.
  assert not (cache / "Set5").exists()
  assert _leftovers(cache) == ["downloads", "downloads/Set5", "downloads/Set5/baby.png"]


_KILL_MID_EXTRACTION = """
import os, signal, sys
from twodquant_jax.data import fetch as data_cache, download
real, count = download.shutil.copyfileobj, [0]
def copy_then_die(src, dst, length=0):
  real(src, dst, length)
  count[0] += 1
  if count[0] == 2:  # two images written, then the process is killed
    os.kill(os.getpid(), signal.SIGKILL)
download.shutil.copyfileobj = copy_then_die
data_cache.ensure("Set14", data_cache.DataSettings(cache=sys.argv[1], mirror=sys.argv[2],
                                                   progress=False))
"""


def test_killed_mid_extraction_leaves_no_usable_set(server, tmp_path):
  _serve(server, SET14_URL, _tar_gz(SET14))
  cache = tmp_path / "cache"
  r = subprocess.run([sys.executable, "-c", _KILL_MID_EXTRACTION, str(cache), server.url],
                     cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == -9, r.stderr[-2000:]
  partial = list(cache.glob(".Set14.partial-*"))
  assert len(partial) == 1 and len(list((partial[0] / "HR").iterdir())) == 2  # really half done
  assert not (cache / "Set14").exists() and not data_cache.is_complete(cache / "Set14")
  with pytest.raises(DownloadError, match="not in the cache"):
    data_cache.resolve(_settings(server, cache, download=False))
  # The next run clears the leftover and unpacks the archive it had already verified.
  server.requests.clear()
  got = data_cache.resolve(_settings(server, cache))
  assert server.requests == []
  assert len(list((got.data_root / "Set14" / "HR").iterdir())) == 4
  assert not list(cache.glob(".Set14.partial-*")) and _leftovers(cache) == []


def test_extraction_error_leaves_nothing(server, tmp_path, monkeypatch):
  _serve(server, SET14_URL, _tar_gz(SET14))
  cache = tmp_path / "cache"
  real = download.shutil.copyfileobj

  def copy_then_fail(src, dst, length=0):
    real(src, dst, length)
    raise OSError("disk full")

  monkeypatch.setattr(download.shutil, "copyfileobj", copy_then_fail)
  with pytest.raises(DownloadError, match="could not unpack .*disk full"):
    data_cache.resolve(_settings(server, cache))
  assert not (cache / "Set14").exists() and not list(cache.glob(".Set14.partial-*"))


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_refused_connection_is_one_line(tmp_path):
  mirror = f"http://127.0.0.1:{_closed_port()}"
  cache = tmp_path / "cache"
  s = data_cache.DataSettings(datasets=("Set14",), cache=str(cache), mirror=mirror,
                              progress=False)
  with pytest.raises(DownloadError) as e:
    data_cache.resolve(s)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(f"could not download {mirror}/datasets/eugenesiow/")
  assert "refused" in msg.lower() and str(cache) in msg and "--config.data.root=" in msg
  assert not (cache / "Set14").exists()


def test_download_off_or_local_root_never_touches_the_network(server, tmp_path, benchmarks):
  _serve(server, SET14_URL, _tar_gz(SET14))
  cache = tmp_path / "cache"
  with pytest.raises(DownloadError, match=r"download=False .*--config\.data\.root="):
    data_cache.resolve(_settings(server, cache, download=False))
  with pytest.raises(DownloadError, match=r"DIV2K .*--config\.calib\.root="):
    data_cache.resolve(_settings(server, cache, datasets=(), need_calib=True, download=False))
  got = data_cache.resolve(_settings(server, cache, root=str(benchmarks), need_calib=True,
                                     calib_root=str(tmp_path / "mine"),
                                     datasets=("Set14", "Manga109")))
  assert (got.data_root, got.calib_root) == (benchmarks, tmp_path / "mine")
  assert got.datasets == ("Set14", "Manga109")  # a given root is used as it is
  assert server.requests == [] and not cache.exists()


def test_mirror_url():
  url = "https://huggingface.co/datasets/eugenesiow/Set14/resolve/main/data/Set14_HR.tar.gz?x=1"
  assert download.mirror_url(url, "http://127.0.0.1:8000") == \
      "http://127.0.0.1:8000/datasets/eugenesiow/Set14/resolve/main/data/Set14_HR.tar.gz?x=1"
  assert download.mirror_url(url, "https://m.example/pub/") == \
      "https://m.example/pub/datasets/eugenesiow/Set14/resolve/main/data/Set14_HR.tar.gz?x=1"
  assert download.mirror_url(url, "") == url
  with pytest.raises(ValueError, match="not an http"):
    download.mirror_url(url, "127.0.0.1:8000")


def test_config_defaults_and_validation(tmp_path):
  sys.path.insert(0, str(REPO_ROOT))
  from configs import base
  c = base.get_config(scale=4, bits=2, method="2dquant")
  assert (c.data.root, c.calib.root, c.data.download) == ("", "", True)
  s = settings.data_settings(c)
  assert s.need_calib and s.datasets[-1] == "Manga109"
  c.method, c.calib.batch_file = "dobi", "batch.npz"
  assert not settings.data_settings(c).need_calib  # the batch file replaces the images
  c.method = "fp"
  assert not settings.data_settings(c).need_calib
  c.data.mirror_checksums = str(tmp_path / "sums.json")
  with pytest.raises(ValueError, match="only accepted together with config.data.mirror"):
    settings.parse(c)
  c.data.mirror = "ftp://host"
  with pytest.raises(ValueError, match="not an http"):
    settings.parse(c)
  c.data.mirror = "http://127.0.0.1:1"
  (tmp_path / "sums.json").write_text('{"https://a/b.zip": "xyz"}')
  with pytest.raises(ValueError, match="sha256 hex"):  # the file is read before any work
    pipeline.check_inputs(settings.parse(c))


def test_main_offline_stops_with_one_line(tmp_path, reference):
  """`main.py` with an unreachable source: exit status 1, one FATAL line, no traceback."""
  mirror = f"http://127.0.0.1:{_closed_port()}"
  r = subprocess.run(
      [sys.executable, str(REPO_ROOT / "main.py"), "--config=configs/fp_x4.py",
       f"--config.model.checkpoint={reference / 'swinir_light_x4_random.pth'}",
       "--config.eval.datasets=Set5", f"--config.data.mirror={mirror}",
       f"--config.data.cache={tmp_path / 'cache'}", f"--workdir={tmp_path / 'run'}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO_ROOT)})
  assert r.returncode == 1, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  fatal = [line for line in r.stderr.splitlines() if line.startswith("FATAL")]
  assert len(fatal) == 1 and f"could not download {mirror}/JingyunLiang/SwinIR/" in fatal[0]
  assert "--config.data.root=" in fatal[0] and str(tmp_path / "cache") in fatal[0]


def test_official_weights_through_the_mirror_and_offline(server, tmp_path, reference, monkeypatch):
  """The weights use the same module: fetched through the mirror at the release path, and with
  downloads off only the cached file is accepted (no request)."""
  name, _ = weights.OFFICIAL[4]
  path = _serve(server, weights.RELEASE + name,
                (reference / "swinir_light_x4_random.pth").read_bytes())
  monkeypatch.setitem(weights.OFFICIAL, 4, (name, download.sha256sum(path)))
  cache = tmp_path / "models"
  with pytest.raises(DownloadError, match=r"downloads are off .*--config\.model\.checkpoint="):
    weights.resolve_checkpoint(None, 4, str(cache), mirror=server.url, download_ok=False)
  assert server.requests == []
  got = weights.resolve_checkpoint(None, 4, str(cache), mirror=server.url, progress=False)
  assert got == cache / name and got.read_bytes() == path.read_bytes()
  assert [p for p, _ in server.requests] == [
      "/JingyunLiang/SwinIR/releases/download/v0.0/" + name]
  assert weights.resolve_checkpoint(None, 4, str(cache), mirror=server.url,
                                    download_ok=False) == got
  assert len(server.requests) == 1


def test_mirror_digest_for_other_weights(server, tmp_path, reference):
  """A mirror holding another file at the weights' release path is refused against the pinned
  digest, and accepted (still verified) with its own digest given for the original URL."""
  name, _ = weights.OFFICIAL[4]
  path = _serve(server, weights.RELEASE + name, (reference / "standin_x4.pth").read_bytes())
  with pytest.raises(DownloadError, match="sha256"):
    weights.resolve_checkpoint(None, 4, str(tmp_path / "a"), mirror=server.url, progress=False)
  got = weights.resolve_checkpoint(
      None, 4, str(tmp_path / "b"), mirror=server.url, progress=False,
      mirror_digests={weights.RELEASE + name: download.sha256sum(path)})
  assert got.read_bytes() == path.read_bytes()
  with pytest.raises(DownloadError, match="sha256"):  # a wrong given digest still fails
    weights.resolve_checkpoint(None, 4, str(tmp_path / "c"), mirror=server.url, progress=False,
                               mirror_digests={weights.RELEASE + name: "0" * 64})


def test_two_runs_sharing_a_cache_take_turns(server, tmp_path):
  """Two runs fetching the same set at once: one downloads, the other waits and uses it."""
  _serve(server, SET14_URL, _tar_gz(SET14))
  cache = tmp_path / "cache"
  out, errors = [], []

  def run():
    try:
      out.append(data_cache.ensure("Set14", _settings(server, cache)))
    except Exception as e:  # noqa: BLE001 (reported below)
      errors.append(e)

  threads = [threading.Thread(target=run) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  assert errors == [] and out == [cache / "Set14"] * 2
  assert len(server.requests) == 1 and len(list((cache / "Set14" / "HR").iterdir())) == 4


def test_every_cache_is_below_the_cache_root(tmp_path, monkeypatch):
  """Weights and data sets go to <$TWODQUANT_CACHE>/weights and /data (cache.subdir), so one
  variable moves every cache; offline, the one-line error names that folder."""
  monkeypatch.setenv("TWODQUANT_CACHE", str(tmp_path / "root"))
  with pytest.raises(DownloadError, match=re.escape(str(tmp_path / "root" / "weights"))):
    weights.fetch_official(4, download_ok=False)
  with pytest.raises(DownloadError, match=re.escape(f"cache {tmp_path / 'root' / 'data'} ")):
    data_cache.resolve(data_cache.DataSettings(datasets=("Set5",), download=False))
