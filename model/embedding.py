"""The coordinator's side of a token's path into the model: token ids -> embedded rows, and the
request checks that come before any compute."""
from __future__ import annotations

import numpy as np

from kernels.quant import QuantTensor, dequantize
from protocol.errors import TabshardError
from protocol.model_types import ModelConfig


def embed(embedding: QuantTensor, token_ids) -> np.ndarray:
    """f32 rows of the quantized embedding for the given ids (the numpy twin of embedding.wgsl
    applied on the coordinator, which embeds tokens for every pipeline)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= embedding.n):
        raise TabshardError(f"token id out of range [0, {embedding.n})")
    rows = QuantTensor(embedding.spec, len(ids), embedding.k, embedding.qweight[ids], embedding.scales[ids])
    return dequantize(rows)


def check_request(config: ModelConfig, prompt_ids: list[int], max_tokens: int) -> None:
    if max_tokens < 1:
        raise TabshardError(f"max tokens must be at least 1, got {max_tokens}")
    if not prompt_ids:
        raise TabshardError("the prompt is empty after tokenization")
    if len(prompt_ids) >= config.context:
        raise TabshardError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {config.context}")
