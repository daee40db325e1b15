"""Plans over unequal workers (issue #18), real processes on 127.0.0.1, each ratio measured side by
side in one run (the two clusters up at once, their streams alternating; the figure is the median
round):

    .venv/bin/python benchmarks/bench_plans.py [--quick] [--rounds N] [--no-history]

* mixed: single-stream decode tok/s, a numpy worker alone against a numpy worker beside a wgpu
  worker on lavapipe (a CPU rasteriser: much slower) in one cluster (target >= 0.95x); a third
  cluster identical to the lone worker's runs in the same rounds, and its ratio (an A/A control)
  says how far two equal clusters differ on this shared host (its rounds spread a few percent
  either way, and a figure of a few short rounds moved across the target between two runs of
  one commit: these two figures take 4 x rounds - 1 rounds of 2 x the tokens, so that one
  stall of the host moves a round less and the median stands on more rounds);
* one_slow: single stream, 4 numpy workers of which one is slowed 5x, against one numpy worker
  alone (target >= 0.95x the best single worker's);
* replicas: aggregate tok/s of 8 concurrent streams, 4 equal workers against one (target >= 3x),
  tokens equal to the single worker's. Each round after the first runs on fresh worker processes
  (Cluster.respawn): a process's speed is partly its own, and one worker's figure is one draw of
  it where four replicas average four. Here every worker is slowed 10x, and the slowing SLEEPS
  (actors/faults.slow_down: each step takes its compute time plus 9x that asleep), so that five
  workers and two coordinators on this 2-core host are not measuring the cores; the compute is
  timed as the worker's one thread's CPU time (wall time counted the sharing of the cores, four
  replicas computing at once, into each one's device), each step charged the least CPU time of
  the last few steps of its shape (TabWorker._charged_compute: the host's other processes still
  made single steps take several times their CPU time), and a cluster's slowed workers take turns
  to compute (actors/faults.host_turns; each sleeps its slowing outside its turn): computing at
  once they shared the host's memory bandwidth, which separate devices do not, and a replica's
  2-row step, half of it streaming the weights, took more CPU time than alone. Reported beside it: the coordinators'
  share of a core, steps per worker, and the kernel's T(8 rows)/T(2 rows), which bounds the
  decode part of the ratio (a single worker batches 8 rows, each replica 2);
* join: 4 streams on one worker while a second joins: the longest pause between two tokens, in
  median inter-token gaps (target <= 2 steps' time). Every worker here is slowed 5x asleep, as
  in replicas: with full-speed numpy workers two clusters' compute filled this host's 2 cores, and
  a twin cluster that saw no join already paused 3-9 median gaps, so the figure measured the host;
  asleep, the joining worker's start and load take cores the running worker is not using, as a tab
  joining from its own device would (`--join-slow 1` measures the old way);
* replan: the same with `stages = 2` and a joining worker twice as fast as the running one, so
  that the join re-plans the running pipeline (its one stage split in two) instead of adding a
  replica, between steps (it pays for moving the sessions): the running pipeline serves the 4 streams
  while the new one loads, then they move over one at a time, each replaying its history there
  in the background while it decodes on the old one. The longest pause from the join until a
  second after the old pipeline retired, in median gaps, beside a twin cluster without the join
  in the same seconds (target: a few steps), and in the twin's median gap (the pace of the
  pipeline the streams ran on before the join: the run's median gap is mostly the faster new
  pipeline's);
* network mix: 2 wired tabs + 2 phones on Wi-Fi (actors/profiles.NETWORKS, each frame delayed both
  ways): the chosen plan's single-stream ms a token against the best of every depth tried
  (stages = 1..4; target <= 1.10x);
* cold start: from starting `serve` to the first token of a request sent as soon as the
  coordinator answers, with no tab joined (the coordinator's own compute serves it).

Serve settings for every cluster: probation_steps = 0 and spot_check_fraction = 0 (a tab on
probation has every step recomputed on the coordinator's cores, which would be measured instead
of the plan). The figures go to the benchmark history (tabshard/bench_history.py).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import websockets  # noqa: E402

from protocol import wire  # noqa: E402
from simulation.runtime import CoordinatorProcess  # noqa: E402

PROMPT = "Write a short paragraph about the history of the printing press."
TOKEN = "bench-plans"
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")


# ---------------------------------------------------------------- workers
def worker_main(url: str, name: str, slow: float, network: str | None = None) -> None:
    """A Python tab (numpy) whose steps take `slow` x their compute time, the rest asleep, and
    whose every frame crosses `network` (actors/profiles.NETWORKS, both ways) when one is named."""
    from actors.faults import host_turns, slow_down
    from tab_worker.client import WorkerConnection
    from tab_worker.worker import TabWorker

    w = TabWorker(name, backend="numpy", token=TOKEN)
    if slow != 1.0:
        # a device of its own: its compute timed as this thread's CPU time (the worker runs on one
        # thread: TABSHARD_CPU_THREADS=1), so that the other processes on this host's cores do not
        # slow it further (wall time made replicas, four computing at once, pay for the sharing)
        slow_down(w, slow, cpu_time=True)
    if os.environ.get("BENCH_PLANS_TURNS"):
        # and the slowed workers of its cluster compute one at a time (host_turns): four replicas
        # computing at once shared this host's memory bandwidth, and each step's CPU time grew
        w.compute_turn = host_turns(os.environ["BENCH_PLANS_TURNS"])

    class Networked(WorkerConnection):
        def link(self, ws):
            from actors.network import NetworkedSocket
            from actors.profiles import get_network

            return NetworkedSocket(ws, get_network(network)) if network else ws

    asyncio.run(Networked(w, url).run())


class Cluster:
    """`tabshard serve` and its workers, every process ours by PID. turns: its slowed workers
    compute one at a time (replicas: every step a short decode step, whose wait for a turn the
    slowing's sleep absorbs; a joining worker's replay of the moved sessions held the turn longer
    than the running worker slept, and the running stream paused on a simulated other device's
    work, which separate devices never wait for)."""

    def __init__(self, name: str, log_dir: Path, settings: str, turns: bool = False):
        self.name, self.log_dir, self.turns = name, log_dir, turns
        cfg = log_dir / f"{name}.toml"
        cfg.write_text(settings)
        self.coord = CoordinatorProcess(["--config", str(cfg)], TOKEN, log_path=str(log_dir / f"{name}-coordinator.log"))
        self.procs: list[subprocess.Popen] = []
        self.names: list[str] = []
        self.specs: list[tuple] = []  # add()'s arguments, for respawn()

    def start(self) -> "Cluster":
        self.coord.start(180)
        return self

    @property
    def base(self) -> str:
        return self.coord.base

    def add(self, name: str, backend: str = "numpy", slow: float = 1.0, nice: int = 0, network: str | None = None) -> None:
        self.specs.append((name, backend, slow, nice, network))
        if slow != 1.0 or network:
            cmd = [sys.executable, __file__, "--worker", self.coord.worker_url, name, str(slow), *([network] if network else [])]
        else:
            cmd = [sys.executable, "-m", "tabshard.cli", "worker", "--connect", self.coord.worker_url, "--token", TOKEN,
                   "--backend", backend, "--name", name]
        if nice:
            cmd = ["nice", "-n", str(nice), *cmd]
        log = open(self.log_dir / f"{self.name}-{name}.log", "wb")
        env = dict(ENV, TABSHARD_CPU_THREADS="1") if slow != 1.0 else ENV
        if slow != 1.0 and self.turns:
            env["BENCH_PLANS_TURNS"] = str(self.log_dir / f"{self.name}.turns")
        self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        self.names.append(name)

    def respawn(self, tag: str) -> None:
        """Each worker replaced by a fresh process of the same kind (named `tag` more), once the
        old ones have left: a process's compute speed is partly its own (where its weights and
        caches landed in memory), so a figure of one worker is one draw of it."""
        specs = self.specs
        self.stop_workers()
        self.procs, self.names, self.specs = [], [], []
        for name, backend, slow, nice, network in specs:
            self.add(f"{name}-{tag}", backend, slow, nice, network)
        self.specs = specs
        self.wait_ready()

    def wait_ready(self, timeout: float = 600) -> dict:
        """Every worker joined and holds its part, every stage's primary loaded, nothing retiring."""
        def ok(st):
            tabs = {w["name"]: w for w in st["workers"] if not w["local"] and w["state"] not in ("dead", "quarantined")}
            return (set(self.names) <= set(tabs) and all(tabs[n]["stages"] and tabs[n]["state"] == "ready" for n in self.names)
                    and st["stages"] and all(s["holders"] and s["holders"][0] in s["ready"] and not s.get("retiring")
                                             for s in st["stages"]))
        return self.coord.wait_for(ok, timeout, f"{self.name}: every worker ready")

    def status(self) -> dict:
        return self.coord.status()

    def stop(self) -> None:
        self.stop_workers()
        self.coord.stop()

    def stop_workers(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# ---------------------------------------------------------------- clients
def stream(base: str, prompt=PROMPT, max_tokens=48, stamps_out: list | None = None) -> dict:
    async def go():
        async with websockets.connect(base.replace("http", "ws") + "/v1/stream", compression=None, max_size=None) as ws:
            t0 = time.perf_counter()
            await ws.send(wire.encode(wire.make("generate", request_id="b", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, greedy=True)))
            stamps, ids = stamps_out if stamps_out is not None else [], []
            while True:
                m = wire.decode(await ws.recv())
                if m["type"] == "token":
                    stamps.append(time.perf_counter())
                    ids.append(m["token_id"])
                elif m["type"] == "done":
                    break
                else:
                    raise RuntimeError(m)
            return {"t0": t0, "ttft_s": stamps[0] - t0, "ids": ids, "stamps": stamps,
                    "decode_tok_s": (len(ids) - 1) / (stamps[-1] - stamps[0]) if len(ids) > 1 else 0.0}

    return asyncio.run(go())


def concurrent(base: str, n: int, max_tokens: int, stamps: list | None = None, started: threading.Event | None = None) -> dict:
    results = [None] * n
    stamps = stamps if stamps is not None else [[] for _ in range(n)]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, stream(base, f"{PROMPT} ({i})", max_tokens, stamps[i])))
               for i in range(n)]
    for t in threads:
        t.start()
    if started is not None:
        started.set()
    for t in threads:
        t.join()
    return {"tok_s": sum(len(r["ids"]) for r in results) / (time.perf_counter() - t0), "ids": [r["ids"] for r in results],
            "ttft_s": [r["ttft_s"] for r in results], "decode_tok_s": [r["decode_tok_s"] for r in results]}


