// One sweep (a folder with sweep.json): each child's swept values against its final metrics, as a table and as a
// chart of one metric against one numeric swept field.
"use strict";

(function () {
  const sweepId = CF.params.get("id") || "";
  const page = document.getElementById("page");
  const state = { data: null, metric: CF.params.get("metric") || "", field: CF.params.get("field") || "" };

  function valueText(v) {
    return v === null || v === undefined ? "" : typeof v === "object" ? JSON.stringify(v) : String(v);
  }

  function numericFields(data) {
    return data.fields.filter((f) => data.children.some((c) => CF.isNum(c.values[f])));
  }

  function defaultMetric(metrics) {
    const rank = (m) => { const name = CF.evalKeyParts(m).metric; return name === "acc1" ? 2 : name.endsWith("recall@1") ? 1 : 0; };
    return metrics.slice().sort((a, b) => rank(b) - rank(a) || a.localeCompare(b))[0] || "";
  }

  function updateUrl() {
    const q = new URLSearchParams({ id: sweepId });
    if (state.metric) q.set("metric", state.metric);
    if (state.field) q.set("field", state.field);
    window.history.replaceState(null, "", "/sweep?" + q.toString());
  }

  function renderChart() {
    const data = state.data;
    const box = document.getElementById("chart-sweep");
    if (!state.field || !state.metric) {
      box.replaceChildren(CF.el("p", { class: "muted", text: "no numeric swept field or no eval metric to chart" }));
      return;
    }
    const points = data.children.filter((c) => CF.isNum(c.values[state.field]) && CF.isNum(c.evals[state.metric]))
      .map((c) => [c.values[state.field], c.evals[state.metric], c.name]);
    const xs = points.map((p) => p[0]);
    const logx = xs.length > 1 && xs.every((x) => x > 0) && Math.max(...xs) / Math.min(...xs) >= 10;
    CF.drawChart(box, { series: [{ name: state.metric, points, mode: "markers", radius: 5 }], xlabel: state.field,
      ylabel: CF.evalKeyParts(state.metric).metric, logx, height: 320, empty: "no finished child has this metric yet" });
  }

  function renderTable() {
    const data = state.data;
    const head = CF.el("tr", {}, CF.el("th", { text: "child" }), CF.el("th", { text: "status" }),
      ...data.fields.map((f) => CF.el("th", { text: f })), CF.el("th", { text: state.metric || "eval metric" }),
      CF.el("th", { text: "loss" }), CF.el("th", { text: "samples seen" }), CF.el("th", { text: "wall time" }));
    const body = CF.el("tbody", {});
    for (const c of data.children) {
      body.append(CF.el("tr", { "data-dir": c.dir },
        CF.el("td", { title: c.error || null }, c.id ? CF.runLink(c.id, c.name) : c.name),
        CF.el("td", {}, CF.badge(c.status || "pending")),
        ...data.fields.map((f) => CF.el("td", { text: valueText(c.values[f]) })),
        CF.el("td", { class: "num", text: CF.fmt(c.evals[state.metric], 4) }),
        CF.el("td", { class: "num", text: CF.fmt(c.loss, 4) }),
        CF.el("td", { class: "num", text: CF.fmtCount(c.samples_seen) }),
        CF.el("td", { class: "num", text: CF.fmtDuration(c.wall_seconds) })));
    }
    document.getElementById("children").replaceChildren(
      CF.el("table", { class: "data", id: "sweep-table" }, CF.el("thead", {}, head), body));
  }

  function render() {
    updateUrl();
    renderChart();
    renderTable();
  }

  function build(data) {
    const fields = numericFields(data);
    if (!fields.includes(state.field)) state.field = fields[0] || "";
    if (!data.metrics.includes(state.metric)) state.metric = defaultMetric(data.metrics);
    const metric = CF.el("select", { id: "metric", onchange: (ev) => { state.metric = ev.target.value; render(); } },
      ...data.metrics.map((m) => CF.el("option", { value: m, text: m })));
    metric.value = state.metric;
    const field = CF.el("select", { id: "field", onchange: (ev) => { state.field = ev.target.value; render(); } },
      ...fields.map((f) => CF.el("option", { value: f, text: f })));
    field.value = state.field;
    CF.fill(page,
      CF.el("h1", { text: "Sweep " + data.name }),
      CF.el("div", { class: "muted" }, CF.el("span", { text: (sweepId || "(root)") + "  · swept: " + (data.fields.join(", ") || "–") + "  · " }),
        CF.el("a", { href: "/scaling?group=" + encodeURIComponent(sweepId), text: "scaling of this sweep" })),
      CF.el("div", { class: "toolbar" }, CF.el("label", {}, "metric", metric), CF.el("label", {}, "against", field)),
      CF.el("div", { class: "card" }, CF.el("div", { class: "chart", id: "chart-sweep" })),
      CF.el("h2", { text: "Children" }), CF.el("div", { class: "table-wrap", id: "children" }));
  }

  async function main() {
    CF.header("/sweep");
    document.title = "clipforge · sweep " + sweepId;
    const data = await CF.api("/api/sweep", { id: sweepId });
    CF.setRoot(data.root);
    state.data = data;
    build(data);
    render();
    document.body.dataset.loaded = "1";
  }

  main().catch((err) => CF.showError(page, err));
})();
