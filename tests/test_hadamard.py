"""The FFN rotation (issue 22): the block Walsh-Hadamard transform the runtime applies before
ffn_down, its numpy twin, the C kernel (native here, WASM in tests/test_browser_tabs.py), the
WGSL kernel fused with the SiLU gate, and a rotated model on every backend and in a .tsq."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from kernels import layer_program as LP
from kernels import reference as ref
from kernels.quant import QuantSpec
from protocol.errors import ModelError
from protocol.model_types import SessionSlice
from tab_worker import cpu_kernels
from tab_worker.numpy_backend import NumpyBackend
from tabshard import calibration as C
from tabshard import mixed_precision as M
from tabshard import qmodel
from tabshard.rotation import ffn_block, hadamard, rotate_ffn, rotate_ffn_weights
from tests.layer_parity import run_tab_cpu_engines, two_layer_case
from tests.tiny_model import TINY, tiny_weights

ROOT = Path(__file__).resolve().parents[1]
CONFIG = replace(TINY, vocab=512, n_layers=3)  # ffn 96 = 3 x 32: blocks of 32


@pytest.fixture(scope="module")
def weights():
    return tiny_weights(CONFIG, seed=5)


@pytest.fixture(scope="module")
def ids():
    return [int(x) for x in np.random.default_rng(2).integers(0, CONFIG.vocab, size=400)]


def test_twin_is_the_block_diagonal_normalized_hadamard_matrix():
    x = np.random.default_rng(0).standard_normal((3, 96)).astype(np.float32)
    h = np.kron(np.eye(3), hadamard(32) / np.sqrt(32))
    np.testing.assert_allclose(ref.hadamard(x, 32), x @ h, atol=1e-6)
    np.testing.assert_allclose(ref.hadamard(ref.hadamard(x, 32), 32), x, atol=1e-6)  # orthogonal and symmetric
    assert (ffn_block(1536), ffn_block(11008), ffn_block(96), ffn_block(8192 * 3)) == (512, 256, 32, 4096)
    for bad in (12, 1, 64, 8192):
        with pytest.raises(ValueError):
            ref.check_hadamard_block(bad, 96 if bad != 8192 else 8192)


@pytest.mark.parametrize("n,block", [(96, 32), (1536, 512), (11008, 256), (8192, 4096), (6, 2)])
def test_c_kernel_gives_the_twins_bits(n, block):
    if cpu_kernels.status()["kernel"] is None:
        pytest.skip(f"no compiled kernel: {cpu_kernels.status()['reason']}")
    x = (np.random.default_rng(n).standard_normal((5, n)) * 3).astype(np.float32)
    np.testing.assert_array_equal(cpu_kernels.hadamard(x.copy(), block), ref.hadamard(x, block))


# threads own runs of E = block / threads entries: E = 1 (every stage shared), 8, 32 (none shared)
@pytest.mark.parametrize("n,block,wg", [(96, 32, 64), (96, 32, 4), (1536, 512, 64), (1536, 512, 16), (1024, 1024, 256),
                                        (8192, 4096, 64), (22016, 256, 16)])
def test_wgsl_silu_hadamard_matches_its_twin(n, block, wg):
    from kernels import launchers as KL
    from kernels import runner as R

    try:
        dev = R.get_device()
    except R.NoAdapterError as exc:
        pytest.skip(f"no wgpu adapter: {exc}")
    rows, stride, gate_col, up_col, y_stride = 3, 2 * n + 8, 1, n + 5, n + 4  # odd columns and strides
    src = (np.random.default_rng(block).standard_normal((rows, stride)) * 4).astype(np.float32)
    y = dev.buffer(rows * y_stride * 4)
    launch = KL.Launch(dev, "silu_hadamard", {"WG": dev.workgroup_size(wg), "BLOCK": block}, [dev.upload(src), y],
                       src_stride=stride, gate_col=gate_col, up_col=up_col, y_stride=y_stride, scale=1 / np.sqrt(block))
    dev.run([_Dispatches(launch.at(n // block, rows))], rows)
    got = dev.read(y).reshape(rows, y_stride)[:, :n]
    want = ref.silu_hadamard(src[:, gate_col:gate_col + n], src[:, up_col:up_col + n], block)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.sqrt(block), rtol=1e-5)  # exp differs by an ulp


class _Dispatches:
    def __init__(self, dispatches):
        self._d = dispatches

    def dispatches(self, rows):
        return self._d


def test_ffn_rotation_computes_the_same_function(weights, ids):
    dense = C.DenseModel(weights)
    rot = rotate_ffn(dense, seed=3)
    x = np.asarray(ids[:50])
    want = dense.logits(x)
    np.testing.assert_allclose(rot.logits(x), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert rot.config.ffn_hadamard == 32 and dense.config.ffn_hadamard == 0
    assert not np.allclose(rot.layers[0].mats["w_down"], dense.layers[0].mats["w_down"], atol=1e-3)
    assert np.array_equal(rot.layers[0].mats["w_gate"], dense.layers[0].mats["w_gate"])


def test_the_layer_program_rotates_where_the_model_says():
    kernels = lambda ops: [k for op in ops for k in ([op["kernel"]] if op["op"] == "kernel" else kernels(op.get("then", []) + op.get("fused", [])))]  # noqa: E731
    last = LP.PROGRAM["layer"][-1]
    assert last["op"] == "when" and "silu_hadamard" in kernels([last]) and json.loads(LP.program_json())["layer"][-1] == last
    env = LP.names(replace(CONFIG, ffn_hadamard=32), 64, 1)
    assert LP.evaluate(last["if"], env) == 32 and LP.evaluate(last["then"][0]["grid"][0], env) == 3
    assert not LP.evaluate(last["if"], LP.names(CONFIG, 64, 1))


@pytest.fixture(scope="module")
def rotated(weights, ids):
    """A GPTQ-quantized model with rotated FFNs (and residual), its plan and its dense twin."""
    cal = C.Calibrator(weights, ids[-256:], window=128, rotation=9, ffn_rotation=4)
    plan = M.uniform_plan(CONFIG.n_layers, "gptq:s4g32", "clip:s8g32")
    return cal, plan, cal.assemble(plan, sequential=True)


def test_rotated_model_on_the_cpu_and_wgpu_backends_and_in_a_tsq(rotated, ids, tmp_path):
    cal, plan, w = rotated
    assert w.config.ffn_hadamard == 32 and cal.ffn_rotated("blk.1.ffn_down") and not cal.ffn_rotated("blk.1.ffn_gate")
    path = tmp_path / "had.tsq"
    qmodel.write(path, w, {}, plan, rotation=qmodel.Rotation.of(9, w.config, 4))
    m = qmodel.QuantizedModel(path)
    assert m.config.ffn_hadamard == 32 and m.rotation.kind == "residual+ffn" and m.rotation.ffn_block == 32
    assert list(m.rotation.ffn_tensors) == [f"blk.{i}.ffn_down" for i in range(CONFIG.n_layers)]
    got = m.load_all()
    seq = np.asarray(ids[:24])
    from model.embedding import embed

    x = embed(got.embedding, seq)
    be = NumpyBackend(m.config, dict(enumerate(got.layers)), got.head, 64)
    cpu = np.concatenate([be.forward([SessionSlice("s", 0, 23)], x[:23]), be.forward([SessionSlice("s", 23, 1)], x[23:])])
    want = cal.dense_of(plan, sequential=True).final_hidden(seq)
    np.testing.assert_allclose(ref.rmsnorm(cpu, got.head.output_norm, CONFIG.rms_eps), want, rtol=1e-4, atol=1e-4)
    # without the run-time transform the same weights compute something else: the op is not a no-op
    plain = NumpyBackend(replace(m.config, ffn_hadamard=0), dict(enumerate(got.layers)), got.head, 64)
    assert np.abs(plain.forward([SessionSlice("s", 0, 24)], x) - cpu).max() > 1e-2
    from tab_worker.wgpu_backend import WgpuBackend
    from kernels import runner as R

    try:
        R.get_device()
    except R.NoAdapterError as exc:
        pytest.skip(f"no wgpu adapter: {exc}")
    for fuse in (False, True):
        gpu = WgpuBackend(m.config, dict(enumerate(got.layers)), got.head, 64, fuse_decode=fuse)
        out = np.concatenate([gpu.forward([SessionSlice("s", 0, 23)], x[:23]), gpu.forward([SessionSlice("s", 23, 1)], x[23:])])
        np.testing.assert_allclose(out, cpu, atol=2e-4, rtol=1e-4, err_msg=f"fuse={fuse}")
        assert "silu_hadamard" in {d.launch.kernel for op in gpu._layer_ops for d in op.dispatches(1)}


def test_tsq_refuses_an_ffn_rotation_record_the_config_contradicts(rotated, tmp_path):
    _, plan, w = rotated
    cases = {
        "no record": None,
        "other block": replace(qmodel.Rotation.of(9, w.config, 4), ffn_block=16),
        "some layers": replace(qmodel.Rotation.of(9, w.config, 4), ffn_tensors=("blk.0.ffn_down",)),
    }
    for name, rot in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.tsq"
        qmodel.write(path, w, {}, plan, rotation=rot)
        with pytest.raises(ModelError, match="ffn_hadamard|FFN rotation"):
            qmodel.QuantizedModel(path)


def test_tab_cpu_engines_apply_the_rotation(weights, tmp_path):
    """The tab's WASM (pk_hadamard of packed_kernels.c) and plain-JS engines, in node, on a
    rotated model's blobs against NumpyBackend."""
    dist = ROOT / "tab_worker" / "web" / "dist"
    node = shutil.which("node")
    if node is None or not (dist / "kernels.wasm").exists():
        pytest.skip("node or the built tab assets (tab_worker/web/build.py) are missing")
    w = rotate_ffn_weights(weights, seed=6, spec=QuantSpec.parse("a4g32"))
    files, _, _, want = two_layer_case(w, [5, 17, 200, 33, 9])
    for e in run_tab_cpu_engines(node, dist, files, tmp_path):
        np.testing.assert_allclose(np.array(e["hidden"]).reshape(want.shape), want, atol=2e-4, rtol=1e-4, err_msg=e["engine"])


