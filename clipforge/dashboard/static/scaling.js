// Scaling: error (1 - metric) against compute on log-log axes, the compute-optimal frontier,
// the fitted power law E = beta * C^alpha with its confidence band, and the compute for a target error.
"use strict";

(function () {
  const page = document.getElementById("page");
  const state = { group: CF.params.get("group") || "", metric: CF.params.get("metric") || "",
    bins: CF.params.get("bins") || "4", target: CF.params.get("target") || "" };

  function updateUrl() {
    const q = new URLSearchParams();
    for (const k of ["group", "metric", "bins", "target"]) if (state[k]) q.set(k, state[k]);
    window.history.replaceState(null, "", "/scaling?" + q.toString());
  }

  function pm(value, se) {
    return CF.fmt(value, 4) + (CF.isNum(se) ? " ± " + CF.fmt(se, 2) : "");
  }

  function renderFit(data) {
    const box = document.getElementById("fit");
    box.replaceChildren();
    if (!data.fit) {
      box.append(CF.el("p", { class: "muted", id: "fit-error", text: data.fit_error || "no fit" }));
      return;
    }
    const f = data.fit;
    const ci = f.alpha_interval && CF.isNum(f.alpha_interval[0])
      ? ` (${Math.round(f.confidence * 100)}% CI ${CF.fmt(f.alpha_interval[0], 4)} … ${CF.fmt(f.alpha_interval[1], 4)})` : "";
    box.append(
      CF.el("p", { class: "fit" }, "E = β · C", CF.el("sup", { text: "α" }), "   with   α = ",
        CF.el("b", { id: "fit-alpha", "data-alpha": String(f.alpha), text: pm(f.alpha, f.se_alpha) }), ci,
        ",   β = ", CF.el("b", { id: "fit-beta", "data-beta": String(f.beta), text: pm(f.beta, f.se_beta) })),
      CF.el("p", { class: "muted", text: `fitted on the lowest error of each of ${f.n} compute bins ` +
        `(${data.bins_per_decade} per decade) out of ${data.points.length} runs; R² = ${CF.fmt(f.r2, 4)}; compute in ${data.compute_unit}` }));
    if (data.target) {
      const t = data.target;
      box.append(CF.el("p", { class: "fit", id: "target-result" }, `Error ${CF.fmt(t.error, 4)} needs C ≈ `,
        CF.el("b", { id: "target-compute", "data-compute": String(t.compute), text: CF.isNum(t.compute) ? CF.fmt(t.compute, 3) + " " + data.compute_unit : (t.message || "–") }),
        " by the fitted law."));
    }
  }

  function renderChart(data) {
    const frontierIds = new Set(data.frontier);
    const others = data.points.filter((p) => !frontierIds.has(p.id)).map((p) => [p.compute, p.error, p.name]);
    const front = data.points.filter((p) => frontierIds.has(p.id)).sort((a, b) => a.compute - b.compute).map((p) => [p.compute, p.error, p.name]);
    const series = [
      { name: "runs", points: others, mode: "markers", color: "#9aa5b1", radius: 3.5 },
      { name: "compute-optimal frontier", points: front, mode: "both", color: "#e65100", radius: 5, dash: "4,3" },
    ];
    const bands = [];
    if (data.curve.length) {
      series.push({ name: "fit E = βC^α", points: data.curve.map((c) => [c.compute, c.error]), color: "#2962ff", width: 2 });
      const band = data.curve.filter((c) => CF.isNum(c.lo)).map((c) => [c.compute, c.lo, c.hi]);
      if (band.length) bands.push({ points: band, color: "#2962ff" });
    }
    if (data.target && CF.isNum(data.target.compute)) {
      series.push({ name: "target", points: [[data.target.compute, data.target.error, "target"]], mode: "markers", color: "#c62828", radius: 6 });
    }
    CF.drawChart(document.getElementById("chart-scaling"), { series, bands, logx: true, logy: true, height: 420, legend: true,
      xlabel: "compute C (" + data.compute_unit + " = GMACs per sample × samples seen)", ylabel: "error E = 1 − " + (data.metric || "metric"),
      empty: "no runs with both a compute estimate and this metric" });
  }

  function renderTable(data) {
    const frontierIds = new Set(data.frontier);
    const head = CF.el("tr", {}, ...["run", "model", "samples seen", "compute", "error", "frontier"].map((t) => CF.el("th", { text: t })));
    const body = CF.el("tbody", {});
    for (const p of data.points.slice().sort((a, b) => a.compute - b.compute)) {
      body.append(CF.el("tr", {}, CF.el("td", {}, CF.runLink(p.id, p.name)), CF.el("td", { text: p.model || "" }),
        CF.el("td", { class: "num", text: CF.fmtCount(p.samples_seen) }), CF.el("td", { class: "num", text: CF.fmt(p.compute, 3) }),
        CF.el("td", { class: "num", text: CF.fmt(p.error, 4) }), CF.el("td", { text: frontierIds.has(p.id) ? "●" : "" })));
    }
    const parts = [CF.el("table", { class: "data" }, CF.el("thead", {}, head), body)];
    if (data.skipped.length) parts.push(CF.el("p", { class: "muted", text: `${data.skipped.length} run(s) left out: ` +
      data.skipped.slice(0, 5).map((s) => `${s.id} (${s.reason})`).join(", ") + (data.skipped.length > 5 ? ", …" : "") }));
    document.getElementById("points").replaceChildren(...parts);
  }

  function renderControls(data) {
    const group = document.getElementById("group");
    group.replaceChildren(CF.el("option", { value: "", text: "all runs" }), ...data.groups.map((g) =>
      CF.el("option", { value: g.id, text: (g.sweep ? "sweep " : "folder ") + g.id })));
    group.value = data.group;
    const metric = document.getElementById("metric");
    metric.replaceChildren(...data.metrics.map((m) => CF.el("option", { value: m, text: m })));
    if (data.metric) metric.value = data.metric;
    state.metric = data.metric || "";
  }

  async function refresh() {
    updateUrl();
    try {
      const data = await CF.api("/api/scaling", { group: state.group, metric: state.metric, bins: state.bins, target: state.target || null });
      CF.setRoot(data.root);
      renderControls(data);
      renderFit(data);
      renderChart(data);
      renderTable(data);
      document.body.dataset.loaded = "1";
    } catch (err) {
      CF.showError(document.getElementById("fit"), err);
    }
  }

  function build() {
    const group = CF.el("select", { id: "group", onchange: (ev) => { state.group = ev.target.value; state.metric = ""; refresh(); } });
    const metric = CF.el("select", { id: "metric", onchange: (ev) => { state.metric = ev.target.value; refresh(); } });
    const bins = CF.el("input", { type: "number", id: "bins", min: 1, max: 20, value: state.bins, style: "width:4em",
      onchange: (ev) => { state.bins = ev.target.value; refresh(); } });
    const target = CF.el("input", { type: "number", id: "target", min: 0, max: 1, step: "any", value: state.target,
      placeholder: "e.g. 0.2", style: "width:7em", onchange: (ev) => { state.target = ev.target.value; refresh(); } });
    CF.fill(page,
      CF.el("h1", { text: "Scaling" }),
      CF.el("div", { class: "toolbar" }, CF.el("label", {}, "runs in", group), CF.el("label", {}, "metric", metric),
        CF.el("label", {}, "bins per decade", bins), CF.el("label", {}, "target error", target)),
      CF.el("div", { class: "card", id: "fit" }),
      CF.el("div", { class: "card", style: "margin-top:12px" }, CF.el("div", { class: "chart", id: "chart-scaling" })),
      CF.el("h2", { text: "Runs" }), CF.el("div", { id: "points" }));
  }

  CF.header("/scaling");
  build();
  refresh();
})();
