"""Packed group-wise quantized weight formats, shared by numpy, wgpu-py and the browser.

A weight matrix ``W`` of logical shape ``(n, k)`` (n output rows, k inputs; rows contiguous
along k, i.e. already "transposed" for matvec) is cut into groups of ``group`` consecutive
inputs per row. ``k`` is padded with zeros up to a multiple of the group size (``k_pad``).

Each group has its own scale (and, for asymmetric formats, its own minimum):

* asymmetric:  w = scale * q + min          q in [0, 2**bits)
* symmetric:   w = scale * (q - 2**(bits-1))  (the offset makes q unsigned)

Storage, all little-endian u32 words so that WGSL can bind them as ``array<u32>``:

``qweight``  u32[n, k_pad * bits / 32]  -- every 32 consecutive inputs take exactly ``bits``
    words. For bits in {2, 4, 8}, input j of a 32-block sits in word ``j*bits // 32`` at bit
    ``j*bits % 32``. For bits = 3 the block's three words are bit planes: words 0-1 hold the
    low two bits (input j in word ``j // 16`` at bit ``2*(j % 16)``), word 2 holds the high bit
    (input j at bit j). Planes keep every value inside one word, so a shader never straddles
    a word boundary.
``scales``   u32[n, ceil(groups / 2)] for symmetric formats: two f16 scales per word
    (group 2i in the low half, 2i+1 in the high half), i.e. 16 bits per group.
             u32[n, groups] for asymmetric formats: one word per group, f16 scale in the low
    half and f16 min in the high half, i.e. 32 bits per group.

GGUF Q4_1 (d*q + m, f16 d and m, 32-blocks) is exactly asymmetric 4-bit g32, and Q8_0
(d*q, q int8) is exactly symmetric 8-bit g32 with q stored as q+128, so both import
bit-exactly: dequantizing our packing gives the same f32 values as gguf's own dequantizer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUPS = (32, 64, 128)


class QuantFormatError(ValueError):
    """A quantized tensor or spec that cannot exist in our formats."""


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group: int = 32
    symmetric: bool = False

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise QuantFormatError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group not in SUPPORTED_GROUPS:
            raise QuantFormatError(f"group must be one of {SUPPORTED_GROUPS}, got {self.group}")

    @property
    def name(self) -> str:
        return f"{'s' if self.symmetric else 'a'}{self.bits}g{self.group}"

    @staticmethod
    def parse(name: str) -> "QuantSpec":
        """Inverse of ``name``: 'a4g32' -> asymmetric 4-bit groups of 32."""
        try:
            kind, rest = name[0], name[1:]
            bits, group = rest.split("g")
            if kind not in "as":
                raise ValueError
            return QuantSpec(int(bits), int(group), kind == "s")
        except (ValueError, IndexError):
            raise QuantFormatError(f"bad quant spec name {name!r}; expected like 'a4g32' or 's3g64'") from None

    @property
    def overhead_bits_per_group(self) -> int:
        return 16 if self.symmetric else 32

    @property
    def bits_per_weight(self) -> float:
        """Effective bits per weight including scales (and mins), padding excluded."""
        return self.bits + self.overhead_bits_per_group / self.group


@dataclass
class QuantTensor:
    """A packed (n, k) matrix. Arrays are C-contiguous u32."""

    spec: QuantSpec
    n: int
    k: int
    qweight: np.ndarray  # u32 [n, words_per_row]
    scales: np.ndarray  # u32 [n, scale_words_per_row]

    @property
    def k_pad(self) -> int:
        return padded_k(self.k, self.spec.group)

    @property
    def groups(self) -> int:
        return self.k_pad // self.spec.group

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes

    def rows(self, start: int, stop: int) -> "QuantTensor":
        """Rows [start, stop) as their own tensor (views, no copy): splits a matrix whose
        binding would exceed a device's maxStorageBufferBindingSize."""
        return QuantTensor(self.spec, stop - start, self.k, self.qweight[start:stop], self.scales[start:stop])

    def dequantize(self) -> np.ndarray:
        return dequantize(self)