def pair(name: str, solo: Cluster, many: Cluster, rounds: int, measure, twin: Cluster | None = None,
         between=None) -> dict:
    """Rounds alternating the two clusters; the ratio many/solo of each round, and their median.
    twin: a cluster identical to solo, measured in the same rounds: its ratio to solo (an A/A
    control) shows how far two equal clusters differ on this shared host. between(k): called
    before each round k after the first."""
    measure(solo), measure(many)  # first requests pay one-off costs
    if twin is not None:
        measure(twin)
    a, b, c, same = [], [], [], True
    for k in range(rounds):
        if between is not None and k:
            between(k)
        x, y = measure(solo), measure(many)
        a.append(x[0])
        b.append(y[0])
        same = same and x[1] == y[1]
        if twin is not None:
            c.append(measure(twin)[0])
    ratios = [y / x for x, y in zip(a, b)]
    out = {"solo": statistics.median(a), "many": statistics.median(b), "ratio": statistics.median(ratios),
           "ratio_rounds": [round(r, 4) for r in ratios], "solo_rounds": [round(x, 3) for x in a],
           "many_rounds": [round(y, 3) for y in b], "tokens_identical": same}
    control = ""
    if twin is not None:
        out["control_rounds"] = [round(z / x, 4) for x, z in zip(a, c)]
        out["control_ratio"] = statistics.median(out["control_rounds"])
        control = f"; A/A control (an identical cluster / the same) {out['control_ratio']:.3f}x (rounds {out['control_rounds']})"
    print(f"{name}: {out['many']:.2f} against {out['solo']:.2f} -> {out['ratio']:.3f}x (rounds {out['ratio_rounds']}: "
          f"{out['many_rounds']} against {out['solo_rounds']}), "
          f"tokens identical: {same}{control}", flush=True)
    return out


