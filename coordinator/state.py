"""The coordinator as a pure state machine: fed decoded messages and the time, it returns actions.

Everything that decides anything lives here: joins and calibration, the plan, weight
streaming, the pipelined scheduler (batching across sessions), failure detection, fencing and
the explicit rebuild of a dead stage by replaying its stored inputs. The asyncio server
(server.py) only moves bytes and clocks in and out; tests drive this class directly.

Worker lifecycle (one table, see WORKER_TRANSITIONS):
    joining -> calibrating -> idle -> loading -> ready <-> (busy is per stage) -> dead
    any live state -> suspect (missed step deadline, heartbeats still arrive) -> ready | dead
    any state -> quarantined (broke the protocol) ; dead / quarantined are terminal: a worker
    that comes back is a new worker (its late results carry a stale epoch and are ignored).

A session's token path: submit -> embed (here) -> stage 0 ... stage N-1 (head: top-k) ->
sample (here) -> emit -> embed the new token -> stage 0 ...
"""
from __future__ import annotations

import itertools
import random
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from coordinator.planner import PlanError, StagePlan, WorkerCapacity, plan
from coordinator.security import Backoff
from kernels.reference import topk
from coordinator.speculation import Draft, decide_trip, make_speculator
from protocol.model_types import ModelConfig
from protocol.blobs import CHUNK_BYTES, blob_info, chunk, sha256
from model.sampling import CANDIDATES, Sampler, SamplingParams
from protocol.format import PROTOCOL_VERSION, ProtocolError

LOCAL = "local"  # connection id of the coordinator's own compute worker

WORKER_TRANSITIONS = {
    "joining": {"calibrating", "dead", "quarantined"},
    "calibrating": {"idle", "dead", "quarantined"},
    "idle": {"loading", "dead", "quarantined"},
    "loading": {"ready", "idle", "loading", "dead", "quarantined"},
    "ready": {"loading", "suspect", "idle", "dead", "quarantined"},
    "suspect": {"ready", "dead", "quarantined"},
    "dead": set(),
    "quarantined": set(),
}


# ---------------------------------------------------------------------- actions
@dataclass(frozen=True)
class Send:
    conn: str
    msg: dict


@dataclass(frozen=True)
class Close:
    conn: str
    code: int
    reason: str


@dataclass(frozen=True)
class Emit:
    """An event for a client: type token / done / error."""

    request_id: str
    event: dict


def _msg(type_: str, **fields) -> dict:
    return {"v": PROTOCOL_VERSION, "type": type_, **fields}


def _check_session(session_id: str, layers: tuple) -> str:
    """The verifier's scratch session for spot checks of one session over one layer range."""
    return f"check-{session_id}-{layers[0]}-{layers[1]}"


# ---------------------------------------------------------------------- settings
@dataclass(frozen=True)
class CoordinatorSettings:
    heartbeat_ms: int = 250
    dead_after_ms: int = 800  # silence before a worker is declared dead (<= 1 s detection)
    step_deadline_factor: float = 8.0  # x the worker's measured time for that step
    step_deadline_min_ms: int = 1500
    suspect_evict_factor: float = 4.0  # a step this many deadlines late: evict the worker
    replicas: int = 1
    max_stages: int | None = None
    max_batch: int = 16
    pipeline_groups: int = 1
    target_step_ms: float = 200.0  # a stage's batch shrinks when its steps take longer than this
    prefill_chunk: int = 256
    coordinator_compute: bool = True
    replan_delay_ms: int = 300  # let a burst of joins settle before re-planning
    max_ctx: int = 2048
    request_timeout_s: float = 30.0  # a request with no way to be served fails after this
    calibration_tokens: int = 8
    max_sessions: int = 64
    prefix_cache_entries: int = 16  # prompts whose KV stays on the stages for reuse (0: off)
    prefix_min_tokens: int = 16  # shorter shared prefixes are not worth a fork
    compute_dtype: str = "f32"  # asked of every tab; a tab that cannot honour it reports a correction
    workgroup_size: int | None = None  # invocations per workgroup asked of WebGPU tabs (None: their best)
    # untrusted results: this fraction of steps is recomputed by a trusted worker (the
    # coordinator's own, else another holder of the stage) and compared; a mismatch beyond
    # the tolerance (max abs difference / max abs of the recomputed rows) quarantines the tab
    spot_check_fraction: float = 0.02
    spot_check_rtol: float = 2e-3  # honest f32 numpy vs numpy: ~1e-6; raise it for f16 tabs
    spot_check_seed: int = 0
    spot_check_timeout_s: float = 60.0  # a check unanswered this long is dropped (and stops holding "done" back)
    # also check every stage's part in a session's last token before its "done": sampled checks
    # alone can miss a liar whose few wrong steps end a session (see _audit_finish)
    spot_check_at_finish: bool = False
    # limits (each a clear refusal, never unbounded memory): prompt and output tokens per request,
    # messages per second per worker / client socket (a burst of twice that is allowed)
    max_prompt_tokens: int = 4096
    max_output_tokens: int = 2048
    max_request_bytes: int = 1 << 20  # an HTTP request body larger than this is refused (413) unread
    worker_max_msgs_per_s: int = 2000
    client_max_msgs_per_s: int = 50
    # a tab that heartbeats but never finishes loading its range (a stalled download, a tab that
    # lies about loading) loses it after this long plus the time its bytes take at the minimum rate
    load_timeout_min_s: float = 60.0
    load_min_bytes_per_s: float = 1e6
    dead_workers_kept: int = 64  # records of dead/quarantined workers kept for /status and the dashboard
    resume_wait_ms: int = 5000  # after a restart, wait this long for rejoining workers whose weights tile the model
    allowed_origins: str = ""  # comma-separated browser origins allowed to join besides same origin and loopback
    # trust is earned: a new tab's claims are bounds; it serves only checked steps (or none, on
    # trial, while trusted workers hold the model) until this many of its steps came back right
    # and in time; a trial step unanswered after trial_deadline_ms fails it
    probation_steps: int = 8
    trial_deadline_ms: int = 3000
    # joins from an address are refused for backoff_base_s after its tab's first offense,
    # doubling per offense up to backoff_max_s; forgiven after backoff_forgive_s of good conduct
    backoff_base_s: float = 1.0
    backoff_max_s: float = 600.0
    backoff_forgive_s: float = 600.0
    # a prompt is cut into steps a stage is expected to finish within this (from its measured
    # costs), so that a step deadline stays short enough to judge a tab that never answers
    max_step_ms: float = 2000.0
    # costs bounded before they are paid (enforced by the adapters: server.py, app.py)
    max_conns_per_address: int = 256
    joins_per_address_per_s: float = 20.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    public_status: bool = False  # off loopback, /status, the dashboard and /openapi.json need the API key unless set
    cors_origins: str = ""  # comma-separated web app origins whose browsers may call the API ("*": any)
    # speculative decoding (coordinator/speculation.py): "off" | "prompt-lookup" | "draft-model",
    # at most speculation_max_k drafts per trip; draft_model: the GGUF the draft-model mode runs
    speculation: str = "off"
    speculation_max_k: int = 6
    draft_model: str = ""


# ---------------------------------------------------------------------- records
@dataclass
class Worker:
    conn: str
    worker_id: str
    name: str
    caps: dict
    epoch: int
    joined_at: float
    last_seen: float
    state: str = "joining"
    ms_per_layer: float = 1.0
    stages: set = field(default_factory=set)  # stage indexes held (primary or standby)
    have_blobs: set = field(default_factory=set)  # sha256 of blobs the worker holds
    loading: dict = field(default_factory=dict)  # assignment_id -> (stage index, blob shas)
    load_deadline: float | None = None  # while loading: when the range goes elsewhere
    ended_at: float | None = None  # when it was declared dead or quarantined
    bytes_sent: int = 0
    steps: int = 0
    last_step_ms: float | None = None
    # a step's time seen here minus the compute time the worker reports: the hop (codec,
    # sockets, event loops, queueing) both ways, smoothed; what pipelining over tabs costs
    transport_ms: float | None = None
    compute_ms: float | None = None  # smoothed compute time it reports for decode steps
    local: bool = False
    load_progress: dict = field(default_factory=dict)  # the worker's last load_progress report
    corrections: list = field(default_factory=list)
    address: str = ""  # the peer's network address: offenses are counted against it
    probation: bool = True  # until `probation_steps` of its steps proved right and in time
    proven_steps: int = 0
    claimed_ms_per_layer: float | None = None  # what its calibration claimed (a bound, not a fact)
    # a step's cost relative to `rows x ms_per_layer` (1: a prompt row costs a decode step),
    # learned from its measured multi-row steps; deadlines and prompt chunks use it
    row_cost: float = 1.0
    why: str | None = None  # why it ended (dead / quarantined), for /status
    checked_left: int = 0  # after probation: this many more of its steps are all spot-checked

    def move(self, new: str) -> None:
        if new != self.state and new not in WORKER_TRANSITIONS[self.state]:
            raise AssertionError(f"worker {self.worker_id}: illegal transition {self.state} -> {new}")
        self.state = new

    @property
    def alive(self) -> bool:
        return self.state not in ("dead", "quarantined")

    def capacity(self) -> WorkerCapacity:
        return WorkerCapacity(self.worker_id, self.ms_per_layer, int(self.caps.get("memory_bytes", 1 << 30)),
                              float(self.caps.get("expansion", 1.0)), self.local)


@dataclass
class WorkItem:
    """Rows of one session for one stage. Rows at positions >= forward_from go on to the next
    stage (a rebuild replays history whose outputs are not needed again)."""

    session_id: str
    start_pos: int
    rows: np.ndarray  # f32 [length, hidden]
    forward_from: int
    wants_token: bool  # at the last stage: sample a token from the last row
    generation: int = 0  # the session's generation when queued: a restarted session ignores older items
    draft: Draft | None = None  # speculation: the last len(draft.tokens) rows are drafts the head verifies

    @property
    def head_rows(self) -> int:
        """Rows whose top-k the head returns: the last one, and one per draft."""
        return 1 + (len(self.draft.tokens) if self.draft else 0)

    @property
    def end(self) -> int:
        return self.start_pos + len(self.rows)


@dataclass
class Stage:
    index: int
    layer_start: int
    layer_end: int
    include_head: bool
    holders: list[str]  # worker ids: primary first, then warm standbys
    ready: set = field(default_factory=set)  # holders that have loaded the range
    queue: deque = field(default_factory=deque)
    inflight: dict | None = None  # {"step_id", "worker", "items", "sent_at", "deadline"}
    needs_rebuild: bool = False
    batch_limit: int = 16  # adapted to measured step latency (see _adapt_batch)

    @property
    def primary(self) -> str | None:
        return self.holders[0] if self.holders else None

    def to_dict(self) -> dict:
        return {"index": self.index, "layers": [self.layer_start, self.layer_end], "head": self.include_head,
                "holders": list(self.holders), "ready": sorted(self.ready), "queued": len(self.queue),
                "busy": self.inflight is not None, "batch_limit": self.batch_limit}


@dataclass
class PrefixEntry:
    """A finished prompt whose KV every stage primary still holds under `cache_id`, with the
    inputs each stage received for it (so sessions forked from it can be rebuilt too)."""

    cache_id: str
    tokens: list[int]
    logs: dict  # stage index -> f32 rows [len(tokens), hidden]
    last_used: float
    workers: frozenset = frozenset()  # who computed it: a session forked from it trusts them from token 0


