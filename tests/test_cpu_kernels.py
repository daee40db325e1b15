"""The CPU workers' packed-weight kernel (kernels/c/packed_kernels.c via tab_worker/cpu_kernels.py):
parity with the numpy reference for every packed format, the same bits on every compiled path
(scalar, AVX2, AVX-512) and whatever the batch, the CPU backend's decode batch-invariance, the
BLAS path for long chunks, and the portable numpy path when the kernel is disabled or cannot
be built."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kernels import reference as ref
from kernels.quant import SUPPORTED_BITS, SUPPORTED_GROUPS, QuantSpec, dequantize, quantize_rtn
from tab_worker import cpu_kernels
from protocol.model_types import SessionSlice

ROOT = Path(__file__).resolve().parents[1]
ISAS = cpu_kernels.kernel_isas()
SPECS = [QuantSpec(b, g, s) for b, g, s in itertools.product(SUPPORTED_BITS, SUPPORTED_GROUPS, (False, True))]
needs_kernel = pytest.mark.skipif(not ISAS, reason=f"no compiled kernel here: {cpu_kernels.status()['reason']}")


def _tensor(spec: QuantSpec, n: int, k: int, seed: int):
    return quantize_rtn(np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32), spec)


def test_kernel_is_built_where_a_compiler_exists():
    # CI hosts are x86-64 with gcc and AVX2: the fallback must not hide a broken build
    assert ISAS, cpu_kernels.status()
    if os.uname().machine == "x86_64" and "avx2" in Path("/proc/cpuinfo").read_text():
        assert "avx2" in ISAS, ISAS


@needs_kernel
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_format_matches_the_reference_on_every_path(spec):
    """k past the last group (zero padding), tails of weight rows and activation rows on every tile,
    and rows of more than 16 blocks (the AVX-512 tile converts scales 16 blocks at a time: 600
    inputs are 19 blocks at group 32 and 20 at group 128, a part chunk after a whole one)."""
    for m, k, n in [(1, 100, 13), (5, 256, 9), (33, 160, 7), (3, 600, 6)]:
        t = _tensor(spec, n, k, m * 100 + k)
        x = np.random.default_rng(k).standard_normal((m, k)).astype(np.float32)
        exact = x.astype(np.float64) @ dequantize(t).astype(np.float64).T
        ys = [cpu_kernels.kernel_matmul(x, t, isa) for isa in ISAS]
        np.testing.assert_allclose(ys[0], ref.qmatvec(x, t), rtol=1e-5, atol=1e-5 * np.abs(exact).max())
        assert np.abs(ys[0] - exact).max() <= 2e-6 * np.sqrt(k) * np.abs(exact).max()
        for isa, y in zip(ISAS, ys):  # scalar, AVX2, AVX-512: the same operations in the same order
            assert np.array_equal(y, ys[0]), (spec.name, isa)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
def test_a_row_gives_the_same_bits_alone_or_in_a_batch_of_32(isa):
    t = _tensor(QuantSpec(4, 32, False), 45, 200, 1)
    x = np.random.default_rng(7).standard_normal((32, 200)).astype(np.float32)
    full = cpu_kernels.kernel_matmul(x, t, isa)
    for m in range(32):
        assert np.array_equal(cpu_kernels.kernel_matmul(x[m : m + 1], t, isa), full[m : m + 1]), m
        assert np.array_equal(cpu_kernels.kernel_matmul(x[: m + 1], t, isa), full[: m + 1]), m


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
def test_the_same_bits_for_every_thread_count(isa):
    """Output rows split across the pool's threads (chunks claimed one at a time, some spanning
    two parts of different formats): each output still computed alone, so any thread count and
    any batch give the bits of one thread."""
    a, b = _tensor(QuantSpec(4, 32, False), 1100, 256, 1), _tensor(QuantSpec(3, 64, True), 900, 256, 2)
    pm = cpu_kernels.PackedMatrix([a, b])
    x = np.random.default_rng(5).standard_normal((32, 256)).astype(np.float32)
    level = cpu_kernels._isa_level(isa)

    def run(rows, threads, out=None):
        y = np.zeros((rows, pm.n), np.float32) if out is None else out.copy()
        pm._kernel(cpu_kernels._padded(x[:rows], pm.k_pad), y, out is not None, level, threads)
        return y

    one = run(32, 1)
    np.testing.assert_allclose(one, x @ np.concatenate([dequantize(a), dequantize(b)]).T, rtol=1e-4, atol=1e-3)
    for threads in (2, 3, 8):
        for rows in (1, 3, 32):
            assert np.array_equal(run(rows, threads), one[:rows]), (threads, rows)
    base = np.random.default_rng(6).standard_normal((4, pm.n)).astype(np.float32)
    assert np.array_equal(run(4, 3, out=base), run(4, 1, out=base))  # the residual add, threaded


@needs_kernel
def test_threads_on_the_blas_path_and_from_concurrent_callers():
    """Long chunks: each Python thread takes whole dequantized blocks (fixed by the matrix, not
    the thread count), so the same BLAS calls and bits. Two Python threads calling at once:
    one finds the C pool busy and computes alone, both right."""
    from concurrent.futures import ThreadPoolExecutor

    t = _tensor(QuantSpec(4, 64, False), 1200, 576, 3)
    pm = cpu_kernels.PackedMatrix([t])
    long_x = np.random.default_rng(8).standard_normal((cpu_kernels.MAX_KERNEL_ROWS + 8, 576)).astype(np.float32)
    assert len(range(0, t.n, pm.block_rows)) >= 2
    assert np.array_equal(pm.apply(long_x, threads=3), pm.apply(long_x, threads=1))
    xs = [np.random.default_rng(i).standard_normal((2, 576)).astype(np.float32) for i in range(8)]
    want = [pm.apply(x, threads=1) for x in xs]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda x: pm.apply(x, threads=2), xs * 4))
    assert all(np.array_equal(g, w) for g, w in zip(got, want * 4))


@needs_kernel
def test_a_forked_child_computes_with_threads_of_its_own():
    """Pool threads do not survive fork: a child of a process that used them starts its own."""
    t = _tensor(QuantSpec(8, 32, True), 600, 256, 4)
    pm = cpu_kernels.PackedMatrix([t])
    x = np.random.default_rng(9).standard_normal((2, 256)).astype(np.float32)
    want = pm.apply(x, threads=2)
    pid = os.fork()
    if pid == 0:  # the child: exit status says whether it got the same bits
        ok = np.array_equal(pm.apply(x, threads=2), want)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_default_threads_is_the_affinity_or_the_environment(monkeypatch):
    monkeypatch.delenv("TABSHARD_CPU_THREADS", raising=False)
    assert cpu_kernels.default_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("TABSHARD_CPU_THREADS", "3")
    assert cpu_kernels.default_threads() == 3
    for bad in ("0", "two"):
        monkeypatch.setenv("TABSHARD_CPU_THREADS", bad)
        with pytest.raises(ValueError, match="TABSHARD_CPU_THREADS"):
            cpu_kernels.default_threads()
    with pytest.raises(ValueError, match="threads must be a whole number >= 1"):
        cpu_kernels.check_threads(0)
    from tab_worker.backends import make_backend
    from tests.tiny_model import tiny_weights

    w = tiny_weights()
    monkeypatch.setenv("TABSHARD_CPU_THREADS", "3")
    assert make_backend("numpy", w.config, {0: w.layers[0]}, None, 16).threads == 3  # a CPU backend's default
    assert make_backend("numpy", w.config, {0: w.layers[0]}, None, 16, threads=1).threads == 1
    with pytest.raises(ValueError, match="threads must be"):
        make_backend("numpy", w.config, {0: w.layers[0]}, None, 16, threads=0)


@needs_kernel
def test_fused_parts_and_the_residual_add():
    """q/k/v as one matrix of parts (formats may differ), and apply(out=y) adding in place."""
    a, b = _tensor(QuantSpec(4, 32, False), 24, 96, 1), _tensor(QuantSpec(3, 64, True), 8, 96, 2)
    x = np.random.default_rng(3).standard_normal((3, 96)).astype(np.float32)
    pm = cpu_kernels.PackedMatrix([a, b])
    want = np.concatenate([cpu_kernels.kernel_matmul(x, a), cpu_kernels.kernel_matmul(x, b)], axis=1)
    assert np.array_equal(pm.apply(x), want)
    y = np.random.default_rng(4).standard_normal((3, 32)).astype(np.float32)
    assert np.array_equal(pm.apply(x, out=y.copy()), y + want)


@needs_kernel
def test_the_norm_made_in_the_kernels_call_matches_its_numpy_twin():
    """apply_rmsnorm(x) = apply(rmsnorm(x)) to rounding, on the kernel's rows and past them (the
    twin itself, then BLAS); each row's bits the same alone or in a batch."""
    k = 96
    pm = cpu_kernels.PackedMatrix([_tensor(QuantSpec(4, 32, False), 40, k, 1), _tensor(QuantSpec(3, 64, True), 8, k, 2)])
    rng = np.random.default_rng(5)
    weight = rng.standard_normal(k).astype(np.float32)
    for m in (1, 5, cpu_kernels.MAX_KERNEL_ROWS + 3):
        x = (3 * rng.standard_normal((m, k))).astype(np.float32)
        normed = pm.apply_rmsnorm(x, weight, 1e-5)
        want = pm.apply(ref.rmsnorm(x, weight, 1e-5))
        np.testing.assert_allclose(normed, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
        if m <= cpu_kernels.MAX_KERNEL_ROWS:
            assert np.array_equal(pm.apply_rmsnorm(x[-1:], weight, 1e-5), normed[-1:])


class _Cache:
    def __init__(self, layers, n_kv, capacity, hd, rng):
        self.k = rng.standard_normal((layers, n_kv, capacity, hd)).astype(np.float32)
        self.v = rng.standard_normal((layers, n_kv, capacity, hd)).astype(np.float32)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n_heads,n_kv", [(9, 3), (4, 4), (8, 2), (10, 2)])
def test_decode_attention_matches_its_numpy_twins_and_stores_the_new_rows(monkeypatch, isa, n_heads, n_kv):
    """The compiled decode step (one row a session, one call a layer) ropes each session's query
    and key as kernels/reference.py's rope does (the same bits: the stored key), stores its key
    and value at its position and attends as reference.attention does, to rounding, for groups
    of query heads a KV head of 1 to 5 (the last on the generic path), at positions that end a
    vector of 8 and that do not; a session's bits are the same alone or in the batch."""
    monkeypatch.setitem(cpu_kernels._state, "isa", cpu_kernels._isa_level(isa))
    rng = np.random.default_rng(n_heads)
    hd, layers, layer = 16, 3, 1
    positions = np.array([0, 7, 8, 37, 200])
    caches = [_Cache(layers, n_kv, p + 5, hd, rng) for p in positions]
    before = [(c.k.copy(), c.v.copy()) for c in caches]
    slices = [SessionSlice(f"s{i}", int(p), 1) for i, p in enumerate(positions)]
    qkv = rng.standard_normal((len(slices), (n_heads + 2 * n_kv) * hd)).astype(np.float32)
    tables = ref.rope_tables(positions, hd, 10000.0)
    step = cpu_kernels.DecodeAttention.for_step(slices, caches, tables, n_heads, n_kv, hd, 256)
    out = step(layer, qkv)
    turned = ref.rope(qkv[:, : (n_heads + n_kv) * hd].reshape(-1, n_heads + n_kv, hd), positions, 10000.0, tables)
    for i, (c, p) in enumerate(zip(caches, positions)):
        k_want, v_want = before[i][0].copy(), before[i][1].copy()
        k_want[layer, :, p] = turned[i, n_heads:]
        v_want[layer, :, p] = qkv[i, (n_heads + n_kv) * hd:].reshape(n_kv, hd)
        assert np.array_equal(c.k, k_want) and np.array_equal(c.v, v_want)  # that row, nothing else
        want = ref.attention(turned[i:i + 1, :n_heads], c.k[layer, :, :p + 1], c.v[layer, :, :p + 1], p).reshape(-1)
        np.testing.assert_allclose(out[i], want, rtol=1e-5, atol=1e-6)
        one = [t[i:i + 1] for t in tables]
        alone = cpu_kernels.DecodeAttention.for_step(slices[i:i + 1], [c], one, n_heads, n_kv, hd, 256)(layer, qkv[i:i + 1])
        assert np.array_equal(alone[0], out[i])


@needs_kernel
def test_decode_attention_is_only_for_steps_it_can_run():
    """Rows of a prompt (a slice longer than one), or a head size not a multiple of 8: the numpy
    loop (None here)."""
    caches = [_Cache(1, 1, 8, 16, np.random.default_rng(0))]
    tables = ref.rope_tables(np.arange(2), 16, 10000.0)
    assert cpu_kernels.DecodeAttention.for_step([SessionSlice("s", 0, 2)], caches, tables, 2, 1, 16, 8) is None
    assert cpu_kernels.DecodeAttention.for_step([SessionSlice("s", 0, 1)], caches, tables, 2, 1, 12, 8) is None
    assert cpu_kernels.DecodeAttention.for_step([], [], tables, 2, 1, 16, 8) is None


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
def test_the_kernels_silu_matches_its_numpy_twin(monkeypatch, isa):
    """SiLU(gate) * up as reference.silu_gate to rounding, over the whole float range (a large
    negative gate gives 0 as the twin's e^inf does), in a row's full vectors of 8 and its last
    few alike; a row's bits the same alone or in a batch."""
    monkeypatch.setitem(cpu_kernels._state, "isa", cpu_kernels._isa_level(isa))
    rng = np.random.default_rng(9)
    ffn = 45  # (five vectors and five more)
    gate = (8 * rng.standard_normal((6, ffn))).astype(np.float32)
    gate[0, :12] = [-1e4, -200, -104, -88.5, -87.2, -30, -1e-30, -0.0, 0.0, 1e-30, 90, 1e4]
    gate[1, -5:] = [-120, -3, 0, 3, 120]  # (the last few: the padded vector)
    up = rng.standard_normal((6, ffn)).astype(np.float32)
    got = cpu_kernels.silu_gate(np.concatenate([gate, up], axis=1), ffn)
    with np.errstate(over="ignore"):
        want = ref.silu_gate(gate, up)
    # (below -87 the kernel's e^x is 0, as in its attention: the twin's products there are < 1e-35)
    np.testing.assert_allclose(got, want, rtol=4e-7, atol=1e-35)
    assert np.all(got[0, :3] == 0) and np.all(np.isfinite(got))
    for r in range(len(gate)):
        assert np.array_equal(cpu_kernels.silu_gate(np.concatenate([gate[r:r + 1], up[r:r + 1]], axis=1), ffn)[0], got[r])


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", ["tiny", "ffn_not_a_multiple_of_the_group", "hadamard"])
def test_a_decode_step_through_every_layer_in_one_call_is_the_layer_loop(monkeypatch, isa, shape):
    """NumpyBackend's decode step in one call (cpu_kernels.DecodeLayers) gives the bits of the
    same kernels called a layer at a time (the matmuls with their norms, the decode attention,
    the kernel's SiLU, the Hadamard rotation where the model has one) and stores the same keys
    and values; against the numpy twins' layer loop (no DecodeLayers) it agrees to rounding and
    picks the same top tokens."""
    from dataclasses import replace

    from tab_worker.numpy_backend import NumpyBackend
    from tests.tiny_model import TINY, tiny_weights

    monkeypatch.setitem(cpu_kernels._state, "isa", cpu_kernels._isa_level(isa))
    cfg = {"tiny": TINY, "ffn_not_a_multiple_of_the_group": replace(TINY, ffn=100),
           "hadamard": replace(TINY, ffn_hadamard=32)}[shape]
    weights = tiny_weights(cfg)
    layers, head = dict(enumerate(weights.layers)), weights.head
    rng = np.random.default_rng(4)
    prompts = [rng.standard_normal((3 + 4 * i, cfg.hidden)).astype(np.float32) for i in range(5)]
    step = rng.standard_normal((5, cfg.hidden)).astype(np.float32)
    slices = [SessionSlice(f"s{i}", len(h), 1) for i, h in enumerate(prompts)]

    def prefilled(one_call: bool):
        be = NumpyBackend(cfg, layers, head, max_ctx=64)
        assert be._decode_layers is not None
        if not one_call:
            be._decode_layers = None
        for i, h in enumerate(prompts):
            be.forward([SessionSlice(f"s{i}", 0, len(h))], h)
        return be

    be = prefilled(True)
    got = be.forward(slices, step)
    # the same kernels a layer at a time, on a backend prefilled alike
    by_layer = prefilled(False)
    caches = [by_layer._cache_for(s) for s in slices]
    tables = ref.rope_tables(np.array([s.start_pos for s in slices]), cfg.head_dim, cfg.rope_base)
    attention = cpu_kernels.DecodeAttention.for_step(slices, caches, tables, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, 64)
    x = step.copy()
    for li, layer in enumerate(by_layer._layers):
        layer.wo.apply(attention(li, layer.w_qkv.apply_rmsnorm(x, layer.attn_norm, cfg.rms_eps)), out=x)
        act = cpu_kernels.silu_gate(layer.w_gate_up.apply_rmsnorm(x, layer.ffn_norm, cfg.rms_eps), cfg.ffn)
        if cfg.ffn_hadamard:
            cpu_kernels.hadamard(act, cfg.ffn_hadamard)
        layer.w_down.apply(act, out=x)
    assert np.array_equal(got, x)
    for s, c in zip(slices, caches):
        mine = be._sessions[s.session_id]
        assert np.array_equal(mine.k[:, :, : s.start_pos + 1], c.k[:, :, : s.start_pos + 1])
        assert np.array_equal(mine.v[:, :, : s.start_pos + 1], c.v[:, :, : s.start_pos + 1])
    # and the numpy twins' loop
    twins = prefilled(False).forward(slices, step)
    np.testing.assert_allclose(got, twins, rtol=1e-4, atol=1e-4 * np.abs(twins).max())
    assert np.array_equal(be.head_topk(got, 3)[0], be.head_topk(twins, 3)[0])


@needs_kernel
def test_long_chunks_take_blas_on_dequantized_blocks(monkeypatch):
    t = _tensor(QuantSpec(4, 64, False), 300, 100, 5)
    x = np.random.default_rng(6).standard_normal((cpu_kernels.MAX_KERNEL_ROWS + 3, 100)).astype(np.float32)
    monkeypatch.setattr(cpu_kernels, "DEQUANT_BLOCK_BYTES", 64 * 128 * 4)  # 64-row blocks: five of them
    pm = cpu_kernels.PackedMatrix([t])
    assert pm.block_rows == 64
    np.testing.assert_allclose(pm.apply(x), x @ dequantize(t).T, rtol=1e-5, atol=1e-4)


def test_a_format_the_kernels_cannot_read_is_refused_naming_the_tensor():
    t = _tensor(QuantSpec(4, 32, False), 4, 64, 1)
    bad = type(t)(t.spec, t.n, t.k, t.qweight[:, :4], t.scales)  # words of a 2-bit row
    with pytest.raises(cpu_kernels.UnsupportedFormat, match="tensor blk.3.wq"):
        cpu_kernels.PackedMatrix([bad], ["blk.3.wq"])


@needs_kernel
def test_cpu_backend_decode_is_batch_invariant_over_32_sessions():
    """A session's decode step gives the same bits alone and batched with 31 others, and on 1
    or 3 threads, so neither concurrency nor the thread count changes its tokens."""
    from tab_worker.numpy_backend import NumpyBackend
    from tests.tiny_model import tiny_weights

    weights = tiny_weights()
    cfg, layers, head = weights.config, dict(enumerate(weights.layers)), weights.head
    rng = np.random.default_rng(3)
    prompts = {f"s{i}": rng.standard_normal((2 + i % 5, cfg.hidden)).astype(np.float32) for i in range(32)}

    def prefilled(threads=1):
        be = NumpyBackend(cfg, layers, head, max_ctx=64, threads=threads)
        for sid, h in prompts.items():
            be.forward([SessionSlice(sid, 0, len(h))], h)
        return be

    step = rng.standard_normal((32, cfg.hidden)).astype(np.float32)
    batched_be = prefilled()
    batched = batched_be.forward([SessionSlice(sid, len(h), 1) for sid, h in prompts.items()], step)
    top_batched = batched_be.head_topk(batched, 3)
    threaded_be = prefilled(threads=3)  # and on 3 threads
    assert np.array_equal(threaded_be.forward([SessionSlice(sid, len(h), 1) for sid, h in prompts.items()], step), batched)
    alone_backend = prefilled()
    for i, (sid, h) in enumerate(prompts.items()):
        alone = alone_backend.forward([SessionSlice(sid, len(h), 1)], step[i : i + 1])
        assert np.array_equal(alone[0], batched[i]), sid
        ids, logits = alone_backend.head_topk(alone, 3)
        assert np.array_equal(ids[0], top_batched[0][i]) and np.array_equal(logits[0], top_batched[1][i]), sid


def _run(env_extra: dict) -> str:
    code = ("import numpy as np; from kernels.quant import QuantSpec, quantize_rtn; from tab_worker import cpu_kernels as c;"
            "s = c.status(); print(s['kernel'], '|', s['reason']);"
            "t = quantize_rtn(np.ones((3, 64), np.float32), QuantSpec(4, 32, False));"
            "print(c.PackedMatrix([t]).apply(np.ones((2, 64), np.float32)).tolist())")
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=True).stdout


