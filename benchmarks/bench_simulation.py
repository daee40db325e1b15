"""Scale figures for simulated tabs (not CI: each takes minutes).

    python benchmarks/bench_simulation.py tabs32 [--env K=V]  # 32 Ray-actor tabs joined and serving; memory:
                                                            # peak RSS per tab, and RSS/PSS of all tabs sampled
                                                            # while serving with the biggest tab by mapping
    python benchmarks/bench_simulation.py tabs32 --baseline REV [--rounds 2]
                                                            # the same measurement of the checkout REV (a git
                                                            # worktree) and of this one, alternating, one process
                                                            # each; ratios this/REV per metric, appended to the
                                                            # benchmark history (suite bench_simulation)
A tabs32 run stops (and says so) when the host's available memory falls below
--min-available-mb (4096): a checkout whose tabs hold f32 weights peaks above 1 GB a tab.
    python benchmarks/bench_simulation.py conns1000 [--seconds 300] [--conns 1000] [--procs 4]
                                                            # heartbeat-only connections; false detections,
                                                            # coordinator CPU and memory
Results print as JSON (and go to sim-out/bench-*.json).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
import _thread
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _meminfo() -> dict:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            info[k] = int(v.split()[0])
    return info


def _meminfo_used_mb() -> float:
    info = _meminfo()
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


def _meminfo_total_mb() -> float:
    return _meminfo()["MemTotal"] / 1024


ROLLUP_FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Anonymous", "Shared_Clean", "Private_Dirty")


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _descends_from_us(pid: int) -> bool:
    """This run's Ray (its raylet a child of this process) started the process: other Rays on a
    shared host run tabs of their own."""
    me = os.getpid()
    try:
        while pid > 1:
            pid = _parent(pid)
            if pid == me:
                return True
    except (OSError, ValueError, IndexError):
        pass
    return False


def _host_pids() -> list[int]:
    """This run's tab hosts (actors/tab_host.py: one Ray actor a node starting the tab processes)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if f.read(64).startswith(b"ray::_TabHost") and _descends_from_us(int(d)):
                        pids.append(int(d))
            except OSError:
                pass
    return pids


def _tab_pids() -> list[int]:
    """This run's simulated tabs: a tab actor's process (Ray titles it `ray::_TabActor...`) or a
    tab process under its node's tab host (`python -m actors.tab_process`)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read(512)
                if (cmd.startswith(b"ray::_TabActor") or b"\0actors.tab_process" in cmd) and _descends_from_us(int(d)):
                    pids.append(int(d))
            except OSError:
                pass
    return pids


def _rollup_kb(pid: int) -> dict:
    """RSS, PSS (shared pages divided among the processes mapping them) and their parts, kB."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ROLLUP_FIELDS:
                    out[k] = int(v.split()[0])
    except OSError:
        return {}
    return out


def _smaps_by_mapping(pid: int, top: int = 16) -> list[dict]:
    """One process's RSS and PSS per mapping (shared libraries by file name, anonymous memory
    as one line): what a tab's memory is made of."""
    rows: dict[str, dict] = {}
    name = None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split()
                if "-" in head[0] and not line[0].isupper():  # a mapping's header line
                    path = head[5] if len(head) > 5 else ""
                    if not path:  # anonymous regions by size: malloc arenas (64 MiB), BLAS buffers, arrays
                        lo, hi = (int(v, 16) for v in head[0].split("-"))
                        size = (hi - lo) >> 20
                        path = f"[anonymous {size} MiB regions]" if size >= 8 else "[anonymous < 8 MiB regions]"
                    name = os.path.basename(path) if path.startswith("/") else path
                elif head[0] in ("Rss:", "Pss:") and name is not None:
                    r = rows.setdefault(name, {"mapping": name, "rss_kb": 0, "pss_kb": 0})
                    r["rss_kb" if head[0] == "Rss:" else "pss_kb"] += int(head[1])
    except OSError:
        return []
    return sorted(rows.values(), key=lambda r: -r["rss_kb"])[:top]


