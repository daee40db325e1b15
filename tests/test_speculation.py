"""Speculative decoding (coordinator/speculation.py and the scheduler's trips of k+1 rows), with
the tiny model through the real wire codec (tests/harness.py): drafts from prompt lookup and from
a draft model, verified by the head's top-k of every row, rejected drafts rolled back on every
stage; greedy and seeded sampling give exactly the tokens of plain decoding; a worker killed
mid-trip and a liar are handled as without speculation; the sampled distribution is checked by
a chi-square test against plain sampling."""
import math

import numpy as np
import pytest

from actors.faults import lie
from coordinator.speculation import AdaptiveK, Draft, DraftModel, PromptLookup, Speculator, decide_trip, lookup
from protocol.model_types import SessionSlice
from tab_worker.local import LocalCompute
from model.embedding import embed
from tab_worker.generate import LocalGenerator
from model.sampling import Sampler, SamplingParams
from tests.harness import run_until_done, start_net

PROMPT = [5, 17, 42, 99, 7, 123, 250, 11]
N_TOKENS = 24
SAMPLED = SamplingParams(greedy=False, temperature=0.8, seed=11)


def reference_of(weights, prompt, n, params=SamplingParams()):
    return list(LocalGenerator(weights, backend="numpy", max_ctx=256).generate(prompt, n, params, stop_at_eos=False))


@pytest.fixture(scope="module")
def reference(weights):
    return reference_of(weights, PROMPT, N_TOKENS)


def speculating_net(weights, n_workers, source, max_k=4, local=False, **settings):
    net = start_net(weights, n_workers, local=local, **settings)
    net.core.speculation = Speculator("draft-model" if isinstance(source, DraftModel) else "prompt-lookup", max_k, source)
    return net


def truncates(net):
    """Every truncate_session message the coordinator sends, as (conn, session, length)."""
    seen, perform = [], net.perform

    def watch(actions):
        seen.extend((a.conn, a.msg["session_id"], a.msg["length"]) for a in actions
                    if getattr(a, "msg", None) and a.msg.get("type") == "truncate_session")
        perform(actions)
    net.perform = watch
    return seen


# ---------------------------------------------------------------------- drafts and k
def test_lookup_proposes_what_followed_the_latest_match():
    assert lookup([1, 2, 3, 4, 9, 1, 2, 3], 3) == [4, 9, 1]
    assert lookup([7, 1, 2, 8, 1, 2, 9, 5, 1, 2], 2) == [9, 5]  # the latest earlier occurrence
    assert lookup([1, 2, 3, 4, 9, 8, 3], 5, max_ngram=3) == [4, 9, 8, 3]  # a 1-gram when nothing longer matches
    assert lookup([1, 2, 3, 4], 3) == [] and lookup([5], 3) == [] and lookup([1, 2, 1], 0) == []
    assert lookup([4, 1, 2, 3, 1, 2], 2, min_ngram=2) == [3, 1]
    assert lookup([4, 1, 2, 3, 5, 2], 2, min_ngram=2) == []


def test_adaptive_k_backs_off_to_zero_and_comes_back():
    a = AdaptiveK(max_k=8)
    assert 1 <= a.k() <= 8
    for _ in range(12):
        a.observe(a.k() or 1, 0)
    assert a.k() == 0
    for _ in range(12):
        a.observe(0, 0, first_came_true=True)  # drafts not sent came true: they pay again
    assert a.k() >= 4
    for _ in range(10):
        a.observe(a.k(), a.k())
    assert a.k() == 8


def test_draft_model_rolls_its_cache_back_to_the_context(weights):
    """Proposals from a draft model that is the target itself are what greedy decoding makes,
    also after a context that departs from its last drafts."""
    ref = reference_of(weights, PROMPT, 10)
    dm = DraftModel(weights, LocalCompute(), max_ctx=256)
    greedy = Sampler(SamplingParams())
    assert dm.propose("s", PROMPT, 4, greedy, 0).tokens == ref[:4]
    assert dm.propose("s", PROMPT + ref[:2], 3, greedy, 2).tokens == ref[2:5]  # 2 of its drafts kept
    other = PROMPT + [ref[0], (ref[1] + 1) % 300]  # its second draft rejected: a different token came
    assert dm.propose("s", other, 2, greedy, 2).tokens == reference_of(weights, other, 2)
    dm.forget("s")
    assert "s" not in dm.backend.sessions()


