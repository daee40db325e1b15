"""The native wgpu-py runner: one ``Device`` (adapter, device, limits, pipeline cache, buffer
helpers) and one launcher per kernel that binds buffers once and is then recorded into many
compute passes.

Every kernel is ``kernels/NAME.wgsl`` with an ``override`` for each compile-time choice
(quant format, workgroup size) and a ``struct Params`` uniform at binding 0, followed by its
storage buffers in binding order. The Python side reads the Params field list from the WGSL
itself, so a launcher passes ``name=value`` pairs and the layout lives in one place; a
browser worker loads the very same files the same way.

Hot path (PLATFORM.md): pipelines are built once per (kernel, overrides); bind groups and
params buffers once per launcher; a caller plans its launchers at a row count once
(``Device.plan``: a list of native handles and grid sizes), replays the plan into one compute
pass (``Device.execute``, which may cut it into a few command buffers submitted as they are
recorded) and reads back once, through a persistent mappable buffer in the same submission.
"""
from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kernels import wgsl_source
from kernels.quant import QuantTensor

KERNEL_DIR = Path(__file__).resolve().parent

# The WebGPU specification's default limits: what every conformant browser grants without
# asking. "min-*" limits are alignments (smaller is better), every other one a maximum.
WEBGPU_DEFAULT_LIMITS = {
    "max-buffer-size": 256 * 2**20,
    "max-storage-buffer-binding-size": 128 * 2**20,
    "max-uniform-buffer-binding-size": 64 * 2**10,
    "max-compute-workgroup-storage-size": 16384,
    "max-compute-invocations-per-workgroup": 256,
    "max-compute-workgroup-size-x": 256,
    "max-compute-workgroup-size-y": 256,
    "max-compute-workgroup-size-z": 64,
    "max-compute-workgroups-per-dimension": 65535,
    "max-storage-buffers-per-shader-stage": 8,
    "max-uniform-buffers-per-shader-stage": 12,
    "max-bind-groups": 4,
    "max-bindings-per-bind-group": 1000,
    "min-storage-buffer-offset-alignment": 256,
    "min-uniform-buffer-offset-alignment": 256,
}

# Features a Device asks for where its adapter has them.
OPTIONAL_FEATURES = ("shader-f16",)

# Words in an adapter's description that mean "a CPU rasteriser, not a GPU".
SOFTWARE_ADAPTERS = ("llvmpipe", "lavapipe", "swiftshader", "softpipe", "microsoft basic render")


class NoAdapterError(RuntimeError):
    """No WebGPU adapter on this host (no Vulkan/Metal/DX12 driver, not even lavapipe)."""


class LimitError(ValueError):
    """A request that this device's limits cannot hold."""


def _eval_wgsl_int(expr: str, names: dict) -> int:
    """An integer override expression of our kernels (literals, names, + - * / % ( ))."""
    py = re.sub(r"\b(\d+)[ui]\b", r"\1", expr.strip()).replace("/", "//")
    py = re.sub(r"\btrue\b", "1", re.sub(r"\bfalse\b", "0", py))
    if not re.fullmatch(r"[\w\s+\-*/%()]*", py):
        raise ValueError(f"cannot evaluate WGSL expression {expr!r}")
    return int(eval(py, {"__builtins__": {}}, dict(names)))


