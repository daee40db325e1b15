"""Session moves: a session on a retiring pipeline moves to the new plan's without a pause,
its history replayed there in the background while it decodes where it runs, or copied
(copy_kv) on a stage whose worker holds those layers' KV in the pipeline it leaves.

A part of the Coordinator (coordinator/state.py): its methods run on the one state machine's records."""
from __future__ import annotations

import numpy as np

from coordinator.records import Send, Session, Stage, WorkItem, Worker
from protocol import wire

# a session moving off a retiring pipeline switches to the new one when at most this many of its
# positions, decoded while its history was replayed there, are still missing: they go with its
# next trip (one step of that many rows more), which every stage of the new pipeline computes
# before its token (a worker serving both pipelines between their steps): the fewer, the shorter
# that token's wait; more are replayed in the background first. The replay takes each trip's own
# row too (computed beside the old pipeline's), so that a replay keeping pace leaves none
MOVE_CATCH_UP_ROWS = 1


class Moves:
    def _start_move(self, s: Session, target: tuple[int, dict | None]) -> None:
        """Move a session off its retiring pipeline without a pause: its history is replayed on
        the new pipeline in the background (_send_move) while it goes on decoding where it
        runs; once the replay is through the new head, its next trip goes there carrying the
        few positions decoded meanwhile (_switch_move). A new stage that is one of its current
        pipeline's (the same range on the same worker) holds a single KV cache of it, which a
        replay from position 0 would cut while the retiring pipeline decodes on it: then it
        restarts there (its history replayed before its next token). target: _move_target's."""
        here, (dest, copies) = s.pipeline, target
        pipes = self._pipelines()
        if copies is None:
            s.generation += 1  # its step in flight on the retiring pipeline, if any, is ignored
            self._drop_queued({s.request_id}, pipes[here])
            self._restart_session(s, dest)  # (placed once per retirement: _move_target placed it)
            return
        s.moving_to, s.move_sent, s.moved, s.copied_to = dest, 0, 0, 0
        s.move_copied = copies
        self._send_move(s)

    def _move_target(self, s: Session) -> tuple[int, dict | None]:
        """The pipeline the session would move to (Planning._place) and its stages a copy_kv
        serves (_kv_copies); None instead of those when one of its stages is one of the
        session's current pipeline (the same range on the same worker): then it restarts."""
        here = s.pipeline
        self._place(s)
        dest, s.pipeline = s.pipeline, here
        pipes = self._pipelines()
        shape = lambda st: (st.layer_start, st.layer_end, st.primary)  # noqa: E731
        if any(shape(st) in {shape(x) for x in pipes[here]} for st in pipes[dest]):
            return dest, None
        return dest, self._kv_copies(pipes[here], pipes[dest])

    def _moves_apart(self, target: tuple[int, dict | None]) -> bool:
        """Whether a session's move to `target` (_move_target's) computes nothing on a worker
        that serves a retiring stage (its replay runs on other workers; a copy_kv is no step):
        it cannot delay the decode of the sessions still on the retiring pipelines, so it need
        not wait for other moves."""
        dest, copies = target
        if copies is None:
            return False
        retiring = {st.primary for st in self.stages if st.retiring}
        return not any(st.primary in retiring for st in self.stages if st.pipeline == dest and st.index not in copies)

    def _kv_copies(self, old: list[Stage], new: list[Stage]) -> dict[int, int]:
        """The new pipeline's last stages whose primary holds their layers' KV in a stage of
        the old one (new stage index -> that stage's index): a copy_kv there stands for the
        replay, which then stops before them. Each but the first of them needs its input rows
        logged for a rebuild without running its predecessor: only where an old stage starts
        at the same layer (its log holds them); the first gets its predecessor's replayed
        outputs (or the embeddings, when every stage copies)."""
        def source(st: Stage) -> Stage | None:
            return next((o for o in old if o.primary == st.primary and st.primary in st.ready and o.primary in o.ready
                         and o.layer_start <= st.layer_start and st.layer_end <= o.layer_end), None)

        copies: dict[int, int] = {}
        for i in range(len(new) - 1, -1, -1):
            held = source(new[i])
            if held is None:
                break
            if copies and self._old_input_stage(old, new[i + 1]) is None:
                break
            copies[new[i].index] = held.index
        return copies

    @staticmethod
    def _old_input_stage(old: list[Stage], st: Stage) -> Stage | None:
        """The old pipeline's stage whose inputs are `st`'s (it starts at the same layer)."""
        return next((o for o in old if o.layer_start == st.layer_start), None)

    def _send_move(self, s: Session) -> None:
        """Queue the session's history that the new pipeline lacks (all but its last token,
        whose row is the next step where it runs) into that pipeline's first stage, in chunks
        that cost a stage about one decode step (_move_rows): each goes in one step beside
        the decode rows there, and a worker both pipelines share delays the retiring one's
        decode by one such chunk at most. Its head stage answers no token for them. Stages
        whose worker holds those positions' KV in the old pipeline get a copy_kv instead
        (s.move_copied): the replay stops before them."""
        # end: the position of its last token, whose row the old pipeline computes now (its
        # trip). A copy_kv takes what the old stages hold, [0, end); the replay takes that row
        # too, so that the new stages compute it beside the old ones and the switch's trip
        # carries its own row alone (the copied stages get it at the switch: _switch_move)
        end = len(s.prompt_ids) + len(s.tokens) - 1
        new = [st for st in self.stages if st.pipeline == s.moving_to]
        every_copied = new[0].index in s.move_copied
        replay_end = end if every_copied else end + 1
        if replay_end <= s.move_sent:
            return
        ids = s.prompt_ids + s.tokens
        if end > s.copied_to:
            for st in new:
                if st.index in s.move_copied:
                    self._send_copy(s, st, end, self.embed(ids[s.copied_to:end]) if st is new[0] else None)
            s.copied_to = end
        if every_copied:  # every stage copies: nothing to replay
            s.moved = end
        else:
            rows = self.embed(ids[s.move_sent:replay_end])
            queue = new[0].queue
            waiting = next((i for i in range(len(queue) - 1, -1, -1) if queue[i].session_id == s.request_id), None)
            if (waiting is not None and not queue[waiting].wants_token and queue[waiting].end == s.move_sent
                    and queue[waiting].generation == s.generation):
                # rows sent while its replay's last ones still wait there go with them: one step
                # (a step takes one slice a session), not one step each
                it = queue[waiting]
                queue[waiting] = WorkItem(s.request_id, it.start_pos, np.concatenate([it.rows, rows]), it.start_pos, False, s.generation)
            else:
                step = self._move_rows(s.moving_to, end, set(s.move_copied))
                for start in range(0, len(rows), step):
                    pos = s.move_sent + start
                    self._enqueue(new[0].index, WorkItem(s.request_id, pos, rows[start:start + step], pos, False, s.generation), s)
        s.move_sent = replay_end

    def _send_copy(self, s: Session, st: Stage, end: int, embedded) -> None:
        """Ask st's primary for a copy_kv of the session's positions [0, end) and log st's
        inputs [s.copied_to, end) that no replayed stage before it logs: the embeddings on the
        first stage, else the old pipeline's stage starting at its layer has them."""
        held = self.stages[s.move_copied[st.index]]
        s.copies_pending[st.index] = end
        self.counters["kv_copies"] += 1
        self._copy_sends.append(Send(self.workers[st.primary].conn, wire.make(
            "copy_kv", session_id=s.request_id, source_start=held.layer_start, source_end=held.layer_end,
            layer_start=st.layer_start, layer_end=st.layer_end, length=end)))
        if embedded is not None:
            self._log_input(s, st.index, s.copied_to, embedded)
            return
        before = next(x for x in self.stages if x.pipeline == st.pipeline and x.layer_end == st.layer_start)
        if before.index in s.move_copied:
            log = s.logs.get(self._old_input_stage([x for x in self.stages if x.pipeline == s.pipeline], st).index, [])
            self._log_input(s, st.index, s.copied_to, np.concatenate([r for _, r in log])[s.copied_to:end])

    def _move_rows(self, pipeline: int, context: int, copied: set = frozenset()) -> int:
        """Rows of a background replay per step: as many as each primary of the pipeline's
        stages that replay it (not the `copied` stages) is expected to compute in about one
        decode step (_rows_equiv: a decode step of up to 8 rows counts 1), at most a prompt
        chunk, at least 1."""
        rows = self._prefill_rows(context)
        for st in self.stages:
            replays = st.pipeline == pipeline and st.primary and st.index not in copied
            w = self.workers.get(st.primary) if replays else None
            if w is not None:
                rows = min(rows, int(1 / max(w.row_cost * (1 + context / self._ctx_scale()), 1e-6)))
        return max(1, rows)

    def _switch_move(self, s: Session, pos: int) -> None:
        """At a moving session's next trip (its input row at `pos`): once its replay has sent all
        but at most MOVE_CATCH_UP_ROWS of its positions and has no more than a row a replaying
        stage still on its way (a step of the replay in flight or queued, which every new stage
        computes ahead of this trip), the session switches (the trip carries the positions not
        sent yet, from s.catch_up); else the missing ones, this trip's own row included, go on
        replaying. After a refused copy the whole history is replayed, once what was under way
        is through and no other move that is not apart is under way."""
        if s.moving_to is None or s.copies_pending:
            return
        if s.copy_failed:  # the refused copy's positions are replayed: every stage's, from 0
            # on the worker that refused, which serves a retiring stage: the move is no longer
            # apart (later ones wait for it), and its replay waits its turn like any such move
            if s.request_id in self._migrating:
                self._migrating[s.request_id] = False
            if s.moved < s.move_sent or self._replaying_beside_retiring(s):
                return
            s.move_copied, s.copy_failed, s.move_sent, s.moved, s.copied_to = {}, False, 0, 0, 0
            self._send_move(s)
            return
        new = [st for st in self.stages if st.pipeline == s.moving_to]
        # (a replay that keeps pace has a row a stage on its way: each trip sends its own)
        on_the_way = sum(1 for st in new if st.index not in s.move_copied)
        if pos - s.move_sent > MOVE_CATCH_UP_ROWS or pos - s.moved > MOVE_CATCH_UP_ROWS + on_the_way:
            self._send_move(s)
            return
        s.logs = {k: v for k, v in s.logs.items() if k in {st.index for st in new}}
        s.last_by = {}
        first_copied = next((st for st in new if st.index in s.move_copied), None)
        if first_copied is not None and s.copied_to < s.moved:
            # the copies hold [0, copied_to); the replayed positions after them go through the
            # copied stages ahead of the trip, from the replayed stages' outputs (logged as the
            # first copied stage's inputs); those still on their way reach them as any step's
            # outputs now that the session runs there
            rows = np.concatenate([r for _, r in s.logs[first_copied.index]])[s.copied_to:s.moved]
            self._enqueue(first_copied.index, WorkItem(s.request_id, s.copied_to, rows, s.copied_to, False, s.generation), s)
        s.pipeline, s.moving_to, s.catch_up = s.moving_to, None, min(s.move_sent, pos)

    def _replaying_beside_retiring(self, s: Session) -> bool:
        """Whether another move that is not apart (_migrating) is under way: one whose
        replay computes on a worker of a retiring pipeline until its session has its first
        token on the new one (a move waiting to replay a refused copy is not under way yet)."""
        return any(not apart and r != s.request_id and r in self.sessions and not self.sessions[r].copy_failed
                   and self.sessions[r].finish_pending is None for r, apart in self._migrating.items())

    def _call_off_move(self, s: Session) -> None:
        """The session stays where it runs (a re-plan renumbered the pipelines, a worker was
        lost, or it restarts): its replay's queued rows and logs go (no rebuild replays them);
        the results of those in flight are ignored (their stage is not of its pipeline nor of a
        move). _retire moves it again."""
        if s.moving_to is None:
            return
        elsewhere = [st for st in self.stages if st.pipeline != s.pipeline]
        self._drop_queued({s.request_id}, elsewhere)
        for st in elsewhere:
            s.logs.pop(st.index, None)
        s.partial_kv = s.partial_kv or s.move_sent > 0
        s.moving_to, s.move_sent, s.moved, s.copied_to = None, 0, 0, 0
        s.move_copied, s.copies_pending, s.copy_failed = {}, {}, False

    def _on_kv_copied(self, w: Worker, m: dict, now: float) -> list:
        """A move's copy_kv answered: done, or refused (then the move replays those positions
        there instead: _switch_move). An answer no move waits for (called off, superseded by a
        longer copy) is ignored."""
        s = self.sessions.get(m["session_id"])
        st = None if s is None or s.moving_to is None else next(
            (x for x in self.stages if x.pipeline == s.moving_to and x.primary == w.worker_id
             and (x.layer_start, x.layer_end) == (m["layer_start"], m["layer_end"])), None)
        if st is None or s.copies_pending.get(st.index) != m["length"]:
            return []
        del s.copies_pending[st.index]
        if not m["ok"]:
            s.copy_failed = True
            self.counters["kv_copies_failed"] += 1
            self.events.append({"t": now, "kind": "kv_copy_failed", "worker": w.worker_id, "request_id": s.request_id,
                                "stage": st.index, "error": m.get("error")})
        return []
