"""Cluster commands: serve (the coordinator), worker (a Python tab), status, demo."""
from __future__ import annotations

import asyncio
import json
import urllib.request


def _serve_args(p) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", metavar="PATH")
    p.add_argument("--token", help="join token workers must present (default: random, printed)")
    p.add_argument("--replicas", type=int, default=None)
    p.add_argument("--heartbeat-ms", type=int, default=None)
    p.add_argument("--max-stages", type=int, default=None)
    p.add_argument("--no-coordinator-compute", action="store_true", help="never run layers on the coordinator itself")
    p.add_argument("--config", metavar="TOML", help="settings file; flags override it")
    p.add_argument("--speculation", choices=["off", "prompt-lookup", "draft-model"], default=None,
                   help="verify drafted tokens several per trip through the tabs (default off)")
    p.add_argument("--speculation-max-k", type=int, default=None, metavar="K", help="the most drafts per trip (default 6)")
    p.add_argument("--draft-model", metavar="PATH", help="GGUF of the same vocabulary drafting for --speculation draft-model")
    p.add_argument("--api-key", help="key API clients must send (Authorization: Bearer KEY); default $TABSHARD_API_KEY, "
                                     "else required and random (printed) on a non-loopback --host, off on loopback")
    p.add_argument("--allowed-origins", help="extra browser origins allowed to join as tabs, comma-separated")
    p.add_argument("--certfile", help="TLS certificate (PEM): serve https/wss")
    p.add_argument("--keyfile", help="TLS private key (PEM)")


def settings_from_args(a):
    from coordinator.config import load_settings

    overrides = {}
    if a.replicas is not None:
        overrides["replicas"] = a.replicas
    if a.heartbeat_ms is not None:
        overrides["heartbeat_ms"] = a.heartbeat_ms
    if a.max_stages is not None:
        overrides["max_stages"] = a.max_stages
    if a.no_coordinator_compute:
        overrides["coordinator_compute"] = False
    for flag in ("speculation", "speculation_max_k", "draft_model"):
        if getattr(a, flag, None) is not None:
            overrides[flag] = getattr(a, flag)
    if getattr(a, "allowed_origins", None):
        overrides["allowed_origins"] = a.allowed_origins
    return load_settings(a.config, overrides)


def cmd_serve(a) -> int:
    import uvicorn

    from coordinator.app import build_app
    from coordinator.server import CoordinatorService

    import os

    from coordinator.security import api_key_for
    from tabshard.errors import ConfigError

    if bool(a.certfile) != bool(a.keyfile):
        raise ConfigError("--certfile and --keyfile go together: give both to serve TLS")
    for f in (a.certfile, a.keyfile):
        if f and not os.path.isfile(f):
            raise ConfigError(f"TLS file {f!r} does not exist")
    settings = settings_from_args(a)
    api_key, generated = api_key_for(a.host, a.api_key or os.environ.get("TABSHARD_API_KEY"))
    service = CoordinatorService(a.model, settings, join_token=a.token, api_key=api_key)
    app = build_app(service)
    http, ws = ("https", "wss") if a.certfile else ("http", "ws")
    base = f"{http}://{a.host}:{a.port}"
    print(f"tabshard coordinator for {service.model.path.name}", flush=True)
    print(f"  worker join URL: {ws}://{a.host}:{a.port}/ws/worker  (token {service.join_token})", flush=True)
    print(f"  tab join URL:    {base}/tab?token={service.join_token}", flush=True)
    print(f"  API URL:         {base}/v1  (OpenAI-compatible), status {base}/status", flush=True)
    print(f"  dashboard:       {base}/dashboard?token={service.join_token}  (with the join QR)", flush=True)
    if api_key:
        print(f"  API key:         {api_key if generated else '(as given)'}  (send Authorization: Bearer <key>)", flush=True)
    _print_tab_qr(a.host, a.port, service.join_token, http)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning", ws_max_size=64 << 20, ws_ping_interval=None,
                ws_per_message_deflate=False, timeout_graceful_shutdown=1, ssl_certfile=a.certfile, ssl_keyfile=a.keyfile)
    return 0


def _print_tab_qr(host: str, port: int, token: str, scheme: str = "http") -> None:
    """The tab join URL as a QR code, for a phone on the LAN (a wildcard bind address is shown
    as this host's LAN address; 127.0.0.1 is only reachable from this machine)."""
    from coordinator.tab_routes import join_url, qr_text

    url = join_url(host, port, token, scheme)
    try:
        qr = qr_text(url)
    except ImportError:  # segno is optional for serving; the URL above still works
        return
    where = "scan to join from a phone on the LAN" if "://127." not in url else \
        "scan to join (bind --host 0.0.0.0 to let other machines in)"
    print(f"  tab join QR ({where}): {url}", flush=True)
    print(qr, flush=True)