# ---------------------------------------------------------------------- the worker's side
def test_worker_returns_topk_for_a_speculative_slice_and_truncates(weights):
    from protocol import wire

    net = start_net(weights, 1)
    w = net.workers[net.stage_conn(0)]
    cfg = weights.config
    backend = w.ranges[(0, cfg.n_layers)]
    ids = PROMPT + [3, 4, 5]
    step = wire.make("step", step_id=1, epoch=w.epoch, layer_start=0, layer_end=cfg.n_layers, want_topk=5,
                     sessions=[{"session_id": "a", "start_pos": 0, "length": len(ids), "topk_rows": 4}],
                     hidden=embed(weights.embedding, ids))
    (reply,) = w.handle(wire.decode(wire.encode(step)))
    assert reply["topk_ids"].shape == (4, 5)
    ref = LocalGenerator(weights, backend="numpy", max_ctx=64).backend
    hidden = ref.forward([SessionSlice("b", 0, len(ids))], embed(weights.embedding, ids))
    want_ids, want_logits = ref.head_topk(hidden[-4:], 5)
    np.testing.assert_array_equal(reply["topk_ids"], want_ids)
    np.testing.assert_allclose(reply["topk_logits"], want_logits, rtol=1e-5, atol=1e-5)
    w.handle(wire.decode(wire.encode(wire.make("truncate_session", session_id="a", length=len(PROMPT) + 1))))
    assert backend.session_length("a") == len(PROMPT) + 1


# ---------------------------------------------------------------------- exact tokens
@pytest.mark.parametrize("n_workers", [1, 4])
@pytest.mark.parametrize("draft", ["same-model", "other-model"])
def test_greedy_tokens_identical_with_draft_models(weights, other_weights, reference, n_workers, draft):
    source = DraftModel(weights if draft == "same-model" else other_weights, LocalCompute(), max_ctx=256)
    net = speculating_net(weights, n_workers, source)
    sent = truncates(net)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    t = net.core.speculation.totals
    if draft == "same-model":  # every draft kept: max_k + 1 tokens a trip, no rollback
        # all but the prompt trip's token and one plain trip's (what drafts cost is measured
        # against it: Speculator.draft_k) came from speculative trips
        assert t["tokens"] == N_TOKENS - 2
        assert t["accepted"] == t["drafted"] and t["trips"] <= 7 and not sent
    else:  # mostly rejected: rolled back on every stage's worker
        assert t["accepted"] < t["drafted"] and t["rollbacks"] >= 1
        assert len(sent) == t["rollbacks"] * n_workers
        assert len({c for c, _, _ in sent}) == n_workers
    # the workers' KV holds no position past the tokens the session kept: what is left is the
    # finished conversation kept for a next turn (the prompt and the tokens fed back), nothing more
    cache = net.core.prefix_cache
    assert [len(e.tokens) for e in cache.values()] == [len(PROMPT) + N_TOKENS - 1]
    assert all(set(b.sessions()) <= set(cache) and all(b.session_length(c) == len(cache[c].tokens) for c in b.sessions())
               for w in net.workers.values() for b in w.ranges.values())


def test_prompt_lookup_on_a_repeating_prompt_keeps_tokens_and_rolls_back(weights):
    """A prompt quoting the model's own continuation: lookup drafts hit for a while, then miss."""
    ref = reference_of(weights, PROMPT, 12)
    prompt = PROMPT + ref + [9, 8] + PROMPT
    want = reference_of(weights, prompt, 20)
    net = speculating_net(weights, 4, PromptLookup())
    net.submit("r", prompt, 20, stop_at_eos=False)
    run_until_done(net, ["r"])
    assert net.tokens("r") == want
    t = net.core.speculation.totals
    assert t["accepted"] >= 1 and t["trips"] < 19
    status = net.core.status(net.now)["speculation"]
    assert status["mode"] == "prompt-lookup" and status["tokens_per_trip"] > 1


def test_sampled_tokens_identical_seed_for_seed(weights, other_weights):
    want = reference_of(weights, PROMPT, N_TOKENS, SAMPLED)
    for w in (weights, other_weights):
        net = speculating_net(weights, 2, DraftModel(w, LocalCompute(), max_ctx=256))
        net.submit("r", PROMPT, N_TOKENS, SAMPLED, stop_at_eos=False)
        run_until_done(net, ["r"])
        assert net.tokens("r") == want


