"""The CI smoke scenario on real (local) Ray: 5 simulated tabs, 4 faults, exact tokens, a report."""
import asyncio
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from simulation.report import format_table  # noqa: E402
from simulation.scenario import fault_schedule, load_scenario, run_scenario  # noqa: E402
from protocol.errors import ConfigError  # noqa: E402

SCENARIOS = Path(__file__).resolve().parents[1] / "simulation" / "scenarios"


def test_shipped_scenarios_parse_and_chaos_has_100_faults():
    for p in SCENARIOS.glob("*.toml"):
        load_scenario(p)
    assert len(fault_schedule(load_scenario(SCENARIOS / "chaos.toml"))) >= 100
    with pytest.raises(ConfigError, match="unknown profile"):
        run_scenario({"tabs": [{"profile": "netscape"}]})
    with pytest.raises(ConfigError, match="unknown profile"):
        run_scenario({"tabs": [{"profile": "cpu-wasm"}], "faults": [{"at": 1, "kind": "crash", "target": "profile:netscape"}]})


def test_smoke_scenario_passes_with_exact_tokens(ray_rt, tmp_path):
    report = run_scenario(SCENARIOS / "smoke.toml", out_dir=tmp_path, progress=lambda *a, **k: None)
    print(format_table(report))
    assert report["passed"], format_table(report)
    assert report["requests"]["lost"] == 0 and report["requests"]["failed"] == 0
    assert report["tokens"]["differing_from_reference"] == 0
    faults = report["faults"]["list"]
    assert len(faults) == 4 and all(f.get("detected_by") for f in faults)
    crashed = next(f for f in faults if f["kind"] == "crash")["tab"]
    assert report["tabs"]["per_tab"][crashed]["profile"] == "cpu-wasm"  # target "profile:cpu-wasm"
    # a dead tab (crash, freeze, partition) is found within the heartbeat's second; a tab under
    # memory pressure hands its layers back itself, after the step it is running (on a busy
    # 2-core host a lavapipe step can take a second), so its refusal's time is the tab's, not
    # the coordinator's detection
    assert all(f["detection_s"] < 1.2 for f in faults if f["kind"] != "memory"), faults
    memory = next(f for f in faults if f["kind"] == "memory")
    # injected (an injection that failed is counted, and passed, as unexercised), and the tab
    # handed back the range the coordinator saw refused
    assert "inject_error" not in memory and memory["refused"] >= 1 and memory["detected_by"].startswith("refused"), faults
    assert json.loads((tmp_path / "report.json").read_text())["passed"]
    assert (tmp_path / "timeline.png").stat().st_size > 1000
    # numpy and wgpu (lavapipe here) tabs both served a stage
    backends = {t.get("backend") for t in report["tabs"]["per_tab"].values() if t.get("steps", 0) > 0}
    assert {"numpy", "wgpu"} <= backends, report["tabs"]
    # each tab is its own device: the coordinator saw each connect from its own address
    tabs = report["tabs"]["per_tab"]
    seen = {w["name"]: w["address"] for w in json.loads((tmp_path / "run.json").read_text())["final_status"]["workers"]
            if not w["local"]}
    assert seen and all(seen[n] == tabs[n]["address"] for n in seen), (seen, tabs)
    assert len({t["address"] for t in tabs.values()}) == len(tabs) == 6, tabs


