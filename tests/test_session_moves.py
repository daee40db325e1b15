"""A session moving off a retiring pipeline (coordinator/machine/moves.py: _start_move,
_send_move, _switch_move): its history is replayed on the new pipeline in the background while
it decodes on the old one, then it switches between steps. Driven without sockets
(tests/harness.py), tokens checked against a single worker's."""
import pytest

from actors.faults import lie
from coordinator.records import LOCAL, CoordinatorSettings, Emit, Send
from protocol import wire
from tests.harness import Net, run_until_done, start_net
from tests.tiny_model import greedy_tokens

PROMPT = [5, 17, 42, 99, 7, 123, 250, 11] * 15  # a long history: replayed, it takes many prompt steps
N_TOKENS = 60


def replanned_mid_session(weights, tokens_before: int, **settings):
    """Two workers in two stages serve "s" (and "t"); a third, much faster, joins once "s" has
    streamed `tokens_before` tokens, and the re-plan is made while it loads (it is frozen):
    the old pipeline retires once it is thawed. Prompt steps of 16 rows: a replay of the
    history takes about ten."""
    net = start_net(weights, 2, stages=2, prefill_chunk=16, **settings)
    core = net.core
    net.submit("s", PROMPT, N_TOKENS, stop_at_eos=False)
    net.submit("t", PROMPT[:100], N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("s")) >= tokens_before)
    fast = net.add_worker()
    net.run(until=lambda: core.workers.get(core.conn_worker.get(fast, ""), None) is not None
            and core.workers[core.conn_worker[fast]].state == "idle")
    for w in core.workers.values():
        w.ms_per_layer, w.step_ms_per_layer = (0.1 if w.conn == fast else 1.0), None
    net.frozen.add(fast)
    for _ in range(10):  # a token a tick at most (the harness's compute takes no time)
        n = len(net.tokens("s"))
        net.advance(0.05, until=lambda: len(net.tokens("s")) > n)
    assert any(st.retiring for st in core.stages) and core.stages[core._entry(core.sessions["s"])].retiring
    return net, fast


def thaw(net, conn):
    """The frozen worker handles what it was sent (net.thaw without running the rest to the end)."""
    net.frozen.discard(conn)
    for m in net.held.pop(conn, []):
        for r in net.workers[conn].handle(m):
            net.to_coordinator(conn, r)


def run_watched(net, fast, weights, see) -> None:
    """The frozen joiner thawed, both sessions run to their end, `see(action)` told of every
    action the coordinator takes; every token is a single worker's."""
    perform = net.perform

    def recording(actions):
        for a in actions:
            see(a)
        perform(actions)

    net.perform = recording
    thaw(net, fast)
    run_until_done(net, ["s", "t"])
    assert net.tokens("s") == greedy_tokens(weights, PROMPT, N_TOKENS)
    assert net.tokens("t") == greedy_tokens(weights, PROMPT[:100], N_TOKENS)


def test_a_moving_session_keeps_decoding_while_its_history_replays_on_the_new_pipeline(weights):
    """Both sessions move (one after the other) and neither pauses: between two of a session's
    tokens the other streams 2 at most (1 here). Replayed before its next token (a restart),
    its history of ~150 positions in prompt steps of 16 rows held "s" while "t" streamed 5."""
    net, fast = replanned_mid_session(weights, 30)
    core = net.core
    order = []  # the sessions' tokens as they are streamed, by request id
    run_watched(net, fast, weights, lambda a: order.append(a.request_id) if isinstance(a, Emit) and a.event["type"] == "token" else None)
    assert not any(st.retiring for st in core.stages) and core.workers[core.conn_worker[fast]].steps > 0
    assert any(e["kind"] == "retired" for e in core.events)
    both = order[:min(len(order) - order[::-1].index(r) for r in ("s", "t"))]  # until the first of them ends
    for rid in ("s", "t"):
        mine = [i for i, r in enumerate(both) if r == rid]
        others = [b - a - 1 for a, b in zip(mine, mine[1:])]
        assert max(others) <= 2, (rid, max(others), both)


