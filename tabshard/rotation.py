"""Incoherence processing: a random orthogonal rotation of the residual stream, folded into the
weights offline, so quantization sees matrices without outlier channels.

Why it works (QuaRot, Ashkboos et al. 2024; QuIP#, Tseng et al. 2024): a few residual channels
carry most of the energy, so a group that holds one of them spends its whole range on it and
rounds its neighbours to nothing. Rotating the residual basis by an orthogonal Q spreads every
channel's energy over all of them; the network computes the same function and its weights
become "incoherent", i.e. easy to quantize.

Why nothing changes at run time: RMSNorm without its weight commutes with an orthogonal map,
rms(x Q) = rms(x). So with every norm's weight folded into the matrices that read its output
first, and the norm weights then set to one, each reader gets Q on its input side and each
writer into the residual gets Q on its output side (weights stored (out, in), y = x W^T):

    embedding  E  -> E Q                       (rows are residual vectors)
    wq/wk/wv   W  -> W diag(g_attn) Q          gate/up: W diag(g_ffn) Q
    wo, w_down W  -> Q^T W
    head       E  -> E diag(g_out) Q           (untied: the lookup table is E Q)

The rotated model is the same kernels on other numbers, so it runs on every backend
(numpy/CPU, wgpu, the tab's WebGPU and WASM) unchanged. Its only cost is the head: a tied
embedding/head pair becomes two matrices, because the output norm's weight folds into the head
but not into the lookup table.

Q is a randomized Hadamard matrix when ``hidden`` is a power of two; otherwise (SmolLM2's 576
= 9 x 64) the Kronecker product of a random orthogonal matrix of the odd factor and the
Sylvester Hadamard matrix of the power-of-two factor, times random signs: each entry has
magnitude ~1/sqrt(hidden) in both cases, which is what incoherence needs. ``seed`` fixes Q; a
.tsq records it (``report.rotation``) so the rotation can be rebuilt, though no runtime needs it.
"""
from __future__ import annotations

import numpy as np

from tabshard.dense_model import DenseLayer, DenseModel


def hadamard(n: int) -> np.ndarray:
    """Sylvester Hadamard matrix of order n (a power of two), entries +-1."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard order must be a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def orthogonal(n: int, seed: int) -> np.ndarray:
    """A random orthogonal n x n matrix (f64), Hadamard-like: randomized Hadamard on the
    largest power-of-two factor, a Haar-random orthogonal matrix on the rest."""
    rng = np.random.default_rng(seed)
    p = n & -n  # largest power of two dividing n
    rest = n // p
    if rest > 1:
        a = rng.standard_normal((rest, rest))
        q, r = np.linalg.qr(a)
        r_odd = q * np.sign(np.diag(r))  # Haar: fix the signs QR leaves arbitrary
    else:
        r_odd = np.ones((1, 1))
    h = np.kron(r_odd, hadamard(p) / np.sqrt(p))
    signs = rng.choice([-1.0, 1.0], size=n)
    return signs[:, None] * h


def rotate_dense(model, seed: int):
    """A DenseModel computing the same function in a rotated residual basis (norm weights folded,
    set to one; head untied). ``model`` is a tabshard.dense_model.DenseModel; returns a new one."""
    d = model.config.hidden
    q = orthogonal(d, seed)

    def reader(w, g):
        return (np.asarray(w, np.float64) * np.asarray(g, np.float64)[None, :]) @ q

    def writer(w):
        return q.T @ np.asarray(w, np.float64)

    layers = []
    for L in model.layers:
        m = L.mats
        mats = {a: reader(m[a], L.attn_norm) for a in ("wq", "wk", "wv")}
        mats.update({a: reader(m[a], L.ffn_norm) for a in ("w_gate", "w_up")})
        mats["wo"], mats["w_down"] = writer(m["wo"]), writer(m["w_down"])
        layers.append(DenseLayer(np.ones(d, np.float32), np.ones(d, np.float32),
                                 {a: v.astype(np.float32) for a, v in mats.items()}))
    out = DenseModel.__new__(DenseModel)
    out.config = model.config
    out.embedding = (np.asarray(model.embedding, np.float64) @ q).astype(np.float32)
    out.head = reader(model.head, model.head_norm).astype(np.float32)
    out.head_norm = np.ones(d, np.float32)
    out.layers = layers
    return out
