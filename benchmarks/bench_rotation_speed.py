"""Decode speed of a rotated quantized SmolLM2 beside the unrotated one, same format, same run.

The rotation is folded into the weights (tabshard/rotation.py), so both models run the very
same kernels on matrices of the same shapes and formats; the only structural difference is the
head, untied in the rotated model (one more matrix in memory, the same matvec per token). This
measures that it costs nothing, rather than asserting it: on each backend (numpy = the CPU
backend, wgpu) the two models decode in lockstep, one token each in turn, and the figure is the
median over all token pairs of the ratio rotated/unrotated speed (with each model's median
decode tokens/s), appended to the benchmark history (tabshard/bench_history.py).

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


def build(fmt: str, seed: int | None):
    from kernels.quant import QuantSpec, quantize_rtn
    from protocol.model_types import ModelWeights
    from tabshard.calibration import DenseModel
    from model.loader import open_model
    from tabshard.rotation import rotate_dense

    src = open_model(None).load_all()
    dense = DenseModel(src)
    if seed is not None:
        dense = rotate_dense(dense, seed)
    spec = QuantSpec.parse(fmt)
    layers = [replace(lw, attn_norm=L.attn_norm, ffn_norm=L.ffn_norm,
                      **{a: quantize_rtn(L.mats[a], spec) for a in lw.MATRICES})
              for lw, L in zip(src.layers, dense.layers)]
    emb8 = QuantSpec(8, 32, True)
    emb = quantize_rtn(dense.embedding, emb8)
    head = emb if seed is None else quantize_rtn(dense.head, emb8)
    return ModelWeights(config=src.config, embedding=emb, layers=layers,
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

    models = {"unrotated": build(a.format, None), "rotated": build(a.format, a.seed)}
    prompt = list(range(100, 140))
    out: dict = {"format": a.format, "tokens": a.tokens, "rounds": a.rounds}
    figures = []
    for backend in a.backends.split(","):
        gens = {k: LocalGenerator(w, backend=backend) for k, w in models.items()}
        speed: dict = {k: [] for k in gens}
        step_ratios: list = []
        for r in range(a.rounds + 1):  # round 0 warms (pipelines, caches) and is dropped
            # the two models step in lockstep, one token each in turn (order swapped every
            # round): on a host whose speed swings by 2x within a minute, per-token pairs are
            # the only comparison that drift does not decide
            its = {k: gens[k].generate(prompt, a.tokens, SamplingParams(greedy=True), stop_at_eos=False) for k in gens}
            order = ("unrotated", "rotated") if r % 2 else ("rotated", "unrotated")
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
                step_ratios += [u / v for u, v in zip(times["unrotated"][1:], times["rotated"][1:])]
        ratios = step_ratios  # rotated speed / unrotated speed = unrotated time / rotated time, per token pair
        row = {k: round(statistics.median(v), 3) for k, v in speed.items()}
        row["ratio_rotated_over_unrotated"] = round(statistics.median(ratios), 4)
        row["ratios"] = [round(x, 3) for x in sorted(ratios)[:: max(1, len(ratios) // 8)]]
        out[backend] = row
        print(f"{backend}: decode tok/s unrotated {row['unrotated']:.2f}, rotated {row['rotated']:.2f}, "
              f"ratio {row['ratio_rotated_over_unrotated']:.3f} (rounds {row['ratios']})", flush=True)
        from tabshard.bench_history import Figure

        figures.append(Figure.of(f"rotation.{backend}.{a.format}.decode_ratio", ratios, "x", "higher"))
        for k in speed:
            figures.append(Figure.of(f"rotation.{backend}.{a.format}.{k}_tok_s", speed[k], "tok/s", "higher"))
    if not a.no_history:
        from tabshard.bench_history import DEFAULT_DB, History, machine

        h = History(DEFAULT_DB)
        try:
            run = h.start_run(machine(adapter="wgpu" in a.backends), suite="bench_rotation_speed")
            for f in figures:
                print(h.add(run, f).describe())
        finally:
            h.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
