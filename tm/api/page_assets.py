"""The status page's three files, kept as strings so that they ship inside the package (the
wheel carries Python modules; no build step, nothing fetched from another host). Served by
:mod:`tm.api.page`; ``{token_required}`` in the HTML is filled in per answer.
"""

HTML = """\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tm status</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/ui/status.css">
</head>
<body data-token-required="{token_required}">
<header>
  <h1>tm status</h1>
  <span id="updated" class="note">loading…</span>
  <form id="token-form" autocomplete="off">
    <input id="token" type="password" placeholder="API token" aria-label="API token">
    <button type="submit">use token</button>
    <button id="token-forget" type="button">forget</button>
    <span id="token-state" class="note"></span>
  </form>
</header>
<main>
  <section><h2>Workers</h2><div id="workers"></div></section>
  <section><h2>Partitions</h2><div id="partitions"></div></section>
  <section><h2>Rates</h2><div id="rates"></div></section>
  <section><h2>Health</h2><div id="health"></div></section>
  <section><h2>Tasks by status</h2><div id="counts"></div></section>
  <section><h2>Task lookup</h2>
    <form id="lookup" autocomplete="off">
      <input id="task-id" placeholder="task id (UUID)" aria-label="task id" size="38">
      <button type="submit">find</button>
    </form>
    <div id="task"></div>
  </section>
  <section class="wide"><h2>Dead letters by reason</h2><div id="reasons"></div></section>
  <section class="wide"><h2>Latest dead letters</h2><div id="dead-letters"></div></section>
</main>
<script src="/ui/status.js"></script>
</body>
</html>
"""

CSS = """\
:root { --ok: #1a7f37; --bad: #cf222e; --muted: #57606a; --line: #d0d7de; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1f2328; background: #f6f8fa; }
header { display: flex; flex-wrap: wrap; gap: 1em; align-items: center; padding: .6em 1em;
  background: #fff; border-bottom: 1px solid var(--line); }
h1 { font-size: 1.2em; margin: 0; }
h2 { font-size: 1em; margin: 0 0 .5em; }
main { display: grid; grid-template-columns: repeat(auto-fit, minmax(26em, 1fr)); gap: 1em;
  padding: 1em; }
section { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: .8em;
  overflow-x: auto; }
section.wide { grid-column: 1 / -1; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .2em .6em .2em 0; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
code { font-size: .85em; word-break: break-all; }
.note { color: var(--muted); margin: 0 0 .4em; }
.refused, tr.stalled td, tr.down td { color: var(--bad); }
tr.up td:nth-child(2) { color: var(--ok); }
.overall { font-weight: 700; margin: 0 0 .4em; }
.overall.healthy { color: var(--ok); }
.overall.degraded, .overall.unhealthy { color: var(--bad); }
.figure { margin: .5em 0 0; }
"""