def test_speculative_steps_mix_sessions(weights, reference):
    """Two sessions' trips (one greedy, one sampled: their drafts are kept for different spans)
    share stage steps: a step carries one session's draft rows beside the other's rows."""
    net = speculating_net(weights, 1, DraftModel(weights, LocalCompute(), max_ctx=256))
    steps, perform = [], net.perform

    def watch(actions):
        steps.extend(a.msg for a in actions if getattr(a, "msg", None) and a.msg.get("type") == "step")
        perform(actions)
    net.perform = watch
    net.submit("a", PROMPT, N_TOKENS, stop_at_eos=False)
    net.submit("b", PROMPT, N_TOKENS, SAMPLED, stop_at_eos=False)
    run_until_done(net, ["a", "b"])
    assert net.tokens("a") == reference and net.tokens("b") == reference_of(weights, PROMPT, N_TOKENS, SAMPLED)
    mixed = [m for m in steps if len(m["sessions"]) == 2 and m["hidden"].shape[0] > 2 and m["hidden"].shape[0] < 20]
    assert mixed


# ---------------------------------------------------------------------- failures and liars
@pytest.mark.parametrize("victim_stage", [0, 3])
def test_worker_killed_mid_trip_gives_identical_tokens(weights, other_weights, reference, victim_stage):
    net = speculating_net(weights, 4, DraftModel(other_weights, LocalCompute(), max_ctx=256))
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    # kill while a speculative item is in flight
    net.run(until=lambda: len(net.tokens("r")) >= 6 and any(
        st.inflight and any(i.draft for i in st.inflight.items) for st in net.core.stages))
    net.kill(net.stage_conn(victim_stage))
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    kinds = [e["kind"] for e in net.core.events]
    assert "death" in kinds and "rebuild" in kinds


def test_liar_at_the_head_is_caught_in_speculative_steps(weights, reference):
    net = speculating_net(weights, 3, DraftModel(weights, LocalCompute(), max_ctx=256), local=True, spot_check_fraction=1.0)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    net.run(until=lambda: len(net.tokens("r")) >= 3)
    victim = net.stage_conn(2)
    victim_id = net.core.conn_worker[victim]
    lie(net.workers[victim], 0.01)
    run_until_done(net, ["r"], seconds=60)
    assert net.tokens("r") == reference
    assert net.core.workers[victim_id].state == "quarantined"
    assert net.core.speculation.totals["drafted"] > 0


def test_honest_speculative_steps_pass_checks_of_all_their_rows(weights, reference):
    net = speculating_net(weights, 3, DraftModel(weights, LocalCompute(), max_ctx=256), local=True, spot_check_fraction=1.0)
    checks, perform = [], net.perform

    def watch(actions):
        checks.extend(a.msg for a in actions if getattr(a, "conn", None) == "local" and getattr(a, "msg", None)
                      and a.msg.get("type") == "step" and a.msg["sessions"][0].get("topk_rows"))
        perform(actions)
    net.perform = watch
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["r"], seconds=60)
    assert net.tokens("r") == reference
    assert checks and net.core.counters["spot_check_mismatches"] == 0