def test_a_worker_lost_while_a_session_moves_resumes_it_exactly(weights):
    """A worker that is a primary of the old pipeline and of the new one (another range) dies
    while a session replays its history on the new pipeline: the retiring pipeline goes, its
    sessions restart on the new plan (its stage there rebuilt on a standby), and every token is
    still a single worker's."""
    net, fast = replanned_mid_session(weights, 20)
    core = net.core
    both = {st.primary for st in core.stages if st.retiring} & {st.primary for st in core.stages if not st.retiring}
    assert both
    thaw(net, fast)
    net.run(until=lambda: any(s.moving_to is not None and 0 < s.moved < s.move_sent for s in core.sessions.values()))
    assert any(s.moving_to is not None for s in core.sessions.values())  # a replay is under way
    net.kill(core.workers[both.pop()].conn)
    run_until_done(net, ["s", "t"], seconds=60)
    assert net.tokens("s") == greedy_tokens(weights, PROMPT, N_TOKENS)
    assert net.tokens("t") == greedy_tokens(weights, PROMPT[:100], N_TOKENS)


def test_a_new_pipelines_worker_lost_while_a_session_moves_calls_the_move_off(weights):
    """The joining worker, primary of the new pipeline only, dies while a session replays its
    history there: the move is called off (its stage may be repaired on a warm standby that
    holds the range the session decodes on, whose one KV cache the replay would cut), the
    session goes on where it runs and moves again later; every token is a single worker's."""
    net, fast = replanned_mid_session(weights, 20)
    core = net.core
    thaw(net, fast)
    net.run(until=lambda: any(s.moving_to is not None and 0 < s.moved < s.move_sent for s in core.sessions.values()))
    mover = next(s for s in core.sessions.values() if s.moving_to is not None)
    net.kill(fast)
    assert mover.moving_to is None and not any(i.session_id == mover.request_id for st in core.stages
                                               if st.pipeline != mover.pipeline for i in st.queue)
    run_until_done(net, ["s", "t"], seconds=60)
    assert net.tokens("s") == greedy_tokens(weights, PROMPT, N_TOKENS)
    assert net.tokens("t") == greedy_tokens(weights, PROMPT[:100], N_TOKENS)


def test_a_worker_outside_a_moves_pipelines_lost_mid_replay_leaves_the_move_under_way(weights):
    """A worker that holds no stage of the pipeline a session moves to nor of the one it
    decodes on (it joined while the sessions ran, slower: no plan was made for it) dies while
    the session replays its history on the new pipeline: the move goes on (its queued rows
    stay), the session switches over to the new pipeline, and every token is a single
    worker's."""
    net, fast = replanned_mid_session(weights, 20)
    core = net.core
    spare = net.add_worker()
    net.run(until=lambda: core.conn_worker.get(spare) in core.workers and core.workers[core.conn_worker[spare]].state == "idle")
    spare_id = core.conn_worker[spare]
    core.workers[spare_id].ms_per_layer = 5.0  # (no re-plan pays for it)
    # the joining worker's prompt rows cost what the others' do (they learned theirs): the
    # replay goes in chunks of several rows and is through before the sessions end
    core.workers[core.conn_worker[fast]].row_cost = max(w.row_cost for w in core.workers.values() if w.steps)
    thaw(net, fast)
    net.run(until=lambda: any(s.moving_to is not None and 0 < s.moved < s.move_sent for s in core.sessions.values()))
    mover = next(s for s in core.sessions.values() if s.moving_to is not None)
    here, dest = mover.pipeline, mover.moving_to
    assert not any(spare_id in st.holders for st in core.stages if st.pipeline in (here, dest))
    net.kill(spare)
    assert mover.moving_to == dest and any(i.session_id == mover.request_id for st in core.stages
                                           if st.pipeline == dest for i in st.queue)
    net.run(until=lambda: mover.moving_to is None)
    assert mover.pipeline == dest and not mover.partial_kv  # switched over, not called off
    run_until_done(net, ["s", "t"], seconds=60)
    assert net.tokens("s") == greedy_tokens(weights, PROMPT, N_TOKENS)
    assert net.tokens("t") == greedy_tokens(weights, PROMPT[:100], N_TOKENS)


