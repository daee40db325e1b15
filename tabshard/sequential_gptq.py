"""Sequential GPTQ: each layer calibrated on the outputs of the already-quantized layers before it.

Independent GPTQ (tabshard/calibration.py's cache) quantizes every matrix against the source
model's activations, so the error of layer 3 is never seen by layer 4's quantization. Here the
calibration text is passed through the quantized model as it is built: a layer's Hessians
X^T X come from its inputs under the quantized layers before it, and inside a layer from its
already-quantized matrices (q/k/v first, then o on the quantized attention, then gate/up, then
down), so GPTQ's error feedback also absorbs what the earlier layers got wrong. Every matrix is
computed once per window (one forward's cost, plus the GPTQ itself).

Embedding and head are quantized as the Calibrator does (a lookup table has no input to
compensate), and the first layer reads the plan's (possibly quantized) embedding.
"""
from __future__ import annotations

import os
import time

import numpy as np

from kernels import reference as ref
from kernels.quant import QuantSpec, QuantTensor
from kernels.quant import dequantize as deq
from tabshard.dense_model import EMBEDDING, HEAD, SOURCE, TYPE_OF, parse_choice, windows


def run(cal, plan: dict) -> tuple[dict, float]:
    """({tensor: QuantTensor}, seconds) for ``plan`` on Calibrator ``cal``."""
    c = cal.config
    t0 = time.perf_counter()
    out = {n: cal.quantized(n, cal._choice(plan, n)) for n in ([EMBEDDING] + ([HEAD] if cal.rotated else []))}
    emb = cal.dense.embedding if cal._choice(plan, EMBEDDING) == SOURCE else deq(out[EMBEDDING])
    xs = [emb[w] for w in windows(cal.calib_ids, cal.window)]
    for li, src in enumerate(cal.dense.layers):
        mats = dict(src.mats)

        def quantize_group(group, tap_inputs):
            h = sum((x.T @ x).astype(np.float64) for x in tap_inputs)
            prepared = {}  # by code width: GPTQ's damping depends on it
            for attr in group:
                name = f"blk.{li}.{TYPE_OF[attr]}"
                choice = cal._choice(plan, name)
                if choice == SOURCE:
                    out[name] = cal.source_tensor(name)
                else:
                    bits = parse_choice(choice)[1].bits
                    if parse_choice(choice)[0] in ("gptq", "clip") and bits not in prepared:
                        prepared[bits] = cal.prepare(h, bits)
                    out[name] = cal._quantize(name, choice, mats[attr], prepared.get(bits))
                mats[attr] = deq(out[name])

        hs = [ref.rmsnorm(x, src.attn_norm, c.rms_eps) for x in xs]
        quantize_group(("wq", "wk", "wv"), hs)
        attn = []
        for h in hs:
            t = h.shape[0]
            pos = np.arange(t)
            q = ref.rope((h @ mats["wq"].T).reshape(t, c.n_heads, c.head_dim), pos, c.rope_base)
            k = ref.rope((h @ mats["wk"].T).reshape(t, c.n_kv_heads, c.head_dim), pos, c.rope_base)
            v = (h @ mats["wv"].T).reshape(t, c.n_kv_heads, c.head_dim)
            attn.append(ref.attention(q, k.transpose(1, 0, 2), v.transpose(1, 0, 2), 0).reshape(t, -1))
        quantize_group(("wo",), attn)
        xs = [x + a @ mats["wo"].T for x, a in zip(xs, attn)]
        hs = [ref.rmsnorm(x, src.ffn_norm, c.rms_eps) for x in xs]
        quantize_group(("w_gate", "w_up"), hs)
        gs = [ref.silu_gate(h @ mats["w_gate"].T, h @ mats["w_up"].T) for h in hs]
        if c.ffn_hadamard:  # ffn_down reads the rotated activation (tabshard/rotation.py)
            gs = [ref.hadamard(g, c.ffn_hadamard) for g in gs]
        quantize_group(("w_down",), gs)
        xs = [x + g @ mats["w_down"].T for x, g in zip(xs, gs)]
    return out, time.perf_counter() - t0


def save(path: str, out: dict, seconds: float) -> None:
    arrays = {"names": np.array(list(out)), "sec": seconds}
    for n, t in out.items():
        arrays.update({f"{n}|spec": t.spec.name, f"{n}|n": t.n, f"{n}|k": t.k, f"{n}|q": t.qweight, f"{n}|s": t.scales})
    tmp = f"{path}.{os.getpid()}.part.npz"  # parallel reports may share a cache
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load(path: str) -> tuple[dict | None, float]:
    try:
        with np.load(path) as z:
            names = [str(x) for x in z["names"]]
            out = {n: QuantTensor(QuantSpec.parse(str(z[f"{n}|spec"])), int(z[f"{n}|n"]), int(z[f"{n}|k"]),
                                  z[f"{n}|q"], z[f"{n}|s"]) for n in names}
            return out, float(z["sec"])
    except (OSError, KeyError, ValueError):
        return None, 0.0
