"""The CPU workers' packed-weight kernels (kernels/c/packed_kernels.c): build, load, dispatch.

`PackedMatrix(parts).apply(x)` is `x @ W.T` for f32 x [M, K] and W the row-concatenation of
packed QuantTensors (q/k/v or gate/up side by side), computed on the packed words: no f32 copy
of W is ever kept. Steps of up to MAX_KERNEL_ROWS rows (decode, short prefill) run the compiled
kernel, which reads each packed word once for every row and gives each row the same bits
whatever the batch; longer chunks dequantize DEQUANT_BLOCK_BYTES of W at a time and hand them
to BLAS, which is faster there (benchmarks/bench_cpu_kernel.py measures the crossover).

`apply(x, threads=T)` splits W's rows across T threads: the kernel's own pool of C threads,
and on the BLAS path T Python threads, each dequantizing and multiplying its share of the
rows (both drop the GIL; the workers run single-threaded BLAS, so this is where a long chunk
gets its cores). Each output is computed by one thread with the same operations whatever T,
so results are bit-identical for every thread count. `default_threads()` is what a CPU
backend takes when not told: `$TABSHARD_CPU_THREADS`, else the cores this process may use.

The library is compiled on first use with the host's C compiler into a cache folder
(`$TABSHARD_CACHE_DIR`, else `$XDG_CACHE_HOME/tabshard`, else `~/.cache/tabshard`), named by a
hash of the source and the compiler, so an edited source or another compiler builds anew and
concurrent workers never load a half-written file. `make setup` builds it
(`python -m tab_worker.cpu_kernels`). Its path is the host's best of AVX-512, AVX2+FMA and the
portable scalar C (every other CPU, e.g. ARM). Without a compiler, or with
`TABSHARD_ROWS_KERNEL=0`, the portable numpy path dequantizes blocks of rows for BLAS at every
step instead; `status()` says which path runs and why.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from kernels.quant import SUPPORTED_BITS, SUPPORTED_GROUPS, QuantTensor, dequantize
from kernels.reference import rmsnorm

SOURCE = Path(__file__).resolve().parents[1] / "kernels" / "c" / "packed_kernels.c"
# Rows up to which the kernel beats dequantize-a-block + BLAS (bench_cpu_kernel.py); a decode
# step of 32 sessions stays on the kernel, so its rows are batch-invariant.
MAX_KERNEL_ROWS = 32
# f32 bytes of one dequantized block of W on the BLAS path (a 7B layer's gate/up would be 360 MB)
DEQUANT_BLOCK_BYTES = 4 << 20
# ...and at most this many rows, so that a SmolLM2 matrix has blocks for two threads and more
# (its 576-row o and down projections were one block)
BLAS_BLOCK_ROWS = 256
CFLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-pthread", "-fno-fast-math", "-ffp-contract=off"]

ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512"}
_state: dict = {}


def default_threads() -> int:
    """Threads a CPU backend uses unless told: $TABSHARD_CPU_THREADS, else the cores this process
    may run on (its affinity mask: a worker pinned to one core gets one)."""
    env = os.environ.get("TABSHARD_CPU_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"TABSHARD_CPU_THREADS must be a whole number of threads, got {env!r}") from None
        if n < 1:
            raise ValueError(f"TABSHARD_CPU_THREADS must be at least 1, got {n}")
        return n
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_threads(threads) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a whole number >= 1, got {threads!r}")
    return threads


_executor: dict = {}


def _blas_pool(threads: int):
    """Python threads for the BLAS path's shares (numpy's matmul and the dequantize drop the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    ex = _executor.get("pool")
    if ex is None or ex._max_workers < threads - 1:
        _executor["pool"] = ex = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="tabshard-blas")
    return ex


class UnsupportedFormat(ValueError):
    """A packed tensor the kernels cannot read (a bit width or group size they do not know)."""


