"""GPU tabs on Ray: the adapter each worker computes on is chosen, by the operator (--adapter) or
from the GPU that Ray gave the actor. On this CPU host Ray's GPUs are declared (conftest's ray_rt)
and lavapipe stands in for the GPU; the mapping itself is checked on the adapter lists of a
4-GPU host (each GPU seen through Vulkan and OpenGL, plus a CPU rasteriser)."""
import asyncio
import subprocess
import sys

import pytest

from kernels.adapters import AdapterChoiceError, AdapterInfo, gpu_adapters, index_for_gpu, resolve
from simulation.scenario import check_gpus, validate
from protocol.errors import ConfigError

FOUR_H200 = ([AdapterInfo(i, "NVIDIA H200", "DiscreteGPU", "Vulkan", 0x10DE, 0x2335) for i in range(4)]
             + [AdapterInfo(4, "llvmpipe (LLVM 15)", "CPU", "Vulkan", 0x10005, 0)]
             + [AdapterInfo(5 + i, "NVIDIA H200", "DiscreteGPU", "OpenGL", 0x10DE, 0x2335) for i in range(4)])
LAVAPIPE = [AdapterInfo(0, "llvmpipe (LLVM 15)", "CPU", "Vulkan", 0x10005, 0),
            AdapterInfo(1, "llvmpipe (LLVM 15)", "CPU", "OpenGL", 0x10005, 0)]


def test_ray_gpu_ids_map_to_distinct_vulkan_adapters_in_order():
    assert [a.index for a in gpu_adapters(FOUR_H200)] == [0, 1, 2, 3]
    got = [index_for_gpu(k, FOUR_H200) for k in range(4)]
    assert [i for i, _ in got] == [0, 1, 2, 3]
    assert all("enumeration order" in how and "stands in" not in how for _, how in got)
    with pytest.raises(AdapterChoiceError, match="Ray assigned GPU 4.*4 GPU adapter"):
        index_for_gpu(4, FOUR_H200)


def test_cpu_host_lets_a_rasteriser_stand_in_for_gpu_0_only():
    i, how = index_for_gpu(0, LAVAPIPE)
    assert i == 0 and "stands in" in how
    with pytest.raises(AdapterChoiceError, match="no GPU"):
        index_for_gpu(1, LAVAPIPE)


def test_adapter_named_by_index_or_unambiguous_name():
    assert resolve("2", FOUR_H200) == 2 and resolve(7, FOUR_H200) == 7
    assert resolve("llvmpipe", FOUR_H200) == 4
    assert resolve("llvmpipe", LAVAPIPE) == 0  # one device through two APIs: Vulkan's
    with pytest.raises(AdapterChoiceError, match="8 adapters match 'h200'"):
        resolve("h200", FOUR_H200)  # four identical cards: only an index can tell them apart
    with pytest.raises(AdapterChoiceError, match="index 9 does not exist"):
        resolve("9", FOUR_H200)


def _scenario(**tab):
    return {"name": "t", "tabs": [{"profile": "chrome-desktop-discrete", "count": 4, **tab}]}


def test_scenario_gpu_requests_validated_and_checked_against_the_cluster():
    validate(_scenario(backend="wgpu", num_gpus=0.25))
    with pytest.raises(ConfigError, match="num_gpus"):
        validate(_scenario(backend="wgpu", num_gpus="one"))
    with pytest.raises(ConfigError, match='backend = "wgpu"'):
        validate(_scenario(backend="numpy", num_gpus=1))
    check_gpus(_scenario(num_gpus=0.25), 1.0)
    with pytest.raises(ConfigError, match="asks for 4 GPU.*has 1"):
        check_gpus(_scenario(num_gpus=1), 1.0)


def test_gpu4_scenario_is_valid_and_refused_without_four_gpus():
    from simulation.scenario import load_scenario

    scn = load_scenario("simulation/scenarios/gpu4.toml")
    assert sum(t["num_gpus"] * t["count"] for t in scn["tabs"]) == 4
    with pytest.raises(ConfigError, match="asks for 4 GPU"):
        check_gpus(scn, 1.0)


def test_worker_cli_lists_adapters_and_refuses_an_unknown_one():
    run = [sys.executable, "-m", "tabshard.cli", "worker"]
    listed = subprocess.run(run + ["--list-adapters"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "[0]" in listed.stdout, listed
    bad = subprocess.run(run + ["--adapter", "no-such-gpu", "--connect", "ws://127.0.0.1:9/ws/worker"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "no adapter match 'no-such-gpu'" in bad.stderr, bad


def test_gpu_tabs_sharing_a_declared_gpu_serve_exact_tokens(ray_rt, tmp_path):
    """Two wgpu tabs with half a GPU each: Ray places both on GPU 0, each maps it to its adapter
    (lavapipe here), and the stream equals a single-process run."""
    from actors.tab import SimulatedTab
    from simulation.runtime import CoordinatorProcess, plan_served
    from simulation.workload import Reference, stream_request

    if ray_rt.cluster_resources().get("GPU", 0) < 1:
        pytest.fail("conftest's Ray declares one GPU for this test")
    model = "synthetic:llama-mini@3"
    want = Reference.shared(model).tokens("gpu tabs", 6)
    coord = CoordinatorProcess(["--no-coordinator-compute"], model=model, log_path=str(tmp_path / "coord.log")).start()
    tabs = []
    try:
        tabs = [SimulatedTab(f"gpu-{i}", coord.worker_url, coord.token, profile="chrome-desktop-discrete",
                             backend="wgpu", seed=i, num_gpus=0.5) for i in range(2)]
        infos = [t.wait_connected() for t in tabs]
        assert all(i["adapter"] and i["adapter"].startswith("Ray GPU 0 -> adapter [0]") for i in infos), infos
        coord.wait_for(plan_served, 120, "a plan served by the GPU tabs")
        res = asyncio.run(stream_request(coord.base, "gpu", "gpu tabs", 6, timeout=120))
        assert res.error is None and res.ids == want
    finally:
        for t in tabs:
            t.kill()
        coord.stop()