@dataclass
class Session:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    created: float
    tokens: list[int] = field(default_factory=list)
    logs: dict = field(default_factory=dict)  # stage index -> list[(start_pos, rows)] sent there
    finished: bool = False
    first_token_at: float | None = None
    last_token_at: float | None = None
    stop_at_eos: bool = True
    generation: int = 0  # bumped when the session's KV is recomputed from its tokens
    # worker id -> how many tokens had been streamed when that worker first computed for this
    # session: the first token a worker found lying could have changed (see _on_liar)
    touched: dict = field(default_factory=dict)
    # tokens streamed before a liar was caught, being recomputed: each new token that equals
    # the next of these is already with the client; the first that differs rewinds the stream
    unconfirmed: list = field(default_factory=list)
    # the last token is out, but a spot check of a worker that computed for this session is
    # still pending: "done" waits for it, so a liar it catches can still rewind the stream
    finish_pending: str | None = None
    log_epoch: int = 0  # bumped whenever `logs` restart from position 0
    last_by: dict = field(default_factory=dict)  # stage index -> (worker id, epoch) of its latest step for this session
    last_head: tuple | None = None  # the head's (top-k ids, logits) behind the latest token
    audited: bool = False  # the last token's steps were sent for checking (spot_check_at_finish)
    # the API's hooks (coordinator/openai_api.py): a chooser that needs the whole vocabulary's
    # logits (logprobs, a grammar; see sampling.FullVocabChooser), and whether sibling
    # sessions (n > 1) will fork this one's prompt KV as soon as it is computed
    chooser: object | None = None
    share_prefix: bool = False

    @property
    def position(self) -> int:
        """Tokens whose KV the pipeline holds or is computing."""
        return len(self.prompt_ids) + max(0, len(self.tokens) - 1)


