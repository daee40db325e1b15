"""Issue 22's levers on a tiny model: the folded residual rotation computes the same function and
runs on the runtime unchanged; sequential GPTQ calibrates each layer on the quantized layers
before it; the mixed-domain text keeps its held-out domains out of calibration."""
from dataclasses import replace

import numpy as np
import pytest

from kernels import reference as ref
from protocol.model_types import SessionSlice
from tab_worker.numpy_backend import NumpyBackend
from tabshard import calibration as C
from tabshard import mixed_precision as M
from tabshard import calibration_text as T
from tabshard import qmodel
from model.embedding import embed
from tabshard.rotation import hadamard, orthogonal, rotate_dense
from tests.tiny_model import TINY, tiny_weights

CONFIG = replace(TINY, vocab=2048, n_layers=3)


@pytest.fixture(scope="module")
def weights():
    w = tiny_weights(CONFIG, seed=5)
    w.head.output_norm = (1 + 0.2 * np.random.default_rng(1).standard_normal(CONFIG.hidden)).astype(np.float32)
    return w


@pytest.fixture(scope="module")
def ids():
    return [int(x) for x in np.random.default_rng(2).integers(0, 2048, size=600)]


@pytest.mark.parametrize("n", [64, 576, 96])
def test_orthogonal_is_orthogonal_and_incoherent(n):
    q = orthogonal(n, seed=3)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
    # Hadamard-like: no entry carries a channel alone (a plain permutation would have entries of 1)
    assert np.abs(q).max() < 4 / np.sqrt(n ** 0.5)
    assert not np.allclose(q, orthogonal(n, seed=4))
    with pytest.raises(ValueError):
        hadamard(12)


