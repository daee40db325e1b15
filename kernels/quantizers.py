"""Quantizers better than round-to-nearest, all producing our packed formats (kernels/quant.py).

Every quantizer maps a f32 matrix ``w`` (n, k) to a ``QuantTensor`` of a given ``QuantSpec``;
they differ only in how codes and per-group scale/min are chosen:

``rtn``      round to nearest with the group's full range (quant.quantize_rtn, the baseline).
``clip``     per-group search over shrunken ranges, then a least-squares refit of scale (and
             min), minimising the group's reconstruction error. With ``importance`` (one weight
             per input column, e.g. the mean squared activation of that input on calibration
             text: the diagonal of X^T X) the error is weighted by it: an importance matrix in
             llama.cpp's sense.
``gptq``     GPTQ (Frantar et al. 2022): columns are quantized one by one (most active input
             first) and each column's rounding error is pushed onto the columns not yet
             quantized, using the inverse of the input Hessian H = X^T X of real activations
             (second-order information). Group scales/mins come from the ``clip`` search
             weighted by diag(H), then are refit to GPTQ's codes against the whole H and GPTQ
             runs again on them (``gptq_refined``).
``hqq``      calibration-free half-quadratic fitting of the zero point (Badri & Shaji 2023)
             under an l_p<1 loss, which tolerates the outliers plain least squares overfits.

The f16 rounding of scales and mins is applied before codes are chosen, so the codes are
optimal for the values the kernels will actually read.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.quant import QuantSpec, QuantTensor, from_codes, padded_k, quantize_rtn

METHODS = ("rtn", "clip", "gptq", "hqq")
# GPTQ's damping (a fraction of mean(diag H) added to H's diagonal) by code width, and its column
# order, chosen by benchmarks/bench_gptq_settings.py ACROSS domains: Hessians from two of the
# three calibration domains, the error on the third (each in turn), so what is rewarded is what
# carries to text the Hessians never saw (its figures are in the benchmark history). Act-order
# wins at every damping and is always on. A damped H trusts the calibration text's input
# correlations less, and those differ by domain.
DAMP = 0.01
DAMP_BY_BITS = {4: 0.3}
# what a cached quantized tensor depends on beyond its Hessian: bump when a quantizer changes
VERSION = "refit2-grid-shift3"


def damping(bits: int) -> float:
    return DAMP_BY_BITS.get(bits, DAMP)


_SHRINK = np.linspace(1.0, 0.55, 19, dtype=np.float32)


def _f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def _groups(w: np.ndarray, group: int) -> np.ndarray:
    n, k = w.shape
    kp = padded_k(k, group)
    wp = np.zeros((n, kp), np.float32)
    wp[:, :k] = w
    return wp.reshape(n, kp // group, group)


def _codes(g: np.ndarray, scale: np.ndarray, minimum: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Codes for groups g [..., group] given (scale, min) [...]: the exact rounding the
    packed format represents (symmetric min is -scale * 2**(bits-1))."""
    safe = np.where(scale == 0, 1, scale)
    return np.clip(np.rint((g - minimum[..., None]) / safe[..., None]), 0, (1 << spec.bits) - 1)


def _sym_min(scale: np.ndarray, spec: QuantSpec) -> np.ndarray:
    return -scale * np.float32(1 << (spec.bits - 1))