# ---------------------------------------------------------------------- coordinator
class Coordinator:
    def __init__(self, config: ModelConfig, blobs: dict[str, bytes], embed_fn, settings: CoordinatorSettings = CoordinatorSettings(),
                 join_token: str | None = None, draft=None):
        """blobs: "layer:i" / "head" -> packed weight blob; embed_fn(ids) -> f32 rows; draft: the
        DraftModel of settings.speculation "draft-model" (coordinator/speculation.py)."""
        self.config = config
        self.settings = settings
        self.join_token = join_token
        self.embed = embed_fn
        self.blob_bytes = blobs
        self.blob_info = {k: blob_info(k, v) for k, v in blobs.items()}
        self.layer_bytes = max(self.blob_info[f"layer:{i}"].size for i in range(config.n_layers))
        self.head_bytes = self.blob_info["head"].size
        self.workers: dict[str, Worker] = {}  # worker_id -> record
        self.conn_worker: dict[str, str] = {}  # connection -> worker_id
        self.stages: list[Stage] = []
        self.sessions: dict[str, Session] = {}
        self.plan_version = 0
        self._ids = itertools.count(1)
        self._epoch = itertools.count(1)
        self._replan_at: float | None = None
        self.events: deque = deque(maxlen=500)  # failure/detection/recovery timeline
        self.counters = {"steps": 0, "tokens": 0, "weight_bytes_sent": 0, "protocol_errors": 0, "rejected_joins": 0,
                         "requests": 0, "completed": 0, "failed": 0, "cancelled": 0, "late_results_ignored": 0,
                         "prefix_hits": 0, "prefix_tokens_reused": 0,
                         "spot_checks": 0, "spot_checks_skipped": 0, "spot_check_mismatches": 0,
                         "tokens_confirmed": 0, "tokens_retracted": 0, "load_timeouts": 0,
                         "backoff_refusals": 0, "trial_steps": 0, "probations_passed": 0, "slow_evictions": 0}
        self._holding_finishes = False  # set while a liar is being fenced (see _on_liar)
        self._awaiting_recovery: list[tuple[int, float]] = []  # (stage, detected at) until the next token
        self._inflight_lost: dict[tuple[int, str], tuple] = {}  # (stage, session) -> (forward_from, wants_token, draft)
        self._deferred_replan = False
        self._last_tick: float | None = None
        self.degraded = False
        self.prefix_cache: dict[str, PrefixEntry] = {}
        self._first_join_at: float | None = None
        self._spot_rng = random.Random(settings.spot_check_seed)
        self._checks: dict[int, dict] = {}  # verification step id -> what the checked worker answered
        self._verify_ranges: dict[tuple, str] = {}  # (layer_start, layer_end) on LOCAL -> loading | ready
        self._verify_assign: dict[int, tuple] = {}  # assignment id -> range, for LOCAL's verify ranges
        self._verify_parked: dict[tuple, list] = {}  # range -> check messages waiting for LOCAL to load it
        # (session, range, verifier) -> (positions the verifier's scratch KV holds, the session's
        # log epoch then): a later check of that session sends only the rows since
        self._verify_kv: dict[tuple, tuple[int, int]] = {}
        self.backoff = Backoff(settings.backoff_base_s, settings.backoff_max_s, settings.backoff_forgive_s)
        self.conn_address: dict[str, str] = {}  # worker connection -> peer address
        # workers on trial: worker id -> {"range", "assignment_id", "ready", "check": step id or None}
        self._trials: dict[str, dict] = {}
        self._trial_assign: dict[int, str] = {}  # assignment id -> worker id, for trial ranges
        self._synthetic: dict[int, dict] = {}  # step id -> a synthetic trial step in flight
        # rows [n, hidden] of the last stage's output -> the whole vocabulary's logits [n, vocab],
        # computed here for sessions whose chooser needs them (the adapter sets it; None: none can)
        self.head_logits = None
        self.speculation = make_speculator(settings.speculation, settings.speculation_max_k, draft)
        self._trip_more: set[str] = set()  # sessions whose trip still has rows to decide (see _verify_drafts)

    # ================================================================== connections
    def on_disconnect(self, conn: str, now: float, reason: str = "closed") -> list:
        self.conn_address.pop(conn, None)
        wid = self.conn_worker.pop(conn, None)
        if wid is None:
            return []
        w = self.workers[wid]
        if not w.alive:
            return []
        return self._worker_lost(w, now, f"socket {reason}")

    def on_connect(self, conn: str, address: str, now: float) -> list:
        """A worker socket opened from `address`: refused while that address is backed off."""
        wait = self.backoff.wait(address, now)
        if wait > 0:
            self.counters["backoff_refusals"] += 1
            reason = f"joins from this address are refused for {wait:.0f} more s ({self.backoff.records[address]['reason']})"
            return [Send(conn, _msg("error", code="backoff", field=None, message=reason)), Close(conn, 1008, reason[:120])]
        self.conn_address[conn] = address
        return []

    def on_protocol_error(self, conn: str, err: ProtocolError, now: float) -> list:
        """A frame that does not decode or validate: answer naming the field, quarantine the sender
        and count it against its address (a sender that has not joined yet too)."""
        self.counters["protocol_errors"] += 1
        out = [Send(conn, err.to_message())]
        wid = self.conn_worker.pop(conn, None)
        out.append(Close(conn, 1008, f"protocol error: {err.code}"))
        if wid is not None and self.workers[wid].alive:
            out += self._worker_lost(self.workers[wid], now, f"quarantined: {err.code} at {err.field}", quarantine=True)
        elif self.conn_address.get(conn):
            self.backoff.offend(self.conn_address[conn], f"protocol error {err.code} at {err.field}", now)
        self.conn_address.pop(conn, None)
        return out

    def on_message(self, conn: str, m: dict, now: float) -> list:
        wid = self.conn_worker.get(conn)
        if m["type"] == "hello":
            return self._on_hello(conn, m, now)
        if wid is None:
            return [Send(conn, _msg("error", code="not_joined", field="type", message="send hello first")), Close(conn, 1008, "not joined")]
        w = self.workers[wid]
        if not w.alive:
            return []
        w.last_seen = now
        handler = getattr(self, f"_on_{m['type']}", None)
        if handler is None:
            err = ProtocolError("unknown_type", f"a coordinator does not accept {m['type']!r} from a worker", "type")
            return self.on_protocol_error(conn, err, now)
        return handler(w, m, now) or []

    # ================================================================== join
    def _on_hello(self, conn: str, m: dict, now: float) -> list:
        if self.join_token and m.get("token") != self.join_token and conn != LOCAL:
            self.counters["rejected_joins"] += 1
            return [Send(conn, _msg("error", code="bad_token", field="token", message="wrong or missing join token")),
                    Close(conn, 1008, "bad join token")]
        if conn in self.conn_worker:
            return [Send(conn, _msg("error", code="already_joined", field="type", message="hello sent twice"))]
        address = self.conn_address.get(conn, "")
        if conn != LOCAL and self.backoff.wait(address, now) > 0:  # an offense on another socket since this one opened
            return self.on_connect(conn, address, now)
        wid = LOCAL if conn == LOCAL else f"w{next(self._ids)}"
        # the schema bounded every field (names, sizes, numbers finite and in range): stored as is
        w = Worker(conn, wid, m["worker_name"], dict(m["capabilities"]), next(self._epoch), now, now, local=conn == LOCAL,
                   address=address, probation=conn != LOCAL and self.settings.probation_steps > 0)
        w.have_blobs = set((m.get("resume") or {}).get("have") or [])
        self.workers[wid] = w
        self.conn_worker[conn] = wid
        if self._first_join_at is None and conn != LOCAL:
            self._first_join_at = now
        w.move("calibrating")
        self.events.append({"t": now, "kind": "join", "worker": wid, "name": w.name})
        return [
            Send(conn, _msg("welcome", worker_id=wid, heartbeat_ms=self.settings.heartbeat_ms, epoch=w.epoch)),
            Send(conn, _msg("calibrate", model=self.config.to_dict(), tokens=self.settings.calibration_tokens, layers=1)),
        ]

    def _on_calibration_result(self, w: Worker, m: dict, now: float) -> list:
        w.ms_per_layer = max(float(m["step_ms"]), 1e-3)
        w.claimed_ms_per_layer = w.ms_per_layer
        details = m.get("details") or {}
        w.caps["calibration"] = details  # e.g. a browser tab's measured engines and its choice
        if isinstance(details.get("backend"), str):
            w.caps["backend"] = details["backend"]
        if isinstance(details.get("expansion"), (int, float)):
            w.caps["expansion"] = float(details["expansion"])
        if w.state == "calibrating":
            w.move("idle")
        self._schedule_replan(now)
        return []

    def _on_heartbeat(self, w: Worker, m: dict, now: float) -> list:
        return []

    def _on_bye(self, w: Worker, m: dict, now: float) -> list:
        self.conn_worker.pop(w.conn, None)
        return self._worker_lost(w, now, f"left: {m['reason']}") + [Close(w.conn, 1000, "bye")]

    def _on_error(self, w: Worker, m: dict, now: float) -> list:
        self.events.append({"t": now, "kind": "worker_error", "worker": w.worker_id, "code": m["code"], "message": m["message"]})
        check = self._checks.pop(m.get("step_id"), None)
        if check is not None:  # the verifier could not run the check (e.g. its range was unloaded)
            self.counters["spot_checks_skipped"] += 1
            self._verify_kv.pop(check["kv_key"], None)  # the next check of it starts from position 0
            if m.get("code") == "not_assigned":
                self._verify_ranges.pop(check["range"], None)
            return self._release_finishes(now)
        # an error about a step means that step will never be answered: treat the stage as failed
        for st in self.stages:
            if st.inflight and st.inflight["worker"] == w.worker_id and m.get("step_id") == st.inflight["step_id"]:
                return self._worker_lost(w, now, f"step failed: {m['message']}")
        return []

    def _on_refuse(self, w: Worker, m: dict, now: float) -> list:
        self.events.append({"t": now, "kind": "refused", "worker": w.worker_id, "reason": m["reason"], "detail": m.get("detail")})
        detail = m.get("detail") or {}
        aid = detail.get("assignment_id")
        if aid in w.loading:
            stage_index, _ = w.loading.pop(aid)
            if stage_index < len(self.stages):
                st = self.stages[stage_index]
                if w.worker_id in st.holders:
                    st.holders.remove(w.worker_id)
                w.stages.discard(stage_index)
                # the planner now knows this worker's real limit
                w.caps["memory_bytes"] = int((m.get("detail") or {}).get("budget", 0))
                if w.state == "loading" and not w.loading:
                    w.move("idle" if not w.stages else "ready")
                return self._repair_stage(st, now)
        span = (detail.get("layer_start"), detail.get("layer_end"))
        if m["reason"] == "memory_pressure" and "budget" in detail:
            w.caps["memory_bytes"] = int(detail["budget"])
        st = next((s for s in self.stages if (s.layer_start, s.layer_end) == span and w.worker_id in s.holders), None)
        if st is None:
            return []
        # a ready worker handed a range back (memory pressure): move it like a failed stage,
        # replaying its inputs into the new holder
        was_primary = st.primary == w.worker_id
        st.holders.remove(w.worker_id)
        st.ready.discard(w.worker_id)
        w.stages.discard(st.index)
        if not was_primary:
            return []
        self._awaiting_recovery.append((st.index, now))
        return self._forget_prefixes() + self._repair_stage(st, now)

    # ================================================================== planning and loading
    def _schedule_replan(self, now: float) -> None:
        self._replan_at = now + self.settings.replan_delay_ms / 1000

    def _live_workers(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.alive and w.state not in ("joining", "calibrating")]

    def _head_cost_layers(self) -> float:
        """The head's decode cost in layers: decode streams every weight once per token, so
        cost goes with parameter count (vocab x hidden against a layer's matrices)."""
        c = self.config
        q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        layer = c.hidden * (q + 2 * kv) + q * c.hidden + 3 * c.hidden * c.ffn
        return c.vocab * c.hidden / layer

    def _replan(self, now: float) -> list:
        workers = self._live_workers()
        remote = [w for w in workers if not w.local]
        # tabs on probation are planned only when no trusted tab is there (then every step of
        # theirs is checked); otherwise they prove themselves on trial (see _start_trials)
        remote = [w for w in remote if not w.probation] or remote
        if not self.settings.coordinator_compute or remote:
            workers = remote if remote else workers
        if not workers:
            return []
        try:
            stages = self._resume_plan(workers) or plan([self._capacity(w) for w in workers], self.config.n_layers, self.layer_bytes,
                                                        self.head_bytes, self.settings.replicas, self.settings.max_stages,
                                                        self._head_cost_layers())
        except PlanError as exc:
            self.degraded = True
            self.events.append({"t": now, "kind": "plan_failed", "reason": str(exc)})
            return []
        self._prefer_held_blobs(stages)
        out = self._forget_prefixes()
        old = {(s.layer_start, s.layer_end): s for s in self.stages}
        self.plan_version += 1
        self.stages = []
        for w in self.workers.values():
            w.stages = set()
        for i, sp in enumerate(stages):
            prev = old.get((sp.layer_start, sp.layer_end))
            st = Stage(i, sp.layer_start, sp.layer_end, sp.include_head, list(sp.workers), batch_limit=self.settings.max_batch)
            if prev is not None:
                st.ready = {h for h in prev.ready if h in st.holders}
            self.stages.append(st)
            for wid in st.holders:
                self.workers[wid].stages.add(i)
                if wid not in st.ready:
                    out += self._assign(self.workers[wid], st, now)
        # the verifier loads every stage's range now, while it may still hold an older range
        # over the same layers (their dequantized matrices are reused), not at the first check
        if self.settings.spot_check_fraction > 0:
            for st in self.stages:
                if LOCAL not in st.holders:
                    out += self._load_verify_range(st)
        # ranges a worker held but no longer does are unloaded to free its memory
        for key, prev in old.items():
            for wid in prev.ready:
                w = self.workers.get(wid)
                if w and w.alive and not any((s.layer_start, s.layer_end) == key and wid in s.holders for s in self.stages):
                    out.append(Send(w.conn, _msg("unload", reason="re-plan", layer_start=key[0], layer_end=key[1])))
                    if wid == LOCAL:
                        self._verify_ranges.pop(key, None)
                        self._forget_verify_kv(lambda k, key=key: k[1] == key and k[2] == LOCAL)  # unloaded with the range
        self.degraded = any(h == LOCAL for s in self.stages for h in s.holders[:1])
        self.events.append({"t": now, "kind": "plan", "version": self.plan_version, "stages": [s.to_dict() for s in self.stages]})
        self._inflight_lost.clear()  # it described stages of the old plan
        for sess in self.sessions.values():
            self._restart_session(sess)
        return out

    def _in_resume_window(self, now: float) -> bool:
        return self._first_join_at is not None and now - self._first_join_at <= self.settings.resume_wait_ms / 1000

    def _awaiting_resume(self, now: float) -> bool:
        """The first plans of a (restarted) coordinator wait a little while workers arrive holding
        weights that do not tile the model yet: the rest of the old pool is reconnecting."""
        if not self._in_resume_window(now):
            return False
        workers = [w for w in self._live_workers() if not w.local]
        return bool(workers) and all(w.have_blobs for w in workers) and self._resume_plan(workers) is None

    def _ms_per_layer(self, w: Worker) -> float:
        """What the planner and deadlines count on: a tab on probation is taken to be no faster
        than the slowest trusted tab (a tarpit claims 0.001 ms to be given every layer)."""
        if not w.probation:
            return w.ms_per_layer
        trusted = [x.ms_per_layer for x in self.workers.values() if x.alive and not x.probation and not x.local]
        return max([w.ms_per_layer, *trusted])

    def _capacity(self, w: Worker) -> WorkerCapacity:
        cap = w.capacity()
        return WorkerCapacity(cap.worker_id, self._ms_per_layer(w), cap.memory_bytes, cap.expansion, cap.local)

    def _ctx_scale(self) -> float:
        """Context positions at which a row's attention costs as much as its matrices: a layer's
        parameters per row against 2 x (query width) multiply-adds per position."""
        c = self.config
        q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        return (c.hidden * (q + 2 * kv) + q * c.hidden + 3 * c.hidden * c.ffn) / (2 * q)

    def _rows_equiv(self, w: Worker, spans) -> float:
        """A step's work in decode steps: prompt rows at the worker's learned row cost, decode
        rows batched (8 cost about one), each row weighted by the context it attends to."""
        scale, total = self._ctx_scale(), 0.0
        for start, length in spans:
            weight = length * w.row_cost if length > 1 else 0.125
            total += weight * (1 + (start + length / 2) / scale)
        return max(1.0, total)

    def _step_cost_ms(self, w: Worker, st: Stage, spans) -> float:
        layers = st.layer_end - st.layer_start
        return self._ms_per_layer(w) * layers * self._rows_equiv(w, spans) + (20 if st.include_head else 0)

    def _prefill_rows(self, context: int) -> int:
        """Prompt rows per step: as many as every stage's primary is expected to compute within
        max_step_ms at this context (at most prefill_chunk, at least 16)."""
        rows = self.settings.prefill_chunk
        for st in self.stages:
            w = self.workers.get(st.primary) if st.primary else None
            if w is None:
                continue
            per_row = self._ms_per_layer(w) * (st.layer_end - st.layer_start) * w.row_cost * (1 + context / self._ctx_scale())
            rows = min(rows, int(self.settings.max_step_ms / max(per_row, 1e-6)))
        return max(16, rows)

    def _resume_plan(self, workers: list[Worker]) -> list[StagePlan] | None:
        """While the resume window lasts: when the live workers' held weights tile the model (each
        holds a contiguous range, the last one the head: a restarted coordinator's rejoining
        pool), give each a part of what it holds, so nothing is downloaded again."""
        workers = [w for w in workers if not w.local]
        if self.settings.replicas != 1 or not workers or self._last_tick is None or not self._in_resume_window(self._last_tick):
            return None
        by_sha = {i.sha256: k for k, i in self.blob_info.items()}
        ranges = []
        for w in workers:
            keys = {by_sha[h] for h in w.have_blobs if h in by_sha}
            layers = sorted(int(k.split(":")[1]) for k in keys if k.startswith("layer:"))
            if not layers or layers != list(range(layers[0], layers[-1] + 1)):
                return None
            ranges.append((layers[0], layers[-1] + 1, "head" in keys, w.worker_id))
        ranges.sort()
        if ranges[0][0] != 0 or ranges[-1][1] != self.config.n_layers or not ranges[-1][2]:
            return None
        starts = [0]
        for prev, cur in zip(ranges, ranges[1:]):
            b = cur[0] if cur[0] > starts[-1] else prev[1]  # the previous worker keeps all it holds
            if not (starts[-1] < b <= prev[1] and b < cur[1]):
                return None
            starts.append(b)
        if self.settings.max_stages and len(ranges) > self.settings.max_stages:
            return None
        ends = starts[1:] + [self.config.n_layers]
        return [StagePlan(a, b, r is ranges[-1], [r[3]]) for a, b, r in zip(starts, ends, ranges)]

    def _prefer_held_blobs(self, stages: list[StagePlan]) -> None:
        """Swap primaries between stages when both fit and more of the weights are already held
        (workers that rejoin a restarted coordinator keep their ranges: nothing re-downloads)."""
        def held(wid, sp):
            w = self.workers[wid]
            keys = [f"layer:{i}" for i in range(sp.layer_start, sp.layer_end)] + (["head"] if sp.include_head else [])
            return sum(self.blob_info[k].size for k in keys if self.blob_info[k].sha256 in w.have_blobs)

        def fits(wid, sp):
            cap = self.workers[wid].capacity()
            need = sp.layers * self.layer_bytes + (self.head_bytes if sp.include_head else 0)
            return cap.memory_bytes / cap.expansion >= need

        for a in stages:
            for b in stages:
                if a is b or not a.workers or not b.workers:
                    continue
                wa, wb = a.workers[0], b.workers[0]
                if wb in a.workers or wa in b.workers:
                    continue
                if held(wb, a) + held(wa, b) > held(wa, a) + held(wb, b) and fits(wb, a) and fits(wa, b):
                    a.workers[0], b.workers[0] = wb, wa

    def _stage_blobs(self, st: Stage) -> list[str]:
        keys = [f"layer:{i}" for i in range(st.layer_start, st.layer_end)]
        return keys + (["head"] if st.include_head else [])

    def _assign(self, w: Worker, st: Stage, now: float) -> list:
        aid = next(self._ids)
        keys = self._stage_blobs(st)
        infos = [self.blob_info[k] for k in keys]
        w.loading[aid] = (st.index, [i.sha256 for i in infos])
        w.load_progress = {}  # this assignment's reports start afresh (the last one stays after ready)
        if w.state in ("idle", "ready"):
            w.move("loading")
        to_send = sum(i.size for i in infos if i.sha256 not in w.have_blobs)
        allowed = self.settings.load_timeout_min_s + to_send / self.settings.load_min_bytes_per_s
        w.load_deadline = max(w.load_deadline or now, now + allowed)
        out = [Send(w.conn, _msg("assign", assignment_id=aid, layer_start=st.layer_start, layer_end=st.layer_end,
                                 include_head=st.include_head, model=self.config.to_dict(), max_ctx=self.settings.max_ctx,
                                 precision=self._precision(),
                                 chunks=[i.to_dict() for i in infos]))]
        chunks = self._weight_chunks(w, infos)
        sent = sum(len(c.msg["data"]) for c in chunks)
        w.bytes_sent += sent
        self.counters["weight_bytes_sent"] += sent
        return out + chunks

    def _weight_chunks(self, w: Worker, infos: list) -> list:
        """The weights_chunk messages of the blobs `w` does not hold yet, in layer order (the
        earliest layers first)."""
        out = []
        for info in infos:
            if info.sha256 in w.have_blobs:
                continue
            data = self.blob_bytes[info.key]
            for c in range(info.chunks):
                piece = chunk(data, c)
                out.append(Send(w.conn, _msg("weights_chunk", chunk_id=c, name=info.key, blob=info.sha256, offset=c * CHUNK_BYTES,
                                             total=info.size, data=piece, sha256=sha256(piece))))
        return out

    def _precision(self) -> dict:
        p = {"compute": self.settings.compute_dtype}
        if self.settings.workgroup_size:
            p["workgroup_size"] = self.settings.workgroup_size
        return p

    def _on_weights_ack(self, w: Worker, m: dict, now: float) -> list:
        if not m["ok"]:
            return self._worker_lost(w, now, f"weights rejected: {m.get('error')}", quarantine=True)
        return []

    def _on_load_progress(self, w: Worker, m: dict, now: float) -> list:
        w.load_progress = {"layer": m["layer"], "received_bytes": m["received_bytes"], "total_bytes": m["total_bytes"]}
        return []

    def _on_ready(self, w: Worker, m: dict, now: float) -> list:
        key = self._verify_assign.pop(m.get("assignment_id"), None)
        if key is not None:  # LOCAL loaded a range only to verify others' steps
            self._verify_ranges[key] = "ready"
            return [Send(w.conn, c) for c in self._verify_parked.pop(key, [])]
        if self._trial_assign.get(m.get("assignment_id")) == w.worker_id:
            return self._on_trial_ready(w, m, now)
        entry = w.loading.pop(m.get("assignment_id"), None)
        if entry is None:
            return []
        stage_index, shas = entry
        if m["checksum"] != sha256("".join(shas).encode()):
            # the digest of the assignment's blob digests, as the tab computed it when it
            # assembled them: a tab that never had them answers anything ("x"). Only a weak
            # proof alone (the digests are public); its first steps are recomputed (probation)
            return self._worker_lost(w, now, "ready with a checksum that does not match its assignment", quarantine=True)
        w.have_blobs.update(shas)
        for c in m.get("corrections") or []:
            if c not in w.corrections:
                w.corrections.append(c)
                self.events.append({"t": now, "kind": "correction", "worker": w.worker_id, **c})
        if not w.loading:
            w.move("ready")
            w.load_deadline = None
        st = self.stages[stage_index] if stage_index < len(self.stages) else None
        layers = tuple(m.get("layers") or ())
        if st is None or w.worker_id not in st.holders or (layers and layers != (st.layer_start, st.layer_end)):
            # loaded for a plan replaced meanwhile (joins re-plan while others still load): the
            # index may now name other layers. Free the range, or tabs pile up orphan ranges
            # (seen with 32 tabs joining: 1 GB held each, for a 100 MB model)
            if layers and not any((s.layer_start, s.layer_end) == layers and w.worker_id in s.holders for s in self.stages):
                return [Send(w.conn, _msg("unload", reason="re-plan", layer_start=layers[0], layer_end=layers[1]))]
            return []
        st.ready.add(w.worker_id)
        if st.needs_rebuild and st.primary == w.worker_id:
            return self._rebuild(st, now)
        return self._pump(now)

    # ================================================================== requests
    def submit(self, request_id: str, prompt_ids: list[int], max_tokens: int, params: SamplingParams, now: float,
               stop_at_eos: bool = True, chooser=None, share_prefix: bool = False) -> list:
        self.counters["requests"] += 1
        if request_id in self.sessions:
            return [Emit(request_id, {"type": "error", "code": "duplicate_request", "message": f"request {request_id} exists", "retriable": False})]
        if len(self.sessions) >= self.settings.max_sessions:
            self.counters["failed"] += 1
            return [Emit(request_id, {"type": "error", "code": "overloaded", "message": f"{len(self.sessions)} sessions are running; retry later", "retriable": True})]
        limit = min(self.settings.max_ctx, self.config.context, self.settings.max_prompt_tokens + 1)
        if not prompt_ids or len(prompt_ids) >= limit:
            self.counters["failed"] += 1
            return [Emit(request_id, {"type": "error", "code": "bad_prompt", "message": f"the prompt has {len(prompt_ids)} tokens; it must have 1 to {limit - 1}", "retriable": False})]
        max_tokens = min(max_tokens, self.settings.max_output_tokens, min(self.settings.max_ctx, self.config.context) - len(prompt_ids))
        s = Session(request_id, list(prompt_ids), max_tokens, params, now, stop_at_eos=stop_at_eos, chooser=chooser,
                    share_prefix=share_prefix)
        self.sessions[request_id] = s
        if not self.stages:
            # no plan yet: the session starts when one exists (see _restart_session)
            self._replan_at = min(self._replan_at or now, now)
            return []
        out = self._reuse_prefix(s, now)
        first = s.logs[0][0][1].shape[0] if s.logs else 0
        self._enqueue_prefill(s, s.prompt_ids, first)
        return out + self._pump(now)

    def _enqueue_prefill(self, s: Session, ids: list[int], first: int) -> None:
        """Positions [first, len(ids)) into stage 0 in chunks; the last row yields the next token."""
        rows = self.embed(ids[first:])
        step = self._prefill_rows(len(ids))
        for start in range(0, len(rows), step):
            part = rows[start:start + step]
            last = start + len(part) == len(rows)
            self._enqueue(0, WorkItem(s.request_id, first + start, part, first + start, last, s.generation), s)

    def _restart_session(self, s: Session) -> None:
        """A new plan holds none of this session's KV: run its whole history (prompt and the
        tokens already streamed) through the new stages; the next token follows exactly."""
        s.logs = {}
        s.log_epoch += 1  # the verifiers' scratch KV of it no longer matches what stages receive
        s.audited = False
        self._enqueue_prefill(s, s.prompt_ids + s.tokens, 0)

    # ================================================================== prefix cache
    def _reuse_prefix(self, s: Session, now: float) -> list:
        """Fork the longest cached prefix of this prompt on every stage instead of recomputing it."""
        if not self.prefix_cache or not self.stages or any(st.primary not in st.ready or st.needs_rebuild for st in self.stages):
            return []
        best, best_len = None, 0
        for e in self.prefix_cache.values():
            n = min(len(e.tokens), len(s.prompt_ids) - 1)  # the last prompt token must be computed
            common = next((i for i in range(n) if e.tokens[i] != s.prompt_ids[i]), n)
            if common > best_len:
                best, best_len = e, common
        if best is None or best_len < self.settings.prefix_min_tokens:
            return []
        best.last_used = now
        for wid in best.workers:
            s.touched.setdefault(wid, 0)
        self.counters["prefix_hits"] += 1
        self.counters["prefix_tokens_reused"] += best_len
        out = []
        for st in self.stages:
            s.logs[st.index] = [(0, best.logs[st.index][:best_len])]
            out.append(Send(self.workers[st.primary].conn, _msg("fork_session", source_id=best.cache_id,
                                                               session_id=s.request_id, length=best_len)))
        return out

    def _remember_prefix(self, s: Session, now: float) -> list:
        n = len(s.prompt_ids)
        if (self.settings.prefix_cache_entries <= 0 or n < self.settings.prefix_min_tokens or not self.stages
                or any(st.primary not in st.ready for st in self.stages)
                or any(sum(len(r) for _, r in s.logs.get(st.index, [])) < n for st in self.stages)
                or any(e.tokens == s.prompt_ids for e in self.prefix_cache.values())):
            return []
        cache_id = f"prefix-{next(self._ids)}"
        logs = {st.index: np.concatenate([r for _, r in s.logs[st.index]])[:n] for st in self.stages}
        self.prefix_cache[cache_id] = PrefixEntry(cache_id, list(s.prompt_ids), logs, now, frozenset(s.touched))
        out = [Send(self.workers[st.primary].conn, _msg("fork_session", source_id=s.request_id, session_id=cache_id, length=n))
               for st in self.stages]
        while len(self.prefix_cache) > self.settings.prefix_cache_entries:
            old = min(self.prefix_cache.values(), key=lambda e: e.last_used)
            out += self._drop_everywhere(old.cache_id)
            del self.prefix_cache[old.cache_id]
        return out

    def _drop_everywhere(self, session_id: str) -> list:
        out, notified = [], set()
        for st in self.stages:
            for wid in st.holders:
                w = self.workers.get(wid)
                if w and w.alive and wid not in notified:
                    notified.add(wid)
                    out.append(Send(w.conn, _msg("drop_session", session_id=session_id)))
        return out

    def _forget_prefixes(self) -> list:
        """A stage lost its KV (failure or re-plan): cached prefixes are gone with it."""
        out = []
        for cache_id in list(self.prefix_cache):
            out += self._drop_everywhere(cache_id)
        self.prefix_cache.clear()
        return out

    def cancel(self, request_id: str, now: float, reason: str = "cancelled") -> list:
        s = self.sessions.get(request_id)
        if s is None:
            return []
        self.counters["cancelled"] += 1
        return self._finish(s, reason, now, emit=False)

    def _enqueue(self, stage_index: int, item: WorkItem, s: Session) -> None:
        self.stages[stage_index].queue.append(item)

    def _finish_verified(self, s: Session, reason: str, now: float) -> list:
        """Finish once no spot check of a worker that computed for the session is pending."""
        if self.settings.spot_check_at_finish and not s.audited and not self._holding_finishes:
            s.audited = True
            checks = self._audit_finish(s, now)
            if checks:
                s.finish_pending = reason
                return checks
        # (a trial check tests the tab on trial, not the worker it copies: it holds nothing back)
        if self._holding_finishes or any(c["worker"] in s.touched and not c.get("trial") for c in self._checks.values()):
            s.finish_pending = reason
            return []
        s.finish_pending = None
        self.counters["completed"] += 1
        return self._finish(s, reason, now)

    def _release_finishes(self, now: float) -> list:
        out = []
        for s in [x for x in self.sessions.values() if x.finish_pending]:
            out += self._finish_verified(s, s.finish_pending, now)
        return out

    def _finish(self, s: Session, reason: str, now: float, emit: bool = True) -> list:
        s.finished = True
        self.sessions.pop(s.request_id, None)
        self.speculation.forget(s.request_id)
        for st in self.stages:
            st.queue = deque(i for i in st.queue if i.session_id != s.request_id)
        out = []
        if emit:
            out.append(Emit(s.request_id, {"type": "done", "finish_reason": reason, "tokens": len(s.tokens),
                                           "prompt_tokens": len(s.prompt_ids)}))
            out += self._remember_prefix(s, now)
        out += self._drop_everywhere(s.request_id)
        out += self._forget_verify_kv(lambda k: k[0] == s.request_id)
        if not self.sessions and self._replan_pending():
            self._replan_at = now
        return out

    def _replan_pending(self) -> bool:
        """Membership changed while sessions ran: apply the new plan once they finish."""
        return self._deferred_replan

    # ================================================================== the scheduler
    def _pump(self, now: float) -> list:
        out = []
        # pipeline micro-batches: sessions go in at most `pipeline_groups` groups (0: one per
        # stage), so a stage works on one group while the next works on another instead of one
        # big batch walking the stages together with all but one stage idle
        groups = self.settings.pipeline_groups or len(self.stages)
        group = max(1, -(-len(self.sessions) // max(1, min(groups, len(self.stages)))))
        for st in self.stages:
            if st.inflight is not None or not st.queue or st.needs_rebuild:
                continue
            wid = st.primary
            if wid is None or wid not in st.ready:
                continue
            w = self.workers[wid]
            if not w.alive:
                continue
            items, seen, rows = [], set(), 0
            rest = deque()
            while st.queue and len(items) < min(st.batch_limit, group):
                it = st.queue.popleft()
                # one slice per session per step (KV order); prompt rows only up to one prefill
                # chunk per step, so a burst of new prompts cannot make a step of decode rows slow
                if it.session_id in seen or (items and len(it.rows) > 1 and rows + len(it.rows) > self.settings.prefill_chunk):
                    seen.add(it.session_id)
                    rest.append(it)
                    continue
                seen.add(it.session_id)
                rows += len(it.rows)
                items.append(it)
            st.queue.extendleft(reversed(rest))
            out += self._send_step(st, w, items, now)
        return out

    def _send_step(self, st: Stage, w: Worker, items: list[WorkItem], now: float) -> list:
        step_id = next(self._ids)
        for it in items:
            s = self.sessions.get(it.session_id)
            if s is None:
                continue
            log = [e for e in s.logs.get(st.index, []) if e[0] < it.start_pos]
            log.append((it.start_pos, it.rows))
            s.logs[st.index] = log
            s.touched.setdefault(w.worker_id, len(s.tokens))
        # from this worker's measured costs, for these rows at their context positions
        expected_ms = self._step_cost_ms(w, st, [(i.start_pos, len(i.rows)) for i in items])
        deadline = now + max(self.settings.step_deadline_min_ms, self.settings.step_deadline_factor * expected_ms) / 1000
        st.inflight = {"step_id": step_id, "worker": w.worker_id, "items": items, "sent_at": now, "deadline": deadline,
                       "epoch": w.epoch}
        want = 0
        # a session that needs the whole vocabulary's logits: the head stage returns its hidden
        # rows instead of top-k (want_topk 0), and the coordinator computes every session's head
        st.inflight["full_logits"] = st.include_head and self.head_logits is not None and any(
            i.wants_token and i.session_id in self.sessions and self.sessions[i.session_id].chooser is not None for i in items)
        if st.include_head and any(i.wants_token for i in items) and not st.inflight["full_logits"]:
            want = max(self.sessions[i.session_id].params.candidates for i in items if i.session_id in self.sessions)
        hidden = np.concatenate([i.rows for i in items]) if len(items) > 1 else items[0].rows
        m = _msg("step", step_id=step_id, epoch=w.epoch, layer_start=st.layer_start, layer_end=st.layer_end,
                 sessions=[{"session_id": i.session_id, "start_pos": i.start_pos, "length": len(i.rows),
                            **({"topk_rows": i.head_rows} if i.head_rows > 1 else {})} for i in items],
                 hidden=np.ascontiguousarray(hidden, dtype=np.float32), want_topk=want)
        self.counters["steps"] += 1
        return [Send(w.conn, m)]

    def _on_step_result(self, w: Worker, m: dict, now: float) -> list:
        if m["step_id"] in self._synthetic:
            return self._on_synthetic_result(w, m, now)
        if m["step_id"] in self._checks:
            return self._on_check_result(w, m, now)
        st = next((s for s in self.stages if s.inflight and s.inflight["step_id"] == m["step_id"]), None)
        if st is None or st.inflight["worker"] != w.worker_id or m["epoch"] != w.epoch:
            self.counters["late_results_ignored"] += 1
            return []
        items: list[WorkItem] = st.inflight["items"]
        total = sum(len(i.rows) for i in items)
        out_rows = m["output"]
        # a head stage's hidden output is not needed (its top-k is): any row count is accepted
        if out_rows.ndim != 2 or out_rows.shape[1] != self.config.hidden or (not st.include_head and out_rows.shape[0] != total):
            err = ProtocolError("bad_shape", f"step_result output has shape {tuple(out_rows.shape)}, expected ({total}, {self.config.hidden})", "output")
            return self.on_protocol_error(w.conn, err, now)
        if not np.all(np.isfinite(out_rows)):
            return self.on_protocol_error(w.conn, ProtocolError("bad_field", "step_result output holds NaN or inf", "output"), now)
        if st.include_head and any(i.draft for i in items):
            m = self._split_draft_rows(st, items, m)  # one row per item stays in m; the drafts' rows go aside
            if m is None:
                err = ProtocolError("bad_field", f"head stage must return topk_ids, {sum(i.head_rows for i in items)} rows", "topk_ids")
                return self.on_protocol_error(w.conn, err, now)
        full = None
        if st.inflight.get("full_logits"):
            if out_rows.shape[0] != total:
                err = ProtocolError("bad_shape", f"step_result output has {out_rows.shape[0]} rows, expected {total}", "output")
                return self.on_protocol_error(w.conn, err, now)
            ends = np.cumsum([len(i.rows) for i in items]) - 1
            full = self.head_logits(out_rows[ends])
            m = {**m}
            m["topk_ids"], m["topk_logits"] = topk(full, CANDIDATES)
        topk_ids = m.get("topk_ids")
        if st.include_head and any(i.wants_token for i in items):
            if topk_ids is None or topk_ids.shape[0] != len(items):
                return self.on_protocol_error(w.conn, ProtocolError("bad_field", "head stage must return topk_ids, one row per session", "topk_ids"), now)
            if topk_ids.size and (topk_ids.min() < 0 or topk_ids.max() >= self.config.vocab):
                return self.on_protocol_error(w.conn, ProtocolError("bad_field", "topk_ids outside the vocabulary", "topk_ids"), now)
        w.steps += 1
        checks = self._maybe_spot_check(st, w, items, m, now) + self._maybe_trial(st, w, items, m, now)
        if w.probation and now <= st.inflight["deadline"]:
            w.proven_steps += 1  # a planned tab on probation: every step checked (see _maybe_spot_check)
            if w.proven_steps >= self.settings.probation_steps:
                self._end_probation(w, now)
        w.last_step_ms = (now - st.inflight["sent_at"]) * 1000
        compute = m.get("compute_ms")
        decode = all(len(i.rows) == i.head_rows for i in items)  # prefill steps are long by nature: decode steps set the pace
        if isinstance(compute, (int, float)) and 0 <= compute <= w.last_step_ms:
            hop = w.last_step_ms - compute
            w.transport_ms = hop if w.transport_ms is None else 0.9 * w.transport_ms + 0.1 * hop
            if decode:
                w.compute_ms = compute if w.compute_ms is None else 0.9 * w.compute_ms + 0.1 * compute
        if decode:
            self._adapt_batch(st, len(items), w.last_step_ms)
        elif not w.local:  # learn what a prompt row costs this worker (deadlines, prompt chunks)
            measured = compute if isinstance(compute, (int, float)) and 0 < compute <= w.last_step_ms else w.last_step_ms
            unit = self._ms_per_layer(w) * (st.layer_end - st.layer_start) * self._rows_equiv(w, [(i.start_pos, len(i.rows)) for i in items])
            observed = w.row_cost * max(0.0, measured - (20 if st.include_head else 0)) / max(unit, 1e-6)
            observed = min(16.0, max(0.01, observed))
            w.row_cost = observed if observed > w.row_cost else 0.8 * w.row_cost + 0.2 * observed
        if w.state == "suspect":
            w.move("ready")
        st.inflight = None
        out = []
        offset = 0
        for i, it in enumerate(items):
            rows = None if st.include_head else out_rows[offset: offset + len(it.rows)]
            offset += len(it.rows)
            s = self.sessions.get(it.session_id)
            if s is None or s.finished or it.generation != s.generation:
                continue
            s.last_by[st.index] = (w.worker_id, w.epoch)
            if not st.include_head:
                skip = max(0, it.forward_from - it.start_pos)
                if skip < len(it.rows):
                    self._enqueue(st.index + 1, WorkItem(it.session_id, it.start_pos + skip, rows[skip:], it.start_pos + skip,
                                                         it.wants_token, it.generation, it.draft), s)
            elif it.wants_token and it.forward_from < it.end and it.draft:
                out += self._verify_drafts(s, it, m["_draft_rows"][i], now)
            elif it.wants_token and it.forward_from < it.end:
                try:
                    out += self._on_token(s, m["topk_ids"][i], m["topk_logits"][i], now, None if full is None else full[i])
                except Exception as exc:  # our bug (e.g. sampling parameters nobody checked): this session alone fails
                    self.counters["failed"] += 1
                    self.events.append({"t": now, "kind": "session_error", "request_id": s.request_id, "error": repr(exc)})
                    out.append(Emit(s.request_id, {"type": "error", "code": "internal_error", "retriable": False,
                                                   "message": f"generation failed: {type(exc).__name__}: {exc}"}))
                    out += self._finish(s, "error", now, emit=False)
        return checks + out + self._pump(now)

    def _adapt_batch(self, st: Stage, batch: int, step_ms: float) -> None:
        """Multiplicative decrease when a step overran the latency target, additive increase
        while full batches stay well under it: sessions share steps without any one of them
        waiting behind a huge batch."""
        target = self.settings.target_step_ms
        if step_ms > target and batch > 1:
            st.batch_limit = max(1, min(st.batch_limit, batch) // 2)
        elif step_ms < target / 2 and batch >= st.batch_limit:
            st.batch_limit = min(self.settings.max_batch, st.batch_limit + 1)

    # ================================================================== spot checks
    def _maybe_spot_check(self, st: Stage, w: Worker, items: list[WorkItem], m: dict, now: float) -> list:
        """Sample this step for verification: one of its sessions' rows is recomputed from the
        stage's input log under a scratch session on the verifier (no real KV cache is touched)
        and compared on arrival. The scratch KV stays for that session's later checks, which
        send only the rows since the previous one: a check costs the rows it covers, not the
        whole context again; it is dropped with the session."""
        fraction = self.settings.spot_check_fraction
        if fraction <= 0 or w.local:
            return []
        if w.probation or w.checked_left > 0:  # trust not earned yet: every step is checked
            w.checked_left = max(0, w.checked_left - 1)
        elif self._spot_rng.random() >= fraction:
            return []
        verifier = self._verifier(st, w)
        candidates = [i for i, it in enumerate(items) if it.session_id in self.sessions
                      and (not st.include_head or (it.wants_token and it.forward_from < it.end))]
        if verifier is None or not candidates:
            self.counters["spot_checks_skipped"] += 1
            return []
        i = candidates[self._spot_rng.randrange(len(candidates))]
        it = items[i]
        offset = sum(len(x.rows) for x in items[:i])
        if st.include_head:  # a speculative item: every row its drafts were verified with
            claimed = m.get("_draft_rows", {}).get(i) or (np.array(m["topk_ids"][i]), np.array(m["topk_logits"][i]))
        else:
            claimed = np.array(m["output"][offset: offset + len(it.rows)])
        return self._send_check(st, (w.worker_id, w.epoch), verifier, self.sessions[it.session_id], it.start_pos, it.end,
                                claimed, now)

    def _audit_finish(self, s: Session, now: float) -> list:
        """spot_check_at_finish: before a session's "done", check every stage's step behind its
        last token (the head's top-k, and each other stage's output row as the next stage
        received it). Sampled checks can miss a liar for a few steps; without this, a session
        those steps end would be done with their tokens. A liar caught here rewinds the stream
        like any other (_on_liar), and the session finishes again after its recomputation."""
        pos = len(s.prompt_ids) + len(s.tokens) - 2  # the input row of the last token
        out = []
        for st in self.stages:
            by = s.last_by.get(st.index)
            if by is None or by[0] == LOCAL:
                continue
            if st.include_head:
                if s.last_head is None:
                    continue
                claimed = (np.array(s.last_head[0]), np.array(s.last_head[1]))
            else:
                row = next((rows[pos - p: pos - p + 1] for p, rows in s.logs.get(st.index + 1, []) if p <= pos < p + len(rows)), None)
                if row is None:
                    continue
                claimed = np.array(row)
            w = self.workers.get(by[0])
            verifier = self._verifier(st, w) if w is not None else None
            if verifier is None:
                self.counters["spot_checks_skipped"] += 1
                continue
            out += self._send_check(st, by, verifier, s, pos, pos + 1, claimed, now)
        return out

    def _send_check(self, st: Stage, by: tuple, verifier: Worker, s: Session, start_pos: int, end: int, claimed, now: float) -> list:
        """Have `verifier` recompute stage `st` for session rows [start_pos, end) from the
        stage's input log (under a scratch session) and compare with what worker `by` = (id,
        epoch) claimed: hidden rows, or the head's (top-k ids, logits) for the last row."""
        log = [r for p, r in s.logs.get(st.index, []) if p < end]
        history = np.concatenate(log)[:end] if log else np.zeros((0, self.config.hidden), np.float32)
        if len(history) != end:
            self.counters["spot_checks_skipped"] += 1
            return []
        want = claimed[0].shape[-1] if st.include_head else 0
        head_rows = claimed[0].shape[0] if st.include_head and claimed[0].ndim == 2 else 1  # a speculative step's rows
        step_id = next(self._ids)
        key = (st.layer_start, st.layer_end)
        kv_key = (s.request_id, key, verifier.worker_id)
        out = []
        parked = (verifier.worker_id == LOCAL and not (LOCAL in st.ready and LOCAL in st.holders)
                  and self._verify_ranges.get(key) != "ready")
        if parked:  # the check waits for the range; loading it afresh forgets stale scratch KV of it,
            out = self._load_verify_range(st)  # so this comes before this check's scratch KV is recorded
        held, epoch = self._verify_kv.get(kv_key, (0, -1))
        first = min(held, start_pos) if epoch == s.log_epoch else 0  # the verifier truncates to `first`
        self._verify_kv[kv_key] = (end, s.log_epoch)
        scratch = _check_session(s.request_id, key)
        w = self.workers.get(by[0])
        self._checks[step_id] = {"worker": by[0], "epoch": by[1], "verifier": verifier.worker_id, "stage": st.index,
                                 "range": key, "start": start_pos - first, "claimed": claimed, "at": now,
                                 "worker_steps": w.steps if w is not None else 0, "kv_key": kv_key}
        self.counters["spot_checks"] += 1
        msgs = [_msg("step", step_id=step_id, epoch=verifier.epoch, layer_start=key[0], layer_end=key[1],
                     sessions=[{"session_id": scratch, "start_pos": first, "length": end - first,
                                **({"topk_rows": head_rows} if head_rows > 1 else {})}],
                     hidden=np.ascontiguousarray(history[first:], dtype=np.float32), want_topk=want)]
        if parked:
            self._verify_parked.setdefault(key, []).extend(msgs)
            return out
        return [Send(verifier.conn, x) for x in msgs]

    def _load_verify_range(self, st: Stage) -> list:
        """Have the coordinator's own worker load a stage's range to recompute others' steps of
        it (once; checks wait for it in _verify_parked)."""
        key = (st.layer_start, st.layer_end)
        local = self.workers.get(LOCAL)
        if key in self._verify_ranges or local is None or not local.alive:
            return []
        self._forget_verify_kv(lambda k: k[1] == key and k[2] == LOCAL)  # a fresh range holds no scratch KV
        self._verify_ranges[key] = "loading"
        aid = next(self._ids)
        self._verify_assign[aid] = key
        infos = [self.blob_info[k] for k in self._stage_blobs(st)]
        out = [Send(local.conn, _msg("assign", assignment_id=aid, layer_start=key[0], layer_end=key[1],
                                     include_head=st.include_head, model=self.config.to_dict(),
                                     max_ctx=self.settings.max_ctx, precision={"compute": "f32"},
                                     chunks=[i.to_dict() for i in infos]))]
        out += self._weight_chunks(local, infos)  # LOCAL holds every blob already: normally none
        local.have_blobs.update(i.sha256 for i in infos)
        return out

    def _prune_ended_workers(self) -> None:
        """Tabs come and go for as long as the service runs: keep only the newest records of
        ended workers that nothing refers to any more."""
        ended = [w for w in self.workers.values() if not w.alive and w.ended_at is not None]
        if len(ended) <= self.settings.dead_workers_kept:
            return
        busy = {st.inflight["worker"] for st in self.stages if st.inflight} | {h for st in self.stages for h in st.holders}
        busy |= {c["worker"] for c in self._checks.values()} | {c["verifier"] for c in self._checks.values()}
        busy |= set(self.conn_worker.values())
        ended.sort(key=lambda w: w.ended_at)
        for w in ended[: len(ended) - self.settings.dead_workers_kept]:
            if w.worker_id not in busy:
                del self.workers[w.worker_id]

    def _forget_verify_kv(self, which) -> list:
        """Forget the verifiers' scratch KV for the (session, range, verifier) keys `which`
        selects; live verifiers are told to drop it."""
        out = []
        for k in [k for k in self._verify_kv if which(k)]:
            del self._verify_kv[k]
            v = self.workers.get(k[2])
            if v is not None and v.alive:
                out.append(Send(v.conn, _msg("drop_session", session_id=_check_session(k[0], k[1]))))
        return out

    def _verifier(self, st: Stage, w: Worker) -> Worker | None:
        """The coordinator's own worker (trusted, can load any range), else another ready holder."""
        local = self.workers.get(LOCAL)
        if local is not None and local.alive and local.state not in ("joining", "calibrating"):
            return local
        for wid in st.holders:
            other = self.workers.get(wid)
            if wid != w.worker_id and wid in st.ready and other is not None and other.alive:
                return other
        return None

    def _on_check_result(self, v: Worker, m: dict, now: float) -> list:
        check = self._checks.pop(m["step_id"])
        if v.worker_id != check["verifier"]:
            return self._release_finishes(now)
        claimed = check["claimed"]
        if isinstance(claimed, tuple):  # head stage: the chosen candidates and their logits
            ids, logits = m.get("topk_ids"), m.get("topk_logits")
            c_ids, c_logits = np.atleast_2d(claimed[0]), np.atleast_2d(claimed[1])  # rows: 1, or a speculative step's
            if ids is None or logits is None or len(ids) != len(c_ids):
                return self._release_finishes(now)
            scale = max(1.0, float(np.max(np.abs(logits))))
            n = min(ids.shape[1], c_ids.shape[1])
            error = float(np.max(np.abs(logits[:, :n] - c_logits[:, :n]))) / scale if n else 0.0
            if n and np.any(ids[:, 0] != c_ids[:, 0]):
                error = max(error, 1.0)
        else:
            ref = m["output"][check["start"]:]
            if ref.shape != claimed.shape:
                return self._release_finishes(now)
            error = float(np.max(np.abs(ref - claimed))) / max(float(np.max(np.abs(ref))), 1e-6)
        # f16 tabs round where the f32 verifier does not: an honest f16 result is ~1e-2 off
        # (not measured against the verifier yet; 5e-2 is a guess kept on the safe side)
        tolerance = self.settings.spot_check_rtol if self.settings.compute_dtype == "f32" else max(self.settings.spot_check_rtol, 5e-2)
        if check.get("trial"):  # a tab on probation recomputed a trusted worker's step
            return self._on_trial_result(v, check, error <= tolerance, error, now)
        if error <= tolerance:
            return self._release_finishes(now)
        return self._on_liar(check, error, now)

    # ================================================================== probation and trials
    def _start_trials(self, now: float) -> list:
        """Tabs on probation that the plan left out load one stage's range (the cheapest) and
        recompute real steps of its trusted primary under a scratch session (_maybe_trial):
        they earn trust without serving anyone, and a tarpit or a liar costs nobody a token."""
        out = []
        stages = [st for st in self.stages if st.primary and st.primary in st.ready and not self.workers[st.primary].probation]
        if not stages:
            return out
        for w in list(self.workers.values()):
            if not (w.alive and w.probation and not w.local and w.state == "idle" and not w.stages and w.worker_id not in self._trials):
                continue
            if w.have_blobs and self._in_resume_window(now):
                continue  # a restarted coordinator's rejoining holder: the resume plan gives it what it holds
            st = min(stages, key=lambda x: (self._bytes_missing(w, x), sum(self.blob_info[k].size for k in self._stage_blobs(x))))
            aid = next(self._ids)
            infos = [self.blob_info[k] for k in self._stage_blobs(st)]
            self._trials[w.worker_id] = {"range": (st.layer_start, st.layer_end), "assignment_id": aid, "ready": False,
                                         "check": None, "shas": [i.sha256 for i in infos], "best_ms": None}
            self._trial_assign[aid] = w.worker_id
            w.move("loading")
            to_send = sum(i.size for i in infos if i.sha256 not in w.have_blobs)
            w.load_deadline = now + self.settings.load_timeout_min_s + to_send / self.settings.load_min_bytes_per_s
            self.events.append({"t": now, "kind": "trial", "worker": w.worker_id, "layers": [st.layer_start, st.layer_end]})
            out.append(Send(w.conn, _msg("assign", assignment_id=aid, layer_start=st.layer_start, layer_end=st.layer_end,
                                         include_head=st.include_head, model=self.config.to_dict(), max_ctx=self.settings.max_ctx,
                                         precision=self._precision(), chunks=[i.to_dict() for i in infos])))
            chunks = self._weight_chunks(w, infos)
            sent = sum(len(c.msg["data"]) for c in chunks)
            w.bytes_sent += sent
            self.counters["weight_bytes_sent"] += sent
            out += chunks
        return out

    def _bytes_missing(self, w: Worker, st: Stage) -> int:
        return sum(self.blob_info[k].size for k in self._stage_blobs(st) if self.blob_info[k].sha256 not in w.have_blobs)

    def _on_trial_ready(self, w: Worker, m: dict, now: float) -> list:
        trial = self._trials.get(w.worker_id)
        del self._trial_assign[m["assignment_id"]]
        if trial is None:
            return []
        if m["checksum"] != sha256("".join(trial["shas"]).encode()):
            return self._worker_lost(w, now, "ready with a checksum that does not match its assignment", quarantine=True)
        w.have_blobs.update(trial["shas"])
        trial["ready"] = True
        w.load_deadline = None
        if w.state == "loading":
            w.move("ready")
        return []

    def _maybe_trial(self, st: Stage, w: Worker, items: list, m: dict, now: float) -> list:
        """After a trusted worker's step: each ready tab on trial over this range that is not
        busy with one recomputes one session's rows; its answer is compared with the trusted one."""
        if w.probation or not self._trials:
            return []
        key = (st.layer_start, st.layer_end)
        out = []
        for wid, trial in self._trials.items():
            v = self.workers.get(wid)
            if trial["range"] != key or not trial["ready"] or trial["check"] is not None or v is None or not v.alive:
                continue
            offset = 0
            for it in items:
                s = self.sessions.get(it.session_id)
                if s is not None and (not st.include_head or (it.wants_token and it.forward_from < it.end)):
                    if st.include_head:
                        i = items.index(it)
                        claimed = (np.array(m["topk_ids"][i]), np.array(m["topk_logits"][i]))
                    else:
                        claimed = np.array(m["output"][offset: offset + len(it.rows)])
                    before = set(self._checks)
                    out += self._send_check(st, (w.worker_id, w.epoch), v, s, it.start_pos, it.end, claimed, now)
                    for step_id in set(self._checks) - before:
                        c = self._checks[step_id]
                        c["trial"] = True
                        c["deadline"] = now + self.settings.trial_deadline_ms / 1000 + \
                            self._step_cost_ms(v, st, [(0, it.end)]) * self.settings.step_deadline_factor / 1000
                        c["rows"] = it.end
                        trial["check"] = step_id
                        self.counters["trial_steps"] += 1
                    break
                offset += len(it.rows)
        return out

    def _on_trial_result(self, v: Worker, check: dict, right: bool, error: float, now: float) -> list:
        trial = self._trials.get(v.worker_id)
        if trial is None:
            return []
        trial["check"] = None
        if not right:
            return self._worker_lost(v, now, f"trial step wrong (relative error {error:.3g})", quarantine=True)
        layers = check["range"][1] - check["range"][0]
        ms = (now - check["at"]) * 1000 / max(1, layers) / max(1.0, self._rows_equiv(v, [(0, check["rows"])]))
        return self._trial_passed(v, trial, ms, now)

    def _end_probation(self, w: Worker, now: float) -> None:
        w.probation = False
        w.checked_left = self.settings.probation_steps  # its first steps in the plan are all checked
        self.counters["probations_passed"] += 1
        self.events.append({"t": now, "kind": "trusted", "worker": w.worker_id, "steps": w.proven_steps,
                            "ms_per_layer": round(w.ms_per_layer, 3)})

    def _send_synthetic(self, w: Worker, trial: dict, now: float) -> list:
        """A trial step with no traffic to recompute: 8 rows (fixed token embeddings) through the
        tab's trial range. It proves the tab answers, in time and in shape; its values are
        proven by real trials and, once planned, by checking all its first steps."""
        step_id = next(self._ids)
        key = trial["range"]
        rows = np.ascontiguousarray(self.embed(list(range(1, 9))), dtype=np.float32)
        layers = key[1] - key[0]
        cost = self._ms_per_layer(w) * layers * self._rows_equiv(w, [(0, len(rows))])
        self._synthetic[step_id] = {"worker": w.worker_id, "at": now, "rows": len(rows), "range": key,
                                    "deadline": now + (self.settings.trial_deadline_ms + self.settings.step_deadline_factor * cost) / 1000}
        trial["check"] = -step_id  # busy (negative: synthetic)
        trial["last"] = now
        self.counters["trial_steps"] += 1
        st = next((x for x in self.stages if (x.layer_start, x.layer_end) == key), None)
        head = bool(st and st.include_head)
        return [Send(w.conn, _msg("step", step_id=step_id, epoch=w.epoch, layer_start=key[0], layer_end=key[1],
                                  sessions=[{"session_id": f"trial-{w.worker_id}", "start_pos": 0, "length": len(rows)}],
                                  hidden=rows, want_topk=1 if head else 0))]

    def _on_synthetic_result(self, w: Worker, m: dict, now: float) -> list:
        c = self._synthetic.pop(m["step_id"])
        trial = self._trials.get(w.worker_id)
        if c["worker"] != w.worker_id or trial is None:
            return []
        trial["check"] = None
        out = m["output"]
        if out.ndim != 2 or out.shape[1] != self.config.hidden or not np.all(np.isfinite(out)):
            return self._worker_lost(w, now, f"trial step answered with output of shape {tuple(out.shape)}", quarantine=True)
        layers = c["range"][1] - c["range"][0]
        ms = (now - c["at"]) * 1000 / max(1, layers) / self._rows_equiv(w, [(0, c["rows"])])
        return self._trial_passed(w, trial, ms, now)

    def _trial_passed(self, v: Worker, trial: dict, ms: float, now: float) -> list:
        trial["best_ms"] = ms if trial["best_ms"] is None else min(trial["best_ms"], ms)
        v.proven_steps += 1
        if v.proven_steps >= self.settings.probation_steps:
            self._trials.pop(v.worker_id, None)
            # its speed as seen here (the fastest trial, transport included) bounds its claim
            v.ms_per_layer = max(v.ms_per_layer, min(trial["best_ms"], 1e4))
            self._end_probation(v, now)
            self._schedule_replan(now)  # it may now take layers
        return []

    def _trial_tick(self, now: float) -> list:
        out = []
        for step_id, c in list(self._synthetic.items()):
            if now > c["deadline"]:
                del self._synthetic[step_id]
                v = self.workers.get(c["worker"])
                if v is not None and v.alive:
                    out += self._worker_lost(v, now, f"trial step unanswered after {(now - c['at']) * 1000:.0f} ms",
                                             quarantine=True)
        for wid, trial in list(self._trials.items()):
            v = self.workers.get(wid)
            if (v is not None and v.alive and trial["ready"] and trial["check"] is None
                    and now - trial.get("last", 0.0) > self.settings.heartbeat_ms / 1000):
                out += self._send_synthetic(v, trial, now)
        for step_id, c in list(self._checks.items()):
            if c.get("trial") and now > c["deadline"]:
                del self._checks[step_id]
                v = self.workers.get(c["verifier"])
                if v is not None and v.alive:
                    out += self._worker_lost(v, now, f"trial step unanswered after {(now - c['at']) * 1000:.0f} ms",
                                             quarantine=True)
        for wid, trial in list(self._trials.items()):
            if trial["check"] is not None and trial["check"] > 0 and trial["check"] not in self._checks:
                trial["check"] = None  # its answer could not be compared (e.g. a plan changed): try another
            w = self.workers.get(wid)
            if w is not None and w.alive and not trial["ready"] and w.load_deadline is not None and now > w.load_deadline:
                self.counters["load_timeouts"] += 1
                out += self._worker_lost(w, now, "still loading its trial range at the load deadline")
        return out + self._start_trials(now)

    def _on_liar(self, check: dict, error: float, now: float) -> list:
        """A step's result disagreed with the recomputation: quarantine the worker (both, when
        the verifier was itself an untrusted tab) and recompute every session without it.

        A liar may have lied in any step it ran, sampled or not, so every token streamed since
        it first computed for a session is unconfirmed: the session restarts from its prompt
        and the tokens before that point, and re-decodes the rest on honest workers. Tokens
        that come out the same are not sent again; at the first that differs the client gets
        a `rewind` to that index, then the right tokens (see _on_token)."""
        self.counters["spot_check_mismatches"] += 1
        suspects = [check["worker"]] + ([check["verifier"]] if check["verifier"] != LOCAL else [])
        out = []
        self._holding_finishes = True  # none may finish before _recompute_sessions has looked at it
        for wid in suspects:
            w = self.workers.get(wid)
            self.events.append({"t": now, "kind": "liar_detected", "worker": wid, "stage": check["stage"], "error": error,
                                "worker_steps": check["worker_steps"], "verifier": check["verifier"]})
            if w is not None and w.alive and (wid != check["worker"] or w.epoch == check["epoch"]):
                out += self._worker_lost(w, now, f"spot check: outputs off by {error:.3g} (relative)", quarantine=True)
        self._holding_finishes = False
        return out + self._recompute_sessions(now, suspects)

    def _recompute_sessions(self, now: float, suspects: list[str]) -> list:
        """Every live session starts over (a new generation: queued and in-flight items of the
        old one are ignored) from its prompt and the tokens no suspect had a hand in. A session
        whose last token was out, waiting on checks, finishes if no suspect touched it."""
        for st in self.stages:
            st.queue = deque(i for i in st.queue if i.session_id not in self.sessions)
        unconfirmed, clean_finished = 0, []
        for s in self.sessions.values():
            s.generation += 1
            for st in self.stages:
                self._inflight_lost.pop((st.index, s.request_id), None)
            trusted = min((s.touched[w] for w in suspects if w in s.touched), default=len(s.tokens))
            s.touched = {w: n for w, n in s.touched.items() if w not in suspects}
            if trusted < len(s.tokens):
                s.unconfirmed = s.tokens[trusted:] + s.unconfirmed
                del s.tokens[trusted:]
                unconfirmed += len(s.unconfirmed)
            elif s.finish_pending:
                clean_finished.append(s)
                continue
            s.finish_pending = None  # its last tokens are being recomputed too
            self._restart_session(s)
        self.events.append({"t": now, "kind": "recompute", "sessions": len(self.sessions), "unconfirmed_tokens": unconfirmed})
        out = []
        for s in clean_finished:
            out += self._finish_verified(s, s.finish_pending, now)
        return out + self._pump(now)

    def _on_token(self, s: Session, ids: np.ndarray, logits: np.ndarray, now: float, full: np.ndarray | None = None) -> list:
        logprob = None
        if s.chooser is not None and full is not None:
            token, logprob = s.chooser.choose(full, s.tokens)
        else:
            token = Sampler(s.params).choose(ids, logits, len(s.tokens))
        s.last_head = (ids, logits)
        for stage, detected in self._awaiting_recovery:
            self.events.append({"t": now, "kind": "recovered", "stage": stage, "recovery_s": now - detected})
        self._awaiting_recovery = []
        out = []
        if s.unconfirmed and s.unconfirmed[0] == token:
            s.unconfirmed.pop(0)  # recomputed, and the client already has it
            self.counters["tokens_confirmed"] += 1
        else:
            if s.unconfirmed:  # a liar changed this token: the client drops it and what followed
                self.counters["tokens_retracted"] += len(s.unconfirmed)
                self.events.append({"t": now, "kind": "rewind", "request_id": s.request_id, "index": len(s.tokens),
                                    "retracted": len(s.unconfirmed)})
                out.append(Emit(s.request_id, {"type": "rewind", "index": len(s.tokens),
                                               "reason": f"{len(s.unconfirmed)} tokens came from a worker caught returning wrong results"}))
                s.unconfirmed = []
            out.append(Emit(s.request_id, {"type": "token", "index": len(s.tokens), "token_id": token,
                                           **({"logprob": logprob} if logprob is not None else {})}))
            self.counters["tokens"] += 1
        s.tokens.append(token)
        s.last_token_at = now
        if s.first_token_at is None:
            s.first_token_at = now
            if s.share_prefix:  # the prompt's KV is complete on every stage: siblings fork it
                out += self._remember_prefix(s, now)
        if s.stop_at_eos and token == self.config.eos_id:
            return out + self._finish_verified(s, "stop", now)
        if len(s.tokens) >= s.max_tokens:
            return out + self._finish_verified(s, "length", now)
        pos = len(s.prompt_ids) + len(s.tokens) - 1
        self._enqueue_next(s, token, pos)
        return out

    # ================================================================== speculation
    def _enqueue_next(self, s: Session, token: int, pos: int) -> None:
        """Queue the session's next trip: the row of its new token, and k drafted rows after it
        when speculation is on (coordinator/speculation.py); the head then returns top-k for
        all k+1 rows and _verify_drafts keeps what the model itself would have produced."""
        if s.request_id in self._trip_more:
            return  # the trip's next row decides the next token
        draft = None
        # the whole-vocabulary path returns one row per session (a grammar's, logprobs'): no drafts then
        full = getattr(self, "head_logits", None) is not None and any(
            getattr(x, "chooser", None) is not None for x in self.sessions.values())
        if self.speculation.on and not full:
            limit = min(s.max_tokens - len(s.tokens) - 1, min(self.settings.max_ctx, self.config.context) - pos - 1)
            d = self.speculation.draft(s.request_id, s.prompt_ids + s.tokens, Sampler(s.params), len(s.tokens), limit)
            draft = d if d.tokens else None
        ids = [token] + (draft.tokens if draft else [])
        self._enqueue(0, WorkItem(s.request_id, pos, self.embed(ids), pos, True, s.generation, draft), s)

    def _split_draft_rows(self, st: Stage, items: list[WorkItem], m: dict) -> dict | None:
        """A head step_result with several rows per speculative item: a copy of `m` with one row
        (the item's last) per item, as for plain steps, and the speculative items' rows under
        "_draft_rows" (item index -> (ids, logits)); None when the rows do not add up."""
        need = [it.head_rows for it in items]
        if (st.inflight or {}).get("full_logits") and getattr(self, "head_logits", None) is not None:
            # the head sent hidden rows (a session in the step needed the whole vocabulary):
            # every verified row's candidates are made here from them
            from kernels.reference import topk
            from model.sampling import CANDIDATES

            ends = np.cumsum([len(it.rows) for it in items])
            rows = np.concatenate([np.arange(e - n, e) for n, e in zip(need, ends)])
            if m["output"].shape[0] != ends[-1]:
                return None
            ids, logits = topk(self.head_logits(m["output"][rows]), CANDIDATES)
            m = {**m, "topk_ids": ids, "topk_logits": logits}
        ids, logits = m.get("topk_ids"), m.get("topk_logits")
        if (ids is None or logits is None or ids.ndim != 2 or ids.shape[0] != sum(need) or logits.shape != ids.shape
                or (ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab))):
            return None
        ends = np.cumsum(need)
        aside = {i: (ids[e - n:e], logits[e - n:e]) for i, (it, n, e) in enumerate(zip(items, need, ends)) if it.draft}
        return {**m, "topk_ids": ids[ends - 1], "topk_logits": logits[ends - 1], "_draft_rows": aside}

    def _verify_drafts(self, s: Session, it: WorkItem, rows: tuple, now: float) -> list:
        """Emit the tokens the trip decided (speculation.decide_trip: the drafts the sampler
        agrees with, then its own choice), then roll back the KV of the rows past them on every
        stage: the stage logs (which a rebuild and the spot checks replay) and the workers'
        caches (truncate_session) keep only accepted positions."""
        ids, logits = rows
        out = []
        try:
            decided = decide_trip(Sampler(s.params), len(s.tokens), list(zip(ids, logits)), it.draft)
            used = 0
            for j, expected in enumerate(decided):
                last = j + 1 == len(decided)
                (self._trip_more.discard if last else self._trip_more.add)(s.request_id)
                out += self._on_token(s, ids[j], logits[j], now)
                used += 1
                if (s.finished or s.finish_pending is not None or len(s.tokens) >= s.max_tokens
                        or (s.stop_at_eos and s.tokens[-1] == self.config.eos_id)):
                    break
                if s.tokens[-1] != expected:  # _on_token chose otherwise (a hook of its own): the trip ends there
                    if not last:
                        self._trip_more.discard(s.request_id)
                        self._enqueue_next(s, s.tokens[-1], len(s.prompt_ids) + len(s.tokens) - 1)
                    break
        except Exception as exc:  # our bug: this session alone fails (as in _on_step_result)
            self.counters["failed"] += 1
            self.events.append({"t": now, "kind": "session_error", "request_id": s.request_id, "error": repr(exc)})
            out.append(Emit(s.request_id, {"type": "error", "code": "internal_error", "retriable": False,
                                           "message": f"generation failed: {type(exc).__name__}: {exc}"}))
            return out + self._finish(s, "error", now, emit=False)
        finally:
            self._trip_more.discard(s.request_id)
        self.speculation.verified(s.request_id, len(it.draft.tokens), len(decided) - 1, len(decided))
        keep = it.end - it.head_rows + used  # inputs of the rows that decided a kept token
        if keep < it.end:
            out += self._roll_back(s, keep, tell=not s.finished)
        return out

    def _roll_back(self, s: Session, length: int, tell: bool = True) -> list:
        """The session's KV keeps positions [0, length): its stage logs are cut there and (tell)
        every stage primary holding its KV truncates its cache there."""
        for index, log in s.logs.items():
            s.logs[index] = [(p, r[:length - p]) for p, r in log if p < length]
        out, told = [], set()
        for st in self.stages if tell else []:
            w = self.workers.get(st.primary) if st.primary else None
            if w is not None and w.alive and w.worker_id in st.ready and w.worker_id not in told:
                told.add(w.worker_id)
                out.append(Send(w.conn, _msg("truncate_session", session_id=s.request_id, length=length)))
        return out

    # ================================================================== time
    def tick(self, now: float) -> list:
        out = []
        silence = self.settings.dead_after_ms / 1000
        # If this loop itself stalled (GC, a long synchronous step, an overloaded host), the
        # heartbeats of that stall are still queued in the sockets, unread: credit the stall
        # to every worker instead of declaring them all dead at once.
        stall = now - self._last_tick if self._last_tick is not None else 0.0
        self._last_tick = now
        if stall > self.settings.heartbeat_ms / 1000:
            for w in self.workers.values():
                w.last_seen = min(now, w.last_seen + stall)
        for w in list(self.workers.values()):
            if w.alive and not w.local and now - w.last_seen > silence:
                self.events.append({"t": now, "kind": "silent", "worker": w.worker_id, "silent_s": now - w.last_seen})
                out += self._worker_lost(w, now, f"silent for {int((now - w.last_seen) * 1000)} ms")
        for w in list(self.workers.values()):
            if w.alive and not w.local and w.loading and w.load_deadline is not None and now > w.load_deadline:
                self.counters["load_timeouts"] += 1
                self.events.append({"t": now, "kind": "load_timeout", "worker": w.worker_id,
                                    "progress": dict(w.load_progress)})
                out += self._worker_lost(w, now, "still loading its layers at the load deadline "
                                                 f"(last progress: {w.load_progress or 'none'})")
        for st in self.stages:
            f = st.inflight
            if not f or now <= f["deadline"]:
                continue
            w = self.workers[f["worker"]]
            if not w.alive or w.local:  # the coordinator's own compute is never evicted (nothing would replace it)
                continue
            late = now - f["sent_at"]
            allowed = f["deadline"] - f["sent_at"]
            if late > allowed * self.settings.suspect_evict_factor:
                # a step this late counts against the address (a tarpit rejoining under new
                # names meets a growing backoff); a tab still on probation is quarantined
                self.counters["slow_evictions"] += 1
                if w.address and not w.probation:
                    self.backoff.offend(w.address, "a step far past its deadline", now)
                out += self._worker_lost(w, now, f"step {f['step_id']} {late:.1f}s late (slow worker evicted"
                                                 f"{' on probation' if w.probation else ''})", quarantine=w.probation)
            elif w.state == "ready":
                w.move("suspect")
                self.events.append({"t": now, "kind": "suspect", "worker": w.worker_id, "step_id": f["step_id"]})
        self._prune_ended_workers()
        out += self._trial_tick(now)
        expired = [k for k, c in self._checks.items() if now - c["at"] > self.settings.spot_check_timeout_s]
        for step_id in expired:
            self._verify_kv.pop(self._checks.pop(step_id)["kv_key"], None)  # the verifier died or never answered
            self.counters["spot_checks_skipped"] += 1
        if expired:
            out += self._release_finishes(now)
        if self._replan_at is not None and now >= self._replan_at and not self._awaiting_resume(now):
            if self.sessions and self.stages and all(s.primary for s in self.stages):
                self._deferred_replan = True  # running sessions keep their plan
                self._replan_at = None
            else:
                self._replan_at = None
                self._deferred_replan = False
                out += self._replan(now)
        # requests that cannot be served fail after a bound, with a retriable error
        if not self.stages or any(not st.holders for st in self.stages):
            for s in list(self.sessions.values()):
                if now - (s.last_token_at or s.created) > self.settings.request_timeout_s:
                    self.counters["failed"] += 1
                    out.append(Emit(s.request_id, {"type": "error", "code": "no_capacity", "retriable": True,
                                                   "message": "no workers can serve the model right now; retry later"}))
                    out += self._finish(s, "error", now, emit=False)
        return out + self._pump(now)

    # ================================================================== failure and recovery
    def _worker_lost(self, w: Worker, now: float, reason: str, quarantine: bool = False) -> list:
        """Fence the worker (its epoch dies with it) and repair every stage it served."""
        w.move("quarantined" if quarantine else "dead")
        w.ended_at = now
        w.why = reason[:200]
        if quarantine and w.address:
            self.backoff.offend(w.address, reason, now)
        self._trials.pop(w.worker_id, None)
        for step_id in [k for k, c in self._synthetic.items() if c["worker"] == w.worker_id]:
            del self._synthetic[step_id]
        for step_id in [k for k, c in self._checks.items() if c["verifier"] == w.worker_id]:
            del self._checks[step_id]  # it will not answer: its checks stop holding sessions back
            self.counters["spot_checks_skipped"] += 1
        self._forget_verify_kv(lambda k: k[2] == w.worker_id)
        self.events.append({"t": now, "kind": "quarantine" if quarantine else "death", "worker": w.worker_id,
                            "reason": reason, "last_seen_s": now - w.last_seen})
        out = []
        if w.conn in self.conn_worker:
            self.conn_worker.pop(w.conn, None)
            out.append(Close(w.conn, 4000, f"fenced: {reason}"[:120]))
        for st in self.stages:
            if w.worker_id not in st.holders:
                continue
            was_primary = st.primary == w.worker_id
            st.holders.remove(w.worker_id)
            st.ready.discard(w.worker_id)
            if was_primary:
                self._awaiting_recovery.append((st.index, now))
                out += self._forget_prefixes()  # part of their KV died with this stage
                out += self._repair_stage(st, now)
        w.stages = set()
        if not any(x.alive and not x.local for x in self.workers.values()):
            self.degraded = True
        self._schedule_replan(now)
        return out + self._release_finishes(now)

    def _repair_stage(self, st: Stage, now: float) -> list:
        """Give the stage a new primary (a warm standby if any, else the least loaded live
        worker that can hold it, else the coordinator itself) and rebuild its KV caches."""
        st.needs_rebuild = True
        if st.inflight is not None:
            # the lost step's inputs are in the logs: the replay recomputes them and forwards
            # exactly the rows the lost step would have forwarded
            for it in st.inflight["items"]:
                self._inflight_lost[(st.index, it.session_id)] = (it.forward_from, it.wants_token, it.draft)
            st.inflight = None
        if st.primary is None:
            need = sum(self.blob_info[k].size for k in self._stage_blobs(st))
            candidates = [w for w in self._live_workers() if not w.local and
                          w.capacity().memory_bytes / w.capacity().expansion >= need + self._held_bytes(w)]
            candidates.sort(key=lambda w: (w.probation, len(w.stages), self._ms_per_layer(w)))
            if candidates:
                st.holders.append(candidates[0].worker_id)
            elif self.settings.coordinator_compute and LOCAL in self.workers and self.workers[LOCAL].alive:
                st.holders.append(LOCAL)
                self.degraded = True
            else:
                self.degraded = True
                self.events.append({"t": now, "kind": "stage_unserved", "stage": st.index})
                return []
        w = self.workers[st.primary]
        w.stages.add(st.index)
        if st.primary in st.ready:
            return self._rebuild(st, now)
        if not any(e[0] == st.index for e in w.loading.values()):
            return self._assign(w, st, now)
        return []

    def _held_bytes(self, w: Worker) -> int:
        return sum(sum(self.blob_info[k].size for k in self._stage_blobs(self.stages[i])) for i in w.stages if i < len(self.stages))

    def _rebuild(self, st: Stage, now: float) -> list:
        """The named rebuild step: replay every session's stored inputs for this stage, in
        chunks of the rows a prompt step may have (a long session's history in one step would
        outlast what its deadline can judge), so the new holder's KV cache equals the lost one.
        Rows that were in flight when the stage died are forwarded as if nothing had happened."""
        st.needs_rebuild = False
        replays = []
        for s in self.sessions.values():
            log = s.logs.get(st.index)
            if not log:
                continue
            rows = np.concatenate([r for _, r in log])
            end = log[-1][0] + len(log[-1][1])
            # without a lost step, the logged inputs' outputs were already forwarded: the
            # replay only rebuilds the cache and forwards nothing
            forward_from, wants, draft = self._inflight_lost.pop((st.index, s.request_id), (end, False, None))
            step = self._prefill_rows(end)
            # the last chunk holds every row the head verifies (the token's and the drafts')
            tail = min(len(rows), max(step, 1 + (len(draft.tokens) if draft else 0)))
            cuts = list(range(0, len(rows) - tail, step)) + [len(rows) - tail]
            for j, start in enumerate(cuts):
                last = j == len(cuts) - 1
                stop = len(rows) if last else cuts[j + 1]
                replays.append(WorkItem(s.request_id, start, rows[start:stop], forward_from,
                                        wants and last, s.generation, draft if last else None))
        for it in reversed(replays):
            st.queue.appendleft(it)
        self.events.append({"t": now, "kind": "rebuild", "stage": st.index, "worker": st.primary, "sessions": len(replays)})
        return self._pump(now)

    # ================================================================== status
    def status(self, now: float) -> dict:
        return {
            "model": {"layers": self.config.n_layers, "hidden": self.config.hidden, "vocab": self.config.vocab},
            "plan_version": self.plan_version,
            "degraded": self.degraded or any(not s.holders for s in self.stages) or not self.stages,
            "stages": [s.to_dict() for s in self.stages],
            # ranges the coordinator's own worker holds to recompute sampled steps: loading | ready
            "verifier_ranges": [[k[0], k[1], v] for k, v in sorted(self._verify_ranges.items())],
            "workers": [{
                "worker_id": w.worker_id, "name": w.name, "state": w.state, "local": w.local,
                "backend": w.caps.get("backend"), "kind": w.caps.get("kind"), "adapter": w.caps.get("adapter"),
                "profile": w.caps.get("profile"), "memory_bytes": w.caps.get("memory_bytes"),
                "ms_per_layer": round(w.ms_per_layer, 3), "stages": sorted(w.stages), "steps": w.steps,
                "last_step_ms": w.last_step_ms, "heartbeat_age_ms": int((now - w.last_seen) * 1000),
                "transport_ms": None if w.transport_ms is None else round(w.transport_ms, 3),
                "compute_ms": None if w.compute_ms is None else round(w.compute_ms, 3),
                "weight_bytes_sent": w.bytes_sent, "loading": len(w.loading), "epoch": w.epoch,
                "corrections": list(w.corrections),
                "load_progress": w.load_progress, "capabilities": w.caps,
                "probation": w.probation, "proven_steps": w.proven_steps, "row_cost": round(w.row_cost, 4),
                "trial": list(self._trials[w.worker_id]["range"]) if w.worker_id in self._trials else None,
                "why": w.why,
            } for w in self.workers.values()],
            "sessions": [{"request_id": s.request_id, "prompt_tokens": len(s.prompt_ids), "tokens": len(s.tokens),
                          "max_tokens": s.max_tokens, "speculation": self.speculation.session_status(s.request_id)}
                         for s in self.sessions.values()],
            # acceptance rate and tokens per trip, over all sessions since the start
            "speculation": self.speculation.status(),
            "counters": dict(self.counters),
            "backoff": self.backoff.snapshot(now),  # addresses whose joins are refused, and why
            "events": list(self.events)[-50:],
        }
