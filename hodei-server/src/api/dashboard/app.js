// The Hodei dashboard: runs, a run's steps and actions, job logs, workers; live over the
// operator API's server-sent events. Everything from a run (names, errors, payloads, log bytes)
// is put in the page as text nodes, never parsed as HTML.

import { el } from "./dom.js";
import { payloadForm } from "./payload_form.js";

const main = document.getElementById("main");
let session = null; // { name, role } once logged in
let stop = () => {}; // ends the current view's streams

// ---- DOM -------------------------------------------------------------------------------

function show(...nodes) {
  main.replaceChildren(...nodes.flat().filter((node) => node !== null && node !== undefined && node !== false));
}

const statusTag = (status) => el("span", { class: `status status-${status}` }, status.replaceAll("_", " "));
const time = (iso) => (iso ? iso.replace("T", " ").replace("Z", "") : "–");
const json = (value) => el("pre", { class: "json" }, JSON.stringify(value, null, 2));
const collapsible = (label, value) =>
  value === undefined ? "–" : el("details", {}, el("summary", {}, label), json(value));

function duration(ms) {
  if (ms === undefined || ms === null) return "–";
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.floor(ms / 60000)} m ${Math.round((ms % 60000) / 1000)} s`;
}

// ---- API -------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** A JSON request with the session cookie and the CSRF header the API requires with it. */
async function api(path, { method = "GET", body } = {}) {
  const headers = { "X-Hodei-CSRF": "1" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  const value = text ? JSON.parse(text) : null;
  if (!response.ok) {
    const error = value && value.error ? value.error : { code: "http", message: response.statusText };
    if (response.status === 401 && !path.endsWith("/session")) location.hash = "#/login";
    throw new ApiError(response.status, error.code, error.message);
  }
  return value;
}

/**
 * Follows a server-sent event stream with fetch (so the CSRF header goes with it), calling
 * onEvent({event, id, data}) for each event; reconnects with Last-Event-ID after a dropped
 * connection, so nothing is missed or seen twice. Returns a function that stops it.
 */
function follow(path, onEvent, { onEnd } = {}) {
  const controller = new AbortController();
  let lastId = null;
  let ended = false;
  const run = async () => {
    let failures = 0;
    while (!controller.signal.aborted && !ended) {
      try {
        const headers = { "X-Hodei-CSRF": "1" };
        if (lastId !== null) headers["Last-Event-ID"] = lastId;
        const response = await fetch(path, { headers, credentials: "same-origin", signal: controller.signal });
        if (!response.ok) throw new ApiError(response.status, "http", response.statusText);
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        let event = { event: "message", id: null, data: [] };
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          failures = 0;
          buffer += decoder.decode(value, { stream: true });
          let newline;
          while ((newline = buffer.indexOf("\n")) >= 0) {
            const line = buffer.slice(0, newline).replace(/\r$/, "");
            buffer = buffer.slice(newline + 1);
            if (line === "") {
              if (event.data.length) {
                if (event.id !== null) lastId = event.id;
                onEvent({ event: event.event, id: event.id, data: event.data.join("\n") });
              }
              event = { event: "message", id: null, data: [] };
            } else if (line.startsWith(":")) {
              // A keep-alive comment.
            } else {
              const colon = line.indexOf(":");
              const field = colon < 0 ? line : line.slice(0, colon);
              const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
              if (field === "data") event.data.push(value);
              else if (field === "event") event.event = value;
              else if (field === "id") event.id = value;
            }
          }
        }
        // The server ended the stream: the run or the log has ended.
        ended = true;
        if (onEnd) onEnd();
      } catch (error) {
        if (controller.signal.aborted) return;
        if (error instanceof ApiError && error.status < 500) return;
        failures += 1;
        await new Promise((resolve) => setTimeout(resolve, Math.min(250 * 2 ** failures, 5000)));
      }
    }
  };
  run();
  return () => controller.abort();
}

const canOperate = () => session && (session.role === "operator" || session.role === "admin");

/** A button that asks for a second click before it acts, then shows what happened. */
function confirmButton(label, confirmLabel, action, { danger = false } = {}) {
  const button = el("button", { type: "button", class: danger ? "danger" : undefined }, label);
  let armed = false;
  let timer;
  button.addEventListener("click", async () => {
    if (!armed) {
      armed = true;
      button.textContent = confirmLabel;
      timer = setTimeout(() => {
        armed = false;
        button.textContent = label;
      }, 5000);
      return;
    }
    clearTimeout(timer);
    armed = false;
    button.disabled = true;
    try {
      await action();
      button.textContent = `${label}: done`;
    } catch (error) {
      button.textContent = `${label}: ${error.message}`;
      button.disabled = false;
    }
  });
  return button;
}

// ---- Views -----------------------------------------------------------------------------

function loginView(message) {
  const token = el("input", { type: "password", name: "token", id: "token", autocomplete: "off", placeholder: "hodei_…", required: true });
  const note = el("p", { class: "error", id: "login-error", role: "alert" }, message || "");
  const form = el(
    "form",
    { class: "login", id: "login" },
    el("h1", {}, "Log in"),
    el("label", { for: "token" }, "API token"),
    token,
    el("button", { type: "submit" }, "Log in"),
    note,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      session = await api("/api/v1/session", { method: "POST", body: { token: token.value } });
      renderWho();
      location.hash = "#/";
    } catch (error) {
      note.textContent = `Login failed: ${error.message}`;
    }
  });
  show(form);
  token.focus();
}

/** The runs list's time filter: relative, so that a shared link keeps meaning "recent". */
const SINCE = [
  ["", "any time", 0],
  ["1h", "last hour", 3600e3],
  ["24h", "last 24 hours", 86400e3],
  ["7d", "last 7 days", 7 * 86400e3],
  ["30d", "last 30 days", 30 * 86400e3],
];

async function runsView(params) {
  const status = params.get("status") || "";
  const definition = params.get("definition") || "";
  const search = params.get("q") || "";
  const since = SINCE.find(([key]) => key === (params.get("since") || "")) || SINCE[0];
  const query = new URLSearchParams();
  if (status) query.set("status", status);
  if (definition) query.set("definition", definition);
  if (search) query.set("q", search);
  if (since[2]) query.set("created_after", new Date(Date.now() - since[2]).toISOString());
  const select = el(
    "select",
    { id: "status-filter", "aria-label": "Status" },
    ["", "running", "paused", "compensating", "parked", "completed", "compensated", "compensation_failed", "failed"].map((s) =>
      el("option", { value: s, selected: s === status }, s || "any status"),
    ),
  );
  const definitionInput = el("input", { id: "definition-filter", placeholder: "definition", value: definition, "aria-label": "Definition" });
  const searchInput = el("input", { id: "search", placeholder: "search ids", value: search, "aria-label": "Search" });
  const sinceSelect = el(
    "select",
    { id: "since-filter", "aria-label": "Started" },
    SINCE.map(([key, label]) => el("option", { value: key, selected: key === since[0] }, label)),
  );
  const apply = () => {
    const next = new URLSearchParams();
    if (select.value) next.set("status", select.value);
    if (definitionInput.value) next.set("definition", definitionInput.value);
    if (searchInput.value) next.set("q", searchInput.value);
    if (sinceSelect.value) next.set("since", sinceSelect.value);
    location.hash = `#/?${next}`;
  };
  select.addEventListener("change", apply);
  sinceSelect.addEventListener("change", apply);
  definitionInput.addEventListener("change", apply);
  searchInput.addEventListener("change", apply);
  const body = el("tbody", { id: "runs" });
  const more = el("button", { type: "button", hidden: true }, "More");
  const rows = new Map();
  const row = (run) =>
    el(
      "tr",
      { "data-run": run.id },
      el("td", {}, el("a", { href: `#/runs/${encodeURIComponent(run.id)}` }, run.id)),
      el("td", {}, `${run.definition} v${run.version}`),
      el("td", {}, statusTag(run.status)),
      el("td", {}, time(run.created_at)),
      el("td", {}, time(run.updated_at)),
    );
  const put = (run, atTop) => {
    const fresh = row(run);
    const old = rows.get(run.id);
    if (old) old.replaceWith(fresh);
    else if (atTop) body.prepend(fresh);
    else body.append(fresh);
    rows.set(run.id, fresh);
  };
  let cursor = null;
  const load = async () => {
    const page = new URLSearchParams(query);
    page.set("limit", "100");
    if (cursor) page.set("cursor", cursor);
    const result = await api(`/api/v1/runs?${page}`);
    result.runs.forEach((run) => put(run, false));
    cursor = result.next_cursor || null;
    more.hidden = !cursor;
  };
  more.addEventListener("click", load);
  show(
    el("h1", {}, "Runs"),
    el("div", { class: "filters" }, select, definitionInput, searchInput, sinceSelect),
    el("table", {}, el("thead", {}, el("tr", {}, ["Run", "Definition", "Status", "Started", "Updated"].map((h) => el("th", {}, h)))), body),
    more,
  );
  await load();
  const live = new URLSearchParams(query);
  live.set("follow", "true");
  stop = follow(`/api/v1/runs?${live}`, ({ event, data }) => {
    if (event === "run") put(JSON.parse(data), true);
    if (event === "lagged") runsView(params);
  });
}

