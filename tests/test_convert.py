"""Checkpoint reading and conversion: the happy path and every bad-file case gives a clear error."""

import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twodquant_jax.formats import convert
from twodquant_jax.data import download, weights
from twodquant_jax.data.download import DownloadError
from twodquant_jax.nn.swinir import SwinIR
from twodquant_jax.formats.torch_pickle import CheckpointError, load_pth


def shapes(scale):
  model = SwinIR(upscale=scale)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))["params"]


def test_reads_official_format_without_torch(reference):
  obj = load_pth(reference / "swinir_light_x3_random.pth")
  sd = obj["params"]
  assert sd["conv_first.weight"].shape == (60, 3, 3, 3)
  assert sd["conv_first.weight"].dtype == np.float32
  assert sd["layers.0.residual_group.blocks.0.attn.relative_position_index"].dtype == np.int64
  assert convert.infer_scale(sd) == 3


def test_conversion_layouts(reference):
  sd = load_pth(reference / "swinir_light_x4_random.pth")["params"]
  params, _ = convert.load_checkpoint(reference / "swinir_light_x4_random.pth", 4, shapes(4))
  blk = params["layers_1"]["residual_group"]["blocks_3"]
  np.testing.assert_array_equal(blk["attn"]["qkv"]["kernel"],
                                sd["layers.1.residual_group.blocks.3.attn.qkv.weight"].T)
  np.testing.assert_array_equal(params["upsample"]["kernel"],
                                sd["upsample.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["patch_embed_norm"]["scale"], sd["patch_embed.norm.weight"])


def test_bare_state_dict_and_split_qkv_are_accepted(reference):
  sd = load_pth(reference / "swinir_light_x2_random.pth")["params"]
  bare = convert.state_dict_from(dict(sd))
  assert bare.keys() == sd.keys()
  key = "layers.0.residual_group.blocks.0.attn.qkv"
  split = {k: v for k, v in sd.items() if not k.startswith(key + ".")}
  for i, part in enumerate("qkv"):
    split[f"{key}.{part}.weight"] = sd[key + ".weight"][i * 60:(i + 1) * 60]
    split[f"{key}.{part}.bias"] = sd[key + ".bias"][i * 60:(i + 1) * 60]
  split[f"{key}.q.weight_quantizer.lower_bound"] = np.array([-0.5], np.float32)
  split[f"{key}.q.weight_quantizer.upper_bound"] = np.array([0.25], np.float32)
  merged, bounds = convert.split_quant_bounds(convert.merge_split_qkv(split))
  np.testing.assert_array_equal(merged[key + ".weight"], sd[key + ".weight"])
  assert bounds == {f"{key}.q.weight_quantizer": [-0.5, 0.25]}


def test_truncated_checkpoint(reference, tmp_path):
  data = (reference / "swinir_light_x4_random.pth").read_bytes()
  bad = tmp_path / "truncated.pth"
  bad.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="truncated.pth"):
    convert.load_checkpoint(bad, 4, shapes(4))


def test_text_file_renamed_pth(tmp_path):
  bad = tmp_path / "notes.pth"
  bad.write_text("this is not a checkpoint\n")
  with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
    convert.load_checkpoint(bad, 4, shapes(4))


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError):
    weights.resolve_checkpoint(str(tmp_path / "nope.pth"), 4)


def test_wrong_scale_for_config(reference):
  with pytest.raises(CheckpointError, match="x2 checkpoint but the config asks for x4"):
    convert.load_checkpoint(reference / "swinir_light_x2_random.pth", 4, shapes(4))


def test_corrupt_storage_inside_zip(reference, tmp_path):
  """A zip whose tensor storage is short: the loader names the storage and the file."""
  src = zipfile.ZipFile(reference / "swinir_light_x4_random.pth")
  bad = tmp_path / "short_storage.pth"
  with zipfile.ZipFile(bad, "w") as out:
    for info in src.infolist():
      data = src.read(info.filename)
      if info.filename.endswith("/data/0"):
        data = data[:-8]
      out.writestr(info.filename, data)
  with pytest.raises(CheckpointError, match="short_storage.pth"):
    load_pth(bad)


def test_missing_and_unexpected_keys(reference):
  sd = dict(load_pth(reference / "swinir_light_x4_random.pth")["params"])
  del sd["norm.weight"]
  sd["extra.weight"] = np.zeros((3, 3), np.float32)
  with pytest.raises(CheckpointError, match="missing.*norm.scale.*unexpected.*extra"):
    convert.convert_state_dict(sd, shapes(4))


def test_foreign_pickle_objects_are_refused(tmp_path):
  import pickle

  class Evil:
    def __reduce__(self):
      return (print, ("pwned",))

  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("evil/data.pkl", pickle.dumps({"params": Evil()}, protocol=2))
  with pytest.raises(CheckpointError, match="does not accept"):
    load_pth(path)


def test_download_checks_sha_and_caches(tmp_path, reference, monkeypatch):
  """The download path end to end, served from a file:// URL (no network here): a good file is
  verified and cached; a corrupt cache is refetched; a digest mismatch is a clear error and
  leaves no partial file behind."""
  name, _ = weights.OFFICIAL[4]
  server = tmp_path / "server"
  server.mkdir()
  (server / name).write_bytes((reference / "swinir_light_x4_random.pth").read_bytes())
  good = download.sha256sum(server / name)
  monkeypatch.setattr(weights, "RELEASE", server.as_uri() + "/")
  monkeypatch.setitem(weights.OFFICIAL, 4, (name, good))
  cache = tmp_path / "cache"
  path = weights.fetch_official(4, cache)
  assert path == cache / name and download.sha256sum(path) == good
  path.write_bytes(b"corrupted cache")
  assert download.sha256sum(weights.fetch_official(4, cache)) == good
  monkeypatch.setitem(weights.OFFICIAL, 4, (name, "0" * 64))
  (cache / name).unlink()
  with pytest.raises(DownloadError, match="sha256"):
    weights.fetch_official(4, cache)
  assert list(cache.iterdir()) == []
  monkeypatch.setattr(weights, "RELEASE", (tmp_path / "nowhere").as_uri() + "/")
  with pytest.raises(DownloadError, match="--config.model.checkpoint"):
    weights.fetch_official(4, cache)
