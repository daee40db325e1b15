"""Benchmark history: every figure of every `tabshard bench` run in SQLite, and regression
detection against the recent history of the same machine.

A figure is the median of repeated measurements with its spread (MAD, the median absolute
deviation of the repeats), the git commit, the date and a machine fingerprint (CPU model,
cores, memory, adapter). Figures are only ever compared with figures of the same fingerprint.

The regression rule (`judge`), robust to outliers and scaled by measured noise, not by a fixed
percentage:

    history  = the last `HISTORY` figures of this metric on this fingerprint (at least `MIN_HISTORY`)
    center   = median(history)
    between  = max(1.4826 * MAD(history),         # how much run medians wander between runs:
                   stdev(history without its 10 % farthest from the center))  # (MAD alone is
                                                    # unstable on ~10 points; trimming keeps it robust)
    noise    = max(between * sqrt(1 + 1/n),         # a prediction interval for one new run
                   1.4826 * median(spread of each run, this one included) / sqrt(repeats),
                   EPS * |center|)                  # floor: a perfectly repeatable metric
    z        = (new - center) / noise, signed so that positive is worse
    regression   if z >  K   (K = 4: a robust ~4-sigma band, about 1 false alarm in 15,000 on
    improvement  if z < -K    normal noise; a change inside the band is noise)

1.4826 * MAD estimates a standard deviation for normal noise. The second term keeps a short,
lucky-quiet history from flagging a noisy benchmark; EPS (0.1 %) only keeps the band from
collapsing to zero for deterministic figures.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DB = ROOT / "bench_history.sqlite"
HISTORY = 10
MIN_HISTORY = 3
K = 4.0
EPS = 1e-3
MAD_TO_SIGMA = 1.4826

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, date TEXT NOT NULL, commit_sha TEXT, dirty INTEGER, suite TEXT,
    fingerprint TEXT NOT NULL, machine TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS figures (
    id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES runs(id), metric TEXT NOT NULL,
    value REAL NOT NULL, unit TEXT, better TEXT NOT NULL CHECK (better IN ('higher', 'lower')),
    spread REAL NOT NULL DEFAULT 0, repeats INTEGER NOT NULL DEFAULT 1, samples TEXT,
    fingerprint TEXT NOT NULL, date TEXT NOT NULL, commit_sha TEXT,
    verdict TEXT, z REAL, center REAL, noise REAL
);
CREATE INDEX IF NOT EXISTS figures_by_metric ON figures (fingerprint, metric, id);
CREATE TABLE IF NOT EXISTS compat_runs (
    id INTEGER PRIMARY KEY, run_id INTEGER REFERENCES runs(id), date TEXT NOT NULL, fingerprint TEXT,
    profile TEXT NOT NULL, browser TEXT, source TEXT NOT NULL, adapter TEXT, backend TEXT,
    limits TEXT, kernels_ok TEXT, kernels_failed TEXT, step_ms REAL, detail TEXT
);
"""


# ---------------------------------------------------------------------- machine
def git_commit(root: Path = ROOT) -> tuple[str | None, bool]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                                    text=True, timeout=10).stdout.strip())
        return sha or None, dirty
    except (OSError, subprocess.SubprocessError):
        return None, False


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 0)
    except OSError:
        pass
    return 0.0