/** Where a key's operation runs: its group and branch at each level (`tests[1]`), or "". */
function laneOf(key, groups) {
  const parts = key.split(".");
  const lanes = [];
  for (let i = 0; i + 1 < parts.length - 1; i += 2) {
    lanes.push(`${groups.get(parts.slice(0, i + 1).join(".")) || parts[i]}[${parts[i + 1]}]`);
  }
  return lanes.join(" › ");
}

/**
 * The run on a time axis: each step's attempts and the backoffs between them, each timer and
 * each wait for a signal, a row each, with the branch of a fan-out it runs in; concurrent
 * branches overlap in time on their own rows.
 */
function timeline(run) {
  const now = Date.now();
  const at = (iso) => (iso ? Date.parse(iso) : now);
  const groups = new Map(run.branches.map((g) => [g.key, g.name]));
  const rows = [];
  for (const step of run.steps) {
    const segments = [];
    for (const attempt of step.attempts) {
      const end = attempt.ended_at ? at(attempt.ended_at) : step.ended_at ? at(step.ended_at) : now;
      segments.push({ from: at(attempt.started_at), to: end, kind: `attempt ${attempt.error ? "failed" : step.state}`, title: `attempt ${attempt.attempt}${attempt.error ? `: ${attempt.error}` : ""}` });
      if (attempt.retry_at) segments.push({ from: end, to: Math.min(at(attempt.retry_at), now), kind: "backoff", title: `backoff until ${time(attempt.retry_at)}` });
    }
    rows.push({ label: step.name, lane: laneOf(step.key, groups), segments });
  }
  for (const timer of run.timers) {
    rows.push({ label: `timer ${timer.key}`, lane: laneOf(timer.key, groups), segments: [{ from: at(timer.set_at), to: Math.min(at(timer.due), now), kind: "timer", title: `due ${time(timer.due)}` }] });
  }
  for (const wait of run.signal_waits) {
    rows.push({ label: `wait for ${wait.name}`, lane: laneOf(wait.key, groups), segments: [{ from: at(wait.started_at), to: at(wait.ended_at), kind: `wait ${wait.state}`, title: wait.state }] });
  }
  if (rows.length === 0) return null;
  const t0 = Math.min(...rows.flatMap((r) => r.segments.map((s) => s.from)));
  const t1 = Math.max(...rows.flatMap((r) => r.segments.map((s) => s.to)));
  const span = Math.max(1, t1 - t0);
  rows.sort((a, b) => Math.min(...a.segments.map((s) => s.from)) - Math.min(...b.segments.map((s) => s.from)));
  return el(
    "section",
    { id: "timeline" },
    el("h2", {}, "Timeline ", el("small", { class: "muted" }, duration(span))),
    rows.map((row) =>
      el(
        "div",
        { class: "lane-row" },
        el("span", { class: "lane-label" }, row.lane ? el("small", { class: "muted" }, `${row.lane} `) : null, row.label),
        el(
          "div",
          { class: "waterfall" },
          row.segments.map((segment) =>
            el("div", {
              class: `seg ${segment.kind}`,
              title: segment.title,
              style: `left:${((segment.from - t0) / span) * 100}%;width:${((segment.to - segment.from) / span) * 100}%`,
            }),
          ),
        ),
      ),
    ),
  );
}