def single(c: Cluster, max_tokens: int):
    r = stream(c.base, max_tokens=max_tokens)
    return r["decode_tok_s"], r["ids"]


def plan_of(c: Cluster) -> list:
    st = c.status()
    names = {w["worker_id"]: w["name"] for w in st["workers"]}
    steps = {w["name"]: w["steps"] for w in st["workers"]}
    return [{"pipeline": s.get("pipeline"), "layers": s["layers"], "primary": names.get(s["holders"][0]) if s["holders"] else None,
             "steps": steps.get(names.get(s["holders"][0])) if s["holders"] else None} for s in st["stages"]]


# ---------------------------------------------------------------- the figures
def bench_mixed(log: Path, settings: str, rounds: int, tokens: int) -> tuple[dict, dict]:
    solo, mixed = Cluster("numpy-alone", log, settings), Cluster("numpy-and-wgpu", log, settings)
    twin = Cluster("numpy-alone-twin", log, settings)
    try:
        solo.start(), mixed.start(), twin.start()
        solo.add("numpy-0")
        twin.add("numpy-0")
        mixed.add("numpy-0")
        mixed.add("wgpu-0", backend="wgpu")
        solo.wait_ready(), mixed.wait_ready(), twin.wait_ready()
        print(f"mixed plan: {plan_of(mixed)}", flush=True)
        out = pair("mixed (numpy + wgpu/lavapipe vs numpy alone), single stream tok/s", solo, mixed, rounds,
                   lambda c: single(c, tokens), twin)
        out["plan"] = plan_of(mixed)
        mixed.stop()
        # 4 workers, one 5x slower, against the same single numpy worker
        four = Cluster("one-slow", log, settings)
        four.start()
        for i in range(3):
            four.add(f"numpy-{i}")
        four.add("slow-5x", slow=5.0)
        four.wait_ready()
        print(f"one_slow plan: {plan_of(four)}", flush=True)
        # the A/A twin again: this host's noise over these rounds (a few percent either way) is
        # what a ratio near 0.95 is read against
        slow = pair("one_slow (3 numpy + 1 slowed 5x vs numpy alone), single stream tok/s", solo, four, rounds,
                    lambda c: single(c, tokens), twin)
        twin.stop()
        slow["plan"] = plan_of(four)
        four.stop()
        return out, slow
    finally:
        solo.stop(), mixed.stop(), twin.stop()


