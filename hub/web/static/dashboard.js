// The operator dashboard: polls this node's endpoints every POLL_MS and draws them.
//   /ws/health            anyone: node id and health
//   /ws/connection-stats  admin: this node's connections (live)
//   /metrics              admin: this node's counters (the message rate is their difference per second)
//   /ws/cluster-stats     admin: hubctl stats --json (nodes, rooms, consumer lag, dead letters, archive lag)
// Admin means: the browser's address is in server.admin_ips (loopback by default), or the admin token
// pasted here (sent as Authorization: Bearer).

import { $, RequestError, devToken, el, getJson, tokenStore } from "/ui/static/common.js";

const POLL_MS = 2000;
const RATE_POINTS = 90; // samples in the chart (3 minutes)

const rateHistory = []; // {at, in, out}: per-second rates
let lastCounters = null; // {at, in, out}: the previous /metrics sample

const fmt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
const fmtRate = (n) => (n === null || n === undefined ? "–" : n < 10 ? n.toFixed(1) : Math.round(n).toLocaleString("en-US"));

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${seconds}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ${seconds % 60}s`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)}h ${Math.floor((seconds % 3600) / 60)}m`;
  return `${Math.floor(seconds / 86400)}d ${Math.floor((seconds % 86400) / 3600)}h`;
}

/** A table from column specs [{title, value: (row) => text, num?}] (text only). */
function fillTable(table, columns, rows, emptyText = "none") {
  const head = el("tr", {}, columns.map((c) => el("th", { class: c.num ? "num" : null }, c.title)));
  const body = rows.length === 0
    ? [el("tr", {}, el("td", { class: "empty", colspan: columns.length }, emptyText))]
    : rows.map((row) => el("tr", {}, columns.map((c) => el("td", { class: c.num ? "num" : null }, c.value(row)))));
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, body));
}

// ------------------------------------------------------------------ admin access

function adminToken() {
  return tokenStore.get("adminToken");
}

function showAuth(message) {
  $("#auth").hidden = false;
  $("#auth-error").textContent = message ?? "";
}

function renderAuthMode() {
  const token = adminToken();
  $("#auth-mode").textContent = token ? "admin token" : "admin by address (server.admin_ips)";
  $("#forget-token").hidden = !token;
}

$("#token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  tokenStore.set("adminToken", $("#admin-token").value.trim());
  $("#admin-token").value = "";
  renderAuthMode();
  refreshNow();
});

$("#dev-admin").addEventListener("click", async () => {
  try {
    tokenStore.set("adminToken", await devToken("ops", ["admin"]));
    renderAuthMode();
    refreshNow();
  } catch (error) {
    showAuth(`Dev token refused: ${error.message}`);
  }
});

$("#forget-token").addEventListener("click", () => {
  tokenStore.clear("adminToken");
  renderAuthMode();
  refreshNow();
});

// ------------------------------------------------------------------ metrics

/** Sum of a Prometheus counter's samples (every label set), from the text format. */
function counterSum(text, name) {
  let sum = 0;
  let found = false;
  for (const line of text.split("\n")) {
    if (!line.startsWith(name)) continue;
    const rest = line.slice(name.length);
    if (rest[0] !== " " && rest[0] !== "{") continue;
    const value = Number(line.slice(line.lastIndexOf(" ") + 1));
    if (Number.isFinite(value)) {
      sum += value;
      found = true;
    }
  }
  return found ? sum : null;
}

async function fetchMetrics() {
  const token = adminToken();
  const response = await fetch("/metrics", { headers: token ? { Authorization: `Bearer ${token}` } : {}, cache: "no-store" });
  if (!response.ok) throw new RequestError(response.status, "http_error", `HTTP ${response.status}`);
  return response.text();
}

function recordRate(text) {
  const now = performance.now();
  const counters = {
    at: now,
    in: counterSum(text, "streamhub_messages_in_total") ?? counterSum(text, "streamhub_messages_published_total") ?? 0,
    out: counterSum(text, "streamhub_messages_out_total") ?? 0,
  };
  if (lastCounters) {
    const seconds = Math.max(0.001, (now - lastCounters.at) / 1000);
    rateHistory.push({
      in: Math.max(0, (counters.in - lastCounters.in) / seconds),
      out: Math.max(0, (counters.out - lastCounters.out) / seconds),
    });
    if (rateHistory.length > RATE_POINTS) rateHistory.shift();
  }
  lastCounters = counters;
  const latest = rateHistory.at(-1);
  $("#rate-in").textContent = latest ? fmtRate(latest.in) : "–";
  $("#rate-out").textContent = latest ? fmtRate(latest.out) : "–";
  drawRates();
}

