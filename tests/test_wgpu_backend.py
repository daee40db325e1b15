"""WgpuBackend against NumpyBackend (the behavioural reference) on a tiny random model: batched
prefill and decode across sessions, replays, the head's top-k, session bookkeeping, errors,
and a device whose binding limit forces split tensors and chunked batches.

Tolerance: the two backends differ only by f32 round-off in different summation orders,
amplified through 3 layers; atol/rtol 2e-4 on hidden states of magnitude ~10.
"""
from __future__ import annotations

import numpy as np
import pytest

from kernels import runner as R
from kernels.quant import QuantSpec, quantize_rtn
from protocol.model_types import HeadWeights, LayerWeights, ModelConfig, SessionSlice
from tab_worker.numpy_backend import NumpyBackend

HIDDEN_TOL = dict(atol=2e-4, rtol=2e-4)
LOGIT_TOL = dict(atol=2e-4, rtol=2e-4)

# hidden 70: not a multiple of any quant group, nor of 4 (row strides get padded)
CONFIG = ModelConfig(n_layers=3, hidden=70, n_heads=4, n_kv_heads=2, head_dim=16, ffn=96, vocab=300,
                     rope_base=10000.0, rms_eps=1e-5, context=64, eos_id=2, bos_id=1)
MAX_CTX = 40


def _layer(rng, c: ModelConfig, specs: dict[str, QuantSpec]) -> LayerWeights:
    def q(name, n, k):
        return quantize_rtn((rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32), specs.get(name, QuantSpec(4, 32)))

    qd, kvd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return LayerWeights(
        attn_norm=(1 + 0.1 * rng.standard_normal(c.hidden)).astype(np.float32),
        wq=q("wq", qd, c.hidden), wk=q("wk", kvd, c.hidden), wv=q("wv", kvd, c.hidden), wo=q("wo", c.hidden, qd),
        ffn_norm=(1 + 0.1 * rng.standard_normal(c.hidden)).astype(np.float32),
        w_gate=q("w_gate", c.ffn, c.hidden), w_up=q("w_up", c.ffn, c.hidden), w_down=q("w_down", c.hidden, c.ffn))


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(7)
    layers = {
        0: _layer(rng, CONFIG, {}),
        # mismatched formats: q/k/v and gate/up cannot be fused and write column ranges instead
        1: _layer(rng, CONFIG, {"wq": QuantSpec(3, 64, True), "wk": QuantSpec(8, 32, True), "w_up": QuantSpec(2, 128),
                                "w_down": QuantSpec(4, 128, True)}),
        2: _layer(rng, CONFIG, {s: QuantSpec(8, 64) for s in LayerWeights.MATRICES}),
    }
    head = HeadWeights(output_norm=(1 + 0.1 * rng.standard_normal(CONFIG.hidden)).astype(np.float32),
                       output=quantize_rtn(rng.standard_normal((CONFIG.vocab, CONFIG.hidden)).astype(np.float32), QuantSpec(8, 32, True)))
    return layers, head


@pytest.fixture(scope="module")
def device():
    try:
        return R.get_device()
    except R.NoAdapterError as exc:
        pytest.skip(f"no wgpu adapter on this host: {exc}")


def _pair(model, device, **options):
    from tab_worker.wgpu_backend import WgpuBackend

    layers, head = model
    return (WgpuBackend(CONFIG, layers, head, MAX_CTX, device=device, **options),
            NumpyBackend(CONFIG, layers, head, MAX_CTX))


def _step(backends, slices, rng):
    hidden = rng.standard_normal((sum(s.length for s in slices), CONFIG.hidden)).astype(np.float32)
    gpu, ref = (b.forward(slices, hidden) for b in backends)
    np.testing.assert_allclose(gpu, ref, **HIDDEN_TOL)
    return gpu


