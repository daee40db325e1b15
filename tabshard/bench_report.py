"""The benchmark report: one self-contained HTML file (inline SVG, no scripts, no network) with
every metric's history (flagged points marked), ratios against the anchors we track, and the
browser compatibility matrix."""
from __future__ import annotations

import html
import math
from pathlib import Path

from tabshard.bench_history import History, MAD_TO_SIGMA

# Anchors: (our metric, what it is compared with, the anchor's value or metric, source, better)
# A metric name as the anchor value means "measured in the same run"; a number is a figure
# measured elsewhere and recorded in the notes (its source says where).
ANCHORS = [
    ("worker.numpy.decode_step_ms", "llama.cpp on this CPU (decode tok/s, same GGUF, same threads)",
     "anchor.llama_cpp.decode_tok_s", "measured in the same run when llama-cpp-python runs here", "tok/s"),
    ("gpu.wgpu.decode_tok_s", "HF transformers eager fp32 on an H100 (one stream)", 52.0,
     "measured on the project's H100", "tok/s"),
    ("hop.rtt_p50_ms", "per-hop target (≤ 0.2 ms; exo TCP ~0.3 ms)", 0.2, "the project's anchors", "ms"),
    ("cluster.sharding_ratio_4_over_1", "llama.cpp RPC local sharding 0.95× (target ≥ 0.9×)", 0.95, "the project's anchors", "×"),
    ("cluster.sharding_ratio_2_over_1", "llama.cpp RPC local sharding 0.95× (target ≥ 0.9×)", 0.95, "the project's anchors", "×"),
    ("faults.kill_detect_ms", "Ray actor death seen by callers ~10 ms; target ≤ 100 ms for a closed socket", 100.0, "the project's anchors", "ms"),
    ("faults.freeze_detect_ms", "Petals 15 s, Ray 15-20 s; target ≤ 1 s for a silent tab", 1000.0, "the project's anchors", "ms"),
    ("faults.kill_recover_ms", "resume within 2 s (no anchor recovers reliably)", 2000.0, "the project's anchors", "ms"),
    ("codec.tensor_roundtrip_gbps_16mb", "naive msgpack 0.26 GB/s (target ≥ 3 GB/s)", 0.26, "the project's anchors", "GB/s"),
    ("codec.tensor_roundtrip_gbps_64mb", "naive msgpack 0.26 GB/s (target ≥ 3 GB/s)", 0.26, "the project's anchors", "GB/s"),
]

CSS = """body{font:13px/1.45 system-ui,sans-serif;margin:24px;color:#1d2330;background:#f7f8fa}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}h3{font-size:13px;margin:0 0 4px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:12px}
.card{background:#fff;border:1px solid #e3e6ec;border-radius:8px;padding:10px 12px}
table{border-collapse:collapse;background:#fff;width:100%}th,td{border-bottom:1px solid #e3e6ec;padding:4px 8px;text-align:left;vertical-align:top}
th{font-size:11px;text-transform:uppercase;color:#6b7385}.num{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#6b7385}.bad{color:#c53030;font-weight:600}.ok{color:#1f9d55;font-weight:600}.imp{color:#2563eb;font-weight:600}
.legend span{margin-right:14px}"""


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.4g}"