/** The saga's step calls in source order, each coloured by the state of its latest step. */
function shapeGraph(definition, run) {
  const stateOf = (name) => {
    const steps = run.steps.filter((s) => s.name === name);
    return steps.length ? steps[steps.length - 1].state : "pending";
  };
  const nodes = [];
  definition.steps.forEach((step, i) => {
    if (i > 0) nodes.push(el("span", { class: "shape-edge", "aria-hidden": "true" }, "→"));
    const state = stateOf(step.name);
    nodes.push(
      el(
        "span",
        { class: `shape-node status-${state}`, title: step.compensation ? `compensated by ${step.compensation}` : undefined },
        step.name,
        el("small", {}, ` ${state.replaceAll("_", " ")}`),
      ),
    );
  });
  return el("div", { class: "shape", id: "shape", "aria-label": "The saga's steps" }, nodes);
}

function actions(run) {
  if (!canOperate()) return null;
  const id = encodeURIComponent(run.id);
  const post = (verb, body) => () => api(`/api/v1/runs/${id}/${verb}`, { method: "POST", body: body === undefined ? {} : body() });
  const ended = ["completed", "compensated", "failed", "compensation_failed"].includes(run.status);
  const buttons = [];
  const waiting = run.signal_waits.filter((w) => w.state === "waiting");
  if (waiting.length) {
    const name = el("input", { id: "signal-name", value: waiting[0].name, "aria-label": "Signal" });
    // A form for the payload type the wait named, or a JSON box where it has no schema (an
    // untraceable type, a signal sent ahead of its wait, a journal from before schemas).
    const payloadSlot = el("span", { id: "signal-payload-slot" });
    let readPayload;
    let offered = null; // the wait whose payload the slot holds a field for, if any
    const offer = (wait) => {
      offered = wait;
      if (wait && wait.payload_schema) {
        const form = payloadForm(wait.payload_schema);
        payloadSlot.replaceChildren(el("div", { class: "payload-form", id: "signal-form" }, form.node));
        readPayload = form.read;
      } else {
        const box = el("textarea", { id: "signal-payload", rows: 2, cols: 40, "aria-label": "Payload (JSON)" }, "{}");
        payloadSlot.replaceChildren(box);
        readPayload = () => JSON.parse(box.value || "null");
      }
    };
    // Rebuilt only when the name comes to mean another wait, so typing keeps what was filled.
    const waitNamed = () => waiting.find((w) => w.name === name.value) || null;
    name.addEventListener("input", () => {
      if (waitNamed() !== offered) offer(waitNamed());
    });
    offer(waitNamed());
    buttons.push(
      el(
        "span",
        { class: "signal-action" },
        name,
        payloadSlot,
        confirmButton("Approve", "Confirm: send it", post("signals", () => ({ name: name.value, payload: readPayload() }))),
      ),
    );
  }
  if (!ended) {
    const reason = el("input", { id: "cancel-reason", placeholder: "reason", "aria-label": "Cancel reason" });
    buttons.push(el("span", {}, reason, confirmButton("Cancel run", "Confirm: cancel and compensate", post("cancel", () => ({ reason: reason.value || undefined })), { danger: true })));
    buttons.push(run.status === "paused" ? confirmButton("Resume", "Confirm: resume", post("resume")) : confirmButton("Pause", "Confirm: pause", post("pause")));
  }
  if (run.steps.some((s) => s.state === "waiting_to_retry")) buttons.push(confirmButton("Retry now", "Confirm: retry now", post("retry")));
  if (run.status === "compensation_failed") buttons.push(confirmButton("Retry compensation", "Confirm: retry", post("retry-compensation")));
  const forkId = el("input", { id: "fork-id", placeholder: "new run id", "aria-label": "Fork id" });
  const forkStep = el("input", { id: "fork-step", placeholder: "from step (default: after the last good one)", "aria-label": "Fork from step" });
  const forkVersion = el("input", { id: "fork-version", placeholder: "version (default: its own)", "aria-label": "Fork onto version" });
  buttons.push(
    el(
      "span",
      {},
      forkId,
      forkStep,
      forkVersion,
      confirmButton("Re-run from step", "Confirm: fork", async () => {
        const body = { id: forkId.value };
        if (forkStep.value !== "") body.from_step = Number(forkStep.value);
        if (forkVersion.value !== "") body.version = Number(forkVersion.value);
        const fork = await api(`/api/v1/runs/${id}/fork`, { method: "POST", body });
        location.hash = `#/runs/${encodeURIComponent(fork.id)}`;
      }),
    ),
  );
  return el("div", { class: "actions", id: "actions" }, buttons);
}

