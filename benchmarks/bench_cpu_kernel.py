"""The numpy backend's compiled few-row matmul against BLAS, side by side in one run.

One 8-layer SmolLM2-135M stage of f32 weights in their [out, in] layout (fused q/k/v 960x576,
o 576x576, fused gate/up 3072x576, down 576x1536: 113 MB, the bytes a decode step streams),
timed for batches of M rows:

* kernel: tab_worker.cpu_kernels.kernel_rows_matmul (each path this CPU has: avx2, avx512);
* blas:   x @ W.T, what NumpyBackend runs without the kernel (and for M > MAX_KERNEL_ROWS).

Medians of --repeats passes, each on fresh inputs; ms per stage and GB/s of weights read.
The figures are appended to the benchmark history unless --no-history.

    .venv/bin/python benchmarks/bench_cpu_kernel.py [--rows 1,2,4,8,16,32,64] [--repeats 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the workers run it (tabshard/cluster.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from tab_worker import cpu_kernels  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LAYERS = 8


def stage_ms(weights, rows: int, matmul, repeats: int, rng) -> float:
    times = []
    for _ in range(repeats):
        x576 = rng.standard_normal((rows, 576)).astype(np.float32)
        x1536 = rng.standard_normal((rows, 1536)).astype(np.float32)
        t = time.perf_counter()
        for layer in weights:
            for w in layer:
                matmul(x1536 if w.shape[1] == 1536 else x576, w)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-history", action="store_true")
    a = ap.parse_args()
    status = cpu_kernels.status()
    print(f"rows kernel: {status['rows_kernel'] or 'none'} ({status['reason'] or 'built'}); used for steps of <= {status['max_rows']} rows")
    rng = np.random.default_rng(0)
    weights = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(LAYERS)]
    gbytes = sum(w.nbytes for layer in weights for w in layer) / 1e9
    paths = {f"kernel {isa}": (lambda x, w, isa=isa: cpu_kernels.kernel_rows_matmul(x, w, isa)) for isa in cpu_kernels.kernel_isas()}
    paths["blas x @ W.T"] = lambda x, w: x @ w.T
    print(f"{LAYERS}-layer stage, {gbytes * 1000:.0f} MB of f32 weights; ms per stage (GB/s of weights), median of {a.repeats}")
    print(f"{'rows':>5} " + " ".join(f"{name:>22}" for name in paths) + "   blas / best kernel")
    figures = []
    for rows in [int(r) for r in a.rows.split(",")]:
        ms = {name: stage_ms(weights, rows, fn, a.repeats, rng) for name, fn in paths.items()}
        kernels = [v for k, v in ms.items() if k.startswith("kernel")]
        ratio = ms["blas x @ W.T"] / min(kernels) if kernels else float("nan")
        print(f"{rows:>5} " + " ".join(f"{v:>12.2f} ({gbytes / v * 1000:5.1f})" for v in ms.values()) + f"   {ratio:.2f}x", flush=True)
        figures += [(f"cpu_kernel.stage_ms.{name.split()[0]}_{rows}_rows", v) for name, v in ms.items()
                    if name in ("blas x @ W.T", f"kernel {status['rows_kernel']}")]
    if not a.no_history:
        from tabshard.bench_history import DEFAULT_DB, Figure, History, machine

        h = History(DEFAULT_DB)
        try:
            run = h.start_run(machine(adapter=False), suite="bench_cpu_kernel")
            for metric, v in figures:
                h.add(run, Figure.of(metric, [v], "ms", "lower"))
        finally:
            h.close()
        print(f"history: {len(figures)} figures appended to {DEFAULT_DB}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
