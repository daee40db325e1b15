"""The wgpu backend: a worker's layer range (and maybe the head) on the WGSL kernels, natively
through wgpu-py. Same interface and behaviour as NumpyBackend; the browser worker runs the
same kernels in the same order.

Layout on the device:

* weights are uploaded once, quantized as packed (q/k/v fused into one matrix and gate/up into
  another when their formats agree; otherwise the parts write column ranges of one output);
* every layer keeps a KV pool per K and V: f32 [slot][kv head][ctx][head_dim], one slot per
  session, so one kv_store and one attention dispatch per layer serve a whole batch of
  sessions; the pools grow by copy, in slots as sessions arrive and in ctx (doubling up to
  max_ctx) as they lengthen, so memory follows use; one layer's pool must fit one binding;
* scratch activations are sized for the largest batch seen, row strides rounded to 4 floats.

A forward call records every layer of the range into one compute pass (cut into a few
command buffers, submitted as they are recorded so the GPU need not wait for Python) and
reads the hidden rows back once. Batches larger than the scratch can bind are run as
consecutive row chunks: each session's rows stay in order, so this is chunked prefill.
"""
from __future__ import annotations

import numpy as np

from kernels import runner as R
from kernels.quant import QuantTensor
from tab_worker.engine_types import HeadWeights, LayerWeights, ModelConfig, SessionSlice

MAX_TOPK = R.TopK.MAX_K
SUBMIT_EVERY = 64  # launchers per command buffer: the GPU starts while the rest is recorded


