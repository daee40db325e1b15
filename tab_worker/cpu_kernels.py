"""The numpy backend's compiled few-row matmul (cpu_kernels.c): build, load, dispatch.

`matmul_nt(x, w)` is `x @ w.T` for f32 x [M, K] and a weight w [N, K] (its natural layout).
Decode-sized M (<= MAX_KERNEL_ROWS) goes to the compiled kernel, which reads w once for every
row and gives each row bit-identical results whatever the batch; longer M (prefill chunks) goes
to BLAS, which is faster there.

The library is compiled on first use with the host's C compiler into a cache folder
(`$TABSHARD_CACHE_DIR`, else `$XDG_CACHE_HOME/tabshard`, else `~/.cache/tabshard`), named by a
hash of the source and the compiler, so an edited source or another compiler builds anew and
concurrent workers never load a half-written file. `make` builds it at setup
(`python -m tab_worker.cpu_kernels`). Without a compiler, on a CPU without AVX2+FMA, or with
`TABSHARD_ROWS_KERNEL=0`, every matmul is BLAS; `status()` says which and why.
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

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# Rows up to which the compiled kernel beats OpenBLAS sgemm on an 8-layer SmolLM2 stage
# (benchmarks/bench_cpu_kernel.py, 2-core Xeon with AVX-512: 1.13x at 1 row, 3.0-3.7x at 2-8,
# 1.3x at 32, 0.94x at 64).
MAX_KERNEL_ROWS = 32
CFLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-fno-fast-math", "-ffp-contract=off"]

ISA_NAMES = {1: "avx2", 2: "avx512"}
_state: dict = {}


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
    """Compile cpu_kernels.c (once per source and compiler) and return the library's path."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    digest = hashlib.sha256(SOURCE.read_bytes() + repr((cc, version, CFLAGS)).encode()).hexdigest()[:16]
    out = cache_dir() / f"cpu_kernels-{digest}.so"
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


def _load():
    if "lib" in _state:
        return _state["lib"]
    lib, reason = None, ""
    if os.environ.get("TABSHARD_ROWS_KERNEL", "1") == "0":
        reason = "disabled by TABSHARD_ROWS_KERNEL=0"
    else:
        try:
            handle = ctypes.CDLL(str(build()))
            isa = handle.rows_matmul_available()
            if isa:
                handle.rows_matmul.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                                               ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
                handle.rows_matmul.restype = None
                lib = handle
                _state["isa"] = isa
            else:
                reason = "this CPU lacks AVX2+FMA"
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            reason = f"build failed: {exc}"
    _state["lib"], _state["reason"] = lib, reason
    return lib


def status() -> dict:
    """Which path decode-sized matmuls take here, for capabilities and benchmark reports."""
    lib = _load()
    return {"rows_kernel": ISA_NAMES[_state["isa"]] if lib is not None else None,
            "max_rows": MAX_KERNEL_ROWS if lib is not None else 0, "reason": _state["reason"]}


def kernel_isas() -> list[str]:
    """The kernel paths this CPU can run, best last (tests check each)."""
    return [ISA_NAMES[i] for i in range(1, _state["isa"] + 1)] if _load() is not None else []


def kernel_rows_matmul(x: np.ndarray, w: np.ndarray, isa: str | None = None) -> np.ndarray:
    """x @ w.T by the compiled kernel, for any M (benchmarks and parity tests call it
    directly); isa picks a path other than the host's best."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the compiled rows kernel is unavailable: {_state['reason']}")
    level = _state["isa"] if isa is None else {v: k for k, v in ISA_NAMES.items()}.get(isa, 99)
    if level > _state["isa"]:
        raise ValueError(f"isa must be one of {kernel_isas()}, got {isa!r}")
    x = np.ascontiguousarray(x, np.float32)
    if w.dtype != np.float32 or not w.flags.c_contiguous or w.ndim != 2 or x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"rows_matmul needs f32 C-contiguous x [M, K] and w [N, K]; got {x.shape} and {w.shape} {w.dtype}")
    y = np.empty((x.shape[0], w.shape[0]), np.float32)
    lib.rows_matmul(level, x.ctypes.data, x.shape[0], x.shape[1], w.ctypes.data, w.shape[0], y.ctypes.data)
    return y


def matmul_nt(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w.T: the compiled kernel for decode-sized x where available, BLAS otherwise."""
    if 0 < x.shape[0] <= MAX_KERNEL_ROWS and _load() is not None:
        # lean_backend's dequantized blocks may be column slices of a padded matrix
        return kernel_rows_matmul(x, np.ascontiguousarray(w, np.float32))
    return x @ w.T  # BLAS reads the transposed view in place


if __name__ == "__main__":  # `make setup` builds the library here, once per source and compiler
    state = status()
    if state["rows_kernel"]:
        print(f"numpy backend: compiled {state['rows_kernel']} kernel for steps of <= {state['max_rows']} rows ({build()})")
    else:  # setup goes on: the numpy backend falls back to BLAS
        print(f"warning: numpy backend without its compiled kernel ({state['reason']}); BLAS for every step", file=sys.stderr)