def _check_head(backends, hidden, k):
    (gpu_ids, gpu_logits), (ref_ids, ref_logits) = (b.head_topk(hidden, k) for b in backends)
    assert gpu_ids.dtype == np.int32 and gpu_logits.dtype == np.float32 and gpu_ids.shape == (len(hidden), k)
    np.testing.assert_array_equal(gpu_ids, ref_ids)
    np.testing.assert_allclose(gpu_logits, ref_logits, **LOGIT_TOL)


def test_fork_session_shares_a_prefix_as_numpy_does(model, device):
    # the coordinator's prefix cache forks a cached prompt into a new session (fork_session):
    # the fork's next steps see the source's keys and values up to the fork, not past it
    backends = _pair(model, device)
    rng = np.random.default_rng(3)
    _step(backends, [SessionSlice("src", 0, 9)], rng)
    for b in backends:
        b.fork_session("src", "dst", 6)
    assert backends[0].session_length("dst") == 6 and backends[0].session_length("src") == 9
    _step(backends, [SessionSlice("dst", 6, 2), SessionSlice("src", 9, 1)], rng)
    _step(backends, [SessionSlice("dst", 8, 1)], rng)
    with pytest.raises(ValueError, match="cannot fork"):
        backends[0].fork_session("src", "more", 11)


# "fused": the fused decode kernels, which the default leaves to real GPUs (this is lavapipe);
# "split-attention": split-K attention, which the default leaves to real GPUs' long contexts
OPTIONS = {"default": {}, "qmatmul-above-4-rows": {"matvec_max_rows": 4}, "fused": {"fuse_decode": True},
           "split-attention": {"kv_splits": 3, "fuse_decode": True}}


def test_split_attention_adds_the_fold_only_where_it_splits(model, device):
    """kv_splits > 1: each layer's attention has z = kv_splits workgroups a head and row, and
    its partials' fold (attention_combine) dispatches; unsplit, the fold dispatches nothing."""
    rng = np.random.default_rng(5)
    for splits in (3, 1):
        backends = _pair(model, device, kv_splits=splits)
        _step(backends, [SessionSlice("a", 0, 5), SessionSlice("b", 0, 2)], rng)
        dispatches = [item for item in device.plan(backends[0]._layer_ops, 7) if item.__class__ is tuple]
        kernels = [pipeline.label.split("(")[0] for *_, pipeline, _bind_group in dispatches]
        attention_z = [d[4] for d, kernel in zip(dispatches, kernels) if kernel == "attention"]
        assert attention_z == [splits] * CONFIG.n_layers
        assert kernels.count("attention_combine") == (CONFIG.n_layers if splits > 1 else 0)
    with pytest.raises(ValueError, match="kv_splits"):
        _pair(model, device, kv_splits=0)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_prefill_decode_replay_and_head_match_numpy(model, device, options):
    backends = _pair(model, device, **options)
    gpu = backends[0]
    rng = np.random.default_rng(0)
    # two sessions prefill in one batch (qmatmul path), then decode together (qmatvec path)
    out = _step(backends, [SessionSlice("a", 0, 6), SessionSlice("b", 0, 3)], rng)
    _check_head(backends, out[[5, 8]], 10)
    for pos in range(3):
        out = _step(backends, [SessionSlice("a", 6 + pos, 1), SessionSlice("b", 3 + pos, 1)], rng)
        _check_head(backends, out, 5)
    assert (gpu.session_length("a"), gpu.session_length("b")) == (9, 6)
    # a third session joins mid-stream while "a" replays from position 4 (truncating 4..8)
    _step(backends, [SessionSlice("c", 0, 7), SessionSlice("a", 4, 2)], rng)
    assert (gpu.session_length("a"), gpu.session_length("c")) == (6, 7)
    for pos in range(2):
        _step(backends, [SessionSlice("b", 6 + pos, 1), SessionSlice("a", 6 + pos, 1), SessionSlice("c", 7 + pos, 1)], rng)
    # a dropped session's slot is reused by a newcomer, which must not see the old keys
    gpu.drop_session("b")
    backends[1].drop_session("b")
    assert gpu.session_length("b") == 0 and sorted(gpu.sessions()) == ["a", "c"]
    _step(backends, [SessionSlice("d", 0, 2), SessionSlice("a", 8, 1)], rng)
    # prefill up to the context end
    _step(backends, [SessionSlice("e", 0, MAX_CTX)], rng)
    _check_head(backends, rng.standard_normal((3, CONFIG.hidden)).astype(np.float32), 64)


