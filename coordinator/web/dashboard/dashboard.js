// The live dashboard: one WebSocket, snapshots pushed by the coordinator (coordinator/dashboard.py).
// Nothing here polls; a lost socket reconnects with backoff.
"use strict";
const $ = (s) => document.querySelector(s);
const esc = (s) => String(s ?? "").replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
const fmtBytes = (b) => b == null ? "?" : b >= 1 << 30 ? (b / (1 << 30)).toFixed(1) + " GiB" : (b / (1 << 20)).toFixed(0) + " MiB";
const fmtMs = (v) => v == null ? "–" : v >= 1000 ? (v / 1000).toFixed(2) + " s" : v.toFixed(v < 10 ? 1 : 0) + " ms";
const fmtDur = (s) => s == null ? "" : s < 1 ? (s * 1000).toFixed(0) + " ms" : s.toFixed(2) + " s";
const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });

let charts = null;

function renderSummary(s) {
  const c = s.counters, alive = s.workers.filter((w) => !["dead", "fenced"].includes(w.state) && !w.local).length;
  $("#summary").innerHTML =
    `<span>model <b>${s.model.layers}</b> layers</span><span>plan <b>v${s.plan_version}</b></span>` +
    `<span>workers <b>${alive}</b> live</span><span>stages <b>${s.stages.length}</b></span>` +
    `<span>tokens <b>${c.tokens}</b></span><span>requests <b>${c.completed}</b>/${c.requests} done, <b>${c.failed}</b> failed</span>` +
    (s.degraded ? `<span class="badge degraded">degraded</span>` : "") +
    (s.unserved_reason ? `<span class="unserved"></span>` : "");
  // the reason is text from the coordinator: set as text, never parsed as markup
  if (s.unserved_reason) $("#summary .unserved").textContent = `cannot serve: ${s.unserved_reason}`;
}

function renderWorkers(s) {
  const rows = s.workers.map((w) => {
    const gone = ["dead", "fenced"].includes(w.state);
    const layers = w.layers.map((l) => `${l[0]}–${l[1] - 1}${l[2] ? "+head" : ""}`).join(", ") || "–";
    const pct = w.memory_budget ? Math.min(100, (100 * w.memory_used) / w.memory_budget) : 0;
    const state = w.state + (w.progress != null ? ` ${(w.progress * 100).toFixed(0)}%` : "");
    return `<tr data-worker-id="${esc(w.id)}" class="${gone ? "gone" : ""}">
      <td><b>${esc(w.name)}</b> <span class="muted">${esc(w.id)}</span></td><td>${esc(w.kind)}</td><td>${esc(w.backend)}</td>
      <td class="adapter" title="${esc(w.adapter)}">${esc(w.adapter)}</td><td>${layers}</td>
      <td><span class="mem"><i style="width:${pct.toFixed(1)}%"></i></span>${fmtBytes(w.memory_used)} / ${fmtBytes(w.memory_budget)}</td>
      <td class="num">${fmtMs(w.step_ms)}</td><td class="num">${w.rtt_ms == null || gone ? "–" : fmtMs(w.rtt_ms)}</td><td class="num">${w.heartbeat_age_ms == null ? "–" : gone ? "–" : fmtMs(w.heartbeat_age_ms)}</td>
      <td><span class="badge state s-${esc(w.state)}">${esc(state)}</span></td>
      <td class="plan">${esc(w.plan || "–")}${w.flagged ? ` <span class="unserved">(clamped: ${esc(w.flagged)})</span>` : ""}</td></tr>`;
  });
  $("#workers tbody").innerHTML = rows.join("");
}

function renderLayerMap(s) {
  const L = s.model.layers, cols = L + 1;
  const holders = s.workers.filter((w) => w.layers.length);
  const grid = `grid-template-columns: 150px repeat(${cols}, minmax(10px, 1fr))`;
  const held = (w, i) => w.layers.some((l) => (i < L ? i >= l[0] && i < l[1] : !!l[2]));
  const primary = (w, i) => w.primary_of.some((k) => { const st = s.stages[k]; return st && (i < L ? i >= st.layers[0] && i < st.layers[1] : st.head); });
  let html = `<div class="lm" style="${grid}"><div></div>`;
  for (let i = 0; i < cols; i++) html += `<div class="axis">${i < L ? (i % 5 === 0 ? i : "") : "head"}</div>`;
  html += `<div class="name muted">stages</div>`;
  const palette = ["#4b6bfb", "#1f9d55", "#d97706", "#7c3aed", "#0891b2", "#db2777"];
  for (let i = 0; i < cols; i++) {
    const k = s.stages.findIndex((st) => (i < L ? i >= st.layers[0] && i < st.layers[1] : st.head));
    const unserved = k >= 0 && !s.stages[k].holders.length;
    html += `<div class="stagebar" title="stage ${k}" style="background:${k < 0 ? "transparent" : unserved ? "#c53030" : palette[k % palette.length]}"></div>`;
  }
  for (const w of holders) {
    html += `<div class="name"><b>${esc(w.name)}</b> <span class="muted">${esc(w.state)}</span></div>`;
    for (let i = 0; i < cols; i++) {
      const cls = held(w, i) ? (primary(w, i) ? "primary" : "standby") : "";
      html += `<div class="cell ${cls}" title="${esc(w.name)} layer ${i < L ? i : "head"}"></div>`;
    }
  }
  if (!holders.length) html += `<div class="name muted">no plan yet</div>`;
  $("#layermap").innerHTML = html + "</div>";
}

