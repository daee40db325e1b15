"""kernels"""
from __future__ import annotations

import re
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent
_INCLUDE = re.compile(r'^// #include "(\w+)\.wgsl"$', re.M)


def wgsl_source(name: str) -> str:
    """kernels/NAME.wgsl with each `// #include "X.wgsl"` line replaced by kernels/include/X.wgsl
    (WGSL has no include; the kernels that share helpers or a whole body keep them there). The
    native runner compiles this and the coordinator serves it to the browser tabs, so both run
    the same text."""
    text = (KERNEL_DIR / f"{name}.wgsl").read_text()
    for _ in range(8):  # an include may include another (each once: a loop would stop here)
        expanded = _INCLUDE.sub(lambda m: (KERNEL_DIR / "include" / f"{m.group(1)}.wgsl").read_text(), text)
        if expanded == text:
            return text
        text = expanded
    raise ValueError(f"kernels/{name}.wgsl: includes nested deeper than 8 (an include cycle?)")
