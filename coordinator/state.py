"""The coordinator as a pure state machine: fed decoded messages and the time, it returns actions.

Everything that decides anything lives in this machine: joins and speed measurement, the plan, weight
streaming, the pipelined scheduler (batching across sessions), spot checks and probation, failure
detection, fencing and the explicit rebuild of a dead stage by replaying its stored inputs. The
asyncio server (server.py) only moves bytes and clocks in and out; tests drive this class directly.

One Coordinator, composed of sub-machines with one owner each (coordinator/machine/): Join,
Planning, Moves (sessions moving off a retiring pipeline), WeightStreaming, Sessions (and the prefix cache), Scheduler (and speculation),
Verification (spot checks), Trials (probation, liar recomputation), Recovery (time, failure,
rebuild). Their records are typed (coordinator/records.py); a worker's lifecycle is one
(state, event) table (coordinator/lifecycle.py). Here: the records they share, the connections
and the message dispatch, and /status.

A session's token path: submit -> embed (here) -> stage 0 ... stage N-1 (head: top-k) ->
sample (here) -> emit -> embed the new token -> stage 0 ...
"""
from __future__ import annotations

import itertools
import random
from collections import deque

from coordinator.machine.join import Join
from coordinator.machine.moves import Moves
from coordinator.machine.planning import Planning
from coordinator.machine.recovery import Recovery
from coordinator.machine.scheduler import Scheduler
from coordinator.machine.sessions import Sessions
from coordinator.machine.trials import Trials
from coordinator.machine.verify import Verification
from coordinator.machine.weights import WeightStreaming
from coordinator.records import (CheckRecord, Close, CoordinatorSettings, InFlightStep, ParkedTrip, PrefixEntry, Send,
                                Session, Stage, SyntheticStep, Worker)
from coordinator.security import Backoff, Standing
from coordinator.speculation import make_speculator
from protocol import wire
from protocol.blobs import blob_info
from protocol.format import ProtocolError
from protocol.model_types import ModelConfig