def test_ffn_rotation_shares_the_unchanged_tensors_cache(weights, ids, tmp_path):
    """Only ffn_up and ffn_down change under the FFN rotation: the others are quantized once,
    on disk, for the basis with and without it."""
    base = C.Calibrator(weights, ids[-256:], window=128, cache_dir=str(tmp_path))
    had = C.Calibrator(weights, ids[-256:], window=128, cache_dir=str(tmp_path), ffn_rotation=4)
    assert had.shared_cache_dir == base.cache_dir != had.cache_dir
    t = base.quantized("blk.1.attn_q", "gptq:s3g64")
    np.testing.assert_array_equal(had._disk_load("blk.1.attn_q", "gptq:s3g64", t.spec)[0].qweight, t.qweight)
    assert had._disk_load("blk.1.ffn_down", "gptq:s3g64", t.spec) is None
    down = had.quantized("blk.1.ffn_down", "gptq:s3g64")
    assert base._disk_load("blk.1.ffn_down", "gptq:s3g64", t.spec) is None
    assert not np.array_equal(down.qweight, base.quantized("blk.1.ffn_down", "gptq:s3g64").qweight)


def test_a_served_ffn_rotated_tsq_gives_the_local_tokens(smollm2_model, smollm2_weights, smollm2_tokenizer, tmp_path):
    """SmolLM2 with rotated FFNs as a .tsq, served by two worker processes over the wire: the
    config's ffn_hadamard reaches every stage, whose tokens are the single-process ones."""
    from tabshard.cluster import LocalCluster
    from tab_worker.generate import LocalGenerator
    from tests.test_cluster import PROMPT, ws_tokens

    w = rotate_ffn_weights(smollm2_weights, seed=22, spec=QuantSpec.parse("s4g64"))
    path = tmp_path / "had.tsq"
    qmodel.write(path, w, qmodel.source_fields(smollm2_model), rotation=qmodel.Rotation.of(None, w.config, 22))
    ids = smollm2_tokenizer.encode(smollm2_tokenizer.render_chat([{"role": "user", "content": PROMPT}]))
    want = list(LocalGenerator(qmodel.QuantizedModel(path).load_all(), backend="numpy", max_ctx=256).generate(ids, 6))
    with LocalCluster(workers=2, serve_args=["--stages", "2"], model=str(path)) as cluster:
        assert ws_tokens(cluster.base, max_tokens=6) == want
