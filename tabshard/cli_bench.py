"""`tabshard bench`: run the benchmark suite into the history database, check for regressions,
write the HTML report.

    tabshard bench [--suite quick|full] [--db PATH]     run, append every figure, print verdicts
    tabshard bench --check [...]                        ... and exit 1 on a regression
    tabshard bench --report [--out report.html]         only write the report from the database

Each benchmark is a function returning Figures (the median of repeated measurements with their
spread); one that fails is reported and skipped, the others still run. The functions reuse the
scripts in benchmarks/ (imported by path) so the figures mean what those scripts print.
"""
from __future__ import annotations

import importlib
import signal
import sys
import time
import traceback
from pathlib import Path

from tabshard.bench_history import DEFAULT_DB, Figure, History, machine
from protocol.errors import TabshardError

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    """A benchmarks/ script as a module, importable by name (spawned children re-import it)."""
    path = str(ROOT / "benchmarks")
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module(name)


class Ctx:
    def __init__(self, full: bool, history: History | None, run: dict | None):
        self.full, self.history, self.run = full, history, run
        self._weights = None

    def weights(self):
        if self._weights is None:
            from model.loader import GGUFModel
            from model.tokenizer import GGUFTokenizer

            model = GGUFModel()
            self._weights = (model, GGUFTokenizer(model), model.load_all())
        return self._weights


