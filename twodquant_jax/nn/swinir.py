"""SwinIR-light (the official "SwinIR-S") in Flax linen, NHWC, with optional fake quantizers.

The network follows the official PyTorch code (SPEC.md section 1): shallow conv, 4 residual Swin
transformer blocks (RSTB) of 6 Swin blocks each, LayerNorm, conv, pixelshuffledirect upsampler.
The 384 quantizers of the released 2DQuant code sit in every Swin block (SPEC.md section 3); the
`mode` attribute ('fp', 'capture', 'quant', 'int') says what they do, see `nn/layers.py`.
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from twodquant_jax.nn.layers import (ATTN_PROBS, MATMUL_OUT, FakeQuant, QuantDense, QuantQKV,
                                     check_mode, qmatmul)

RGB_MEAN = (0.4488, 0.4371, 0.4040)
ROTATE_KINDS = ("qkv", "fc1", "fc2")  # linears whose input SwinIR(rotate=...) rotates at run time
LN_EPS = 1e-5
MASK_VALUE = -100.0
# What a Swin block keeps for its backward pass (`SwinIR.remat`):
#   'off'      everything XLA keeps (the plain gradient);
#   'matmuls'  only the float matmul outputs and the attention probabilities, recomputing the
#              element-wise work (LayerNorm, fake quantizers, GELU) from them;
#   'full'     only the block's input: the whole block is recomputed (smallest; the block
#              pairs then run in a scan, `scan_blocks`).
REMAT_MODES = ("off", "matmuls", "full")


def check_rotate(rotate: Sequence[str]) -> None:
  """Raises ValueError for a kind of `SwinIR.rotate` that has no run-time rotation."""
  bad = sorted(set(rotate) - set(ROTATE_KINDS))
  if bad:
    raise ValueError(f"SwinIR.rotate: unknown kinds {bad}; run-time rotations exist for "
                     f"{ROTATE_KINDS} (attention rotations are folded into the params)")


def window_partition(x: jnp.ndarray, ws: int) -> jnp.ndarray:
  """(B, H, W, C) -> (B * nW, ws*ws, C), windows in row-major order per image (as torch)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // ws, ws, w // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, ws * ws, c)


