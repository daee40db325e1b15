"""Synthetic Llama models: deterministic pseudo-random packed weights, generated on the fly.

`open_model("synthetic:llama-7b")` is a model with LLaMA-7B's dimensions (hidden 4096, 32
layers, FFN 11008, 32 heads, vocab 32000) whose every tensor is drawn from its own seeded RNG
(`default_rng([seed, layer, tensor])`), so any process regenerates any layer bit-identically
without ever holding the others: the coordinator packs layer after layer, a reference run
rebuilds them, and nothing is read from disk. Weights are born packed (3-bit symmetric, groups
of 64 by default): uniform random codes in the 3-bit bit-plane packing ARE uniform random u32
words (every bit of a uniform code in [0, 8) is an independent fair coin), so the words are
drawn directly and no float matrix of 7B parameters ever exists. Per-group f16 scales of random
sign make each row's norm about 1 (E[(q-4)^2] = 5.5 for uniform q), so activations stay O(1)
through the layers. The output head is untied (a head tied to a random embedding repeats one token).

The tokenizer is byte-level with no merges: ids 0-2 are <unk>/<s>/</s> (control), 3-258 the
256 bytes, the rest `<tN>` placeholders, exposed through the same `field()` keys as a GGUF so
the coordinator's GGUFTokenizer serves text prompts unchanged.

    synthetic:llama-7b          LLaMA-7B dimensions, s3g64, seed 0
    synthetic:llama-mini@7      a small model of the same shape family (CI), seed 7
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath

import numpy as np

from kernels.quant import QuantSpec, QuantTensor, padded_k, scale_words_per_row, words_per_row
from protocol.model_types import HeadWeights, LayerWeights, ModelConfig, ModelWeights
from protocol.errors import ModelError

PREFIX = "synthetic:"
SPEC = QuantSpec(3, 64, True)
CONFIGS = {
    "llama-7b": ModelConfig(n_layers=32, hidden=4096, n_heads=32, n_kv_heads=32, head_dim=128, ffn=11008, vocab=32000,
                            rope_base=10000.0, rms_eps=1e-5, context=2048, eos_id=2, bos_id=1),
    # the same code path at CI size (hidden 256, 4 layers, vocab 1000)
    "llama-mini": ModelConfig(n_layers=4, hidden=256, n_heads=4, n_kv_heads=4, head_dim=64, ffn=704, vocab=1000,
                              rope_base=10000.0, rms_eps=1e-5, context=512, eos_id=2, bos_id=1),
}
_TENSORS = {m: i for i, m in enumerate(LayerWeights.MATRICES)}  # tensor index inside a layer's seed
_EMBEDDING, _HEAD = 1_000_000, 1_000_001  # "layer" indices in the seeds of the embedding and the output head


def is_synthetic(path) -> bool:
    return path is not None and str(path).startswith(PREFIX)


def random_matrix(n: int, k: int, seed: list[int], spec: QuantSpec = SPEC) -> QuantTensor:
    """An (n, k) packed matrix of uniform random codes and per-group scales around
    1/sqrt(k * E[code offset^2]), from its own RNG."""
    rng = np.random.default_rng(seed)
    qweight = rng.integers(0, 1 << 32, size=(n, words_per_row(k, spec)), dtype=np.uint32)
    if k % spec.group:
        qweight = _zero_padding(qweight, k, spec)  # pad inputs are zero codes in every format; keep them canonical
    groups = padded_k(k, spec.group) // spec.group
    half = 1 << (spec.bits - 1)
    offset_sq = float(np.mean((np.arange(1 << spec.bits) - half) ** 2))
    base = 1.0 / np.sqrt(k * offset_sq)
    # random signs: symmetric codes have mean offset -1/2, and positive scales would give every
    # row the same bias along the input's mean, so a stream of such layers repeats one token
    sign = np.where(rng.random((n, groups), dtype=np.float32) < 0.5, -1.0, 1.0).astype(np.float32)
    scale = (sign * base * (0.5 + rng.random((n, groups), dtype=np.float32))).astype(np.float16)
    if not spec.symmetric:  # the same values as the symmetric format: min = -scale * 2**(bits-1)
        minimum = (-scale.astype(np.float32) * half).astype(np.float16)
        words = scale.view(np.uint16).astype(np.uint32) | (minimum.view(np.uint16).astype(np.uint32) << 16)
        return QuantTensor(spec, n, k, qweight, np.ascontiguousarray(words))
    if groups % 2:
        scale = np.concatenate([scale, np.zeros((n, 1), np.float16)], axis=1)
    half_words = scale.view(np.uint16).astype(np.uint32)
    scales = np.ascontiguousarray(half_words[:, 0::2] | (half_words[:, 1::2] << 16))
    assert scales.shape[1] == scale_words_per_row(k, spec)
    return QuantTensor(spec, n, k, qweight, scales)


def _zero_padding(qweight: np.ndarray, k: int, spec: QuantSpec) -> np.ndarray:
    from kernels.quant import pack_codes, unpack_codes

    codes = unpack_codes(qweight, spec.bits)
    codes[:, k:] = (1 << (spec.bits - 1)) if spec.symmetric else 0
    return pack_codes(codes, spec.bits)


def random_layer(cfg: ModelConfig, index: int, seed: int = 0, spec: QuantSpec = SPEC) -> LayerWeights:
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"wq": (q, cfg.hidden), "wk": (kv, cfg.hidden), "wv": (kv, cfg.hidden), "wo": (cfg.hidden, q),
              "w_gate": (cfg.ffn, cfg.hidden), "w_up": (cfg.ffn, cfg.hidden), "w_down": (cfg.hidden, cfg.ffn)}
    norms = np.random.default_rng([seed, index, 100])
    return LayerWeights(
        attn_norm=(1 + 0.1 * norms.standard_normal(cfg.hidden)).astype(np.float32),
        ffn_norm=(1 + 0.1 * norms.standard_normal(cfg.hidden)).astype(np.float32),
        **{m: random_matrix(*shapes[m], [seed, index, _TENSORS[m]], spec) for m in LayerWeights.MATRICES},
    )


class _Layers(Sequence):
    """The model's layers, generated when indexed and never kept: iterating packs one layer at
    a time (the coordinator), `list()` holds them all (a single-process reference)."""

    def __init__(self, model: "SyntheticModel"):
        self._m = model

    def __len__(self) -> int:
        return self._m.config.n_layers

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return random_layer(self._m.config, i % len(self), self._m.seed, self._m.spec)


def _byte_level_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


class SyntheticModel:
    """Exposes what a GGUFModel does: config, path (its name), field() for the tokenizer, load_all()."""

    def __init__(self, path: str):
        name, _, seed = str(path)[len(PREFIX):].partition("@")
        if name not in CONFIGS:
            raise ModelError(f"unknown synthetic model {name!r}; known: {', '.join(sorted(CONFIGS))} (e.g. synthetic:llama-7b)")
        try:
            self.seed = int(seed or 0)
        except ValueError:
            raise ModelError(f"synthetic model seed must be an integer, got {seed!r}") from None
        self.path = PurePosixPath(str(path))
        self.config = CONFIGS[name]
        self.spec = SPEC
        alphabet = _byte_level_alphabet()
        tokens = ["<unk>", "<s>", "</s>"] + alphabet
        tokens += [f"<t{i}>" for i in range(len(tokens), self.config.vocab)]
        if len(tokens) != self.config.vocab:
            raise ModelError(f"synthetic model {name}: vocab {self.config.vocab} is smaller than the 259 byte-level tokens")
        self._fields = {
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": [],
            "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3),
            "tokenizer.ggml.eos_token_id": self.config.eos_id, "tokenizer.ggml.bos_token_id": self.config.bos_id,
            "tokenizer.ggml.add_bos_token": False, "general.architecture": "llama",
        }

    def field(self, key: str, default=None):
        return self._fields.get(key, default)

    @property
    def packed_bytes(self) -> int:
        """Bytes of every packed tensor (layers, embedding, head) without generating any."""
        c, s = self.config, self.spec
        q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim

        def mat(n, k):
            return 4 * n * (words_per_row(k, s) + scale_words_per_row(k, s))

        layer = mat(q, c.hidden) + 2 * mat(kv, c.hidden) + mat(c.hidden, q) + 2 * mat(c.ffn, c.hidden) + mat(c.hidden, c.ffn)
        return c.n_layers * layer + 2 * mat(c.vocab, c.hidden)

    def layer(self, i: int) -> LayerWeights:
        return random_layer(self.config, i, self.seed, self.spec)

    def embedding(self) -> QuantTensor:
        return random_matrix(self.config.vocab, self.config.hidden, [self.seed, _EMBEDDING, 0], self.spec)

    def head(self, embedding: QuantTensor | None = None) -> HeadWeights:
        norm = (1 + 0.1 * np.random.default_rng([self.seed, _HEAD, 100]).standard_normal(self.config.hidden)).astype(np.float32)
        return HeadWeights(output_norm=norm, output=random_matrix(self.config.vocab, self.config.hidden, [self.seed, _HEAD, 0], self.spec))

    def load_all(self) -> ModelWeights:
        """Layers come as a lazy sequence: each is generated when it is read."""
        return ModelWeights(config=self.config, embedding=self.embedding(), layers=_Layers(self), head=self.head())