@pytest.mark.parametrize("liar", [False, True])
def test_a_moving_sessions_replay_is_spot_checked(weights, liar):
    """Every step checked by the coordinator's own compute: the replay's steps on the new
    pipeline pass when honest; when the joining worker starts lying mid-replay, it is caught,
    the sessions it touched are recomputed, and what each client ends with is a single
    worker's tokens."""
    net, fast = replanned_mid_session(weights, 20, local=True, spot_check_fraction=1.0)
    core = net.core
    thaw(net, fast)
    net.run(until=lambda: any(s.moving_to is not None and 0 < s.moved < s.move_sent for s in core.sessions.values()))
    fast_id = core.conn_worker[fast]
    if liar:
        lie(net.workers[fast], 50.0)
    run_until_done(net, ["s", "t"], seconds=60)
    assert net.tokens("s") == greedy_tokens(weights, PROMPT, N_TOKENS)
    assert net.tokens("t") == greedy_tokens(weights, PROMPT[:100], N_TOKENS)
    caught = [e["worker"] for e in core.events if e["kind"] == "liar_detected"]
    assert caught == ([fast_id] if liar else []) and core.counters["spot_checks"] > 0
    assert all(e["verifier"] == LOCAL for e in core.events if e["kind"] == "liar_detected")


def split_onto_a_joiner(weights, refuse_copies: bool = False):
    """One worker serves "s" and "t" in one stage; a much faster one joins and the re-plan
    splits it in two: the joiner's first layers, the old worker's last layers and the head (a
    sub-range of the stage it serves on the old pipeline, so it holds their KV already).
    refuse_copies: the old worker answers every copy_kv with a refusal."""
    net = start_net(weights, 1, stages=2, prefill_chunk=16)
    core = net.core
    old = next(iter(net.workers))
    if refuse_copies:
        worker = net.workers[old]
        worker.on_copy_kv = lambda m: [wire.make("kv_copied", session_id=m["session_id"], layer_start=m["layer_start"],
                                                 layer_end=m["layer_end"], length=m["length"], ok=False, error="refused")]
    net.submit("s", PROMPT, N_TOKENS, stop_at_eos=False)
    net.submit("t", PROMPT[:100], N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("s")) >= 10)
    fast = net.add_worker()
    net.run(until=lambda: core.conn_worker.get(fast) in core.workers and core.workers[core.conn_worker[fast]].state == "idle")
    for w in core.workers.values():
        w.ms_per_layer, w.step_ms_per_layer = (0.1 if w.conn == fast else 1.0), None
    # the joiner's prompt rows cost what the old worker's do (it learned its own): the replay
    # goes in chunks of several rows, which this harness's instant compute needs to catch up
    core.workers[core.conn_worker[fast]].row_cost = core.workers[core.conn_worker[old]].row_cost
    net.frozen.add(fast)  # the re-plan is made while it loads
    for _ in range(10):
        n = len(net.tokens("s"))
        net.advance(0.05, until=lambda: len(net.tokens("s")) > n)
    assert any(st.retiring for st in core.stages) and not net.done("s")
    return net, old, fast


