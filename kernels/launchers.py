"""The kernels' launchers: each WGSL kernel bound to its buffers and dispatched at a number of
rows (quantized matmuls with their tuning, norms, rope, the KV store, attention, top-k), built
on a runner.Device and recorded into its plans."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kernels.quant import QuantTensor, contiguous_3bit, spread_3bit
from kernels.runner import RAW_PASS_CALLS, Device, Dispatch, LimitError


class Launcher:
    """Something recorded into a pass: ``dispatches(rows)`` lists its Dispatch (and
    BufferCopy) items at that many rows, setting any rows-dependent params on the way."""

    def dispatches(self, rows: int) -> list:  # pragma: no cover - abstract
        raise NotImplementedError

    def record(self, cpass, rows: int) -> None:
        for d in self.dispatches(rows):
            d.launch.dispatch(cpass, d.x, d.y, d.z)


class ByRows(Launcher):
    """``small`` launchers up to ``max_rows`` rows, else ``large`` (a fused decode kernel that
    has no batched counterpart, and the unfused ops that replace it for prefill)."""

    def __init__(self, max_rows: int, small: list, large: list):
        self.max_rows, self.small, self.large = max_rows, small, large

    def dispatches(self, rows: int) -> list:
        items = []
        for launcher in (self.small if rows <= self.max_rows else self.large):
            items += launcher.dispatches(rows)
        return items


class Launch:
    """One kernel with its buffers bound and its params in its own small uniform buffer."""

    def __init__(self, dev: Device, kernel: str, constants: dict, buffers: list, **params):
        self.dev, self.kernel = dev, kernel
        self.pipeline = dev.pipeline(kernel, **constants)
        self.params = params
        self._packed = dev.pack_params(kernel, params)
        self.params_buffer = dev.buffer(len(self._packed), f"{kernel}.params", uniform=True)
        dev.queue.write_buffer(self.params_buffer, 0, self._packed)
        self.bind_group = dev.bind_group(self.pipeline, [self.params_buffer, *buffers])
        self._max_groups = dev.limits["max-compute-workgroups-per-dimension"]
        self._raw = None
        if RAW_PASS_CALLS is not None and hasattr(self.pipeline, "_internal") and hasattr(self.bind_group, "_internal"):
            self._raw = (self.pipeline._internal, self.bind_group._internal)

    def set(self, **changes) -> None:
        """Change params (rewrites the uniform buffer only when a value differs)."""
        if all(self.params.get(k) == v for k, v in changes.items()):
            return
        params = {**self.params, **changes}
        packed = self.dev.pack_params(self.kernel, params)
        self.params, self._packed = params, packed
        self.dev.queue.write_buffer(self.params_buffer, 0, packed)

    def at(self, x: int, y: int = 1, z: int = 1) -> list:
        """[Dispatch] of this launch over (x, y, z) workgroups ([] when any is 0)."""
        if x > self._max_groups or y > self._max_groups or z > self._max_groups:
            raise LimitError(f"{self.kernel}: dispatch {(x, y, z)} exceeds {self._max_groups} workgroups per dimension")
        return [Dispatch(self, x, y, z)] if x and y and z else []

    def dispatch(self, cpass, x: int, y: int = 1, z: int = 1) -> None:
        if x > self._max_groups or y > self._max_groups or z > self._max_groups:
            raise LimitError(f"{self.kernel}: dispatch {(x, y, z)} exceeds {self._max_groups} workgroups per dimension")
        if not (x and y and z):
            return
        pass_handle = getattr(cpass, "_internal", None)
        if self._raw is not None and pass_handle is not None:
            set_pipeline, set_bind_group, dispatch, null = RAW_PASS_CALLS
            set_pipeline(pass_handle, self._raw[0])
            set_bind_group(pass_handle, 0, self._raw[1], 0, null)
            dispatch(pass_handle, x, y, z)
        else:
            cpass.set_pipeline(self.pipeline)
            cpass.set_bind_group(0, self.bind_group)
            cpass.dispatch_workgroups(x, y, z)


def quant_constants(t: "GpuQuantTensor") -> dict:
    """The format's overrides; CONTIG3 and SPREAD3 only where set (the bit planes' overrides are the browser's)."""
    consts = {"BITS": t.spec.bits, "GROUP": t.spec.group, "SYMMETRIC": t.spec.symmetric}
    if t.contiguous3:
        consts["CONTIG3"] = True
    if t.spread3:
        consts["SPREAD3"] = True
    return consts