def _check_forward_topk(backends, slices, rng, k):
    """WgpuBackend.forward_topk (one submission) against NumpyBackend's forward + head_topk."""
    from tab_worker.backends import forward_topk

    hidden = rng.standard_normal((sum(s.length for s in slices), CONFIG.hidden)).astype(np.float32)
    gpu_ids, gpu_logits = backends[0].forward_topk(slices, hidden, k)
    ref_ids, ref_logits = forward_topk(backends[1], slices, hidden, k)  # numpy: the fallback
    assert gpu_ids.dtype == np.int32 and gpu_logits.dtype == np.float32 and gpu_ids.shape == (len(slices), k)
    np.testing.assert_array_equal(gpu_ids, ref_ids)
    np.testing.assert_allclose(gpu_logits, ref_logits, **LOGIT_TOL)
    for sl in slices:
        assert backends[0].session_length(sl.session_id) == sl.start_pos + sl.length


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_forward_topk_matches_forward_then_head(model, device, options):
    backends = _pair(model, device, **options)
    rng = np.random.default_rng(5)
    # prefill of two sessions: last rows gathered (5 and 8) for the head
    _check_forward_topk(backends, [SessionSlice("a", 0, 6), SessionSlice("b", 0, 3)], rng, 10)
    for pos in range(3):  # decode: every row is a last row, read in place; k changes
        _check_forward_topk(backends, [SessionSlice("a", 6 + pos, 1), SessionSlice("b", 3 + pos, 1)], rng, 5 if pos else 1)
    _check_forward_topk(backends, [SessionSlice("a", 9, 1)], rng, 5)  # fewer rows than before
    _step(backends, [SessionSlice("b", 6, 1)], rng)  # plain forward in between: plans stay right
    _check_forward_topk(backends, [SessionSlice("c", 0, 2), SessionSlice("a", 10, 1), SessionSlice("b", 7, 1)], rng, 64)
    _check_head(backends, rng.standard_normal((2, CONFIG.hidden)).astype(np.float32), 5)
    _check_forward_topk(backends, [SessionSlice("a", 11, 1), SessionSlice("b", 8, 1)], rng, 5)
    with pytest.raises(ValueError, match="at least one row"):
        backends[0].forward_topk([SessionSlice("a", 12, 0)], np.zeros((0, CONFIG.hidden), np.float32), 3)


def test_decode_steps_recorded_ahead_match_numpy(model, device):
    """A real GPU's host path forced on this adapter (kernels.runner: the spinning wait, and a
    repeated step's command buffer recorded while the GPU runs the step before): decode steps
    that submit what the step before recorded, across KV pools grown mid-run (16 -> 32
    positions: the plan is rebuilt, what was recorded for the old one must not run), with a
    forward, a fork and another row count between them, all against numpy."""
    backends = _pair(model, device, fuse_decode=True)
    rng = np.random.default_rng(9)
    used = device.encoded_ahead_used
    device._real_gpu = True
    try:
        _check_forward_topk(backends, [SessionSlice("a", 0, 6), SessionSlice("b", 0, 3)], rng, 10)
        for pos in range(12):  # "a" reaches position 16 at the 11th step: the pools grow
            _check_forward_topk(backends, [SessionSlice("a", 6 + pos, 1), SessionSlice("b", 3 + pos, 1)], rng, 5)
        assert backends[0]._pool_ctx == 32
        _step(backends, [SessionSlice("b", 15, 1)], rng)
        for b in backends:
            b.fork_session("a", "f", 8)
        for pos in range(3):
            _check_forward_topk(backends, [SessionSlice("a", 18 + pos, 1), SessionSlice("f", 8 + pos, 1),
                                           SessionSlice("b", 16 + pos, 1)], rng, 5)
        for pos in range(3):
            _check_forward_topk(backends, [SessionSlice("a", 21 + pos, 1), SessionSlice("b", 19 + pos, 1)], rng, 5)
    finally:
        device._real_gpu = None
    # in a run of decode steps of one plan, the 3rd and later submit what the one before recorded:
    # steps 3-10 of the first (the 11th has the grown pools' new plan), the 3rd of the other two
    assert device.encoded_ahead_used - used == 8 + 1 + 1


