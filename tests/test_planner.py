"""The pure planner (coordinator/planner.py): the depth by predicted latency, ranges within memory,
serving replicas, and why each worker left off the critical path is there."""
from __future__ import annotations

import pytest

from coordinator.planner import PlanError, WorkerCapacity, plan

GB = 1 << 30


def spans(stages):
    return [s.layer_end - s.layer_start for s in stages]


def W(wid, ms=1.0, mem=GB, rtt=None, flagged=None, local=False, bytes_per_ms=None):
    return WorkerCapacity(wid, ms, mem, rtt_ms=rtt, flagged=flagged, local=local, bytes_per_ms=bytes_per_ms)


def test_head_stage_takes_fewer_layers_by_the_heads_cost():
    """The head streams as many weights per token as several layers (SmolLM2-135M: 8), so the
    stage that holds it gets that many fewer layers; equal workers' stages then cost alike."""
    workers = [W(f"w{i}") for i in range(4)]
    four = lambda **kw: plan(workers, 30, 1000, 8000, stages=4, **kw).pipelines[0]  # noqa: E731
    assert spans(four()) == [8, 8, 7, 7]  # head ignored: last stage costs 15
    balanced = four(head_cost_layers=8.0)
    assert spans(balanced) == [10, 10, 9, 1] and balanced[-1].include_head  # costs 10, 10, 9, 9
    assert spans(four(head_cost_layers=2.0)) == [8, 8, 8, 6]
    assert spans(plan(workers[:1], 30, 1000, 8000, head_cost_layers=8.0).pipelines[0]) == [30]
    # a head costlier than a whole share still leaves its stage one layer
    assert spans(four(head_cost_layers=50.0))[-1] == 1


def test_a_model_that_fits_one_worker_runs_on_one_and_the_rest_are_replicas():
    p = plan([W("slow", 5.0), W("a", 1.0), W("b", 1.1), W("c", 1.2)], 30, 1000, 8000)
    assert p.depth == 1 and [pl[0].workers[0] for pl in p.pipelines] == ["a", "b", "c", "slow"]
    assert p.predicted_ms == sorted(p.predicted_ms)
    # every pipeline's primary is the warm standby of the same range in the others
    assert all(sorted(pl[0].workers) == ["a", "b", "c", "slow"] for pl in p.pipelines)
    assert p.notes["a"] == "pipeline 0, stage 0" and p.notes["slow"].startswith("replica: pipeline 3")


def test_the_fewest_stages_memory_allows():
    # each worker holds 12 of 30 layers (of 1000 bytes) beside nothing: three stages, not four
    p = plan([W(f"w{i}", mem=12_500) for i in range(4)], 30, 1000, 500)
    assert p.depth == 3 and sum(spans(p.pipelines[0])) == 30 and len(p.pipelines) == 1
    assert p.notes["w3"].startswith("standby for layers")
    with pytest.raises(PlanError):
        plan([W("w0", mem=12_500)], 30, 1000, 500)


def test_a_deeper_pipeline_only_when_predicted_faster():
    # a slow worker holds the model alone; two fast ones need each other (15 layers each)
    roomy, f1, f2 = W("roomy", 3.0), W("f1", 1.0, mem=16_000), W("f2", 1.0, mem=16_000)
    near = plan([roomy, f1, f2], 30, 1000, 500)
    assert [s.workers[0] for s in near.pipelines[0]] == ["f1", "f2"]  # 2 x 15 ms + hops against 90 ms
    assert near.notes["roomy"].startswith("standby") and "slower than f1" in near.notes["roomy"]
    # the same fast pair behind 50 ms round trips: the slow worker alone is faster
    far = plan([roomy, W("f1", 1.0, 16_000, rtt=50.0), W("f2", 1.0, 16_000, rtt=50.0)], 30, 1000, 500)
    assert far.depth == 1 and far.pipelines[0][0].workers[0] == "roomy"
    assert "rtt" in far.notes["f1"] and far.predicted_ms[0] == pytest.approx(90.0 + 2.0 + 2 * 0 / 12_500)


def test_stages_sets_the_depth_and_max_stages_caps_it():
    workers = [W(f"w{i}") for i in range(5)]
    assert plan(workers, 30, 1000, 8000, stages=3).depth == 3
    assert plan(workers, 30, 1000, 8000, stages=9).depth == 5  # as far as workers allow
    assert plan(workers, 30, 1000, 8000, stages=2).pipelines[1][0].workers[0] == "w2"  # 2 pipelines + a standby
    tight = [W(f"w{i}", mem=12_500) for i in range(4)]
    with pytest.raises(PlanError):
        plan(tight, 30, 1000, 500, max_stages=2)


