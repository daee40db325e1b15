"""Scenarios: a TOML file declares tabs, workload, faults; `run_scenario` runs it on Ray and
returns the report (simulation/report.py renders it).

    name = "smoke"
    duration_s = 40            # the workload's arrival window; in-flight requests then finish
    seed = 1
    [coordinator]              # `tabshard serve` settings: any of coordinator/config.py, plus model
    max_stages = 3             # (coordinator_compute defaults to false here: tabs do the work)
    replicas = 1
    spot_check_fraction = 0.2
    [[tabs]]                   # repeated: profile and count (+ backend, hidden, memory_mb,
    profile = "cpu-wasm"       #   num_gpus: a GPU (or a share: 0.25) reserved by Ray for each tab,
    count = 4                  #   whose adapter the tab then computes on; adapter: an index or name;
    network = "phone-wifi"     #   network: a name from actors/profiles.NETWORKS or a table
                               #   {latency_ms, jitter_ms, bandwidth_mbps}: every frame the tab
                               #   sends and receives crosses it; default loopback, no delay;
                               #   same_device = true: the entry's tabs are tabs of one device,
                               #   connecting from one address, else each tab is its own device)
    [ray]                      # the local Ray's resources (ignored with --address): num_cpus (2),
                               #   num_gpus (detected when absent; declare them to test on a CPU host)
    [workload]
    streams = 2                # concurrent streams at most
    requests = 8               # total requests
    arrival_rate = 0.5         # requests per second (Poisson, seeded)
    prompt_tokens = 12         # about (words)
    output_tokens = 16
    # closed_loop = true       # instead: `streams` clients back to back until duration_s
    # distinct_prompts = 16    # request i asks prompt i % 16 (default: every prompt differs)
    # [[workload.phases]]      # closed loop only: from `at` seconds on, `streams` clients run
    # at = 20                  #   (e.g. 1 stream, then 32)
    # streams = 32
    [[faults]]                 # timed: at (s), kind, target ("random", "stage:N", "profile:NAME", a tab name), duration, factor
    at = 6.0
    kind = "freeze"
    [random_faults]            # random: count, kinds, start, end, duration, factor (slow), liar_factor,
                               # each_kind (every kind at least once)
    [churn]                    # tabs leave (evict) and new ones join every interval_s
    [respawn]                  # crashed/evicted/refusing/caught-lying tabs are replaced after delay_s
    [pass]                     # criteria (default: no_lost_requests, no_wrong_tokens); see report.CRITERIA
    criteria = ["no_lost_requests", "no_failed_requests", "no_wrong_tokens", "all_faults_detected", "memory_flat"]
    min_faults = 10            # all_faults_detected also needs this many injected
    memory_warmup_s = 20       # coordinator RSS "start" is sampled this long after streaming starts

Fault kinds: crash, freeze (duration), slow (factor x compute time, duration), partition
(duration), evict, memory (budget_mb, default 0: the tab refuses every layer), liar (factor:
noise relative to each result's RMS, default 0.05). A liar has no duration: it lies until the
coordinator's spot checks catch it (event liar_detected, the tab fenced), and only that counts
as its detection -- a liar the checks never sampled is reported undetected. Random faults do
not hit a tab that is lying undetected (the liar would vanish for another reason), and a liar
is only planted in a tab that serves a stage.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import random
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from protocol.errors import ConfigError, TabshardError

from actors.profiles import get_network, get_profile
from simulation.faults import DETECTION_WINDOW_S, detects

FAULT_KINDS = ("crash", "freeze", "slow", "partition", "evict", "memory", "liar")
LIAR_FACTOR = 0.05  # default noise of a liar, relative to each result's RMS
# How long after its window an earlier fault may still act on a tab, by kind: a step begun while
# slowed sleeps compute x factor (seconds at factor 2000) and may get the tab evicted when it ends;
# a frozen or partitioned tab is declared dead and rejoins under a new id.
AFTERMATH_S = {"slow": 12.0, "freeze": 3.0, "partition": 3.0}


def load_scenario(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"scenario file {str(p)!r} does not exist")
    try:
        scn = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"scenario {p.name} is not valid TOML: {exc}") from None
    scn.setdefault("name", p.stem)
    return validate(scn)


def validate(scn: dict) -> dict:
    if not scn.get("tabs"):
        raise ConfigError("a scenario needs at least one [[tabs]] entry")
    for t in scn["tabs"]:
        get_profile(t.get("profile", ""))
        if "network" in t:
            get_network(t["network"])
        if int(t.get("count", 1)) < 1:
            raise ConfigError(f"tabs.count must be >= 1, got {t.get('count')}")
        if not isinstance(t.get("same_device", False), bool):
            raise ConfigError(f"tabs.same_device must be true or false, got {t['same_device']!r}")
        gpus = t.get("num_gpus", 0)
        if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not 0 <= gpus <= 64:
            raise ConfigError(f"tabs.num_gpus must be a number of GPUs from 0 to 64 (0.25: a quarter), got {gpus!r}")
        if (gpus or t.get("adapter") is not None) and t.get("backend", get_profile(t["profile"]).backend) != "wgpu":
            raise ConfigError(f"tabs with num_gpus or adapter compute on WebGPU: set backend = \"wgpu\" "
                              f"(profile {t['profile']!r} defaults to another backend)")
    r = scn.get("ray", {})
    for key in ("num_cpus", "num_gpus"):
        v = r.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            raise ConfigError(f"ray.{key} must be a number >= 0, got {v!r}")
    for f in scn.get("faults", []):
        if f.get("kind") not in FAULT_KINDS:
            raise ConfigError(f"fault kind {f.get('kind')!r}; known: {', '.join(FAULT_KINDS)}")
        target = f.get("target", "random")
        if isinstance(target, str) and target.startswith("profile:"):
            get_profile(target.split(":", 1)[1])  # an unknown profile: ConfigError
    c = scn.get("coordinator", {})
    if c:
        from coordinator.config import load_settings

        load_settings(None, {k: v for k, v in c.items() if k != "model"})  # unknown keys, bad values: ConfigError
    w = scn.setdefault("workload", {})
    for ph in w.get("phases", []):
        if not isinstance(ph, dict) or not isinstance(ph.get("at"), (int, float)) or not isinstance(ph.get("streams"), int) \
                or isinstance(ph.get("streams"), bool) or ph["at"] < 0 or not 0 <= ph["streams"] <= 1024:
            raise ConfigError(f"workload.phases entries need at (seconds >= 0) and streams (0-1024), got {ph!r}")
    if w.get("phases") and not w.get("closed_loop"):
        raise ConfigError("workload.phases needs closed_loop = true (an open-loop workload has arrival_rate instead)")
    w.setdefault("streams", 2)
    w.setdefault("requests", 4)
    w.setdefault("arrival_rate", 1.0)
    w.setdefault("prompt_tokens", 12)
    w.setdefault("output_tokens", 16)
    scn.setdefault("duration_s", 30.0)
    scn.setdefault("seed", 0)
    from simulation.report import CRITERIA

    crit = scn.setdefault("pass", {}).setdefault("criteria", ["no_lost_requests", "no_wrong_tokens"])
    for name in crit:
        if name not in CRITERIA:
            raise ConfigError(f"pass criterion {name!r}; known: {', '.join(CRITERIA)}")
    return scn


def check_gpus(scn: dict, have: float) -> None:
    """Refuse to start when the tabs ask Ray for more GPUs than the cluster has: otherwise Ray
    would queue the actors forever and the run would hang waiting for them to join."""
    want = sum(float(t.get("num_gpus", 0)) * int(t.get("count", 1)) for t in scn["tabs"])
    if want > have + 1e-9:
        raise ConfigError(f"scenario {scn.get('name')!r} asks for {want:g} GPU(s) for its tabs, but the Ray cluster "
                          f"has {have:g}; run it where there are enough GPUs, lower tabs.num_gpus, or declare "
                          f"[ray] num_gpus for a local Ray")


def serve_config(c: dict) -> str:
    """The [coordinator] table as a `tabshard serve --config` file (coordinator_compute off unless asked)."""
    values = {"coordinator_compute": False, **{k: v for k, v in c.items() if k != "model"}}
    lines = ["[serve]"]
    for k, v in values.items():
        lines.append(f"{k} = {str(v).lower() if isinstance(v, bool) else json.dumps(v)}")
    return "\n".join(lines) + "\n"


def arrival_offsets(workload: dict, seed: int, duration: float) -> list[float]:
    """When each request of an open-loop workload is sent, in seconds from the start: Poisson
    arrivals at arrival_rate (seeded), those within the duration_s window. Arrivals that outrun
    the window send fewer than `requests`, and only those sent are requested (churn at seed 21
    sent 16 of 20, and the report counted the other 4 lost)."""
    rng = random.Random(seed + 1)
    out, t = [], 0.0
    for _ in range(int(workload["requests"])):
        if t > duration:
            break
        out.append(t)
        t += rng.expovariate(float(workload["arrival_rate"]))
    return out


def fault_schedule(scn: dict) -> list[dict]:
    """Timed faults plus seeded random ones, sorted by time."""
    out = [dict(f) for f in scn.get("faults", [])]
    rf = scn.get("random_faults")
    if rf:
        rng = random.Random(rf.get("seed", scn["seed"]))
        kinds = rf.get("kinds", list(FAULT_KINDS))
        start, end = float(rf.get("start", 2.0)), float(rf.get("end", scn["duration_s"]))
        n = int(rf["count"])
        # each_kind: every kind at least once (in a random order), the rest drawn as usual
        first = rng.sample(kinds, len(kinds)) if rf.get("each_kind") else []
        for i in range(n):
            at, kind = rng.uniform(start, end), first[i] if i < len(first) else rng.choice(kinds)
            factor = float(rf.get("liar_factor", LIAR_FACTOR)) if kind == "liar" else float(rf.get("factor", 2000))
            out.append({"at": at, "kind": kind, "target": "random", "duration": float(rf.get("duration", 1.5)),
                        "factor": factor})
    return sorted(out, key=lambda f: f["at"])


class ScenarioRun:
    def __init__(self, scn: dict, address: str | None = None, out_dir: str | Path = "sim-out", progress=print):
        self.scn = scn
        self.address = address
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.rng = random.Random(scn["seed"])
        self.tabs: dict = {}  # name -> SimulatedTab (alive or not)
        self.gone: set = set()
        # tabs a crash, an eviction or (replaced after it) a memory fault was aimed at: no target
        # for another fault, even before that injection has run (chaos at seed 9 slowed a tab
        # 1 ms after crashing it, and the crash's death was counted the slow-down's)
        self.ending: set = set()
        self.faults: list[dict] = []
        self.results: list = []
        self.requested = 0
        self.tab_info: dict = {}
        self.liars: dict = {}  # tab name -> its liar fault record, until the coordinator catches it
        self.names: dict = {}  # tab name -> every worker id it joined as (from join events)
        self.coord_rss: list = []  # (s since streaming started, coordinator VmRSS bytes)
        self.status_errors: list[str] = []  # /status polls that failed (retried)
        self._events_read = 0
        self._pool = ThreadPoolExecutor(max_workers=6, thread_name_prefix="sim-control")
        # fault injections apart: one that waits on its tab must hold up neither the others nor /status
        self._fault_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sim-faults")
        self._n_tabs = 0
        self._disturbed: dict = {}  # tab name -> monotonic time until which an earlier fault may still act
        self._specs: dict = {}  # tab name -> the [[tabs]] entry it was spawned from
        # Each tab connects from its device's own loopback address, as the devices of a LAN do (the
        # coordinator backs joins off per address: tabs all on 127.0.0.1 would share one device's
        # backoff); a replacement is the same device's next tab, a same_device entry one device
        self._addresses: dict = {}  # tab name -> its device's address
        self._entry_address: dict = {}  # id of a same_device [[tabs]] entry -> its one address
        self._devices = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ tabs
    def _spawn(self, spec: dict, address: str | None = None):
        """A new tab of the [[tabs]] entry ``spec``, on the device at ``address`` (None: a new
        device, or the entry's one device where same_device)."""
        from actors.tab import SimulatedTab

        with self._lock:
            name = f"{spec['profile']}-{self._n_tabs}"
            self._n_tabs += 1
            if address is None and spec.get("same_device"):
                address = self._entry_address.get(id(spec))
            if address is None:
                address = device_address(self._devices)
                self._devices += 1
                if spec.get("same_device"):
                    self._entry_address[id(spec)] = address
            self._addresses[name] = address
        mem = int(spec["memory_mb"] * (1 << 20)) if spec.get("memory_mb") else None
        tab = SimulatedTab(name, self.coord.worker_url, self.coord.token, profile=spec["profile"],
                           backend=spec.get("backend"), hidden=spec.get("hidden"), memory_bytes=mem,
                           seed=self._n_tabs, network=spec.get("network"),
                           num_gpus=float(spec.get("num_gpus", 0)), adapter=spec.get("adapter"), address=address)
        self._specs[name] = spec
        self.tabs[name] = tab
        return tab

    def _alive(self) -> list[str]:
        return [n for n in self.tabs if n not in self.gone]

    def _target(self, f: dict, st: dict) -> str | None:
        target = f.get("target", "random")
        alive = [n for n in self._alive() if n not in self.ending]
        if target.startswith("stage:"):
            i = int(target.split(":")[1])
            if i < len(st["stages"]) and st["stages"][i]["holders"]:
                wid = st["stages"][i]["holders"][0]
                name = next((w["name"] for w in st["workers"] if w["worker_id"] == wid), None)
                return name if name in alive else None
            return None
        if target == "random" or target.startswith("profile:"):
            # prefer tabs that serve a stage: a fault on an idle tab tests little (a liar that
            # serves nothing is never checked: only serving tabs); leave undetected liars be.
            # A tab still under an earlier fault is no target either: a step begun while slowed
            # can run on for compute x factor seconds after the fault's window, and the
            # coordinator may evict the tab for it a while later, taking a new fault with it
            # (a liar placed there is never caught, its tab went first). "profile:NAME": only
            # tabs of that profile (a crash that must spare the one WebGPU tab, say).
            now = time.monotonic()
            # a tab the coordinator does not know yet (a respawn still starting) has nothing to
            # detect a fault by: seed 14 of soak_ci crashed one such, and no one could notice
            known = {w["name"] for w in st["workers"] if w["state"] not in ("dead", "quarantined")}
            alive = [n for n in alive if n in known] or alive
            if target.startswith("profile:"):
                alive = [n for n in alive if self.tabs[n].profile.name == target.split(":", 1)[1]]
            alive = [n for n in alive if n not in self.liars]
            calm = [n for n in alive if self._disturbed.get(n, 0.0) <= now]
            serving = {w["name"] for w in st["workers"]
                       if w["stages"] and w["state"] not in ("dead", "quarantined", "suspect")}
            pool = [n for n in calm if n in serving] or ([] if f["kind"] == "liar" else calm or alive)
            if f["kind"] in ("slow", "liar"):
                # these show only in steps: prefer a primary of a pipeline that carries a session
                # (a standby, or a replica pipeline with no session, computes nothing to slow or
                # to check: seed 13 of soak_ci slowed such a tab, and nothing could detect it) and
                # that no earlier fault holds up (a primary of it disturbed or suspected: seed 20
                # slowed a tab whose pipeline waited on one slowed 4.6 s before, and no step came)
                names = {w["worker_id"]: w["name"] for w in st["workers"]}
                suspect = {w["name"] for w in st["workers"] if w["state"] == "suspect"}
                held = {n for n, until in self._disturbed.items() if until > now} | suspect
                busy = {s.get("pipeline") for s in st.get("sessions", [])}
                stalled = {x.get("pipeline") for x in st["stages"] if x["holders"] and names.get(x["holders"][0]) in held}
                computing = {names.get(x["holders"][0]) for x in st["stages"]
                             if x["holders"] and x.get("pipeline") in busy and x.get("pipeline") not in stalled}
                pool = [n for n in pool if n in computing] or pool
            return self.rng.choice(pool) if pool else None
        return target if target in alive else None

    def _mark_disturbed(self, f: dict, name: str) -> None:
        """The tab counts as under fault ``f`` until its window and aftermath are over (_target)."""
        if f["kind"] in AFTERMATH_S:
            self._disturbed[name] = time.monotonic() + float(f.get("duration", 2.0)) + AFTERMATH_S[f["kind"]]

    def _inject(self, f: dict, name: str):
        tab = self.tabs[name]
        kind, d = f["kind"], float(f.get("duration", 2.0))
        self._mark_disturbed(f, name)  # again: the fault's window runs from when it acts
        if kind == "crash":
            tab.crash()
        elif kind == "freeze":
            tab.freeze(d)
        elif kind == "slow":
            return tab.slow(float(f.get("factor", 2000)), d)
        elif kind == "partition":
            tab.partition(d)
        elif kind == "evict":
            tab.evict(f.get("reason", "tab discarded by the browser"))
        elif kind == "memory":
            return tab.memory_pressure(int(f.get("budget_mb", 0) * (1 << 20)))  # the ranges it handed back
        elif kind == "liar":
            return tab.lie(float(f.get("factor", LIAR_FACTOR)))
        if kind in ("crash", "evict"):
            self.gone.add(name)

    def _watch_events(self, loop) -> None:
        """Learn which worker ids each tab joined as, and notice liars the coordinator caught:
        such a tab left (fenced, it does not rejoin) and is replaced like an evicted one."""
        new = self.events.events[self._events_read:]
        self._events_read += len(new)
        for e in new:
            if e["kind"] == "join" and e.get("name"):
                self.names.setdefault(e["name"], set()).add(e.get("worker"))
        for name, rec in list(self.liars.items()):
            wids = self.names.get(name, set())
            if any(e["t"] >= rec["t"] - 0.05 and e.get("worker") in wids and detects("liar", e) for e in new):
                del self.liars[name]
                self.gone.add(name)
                self._respawn_later(loop, name)

    def _sample_rss(self, t0: float) -> None:
        rss = proc_rss(self.coord.proc.pid)
        if rss:
            self.coord_rss.append((round(time.monotonic() - t0, 2), rss))

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        from simulation.runtime import CoordinatorProcess, EventLog, plan_served, ray_session

        scn = self.scn
        c = scn.get("coordinator", {})
        (self.out_dir / "serve.toml").write_text(serve_config(c))
        serve = ["--config", str(self.out_dir / "serve.toml")]
        t_start = time.monotonic()
        r = scn.get("ray", {})
        with ray_session(self.address, num_cpus=int(r.get("num_cpus", 2)), num_gpus=r.get("num_gpus")) as ray:
            check_gpus(scn, ray.cluster_resources().get("GPU", 0.0))
            self.coord = CoordinatorProcess(serve, host="0.0.0.0" if self.address else "127.0.0.1",
                                            log_path=str(self.out_dir / "coordinator.log"), model=c.get("model"))
            self.coord.start()
            try:
                for spec in scn["tabs"]:
                    for _ in range(int(spec.get("count", 1))):
                        self._spawn(spec)
                self.progress(f"[{scn['name']}] {len(self.tabs)} tabs starting")
                for tab in self.tabs.values():
                    tab.wait_connected(timeout=300)
                st = self.coord.wait_for(plan_served, 600, "a plan served by tabs")
                t_ready = time.monotonic()
                self.progress(f"[{scn['name']}] {len(self.tabs)} tabs joined, {len(st['stages'])} stages served "
                              f"after {t_ready - t_start:.1f}s")
                self.events = EventLog()
                asyncio.run(self._drive(t_ready))
                self._sample_rss(t_ready)  # the end: every request answered, before any teardown
                self.events.absorb(self.coord.status(self.events.since))
                for name in self._alive():
                    try:
                        self.tab_info[name] = self.tabs[name].info(timeout=10)
                    except Exception as exc:
                        self.tab_info[name] = {"error": str(exc)}
                final = self.coord.status()
                coord_rss = _proc_rss(self.coord.proc.pid)
            finally:
                for tab in self.tabs.values():
                    tab.kill()
                self.coord.stop()
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._fault_pool.shutdown(wait=False, cancel_futures=True)
        from simulation.report import build_report
        from simulation.runtime import write_json

        # the raw run first: a long soak's figures survive a failure in the report code
        write_json(self.out_dir / "run.json", {
            "t0": t_ready, "requested": self.requested, "results": [{**r.to_dict(), "prompt": r.prompt, "ids": r.ids,
                                                                     "times": r.times} for r in self.results],
            "faults": self.faults, "events": self.events.sorted(), "coordinator_rss": self.coord_rss,
            "status_errors": self.status_errors, "final_status": final})
        return build_report(self, t_ready, t_ready - t_start, final, coord_rss)

    async def _drive(self, t0: float) -> None:
        from simulation.workload import make_prompt, stream_request

        loop = asyncio.get_running_loop()
        scn, w = self.scn, self.scn["workload"]
        duration = float(scn["duration_s"])
        distinct = int(w.get("distinct_prompts", 0))
        sem = asyncio.Semaphore(int(w["streams"]))
        tasks = []

        async def one(i):
            prompt = make_prompt(scn["seed"] * 100_003 + (i % distinct if distinct else i), int(w["prompt_tokens"]))
            res = await stream_request(self.coord.base, f"{scn['name']}-{i}", prompt, int(w["output_tokens"]),
                                       timeout=float(w.get("request_timeout_s", 300)))
            self.results.append(res)

        async def arrivals():
            """Open loop: Poisson arrivals of `requests` within the window, at most `streams` in flight."""
            offsets = arrival_offsets(w, scn["seed"], duration)
            self.requested = len(offsets)

            async def queued(i):
                async with sem:
                    await one(i)

            for i, at in enumerate(offsets):
                await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
                tasks.append(asyncio.create_task(queued(i)))

        async def closed_loop():
            """`streams` clients, each starting its next request when the last one ends, until duration_s."""
            ids = itertools.count()

            phases = sorted(w.get("phases", []), key=lambda ph: float(ph["at"]))

            def streams_now() -> int:
                """`streams`, or the streams of the last [[workload.phases]] entry that has begun."""
                now, n = time.monotonic() - t0, int(w["streams"])
                for ph in phases:
                    if float(ph["at"]) <= now:
                        n = int(ph["streams"])
                return n

            async def client(k: int):
                while time.monotonic() - t0 < duration:
                    if k >= streams_now():  # this client's phase has not begun, or has ended
                        await asyncio.sleep(0.05)
                        continue
                    self.requested += 1
                    await one(next(ids))

            most = max([int(w["streams"])] + [int(ph["streams"]) for ph in phases])
            await asyncio.gather(*(client(k) for k in range(most)))

        async def status():
            """/status, retried: an overloaded host may miss the 5 s timeout now and then."""
            for attempt in range(5):
                try:
                    return await loop.run_in_executor(self._pool, self.coord.status, self.events.since)
                except Exception as exc:
                    self.status_errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    await asyncio.sleep(0.5 * (attempt + 1))
            return None

        async def churn():
            ch = scn.get("churn")
            if not ch:
                return
            spec = {"profile": ch.get("profile", "cpu-wasm"), "backend": ch.get("backend")}
            while time.monotonic() - t0 < duration:
                await asyncio.sleep(float(ch.get("interval_s", 5.0)))
                await loop.run_in_executor(self._pool, self._spawn, spec)
                alive = self._alive()
                if len(alive) > int(ch.get("min_tabs", 3)):
                    name = self.rng.choice(alive[:-1])
                    # the ids it joined as (from the events): its close is seen as a death like any eviction's
                    self.faults.append({"at": time.monotonic() - t0, "kind": "evict", "target": "churn", "tab": name,
                                        "worker_ids": sorted(self.names.get(name, ())), "t": time.monotonic(), "churn": True})
                    await loop.run_in_executor(self._pool, self._inject, {"kind": "evict", "reason": "churn: tab closed"}, name)

        async def poll():
            last = 0.0
            while True:
                st = await status()
                if st is None:
                    continue
                self.events.absorb(st)
                self._watch_events(loop)
                if time.monotonic() - last >= 1.0:
                    last = time.monotonic()
                    self._sample_rss(t0)
                    done = len(self.results)
                    toks = sum(len(r.ids) for r in self.results) + sum(s["tokens"] for s in st["sessions"])
                    live = sum(1 for x in st["workers"] if x["state"] not in ("dead", "quarantined") and not x["local"])
                    rss = self.coord_rss[-1][1] / 2**20 if self.coord_rss else 0
                    self.progress(f"\r[{scn['name']}] t={time.monotonic() - t0:6.1f}s  requests {done}/{self.requested}  "
                                  f"tokens {toks}  faults {len(self.faults)}  live tabs {live}  coordinator {rss:.0f} MiB  "
                                  f"{'DEGRADED' if st['degraded'] else 'served'}   ", end="")
                await asyncio.sleep(0.2)

        poller = asyncio.create_task(poll())
        side = [asyncio.create_task(self._faults_on_schedule(loop, t0, status)), asyncio.create_task(churn())]
        await (closed_loop() if w.get("closed_loop") else arrivals())
        await asyncio.gather(*side)
        await asyncio.gather(*tasks)
        await asyncio.sleep(self._detection_wait(time.monotonic()))  # the poller reads on meanwhile
        # no step runs once the workload is done: a liar not caught by now is reported undetected
        poller.cancel()
        st = await status()
        if st is not None:
            self.events.absorb(st)
            self._watch_events(loop)
        self.progress("")

    def _detection_wait(self, now: float) -> float:
        """Seconds until the last injected fault has had DETECTION_WINDOW_S to be seen (0: none
        left to wait for)."""
        last = max((f["t"] for f in self.faults if "skipped" not in f and "inject_error" not in f), default=None)
        return 0.0 if last is None else max(0.0, last + DETECTION_WINDOW_S - now)

    async def _faults_on_schedule(self, loop, t0: float, status) -> None:
        """Inject the scenario's faults at their times (``status``: a coroutine giving /status,
        or None). An injection may wait on its tab -- memory pressure runs after the tab's step
        in progress, which a slow-down can stretch past a minute -- so each runs on its own, on
        its own threads, and the schedule never waits for one (chaos at seed 4 once held every
        later fault back by up to 114 s behind one such wait, most of them past the workload's
        end, where nothing could detect them). Returns once every injection has finished."""
        injections = []

        async def inject(f: dict, rec: dict, name: str):
            try:
                got = await loop.run_in_executor(self._fault_pool, self._inject, f, name)
                if f["kind"] == "liar":
                    rec["steps_before"] = got
                elif f["kind"] == "memory":
                    rec["refused"] = len(got)  # ranges it handed back: none, nothing for anyone to see
                elif f["kind"] == "slow":
                    rec["slow_window"] = got  # its tab's count of slowed steps: info()["slowed_steps"][got]
                    # the count once the window has closed and its slowed step has begun its sleep,
                    # read now: a tab that crashes later takes its figures with it (chaos at seed 7
                    # left two slow-downs of such tabs neither counted nor detected)
                    await asyncio.sleep(float(f.get("duration", 2.0)) + DETECTION_WINDOW_S)
                    try:
                        info = await loop.run_in_executor(self._fault_pool, lambda: self.tabs[name].info(timeout=5))
                        rec["slowed_steps"] = info["slowed_steps"][got]
                    except Exception:
                        pass  # gone already: the figures it left at the end, if any, say
            except (TabshardError, TimeoutError, OSError) as exc:
                # the tab's failure (gone, unresponsive, its hook refused): the fault is counted
                # unexercised. The runner's own error goes on up: caught here it hid that every
                # memory fault's injection failed on the runner's side (the count of ranges
                # refused read from a hook that returned nothing), each counted unexercised
                rec["inject_error"] = f"{type(exc).__name__}: {exc}"[:200]
                self.liars.pop(name, None)
            if f["kind"] in ("crash", "evict", "memory"):
                # a tab that lost its budget is closed and replaced like a crashed one
                self._respawn_later(loop, name)

        for f in fault_schedule(self.scn):
            await asyncio.sleep(max(0.0, t0 + float(f["at"]) - time.monotonic()))
            st = await status()
            name = self._target(f, st) if st is not None else None
            if name is None:
                self.faults.append({**f, "tab": None, "t": time.monotonic(),
                                    "skipped": "no target" if st is not None else "no /status"})
                continue
            wids = [x["worker_id"] for x in st["workers"] if x["name"] == name and x["state"] not in ("dead", "quarantined")]
            rec = {**f, "tab": name, "worker_ids": wids, "t": time.monotonic(),
                   "stages": sorted({s for x in st["workers"] if x["worker_id"] in wids for s in x["stages"]})}
            if f["kind"] == "liar":
                self.liars[name] = rec  # before the first lie can be caught
            self._mark_disturbed(f, name)  # now, before the next fault picks its target
            if f["kind"] in ("crash", "evict") or (f["kind"] == "memory" and self.scn.get("respawn")):
                self.ending.add(name)
            self.faults.append(rec)
            injections.append(asyncio.create_task(inject(f, rec, name)))
        await asyncio.gather(*injections)

    def _respawn_later(self, loop, name: str) -> None:
        """With [respawn]: replace the tab after delay_s (a new tab of the same kind joins)."""
        if self.scn.get("respawn"):
            spec = self._spec_of(name)

            def replace():
                done = loop.run_in_executor(self._pool, self._replace, name, spec)
                # then, once the coordinator has seen the old tab go, free its process
                done.add_done_callback(lambda _: loop.call_later(3.0, loop.run_in_executor, self._pool, self._retire, name))

            loop.call_later(float(self.scn["respawn"].get("delay_s", 1.0)), replace)

    def _replace(self, name: str, spec: dict) -> None:
        if name not in self.gone:
            self.gone.add(name)
            try:
                self.tabs[name].evict("replaced after memory pressure")
            except Exception:
                pass
        self._spawn(spec, address=self._addresses.get(name))  # the same device opens its next tab

    def _retire(self, name: str) -> None:
        """Record a gone tab's last figures, then end its actor (an evicted or caught tab's
        process would otherwise hold its weights until the scenario ends)."""
        tab = self.tabs[name]
        try:
            self.tab_info[name] = {**tab.info(timeout=5), "gone": True}
        except Exception:
            pass
        tab.kill()

    def _spec_of(self, name: str) -> dict:
        tab = self.tabs[name]
        spec = self._specs.get(name, {})
        return {"profile": tab.profile.name, "backend": tab.backend, "hidden": tab.hidden,
                **{k: spec[k] for k in ("num_gpus", "adapter", "memory_mb", "network", "same_device") if k in spec}}


def device_address(index: int) -> str:
    """The loopback address of a scenario's device ``index`` (0, 1, ...): 127.1.0.1, 127.1.0.2,
    ... (all of 127/8 reaches the coordinator on 127.0.0.1; the tests' hand-picked sources are
    127.0.0.x)."""
    if not 0 <= index < 254 * 256:
        raise ConfigError(f"a scenario has at most {254 * 256} devices")
    return f"127.1.{index // 254}.{index % 254 + 1}"


def _proc_rss(pid: int, field: str = "VmHWM") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def proc_rss(pid: int) -> int:
    """A process's resident set now (VmRSS, bytes; 0 when it is gone)."""
    return _proc_rss(pid, "VmRSS")


def run_scenario(path_or_dict, address: str | None = None, out_dir: str | Path = "sim-out", progress=print) -> dict:
    scn = load_scenario(path_or_dict) if not isinstance(path_or_dict, dict) else validate(dict(path_or_dict))
    return ScenarioRun(scn, address, out_dir, progress).run()
