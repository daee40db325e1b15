"""GPTQ's damping and column order, chosen by measurement on text held out from the Hessians.

For a sample of SmolLM2's matrices (every type, a few layers), GPTQ runs with each damping
(fraction of mean(diag H) added to the diagonal) and with and without act-order (columns by
decreasing diag H); the score is each matrix's relative output error tr(dW H' dW^T) /
tr(W H' W^T) where H' comes from the *sensitivity* slice of the calibration domains (held
out from the Hessians GPTQ used), averaged over the sample as a geometric mean. The lowest wins,
and becomes kernels/quantizers.GPTQHessian.of's default.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_gptq_settings.py --cache artifacts/q22/cache
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", default="artifacts/q22/cache")
    p.add_argument("--model", default=None, help="source model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--texts", default=None, help="token ids saved by quant-report --save-texts")
    p.add_argument("--layers", default="4,15,26")
    p.add_argument("--formats", default="s3g64,s2g32")
    p.add_argument("--damps", default="0.001,0.01,0.1")
    p.add_argument("--rotate", type=int, default=None, help="study the rotated model (seed)")
    p.add_argument("--json", default="artifacts/q22/gptq_settings.json")
    a = p.parse_args(argv)

    from kernels.quant import QuantSpec
    from kernels.quantizers import GPTQHessian, gptq, output_error
    from tabshard import calibration as C
    from tabshard import calibration_text as T
    from model.loader import open_model
    from model.tokenizer import GGUFTokenizer

    C.limit_blas_threads(1)
    model = open_model(a.model)
    mixed = T.MixedText.load(a.texts) if a.texts else T.build(GGUFTokenizer(model), heldout=(), cache_dir=a.cache)
    cal = C.Calibrator(model.load_all(), mixed.calib_ids, cache_dir=a.cache, rotation=a.rotate)
    held, _ = C.hessians(cal.dense, mixed.sens_ids)
    layers = [int(x) for x in a.layers.split(",")]
    names = [f"blk.{i}.{t}" for i in layers for t in C.LINEAR_TYPES]
    results = []
    for fmt in a.formats.split(","):
        spec = QuantSpec.parse(fmt)
        for damp in [float(x) for x in a.damps.split(",")]:
            for act in (True, False):
                t0 = time.perf_counter()
                errs = []
                for n in names:
                    _, i, t = n.split(".")
                    attr = {v: k for k, v in C.TYPE_OF.items()}[t]
                    h = cal.hessians[int(i)][C.TAP_OF[attr]]
                    q = gptq(cal.source_dense(n), GPTQHessian.of(h, damp, act), spec)
                    errs.append(output_error(cal.source_dense(n), q, held[int(i)][C.TAP_OF[attr]]))
                g = math.exp(sum(math.log(e) for e in errs) / len(errs))
                results.append({"format": fmt, "damp": damp, "act_order": act, "geomean_rel_error": g,
                                "seconds": time.perf_counter() - t0})
                print(f"{fmt} damp {damp:<6} act_order {act!s:5}  held-out rel. output error {g:.5f}", flush=True)
    with open(a.json, "w") as f:
        json.dump({"tensors": names, "rotation": a.rotate, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
