"""The wgpu backend: a worker's layer range (and maybe the head) on the WGSL kernels, natively
through wgpu-py. Same interface and behaviour as NumpyBackend. The op order of a layer and of
the head is not written here: this backend and the browser's (tab_worker/web/backend_webgpu.js)
both build their launchers from one layer program (kernels/layer_program.py).

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

On a real GPU, decode batches (up to FUSE_MAX_ROWS rows) run 5 dispatches per layer instead
of 10: the norms fold into the following matvec (qmatvec_norm.wgsl), silu_gate into the down
projection's input (qmatvec_silu.wgsl), rope and kv_store into attention
(attention_rope.wgsl). CPU rasterisers keep the 10: the fused matvecs redo the norm in every
workgroup and silu for every output row, which a GPU hides behind dispatch costs and a CPU
pays in full (`benchmarks/bench_device.py --variants wgpu-unfused,wgpu` measures both sides).

The dispatches of a call are planned once per row count (runner.Device.plan) and replayed as
native calls. ``forward_topk`` runs layers, final norm, head and
top-k in one submission and reads back only the k ids and logits of each session: on an
H100 (SmolLM2-135M shape, 182 dispatches a token) 3.2-3.5 ms a token against 4.6 ms for
forward() + head_topk() before these changes, of which ~2.4 ms is GPU time.
"""
from __future__ import annotations

import numpy as np

from kernels import layer_program as LP
from kernels import runner as R
from kernels import launchers as KL
from kernels.quant import QuantTensor
from protocol.model_types import HeadWeights, LayerWeights, ModelConfig, SessionSlice
from tab_worker.numpy_backend import check_kv, held_layers

MAX_TOPK = KL.TopK.MAX_K
SUBMIT_EVERY = 64  # dispatches per command buffer: the GPU starts while the rest is recorded
FUSE_MAX_ROWS = 16  # batches up to this many rows may use the fused decode kernels; prefill keeps the plain ops


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


class _ProgramKernel(KL.Launcher):
    """A layer program's "kernel" op: its overrides and params evaluated once, its grid per rows."""

    def __init__(self, dev: R.Device, op: dict, env: dict, buffers: dict, extra_constants: dict | None = None):
        wg = dev.workgroup_size(LP.workgroup(op, dev.is_real_gpu(), env))
        self.env = {**env, "wg": wg}
        constants = {"WG": wg, **{k: LP.evaluate(v, self.env) for k, v in op["constants"].items()}, **(extra_constants or {})}
        params = {k: LP.evaluate(v, self.env) for k, v in op["params"].items()}
        self.launch = KL.Launch(dev, op["kernel"], constants, [buffers[name] for name in op["buffers"]], **params)
        self.grid = op["grid"]

    def dispatches(self, rows: int) -> list:
        env = {**self.env, "rows": rows}
        return self.launch.at(*(int(LP.evaluate(g, env)) for g in self.grid))


