"""A synthetic model (model/synthetic.py) served by memory-capped numpy simulated tabs, and the
same weights run in one process: the 7B-in-tabs benchmark (benchmarks/bench_7b.py) and its CI
twin at small size (tests/test_synthetic_tabs.py) share this code path.

    rep = run_in_tabs("synthetic:llama-mini", tabs=4, tab_memory_bytes=1 << 20, prompt="tabs", max_tokens=4)
    rep["ids"] == reference_tokens("synthetic:llama-mini", "tabs", 4)["ids"]
"""
from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

from protocol.messages import DEFAULT_HEARTBEAT_MS


def _rss(pid: int | None = None) -> tuple[int, int]:
    rss = hwm = 0
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


def reference_tokens(model_path: str, prompt: str, max_tokens: int) -> dict:
    """Greedy tokens of a single-process run of the same weights, on the numpy backend,
    which holds only the packed weights like the tabs (7B in dense f32 would be 27 GB)."""
    from protocol.model_types import ModelWeights
    from tab_worker.generate import GenerationStats, LocalGenerator
    from model.loader import open_model
    from model.tokenizer import GGUFTokenizer

    model = open_model(model_path)
    prompt_ids = GGUFTokenizer(model).encode(prompt)
    t0 = time.perf_counter()
    w = model.load_all()
    weights = ModelWeights(config=w.config, embedding=w.embedding, layers=list(w.layers), head=w.head)
    gen = LocalGenerator(weights, backend="numpy", max_ctx=len(prompt_ids) + max_tokens + 1)
    load_s = time.perf_counter() - t0
    stats = GenerationStats()
    ids = [int(t) for t in gen.generate(prompt_ids, max_tokens, stats=stats, stop_at_eos=False)]
    return {"prompt_ids": prompt_ids, "ids": ids, "load_s": round(load_s, 2), "prefill_s": round(stats.prefill_s, 2),
            "decode_step_s": [round(s, 2) for s in stats.step_times],
            "decode_tok_s": round(stats.decode_tok_s, 4), "rss_mb": round(_rss()[0] / 2**20, 1),
            "peak_rss_mb": round(_rss()[1] / 2**20, 1)}


def run_in_tabs(model_path: str, tabs: int, tab_memory_bytes: int, prompt: str, max_tokens: int,
                heartbeat_ms: int = DEFAULT_HEARTBEAT_MS, request_timeout_s: float = 3600, log_dir: str | None = None,
                progress=lambda line: None) -> dict:
    """Serve `model_path` from `tabs` numpy simulated tabs of `tab_memory_bytes` each (Ray
    actors; the coordinator never computes) and stream one greedy request."""
    from actors.tab import SimulatedTab
    from simulation.runtime import CoordinatorProcess, plan_served, ray_session
    from simulation.workload import stream_request

    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="synthetic-run-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    # slow steps are this run's nature, not a fault: a 7B stage takes seconds on a shared 2-core host
    (log_dir / "serve.toml").write_text(f"[serve]\nheartbeat_ms = {heartbeat_ms}\nstep_deadline_min_ms = 600000\n"
                                        f"measure_tokens = 2\nrequest_timeout_s = {request_timeout_s}\n")
    out: dict = {"model": model_path, "tabs": tabs, "tab_memory_mb": round(tab_memory_bytes / 2**20, 1),
                 "heartbeat_ms": heartbeat_ms}
    with ray_session():
        t0 = time.monotonic()
        coord = CoordinatorProcess(["--no-coordinator-compute", "--config", str(log_dir / "serve.toml")],
                                   model=model_path, log_path=str(log_dir / "coordinator.log"))
        coord.start(timeout=600)
        out["coordinator_up_s"] = round(time.monotonic() - t0, 1)
        progress(f"coordinator up after {out['coordinator_up_s']} s (weights generated and packed)")
        sim = []
        try:
            sim = [SimulatedTab(f"tab-{i}", coord.worker_url, coord.token, profile="cpu-wasm", backend="numpy",
                                memory_bytes=tab_memory_bytes, seed=i) for i in range(tabs)]
            for t in sim:
                t.wait_connected(timeout=600)
            out["tabs_joined_s"] = round(time.monotonic() - t0, 1)
            progress(f"{tabs} tabs joined after {out['tabs_joined_s']} s")
            st = coord.wait_for(plan_served, 3600, "a plan served by tabs")
            out["load_s"] = round(time.monotonic() - t0, 1)
            out["stages"] = [s["layers"] + (["head"] if s["head"] else []) for s in st["stages"]]
            progress(f"plan served after {out['load_s']} s: {out['stages']}")
            res = asyncio.run(stream_request(coord.base, "synthetic", prompt, max_tokens, timeout=request_timeout_s))
            out["ids"], out["error"] = res.ids, res.error
            out["ttft_s"] = round(res.ttft, 2) if res.ttft is not None else None
            out["itl_s"] = [round(x, 2) for x in res.itl]
            out["decode_tok_s"] = round(len(res.itl) / sum(res.itl), 4) if res.itl else None
            infos = [t.info() for t in sim]
            out["per_tab"] = [{"name": i["name"], "ranges": i["ranges"], "held_mb": round(i["held_bytes"] / 2**20, 1),
                               "received_mb": round(i["bytes_received"] / 2**20, 1), "rss_mb": round(i["rss_bytes"] / 2**20, 1),
                               "peak_rss_mb": round(i["peak_rss_bytes"] / 2**20, 1), "steps": i["steps"]} for i in infos]
            rss, hwm = _rss(coord.proc.pid)
            out["coordinator_rss_mb"], out["coordinator_peak_rss_mb"] = round(rss / 2**20, 1), round(hwm / 2**20, 1)
            final = coord.status()
            out["deaths"] = sum(1 for w in final["workers"] if w["state"] in ("dead", "quarantined"))
        finally:
            for t in sim:
                t.kill()
            coord.stop()
    return out


def ensure_single_threaded_blas() -> None:
    """The tabs run BLAS on one thread (simulation.runtime.ACTOR_ENV); a reference run in this
    process must too, before numpy loads, to do the same arithmetic."""
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(k, "1")
