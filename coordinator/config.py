"""`serve` settings from a TOML file and flags, validated with the key, the value and what is allowed."""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from coordinator.records import CoordinatorSettings
from protocol.errors import ConfigError

_RULES = {
    "heartbeat_ms": (int, 20, 10_000),  # how often workers send a heartbeat (the coordinator's clock for liveness)
    "dead_after_ms": (int, 50, 60_000),
    "step_deadline_factor": (float, 1.0, 1000.0),
    "step_deadline_min_ms": (int, 10, 600_000),  # a step's deadline is never shorter than this
    "suspect_evict_factor": (float, 1.0, 1000.0),
    "suspect_takeover_factor": (float, 1.0, 1000.0),  # as suspect_evict_factor, when a standby or a replica holds the range ready
    "replicas": (int, 1, 16),  # holders each range gets at least (serving replicas' primaries count; left-over workers fill the rest as standbys)
    "max_stages": (int, 1, 1024),  # the most pipeline stages a plan may have (none: as many as the predicted latency warrants)
    "stages": (int, 1, 1024),  # an exact pipeline depth, as far as workers allow (none: the planner's choice by predicted latency)
    "max_batch": (int, 1, 1024),  # sessions a stage runs in one step at most
    "pipeline_groups": (int, 0, 1024),  # sessions split into this many micro-batches in flight (0: one per stage)
    "target_step_ms": (float, 1.0, 600_000.0),
    "prefix_cache_entries": (int, 0, 10_000),
    "prefix_min_tokens": (int, 1, 1 << 20),
    "prefill_chunk": (int, 1, 8192),  # prompt rows per prefill step
    "coordinator_compute": (bool, None, None),  # the coordinator computes stages itself when tabs cannot hold them
    "replan_delay_ms": (int, 0, 60_000),
    "max_ctx": (int, 16, 1 << 20),  # positions of context a session may reach (prompt plus answer)
    "request_timeout_s": (float, 0.1, 3600.0),
    "measure_tokens": (int, 2, 256),  # decode steps a joining worker times to measure its speed
    "max_sessions": (int, 1, 100_000),  # generations at once; more are refused with 429
    "compute_dtype": (str, ("f32", "f16", "i8"), None),
    "workgroup_size": (int, 1, 4096),
    "spot_check_fraction": (float, 0.0, 1.0),  # steps recomputed by a trusted worker and compared
    "spot_check_rtol": (float, 1e-7, 1.0),  # allowed max |difference| / max |recomputed|
    "spot_check_seed": (int, 0, 1 << 62),  # seed of the spot-check sampling (reproducible runs)
    "spot_check_timeout_s": (float, 0.1, 3600.0),  # an unanswered check is dropped after this
    "spot_check_at_finish": (bool, None, None),  # check every stage's part in a session's last token before "done"
    "max_prompt_tokens": (int, 1, 1 << 20),  # longer prompts are refused (400)
    "max_output_tokens": (int, 1, 1 << 20),  # a larger max_tokens is refused (400)
    "max_request_bytes": (int, 1024, 1 << 30),  # a larger HTTP body is refused (413) without being read
    "worker_max_msgs_per_s": (int, 10, 1_000_000),  # a worker sending faster is quarantined
    "client_max_msgs_per_s": (int, 1, 100_000),  # a /v1/stream client sending faster gets rate_limited errors
    "load_timeout_min_s": (float, 1.0, 86_400.0),  # a tab still loading after this (+ bytes at the rate below) loses its range
    "load_min_bytes_per_s": (float, 1e3, 1e12),  # the slowest weight download allowed before a loading tab loses its range
    "dead_workers_kept": (int, 0, 1_000_000),  # ended workers' records kept for /status
    "resume_wait_ms": (int, 0, 600_000),  # first plan after a restart waits for rejoining weight holders
    "allowed_origins": (str, None, None),  # extra tab origins, comma-separated ("*": any)
    "speculation": (str, ("off", "prompt-lookup", "draft-model"), None),  # drafts verified k+1 rows a trip
    "speculation_max_k": (int, 0, 16),  # the most drafts a trip carries (protocol.messages.MAX_DRAFT_K)
    # the GGUF the draft-model mode runs on the coordinator; without it, a worker started with
    # --draft-model drafts (the trusted one of the served vocabulary with the lowest round trip)
    "draft_model": (str, None, None),
    "draft_deadline_ms": (float, 1.0, 60_000.0),  # a worker's drafts later than this (+ its rtt): the trip goes without
    "probation_steps": (int, 0, 10_000),  # steps a new tab must get right and in time before it is trusted
    "trial_deadline_ms": (int, 100, 600_000),  # a trial step unanswered this long (+ its expected cost) fails the tab
    "backoff_base_s": (float, 0.0, 86_400.0),  # joins from an offending address refused this long, doubling per offense
    "backoff_max_s": (float, 0.0, 86_400.0),
    "backoff_forgive_s": (float, 0.0, 86_400.0),
    "max_step_ms": (float, 10.0, 600_000.0),  # prompts are cut into steps expected to take at most this
    "max_conns_per_address": (int, 1, 100_000),  # open worker/stream sockets from one address
    "joins_per_address_per_s": (float, 0.01, 10_000.0),  # worker sockets opened per second per address (bursts of 2 s)
    "header_timeout_s": (float, 0.5, 3600.0),  # an HTTP connection must send its request head within this
    "body_timeout_s": (float, 0.5, 3600.0),  # and each piece of its body within this
    "public_status": (bool, None, None),  # serve /status, the dashboard and /openapi.json without the API key off loopback
    "cors_origins": (str, None, None),  # web app origins allowed to call the API from a browser ("*": any)
}

# settings whose names changed: a config file that uses the old one is told the new name
_RENAMED = {"calibration_tokens": "measure_tokens"}


def load_settings(path: str | None, overrides: dict | None = None) -> CoordinatorSettings:
    values: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
        values.update(data.get("serve", data))
    values.update(overrides or {})
    for key, value in values.items():
        if key in _RENAMED:
            raise ConfigError(f"setting {key!r} is now called {_RENAMED[key]!r}")
        if key not in _RULES:
            raise ConfigError(f"unknown setting {key!r}; known settings: {', '.join(sorted(_RULES))}")
        kind, lo, hi = _RULES[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            values[key] = value
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"setting {key!r} = {value!r}: expected {kind.__name__}")
        if isinstance(lo, tuple):
            if value not in lo:
                raise ConfigError(f"setting {key!r} = {value!r}: allowed values are {', '.join(lo)}")
        elif lo is not None and not (lo <= value <= hi):
            raise ConfigError(f"setting {key!r} = {value!r}: allowed range is {lo} to {hi}")
    if "dead_after_ms" not in values and "heartbeat_ms" in values:
        values["dead_after_ms"] = int(values["heartbeat_ms"] * 3.2)
    if values.get("draft_model") and not Path(values["draft_model"]).is_file():
        raise ConfigError(f"setting 'draft_model' = {values['draft_model']!r}: no such file")
    settings = CoordinatorSettings(**values)
    if settings.dead_after_ms < 2 * settings.heartbeat_ms:
        raise ConfigError(f"setting 'dead_after_ms' = {settings.dead_after_ms}: must be at least twice heartbeat_ms ({settings.heartbeat_ms})")
    return settings


def settings_dict(s: CoordinatorSettings) -> dict:
    return dataclasses.asdict(s)
