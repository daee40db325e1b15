"""The coordinator's state machine driven without sockets (tests/harness.py): planning,
pipelined decode, failure detection, fencing, exact recovery, quarantine, cancellation."""
import time

import numpy as np
import pytest

from coordinator.records import CoordinatorSettings
from protocol import wire
from tab_worker.generate import LocalGenerator
from model.sampling import SamplingParams
from tests.harness import Net, start_net
from tests.harness import run_until_done as run_until_done_in
from tests.tiny_model import greedy_tokens, tiny_weights

PROMPT = [5, 17, 42, 99, 7, 123, 250, 11]
N_TOKENS = 24


@pytest.fixture(scope="module")
def reference(weights):
    return greedy_tokens(weights, PROMPT, N_TOKENS)


start = start_net


def run_until_done(net, rids, seconds=30):
    return run_until_done_in(net, rids, seconds)


@pytest.mark.parametrize("n_workers", [1, 2, 4])
def test_pipeline_tokens_equal_single_worker(weights, reference, n_workers):
    net = start(weights, n_workers)
    assert len(net.core.stages) == n_workers
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    assert net.events["r"][-1] == {"type": "done", "finish_reason": "length", "tokens": N_TOKENS, "prompt_tokens": len(PROMPT)}


def test_plan_covers_every_layer_once_and_head_last(weights):
    net = start(weights, 3)
    stages = net.core.stages
    assert stages[0].layer_start == 0 and stages[-1].layer_end == weights.config.n_layers
    assert all(a.layer_end == b.layer_start for a, b in zip(stages, stages[1:]))
    assert [s.include_head for s in stages] == [False, False, True]


def test_coordinator_weighs_the_head_by_its_parameters(smollm2_model):
    # SmolLM2-135M: a 49152 x 576 head against 30 layers of 3.54 M weights each
    from types import SimpleNamespace

    from coordinator.state import Coordinator

    assert Coordinator._head_cost_layers(SimpleNamespace(config=smollm2_model.config)) == pytest.approx(8.0, abs=0.01)


def test_speed_measurement_reports_the_fastest_step(monkeypatch):
    """Sibling tabs preempt some of a joining tab's timed steps: the planner gets its own speed."""
    from tab_worker import worker as worker_module
    from tab_worker.worker import TabWorker

    cfg = tiny_weights().config
    made = worker_module.make_backend

    def with_a_preempted_step(*args, **kw):
        backend = made(*args, **kw)
        forward, calls = backend.forward, []

        def forward_slowly_once(slices, hidden):
            calls.append(1)
            if len(calls) == 3:  # the second timed step: another process held the core
                time.sleep(0.3)
            return forward(slices, hidden)

        backend.forward = forward_slowly_once
        return backend

    monkeypatch.setattr(worker_module, "make_backend", with_a_preempted_step)
    [result] = TabWorker("t", backend="numpy").on_measure({"model": cfg.to_dict(), "tokens": 8})
    # a step of the tiny layer takes well under a millisecond; the mean of 7 would be over 40 ms
    assert result["type"] == "measurement" and 0 < result["step_ms"] < 20


def test_many_sessions_batch_and_stay_exact(weights, reference):
    net = start(weights, 2)
    for i in range(5):
        net.submit(f"r{i}", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, [f"r{i}" for i in range(5)])
    for i in range(5):
        assert net.tokens(f"r{i}") == reference
    # decode steps of different sessions shared stage steps
    assert net.core.counters["steps"] < 5 * (N_TOKENS + 1) * 2


@pytest.mark.parametrize("victim_stage", [0, 1, 2])
def test_killed_worker_mid_decode_gives_identical_tokens(weights, reference, victim_stage):
    net = start(weights, 4)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= 6)
    net.kill(net.stage_conn(victim_stage))
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    kinds = [e["kind"] for e in net.core.events]
    assert "death" in kinds and "rebuild" in kinds and "recovered" in kinds
    # the recovery names the primary lost (the scenario report matches a fault to its tab's)
    dead = next(e["worker"] for e in net.core.events if e["kind"] == "death")
    assert [e["worker"] for e in net.core.events if e["kind"] == "recovered"] == [dead]


def test_a_stage_lost_while_no_session_runs_awaits_no_recovery(weights, reference):
    """The time from a primary's loss to the next token is a recovery only when a session
    waited on it: lost while the cluster idled, the next token comes whenever a client next
    asks (churn at seed 21 reported 12.9 s of no request as a recovery)."""
    net = start(weights, 3)
    net.submit("r0", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["r0"])
    net.kill(net.stage_conn(1))
    net.run(until=lambda: not any(st.needs_rebuild for st in net.core.stages))
    assert not net.core._awaiting_recovery
    net.submit("r1", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["r1"])
    assert net.tokens("r1") == reference
    assert "death" in [e["kind"] for e in net.core.events] and "recovered" not in [e["kind"] for e in net.core.events]


def test_a_long_history_is_rebuilt_in_prompt_sized_steps(weights):
    """A stage lost after a long prompt replays that history in steps no larger than a prompt
    step (all of it in one step would outlast what a deadline can judge); the tokens are those
    of an uninterrupted run."""
    prompt = [1 + (i * 7) % 250 for i in range(200)]
    calm = start(weights, 3, prefill_chunk=32)
    calm.submit("r", prompt, 12, stop_at_eos=False)
    run_until_done(calm, ["r"])
    net = start(weights, 3, prefill_chunk=32)
    net.submit("r", prompt, 12, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= 4)
    rows = []
    for w in net.workers.values():
        def spy(m, handle=w.handle):
            if m["type"] == "step":
                rows.append(sum(int(x["length"]) for x in m["sessions"]))
            return handle(m)
        w.handle = spy
    net.kill(net.stage_conn(1))
    run_until_done(net, ["r"])
    assert net.tokens("r") == calm.tokens("r") and len(calm.tokens("r")) == 12
    assert "rebuild" in [e["kind"] for e in net.core.events]
    assert sum(rows) >= len(prompt) and max(rows) <= 32, rows  # the whole history, in chunks


def test_silent_worker_detected_within_a_second_and_fenced(weights, reference):
    net = start(weights, 3)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= 5)
    victim = net.stage_conn(1)
    victim_id = net.core.conn_worker[victim]
    net.frozen.add(victim)
    frozen_at = net.now
    run_until_done(net, ["r"])
    death = next(e for e in net.core.events if e["kind"] == "death" and e["worker"] == victim_id)
    assert death["t"] - frozen_at <= 1.0
    assert net.tokens("r") == reference
    # the frozen worker wakes up and answers its stale step: ignored (fenced)
    ignored = net.core.counters["late_results_ignored"]
    net.frozen.discard(victim)
    for m in net.held.pop(victim, []):
        for r in net.workers[victim].handle(m):
            net.perform(net.core.on_message(victim, r, net.now))
    assert net.core.workers[victim_id].state == "dead"
    assert net.core.counters["late_results_ignored"] >= ignored
    assert victim in net.closed