def _wgsl_type_size(type_: str, names: dict) -> int:
    """Bytes of a WGSL type as our workgroup variables use them (host-shareable layout)."""
    m = re.fullmatch(r"array<\s*(.+)\s*,\s*([^,<>]+)>", type_)
    if m:
        elem = m.group(1).strip()
        align = 16 if elem.startswith(("vec3", "vec4", "mat")) else (8 if elem.startswith("vec2") else 4)
        return -(-_wgsl_type_size(elem, names) // align) * align * _eval_wgsl_int(m.group(2), names)
    scalar = {"f32": 4, "u32": 4, "i32": 4, "f16": 2, "bool": 4, "atomic<u32>": 4, "atomic<i32>": 4}
    if type_ in scalar:
        return scalar[type_]
    m = re.fullmatch(r"vec([234])<(\w+)>", type_)
    if m:
        return {2: 8, 3: 16, 4: 16}[int(m.group(1))] * scalar[m.group(2)] // 4
    m = re.fullmatch(r"mat([234])x([234])<f32>", type_)
    if m:
        return int(m.group(1)) * _wgsl_type_size(f"vec{m.group(2)}<f32>", names)
    raise ValueError(f"unknown WGSL type {type_!r}")


def _better(key: str, a: int, b: int) -> int:
    return min(a, b) if key.startswith("min-") else max(a, b)


def _worse(key: str, a: int, b: int) -> int:
    return max(a, b) if key.startswith("min-") else min(a, b)


WAIT_IN_CALLER = True  # Device.execute's readback: wgpuDevicePoll(wait) in the caller before mapping


class Device:
    """A wgpu device and what our kernels need to know about it.

    ``limits``: ``"adapter"`` asks for the adapter's best values of WEBGPU_DEFAULT_LIMITS'
    keys (wgpu would otherwise cap buffers at 256 MiB); ``"webgpu-default"`` asks for the
    spec defaults, to prove kernels run under any conformant browser; a dict gives explicit
    values (a simulated browser's profile), keys it leaves out take the spec defaults.
    ``self.limits`` holds the limits the kernels plan with: never better than requested,
    even where the driver grants more, so a simulated profile is honoured exactly (values
    below the spec default are planned with, though the driver is asked for the default).
    """

    def __init__(self, limits: str | dict = "adapter", power_preference: str = "high-performance"):
        try:
            import wgpu
        except ImportError as exc:  # pragma: no cover - wgpu is a dependency
            raise NoAdapterError(f"wgpu is not installed: {exc}") from None
        self._wgpu = wgpu
        try:
            from kernels.adapters import request_adapter

            self.adapter = request_adapter(power_preference)  # the process's chosen adapter, else wgpu's default
        except Exception as exc:
            raise NoAdapterError(f"no WebGPU adapter: {exc}") from None
        if self.adapter is None:
            raise NoAdapterError("no WebGPU adapter")
        adapter_limits = dict(self.adapter.limits)
        if limits == "adapter":
            wanted = {k: adapter_limits.get(k, v) for k, v in WEBGPU_DEFAULT_LIMITS.items()}
        elif limits == "webgpu-default":
            wanted = dict(WEBGPU_DEFAULT_LIMITS)
        elif isinstance(limits, dict):
            wanted = {**WEBGPU_DEFAULT_LIMITS, **limits}
        else:
            raise ValueError(f"limits must be 'adapter', 'webgpu-default' or a dict, got {limits!r}")
        # plan with what was asked, but never more than the adapter has
        self.limits = {k: _worse(k, v, adapter_limits.get(k, v)) for k, v in wanted.items()}
        # the driver is asked for at least the spec default (WebGPU grants no less anyway)
        required = {k: _worse(k, _better(k, v, WEBGPU_DEFAULT_LIMITS[k]), adapter_limits.get(k, v))
                    for k, v in self.limits.items() if k in WEBGPU_DEFAULT_LIMITS}
        # shader-f16 wherever the adapter has it: the NAME_f16.wgsl kernels need it, and asking
        # costs the f32 kernels nothing (Chromium's SwiftShader lacks it: browsers stay f32)
        features = [f for f in OPTIONAL_FEATURES if f in self.adapter.features]
        self.device = self.adapter.request_device_sync(required_features=features, required_limits=required)
        self.queue = self.device.queue
        self.features = set(self.device.features)
        self._modules: dict[str, object] = {}
        self._pipelines: dict[tuple, object] = {}
        self._params: dict[str, list[tuple[str, str]]] = {}

    # ------------------------------------------------------------------ description
    @property
    def adapter_info(self) -> dict:
        info = dict(self.adapter.info)
        info["is_fallback"] = info.get("adapter_type") == "CPU" or not self.is_real_gpu()
        return info

    def is_real_gpu(self) -> bool:
        """False for CPU rasterisers (lavapipe/llvmpipe, SwiftShader, ...): there numpy is faster."""
        info = dict(self.adapter.info)
        text = " ".join(str(info.get(k, "")) for k in ("device", "description", "vendor")).lower()
        return info.get("adapter_type") in ("DiscreteGPU", "IntegratedGPU", "VirtualGPU") and not any(
            s in text for s in SOFTWARE_ADAPTERS)

    def describe(self) -> str:
        info = self.adapter.info
        return f"{info.get('device', '?')} ({info.get('adapter_type', '?')}) via {info.get('backend_type', '?')}"

    @property
    def max_binding(self) -> int:
        return min(self.limits["max-storage-buffer-binding-size"], self.limits["max-buffer-size"])

    def workgroup_size(self, preferred: int) -> int:
        """The largest power of two <= preferred that the limits allow in x."""
        cap = min(preferred, self.limits["max-compute-invocations-per-workgroup"],
                  self.limits["max-compute-workgroup-size-x"])
        return 1 << (cap.bit_length() - 1)

    # ------------------------------------------------------------------ kernels
    def source(self, kernel: str) -> str:
        return wgsl_source(kernel)

    def pipeline(self, kernel: str, **constants):
        """The compute pipeline of kernel.wgsl's ``main`` with these override values, built once.
        Raises LimitError where a browser's WebGPU would refuse it (see check_workgroup)."""
        key = (kernel, tuple(sorted(constants.items())))
        pipe = self._pipelines.get(key)
        if pipe is None:
            if self.source(kernel).startswith("enable f16;") and "shader-f16" not in self.features:
                raise LimitError(f"{kernel} needs the shader-f16 feature, which this device lacks")
            self.check_workgroup(kernel, constants)
            module = self._modules.get(kernel)
            if module is None:
                module = self._modules[kernel] = self.device.create_shader_module(code=self.source(kernel), label=kernel)
            values = {k: float(v) for k, v in constants.items()}  # bools and ints alike
            pipe = self.device.create_compute_pipeline(
                layout="auto", label=f"{kernel}{key[1]}",
                compute={"module": module, "entry_point": "main", "constants": values})
            self._pipelines[key] = pipe
        return pipe

    def workgroup_shape(self, kernel: str, constants: dict) -> tuple[tuple[int, int, int], int]:
        """((x, y, z) workgroup size, workgroup memory in bytes) of the kernel's ``main`` for
        these override values, read from the WGSL: its ``override`` declarations are
        evaluated in order, then ``@workgroup_size`` and every ``var<workgroup>``."""
        code = re.sub(r"//[^\n]*", "", self.source(kernel))
        values = {k: int(v) for k, v in constants.items()}
        for name, expr in re.findall(r"override\s+(\w+)\s*:\s*\w+\s*=\s*([^;]+);", code):
            if name not in values:
                values[name] = _eval_wgsl_int(expr, values)
        dims = re.search(r"@workgroup_size\(([^)]*)\)", code).group(1).split(",")
        size = [_eval_wgsl_int(d, values) for d in dims if d.strip()] + [1, 1]
        storage = 0
        for type_ in re.findall(r"var<workgroup>\s+\w+\s*:\s*([^;]+);", code):
            storage += -(-_wgsl_type_size(type_.strip(), values) // 16) * 16
        return (size[0], size[1], size[2]), storage

    def check_workgroup(self, kernel: str, constants: dict) -> None:
        """Refuse, as Dawn's createComputePipeline does, a workgroup beyond the device's
        limits. wgpu-native 29 does not check override-sized workgroups (it built a
        1024-invocation, 64 KiB pipeline on a device granted 256 and 16 KiB), so without this
        a kernel that fails in a browser would run here."""
        (x, y, z), storage = self.workgroup_shape(kernel, constants)
        lim = self.limits
        problems = []
        if x * y * z > lim["max-compute-invocations-per-workgroup"]:
            problems.append(f"{x * y * z} invocations > maxComputeInvocationsPerWorkgroup {lim['max-compute-invocations-per-workgroup']}")
        for size, axis in zip((x, y, z), "xyz"):
            if size > lim[f"max-compute-workgroup-size-{axis}"]:
                problems.append(f"size {axis} {size} > maxComputeWorkgroupSize{axis.upper()} {lim[f'max-compute-workgroup-size-{axis}']}")
        if storage > lim["max-compute-workgroup-storage-size"]:
            problems.append(f"{storage} bytes of workgroup memory > maxComputeWorkgroupStorageSize {lim['max-compute-workgroup-storage-size']}")
        if problems:
            raise LimitError(f"{kernel}{constants}: " + "; ".join(problems))

    def params_fields(self, kernel: str) -> list[tuple[str, str]]:
        """[(name, wgsl type)] of the kernel's ``struct Params``, in order."""
        fields = self._params.get(kernel)
        if fields is None:
            code = re.sub(r"//[^\n]*", "", self.source(kernel))
            body = re.search(r"struct\s+Params\s*\{(.*?)\}", code, re.S)
            fields = self._params[kernel] = re.findall(r"(\w+)\s*:\s*(u32|i32|f32)", body.group(1)) if body else []
        return fields

    def pack_params(self, kernel: str, values: dict) -> bytes:
        fields = self.params_fields(kernel)
        names = [n for n, _ in fields]
        if sorted(names) != sorted(values):
            raise TypeError(f"{kernel} params are {names}, got {sorted(values)}")
        fmt = "<" + "".join({"u32": "I", "i32": "i", "f32": "f"}[t] for _, t in fields)
        data = struct.pack(fmt, *(values[n] for n in names))
        return data + bytes(-len(data) % 16)

    # ------------------------------------------------------------------ buffers
    def buffer(self, nbytes: int, label: str = "", uniform: bool = False):
        """A zero-filled storage (or uniform) buffer; size rounded up to 16 bytes."""
        u = self._wgpu.BufferUsage
        usage = (u.UNIFORM if uniform else u.STORAGE | u.COPY_SRC) | u.COPY_DST
        size = max(16, -(-int(nbytes) // 16) * 16)
        if size > self.limits["max-buffer-size"]:
            raise LimitError(f"buffer {label!r} of {size} bytes exceeds maxBufferSize {self.limits['max-buffer-size']}")
        return self.device.create_buffer(size=size, usage=usage, label=label)

    def upload(self, array: np.ndarray, label: str = ""):
        data = np.ascontiguousarray(array)
        buf = self.buffer(data.nbytes, label)
        if data.nbytes:
            self.queue.write_buffer(buf, 0, data)
        return buf

    def write(self, buf, array: np.ndarray, offset: int = 0) -> None:
        data = np.ascontiguousarray(array)
        if data.nbytes % 4:
            data = np.frombuffer(data.tobytes() + bytes(-data.nbytes % 4), np.uint8)
        self.queue.write_buffer(buf, offset, data)

    def read(self, buf, dtype=np.float32, count: int | None = None, offset: int = 0) -> np.ndarray:
        """Wait for all submitted work and copy ``count`` items of ``dtype`` out of ``buf``."""
        itemsize = np.dtype(dtype).itemsize
        size = buf.size - offset if count is None else count * itemsize
        data = self.queue.read_buffer(buf, offset, -(-size // 4) * 4)
        return np.frombuffer(data, dtype, count=size // itemsize).copy()

    def bind_group(self, pipeline, buffers: list):
        entries = [{"binding": i, "resource": {"buffer": b, "offset": 0, "size": b.size}} for i, b in enumerate(buffers)]
        return self.device.create_bind_group(layout=pipeline.get_bind_group_layout(0), entries=entries)

    # ------------------------------------------------------------------ execution
    def encoder(self):
        return self.device.create_command_encoder()

    def run(self, launchers: list, rows: int, copies: list = (), submit_every: int = 0, readback: list = ()):
        """Record launchers (each ``dispatches(rows)``, see Launcher) into one compute pass,
        then buffer copies (src, dst, nbytes[, dst_offset]), and submit. Does not wait unless
        ``readback`` is given: see ``execute``.

        ``submit_every`` > 0 cuts the pass into command buffers of that many dispatches, each
        submitted as soon as it is recorded, so the GPU starts while Python records the rest."""
        return self.execute(self.plan(launchers, rows), copies, submit_every, readback)

    def plan(self, launchers: list, rows: int) -> list:
        """The dispatches (and in-stream copies) of ``launchers`` at ``rows``, resolved to what
        ``execute`` replays: recording a cached plan costs three native calls per dispatch and
        no Python per launcher. Building it also sets each launcher's rows-dependent params, so
        a plan stays valid until the same launchers are planned at another ``rows``."""
        items = []
        for launcher in launchers:
            items += launcher.dispatches(rows)
        return [item.resolved() if isinstance(item, Dispatch) else item for item in items]

    def execute(self, plan: list, copies: list = (), submit_every: int = 0, readback: list = ()):
        """Replay a plan into one compute pass (cut into command buffers of ``submit_every``
        dispatches, each submitted once recorded), then copies (src, dst, nbytes[, dst_offset]).
        ``readback`` [(src, src_offset, nbytes)]: also copied, in the same command buffer, into
        a persistent mappable buffer; then this waits and returns those bytes concatenated
        (np.uint8, each part at a 4-byte-aligned offset) - one submit and one wait in all."""
        enc = self.device.create_command_encoder()
        cpass = enc.begin_compute_pass()
        raw = _RAW_PASS_CALLS is not None and getattr(cpass, "_internal", None) is not None
        if raw:
            set_pipeline, set_bind_group, dispatch, null = _RAW_PASS_CALLS
            handle = cpass._internal
        count = 0
        for item in plan:
            if item.__class__ is tuple:
                pipe, bg, x, y, z, pipe_obj, bg_obj = item
                if raw:
                    set_pipeline(handle, pipe)
                    set_bind_group(handle, 0, bg, 0, null)
                    dispatch(handle, x, y, z)
                else:
                    cpass.set_pipeline(pipe_obj)
                    cpass.set_bind_group(0, bg_obj)
                    cpass.dispatch_workgroups(x, y, z)
                count += 1
                if submit_every and count % submit_every == 0:
                    cpass.end()
                    self.queue.submit([enc.finish()])
                    enc = self.device.create_command_encoder()
                    cpass = enc.begin_compute_pass()
                    handle = cpass._internal if raw else None
            else:  # a BufferCopy: between two passes of the same encoder
                cpass.end()
                enc.copy_buffer_to_buffer(item.src, item.src_offset, item.dst, item.dst_offset, item.nbytes)
                cpass = enc.begin_compute_pass()
                handle = cpass._internal if raw else None
        cpass.end()
        for src, dst, nbytes, *dst_offset in copies:
            enc.copy_buffer_to_buffer(src, 0, dst, dst_offset[0] if dst_offset else 0, -(-nbytes // 4) * 4)
        total = 0
        if readback:
            sizes = [-(-nbytes // 4) * 4 for _, _, nbytes in readback]
            staging = self._staging_buffer(sum(sizes))
            for (src, src_offset, _), size in zip(readback, sizes):
                if size:
                    enc.copy_buffer_to_buffer(src, src_offset, staging, total, size)
                total += size
        self.queue.submit([enc.finish()])
        if not readback:
            return None
        if not total:
            return np.zeros(0, np.uint8)
        if WAIT_IN_CALLER and hasattr(self.device, "_poll_wait"):
            # block in this thread (the GIL released) until the GPU is done, so that the map
            # below resolves at once instead of after hand-offs to wgpu-py's poll thread
            self.device._poll_wait()
        staging.map_sync(self._wgpu.MapMode.READ, 0, total)
        try:
            return np.frombuffer(staging.read_mapped(0, total, copy=True), np.uint8)
        finally:
            staging.unmap()

    def _staging_buffer(self, nbytes: int):
        """A MAP_READ buffer of at least nbytes, kept for the next readback (grows by doubling)."""
        buf = getattr(self, "_staging", None)
        if buf is None or buf.size < nbytes:
            u = self._wgpu.BufferUsage
            size = max(256, 1 << (max(nbytes, 1) - 1).bit_length())
            buf = self._staging = self.device.create_buffer(size=size, usage=u.MAP_READ | u.COPY_DST, label="staging")
        return buf


_devices: dict[tuple, Device] = {}


def get_device(limits: str | dict = "adapter", power_preference: str = "high-performance") -> Device:
    """One Device per distinct (limits, power_preference) in this process, created on first use:
    backends of several layer ranges share their device, its pipelines and its memory."""
    from kernels.adapters import current_choice

    key = (repr(sorted(limits.items())) if isinstance(limits, dict) else limits, power_preference, current_choice())
    if key not in _devices:
        _devices[key] = Device(limits, power_preference)
    return _devices[key]


def shared_device() -> Device:
    """The process's default Device (the adapter's own limits)."""
    return get_device()


def describe_device(limits: str | dict = "adapter", power_preference: str = "high-performance", device: Device | None = None,
                    **_backend_options) -> dict:
    """What a worker reports about its WebGPU device in its capabilities."""
    dev = device or get_device(limits, power_preference)
    info = dev.adapter_info
    return {
        "adapter": dev.describe(),
        "adapter_type": info.get("adapter_type"),
        "is_real_gpu": dev.is_real_gpu(),
        "is_fallback": info["is_fallback"],
        "features": sorted(dev.features),
        "limits": {k: int(v) for k, v in dev.limits.items()},
    }


# ====================================================================== launchers


def _raw_pass_calls():
    """wgpu-py wraps each native call in an error-capturing proxy costing ~3 us; a forward
    records ~900 of them (set pipeline, set bind group, dispatch per launcher), as much as
    the GPU work of a decode step. Recording into a pass cannot fail in a way we recover
    from (validation errors still surface at finish/submit), so call the native functions
    directly when this wgpu-py exposes them, else fall back to the public API."""
    try:
        from wgpu.backends.wgpu_native._ffi import ffi, lib

        return (lib.wgpuComputePassEncoderSetPipeline, lib.wgpuComputePassEncoderSetBindGroup,
                lib.wgpuComputePassEncoderDispatchWorkgroups, ffi.NULL)
    except (ImportError, AttributeError):  # pragma: no cover - other wgpu-py versions
        return None


_RAW_PASS_CALLS = _raw_pass_calls()


@dataclass(frozen=True)
class BufferCopy:
    """A buffer-to-buffer copy inside a plan: ends the compute pass, copies, begins another."""

    src: object
    src_offset: int
    dst: object
    dst_offset: int
    nbytes: int

    def dispatches(self, rows: int) -> list:
        return [self]


@dataclass(frozen=True)
class Dispatch:
    launch: "Launch"
    x: int
    y: int
    z: int

    def resolved(self) -> tuple:
        """(native pipeline, native bind group, x, y, z, pipeline, bind group) for Device.execute."""
        raw = self.launch._raw or (None, None)
        return (raw[0], raw[1], self.x, self.y, self.z, self.launch.pipeline, self.launch.bind_group)


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
        if _RAW_PASS_CALLS is not None and hasattr(self.pipeline, "_internal") and hasattr(self.bind_group, "_internal"):
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
            set_pipeline, set_bind_group, dispatch, null = _RAW_PASS_CALLS
            set_pipeline(pass_handle, self._raw[0])
            set_bind_group(pass_handle, 0, self._raw[1], 0, null)
            dispatch(pass_handle, x, y, z)
        else:
            cpass.set_pipeline(self.pipeline)
            cpass.set_bind_group(0, self.bind_group)
            cpass.dispatch_workgroups(x, y, z)


def quant_constants(t) -> dict:
    return {"BITS": t.spec.bits, "GROUP": t.spec.group, "SYMMETRIC": t.spec.symmetric}


@dataclass
class GpuQuantTensor:
    """A QuantTensor on the device, split by rows into chunks that each fit one binding:
    chunks are (first row, rows, qweight buffer, scales buffer)."""

    spec: object
    n: int
    k: int
    chunks: list

    @property
    def nbytes(self) -> int:
        return sum(q.size + s.size for _, _, q, s in self.chunks)


def upload_quant(dev: Device, t: QuantTensor, label: str = "") -> GpuQuantTensor:
    row_bytes = max(t.qweight[0].nbytes, t.scales[0].nbytes) if t.n else 1
    rows_per_chunk = min(max(t.n, 1), dev.max_binding // row_bytes, dev.limits["max-compute-workgroups-per-dimension"])
    if rows_per_chunk < 1:
        raise LimitError(f"one row of {label or 'a tensor'} ({row_bytes} bytes) exceeds the binding limit {dev.max_binding}")
    chunks = []
    for start in range(0, t.n, rows_per_chunk):
        part = t.rows(start, min(t.n, start + rows_per_chunk))
        chunks.append((start, part.n, dev.upload(part.qweight, f"{label}.q[{start}]"), dev.upload(part.scales, f"{label}.s[{start}]")))
    return GpuQuantTensor(t.spec, t.n, t.k, chunks)


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


def matmul_tuning(dev: Device) -> MatmulTuning:
    """GPUs want several threads per output (a workgroup reduction); CPU rasterisers
    (lavapipe, SwiftShader) run one invocation per SIMD lane with costly barriers: one
    thread per output, no reduction.

    Both use the row-blocked qmatvec at every batch size: at SmolLM2's shapes it beat the
    tiled qmatmul at every M measured (H200, a4g32, M = 4..512: 1536x576 at M=32 0.037 vs
    0.083 ms, 49152x576 at M=512 7.4 vs 12.9 ms; lavapipe, 3072x576: 2.3 vs <= 1.9 GFLOP/s).
    qmatmul (64x64 tiles, 24 workgroups for 1536 outputs) wants larger matrices; pass
    matvec_max_rows to QuantLinear to use it."""
    wg = dev.workgroup_size(256)
    tile = 64 if wg >= 256 else 32
    if dev.is_real_gpu():
        return MatmulTuning(matvec_wg=wg, matvec_max_tpr=32, matvec_max_rows=1 << 30, tile=tile,
                            matvec_span=GPU_MATVEC_SPAN, matvec_opt=GPU_MATVEC_OPT)
    return MatmulTuning(matvec_wg=dev.workgroup_size(64), matvec_max_tpr=1, matvec_max_rows=1 << 30, tile=tile)


# qmatvec's lane layout on a real GPU (include/qmatvec_lanes.wgsl): 0 = by shape (matvec_layout)
GPU_MATVEC_SPAN = 0
GPU_MATVEC_OPT = 0


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
    products, f32 sums; the device needs shader-f16); qmatmul (prefill) stays f32."""

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
        if compute_dtype not in ("f32", "f16"):
            raise ValueError(f"compute_dtype must be 'f32' or 'f16', got {compute_dtype!r}")
        self.matvec_kernel = "qmatvec_norm" if norm is not None else "qmatvec_silu" if silu_up_col is not None else "qmatvec"
        self.matvec_kernel += "_f16" if compute_dtype == "f16" else ""
        self.wg = self.tuning.matvec_wg
        # the lane layout (SPAN, OPT) exists in the f32 matvecs; the f16 ones walk whole blocks
        f32 = compute_dtype == "f32"
        self.span, self.opt = matvec_layout(w.n, w.k, self.tuning.matvec_span, self.tuning.matvec_opt) if f32 else (8, 1)
        if self.span not in (1, 2, 4, 8) or self.opt not in (1, 2, 4):
            raise ValueError(f"matvec span {self.span} / opt {self.opt}: span must be 1, 2, 4 or 8 and opt 1, 2 or 4")
        self.tpr = matvec_threads_per_row(w.n, w.k, self.wg, self.tuning.matvec_max_tpr, self.span)
        self.tile = self.tuning.tile
        self._launches: dict[tuple, list] = {}

    def _chunk_launches(self, kernel: str, rows_per_wg: int) -> list:
        key = (kernel, rows_per_wg)
        if key not in self._launches:
            x, x_stride, y, y_stride, y_col, acc = self._args
            buffers, extra = [], {}
            if kernel.startswith("qmatvec"):
                consts = {**quant_constants(self.w), "WG": self.wg, "TPR": self.tpr, "ROWS": rows_per_wg}
                if self.span != 8 or self.opt != 1:
                    consts.update(SPAN=self.span, OPT=self.opt, EXACT=self.w.k % 32 == 0)
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

    def dispatches(self, rows: int) -> list:
        items = []
        if rows <= self.matvec_max_rows:
            rows_per_wg = next((r for r in MATVEC_ROWS if r >= rows), MATVEC_ROWS[-1])
            outputs_per_wg = self.wg // self.tpr * self.opt
            for n, launch in self._chunk_launches(self.matvec_kernel, rows_per_wg):
                launch.set(m=rows)
                items += launch.at(-(-n // outputs_per_wg), -(-rows // rows_per_wg))
        elif self.matvec_kernel not in ("qmatvec", "qmatvec_f16"):
            raise ValueError(f"{self.matvec_kernel} serves up to {self.matvec_max_rows} rows, not {rows}")
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


class RopeKvStore(Launcher):
    """Rope on the q heads (from column 0) and k heads (from k_col) of each x row, and the
    turned keys and the values (from v_col) into the KV caches: rope_kv_store.wgsl."""

    def __init__(self, dev: Device, x, x_stride: int, k_col: int, v_col: int, positions, slots, freq_turns,
                 k_cache, v_cache, n_heads: int, n_kv: int, head_dim: int, ctx: int):
        if head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        self.wg = dev.workgroup_size(64)
        self.pairs = (n_heads + 2 * n_kv) * head_dim // 2
        self.launch = Launch(dev, "rope_kv_store", {"WG": self.wg}, [x, positions, slots, freq_turns, k_cache, v_cache],
                             n_heads=n_heads, n_kv=n_kv, head_dim=head_dim, ctx=ctx, x_stride=x_stride,
                             k_col=k_col, v_col=v_col)

    def dispatches(self, rows: int) -> list:
        return self.launch.at(-(-self.pairs // self.wg), rows)


class Attention(Launcher):
    def __init__(self, dev: Device, q, q_stride: int, q_col: int, positions, slots, k_cache, v_cache,
                 out, out_stride: int, n_heads: int, n_kv: int, head_dim: int, ctx: int, wg: int | None = None):
        if head_dim % 4 or n_heads % n_kv:
            raise ValueError(f"attention needs head_dim % 4 == 0 and n_heads % n_kv == 0 (got {head_dim}, {n_heads}/{n_kv})")
        # keys scored per chunk: a GPU wants many threads; a CPU rasteriser pays for every
        # invocation, and short contexts leave most of a wide workgroup idle. On a GPU the
        # serial part is one walk of up to WG / PARTS = head_dim keys per chunk, each waiting
        # on a V load: 1024 threads make one chunk (and one walk) of the first 1024 positions
        # instead of one per 256 (H100 decode at 256-384 positions: 2 walks -> 1 per layer)
        wg = wg or dev.workgroup_size(1024 if dev.is_real_gpu() else max(64, head_dim))
        if head_dim // 4 > wg:
            raise LimitError(f"head_dim {head_dim} needs {head_dim // 4} invocations; the workgroup size is {wg}")
        self.n_heads = n_heads
        self.launch = Launch(dev, "attention", {"WG": wg, "HEAD_DIM": head_dim},
                             [q, positions, slots, k_cache, v_cache, out],
                             n_heads=n_heads, n_kv=n_kv, ctx=ctx, q_stride=q_stride, q_col=q_col,
                             out_stride=out_stride, scale=1.0 / math.sqrt(head_dim))

    def dispatches(self, rows: int) -> list:
        return self.launch.at(self.n_heads, rows)


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