def cache_dir() -> Path:
    root = os.environ.get("TABSHARD_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tabshard"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build() -> Path:
    """Compile packed_kernels.c (once per source and compiler) and return the library's path."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    digest = hashlib.sha256(SOURCE.read_bytes() + repr((cc, version, CFLAGS)).encode()).hexdigest()[:16]
    out = cache_dir() / f"packed_kernels-{digest}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(cc).name} failed on {SOURCE.name}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: a concurrent worker sees the whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


class _Part(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("s", ctypes.c_void_p), ("n", ctypes.c_size_t), ("k", ctypes.c_size_t),
                ("fmt", ctypes.c_uint32), ("y_col", ctypes.c_uint32)]


def _load():
    if "lib" in _state:
        return _state["lib"]
    lib, reason = None, ""
    if os.environ.get("TABSHARD_ROWS_KERNEL", "1") == "0":
        reason = "disabled by TABSHARD_ROWS_KERNEL=0"
    else:
        try:
            lib = ctypes.CDLL(str(build()))
            P, Z, I = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
            lib.pk_best_isa.restype = I
            F = ctypes.c_float
            signatures = {"pk_matmul_parts": [I, P, I, P, Z, Z, P, Z, I, I],
                          "pk_dequantize": [I, P, P, Z, Z, I, I, I, Z, Z, P, Z],
                          "pk_hadamard": [P, I, I, I, I, F],
                          "pk_matmul_parts_rmsnorm": [I, P, I, P, Z, Z, Z, Z, P, F, P, Z, I, I],
                          "pk_attention_decode": [I, I, I, P, Z, P, P, P, P, P, P, I, I, I, F, P, Z, P, P],
                          "pk_silu_gate": [I, P, Z, Z, Z, P, Z],
                          "pk_decode_layers": [I, P, I, I, P, Z, Z, F, Z, I, F, P, P, P, P, P, P, I, I, I, F, P, P, I]}
            for name, argtypes in signatures.items():
                # (a library built from an older source, as benchmarks --against REV load, lacks
                # the entry points added since: only those it has are declared)
                f = getattr(lib, name, None)
                if f is not None:
                    f.argtypes, f.restype = argtypes, None
            _state["isa"] = lib.pk_best_isa()
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            lib, reason = None, f"build failed: {exc}"
    _state["lib"], _state["reason"] = lib, reason
    return lib


def status() -> dict:
    """Which path the CPU backend's matmuls take here, for `tabshard generate`, capabilities and
    benchmark reports: `kernel` is avx512, avx2 or scalar (compiled C), or None (numpy blocks + BLAS)."""
    lib = _load()
    return {"kernel": ISA_NAMES[_state["isa"]] if lib is not None else None,
            "max_rows": MAX_KERNEL_ROWS if lib is not None else 0, "reason": _state["reason"]}


def describe() -> str:
    """One line for people: which path the packed-weight matmuls take here."""
    s = status()
    if s["kernel"]:
        return f"packed-weight C kernel, {s['kernel']} path (steps of <= {s['max_rows']} rows; BLAS on per-chunk dequantized blocks beyond)"
    return f"portable numpy path: packed blocks dequantized per step for BLAS ({s['reason']})"


def kernel_isas() -> list[str]:
    """The compiled paths this CPU can run, best last (tests check that they agree bit for bit)."""
    return [ISA_NAMES[i] for i in range(0, _state["isa"] + 1)] if _load() is not None else []


def _isa_level(isa: str | None) -> int:
    if _load() is None:
        raise RuntimeError(f"the compiled packed kernel is unavailable: {_state['reason']}")
    if isa is None:
        return _state["isa"]
    level = {v: k for k, v in ISA_NAMES.items()}.get(isa, 99)
    if level > _state["isa"]:
        raise ValueError(f"isa must be one of {kernel_isas()}, got {isa!r}")
    return level


def check_format(t: QuantTensor, name: str) -> None:
    """Refuse, naming the tensor, a packed format the kernels cannot read (at load, not mid-step)."""
    spec = t.spec
    if spec.bits not in SUPPORTED_BITS or spec.group not in SUPPORTED_GROUPS:
        raise UnsupportedFormat(f"tensor {name}: format {spec.name} is not one the CPU kernels read "
                                f"(bits {SUPPORTED_BITS}, groups {SUPPORTED_GROUPS})")
    words = t.k_pad // 32 * spec.bits
    if t.qweight.dtype != np.uint32 or t.qweight.shape != (t.n, words) or t.scales.dtype != np.uint32 \
            or t.scales.shape[0] != t.n:
        raise UnsupportedFormat(f"tensor {name}: packed arrays {t.qweight.shape} {t.qweight.dtype} / {t.scales.shape} "
                                f"{t.scales.dtype} do not hold a {t.n} x {t.k} {spec.name} matrix")


def _fmt(t: QuantTensor) -> int:
    return t.spec.bits | t.spec.group << 8 | int(t.spec.symmetric) << 16


def _rows_contiguous(a: np.ndarray) -> np.ndarray:
    """u32 rows the kernel can walk: C-contiguous (a worker's tensors are views of its blob: no copy)."""
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _padded(x: np.ndarray, k_pad: int) -> np.ndarray:
    """f32 C-contiguous rows of k_pad floats, zeros past k."""
    x = np.asarray(x, np.float32)
    if x.shape[1] == k_pad and x.flags.c_contiguous:
        return x
    out = np.zeros((x.shape[0], k_pad), np.float32)
    out[:, : x.shape[1]] = x
    return out


def kernel_matmul(x: np.ndarray, t: QuantTensor, isa: str | None = None, threads: int = 1) -> np.ndarray:
    """x @ dequantize(t).T by the compiled kernel on one path and thread count, for any M
    (tests, benchmarks)."""
    level = _isa_level(isa)
    if x.ndim != 2 or x.shape[1] != t.k:
        raise ValueError(f"x has shape {x.shape}; expected (rows, {t.k})")
    pm = PackedMatrix([t])
    y = np.empty((x.shape[0], t.n), np.float32)
    pm._kernel(_padded(x, t.k_pad), y, False, level, check_threads(threads))
    return y


def dequantize_rows(t: QuantTensor, a: int, b: int, out: np.ndarray | None = None) -> np.ndarray:
    """f32 rows [a, b) of t, [b - a, k] (a view of out's first columns when given [>= b - a, k_pad])."""
    lib = _load()
    if lib is None:
        return dequantize(t.rows(a, b))
    q, s = _rows_contiguous(t.qweight), _rows_contiguous(t.scales)
    if out is None:
        out = np.empty((b - a, t.k_pad), np.float32)
    lib.pk_dequantize(_state["isa"], q.ctypes.data, s.ctypes.data, t.n, t.k, t.spec.bits, t.spec.group,
                      int(t.spec.symmetric), a, b, out.ctypes.data, out.shape[1])
    return out[: b - a, : t.k]


def hadamard(x: np.ndarray, block: int) -> np.ndarray:
    """In place on f32 C-contiguous rows x [M, n]: each ``block`` entries' normalized
    Walsh-Hadamard transform (kernels/reference.py's hadamard, the same bits), by the compiled
    kernel, else by the numpy twin. Returns x."""
    lib = _load()
    n = x.shape[-1]
    if block < 1 or block & (block - 1) or n % block:
        raise ValueError(f"hadamard block {block} must be a power of two dividing {n}")
    if lib is None or x.dtype != np.float32 or not x.flags.c_contiguous:
        from kernels.reference import hadamard as twin

        x[...] = twin(x, block)
        return x
    lib.pk_hadamard(x.ctypes.data, int(x.size // n), n, n, block, float(np.float32(1.0 / np.sqrt(block))))
    return x


class _DecodeLayer(ctypes.Structure):
    # (packed_kernels.c's DecodeLayer)
    _fields_ = [("qkv", ctypes.c_void_p), ("wo", ctypes.c_void_p), ("gate_up", ctypes.c_void_p), ("down", ctypes.c_void_p),
                ("n_qkv", ctypes.c_int), ("n_wo", ctypes.c_int), ("n_gate_up", ctypes.c_int), ("n_down", ctypes.c_int),
                ("qkv_rows", ctypes.c_size_t), ("gate_up_rows", ctypes.c_size_t), ("wo_k_pad", ctypes.c_size_t),
                ("down_k_pad", ctypes.c_size_t), ("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p)]


def silu_gate(gate_up: np.ndarray, ffn: int) -> np.ndarray:
    """SiLU(gate) * up of f32 rows [gate | up] (2 ffn floats each) by the compiled kernel: the
    one a decode step's layers use (DecodeLayers), kernels/reference.py's silu_gate to rounding."""
    level = _isa_level(None)
    gate_up = np.ascontiguousarray(gate_up, np.float32)
    out = np.empty((gate_up.shape[0], ffn), np.float32)
    _state["lib"].pk_silu_gate(level, gate_up.ctypes.data, gate_up.shape[0], gate_up.shape[1], ffn, out.ctypes.data, ffn)
    return out


class DecodeLayers:
    """A range's layers for pk_decode_layers: a decode step through all of them in one call
    (DecodeAttention.through). Each layer is (w_qkv, wo, w_gate_up, w_down, attn_norm, ffn_norm):
    four PackedMatrix and two f32 norm weights, held here so the pointers stay valid. None from
    `of` where the library has no such entry point (one built from an older source)."""

    def __init__(self, layers: list[tuple], hidden: int, ffn: int):
        self.hidden, self.ffn = hidden, ffn
        self.norms = [(np.ascontiguousarray(a, np.float32), np.ascontiguousarray(f, np.float32)) for *_, a, f in layers]
        self.hidden_pad = max([max(q.k_pad, g.k_pad) for q, _, g, *_ in layers], default=hidden)
        self.table = (_DecodeLayer * len(layers))(*[
            _DecodeLayer(ctypes.addressof(q._c_parts), ctypes.addressof(o._c_parts), ctypes.addressof(g._c_parts),
                         ctypes.addressof(d._c_parts), len(q.parts), len(o.parts), len(g.parts), len(d.parts), q.n, g.n,
                         o.k_pad, d.k_pad, an.ctypes.data, fn.ctypes.data)
            for (q, o, g, d, *_), (an, fn) in zip(layers, self.norms)])
        self.matrices = [m for layer in layers for m in layer[:4]]  # (their _c_parts back the table)

    @classmethod
    def of(cls, layers: list[tuple], hidden: int, ffn: int) -> "DecodeLayers | None":
        lib = _load()
        if lib is None or getattr(lib, "pk_decode_layers", None) is None:
            return None
        return cls(layers, hidden, ffn)


class DecodeAttention:
    """A decode step's attention by the compiled kernel (pk_attention_decode): every session's one
    row of q/k/v roped, its key and value stored into its KV caches, its queries attended over
    them, one call a layer (or, with `through`, the whole step through a range's layers in one
    call). Built once a step for its sessions' caches (f32 C-contiguous [layers, n_kv, capacity,
    head_dim], not reallocated during the step) and rope tables; None from `for_step` where the
    kernel cannot run it."""

    def __init__(self, caches: list, positions, tables, n_heads: int, n_kv: int, head_dim: int, max_ctx: int):
        self.n, self.n_heads, self.n_kv, self.hd = len(caches), n_heads, n_kv, head_dim
        self.k_base = np.array([c.k.ctypes.data for c in caches], np.int64)
        self.v_base = np.array([c.v.ctypes.data for c in caches], np.int64)
        self.cap = np.array([c.k.shape[2] for c in caches], np.int64)
        self.pos = np.asarray(positions, np.int64)
        # cos and sin [n, hd / 2] (reference.rope_tables gives them [n, 1, hd / 2])
        self.cos, self.sin = (np.ascontiguousarray(t, np.float32).reshape(self.n, head_dim // 2) for t in tables)
        self.scale = float(np.float32(1.0 / np.sqrt(head_dim)))
        self.scores = np.empty(4 * (max_ctx + 8), np.float32)  # (up to 4 query heads a KV head at once)
        self.q_rot = np.empty(n_heads * head_dim, np.float32)
        self.ptrs = [a.ctypes.data for a in (self.cos, self.sin, self.k_base, self.v_base, self.cap, self.pos, self.scores,
                                             self.q_rot)]

    @classmethod
    def for_step(cls, slices, caches, tables, n_heads: int, n_kv: int, head_dim: int, max_ctx: int):
        if _load() is None or head_dim % 8 or not slices or any(s.length != 1 for s in slices):
            return None
        return cls(caches, [s.start_pos for s in slices], tables, n_heads, n_kv, head_dim, max_ctx)

    def __call__(self, layer: int, qkv: np.ndarray) -> np.ndarray:
        """qkv: f32 C-contiguous [n, (n_heads + 2 n_kv) hd], the rows as the q/k/v matmul gives
        them (unroped). Returns the attention rows [n, n_heads * hd]."""
        out = np.empty((self.n, self.n_heads * self.hd), np.float32)
        cos, sin, k_base, v_base, cap, pos, scores, q_rot = self.ptrs
        _state["lib"].pk_attention_decode(_state["isa"], self.n, layer, qkv.ctypes.data, qkv.shape[1], cos, sin, k_base,
                                          v_base, cap, pos, self.n_heads, self.n_kv, self.hd, self.scale, out.ctypes.data,
                                          out.shape[1], scores, q_rot)
        return out

    def through(self, layers: DecodeLayers, x: np.ndarray, eps: float, hadamard_block: int = 0, threads: int = 1) -> np.ndarray:
        """The step through every layer of `layers` in one call (pk_decode_layers), x (f32
        C-contiguous [n, hidden]) updated in place and returned: the same bits as the layer loop
        of numpy_backend.forward with this attention, the matmuls' norms in their calls and
        silu_gate."""
        cos, sin, k_base, v_base, cap, pos, scores, q_rot = self.ptrs
        _state["lib"].pk_decode_layers(_state["isa"], ctypes.addressof(layers.table), len(layers.table), self.n, x.ctypes.data,
                                       layers.hidden, layers.hidden_pad, eps, layers.ffn, hadamard_block,
                                       float(np.float32(1.0 / np.sqrt(hadamard_block))) if hadamard_block else 0.0,
                                       cos, sin, k_base, v_base, cap, pos, self.n_heads, self.n_kv, self.hd, self.scale,
                                       scores, q_rot, threads)
        return x


class PackedMatrix:
    """The row-concatenation W (sum n_i, k) of packed matrices of one k: apply(x) = x @ W.T, the
    packed words read in place (parts may differ in format)."""

    def __init__(self, parts: list[QuantTensor], names: list[str] | None = None):
        if len({p.k for p in parts}) != 1:
            raise ValueError(f"parts of one matrix must share k, got {[p.k for p in parts]}")
        for i, p in enumerate(parts):
            check_format(p, names[i] if names else f"part {i}")
        self.parts = [QuantTensor(p.spec, p.n, p.k, _rows_contiguous(p.qweight), _rows_contiguous(p.scales)) for p in parts]
        self.k = parts[0].k
        self.k_pad = max(p.k_pad for p in parts)
        self.n = sum(p.n for p in parts)
        self.starts = np.cumsum([0] + [p.n for p in parts])
        self._c_parts = (_Part * len(parts))(*[
            _Part(p.qweight.ctypes.data, p.scales.ctypes.data, p.n, p.k, _fmt(p), int(s)) for p, s in zip(self.parts, self.starts)])
        self.block_rows = max(16, min(BLAS_BLOCK_ROWS, DEQUANT_BLOCK_BYTES // (4 * self.k_pad)))

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def apply(self, x: np.ndarray, out: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
        """x @ W.T as f32 [M, n] on `threads` threads (the same bits for any number); with out
        (f32 C-contiguous [M, n]) it is added onto out in place (the residual update: the same
        one rounding as out + x @ W.T)."""
        m = x.shape[0]
        lib = _load()
        if lib is not None and 0 < m <= MAX_KERNEL_ROWS:
            y = out if out is not None else np.empty((m, self.n), np.float32)
            self._kernel(_padded(x, self.k_pad), y, out is not None, _state["isa"], threads)
            return y
        y = self._blas(np.asarray(x, np.float32), threads)
        if out is not None:
            out += y
            return out
        return y

    def apply_rmsnorm(self, x: np.ndarray, weight: np.ndarray, eps: float, threads: int = 1) -> np.ndarray:
        """apply(rmsnorm(x, weight, eps)) (kernels/reference.py), on the kernel's path with the
        norm made in its call (the same to rounding: it sums the squares in double)."""
        m = x.shape[0]
        if x.shape[1] != self.k:
            raise ValueError(f"x has shape {x.shape}; expected (rows, {self.k})")
        if _load() is None or not 0 < m <= MAX_KERNEL_ROWS:
            return self.apply(rmsnorm(x, weight, eps), threads=threads)
        x = x if x.dtype == np.float32 and x.flags.c_contiguous else np.ascontiguousarray(x, np.float32)
        y = np.empty((m, self.n), np.float32)
        _state["lib"].pk_matmul_parts_rmsnorm(_state["isa"], ctypes.addressof(self._c_parts), len(self.parts), x.ctypes.data,
                                              m, x.shape[1], self.k, self.k_pad, np.ascontiguousarray(weight, np.float32).ctypes.data,
                                              eps, y.ctypes.data, self.n, 0, threads)
        return y

    def _kernel(self, xp: np.ndarray, y: np.ndarray, accumulate: bool, level: int, threads: int) -> None:
        _state["lib"].pk_matmul_parts(level, ctypes.addressof(self._c_parts), len(self.parts), xp.ctypes.data,
                                      xp.shape[0], xp.shape[1], y.ctypes.data, self.n, int(accumulate), threads)

    def _blas(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        """Long chunks: W a block of rows at a time dequantized into a reused buffer, then BLAS;
        with threads > 1 each thread takes every threads-th block with a buffer of its own."""
        y = np.empty((x.shape[0], self.n), np.float32)
        # the blocks never depend on the thread count (the same BLAS calls, the same bits)
        blocks = [(p, s, a, min(p.n, a + self.block_rows)) for p, s in zip(self.parts, self.starts)
                  for a in range(0, p.n, self.block_rows)]

        def run(i: int) -> None:
            buf = np.empty((self.block_rows, self.k_pad), np.float32)
            for p, s, a, b in blocks[i::threads]:
                y[:, s + a : s + b] = x @ dequantize_rows(p, a, b, buf).T

        threads = min(threads, len(blocks))
        if threads <= 1:
            run(0)
            return y
        futures = [_blas_pool(threads).submit(run, i) for i in range(1, threads)]
        run(0)
        for f in futures:
            f.result()
        return y


if __name__ == "__main__":  # `make setup` builds the library here, once per source and compiler
    state = status()
    if state["kernel"]:
        print(f"CPU backend: {describe()} ({build()})")
    else:  # setup goes on: the CPU backend takes the portable numpy path
        print(f"warning: {describe()}", file=sys.stderr)
