"""Quantizers beyond round-to-nearest (kernels/quantizers.py) and the precision planner
(tabshard/precision.py): every format round-trips through our packing, the better methods
really reduce the error they target, and plans respect their budgets."""
import itertools

import numpy as np
import pytest

from tabshard.precision import Option, PrecisionError, choose, fit_tabs, plan_cost
from kernels import quantizers as Q
from kernels import reference as ref
from kernels.quant import SUPPORTED_BITS, SUPPORTED_GROUPS, QuantSpec, dequantize, group_scales, quantize_rtn, unpack_codes

SPECS = [QuantSpec(b, g, s) for b in SUPPORTED_BITS for g in SUPPORTED_GROUPS for s in (False, True)]


@pytest.fixture(scope="module")
def problem():
    """A weight matrix and correlated activations with uneven input scales (like an LLM's)."""
    rng = np.random.default_rng(0)
    n, k = 48, 200  # 200: a multiple of no group size
    w = rng.standard_normal((n, k)).astype(np.float32)
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = (rng.standard_normal((1500, k)) @ mix) * np.exp(rng.standard_normal(k))
    return w, x.T @ x


def werr(w, t, d):
    return float((d * (t.dequantize() - w) ** 2).sum())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_method_packs_every_format(problem, spec):
    w, h = problem
    for method in Q.METHODS:
        t = Q.quantize(w, spec, method, hessian=h)
        assert (t.spec, t.n, t.k) == (spec, *w.shape)
        # the packed tensor is what the kernels read: their numpy twin agrees with dequantize
        x = np.ones((1, w.shape[1]), np.float32)
        np.testing.assert_allclose(ref.qmatvec(x, t), x @ dequantize(t).T, rtol=1e-5, atol=1e-4)
        scale, _ = group_scales(t)
        assert np.all(np.isfinite(scale)) and np.all(scale >= 0)


@pytest.mark.parametrize("spec", [QuantSpec(2, 32, True), QuantSpec(3, 32, False), QuantSpec(3, 64, True), QuantSpec(4, 64, False)], ids=lambda s: s.name)
def test_better_methods_reduce_their_error(problem, spec):
    w, h = problem
    rtn = quantize_rtn(w, spec)
    ones = np.ones(w.shape[1], np.float32)
    # plain clip search: weight-space error never worse than round-to-nearest's range
    assert werr(w, Q.quantize_clip(w, spec), ones) <= werr(w, rtn, ones) * 1.0001
    # importance-weighted search: the weighted error drops further
    d = np.diag(h)
    assert werr(w, Q.quantize_clip(w, spec, d), d) <= werr(w, Q.quantize_clip(w, spec), d) * 1.0001
    # GPTQ: output error on the calibration activations well below both
    e_gptq = Q.output_error(w, Q.gptq(w, h, spec), h)
    assert e_gptq < 0.7 * Q.output_error(w, Q.quantize_clip(w, spec, d), h)
    assert e_gptq < 0.5 * Q.output_error(w, rtn, h)


def test_gptq_prepared_hessian_dead_inputs_and_ragged_k():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 70)).astype(np.float32)
    x = rng.standard_normal((300, 70))
    x[:, 5] = 0  # an input never active on the calibration text
    h = x.T @ x
    hs = Q.GPTQHessian.of(h)
    a, b = Q.gptq(w, hs, QuantSpec(3, 32, True)), Q.gptq(w, h, QuantSpec(3, 32, True))
    np.testing.assert_array_equal(a.qweight, b.qweight)
    assert np.all(np.isfinite(a.dequantize()))
    with pytest.raises(ValueError):
        Q.gptq(w[:, :64], hs, QuantSpec(3, 32, True))
    with pytest.raises(ValueError):
        Q.quantize(w, QuantSpec(3, 32, True), "gptq")


