"""TLS end to end, real processes on 127.0.0.1: `tabshard serve --certfile/--keyfile` with no
compute of its own, a Python worker (`tabshard worker --connect wss://... --cafile`) serving every
layer, a completion over https and token ids over wss equal to the golden ones (tests/fixtures);
a worker that does not trust the certificate stops with one clear sentence."""
import asyncio
import json
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import websockets

from protocol import wire
from tabshard.cluster import free_port
from tests.test_access import self_signed

JOIN = "join-tls-4c1d"
GOLDEN = next(c for c in json.loads((Path(__file__).parent / "fixtures" / "smollm2_golden.json").read_text())["cases"]
              if c["name"] == "chat_user_capital")


def tabshard(*args):
    return [sys.executable, "-m", "tabshard.cli", *args]


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A TLS coordinator (its output in `log`) and the processes started against it, all ended after."""
    tmp = tmp_path_factory.mktemp("tls")
    certfile, keyfile = self_signed(tmp)
    port = free_port()
    log = tmp / "serve.log"
    serve = subprocess.Popen(tabshard("serve", "--port", str(port), "--token", JOIN, "--no-coordinator-compute",
                                      "--certfile", certfile, "--keyfile", keyfile),
                             stdout=log.open("wb"), stderr=subprocess.STDOUT)
    env = {"base": f"https://127.0.0.1:{port}", "wss": f"wss://127.0.0.1:{port}", "port": port, "cafile": certfile,
           "ctx": ssl.create_default_context(cafile=certfile), "log": log, "serve": serve, "procs": [serve], "tmp": tmp}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{env['base']}/health", verify=env["ctx"], timeout=5).status_code in (200, 503):
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and serve.poll() is None, f"TLS coordinator did not come up: {log.read_text()}"
            time.sleep(0.3)
        yield env
    finally:
        for p in env["procs"][::-1]:
            p.terminate()
        for p in env["procs"]:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def https_status(env) -> dict:
    return httpx.get(f"{env['base']}/status", verify=env["ctx"], timeout=5).json()


def test_untrusted_certificate_is_one_clear_sentence(tls):
    r = subprocess.run(tabshard("worker", "--connect", f"{tls['wss']}/ws/worker", "--token", JOIN, "--backend", "numpy"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "certificate verify failed" in r.stderr and "pass --cafile" in r.stderr, r.stderr
    # --cafile only makes sense for wss://, and must be a certificate
    r = subprocess.run(tabshard("worker", "--connect", f"ws://127.0.0.1:{tls['port']}/ws/worker", "--cafile", tls["cafile"]),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "wss://" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run(tabshard("worker", "--connect", f"{tls['wss']}/ws/worker", "--cafile", str(tls["tmp"] / "nope.pem")),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--cafile" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_worker_with_cafile_serves_over_wss(tls):
    worker_log = tls["tmp"] / "worker.log"
    tls["procs"].append(subprocess.Popen(
        tabshard("worker", "--connect", f"{tls['wss']}/ws/worker", "--token", JOIN, "--backend", "numpy",
                 "--name", "tls-worker", "--cafile", tls["cafile"]), stdout=worker_log.open("wb"), stderr=subprocess.STDOUT))

    def served_by_the_worker(st):
        ready = {w["worker_id"] for w in st["workers"] if w["name"] == "tls-worker" and w["state"] == "ready"}
        return st["stages"] and all(s["holders"][:1] and s["holders"][0] in ready for s in st["stages"])

    deadline = time.monotonic() + 180
    while True:
        try:
            if served_by_the_worker(https_status(tls)):
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and tls["procs"][-1].poll() is None, worker_log.read_text()[-3000:]
        time.sleep(0.3)

    n = len(GOLDEN["greedy_ids"])
    r = httpx.post(f"{tls['base']}/v1/chat/completions", verify=tls["ctx"], timeout=120,
                   json={"messages": GOLDEN["messages"], "max_tokens": n, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == GOLDEN["greedy_text"].removesuffix("<|im_end|>")
    assert body["usage"] == {"prompt_tokens": len(GOLDEN["prompt_ids"]), "completion_tokens": n,
                             "total_tokens": len(GOLDEN["prompt_ids"]) + n}

    async def stream_ids():
        async with websockets.connect(f"{tls['wss']}/v1/stream", ssl=tls["ctx"], compression=None, open_timeout=10) as ws:
            await ws.send(wire.encode(wire.make("generate", request_id="t1", messages=GOLDEN["messages"], max_tokens=n,
                                                greedy=True)))
            ids = []
            while (m := wire.decode(await asyncio.wait_for(ws.recv(), 120)))["type"] == "token":
                ids.append(m["token_id"])
            assert m["type"] == "done", m
            return ids

    assert asyncio.run(stream_ids()) == GOLDEN["greedy_ids"]
    st = https_status(tls)
    assert next(w for w in st["workers"] if w["name"] == "tls-worker")["steps"] > 0


def test_every_url_shown_says_https_and_wss(tls):
    """What `serve` prints (join URLs, API URL, the QR and the URL it encodes) and the QR that the
    dashboard shows (/tab/qr.svg) all name https/wss under TLS."""
    import io

    import segno

    from coordinator.tab_routes import join_url, qr_text

    out, port = tls["log"].read_text(), tls["port"]
    tab = f"https://127.0.0.1:{port}/tab?token={JOIN}"
    assert f"wss://127.0.0.1:{port}/ws/worker" in out and f"https://127.0.0.1:{port}/v1" in out
    assert f"): {tab}\n" in out and qr_text(tab) in out  # the terminal QR encodes the https URL
    assert "http://" not in out and "ws://" not in out, out
    r = httpx.get(f"{tls['base']}/tab/qr.svg", params={"token": JOIN}, verify=tls["ctx"], timeout=10)
    assert r.status_code == 200

    def svg(url):
        buf = io.BytesIO()
        segno.make(url, error="m").save(buf, kind="svg", scale=6, border=2)
        return buf.getvalue()

    assert r.content == svg(tab) != svg(tab.replace("https", "http"))
    assert join_url("127.0.0.1", 8443, "t", "https") == "https://127.0.0.1:8443/tab?token=t"
    assert join_url("0.0.0.0", 8443, "t", "https").startswith("https://")


def test_certificate_for_another_name_says_so(tmp_path):
    """A trusted certificate that does not name the host connected to: the hint is the name, not --cafile."""
    import shutil

    from tab_worker.client import WorkerConnection
    from tab_worker.worker import TabWorker
    from protocol.errors import TabshardError

    certfile, keyfile = tmp_path / "other.pem", tmp_path / "other.key"
    subprocess.run([shutil.which("openssl") or pytest.skip("no openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(keyfile), "-out", str(certfile), "-days", "1",
                    "-subj", "/CN=elsewhere.invalid", "-addext", "subjectAltName=DNS:elsewhere.invalid"],
                   check=True, capture_output=True)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certfile, keyfile)

    async def go():
        server = await websockets.serve(lambda ws: ws.wait_closed(), "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            conn = WorkerConnection(TabWorker("t", backend="numpy"), f"wss://127.0.0.1:{port}/ws/worker", cafile=str(certfile))
            with pytest.raises(TabshardError) as err:
                await asyncio.wait_for(conn.run(), 30)
            return str(err.value)
        finally:
            server.close()

    message = asyncio.run(go())
    assert "certificate verify failed" in message and "that the certificate names" in message and "--cafile" not in message