def fit_groups(g: np.ndarray, d: np.ndarray, spec: QuantSpec, refit: int = 2, extra=()) -> tuple[np.ndarray, np.ndarray]:
    """Per-group (scale, min) for groups g [n, G, group] minimising sum_j d_j (w_j - ŵ_j)^2,
    d [G, group] (or broadcastable) >= 0. Grid over shrink factors of the range and the
    ``extra`` (scale, min) [n, G] candidates, then ``refit`` rounds of weighted least squares on
    the chosen codes. Returns f16-exact f32."""
    levels = (1 << spec.bits) - 1
    d = np.broadcast_to(np.asarray(d, np.float32), g.shape)
    best_err = np.full(g.shape[:2], np.inf, np.float32)
    best_s = np.zeros(g.shape[:2], np.float32)
    best_m = np.zeros(g.shape[:2], np.float32)
    if spec.symmetric:
        half = 1 << (spec.bits - 1)
        amax = np.abs(g).max(-1)
        # two anchorings: the largest magnitude maps to -half (full negative range) or to half-1
        bases = [amax / half, amax / max(half - 1, 1)]
    else:
        lo, hi = g.min(-1), g.max(-1)
    for r in _SHRINK:
        cands = []
        if spec.symmetric:
            for base in bases:
                s = _f16(base * r)
                cands.append((s, _sym_min(s, spec)))
        else:
            m = _f16(lo * r)
            s = _f16((hi * r - m) / levels)
            cands.append((s, m))
        if r == _SHRINK[0]:
            cands += [(_f16(s), _sym_min(_f16(s), spec) if spec.symmetric else _f16(m)) for s, m in extra]
        for s, m in cands:
            q = _codes(g, s, m, spec)
            err = (d * (g - (s[..., None] * q + m[..., None])) ** 2).sum(-1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, s, best_s)
            best_m = np.where(better, m, best_m)
    for _ in range(refit):
        q = _codes(g, best_s, best_m, spec)
        if spec.symmetric:
            qc = q - half
            num, den = (d * g * qc).sum(-1), (d * qc * qc).sum(-1)
            s = _f16(np.where(den > 0, num / np.where(den > 0, den, 1), best_s))
            s = np.maximum(s, 0)
            m = _sym_min(s, spec)
        else:
            # weighted 2x2 normal equations for w ≈ s q + m
            sw, sq, sqq = d.sum(-1), (d * q).sum(-1), (d * q * q).sum(-1)
            sy, sqy = (d * g).sum(-1), (d * q * g).sum(-1)
            det = sw * sqq - sq * sq
            ok = np.abs(det) > 1e-12 * np.maximum(sw * sqq, 1e-30)
            dets = np.where(ok, det, 1)
            s = _f16(np.where(ok, (sw * sqy - sq * sy) / dets, best_s))
            m = _f16(np.where(ok, (sqq * sy - sq * sqy) / dets, best_m))
            s = np.maximum(s, 0)
        q = _codes(g, s, m, spec)
        err = (d * (g - (s[..., None] * q + m[..., None])) ** 2).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_m = np.where(better, m, best_m)
    return best_s, best_m


def _assemble(g: np.ndarray, scale: np.ndarray, minimum: np.ndarray, spec: QuantSpec, k: int) -> QuantTensor:
    n = g.shape[0]
    codes = _codes(g, scale, minimum, spec).reshape(n, -1).astype(np.uint8)
    return from_codes(codes, scale, None if spec.symmetric else minimum, spec, k)


def quantize_clip(w: np.ndarray, spec: QuantSpec, importance: np.ndarray | None = None, extra=()) -> QuantTensor:
    """Clipping/scale search per group; ``importance`` [k] weights the input columns; ``extra``:
    more (scale, min) candidates (``source_grid``)."""
    w = np.asarray(w, np.float32)
    n, k = w.shape
    g = _groups(w, spec.group)
    d = np.ones(g.shape[1:], np.float32) if importance is None else _groups(_importance(importance, k)[None], spec.group)[0]
    s, m = fit_groups(g, d, spec, extra=extra)
    return _assemble(g, s, m, spec, k)


def _importance(imp: np.ndarray, k: int) -> np.ndarray:
    imp = np.asarray(imp, np.float32).reshape(-1)
    if imp.shape[0] != k:
        raise ValueError(f"importance has {imp.shape[0]} entries for {k} input columns")
    # a floor keeps never-seen inputs from being rounded arbitrarily
    return np.maximum(imp, 1e-3 * max(float(imp.mean()), 1e-30))