def window_reverse(windows: jnp.ndarray, ws: int, h: int, w: int) -> jnp.ndarray:
  """Inverse of `window_partition`: (B * nW, ws*ws, C) -> (B, H, W, C)."""
  c = windows.shape[-1]
  x = windows.reshape(-1, h // ws, w // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, h, w, c)


@functools.lru_cache(maxsize=64)
def relative_position_index(ws: int) -> np.ndarray:
  """Index into the (2ws-1)^2 relative position bias table for each (query, key) pair."""
  coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (ws - 1)
  return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


@functools.lru_cache(maxsize=64)
def shifted_window_mask(h: int, w: int, ws: int, shift: int) -> np.ndarray:
  """Attention mask (nW, N, N) for shifted windows of an h x w map: 0 within a region, -100 across.

  Computed for the actual size (the checkpoint's stored mask is for 64x64 only).
  """
  img = np.zeros((1, h, w, 1), np.float32)
  cnt = 0
  for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
    for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
      img[:, hs, wsl, :] = cnt
      cnt += 1
  win = np.asarray(window_partition(img, ws))[..., 0]  # (nW, N)
  diff = win[:, None, :] - win[:, :, None]
  return np.where(diff != 0, MASK_VALUE, 0.0).astype(np.float32)


@flax.struct.dataclass
class ValidRegion:
  """Where each image of a batch lies in a larger canvas (an evaluation bucket), as data.

  Image b occupies the top-left valid_hw[b] of the canvas (multiples of the window size); the
  rest is padding. With it the network computes, for every valid pixel, exactly what it computes
  on the image alone: features outside the image are zeroed before each 3x3 convolution (the
  convolution's zero padding), and the shifted-window roll wraps around the image's own size
  (a gather), so every shifted window holds the tokens it holds on the image alone, with the
  same region mask. Windows are aligned at the origin, so none mixes image and padding tokens.
  """
  keep: jnp.ndarray     # (B, H, W, 1) bool: inside the image
  roll: jnp.ndarray     # (B, H*W) int32: source token of each position of the shifted map
  unroll: jnp.ndarray   # (B, H*W) int32: the inverse gather
  regions: jnp.ndarray  # (B, H, W) int32: shifted_window_mask's region of each shifted position


def _axis_layout(valid: jnp.ndarray, n: int, ws: int, shift: int):
  """Per image, along one axis of length n: roll source, unroll source, region band, inside."""
  pos = jnp.arange(n)[None, :]
  v = valid[:, None]
  inside = pos < v
  src = jnp.where(inside, (pos + shift) % v, pos)
  dst = jnp.where(inside, (pos - shift) % v, pos)
  band = jnp.where(pos < v - ws, 0, jnp.where(pos < v - shift, 1, jnp.where(inside, 2, 3)))
  return src, dst, band, inside


def valid_region(valid_hw: jnp.ndarray, hw: tuple[int, int], ws: int, shift: int) -> ValidRegion:
  """The `ValidRegion` of images of sizes valid_hw (B, 2) int in an hw canvas (traceable)."""
  (h, w), valid_hw = hw, jnp.asarray(valid_hw, jnp.int32)
  src_h, dst_h, band_h, in_h = _axis_layout(valid_hw[:, 0], h, ws, shift)
  src_w, dst_w, band_w, in_w = _axis_layout(valid_hw[:, 1], w, ws, shift)
  flat = lambda a, b: (a[:, :, None] * w + b[:, None, :]).reshape(-1, h * w)
  return ValidRegion(keep=(in_h[:, :, None] & in_w[:, None, :])[..., None],
                     roll=flat(src_h, src_w), unroll=flat(dst_h, dst_w),
                     regions=band_h[:, :, None] * 4 + band_w[:, None, :])


def _gather_tokens(y: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
  """y (B, H, W, C) with its tokens permuted per image: out[b, p] = y[b, index[b, p]]."""
  b, h, w, c = y.shape
  return jnp.take_along_axis(y.reshape(b, h * w, c), index[..., None], axis=1).reshape(y.shape)


def region_mask(regions: jnp.ndarray, ws: int) -> jnp.ndarray:
  """(B, H, W) region ids -> (B * nW, 1, N, N) additive mask: 0 within a region, -100 across."""
  win = window_partition(regions[..., None], ws)[..., 0]
  return jnp.where(win[:, :, None] != win[:, None, :], MASK_VALUE, 0.0)[:, None]


def _zero_outside(x: jnp.ndarray, region: ValidRegion | None) -> jnp.ndarray:
  """x (B, H, W, C) with the padding around each image set to 0 (a 3x3 conv's zero padding)."""
  return x if region is None else jnp.where(region.keep, x, 0.0)


class WindowAttention(nn.Module):
  """Window multi-head self-attention with relative position bias and the four BMM quantizers."""
  dim: int
  num_heads: int
  window_size: int
  mode: str = "fp"
  bits: int = 4
  rotate: tuple[str, ...] = ()  # run-time input rotations (ROTATE_KINDS)
  weight_channels: bool = False  # per-output-channel weight bounds (SwinIR.weight_channels)
  rounding: bool = False  # learned weight rounding (SwinIR.rounding)

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: np.ndarray | jnp.ndarray | None) -> jnp.ndarray:
    """mask: (nW, N, N) shared by the images of the batch, or (B * nW, 1, N, N) per window."""
    b_, n, c = x.shape
    nh, hd = self.num_heads, c // self.num_heads
    ws = self.window_size
    q, k, v = QuantQKV(self.dim, self.mode, self.bits, "qkv" in self.rotate,
                       self.weight_channels, self.rounding, name="qkv")(x)
    heads = lambda t: t.reshape(b_, n, nh, hd).transpose(0, 2, 1, 3)
    q, k, v = heads(q) * (hd ** -0.5), heads(k), heads(v)
    q = FakeQuant(self.mode, self.bits, name="mymodule_q")(q)
    k = FakeQuant(self.mode, self.bits, name="mymodule_k")(k)
    v = FakeQuant(self.mode, self.bits, name="mymodule_v")(v)
    attn = qmatmul(q, k.swapaxes(-2, -1))
    table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                       ((2 * ws - 1) ** 2, nh))
    bias = table[relative_position_index(ws).reshape(-1)].reshape(n, n, nh).transpose(2, 0, 1)
    attn = attn + bias[None]
    if mask is not None and mask.ndim == 4:
      attn = attn + mask
    elif mask is not None:
      nw = mask.shape[0]
      attn = attn.reshape(b_ // nw, nw, nh, n, n) + jnp.asarray(mask)[None, :, None]
      attn = attn.reshape(b_, nh, n, n)
    attn = checkpoint_name(jax.nn.softmax(attn, axis=-1), ATTN_PROBS)
    attn = FakeQuant(self.mode, self.bits, name="mymodule_a")(attn)
    out = checkpoint_name(qmatmul(attn, v), MATMUL_OUT).transpose(0, 2, 1, 3).reshape(b_, n, c)
    return QuantDense(self.dim, self.mode, self.bits, weight_channels=self.weight_channels,
                      rounding=self.rounding, name="proj")(out)


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2."""
  hidden: int
  mode: str = "fp"
  bits: int = 4
  rotate: tuple[str, ...] = ()
  weight_channels: bool = False  # per-output-channel weight bounds (SwinIR.weight_channels)
  rounding: bool = False  # learned weight rounding (SwinIR.rounding)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    dim = x.shape[-1]
    x = QuantDense(self.hidden, self.mode, self.bits, "fc1" in self.rotate, self.weight_channels,
                   self.rounding, name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    return QuantDense(dim, self.mode, self.bits, "fc2" in self.rotate, self.weight_channels,
                      self.rounding, name="fc2")(x)


class SwinBlock(nn.Module):
  """Swin transformer block; odd blocks use windows shifted by window_size // 2."""
  dim: int
  num_heads: int
  window_size: int
  shift: int
  mlp_ratio: float
  mode: str = "fp"
  bits: int = 4
  rotate: tuple[str, ...] = ()
  weight_channels: bool = False  # per-output-channel weight bounds (SwinIR.weight_channels)
  rounding: bool = False  # learned weight rounding (SwinIR.rounding)

  @nn.compact
  def __call__(self, x: jnp.ndarray, hw: tuple[int, int],
               region: ValidRegion | None = None) -> jnp.ndarray:
    h, w = hw
    b, _, c = x.shape
    ws, s = self.window_size, self.shift
    y = nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, name="norm1")(x).reshape(b, h, w, c)
    mask = None
    if s and region is None:
      y = jnp.roll(y, (-s, -s), axis=(1, 2))
      mask = shifted_window_mask(h, w, ws, s)
    elif s:  # the roll wraps around each image's own size, not the canvas
      y = _gather_tokens(y, region.roll)
      mask = region_mask(region.regions, ws)
    y = WindowAttention(self.dim, self.num_heads, ws, self.mode, self.bits, self.rotate,
                        self.weight_channels, self.rounding, name="attn")(
        window_partition(y, ws), mask)
    y = window_reverse(y, ws, h, w)
    if s and region is None:
      y = jnp.roll(y, (s, s), axis=(1, 2))
    elif s:
      y = _gather_tokens(y, region.unroll)
    x = x + y.reshape(b, h * w, c)
    y = nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, name="norm2")(x)
    return x + Mlp(int(self.dim * self.mlp_ratio), self.mode, self.bits, self.rotate,
                   self.weight_channels, self.rounding, name="mlp")(y)


