"""The coordinator's records: the actions its state machine returns (Send, Close, Emit), its
settings, and the typed records its sub-machines own (Worker, Stage, WorkItem, Session,
PrefixEntry)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from coordinator.lifecycle import next_state
from coordinator.planner import WorkerCapacity
from coordinator.speculation import Draft
from model.sampling import SamplingParams
from protocol.messages import DEFAULT_HEARTBEAT_MS

# pongs a worker's round trip is the median of: one late pong (its event loop busy loading, a
# speed measurement) does not move it, where a smoothed mean kept it for seconds, and the steps'
# compute, their round trip less it, read as near nothing (placement then piled streams on it)
RTT_WINDOW = 5

LOCAL = "local"  # connection id of the coordinator's own compute worker


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


def check_session(session_id: str, layers: tuple) -> str:
    """The verifier's scratch session for spot checks of one session over one layer range."""
    return f"check-{session_id}-{layers[0]}-{layers[1]}"


# ---------------------------------------------------------------------- settings
@dataclass(frozen=True)
class CoordinatorSettings:
    heartbeat_ms: int = DEFAULT_HEARTBEAT_MS
    dead_after_ms: int = 800  # silence before a worker is declared dead (<= 1 s detection)
    step_deadline_factor: float = 8.0  # x the worker's measured time for that step
    step_deadline_min_ms: int = 1500
    suspect_evict_factor: float = 4.0  # a step this many deadlines late: evict the worker
    # this many deadlines late, its range held ready by a standby or a replica: evict it already
    # (that worker replays the stage's sessions at once; waiting out suspect_evict_factor stalled
    # them 6-20 s)
    suspect_takeover_factor: float = 2.0
    replicas: int = 1
    max_stages: int | None = None
    stages: int | None = None  # an exact depth (None: the fewest stages unless a deeper pipeline is predicted faster)
    max_batch: int = 16
    pipeline_groups: int = 1
    target_step_ms: float = 200.0  # a stage's batch shrinks when its steps take longer than this and batching stopped paying
    prefill_chunk: int = 256
    coordinator_compute: bool = True
    replan_delay_ms: int = 300  # let a burst of joins settle before re-planning
    max_ctx: int = 2048
    request_timeout_s: float = 30.0  # a request with no way to be served fails after this
    measure_tokens: int = 8
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
    # (none: a worker started with --draft-model drafts, its answer awaited draft_deadline_ms
    # past its measured round trip before the trip goes without drafts)
    speculation: str = "off"
    speculation_max_k: int = 6
    draft_model: str = ""
    draft_deadline_ms: float = 50.0


# ---------------------------------------------------------------------- records
@dataclass
class ParkedTrip:
    """A session's next trip waiting for a worker's drafts (speculation by a worker's draft model):
    its token goes through the pipeline when the drafts come, or without them at the deadline."""

    session_id: str
    token: int
    pos: int
    generation: int
    k: int
    drafter: str  # worker id asked
    deadline: float
    asked_at: float


# a measured transfer rate is bounded to what a link can carry (100 kbit/s .. 10 Gbit/s, in bytes a
# ms): a step answered in less time than its bytes take on any link is codec noise, not a faster link
MIN_BYTES_PER_MS, MAX_BYTES_PER_MS = 12.5, 1.25e6


