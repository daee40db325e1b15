import os
import tempfile

# One BLAS thread per process, before numpy loads: on the 2-core hosts this suite runs on, with
# Ray actors and other jobs busy, OpenBLAS's spinning threads made a single-process SmolLM2
# reference 10x slower (169 s instead of 17 s for 96 tokens at load ~13). The simulated tabs
# already run single-threaded (simulation.runtime.ACTOR_ENV).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402

# Each test file's kind (markers registered in pyproject.toml): `make test-fast` runs the unit
# tests, `make test` every kind. A file not listed here is a unit test: in-process, no sockets
# to other processes, no browser, no Ray.
KIND_OF_FILE = {
    "browser": ("test_browser_tabs.py", "test_dashboard.py"),
    "ray": ("test_simulation_tabs.py", "test_simulation_scenario.py", "test_synthetic_tabs.py", "test_gpu_tabs.py"),
    "soak": ("test_soak.py",),
    "cluster": ("test_access.py", "test_bad_input.py", "test_cluster.py", "test_coordinator_restart.py",
                "test_hostile_tabs.py", "test_liar_stream.py", "test_metrics.py", "test_openai_compat.py",
                "test_openapi_fuzz.py", "test_tls_worker.py", "test_worker_cli.py", "test_worker_connection.py",
                "test_docs.py"),
}
# single tests of another kind than their file's
KIND_OF_TEST = {
    "test_kernels.py::test_kernels_compile_in_chromium_tint": "browser",
    "test_cpu_kernels.py::test_generate_says_which_path_and_works_without_a_compiler": "cluster",  # the CLI, twice
    "test_quant_report.py::test_cli_quantize_and_report": "cluster",  # the quant CLI end to end, seven runs
    "test_tab_draft.py::test_real_worker_process_with_draft_model_drafts_for_serve": "cluster",  # serve + worker processes
}
_KIND = {name: kind for kind, names in KIND_OF_FILE.items() for name in names}


def pytest_collection_modifyitems(config, items):
    for item in items:
        kind = KIND_OF_TEST.get(f"{item.path.name}::{item.originalname}") or _KIND.get(item.path.name, "unit")
        item.add_marker(getattr(pytest.mark, kind))

# Mesa prints an error at every start without a private runtime dir
if "XDG_RUNTIME_DIR" not in os.environ or not os.path.isdir(os.environ["XDG_RUNTIME_DIR"]):
    os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="xdg-")


@pytest.fixture(scope="module")
def weights():
    """The tiny synthetic model (tests/tiny_model.py), one copy a module (tests may change it)."""
    from tests.tiny_model import tiny_weights

    return tiny_weights()


@pytest.fixture(scope="module")
def other_weights():
    """A tiny model that mostly disagrees with `weights` (a draft model that is often wrong)."""
    from tests.tiny_model import tiny_weights

    return tiny_weights(seed=1)


@pytest.fixture(scope="session")
def smollm2_model():
    from model.loader import GGUFModel

    return GGUFModel()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_model):
    from model.tokenizer import GGUFTokenizer

    return GGUFTokenizer(smollm2_model)


@pytest.fixture(scope="session")
def smollm2_weights(smollm2_model):
    return smollm2_model.load_all()


@pytest.fixture(scope="session")
def ray_rt():
    """One local Ray for every simulated-tab test of the session (starting one costs seconds);
    started on first use, shut down at the end (never `ray stop`)."""
    pytest.importorskip("ray")
    from simulation.runtime import ray_session

    # one GPU declared, so that GPU tabs (num_gpus > 0) can be placed on a CPU host: lavapipe
    # stands in for it (tests/test_gpu_tabs.py)
    with ray_session(num_gpus=1) as ray:
        yield ray
