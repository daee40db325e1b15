// The browser tab's connection, as tab_worker/client.py (WorkerConnection) is the Python one.
//
// This file runs twice, as two dedicated workers, like client.py's event loop and compute
// thread: role "socket" (started by the page) owns the WebSocket, the heartbeat timer and
// reconnects; role "compute" (started by the socket worker) runs TabWorker.handle (worker.js)
// for each message in arrival order. Heartbeats never wait for compute, so a long step is not
// a death, and neither runs on the page's main thread, so a hidden tab is not throttled.
import { decode, encode, make, ProtocolError } from "./codec.js";
import { TabWorker } from "./worker.js";

const ROLE = new URL(import.meta.url).searchParams.get("role") || "socket";

// ====================================================================== compute role
function computeMain() {
  let worker = null;
  let chain = Promise.resolve();
  const post = (msg, transfer = []) => self.postMessage(msg, transfer);
  const sendAll = (replies) => {
    const frames = replies.map((r) => encode(r, { validate: false }));
    post({ type: "send", frames }, frames.map((f) => f.buffer));
    post({ type: "stats", stats: worker.stats() });
  };
  // the socket role leaves at once (the coordinator covers our ranges, as for any lost worker)
  // and rejoins once the device is back or the tab has fallen back to the CPU engines
  const lost = (reason) => {
    post({ type: "device_lost", message: `WebGPU device lost (${reason}): leaving while it is rebuilt` });
    chain = chain.then(async () => {
      const r = await worker.recoverDevice(reason);
      worker.watchDevice(lost);
      post({ type: "device_ready", message: r.message, caps: worker.capabilities(), stats: worker.stats() });
    }).catch((err) => post({ type: "fatal", message: `${err.name}: ${err.message}` }));
  };
  self.onmessage = (ev) => {
    const d = ev.data;
    if (d.type === "init") {
      chain = chain.then(async () => {
        worker = new TabWorker(d.name, d.options);
        await worker.init();
        worker.watchDevice(lost);
        post({ type: "caps", caps: worker.capabilities(), stats: worker.stats() });
      }).catch((err) => post({ type: "fatal", message: `${err.name}: ${err.message}` }));
    } else if (d.type === "lose_device") {  // the page's test hook: what a driver reset does
      worker?.gpu?.device.destroy();
    } else if (d.type === "hello") {
      chain = chain.then(() => sendAll([worker.hello()]));
    } else if (d.type === "frame") {
      chain = chain.then(async () => {
        const m = decode(new Uint8Array(d.frame));
        let replies;
        try {
          replies = await worker.handle(m);
        } catch (err) {  // our bug: report it as an error message, keep serving
          console.error(err);
          replies = [make("error", { code: "worker_failure", field: null, message: `${err.name}: ${err.message}`, step_id: m.step_id ?? -1 })];
          post({ type: "problem", message: `${m.type} failed: ${err.name}: ${err.message}` });
        }
        sendAll(replies);
      }).catch((err) => post({ type: "problem", message: `${err.name}: ${err.message}` }));
    }
  };
}

// ====================================================================== socket role
class WorkerConnection {
  constructor(url, name, options) {
    Object.assign(this, { url, name, options });
    this.ws = null;
    this.backoff = 100;
    this.seq = 0;
    this.timer = null;
    this.stats = {};
    this.stopped = false;
    this.sessions_joined = 0;
    // the pass the coordinator welcomed this tab with (coordinator/security.py's Standing), kept
    // by the page in sessionStorage across reloads: once proven, the tab rejoins while its
    // address is backed off for another tab's offenses
    this.standing = options.standing || null;
    this.compute = new Worker(new URL("./client.js?role=compute", import.meta.url), { type: "module" });
    this.compute.onmessage = (ev) => this.from_compute(ev.data);
    this.compute.onerror = (ev) => this.show({ type: "fatal", message: `compute worker failed: ${ev.message || "error"}` });
    this.compute.postMessage({ type: "init", name, options });
  }

  show(msg) { self.postMessage(msg); }