def quantize_hqq(w: np.ndarray, spec: QuantSpec, iters: int = 20, p: float = 0.7, beta: float = 10.0) -> QuantTensor:
    """HQQ-style: start from the range, then alternate a shrinkage (l_p, p<1) of the error and a
    closed-form zero-point (min) update; the scale is chosen by the clip search first.
    Symmetric formats have no free zero point, so they fall back to ``quantize_clip``."""
    if spec.symmetric:
        return quantize_clip(w, spec)
    w = np.asarray(w, np.float32)
    n, k = w.shape
    g = _groups(w, spec.group)
    s, m = fit_groups(g, np.ones(g.shape[1:], np.float32), spec, refit=0)
    safe = np.where(s == 0, 1, s)[..., None]
    levels = (1 << spec.bits) - 1
    z = -m[..., None] / safe  # zero point in code units: w ≈ s (q - z)
    for _ in range(iters):
        q = np.clip(np.rint(g / safe + z), 0, levels)
        e = g - safe * (q - z)
        # generalized soft-thresholding (proximal step of |e|^p)
        a = np.abs(e)
        shrink = np.maximum(a - (np.power(np.maximum(a, 1e-12), p - 1) / beta), 0)
        e = np.sign(e) * shrink
        z = (q - (g - e) / safe).mean(-1, keepdims=True)
        beta *= 1.01
    m = _f16(-z[..., 0] * s)
    return _assemble(g, s, m, spec, k)


@dataclass
class GPTQHessian:
    """What GPTQ needs from H = X^T X, computed once and shared by every tensor that reads the
    same input (q/k/v, gate/up) and every format tried."""

    hinv: np.ndarray  # upper Cholesky factor of (H + damp)^-1, in visiting order (f64)
    order: np.ndarray  # column visiting order
    importance: np.ndarray  # diag(H), floored: the clip search's column weights
    dead: np.ndarray  # inputs never active on calibration text
    h: np.ndarray | None = None  # H itself (f64, undamped): what the scale refit minimises against

    @staticmethod
    def of(h: np.ndarray, damp: float | None = None, act_order: bool = True) -> "GPTQHessian":
        damp = DAMP if damp is None else damp
        raw = np.asarray(h, dtype=np.float64)  # kept by reference (no copy): the refit's H
        h = raw.copy()
        k = h.shape[0]
        if h.shape != (k, k):
            raise ValueError(f"Hessian has shape {h.shape}; expected square")
        dead = np.diag(h) <= 0
        h[dead, dead] = 1
        diag = np.diag(h).copy()
        order = np.argsort(-diag, kind="stable") if act_order else np.arange(k)
        hp = h[np.ix_(order, order)]
        for extra in (damp, 0.1, 1.0):
            hp[np.diag_indices(k)] += extra * diag.mean()
            try:
                hinv = np.linalg.cholesky(np.linalg.inv(hp)).T
                break
            except np.linalg.LinAlgError:
                continue
        return GPTQHessian(hinv, order, _importance(np.maximum(diag, 0), k), dead, raw)