function drawRates() {
  const top = Math.max(1, ...rateHistory.map((p) => Math.max(p.in, p.out)));
  const step = 600 / (RATE_POINTS - 1);
  const offset = RATE_POINTS - rateHistory.length;
  const points = (key) => rateHistory.map((p, i) => `${((offset + i) * step).toFixed(1)},${(118 - (p[key] / top) * 110).toFixed(1)}`).join(" ");
  $("#rate-line-in").setAttribute("points", points("in"));
  $("#rate-line-out").setAttribute("points", points("out"));
  $("#rate-scale").textContent = `scale: 0–${fmtRate(top)}/s, one point every ${POLL_MS / 1000}s`;
}

// ------------------------------------------------------------------ drawing

function renderConnections(data) {
  $("#conn-count").textContent = fmt(data.total_connections);
  $("#conn-users").textContent = `${fmt(data.unique_users)} user(s) · ${Object.entries(data.connections_by_client_type ?? {}).map(([t, n]) => `${t} ${n}`).join(", ") || "no clients"}`;
  $("#rooms-local").textContent = `${fmt(data.total_rooms)} with members on this node`;
  fillTable($("#users-table"), [
    { title: "User", value: (r) => r.user_id },
    { title: "Connections", value: (r) => fmt(r.connections), num: true },
  ], data.top_users ?? [], "no connections");
}

