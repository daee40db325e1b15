"""Untrusted results: spot-check verification of workers' steps (socket-free, tests/harness.py).
A "liar" worker (actors.faults.lie: subtly perturbed activations of the right shape) is caught by
recomputation on the coordinator's own worker, quarantined, and every session's KV recomputed
from its tokens, so the streamed tokens stay exactly those of a single honest worker."""
import numpy as np
import pytest

from actors.faults import lie
from tests.harness import start_net
from tests.harness import run_until_done as run_until_done_in
from tests.tiny_model import greedy_tokens

PROMPT = [5, 17, 42, 99, 7, 123, 250, 11]
N_TOKENS = 40


@pytest.fixture(scope="module")
def reference(weights):
    return greedy_tokens(weights, PROMPT, N_TOKENS)


def start(weights, n_workers, local=True, **settings):
    return start_net(weights, n_workers, local=local, **settings)


def run_until_done(net, rids, seconds=60):
    return run_until_done_in(net, rids, seconds)


def test_honest_workers_pass_every_check(weights, reference):
    net = start(weights, 3, spot_check_fraction=1.0)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    c = net.core.counters
    assert c["spot_checks"] > 50 and c["spot_check_mismatches"] == 0
    assert all(w.alive for w in net.core.workers.values())
    # the verifier dropped every scratch session: no KV is left behind
    local = net.workers["local"]
    assert not any(sid.startswith("check-") for b in local.ranges.values() for sid in b.sessions())


def test_checks_send_only_the_rows_since_the_last_check(weights, reference):
    """The verifier keeps a checked session's scratch KV: checking every step of a 40-token
    generation costs about one pass over the positions per stage, not one per check."""
    net = start(weights, 3, spot_check_fraction=1.0)
    sent, perform = [], net.perform
    net.perform = lambda actions: (sent.extend(a.msg for a in actions if getattr(a, "conn", None) == "local"
                                               and getattr(a, "msg", {}).get("type") == "step"), perform(actions))[1]
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference and net.core.counters["spot_check_mismatches"] == 0
    rows = sum(x["length"] for m in sent for x in m["sessions"])
    positions = len(PROMPT) + N_TOKENS
    assert len(sent) > 100 and rows <= len(net.core.stages) * positions  # recomputing from 0 each time: ~20x more
    assert not any(sid.startswith("check-") for b in net.workers["local"].ranges.values() for sid in b.sessions())


@pytest.mark.parametrize("victim_stage", [0, 2])  # a middle layer range, and the head
def test_liar_is_caught_quarantined_and_tokens_stay_exact(weights, reference, victim_stage):
    net = start(weights, 3, spot_check_fraction=0.25)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= 5)
    victim = net.stage_conn(victim_stage)
    victim_id = net.core.conn_worker[victim]
    lie(net.workers[victim], 0.01)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    assert net.core.workers[victim_id].state == "quarantined"
    detected = [e for e in net.core.events if e["kind"] == "liar_detected"]
    assert [e["worker"] for e in detected] == [victim_id]
    assert any(e["kind"] == "recompute" for e in net.core.events)
    assert victim in net.closed


def test_tokens_a_liar_changed_are_rewound_and_recomputed(weights, reference):
    """A loud liar changes tokens before a check catches it: every token streamed since it
    first computed for the session is recomputed on honest workers; the client gets a rewind
    to the first that differs, then the right tokens, and ends with exactly the reference."""
    net = start(weights, 3, spot_check_fraction=0.1, spot_check_seed=3)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= 4)
    victim = net.stage_conn(1)
    lie(net.workers[victim], 3.0)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    rewinds = net.rewinds("r")
    assert len(rewinds) >= 1 and net.core.counters["tokens_retracted"] >= 1
    assert all(r["index"] < N_TOKENS for r in rewinds)
    # tokens the honest recomputation confirmed were not sent twice
    sent = [e for e in net.events["r"] if e["type"] == "token"]
    assert len(sent) == N_TOKENS + net.core.counters["tokens_retracted"]


def test_done_waits_for_pending_checks_so_a_last_lie_is_rewound(weights, reference):
    """The liar lies only in the step of the last token, and the verdict comes after that token
    went out: "done" waits for the pending check, so the stream is rewound and ends exact."""
    net = start(weights, 3, spot_check_fraction=1.0)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= N_TOKENS - 1)
    lie(net.workers[net.stage_conn(1)], 50.0)
    net.frozen.add("local")  # the verifier answers late (the coordinator's compute thread is busy)
    net.run()
    assert len(net.tokens("r")) == N_TOKENS and not net.done("r")  # the wrong last token is out, "done" is not
    net.thaw("local")
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    kinds = [e["type"] for e in net.events["r"]]
    assert kinds.count("rewind") == 1 and kinds[-3:] == ["rewind", "token", "done"]
    assert net.core.counters["completed"] == 1 and net.core.counters["tokens_retracted"] == 1