class Coordinator(Join, Planning, Moves, WeightStreaming, Sessions, Scheduler, Verification, Trials, Recovery):
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
        self._chunk_digests: dict[str, list[str]] = {}  # blob sha256 -> its chunks' (see _weight_chunks)
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
                         "prefix_hits": 0, "prefix_tokens_reused": 0, "kv_copies": 0, "kv_copies_failed": 0,
                         "spot_checks": 0, "spot_checks_skipped": 0, "spot_checks_late": 0, "spot_check_mismatches": 0,
                         "tokens_confirmed": 0, "tokens_retracted": 0, "load_timeouts": 0,
                         "backoff_refusals": 0, "standing_admits": 0, "passes_carried": 0, "trial_steps": 0, "probations_passed": 0, "slow_evictions": 0,
                         # speculation by a worker's draft model: trips that waited for its drafts, went
                         # without them (its deadline or death), and its answers after the deadline
                         "drafts_asked": 0, "drafts_missed": 0, "late_drafts_ignored": 0,
                         # decode steps' round trips seen here and the compute their workers report (ms)
                         "decode_step_ms": 0.0, "decode_compute_ms": 0.0}
        self._holding_finishes = False  # set while a liar is being fenced (see _on_liar)
        self._awaiting_recovery: list[tuple[int, float, str]] = []  # (stage, detected at, the primary lost) until the next token
        self._inflight_lost: dict[tuple[int, str], tuple] = {}  # (stage, session) -> (forward_from, wants_token, draft)
        # steps still computing on a live worker whose stage no longer waits for them (a re-plan
        # or a retirement dropped it): judged late like any step (Recovery._judge_late_step)
        self._dropped_steps: dict[int, InFlightStep] = {}
        self._last_tick: float | None = None
        # sessions moving from a retiring pipeline to the new plan -> whether the move computes
        # nothing on a retiring pipeline's worker (see _retire)
        self._migrating: dict[str, bool] = {}
        self._deferred_replan = False  # a new plan that did not pay for moving running sessions (see Recovery.tick)
        self.degraded = False
        self._nonces = random.Random()  # seeded from the OS: a tab cannot guess its next ping
        self.plan_notes: dict[str, str] = {}  # worker -> its place in the last plan made, or why it is off the critical path
        self.plan_why: dict[str, str] = {}  # worker -> why the last plan left it off every critical path (see plan_role)
        self.plan_error: str | None = None  # the last plan's failure (a resource short), until a plan succeeds
        self.prefix_cache: dict[str, PrefixEntry] = {}
        self._first_join_at: float | None = None
        self._spot_rng = random.Random(settings.spot_check_seed)
        self._checks: dict[int, CheckRecord] = {}  # verification step id -> what the checked worker answered
        self._verify_ranges: dict[tuple, str] = {}  # (layer_start, layer_end) on LOCAL -> loading | ready
        self._verify_assign: dict[int, tuple] = {}  # assignment id -> range, for LOCAL's verify ranges
        self._verify_parked: dict[tuple, list] = {}  # range -> check messages waiting for LOCAL to load it
        # (session, range, verifier) -> (positions the verifier's scratch KV holds, the session's
        # log epoch then): a later check of that session sends only the rows since
        self._verify_kv: dict[tuple, tuple[int, int]] = {}
        self.backoff = Backoff(settings.backoff_base_s, settings.backoff_max_s, settings.backoff_forgive_s)
        self.conn_address: dict[str, str] = {}  # worker connection -> peer address
        # passes of tabs in good standing (security.Standing): they rejoin while their address is
        # backed off for another tab's offenses; a connection's presented pass, until its hello
        self.standing = Standing(settings.backoff_forgive_s)
        self.conn_standing: dict[str, str] = {}
        # workers on trial: worker id -> {"range", "assignment_id", "ready", "check": step id or None}
        self._trials: dict[str, dict] = {}
        self._trial_assign: dict[int, str] = {}  # assignment id -> worker id, for trial ranges
        self._synthetic: dict[int, SyntheticStep] = {}  # step id -> a synthetic trial step in flight
        # rows [n, hidden] of the last stage's output -> the whole vocabulary's logits [n, vocab],
        # computed here for sessions whose chooser needs them (the adapter sets it; None: none can)
        self.head_logits = None
        # draft: the DraftModel of settings.speculation "draft-model"; without one, a worker's drafts
        self.speculation = make_speculator(settings.speculation, settings.speculation_max_k, draft)
        self._trip_more: set[str] = set()  # sessions whose trip still has rows to decide (see _verify_drafts)
        self._parked: dict[int, ParkedTrip] = {}  # trip id -> a trip waiting for a worker's drafts
        self._late_trips: dict[int, str] = {}  # trip id -> drafter, trips that went without its drafts (recent)
        self._draft_sends: list[Send] = []  # `draft` requests for the next pump to send
        self._copy_sends: list[Send] = []  # a move's `copy_kv` requests for the next pump to send

    # -- connections
    def on_disconnect(self, conn: str, now: float, reason: str = "closed") -> list:
        self.conn_address.pop(conn, None)
        self.conn_standing.pop(conn, None)
        wid = self.conn_worker.pop(conn, None)
        if wid is None:
            return []
        w = self.workers[wid]
        if not w.alive:
            return []
        return self._worker_lost(w, now, f"socket {reason}")

    def on_connect(self, conn: str, address: str, now: float, standing: str | None = None) -> list:
        """A worker socket opened from `address`, presenting the pass `standing` (or None):
        refused while that address is backed off, unless the pass is of a tab in good standing
        there (security.Standing)."""
        wait = self.backoff.wait(address, now)
        if wait > 0 and self.standing.admits(standing, address, now):
            self.counters["standing_admits"] += 1
        elif wait > 0:
            self.counters["backoff_refusals"] += 1
            reason = f"joins from this address are refused for {wait:.0f} more s ({self.backoff.records[address]['reason']})"
            return [Send(conn, wire.make("error", code="backoff", field=None, message=reason, retry_after_s=round(wait, 3))),
                    Close(conn, 1008, reason[:120])]
        self.conn_address[conn] = address
        if standing:
            self.conn_standing[conn] = standing
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
            return [Send(conn, wire.make("error", code="not_joined", field="type", message="send hello first")), Close(conn, 1008, "not joined")]
        w = self.workers[wid]
        if not w.alive:
            return []
        w.last_seen = now
        handler = getattr(self, f"_on_{m['type']}", None)
        if handler is None:
            err = ProtocolError("unknown_type", f"a coordinator does not accept {m['type']!r} from a worker", "type")
            return self.on_protocol_error(conn, err, now)
        return handler(w, m, now) or []

    # -- status
    def status(self, now: float) -> dict:
        return {
            "model": {"layers": self.config.n_layers, "hidden": self.config.hidden, "vocab": self.config.vocab},
            "plan_version": self.plan_version,
            "degraded": self.degraded or any(not s.holders for s in self.stages) or not self.stages,
            "unserved_reason": self.unserved_reason(),  # the resource short (memory, workers), or None
            "stages": [s.to_dict() for s in self.stages],
            # ranges the coordinator's own worker holds to recompute sampled steps: loading | ready
            "verifier_ranges": [[k[0], k[1], v] for k, v in sorted(self._verify_ranges.items())],
            "workers": [{
                "worker_id": w.worker_id, "name": w.name, "state": w.state, "local": w.local,
                "address": w.address,  # where its socket came from: joins are backed off per address
                "backend": w.caps.get("backend"), "kind": w.caps.get("kind"), "adapter": w.caps.get("adapter"),
                "profile": w.caps.get("profile"), "memory_bytes": w.caps.get("memory_bytes"),
                "ms_per_layer": round(w.ms_per_layer, 3), "stages": sorted(w.stages), "steps": w.steps,
                "last_step_ms": w.last_step_ms, "heartbeat_age_ms": int((now - w.last_seen) * 1000),
                "transport_ms": None if w.transport_ms is None else round(w.transport_ms, 3),
                "rtt_ms": None if w.rtt_ms is None else round(w.rtt_ms, 3),
                # its transfer rate as its steps show it (None: not measured yet: the planner assumes 100 Mbit/s)
                "bandwidth_mbit_s": None if w.transfer.bytes_per_ms is None else round(w.transfer.bytes_per_ms * 8e-3, 1),
                "compute_ms": None if w.compute_ms is None else round(w.compute_ms, 3),
                # its decode steps' round trip per layer as one stream's (what placement counts on)
                "step_ms_per_layer": None if w.step_ms_per_layer is None else round(w.step_ms_per_layer, 3),
                "weight_bytes_sent": w.bytes_sent, "loading": len(w.loading), "epoch": w.epoch,
                "corrections": list(w.corrections),
                "load_progress": w.load_progress, "capabilities": w.caps,
                "probation": w.probation, "proven_steps": w.proven_steps, "row_cost": round(w.row_cost, 4),
                "trial": list(self._trials[w.worker_id]["range"]) if w.worker_id in self._trials else None,
                "why": w.why,
                "plan": self.plan_role(w),  # its role, or why it is off the critical path
                "flagged": self._trusted_costs(w)[2] if w.alive else None,  # measurements clamped, and why
            } for w in self.workers.values()],
            "sessions": [{"request_id": s.request_id, "prompt_tokens": len(s.prompt_ids), "tokens": len(s.tokens),
                          "max_tokens": s.max_tokens, "pipeline": s.pipeline,
                          "speculation": self.speculation.session_status(s.request_id)}
                         for s in self.sessions.values()],
            # acceptance rate and tokens per trip, over all sessions since the start
            "speculation": self.speculation.status(),
            "counters": dict(self.counters),
            "backoff": self.backoff.snapshot(now),  # addresses whose joins are refused, and why
            "events": list(self.events)[-50:],
        }
