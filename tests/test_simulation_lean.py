"""The lean numpy backend (packed weights, dequantized per step) computes exactly what NumpyBackend does."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import TINY, tiny_weights  # noqa: E402

from tab_worker.backends import make_backend  # noqa: E402
from tab_worker.engine_types import SessionSlice  # noqa: E402
from tab_worker.lean_backend import LeanNumpyBackend  # noqa: E402


def test_lean_equals_dense_on_a_tiny_model():
    w = tiny_weights()
    layers = {i: w.layers[i] for i in range(2, 5)}
    dense = make_backend("numpy", TINY, layers, w.head, 64)
    lean = make_backend("numpy", TINY, layers, w.head, 64, lean=True)
    assert isinstance(lean, LeanNumpyBackend)
    x = np.random.default_rng(0).standard_normal((5, TINY.hidden)).astype(np.float32)
    for b in (dense, lean):
        b.out1 = b.forward([SessionSlice("s", 0, 5)], x)
        b.out2 = b.forward([SessionSlice("s", 5, 1), SessionSlice("t", 0, 1)], x[:2])
        b.top = b.head_topk(b.out2, 4)
    assert np.array_equal(dense.out1, lean.out1) and np.array_equal(dense.out2, lean.out2)
    assert np.array_equal(dense.top[0], lean.top[0])