def bench_replicas(log: Path, settings: str, rounds: int, tokens: int) -> dict:
    one, four = Cluster("replicas-1", log, settings, turns=True), Cluster("replicas-4", log, settings, turns=True)
    try:
        one.start(), four.start()
        one.add("slow10-0", slow=10.0)
        for i in range(4):
            four.add(f"slow10-{i}", slow=10.0)
        one.wait_ready(), four.wait_ready()
        print(f"replicas plan: {plan_of(four)}", flush=True)

        parts = {c.name: {"ttft_s": [], "decode_tok_s": []} for c in (one, four)}

        def eight(c):
            r = concurrent(c.base, 8, tokens)
            parts[c.name]["ttft_s"].append(statistics.median(r["ttft_s"]))
            parts[c.name]["decode_tok_s"].append(sum(r["decode_tok_s"]))
            return r["tok_s"], r["ids"]

        # each round after the first runs on fresh worker processes in both clusters: a
        # process's speed is partly its own, and the single worker's figure is one process where
        # the replicas' is four
        since = {}

        def mark():
            """The clocks the last round's figures below count from."""
            since.update({"t": time.perf_counter(), **{c.name: _cpu_s(c.coord.proc.pid) for c in (one, four)},
                          **{(c.name, n): _cpu_s(p.pid) for c in (one, four) for n, p in zip(c.names, c.procs)}},
                         steps={c.name: {w["name"]: w["steps"] for w in c.status()["workers"] if not w["local"]} for c in (one, four)})

        def fresh(k):
            for c in (one, four):
                c.respawn(f"r{k}")
                concurrent(c.base, 8, 4)  # (its first requests pay one-off costs)
            mark()

        mark()
        out = pair("replicas (4 equal workers vs 1, each slowed 10x asleep, fresh processes each round), 8 streams aggregate tok/s",
                   one, four, rounds, eight, between=fresh)
        wall = time.perf_counter() - since["t"]
        # over the last round: the coordinators' own share of a core (one of them near 1.0 would
        # be a serial bottleneck), the steps each worker served, and each worker process's CPU a
        # step (its messages' handling included), to read against the kernel's alone below: what
        # sharing this host's cores added to the compute that the slowing multiplies
        out["coordinator_cpu_share"] = {c.name: round((_cpu_s(c.coord.proc.pid) - since[c.name]) / wall, 3) for c in (one, four)}
        out["steps"] = {c.name: {w["name"]: w["steps"] - since["steps"][c.name].get(w["name"], 0) for w in c.status()["workers"]
                                 if not w["local"] and w["name"] in c.names} for c in (one, four)}
        out["worker_cpu_ms_a_step"] = {c.name: {n: round((_cpu_s(p.pid) - since[(c.name, n)]) * 1000 / max(1, out["steps"][c.name][n]), 2)
                                                for n, p in zip(c.names, c.procs)} for c in (one, four)}
        out["plan"] = plan_of(four)
        # the ratio taken apart (rounds after the first, as pair's): the 8 streams' decode rates
        # summed (tokens after each stream's first over the time between its first and last) and
        # the median time to a stream's first token (the prompts' prefill and the wait for it)
        dec = [b / a for a, b in zip(parts[one.name]["decode_tok_s"][1:], parts[four.name]["decode_tok_s"][1:])]
        out["decode_ratio"] = statistics.median(dec)
        out["ttft_s"] = {n: round(statistics.median(p["ttft_s"][1:]), 3) for n, p in parts.items()}
        one.stop(), four.stop()
        out["kernel"] = kernel_rows_ratio()
        print(f"replicas: steps each worker served {out['steps']}; coordinators' CPU share {out['coordinator_cpu_share']}; "
              f"the kernel's decode step, one thread's CPU: {({n: round(v, 1) for n, v in out['kernel']['cpu_ms'].items()})} ms "
              f"for 1/2/8 rows: T8/T2 {out['kernel']['t8_over_t2']:.2f}; decode rates alone {out['decode_ratio']:.3f}x "
              f"(rounds {[round(r, 3) for r in dec]}); median time to first token {out['ttft_s']} s; "
              f"worker processes' CPU a step (ms) {out['worker_cpu_ms_a_step']}", flush=True)
        return out
    finally:
        one.stop(), four.stop()


