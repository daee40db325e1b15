"""The CI smoke scenario on real (local) Ray: 5 simulated tabs, 4 faults, exact tokens, a report."""
import json
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
    assert next(f for f in faults if f["kind"] == "memory")["detected_by"].startswith("refused"), faults
    assert json.loads((tmp_path / "report.json").read_text())["passed"]
    assert (tmp_path / "timeline.png").stat().st_size > 1000
    # numpy and wgpu (lavapipe here) tabs both served a stage
    backends = {t.get("backend") for t in report["tabs"]["per_tab"].values() if t.get("steps", 0) > 0}
    assert {"numpy", "wgpu"} <= backends, report["tabs"]
