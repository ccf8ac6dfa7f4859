"""The packed export: bit packing round trips, the file's sizes, a lossless load of the quantized
model, clear errors for bad files, and `main.py`-style runs from the packed file alone."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from twodquant_jax import pipeline, settings
from twodquant_jax.data.images import load_rgb, save_png
from twodquant_jax.formats import bounds_file, convert, packed
from twodquant_jax.nn import packing
from twodquant_jax.nn.quantizer import fake_quant
from twodquant_jax.nn.swinir import variable_shapes
from shared_paths import REPO_ROOT
from twodquant_jax.nn import names as qnames


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("count", [1, 7, 13, 1001])
def test_pack_round_trip_odd_counts(bits, count):
  codes = np.random.default_rng(bits * count).integers(0, 2 ** bits, count)
  data = packing.pack(codes, bits)
  assert data.dtype == np.uint8 and data.shape == (-(-count * bits // 8),)
  np.testing.assert_array_equal(packing.unpack(data, bits, count), codes)


def test_pack_layout():
  """Little-endian bit stream: 2-bit codes 4 to a byte, 3-bit codes 8 in 3 bytes."""
  np.testing.assert_array_equal(packing.pack(np.array([1, 2, 3, 0, 1]), 2), [0b00111001, 0b01])
  np.testing.assert_array_equal(packing.pack(np.array([0xA, 0x3]), 4), [0x3A])
  three = packing.pack(np.arange(8), 3)  # 0..7 -> bits 000 100 010 110 001 101 011 111 (LSB first)
  stream = sum(int(c) << (3 * i) for i, c in enumerate(range(8)))
  np.testing.assert_array_equal(three, list(stream.to_bytes(3, "little")))
  with pytest.raises(ValueError, match=r"codes must be integers in \[0, 3\]"):
    packing.pack(np.array([4]), 2)


@pytest.fixture(scope="module")
def model(reference):
  params, _ = convert.load_checkpoint(reference / "swinir_light_x4_random.pth", 4,
                                      variable_shapes(4)["params"])
  bounds = reference / "ref2dq_x4_w4_random_b4.json"
  return params, bounds


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
  params, bounds = model
  quant = bounds_file.load_bounds(bounds, variable_shapes(4, "quant", 4)["quant"])
  path = tmp_path_factory.mktemp("packed") / packed.packed_filename("dobi", 4, 4)
  info = packed.export_packed(path, params, quant, scale=4, bits=4, method="dobi",
                              source_sha256="ab" * 32)
  return path, info, quant


def test_state_dict_inverse_of_converter(model):
  params, _ = model
  sd = packed.torch_state_dict(params)
  assert sd["layers.0.residual_group.blocks.0.attn.qkv.k.weight"].shape == (60, 60)
  back = convert.convert_state_dict(convert.merge_split_qkv(sd), variable_shapes(4)["params"])
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(a, b)


def test_load_is_lossless_for_the_quantized_model(model, exported):
  params, _ = model
  path, _, quant = exported
  p2, q2, meta = packed.load_packed(path, 4, 4)
  assert (meta["bits"], meta["scale"], meta["source_sha256"]) == ("4", "4", "ab" * 32)
  assert len(json.loads(meta["weight_quantizers"])) == 144
  assert len(json.loads(meta["act_quantizers"])) == 240
  assert qnames.tree_to_dict(q2) == qnames.tree_to_dict(quant)
  bounds = qnames.tree_to_dict(quant)
  flat1 = traverse_util.flatten_dict(params)
  flat2 = traverse_util.flatten_dict(p2)
  assert set(flat1) == set(flat2)
  quantized = 0
  fq = jax.jit(fake_quant, static_argnums=3)
  for key, v in flat1.items():
    if key[-1] == "kernel" and key[-2] in ("qkv", "proj", "fc1", "fc2"):
      parts = ("q", "k", "v") if key[-2] == "qkv" else (None,)
      for i, part in enumerate(parts):
        sl = slice(60 * i, 60 * (i + 1)) if part else slice(None)
        name = qnames.name_from_path(key[:-1] + ((part,) if part else ())) + ".weight_quantizer"
        lo, hi = bounds[name]
        np.testing.assert_array_equal(fq(v[:, sl], lo, hi, 4), fq(flat2[key][:, sl], lo, hi, 4))
        quantized += 1
    else:
      np.testing.assert_array_equal(v, flat2[key])  # float tensors are stored exactly
  assert quantized == 144


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_sizes_against_ideal(model, exported, tmp_path, bits):
  params, quant = model[0], exported[2]  # the 4-bit bounds, used at `bits` bits
  info = packed.export_packed(tmp_path / "m.safetensors", params, quant, scale=4, bits=bits,
                              method="dobi", source_sha256="0" * 64)
  n_all = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params))
  n_lin = 24 * (4 * 60 * 60 + 2 * 60 * 120)  # q, k, v, proj, fc1, fc2 per block
  ideal = n_lin * bits / 8 + 4 * (n_all - n_lin) + 4 * 2 * 384
  assert info["ideal_bytes"] == ideal
  assert info["payload_bytes"] <= 1.01 * ideal and info["bytes"] <= 1.10 * ideal
  assert info["bytes"] == (tmp_path / "m.safetensors").stat().st_size
  assert info["compression"] == pytest.approx(4 * n_all / info["bytes"])


def _rewrite(src: Path, dst: Path, **meta_changes) -> Path:
  with safe_open(str(src), framework="numpy") as f:
    meta = f.metadata()
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  meta.update(meta_changes)
  save_file(tensors, str(dst), metadata=meta)
  return dst


def _corrupt(src: Path, dst: Path, how: str) -> Path:
  data = bytearray(src.read_bytes())
  if how == "truncated":
    data = data[:len(data) // 2]
  elif how == "truncated_header":
    data = data[:5]
  elif how == "payload":
    data[-1000] ^= 0x10
  elif how == "header":
    data[200] = ord("}")
  dst.write_bytes(bytes(data))
  return dst


@pytest.mark.parametrize("how,message", [
    ("truncated", "truncated or corrupted"), ("truncated_header", "truncated or corrupted"),
    ("payload", "do not match its content_sha256"), ("header", "corrupted")])
def test_bad_files_give_one_line_errors(exported, tmp_path, how, message):
  path = _corrupt(exported[0], tmp_path / f"{how}.safetensors", how)
  with pytest.raises(packed.PackedFileError, match=message) as e:
    packed.load_packed(path, 4, 4)
  assert "\n" not in str(e.value) and path.name in str(e.value)


def test_wrong_scale_version_bits_give_one_line_errors(exported, tmp_path):
  path = exported[0]
  cases = [(lambda: packed.load_packed(path, 2), "holds an x4 model but the config asks for x2"),
           (lambda: packed.load_packed(path, 4, 3), "holds 4-bit codes but config.bits=3"),
           (lambda: packed.load_packed(_rewrite(path, tmp_path / "v3.safetensors",
                                                format_version="3"), 4),
            "format version '3', this reader reads versions 1, 2"),
           (lambda: packed.load_packed(_rewrite(path, tmp_path / "other.safetensors",
                                                format="other"), 4), "not a twodquant-packed")]
  for fn, message in cases:
    with pytest.raises(packed.PackedFileError, match=message) as e:
      fn()
    assert "\n" not in str(e.value)


def _per_channel(quant) -> dict:
  """The bounds with every weight quantizer per output channel: (2, out), rows spread apart."""
  flat = traverse_util.flatten_dict(quant)
  out = {}
  for key, b in flat.items():
    name = qnames.name_from_path(key[:-1])
    if qnames.is_weight(name):
      n = 120 if ".fc1." in name else 60
      spread = np.linspace(0.5, 1.5, n, dtype=np.float32)
      b = np.stack([np.asarray(b[0]) * spread, np.asarray(b[1]) * spread[::-1]])
    out[key] = jnp.asarray(b)
  return traverse_util.unflatten_dict(out)


def test_paper_methods_write_version_1_and_it_still_loads(exported):
  """A network without extras or per-channel bounds (the paper's methods) is written as
  version 1, the format older readers read, and the version-2 reader loads it as before."""
  path = exported[0]
  assert packed.read_metadata(path)["format_version"] == "1"
  net, quant, _ = packed.load_student(path, 4, 4)
  assert (dict(net.extra), dict(net.arch)) == ({}, {})
  assert qnames.tree_to_dict(quant) == qnames.tree_to_dict(exported[2])


def test_version_2_round_trip_extra_arch_per_channel(model, exported, tmp_path):
  """Version 2 holds what a network beyond the paper needs: per-channel weight bounds (codes
  per output row), extra collections (e.g. rotation matrices) and the SwinIR options."""
  params, quant = model[0], _per_channel(exported[2])
  rot = np.linalg.qr(np.random.default_rng(0).normal(size=(60, 60)))[0].astype(np.float32)
  extra = {"rotation": {"layers_0": {"blocks_0": {"fc1": rot}}}}
  arch = {"rotate": ("fc1",), "weight_channels": True}
  path = tmp_path / "v2.safetensors"
  packed.export_packed(path, params, quant, scale=4, bits=2, method="2dquant++",
                       source_sha256="cd" * 32, extra=extra, arch=arch)
  assert packed.read_metadata(path)["format_version"] == "2"
  net, q2, meta = packed.load_student(path, 4, 2)
  assert dict(net.arch) == arch and meta["method"] == "2dquant++"
  np.testing.assert_array_equal(net.extra["rotation"]["layers_0"]["blocks_0"]["fc1"], rot)
  got, want = qnames.leaves_by_name(q2, "bounds"), qnames.leaves_by_name(quant, "bounds")
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])
  # Each output row is dequantized with its own bounds: the loaded weight is the row-wise
  # fake-quantized weight, with at most 2^b levels per row.
  flat1, flat2 = traverse_util.flatten_dict(params), traverse_util.flatten_dict(net.params)
  key = ("layers_0", "residual_group", "blocks_0", "mlp", "fc1", "kernel")
  w, w2 = np.asarray(flat1[key]).T, np.asarray(flat2[key]).T  # torch (out, in)
  lo, hi = np.asarray(want["layers.0.residual_group.blocks.0.mlp.fc1.weight_quantizer"])
  assert w2.shape == (120, 60) and not np.allclose(lo, lo[0])
  step = (hi - lo) / np.float32(3)
  np.testing.assert_allclose(w2, np.round((np.clip(w, lo[:, None], hi[:, None]) - lo[:, None])
                                          / step[:, None]) * step[:, None] + lo[:, None],
                             rtol=0, atol=1e-6)
  assert max(len(np.unique(row)) for row in w2) <= 4
  with pytest.raises(ValueError, match="version 1 holds per-tensor bounds"):
    packed.export_packed(tmp_path / "v1.safetensors", params, quant, scale=4, bits=2,
                         method="x", source_sha256="0" * 64, version=1)


def _tiny_set5(root: Path, benchmarks: Path) -> None:
  for name in ("baby", "bird"):  # 64x64 HR -> 16x16 LR
    hr = load_rgb(benchmarks / "Set5" / "HR" / f"{name}.png")
    y, x = hr.shape[0] // 3, hr.shape[1] // 3
    save_png(root / "Set5" / "HR" / f"{name}.png", hr[y:y + 64, x:x + 64])


@pytest.mark.slow
def test_pipeline_export_then_evaluate_from_file_alone(reference, benchmarks, tmp_path,
                                                       monkeypatch):
  """Bounds + export -> results.md size line; the packed file alone (no FP checkpoint, `method`
  only names the row) gives the same PSNR/SSIM with fake-quant, and within 0.01 dB with int."""
  monkeypatch.syspath_prepend(str(REPO_ROOT))
  from configs import base
  _tiny_set5(tmp_path / "bench", benchmarks)

  def config(**kw):
    c = base.get_config(scale=4, bits=4, method="dobi")
    c.data.root, c.eval.datasets, c.progress = str(tmp_path / "bench"), "Set5", False
    for k, v in kw.items():
      section, field = k.split("__")
      c[section][field] = v
    return c

  run = lambda c, workdir: pipeline.run(settings.parse(c), workdir)
  r1 = run(config(model__checkpoint=str(reference / "swinir_light_x4_random.pth"),
                           model__bounds=str(reference / "ref2dq_x4_w4_random_b4.json"),
                           export__packed=True), tmp_path / "a")
  file = tmp_path / "a" / "model_dobi_x4_w4.safetensors"
  info = r1["methods"]["dobi"]["packed"]
  assert info["bytes"] == file.stat().st_size
  md = (tmp_path / "a" / "results.md").read_text()
  assert f"{info['bytes']:,} bytes" in md and "32,400 relative-position-table" in md
  c2 = config(model__packed=str(file), model__checkpoint="/nonexistent.pth")
  c2.method = "2dquant"  # only names the row: no DQC runs, the bounds come from the file
  r2 = run(c2, tmp_path / "b")
  c3 = config(model__packed=str(file), eval__engine="int")
  r3 = run(c3, tmp_path / "c")
  d1 = r1["methods"]["dobi"]["datasets"]["Set5"]
  d2 = r2["methods"]["2dquant"]["datasets"]["Set5"]
  d3 = r3["methods"]["dobi"]["datasets"]["Set5"]
  assert (d2["psnr"], d2["ssim"]) == (d1["psnr"], d1["ssim"])
  assert abs(d3["psnr"] - d1["psnr"]) < 0.01
  assert (r1["methods"]["dobi"]["engine"], r3["methods"]["dobi"]["engine"]) == ("fake", "int")
  assert r2["methods"]["2dquant"]["bounds_from"] == str(file)


def test_config_validation(exported, monkeypatch):
  monkeypatch.syspath_prepend(str(REPO_ROOT))
  from configs import base
  cases = [({"eval.engine": "float"}, "config.eval.engine must be one of"),
           ({"model.packed": "/no/such.safetensors"}, "config.model.packed: file not found"),
           ({"model.packed": str(exported[0]), "model.bounds": "b.json"}, "are exclusive"),
           ({"model.packed": str(exported[0]), "method": "fp,dobi"}, "quantized methods only")]
  for changes, message in cases:
    c = base.get_config(scale=4, bits=4, method="dobi")
    for key, value in changes.items():
      node = c
      for part in key.split(".")[:-1]:
        node = node[part]
      node[key.split(".")[-1]] = value
    with pytest.raises((ValueError, FileNotFoundError), match=message):  # (paths: at check)
      pipeline.check_inputs(settings.parse(c))
  c = base.get_config(scale=4, bits=4, method="2dquant")
  c.model.packed, c.eval.engine = str(exported[0]), "int"
  # no DQC settings needed: the file's bounds are evaluated as they are
  pipeline.check_inputs(settings.parse(c))