class _Provenance:
    """A throwaway actor started like the tabs (same Ray, same environment): which checkout its
    process imports the tab and the coordinator from."""

    def files(self) -> dict:
        import actors.tab
        import coordinator

        return {"actors.tab": actors.tab.__file__, "coordinator": coordinator.__file__}


def _use_tree(tree: str) -> None:
    """Run the measurement on the checkout at `tree`: its packages ahead of this one's on this
    process's path, and (PYTHONPATH, cwd) on the path of every process Ray and the scenario start."""
    tree = str(Path(tree).resolve())
    sys.path.insert(0, tree)
    os.environ["PYTHONPATH"] = tree + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    os.chdir(tree)


def tabs32(args) -> dict:
    for kv in args.env:  # before Ray starts: its raylet, and so every tab's process, inherits these
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise SystemExit(f"--env takes KEY=VALUE, got {kv!r}")
        os.environ[k] = v
    if args.baseline:
        return tabs32_against(args)
    if args.tree:
        _use_tree(args.tree)
    import coordinator
    from simulation.runtime import ray_session
    from simulation.scenario import run_scenario

    load0 = os.getloadavg()

    used0 = _meminfo_used_mb()
    scn = {"name": "tabs32", "seed": 5, "duration_s": 20,
           "coordinator": {"max_stages": 16, "replicas": 2},
           "tabs": [{"profile": "cpu-wasm", "count": args.tabs}],
           "workload": {"streams": 2, "requests": 4, "arrival_rate": 0.5, "prompt_tokens": 10, "output_tokens": 12,
                        "request_timeout_s": 600}}
    try:  # one pipeline of 16 stages, as before the planner chose depths: the same work in either checkout
        from coordinator.config import load_settings

        load_settings(None, {"stages": 16})
        scn["coordinator"]["stages"] = 16
    except Exception:  # a checkout older than the setting: 16 stages was what max_stages gave
        pass
    peak = {"used_mb": used0, "tabs": {}, "rss_kb": 0, "hwm_kb": {}, "host_hwm_kb": {}, "aborted": None}
    done = threading.Event()

    def sample_tabs():
        """Every tab's smaps_rollup; kept when the tabs' total RSS is the highest seen."""
        roll = {pid: r for pid in _tab_pids() if (r := _rollup_kb(pid))}
        total = sum(r.get("Rss", 0) for r in roll.values())
        if total > peak["rss_kb"]:
            biggest = max(roll, key=lambda p: roll[p].get("Rss", 0))
            peak.update(rss_kb=total, tabs=roll, biggest=_smaps_by_mapping(biggest))
        return roll

    def watch():
        """Every 0.5 s: the host's used memory and each tab's high-water mark (VmHWM, so a peak
        between samples is not missed, and a run cut short still has each tab's peak so far);
        the tabs' smaps every 2 s. Below --min-available-mb the run is stopped: on a shared host
        the tabs must not take the others' memory (a checkout whose tabs grow without bound)."""
        last_smaps = 0.0
        while not done.wait(0.5):
            used = _meminfo_used_mb()
            peak["used_mb"] = max(peak["used_mb"], used)
            pids = _tab_pids() if time.monotonic() - last_smaps < 2.0 else list(sample_tabs())
            if pids and time.monotonic() - last_smaps >= 2.0:
                last_smaps = time.monotonic()
            for pid in pids:
                try:
                    hwm = _rss_mb(pid)[1]
                except OSError:  # gone since listed
                    continue
                peak["hwm_kb"][pid] = max(peak["hwm_kb"].get(pid, 0), int(hwm * 1024))
            for pid in _host_pids():
                try:
                    peak["host_hwm_kb"][pid] = int(_rss_mb(pid)[1] * 1024)
                except OSError:
                    pass
            available = _meminfo_total_mb() - used
            if available < args.min_available_mb and peak["aborted"] is None:
                peak["aborted"] = (f"host memory available {available:.0f} MB < {args.min_available_mb} MB "
                                   f"with {len(pids)} tabs up: stopped")
                print(f"[tabs32] {peak['aborted']}", file=sys.stderr, flush=True)
                _thread.interrupt_main()

    def progress(line, end="\n"):
        print(line, end=end, file=sys.stderr, flush=True)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rep, imported = None, {}
    try:
        with ray_session() as ray:  # the scenario runs in this Ray (the same settings as its own)
            probe = ray.remote(num_cpus=0)(_Provenance).remote()
            imported = {"driver": {"coordinator": coordinator.__file__}, "actor": ray.get(probe.files.remote(), timeout=120)}
            ray.kill(probe)
            rep = run_scenario(scn, out_dir="sim-out/tabs32", progress=progress)
    except KeyboardInterrupt:
        if peak["aborted"] is None:
            raise
    finally:
        done.set()
        watcher.join()
    hwm_mb = sorted(v / 1024 for v in peak["hwm_kb"].values())
    sampled = {"tabs": len(hwm_mb), "total": round(sum(hwm_mb), 1),
               "median": round(hwm_mb[len(hwm_mb) // 2], 1) if hwm_mb else None,
               "max": round(hwm_mb[-1], 1) if hwm_mb else None}
    out = {"tabs": args.tabs, "env": args.env, "coordinator_settings": scn["coordinator"], "tree": os.getcwd() if args.tree else str(Path(__file__).resolve().parents[1]),
           "imported_from": imported, "load_avg": {"start": [round(x, 2) for x in load0],
                                                   "end": [round(x, 2) for x in os.getloadavg()]},
           "aborted": peak["aborted"],
           # each tab's VmHWM as sampled by this process (every 0.5 s): the same figure as the
           # report's, and there even when the run was stopped (then a lower bound)
           "tab_peak_rss_mb_sampled": sampled,
           # the tab hosts' own peak RSS (a Ray actor a node when tabs are processes; none when tabs are actors)
           "tab_hosts_peak_rss_mb": round(sum(peak["host_hwm_kb"].values()) / 1024, 1),
           "host_used_mb": {"before": round(used0), "peak_during": round(peak["used_mb"]),
                            "delta": round(peak["used_mb"] - used0)},
           "tabs_smaps_at_peak": {
                "tabs": len(peak["tabs"]),
                **{f"total_{k.lower()}_mb": round(sum(r.get(k, 0) for r in peak["tabs"].values()) / 1024, 1)
                   for k in ROLLUP_FIELDS},
                **{f"median_{k.lower()}_mb": round(sorted(r.get(k, 0) for r in peak["tabs"].values())[len(peak["tabs"]) // 2] / 1024, 1)
                   for k in ("Rss", "Pss", "Pss_Anon", "Pss_File") if peak["tabs"]},
                "biggest_tab_by_mapping_kb": peak.get("biggest", [])}}
    if rep is None:
        return out
    per_tab = [t for t in rep["tabs"]["per_tab"].values() if "peak_rss_mb" in t]
    serving = sum(1 for t in per_tab if t["held_weights_mb"] > 0)
    return {**out, "alive": rep["tabs"]["alive_at_end"], "tabs_holding_layers": serving,
            "startup_s": rep["startup_s"], "passed": rep["passed"], "tokens_per_s": rep["tokens"]["per_s"],
            "tab_peak_rss_mb": {"min": min(t["peak_rss_mb"] for t in per_tab), "max": max(t["peak_rss_mb"] for t in per_tab),
                                "median": sorted(t["peak_rss_mb"] for t in per_tab)[len(per_tab) // 2],
                                "total": round(sum(t["peak_rss_mb"] for t in per_tab), 1)},
            "coordinator_peak_rss_mb": rep["coordinator"]["peak_rss_mb"],
            # the weights the tabs downloaded: the model's bytes x replicas when the plan never
            # changed; more when early plans (few tabs trusted yet) gave tabs larger ranges first
            "weight_mb_sent": round(rep["coordinator"]["counters"].get("weight_bytes_sent", 0) / 2**20, 1)}


# the figures compared between two checkouts: (name, how to read it from tabs32's result)
COMPARED = {
    # sum of each tab's VmHWM (sampled: there for a run stopped at --min-available-mb, then a lower bound)
    "tabs_peak_rss_total_mb": lambda r: r["tab_peak_rss_mb_sampled"]["total"],
    "tab_peak_rss_median_mb": lambda r: r["tab_peak_rss_mb_sampled"]["median"],
    "tabs_and_hosts_peak_rss_total_mb": lambda r: r["tab_peak_rss_mb_sampled"]["total"] + r.get("tab_hosts_peak_rss_mb", 0),
    "tabs_rss_at_peak_mb": lambda r: r["tabs_smaps_at_peak"]["total_rss_mb"],
    "tabs_pss_at_peak_mb": lambda r: r["tabs_smaps_at_peak"]["total_pss_mb"],
    "tab_pss_at_peak_median_mb": lambda r: r["tabs_smaps_at_peak"]["median_pss_mb"],
    "host_used_delta_mb": lambda r: r["host_used_mb"]["delta"],  # MemTotal-MemAvailable, before vs peak
}


def _worktree(rev: str) -> tuple[Path, bool]:
    """A detached git worktree of `rev` beside this checkout (made here unless it exists)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", rev], check=True, capture_output=True,
                         text=True).stdout.strip()
    path = Path(tempfile.gettempdir()) / f"tabshard-baseline-{sha}"
    if path.exists():
        return path, False
    subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(path), sha], check=True,
                   capture_output=True)
    return path, True


def tabs32_against(args) -> dict:
    """tabs32 on the checkout `args.baseline` and on this one, alternating (baseline first), each
    run its own process and its own Ray, one at a time (32 tabs of each at once would not fit a
    small host); the ratio this/baseline per metric of each round, and their median."""
    import statistics
    import subprocess

    root = Path(__file__).resolve().parents[1]
    tree, made = _worktree(args.baseline)
    runs: dict[str, list[dict]] = {"baseline": [], "this": []}
    try:
        for rnd in range(args.rounds):
            for side, path in (("baseline", tree), ("this", root)):
                out = Path(tempfile.gettempdir()) / f"bench-tabs32-{side}-{os.getpid()}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "tabs32", "--tabs", str(args.tabs), "--tree", str(path),
                       "--json-out", str(out), *[f"--env={kv}" for kv in args.env]]
                print(f"round {rnd + 1}/{args.rounds}, {side}: {' '.join(cmd)}", file=sys.stderr, flush=True)
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                runs[side].append(json.loads(out.read_text()))
                out.unlink()
    finally:
        if made:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tree)], capture_output=True)
    figures = {}
    for name, get in COMPARED.items():
        old = [get(r) for r in runs["baseline"]]
        new = [get(r) for r in runs["this"]]
        ratios = [n / o for n, o in zip(new, old) if o]
        figures[name] = {"baseline": old, "this": new, "ratio_this_over_baseline": [round(x, 3) for x in ratios],
                         "ratio_median": round(statistics.median(ratios), 3) if ratios else None}
    out = {"baseline": args.baseline, "tabs": args.tabs, "rounds": args.rounds, "figures": figures,
           "weight_mb_sent": {side: [r.get("weight_mb_sent") for r in runs[side]] for side in runs},
           "load_avg": [r["load_avg"] for side in ("baseline", "this") for r in runs[side]],
           "imported_from": {side: runs[side][0]["imported_from"] for side in runs}, "runs": runs}
    from tabshard.bench_history import Figure, append_figures

    append_figures([Figure.of(f"sim.tabs{args.tabs}.{name}_over_{args.baseline}", f["ratio_this_over_baseline"], "×", "lower")
                    for name, f in figures.items() if f["ratio_this_over_baseline"]]
                   + [Figure.of(f"sim.tabs{args.tabs}.{name}", f["this"], "MB", "lower") for name, f in figures.items()],
                   "bench_simulation")
    return out


# ---------------------------------------------------------------------- 1,000 heartbeat-only connections
def _client_proc(url: str, token: str, first: int, count: int, seconds: float, ramp_s: float, q, stop=None) -> None:
    """`count` heartbeat-only connections, beating on absolute deadlines until `stop` (an
    mp.Event the parent sets after its last /status poll) or `seconds` at most: a fixed
    lifetime per connection ended the first-joined ones inside the measured window, and the
    coordinator rightly declared them dead (counted as false detections before)."""
    import websockets

    from protocol import wire

    stats = {"connected": 0, "closed_by_coordinator": 0, "close_reasons": [], "heartbeats": 0, "late_beats": 0}

    async def one(i: int):
        await asyncio.sleep(ramp_s * (i - first) / max(count, 1))
        async with websockets.connect(url, compression=None, ping_interval=None, open_timeout=60) as ws:
            await ws.send(wire.encode(wire.make("hello", worker_name=f"hb-{i}", token=token,
                                                capabilities={"memory_bytes": 1, "kind": "heartbeat-only"})))
            stats["connected"] += 1
            period = 0.25
            end = time.monotonic() + seconds

            async def reader():
                async for data in ws:
                    m = wire.decode(data)
                    if m["type"] == "welcome":
                        nonlocal period
                        period = m["heartbeat_ms"] / 1000

            rt = asyncio.create_task(reader())
            seq = 0
            nxt = time.monotonic()
            try:
                while time.monotonic() < end and not rt.done() and not stopping.is_set():
                    nxt += period
                    await asyncio.sleep(max(0.0, nxt - time.monotonic()))
                    if time.monotonic() - nxt > 0.2:
                        stats["late_beats"] += 1
                    seq += 1
                    await ws.send(wire.encode(wire.make("heartbeat", seq=seq, load={"steps": 0, "ranges": []})))
                    stats["heartbeats"] += 1
            except websockets.ConnectionClosed:
                pass
            if rt.done():
                stats["closed_by_coordinator"] += 1
                if ws.close_reason:
                    stats["close_reasons"].append(ws.close_reason)
            rt.cancel()

    stopping = asyncio.Event()

    async def watch_stop():
        while stop is not None and not stop.is_set():
            await asyncio.sleep(0.5)
        stopping.set()

    async def main():
        watcher = asyncio.create_task(watch_stop()) if stop is not None else None
        await asyncio.gather(*(one(i) for i in range(first, first + count)), return_exceptions=True)
        if watcher:
            watcher.cancel()

    asyncio.run(main())
    q.put(stats)


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> tuple[float, float]:
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return rss, hwm


def conns1000(args) -> dict:
    from simulation.runtime import CoordinatorProcess, EventLog

    with CoordinatorProcess(["--no-coordinator-compute", "--heartbeat-ms", "250"], log_path="/tmp/conns1000-coordinator.log") as coord:
        pid = coord.proc.pid
        rss_idle, _ = _rss_mb(pid)
        q = mp.Queue()
        stop = mp.Event()
        per = args.conns // args.procs
        # connections beat until told to stop (bounded by the whole run's length plus slack)
        procs = [mp.Process(target=_client_proc, args=(coord.worker_url, coord.token, i * per, per, args.seconds + args.ramp + 180,
                                                      args.ramp, q, stop)) for i in range(args.procs)]
        for p in procs:
            p.start()
        # /status lists every worker: poll it seldom, or the poll itself loads the coordinator's loop
        deadline = time.monotonic() + args.ramp + 120
        while True:
            time.sleep(2)
            st = coord.status()
            joined = sum(1 for w in st["workers"] if w["state"] not in ("dead", "quarantined"))
            print(json.dumps({"ramp": True, "joined": joined, "dead": len(st["workers"]) - joined}), file=sys.stderr, flush=True)
            if joined >= args.conns or time.monotonic() > deadline:
                break
        t0, cpu0, load0 = time.monotonic(), _cpu_s(pid), os.getloadavg()
        log = EventLog()
        samples = []
        while time.monotonic() - t0 < args.seconds:
            time.sleep(10)
            st = coord.status()
            log.absorb(st)
            alive = sum(1 for w in st["workers"] if w["state"] not in ("dead", "quarantined"))
            samples.append({"t": round(time.monotonic() - t0), "alive": alive, "rss_mb": round(_rss_mb(pid)[0], 1),
                            "max_heartbeat_age_ms": max((w["heartbeat_age_ms"] for w in st["workers"]
                                                        if w["state"] not in ("dead", "quarantined")), default=None)})
            print(json.dumps(samples[-1]), file=sys.stderr, flush=True)
        wall, cpu = time.monotonic() - t0, _cpu_s(pid) - cpu0
        final = coord.status()
        log.absorb(final)
        stop.set()
        stats = [q.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
        rss, hwm = _rss_mb(pid)
    deaths = [e for e in log.sorted() if e["kind"] in ("death", "silent") and e["t"] >= t0]
    return {"connections": args.conns, "processes": args.procs, "held_s": round(wall, 1), "heartbeat_ms": 250,
            "host_load_avg": {"start": [round(x, 2) for x in load0], "end": [round(x, 2) for x in os.getloadavg()]},
            # every connection is healthy by construction: each one declared dead is a false detection
            # (the event window in /status holds only the last 50, so count the survivors instead)
            "false_detections": args.conns - sum(1 for w in final["workers"] if w["state"] not in ("dead", "quarantined")),
            "death_events_seen_in_polls": sum(1 for e in deaths if e["kind"] == "death"),
            "alive_at_end": sum(1 for w in final["workers"] if w["state"] not in ("dead", "quarantined")),
            "closed_by_coordinator": sum(s["closed_by_coordinator"] for s in stats),
            "heartbeats_sent": sum(s["heartbeats"] for s in stats), "late_beats_client_side": sum(s["late_beats"] for s in stats),
            "coordinator_cpu_percent_of_one_core": round(100 * cpu / wall, 1),
            "coordinator_rss_mb": {"idle_before": round(rss_idle, 1), "end": round(rss, 1), "peak": round(hwm, 1)},
            "max_heartbeat_age_ms_seen": max(s["max_heartbeat_age_ms"] for s in samples) if samples else None}


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("tabs32")
    a.add_argument("--tabs", type=int, default=32)
    a.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="set in this process before Ray starts, so every tab inherits it (e.g. MALLOC_ARENA_MAX=2, "
                        "TABSHARD_CPU_THREADS=1); repeatable")
    a.add_argument("--baseline", metavar="REV", help="also measure this git revision (a worktree), alternating with this "
                   "checkout, and report the ratios")
    a.add_argument("--rounds", type=int, default=2, help="with --baseline: runs of each checkout")
    a.add_argument("--tree", metavar="PATH", help="measure the checkout at PATH (used by --baseline)")
    a.add_argument("--json-out", metavar="PATH", help="write the result here instead of sim-out/")
    a.add_argument("--min-available-mb", type=int, default=4096,
                   help="stop the run when the host's available memory falls below this (a shared host)")
    b = sub.add_parser("conns1000")
    b.add_argument("--conns", type=int, default=1000)
    b.add_argument("--procs", type=int, default=4)
    b.add_argument("--seconds", type=float, default=300)
    b.add_argument("--ramp", type=float, default=60)
    args = p.parse_args()
    out = {"tabs32": tabs32, "conns1000": conns1000}[args.cmd](args)
    if getattr(args, "json_out", None):
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    else:
        Path("sim-out").mkdir(exist_ok=True)
        Path(f"sim-out/bench-{args.cmd}.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