def kernel_rows_ratio(context: int = 60, repeats: int = 5) -> dict:
    """What one worker's 8-row decode step costs against a replica's 2-row step on this kernel:
    the numpy backend over the whole model on one thread (as the slowed workers run), each step
    timed as that thread's CPU time (what their slowing multiplies), best of `repeats`."""
    from model.loader import GGUFModel, default_model_path
    from protocol.model_types import SessionSlice
    from tab_worker.backends import forward_topk, make_backend

    weights = GGUFModel(default_model_path()).load_all()
    cfg = weights.config
    backend = make_backend("numpy", cfg, dict(enumerate(weights.layers)), weights.head, context + 8, threads=1)
    rng = np.random.default_rng(0)
    for i in range(8):
        forward_topk(backend, [SessionSlice(f"s{i}", 0, context)], rng.standard_normal((context, cfg.hidden)).astype(np.float32), 8)
    ms = {}
    for n in (1, 2, 8):
        x = rng.standard_normal((n, cfg.hidden)).astype(np.float32)
        for _ in range(repeats):
            c0 = time.thread_time()
            forward_topk(backend, [SessionSlice(f"s{i}", context, 1) for i in range(n)], x, 8)
            ms[n] = min(ms.get(n, float("inf")), (time.thread_time() - c0) * 1000)
            for i in range(n):
                backend.truncate_session(f"s{i}", context)
    return {"cpu_ms": ms, "t8_over_t2": ms[8] / ms[2], "t8_over_t1": ms[8] / ms[1]}


