"""`tabshard simulate SCENARIO`: simulated tabs on Ray (local, or an existing cluster with --address)."""
from __future__ import annotations

import sys


def cmd_simulate(a) -> int:
    import os

    # before numpy loads: the reference run in this process shares 2 cores with the tabs, where
    # OpenBLAS's spinning threads made it ~10x slower than one thread (the tabs run one each)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    from simulation.report import format_table
    from simulation.scenario import load_scenario, run_scenario

    def progress(line: str, end: str = "\n") -> None:
        if not a.quiet:
            sys.stderr.write(line + end)
            sys.stderr.flush()

    out = a.out or f"sim-out/{__import__('pathlib').Path(a.scenario).stem}"
    scenario = a.scenario
    if a.seed is not None:  # the same scenario at another seed: other fault times, targets and prompts
        scenario = load_scenario(a.scenario)
        scenario["seed"] = a.seed
    report = run_scenario(scenario, address=a.address, out_dir=out, progress=progress)
    print(format_table(report))
    print(f"report: {out}/report.json  plots: {report.get('plots')}")
    return 0 if report["passed"] else 1


def add_commands(sub) -> None:
    s = sub.add_parser("simulate", help="run a simulated-tab scenario (TOML) on Ray and report")
    s.add_argument("scenario", metavar="SCENARIO", help="a scenario TOML (see simulation/scenarios/)")
    s.add_argument("--address", metavar="RAY_ADDRESS", help="an existing Ray cluster (default: start a local Ray)")
    s.add_argument("--out", metavar="DIR", help="where report.json and the PNG go (default sim-out/NAME)")
    s.add_argument("--seed", type=int, help="run at this seed instead of the scenario's own")
    s.add_argument("--quiet", action="store_true", help="no progress display")
    s.set_defaults(func=cmd_simulate)