def test_slow_worker_is_suspect_not_dead(weights):
    net = start(weights, 2, step_deadline_min_ms=100, step_deadline_factor=1.0, suspect_evict_factor=1000)
    net.submit("r", PROMPT, 4, stop_at_eos=False)
    victim = net.stage_conn(0)
    net.frozen.add(victim)  # holds its messages but keeps heartbeating below
    for _ in range(10):
        net.now += 0.05
        net.to_coordinator(victim, net.workers[victim].heartbeat(1))
        for c in net.workers:
            if c != victim:
                net.to_coordinator(c, net.workers[c].heartbeat(1))
        net.run()
        net.perform(net.core.tick(net.now))
    assert net.core.workers[net.core.conn_worker[victim]].state == "suspect"
    net.frozen.discard(victim)
    for m in net.held.pop(victim, []):
        for r in net.workers[victim].handle(m):
            net.to_coordinator(victim, r)
    run_until_done(net, ["r"])
    assert net.core.workers[net.core.conn_worker[victim]].state == "ready"


def _tick_heartbeating_until_gone(net, worker_id: str, until: float) -> None:
    """Advance the clock 10 ms at a time, every worker heartbeating (a frozen one's steps held),
    until `worker_id` is gone or `until`."""
    net.advance_until(lambda: not net.core.workers[worker_id].alive, until - net.now, step=0.01)


@pytest.mark.parametrize("case", ["standby", "preloaded", "nobody"])
def test_a_late_primary_whose_stage_a_standby_holds_ready_is_evicted_sooner(weights, reference, case):
    """Chaos at seeds 9 and 10: each slowed tab stalled its pipeline 6 to 20 s, until its step was
    suspect_evict_factor deadlines late. Stage 0 here has a standby holding its range ready: at
    suspect_takeover_factor deadlines the late primary is evicted and the standby replays the
    stage at once. Stage 1 has none: at the suspicion a worker that is no primary (stage 0's
    standby) loads its range (chaos at seed 12: four slowed primaries waited 6 s each with free
    tabs about) and takes it at suspect_takeover_factor deadlines too; with no such worker
    (stage 0's standby gone) the stage waits suspect_evict_factor deadlines. The tokens are
    exact in every case."""
    net = start(weights, 3, stages=2, step_deadline_min_ms=100, step_deadline_factor=1.0)
    core = net.core
    assert len(core.stages) == 2 and len(core.stages[0].holders) == 2 and core.stages[1].holders == [core.stages[1].primary]
    standby = core.stages[0].holders[1]
    stage = 0 if case == "standby" else 1
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= 4)
    if case == "nobody":
        net.kill(core.workers[standby].conn)
    victim = net.stage_conn(stage)
    victim_id = core.conn_worker[victim]
    net.frozen.add(victim)  # its steps held, its heartbeats below
    net.run(until=lambda: core.stages[stage].inflight is not None and core.stages[stage].inflight.worker == victim_id)
    step = core.stages[stage].inflight
    allowed = step.deadline - step.sent_at
    _tick_heartbeating_until_gone(net, victim_id, step.sent_at + 10 * allowed)
    death = next(e for e in core.events if e["kind"] == "death" and e["worker"] == victim_id)
    factor = core.settings.suspect_evict_factor if case == "nobody" else core.settings.suspect_takeover_factor
    assert step.sent_at + factor * allowed < death["t"] <= step.sent_at + factor * allowed + 0.02 + 1e-9, (death, allowed)
    assert ("a worker holding its range ready takes its stage" in death["reason"]) == (case != "nobody"), death
    preloads = [e for e in core.events if e["kind"] == "preload"]
    assert preloads == ([] if case != "preloaded" else [{"t": preloads[0]["t"], "kind": "preload", "worker": standby, "stage": 1,
                                                          "suspect": victim_id}])
    if case != "nobody":
        assert core.stages[stage].primary == standby
    net.frozen.discard(victim)
    net.held.pop(victim, None)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference


def test_a_suspected_primarys_range_is_preloaded_again_when_its_first_preloader_dies(weights, reference):
    """Chaos at seed 12: the worker pre-loading a suspected primary's range died before it was
    ready, and the stage waited out suspect_evict_factor deadlines. Each tick of the suspicion
    looks again: a worker that joins meanwhile loads the range and takes the stage at
    suspect_takeover_factor deadlines."""
    net = start(weights, 3, stages=2, step_deadline_min_ms=100, step_deadline_factor=1.0)
    core = net.core
    st1 = core.stages[1]
    assert st1.holders == [st1.primary]
    first = core.stages[0].holders[1]  # stage 0's standby: the one candidate
    net.frozen.add(core.workers[first].conn)  # its load will be held
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= 4)
    victim = net.stage_conn(1)
    victim_id = core.conn_worker[victim]
    net.frozen.add(victim)
    net.run(until=lambda: st1.inflight is not None and st1.inflight.worker == victim_id)
    step = st1.inflight
    allowed = step.deadline - step.sent_at
    _tick_heartbeating_until_gone(net, victim_id, step.deadline + 0.015)
    assert [e["worker"] for e in core.events if e["kind"] == "preload"] == [first]
    net.kill(core.workers[first].conn)
    joined = net.add_worker()
    _tick_heartbeating_until_gone(net, victim_id, step.sent_at + 10 * allowed)
    second = core.conn_worker[joined]
    assert [e["worker"] for e in core.events if e["kind"] == "preload"] == [first, second]
    death = next(e for e in core.events if e["kind"] == "death" and e["worker"] == victim_id)
    factor = core.settings.suspect_takeover_factor
    assert step.sent_at + factor * allowed < death["t"] <= step.sent_at + factor * allowed + 0.02 + 1e-9, (death, allowed)
    assert st1.primary == second
    net.frozen.discard(victim)
    net.held.pop(victim, None)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference


def _drop_a_frozen_workers_step(weights):
    """Two stages; stage 1's primary frozen (its steps held, its heartbeats sent by the caller)
    with a step in flight, which the stage then drops as a re-plan or a retirement does.
    Returns (net, its conn, its worker id, the step)."""
    net = start(weights, 3, stages=2, step_deadline_min_ms=100, step_deadline_factor=1.0)
    core = net.core
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= 4)
    victim = net.stage_conn(1)
    victim_id = core.conn_worker[victim]
    net.frozen.add(victim)
    net.run(until=lambda: core.stages[1].inflight is not None and core.stages[1].inflight.worker == victim_id)
    step = core.stages[1].inflight
    core._drop_inflight(core.stages[1])
    assert core.stages[1].inflight is None
    return net, victim, victim_id, step


def test_a_step_no_stage_waits_on_any_more_still_gets_its_worker_evicted_when_far_late(weights):
    """Chaos at seed 12: a re-plan dropped a step in flight on a tab slowed 2000x (no stage
    waited on it, so no deadline judged it); the tab stayed "healthy", held the spot checks it was
    sent (three streams' ends waited 61 s for them) and, made a standby, left a stage whose
    primary died waiting 43 s for a load queued behind the step. A dropped step's worker is judged
    by the step's deadline: suspect past it, evicted at suspect_evict_factor deadlines."""
    net, _, victim_id, step = _drop_a_frozen_workers_step(weights)
    core = net.core
    allowed = step.deadline - step.sent_at
    _tick_heartbeating_until_gone(net, victim_id, step.sent_at + 10 * allowed)
    kinds = [(e["kind"], e.get("worker")) for e in core.events]
    assert ("suspect", victim_id) in kinds
    death = next(e for e in core.events if e["kind"] == "death" and e["worker"] == victim_id)
    factor = core.settings.suspect_evict_factor
    assert step.sent_at + factor * allowed < death["t"] <= step.sent_at + factor * allowed + 0.02 + 1e-9, (death, allowed)
    assert not core._dropped_steps


