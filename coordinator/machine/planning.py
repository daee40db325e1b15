"""The plan: which worker holds which contiguous layer range (coordinator/planner.py's pure
planner, fed measured costs), re-planned when workers come and go, resumed after a restart.

A part of the Coordinator (coordinator/state.py): its methods run on the one state machine's records."""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

from coordinator.planner import Plan, PlanError, StagePlan, WorkerCapacity, plan, predict_ms
from coordinator.records import LOCAL, Session, Stage, Worker


# a re-plan over the same workers moves weights: worth it only for a predicted token this much faster
REPLAN_MIN_GAIN = 0.15
# a re-plan deferred while sessions run is judged again this often: what it was judged on moves
# (round trips, a newcomer's first pongs answered while it was still starting, steps' costs) and
# sessions back to back may never leave a moment without one
REPLAN_RETRY_S = 5.0
# a claimed speed this many times faster than the worker's own steps show is absurd: clamped to
# what the steps show, and the worker is kept off the critical path
ABSURD_FACTOR = 1000.0
# placement's price of one more stream on a pipeline, in one-stream steps. A GPU batches rows
# nearly for free, a tab's WASM or a CPU pays for each row's head and attention (numpy here: a
# step of 8 rows ~2-3x one row's); and speeds measured at join differ by tens of percent between
# equal tabs on a busy host. Half a step per stream spreads streams over replicas that are about
# equal and keeps them off one that is much slower (a 5x slower replica gets a stream once the
# fastest runs 8)
STREAM_COST = 0.5
# placement: pipelines predicted within this fraction of the cheapest count as equal, and the
# one holding the longest cached prefix of the prompt takes the session (equal replicas'
# measured speeds differ by a few percent; one more stream costs STREAM_COST, far beyond it)
PREFIX_AFFINITY = 0.1