def test_a_fault_whose_injection_waits_on_its_tab_holds_back_no_later_fault(tmp_path):
    """Memory pressure runs after its tab's step in progress, which a slow-down can stretch past
    a minute: the schedule goes on meanwhile (the next fault lands at its time), a failed
    injection is recorded on its fault, and the schedule ends once every injection has."""
    import threading
    from types import SimpleNamespace

    from simulation.scenario import ScenarioRun

    scn = {"seed": 3, "faults": [{"at": 0.0, "kind": "memory", "target": "busy-0"},
                                 {"at": 0.2, "kind": "crash", "target": "idle-1"},
                                 {"at": 0.3, "kind": "partition", "target": "busy-0", "duration": 1.0}]}
    run = ScenarioRun(scn, out_dir=tmp_path)
    run.tabs = {n: SimpleNamespace(profile=SimpleNamespace(name="cpu-wasm")) for n in ("busy-0", "idle-1")}
    st = {"workers": [{"worker_id": "w0", "name": "busy-0", "stages": [0], "state": "ready"},
                      {"worker_id": "w1", "name": "idle-1", "stages": [], "state": "ready"}],
          "stages": [{"holders": ["w0"], "pipeline": 0}], "sessions": []}
    release, injected = threading.Event(), {}

    def inject(f, name):
        injected[f["kind"]] = time.monotonic()
        if f["kind"] == "memory":  # the tab's compute thread is busy: no answer for a while, then a timeout
            release.wait(10)
            raise TimeoutError("no answer within 60 s")

    run._inject = inject

    async def status():
        return st

    async def main():
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        schedule = asyncio.create_task(run._faults_on_schedule(loop, t0, status))
        await asyncio.sleep(1.0)
        assert not schedule.done()  # the memory injection still waits on its tab
        late = {k: round(v - t0, 2) for k, v in injected.items()}
        release.set()
        await asyncio.wait_for(schedule, 5)
        return t0, late

    t0, late = asyncio.run(main())
    assert late["crash"] < 0.6 and late["partition"] < 0.7, late
    recs = {f["kind"]: f for f in run.faults}
    assert [f["kind"] for f in run.faults] == ["memory", "crash", "partition"]
    assert recs["memory"]["inject_error"].startswith("TimeoutError") and "inject_error" not in recs["crash"]
    assert recs["crash"]["t"] - t0 < 0.6 and recs["crash"]["worker_ids"] == ["w1"]
    # marked before the next fault picks its target, not when its injection got round to it
    assert run._disturbed["busy-0"] >= recs["partition"]["t"] + 1.0
    run._pool.shutdown(), run._fault_pool.shutdown()


def test_random_fault_targets_are_tabs_that_can_show_the_fault(tmp_path):
    """A random target is a tab the coordinator knows (a respawn still starting has nothing to
    detect a crash by) and, for a slow-down or a lie, a primary of a pipeline carrying a session
    (a standby or an idle replica computes nothing to slow or to check); profile:NAME keeps to
    that profile. From /status as the runner polls it, no Ray needed."""
    from types import SimpleNamespace

    from simulation.scenario import ScenarioRun

    run = ScenarioRun({"seed": 3}, out_dir=tmp_path)
    profiles = {"idle-0": "cpu-wasm", "busy-1": "cpu-wasm", "standby-2": "cpu-wasm", "new-3": "cpu-wasm", "gpu-4": "chromium-swiftshader"}
    run.tabs = {n: SimpleNamespace(profile=SimpleNamespace(name=p)) for n, p in profiles.items()}
    st = {"workers": [{"worker_id": "w0", "name": "idle-0", "stages": [0], "state": "ready"},
                      {"worker_id": "w1", "name": "busy-1", "stages": [1], "state": "ready"},
                      {"worker_id": "w2", "name": "standby-2", "stages": [1], "state": "ready"},
                      {"worker_id": "w4", "name": "gpu-4", "stages": [2], "state": "ready"}],
          "stages": [{"holders": ["w0"], "pipeline": 0}, {"holders": ["w1", "w2"], "pipeline": 1},
                     {"holders": ["w4"], "pipeline": 1}],
          "sessions": [{"request_id": "r", "pipeline": 1}]}
    for kind in ("slow", "liar"):
        assert {run._target({"kind": kind, "target": "random"}, st) for _ in range(20)} == {"busy-1", "gpu-4"}
    crashed = {run._target({"kind": "crash", "target": "random"}, st) for _ in range(40)}
    assert "new-3" not in crashed and crashed == {"idle-0", "busy-1", "standby-2", "gpu-4"}
    assert {run._target({"kind": "slow", "target": "profile:cpu-wasm"}, st) for _ in range(20)} == {"busy-1"}
    # a pipeline held up by an earlier fault (its other primary slowed, or suspected) sends no
    # step to slow: a slow-down or a lie goes to a pipeline that computes
    st2 = {"workers": [{"worker_id": f"w{i}", "name": n, "stages": [i], "state": "ready"}
                       for i, n in enumerate(["idle-0", "busy-1", "standby-2", "gpu-4"])],
           "stages": [{"holders": ["w0"], "pipeline": 0}, {"holders": ["w1"], "pipeline": 0},
                      {"holders": ["w2"], "pipeline": 1}, {"holders": ["w3"], "pipeline": 1}],
           "sessions": [{"request_id": "r", "pipeline": 0}, {"request_id": "q", "pipeline": 1}]}
    run._disturbed = {"busy-1": time.monotonic() + 60}
    assert {run._target({"kind": "slow", "target": "random"}, st2) for _ in range(20)} == {"standby-2", "gpu-4"}
    run._disturbed, st2["workers"][3]["state"] = {}, "suspect"
    assert {run._target({"kind": "liar", "target": "random"}, st2) for _ in range(20)} == {"idle-0", "busy-1"}
    # every known tab still under an earlier fault: the choice falls back past the calm ones,
    # but never to the tab the coordinator has not seen
    run._disturbed = {n: float("inf") for n in profiles if n != "new-3"}
    assert "new-3" not in {run._target({"kind": "crash", "target": "random"}, st) for _ in range(20)}


