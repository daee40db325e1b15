"""GET /metrics: the coordinator in Prometheus' text format, with prometheus-client.

Three sources, none of which adds work to the state machine:
- the HTTP handlers count requests by endpoint and status (`request`);
- an observer of the coordinator's actions times tokens as they are emitted (time to first
  token from the request's arrival, the gap between tokens of one request) and counts them;
- a collector reads the coordinator at scrape time: queue depth, sessions, workers by state,
  its counters (steps, spot checks, tokens retracted, weight bytes) and the bytes sent on
  worker sockets; detections, recoveries and rewinds are counted as the state machine records
  them in its event log (which keeps only the latest 500, so it is counted on append).

Each app has its own registry, so several coordinators in one process (tests) do not mix.
"""
from __future__ import annotations

from collections import Counter as Tally
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.responses import Response

from coordinator.lifecycle import STATES

from coordinator.records import Emit

# the *_created series would double the output, and nothing here reads them
disable_created_metrics()

DETECTIONS = ("silent", "suspect", "liar_detected", "load_timeout")
# core.counters exported as counters: name in the coordinator -> (metric name, help)
CORE_COUNTERS = {
    "steps": ("tabshard_steps", "pipeline steps sent to workers"),
    "spot_checks": ("tabshard_spot_checks", "steps recomputed by a trusted worker and compared"),
    "spot_checks_skipped": ("tabshard_spot_checks_skipped", "sampled steps that could not be checked"),
    "spot_checks_late": ("tabshard_spot_checks_late", "spot checks a verifying tab left past their deadline (also skipped)"),
    "spot_check_mismatches": ("tabshard_spot_check_mismatches", "spot checks that caught a wrong result"),
    "tokens_retracted": ("tabshard_tokens_retracted", "streamed tokens withdrawn by a rewind"),
    "tokens_confirmed": ("tabshard_tokens_confirmed", "streamed tokens recomputed and found the same"),
    "weight_bytes_sent": ("tabshard_weight_bytes_sent", "weight blob bytes sent to workers"),
    "prefix_hits": ("tabshard_prefix_cache_hits", "requests that forked a cached prompt prefix"),
    "protocol_errors": ("tabshard_protocol_errors", "malformed or illegal worker messages"),
    "completed": ("tabshard_sessions_completed", "sessions that finished"),
    "failed": ("tabshard_sessions_failed", "sessions that failed"),
    "cancelled": ("tabshard_sessions_cancelled", "sessions cancelled (client gone, stop string)"),
}


class _CountingEvents(deque):
    """The coordinator's event log, counting every event by kind as it is appended."""

    def __init__(self, items, maxlen: int | None, tally: Tally):
        super().__init__(items, maxlen)
        self.tally = tally

    def append(self, ev) -> None:
        self.tally[ev.get("kind")] += 1
        if ev.get("kind") == "recovered" and self.on_recovered is not None:
            self.on_recovered(ev.get("recovery_s", 0.0))
        super().append(ev)

    on_recovered = None


class Metrics:
    def __init__(self, service):
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tabshard_requests", "API requests by endpoint and HTTP status", ["endpoint", "status"],
                                registry=r)
        self.tokens = Counter("tabshard_tokens", "tokens by kind (prompt tokens admitted, completion tokens streamed)",
                              ["kind"], registry=r)
        self.ttft = Histogram("tabshard_time_to_first_token_seconds", "from a request's admission to its first token",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.itl = Histogram("tabshard_inter_token_seconds", "between consecutive tokens of one request",
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5), registry=r)
        self.recovery = Histogram("tabshard_recovery_seconds", "from a failure's detection to the next token",
                                  buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=r)
        self._last_token: dict[str, float] = {}
        self.tally: Tally = Tally()
        core = service.core
        if isinstance(core.events, deque):
            events = _CountingEvents(core.events, core.events.maxlen, self.tally)
            events.on_recovered = self.recovery.observe
            core.events = events
        service.observers.append(self._observe)
        r.register(_CoreCollector(self))

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def _observe(self, actions: list, now: float) -> None:
        for a in actions:
            if not isinstance(a, Emit):
                continue
            kind = a.event.get("type")
            rid = a.request_id
            if kind == "token":
                self.tokens.labels("completion").inc()
                last = self._last_token.get(rid)
                if last is None:
                    client = self.service.clients.get(rid)
                    if client is not None:
                        self.ttft.observe(max(0.0, now - client.created))
                        self.tokens.labels("prompt").inc(client.prompt_tokens)
                else:
                    self.itl.observe(max(0.0, now - last))
                self._last_token[rid] = now
            elif kind in ("done", "error"):
                self._last_token.pop(rid, None)

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class _CoreCollector:
    """What the coordinator holds, read at scrape time."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def describe(self):
        return []

    def collect(self):
        service = self.m.service
        core = service.core
        queued = GaugeMetricFamily("tabshard_queue_depth", "work items waiting per pipeline stage", labels=["stage"])
        for st in core.stages:
            queued.add_metric([str(st.index)], len(st.queue))
        yield queued
        yield GaugeMetricFamily("tabshard_sessions_running", "generation sessions in progress", value=len(core.sessions))
        states = Tally(w.state for w in core.workers.values())
        workers = GaugeMetricFamily("tabshard_workers", "workers by state (ended ones as long as they are kept)",
                                    labels=["state"])
        for state in STATES:
            workers.add_metric([state], states.get(state, 0))
        yield workers
        degraded = core.degraded or not core.stages or any(not s.holders for s in core.stages)
        yield GaugeMetricFamily("tabshard_degraded", "1 when a stage has no worker or runs on the coordinator for "
                                "want of tabs", value=int(degraded or _on_coordinator(core)))
        for key, (name, doc) in CORE_COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=core.counters.get(key, 0))
        det = CounterMetricFamily("tabshard_detections", "worker failures detected, by kind", labels=["kind"])
        for kind in DETECTIONS:
            det.add_metric([kind], self.m.tally.get(kind, 0))
        yield det
        yield CounterMetricFamily("tabshard_recoveries", "stages that served a token again after a failure",
                                  value=self.m.tally.get("recovered", 0))
        yield CounterMetricFamily("tabshard_rewinds", "streams rewound after a liar was caught",
                                  value=self.m.tally.get("rewind", 0))
        yield CounterMetricFamily("tabshard_worker_bytes_sent", "bytes sent on worker sockets (tabs)",
                                  value=getattr(service, "bytes_to_workers", 0))
        refusals = CounterMetricFamily("tabshard_refusals", "requests and connections refused, by reason", labels=["reason"])
        for reason, n in service.refusals.items():
            refusals.add_metric([reason], n)
        yield refusals


def _on_coordinator(core) -> bool:
    """Whether a stage runs on the coordinator's own compute although tabs have joined (one
    left, and the coordinator took its layers over), or is held by a worker no longer alive."""
    from coordinator.records import LOCAL

    tabs_joined = any(not w.local for w in core.workers.values())
    held_by_dead = any(not (core.workers.get(h) and core.workers[h].alive) for st in core.stages for h in st.holders[:1])
    return held_by_dead or (tabs_joined and any(LOCAL in st.holders[:1] for st in core.stages))
