"""Which FFN rotation: block-diagonal Walsh-Hadamard of the largest power-of-two factor, or a
Kronecker product with a small orthogonal factor across the blocks (issue 22)?

SmolLM2's FFN dim 1536 = 3 x 512. The runtime transform before ffn_down is either
``D blockdiag(H_512)`` (three independent 512-point transforms: tabshard/rotation.rotate_ffn) or
``D (Q_3 kron H_512)`` (the same plus a 3 x 3 random orthogonal mix across the blocks). Both are
orthogonal, so the network computes the same function; what differs is how well ffn_down
quantizes. For ffn_down of a few layers and each format: GPTQ (the quantizer the report uses,
with its damping) on the calibration Hessian, error measured on the activations of the
sensitivity slice (calibration-domain text held out from the Hessians: no evaluation domain is
involved), relative output error tr(dW H dW^T) / tr(W H W^T), geomean over the layers; and the
weights' incoherence max|W| / rms(W) (lower: no outlier columns).

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ffn_rotation_choice.py \\
        --texts artifacts/q22/dev2/texts.json --cache artifacts/q22/cache [--layers 4,15,26] [--formats a2g64,s3g64,a4g64]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    import numpy as np

    from kernels import quantizers as Q
    from kernels.quant import QuantSpec
    from kernels.reference import hadamard
    from tabshard import calibration as C
    from tabshard.calibration_text import MixedText
    from tabshard.models import open_model
    from tabshard.rotation import ffn_block, ffn_signs

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--texts", required=True)
    p.add_argument("--cache")
    p.add_argument("--layers", default="4,15,26")
    p.add_argument("--formats", default="a2g64,s3g64,a4g64")
    p.add_argument("--seed", type=int, default=22)
    p.add_argument("--no-history", action="store_true")
    a = p.parse_args(argv)
    C.limit_blas_threads(1)
    texts = MixedText.load(a.texts)
    weights = open_model(None).load_all()
    cal = C.Calibrator(weights, texts.calib_ids, cache_dir=a.cache)
    layers = [int(x) for x in a.layers.split(",")]
    sens, _ = C.hessians(cal.dense, texts.sens_ids)
    ffn = cal.config.ffn
    block = ffn_block(ffn)
    signs = ffn_signs(cal.config.n_layers, ffn, a.seed)
    rest = ffn // block
    rng = np.random.default_rng(a.seed)
    q, r = np.linalg.qr(rng.standard_normal((rest, rest)))
    q_small = q * np.sign(np.diag(r))
    eye = np.eye(ffn, dtype=np.float32)
    out: dict = {"block": block, "layers": layers, "variants": {}}
    for variant in ("none", "block", "kron"):
        errs: dict = {f: [] for f in a.formats.split(",")}
        mu = []
        for li in layers:
            w = cal.dense.layers[li].mats["w_down"].astype(np.float64)
            if variant == "none":
                rot = np.eye(ffn)
            else:
                rot = signs[li][:, None] * hadamard(eye, block).astype(np.float64)  # D blockdiag(H)
                if variant == "kron":
                    rot = signs[li][:, None] * np.kron(q_small, hadamard(np.eye(block, dtype=np.float32), block).astype(np.float64))
            wr = (w @ rot).astype(np.float32)
            hc = rot.T @ cal.hessians[li]["down_in"] @ rot
            hs = rot.T @ sens[li]["down_in"] @ rot
            mu.append(float(np.abs(wr).max() / np.sqrt(np.mean(wr.astype(np.float64) ** 2))))
            for f in errs:
                spec = QuantSpec.parse(f)
                t0 = time.perf_counter()
                t = Q.gptq_refined(wr, cal.prepare(hc, spec.bits), spec)
                errs[f].append(Q.output_error(wr, t, hs))
                print(f"{variant:5s} layer {li:2d} {f}: error {errs[f][-1]:.5f} ({time.perf_counter() - t0:.1f}s)", flush=True)
        row = {f: round(math.exp(np.mean(np.log(v))), 6) for f, v in errs.items()}
        row["incoherence"] = round(float(np.mean(mu)), 3)
        out["variants"][variant] = row
        print(f"{variant}: {row}", flush=True)
    if not a.no_history:
        from tabshard.bench_history import Figure, append_figures

        figures = [Figure.of(f"ffn_rotation_choice.{v}.{f}.down_error", [x], "rel", "lower")
                   for v, row in out["variants"].items() for f, x in row.items() if f != "incoherence"]
        append_figures(figures, suite="bench_ffn_rotation_choice")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