def test_a_dropped_step_answered_late_clears_its_worker_of_suspicion(weights):
    """The other half: a worker suspected over a step no stage waits on any more, and that then
    answers it, is ready again and judged by it no longer (not evicted later)."""
    net, victim, victim_id, step = _drop_a_frozen_workers_step(weights)
    core = net.core
    allowed = step.deadline - step.sent_at
    _tick_heartbeating_until_gone(net, victim_id, step.sent_at + 2 * allowed)
    assert core.workers[victim_id].state == "suspect"
    net.thaw(victim)  # it answers the dropped step
    assert core.workers[victim_id].state != "suspect" and not core._dropped_steps
    _tick_heartbeating_until_gone(net, victim_id, step.sent_at + 10 * allowed)
    assert core.workers[victim_id].alive


def test_a_lost_primary_whose_range_a_replica_serves_goes_to_that_replica_with_nothing_to_load(weights, reference):
    """#18's "serving while tabs load" on a loss: a stage whose primary dies with no standby of
    its own goes to a worker that serves the same range in another pipeline (a replica): it
    replays the stage's sessions at once, where a free worker would first load the range (and a
    stalled primary is evicted at suspect_takeover_factor deadlines, as with a standby)."""
    net = start(weights, 4, stages=2)
    core = net.core
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= 4)
    # the first stage of the stream's pipeline, and the same range in the other pipeline
    first = min((st for st in core.stages if st.pipeline == core.sessions["r"].pipeline), key=lambda st: st.layer_start)
    twin = next(st for st in core.stages if st.pipeline != first.pipeline and (st.layer_start, st.layer_end) == (first.layer_start, first.layer_end))
    replica = twin.primary
    for wid in first.holders[1:]:  # no standby of its own: only the other pipeline holds the range
        first.holders.remove(wid)
        first.ready.discard(wid)
    assert replica not in first.holders and replica in twin.ready
    lost_at = net.now
    net.kill(net.stage_conn(first.index))
    assert first.primary == replica and replica in first.ready
    rebuild = next(e for e in core.events if e["kind"] == "rebuild" and e["stage"] == first.index and e["t"] >= lost_at)
    assert rebuild["worker"] == replica and rebuild["t"] == lost_at  # at once: nothing to load
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference


@pytest.mark.parametrize("order", ["assigned_then_suspected", "suspected_then_assigned"])
def test_a_suspect_that_answers_while_its_load_is_out_is_loading_until_loaded(weights, reference, order):
    """A stage's primary is late with a step (suspect) while it loads the range of the other
    stage, whose primary died: its late answer comes before its `ready`. It is `loading` then,
    not `ready` (which would say it serves everything it holds), and `ready` once loaded; the
    lost stage is rebuilt on it and the tokens are exact."""
    net = start(weights, 2, step_deadline_min_ms=100, step_deadline_factor=1.0, suspect_evict_factor=1000)
    core = net.core
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= 4)
    late_conn, lost_conn = net.stage_conn(0), net.stage_conn(1)
    late = core.workers[core.conn_worker[late_conn]]
    net.frozen.add(late_conn)  # its messages held (its step among them); it heartbeats below
    net.run(until=lambda: late_conn in net.held)

    def tick_until(done):
        for _ in range(20):
            if done():
                return
            net.now += 0.05
            for c in net.workers:
                if c != lost_conn:
                    net.to_coordinator(c, net.workers[c].heartbeat(1))
            net.run()
            net.perform(core.tick(net.now))
        raise AssertionError(f"{late.worker_id} is {late.state}")

    if order == "suspected_then_assigned":
        tick_until(lambda: late.state == "suspect")
    net.kill(lost_conn)  # its stage goes to the late worker, the only one left
    net.run()
    assert late.loading and core.stages[1].primary == late.worker_id and late.worker_id not in core.stages[1].ready
    tick_until(lambda: late.state == "suspect")
    held = net.held[late_conn]
    answered = next(i for i, m in enumerate(held) if m["type"] == "assign")  # (its step came before the assignment)
    assert any(m["type"] == "step" for m in held[:answered])
    for m in held[:answered]:
        for r in net.workers[late_conn].handle(m):
            net.to_coordinator(late_conn, r)
    net.held[late_conn] = held[answered:]
    net.run()
    assert late.steps and late.loading and late.state == "loading"
    assert next(w for w in core.status(net.now)["workers"] if w["worker_id"] == late.worker_id)["state"] == "loading"
    net.thaw(late_conn)  # the assignment and its weights: loaded
    assert late.state == "ready" and not late.loading and late.worker_id in core.stages[1].ready
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference


def _tab_on_trial_picked_by_a_repair(weights, **settings):
    """A trusted tab, a second tab on trial whose messages are held (its trial assignment and
    weights), the trusted tab killed: the repair gives the stage to the tab on trial, the only
    tab left. Returns the net, the tab's conn, its Worker record, the stage, and the held
    messages split at the stage's assignment (the trial's, then the stage's)."""
    net = Net(weights, CoordinatorSettings(max_ctx=256, stages=1, probation_steps=3, **settings), local=True)
    core = net.core
    trusted_conn = net.add_worker()
    net.run()
    net.advance(0.5)
    net.submit("warm", PROMPT, 6)
    net.advance(1.0)  # its first steps checked by the coordinator's compute: trusted
    assert not core.workers[core.conn_worker[trusted_conn]].probation
    trial_conn = net.add_worker()
    net.run()
    for _ in range(20):  # measured, then a tick puts it on trial
        net.now += 0.05
        for c in (trusted_conn, trial_conn):
            net.to_coordinator(c, net.workers[c].heartbeat(0))
        net.run()
        net.perform(core.tick(net.now))
        if core._trials:
            break
        net.run()
    net.frozen.add(trial_conn)  # its trial assignment and weights held: its trial load is out
    net.run()
    w = core.workers[core.conn_worker[trial_conn]]
    assert w.probation and w.state == "loading" and not core._trials[w.worker_id]["ready"]
    net.kill(trusted_conn)  # the stage goes to the tab on trial, the only tab left
    net.run()
    st = core.stages[0]
    assert st.primary == w.worker_id and w.loading and w.worker_id not in st.ready
    held = net.held[trial_conn]
    stage_assign = [i for i, m in enumerate(held) if m["type"] == "assign"][1]
    del net.held[trial_conn]
    return net, trial_conn, w, st, held[:stage_assign], held[stage_assign:]


def _deliver(net, conn, messages):
    """`messages` handled by the worker at `conn`, its answers sent up and handled."""
    for m in messages:
        for r in net.workers[conn].handle(m):
            net.to_coordinator(conn, r)
    net.run()


