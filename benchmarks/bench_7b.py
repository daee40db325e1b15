"""The seed's "7B model in tabs of 4 GB" made real: a synthetic Llama with LLaMA-7B dimensions
(hidden 4096, 32 layers, FFN 11008, 32 heads, vocab 32000), 3-bit (s3g64) weights generated on
the fly, spread over 8 simulated tabs each capped at 1 GiB of weights; greedy tokens compared
with a single-process run of the same weights in the same CPU backend. Not CI: minutes on 2
cores (every token streams ~2.7 GB of packed codes through the packed-weight kernel);
tests/test_synthetic_tabs.py is its CI twin.

    python benchmarks/bench_7b.py [--tokens 3] [--tabs 8] [--tab-gb 1] [--model synthetic:llama-7b]
                                  [--skip-reference]

Reports load time, memory per tab (RSS), tokens/s and whether the tokens match, as JSON (and in
sim-out/bench-7b.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulation.synthetic_run import ensure_single_threaded_blas  # noqa: E402

ensure_single_threaded_blas()  # before numpy is used: the same arithmetic as the tabs


def _host() -> dict:
    import os

    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            info[k] = int(v.split()[0])
    return {"load_avg": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
            "mem_available_gb": round(info["MemAvailable"] / 2**20, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="synthetic:llama-7b")
    p.add_argument("--tokens", type=int, default=3)
    p.add_argument("--prompt", default="tabs")
    p.add_argument("--tabs", type=int, default=8)
    p.add_argument("--tab-gb", type=float, default=1.0)
    p.add_argument("--heartbeat-ms", type=int, default=1000,
                   help="tabs computing multi-second stages on 2 shared cores beat late; 1 s beats, 3.2 s to death")
    p.add_argument("--skip-reference", action="store_true")
    a = p.parse_args()

    from simulation.synthetic_run import reference_tokens, run_in_tabs
    from model.loader import open_model

    m = open_model(a.model)
    out = {"model": a.model, "config": m.config.to_dict(), "format": m.spec.name,
           "packed_gb": round(m.packed_bytes / 1e9, 3), "host_before": _host()}
    print(json.dumps(out), file=sys.stderr, flush=True)
    if not a.skip_reference:
        t = time.monotonic()
        out["reference"] = reference_tokens(a.model, a.prompt, a.tokens)
        out["reference"]["wall_s"] = round(time.monotonic() - t, 1)
        print(json.dumps({"reference": out["reference"]}), file=sys.stderr, flush=True)
    t = time.monotonic()
    out["tabs"] = run_in_tabs(a.model, a.tabs, int(a.tab_gb * (1 << 30)), a.prompt, a.tokens, heartbeat_ms=a.heartbeat_ms,
                              log_dir="sim-out/bench-7b", progress=lambda line: print(line, file=sys.stderr, flush=True))
    out["tabs"]["wall_s"] = round(time.monotonic() - t, 1)
    out["host_after"] = _host()
    if "reference" in out:
        out["tokens_match"] = out["tabs"].get("ids") == out["reference"]["ids"]
    per = out["tabs"].get("per_tab", [])
    if per:
        out["summary"] = {
            "load_s": out["tabs"]["load_s"], "tab_rss_mb_max": max(t["rss_mb"] for t in per),
            "tab_peak_rss_mb_max": max(t["peak_rss_mb"] for t in per),
            "tab_held_mb_max": max(t["held_mb"] for t in per),
            "tabs_tok_s": out["tabs"]["decode_tok_s"], "ttft_s": out["tabs"]["ttft_s"],
            "reference_tok_s": out.get("reference", {}).get("decode_tok_s"), "tokens_match": out.get("tokens_match"),
        }
    Path("sim-out").mkdir(exist_ok=True)
    Path("sim-out/bench-7b.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