def test_forward_topk_without_layers_or_head(model, device):
    from tab_worker.wgpu_backend import WgpuBackend

    layers, head = model
    rng = np.random.default_rng(6)
    head_only = (WgpuBackend(CONFIG, {}, head, MAX_CTX, device=device), NumpyBackend(CONFIG, {}, head, MAX_CTX))
    _check_forward_topk(head_only, [SessionSlice("x", 0, 3), SessionSlice("y", 0, 1)], rng, 7)
    no_head = WgpuBackend(CONFIG, {0: layers[0]}, None, MAX_CTX, device=device)
    with pytest.raises(ValueError, match="no head"):
        no_head.forward_topk([SessionSlice("x", 0, 1)], np.zeros((1, CONFIG.hidden), np.float32), 3)


def test_many_sessions_grow_the_kv_pools(model, device):
    backends = _pair(model, device)
    rng = np.random.default_rng(1)
    _step(backends, [SessionSlice(f"s{i}", 0, 2) for i in range(3)], rng)
    _step(backends, [SessionSlice(f"s{i}", 0 if i >= 3 else 2, 2 if i >= 3 else 1) for i in range(11)], rng)
    assert backends[0]._pool_slots >= 11
    _step(backends, [SessionSlice(f"s{i}", backends[1].session_length(f"s{i}"), 1) for i in range(11)], rng)
    # KV memory follows use: 16 positions per slot so far, then 32 and 40 (max_ctx) as one grows
    assert backends[0]._pool_ctx == 16
    _step(backends, [SessionSlice("s0", backends[1].session_length("s0"), 20), SessionSlice("s5", 2, 1)], rng)
    assert backends[0]._pool_ctx == 32
    _step(backends, [SessionSlice("s0", 23, MAX_CTX - 23), SessionSlice("s1", 3, 1)], rng)
    assert backends[0]._pool_ctx == MAX_CTX
    _step(backends, [SessionSlice(f"s{i}", backends[1].session_length(f"s{i}"), 1) for i in range(1, 11)], rng)


def test_partial_layer_range_and_head_only(model, device):
    from tab_worker.wgpu_backend import WgpuBackend

    layers, head = model
    rng = np.random.default_rng(2)
    middle = {1: layers[1], 2: layers[2]}
    backends = (WgpuBackend(CONFIG, middle, None, MAX_CTX, device=device), NumpyBackend(CONFIG, middle, None, MAX_CTX))
    _step(backends, [SessionSlice("x", 0, 4)], rng)
    _step(backends, [SessionSlice("x", 4, 1)], rng)
    with pytest.raises(ValueError, match="no head"):
        backends[0].head_topk(np.zeros((1, CONFIG.hidden), np.float32), 3)
    head_only = (WgpuBackend(CONFIG, {}, head, MAX_CTX, device=device), NumpyBackend(CONFIG, {}, head, MAX_CTX))
    _check_head(head_only, rng.standard_normal((2, CONFIG.hidden)).astype(np.float32), 7)


