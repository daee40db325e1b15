"""Decode speed of rotated quantized SmolLM2s beside the unrotated one, same format, same run.

Three rotated models: ``rotated`` (the residual rotation, folded into the weights: the very same
kernels on matrices of the same shapes and formats; the head untied, one more matrix in memory,
the same matvec per token), ``had`` (each FFN's hidden space rotated: a block Walsh-Hadamard
transform of the activation before ffn_down at run time, kernels/silu_hadamard.wgsl on wgpu and
pk_hadamard on the CPU backend, and on wgpu the SiLU gate no longer fused into ffn_down's
matvec) and ``rotated+had`` (both). This measures what they cost, rather than asserting it: on
each backend (numpy = the CPU backend, wgpu) the models decode in lockstep, one token each in
turn, and each figure is the median over all token pairs of the ratio rotated/unrotated speed
(with each model's median decode tokens/s), appended to the benchmark history
(tabshard/bench_history.py).

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_rotation_speed.py [--backends numpy,wgpu] \\
        [--format s3g64] [--tokens 24] [--rounds 5]

Weights are round-to-nearest in ``--format`` (codes don't change speed; RTN takes seconds where
GPTQ takes minutes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(fmt: str, seed: int | None, ffn_seed: int | None = None):
    from kernels.quant import QuantSpec, quantize_rtn
    from protocol.model_types import ModelWeights
    from tabshard.calibration import DenseModel
    from model.loader import open_model
    from tabshard.rotation import rotate_dense, rotate_ffn

    src = open_model(None).load_all()
    dense = DenseModel(src)
    if seed is not None:
        dense = rotate_dense(dense, seed)
    if ffn_seed is not None:
        dense = rotate_ffn(dense, ffn_seed)
    spec = QuantSpec.parse(fmt)
    layers = [replace(lw, attn_norm=L.attn_norm, ffn_norm=L.ffn_norm,
                      **{a: quantize_rtn(L.mats[a], spec) for a in lw.MATRICES})
              for lw, L in zip(src.layers, dense.layers)]
    emb8 = QuantSpec(8, 32, True)
    emb = quantize_rtn(dense.embedding, emb8)
    head = emb if seed is None else quantize_rtn(dense.head, emb8)
    return ModelWeights(config=dense.config, embedding=emb, layers=layers,
                        head=replace(src.head, output=head, output_norm=dense.head_norm))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="numpy,wgpu")
    p.add_argument("--format", default="s3g64")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=22)
    p.add_argument("--no-history", action="store_true")
    a = p.parse_args(argv)

    from tab_worker.generate import LocalGenerator
    from model.sampling import SamplingParams

    models = {"unrotated": build(a.format, None), "rotated": build(a.format, a.seed), "had": build(a.format, None, a.seed),
              "rotated+had": build(a.format, a.seed, a.seed)}
    prompt = list(range(100, 140))
    out: dict = {"format": a.format, "tokens": a.tokens, "rounds": a.rounds}
    figures = []
    rotated = [k for k in models if k != "unrotated"]
    for backend in a.backends.split(","):
        gens = {k: LocalGenerator(w, backend=backend) for k, w in models.items()}
        speed: dict = {k: [] for k in gens}
        step_ratios: dict = {k: [] for k in rotated}
        for r in range(a.rounds + 1):  # round 0 warms (pipelines, caches) and is dropped
            # the models step in lockstep, one token each in turn (order reversed every round):
            # on a host whose speed swings by 2x within a minute, per-token pairs are the only
            # comparison that drift does not decide
            its = {k: gens[k].generate(prompt, a.tokens, SamplingParams(greedy=True), stop_at_eos=False) for k in gens}
            order = list(gens) if r % 2 else list(reversed(gens))
            times: dict = {k: [] for k in gens}
            for _ in range(a.tokens):
                for k in order:
                    t0 = time.perf_counter()
                    next(its[k])
                    times[k].append(time.perf_counter() - t0)
            for k in gens:
                its[k].close()
            if r:
                for k in gens:  # the first step is the prompt's prefill
                    speed[k].append(1.0 / statistics.median(times[k][1:]))
                for k in rotated:  # rotated speed / unrotated speed = unrotated time / rotated time
                    step_ratios[k] += [u / v for u, v in zip(times["unrotated"][1:], times[k][1:])]
        row = {k: round(statistics.median(v), 3) for k, v in speed.items()}
        for k in rotated:
            row[f"ratio_{k}_over_unrotated"] = round(statistics.median(step_ratios[k]), 4)
        out[backend] = row
        print(f"{backend}: decode tok/s " + ", ".join(f"{k} {row[k]:.2f}" for k in gens) + "; ratio over unrotated "
              + ", ".join(f"{k} {row[f'ratio_{k}_over_unrotated']:.3f}" for k in rotated), flush=True)
        from tabshard.bench_history import Figure

        for k in rotated:
            name = "decode_ratio" if k == "rotated" else f"{k.replace('+', '_')}_decode_ratio"
            figures.append(Figure.of(f"rotation.{backend}.{a.format}.{name}", step_ratios[k], "x", "higher"))
        for k in speed:
            figures.append(Figure.of(f"rotation.{backend}.{a.format}.{k.replace('+', '_')}_tok_s", speed[k], "tok/s", "higher"))
    if not a.no_history:
        from tabshard.bench_history import append_figures

        append_figures(figures, suite="bench_rotation_speed", adapter="wgpu" in a.backends)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
