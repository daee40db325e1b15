// Device.subgroup_size's probe (kernels/runner.py; webgpu_device.js's subgroupSize likewise): each
// invocation of one workgroup writes its subgroup lane and its subgroup's size, from which the
// caller judges whether subgroups are runs of consecutive invocations of one size. Not a compute
// kernel (no numpy twin, no Params): it lives apart from kernels/*.wgsl.
override WG: u32 = 64u;
@group(0) @binding(0) var<storage, read_write> out: array<vec2<u32>>;
@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) t: u32, @builtin(subgroup_invocation_id) lane: u32,
        @builtin(subgroup_size) size: u32) {
  out[t] = vec2<u32>(lane, size);
}