def test_errors_match_numpy(model, device):
    backends = _pair(model, device)
    x1 = np.zeros((1, CONFIG.hidden), np.float32)
    for b in backends:
        b.forward([SessionSlice("a", 0, 2)], np.zeros((2, CONFIG.hidden), np.float32))
        with pytest.raises(ValueError, match="unknown"):
            b.forward([SessionSlice("new", 3, 1)], x1)
        with pytest.raises(ValueError, match="gap"):
            b.forward([SessionSlice("a", 3, 1)], x1)
        with pytest.raises(ValueError, match="context"):
            b.forward([SessionSlice("a", MAX_CTX, 1)], x1)
        with pytest.raises(ValueError, match="shape"):
            b.forward([SessionSlice("a", 2, 2)], x1)
        assert b.session_length("a") == 2 and b.session_length("new") == 0
    with pytest.raises(ValueError, match="twice"):
        backends[0].forward([SessionSlice("a", 2, 1), SessionSlice("a", 3, 1)], np.zeros((2, CONFIG.hidden), np.float32))


def test_tiny_binding_limit_splits_tensors_and_chunks_batches(model):
    """A 12 KiB binding limit (room for two 5 KiB KV slots): the head splits into row chunks, a 20-row
    prefill runs as consecutive row chunks, and results still match numpy."""
    try:
        tiny = R.Device(limits={"max-storage-buffer-binding-size": 12288})
    except R.NoAdapterError as exc:
        pytest.skip(f"no wgpu adapter on this host: {exc}")
    backends = _pair(model, tiny)
    gpu = backends[0]
    assert len(gpu._head[1].chunks) > 1 and gpu._max_rows < 20
    rng = np.random.default_rng(3)
    out = _step(backends, [SessionSlice("a", 0, 20), SessionSlice("b", 0, 3)], rng)
    _check_head(backends, out, 8)
    _step(backends, [SessionSlice("a", 20, 1), SessionSlice("b", 3, 1)], rng)
    _check_forward_topk(backends, [SessionSlice("a", 21, 1), SessionSlice("b", 4, 1)], rng, 8)
    _check_forward_topk(backends, [SessionSlice("c", 0, 20)], rng, 3)  # more rows than a chunk: the fallback


def test_smollm2_teacher_forced_matches_transformers(smollm2_weights, device):
    """The real model on the WGSL kernels: top-5 of each teacher-forced step vs Hugging Face
    transformers' golden logits (tests/fixtures), within test_model_golden's tolerance.
    A prompt and 8 golden tokens keep this to a few seconds on lavapipe."""
    import json
    from pathlib import Path

    from model.embedding import embed
    from tab_worker.wgpu_backend import WgpuBackend

    golden = json.loads((Path(__file__).parent / "fixtures" / "smollm2_golden.json").read_text())
    case = next(c for c in golden["cases"] if c["name"] == "raw_prose_capital")
    w = smollm2_weights
    backend = WgpuBackend(w.config, dict(enumerate(w.layers)), w.head, 64, device=device)
    steps = 8
    ids = case["prompt_ids"] + case["greedy_ids"][:steps]
    hidden = backend.forward([SessionSlice("golden", 0, len(ids))], embed(w.embedding, ids))
    first = len(case["prompt_ids"]) - 1
    top_ids, top_logits = backend.head_topk(hidden[first : first + steps], 5)
    for i, step in enumerate(case["steps"][:steps]):
        assert top_ids[i][0] == step["top5_ids"][0], f"step {i}: argmax differs"
        expected = dict(zip(step["top5_ids"], step["top5_logits"]))
        for tid, value in zip(top_ids[i], top_logits[i]):
            if tid in expected:
                assert abs(value - expected[tid]) < 2e-3, f"step {i} token {tid}: {value} vs {expected[tid]}"


