"""Single-worker generation speed, side by side in one run:

    .venv/bin/python benchmarks/bench_generate.py [--backends numpy,wgpu] [--tokens 64]

* prefill tok/s (one batched pass over a ~200-token prompt) and decode tok/s per backend;
* the numpy bound: one bare f32 matvec pass over the same (dequantized) weights per token,
  i.e. what decode would cost if Python overhead, attention and norms were free, timed right
  after each numpy decode step (same host conditions) and compared median to median;
* llama.cpp (llama-cpp-python, when importable) on the same GGUF with the same thread count,
  and the ratio ours / llama.cpp.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from kernels.quant import dequantize  # noqa: E402
from tabshard.generate import GenerationStats, LocalGenerator  # noqa: E402
from tabshard.model import GGUFModel  # noqa: E402
from tabshard.tokenizer import GGUFTokenizer  # noqa: E402

LONG_PROMPT = ("Distributed systems split work across many machines so that no single machine has to hold "
               "everything. ") * 12


class BareMatvec:
    """One decode token's matvecs, nothing else: every layer matrix and the LM head, f32 (the
    numpy backend's own weights). `once()` times one pass."""

    def __init__(self, weights):
        self.mats = [np.ascontiguousarray(dequantize(getattr(lw, m)).T) for lw in weights.layers for m in lw.MATRICES]
        self.mats.append(np.ascontiguousarray(dequantize(weights.head.output).T))
        self.x = {m.shape[0]: np.random.default_rng(0).standard_normal((1, m.shape[0])).astype(np.float32) for m in self.mats}

    def once(self) -> float:
        t0 = time.perf_counter()
        for m in self.mats:
            self.x[m.shape[0]] @ m
        return time.perf_counter() - t0


def numpy_vs_bound(weights, tok, tokens: int) -> dict:
    """Decode steps and bare passes interleaved (one pass after each step), so both see the same
    host conditions; the ratio compares their medians."""
    bare = BareMatvec(weights)
    gen = LocalGenerator(weights, backend="numpy", max_ctx=1024)
    list(gen.generate(tok.encode("Once upon a time")[:4], 4))
    passes = []
    st = GenerationStats()
    for _ in gen.generate(tok.encode("Once upon a time"), tokens, stats=st, stop_at_eos=False):
        passes.append(bare.once())
    step = float(np.median(st.step_times))
    bound = float(np.median(passes))
    return {"bare_matvec_ms": bound * 1000, "decode_step_ms_p50": step * 1000, "ratio_to_bound": bound / step}


def run_backend(weights, tok, backend: str, tokens: int) -> dict:
    gen = LocalGenerator(weights, backend=backend, max_ctx=1024)
    prompt = tok.encode(LONG_PROMPT)
    list(gen.generate(prompt[:16], 4))  # warm-up: pipelines, caches
    st = GenerationStats()
    list(gen.generate(prompt, 1, stats=st))
    prefill = st.prefill_tok_s
    st = GenerationStats()
    list(gen.generate(tok.encode("Once upon a time"), tokens, stats=st, stop_at_eos=False))
    step_ms = np.median(st.step_times) * 1000
    return {"backend": backend, "prefill_tok_s": prefill, "decode_tok_s": st.decode_tok_s,
            "decode_step_ms_p50": float(step_ms), "prompt_tokens": len(prompt)}


def run_llama_cpp(path: str, tokens: int, threads: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=path, n_threads=threads, n_ctx=1024, verbose=False)
    llm("Once upon a time", max_tokens=4)
    t0 = time.perf_counter()
    out = llm("Once upon a time", max_tokens=tokens, temperature=0.0)
    n = out["usage"]["completion_tokens"]
    return {"decode_tok_s": n / (time.perf_counter() - t0), "threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="numpy,wgpu")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    model = GGUFModel()
    tok = GGUFTokenizer(model)
    weights = model.load_all()
    out = {"numpy_vs_bound": numpy_vs_bound(weights, tok, a.tokens)}
    nb = out["numpy_vs_bound"]
    bound = 1000 / nb["bare_matvec_ms"]
    print(f"numpy bare f32 matvec pass per token: {nb['bare_matvec_ms']:.1f} ms -> bound {bound:.1f} tok/s; numpy decode step "
          f"{nb['decode_step_ms_p50']:.1f} ms, interleaved with the passes: {nb['ratio_to_bound']:.2f}x the bound", flush=True)
    for b in a.backends.split(","):
        try:
            r = run_backend(weights, tok, b, a.tokens if b == "numpy" else max(8, a.tokens // 4))
        except Exception as exc:
            print(f"{b}: unavailable ({type(exc).__name__}: {exc})")
            continue
        out[b] = r
        print(f"{b:>6}: prefill {r['prefill_tok_s']:.1f} tok/s ({r['prompt_tokens']} tokens) | decode {r['decode_tok_s']:.1f} tok/s "
              f"(step p50 {r['decode_step_ms_p50']:.1f} ms)", flush=True)
    threads = len(os.sched_getaffinity(0))
    lc = run_llama_cpp(str(model.path), a.tokens, threads)
    if lc:
        out["llama_cpp"] = lc
        ratio = out.get("numpy", {}).get("decode_tok_s", 0) / lc["decode_tok_s"]
        print(f"llama.cpp ({threads} threads): decode {lc['decode_tok_s']:.1f} tok/s; ours (numpy) / llama.cpp = {ratio:.2f}")
    else:
        print("llama.cpp: llama_cpp not importable (pip install llama-cpp-python to compare)")
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
