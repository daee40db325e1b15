"""The tab worker's logic, with no I/O: fed decoded messages, it returns the messages to send.

The same steps, in the same order and with the same names, live in the browser tab's
worker.js. The asyncio adapter (tab_worker/client.py) owns the socket and the heartbeat
timer and calls `handle` for every message in arrival order; `handle` may block while it
computes, which is why the adapter runs it off the event loop.
"""
from __future__ import annotations

import collections
import contextlib
import os
import platform
import time

import numpy as np

from kernels.quant import QuantSpec
from model.drafting import DraftRunner
from model.synthetic import random_layer
from protocol import wire
from protocol.blobs import BlobAssembler, BlobError, BlobInfo, sha256, unpack_blob
from protocol.messages import DEFAULT_HEARTBEAT_MS, MAX_DRAFT_K
from protocol.model_types import ModelConfig, ModelWeights, SessionSlice
from tab_worker.backends import forward_topk, make_backend, resolve_backend_name

# bytes a backend holds per byte of packed weights: numpy (the CPU backend) computes on the
# packed words, its tensors views of the kept blob (tab_worker/cpu_kernels.py); wgpu uploads
# the packed words as they are
EXPANSION = {"numpy": 1.2, "wgpu": 1.2}
PROGRESS_S = 0.25  # the most often load_progress goes out while a blob is still arriving
OWN_DEVICE_STEPS = 8  # a simulated device of its own is charged the least compute of this many steps (_charged_compute)


def _is_decode_step(m: dict) -> bool:
    """A step of one row per session, or of a speculative trip's rows (a session's token and
    drafts: its `topk_rows`) (any message: the adapter asks before validation)."""
    hidden, sessions = m.get("hidden"), m.get("sessions")
    if not isinstance(sessions, list) or getattr(hidden, "ndim", 0) != 2:
        return False
    rows = [s.get("topk_rows") if isinstance(s, dict) else None for s in sessions]
    return hidden.shape[0] == sum(r if type(r) is int and r > 0 else 1 for r in rows)


def draft_backend(weights: ModelWeights, max_ctx: int):
    """A numpy backend holding a whole draft model: every layer and the head."""
    return make_backend("numpy", weights.config, dict(enumerate(weights.layers)), weights.head, max_ctx)


def argmax_next(backend, session_id: str, pos: int, rows: np.ndarray) -> int:
    """The argmax token after `rows` fed at `pos` of the session (a draft's next token)."""
    ids, _logits = forward_topk(backend, [SessionSlice(session_id, pos, len(rows))], rows, 1)
    return int(ids[0][0])