function renderSessions(s) {
  $("#sessions tbody").innerHTML = s.sessions.length
    ? s.sessions.map((x) => `<tr><td>${esc(x.request_id)}</td><td class="num">${x.prompt_tokens}</td>
        <td class="num">${x.tokens} / ${x.max_tokens}</td><td class="num">${x.tok_s == null ? "–" : x.tok_s.toFixed(1)}</td>
        <td class="num">${x.speculation?.acceptance_rate == null ? "–" : `${Math.round(x.speculation.acceptance_rate * 100)}%`}</td>
        <td class="num">${x.speculation?.tokens_per_trip == null ? "–" : x.speculation.tokens_per_trip.toFixed(2)}</td></tr>`).join("")
    : `<tr><td colspan="6" class="muted">no active sessions</td></tr>`;
}

function renderTimeline(s) {
  $("#timeline").innerHTML = s.timeline.map((e) => `<li class="tl-item" data-kind="${esc(e.kind)}">
      <span class="when">${clock(e.t)}</span><span><span class="badge k-${esc(e.kind)}">${esc(e.kind)}</span></span>
      <span>${e.worker ? `<b>${esc(e.worker)}</b> ` : ""}${esc(e.text)}</span>
      <span class="dur">${e.duration_s != null ? `${esc(e.duration_label)} ${fmtDur(e.duration_s)}` : ""}</span></li>`).join("")
    || `<li class="muted">nothing yet</li>`;
}

function makeChart(el, label, color, dots) {
  const width = Math.max(200, el.clientWidth || 300);
  return new uPlot({ width, height: 170, legend: { show: false }, cursor: { show: true },
    scales: { x: { time: true } },
    axes: [{ size: 28, values: (u, splits) => splits.map((v) => clock(v).slice(0, 5)) }, { size: 54 }],
    series: [{}, { label, stroke: color, width: 1.5, fill: color + "22", spanGaps: false,
                   points: { show: dots, size: 5, fill: color } }],
  }, [[], []], el);
}

function renderCharts(s) {
  if (typeof uPlot === "undefined") {
    for (const id of ["#c-tok", "#c-ttft", "#c-itl"])
      if (!$(id).firstChild) $(id).innerHTML = `<div class="nochart">chart library not built (npm ci && npm run build in coordinator/web)</div>`;
    return;
  }
  if (!charts) charts = { tok: makeChart($("#c-tok"), "tok/s", "#4b6bfb", false), ttft: makeChart($("#c-ttft"), "TTFT ms", "#d97706", true),
                          itl: makeChart($("#c-itl"), "ITL ms", "#1f9d55", true) };
  const x = s.series.t;
  charts.tok.setData([x, s.series.tok_s]);
  charts.ttft.setData([x, s.series.ttft_ms]);
  charts.itl.setData([x, s.series.itl_ms]);
}

function render(s) {
  renderSummary(s); renderWorkers(s); renderLayerMap(s); renderSessions(s); renderTimeline(s); renderCharts(s);
  document.body.dataset.updated = String(s.t);
}

function renderCompat(m) {
  if (!m.rows || !m.rows.length) { $("#compat").textContent = m.error || "no data yet"; return; }
  const head = m.columns.map((c) => `<th>${esc(c.label)}</th>`).join("");
  const body = m.rows.map((r) => `<tr>${m.columns.map((c) => `<td class="${esc(r._class?.[c.key] || "")}">${esc(r[c.key])}</td>`).join("")}</tr>`).join("");
  $("#compat").classList.remove("muted");
  $("#compat").innerHTML = `<table><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table>` +
    (m.note ? `<p class="muted small">${esc(m.note)}</p>` : "");
}

function connect(delay = 500) {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws/dashboard`);
  ws.onopen = () => { $("#conn").textContent = "live"; $("#conn").className = "pill on"; delay = 500; };
  ws.onmessage = (ev) => render(JSON.parse(ev.data));
  ws.onclose = () => {
    $("#conn").textContent = "disconnected, retrying"; $("#conn").className = "pill off";
    setTimeout(() => connect(Math.min(delay * 2, 10000)), delay);
  };
}

// The join QR needs the join token, which the server never reveals: an operator who opens
// /dashboard?token=T (the URL `serve` prints) sees it, anyone else does not.
function showJoin() {
  const token = new URLSearchParams(location.search).get("token");
  if (!token) return;
  const url = `${location.origin}/tab?token=${encodeURIComponent(token)}`;
  $("#join-qr").src = `/tab/qr.svg?token=${encodeURIComponent(token)}`;
  $("#join-link").textContent = url;
  $("#join-link").href = url;
  $("#join").hidden = false;
}

showJoin();
connect();
fetch("/dashboard/compat.json").then((r) => r.json()).then(renderCompat).catch((e) => { $("#compat").textContent = String(e); });
