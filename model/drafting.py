"""The drafting loop of a draft model, one source for its two runners: the coordinator's own
compute (coordinator/speculation.py's DraftModel) and a worker holding a draft model
(tab_worker/worker.py's on_draft). The backend and the next-token function are injected: this
floor knows neither the coordinator nor the worker.

Each session keeps a KV cache in the backend; a context that departs from what the cache holds
(rejected drafts) is rolled back by truncating the cache at the first token that differs and
feeding from there. The proposal is the draft model's argmax at each position (a point-mass q,
whatever the session's sampling: see coordinator/speculation.py)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from model.embedding import embed

# next_token(backend, session_id, pos, rows) -> the argmax token after `rows` fed at `pos`
NextToken = Callable[[object, str, int, np.ndarray], int]


class DraftRunner:
    def __init__(self, backend, embedding, next_token: NextToken, max_ctx: int):
        """backend: holds every layer and the head of the draft model, with a KV cache per
        session of up to max_ctx positions (truncate_session, drop_session)."""
        self.backend = backend
        self.embedding = embedding
        self.next_token = next_token
        self.max_ctx = max_ctx
        self._fed: dict[str, list[int]] = {}  # session -> tokens whose KV the draft cache holds

    def propose(self, session_id: str, context: list[int], k: int) -> list[int]:
        """Up to k tokens to follow `context` (fewer where the draft model's context ends)."""
        k = min(k, self.max_ctx - len(context))
        if k <= 0 or not context:
            return []
        fed = self._fed.get(session_id, [])
        common = 0
        for a, b in zip(fed, context):
            if a != b:
                break
            common += 1
        common = min(common, len(context) - 1)  # the last context token is fed again: its row drafts
        self.backend.truncate_session(session_id, common)
        tokens, feed, pos = [], context[common:], common
        for _ in range(k):
            tokens.append(int(self.next_token(self.backend, session_id, pos, embed(self.embedding, feed))))
            pos += len(feed)
            feed = tokens[-1:]
        self._fed[session_id] = list(context) + tokens[:-1]  # the last draft's KV is not computed
        return tokens

    def forget(self, session_id: str) -> None:
        self._fed.pop(session_id, None)
        self.backend.drop_session(session_id)

    def session_ids(self) -> list[str]:
        return list(self._fed)
