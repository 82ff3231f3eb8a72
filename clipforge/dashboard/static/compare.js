// Compare runs: one metric of several runs overlaid, against step, samples seen or compute; and the runs' final
// eval metrics side by side: a row per (dataset, task, metric), a column per (run, model label).
"use strict";

(function () {
  const page = document.getElementById("page");
  const state = {
    ids: (CF.params.get("ids") || "").split(",").filter((s) => s.length),
    metric: CF.params.get("metric") || "loss",
    x: CF.params.get("x") || "step",
    runs: new Map(), // id -> {records, row}
    allRuns: [],
  };

  function xOf(run, r) {
    if (state.x === "samples_seen") return r.samples_seen;
    if (state.x === "compute") return CF.isNum(r.samples_seen) && run.row && CF.isNum(run.row.gmacs) ? r.samples_seen * run.row.gmacs : undefined;
    return r.step;
  }

  function updateUrl() {
    const q = new URLSearchParams({ ids: state.ids.join(","), metric: state.metric, x: state.x });
    window.history.replaceState(null, "", "/compare?" + q.toString());
  }

  function draw() {
    const series = [];
    for (const id of state.ids) {
      const run = state.runs.get(id);
      if (!run) continue;
      const pts = [];
      for (const r of run.records) {
        const x = xOf(run, r), y = r[state.metric];
        if (CF.isNum(x) && CF.isNum(y)) pts.push([x, y]);
      }
      series.push({ name: (run.row && run.row.name) || id, points: pts, mode: state.metric.startsWith("eval/") ? "both" : "line" });
    }
    const logx = state.x === "compute" || document.getElementById("logx").checked;
    const logy = document.getElementById("logy").checked;
    CF.drawChart(document.getElementById("chart-compare"), { series, xlabel: { step: "step", samples_seen: "samples seen", compute: "compute (GMAC)" }[state.x],
      ylabel: state.metric, logx, logy, height: 380, legend: true });
    renderTable();
    renderEvalTable();
  }

  let evalRequest = 0;
  async function renderEvalTable() {
    const box = document.getElementById("compare-evals");
    if (!state.ids.length) { box.replaceChildren(); return; }
    const mine = ++evalRequest; // a later call (runs added or removed meanwhile) wins
    let data;
    try {
      data = await CF.api("/api/compare", { ids: state.ids.join(",") });
    } catch (err) {
      if (mine === evalRequest) CF.showError(box, err);
      return;
    }
    if (mine !== evalRequest) return;
    if (!data.columns.length) {
      box.replaceChildren(CF.el("p", { class: "muted", text: "none of these runs has eval results" }));
      return;
    }
    const head = CF.el("tr", {}, ...["dataset", "task", "metric"].map((t) => CF.el("th", { text: t })),
      ...data.columns.map((c) => CF.el("th", { "data-run": c.run, "data-model": c.model, text: `${c.name} · ${c.model}` })));
    const body = CF.el("tbody", {});
    for (const r of data.rows) {
      body.append(CF.el("tr", {}, CF.el("td", { text: r.dataset }), CF.el("td", { text: r.task }), CF.el("td", { text: r.metric }),
        ...r.values.map((v) => CF.el("td", { class: "num", text: CF.fmt(v, 4) }))));
    }
    box.replaceChildren(CF.el("table", { class: "data", id: "compare-eval-table" }, CF.el("thead", {}, head), body));
  }

  function renderTable() {
    const cols = [["name", (r) => r.name], ["status", (r) => r.status], ["model", (r) => r.model], ["params", (r) => CF.fmtCount(r.params)],
      ["samples seen", (r) => CF.fmtCount(r.samples_seen)], ["compute (GMAC)", (r) => CF.fmt(r.compute, 3)], ["loss", (r) => CF.fmt(r.loss, 4)],
      ["samples/s", (r) => CF.fmt(r.samples_per_second, 4)], ["wall time", (r) => CF.fmtDuration(r.wall_seconds)]];
    const head = CF.el("tr", {}, ...cols.map(([t]) => CF.el("th", { text: t })), CF.el("th", { text: "" }));
    const body = CF.el("tbody", {});
    for (const id of state.ids) {
      const run = state.runs.get(id);
      const row = (run && run.row) || { name: id };
      const tr = CF.el("tr", {});
      cols.forEach(([t, f], i) => tr.append(i === 0 ? CF.el("td", {}, CF.runLink(id, row.name)) : CF.el("td", { text: f(row) || "" })));
      tr.append(CF.el("td", {}, CF.el("button", { class: "plain", text: "remove", onclick: () => {
        state.ids = state.ids.filter((x) => x !== id);
        refreshPickers(); updateUrl(); draw();
      } })));
      body.append(tr);
    }
    document.getElementById("compare-table").replaceChildren(CF.el("table", { class: "data" }, CF.el("thead", {}, head), body));
  }

  function refreshPickers() {
    const keys = new Set(["loss"]);
    for (const id of state.ids) { const run = state.runs.get(id); if (run) CF.numericKeys(run.records).forEach((k) => keys.add(k)); }
    for (const k of ["step", "epoch", "time", "samples_seen"]) keys.delete(k);
    const metric = document.getElementById("metric");
    metric.replaceChildren(...[...keys].sort().map((k) => CF.el("option", { value: k, text: k })));
    metric.value = keys.has(state.metric) ? state.metric : "loss";
    state.metric = metric.value;
    const add = document.getElementById("add-run");
    add.replaceChildren(CF.el("option", { value: "", text: "add a run…" }),
      ...state.allRuns.filter((r) => !state.ids.includes(r.id)).map((r) => CF.el("option", { value: "run:" + r.id, text: r.id || "(root)" })));
  }

  async function fetchRun(id) {
    const data = await CF.api("/api/metrics", { id, offset: 0 });
    state.runs.set(id, { records: data.records, row: data.row });
  }

  function build() {
    const metric = CF.el("select", { id: "metric", onchange: (ev) => { state.metric = ev.target.value; updateUrl(); draw(); } });
    const x = CF.el("select", { id: "x-axis", onchange: (ev) => { state.x = ev.target.value; updateUrl(); draw(); } },
      ...[["step", "step"], ["samples_seen", "samples seen"], ["compute", "compute"]].map(([v, t]) => CF.el("option", { value: v, text: t })));
    x.value = state.x;
    const add = CF.el("select", { id: "add-run", onchange: async (ev) => {
      if (!ev.target.value.startsWith("run:")) return;
      const id = ev.target.value.slice(4);
      if (!state.ids.includes(id)) { state.ids.push(id); await fetchRun(id); }
      refreshPickers(); updateUrl(); draw();
    } });
    CF.fill(page,
      CF.el("h1", { text: "Compare runs" }),
      CF.el("div", { class: "toolbar" }, CF.el("label", {}, "metric", metric), CF.el("label", {}, "x axis", x),
        CF.el("label", {}, CF.el("input", { type: "checkbox", id: "logx", onchange: draw }), "log x"),
        CF.el("label", {}, CF.el("input", { type: "checkbox", id: "logy", onchange: draw }), "log y"),
        CF.el("label", {}, "runs", add)),
      CF.el("div", { class: "card" }, CF.el("div", { class: "chart", id: "chart-compare" })),
      CF.el("h2", { text: "Runs" }), CF.el("div", { id: "compare-table" }),
      CF.el("h2", { text: "Final eval metrics" }), CF.el("div", { class: "table-wrap", id: "compare-evals" }));
  }

  async function main() {
    CF.header("/compare");
    build();
    const list = await CF.api("/api/runs");
    CF.setRoot(list.root);
    state.allRuns = list.runs;
    if (!state.ids.length) state.ids = list.runs.slice().sort((a, b) => (b.updated || 0) - (a.updated || 0)).slice(0, 3).map((r) => r.id);
    await Promise.all(state.ids.map((id) => fetchRun(id).catch((err) => state.runs.set(id, { records: [], row: { name: id + " (" + err.message + ")" } }))));
    refreshPickers();
    draw();
    document.body.dataset.loaded = "1";
  }

  main().catch((err) => CF.showError(page, err));
})();