def test_a_tab_on_trial_picked_by_a_repair_is_loading_until_its_stage_is_loaded(weights, reference):
    """A tab on trial, still loading its trial range, is the only tab left when the trusted
    primary dies: the repair assigns it the stage too. Its trial's `ready` comes first; it is
    `loading` then (the stage's load is still out), not `ready`, and `ready` once the stage is
    loaded; the trial goes on, and the stage is rebuilt on it with exact tokens."""
    net, trial_conn, w, st, trial_msgs, stage_msgs = _tab_on_trial_picked_by_a_repair(weights)
    core = net.core
    _deliver(net, trial_conn, trial_msgs)  # its trial `ready`
    net.held[trial_conn] = stage_msgs
    assert core._trials[w.worker_id]["ready"] and w.loading and w.state == "loading"
    assert w.load_deadline is not None  # the stage's load still has its deadline
    assert next(x for x in core.status(net.now)["workers"] if x["worker_id"] == w.worker_id)["state"] == "loading"
    net.thaw(trial_conn)  # the stage's assignment: loaded
    assert w.state == "ready" and not w.loading and w.worker_id in st.ready and w.load_deadline is None
    assert w.worker_id in core._trials
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference


def test_a_tab_on_trial_that_answers_its_stage_first_is_loading_until_its_trial_is_ready(weights, reference):
    """The opposite order, which a hostile or buggy tab may send: the stage's `ready` before
    its trial's. The stage is rebuilt on the tab and it serves with exact tokens, but it stays
    `loading`, its trial's load deadline kept, until its trial's `ready`; then `ready`."""
    net, trial_conn, w, st, trial_msgs, stage_msgs = _tab_on_trial_picked_by_a_repair(weights)
    core = net.core
    _deliver(net, trial_conn, stage_msgs)  # the stage's `ready`; its trial's messages stay held
    assert w.worker_id in st.ready and not w.loading and not core._trials[w.worker_id]["ready"]
    assert w.state == "loading" and w.load_deadline is not None
    net.frozen.discard(trial_conn)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference and w.steps > 0 and w.alive
    assert w.state == "loading" and w.load_deadline is not None
    _deliver(net, trial_conn, trial_msgs)
    assert core._trials[w.worker_id]["ready"] and w.state == "ready" and w.load_deadline is None


def test_a_tab_on_trial_suspected_while_its_trial_loads_is_loading_when_it_answers(weights, reference):
    """The tab on trial serves the stage (its stage's `ready` came first), misses a step's
    deadline and answers it late while its trial's load is still out: `loading` again, not
    `ready`, until its trial's `ready`."""
    net, trial_conn, w, st, trial_msgs, stage_msgs = _tab_on_trial_picked_by_a_repair(
        weights, step_deadline_min_ms=100, step_deadline_factor=1.0, suspect_evict_factor=1000)
    core = net.core
    _deliver(net, trial_conn, stage_msgs)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: trial_conn in net.held)  # its first step held
    for _ in range(20):
        net.now += 0.05
        net.to_coordinator(trial_conn, net.workers[trial_conn].heartbeat(1))
        net.run()
        net.perform(core.tick(net.now))
        if w.state == "suspect":
            break
    assert w.state == "suspect" and not core._trials[w.worker_id]["ready"]
    net.thaw(trial_conn)  # its step answered late
    assert w.steps and w.alive and w.state == "loading" and w.load_deadline is not None
    _deliver(net, trial_conn, trial_msgs)
    assert w.state == "ready" and w.load_deadline is None
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference


def test_a_tab_on_trial_that_answers_its_stage_but_never_its_trial_is_lost_at_the_load_deadline(weights, reference):
    """A tab on trial serves the stage a repair gave it but never answers its trial's load:
    the trial's load deadline still holds, and the tab is lost at it; the stage goes back to
    the coordinator's compute and a stream after it keeps exact tokens."""
    net, trial_conn, w, st, trial_msgs, stage_msgs = _tab_on_trial_picked_by_a_repair(weights)
    _deliver(net, trial_conn, stage_msgs)
    net.frozen.discard(trial_conn)  # it heartbeats and serves; its trial's messages never reach it
    deadline = w.load_deadline
    assert deadline is not None and w.worker_id in st.ready
    net.advance(deadline - net.now - 0.5, step=0.25)
    assert w.alive and w.state == "loading"
    net.advance(1.0, step=0.25)
    assert not w.alive and "trial range at the load deadline" in w.why
    assert w.worker_id not in net.core._trials and w.worker_id not in st.ready
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference


def _refuse_the_stage(net, trial_conn, stage_msgs):
    """The tab on trial refuses the stage's assignment (no room for a second copy of the range
    while its trial's is on the way); its trial's messages stay held. Its memory is back after."""
    tab = net.workers[trial_conn]
    memory, tab.memory_bytes = tab.memory_bytes, 1
    _deliver(net, trial_conn, stage_msgs)
    tab.memory_bytes = memory


def test_a_tab_on_trial_that_refuses_its_stage_is_loading_until_its_trial_is_ready(weights, reference):
    """A tab on trial refuses the stage a repair gave it while its trial still loads: the stage
    goes elsewhere (the coordinator's compute) as any refused one does, but the tab stays
    `loading`, its load deadline kept, until its trial's `ready`; then `ready`."""
    net, trial_conn, w, st, trial_msgs, stage_msgs = _tab_on_trial_picked_by_a_repair(weights)
    core = net.core
    _refuse_the_stage(net, trial_conn, stage_msgs)
    assert any(e["kind"] == "refused" and e["worker"] == w.worker_id for e in core.events)
    assert st.primary != w.worker_id and w.worker_id not in st.holders and not w.stages and not w.loading
    assert w.state == "loading" and w.load_deadline is not None and not core._trials[w.worker_id]["ready"]
    net.frozen.discard(trial_conn)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    assert w.state == "loading" and w.load_deadline is not None
    _deliver(net, trial_conn, trial_msgs)
    assert core._trials[w.worker_id]["ready"] and w.state == "ready" and w.load_deadline is None


def test_a_tab_on_trial_that_refuses_its_stage_and_never_answers_its_trial_is_lost_at_the_load_deadline(weights, reference):
    """The same refusal, and its trial's load never answered: `loading` up to the load
    deadline, lost at it; the stage stays on the coordinator's compute with exact tokens."""
    net, trial_conn, w, st, trial_msgs, stage_msgs = _tab_on_trial_picked_by_a_repair(weights)
    _refuse_the_stage(net, trial_conn, stage_msgs)
    net.frozen.discard(trial_conn)  # it heartbeats; its trial's messages never reach it
    deadline = w.load_deadline
    assert deadline is not None
    net.advance(deadline - net.now - 0.5, step=0.25)
    assert w.alive and w.state == "loading"
    net.advance(1.0, step=0.25)
    assert not w.alive and "trial range at the load deadline" in w.why and w.worker_id not in net.core._trials
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference


def test_a_tab_trusted_by_its_own_steps_whose_trial_passes_later_passes_probation_once(weights, reference):
    """A tab on trial serves the stage a repair gave it (its stage's `ready` first): its checked
    steps earn it trust while its trial still loads. Its trial then loads and passes its steps
    too: the probation was passed once (one `trusted` event, counted once), and the trial ends."""
    net, trial_conn, w, st, trial_msgs, stage_msgs = _tab_on_trial_picked_by_a_repair(weights)
    core = net.core
    passed = core.counters["probations_passed"]
    _deliver(net, trial_conn, stage_msgs)
    net.frozen.discard(trial_conn)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    assert not w.probation and core.counters["probations_passed"] == passed + 1 and w.worker_id in core._trials
    _deliver(net, trial_conn, trial_msgs)
    net.advance(3.0)
    assert w.worker_id not in core._trials and w.state == "ready" and w.proven_steps > core.settings.probation_steps
    assert core.counters["probations_passed"] == passed + 1
    assert [e["worker"] for e in core.events if e["kind"] == "trusted"].count(w.worker_id) == 1


def test_replica_standby_takes_over_without_download(weights, reference):
    net = start(weights, 4, replicas=2, stages=2)
    assert all(len(s.holders) == 2 for s in net.core.stages)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= 4)
    sent = net.core.counters["weight_bytes_sent"]
    net.kill(net.stage_conn(0))
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    assert net.core.counters["weight_bytes_sent"] == sent


def test_worker_joining_mid_session_is_used_by_later_sessions(weights, reference):
    net = start(weights, 1)
    first = net.core.stages[0].primary
    net.submit("a", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("a")) >= 3)
    late = net.add_worker()
    for k in range(6):  # time passes while "a" decodes a token per 0.1 s
        net.advance(0.1, until=lambda: len(net.tokens("a")) >= 4 + k)
    assert not net.done("a")
    # the running session keeps its pipeline (the late worker came as a serving replica beside it)
    assert net.core.stages[0].primary == first and net.core.sessions["a"].generation == 0
    run_until_done(net, ["a"])
    assert net.tokens("a") == reference
    net.advance(0.6)
    # the model fits one worker: the late one holds it too (a replica's primary, or its standby)
    assert any(net.core.conn_worker[late] in s.holders for s in net.core.stages)
    net.submit("b", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["b"])
    assert net.tokens("b") == reference


def test_cancel_frees_every_stage(weights):
    net = start(weights, 2)
    net.submit("r", PROMPT, 100, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= 2)
    net.perform(net.core.cancel("r", net.now))
    net.advance(0.2)
    for w in net.workers.values():
        assert all("r" not in b.sessions() for b in w.ranges.values())
    assert "r" not in net.core.sessions


def test_malformed_message_quarantines_only_the_offender(weights, reference):
    net = start(weights, 2)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= 3)
    bad = net.add_worker()
    net.run()
    bad_id = net.core.conn_worker[bad]
    err = wire.ProtocolError("malformed", "garbage frame", None)
    net.perform(net.core.on_protocol_error(bad, err, net.now))
    assert net.core.workers[bad_id].state == "quarantined"
    assert net.closed[bad][0] == 1008
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference


def test_wrong_shape_result_is_rejected_and_recomputed(weights, reference):
    net = start(weights, 3)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= 3)
    liar = net.stage_conn(0)
    real = net.workers[liar].on_step

    def lying_step(m):
        out = real(m)
        out[0]["output"] = np.zeros((out[0]["output"].shape[0], 7), np.float32)
        return out

    net.workers[liar].on_step = lying_step
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    assert net.core.workers[net.core.conn_worker.get(liar, "w1")].state == "quarantined" or liar in net.closed


def test_bad_join_token_is_refused(weights):
    net = Net(weights, CoordinatorSettings(max_ctx=256), token="secret")
    conn = net.add_worker(token="wrong")
    net.run()
    assert net.closed[conn][0] == 1008
    assert net.core.counters["rejected_joins"] == 1 and not net.core.workers


def test_no_capacity_fails_with_retriable_error(weights):
    net = Net(weights, CoordinatorSettings(max_ctx=256, request_timeout_s=1.0, coordinator_compute=False))
    net.submit("r", PROMPT, 4)
    net.advance(1.5)
    err = net.events["r"][-1]
    assert err["type"] == "error" and err["retriable"] is True
    assert "workers: none has joined" in err["message"]
    assert net.core.status(net.now)["unserved_reason"].startswith("workers: none has joined")


def test_a_plan_short_of_memory_says_so_to_status_and_clients(weights):
    net = Net(weights, CoordinatorSettings(max_ctx=256, request_timeout_s=1.0, coordinator_compute=False, probation_steps=0))
    net.add_worker(memory_bytes=4096)  # not one layer of the tiny model
    net.run()
    net.advance(0.6)
    reason = net.core.status(net.now)["unserved_reason"]
    assert reason.startswith("memory: ") and "cannot hold" in reason
    net.submit("r", PROMPT, 4)
    net.advance(1.5)
    err = net.events["r"][-1]
    assert err["type"] == "error" and err["code"] == "no_capacity" and "memory: " in err["message"]
    net.add_worker()  # one that can hold the model: the plan is made and the reason goes
    net.run()
    net.advance(0.6)
    assert net.core.status(net.now)["unserved_reason"] is None


def test_coordinator_compute_serves_when_every_worker_dies(weights, reference):
    net = Net(weights, CoordinatorSettings(max_ctx=256), local=True)
    net.add_worker()
    net.run()
    net.advance(0.5)
    assert net.core.stages[0].primary != "local"
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= 4)
    net.kill(net.stage_conn(0))
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    assert net.core.status(net.now)["degraded"] is True


def test_seeded_sampling_is_reproducible_across_a_failure(weights):
    params = SamplingParams(greedy=False, temperature=0.8, top_p=0.95, seed=7)
    net = start(weights, 3)
    net.submit("a", PROMPT, N_TOKENS, params, stop_at_eos=False)
    run_until_done(net, ["a"])
    net2 = start(weights, 3)
    net2.submit("b", PROMPT, N_TOKENS, params, stop_at_eos=False)
    net2.run(until=lambda: len(net2.tokens("b")) >= 7)
    net2.kill(net2.stage_conn(2))
    run_until_done(net2, ["b"])
    assert net.tokens("a") == net2.tokens("b")


def test_memory_refusal_replans_elsewhere(weights, reference):
    net = Net(weights, CoordinatorSettings(max_ctx=256))
    small = net.add_worker()
    net.workers[small].memory_bytes = 1  # announced 4 GiB in hello, then finds it has no room
    net.add_worker()
    net.run()
    net.advance(1.0)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    assert any(e["kind"] == "refused" for e in net.core.events)
    assert all(net.core.conn_worker[small] not in s.holders for s in net.core.stages)