# ---------------------------------------------------------------------------- compute_dtype="f16"
# The matvecs on their f16 variants (f16 weights, inputs and products, f32 sums; see
# kernels/qmatvec_f16.wgsl). Each product carries three f16 roundings (2^-11 relative each):
# on this model the hidden states (|h| <= ~10) moved by <= 5e-3 and the logits (|l| <= ~30) by
# <= 1e-2 from NumpyBackend's f32 on lavapipe; the tolerances allow 4x that.
F16_HIDDEN_TOL = dict(atol=2e-2, rtol=5e-3)
F16_LOGIT_TOL = dict(atol=4e-2, rtol=5e-3)


@pytest.fixture(scope="module")
def f16_device(device):
    if "shader-f16" not in device.features:
        pytest.skip(f"{device.describe()} lacks shader-f16: compute_dtype='f16' cannot run here")
    return device


def test_f16_compute_matches_numpy_within_half_precision(model, f16_device):
    _matvecs_in(model, f16_device, "f16", F16_HIDDEN_TOL, F16_LOGIT_TOL)


def _matvecs_in(model, device, compute_dtype, hidden_tol, logit_tol):
    """The backend with its matvecs in ``compute_dtype`` against NumpyBackend's f32: prefill
    and fused decode steps within hidden_tol (and changed: not the f32 kernels), the head's
    logits within logit_tol, the same best ids."""
    from tab_worker.backends import forward_topk

    gpu, ref = _pair(model, device, compute_dtype=compute_dtype, fuse_decode=True)
    f32 = _pair(model, device)[0]
    assert gpu.compute_dtype == compute_dtype
    rng = np.random.default_rng(0)
    # prefill of two sessions (the plain matvec at 9 rows), then decode (the fused kernels)
    for slices in ([SessionSlice("a", 0, 6), SessionSlice("b", 0, 3)], [SessionSlice("a", 6, 1), SessionSlice("b", 3, 1)],
                   [SessionSlice("a", 7, 1), SessionSlice("b", 4, 1)]):
        hidden = rng.standard_normal((sum(s.length for s in slices), CONFIG.hidden)).astype(np.float32)
        got, want, full = gpu.forward(slices, hidden), ref.forward(slices, hidden), f32.forward(slices, hidden)
        np.testing.assert_allclose(got, want, **hidden_tol)
        assert np.abs(got - want).max() > 10 * np.abs(full - want).max(), f"{compute_dtype} changed nothing: still the f32 kernels?"
    # the head: every returned logit against numpy's logit of that id, and the same best id
    ids, logits = gpu.head_topk(got, 8)
    all_ids, all_logits = ref.head_topk(got, CONFIG.vocab)
    for row in range(len(got)):
        by_id = dict(zip(all_ids[row], all_logits[row]))
        np.testing.assert_allclose(logits[row], [by_id[i] for i in ids[row]], **logit_tol)
    np.testing.assert_array_equal(ids[:, 0], all_ids[:, 0])
    slices = [SessionSlice("a", 8, 1), SessionSlice("b", 5, 1)]
    hidden = rng.standard_normal((2, CONFIG.hidden)).astype(np.float32)
    (gi, gl), (ri, rl) = gpu.forward_topk(slices, hidden, 1), forward_topk(ref, slices, hidden, 1)
    np.testing.assert_array_equal(gi, ri)
    np.testing.assert_allclose(gl, rl, **logit_tol)


