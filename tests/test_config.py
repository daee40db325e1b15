"""`serve` settings: TOML file + flag overrides, validated with key, value and what is allowed."""
import pytest

from coordinator.config import load_settings
from protocol.errors import ConfigError


def test_toml_and_overrides(tmp_path):
    f = tmp_path / "serve.toml"
    f.write_text("[serve]\nheartbeat_ms = 100\nreplicas = 2\nprefill_chunk = 64\n")
    s = load_settings(str(f), {"replicas": 3})
    assert (s.heartbeat_ms, s.dead_after_ms, s.replicas, s.prefill_chunk) == (100, 320, 3, 64)


@pytest.mark.parametrize("text,needle", [
    ("replicas = 0", "'replicas' = 0: allowed range is 1 to 16"),
    ("heartbeat_ms = 'fast'", "'heartbeat_ms' = 'fast': expected int"),
    ("colour = 3", "unknown setting 'colour'"),
    ("calibration_tokens = 8", "'calibration_tokens' is now called 'measure_tokens'"),
    ("coordinator_compute = 1", "'coordinator_compute' = 1: expected bool"),
    ("heartbeat_ms = 500\ndead_after_ms = 600", "must be at least twice heartbeat_ms"),
    ("this is not toml", "not valid TOML"),
])
def test_bad_values_name_key_value_and_allowed(tmp_path, text, needle):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=None) as e:
        load_settings(str(f))
    assert needle in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings("/nonexistent/serve.toml")


def test_choice_settings(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("compute_dtype = 'f64'\n")
    with pytest.raises(ConfigError) as e:
        load_settings(str(f))
    assert "'compute_dtype' = 'f64': allowed values are f32, f16, i8" in str(e.value)