async function runView(id) {
  let stopped = false;
  // The actions panel is rebuilt only when what it offers changes, so that a live update never
  // throws away a payload or a reason being typed.
  const actionsSlot = el("div");
  let actionsKey = null;
  const header = el("div");
  const shapeSlot = el("div");
  const body = el("div");
  show(header, actionsSlot, shapeSlot, body);
  // The static shape from the macros, for definitions made with #[saga].
  const definitions = await api("/api/v1/definitions").catch(() => []);
  const render = async () => {
    const run = await api(`/api/v1/runs/${encodeURIComponent(id)}`);
    if (stopped) return run;
    const key = JSON.stringify([
      run.status,
      run.signal_waits.filter((w) => w.state === "waiting").map((w) => w.name),
      run.steps.some((s) => s.state === "waiting_to_retry"),
      session && session.role,
    ]);
    if (key !== actionsKey) {
      actionsKey = key;
      actionsSlot.replaceChildren(...[actions(run)].filter(Boolean));
    }
    const definition = definitions.find((d) => d.name === run.definition && d.version === run.version);
    shapeSlot.replaceChildren(...[definition && definition.steps.length ? shapeGraph(definition, run) : null].filter(Boolean));
    const steps = el(
      "tbody",
      { id: "steps" },
      run.steps.map((step) =>
        el(
          "tr",
          { "data-step": step.step },
          el("td", {}, step.step),
          el("td", {}, step.name),
          el("td", {}, statusTag(step.state)),
          el("td", {}, duration(step.duration_ms)),
          el("td", {}, step.attempts.length),
          el(
            "td",
            {},
            step.jobs.map((job) =>
              el(
                "div",
                {},
                el("a", { href: `#/jobs/${encodeURIComponent(job.job_id)}/stdout` }, job.job_id),
                ` ${job.outcome || "running"}`,
                job.worker ? ` on ${job.worker}` : "",
              ),
            ),
          ),
          el("td", {}, step.compensation ? `${step.compensation.state} (${step.compensation.attempts})` : "–"),
          el(
            "td",
            {},
            collapsible("input", step.input),
            step.output === undefined ? null : collapsible("output", step.output),
            step.error ? el("div", { class: "error step-error" }, step.error) : null,
          ),
        ),
      ),
    );
    const signals = run.signals.map((s) =>
      el("li", {}, `signal ${s.name}`, s.by ? ` by ${s.by}` : "", ` at ${time(s.received_at)}`, s.consumed_by ? "" : " (waiting in the inbox)"),
    );
    const requests = run.requests.map((r) => el("li", {}, `${r.action.replaceAll("_", " ")}`, r.by ? ` by ${r.by}` : "", ` at ${time(r.at)}`, r.reason ? `: ${r.reason}` : ""));
    const waits = run.signal_waits.filter((w) => w.state === "waiting").map((w) => el("li", {}, `waiting for signal ${w.name}`, w.timeout_at ? ` until ${time(w.timeout_at)}` : ""));
    const timers = run.timers.filter((t) => !t.fired).map((t) => el("li", {}, `timer ${t.key} due ${time(t.due)}`));
    // The compensations in the order they ran (the reverse of the steps they undo).
    const compensations = run.steps
      .filter((step) => step.compensation)
      .sort((a, b) => Date.parse(a.compensation.started_at) - Date.parse(b.compensation.started_at))
      .map((step) =>
        el(
          "li",
          {},
          `${step.name}: `,
          statusTag(step.compensation.state),
          ` · ${step.compensation.attempts} attempt${step.compensation.attempts === 1 ? "" : "s"} · ${time(step.compensation.started_at)}`,
          step.compensation.error ? el("span", { class: "error" }, ` · ${step.compensation.error}`) : null,
        ),
      );
    header.replaceChildren(
      el("h1", {}, run.id, " ", statusTag(run.status)),
      el(
        "p",
        { class: "muted" },
        `${run.definition} v${run.version} · started ${time(run.created_at)} · updated ${time(run.updated_at)}`,
        run.reason ? ` · ${run.reason}` : "",
      ),
    );
    body.replaceChildren(
      ...[
        run.error ? el("p", { class: "error", id: "run-error" }, run.error) : null,
        collapsible("input", run.input),
        run.output === undefined ? null : collapsible("output", run.output),
        timeline(run),
        el(
          "table",
          {},
          el("thead", {}, el("tr", {}, ["#", "Step", "State", "Duration", "Attempts", "Jobs", "Compensation", "Data"].map((h) => el("th", {}, h)))),
          steps,
        ),
        waits.length || timers.length ? el("section", {}, el("h2", {}, "Waiting for"), el("ul", {}, waits, timers)) : null,
        compensations.length ? el("section", {}, el("h2", {}, "Compensations, in the order they ran"), el("ol", { id: "compensations" }, compensations)) : null,
        signals.length ? el("section", {}, el("h2", {}, "Signals"), el("ul", { id: "signals" }, signals)) : null,
        requests.length ? el("section", {}, el("h2", {}, "Who did what"), el("ul", { id: "requests" }, requests)) : null,
        run.children.length
          ? el("section", {}, el("h2", {}, "Child runs"), el("ul", {}, run.children.map((c) => el("li", {}, el("a", { href: `#/runs/${encodeURIComponent(c.run)}` }, c.run), ` (${c.definition}, step ${c.step})`))))
          : null,
      ].filter(Boolean),
    );
    return run;
  };
  const first = await render();
  // Live: each new journal entry re-reads the run, at most one read in flight.
  let pending = false;
  let again = false;
  const refresh = async () => {
    if (pending) {
      again = true;
      return;
    }
    pending = true;
    do {
      again = false;
      await render().catch(() => {});
    } while (again);
    pending = false;
  };
  const after = first.journal_length > 0 ? `&after=${first.journal_length - 1}` : "";
  const stopFollow = follow(`/api/v1/runs/${encodeURIComponent(id)}/events?follow=true${after}`, refresh, { onEnd: refresh });
  stop = () => {
    stopped = true;
    stopFollow();
  };
}