def test_untrusted_measurements_stay_off_the_critical_path():
    liar = W("liar", 0.001, flagged="claims 0.001 ms a layer, its steps take 9")
    p = plan([liar, W("honest", 2.0)], 30, 1000, 8000)
    assert [pl[0].workers[0] for pl in p.pipelines] == ["honest"]
    assert p.notes["liar"].startswith("standby") and "not trusted" in p.notes["liar"]
    # alone, it still serves (every step of a tab on probation is checked)
    assert plan([liar], 30, 1000, 8000).pipelines[0][0].workers == ["liar"]


def test_the_coordinators_compute_only_when_tabs_cannot_hold_the_model():
    p = plan([W("local", 0.1, local=True), W("tab", 5.0)], 30, 1000, 8000)
    assert [s.workers for s in p.stages] == [["tab"]]
    assert plan([W("local", 0.1, local=True), W("tab", 5.0, mem=5000)], 30, 1000, 8000).stages[0].workers[0] == "local"


# ---------------------------------------------------------------- the coordinator's use of it
def test_absurd_speed_or_rtt_is_clamped_flagged_and_kept_off_the_critical_path():
    from tests.harness import start_net
    from tests.tiny_model import tiny_weights

    net = start_net(tiny_weights(), 3, stages=None)
    core = net.core
    primary = core.stages[0].primary
    far, honest = [w for w in core.workers if w != primary]
    w = core.workers[primary]
    w.ms_per_layer, w.step_ms_per_layer = 1e-4, 5.0  # claims 50,000x faster than its steps show
    core.workers[far].rtt_ms = float("nan")
    assert core._trusted_costs(w) == (5.0, w.rtt_ms, "claims 0.0001 ms a layer, its steps take 5")
    net.perform(core._replan(net.now))
    net.advance(0.3)
    by_id = {x["worker_id"]: x for x in core.status(net.now)["workers"]}
    assert core.stages[0].primary == honest and by_id[honest]["plan"] == "pipeline 0, stage 0"
    assert by_id[primary]["flagged"].startswith("claims") and "not trusted" in by_id[primary]["plan"]
    assert by_id[far]["flagged"] == "rtt nan ms" and "not trusted" in by_id[far]["plan"]


def test_a_planned_workers_round_trip_growing_materially_re_plans_around_it():
    from tests.harness import start_net
    from tests.tiny_model import tiny_weights

    net = start_net(tiny_weights(), 3, stages=2)  # one pipeline of two stages, the third worker a standby
    core = net.core
    far = core.stages[0].primary
    w = core.workers[far]
    on_pong = core._on_pong

    def far_pong(worker, m, now):  # its pongs take 80 ms now, and from now on: Wi-Fi far
        if worker is w and worker.ping is not None:
            worker.ping = (worker.ping[0], worker.ping[1] - 0.08)
        return on_pong(worker, m, now)

    core._on_pong = far_pong
    net.advance(3.5)  # three pongs of the five its round trip is the median of
    assert w.rtt_ms > 60 and core._replan_at is not None
    net.advance(5.5)  # (past the first join's resume window, in which re-plans wait for rejoining holders)
    assert far not in [st.primary for st in core.stages]
    note = next(x["plan"] for x in core.status(net.now)["workers"] if x["worker_id"] == far)
    assert note.startswith("standby") and "rtt" in note, note
    assert any(e["kind"] == "plan" for e in core.events if e["t"] > 0.2)


def test_every_live_worker_says_its_place_or_why_it_is_off_the_critical_path():
    """/status "plan" is never empty for a live worker: joining, loading, a replica, a standby
    with the planner's reason, flagged, waiting for the next plan, on probation."""
    from model.sampling import SamplingParams
    from tests.harness import run_until_done, start_net
    from tests.tiny_model import tiny_weights

    net = start_net(tiny_weights(), 2, stages=None, max_stages=1, replicas=1)
    core = net.core
    seen: dict[str, set] = {}

    def look():
        for x in core.status(net.now)["workers"]:
            if x["state"] not in ("dead", "quarantined"):
                assert x["plan"], x
                seen.setdefault(x["worker_id"], set()).add(x["plan"].split(":")[0].split(",")[0])

    look()
    assert all(x["plan"].startswith("pipeline") for x in core.status(net.now)["workers"] if not x["local"])
    net.submit("r", [5, 17, 42, 99], 12, SamplingParams(), stop_at_eos=False)
    net.add_worker()  # joins while a session runs
    for _ in range(40):
        net.run()
        net.advance(0.05)
        look()
    run_until_done(net, ["r"])
    net.advance(1.0)
    look()
    late = next(wid for wid, w in core.workers.items() if w.conn == list(net.workers)[-1])
    assert "waiting for the next plan" in seen[late] and core.plan_role(core.workers[late]).startswith("pipeline"), seen[late]
    # a worker whose claims its steps belie: flagged, a standby with the reason
    w = core.workers[late]
    w.ms_per_layer, w.step_ms_per_layer = 1e-4, 5.0
    net.perform(core._replan(net.now))
    net.advance(0.5)
    role = core.plan_role(w)
    assert role.startswith("flagged: claims") and "standby for layers" in role and "not trusted" in role, role
    # a newcomer on probation while trusted workers hold the model
    core.settings = type(core.settings)(**{**core.settings.__dict__, "probation_steps": 4})
    conn = net.add_worker()
    net.run()
    newcomer = next(wid for wid, x in core.workers.items() if x.conn == conn)
    w = core.workers[newcomer]
    state, at = w.state, w.measured_at
    w.state, w.measured_at = "measuring", None  # (in-process, its measurement came at once)
    assert core.plan_role(w).startswith("joining")
    w.measured_at = at  # measured once: measuring again
    assert core.plan_role(w) == "its speed is being measured again"
    w.state = state
    net.advance(0.5)
    assert core.plan_role(core.workers[newcomer]).startswith("on probation"), core.plan_role(core.workers[newcomer])


