"""Time and failure: deadlines and heartbeats (tick), a lost worker fenced by its epoch, a
stage repaired by the explicit rebuild that replays its stored inputs.

A part of the Coordinator (coordinator/state.py): its methods run on the one state machine's records."""
from __future__ import annotations

import numpy as np

from coordinator.records import LOCAL, Close, Emit, InFlightStep, Session, Stage, WorkItem, Worker


# a free worker pre-loads a suspected primary's range only if at most this many times slower a layer
PRELOAD_SLOWER_MAX = 2.0


class Recovery:
    # -- time
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
        out += self._ping_tick(now)
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
            if st.inflight and now > st.inflight.deadline:
                out += self._judge_late_step(st.inflight, st, now)
        for step_id, c in list(self._checks.items()):
            if not c.trial and c.deadline is not None and now > c.deadline:
                out += self._check_late(step_id, now)
        for f in list(self._dropped_steps.values()):
            w = self.workers.get(f.worker)
            if w is None or not w.alive or w.epoch != f.epoch:
                del self._dropped_steps[f.step_id]
            elif now > f.deadline:
                out += self._judge_late_step(f, None, now)
        self._prune_ended_workers()
        out += self._trial_tick(now)
        expired = [k for k, c in self._checks.items() if now - c.at > self.settings.spot_check_timeout_s]
        for step_id in expired:
            self._verify_kv.pop(self._checks.pop(step_id).kv_key, None)  # the verifier died or never answered
            self.counters["spot_checks_skipped"] += 1
        if expired:
            out += self._release_finishes(now)
        if self._replan_at is not None and now >= self._replan_at and not self._awaiting_resume(now):
            self._replan_at = None
            out += self._replan_tick(now)
        # requests that cannot be served fail after a bound, with a retriable error
        if not self.stages or any(not st.holders for st in self.stages):
            for s in list(self.sessions.values()):
                if now - (s.last_token_at or s.created) > self.settings.request_timeout_s:
                    self.counters["failed"] += 1
                    out.append(Emit(s.request_id, {"type": "error", "code": "no_capacity", "retriable": True,
                                                   "message": f"no workers can serve the model right now ({self.unserved_reason()}); "
                                                              "retry later"}))
                    out += self._finish(s, "error", now, emit=False)
        return out + self._pump(now)

    def _judge_late_step(self, f: InFlightStep, st: Stage | None, now: float) -> list:
        """A step past its deadline: its worker is suspect, and evicted once the step is
        suspect_evict_factor deadlines late (suspect_takeover_factor when a healthy worker holds
        the stage's range ready). st: the stage waiting on it, or None for a step no stage waits
        on any more (a re-plan or a retirement dropped it), whose worker is still computing it:
        chaos at seed 12 slowed such a step's tab 2000x and no deadline judged it: the stuck tab
        held the spot checks it was sent (streams' ends waited 61 s) and, made a standby, left a
        stage whose primary died waiting 43 s for a load queued behind the step."""
        w = self.workers[f.worker]
        if not w.alive or w.local:  # the coordinator's own compute is never evicted (nothing would replace it)
            return []
        late = now - f.sent_at
        allowed = f.deadline - f.sent_at
        takeover = (st is not None and late > allowed * self.settings.suspect_takeover_factor
                    and self._warm_holder(st, w.worker_id) is not None)
        if late > allowed * self.settings.suspect_evict_factor or takeover:
            # a step this late counts against the address (a tarpit rejoining under new
            # names meets a growing backoff); a tab still on probation is quarantined
            self.counters["slow_evictions"] += 1
            self._dropped_steps.pop(f.step_id, None)
            if w.address and not w.probation:
                self._offend(w, "a step far past its deadline", now)
            return self._worker_lost(w, now, f"step {f.step_id} {late:.1f}s late (slow worker evicted"
                                             f"{' on probation' if w.probation else ''}"
                                             f"{'; a worker holding its range ready takes its stage' if takeover else ''})", quarantine=w.probation)
        if w.state in ("ready", "loading"):  # (a re-plan may have given it a range to load since it was sent)
            w.move("missed_deadline")
            self.events.append({"t": now, "kind": "suspect", "worker": w.worker_id, "step_id": f.step_id})
        if st is not None and w.state == "suspect":  # (each tick: a worker pre-loading may have died since)
            return self._preload_standby(st, w, now)
        return []

    def _preload_standby(self, st: Stage, suspect: Worker, now: float) -> list:
        """The stage's primary is suspect and no healthy worker holds its range ready or loads
        it: a worker that serves no stage (else a standby of another stage; never a primary),
        at most PRELOAD_SLOWER_MAX times slower, with the memory for it loads the range now, as
        the stage's standby. Ready in time, it
        takes the stage at suspect_takeover_factor deadlines (_judge_late_step) where the stage
        would otherwise wait out suspect_evict_factor ones (chaos at seed 12: four slowed
        primaries, 6 s each, while free tabs waited). If the primary answers, the stage keeps
        a standby."""
        key = (st.layer_start, st.layer_end)
        if self._warm_holder(st, suspect.worker_id) is not None:
            return []
        for wid in st.holders:
            x = self.workers.get(wid)
            if wid != suspect.worker_id and x is not None and x.alive and self._loading_range(x, key):
                return []  # one is on its way
        need = self._stage_bytes(st)
        primaries = {s.primary for s in self.stages}
        # (a much slower worker is not sent: taking the stage of a primary that then answers
        # late, it would slow the stage until the next plan)
        slowest = self._trusted_costs(suspect)[0] * PRELOAD_SLOWER_MAX

        def trusted_and_fast(x: Worker) -> bool:
            ms, _, flagged = self._trusted_costs(x)
            return not flagged and ms <= slowest

        candidates = [x for x in self.workers.values()
                      if x.alive and not x.local and not x.probation and x.state in ("idle", "ready") and not x.remeasuring
                      and not x.loading and x.worker_id not in primaries and x.worker_id not in st.holders
                      and x.worker_id not in self._trials and trusted_and_fast(x) and self._has_room(x, need)]
        if not candidates:
            return []
        x = min(candidates, key=lambda c: (len(c.stages), self._ms_per_layer(c)))
        st.holders.append(x.worker_id)
        x.stages.add(st.index)
        self.events.append({"t": now, "kind": "preload", "worker": x.worker_id, "stage": st.index, "suspect": suspect.worker_id})
        return self._assign(x, st, now)

    def _check_late(self, step_id: int, now: float) -> list:
        """A tab's spot check past its deadline: the check is given up (a sample skipped; it stops
        holding sessions' "done" back) and its verifier, still computing it or never to, is
        judged by that deadline as a dropped step's worker is (_judge_late_step: suspect now,
        evicted at suspect_evict_factor deadlines, cleared by an answer). A tarpit tab made a
        verifier held every session the checked worker touched for spot_check_timeout_s."""
        c = self._checks.pop(step_id)
        self._verify_kv.pop(c.kv_key, None)  # its scratch KV may not hold these rows: the next check starts over
        self.counters["spot_checks_skipped"] += 1
        self.counters["spot_checks_late"] += 1
        self.events.append({"t": now, "kind": "check_late", "worker": c.verifier, "step_id": step_id, "checked": c.worker})
        v = self.workers.get(c.verifier)
        if v is not None and v.alive:
            self._dropped_steps[step_id] = InFlightStep(step_id, v.worker_id, [], c.at, c.deadline, v.epoch)
        return self._release_finishes(now)

    def _drop_inflight(self, st: Stage) -> None:
        """The stage stops waiting for its step in flight (its late result is ignored); the step's
        worker, still computing it, stays judged by its deadline (_judge_late_step)."""
        if st.inflight is not None and self.workers.get(st.inflight.worker) is not None and self.workers[st.inflight.worker].alive:
            self._dropped_steps[st.inflight.step_id] = st.inflight
        st.inflight = None

    # -- failure and recovery
    def _fault_in_hand(self, now: float) -> str | None:
        """The fault this machine is handling now, or None: a suspected worker, a step past its
        deadline (suspicion or eviction comes at the next tick), a stage lost and not yet
        rebuilt or no token yet since (_awaiting_recovery), a session moving between pipelines
        or not yet past its first token on the new one, a liar's tokens being recomputed. Work
        that may wait (a deferred re-plan judged again, a left-out worker measured again) waits
        for it to end: a re-plan in the middle of one reassigns the workers it is judging."""
        if any(w.alive and w.state == "suspect" for w in self.workers.values()):
            return "a suspected worker"
        if any(st.inflight is not None and now > st.inflight.deadline for st in self.stages):
            return "a step past its deadline"
        if self._awaiting_recovery or any(st.needs_rebuild for st in self.stages):
            return "a stage being recovered"
        # (_migrating may still name a session that ended on the way: its own sessions only)
        if any(s.moving_to is not None or s.request_id in self._migrating for s in self.sessions.values()):
            return "a session moving"
        if any(s.unconfirmed for s in self.sessions.values()):
            return "a liar's tokens being recomputed"
        return None

    def _offend(self, w: Worker, reason: str, now: float) -> None:
        """An offense of a joined worker: it counts against its address (Backoff) and revokes its
        pass (Standing), together, wherever it is found."""
        if w.address:
            self.backoff.offend(w.address, reason, now)
        self.standing.revoke(w.worker_id)

    def _worker_lost(self, w: Worker, now: float, reason: str, quarantine: bool = False) -> list:
        """Fence the worker (its epoch dies with it) and repair every stage it served."""
        w.move("quarantined" if quarantine else "lost")
        w.ended_at = now
        w.why = reason[:200]
        if quarantine:
            self._offend(w, reason, now)
        else:
            self.standing.seen(w.worker_id, now)  # gone in good standing (unless revoked before)
        self._trials.pop(w.worker_id, None)
        for step_id in [k for k, c in self._synthetic.items() if c.worker == w.worker_id]:
            del self._synthetic[step_id]
        for step_id in [k for k, c in self._checks.items() if c.verifier == w.worker_id]:
            del self._checks[step_id]  # it will not answer: its checks stop holding sessions back
            self.counters["spot_checks_skipped"] += 1
        self._forget_verify_kv(lambda k: k[2] == w.worker_id)
        self.events.append({"t": now, "kind": "quarantine" if quarantine else "death", "worker": w.worker_id,
                            "reason": reason, "last_seen_s": now - w.last_seen})
        out = []
        if w.conn in self.conn_worker:
            self.conn_worker.pop(w.conn, None)
            out.append(Close(w.conn, 4000, f"fenced: {reason}"[:120]))
        if any(st.retiring and w.worker_id in st.holders for st in self.stages):
            # the old plan's pipelines go; their sessions restart on the new one, and the next
            # token says how long that recovery took, as for any primary lost
            self._awaiting_recovery += [(st.index, now, w.worker_id) for st in self.stages if st.retiring and st.primary == w.worker_id]
            out += self._retire(now, lost=True)
        for s in self.sessions.values():
            if self._move_at_risk(s, w):
                self._call_off_move(s)
        for st in self.stages:
            if w.worker_id not in st.holders:
                continue
            was_primary = st.primary == w.worker_id
            st.holders.remove(w.worker_id)
            st.ready.discard(w.worker_id)
            if was_primary:
                self._await_recovery(st, now, w.worker_id)
                out += self._forget_prefixes()  # part of their KV died with this stage
                out += self._repair_stage(st, now)
        w.stages = set()
        if not any(x.alive and not x.local for x in self.workers.values()):
            self.degraded = True
        self._schedule_replan(now)
        return out + self._release_finishes(now)

    def _warm_holder(self, st: Stage, besides: str | None = None) -> str | None:
        """A worker in good health (alive, not suspected, trusted; not `besides`) that holds the
        stage's range ready: a standby of the stage first, else a primary of another pipeline
        serving the same range (a replica). Losing the primary, the stage goes to it
        (_repair_stage) and replays its sessions there at once, with nothing to load: "serving
        while tabs load" (a fresh holder the re-plan that follows chooses loads meanwhile)."""
        def healthy(wid: str) -> bool:
            w = self.workers.get(wid)
            return (wid != besides and w is not None and w.alive and not w.local and w.state != "suspect"
                    and not w.probation)

        standby = next((wid for wid in st.holders if wid in st.ready and healthy(wid)), None)
        if standby is not None:
            return standby
        key = (st.layer_start, st.layer_end)
        return next((wid for wid in self.workers if healthy(wid) and self._serves_range(wid, key)), None)

    def _await_recovery(self, st: Stage, now: float, lost: str) -> None:
        """The stage lost its primary: the next token recovers it, if a session waits on its
        pipeline (decodes on it or moves to it). With none, the next token came whenever a client
        next sent a request (churn at seed 21 counted 12.9 s in which no request ran as a stage's
        recovery, in the report and in tabshard_recovery_seconds). `lost`: the primary lost, which
        the "recovered" event names (a fault is matched to its own tab's recovery)."""
        if any(not s.finished and st.pipeline in (s.pipeline, s.moving_to) for s in self.sessions.values()):
            self._awaiting_recovery.append((st.index, now, lost))

    def _move_at_risk(self, s: Session, w: Worker) -> bool:
        """Whether losing `w` harms the session's move (then _worker_lost calls it off before
        repairing stages): `w` is a primary of the pipeline it moves to or decodes on. That
        stage's repair (_rebuild) replays the session's log there, the move's rows among them,
        from position 0 on a new primary, maybe a warm standby that holds the same range for
        the other of the two pipelines: its one KV cache of the range would be cut. A worker
        that holds a stage of a retiring pipeline has had them all retired already, their
        sessions restarted (_retire, lost); a standby's loss takes it off the holders only; a
        stage of another pipeline replays other sessions' logs."""
        return s.moving_to is not None and any(st.primary == w.worker_id for st in self.stages
                                               if st.pipeline in (s.pipeline, s.moving_to))

    def _repair_stage(self, st: Stage, now: float) -> list:
        """Give the stage a new primary (a warm standby if any, else the least loaded live
        worker that can hold it, else the coordinator itself) and rebuild its KV caches."""
        st.needs_rebuild = True
        if st.primary not in st.ready:
            # a worker holding the range ready goes first: nothing to load before the replay
            warm = self._warm_holder(st)
            if warm is not None:
                if warm in st.holders:
                    st.holders.remove(warm)
                st.holders.insert(0, warm)
        if st.inflight is not None:
            # the lost step's inputs are in the logs: the replay recomputes them and forwards
            # exactly the rows the lost step would have forwarded
            for it in st.inflight.items:
                self._inflight_lost[(st.index, it.session_id)] = (it.forward_from, it.wants_token, it.draft)
            st.inflight = None
        if st.primary is None:
            need = self._stage_bytes(st)
            # a worker being measured again is one too, on its last figure: its answer (which it
            # sends before it loads) is taken when it comes, and the stage does not wait for it
            candidates = [w for w in self._live_workers(remeasuring=True) if not w.local and self._has_room(w, need)]
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
        key = (st.layer_start, st.layer_end)
        if self._serves_range(w.worker_id, key):  # in another pipeline (a replica, or a retiring one)
            st.ready.add(w.worker_id)
        if st.primary in st.ready:
            return self._rebuild(st, now)
        if self._loading_range(w, key):  # (maybe for another pipeline already)
            return []
        if w.local:  # a fresh backend of the range holds none of the verifier's scratch KV of it
            self._forget_verify_kv(lambda k: k[1] == key and k[2] == LOCAL)
        return self._assign(w, st, now)

    def _stage_bytes(self, st: Stage) -> int:
        return sum(self.blob_info[k].size for k in self._stage_blobs(st))

    def _held_bytes(self, w: Worker) -> int:
        held = {(self.stages[i].layer_start, self.stages[i].layer_end): self.stages[i] for i in w.stages if i < len(self.stages)}
        return sum(self._stage_bytes(st) for st in held.values())

    def _has_room(self, w: Worker, need: int) -> bool:
        """Whether `w`'s memory holds `need` more bytes of packed weights beside its stages' ranges."""
        cap = w.capacity()
        return cap.memory_bytes / cap.expansion >= need + self._held_bytes(w)

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
