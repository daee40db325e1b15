"""Quantized matvec throughput at SmolLM2-135M's shapes: wgpu (this host's adapter) vs numpy.

For each shape (n x k: n outputs, k inputs) and quant format, side by side:

* wgpu: qmatvec.wgsl (qmatmul.wgsl where the device's tuning picks it for --rows), ms per
  call and GB/s of quantized weights read (packed codes + scales);
* numpy f32: ``x @ W.T`` over weights dequantized once to f32, as NumpyBackend runs; this
  is the bound for a numpy path. GB/s counts the f32 bytes it reads;
* numpy deq+mv: dequantize the packed weights, then the same matvec, per call.

wgpu calls are recorded back to back into one compute pass (recording is not timed), then
submitted once and waited for, repeated until --min-time has passed.

``--model`` instead times whole decode steps of WgpuBackend and NumpyBackend on SmolLM2-135M's
shapes (30 layers of random a4g32 weights, s8g32 head): forward + head_topk(40) per step for
1, 8 and 32 sessions decoding together, everything included (recording, readbacks).

    python benchmarks/bench_kernels.py                     # default formats, 1 row
    python benchmarks/bench_kernels.py --formats all --rows 8 --limits webgpu-default
    python benchmarks/bench_kernels.py --model
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
os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="xdg-"))  # quiets Mesa

from kernels import runner as R  # noqa: E402

from kernels import launchers as KL  # noqa: E402
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


def wgpu_seconds(dev: R.Device, op: KL.QuantLinear, rows: int, y, min_time: float) -> float:
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


def bench_model(dev: R.Device, layers: int, batches: list[int]) -> None:
    from protocol.model_types import HeadWeights, LayerWeights, ModelConfig, SessionSlice
    from tab_worker.numpy_backend import NumpyBackend
    from tab_worker.wgpu_backend import WgpuBackend

    c = ModelConfig(n_layers=layers, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn=1536, vocab=49152,
                    rope_base=100000.0, rms_eps=1e-5, context=8192, eos_id=2)
    rng = np.random.default_rng(0)
    q4 = QuantSpec.parse("a4g32")
    ones = np.ones(c.hidden, np.float32)
    q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim

    def layer() -> LayerWeights:
        def w(n, k):
            return random_quant(rng, n, k, q4)
        return LayerWeights(ones, w(q_dim, c.hidden), w(kv_dim, c.hidden), w(kv_dim, c.hidden), w(c.hidden, q_dim),
                            ones, w(c.ffn, c.hidden), w(c.ffn, c.hidden), w(c.hidden, c.ffn))

    weights = {i: layer() for i in range(layers)}
    head = HeadWeights(ones, random_quant(rng, c.vocab, c.hidden, QuantSpec.parse("s8g32")))
    print(f"decode steps, SmolLM2-135M shapes, {layers} layers (a4g32) + head (s8g32); prefill of 16 tokens per session first")
    print(f"{'backend':>7} {'batch':>5} | {'forward ms':>10} {'head+top40 ms':>13} | {'tok/s':>8}")
    for name, make in [("wgpu", lambda: WgpuBackend(c, weights, head, 256, device=dev)),
                       ("numpy", lambda: NumpyBackend(c, weights, head, 256))]:
        backend = make()
        for batch in batches:
            ids = [f"{name}{batch}.{i}" for i in range(batch)]
            backend.forward([SessionSlice(s, 0, 16) for s in ids], (rng.standard_normal((16 * batch, c.hidden)) * 0.1).astype(np.float32))
            x = (rng.standard_normal((batch, c.hidden)) * 0.1).astype(np.float32)
            forward = head_s = 0.0
            steps = 5
            for step in range(steps + 1):  # the first step warms this batch size's pipelines
                t0 = time.perf_counter()
                h = backend.forward([SessionSlice(s, 16 + step, 1) for s in ids], x)
                t1 = time.perf_counter()
                backend.head_topk(h, 40)
                if step:
                    forward += t1 - t0
                    head_s += time.perf_counter() - t1
            forward, head_s = forward / steps, head_s / steps
            print(f"{name:>7} {batch:>5} | {forward * 1e3:10.2f} {head_s * 1e3:13.2f} | {batch / (forward + head_s):8.1f}", flush=True)
            for s in ids:
                backend.drop_session(s)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=",".join(DEFAULT_FORMATS), help="comma-separated quant specs, or 'all'")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="comma-separated NxK")
    ap.add_argument("--rows", type=int, default=1, help="batch rows per call (1 = decode of one session)")
    ap.add_argument("--limits", default="adapter", choices=["adapter", "webgpu-default"])
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds to time each cell for")
    ap.add_argument("--no-deq", action="store_true", help="skip the (slow) numpy dequantize-per-call column")
    ap.add_argument("--model", action="store_true", help="time whole decode steps of the two backends instead")
    ap.add_argument("--layers", type=int, default=30, help="layers for --model")
    ap.add_argument("--batches", default="1,8,32", help="sessions decoding together, for --model")
    args = ap.parse_args(argv)

    formats = ([QuantSpec(b, g, s).name for b in SUPPORTED_BITS for g in SUPPORTED_GROUPS for s in (False, True)]
               if args.formats == "all" else args.formats.split(","))
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    try:
        dev = R.Device(limits=args.limits)
    except R.NoAdapterError as exc:
        print(f"no wgpu adapter: {exc}")
        return 1
    tuning = KL.matmul_tuning(dev)
    kernel = "qmatvec" if args.rows <= tuning.matvec_max_rows else "qmatmul"
    print(f"wgpu adapter: {dev.describe()}  real GPU: {dev.is_real_gpu()}  limits: {args.limits}")
    if args.model:
        print(f"numpy {np.__version__}, {os.cpu_count()} CPUs\n")
        bench_model(dev, args.layers, [int(b) for b in args.batches.split(",")])
        return 0
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
            op = KL.QuantLinear(dev, KL.upload_quant(dev, w), xb, x_stride, yb, n, tuning=tuning)
            t_gpu = wgpu_seconds(dev, op, args.rows, yb, args.min_time)
            w_t = np.ascontiguousarray(dequantize(w).T)  # NumpyBackend's layout
            t_np = numpy_seconds(lambda: x @ w_t, args.min_time)
            t_deq = float("nan") if args.no_deq else numpy_seconds(lambda: x @ dequantize(w).T, 0.0)
            print(f"{n:>5}x{k:<5} {name:>6} {w.nbytes / 1e6:6.2f} | {t_gpu * 1e3:8.3f} {w.nbytes / t_gpu / 1e9:7.2f} | "
                  f"{t_np * 1e3:9.3f} {w_t.nbytes / t_np / 1e9:7.2f} | {t_deq * 1e3:12.2f} | {t_np / t_gpu:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
