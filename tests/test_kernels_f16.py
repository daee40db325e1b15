"""Parity of the f16 matvec kernels (NAME_f16.wgsl, devices with shader-f16) with their numpy
twins of the same names, over every quant format and the awkward shapes of test_kernels.py.

Tolerances: a twin rounds to f16 exactly where its shader does (weight, input, product) and
sums in f32, so on lavapipe, which rounds to nearest even, only the f32 summation order
differs (seen: <= 4e-6). WGSL lets a conversion to f16 land on either neighbour, so another
device may differ by an f16 ulp (2^-11 relative) on some terms: atol 1e-3 (unit-scale data,
k <= 200) and 1e-2 (k = 576, inputs of scale 3: outputs of ~100) admit that. Half precision
itself moves these outputs by ~1e-2 (k = 70) to ~1e-1 (k = 576) from the f32 results, so each
case also checks that the kernel sits much nearer its f16 twin than the f32 reference: a
kernel that silently computed in f32 would fail.
"""
from __future__ import annotations

import numpy as np
import pytest

from kernels import reference as ref
from kernels import runner as R
from kernels import launchers as KL
from kernels.quant import QuantSpec, quantize_rtn
from tests.test_kernels import SPECS, SPECS_3BIT, TUNINGS, padded, randn

F16_TOL = dict(atol=1e-3, rtol=0)
F16_TOL_WIDE = dict(atol=1e-2, rtol=0)


@pytest.fixture(scope="module")
def dev():
    try:
        dev = R.get_device()
    except R.NoAdapterError as exc:
        pytest.skip(f"no wgpu adapter on this host: {exc}")
    if "shader-f16" not in dev.features:
        pytest.skip(f"{dev.describe()} lacks shader-f16: the f16 kernels cannot run here")
    return dev


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _check(got, want_low, want32, tol):
    np.testing.assert_allclose(got, want_low, **tol)
    assert np.abs(got - want_low).max() < 0.25 * np.abs(want32 - want_low).max(), "nearer f32 than its twin"