def test_a_move_onto_a_stage_of_the_same_worker_copies_its_kv_there_and_replays_only_elsewhere(weights):
    """The old worker is given the moving sessions' KV of its new range (copy_kv from the
    range it serves on the old pipeline): no replay row reaches that stage, only the joiner's
    stage replays (for both sessions at once: their moves compute nothing on the old worker),
    the sessions switch over before they end, the old pipeline retires, and every token is a
    single worker's. The replay computes each trip's own row beside the old pipeline, so a
    switched session's steps on the new pipeline carry one row each: its switch's trip no more
    than any other (the copied stage takes the row replayed after its copy in a step before it)."""
    net, old, fast = split_onto_a_joiner(weights)
    core = net.core
    split = [(core.conn_worker[fast], False), (core.conn_worker[old], True)]
    copies, replayed, switched, together, rows_after = [], [], {}, [], []

    def see(a):
        together.append(sum(1 for x in core.sessions.values() if x.moving_to is not None))
        if isinstance(a, Send) and a.msg["type"] == "copy_kv":
            copies.append((a.conn, a.msg, [(st.primary, st.layer_start > 0) for st in core.stages if not st.retiring]))
        if isinstance(a, Send) and a.msg["type"] == "step":
            for s in filter(None, (core.sessions.get(x["session_id"]) for x in a.msg["sessions"])):
                if a.conn == old and a.msg["layer_start"] > 0 and s.moving_to is not None:
                    replayed.append(s.request_id)  # history computed on the old worker's new stage
                if a.conn == fast and s.moving_to is None:  # decoding on the new pipeline
                    switched.setdefault(s.request_id, len(s.tokens))
                if s.request_id in switched and (a.conn == fast or a.msg["layer_start"] > 0):
                    rows_after.extend(x["length"] for x in a.msg["sessions"] if x["session_id"] == s.request_id)

    run_watched(net, fast, weights, see)
    assert copies and all(c == old and m["source_start"] == 0 and plan == split for c, m, plan in copies)
    assert core.counters["kv_copies_failed"] == 0 and not replayed  # the old worker's new stage computed no history
    assert max(together) == 2  # the moves go at once: neither computes on the old worker
    assert {m["session_id"] for _, m, _ in copies} <= set(switched) and all(n < N_TOKENS for n in switched.values())
    assert rows_after and set(rows_after) == {1}, rows_after
    assert any(e["kind"] == "retired" for e in core.events)
    # a copy the worker cannot make is answered with the reason (the coordinator replays instead)
    held = next(iter(net.workers[old].ranges))
    for source, why in ((0, "not both held"), (held[0], "holds 0 positions, cannot copy 3")):
        ask = wire.make("copy_kv", session_id="s", source_start=source, source_end=held[1], layer_start=held[0],
                        layer_end=held[1], length=3)
        [answer] = net.workers[old].handle(wire.decode(wire.encode(ask)))
        assert answer["type"] == "kv_copied" and not answer["ok"] and why in answer["error"], answer


def test_a_trips_own_row_joins_its_replay_still_queued_on_the_new_pipeline(weights):
    """While a moving session's replay waits at the new pipeline's first stage (its worker
    busy: here frozen), each trip on the old pipeline sends its own row after it, joined to
    the rows still queued there (a step takes one slice a session: one step for them, not one
    each); once the worker goes on, the session switches and every token is a single worker's."""
    net, old, fast = split_onto_a_joiner(weights)
    core = net.core
    s = core.sessions["s"]
    thaw(net, fast)  # it loads; the sessions' moves start
    net.run(until=lambda: s.moving_to is not None)
    net.frozen.add(fast)
    first = next(st for st in core.stages if st.pipeline == s.moving_to)
    queued = lambda: [it for it in first.queue if it.session_id == "s"]  # noqa: E731
    sent, items = [], []
    for _ in range(4):  # trips on the old pipeline while the replay waits
        n = len(net.tokens("s"))
        net.advance(0.05, until=lambda: len(net.tokens("s")) > n)
        sent.append(s.move_sent)
        items.append(len(queued()))
    # every trip's row sent (its copy answered, where one was on its way: then two at the next)
    assert s.moving_to is not None and sent == sorted(set(sent)) and sent[-1] == len(s.prompt_ids) + len(s.tokens), sent
    assert len(set(items)) == 1 and queued()[-1].end == s.move_sent, items  # joined, not queued one each
    thaw(net, fast)
    run_until_done(net, ["s", "t"])
    assert s.moving_to is None and s.pipeline == first.pipeline
    assert net.tokens("s") == greedy_tokens(weights, PROMPT, N_TOKENS)
    assert net.tokens("t") == greedy_tokens(weights, PROMPT[:100], N_TOKENS)


