// The Live page: polls live.json every 1.5 s, fills the tables and draws the jobs/s and
// queued charts; marks the page stale when no worker reports, Redis or the broker cannot be
// read, or the dashboard cannot be reached.
"use strict";
(function () {
  const state = document.getElementById("live-state");
  const source = state.dataset.source;
  const PERIOD = 1500;
  const KEPT = 200; // points on the chart: 5 minutes
  const CHART = { left: 50, right: 405, top: 22, bottom: 160 }; // as live.html draws them
  const history = [];

  function cell(row, text, numeric) {
    const td = row.insertCell();
    td.textContent = text;
    if (numeric) td.className = "num";
  }
  function rate(x) { return x === null || x === undefined ? "–" : Number(x).toFixed(2); }
  function ms(x) { return x === null || x === undefined ? "–" : Math.round(x).toLocaleString(); }
  function count(x) { return x === null || x === undefined ? "–" : Number(x).toLocaleString(); }

  function stale(reason) {
    state.textContent = "Stale: " + reason + " (last try " + new Date().toLocaleTimeString() + ")";
    state.className = "state stale";
    document.body.classList.add("is-stale");
  }

  // Busiest first: jobs waiting or held, then jobs finishing, then by name (team-2 before
  // team-10).
  function busier(a, b) {
    const load = (t) => (t.queue_depth || 0) + t.in_flight;
    return load(b) - load(a) || b.jobs_out_per_s - a.jobs_out_per_s ||
      a.team.localeCompare(b.team, undefined, { numeric: true });
  }

  // A round top for the chart's scale, at or above x.
  function nice(x) {
    if (x <= 0) return 1;
    const magnitude = Math.pow(10, Math.floor(Math.log10(x)));
    for (const f of [1, 2, 2.5, 5, 10]) if (x <= f * magnitude) return f * magnitude;
    return 10 * magnitude;
  }

  // One series of the history as a line on the chart of id svg, on a scale from 0.
  function draw(id, key) {
    const svg = document.getElementById(id);
    const top = nice(Math.max(...history.map((p) => p[key]), 0));
    const step = (CHART.right - CHART.left) / (KEPT - 1);
    const start = CHART.right - step * (history.length - 1);
    const y = (v) => (CHART.bottom - (CHART.bottom - CHART.top) * v / top).toFixed(1);
    svg.querySelector(".line").setAttribute(
      "points", history.map((p, i) => (start + i * step).toFixed(1) + "," + y(p[key])).join(" "));
    svg.querySelector(".top").textContent = top.toLocaleString();
    svg.querySelector(".mid").textContent = (top / 2).toLocaleString();
    const seconds = Math.round((history.length - 1) * PERIOD / 1000);
    svg.querySelector(".span").textContent = seconds ? "−" + seconds + " s" : "";
  }

  function show(data) {
    if (data.stale) { stale(data.reason); } else {
      state.textContent = "Live · updated " + new Date(data.at).toLocaleTimeString();
      state.className = "state fresh";
      document.body.classList.remove("is-stale");
    }
    const teams = (data.teams || []).slice().sort(busier);
    let queued = 0, inFlight = 0, out = 0;
    const body = document.querySelector("#live-teams tbody");
    body.replaceChildren();
    for (const t of teams) {
      queued += t.queue_depth || 0; inFlight += t.in_flight; out += t.jobs_out_per_s;
      const row = body.insertRow();
      row.dataset.team = t.team;
      cell(row, t.enabled === false ? t.team + " (disabled)" : t.team);
      cell(row, count(t.queue_depth), true);
      cell(row, count(t.in_flight), true);
      cell(row, rate(t.jobs_in_per_s), true);
      cell(row, rate(t.jobs_out_per_s), true);
      cell(row, rate(t.errors_per_s), true);
      cell(row, ms(t.wait_p50_ms) + " / " + ms(t.wait_p99_ms), true);
      cell(row, t.bucket_fill === null ? "–" : Math.round(100 * t.bucket_fill) + "%", true);
    }
    document.getElementById("live-teams-empty").hidden = teams.length > 0 || data.teams === undefined;
    const deps = document.querySelector("#live-deployments tbody");
    deps.replaceChildren();
    for (const d of data.deployments || []) {
      const row = deps.insertRow();
      row.dataset.deployment = d.deployment;
      if (d.breaker && d.breaker !== "closed") row.className = "over";
      else if (d.paused_for > 0) row.className = "near";
      cell(row, d.deployment);
      cell(row, d.breaker || "–");
      cell(row, rate(d.calls_per_s), true);
      cell(row, d.error_rate === null ? "–" : (100 * d.error_rate).toFixed(1) + "%", true);
      cell(row, count(d.rate_limited), true);
      cell(row, d.paused_for > 0 ? "paused, " + Math.ceil(d.paused_for) + " s left" : "–", true);
    }
    document.getElementById("live-deployments-empty").hidden =
      (data.deployments || []).length > 0 || data.deployments === undefined;
    // Draining workers (stopped, finishing their jobs) apart: they take no job any more.
    const draining = data.draining || [];
    const workers = document.getElementById("workers");
    workers.textContent = data.workers === undefined ? "–"
      : data.workers + (draining.length ? " + " + draining.length + " draining" : "");
    workers.title = draining.map(d => d.worker + ": " + count(d.in_flight) + " in flight").join("\n");
    document.getElementById("queued").textContent = count(queued);
    document.getElementById("in-flight").textContent = count(inFlight);
    document.getElementById("jobs-per-s").textContent = rate(out);
    if (data.teams !== undefined) {
      history.push({ out: out, queued: queued });
      if (history.length > KEPT) history.shift();
      draw("trend-out", "out");
      draw("trend-queued", "queued");
    }
  }

  // Why an answer failed: the reason a 503 names (Redis or PostgreSQL away), else its code.
  async function failure(answer) {
    try {
      const body = await answer.json();
      if (body.reason) return body.reason;
    } catch (e) { /* not the dashboard's JSON */ }
    return "the dashboard answered " + answer.status;
  }

  async function poll() {
    try {
      const answer = await fetch(source, { credentials: "same-origin", cache: "no-store" });
      if (answer.status === 401) { window.location = "/dashboard/sign-in"; return; }
      if (answer.ok) { show(await answer.json()); } else { stale(await failure(answer)); }
    } catch (e) {
      stale("the dashboard cannot be reached");
    }
    setTimeout(poll, PERIOD);
  }
  poll();
})();