def linear_vs_twins(dev, rng, spec, n, k, rows, tuning, compute_dtype, prologue=None, accumulate=True, tol=F16_TOL,
                    contiguous3=True, prepare=None, spread3=False):
    """The matvec of ``compute_dtype`` ("f16": qmatvec_f16, qmatvec_norm_f16 for prologue "norm",
    qmatvec_silu_f16 for "silu"; "i8" likewise) against its twin of the same name, output in a
    column range of a wider buffer, and nearer that twin than the f32 reference. ``prepare``:
    called with the QuantLinear before it runs."""
    w = quantize_rtn(randn(rng, n, k), spec)
    y_stride, y_col = n + 3, 2
    y0 = randn(rng, rows, y_stride)
    yb = dev.upload(y0)
    prev = y0[:, y_col : y_col + n] if accumulate else None
    gw = KL.upload_quant(dev, w, contiguous3=contiguous3, spread3=spread3)
    kernel = {None: "qmatvec", "norm": "qmatvec_norm", "silu": "qmatvec_silu"}[prologue]
    twin, twin32 = getattr(ref, f"{kernel}_{compute_dtype}"), getattr(ref, kernel)
    if prologue == "silu":
        up_col = -(-k // 4) * 4 + 4
        x_stride = up_col + -(-k // 4) * 4
        src = randn(rng, rows, x_stride, scale=3.0)
        op = KL.QuantLinear(dev, gw, dev.upload(src), x_stride, yb, y_stride, y_col, accumulate, tuning=tuning,
                            silu_up_col=up_col, compute_dtype=compute_dtype)
        args = (src[:, :k], src[:, up_col : up_col + k], w)
    else:
        x = randn(rng, rows, k, scale=3.0 if prologue else 1.0)
        x_stride = -(-k // 4) * 4
        xpad = padded(x, x_stride)
        xpad[:, k:] = 7.0  # padding past k must enter neither the norm nor the sums
        norm, args = {}, (x, w)
        if prologue == "norm":
            nw = randn(rng, k)
            norm, args = {"norm": (dev.upload(nw), 1e-5)}, (x, w, nw, 1e-5)
        op = KL.QuantLinear(dev, gw, dev.upload(xpad), x_stride, yb, y_stride, y_col, accumulate, tuning=tuning,
                            compute_dtype=compute_dtype, **norm)
    assert op.matvec_kernel == f"{kernel}_{compute_dtype}" + ("+subgroup" if tuning.matvec_subgroup else "")
    if prepare is not None:
        prepare(op)
    dev.run([op], rows)
    got = dev.read(yb, count=rows * y_stride).reshape(rows, y_stride)
    _check(got[:, y_col : y_col + n], twin(*args, prev), twin32(*args, prev), tol)
    np.testing.assert_array_equal(got[:, :y_col], y0[:, :y_col])  # nothing outside the range
    np.testing.assert_array_equal(got[:, y_col + n :], y0[:, y_col + n :])


def _linear_f16(dev, rng, spec, n, k, rows, tuning, prologue=None, accumulate=True, tol=F16_TOL, contiguous3=True):
    linear_vs_twins(dev, rng, spec, n, k, rows, tuning, "f16", prologue, accumulate, tol, contiguous3)


@pytest.mark.parametrize("tuning", list(TUNINGS))
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_qmatvec_f16(dev, rng, spec, tuning):
    # odd n; k = 70 is a multiple of no group size (nor of 4); 3 batch rows in a ROWS=4 workgroup
    _linear_f16(dev, rng, spec, n=37, k=70, rows=3, tuning=TUNINGS[tuning])


@pytest.mark.parametrize("prologue", [None, "norm", "silu"])
@pytest.mark.parametrize("spec", SPECS_3BIT, ids=lambda s: s.name)
def test_qmatvec_f16_3bit_planes(dev, rng, spec, prologue):
    # the bit planes the browser's backend uploads (the default upload repacks 3-bit codes contiguous)
    _linear_f16(dev, rng, spec, n=37, k=70, rows=3, tuning=TUNINGS["gpu"], prologue=prologue, contiguous3=False)


@pytest.mark.parametrize("tuning", list(TUNINGS))
@pytest.mark.parametrize("rows", [1, 8, 11])
def test_qmatvec_f16_batch_rows(dev, rng, rows, tuning):
    # ROWS = 1, 8, and two workgroup rows of 8 with masked rows; k = 200: a ragged last block
    _linear_f16(dev, rng, QuantSpec(4, 64, True), n=70, k=200, rows=rows, tuning=TUNINGS[tuning], accumulate=False)


@pytest.mark.parametrize("prologue", ["norm", "silu"])
@pytest.mark.parametrize("tuning", list(TUNINGS))
@pytest.mark.parametrize("rows", [1, 3, 11])
def test_qmatvec_fused_f16(dev, rng, prologue, tuning, rows):
    _linear_f16(dev, rng, QuantSpec(4, 32, False), n=37, k=70, rows=rows, tuning=TUNINGS[tuning], prologue=prologue)


@pytest.mark.parametrize("prologue", [None, "norm", "silu"])
@pytest.mark.parametrize("spec", [QuantSpec(3, 64, True), QuantSpec(8, 32, False), QuantSpec(2, 128, False)],
                         ids=lambda s: s.name)
def test_qmatvec_f16_formats_at_model_width(dev, rng, prologue, spec):
    # k = 576 (SmolLM2's hidden size), rows 5: ROWS = 8 with three masked rows
    _linear_f16(dev, rng, spec, n=45, k=576, rows=5, tuning=TUNINGS["gpu"], prologue=prologue, accumulate=False,
                tol=F16_TOL_WIDE)


def test_f16_twins_round_where_the_shaders_do(rng):
    """The twins themselves: f16 weights are scale * q + min rounded once, and the result
    stays within half precision's reach of the f32 reference (3 roundings per term)."""
    w = quantize_rtn(randn(rng, 40, 576), QuantSpec(8, 32, False))
    w16 = ref.dequantize_f16(w)
    assert w16.dtype == np.float16
    np.testing.assert_allclose(w16.astype(np.float32), w.dequantize(), rtol=2.0**-11, atol=2.0**-25)
    x = randn(rng, 3, 576)
    terms = np.abs(x)[:, None, :] * np.abs(w.dequantize())[None]
    bound = 3 * 2.0**-11 * terms.sum(-1) + 576 * 2.0**-24  # 3 roundings per term (f16 subnormals: absolute)
    assert np.all(np.abs(ref.qmatvec_f16(x, w) - ref.qmatvec(x, w)) <= bound)


def test_f16_kernels_match_their_f32_siblings_interface():
    """The browser loads the f32 files only; an f16 file is a drop-in for its sibling: same
    Params, same bindings, and its only extension is f16."""
    dev_free = R.Device.__new__(R.Device)  # params_fields reads sources only
    dev_free._params = {}
    for path in sorted(R.KERNEL_DIR.glob("*_f16.wgsl")):
        sibling = path.stem[: -len("_f16")]
        source = path.read_text()
        assert source.startswith("enable f16;\n") and source.count("enable ") == 1, path.name
        assert dev_free.params_fields(path.stem) == dev_free.params_fields(sibling)
        bindings = [line for line in source.splitlines() if line.startswith("@group")]
        assert bindings == [line for line in (R.KERNEL_DIR / f"{sibling}.wgsl").read_text().splitlines()
                            if line.startswith("@group")], path.name


def test_f16_kernel_refused_without_shader_f16(dev):
    saved = dev.features
    dev.features = saved - {"shader-f16"}
    try:
        with pytest.raises(R.LimitError, match="needs the shader-f16 feature"):
            dev.pipeline("qmatvec_f16", BITS=4, GROUP=32, SYMMETRIC=False, WG=32, TPR=2, ROWS=4)  # never cached
    finally:
        dev.features = saved
