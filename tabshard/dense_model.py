"""The model as quantization sees it: a numpy forward over whole windows that can tap the
inputs of every linear layer (DenseModel), the Hessians X^T X GPTQ needs, and the names of the
quantizable tensors and of the quantization choices ('gptq:s3g64', 'source'). Calibration,
rotation and sequential GPTQ all build on it (tabshard/calibration.py explains the pipeline).

The forward is the same math as tab_worker/numpy_backend.py (kernels/reference.py's twins)
without a KV cache: whole windows at once, which is what calibration and scoring need.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels import reference as ref
from kernels.quant import dequantize
from protocol.model_types import LayerWeights, ModelConfig, ModelWeights

WINDOW = 512
# where each linear layer reads its input: the Hessian it is calibrated with
TAP_OF = {"wq": "attn_in", "wk": "attn_in", "wv": "attn_in", "wo": "o_in",
          "w_gate": "ffn_in", "w_up": "ffn_in", "w_down": "down_in"}
TAPS = ("attn_in", "o_in", "ffn_in", "down_in")


def windows(ids, window: int = WINDOW) -> list[np.ndarray]:
    ids = np.asarray(ids, np.int64)
    return [ids[i : i + window] for i in range(0, len(ids) - 1, window) if len(ids[i : i + window]) > 1]


@dataclass
class DenseLayer:
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    mats: dict  # attr -> f32 (n, k)

    @staticmethod
    def of(w: LayerWeights) -> "DenseLayer":
        return DenseLayer(np.asarray(w.attn_norm, np.float32), np.asarray(w.ffn_norm, np.float32),
                          {m: dequantize(getattr(w, m)) for m in LayerWeights.MATRICES})


class DenseModel:
    """f32 weights of a ModelWeights (dequantized once), with a windowed forward."""

    def __init__(self, weights: ModelWeights, layers: list[DenseLayer] | None = None,
                 embedding: np.ndarray | None = None, head: np.ndarray | None = None):
        self.config: ModelConfig = weights.config
        self.embedding = dequantize(weights.embedding) if embedding is None else embedding
        self.layers = [DenseLayer.of(lw) for lw in weights.layers] if layers is None else layers
        self.head_norm = np.asarray(weights.head.output_norm, np.float32)
        if head is not None:
            self.head = head
        elif weights.head.output is weights.embedding:
            self.head = self.embedding
        else:
            self.head = dequantize(weights.head.output)

    def layer_forward(self, li: int, x: np.ndarray, tap=None) -> np.ndarray:
        c, L = self.config, self.layers[li]
        t = x.shape[0]
        pos = np.arange(t)
        qd = c.n_heads * c.head_dim
        h = ref.rmsnorm(x, L.attn_norm, c.rms_eps)
        if tap:
            tap(li, "attn_in", h)
        q = ref.rope((h @ L.mats["wq"].T).reshape(t, c.n_heads, c.head_dim), pos, c.rope_base)
        k = ref.rope((h @ L.mats["wk"].T).reshape(t, c.n_kv_heads, c.head_dim), pos, c.rope_base)
        v = (h @ L.mats["wv"].T).reshape(t, c.n_kv_heads, c.head_dim)
        a = ref.attention(q, k.transpose(1, 0, 2), v.transpose(1, 0, 2), 0).reshape(t, qd)
        if tap:
            tap(li, "o_in", a)
        x = x + a @ L.mats["wo"].T
        h = ref.rmsnorm(x, L.ffn_norm, c.rms_eps)
        if tap:
            tap(li, "ffn_in", h)
        g = ref.silu_gate(h @ L.mats["w_gate"].T, h @ L.mats["w_up"].T)
        if c.ffn_hadamard:  # a rotated FFN hidden space (tabshard/rotation.py): as the runtime does
            g = ref.hadamard(g, c.ffn_hadamard)
        if tap:
            tap(li, "down_in", g)
        return x + g @ L.mats["w_down"].T

    def final_hidden(self, ids: np.ndarray, tap=None) -> np.ndarray:
        x = self.embedding[np.asarray(ids)]
        for li in range(len(self.layers)):
            x = self.layer_forward(li, x, tap)
        h = ref.rmsnorm(x, self.head_norm, self.config.rms_eps)
        if tap:
            tap(None, "head_in", h)
        return h

    def logits(self, ids: np.ndarray, tap=None) -> np.ndarray:
        return self.final_hidden(ids, tap) @ self.head.T

    def nll(self, ids_windows: list[np.ndarray]) -> tuple[float, int]:
        """Sum of negative log-likelihoods and the number of scored tokens."""
        total, count = 0.0, 0
        for w in ids_windows:
            z = self.logits(w[:-1]).astype(np.float64)
            z -= z.max(-1, keepdims=True)
            lse = np.log(np.exp(z).sum(-1))
            total += float((lse - z[np.arange(len(w) - 1), w[1:]]).sum())
            count += len(w) - 1
        return total, count

    def perplexity(self, ids, window: int = WINDOW) -> float:
        total, count = self.nll(windows(ids, window))
        return float(np.exp(total / max(count, 1)))

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """Greedy continuation of n tokens (full recompute per token: fine for short prompts)."""
        ids = list(prompt)
        for _ in range(n):
            ids.append(int(np.argmax(self.logits(np.asarray(ids))[-1])))
        return ids[len(prompt):]

    def agreement(self, prompt: list[int], target: list[int]) -> float:
        """Share of ``target`` (the source model's greedy continuation) that this model's argmax
        reproduces, teacher-forced on the target's own prefix."""
        seq = np.asarray(list(prompt) + list(target[:-1]))
        pred = np.argmax(self.logits(seq)[len(prompt) - 1:], -1)
        return float(np.mean(pred == np.asarray(target)))


def hessians(model: DenseModel, ids, window: int = WINDOW) -> tuple[list[dict], np.ndarray]:
    """Per layer {tap: X^T X (f64)} over the calibration tokens, and the head input's X^T X.
    Activations come from the unquantized (source) model, so every tensor's GPTQ is
    independent of the others' precision and any mixed plan can be assembled afterwards."""
    c = model.config
    per_layer = [dict() for _ in model.layers]
    head = np.zeros((c.hidden, c.hidden), np.float64)

    def tap(li, name, x):
        nonlocal head
        xtx = (x.T @ x).astype(np.float64)
        if li is None:
            head += xtx
        else:
            d = per_layer[li]
            d[name] = d.get(name, 0) + xtx

    for w in windows(ids, window):
        model.final_hidden(w, tap)
    return per_layer, head


# ------------------------------------------------------------------ names

TYPE_OF = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
           "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down"}
EMBEDDING = "token_embd"
LINEAR_TYPES = tuple(TYPE_OF.values())
SOURCE = "source"


def tensor_names(n_layers: int) -> list[str]:
    """Every quantizable tensor: 'blk.{i}.{type}' (GGUF's names) and the embedding/LM head."""
    return [f"blk.{i}.{t}" for i in range(n_layers) for t in LINEAR_TYPES] + [EMBEDDING]


def parse_choice(choice: str):
    """'gptq:s3g32' -> ('gptq', QuantSpec); 'source' -> None."""
    from kernels.quant import QuantSpec

    if choice == SOURCE:
        return None
    method, _, spec = choice.partition(":")
    return method, QuantSpec.parse(spec)


HEAD = "output"