/** SGR colour and bold codes as classes; everything else in an escape is dropped. */
function ansiLine(text) {
  const parts = [];
  let classes = [];
  const pattern = /\x1b\[([0-9;]*)m/g;
  let last = 0;
  let match;
  while ((match = pattern.exec(text))) {
    if (match.index > last) parts.push(el("span", { class: classes.join(" ") || undefined }, text.slice(last, match.index)));
    for (const code of (match[1] || "0").split(";").map(Number)) {
      if (code === 0) classes = [];
      else if (code === 1) classes.push("ansi-bold");
      else if (code >= 30 && code <= 37) classes = classes.filter((c) => !/^ansi-3/.test(c)).concat(`ansi-${code}`);
      else if (code >= 90 && code <= 97) classes = classes.filter((c) => !/^ansi-3/.test(c)).concat(`ansi-${code - 60}`);
    }
    last = pattern.lastIndex;
  }
  if (last < text.length) parts.push(el("span", { class: classes.join(" ") || undefined }, text.slice(last)));
  // Any other escape sequence is removed rather than shown raw.
  parts.forEach((p) => (p.textContent = p.textContent.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, "")));
  return parts;
}

/** Lines a log view renders beyond the screen, above and below, so scrolling shows no gap. */
const OVERSCAN = 40;