class _GpuLayer:
    def __init__(self, dev: R.Device, index: int, w: LayerWeights, layout3: dict):
        def up(t: QuantTensor, name: str) -> KL.GpuQuantTensor:
            return KL.upload_quant(dev, t, f"layer{index}.{name}", **layout3)

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
                 power_preference: str = "high-performance", matvec_max_rows: int | None = None,
                 compute_dtype: str = "f32", fuse_decode: bool | None = None, tuning: KL.MatmulTuning | None = None,
                 contiguous3: bool = True, kernel_constants: dict[str, dict] | None = None,
                 kv_splits: int | None = None):
        """``device``: a Device to share; else one (per process) for ``limits`` and
        ``power_preference`` (see kernels.runner.Device). ``matvec_max_rows``: batches up
        to this many rows use qmatvec, larger ones qmatmul (default: by device, see
        kernels.runner.matmul_tuning). ``compute_dtype``: "f32"; "f16", the matvecs (the
        fused ones and the head's too) on their NAME_f16.wgsl variants, which need the
        device's shader-f16 (f16 weights, inputs and products, f32 sums; activations, the
        KV cache, attention, norms and prefill's qmatmul stay f32); "auto", f16 where the
        device has shader-f16. The default is f32: on lavapipe the f16 matvecs run at
        0.4-0.5x the f32 ones' speed, and no GPU has measured them faster yet; "i8", the
        matvecs on their NAME_i8.wgsl variants (inputs quantized per 32-input block to int8,
        integer dot products; 3-bit weights in bit planes, the high plane spread for them:
        kernels.quant.spread_3bit) (bench_device's wgpu-i8 variants compare them with f32).
        ``fuse_decode``: run decode batches on the fused kernels (see the module docstring);
        None (the default) does on a real GPU and not on a CPU rasteriser. ``tuning``: the
        matvecs' shapes (kernels.runner.MatmulTuning; default: by device). ``contiguous3``:
        3-bit weights repacked for the matvecs on upload: codes contiguous for f32 and f16,
        the high plane spread for i8 (kernels.launchers.upload_quant); False keeps the blobs'
        bit planes, as the browser's backend does. ``kernel_constants``:
        {kernel: {override: value}} set on the layer program's kernel ops of that name, over
        the program's own (benchmarks/bench_device.py's variants compare kernel options so).
        ``kv_splits``: split-K attention's key runs per row (default: the layer program's
        KV_SPLITS for this adapter kind), fewer where their partials would not fit a binding."""
        self.config = c = config
        if c.ffn_hadamard:  # silu_hadamard.wgsl holds a block in workgroup memory
            from kernels.reference import check_hadamard_block

            check_hadamard_block(c.ffn_hadamard, c.ffn)
        self.layer_ids = sorted(layers)
        if self.layer_ids and self.layer_ids != list(range(self.layer_ids[0], self.layer_ids[-1] + 1)):
            raise ValueError(f"layers must be a contiguous range, got {self.layer_ids}")
        self.max_ctx = int(max_ctx)
        self.matvec_max_rows = matvec_max_rows
        self.dev = dev = device or R.get_device(limits, power_preference)
        self.tuning = tuning or KL.matmul_tuning(dev)
        self.fuse_decode = dev.is_real_gpu() if fuse_decode is None else bool(fuse_decode)
        if compute_dtype == "auto":
            compute_dtype = "f16" if "shader-f16" in dev.features else "f32"
        if compute_dtype not in ("f32", "f16", "i8"):
            raise ValueError(f"compute_dtype must be 'f32', 'f16', 'i8' or 'auto', got {compute_dtype!r}")
        if compute_dtype == "f16" and "shader-f16" not in dev.features:
            raise ValueError(f"compute_dtype 'f16' needs the shader-f16 feature, which {dev.describe()} lacks")
        self.compute_dtype = compute_dtype
        self._kernel_constants = dict(kernel_constants or {})
        if kv_splits is not None and (isinstance(kv_splits, bool) or not isinstance(kv_splits, int) or kv_splits < 1):
            raise ValueError(f"kv_splits must be a positive integer, got {kv_splits!r}")
        self._kv_splits_wanted = kv_splits
        self._kv_splits = 1
        self._attn_parts = None
        # 3-bit weights repacked for the matvecs that read them: contiguous codes for f32 and
        # f16, bit planes with the high plane spread for i8
        layout3 = {"contiguous3": contiguous3 and compute_dtype != "i8", "spread3": contiguous3 and compute_dtype == "i8"}
        self._layers = [_GpuLayer(dev, i, layers[i], layout3) for i in self.layer_ids]
        self._head = None
        if head is not None:
            self._head = (dev.upload(np.asarray(head.output_norm, np.float32), "output_norm"),
                          KL.upload_quant(dev, head.output, "output", **layout3))
        self._freq_turns = dev.upload(KL.rope_freq_turns(c.head_dim, c.rope_base), "rope.freq_turns")

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
        self._head_ops: dict | None = None  # scratch buffer name -> head launcher
        self._topk: dict[int, KL.TopK] = {}
        self._plans: dict = {}  # key -> (rows, layer ops, plan), all for rows _plan_rows
        self._plan_rows = 0

    # ------------------------------------------------------------------ sessions
    def session_length(self, session_id: str) -> int:
        return self._lengths.get(session_id, 0)

    def sessions(self) -> list[str]:
        return list(self._lengths)

    def truncate_session(self, session_id: str, length: int) -> None:
        """Keep positions [0, length) (a speculative step's rejected drafts go); longer is a no-op."""
        if session_id in self._lengths:
            self._lengths[session_id] = min(self._lengths[session_id], max(0, int(length)))

    def drop_session(self, session_id: str) -> None:
        self._lengths.pop(session_id, None)
        self._slots.pop(session_id, None)  # the slot's stale contents are never read again

    def fork_session(self, src: str, dst: str, length: int) -> None:
        """dst starts as a copy of src's first ``length`` positions (a shared prompt prefix):
        each layer's (slot, kv head) runs of keys and values copied on the GPU, through a
        scratch buffer (WebGPU copies nothing from a buffer into itself)."""
        length = int(length)
        if length > self._lengths.get(src, 0):
            raise ValueError(f"session {src} holds {self._lengths.get(src, 0)} positions, cannot fork {length}")
        self._check([SessionSlice(dst, 0, length)])
        self._assign_slots([SessionSlice(dst, 0, length)])
        n_kv = self.config.n_kv_heads
        run = length * self._position_bytes // n_kv
        if self._layers and run:
            scratch = self.dev.buffer(n_kv * run, "fork.scratch")
            enc = self.dev.encoder()
            for pair in self._pools:
                for buf in pair:  # pool -> scratch, then scratch -> pool (copies in one encoder run in order)
                    for h in range(n_kv):
                        enc.copy_buffer_to_buffer(buf, self._head_run_offset(src, h), scratch, h * run, run)
                    for h in range(n_kv):
                        enc.copy_buffer_to_buffer(scratch, h * run, buf, self._head_run_offset(dst, h), run)
            self.dev.queue.submit([enc.finish()])
            scratch.destroy()
        self._lengths[dst] = length

    def export_kv(self, session_id: str, layer_start: int, layer_end: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """As NumpyBackend.export_kv: each layer's (slot, kv head) runs of keys and values copied
        on the GPU into one scratch buffer (after the work queued before), read back once."""
        lo, hi = held_layers(self.layer_ids, layer_start, layer_end)
        held = self._lengths.get(session_id, 0)
        if length > held:
            raise ValueError(f"session {session_id} holds {held} positions, cannot copy {length}")
        c = self.config
        n_kv = c.n_kv_heads
        run = length * self._position_bytes // n_kv
        if not run:
            empty = np.zeros((hi - lo, n_kv, length, c.head_dim), np.float32)
            return empty, empty.copy()
        scratch = self.dev.buffer(2 * (hi - lo) * n_kv * run, "copy_kv.scratch")
        enc = self.dev.encoder()
        for i, pair in enumerate(self._pools[lo:hi]):
            for j, buf in enumerate(pair):  # keys, then values
                for h in range(n_kv):
                    enc.copy_buffer_to_buffer(buf, self._head_run_offset(session_id, h),
                                              scratch, ((i * 2 + j) * n_kv + h) * run, run)
        self.dev.queue.submit([enc.finish()])
        data = self.dev.read(scratch, count=2 * (hi - lo) * n_kv * length * c.head_dim)
        scratch.destroy()
        data = data.reshape(hi - lo, 2, n_kv, length, c.head_dim)
        return data[:, 0].copy(), data[:, 1].copy()

    def import_kv(self, session_id: str, k: np.ndarray, v: np.ndarray) -> None:
        """As NumpyBackend.import_kv: written into the session's slot, each (layer, kv head)
        run of positions where the kernels read it."""
        c = self.config
        check_kv(k, v, len(self._layers), c.n_kv_heads, c.head_dim, self.max_ctx)
        length = k.shape[2]
        self.drop_session(session_id)
        self._check([SessionSlice(session_id, 0, length)])
        self._assign_slots([SessionSlice(session_id, 0, length)])
        for (k_pool, v_pool), layer_k, layer_v in zip(self._pools, k, v):
            for h in range(c.n_kv_heads):
                offset = self._head_run_offset(session_id, h)
                self.dev.write(k_pool, np.ascontiguousarray(layer_k[h], np.float32), offset)
                self.dev.write(v_pool, np.ascontiguousarray(layer_v[h], np.float32), offset)
        self._lengths[session_id] = length

    def _head_run_offset(self, session_id: str, h: int) -> int:
        """Byte offset in a KV pool of the session's slot's run of kv head h (layout [slot][kv head][ctx][head_dim])."""
        n_kv = self.config.n_kv_heads
        return (self._slots[session_id] * n_kv + h) * self._pool_ctx * (self._position_bytes // n_kv)

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
        self._layer_ops, self._plans = None, {}

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
            self._buf["head_in"] = self.dev.buffer(head_cap * self._strides["h"] * 4, "head_in")
        self._rows_cap = cap
        self._layer_ops, self._head_ops, self._topk, self._plans = None, None, {}, {}

    def _linear(self, w: KL.GpuQuantTensor, x: str, y: str, y_col: int = 0, accumulate: bool = False, **prologue) -> KL.QuantLinear:
        b, s = self._buf, self._strides
        return KL.QuantLinear(self.dev, w, b[x], s[x], b[y], s[y], y_col, accumulate, self.matvec_max_rows,
                             tuning=self.tuning, compute_dtype=self.compute_dtype, **prologue)

    @property
    def _fuse_max_rows(self) -> int:
        """Batches up to this many rows run the fused decode kernels (qmatvec_norm,
        qmatvec_silu: they exist for qmatvec only); larger ones the unfused ops. 0 where this
        backend does not fuse (fuse_decode)."""
        if not self.fuse_decode:
            return 0
        limit = self.tuning.matvec_max_rows if self.matvec_max_rows is None else self.matvec_max_rows
        return min(limit, FUSE_MAX_ROWS)

    def _build_layer_ops(self) -> list:
        """Every held layer's ops, from the layer program (kernels/layer_program.py): per layer
        5 dispatches when fused (norm+qkv, rope+kv_store+attention, wo, norm+gate/up,
        silu+down) for up to _fuse_max_rows rows, else the unfused 10; one more (the partials'
        fold) where attention splits the keys."""
        c = self.config
        env = LP.names(c, self._pool_ctx, 0, self.dev.is_real_gpu(), self._kv_splits_wanted)
        per_split = KL.attention_parts_bytes(c.n_heads, c.head_dim, 1, self._rows_cap)
        self._kv_splits = max(1, min(env["kv_splits"], self.dev.max_binding // per_split))
        need = per_split * self._kv_splits if self._kv_splits > 1 else 16  # attention binds them even unsplit
        if self._attn_parts is None or self._attn_parts.size < need:
            self._attn_parts = self.dev.buffer(need, "attention.parts")
        ops = []
        for layer, (k_pool, v_pool) in zip(self._layers, self._pools):
            buffers = {**self._buf, "freq_turns": self._freq_turns, "attn_norm": layer.attn_norm,
                       "ffn_norm": layer.ffn_norm, "k_pool": k_pool, "v_pool": v_pool, "attn_parts": self._attn_parts}
            weights = {"qkv": layer.qkv, "gate_up": layer.gate_up, "wo": [(layer.wo, 0)], "w_down": [(layer.w_down, 0)]}
            ops += self._program_ops(LP.PROGRAM["layer"], buffers, weights)
        return ops

    def _program_ops(self, program: list, buffers: dict, weights: dict) -> list:
        """Launchers of a layer program section (kernels/layer_program.py) on these buffers and
        weights (name -> [(GpuQuantTensor, first output column)])."""
        dev, fuse_rows = self.dev, self._fuse_max_rows
        env = LP.names(self.config, self._pool_ctx, 0, kv_splits=self._kv_splits)
        strides = {**self._strides, "src": self._strides["h"], "head_in": self._strides["h"], "logits": self._logits_stride}

        def build(op: dict) -> list:
            kind = op["op"]
            if kind == "kernel":
                return [_ProgramKernel(dev, op, env, buffers, self._kernel_constants.get(op["kernel"]))]
            if kind == "linear":
                prologue = {}
                if "norm" in op:
                    prologue["norm"] = (buffers[op["norm"]], self.config.rms_eps)
                if "silu_up_col" in op:
                    prologue["silu_up_col"] = int(LP.evaluate(op["silu_up_col"], env))
                x, y = op["x"], op["y"]
                return [KL.QuantLinear(dev, w, buffers[x], strides[x], buffers[y], strides[y], col, op["accumulate"],
                                      self.matvec_max_rows, tuning=self.tuning, compute_dtype=self.compute_dtype, **prologue)
                        for w, col in weights[op["weight"]]]
            if kind == "by_rows":
                plain = [launcher for o in op["plain"] for launcher in build(o)]
                if not fuse_rows or not LP.evaluate(op.get("fusable", 1), env):
                    return plain
                return [KL.ByRows(fuse_rows, [launcher for o in op["fused"] for launcher in build(o)], plain)]
            if kind == "when":
                return [launcher for o in op["then" if LP.evaluate(op["if"], env) else "else"] for launcher in build(o)]
            raise ValueError(f"layer program: unknown op {kind!r}")

        return [launcher for op in program for launcher in build(op)]

    def _head_launchers(self, src: str, k: int) -> list:
        """Final norm + head matvec (the layer program's head section) + top-k, reading rows of
        scratch buffer ``src``."""
        c, dev, b = self.config, self.dev, self._buf
        ops = self._head_ops.get(src) if self._head_ops else None
        if ops is None:
            norm_w, output = self._head
            ops = self._program_ops(LP.PROGRAM["head"], {**b, "src": b[src], "output_norm": norm_w}, {"output": [(output, 0)]})
            self._head_ops = {**(self._head_ops or {}), src: ops}
        topk = self._topk.get(k)
        if topk is None:
            head_cap = min(self._rows_cap, self._head_max_rows)
            topk = self._topk[k] = KL.TopK(dev, b["logits"], self._logits_stride, c.vocab, k, head_cap)
        return [*ops, topk]

    def _plan(self, key, launchers_fn, rows: int) -> list:
        """A cached plan (Device.plan) for these launchers at ``rows``: rebuilt when rows change
        (planning sets the launchers' rows-dependent params) or the ops were rebuilt."""
        if rows != self._plan_rows:  # plans share launchers whose params depend on rows
            self._plans, self._plan_rows = {}, rows
        cached = self._plans.get(key)
        if cached is None or cached[1] is not self._layer_ops:
            cached = self._plans[key] = (rows, self._layer_ops, self.dev.plan(launchers_fn(), rows))
        return cached[2]

    # ------------------------------------------------------------------ compute
    def _write_hidden(self, hidden: np.ndarray) -> None:
        stride = self._strides["h"]
        rows = hidden if stride == hidden.shape[1] else np.pad(hidden, ((0, 0), (0, stride - hidden.shape[1])))
        self.dev.write(self._buf["h"], rows.astype(np.float32, copy=False))

    def _hidden_rows(self, data: np.ndarray, rows: int) -> np.ndarray:
        stride = self._strides["h"]
        return data.view(np.float32)[: rows * stride].reshape(rows, stride)[:, : self.config.hidden]

    def _prepare(self, slices: list[SessionSlice], hidden: np.ndarray):
        c = self.config
        hidden = np.asarray(hidden, np.float32)
        total = sum(sl.length for sl in slices)
        if hidden.ndim != 2 or hidden.shape != (total, c.hidden):
            raise ValueError(f"hidden has shape {hidden.shape}; expected ({total}, {c.hidden})")
        self._check(slices)
        self._assign_slots(slices)
        positions = np.concatenate([np.arange(sl.start_pos, sl.start_pos + sl.length) for sl in slices] or [[]]).astype(np.uint32)
        slots = np.concatenate([np.full(sl.length, self._slots[sl.session_id]) for sl in slices] or [[]]).astype(np.uint32)
        return hidden, total, positions, slots

    def forward(self, slices: list[SessionSlice], hidden: np.ndarray) -> np.ndarray:
        return self._forward_prepared(slices, *self._prepare(slices, hidden))

    def _forward_prepared(self, slices, hidden, total, positions, slots) -> np.ndarray:
        out = hidden.copy()
        if self._layers:
            for start in range(0, total, self._max_rows):
                stop = min(total, start + self._max_rows)
                out[start:stop] = self._forward_rows(hidden[start:stop], positions[start:stop], slots[start:stop])
        for sl in slices:
            self._lengths[sl.session_id] = sl.start_pos + sl.length  # a replay truncates what came after
        return out

    def _stage_rows(self, hidden: np.ndarray, positions: np.ndarray, slots: np.ndarray) -> int:
        rows = len(hidden)
        self._ensure_rows(rows)
        if self._layer_ops is None:
            self._layer_ops = self._build_layer_ops()
        self._write_hidden(hidden)
        self.dev.write(self._buf["positions"], positions)
        self.dev.write(self._buf["slots"], slots)
        return rows

    def _forward_rows(self, hidden: np.ndarray, positions: np.ndarray, slots: np.ndarray) -> np.ndarray:
        rows = self._stage_rows(hidden, positions, slots)
        plan = self._plan("layers", lambda: self._layer_ops, rows)
        data = self.dev.execute(plan, submit_every=SUBMIT_EVERY,
                                readback=[(self._buf["h"], 0, rows * self._strides["h"] * 4)])
        return self._hidden_rows(data, rows)

    def forward_topk(self, slices: list[SessionSlice], hidden: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """forward() then head_topk() of each slice's last row, as one GPU submission with one
        readback of only the k ids and logits per slice (needs the head and, for one
        submission, the layers from 0 to the last): returns (ids int32 [len(slices), k],
        logits f32 [len(slices), k]), each slice's row of k best first, exactly what
        ``head_topk(forward(slices, hidden)[ends], k)`` returns (ends: each slice's last row).
        Slices of length 0 are not allowed. Batches larger than one chunk fall back to
        forward + head_topk."""
        if self._head is None:
            raise ValueError("this backend holds no head")
        k = min(int(k), self.config.vocab)
        if not 1 <= k <= MAX_TOPK:
            raise ValueError(f"k must be in [1, {MAX_TOPK}], got {k}")
        if any(sl.length < 1 for sl in slices):
            raise ValueError("forward_topk needs every slice to have at least one row")
        hidden, total, positions, slots = self._prepare(slices, hidden)
        n = len(slices)
        if not self._layers or total > self._max_rows or n > self._head_max_rows or n == 0:
            out = self._forward_prepared(slices, hidden, total, positions, slots)
            ends = np.cumsum([sl.length for sl in slices]) - 1
            return self.head_topk(out[ends], k)
        rows = self._stage_rows(hidden, positions, slots)
        # each slice's last row: read in place when every slice is one row, else gathered
        gather = total != n
        src = "head_in" if gather else "h"
        ends = np.cumsum([sl.length for sl in slices]) - 1
        row_bytes = self._strides["h"] * 4

        def launchers():
            copies = [R.BufferCopy(self._buf["h"], int(e) * row_bytes, self._buf["head_in"], i * row_bytes, row_bytes)
                      for i, e in enumerate(ends)] if gather else []
            return [*self._layer_ops, *copies, *self._head_launchers(src, k)]

        key = ("forward_topk", src, k, tuple(ends) if gather else None)
        plan = self._plan(key, launchers, rows)
        for sl in slices:
            self._lengths[sl.session_id] = sl.start_pos + sl.length
        topk = self._topk[k]
        nbytes = n * k * 4
        data = self.dev.execute(plan, submit_every=SUBMIT_EVERY, readback=[(topk.values, 0, nbytes), (topk.ids, 0, nbytes)])
        values = data[:nbytes].view(np.float32).reshape(n, k)
        ids = data[nbytes: 2 * nbytes].view(np.uint32).astype(np.int32).reshape(n, k)
        return ids, values

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
        rows = len(hidden)
        self._ensure_rows(rows)
        plan = self._plan(("head", k), lambda: self._head_launchers("h", k), rows)
        self._write_hidden(hidden)
        topk = self._topk[k]
        nbytes = rows * k * 4
        data = self.dev.execute(plan, readback=[(topk.values, 0, nbytes), (topk.ids, 0, nbytes)])
        values = data[:nbytes].view(np.float32).reshape(rows, k)
        ids = data[nbytes: 2 * nbytes].view(np.uint32).astype(np.int32).reshape(rows, k)
        return ids, values

