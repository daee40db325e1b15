"""Parity of the int8-input matvec kernels (NAME_i8.wgsl) with their numpy twins of the same
names, over every quant format, the awkward shapes of test_kernels.py, both tunings and chunks
of workgroup memory smaller than a row.

Tolerances: the twin quantizes the inputs as the shader does and sums the dequantized products
in float64; the shader's integer block sums are exact, so only its f32 sums of block terms
differ (unit-scale data: ~1e-6). WGSL does not promise a correctly rounded 1 / scale, so another
device may put an input that lies within an ulp of a rounding tie on the other code: one code
step is scale / 127 of the block's largest input times one weight, which atol 2e-3 (unit data)
and 2e-2 (k = 576, inputs of scale 3) admit. Int8 inputs themselves move these outputs by ~1e-2
from the f32 results, so each case also checks that the kernel sits much nearer its twin than
the f32 reference: a kernel that silently computed in f32 would fail.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kernels import launchers as KL
from kernels import reference as ref
from kernels import runner as R
from kernels.quant import QuantSpec, quantize_rtn, spread_3bit
from tests.test_kernels import SPECS, SPECS_3BIT, TUNINGS, dev, randn, rng  # noqa: F401 (fixtures)
from tests.test_kernels_f16 import linear_vs_twins

# two outputs a thread (MatmulTuning.matvec_i8_opt, the GPU tuning's), with and without subgroup
# sums; four, with and without
TUNINGS = {**TUNINGS, "gpu-opt2": dataclasses.replace(TUNINGS["gpu"], matvec_i8_opt=2),
           "gpu-subgroup-opt2": dataclasses.replace(TUNINGS["gpu-subgroup"], matvec_i8_opt=2),
           "gpu-opt4": dataclasses.replace(TUNINGS["gpu"], matvec_i8_opt=4),
           "gpu-subgroup-opt4": dataclasses.replace(TUNINGS["gpu-subgroup"], matvec_i8_opt=4)}
I8_TOL = dict(atol=2e-3, rtol=0)
I8_TOL_WIDE = dict(atol=2e-2, rtol=0)


def _linear_i8(dev, rng, spec, n, k, rows, tuning, prologue=None, accumulate=True, tol=I8_TOL, x_blocks=None,
               spread3=False):
    """tests.test_kernels_f16.linear_vs_twins on the i8 kernels (3-bit weights in bit planes, the
    high plane spread where ``spread3``); ``x_blocks`` caps the blocks of x quantized a chunk
    (more chunks than the workgroup memory would need)."""
    def prepare(op):
        if x_blocks is not None:
            op._i8_blocks = lambda rows_per_wg: x_blocks

    linear_vs_twins(dev, rng, spec, n, k, rows, tuning, "i8", prologue, accumulate, tol, contiguous3=False,
                    prepare=prepare, spread3=spread3)


@pytest.mark.parametrize("tuning", ["gpu", "cpu", "gpu-opt2", "gpu-opt4", "gpu-subgroup-opt4"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_qmatvec_i8(dev, rng, spec, tuning):
    # odd n; k = 70 is a multiple of no group size (nor of 4); 3 batch rows in a ROWS=4 workgroup
    _linear_i8(dev, rng, spec, n=37, k=70, rows=3, tuning=TUNINGS[tuning])


@pytest.mark.parametrize("tuning", ["gpu", "cpu", "gpu-opt2", "gpu-subgroup-opt2", "gpu-opt4", "gpu-subgroup-opt4"])
@pytest.mark.parametrize("rows", [1, 8, 11])
def test_qmatvec_i8_batch_rows(dev, rng, rows, tuning):
    # ROWS = 1, 8, and two workgroup rows of 8 with masked rows; k = 200: a ragged last block
    _linear_i8(dev, rng, QuantSpec(4, 64, True), n=70, k=200, rows=rows, tuning=TUNINGS[tuning], accumulate=False)


@pytest.mark.parametrize("tuning", ["gpu", "gpu-opt2", "gpu-subgroup-opt4"])
@pytest.mark.parametrize("prologue", ["norm", "silu"])
@pytest.mark.parametrize("rows", [1, 3, 11])
def test_qmatvec_fused_i8(dev, rng, prologue, rows, tuning):
    _linear_i8(dev, rng, QuantSpec(4, 32, False), n=37, k=70, rows=rows, tuning=TUNINGS[tuning], prologue=prologue)


@pytest.mark.parametrize("prologue", [None, "norm", "silu"])
@pytest.mark.parametrize("spec", [QuantSpec(3, 64, True), QuantSpec(8, 32, False), QuantSpec(2, 128, False),
                                  QuantSpec(4, 64, True)], ids=lambda s: s.name)
@pytest.mark.parametrize("x_blocks", [None, 3])
def test_qmatvec_i8_formats_at_model_width(dev, rng, prologue, spec, x_blocks):
    # k = 576 (SmolLM2's hidden size: 18 blocks), rows 5: ROWS = 8 with three masked rows; with
    # x_blocks 3 the row is quantized in 6 chunks, each lane taking at most one block of each
    _linear_i8(dev, rng, spec, n=45, k=576, rows=5, tuning=TUNINGS["gpu"], prologue=prologue, accumulate=False,
               tol=I8_TOL_WIDE, x_blocks=x_blocks)


@pytest.mark.parametrize("tuning", ["gpu", "cpu", "gpu-subgroup", "gpu-subgroup-opt2", "gpu-subgroup-opt4"])
@pytest.mark.parametrize("spec", SPECS_3BIT, ids=lambda s: s.name)
def test_qmatvec_i8_spread_3bit(dev, rng, spec, tuning):
    # 3-bit weights with the high plane spread (kernels.quant.spread_3bit, SPREAD3), as the
    # backend uploads them for the i8 matvecs
    _linear_i8(dev, rng, spec, n=37, k=70, rows=3, tuning=TUNINGS[tuning], spread3=True)


@pytest.mark.parametrize("prologue", [None, "norm", "silu"])
@pytest.mark.parametrize("x_blocks", [None, 3])
def test_qmatvec_i8_spread_3bit_at_model_width(dev, rng, prologue, x_blocks):
    _linear_i8(dev, rng, QuantSpec(3, 64, False), n=45, k=576, rows=5, tuning=TUNINGS["gpu-opt2"], prologue=prologue,
               accumulate=False, tol=I8_TOL_WIDE, x_blocks=x_blocks, spread3=True)


def test_spread_3bit_moves_each_high_bit_to_its_code_words_byte(rng):
    """Input j = 16w + s + 4b's high bit goes from bit j of a block's third word to bit 8b + 4w + s
    (code word 4w + s, byte b: the byte its low bits take); the low planes stay."""
    words = rng.integers(0, 1 << 32, size=(3, 12), dtype=np.uint64).astype(np.uint32)
    got = spread_3bit(words)
    np.testing.assert_array_equal(got.reshape(3, 4, 3)[..., :2], words.reshape(3, 4, 3)[..., :2])
    high, spread = words.reshape(3, 4, 3)[..., 2], got.reshape(3, 4, 3)[..., 2]
    for j in range(32):
        w, s, b = j // 16, j % 4, (j % 16) // 4
        np.testing.assert_array_equal((spread >> (8 * b + 4 * w + s)) & 1, (high >> j) & 1)


def test_only_the_i8_matvecs_take_spread_3bit(dev):
    t = quantize_rtn(np.ones((4, 64), np.float32), QuantSpec(3, 64, True))
    w = KL.upload_quant(dev, t, spread3=True)  # spread, not contiguous too
    assert w.spread3 and not w.contiguous3
    for dtype in ("f32", "f16"):
        with pytest.raises(ValueError, match="spread"):
            KL.QuantLinear(dev, w, dev.buffer(256), 64, dev.buffer(16), 4, compute_dtype=dtype)
    op = KL.QuantLinear(dev, w, dev.buffer(4 * 64 * 4), 64, dev.buffer(4 * 4 * 4), 4, compute_dtype="i8", matvec_max_rows=2)
    with pytest.raises(ValueError, match="qmatmul reads no spread"):
        op.dispatches(3)


def test_i8_chunk_fits_the_webgpu_default_workgroup_memory(dev):
    """At the spec's 16 KiB the 8-row chunk is what is left beside the reduction's partial sums."""
    w = KL.upload_quant(dev, quantize_rtn(np.ones((8, 4096), np.float32), QuantSpec(4, 64, True)))
    x, y = dev.buffer(8 * 4096 * 4), dev.buffer(8 * 8 * 4)
    op = KL.QuantLinear(dev, w, x, 4096, y, 8, tuning=TUNINGS["gpu"], compute_dtype="i8")
    saved = dev.limits
    dev.limits = {**saved, "max-compute-workgroup-storage-size": 16384}
    try:
        blocks_8, blocks_1 = op._i8_blocks(8), op._i8_blocks(1)
    finally:
        dev.limits = saved
    assert 40 * 8 * blocks_8 + 16 * op.wg * 2 + 64 <= 16384 and blocks_8 >= 1
    assert 40 * blocks_1 + 16 * op.wg + 64 <= 16384 and blocks_1 > blocks_8


def test_i8_twin_quantizes_each_block_to_127_steps(rng):
    x = randn(rng, 2, 70)
    x[1, 32:64] = 0.0  # an all-zero block stays zero
    xq = ref.quantize_blocks_i8(x)
    for r in range(2):
        for b0 in range(0, 70, 32):
            blk, got = x[r, b0 : b0 + 32], xq[r, b0 : b0 + 32]
            step = np.abs(blk).max() / 127
            if step == 0:
                assert not got.any()
                continue
            codes = got / step
            np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
            assert np.abs(got - blk).max() <= step / 2 * (1 + 1e-5)


def test_i8_refuses_contiguous_3bit(dev):
    w = KL.upload_quant(dev, quantize_rtn(np.ones((4, 64), np.float32), QuantSpec(3, 64, True)))
    assert w.contiguous3
    with pytest.raises(ValueError, match="bit planes"):
        KL.QuantLinear(dev, w, dev.buffer(256), 64, dev.buffer(16), 4, compute_dtype="i8")


def test_i8_kernels_take_their_f32_siblings_params():
    """QuantLinear launches an i8 kernel as its f32 sibling (same Params; W bound as vec4 words)."""
    dev_free = R.Device.__new__(R.Device)  # params_fields reads sources only
    dev_free._params = {}
    paths = sorted(R.KERNEL_DIR.glob("*_i8.wgsl"))
    assert [p.stem for p in paths] == ["qmatvec_i8", "qmatvec_norm_i8", "qmatvec_silu_i8"]
    for path in paths:
        assert dev_free.params_fields(path.stem) == dev_free.params_fields(path.stem[: -len("_i8")]), path.name


@pytest.mark.parametrize("opt", [1, 2, 4])
@pytest.mark.parametrize("max_groups", [1, 3])
@pytest.mark.parametrize("prologue", [None, "norm"])
@pytest.mark.parametrize("rows", [1, 8, 11])
def test_qmatvec_i8_narrow_grid_takes_every_output_group(dev, rng, max_groups, prologue, rows, opt):
    # whole rows in one chunk (k = 200: 7 blocks), x quantized once: a grid of 1 or 3 workgroups
    # a batch row walks all of n = 300's output groups (64 or 128 outputs a group: the last one ragged)
    tuning = dataclasses.replace(TUNINGS["gpu"], matvec_i8_max_groups=max_groups, matvec_i8_opt=opt)
    _narrow_grid(dev, rng, tuning, max_groups, prologue, rows, n=300 if opt < 4 else 1100)  # 1100: 5 groups of 256


def test_qmatvec_i8_in_the_gpu_tunings_workgroups(dev, rng):
    # the real GPU's i8 tuning (workgroups of up to 1024 threads, a capped grid) on this adapter
    tuning = KL.matmul_tuning(dev, real_gpu=True)
    assert tuning.matvec_i8_wg == dev.workgroup_size(KL.GPU_MATVEC_I8_WG) and tuning.matvec_i8_max_groups
    # n = 1100: more output groups than 2 even at 1024 threads, 2 outputs a thread
    _narrow_grid(dev, rng, dataclasses.replace(tuning, matvec_i8_max_groups=2), 2, "norm", 5, n=1100)


@pytest.mark.parametrize("prologue", [None, "silu"])
def test_qmatvec_i8_at_the_gpu_tunings_64_threads_an_output(dev, rng, prologue):
    # one row of 4096 inputs (128 blocks) takes the GPU tuning's widest lanes: 64 threads an
    # output, their sums meeting across subgroups (or in the tree where the adapter has none)
    tuning = KL.matmul_tuning(dev, real_gpu=True)

    def prepare(op):
        assert op.matvec_constants(1, 0)["TPR"] == KL.GPU_MATVEC_I8_MAX_TPR == 64

    linear_vs_twins(dev, rng, QuantSpec(3, 64, True), 70, 4096, 1, tuning, "i8", prologue, True, I8_TOL,
                    contiguous3=False, prepare=prepare, spread3=True)


def test_gpu_tuning_gives_short_long_rowed_matrices_64_threads_an_output(dev):
    """At one batch row the 7B shape's n = 4096 matrices fill 128 workgroups of 1024 threads (64
    threads an output, 2 outputs a thread), the taller ones keep fewer threads an output
    (matvec_threads_per_row's cap on n * tpr); batches and the f32 matvecs keep matvec_max_tpr."""
    tuning = dataclasses.replace(KL.matmul_tuning(dev, real_gpu=True), matvec_i8_wg=1024)
    one, batch = {}, {}
    for n, k in ((4096, 4096), (4096, 11008), (12288, 4096), (22016, 4096)):
        w = KL.GpuQuantTensor(QuantSpec(3, 64, True), n, k, [], spread3=True)
        op = KL.QuantLinear(dev, w, None, k, None, n, tuning=tuning, compute_dtype="i8")
        one[n, k], batch[n, k] = op._tpr(1, 0), op._tpr(8, 0)
    assert one == {(4096, 4096): 64, (4096, 11008): 64, (12288, 4096): 16, (22016, 4096): 8}
    assert batch == {(4096, 4096): 32, (4096, 11008): 32, (12288, 4096): 16, (22016, 4096): 8}
    f32 = KL.QuantLinear(dev, KL.GpuQuantTensor(QuantSpec(3, 64, True), 4096, 4096, []), None, 4096, None, 4096,
                         tuning=tuning)
    assert f32._tpr(1, 0) <= tuning.matvec_max_tpr == 32


def _narrow_grid(dev, rng, tuning, max_groups, prologue, rows, n=300):
    def prepare(op):
        assert op._groups_x(op.w.n, 8 if rows > 4 else 1, 0) == max_groups

    linear_vs_twins(dev, rng, QuantSpec(4, 64, True), n, 200, rows, tuning, "i8", prologue, True, I8_TOL,
                    contiguous3=False, prepare=prepare)


def test_qmatvec_i8_subgroup_sums_leave_workgroup_memory_to_x(dev):
    """Where subgroups sum the lanes, qmatvec_i8's partial sums take a slot a subgroup instead of a
    thread: 8 rows of k = 4096 quantize in fewer chunks (more blocks a chunk) at these limits."""
    if not dev.subgroup_size():
        pytest.skip(f"{dev.describe()} has no usable subgroups")
    w = KL.GpuQuantTensor(QuantSpec(4, 64, True), 256, 4096, [])
    wide = {"matvec_i8_wg": dev.workgroup_size(KL.GPU_MATVEC_I8_WG)}  # the GPU tuning's workgroups
    plain = KL.QuantLinear(dev, w, None, 4096, None, 256, tuning=dataclasses.replace(TUNINGS["gpu"], **wide),
                           compute_dtype="i8")
    shuffled = KL.QuantLinear(dev, w, None, 4096, None, 256, tuning=dataclasses.replace(TUNINGS["gpu-subgroup"], **wide),
                              compute_dtype="i8")
    assert shuffled.matvec_constants(8, 0)["XB"] > plain.matvec_constants(8, 0)["XB"]


def test_gpu_tuning_gives_long_rows_two_outputs_a_thread(dev):
    """MatmulTuning.matvec_i8_opt applies from matvec_i8_opt_min_k inputs a row: the 7B shape's
    matrices take 2 outputs a thread, SmolLM2's (k <= 1536) 1."""
    tuning = KL.matmul_tuning(dev, real_gpu=True)
    opts = {}
    for k in (576, 1536, 4096, 11008):
        op = KL.QuantLinear(dev, KL.GpuQuantTensor(QuantSpec(3, 64, True), 256, k, []), None, k, None, 256,
                            tuning=tuning, compute_dtype="i8")
        opts[k] = op.matvec_constants(1, 0)["OPT"]
    assert opts == {576: 1, 1536: 1, 4096: 2, 11008: 2}


@pytest.mark.parametrize("rows", [1, 8])
def test_qmatvec_i8_lanes_walk_every_block_of_long_rows(dev, rng, rows):
    # many blocks a lane: k = 4000 (125 blocks) at 8 lanes an output gives each lane 15 or 16
    # blocks; at 8 rows x comes in chunks
    tuning = dataclasses.replace(TUNINGS["gpu-subgroup-opt4"], matvec_max_tpr=8, matvec_i8_max_tpr=8)

    def prepare(op):
        assert op.matvec_constants(rows, 0)["TPR"] == 8

    linear_vs_twins(dev, rng, QuantSpec(3, 64, True), 37, 4000, rows, tuning, "i8", None, True, I8_TOL,
                    contiguous3=False, prepare=prepare, spread3=True)
