"""Quantized matvec throughput at SmolLM2-135M's shapes: wgpu (this host's adapter) vs numpy.

For each shape (n x k: n outputs, k inputs) and quant format, side by side:

* wgpu: qmatvec.wgsl (qmatmul.wgsl where the device's tuning picks it for --rows), ms per
  call and GB/s of quantized weights read (packed codes + scales);
* numpy f32: ``x @ W.T`` over weights dequantized once to f32, as NumpyBackend runs; this
  is the bound for a numpy path. GB/s counts the f32 bytes it reads;
* numpy deq+mv: dequantize the packed weights, then the same matvec, per call.

wgpu calls are recorded back to back into one compute pass (recording is not timed), then
submitted once and waited for, repeated until --min-time has passed.

    python benchmarks/bench_kernels.py                     # default formats, 1 row
    python benchmarks/bench_kernels.py --formats all --rows 8 --limits webgpu-default
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="xdg-"))  # quiets Mesa (PLATFORM.md)

from kernels import runner as R  # noqa: E402
from kernels.quant import SUPPORTED_BITS, SUPPORTED_GROUPS, QuantSpec, QuantTensor, dequantize, scale_words_per_row, words_per_row  # noqa: E402

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # wo/wq, wk/wv, gate/up, down, head
DEFAULT_FORMATS = ["a4g32", "s8g32", "a3g64", "s4g128", "a2g64", "s3g32"]


def random_quant(rng, n: int, k: int, spec: QuantSpec) -> QuantTensor:
    """Random packed weights (any u32 word is a valid packing) with small finite f16 scales:
    the timing does not depend on the values, and this is much faster than quantizing."""
    qweight = rng.integers(0, 2**32, size=(n, words_per_row(k, spec)), dtype=np.uint32)
    halves = (rng.standard_normal((n, 2 * scale_words_per_row(k, spec))) * 0.01).astype(np.float16)
    scales = np.ascontiguousarray(halves.view(np.uint32))
    return QuantTensor(spec, n, k, qweight, scales)


def timed(fn, min_time: float) -> float:
    """Seconds per call of fn(reps) -> elapsed, doubling reps until min_time has passed."""
    reps = 1
    while True:
        elapsed = fn(reps)
        if elapsed >= min_time or reps >= 1 << 16:
            return elapsed / reps
        reps = max(reps * 2, int(reps * min_time / max(elapsed, 1e-6)))


def wgpu_seconds(dev: R.Device, op: R.QuantLinear, rows: int, y, min_time: float) -> float:
    def run(reps: int) -> float:
        enc = dev.encoder()
        cpass = enc.begin_compute_pass()
        for _ in range(reps):
            op.record(cpass, rows)
        cpass.end()
        commands = enc.finish()
        start = time.perf_counter()
        dev.queue.submit([commands])
        dev.read(y, count=1)  # waits for the queue
        return time.perf_counter() - start

    run(1)  # pipelines, first-use costs
    return timed(run, min_time)


def numpy_seconds(fn, min_time: float) -> float:
    def run(reps: int) -> float:
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return time.perf_counter() - start

    fn()
    return timed(run, min_time)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=",".join(DEFAULT_FORMATS), help="comma-separated quant specs, or 'all'")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="comma-separated NxK")
    ap.add_argument("--rows", type=int, default=1, help="batch rows per call (1 = decode of one session)")
    ap.add_argument("--limits", default="adapter", choices=["adapter", "webgpu-default"])
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds to time each cell for")
    ap.add_argument("--no-deq", action="store_true", help="skip the (slow) numpy dequantize-per-call column")
    args = ap.parse_args(argv)

    formats = ([QuantSpec(b, g, s).name for b in SUPPORTED_BITS for g in SUPPORTED_GROUPS for s in (False, True)]
               if args.formats == "all" else args.formats.split(","))
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    try:
        dev = R.Device(limits=args.limits)
    except R.NoAdapterError as exc:
        print(f"no wgpu adapter: {exc}")
        return 1
    tuning = R.matmul_tuning(dev)
    kernel = "qmatvec" if args.rows <= tuning.matvec_max_rows else "qmatmul"
    print(f"wgpu adapter: {dev.describe()}  real GPU: {dev.is_real_gpu()}  limits: {args.limits}")
    print(f"tuning: {tuning}  -> {kernel} for {args.rows} row(s)")
    print(f"numpy {np.__version__}, {os.cpu_count()} CPUs\n")
    header = (f"{'shape':>11} {'format':>6} {'MB':>6} | {'wgpu ms':>8} {'GB/s':>7} | "
              f"{'np f32 ms':>9} {'GB/s':>7} | {'np deq+mv ms':>12} | wgpu vs np f32")
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    for n, k in shapes:
        x = rng.standard_normal((args.rows, k)).astype(np.float32)
        x_stride = -(-k // 4) * 4
        xb = dev.upload(np.pad(x, ((0, 0), (0, x_stride - k))))
        yb = dev.buffer(args.rows * n * 4)
        for name in formats:
            spec = QuantSpec.parse(name)
            w = random_quant(rng, n, k, spec)
            op = R.QuantLinear(dev, R.upload_quant(dev, w), xb, x_stride, yb, n, tuning=tuning)
            t_gpu = wgpu_seconds(dev, op, args.rows, yb, args.min_time)
            w_t = np.ascontiguousarray(dequantize(w).T)  # NumpyBackend's layout
            t_np = numpy_seconds(lambda: x @ w_t, args.min_time)
            t_deq = float("nan") if args.no_deq else numpy_seconds(lambda: x @ dequantize(w).T, 0.0)
            print(f"{n:>5}x{k:<5} {name:>6} {w.nbytes / 1e6:6.2f} | {t_gpu * 1e3:8.3f} {w.nbytes / t_gpu / 1e9:7.2f} | "
                  f"{t_np * 1e3:9.3f} {w_t.nbytes / t_np / 1e9:7.2f} | {t_deq * 1e3:12.2f} | {t_np / t_gpu:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
