"""Output constrained by a grammar (response_format json_object / json_schema, tools), with
llguidance, applied on the coordinator where tokens are chosen.

Chosen by measurement over outlines-core (benchmarks/bench_grammar.py, figures in the history
and the closing note): llguidance compiles a JSON schema per request in about a millisecond
and computes a 49,152-token mask in tens of microseconds, where outlines-core builds a
regex index over the vocabulary per schema for about half a second. The tokenizer view
llguidance needs is built once per model (~1 s) and shared.

A `Grammar` is one request's constraint. `allowed(history)` is a pure function of the tokens
chosen so far: the matcher is rolled back or advanced to `history`, so a session replayed
after a failure, or rewound after a liar was caught, is masked exactly as the first time.
"""
from __future__ import annotations

import json
import threading

import numpy as np

_tokenizers: dict[int, object] = {}
_lock = threading.Lock()


class GrammarError(ValueError):
    """The schema or tool definition cannot be compiled (the request's fault: a 400)."""


def _ll_tokenizer(tokenizer):
    import llguidance

    with _lock:
        lt = _tokenizers.get(id(tokenizer))
        if lt is None:
            lt = llguidance.LLTokenizer(tokenizer._tk.to_str(), n_vocab=tokenizer.vocab_size, eos_token=tokenizer.eos_id)
            _tokenizers[id(tokenizer)] = lt
        return lt


def json_schema_grammar(schema: dict) -> str:
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema)
    except (ValueError, TypeError) as exc:
        raise GrammarError(f"not a usable JSON schema: {exc}") from None


def tool_call_schema(tools: list[dict]) -> dict:
    """One call of any of `tools`: {"name": ..., "arguments": {...}} (what the model writes;
    the API returns it as tool_calls)."""
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": t["function"]["name"]},
                             "arguments": t["function"].get("parameters") or {"type": "object"}}} for t in tools]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def tools_grammar(tools: list[dict], required: bool) -> str:
    """A tool call as constrained JSON; unless `required` (tool_choice "auto"), plain text is
    allowed too, as long as it does not start with "{" (so an answer is either a call or text)."""
    import llguidance

    schema = json.dumps(tool_call_schema(tools))
    if required:
        return json_schema_grammar(json.loads(schema))
    return llguidance.LLMatcher.grammar_from_lark(f"start: call | text\ncall: %json {schema}\ntext: /[^{{\\s](.|\\n)*/\n")


class Grammar:
    def __init__(self, tokenizer, grammar: str):
        import llguidance

        self.vocab = tokenizer.vocab_size
        self._matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer), grammar, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(self._matcher.get_error())
        self._consumed: list[int] = []

    def _sync(self, history: list[int]) -> None:
        common = 0
        for a, b in zip(self._consumed, history):
            if a != b:
                break
            common += 1
        if common < len(self._consumed):
            self._matcher.rollback(len(self._consumed) - common)
            del self._consumed[common:]
        for t in history[common:]:
            if not self._matcher.consume_token(int(t)):
                raise GrammarError(f"token {t} breaks the grammar: {self._matcher.get_error()}")
            self._consumed.append(int(t))

    def allowed(self, history: list[int]) -> np.ndarray:
        """A bool per vocabulary id: which tokens may come next (only EOS once complete)."""
        self._sync(history)
        bits = np.frombuffer(self._matcher.compute_bitmask(), np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self.vocab].astype(bool)
