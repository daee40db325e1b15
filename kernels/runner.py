"""The native wgpu-py runner: one ``Device`` (adapter, device, limits, pipeline cache, buffer
helpers) and one launcher per kernel that binds buffers once and is then recorded into many
compute passes.

Every kernel is ``kernels/NAME.wgsl`` with an ``override`` for each compile-time choice
(quant format, workgroup size) and a ``struct Params`` uniform at binding 0, followed by its
storage buffers in binding order. The Python side reads the Params field list from the WGSL
itself, so a launcher passes ``name=value`` pairs and the layout lives in one place; a
browser worker loads the very same files the same way.

Hot path: pipelines are built once per (kernel, overrides); bind groups and
params buffers once per launcher; a caller plans its launchers at a row count once
(``Device.plan``: a list of native handles and grid sizes), replays the plan into one compute
pass (``Device.execute``, which may cut it into a few command buffers submitted as they are
recorded) and reads back once, through a persistent mappable buffer in the same submission.
"""
from __future__ import annotations

import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kernels import wgsl_source
from kernels.limits import WEBGPU_DEFAULT_LIMITS

KERNEL_DIR = Path(__file__).resolve().parent

# Features a Device asks for where its adapter has them.
OPTIONAL_FEATURES = ("shader-f16", "subgroup")

# Device.subgroup_size's probe, the one webgpu_device.js's subgroupSize runs too
SUBGROUP_PROBE = "probes/subgroup_size"

# Words in an adapter's description that mean "a CPU rasteriser, not a GPU".
SOFTWARE_ADAPTERS = ("llvmpipe", "lavapipe", "swiftshader", "softpipe", "microsoft basic render")


class NoAdapterError(RuntimeError):
    """No WebGPU adapter on this host (no Vulkan/Metal/DX12 driver, not even lavapipe)."""


class LimitError(ValueError):
    """A request that this device's limits cannot hold."""


def _eval_wgsl_int(expr: str, names: dict) -> int:
    """An integer override expression of our kernels (literals, names, + - * / % ( ), max, min)."""
    py = re.sub(r"\b(\d+)[ui]\b", r"\1", expr.strip()).replace("/", "//")
    py = re.sub(r"\btrue\b", "1", re.sub(r"\bfalse\b", "0", py))
    if not re.fullmatch(r"[\w\s+\-*/%(),]*", py):
        raise ValueError(f"cannot evaluate WGSL expression {expr!r}")
    return int(eval(py, {"__builtins__": {}, "max": max, "min": min}, dict(names)))


