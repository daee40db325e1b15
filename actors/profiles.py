"""Browser and device profiles for simulated tabs: WebGPU limits and features, memory, speed, visibility.

Every value says where it comes from. Three kinds of source:

* [spec]      the WebGPU specification's default limits (https://www.w3.org/TR/webgpu/#limits,
              "Limit" table, default column), as kernels.limits.WEBGPU_DEFAULT_LIMITS holds them.
* [measured]  seen on this project's machines (headless Chromium 156 with SwiftShader; lavapipe;
              an H100 through wgpu/Vulkan).
* [report]    published adapter reports (webgpureport.org entries for the named browser and GPU
              family) and browser release notes; quoted from memory of those pages, not re-fetched
              here -- re-check before relying on an exact value.
* [assumption] invented for the simulation, chosen to be plausible; labelled as such.

How a profile is applied to a Python tab (actors/tab.py): the limits are requested from the
native adapter with kernels.runner.get_device(limits=...), which never grants more than either
the profile or the adapter (lavapipe: 1024 invocations, 128 MiB bindings), so a kernel that
would break on that browser breaks here. Features are reported in the tab's capabilities; the
kernels request none (no shader-f16, no subgroups), so a feature gap cannot break them.
Memory caps the tab's weight budget (TabWorker.memory_bytes). Speed scales step time
(actors/faults.slow_down by 1 / speed; 1.0 = this host's full speed). `hidden` tabs compute slower
and send heartbeats with a background tab's timer jitter (see HIDDEN below). `network` is the
link between the tab and the coordinator (NETWORKS below: one-way latency, jitter, bandwidth),
applied to every frame the tab sends and receives (actors/network.py); a device profile's
default is `loopback` (no delay: the tab on the coordinator's host), and a scenario's tab group
or a SimulatedTab names another.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from kernels.limits import WEBGPU_DEFAULT_LIMITS
from protocol.errors import ConfigError

MiB, GiB = 1 << 20, 1 << 30

# [spec] WebGPU default limits, the floor every conformant browser grants: the ones a profile
# varies (the kernels' buffer and workgroup sizes)
SPEC_DEFAULTS = {name: WEBGPU_DEFAULT_LIMITS[name] for name in (
    "max-storage-buffer-binding-size", "max-buffer-size", "max-compute-workgroup-storage-size",
    "max-compute-invocations-per-workgroup", "max-compute-workgroup-size-x", "max-compute-workgroup-size-y",
    "max-compute-workgroup-size-z", "max-compute-workgroups-per-dimension")}


@dataclass(frozen=True)
class NetworkProfile:
    """The link between a tab and the coordinator, the same both ways."""
    name: str
    latency_ms: float = 0.0  # one way, at rest
    jitter_ms: float = 0.0  # each frame up to this much later (uniform draw); order is kept
    bandwidth_mbps: float | None = None  # megabits per second each way (None: unlimited)
    sources: dict = field(default_factory=dict)

    @property
    def delays(self) -> bool:
        return bool(self.latency_ms or self.jitter_ms or self.bandwidth_mbps)


NETWORKS: dict[str, NetworkProfile] = {n.name: n for n in [
    NetworkProfile("loopback", sources={"all": "the tab on the coordinator's host: no delay added"}),
    NetworkProfile("wired-lan", latency_ms=0.25, jitter_ms=0.1, bandwidth_mbps=940,
                   sources={"latency": "[assumption] gigabit Ethernet through one switch: 0.3-0.6 ms ping (RTT)",
                            "bandwidth": "[report] TCP goodput on 1000BASE-T tops out near 940 Mbit/s"}),
    NetworkProfile("wifi-laptop", latency_ms=2.0, jitter_ms=3.0, bandwidth_mbps=300,
                   sources={"latency": "[assumption] a laptop near a Wi-Fi 5/6 access point: 3-10 ms ping, "
                                       "spikes when the channel is busy",
                            "bandwidth": "[assumption] 300 Mbit/s of TCP at a few metres (802.11ac 2x2)"}),
    NetworkProfile("phone-wifi", latency_ms=6.0, jitter_ms=8.0, bandwidth_mbps=80,
                   sources={"latency": "[assumption] a phone on Wi-Fi: Wi-Fi power save holds frames for the next "
                                       "beacon or wake; 12-30 ms ping typical, so >= 12 ms RTT",
                            "bandwidth": "[assumption] 80 Mbit/s: a 1x1 phone radio through walls"}),
    NetworkProfile("phone-lte", latency_ms=25.0, jitter_ms=15.0, bandwidth_mbps=20,
                   sources={"latency": "[report] LTE round trips of 40-80 ms in operators' published medians",
                            "bandwidth": "[assumption] 20 Mbit/s uplink and downlink"}),
]}
LOOPBACK = NETWORKS["loopback"]


def get_network(spec) -> NetworkProfile:
    """A network by name (NETWORKS), or a table of latency_ms, jitter_ms and bandwidth_mbps
    (an optional name): values checked here, once, with the field named in the error."""
    if isinstance(spec, NetworkProfile):
        return spec
    if isinstance(spec, str):
        try:
            return NETWORKS[spec]
        except KeyError:
            raise ConfigError(f"unknown network {spec!r}; known networks: {', '.join(sorted(NETWORKS))}, "
                              f"or a table of latency_ms, jitter_ms, bandwidth_mbps") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"network must be a name or a table of latency_ms, jitter_ms, bandwidth_mbps; got {spec!r}")
    unknown = set(spec) - {"name", "latency_ms", "jitter_ms", "bandwidth_mbps"}
    if unknown:
        raise ConfigError(f"network: unknown setting(s) {', '.join(sorted(unknown))}; "
                          f"known: name, latency_ms, jitter_ms, bandwidth_mbps")
    values = {}
    for key, lo, limit in (("latency_ms", 0.0, 60_000.0), ("jitter_ms", 0.0, 60_000.0), ("bandwidth_mbps", 0.0, 1e6)):
        v = spec.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= limit \
                or (key == "bandwidth_mbps" and v == 0):
            bound = "> 0" if key == "bandwidth_mbps" else ">= 0"
            raise ConfigError(f"network.{key} must be a number {bound} and at most {limit:g}, got {v!r}")
        values[key] = float(v)
    name = spec.get("name", "custom")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"network.name must be a non-empty string, got {name!r}")
    return NetworkProfile(name, **values)


@dataclass(frozen=True)
class Profile:
    name: str
    browser: str
    limits: dict = field(default_factory=dict)  # WebGPU limits (runner names); {} = no WebGPU
    features: tuple = ()
    memory_bytes: int = 2 * GiB  # weight budget the tab may hold
    speed: float = 1.0  # relative to this host's full speed
    hidden: bool = False
    backend: str = "wgpu"  # what the browser would run: wgpu (WebGPU) or numpy (the WASM/CPU stand-in)
    sources: dict = field(default_factory=dict)
    network: NetworkProfile = LOOPBACK

    @property
    def webgpu(self) -> bool:
        return bool(self.limits)

    def with_(self, **changes) -> "Profile":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["features"] = list(self.features)
        return d


def _limits(**over) -> dict:
    out = dict(SPEC_DEFAULTS)
    out.update({k.replace("_", "-"): v for k, v in over.items()})
    return out


PROFILES: dict[str, Profile] = {p.name: p for p in [
    Profile(
        "chrome-desktop-discrete", "Chrome/Edge 130+ on Windows, discrete NVIDIA GPU (D3D12)",
        limits=_limits(max_storage_buffer_binding_size=2 * GiB - 4, max_buffer_size=2 * GiB,
                       max_compute_workgroup_storage_size=32768, max_compute_invocations_per_workgroup=1024,
                       max_compute_workgroup_size_x=1024, max_compute_workgroup_size_y=1024),
        features=("shader-f16", "subgroups", "timestamp-query"),
        memory_bytes=4 * GiB, speed=1.0,
        sources={"limits": "[report] webgpureport.org, Chrome/Windows NVIDIA entries (D3D12: 32 KiB groupshared, 1024 threads)",
                 "features": "[report] shader-f16 shipped in Chrome 120, subgroups in Chrome 134 release notes",
                 "memory": "[assumption] 4 GiB per tab: the seed's '7B in tabs of 4 GB' figure",
                 "speed": "[assumption] the reference tab = 1.0"}),
    Profile(
        "chrome-desktop-integrated", "Chrome/Edge on Windows/ChromeOS, integrated Intel GPU",
        limits=_limits(max_storage_buffer_binding_size=1 * GiB, max_buffer_size=1 * GiB,
                       max_compute_workgroup_storage_size=32768, max_compute_invocations_per_workgroup=1024,
                       max_compute_workgroup_size_x=1024, max_compute_workgroup_size_y=1024),
        features=("shader-f16", "subgroups", "timestamp-query"),
        memory_bytes=2 * GiB, speed=0.35,
        sources={"limits": "[report] webgpureport.org, Chrome Intel UHD/Iris Xe entries (approximate)",
                 "memory": "[assumption] integrated GPUs share system RAM; 2 GiB per tab",
                 "speed": "[assumption] ~1/3 of a discrete GPU for memory-bound matvec"}),
    Profile(
        "firefox-desktop", "Firefox 141+ on Windows (WebGPU via wgpu)",
        limits=_limits(max_storage_buffer_binding_size=1 * GiB, max_buffer_size=1 * GiB,
                       max_compute_workgroup_storage_size=16384, max_compute_invocations_per_workgroup=256),
        features=("timestamp-query",),
        memory_bytes=2 * GiB, speed=0.6,
        sources={"availability": "[report] Firefox 141 release notes (July 2025): WebGPU enabled on Windows",
                 "limits": "[assumption] spec defaults for invocations/storage, 1 GiB bindings",
                 "features": "[assumption] no shader-f16 at launch",
                 "memory": "[assumption]", "speed": "[assumption]"}),
    Profile(
        "safari-macos", "Safari 26 on macOS, Apple silicon (Metal)",
        limits=_limits(max_storage_buffer_binding_size=1 * GiB, max_buffer_size=1 * GiB,
                       max_compute_workgroup_storage_size=32768, max_compute_invocations_per_workgroup=1024,
                       max_compute_workgroup_size_x=1024, max_compute_workgroup_size_y=1024),
        features=("shader-f16", "timestamp-query"),
        memory_bytes=4 * GiB, speed=0.8,
        sources={"availability": "[report] Safari 26 release notes (WWDC 2025): WebGPU on by default",
                 "limits": "[report] Metal: 32 KiB threadgroup memory, 1024 threads per threadgroup on Apple GPUs; "
                           "[assumption] WebKit's 1 GiB binding cap",
                 "memory": "[assumption] unified memory, 4 GiB per tab", "speed": "[assumption]"}),
    Profile(
        "safari-ios", "Safari 26 on iOS/iPadOS (Metal, mobile)",
        limits=_limits(max_storage_buffer_binding_size=256 * MiB, max_buffer_size=256 * MiB,
                       max_compute_workgroup_storage_size=16384, max_compute_invocations_per_workgroup=256),
        features=("shader-f16",),
        memory_bytes=1 * GiB, speed=0.3,
        sources={"availability": "[report] Safari 26 release notes: WebGPU on iOS 26",
                 "limits": "[assumption] spec defaults for compute, 256 MiB bindings",
                 "memory": "[assumption] iOS Jetsam ends web content processes around 1.5 GB; 1 GiB of weights",
                 "speed": "[assumption]"}),
    Profile(
        "chrome-android", "Chrome 121+ on Android (Qualcomm Adreno / ARM Mali, Vulkan)",
        limits=_limits(),  # spec defaults
        features=(),
        memory_bytes=1 * GiB, speed=0.15,
        sources={"availability": "[report] Chrome 121 release notes (Jan 2024): WebGPU on Android 12+",
                 "limits": "[spec] defaults; WebLLM #209 reports Android adapters at the 128 MiB binding floor",
                 "memory": "[assumption] Android kills background tabs early; 1 GiB",
                 "speed": "[assumption]"}),
    Profile(
        "chromium-swiftshader", "headless Chromium 156, SwiftShader fallback adapter",
        limits=_limits(max_storage_buffer_binding_size=1 * GiB, max_buffer_size=1 * GiB),
        features=("subgroups", "timestamp-query"),
        memory_bytes=2 * GiB, speed=0.3,
        sources={"limits": "[measured] headless Chromium with SwiftShader: 1 GiB bindings, 256 invocations, no shader-f16",
                 "speed": "[measured] SwiftShader: 1-1.5 GFLOP/s matvec vs 3.5-4 on lavapipe (x0.3)",
                 "memory": "[assumption]"}),
    Profile(
        "cpu-wasm", "any browser without WebGPU: WASM SIMD fallback",
        limits={}, features=(), backend="numpy",
        memory_bytes=2 * GiB, speed=0.25,
        sources={"limits": "no WebGPU adapter: the tab runs the CPU path (numpy stands in for WASM SIMD)",
                 "memory": "[report] wasm32 linear memory tops out at 4 GiB; [assumption] 2 GiB of weights",
                 "speed": "[report] wllama: WASM ~3-4x slower than native CPU -> 0.25"}),
]}

# Hidden tabs. Chrome throttles a hidden page's main-thread timers (1/s after 5 min; once a
# minute under intensive throttling: https://developer.chrome.com/blog/timer-throttling-in-chrome-88)
# but not a dedicated Web Worker's, which is where the browser tab keeps its socket, heartbeat
# and compute (tab_worker/web/client.js). What remains is timer jitter and slower, lower-priority compute:
HIDDEN = {
    "heartbeat_jitter_ms": 200,  # [assumption] each heartbeat up to this late (background scheduling)
    "speed_factor": 0.5,  # [assumption] a background tab's GPU/CPU work gets half the throughput
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown profile {name!r}; known profiles: {', '.join(sorted(PROFILES))}") from None
