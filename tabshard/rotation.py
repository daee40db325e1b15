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

The FFN's hidden space (``rotate_ffn``) cannot be folded on both sides: silu(gate) * up is
elementwise, so a rotation there must be applied at run time, between the activation and
ffn_down. With D random signs and H the block-diagonal normalized Walsh-Hadamard matrix
(blocks of b, the largest power of two dividing ffn, at most kernels.reference's
MAX_HADAMARD_BLOCK: 512 for SmolLM2's 1536, 256 for LLaMA-7B's 11008):

    w_up   W  -> D W                           (silu(g) * (u D) = act D: the signs fold)
    w_down W  -> W D H                         (act D H (W D H)^T = act W^T)

and the runtime computes act H (config.ffn_hadamard = b: kernels/silu_hadamard.wgsl fused with
the SiLU gate, its twin kernels/reference.py:hadamard, pk_hadamard in the C/WASM kernels):
log2(b) adds per activation, no weights. Why block-diagonal and not a Kronecker product with a
small orthogonal factor over the blocks (3 x 3 for 1536): the signs already make every block's
entries ~1/sqrt(b), and the cross-block mix would need a dense pass over the whole row
(another workgroup sync across blocks) for what measured no better (benchmarks/quant_report_full.md).

Q is a randomized Hadamard matrix when ``hidden`` is a power of two; otherwise (SmolLM2's 576
= 9 x 64) the Kronecker product of a random orthogonal matrix of the odd factor and the
Sylvester Hadamard matrix of the power-of-two factor, times random signs: each entry has
magnitude ~1/sqrt(hidden) in both cases, which is what incoherence needs. ``seed`` fixes Q; a
.tsq records it (``report.rotation``) so the rotation can be rebuilt, though no runtime needs it.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from kernels.reference import MAX_HADAMARD_BLOCK, check_hadamard_block
from kernels.reference import hadamard as walsh_hadamard
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


def ffn_block(ffn: int) -> int:
    """The FFN rotation's block: the largest power of two dividing ffn the kernels hold."""
    block = min(ffn & -ffn, MAX_HADAMARD_BLOCK)
    check_hadamard_block(block, ffn)
    return block


def ffn_signs(n_layers: int, ffn: int, seed: int) -> np.ndarray:
    """The random signs D of every layer's FFN rotation, [n_layers, ffn] of +-1 (seeded)."""
    return np.random.default_rng([seed, 0xFF]).choice(np.array([-1.0, 1.0], np.float32), size=(n_layers, ffn))


def rotate_ffn(model, seed: int, block: int | None = None):
    """A DenseModel computing the same function with each FFN's hidden space rotated by D H
    (random signs, block-diagonal Walsh-Hadamard): w_up's rows signed, ffn_down's input side
    rotated, and config.ffn_hadamard set so the forward (and every runtime) applies H to the
    activation before ffn_down. ``model`` may already be rotated in its residual basis."""
    c = model.config
    block = ffn_block(c.ffn) if block is None else block
    check_hadamard_block(block, c.ffn)
    signs = ffn_signs(len(model.layers), c.ffn, seed)
    layers = []
    for L, s in zip(model.layers, signs):
        mats = dict(L.mats)
        mats["w_up"], mats["w_down"] = _rotated_ffn(mats["w_up"], mats["w_down"], s, block)
        layers.append(DenseLayer(L.attn_norm, L.ffn_norm, mats))
    out = DenseModel.__new__(DenseModel)
    out.__dict__.update(model.__dict__)
    out.config = replace(c, ffn_hadamard=block)
    out.layers = layers
    return out


def _rotated_ffn(w_up, w_down, signs, block: int):
    up = (np.asarray(w_up, np.float32) * signs[:, None]).astype(np.float32)
    return up, walsh_hadamard(np.asarray(w_down, np.float32) * signs[None, :], block)


def rotate_ffn_weights(weights, seed: int, spec, block: int | None = None):
    """ModelWeights with each FFN's hidden space rotated as rotate_ffn does and ffn_up / ffn_down
    requantized round-to-nearest in ``spec`` (a QuantSpec), the rest as given: what parity tests
    and speed benchmarks need in seconds (``tabshard quantize --scheme ...+had`` runs GPTQ)."""
    from kernels.quant import dequantize, quantize_rtn
    from protocol.model_types import ModelWeights

    c = weights.config
    block = ffn_block(c.ffn) if block is None else block
    check_hadamard_block(block, c.ffn)
    signs = ffn_signs(c.n_layers, c.ffn, seed)
    layers = []
    for i, lw in enumerate(weights.layers):
        up, down = _rotated_ffn(dequantize(lw.w_up), dequantize(lw.w_down), signs[i], block)
        layers.append(replace(lw, w_up=quantize_rtn(up, spec), w_down=quantize_rtn(down, spec)))
    return ModelWeights(config=replace(c, ffn_hadamard=block), embedding=weights.embedding, layers=layers, head=weights.head)
