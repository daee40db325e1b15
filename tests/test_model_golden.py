"""SmolLM2 from its GGUF vs Hugging Face transformers' golden outputs (tests/fixtures, made once
with make_smollm2_golden.py; no torch needed here)."""
import json
from pathlib import Path

import numpy as np
import pytest

from protocol.model_types import SessionSlice
from model.embedding import embed
from tab_worker.generate import LocalGenerator

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "smollm2_golden.json").read_text())
CASES = {c["name"]: c for c in GOLDEN["cases"]}
# transformers dequantizes to f32 and runs torch kernels; we run the same f32 math in numpy.
# Logit differences come from summation order only.
LOGIT_ATOL = 2e-3


@pytest.fixture(scope="module")
def generator(smollm2_weights):
    return LocalGenerator(smollm2_weights, backend="numpy", max_ctx=512)


def test_config_matches_transformers(smollm2_model):
    c, g = smollm2_model.config, GOLDEN["config"]
    assert (c.hidden, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn, c.vocab) == (
        g["hidden_size"], g["num_hidden_layers"], g["num_attention_heads"], g["num_key_value_heads"],
        g["intermediate_size"], g["vocab_size"])
    assert c.rope_base == g["rope_theta"]


@pytest.mark.parametrize("case", GOLDEN["tokenizer_cases"], ids=lambda c: repr(c["text"])[:20])
def test_tokenizer_matches(smollm2_tokenizer, case):
    assert smollm2_tokenizer.encode(case["text"]) == case["ids"]


@pytest.mark.parametrize("name", list(CASES))
def test_prompt_rendering_and_tokens(smollm2_tokenizer, name):
    case = CASES[name]
    if case["kind"] == "chat":
        assert smollm2_tokenizer.render_chat(case["messages"]) == case["rendered"]
    assert smollm2_tokenizer.encode(case["rendered"]) == case["prompt_ids"]


@pytest.mark.parametrize("name", list(CASES))
def test_teacher_forced_logits(generator, name):
    """One pass over prompt + golden continuation: each step's top-5 must match HF's within tolerance,
    so a near-tie cannot hide a real error by diverging the free-running sequence."""
    case = CASES[name]
    ids = case["prompt_ids"] + case["greedy_ids"]
    be = generator.backend
    hidden = be.forward([SessionSlice(name, 0, len(ids))], embed(generator.embedding, ids))
    n = len(case["greedy_ids"])
    rows = hidden[len(case["prompt_ids"]) - 1 : len(case["prompt_ids"]) - 1 + n]
    top_ids, top_logits = be.head_topk(rows, 5)
    be.drop_session(name)
    for i, step in enumerate(case["steps"]):
        expected = dict(zip(step["top5_ids"], step["top5_logits"]))
        assert top_ids[i][0] == step["top5_ids"][0], f"step {i}: argmax differs"
        for tid, val in zip(top_ids[i], top_logits[i]):
            if tid in expected:
                assert abs(val - expected[tid]) < LOGIT_ATOL, f"step {i} token {tid}: {val} vs {expected[tid]}"
        np.testing.assert_allclose(top_logits[i][0], step["top5_logits"][0], atol=LOGIT_ATOL)


@pytest.mark.parametrize("name", ["raw_prose_capital", "chat_user_capital", "raw_long_distributed"])
def test_free_running_greedy_tokens(generator, name):
    case = CASES[name]
    out = list(generator.generate(case["prompt_ids"], len(case["greedy_ids"])))
    assert out == case["greedy_ids"]


def _whole_stream_deltas(tok, ids):
    """What a stream decoder gives out, from decoding the whole stream at every token."""
    out, emitted = [], ""
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k])
        out.append("" if text.endswith("\ufffd") else text[len(emitted):])
        emitted = emitted if text.endswith("\ufffd") else text
    return out


def test_stream_decoder_gives_the_whole_streams_text_token_by_token(smollm2_tokenizer):
    """StreamDecoder decodes a window from the last token it gave out: each push gives what
    decoding the whole stream would (characters split over byte tokens held back until whole,
    leading spaces kept), and after a rewind the text goes on from the kept tokens."""
    import random

    from model.tokenizer import StreamDecoder

    tok = smollm2_tokenizer
    rng = random.Random(0)
    text_ids = tok.encode("Héllo wörld, ünïcödé 你好世界 🤖🚀 and more. " * 3)
    streams = [text_ids[rng.randrange(len(text_ids)):][:40] for _ in range(30)]
    streams += [[rng.randrange(300) for _ in range(40)] for _ in range(30)]  # byte tokens and their merges
    streams += [[rng.randrange(tok.vocab_size) for _ in range(40)] for _ in range(10)]
    for ids in streams:
        d = StreamDecoder(tok)
        assert [d.push(t) for t in ids] == _whole_stream_deltas(tok, ids)
    d = StreamDecoder(tok)
    for t in text_ids[:30]:
        d.push(t)
    d.rewind(12)
    given = [d.push(t) for t in text_ids[40:60]]
    assert d.emitted == "".join(_whole_stream_deltas(tok, text_ids[:12] + text_ids[40:60]))
    assert d.emitted.endswith("".join(given))