def test_prefix_cache_reuses_a_shared_prompt_prefix_exactly(weights):
    system = list(range(20, 60))  # a 40-token shared prefix, like a chat template's system prompt
    a, b = system + [5, 6, 7], system + [8, 9]
    gen = LocalGenerator(weights, backend="numpy", max_ctx=256)
    ref_b = list(gen.generate(b, N_TOKENS, stop_at_eos=False))
    net = start(weights, 3)
    net.submit("a", a, 4, stop_at_eos=False)
    run_until_done(net, ["a"])
    assert len(net.core.prefix_cache) == 1
    rows_before = net.sent_bytes
    net.submit("b", b, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["b"])
    assert net.tokens("b") == ref_b
    assert net.core.counters["prefix_hits"] == 1 and net.core.counters["prefix_tokens_reused"] == 40
    del rows_before
    # a failure after the fork still rebuilds b exactly: its logs include the reused prefix
    net.submit("c", b, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("c")) >= 3)
    net.kill(net.stage_conn(1))
    run_until_done(net, ["c"])
    assert net.tokens("c") == ref_b


def test_prefix_cache_is_bounded_lru(weights):
    net = start(weights, 1, prefix_cache_entries=2)
    for i in range(4):
        net.submit(f"p{i}", [100 + i] * 20, 2, stop_at_eos=False)
        run_until_done(net, [f"p{i}"])
    assert len(net.core.prefix_cache) == 2
    held = set(next(iter(net.workers.values())).ranges[(0, 6)].sessions())
    assert held == set(net.core.prefix_cache)


def test_batch_limit_shrinks_only_when_long_steps_stop_paying_for_their_rows(weights):
    net = start(weights, 1, max_batch=8, target_step_ms=100)
    st = net.core.stages[0]
    net.core._adapt_batch(st, 2, 150.0)
    net.core._adapt_batch(st, 8, 400.0)  # over the target, yet 50 ms a row against 75: batching pays
    assert st.batch_limit == 8
    net.core._adapt_batch(st, 8, 1000.0)  # smoothed to 520 ms: 65 a row, still cheaper than 75
    assert st.batch_limit == 8
    for _ in range(5):
        net.core._adapt_batch(st, 8, 2000.0)  # 8 rows now cost more each than 2 did: the batch halves
    assert st.batch_limit < 8
    limit = st.batch_limit
    net.core._adapt_batch(st, limit, 10.0)  # a full batch that pays again: it grows back, one at a time
    assert st.batch_limit == limit + 1


def test_batch_limit_keeps_a_full_batch_whose_neighbour_costs_a_little_less_a_row(weights):
    """One slowed worker with 8 streams: a step of 8 rows a few percent dearer a row than one of
    7 (noise: the sizes cost nearly the same) halved the batch, and its limit then wandered
    between 2 and 5 (bench_plans' single worker ran ~4 rows a step). Only a batch of at most
    half the rows, what halving would make, is compared."""
    net = start(weights, 1, max_batch=16, target_step_ms=100)
    st = net.core.stages[0]
    net.core._adapt_batch(st, 2, 2 * 250.0)
    net.core._adapt_batch(st, 7, 7 * 150.0)
    net.core._adapt_batch(st, 8, 8 * 155.0)  # over the target; dearer a row than 7 by 3 %, far cheaper than 2
    assert st.batch_limit == 16
    for _ in range(5):
        net.core._adapt_batch(st, 8, 8 * 300.0)  # dearer a row than 2 rows' steps: batching stopped paying
    assert st.batch_limit == 4


def test_memory_pressure_hands_layers_back_and_they_move_exactly(weights, reference):
    net = start(weights, 3)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= 5)
    conn = net.stage_conn(1)
    span = (net.core.stages[1].layer_start, net.core.stages[1].layer_end)
    for m in net.workers[conn].shrink_budget(1):
        net.to_coordinator(conn, m)
    assert not net.workers[conn].ranges
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    st = next(s for s in net.core.stages if (s.layer_start, s.layer_end) == span)
    assert net.core.workers[st.primary].conn != conn


def test_sessions_survive_losing_every_worker_then_a_new_one_joining(weights, reference):
    """No worker left and no coordinator compute: the session waits; a new worker makes a new
    plan, the session's history is replayed through it, and the stream continues exactly."""
    net = start(weights, 2, coordinator_compute=False, request_timeout_s=10.0)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= 6)
    for conn in list(net.workers):
        net.kill(conn)
    net.advance(1.0)
    assert not net.done("r") and net.core.status(net.now)["degraded"]
    net.add_worker()
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference


def test_a_stall_of_the_coordinator_itself_kills_nobody(weights):
    net = start(weights, 3)
    net.perform(net.core.tick(net.now + 0.01))
    net.now += 2.0  # the coordinator's loop was stuck for 2 s; heartbeats sit unread in sockets
    net.perform(net.core.tick(net.now))
    assert all(w.state == "ready" for w in net.core.workers.values())
    for _ in range(18):  # but real silence after the stall is still detected, ticking normally
        net.now += 0.05
        net.perform(net.core.tick(net.now))
    assert all(w.state == "dead" for w in net.core.workers.values())


def test_settings_a_tab_cannot_honour_are_corrected_and_reported(weights, reference):
    net = start(weights, 2, compute_dtype="f16", workgroup_size=1024)
    st = net.core.status(net.now)
    for w in st["workers"]:
        settings = {c["setting"]: c for c in w["corrections"]}
        assert settings["compute"]["used"] == "f32" and "numpy" in settings["compute"]["reason"]
        assert settings["workgroup_size"]["used"] is None
    assert sum(e["kind"] == "correction" for e in net.core.events) == 4
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference


def test_a_tab_that_never_finishes_loading_loses_its_range(weights, reference):
    """It heartbeats, so it is not silent, but it never reports its range loaded: at the load
    deadline (minimum + its bytes at the minimum rate) the range goes to a tab that loads it."""
    net = Net(weights, CoordinatorSettings(max_ctx=256, load_timeout_min_s=5.0, request_timeout_s=60.0))
    stuck = net.add_worker()
    real = net.workers[stuck].handle
    net.workers[stuck].handle = lambda m: [] if m["type"] in ("assign", "weights_chunk") else real(m)
    net.run()
    net.advance(0.5)
    stuck_id = net.core.conn_worker[stuck]
    assert net.core.workers[stuck_id].state == "loading" and net.core.stages[0].primary == stuck_id
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.add_worker()  # joins while the first one stalls: the plan keeps waiting for the stuck tab
    net.advance(4.0)
    assert not net.done("r") and net.core.workers[stuck_id].state == "loading"
    net.advance(3.0)
    assert [e["worker"] for e in net.core.events if e["kind"] == "load_timeout"] == [stuck_id]
    assert net.core.workers[stuck_id].state == "dead" and stuck in net.closed
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    assert net.core.counters["load_timeouts"] == 1


def test_a_failure_inside_one_session_ends_only_that_session(weights, reference):
    """A sampling parameter nobody validated (a negative seed) raises while choosing a token:
    that session gets a clear error, the other is untouched."""
    net = start(weights, 2)
    net.submit("bad", PROMPT, N_TOKENS, SamplingParams(greedy=False, temperature=0.7, seed=-5), stop_at_eos=False)
    net.submit("good", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["bad", "good"])
    err = net.events["bad"][-1]
    assert err["type"] == "error" and err["code"] == "internal_error" and err["message"].startswith("generation failed: ValueError")
    assert net.tokens("good") == reference
    assert "bad" not in net.core.sessions


