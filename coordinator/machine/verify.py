"""Spot checks: a verifier recomputes a sample of a stage's steps; a liar found is
quarantined and the sessions it touched are recomputed.

A part of the Coordinator (coordinator/state.py): its methods run on the one state machine's records."""
from __future__ import annotations

import numpy as np

from coordinator.records import LOCAL, CheckRecord, Send, Session, Stage, WorkItem, Worker, check_session
from protocol import wire


class Verification:
    # -- spot checks
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
        # (an item of an older generation — its session moved or restarted since — is not
        # compared: the session's logs describe its new history, not what this step computed)
        candidates = [i for i, it in enumerate(items) if it.session_id in self.sessions
                      and it.generation == self.sessions[it.session_id].generation
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
        scratch = check_session(s.request_id, key)
        w = self.workers.get(by[0])
        # a tab verifying is judged by a deadline as its steps are (Recovery._check_late): one
        # that never answers would hold every session the checked worker touched from its
        # "done" for spot_check_timeout_s (the coordinator's own worker is trusted to answer)
        deadline = None if verifier.worker_id == LOCAL else self._step_deadline(verifier, st, [(first, end - first)], now)
        self._checks[step_id] = CheckRecord(by[0], by[1], verifier.worker_id, st.index, key, start_pos - first, claimed, now,
                                            w.steps if w is not None else 0, kv_key, deadline=deadline)
        self.counters["spot_checks"] += 1
        msgs = [wire.make("step", step_id=step_id, epoch=verifier.epoch, layer_start=key[0], layer_end=key[1],
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
        if self._serves_range(LOCAL, key):  # (checks run beside its sessions, under scratch sessions)
            self._verify_ranges[key] = "ready"
            return []
        self._forget_verify_kv(lambda k: k[1] == key and k[2] == LOCAL)  # a fresh range holds no scratch KV
        self._verify_ranges[key] = "loading"
        aid = next(self._ids)
        self._verify_assign[aid] = key
        infos = [self.blob_info[k] for k in self._stage_blobs(st)]
        out = [Send(local.conn, wire.make("assign", assignment_id=aid, layer_start=key[0], layer_end=key[1],
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
        busy = {st.inflight.worker for st in self.stages if st.inflight} | {h for st in self.stages for h in st.holders}
        busy |= {c.worker for c in self._checks.values()} | {c.verifier for c in self._checks.values()}
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
                out.append(Send(v.conn, wire.make("drop_session", session_id=check_session(k[0], k[1]))))
        return out

    def _verifier(self, st: Stage, w: Worker) -> Worker | None:
        """The coordinator's own worker (trusted, can load any range), else another ready holder
        (not one suspected of a late step or check: its answer would come late, if at all)."""
        local = self.workers.get(LOCAL)
        if local is not None and local.alive and local.state not in ("joining", "measuring"):
            return local
        for wid in st.holders:
            other = self.workers.get(wid)
            if wid != w.worker_id and wid in st.ready and other is not None and other.alive and other.state != "suspect":
                return other
        return None

    def _on_check_result(self, v: Worker, m: dict, now: float) -> list:
        check = self._checks.pop(m["step_id"])
        if v.worker_id != check.verifier:
            return self._release_finishes(now)
        claimed = check.claimed
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
            ref = m["output"][check.start:]
            if ref.shape != claimed.shape:
                return self._release_finishes(now)
            error = float(np.max(np.abs(ref - claimed))) / max(float(np.max(np.abs(ref))), 1e-6)
        # f16 and i8 tabs round where the f32 verifier does not: an honest result is ~1e-2 off
        # (tests/test_wgpu_backend.py's compute_dtype tests; not measured against the verifier
        # yet, so 5e-2 is a guess kept on the safe side)
        tolerance = self.settings.spot_check_rtol if self.settings.compute_dtype == "f32" else max(self.settings.spot_check_rtol, 5e-2)
        if check.trial:  # a tab on probation recomputed a trusted worker's step
            return self._on_trial_result(v, check, error <= tolerance, error, now)
        if error <= tolerance:
            return self._release_finishes(now)
        return self._on_liar(check, error, now)