def test_a_refused_kv_copy_falls_back_to_a_replay_on_every_stage_one_move_at_a_time(weights):
    """The old worker refuses the copies: each move replays the whole history on both stages
    of the new pipeline instead, and every token is still a single worker's. That replay
    computes on the old worker, which both sessions still decode on: like any move that is not
    apart, it waits until the move before it has its first token on the new pipeline, so the
    old worker computes one session's history at a time."""
    net, old, fast = split_onto_a_joiner(weights, refuse_copies=True)
    core = net.core
    replayed = []  # the moving session of each step of history on the old worker's new stage

    def see(a):
        if isinstance(a, Send) and a.msg["type"] == "step" and a.conn == old and a.msg["layer_start"] > 0:
            moving = (core.sessions.get(x["session_id"]) for x in a.msg["sessions"])
            replayed.extend(m.request_id for m in moving if m is not None and m.moving_to is not None)

    run_watched(net, fast, weights, see)
    runs = [r for i, r in enumerate(replayed) if i == 0 or replayed[i - 1] != r]
    assert sorted(runs) == ["s", "t"], "".join(replayed)  # each session's replay there in one run, not interleaved
    assert core.counters["kv_copies_failed"] >= 1
    assert any(e["kind"] == "kv_copy_failed" and e["error"] == "refused" for e in core.events)
    assert any(e["kind"] == "retired" for e in core.events)


def test_a_retirement_places_each_moving_session_once(weights):
    """Three workers in three stages serve "s" and "t" (their speeds set, so the plans are
    known); a much faster one joins and the new plan keeps the old last stage (the same range on
    the same worker), so each session restarts there (_start_move): every _retire places each
    session once (Planning._place weighs every pipeline's load), and every token is a single
    worker's."""
    net = Net(weights, CoordinatorSettings(max_ctx=256, probation_steps=0, stages=3, prefill_chunk=16))
    core = net.core
    for _ in range(3):
        net.add_worker()
    net.run()  # measured, not planned yet
    for w, ms in zip(core.workers.values(), (2.0, 1.0, 1.0)):
        w.ms_per_layer = ms
    net.advance(0.5)
    net.submit("s", PROMPT, N_TOKENS, stop_at_eos=False)
    net.submit("t", PROMPT[:100], N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("s")) >= 10)
    fast = net.add_worker()
    net.run(until=lambda: core.conn_worker.get(fast) in core.workers and core.workers[core.conn_worker[fast]].state == "idle")
    for w, ms in zip(core.workers.values(), (0.8, 1.0, 1.0, 0.1)):  # the old last stage's worker the fastest left
        w.ms_per_layer, w.step_ms_per_layer = ms, None
    net.frozen.add(fast)
    for _ in range(10):
        n = len(net.tokens("s"))
        net.advance(0.05, until=lambda: len(net.tokens("s")) > n)
    shape = lambda st: (st.layer_start, st.layer_end, st.primary)  # noqa: E731
    retiring = {shape(st) for st in core.stages if st.retiring}
    assert retiring and any(shape(st) in retiring for st in core.stages if not st.retiring), [shape(st) for st in core.stages]
    place, retire, placed = core._place, core._retire, []  # sessions placed, by _retire call

    def counting_place(s):
        if placed:
            placed[-1].append(s.request_id)
        place(s)

    def counting_retire(now, lost=False):
        placed.append([])
        return retire(now, lost)

    core._place, core._retire = counting_place, counting_retire
    thaw(net, fast)
    run_until_done(net, ["s", "t"])
    assert net.tokens("s") == greedy_tokens(weights, PROMPT, N_TOKENS)
    assert net.tokens("t") == greedy_tokens(weights, PROMPT[:100], N_TOKENS)
    assert any(e["kind"] == "retired" for e in core.events) and not any(st.retiring for st in core.stages)
    assert sorted({r for p in placed for r in p}) == ["s", "t"]
    assert all(len(p) == len(set(p)) for p in placed), placed
