// The amid dashboard: plain JavaScript over the REST API, no libraries, no network beyond it.
"use strict";

const KEY_STORE = "amid.apiKey";
const POLL_MS = 2000;
const EVENTS_SHOWN = 200;
// Curves on the job page; alpha and lambda only when the job schedules them.
const SERIES = [
  ["train/loss", "training loss"],
  ["eval/loss", "eval loss"],
  ["eval/rouge_l", "eval ROUGE-L"],
  ["train/lr", "learning rate"],
  ["alpha", "α", "alpha_schedule"],
  ["lambda", "λ", "lambda_schedule"],
];
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);

let timer = null;

const $ = (selector) => document.querySelector(selector);

function apiKey() {
  return localStorage.getItem(KEY_STORE);
}

class KeyRefused extends Error {}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { Authorization: `Bearer ${apiKey()}`, ...(options.headers || {}) },
  });
  if (response.status === 401) {
    throw new KeyRefused("the API key was refused");
  }
  if (!response.ok) {
    const body = await response.json().catch(() => ({ detail: response.statusText }));
    throw new Error(body.detail || `HTTP ${response.status}`);
  }
  return response;
}

async function json(path, options) {
  return (await api(path, options)).json();
}

function show(view) {
  for (const id of ["key-view", "list-view", "pool-view", "job-view"]) {
    $(`#${id}`).hidden = id !== view;
  }
  $("#forget-key").hidden = view === "key-view";
}

function element(tag, text, attributes = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

function eta(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return h ? `${h}h${String(m).padStart(2, "0")}m` : `${m}m${String(s % 60).padStart(2, "0")}s`;
}

function failed(error, where) {
  if (error instanceof KeyRefused) {
    askForKey(error.message);
    return;
  }
  $(where).textContent = error.message;
}

// -- the key ---------------------------------------------------------------------------------

function askForKey(message) {
  stopPolling();
  $("#key-error").textContent = message || "";
  show("key-view");
}

$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem(KEY_STORE, $("#key-input").value.trim());
  $("#key-input").value = "";
  route();
});

$("#forget-key").addEventListener("click", () => {
  localStorage.removeItem(KEY_STORE);
  askForKey("");
});

// A list view stays current: drawn now, then again every POLL_MS until another view is shown.
async function keepShowing(draw, errorAt, again) {
  try {
    await draw();
  } catch (error) {
    failed(error, errorAt);
    if (error instanceof KeyRefused) return;
  }
  stopPolling();
  timer = setTimeout(again, POLL_MS);
}

// -- the jobs list ---------------------------------------------------------------------------

async function showList() {
  show("list-view");
  const filters = new FormData($("#filters"));
  const query = new URLSearchParams({ limit: "100" });
  for (const [name, value] of filters) if (value) query.set(name, value);
  await keepShowing(async () => {
    const page = await json(`/v1/jobs?${query}`);
    const body = $("#jobs tbody");
    body.replaceChildren();
    for (const job of page.items) {
      const row = element("tr", null, { "data-job": job.id });
      const link = element("a", job.name || "(unnamed)", { href: `#/jobs/${job.id}` });
      row.append(element("td"), element("td", job.id.slice(0, 8)));
      row.firstChild.append(link);
      row.append(element("td", job.status, { class: `status ${job.status}` }));
      row.append(element("td", job.settings.preset || ""));
      const p = job.progress;
      const fraction = p.fraction === null ? "" : ` (${Math.round(p.fraction * 100)}%)`;
      row.append(element("td", `${p.step}/${p.total_steps ?? "?"}${fraction}`));
      row.append(element("td", job.status === "running" ? eta(p.eta_seconds) : ""));
      row.append(element("td", new Date(job.created_at).toLocaleString()));
      body.append(row);
    }
    $("#list-error").textContent = page.items.length ? "" : "no jobs match";
  }, "#list-error", showList);
}

$("#filters").addEventListener("submit", (event) => {
  event.preventDefault();
  stopPolling();
  showList();
});

// -- the pool --------------------------------------------------------------------------------

