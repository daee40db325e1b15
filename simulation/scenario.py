"""Scenarios: a TOML file declares tabs, workload, faults; `run_scenario` runs it on Ray and
returns the report (simulation/report.py renders it).

    name = "smoke"
    duration_s = 40            # the workload's arrival window; in-flight requests then finish
    seed = 1
    [coordinator]              # `tabshard serve` settings (flags)
    max_stages = 3
    replicas = 1
    [[tabs]]                   # repeated: profile and count (+ backend, hidden, memory_mb)
    profile = "cpu-wasm"
    count = 4
    [workload]
    streams = 2                # concurrent streams at most
    requests = 8               # total requests
    arrival_rate = 0.5         # requests per second (Poisson, seeded)
    prompt_tokens = 12         # about (words)
    output_tokens = 16
    [[faults]]                 # timed: at (s), kind, target ("random", "stage:N", a tab name), duration, factor
    at = 6.0
    kind = "freeze"
    [random_faults]            # random: count, kinds, start, end, duration
    [churn]                    # tabs leave (evict) and new ones join every interval_s
    [respawn]                  # crashed/evicted tabs are replaced after delay_s
"""
from __future__ import annotations

import asyncio
import random
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tabshard.errors import ConfigError

from simulation.profiles import get_profile

FAULT_KINDS = ("crash", "freeze", "slow", "partition", "evict", "memory")
DETECTION_EVENTS = {"death", "quarantine", "refused", "suspect"}


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
        if int(t.get("count", 1)) < 1:
            raise ConfigError(f"tabs.count must be >= 1, got {t.get('count')}")
    for f in scn.get("faults", []):
        if f.get("kind") not in FAULT_KINDS:
            raise ConfigError(f"fault kind {f.get('kind')!r}; known: {', '.join(FAULT_KINDS)}")
    w = scn.setdefault("workload", {})
    w.setdefault("streams", 2)
    w.setdefault("requests", 4)
    w.setdefault("arrival_rate", 1.0)
    w.setdefault("prompt_tokens", 12)
    w.setdefault("output_tokens", 16)
    scn.setdefault("duration_s", 30.0)
    scn.setdefault("seed", 0)
    return scn


