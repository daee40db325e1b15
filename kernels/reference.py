"""numpy twins of the WGSL kernels: each function is named exactly like its `name.wgsl` file.

These are the behavioural references the parity tests check the shaders against, and the
math the numpy backend (tab_worker/numpy_backend.py) runs. Signatures used by NumpyBackend:
rmsnorm(x, weight, eps), rope(x[T, heads, head_dim], positions[T], base),
attention(q[T, n_heads, hd], k[n_kv, L, hd], v[n_kv, L, hd], start_pos), silu_gate(gate, up),
topk(logits[rows, vocab], k) -> (ids i32, logits f32) sorted by logit desc, ties by lower id.
Split-K attention (a GPU's long contexts) is attention_partials(q, k, v, start_pos, splits),
attention.wgsl's partials with p.splits > 1, then attention_combine(acc, maxes, sums).

The twins use the kernels' logical view: no row strides, column offsets or buffer splits.
A kernel that serves several sessions at once (kv_store, attention) gives each row its own
cache slot and absolute position; its twin here takes one session's contiguous rows.
"""
from __future__ import annotations

import numpy as np

from kernels.quant import QuantTensor, group_scales, unpack_codes

# The lowest finite f32: topk ranks NaN and -inf logits as this value (and pads short
# segments with it, under id 0xFFFFFFFF), so its order never rests on infinity arithmetic.
LOWEST = np.float32(np.finfo(np.float32).min)


def qmatvec(x: np.ndarray, w: QuantTensor, y: np.ndarray | None = None) -> np.ndarray:
    """x f32[rows, k] @ dequantize(w).T -> f32[rows, n], added onto ``y`` when given
    (the kernels' ``accumulate`` flag: how the residual stream is updated)."""
    out = np.asarray(x, np.float32) @ w.dequantize().T
    return out if y is None else (y + out).astype(np.float32)


def qmatmul(x: np.ndarray, w: QuantTensor, y: np.ndarray | None = None) -> np.ndarray:
    """The prefill kernel (tiles of many rows) computes exactly what qmatvec does."""
    return qmatvec(x, w, y)


def embedding(ids: np.ndarray, table: QuantTensor) -> np.ndarray:
    """Rows ``ids`` of a quantized [vocab, hidden] table, dequantized: f32[len(ids), hidden]."""
    ids = np.asarray(ids, np.int64)
    return QuantTensor(table.spec, len(ids), table.k, table.qweight[ids], table.scales[ids]).dequantize()


def inverse_rms(x: np.ndarray, eps: float) -> np.ndarray:
    """f32 [..., 1]: 1 / sqrt(mean(x^2) + eps) over the last axis of f32 x."""
    # add.reduce / n is exactly what np.mean computes, without its per-call Python layers
    # (they were a tenth of a numpy decode step: 60 calls per token)
    mean_sq = np.add.reduce(x * x, axis=-1, keepdims=True) / np.float32(x.shape[-1])
    return np.float32(1.0) / np.sqrt(mean_sq + np.float32(eps))


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return (x * inverse_rms(x, eps) * weight).astype(np.float32, copy=False)


def rope_tables(positions: np.ndarray, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [T, 1, head_dim/2] of rope's angles: computed once per forward, used per layer."""
    inv_freq = (1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))).astype(np.float32)
    angle = np.asarray(positions, np.float32)[:, None] * inv_freq[None, :]  # [T, hd/2]
    return np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]


