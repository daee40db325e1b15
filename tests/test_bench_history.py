"""The benchmark history: store, noise-scaled regression rule on synthetic series with known
noise, `tabshard bench --check` exit status, and the HTML report."""
import numpy as np
import pytest

from tabshard import bench_history as bh
from tabshard import cli, cli_bench
from tabshard.bench_history import Figure, History, judge

MACHINE = {"cpu": "Test CPU", "cores": 2, "memory_gib": 8.0, "adapter": "none", "os": "Linux"}


def series(rng, center, sigma, n=10):
    """Run medians with noise of a known sigma: random draws, or (rng None) the normal
    distribution's quantiles, so that the sample's spread is exactly the intended one."""
    if rng is None:
        from statistics import NormalDist

        return [(center + sigma * NormalDist().inv_cdf((i + 0.5) / n), 0.0) for i in range(n)]
    return [(float(v), 0.0) for v in rng.normal(center, sigma, n)]


def test_store_appends_and_queries_per_fingerprint(tmp_path):
    h = History(tmp_path / "h.sqlite")
    run = h.start_run(MACHINE, "quick", commit="abc", dirty=False)
    v = h.add(run, Figure.of("decode_ms", [10.0, 11.0, 13.0], "ms", "lower"))
    assert v.verdict == "new"
    other = h.start_run({**MACHINE, "cores": 64}, "quick", commit="abc", dirty=False)
    h.add(other, Figure.of("decode_ms", [1.0], "ms", "lower"))
    assert h.history("decode_ms", run["fingerprint"]) == [(11.0, 1.0)]  # median, MAD; the other machine apart
    assert run["fingerprint"] != other["fingerprint"]
    row = h.series("decode_ms", run["fingerprint"])[0]
    assert row["commit_sha"] == "abc" and row["repeats"] == 3 and row["samples"] == "[10.0, 11.0, 13.0]"
    h.close()
    h = History(tmp_path / "h.sqlite")  # persisted
    assert h.metrics() == ["decode_ms"] and len(h.runs()) == 2


def test_flags_changes_beyond_measured_noise_not_a_fixed_percentage():
    quiet, noisy = series(None, 100, 1), series(None, 100, 10)
    assert judge(103, "lower", quiet).verdict == "ok"  # within noise
    assert judge(108, "lower", quiet).verdict == "regression"  # 8 % on a metric with 1 % noise
    assert judge(108, "lower", noisy).verdict == "ok"  # the same 8 % on a metric with 10 % noise
    assert judge(92, "lower", quiet).verdict == "improvement"
    assert judge(92, "higher", quiet).verdict == "regression"  # direction follows "better"
    assert judge(160, "lower", noisy).verdict == "regression"
    assert judge(200, "lower", quiet[:2]).verdict == "new"  # too little history to judge
    # a lucky-quiet history of a benchmark whose repeats are noisy: the within-run spread counts
    flat = [(100.0, 5.0)] * 5
    assert judge(104, "lower", flat, spread=5.0, repeats=3).verdict == "ok"
    assert judge(130, "lower", flat, spread=5.0, repeats=3).verdict == "regression"


def test_false_alarm_rate_on_stationary_noise_is_low():
    rng = np.random.default_rng(7)
    alarms = 0
    for _ in range(300):
        hist = series(rng, 50, 2)
        alarms += judge(float(rng.normal(50, 2)), "lower", hist).verdict != "ok"
    assert alarms <= 6, alarms  # ~K=4 robust sigmas: rare, even with 10-point noise estimates


def test_bench_check_exits_nonzero_on_a_regression(tmp_path, monkeypatch, capsys):
    values = iter([10.0, 10.2, 9.9, 10.1, 10.0, 10.1, 14.0])

    def bench_fake(ctx):
        """A synthetic benchmark."""
        v = next(values)
        return [Figure.of("fake.step_ms", [v - 0.05, v, v + 0.05], "ms", "lower")]

    monkeypatch.setitem(cli_bench.SUITES, "quick", [bench_fake])
    monkeypatch.setattr(cli_bench, "machine", lambda: dict(MACHINE))
    db = str(tmp_path / "h.sqlite")
    for _ in range(6):
        assert cli.main(["bench", "--db", db, "--check"]) == 0
    assert cli.main(["bench", "--db", db, "--check"]) == 1
    assert "REGRESSION" in capsys.readouterr().out


def test_report_renders_every_metric_and_the_matrix(tmp_path):
    from tabshard.bench_report import render

    db = tmp_path / "h.sqlite"
    h = History(db)
    rng = np.random.default_rng(3)
    metrics = {"worker.numpy.decode_step_ms": ("ms", "lower", 20.0), "hop.rtt_p50_ms": ("ms", "lower", 0.15),
               "anchor.llama_cpp.decode_tok_s": ("tok/s", "higher", 60.0), "codec.tensor_roundtrip_gbps_16mb": ("GB/s", "higher", 4.0)}
    for i in range(6):
        run = h.start_run(MACHINE, "quick", commit=f"c{i}", dirty=False, date=f"2026-11-{10 + i}T00:00:00+00:00")
        for m, (unit, better, center) in metrics.items():
            v = center * (1.5 if (i == 5 and m == "hop.rtt_p50_ms") else 1 + 0.01 * rng.standard_normal())
            h.add(run, Figure.of(m, [v * 0.99, v, v * 1.01], unit, better))
    h.add_compat(run, {"profile": "chromium-swiftshader", "browser": "Chromium (headless)", "source": "real-browser",
                       "backend": "WebGPU", "kernels_ok": ["qmatvec", "rmsnorm"], "kernels_failed": [], "limits": {}})
    h.close()
    page = render(str(db))
    for m in metrics:
        assert f"data-metric='{m}'" in page
    assert page.count('class="pt regression"') == 1  # the one injected jump is flagged
    assert "Browser compatibility matrix" in page and "real-browser" in page and "chromium-swiftshader" in page
    assert "llama.cpp on this CPU" in page and "×" in page  # ours / anchor ratio
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained


@pytest.mark.parametrize("value,expected", [(1e-9, "regression")])
def test_deterministic_metric_uses_a_tiny_floor(value, expected):
    assert judge(1.01, "lower", [(1.0, 0.0)] * 5).verdict == expected  # 1 % on a perfectly repeatable figure
    assert judge(1.0005, "lower", [(1.0, 0.0)] * 5).verdict == "ok"
    assert bh.EPS < 0.01
