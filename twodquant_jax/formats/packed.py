"""The packed low-bit model file: one `safetensors` file with b-bit weight codes and every bound.

`model_<method>_x{s}_w{b}.safetensors` holds, under the official SwinIR / released 2DQuant
state-dict names and PyTorch layouts (Linear (out, in), Conv (O, I, kh, kw)):
  - `<linear>.weight.codes` (uint8, 1-D): the b-bit codes q of each of the 144 quantized linear
    weights (`...attn.qkv.{q,k,v}`, `...attn.proj`, `...mlp.fc1`, `...mlp.fc2`), in torch
    (out, in) C order, bit-packed densely by `nn.packing` (little-endian bit stream); the
    weight is w = s q + l with [l, u] its bounds and s = (u - l) / (2^b - 1);
  - `quant.weight_bounds` (float32, (144, 2)) and `quant.act_bounds` (float32, (240, 2)): [l, u]
    of every quantizer, rows in the order of the `weight_quantizers` / `act_quantizers` metadata;
  - every other tensor in float32: convolutions, LayerNorms, all biases (q/k/v split as in the
    released code), relative-position bias tables.
Metadata (strings): format, format_version, scale, bits, method, source_sha256 (the checkpoint the
weights came from), weight_quantizers / act_quantizers (JSON lists of the authors' quantizer
names), weight_shapes (JSON list of each codes tensor's (out, in)), content_sha256 (sha256 over the
tensors, so a corrupted payload is caught: safetensors itself has no checksum).

Version 2 (written for a network beyond the paper's; the paper's methods still write version 1,
which every reader of version 2 reads too) records what the network needs besides its weights:
  - the weights are the method's network's (e.g. rotations and channel scaling folded in, learned
    rounding baked in), so the codes are those the network quantizes;
  - `quant.weight_bounds` has one row per bound pair: a per-tensor quantizer has one row, a
    per-output-channel one (SwinIR `weight_channels`) one row per output channel, in the order
    of `weight_quantizers`; metadata `weight_bound_rows` (JSON list) gives each quantizer's count;
  - `extra/<collection>/<path>` (float32): the fixed variable collections the network reads
    (e.g. 'rotation': the run-time rotation matrices), path joined by '/';
  - metadata `arch` (JSON object): the SwinIR options that switch those on (lists for tuples).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from twodquant_jax import files
from twodquant_jax.formats.convert import convert_state_dict, infer_scale, merge_split_qkv
from twodquant_jax.nn.packing import pack, packed_nbytes, unpack
from twodquant_jax.nn.quantizer import num_levels
from twodquant_jax.nn.swinir import variable_shapes
from twodquant_jax.nn.names import (QuantTree, is_weight, leaves_by_name, name_from_path,
                                     path_from_name, quant_names)
from twodquant_jax.nn.quantizer import BOUNDS
from twodquant_jax.nn.student import Student

FORMAT = "twodquant-packed"
FORMAT_VERSION = 2  # the newest version this module writes and reads
VERSIONS = (1, 2)  # every version it reads
EXTRA = "extra/"
CODES = ".weight.codes"
WEIGHT_BOUNDS = "quant.weight_bounds"
ACT_BOUNDS = "quant.act_bounds"
_WQ = ".weight_quantizer"


class PackedFileError(ValueError):
  """A packed model file that cannot be used: unreadable, corrupted, or for another model."""


def packed_filename(method: str, scale: int, bits: int) -> str:
  return f"model_{method}_x{scale}_w{bits}.safetensors"


def torch_state_dict(params: Mapping) -> dict[str, np.ndarray]:
  """Flax params -> official state-dict names and layouts, qkv split into q/k/v (released code).

  The inverse of `convert.convert_state_dict` (buffers such as attn_mask are not written).
  """
  out: dict[str, np.ndarray] = {}
  renamed = {"patch_embed_norm": "patch_embed.norm", "upsample": "upsample.0"}
  for path, v in traverse_util.flatten_dict(params).items():
    *mods, key = path
    base = name_from_path(tuple(renamed.get(p, p) for p in mods))
    v = np.asarray(v, np.float32)
    if key == "kernel":
      v = v.T if v.ndim == 2 else v.transpose(3, 2, 0, 1)
    name = {"kernel": "weight", "scale": "weight"}.get(key, key)
    if base.endswith(".attn.qkv"):
      for i, part in enumerate(np.split(v, 3, axis=0)):
        out[f"{base}.{'qkv'[i]}.{name}"] = np.ascontiguousarray(part)
    else:
      out[f"{base}.{name}"] = np.ascontiguousarray(v)
  return out


def _content_sha256(tensors: Mapping[str, np.ndarray], meta: Mapping[str, str]) -> str:
  """sha256 over every tensor (name, dtype, shape, bytes) and every other metadata entry."""
  h = hashlib.sha256()
  for key in sorted(k for k in meta if k != "content_sha256"):
    h.update(f"{key}={meta[key]}|".encode())
  for name in sorted(tensors):
    t = np.ascontiguousarray(tensors[name])
    h.update(f"{name}|{t.dtype.str}|{t.shape}|".encode())
    h.update(t.tobytes())
  return h.hexdigest()


def weight_codes(w: np.ndarray, lower: np.ndarray | np.float32, upper: np.ndarray | np.float32,
                 bits: int) -> np.ndarray:
  """fake_quant's codes in numpy float32: round((clip(w, l, u) - l) / s), s = (u - l) / (2^b - 1).

  The same IEEE float32 operations as `nn.quantizer.quant_codes` (true divisions, round half to
  even), so the same integers; the load test checks fake_quant of both weights agree exactly.
  Bounds per output channel (torch layout (out, in)) are given as (out, 1) arrays.
  """
  lo, hi = np.float32(lower), np.float32(upper)
  step = (hi - lo) / np.float32(num_levels(bits))
  clipped = np.minimum(np.maximum(np.asarray(w, np.float32), lo), hi)
  return np.round((clipped - lo) / step).astype(np.int64)


def _flatten_extra(extra: Mapping) -> dict[str, np.ndarray]:
  """{collection: tree} -> {"extra/<collection>/<path>": float32 array}."""
  out = {}
  for name, tree in extra.items():
    for path, v in traverse_util.flatten_dict(dict(tree)).items():
      out[EXTRA + "/".join((name,) + tuple(path))] = np.ascontiguousarray(v, np.float32)
  return out


def _unflatten_extra(tensors: dict[str, np.ndarray]) -> dict:
  """The inverse of `_flatten_extra` (removes the extra tensors from `tensors`)."""
  flat = {}
  for key in [k for k in tensors if k.startswith(EXTRA)]:
    name, *path = key[len(EXTRA):].split("/")
    flat[(name, *path)] = tensors.pop(key)
  return traverse_util.unflatten_dict(flat) if flat else {}


def export_packed(path: str | Path, params: Mapping, quant: QuantTree, *, scale: int, bits: int,
                  method: str, source_sha256: str, extra: Mapping | None = None,
                  arch: Mapping | None = None, version: int | None = None) -> dict:
  """Writes the packed file (atomically) and returns its sizes (see `sizes`).

  `params`: the weights the network quantizes; `extra` / `arch`: its further collections and
  SwinIR options (a network beyond the paper's). Version 1 when there are none and the bounds
  are per tensor (the paper's methods: older readers read it), else version 2; `version`
  forces one (1 refuses what version 1 cannot hold).
  """
  extra, arch = dict(extra or {}), dict(arch or {})
  bounds = {k: np.asarray(v, np.float32)
            for k, v in sorted(leaves_by_name(quant, BOUNDS).items())}
  sd = torch_state_dict(params)
  wnames = [n for n in bounds if is_weight(n)]
  anames = [n for n in bounds if not is_weight(n)]
  if any(bounds[n].shape != (2,) for n in anames):
    raise ValueError("activation bounds must be per tensor (shape (2,))")
  keys = [name[:-len(_WQ)] + ".weight" for name in wnames]
  missing = [k for k in keys if k not in sd]
  if missing:
    raise ValueError(f"quantizers without a weight in the parameters, e.g. {missing[:2]}")
  weights = [sd.pop(k) for k in keys]
  rows = [1 if bounds[n].shape == (2,) else bounds[n].shape[-1] for n in wnames]
  if version is None:
    version = 1 if not extra and not arch and set(rows) <= {1} else FORMAT_VERSION
  if version == 1 and (extra or arch or set(rows) - {1}):
    raise ValueError("format version 1 holds per-tensor bounds of the FP network only")
  tensors: dict[str, np.ndarray] = {}
  pairs = []
  for key, w, n, r in zip(keys, weights, wnames, rows):
    if bounds[n].shape == (2,):
      lo, hi = bounds[n]
      pairs.append(bounds[n][None])
    else:
      if bounds[n].shape != (2, w.shape[0]):
        raise ValueError(f"{n}: per-channel bounds of shape {bounds[n].shape}, expected "
                         f"(2, {w.shape[0]})")
      lo, hi = bounds[n][0][:, None], bounds[n][1][:, None]
      pairs.append(bounds[n].T)
    tensors[key[:-len(".weight")] + CODES] = pack(weight_codes(w, lo, hi, bits).ravel(), bits)
  shapes = [list(w.shape) for w in weights]
  tensors.update(sd)
  tensors[WEIGHT_BOUNDS] = np.ascontiguousarray(np.concatenate(pairs), np.float32).reshape(-1, 2)
  tensors[ACT_BOUNDS] = np.asarray([bounds[n] for n in anames], np.float32).reshape(-1, 2)
  meta = {"format": FORMAT, "format_version": str(version), "scale": str(scale),
          "bits": str(bits), "method": method, "source_sha256": source_sha256,
          "weight_quantizers": json.dumps(wnames, separators=(",", ":")),
          "act_quantizers": json.dumps(anames, separators=(",", ":")),
          "weight_shapes": json.dumps(shapes, separators=(",", ":"))}
  if version >= 2:
    tensors.update(_flatten_extra(extra))
    meta["weight_bound_rows"] = json.dumps(rows, separators=(",", ":"))
    meta["arch"] = json.dumps(arch, sort_keys=True, separators=(",", ":"))
  meta["content_sha256"] = _content_sha256(tensors, meta)
  with files.atomic_path(path) as tmp:
    save_file(tensors, str(tmp), metadata=meta)
  return sizes(path, params, bits)


def _read(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
  if not path.is_file():
    raise FileNotFoundError(f"packed model file not found: {path}")
  try:
    with safe_open(str(path), framework="numpy") as f:
      meta = dict(f.metadata() or {})
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except (SafetensorError, OSError, ValueError) as e:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise PackedFileError(f"{path}: not a readable safetensors file, truncated or corrupted "
                          f"({reason})") from e
  return meta, tensors


def read_metadata(path: str | Path) -> dict[str, str]:
  """The metadata strings of a packed file, checked for the format and version."""
  path = Path(path)
  meta, _ = _read(path)
  _check_format(path, meta)
  return meta


def _check_format(path: Path, meta: Mapping[str, str]) -> None:
  if meta.get("format") != FORMAT:
    raise PackedFileError(f"{path}: not a {FORMAT} file (metadata format={meta.get('format')!r})")
  if meta.get("format_version") not in [str(v) for v in VERSIONS]:
    raise PackedFileError(f"{path}: format version {meta.get('format_version')!r}, this reader "
                          f"reads versions {', '.join(map(str, VERSIONS))}: use a newer "
                          "twodquant-jax")


def load_packed(path: str | Path, scale: int, bits: int | None = None
                ) -> tuple[dict, dict, dict[str, str]]:
  """Reads a packed file for an x`scale` model: (Flax params, 'quant' collection, metadata).

  Quantized weights come back as their dequantized values s q + l (float32), which fake_quant
  and the integer engine map back to exactly the stored codes. Raises PackedFileError (one line)
  for an unreadable, truncated or corrupted file, another format version, another scale, or (when
  `bits` is given) another bit width. A version-2 file's extra collections and SwinIR options:
  `load_student`.
  """
  net, quant, meta = load_student(path, scale, bits)
  return dict(net.params), quant, meta


def load_student(path: str | Path, scale: int, bits: int | None = None
                 ) -> tuple[Student, dict, dict[str, str]]:
  """`load_packed` as the network the file holds: (Student (weights, extra collections, SwinIR
  options; the paper's methods: the weights alone), 'quant' collection, metadata)."""
  path = Path(path)
  meta, tensors = _read(path)
  _check_format(path, meta)
  version = int(meta["format_version"])
  try:
    fscale, fbits = int(meta["scale"]), int(meta["bits"])
    wnames = json.loads(meta["weight_quantizers"])
    anames = json.loads(meta["act_quantizers"])
    shapes = json.loads(meta["weight_shapes"])
    digest = meta["content_sha256"]
    rows = json.loads(meta["weight_bound_rows"]) if version >= 2 else [1] * len(wnames)
    arch = json.loads(meta["arch"]) if version >= 2 else {}
  except (KeyError, ValueError) as e:
    raise PackedFileError(f"{path}: metadata incomplete or malformed, corrupted? ({e!r})") from e
  if fscale != scale:
    raise PackedFileError(f"{path} holds an x{fscale} model but the config asks for x{scale}: "
                          f"use an x{fscale} config")
  if bits is not None and fbits != bits:
    raise PackedFileError(f"{path} holds {fbits}-bit codes but config.bits={bits}: "
                          f"pass --config.bits={fbits}")
  if _content_sha256(tensors, meta) != digest:
    raise PackedFileError(f"{path}: tensors or metadata do not match its content_sha256 "
                          "(corrupted)")
  wb, ab = tensors.pop(WEIGHT_BOUNDS, None), tensors.pop(ACT_BOUNDS, None)
  if (wb is None or ab is None or not isinstance(arch, dict) or len(rows) != len(wnames)
      or wb.shape != (sum(rows), 2) or ab.shape != (len(anames), 2)
      or len(shapes) != len(wnames)):
    raise PackedFileError(f"{path}: bounds tensors do not match the quantizer name lists")
  offsets = np.cumsum([0] + rows)
  # one row: a per-tensor pair (2,); r rows: per-channel bounds (2, r)
  bounds = {n: wb[offsets[i]] if r == 1 else wb[offsets[i]:offsets[i + 1]].T
            for i, (n, r) in enumerate(zip(wnames, rows))}
  bounds.update({n: b for n, b in zip(anames, ab)})
  levels = np.float32(num_levels(fbits))
  for name, shape, r in zip(wnames, shapes, rows):
    key = name[:-len(_WQ)]
    data = tensors.pop(key + CODES, None)
    count = int(np.prod(shape))
    if data is None or data.shape != (packed_nbytes(count, fbits),) or r not in (1, shape[0]):
      raise PackedFileError(f"{path}: codes of {key} missing or of the wrong size")
    b = np.asarray(bounds[name], np.float32).reshape(2, -1)
    lo, hi = b[0][:, None], b[1][:, None]  # (1, 1) per tensor, (out, 1) per channel
    step = (hi - lo) / levels  # float32 IEEE division, as nn.quantizer.quant_step
    q = unpack(data, fbits, count).reshape(shape).astype(np.float32)
    tensors[key + ".weight"] = step * q + lo
  extra = _unflatten_extra(tensors)
  arch = {k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()}
  try:
    sd = merge_split_qkv(tensors)
    if infer_scale(sd) != scale:
      raise ValueError(f"the upsampler is for x{infer_scale(sd)}, the metadata says x{scale}")
    like = variable_shapes(scale, "quant", fbits)
    params = convert_state_dict(sd, like["params"], str(path))
    want = set(quant_names(like["quant"]))
    if set(bounds) != want:
      raise ValueError(f"bounds do not match the model's quantizers: {len(want - set(bounds))} "
                       f"missing, {len(set(bounds) - want)} unknown")
  except ValueError as e:  # CheckpointError is a ValueError
    raise PackedFileError(f"{path}: {e}") from e
  quant = traverse_util.unflatten_dict({
      path_from_name(n) + (BOUNDS,): jnp.asarray(np.asarray(b, np.float32))
      for n, b in bounds.items()})
  return Student(params, extra, arch), quant, meta


def sizes(path: str | Path, params: Mapping, bits: int) -> dict:
  """Measured sizes of a packed file against the ideal and the FP32 model.

  ideal = b bits per quantized weight + 32 bits per float tensor entry + 32 bits per bound;
  payload = the tensor bytes (ideal + at most one byte of padding per codes tensor); the rest of
  the file is the safetensors header (JSON with the metadata). measured compression = float32
  size of the model's parameters / file size.
  """
  path = Path(path)
  meta, tensors = _read(path)
  payload = sum(t.nbytes for t in tensors.values())
  shapes = json.loads(meta["weight_shapes"])
  n_codes = sum(int(np.prod(s)) for s in shapes)
  n_float = sum(t.size for k, t in tensors.items() if not k.endswith(CODES))
  ideal = n_codes * bits / 8 + 4 * n_float
  fp32 = 4 * sum(int(np.prod(np.shape(v))) for v in jax.tree_util.tree_leaves(params))
  file_bytes = path.stat().st_size
  return {"file": path.name, "bytes": file_bytes, "payload_bytes": int(payload),
          "header_bytes": file_bytes - int(payload), "ideal_bytes": float(ideal),
          "payload_over_ideal": payload / ideal, "file_over_ideal": file_bytes / ideal,
          "fp32_bytes": fp32, "compression": fp32 / file_bytes, "bits": bits}


def summary_line(info: Mapping, formula: float | None, table_entries: int) -> str:
  """One results.md line: size, overheads, measured compression vs the paper's formula."""
  line = (f"Packed model `{info['file']}`: {info['bytes']:,} bytes (payload "
          f"{100 * (info['payload_over_ideal'] - 1):+.2f}% and whole file "
          f"{100 * (info['file_over_ideal'] - 1):+.2f}% against the ideal "
          f"{info['ideal_bytes']:,.0f} bytes); measured compression {info['compression']:.2f}x")
  if formula is not None:
    line += (f" vs the paper formula's {formula:.2f}x, which leaves out the {table_entries:,} "
             "relative-position-table entries (float32 here) and the file's header and bounds")
  return line + "."