def test_disabled_kernel_takes_the_portable_numpy_path():
    out = _run({"TABSHARD_ROWS_KERNEL": "0"})
    assert out.splitlines() == ["None | disabled by TABSHARD_ROWS_KERNEL=0", str([[64.0] * 3] * 2)]


def test_failed_build_takes_the_portable_path_with_the_reason(tmp_path):
    out = _run({"CC": "false", "TABSHARD_CACHE_DIR": str(tmp_path)})
    first, second = out.splitlines()
    assert first.startswith("None | build failed: false failed on packed_kernels.c"), first
    assert second == str([[64.0] * 3] * 2)
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind


def test_the_tabs_wasm_build_of_the_same_source_reads_every_format(tmp_path):
    """kernels/c/packed_kernels.c compiled to WASM SIMD (the tab's engine) and the tab's plain JS
    engine, in node, on every packed format: within f32 rounding of the numpy reference (the
    WASM build has no fused multiply-add, so not bit-equal to the native paths)."""
    import json
    import shutil

    node = shutil.which("node")
    dist = ROOT / "tab_worker" / "web" / "dist"
    if node is None:
        pytest.skip("node is not installed")
    wasm = dist / "kernels.wasm"
    if not wasm.exists() or wasm.stat().st_mtime < cpu_kernels.SOURCE.stat().st_mtime:
        if not (ROOT / "node_modules" / "@msgpack" / "msgpack").exists():
            pytest.skip("node_modules missing: run `npm ci` at the repo root")
        subprocess.run([sys.executable, str(ROOT / "tab_worker" / "web" / "build.py"), "--require-wasm"], check=True)
    cases, want = [], {}
    for i, spec in enumerate(SPECS):
        m, k, n = 1 + i % 3, 100 + 32 * (i % 5), 11
        t = _tensor(spec, n, k, i)
        x = np.random.default_rng(i).standard_normal((m, k)).astype(np.float32)
        name = spec.name
        t.qweight.astype("<u4").tofile(tmp_path / f"{name}.q")
        t.scales.astype("<u4").tofile(tmp_path / f"{name}.s")
        x.astype("<f4").tofile(tmp_path / f"{name}.x")
        cases.append({"name": name, "spec": name, "n": n, "k": k, "m": m})
        want[name] = (x.astype(np.float64) @ dequantize(t).astype(np.float64).T, k)
    (tmp_path / "formats.json").write_text(json.dumps(cases))
    r = subprocess.run([node, str(ROOT / "tests" / "js" / "cpu_backend_parity.mjs"), str(dist), str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted((g["case"], g["engine"]) for g in got) == sorted((c["name"], e) for c in cases for e in ("wasm", "js"))
    for g in got:
        exact, k = want[g["case"]]
        y = np.array(g["y"], np.float64).reshape(exact.shape)
        assert np.abs(y - exact).max() <= 2e-6 * np.sqrt(k) * np.abs(exact).max(), (g["case"], g["engine"])


def test_generate_says_which_path_and_works_without_a_compiler(tmp_path):
    """A host whose compiler cannot build the kernel still generates (the portable path), and
    `tabshard generate` says which path it took and why."""
    env = dict(os.environ, CC="false", TABSHARD_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "tabshard.cli", "generate", "--prompt", "The capital of France is",
                        "--max-tokens", "2", "--greedy", "--backend", "numpy", "--json"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert "compute: portable numpy path" in r.stderr and "build failed: false failed on packed_kernels.c" in r.stderr, r.stderr
    import json

    assert len(json.loads(r.stdout.splitlines()[-1])["tokens"]) == 2
