"""Speculative decoding side by side: single-stream decode tok/s with speculation off and on, the
same prompts, the same cluster, in alternating rounds, at simulated per-hop latencies:

    .venv/bin/python benchmarks/bench_speculation.py [--quick] [--hops 0,5,20] [--workers 4,1]

* The coordinator (real `tabshard serve` code: CoordinatorService and its Starlette app on
  uvicorn, SmolLM2-135M) runs in this process, so that speculation can be switched between
  requests (core.speculation) and the per-hop delay set (simulation/network.py: every message to
  a remote worker leaves hop_ms later); workers are `tabshard worker` processes on 127.0.0.1.
* Prompts: GROUNDED, built from passages of Python's own docs (pydoc_data) -- repeat, summarise,
  correct or continue a given passage, complete code that repeats its identifiers -- and FREE,
  with nothing to look up. Greedy; each prompt's tokens must be identical with and without
  speculation (checked: a mismatch is reported and fails the run).
* Figures: decode tok/s (tokens after the first / time from the first to the last) summed over
  the prompts of a set, per round, the two arms paired prompt by prompt (alternating which goes
  first); the ratio on/off of each round; the median over rounds. Also the acceptance rate and
  tokens per trip (speculation on). Appended to the benchmark history (--no-history: not).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOKEN = "bench-speculation"


def grounded_prompts() -> list[str]:
    """Ten prompts whose answers quote what the prompt holds (pydoc_data passages, code)."""
    from pydoc_data.topics import topics

    def passage(key: str, chars: int = 420) -> str:
        text = " ".join(topics[key].split())
        cut = text.rfind(". ", 0, chars)
        return text[: cut + 1 if cut > 0 else chars]

    typo = passage("while").replace("the ", "teh ", 3).replace("loop", "lopo", 2)
    code = ('def mean_of_values(values):\n    total_of_values = 0\n    for value in values:\n'
            '        total_of_values += value\n    return total_of_values / len(values)\n\n\n'
            'def variance_of_values(values):\n    mean_value = mean_of_values(values)\n')
    code2 = ('class Inventory:\n    def __init__(self):\n        self.items_by_name = {}\n\n'
             '    def add_item(self, name, count):\n        self.items_by_name[name] = self.items_by_name.get(name, 0) + count\n\n'
             '    def remove_item(self, name, count):\n')
    return [
        f"Repeat the following passage word for word:\n\n{passage('for')}",
        f"Repeat the following passage word for word:\n\n{passage('if')}",
        f"Summarise this passage from the Python documentation:\n\n{passage('with')}",
        f"Summarise this passage from the Python documentation:\n\n{passage('try')}",
        f"Correct the spelling mistakes in this text and give back the whole corrected text:\n\n{typo}",
        f"Rewrite this passage in plain words, keeping its terms:\n\n{passage('return')}",
        f"Quote the first two sentences of this passage, then explain them:\n\n{passage('import')}",
        f"Copy this passage, then list the keywords it names:\n\n{passage('lambda')}",
        f"Complete this Python code:\n\n```python\n{code}```",
        f"Complete this Python code:\n\n```python\n{code2}```",
    ]


FREE = [
    "Write a short poem about the sea at night.",
    "Give me three ideas for a birthday present for a ten-year-old.",
    "What is a good way to start learning to cook?",
    "Tell me a short story about a cat who wants to fly.",
]


async def generate(service, ids: list[int], max_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens of one request, and its decode time (first token to last)."""
    from model.sampling import SamplingParams

    rid, client = service.open_request(ids, max_tokens, SamplingParams())
    tokens, stamps = [], []
    try:
        while True:
            ev = await asyncio.wait_for(client.queue.get(), 900)  # a loaded small host has stalled minutes
            if ev["type"] == "token":
                tokens.append(ev["token_id"])
                stamps.append(time.perf_counter())
            elif ev["type"] == "rewind":
                del tokens[ev["index"]:]
                del stamps[ev["index"]:]
            elif ev["type"] in ("done", "error"):
                if ev["type"] == "error":
                    raise RuntimeError(f"request failed: {ev}")
                break
    finally:
        service.close_request(rid, cancelled=False)
    return tokens, (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0


async def run_cluster(n_workers: int, hops: list[float], rounds: int, max_tokens: int, max_k: int, prompts: dict,
                      drafter: str = "lookup", draft_deadline_ms: float = 50.0) -> dict:
    import uvicorn

    from coordinator.app import build_app
    from coordinator.speculation import Speculator
    from coordinator.records import CoordinatorSettings
    from model.loader import open_model
    from simulation.network import LatencyService
    from tabshard.cluster import LocalCluster, free_port

    # one stage per worker: the case is a single stream crossing every tab of a pipeline
    # (the planner alone would give SmolLM2, which fits in one worker, one stage and replicas)
    settings = CoordinatorSettings(max_ctx=2048, stages=n_workers, draft_deadline_ms=draft_deadline_ms)
    service = LatencyService(open_model(None), settings, join_token=TOKEN)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(service), host="127.0.0.1", port=port, log_level="warning",
                                           ws_max_size=64 << 20, ws_ping_interval=None, ws_per_message_deflate=False))
    serving = asyncio.create_task(server.serve())
    cluster = LocalCluster(workers=n_workers, port=port, token=TOKEN)
    try:
        while not server.started:
            await asyncio.sleep(0.05)
        for i in range(n_workers):
            # --drafter tab: the last worker drafts with a draft model of its own (SmolLM2 itself:
            # the one model of its vocabulary here, so a draft costs what a token of the target does)
            tab = drafter == "tab" and i == n_workers - 1
            cluster.add_worker(extra=["--draft-model", str(service.model.path)] if tab else None)
        deadline = time.monotonic() + 300
        while True:
            st = service.status()
            remote = [w for w in st["workers"] if not w["local"] and w["state"] == "ready"]
            if (st["stages"] and len(remote) >= n_workers and all(s["holders"] and s["holders"][0] in s["ready"]
                                                                   and s["holders"][0] != "local" for s in st["stages"])
                    and all(r[2] == "ready" for r in st.get("verifier_ranges", []))):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster of {n_workers} not ready: {json.dumps(st)[:1500]}")
            await asyncio.sleep(0.2)
        tok = service.tokenizer
        encoded = {name: [tok.encode(tok.render_chat([{"role": "user", "content": p}])) for p in ps] for name, ps in prompts.items()}
        await generate(service, next(iter(encoded.values()))[0], 8)  # warm-up (the free set may not run)
        result = {"workers": n_workers, "stages": len(service.core.stages), "drafter": drafter, "hops": {}}
        for hop in hops:
            service.hop_ms = hop
            # arms paired prompt by prompt (off then on, then on then off for the next): on a
            # shared small host the load moves over seconds, and a pair sees the same load
            per = {name: {"off": [], "on": []} for name in encoded}  # per round: (tokens, seconds, outputs)
            mode = "draft-model" if drafter == "tab" else "prompt-lookup"  # draft-model with no source here: a worker's
            spec = {name: Speculator(mode, max_k) for name in encoded}  # stats per prompt set
            mismatches = []
            for r in range(rounds):
                for name, ids_list in encoded.items():
                    acc = {"off": [0, 0.0, []], "on": [0, 0.0, []]}
                    for i, ids in enumerate(ids_list):
                        for arm in (("off", "on") if (i + r) % 2 == 0 else ("on", "off")):
                            service.core.speculation = spec[name] if arm == "on" else Speculator("off", max_k)
                            tokens, t = await generate(service, ids, max_tokens)
                            acc[arm][0] += len(tokens) - 1
                            acc[arm][1] += t
                            acc[arm][2].append(tokens)
                    for arm in acc:
                        per[name][arm].append(acc[arm])
            for name in encoded:
                off = [n / t for n, t, _ in per[name]["off"]]
                on = [n / t for n, t, _ in per[name]["on"]]
                same = all(a[2] == b[2] for a, b in zip(per[name]["off"], per[name]["on"]))
                if not same:
                    mismatches.append(name)
                st = spec[name].status()
                result["hops"].setdefault(str(hop), {})[name] = {
                    "off_tok_s": statistics.median(off), "on_tok_s": statistics.median(on),
                    "ratio": statistics.median(b / a for a, b in zip(off, on)), "ratio_rounds": [b / a for a, b in zip(off, on)],
                    "tokens_identical": same, "acceptance_rate": st["acceptance_rate"], "tokens_per_trip": st["tokens_per_trip"],
                    "tokens": sum(len(t) for t in per[name]["on"][0][2])}
                h = result["hops"][str(hop)][name]
                h["drafts_missed"] = service.core.counters["drafts_missed"]
                print(f"  {n_workers} worker(s), drafter {drafter}, hop {hop:g} ms, {name:8s}: off {h['off_tok_s']:6.2f} tok/s | on {h['on_tok_s']:6.2f} tok/s | "
                      f"ratio {h['ratio']:.2f} (rounds {', '.join(f'{x:.2f}' for x in h['ratio_rounds'])}) | "
                      f"acceptance {h['acceptance_rate']} | tokens/trip {h['tokens_per_trip']} | identical {same}"
                      + (f" | drafts missed so far {h['drafts_missed']}" if drafter == "tab" else ""), flush=True)
            result["hops"][str(hop)]["mismatches"] = mismatches
        return result
    finally:
        cluster.coordinator = None
        cluster.stop()
        server.should_exit = True
        await serving


