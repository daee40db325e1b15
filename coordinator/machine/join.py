"""Joins: a worker's hello (token, resume), its speed measurement, heartbeats, its refusals, its
leaving, and the errors it reports. Owns the worker registry's entries (Worker records).

A part of the Coordinator (coordinator/state.py): its methods run on the one state machine's records."""
from __future__ import annotations

import statistics

from coordinator.planner import DEFAULT_RTT_MS
from coordinator.records import LOCAL, Close, Send, Worker
from protocol import wire


# how often each worker's round trip is timed (a ping is ~20 bytes each way)
PING_INTERVAL_S = 1.0
# a worker left out of the plan is measured again, while a re-plan waits to be judged, once its
# last measurement is this old: a busy host only ever inflates a measurement (others' work counted
# in its wall time), and a stale slow figure would keep a faster tab unused for good; each one builds
# a layer and times measure_tokens steps on a host that may share cores with serving tabs, so not at
# every retry (planning.REPLAN_RETRY_S)
REMEASURE_AFTER_S = 15.0


class Join:
    # -- join
    def _on_hello(self, conn: str, m: dict, now: float) -> list:
        if self.join_token and m.get("token") != self.join_token and conn != LOCAL:
            self.counters["rejected_joins"] += 1
            return [Send(conn, wire.make("error", code="bad_token", field="token", message="wrong or missing join token")),
                    Close(conn, 1008, "bad join token")]
        if conn in self.conn_worker:
            return [Send(conn, wire.make("error", code="already_joined", field="type", message="hello sent twice"))]
        address = self.conn_address.get(conn, "")
        presented = self.conn_standing.pop(conn, None)
        if conn != LOCAL and self.backoff.wait(address, now) > 0 and not self.standing.admits(presented, address, now):
            return self.on_connect(conn, address, now)  # an offense on another socket since this one opened
        wid = LOCAL if conn == LOCAL else f"w{next(self._ids)}"
        # the schema bounded every field (names, sizes, numbers finite and in range): stored as is
        w = Worker(conn, wid, m["worker_name"], dict(m["capabilities"]), next(self._epoch), now, now, local=conn == LOCAL,
                   address=address, probation=conn != LOCAL and self.settings.probation_steps > 0)
        w.have_blobs = set((m.get("resume") or {}).get("have") or [])
        self.workers[wid] = w
        self.conn_worker[conn] = wid
        if self._first_join_at is None and conn != LOCAL:
            self._first_join_at = now
        w.move("hello")
        self.events.append({"t": now, "kind": "join", "worker": wid, "name": w.name})
        welcome = {}
        if conn != LOCAL:
            welcome["standing"] = self.standing.issue(wid, address, now, presented)
            if presented and welcome["standing"] == presented:
                self.counters["passes_carried"] += 1  # a tab rejoined with the pass it had
            if not w.probation:  # no probation here (probation_steps 0): every worker is in good standing
                self.standing.earn(wid, now)
        return [
            Send(conn, wire.make("welcome", worker_id=wid, heartbeat_ms=self.settings.heartbeat_ms, epoch=w.epoch, **welcome)),
            Send(conn, self._measure_message()),
        ]

    def _measure_message(self) -> dict:
        return wire.make("measure", model=self.config.to_dict(), tokens=self.settings.measure_tokens, layers=1)

    def _on_measurement(self, w: Worker, m: dict, now: float) -> list:
        # a measurement again replaces the last one, not combined with it: the planner counts on
        # the speed now (a host can get busier too: a minimum would keep the luckiest figure for
        # good), and within one measurement the fastest step already drops preempted ones
        w.ms_per_layer = max(float(m["step_ms"]), 1e-3)
        w.measured_at = now
        w.claimed_ms_per_layer = w.ms_per_layer
        details = m.get("details") or {}
        w.caps["measurement"] = details  # e.g. a browser tab's measured engines and its choice
        if isinstance(details.get("backend"), str):
            w.caps["backend"] = details["backend"]
        if isinstance(details.get("expansion"), (int, float)):
            w.caps["expansion"] = float(details["expansion"])
        if w.state == "measuring":
            w.move("measured")
        self._schedule_replan(now)
        return []

    def _remeasure_left_out(self, now: float) -> list:
        """`measure` again to each trusted remote worker the plan left out (it holds no range,
        loads none, is on no trial, verifies no check) whose last measurement is
        REMEASURE_AFTER_S old: it computes for no stream, so a running one pays nothing. It is
        out of plans until it answers (measuring), and the answer re-plans; a stage lost
        meanwhile may take it at once (Recovery._repair_stage). None while a fault
        is handled (_fault_in_hand): the answer's re-plan would land in it. Not a worker whose
        figures are flagged as absurd, nor one whose memory (shrunk by a memory-pressure
        report) holds none of the running plan's ranges: a new figure would not plan it in."""
        if self._fault_in_hand(now):
            return []
        verifying = {c.verifier for c in self._checks.values()}
        ranges = {(st.layer_start, st.layer_end, st.include_head) for st in self.stages if not st.retiring}
        out = []
        for w in self.workers.values():
            if (w.alive and not w.local and not w.probation and w.state in ("idle", "ready") and not w.stages and not w.loading
                    and w.worker_id not in self._trials and w.worker_id not in verifying and not self._trusted_costs(w)[2]
                    and any(self._fits(w.worker_id, *r) for r in ranges)
                    and w.measured_at is not None and now - w.measured_at >= REMEASURE_AFTER_S):
                w.move("remeasure")
                self.events.append({"t": now, "kind": "remeasure", "worker": w.worker_id, "ms_per_layer": w.ms_per_layer})
                out.append(Send(w.conn, self._measure_message()))
        return out

    def _on_heartbeat(self, w: Worker, m: dict, now: float) -> list:
        return []

    def _ping_tick(self, now: float) -> list:
        """A ping to each joined remote worker every PING_INTERVAL_S, one outstanding at a time
        (one that is never answered is replaced: silence is the heartbeats' to judge)."""
        out = []
        for w in self.workers.values():
            if w.alive and not w.local and w.state != "joining" and now - w.pinged_at >= PING_INTERVAL_S:
                w.ping = (self._nonces.getrandbits(31), now)
                w.pinged_at = now
                out.append(Send(w.conn, wire.make("ping", nonce=w.ping[0])))
        return out

    def _on_pong(self, w: Worker, m: dict, now: float) -> list:
        if w.ping is None or m["nonce"] != w.ping[0]:
            return []  # not the ping outstanding (a late or made-up pong): nothing to time
        rtt = (now - w.ping[1]) * 1000
        w.ping = None
        w.rtt_samples.append(rtt)
        w.rtt_ms = statistics.median_low(w.rtt_samples)
        if self._rtt_moved(w):
            w.planned_rtt_ms = w.rtt_ms  # (once per move: the re-plan keeps the plan unless it gains)
            self._schedule_replan(now)
        return []

    def _rtt_moved(self, w) -> bool:
        """A material change of a planned worker's round trip since the plan was made: twice or
        half what the plan counted on (its default before the first pong), and 5 ms apart."""
        if not w.stages or w.local:
            return False
        was = w.planned_rtt_ms if w.planned_rtt_ms is not None else DEFAULT_RTT_MS
        return abs(w.rtt_ms - was) > 5.0 and not (was / 2 <= w.rtt_ms <= was * 2)

    def _on_bye(self, w: Worker, m: dict, now: float) -> list:
        self.conn_worker.pop(w.conn, None)
        return self._worker_lost(w, now, f"left: {m['reason']}") + [Close(w.conn, 1000, "bye")]

    def _on_error(self, w: Worker, m: dict, now: float) -> list:
        self.events.append({"t": now, "kind": "worker_error", "worker": w.worker_id, "code": m["code"], "message": m["message"]})
        check = self._checks.pop(m.get("step_id"), None)
        if check is not None:  # the verifier could not run the check (e.g. its range was unloaded)
            self.counters["spot_checks_skipped"] += 1
            self._verify_kv.pop(check.kv_key, None)  # the next check of it starts from position 0
            if m.get("code") == "not_assigned":
                self._verify_ranges.pop(check.range, None)
            return self._release_finishes(now)
        # an error about a step means that step will never be answered: treat the stage as failed
        for st in self.stages:
            if st.inflight and st.inflight.worker == w.worker_id and m.get("step_id") == st.inflight.step_id:
                return self._worker_lost(w, now, f"step failed: {m['message']}")
        return []

    def _on_refuse(self, w: Worker, m: dict, now: float) -> list:
        self.events.append({"t": now, "kind": "refused", "worker": w.worker_id, "reason": m["reason"], "detail": m.get("detail")})
        detail = m.get("detail") or {}
        aid = detail.get("assignment_id")
        if aid in w.loading:
            stage_index, _ = w.loading.pop(aid)
            if stage_index < len(self.stages):
                key = (self.stages[stage_index].layer_start, self.stages[stage_index].layer_end)
                # the range is refused in every pipeline it was to serve
                refused = [st for st in self.stages if (st.layer_start, st.layer_end) == key and w.worker_id in st.holders]
                for st in refused:
                    st.holders.remove(w.worker_id)
                    w.stages.discard(st.index)
                w.stages.discard(stage_index)
                # the planner now knows this worker's real limit
                w.caps["memory_bytes"] = int((m.get("detail") or {}).get("budget", 0))
                # a tab on trial still loading its trial range stays loading, that load's deadline
                # kept, until _on_trial_ready (as a stage's `ready` before its trial's leaves it)
                if not self._loads_out(w):
                    w.load_deadline = None
                    if w.state == "loading":
                        w.move("refused" if not w.stages else "refused_holding")
                out = []
                for st in refused or [self.stages[stage_index]]:
                    out += self._repair_stage(st, now) if st.primary is None or st.primary not in st.ready else []
                return out
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
        self._await_recovery(st, now, w.worker_id)
        return self._forget_prefixes() + self._repair_stage(st, now)
