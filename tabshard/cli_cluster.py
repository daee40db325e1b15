"""Cluster commands: serve (the coordinator), worker (a Python tab), status, demo."""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request


def _serve_args(p) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", metavar="PATH")
    p.add_argument("--token", help="join token workers must present (default: random, printed)")
    p.add_argument("--replicas", type=int, default=None)
    p.add_argument("--heartbeat-ms", type=int, default=None)
    p.add_argument("--max-stages", type=int, default=None)
    p.add_argument("--stages", type=int, default=None, help="an exact pipeline depth (default: the planner's, by predicted latency)")
    p.add_argument("--no-coordinator-compute", action="store_true", help="never run layers on the coordinator itself")
    p.add_argument("--config", metavar="TOML", help="settings file; flags override it")
    p.add_argument("--speculation", choices=["off", "prompt-lookup", "draft-model"], default=None,
                   help="verify drafted tokens several per trip through the tabs (default off)")
    p.add_argument("--speculation-max-k", type=int, default=None, metavar="K", help="the most drafts per trip (default 6)")
    p.add_argument("--draft-model", metavar="PATH", help="GGUF of the same vocabulary drafting for --speculation draft-model "
                   "on the coordinator (without it, a `tabshard worker --draft-model` drafts)")
    p.add_argument("--api-key", help="key API clients must send (Authorization: Bearer KEY); default $TABSHARD_API_KEY, "
                                     "else required and random (printed) on a non-loopback --host, off on loopback")
    p.add_argument("--allowed-origins", help="extra browser origins allowed to join as tabs, comma-separated")
    p.add_argument("--public-status", action="store_true",
                   help="off loopback, serve /status, /metrics, /openapi.json and the dashboard without the API key")
    p.add_argument("--cors-origins", help="web app origins whose browsers may call the API (CORS, preflight included), "
                                          "comma-separated; \"*\" for any")
    p.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="the model id clients use (default smollm2-135m-instruct); more names are aliases")
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
    if getattr(a, "stages", None) is not None:
        overrides["stages"] = a.stages
    if a.no_coordinator_compute:
        overrides["coordinator_compute"] = False
    for flag in ("speculation", "speculation_max_k", "draft_model"):
        if getattr(a, flag, None) is not None:
            overrides[flag] = getattr(a, flag)
    if getattr(a, "allowed_origins", None):
        overrides["allowed_origins"] = a.allowed_origins
    if getattr(a, "cors_origins", None):
        overrides["cors_origins"] = a.cors_origins
    return load_settings(a.config, overrides)


def cmd_serve(a) -> int:
    import uvicorn

    from coordinator.app import build_app
    from coordinator.server import CoordinatorService
    from coordinator.speculation import DraftModel
    from tab_worker.local import LocalCompute
    from tabshard import compat_matrix
    from tabshard.models import open_model

    import os

    from coordinator.security import api_key_for
    from protocol.errors import ConfigError

    check_listen(a.host, a.port)  # before anything is loaded or printed
    if bool(a.certfile) != bool(a.keyfile):
        raise ConfigError("--certfile and --keyfile go together: give both to serve TLS")
    for f in (a.certfile, a.keyfile):
        if f and not os.path.isfile(f):
            raise ConfigError(f"TLS file {f!r} does not exist")
    settings = settings_from_args(a)
    api_key, generated = api_key_for(a.host, a.api_key or os.environ.get("TABSHARD_API_KEY"))
    names = _served_names(a.served_model_name)
    progress = _load_progress()
    progress("opening the model", 0, 1)
    compute = LocalCompute()
    draft = None
    if settings.speculation == "draft-model" and settings.draft_model:  # else a worker's --draft-model drafts
        draft = DraftModel(open_model(settings.draft_model).load_all(), compute, max_ctx=settings.max_ctx)
    service = CoordinatorService(open_model(a.model), settings, join_token=a.token, compute=compute, api_key=api_key,
                                 progress=progress, draft=draft)
    service.compat_matrix = compat_matrix.matrix
    from coordinator.security import is_loopback

    service.protect_status = bool(api_key) and not is_loopback(a.host) and not (a.public_status or settings.public_status)
    app = build_app(service, served_model_names=names)
    http, ws = ("https", "wss") if a.certfile else ("http", "ws")
    host = reachable_host(a.host)
    base = f"{http}://{host}:{a.port}"
    print(f"tabshard coordinator: model {names[0]!r}{' (aliases: ' + ', '.join(names[1:]) + ')' if names[1:] else ''}, "
          f"from {service.model.path.name}", flush=True)
    if host != a.host:
        print(f"  listening on {a.host}:{a.port}; other machines reach it at {host}", flush=True)
    print(f"  worker join URL: {ws}://{host}:{a.port}/ws/worker  (token {service.join_token})", flush=True)
    print(f"  tab join URL:    {base}/tab?token={service.join_token}", flush=True)
    print(f"  API URL:         {base}/v1  (OpenAI-compatible; model {names[0]!r}), metrics {base}/metrics, "
          f"status {base}/status", flush=True)
    print(f"  dashboard:       {base}/dashboard?token={service.join_token}  (with the join QR)", flush=True)
    if api_key:
        print(f"  API key:         {api_key if generated else '(as given)'}  (send Authorization: Bearer <key>)", flush=True)
    if settings.cors_origins:
        print(f"  CORS origins:    {settings.cors_origins}", flush=True)
    _print_tab_qr(a.host, a.port, service.join_token, http)
    from coordinator.security import header_timeout_protocol

    # ws_max_size is the most a joined worker may send; each socket starts far lower (server.admit)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning", ws_max_size=64 << 20, ws_ping_interval=None,
                ws_per_message_deflate=False, timeout_graceful_shutdown=1, ssl_certfile=a.certfile, ssl_keyfile=a.keyfile,
                http=header_timeout_protocol(settings.header_timeout_s), h11_max_incomplete_event_size=64 << 10)
    return 0


