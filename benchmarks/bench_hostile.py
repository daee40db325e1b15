"""What hostile tabs cost a real cluster (issue 16), side by side in one run.

One `tabshard serve` with 2 numpy worker processes on 127.0.0.1 (the honest tabs earn trust on
warm-up requests first), then, in this order:

  alone     request latency (chat, 16 tokens, greedy) with the 2 honest workers alone
  tarpit    the same requests while a tarpit tab (claims 0.001 ms/layer and every blob, answers
            `ready` with the right digest, never answers a step) rejoins in a loop under fresh
            names from its own address; the first 10 s are its "learning" window, the figure is
            p50/p99 after them. Target: p99 <= 2x alone.
  liar      the same requests while a tab that computes with noise (actors.faults.lie) is
            connected: every answer's tokens must equal the alone ones.
  garbage   coordinator RSS before and after 1,000 oversized or garbage connection attempts
            (2 MB frames before a hello, 2 MB frames on /v1/stream, msgpack garbage, raw
            non-HTTP bytes), and again until it is back or a minute passed. Target: +<= 50 MB,
            back within 1 minute.
  prompt    a 2,000-token prompt (completions, 1 token) on the 2 workers: its time to first
            token, no eviction, against a single-process prefill of the same ids
            (LocalGenerator, numpy, model loaded). Target: TTFT <= 1.5x.

    .venv/bin/python benchmarks/bench_hostile.py [--quick] [--no-history] [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import websockets  # noqa: E402

from simulation.hostile import ScriptedTarpit  # noqa: E402
from tabshard.cluster import LocalCluster  # noqa: E402

JOIN = "bench-hostile"
LIAR = f"""
import asyncio, sys
from actors.faults import lie
from tab_worker.client import run_worker
from tab_worker.worker import TabWorker
w = TabWorker("liar", backend="numpy", token={JOIN!r})
lie(w, 3.0)  # noise of 3x the RMS of every result
asyncio.run(run_worker(sys.argv[1], w, reconnect=False))
"""


def post(base: str, path: str, body: dict, timeout: float = 300) -> tuple[int, dict, float]:
    req = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), time.perf_counter() - t0
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode("utf-8", "replace")}, time.perf_counter() - t0


def ask(base: str) -> tuple[float, str]:
    code, body, dt = post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Count from one to ten."}],
                                                         "max_tokens": 16, "temperature": 0})
    if code != 200:
        raise RuntimeError(f"request failed: {code} {body}")
    return dt * 1000, body["choices"][0]["message"]["content"]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def requests_for(base: str, seconds: float) -> list[tuple[float, float, str]]:
    """(start offset s, latency ms, text) of back-to-back requests for `seconds`."""
    out, t0 = [], time.monotonic()
    while time.monotonic() - t0 < seconds:
        start = time.monotonic() - t0
        ms, text = ask(base)
        out.append((start, ms, text))
    return out


def incidents(st: dict, since: float) -> list[str]:
    """What happened to the honest workers (and the coordinator's own) after `since` (the
    coordinator's clock): deaths, quarantines, suspects, rebuilds; a latency figure with one of
    these in its phase is explained by it, not by the hostile tab."""
    honest = {w["worker_id"] for w in st["workers"] if w["name"].startswith("worker-") or w["local"]}
    return [f"{e['kind']} {e.get('worker', e.get('stage', ''))}: {e.get('reason', '')}".strip()
            for e in st["events"] if e["t"] > since and e.get("kind") in ("death", "quarantine", "suspect", "rebuild")
            and (e.get("worker") in honest or e.get("kind") == "rebuild")]


def clock(st: dict) -> float:
    return max((e["t"] for e in st["events"]), default=float("-inf"))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


async def garbage(base_ws: str, port: int, n: int, concurrency: int = 16) -> dict:
    kinds = {"big_pre_hello": 0, "big_stream": 0, "msgpack_garbage": 0, "raw_bytes": 0}
    big = b"\x00" * (2 << 20)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        kind = list(kinds)[i % 4]
        src = f"127.0.{2 + i // 250}.{1 + i % 250}"
        async with sem:
            try:
                if kind == "raw_bytes":
                    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
                    writer.write(b"\x16\x03\x01garbage" * 64)
                    await writer.drain()
                    await asyncio.wait_for(reader.read(100), 5)
                    writer.close()
                else:
                    url = base_ws + ("/v1/stream" if kind == "big_stream" else "/ws/worker")
                    async with websockets.connect(url, compression=None, max_size=None, open_timeout=10,
                                                  local_addr=(src, 0)) as ws:
                        await ws.send(b"\xc1\xc1garbage" if kind == "msgpack_garbage" else big)
                        await asyncio.wait_for(ws.recv(), 5)
            except Exception:  # refused, closed: that is the point
                pass
            kinds[kind] += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    return kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short phases (a smoke run; figures are noisier)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-history", action="store_true")
    a = ap.parse_args()
    phase_s = 12 if a.quick else 30
    learn_s = 10
    out: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    (tmp / "serve.toml").write_text("[serve]\nmax_prompt_tokens = 2100\nmax_ctx = 2100\n")
    with LocalCluster(workers=2, token=JOIN, serve_args=["--config", str(tmp / "serve.toml")], log_dir=str(tmp / "logs")) as c:
        for _ in range(3):
            ask(c.base)  # the honest tabs earn trust (every step of theirs checked meanwhile)
        c.wait_for(lambda st: all(not w.get("probation") for w in st["workers"] if not w["local"] and w["state"] != "dead"),
                   60, what="honest tabs trusted")

        mark = clock(c.status())
        alone = requests_for(c.base, phase_s)
        st = c.status()
        out["alone_incidents"], mark = incidents(st, mark), clock(st)
        reference = alone[0][2]
        lat = [ms for _, ms, _ in alone]
        out["alone"] = {"n": len(lat), "p50_ms": statistics.median(lat), "p99_ms": pct(lat, 99)}
        print(f"alone:  {len(lat)} requests  p50 {out['alone']['p50_ms']:.0f} ms  p99 {out['alone']['p99_ms']:.0f} ms", flush=True)

        pit = ScriptedTarpit(c.worker_url, JOIN, "127.0.0.77")
        thread = threading.Thread(target=asyncio.run, args=(pit.run(),), daemon=True)
        thread.start()
        with_pit = requests_for(c.base, learn_s + phase_s)
        pit.stop = True
        thread.join(5)
        st = c.status()
        out["tarpit_incidents"], mark = incidents(st, mark), clock(st)
        after = [ms for start, ms, _ in with_pit if start >= learn_s]
        first = [ms for start, ms, _ in with_pit if start < learn_s]
        out["tarpit"] = {"n": len(after), "p50_ms": statistics.median(after), "p99_ms": pct(after, 99),
                         "p99_first_10s_ms": pct(first, 99) if first else None, "joins": pit.joins, "refused": pit.refused,
                         "tokens_identical": all(t == reference for _, _, t in with_pit)}
        out["tarpit"]["p99_ratio"] = out["tarpit"]["p99_ms"] / out["alone"]["p99_ms"]
        print(f"tarpit: {len(after)} requests after {learn_s} s  p50 {out['tarpit']['p50_ms']:.0f} ms  "
              f"p99 {out['tarpit']['p99_ms']:.0f} ms  ({out['tarpit']['p99_ratio']:.2f}x alone; target <= 2)  "
              f"joins {pit.joins}, refused {pit.refused}, first {learn_s} s p99 {out['tarpit']['p99_first_10s_ms']:.0f} ms"
              f"\n  honest incidents: alone {out['alone_incidents'] or 'none'}; with the tarpit {out['tarpit_incidents'] or 'none'}",
              flush=True)

        # a process of its own, like the honest tabs: a TabWorker computing with noise
        liar = subprocess.Popen([sys.executable, "-c", LIAR, c.worker_url], stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, env=c._env)
        with_liar = requests_for(c.base, phase_s)
        st = c.status()
        liar.terminate()
        liar.wait(10)
        lat = [ms for _, ms, _ in with_liar]
        liars = [w for w in st["workers"] if w["name"] == "liar"]
        out["liar"] = {"n": len(lat), "p50_ms": statistics.median(lat), "p99_ms": pct(lat, 99),
                       "tokens_identical": all(t == reference for _, _, t in with_liar),
                       "liar_state": liars[-1]["state"] if liars else None, "liar_why": liars[-1]["why"] if liars else None}
        print(f"liar:   {len(lat)} requests  p50 {out['liar']['p50_ms']:.0f} ms  p99 {out['liar']['p99_ms']:.0f} ms  "
              f"tokens identical: {out['liar']['tokens_identical']}  liar {out['liar']['liar_state']} ({out['liar']['liar_why']})",
              flush=True)

        pid = c.coordinator.pid
        before = rss_mb(pid)
        t0 = time.monotonic()
        kinds = asyncio.run(garbage(c.base.replace("http", "ws"), c.port, 1000))
        spent = time.monotonic() - t0
        peak = rss_mb(pid)
        back_s = None
        for i in range(61):
            if rss_mb(pid) - before <= 10:
                back_s = i
                break
            time.sleep(1)
        out["garbage"] = {"attempts": sum(kinds.values()), "kinds": kinds, "seconds": spent, "rss_before_mb": before,
                          "rss_after_mb": peak, "delta_mb": peak - before, "rss_60s_mb": rss_mb(pid), "back_within_s": back_s,
                          "health_ok": urllib.request.urlopen(c.base + "/health", timeout=10).status == 200}
        print(f"garbage: {sum(kinds.values())} attempts in {spent:.1f} s  RSS {before:.0f} -> {peak:.0f} MB "
              f"(+{peak - before:.1f}; target <= 50)  back within 10 MB after "
              f"{back_s if back_s is not None else '>60'} s", flush=True)

        from model.loader import open_model
        from model.tokenizer import GGUFTokenizer

        tok = GGUFTokenizer(open_model(None))
        words = "the river carried stones down to the valley where the old mill stood".split()
        text, ids = "", []
        i = 0
        while len(ids) < 2000:
            text += " " + words[i % len(words)] + ("." if i % 13 == 12 else "")
            i += 1
            if i % 50 == 0:
                ids = tok.encode(text, special=False)
        ids = tok.encode(text, special=False)
        before_st = c.status()
        try:
            code, body, ttft = post(c.base, "/v1/completions", {"prompt": text, "max_tokens": 1, "temperature": 0})
        except OSError as exc:  # no answer in 300 s: say what the cluster was doing, then fail
            st = c.status()
            print(f"prompt: no answer ({exc}); stages {[(s['layers'], s['holders'], s['queued'], s['busy']) for s in st['stages']]}; "
                  f"sessions {st['sessions']}; workers {[(w['worker_id'], w['name'], w['state'], w['probation']) for w in st['workers']]}; "
                  f"last events {st['events'][-12:]}", flush=True)
            raise
        st = c.status()
        evictions = st["counters"].get("slow_evictions", 0) - before_st["counters"].get("slow_evictions", 0)
        honest = {w["worker_id"] for w in st["workers"] if w["name"].startswith("worker-") or w["local"]}
        since = max((e["t"] for e in before_st["events"]), default=float("-inf"))
        deaths = [e for e in st["events"] if e.get("kind") in ("death", "quarantine") and e.get("worker") in honest
                  and e["t"] > since]

    from tab_worker.generate import LocalGenerator
    from model.sampling import SamplingParams

    gen = LocalGenerator(open_model(None).load_all(), backend="numpy")
    t0 = time.perf_counter()
    next(iter(gen.generate(ids, 1, SamplingParams(greedy=True))))
    single = time.perf_counter() - t0
    out["prompt"] = {"tokens": len(ids), "status": code, "ttft_s": ttft, "single_process_prefill_s": single,
                     "ratio": ttft / single, "evictions": evictions, "deaths": [e["reason"] for e in deaths]}
    print(f"prompt: {len(ids)} tokens  TTFT {ttft:.2f} s on 2 workers ({code}) vs single-process prefill {single:.2f} s  "
          f"= {ttft / single:.2f}x (target <= 1.5)  evictions {evictions}, honest deaths {len(deaths)}"
          + "".join(f"\n  {e['worker']}: {e['reason']}" for e in deaths), flush=True)
    if not a.no_history:
        record(out)
    if a.json:
        print(json.dumps(out))


def record(out: dict) -> None:
    from tabshard.bench_history import Figure, append_figures

    figures = [Figure.of("hostile.alone_p99_ms", [out["alone"]["p99_ms"]], "ms", "lower"),
               Figure.of("hostile.tarpit_p99_ratio", [out["tarpit"]["p99_ratio"]], "×", "lower"),
               Figure.of("hostile.garbage_rss_delta_mb", [out["garbage"]["delta_mb"]], "MB", "lower"),
               Figure.of("hostile.prompt_2000_ttft_ratio", [out["prompt"]["ratio"]], "×", "lower")]
    append_figures(figures, "bench_hostile")


if __name__ == "__main__":
    main()