@pytest.mark.parametrize("victim_stage", [0, 1, 2])  # the first and a middle layer range, and the head
def test_finish_audit_catches_a_liar_no_sample_hit(weights, reference, victim_stage):
    """spot_check_at_finish: the liar lies only in the steps of the last token and no step is
    sampled (fraction 0). Without the audit that wrong token is final; with it, every stage's
    part in the last token is checked before "done": the liar is quarantined, the stream is
    rewound and ends exact."""
    for audit in (False, True):
        net = start(weights, 3, spot_check_fraction=0.0, spot_check_at_finish=audit)
        net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
        net.run(until=lambda: len(net.tokens("r")) >= N_TOKENS - 1)
        victim = net.stage_conn(victim_stage)
        victim_id = net.core.conn_worker[victim]
        lie(net.workers[victim], 50.0)
        run_until_done(net, ["r"])
        if not audit:  # the lie goes unnoticed (the head's noisy logits leave a greedy token as it was)
            assert net.core.counters["spot_checks"] == 0 and not any(e["kind"] == "liar_detected" for e in net.core.events)
            assert (net.tokens("r") != reference) == (victim_stage != 2)
            continue
        assert net.tokens("r") == reference
        assert [e["worker"] for e in net.core.events if e["kind"] == "liar_detected"] == [victim_id]
        assert net.core.workers[victim_id].state == "quarantined"
        assert len(net.rewinds("r")) == (victim_stage != 2) and net.core.counters["completed"] == 1


def test_finish_audit_passes_honest_workers(weights, reference):
    net = start(weights, 3, spot_check_fraction=0.0, spot_check_at_finish=True)
    for rid in ("a", "b"):
        net.submit(rid, PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["a", "b"])
    assert net.tokens("a") == reference and net.tokens("b") == reference
    c = net.core.counters
    assert c["spot_checks"] == 2 * 3 and c["spot_check_mismatches"] == 0 and c["completed"] == 2
    assert not any(sid.startswith("check-") for b in net.workers["local"].ranges.values() for sid in b.sessions())


def test_tokens_before_the_liar_joined_stay_confirmed(weights, reference):
    """Only tokens streamed after the liar first computed for a session are unconfirmed."""
    net = start(weights, 3, spot_check_fraction=0.2, spot_check_seed=1)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= 6)
    victim = net.stage_conn(2)
    vid = net.core.conn_worker[victim]
    s = net.core.sessions["r"]
    assert s.touched[vid] == 0  # it computed the prompt: everything it touched is suspect
    s.touched[vid] = 6  # pretend it joined the session at token 6
    lie(net.workers[victim], 0.01)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    recompute = next(e for e in net.core.events if e["kind"] == "recompute")
    assert recompute["unconfirmed_tokens"] <= N_TOKENS - 6


def detection_delay(weights, seed, fraction=0.02, liar=0.01, sessions=4):
    """Steps the liar served from its first lie until it was caught."""
    net = start(weights, 3, spot_check_fraction=fraction, spot_check_seed=seed)
    victim = net.stage_conn(1)
    victim_id = net.core.conn_worker[victim]
    lie(net.workers[victim], liar)
    lied_from = net.core.workers[victim_id].steps
    for round_ in range(40):
        rids = [f"r{round_}-{i}" for i in range(sessions)]
        for r in rids:
            net.submit(r, PROMPT, N_TOKENS, stop_at_eos=False)
        run_until_done(net, rids)
        ev = next((e for e in net.core.events if e["kind"] == "liar_detected"), None)
        if ev is not None:
            return ev["worker_steps"] - lied_from
    raise AssertionError("liar never detected")


def test_detection_delay_in_steps(weights, capsys):
    delays = [detection_delay(weights, seed) for seed in range(6)]
    with capsys.disabled():
        print(f"\nspot-check detection delay at fraction 0.02 (steps served by the liar until caught): "
              f"{delays} median {float(np.median(delays))}")
    assert max(delays) < 400  # geometric with mean 1/0.02 = 50


def test_replica_verifies_when_no_trusted_worker(weights, reference):
    """No coordinator compute: a warm standby of the stage recomputes; a mismatch quarantines
    both (neither is trusted) and the rest of the pool serves the exact tokens."""
    net = start(weights, 4, local=False, spot_check_fraction=0.5, replicas=2, stages=2)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= 3)
    st = next(s for s in net.core.stages if len(s.ready) > 1)
    victim = net.core.workers[st.primary].conn
    lie(net.workers[victim], 0.01)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    assert net.core.counters["spot_check_mismatches"] >= 1
    assert any(e["kind"] == "liar_detected" and net.core.workers[e["worker"]].conn == victim for e in net.core.events)


