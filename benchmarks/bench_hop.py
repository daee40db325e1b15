"""What a pipeline hop costs `tabshard serve`, side by side in one run: the same model

  * in one process (the backend driven directly: embed, forward_topk, argmax; no coordinator),
  * served by `tabshard serve` with 1, 2 and 4 `tabshard worker` processes (one stage each,
    tabshard.cluster.LocalCluster, --no-coordinator-compute --stages N),

one greedy stream at a time, the variants alternating round by round, into the benchmark history.

    python benchmarks/bench_hop.py [--model synthetic:llama-mini] [--backend numpy|wgpu]
        [--workers 1,2,4] [--tokens 128] [--rounds 5] [--setting KEY=VALUE ...]
        [--baseline-tree DIR] [--baseline-setting KEY=VALUE ...] [--json FILE] [--no-history]
    python benchmarks/bench_hop.py --append-json FILE   # a device machine's --json into this history

For each variant: ms a token (a stream's decode tokens: last token's time - first's, / tokens - 1),
and for the clusters the extra ms a token per added stage ((ms at N - ms at 1) / (N - 1)) and the
split of a token's time:

  * compute: each step's `compute_ms` (the forward as its worker times it), over all stages
    (/status counters, summed over the stream's decode steps: decode_compute_ms);
  * coordinator frames: the coordinator's event loop on worker frames: decoding them, the state
    machine (scheduler, spot checks, a token's sampling and embedding) and queueing its actions
    (counters worker_frames_ms);
  * coordinator sends: encoding frames for workers and handing them to the socket (worker_sends_ms;
    on a host with fewer cores than processes this holds the time the woken receiver preempts it);
  * between: the rest of the steps' round trips as the coordinator times them (decode_step_ms, from
    the arrival of the result that triggered a step to its own result's arrival): the sockets, the
    workers' decode, encode and send, and every process wake-up and event-loop turn on the way;
  * outside steps: the rest of ms a token (the client's clock against the coordinator's);
  * wire: the codec alone, wire.encode + wire.decode of this model's one-row `step` and
    `step_result`, timed in this process (a part of each hop);
  * CPU ms a token of each process (coordinator, workers together, this client), from /proc:
    on a host with fewer cores than processes, CPU is what a hop competes for.

--setting KEY=VALUE adds a serve setting (serve.toml's [serve], e.g. spot_check_fraction=0) to the
clusters. A baseline serves the same clusters again in the same rounds, for an A/B: from another
commit's code with --baseline-tree DIR (a `git worktree add DIR <commit>`), under other settings
with --baseline-setting KEY=VALUE (instead of --setting's), or both; its figures are printed and kept
in the JSON, not added to the history. The device machine has no Ray: this needs none.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "Tell me about the shards of the model and why tabs are useful for it."


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class InProcess:
    """The model's layers and head in one backend of this process."""

    def __init__(self, model: str, backend: str, tokens: int):
        from model.loader import open_model
        from model.tokenizer import GGUFTokenizer
        from tab_worker.backends import make_backend

        m = open_model(model)
        self.weights = m.load_all()
        self.prompt = GGUFTokenizer(m).encode(PROMPT)
        self.backend = make_backend(backend, self.weights.config, dict(enumerate(self.weights.layers)), self.weights.head,
                                    len(self.prompt) + tokens + 8)
        self.runs = 0

    def stream(self, tokens: int) -> dict:
        from model.embedding import embed
        from protocol.model_types import SessionSlice
        from tab_worker.backends import forward_topk

        sid = f"s{self.runs}"
        self.runs += 1
        emb = self.weights.embedding
        top, _ = forward_topk(self.backend, [SessionSlice(sid, 0, len(self.prompt))], embed(emb, self.prompt), 1)
        nxt, pos = int(top[0][0]), len(self.prompt)
        t0 = time.perf_counter()
        for _ in range(tokens - 1):
            top, _ = forward_topk(self.backend, [SessionSlice(sid, pos, 1)], embed(emb, [nxt]), 1)
            nxt, pos = int(top[0][0]), pos + 1
        dt = time.perf_counter() - t0
        self.backend.drop_session(sid)
        return {"ms_per_token": dt * 1000 / (tokens - 1), "tokens": tokens}