class _Stage(nn.Module):
  """Settings shared by an RSTB and its block stack."""
  dim: int
  depth: int
  num_heads: int
  window_size: int
  mlp_ratio: float
  mode: str = "fp"
  bits: int = 4
  remat: str = "off"  # REMAT_MODES
  scan_blocks: bool = False
  rotate: tuple[str, ...] = ()
  weight_channels: bool = False  # per-output-channel weight bounds (SwinIR.weight_channels)
  rounding: bool = False  # learned weight rounding (SwinIR.rounding)


def check_remat(mode: str) -> str:
  if mode not in REMAT_MODES:
    raise ValueError(f"remat must be one of {REMAT_MODES}, got {mode!r}")
  return mode


def remat_policy(mode: str):
  """The `jax.checkpoint` policy of remat `mode` ('matmuls' or 'full'; module constant doc)."""
  if check_remat(mode) == "matmuls":
    return jax.checkpoint_policies.save_only_these_names(MATMUL_OUT, ATTN_PROBS)
  return None  # 'full': nothing saveable


def _scans(module: nn.Module) -> bool:
  """Whether `module` may run its identical children in a `jax.lax.scan` now.

  Never while initialising (the unrolled path creates the variables, so their tree is the same
  either way), in 'capture' mode (the children `sow` what they see), or when intermediates are
  recorded: a child run inside the scan is a functional apply that records nothing.
  """
  return (module.scan_blocks and module.mode != "capture" and not module.is_initializing()
          and not module.is_mutable_collection("intermediates"))


