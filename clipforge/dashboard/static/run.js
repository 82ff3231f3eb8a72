// One run: training curves, eval metrics over steps, spec, summary, eval results and checkpoints.
// New metric lines are fetched by polling /api/metrics with the byte offset of the last read: no reload.
// An eval job's folder has no training curves: its page shows the scores as a table and as bars per task, each
// model label (e.g. untrained, trained) side by side.
"use strict";

(function () {
  const runId = CF.params.get("id") || "";
  const POLL_MS = Math.max(200, Number(CF.params.get("poll")) || 2000);
  const page = document.getElementById("page");
  const state = { records: [], offset: 0, row: null, x: CF.params.get("x") || "step", timer: null, evalJob: false };

  // The training curves: [chart id, title, y label, function(records) -> series list].
  const CURVES = [
    ["loss", "loss", "contrastive loss", (rs) => [line("loss", rs, (r) => r.loss)]],
    ["lr", "learning rate", "lr", (rs) => [line("lr", rs, (r) => r.lr)]],
    ["temperature", "logit scale (1 / temperature)", "exp(logit_scale)", (rs) => [line("logit_scale", rs, (r) => r.logit_scale)]],
    ["throughput", "samples / s", "samples per second", (rs) => [line("samples/s", rs, (r) => r.samples_per_second)]],
    ["data_wait", "data-wait fraction", "fraction of step time", (rs) => [line("data wait", rs, dataWaitFraction)]],
    ["memory", "memory", "bytes", memorySeries],
    ["grad_norm", "gradient norm", "global grad norm", (rs) => [line("grad_norm", rs, (r) => r.grad_norm)]],
  ];

  function xOf(r) {
    if (state.x === "samples_seen") return r.samples_seen;
    if (state.x === "time") return CF.isNum(r.time) && state.records.length ? r.time - state.records[0].time : undefined;
    return r.step;
  }

  function line(name, records, get) {
    const pts = [];
    for (const r of records) {
      const x = xOf(r), y = get(r);
      if (CF.isNum(x) && CF.isNum(y)) pts.push([x, y]);
    }
    return { name, points: pts };
  }

  function dataWaitFraction(r) {
    if (CF.isNum(r.data_wait_fraction)) return r.data_wait_fraction;
    if (CF.isNum(r.data_wait) && CF.isNum(r.step_time) && r.step_time > 0) return Math.min(1, r.data_wait / r.step_time);
    return undefined;
  }

  function memorySeries(records) {
    const keys = new Set();
    for (const r of records) for (const [k, v] of Object.entries(r)) {
      if (CF.isNum(v) && /mem/i.test(k) && !k.startsWith("eval/")) keys.add(k);
      if (k === "memory" && v && typeof v === "object") for (const [kk, vv] of Object.entries(v)) if (CF.isNum(vv)) keys.add("memory." + kk);
    }
    return [...keys].sort().map((k) => line(k, records, (r) => k.startsWith("memory.") && r.memory && typeof r.memory === "object"
      ? r.memory[k.slice(7)] : r[k]));
  }

  function evalSeries(records) {
    // eval/<dataset>/<metric> -> one chart per dataset, one line per metric (counts left out).
    const byDataset = new Map();
    for (const r of records) for (const k of Object.keys(r)) {
      const m = /^eval\/(.+)\/([^/]+)$/.exec(k);
      if (!m || m[2].startsWith("n_") || !CF.isNum(r[k])) continue;
      if (!byDataset.has(m[1])) byDataset.set(m[1], new Set());
      byDataset.get(m[1]).add(m[2]);
    }
    return [...byDataset.entries()].sort().map(([ds, metrics]) => [ds, [...metrics].sort().map((name) =>
      ({ ...line(name, records, (r) => r[`eval/${ds}/${name}`]), mode: "both" }))]);
  }

  function xLabel() {
    return { step: "step", samples_seen: "samples seen", time: "seconds since first log line" }[state.x];
  }

  function drawCharts() {
    const grid = document.getElementById("curves");
    if (!grid) return; // an eval job's page
    for (const [id, title, ylabel, make] of CURVES) {
      let card = document.getElementById("card-" + id);
      if (!card) {
        card = CF.el("div", { class: "card chart-card", id: "card-" + id }, CF.el("h3", { text: title }),
          CF.el("div", { class: "chart", id: "chart-" + id }));
        grid.append(card);
      }
      const series = make(state.records).filter((s) => s.points.length);
      CF.drawChart(document.getElementById("chart-" + id), { series, xlabel: xLabel(), ylabel, height: 200,
        empty: "not logged by this run (yet)" });
    }
    const evalGrid = document.getElementById("eval-curves");
    const evals = evalSeries(state.records);
    evalGrid.replaceChildren();
    for (const [ds, series] of evals) {
      const chart = CF.el("div", { class: "chart", id: "chart-eval-" + ds.replace(/[^a-zA-Z0-9_-]/g, "_") });
      evalGrid.append(CF.el("div", { class: "card chart-card" }, CF.el("h3", { text: "eval: " + ds }), chart));
      CF.drawChart(chart, { series, xlabel: xLabel(), ylabel: "score", legend: true, height: 200 });
    }
    document.getElementById("eval-section").hidden = !evals.length;
    document.getElementById("record-count").textContent = `${state.records.length} metric lines`;
  }

  function stat(label, text, id) {
    return CF.el("div", {}, CF.el("span", { text: label }), CF.el("b", { id, text: text === "" ? "–" : text }));
  }

  let shownStats = null;
  function renderStats() {
    const r = state.row || {};
    // Re-render only on change, so a poll does not replace nodes the user is selecting or reading.
    const key = JSON.stringify(r);
    if (key === shownStats) return;
    shownStats = key;
    const box = document.getElementById("stats");
    if (state.evalJob) {
      box.replaceChildren(stat("status", "", "status"), stat("model", r.model || "", "stat-model"),
        stat("updated", CF.fmtTime(r.updated), "stat-updated"));
    } else box.replaceChildren(
      stat("status", "", "status"),
      stat("model", r.model || "", "stat-model"),
      stat("params", CF.fmtCount(r.params)),
      stat("samples seen", CF.fmtCount(r.samples_seen), "stat-samples"),
      stat("compute (GMAC)", CF.fmt(r.compute, 3)),
      stat("step", CF.fmt(r.step), "stat-step"),
      stat("loss", CF.fmt(r.loss, 4), "stat-loss"),
      stat("samples/s", CF.fmt(r.samples_per_second, 4)),
      stat("wall time", CF.fmtDuration(r.wall_seconds)),
      stat("updated", CF.fmtTime(r.updated), "stat-updated"));
    document.getElementById("status").replaceChildren(CF.badge(r.status || "unknown"));
    if (r.error) box.append(CF.el("div", { class: "error", text: r.error }));
  }

  function keyValueTable(obj) {
    const body = CF.el("tbody", {});
    for (const [k, v] of Object.entries(obj || {})) {
      body.append(CF.el("tr", {}, CF.el("th", { text: k }), CF.el("td", { text: typeof v === "object" ? JSON.stringify(v) : String(v) })));
    }
    return CF.el("table", { class: "data" }, body);
  }

  // One card per (dataset, task): a group of bars per metric, one bar per model label (in one colour on every card).
  function evalBars(entries) {
    const labels = [...new Set(entries.map((e) => e.model))];
    const tasks = new Map();
    for (const e of entries) {
      const key = e.dataset + CF.EVAL_KEY_SEP + e.task;
      if (!tasks.has(key)) tasks.set(key, []);
      tasks.get(key).push(e);
    }
    const grid = CF.el("div", { class: "grid", id: "eval-bars" });
    for (const [key, list] of [...tasks.entries()].sort()) {
      const metrics = [...new Set(list.map((e) => e.metric))].sort();
      const series = labels.map((label) => ({ name: label, values: Object.fromEntries(
        list.filter((e) => e.model === label).map((e) => [e.metric, e.value])) }));
      const chart = CF.el("div", { class: "chart" });
      grid.append(CF.el("div", { class: "card chart-card eval-task", "data-task": key }, CF.el("h3", { text: key }), chart));
      CF.drawBars(chart, { groups: metrics, series });
    }
    return grid;
  }

  function evalSections(data) {
    if (!data.eval_table.length) return [];
    return [CF.el("section", { id: "eval-results" }, CF.el("h2", { text: "Eval results" }),
      CF.evalScoreTable(data.eval_table, "eval-table")),
    CF.el("section", {}, CF.el("h2", { text: "Scores by task (model labels side by side)" }), evalBars(data.eval_table))];
  }

  function specSection(data, isEval) {
    const missing = isEval ? "(this eval job's folder holds no spec.yaml)" : "(no spec.yaml)";
    return [CF.el("h2", { text: "Spec" }),
      data.spec_error ? CF.el("p", { class: "error", text: data.spec_error }) : null,
      CF.el("pre", { class: "spec", id: "spec", text: data.spec_text || missing })];
  }

  function buildEval(data) {
    CF.fill(page,
      CF.el("h1", { id: "run-name", text: (data.row && data.row.name) || runId }),
      CF.el("div", { class: "muted" }, CF.el("span", { text: (runId || "(root)") + "  · eval job" }),
        "  · ", CF.el("a", { href: "/compare?ids=" + encodeURIComponent(runId), text: "compare with…" }),
        "  ", CF.el("span", { id: "live" })),
      CF.el("div", { class: "stats", id: "stats" }),
      ...evalSections(data),
      data.eval_table.length ? null : CF.el("p", { class: "muted", text: "no eval results in this folder yet" }),
      ...specSection(data, true));
  }

  function isEvalJob(data) {
    return (data.row && data.row.kind === "eval") || (!data.records.length && !data.summary && data.eval_table.length > 0);
  }

  function checkpointTable(checkpoints) {
    const body = CF.el("tbody", {});
    for (const c of checkpoints) {
      body.append(CF.el("tr", {}, CF.el("td", { text: c.name }), CF.el("td", { class: "num", text: CF.fmt(c.step) }),
        CF.el("td", { class: "num", text: CF.fmt(c.epoch) }), CF.el("td", { class: "num", text: CF.fmtCount(c.samples_seen) }),
        CF.el("td", { class: "num", text: CF.fmt(c.loss, 4) }),
        CF.el("td", {}, CF.el("a", { href: "/try?checkpoint=" + encodeURIComponent(c.id), text: "try it" }))));
    }
    const head = CF.el("tr", {}, ...["checkpoint", "step", "epoch", "samples", "loss", ""].map((t) => CF.el("th", { text: t })));
    return CF.el("table", { class: "data" }, CF.el("thead", {}, head), body);
  }

  function build(data) {
    state.evalJob = isEvalJob(data);
    if (state.evalJob) return buildEval(data);
    const xSelect = CF.el("select", { id: "x-axis", onchange: (ev) => { state.x = ev.target.value; drawCharts(); } },
      ...[["step", "step"], ["samples_seen", "samples seen"], ["time", "time"]].map(([v, t]) => CF.el("option", { value: v, text: t })));
    xSelect.value = state.x;
    CF.fill(page,
      CF.el("h1", { id: "run-name", text: (data.row && data.row.name) || runId }),
      CF.el("div", { class: "muted" }, CF.el("span", { text: runId || "(root)" }),
        data.row && data.row.sweep ? CF.el("span", {}, "  · sweep ", CF.el("a", {
          href: "/sweep?id=" + encodeURIComponent(data.row.sweep), text: data.row.sweep })) : null,
        "  · ", CF.el("a", { href: "/compare?ids=" + encodeURIComponent(runId), text: "compare with…" })),
      CF.el("div", { class: "stats", id: "stats" }),
      CF.el("div", { class: "toolbar" }, CF.el("label", {}, "x axis", xSelect),
        CF.el("span", { class: "muted", id: "record-count" }), CF.el("span", { class: "muted", id: "live" })),
      CF.el("div", { class: "grid", id: "curves" }),
      CF.el("section", { id: "eval-section" }, CF.el("h2", { text: "Eval metrics over training" }),
        CF.el("div", { class: "grid", id: "eval-curves" })),
      ...evalSections(data),
      data.summary ? CF.el("section", {}, CF.el("h2", { text: "Summary" }), keyValueTable(data.summary)) : null,
      data.checkpoints.length ? CF.el("section", {}, CF.el("h2", { text: "Checkpoints" }), checkpointTable(data.checkpoints)) : null,
      ...specSection(data, false));
  }

  async function load() {
    const data = await CF.api("/api/run", { id: runId });
    state.records = data.records;
    state.offset = data.offset;
    state.row = data.row;
    CF.setRoot(data.root);
    build(data);
    renderStats();
    drawCharts();
    document.body.dataset.loaded = "1";
  }

  async function poll() {
    try {
      const data = await CF.api("/api/metrics", { id: runId, offset: state.offset });
      if (data.reset) {
        state.records = data.records;
      } else if (data.records.length) {
        state.records = state.records.concat(data.records);
      }
      const changed = data.reset || data.records.length > 0;
      state.offset = data.offset;
      state.row = data.row || state.row;
      renderStats();
      if (changed) drawCharts();
      document.getElementById("live").textContent = "live · checked " + new Date().toLocaleTimeString();
    } catch (err) {
      document.getElementById("live").textContent = "refresh failed: " + err.message;
    }
    const done = state.row && (state.row.status === "finished" || state.row.status === "failed");
    state.timer = setTimeout(poll, done ? Math.max(POLL_MS, 10000) : POLL_MS);
  }

  CF.header("/run");
  document.title = "clipforge · " + (runId || "run");
  load().then(() => { state.timer = setTimeout(poll, POLL_MS); }).catch((err) => CF.showError(page, err));
})();
