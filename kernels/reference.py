"""numpy twins of the WGSL kernels: each function is named exactly like its `name.wgsl` file.

These are the behavioural references the parity tests check the shaders against, and the
math the numpy backend (tab_worker/numpy_backend.py) runs. Signatures used by NumpyBackend:
rmsnorm(x, weight, eps), rope(x[T, heads, head_dim], positions[T], base),
attention(q[T, n_heads, hd], k[n_kv, L, hd], v[n_kv, L, hd], start_pos), silu_gate(gate, up),
topk(logits[rows, vocab], k) -> (ids i32, logits f32) sorted by logit desc, ties by lower id.
"""
from __future__ import annotations

import numpy as np


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x = np.asarray(x, np.float32)
    inv = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))
    return (x * inv * weight).astype(np.float32)


def rope(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """llama.cpp "normal" RoPE: adjacent pairs (x[2i], x[2i+1]) rotated by pos * base^(-2i/d)."""
    hd = x.shape[-1]
    inv_freq = (1.0 / (base ** (np.arange(0, hd, 2, dtype=np.float64) / hd))).astype(np.float32)
    angle = np.asarray(positions, np.float32)[:, None] * inv_freq[None, :]  # [T, hd/2]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
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
    visible = np.arange(length)[None, :] <= (start_pos + np.arange(t))[:, None]
    scores = np.where(visible, scores, -np.inf)
    scores -= scores.max(-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(-1, keepdims=True)
    out = np.matmul(p.astype(np.float32), v[:, None])  # [kv, group, T, hd]
    return out.transpose(2, 0, 1, 3).reshape(t, n_heads, hd).astype(np.float32)


def silu_gate(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return (gate / (1.0 + np.exp(-gate)) * up).astype(np.float32)


def topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, np.float32)
    k = min(k, logits.shape[-1])
    part = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
    ids = np.empty((logits.shape[0], k), np.int32)
    vals = np.empty((logits.shape[0], k), np.float32)
    for r in range(logits.shape[0]):
        # ties at the k-th value may fall outside `part`; include every id equal to the cut
        cut = logits[r, part[r]].min()
        cand = np.nonzero(logits[r] >= cut)[0]
        order = np.lexsort((cand, -logits[r, cand]))[:k]
        ids[r] = cand[order]
        vals[r] = logits[r, ids[r]]
    return ids, vals