def _child_variables(variables: Mapping, name: str) -> dict:
  """The variables of child `name`, every collection (e.g. {'params': ..., 'quant': ...})."""
  return {col: tree[name] for col, tree in variables.items() if name in tree}


def _stacked(trees: Sequence) -> dict:
  """Variable trees of identical structure, stacked leaf by leaf along a new leading axis."""
  return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


class BlockStack(_Stage):
  """The `residual_group` of an RSTB: its Swin blocks, whose output is a DQC feature.

  With `remat` ('matmuls' or 'full'), each block is wrapped in `jax.checkpoint` with that mode's
  policy, so its activations are recomputed in the backward pass instead of stored. Whether
  that saves memory is up to XLA's scheduler: unrolled, XLA:CPU's default scheduler runs the
  recomputation early and keeps it all (docs/measured/memory.md#remat), its memory-optimised
  one does not (`compile_cache.COMPILER_OPTIONS`, the DQC step's).

  With `scan_blocks` (and an even depth), the (unshifted, shifted) block pairs run in a
  `jax.lax.scan` over their stacked variables, so XLA compiles each of the two block bodies once
  instead of `depth / 2` times (forward and backward). The variables stay `blocks_0` ..
  `blocks_{depth-1}`, exactly as unrolled: they are stacked at apply time.
  """

  def setup(self):
    remat = check_remat(self.remat) != "off"
    block = (nn.remat(SwinBlock, static_argnums=(2,), policy=remat_policy(self.remat)) if remat
             else SwinBlock)
    self.blocks = [
        block(self.dim, self.num_heads, self.window_size,
                  0 if i % 2 == 0 else self.window_size // 2, self.mlp_ratio, self.mode,
                  self.bits, self.rotate, self.weight_channels, self.rounding)
                  for i in range(self.depth)
    ]

  @nn.nowrap
  def _block_def(self, shift: int) -> SwinBlock:
    """An unbound Swin block of this stack, applied functionally inside the scan."""
    return SwinBlock(self.dim, self.num_heads, self.window_size, shift, self.mlp_ratio,
                     self.mode, self.bits, self.rotate, self.weight_channels, self.rounding,
                     parent=None)

  def __call__(self, x: jnp.ndarray, hw: tuple[int, int],
               region: ValidRegion | None = None) -> jnp.ndarray:
    if not _scans(self) or self.depth % 2:
      for blk in self.blocks:
        x = blk(x, hw, region)
      return x
    variables = self.variables
    runs = []
    for shift in (0, self.window_size // 2):
      run = functools.partial(lambda blk, v, x: blk.apply(v, x, hw, region),
                              self._block_def(shift))
      runs.append(jax.checkpoint(run, policy=remat_policy(self.remat))
                  if self.remat != "off" else run)
    pairs = tuple(
        _stacked([_child_variables(variables, f"blocks_{i}") for i in range(j, self.depth, 2)])
        for j in (0, 1))

    def pair(x, v):
      return runs[1](v[1], runs[0](v[0], x)), None

    return jax.lax.scan(pair, x, pairs)[0]


def _conv(features: int) -> nn.Conv:
  """3x3 convolution with torch's zero padding of 1."""
  return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)))


class RSTB(_Stage):
  """Residual Swin transformer block: blocks -> 3x3 conv -> + input. Returns (out, feature)."""

  def setup(self):
    self.residual_group = BlockStack(self.dim, self.depth, self.num_heads, self.window_size,
                                     self.mlp_ratio, self.mode, self.bits, self.remat,
                                     self.scan_blocks, self.rotate, self.weight_channels,
                                     self.rounding)
    self.conv = _conv(self.dim)

  def __call__(self, x: jnp.ndarray, hw: tuple[int, int], region: ValidRegion | None = None
               ) -> tuple[jnp.ndarray, jnp.ndarray]:
    feat = self.residual_group(x, hw, region)
    b, _, c = x.shape
    y = self.conv(_zero_outside(feat.reshape(b, hw[0], hw[1], c), region)).reshape(b, -1, c)
    return y + x, feat