def _wgsl_type_size(type_: str, names: dict) -> int:
    """Bytes of a WGSL type as our workgroup variables use them (host-shareable layout)."""
    m = re.fullmatch(r"array<\s*(\w+(?:<[^<>]*>)?)\s*,\s*(.+)>", type_)
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
# ... on a real GPU, by mapping the readback buffer and polling without waiting until its map
# resolves instead: the blocking wait woke late on an H200 machine, and wgpuDevicePoll's own answer
# ("the queue is empty") came back true at once there, leaving the wait to map_sync's hand-offs
# with wgpu-py's poll thread; a CPU rasteriser needs the core a spinning caller would take
SPIN_WAIT = True
# ... and on a real GPU, a step that repeats the last one's plan has the next repeat's command
# buffer recorded while the GPU runs it (Device.execute): decode steps repeat one plan, and its
# recording costs host time a token would otherwise wait for
ENCODE_AHEAD = True


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
        # costs the f32 kernels nothing (Chromium's SwiftShader lacks it: browsers stay f32);
        # subgroup likewise, for the K+subgroup kernels
        features = [f for f in OPTIONAL_FEATURES if f in self.adapter.features]
        self.device = self.adapter.request_device_sync(required_features=features, required_limits=required)
        self.queue = self.device.queue
        self.features = set(self.device.features)
        self._modules: dict[str, object] = {}
        self._pipelines: dict[tuple, object] = {}
        self._params: dict[str, list[tuple[str, str]]] = {}
        self._real_gpu: bool | None = None  # is_real_gpu(), asked once (_on_real_gpu)
        self._subgroup_size: int | None = None  # subgroup_size(), probed once
        self._last_plan: list | None = None  # execute's: a call with the same plan repeats it
        self._ahead: tuple | None = None  # (plan, key, command buffer, readback bytes, staging) recorded ahead
        self.encoded_ahead_used = 0  # command buffers recorded ahead and submitted

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

    def subgroup_size(self) -> int:
        """Lanes of a subgroup that the K+subgroup kernels may count on, 0 where they cannot run:
        no subgroup feature, or subgroups that are not runs of consecutive invocations of a
        workgroup (the shuffles of include/sum_partials_subgroup.wgsl assume they are; WGSL does
        not promise it), or sizes that differ across the workgroup, or a probe that fails (a
        warning says so). Probed once, in a workgroup as wide as the limits allow."""
        if self._subgroup_size is None:
            self._subgroup_size = 0
            if "subgroup" in self.features:
                try:
                    self._subgroup_size = self._probe_subgroups()
                except Exception as exc:  # noqa: BLE001 - a driver that offers subgroups but fails the probe: plain kernels, as without
                    warnings.warn(f"subgroup probe failed on {self.describe()}, plain kernels: {exc}", RuntimeWarning, stacklevel=2)
        return self._subgroup_size

    def _probe_subgroups(self) -> int:
        wg = self.workgroup_size(1024)
        pipe = self.pipeline(SUBGROUP_PROBE, WG=wg)
        out = self.buffer(8 * wg, "subgroup_probe")
        encoder = self.encoder()
        compute = encoder.begin_compute_pass()
        compute.set_pipeline(pipe)
        compute.set_bind_group(0, self.bind_group(pipe, [out]))
        compute.dispatch_workgroups(1)
        compute.end()
        self.queue.submit([encoder.finish()])
        lane, size = self.read(out, np.uint32, 2 * wg).reshape(wg, 2).T
        sg = int(size[0])
        if sg < 1 or sg & (sg - 1) or (size != sg).any() or (lane != np.arange(wg) % sg).any():
            return 0
        return sg

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
            if "+subgroup" in kernel and not self.subgroup_size():
                raise LimitError(f"{kernel} needs subgroups of consecutive invocations, which this device lacks")
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
        (np.uint8, each part at a 4-byte-aligned offset) - one submit and one wait in all.

        On a real GPU (ENCODE_AHEAD), a readback step whose plan is the last call's has the
        command buffer of its repeat recorded (whole: nothing to start the GPU on meanwhile)
        while the GPU runs it, before the wait; a call with that plan, copies and readback
        submits it instead of recording (nothing in a command buffer depends on buffer
        contents, which writes before the submit set)."""
        key = (tuple(tuple(c) for c in copies), tuple(tuple(r) for r in readback))
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] is plan and ahead[1] == key:
            command_buffer, total, staging = ahead[2:]
            self.encoded_ahead_used += 1
        else:
            command_buffer, total, staging = self._record(plan, copies, submit_every, readback)
        self.queue.submit([command_buffer])
        repeat = plan is self._last_plan
        self._last_plan = plan
        if not readback:
            return None
        if ENCODE_AHEAD and repeat and self._on_real_gpu():
            self._ahead = (plan, key, *self._record(plan, copies, 0, readback))
        if not total:
            return np.zeros(0, np.uint8)
        if SPIN_WAIT and RAW_POLL is not None and self._on_real_gpu():
            # the map's callback runs inside a poll, this thread's or wgpu-py's poll thread's
            poll, null = RAW_POLL
            mapped = staging.map_async(self._wgpu.MapMode.READ, 0, total)
            while _pending(mapped):
                poll(self.device._internal, False, null)
            mapped.sync_wait()
        else:
            if WAIT_IN_CALLER and hasattr(self.device, "_poll_wait"):
                # block in this thread (the GIL released) until the GPU is done, so that the map
                # below resolves at once instead of after hand-offs to wgpu-py's poll thread
                self.device._poll_wait()
            staging.map_sync(self._wgpu.MapMode.READ, 0, total)
        try:
            return np.frombuffer(staging.read_mapped(0, total, copy=True), np.uint8)
        finally:
            staging.unmap()

    def _record(self, plan: list, copies, submit_every: int, readback) -> tuple:
        """(command buffer, readback bytes, the staging buffer they go to) of execute's work, the
        last part unsubmitted."""
        enc = self.device.create_command_encoder()
        cpass = enc.begin_compute_pass()
        raw = RAW_PASS_CALLS is not None and getattr(cpass, "_internal", None) is not None
        if raw:
            set_pipeline, set_bind_group, dispatch, null = RAW_PASS_CALLS
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
        total, staging = 0, None
        if readback:
            sizes = [-(-nbytes // 4) * 4 for _, _, nbytes in readback]
            staging = self._staging_buffer(sum(sizes))
            for (src, src_offset, _), size in zip(readback, sizes):
                if size:
                    enc.copy_buffer_to_buffer(src, src_offset, staging, total, size)
                total += size
        return enc.finish(), total, staging

    def _on_real_gpu(self) -> bool:
        """A real GPU (asked once): the spinning wait's and the recording ahead's condition."""
        if self._real_gpu is None:
            self._real_gpu = self.is_real_gpu()
        return self._real_gpu

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


# ====================================================================== what a plan records


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


RAW_PASS_CALLS = _raw_pass_calls()


def _raw_poll():
    """wgpuDevicePoll and NULL, for Device.execute's spinning wait (None: another wgpu-py)."""
    try:
        from wgpu.backends.wgpu_native._ffi import ffi, lib

        return lib.wgpuDevicePoll, ffi.NULL
    except (ImportError, AttributeError):  # pragma: no cover - other wgpu-py versions
        return None


RAW_POLL = _raw_poll()


def _pending(promise) -> bool:
    """Whether a wgpu-py promise is still waiting for its callback (False where this wgpu-py's
    promises do not say: the caller's sync_wait then waits as map_sync does)."""
    return getattr(promise, "_state", None) == "pending"


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
    launch: object  # a launchers.Launch: its native pipeline and bind group
    x: int
    y: int
    z: int

    def resolved(self) -> tuple:
        """(native pipeline, native bind group, x, y, z, pipeline, bind group) for Device.execute."""
        raw = self.launch._raw or (None, None)
        return (raw[0], raw[1], self.x, self.y, self.z, self.launch.pipeline, self.launch.bind_group)