@pytest.mark.parametrize("spec", [QuantSpec(4, 64, False), QuantSpec(3, 64, True), QuantSpec(2, 32, False)], ids=lambda s: s.name)
def test_scale_refit_is_the_least_squares_fit_of_the_output(problem, spec):
    w, h = problem
    t = Q.gptq(w, h, spec)
    s, m = Q.refit_scales(w, t, h)
    refit = Q._retile(t, (s, m))
    # the same codes with the refit scales: output error no worse (f16 rounding aside) ...
    assert Q.output_error(w, refit, h) <= Q.output_error(w, t, h) * 1.001
    # ... and, per row, the solution of the normal equations built the slow way
    codes = Q._codes_of(t).astype(np.float64)[:, : w.shape[1]]
    off = (1 << (spec.bits - 1)) if spec.symmetric else 0
    for r in (0, 7):
        cols = [np.where(np.arange(w.shape[1]) // spec.group == g, codes[r] - off, 0.0) for g in range(t.groups)]
        if not spec.symmetric:
            cols += [(np.arange(w.shape[1]) // spec.group == g).astype(float) for g in range(t.groups)]
        a = np.stack(cols, 1)
        theta = np.linalg.lstsq(a.T @ h @ a, a.T @ h @ w[r].astype(np.float64), rcond=None)[0]
        np.testing.assert_allclose(s[r], theta[: t.groups].astype(np.float16), rtol=2e-3, atol=1e-3)
    # alternating refit and GPTQ never ends worse on the calibration activations than GPTQ
    assert Q.output_error(w, Q.gptq_refined(w, h, spec), h) <= Q.output_error(w, t, h)


def test_source_grid_candidates_keep_a_finer_source_exact():
    """Requantizing a4g32 (Q4_1) to a4g64: where both 32-blocks of a group share one grid, that
    grid is a candidate and the group comes out exact; elsewhere the candidates only add options."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 128)).astype(np.float32)
    src = quantize_rtn(w, QuantSpec(4, 32, False))
    d, m = group_scales(src)
    codes = unpack_codes(src.qweight, 4).reshape(8, 4, 32)
    codes[:4, 1] = codes[:4, 0][:, ::-1]  # rows 0-3: block 1 on block 0's grid
    d[:4, 1], m[:4, 1] = d[:4, 0], m[:4, 0]
    from kernels.quant import from_codes
    src = from_codes(codes.reshape(8, 128), d, m, QuantSpec(4, 32, False), 128)
    ws = dequantize(src)
    spec = QuantSpec(4, 64, False)
    g, ones = Q._groups(ws, 64), np.ones((2, 64), np.float32)
    plain = Q._assemble(g, *Q.fit_groups(g, ones, spec), spec, 128)
    grid = Q._assemble(g, *Q.fit_groups(g, ones, spec, extra=Q.source_grid(src, spec)), spec, 128)
    np.testing.assert_array_equal(grid.dequantize()[:4, :64], ws[:4, :64])
    assert werr(ws, grid, 1.0) <= werr(ws, plain, 1.0)
    assert Q.source_grid(src, QuantSpec(3, 64, False)) == [] and Q.source_grid(src, QuantSpec(4, 64, True)) == []


def test_scales_are_f16_exact_and_codes_optimal_for_them(problem):
    w, _ = problem
    spec = QuantSpec(3, 32, False)
    t = Q.quantize_clip(w, spec)
    scale, minimum = group_scales(t)
    assert np.array_equal(scale, scale.astype(np.float16).astype(np.float32))
    # re-rounding with the stored scale/min gives back the same codes
    again = Q._assemble(Q._groups(w, 32), scale, minimum, spec, w.shape[1])
    np.testing.assert_array_equal(again.qweight, t.qweight)


def test_zero_and_constant_groups():
    w = np.zeros((4, 64), np.float32)
    w[1] = 3.0
    for method in ("clip", "hqq"):
        for sym in (False, True):
            t = Q.quantize(w, QuantSpec(2, 32, sym), method)
            assert np.all(np.isfinite(t.dequantize()))
            np.testing.assert_allclose(t.dequantize()[0], 0, atol=0)


# ------------------------------------------------------------------ precision planner


def brute_force(options, budget):
    names = list(options)
    best = None
    for combo in itertools.product(*(options[n] for n in names)):
        size = sum(o.nbytes for o in combo)
        cost = sum(o.cost for o in combo)
        if size <= budget and (best is None or cost < best[0] - 1e-12):
            best = (cost, dict(zip(names, (o.choice for o in combo))))
    return best


def test_choose_fits_and_is_near_optimal():
    rng = np.random.default_rng(3)
    for trial in range(30):
        opts = {}
        for t in range(5):
            sizes = sorted(rng.integers(5, 60, size=3))
            costs = sorted(rng.random(3) * rng.random() * 10, reverse=True)
            opts[f"t{t}"] = [Option(f"f{j}", int(s), float(c)) for j, (s, c) in enumerate(zip(sizes, costs))]
        budget = int(rng.integers(40, 250))
        best = brute_force(opts, budget)
        if best is None:
            with pytest.raises(PrecisionError):
                choose(opts, budget)
            continue
        plan = choose(opts, budget)
        size, cost = plan_cost(opts, plan)
        assert size <= budget
        assert cost <= best[0] * 1.5 + 0.5  # Lagrangian + greedy fill: near the optimum


def test_fit_tabs_packs_contiguous_ranges_within_each_budget():
    # 6 layers x 2 tensors, each 100 bytes at "hi" (cost 0) or 60 at "lo" (cost 1); head 50
    opts = {f"blk.{i}.{t}": [Option("hi", 100, 0.0), Option("lo", 60, 1.0 + i)] for i in range(6) for t in "ab"}
    opts["head"] = [Option("hi", 50, 0.0), Option("lo", 30, 5.0)]
    layer_of = {n: (None if n == "head" else int(n.split(".")[1])) for n in opts}
    roomy = fit_tabs(opts, layer_of, [1000, 1000])
    assert set(roomy.plan.values()) == {"hi"}
    tight = fit_tabs(opts, layer_of, [420, 420])
    assert all(b <= 420 for b in tight.tab_bytes)
    assert tight.ranges[0][0] == 0 and tight.ranges[-1][1] == 6 and tight.ranges[0][1] == tight.ranges[1][0]
    assert "lo" in tight.plan.values()
    with pytest.raises(PrecisionError):
        fit_tabs(opts, layer_of, [100, 100])


# ------------------------------------------------------------------ the WGSL kernels read what the quantizers write

RECOMMENDED = ["a3g32", "s3g32", "s3g64", "s2g32", "s4g64", "a4g64", "s4g32"]


def test_wgsl_qmatvec_runs_the_recommended_formats_as_quantized_by_gptq_and_clip(problem):
    """Symmetric clip/GPTQ output uses code 0 (-2**(bits-1) * scale), which round-to-nearest never
    produces; check the shader decodes it (and every recommended format) like its numpy twin."""
    from kernels import launchers as R  # Device, QuantLinear, upload_quant

    w, h = problem
    dev = R.Device()
    x = np.random.default_rng(5).standard_normal((3, w.shape[1])).astype(np.float32)
    stride = -(-w.shape[1] // 4) * 4
    xp = np.zeros((3, stride), np.float32)
    xp[:, : w.shape[1]] = x
    for name in RECOMMENDED:
        spec = QuantSpec.parse(name)
        for t in (Q.gptq(w, h, spec), Q.quantize_clip(w, spec, np.diag(h))):
            if spec.symmetric:
                assert (unpack_codes(t.qweight, spec.bits) == 0).any()
            xb, yb = dev.upload(xp), dev.upload(np.zeros((3, t.n), np.float32))
            op = R.QuantLinear(dev, R.upload_quant(dev, t), xb, stride, yb, t.n, 0, False, 8)
            dev.run([op], 3)
            got = dev.read(yb, count=3 * t.n).reshape(3, t.n)
            np.testing.assert_allclose(got, ref.qmatvec(x, t), atol=2e-4 * np.sqrt(w.shape[1]), rtol=1e-4)