@dataclass
class TransferFit:
    """A worker's transfer rate from its steps, timed here: each step's time beyond its reported
    compute and its ping's round trip, against the bytes it moved both ways, fitted as a line
    (slope: ms a byte; intercept: a step's fixed cost beyond the ping's, e.g. its codec) over
    exponentially decayed sums. Only steps of different sizes (decode rows, prompt chunks) tell
    the slope from the intercept: until they spread, no rate (the planner assumes its default)."""

    decay: float = 0.97
    n: float = 0.0
    sb: float = 0.0  # bytes
    se: float = 0.0  # excess ms
    sbb: float = 0.0
    sbe: float = 0.0

    def add(self, nbytes: float, excess_ms: float) -> None:
        d = self.decay
        self.n, self.sb, self.se = d * self.n + 1, d * self.sb + nbytes, d * self.se + excess_ms
        self.sbb, self.sbe = d * self.sbb + nbytes * nbytes, d * self.sbe + nbytes * excess_ms

    @property
    def bytes_per_ms(self) -> float | None:
        if self.n < 3:
            return None
        mean_b = self.sb / self.n
        var = self.sbb / self.n - mean_b * mean_b
        if mean_b <= 0 or var < (0.25 * mean_b) ** 2:  # sizes too alike to separate the two terms
            return None
        slope = (self.sbe / self.n - mean_b * self.se / self.n) / var
        return MAX_BYTES_PER_MS if slope <= 1 / MAX_BYTES_PER_MS else max(MIN_BYTES_PER_MS, 1 / slope)


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
    # the round trip of a ping to it and its pong, timed here (a tab can delay a pong, not hasten
    # it: the nonce is random): the median (the lower of the middle two) of the last RTT_WINDOW
    # pongs (rtt_samples), measured while idle too
    rtt_ms: float | None = None
    rtt_samples: deque = field(default_factory=lambda: deque(maxlen=RTT_WINDOW))
    # a decode step's round trip seen here per layer computed (the head counted as its cost in
    # layers), smoothed: what a claimed speed is held against (see Planning._trusted_costs)
    step_ms_per_layer: float | None = None
    planned_rtt_ms: float | None = None  # its round trip when the plan was last made (a material change re-plans)
    transfer: TransferFit = field(default_factory=TransferFit)  # its transfer rate, from its steps
    ping: tuple[int, float] | None = None  # (nonce, sent at) of the ping awaiting its pong
    pinged_at: float = float("-inf")
    local: bool = False
    load_progress: dict = field(default_factory=dict)  # the worker's last load_progress report
    corrections: list = field(default_factory=list)
    address: str = ""  # the peer's network address: offenses are counted against it
    probation: bool = True  # until `probation_steps` of its steps proved right and in time
    proven_steps: int = 0
    claimed_ms_per_layer: float | None = None  # what its measurement claimed (a bound, not a fact)
    measured_at: float | None = None  # when its last measurement came (at join, or again while left out)
    # a step's cost relative to `rows x ms_per_layer` (1: a prompt row costs a decode step),
    # learned from its measured multi-row steps; deadlines and prompt chunks use it
    row_cost: float = 1.0
    why: str | None = None  # why it ended (dead / quarantined), for /status
    checked_left: int = 0  # after probation: this many more of its steps are all spot-checked

    def move(self, event: str) -> None:
        """The lifecycle's next state on `event` (coordinator/lifecycle.py's table)."""
        self.state = next_state(self.worker_id, self.state, event)

    @property
    def alive(self) -> bool:
        return self.state not in ("dead", "quarantined")

    @property
    def remeasuring(self) -> bool:
        """Being measured again (left out of the plan): it has a figure from before to plan on."""
        return self.state == "measuring" and self.measured_at is not None

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
class CheckRecord:
    """A spot check in flight: a verifier recomputes what a worker answered for one session's rows
    over one layer range (or, on a trial, a worker on probation recomputes a trusted one's)."""

    worker: str  # the checked worker
    epoch: int  # its epoch when it answered
    verifier: str
    stage: int
    range: tuple  # (layer_start, layer_end)
    start: int  # the first of the answered rows the check's output covers
    claimed: object  # np.ndarray: the rows the checked worker returned
    at: float  # sent at
    worker_steps: int  # the checked worker's step count then (for the liar's event)
    kv_key: tuple  # the verifier's scratch KV this check extends
    trial: bool = False  # a probation trial's check
    deadline: float | None = None  # a tab verifier's (None: the coordinator's own worker verifies)
    rows: int = 0  # a trial check's rows (its cost)


