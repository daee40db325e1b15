"""The device's own measures for bench_device.py: a --variants name's kernel tuning, the copy
bandwidth a roofline is judged against, a warm-up, and a plan's GPU-bound time."""
from __future__ import annotations

import time

import numpy as np


def variant_tuning(dev, variant: str):
    """(MatmulTuning, backend options) of a --variants name."""
    import dataclasses
    import re


    from kernels import launchers as KL

    base = KL.matmul_tuning(dev)
    if variant.endswith("-nosg"):  # any variant with its matvecs' lanes summed in workgroup memory, not by subgroup shuffles
        tuning, options = variant_tuning(dev, variant[: -len("-nosg")])
        return dataclasses.replace(tuning, matvec_subgroup=0), options
    m = re.fullmatch(r"(.+)-kv(\d+)", variant)
    if m:  # any variant (wgpu-kvN: the default) with split-K attention in this many key runs a row (1:
        # unsplit), whatever the pools' length
        tuning, options = variant_tuning(dev, m.group(1))
        return tuning, {**options, "kv_splits": int(m.group(2))}
    m = re.fullmatch(r"(.+)-aw(\d+)", variant)
    if m:  # any variant with attention in workgroups of N threads (keys scored a chunk), whatever the
        # layer program's rule
        tuning, options = variant_tuning(dev, m.group(1))
        wg = {"WG": dev.workgroup_size(int(m.group(2)))}
        return tuning, {**options, "kernel_constants": {"attention": wg, "attention_rope": wg}}
    if variant.endswith("-planes3"):  # any variant with 3-bit codes uploaded as the blobs' bit planes (not repacked)
        tuning, options = variant_tuning(dev, variant[: -len("-planes3")])
        return tuning, {**options, "contiguous3": False}
    if variant == "wgpu":
        return base, {}
    if variant == "wgpu-unfused":
        return base, {"fuse_decode": False}
    if variant == "wgpu-blockwait":  # readbacks wait blocking in the driver (bench_device sets runner.SPIN_WAIT off)
        return base, {}
    if variant == "wgpu-mapwait":  # readbacks left to map_sync (bench_device sets runner.SPIN_WAIT and WAIT_IN_CALLER off)
        return base, {}
    if variant == "wgpu-noahead":  # no command buffer recorded ahead (bench_device sets runner.ENCODE_AHEAD off)
        return base, {}
    if variant == "wgpu-f16":  # the matvecs on their _f16 kernels (the device needs shader-f16)
        return base, {"compute_dtype": "f16"}
    m = re.fullmatch(r"wgpu-i8(?:w(\d+))?(?:g(\d+))?(?:o(\d))?(?:t(\d+))?(?:k(\d+))?", variant)
    if m:  # the matvecs on their _i8 kernels (int8 inputs, integer dot products), in workgroups of
        # W threads, at most G workgroups a batch row where whole rows fit one chunk, O outputs a
        # thread for rows of at least K inputs, at most T threads an output at one row
        fields = ("matvec_i8_wg", "matvec_i8_max_groups", "matvec_i8_opt", "matvec_i8_max_tpr",
                  "matvec_i8_opt_min_k")  # the letters' order in the name
        i8 = {f: int(v) for f, v in zip(fields, m.groups()) if v}
        if "matvec_i8_wg" in i8:
            i8["matvec_i8_wg"] = dev.workgroup_size(i8["matvec_i8_wg"])
        return dataclasses.replace(base, **i8), {"compute_dtype": "i8"}
    if variant == "wgpu-attn1":  # attention's parts walk one key a step (KEYS_AT_ONCE = 1, the walk before four)
        return base, {"kernel_constants": {k: {"KEYS_AT_ONCE": 1} for k in ("attention", "attention_rope")}}
    m = re.fullmatch(r"wgpu-attnw(\d+)", variant)
    if m:  # the older name of wgpu-awN: attention in workgroups of N threads (keys scored a chunk)
        return variant_tuning(dev, f"wgpu-aw{m.group(1)}")
    if variant == "wgpu-lanes":  # without staging x (the lanes loop at every row count)
        return dataclasses.replace(base, matvec_stage=0), {}
    if variant == "wgpu-notall":  # batches of tall matrices on the lanes loop (no matvec_tall_batch_wg)
        return dataclasses.replace(base, matvec_tall_batch_wg=0), {}
    if variant == "wgpu-stage1":  # x staged for one row only, batches on the lanes loop
        return dataclasses.replace(base, matvec_stage_rows_min_k=1 << 30), {}
    m = re.fullmatch(r"wgpu-stage-all(?:w(\d+))?", variant)
    if m:  # x staged for batches of any k too (in workgroups of N threads)
        wg = {"matvec_wg": dev.workgroup_size(int(m.group(1)))} if m.group(1) else {}
        return dataclasses.replace(base, matvec_stage_rows_min_k=0, **wg), {}
    m = re.fullmatch(r"wgpu-x(\d+)", variant)
    if m:  # the default with this many vec4s of each row staged a chunk (at most what the limits hold)
        return dataclasses.replace(base, matvec_stage=int(m.group(1))), {}
    if variant == "wgpu-blocks":
        return dataclasses.replace(base, matvec_span=8, matvec_opt=1), {}
    m = re.fullmatch(r"wgpu-mm(\d+)", variant)
    if m:  # qmatmul (tiled) above this many rows
        return base, {"matvec_max_rows": int(m.group(1))}
    m = re.fullmatch(r"wgpu-s(\d)o(\d)(?:t(\d+))?(?:w(\d+))?", variant)
    if not m:
        raise SystemExit(f"unknown variant {variant!r}: wgpu, wgpu-unfused, wgpu-attn1, wgpu-kvN, wgpu-f16, wgpu-i8[wW][gG][oO][tT], wgpu-planes3, wgpu-blockwait, wgpu-noahead, wgpu-blocks, wgpu-lanes, wgpu-notall, wgpu-stage1, wgpu-stage-all[wW], wgpu-xN or wgpu-sSoO[tT][wW], each also with -nosg and/or -planes3 and/or -awN (attention's workgroup) and/or -kvN (split-K runs)")
    extra = {"matvec_max_tpr": int(m.group(3))} if m.group(3) else {}
    if m.group(4):
        extra["matvec_wg"] = dev.workgroup_size(int(m.group(4)))
    return dataclasses.replace(base, matvec_span=int(m.group(1)), matvec_opt=int(m.group(2)), **extra), {}