function gpu(worker) {
  if (worker.gpu_memory_bytes === null) return worker.gpu;
  return `${worker.gpu} (${Math.round(worker.gpu_memory_bytes / 2 ** 30)} GiB)`;
}

function ago(seconds) {
  if (seconds < 60) return `${Math.round(seconds)}s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)}m ago`;
  return `${(seconds / 3600).toFixed(1)}h ago`;
}

async function showPool() {
  show("pool-view");
  await keepShowing(async () => {
    const pool = await json("/v1/workers");
    const body = $("#workers tbody");
    body.replaceChildren();
    for (const worker of pool.items) {
      const row = element("tr", null, { "data-worker": worker.id });
      row.append(element("td", worker.id), element("td", worker.host), element("td", gpu(worker)));
      row.append(element("td", worker.state, { class: `status ${worker.state}` }));
      const job = element("td");
      // Every key sees which job runs; its page opens for the keys that may read it.
      if (worker.job) job.append(element("a", worker.job.slice(0, 8), { href: `#/jobs/${worker.job}` }));
      row.append(job, element("td", ago(worker.last_seen_seconds)), element("td", worker.version));
      body.append(row);
    }
    $("#pool-error").textContent = pool.items.length ? "" : "no workers have reported";
  }, "#pool-error", showPool);
}

// -- one job ---------------------------------------------------------------------------------

function newJobState(id) {
  return { id, points: {}, lastStep: {}, afterEvent: null, job: null };
}

function chart(name, title, points) {
  let box = $(`.chart[data-series="${CSS.escape(name)}"]`);
  if (!box) {
    box = element("div", null, { class: "chart", "data-series": name });
    box.append(element("h3", title));
    box.append(document.createElementNS("http://www.w3.org/2000/svg", "svg"));
    $("#charts").append(box);
  }
  const svg = box.querySelector("svg");
  const finite = points.filter(([, value]) => value !== null);
  box.setAttribute("data-points", String(finite.length));
  const last = finite.length ? finite[finite.length - 1][1] : null;
  box.querySelector("h3").textContent = last === null ? title : `${title}: ${last.toPrecision(4)}`;
  const [width, height, pad] = [400, 160, 28];
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  if (!finite.length) return;
  const steps = finite.map(([step]) => step);
  const values = finite.map(([, value]) => value);
  const [x0, x1] = [Math.min(...steps), Math.max(...steps)];
  const [y0, y1] = [Math.min(...values), Math.max(...values)];
  const x = (step) => pad + ((step - x0) / (x1 - x0 || 1)) * (width - 2 * pad);
  const y = (value) => height - pad - ((value - y0) / (y1 - y0 || 1)) * (height - 2 * pad);
  const ns = "http://www.w3.org/2000/svg";
  const line = document.createElementNS(ns, finite.length > 1 ? "polyline" : "circle");
  if (finite.length > 1) {
    line.setAttribute("points", finite.map(([s, v]) => `${x(s).toFixed(1)},${y(v).toFixed(1)}`).join(" "));
  } else {
    line.setAttribute("cx", x(steps[0]));
    line.setAttribute("cy", y(values[0]));
    line.setAttribute("r", 3);
  }
  svg.append(line);
  for (const [text, tx, ty] of [
    [y1.toPrecision(3), 2, pad - 4],
    [y0.toPrecision(3), 2, height - pad + 12],
    [`step ${x0}`, pad, height - 4],
    [`step ${x1}`, width - pad - 40, height - 4],
  ]) {
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", tx);
    label.setAttribute("y", ty);
    label.textContent = text;
    svg.append(label);
  }
}

