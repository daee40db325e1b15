"""Where the single-row qmatvec's GPU time goes: the real kernel beside copies of it with one part
taken out, each timed over many weight matrices (distinct buffers: no L2 reuse), side by side
in one run. The ablated copies compute wrong results on purpose: they exist only to be timed.

    python benchmarks/bench_matvec_anatomy.py [--shapes llama-7b|smollm2] [--format s3g64]
        [--variants base,nodecode,noweights,noscale,nonorm,noreduce,nostage,pure] [--copies 32]
        [--json FILE] [--history PATH|none] [--append-json FILE]

Variants (the source of kernels/include/*.wgsl edited as text; each edit is checked to apply):

* base: the kernel as the device's tuning builds it (matmul_tuning(dev, real_gpu=True));
* nodecode: include/qmatvec_staged.wgsl's q4 returns the loaded words as floats (no unpacking);
* noweights: words_a makes its words from the address instead of loading them (no weight bytes);
* noscale: scale_min returns a constant (no scale loads or f16 unpacking);
* nonorm: qmatvec_norm's inverse_rms prologue sets 1 (no pass over x, no tree sum);
* noreduce: no tree sum of the TPR lanes before the store;
* nostage: the x chunk's values are made up instead of loaded (its barriers stay);
* pure: nodecode and noweights together (the loop's skeleton: x reads, dot FMAs, scales);
* wN: the base kernel at N threads a workgroup.

The weights' time at the measured copy rate is printed beside each shape: the gap between
it and base is what the kernel leaves on the table; the differences say which part costs it.
On an H200 (2026-12-02) taking every weight load out saved 4-15 % of the time and taking the
3-bit unpacking out ~45 %: those kernels are bound by instructions, not by memory.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="xdg-"))  # Mesa complains at every start without one
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from device_measures import copy_gbps, gpu_bound_ms, warm_up  # noqa: E402
from kernels import launchers as KL  # noqa: E402
from kernels import runner as R  # noqa: E402
from kernels.quant import QuantSpec  # noqa: E402
from model.synthetic import random_matrix  # noqa: E402

# (n, k, prologue) of a layer's matvecs
SHAPES = {
    "llama-7b": {"qkv_norm": (12288, 4096, "norm"), "wo": (4096, 4096, None), "down_silu": (4096, 11008, "silu"),
                 "gate_up_norm": (22016, 4096, "norm")},
    "smollm2": {"qkv_norm": (960, 576, "norm"), "wo": (576, 576, None), "down_silu": (576, 1536, "silu"),
                "gate_up_norm": (3072, 576, "norm")},
}

# variant -> [(pattern, replacement)]: each must match the kernel source it applies to
EDITS = {
    "nodecode": [(r"(fn q4\(wa: vec4<u32>, wb: vec4<u32>, j0: u32\) -> vec4<f32> \{)",
                  r"\1\n  return bitcast<vec4<f32>>((wa ^ vec4<u32>(j0)) & vec4<u32>(0x3F7FFFFFu));")],
    "noweights": [(re.escape("var wa = vec4<u32>(qweight[wbase], qweight[wbase + 1u], 0u, 0u);"),
                   "var wa = vec4<u32>(wbase, wbase * 3u, 0u, 0u); if (wbase == 0xFFFFFFFFu) { wa.x = qweight[0]; }"),
                  (re.escape("wa.z = qweight[wbase + 2u];"), "wa.z = wbase * 5u;"),
                  (re.escape("wa.w = qweight[wbase + 3u];"), "wa.w = wbase * 7u;")],
    "noscale": [(re.escape("fn scale_min(n: u32, g: u32, groups: u32) -> vec2<f32> {"),
                 "fn scale_min(n: u32, g: u32, groups: u32) -> vec2<f32> {\n  if (n != 0xFFFFFFFFu) { return vec2<f32>(f32(g), 0.5); }")],
    "nonorm": [(re.escape("fn inverse_rms(t: u32, m0: u32) {"),
                "fn inverse_rms(t: u32, m0: u32) {\n  if (t == 0u) { inv_rms[0] = vec4<f32>(1.0); inv_rms[1] = vec4<f32>(1.0); }\n"
                "  workgroupBarrier();\n}\nfn inverse_rms_unused(t: u32, m0: u32) {")],
    "noreduce": [(re.escape("sum_partials(t, lane, TPR);"), "workgroupBarrier();")],
    "nostage": [(re.escape("xv = load_x(start + u, (u % 8u) * 4u, select(min(32u, p.k - b * 32u), 32u, EXACT), u);"),
                 "xv = vec4<f32>(f32(u) + f32(start));")],
}
EDITS["pure"] = EDITS["nodecode"] + EDITS["noweights"]


def ablated(source: str, variant: str, kernel: str) -> str:
    """``source`` with the variant's edits; an edit that matches nothing is an error (the kernel
    changed under this benchmark), except nonorm outside qmatvec_norm and the 4-bit-only word."""
    for pattern, repl in EDITS.get(variant, []):
        new, count = re.subn(pattern, repl, source)
        optional = (variant == "nonorm" and kernel != "qmatvec_norm") or "wa.w" in pattern
        if not count and not optional:
            raise SystemExit(f"{variant}: {pattern!r} no longer matches {kernel}.wgsl: update bench_matvec_anatomy.py")
        source = new
    return source


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="llama-7b", choices=sorted(SHAPES))
    ap.add_argument("--format", default="s3g64", help="packed format, e.g. s3g64, a4g32")
    ap.add_argument("--variants", default="base,nodecode,noweights,noscale,nonorm,noreduce,nostage,pure")
    ap.add_argument("--copies", type=int, default=32, help="weight matrices per shape (distinct buffers)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds over the variants")
    ap.add_argument("--json", default="")
    ap.add_argument("--history", default="", help="benchmark history database (default: the repository's; 'none': skip)")
    ap.add_argument("--append-json", default="", help="append a --json file of another machine's run, then exit")
    a = ap.parse_args(argv)
    if a.append_json:
        append_history(json.loads(Path(a.append_json).read_text()), a.history)
        return 0
    spec = QuantSpec.parse(a.format)
    variants = a.variants.split(",")
    for v in variants:
        if v not in EDITS and v != "base" and not re.fullmatch(r"w\d+", v):
            raise SystemExit(f"unknown variant {v!r}: base, {', '.join(EDITS)} or wN")
    dev = R.Device()
    tuning = KL.matmul_tuning(dev, real_gpu=True)
    print(f"device: {dev.describe()} (real GPU: {dev.is_real_gpu()})", flush=True)
    warm_up(dev, 1.0)
    copy = copy_gbps(dev, min(1 << 30, dev.max_binding) // 16 * 16)["shader"]
    print(f"copy bandwidth (vec4 shader, read + write): {copy:.0f} GB/s", flush=True)
    original = R.Device.source
    from tabshard.bench_history import machine

    results = {"device": dev.describe(), "machine": {**machine(adapter=False), "adapter": dev.describe()},
               "format": a.format, "shapes": a.shapes, "copy_gbps": copy, "us": {}}
    rng = np.random.default_rng(1)
    for name, (n, k, prologue) in SHAPES[a.shapes].items():
        width = 2 * k if prologue == "silu" else k
        x = dev.upload((rng.standard_normal((1, width)) * 0.1).astype(np.float32))
        y = dev.buffer(4 * n)
        norm_weight = dev.upload(np.ones(k, np.float32))
        extra = {"norm": (norm_weight, 1e-5)} if prologue == "norm" else {"silu_up_col": k} if prologue == "silu" else {}
        ops = [KL.QuantLinear(dev, KL.upload_quant(dev, random_matrix(n, k, [c, n, k], spec)), x, width, y, n,
                              tuning=tuning, **extra) for c in range(a.copies)]
        weight_bytes = ops[0].w.nbytes
        times: dict[str, list[float]] = {}
        for _ in range(a.rounds):
            for v in variants:
                dev._pipelines.clear()
                dev._modules.clear()
                dev.source = lambda kernel, v=v: ablated(original(dev, kernel), v, kernel)
                for op in ops:
                    op._launches.clear()
                    op.wg = int(v[1:]) if v.startswith("w") else tuning.matvec_wg
                ms = gpu_bound_ms(dev, dev.plan(ops, 1), reps=10, warm_s=0.3)
                times.setdefault(v, []).append(ms * 1000 / a.copies)
        floor = weight_bytes / (copy * 1e3)  # us to read the weights once at the copy rate (bench_device's yardstick)
        results["us"][name] = {"n": n, "k": k, "weight_bytes": weight_bytes, "floor_us": floor, **times}
        print(f"{name} {n}x{k} ({weight_bytes / 1e6:.1f} MB, {floor:.1f} us at the copy rate): "
              + " | ".join(f"{v} {' / '.join(f'{t:.1f}' for t in times[v])}" for v in variants) + " us", flush=True)
    dev.source = lambda kernel: original(dev, kernel)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    if a.history != "none":
        append_history(results, a.history)
    return 0


def append_history(results: dict, path: str) -> None:
    from tabshard.bench_history import DEFAULT_DB, Figure, append_figures

    figures = [Figure.of(f"anatomy.{results['shapes']}.{results['format']}.{name}.{v}_us", ts, "us", "lower")
               for name, row in results["us"].items() for v, ts in row.items() if isinstance(ts, list)]
    append_figures(figures, "bench_matvec_anatomy", db=path or DEFAULT_DB, measured_on=results["machine"])


if __name__ == "__main__":
    sys.exit(main())
