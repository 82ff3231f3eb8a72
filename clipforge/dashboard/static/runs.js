// Runs table: every run under the folder, sortable and filterable here in the page, refreshed by polling.
"use strict";

(function () {
  const REFRESH_MS = Number(CF.params.get("poll")) || 5000;
  const state = { rows: [], metrics: [], sortKey: "updated", sortDir: -1, filter: CF.params.get("q") || "",
    metric: CF.params.get("metric") || "", selected: new Set() };
  const page = document.getElementById("page");

  const COLUMNS = [
    { key: "select", label: "", sortable: false },
    { key: "name", label: "name" },
    { key: "sweep", label: "sweep" },
    { key: "kind", label: "kind" },
    { key: "status", label: "status" },
    { key: "model", label: "model" },
    { key: "params", label: "params", num: true, fmt: CF.fmtCount },
    { key: "samples_seen", label: "samples seen", num: true, fmt: CF.fmtCount },
    { key: "compute", label: "compute (GMAC)", num: true, fmt: (v) => CF.fmt(v, 2) },
    { key: "eval", label: "eval metric", num: true, fmt: (v) => CF.fmt(v, 4) },
    { key: "wall_seconds", label: "wall time", num: true, fmt: CF.fmtDuration },
    { key: "samples_per_second", label: "samples/s", num: true, fmt: (v) => CF.fmt(v, 4) },
    { key: "step", label: "step", num: true, fmt: (v) => CF.fmt(v) },
    { key: "loss", label: "loss", num: true, fmt: (v) => CF.fmt(v, 4) },
    { key: "updated", label: "updated", num: true, fmt: CF.fmtAgo },
  ];

  function value(row, key) {
    if (key === "eval") return state.metric ? row.evals[state.metric] : undefined;
    return row[key];
  }

  function matches(row, terms) {
    if (!terms.length) return true;
    const hay = [row.name, row.id, row.sweep, row.kind, row.status, row.model,
      ...Object.entries(row.swept || {}).map(([k, v]) => `${k}=${v}`)].join(" ").toLowerCase();
    return terms.every((t) => hay.includes(t));
  }

  function compare(a, b) {
    const va = value(a, state.sortKey), vb = value(b, state.sortKey);
    const na = va === undefined || va === null || va === "", nb = vb === undefined || vb === null || vb === "";
    if (na || nb) return na === nb ? 0 : na ? 1 : -1; // blanks last in both directions
    if (typeof va === "number" && typeof vb === "number") return (va - vb) * state.sortDir;
    return String(va).localeCompare(String(vb), undefined, { numeric: true }) * state.sortDir;
  }

  function cell(row, col) {
    if (col.key === "select") {
      const box = CF.el("input", { type: "checkbox", "data-id": row.id, onchange: (ev) => {
        if (ev.target.checked) state.selected.add(row.id); else state.selected.delete(row.id);
        updateCompareButton();
      } });
      box.checked = state.selected.has(row.id);
      return CF.el("td", {}, box);
    }
    if (col.key === "name") {
      const td = CF.el("td", {}, CF.runLink(row.id, row.name));
      const swept = Object.entries(row.swept || {}).map(([k, v]) => `${k}=${v}`).join(" ");
      if (swept) td.append(CF.el("span", { class: "muted", text: "  " + swept }));
      if (row.error) td.title = row.error;
      return td;
    }
    if (col.key === "sweep") {
      // Only a real sweep (a folder with sweep.json) is named here; a plain folder is not a sweep.
      return CF.el("td", {}, row.sweep ? CF.el("a", { href: "/sweep?id=" + encodeURIComponent(row.sweep), text: row.sweep }) : "");
    }
    if (col.key === "status") return CF.el("td", {}, CF.badge(row.status));
    const v = value(row, col.key);
    return CF.el("td", { class: col.num ? "num" : null, text: col.fmt ? col.fmt(v) : v === null || v === undefined ? "" : String(v) });
  }

  // The metric most runs have, preferring top-1 accuracy and recall@1 among equally common ones.
  function defaultMetric(rows, metrics) {
    const count = new Map(metrics.map((m) => [m, 0]));
    for (const r of rows) for (const k of Object.keys(r.evals)) if (count.has(k)) count.set(k, count.get(k) + 1);
    const rank = (m) => { const name = CF.evalKeyParts(m).metric; return name === "acc1" ? 2 : name.endsWith("recall@1") ? 1 : 0; };
    return metrics.slice().sort((a, b) => count.get(b) - count.get(a) || rank(b) - rank(a) || a.localeCompare(b))[0];
  }

  function updateCompareButton() {
    const button = document.getElementById("compare-button");
    button.disabled = state.selected.size < 1;
    button.textContent = `Compare selected (${state.selected.size})`;
  }

  function renderTable() {
    const terms = state.filter.toLowerCase().split(/\s+/).filter(Boolean);
    const rows = state.rows.filter((r) => matches(r, terms)).sort(compare);
    const head = CF.el("tr", {});
    for (const col of COLUMNS) {
      const label = col.key === "eval" ? (state.metric || col.label) : col.label;
      const th = CF.el("th", { text: label, "data-key": col.key,
        class: state.sortKey === col.key ? (state.sortDir > 0 ? "sorted-asc" : "sorted-desc") : null });
      if (col.sortable !== false) {
        th.addEventListener("click", () => {
          if (state.sortKey === col.key) state.sortDir = -state.sortDir;
          else { state.sortKey = col.key; state.sortDir = col.num ? -1 : 1; }
          renderTable();
        });
      }
      head.append(th);
    }
    const body = CF.el("tbody", {});
    for (const r of rows) {
      const tr = CF.el("tr", { "data-id": r.id });
      for (const col of COLUMNS) tr.append(cell(r, col));
      body.append(tr);
    }
    const table = CF.el("table", { class: "data", id: "runs-table" }, CF.el("thead", {}, head), body);
    document.getElementById("table-wrap").replaceChildren(table);
    document.getElementById("count").textContent = `${rows.length} of ${state.rows.length} runs`;
  }

  function renderMetricPicker() {
    const select = document.getElementById("metric");
    const current = state.metric;
    select.replaceChildren(CF.el("option", { value: "", text: "(none)" }),
      ...state.metrics.map((m) => CF.el("option", { value: m, text: m })));
    select.value = current;
  }

  function build() {
    const filter = CF.el("input", { type: "search", id: "filter", placeholder: "filter: name, sweep, model, status…",
      value: state.filter, size: 36, oninput: (ev) => { state.filter = ev.target.value; renderTable(); } });
    const metric = CF.el("select", { id: "metric", onchange: (ev) => { state.metric = ev.target.value; renderTable(); } });
    const compareButton = CF.el("button", { id: "compare-button", disabled: true, onclick: () => {
      window.location.href = "/compare?ids=" + encodeURIComponent([...state.selected].join(","));
    } });
    CF.fill(page,
      CF.el("h1", { text: "Runs" }),
      CF.el("div", { class: "toolbar" }, filter, CF.el("label", {}, "eval metric", metric), compareButton,
        CF.el("span", { class: "muted", id: "count" }), CF.el("span", { class: "muted", id: "pending" })),
      CF.el("div", { class: "table-wrap", id: "table-wrap" }));
    updateCompareButton();
  }

  async function refresh() {
    try {
      const data = await CF.api("/api/runs");
      CF.setRoot(data.root);
      state.rows = data.runs;
      state.metrics = data.metrics;
      if (!state.metric && data.metrics.length) state.metric = defaultMetric(data.runs, data.metrics);
      renderMetricPicker();
      renderTable();
      document.getElementById("pending").textContent = data.estimates_pending.length
        ? `estimating compute of ${data.estimates_pending.join(", ")}…` : "";
      document.body.dataset.loaded = "1";
    } catch (err) {
      CF.showError(document.getElementById("table-wrap"), err);
    }
  }

  CF.header("/");
  build();
  refresh();
  setInterval(refresh, REFRESH_MS);
})();
