"""Serving replicas (coordinator/machine/planning.py: _place, _extend_plan): workers beyond the
chosen depth form more pipelines over the same ranges, each session bound to one; their primaries
are warm standbys for each other. Driven without sockets (tests/harness.py), tokens checked
against a single worker's."""
from collections import Counter

import pytest

from model.sampling import SamplingParams
from tests.harness import run_until_done, start_net
from tests.tiny_model import greedy_tokens

PROMPT = [5, 17, 42, 99, 7, 123, 250, 11]
N_TOKENS = 16
SEEDED = SamplingParams(greedy=False, temperature=0.8, top_p=0.95, seed=7)


@pytest.fixture(scope="module")
def reference(weights):
    return greedy_tokens(weights, PROMPT, N_TOKENS)


def replicas(weights, n, **kw):
    """n workers, the planner's own depth: the tiny model fits one, so n pipelines of one stage."""
    net = start_net(weights, n, stages=None, **kw)
    assert len(net.core._pipelines()) == n and all(len(p) == 1 for p in net.core._pipelines().values())
    return net


def test_streams_spread_over_equal_replicas_with_a_single_workers_tokens(weights, reference):
    net = replicas(weights, 4)
    for w in net.core.workers.values():
        w.ms_per_layer, w.rtt_ms, w.step_ms_per_layer = 1.0, 1.0, None  # equal, as measured on a quiet host (this one is shared: its timings vary)
    for i in range(8):
        net.submit(f"r{i}", PROMPT, N_TOKENS, stop_at_eos=False)
    assert sorted(Counter(s.pipeline for s in net.core.sessions.values()).values()) == [2, 2, 2, 2]
    run_until_done(net, [f"r{i}" for i in range(8)])
    assert all(net.tokens(f"r{i}") == reference for i in range(8))
    assert all(w.steps > 0 for w in net.core.workers.values() if not w.local)
    assert net.core.status(net.now)["stages"][3]["pipeline"] == 3


def test_a_single_stream_goes_to_the_fastest_replica(weights, reference):
    net = replicas(weights, 3)
    core = net.core
    fast = sorted(core.workers)[1]
    for wid, w in core.workers.items():
        w.ms_per_layer = 0.2 if wid == fast else 1.0  # as measured
    net.submit("one", PROMPT, N_TOKENS, stop_at_eos=False)
    assert core.stages[core.sessions["one"].pipeline].primary == fast
    run_until_done(net, ["one"])
    assert net.tokens("one") == reference and all(w.steps == 0 for wid, w in core.workers.items() if wid != fast)


@pytest.mark.parametrize("params", [None, SEEDED], ids=["greedy", "seeded"])
def test_a_replicas_death_resumes_its_sessions_exactly_without_a_download(weights, params):
    want = start_net(weights, 1)
    want.submit("ref", PROMPT, N_TOKENS, params, stop_at_eos=False)
    run_until_done(want, ["ref"])
    net = replicas(weights, 2)
    for i in range(4):
        net.submit(f"r{i}", PROMPT, N_TOKENS, params, stop_at_eos=False)
    net.run(until=lambda: all(len(net.tokens(f"r{i}")) >= 5 for i in range(4)))
    sent = net.core.counters["weight_bytes_sent"]
    victim = net.core.stages[1].primary
    net.kill(net.core.workers[victim].conn)
    # the other replica's primary, already holding the range, serves both pipelines now
    assert net.core.stages[1].primary == net.core.stages[0].primary
    run_until_done(net, [f"r{i}" for i in range(4)])
    assert all(net.tokens(f"r{i}") == want.tokens("ref") for i in range(4))
    assert net.core.counters["weight_bytes_sent"] == sent