def test_each_tab_is_a_device_with_its_own_address(tmp_path, monkeypatch):
    """A scenario's tabs connect from their devices' loopback addresses (the coordinator backs
    joins off per address): one each, one for a same_device entry's tabs, and a replacement
    from its predecessor's device, with its network. No Ray: the tabs are stand-ins."""
    from types import SimpleNamespace

    import actors.tab
    from simulation.scenario import ScenarioRun, device_address

    made = []

    class StandIn:
        def __init__(self, name, url, token, **kw):
            self.name, self.kw = name, kw
            self.profile, self.backend, self.hidden = SimpleNamespace(name=kw["profile"]), kw["backend"], kw["hidden"]
            made.append(self)

        def evict(self, reason):
            pass

    monkeypatch.setattr(actors.tab, "SimulatedTab", StandIn)
    run = ScenarioRun({"seed": 1}, out_dir=tmp_path)
    run.coord = SimpleNamespace(worker_url="ws://127.0.0.1:9/ws/worker", token="t")
    alone, shared = {"profile": "cpu-wasm", "network": "phone-wifi"}, {"profile": "cpu-wasm", "same_device": True}
    tabs = [run._spawn(alone), run._spawn(alone), run._spawn(shared), run._spawn(shared)]
    assert [t.kw["address"] for t in tabs] == ["127.1.0.1", "127.1.0.2", "127.1.0.3", "127.1.0.3"]
    run._replace(tabs[1].name, run._spec_of(tabs[1].name))
    assert made[-1].name not in {t.name for t in tabs}
    assert made[-1].kw["address"] == "127.1.0.2" and made[-1].kw["network"] == "phone-wifi"
    assert run._spawn(shared).kw["address"] == "127.1.0.3" and run._spawn(alone).kw["address"] == "127.1.0.4"
    assert (device_address(253), device_address(254)) == ("127.1.0.254", "127.1.1.1")
    with pytest.raises(ConfigError, match="same_device"):
        run_scenario({"tabs": [{"profile": "cpu-wasm", "same_device": "yes"}]})
    run._pool.shutdown(), run._fault_pool.shutdown()


