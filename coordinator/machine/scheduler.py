"""The pipelined scheduler: batching work items across sessions per stage, sending steps,
taking their results, a token's sampling and emission, speculative trips' drafts.

A part of the Coordinator (coordinator/state.py): its methods run on the one state machine's records."""
from __future__ import annotations

from collections import deque

import numpy as np

from coordinator.machine.planning import STREAM_COST
from coordinator.records import Emit, InFlightStep, ParkedTrip, Send, Session, Stage, WorkItem, Worker
from coordinator.speculation import Draft, decide_trip
from kernels.reference import topk
from model.sampling import CANDIDATES, Sampler
from protocol import wire
from protocol.format import ProtocolError
from protocol.messages import MAX_CONTEXT


class Scheduler:
    # -- the scheduler
    def _pump(self, now: float) -> list:
        out, self._copy_sends = self._copy_sends, []  # a move's copy_kv requests (Moves._send_copy)
        out += self._draft_traffic(now)
        # pipeline micro-batches: sessions go in at most `pipeline_groups` groups (0: one per
        # stage), so a stage works on one group while the next works on another instead of one
        # big batch walking the stages together with all but one stage idle
        pipes = self._pipelines()
        bound: dict[int, int] = {}
        for s in self.sessions.values():
            bound[s.pipeline] = bound.get(s.pipeline, 0) + 1
            if s.moving_to is not None:  # its replay's rows go beside the decode rows there
                bound[s.moving_to] = bound.get(s.moving_to, 0) + 1
        for st in self.stages:
            depth = len(pipes[st.pipeline])
            groups = self.settings.pipeline_groups or depth
            group = max(1, -(-bound.get(st.pipeline, 0) // max(1, min(groups, depth))))
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

    @staticmethod
    def _log_input(s: Session, stage: int, start_pos: int, rows: np.ndarray) -> None:
        """Log rows as the stage's input from start_pos on. A stage's log is in position order:
        rows sent again from a position (a rebuild's replay, a rolled-back trip) replace the
        entries from there on, popped from its end (a copy of the whole log at every step cost
        a stream's length each token)."""
        log = s.logs.setdefault(stage, [])
        while log and log[-1][0] >= start_pos:
            log.pop()
        log.append((start_pos, rows))

    def _send_step(self, st: Stage, w: Worker, items: list[WorkItem], now: float) -> list:
        step_id = next(self._ids)
        for it in items:
            s = self.sessions.get(it.session_id)
            if s is None:
                continue
            self._log_input(s, st.index, it.start_pos, it.rows)
            s.touched.setdefault(w.worker_id, len(s.tokens))
        deadline = self._step_deadline(w, st, [(i.start_pos, len(i.rows)) for i in items], now)
        st.inflight = InFlightStep(step_id, w.worker_id, items, now, deadline, w.epoch)
        want = 0
        # a session that needs the whole vocabulary's logits: the head stage returns its hidden
        # rows instead of top-k (want_topk 0), and the coordinator computes every session's head
        st.inflight.full_logits = st.include_head and self.head_logits is not None and any(
            i.wants_token and i.session_id in self.sessions and self.sessions[i.session_id].chooser is not None for i in items)
        if st.include_head and any(i.wants_token for i in items) and not st.inflight.full_logits:
            want = max(self.sessions[i.session_id].params.candidates for i in items if i.session_id in self.sessions)
        hidden = np.concatenate([i.rows for i in items]) if len(items) > 1 else items[0].rows
        m = wire.make("step", step_id=step_id, epoch=w.epoch, layer_start=st.layer_start, layer_end=st.layer_end,
                 sessions=[{"session_id": i.session_id, "start_pos": i.start_pos, "length": len(i.rows),
                            **({"topk_rows": i.head_rows} if i.head_rows > 1 else {})} for i in items],
                 hidden=np.ascontiguousarray(hidden, dtype=np.float32), want_topk=want)
        self.counters["steps"] += 1
        return [Send(w.conn, m)]

    def _step_deadline(self, w: Worker, st: Stage, spans, now: float) -> float:
        """When a step of `spans` (start position, rows) over st's range, sent to w now, is late:
        from this worker's measured costs, for these rows at their context positions."""
        expected_ms = self._step_cost_ms(w, st, spans)
        return now + max(self.settings.step_deadline_min_ms, self.settings.step_deadline_factor * expected_ms) / 1000

    def _answered(self, w: Worker) -> None:
        """A suspected worker answered the step it was late with: no longer suspect."""
        if w.state == "suspect":
            w.move("answered_loading" if self._loads_out(w) else "answered")

    def _on_step_result(self, w: Worker, m: dict, now: float) -> list:
        if m["step_id"] in self._synthetic:
            return self._on_synthetic_result(w, m, now)
        if m["step_id"] in self._checks:
            return self._on_check_result(w, m, now)
        dropped = self._dropped_steps.get(m["step_id"])
        if dropped is not None and dropped.worker == w.worker_id:
            # no stage waits on it any more: answered, its worker is no longer judged by it
            del self._dropped_steps[m["step_id"]]
            if not any(f.worker == w.worker_id for f in self._dropped_steps.values()):
                self._answered(w)
        st = next((s for s in self.stages if s.inflight and s.inflight.step_id == m["step_id"]), None)
        if st is None or st.inflight.worker != w.worker_id or m["epoch"] != w.epoch:
            self.counters["late_results_ignored"] += 1
            return []
        items: list[WorkItem] = st.inflight.items
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
        if st.inflight.full_logits:
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
        # bytes this step moved both ways, as sent: the hidden rows out, the rows or top-k back
        moved = 4 * self.config.hidden * total + sum(m[k].nbytes for k in ("output", "topk_ids", "topk_logits") if m.get(k) is not None)
        w.steps += 1
        checks = self._maybe_spot_check(st, w, items, m, now) + self._maybe_trial(st, w, items, m, now)
        if w.probation and now <= st.inflight.deadline:
            w.proven_steps += 1  # a planned tab on probation: every step checked (see _maybe_spot_check)
            if w.proven_steps >= self.settings.probation_steps:
                self._end_probation(w, now)
        w.last_step_ms = (now - st.inflight.sent_at) * 1000
        compute = m.get("compute_ms")
        decode = all(len(i.rows) == i.head_rows for i in items)  # prefill steps are long by nature: decode steps set the pace
        if isinstance(compute, (int, float)) and 0 <= compute <= w.last_step_ms:
            hop = w.last_step_ms - compute
            w.transport_ms = hop if w.transport_ms is None else 0.9 * w.transport_ms + 0.1 * hop
            if w.rtt_ms is not None and not w.local:
                w.transfer.add(moved, hop - w.rtt_ms)
            if decode:
                w.compute_ms = compute if w.compute_ms is None else 0.9 * w.compute_ms + 0.1 * compute
                # unsmoothed sums: a stream's step round trips split exactly into compute and hop
                self.counters["decode_step_ms"] += w.last_step_ms
                self.counters["decode_compute_ms"] += compute
        if decode:
            self._adapt_batch(st, len(items), w.last_step_ms)
            # the step's round trip less the hop (its ping's), per layer computed, as one stream's
            # (a step of n rows counted as 1 + STREAM_COST x (n - 1) one-row steps, as placement does)
            hop = min(w.rtt_ms or 0.0, w.last_step_ms)
            per_layer = (w.last_step_ms - hop) / (st.layer_end - st.layer_start + (self._head_cost_layers() if st.include_head else 0))
            per_layer /= 1 + STREAM_COST * (len(items) - 1)
            w.step_ms_per_layer = per_layer if w.step_ms_per_layer is None else 0.8 * w.step_ms_per_layer + 0.2 * per_layer
            if self._trusted_costs(w)[2] and st.primary == w.worker_id:
                self._schedule_replan(now)  # its claims are absurd against its steps: off the critical path
        elif not w.local:  # learn what a prompt row costs this worker (deadlines, prompt chunks)
            measured = compute if isinstance(compute, (int, float)) and 0 < compute <= w.last_step_ms else w.last_step_ms
            unit = self._ms_per_layer(w) * (st.layer_end - st.layer_start) * self._rows_equiv(w, [(i.start_pos, len(i.rows)) for i in items])
            observed = w.row_cost * max(0.0, measured - (20 if st.include_head else 0)) / max(unit, 1e-6)
            observed = min(16.0, max(0.01, observed))
            w.row_cost = observed if observed > w.row_cost else 0.8 * w.row_cost + 0.2 * observed
        self._answered(w)
        st.inflight = None
        out = []
        offset = 0
        for i, it in enumerate(items):
            rows = None if st.include_head else out_rows[offset: offset + len(it.rows)]
            offset += len(it.rows)
            s = self.sessions.get(it.session_id)
            if s is None or s.finished or it.generation != s.generation:
                continue
            moving = st.pipeline != s.pipeline  # a move's background replay (Moves._send_move)
            if moving and st.pipeline != s.moving_to:
                continue  # a move called off
            if not moving:
                s.last_by[st.index] = (w.worker_id, w.epoch)
            if moving and st.index + 1 in s.move_copied:  # a copy_kv gives the next stages these positions
                self._log_input(s, st.index + 1, it.start_pos, rows)
                s.moved = max(s.moved, it.end)
            elif not st.include_head:
                skip = max(0, it.forward_from - it.start_pos)
                if skip < len(it.rows):
                    self._enqueue(st.index + 1, WorkItem(it.session_id, it.start_pos + skip, rows[skip:], it.start_pos + skip,
                                                         it.wants_token, it.generation, it.draft), s)
            elif moving:
                s.moved = max(s.moved, it.end)
            elif it.wants_token and it.forward_from < it.end and it.draft:
                self.speculation.trip_done(s.request_id, now)
                out += self._verify_drafts(s, it, m["_draft_rows"][i], now)
            elif it.wants_token and it.forward_from < it.end:
                self.speculation.trip_done(s.request_id, now)
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
        """A decode step of n rows gives each of its n sessions a token; split in two, half of
        them wait a whole step more. So a long step alone is no reason to shrink the batch (a
        slow tab's 8 rows in 1.5 s beat 8 one-row steps of 0.15 s, and shrinking cut a slowed
        worker's 8 streams to ~2 rows a step): the batch halves only when it overran the latency
        target AND its rows cost more each than a smaller batch's did (batching stopped paying:
        a device out of its fast memory), and grows back one at a time while full batches pay.
        "A smaller batch" is one of at most half the rows, what halving would make: neighbouring
        sizes cost nearly the same a row (8 rows against 7: a few percent), so their step times'
        noise alone halved a slowed worker's 8 streams to batches of 2-5 that never merged again."""
        seen = st.decode_ms
        seen[batch] = step_ms if batch not in seen else 0.8 * seen[batch] + 0.2 * step_ms
        smaller = [b for b in seen if b <= batch // 2]
        pays = not smaller or seen[batch] / batch <= min(seen[b] / b for b in smaller)
        if step_ms > self.settings.target_step_ms and batch > 1 and not pays:
            st.batch_limit = max(1, min(st.batch_limit, batch) // 2)
        elif batch >= st.batch_limit and pays:
            st.batch_limit = min(self.settings.max_batch, st.batch_limit + 1)

    def _on_token(self, s: Session, ids: np.ndarray, logits: np.ndarray, now: float, full: np.ndarray | None = None) -> list:
        logprob = None
        if s.chooser is not None and full is not None:
            token, logprob = s.chooser.choose(full, s.tokens)
        else:
            token = Sampler(s.params).choose(ids, logits, len(s.tokens))
        s.last_head = (ids, logits)
        for stage, detected, lost in self._awaiting_recovery:
            self.events.append({"t": now, "kind": "recovered", "stage": stage, "worker": lost, "recovery_s": now - detected})
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
        if s.request_id in self._migrating and s.moving_to is None:  # its first token on the new plan: the next session follows
            del self._migrating[s.request_id]
            out += self._retire(now)
        if s.first_token_at is None:
            s.first_token_at = now
            if s.share_prefix:  # the prompt's KV is complete on every stage: siblings fork it
                out += self._remember_prefix(s, now)
        if s.stop_at_eos and token == self.config.eos_id:
            return out + self._finish_verified(s, "stop", now)
        if len(s.tokens) >= s.max_tokens:
            return out + self._finish_verified(s, "length", now)
        pos = len(s.prompt_ids) + len(s.tokens) - 1
        self._enqueue_next(s, token, pos, now)
        return out

    # -- speculation
    def _enqueue_next(self, s: Session, token: int, pos: int, now: float | None = None) -> None:
        """Queue the session's next trip: the row of its new token, and k drafted rows after it
        when speculation is on (coordinator/speculation.py); the head then returns top-k for
        all k+1 rows and _verify_drafts keeps what the model itself would have produced."""
        if s.request_id in self._trip_more:
            return  # the trip's next row decides the next token
        self._switch_move(s, pos)
        draft = None
        # the whole-vocabulary path returns one row per session (a grammar's, logprobs'): no drafts then
        full = getattr(self, "head_logits", None) is not None and any(
            getattr(x, "chooser", None) is not None for x in self.sessions.values())
        if self.speculation.on and not full:
            limit = min(s.max_tokens - len(s.tokens) - 1, min(self.settings.max_ctx, self.config.context) - pos - 1)
            if self.speculation.remote:
                if self._ask_drafts(s, token, pos, limit, now):
                    return  # the trip waits for a worker's drafts (or its deadline)
            else:
                d = self.speculation.draft(s.request_id, s.prompt_ids + s.tokens, Sampler(s.params), len(s.tokens), limit, now)
                draft = d if d.tokens else None
        self._enqueue(self._entry(s), self._trip(s, pos, [token] + (draft.tokens if draft else []), draft), s)

    def _trip(self, s: Session, pos: int, ids: list[int], draft: Draft | None) -> WorkItem:
        """The work item of a trip whose rows (`ids`: the token, then any drafts) start at `pos`;
        the first trip after a move also carries the positions from s.catch_up on."""
        first, s.catch_up = (pos if s.catch_up is None else s.catch_up), None
        rows = self.embed((s.prompt_ids + s.tokens)[first:pos] + list(ids))
        return WorkItem(s.request_id, first, rows, first, True, s.generation, draft)

    # -- drafts by a worker's draft model
    def _drafter(self) -> Worker | None:
        """The worker to ask for drafts: live, trusted (past probation, not suspect), holding a
        draft model of the served vocabulary; the lowest round trip of those. (A browser tab
        never advertises a draft model: only `tabshard worker --draft-model` does.)"""
        able = [w for w in self.workers.values()
                if w.alive and not w.local and not w.probation and w.state in ("idle", "loading", "ready")
                and isinstance(w.caps.get("draft_model"), dict) and w.caps["draft_model"].get("vocab") == self.config.vocab]
        return min(able, key=lambda w: w.rtt_ms if w.rtt_ms is not None else float("inf"), default=None)

    def _ask_drafts(self, s: Session, token: int, pos: int, limit: int, now: float | None) -> bool:
        """Send the drafter a `draft` for the session's next trip and park the trip (True); False
        when the trip goes now without drafts (no drafter, k 0, no clock)."""
        drafter = self._drafter()
        self.speculation.drafter = drafter.worker_id if drafter else None
        context = s.prompt_ids + s.tokens
        if drafter is None or now is None or len(context) > MAX_CONTEXT:
            return False
        k = self.speculation.draft_k(s.request_id, context, limit)
        if k <= 0:
            self.speculation.started(s.request_id, now, 0)
            return False
        trip = next(self._ids)
        wait_ms = self.settings.draft_deadline_ms + (drafter.rtt_ms or 0.0)
        self._parked[trip] = ParkedTrip(s.request_id, token, pos, s.generation, k, drafter.worker_id, now + wait_ms / 1000, now)
        self.speculation.remote_sessions[s.request_id] = drafter.worker_id
        self.counters["drafts_asked"] += 1
        self._draft_sends.append(Send(drafter.conn, wire.make("draft", session_id=s.request_id, context=context, k=k, trip=trip)))
        return True

    def _release_trip(self, trip: int, tokens: list[int], now: float) -> None:
        """A parked trip goes into the pipeline with `tokens` as its drafts (none: a plain trip),
        unless its session ended or started over meanwhile."""
        p = self._parked.pop(trip)
        s = self.sessions.get(p.session_id)
        if s is None or s.finished or s.generation != p.generation or len(s.prompt_ids) + len(s.tokens) - 1 != p.pos:
            return
        draft = Draft(list(tokens)) if tokens else None
        # the wait for the drafts is part of what drafted rows cost (AdaptiveK weighs it against
        # the acceptance); a trip that went without them is timed as a plain one
        self.speculation.started(s.request_id, p.asked_at if tokens else now, len(tokens))
        self._enqueue(self._entry(s), self._trip(s, p.pos, [p.token] + list(tokens), draft), s)

    def _draft_traffic(self, now: float) -> list:
        """The `draft` requests made since the last pump; parked trips whose drafter died or
        missed the deadline go without drafts; drafters drop the draft caches of ended sessions."""
        out, self._draft_sends = self._draft_sends, []
        for trip, p in list(self._parked.items()):
            w = self.workers.get(p.drafter)
            if now > p.deadline or w is None or not w.alive:
                self.counters["drafts_missed"] += 1
                self._late_trips[trip] = p.drafter
                self._release_trip(trip, [], now)
        while len(self._late_trips) > 1024:
            self._late_trips.pop(next(iter(self._late_trips)))
        for wid, sid in self.speculation.dropped:
            w = self.workers.get(wid)
            if w is not None and w.alive:
                out.append(Send(w.conn, wire.make("drop_session", session_id=sid)))
        self.speculation.dropped = []
        return out

    def _on_draft_result(self, w: Worker, m: dict, now: float) -> list:
        """A drafter's answer: checked against what was asked (its session, trip and k, ids of the
        served vocabulary); a wrong one is a protocol error against the drafter, and the trip goes
        on without drafts. An answer after the deadline is ignored (the trip went without)."""
        trip = m["trip"]
        p = self._parked.get(trip)
        if p is None and self._late_trips.get(trip) == w.worker_id:
            self.counters["late_drafts_ignored"] += 1
            return []
        tokens = m["tokens"]
        err = None
        if p is None or p.drafter != w.worker_id:
            err = ProtocolError("bad_field", f"draft_result for trip {trip}, which this worker was not asked", "trip")
        elif p.session_id != m["session_id"]:
            err = ProtocolError("bad_field", f"draft_result for trip {trip} names another session", "session_id")
        elif len(tokens) > p.k:
            err = ProtocolError("bad_field", f"draft_result has {len(tokens)} tokens, {p.k} were asked", "tokens")
        elif any(t >= self.config.vocab for t in tokens):
            err = ProtocolError("bad_field", f"draft_result tokens outside the vocabulary of {self.config.vocab}", "tokens")
        if err is not None:
            return self.on_protocol_error(w.conn, err, now) + self._pump(now)
        self._release_trip(trip, tokens, now)
        return self._pump(now)

    def _split_draft_rows(self, st: Stage, items: list[WorkItem], m: dict) -> dict | None:
        """A head step_result with several rows per speculative item: a copy of `m` with one row
        (the item's last) per item, as for plain steps, and the speculative items' rows under
        "_draft_rows" (item index -> (ids, logits)); None when the rows do not add up."""
        need = [it.head_rows for it in items]
        if st.inflight is not None and st.inflight.full_logits and getattr(self, "head_logits", None) is not None:
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
                        self._enqueue_next(s, s.tokens[-1], len(s.prompt_ids) + len(s.tokens) - 1, now)
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
        for st in self._session_stages(s) if tell else []:
            w = self.workers.get(st.primary) if st.primary else None
            if w is not None and w.alive and w.worker_id in st.ready and w.worker_id not in told:
                told.add(w.worker_id)
                out.append(Send(w.conn, wire.make("truncate_session", session_id=s.request_id, length=length)))
        return out
