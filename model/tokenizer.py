"""The GGUF's own tokenizer (GPT-2 style byte-level BPE) and chat template.

Built with the `tokenizers` library from `tokenizer.ggml.tokens` / `merges`; control tokens
(token_type 3, e.g. <|im_start|>) become special tokens so the chat template's markers are
single ids. The chat template is rendered with jinja2 exactly as written in the GGUF.
"""
from __future__ import annotations

import os

import jinja2
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from protocol.errors import ModelError

_CONTROL = 3
_USER_DEFINED = 4


class GGUFTokenizer:
    def __init__(self, gguf_model):
        g = gguf_model
        kind = g.field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelError(f"{g.path.name}: tokenizer model {kind!r} is not supported (only GPT-2 style BPE)")
        tokens = g.field("tokenizer.ggml.tokens")
        merges = g.field("tokenizer.ggml.merges") or []
        types = g.field("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {tok: i for i, tok in enumerate(tokens)}
        bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
        tk = Tokenizer(bpe)
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(g.field("tokenizer.ggml.add_space_prefix", False)), use_regex=True)
        tk.decoder = decoders.ByteLevel()
        special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)]
        tk.add_special_tokens(special)
        self._tk = tk
        self.vocab_size = len(tokens)
        self.eos_id = int(g.field("tokenizer.ggml.eos_token_id", 2))
        bos = g.field("tokenizer.ggml.bos_token_id")
        self.bos_id = None if bos is None else int(bos)
        self.add_bos = bool(g.field("tokenizer.ggml.add_bos_token", False))
        self.special_ids = {tokens[i]: i for i, t in enumerate(types) if t == _CONTROL}
        self.chat_template = g.field("tokenizer.chat_template")
        self._tokens = tokens

    def encode(self, text: str, special: bool = True) -> list[int]:
        """special=False: control-token strings in `text` (e.g. "<|im_end|>") are encoded as the
        plain text they are, never as the control token: what clients send is never a marker."""
        ids = self._encode_part(text, special)
        if self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def _encode_part(self, text: str, special: bool) -> list[int]:
        self._tk.encode_special_tokens = not special
        try:
            return self._tk.encode(text, add_special_tokens=False).ids
        finally:
            self._tk.encode_special_tokens = False

    def chat_roles(self) -> set[str]:
        """The roles the chat template knows (quoted role names it compares against)."""
        import re

        found = set(re.findall(r"role'?\]?\s*==\s*['\"](\w+)['\"]", self.chat_template or ""))
        # a ChatML template writes any role between its markers: the standard ones, never free text
        return found | {"system", "user", "assistant", "tool"}

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a chat for a client's messages: the template's own markers are control
        tokens, the messages' text is text (special tokens disabled), so a "<|im_end|>" inside
        content cannot end a turn and forge another. Roles must be the template's."""
        roles = self.chat_roles()
        for i, m in enumerate(messages):
            if m["role"] not in roles:
                raise ValueError(f"messages[{i}].role must be one of {', '.join(sorted(roles))}, got {m['role'][:40]!r}")
        marks = [f"\x00{i}\x01" for i in range(len(messages))]
        text = self.render_chat([{**m, "content": mark} for m, mark in zip(messages, marks)], add_generation_prompt)
        ids = [self.bos_id] if self.add_bos and self.bos_id is not None else []
        for mark, m in zip(marks, messages):
            head, found, text = text.partition(mark)
            if not found:
                raise ModelError("the chat template changed a message's content: cannot keep it apart from its markers")
            # the template text after its last marker ("user\n") is encoded together with the
            # content, as a whole-string encode would merge them ("\n\n" is one token)
            cut = max((head.rfind(t) + len(t) for t in self.special_ids if t in head), default=0)
            ids += self._encode_part(head[:cut], True) + self._encode_part(head[cut:] + m["content"], False)
        return ids + self._encode_part(text, True)

    def decode(self, ids: list[int]) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        return self._tokens[token_id]

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ModelError("this model has no chat template; use a plain prompt without --chat")
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        tmpl = env.from_string(self.chat_template)
        return tmpl.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._tokens[self.bos_id] if self.bos_id is not None else "",
            eos_token=self._tokens[self.eos_id],
        )


class StreamDecoder:
    """Turns a growing list of token ids into text increments without splitting UTF-8
    characters across byte-level tokens (a pending replacement char is held back)."""

    def __init__(self, tokenizer: GGUFTokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = ""
        # Each push decodes a window, not the whole stream (the coordinator pushes every token of
        # every stream): the ids from the last token given out, whose own text is held, so the
        # new text is the window's beyond it (a first token's leading space is dropped alike in both)
        self._start = 0
        self._held = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids[self._start:])
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self._held):]
        self.emitted += delta
        self._start, self._held = len(self.ids) - 1, self.tok.decode(self.ids[-1:])
        return delta

    def rewind(self, n: int) -> int:
        """Withdraw the ids from index n on; returns how many characters of the text already
        given out go with them."""
        del self.ids[n:]
        keep = len(os.path.commonprefix([self.tok.decode(self.ids), self.emitted]))
        retracted = len(self.emitted) - keep
        self.emitted = self.emitted[:keep]
        self._start, self._held = 0, self.emitted  # the next push decodes the whole stream once
        return retracted