JS = """\
"use strict";
// The status page: every few seconds it reads the API's JSON endpoints and redraws its panels.
// Task data and dead letters need the API token: it is kept in this tab's session storage only.
const REFRESH_MS = 3000;
const TOKEN_KEY = "tm.apiToken";
const TOKEN_REQUIRED = document.body.dataset.tokenRequired === "true";
const TOKEN_MISSING = "token required: enter the API token above";
const $ = (id) => document.getElementById(id);

function el(tag, className, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  for (const child of children) {
    node.append(child instanceof Node ? child : String(child ?? "—"));
  }
  return node;
}

function table(headings, rows) {
  const head = el("tr", "", ...headings.map((h) => el("th", "", h)));
  const body = rows.map(([cls, cells]) => el("tr", cls, ...cells.map((c) => el("td", "", c))));
  return el("table", "", el("thead", "", head), el("tbody", "", ...body));
}

function show(id, ...children) {
  $(id).replaceChildren(...children);
}

function note(text, cls = "note") {
  return el("p", cls, text);
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const s = Math.floor(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor(s / 60) % 60).padStart(2, "0")}m`;
}

function perSecond(value) {
  return value === null || value === undefined ? "—" : `${value.toFixed(1)}/s`;
}

// {body, status} for an answer, {refused} when the token is missing or not accepted.
async function read(path, guarded = false) {
  const headers = {};
  if (guarded) {
    if (TOKEN_REQUIRED && !token()) return { refused: TOKEN_MISSING };
    if (token()) headers.Authorization = `Bearer ${token()}`;
  }
  const response = await fetch(path, { headers, cache: "no-store" });
  if (response.status === 401) return { refused: "refused: the API token was not accepted" };
  return { status: response.status, body: await response.json() };
}

function drawHealth({ body }) {
  const checks = Object.entries(body.checks).map(([name, check]) => [
    check.status === "up" ? "up" : "down",
    [name, check.status, `${check.responseTime} ms`, check.error ?? ""],
  ]);
  show("health", el("p", `overall ${body.status}`, body.status),
    table(["component", "status", "response", "error"], checks));
}

function drawGroup({ body }) {
  const workers = body.workers.map((w) => [
    w.retrying ? "stalled" : "",
    [w.slot, w.pid || "not running", duration(w.uptimeS), w.restarts,
      w.partitions ? w.partitions.join(", ") || "none" : `${w.partitionCount} (ids not known)`,
      w.retrying ? "backing off" : w.joined ? "joined" : "joining"],
  ]);
  const partitions = body.partitions.map((p) => [
    p.stalled ? "stalled" : "",
    [p.partition,
      p.owner ? (p.owner.slot !== null ? `worker ${p.owner.slot}` : p.owner.clientId) : "unowned",
      p.committed, p.end, p.lag, p.stalled ? "stalled" : "ok"],
  ]);
  show("workers", table(["slot", "pid", "uptime", "restarts", "partitions", "state"], workers));
  show("partitions",
    note(`${body.topic}, group ${body.groupId}${body.fresh ? "" : " (offsets not fresh)"}`),
    table(["partition", "owner", "committed", "end", "lag", "state"], partitions));
}

function drawRates({ body }) {
  if (body.windowS === null) {
    show("rates", note("measuring: rates appear at the next refresh"));
  } else {
    const outcomes = Object.entries(body.appliedPerS).map(([k, v]) => ["", [k, perSecond(v)]]);
    const p99 = body.endToEndP99Ms === null ? "—" : `${body.endToEndP99Ms} ms`;
    show("rates", note(`over the last ${Math.round(body.windowS)} s`),
      table(["", "rate"], [["", ["consumed", perSecond(body.consumedPerS)]], ...outcomes]),
      el("p", "figure", "end-to-end p99: ", el("strong", "", p99)));
  }
  const reasons = Object.entries(body.deadLettersTotal).filter(([, n]) => n > 0);
  show("reasons", reasons.length
    ? table(["reason", "dead letters", "rate"],
      reasons.map(([k, n]) => ["", [k, n, perSecond(body.deadLettersPerS?.[k])]]))
    : note("no dead letter since tm started"));
}

function drawCounts({ body }) {
  show("counts", note(`tasks created in the last ${body.timeRange}, by status now`),
    table(["new", "completed", "error", "total"], [["", [body.newTasksCount,
      body.completedTasksCount, body.errorTasksCount, body.totalTasksCount]]]));
}

function drawDeadLetters(answer) {
  if (answer.refused) return show("dead-letters", note(answer.refused, "refused"));
  const rows = answer.body.deadLetters.map((d) => ["", [d.timestamp, d.reason, d.error,
    `${d.source.topic ?? "?"}[${d.source.partition ?? "?"}]@${d.source.offset ?? "?"}`,
    d.taskId ?? "", el("code", "", d.value + (d.valueTruncated ? "…" : ""))]]);
  show("dead-letters", rows.length
    ? table(["time", "reason", "error", "from", "task", "value"], rows)
    : note(`none in ${answer.body.topic}`));
}

const PANELS = [
  ["health", "/api/health/detailed", false, drawHealth],
  ["workers", "/api/partitions", false, drawGroup],
  ["rates", "/api/rates", false, drawRates],
  ["counts", "/api/metrics/json", false, drawCounts],
  ["dead-letters", "/api/dead-letters", true, drawDeadLetters],
];

async function refresh() {
  await Promise.all(PANELS.map(async ([id, path, guarded, draw]) => {
    try {
      const answer = await read(path, guarded);
      if (answer.body && answer.body.error) show(id, note(answer.body.error, "refused"));
      else draw(answer);
    } catch (error) {
      show(id, note(`cannot read ${path}: ${error.message}`, "refused"));
    }
  }));
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

async function lookUp(event) {
  event.preventDefault();
  const id = $("task-id").value.trim();
  if (!id) return;
  const answer = await read(`/api/tasks/${encodeURIComponent(id)}`, true);
  if (answer.refused) return show("task", note(answer.refused, "refused"));
  if (answer.status !== 200) return show("task", note(answer.body.error, "refused"));
  const rows = Object.entries(answer.body).map(([k, v]) => ["", [k, v === null ? "—" : v]]);
  show("task", table(["field", "value"], rows));
}

function drawToken() {
  $("token-state").textContent = token()
    ? "token kept in this tab's session storage"
    : TOKEN_REQUIRED ? "task data and dead letters need the API token" : "no token needed";
  const missing = TOKEN_REQUIRED && !token();
  show("task", missing ? note(TOKEN_MISSING, "refused") : note("enter a task id"));
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  drawToken();
  refresh();
});
$("token-forget").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  drawToken();
  refresh();
});
$("lookup").addEventListener("submit", lookUp);
drawToken();
refresh();
setInterval(refresh, REFRESH_MS);
"""
