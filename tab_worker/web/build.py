"""Build the browser tab's assets into tab_worker/web/dist/ (git-ignored; served by the
coordinator at /tab, shipped in the wheel as package data).

    npm ci                                  # at the repo root: @msgpack/msgpack (package.json)
    python tab_worker/web/build.py          # needs clang + lld (Debian: clang lld, 14)

Steps: copy the page and worker sources; copy @msgpack/msgpack's ESM build from node_modules
into dist/vendor/msgpack/ (no bundler needed: the browser loads ES modules); compile the CPU
workers' one kernel source, kernels/c/packed_kernels.c (the same file the Python worker
compiles natively), with clang --target=wasm32 -msimd128 into dist/kernels.wasm. A missing
clang is not fatal (the tab then runs plain JS, and says so), a missing msgpack is.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

WEB = Path(__file__).resolve().parent
DIST = WEB / "dist"
KERNEL_SOURCE = WEB.parents[1] / "kernels" / "c" / "packed_kernels.c"
SOURCES = ("*.js", "*.html", "*.css")


def find_msgpack() -> Path:
    for base in (WEB, *WEB.parents):
        esm = base / "node_modules" / "@msgpack" / "msgpack" / "dist.esm"
        if esm.is_dir():
            return esm
    raise SystemExit("node_modules/@msgpack/msgpack not found: run `npm ci` at the repo root first")


def find_clang() -> str | None:
    for name in ("clang", "clang-14", "clang-15", "clang-16"):
        path = shutil.which(name)
        if path:
            return path
    return None


def build_wasm(out: Path) -> bool:
    clang = find_clang()
    if clang is None:
        print("warning: clang not found: no WASM build (tabs fall back to plain JS); apt-get install clang lld", file=sys.stderr)
        return False
    # bulk memory: zeroed accumulators become memory.fill, not calls to a memset -nostdlib lacks;
    # JS allocates weights and scratch from __heap_base up (below it: the C data and stack)
    cmd = [clang, "--target=wasm32", "-O3", "-msimd128", "-mbulk-memory", "-nostdlib", "-Wl,--no-entry",
           "-Wl,--import-memory", "-Wl,--export-dynamic", "-Wl,--export=__heap_base", "-o", str(out), str(KERNEL_SOURCE)]
    subprocess.run(cmd, check=True)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--require-wasm", action="store_true", help="fail when clang is missing")
    a = ap.parse_args(argv)
    if DIST.exists():
        shutil.rmtree(DIST)
    DIST.mkdir()
    for pattern in SOURCES:
        for f in WEB.glob(pattern):
            shutil.copy2(f, DIST / f.name)
    shutil.copytree(find_msgpack(), DIST / "vendor" / "msgpack", ignore=shutil.ignore_patterns("*.map", "*.d.ts", "*.tsbuildinfo"))
    (DIST / "package.json").write_text('{"type": "module"}\n')  # node (tests) loads dist/*.js as ES modules
    ok = build_wasm(DIST / "kernels.wasm")
    if not ok and a.require_wasm:
        return 1
    print(f"built {DIST} ({'with' if ok else 'without'} WASM)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
