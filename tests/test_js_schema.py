"""The browser's codec validates with protocol/messages.py's own table: tab_worker/web/build.py
writes it into dist/messages.js, and codec.js holds no table of its own. Here node loads the
built codec and its MESSAGES must equal the Python schema's (a dist/ older than the schema fails).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from protocol.messages import MESSAGES, js_schema

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "tab_worker" / "web"
DIST = WEB / "dist"


def test_codec_source_holds_no_message_table():
    source = (WEB / "codec.js").read_text()
    assert 'from "./messages.js"' in source
    assert not any(f"  {name}: {{" in source for name in MESSAGES), "codec.js declares a message of its own"


def test_js_schema_covers_every_message_and_field():
    table = js_schema()
    assert set(table) == set(MESSAGES)
    for name, schema in MESSAGES.items():
        assert set(table[name]) == set(schema.fields)
        for field, f in schema.fields.items():
            assert ("opt" in table[name][field] if isinstance(table[name][field], dict) else False) == (not f.required)


def test_built_codec_validates_with_the_python_table():
    node = shutil.which("node")
    if node is None or not (DIST / "codec.js").exists():
        pytest.fail("node and the built tab assets are needed: run `make setup`")
    script = "const m = await import(process.argv[1]); process.stdout.write(JSON.stringify(m.MESSAGES));"
    out = subprocess.run([node, "--input-type=module", "-e", script, (DIST / "codec.js").as_uri()],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    # JS holds the 64-bit bounds as doubles, as its codec compares them: so do both sides here
    def as_js(text: str):
        return json.loads(text, parse_int=lambda s: float(int(s)) if abs(int(s)) > 2**53 else int(s))

    assert as_js(out) == as_js(json.dumps(js_schema(), allow_nan=False))
