// kimi-pool dashboard. Plain JavaScript, no build step; the charts are uPlot (vendor/, MIT).
//
// The master key is asked for once, kept in this tab's sessionStorage and sent as a Bearer token with
// every fetch; a 401 or 403 forgets it and asks again. Everything shown comes from the server's JSON
// and is put in the page as text (textContent), never as HTML.
(() => {
  "use strict";

  const KEY_STORAGE = "kimi-pool.master-key";
  const REFRESH_MS = 3000;
  const EVENTS_LIMIT = 20;
  const FAILURES_LIMIT = 20;
  const ACTIVITY_MS = 10000;
  const FAILURES_SINCE = { "15m": "15m", "1h": "1h", "6h": "6h" }; // else the last 24 h
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                   "#bcbd22", "#7f7f7f"];
  const NONE_LABEL = { account: "(no account)", key: "(no key)" };

  const $ = (id) => document.getElementById(id);
  const charts = new Map(); // figure id → { plot, names }
  let timer = null;
  let running = null;       // the refresh under way (a promise), if any
  let again = false;        // another refresh was asked for while one ran
  let serverNow = Date.now() / 1000;
  let today = new Map();     // account → its usage today, from the series by account
  const lastRead = new Map(); // what → when it was last read (Date.now())
  const seriesStep = new Map(); // range → the step the server chose for it

  class AuthError extends Error {}

  // --- fetching --------------------------------------------------------------------------------------

  async function api(path, { method = "GET", body } = {}) {
    const key = sessionStorage.getItem(KEY_STORAGE) || "";
    const headers = { Accept: "application/json" };
    headers.Authorization = "Bearer " + key;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method, headers, body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store", credentials: "omit", redirect: "error",
      });
    } catch (err) {
      if (err instanceof TypeError && /header/i.test(err.message)) throw new AuthError("That key cannot be sent in a header.");
      throw new Error("the server cannot be reached (" + err.message + ")");
    }
    let data = null;
    try { data = await response.json(); } catch { data = null; }
    if (!response.ok) {
      const message = (data && data.error && data.error.message) || `${response.status} ${response.statusText}`;
      if (response.status === 401 || response.status === 403) throw new AuthError(message);
      throw new Error(message);
    }
    return data;
  }

  // --- small helpers ---------------------------------------------------------------------------------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "text") node.textContent = String(value);
      else if (name === "class") node.className = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    return node;
  }

  const integer = new Intl.NumberFormat();
  function num(value) { return value === null || value === undefined ? "–" : integer.format(value); }
  function compact(value) {
    if (value === null || value === undefined) return "";
    const abs = Math.abs(value);
    if (abs >= 1e9) return (value / 1e9).toFixed(abs >= 1e10 ? 0 : 1) + "G";
    if (abs >= 1e6) return (value / 1e6).toFixed(abs >= 1e7 ? 0 : 1) + "M";
    if (abs >= 1e3) return (value / 1e3).toFixed(abs >= 1e4 ? 0 : 1) + "k";
    return String(Math.round(value * 100) / 100);
  }
  function pad(n) { return String(n).padStart(2, "0"); }
  function clock(ts) {
    const d = new Date(ts * 1000);
    const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    const today = new Date(serverNow * 1000);
    if (d.toDateString() === today.toDateString()) return time;
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}`;
  }
  function span(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    if (seconds < 90) return `${seconds} s`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
    if (seconds < 172800) return `${Math.round(seconds / 3600)} h`;
    return `${Math.round(seconds / 86400)} d`;
  }
  function badge(state) { return el("span", { class: "badge", "data-state": state, text: state }); }
  function label(name, by) { return name === null || name === undefined ? NONE_LABEL[by] : name; }

  function notice(text, isError = false) {
    const box = $("notice");
    box.textContent = text || "";
    box.classList.toggle("error", isError);
    box.hidden = !text;
  }

  // --- sign in and out -------------------------------------------------------------------------------

  function showLogin(message) {
    clearInterval(timer);
    timer = null;
    $("dashboard").hidden = true;
    $("sign-out").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("summary").textContent = "";
    $("refreshed").textContent = "";
    $("admin-key").value = "";
    $("admin-key").focus();
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY_STORAGE);
    showLogin(message);
  }

  function start() {
    $("login").hidden = true;
    $("dashboard").hidden = false;
    $("sign-out").hidden = false;
    refresh(true);
    clearInterval(timer);
    timer = setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
  }

  // --- refreshing ------------------------------------------------------------------------------------

  // The pool's state is read on every tick. What costs the server a database query over many rows
  // is read less often: a series every quarter of its step (3 s to 1 min), events and failures every
  // 10 s; all of it at once when asked for (sign-in, a new range, after an action).
  function refresh(everything = false) {
    if (running) { again = again === true || everything ? true : "tick"; return running; }
    running = load(everything).finally(() => {
      running = null;
      const next = again;
      again = false;
      if (next) refresh(next === true);
    });
    return running;
  }

  function due(name, everyMs, everything) {
    const now = Date.now();
    if (!everything && now - (lastRead.get(name) || 0) < everyMs) return false;
    lastRead.set(name, now);
    return true;
  }

  async function load(everything) {
    const since = $("range").value;
    const seriesEvery = Math.min(60000, Math.max(REFRESH_MS, (seriesStep.get(since) || 0) * 250));
    const reads = { status: api("/v1/pool/status") };
    if (due("series", seriesEvery, everything)) {
      reads.byAccount = api(`/admin/usage/series?since=${encodeURIComponent(since)}&by=account`);
      reads.byKey = api(`/admin/usage/series?since=${encodeURIComponent(since)}&by=key`);
    }
    if (due("activity", ACTIVITY_MS, everything)) {
      reads.events = api(`/admin/events?limit=${EVENTS_LIMIT}`);
      reads.failures = api(`/admin/usage/errors?since=${FAILURES_SINCE[since] || "24h"}&limit=${FAILURES_LIMIT}`);
    }
    const names = Object.keys(reads);
    const results = await Promise.allSettled(Object.values(reads));
    if (!sessionStorage.getItem(KEY_STORAGE)) return; // signed out meanwhile
    const denied = results.find((r) => r.status === "rejected" && r.reason instanceof AuthError);
    if (denied) { signOut(denied.reason.message); return; }
    const got = Object.fromEntries(names.map((name, i) => [name, results[i].status === "fulfilled" ? results[i].value : null]));
    if (got.byAccount) {
      seriesStep.set(since, got.byAccount.step);
      today = new Map(got.byAccount.today.rows.map((row) => [row.name, row]));
    }
    if (got.status) {
      serverNow = got.status.now;
      renderSummary(got.status);
      renderAccounts(got.status);
      renderQueue(got.status);
    }
    if (got.byAccount) renderCharts("account", got.byAccount);
    if (got.byKey) renderCharts("key", got.byKey);
    if (got.events) renderEvents(got.events.data);
    if (got.failures) renderFailures(got.failures.data);
    const failed = results.filter((r) => r.status === "rejected");
    const stamp = $("refreshed");
    if (failed.length) {
      stamp.textContent = `refresh failed: ${failed[0].reason.message}; retrying`;
      stamp.classList.add("stale");
    } else {
      stamp.textContent = `as of ${clock(serverNow)}`;
      stamp.classList.remove("stale");
    }
  }

  // --- the accounts ----------------------------------------------------------------------------------

  function renderSummary(status) {
    const counts = new Map();
    for (const account of status.accounts) counts.set(account.state, (counts.get(account.state) || 0) + 1);
    const summary = $("summary");
    summary.replaceChildren(`${status.accounts.length} account${status.accounts.length === 1 ? "" : "s"}: `);
    for (const [state, count] of [...counts].sort()) summary.append(badge(state), `${count} `);
  }

  function accountRow(name) {
    const row = el("tr", { "data-account": name });
    const cells = ["name", "kind", "state", "in-flight num", "rpm num", "tpm num", "today num", "until", "actions"];
    for (const cls of cells) row.append(el("td", { class: cls }));
    row.querySelector(".name").textContent = name;
    const actions = row.querySelector(".actions");
    for (const [action, text, title] of [
      ["disable", "Disable", "Take the account out of the pool"],
      ["enable", "Enable", "Put the account back in the pool (also revives a dead, cooling or exhausted one)"],
      ["probe", "Probe", "Ask the upstream one free question and set the state from its answer"],
    ]) {
      actions.append(el("button", { type: "button", "data-action": action, "data-account": name, title, text }));
    }
    return row;
  }

  function usage(cell, used, limit, configured) {
    cell.replaceChildren(`${num(used)} / ${limit === null || limit === undefined ? "∞" : num(limit)}`);
    const learned = limit !== configured && limit !== null && limit !== undefined;
    cell.classList.toggle("learned", learned);
    cell.title = learned ? `configured ${configured === null ? "without a limit" : num(configured)}, learned ${num(limit)} from the upstream` : "";
    if (limit) cell.append(el("meter", { min: 0, max: limit, value: Math.min(used, limit), low: limit * 0.7, high: limit * 0.9, optimum: 0 }));
  }

  function renderAccounts(status) {
    const body = $("accounts").tBodies[0];
    const existing = new Map([...body.rows].map((row) => [row.dataset.account, row]));
    for (const account of status.accounts) {
      const row = existing.get(account.name) || accountRow(account.name);
      existing.delete(account.name);
      body.append(row); // (re)placed in the pool's order
      row.dataset.state = account.state;
      const cell = (cls) => row.querySelector("." + cls.split(" ")[0]);
      cell("kind").textContent = account.kind;
      const state = cell("state");
      state.dataset.state = account.state;
      state.replaceChildren(badge(account.state));
      usage(cell("in-flight"), account.in_flight, account.limits.concurrency, account.configured.concurrency);
      usage(cell("rpm"), account.rpm_used, account.limits.rpm, account.configured.rpm);
      usage(cell("tpm"), account.tpm_used, account.limits.tpm, account.configured.tpm);
      const day = today.get(account.name);
      const todayCell = cell("today");
      todayCell.replaceChildren(num(day ? day.tokens : 0));
      if (account.limits.tpd) {
        todayCell.append(el("span", { class: "sub", text: `TPD ${num(account.tpd_used)} / ${num(account.limits.tpd)}` }));
      }
      const until = cell("until");
      until.replaceChildren();
      if (account.until) {
        until.append(el("span", { text: `until ${clock(account.until)} (in ${span(account.until - status.now)})` }));
      }
      if (account.reason) until.append(el("span", { class: account.until ? "sub" : "", text: account.reason }));
      const buttons = row.querySelectorAll("button");
      for (const button of buttons) {
        if (button.dataset.busy) continue;
        const action = button.dataset.action;
        button.disabled = (action === "disable" && account.state === "disabled")
          || (action === "enable" && account.state === "active");
      }
    }
    for (const row of existing.values()) row.remove();
    $("accounts-empty").hidden = status.accounts.length > 0;
  }

  async function act(button) {
    const { action, account } = button.dataset;
    const row = button.closest("tr");
    const buttons = row ? [...row.querySelectorAll("button")] : [button];
    for (const b of buttons) { b.disabled = true; b.dataset.busy = "1"; }
    try {
      const body = action === "disable" ? { reason: "disabled from the dashboard" } : undefined;
      const result = await api(`/admin/accounts/${encodeURIComponent(account)}/${action}`, { method: "POST", body });
      if (action === "probe") {
        notice(`Probe of ${account}: ${result.outcome} (${result.before} → ${result.after})${result.detail ? ": " + result.detail : ""}`,
               result.outcome === "failed");
      } else {
        notice(`${account} ${action}d.`);
      }
    } catch (err) {
      if (err instanceof AuthError) { signOut(err.message); return; }
      notice(`Could not ${action} ${account}: ${err.message}`, true);
    } finally {
      for (const b of buttons) delete b.dataset.busy;
    }
    await refresh(true);
  }

  // --- the queue -------------------------------------------------------------------------------------

  function renderQueue(status) {
    const queue = status.queue;
    $("queue-depth").textContent = num(queue.depth);
    const clients = Object.entries(queue.by_client || {}).filter(([, n]) => n > 0);
    $("queue-clients").textContent = clients.length
      ? clients.map(([name, n]) => `${label(name === "null" ? null : name, "key")}: ${num(n)}`).join(", ") : "none";
    $("queue-waited").textContent = num(queue.waited_total);
    const body = $("next-free").tBodies[0];
    body.replaceChildren();
    for (const [model, seconds] of Object.entries(status.next_free_in || {})) {
      const text = seconds === null ? "no account can serve it" : seconds <= 0 ? "now" : `in ${span(seconds)}`;
      body.append(el("tr", { "data-model": model }, el("td", { text: model }), el("td", { text })));
    }
  }

  // --- the charts ------------------------------------------------------------------------------------

  function cssVar(name) { return getComputedStyle(document.documentElement).getPropertyValue(name).trim(); }

  function chartOptions(names, by, metric, width) {
    const axis = { stroke: cssVar("--muted"), grid: { stroke: cssVar("--line"), width: 1 }, ticks: { stroke: cssVar("--line") } };
    return {
      width, height: 220,
      scales: { x: { time: true }, y: { range: (_u, _min, max) => [0, Math.max(max, metric === "requests" ? 5 : 100)] } },
      axes: [axis, { ...axis, size: 56, values: (_u, values) => values.map(compact) }],
      series: [
        {},
        ...names.map((name, i) => ({
          label: label(name, by), stroke: PALETTE[i % PALETTE.length], width: 1.5,
          fill: PALETTE[i % PALETTE.length] + "14", points: { show: false },
          value: (_u, v) => (v === null || v === undefined ? "–" : num(v)),
        })),
      ],
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
    };
  }

  function renderCharts(by, data) {
    // a stable order (and so stable colours): by name, the unnamed group last
    const series = [...data.series].sort((a, b) => (a.name === null) - (b.name === null) || String(a.name).localeCompare(String(b.name)));
    const names = series.map((s) => s.name);
    for (const metric of ["requests", "tokens"]) {
      const figure = $(`chart-${by}-${metric}`);
      const plotBox = figure.querySelector(".plot");
      const values = [data.t, ...series.map((s) => s[metric])];
      const shape = JSON.stringify([names, data.step]);
      let chart = charts.get(figure.id);
      if (chart && chart.shape !== shape) { chart.plot.destroy(); chart = null; }
      if (!chart) {
        plotBox.replaceChildren();
        const plot = new uPlot(chartOptions(names, by, metric, Math.max(plotBox.clientWidth, 300)), values, plotBox);
        chart = { plot, shape };
        charts.set(figure.id, chart);
      } else {
        chart.plot.setData(values);
      }
      figure.dataset.series = String(names.length);
      figure.dataset.total = String(series.reduce((sum, s) => sum + s[metric].reduce((a, b) => a + b, 0), 0));
      let empty = plotBox.querySelector(".empty");
      if (!empty) { empty = el("p", { class: "empty" }); plotBox.append(empty); }
      empty.textContent = names.length ? "" : `No requests in the last ${$("range").selectedOptions[0].text}.`;
      empty.hidden = names.length > 0;
    }
  }

  function resizeCharts() {
    for (const [id, chart] of charts) {
      const box = $(id).querySelector(".plot");
      chart.plot.setSize({ width: Math.max(box.clientWidth, 300), height: 220 });
    }
  }

  // --- events and failures ---------------------------------------------------------------------------

  function renderEvents(events) {
    const body = $("events").tBodies[0];
    body.replaceChildren(...events.map((e) => el("tr", { "data-account": e.account, "data-state": e.state },
      el("td", { text: clock(e.ts) }),
      el("td", { text: e.account }),
      el("td", { class: "state" }, badge(e.state)),
      el("td", { text: e.until ? clock(e.until) : "" }),
      el("td", { text: e.reason || "" }))));
    $("events-empty").hidden = events.length > 0;
    $("events").hidden = events.length === 0;
  }

  function renderFailures(rows) {
    const body = $("failures").tBodies[0];
    body.replaceChildren(...rows.map((f) => el("tr", { "data-status": f.status },
      el("td", { text: clock(f.ts) }),
      el("td", { class: "num", text: f.status }),
      el("td", { text: f.outcome }),
      el("td", { text: label(f.account, "account") }),
      el("td", { text: label(f.key, "key") }),
      el("td", { text: f.model }),
      el("td", { class: "num", text: f.attempts }),
      el("td", { text: f.request_id }))));
    $("failures-empty").hidden = rows.length > 0;
    $("failures").hidden = rows.length === 0;
  }

  // --- wiring ----------------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("admin-key").value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORAGE, key);
      $("admin-key").value = "";
      start();
    });
    $("sign-out").addEventListener("click", () => signOut(""));
    $("accounts").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-action]");
      if (button && !button.disabled) act(button);
    });
    $("range").addEventListener("change", () => refresh(true));
    document.addEventListener("visibilitychange", () => { if (!document.hidden && timer) refresh(); });
    new ResizeObserver(resizeCharts).observe($("traffic-section"));
    if (sessionStorage.getItem(KEY_STORAGE)) start();
    else showLogin("");
  });
})();
