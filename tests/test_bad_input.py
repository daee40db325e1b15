"""User mistakes get one clear sentence and exit code 2, never a traceback."""
import subprocess
import sys

import gguf
import numpy as np
import pytest

from tab_worker.backends import BackendUnavailable, make_backend
from protocol.errors import ModelError
from model.loader import GGUFModel, default_model_path
from tests.tiny_model import TINY, tiny_weights


def tabshard(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "tabshard.cli", *args], capture_output=True, text=True, timeout=timeout)


def assert_clean_error(r, *needles):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def test_truncated_gguf(tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(default_model_path().read_bytes()[:3_000_000])
    assert_clean_error(tabshard("generate", "--prompt", "hi", "--model", str(bad)), "cut.gguf")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello")
    assert_clean_error(tabshard("generate", "--prompt", "hi", "--model", str(bad)), "not a readable GGUF")


def test_missing_file():
    assert_clean_error(tabshard("generate", "--prompt", "hi", "--model", "/nonexistent.gguf"), "does not exist")


def _write_gguf(path, arch="llama", tensor_type=None):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_context_length(64)
    w.add_tensor("token_embd.weight", np.zeros((10, 32), np.float32))
    if tensor_type is not None:
        w.add_tensor("blk.0.attn_q.weight", np.zeros((32, 176), np.uint8), raw_dtype=tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_non_llama_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    _write_gguf(path, arch="gpt2")
    with pytest.raises(ModelError, match="architecture 'gpt2'"):
        GGUFModel(path)


def test_missing_layer_tensors(tmp_path):
    path = tmp_path / "partial.gguf"
    _write_gguf(path)
    with pytest.raises(ModelError, match="missing .* layer tensors"):
        GGUFModel(path)


def test_unknown_tensor_type_is_named(tmp_path):
    path = tmp_path / "q5k.gguf"
    _write_gguf(path, tensor_type=gguf.GGMLQuantizationType.Q5_K)
    m = GGUFModel.__new__(GGUFModel)
    m.path = path
    m.reader = gguf.GGUFReader(str(path))
    m.tensors = {t.name: t for t in m.reader.tensors}
    with pytest.raises(ModelError, match="blk.0.attn_q.weight has type Q5_K; supported: F32, F16, Q8_0, Q4_0, Q4_1"):
        m.matrix("blk.0.attn_q.weight")


def test_prompt_longer_than_the_context():
    r = tabshard("generate", "--prompt", "word " * 9000, "--backend", "numpy")
    assert_clean_error(r, "the model's context is 8192")


def test_zero_max_tokens():
    assert_clean_error(tabshard("generate", "--prompt", "hi", "--max-tokens", "0"), "at least 1")


def test_adapter_without_the_needed_limits():
    w = tiny_weights()
    try:
        from kernels.runner import shared_device

        shared_device()
    except Exception as exc:
        pytest.skip(f"no wgpu adapter here: {exc}")
    with pytest.raises(BackendUnavailable, match="limits are too small"):
        make_backend("wgpu", TINY, dict(enumerate(w.layers)), w.head, 256, limits={"max-storage-buffer-binding-size": 256})


def test_bad_config_file(tmp_path):
    f = tmp_path / "serve.toml"
    f.write_text("replicas = 99\n")
    assert_clean_error(tabshard("serve", "--config", str(f)), "'replicas' = 99")