# ---------------------------------------------------------------------- the distribution
def _chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty: the chi-square quantile at the normal quantile z (3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_sampled_distribution_matches_plain_sampling_chi_square():
    """The first 3 tokens at T = 0.8 from a small synthetic model (its logits a function of the
    context), 2,000 samples with speculation and 2,000 without, on different seeds: the joint
    distributions agree (two-sample chi-square, p > 0.001), though drafts were often rejected."""
    vocab, n, rng0 = 6, 2000, np.random.default_rng(0)
    table = {}

    def head(context):
        key = tuple(context[-2:])
        if key not in table:
            table[key] = rng0.standard_normal(vocab) * 1.5
        logits = table[key]
        order = np.argsort(-logits)
        return order.astype(np.int32), logits[order].astype(np.float32)

    def plain(seed):
        s, ctx = Sampler(SamplingParams(greedy=False, temperature=0.8, seed=seed)), [0]
        for step in range(3):
            ctx.append(s.choose(*head(ctx), step))
        return tuple(ctx[1:])

    def speculative(seed):
        s, ctx, kept = Sampler(SamplingParams(greedy=False, temperature=0.8, seed=seed)), [0], 0
        draft_rng = np.random.default_rng(10_000 + seed)
        while len(ctx) < 4:
            draft = Draft([int(t) for t in draft_rng.integers(0, vocab, 2)])  # a poor draft source
            rows = [head(ctx + draft.tokens[:j]) for j in range(len(draft.tokens) + 1)]
            decided = decide_trip(s, len(ctx) - 1, rows, draft)
            kept += len(decided) - 1
            ctx += decided
        return tuple(ctx[1:4]), kept

    a = [plain(seed) for seed in range(n)]
    b, kept = zip(*[speculative(seed) for seed in range(n, 2 * n)])
    assert 100 < sum(kept) < 2 * n  # drafts were kept and rejected alike
    cells = sorted(set(a) | set(b))
    ca = np.array([a.count(c) for c in cells], float)
    cb = np.array([b.count(c) for c in cells], float)
    keep = (ca + cb) >= 10  # rare cells pooled
    ca = np.append(ca[keep], ca[~keep].sum())
    cb = np.append(cb[keep], cb[~keep].sum())
    total = ca + cb
    stat = float(np.sum((ca - total / 2) ** 2 / (total / 2) + (cb - total / 2) ** 2 / (total / 2)))
    df = len(total) - 1
    assert df >= 10
    assert stat < _chi2_critical(df), (stat, df)
    # and the test has teeth: plain sampling at another temperature is told apart
    def hotter(seed):
        s, ctx = Sampler(SamplingParams(greedy=False, temperature=1.3, seed=seed)), [0]
        for step in range(3):
            ctx.append(s.choose(*head(ctx), step))
        return tuple(ctx[1:])
    c = [hotter(seed) for seed in range(n)]
    cc = np.array([c.count(x) for x in cells], float)
    cc = np.append(cc[keep], cc[~keep].sum())
    t2 = ca + cc
    stat2 = float(np.sum((ca - t2 / 2) ** 2 / (t2 / 2) + (cc - t2 / 2) ** 2 / (t2 / 2)))
    assert stat2 > _chi2_critical(df)


# ---------------------------------------------------------------------- settings
def test_settings_from_toml_and_flags(tmp_path):
    import argparse

    from coordinator.config import load_settings
    from tabshard.cli_cluster import _serve_args, settings_from_args
    from protocol.errors import ConfigError

    toml = tmp_path / "serve.toml"
    toml.write_text('[serve]\nspeculation = "prompt-lookup"\nspeculation_max_k = 3\n')
    s = load_settings(str(toml))
    assert (s.speculation, s.speculation_max_k) == ("prompt-lookup", 3)
    p = argparse.ArgumentParser()
    _serve_args(p)
    a = p.parse_args(["--config", str(toml), "--speculation", "off", "--speculation-max-k", "5"])
    assert (settings_from_args(a).speculation, settings_from_args(a).speculation_max_k) == ("off", 5)
    with pytest.raises(ConfigError, match="allowed values are off, prompt-lookup, draft-model"):
        load_settings(None, {"speculation": "lookahead"})
    with pytest.raises(ConfigError, match="allowed range is 0 to 16"):
        load_settings(None, {"speculation_max_k": 40})
    # without a draft model here, a worker's (tabshard worker --draft-model) drafts
    assert load_settings(None, {"speculation": "draft-model"}).draft_model == ""
    with pytest.raises(ConfigError, match="allowed range is 1.0 to 60000.0"):
        load_settings(None, {"draft_deadline_ms": 0})
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(None, {"speculation": "draft-model", "draft_model": str(tmp_path / "none.gguf")})


def test_real_model_greedy_tokens_identical_with_prompt_lookup(smollm2_weights, smollm2_tokenizer):
    """SmolLM2-135M over 2 in-process stages: a prompt asking to repeat a passage of the Python
    docs; with prompt lookup the drafts are mostly kept and the tokens are plain decoding's."""
    from pydoc_data.topics import topics

    passage = " ".join(topics["for"].split())[:300]
    ids = smollm2_tokenizer.encode(smollm2_tokenizer.render_chat(
        [{"role": "user", "content": f"Repeat the following passage word for word:\n\n{passage}"}]))
    n = 16
    assert len(ids) + n <= 256
    net = speculating_net(smollm2_weights, 2, PromptLookup(), max_k=6)
    net.submit("r", ids, n, stop_at_eos=False)
    run_until_done(net, ["r"], seconds=120)
    assert net.tokens("r") == reference_of(smollm2_weights, ids, n)
    t = net.core.speculation.totals
    assert t["accepted"] / t["drafted"] > 0.5 and t["tokens"] / t["trips"] > 2


def test_draft_model_from_settings_drafts_for_the_served_model(weights, reference, tmp_path):
    """speculation = "draft-model" with a model file (here the tiny model as a .tsq): serve's
    opener loads it on the coordinator's own compute and its drafts, the served model's own, are
    all kept."""
    from coordinator.config import load_settings
    from tabshard import qmodel
    from tabshard.models import open_model

    path = tmp_path / "draft.tsq"
    qmodel.write(path, weights, {})
    s = load_settings(None, {"speculation": "draft-model", "draft_model": str(path), "speculation_max_k": 3, "max_ctx": 256})
    draft = DraftModel(open_model(s.draft_model).load_all(), LocalCompute(), max_ctx=s.max_ctx)
    net = start_net(weights, 2, speculation=s.speculation, draft_model=s.draft_model, speculation_max_k=s.speculation_max_k,
                    draft=draft)
    assert isinstance(net.core.speculation.source, DraftModel)
    net.submit("r", PROMPT, N_TOKENS, stop_at_eos=False)
    run_until_done(net, ["r"])
    assert net.tokens("r") == reference
    t = net.core.speculation.totals
    assert t["accepted"] == t["drafted"] > 0 and t["tokens"] / t["trips"] == pytest.approx(4, abs=0.5)


def test_the_cost_of_a_drafted_row_is_measured_and_switches_drafts_off_where_rows_are_dear():
    """A trip's drafted rows are not free on a CPU tab: the speculator times trips with and
    without drafts and weighs the measured cost against the acceptance, so drafts that rarely
    come true stop where rows are dear and go on where a trip is mostly hops."""
    from coordinator.speculation import AdaptiveK, Speculator

    def run(plain_ms, per_row_ms):
        spec = Speculator("prompt-lookup", max_k=6)
        ctx = [1, 2, 3, 9, 1, 2, 3]  # the lookup drafts what followed "1 2 3" before
        t, sent = 0.0, []
        for trip in range(40):
            d = spec.draft("s", ctx if trip % 2 else [5, 6, 7, 8], Sampler(SamplingParams()), trip, 6, now=t)
            t += (plain_ms + per_row_ms * len(d.tokens)) / 1000
            spec.trip_done("s", t)
            sent.append(len(d.tokens))
        return spec, sent

    (dear, dear_sent), (cheap, cheap_sent) = run(10.0, 6.0), run(40.0, 0.4)
    assert dear.plain_trip_ms == pytest.approx(10.0) and cheap.plain_trip_ms == pytest.approx(40.0)
    # a drafted row costs 0.6 of a plain trip there: learned until drafts stopped paying (at the
    # starting acceptance estimate of 0.5), and none sent since
    assert dear.row_cost > 0.4 and sum(dear_sent[-20:]) == 0 and sum(dear_sent) > 0
    assert dear.status()["row_cost"] == pytest.approx(dear.row_cost, abs=1e-4)
    # 0.01 of a trip: drafts go on, also at a 30 % acceptance
    assert cheap.row_cost == pytest.approx(0.01, abs=0.01) and sum(cheap_sent[-20:]) > 0
    assert AdaptiveK(6, cheap.row_cost, rate=0.3).k() >= 1


def test_a_plain_trip_times_the_baseline_and_a_draft_model_is_re_measured_while_it_does_not_pay():
    """A draft model's drafts may be taken every trip, so no plain trip would ever time what a
    trip costs without them: the first is plain, and one in CALIBRATE_EVERY after it. Once drafts
    stop paying, one trip in CALIBRATE_EVERY carries a single draft (a model has no free guess to
    learn from, as prompt lookup has)."""
    from coordinator.speculation import CALIBRATE_EVERY

    class Echo:  # a draft source proposing k copies of the last token
        def propose(self, session_id, context, k, sampler=None, step=0):
            return Draft([context[-1]] * k)

        def forget(self, session_id):
            pass

    spec = Speculator("draft-model", max_k=4, source=Echo())
    t, sent = 0.0, []
    for trip in range(3 * CALIBRATE_EVERY):
        d = spec.draft("s", [1, 2, 3], Sampler(SamplingParams()), trip, 4, now=t)
        t += (10.0 + 30.0 * len(d.tokens)) / 1000  # each drafted row costs 3 plain trips: drafts never pay
        spec.trip_done("s", t)
        sent.append(len(d.tokens))
    assert sent[0] == 0 and sent[1] > 0  # the baseline first, then drafts at the starting estimate
    assert spec.plain_trip_ms == pytest.approx(10.0) and spec.row_cost > 1.0
    late = sent[CALIBRATE_EVERY:]
    assert sorted(set(late)) == [0, 1] and late.count(1) == 2  # drafts off, but re-measured once per CALIBRATE_EVERY