def _adapter() -> str:
    """The wgpu adapter this host gives (lavapipe, a GPU) or 'none'; in a child process so a
    broken driver cannot take the benchmark down."""
    code = ("import wgpu; a = wgpu.gpu.request_adapter_sync(power_preference='high-performance'); "
            "i = a.info; print(i.get('device') or i.get('description') or '?', '|', i.get('backend_type', ''))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


def machine(adapter: bool = True) -> dict:
    return {"cpu": _cpu_model(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_gib": _memory_gib(), "adapter": _adapter() if adapter else "not probed",
            "os": f"{platform.system()} {platform.machine()}"}


def fingerprint(m: dict) -> str:
    key = {k: m[k] for k in ("cpu", "cores", "memory_gib", "adapter")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------- figures
@dataclass
class Figure:
    metric: str
    value: float  # median of the repeats
    unit: str
    better: str  # "higher" or "lower"
    spread: float = 0.0  # MAD of the repeats
    repeats: int = 1
    samples: list | None = None

    @classmethod
    def of(cls, metric: str, samples: list[float], unit: str, better: str) -> "Figure":
        xs = [float(x) for x in samples if x is not None and math.isfinite(x)]
        if not xs:
            raise ValueError(f"{metric}: no finite samples")
        med = statistics.median(xs)
        return cls(metric, med, unit, better, statistics.median(abs(x - med) for x in xs), len(xs), xs)


@dataclass
class Verdict:
    metric: str
    value: float
    verdict: str  # regression, improvement, ok, new (too little history)
    z: float | None = None
    center: float | None = None
    noise: float | None = None
    history: int = 0

    def describe(self) -> str:
        if self.verdict == "new":
            return f"{self.metric}: {self.value:.4g} (history {self.history} < {MIN_HISTORY}: not judged)"
        return (f"{self.metric}: {self.value:.4g} vs {self.center:.4g} ± {self.noise:.2g} "
                f"(z {self.z:+.1f}, {self.history} runs) {self.verdict.upper() if self.verdict != 'ok' else 'ok'}")


def _mad(xs: list[float]) -> float:
    med = statistics.median(xs)
    return statistics.median(abs(x - med) for x in xs)


def judge(value: float, better: str, history: list[tuple[float, float]], spread: float = 0.0, repeats: int = 1,
          metric: str = "", k: float = K) -> Verdict:
    """history: [(value, spread)] of earlier figures, oldest first. See the module docstring."""
    hist = history[-HISTORY:]
    if len(hist) < MIN_HISTORY:
        return Verdict(metric, value, "new", history=len(hist))
    values = [v for v, _ in hist]
    center = statistics.median(values)
    within = statistics.median([s for _, s in hist] + [spread])
    by_distance = sorted(values, key=lambda v: abs(v - center))
    kept = by_distance[: len(values) - max(1, len(values) // 10)]
    between = max(MAD_TO_SIGMA * _mad(values), statistics.stdev(kept) if len(kept) > 1 else 0.0)
    noise = max(between * math.sqrt(1 + 1 / len(values)), MAD_TO_SIGMA * within / math.sqrt(max(1, repeats)),
                EPS * abs(center), 1e-12)
    z = (value - center) / noise * (1 if better == "lower" else -1)
    verdict = "regression" if z > k else "improvement" if z < -k else "ok"
    return Verdict(metric, value, verdict, z, center, noise, len(hist))


# ---------------------------------------------------------------------- store
class History:
    """>>> h = History(":memory:"); run = h.start_run({"cpu": "x", "cores": 2, "memory_gib": 8, "adapter": "none"})
    >>> h.add(run, Figure.of("decode_tok_s", [10, 11, 12], "tok/s", "higher")).verdict
    'new'
    """

    def __init__(self, path: str | Path = DEFAULT_DB):
        self.path = str(path)
        self.db = sqlite3.connect(self.path)
        self.db.row_factory = sqlite3.Row
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def start_run(self, machine_info: dict, suite: str = "", commit: str | None = None, dirty: bool | None = None,
                  date: str | None = None) -> dict:
        if commit is None and dirty is None:
            commit, dirty = git_commit()
        fp = fingerprint(machine_info)
        date = date or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        cur = self.db.execute("INSERT INTO runs (date, commit_sha, dirty, suite, fingerprint, machine) VALUES (?,?,?,?,?,?)",
                              (date, commit, int(bool(dirty)), suite, fp, json.dumps(machine_info, sort_keys=True)))
        self.db.commit()
        return {"id": cur.lastrowid, "fingerprint": fp, "commit": commit, "date": date}

    def history(self, metric: str, fp: str, before_id: int | None = None, limit: int = HISTORY) -> list[tuple[float, float]]:
        q = "SELECT value, spread FROM figures WHERE metric=? AND fingerprint=?"
        args: list = [metric, fp]
        if before_id is not None:
            q += " AND id<?"
            args.append(before_id)
        rows = self.db.execute(q + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [(r["value"], r["spread"]) for r in reversed(rows)]

    def add(self, run: dict, fig: Figure) -> Verdict:
        """Append one figure, judged against this fingerprint's recent history."""
        v = judge(fig.value, fig.better, self.history(fig.metric, run["fingerprint"]), fig.spread, fig.repeats, fig.metric)
        self.db.execute(
            "INSERT INTO figures (run_id, metric, value, unit, better, spread, repeats, samples, fingerprint, date, commit_sha,"
            " verdict, z, center, noise) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (run["id"], fig.metric, fig.value, fig.unit, fig.better, fig.spread, fig.repeats, json.dumps(fig.samples),
             run["fingerprint"], run["date"], run["commit"], v.verdict, v.z, v.center, v.noise))
        self.db.commit()
        return v

    def add_compat(self, run: dict | None, row: dict) -> None:
        """One profile's compatibility result: source 'real-browser' (a browser ran the kernels) or
        'native-limits' (wgpu on this host under the profile's limits)."""
        self.db.execute(
            "INSERT INTO compat_runs (run_id, date, fingerprint, profile, browser, source, adapter, backend, limits, kernels_ok,"
            " kernels_failed, step_ms, detail) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (run and run["id"], (run or {}).get("date") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             run and run["fingerprint"], row["profile"], row.get("browser"), row["source"], row.get("adapter"), row.get("backend"),
             json.dumps(row.get("limits") or {}), json.dumps(row.get("kernels_ok") or []), json.dumps(row.get("kernels_failed") or []),
             row.get("step_ms"), json.dumps(row.get("detail") or {})))
        self.db.commit()

    def latest_compat(self) -> list[dict]:
        """The newest result per (profile, source)."""
        rows = self.db.execute(
            "SELECT * FROM compat_runs WHERE id IN (SELECT MAX(id) FROM compat_runs GROUP BY profile, source) ORDER BY profile, source"
        ).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            for k in ("limits", "kernels_ok", "kernels_failed", "detail"):
                d[k] = json.loads(d[k] or "null")
            out.append(d)
        return out

    def metrics(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT metric FROM figures ORDER BY metric")]

    def series(self, metric: str, fp: str | None = None) -> list[dict]:
        q = "SELECT * FROM figures WHERE metric=?" + (" AND fingerprint=?" if fp else "") + " ORDER BY id"
        return [dict(r) for r in self.db.execute(q, (metric, fp) if fp else (metric,))]

    def runs(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM runs ORDER BY id")]

    def last_run(self) -> dict | None:
        r = self.db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone()
        return dict(r) if r else None

    def verdicts(self, run_id: int) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM figures WHERE run_id=? ORDER BY id", (run_id,))]


def recorded_machine(recorded: dict | None, adapter: str) -> dict:
    """The machine another machine's JSON says measured it (a device machine's history stays
    there, so its JSON is appended here); older JSONs name only the adapter."""
    return recorded or {"cpu": "not recorded", "cores": 0, "memory_gib": 0, "adapter": adapter, "os": "not recorded"}


def append_figures(figures: list[Figure], suite: str, adapter: bool = False, db: str | Path = DEFAULT_DB,
                   measured_on: dict | None = None) -> list[Verdict]:
    """A benchmark script's figures appended to the history as one run of `suite`; prints how
    many, and every figure the history flags as a regression or an improvement. measured_on:
    the machine that measured them (recorded_machine), when it is not this one."""
    h = History(db)
    try:
        run = h.start_run(measured_on or machine(adapter=adapter), suite=suite)
        verdicts = [h.add(run, f) for f in figures]
    finally:
        h.close()
    flagged = [v.describe() for v in verdicts if v.verdict in ("regression", "improvement")]
    print(f"history: {len(figures)} figures appended to {db}" + "".join(f"\n  {d}" for d in flagged), flush=True)
    return verdicts
