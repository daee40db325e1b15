"""Parity of every WGSL kernel with its numpy twin (kernels/reference.py), on whatever wgpu
adapter this host has (lavapipe on CPU-only machines). Shapes are small and awkward on
purpose: odd row counts, k not a multiple of the quant group, batches that fill no tile.

Tolerances are f32 round-off: a dot product over k inputs of unit-scale values differs by
a few ulp of its partial sums, hence atol around 1e-5 * sqrt(k) and rtol 1e-4 throughout.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from kernels import reference as ref
from kernels import runner as R
from kernels import launchers as KL
from kernels import wgsl_source
from kernels.quant import SUPPORTED_BITS, SUPPORTED_GROUPS, QuantSpec, contiguous_3bit, pack_codes, quantize_rtn

SPECS = [QuantSpec(b, g, s) for b, g, s in itertools.product(SUPPORTED_BITS, SUPPORTED_GROUPS, (False, True))]
# 3-bit tensors upload with contiguous codes (kernels.quant.contiguous_3bit, the kernels' CONTIG3)
# by default; these run the bit planes the blobs carry and the browser's backend uploads
SPECS_3BIT = [s for s in SPECS if s.bits == 3]
MATMUL_TOL = dict(atol=2e-4, rtol=1e-4)
# both shapes of qmatvec run on every adapter, whichever one matmul_tuning would pick here
# (the GPU's lane layouts too: include/qmatvec_lanes.wgsl, SPAN vec4s per lane step, OPT outputs per thread)
TUNINGS = {
    "gpu": KL.MatmulTuning(matvec_wg=256, matvec_max_tpr=32, matvec_max_rows=1 << 30, tile=64,
                          matvec_span=KL.GPU_MATVEC_SPAN, matvec_opt=KL.GPU_MATVEC_OPT, matvec_stage=KL.GPU_MATVEC_STAGE),
    # one row staged 8 vec4s (one block) a chunk: k = 70 takes three chunks, the last one short
    "gpu-staged8": KL.MatmulTuning(matvec_wg=64, matvec_max_tpr=32, matvec_max_rows=1 << 30, tile=64,
                                  matvec_span=2, matvec_opt=4, matvec_stage=8),
    "gpu-blocks": KL.MatmulTuning(matvec_wg=256, matvec_max_tpr=32, matvec_max_rows=1 << 30, tile=64),
    "gpu-span2-opt4": KL.MatmulTuning(matvec_wg=128, matvec_max_tpr=32, matvec_max_rows=1 << 30, tile=64,
                                     matvec_span=2, matvec_opt=4),
    "cpu": KL.MatmulTuning(matvec_wg=64, matvec_max_tpr=1, matvec_max_rows=1 << 30, tile=64),
}
# the lanes summed by subgroup shuffles (the K+subgroup kernels) in runs of 4: at most any
# lavapipe's subgroup (4, 8 or 16 lanes by the CPU's vector width), and runs of 4 lanes of a wider
# subgroup sum alike; whole outputs in one run (TPR <= 4), several runs an output, and the inverse
# RMS over 64 (two rounds of shuffles) and 256 threads (shuffles, then the tree); the f16 kernels
# walk whole blocks at every tuning, so gpu-subgroup runs the blocks path's sums too
TUNINGS.update({f"{name}-subgroup": dataclasses.replace(TUNINGS[name], matvec_subgroup=4)
                for name in ("gpu", "gpu-staged8")})


def _device(**kwargs) -> R.Device:
    try:
        return R.Device(**kwargs)
    except R.NoAdapterError as exc:
        pytest.skip(f"no wgpu adapter on this host: {exc}")


@pytest.fixture(scope="module")
def dev():
    return _device()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def padded(x: np.ndarray, stride: int) -> np.ndarray:
    out = np.zeros((x.shape[0], stride), np.float32)
    out[:, : x.shape[1]] = x
    return out


def read_rows(dev, buf, rows, stride, cols, dtype=np.float32, col=0):
    return dev.read(buf, dtype, count=rows * stride).reshape(rows, stride)[:, col : col + cols]


# ---------------------------------------------------------------------------- meta


def test_every_kernel_has_a_numpy_twin_and_portable_source():
    kernels = sorted(p.stem for p in R.KERNEL_DIR.glob("*.wgsl"))
    assert kernels, "no kernels found"
    for name in kernels:
        assert callable(getattr(ref, name, None)), f"{name}.wgsl has no reference.{name}"
        source = wgsl_source(name)
        # Chromium's Tint must load these too: no extensions (f16 only in the NAME_f16 variants,
        # which only shader-f16 devices load: see test_kernels_f16.py)
        assert "enable " not in source or name.endswith("_f16"), f"{name}.wgsl enables an extension"


def test_device_reports_adapter_and_caches_pipelines(dev):
    info = dev.adapter_info
    assert {"device", "description", "vendor", "adapter_type", "is_fallback"} <= set(info)
    assert dev.limits["max-storage-buffer-binding-size"] >= 128 * 2**20
    if "llvmpipe" in str(info["device"]).lower():
        assert not dev.is_real_gpu() and info["is_fallback"]
    consts = dict(BITS=4, GROUP=32, SYMMETRIC=False, WG=64, TPR=8, ROWS=1)
    assert dev.pipeline("qmatvec", **consts) is dev.pipeline("qmatvec", **consts)


# ---------------------------------------------------------------------------- matmuls


def _quant_linear(dev, rng, spec, n, k, rows, matvec_max_rows, accumulate=False, tuning=None, contiguous3=True):
    w = quantize_rtn(randn(rng, n, k), spec)
    x = randn(rng, rows, k)
    x_stride = -(-k // 4) * 4
    y_stride, y_col = n + 3, 2  # output lands in a column range of a wider buffer
    y0 = randn(rng, rows, y_stride)
    xb, yb = dev.upload(padded(x, x_stride)), dev.upload(y0)
    gw = KL.upload_quant(dev, w, contiguous3=contiguous3)
    assert gw.contiguous3 == (contiguous3 and spec.bits == 3)
    op = KL.QuantLinear(dev, gw, xb, x_stride, yb, y_stride, y_col, accumulate, matvec_max_rows, tuning)
    dev.run([op], rows)
    got = dev.read(yb, count=rows * y_stride).reshape(rows, y_stride)
    want = ref.qmatvec(x, w, y0[:, y_col : y_col + n] if accumulate else None)
    np.testing.assert_allclose(got[:, y_col : y_col + n], want, **MATMUL_TOL)
    np.testing.assert_array_equal(got[:, :y_col], y0[:, :y_col])  # nothing outside the range
    np.testing.assert_array_equal(got[:, y_col + n :], y0[:, y_col + n :])


@pytest.mark.parametrize("tuning", list(TUNINGS))
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_qmatvec(dev, rng, spec, tuning):
    # odd n; k = 70 is a multiple of no group size (nor of 4); 3 batch rows in a ROWS=4 workgroup
    _quant_linear(dev, rng, spec, n=37, k=70, rows=3, matvec_max_rows=8, tuning=TUNINGS[tuning])


def test_contiguous_3bit_puts_input_j_at_bit_3j(rng):
    codes = rng.integers(0, 8, (5, 128), dtype=np.uint8)
    words = contiguous_3bit(pack_codes(codes, 3))
    assert words.dtype == np.uint32 and words.shape == (5, 12)
    for r, b in itertools.product(range(5), range(4)):
        block = sum(int(words[r, 3 * b + i]) << (32 * i) for i in range(3))
        assert [(block >> (3 * j)) & 7 for j in range(32)] == codes[r, 32 * b : 32 * b + 32].tolist()


@pytest.mark.parametrize("tuning", list(TUNINGS))
@pytest.mark.parametrize("spec", SPECS_3BIT, ids=lambda s: s.name)
def test_qmatvec_3bit_planes(dev, rng, spec, tuning):
    _quant_linear(dev, rng, spec, n=37, k=70, rows=3, matvec_max_rows=8, tuning=TUNINGS[tuning], contiguous3=False)


@pytest.mark.parametrize("spec", SPECS_3BIT, ids=lambda s: s.name)
def test_qmatmul_3bit_planes(dev, rng, spec):
    _quant_linear(dev, rng, spec, n=37, k=70, rows=67, matvec_max_rows=0, contiguous3=False)


@pytest.mark.parametrize("stage", [0, 8, 512])
@pytest.mark.parametrize("spec,contiguous3", [(QuantSpec(b, 64, s), True) for b in SUPPORTED_BITS for s in (False, True)]
                         + [(QuantSpec(3, 64, s), False) for s in (False, True)], ids=str)
def test_qmatvec_one_row_long_k(dev, rng, spec, contiguous3, stage):
    # the GPU's single-row layouts over several of XT's chunks (k = 4200: three chunks of 2048
    # inputs, the last one 104 long and its last block short), staged or not
    tuning = KL.MatmulTuning(matvec_wg=128, matvec_max_tpr=32, matvec_max_rows=1 << 30, tile=64,
                             matvec_span=2, matvec_opt=4, matvec_stage=stage)
    _quant_linear(dev, rng, spec, n=9, k=4200, rows=1, matvec_max_rows=8, tuning=tuning, contiguous3=contiguous3)


@pytest.mark.parametrize("rows", [3, 5])
@pytest.mark.parametrize("spec", [QuantSpec(3, 64, True), QuantSpec(4, 32, False), QuantSpec(8, 128, False)], ids=lambda s: s.name)
def test_qmatvec_rows_staged_long_k(dev, rng, spec, rows):
    # several batch rows staged together (ROWS = 4 and 8: 248 and 120 vec4s of each row a chunk)
    # over many chunks, the last one short
    tuning = KL.MatmulTuning(matvec_wg=128, matvec_max_tpr=32, matvec_max_rows=1 << 30, tile=64,
                             matvec_span=2, matvec_opt=4, matvec_stage=512)
    _quant_linear(dev, rng, spec, n=9, k=4200, rows=rows, matvec_max_rows=8, tuning=tuning)


# batches of tall matrices staged in larger workgroups (MatmulTuning.matvec_tall_batch_wg): the
# thresholds lowered so that small matrices take the path; 128 threads for the others, 256 for them
TALL_TUNING = KL.MatmulTuning(matvec_wg=128, matvec_max_tpr=32, matvec_max_rows=1 << 30, tile=64, matvec_span=2,
                              matvec_opt=4, matvec_stage=512, matvec_stage_rows_min_k=1 << 30, matvec_tall_batch_wg=256)


@pytest.fixture
def tall_at_64(monkeypatch):
    monkeypatch.setattr(KL, "TALL_N", 64)
    monkeypatch.setattr(KL, "TALL_K", 256)


def _assert_tall_batch(dev, n, k, rows, spec=QuantSpec(4, 32, False)):
    op = KL.QuantLinear(dev, KL.GpuQuantTensor(spec, n, k, []), None, 4 * -(-k // 4), None, n, tuning=TALL_TUNING)
    consts, _, _ = op.matvec_grid(rows)
    assert consts["WG"] == 256 and consts.get("XT"), consts


@pytest.mark.parametrize("rows", [3, 8])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_qmatvec_tall_batches_staged(dev, rng, tall_at_64, spec, rows):
    # k = 1000: a ragged last block and group; 3 rows masked in a ROWS=4 workgroup
    _assert_tall_batch(dev, 70, 1000, rows, spec)
    _quant_linear(dev, rng, spec, n=70, k=1000, rows=rows, matvec_max_rows=8, tuning=TALL_TUNING)


@pytest.mark.parametrize("prologue", ["norm", "silu"])
@pytest.mark.parametrize("spec", [QuantSpec(3, 64, True), QuantSpec(4, 32, False), QuantSpec(8, 128, True)], ids=lambda s: s.name)
def test_qmatvec_tall_batches_staged_fused(dev, rng, tall_at_64, prologue, spec):
    # k = 4200: several chunks of x, the last one short
    _assert_tall_batch(dev, 65, 4200, 8, spec)
    _fused_linear(dev, rng, spec, n=65, k=4200, rows=8, tuning=TALL_TUNING, prologue=prologue)


@pytest.mark.parametrize("tuning", list(TUNINGS))
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 11, 19])
def test_qmatvec_batch_rows(dev, rng, rows, tuning):
    # ROWS = 1, 2, 8 with masked rows, and several workgroup rows of 8
    _quant_linear(dev, rng, QuantSpec(4, 64, True), n=70, k=200, rows=rows, matvec_max_rows=32, tuning=TUNINGS[tuning])


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_qmatmul(dev, rng, spec):
    # 67 rows and 37 outputs fill no 64x64 tile exactly
    _quant_linear(dev, rng, spec, n=37, k=70, rows=67, matvec_max_rows=0)


@pytest.mark.parametrize("tile", [16, 32])
def test_qmatmul_smaller_tiles(dev, rng, tile):
    tuning = KL.MatmulTuning(matvec_wg=64, matvec_max_tpr=1, matvec_max_rows=0, tile=tile)
    _quant_linear(dev, rng, QuantSpec(2, 32, False), n=37, k=70, rows=35, matvec_max_rows=0, tuning=tuning)


@pytest.mark.parametrize("matvec_max_rows", [8, 0], ids=["qmatvec", "qmatmul"])
def test_quant_linear_accumulates_and_handles_long_rows(dev, rng, matvec_max_rows):
    # k = 1000: many blocks per thread, a ragged last block; accumulate = residual add
    _quant_linear(dev, rng, QuantSpec(4, 32, False), n=70, k=1000, rows=5, matvec_max_rows=matvec_max_rows,
                  accumulate=True, tuning=TUNINGS["gpu"])


@pytest.mark.parametrize("k", [1, 5, 32, 33, 128, 576])
def test_qmatvec_k_edge_cases(dev, rng, k):
    _quant_linear(dev, rng, QuantSpec(3, 128, True), n=9, k=k, rows=2, matvec_max_rows=8, tuning=TUNINGS["gpu"])


# ---------------------------------------------------------------------------- fused decode matvecs


def _fused_linear(dev, rng, spec, n, k, rows, tuning, prologue, accumulate=True, contiguous3=True):
    """qmatvec_norm (prologue "norm") or qmatvec_silu ("silu") against their twins, output
    in a column range of a wider buffer."""
    w = quantize_rtn(randn(rng, n, k), spec)
    gw = KL.upload_quant(dev, w, contiguous3=contiguous3)
    y_stride, y_col = n + 3, 2
    y0 = randn(rng, rows, y_stride)
    yb = dev.upload(y0)
    if prologue == "norm":
        x, nw = randn(rng, rows, k, scale=3.0), randn(rng, k)
        x_stride = -(-k // 4) * 4
        xpad = padded(x, x_stride)
        xpad[:, k:] = 7.0  # padding past k must not enter the norm
        op = KL.QuantLinear(dev, gw, dev.upload(xpad), x_stride, yb, y_stride, y_col, accumulate,
                           tuning=tuning, norm=(dev.upload(nw), 1e-5))
        want = ref.qmatvec_norm(x, w, nw, 1e-5, y0[:, y_col : y_col + n] if accumulate else None)
    else:
        up_col = -(-k // 4) * 4 + 4
        x_stride = up_col + -(-k // 4) * 4
        src = randn(rng, rows, x_stride, scale=3.0)
        op = KL.QuantLinear(dev, gw, dev.upload(src), x_stride, yb, y_stride, y_col, accumulate,
                           tuning=tuning, silu_up_col=up_col)
        want = ref.qmatvec_silu(src[:, :k], src[:, up_col : up_col + k], w, y0[:, y_col : y_col + n] if accumulate else None)
    dev.run([op], rows)
    got = dev.read(yb, count=rows * y_stride).reshape(rows, y_stride)
    np.testing.assert_allclose(got[:, y_col : y_col + n], want, atol=5e-4, rtol=2e-4)
    np.testing.assert_array_equal(got[:, :y_col], y0[:, :y_col])
    np.testing.assert_array_equal(got[:, y_col + n :], y0[:, y_col + n :])


@pytest.mark.parametrize("prologue", ["norm", "silu"])
@pytest.mark.parametrize("tuning", list(TUNINGS))
@pytest.mark.parametrize("rows", [1, 3, 8, 11])
def test_qmatvec_fused_prologues(dev, rng, prologue, tuning, rows):
    # k = 70: no multiple of the group nor of 4; rows 3 (ROWS=4, masked), 8, 11 (two workgroup rows)
    _fused_linear(dev, rng, QuantSpec(4, 32, False), n=37, k=70, rows=rows, tuning=TUNINGS[tuning], prologue=prologue)


@pytest.mark.parametrize("prologue", ["norm", "silu"])
@pytest.mark.parametrize("spec", [QuantSpec(3, 64, True), QuantSpec(8, 32, True), QuantSpec(2, 128, False)], ids=lambda s: s.name)
def test_qmatvec_fused_formats_and_overwrite(dev, rng, prologue, spec):
    _fused_linear(dev, rng, spec, n=45, k=576, rows=2, tuning=TUNINGS["gpu"], prologue=prologue, accumulate=False)


@pytest.mark.parametrize("prologue", ["norm", "silu"])
@pytest.mark.parametrize("tuning", list(TUNINGS))
@pytest.mark.parametrize("rows", [1, 8])
def test_qmatvec_fused_3bit_planes(dev, rng, prologue, tuning, rows):
    _fused_linear(dev, rng, QuantSpec(3, 64, False), n=37, k=70, rows=rows, tuning=TUNINGS[tuning], prologue=prologue,
                  contiguous3=False)


def test_fused_linear_refuses_batches_above_matvec_max_rows(dev, rng):
    w = KL.upload_quant(dev, quantize_rtn(randn(rng, 8, 32), QuantSpec(4, 32)))
    xb, yb, nw = dev.buffer(16 * 32 * 4), dev.buffer(16 * 8 * 4), dev.buffer(32 * 4)
    op = KL.QuantLinear(dev, w, xb, 32, yb, 8, matvec_max_rows=4, norm=(nw, 1e-5))
    with pytest.raises(ValueError, match="qmatvec_norm serves up to 4 rows"):
        dev.run([op], 5)
    # ByRows picks the unfused ops above the limit
    plain = KL.QuantLinear(dev, w, xb, 32, yb, 8, matvec_max_rows=4)
    assert len(dev.plan([KL.ByRows(4, [op], [KL.RmsNorm(dev, xb, 32, nw, xb, 32, 32, 1e-5), plain])], 5)) == 2


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("n_heads,n_kv,head_dim,wg", [(4, 2, 8, 16), (9, 3, 64, 1024), (3, 1, 64, 64), (2, 2, 16, 256)])
def test_attention_rope(dev, rng, n_heads, n_kv, head_dim, wg, splits):
    """One dispatch = rope.wgsl on q and k + kv_store.wgsl + attention.wgsl: the output, the
    caches and split-K's partials bit for bit those three kernels' on the same inputs, the
    fused qkv rows left untouched, and the twin. Rows: a 5-row prefill (each row reads keys
    that rows before it in the batch bring), a decode row at 300 over a full cache (two chunks
    at small workgroups), a 2-row replay over a cache that held more (the stale tail unread).
    The batch holds them out of order, the prefill's later rows first: a rasteriser runs
    workgroups in order, and a row that read only the keys its own workgroups wrote would
    otherwise find its predecessors' already stored."""
    base, ctx = 100000.0, 320
    sessions = [(2, 0, 5), (0, 300, 1), (1, 3, 2)]
    n_slots = 3
    slots = np.concatenate([[s] * n for s, _, n in sessions]).astype(np.uint32)
    positions = np.concatenate([np.arange(p, p + n) for _, p, n in sessions]).astype(np.uint32)
    rows = len(slots)
    q_dim, kv_dim = n_heads * head_dim, n_kv * head_dim
    stride = q_dim + 2 * kv_dim + 4
    qkv = randn(rng, rows, stride)
    caches = randn(rng, 2, n_slots, n_kv, ctx, head_dim)
    order = np.array([4, 5, 3, 2, 6, 1, 0, 7])  # batch row b holds row order[b]
    freq, pb, sb = (dev.upload(a) for a in (KL.rope_freq_turns(head_dim, base), positions[order], slots[order]))
    wg = min(wg, dev.workgroup_size(wg))
    results = []
    for fused in (True, False):
        xb, kb, vb, out = dev.upload(qkv[order]), dev.upload(caches[0]), dev.upload(caches[1]), dev.buffer(rows * q_dim * 4)
        attend = KL.Attention(dev, xb, stride, 0, pb, sb, kb, vb, out, q_dim, n_heads, n_kv, head_dim, ctx, wg=wg,
                              splits=splits, max_rows=rows, rope=(freq, q_dim, q_dim + kv_dim) if fused else None)
        ops = [attend] if fused else [KL.Rope(dev, xb, stride, 0, n_heads + n_kv, head_dim, pb, freq),
                                      KL.KvStore(dev, xb, stride, q_dim, q_dim + kv_dim, pb, sb, kb, vb, n_kv, head_dim, ctx),
                                      attend]
        assert len(dev.plan(ops, rows)) == (1 if fused else 3) + (splits > 1)
        dev.run(ops, rows)
        results.append([dev.read(b, count=n).reshape(shape) for b, n, shape in
                        ((out, rows * q_dim, (rows, q_dim)), (kb, caches[0].size, caches[0].shape),
                         (vb, caches[1].size, caches[1].shape), (attend.parts, None, (-1,)), (xb, qkv.size, qkv.shape))])
    for got, want in zip(results[0][:4], results[1][:4]):
        np.testing.assert_array_equal(got, want)
    got_batch, got_k, got_v, _, got_qkv = results[0]
    np.testing.assert_array_equal(got_qkv, qkv[order])  # the fused kernel only reads the qkv rows
    got = np.empty_like(got_batch)
    got[order] = got_batch
    r = 0
    for slot, start, n in sessions:
        q = qkv[r : r + n, :q_dim].reshape(n, n_heads, head_dim)
        k = qkv[r : r + n, q_dim : q_dim + kv_dim].reshape(n, n_kv, head_dim)
        v = qkv[r : r + n, q_dim + kv_dim : q_dim + 2 * kv_dim].reshape(n, n_kv, head_dim)
        kc, vc = caches[0][slot].copy(), caches[1][slot].copy()
        want = ref.attention_rope(q, k, v, positions[r : r + n], base, kc, vc, start)
        np.testing.assert_allclose(got[r : r + n], want.reshape(n, q_dim), atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(got_k[slot], kc, atol=2e-4, rtol=0)  # the turned keys; the rest unchanged
        np.testing.assert_array_equal(got_v[slot], vc)
        r += n


# ---------------------------------------------------------------------------- the rest


@pytest.mark.parametrize("spec,contiguous3", [(s, True) for s in SPECS] + [(s, False) for s in SPECS_3BIT], ids=str)
def test_embedding(dev, rng, spec, contiguous3):
    table = quantize_rtn(randn(rng, 50, 70), spec)
    ids = np.array([3, 49, 0, 3, 17], np.uint32)
    yb = dev.buffer(len(ids) * 72 * 4)
    dev.run([KL.Embedding(dev, KL.upload_quant(dev, table, contiguous3=contiguous3), dev.upload(ids), yb, 72)], len(ids))
    np.testing.assert_allclose(read_rows(dev, yb, len(ids), 72, 70), ref.embedding(ids, table), atol=1e-6, rtol=0)


def test_readback_by_spinning_wait(dev, rng):
    # a real GPU's readback maps and polls without waiting until the map resolves
    # (runner.SPIN_WAIT): the same bytes as the blocking wait's, here forced on whatever adapter this is
    assert R.RAW_POLL is not None  # else the spinning branch never runs and this compares the blocking wait with itself
    n, stride = 576, 580
    x, w = randn(rng, 3, n), randn(rng, n)
    yb = dev.buffer(3 * stride * 4)
    op = KL.RmsNorm(dev, dev.upload(padded(x, stride)), stride, dev.upload(w), yb, stride, n, 1e-5)
    got = []
    for spin in (False, True):
        dev._real_gpu = spin
        try:
            got.append(dev.execute(dev.plan([op], 3), readback=[(yb, 0, 3 * stride * 4)]).view(np.float32))
        finally:
            dev._real_gpu = None
    np.testing.assert_array_equal(got[0], got[1])
    np.testing.assert_allclose(got[1].reshape(3, stride)[:, :n], ref.rmsnorm(x, w, 1e-5), atol=1e-5, rtol=1e-5)


def test_a_repeated_plan_is_recorded_ahead(dev, rng):
    # on a real GPU (forced here) a readback step that repeats the last call's plan records the
    # next repeat's command buffer while the GPU runs (runner.ENCODE_AHEAD), and the next call
    # submits it: inputs written between the calls are still the ones computed on
    n, stride = 576, 580
    w = randn(rng, n)
    xb, yb = dev.buffer(3 * stride * 4), dev.buffer(3 * stride * 4)
    op = KL.RmsNorm(dev, xb, stride, dev.upload(w), yb, stride, n, 1e-5)
    plan = dev.plan([op], 3)
    dev._real_gpu = True
    try:
        used = dev.encoded_ahead_used
        for rows_plan, rows in ((plan, 3), (plan, 3), (plan, 3), (plan, 3), (dev.plan([op], 2), 2)):
            x = randn(rng, 3, n)
            dev.write(xb, padded(x, stride))
            # submit_every as the wgpu backend's steps: what is recorded ahead is one command buffer
            got = dev.execute(rows_plan, submit_every=1, readback=[(yb, 0, rows * stride * 4)]).view(np.float32)
            np.testing.assert_allclose(got.reshape(rows, stride)[:, :n], ref.rmsnorm(x[:rows], w, 1e-5), atol=1e-5, rtol=1e-5)
        # the 3rd and 4th calls submitted what the 2nd and 3rd recorded; the last, another plan, recorded its own
        assert dev.encoded_ahead_used - used == 2
    finally:
        dev._real_gpu = None


@pytest.mark.parametrize("n", [1, 70, 576])
def test_rmsnorm(dev, rng, n):
    rows, stride = 5, n + 6
    x, w = randn(rng, rows, n, scale=3.0), randn(rng, n)
    yb = dev.buffer(rows * stride * 4)
    dev.run([KL.RmsNorm(dev, dev.upload(padded(x, stride)), stride, dev.upload(w), yb, stride, n, 1e-5)], rows)
    np.testing.assert_allclose(read_rows(dev, yb, rows, stride, n), ref.rmsnorm(x, w, 1e-5), atol=1e-5, rtol=1e-5)


def _rope_exact(heads, positions, base):
    head_dim = heads.shape[-1]
    angle = positions[:, None].astype(np.float64) * float(base) ** (-np.arange(0, head_dim, 2) / head_dim)
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    even, odd = heads[..., 0::2].astype(np.float64), heads[..., 1::2].astype(np.float64)
    return np.stack([even * cos - odd * sin, even * sin + odd * cos], -1).reshape(len(heads), -1)


@pytest.mark.parametrize("head_dim", [8, 64])
def test_rope(dev, rng, head_dim):
    n_heads, x_col, base = 3, 4, 100000.0
    positions = np.array([0, 1, 2, 7, 100, 1000, 4095, 8191, 65535], np.uint32)
    rows, stride = len(positions), x_col + n_heads * head_dim + 4
    x = randn(rng, rows, stride)
    xb = dev.upload(x)
    dev.run([KL.Rope(dev, xb, stride, x_col, n_heads, head_dim, dev.upload(positions), dev.upload(KL.rope_freq_turns(head_dim, base)))], rows)
    got = dev.read(xb, count=x.size).reshape(rows, stride)
    heads = x[:, x_col : x_col + n_heads * head_dim].reshape(rows, n_heads, head_dim)
    got_heads = got[:, x_col : x_col + n_heads * head_dim]
    # against exact (float64) angles: the shader's angle is good to ~1e-6 rad at any position
    np.testing.assert_allclose(got_heads, _rope_exact(heads, positions, base), atol=2e-5, rtol=0)
    # the twin rounds pos * inv_freq to f32 like HF transformers: ~pos * 1e-7 rad off exact
    near = positions <= 1000
    want = ref.rope(heads[near], positions[near], base).reshape(near.sum(), -1)
    np.testing.assert_allclose(got_heads[near], want, atol=2e-4, rtol=0)
    np.testing.assert_array_equal(got[:, :x_col], x[:, :x_col])


def _attention_case(dev, rng, n_heads, n_kv, head_dim, ctx, sessions, wg=None, splits=1, parts_out=None):
    """sessions: [(slot, start_pos, length, cached)]: each writes rows at [start, start+length)
    into its slot over `cached` random positions already there; returns got, want. With
    ``splits`` > 1 (split-K), ``parts_out`` (a list) gets the partials read back and their twin's."""
    n_slots = max(s for s, *_ in sessions) + 1
    k_cache, v_cache = randn(rng, n_slots, n_kv, ctx, head_dim), randn(rng, n_slots, n_kv, ctx, head_dim)
    slots = np.concatenate([[s] * n for s, _, n, _ in sessions]).astype(np.uint32)
    positions = np.concatenate([np.arange(p, p + n) for _, p, n, _ in sessions]).astype(np.uint32)
    rows = len(slots)
    q_dim, kv_dim = n_heads * head_dim, n_kv * head_dim
    stride = q_dim + 2 * kv_dim
    qkv = randn(rng, rows, stride)
    kb, vb, out = dev.upload(k_cache), dev.upload(v_cache), dev.buffer(rows * q_dim * 4)
    pb, sb, qb = dev.upload(positions), dev.upload(slots), dev.upload(qkv)
    ops = [KL.KvStore(dev, qb, stride, q_dim, q_dim + kv_dim, pb, sb, kb, vb, n_kv, head_dim, ctx),
           KL.Attention(dev, qb, stride, 0, pb, sb, kb, vb, out, q_dim, n_heads, n_kv, head_dim, ctx, wg=wg,
                        splits=splits, max_rows=rows)]
    dev.run(ops, rows)
    got = dev.read(out, count=rows * q_dim).reshape(rows, q_dim)
    if parts_out is not None:
        parts_out.append(dev.read(ops[1].parts).reshape(rows, n_heads, splits, head_dim // 4 + 1, 4))
    want, r = [], 0
    for slot, start, n, _ in sessions:
        k_new = qkv[r : r + n, q_dim : q_dim + kv_dim].reshape(n, n_kv, head_dim)
        v_new = qkv[r : r + n, q_dim + kv_dim :].reshape(n, n_kv, head_dim)
        kc, vc = k_cache[slot].copy(), v_cache[slot].copy()
        ref.kv_store(k_new, v_new, kc, vc, start)
        q = qkv[r : r + n, :q_dim].reshape(n, n_heads, head_dim)
        want.append(ref.attention(q, kc[:, : start + n], vc[:, : start + n], start).reshape(n, q_dim))
        if parts_out is not None:
            parts_out.append(ref.attention_partials(q, kc[:, : start + n], vc[:, : start + n], start, splits))
        r += n
    kv_got = dev.read(kb, count=k_cache.size).reshape(k_cache.shape)
    return got, np.concatenate(want), kv_got, k_cache, qkv, slots, positions


@pytest.mark.parametrize("n_heads,n_kv,head_dim", [(4, 2, 8), (3, 1, 64), (2, 2, 16)])
def test_kv_store_and_attention_batched_sessions(dev, rng, n_heads, n_kv, head_dim):
    # slot 2 prefills 5 rows; slot 0 decodes one row at 300 (two 256-key chunks); slot 1
    # replays rows 3-4 over a cache that had more (the stale tail stays unread)
    sessions = [(2, 0, 5, 0), (0, 300, 1, 300), (1, 3, 2, 9)]
    got, want, kv_got, kv_before, qkv, slots, positions = _attention_case(dev, rng, n_heads, n_kv, head_dim, 320, sessions)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    q_dim, kv_dim = n_heads * head_dim, n_kv * head_dim
    expect = kv_before.copy()
    for r, (s, p) in enumerate(zip(slots, positions)):
        expect[s, :, p] = qkv[r, q_dim : q_dim + kv_dim].reshape(n_kv, head_dim)
    np.testing.assert_array_equal(kv_got, expect)


def test_silu_gate_and_residual_add(dev, rng):
    rows, n = 3, 70
    src = randn(rng, rows, 2 * n + 2, scale=4.0)
    yb = dev.buffer(rows * n * 4)
    dev.run([KL.SiluGate(dev, dev.upload(src), 2 * n + 2, 1, n + 2, yb, n, n)], rows)
    np.testing.assert_allclose(read_rows(dev, yb, rows, n, n), ref.silu_gate(src[:, 1 : n + 1], src[:, n + 2 :]), atol=1e-5, rtol=1e-5)
    x, y = randn(rng, rows, n + 2), randn(rng, rows, n)
    yb = dev.upload(y)
    dev.run([KL.ResidualAdd(dev, dev.upload(x), n + 2, yb, n, n)], rows)
    np.testing.assert_allclose(read_rows(dev, yb, rows, n, n), ref.residual_add(y, x[:, :n]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("wg", [16, 64, 256, 1024])
@pytest.mark.parametrize("head_dim", [8, 20, 64])
def test_attention_every_workgroup_size(dev, rng, wg, head_dim):
    """Parts of LANES = head_dim / 4 threads fold pairwise: odd part counts (head_dim 20 at
    WG 64: 12 parts, 4 idle threads), one part (WG 16, head_dim 64), 256 parts."""
    sessions = [(1, 0, 3, 0), (0, 1500, 1, 1500), (2, 37, 2, 40)]
    got, want, *_ = _attention_case(dev, rng, 6, 2, head_dim, 1600, sessions, wg=min(wg, dev.workgroup_size(wg)))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("splits", [2, 3, 8])
@pytest.mark.parametrize("wg", [16, 64, 1024])
def test_split_attention_matches_its_twins(dev, rng, splits, wg):
    """Split-K: each split's partials are attention_partials', folded they are attention's.
    Rows of 1 and 2 keys leave splits empty (max -3e38, sum 0); 1500 keys take several chunks
    a split at small workgroups."""
    sessions = [(1, 0, 3, 0), (0, 1500, 1, 1500), (2, 37, 2, 40)]
    parts = []
    got, want, *_ = _attention_case(dev, rng, 6, 2, 64, 1600, sessions, wg=min(wg, dev.workgroup_size(wg)),
                                    splits=splits, parts_out=parts)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    raw, twins = parts[0], parts[1:]
    acc, maxes, sums = (np.concatenate(x) for x in zip(*twins))
    np.testing.assert_allclose(raw[..., :-1, :].reshape(acc.shape), acc, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(raw[..., -1, 0], maxes, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(raw[..., -1, 1], sums, atol=1e-4, rtol=1e-4)
    assert (sums == 0).any() and (raw[..., -1, 1] == 0).any(), "no empty split exercised"
    combined = ref.attention_combine(acc, maxes, sums).reshape(got.shape)
    np.testing.assert_allclose(combined, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("wg", [64, 1024])
@pytest.mark.parametrize("vocab,k", [(300, 1), (70, 1), (49152, 1), (300, 64), (64, 64), (1024, 5), (3000, 40), (49152, 64), (5000, 700)])
def test_topk(dev, rng, vocab, k, wg):
    rows = 6
    logits = randn(rng, rows, vocab)
    logits[1] = np.round(logits[1])  # many ties: lower id first, also at the k-th place
    logits[2, 7], logits[2, 11] = np.nan, -np.inf
    logits[2, 100 % vocab] = 9.0
    logits[3] = 0.0  # all equal: the first k ids
    logits[3, vocab // 2] = -0.0  # equal to 0.0
    logits[4, :] = -np.inf  # all rank as the lowest finite value
    logits[4, vocab - 1] = np.nan
    logits[5] = np.float32(2.0) ** rng.integers(-20, 20, vocab)  # keys differing in high bits only
    op = KL.TopK(dev, dev.upload(logits), vocab, vocab, k, rows, wg=min(wg, dev.workgroup_size(wg)))
    dev.run([op], rows)
    ids = dev.read(op.ids, np.uint32, count=rows * k).reshape(rows, k)
    values = dev.read(op.values, count=rows * k).reshape(rows, k)
    want_ids, want_values = ref.topk(logits, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(values, want_values)


# ---------------------------------------------------------------------------- limits


def test_kernels_run_under_webgpu_default_limits(rng):
    """Any conformant browser grants these: 256 invocations, 16 KiB workgroup memory."""
    small = _device(limits="webgpu-default")
    assert small.limits["max-compute-invocations-per-workgroup"] == 256
    assert small.device.limits["max-compute-invocations-per-workgroup"] == 256
    _quant_linear(small, rng, QuantSpec(4, 32, False), n=37, k=70, rows=2, matvec_max_rows=8)
    _quant_linear(small, rng, QuantSpec(3, 64, True), n=37, k=70, rows=67, matvec_max_rows=0)
    for name in ("gpu", "gpu-span2-opt4"):  # the GPU lane layouts, 8 batch rows, norm folded in
        _fused_linear(small, rng, QuantSpec(3, 64, True), n=45, k=576, rows=8, tuning=TUNINGS[name], prologue="norm")
    got, want, *_ = _attention_case(small, rng, 3, 1, 64, 300, [(0, 290, 3, 290)])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    logits = randn(rng, 2, 3000)
    op = KL.TopK(small, small.upload(logits), 3000, 3000, 64, 2)
    small.run([op], 2)
    np.testing.assert_array_equal(small.read(op.ids, np.uint32, count=128).reshape(2, 64), ref.topk(logits, 64)[0])


def test_pipelines_beyond_the_limits_are_refused_like_a_browser():
    """wgpu-native builds override-sized workgroups beyond the device's limits; a browser
    refuses them, and so does Device.pipeline."""
    small = _device(limits="webgpu-default")
    assert small.workgroup_shape("qmatmul", dict(BITS=4, GROUP=32, SYMMETRIC=0, TILE=64)) == ((256, 1, 1), 16384)
    with pytest.raises(R.LimitError, match="maxComputeInvocationsPerWorkgroup 256"):
        small.pipeline("rmsnorm", WG=512)
    with pytest.raises(R.LimitError, match="maxComputeWorkgroupStorageSize 16384"):
        small.pipeline("topk", WG=256, KP=4096)
    small.pipeline("topk", WG=256, KP=1024)  # TopK.MAX_K fits the spec's 16 KiB


def test_small_binding_limit_splits_the_head_and_embedding(rng):
    """A 4 KiB maxStorageBufferBindingSize cuts a 300 x 64 head into row chunks, each bound
    and dispatched separately, writing its own column range of the logits."""
    tiny = _device(limits={"max-storage-buffer-binding-size": 4096})
    vocab, hidden, rows, k = 300, 64, 3, 10
    head = quantize_rtn(randn(rng, vocab, hidden), QuantSpec(4, 32, False))
    norm = randn(rng, hidden)
    gpu_head = KL.upload_quant(tiny, head, "head")
    assert len(gpu_head.chunks) >= 3 and all(q.size <= 4096 and s.size <= 4096 for _, _, q, s in gpu_head.chunks)
    x = randn(rng, rows, hidden)
    xb, xn, logits = tiny.upload(x), tiny.buffer(rows * hidden * 4), tiny.buffer(rows * vocab * 4)
    for matvec_max_rows in (8, 0):
        ops = [KL.RmsNorm(tiny, xb, hidden, tiny.upload(norm), xn, hidden, hidden, 1e-5),
               KL.QuantLinear(tiny, gpu_head, xn, hidden, logits, vocab, matvec_max_rows=matvec_max_rows),
               KL.TopK(tiny, logits, vocab, vocab, k, rows)]
        tiny.run(ops, rows)
        want_ids, want_values = ref.head_topk(x, norm, 1e-5, head, k)
        np.testing.assert_array_equal(tiny.read(ops[2].ids, np.uint32, count=rows * k).reshape(rows, k), want_ids)
        np.testing.assert_allclose(tiny.read(ops[2].values, count=rows * k).reshape(rows, k), want_values, atol=1e-4, rtol=1e-4)
    ids = np.array([0, 299, 150, 77], np.uint32)
    yb = tiny.buffer(len(ids) * hidden * 4)
    tiny.run([KL.Embedding(tiny, gpu_head, tiny.upload(ids), yb, hidden)], len(ids))
    np.testing.assert_allclose(read_rows(tiny, yb, len(ids), hidden, hidden), ref.embedding(ids, head), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- Chromium's Tint

# one pipeline per kernel, at its most demanding overrides (creating one costs ~1 s in SwiftShader)
TINT_VARIANTS = [
    ("qmatvec", {"BITS": 3, "GROUP": 64, "SYMMETRIC": 1, "WG": 256, "TPR": 16, "ROWS": 8}),
    ("qmatvec", {"BITS": 4, "GROUP": 32, "SYMMETRIC": 0, "WG": 64, "TPR": 1, "ROWS": 1}),
    ("qmatvec_norm", {"BITS": 3, "GROUP": 64, "SYMMETRIC": 1, "WG": 256, "TPR": 16, "ROWS": 8}),
    ("qmatvec_norm", {"BITS": 4, "GROUP": 32, "SYMMETRIC": 0, "WG": 64, "TPR": 1, "ROWS": 1}),
    ("qmatvec_silu", {"BITS": 3, "GROUP": 64, "SYMMETRIC": 1, "WG": 256, "TPR": 16, "ROWS": 8}),
    ("qmatvec_silu", {"BITS": 4, "GROUP": 32, "SYMMETRIC": 0, "WG": 64, "TPR": 1, "ROWS": 1}),
    ("attention_rope", {"WG": 256, "HEAD_DIM": 128}),
    ("qmatmul", {"BITS": 2, "GROUP": 128, "SYMMETRIC": 0, "TILE": 64}),
    ("embedding", {"BITS": 8, "GROUP": 32, "SYMMETRIC": 1, "WG": 64}),
    ("attention", {"WG": 256, "HEAD_DIM": 64}),
    ("topk", {"WG": 256, "KP": 64}),
    ("rmsnorm", {"WG": 256}), ("rope", {"WG": 64}), ("kv_store", {"WG": 64}), ("silu_gate", {"WG": 64}), ("residual_add", {"WG": 64}),
]
# the K+subgroup variants (lanes summed by shuffles) at the same overrides, subgroups of 4 lanes
# or of 64 (the widest subgroups of real GPUs, AMD's wave64: a whole 64-thread workgroup); and the probe
TINT_SUBGROUP_VARIANTS = [(f"{name}+subgroup", {**c, "SG": sg}) for name, c in TINT_VARIANTS if name.startswith("qmatvec")
                          for sg in (4, 64)] + [("probes/subgroup_size", {"WG": 256})]
TINT_JS = """
async ({sources, variants, subgroupSources, subgroupVariants}) => {
  const adapter = await navigator.gpu.requestAdapter();
  const subgroups = adapter.features.has('subgroups');
  // the spec's default limits; subgroups where the adapter has them (as webgpu_device.js asks)
  const device = await adapter.requestDevice({requiredFeatures: subgroups ? ['subgroups'] : []});
  if (subgroups) { sources = {...sources, ...subgroupSources}; variants = [...variants, ...subgroupVariants]; }
  const problems = [], modules = {};
  for (const [name, code] of Object.entries(sources)) {
    modules[name] = device.createShaderModule({code});
    const info = await modules[name].getCompilationInfo();
    for (const m of info.messages) problems.push(`${name}.wgsl:${m.lineNum}:${m.linePos} ${m.type}: ${m.message}`);
  }
  await Promise.all(variants.map(async ([name, constants]) => {
    device.pushErrorScope('validation');
    try {
      await device.createComputePipelineAsync({layout: 'auto', compute: {module: modules[name], entryPoint: 'main', constants}});
    } catch (e) { problems.push(`${name} ${JSON.stringify(constants)}: ${e.message}`); }
    const error = await device.popErrorScope();
    if (error) problems.push(`${name} ${JSON.stringify(constants)}: ${error.message}`);
  }));
  return {adapter: (adapter.info && adapter.info.architecture) || '?', subgroups, compiled: Object.keys(modules), problems};
}
"""


def test_kernels_compile_in_chromium_tint():
    """Chromium's WebGPU compiler (Tint) is stricter than wgpu's naga in places (it rejected
    an f32 literal one ulp out of range that naga rounded): compile every kernel there, as the
    coordinator serves it to tabs (wgsl_source(..., for_browser=True)), and where the adapter has
    subgroups (SwiftShader's does) every K+subgroup variant and the subgroup probe, which Tint
    takes only after `enable subgroups;` (naga refuses that line: native sources lack it)."""
    import http.server
    import shutil
    import threading

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if chromium is None:
        pytest.skip("no chromium on this host")
    # WebGPU needs a secure context: any page served from 127.0.0.1 is one
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=[
                "--headless=new", "--no-sandbox", "--enable-unsafe-webgpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"])
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
                if not page.evaluate("!!navigator.gpu && navigator.gpu.requestAdapter().then(a => !!a)"):
                    pytest.skip("this Chromium has no WebGPU adapter")
                # the f16 variants need shader-f16, which SwiftShader lacks: tabs never load them
                names = [p.stem for p in sorted(R.KERNEL_DIR.glob("*.wgsl")) if not p.stem.endswith("_f16")]
                sources = {name: wgsl_source(name, for_browser=True) for name in names}
                # every kernel whose lanes a variant sums by subgroup shuffles
                subgroup_names = [f"{n}+subgroup" for n in names if wgsl_source(f"{n}+subgroup") != wgsl_source(n)]
                subgroup_names.append(R.SUBGROUP_PROBE)
                subgroup_sources = {name: wgsl_source(name, for_browser=True) for name in subgroup_names}
                result = page.evaluate(TINT_JS, {"sources": sources, "variants": TINT_VARIANTS, "subgroupSources": subgroup_sources,
                                                 "subgroupVariants": TINT_SUBGROUP_VARIANTS})
            finally:
                browser.close()
    finally:
        server.shutdown()
    assert not result["problems"], "\n".join(result["problems"])
    assert all(not source.startswith("enable subgroups;") for source in sources.values())
    if result["subgroups"]:
        assert {"qmatvec_norm_i8+subgroup", "qmatvec+subgroup", R.SUBGROUP_PROBE} <= set(result["compiled"])
        assert all(source.startswith("enable subgroups;") for source in subgroup_sources.values())


# ---------------------------------------------------------------------------- the layer program


def test_layer_program_expressions_evaluate_alike_in_python_and_js():
    """Every expression of the layer program (kernels/layer_program.py) under SmolLM2's and a
    tiny model's names, by the Python evaluator and by webgpu_device.js's (node): the two
    backends must read one description the same way. Names for a CPU rasteriser's short pools
    and a GPU's long ones (kv_splits 1 and 4: split-K attention's grid and fold)."""
    import json
    import shutil
    import subprocess
    from pathlib import Path

    from kernels import layer_program as LP

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    configs = [dict(n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn=1536, vocab=49152,
                    rope_base=100000.0, rms_eps=1e-5, context=8192, eos_id=2, bos_id=1),
               dict(n_layers=2, hidden=70, n_heads=5, n_kv_heads=1, head_dim=14, ffn=131, vocab=1001,
                    rope_base=10000.0, rms_eps=1e-6, context=64, eos_id=2, bos_id=1)]
    exprs = set()

    def collect(ops):
        for op in ops:
            if op["op"] == "by_rows":
                exprs.add(str(op.get("fusable", 1)))
                collect(op["fused"])
                collect(op["plain"])
            elif op["op"] == "kernel":
                exprs.update(str(v) for v in [*op["params"].values(), *op["constants"].values(), *op["grid"]])
                exprs.update(str(v) for v in (op["wg"].values() if isinstance(op["wg"], dict) else [op["wg"]]))
            elif "silu_up_col" in op:
                exprs.add(str(op["silu_up_col"]))

    collect(LP.PROGRAM["layer"] + LP.PROGRAM["head"])
    exprs.update(str(v) for v in LP.PROGRAM["kv_splits"].values())
    exprs = sorted(exprs) + ["-(3 + 4) * 2 // 3", "7 % 3 == 1", "cdiv(10, 4) + min(2, 3) + max(2, 3)"]
    pools = [(32, False), (4096, True)]
    names = [LP.names(c, pool_ctx, 5, real_gpu) for c in configs for pool_ctx, real_gpu in pools]
    # the GPU rule splits by a KV head's floats in the pools: SmolLM2's 4096 x 64 in 4, the toy's 4096 x 14 not
    assert [n["kv_splits"] for n in names] == [1, 4, 1, 1]
    want = [[LP.evaluate(e, {**n, "wg": 64}) for e in exprs] for n in names]
    script = """
    import(process.argv[1]).then(({ evaluate, programNames }) => {
      const [program, configs, pools, exprs] = JSON.parse(process.argv[2]);
      console.log(JSON.stringify(configs.flatMap((c) => pools.map(([ctx, gpu]) =>
        exprs.map((e) => evaluate(e, { ...programNames(program, c, ctx, 5, gpu), wg: 64 }))))));
    });"""
    src = Path(__file__).resolve().parents[1] / "tab_worker" / "web" / "webgpu_device.js"
    r = subprocess.run([node, "--input-type=module", "-e", script, src.as_uri(), json.dumps([LP.PROGRAM, configs, pools, exprs])],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert len(got) == len(want)
    for case, g, w in zip([(c["hidden"], *pool) for c in configs for pool in pools], got, want):
        for e, a, b in zip(exprs, g, w):
            assert a == pytest.approx(b, rel=1e-12), (e, case)
    with pytest.raises(ValueError, match="not allowed"):
        LP.evaluate("__import__('os')", {})
    with pytest.raises(KeyError, match="unknown name"):
        LP.evaluate("nope + 1", {})


# the WebGPU default limits, and a device granting 1024 invocations and 32 KiB (batches of tall
# matrices staged in 512-thread workgroups: MatmulTuning.matvec_tall_batch_wg); on a device whose
# subgroups the lanes' sums may count on (this adapter's probed size: the K+subgroup kernels, SG)
# and on one without
@pytest.mark.parametrize("subgroups", [False, True], ids=["no-subgroups", "subgroups"])
@pytest.mark.parametrize("raised", [False, True], ids=["default-limits", "raised-limits"])
def test_gpu_matvec_layout_is_the_same_in_python_and_js(dev, raised, subgroups):
    """A real-GPU tab and the native backend choose one qmatvec layout (kernel, overrides,
    workgroups) for every shape and row count: runner.QuantLinear and webgpu_device.js's
    QuantLinear (node) at these limits, staged or not (one row; batches of long or tall rows in
    one workgroup row), with or without subgroups."""
    import json
    import shutil
    import subprocess
    from pathlib import Path

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    from kernels.limits import WEBGPU_DEFAULT_LIMITS

    limits = dict(WEBGPU_DEFAULT_LIMITS)
    if raised:
        limits.update({"max-compute-invocations-per-workgroup": 1024, "max-compute-workgroup-size-x": 1024,
                       "max-compute-workgroup-storage-size": 32768})
    base = _device(limits=limits if raised else "webgpu-default")
    if base.limits != limits:
        pytest.skip(f"the adapter grants less than {limits}")
    tuning = KL.matmul_tuning(base, real_gpu=True)
    if subgroups and not tuning.matvec_subgroup:
        pytest.skip(f"{base.describe()} has no usable subgroups")
    sg = tuning.matvec_subgroup if subgroups else 0
    tuning = dataclasses.replace(tuning, matvec_subgroup=sg)
    assert bool(tuning.matvec_tall_batch_wg) == raised
    shapes = [(12288, 4096), (4096, 11008), (1536, 576), (49152, 576), (37, 70), (8192, 8192)]
    rows_list = [1, 3, 8, 9, 64]
    want = []
    for n, k in shapes:
        op = KL.QuantLinear(base, KL.GpuQuantTensor(QuantSpec(3, 64, True), n, k, []), None, 4 * -(-k // 4), None, n, tuning=tuning)
        for rows in rows_list:
            consts, per_wg, rows_per_wg = op.matvec_grid(rows)
            want.append([op.matvec_kernel, {k2: int(v) for k2, v in consts.items()}, per_wg, rows_per_wg])
    js_limits = {"maxComputeWorkgroupStorageSize": limits["max-compute-workgroup-storage-size"],
                 "maxComputeInvocationsPerWorkgroup": limits["max-compute-invocations-per-workgroup"],
                 "maxComputeWorkgroupSizeX": limits["max-compute-workgroup-size-x"]}
    script = """
    import(process.argv[1]).then(({ QuantLinear, MATVEC_ROWS }) => {
      const [limits, shapes, rowsList, sg] = JSON.parse(process.argv[2]);
      const dev = { limits, isRealGpu: () => true, subgroupSize: () => sg,
                    workgroupSize: (p) => 2 ** Math.floor(Math.log2(Math.min(p, limits.maxComputeInvocationsPerWorkgroup, limits.maxComputeWorkgroupSizeX))) };
      const out = [];
      for (const [n, k] of shapes) {
        const op = new QuantLinear(dev, { n, k, spec: { bits: 3, group: 64, symmetric: true }, chunks: [] }, null, 4 * Math.ceil(k / 4), null, n);
        for (const rows of rowsList) {
          const r = MATVEC_ROWS.find((m) => m >= rows) ?? MATVEC_ROWS[MATVEC_ROWS.length - 1];
          const ch = op.staged(r, rows);
          out.push([op.kernel, op.constants(r, ch), op.wgFor(r, ch) / op.threads(r, ch) * op.opt, r]);
        }
      }
      console.log(JSON.stringify(out));
    });"""
    src = Path(__file__).resolve().parents[1] / "tab_worker" / "web" / "webgpu_device.js"
    r = subprocess.run([node, "--input-type=module", "-e", script, src.as_uri(), json.dumps([js_limits, shapes, rows_list, sg])],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got == want
    assert any("XT" in c for _, c, _, rpw in want if rpw == 1) and any("XT" in c for _, c, _, rpw in want if rpw == 8)
    assert all(kernel.endswith("+subgroup") == subgroups and c.get("SG") == (sg or None) for kernel, c, _, _ in want)


def test_subgroup_lanes_are_probed_and_a_tuning_beyond_them_is_refused(dev):
    """Device.subgroup_size: the lanes the K+subgroup kernels may count on (lavapipe: its vector
    width in floats), and QuantLinear refuses a tuning whose runs of lanes do not divide them:
    shuffles across subgroups would sum the wrong lanes, silently."""
    if "subgroup" not in dev.features:
        pytest.skip(f"{dev.describe()} has no subgroups")
    lanes = dev.subgroup_size()
    assert lanes >= 4 and lanes & (lanes - 1) == 0
    assert "subgroupShuffleXor" in wgsl_source("qmatvec+subgroup") and "subgroupShuffleXor" not in wgsl_source("qmatvec")
    with pytest.raises(ValueError, match="unknown variant"):
        wgsl_source("qmatvec+nope")
    w = KL.GpuQuantTensor(QuantSpec(4, 32, False), 64, 64, [])
    with pytest.raises(R.LimitError, match="not runs of that many lanes"):
        KL.QuantLinear(dev, w, None, 64, None, 64, tuning=dataclasses.replace(TUNINGS["gpu"], matvec_subgroup=2 * lanes))


def test_a_failing_subgroup_probe_leaves_the_plain_kernels(monkeypatch):
    """A driver that offers subgroups but fails the probe (none does here: the probe's failure is
    forced) gets the plain kernels, with a warning, as a device without subgroups would."""
    fresh = _device()
    if "subgroup" not in fresh.features:
        pytest.skip(f"{fresh.describe()} has no subgroups")

    def refuse():
        raise RuntimeError("the shader compiler refused the probe")

    monkeypatch.setattr(fresh, "_subgroup_size", None)
    monkeypatch.setattr(fresh, "_probe_subgroups", refuse)
    with pytest.warns(RuntimeWarning, match="subgroup probe failed"):
        assert fresh.subgroup_size() == 0
    assert KL.matmul_tuning(fresh, real_gpu=True).matvec_subgroup == 0
