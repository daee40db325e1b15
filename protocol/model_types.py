"""The shapes every backend agrees on: model config, per-layer weights, and session slices.

A backend holds a contiguous range of transformer layers (and maybe the final head) and
runs them for rows of hidden state belonging to one or more sessions. The coordinator owns
embedding and sampling; backends never see token ids except in ``head_topk``'s output.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kernels.quant import QuantTensor


@dataclass(frozen=True)
class ModelConfig:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rope_base: float
    rms_eps: float
    context: int
    eos_id: int
    bos_id: int | None = None
    # > 0: each FFN's hidden space is rotated (tabshard/rotation.py's rotate_ffn) and ffn_down
    # reads the activation after a normalized Walsh-Hadamard transform of blocks of this size
    # (kernels/silu_hadamard.wgsl and its twins); a .tsq's config carries it
    ffn_hadamard: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @staticmethod
    def from_dict(d: dict) -> "ModelConfig":
        return ModelConfig(**{k: d[k] for k in ModelConfig.__dataclass_fields__ if k in d})


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # f32 [hidden]
    wq: QuantTensor  # (n_heads*head_dim, hidden)
    wk: QuantTensor  # (n_kv_heads*head_dim, hidden)
    wv: QuantTensor
    wo: QuantTensor  # (hidden, n_heads*head_dim)
    ffn_norm: np.ndarray
    w_gate: QuantTensor  # (ffn, hidden)
    w_up: QuantTensor
    w_down: QuantTensor  # (hidden, ffn)

    MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, m).nbytes for m in self.MATRICES) + self.attn_norm.nbytes + self.ffn_norm.nbytes


@dataclass
class HeadWeights:
    output_norm: np.ndarray  # f32 [hidden]
    output: QuantTensor  # (vocab, hidden)

    @property
    def nbytes(self) -> int:
        return self.output.nbytes + self.output_norm.nbytes


@dataclass(frozen=True)
class SessionSlice:
    """Rows [start_pos, start_pos+length) of one session inside a batched forward call."""

    session_id: str
    start_pos: int
    length: int


@dataclass
class ModelWeights:
    config: ModelConfig
    embedding: QuantTensor  # (vocab, hidden)
    layers: list[LayerWeights] = field(default_factory=list)
    head: HeadWeights | None = None
