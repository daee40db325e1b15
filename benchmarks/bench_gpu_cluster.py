"""GPU tabs on Ray, side by side in one run: the same model

  * in one process on one GPU (the wgpu backend driven directly: no coordinator, no sockets),
  * as clusters of 1, 2 and 4 simulated GPU tabs (Ray actors with native wgpu, each given its GPU
    by Ray and computing on that GPU's adapter; with fewer GPUs than tabs they share them),

each at a single stream and at 32 concurrent streams (greedy, same prompts), into the benchmark
history. --processes runs the clusters as `tabshard serve` with N `tabshard worker --backend wgpu`
processes instead (tabshard.cluster.LocalCluster, one pipeline stage each: --stages N), for a host
without Ray (the device machine). The multi-GPU figures need a host with as many GPUs as tabs (e.g. nvidia-h200-x4); on a
one-GPU host the tabs share the GPU (time-sliced by the driver: a floor, not a pipeline's speed),
and the output says so.

    python benchmarks/bench_gpu_cluster.py [--model synthetic:llama-7b] [--tabs 1,2,4]
        [--streams 1,32] [--tokens 32] [--gpus N] [--processes] [--json FILE] [--no-history]
    python benchmarks/bench_gpu_cluster.py --append-json FILE   # a device machine's --json into this history

Aggregate tok/s of a batch of streams = decode tokens of all streams (each one's tokens after its
first) / (last token of any stream - first token of any stream).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [f"Tell me about shard {i} of the model and why tabs are useful for it." for i in range(64)]


def _aggregate(results) -> dict:
    firsts = [r.times[0] for r in results if r.times]
    lasts = [r.times[-1] for r in results if r.times]
    tokens = sum(max(0, len(r.times) - 1) for r in results)
    span = (max(lasts) - min(firsts)) if firsts else 0.0
    errors = [r.error for r in results if r.error]
    return {"streams": len(results), "decode_tokens": tokens, "span_s": round(span, 3),
            "tok_s": round(tokens / span, 2) if span > 0 else None, "errors": errors[:3],
            "ttft_p50_s": round(sorted(r.ttft for r in results if r.ttft is not None)[len(results) // 2], 3)
            if all(r.ttft is not None for r in results) else None}


def _streams(base: str, tag: str, label: dict, streams: list[int], tokens: int) -> dict:
    """For each n in streams: n concurrent requests, once to warm (kernels built, buffers sized
    for this batch), then measured: {n: aggregate}."""
    from simulation.workload import stream_request

    out = {}
    for n in streams:
        async def batch(n=n):
            return await asyncio.gather(*(stream_request(base, f"{tag}-{n}-{i}", PROMPTS[i], tokens, timeout=900)
                                          for i in range(n)))
        asyncio.run(batch())
        out[n] = _aggregate(asyncio.run(batch()))
        print(json.dumps({**label, "result": out[n]}), file=sys.stderr, flush=True)
    return out


def in_process(model: str, streams: list[int], tokens: int) -> dict:
    """The model's layers and head in one wgpu backend of this process: the ceiling for a cluster."""
    from tab_worker.backends import forward_topk, make_backend
    from protocol.model_types import SessionSlice
    from model.embedding import embed
    from model.loader import open_model
    from model.tokenizer import GGUFTokenizer

    m = open_model(model)
    w = m.load_all()
    tok = GGUFTokenizer(m)
    out = {}
    max_ctx = 64 + tokens + 8
    backend = make_backend("wgpu", w.config, dict(enumerate(w.layers)), w.head, max_ctx)
    for n in streams:
        prompts = [tok.encode(p)[:48] for p in PROMPTS[:n]]
        sids = [f"s{n}-{i}" for i in range(n)]
        nxt = []
        for sid, ids in zip(sids, prompts):
            top, _ = forward_topk(backend, [SessionSlice(sid, 0, len(ids))], embed(w.embedding, ids), 1)
            nxt.append(int(top[0][0]))
        pos = [len(p) for p in prompts]
        t0 = time.perf_counter()
        for _ in range(tokens - 1):
            slices = [SessionSlice(sid, p, 1) for sid, p in zip(sids, pos)]
            top, _ = forward_topk(backend, slices, embed(w.embedding, nxt), 1)
            nxt = [int(t[0]) for t in top]
            pos = [p + 1 for p in pos]
        dt = time.perf_counter() - t0
        for sid in sids:
            backend.drop_session(sid)
        out[n] = {"streams": n, "decode_tokens": n * (tokens - 1), "span_s": round(dt, 3),
                  "tok_s": round(n * (tokens - 1) / dt, 2)}
        print(json.dumps({"in_process": out[n]}), file=sys.stderr, flush=True)
    return out


def cluster(model: str, tabs: int, gpus: float, streams: list[int], tokens: int, log_dir: Path) -> dict:
    from actors.tab import SimulatedTab
    from simulation.runtime import CoordinatorProcess, plan_served

    share = 1.0 if gpus >= tabs else gpus / tabs
    (log_dir / "serve.toml").write_text("[serve]\nheartbeat_ms = 250\nmeasure_tokens = 4\n")
    coord = CoordinatorProcess(["--no-coordinator-compute", "--config", str(log_dir / "serve.toml")], model=model,
                               log_path=str(log_dir / f"coordinator-{tabs}.log"))
    coord.start(timeout=900)
    sim = []
    out: dict = {"tabs": tabs, "gpu_share_per_tab": share}
    try:
        sim = [SimulatedTab(f"gpu-tab-{i}", coord.worker_url, coord.token, profile="chrome-desktop-discrete",
                            backend="wgpu", memory_bytes=64 << 30, seed=i, num_gpus=share) for i in range(tabs)]
        for t in sim:
            t.wait_connected(timeout=900)
        st = coord.wait_for(plan_served, 1800, "a plan served by the GPU tabs")
        out["stages"] = [s["layers"] + (["head"] if s["head"] else []) for s in st["stages"]]
        out["adapters"] = [t.info().get("adapter") for t in sim]
        out.update(_streams(coord.base, f"b{tabs}", {"tabs": tabs}, streams, tokens))
    finally:
        for t in sim:
            t.kill()
        coord.stop()
    return out


