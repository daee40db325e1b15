"""Mixed precision: per-tensor formats chosen within a byte budget from measured sensitivity.

A tensor's cost under a format is estimated as alpha * proxy (tabshard/calibration.py's
``Calibrator.proxy``: its relative output error on the activations of text held out from the
Hessians), where alpha, per tensor type and probe format, converts proxy into measured loss:
quantize ONE type in every layer at the probe, keep the rest source, measure the increase in
NLL per token on the same held-out text (``Calibrator.sensitivity``). ``tabshard/precision.py`` then picks the
formats (a multiple-choice knapsack).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from tabshard.calibration import EMBEDDING, HEAD, LINEAR_TYPES, SOURCE, Calibrator, model_bytes, parse_choice

if TYPE_CHECKING:
    from protocol.model_types import ModelConfig, ModelWeights

def plan_bytes(cal: Calibrator, plan: dict) -> int:
    return model_bytes(cal.assemble(plan))


# Every format offered costs one GPTQ of every tensor. The 2-bit one is asymmetric a2g64 (2.5
# bpw, a min per 64): on the held-out domains mixed@3.0+rot+seq measured 2.28/2.07/2.04x source
# with it against 2.87/2.30/2.49x with symmetric s2g32 (benchmarks/quant_report_full.md). Then
# 3-bit at 3.25 and 3.5 bpw (a3g64 took mixed@4.0 from 1.30x to 1.23x source on licenses),
# 4-bit at 4.125 (s4g128: for 1536-wide ffn_down inputs; SmolLM2's 576-wide ones pad to 640,
# 4.58 bpw, and the planner sees those bytes), 4.25 and 4.5, and source (a rotated model's
# 8-bit stand-in).
MIXED_FORMATS = ("gptq:a2g64", "gptq:s3g64", "gptq:a3g64", "gptq:s4g64", "gptq:s4g128", "gptq:a4g64", SOURCE)
EMBEDDING_FORMATS = ("clip:s4g32", "clip:s4g64", SOURCE)


def uniform_plan(n_layers: int, linears: str, embedding: str = SOURCE) -> dict:
    plan = {f"blk.{i}.{t}": linears for i in range(n_layers) for t in LINEAR_TYPES}
    plan[EMBEDDING] = embedding
    return plan


# Costs are measured on the importance-weighted clip quantizer's twin of each GPTQ format: GPTQ
# fits the calibration domains so well that its error there says little about other text. On
# text held out from the Hessians but of the calibration domains, attn_output alone at 3 bits
# (s3g64, every layer) cost 0.0023 nats/token with GPTQ and 0.0436 with clip; on licenses, a
# domain calibration never saw, the GPTQ one costs 0.0503 (ffn_down: GPTQ 0.0711 at home, clip
# 0.2141, GPTQ on licenses 0.2411). Scored by its GPTQ twin, mixed@4.0 put every attn_output and
# attn_q at 3 bits and measured 1.33x source on licenses (benchmarks/quant_report_full.md).
PROBES = ("clip:s2g32", "clip:s3g64")
EMBEDDING_PROBE = "clip:s4g32"


def scored(choice: str) -> str:
    """The choice whose error stands for ``choice``'s in the cost model: a GPTQ format's clip twin."""
    method, _, spec = choice.partition(":")
    return f"clip:{spec}" if method == "gptq" else choice


def probes_for(formats) -> tuple:
    """The probes the offered formats' costs are read from (``Costs.alpha``: the probe nearest
    each format's width); a probe no format uses is a GPTQ pass and 8 forwards saved."""
    widths = [parse_choice(f)[1].bits for f in formats if f != SOURCE]
    bits = {p: parse_choice(p)[1].bits for p in PROBES}
    used = {min(PROBES, key=lambda p: (abs(bits[p] - b), bits[p])) for b in widths}
    return tuple(p for p in PROBES if p in used) or PROBES[-1:]


