"""Backend selection: `numpy`, `wgpu`, or `auto` (wgpu on a real GPU, numpy on CPU-only hosts,
where numpy is several times faster than wgpu on lavapipe: benchmarks/bench_kernels.py)."""
from __future__ import annotations

from protocol.errors import ConfigError, TabshardError


class BackendUnavailable(TabshardError):
    """The chosen backend cannot run here (no adapter, or limits too small for the request)."""

BACKENDS = ("auto", "numpy", "wgpu")


def resolve_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name != "auto":
        return name
    try:
        from kernels.runner import shared_device

        return "wgpu" if shared_device().is_real_gpu() else "numpy"
    except Exception:
        return "numpy"


def make_backend(name: str, config, layers, head, max_ctx: int, **device_options):
    name = resolve_backend_name(name)
    shared = {k: device_options.pop(k) for k in ("shared", "shared_keys", "threads") if k in device_options}  # numpy only
    if name == "numpy":
        from tab_worker.numpy_backend import NumpyBackend

        return NumpyBackend(config, layers, head, max_ctx, **shared)
    from kernels.runner import LimitError, NoAdapterError
    from tab_worker.wgpu_backend import WgpuBackend

    try:
        return WgpuBackend(config, layers, head, max_ctx, **device_options)
    except NoAdapterError as exc:
        raise BackendUnavailable(f"the wgpu backend has no adapter here ({exc}); use --backend numpy") from None
    except LimitError as exc:
        raise BackendUnavailable(f"the WebGPU adapter's limits are too small: {exc}") from None


def forward_topk(backend, slices, hidden, k: int, topk_rows: list[int] | None = None):
    """Layers, final norm, head and top-k of each slice's last row (or of its last
    ``topk_rows[i]`` rows: a speculative step verifies drafts with several): the backend's
    fused ``forward_topk`` when it has one and one row per slice is wanted (wgpu: one
    submission, only k ids and logits read back), else forward() then head_topk() (same
    result). Returns ids and logits with one row per wanted row, slices in order."""
    import numpy as np

    fused = getattr(backend, "forward_topk", None)
    several = topk_rows is not None and any(r != 1 for r in topk_rows)
    if fused is not None and not several:
        return fused(slices, hidden, k)
    out = backend.forward(slices, hidden)
    ends = np.cumsum([sl.length for sl in slices])
    counts = topk_rows if several else [1] * len(slices)
    rows = np.concatenate([np.arange(e - max(1, min(r, sl.length)), e) for e, r, sl in zip(ends, counts, slices)]
                          or [np.zeros(0, np.int64)])
    return backend.head_topk(out[rows], k)
