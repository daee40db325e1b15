"""The scenario report: JSON, a terminal table, PNG plots (throughput and latency over time,
fault markers). A scenario passes when no request is lost and no token differs from the
fault-free reference."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from simulation.scenario import DETECTION_EVENTS


def _pct(values, qs=(50, 90, 99)) -> dict:
    if not values:
        return {f"p{q}": None for q in qs}
    a = np.asarray(values) * 1000
    return {f"p{q}": round(float(np.percentile(a, q)), 2) for q in qs}


def _fault_metrics(run, events: list[dict]) -> list[dict]:
    out = []
    for f in run.faults:
        rec = {k: f.get(k) for k in ("at", "kind", "tab", "duration", "factor", "stages", "skipped", "inject_error", "churn")
               if f.get(k) is not None}
        wids = set(f.get("worker_ids") or [])
        if not f.get("churn") and not wids and f.get("tab"):
            wids = {e.get("worker") for e in events if e["kind"] == "join" and e.get("name") == f["tab"]}
        det = next((e for e in events if e["t"] >= f["t"] - 0.05 and e["kind"] in DETECTION_EVENTS
                    and e.get("worker") in wids), None) if wids else None
        if det:
            rec["detected_by"] = det["kind"] + (f" ({det['reason']})" if det.get("reason") else "")
            rec["detection_s"] = round(det["t"] - f["t"], 4)
            rec_ev = next((e for e in events if e["t"] >= det["t"] and e["kind"] == "recovered"), None)
            if rec_ev:
                rec["recovery_s"] = round(rec_ev["t"] - det["t"], 4)
        else:
            # a tab that served no stage (or a slow-down with no step in flight) changes nothing to detect
            rec["detected_by"] = None
        out.append(rec)
    return out


def build_report(run, t0: float, startup_s: float, final: dict, coord_rss: int) -> dict:
    from simulation.workload import Reference, differing_tokens

    scn = run.scn
    ref = Reference.shared(scn.get("coordinator", {}).get("model"))
    events = run.events.sorted()
    results = sorted(run.results, key=lambda r: r.request_id)
    completed = [r for r in results if r.error is None and r.finish_reason]
    failed = [r for r in results if r.error is not None]
    n_requested = int(scn["workload"]["requests"])
    lost = n_requested - len(completed) - len(failed)
    differ = 0
    for r in results:
        want = ref.tokens(r.prompt, r.max_tokens)
        differ += differing_tokens(r.ids, want) if r in completed else differing_tokens(r.ids, want[:len(r.ids)])
    times = sorted(t for r in results for t in r.times)
    span = (times[-1] - min(r.submitted for r in results)) if times else 0.0
    faults = _fault_metrics(run, events)
    det = [f["detection_s"] for f in faults if "detection_s" in f]
    recov = [f["recovery_s"] for f in faults if "recovery_s" in f]
    tabs = {n: {"profile": run.tabs[n].profile.name, "backend": run.tabs[n].backend, "hidden": run.tabs[n].hidden,
                "memory_budget_mb": round(run.tabs[n].memory_bytes / 2**20, 1),
                **({"peak_rss_mb": round(i["peak_rss_bytes"] / 2**20, 1), "held_weights_mb": round(i["held_bytes"] / 2**20, 1),
                    "steps": i["steps"], "rejoins": max(0, i["sessions_joined"] - 1)} if "peak_rss_bytes" in i else i)}
            for n, i in run.tab_info.items()}
    for n in run.tabs:
        tabs.setdefault(n, {"profile": run.tabs[n].profile.name, "gone": True})
    report = {
        "scenario": scn["name"],
        "seed": scn["seed"],
        "startup_s": round(startup_s, 2),
        "tabs": {"started": len(run.tabs), "alive_at_end": len(run._alive()), "per_tab": tabs},
        "requests": {"requested": n_requested, "completed": len(completed), "failed": len(failed), "lost": lost,
                     "errors": sorted({r.error[:120] for r in failed})},
        "tokens": {"total": len(times), "per_s": round(len(times) / span, 2) if span else 0.0,
                   "differing_from_reference": differ},
        "latency_ms": {"ttft": _pct([r.ttft for r in results if r.ttft is not None]),
                       "itl": _pct([x for r in results for x in r.itl])},
        "faults": {"injected": sum(1 for f in faults if "skipped" not in f), "skipped": sum(1 for f in faults if "skipped" in f),
                   "detected": len(det), "detection_ms": _pct(det), "recovery_ms": _pct(recov), "list": faults},
        "coordinator": {"peak_rss_mb": round(coord_rss / 2**20, 1), "counters": final["counters"]},
        "memory": {"tabs_peak_rss_mb_total": round(sum(t.get("peak_rss_mb", 0) for t in tabs.values()), 1)},
        "timeline": {"t0": t0, "tokens": [round(t - t0, 3) for t in times],
                     "itl": [[round(b - t0, 3), round(b - a, 4)] for r in results for a, b in zip(r.times, r.times[1:])],
                     "ttft": [[round(r.times[0] - t0, 3), round(r.ttft, 4)] for r in results if r.times],
                     "faults": [[round(f["t"] - t0, 3), f["kind"]] for f in run.faults if f.get("tab")]},
    }
    report["passed"] = lost == 0 and differ == 0
    out = Path(run.out_dir)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    try:
        report["plots"] = plot(report, out)
    except ImportError:
        report["plots"] = "matplotlib is not installed: no PNG"
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def plot(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = report["timeline"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    toks = np.asarray(tl["tokens"])
    if toks.size:
        bins = np.arange(0, max(1.0, toks.max()) + 1.0, 1.0)
        counts, edges = np.histogram(toks, bins)
        ax1.step(edges[:-1], counts, where="post")
    ax1.set_ylabel("tokens/s")
    if tl["itl"]:
        a = np.asarray(tl["itl"])
        ax2.plot(a[:, 0], a[:, 1] * 1000, ".", ms=3, label="inter-token")
    if tl["ttft"]:
        a = np.asarray(tl["ttft"])
        ax2.plot(a[:, 0], a[:, 1] * 1000, "x", ms=5, label="time to first token")
    ax2.set_yscale("log")
    ax2.set_ylabel("latency (ms)")
    ax2.set_xlabel("time (s)")
    ax2.legend(loc="upper right", fontsize=8)
    colors = {"crash": "red", "freeze": "blue", "slow": "orange", "partition": "purple", "evict": "brown", "memory": "green"}
    for t, kind in tl["faults"]:
        for ax in (ax1, ax2):
            ax.axvline(t, color=colors.get(kind, "gray"), alpha=0.5, lw=1)
    ax1.set_title(f"{report['scenario']}: throughput and latency (vertical lines: faults)")
    fig.tight_layout()
    path = out / "timeline.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [str(path)]


def format_table(r: dict) -> str:
    rows = [
        ("scenario", r["scenario"]),
        ("tabs started / alive", f"{r['tabs']['started']} / {r['tabs']['alive_at_end']}"),
        ("startup", f"{r['startup_s']} s"),
        ("requests completed / failed / lost", f"{r['requests']['completed']} / {r['requests']['failed']} / {r['requests']['lost']}"),
        ("tokens (total, per s)", f"{r['tokens']['total']}, {r['tokens']['per_s']}"),
        ("tokens differing from reference", r["tokens"]["differing_from_reference"]),
        ("TTFT p50/p90/p99 ms", "/".join(str(v) for v in r["latency_ms"]["ttft"].values())),
        ("ITL p50/p90/p99 ms", "/".join(str(v) for v in r["latency_ms"]["itl"].values())),
        ("faults injected / detected", f"{r['faults']['injected']} / {r['faults']['detected']}"),
        ("detection p50/p90/p99 ms", "/".join(str(v) for v in r["faults"]["detection_ms"].values())),
        ("recovery p50/p90/p99 ms", "/".join(str(v) for v in r["faults"]["recovery_ms"].values())),
        ("tabs' peak RSS total", f"{r['memory']['tabs_peak_rss_mb_total']} MiB"),
        ("coordinator peak RSS", f"{r['coordinator']['peak_rss_mb']} MiB"),
        ("result", "PASS" if r["passed"] else "FAIL (a request lost or a token differs)"),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k:<{w}}  {v}" for k, v in rows]
    faults = r["faults"]["list"]
    if faults:
        lines.append("")
        lines.append(f"{'t (s)':>7} {'fault':<10} {'tab':<26} {'detected by':<40} {'detect ms':>9} {'recover ms':>10}")
        for f in faults[:40]:
            lines.append(f"{f.get('at', 0):7.1f} {f['kind']:<10} {str(f.get('tab')):<26} {str(f.get('detected_by'))[:40]:<40} "
                         f"{(f.get('detection_s') or 0) * 1000:9.0f} {(f.get('recovery_s') or 0) * 1000:10.0f}")
        if len(faults) > 40:
            lines.append(f"... {len(faults) - 40} more in report.json")
    return "\n".join(lines)