def test_a_tab_joining_during_streams_becomes_a_replica_without_pausing_them(weights, reference):
    net = replicas(weights, 1)
    for i in range(4):
        net.submit(f"r{i}", PROMPT, 3 * N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: all(len(net.tokens(f"r{i}")) >= 3 for i in range(4)))
    generations = {rid: s.generation for rid, s in net.core.sessions.items()}
    late = net.add_worker()
    for _ in range(12):  # time passes while the streams decode, a token each per 0.05 s
        least = min(len(net.tokens(f"r{i}")) for i in range(4))
        net.advance(0.05, until=lambda: min(len(net.tokens(f"r{i}")) for i in range(4)) > least)
    assert not any(net.done(f"r{i}") for i in range(4))
    assert len(net.core._pipelines()) == 2 and any(e.get("extended") for e in net.core.events if e["kind"] == "plan")
    from coordinator.dashboard import DashboardFeed

    assert "plan v2: 2 pipelines of 1 stage(s) (a replica added)" in [
        i["text"] for i in DashboardFeed.timeline(net.core.events, net.now, net.now)]
    # the running sessions were not restarted: nothing replayed, no generation bumped
    assert {rid: s.generation for rid, s in net.core.sessions.items()} == generations
    run_until_done(net, [f"r{i}" for i in range(4)])
    for i in range(4):
        assert net.tokens(f"r{i}")[:N_TOKENS] == reference
    # later sessions use the new replica too (equal workers: the second goes to the less loaded)
    for w in net.core.workers.values():
        w.ms_per_layer, w.rtt_ms, w.step_ms_per_layer = 1.0, 1.0, None
    net.submit("a", PROMPT, N_TOKENS, stop_at_eos=False)
    net.submit("b", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["a", "b"])
    assert net.tokens("a") == net.tokens("b") == reference
    assert net.core.workers[net.core.conn_worker[late]].steps > 0


def test_prefix_cache_speculation_and_truncation_work_per_pipeline(weights):
    long_prompt = PROMPT * 3  # 24 tokens: over prefix_min_tokens
    solo = start_net(weights, 1, speculation="prompt-lookup")
    solo.submit("ref", long_prompt, N_TOKENS, stop_at_eos=False)
    run_until_done(solo, ["ref"])
    net = replicas(weights, 2, speculation="prompt-lookup")
    net.submit("warm", long_prompt, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["warm"])
    for i in range(4):
        net.submit(f"r{i}", long_prompt + [i + 1], N_TOKENS, stop_at_eos=False)
    run_until_done(net, [f"r{i}" for i in range(4)])
    assert net.tokens("warm") == solo.tokens("ref")
    # the prefix is forked on the pipeline that holds it, recomputed on the other
    assert net.core.counters["prefix_hits"] >= 1
    solo2 = start_net(weights, 1, speculation="prompt-lookup")
    for i in range(4):
        solo2.submit(f"r{i}", long_prompt + [i + 1], N_TOKENS, stop_at_eos=False)
    run_until_done(solo2, [f"r{i}" for i in range(4)])
    assert all(net.tokens(f"r{i}") == solo2.tokens(f"r{i}") for i in range(4))


# ---------------------------------------------------------------- serving while tabs load
def coordinator_alone(weights, **kw):
    from coordinator.records import CoordinatorSettings
    from tests.harness import Net

    return Net(weights, CoordinatorSettings(max_ctx=256, probation_steps=0, spot_check_fraction=0.0, **kw), local=True)


def test_the_first_request_is_answered_by_the_coordinators_compute_with_no_tab(weights, reference):
    net = coordinator_alone(weights)
    net.submit("first", PROMPT, N_TOKENS, stop_at_eos=False)  # before anything is planned
    run_until_done(net, ["first"])
    assert net.tokens("first") == reference and net.core.workers["local"].steps > 0


def test_the_old_plan_serves_while_the_new_holder_loads_then_hands_over(weights, reference):
    net = coordinator_alone(weights)
    net.run()
    net.advance(0.5)
    assert net.core.stages[0].primary == "local"
    tab = net.add_worker()
    net.run()  # it joined and measured; its range is assigned at the re-plan
    net.frozen.add(tab)  # ... and it is slow to load: nothing it is sent is handled yet
    net.advance(0.35)
    core = net.core
    assert core.stages[0].primary == core.conn_worker[tab] and core.conn_worker[tab] not in core.stages[0].ready
    assert [st.retiring for st in core.stages] == [False, True] and core.stages[1].primary == "local"
    assert core.status(net.now)["unserved_reason"] is None
    net.submit("during", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: net.done("during"))  # no time passes: served by the old plan at once
    assert net.tokens("during") == reference
    net.thaw(tab)  # loaded: the new plan takes over, the old pipeline retires
    assert [st.retiring for st in core.stages] == [False] and any(e["kind"] == "retired" for e in core.events)
    from coordinator.dashboard import DashboardFeed

    timeline = [i["text"] for i in DashboardFeed.timeline(core.events, net.now, net.now)]
    assert "plan v2: 1 stages, the old plan serving while it loads" in timeline
    assert "the old plan's 1 pipeline(s) handed over" in timeline
    net.submit("after", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["after"])
    assert net.tokens("after") == reference and core.workers[core.conn_worker[tab]].steps > 0


