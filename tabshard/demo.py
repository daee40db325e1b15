"""`tabshard demo`: a coordinator and 4 worker processes on 127.0.0.1 stream an answer; the
shard map and figures follow. `--kill-one` kills a worker mid-stream to show the recovery."""
from __future__ import annotations

import json
import signal
import time
import urllib.request

DEFAULT_PROMPT = "Explain in three sentences why splitting a model across browser tabs can work."


def stream_chat(base: str, prompt: str, max_tokens: int, on_text=None, on_rewind=None) -> tuple[str, dict]:
    """Stream a chat completion over SSE; returns the text and the usage (plus ttft_s, tok_s and
    finish_reason). A `tabshard_rewind` chunk (a tab caught lying: its tokens are recomputed)
    withdraws the last retract_chars characters, and on_rewind gets it."""
    body = json.dumps({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(f"{base}/v1/chat/completions", body, {"Content-Type": "application/json"})
    text, usage, t0, first, finish = "", {}, time.perf_counter(), None, None
    with urllib.request.urlopen(req, timeout=300) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(ev["error"]["message"])
            usage = ev.get("usage") or usage
            rewind = ev.get("tabshard_rewind")
            if rewind:
                text = text[:max(0, len(text) - int(rewind["retract_chars"]))]
                if on_rewind:
                    on_rewind(rewind)
            if not ev["choices"]:  # the usage chunk (stream_options.include_usage)
                continue
            choice = ev["choices"][0]
            finish = choice.get("finish_reason") or finish
            piece = choice.get("delta", {}).get("content", "")
            if piece:
                first = first or time.perf_counter()
                text += piece
                if on_text:
                    on_text(piece)
    end = time.perf_counter()
    usage["ttft_s"] = (first or end) - t0
    usage["tok_s"] = (usage.get("completion_tokens", 1) - 1) / max(end - (first or end), 1e-9)
    usage["finish_reason"] = finish
    return text, usage


def cmd_demo(a) -> int:
    from rich.console import Console

    from tabshard.cli_cluster import format_status
    from tabshard.cluster import LocalCluster

    console = Console()
    console.print(f"[bold]tabshard demo[/]: a coordinator and {a.workers} worker processes ({a.backend}) on 127.0.0.1")
    t0 = time.perf_counter()
    # one stage per worker: the demo shows the model sharded over its workers (the planner alone
    # would give SmolLM2, which fits in one, one stage and replicas)
    with LocalCluster(workers=a.workers, backend=a.backend, log_dir=a.logs, serve_args=["--stages", str(a.workers)]) as cluster:
        console.print(f"cluster ready in {time.perf_counter() - t0:.1f}s at {cluster.base}\n")
        console.print(format_status(cluster.status()) + "\n")
        console.print(f"[bold]user:[/] {a.prompt}\n[bold]assistant:[/] ", end="")
        killed = {}
        count = [0]

        def on_text(piece):
            console.print(piece, end="", markup=False, highlight=False)
            count[0] += 1
            if a.kill_one and count[0] == 8 and not killed:
                pid = cluster.stage_worker_pid(min(1, len(cluster.status()["stages"]) - 1))
                cluster.signal_worker(pid, signal.SIGKILL)
                killed["pid"], killed["t"] = pid, time.monotonic()

        def on_rewind(rw):
            console.print(f"\n[yellow]<- {rw['retract_chars']} characters withdrawn ({rw['reason']}); recomputed:[/] ", end="")

        text, usage = stream_chat(cluster.base, a.prompt, a.max_tokens, on_text, on_rewind)
        console.print("\n")
        st = cluster.status()
        console.print(format_status(st))
        console.print(f"\n{usage.get('completion_tokens')} tokens, time to first token {usage['ttft_s'] * 1000:.0f} ms, "
                      f"{usage['tok_s']:.1f} tok/s")
        if killed:
            ev = [e for e in st["events"] if e["kind"] in ("death", "recovered", "rebuild")]
            rec = [e for e in ev if e["kind"] == "recovered"]
            console.print(f"[yellow]killed worker pid {killed['pid']} mid-stream[/]; " +
                          (f"recovered in {rec[-1]['recovery_s'] * 1000:.0f} ms from detection to the next token" if rec else "no recovery recorded"))
    return 0


def add_commands(sub) -> None:
    d = sub.add_parser("demo", help="start a local coordinator with 4 workers and stream an answer")
    d.add_argument("--prompt", default=DEFAULT_PROMPT)
    d.add_argument("--max-tokens", type=int, default=64)
    d.add_argument("--workers", type=int, default=4)
    d.add_argument("--backend", default="numpy", choices=["auto", "numpy", "wgpu"])
    d.add_argument("--kill-one", action="store_true", help="kill a worker mid-stream and show the recovery")
    d.add_argument("--logs", metavar="DIR", help="write process logs here")
    d.set_defaults(func=cmd_demo)
