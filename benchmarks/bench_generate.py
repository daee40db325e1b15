"""Single-worker generation speed against llama.cpp, side by side in one run:

    .venv/bin/python benchmarks/bench_generate.py [--backends numpy,wgpu] [--tokens 64] [--rounds 5]

* prefill tok/s (one batched pass over a ~200-token prompt) and decode tok/s per backend;
* the packed bound: one bare pass of the packed-weight kernel over every matrix of a token (what
  decode would cost if attention, norms and Python were free), timed after each decode step;
* each at 1 thread and at the host's thread count (the cores this process may use, what a
  worker runs with by default), ours and llama.cpp (llama-cpp-python, when importable) on the
  same GGUF: ratios pair the same thread counts;
* memory: RSS of a fresh Python process holding all of SmolLM2 in the CPU backend, against the
  packed bytes plus the runtime's own RSS (the process before loading).

Rounds alternate ours and llama.cpp (prefill, then decode) so both see the same host load; the
figures are medians over rounds, printed with the load average before and after (a shared
host's other work takes cores from the 2-thread runs first). Appended to the benchmark history
unless --no-history.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# one BLAS thread, as the workers run it (tabshard/cluster.py): the CPU backend's threads are
# its own (the kernel's pool; on long chunks Python threads each running BLAS on its blocks)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from tab_worker.generate import GenerationStats, LocalGenerator  # noqa: E402
from model.loader import GGUFModel  # noqa: E402
from model.tokenizer import GGUFTokenizer  # noqa: E402

LONG_PROMPT = ("Distributed systems split work across many machines so that no single machine has to hold "
               "everything. ") * 12
SHORT_PROMPT = "Once upon a time"


def packed_pass_ms(gen) -> float:
    """One bare kernel pass over every matrix of a token, ms (the CPU backend's own matrices)."""
    be = gen.backend
    mats = [m for layer in be._layers for m in (layer.w_qkv, layer.wo, layer.w_gate_up, layer.w_down)] + [be._head]
    xs = {m.k: np.random.default_rng(0).standard_normal((1, m.k)).astype(np.float32) for m in mats}
    t0 = time.perf_counter()
    for m in mats:
        m.apply(xs[m.k])
    return (time.perf_counter() - t0) * 1000


class Ours:
    def __init__(self, weights, tok, backend: str, threads: int):
        self.name = f"{backend} {threads}t" if backend == "numpy" else backend
        self.gen = LocalGenerator(weights, backend=backend, max_ctx=1024, **({"threads": threads} if backend == "numpy" else {}))
        self.long, self.short = tok.encode(LONG_PROMPT), tok.encode(SHORT_PROMPT)
        list(self.gen.generate(self.long[:16], 4))  # warm-up: pipelines, caches, the kernel library

    def prefill(self) -> float:
        st = GenerationStats()
        list(self.gen.generate(self.long, 1, stats=st))
        return st.prefill_tok_s

    def decode(self, tokens: int, bound: list | None = None) -> float:
        st = GenerationStats()
        for _ in self.gen.generate(self.short, tokens, stats=st, stop_at_eos=False):
            if bound is not None and self.name == "numpy 1t":
                bound.append(packed_pass_ms(self.gen))
        # steps only: the bound passes interleaved between them are not decode time
        return 1000 / (statistics.median(st.step_times) * 1000)


class LlamaCpp:
    def __init__(self, path: str, threads: int):
        from llama_cpp import Llama

        self.name = f"llama.cpp {threads}t"
        self.llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, verbose=False)
        self.long = self.llm.tokenize(LONG_PROMPT.encode())
        self.llm(SHORT_PROMPT, max_tokens=4)

    def prefill(self) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(self.long)
        return len(self.long) / (time.perf_counter() - t0)

    def decode(self, tokens: int, bound=None) -> float:
        self.llm.reset()
        prompt = self.llm.tokenize(SHORT_PROMPT.encode())
        self.llm.eval(prompt)
        times = []
        for _ in range(tokens):  # greedy, one token per eval: the same step as ours
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            t0 = time.perf_counter()
            self.llm.eval([tok])
            times.append(time.perf_counter() - t0)
        return 1 / statistics.median(times)


MEMORY_PROBE = """
import json, sys
sys.path.insert(0, {root!r})
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS:')).split()[1]) * 1024
from tab_worker.generate import LocalGenerator
from model.loader import GGUFModel
import numpy as np
from tab_worker import cpu_kernels
cpu_kernels.status()  # the kernel library loaded: runtime, not weights
base = rss()
model = GGUFModel()
w = model.load_all()
packed = w.embedding.nbytes + sum(l.nbytes for l in w.layers) + (w.head.nbytes if w.head.output is not w.embedding else w.head.output_norm.nbytes)
del model  # the GGUF reader's memory map: its pages were read once, the tensors are our packed copies
import gc, ctypes
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # the import's freed temporaries back to the OS
gen = LocalGenerator(w, backend="numpy", max_ctx=1024)
list(gen.generate([1, 2, 3, 4], 4))
print(json.dumps({{"runtime_rss": base, "rss": rss(), "packed_bytes": packed}}))
"""