def test_decode_fusing_follows_the_device(model, device, rng=np.random.default_rng(3)):
    """The fused decode kernels are the default on a real GPU only (on CPU rasterisers they
    are slower, see wgpu_backend's docstring): 5 dispatches a layer for a decode step when on,
    10 when off, the same numbers either way."""
    from tab_worker.wgpu_backend import WgpuBackend

    layers, head = model
    default = WgpuBackend(CONFIG, layers, head, MAX_CTX, device=device)
    assert default.fuse_decode == device.is_real_gpu()
    per_layer = {}
    outputs = {}
    hidden = rng.standard_normal((3, CONFIG.hidden)).astype(np.float32)
    for fuse in (True, False):
        be = WgpuBackend(CONFIG, layers, head, MAX_CTX, device=device, fuse_decode=fuse)
        assert be.fuse_decode is fuse
        be.forward([SessionSlice("a", 0, 2)], hidden[:2])
        outputs[fuse] = be.forward([SessionSlice("a", 2, 1)], hidden[2:])
        per_layer[fuse] = sum(len(op.dispatches(1)) for op in be._layer_ops) / len(layers)
    # 5 and 10 where q/k/v and gate/up are one matrix each; this model's layer 1 splits them,
    # which adds dispatches to both alike: 2 norms, silu_gate, and rope and kv_store (into
    # attention) fold away
    assert per_layer[False] - per_layer[True] == 5 and per_layer[True] >= 5, per_layer
    np.testing.assert_allclose(outputs[True], outputs[False], **HIDDEN_TOL)


def test_compute_dtype_choices(model, device):
    layers, head = model
    from tab_worker.wgpu_backend import WgpuBackend

    auto = WgpuBackend(CONFIG, {0: layers[0]}, None, MAX_CTX, device=device, compute_dtype="auto")
    assert auto.compute_dtype == ("f16" if "shader-f16" in device.features else "f32")
    assert WgpuBackend(CONFIG, {0: layers[0]}, None, MAX_CTX, device=device).compute_dtype == "f32"
    with pytest.raises(ValueError, match="compute_dtype must be"):
        WgpuBackend(CONFIG, {0: layers[0]}, None, MAX_CTX, device=device, compute_dtype="bf16")
    saved = device.features
    device.features = saved - {"shader-f16"}  # as on Chromium's SwiftShader
    try:
        with pytest.raises(ValueError, match="needs the shader-f16 feature"):
            WgpuBackend(CONFIG, {0: layers[0]}, None, MAX_CTX, device=device, compute_dtype="f16")
        assert WgpuBackend(CONFIG, {0: layers[0]}, None, MAX_CTX, device=device, compute_dtype="auto").compute_dtype == "f32"
    finally:
        device.features = saved


def test_smollm2_f16_greedy_tokens_match_numpy(smollm2_weights, f16_device):
    """SmolLM2 decoding greedily on the f16 kernels gives numpy's tokens for a short prompt:
    "The capital of France is" -> " Paris.\\n\\n", whose smallest top-1 margin (1.3 logits) is far
    above f16's drift. Prefill runs the batched qmatvec_f16, the 3 decode steps the fused ones."""
    import json
    from pathlib import Path

    from tab_worker.backends import forward_topk
    from model.embedding import embed
    from tab_worker.wgpu_backend import WgpuBackend

    golden = json.loads((Path(__file__).parent / "fixtures" / "smollm2_golden.json").read_text())
    prompt = next(c for c in golden["cases"] if c["name"] == "raw_prose_capital")["prompt_ids"]
    w = smollm2_weights

    def greedy(backend, steps=4):
        ids, _ = forward_topk(backend, [SessionSlice("g", 0, len(prompt))], embed(w.embedding, prompt), 1)
        tokens = [int(ids[0, 0])]
        for i in range(steps - 1):
            ids, _ = forward_topk(backend, [SessionSlice("g", len(prompt) + i, 1)], embed(w.embedding, tokens[-1:]), 1)
            tokens.append(int(ids[0, 0]))
        return tokens

    layers = dict(enumerate(w.layers))
    want = greedy(NumpyBackend(w.config, layers, w.head, 32))
    assert greedy(WgpuBackend(w.config, layers, w.head, 32, device=f16_device, compute_dtype="f16", fuse_decode=True)) == want