def test_the_run_ends_once_its_last_fault_has_had_time_to_be_seen(tmp_path):
    """A fault injected just before the workload ends gets DETECTION_WINDOW_S of watching before
    the run stops reading events (chaos seed 6 reported a freeze injected 20 ms before the end as
    undetected); skipped faults and failed injections are not waited for."""
    from simulation.scenario import DETECTION_WINDOW_S, ScenarioRun

    run = ScenarioRun({"seed": 1}, out_dir=tmp_path)
    assert run._detection_wait(100.0) == 0.0
    run.faults = [{"kind": "crash", "t": 90.0}, {"kind": "freeze", "t": 99.5},
                  {"kind": "slow", "t": 99.9, "skipped": "no target"}, {"kind": "slow", "t": 99.9, "inject_error": "TabGone"}]
    assert run._detection_wait(100.0) == pytest.approx(99.5 + DETECTION_WINDOW_S - 100.0)
    assert run._detection_wait(99.5 + DETECTION_WINDOW_S + 1) == 0.0
    run._pool.shutdown(), run._fault_pool.shutdown()


def test_simulate_runs_a_scenario_at_the_seed_asked(tmp_path, monkeypatch):
    """`tabshard simulate SCENARIO --seed N` runs the scenario at seed N; without it, at its own."""
    import simulation.scenario
    from tabshard.cli import build_parser

    ran = []

    def stand_in(scenario, address=None, out_dir=None, progress=None):
        ran.append(load_scenario(scenario) if isinstance(scenario, (str, Path)) else scenario)
        return {"passed": True}

    monkeypatch.setattr(simulation.scenario, "run_scenario", stand_in)
    monkeypatch.setattr("simulation.report.format_table", lambda report: "")
    for extra in (["--seed", "6"], []):
        a = build_parser().parse_args(["simulate", str(SCENARIOS / "chaos.toml"), "--out", str(tmp_path), "--quiet", *extra])
        assert a.func(a) == 0
    assert [r["seed"] for r in ran] == [6, load_scenario(SCENARIOS / "chaos.toml")["seed"]] == [6, 4]
    assert ran[0]["random_faults"] == ran[1]["random_faults"]  # the same scenario otherwise


def test_open_loop_arrivals_are_the_requests_sent_within_the_window():
    """churn at seed 21: the seeded arrivals of 20 requests outran the 60 s window, 16 were sent,
    and the report counted the other 4 lost. Only the requests sent are requested."""
    from simulation.scenario import arrival_offsets

    w = {"requests": 20, "arrival_rate": 0.4}
    sent = arrival_offsets(w, 21, 60.0)
    assert 0 < len(sent) < 20 and sent[0] == 0.0 and sent == sorted(sent) and sent[-1] <= 60.0, sent
    assert arrival_offsets(w, 21, 1e9)[: len(sent)] == sent and len(arrival_offsets(w, 21, 1e9)) == 20


def test_a_tab_closed_by_churn_is_seen_go_like_any_eviction():
    """Churn's evictions were counted injected and never detected (no worker ids recorded): the
    ids its tab joined as are its, and its socket's close detects it."""
    from simulation.report import _fault_metrics

    class Run:
        faults = [{"kind": "evict", "target": "churn", "tab": "a", "t": 10.0, "at": 4.0, "worker_ids": [], "churn": True},
                  {"kind": "evict", "target": "churn", "tab": "b", "t": 14.0, "at": 8.0, "worker_ids": ["w7"], "churn": True}]
        tab_info = {}

    events = [{"t": 1.0, "kind": "join", "worker": "w3", "name": "a"},
              {"t": 10.01, "kind": "death", "worker": "w3", "reason": "socket closed"},
              {"t": 14.02, "kind": "death", "worker": "w7", "reason": "socket closed"}]
    a, b = _fault_metrics(Run(), events)
    assert a["detected_by"] == "death (socket closed)" and b["detected_by"] == "death (socket closed)", (a, b)