@dataclass
class SyntheticStep:
    """A trial step of random rows sent to a worker on probation, to time it on a stage's shape."""

    worker: str
    at: float
    rows: int
    range: tuple
    deadline: float


@dataclass
class InFlightStep:
    """A step sent to a stage's primary and not yet answered (a stage has at most one)."""

    step_id: int
    worker: str
    items: list  # WorkItem, in the order their rows are stacked
    sent_at: float
    deadline: float  # past it the worker is suspect; far past it, evicted
    epoch: int  # the worker's epoch when sent: a result of another epoch is fenced off
    full_logits: bool = False  # the head returns hidden rows; the coordinator computes every logit


@dataclass
class Stage:
    index: int
    layer_start: int
    layer_end: int
    include_head: bool
    holders: list[str]  # worker ids: primary first, then warm standbys
    ready: set = field(default_factory=set)  # holders that have loaded the range
    queue: deque = field(default_factory=deque)
    inflight: InFlightStep | None = None  # the step this stage's primary is computing
    needs_rebuild: bool = False
    batch_limit: int = 16  # adapted to measured step latency (see _adapt_batch)
    decode_ms: dict = field(default_factory=dict)  # decode rows in a step -> its time, smoothed (see _adapt_batch)
    pipeline: int = 0  # the serving replica it belongs to: a session's rows stay in one pipeline
    # a pipeline of the previous plan, kept serving while the new plan's holders load (see
    # Planning._retire): it takes sessions only while no pipeline of the new plan is ready
    retiring: bool = False

    @property
    def primary(self) -> str | None:
        return self.holders[0] if self.holders else None

    def to_dict(self) -> dict:
        return {"index": self.index, "layers": [self.layer_start, self.layer_end], "head": self.include_head,
                "holders": list(self.holders), "ready": sorted(self.ready), "queued": len(self.queue),
                "busy": self.inflight is not None, "batch_limit": self.batch_limit, "pipeline": self.pipeline,
                "retiring": self.retiring}


@dataclass
class PrefixEntry:
    """A finished prompt whose KV every stage primary still holds under `cache_id`, with the
    inputs each stage received for it (so sessions forked from it can be rebuilt too)."""

    cache_id: str
    tokens: list[int]
    logs: dict  # stage index -> f32 rows [len(tokens), hidden]
    last_used: float
    workers: frozenset = frozenset()  # who computed it: a session forked from it trusts them from token 0
    pipeline: int = 0  # whose stages hold it: only a session on that pipeline can fork it


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
    pipeline: int = 0  # the serving replica its rows go through (see Planning._place)
    # a move off a retiring pipeline (Moves._start_move): the new pipeline its history is
    # replayed on in the background while it decodes where it runs, positions [0, move_sent)
    # queued there, [0, moved) through its head stage; catch_up: the first position its next
    # trip carries (the switch: the positions decoded while the replay ran go with the token)
    moving_to: int | None = None
    move_sent: int = 0
    moved: int = 0
    catch_up: int | None = None
    # the move's stages whose worker holds the session's KV of their layers in a stage of the
    # pipeline it leaves (new stage index -> that stage's index): a copy_kv gives it to them,
    # the replay stops before them (Moves._kv_copies); copies_pending: new stage index ->
    # the positions a copy_kv asked, not answered yet; copy_failed: one was refused
    move_copied: dict = field(default_factory=dict)
    copies_pending: dict = field(default_factory=dict)
    copy_failed: bool = False
    copied_to: int = 0  # the copies' positions [0, copied_to): the old pipeline had computed them
    # a move under way or called off left part of its history's KV in another range of a
    # worker: no prefix is forked from it (a worker's fork_session copies it in every range)
    partial_kv: bool = False

    @property
    def position(self) -> int:
        """Tokens whose KV the pipeline holds or is computing."""
        return len(self.prompt_ids) + max(0, len(self.tokens) - 1)


# ---------------------------------------------------------------------- coordinator