def sparkline(points: list[dict], width: int = 340, height: int = 110) -> str:
    """SVG: each run's median, a band of center ± k·noise where judged, flagged points marked."""
    if not points:
        return ""
    vals = [p["value"] for p in points]
    lo_band = [p["center"] - 4 * p["noise"] for p in points if p["center"] is not None]
    hi_band = [p["center"] + 4 * p["noise"] for p in points if p["center"] is not None]
    lo, hi = min(vals + lo_band), max(vals + hi_band)
    if hi - lo < 1e-12:
        lo, hi = lo - 1, hi + 1
    pad = 0.08 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    n = len(points)
    x = lambda i: 30 + (width - 40) * (i / max(1, n - 1))  # noqa: E731
    y = lambda v: 8 + (height - 24) * (1 - (v - lo) / (hi - lo))  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<text x="2" y="{y(hi - pad) + 4:.1f}" font-size="9" fill="#6b7385">{_fmt(hi - pad)}</text>',
             f'<text x="2" y="{y(lo + pad) + 4:.1f}" font-size="9" fill="#6b7385">{_fmt(lo + pad)}</text>']
    for i, p in enumerate(points):  # the noise band each point was judged against
        if p["center"] is not None:
            top, bot = y(p["center"] + 4 * p["noise"]), y(p["center"] - 4 * p["noise"])
            parts.append(f'<rect x="{x(i) - 3:.1f}" y="{top:.1f}" width="6" height="{max(1, bot - top):.1f}" fill="#dfe5ff"/>')
    path = " ".join(f"{'M' if i == 0 else 'L'}{x(i):.1f},{y(v):.1f}" for i, v in enumerate(vals))
    parts.append(f'<path d="{path}" fill="none" stroke="#4b6bfb" stroke-width="1.5"/>')
    for i, p in enumerate(points):
        color = {"regression": "#c53030", "improvement": "#2563eb"}.get(p["verdict"], "#4b6bfb")
        r = 4.5 if p["verdict"] in ("regression", "improvement") else 2.5
        spread = MAD_TO_SIGMA * (p["spread"] or 0)
        if spread:
            parts.append(f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{y(p["value"] + spread):.1f}" y2="{y(p["value"] - spread):.1f}" stroke="#9aa3b5"/>')
        title = html.escape(f"{p['date']} {str(p['commit_sha'] or '?')[:10]}: {_fmt(p['value'])} ({p['verdict']})")
        parts.append(f'<circle cx="{x(i):.1f}" cy="{y(p["value"]):.1f}" r="{r}" fill="{color}" class="pt {p["verdict"]}"><title>{title}</title></circle>')
    parts.append(f'<text x="30" y="{height - 2}" font-size="9" fill="#6b7385">{html.escape(points[0]["date"][:10])}</text>')
    parts.append(f'<text x="{width - 10}" y="{height - 2}" font-size="9" fill="#6b7385" text-anchor="end">{html.escape(points[-1]["date"][:10])}</text>')
    return "".join(parts) + "</svg>"


def _latest(h: History, metric: str, fp: str | None) -> dict | None:
    s = h.series(metric, fp)
    return s[-1] if s else None


def render(db: str) -> str:
    from tabshard.compat_matrix import matrix

    h = History(db)
    try:
        runs = h.runs()
        last = runs[-1] if runs else None
        fp = last["fingerprint"] if last else None
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>tabshard benchmarks</title><style>{CSS}</style></head><body>",
               "<h1>tabshard benchmarks</h1>"]
        if last:
            out.append(f"<p>{len(runs)} runs; newest {html.escape(last['date'])}, commit <code>{html.escape(str(last['commit_sha'])[:12])}"
                       f"{' (dirty)' if last['dirty'] else ''}</code>, machine <code>{html.escape(fp)}</code>: "
                       f"{html.escape(last['machine'])}</p>")
        # newest verdicts
        flagged = [f for f in (h.verdicts(last["id"]) if last else []) if f["verdict"] in ("regression", "improvement")]
        out.append("<h2>Newest run</h2>")
        out.append("<p>" + (", ".join(f"<span class='{'bad' if f['verdict'] == 'regression' else 'imp'}'>{html.escape(f['metric'])}: "
                                      f"{f['verdict']} (z {f['z']:+.1f})</span>" for f in flagged) or
                            "<span class='ok'>no figure outside its noise band</span>") + "</p>")
        out.append("<p class='muted legend'>Each point: one run's median on this machine (grey bar ±1.48·MAD of its repeats); "
                   "light band: the history's median ± 4·noise it was judged against (see tabshard/bench_history.py); "
                   "<span class='bad'>● regression</span><span class='imp'>● improvement</span></p>")
        # anchors
        out.append("<h2>Against the anchors</h2><table><tr><th>ours</th><th class='num'>value</th><th>anchor</th>"
                   "<th class='num'>anchor value</th><th class='num'>ours / anchor</th><th>source</th></tr>")
        for metric, what, anchor, source, unit in ANCHORS:
            ours = _latest(h, metric, fp)
            if isinstance(anchor, str):
                a = _latest(h, anchor, fp)
                a_val = a["value"] if a else None
            else:
                a_val = anchor
            if ours is None:
                continue
            value = ours["value"]
            if metric.endswith("decode_step_ms") and unit == "tok/s":  # compare like with like
                value, shown = 1000 / value, f"{1000 / ours['value']:.4g} tok/s"
            else:
                shown = f"{_fmt(value)} {html.escape(ours['unit'] or '')}"
            ratio = f"{value / a_val:.2f}×" if a_val else "not measured here"
            out.append(f"<tr><td>{html.escape(metric)}</td><td class='num'>{shown}</td><td>{html.escape(what)}</td>"
                       f"<td class='num'>{_fmt(a_val)} {html.escape(unit)}</td><td class='num'>{ratio}</td><td class='muted'>{html.escape(source)}</td></tr>")
        out.append("</table>")
        # history per metric
        out.append("<h2>History per metric</h2><div class='grid'>")
        for metric in h.metrics():
            pts = h.series(metric, fp) or h.series(metric)
            p = pts[-1]
            tag = {"regression": "<span class='bad'>regression</span>", "improvement": "<span class='imp'>improved</span>",
                   "ok": "<span class='ok'>ok</span>", "new": "<span class='muted'>too little history</span>"}.get(p["verdict"], "")
            out.append(f"<div class='card metric' data-metric='{html.escape(metric)}'><h3>{html.escape(metric)}</h3>"
                       f"<div class='muted'>{_fmt(p['value'])} {html.escape(p['unit'] or '')} ({'higher' if p['better'] == 'higher' else 'lower'} is better), "
                       f"{len(pts)} runs, {tag}</div>{sparkline(pts)}</div>")
        out.append("</div>")
        # compatibility
        m = matrix(db)
        out.append("<h2>Browser compatibility matrix</h2><table><tr>" + "".join(f"<th>{html.escape(c['label'])}</th>" for c in m["columns"]) + "</tr>")
        for r in m["rows"]:
            out.append("<tr>" + "".join(f"<td class='{r.get('_class', {}).get(c['key'], '')}'>{html.escape(str(r[c['key']]))}</td>"
                                        for c in m["columns"]) + "</tr>")
        out.append(f"</table><p class='muted'>{html.escape(m.get('note', ''))}</p></body></html>")
        return "\n".join(out)
    finally:
        h.close()


def write_report(db: str, out: str | Path = "report.html") -> Path:
    path = Path(out)
    path.write_text(render(str(db)), encoding="utf-8")
    return path
