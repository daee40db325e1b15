"""wgpu decode/prefill on a GPU machine, for a SmolLM2-135M-shaped model with synthetic weights
in the same formats (a4g32 linears, s8g32 tied embedding/head): the speed of a model depends on
its shapes and formats, not its values, and the real GGUF (100 MB) does not travel to the device
machine. Compares against the numpy backend on the same weights in the same run.

    python benchmarks/bench_device.py [--tokens 128] [--backends wgpu,numpy]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="xdg-"))

import numpy as np  # noqa: E402

from kernels.quant import QuantSpec, quantize_rtn  # noqa: E402
from tab_worker.engine_types import HeadWeights, ModelConfig, ModelWeights, SessionSlice  # noqa: E402
from tab_worker.worker import synthetic_layer  # noqa: E402

SMOLLM2 = ModelConfig(n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn=1536, vocab=49152,
                      rope_base=100000.0, rms_eps=1e-5, context=8192, eos_id=2, bos_id=1)


def synthetic_model(cfg: ModelConfig) -> ModelWeights:
    rng = np.random.default_rng(0)
    emb = quantize_rtn(rng.standard_normal((cfg.vocab, cfg.hidden), dtype=np.float32) * 0.05, QuantSpec(8, 32, True))
    layers = [synthetic_layer(cfg, seed=i) for i in range(cfg.n_layers)]
    return ModelWeights(cfg, emb, layers, HeadWeights(np.ones(cfg.hidden, np.float32), emb))


def bench(backend_name: str, weights: ModelWeights, tokens: int, prompt: int) -> dict:
    from tab_worker.backends import make_backend

    cfg = weights.config
    t0 = time.perf_counter()
    be = make_backend(backend_name, cfg, dict(enumerate(weights.layers)), weights.head, 1024)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    x = rng.standard_normal((prompt, cfg.hidden)).astype(np.float32)
    be.forward([SessionSlice("warm", 0, 8)], x[:8])
    be.head_topk(x[:1], 1)
    be.drop_session("warm")
    t0 = time.perf_counter()
    h = be.forward([SessionSlice("s", 0, prompt)], x)
    be.head_topk(h[-1:], 1)
    prefill_s = time.perf_counter() - t0
    steps = []
    one = x[:1]
    for i in range(tokens):
        t = time.perf_counter()
        h = be.forward([SessionSlice("s", prompt + i, 1)], one)
        be.head_topk(h, 1)
        steps.append(time.perf_counter() - t)
    # 8 concurrent sessions batched in one step each
    for j in range(8):
        be.forward([SessionSlice(f"b{j}", 0, 16)], x[:16])
    batch_steps = []
    for i in range(max(8, tokens // 4)):
        t = time.perf_counter()
        h = be.forward([SessionSlice(f"b{j}", 16 + i, 1) for j in range(8)], np.repeat(one, 8, 0))
        be.head_topk(h, 1)
        batch_steps.append(time.perf_counter() - t)
    info = {}
    dev = getattr(be, "device", None) or getattr(be, "dev", None)
    if dev is not None and hasattr(dev, "describe"):
        info["adapter"] = dev.describe()
    return {"backend": backend_name, "load_s": load_s, "prefill_tok_s": prompt / prefill_s,
            "decode_tok_s": 1 / float(np.median(steps)), "decode_step_ms_p50": float(np.median(steps) * 1000),
            "batch8_tok_s": 8 / float(np.median(batch_steps)), **info}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--backends", default="wgpu,numpy")
    a = ap.parse_args()
    t0 = time.perf_counter()
    weights = synthetic_model(SMOLLM2)
    print(f"synthetic SmolLM2-135M-shaped weights in {time.perf_counter() - t0:.1f}s", flush=True)
    rows = []
    for b in a.backends.split(","):
        r = bench(b, weights, a.tokens, a.prompt)
        rows.append(r)
        print(f"{b:>6}: load {r['load_s']:.1f}s | prefill {r['prefill_tok_s']:.0f} tok/s ({a.prompt} tokens) | decode "
              f"{r['decode_tok_s']:.1f} tok/s (step p50 {r['decode_step_ms_p50']:.2f} ms) | 8 batched streams "
              f"{r['batch8_tok_s']:.0f} tok/s {r.get('adapter', '')}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