  from_compute(d) {
    if (d.type === "caps") {
      this.stats = d.stats;
      this.show({ type: "caps", caps: d.caps, stats: d.stats });
      this.run();
    } else if (d.type === "send") {
      for (const f of d.frames) if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(f);
    } else if (d.type === "stats") {
      this.stats = d.stats;
      this.show({ type: "stats", stats: d.stats, connected: this.ws?.readyState === WebSocket.OPEN });
    } else if (d.type === "device_lost") {
      this.paused = true;  // no rejoin until the compute role has a device (or a CPU engine) again
      this.show({ type: "problem", message: d.message });
      if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(4001, "WebGPU device lost");
    } else if (d.type === "device_ready") {
      this.paused = false;
      this.stats = d.stats;
      this.show({ type: "caps", caps: d.caps, stats: d.stats, rejoin: d.message });
      if (!this.ws || this.ws.readyState === WebSocket.CLOSED) this.run();
    } else {
      this.show(d);  // problem / fatal
    }
  }

  run() {
    if (this.stopped || this.paused) return;
    const pass = this.standing ? `${this.url.includes("?") ? "&" : "?"}standing=${encodeURIComponent(this.standing)}` : "";
    const ws = (this.ws = new WebSocket(this.url + pass));
    ws.binaryType = "arraybuffer";
    this.retryAfter = 0;
    ws.onopen = () => {
      this.sessions_joined += 1;
      this.compute.postMessage({ type: "hello" });
      this.show({ type: "connection", state: "open", joins: this.sessions_joined });
    };
    ws.onmessage = (ev) => this.on_frame(ev.data);
    ws.onclose = (ev) => {
      clearInterval(this.timer);
      this.timer = null;
      const fatal = ev.code === 1008 && /token/.test(ev.reason);
      this.show({ type: "connection", state: "closed", code: ev.code, reason: ev.reason, fatal });
      if (fatal) { this.stopped = true; return; }  // a wrong token does not get better by retrying
      // the wait doubles (to 5 s) until a connection is welcomed (client.py's run: a socket
      // refused at once must not reconnect ten times a second), and honours a backoff's retry_after_s
      setTimeout(() => this.run(), Math.max(this.backoff * (1 + Math.random() * 0.2), this.retryAfter));
      this.backoff = Math.min(this.backoff * 2, 5000);
    };
  }

  on_frame(data) {
    let m;
    try {
      m = decode(new Uint8Array(data));
    } catch (err) {
      if (err instanceof ProtocolError) { this.ws.send(encode(err.toMessage())); return; }
      throw err;
    }
    if (m.type === "ping") {  // answered here, ahead of any compute: it times the round trip
      this.ws.send(encode(make("pong", { nonce: m.nonce })));
      return;
    }
    if (m.type === "welcome") {
      this.backoff = 100;
      if (m.standing) {
        this.standing = m.standing;
        this.show({ type: "standing", standing: m.standing });  // the page keeps it
      }
      this.start_heartbeats(m.heartbeat_ms);
    }
    if (m.type === "error") {
      if (m.code === "backoff") this.retryAfter = (m.retry_after_s || 0) * 1000;
      this.show({ type: "problem", message: `coordinator: ${m.code}: ${m.message}` });
    }
    this.compute.postMessage({ type: "frame", frame: data }, [data]);
  }

  start_heartbeats(ms) {
    clearInterval(this.timer);
    this.timer = setInterval(() => {
      if (this.ws?.readyState !== WebSocket.OPEN) return;
      this.seq += 1;
      const ranges = this.stats.ranges || [];
      this.ws.send(encode(make("heartbeat", { seq: this.seq, load: { steps: this.stats.steps || 0, ranges } })));
    }, ms);
  }
}

function socketMain() {
  self.onmessage = (ev) => {
    const d = ev.data;
    if (d.type === "start") self.connection = new WorkerConnection(d.url, d.name, d.options);
    else if (d.type === "lose_device") self.connection?.compute.postMessage({ type: "lose_device" });
  };
}

if (typeof WorkerGlobalScope !== "undefined" && self instanceof WorkerGlobalScope) {
  if (ROLE === "compute") computeMain();
  else socketMain();
}