def memory() -> dict:
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE.format(root=str(ROOT))], capture_output=True, text=True,
                         check=True, env=dict(os.environ, OPENBLAS_NUM_THREADS="1")).stdout
    m = json.loads(out.strip().splitlines()[-1])
    m["ratio"] = (m["rss"] - m["runtime_rss"]) / m["packed_bytes"]
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="numpy")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-history", action="store_true")
    a = ap.parse_args()
    from tab_worker.cpu_kernels import describe

    print(f"CPU backend: {describe()}; load before: {os.getloadavg()[0]:.1f}", flush=True)
    model = GGUFModel()
    tok = GGUFTokenizer(model)
    weights = model.load_all()
    engines = []
    threads = len(os.sched_getaffinity(0))
    for b in a.backends.split(","):
        for t in sorted({1, threads}) if b == "numpy" else [1]:
            try:
                engines.append(Ours(weights, tok, b, t))
            except Exception as exc:
                print(f"{b}: unavailable ({type(exc).__name__}: {exc})")
    try:
        engines += [LlamaCpp(str(model.path), t) for t in sorted({1, threads})]
    except ImportError:
        print("llama.cpp: llama_cpp not importable (pip install llama-cpp-python to compare)")
    res = {e.name: {"prefill": [], "decode": []} for e in engines}
    bound: list[float] = []
    for r in range(a.rounds):
        for e in engines:
            res[e.name]["prefill"].append(e.prefill())
        for e in engines:
            res[e.name]["decode"].append(e.decode(a.tokens, bound))
        print(f"round {r + 1}: " + "; ".join(f"{n} prefill {v['prefill'][-1]:.0f} decode {v['decode'][-1]:.1f}" for n, v in res.items()),
              flush=True)
    out = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in res.items()}
    print(f"medians of {a.rounds} alternating rounds (tok/s), load after: {os.getloadavg()[0]:.1f} "
          f"(1/5/15 min: {' '.join(f'{v:.1f}' for v in os.getloadavg())})")
    for n, v in out.items():
        print(f"  {n:>14}: prefill {v['prefill']:7.1f} ({len(tok.encode(LONG_PROMPT))} tokens) | decode {v['decode']:6.1f}")
    figures = []
    if bound and "numpy 1t" in out:
        b = statistics.median(bound)
        out["packed_bound_ms"] = b
        print(f"  packed kernel pass per token (1 thread): {b:.1f} ms -> bound {1000 / b:.0f} tok/s; decode is "
              f"{out['numpy 1t']['decode'] / (1000 / b):.2f}x the bound")
    for n in [e.name for e in engines if e.name.startswith("llama.cpp")]:
        ours = f"numpy {n.split()[-1]}"  # the same thread count
        if ours in out:
            pr, dr = out[ours]["prefill"] / out[n]["prefill"], out[ours]["decode"] / out[n]["decode"]
            out[f"ratio_vs_{n}"] = {"prefill": pr, "decode": dr}
            print(f"  ours ({ours}) / {n}: decode {dr:.2f}x, prefill {pr:.2f}x")
            figures += [(f"generate.decode_ratio_vs_{n.replace(' ', '_').replace('.', '')}", dr, "x", "higher"),
                        (f"generate.prefill_ratio_vs_{n.replace(' ', '_').replace('.', '')}", pr, "x", "higher")]
    mem = memory()
    out["memory"] = mem
    print(f"  memory: one Python worker holding all of SmolLM2: RSS {mem['rss'] / 2**20:.0f} MiB = runtime "
          f"{mem['runtime_rss'] / 2**20:.0f} MiB + {mem['ratio']:.2f}x the packed {mem['packed_bytes'] / 2**20:.0f} MiB")
    for n, v in out.items():
        if isinstance(v, dict) and "decode" in v and "prefill" in v and not n.startswith("ratio"):
            figures += [(f"generate.{n.replace(' ', '_').replace('.', '')}.decode_tok_s", v["decode"], "tok/s", "higher"),
                        (f"generate.{n.replace(' ', '_').replace('.', '')}.prefill_tok_s", v["prefill"], "tok/s", "higher")]
    figures.append(("generate.worker_rss_over_packed", mem["ratio"], "x", "lower"))
    if not a.no_history:
        from tabshard.bench_history import DEFAULT_DB, Figure, History, machine

        h = History(DEFAULT_DB)
        try:
            run = h.start_run(machine(adapter=False), suite="bench_generate")
            for metric, v, unit, better in figures:
                h.add(run, Figure.of(metric, [v], unit, better))
        finally:
            h.close()
        print(f"history: {len(figures)} figures appended to {DEFAULT_DB}")
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