def test_overlapping_ranges_share_dequantized_layers(weights):
    """A worker holding overlapping ranges (the coordinator's verifier holds every stage's range
    beside its own) builds each dequantized layer once; unloading frees what no range uses."""
    net = start(weights, 3, local=True, spot_check_fraction=1.0)
    net.submit("r", PROMPT, 8, stop_at_eos=False)
    run_until_done(net, ["r"])
    local = net.workers["local"]
    stage_keys = sorted(local.ranges)
    assert len(stage_keys) == 3 and len(local._dense) == weights.config.n_layers + 1  # every layer and the head, once
    # the whole model as one more range (the coordinator computing alone): nothing is rebuilt
    blobs = [net.core.blob_info[f"layer:{i}"] for i in range(weights.config.n_layers)] + [net.core.blob_info["head"]]
    before = {k: id(v) for k, v in local._dense.items()}
    local.handle(wire.make("assign", assignment_id=999, layer_start=0, layer_end=weights.config.n_layers, include_head=True,
                           model=weights.config.to_dict(), max_ctx=256, precision={"compute": "f32"},
                           chunks=[b.to_dict() for b in blobs]))
    full = local.ranges[(0, weights.config.n_layers)]
    assert {k: id(v) for k, v in local._dense.items()} == before
    for key in stage_keys:
        for i in range(*key):
            assert local.ranges[key]._layers[i - key[0]] is full._layers[i]
    for key in [*stage_keys, (0, weights.config.n_layers)]:
        local.handle(wire.make("unload", layer_start=key[0], layer_end=key[1]))
    assert local._dense == {}


def test_pipeline_groups_split_sessions_into_micro_batches(weights, reference):
    """pipeline_groups = 0: one micro-batch per stage, so 6 sessions on 3 stages go 2 per step
    (each stage busy with one group while the next works on another); tokens stay exact."""
    for groups, batched in ((0, False), (1, True)):
        net = start(weights, 3, pipeline_groups=groups)
        sent = []
        real = net.core._send_step
        net.core._send_step = lambda st, w, items, now: (sent.append(len(items)), real(st, w, items, now))[1]
        rids = [f"r{i}" for i in range(6)]
        for r in rids:
            net.submit(r, PROMPT, N_TOKENS, stop_at_eos=False)
        run_until_done(net, rids)
        assert all(net.tokens(r) == reference for r in rids)
        assert (max(sent) > 2) == batched and max(sent) >= 2


def test_records_of_ended_workers_are_bounded(weights, reference):
    """Tabs come and go all day: only the newest `dead_workers_kept` ended records stay."""
    net = start(weights, 2, dead_workers_kept=3)
    for _ in range(6):
        conn = net.add_worker()
        net.run()
        net.advance(0.3)
        net.kill(conn)
        net.advance(0.3)
    ended = [w for w in net.core.workers.values() if not w.alive]
    assert len(ended) == 3 and len(net.core.status(net.now)["workers"]) == 2 + 3
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference


def test_a_move_outside_the_lifecycle_table_is_a_named_local_protocol_error():
    from coordinator.lifecycle import TRANSITIONS, LocalProtocolError, next_state
    from protocol.format import ProtocolError

    assert next_state("w1", "ready", "missed_deadline") == "suspect"
    assert ("dead", "hello") not in TRANSITIONS
    with pytest.raises(LocalProtocolError, match="no move from 'dead' on 'hello'") as err:
        next_state("w1", "dead", "hello")
    assert isinstance(err.value, ProtocolError) and err.value.code == "illegal_transition"


def test_a_replan_over_the_same_workers_moves_weights_only_for_a_material_gain(weights, reference):
    """Re-plans come with measurements (a tab's probation ending replaces its claimed speed by
    the measured one): over the same workers, noise keeps the plan and its loaded weights; a
    worker that became 3x slower moves layers away from it."""
    net = start(weights, 2)
    core = net.core
    net.advance(core.settings.resume_wait_ms / 1000)  # past a restart's resume window (plans keep held ranges)
    # two equal workers, whatever this host's load made their join measurements (on a busy CI host
    # one measured ~3x the other, and then the 3x slowdown below was no material gain to act on)
    primaries = [core.workers[s.primary] for s in core.stages]
    for w in primaries:
        w.ms_per_layer = sum(p.ms_per_layer for p in primaries) / len(primaries)
    core._schedule_replan(net.now)
    net.advance(0.6)  # the plan for two equal workers: the one there, or one re-split
    version, ranges = core.plan_version, [(s.layer_start, s.layer_end) for s in core.stages]
    sent = net.sent_bytes
    first = core.workers[core.stages[0].primary]
    first.ms_per_layer *= 1.1  # noise
    core._schedule_replan(net.now)
    net.advance(0.6)
    assert core.plan_version == version and [(s.layer_start, s.layer_end) for s in core.stages] == ranges
    assert any(e["kind"] == "plan_kept" for e in core.events)
    assert net.sent_bytes - sent < 100_000  # heartbeats only: no weights moved
    first.ms_per_layer *= 3  # material
    core._schedule_replan(net.now)
    net.advance(0.6)
    assert core.plan_version == version + 1
    assert core.stages[0].primary != first.worker_id or core.stages[0].layer_end < ranges[0][1]
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference


def test_each_workers_round_trip_is_timed_by_the_coordinator(weights):
    """Pings go out every second, idle or not; a pong's delay is a round trip (here a worker
    frozen for 0.3 s with a ping held), and the worker's round trip is the median of its last
    RTT_WINDOW: one late pong (a busy event loop) does not move it, late pongs in a row do; a
    pong that answers no outstanding ping is ignored."""
    from coordinator.records import RTT_WINDOW

    net = start(weights, 1)
    conn = next(iter(net.workers))
    w = net.core.workers[net.core.conn_worker[conn]]
    net.advance(1.2)
    assert w.rtt_ms == 0.0  # the harness delivers at once

    def late_pong():
        net.advance(w.pinged_at + 1.0 - net.now - 0.05)  # just before the next ping
        net.frozen.add(conn)
        net.advance(0.35, heartbeats=False)  # the ping goes out and is held with the worker
        assert w.ping is not None
        net.thaw(conn)
        net.run()

    for _ in range(3):  # on time
        net.advance(1.0)
    late_pong()
    assert w.rtt_samples[-1] == pytest.approx(300, abs=60) and w.rtt_ms < 1.0
    for _ in range(RTT_WINDOW):  # the link slows: every pong late
        late_pong()
    assert w.rtt_ms == pytest.approx(300, abs=60)
    net.to_coordinator(conn, wire.make("pong", nonce=(w.ping or (1, 0))[0] ^ 1))  # made up
    net.run()
    assert w.rtt_ms == pytest.approx(300, abs=60) and len(w.rtt_samples) == RTT_WINDOW
    shown = next(x for x in net.core.status(net.now)["workers"] if x["worker_id"] == w.worker_id)
    assert shown["rtt_ms"] == round(w.rtt_ms, 3)


