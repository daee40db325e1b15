"""Does grammar-constrained decoding cost a step? Side by side in one run, on SmolLM2-135M:

- a decode step of the model (numpy backend, one session: what a constrained token waits for anyway),
- llguidance (coordinator/structured.py): compiling a request's JSON schema, and the mask of
  the whole 49,152-token vocabulary per token, walked along a real answer,
- the coordinator's full-vocabulary head for a constrained or logprobs session (one row of the
  576 x 49,152 head), and the choice itself (mask applied, top-k, sampling),
- outlines-core, the alternative: building its index for the same schema.

Figures go to the benchmark history (tabshard/bench_history.py) under grammar.*; the ratios
(mask / decode step, head + choice / decode step) are what decides whether constraints
dominate a step.

    .venv/bin/python benchmarks/bench_grammar.py [--repeats 5] [--no-history]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}}}
ANSWER = '{"name": "Ada Lovelace", "age": 36, "tags": ["mathematician", "writer", "analyst"]}'


def ms(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-history", action="store_true")
    a = ap.parse_args()

    from coordinator import structured
    from coordinator.server import full_head
    from kernels import reference as ref
    from kernels.quant import dequantize
    from tab_worker.backends import make_backend
    from protocol.model_types import SessionSlice
    from model.embedding import embed
    from model.loader import open_model
    from model.sampling import FullVocabChooser, SamplingParams
    from model.tokenizer import GGUFTokenizer

    model = open_model(None)
    tok = GGUFTokenizer(model)
    w = model.load_all()
    ids = tok.encode(ANSWER)

    # the model's decode step, one session (numpy backend, as the coordinator's own compute)
    backend = make_backend("numpy", w.config, dict(enumerate(w.layers)), w.head, 256)
    prompt = tok.encode("Describe a person as JSON.")
    backend.forward([SessionSlice("s", 0, len(prompt))], embed(w.embedding, prompt))
    pos = [len(prompt)]

    def decode_step():
        out = backend.forward([SessionSlice("s", pos[0], 1)], embed(w.embedding, [ids[0]]))
        backend.head_topk(out, 64)
        pos[0] += 1
        if pos[0] > 200:
            backend.drop_session("s")
            backend.forward([SessionSlice("s", 0, len(prompt))], embed(w.embedding, prompt))
            pos[0] = len(prompt)

    t0 = time.perf_counter()
    structured._ll_tokenizer(tok)
    tokenizer_ms = (time.perf_counter() - t0) * 1000
    grammar = structured.json_schema_grammar(SCHEMA)
    compile_ms = ms(lambda: structured.Grammar(tok, grammar), a.repeats)

    def walk_masks() -> list[float]:
        g = structured.Grammar(tok, grammar)
        out = []
        for i in range(len(ids) + 1):
            t = time.perf_counter()
            g.allowed(ids[:i])
            out.append((time.perf_counter() - t) * 1000)
        return out

    masks = [m for _ in range(a.repeats) for m in walk_masks()]

    head = full_head(w.head, w.config.rms_eps)  # what the coordinator runs
    dense = np.ascontiguousarray(dequantize(w.head.output).T)  # the same head dequantized, for comparison
    row = np.random.default_rng(0).standard_normal((1, w.config.hidden)).astype(np.float32)
    head_ms = ms(lambda: head(row), a.repeats * 4)
    dense_ms = ms(lambda: ref.rmsnorm(row, w.head.output_norm, w.config.rms_eps) @ dense, a.repeats * 4)
    logits = head(row)[0]
    chooser = FullVocabChooser(SamplingParams(greedy=False, seed=1), top_logprobs=5, grammar=structured.Grammar(tok, grammar))
    choose_ms = ms(lambda: chooser.choose(logits, ids[:5]), a.repeats * 4)

    decode_ms = ms(decode_step, a.repeats * 4)

    outlines_ms = None
    try:
        from outlines_core import Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema

        from coordinator.openai_api import token_bytes

        vocab: dict[str, list[int]] = {}
        for i in range(tok.vocab_size):
            if i == tok.eos_id:
                continue
            try:
                vocab.setdefault(bytes(token_bytes(tok, i)).decode("utf-8"), []).append(i)
            except UnicodeDecodeError:
                continue  # a token holding part of a character: outlines-core's str vocabulary cannot say it
        voc = Vocabulary(tok.eos_id, vocab)
        regex = build_regex_from_schema(json.dumps(SCHEMA))
        outlines_ms = ms(lambda: Index(regex, voc), max(1, a.repeats // 2))
    except ImportError:
        pass

    med = statistics.median
    rows = [("decode step (numpy, 1 session)", med(decode_ms)),
            ("llguidance: tokenizer view, once per model", tokenizer_ms),
            ("llguidance: compile the schema, per request", med(compile_ms)),
            ("llguidance: vocabulary mask, per token (median)", med(masks)),
            ("llguidance: vocabulary mask, per token (p95)", float(np.percentile(masks, 95))),
            ("coordinator head, one row over 49,152 tokens", med(head_ms)),
            ("  the same head dequantized (f32 matmul)", med(dense_ms)),
            ("choice: mask + top-k + sample + logprobs", med(choose_ms))]
    if outlines_ms:
        rows.append(("outlines-core: index for the schema, per schema", med(outlines_ms)))
    for name, v in rows:
        print(f"{name:<52} {v:9.3f} ms")
    mask_ratio = med(masks) / med(decode_ms)
    full_ratio = (med(head_ms) + med(choose_ms)) / med(decode_ms)
    print(f"{'mask / decode step':<52} {mask_ratio:9.5f}")
    print(f"{'(head + choice) / decode step':<52} {full_ratio:9.3f}")
    if outlines_ms:
        print(f"{'outlines-core index / llguidance compile':<52} {med(outlines_ms) / med(compile_ms):9.0f}")

    if not a.no_history:
        from tabshard.bench_history import DEFAULT_DB, Figure, History, machine

        figures = [Figure.of("grammar.decode_step_ms", decode_ms, "ms", "lower"),
                   Figure.of("grammar.llguidance_compile_ms", compile_ms, "ms", "lower"),
                   Figure.of("grammar.llguidance_mask_ms", masks, "ms", "lower"),
                   Figure.of("grammar.head_full_vocab_ms", head_ms, "ms", "lower"),
                   Figure.of("grammar.head_dequantized_ms", dense_ms, "ms", "lower"),
                   Figure.of("grammar.choice_ms", choose_ms, "ms", "lower"),
                   Figure.of("grammar.mask_over_decode", [mask_ratio], "x", "lower"),
                   Figure.of("grammar.head_choice_over_decode", [full_ratio], "x", "lower")]
        if outlines_ms:
            figures.append(Figure.of("grammar.outlines_index_ms", outlines_ms, "ms", "lower"))
        hist = History(DEFAULT_DB)
        try:
            run = hist.start_run(machine(adapter=False), suite="bench_grammar")
            for f in figures:
                hist.add(run, f)
        finally:
            hist.close()
        print(f"appended {len(figures)} figures to {DEFAULT_DB}")


if __name__ == "__main__":
    main()