# ---------------------------------------------------------------------- benchmarks
def bench_kernels(ctx: Ctx) -> list[Figure]:
    """Quantized matvec through the WGSL kernel (wgpu on this host) and numpy's f32 matvec."""
    import numpy as np

    from kernels import runner as R

    from kernels import launchers as KL
    from kernels.quant import QuantSpec, dequantize

    bk = _script("bench_kernels")
    dev = R.Device()
    tuning = KL.matmul_tuning(dev)
    shapes = bk.SHAPES if ctx.full else [(1536, 576), (576, 1536)]
    formats = bk.DEFAULT_FORMATS if ctx.full else ["a4g32"]
    reps = 5 if ctx.full else 3
    rng = np.random.default_rng(0)
    out = []
    for n, k in shapes:
        x = rng.standard_normal((1, k)).astype(np.float32)
        x_stride = -(-k // 4) * 4
        xb = dev.upload(np.pad(x, ((0, 0), (0, x_stride - k))))
        yb = dev.buffer(n * 4)
        for name in formats:
            w = bk.random_quant(rng, n, k, QuantSpec.parse(name))
            op = KL.QuantLinear(dev, KL.upload_quant(dev, w), xb, x_stride, yb, n, tuning=tuning)
            gbps = [w.nbytes / bk.wgpu_seconds(dev, op, 1, yb, 0.1) / 1e9 for _ in range(reps)]
            out.append(Figure.of(f"kernels.qmatvec.{name}.{n}x{k}.wgpu_gbps", gbps, "GB/s", "higher"))
        w_t = np.ascontiguousarray(dequantize(w).T)
        np_gbps = [w_t.nbytes / bk.numpy_seconds(lambda: x @ w_t, 0.1) / 1e9 for _ in range(reps)]
        out.append(Figure.of(f"kernels.numpy_f32_matvec.{n}x{k}.gbps", np_gbps, "GB/s", "higher"))
    return out


def bench_worker(ctx: Ctx) -> list[Figure]:
    """One worker, the whole model: prefill tok/s and decode step time (numpy; wgpu in full)."""
    from tab_worker.generate import GenerationStats, LocalGenerator

    _, tok, weights = ctx.weights()
    out = []
    for backend in (["numpy", "wgpu"] if ctx.full else ["numpy"]):
        gen = LocalGenerator(weights, backend=backend, max_ctx=512)
        prompt = tok.encode(("Distributed systems split work across many machines. " * 8))
        list(gen.generate(prompt[:8], 2))  # warm-up
        prefill = []
        for _ in range(3 if ctx.full else 2):
            st = GenerationStats()
            list(gen.generate(prompt, 1, stats=st))
            prefill.append(st.prefill_tok_s)
        st = GenerationStats()
        list(gen.generate(tok.encode("Once upon a time"), 24 if ctx.full else 8, stats=st, stop_at_eos=False))
        out.append(Figure.of(f"worker.{backend}.prefill_tok_s", prefill, "tok/s", "higher"))
        out.append(Figure.of(f"worker.{backend}.decode_step_ms", [t * 1000 for t in st.step_times], "ms", "lower"))
    return out


def bench_hop(ctx: Ctx) -> list[Figure]:
    """Round trip of one token's step through the codec over a loopback WebSocket."""
    bc = _script("bench_cluster")
    runs = [bc.bench_hop(1000 if ctx.full else 300) for _ in range(3)]
    return [Figure.of("hop.rtt_p50_ms", [r["hop_rtt_p50_ms"] for r in runs], "ms", "lower"),
            Figure.of("hop.rtt_p99_ms", [r["hop_rtt_p99_ms"] for r in runs], "ms", "lower")]


def bench_codec(ctx: Ctx) -> list[Figure]:
    """protocol.wire: encode+decode GB/s of a large tensor, and µs per step message."""
    import numpy as np

    from protocol import wire

    bc = _script("bench_codec")
    mb = 64 if ctx.full else 16
    rows = (mb << 20) // (576 * 4)
    msg = {"v": wire.PROTOCOL_VERSION, "type": "step", "step_id": 1, "epoch": 1, "want_topk": 0,
           "sessions": [{"session_id": "s", "start_pos": 0, "length": rows}],
           "hidden": np.random.default_rng(0).random((rows, 576), dtype=np.float32)}
    nbytes = msg["hidden"].nbytes
    rt = [nbytes / bc.median_seconds(lambda: wire.decode(wire.encode(msg, validate=False), validate=False), 3) / 1e9
          for _ in range(3)]
    hidden = np.random.default_rng(0).random((1, 576), dtype=np.float32)
    step = wire.make("step", step_id=123, epoch=4, sessions=[{"session_id": "s-0001", "start_pos": 57, "length": 1}],
                     hidden=hidden, want_topk=8)
    us = [bc.per_call_seconds(lambda: wire.decode(wire.encode(step))) * 1e6 for _ in range(3)]
    return [Figure.of(f"codec.tensor_roundtrip_gbps_{mb}mb", rt, "GB/s", "higher"),
            Figure.of("codec.step_message_roundtrip_us", us, "µs", "lower")]


def bench_cluster(ctx: Ctx) -> list[Figure]:
    """Real processes on 127.0.0.1: sharding ratio, concurrent streams, detection/recovery.

    Sharding: decode tok/s with N workers / 1; concurrency: aggregate tok/s of several streams /
    one; faults: detection and recovery over kills by PID (and SIGSTOP freezes in full)."""
    bc = _script("bench_cluster")
    from tabshard.cluster import LocalCluster

    n = 4 if ctx.full else 2
    tokens = 32 if ctx.full else 12
    out = []
    with LocalCluster(workers=1) as c:
        one = [bc.stream(c.base, max_tokens=tokens)["decode_tok_s"] for _ in range(2)]
        for i in range(n - 1):
            c.add_worker()
        c.wait_for(lambda st: sum(1 for w in st["workers"] if not w["local"] and w["state"] == "ready") >= n
                   and len(st["stages"]) >= n and all(s["holders"] and s["holders"][0] in s["ready"] for s in st["stages"]),
                   120, f"{n} workers serving")
        many = [bc.stream(c.base, max_tokens=tokens)["decode_tok_s"] for _ in range(2)]
        ratio = [m / o for m, o in zip(many, one)]
        out += [Figure.of("cluster.decode_tok_s_1_worker", one, "tok/s", "higher"),
                Figure.of(f"cluster.decode_tok_s_{n}_workers", many, "tok/s", "higher"),
                Figure.of(f"cluster.sharding_ratio_{n}_over_1", ratio, "×", "higher")]
        streams = 8 if ctx.full else 4
        single = [bc.concurrent(c.base, 1, tokens) for _ in range(2)]
        multi = [bc.concurrent(c.base, streams, tokens) for _ in range(2)]
        out += [Figure.of(f"cluster.aggregate_tok_s_{streams}_streams", multi, "tok/s", "higher"),
                Figure.of(f"cluster.concurrency_ratio_{streams}_over_1", [m / s for m, s in zip(multi, single)], "×", "higher")]
        kills = _faults(bc, c, 6 if ctx.full else 2, signal.SIGKILL)
        out += [Figure.of("faults.kill_detect_ms", [d * 1000 for d in kills["detect"]], "ms", "lower")]
        if kills["recover"]:
            out.append(Figure.of("faults.kill_recover_ms", [r * 1000 for r in kills["recover"]], "ms", "lower"))
        out.append(Figure("faults.wrong_sequences", float(kills["wrong"]), "count", "lower", 0.0, len(kills["detect"])))
        if ctx.full:
            freezes = _faults(bc, c, 4, signal.SIGSTOP)
            out.append(Figure.of("faults.freeze_detect_ms", [d * 1000 for d in freezes["detect"]], "ms", "lower"))
            if freezes["recover"]:
                out.append(Figure.of("faults.freeze_recover_ms", [r * 1000 for r in freezes["recover"]], "ms", "lower"))
    return out


def _faults(bc, cluster, n: int, sig: int) -> dict:
    """bench_cluster.faults, keeping every sample (it returns percentiles only)."""
    detect, recover, wrong = [], [], 0
    reference = bc.stream(cluster.base, max_tokens=16)["ids"]
    for i in range(n):
        cluster.wait_for(lambda st: not st["sessions"] and st["stages"] and all(s["holders"] and s["holders"][0] in s["ready"]
                                                                                for s in st["stages"]), 90, "idle")
        hit = {}

        def on_token(k):
            if k == 4 and not hit:
                st = cluster.status()
                stage = i % len(st["stages"])
                hit["wid"] = st["stages"][stage]["holders"][0]
                if hit["wid"] == "local":
                    return
                hit["pid"] = cluster.stage_worker_pid(stage)
                cluster.signal_worker(hit["pid"], sig)
                hit["t"] = time.monotonic()

        ids = bc.stream(cluster.base, max_tokens=16, on_token=on_token)["ids"]
        wrong += ids != reference
        if "t" not in hit:
            continue
        ev = cluster.status()["events"]
        death = next((e for e in ev if e["kind"] == "death" and e["worker"] == hit["wid"]), None)
        if death is None:
            continue
        detect.append(death["t"] - hit["t"])
        rec = [e for e in ev if e["kind"] == "recovered" and e["t"] >= death["t"]]
        if rec:
            recover.append(rec[0]["recovery_s"])
        if sig == signal.SIGSTOP:
            cluster.signal_worker(hit["pid"], signal.SIGCONT)
        else:
            cluster.add_worker()
    if not detect:
        raise RuntimeError("no fault was injected (every stage on the coordinator?)")
    return {"detect": detect, "recover": recover, "wrong": wrong}


def bench_anchors(ctx: Ctx) -> list[Figure]:
    """llama.cpp on this CPU, same GGUF, same thread count (when llama-cpp-python is installed)."""
    import json
    import os
    import subprocess

    from model.loader import default_model_path

    threads = len(os.sched_getaffinity(0))
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench_generate as g; "
            "print(json.dumps(g.run_llama_cpp(sys.argv[2], 16, int(sys.argv[3]))))")
    samples = []
    for _ in range(2):  # in a child: a wheel built for another CPU dies of SIGILL, not us
        p = subprocess.run([sys.executable, "-c", code, str(ROOT / "benchmarks"), str(default_model_path()), str(threads)],
                           capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            print(f"  llama.cpp: failed in a child process (exit {p.returncode}); anchor skipped")
            return []
        r = json.loads(p.stdout.strip().splitlines()[-1])
        if r is None:
            print("  llama.cpp: not installed (pip install llama-cpp-python); anchor skipped")
            return []
        samples.append(r["decode_tok_s"])
    return [Figure.of("anchor.llama_cpp.decode_tok_s", samples, "tok/s", "higher")]


def bench_compat(ctx: Ctx) -> list[Figure]:
    """Compatibility matrix: every profile under its limits on this host, and real Chromium.

    Native: wgpu with the profile's limits (numpy for profiles without WebGPU); real: headless
    Chromium compiles every kernel and times a step-sized matvec (~10 s)."""
    from tabshard import compat_matrix as cm

    profiles = cm._profiles()
    out = []
    for name, p in profiles.items():
        row = cm.measure_native(p, steps=3 if not ctx.full else 6)
        ctx.history and ctx.history.add_compat(ctx.run, row)
        if row.get("step_ms") is not None:
            out.append(Figure(f"compat.{name}.native_step_ms", row["step_ms"], "ms", "lower", 0.0, 1))
        print(f"  {name}: {len(row['kernels_ok'])} kernels ran, {len(row['kernels_failed'])} failed, "
              f"step {row['step_ms'] and round(row['step_ms'])} ms")
    real = cm.measure_chromium()
    if real is not None:
        ctx.history and ctx.history.add_compat(ctx.run, real)
        mv = (real.get("detail") or {}).get("matvec_576x1536_ms")
        if mv is not None:
            out.append(Figure("compat.chromium.matvec_576x1536_ms", mv, "ms", "lower", 0.0, 1))
        print(f"  real {real['browser']}: {len(real['kernels_ok'])} kernels compiled, {len(real['kernels_failed'])} failed")
    return out


SUITES = {
    "quick": [bench_codec, bench_hop, bench_kernels, bench_worker, bench_compat, bench_cluster, bench_anchors],
    "full": [bench_codec, bench_hop, bench_kernels, bench_worker, bench_compat, bench_cluster, bench_anchors],
}


# ---------------------------------------------------------------------- command
def run_suite(suite: str, db: str, only: list[str] | None = None) -> tuple[dict, list]:
    h = History(db)
    m = machine()
    run = h.start_run(m, suite)
    print(f"bench {suite}: commit {(run['commit'] or '?')[:10]}, machine {run['fingerprint']} "
          f"({m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB, {m['adapter']}) -> {db}", flush=True)
    ctx = Ctx(suite == "full", h, run)
    verdicts = []
    benches = [b for b in SUITES[suite] if not only or b.__name__.removeprefix("bench_") in only]
    for i, bench in enumerate(benches, 1):
        t0 = time.monotonic()
        print(f"[{i}/{len(benches)}] {bench.__name__.removeprefix('bench_')}: {bench.__doc__.splitlines()[0]}", flush=True)
        try:
            figures = bench(ctx)
        except Exception as exc:
            print(f"  skipped: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(limit=3, file=sys.stderr)
            continue
        for fig in figures:
            v = h.add(run, fig)
            verdicts.append(v)
            mark = {"regression": "  << REGRESSION", "improvement": "  (improved)"}.get(v.verdict, "")
            print(f"  {fig.metric:<48} {fig.value:>10.4g} {fig.unit:<6} ±{fig.spread:.2g} (n={fig.repeats}){mark}", flush=True)
        print(f"  ({time.monotonic() - t0:.0f} s)", flush=True)
    h.close()
    return run, verdicts


def cmd_bench(a) -> int:
    import os

    # one BLAS thread: on a shared 2-core host a second spinning thread made numpy 100x slower
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    db = str(a.db)
    if a.report and not a.run:
        from tabshard.bench_report import write_report

        if not Path(db).exists():
            raise TabshardError(f"no benchmark history at {db}; run `tabshard bench` first")
        out = write_report(db, a.out)
        print(f"report written to {out}")
        return 0
    run, verdicts = run_suite(a.suite, db, a.only.split(",") if a.only else None)
    regressions = [v for v in verdicts if v.verdict == "regression"]
    judged = [v for v in verdicts if v.verdict != "new"]
    print(f"\n{len(verdicts)} figures, {len(judged)} judged against history, {len(regressions)} regression(s)")
    for v in regressions:
        print("  " + v.describe())
    if a.report:
        from tabshard.bench_report import write_report

        print(f"report written to {write_report(db, a.out)}")
    return 1 if (a.check and regressions) else 0


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmark suite into the history database; check and report regressions")
    p.add_argument("--suite", default="quick", choices=sorted(SUITES), help="quick: a few minutes on 2 cores; full: more of everything")
    p.add_argument("--db", default=str(DEFAULT_DB), metavar="PATH", help="SQLite history (default: bench_history.sqlite in the repo)")
    p.add_argument("--check", action="store_true", help="exit 1 when a figure regressed beyond its measured noise")
    p.add_argument("--report", action="store_true", help="write the HTML report (alone: from the database, without running)")
    p.add_argument("--run", action="store_true", help="with --report: run the suite first")
    p.add_argument("--out", default="report.html", metavar="PATH", help="report file (default: report.html)")
    p.add_argument("--only", metavar="NAMES", help=f"comma-separated subset of: {', '.join(b.__name__[6:] for b in SUITES['full'])}")
    p.set_defaults(func=cmd_bench)
