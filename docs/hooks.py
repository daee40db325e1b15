"""MkDocs hook: the pages whose facts live in code are generated from it at build time, so they
cannot drift. `{{ settings_table }}` becomes the table of every `serve` setting (from
coordinator/config.py's rules, the defaults of coordinator/records.py's CoordinatorSettings and
the comments beside each); `{{ browser_table }}` the browser profiles of actors/profiles.py
with where each figure comes from, `{{ network_table }}` its networks of simulated tabs;
`{{ sampling_defaults }}` model/sampling.py's defaults."""
from __future__ import annotations

import dataclasses
import io
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _comments(path: Path, pattern: str) -> dict[str, str]:
    """name -> the comment on the line that defines it (`pattern` captures the name)."""
    out: dict[str, str] = {}
    lines = path.read_text().splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.COMMENT:
            m = re.match(pattern, lines[tok.start[0] - 1])
            if m and m.group(1) not in out:
                out[m.group(1)] = tok.string.lstrip("# ").strip()
    return out


def _comment_blocks(path: Path) -> list[str]:
    """Runs of whole-line comments, joined."""
    blocks, cur = [], []
    for line in path.read_text().splitlines():
        if line.strip().startswith("#"):
            cur.append(line.strip().lstrip("# ").strip())
        elif cur:
            blocks.append(" ".join(cur))
            cur = []
    return blocks


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def settings_table() -> str:
    from coordinator.config import _RULES
    from coordinator.records import CoordinatorSettings

    rule_notes = _comments(ROOT / "coordinator/config.py", r'\s*"(\w+)":')
    field_notes = _comments(ROOT / "coordinator/records.py", r"\s*(\w+): [\w |\[\],.]+ = ")
    defaults = {f.name: f.default for f in dataclasses.fields(CoordinatorSettings)}
    blocks = _comment_blocks(ROOT / "coordinator/records.py")  # a comment above a group of settings names them
    rows = ["| setting | type | allowed | default | what it does |", "|---|---|---|---|---|"]
    for key, (kind, lo, hi) in _RULES.items():
        if isinstance(lo, tuple):
            allowed = " / ".join(lo)
        elif lo is not None:
            allowed = f"{lo} to {hi}"
        else:
            allowed = "true / false" if kind is bool else "any"
        default = defaults.get(key, "")
        default = "(none)" if default is None or default == "" else str(default).lower() if kind is bool else default
        note = (rule_notes.get(key) or field_notes.get(key) or next((b for b in blocks if key in b), None)
                 or "(no description: add a comment to its rule in coordinator/config.py)")
        rows.append(f"| `{key}` | {kind.__name__} | {_cell(allowed)} | `{default}` | {_cell(note)} |")
    return "\n".join(rows)


def browser_table() -> str:
    from actors.profiles import PROFILES

    rows = ["| profile | browser / device | runs on | f16 | largest buffer | invocations | tab memory | sources |",
            "|---|---|---|---|---|---|---|---|"]
    for p in PROFILES.values():
        lim = p.limits
        runs = "WebGPU" if p.webgpu else "WASM (CPU)"
        binding = f"{lim['max-storage-buffer-binding-size'] / (1 << 20):.0f} MiB" if lim else "-"
        inv = lim.get("max-compute-invocations-per-workgroup", "-") if lim else "-"
        f16 = "yes" if "shader-f16" in p.features else "no"
        src = "; ".join(f"{k}: {v}" for k, v in p.sources.items())
        rows.append(f"| `{p.name}` | {_cell(p.browser)} | {runs} | {f16} | {binding} | {inv} | "
                    f"{p.memory_bytes / (1 << 30):.0f} GiB | {_cell(src)} |")
    return "\n".join(rows)


def network_table() -> str:
    from actors.profiles import NETWORKS

    rows = ["| network | one-way latency | jitter (up to) | bandwidth each way | sources |", "|---|---|---|---|---|"]
    for n in NETWORKS.values():
        bw = f"{n.bandwidth_mbps:g} Mbit/s" if n.bandwidth_mbps else "unlimited"
        src = "; ".join(f"{k}: {v}" for k, v in n.sources.items())
        rows.append(f"| `{n.name}` | {n.latency_ms:g} ms | {n.jitter_ms:g} ms | {bw} | {_cell(src)} |")
    return "\n".join(rows)


def sampling_defaults() -> str:
    from model.sampling import CANDIDATES, USER_DEFAULTS

    d = USER_DEFAULTS
    return "\n".join([
        "| option | API field | CLI flag | default |", "|---|---|---|---|",
        f"| temperature | `temperature` | `--temperature` | {d['temperature']} (0 is greedy) |",
        f"| nucleus mass | `top_p` | `--top-p` | {d['top_p']} (0 keeps only the best token) |",
        f"| best-k | `top_k` | `--top-k` | {d['top_k']} (all of the {CANDIDATES} candidates) |",
        "| seed | `seed` | `--seed` | a fresh one per request, returned (`seed` in the answer) |",
        f"| tokens | `max_tokens` | `--max-tokens` | {d['max_tokens']} |",
        "| greedy | `greedy` | `--greedy` | false (with a temperature other than 0: refused) |"])


GENERATED = {"settings_table": settings_table, "browser_table": browser_table, "network_table": network_table,
             "sampling_defaults": sampling_defaults}


def on_page_markdown(markdown: str, page, config, files) -> str:
    for name, make in GENERATED.items():
        token = "{{ " + name + " }}"
        if token in markdown:
            markdown = markdown.replace(token, make())
    return markdown