def test_a_workers_transfer_rate_is_fitted_from_its_steps_and_counted_in_its_hop():
    """Steps' time beyond compute and the ping's round trip, against the bytes they move: the
    slope is the link's rate (a step's fixed codec cost is the intercept, not a slower link)."""
    import random

    from coordinator.records import MAX_BYTES_PER_MS, TransferFit

    rng, fit = random.Random(3), TransferFit()
    for i in range(60):  # 80 Mbit/s = 10,000 bytes a ms, 0.4 ms of codec a step, 1 ms of jitter
        nbytes = 4608 if i % 4 else 92_160  # decode rows, and now and then a prompt chunk
        fit.add(nbytes, 0.4 + nbytes / 10_000 + rng.uniform(0, 1.0))
    assert fit.bytes_per_ms == pytest.approx(10_000, rel=0.15)
    same = TransferFit()
    for _ in range(20):
        same.add(4608, 3.0)  # one size only: rate and fixed cost cannot be told apart
    assert same.bytes_per_ms is None
    fast = TransferFit()
    for i in range(20):
        fast.add(4608 * (1 + i % 5), 0.2)  # no time grows with size: bounded, not infinite
    assert fast.bytes_per_ms == MAX_BYTES_PER_MS
    # the planner counts a worker's own rate: a 1 Mbit/s link costs a 2,304-byte hidden state ~37 ms a hop
    slow_link = W("phone", 1.0, bytes_per_ms=125.0)
    assert slow_link.hop_ms(2304) == pytest.approx(2.0 + 2 * 2304 / 125.0)
    p = plan([W("near", 1.0, mem=20_000), W("phone", 1.0, mem=20_000, bytes_per_ms=125.0), W("other", 1.2, mem=20_000)],
             30, 1000, 8000, hidden_bytes=2304)
    assert "phone" not in [sp.workers[0] for sp in p.pipelines[0]], p.notes


def test_tabs_joining_one_by_one_move_only_the_newcomers_weights():
    """stages = 16, replicas = 2, 32 tabs of unequal speed joining one at a time: each plan keeps
    the running ranges (the costliest split for a newcomer) and every holder's range, so a join
    loads the newcomer's range and nothing else; at the end every tab holds a range."""
    import random

    rng = random.Random(5)
    L, H, NL = 3_000_000, 30_000_000, 30
    workers, held, total, p = [], {}, 0, None
    for k in range(32):
        workers.append(W(f"t{k:02d}", rng.uniform(0.8, 1.25), 200_000_000, rtt=rng.uniform(1, 5)))
        current = [(sp.layer_start, sp.layer_end, sp.workers[0]) for sp in p.pipelines[0]] if p else None
        p = plan(workers, NL, L, H, 2, stages=16, current=current, held=held)
        fresh = plan(workers, NL, L, H, 2, stages=16)
        assert p.predicted_ms[0] <= fresh.predicted_ms[0] * 1.15 + 1e-9
        new: dict[str, set] = {}
        for sp in p.stages:
            for wid in sp.workers:
                new.setdefault(wid, set()).update(range(sp.layer_start, sp.layer_end), {NL} if sp.include_head else ())
        moved = {wid: sum(H if i == NL else L for i in have - held.get(wid, frozenset())) for wid, have in new.items()}
        assert {wid for wid, b in moved.items() if b} <= {workers[-1].worker_id}, (k, moved)
        total += sum(moved.values())
        held = {wid: frozenset(v) for wid, v in new.items()}
    need = 2 * (NL * L + H)  # two holders of every range
    assert len(p.pipelines) == 2 and set(held) == {w.worker_id for w in workers}
    assert total <= 2 * need, (total, need)  # fresh plans moved ~8x the need here