def cmd_worker(a) -> int:
    from tab_worker.client import run_worker
    from tab_worker.worker import TabWorker
    from tabshard.errors import ConfigError

    if a.list_adapters:
        return _list_adapters()
    if not a.connect:
        raise ConfigError("tabshard worker needs --connect ws://HOST:PORT/ws/worker (or --list-adapters)")
    if a.adapter is not None:
        from kernels.adapters import AdapterChoiceError, choose, list_adapters, resolve

        try:  # refuse a wrong choice now, not after joining
            print(f"adapter: {list_adapters()[resolve(a.adapter, list_adapters())].describe()}", flush=True)
        except AdapterChoiceError as exc:
            raise ConfigError(str(exc)) from None
        choose(a.adapter)
    url = a.connect
    if a.cafile and not url.startswith("wss://"):
        raise ConfigError(f"--cafile is for a TLS coordinator: connect to wss://..., not {url}")
    worker = TabWorker(a.name or f"py-{__import__('os').getpid()}", backend=a.backend, token=a.token,
                       memory_bytes=int(a.memory_mb * (1 << 20)) if a.memory_mb else None)
    try:
        asyncio.run(run_worker(url, worker, cafile=a.cafile))
    except KeyboardInterrupt:
        pass
    return 0


def _list_adapters() -> int:
    from kernels.adapters import gpu_adapters, list_adapters

    adapters = list_adapters()
    gpus = {x.index for x in gpu_adapters(adapters)}
    for x in adapters:
        print(x.describe() + ("  <- GPU" if x.index in gpus else ""))
    if not adapters:
        print("no WebGPU adapter on this host (no Vulkan/Metal/DX12 driver, not even lavapipe)")
    return 0


def cmd_status(a) -> int:
    from tabshard.errors import TabshardError

    try:
        with urllib.request.urlopen(f"{a.url.rstrip('/')}/status", timeout=5) as r:
            st = json.loads(r.read())
    except OSError as exc:
        raise TabshardError(f"no coordinator answers at {a.url}: {exc}") from None
    if a.json:
        print(json.dumps(st, indent=2))
        return 0
    print(format_status(st))
    return 0


def format_status(st: dict) -> str:
    lines = [f"plan v{st['plan_version']}  {'DEGRADED' if st['degraded'] else 'healthy'}  "
             f"{st['model'].get('name', '')} ({st['model']['layers']} layers)"]
    names = {w["worker_id"]: w for w in st["workers"]}
    for s in st["stages"]:
        holders = ", ".join(f"{h}{'' if h in s['ready'] else ' (loading)'} [{names.get(h, {}).get('name', '?')}]" for h in s["holders"])
        lines.append(f"  stage {s['index']}: layers {s['layers'][0]:>2}-{s['layers'][1] - 1:>2}{' + head' if s['head'] else '       '}  -> {holders or 'UNSERVED'}")
    for w in st["workers"]:
        lines.append(f"  {w['worker_id']:>5} {w['name'][:14]:<14} {w['state']:<11} {w['backend'] or '':<6} "
                     f"{w['ms_per_layer']:5.2f} ms/layer  {w['steps']:>5} steps  hb {w['heartbeat_age_ms']} ms")
    return "\n".join(lines)


def add_commands(sub) -> None:
    s = sub.add_parser("serve", help="run the coordinator")
    _serve_args(s)
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser("worker", help="run a Python tab worker")
    w.add_argument("--connect", metavar="URL", help="ws://HOST:PORT/ws/worker (wss:// for a TLS coordinator)")
    w.add_argument("--adapter", metavar="INDEX|NAME", help="the WebGPU adapter to compute on (see --list-adapters; "
                   "default: wgpu's high-performance choice)")
    w.add_argument("--list-adapters", action="store_true", help="list this host's WebGPU adapters and exit")
    w.add_argument("--cafile", metavar="PEM", help="certificate to trust for wss://, e.g. the coordinator's self-signed --certfile")
    w.add_argument("--token")
    w.add_argument("--backend", default="auto", choices=["auto", "numpy", "wgpu"])
    w.add_argument("--name")
    w.add_argument("--memory-mb", type=float)
    w.set_defaults(func=cmd_worker)

    st = sub.add_parser("status", help="print the shard map of a running coordinator")
    st.add_argument("--url", default="http://127.0.0.1:8000")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    from tabshard.demo import add_demo_command

    add_demo_command(sub)