def test_a_second_liar_on_the_restarted_session_is_rewound_from_the_restart(weights, reference):
    """A liar's recompute restarts each session from the first token a suspect touched, and every
    worker that goes on computing it does so from there. In a soak run the stage's new holder was
    sent the old history (the suspect's loss rebuilt the stage) before the tokens were cut back,
    so it counted from token 9; it lied too, was caught, and nothing was rewound: 16 wrong tokens
    reached the client. Here a worker counted at the old length lies after the first liar's
    recompute: the stream still ends exact. (Four stages: both liars in middle ranges, whose
    lies change tokens; with seed 3 the second's wrong tokens reach the client before its
    catch, so without the restart's count the stream ends wrong, not only the count.)"""
    net = start(weights, 4, spot_check_fraction=0.1, spot_check_seed=3)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= 6)
    first, second = net.stage_conn(1), net.stage_conn(2)
    first_id, second_id = net.core.conn_worker[first], net.core.conn_worker[second]
    s = net.core.sessions["r"]
    s.touched[second_id] = len(s.tokens)  # as the rebuild's replay, sent before the cut, counted it
    lie(net.workers[first], 3.0)
    net.run(until=lambda: net.core.workers[first_id].state == "quarantined")
    assert s.touched[second_id] == 0  # the restart's point: the prompt
    lie(net.workers[second], 3.0)
    run_until_done(net, ["r"])
    assert net.core.workers[second_id].state == "quarantined"
    assert net.tokens("r") == reference


def test_a_tab_verifier_that_never_answers_holds_no_done_back_and_is_evicted(weights, reference):
    """No coordinator compute: a stage's checks go to a tab holding its range. That tab, a
    tarpit (heartbeats, answers nothing), held the "done" of every session the checked worker
    touched until spot_check_timeout_s (60 s). Its checks have a step's deadline: past it the
    check is skipped and stops holding "done" back, and the tab is judged as a late step's
    worker is: suspect, no longer picked to verify, evicted at suspect_evict_factor deadlines."""
    net = start(weights, 4, local=False, spot_check_fraction=1.0, replicas=2, stages=2)
    core = net.core
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= 3)
    pipeline = core.sessions["r"].pipeline
    st = next(s for s in core.stages if s.pipeline == pipeline and len(s.ready) > 1)
    verifier_id = core._verifier(st, core.workers[st.primary]).worker_id
    frozen_at = net.now
    net.frozen.add(core.workers[verifier_id].conn)
    net.run()
    assert len(net.tokens("r")) == N_TOKENS and not net.done("r")  # decoded; "done" waits on the checks
    late = [c for c in core._checks.values() if c.verifier == verifier_id]
    assert late and all(c.deadline is not None for c in late)
    done_at = net.advance_until(lambda: net.done("r"), 20)
    assert net.done("r") and done_at <= max(c.deadline for c in late) + 0.05 + 1e-9, (done_at, frozen_at)
    assert net.tokens("r") == reference
    assert any(e["kind"] == "check_late" and e["worker"] == verifier_id for e in core.events)
    assert core.counters["spot_checks_late"] >= 1
    allowed = min(c.deadline - c.at for c in late)
    net.advance_until(lambda: not core.workers[verifier_id].alive, 10 * allowed)
    death = next(e for e in core.events if e["kind"] == "death" and e["worker"] == verifier_id)
    assert "late" in death["reason"]
    assert death["t"] <= min(c.at for c in late) + core.settings.suspect_evict_factor * allowed + 0.05 + 1e-9, (death, allowed)


def test_a_check_the_coordinators_own_worker_never_answers_expires_and_releases_done(weights, reference):
    """The coordinator's own worker verifies with no deadline (it is trusted to answer); a check
    it leaves unanswered is dropped after spot_check_timeout_s and "done" is released (that
    path raised TypeError from 787f216 on: the check record was read as a dict)."""
    net = start(weights, 2, spot_check_fraction=1.0, spot_check_timeout_s=5.0)
    core = net.core
    net.frozen.add("local")
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run()
    assert len(net.tokens("r")) == N_TOKENS and not net.done("r") and core._checks
    skipped, sent = core.counters["spot_checks_skipped"], max(c.at for c in core._checks.values())
    done_at = net.advance_until(lambda: net.done("r"), 10, step=0.25)
    assert net.done("r") and sent + 5.0 < done_at <= sent + 5.25 + 1e-9
    assert net.tokens("r") == reference and core.counters["spot_checks_skipped"] > skipped
    assert all(w.alive for w in core.workers.values())
