"""Sessions: a request's submit, its prompt's prefill, the prefix cache (KV of shared prompt
prefixes forked on the workers), cancel and finish.

A part of the Coordinator (coordinator/state.py): its methods run on the one state machine's records."""
from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable

import numpy as np

from coordinator.records import Emit, PrefixEntry, Send, Session, Stage, WorkItem
from model.sampling import SamplingParams
from protocol import wire


class Sessions:
    # -- requests
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
        self._place(s)
        out = self._reuse_prefix(s, now)
        # the positions forked from a cached prefix, as held by the first stage of the session's pipeline
        first = s.logs[self._entry(s)][0][1].shape[0] if s.logs else 0
        self._enqueue_prefill(s, s.prompt_ids, first)
        return out + self._pump(now)

    def _enqueue_prefill(self, s: Session, ids: list[int], first: int) -> None:
        """Positions [first, len(ids)) into stage 0 in chunks; the last row yields the next token."""
        rows = self.embed(ids[first:])
        step = self._prefill_rows(len(ids))
        for start in range(0, len(rows), step):
            part = rows[start:start + step]
            last = start + len(part) == len(rows)
            self._enqueue(self._entry(s), WorkItem(s.request_id, first + start, part, first + start, last, s.generation), s)

    def _restart_session(self, s: Session, pipeline: int | None = None) -> None:
        """A new plan holds none of this session's KV: run its whole history (prompt and the
        tokens already streamed) through the new stages; the next token follows exactly. A
        session whose last token is out, waiting only for spot checks (finish_pending), has
        nothing left to compute: run again, it would stream a token past its end. A move under
        way is called off: its replay's items are ignored (a new generation). pipeline: where
        it restarts when the caller placed it already (_start_move), else _place picks."""
        if s.moving_to is not None:
            s.generation += 1
            self._call_off_move(s)
        s.catch_up = None
        s.logs = {}
        s.log_epoch += 1  # the verifiers' scratch KV of it no longer matches what stages receive
        s.last_by = {}
        if pipeline is None:
            self._place(s)
        else:
            s.pipeline = pipeline
        if s.finish_pending is None:
            s.audited = False
            self._enqueue_prefill(s, s.prompt_ids + s.tokens, 0)

    # -- prefix cache
    def _reuse_prefix(self, s: Session, now: float) -> list:
        """Fork the longest cached prefix of this prompt on every stage of its pipeline instead of
        recomputing it."""
        stages = self._session_stages(s)
        if not self.prefix_cache or not stages or any(st.primary not in st.ready or st.needs_rebuild for st in stages):
            return []
        best, best_len = self._cached_prefix(s.prompt_ids, s.pipeline)
        if best is None:
            return []
        best.last_used = now
        for wid in best.workers:
            s.touched.setdefault(wid, 0)
        self.counters["prefix_hits"] += 1
        self.counters["prefix_tokens_reused"] += best_len
        out = []
        for st in stages:
            s.logs[st.index] = [(0, best.logs[st.index][:best_len])]
            out.append(Send(self.workers[st.primary].conn, wire.make("fork_session", source_id=best.cache_id,
                                                               session_id=s.request_id, length=best_len)))
        return out

    def _cached_prefix(self, prompt_ids: list[int], pipeline: int) -> tuple[PrefixEntry | None, int]:
        """The cached prefix of this prompt on this pipeline that would be forked (the longest,
        of at least prefix_min_tokens) and its length, or (None, 0)."""
        best, best_len = None, 0
        for e in self.prefix_cache.values():
            if e.pipeline != pipeline:
                continue
            n = min(len(e.tokens), len(prompt_ids) - 1)  # the last prompt token must be computed
            common = next((i for i in range(n) if e.tokens[i] != prompt_ids[i]), n)
            if common > best_len:
                best, best_len = e, common
        return (best, best_len) if best_len >= self.settings.prefix_min_tokens else (None, 0)

    def _remember_prefix(self, s: Session, now: float, ids: list[int] | None = None) -> list:
        """Keep the KV of `ids` (the prompt unless given: a finished session passes its prompt and
        every token it fed back, so that a conversation's next turn forks its whole history) on
        the session's stages under a new cache id; an entry of the same pipeline that it extends
        is dropped (this one serves every prompt that one does, as far or further)."""
        ids = list(s.prompt_ids if ids is None else ids)
        n = len(ids)
        stages = self._session_stages(s)
        if (self.settings.prefix_cache_entries <= 0 or n < self.settings.prefix_min_tokens or not stages
                or s.moving_to is not None or s.partial_kv
                or any(st.primary not in st.ready for st in stages)
                or any(sum(len(r) for _, r in s.logs.get(st.index, [])) < n for st in stages)
                or any(e.pipeline == s.pipeline and e.tokens[:n] == ids for e in self.prefix_cache.values())):
            return []
        out = []
        for e in [e for e in self.prefix_cache.values() if e.pipeline == s.pipeline and ids[:len(e.tokens)] == e.tokens]:
            out += self._drop_everywhere(e.cache_id)
            del self.prefix_cache[e.cache_id]
        cache_id = f"prefix-{next(self._ids)}"
        logs = {st.index: np.concatenate([r for _, r in s.logs[st.index]])[:n] for st in stages}
        self.prefix_cache[cache_id] = PrefixEntry(cache_id, ids, logs, now, frozenset(s.touched), s.pipeline)
        out += [Send(self.workers[st.primary].conn, wire.make("fork_session", source_id=s.request_id, session_id=cache_id, length=n))
                for st in stages]
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
                    out.append(Send(w.conn, wire.make("drop_session", session_id=session_id)))
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

    def _drop_queued(self, session_ids: Collection[str], stages: Iterable[Stage]) -> None:
        """Take these sessions' queued items off these stages' queues (their steps in flight
        are left to the generation or pipeline checks that ignore their results)."""
        for st in stages:
            st.queue = deque(i for i in st.queue if i.session_id not in session_ids)

    def _finish_verified(self, s: Session, reason: str, now: float) -> list:
        """Finish once no spot check of a worker that computed for the session is pending."""
        if self.settings.spot_check_at_finish and not s.audited and not self._holding_finishes:
            s.audited = True
            checks = self._audit_finish(s, now)
            if checks:
                s.finish_pending = reason
                return checks
        # (a trial check tests the tab on trial, not the worker it copies: it holds nothing back)
        if self._holding_finishes or any(c.worker in s.touched and not c.trial for c in self._checks.values()):
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
        self._drop_queued({s.request_id}, self.stages)
        out = []
        if emit:
            out.append(Emit(s.request_id, {"type": "done", "finish_reason": reason, "tokens": len(s.tokens),
                                           "prompt_tokens": len(s.prompt_ids)}))
            # every position whose KV the stages hold: the prompt and the tokens fed back (the
            # last token was streamed, never fed)
            out += self._remember_prefix(s, now, s.prompt_ids + s.tokens[:-1])
        out += self._drop_everywhere(s.request_id)
        out += self._forget_verify_kv(lambda k: k[0] == s.request_id)
        out += self._retire(now)  # the last session on the old plan's pipelines is done
        if not self.sessions and self._deferred_replan:
            self._replan_at = now  # a plan that did not pay for moving sessions: made now
        return out