def _round4(n: int) -> int:
    return -(-n // 4) * 4


def _fused_parts(tensors: list[QuantTensor]) -> list[tuple[QuantTensor, int]]:
    """Matrices sharing an input, as [(tensor, first output column)]: one row-concatenated
    tensor when their formats agree (one dispatch), else each at its column offset."""
    first = tensors[0]
    if all(t.spec == first.spec and t.k == first.k for t in tensors):
        fused = QuantTensor(first.spec, sum(t.n for t in tensors), first.k,
                            np.ascontiguousarray(np.concatenate([t.qweight for t in tensors])),
                            np.ascontiguousarray(np.concatenate([t.scales for t in tensors])))
        return [(fused, 0)]
    cols = np.cumsum([0] + [t.n for t in tensors])
    return [(t, int(c)) for t, c in zip(tensors, cols)]


class _GpuLayer:
    def __init__(self, dev: R.Device, index: int, w: LayerWeights):
        def up(t: QuantTensor, name: str) -> R.GpuQuantTensor:
            return R.upload_quant(dev, t, f"layer{index}.{name}")

        self.attn_norm = dev.upload(np.asarray(w.attn_norm, np.float32), f"layer{index}.attn_norm")
        self.ffn_norm = dev.upload(np.asarray(w.ffn_norm, np.float32), f"layer{index}.ffn_norm")
        self.qkv = [(up(t, "qkv"), col) for t, col in _fused_parts([w.wq, w.wk, w.wv])]
        self.gate_up = [(up(t, "gate_up"), col) for t, col in _fused_parts([w.w_gate, w.w_up])]
        self.wo = up(w.wo, "wo")
        self.w_down = up(w.w_down, "w_down")


class WgpuBackend:
    name = "wgpu"

    def __init__(self, config: ModelConfig, layers: dict[int, LayerWeights], head: HeadWeights | None, max_ctx: int,
                 device: R.Device | None = None, limits: str | dict = "adapter",
                 power_preference: str = "high-performance", matvec_max_rows: int | None = None):
        """``device``: a Device to share; else one (per process) for ``limits`` and
        ``power_preference`` (see kernels.runner.Device). ``matvec_max_rows``: batches up
        to this many rows use qmatvec, larger ones qmatmul (default: by device, see
        kernels.runner.matmul_tuning)."""
        self.config = c = config
        self.layer_ids = sorted(layers)
        if self.layer_ids and self.layer_ids != list(range(self.layer_ids[0], self.layer_ids[-1] + 1)):
            raise ValueError(f"layers must be a contiguous range, got {self.layer_ids}")
        self.max_ctx = int(max_ctx)
        self.matvec_max_rows = matvec_max_rows
        self.dev = dev = device or R.get_device(limits, power_preference)
        self._layers = [_GpuLayer(dev, i, layers[i]) for i in self.layer_ids]
        self._head = None
        if head is not None:
            self._head = (dev.upload(np.asarray(head.output_norm, np.float32), "output_norm"),
                          R.upload_quant(dev, head.output, "output"))
        self._freq_turns = dev.upload(R.rope_freq_turns(c.head_dim, c.rope_base), "rope.freq_turns")

        self._q_dim, self._kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        self._strides = {  # f32 per row of each scratch buffer
            "h": _round4(c.hidden), "xn": _round4(c.hidden), "qkv": _round4(self._q_dim + 2 * self._kv_dim),
            "attn": _round4(self._q_dim), "gate_up": _round4(2 * c.ffn), "act": _round4(c.ffn),
        }
        self._logits_stride = _round4(c.vocab)
        widest = max(self._strides.values()) * 4
        self._max_rows = min(dev.max_binding // widest, dev.limits["max-compute-workgroups-per-dimension"])
        self._head_max_rows = min(self._max_rows, dev.max_binding // (self._logits_stride * 4))
        if self._max_rows < 1 or (self._head and self._head_max_rows < 1):
            raise R.LimitError(f"one row of activations does not fit the binding limit {dev.max_binding}")

        # sessions: a KV slot each, and their lengths
        self._position_bytes = c.n_kv_heads * c.head_dim * 4  # one position of one layer's K (or V)
        if self._layers and self._position_bytes > dev.max_binding:
            raise R.LimitError(f"one KV position ({self._position_bytes} bytes) exceeds the binding limit {dev.max_binding}")
        self._slots: dict[str, int] = {}
        self._lengths: dict[str, int] = {}
        self._pool_slots = 0  # sessions the pools hold
        self._pool_ctx = 0  # positions per slot: grows by doubling up to max_ctx
        self._pools: list[tuple] = []  # per layer (k_pool, v_pool)

        self._rows_cap = 0
        self._buf: dict[str, object] = {}
        self._layer_ops: list | None = None
        self._head_ops: tuple | None = None
        self._topk: dict[int, R.TopK] = {}

    # ------------------------------------------------------------------ sessions
    def session_length(self, session_id: str) -> int:
        return self._lengths.get(session_id, 0)

    def sessions(self) -> list[str]:
        return list(self._lengths)

    def drop_session(self, session_id: str) -> None:
        self._lengths.pop(session_id, None)
        self._slots.pop(session_id, None)  # the slot's stale contents are never read again

    def _check(self, slices: list[SessionSlice]) -> None:
        seen = set()
        for sl in slices:
            if sl.session_id in seen:
                raise ValueError(f"session {sl.session_id} appears twice in one batch")
            seen.add(sl.session_id)
            end = sl.start_pos + sl.length
            if sl.start_pos < 0 or sl.length < 0:
                raise ValueError(f"session {sl.session_id}: bad slice {sl}")
            if end > self.max_ctx:
                raise ValueError(f"session {sl.session_id}: position {end} exceeds the context of {self.max_ctx}")
            if sl.session_id not in self._lengths:
                if sl.start_pos != 0:
                    raise ValueError(f"session {sl.session_id} is unknown here and starts at {sl.start_pos}, not 0")
            elif sl.start_pos > self._lengths[sl.session_id]:
                raise ValueError(f"session {sl.session_id}: start {sl.start_pos} leaves a gap after length "
                                 f"{self._lengths[sl.session_id]}")
        if self._layers:
            slots, ctx = self._pool_shape_for(slices)
            if slots * ctx * self._position_bytes > self.dev.max_binding:
                raise R.LimitError(f"{slots} sessions of up to {ctx} positions need more KV memory per layer than one "
                                   f"binding holds ({self.dev.max_binding} bytes); drop sessions or shorten them")

    def _pool_shape_for(self, slices: list[SessionSlice]) -> tuple[int, int]:
        """(slots, positions per slot) the pools need to also hold these slices."""
        new = sum(1 for sl in slices if sl.session_id not in self._slots)
        slots = max(self._pool_slots, len(self._slots) + new)
        longest = max([sl.start_pos + sl.length for sl in slices] + [self._pool_ctx, 1])
        ctx = self._pool_ctx if longest <= self._pool_ctx else min(self.max_ctx, 1 << (longest - 1).bit_length())
        return slots, max(ctx, min(self.max_ctx, 16))

    def _assign_slots(self, slices: list[SessionSlice]) -> None:
        needed_slots, needed_ctx = self._pool_shape_for(slices) if self._layers else (0, 0)
        for sl in slices:
            if sl.session_id not in self._slots:
                used = set(self._slots.values())
                self._slots[sl.session_id] = next(s for s in range(len(used) + 1) if s not in used)
        if needed_slots > self._pool_slots or needed_ctx > self._pool_ctx:
            self._grow_pools(needed_slots, needed_ctx)

    def _grow_pools(self, needed_slots: int, ctx: int) -> None:
        """New pools of at least needed_slots (doubling, as far as the binding allows) by ctx
        positions, with the old contents copied over. Layout [slot][kv head][ctx][head_dim]:
        with ctx unchanged the old pool is a prefix of the new one; else each (slot, head)
        run of positions moves to its new place."""
        per_slot = self._position_bytes * ctx
        slots = self._pool_slots
        if needed_slots > slots:
            slots = max(needed_slots, min(2 * slots, self.dev.max_binding // per_slot))
        n_kv, run = self.config.n_kv_heads, self._pool_ctx * self._position_bytes // self.config.n_kv_heads
        enc = self.dev.encoder()
        pools = []
        for li, old in enumerate(self._pools or [None] * len(self._layers)):
            new = (self.dev.buffer(slots * per_slot, f"layer{li}.k_pool"), self.dev.buffer(slots * per_slot, f"layer{li}.v_pool"))
            for old_buf, new_buf in zip(old or (), new):
                if ctx == self._pool_ctx:
                    enc.copy_buffer_to_buffer(old_buf, 0, new_buf, 0, old_buf.size)
                else:
                    for row in range(self._pool_slots * n_kv):  # row = slot * n_kv + kv head
                        enc.copy_buffer_to_buffer(old_buf, row * run, new_buf, row * run * ctx // self._pool_ctx, run)
            pools.append(new)
        self.dev.queue.submit([enc.finish()])
        self._pools, self._pool_slots, self._pool_ctx = pools, slots, ctx
        self._layer_ops = None

    # ------------------------------------------------------------------ scratch and ops
    def _ensure_rows(self, rows: int) -> None:
        if rows <= self._rows_cap:
            return
        cap = min(self._max_rows, max(rows, 2 * self._rows_cap, 8))
        self._buf = {name: self.dev.buffer(cap * stride * 4, name) for name, stride in self._strides.items()}
        self._buf["positions"] = self.dev.buffer(cap * 4, "positions")
        self._buf["slots"] = self.dev.buffer(cap * 4, "slots")
        if self._head:
            head_cap = min(cap, self._head_max_rows)
            self._buf["logits"] = self.dev.buffer(head_cap * self._logits_stride * 4, "logits")
            self._buf["topk"] = self.dev.buffer(head_cap * 2 * MAX_TOPK * 4, "topk.result")
        self._rows_cap = cap
        self._layer_ops, self._head_ops, self._topk = None, None, {}

    def _linear(self, w: R.GpuQuantTensor, x: str, y: str, y_col: int = 0, accumulate: bool = False) -> R.QuantLinear:
        b, s = self._buf, self._strides
        return R.QuantLinear(self.dev, w, b[x], s[x], b[y], s[y], y_col, accumulate, self.matvec_max_rows)

    def _build_layer_ops(self) -> list:
        c, dev, b, s = self.config, self.dev, self._buf, self._strides
        ops = []
        for layer, (k_pool, v_pool) in zip(self._layers, self._pools):
            ops.append(R.RmsNorm(dev, b["h"], s["h"], layer.attn_norm, b["xn"], s["xn"], c.hidden, c.rms_eps))
            ops += [self._linear(w, "xn", "qkv", col) for w, col in layer.qkv]
            ops.append(R.Rope(dev, b["qkv"], s["qkv"], 0, c.n_heads + c.n_kv_heads, c.head_dim, b["positions"], self._freq_turns))
            ops.append(R.KvStore(dev, b["qkv"], s["qkv"], self._q_dim, self._q_dim + self._kv_dim, b["positions"],
                                 b["slots"], k_pool, v_pool, c.n_kv_heads, c.head_dim, self._pool_ctx))
            ops.append(R.Attention(dev, b["qkv"], s["qkv"], 0, b["positions"], b["slots"], k_pool, v_pool,
                                   b["attn"], s["attn"], c.n_heads, c.n_kv_heads, c.head_dim, self._pool_ctx))
            ops.append(self._linear(layer.wo, "attn", "h", accumulate=True))
            ops.append(R.RmsNorm(dev, b["h"], s["h"], layer.ffn_norm, b["xn"], s["xn"], c.hidden, c.rms_eps))
            ops += [self._linear(w, "xn", "gate_up", col) for w, col in layer.gate_up]
            ops.append(R.SiluGate(dev, b["gate_up"], s["gate_up"], 0, c.ffn, b["act"], s["act"], c.ffn))
            ops.append(self._linear(layer.w_down, "act", "h", accumulate=True))
        return ops

    # ------------------------------------------------------------------ compute
    def _write_hidden(self, hidden: np.ndarray) -> None:
        stride = self._strides["h"]
        rows = hidden if stride == hidden.shape[1] else np.pad(hidden, ((0, 0), (0, stride - hidden.shape[1])))
        self.dev.write(self._buf["h"], rows.astype(np.float32, copy=False))

    def _read_hidden(self, rows: int) -> np.ndarray:
        stride = self._strides["h"]
        return self.dev.read(self._buf["h"], count=rows * stride).reshape(rows, stride)[:, : self.config.hidden]

    def forward(self, slices: list[SessionSlice], hidden: np.ndarray) -> np.ndarray:
        c = self.config
        hidden = np.asarray(hidden, np.float32)
        total = sum(sl.length for sl in slices)
        if hidden.ndim != 2 or hidden.shape != (total, c.hidden):
            raise ValueError(f"hidden has shape {hidden.shape}; expected ({total}, {c.hidden})")
        self._check(slices)
        self._assign_slots(slices)
        positions = np.concatenate([np.arange(sl.start_pos, sl.start_pos + sl.length) for sl in slices] or [[]]).astype(np.uint32)
        slots = np.concatenate([np.full(sl.length, self._slots[sl.session_id]) for sl in slices] or [[]]).astype(np.uint32)
        out = hidden.copy()
        if self._layers:
            for start in range(0, total, self._max_rows):
                stop = min(total, start + self._max_rows)
                out[start:stop] = self._forward_rows(hidden[start:stop], positions[start:stop], slots[start:stop])
        for sl in slices:
            self._lengths[sl.session_id] = sl.start_pos + sl.length  # a replay truncates what came after
        return out

    def _forward_rows(self, hidden: np.ndarray, positions: np.ndarray, slots: np.ndarray) -> np.ndarray:
        rows = len(hidden)
        self._ensure_rows(rows)
        if self._layer_ops is None:
            self._layer_ops = self._build_layer_ops()
        self._write_hidden(hidden)
        self.dev.write(self._buf["positions"], positions)
        self.dev.write(self._buf["slots"], slots)
        self.dev.run(self._layer_ops, rows, submit_every=SUBMIT_EVERY)
        return self._read_hidden(rows)

    def head_topk(self, hidden: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._head is None:
            raise ValueError("this backend holds no head")
        c = self.config
        hidden = np.asarray(hidden, np.float32)
        if hidden.ndim != 2 or hidden.shape[1] != c.hidden:
            raise ValueError(f"hidden has shape {hidden.shape}; expected (rows, {c.hidden})")
        k = min(int(k), c.vocab)
        if not 1 <= k <= MAX_TOPK:
            raise ValueError(f"k must be in [1, {MAX_TOPK}], got {k}")
        ids, values = [], []
        for start in range(0, len(hidden), self._head_max_rows):
            i, v = self._head_rows(hidden[start : start + self._head_max_rows], k)
            ids.append(i)
            values.append(v)
        if not ids:
            return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
        return np.concatenate(ids), np.concatenate(values)

    def _head_rows(self, hidden: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        c, dev, s = self.config, self.dev, self._strides
        rows = len(hidden)
        self._ensure_rows(rows)
        b = self._buf
        if self._head_ops is None:
            norm, output = self._head
            self._head_ops = (R.RmsNorm(dev, b["h"], s["h"], norm, b["xn"], s["xn"], c.hidden, c.rms_eps),
                              R.QuantLinear(dev, output, b["xn"], s["xn"], b["logits"], self._logits_stride,
                                            matvec_max_rows=self.matvec_max_rows))
        topk = self._topk.get(k)
        if topk is None:
            head_cap = min(self._rows_cap, self._head_max_rows)
            topk = self._topk[k] = R.TopK(dev, b["logits"], self._logits_stride, c.vocab, k, head_cap)
        self._write_hidden(hidden)
        n = rows * k * 4
        dev.run([*self._head_ops, topk], rows, copies=[(topk.values, b["topk"], n), (topk.ids, b["topk"], n, n)])
        result = dev.read(b["topk"], np.uint32, count=2 * rows * k)
        values = result[: rows * k].view(np.float32).reshape(rows, k)
        ids = result[rows * k :].astype(np.int32).reshape(rows, k)
        return ids, values