def check_listen(host: str, port: int) -> None:
    """A port out of range or an address that cannot be bound is one clear line, before the
    model loads and the banner prints (it printed the banner, then a traceback)."""
    import socket

    from protocol.errors import ConfigError

    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be 1 to 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} is not an address this machine can listen on: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(addr)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _served_names(given: list[str] | None) -> list[str]:
    from coordinator.app import MODEL_ID
    from protocol.errors import ConfigError

    names = list(dict.fromkeys(given or [MODEL_ID]))
    for n in names:
        if not n or len(n) > 256 or any(c.isspace() for c in n):
            raise ConfigError(f"--served-model-name {n!r}: a model name is 1 to 256 characters without spaces")
    return names


def reachable_host(host: str) -> str:
    """The address others use: a wildcard bind (0.0.0.0, ::) becomes this host's LAN address."""
    from coordinator.tab_routes import lan_address

    return lan_address() if host in ("0.0.0.0", "::", "") else host


def _load_progress():
    """A progress line for the model load (redrawn in place on a terminal, a few lines otherwise)."""
    import sys

    state = {"said": -1}

    def progress(what: str, done: int, total: int) -> None:
        pct = int(100 * done / max(total, 1))
        if sys.stdout.isatty():
            bar = "#" * (pct // 5) + "." * (20 - pct // 5)
            end = "\n" if done >= total else ""
            print(f"\r  loading the model: [{bar}] {pct:3d}%  {what:<24}", end=end, flush=True)
        elif state["said"] < 0 or pct >= state["said"] + 25 or done >= total:  # the first line at once
            state["said"] = pct - pct % 25
            print(f"  loading the model: {pct:3d}%  {what}", flush=True)

    return progress


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
    import os
    from pathlib import Path

    from tab_worker.client import check_url, run_worker
    from tab_worker.worker import TabWorker
    from protocol.errors import ConfigError

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
    check_url(url)
    if a.cafile and not url.startswith("wss://"):
        raise ConfigError(f"--cafile is for a TLS coordinator: connect to wss://..., not {url}")
    if a.memory_mb is not None and a.memory_mb <= 0:
        raise ConfigError(f"--memory-mb must be positive, got {a.memory_mb}")
    name = a.name or f"py-{os.getpid()}"

    def say(line: str) -> None:  # one line per lifecycle event; refusals exit 2 via TabshardError
        print(f"worker {name}: {line}", flush=True)

    draft = None
    if a.draft_model:
        from tabshard.models import open_model

        if not Path(a.draft_model).is_file():
            raise ConfigError(f"--draft-model {a.draft_model!r}: no such file")
        draft = open_model(a.draft_model).load_all()
    worker = TabWorker(name, backend=a.backend, token=a.token, memory_bytes=int(a.memory_mb * (1 << 20)) if a.memory_mb else None,
                       draft_weights=draft, draft_name=Path(a.draft_model).name if a.draft_model else "draft")
    say(f"backend {worker.backend_name}" + (f", drafting with {a.draft_model} ({draft.config.n_layers} layers)" if draft else ""))
    try:
        asyncio.run(run_worker(url, worker, cafile=a.cafile, say=say))  # SIGTERM/SIGINT: a clean leave, exit 0
    except KeyboardInterrupt:
        say("stopped (interrupted)")
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
    """The shard map; exits quietly (status 0) when its reader goes away (`| head`)."""
    import os
    import sys

    from protocol.errors import TabshardError

    key = a.api_key or os.environ.get("TABSHARD_API_KEY")
    req = urllib.request.Request(f"{a.url.rstrip('/')}/status", headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            st = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        hint = ": pass --api-key (or set TABSHARD_API_KEY)" if exc.code in (401, 403) else ""
        raise TabshardError(f"{a.url} answered HTTP {exc.code} for /status{hint}") from None
    except OSError as exc:
        raise TabshardError(f"no coordinator answers at {a.url}: {exc}") from None
    text = json.dumps(st, indent=2) if a.json else format_status(st, show_ended=a.all)
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # the reader closed the pipe: nothing more to say, and no traceback at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


ENDED = ("dead", "quarantined")


def degraded_reason(st: dict) -> str | None:
    """Why the cluster is not healthy: a stage nobody serves, one held by a worker that is gone,
    or one the coordinator computes itself because the tab that held it is missing."""
    workers = {w["worker_id"]: w for w in st["workers"]}
    if not st["stages"]:
        return "no plan yet (no worker has joined, or the model does not fit)"
    for stage in st["stages"]:
        holder = stage["holders"][0] if stage["holders"] else None
        w = workers.get(holder)
        if holder is None:
            return f"stage {stage['index']} has no worker"
        if w is None or w["state"] in ENDED:
            return f"stage {stage['index']} is held by {holder}, which has ended"
        if w.get("local"):
            missing = "a tab is missing" if any(not x.get("local") for x in st["workers"]) else "no tab has joined"
            return f"stage {stage['index']} runs on the coordinator's own compute ({missing})"
    return "the coordinator reports it degraded" if st.get("degraded") else None


def format_status(st: dict, show_ended: bool = False) -> str:
    """Workers by their id everywhere (names only in the worker table); ended workers only with
    show_ended (`--all`)."""
    why = degraded_reason(st)
    model = st["model"]
    lines = [f"plan v{st['plan_version']}  {'DEGRADED: ' + why if why else 'healthy'}  "
             f"{model.get('name', '')} ({model['layers']} layers)"]
    for stg in st["stages"]:
        holders = ", ".join(f"{h}{'' if h in stg['ready'] else ' (loading)'}" for h in stg["holders"])
        lines.append(f"  stage {stg['index']}: layers {stg['layers'][0]:>2}-{stg['layers'][1] - 1:>2}"
                     f"{' + head' if stg['head'] else '       '}  -> {holders or 'UNSERVED'}")
    shown = [w for w in st["workers"] if show_ended or w["state"] not in ENDED]
    hidden = len(st["workers"]) - len(shown)
    lines.append(f"  {'id':>7} {'name':<14} {'state':<11} {'backend':<7} {'ms/layer':>8} {'steps':>6}  heartbeat")
    for w in shown:
        lines.append(f"  {w['worker_id']:>7} {w['name'][:14]:<14} {w['state']:<11} {w['backend'] or '':<7} "
                     f"{w['ms_per_layer']:8.2f} {w['steps']:>6}  {w['heartbeat_age_ms']} ms ago")
    if hidden:
        lines.append(f"  ({hidden} ended worker{'s' if hidden > 1 else ''} not shown: --all)")
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
    w.add_argument("--draft-model", metavar="PATH", help="a small GGUF (or .tsq) of the served model's vocabulary: this worker "
                   "drafts for a coordinator serving --speculation draft-model without a --draft-model of its own")
    w.set_defaults(func=cmd_worker)

    st = sub.add_parser("status", help="print the shard map of a running coordinator")
    st.add_argument("--url", default="http://127.0.0.1:8000")
    st.add_argument("--json", action="store_true")
    st.add_argument("--all", action="store_true", help="also list ended (dead, quarantined) workers")
    st.add_argument("--api-key", help="the API key, when the coordinator asks one for /status (default $TABSHARD_API_KEY)")
    st.set_defaults(func=cmd_status)
