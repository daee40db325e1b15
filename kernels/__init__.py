"""kernels"""
from __future__ import annotations

import re
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent
_INCLUDE = re.compile(r'^// #include "(\w+)\.wgsl"$', re.M)
# Chromium's Tint takes subgroup builtins only after `enable subgroups;`, which wgpu-native's naga
# refuses ("not yet supported"): the browser's text gets the line, the native text does not.
_SUBGROUP_USE = re.compile(r"@builtin\(\s*subgroup_\w+\s*\)|\b(?:subgroup|quad)[A-Z]\w*\s*\(")
_COMMENT = re.compile(r"//[^\n]*")


# Kernel variants: NAME+VARIANT is kernels/NAME.wgsl with these includes swapped for their twins.
VARIANT_INCLUDES = {"subgroup": {"sum_partials": "sum_partials_subgroup"}}


def wgsl_source(name: str, for_browser: bool = False) -> str:
    """kernels/NAME.wgsl with each `// #include "X.wgsl"` line replaced by kernels/include/X.wgsl
    (WGSL has no include; the kernels that share helpers or a whole body keep them there). The
    native runner compiles this and the coordinator serves it to the browser tabs, so both run
    the same text. NAME+VARIANT (VARIANT_INCLUDES) is NAME with the variant's includes swapped:
    ``qmatvec+subgroup`` sums its lanes with subgroup shuffles. ``for_browser``: the text a browser
    tab gets, `enable subgroups;` first where it uses subgroup builtins (the only difference).
    NAME may be a path under kernels/ (``probes/subgroup_size``)."""
    base, *variants = name.split("+")
    swaps: dict[str, str] = {}
    for variant in variants:
        if variant not in VARIANT_INCLUDES:
            raise ValueError(f"kernel {name!r}: unknown variant {variant!r} (known: {sorted(VARIANT_INCLUDES)})")
        swaps.update(VARIANT_INCLUDES[variant])

    def include(m: re.Match) -> str:
        return (KERNEL_DIR / "include" / f"{swaps.get(m.group(1), m.group(1))}.wgsl").read_text()

    text = (KERNEL_DIR / f"{base}.wgsl").read_text()
    for _ in range(8):  # an include may include another (each once: a loop would stop here)
        expanded = _INCLUDE.sub(include, text)
        if expanded == text:
            if for_browser and _SUBGROUP_USE.search(_COMMENT.sub("", text)):
                return "enable subgroups;\n" + text
            return text
        text = expanded
    raise ValueError(f"kernels/{name}.wgsl: includes nested deeper than 8 (an include cycle?)")