class TabWorker:
    def __init__(self, name: str, backend: str = "auto", token: str | None = None,
                 memory_bytes: int | None = None, device_options: dict | None = None,
                 extra_capabilities: dict | None = None, blob_store: dict[str, bytes] | None = None,
                 draft_weights: ModelWeights | None = None, draft_name: str = "draft"):
        """extra_capabilities: more to report in hello's capabilities (a simulated tab's profile);
        draft_weights: a small model of the served vocabulary (`tabshard worker --draft-model`)
        this worker drafts with for the coordinator's speculation, on the CPU whatever `backend`
        is (a draft model is small, and its one-row steps would wait behind the range's on a GPU
        queue). The browser tab holds no draft model: it never advertises one."""
        self.name = name
        self.backend_name = resolve_backend_name(backend)
        self.token = token
        self.memory_bytes = memory_bytes or 4 << 30
        self.device_options = device_options or {}
        self.extra_capabilities = extra_capabilities or {}
        self.worker_id: str | None = None
        self.epoch = 0
        self.heartbeat_ms = DEFAULT_HEARTBEAT_MS
        # sha256 -> blob (bytes, or a read-only view of the buffer its chunks were assembled in)
        self.blobs: dict[str, bytes | memoryview] = blob_store if blob_store is not None else {}
        self._assembling: dict[str, BlobAssembler] = {}
        self._assignments: dict[int, dict] = {}  # assignment_id -> assign message, while loading
        self.ranges: dict[tuple[int, int], object] = {}  # (layer_start, layer_end) -> backend
        self.range_heads: dict[tuple[int, int], bool] = {}
        self.range_blobs: dict[tuple[int, int], list[str]] = {}
        self._dense: dict[str, object] = {}  # blob sha256 -> the numpy backend's prepared packed layer (shared by ranges)
        self.steps_served = 0
        self.tokens_served = 0
        self.bytes_received = 0
        # Hooks for whoever runs this worker (actors/ wraps it as a simulated tab through them):
        # result_filters: fn(step, reply) may change a step's reply before it is sent;
        # compute_delay: fn(compute_s) -> seconds more each step (and speed measurement) takes, as on a
        # slower device (steps then never run inline: is_quick_step); compute_s is timed by
        # compute_clock (wall time; a simulation of devices of their own may pass the thread's CPU
        # time, which other processes sharing this host's cores do not inflate: a step then takes
        # its CPU time plus compute_delay of it, however long the shared cores made it in wall time,
        # and a step is charged the least CPU time of the last OWN_DEVICE_STEPS steps of its shape:
        # see _charged_compute);
        # compute_turn: fn() -> a context manager held while a step computes (not while it sleeps
        # its compute_delay): simulated devices of one host take turns through it, so that none
        # computes slower for another's memory traffic (separate devices share no memory bus);
        # before_build: fn() runs before an assigned range's backend is built;
        # load_checks: fn(backend) runs on a range just built; an exception refuses the range
        # (a browser creates its pipelines at load, and a kernel beyond its limits fails there)
        self.result_filters: list = []
        self.compute_delay = None
        self.compute_clock = time.perf_counter
        self.compute_turn = contextlib.nullcontext
        self._recent_compute: dict[tuple, collections.deque] = {}
        self.before_build: list = []
        self.load_checks: list = []
        self.load_failures: list[str] = []
        self.decode_ms: dict[tuple[int, int], float] = {}  # range -> compute time of its last decode-sized step
        # load_progress goes out on an accepted assignment, on each completed blob, and between
        # those at most every PROGRESS_S of `clock` (never per chunk: a chunk is 1 MiB)
        self.clock = time.monotonic
        self._progress_at = float("-inf")
        self._progress_layer = 0
        self.draft: DraftRunner | None = None
        self.draft_info: dict | None = None
        if draft_weights is not None:
            cfg = draft_weights.config
            self.draft = DraftRunner(draft_backend(draft_weights, cfg.context), draft_weights.embedding, argmax_next, cfg.context)
            self.draft_info = {"vocab": int(cfg.vocab), "layers": int(cfg.n_layers), "name": str(draft_name)[:128]}

    # ------------------------------------------------------------------ join
    def capabilities(self) -> dict:
        caps = {
            "kind": "python",
            "backend": self.backend_name,
            "memory_bytes": int(self.memory_bytes),
            "expansion": self.expansion,
            "platform": f"{platform.system()} {platform.machine()}",
            "cpus": os.cpu_count() or 1,
            **self.extra_capabilities,
        }
        if self.draft_info is not None:
            caps["draft_model"] = dict(self.draft_info)
        if self.backend_name == "numpy":  # which path its decode matmuls take (status() says why not compiled)
            from tab_worker.cpu_kernels import status

            caps["cpu_kernel"] = status()["kernel"] or "blas"
        if self.backend_name == "wgpu":
            try:
                from kernels.runner import describe_device

                caps.update(describe_device(**self.device_options))
            except Exception as exc:  # report, do not die: the planner can still use numpy peers
                caps["adapter_error"] = str(exc)
        return caps

    @property
    def lean(self) -> bool:
        """Whether the backend's tensors are views of the kept blobs (the CPU backend's are)."""
        return self.backend_name == "numpy"

    @property
    def expansion(self) -> float:
        return EXPANSION[self.backend_name]

    def hello(self) -> dict:
        partial = {a.info.sha256: sorted(a.have) for a in self._assembling.values()}
        return wire.make("hello", worker_name=self.name, token=self.token or "", capabilities=self.capabilities(),
                   resume={"have": sorted(self.blobs), "partial": partial, "worker_id": self.worker_id})

    def heartbeat(self, seq: int) -> dict:
        return wire.make("heartbeat", seq=seq, load={"steps": self.steps_served, "ranges": [list(r) for r in self.ranges]})

    # ------------------------------------------------------------------ dispatch
    def handle(self, m: dict) -> list[dict]:
        handler = getattr(self, f"on_{m['type']}", None)
        if handler is None:
            return [wire.make("error", code="unexpected_type", field="type", message=f"a worker does not accept {m['type']!r}")]
        return handler(m) or []

    def on_welcome(self, m):
        # a new welcome is a new membership: the coordinator re-assigns, so old ranges and
        # their KV caches are released (the weight blobs stay for the re-assignment)
        self.ranges.clear()
        self.range_heads.clear()
        self._assignments.clear()
        if self.draft is not None:  # sessions start over with the new membership
            for sid in list(self.draft.session_ids()):
                self.draft.forget(sid)
        self.worker_id, self.epoch, self.heartbeat_ms = m["worker_id"], m["epoch"], m["heartbeat_ms"]

    def on_error(self, m):
        return None

    def on_ping(self, m):
        return [wire.make("pong", nonce=m["nonce"])]

    def on_measure(self, m):
        """Time one synthetic layer of the model's shape: the planner's measure of this worker."""
        cfg = ModelConfig.from_dict(m["model"])
        tokens = int(m.get("tokens") or 4)
        # random packed codes, not quantize_rtn of random floats: at 7B shapes that would cost
        # seconds and GiBs per tab before the tab is even planned
        layer = random_layer(cfg, 0, spec=QuantSpec(4, 32, False))
        backend = make_backend(self.backend_name, cfg, {0: layer}, None, tokens + 1, **self.device_options)
        x = np.random.default_rng(0).standard_normal((1, cfg.hidden)).astype(np.float32)
        backend.forward([SessionSlice("measure", 0, 1)], x)  # warm-up (pipelines, caches)
        steps, used = [], []
        for pos in range(1, max(tokens, 2)):
            t0, c0 = time.perf_counter(), self.compute_clock()
            backend.forward([SessionSlice("measure", pos, 1)], x)
            steps.append(time.perf_counter() - t0)
            used.append(self.compute_clock() - c0)
        # the fastest step: tabs of one host join together and preempt each other's steps (a
        # mean over a few 1-ms steps measured 1.4 to 8.9 ms/layer for 4 equal workers on 2 cores,
        # and the plan gave one of them 17 of 30 layers)
        ms = ((min(used) if self._own_device else min(steps)) + (self.compute_delay(min(used)) if self.compute_delay else 0.0)) * 1000
        return [wire.make("measurement", step_ms=ms, details={"backend": self.backend_name, "tokens": tokens})]

    def on_assign(self, m):
        infos = [BlobInfo(**c) for c in m["chunks"]]
        need = sum(i.size for i in infos) * self.expansion
        if need > self.memory_bytes:
            return [wire.make("refuse", reason="memory", detail={"assignment_id": m["assignment_id"], "needed": int(need), "budget": int(self.memory_bytes)})]
        self._assignments[m["assignment_id"]] = m
        for info in infos:
            if info.sha256 not in self.blobs and info.sha256 not in self._assembling:
                self._assembling[info.sha256] = BlobAssembler(info)
        self._progress_layer = m["layer_start"]
        return self._load_progress() + self._finish_ready_assignments()

    def on_weights_chunk(self, m):
        asm = self._assembling.get(m.get("blob") or "")
        if asm is None:
            return [wire.make("weights_ack", chunk_id=m["chunk_id"], ok=True)]  # already complete: a resend
        try:
            data = memoryview(m["data"]).cast("B")  # (no copy: the assembler's buffer is the one it goes to)
            asm.add(m["chunk_id"], m["offset"], data, m["sha256"])
            self.bytes_received += data.nbytes
            out = [wire.make("weights_ack", chunk_id=m["chunk_id"], ok=True, blob=asm.info.sha256)]
            if asm.info.key.startswith("layer:"):
                self._progress_layer = int(asm.info.key[6:])
            if asm.complete:
                self.blobs[asm.info.sha256] = asm.result()
                del self._assembling[asm.info.sha256]
                out += self._load_progress() + self._finish_ready_assignments()
            elif self.clock() - self._progress_at >= PROGRESS_S:
                out += self._load_progress()
            return out
        except BlobError as exc:
            return [wire.make("weights_ack", chunk_id=m["chunk_id"], ok=False, error=str(exc), blob=asm.info.sha256)]

    def _load_progress(self) -> list[dict]:
        """Bytes held of the blobs that the pending assignments need (all of them, each counted
        once); nothing when no assignment is pending."""
        infos = {c["sha256"]: c["size"] for a in self._assignments.values() for c in a["chunks"]}
        if not infos:
            return []
        got = sum(size if sha in self.blobs else self._assembling[sha].received_bytes if sha in self._assembling else 0
                  for sha, size in infos.items())
        self._progress_at = self.clock()
        return [wire.make("load_progress", layer=self._progress_layer, received_bytes=got, total_bytes=sum(infos.values()))]

    def _finish_ready_assignments(self) -> list[dict]:
        out = []
        for aid, m in list(self._assignments.items()):
            shas = [c["sha256"] for c in m["chunks"]]
            if not all(s in self.blobs for s in shas):
                continue
            del self._assignments[aid]
            cfg = ModelConfig.from_dict(m["model"])
            layers, head, keys = {}, None, {}
            for s in shas:  # a lean backend's tensors are views of the kept blob, not copies
                kind, index, w = unpack_blob(self.blobs[s], zero_copy=self.lean)
                if kind == "layer":
                    layers[index] = w
                    keys[index] = s
                else:
                    head = w
                    keys["head"] = s
            key = (m["layer_start"], m["layer_end"])
            options, corrections = self.honour_precision(m.get("precision") or {})
            if self.backend_name == "numpy":
                self._prune_dense()
                options.update(shared=self._dense, shared_keys=keys)
            for hook in self.before_build:
                hook()
            backend = make_backend(self.backend_name, cfg, layers, head, int(m.get("max_ctx") or cfg.context), **options)
            try:
                for check in self.load_checks:
                    check(backend)
            except Exception as exc:
                self.load_failures.append(f"{type(exc).__name__}: {exc}"[:300])
                # budget 0: the coordinator moves the stage and never plans this worker again
                out.append(wire.make("refuse", reason="device_limits",
                               detail={"assignment_id": aid, "budget": 0, "error": self.load_failures[-1]}))
                continue
            self.ranges[key] = backend
            self.range_heads[key] = head is not None
            self.range_blobs[key] = shas
            out.append(wire.make("ready", assignment_id=aid, layers=list(key), checksum=sha256("".join(shas).encode()),
                           corrections=corrections))
        return out

    def honour_precision(self, precision: dict) -> tuple[dict, list[dict]]:
        """Settings the coordinator asks of every tab, corrected to what this tab can do: the
        device options to build the backend with, and each correction (reported, never silent)."""
        options, corrections = dict(self.device_options), []

        def correct(setting, asked, used, reason):
            corrections.append({"setting": setting, "asked": asked, "used": used, "reason": reason})

        compute = precision.get("compute")
        if compute == "f16" and self.backend_name == "wgpu" and self._has_feature("shader-f16"):
            options["compute_dtype"] = "f16"  # the matvecs' NAME_f16.wgsl variants
        elif compute == "i8" and self.backend_name == "wgpu":
            options["compute_dtype"] = "i8"  # the matvecs' NAME_i8.wgsl variants (any adapter)
        elif compute not in (None, "f32"):
            why = ("the numpy backend computes in f32" if self.backend_name == "numpy"
                   else "its adapter lacks shader-f16")
            correct("compute", compute, "f32", why)
        wg = precision.get("workgroup_size")
        if wg is not None:
            if self.backend_name != "wgpu":
                correct("workgroup_size", wg, None, f"the {self.backend_name} backend has no workgroups")
            else:
                from kernels.runner import get_device

                base = dict(get_device(options.get("limits", "adapter")).limits)
                cap = base["max-compute-invocations-per-workgroup"]
                used = min(int(wg), cap, base["max-compute-workgroup-size-x"])
                if used != wg:
                    correct("workgroup_size", wg, used, f"the adapter allows at most {cap} invocations per workgroup")
                base["max-compute-invocations-per-workgroup"] = used
                base["max-compute-workgroup-size-x"] = min(base["max-compute-workgroup-size-x"], used)
                options["limits"] = base
        return options, corrections

    def _has_feature(self, name: str) -> bool:
        try:
            from kernels.runner import shared_device

            return name in shared_device().adapter.features
        except Exception:
            return False

    @property
    def _own_device(self) -> bool:
        """Compute timed by a clock other than the wall's (a simulated device of its own): a step,
        and a speed measurement, take that clock's time plus compute_delay of it."""
        return self.compute_clock is not time.perf_counter

    def on_step(self, m):
        key = (m["layer_start"], m["layer_end"])
        backend = self.ranges.get(key)
        if backend is None:
            return [wire.make("error", code="not_assigned", field="layer_start", message=f"layers {key} are not held here", step_id=m["step_id"])]
        slices = [SessionSlice(s["session_id"], int(s["start_pos"]), int(s["length"])) for s in m["sessions"]]
        t0 = time.perf_counter()  # a wait for the compute turn is wall time the delay's sleep absorbs
        reply = wire.make("step_result", step_id=m["step_id"], epoch=m["epoch"])
        want = int(m.get("want_topk") or 0)
        with self.compute_turn():
            c0 = self.compute_clock()
            try:
                if self.range_heads.get(key) and want:
                    # the head stage returns k candidates per session, not hidden rows
                    rows = [int(s.get("topk_rows") or 1) for s in m["sessions"]]
                    ids, logits = forward_topk(backend, slices, m["hidden"], want, rows)
                    reply.update(topk_ids=ids.astype(np.int32), topk_logits=logits.astype(np.float32),
                                 output=np.zeros((0, m["hidden"].shape[1]), np.float32))
                    self.tokens_served += len(ids)
                else:
                    reply["output"] = backend.forward(slices, m["hidden"])
            except ValueError as exc:
                return [wire.make("error", code="bad_step", field="sessions", message=str(exc), step_id=m["step_id"])]
            for result_filter in self.result_filters:
                result_filter(m, reply)
            used = self.compute_clock() - c0
        if self.compute_delay is not None:
            if self._own_device:
                used = self._charged_compute(m, used)
                # what the host's other processes added to the wall time is taken off the sleep
                # (four replicas computing at once on two cores made each step up to twice its
                # compute longer)
                delay = self.compute_delay(used) - ((time.perf_counter() - t0) - used)
            else:
                delay = self.compute_delay(used)
            time.sleep(max(0.0, delay))
        reply["compute_ms"] = (time.perf_counter() - t0) * 1000
        if _is_decode_step(m):
            self.decode_ms[key] = reply["compute_ms"]
        self.steps_served += 1
        return [reply]

    def _charged_compute(self, m: dict, used: float) -> float:
        """The compute a simulated device of its own is charged for step m: the least CPU time
        that a step of m's shape (range, sessions, rows, head or not) took among its last
        OWN_DEVICE_STEPS, this one included. The host's other processes still reach a step's CPU
        time through the memory system: while a worker joined (its process start and its
        download), steps of workers of other clusters took several times their usual CPU time, which a
        device of its own would not; the least of a few recent steps is what this device takes
        for such a step (the context grows a position a step: the recent ones differ little)."""
        key = (m["layer_start"], m["layer_end"], len(m["sessions"]), sum(int(s["length"]) for s in m["sessions"]),
               bool(m.get("want_topk")))
        recent = self._recent_compute.get(key)
        if recent is None:
            if len(self._recent_compute) >= 64:  # (shapes seen once, prompts of every length: forget them)
                self._recent_compute.clear()
            recent = self._recent_compute[key] = collections.deque(maxlen=OWN_DEVICE_STEPS)
        recent.append(used)
        return min(recent)

    def is_quick_step(self, m: dict, budget_ms: float) -> bool:
        """Whether `m` is a decode step on a range whose last decode step took under budget_ms,
        so that an adapter may run it where it received it (no hand-off to a compute thread) and
        still keep its heartbeats on time. Never with a compute_delay: that sleeps inside the
        step, and a slow tab's heartbeats must keep flowing while it sleeps."""
        if m.get("type") != "step" or self.compute_delay is not None or not _is_decode_step(m):
            return False
        last = self.decode_ms.get((m.get("layer_start"), m.get("layer_end")))
        return last is not None and last < budget_ms

    def on_drop_session(self, m):
        for backend in self.ranges.values():
            backend.drop_session(m["session_id"])
        if self.draft is not None:
            self.draft.forget(m["session_id"])

    def on_draft(self, m):
        """Speculation's drafts: the draft model's argmax for up to k positions after the context
        (its cache for the session rolled back to what the context still shares with it)."""
        if self.draft is None:
            return [wire.make("error", code="no_draft_model", field="type", message="this worker holds no draft model")]
        k = min(int(m["k"]), MAX_DRAFT_K)
        context = [int(t) for t in m["context"]]
        if any(t >= self.draft_info["vocab"] for t in context):
            tokens = []  # not this draft model's vocabulary: nothing to propose, the trip goes plain
        else:
            tokens = self.draft.propose(m["session_id"], context, k)
        return [wire.make("draft_result", session_id=m["session_id"], trip=m["trip"], tokens=tokens)]

    def on_truncate_session(self, m):
        for backend in self.ranges.values():
            backend.truncate_session(m["session_id"], int(m["length"]))

    def on_fork_session(self, m):
        for backend in self.ranges.values():
            if m["source_id"] in backend.sessions():
                backend.fork_session(m["source_id"], m["session_id"], int(m["length"]))

    def on_copy_kv(self, m):
        """The session's KV of a range held here, from the wider range held here that has it
        (the same worker serving a stage of two pipelines keeps a backend, and a KV cache, per
        range): answered either way, so that the coordinator replays what was not copied."""
        sid, length = m["session_id"], int(m["length"])
        target = (m["layer_start"], m["layer_end"])
        reply = dict(session_id=sid, layer_start=target[0], layer_end=target[1], length=length)
        source = self.ranges.get((m["source_start"], m["source_end"]))
        try:
            if source is None or target not in self.ranges:
                raise ValueError(f"layers {(m['source_start'], m['source_end'])} and {target} are not both held here")
            k, v = source.export_kv(sid, target[0], target[1], length)
            self.ranges[target].import_kv(sid, k, v)
        except Exception as exc:  # whatever failed, the coordinator replays these positions instead
            return [wire.make("kv_copied", **reply, ok=False, error=f"{type(exc).__name__}: {exc}"[:4000])]
        return [wire.make("kv_copied", **reply, ok=True)]

    def shrink_budget(self, memory_bytes: int) -> list[dict]:
        """Memory pressure: the budget shrinks; hand back ranges (largest first) until what is
        held fits, telling the coordinator which ones so it can move them."""
        self.memory_bytes = int(memory_bytes)
        out = []
        while self.ranges and self.held_bytes() > self.memory_bytes:
            key = max(self.ranges, key=lambda k: k[1] - k[0])
            del self.ranges[key]
            self.range_heads.pop(key, None)
            self.range_blobs.pop(key, None)
            self._prune_dense()
            out.append(wire.make("refuse", reason="memory_pressure",
                           detail={"layer_start": key[0], "layer_end": key[1], "budget": self.memory_bytes}))
        return out

    def held_bytes(self) -> int:
        """Bytes the held ranges take as this backend holds them (packed size x expansion)."""
        packed = sum(len(self.blobs.get(sha, b"")) for key in self.ranges for sha in self.range_blobs.get(key, ()))
        return int(packed * self.expansion)

    def on_unload(self, m):
        if "layer_start" in m:
            self.ranges.pop((m["layer_start"], m["layer_end"]), None)
        else:
            self.ranges.clear()
        self._prune_dense()

    def _prune_dense(self) -> None:
        """Drop dequantized layers no held range uses any more (their memory goes with them)."""
        used = {sha for key in self.ranges for sha in self.range_blobs.get(key, ())}
        for sha in [s for s in self._dense if s not in used]:
            del self._dense[sha]