class Served:
    """`tabshard serve` and `workers` worker processes on 127.0.0.1, one stage each, started from
    `tree` (this checkout, or a baseline worktree)."""

    def __init__(self, model: str, backend: str, workers: int, tree: Path, log_dir: Path, settings: list[str]):
        from tabshard.cluster import LocalCluster

        self.workers = workers
        log_dir.mkdir(parents=True, exist_ok=True)
        cfg = log_dir / "serve.toml"
        cfg.write_text("[serve]\nheartbeat_ms = 250\nmeasure_tokens = 4\n" + "".join(f"{kv}\n" for kv in settings))
        self.cluster = LocalCluster(workers, backend=backend, model=model, log_dir=str(log_dir),
                                    serve_args=["--no-coordinator-compute", "--stages", str(workers), "--config", str(cfg)])
        here = Path.cwd()
        os.chdir(tree)  # `python -m tabshard.cli` imports the package of its working directory
        try:
            self.cluster.start(timeout=900)
        finally:
            os.chdir(here)
        self.runs = 0

    def stream(self, tokens: int) -> dict:
        from simulation.workload import stream_request

        c = self.cluster
        pids = [c.coordinator.pid] + [p.pid for p in c.workers]
        sums0 = c.status()["counters"]
        before, client0 = [_cpu_s(p) for p in pids], _self_cpu_s()
        r = asyncio.run(stream_request(c.base, f"hop-{self.workers}-{self.runs}", PROMPT, tokens, timeout=900))
        after, client1 = [_cpu_s(p) for p in pids], _self_cpu_s()
        sums1 = c.status()["counters"]
        self.runs += 1
        if r.error or len(r.times) < 8:
            raise RuntimeError(f"{self.workers} workers: stream failed ({r.error or f'{len(r.times)} tokens'})")
        n = len(r.times) - 1  # decode trips: the first token came from the prompt's step
        ms = (r.times[-1] - r.times[0]) * 1000 / n
        # every decode step of the stream, each stage's: round trips seen by the coordinator, the compute reported
        steps = (sums1["decode_step_ms"] - sums0["decode_step_ms"]) / n
        compute = (sums1["decode_compute_ms"] - sums0["decode_compute_ms"]) / n
        frames = (sums1["worker_frames_ms"] - sums0["worker_frames_ms"]) / n
        sends = (sums1["worker_sends_ms"] - sums0["worker_sends_ms"]) / n
        cpu = [(b - a) * 1000 / len(r.times) for a, b in zip(before, after)]
        return {"ms_per_token": ms, "tokens": len(r.times), "compute_ms": compute, "coordinator_frames_ms": frames,
                "coordinator_sends_ms": sends, "between_ms": steps - compute - frames - sends, "outside_steps_ms": ms - steps,
                "cpu_coordinator_ms": cpu[0], "cpu_workers_ms": sum(cpu[1:]),
                "cpu_client_ms": (client1 - client0) * 1000 / len(r.times)}

    def stop(self) -> None:
        self.cluster.stop()


def codec_us(model: str, repeat: int = 2000) -> dict:
    """wire.encode + wire.decode of a one-row step and its step_result at this model's width (µs)."""
    import numpy as np

    from model.loader import open_model
    from protocol import wire

    hidden = open_model(model).config.hidden
    row = np.random.default_rng(0).standard_normal((1, hidden)).astype(np.float32)
    step = wire.make("step", step_id=1, epoch=1, layer_start=0, layer_end=1,
                     sessions=[{"session_id": "req-1-0123abcd", "start_pos": 20, "length": 1}], hidden=row, want_topk=0)
    result = wire.make("step_result", step_id=1, epoch=1, output=row, compute_ms=1.0)
    out = {}
    for name, m in (("step", step), ("step_result", result)):
        frame = wire.encode(m, validate=False)
        t0 = time.perf_counter()
        for _ in range(repeat):
            wire.encode(m, validate=False)
        enc = (time.perf_counter() - t0) / repeat * 1e6
        t0 = time.perf_counter()
        for _ in range(repeat):
            wire.decode(frame)
        dec = (time.perf_counter() - t0) / repeat * 1e6
        out[name] = {"encode_us": round(enc, 1), "decode_us": round(dec, 1), "bytes": len(frame)}
    out["per_hop_us"] = round(sum(v["encode_us"] + v["decode_us"] for v in out.values()), 1)
    return out