# a plain vec4 copy: what a compute shader moves through memory (the copy command may not use the SMs)
COPY_WGSL = """
@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<u32>>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
  let i = gid.x + gid.y * nw.x * 256u;
  if (i < arrayLength(&src)) {
    dst[i] = src[i];
  }
}
"""


def best_run_s(dev, record, done, rounds: int) -> float:
    """Seconds of the fastest of ``rounds`` submissions of what ``record(encoder)`` records, each
    waited for by reading a word of the buffer ``done``, after one warm-up submission."""
    best = float("inf")
    for r in range(rounds + 1):
        enc = dev.encoder()
        record(enc)
        t = time.perf_counter()
        dev.queue.submit([enc.finish()])
        dev.read(done, np.uint32, count=1)
        if r:
            best = min(best, time.perf_counter() - t)
    return best


def copy_gbps(dev, nbytes: int, reps: int = 10, rounds: int = 5) -> dict:
    """The device's own copy bandwidth, bytes read + written per second (GB/s), by the copy
    command and by a vec4 compute copy: ``reps`` copies of nbytes in one submission, the best
    of ``rounds`` after a warm-up round."""
    src, dst = dev.buffer(nbytes, "copy.src"), dev.buffer(nbytes, "copy.dst")
    dev.write(src, np.arange(nbytes // 4, dtype=np.uint32))  # not zeros
    pipe = dev.device.create_compute_pipeline(layout="auto", compute={
        "module": dev.device.create_shader_module(code=COPY_WGSL), "entry_point": "main"})
    bg = dev.bind_group(pipe, [src, dst])
    groups = -(-nbytes // (16 * 256))
    gx = min(groups, 65535)
    def by_command(enc):
        for _ in range(reps):
            enc.copy_buffer_to_buffer(src, 0, dst, 0, nbytes)

    def by_shader(enc):
        cpass = enc.begin_compute_pass()
        cpass.set_pipeline(pipe)
        cpass.set_bind_group(0, bg)
        for _ in range(reps):
            cpass.dispatch_workgroups(gx, -(-groups // gx))
        cpass.end()

    out = {how: 2 * nbytes * reps / best_run_s(dev, record, dst, rounds) / 1e9
           for how, record in (("command", by_command), ("shader", by_shader))}
    src.destroy()
    dst.destroy()
    return out


# a read of a whole buffer and nothing else: what one dispatch of a matrix's size can take from
# memory on this device (grid-stride vec4 loads, folded so the loads are not dropped)
READ_WGSL = """
@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
  var acc = vec4<u32>(0u);
  for (var i = gid.x; i < arrayLength(&src); i += nw.x * 256u) {
    acc ^= src[i];
  }
  dst[gid.x] = acc.x ^ acc.y ^ acc.z ^ acc.w;
}
"""
READ_GROUPS = 1024  # workgroups of the read at most (H200: near the best grid at 7-1000 MB)


def read_ms(dev, buffers: list, reps: int = 10, rounds: int = 3) -> float:
    """ms to read one of ``buffers`` (each a whole binding, a multiple of 16 bytes) in its own
    dispatch, every buffer once per rep in one pass (cycled, so that the reads come from memory
    when the buffers together outgrow L2): the best of ``rounds`` after a warm-up round."""
    pipe = dev.device.create_compute_pipeline(layout="auto", compute={
        "module": dev.device.create_shader_module(code=READ_WGSL), "entry_point": "main"})
    dst = dev.buffer(4 * 256 * READ_GROUPS, "read.dst")
    groups = [(dev.bind_group(pipe, [b, dst]), min(READ_GROUPS, -(-b.size // (16 * 256)))) for b in buffers]
    def record(enc):
        cpass = enc.begin_compute_pass()
        cpass.set_pipeline(pipe)
        for _ in range(reps):
            for bg, n in groups:
                cpass.set_bind_group(0, bg)
                cpass.dispatch_workgroups(n)
        cpass.end()

    best = best_run_s(dev, record, dst, rounds)
    dst.destroy()
    return best * 1000 / (reps * len(buffers))


class SmClock:
    """The GPU's SM clock (MHz) sampled by ``nvidia-smi`` every ``interval_ms`` while in a
    ``with`` block; ``median`` is None where there is no nvidia-smi. Why: on an H200 the 1-row
    decode steps jump between a few durations for one GPU-bound time, and a clock the driver
    lowers while the GPU waits on the host is the lead to test."""

    def __init__(self, interval_ms: int = 50):
        self.interval_ms, self.samples, self._proc = interval_ms, [], None

    def __enter__(self):
        import shutil
        import subprocess

        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader,nounits",
                                           f"-lms={self.interval_ms}"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            out, _ = self._proc.communicate()
            self.samples = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]

    @property
    def median(self) -> float | None:
        return float(np.median(self.samples)) if self.samples else None


def warm_up(dev, seconds: float) -> None:
    """Keep the GPU busy for a while first: an idle card starts at a low clock (H200: 345 MHz)."""
    if not dev.is_real_gpu():
        return
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        copy_gbps(dev, 256 << 20, reps=20, rounds=1)


def saturate(dev, plan, seconds: float) -> None:
    """Replay ``plan`` back to back for ``seconds`` (at least once), waiting after each: the GPU
    busy, so that its clock is up before what is measured next."""
    t = time.perf_counter()
    while True:
        dev.execute(plan)
        dev.device._poll_wait()
        if time.perf_counter() - t >= seconds:
            break


def gpu_bound_ms(dev, plan, reps: int = 20, warm_s: float = 0.25) -> float:
    """A cached plan replayed ``reps`` times back to back with one wait: GPU time per step
    (recording overlaps the GPU), free of the per-step readback and host work. The plan is
    first replayed for ``warm_s`` seconds: an H200 left idle for seconds (a model's upload)
    ran the same kernels 2-3x slower until its clock came back up."""
    saturate(dev, plan, warm_s)
    t = time.perf_counter()
    for _ in range(reps):
        dev.execute(plan)
    dev.device._poll_wait()
    return (time.perf_counter() - t) * 1000 / reps


def dispatch_floor_us(dev, n: int = 200) -> float:
    """What one dispatch costs on this device when it does next to nothing: ``n`` one-workgroup
    residual_add dispatches, each reading and writing the buffers of the one before (so each
    waits on it, as a layer's chain does), replayed GPU-bound (gpu_bound_ms); microseconds a
    dispatch. A step of D dispatches cannot take less than D times this."""
    from kernels import launchers as KL

    x, y = dev.upload(np.ones(64, np.float32)), dev.upload(np.zeros(64, np.float32))
    plan = dev.plan([KL.ResidualAdd(dev, x, 64, y, 64, 64)] * n, 1)
    return gpu_bound_ms(dev, plan) * 1000 / n