def test_wgpu_tab_honours_f16_only_with_shader_f16(device):
    from tab_worker.worker import TabWorker

    tab = TabWorker("t", backend="wgpu")
    options, corrections = tab.honour_precision({"compute": "f16"})
    if "shader-f16" in device.adapter.features:
        assert options.get("compute_dtype") == "f16" and corrections == []
    else:
        assert "compute_dtype" not in options and corrections[0]["reason"] == "its adapter lacks shader-f16"
    assert tab.honour_precision({"compute": "f32"}) == ({}, [])


def test_wgpu_tab_honours_i8_on_any_adapter_and_numpy_corrects_it():
    from tab_worker.worker import TabWorker

    assert TabWorker("t", backend="wgpu").honour_precision({"compute": "i8"}) == ({"compute_dtype": "i8"}, [])
    options, corrections = TabWorker("n", backend="numpy").honour_precision({"compute": "i8"})
    assert "compute_dtype" not in options
    assert corrections == [{"setting": "compute", "asked": "i8", "used": "f32", "reason": "the numpy backend computes in f32"}]


@pytest.mark.parametrize("kind", ["numpy", "wgpu"])
def test_copy_kv_into_a_sub_range_decodes_as_a_replay_there(model, device, kind):
    # a worker serving layers [0, 3) of one pipeline and [1, 3) of the next (copy_kv): the
    # session's KV of layers 1-2 copied from the wider range, then its next positions on the
    # sub-range, give exactly what replaying its history there gives
    from tab_worker.wgpu_backend import WgpuBackend

    layers, head = model

    def backend(ids):
        part = {i: layers[i] for i in ids}
        if kind == "numpy":
            return NumpyBackend(CONFIG, part, head, MAX_CTX)
        return WgpuBackend(CONFIG, part, head, MAX_CTX, device=device)

    wide, first, replayed, copied = backend([0, 1, 2]), backend([0]), backend([1, 2]), backend([1, 2])
    rng = np.random.default_rng(11)
    history = rng.standard_normal((9, CONFIG.hidden)).astype(np.float32)
    wide.forward([SessionSlice("s", 0, 9)], history)
    replayed.forward([SessionSlice("s", 0, 9)], first.forward([SessionSlice("s", 0, 9)], history))
    copied.import_kv("s", *wide.export_kv("s", 1, 3, 9))
    assert copied.session_length("s") == 9 and wide.session_length("s") == 9
    for pos in (9, 10):
        h = first.forward([SessionSlice("s", pos, 1)], rng.standard_normal((1, CONFIG.hidden)).astype(np.float32))
        np.testing.assert_array_equal(copied.forward([SessionSlice("s", pos, 1)], h),
                                      replayed.forward([SessionSlice("s", pos, 1)], h))
    with pytest.raises(ValueError, match="cannot copy 12"):
        wide.export_kv("s", 1, 3, 12)
    with pytest.raises(ValueError, match="not within the layers held"):
        copied.export_kv("s", 0, 2, 4)
    with pytest.raises(ValueError, match="does not fit"):
        copied.import_kv("t", *wide.export_kv("s", 0, 3, 4))


# ---------------------------------------------------------------------------- compute_dtype="i8"
# The matvecs on their i8 variants (inputs quantized per 32-input block to int8, integer dot
# products; see kernels/include/qmatvec_i8.wgsl): each input moves by up to half a step of
# 1/127 of its block's largest. On this model the hidden states (|h| <= ~10) moved by <= 0.1 and
# the logits by <= 0.09 from NumpyBackend's f32 on lavapipe (f16: 5e-3 and 1e-2); the tolerances
# allow 4x that. The kernels themselves are held to their twins in tests/test_kernels_i8.py.
I8_HIDDEN_TOL = dict(atol=0.4, rtol=0)
I8_LOGIT_TOL = dict(atol=0.35, rtol=0)


def test_i8_compute_matches_numpy_within_int8_inputs(model, device):
    _matvecs_in(model, device, "i8", I8_HIDDEN_TOL, I8_LOGIT_TOL)
