"""The CPU backend holds only the packed weights: no f32 copy of any weight matrix, and the
results of a prompt step and a batched decode step equal a second backend built from the same
weights (nothing it holds is shared state between backends)."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import TINY, tiny_weights  # noqa: E402

from tab_worker.backends import make_backend  # noqa: E402
from protocol.model_types import SessionSlice  # noqa: E402
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


def test_cpu_backend_holds_no_f32_weight_matrix():
    w = tiny_weights()
    layers = {i: w.layers[i] for i in range(2, 5)}
    backends = [make_backend("numpy", TINY, layers, w.head, 64) for _ in range(2)]
    assert all(type(b) is NumpyBackend for b in backends)
    x = np.random.default_rng(0).standard_normal((5, TINY.hidden)).astype(np.float32)
    out = []
    for b in backends:
        first = b.forward([SessionSlice("s", 0, 5)], x)
        second = b.forward([SessionSlice("s", 5, 1), SessionSlice("t", 0, 1)], x[:2])
        out.append((first, second, b.head_topk(second, 4)[0]))
    for a, b in zip(*out):
        assert np.array_equal(a, b)
    # the largest f32 arrays it holds are norm vectors and KV caches, never a [n, k] weight
    f32 = [a for a in _arrays(backends[0]) if a.dtype == np.float32 and a.ndim == 2]
    assert not f32, [a.shape for a in f32]