async function refreshJob(state) {
  const job = await json(`/v1/jobs/${state.id}`);
  state.job = job;
  $("#job-name").textContent = job.name || "(unnamed job)";
  $("#job-id").textContent = job.id;
  const status = $("#job-status");
  status.textContent = job.cancel_requested && !FINISHED.has(job.status) ? "cancelling" : job.status;
  status.className = `status ${job.status}`;
  $("#job-progress").value = job.progress.fraction ?? 0;
  $("#job-steps").textContent = `step ${job.progress.step}/${job.progress.total_steps ?? "?"}`;
  $("#job-eta").textContent = job.status === "running" && job.progress.eta_seconds !== null ? `ETA ${eta(job.progress.eta_seconds)}` : "";
  $("#cancel").hidden = FINISHED.has(job.status);
  $("#student").hidden = job.status !== "succeeded";
  $("#job-error").textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";

  for (const [name, title, schedule] of SERIES) {
    if (schedule && !job.settings[schedule]) continue;
    const query = new URLSearchParams({ name });
    if (state.lastStep[name] !== undefined) query.set("after_step", state.lastStep[name]);
    const page = await json(`/v1/jobs/${state.id}/metrics?${query}`);
    const points = (state.points[name] ||= []);
    for (const point of page.items) points.push([point.step, point.value]);
    if (points.length) state.lastStep[name] = points[points.length - 1][0];
    if (points.length || name === "train/loss") chart(name, title, points);
  }

  const query = new URLSearchParams({ limit: "500" });
  if (state.afterEvent !== null) query.set("after", state.afterEvent);
  const events = await json(`/v1/jobs/${state.id}/events?${query}`);
  const list = $("#events");
  for (const event of events.items) {
    const time = new Date(event.created_at).toLocaleTimeString();
    list.append(element("li", `${time} ${event.type}: ${event.message}`, { class: event.level }));
  }
  while (list.children.length > EVENTS_SHOWN) list.firstChild.remove();
  if (events.items.length) list.lastChild.scrollIntoView({ block: "nearest" });
  state.afterEvent = events.next_after;

  const checkpoints = await json(`/v1/jobs/${state.id}/checkpoints`);
  const body = $("#checkpoints tbody");
  body.replaceChildren();
  for (const checkpoint of checkpoints.items) {
    const row = element("tr", null, { "data-step": checkpoint.step });
    row.append(element("td", checkpoint.step), element("td", checkpoint.best ? "best" : ""));
    const metrics = Object.entries(checkpoint.metrics)
      .filter(([name]) => name.startsWith("eval/"))
      .map(([name, value]) => `${name} ${value === null ? "null" : Number(value).toFixed(4)}`);
    row.append(element("td", metrics.join(", ")));
    const cell = element("td");
    const button = element("button", "download", { type: "button" });
    button.addEventListener("click", () =>
      download(checkpoint.download_url, `checkpoint-${state.id}-step-${checkpoint.step}.tar.gz`),
    );
    cell.append(button);
    row.append(cell);
    body.append(row);
  }
  return job;
}

async function download(path, filename) {
  // A plain link cannot send the key header: fetch with it, then save the bytes.
  try {
    const blob = await (await api(path)).blob();
    const link = element("a", null, { href: URL.createObjectURL(blob), download: filename });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 60000);
  } catch (error) {
    failed(error, "#job-error");
  }
}

async function showJob(id) {
  show("job-view");
  $("#charts").replaceChildren();
  $("#events").replaceChildren();
  $("#checkpoints tbody").replaceChildren();
  $("#job-error").textContent = "";
  const state = newJobState(id);
  $("#cancel").onclick = async () => {
    try {
      await json(`/v1/jobs/${id}/cancel`, { method: "POST" });
      await refreshJob(state);
    } catch (error) {
      failed(error, "#job-error");
    }
  };
  $("#student").onclick = () => download(`/v1/jobs/${id}/student`, `student-${id}.tar.gz`);
  const poll = async () => {
    try {
      const job = await refreshJob(state);
      if (FINISHED.has(job.status)) return;  // the last refresh drew the finished job
    } catch (error) {
      failed(error, "#job-error");
      if (error instanceof KeyRefused) return;
    }
    timer = setTimeout(poll, POLL_MS);
  };
  await poll();
}

// -- routing ---------------------------------------------------------------------------------

function stopPolling() {
  if (timer !== null) clearTimeout(timer);
  timer = null;
}

function route() {
  stopPolling();
  if (!apiKey()) {
    askForKey("");
    return;
  }
  const match = location.hash.match(/^#\/jobs\/([0-9a-f]{32})$/);
  if (match) showJob(match[1]);
  else if (location.hash === "#/pool") showPool();
  else showList();
}

window.addEventListener("hashchange", route);
route();
