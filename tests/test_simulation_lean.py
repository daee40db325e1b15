"""The CPU backend holds only the packed weights (the old `lean` option builds the same backend):
no f32 copy of any weight matrix, and the same results either way."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import TINY, tiny_weights  # noqa: E402

from tab_worker.backends import make_backend  # noqa: E402
from tab_worker.engine_types import SessionSlice  # noqa: E402
from tab_worker.numpy_backend import NumpyBackend  # noqa: E402


def _arrays(obj, seen=None):
    """Every numpy array reachable from obj's attributes (lists, dicts and objects followed)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _arrays(v, seen)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _arrays(v, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        yield from _arrays(vars(obj), seen)


def test_lean_option_builds_the_packed_backend_with_the_same_results():
    w = tiny_weights()
    layers = {i: w.layers[i] for i in range(2, 5)}
    plain = make_backend("numpy", TINY, layers, w.head, 64)
    lean = make_backend("numpy", TINY, layers, w.head, 64, lean=True)
    assert type(plain) is type(lean) is NumpyBackend
    x = np.random.default_rng(0).standard_normal((5, TINY.hidden)).astype(np.float32)
    out = {}
    for name, b in (("plain", plain), ("lean", lean)):
        first = b.forward([SessionSlice("s", 0, 5)], x)
        second = b.forward([SessionSlice("s", 5, 1), SessionSlice("t", 0, 1)], x[:2])
        out[name] = (first, second, b.head_topk(second, 4)[0])
    for a, b in zip(out["plain"], out["lean"]):
        assert np.array_equal(a, b)
    # no f32 weight matrix: the largest f32 array it holds is a norm vector or a KV cache
    f32 = [a for a in _arrays(lean) if a.dtype == np.float32 and a.ndim == 2]
    assert not f32, [a.shape for a in f32]