def gptq(w: np.ndarray, h, spec: QuantSpec, block: int = 128, scales: tuple | None = None, extra=()) -> QuantTensor:
    """GPTQ. ``h`` is X^T X [k, k] over calibration rows, or a prepared ``GPTQHessian``.

    Columns are visited in decreasing diag(H) ("act order": the most used inputs are quantized
    first, while the most unquantized columns remain to absorb their error); every group's
    scale/min is fixed up front by the importance-weighted clip search on the original weights
    ("static groups"), so the packed layout keeps plain contiguous groups."""
    hs = h if isinstance(h, GPTQHessian) else GPTQHessian.of(h, damping(spec.bits))
    w = np.array(w, dtype=np.float64)
    n, k = w.shape
    if hs.hinv.shape != (k, k):
        raise ValueError(f"Hessian is {hs.hinv.shape[0]}-wide; the matrix has {k} inputs")
    w[:, hs.dead] = 0
    g0 = _groups(w.astype(np.float32), spec.group)
    if scales is None:
        scale, minimum = fit_groups(g0, _groups(hs.importance[None], spec.group)[0], spec, extra=extra)
    else:
        scale, minimum = scales
    s_cols = np.repeat(scale, spec.group, axis=1)[:, :k][:, hs.order].astype(np.float64)
    m_cols = np.repeat(minimum, spec.group, axis=1)[:, :k][:, hs.order].astype(np.float64)
    safe = np.where(s_cols == 0, 1, s_cols)
    wq = w[:, hs.order]
    q_ord = np.zeros((n, k), np.float64)
    levels = (1 << spec.bits) - 1
    hinv = hs.hinv
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wq[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            x = w1[:, i]
            q = np.clip(np.rint((x - m_cols[:, c]) / safe[:, c]), 0, levels)
            q_ord[:, c] = q
            e = (x - (s_cols[:, c] * q + m_cols[:, c])) / hinv1[i, i]
            w1[:, i + 1:] -= e[:, None] * hinv1[i, i + 1:]
            err1[:, i] = e
        wq[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    codes = np.zeros((n, padded_k(k, spec.group)), np.uint8)
    codes[:, hs.order] = q_ord
    return from_codes(codes, scale, None if spec.symmetric else minimum, spec, k)


def quantize(w: np.ndarray, spec: QuantSpec, method: str = "rtn", *, hessian: np.ndarray | None = None,
             importance: np.ndarray | None = None) -> QuantTensor:
    """One entry point: method in METHODS. gptq needs ``hessian``; clip uses ``importance`` if
    given (else diag(hessian) if given, else unweighted)."""
    if method == "rtn":
        return quantize_rtn(w, spec)
    if method == "clip":
        if importance is None and hessian is not None:
            importance = np.diag(hessian)
        return quantize_clip(w, spec, importance)
    if method == "hqq":
        return quantize_hqq(w, spec)
    if method == "gptq":
        if hessian is None:
            raise ValueError("gptq needs a calibration Hessian")
        return gptq_refined(w, hessian, spec)
    raise ValueError(f"unknown quantization method {method!r}; choose from {', '.join(METHODS)}")


def output_error(w: np.ndarray, t: QuantTensor, h: np.ndarray) -> float:
    """Relative output error on calibration activations: tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)."""
    dw = (t.dequantize() - w).astype(np.float64)
    w = np.asarray(w, np.float64)
    h = np.asarray(h, np.float64)
    return float(((dw @ h) * dw).sum() / max(((w @ h) * w).sum(), 1e-30))


def _codes_of(t: QuantTensor) -> np.ndarray:
    from kernels.quant import unpack_codes

    return unpack_codes(t.qweight, t.spec.bits)


def refit_scales(w: np.ndarray, t: QuantTensor, h: np.ndarray, ridge: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per-group (scale, min) that minimise the output error tr((W - Ŵ) H (W - Ŵ)^T) for ``t``'s
    codes held fixed: per row a least-squares problem in its groups' 2G parameters (G for a
    symmetric format, whose min is tied to its scale). The clip search fits each group alone
    against diag(H); this sees H's off-diagonal terms, i.e. how the groups' errors add up in
    the output. Returns f16-exact (scale, min) [n, groups]; a row whose solve fails keeps t's."""
    from kernels.quant import group_scales

    spec = t.spec
    n, k = w.shape
    G, gs = t.groups, spec.group
    kp = G * gs
    q = _codes_of(t).astype(np.float64)[:, :kp]
    if spec.symmetric:
        q = q - (1 << (spec.bits - 1))
    hp = np.zeros((kp, kp), np.float64)
    hp[:k, :k] = h
    wp = np.zeros((n, kp), np.float64)
    wp[:, :k] = w
    qg = q.reshape(n, G, gs)
    # U[g', j, r] = sum_{j' in g'} H[j, j'] q[r, j']: H times each group's code vector
    U = np.einsum("jgi,rgi->gjr", hp.reshape(kp, G, gs), qg, optimize=True)
    Ug = U.reshape(G, G, gs, n)  # [g', g, i, r]
    ss = np.einsum("hgir,rgi->rgh", Ug, qg, optimize=True)  # [r, g, g']: q_g^T H_{g g'} q_g'
    hw = (hp @ wp.T).reshape(G, gs, n)  # H w_r, by group
    bs = np.einsum("gir,rgi->rg", hw, qg, optimize=True)
    if spec.symmetric:
        a, b = ss, bs
    else:
        ms = Ug.sum(2).transpose(2, 1, 0)  # [r, g(min), g'(scale)]: 1_g^T H_{g g'} q_g'
        mm = hp.reshape(G, gs, G, gs).sum((1, 3))  # [g, g']: 1_g^T H_{g g'} 1_g'
        a = np.empty((n, 2 * G, 2 * G), np.float64)
        a[:, :G, :G] = ss
        a[:, G:, :G] = ms
        a[:, :G, G:] = ms.transpose(0, 2, 1)
        a[:, G:, G:] = mm
        b = np.concatenate([bs, hw.sum(1).T], axis=1)
    diag = np.abs(np.diagonal(a, axis1=1, axis2=2))
    a = a + np.eye(a.shape[1])[None] * (ridge * diag.mean(1)[:, None, None] + 1e-30)
    s0, m0 = group_scales(t)
    try:
        theta = np.linalg.solve(a, b[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return s0, m0
    ok = np.isfinite(theta).all(1)
    s = np.where(ok[:, None], theta[:, :G], s0)
    m = _sym_min(s, spec) if spec.symmetric else np.where(ok[:, None], theta[:, G:], m0)
    s, m = _f16(s), _f16(m)
    # a negative scale would flip the codes' order; such groups keep their own fit
    bad = s <= 0
    s, m = np.where(bad, s0, s), np.where(bad, m0, m)
    return s.astype(np.float32), (_sym_min(s, spec) if spec.symmetric else m).astype(np.float32)


def gptq_refined(w: np.ndarray, h, spec: QuantSpec, rounds: int = 2, extra=()) -> QuantTensor:
    """GPTQ, then ``rounds`` of: refit every group's scale/min to GPTQ's codes against the full
    H (``refit_scales``), and GPTQ again with those scales fixed (new codes, new error
    feedback). Each round is kept only if it lowers the output error on the calibration H."""
    hs = h if isinstance(h, GPTQHessian) else GPTQHessian.of(h, damping(spec.bits))
    w = np.asarray(w, np.float32)
    best = gptq(w, hs, spec, extra=extra)
    hraw = hs.h

    def err(t):
        dw = (t.dequantize() - w).astype(np.float64)
        return float(((dw @ hraw) * dw).sum())

    best_err = err(best)
    cur = best
    for _ in range(rounds):
        scales = refit_scales(w, cur, hraw)
        refit = _retile(cur, scales)
        cand = gptq(w, hs, spec, scales=scales)
        for t in (refit, cand):
            e = err(t)
            if e < best_err:
                best, best_err = t, e
        cur = cand
    return best


def _retile(t: QuantTensor, scales) -> QuantTensor:
    """``t``'s codes with other (scale, min)."""
    s, m = scales
    return from_codes(_codes_of(t), s, None if t.spec.symmetric else m, t.spec, t.k)


def source_grid(src: QuantTensor, spec: QuantSpec, shifts=range(-3, 4)) -> list:
    """(scale, min) [n, groups of ``spec``] candidates on one source block's grid: for a group
    spanning several blocks of a finer asymmetric source (Q4_1 is a4g32), each block's own scale
    with its min moved by ``shifts`` steps (0 keeps the block exact; a shift trades its extreme
    codes for room for the other block); both lower the error across calibration domains
    (bench_gptq_settings, figures in the benchmark history). Empty when the blocks do not tile
    the target's groups."""
    from kernels.quant import group_scales

    if spec.symmetric or src.spec.symmetric or spec.group % src.spec.group or spec.bits != src.spec.bits:
        return []
    d, m = group_scales(src)
    r = spec.group // src.spec.group
    G = -(-src.k // spec.group)
    pad = G * r - d.shape[1]
    if pad > 0:
        d = np.concatenate([d, d[:, -1:].repeat(pad, 1)], 1)
        m = np.concatenate([m, m[:, -1:].repeat(pad, 1)], 1)
    d, m = d[:, : G * r].reshape(src.n, G, r), m[:, : G * r].reshape(src.n, G, r)
    return [(d[..., j], m[..., j] + k * d[..., j]) for j in range(r) for k in shifts]
