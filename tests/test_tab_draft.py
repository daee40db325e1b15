"""Speculation with a worker's draft model (`tabshard worker --draft-model`): the coordinator,
serving speculation "draft-model" without a draft model of its own, asks a trusted worker that
advertises one for each trip's drafts (`draft` -> `draft_result`), parks the trip meanwhile, and
sends it without drafts at the deadline or the drafter's death. Tokens stay exactly those of
plain decoding; a drafter answering what it was not asked is a protocol error against it. In
process, through the real wire codec (tests/harness.py)."""
import pytest

from coordinator.records import CoordinatorSettings
from coordinator.speculation import DraftModel
from protocol import wire
from protocol.format import ProtocolError
from tab_worker.local import LocalCompute
from tab_worker.worker import TabWorker
from tests.harness import Net, run_until_done
from tests.test_speculation import N_TOKENS, PROMPT, SAMPLED, reference_of


@pytest.fixture(scope="module")
def reference(weights):
    return reference_of(weights, PROMPT, N_TOKENS)


def drafting_net(weights, draft_weights, stage_workers=2, spare_drafter=False, max_k=4, **settings):
    """A coordinator in the draft-model mode with no draft model of its own; its last worker holds
    `draft_weights` as its draft model (a spare one holding no stage when spare_drafter)."""
    net = Net(weights, CoordinatorSettings(max_ctx=256, speculation="draft-model", speculation_max_k=max_k,
                                           probation_steps=0, stages=stage_workers, **settings))
    for i in range(stage_workers - (0 if spare_drafter else 1)):
        net.add_worker()
    conn = net.add_worker(draft_weights=draft_weights, draft_name="tiny")
    net.run()
    net.advance(0.5)
    assert net.core.stages and all(s.primary in s.ready for s in net.core.stages)
    return net, conn


def drafts_sent(net):
    seen, perform = [], net.perform

    def watch(actions):
        seen.extend(a.msg for a in actions if getattr(a, "msg", None) and a.msg.get("type") == "draft")
        perform(actions)
    net.perform = watch
    return seen


def test_worker_drafts_what_the_coordinators_draft_model_would(weights, other_weights):
    w = TabWorker("t", backend="numpy", draft_weights=other_weights, draft_name="tiny")
    assert w.capabilities()["draft_model"] == {"vocab": weights.config.vocab, "layers": weights.config.n_layers, "name": "tiny"}
    assert "draft_model" not in TabWorker("plain", backend="numpy").capabilities()
    dm = DraftModel(other_weights, LocalCompute(), max_ctx=other_weights.config.context)
    for ctx, k in [(PROMPT, 4), (PROMPT + [3, 9], 3), (PROMPT + [4], 2)]:  # the last departs from the cache
        (reply,) = w.handle(wire.decode(wire.encode(wire.make("draft", session_id="s", context=ctx, k=k, trip=5))))
        assert reply["type"] == "draft_result" and reply["trip"] == 5
        assert reply["tokens"] == dm.propose("s", ctx, k).tokens
    w.handle(wire.make("drop_session", session_id="s"))
    assert w.draft.session_ids() == [] and "s" not in w.draft.backend.sessions()
    with pytest.raises(ProtocolError):  # k is 1..16, checked at the edge
        wire.decode(wire.encode(wire.make("draft", session_id="s", context=PROMPT, k=17, trip=1), validate=False))
    with pytest.raises(ProtocolError):
        wire.decode(wire.encode(wire.make("draft_result", session_id="s", trip=1, tokens=list(range(17))), validate=False))


@pytest.mark.parametrize("spare_drafter", [False, True])
def test_greedy_tokens_identical_with_a_workers_draft_model(weights, reference, spare_drafter):
    net, conn = drafting_net(weights, weights, spare_drafter=spare_drafter)
    asked = drafts_sent(net)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    t = net.core.speculation.totals
    assert asked and all(m["session_id"] == "r" for m in asked)
    assert t["accepted"] > 0 and t["accepted"] == t["drafted"]  # the target itself drafts: every draft kept
    assert t["trips"] < N_TOKENS - 1
    status = net.core.status(net.now)["speculation"]
    assert status["drafter"] == net.core.conn_worker[conn] and status["acceptance_rate"] == 1.0
    assert net.core.counters["drafts_missed"] == 0
    assert net.workers[conn].draft.session_ids() == []  # the ended session's draft cache dropped


def test_seeded_sampling_identical_with_a_workers_draft_model(weights, other_weights):
    want = reference_of(weights, PROMPT, N_TOKENS, SAMPLED)
    for dw in (weights, other_weights):
        net, _ = drafting_net(weights, dw)
        net.submit("r", PROMPT, N_TOKENS, SAMPLED, stop_at_eos=False)
        run_until_done(net, ["r"])
        assert net.tokens("r") == want
        assert net.core.speculation.totals["drafted"] > 0


