"""GPTQ's damping and scale refit, chosen by measurement across domains.

For a sample of SmolLM2's matrices (every type, a few layers), GPTQ runs with each damping
(fraction of mean(diag H) added to the diagonal), with and without act-order (``--act-order
on,off``), with and without the scale refit
(kernels/quantizers.gptq_refined), with and without the source's block grids as candidates
(quantizers.source_grid), and the importance-weighted clip search alone as the floor.
Leave one calibration domain out: the Hessians GPTQ uses come from two of the three calibration
domains, the score is each matrix's relative output error tr(dW H' dW^T) / tr(W H' W^T) with H'
from the third, each domain held out in turn; the geometric mean over matrices and folds is
the figure. What wins is what carries to text the Hessians never saw, without touching the
held-out evaluation domains; it becomes kernels/quantizers.DAMP_BY_BITS.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_gptq_settings.py --formats a4g64 \\
        --texts artifacts/q22/dev2/texts.json
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np


def geomean(xs) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", default="artifacts/q22/cache")
    p.add_argument("--model", default=None, help="source model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--texts", default=None, help="token ids saved by quant-report --save-texts")
    p.add_argument("--layers", default="4,15,26")
    p.add_argument("--formats", default="a4g64")
    p.add_argument("--damps", default="0.01,0.1,0.3,1.0")
    p.add_argument("--how", default="plain,refit,refit+grid", help="GPTQ variants: plain, refit, refit+grid")
    p.add_argument("--act-order", default="on", help="on, off or on,off: GPTQ's column order by diag H")
    p.add_argument("--no-clip", action="store_true", help="leave out the clip-search floor")
    p.add_argument("--json", default="artifacts/q22/gptq_settings.json")
    a = p.parse_args(argv)

    from kernels import quantizers as Q
    from kernels.quant import QuantSpec
    from tabshard import calibration as C
    from tabshard import calibration_text as T
    from tabshard.models import open_model
    from model.tokenizer import GGUFTokenizer

    C.limit_blas_threads(1)
    model = open_model(a.model)
    mixed = T.MixedText.load(a.texts) if a.texts else T.build(GGUFTokenizer(model), heldout=(), cache_dir=a.cache)
    weights = model.load_all()
    dense = C.DenseModel(weights)
    domains = list(mixed.calib)
    hess = {d: C.hessians(dense, mixed.calib[d])[0] for d in domains}
    layers = [int(x) for x in a.layers.split(",")]
    attr_of = {v: k for k, v in C.TYPE_OF.items()}
    orders = {"on": "", "off": " no-act-order"}
    variants = ([] if a.no_clip else ["clip", "clip+grid"]) + \
        [f"damp {d} {r}{orders[o]}" for o in a.act_order.split(",") for d in a.damps.split(",") for r in a.how.split(",")]
    results = []
    for fmt in a.formats.split(","):
        spec = QuantSpec.parse(fmt)
        errs = {v: [] for v in variants}
        t0 = time.perf_counter()
        for held in domains:
            train = [d for d in domains if d != held]
            for i in layers:
                for t in C.LINEAR_TYPES:
                    tap = C.TAP_OF[attr_of[t]]
                    w = dense.layers[i].mats[attr_of[t]]
                    grid = Q.source_grid(getattr(weights.layers[i], attr_of[t]), spec)
                    h_train = sum(hess[d][i][tap] for d in train)
                    h_held = hess[held][i][tap]
                    for v in variants:
                        if v.startswith("clip"):
                            q = Q.quantize_clip(w, spec, np.diag(h_train), extra=grid if v.endswith("grid") else ())
                        else:
                            _, damp, how, *no_act = v.split()
                            hs = Q.GPTQHessian.of(h_train, float(damp), act_order=not no_act)
                            if how == "plain":
                                q = Q.gptq(w, hs, spec)
                            else:
                                q = Q.gptq_refined(w, hs, spec, extra=grid if how.endswith("grid") else ())
                        errs[v].append(Q.output_error(w, q, h_held))
        for v in variants:
            g = geomean(errs[v])
            results.append({"format": fmt, "variant": v, "geomean_rel_error": g, "folds": domains})
            print(f"{fmt} {v:32s} cross-domain rel. output error {g:.5f}", flush=True)
        print(f"{fmt}: {time.perf_counter() - t0:.0f}s", flush=True)
    with open(a.json, "w") as f:
        json.dump({"layers": layers, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
