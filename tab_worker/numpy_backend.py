"""The CPU backend: the fast path on CPU-only hosts and the behavioural reference for wgpu.

It holds only the packed weights (the QuantTensors as loaded: a worker's are views of the blob
it keeps) and computes on them: every matmul is a tab_worker.cpu_kernels.PackedMatrix, q/k/v
and gate/up each one matrix of parts. Decode steps and short chunks run the compiled
packed-weight kernel (kernels/c/packed_kernels.c: reads each packed word once for all rows,
batch-invariant); long prefill chunks dequantize a block of rows at a time for BLAS. No f32
copy of a weight matrix is ever kept. `threads` matmul threads share each step's weight rows
(default: cpu_kernels.default_threads(), the cores this process may use); the results are the
same bits for any thread count. With the compiled library, the RMS norms before q/k/v, gate/up
and the head are made in their matmul's call, and a decode step (one row a session) goes
through all of the range's layers in one call (cpu_kernels.DecodeLayers: the norms, matmuls,
rope, KV store, attention and SiLU, with no return to Python between them); prompt rows take
the numpy twins. The per-kernel math is the numpy twins in kernels.reference (the compiled norm,
attention and SiLU agree with them to rounding; rope bit for bit).
"""
from __future__ import annotations

import numpy as np

from kernels import reference as ref
from tab_worker.cpu_kernels import DecodeAttention, DecodeLayers, PackedMatrix, check_threads, default_threads, hadamard
from protocol.model_types import HeadWeights, LayerWeights, ModelConfig, SessionSlice


def held_layers(layer_ids: list[int], layer_start: int, layer_end: int) -> tuple[int, int]:
    """Layers [layer_start, layer_end) as indexes into a backend holding `layer_ids` (contiguous)."""
    if not layer_ids or layer_start < layer_ids[0] or layer_end > layer_ids[-1] + 1 or layer_start >= layer_end:
        held = f"[{layer_ids[0]}, {layer_ids[-1] + 1})" if layer_ids else "none"
        raise ValueError(f"layers [{layer_start}, {layer_end}) are not within the layers held, {held}")
    return layer_start - layer_ids[0], layer_end - layer_ids[0]


def check_kv(k: np.ndarray, v: np.ndarray, n_layers: int, n_kv: int, head_dim: int, max_ctx: int) -> None:
    """k and v fit a backend of n_layers layers: f32 [n_layers, n_kv, positions, head_dim]."""
    want = (n_layers, n_kv, head_dim)
    if k.shape != v.shape or k.ndim != 4 or (k.shape[0], k.shape[1], k.shape[3]) != want:
        raise ValueError(f"KV of shape {k.shape} and {v.shape} does not fit layers x kv heads x head_dim {want}")
    if k.shape[2] > max_ctx:
        raise ValueError(f"{k.shape[2]} positions exceed the context of {max_ctx}")


class _KVCache:
    """One session's keys and values for every held layer: f32 [layers, kv_heads, capacity, head_dim]."""

    def __init__(self, n_layers: int, n_kv: int, head_dim: int, capacity: int):
        self.k = np.zeros((n_layers, n_kv, capacity, head_dim), np.float32)
        self.v = np.zeros_like(self.k)
        self.length = 0

    def ensure(self, needed: int) -> None:
        cap = self.k.shape[2]
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap)
        for name in ("k", "v"):
            old = getattr(self, name)
            grown = np.zeros(old.shape[:2] + (new_cap,) + old.shape[3:], np.float32)
            grown[:, :, :cap] = old
            setattr(self, name, grown)


class _PackedLayer:
    def __init__(self, w: LayerWeights, index: int):
        name = f"blk.{index}"
        self.attn_norm = np.asarray(w.attn_norm, np.float32)
        self.ffn_norm = np.asarray(w.ffn_norm, np.float32)
        self.w_qkv = PackedMatrix([w.wq, w.wk, w.wv], [f"{name}.wq", f"{name}.wk", f"{name}.wv"])
        self.wo = PackedMatrix([w.wo], [f"{name}.wo"])
        self.w_gate_up = PackedMatrix([w.w_gate, w.w_up], [f"{name}.w_gate", f"{name}.w_up"])
        self.w_down = PackedMatrix([w.w_down], [f"{name}.w_down"])


