#!/bin/sh
# Fuzz the wire decoder + validator for a bounded time (default 60 s); new inputs that reach
# new coverage are added to tests/fuzz/corpus (commit them). Usage: tests/fuzz/run.sh [SECONDS]
cd "$(dirname "$0")/../.." || exit 1
exec "${PYTHON:-.venv/bin/python}" tests/fuzz/fuzz_wire.py tests/fuzz/corpus -max_total_time="${1:-60}" -rss_limit_mb=2048 \
    -max_len=4096 -print_final_stats=1