class Planning:
    # -- planning and loading
    def _schedule_replan(self, now: float) -> None:
        self._replan_at = now + self.settings.replan_delay_ms / 1000

    def _live_workers(self, remeasuring: bool = False) -> list[Worker]:
        """Live workers with a measured speed; with `remeasuring`, those being measured again too
        (on their last figure)."""
        return [w for w in self.workers.values()
                if w.alive and (w.state not in ("joining", "measuring") or remeasuring and w.remeasuring)]

    def _head_cost_layers(self) -> float:
        """The head's decode cost in layers: decode streams every weight once per token, so
        cost goes with parameter count (vocab x hidden against a layer's matrices)."""
        c = self.config
        q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        layer = c.hidden * (q + 2 * kv) + q * c.hidden + 3 * c.hidden * c.ffn
        return c.vocab * c.hidden / layer

    def _replan_tick(self, now: float) -> list:
        """The tick's re-plan, the plan made once: new serving replicas join at once; a new
        plan that changes a running pipeline is made now, between steps, when it pays for
        moving the sessions (_replan_pays): the running pipelines serve them until it is
        loaded, then they move over one at a time (_keep_serving, _continue_pipelines,
        _retire); otherwise it is judged again every REPLAN_RETRY_S (the workers it left out
        measured again: Join._remeasure_left_out), not while a fault is handled unless the
        running plan cannot go on (_fault_in_hand), and made once none runs."""
        running = self.sessions and self.stages and all(s.primary for s in self.stages)
        if running and self._deferred_replan and self._fault_in_hand(now) and not self._running_plan_broken():
            # a plan made now would reassign the workers the fault's handling judges (a
            # suspect's deadline, a rebuild's new primary, a move's target): after it
            self._replan_at = now + REPLAN_RETRY_S
            return []
        made = self._fresh_plan(self._planned_workers())
        if running:
            extended = self._extend_plan(now, made)
            if extended is not None:
                return extended
            if not self._replan_pays(made):
                self._deferred_replan = True
                self._replan_at = now + REPLAN_RETRY_S
                return self._remeasure_left_out(now)  # (a stale slow figure may be why it does not pay)
        self._deferred_replan = False
        return self._replan(now, made)  # (last: it may swap the plan's primaries, _prefer_held_blobs)

    def _fresh_plan(self, workers: list[Worker]) -> Plan | PlanError | None:
        """The planner's plan for `workers` now, the error that says which resource is short,
        or None without workers."""
        try:
            return self._make_plan(workers) if workers else None
        except PlanError as exc:
            return exc

    def _replan(self, now: float, fresh: Plan | PlanError | None = None) -> list:
        """Make the plan (`fresh`: as _fresh_plan made it this tick; by default made here) and
        apply it: new ranges assigned, pipelines kept serving or retiring, sessions moved."""
        workers = self._planned_workers()
        if not workers:
            return []
        try:
            made = self._resume_plan(workers) or (fresh if fresh is not None else self._make_plan(workers))
            if isinstance(made, PlanError):
                raise made
        except PlanError as exc:
            self.degraded = True
            self.plan_error = f"memory: {exc}"
            self.events.append({"t": now, "kind": "plan_failed", "reason": str(exc)})
            return []
        self.plan_error = None
        for w in workers:
            w.planned_rtt_ms = w.rtt_ms
        if len(made.pipelines) == 1:
            self._prefer_held_blobs(made.pipelines[0])  # (a swap in one pipeline would leave the others' standbys behind)
        kept = self._keep_current_plan(made)
        if kept is not None:
            self.plan_why = {**self.plan_why, **made.why}  # the same workers: why each is left out, as measured now
            self.events.append({"t": now, "kind": "plan_kept", "reason": kept})
            return []
        self.plan_notes, self.plan_why = dict(made.notes), dict(made.why)
        out = self._forget_prefixes()
        old: dict[tuple, set] = {}  # range -> holders that have it loaded
        for s in self.stages:
            old.setdefault((s.layer_start, s.layer_end), set()).update(s.ready)
        serving = [sts for sts in self._pipelines().values() if self._pipeline_ready(sts)]
        self.plan_version += 1
        self.stages = []
        for w in self.workers.values():
            w.stages = set()
        assigned = set()  # (worker, range): a worker loads a range once, whatever pipelines it serves in
        for i, sp in enumerate(made.stages):
            key = (sp.layer_start, sp.layer_end)
            st = Stage(i, sp.layer_start, sp.layer_end, sp.include_head, list(sp.workers), batch_limit=self.settings.max_batch,
                       pipeline=sp.pipeline)
            st.ready = {h for h in old.get(key, ()) if h in st.holders}
            self.stages.append(st)
            for wid in st.holders:
                self.workers[wid].stages.add(i)
                if wid not in st.ready and (wid, key) not in assigned:
                    assigned.add((wid, key))
                    out += self._assign(self.workers[wid], st, now)
        numbered = [(sts[0].pipeline, sts) for sts in serving]  # (their numbers before _continue_pipelines renumbers some)
        kept = self._continue_pipelines(serving)
        kept.update(self._keep_serving([sts for number, sts in numbered if number not in kept]))
        # the verifier loads every stage's range now, while it may still hold an older range
        # over the same layers (their dequantized matrices are reused), not at the first check
        if self.settings.spot_check_fraction > 0:
            for st in self.stages:
                if LOCAL not in st.holders:
                    out += self._load_verify_range(st)
        # ranges a worker held but no longer does are unloaded to free its memory
        for key, ready in old.items():
            for wid in ready:
                if wid in self.workers:
                    out += self._unload_unheld(self.workers[wid], key)
        self.degraded = any(h == LOCAL for s in self.stages for h in s.holders[:1] if not s.retiring)
        self.events.append({"t": now, "kind": "plan", "version": self.plan_version, "stages": [s.to_dict() for s in self.stages],
                            "pipelines": len(made.pipelines), "predicted_ms": [round(x, 3) for x in made.predicted_ms]})
        self._inflight_lost.clear()  # it described stages of the old plan
        for sess in self.sessions.values():
            if sess.pipeline in kept:  # it goes on where it runs: its stages kept serving, renumbered
                number, index = kept[sess.pipeline]
                sess.pipeline = number
                sess.logs = {index[k]: v for k, v in sess.logs.items() if k in index}
                sess.last_by = {index[k]: v for k, v in sess.last_by.items() if k in index}
                self._call_off_move(sess)  # (a move's pipeline is renumbered or gone)
            else:
                self._restart_session(sess)
        return out + self._retire(now)  # (every new pipeline may be ready at once: the moves start)

    def _planned_workers(self) -> list[Worker]:
        workers = self._live_workers()
        remote = [w for w in workers if not w.local]
        # tabs on probation are planned only when no trusted tab is there (then every step of
        # theirs is checked); otherwise they prove themselves on trial (see _start_trials)
        remote = [w for w in remote if not w.probation] or remote
        if not self.settings.coordinator_compute or remote:
            workers = remote if remote else workers
        return workers

    def _replan_pays(self, made: Plan | PlanError | None) -> bool:
        """While sessions run, whether a new plan is made now rather than when none runs: moving
        a session replays its history and loading a pipeline takes its holders' time, so only a
        plan the running one cannot go on without (a primary that is the coordinator's own
        compute, gone, flagged or out of memory) or one predicted REPLAN_MIN_GAIN faster than the
        fastest running pipeline (as its steps show it: a much faster tab joined, a slow one
        turned out slow; a tab with no steps yet is judged on join measurements alone).
        Membership churn that changes little (tabs coming back from faults, probation ending)
        waits for a moment without sessions."""
        if self._running_plan_broken():
            return True
        pipes = [sts for sts in self._pipelines().values() if not sts[0].retiring]
        if not isinstance(made, Plan):
            return True  # (_replan says which resource is short)
        new = [(sp.layer_start, sp.layer_end, sp.include_head, sp.workers[0]) for sp in made.pipelines[0]]
        # like for like: a primary with no decode steps yet (a newcomer) is priced at its join
        # measurement (one row), and the running primaries' steps batch their streams' rows, each
        # counted as STREAM_COST of a step, which a CPU computes for far less: their steps then
        # show them faster than their measurement says, and the newcomer's gain shrinks to noise
        serving = all(self.workers[wid].step_ms_per_layer for *_, wid in new)
        now_ms = min(self._plan_step_ms([(st.layer_start, st.layer_end, st.include_head, st.primary) for st in sts], serving=serving)
                     for sts in pipes)
        return now_ms > self._plan_step_ms(new, serving=serving) * (1 + REPLAN_MIN_GAIN)

    def _running_plan_broken(self) -> bool:
        """Whether the running plan cannot go on: no pipeline that is not retiring, or a primary
        of one that is the coordinator's own compute, gone, flagged or out of memory."""
        pipes = [sts for sts in self._pipelines().values() if not sts[0].retiring]
        return not pipes or any(st.primary is None or st.primary == LOCAL or not self.workers[st.primary].alive
                                or self._trusted_costs(self.workers[st.primary])[2]
                                or not self._fits(st.primary, st.layer_start, st.layer_end, st.include_head)
                                for sts in pipes for st in sts)

    def _extend_plan(self, now: float, made: Plan | PlanError | None) -> list | None:
        """While sessions run, a new plan that only adds serving replicas (every running
        pipeline stays as it is: the same ranges, the same primaries) is applied at once: the new
        pipelines load while the running ones keep serving, and sessions placed later use them.
        None: the new plan changes a running pipeline (then _replan: the running pipelines serve
        their sessions until the new one is loaded)."""
        pipes = self._pipelines()
        if not isinstance(made, Plan) or not pipes or any(st.retiring for st in self.stages):
            return None  # (while the last plan's pipelines retire, stage indexes move: a new plan)
        shape = lambda sts: [(st.layer_start, st.layer_end, st.primary) for st in sts]  # noqa: E731
        current = [shape(sts) for sts in pipes.values()]
        new = [[(sp.layer_start, sp.layer_end, sp.workers[0]) for sp in pl] for pl in made.pipelines]
        ranges = [(a, b) for a, b, _ in current[0]]
        added = [pl for pl, n in zip(made.pipelines, new) if n not in current]
        if any(c not in new for c in current) or not added or any([(sp.layer_start, sp.layer_end) for sp in pl] != ranges for pl in added):
            return None
        out, number = [], max(pipes) + 1
        for k, pl in enumerate(added):
            for sp in pl:
                wid, key = sp.workers[0], (sp.layer_start, sp.layer_end)
                same = [st for st in self.stages if (st.layer_start, st.layer_end) == key]
                st = Stage(len(self.stages), sp.layer_start, sp.layer_end, sp.include_head,
                           [wid] + [x.primary for x in same if x.primary != wid], batch_limit=self.settings.max_batch, pipeline=number + k)
                st.ready = {h for x in same for h in x.ready if h in st.holders}
                for x in same:  # the new primary is a warm standby for the running pipelines' same range
                    if wid not in x.holders:
                        x.holders.append(wid)
                        self.workers[wid].stages.add(x.index)
                self.stages.append(st)
                self.workers[wid].stages.add(st.index)
                if wid not in st.ready and not self._loading_range(self.workers[wid], key):
                    out += self._assign(self.workers[wid], st, now)
                self.plan_notes[wid] = made.notes.get(wid, f"replica: pipeline {st.pipeline}")
        self.plan_why = dict(made.why)
        self.plan_version += 1
        self.events.append({"t": now, "kind": "plan", "version": self.plan_version, "extended": True,
                            "stages": [s.to_dict() for s in self.stages], "pipelines": len(self._pipelines())})
        return out

    # -- serving while the new plan loads
    def _pipeline_ready(self, sts: list[Stage]) -> bool:
        return bool(sts) and all(st.primary and st.primary in st.ready and not st.needs_rebuild
                                 and self.workers[st.primary].alive for st in sts)

    def _continue_pipelines(self, serving: list[list[Stage]]) -> dict[int, tuple[int, dict]]:
        """A pipeline of the new plan made of the same ranges and primaries as a ready one of the
        old plan IS that pipeline: its stages go on (queues, steps in flight, sessions' KV on its
        workers) under their new numbers. Returns {old pipeline: (its number now, {old stage
        index: new index})}, as _keep_serving does."""
        shape = lambda sts: tuple((st.layer_start, st.layer_end, st.include_head, st.primary) for st in sts)  # noqa: E731
        busy = {x.pipeline for x in self.sessions.values()}
        old = {shape(sts): sts for sts in sorted(serving, key=lambda sts: sts[0].pipeline in busy)}  # a busy one wins a tie
        out = {}
        for number, sts in self._pipelines().items():
            prev = old.pop(shape(sts), None)
            if prev is None:
                continue
            old_number, index = prev[0].pipeline, {}
            for new, st in zip(sts, prev):
                index[st.index] = new.index
                st.index, st.pipeline, st.retiring = new.index, new.pipeline, False
                st.holders, st.ready = new.holders, set(new.ready) | (st.ready & set(new.holders))
                self.stages[new.index] = st
            out[old_number] = (number, index)
        return out

    def _keep_serving(self, serving: list[list[Stage]]) -> dict[int, tuple[int, dict]]:
        """After a re-plan, the old plan's ready pipelines that sessions run on keep serving
        them, as retiring pipelines appended after the new ones (their holders only: what they
        hold is loaded), queues and steps in flight as they were: a re-plan pauses no stream.
        While no pipeline of the new plan is ready (its holders load their ranges), the others
        are kept too, and new sessions go to them (_place): the first request after `serve`
        starts is answered by the coordinator's own compute while the first tabs load. _retire
        drops them and moves their sessions over once every new pipeline is ready.
        Returns {old pipeline: (its number now, {old stage index: new index})} for those kept
        with their sessions."""
        busy = {s.pipeline for s in self.sessions.values()}
        idle_too = not any(self._pipeline_ready(sts) for sts in self._pipelines().values())
        number = max(st.pipeline for st in self.stages) + 1 if self.stages else 0
        kept = {}
        for sts in serving:
            old = sts[0].pipeline
            if old not in busy and not idle_too:
                continue
            index = {}
            for st in sts:
                index[st.index] = len(self.stages)
                st.index, st.pipeline, st.retiring = len(self.stages), number, True
                st.holders = [h for h in st.holders if h in st.ready]
                if old not in busy:
                    st.queue.clear()
                    self._drop_inflight(st)  # its late result is ignored (no stage waits on its step id)
                self.stages.append(st)
                for h in st.holders:
                    self.workers[h].stages.add(st.index)
            if old in busy:
                kept[old] = (number, index)
            number += 1
        return kept

    def _retire(self, now: float, lost: bool = False) -> list:
        """Drop the retiring pipelines once every pipeline of the new plan is ready and no
        session runs on them; the ranges their holders no longer hold are unloaded. lost: a
        holder of one died, so they go now, and their sessions restart on the new plan."""
        gone = [st for st in self.stages if st.retiring]
        if not gone:
            return []
        pipes = self._pipelines()
        moved = [s for s in self.sessions.values() if s.pipeline in {st.pipeline for st in gone}]
        # every new pipeline ready: the sessions still on retiring ones move over, each without
        # a pause (_start_move), as after any restart the next token exact: at once where the
        # move computes nothing on a worker of a retiring pipeline (Moves._moves_apart), else
        # one at a time (the next when the one before has its first token there)
        if not lost and not all(self._pipeline_ready(sts) for sts in pipes.values() if not sts[0].retiring):
            return []
        # (a session waiting only for spot checks to finish has nothing left to run: it stays)
        running = [s for s in moved if s.finish_pending is None]
        if not lost and running:
            for r in [r for r in self._migrating if r not in self.sessions or self.sessions[r].finish_pending is not None]:
                del self._migrating[r]
            alone = not all(self._migrating.values())  # a move under way that is not apart
            for s in sorted(running, key=lambda x: len(x.prompt_ids) + len(x.tokens)):
                if s.request_id in self._migrating:
                    continue
                target = self._move_target(s)  # (placed once: _place weighs every session's pipeline)
                apart = self._moves_apart(target)
                if apart or not alone:
                    self._migrating[s.request_id] = apart
                    alone = alone or not apart
                    self._start_move(s, target)
            return []
        self.stages = [st for st in self.stages if not st.retiring]
        for st in gone:
            self._drop_inflight(st)
        for s in moved:
            self._restart_session(s)
        out = []
        for st in gone:
            for wid in st.holders:
                w = self.workers.get(wid)
                if w is None:
                    continue
                w.stages.discard(st.index)
                out += self._unload_unheld(w, (st.layer_start, st.layer_end))
        for cache_id in [k for k, e in self.prefix_cache.items() if e.pipeline in {st.pipeline for st in gone}]:
            out += self._drop_everywhere(cache_id)
            del self.prefix_cache[cache_id]
        self.degraded = any(h == LOCAL for s in self.stages for h in s.holders[:1])
        self.events.append({"t": now, "kind": "retired", "stages": [st.to_dict() for st in gone]})
        return out

    # -- serving replicas
    def _pipelines(self) -> dict[int, list[Stage]]:
        out: dict[int, list[Stage]] = {}
        for st in self.stages:
            out.setdefault(st.pipeline, []).append(st)
        return out

    def _entry(self, s: Session) -> int:
        """The index of the first stage of the session's pipeline."""
        return next((st.index for st in self.stages if st.pipeline == s.pipeline), 0)

    def _session_stages(self, s: Session) -> list[Stage]:
        return [st for st in self.stages if st.pipeline == s.pipeline]

    def _place(self, s: Session) -> None:
        """Bind a session to the pipeline with the lowest predicted token latency given its load:
        a pipeline's predicted latency (planner.predict_ms over its primaries now) x (1 +
        STREAM_COST x the streams it already runs), ready pipelines first; among those within
        PREFIX_AFFINITY of the lowest, the one holding the longest cached prefix of its prompt
        (a conversation's next turn goes where its history's KV is, and is not prefilled
        again), then the lowest, the less loaded. A single stream goes to the fastest; equal
        replicas share streams evenly."""
        pipes = self._pipelines()
        if not pipes:
            s.pipeline = 0
            return
        primaries = {p: {st.primary for st in sts} for p, sts in pipes.items()}
        # (a moving session loads the pipeline it moves to)
        bound = [x.pipeline if x.moving_to is None else x.moving_to for x in self.sessions.values() if x is not s and not x.finished]

        fresh_ready = any(self._pipeline_ready(sts) for sts in pipes.values() if not sts[0].retiring)

        def key(p):
            sts = pipes[p]
            ready = self._pipeline_ready(sts) and not (sts[0].retiring and fresh_ready)
            if sts[0].retiring and not ready:
                return (3, 0.0, 0, p)  # a retiring pipeline takes sessions only while nothing new is ready
            # sessions on any pipeline that shares a primary with this one (after a failover) load it too
            load = sum(1 for q in bound if q in primaries and primaries[q] & primaries[p])
            if not all(st.primary for st in sts):
                return (2, 0.0, load, p)
            ms = self._plan_step_ms([(st.layer_start, st.layer_end, st.include_head, st.primary) for st in sts], serving=True)
            return (0 if ready else 1, ms * (1 + STREAM_COST * load), load, p)

        keys = {p: key(p) for p in pipes}
        best = min(keys.values())
        near = [p for p, k in keys.items() if k[0] == best[0] and k[1] <= best[1] * (1 + PREFIX_AFFINITY)]
        if self.prefix_cache and len(near) > 1:
            s.pipeline = min(near, key=lambda p: (-self._cached_prefix(s.prompt_ids, p)[1], keys[p]))
        else:
            s.pipeline = min(pipes, key=keys.__getitem__)

    def _make_plan(self, workers: list[Worker]) -> Plan:
        """The planner's plan for `workers`, told what runs now and what each already holds, so
        that a join or a changed measurement moves as few weights as the prediction allows."""
        c = self.config
        first = [st for st in self.stages if not st.retiring and st.pipeline == min((x.pipeline for x in self.stages if not x.retiring), default=0)]
        current = [(st.layer_start, st.layer_end, st.primary) for st in first if st.primary and st.primary != LOCAL]
        by_sha = {i.sha256: k for k, i in self.blob_info.items()}
        held = {w.worker_id: frozenset(c.n_layers if k == "head" else int(k.split(":")[1])
                                       for k in (by_sha.get(h) for h in w.have_blobs) if k and (k == "head" or k.startswith("layer:")))
                for w in workers}
        # every running pipeline (the first too: a new first pipeline may leave it whole as a replica)
        running = [[(st.layer_start, st.layer_end, st.primary) for st in sts] for _, sts in sorted(self._pipelines().items())
                   if not sts[0].retiring and all(st.primary and st.primary != LOCAL for st in sts)]
        return plan([self._capacity(w) for w in workers], c.n_layers, self.layer_bytes, self.head_bytes, self.settings.replicas,
                    self.settings.max_stages, self._head_cost_layers(), stages=self.settings.stages, hidden_bytes=4 * c.hidden,
                    current=current if len(current) == len(first) else None, held=held, running=running)

    def _plan_step_ms(self, ranges, serving: bool = False) -> float:
        """A plan's predicted token latency (coordinator/planner.py's predict_ms): each stage's
        (layers + the head's cost) x its primary's cost per layer, plus its hop. serving: a
        trusted primary's cost per layer as its decode steps show it now (step_ms_per_layer,
        timed here) where it has served: what placement counts on (a speed measured at join, on
        a busy host, can be far off)."""
        c = self.config
        model = SimpleNamespace(head_cost_layers=self._head_cost_layers(), hidden_bytes=4 * c.hidden)
        caps = []
        for start, end, has_head, wid in ranges:
            w = self.workers[wid]
            cap = self._capacity(w)
            if serving and w.step_ms_per_layer and not w.probation and not cap.flagged:  # (a zero: no time seen)
                cap = dataclasses.replace(cap, ms_per_layer=w.step_ms_per_layer)
            caps.append((cap, end - start, has_head))
        return predict_ms(caps, model)

    def _keep_current_plan(self, made: Plan) -> str | None:
        """Why the current plan stays (None: take the new one). A new plan moves weights, so
        while the same workers hold a whole plan of live remote primaries, it is taken only
        when its predicted step is materially faster (REPLAN_MIN_GAIN), not on measurement
        noise (e.g. when tabs' probation ends and their measured speeds replace claimed ones).
        The current plan is the last one made: pipelines still retiring from an older one are
        on their way out (counted in, a plan would be remade at every trigger until they go)."""
        current = [s for s in self.stages if not s.retiring]
        if not current or any(LOCAL in s.holders or not s.holders for s in current):
            return None
        # the new plan is made of live workers only: the same holders are live holders
        stages = made.stages
        if {wid for s in current for wid in s.holders} != {wid for sp in stages for wid in sp.workers}:
            return None
        if not all(self._fits(wid, s.layer_start, s.layer_end, s.include_head) for s in current for wid in s.holders):
            return None  # a worker's memory shrank (a memory-pressure report): the plan must change
        if any(self._trusted_costs(self.workers[s.primary])[2] for s in current):
            return None  # a primary's measurements turned out absurd: off the critical path
        pipes = [sts for sts in self._pipelines().values() if not sts[0].retiring]
        if len(pipes) != len(made.pipelines):
            return None  # serving replicas come or go: throughput, not one token's latency, changes
        now_ms = min(self._plan_step_ms([(s.layer_start, s.layer_end, s.include_head, s.holders[0]) for s in sts])
                     for sts in pipes)
        new_ms = self._plan_step_ms([(sp.layer_start, sp.layer_end, sp.include_head, sp.workers[0]) for sp in made.pipelines[0]])
        if now_ms > new_ms * (1 + REPLAN_MIN_GAIN):
            return None
        return f"same workers; predicted step {new_ms:.3g} ms against {now_ms:.3g} ms now: not {REPLAN_MIN_GAIN:.0%} faster"

    def plan_role(self, w: Worker) -> str | None:
        """A live worker's place in the plan as it runs now, or why it is off the critical path
        (/status "plan"): a primary's pipeline and stage, else standby / loading / joining /
        on probation / left out, with the planner's reason (planner.Plan.why) and any clamped
        measurement (flagged)."""
        if not w.alive:
            return None
        flag = self._trusted_costs(w)[2]
        flagged = f"flagged: {flag}; " if flag else ""
        if w.state in ("joining", "measuring"):
            return "its speed is being measured again" if w.remeasuring else "joining: its speed is being measured"
        held = [st for st in self.stages if w.worker_id in st.holders]
        loading = "" if all(w.worker_id in st.ready for st in held) else " (loading its layers)"
        primary = [st for st in held if st.primary == w.worker_id and not st.retiring]
        if primary:
            pipes = self._pipelines()
            return "; ".join(f"pipeline {st.pipeline}, stage {pipes[st.pipeline].index(st)}" for st in primary) + loading
        why = self.plan_why.get(w.worker_id)
        if any(st.primary == w.worker_id for st in held):
            return f"{flagged}retiring: serves its sessions until the new plan's pipelines are ready"
        if held:
            ranges = ", ".join(sorted({f"{st.layer_start}-{st.layer_end - 1}" for st in held}))
            note = self.plan_notes.get(w.worker_id, "")
            why = why or (note.split(": ", 1)[1] if note.startswith("standby") and ": " in note else None)
            return f"{flagged}standby for layers {ranges}{loading}: {why or 'a warm spare for its primary'}"
        trial = self._trials.get(w.worker_id)
        if trial is not None:
            a, b = trial["range"]
            return (f"{flagged}on probation: on trial over layers {a}-{b - 1} "
                    f"({w.proven_steps} of {self.settings.probation_steps} steps proven{'' if trial['ready'] else ', loading'})")
        if w.probation and not w.local:
            return f"{flagged}on probation: waits for a trial (trusted workers hold the model)"
        if w.local:
            return "the coordinator's own compute: serves only while no tab can" + (f" ({why})" if why else "")
        if why:
            return f"{flagged}unused: {why}"
        if self._deferred_replan or self._replan_at is not None:
            return f"{flagged}waiting for the next plan" + (" (sessions run on the current one)" if self._deferred_replan else "")
        return f"{flagged}unused: not in the plan"

    def unserved_reason(self) -> str | None:
        """Why the model cannot be served now, naming the resource that is short (None: it can)."""
        if self.stages and all(s.holders for s in self.stages):
            return None
        if self.plan_error:
            return self.plan_error
        if not self._live_workers():
            joining = sum(1 for w in self.workers.values() if w.alive and not w.local)
            if joining:
                return f"workers: {joining} joining, none ready to hold layers yet"
            return "workers: none has joined" + ("" if self.settings.coordinator_compute else " (the coordinator's own compute is off)")
        missing = [f"{s.layer_start}-{s.layer_end - 1}" for s in self.stages if not s.holders]
        if missing:
            return f"workers: no live worker can hold layers {', '.join(missing)}"
        return "workers: the plan is being made"

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
        ms, rtt, flag = self._trusted_costs(w)
        return WorkerCapacity(cap.worker_id, ms, cap.memory_bytes, cap.expansion, cap.local, rtt, flag, w.transfer.bytes_per_ms)

    def _trusted_costs(self, w: Worker) -> tuple[float, float | None, str | None]:
        """(ms a layer, round trip ms, why they were clamped or None) as the planner may count on
        them: a speed or round trip that is not a positive finite number, or a speed ABSURD_FACTOR
        faster than the worker's own steps show, is replaced and flagged (a flagged worker is
        never a primary while others can serve). A round trip longer than its steps' (a ping
        answered late while the worker's loop loaded weights) is clamped to theirs, not flagged:
        a step carries the hop too, and a slow pong can only make the worker look farther."""
        ms, rtt, flags = self._ms_per_layer(w), w.rtt_ms, []
        trusted = [x.ms_per_layer for x in self.workers.values() if x.alive and not x.probation and not x.local and x is not w]
        if not (isinstance(ms, (int, float)) and math.isfinite(ms) and ms > 0):
            flags.append(f"speed {ms!r} ms a layer")
            ms = max(trusted, default=1000.0)
        seen = w.step_ms_per_layer  # from its decode steps' round trips, timed here
        if seen is not None and ms * ABSURD_FACTOR < seen:
            flags.append(f"claims {ms:.3g} ms a layer, its steps take {seen:.3g}")
            ms = seen
        if rtt is not None and not (math.isfinite(rtt) and rtt >= 0):
            flags.append(f"rtt {rtt!r} ms")
            rtt = None
        elif rtt is not None and w.last_step_ms is not None and rtt > w.last_step_ms:
            rtt = w.last_step_ms
        return ms, rtt, ("; ".join(flags) or None)

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

    def _resume_plan(self, workers: list[Worker]) -> Plan | None:
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
        stages = [StagePlan(a, b, r is ranges[-1], [r[3]]) for a, b, r in zip(starts, ends, ranges)]
        return Plan([stages], [self._plan_step_ms([(a, b, h, wid) for a, b, h, wid in
                                                  ((sp.layer_start, sp.layer_end, sp.include_head, sp.workers[0]) for sp in stages)])],
                    {sp.workers[0]: f"pipeline 0, stage {i} (resumed: the layers it held)" for i, sp in enumerate(stages)})

    def _fits(self, wid: str, start: int, end: int, has_head: bool) -> bool:
        cap = self.workers[wid].capacity()
        need = (end - start) * self.layer_bytes + (self.head_bytes if has_head else 0)
        return cap.memory_bytes / cap.expansion >= need

    def _prefer_held_blobs(self, stages: list[StagePlan]) -> None:
        """Swap primaries between stages when both fit, more of the weights are already held and
        the plan's predicted step stays within REPLAN_MIN_GAIN (workers that rejoin a restarted
        coordinator keep their ranges: nothing re-downloads)."""
        def held(wid, sp):
            w = self.workers[wid]
            keys = [f"layer:{i}" for i in range(sp.layer_start, sp.layer_end)] + (["head"] if sp.include_head else [])
            return sum(self.blob_info[k].size for k in keys if self.blob_info[k].sha256 in w.have_blobs)

        def step_ms():
            return self._plan_step_ms([(sp.layer_start, sp.layer_end, sp.include_head, sp.workers[0]) for sp in stages if sp.workers])

        for a in stages:
            for b in stages:
                if a is b or not a.workers or not b.workers:
                    continue
                wa, wb = a.workers[0], b.workers[0]
                if wb in a.workers or wa in b.workers:
                    continue
                if (held(wb, a) + held(wa, b) > held(wa, a) + held(wb, b) and self._fits(wb, a.layer_start, a.layer_end, a.include_head)
                        and self._fits(wa, b.layer_start, b.layer_end, b.include_head)):
                    before = step_ms()
                    a.workers[0], b.workers[0] = wb, wa
                    if step_ms() > before * (1 + REPLAN_MIN_GAIN):  # the planner gave a faster worker more layers
                        a.workers[0], b.workers[0] = wa, wb
