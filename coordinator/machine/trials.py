"""Probation: a new worker's trial over a stage's real or synthetic steps before it is trusted,
and the recomputation after a liar is caught.

A part of the Coordinator (coordinator/state.py): its methods run on the one state machine's records."""
from __future__ import annotations

import numpy as np

from coordinator.records import LOCAL, Send, Stage, SyntheticStep, Worker
from protocol import wire
from protocol.blobs import sha256


class Trials:
    # -- probation and trials
    def _start_trials(self, now: float) -> list:
        """Tabs on probation that the plan left out load one stage's range (the cheapest) and
        recompute real steps of its trusted primary under a scratch session (_maybe_trial):
        they earn trust without serving anyone, and a tarpit or a liar costs nobody a token."""
        out = []
        stages = [st for st in self.stages if st.primary and st.primary in st.ready and not self.workers[st.primary].probation
                  and not st.retiring]  # a retiring pipeline's range may have no steps left to copy
        if not stages:
            return out
        for w in list(self.workers.values()):
            # "ready" with no stages: it was planned while no tab was trusted and a later plan left it out
            if not (w.alive and w.probation and not w.local and w.state in ("idle", "ready") and not w.stages
                    and not w.loading and w.worker_id not in self._trials):
                continue
            if w.have_blobs and self._in_resume_window(now):
                continue  # a restarted coordinator's rejoining holder: the resume plan gives it what it holds
            st = min(stages, key=lambda x: (self._bytes_missing(w, x), self._stage_bytes(x)))
            aid = next(self._ids)
            infos = [self.blob_info[k] for k in self._stage_blobs(st)]
            self._trials[w.worker_id] = {"range": (st.layer_start, st.layer_end), "assignment_id": aid, "ready": False,
                                         "check": None, "shas": [i.sha256 for i in infos], "best_ms": None}
            self._trial_assign[aid] = w.worker_id
            w.move("assign")
            to_send = sum(i.size for i in infos if i.sha256 not in w.have_blobs)
            w.load_deadline = now + self.settings.load_timeout_min_s + to_send / self.settings.load_min_bytes_per_s
            self.events.append({"t": now, "kind": "trial", "worker": w.worker_id, "layers": [st.layer_start, st.layer_end]})
            out.append(Send(w.conn, wire.make("assign", assignment_id=aid, layer_start=st.layer_start, layer_end=st.layer_end,
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

    def _loads_out(self, w: Worker) -> bool:
        """Whether a load of `w`'s is still out (coordinator/lifecycle.py): a stage's, or for a
        tab on trial its trial range's (its trial's `ready` has not come)."""
        trial = self._trials.get(w.worker_id)
        return bool(w.loading) or (trial is not None and not trial["ready"])

    def _on_trial_ready(self, w: Worker, m: dict, now: float) -> list:
        trial = self._trials.get(w.worker_id)
        del self._trial_assign[m["assignment_id"]]
        if trial is None:
            return []
        if m["checksum"] != sha256("".join(trial["shas"]).encode()):
            return self._worker_lost(w, now, "ready with a checksum that does not match its assignment", quarantine=True)
        w.have_blobs.update(trial["shas"])
        trial["ready"] = True
        if not self._loads_out(w):  # a repair may have given it a stage while on trial: that load keeps its state and deadline
            w.load_deadline = None
            if w.state == "loading":
                w.move("loaded")
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
                        c.trial = True
                        c.deadline = now + self.settings.trial_deadline_ms / 1000 + \
                            self._step_cost_ms(v, st, [(0, it.end)]) * self.settings.step_deadline_factor / 1000
                        c.rows = it.end
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
        layers = check.range[1] - check.range[0]
        ms = (now - check.at) * 1000 / max(1, layers) / max(1.0, self._rows_equiv(v, [(0, check.rows)]))
        return self._trial_passed(v, trial, ms, now)

    def _end_probation(self, w: Worker, now: float) -> None:
        w.probation = False
        w.checked_left = self.settings.probation_steps  # its first steps in the plan are all checked
        self.counters["probations_passed"] += 1
        self.standing.earn(w.worker_id, now)  # its tab may rejoin while its address is backed off
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
        self._synthetic[step_id] = SyntheticStep(w.worker_id, now, len(rows), key,
                                                 now + (self.settings.trial_deadline_ms + self.settings.step_deadline_factor * cost) / 1000)
        trial["check"] = -step_id  # busy (negative: synthetic)
        trial["last"] = now
        self.counters["trial_steps"] += 1
        st = next((x for x in self.stages if (x.layer_start, x.layer_end) == key), None)
        head = bool(st and st.include_head)
        return [Send(w.conn, wire.make("step", step_id=step_id, epoch=w.epoch, layer_start=key[0], layer_end=key[1],
                                  sessions=[{"session_id": f"trial-{w.worker_id}", "start_pos": 0, "length": len(rows)}],
                                  hidden=rows, want_topk=1 if head else 0))]

    def _on_synthetic_result(self, w: Worker, m: dict, now: float) -> list:
        c = self._synthetic.pop(m["step_id"])
        trial = self._trials.get(w.worker_id)
        if c.worker != w.worker_id or trial is None:
            return []
        trial["check"] = None
        out = m["output"]
        if out.ndim != 2 or out.shape[1] != self.config.hidden or not np.all(np.isfinite(out)):
            return self._worker_lost(w, now, f"trial step answered with output of shape {tuple(out.shape)}", quarantine=True)
        layers = c.range[1] - c.range[0]
        ms = (now - c.at) * 1000 / max(1, layers) / self._rows_equiv(w, [(0, c.rows)])
        return self._trial_passed(w, trial, ms, now)

    def _trial_passed(self, v: Worker, trial: dict, ms: float, now: float) -> list:
        trial["best_ms"] = ms if trial["best_ms"] is None else min(trial["best_ms"], ms)
        v.proven_steps += 1
        if v.proven_steps >= self.settings.probation_steps:
            self._trials.pop(v.worker_id, None)
            if not v.probation:  # a repair planned it while on trial and its own checked steps proved it first
                return []
            # its speed as seen here (the fastest trial, transport included) bounds its claim
            v.ms_per_layer = max(v.ms_per_layer, min(trial["best_ms"], 1e4))
            self._end_probation(v, now)
            self._schedule_replan(now)  # it may now take layers
        return []

    def _trial_unanswered(self, wid: str, sent_at: float, now: float) -> list:
        v = self.workers.get(wid)
        if v is None or not v.alive:
            return []
        return self._worker_lost(v, now, f"trial step unanswered after {(now - sent_at) * 1000:.0f} ms", quarantine=True)

    def _trial_tick(self, now: float) -> list:
        out = []
        for step_id, c in list(self._synthetic.items()):
            if now > c.deadline:
                del self._synthetic[step_id]
                out += self._trial_unanswered(c.worker, c.at, now)
        for wid, trial in list(self._trials.items()):
            v = self.workers.get(wid)
            if (v is not None and v.alive and trial["ready"] and trial["check"] is None
                    and now - trial.get("last", 0.0) > self.settings.heartbeat_ms / 1000):
                out += self._send_synthetic(v, trial, now)
        for step_id, c in list(self._checks.items()):
            if c.trial and now > c.deadline:
                del self._checks[step_id]
                out += self._trial_unanswered(c.verifier, c.at, now)
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
        suspects = [check.worker] + ([check.verifier] if check.verifier != LOCAL else [])
        out = []
        self._holding_finishes = True  # none may finish before _recompute_sessions has looked at it
        for wid in suspects:
            w = self.workers.get(wid)
            self.events.append({"t": now, "kind": "liar_detected", "worker": wid, "stage": check.stage, "error": error,
                                "worker_steps": check.worker_steps, "verifier": check.verifier})
            if w is not None and w.alive and (wid != check.worker or w.epoch == check.epoch):
                out += self._worker_lost(w, now, f"spot check: outputs off by {error:.3g} (relative)", quarantine=True)
        self._holding_finishes = False
        return out + self._recompute_sessions(now, suspects)

    def _recompute_sessions(self, now: float, suspects: list[str]) -> list:
        """Every live session starts over (a new generation: queued and in-flight items of the
        old one are ignored) from its prompt and the tokens no suspect had a hand in. A session
        whose last token was out, waiting on checks, finishes if no suspect touched it."""
        self._drop_queued(self.sessions, self.stages)
        unconfirmed, clean_finished = 0, []
        for s in self.sessions.values():
            s.generation += 1
            for st in self.stages:
                self._inflight_lost.pop((st.index, s.request_id), None)
            trusted = min((s.touched[w] for w in suspects if w in s.touched), default=len(s.tokens))
            # the session restarts from token `trusted`: every worker that goes on computing for
            # it does so from there, also one first counted later (a stage's new holder that the
            # suspect's own loss, just before this, sent the old history to counted at the old
            # length; caught lying next, its tokens from `trusted` on must be rewound)
            s.touched = {w: min(n, trusted) for w, n in s.touched.items() if w not in suspects}
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