def test_rotation_folds_into_the_weights(weights, ids):
    dense = C.DenseModel(weights)
    rot = rotate_dense(dense, seed=7)
    x = np.asarray(ids[:60])
    want = dense.logits(x)
    np.testing.assert_allclose(rot.logits(x), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert np.all(rot.head_norm == 1) and all(np.all(L.attn_norm == 1) for L in rot.layers)
    assert not np.allclose(rot.embedding, dense.embedding, atol=1e-3)


def test_rotated_quantized_model_runs_on_the_runtime_and_in_a_tsq(weights, ids, tmp_path):
    cal = C.Calibrator(weights, ids[-256:], window=128, rotation=9)
    assert cal.tensor_names()[-1] == C.HEAD
    plan = M.uniform_plan(CONFIG.n_layers, "gptq:s3g64", "clip:s4g32")
    w = cal.assemble(plan, sequential=True)
    assert w.head.output is not w.embedding and w.head.output.spec.name == "s4g32"
    path = tmp_path / "rot.tsq"
    qmodel.write(path, w, {}, plan, rotation=qmodel.Rotation(seed=9, hidden=CONFIG.hidden))
    m = qmodel.QuantizedModel(path)
    assert m.rotation == qmodel.Rotation(9, CONFIG.hidden)
    got = m.load_all()
    seq = ids[:40]
    backend = NumpyBackend(CONFIG, dict(enumerate(got.layers)), got.head, 64)
    hidden = backend.forward([SessionSlice("s", 0, len(seq))], embed(got.embedding, seq))
    want = cal.dense_of(plan, sequential=True).final_hidden(np.asarray(seq))
    np.testing.assert_allclose(ref.rmsnorm(hidden, got.head.output_norm, CONFIG.rms_eps), want, rtol=1e-4, atol=1e-4)
    # a rotation the runtime would have to apply is refused, not silently ignored
    qmodel.write(tmp_path / "unfolded.tsq", w, {}, plan, rotation=replace(m.rotation, folded=False))
    with pytest.raises(Exception, match="run-time rotation"):
        qmodel.QuantizedModel(tmp_path / "unfolded.tsq")


def test_sequential_gptq_calibrates_on_the_quantized_layers(weights, ids):
    cal = C.Calibrator(weights, ids[-256:], window=128)
    plan = M.uniform_plan(CONFIG.n_layers, "gptq:s2g32")
    seq = cal.sequential(plan)
    # layer 0 reads the (source) embedding either way: its q/k/v are the independent GPTQ's
    for t in ("attn_q", "attn_k", "attn_v"):
        np.testing.assert_array_equal(seq[f"blk.0.{t}"].qweight, cal.quantized(f"blk.0.{t}", "gptq:s2g32").qweight)
    # later matrices see the quantized layers' outputs, so their codes differ
    assert not np.array_equal(seq["blk.2.ffn_down"].qweight, cal.quantized("blk.2.ffn_down", "gptq:s2g32").qweight)
    # and sequential compensation tracks the source's last hidden state more closely
    x = np.asarray(ids[-256:-128])
    src = cal.dense.final_hidden(x)
    err = {s: float(np.square(cal.dense_of(plan, sequential=s).final_hidden(x) - src).mean()) for s in (False, True)}
    assert err[True] < err[False], err


def test_mixed_text_holds_its_evaluation_domains_out(smollm2_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setitem(T.DOMAINS, "empty", T.Domain("empty", lambda: []))
    kw = dict(calib_tokens=1024, sens_tokens=128, eval_tokens=1024, window=256, cache_dir=str(tmp_path))
    m = T.build(smollm2_tokenizer, calibration=("python-docs", "docstrings", "empty"), heldout=("licenses",), **kw)
    assert set(m.calib) == {"python-docs", "docstrings"} and set(m.eval) == {"licenses"}
    assert all(len(v) == 256 for v in m.calib.values()) and len(m.calib_ids) == 512
    assert any("empty" in n and "left out" in n for n in m.notes)
    text = {d: T.domain_text(d)[0] for d in ("python-docs", "docstrings", "licenses")}
    assert text["licenses"][:2000] not in text["python-docs"] + text["docstrings"]
    again = T.build(smollm2_tokenizer, calibration=("python-docs", "docstrings", "empty"), heldout=("licenses",), **kw)
    assert again.calib == m.calib and again.eval == m.eval  # fixed recipe: the same tokens (from the cache too)
    with pytest.raises(ValueError, match="both calibrated on and held out"):
        T.build(smollm2_tokenizer, calibration=("licenses",), heldout=("licenses",))


def test_selection_is_calibration_domain_text_in_no_hessian_nor_sensitivity_score(smollm2_tokenizer, tmp_path):
    kw = dict(calib_tokens=512, sens_tokens=128, window=256, cache_dir=str(tmp_path), calibration=("python-docs", "docstrings"))
    m = T.build(smollm2_tokenizer, selection=(400, 300), **kw)
    assert set(m.eval) == {"sel:python-docs", "sel:docstrings"}  # no held-out domain built
    for d in m.calib:
        ids = T._domain_ids(smollm2_tokenizer, d, T.SEED, str(tmp_path))[0]
        assert m.calib[d] + m.sens[d] == ids[:320] and m.eval[f"sel:{d}"] == ids[400:700]
    with pytest.raises(ValueError, match="overlap"):
        T.build(smollm2_tokenizer, selection=(319, 300), **kw)


def test_render_man():
    page = '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list directory contents\n.SH DESCRIPTION\n.B ls\nlists \\fIfiles\\fR.\n.PP\nSee \\(em more.'
    assert T.render_man(page) == "NAME\nls - list directory contents\n\nDESCRIPTION\nls\nlists files.\n\nSee — more."


def test_texts_travel_as_token_ids(tmp_path):
    m = T.MixedText(calib={"a": [1, 2]}, sens={"a": [3]}, eval={"b": [4, 5]}, notes=["a: 1 documents"], seed=3)
    m.save(str(tmp_path / "t.json"))
    got = T.MixedText.load(str(tmp_path / "t.json"))
    assert (got.calib, got.sens, got.eval, got.seed) == (m.calib, m.sens, m.eval, 3) and got.calib_ids == [1, 2]
    (tmp_path / "bad.json").write_text('{"seed": 1, "calib": {"a": [-1]}, "sens": {}, "eval": {}, "notes": []}')
    for bad in ("bad.json", "missing.json"):
        with pytest.raises(ValueError, match="cannot read calibration texts"):
            T.MixedText.load(str(tmp_path / bad))