def fault_schedule(scn: dict) -> list[dict]:
    """Timed faults plus seeded random ones, sorted by time."""
    out = [dict(f) for f in scn.get("faults", [])]
    rf = scn.get("random_faults")
    if rf:
        rng = random.Random(rf.get("seed", scn["seed"]))
        kinds = rf.get("kinds", list(FAULT_KINDS))
        start, end = float(rf.get("start", 2.0)), float(rf.get("end", scn["duration_s"]))
        for _ in range(int(rf["count"])):
            out.append({"at": rng.uniform(start, end), "kind": rng.choice(kinds), "target": "random",
                        "duration": float(rf.get("duration", 1.5)), "factor": float(rf.get("factor", 2000))})
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
        self.faults: list[dict] = []
        self.results: list = []
        self.tab_info: dict = {}
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sim-control")
        self._n_tabs = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ tabs
    def _spawn(self, spec: dict):
        from actors.tab import SimulatedTab

        with self._lock:
            name = f"{spec['profile']}-{self._n_tabs}"
            self._n_tabs += 1
        mem = int(spec["memory_mb"] * (1 << 20)) if spec.get("memory_mb") else None
        tab = SimulatedTab(name, self.coord.worker_url, self.coord.token, profile=spec["profile"],
                           backend=spec.get("backend"), hidden=spec.get("hidden"), memory_bytes=mem,
                           seed=self._n_tabs, lean=bool(spec.get("lean")))
        self.tabs[name] = tab
        return tab

    def _alive(self) -> list[str]:
        return [n for n in self.tabs if n not in self.gone]

    def _target(self, f: dict, st: dict) -> str | None:
        target = f.get("target", "random")
        alive = self._alive()
        if target.startswith("stage:"):
            i = int(target.split(":")[1])
            if i < len(st["stages"]) and st["stages"][i]["holders"]:
                wid = st["stages"][i]["holders"][0]
                name = next((w["name"] for w in st["workers"] if w["worker_id"] == wid), None)
                return name if name in alive else None
            return None
        if target == "random":
            # prefer tabs that serve a stage: a fault on an idle tab tests little
            serving = {w["name"] for w in st["workers"] if w["stages"] and w["state"] not in ("dead", "quarantined")}
            pool = [n for n in alive if n in serving] or alive
            return self.rng.choice(pool) if pool else None
        return target if target in alive else None

    def _inject(self, f: dict, name: str) -> None:
        tab = self.tabs[name]
        kind, d = f["kind"], float(f.get("duration", 2.0))
        if kind == "crash":
            tab.crash()
        elif kind == "freeze":
            tab.freeze(d)
        elif kind == "slow":
            tab.slow(float(f.get("factor", 2000)), d)
        elif kind == "partition":
            tab.partition(d)
        elif kind == "evict":
            tab.evict(f.get("reason", "tab discarded by the browser"))
        elif kind == "memory":
            tab.memory_pressure(int(f.get("budget_mb", 0) * (1 << 20)))
        if kind in ("crash", "evict"):
            self.gone.add(name)

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        from simulation.runtime import CoordinatorProcess, EventLog, plan_served, ray_session

        scn = self.scn
        c = scn.get("coordinator", {})
        serve = ["--no-coordinator-compute"] if not c.get("coordinator_compute", False) else []
        for key in ("replicas", "max_stages", "heartbeat_ms"):
            if key in c:
                serve += [f"--{key.replace('_', '-')}", str(c[key])]
        t_start = time.monotonic()
        with ray_session(self.address):
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
                self.events.absorb(self.coord.status())
                for name in self._alive():
                    try:
                        self.tab_info[name] = self.tabs[name].info(timeout=10)
                    except Exception as exc:
                        self.tab_info[name] = {"error": str(exc)}
                final = self.coord.status()
                coord_pid = self.coord.proc.pid
                coord_rss = _proc_rss(coord_pid)
            finally:
                for tab in self.tabs.values():
                    tab.kill()
                self.coord.stop()
                self._pool.shutdown(wait=False, cancel_futures=True)
        from simulation.report import build_report

        return build_report(self, t_ready, t_ready - t_start, final, coord_rss)

    async def _drive(self, t0: float) -> None:
        from simulation.workload import make_prompt, stream_request

        loop = asyncio.get_running_loop()
        scn, w = self.scn, self.scn["workload"]
        duration = float(scn["duration_s"])
        sem = asyncio.Semaphore(int(w["streams"]))
        tasks = []

        async def one(i):
            async with sem:
                prompt = make_prompt(scn["seed"] * 100_003 + i, int(w["prompt_tokens"]))
                res = await stream_request(self.coord.base, f"{scn['name']}-{i}", prompt, int(w["output_tokens"]),
                                           timeout=float(w.get("request_timeout_s", 300)))
                self.results.append(res)

        async def arrivals():
            rng = random.Random(scn["seed"] + 1)
            for i in range(int(w["requests"])):
                tasks.append(asyncio.create_task(one(i)))
                await asyncio.sleep(rng.expovariate(float(w["arrival_rate"])))
                if time.monotonic() - t0 > duration:
                    break

        async def faults():
            for f in fault_schedule(scn):
                await asyncio.sleep(max(0.0, t0 + float(f["at"]) - time.monotonic()))
                st = await loop.run_in_executor(self._pool, self.coord.status)
                name = self._target(f, st)
                if name is None:
                    self.faults.append({**f, "tab": None, "t": time.monotonic(), "skipped": "no target"})
                    continue
                wids = [x["worker_id"] for x in st["workers"] if x["name"] == name and x["state"] not in ("dead", "quarantined")]
                rec = {**f, "tab": name, "worker_ids": wids, "t": time.monotonic(),
                       "stages": sorted({s for x in st["workers"] if x["worker_id"] in wids for s in x["stages"]})}
                try:
                    await loop.run_in_executor(self._pool, self._inject, f, name)
                except Exception as exc:
                    rec["inject_error"] = f"{type(exc).__name__}: {exc}"[:200]
                self.faults.append(rec)
                if f["kind"] in ("crash", "evict", "memory") and scn.get("respawn"):
                    # a tab that lost its budget is closed and replaced like a crashed one
                    loop.call_later(float(scn["respawn"].get("delay_s", 1.0)),
                                    lambda n=name, spec=self._spec_of(name): loop.run_in_executor(self._pool, self._replace, n, spec))

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
                    self.faults.append({"at": time.monotonic() - t0, "kind": "evict", "target": "churn", "tab": name,
                                        "worker_ids": [], "t": time.monotonic(), "churn": True})
                    await loop.run_in_executor(self._pool, self._inject, {"kind": "evict", "reason": "churn: tab closed"}, name)

        async def poll():
            last = 0.0
            while True:
                st = await loop.run_in_executor(self._pool, self.coord.status)
                self.events.absorb(st)
                if time.monotonic() - last >= 1.0:
                    last = time.monotonic()
                    done = len(self.results)
                    toks = sum(len(r.ids) for r in self.results) + sum(s["tokens"] for s in st["sessions"])
                    live = sum(1 for x in st["workers"] if x["state"] not in ("dead", "quarantined") and not x["local"])
                    self.progress(f"\r[{scn['name']}] t={time.monotonic() - t0:6.1f}s  requests {done}/{w['requests']}  "
                                  f"tokens {toks}  faults {len(self.faults)}  live tabs {live}  "
                                  f"{'DEGRADED' if st['degraded'] else 'served'}   ", end="")
                await asyncio.sleep(0.2)

        poller = asyncio.create_task(poll())
        side = [asyncio.create_task(faults()), asyncio.create_task(churn())]
        await arrivals()
        await asyncio.gather(*side)
        await asyncio.gather(*tasks)
        poller.cancel()
        self.progress("")

    def _replace(self, name: str, spec: dict) -> None:
        if name not in self.gone:
            self.gone.add(name)
            try:
                self.tabs[name].evict("replaced after memory pressure")
            except Exception:
                pass
        self._spawn(spec)

    def _spec_of(self, name: str) -> dict:
        tab = self.tabs[name]
        return {"profile": tab.profile.name, "backend": tab.backend, "hidden": tab.hidden}


def _proc_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_scenario(path_or_dict, address: str | None = None, out_dir: str | Path = "sim-out", progress=print) -> dict:
    scn = load_scenario(path_or_dict) if not isinstance(path_or_dict, dict) else validate(dict(path_or_dict))
    return ScenarioRun(scn, address, out_dir, progress).run()