def _cpu_s(pid: int) -> float:
    """A process's CPU seconds so far (user + system, /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pause_figures(runs: list[dict], slow: float, name: str, twin: str, what: str) -> dict:
    """The medians over repeats of the longest pause (in median gaps, and its unshared part) of
    the cluster that saw the event (`name`) and of its twin that did not (`twin`), printed."""
    out = {"worker_slowed": slow}
    for label, side in ((name, "join"), (twin, "no_join")):
        out[f"max_gap_steps_{label}"] = statistics.median(r[side]["max_gap_steps"] for r in runs)
        out[f"max_gap_steps_{label}_unshared"] = statistics.median(r[side]["max_gap_steps_unshared"] for r in runs)
    # the event's pause in the twin's median gap: the pace the streams ran at before it (the
    # twin runs the pipeline the event's cluster had), where a re-plan that speeds the streams
    # up makes its own run's median gap mostly the faster new pipeline's
    out[f"max_gap_steps_{name}_in_twin_gaps"] = statistics.median(r["join"]["max_gap_ms"] / r["no_join"]["median_gap_ms"] for r in runs)
    print(f"{what}, median of {len(runs)}: {out[f'max_gap_steps_{name}']:.2f} median gaps with it, "
          f"{out[f'max_gap_steps_{twin}']:.2f} without it "
          f"(side by side; {[(round(r['join']['max_gap_steps'], 2), round(r['no_join']['max_gap_steps'], 2)) for r in runs]})"
          + f"; with it, in the twin's median gap: {out[f'max_gap_steps_{name}_in_twin_gaps']:.2f}", flush=True)
    return {**out, "runs": runs}


def bench_join(log: Path, settings: str, tokens: int, repeats: int, slow: float = 5.0) -> dict:
    """Each repeat: two fresh one-worker clusters side by side, 4 clients streaming back to back
    on each; a second worker joins one of them. The longest pause between two tokens from the
    join on, in the median inter-token gap of its own cluster, with the join and without it
    over the same seconds: this host is shared, and pauses that the other cluster sees too are
    the host's. The joining worker runs at nice 19: a tab joins from its own device, and here
    its process start (imports, the speed measurement, dequantizing its range) would otherwise
    take the cores the running streams need on this 2-core host."""
    runs = [_join_once(log, settings, tokens, k, slow) for k in range(repeats)]
    return _pause_figures(runs, slow, "join", "no_join", "join during 4 streams: the longest pause from the join on")


def _first_and_last(items: list) -> list:
    return items[:1] + items[-1:] if len(items) > 1 else items


def bench_replan(log: Path, settings: str, tokens: int, repeats: int, slow: float = 5.0) -> dict:
    """As bench_join, with `stages = 2`: a worker twice as fast as the running one (slowed `slow`
    x against 2 x `slow`) joins, and the planner splits the running one-stage pipeline in two
    (a re-plan that changes it, not a replica added; predicted faster by more than
    REPLAN_MIN_GAIN, so it is made between steps while the 4 streams run); they move to the new
    pipeline once it has loaded. The longest pause from the join until a second after the old
    pipeline retired, side by side with a twin cluster (also `stages = 2`, one worker slowed
    2 x `slow`) that sees no join."""
    runs = [_join_once(log, settings + "stages = 2\n", tokens, k, 2 * slow, name="replan", until="retired", late_slow=slow)
            for k in range(repeats)]
    return _pause_figures(runs, slow, "replan", "no_replan",
                          "re-plan during 4 streams (stages = 2, a second worker joins and the pipeline is split): the longest pause")


def _clients(c: Cluster, tokens: int, stop: threading.Event, requests: list) -> list[threading.Thread]:
    """4 clients back to back on `c` (a request that ends is followed by the next) until `stop`."""
    def client(i):
        n = 0
        while not stop.is_set():
            stamps: list[float] = []
            requests.append(stamps)
            stream(c.base, f"{PROMPT} ({i}.{n})", tokens, stamps)
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    return threads


def _gaps(requests: list) -> tuple[np.ndarray, np.ndarray]:
    # inter-token gaps once a stream decodes (its 8th token on): its prompt's steps excluded
    decode = [r[7:] for r in requests if len(r) > 8]
    return np.concatenate([np.diff(r) for r in decode]), np.concatenate([r[1:] for r in decode])


def _pauses(requests: list, since: float, twin: list | None = None) -> dict:
    """The longest gap between two tokens of a stream from `since` on, in median gaps. twin: the
    other cluster's requests over the same seconds; a gap of ours that overlaps a gap of more
    than 1.5 median gaps of theirs is a stall of the host (both clusters, their clients in this
    one process, and the other engineers' work share its 2 cores), and the longest gap that no
    such stall overlaps is reported beside it."""
    gaps, ends = _gaps(requests)
    during, during_ends = gaps[ends > since], ends[ends > since]
    med = float(np.median(gaps))
    out = {"median_gap_ms": med * 1000, "max_gap_ms": float(during.max() * 1000), "max_gap_steps": float(during.max() / med),
           "max_gap_ended_s": float(during_ends[during.argmax()] - since), "requests": len(requests)}
    if twin is not None:
        tg, te = _gaps(twin)
        long = tg > 1.5 * np.median(tg)
        stalls = list(zip(te[long] - tg[long], te[long]))
        own = [g for g, e in zip(during, during_ends) if not any(a < e and e - g < b for a, b in stalls)]
        out["max_gap_steps_unshared"] = float(max(own) / med) if own else 0.0
        out["shared_with_twin"] = len(during) - len(own)
    return out


def _renice_when_loaded(c: Cluster, since: float, pid: int) -> None:
    """The joining worker starts at nice 19 (its process start would otherwise take the cores the
    running streams need), and serves at nice 0 once it has loaded, as a tab on its own device
    would: at nice 19 its steps waited behind every other process on this host, and the
    streams that moved onto it paused for seconds."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            st = c.status()
            late = {w["worker_id"] for w in st["workers"] if w["name"] == "numpy-late"}
            if any(e["kind"] == "loaded" and e["t"] >= since and e.get("worker") in late for e in st["events"]):
                os.setpriority(os.PRIO_PROCESS, pid, 0)
                return
        except Exception:  # the cluster is stopping
            return
        time.sleep(0.05)


def _join_once(log: Path, settings: str, tokens: int, k: int, slow: float = 5.0, name: str = "join", until: str = "loaded",
               late_slow: float | None = None) -> dict:
    """until: the event (after the join) a second after which the streams stop: the late worker
    "loaded", or the old pipeline "retired" (its sessions moved to a re-plan's pipeline)."""
    c, quiet = Cluster(f"{name}{k}", log, settings), Cluster(f"no{name}{k}", log, settings)
    try:
        c.start(), quiet.start()
        c.add("numpy-0", slow=slow)
        quiet.add("numpy-0", slow=slow)
        c.wait_ready(), quiet.wait_ready()
        stream(c.base, max_tokens=8), stream(quiet.base, max_tokens=8)
        # the streams run through every phase of the join (process start, hello, speed
        # measurement, plan, weights, first steps) and a second after it
        stop, with_join, without = threading.Event(), [], []
        threads = _clients(c, tokens, stop, with_join) + _clients(quiet, tokens, stop, without)
        time.sleep(1.5)
        joined_at = time.perf_counter()
        c.add("numpy-late", slow=slow if late_slow is None else late_slow, nice=19)
        threading.Thread(target=_renice_when_loaded, args=(c, joined_at, c.procs[-1].pid), daemon=True).start()
        c.coord.wait_for(lambda st: any(e["kind"] == until and e["t"] >= joined_at for e in st["events"]), 120, f"the late worker's {until}")
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join()
        st = c.status()
        out = {"join": _pauses(with_join, joined_at, without), "no_join": _pauses(without, joined_at, with_join),
               "late_worker_joined_a_pipeline": any(e.get("extended") for e in st["events"] if e["kind"] == "plan"),
               # the late worker's way in, s after it was started (the coordinator's clock is this one: CLOCK_MONOTONIC)
               "late_events_s": [(e["kind"], round(e["t"] - joined_at, 3)) for e in st["events"]
                                 if e["t"] >= joined_at and e["kind"] in ("join", "plan", "plan_kept", "remeasure", "loaded", "retired")],
               # why a re-plan waited, when one did: the planner's own words, the first and last time
               "kept_reasons": _first_and_last([e["reason"] for e in st["events"] if e["t"] >= joined_at and e["kind"] == "plan_kept"])}
        j, q = out["join"], out["no_join"]
        print(f"  {name} {k}: longest pause from the join on {j['max_gap_ms']:.1f} ms = {j['max_gap_steps']:.2f} median gaps "
              f"({j['median_gap_ms']:.1f} ms), ended {j['max_gap_ended_s']:.2f} s after the worker started; side by side "
              f"without a join {q['max_gap_ms']:.1f} ms = {q['max_gap_steps']:.2f} ({q['median_gap_ms']:.1f} ms), ended "
              f"{q['max_gap_ended_s']:.2f} s; not overlapping a stall of the twin: {j['max_gap_steps_unshared']:.2f} with the join, "
              f"{q['max_gap_steps_unshared']:.2f} without; {out['late_events_s']}"
              + (f"; plan kept: {out['kept_reasons']}" if out["kept_reasons"] else ""), flush=True)
        return out
    finally:
        c.stop(), quiet.stop()


def bench_network_mix(log: Path, settings: str, rounds: int, tokens: int) -> dict:
    """2 wired tabs and 2 phones on Wi-Fi (actors/profiles.NETWORKS wired-lan, phone-wifi: each
    frame delayed both ways, ~12-28 ms a round trip): the planner's own plan against the plan of
    every depth (stages = 1..4), five clusters up at once, single streams in alternation; the
    chosen plan's ms a token over the best depth's (target <= 1.10)."""
    names = ["chosen"] + [f"depth{d}" for d in range(1, 5)]
    clusters = {n: Cluster(f"mix-{n}", log, settings + (f"stages = {n[5:]}\n" if n != "chosen" else "")) for n in names}
    try:
        for c in clusters.values():
            c.start()
            for i in range(2):
                c.add(f"wired-{i}", network="wired-lan")
                c.add(f"phone-{i}", network="phone-wifi")
        for c in clusters.values():
            c.wait_ready()
        # the round trips measured (a ping a second) and any re-plan they call for made
        for c in clusters.values():
            c.coord.wait_for(lambda st: all(w["rtt_ms"] is not None for w in st["workers"] if not w["local"]), 60, "round trips")
        time.sleep(3.0)
        for c in clusters.values():
            c.wait_ready()
        for c in clusters.values():
            stream(c.base, max_tokens=8)
        ms = {n: [] for n in names}
        for _ in range(rounds):
            for n, c in clusters.items():
                ms[n].append(1000.0 / single(c, tokens)[0])
        med = {n: statistics.median(v) for n, v in ms.items()}
        best = min((n for n in names if n != "chosen"), key=med.get)
        st = clusters["chosen"].status()
        out = {"ms_per_token": med, "best_depth": best, "ratio": med["chosen"] / med[best],
               "ratio_rounds": [round(c / b, 4) for c, b in zip(ms["chosen"], ms[best])],
               "plans": {n: plan_of(c) for n, c in clusters.items()},
               "rtt_ms": {w["name"]: w["rtt_ms"] for w in st["workers"] if not w["local"]},
               "why": {w["name"]: w["plan"] for w in st["workers"] if not w["local"]}}
        print(f"network mix (2 wired + 2 phones on Wi-Fi): chosen plan {med['chosen']:.1f} ms a token, best depth "
              f"{best} {med[best]:.1f} ms -> {out['ratio']:.3f}x; every depth {({n: round(v, 1) for n, v in med.items()})}; "
              f"rtt {({k: round(v, 1) for k, v in out['rtt_ms'].items()})}", flush=True)
        return out
    finally:
        for c in clusters.values():
            c.stop()


def bench_cold_start(log: Path, settings: str) -> dict:
    c = Cluster("cold", log, settings)
    t0 = time.perf_counter()
    try:
        c.start()
        up = time.perf_counter()
        r = stream(c.base, max_tokens=8)
        out = {"serve_answers_s": up - t0, "request_to_first_token_s": r["ttft_s"],
               "serve_start_to_first_token_s": r["t0"] + r["ttft_s"] - t0}
        print(f"cold start, no tab: serve answers after {out['serve_answers_s']:.2f} s, first token "
              f"{out['request_to_first_token_s']:.2f} s after the request: {out['serve_start_to_first_token_s']:.2f} s in all",
              flush=True)
        return out
    finally:
        c.stop()


def record(out: dict) -> None:
    from tabshard.bench_history import Figure, append_figures

    # the join's figures measured with workers slowed asleep are not comparable with the full-speed ones before
    join = "plans.join" if out["join"]["worker_slowed"] == 1.0 else f"plans.join_slowed{out['join']['worker_slowed']:g}x"
    figures = [Figure.of("plans.mixed_numpy_wgpu_over_numpy", out["mixed"]["ratio_rounds"], "×", "higher"),
               Figure.of("plans.mixed_control_twin_over_numpy", out["mixed"]["control_rounds"], "×", "higher"),
               Figure.of("plans.one_slow_of_4_over_best_single", out["one_slow"]["ratio_rounds"], "×", "higher"),
               Figure.of("plans.replicas_8_streams_4_over_1", out["replicas"]["ratio_rounds"], "×", "higher"),
               Figure.of(f"{join}_max_pause_steps", [r["join"]["max_gap_steps"] for r in out["join"]["runs"]], "steps", "lower"),
               Figure.of(f"{join.replace('join', 'no_join', 1)}_max_pause_steps", [r["no_join"]["max_gap_steps"] for r in out["join"]["runs"]], "steps", "lower"),
               Figure.of("plans.network_mix_chosen_over_best_depth", out["network_mix"]["ratio_rounds"], "×", "lower"),
               Figure.of("plans.cold_start_to_first_token_s", [out["cold_start"]["serve_start_to_first_token_s"]], "s", "lower")]
    append_figures(figures, "bench_plans")


def record_replan(out: dict) -> None:
    from tabshard.bench_history import Figure, append_figures

    name = "plans.replan" if out["worker_slowed"] == 1.0 else f"plans.replan_slowed{out['worker_slowed']:g}x"
    append_figures([Figure.of(f"{name}_max_pause_steps", [r["join"]["max_gap_steps"] for r in out["runs"]], "steps", "lower"),
                    Figure.of(f"{name.replace('replan', 'no_replan', 1)}_max_pause_steps",
                              [r["no_join"]["max_gap_steps"] for r in out["runs"]], "steps", "lower")], "bench_plans")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else None)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rounds and tokens")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", help="comma-separated subset of: mixed, replicas, join, replan, mix, cold")
    ap.add_argument("--join-slow", type=float, default=5.0,
                    help="join, replan: every worker's steps take this many times their compute, the rest asleep (1: full speed)")
    ap.add_argument("--no-history", action="store_true", help="do not append the figures to the benchmark history")
    a = ap.parse_args()
    rounds, tokens = (2, 24) if a.quick else (a.rounds, 48)
    only = set((a.only or "mixed,replicas,join,replan,mix,cold").split(","))
    settings = "probation_steps = 0\nspot_check_fraction = 0.0\n"
    log = Path(tempfile.mkdtemp(prefix="bench-plans-"))
    print(f"logs in {log}", flush=True)
    out = {}
    if "mixed" in only:
        out["mixed"], out["one_slow"] = bench_mixed(log, settings, 4 * rounds - 1, 2 * tokens)
    if "replicas" in only:
        out["replicas"] = bench_replicas(log, settings, rounds, tokens)
    if "join" in only:
        out["join"] = bench_join(log, settings, 48, 1 if a.quick else 3, a.join_slow)
    if "replan" in only:
        out["replan"] = bench_replan(log, settings, 48, 1 if a.quick else 3, a.join_slow)
    if "mix" in only:
        out["network_mix"] = bench_network_mix(log, settings, rounds, tokens)
    if "cold" in only:
        out["cold_start"] = bench_cold_start(log, settings)
    print(json.dumps(out))
    if not a.no_history and {"mixed", "replicas", "join", "mix", "cold"} <= only:
        record(out)
    if not a.no_history and "replan" in only:  # (its own figures: measured alone or with the rest)
        record_replan(out["replan"])


if __name__ == "__main__":
    main()