def _med(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


SPLIT = ("compute_ms", "coordinator_frames_ms", "coordinator_sends_ms", "between_ms", "cpu_coordinator_ms", "cpu_workers_ms")


def summarise(rows: dict[str, list[dict]], workers: list[int]) -> dict:
    """Per variant: medians over rounds; the extra ms per added stage against the 1-worker cluster
    of the same tree, round by round."""
    out: dict = {}
    for name, runs in rows.items():
        out[name] = {k: _med([r[k] for r in runs]) for k in runs[0]}
        out[name]["ms_per_token_rounds"] = [round(r["ms_per_token"], 3) for r in runs]
    for tree in ("", "base_"):
        one = rows.get(f"{tree}serve_1")
        for n in workers:
            runs = rows.get(f"{tree}serve_{n}")
            if n > 1 and one and runs:
                extra = [(r["ms_per_token"] - o["ms_per_token"]) / (n - 1) for r, o in zip(runs, one)]
                out[f"{tree}serve_{n}"]["extra_ms_per_stage"] = _med(extra)
                out[f"{tree}serve_{n}"]["extra_ms_per_stage_rounds"] = [round(x, 3) for x in extra]
                out[f"{tree}serve_{n}"]["speed_over_1"] = _med([o["ms_per_token"] / r["ms_per_token"] for r, o in zip(runs, one)])
                out[f"{tree}serve_{n}"]["per_stage"] = {k: _med([(r[k] - o[k]) / (n - 1) for r, o in zip(runs, one)])
                                                        for k in SPLIT}
    if "base_serve_1" in rows:
        for n in workers:
            a, b = rows[f"serve_{n}"], rows[f"base_serve_{n}"]
            out[f"serve_{n}"]["speed_over_baseline"] = _med([y["ms_per_token"] / x["ms_per_token"] for x, y in zip(a, b)])
    return out


def show(result: dict) -> None:
    s = result["summary"]
    print(f"{result['model']} on {result['backend']}, {result['tokens']} tokens a stream, {result['rounds']} rounds "
          f"(medians, ms a token); wire codec per hop {result['codec']['per_hop_us']} µs")
    cols = [("ms_per_token", "ms/token"), ("speed_over_1", "x 1 worker"), ("extra_ms_per_stage", "extra/stage"), ("compute_ms", "compute"),
            ("coordinator_frames_ms", "coord frames"), ("coordinator_sends_ms", "coord sends"), ("between_ms", "between"),
            ("outside_steps_ms", "outside"), ("cpu_coordinator_ms", "cpu coord"), ("cpu_workers_ms", "cpu workers"),
            ("cpu_client_ms", "cpu client")]
    print(f"{'variant':<16}" + "".join(f"{t:>13}" for _, t in cols))
    for name, v in s.items():
        cells = "".join(f"{v[k]:>13.3f}" if k in v else f"{'':>13}" for k, _ in cols)
        extra = f"  {v['speed_over_baseline']:.3f}x baseline" if "speed_over_baseline" in v else ""
        print(f"{name:<16}{cells}{extra}")
    print("each added stage (ms a token, against 1 worker, medians over rounds):")
    for name, v in s.items():
        if "per_stage" in v:
            print(f"{name:<16}" + "  ".join(f"{k.removesuffix('_ms')} {x:.3f}" for k, x in v["per_stage"].items()))


def record(result: dict) -> None:
    from tabshard.bench_history import Figure, append_figures, recorded_machine

    tag = f"hop.{result['model'].split(':')[-1]}.{result['backend']}"
    if result.get("settings"):  # figures under other serve settings are not the defaults' history
        tag += "." + ".".join(kv.replace(" ", "").replace("=", "_") for kv in result["settings"])
    raw = result["rounds_raw"]
    figures = [Figure.of(f"{tag}.in_process_ms_per_token", [r["ms_per_token"] for r in raw["in_process"]], "ms", "lower"),
               Figure.of(f"{tag}.codec_us_per_hop", [result["codec"]["per_hop_us"]], "µs", "lower")]
    for n in result["workers"]:
        runs = raw[f"serve_{n}"]
        figures.append(Figure.of(f"{tag}.serve_{n}_ms_per_token", [r["ms_per_token"] for r in runs], "ms", "lower"))
        figures.append(Figure.of(f"{tag}.serve_{n}_coordinator_cpu_ms_per_token", [r["cpu_coordinator_ms"] for r in runs], "ms", "lower"))
        if n > 1:
            figures.append(Figure.of(f"{tag}.serve_{n}_extra_ms_per_stage",
                                     result["summary"][f"serve_{n}"]["extra_ms_per_stage_rounds"], "ms", "lower"))
            one = raw["serve_1"]  # the #15 target: 4 workers >= 0.8x the 1-worker cluster
            figures.append(Figure.of(f"{tag}.serve_{n}_over_1", [o["ms_per_token"] / r["ms_per_token"] for r, o in zip(runs, one)],
                                     "×", "higher"))
    append_figures(figures, "bench_hop", measured_on=recorded_machine(result.get("machine"), result["backend"]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="synthetic:llama-mini")
    p.add_argument("--backend", default="numpy", choices=["numpy", "wgpu"])
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--setting", action="append", default=[], help="KEY=VALUE for serve.toml's [serve] (repeatable)")
    p.add_argument("--baseline-tree", default="", help="a worktree of the commit to compare with, served in the same rounds")
    p.add_argument("--baseline-setting", action="append", default=[], help="KEY=VALUE for the baseline's clusters (repeatable)")
    p.add_argument("--json", default="", help="write the result here too")
    p.add_argument("--no-history", action="store_true")
    p.add_argument("--append-json", default="", help="append a --json file of another machine's run to the history, then exit")
    a = p.parse_args()
    if a.append_json:
        result = json.loads(Path(a.append_json).read_text())
        show(result)
        record(result)
        return
    if a.backend == "wgpu" and not os.path.isdir(os.environ.get("XDG_RUNTIME_DIR") or "/nonexistent"):
        os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="xdg-")
    from tabshard.bench_history import machine

    workers = [int(x) for x in a.workers.split(",")]
    if 1 not in workers:
        raise SystemExit("--workers must include 1: the extra ms per stage is against the 1-worker cluster")
    log_dir = Path(tempfile.mkdtemp(prefix="bench-hop-"))
    here = Path(__file__).resolve().parents[1]
    trees = {"": (here, a.setting)}
    if a.baseline_tree or a.baseline_setting:
        trees["base_"] = (Path(a.baseline_tree).resolve() if a.baseline_tree else here, a.baseline_setting)
    result = {"model": a.model, "backend": a.backend, "tokens": a.tokens, "rounds": a.rounds, "workers": workers,
              "settings": a.setting, "baseline_tree": a.baseline_tree, "baseline_settings": a.baseline_setting,
              "machine": machine(adapter=False), "codec": codec_us(a.model)}
    variants: dict = {"in_process": InProcess(a.model, a.backend, a.tokens)}
    try:
        for tree, (path, settings) in trees.items():
            for n in workers:
                variants[f"{tree}serve_{n}"] = Served(a.model, a.backend, n, path, log_dir / f"{tree}serve_{n}", settings)
        for v in variants.values():  # warm: kernels built, buffers sized, costs measured
            v.stream(16)
        rows: dict[str, list[dict]] = {name: [] for name in variants}
        names = list(variants)
        for r in range(a.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # each round starts one variant later
                rows[name].append(variants[name].stream(a.tokens))
                print(json.dumps({"round": r, "variant": name, **{k: round(v, 3) for k, v in rows[name][-1].items()}}),
                      file=sys.stderr, flush=True)
    finally:
        for v in variants.values():
            if isinstance(v, Served):
                with contextlib.suppress(Exception):
                    v.stop()
    result["rounds_raw"] = rows
    result["summary"] = summarise(rows, workers)
    show(result)
    if a.json:
        Path(a.json).write_text(json.dumps(result))
    if not a.no_history:
        record(result)


if __name__ == "__main__":
    main()
