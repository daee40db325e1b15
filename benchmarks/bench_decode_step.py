"""The CPU backend's whole decode step on the real SmolLM2 GGUF, against the backend as it was at
a git revision, side by side in one run:

    .venv/bin/python benchmarks/bench_decode_step.py --against REV [--rows 1,2,4,8] [--context 60] [--rounds 15]

Two NumpyBackends over the same weights on one thread, as a slowed worker runs: today's, and
tab_worker/numpy_backend.py as it was at REV with the kernel library built from
kernels/c/packed_kernels.c as it was at REV (benchmarks/bench_cpu_kernel.py's _library_at).
Each holds `rows` sessions of `context` positions; a step is one decode row for each of them
and the head's top-8 (tab_worker.backends.forward_topk), timed as the thread's CPU time, the
step's KV rows dropped after. Rounds alternate which backend goes first; the figures are
medians over rounds, with the top-8 ids of both (equal, or a change of numerics shows) and the
largest difference of their logits. Appended to the benchmark history unless --no-history.
"""
from __future__ import annotations

import argparse
import importlib.util
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
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

from bench_cpu_kernel import _library_at  # noqa: E402
from model.loader import GGUFModel, default_model_path  # noqa: E402
from protocol.model_types import SessionSlice  # noqa: E402
from tab_worker import cpu_kernels  # noqa: E402
from tab_worker.backends import forward_topk  # noqa: E402
from tab_worker.numpy_backend import NumpyBackend  # noqa: E402


def _backend_module_at(rev: str):
    """tab_worker/numpy_backend.py as it was at git revision `rev`, as a module of its own."""
    path = Path(tempfile.mkdtemp()) / "numpy_backend_then.py"
    path.write_bytes(subprocess.run(["git", "show", f"{rev}:tab_worker/numpy_backend.py"], cwd=ROOT, check=True,
                                    capture_output=True).stdout)
    spec = importlib.util.spec_from_file_location("numpy_backend_then", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--against", metavar="REV", required=True)
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--context", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-history", action="store_true")
    a = ap.parse_args()
    rows = [int(r) for r in a.rows.split(",")]
    then_lib = _library_at(a.against)
    cpu_kernels._load()
    now_lib = cpu_kernels._state["lib"]
    then = _backend_module_at(a.against)
    weights = GGUFModel(default_model_path()).load_all()
    cfg, layers = weights.config, dict(enumerate(weights.layers))
    max_ctx = a.context + 8
    sides = {"now": (NumpyBackend(cfg, layers, weights.head, max_ctx, threads=1), now_lib),
             "then": (then.NumpyBackend(cfg, layers, weights.head, max_ctx, threads=1), then_lib)}
    history = np.random.default_rng(1).standard_normal((a.context, cfg.hidden)).astype(np.float32)
    for backend, lib in sides.values():
        cpu_kernels._state["lib"] = lib
        for i in range(max(rows)):
            forward_topk(backend, [SessionSlice(f"s{i}", 0, a.context)], history, 8)
    cpu_kernels._state["lib"] = now_lib
    rng = np.random.default_rng(0)
    xs = {r: rng.standard_normal((r, cfg.hidden)).astype(np.float32) for r in rows}
    times = {(side, r): [] for side in sides for r in rows}
    outs = {}
    print(f"CPU backend: {cpu_kernels.describe()}; SmolLM2 decode steps at context {a.context}, one thread, "
          f"now against {a.against[:10]}; load {' '.join(f'{v:.1f}' for v in os.getloadavg())}", flush=True)
    try:
        for k in range(a.rounds):
            for r in rows:
                for side in (("now", "then") if k % 2 else ("then", "now")):
                    backend, lib = sides[side]
                    cpu_kernels._state["lib"] = lib
                    slices = [SessionSlice(f"s{i}", a.context, 1) for i in range(r)]
                    c0 = time.thread_time()
                    ids, logits = forward_topk(backend, slices, xs[r], 8)
                    times[(side, r)].append((time.thread_time() - c0) * 1000)
                    outs.setdefault((side, r), (ids.copy(), logits.copy()))
                    for i in range(r):
                        backend.truncate_session(f"s{i}", a.context)
    finally:
        cpu_kernels._state["lib"] = now_lib
    figures = []
    for r in rows:
        now, was = statistics.median(times[("now", r)]), statistics.median(times[("then", r)])
        same = np.array_equal(outs[("now", r)][0], outs[("then", r)][0])
        diff = float(np.abs(outs[("now", r)][1] - outs[("then", r)][1]).max())
        print(f"{r:>3} rows: now {now:.2f} ms, then {was:.2f} ms: {now / was:.3f}x; top-8 ids identical {same}, "
              f"logits differ by {diff:.2e} at most", flush=True)
        figures += [(f"decode_step.ctx{a.context}.{r}_rows_ms", now), (f"decode_step.ctx{a.context}.{r}_rows_ratio_to_then", now / was)]
    if not a.no_history:
        from tabshard.bench_history import Figure, append_figures

        append_figures([Figure.of(m, [v], "ms" if m.endswith("_ms") else "x", "lower") for m, v in figures], "bench_decode_step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
