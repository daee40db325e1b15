"""The numpy backend's compiled few-row matmul (tab_worker/cpu_kernels.c): parity with float64,
bit-identical rows whatever the batch (on every kernel path this CPU has), the backend-level
consequence (a session's decode step alone == in a batch), and the BLAS fallback when the
kernel is disabled or cannot be built."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tab_worker import cpu_kernels
from tab_worker.engine_types import SessionSlice

ROOT = Path(__file__).resolve().parents[1]
ISAS = cpu_kernels.kernel_isas()
needs_kernel = pytest.mark.skipif(not ISAS, reason=f"no compiled rows kernel here: {cpu_kernels.status()['reason']}")


def test_kernel_is_built_where_a_compiler_and_avx2_exist():
    # this project's CI hosts are x86-64 with gcc: the fallback must not hide a broken build
    if os.uname().machine == "x86_64" and "avx2" in Path("/proc/cpuinfo").read_text():
        assert ISAS, cpu_kernels.status()


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,n", [(1, 576, 960), (3, 64, 8), (5, 40, 13), (8, 1536, 576), (17, 33, 29), (33, 576, 100)])
def test_rows_matmul_matches_float64(isa, m, k, n):
    rng = np.random.default_rng(m * 1000 + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    y = cpu_kernels.kernel_rows_matmul(x, w, isa)
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    assert y.shape == (m, n) and y.dtype == np.float32
    assert np.abs(y - exact).max() <= 1e-5 * np.sqrt(k) * np.abs(exact).max()


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
def test_a_row_gives_the_same_bits_in_any_batch(isa):
    # K with a tail past the vector width, N past the widest tile: every tile shape and tail runs
    rng = np.random.default_rng(7)
    x = rng.standard_normal((20, 100)).astype(np.float32)
    w = rng.standard_normal((45, 100)).astype(np.float32)
    full = cpu_kernels.kernel_rows_matmul(x, w, isa)
    for m in range(1, 21):
        assert np.array_equal(cpu_kernels.kernel_rows_matmul(x[:m], w, isa), full[:m]), m
        alone = cpu_kernels.kernel_rows_matmul(x[m - 1 : m], w, isa)
        assert np.array_equal(alone, full[m - 1 : m]), m
    # and whatever block of weight rows an output is computed in (lean_backend splits matrices)
    assert np.array_equal(np.concatenate([cpu_kernels.kernel_rows_matmul(x, w[a : a + 9], isa) for a in range(0, 45, 9)], axis=1), full)


@needs_kernel
def test_bad_operands_are_refused():
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="rows_matmul needs"):
        cpu_kernels.kernel_rows_matmul(x, np.zeros((4, 9), np.float32))
    with pytest.raises(ValueError, match="rows_matmul needs"):
        cpu_kernels.kernel_rows_matmul(x, np.zeros((4, 8), np.float64))
    with pytest.raises(ValueError, match="isa must be one of"):
        cpu_kernels.kernel_rows_matmul(x, np.zeros((4, 8), np.float32), "sve")


def test_matmul_nt_takes_blas_for_long_chunks():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((cpu_kernels.MAX_KERNEL_ROWS + 1, 64)).astype(np.float32)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    assert np.array_equal(cpu_kernels.matmul_nt(x, w), x @ w.T)


@needs_kernel
def test_numpy_backend_decode_is_batch_invariant():
    """A session's decode step gives the same bits alone and batched with 7 others, so
    concurrency never changes its tokens."""
    from tab_worker.numpy_backend import NumpyBackend
    from tests.tiny_model import tiny_weights

    weights = tiny_weights()
    cfg, layers, head = weights.config, dict(enumerate(weights.layers)), weights.head
    rng = np.random.default_rng(3)
    prompts = {f"s{i}": rng.standard_normal((5 + i, cfg.hidden)).astype(np.float32) for i in range(8)}

    def prefilled():
        be = NumpyBackend(cfg, layers, head, max_ctx=64)
        for sid, h in prompts.items():
            be.forward([SessionSlice(sid, 0, len(h))], h)
        return be

    step = rng.standard_normal((8, cfg.hidden)).astype(np.float32)
    batched = prefilled().forward([SessionSlice(sid, len(h), 1) for sid, h in prompts.items()], step)
    alone_backend = prefilled()
    for i, (sid, h) in enumerate(prompts.items()):
        alone = alone_backend.forward([SessionSlice(sid, len(h), 1)], step[i : i + 1])
        assert np.array_equal(alone[0], batched[i]), sid


def _run(env_extra: dict) -> str:
    code = ("import numpy as np; from tab_worker import cpu_kernels as c; s = c.status(); print(s['rows_kernel'], '|', s['reason']);"
            "x = np.ones((2, 16), np.float32); w = np.ones((3, 16), np.float32); print(c.matmul_nt(x, w).tolist())")
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=True).stdout


def test_disabled_kernel_falls_back_to_blas():
    out = _run({"TABSHARD_ROWS_KERNEL": "0"})
    assert out.splitlines() == ["None | disabled by TABSHARD_ROWS_KERNEL=0", str([[16.0] * 3] * 2)]


def test_failed_build_falls_back_to_blas_with_the_reason(tmp_path):
    out = _run({"CC": "false", "TABSHARD_CACHE_DIR": str(tmp_path)})
    first, second = out.splitlines()
    assert first.startswith("None | build failed: false failed on cpu_kernels.c"), first
    assert second == str([[16.0] * 3] * 2)
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind


@pytest.mark.parametrize("spec", ["a4g32", "s3g64", "a4g128"])
def test_lean_blocks_match_the_dense_matrix_on_padded_rows(spec, monkeypatch):
    """lean_backend dequantizes a block of rows at a time; with k not a multiple of the group
    its f32 rows are column slices of a padded block (not C-contiguous). Decode-sized steps
    still give NumpyBackend's bits, for one block and for many."""
    from kernels.quant import QuantSpec, dequantize, quantize_rtn
    from tab_worker import lean_backend
    from tab_worker.numpy_backend import DenseMatrix

    rng = np.random.default_rng(11)
    q = quantize_rtn(rng.standard_normal((300, 100)).astype(np.float32), QuantSpec.parse(spec))
    x = rng.standard_normal((4, 100)).astype(np.float32)
    dense = DenseMatrix(dequantize(q)).apply(x)
    assert np.array_equal(lean_backend._PackedMatrix([q]).apply(x), dense)
    monkeypatch.setattr(lean_backend, "BLOCK_BYTES", 64 * 100 * 4)  # 64-row blocks: five of them
    packed = lean_backend._PackedMatrix([q])
    assert packed.block_rows == 64
    if ISAS:  # each output alone: blocks cannot change a bit
        assert np.array_equal(packed.apply(x), dense)
    else:
        assert np.allclose(packed.apply(x), dense, rtol=1e-5, atol=1e-5)