def padded_k(k: int, group: int) -> int:
    return -(-k // group) * group


def words_per_row(k: int, spec: QuantSpec) -> int:
    return padded_k(k, spec.group) // 32 * spec.bits


def scale_words_per_row(k: int, spec: QuantSpec) -> int:
    groups = padded_k(k, spec.group) // spec.group
    return -(-groups // 2) if spec.symmetric else groups


# ---------------------------------------------------------------- bit packing


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes u8 [n, k_pad] (k_pad % 32 == 0) -> u32 [n, k_pad/32*bits]."""
    n, kp = codes.shape
    blocks = codes.reshape(n, kp // 32, 32).astype(np.uint32)
    if bits == 3:
        low, high = blocks & 3, blocks >> 2
        low_words = (low.reshape(n, -1, 2, 16) << (2 * np.arange(16, dtype=np.uint32))).sum(-1, dtype=np.uint64)
        high_word = (high << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint64)
        words = np.concatenate([low_words, high_word[..., None]], axis=-1)
    else:
        per = 32 // bits
        shifts = bits * np.arange(per, dtype=np.uint64)
        words = (blocks.reshape(n, -1, bits, per).astype(np.uint64) << shifts).sum(-1, dtype=np.uint64)
    return np.ascontiguousarray(words.reshape(n, -1).astype(np.uint32))


def unpack_codes(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack_codes: u32 [n, w] -> u8 [n, w*32/bits]."""
    n = words.shape[0]
    blocks = words.reshape(n, -1, bits)
    if bits == 3:
        low = (blocks[..., :2, None] >> (2 * np.arange(16, dtype=np.uint32))) & 3
        high = (blocks[..., 2:3] >> np.arange(32, dtype=np.uint32)) & 1
        codes = low.reshape(n, -1, 32) | (high.reshape(n, -1, 32) << 2)
    else:
        per = 32 // bits
        mask = np.uint32((1 << bits) - 1)
        codes = (blocks[..., None] >> (bits * np.arange(per, dtype=np.uint32))) & mask
    return codes.reshape(n, -1).astype(np.uint8)


def _contiguous_table() -> np.ndarray:
    """12-bit values of four 3-bit codes, code i at bit 3i, indexed by their low bits (a byte:
    code i's at bit 2i) | their high bits (a nibble: code i's at bit i) << 8."""
    idx = np.arange(1 << 12, dtype=np.uint32)
    i = np.arange(4, dtype=np.uint32)[:, None]
    codes = ((idx >> (2 * i)) & 3) | (((idx >> (8 + i)) & 1) << 2)
    return (codes << (3 * i)).sum(0).astype(np.uint16)


_CONTIGUOUS = _contiguous_table()


def contiguous_3bit(words: np.ndarray) -> np.ndarray:
    """3-bit ``qweight`` (bit planes, pack_codes) -> the same codes contiguous, the layout a GPU
    upload takes (kernels.launchers.upload_quant): input j of a block at bit 3j of its three
    little-endian words, so a shader's four codes are one word, a shift and a mask (two words
    for inputs 8-11 and 20-23). u32 [n, w] -> u32 [n, w]."""
    n, w = words.shape
    b = np.ascontiguousarray(words).view(np.uint8).reshape(n, w // 3, 12)
    high = b[..., 8:12].astype(np.uint16)  # the high plane: nibble g holds inputs 4g..4g+3
    idx = b[..., :8].astype(np.uint16)  # byte g of the low planes: inputs 4g..4g+3
    idx[..., 0::2] |= (high & 15) << 8
    idx[..., 1::2] |= (high >> 4) << 8
    v = _CONTIGUOUS[idx].astype(np.uint32)  # 12 bits per 4 inputs, v[..., g] from bit 12g
    out = np.empty((n, w // 3, 3), np.uint32)
    out[..., 0] = v[..., 0] | (v[..., 1] << 12) | (v[..., 2] << 24)
    out[..., 1] = (v[..., 2] >> 8) | (v[..., 3] << 4) | (v[..., 4] << 16) | (v[..., 5] << 28)
    out[..., 2] = (v[..., 5] >> 4) | (v[..., 6] << 8) | (v[..., 7] << 20)
    return out.reshape(n, w)


def spread_3bit(words: np.ndarray) -> np.ndarray:
    """3-bit ``qweight`` (bit planes, pack_codes) -> the same planes with each block's high plane
    (its third word) rearranged for the i8 matvecs (include/qmatvec_i8.wgsl, SPREAD3): the high
    bit of input j = 16w + s + 4b (w < 2, s < 4, b < 4) moves from bit j to bit 8b + 4w + s, so
    that the four inputs whose low bits one shift and mask of word w put in the bytes of a code
    word (i = 4w + s) find their high bits at bit i of those bytes: a shift and a mask more,
    instead of spreading bits 4 apart to 8 apart. The low planes stay. u32 [n, w] -> u32 [n, w]."""
    n, w = words.shape
    blocks = np.ascontiguousarray(words).reshape(n, w // 3, 3)
    high = blocks[..., 2]
    spread = np.zeros_like(high)
    for j in range(32):
        word, s, b = j // 16, j % 4, (j % 16) // 4
        spread |= ((high >> np.uint32(j)) & np.uint32(1)) << np.uint32(8 * b + 4 * word + s)
    out = blocks.copy()
    out[..., 2] = spread
    return out.reshape(n, w)


def _pack_f16_pairs(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return lo.astype(np.float16).view(np.uint16).astype(np.uint32) | (
        hi.astype(np.float16).view(np.uint16).astype(np.uint32) << 16
    )


def _unpack_f16(words: np.ndarray, high: bool) -> np.ndarray:
    half = (words >> 16) if high else (words & 0xFFFF)
    return half.astype(np.uint16).view(np.float16).astype(np.float32)


# ---------------------------------------------------------------- pack / dequantize


def from_codes(codes: np.ndarray, scale: np.ndarray, minimum: np.ndarray | None, spec: QuantSpec, k: int) -> QuantTensor:
    """Assemble a tensor from integer codes [n, k_pad] and per-group f16-representable
    scale (and min) [n, groups]."""
    n = codes.shape[0]
    qweight = pack_codes(codes, spec.bits)
    if spec.symmetric:
        s = scale
        if s.shape[1] % 2:
            s = np.concatenate([s, np.zeros((n, 1), s.dtype)], axis=1)
        scales = _pack_f16_pairs(s[:, 0::2], s[:, 1::2])
    else:
        scales = _pack_f16_pairs(scale, minimum)
    return QuantTensor(spec, n, k, qweight, np.ascontiguousarray(scales.astype(np.uint32)))


def group_scales(t: QuantTensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-group (scale, min) as f32 [n, groups]; min is -scale*2**(bits-1) for symmetric."""
    if t.spec.symmetric:
        lo, hi = _unpack_f16(t.scales, False), _unpack_f16(t.scales, True)
        scale = np.stack([lo, hi], axis=-1).reshape(t.n, -1)[:, : t.groups]
        return scale, -scale * np.float32(1 << (t.spec.bits - 1))
    return _unpack_f16(t.scales, False), _unpack_f16(t.scales, True)


def dequantize(t: QuantTensor) -> np.ndarray:
    """f32 [n, k]: the numpy twin of every quantized kernel's weight load."""
    codes = unpack_codes(t.qweight, t.spec.bits).astype(np.float32).reshape(t.n, t.groups, t.spec.group)
    if t.spec.symmetric:
        scale, _ = group_scales(t)
        w = scale[..., None] * (codes - np.float32(1 << (t.spec.bits - 1)))
    else:
        scale, minimum = group_scales(t)
        w = scale[..., None] * codes + minimum[..., None]
    return np.ascontiguousarray(w.reshape(t.n, t.k_pad)[:, : t.k], dtype=np.float32)


def quantize_rtn(w: np.ndarray, spec: QuantSpec) -> QuantTensor:
    """Round-to-nearest per group: the baseline quantizer (better ones live in the quantizer module)."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    kp = padded_k(k, spec.group)
    wp = np.zeros((n, kp), np.float32)
    wp[:, :k] = w
    g = wp.reshape(n, kp // spec.group, spec.group)
    levels = (1 << spec.bits) - 1
    if spec.symmetric:
        half = 1 << (spec.bits - 1)
        amax = np.abs(g).max(-1)
        scale = (amax / max(half - 1, 1)).astype(np.float16).astype(np.float32)
        safe = np.where(scale == 0, 1, scale)
        codes = np.clip(np.rint(g / safe[..., None]) + half, 0, levels)
        return from_codes(codes.reshape(n, kp).astype(np.uint8), scale, None, spec, k)
    lo, hi = g.min(-1), g.max(-1)
    minimum = lo.astype(np.float16).astype(np.float32)
    scale = ((hi - minimum) / levels).astype(np.float16).astype(np.float32)
    safe = np.where(scale == 0, 1, scale)
    codes = np.clip(np.rint((g - minimum[..., None]) / safe[..., None]), 0, levels)
    return from_codes(codes.reshape(n, kp).astype(np.uint8), scale, minimum, spec, k)


# ---------------------------------------------------------------- GGUF import

_Q4_1_BLOCK = 20  # f16 d, f16 m, 16 bytes of nibbles
_Q8_0_BLOCK = 34  # f16 d, 32 int8


def import_q4_1(raw: np.ndarray, n: int, k: int) -> QuantTensor:
    """GGUF Q4_1 bytes (n rows of k/32 blocks) -> asymmetric 4-bit g32, losslessly."""
    if k % 32:
        raise QuantFormatError(f"Q4_1 row length {k} is not a multiple of 32")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // 32, _Q4_1_BLOCK)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]
    # GGUF keeps inputs 0-15 in the low nibbles and 16-31 in the high nibbles.
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k)
    return from_codes(codes, d, m, QuantSpec(4, 32, False), k)


def import_q8_0(raw: np.ndarray, n: int, k: int) -> QuantTensor:
    """GGUF Q8_0 bytes -> symmetric 8-bit g32 (q stored as q+128), losslessly."""
    if k % 32:
        raise QuantFormatError(f"Q8_0 row length {k} is not a multiple of 32")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // 32, _Q8_0_BLOCK)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:].view(np.int8).astype(np.int16) + 128
    return from_codes(q.reshape(n, k).astype(np.uint8), d, None, QuantSpec(8, 32, True), k)
