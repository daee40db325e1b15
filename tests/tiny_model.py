"""A tiny Llama-shaped model with deterministic random weights, for protocol tests that must
run in milliseconds. (Real-model behaviour is covered against SmolLM2 elsewhere.)"""
import numpy as np

from kernels.quant import QuantSpec, quantize_rtn
from model.synthetic import random_layer
from protocol.model_types import HeadWeights, ModelConfig, ModelWeights

TINY = ModelConfig(n_layers=6, hidden=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn=96, vocab=300,
                   rope_base=10000.0, rms_eps=1e-5, context=256, eos_id=2, bos_id=1)


def tiny_weights(config: ModelConfig = TINY, seed: int = 0) -> ModelWeights:
    rng = np.random.default_rng(seed)
    emb = quantize_rtn(rng.standard_normal((config.vocab, config.hidden)).astype(np.float32), QuantSpec(8, 32, True))
    layers = [random_layer(config, i, seed=seed) for i in range(config.n_layers)]
    for lw in layers:
        lw.attn_norm = (1 + 0.1 * rng.standard_normal(config.hidden)).astype(np.float32)
        lw.ffn_norm = (1 + 0.1 * rng.standard_normal(config.hidden)).astype(np.float32)
    # an untied head: tied to this random embedding the model would repeat one token forever,
    # and exactness tests need a sequence that varies
    out = quantize_rtn(rng.standard_normal((config.vocab, config.hidden)).astype(np.float32), QuantSpec(8, 32, True))
    head = HeadWeights(output_norm=np.ones(config.hidden, np.float32), output=out)
    return ModelWeights(config=config, embedding=emb, layers=layers, head=head)


def greedy_tokens(weights: ModelWeights, prompt: list[int], n: int, max_ctx: int = 256) -> list[int]:
    """What one process computing alone produces: the reference a sharded run must equal."""
    from tab_worker.generate import LocalGenerator

    return list(LocalGenerator(weights, backend="numpy", max_ctx=max_ctx).generate(prompt, n, stop_at_eos=False))
