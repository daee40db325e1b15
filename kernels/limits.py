"""What WebGPU grants every page without asking, in a module that loads no GPU library: the
simulated tabs' device profiles read it in processes that never open a device."""

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