class Costs:
    """Estimated cost of a tensor's quantization (increase in mean NLL per token, nats):
    alpha[type, probe] * proxy(tensor, choice). Each alpha is measured once per tensor type and
    probe format: delta NLL with that type alone at the probe (everything else source), divided
    by the sum of the type's proxies there. A choice uses the probe nearest its bit width
    (2-bit choices the 2-bit probe, 3- and 4-bit ones the 3-bit probe): the proxy-to-loss ratio
    is not the same at 2 bits as at 3, and a 3-bit probe can be too small to see at all."""

    def __init__(self, measured: dict):
        self.measured = measured  # {type: {probe: (delta_nll, proxy_sum)}}

    @property
    def probes(self) -> tuple:
        return tuple(sorted({p for v in self.measured.values() for p in v} - {EMBEDDING_PROBE}))

    def alpha(self, t: str, choice: str) -> float:
        probes = self.measured.get(t, {})
        if not probes or choice == SOURCE:
            return 0.0
        bits = parse_choice(choice)[1].bits
        probe = min(probes, key=lambda p: (abs(parse_choice(p)[1].bits - bits), parse_choice(p)[1].bits))
        d, p = probes[probe]
        return max(d, 0.0) / p if p > 0 else 0.0

    def cost(self, cal: Calibrator, name: str, choice: str) -> float:
        t = EMBEDDING if name in (EMBEDDING, HEAD) else name.split(".")[2]
        return self.alpha(t, choice) * cal.proxy(name, scored(choice))

    def summary(self) -> dict:
        return {t: {p: round(d, 4) for p, (d, _) in v.items()} for t, v in self.measured.items()}


def estimated_costs(cal: Calibrator, sens_ids, probes=PROBES, embedding_probe: str = EMBEDDING_PROBE) -> Costs:
    """Measure every type's sensitivity at each probe on ``sens_ids`` (calibration-domain text
    held out from the Hessians), the proxies on the same text."""
    cal.score_on(sens_ids)
    measured: dict = {}
    for i, probe in enumerate(probes):
        types = LINEAR_TYPES + ((EMBEDDING,) if i == 0 else ())
        for t, v in cal.sensitivity(probe, sens_ids, types=types, embedding_probe=embedding_probe).items():
            measured.setdefault(t, {})[embedding_probe if t == EMBEDDING else probe] = v
    return Costs(measured)


def tensor_options(cal: Calibrator, costs: Costs, formats=MIXED_FORMATS, embedding_formats=EMBEDDING_FORMATS,
                   embedding_fixed: str | None = None) -> dict:
    """{tensor: [Option]} for tabshard.precision (embedding options too unless fixed)."""
    from tabshard.precision import Option

    opts = {}
    for name in cal.tensor_names():
        if name in (EMBEDDING, HEAD):
            choices = (embedding_fixed,) if embedding_fixed else embedding_formats
        else:
            choices = formats
        opts[name] = [Option(c, cal.quantized(name, c).nbytes, costs.cost(cal, name, c)) for c in choices]
    return opts


def fixed_bytes(w: ModelWeights) -> int:
    """Bytes no plan changes: the norm vectors, and an untied LM head (kept as loaded)."""
    untied = 0 if w.head.output is w.embedding else w.head.output.nbytes
    return sum(lw.attn_norm.nbytes + lw.ffn_norm.nbytes for lw in w.layers) + w.head.output_norm.nbytes + untied


def linear_weight_count(config: ModelConfig) -> int:
    c = config
    per = c.hidden * (c.n_heads * c.head_dim) * 2 + c.hidden * (c.n_kv_heads * c.head_dim) * 2 + 3 * c.hidden * c.ffn
    return per * c.n_layers


def mixed_plan(cal: Calibrator, costs: Costs, *, budget_bytes: int | None = None, bits_per_weight: float | None = None,
               embedding: str | None = None, formats=MIXED_FORMATS) -> dict:
    """The least-cost plan within a whole-model byte budget, or within bits_per_weight on the
    linear layers (then the embedding is ``embedding``, default source)."""
    from tabshard.precision import choose

    if (budget_bytes is None) == (bits_per_weight is None):
        raise ValueError("give exactly one of budget_bytes and bits_per_weight")
    if bits_per_weight is not None:
        opts = tensor_options(cal, costs, formats, embedding_fixed=embedding or SOURCE)
        fixed = {n: opts.pop(n)[0].choice for n in (EMBEDDING, HEAD) if n in opts}
        plan = choose(opts, int(bits_per_weight * linear_weight_count(cal.config) / 8))
        plan.update(fixed)
        return plan
    opts = tensor_options(cal, costs, formats, embedding_fixed=embedding)
    return choose(opts, budget_bytes, fixed_bytes(cal.source))