/**
 * A job's log, followed live. Only the lines on screen are in the page (a million-line log is a
 * million strings, not a million elements): a spacer gives the scrollbar the whole height, and
 * the window of lines in view is drawn again as the view scrolls or grows. Every line is one
 * row of a fixed height, so a line's place is its number.
 */
function logView(job, stream, params) {
  const rows = el("ol", { class: "log", id: "log" });
  const spacer = el("div", { class: "log-spacer" }, rows);
  const viewport = el("div", { class: "log-view", id: "log-view", tabindex: "0", "aria-label": "Log" }, spacer);
  const search = el("input", { id: "log-search", placeholder: "search", "aria-label": "Search the log" });
  const found = el("span", { class: "muted", id: "log-hits" });
  const status = el("span", { class: "muted", id: "log-status" }, "following…");
  const download = el("a", { id: "log-download", download: `${job.replaceAll("/", "_")}.${stream}.log`, hidden: true }, "Download");
  let target = Number(params.get("line") || 0);
  const lines = [];
  let partial = "";
  let hits = [];
  let hitAt = -1;
  let lineHeight = 0;
  let follow_tail = target === 0;

  const draw = () => {
    if (!lineHeight) {
      // One row's real height, measured once, so the CSS decides it.
      const probe = el("li", {}, el("a", {}, "0"), el("span", { class: "text" }, " "));
      rows.replaceChildren(probe);
      lineHeight = probe.getBoundingClientRect().height || 18;
    }
    spacer.style.height = `${lines.length * lineHeight}px`;
    const first = Math.max(0, Math.floor(viewport.scrollTop / lineHeight) - OVERSCAN);
    const last = Math.min(lines.length, Math.ceil((viewport.scrollTop + viewport.clientHeight) / lineHeight) + OVERSCAN);
    rows.style.top = `${first * lineHeight}px`;
    const needle = search.value;
    const items = [];
    for (let i = first; i < last; i++) {
      const n = i + 1;
      const classes = [n === target ? "target" : "", needle && lines[i].includes(needle) ? "hit" : ""].filter(Boolean).join(" ");
      items.push(
        el(
          "li",
          { id: `L${n}`, class: classes || undefined },
          el("a", { href: `#/jobs/${encodeURIComponent(job)}/${stream}?line=${n}` }, n),
          el("span", { class: "text" }, ansiLine(lines[i])),
        ),
      );
    }
    rows.replaceChildren(...items);
  };
  const scrollTo = (n) => {
    viewport.scrollTop = Math.max(0, (n - 1) * lineHeight - viewport.clientHeight / 2);
    draw();
  };
  let queued = false;
  const redraw = () => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => {
      queued = false;
      draw();
      if (follow_tail) viewport.scrollTop = viewport.scrollHeight;
      else if (target && target <= lines.length && !viewport.dataset.placed) {
        viewport.dataset.placed = "1";
        scrollTo(target);
      }
    });
  };
  viewport.addEventListener("scroll", () => {
    // Following the tail stops when the reader scrolls up, and starts again at the bottom.
    follow_tail = viewport.scrollTop + viewport.clientHeight >= viewport.scrollHeight - lineHeight;
    draw();
  });
  search.addEventListener("input", () => {
    const needle = search.value;
    hits = needle ? lines.flatMap((line, i) => (line.includes(needle) ? [i + 1] : [])) : [];
    hitAt = -1;
    found.textContent = needle ? `${hits.length} matching lines` : "";
    draw();
  });
  search.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || hits.length === 0) return;
    hitAt = (hitAt + (event.shiftKey ? hits.length - 1 : 1)) % hits.length;
    follow_tail = false;
    target = hits[hitAt];
    scrollTo(target);
  });
  const other = stream === "stdout" ? "stderr" : "stdout";
  show(
    el("h1", {}, job, " ", stream),
    el("div", { class: "filters" }, search, found, download, el("a", { href: `#/jobs/${encodeURIComponent(job)}/${other}` }, other), status),
    viewport,
  );
  stop = follow(
    `/api/v1/jobs/${encodeURIComponent(job)}/logs/${stream}?follow=true`,
    ({ event, data }) => {
      if (event !== "log") return;
      const chunk = JSON.parse(data);
      const text = partial + chunk.text;
      const split = text.split("\n");
      partial = split.pop();
      for (const line of split) lines.push(line);
      status.textContent = `following… ${lines.length} lines`;
      redraw();
    },
    {
      onEnd: () => {
        if (partial) lines.push(partial);
        partial = "";
        status.textContent = `ended · ${lines.length} lines`;
        // The whole log as it was printed, for saving.
        download.href = URL.createObjectURL(new Blob([lines.join("\n") + "\n"], { type: "text/plain" }));
        download.hidden = false;
        redraw();
      },
    },
  );
}