def test_decode_steps_round_trips_and_compute_are_summed(weights):
    """/status counters decode_step_ms and decode_compute_ms: every decode step's round trip and
    the compute its worker reported, unsmoothed (benchmarks/bench_hop.py splits a token by them)."""
    net = start(weights, 2)
    for w in net.workers.values():
        def timed(m, handle=w.handle):
            out = handle(m)
            if m["type"] == "step":  # each step takes 3 ms, 1 of them computing
                net.now += 0.003
                for r in out:
                    r["compute_ms"] = 1.0
            return out
        w.handle = timed
    net.submit("r", PROMPT, 5, stop_at_eos=False)
    run_until_done(net, ["r"])
    decode_steps = 4 * 2  # the first token comes from the prompt's steps; 4 decode trips over 2 stages
    assert net.core.counters["decode_compute_ms"] == pytest.approx(1.0 * decode_steps)
    assert net.core.counters["decode_step_ms"] == pytest.approx(3.0 * decode_steps)


def test_the_service_embeds_a_decode_token_once_and_as_embed_does():
    """CoordinatorService._embed keeps a single token's row (every decode step embeds one): the
    same values as embed(), shared read-only; several ids and bad ids go through embed()."""
    from coordinator.server import CoordinatorService
    from model.embedding import embed
    from model.loader import open_model
    from protocol.errors import TabshardError

    svc = CoordinatorService(open_model("synthetic:llama-mini"))
    table = svc.weights.embedding
    row = svc._embed([17])
    assert np.array_equal(row, embed(table, [17])) and svc._embed([17]) is row
    assert not row.flags.writeable
    assert np.array_equal(svc._embed([17, 3]), embed(table, [17, 3]))
    with pytest.raises(TabshardError):
        svc._embed([table.n])


def test_a_backed_off_address_is_told_when_to_try_again(weights):
    """A join from an address under backoff is refused with the wait left (retry_after_s), which
    the tab's reconnect honours (tab_worker/client.py), and the socket closed."""
    net = start(weights, 1)
    now = time.monotonic()
    for _ in range(4):  # two offenses are free, then 1 s, then 2 s
        net.core.backoff.offend("10.0.0.9", "lied", now)
    out = net.core.on_connect("c-new", "10.0.0.9", now + 0.5)
    error = wire.decode(wire.encode(out[0].msg))  # valid on the wire, the new field included
    assert error["code"] == "backoff" and error["retry_after_s"] == pytest.approx(1.5, abs=0.01)
    assert out[1].__class__.__name__ == "Close"
    assert net.core.on_connect("c-other", "10.0.0.10", now) == []  # another address joins


def test_a_pass_admits_its_proven_tab_while_its_address_is_backed_off():
    """security.Standing: a pass admits once its worker passed probation, only from its own
    address, until revoked (the worker offended) or ttl_s after it was last seen in good standing;
    a tab rejoining with a good pass carries it on, earned, and a stale one gets a new pass."""
    from coordinator.security import Standing

    st = Standing(ttl_s=60.0, max_passes=3)
    a = st.issue("w1", "10.0.0.9", 0.0)
    assert len(a) >= 32 and not st.admits(a, "10.0.0.9", 1.0)  # not earned yet: a tarpit's first join
    st.earn("w1", 2.0)
    assert st.admits(a, "10.0.0.9", 3.0) and not st.admits(a, "10.0.0.8", 3.0) and not st.admits(None, "10.0.0.9", 3.0)
    assert not st.admits(a + "x", "10.0.0.9", 3.0)
    st.seen("w1", 10.0)  # its socket dropped in good standing
    assert st.admits(a, "10.0.0.9", 70.0) and not st.admits(a, "10.0.0.9", 70.1)
    assert st.issue("w2", "10.0.0.9", 20.0, presented=a) == a and st.admits(a, "10.0.0.9", 21.0)  # carried on
    st.revoke("w1")  # the pass moved on to w2: w1's end no longer touches it
    assert st.admits(a, "10.0.0.9", 22.0)
    st.revoke("w2")
    assert not st.admits(a, "10.0.0.9", 22.0)
    assert st.issue("w3", "10.0.0.9", 23.0, presented=a) != a  # a revoked pass is not carried on
    b = st.issue("w4", "10.0.0.7", 24.0)
    st.issue("w5", "10.0.0.7", 25.0), st.issue("w6", "10.0.0.7", 26.0)
    assert len(st.passes) == 3 and b in st.passes and "w3" not in st.of_worker  # the oldest went


def test_a_proven_tab_rejoins_with_its_pass_while_another_tab_of_its_address_is_backed_off(weights):
    """A tab that passed probation rejoins from an address that another tab's offenses backed off,
    presenting the pass it was welcomed with; a tab without one is refused, as is a pass whose
    worker has not passed probation, the pass once its worker offends, and from another address."""
    net = Net(weights, CoordinatorSettings(max_ctx=256, stages=1, probation_steps=3), local=True)
    welcomes = {}

    def join(conn):
        assert net.core.on_connect(conn, "10.0.0.9", net.now) == []
        net.add_worker(conn=conn)
        hello = net.queue.pop()[2]
        actions = net.core.on_message(conn, hello, net.now)
        welcomes[conn] = next(a.msg for a in actions if a.msg["type"] == "welcome")
        net.perform(actions)

    join("c-a")
    net.run()
    net.advance(0.5)
    net.submit("warm", PROMPT, 6)
    net.advance(1.0)  # its first steps checked by the coordinator's compute: trusted
    join("c-p")
    net.frozen.add("c-p")  # answers nothing: stays on probation
    net.run()
    now = net.now
    wid, unproven = net.core.conn_worker["c-a"], net.core.conn_worker["c-p"]
    assert not net.core.workers[wid].probation and net.core.workers[unproven].probation
    secret = welcomes["c-a"]["standing"]
    assert net.core.standing.of_worker[wid] == secret != welcomes["c-p"]["standing"]
    for _ in range(4):  # another tab of 10.0.0.9 offends: joins from there wait 4 s
        net.core.backoff.offend("10.0.0.9", "protocol error", now)
    assert net.core.on_connect("c-b", "10.0.0.9", now, None)[0].msg["code"] == "backoff"
    assert net.core.on_connect("c-b", "10.0.0.9", now, welcomes["c-p"]["standing"])[0].msg["code"] == "backoff"
    assert net.core.on_connect("c-b", "10.0.0.9", now, secret) == [] and net.core.counters["standing_admits"] == 1
    net.kill("c-a")  # its old socket went (a dropped connection: no offense)
    net.add_worker(conn="c-b")
    net.run()
    new = net.core.conn_worker["c-b"]
    assert new != wid and net.core.workers[new].state not in ("dead", "quarantined")
    assert net.core.standing.of_worker[new] == secret and net.core.counters["passes_carried"] == 1  # carried on
    for _ in range(3):
        net.core.backoff.offend("10.0.0.10", "protocol error", now)
    assert net.core.on_connect("c-c", "10.0.0.10", now, secret)[0].msg["code"] == "backoff"  # another address
    net.perform(net.core._worker_lost(net.core.workers[new], now, "a lie", quarantine=True))
    assert net.core.on_connect("c-d", "10.0.0.9", now, secret)[0].msg["code"] == "backoff"  # revoked