def test_a_retiring_holders_death_moves_its_sessions_to_the_new_plan(weights, reference):
    net = coordinator_alone(weights, stages=2)
    net.run()
    net.advance(0.5)
    a = net.add_worker()
    net.advance(0.5)  # a serves alone now
    b = net.add_worker()
    net.run()
    net.frozen.add(b)
    net.advance(0.35)  # the new plan (a and b, two stages) loads while a's whole-model pipeline serves
    core = net.core
    assert [st.retiring for st in core.stages] == [False, False, True] and core.stages[2].primary == core.conn_worker[a]
    net.submit("s", PROMPT, N_TOKENS, stop_at_eos=False)
    assert core.sessions["s"].pipeline == core.stages[2].pipeline
    net.run(until=lambda: len(net.tokens("s")) >= 3)
    net.kill(a)
    net.thaw(b)
    run_until_done(net, ["s"])
    assert net.tokens("s") == reference and not any(st.retiring for st in core.stages)


def test_a_retiring_primary_outside_the_new_plan_dying_reports_its_recovery(weights, reference):
    """The dead worker is no primary of the new plan: its session restarts there, and the next
    token still says how long recovery took (a `recovered` event, as for any primary lost)."""
    net = coordinator_alone(weights, stages=2)
    net.run()
    net.advance(0.5)
    a = net.add_worker()
    net.advance(0.5)
    core = net.core
    core.workers[core.conn_worker[a]].ms_per_layer = 50.0  # measured slow: the next plan leaves it out
    b, c = net.add_worker(), net.add_worker()
    net.run()
    net.frozen.update({b, c})
    net.advance(0.35)
    old = next(st for st in core.stages if st.retiring)
    assert old.primary == core.conn_worker[a] and all(st.primary != core.conn_worker[a] for st in core.stages if not st.retiring)
    net.submit("s", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("s")) >= 3)
    killed_at = net.now
    net.kill(a)
    net.thaw(b)
    net.thaw(c)
    run_until_done(net, ["s"])
    assert net.tokens("s") == reference
    assert any(e["kind"] == "recovered" and e["t"] >= killed_at for e in core.events)


def test_a_cached_prefix_is_reused_on_whichever_pipeline_a_session_lands(weights):
    """A prompt cached on pipeline 1 (whose stages are not index 0) is forked there for the next
    session placed on it; the session used to look its forked length up under stage 0 and fail."""
    prompt = PROMPT * 5  # over prefix_min_tokens
    solo = start_net(weights, 1)
    solo.submit("ref", prompt, N_TOKENS, stop_at_eos=False)
    run_until_done(solo, ["ref"])
    net = replicas(weights, 2)
    ids = sorted(w for w in net.core.workers if w != "local")
    for i in range(4):  # each pipeline's primary fastest in turn, two sessions each
        for k, wid in enumerate(ids):
            net.core.workers[wid].ms_per_layer = 0.2 if (i // 2 + k) % 2 else 1.0
            net.core.workers[wid].step_ms_per_layer = None  # (this harness's clock times no step)
        net.submit(f"r{i}", prompt, N_TOKENS, stop_at_eos=False)
        run_until_done(net, [f"r{i}"])
    assert [net.tokens(f"r{i}") for i in range(4)] == [solo.tokens("ref")] * 4
    assert net.core.counters["prefix_hits"] == 2  # the second session on each pipeline


def test_placement_counts_on_the_speed_steps_show_not_the_one_measured_at_join(weights):
    net = replicas(weights, 2)
    a, b = sorted(w for w in net.core.workers if w != "local")
    for wid, w in net.core.workers.items():
        w.ms_per_layer, w.rtt_ms = (0.5 if wid == a else 1.0), 1.0  # a measured twice as fast when it joined...
    net.core.workers[a].step_ms_per_layer, net.core.workers[b].step_ms_per_layer = 5.0, 1.0  # ...its steps say otherwise
    net.submit("s", PROMPT, 4, stop_at_eos=False)
    assert net.core.stages[net.core.sessions["s"].pipeline].primary == b