/** A sparkline of `values` as an inline SVG polyline (made through the DOM, not markup). */
function sparkline(values, label) {
  const svgNs = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNs, "svg");
  svg.setAttribute("class", "sparkline");
  svg.setAttribute("viewBox", "0 0 100 20");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
  const max = Math.max(1e-9, ...values);
  const points = values.map((v, i) => `${values.length < 2 ? 0 : (i / (values.length - 1)) * 100},${20 - (v / max) * 18 - 1}`);
  const line = document.createElementNS(svgNs, "polyline");
  line.setAttribute("points", points.join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "currentColor");
  line.setAttribute("stroke-width", "1.5");
  svg.append(line);
  return svg;
}

/** Samples kept per worker for its sparklines. */
const SPARK_SAMPLES = 60;

async function workersView() {
  const history = new Map(); // worker id -> [{t, cpu, mem}]
  const body = el("tbody", { id: "workers" });
  const render = async () => {
    const workers = await api("/api/v1/workers");
    body.replaceChildren(
      ...workers.map((w) => {
        const samples = history.get(w.id) || [];
        // CPU as a share of one core between samples; memory as sampled.
        const cpu = samples.slice(1).map((s, i) => Math.max(0, (s.cpu - samples[i].cpu) / 1000 / Math.max(1, s.t - samples[i].t)));
        const mem = samples.map((s) => s.mem);
        const last = samples[samples.length - 1];
        return el(
          "tr",
          { "data-worker": w.id },
          el("td", {}, w.id),
          el("td", {}, w.provider || "–"),
          el("td", {}, statusTag(w.draining ? `${w.state} (draining)` : w.state)),
          el("td", {}, Object.entries(w.labels).map(([k, v]) => `${k}=${v}`).join(", ") || "–"),
          el("td", {}, time(w.last_heard)),
          el("td", {}, w.jobs.join(", ") || "–"),
          el("td", { class: "spark-cpu" }, cpu.length ? [sparkline(cpu, "cpu"), ` ${(cpu[cpu.length - 1] * 100).toFixed(0)} %`] : "–"),
          el("td", { class: "spark-mem" }, mem.length ? [sparkline(mem, "memory"), ` ${(last.mem / 2 ** 20).toFixed(1)} MiB`] : "–"),
        );
      }),
    );
    return workers;
  };
  const workers = await render();
  show(
    el("h1", {}, "Workers"),
    workers.length === 0 ? el("p", { class: "muted", id: "no-workers" }, "No workers yet; this page updates as they come.") : null,
    el(
      "table",
      {},
      el("thead", {}, el("tr", {}, ["Worker", "Provider", "State", "Labels", "Last heard", "Jobs", "CPU", "Memory"].map((h) => el("th", {}, h)))),
      body,
    ),
  );
  let queued = false;
  stop = follow("/api/v1/metrics", ({ event, data }) => {
    if (event !== "sample") return;
    const sample = JSON.parse(data);
    if (!sample.worker) return;
    const list = history.get(sample.worker) || [];
    list.push({ t: Date.parse(sample.at), cpu: sample.cpu_usage_usec, mem: sample.memory_current_bytes });
    if (list.length > SPARK_SAMPLES) list.shift();
    history.set(sample.worker, list);
    if (queued) return;
    queued = true;
    requestAnimationFrame(async () => {
      queued = false;
      await render().catch(() => {});
    });
  });
}

// ---- Routing ---------------------------------------------------------------------------

function renderWho() {
  const who = document.getElementById("who");
  who.textContent = session ? `${session.name} (${session.role})` : "";
  document.getElementById("logout").hidden = !session;
}

async function route() {
  stop();
  stop = () => {};
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query || "");
  const parts = (path || "/").split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "login") return loginView();
  if (!session) {
    try {
      session = await api("/api/v1/session");
      renderWho();
    } catch {
      return loginView();
    }
  }
  try {
    if (parts.length === 0) await runsView(params);
    else if (parts[0] === "runs" && parts[1]) await runView(parts[1]);
    else if (parts[0] === "jobs" && parts[1]) logView(parts[1], parts[2] === "stderr" ? "stderr" : "stdout", params);
    else if (parts[0] === "workers") await workersView();
    else show(el("p", {}, "Nothing here."), el("a", { href: "#/" }, "Runs"));
  } catch (error) {
    show(el("p", { class: "error", role: "alert" }, error.message));
  }
  main.focus();
}

document.getElementById("logout").addEventListener("click", async () => {
  await api("/api/v1/session", { method: "DELETE" }).catch(() => {});
  session = null;
  renderWho();
  location.hash = "#/login";
});
window.addEventListener("hashchange", route);
route();