function renderCluster(stats) {
  const alive = stats.nodes.filter((n) => n.alive);
  $("#cluster-conns").textContent = fmt(stats.connections.total);
  $("#nodes-alive").textContent = fmt(alive.length);
  const dead = stats.nodes.length - alive.length;
  $("#nodes-dead").textContent = dead ? `${dead} registered but silent` : "all registered nodes alive";
  $("#rooms-total").textContent = fmt(stats.rooms_total);
  const perMinute = stats.rooms_by_type.reduce((sum, t) => sum + t.messages_last_minute, 0);
  $("#rate-minute").textContent = `cluster: ${fmt(perMinute)} in the last minute${stats.volume.estimated ? " (est.)" : ""}`;
  const lag = stats.groups.reduce((sum, g) => sum + g.lag + g.pending, 0);
  $("#lag-total").textContent = fmt(lag);
  $("#lag-tile").classList.toggle("warn", lag > 1000);
  const dlq = stats.dead_letters.reduce((sum, d) => sum + d.entries, 0);
  $("#dlq-total").textContent = fmt(dlq);
  $("#dlq-tile").classList.toggle("warn", dlq > 0);
  const oldest = Math.max(-1, ...stats.dead_letters.map((d) => d.oldest_age_s ?? -1));
  $("#dlq-oldest").textContent = oldest >= 0 ? `oldest ${ago(oldest)} ago` : "none waiting";

  fillTable($("#nodes-table"), [
    { title: "Node", value: (n) => (n.node_id === stats.node_id ? `${n.node_id} (this)` : n.node_id) },
    { title: "State", value: (n) => (n.alive ? "alive" : "silent") },
    { title: "Host", value: (n) => n.host ?? "–" },
    { title: "Uptime", value: (n) => ago(n.uptime_s) },
    { title: "Conns", value: (n) => fmt(n.connections), num: true },
    { title: "Rooms", value: (n) => fmt(n.rooms), num: true },
    { title: "Seen", value: (n) => `${ago(n.seen_s_ago)} ago` },
  ], stats.nodes, "no nodes registered");
  fillTable($("#types-table"), [
    { title: "Type", value: (t) => t.type },
    { title: "Rooms", value: (t) => fmt(t.rooms), num: true },
    { title: "Entries", value: (t) => fmt(t.entries), num: true },
    { title: "Last min", value: (t) => fmt(t.messages_last_minute), num: true },
    { title: "Last hour", value: (t) => fmt(t.messages_last_hour), num: true },
  ], stats.rooms_by_type, "no rooms");
  fillTable($("#streams-table"), [
    { title: "Room", value: (s) => s.room },
    { title: "Length", value: (s) => fmt(s.length), num: true },
    { title: "Memory", value: (s) => (s.memory_bytes === null ? "–" : `${fmt(Math.round(s.memory_bytes / 1024))} KiB`), num: true },
    { title: "Newest", value: (s) => s.last_id ?? "–" },
  ], stats.streams, "no streams");
  fillTable($("#groups-table"), [
    { title: "Group", value: (g) => g.group },
    { title: "Role", value: (g) => g.role.replace("_", " ") },
    { title: "Rooms", value: (g) => fmt(g.rooms), num: true },
    { title: "Pending", value: (g) => fmt(g.pending), num: true },
    { title: "Lag", value: (g) => (g.lag_unknown_rooms ? `${fmt(g.lag)}+` : fmt(g.lag)), num: true },
  ], stats.groups, "no consumer groups");
  fillTable($("#group-rooms-table"), [
    { title: "Room", value: (g) => g.room },
    { title: "Group", value: (g) => g.group },
    { title: "Pending", value: (g) => fmt(g.pending), num: true },
    { title: "Lag", value: (g) => (g.lag === null ? "?" : fmt(g.lag)), num: true },
  ], stats.group_rooms.filter((g) => g.pending + (g.lag ?? 1) > 0), "nothing behind");
  fillTable($("#dlq-table"), [
    { title: "Consumer", value: (d) => d.consumer },
    { title: "Entries", value: (d) => fmt(d.entries), num: true },
    { title: "Oldest", value: (d) => (d.oldest_age_s === null ? "–" : `${ago(d.oldest_age_s)} ago`) },
  ], stats.dead_letters, "no dead letters");
  const pg = stats.postgres;
  $("#pg-summary").textContent = !pg ? "not reported"
    : pg.error ? `unavailable: ${pg.error}`
      : `${fmt(pg.rows)} archived messages in ${fmt(pg.rooms)} rooms · ${fmt(pg.unarchived_entries)} entries not archived yet · ${fmt(pg.rooms_behind)} room(s) behind (max ${fmt(pg.max_behind_ms)} ms)`;
  fillTable($("#archive-table"), [
    { title: "Room", value: (a) => a.room },
    { title: "Archived up to", value: (a) => a.archived_id ?? "–" },
    { title: "Unarchived", value: (a) => (a.unarchived === null ? "?" : fmt(a.unarchived)), num: true },
    { title: "Behind", value: (a) => (a.behind_ms === null ? "–" : `${fmt(a.behind_ms)} ms`), num: true },
  ], pg && !pg.error ? pg.archive_lag : [], "nothing to show");
}

// ------------------------------------------------------------------ polling

let timer = null;
let generation = 0; // a newer refreshNow() takes over the schedule

async function refresh() {
  const token = adminToken();
  const errors = [];
  let denied = false;
  const note = (what) => (error) => {
    if (error instanceof RequestError && (error.status === 403 || error.status === 401)) denied = true;
    else errors.push(`${what}: ${error.message}`);
  };
  const health = getJson("/ws/health").then((data) => {
    $("#node").textContent = `node ${data.node_id} · ${data.health_status}`;
  }, (error) => {
    // 503 with a body still names the node: the hub is up but Redis is not
    $("#node").textContent = `health: ${error.message}`;
  });
  await Promise.all([
    health,
    getJson("/ws/connection-stats", token).then(renderConnections, note("connections")),
    fetchMetrics().then(recordRate, note("metrics")),
    getJson("/ws/cluster-stats", token).then(renderCluster, note("cluster stats")),
  ]);
  if (denied) showAuth(token ? "The hub refused this token for admin endpoints (not an admin token?)." : "");
  else $("#auth").hidden = true;
  $("#updated").textContent = errors.length ? errors.join(" · ") : `updated ${new Date().toLocaleTimeString()}`;
  document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed ?? 0) + 1);
}

function schedule(mine) {
  timer = setTimeout(async () => {
    await refresh();
    if (mine === generation) schedule(mine);
  }, POLL_MS);
}

async function refreshNow() {
  const mine = ++generation;
  clearTimeout(timer);
  await refresh();
  if (mine === generation) schedule(mine);
}

renderAuthMode();
refreshNow();