def processes(model: str, workers: int, streams: list[int], tokens: int, log_dir: Path) -> dict:
    """`tabshard serve` and ``workers`` wgpu worker processes on 127.0.0.1, one stage each."""
    from tabshard.cluster import LocalCluster

    cfg = log_dir / "serve.toml"
    cfg.write_text("[serve]\nheartbeat_ms = 250\nmeasure_tokens = 4\n")
    cluster = LocalCluster(workers, backend="wgpu", model=model, log_dir=str(log_dir / f"workers-{workers}"),
                           serve_args=["--no-coordinator-compute", "--stages", str(workers), "--config", str(cfg)])
    out: dict = {"workers": workers}
    with cluster.start(timeout=900):
        out["stages"] = [s["layers"] + (["head"] if s["head"] else []) for s in cluster.status()["stages"]]
        out.update(_streams(cluster.base, f"p{workers}", {"workers": workers}, streams, tokens))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="synthetic:llama-7b")
    p.add_argument("--tabs", default="1,2,4")
    p.add_argument("--streams", default="1,32")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--gpus", type=float, default=None, help="GPUs to declare to the local Ray (default: detected)")
    p.add_argument("--processes", action="store_true", help="serve + worker processes, no Ray (one stage a worker)")
    p.add_argument("--json", default="", help="write the result here too")
    p.add_argument("--no-history", action="store_true")
    p.add_argument("--append-json", default="", help="append a --json file of another machine's run to the history, then exit")
    a = p.parse_args()
    tabs = [int(x) for x in a.tabs.split(",")]
    streams = [int(x) for x in a.streams.split(",")]
    if a.append_json:
        result = json.loads(Path(a.append_json).read_text())
        for key in [k for k in result if k == "in_process" or k.startswith("tabs_")]:  # JSON made the stream counts strings
            result[key] = {int(k) if k.isdigit() else k: v for k, v in result[key].items()}
        a.json = ""
        report(result, result["tabs"], result["streams"], a)
        return
    if not os.environ.get("XDG_RUNTIME_DIR") or not os.path.isdir(os.environ["XDG_RUNTIME_DIR"]):
        os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="xdg-")

    from kernels.adapters import gpu_adapters, list_adapters

    adapters = list_adapters()
    from tabshard.bench_history import machine

    result = {"model": a.model, "tokens": a.tokens, "tabs": tabs, "streams": streams, "kind": "processes_" if a.processes else "",
              "adapters": [x.describe() for x in adapters], "in_process": in_process(a.model, streams, a.tokens)}
    shown = gpu_adapters(adapters) or adapters
    result["machine"] = {**machine(adapter=False), "adapter": shown[0].describe() if shown else "none"}
    log_dir = Path(tempfile.mkdtemp(prefix="bench-gpu-cluster-"))
    if a.processes:
        for n in tabs:
            result[f"tabs_{n}"] = processes(a.model, n, streams, a.tokens, log_dir)
        report(result, tabs, streams, a)
        return
    from simulation.runtime import ray_session

    with ray_session(num_cpus=max(2, os.cpu_count() or 2), num_gpus=a.gpus) as ray:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        result["ray_gpus"] = gpus
        result["gpu_adapters"] = len(gpu_adapters(adapters))
        if gpus < 1:
            raise SystemExit(f"the Ray cluster has no GPU (adapters: {result['adapters']}); declare them with --gpus")
        if gpus < max(tabs):
            result["note"] = (f"{gpus:g} GPU(s) for up to {max(tabs)} tabs: tabs share GPUs (time-sliced), so the "
                              f"multi-tab figures are a floor, not a pipeline over separate GPUs")
        for n in tabs:
            result[f"tabs_{n}"] = cluster(a.model, n, gpus, streams, a.tokens, log_dir)
    report(result, tabs, streams, a)


def report(result: dict, tabs: list[int], streams: list[int], a) -> None:
    """Ratios to one tab, the JSON, and the figures into the history (process clusters named so)."""
    base = result.get("tabs_1", {})
    for n in tabs:
        for s in streams:
            r, b = result[f"tabs_{n}"].get(s, {}), base.get(s, {})
            if r.get("tok_s") and b.get("tok_s"):
                result[f"ratio_tabs_{n}_over_1_streams_{s}"] = round(r["tok_s"] / b["tok_s"], 3)
    print(json.dumps(result, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(result))
    if not a.no_history:
        from tabshard.bench_history import Figure, append_figures, recorded_machine

        figures = [Figure.of(f"gpu_cluster.in_process_tok_s_{s}", [result["in_process"][s]["tok_s"]], "tok/s", "higher")
                   for s in streams]
        for n in tabs:
            for s in streams:
                v = result[f"tabs_{n}"].get(s, {}).get("tok_s")
                if v:
                    figures.append(Figure.of(f"gpu_cluster.{result['kind']}tabs_{n}_tok_s_{s}", [v], "tok/s", "higher"))
        # the machine that measured (a device machine's --json is appended elsewhere with --append-json)
        append_figures(figures, "bench_gpu_cluster", measured_on=recorded_machine(result.get("machine"), result["adapters"][0]))


if __name__ == "__main__":
    main()
