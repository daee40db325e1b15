"""Synthetic models (model/synthetic.py): deterministic per tensor, byte-level tokenizer, and the
CPU kernels' dequantizer (the BLAS path's blocks) is bit-identical to the reference one on them."""
import numpy as np

from kernels.quant import QuantSpec, dequantize
from tab_worker.cpu_kernels import dequantize_rows
from model.loader import open_model
from model.synthetic import random_matrix
from model.tokenizer import GGUFTokenizer


def test_tensors_regenerate_identically_and_are_normalised():
    a, b = random_matrix(96, 256, [3, 1, 2]), random_matrix(96, 256, [3, 1, 2])
    assert np.array_equal(a.qweight, b.qweight) and np.array_equal(a.scales, b.scales)
    assert not np.array_equal(a.qweight, random_matrix(96, 256, [3, 1, 3]).qweight)
    w = dequantize(a)
    assert 0.5 < float(np.linalg.norm(w, axis=1).mean()) < 1.5  # rows of norm ~1
    # asymmetric packing of the same values (calibration's a4g32)
    assert np.array_equal(dequantize(random_matrix(8, 64, [1], QuantSpec(4, 32, False))),
                          dequantize(random_matrix(8, 64, [1], QuantSpec(4, 32, True))))


def test_fast_dequantize_is_bit_identical():
    for n, k in ((64, 256), (33, 704), (5, 100)):
        t = random_matrix(n, k, [n, k])
        # symmetric: fma(code, scale, -scale * 4) rounds scale * (code - 4) once, as numpy does
        assert np.array_equal(dequantize_rows(t, 0, n), dequantize(t))


def test_open_model_and_tokenizer():
    m = open_model("synthetic:llama-mini@3")
    assert m.config.hidden == 256 and len(m.load_all().layers) == 4 and m.path.name == "synthetic:llama-mini@3"
    assert np.array_equal(m.layer(2).w_up.qweight, open_model("synthetic:llama-mini@3").load_all().layers[2].w_up.qweight)
    tok = GGUFTokenizer(m)
    ids = tok.encode("tabs, shards</s>")
    assert ids[-1] == 2 and tok.decode(ids[:-1]) == "tabs, shards"
    assert open_model("synthetic:llama-7b").packed_bytes / 1e9 > 2.6