def test_a_join_sends_weights_to_the_newcomer_only():
    """The coordinator tells the planner what runs and what each worker holds: six tabs joining
    one by one (stages = 3, replicas = 2) are sent each weight blob they hold once, and a join
    sends bytes to the newcomer alone."""
    from tests.harness import Net
    from tests.tiny_model import tiny_weights
    from coordinator.records import CoordinatorSettings

    net = Net(tiny_weights(), CoordinatorSettings(max_ctx=256, probation_steps=0, stages=3, replicas=2, coordinator_compute=False))
    core = net.core
    for k in range(6):
        before = {wid: w.bytes_sent for wid, w in core.workers.items()}
        net.add_worker()
        net.run()
        for w in core.workers.values():  # equal, as on a quiet host (in-process timings of the tiny model vary by 2x)
            w.ms_per_layer = 1.0
        net.advance(1.0)
        assert core.stages and all(st.primary in st.ready for st in core.stages)
        grew = {wid for wid, w in core.workers.items() if w.bytes_sent > before.get(wid, 0)}
        assert len(grew) == 1 and grew.isdisjoint(before), (k, grew)
    sizes = {i.sha256: i.size for i in core.blob_info.values()}
    for w in core.workers.values():
        assert w.bytes_sent == sum(sizes[h] for h in w.have_blobs)  # nothing sent twice
    assert {wid for st in core.stages for wid in st.holders} == set(core.workers)


def test_a_worker_primary_on_two_running_stages_keeps_one():
    """After a failover one worker may serve two ranges of the running pipeline (it covered a
    dead tab's). A plan that keeps the running ranges gives each stage its own primary: with
    one stage per worker asked for, every worker is a primary (a browser test once saw one
    worker on stages 0 and 3 and a fourth worker left out)."""
    workers = [W(f"w{i}", 1.0, 200_000_000) for i in range(4)]
    current = [(0, 13, "w0"), (13, 17, "w1"), (17, 21, "w2"), (21, 30, "w0")]
    p = plan(workers, 30, 3_000_000, 30_000_000, 1, stages=16, current=current)
    primaries = [sp.workers[0] for sp in p.pipelines[0]]
    assert sorted(primaries) == ["w0", "w1", "w2", "w3"], p


def test_running_replicas_stay_whole_unless_a_tab_of_theirs_is_gone_or_flagged():
    """running: the plan's other pipelines as they run. Each range's fastest free holder, chosen
    afresh, would pair c with f and e with d here (e is now faster than c, d than f); the
    running pairs stay, in their order, and the newcomers g and h form a third replica."""
    L, H = 1000, 8000
    speeds = {"a": 1.0, "b": 1.0, "c": 1.3, "d": 1.1, "e": 1.2, "f": 1.4, "g": 1.5, "h": 1.5}
    held = {"a": frozenset(range(15)), "b": frozenset([*range(15, 30), 30]), "c": frozenset(range(15)),
            "d": frozenset([*range(15, 30), 30]), "e": frozenset(range(15)), "f": frozenset([*range(15, 30), 30])}
    current = [(0, 15, "a"), (15, 30, "b")]
    running = [current, [(0, 15, "c"), (15, 30, "d")], [(0, 15, "e"), (15, 30, "f")]]

    def primaries(workers, **kw):
        p = plan(workers, 30, L, H, stages=2, current=current, held=held, **kw)
        return [[sp.workers[0] for sp in pl] for pl in p.pipelines]

    workers = [W(k, ms, GB) for k, ms in speeds.items()]
    assert primaries(workers)[1:3] == [["e", "d"], ["c", "f"]]  # re-paired: both replicas' sessions would move
    assert primaries(workers, running=running) == [["a", "b"], ["c", "d"], ["e", "f"], ["g", "h"]]
    # a replica with a tab gone, or whose measurements are flagged, is chosen afresh
    assert primaries([w for w in workers if w.worker_id != "d"], running=running)[:3] == [["a", "b"], ["e", "f"], ["c", "g"]]
    flagged = [W(k, ms, GB, flagged="claims 0.001 ms a layer" if k == "c" else None) for k, ms in speeds.items()]
    assert ["c", "d"] not in primaries(flagged, running=running)
    # ranges of another depth: nothing of the running replicas applies
    assert primaries(workers, running=[[(0, 10, "c"), (10, 30, "d")]])[1:3] == [["e", "d"], ["c", "f"]]