def record(results: list[dict]) -> None:
    from tabshard.bench_history import Figure, append_figures

    figures = []
    for res in results:
        for hop, sets in res["hops"].items():
            for name in [k for k in ("grounded", "free") if k in sets]:
                h = sets[name]
                tag = f"speculation{'.tabdraft' if res.get('drafter') == 'tab' else ''}.{name}.w{res['workers']}.hop{hop}ms"
                figures += [Figure.of(f"{tag}.ratio_on_over_off", h["ratio_rounds"], "×", "higher"),
                            Figure.of(f"{tag}.on_tok_s", [h["on_tok_s"]], "tok/s", "higher")]
    append_figures(figures, "bench_speculation")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round, 32 tokens, 4 grounded and 2 free prompts")
    ap.add_argument("--workers", default="4,1", help="cluster sizes, comma-separated (default 4,1)")
    ap.add_argument("--hops", default="0,5,20", help="simulated per-hop latencies in ms (default 0,5,20)")
    ap.add_argument("--hops-1", default=None, help="latencies for the 1-worker cluster (default: --hops)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating off/on rounds (default 3; --quick 1)")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per prompt (default 64; --quick 32)")
    ap.add_argument("--max-k", type=int, default=6)
    ap.add_argument("--sets", default="grounded,free", help="prompt sets to run (default grounded,free)")
    ap.add_argument("--drafter", choices=["lookup", "tab"], default="lookup",
                    help="who drafts: the coordinator's prompt lookup, or a worker's draft model (tabshard worker --draft-model)")
    ap.add_argument("--draft-deadline-ms", type=float, default=50.0, help="how long a trip waits for a worker's drafts (+ its rtt)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--no-history", action="store_true", help="do not append the figures to the benchmark history")
    a = ap.parse_args()
    rounds = a.rounds or (1 if a.quick else 3)
    max_tokens = a.max_tokens or (32 if a.quick else 64)
    prompts = {"grounded": grounded_prompts(), "free": FREE}
    if a.quick:
        prompts = {"grounded": prompts["grounded"][::3], "free": FREE[:2]}
    prompts = {name: prompts[name] for name in a.sets.split(",")}
    hops = [float(x) for x in a.hops.split(",")]
    results = []
    for n in (int(x) for x in a.workers.split(",")):
        print(f"cluster of {n} worker(s): {rounds} rounds, {max_tokens} tokens a prompt, "
              f"{' + '.join(f'{len(v)} {k}' for k, v in prompts.items())} prompts, max k {a.max_k}", flush=True)
        hop_list = [float(x) for x in a.hops_1.split(",")] if n == 1 and a.hops_1 else hops
        results.append(asyncio.run(run_cluster(n, hop_list, rounds, max_tokens, a.max_k, prompts, a.drafter, a.draft_deadline_ms)))
        if a.json:  # after each cluster: a later one failing keeps these
            Path(a.json).write_text(json.dumps(results, indent=1))
    if not a.no_history:
        record(results)
    bad = [(r["workers"], hop) for r in results for hop, s in r["hops"].items() if s["mismatches"]]
    if bad:
        sys.exit(f"tokens differ with speculation on (workers, hop ms): {bad}")


if __name__ == "__main__":
    main()