def test_a_drafter_that_never_answers_costs_the_deadline_not_the_tokens(weights, reference):
    net, conn = drafting_net(weights, weights, spare_drafter=True)
    net.workers[conn].on_draft = lambda m: []  # its draft messages vanish
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    assert net.core.counters["drafts_missed"] == net.core.counters["drafts_asked"] > 0
    assert net.core.speculation.totals["drafted"] == 0
    assert net.core.workers[net.core.conn_worker[conn]].alive  # slow, not hostile


def test_a_drafter_killed_while_trips_wait_on_it(weights, reference):
    net, conn = drafting_net(weights, weights, spare_drafter=True)
    held = []
    net.workers[conn].on_draft = lambda m: held.append(m) or []
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.advance(0.05, until=lambda: bool(held))
    assert held and net.core._parked
    net.kill(conn)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference and net.core.speculation.drafter is None


@pytest.mark.parametrize("lie", ["out_of_vocab", "too_many", "other_trip", "other_session"])
def test_a_drafter_answering_what_it_was_not_asked_is_an_error_against_it(weights, reference, lie):
    net, conn = drafting_net(weights, weights, spare_drafter=True)
    w = net.workers[conn]
    honest = w.on_draft

    def liar(m):
        (r,) = honest(m)
        if lie == "out_of_vocab":
            r["tokens"] = [weights.config.vocab + 5] + r["tokens"][1:]
        elif lie == "too_many":
            r["tokens"] = r["tokens"] + [1]
        elif lie == "other_trip":
            r["trip"] = m["trip"] + 1000
        else:
            r["session_id"] = "someone-else"
        return [r]
    w.on_draft = liar
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    assert conn in net.closed and net.core.counters["protocol_errors"] == 1
    assert net.core.workers[net.core.conn_worker.get(conn) or next(
        x.worker_id for x in net.core.workers.values() if x.conn == conn)].state == "quarantined"
    assert net.core.speculation.totals["drafted"] == 0


def test_real_worker_process_with_draft_model_drafts_for_serve(smollm2_model, smollm2_weights, smollm2_tokenizer, tmp_path):
    """`tabshard serve --speculation draft-model` (no draft model of its own) and `tabshard worker
    --draft-model` over real sockets: the worker (SmolLM2 drafting for itself) is the drafter, its
    drafts are kept, and the tokens are plain decoding's. The deadline is generous here: on a
    busy 2-core host the 135M draft model takes as long as the served model's trip."""
    from tabshard.cluster import LocalCluster
    from tab_worker.generate import LocalGenerator
    from tests.test_cluster import PROMPT as CHAT, ws_tokens

    n = 24
    ids = smollm2_tokenizer.encode(smollm2_tokenizer.render_chat([{"role": "user", "content": CHAT}]))
    want = list(LocalGenerator(smollm2_weights, backend="numpy", max_ctx=512).generate(ids, n))
    toml = tmp_path / "serve.toml"
    toml.write_text('[serve]\nspeculation = "draft-model"\nspeculation_max_k = 4\ndraft_deadline_ms = 10000.0\nprobation_steps = 0\n')
    with LocalCluster(workers=0, serve_args=["--config", str(toml)]) as c:
        c.add_worker(name="drafter", extra=["--draft-model", str(smollm2_model.path)])
        c.wait_for(lambda st: st["stages"] and all(s["ready"] and s["holders"][0] != "local" for s in st["stages"]), 120,
                   "the worker serving")
        assert ws_tokens(c.base, max_tokens=n) == want
        st = c.status()
    drafter = next(w for w in st["workers"] if w["name"] == "drafter")
    assert drafter["capabilities"]["draft_model"] == {"vocab": 49152, "layers": 30, "name": smollm2_model.path.name}
    spec = st["speculation"]
    assert spec["drafter"] == drafter["worker_id"] and spec["accepted"] == spec["drafted"] > 0, spec
    assert st["counters"]["drafts_asked"] > 0 and st["counters"]["drafts_missed"] == 0, st["counters"]


def test_a_stage_worker_killed_while_a_trip_waits_for_drafts(weights, reference):
    """The parked trip is in no stage's queue or step: the rebuild replays the stage's log, and
    the trip goes in when its drafts come, with exactly plain decoding's tokens."""
    net, conn = drafting_net(weights, weights, spare_drafter=True)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    waiting = lambda: bool(net.core._parked) and len(net.tokens("r")) >= 6  # noqa: E731
    for _ in range(40):
        net.advance(0.05, until=waiting)  # stops delivering messages the moment a trip waits
        if waiting():
            break
    assert waiting() and len(net.tokens("r")) < N_TOKENS - 4
    # a stage's worker that is not the drafter (the plan may give the drafter a stage too)
    victim = next(c for c in (net.stage_conn(i) for i in range(len(net.core.stages))) if c != conn)
    net.kill(victim)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    assert net.core.speculation.totals["accepted"] > 0
