"""The browser tab's routes: GET /tab (the join page), its static assets, the WGSL kernels.

    GET /tab?token=T              the tab page (403 with a clear message for a wrong token)
    GET /tab/static/PATH          tab_worker/web/dist/ (built by tab_worker/web/build.py)
    GET /kernels/layer_program.json  kernels/layer_program.py's program: the op order both backends run
    GET /kernels/NAME.wgsl        kernels/NAME.wgsl with its includes (kernels.wgsl_source): the
                                  browser runs the very text the native wgpu path compiles (but
                                  for `enable subgroups;`, which Tint needs and naga refuses);
                                  NAME+VARIANT a kernel's variant (qmatvec+subgroup), and
                                  probes/NAME the device probes (probes/subgroup_size)
    GET /tab/qr.svg?token=T       the join URL as a QR code (for phones on the LAN)

The page's worker then joins at /ws/worker like any Python worker.
"""
from __future__ import annotations

import html
import re
import secrets
import socket
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from kernels import KERNEL_DIR, wgsl_source

WEB = Path(__file__).resolve().parent.parent / "tab_worker" / "web"
DIST = WEB / "dist"
MEDIA_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".html": "text/html; charset=utf-8",
               ".css": "text/css", ".wasm": "application/wasm", ".json": "application/json", ".wgsl": "text/plain; charset=utf-8"}
NO_CACHE = {"Cache-Control": "no-cache"}  # a rebuilt dist/ must reach open tabs on reload


def _page(title: str, text: str, status: int) -> HTMLResponse:
    body = (f"<!doctype html><meta charset=utf-8><meta name=viewport content='width=device-width'>"
            f"<title>{html.escape(title)}</title><body style='font:16px system-ui;margin:2rem;max-width:40rem'>"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body>")
    return HTMLResponse(body, status_code=status)


def lan_address() -> str:
    """This host's address on the LAN (the interface of the default route; no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def join_url(host: str, port: int, token: str, scheme: str = "http") -> str:
    """The tab join URL others can open: a wildcard bind address becomes the LAN address;
    scheme "https" when the coordinator serves TLS."""
    if host in ("0.0.0.0", "::", ""):
        host = lan_address()
    return f"{scheme}://{host}:{port}/tab?token={token}"


def qr_text(url: str) -> str:
    """The URL as a QR code drawn with Unicode half blocks, for the terminal (needs segno)."""
    import io

    import segno

    out = io.StringIO()
    segno.make(url, error="m").terminal(out=out, compact=True, border=2)
    return out.getvalue()


def routes(service) -> list:
    def token_ok(request: Request) -> bool:
        given = request.query_params.get("token", "")
        return not service.join_token or secrets.compare_digest(given.encode(), service.join_token.encode())  # bytes: any text

    async def tab_page(request: Request):
        if not request.query_params.get("token"):
            return _page("No join token", "This link has no join token. Open the tab join URL that `tabshard serve` "
                                          "printed (it ends in ?token=...).", 403)
        if not token_ok(request):
            return _page("Wrong join token", "The coordinator refused this tab: the join token in the link is wrong "
                                             "or out of date. Open the current tab join URL printed by `tabshard serve`.", 403)
        page = DIST / "index.html"
        if not page.exists():
            return _page("Tab assets not built", "The coordinator's browser assets are missing: run `npm ci && python "
                                                 "tab_worker/web/build.py` (or `make setup`) and reload.", 503)
        return FileResponse(page, media_type=MEDIA_TYPES[".html"], headers=NO_CACHE)

    async def static(request: Request):
        rel = request.path_params["path"]
        if "\x00" in rel:  # pathlib raises on a NUL ("/tab/static/%00" answered 500 with a traceback)
            return PlainTextResponse("not found", status_code=404)
        path = (DIST / rel).resolve()
        if DIST.resolve() not in path.parents or not path.is_file():
            return PlainTextResponse(f"not found: {rel}", status_code=404)
        return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"), headers=NO_CACHE)

    async def kernel(request: Request):
        name = request.path_params["name"]
        if not re.fullmatch(r"(?:probes/)?\w+(?:\+\w+)*", name) or not (KERNEL_DIR / f"{name.split('+')[0]}.wgsl").is_file():
            return PlainTextResponse(f"no kernel {name!r}", status_code=404)
        try:
            source = wgsl_source(name, for_browser=True)
        except ValueError as exc:  # an unknown variant
            return PlainTextResponse(str(exc), status_code=404)
        return Response(source, media_type=MEDIA_TYPES[".wgsl"], headers=NO_CACHE)

    async def layer_program(request: Request):
        from kernels.layer_program import program_json

        return Response(program_json(), media_type="application/json", headers=NO_CACHE)

    async def qr_svg(request: Request):
        if not token_ok(request):
            return PlainTextResponse("wrong join token", status_code=403)
        import io

        import segno

        scheme = request.url.scheme  # https under TLS: the QR opens the page as this request reached it
        host, port = request.url.hostname or "127.0.0.1", request.url.port or (443 if scheme == "https" else 80)
        buf = io.BytesIO()
        segno.make(join_url(host, port, service.join_token, scheme), error="m").save(buf, kind="svg", scale=6, border=2)
        return Response(buf.getvalue(), media_type="image/svg+xml")

    return [
        Route("/tab", tab_page),
        Route("/tab/qr.svg", qr_svg),
        Route("/tab/static/{path:path}", static),
        Route("/kernels/{name:path}.wgsl", kernel),
        Route("/kernels/layer_program.json", layer_program),
    ]