def rope(x: np.ndarray, positions: np.ndarray, base: float, tables: tuple | None = None) -> np.ndarray:
    """llama.cpp "normal" RoPE: adjacent pairs (x[2i], x[2i+1]) rotated by pos * base^(-2i/d)."""
    cos, sin = tables if tables is not None else rope_tables(positions, x.shape[-1], base)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x, dtype=np.float32)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int) -> np.ndarray:
    """Causal grouped-query attention. Row i of q sits at absolute position start_pos+i and
    sees cache positions [0, start_pos+i]."""
    t, n_heads, hd = q.shape
    n_kv, length, _ = k.shape
    group = n_heads // n_kv
    qg = q.reshape(t, n_kv, group, hd).transpose(1, 2, 0, 3)  # [kv, group, T, hd]
    scores = np.matmul(qg, k[:, None].transpose(0, 1, 3, 2)) * np.float32(1.0 / np.sqrt(hd))  # [kv, group, T, L]
    if start_pos < length - 1:  # some row sees less than the whole cache (decode's one row sees it all)
        visible = np.arange(length)[None, :] <= (start_pos + np.arange(t))[:, None]
        scores = np.where(visible, scores, -np.inf)
    scores -= scores.max(-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(-1, keepdims=True)
    out = np.matmul(p.astype(np.float32), v[:, None])  # [kv, group, T, hd]
    return out.transpose(2, 0, 1, 3).reshape(t, n_heads, hd).astype(np.float32)


def attention_partials(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int, splits: int):
    """What attention.wgsl leaves with p.splits > 1 (split-K): row i's keys [0, start_pos+i] cut
    into runs of cdiv(keys, splits) (the last shorter, some maybe empty), and for each run its
    V sum weighted by exp(score - m_s) (acc[T, heads, splits, hd]), its max score m_s and its sum
    of weights l_s ([T, heads, splits]); an empty run has m_s = -3e38, l_s = 0, acc 0."""
    t, n_heads, hd = q.shape
    group = n_heads // k.shape[0]
    acc = np.zeros((t, n_heads, splits, hd), np.float32)
    maxes = np.full((t, n_heads, splits), -3.0e38, np.float32)
    sums = np.zeros((t, n_heads, splits), np.float32)
    for i in range(t):
        keys = start_pos + i + 1
        per = -(-keys // splits)
        for h in range(n_heads):
            kv = h // group
            scores = (k[kv, :keys] @ q[i, h]) * np.float32(1.0 / np.sqrt(hd))
            for s in range(splits):
                lo, hi = min(keys, s * per), min(keys, s * per + per)
                if lo < hi:
                    maxes[i, h, s] = scores[lo:hi].max()
                    w = np.exp(scores[lo:hi] - maxes[i, h, s])
                    sums[i, h, s] = w.sum()
                    acc[i, h, s] = w @ v[kv, lo:hi]
    return acc, maxes, sums


def attention_combine(acc: np.ndarray, maxes: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """attention_combine.wgsl: the splits' partials (attention_partials) folded into the
    attention output [T, heads, hd]: sum_s acc_s e^(m_s - m) / sum_s l_s e^(m_s - m), m = max m_s."""
    fold = np.exp(maxes - maxes.max(-1, keepdims=True))  # [T, heads, splits]
    return (np.einsum("ths,thsd->thd", fold, acc) / (fold * sums).sum(-1)[..., None]).astype(np.float32)


def silu_gate(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return (gate / (1.0 + np.exp(-gate)) * up).astype(np.float32)


# silu_hadamard.wgsl holds a block in workgroup memory: WebGPU's default limit is 16 KiB
MAX_HADAMARD_BLOCK = 4096


def check_hadamard_block(block: int, n: int) -> None:
    """A rotated FFN's block size must be a power of two dividing n that the kernels can hold."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 2 or block & (block - 1) \
            or n % block or block > MAX_HADAMARD_BLOCK:
        raise ValueError(f"ffn_hadamard {block!r} must be a power of two from 2 to {MAX_HADAMARD_BLOCK} dividing ffn {n}")


def hadamard(x: np.ndarray, block: int) -> np.ndarray:
    """The normalized Walsh-Hadamard transform of each ``block`` consecutive entries of x's rows
    (block a power of two dividing x.shape[-1]): x @ H_b / sqrt(b), block-diagonal over the
    row. In-place butterflies, stage h pairs (i, i + h) for h = 1, 2, 4, ..., then one scale:
    the order silu_hadamard.wgsl and pk_hadamard (kernels/c/packed_kernels.c) use."""
    x = np.asarray(x, np.float32)
    n = x.shape[-1]
    if block < 1 or block & (block - 1) or n % block:
        raise ValueError(f"hadamard block {block} must be a power of two dividing {n}")
    if block == 1:
        return x.copy()
    y = x.reshape(-1, n // block, block).copy()
    h = 1
    while h < block:
        v = y.reshape(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = v[..., 0, :].copy(), v[..., 1, :]
        v[..., 0, :] = a + b
        v[..., 1, :] = a - b
        h *= 2
    return (y * np.float32(1.0 / np.sqrt(block))).astype(np.float32).reshape(x.shape)


def silu_hadamard(gate: np.ndarray, up: np.ndarray, block: int) -> np.ndarray:
    """silu_gate, then hadamard: the activation ffn_down reads in a model whose FFN hidden space
    is rotated (tabshard/rotation.py's rotate_ffn)."""
    return hadamard(silu_gate(gate, up), block)


def kv_store(k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start_pos: int) -> None:
    """Write one session's rows k, v f32[T, n_kv, hd] into its caches f32[n_kv, capacity, hd]
    at positions [start_pos, start_pos+T), in place."""
    end = start_pos + k.shape[0]
    k_cache[:, start_pos:end] = k.transpose(1, 0, 2)
    v_cache[:, start_pos:end] = v.transpose(1, 0, 2)


def residual_add(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (y + x).astype(np.float32)


def topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k largest logits sorted descending, ties to the lower id; NaN and -inf
    rank as LOWEST (the values returned are the logits as given)."""
    logits = np.asarray(logits, np.float32)
    rank = np.where(np.isnan(logits) | (logits < LOWEST), LOWEST, logits)
    k = min(k, logits.shape[-1])
    part = np.argpartition(-rank, k - 1, axis=-1)[:, :k]
    ids = np.empty((logits.shape[0], k), np.int32)
    vals = np.empty((logits.shape[0], k), np.float32)
    for r in range(logits.shape[0]):
        # ties at the k-th value may fall outside `part`; include every id equal to the cut
        cut = rank[r, part[r]].min()
        cand = np.nonzero(rank[r] >= cut)[0]
        order = np.lexsort((cand, -rank[r, cand]))[:k]
        ids[r] = cand[order]
        vals[r] = logits[r, ids[r]]
    return ids, vals


def head_topk(hidden: np.ndarray, output_norm: np.ndarray, eps: float, output: QuantTensor, k: int):
    """The final head as the device runs it: rmsnorm, qmatvec over the vocabulary, topk."""
    return topk(qmatvec(rmsnorm(hidden, output_norm, eps), output), k)


def qmatvec_norm(x: np.ndarray, w: QuantTensor, norm_weight: np.ndarray, eps: float, y: np.ndarray | None = None) -> np.ndarray:
    """rmsnorm folded into qmatvec: qmatvec(rmsnorm(x, norm_weight, eps), w, y)."""
    return qmatvec(rmsnorm(x, norm_weight, eps), w, y)


def qmatvec_silu(gate: np.ndarray, up: np.ndarray, w: QuantTensor, y: np.ndarray | None = None) -> np.ndarray:
    """silu_gate folded into qmatvec's input: qmatvec(silu_gate(gate, up), w, y)."""
    return qmatvec(silu_gate(gate, up), w, y)


def rope_kv_store(q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray, base: float,
                  k_cache: np.ndarray, v_cache: np.ndarray, start_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """rope on q f32[T, n_heads, hd] and k f32[T, n_kv, hd], then kv_store of the turned k and
    of v into one session's caches (in place); returns the turned (q, k)."""
    q_rot, k_rot = rope(q, positions, base), rope(k, positions, base)
    kv_store(k_rot, v, k_cache, v_cache, start_pos)
    return q_rot, k_rot


def attention_rope(q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray, base: float,
                   k_cache: np.ndarray, v_cache: np.ndarray, start_pos: int) -> np.ndarray:
    """attention_rope.wgsl's twin for one session's rows: rope_kv_store (the caches written in
    place), then attention of the turned queries over the caches up to the last row."""
    q_rot, _ = rope_kv_store(q, k, v, positions, base, k_cache, v_cache, start_pos)
    end = start_pos + q.shape[0]
    return attention(q_rot, k_cache[:, :end], v_cache[:, :end], start_pos)


# ---------------------------------------------------------------------------- f16 variants
# The NAME_f16.wgsl kernels (devices with shader-f16): each weight dequantized to f16 (one
# rounding of the exact scale * q + min), each input rounded from f32 to f16, their product
# rounded to f16, and every product summed in f32. Computed here exactly so (float16 arrays;
# an f16 x f16 product is exact in f32, so numpy's float16 multiply rounds it once).


def dequantize_f16(w: QuantTensor) -> np.ndarray:
    """f16 [n, k]: the f16 kernels' weights, scale * q + min computed exactly (float64) and
    rounded once to f16."""
    codes = unpack_codes(w.qweight, w.spec.bits).astype(np.float64).reshape(w.n, w.groups, w.spec.group)
    scale, minimum = (s.astype(np.float64)[..., None] for s in group_scales(w))
    return np.ascontiguousarray((scale * codes + minimum).reshape(w.n, w.k_pad)[:, : w.k].astype(np.float16))


def qmatvec_f16(x: np.ndarray, w: QuantTensor, y: np.ndarray | None = None) -> np.ndarray:
    """qmatvec with f16 weights, inputs and products, accumulated in f32."""
    x16 = np.asarray(x, np.float32).astype(np.float16)
    w16 = dequantize_f16(w)
    out = np.empty((x16.shape[0], w.n), np.float32)
    step = max(1, (1 << 22) // max(w.k, 1))  # output rows per chunk: bounded temporaries
    for r, row in enumerate(x16):
        for s in range(0, w.n, step):
            out[r, s : s + step] = (w16[s : s + step] * row).astype(np.float32).sum(axis=-1, dtype=np.float32)
    return out if y is None else (y + out).astype(np.float32)


def qmatvec_norm_f16(x: np.ndarray, w: QuantTensor, norm_weight: np.ndarray, eps: float, y: np.ndarray | None = None) -> np.ndarray:
    """rmsnorm (f32) folded into qmatvec_f16: the normalised inputs are what is rounded to f16."""
    return qmatvec_f16(rmsnorm(x, norm_weight, eps), w, y)


def qmatvec_silu_f16(gate: np.ndarray, up: np.ndarray, w: QuantTensor, y: np.ndarray | None = None) -> np.ndarray:
    """silu_gate (f32) folded into qmatvec_f16's input."""
    return qmatvec_f16(silu_gate(gate, up), w, y)


# ---------------------------------------------------------------------------- i8 variants
# The NAME_i8.wgsl kernels: the inputs quantized per 32-input block to int8 (scale = max |x| /
# 127 in f32, codes round(x * (1 / scale)) to nearest even), the weights' codes times those
# integers summed exactly, and each block's sum scaled in f32. Computed here on the dequantized
# int8 inputs in float64: only the kernel's f32 sums of block terms differ.


def quantize_blocks_i8(x: np.ndarray) -> np.ndarray:
    """f32 [rows, k] -> the int8 inputs dequantized (f32 [rows, k]): what the i8 kernels multiply."""
    x = np.asarray(x, np.float32)
    rows, k = x.shape
    blocks = np.zeros((rows, -(-k // 32) * 32), np.float32)
    blocks[:, :k] = x
    blocks = blocks.reshape(rows, -1, 32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    scale = (amax / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(1.0) / scale, np.float32(0.0)).astype(np.float32)
    codes = np.rint(blocks * inv)
    return (codes * scale).reshape(rows, -1)[:, :k].astype(np.float32)


def qmatvec_i8(x: np.ndarray, w: QuantTensor, y: np.ndarray | None = None, row_scale: np.ndarray | None = None) -> np.ndarray:
    """qmatvec on int8-quantized inputs; each row's result times ``row_scale`` (qmatvec_norm_i8's
    inverse RMS) before it is added onto ``y``."""
    out = quantize_blocks_i8(x).astype(np.float64) @ w.dequantize().T.astype(np.float64)
    if row_scale is not None:
        out = out * np.asarray(row_scale, np.float64).reshape(-1, 1)
    out = out.astype(np.float32)
    return out if y is None else (y + out).astype(np.float32)


def qmatvec_norm_i8(x: np.ndarray, w: QuantTensor, norm_weight: np.ndarray, eps: float, y: np.ndarray | None = None) -> np.ndarray:
    """qmatvec_norm with int8 inputs: x * norm_weight is what is quantized, the inverse RMS
    scales the result (as qmatvec_norm.wgsl folds the norm)."""
    x = np.asarray(x, np.float32)
    return qmatvec_i8(x * np.asarray(norm_weight, np.float32), w, y, row_scale=inverse_rms(x, eps))


def qmatvec_silu_i8(gate: np.ndarray, up: np.ndarray, w: QuantTensor, y: np.ndarray | None = None) -> np.ndarray:
    """silu_gate (f32) folded into qmatvec_i8's input."""
    return qmatvec_i8(silu_gate(gate, up), w, y)
