"""Dense bit packing of b-bit integer codes (2 <= b <= 8) into uint8, for the packed export.

Layout: the codes form one little-endian bit stream. Code i occupies bits [i*b, (i+1)*b) of the
stream, least significant bit first, and stream bit j is bit (j % 8) of byte j // 8. So 2-bit codes
sit 4 to a byte (code 0 in bits 0-1), 4-bit codes 2 to a byte (code 0 in the low nibble), 3-bit
codes 8 to 3 bytes, 8-bit codes one to a byte. n codes take ceil(n*b/8) bytes; the unused high
bits of the last byte are zero. numpy only: packing happens at export, unpacking once at load.
"""

from __future__ import annotations

import numpy as np

PACK_BITS = (2, 3, 4, 5, 6, 7, 8)


def _check(bits: int) -> int:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits not in PACK_BITS:
    raise ValueError(f"packing needs bits in 2..8, got {bits!r}")
  return int(bits)


def packed_nbytes(count: int, bits: int) -> int:
  """Bytes that `count` codes of `bits` bits take: ceil(count * bits / 8)."""
  return -(-int(count) * _check(bits) // 8)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
  """Integer codes in [0, 2^bits) of any shape -> 1-D uint8 (flattened in C order)."""
  bits = _check(bits)
  flat = np.asarray(codes).reshape(-1)
  if flat.size and (not np.issubdtype(flat.dtype, np.integer) or flat.min() < 0
                    or flat.max() >= 2 ** bits):
    raise ValueError(f"codes must be integers in [0, {2 ** bits - 1}] to pack at {bits} bits")
  stream = (flat.astype(np.uint16)[:, None] >> np.arange(bits, dtype=np.uint16)) & 1
  return np.packbits(stream.astype(np.uint8).reshape(-1), bitorder="little")


def unpack(data: np.ndarray, bits: int, count: int) -> np.ndarray:
  """1-D uint8 from `pack` -> the first `count` codes as uint8 (reshape them yourself)."""
  bits = _check(bits)
  data = np.asarray(data)
  if data.dtype != np.uint8 or data.ndim != 1 or data.size != packed_nbytes(count, bits):
    raise ValueError(f"expected {packed_nbytes(count, bits)} packed uint8 bytes for {count} "
                     f"{bits}-bit codes, got {data.dtype} {data.shape}")
  stream = np.unpackbits(data, bitorder="little")[:count * bits].reshape(count, bits)
  return (stream.astype(np.uint16) << np.arange(bits, dtype=np.uint16)).sum(1).astype(np.uint8)