def pixel_shuffle(x: jnp.ndarray, s: int) -> jnp.ndarray:
  """NHWC pixel shuffle: out[h*s+i, w*s+j, c] = in[h, w, c*s*s + i*s + j] (torch semantics)."""
  b, h, w, c = x.shape
  co = c // (s * s)
  x = x.reshape(b, h, w, co, s, s).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, h * s, w * s, co)


class SwinIR(nn.Module):
  """SwinIR-light for x2/x3/x4 super-resolution; input/output NHWC float in [0, 1] scale.

  The forward is split into `embed`, `layer` and `tail` so that calibration can run one RSTB at
  a time (memory); `__call__` composes them. With `return_features`, also returns the 4 RSTB
  block-stack outputs (B, H*W, C) used by the DQC feature loss.

  `scan_blocks` runs the identical (unshifted, shifted) block pairs of each RSTB, and with
  `scan_layers` the identical RSTBs, in `jax.lax.scan`s: XLA compiles the block bodies once
  instead of 24 times. Same variables and names, values equal to 1e-5 but not bit for bit (XLA
  fuses the scanned body differently, and a fake-quant input within an ulp of a rounding
  boundary can land on the other level, which the authors' parity tests see), so it is off by
  default; 'capture' mode and `init` always run unrolled. The DQC step turns it on with
  `dqc.remat` only (`dqc.step.model_for`): without remat its scanned steps ran slower on XLA:CPU.
  """
  upscale: int = 4
  embed_dim: int = 60
  depths: Sequence[int] = (6, 6, 6, 6)
  num_heads: Sequence[int] = (6, 6, 6, 6)
  window_size: int = 8
  mlp_ratio: float = 2.0
  img_range: float = 1.0
  mode: str = "fp"
  bits: int = 4
  remat: str = "off"  # what Swin blocks keep for the backward pass (REMAT_MODES; DQC memory)
  scan_blocks: bool = False  # run each RSTB's identical block pairs in a lax.scan (compile once)
  scan_layers: bool = True  # with scan_blocks, identical RSTBs in a lax.scan too
  # Run-time input rotations of the linears named (ROTATE_KINDS): x -> x R before the input
  # quantizer, R from the 'rotation' collection (one per block and linear), R^T W in the params.
  rotate: tuple[str, ...] = ()
  weight_channels: bool = False  # weight bounds per output channel, shape (2, out)
  rounding: bool = False  # learned weight rounding ('rounding' collection; baked before export)

  def setup(self):
    check_mode(self.mode)
    check_rotate(self.rotate)
    if self.upscale not in (2, 3, 4):
      raise ValueError(f"upscale must be 2, 3 or 4, got {self.upscale}")
    self.conv_first = _conv(self.embed_dim)
    self.patch_embed_norm = nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False)
    self.layers = [
        RSTB(self.embed_dim, d, h, self.window_size, self.mlp_ratio, self.mode, self.bits,
             self.remat, self.scan_blocks, tuple(self.rotate), self.weight_channels,
             self.rounding)
        for d, h in zip(self.depths, self.num_heads)
    ]
    self.norm = nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False)
    self.conv_after_body = _conv(self.embed_dim)
    self.upsample = _conv(3 * self.upscale ** 2)

  def pad_to_window(self, x: jnp.ndarray) -> jnp.ndarray:
    """Reflect-pads H and W to multiples of the window size (official check_image_size)."""
    h, w = x.shape[1:3]
    ph, pw = (-h) % self.window_size, (-w) % self.window_size
    if ph or pw:
      if ph >= h or pw >= w:
        raise ValueError(f"input {h}x{w} is too small to reflect-pad to a multiple of "
                         f"{self.window_size}; pad it first (see evaluate.flip_pad)")
      x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect")
    return x

  def embed(self, x: jnp.ndarray, region: ValidRegion | None = None
            ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Normalised, padded image -> (shallow features NHWC, token sequence (B, H*W, C))."""
    x = (self.pad_to_window(x) - jnp.asarray(RGB_MEAN, x.dtype)) * self.img_range
    shallow = self.conv_first(_zero_outside(x, region))
    b, h, w, c = shallow.shape
    return shallow, self.patch_embed_norm(shallow.reshape(b, h * w, c))

  def layer(self, i: int, tokens: jnp.ndarray, hw: tuple[int, int],
            region: ValidRegion | None = None):
    """Runs RSTB i: returns (tokens, block-stack feature)."""
    return self.layers[i](tokens, hw, region)

  @nn.nowrap
  def stage(self, i: int, mode: str | None = None) -> "RSTB":
    """A standalone (unbound) RSTB i, to run one stage at a time with `params[stage_name(i)]`."""
    return RSTB(self.embed_dim, self.depths[i], self.num_heads[i], self.window_size,
                self.mlp_ratio, mode or self.mode, self.bits, self.remat, self.scan_blocks,
                tuple(self.rotate), self.weight_channels, self.rounding, parent=None)

  @staticmethod
  def stage_name(i: int) -> str:
    """The key of RSTB i's parameters (Flax names list entries `<attr>_<i>`)."""
    return f"layers_{i}"

  def tail(self, tokens: jnp.ndarray, shallow: jnp.ndarray, out_hw: tuple[int, int],
           region: ValidRegion | None = None):
    """Final norm, conv_after_body + long skip, pixelshuffledirect, de-normalise, crop."""
    b, h, w, c = shallow.shape
    x = self.norm(tokens).reshape(b, h, w, c)
    x = self.conv_after_body(_zero_outside(x, region)) + shallow
    x = pixel_shuffle(self.upsample(_zero_outside(x, region)), self.upscale)
    x = x / self.img_range + jnp.asarray(RGB_MEAN, x.dtype)
    return x[:, :out_hw[0] * self.upscale, :out_hw[1] * self.upscale]

  def _scanned_layers(self, tokens: jnp.ndarray, hw: tuple[int, int], region: ValidRegion | None
                   ) -> tuple[jnp.ndarray, list[jnp.ndarray]]:
    """The identical RSTBs in one `jax.lax.scan` over their stacked variables (each a scan over
    its block pairs): the network body compiles once. Same values as `layer` for i = 0, 1, ..."""
    stage = self.stage(0)
    n = len(self.depths)
    variables = self.variables
    stacked = _stacked([_child_variables(variables, self.stage_name(i)) for i in range(n)])
    tokens, feats = jax.lax.scan(lambda t, v: stage.apply(v, t, hw, region), tokens, stacked)
    return tokens, [feats[i] for i in range(n)]

  def __call__(self, x: jnp.ndarray, return_features: bool = False,
               valid_hw: jnp.ndarray | None = None):
    """valid_hw (B, 2) int, optional: image b is the top-left valid_hw[b] of x (both multiples
    of the window size), padding elsewhere; its output pixels are those of the image alone.
    Default: every image fills x (the exact-size path calibration and training use)."""
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"SwinIR expects NHWC RGB input (B, H, W, 3), got shape {x.shape}")
    out_hw = x.shape[1:3]
    region = None
    if valid_hw is not None:
      if out_hw[0] % self.window_size or out_hw[1] % self.window_size:
        raise ValueError(f"a canvas with valid_hw must be a multiple of the window size "
                         f"{self.window_size}, got {out_hw[0]}x{out_hw[1]}")
      region = valid_region(valid_hw, out_hw, self.window_size, self.window_size // 2)
    shallow, tokens = self.embed(x, region)
    hw = shallow.shape[1:3]
    if _scans(self) and self.scan_layers and len(set(self.depths)) == 1 and len(set(self.num_heads)) == 1:
      tokens, feats = self._scanned_layers(tokens, hw, region)
    else:
      feats = []
      for i in range(len(self.layers)):
        tokens, feat = self.layer(i, tokens, hw, region)
        feats.append(feat)
    out = self.tail(tokens, shallow, out_hw, region)
    return (out, feats) if return_features else out


def variable_shapes(scale: int, mode: str = "fp", bits: int = 4) -> dict:
  """Shapes (no values) of a SwinIR-light's variables: 'params', and 'quant' in 'quant' mode.

  What the converter checks a checkpoint against and what bounds files are matched to.
  """
  model = SwinIR(upscale=scale, mode=mode, bits=bits)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
