"""The CPU backend's packed-weight kernel against f32 BLAS, side by side in one run.

An 8-layer SmolLM2-135M stage in the real GGUF's format (a4g32, i.e. Q4_1: fused q/k/v 960x576,
o 576x576, fused gate/up 3072x576, down 576x1536), timed for batches of M rows:

* kernel ISA:   tab_worker.cpu_kernels.kernel_matmul on the packed words (each compiled path
                this CPU has: scalar, avx2, avx512);
* deq+blas:     what the CPU backend runs for chunks over MAX_KERNEL_ROWS: a block of rows
                dequantized by the kernel library, then x @ W.T (PackedMatrix._blas);
* f32 blas:     x @ W.T over f32 weights dequantized once at load: the old numpy backend, which
                held an f32 copy of every matrix (~7x the packed bytes).

With --threads N (> 1) two more paths on N threads, and the same two ways of getting them:
* kernel Nt:    PackedMatrix.apply(threads=N): the C pool (chunks of rows claimed by the caller
                and persistent pthreads, what the CPU backend runs);
* pyth Nt:      N Python threads (a ThreadPoolExecutor, ctypes dropping the GIL), each running
                the 1-thread kernel on its contiguous 1/N of the rows;
and deq+blas Nt (PackedMatrix._blas on N threads) for the long chunks.

With --against REV one more path: the kernel compiled from packed_kernels.c as it was at git
revision REV (its best ISA here), and the ratio of today's to it: a change to the kernel measured
side by side with what it replaced.

Rounds alternate the paths (each round times every path once on fresh inputs) so they see the
same host load; the figures are medians over rounds. ms per stage and GB/s of the bytes each
path streams. Appended to the benchmark history unless --no-history.

    .venv/bin/python benchmarks/bench_cpu_kernel.py [--rows 1,4,8,16,32,64,128] [--rounds 7] [--against REV]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the workers run it (tabshard/cluster.py)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from kernels.quant import QuantSpec, dequantize, quantize_rtn  # noqa: E402
from tab_worker import cpu_kernels  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LAYERS = 8


def _library_at(rev: str):
    """The kernel library built from packed_kernels.c as it was at git revision `rev` (built and
    cached as `make setup` builds the current one), for a side-by-side run against it."""
    source = Path(tempfile.mkdtemp()) / "packed_kernels.c"
    source.write_bytes(subprocess.run(["git", "show", f"{rev}:kernels/c/packed_kernels.c"], cwd=ROOT, check=True,
                                      capture_output=True).stdout)
    current = cpu_kernels.SOURCE
    try:
        cpu_kernels._state.clear()
        cpu_kernels.SOURCE = source
        lib = cpu_kernels._load()
    finally:
        cpu_kernels.SOURCE = current
        cpu_kernels._state.clear()
    if lib is None:
        raise SystemExit(f"the kernel at {rev} did not build")
    return lib


def _with_library(lib, fn, *args):
    """fn(*args) with `lib` as the kernel library (the current one put back after)."""
    cpu_kernels._load()
    current = cpu_kernels._state["lib"]
    cpu_kernels._state["lib"] = lib
    try:
        return fn(*args)
    finally:
        cpu_kernels._state["lib"] = current


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,4,8,16,32,64,128")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--spec", default="a4g32")
    ap.add_argument("--threads", type=int, default=1, help="also time the threaded paths on this many threads")
    ap.add_argument("--against", metavar="REV",
                    help="also time the kernel as packed_kernels.c was at git revision REV (its best ISA), side by side")
    ap.add_argument("--no-history", action="store_true")
    a = ap.parse_args()
    earlier = _library_at(a.against) if a.against else None
    earlier_path = f"kernel {(a.against or '')[:10]}"
    status = cpu_kernels.status()
    print(f"CPU backend: {cpu_kernels.describe()}; load {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    rng = np.random.default_rng(0)
    spec = QuantSpec.parse(a.spec)
    packed = [quantize_rtn(rng.standard_normal(s).astype(np.float32) * 0.05, spec) for _ in range(a.layers) for s in SHAPES]
    mats = [cpu_kernels.PackedMatrix([t]) for t in packed]
    dense = [dequantize(t) for t in packed]
    pbytes, fbytes = sum(t.nbytes for t in packed) / 1e9, sum(w.nbytes for w in dense) / 1e9

    def run(fn, rows):
        xs = {k: rng.standard_normal((rows, k)).astype(np.float32) for k in (576, 1536)}
        t = time.perf_counter()
        for i in range(len(packed)):
            fn(i, xs[packed[i].k])
        return (time.perf_counter() - t) * 1000

    paths = {f"kernel {isa}": (lambda i, x, isa=isa: cpu_kernels.kernel_matmul(x, packed[i], isa), pbytes)
             for isa in cpu_kernels.kernel_isas() if isa != "scalar"}
    if earlier is not None:
        paths[earlier_path] = (lambda i, x: _with_library(earlier, cpu_kernels.kernel_matmul, x, packed[i]), pbytes)
    paths["deq+blas"] = (lambda i, x: mats[i]._blas(x), pbytes)
    paths["f32 blas"] = (lambda i, x: x @ dense[i].T, fbytes)
    n_t = a.threads
    if n_t > 1 and status["kernel"]:
        from concurrent.futures import ThreadPoolExecutor

        ex = ThreadPoolExecutor(n_t - 1)
        shares = [[cpu_kernels.PackedMatrix([t.rows(t.n * j // n_t, t.n * (j + 1) // n_t)]) for j in range(n_t)] for t in packed]

        def py_threads(i, x):
            futures = [ex.submit(m.apply, x, None, 1) for m in shares[i][1:]]
            ys = [shares[i][0].apply(x, None, 1)] + [f.result() for f in futures]
            return np.concatenate(ys, axis=1)

        paths[f"kernel {n_t}t"] = (lambda i, x: mats[i].apply(x, threads=n_t) if x.shape[0] <= cpu_kernels.MAX_KERNEL_ROWS
                                   else cpu_kernels.kernel_matmul(x, packed[i], threads=n_t), pbytes)
        paths[f"pyth {n_t}t"] = (py_threads, pbytes)
        paths[f"deq+blas {n_t}t"] = (lambda i, x: mats[i]._blas(x, n_t), pbytes)
    best = f"kernel {status['kernel']}"
    print(f"{a.layers}-layer {spec.name} stage: {pbytes * 1000:.0f} MB packed, {fbytes * 1000:.0f} MB as f32; "
          f"ms per stage (GB/s streamed), median of {a.rounds} alternating rounds")
    print(f"{'rows':>5} " + " ".join(f"{name:>20}" for name in paths) + f"   f32 blas / {best}   deq+blas / {best}")
    figures = []
    for rows in [int(r) for r in a.rows.split(",")]:
        times = {name: [] for name in paths}
        for _ in range(a.rounds):
            for name, (fn, _) in paths.items():
                times[name].append(run(fn, rows))
        ms = {name: statistics.median(v) for name, v in times.items()}
        cols = " ".join(f"{ms[n]:>11.2f} ({paths[n][1] / ms[n] * 1000:5.1f})" for n in paths)
        k = ms.get(best, float("nan"))
        print(f"{rows:>5} {cols}   {ms['f32 blas'] / k:>13.2f}x   {ms['deq+blas'] / k:>13.2f}x"
              + (f"   {best} / {earlier_path} {k / ms[earlier_path]:.3f}x" if earlier is not None else ""),
              flush=True)
        figures += [(f"cpu_kernel.packed_stage_ms.{name.split()[0].replace('+', '_')}_{rows}_rows", v)
                    for name, v in ms.items() if name in (best, "deq+blas", "f32 blas")]
        if n_t > 1 and f"kernel {n_t}t" in ms:
            print(f"{'':>5} {n_t} threads: kernel (C pool) {k / ms[f'kernel {n_t}t']:.2f}x one thread, Python threads "
                  f"{k / ms[f'pyth {n_t}t']:.2f}x; deq+blas {ms['deq+blas'] / ms[f'deq+blas {n_t}t']:.2f}x one thread")
            figures += [(f"cpu_kernel.packed_stage_ms.{kind}_{n_t}t_{rows}_rows", ms[f"{name} {n_t}t"])
                        for kind, name in (("kernel_pool", "kernel"), ("kernel_pythreads", "pyth"), ("deq_blas", "deq+blas"))]
    if not a.no_history:
        from tabshard.bench_history import DEFAULT_DB, Figure, History, machine

        h = History(DEFAULT_DB)
        try:
            run_ = h.start_run(machine(adapter=False), suite="bench_cpu_kernel")
            for metric, v in figures:
                h.add(run_, Figure.of(metric, [v], "ms", "lower"))
        finally:
            h.close()
        print(f"history: {len(figures)} figures appended to {DEFAULT_DB}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