class NumpyBackend:
    name = "numpy"

    def __init__(self, config: ModelConfig, layers: dict[int, LayerWeights], head: HeadWeights | None, max_ctx: int,
                 shared: dict | None = None, shared_keys: dict | None = None, threads: int | None = None,
                 **_device_options):
        """shared / shared_keys: a dict the owner keeps across backends, and each layer index's
        (and "head"'s) key in it (the blob's sha256): ranges overlapping one already built reuse
        its prepared layers (the coordinator's verifier holds every stage's range at once; a
        tab re-planned onto a neighbouring range keeps the layers it had).
        A tensor in a format the kernels cannot read raises UnsupportedFormat naming it."""
        self.config = config
        if config.ffn_hadamard:
            ref.check_hadamard_block(config.ffn_hadamard, config.ffn)
        self.threads = default_threads() if threads is None else check_threads(threads)
        self.layer_ids = sorted(layers)
        if self.layer_ids and self.layer_ids != list(range(self.layer_ids[0], self.layer_ids[-1] + 1)):
            raise ValueError(f"layers must be a contiguous range, got {self.layer_ids}")
        self.max_ctx = max_ctx
        shared = {} if shared is None else shared
        keys = shared_keys or {}

        def built(key, make):
            if key is None:
                return make()
            if key not in shared:
                shared[key] = make()
            return shared[key]

        self._layers = [built(keys.get(i), lambda i=i: _PackedLayer(layers[i], i)) for i in self.layer_ids]
        self._head_norm = None if head is None else np.asarray(head.output_norm, np.float32)
        self._head = None if head is None else built(keys.get("head"), lambda: PackedMatrix([head.output], ["output"]))
        self._sessions: dict[str, _KVCache] = {}
        c = config
        # (None where the compiled library cannot take a step through the layers at once)
        self._decode_layers = DecodeLayers.of([(la.w_qkv, la.wo, la.w_gate_up, la.w_down, la.attn_norm, la.ffn_norm)
                                               for la in self._layers], c.hidden, c.ffn)
        self._q_dim, self._kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim

    # ------------------------------------------------------------------ sessions
    def session_length(self, session_id: str) -> int:
        s = self._sessions.get(session_id)
        return 0 if s is None else s.length

    def drop_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def sessions(self) -> list[str]:
        return list(self._sessions)

    def truncate_session(self, session_id: str, length: int) -> None:
        """Keep positions [0, length) (a speculative step's rejected drafts go); longer is a no-op."""
        cache = self._sessions.get(session_id)
        if cache is not None:
            cache.length = min(cache.length, max(0, int(length)))

    def fork_session(self, src: str, dst: str, length: int) -> None:
        """dst starts as a copy of src's first `length` positions (a shared prompt prefix)."""
        cache = self._sessions[src]
        if length > cache.length:
            raise ValueError(f"session {src} holds {cache.length} positions, cannot fork {length}")
        new = _KVCache(len(self._layers), self.config.n_kv_heads, self.config.head_dim, max(16, length))
        new.k[:, :, :length] = cache.k[:, :, :length]
        new.v[:, :, :length] = cache.v[:, :, :length]
        new.length = length
        self._sessions[dst] = new

    def export_kv(self, session_id: str, layer_start: int, layer_end: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """The session's keys and values of layers [layer_start, layer_end) (absolute indexes,
        within the held range), positions [0, length): f32 [layers, kv_heads, length, head_dim] each."""
        lo, hi = held_layers(self.layer_ids, layer_start, layer_end)
        cache = self._sessions.get(session_id)
        held = 0 if cache is None else cache.length
        if length > held:
            raise ValueError(f"session {session_id} holds {held} positions, cannot copy {length}")
        return cache.k[lo:hi, :, :length].copy(), cache.v[lo:hi, :, :length].copy()

    def import_kv(self, session_id: str, k: np.ndarray, v: np.ndarray) -> None:
        """The session's KV becomes k and v (every held layer, positions [0, k.shape[2])), as
        export_kv gives them; whatever it held here before goes."""
        c = self.config
        check_kv(k, v, len(self._layers), c.n_kv_heads, c.head_dim, self.max_ctx)
        cache = _KVCache(len(self._layers), c.n_kv_heads, c.head_dim, max(16, k.shape[2]))
        cache.k[:, :, :k.shape[2]] = k
        cache.v[:, :, :k.shape[2]] = v
        cache.length = k.shape[2]
        self._sessions[session_id] = cache

    def _cache_for(self, sl: SessionSlice) -> _KVCache:
        end = sl.start_pos + sl.length
        if end > self.max_ctx:
            raise ValueError(f"session {sl.session_id}: position {end} exceeds the context of {self.max_ctx}")
        cache = self._sessions.get(sl.session_id)
        if cache is None:
            if sl.start_pos != 0:
                raise ValueError(f"session {sl.session_id} is unknown here and starts at {sl.start_pos}, not 0")
            c = self.config
            cache = self._sessions[sl.session_id] = _KVCache(len(self._layers), c.n_kv_heads, c.head_dim, max(16, end))
        elif sl.start_pos > cache.length:
            raise ValueError(f"session {sl.session_id}: start {sl.start_pos} leaves a gap after length {cache.length}")
        cache.ensure(end)
        return cache

    # ------------------------------------------------------------------ compute
    def forward(self, slices: list[SessionSlice], hidden: np.ndarray) -> np.ndarray:
        c = self.config
        x = np.array(hidden, dtype=np.float32, copy=True)
        if x.ndim != 2 or x.shape[1] != c.hidden or x.shape[0] != sum(s.length for s in slices):
            raise ValueError(f"hidden has shape {hidden.shape}; expected ({sum(s.length for s in slices)}, {c.hidden})")
        caches = [self._cache_for(s) for s in slices]
        positions = np.concatenate([np.arange(s.start_pos, s.start_pos + s.length) for s in slices]) if slices else np.zeros(0, np.int64)
        offsets = np.cumsum([0] + [s.length for s in slices])
        tables = ref.rope_tables(positions, c.head_dim, c.rope_base)
        n_qk = c.n_heads + c.n_kv_heads
        # a decode step (one row a session) through every layer in one kernel call, where the loop
        # below pays Python's and numpy's per-call costs for every layer (and, in its attention,
        # every session); with an older library, one attention call a layer
        decode = DecodeAttention.for_step(slices, caches, tables, c.n_heads, c.n_kv_heads, c.head_dim, self.max_ctx)
        if decode is not None and self._decode_layers is not None:
            decode.through(self._decode_layers, x, c.rms_eps, c.ffn_hadamard or 0, self.threads)
            layers = []
        else:
            layers = self._layers
        for li, layer in enumerate(layers):
            qkv = layer.w_qkv.apply_rmsnorm(x, layer.attn_norm, c.rms_eps, threads=self.threads)
            if decode is not None:
                attn = decode(li, qkv)
            else:
                # q and k heads side by side: one rope over both, with the forward's tables
                qk = ref.rope(qkv[:, : self._q_dim + self._kv_dim].reshape(-1, n_qk, c.head_dim), positions, c.rope_base, tables)
                q, k = qk[:, : c.n_heads], qk[:, c.n_heads :]
                v = qkv[:, self._q_dim + self._kv_dim :].reshape(-1, c.n_kv_heads, c.head_dim)
                attn = np.empty((x.shape[0], c.n_heads, c.head_dim), np.float32)
                for si, (sl, cache) in enumerate(zip(slices, caches)):
                    rows = slice(offsets[si], offsets[si + 1])
                    end = sl.start_pos + sl.length
                    cache.k[li, :, sl.start_pos:end] = k[rows].transpose(1, 0, 2)
                    cache.v[li, :, sl.start_pos:end] = v[rows].transpose(1, 0, 2)
                    attn[rows] = ref.attention(q[rows], cache.k[li, :, :end], cache.v[li, :, :end], sl.start_pos)
            layer.wo.apply(attn.reshape(x.shape[0], -1), out=x, threads=self.threads)  # the residual add, in place
            gate_up = layer.w_gate_up.apply_rmsnorm(x, layer.ffn_norm, c.rms_eps, threads=self.threads)
            act = ref.silu_gate(gate_up[:, : c.ffn], gate_up[:, c.ffn :])
            if c.ffn_hadamard:  # ffn_down's input side was rotated offline (tabshard/rotation.py)
                hadamard(act, c.ffn_hadamard)
            layer.w_down.apply(act, out=x, threads=self.threads)
        for sl, cache in zip(slices, caches):
            # a replay (start_pos < length) truncates whatever came after it
            cache.length = sl.start_pos + sl.length
        return x

    def head_topk(self, hidden: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._head is None:
            raise ValueError("this backend holds no head")
        return ref.topk(self._head.apply_rmsnorm(np.asarray(hidden, np.float32), self._head_norm, self.config.rms_eps,
                                                 threads=self.threads), k)
