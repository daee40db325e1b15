"""Which WebGPU adapter a process computes on.

A host may have several adapters: one per GPU, and the same GPU again through another API
(Vulkan and OpenGL on Linux), plus CPU rasterisers (lavapipe/llvmpipe). wgpu's own choice is
"the first high-performance adapter", so every worker process on a multi-GPU host lands on
the same GPU; and Vulkan ignores ``CUDA_VISIBLE_DEVICES``, the variable that Ray sets to give an
actor its GPU. This module is the one place that decides:

* ``choose(spec)`` picks the adapter for the rest of the process, by index into
  ``list_adapters()`` or by a case-insensitive part of its name (``tabshard worker --adapter``,
  the simulated tab's ``adapter`` option). ``TABSHARD_ADAPTER`` in the environment does the same.
* ``index_for_gpu(gpu_id, adapters)`` maps a GPU that Ray assigned (``ray.get_gpu_ids()``) to an
  adapter. wgpu-native 29 exposes neither the PCI bus id nor the UUID of an adapter, so the map
  is by enumeration order among the host's GPU adapters of one API (Vulkan first), which is the
  order in which both the NVIDIA Vulkan driver and CUDA's PCI_BUS_ID order list identical
  cards; the result says how it was matched so that a log can show it.

``Device`` (kernels/runner.py) asks ``request_adapter`` for its adapter; nothing else here holds
state but the process-wide choice.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

ENV = "TABSHARD_ADAPTER"
_choice: str | None = None  # set by choose(); None: the environment, then wgpu's default


class AdapterChoiceError(ValueError):
    """The requested adapter does not exist on this host, or the request names several."""


@dataclass(frozen=True)
class AdapterInfo:
    index: int          # position in list_adapters(): what --adapter INDEX means
    name: str           # the device's name as the driver reports it
    adapter_type: str   # DiscreteGPU, IntegratedGPU, VirtualGPU, CPU, Unknown
    backend: str        # Vulkan, OpenGL, Metal, D3D12
    vendor_id: int
    device_id: int

    @property
    def is_gpu(self) -> bool:
        return self.adapter_type in ("DiscreteGPU", "IntegratedGPU", "VirtualGPU")

    def describe(self) -> str:
        return f"[{self.index}] {self.name} ({self.adapter_type}) via {self.backend}"


def _enumerate():
    import wgpu

    return list(wgpu.gpu.enumerate_adapters_sync())


def _info(index: int, adapter) -> AdapterInfo:
    info = dict(adapter.info)
    return AdapterInfo(index, str(info.get("device", "?")), str(info.get("adapter_type", "Unknown")),
                       str(info.get("backend_type", "?")), int(info.get("vendor_id", 0) or 0),
                       int(info.get("device_id", 0) or 0))


def list_adapters() -> list[AdapterInfo]:
    """Every adapter of this host, in wgpu's enumeration order (the indices --adapter takes)."""
    return [_info(i, a) for i, a in enumerate(_enumerate())]


def choose(spec: str | int | None) -> None:
    """Use this adapter (an index into list_adapters() or part of its name) for every Device
    this process creates from now on; None goes back to the environment / wgpu's default."""
    global _choice
    _choice = None if spec is None or str(spec).strip() == "" else str(spec).strip()


def current_choice() -> str | None:
    return _choice if _choice is not None else (os.environ.get(ENV) or None)


def resolve(spec: str | int, adapters: list[AdapterInfo]) -> int:
    """The index of the adapter that ``spec`` names. An integer (or digits) is an index; anything
    else must match exactly one adapter's name (case-insensitive substring), preferring Vulkan
    when the same device appears through several APIs."""
    text = str(spec).strip()
    if text.lstrip("-").isdigit():
        i = int(text)
        if not 0 <= i < len(adapters):
            raise AdapterChoiceError(f"adapter index {i} does not exist: this host has {len(adapters)} "
                                     f"adapter(s): {'; '.join(a.describe() for a in adapters) or 'none'}")
        return i
    found = [a for a in adapters if text.lower() in a.name.lower()]
    if len({a.name for a in found}) == 1 and len({a.backend for a in found}) == len(found) > 1:
        found = sorted(found, key=lambda a: (a.backend != "Vulkan", a.index))[:1]  # one device through several APIs
    if len(found) != 1:
        what = "no adapter" if not found else f"{len(found)} adapters"
        raise AdapterChoiceError(f"{what} match {text!r}; use an index: "
                                 f"{'; '.join(a.describe() for a in adapters) or 'none'}")
    return found[0].index


def gpu_adapters(adapters: list[AdapterInfo]) -> list[AdapterInfo]:
    """The host's GPUs, each once: the adapters of the API that lists the most GPUs (Vulkan on
    a tie), in enumeration order."""
    return _one_api([a for a in adapters if a.is_gpu])


def _one_api(adapters: list[AdapterInfo]) -> list[AdapterInfo]:
    by_backend: dict[str, list[AdapterInfo]] = {}
    for a in adapters:
        by_backend.setdefault(a.backend, []).append(a)
    if not by_backend:
        return []
    best = max(by_backend, key=lambda b: (len(by_backend[b]), b == "Vulkan"))
    return by_backend[best]


def index_for_gpu(gpu_id: int | str, adapters: list[AdapterInfo]) -> tuple[int, str]:
    """The adapter of the GPU that Ray numbered ``gpu_id`` on this node, and how it was matched.
    On a host with no GPU adapter (Ray's GPUs declared for a test on a CPU machine), the CPU
    rasterisers of one API stand in, in the same order, and the answer says so."""
    gpus, stand_in = gpu_adapters(adapters), False
    if not gpus:
        gpus, stand_in = _one_api(adapters), True
    k = int(gpu_id)
    if not 0 <= k < len(gpus):
        raise AdapterChoiceError(
            f"Ray assigned GPU {k}, but this host's WebGPU sees {len(gpus)} "
            + ("adapter(s) and no GPU" if stand_in else "GPU adapter(s)")
            + (f": {'; '.join(a.describe() for a in gpus)}" if gpus else ""))
    how = f"Ray GPU {k} -> adapter {gpus[k].describe()} by enumeration order (wgpu's adapter info has no PCI bus id)"
    return gpus[k].index, how + (" -- no GPU adapter on this host: a CPU rasteriser stands in" if stand_in else "")


def request_adapter(power_preference: str = "high-performance"):
    """The wgpu adapter a new Device should use: the chosen one, else wgpu's default."""
    spec = current_choice()
    if spec is None:
        import wgpu

        return wgpu.gpu.request_adapter_sync(power_preference=power_preference)
    raw = _enumerate()
    return raw[resolve(spec, [_info(i, a) for i, a in enumerate(raw)])]
