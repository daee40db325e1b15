"""The .tsq quantized model file: written, opened through open_model like a GGUF, tokenizer
metadata carried over, and generation identical to the in-memory weights."""
import json
import struct

import numpy as np
import pytest

from kernels.quant import QuantSpec
from kernels.quantizers import quantize_clip
from tabshard import qmodel
from protocol.errors import ModelError
from tab_worker.generate import LocalGenerator
from tabshard.models import open_model
from model.sampling import SamplingParams
from model.tokenizer import GGUFTokenizer
from tests.tiny_model import TINY, tiny_weights


@pytest.fixture(scope="module")
def fields(smollm2_model):
    return qmodel.source_fields(smollm2_model)


def _mixed(weights):
    """Several formats in one file, as a mixed plan writes them."""
    lw = weights.layers[0]
    lw.wq = quantize_clip(lw.wq.dequantize(), QuantSpec(3, 32, True))
    lw.w_down = quantize_clip(lw.w_down.dequantize(), QuantSpec(2, 64, False))
    weights.layers[1].wv = quantize_clip(weights.layers[1].wv.dequantize(), QuantSpec(4, 128, True))
    return weights


def test_round_trip_through_open_model(tmp_path, fields):
    w = _mixed(tiny_weights(TINY, seed=2))
    path = tmp_path / "m.tsq"
    size = qmodel.write(path, w, {"general.name": "tiny"}, plan={"blk.0.attn_q": "clip:s3g32"}, report={"x": 1})
    assert size == path.stat().st_size
    m = open_model(path)
    assert isinstance(m, qmodel.QuantizedModel) and m.config == TINY
    assert m.field("general.name") == "tiny" and m.field("missing", 7) == 7
    assert m.plan == {"blk.0.attn_q": "clip:s3g32"} and m.report == {"x": 1}
    got = m.load_all()
    assert got.head.output is not got.embedding  # untied stays untied
    for a, b in zip(got.layers, w.layers):
        for name in a.MATRICES:
            ta, tb = getattr(a, name), getattr(b, name)
            assert ta.spec == tb.spec
            np.testing.assert_array_equal(ta.qweight, tb.qweight)
            np.testing.assert_array_equal(ta.scales, tb.scales)
        np.testing.assert_array_equal(a.attn_norm, b.attn_norm)
    np.testing.assert_array_equal(got.head.output.qweight, w.head.output.qweight)
    # generation from the file equals generation from memory
    params = SamplingParams(greedy=True)
    want = list(LocalGenerator(w, backend="numpy").generate([1, 5, 9, 11], 12, params, stop_at_eos=False))
    assert list(LocalGenerator(got, backend="numpy").generate([1, 5, 9, 11], 12, params, stop_at_eos=False)) == want
    # it is a safetensors file: u64 header length, JSON header with offsets
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"]["format"] == "tabshard-quantized" and n % 8 == 0
    assert header["blk.0.attn_q.qweight"]["dtype"] == "U32"


def test_tied_head_and_tokenizer_from_the_source(tmp_path, fields, smollm2_model, smollm2_tokenizer):
    w = tiny_weights(TINY, seed=3)
    w.head.output = w.embedding
    path = tmp_path / "tied.tsq"
    qmodel.write(path, w, fields)
    m = qmodel.QuantizedModel(path)
    assert "output.qweight" not in m._header
    got = m.load_all()
    assert got.head.output is got.embedding
    tok = GGUFTokenizer(m)
    text = "def f(x):\n    return x ** 2  # ünïcode"
    assert tok.encode(text) == smollm2_tokenizer.encode(text)
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == smollm2_tokenizer.render_chat([{"role": "user", "content": "hi"}])
    assert qmodel.source_fields(m) == fields


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.tsq"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelError, match="not a readable .tsq"):
        open_model(bad)
    with pytest.raises(ModelError, match="does not exist"):
        open_model(tmp_path / "missing.tsq")
    w = tiny_weights(TINY, seed=1)
    path = tmp_path / "v.tsq"
    qmodel.write(path, w, {})
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b'"version":"1"', b'"version":"9"', 1))
    with pytest.raises(ModelError, match="version 9"):
        open_model(path)