@dataclass
class GpuQuantTensor:
    """A QuantTensor on the device, split by rows into chunks that each fit one binding:
    chunks are (first row, rows, qweight buffer, scales buffer); ``contiguous3``: 3-bit codes
    uploaded contiguous (kernels.quant.contiguous_3bit; the kernels' CONTIG3); ``spread3``:
    3-bit bit planes with the high plane spread for the i8 matvecs (kernels.quant.spread_3bit;
    SPREAD3, which only the _i8 kernels read)."""

    spec: object
    n: int
    k: int
    chunks: list
    contiguous3: bool = False
    spread3: bool = False

    @property
    def nbytes(self) -> int:
        return sum(q.size + s.size for _, _, q, s in self.chunks)


def upload_quant(dev: Device, t: QuantTensor, label: str = "", contiguous3: bool = True,
                 spread3: bool = False) -> GpuQuantTensor:
    """``contiguous3``: a 3-bit tensor's codes repacked contiguous on the way (kernels.quant.
    contiguous_3bit): its kernels unpack four codes as 4-bit ones do, with no bit planes to merge
    (H200, 7B s3g64: see bench_device's wgpu-planes3); False keeps the bit planes, the layout
    the blobs carry and the browser's backend uploads as it is. ``spread3``: instead, the bit
    planes with the high plane spread for the i8 matvecs (kernels.quant.spread_3bit), which
    only they read."""
    spread3 = spread3 and t.spec.bits == 3
    contiguous3 = contiguous3 and t.spec.bits == 3 and not spread3
    row_bytes = max(t.qweight[0].nbytes, t.scales[0].nbytes) if t.n else 1
    rows_per_chunk = min(max(t.n, 1), dev.max_binding // row_bytes, dev.limits["max-compute-workgroups-per-dimension"])
    if rows_per_chunk < 1:
        raise LimitError(f"one row of {label or 'a tensor'} ({row_bytes} bytes) exceeds the binding limit {dev.max_binding}")
    chunks = []
    for start in range(0, t.n, rows_per_chunk):
        part = t.rows(start, min(t.n, start + rows_per_chunk))
        qweight = contiguous_3bit(part.qweight) if contiguous3 else spread_3bit(part.qweight) if spread3 else part.qweight
        chunks.append((start, part.n, dev.upload(qweight, f"{label}.q[{start}]"), dev.upload(part.scales, f"{label}.s[{start}]")))
    return GpuQuantTensor(t.spec, t.n, t.k, chunks, contiguous3, spread3)


MATVEC_ROWS = (1, 4, 8)  # qmatvec's ROWS variants: batch rows sharing each decoded weight


@dataclass(frozen=True)
class MatmulTuning:
    """How QuantLinear shapes its dispatches on one device (see bench_kernels.py)."""

    matvec_wg: int
    matvec_max_tpr: int  # threads cooperating on one output (1: no reduction)
    matvec_max_rows: int  # batches up to this many rows use qmatvec, larger ones qmatmul
    tile: int  # qmatmul's output tile
    matvec_span: int = 8  # qmatvec's SPAN: 8 walks whole blocks per lane (CPU), 1/2/4 interleave lanes (GPU), 0 by shape
    matvec_opt: int = 1  # qmatvec's OPT: outputs per thread (1, 2 or 4; 0 by shape)
    matvec_stage: int = 0  # qmatvec: vec4s of each row of x staged in workgroup memory a chunk (0: none)
    matvec_stage_rows_min_k: int = 0  # staged: batches of rows too when k >= this (else the lanes loop)
    matvec_tall_batch_wg: int = 0  # staged: batches of tall long-rowed matrices too, in workgroups of this many threads (0: no)
    matvec_i8_wg: int = 0  # qmatvec_i8's workgroups (more outputs share each quantized x); 0: matvec_wg
    matvec_i8_max_groups: int = 0  # qmatvec_i8 with whole rows in one chunk: at most this many workgroups a batch row, each taking several output groups (0: one group each)
    matvec_i8_opt: int = 1  # qmatvec_i8's outputs a thread (1, 2 or 4: they share each load of quantized x) ...
    matvec_i8_opt_min_k: int = 0  # ... for rows of at least this many inputs (shorter ones: 1)
    matvec_i8_max_tpr: int = 0  # qmatvec_i8's threads cooperating on one output at most at one batch row (0: matvec_max_tpr)
    matvec_subgroup: int = 0  # lanes of a subgroup: the matvecs sum their lanes by shuffles (their K+subgroup variants; 0: in workgroup memory)


def matmul_tuning(dev: Device, real_gpu: bool | None = None) -> MatmulTuning:
    """GPUs want several threads per output (a workgroup reduction); CPU rasterisers
    (lavapipe, SwiftShader) run one invocation per SIMD lane with costly barriers: one
    thread per output, no reduction.

    Both use the row-blocked qmatvec at every batch size: at SmolLM2's shapes it beat the
    tiled qmatmul at every M measured (H200, a4g32, M = 4..512: 1536x576 at M=32 0.037 vs
    0.083 ms, 49152x576 at M=512 7.4 vs 12.9 ms; lavapipe, 3072x576: 2.3 vs <= 1.9 GFLOP/s).
    qmatmul (64x64 tiles, 24 workgroups for 1536 outputs) wants larger matrices; pass
    matvec_max_rows to QuantLinear to use it. ``real_gpu``: the GPU's (True) or the CPU
    rasterisers' (False) tuning at this device's limits, whatever the adapter is."""
    wg = dev.workgroup_size(256)
    tile = 64 if wg >= 256 else 32
    if dev.is_real_gpu() if real_gpu is None else real_gpu:
        tall = dev.workgroup_size(GPU_MATVEC_TALL_BATCH_WG)
        return MatmulTuning(matvec_wg=wg, matvec_max_tpr=32, matvec_max_rows=1 << 30, tile=tile,
                            matvec_span=GPU_MATVEC_SPAN, matvec_opt=GPU_MATVEC_OPT, matvec_stage=GPU_MATVEC_STAGE,
                            matvec_stage_rows_min_k=GPU_MATVEC_STAGE_ROWS_MIN_K,
                            matvec_tall_batch_wg=tall if tall > wg else 0,
                            matvec_i8_wg=dev.workgroup_size(GPU_MATVEC_I8_WG), matvec_i8_max_groups=GPU_MATVEC_I8_MAX_GROUPS,
                            matvec_i8_opt=GPU_MATVEC_I8_OPT, matvec_i8_opt_min_k=GPU_MATVEC_I8_OPT_MIN_K,
                            matvec_i8_max_tpr=GPU_MATVEC_I8_MAX_TPR,
                            matvec_subgroup=dev.subgroup_size())
    return MatmulTuning(matvec_wg=dev.workgroup_size(64), matvec_max_tpr=1, matvec_max_rows=1 << 30, tile=tile)


# qmatvec's lane layout on a real GPU (include/qmatvec_lanes.wgsl): 0 = by shape (matvec_layout)
GPU_MATVEC_SPAN = 0
GPU_MATVEC_OPT = 0
# matvecs on a real GPU: lanes take whole blocks, x staged in workgroup memory
# (include/qmatvec_staged.wgsl), 512 vec4s (8 KiB) of one row a chunk, less of each row when
# several share the workgroup memory
GPU_MATVEC_STAGE = 512
# ... and for batches only of long rows: H200, 7B shape, 8 rows, k = 11008 (down) 5.07 -> 3.19 ms a
# step, k = 4096 (qkv, gate_up, wo) no better, SmolLM2's k <= 1536 10% slower (bench_device --breakdown)
GPU_MATVEC_STAGE_ROWS_MIN_K = 8192
# ... and for batches of tall matrices with long rows (n >= 8192, k >= 4096), in workgroups of 512
# threads where the device allows more than matvec_wg: on an H200 the 7B shape's qkv and gate_up
# matvecs ran faster at 8 rows so, slower staged in 256 threads, and its n = 4096 ones slower in 512
GPU_MATVEC_TALL_BATCH_WG = 512
TALL_N, TALL_K = 8192, 4096
# qmatvec_i8 (compute_dtype "i8") on a real GPU: workgroups of 1024 threads where the device
# allows (32 outputs share each quantized x), at most 132 workgroups a batch row where whole rows
# fit one chunk. H200, 7B shape s4g64 and SmolLM2: the best of 256/512/1024 threads and 132/264/528
# workgroups at 1 and 8 rows, but for SmolLM2 at 8 rows (bench_device's wgpu-i8wWgG variants)
GPU_MATVEC_I8_WG = 1024
GPU_MATVEC_I8_MAX_GROUPS = 132
# ... and 2 outputs a thread for long rows: at 8 rows a lane loads 40 bytes of quantized x a block
# and row from workgroup memory against the block's 12-16 bytes of weights, and two outputs halve
# those loads; the short rows of small models keep 1, their matrices filling too few workgroups
# at 2 (H200: 7B shape faster at 8 and 64 rows, SmolLM2 slower; bench_device's wgpu-i8oN)
GPU_MATVEC_I8_OPT = 2
GPU_MATVEC_I8_OPT_MIN_K = 4096
# ... and at one batch row up to 64 threads an output (two subgroups, their sums meeting in
# workgroup memory): at 32 the 7B shape's n = 4096 matrices (wo, down) made 64 output groups,
# half of an H200's 132 SMs idle; at 64 they make 128 (bench_device --breakdown, wgpu-i8t32
# against wgpu-i8t64; the taller matrices keep fewer by matvec_threads_per_row's cap on n * tpr).
# Batches keep 32: at 64 rows 64 threads an output were slower
GPU_MATVEC_I8_MAX_TPR = 64


def matvec_layout(n: int, k: int, span: int, opt: int) -> tuple[int, int]:
    """(SPAN, OPT) of a matvec, where the tuning leaves them to the shape (0): long rows take
    2 vec4s per lane step, tall matrices 4 outputs per thread; small ones (SmolLM2's) keep
    more workgroups. From bench_device.py --kernels on an H200 (LLaMA-7B and SmolLM2 shapes)."""
    if span == 0:
        span = 2 if k >= 1024 else 1
    if opt == 0:
        opt = 4 if n >= 8192 else 2
    return span, opt


def matvec_threads_per_row(n: int, k: int, wg: int, max_tpr: int = 32, span: int = 8) -> int:
    """Threads sharing one output of qmatvec: about one per 32-input block, at most max_tpr,
    and fewer for very tall matrices, which have parallelism enough in their rows (H200,
    49152 x 576: 33 us at 4 threads per row, 45 at 8, 56 at 16)."""
    if span < 8:  # interleaved lanes: a warp per output, as many lanes as there are steps
        steps = -(-k // (4 * span))
        return min(wg, max_tpr, 1 << max(0, steps.bit_length() - 1))
    blocks = -(-k // 32)
    tpr = min(wg, max_tpr, 1 << max(0, blocks.bit_length() - 1))
    while tpr > 4 and n * tpr > 1 << 18:
        tpr //= 2
    return tpr


class QuantLinear(Launcher):
    """y[:, y_col : y_col+n] (+)= x @ W.T for ``rows`` rows of x: qmatvec.wgsl up to
    ``matvec_max_rows`` rows (decode; ROWS batch rows per workgroup share each decoded
    weight), qmatmul.wgsl above (prefill). One dispatch per chunk of a split W.

    ``norm=(weight buffer, eps)``: x is first RMS-normalised (qmatvec_norm.wgsl);
    ``silu_up_col=c``: the input is silu(x[:, :k]) * x[:, c : c+k] (qmatvec_silu.wgsl). Both
    exist for qmatvec only: such a linear serves up to ``matvec_max_rows`` rows (see ByRows).

    ``compute_dtype="f16"``: the matvecs run their ``_f16`` variants (f16 weights, inputs and
    products, f32 sums; the device needs shader-f16); ``"i8"``: their ``_i8`` variants (inputs
    quantized per 32-input block to int8, integer dot products; 3-bit weights in bit planes,
    not contiguous); qmatmul (prefill) stays f32."""

    def __init__(self, dev: Device, w: GpuQuantTensor, x, x_stride: int, y, y_stride: int,
                 y_col: int = 0, accumulate: bool = False, matvec_max_rows: int | None = None,
                 tuning: MatmulTuning | None = None, norm: tuple | None = None, silu_up_col: int | None = None,
                 compute_dtype: str = "f32"):
        if x_stride % 4:
            raise ValueError(f"x_stride {x_stride} must be a multiple of 4 (qmatvec reads vec4)")
        if norm is not None and silu_up_col is not None:
            raise ValueError("one prologue at a time: norm or silu_up_col")
        if silu_up_col is not None and silu_up_col % 4:
            raise ValueError(f"silu_up_col {silu_up_col} must be a multiple of 4")
        self.dev, self.w = dev, w
        self.tuning = tuning or matmul_tuning(dev)
        self.matvec_max_rows = self.tuning.matvec_max_rows if matvec_max_rows is None else matvec_max_rows
        self._args = (x, x_stride, y, y_stride, y_col, int(accumulate))
        self.norm, self.silu_up_col = norm, silu_up_col
        if compute_dtype not in ("f32", "f16", "i8"):
            raise ValueError(f"compute_dtype must be 'f32', 'f16' or 'i8', got {compute_dtype!r}")
        if compute_dtype == "i8" and w.contiguous3:
            raise ValueError("the i8 matvecs read 3-bit codes in bit planes: upload_quant(..., contiguous3=False)")
        if compute_dtype != "i8" and w.spread3:
            raise ValueError(f"only the i8 matvecs read spread 3-bit planes, not the {compute_dtype} ones: upload_quant(..., spread3=False)")
        self.compute_dtype = compute_dtype
        self.matvec_kernel = "qmatvec_norm" if norm is not None else "qmatvec_silu" if silu_up_col is not None else "qmatvec"
        self.matvec_kernel += "" if compute_dtype == "f32" else f"_{compute_dtype}"
        if self.tuning.matvec_subgroup:
            lanes = dev.subgroup_size()
            if not lanes or lanes % self.tuning.matvec_subgroup:
                raise LimitError(f"matvec_subgroup {self.tuning.matvec_subgroup}: this device's subgroups "
                                 f"({lanes or 'none usable'}) are not runs of that many lanes")
            self.matvec_kernel += "+subgroup"
        self.wg = self.tuning.matvec_i8_wg if compute_dtype == "i8" and self.tuning.matvec_i8_wg else self.tuning.matvec_wg
        # the lane layout (SPAN, OPT) exists in the f32 matvecs; the f16 and i8 ones walk whole
        # blocks, the i8 ones for 1, 2 or 4 outputs a thread
        f32 = compute_dtype == "f32"
        long_rows = w.k >= self.tuning.matvec_i8_opt_min_k
        if f32:
            self.span, self.opt = matvec_layout(w.n, w.k, self.tuning.matvec_span, self.tuning.matvec_opt)
        else:
            i8_opt = self.tuning.matvec_i8_opt if long_rows else 1
            self.span, self.opt = 8, i8_opt if compute_dtype == "i8" else 1
        if self.span not in (1, 2, 4, 8) or self.opt not in (1, 2, 4):
            raise ValueError(f"matvec span {self.span} / opt {self.opt}: span must be 1, 2, 4 or 8 and opt 1, 2 or 4")
        self.tpr = matvec_threads_per_row(w.n, w.k, self.wg, self.tuning.matvec_max_tpr, self.span)
        # qmatvec_i8 at one batch row (ROWS = 1) may take more threads an output (matvec_i8_max_tpr)
        one_row = self.tuning.matvec_i8_max_tpr if compute_dtype == "i8" else 0
        self.tpr_one_row = matvec_threads_per_row(w.n, w.k, self.wg, one_row, self.span) if one_row else self.tpr
        # staged (lanes path only): a lane per block, at least two blocks a lane and chunk
        self.stage = self.tuning.matvec_stage if f32 and (self.span != 8 or self.opt != 1) else 0
        if self.stage % 8 or self.stage < 0:
            raise ValueError(f"matvec_stage {self.stage} must be a non-negative multiple of 8")
        self.tile = self.tuning.tile
        self._launches: dict[tuple, list] = {}

    def _chunk_launches(self, kernel: str, rows_per_wg: int, ch: int = 0) -> list:
        key = (kernel, rows_per_wg, ch)
        if key not in self._launches:
            x, x_stride, y, y_stride, y_col, acc = self._args
            buffers, extra = [], {}
            if kernel.startswith("qmatvec"):
                consts = self.matvec_constants(rows_per_wg, ch)
                if kernel.startswith("qmatvec_norm"):
                    buffers, extra = [self.norm[0]], {"eps": float(self.norm[1])}
                elif kernel.startswith("qmatvec_silu"):
                    extra = {"up_col": int(self.silu_up_col)}
            else:
                consts = {**quant_constants(self.w), "TILE": self.tile}
            self._launches[key] = [
                (n, Launch(self.dev, kernel, consts, [qweight, scales, x, y, *buffers], n=n, k=self.w.k, m=0,
                           x_stride=x_stride, y_stride=y_stride, y_col=y_col + start, accumulate=acc, **extra))
                for start, n, qweight, scales in self.w.chunks]
        return self._launches[key]

    def matvec_constants(self, rows_per_wg: int, ch: int) -> dict:
        """qmatvec's overrides at ROWS = rows_per_wg, ``ch`` vec4s of each row staged (0: none)."""
        consts = {**quant_constants(self.w), "WG": self._wg(rows_per_wg, ch), "TPR": self._tpr(rows_per_wg, ch),
                  "ROWS": rows_per_wg}
        if self.tuning.matvec_subgroup:
            consts["SG"] = self.tuning.matvec_subgroup
        if self.compute_dtype == "i8":
            return {**consts, "XB": self._i8_blocks(rows_per_wg), "OPT": self.opt}
        if self.span != 8 or self.opt != 1:
            consts.update(SPAN=self.span, OPT=self.opt, EXACT=self.w.k % 32 == 0)
        if ch:
            consts.update(XT=ch * rows_per_wg)
        return consts

    def matvec_grid(self, rows: int) -> tuple[dict, int, int]:
        """(overrides, outputs per workgroup, rows per workgroup) of qmatvec at ``rows`` rows."""
        rows_per_wg = next((r for r in MATVEC_ROWS if r >= rows), MATVEC_ROWS[-1])
        ch = self._staged(rows_per_wg, rows)
        return self.matvec_constants(rows_per_wg, ch), self._outputs_per_wg(rows_per_wg, ch), rows_per_wg

    def _tall_batch(self, rows_per_wg: int) -> bool:
        """Batches of this (tall, long-rowed) matrix staged in matvec_tall_batch_wg threads."""
        return bool(self.tuning.matvec_tall_batch_wg) and rows_per_wg > 1 and self.w.n >= TALL_N and self.w.k >= TALL_K

    def _wg(self, rows_per_wg: int, ch: int) -> int:
        if self.compute_dtype == "i8":
            return self._i8_wg(rows_per_wg)
        return self.tuning.matvec_tall_batch_wg if ch and self._tall_batch(rows_per_wg) else self.wg

    def _outputs_per_wg(self, rows_per_wg: int, ch: int) -> int:
        return self._wg(rows_per_wg, ch) // self._tpr(rows_per_wg, ch) * self.opt

    def _staged(self, rows_per_wg: int, rows: int) -> int:
        """vec4s of each row staged a chunk for ``rows`` rows at ROWS = rows_per_wg (0: not
        staged): what the workgroup memory holds (less 64 bytes: qmatvec_norm's inv_rms), a
        multiple of 8. Batches are staged only when long-rowed (matvec_stage_rows_min_k) or tall
        (_tall_batch), and in one workgroup row: H200, 7B shape, 64 rows in 8 workgroup rows ran
        2.7% slower staged."""
        if not self.stage:
            return 0
        long_rows = self.w.k >= self.tuning.matvec_stage_rows_min_k or self._tall_batch(rows_per_wg)
        if rows_per_wg > 1 and (not long_rows or rows > rows_per_wg):
            return 0
        room = (self.dev.limits["max-compute-workgroup-storage-size"] - 64) // 16
        return min(self.stage, room // rows_per_wg // 8 * 8)

    def _i8_room(self, wg: int, rows_per_wg: int) -> int:
        """Bytes of workgroup memory qmatvec_i8 has for x beside the reduction's partial sums
        (16 bytes a thread and quad of rows; a subgroup and quad where subgroups sum the lanes)
        and qmatvec_norm_i8's inv_rms."""
        sums = wg // (self.tuning.matvec_subgroup or 1) * -(-rows_per_wg // 4)
        return self.dev.limits["max-compute-workgroup-storage-size"] - 64 - 16 * sums

    def _i8_wg(self, rows_per_wg: int) -> int:
        """qmatvec_i8's threads a workgroup at ROWS = rows_per_wg: the tuning's, halved (not
        below matvec_wg) until 8 blocks of each row (or the whole row) fit beside the partial sums."""
        wg, want = self.wg, 40 * rows_per_wg * min(8, -(-self.w.k // 32))
        while wg > self.tuning.matvec_wg and self._i8_room(wg, rows_per_wg) < want:
            wg //= 2
        return wg

    def _i8_blocks(self, rows_per_wg: int) -> int:
        """qmatvec_i8's XB: 32-input blocks of each row quantized a chunk, as many as the
        workgroup memory holds (40 bytes a block and row), a multiple of TPR where that is at
        least one."""
        room = self._i8_room(self._i8_wg(rows_per_wg), rows_per_wg)
        blocks = -(-self.w.k // 32)
        fit = min(room // (40 * rows_per_wg), blocks)
        if fit < 1:
            raise LimitError(f"qmatvec_i8 at {rows_per_wg} rows does not fit {room + 64} bytes of workgroup memory")
        tpr = self._tpr(rows_per_wg, 0)
        return fit if fit == blocks or fit < tpr else fit // tpr * tpr

    def _groups_x(self, n: int, rows_per_wg: int, ch: int) -> int:
        """Workgroups along the outputs: one per output group, or for qmatvec_i8 with whole rows
        in one chunk at most matvec_i8_max_groups (each then takes several groups, x quantized once)."""
        groups = -(-n // self._outputs_per_wg(rows_per_wg, ch))
        cap = self.tuning.matvec_i8_max_groups
        if self.compute_dtype == "i8" and cap and self._i8_blocks(rows_per_wg) >= -(-self.w.k // 32):
            return min(groups, cap)
        return groups

    def _tpr(self, rows_per_wg: int, ch: int) -> int:
        """Threads per output: the lanes loop's (the one-row tuning's at ROWS = 1), or staged ``ch``
        vec4s a row a chunk, at least two blocks a lane."""
        if not ch:
            return self.tpr_one_row if rows_per_wg == 1 else self.tpr
        blocks = min(ch // 8, -(-self.w.k // 32))
        return min(self._wg(rows_per_wg, ch), self.tuning.matvec_max_tpr, 1 << max(0, (blocks // 2).bit_length() - 1))

    def dispatches(self, rows: int) -> list:
        items = []
        if rows <= self.matvec_max_rows:
            rows_per_wg = next((r for r in MATVEC_ROWS if r >= rows), MATVEC_ROWS[-1])
            ch = self._staged(rows_per_wg, rows)
            for n, launch in self._chunk_launches(self.matvec_kernel, rows_per_wg, ch):
                launch.set(m=rows)
                items += launch.at(self._groups_x(n, rows_per_wg, ch), -(-rows // rows_per_wg))
        elif self.matvec_kernel.split("+")[0] not in ("qmatvec", "qmatvec_f16", "qmatvec_i8"):
            raise ValueError(f"{self.matvec_kernel} serves up to {self.matvec_max_rows} rows, not {rows}")
        elif self.w.spread3:
            raise ValueError(f"qmatmul reads no spread 3-bit planes: {rows} rows need matvec_max_rows >= {rows} for the i8 matvecs")
        else:
            for n, launch in self._chunk_launches("qmatmul", 0):
                launch.set(m=rows)
                items += launch.at(-(-n // self.tile), -(-rows // self.tile))
        return items


class RmsNorm(Launcher):
    def __init__(self, dev: Device, x, x_stride: int, weight, y, y_stride: int, n: int, eps: float):
        self.launch = Launch(dev, "rmsnorm", {"WG": dev.workgroup_size(256)}, [x, weight, y],
                             n=n, x_stride=x_stride, y_stride=y_stride, eps=float(eps))

    def dispatches(self, rows: int) -> list:
        return self.launch.at(rows)


def _leading_bits(v: np.ndarray, bits: int) -> np.ndarray:
    mantissa, exponent = np.frexp(v)
    return np.ldexp(np.floor(mantissa * 2.0**bits), exponent - bits)


def rope_freq_turns(head_dim: int, base: float) -> np.ndarray:
    """rope.wgsl's table, f32 [head_dim/2, 4]: freq = base**(-2i/head_dim) / (2*pi) in turns
    per position (float64), split as (hi, mid, lo, 0) with 8-bit hi and mid so that the
    shader's pos * hi and pos * mid are exact f32 products for positions below 2**16."""
    freq = float(base) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim) / (2 * math.pi)
    hi = _leading_bits(freq, 8)
    mid = _leading_bits(freq - hi, 8)
    table = np.stack([hi, mid, freq - hi - mid, np.zeros_like(freq)], axis=-1)
    return table.astype(np.float32)


class Rope(Launcher):
    def __init__(self, dev: Device, x, x_stride: int, x_col: int, n_heads: int, head_dim: int, positions, freq_turns):
        self.wg = dev.workgroup_size(64)
        self.pairs = n_heads * head_dim // 2
        self.launch = Launch(dev, "rope", {"WG": self.wg}, [x, positions, freq_turns],
                             n_heads=n_heads, head_dim=head_dim, x_stride=x_stride, x_col=x_col)

    def dispatches(self, rows: int) -> list:
        return self.launch.at(-(-self.pairs // self.wg), rows)


class KvStore(Launcher):
    def __init__(self, dev: Device, src, src_stride: int, k_col: int, v_col: int, positions, slots,
                 k_cache, v_cache, n_kv: int, head_dim: int, ctx: int):
        self.wg = dev.workgroup_size(64)
        self.width = n_kv * head_dim
        self.launch = Launch(dev, "kv_store", {"WG": self.wg}, [src, positions, slots, k_cache, v_cache],
                             n_kv=n_kv, head_dim=head_dim, ctx=ctx, src_stride=src_stride, k_col=k_col, v_col=v_col)

    def dispatches(self, rows: int) -> list:
        return self.launch.at(-(-self.width // self.wg), rows)


class Attention(Launcher):
    """attention.wgsl over a batch's rows; with ``splits`` > 1 split-K: each row's keys cut
    into ``splits`` runs walked by separate workgroups, their partials (in ``parts``, room for
    ``max_rows`` rows) folded by attention_combine.wgsl, a second dispatch. With ``rope`` =
    (freq_turns, k_col, v_col): attention_rope.wgsl, which first turns the query heads and the
    keys (from k_col of the same fused qkv rows) by RoPE and stores keys and values (from
    v_col) into the caches, as rope.wgsl + kv_store.wgsl before attention.wgsl would."""

    def __init__(self, dev: Device, q, q_stride: int, q_col: int, positions, slots, k_cache, v_cache,
                 out, out_stride: int, n_heads: int, n_kv: int, head_dim: int, ctx: int, wg: int | None = None,
                 splits: int = 1, max_rows: int = 1, rope: tuple | None = None):
        if head_dim % 4 or n_heads % n_kv:
            raise ValueError(f"attention needs head_dim % 4 == 0 and n_heads % n_kv == 0 (got {head_dim}, {n_heads}/{n_kv})")
        if splits < 1:
            raise ValueError(f"attention splits must be >= 1, got {splits}")
        # keys scored per chunk: a GPU wants many threads; a CPU rasteriser pays for every
        # invocation, and short contexts leave most of a wide workgroup idle. On a GPU the
        # serial part is one walk of up to WG / PARTS = head_dim keys per chunk, each waiting
        # on a V load: 1024 threads make one chunk (and one walk) of the first 1024 positions
        # instead of one per 256 (H100 decode at 256-384 positions: 2 walks -> 1 per layer)
        wg = wg or dev.workgroup_size(1024 if dev.is_real_gpu() else max(64, head_dim))
        if head_dim // 4 > wg:
            raise LimitError(f"head_dim {head_dim} needs {head_dim // 4} invocations; the workgroup size is {wg}")
        self.n_heads, self.splits, self.max_rows = n_heads, splits, max_rows
        # attention.wgsl binds the partials whether or not it splits
        self.parts = dev.buffer(attention_parts_bytes(n_heads, head_dim, splits, max_rows) if splits > 1 else 16,
                                "attention.parts")
        params = dict(n_heads=n_heads, n_kv=n_kv, ctx=ctx, q_stride=q_stride, q_col=q_col, out_stride=out_stride,
                      scale=1.0 / math.sqrt(head_dim), splits=splits)
        if rope is None:
            self.launch = Launch(dev, "attention", {"WG": wg, "HEAD_DIM": head_dim},
                                 [q, positions, slots, k_cache, v_cache, out, self.parts], **params)
        else:
            freq_turns, k_col, v_col = rope
            self.launch = Launch(dev, "attention_rope", {"WG": wg, "HEAD_DIM": head_dim},
                                 [q, positions, slots, freq_turns, k_cache, v_cache, out, self.parts],
                                 **params, k_col=k_col, v_col=v_col)
        self.combine = Launch(dev, "attention_combine", {"WG": dev.workgroup_size(head_dim // 4), "HEAD_DIM": head_dim},
                              [self.parts, out], n_heads=n_heads, splits=splits, out_stride=out_stride)

    def dispatches(self, rows: int) -> list:
        if self.splits == 1:
            return self.launch.at(self.n_heads, rows)
        if rows > self.max_rows:
            raise ValueError(f"attention: {rows} rows, partials have room for {self.max_rows}")
        return self.launch.at(self.n_heads, rows, self.splits) + self.combine.at(self.n_heads, rows)


def attention_parts_bytes(n_heads: int, head_dim: int, splits: int, rows: int) -> int:
    """Bytes of split-K attention's partials for ``rows`` rows: per row, head and split, head_dim
    floats of V sum and a vec4 (max, sum, 0, 0)."""
    return 16 * (head_dim // 4 + 1) * n_heads * splits * rows


class SiluGate(Launcher):
    def __init__(self, dev: Device, src, src_stride: int, gate_col: int, up_col: int, y, y_stride: int, n: int):
        self.wg, self.n = dev.workgroup_size(64), n
        self.launch = Launch(dev, "silu_gate", {"WG": self.wg}, [src, y],
                             n=n, src_stride=src_stride, gate_col=gate_col, up_col=up_col, y_stride=y_stride)

    def dispatches(self, rows: int) -> list:
        return self.launch.at(-(-self.n // self.wg), rows)


class ResidualAdd(Launcher):
    def __init__(self, dev: Device, x, x_stride: int, y, y_stride: int, n: int):
        self.wg, self.n = dev.workgroup_size(64), n
        self.launch = Launch(dev, "residual_add", {"WG": self.wg}, [x, y], n=n, x_stride=x_stride, y_stride=y_stride)

    def dispatches(self, rows: int) -> list:
        return self.launch.at(-(-self.n // self.wg), rows)


class Embedding(Launcher):
    """y[r] = row ids[r] of a (row-split) quantized table; one dispatch per chunk."""

    def __init__(self, dev: Device, table: GpuQuantTensor, ids, y, y_stride: int):
        consts = {**quant_constants(table), "WG": dev.workgroup_size(64)}
        self.launches = [Launch(dev, "embedding", consts, [ids, qweight, scales, y],
                                k=table.k, row_start=start, n_rows=n, y_stride=y_stride)
                         for start, n, qweight, scales in table.chunks]

    def dispatches(self, rows: int) -> list:
        return [d for launch in self.launches for d in launch.at(rows)]


class TopK(Launcher):
    """Per row, the k best of ``count`` logits, best first: ids u32 and values f32 [rows, k]
    in ``ids`` and ``values`` (for up to rows_cap rows). One topk.wgsl dispatch."""

    MAX_K = 1024

    def __init__(self, dev: Device, logits, logits_stride: int, count: int, k: int, rows_cap: int, wg: int | None = None):
        if not 1 <= k <= min(count, self.MAX_K):
            raise ValueError(f"top-k needs 1 <= k <= min(count, {self.MAX_K}); got k={k}, count={count}")
        self.k = k
        self.values = dev.buffer(rows_cap * k * 4, "topk.values")
        self.ids = dev.buffer(rows_cap * k * 4, "topk.ids")
        slots = 1 << (k - 1).bit_length()
        # one workgroup walks a whole row: as wide as allowed on a GPU; on a CPU rasteriser
        # width buys nothing (lavapipe: same time at 64 and 256)
        wg = wg or dev.workgroup_size(1024 if dev.is_real_gpu() else 256)
        self.launch = Launch(dev, "topk", {"WG": wg, "KP": slots}, [logits, self.values, self.ids],
                             count=count, in_stride=logits_stride, k=k, out_stride=k)

    def dispatches(self, rows: int) -> list:
        return self.launch.at(rows)
