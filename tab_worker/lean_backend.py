"""A lean numpy backend: keeps the packed weights and dequantizes them a block of rows at a time per step.

NumpyBackend holds every matrix as f32 (~8x the packed bytes); a tab capped at 1 GiB of weights
(the 7B-in-tabs setup) cannot afford that. This backend holds the packed QuantTensors and, at
each matmul, builds the f32 matrix (in the layout NumpyBackend uses: fused q/k/v and gate/up,
[out, in]) BLOCK_BYTES of it at a time, so the transient f32 is a few MiB whatever the matrix
(a 7B layer's fused gate/up would be 360 MB at once). The output head stays packed too (32000 x
4096 in f32 would be 512 MB). A matrix that fits one block computes exactly what NumpyBackend
does (tests/test_simulation_lean.py); bigger ones are computed block by block, equal to
NumpyBackend's on decode-sized steps (the compiled rows kernel computes each output alone) and
up to float rounding on BLAS-sized ones (the single-process reference of the 7B run uses this
same backend). The step is slower: every step dequantizes every weight it uses.
"""
from __future__ import annotations

import numpy as np

from kernels.quant import QuantTensor, dequantize, group_scales
from tab_worker.cpu_kernels import matmul_nt
from tab_worker.engine_types import LayerWeights
from tab_worker.numpy_backend import NumpyBackend

BLOCK_BYTES = 16 << 20  # f32 bytes of one dequantized block of rows


# 3-bit planes, a byte at a time: a byte of a block's low-bit words holds 4 codes' low 2 bits,
# a byte of its high-bit word 8 codes' high bit; two table lookups and an add give code - 4
_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
_LOW3 = (_BITS[:, 0::2] + 2 * _BITS[:, 1::2]).astype(np.float32) - 4  # [256, 4]
_HIGH3 = 4 * _BITS.astype(np.float32)  # [256, 8]


def dequantize_fast(t: QuantTensor) -> np.ndarray:
    """kernels.quant.dequantize, bit-identical (all products are the same f32 scale * small
    integer), ~2-4x faster for symmetric 3-bit, the format of the 7B-in-tabs setup."""
    if not (t.spec.bits == 3 and t.spec.symmetric):
        return dequantize(t)
    n = t.n
    b = np.ascontiguousarray(t.qweight).view(np.uint8).reshape(n, -1, 12)
    vals = np.take(_LOW3, b[:, :, :8], axis=0).reshape(n, -1, 32)
    vals += np.take(_HIGH3, b[:, :, 8:], axis=0).reshape(n, -1, 32)
    vals = vals.reshape(n, t.groups, t.spec.group)
    vals *= group_scales(t)[0][..., None]
    return vals.reshape(n, t.k_pad)[:, : t.k]


class _PackedMatrix:
    """The row-concatenation of packed (n_i, k) matrices W (sum n_i, k): apply(x) = x @ W.T like
    numpy_backend.DenseMatrix, without the f32 W ever existing whole."""

    def __init__(self, parts: list[QuantTensor]):
        self.parts = parts
        self.k = parts[0].k
        self.n = sum(p.n for p in parts)
        self.block_rows = max(64, (BLOCK_BYTES // (4 * self.k)) // 64 * 64)
        self.starts = np.cumsum([0] + [p.n for p in parts])

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def rows(self, a: int, b: int) -> np.ndarray:
        """f32 rows [a, b) of the concatenated (n, k) matrix."""
        out = []
        for p, s in zip(self.parts, self.starts):
            lo, hi = max(a, s), min(b, s + p.n)
            if lo < hi:
                out.append(dequantize_fast(p.rows(lo - s, hi - s)))
        return out[0] if len(out) == 1 else np.concatenate(out)

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if self.n <= self.block_rows:  # NumpyBackend's exact operation
            return matmul_nt(x, self.rows(0, self.n))
        out = np.empty(x.shape[:-1] + (self.n,), np.float32)
        for a in range(0, self.n, self.block_rows):
            b = min(self.n, a + self.block_rows)
            out[..., a:b] = matmul_nt(x, self.rows(a, b))
        return out


class _LeanLayer:
    def __init__(self, w: LayerWeights):
        self.attn_norm = np.asarray(w.attn_norm, np.float32)
        self.ffn_norm = np.asarray(w.ffn_norm, np.float32)
        self.w_qkv = _PackedMatrix([w.wq, w.wk, w.wv])
        self.wo = _PackedMatrix([w.wo])
        self.w_gate_up = _PackedMatrix([w.w_gate, w.w_up])
        self.w_down = _PackedMatrix([w.w_down])


class LeanNumpyBackend(NumpyBackend):
    name = "numpy-lean"

    def __init__(self, config, layers, head, max_ctx, **_device_options):
        # build with nothing dense, then hold the packed layers and head
        super().__init__(config, {}, None, max_ctx)
        self.layer_ids = sorted(layers)
        if self.layer_ids and self.layer_ids != list(range(self.layer_ids[0], self.layer_ids[-1] + 1)):
            raise ValueError(f"layers must be a contiguous range, got {self.layer_ids}")
        self._layers = [_LeanLayer(layers[i]) for i in self.layer_ids]
        if head is not None:
            self._head_norm = np.asarray(head.output_norm, np.float32)
            self._head = _PackedMatrix([head.output])
