// Shared page helpers: fetching the API, number formatting, the header.
"use strict";
window.CF = window.CF || {};

CF.params = new URLSearchParams(window.location.search);

CF.api = async function (path, params) {
  const url = new URL(path, window.location.origin);
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null) url.searchParams.set(k, v);
  }
  const resp = await fetch(url, { cache: "no-store" });
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.error || resp.statusText);
  return body;
};

CF.el = function (tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
};

// Replace a node's children, leaving out the null / undefined ones (optional sections).
CF.fill = function (node, ...children) {
  node.replaceChildren(...children.filter((c) => c !== null && c !== undefined));
  return node;
};

CF.isNum = (v) => typeof v === "number" && isFinite(v);

CF.fmt = function (v, digits) {
  if (!CF.isNum(v)) return "";
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(digits === undefined ? 2 : digits);
  if (Number.isInteger(v)) return String(v);
  return v.toPrecision(digits === undefined ? 4 : digits).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
};

CF.fmtCount = function (v) {
  if (!CF.isNum(v)) return "";
  const units = [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];
  for (const [scale, unit] of units) if (Math.abs(v) >= scale) return (v / scale).toPrecision(3) + unit;
  return String(Math.round(v));
};

CF.fmtDuration = function (s) {
  if (!CF.isNum(s)) return "";
  if (s < 60) return s.toFixed(1) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
};

CF.fmtTime = function (epoch) {
  if (!CF.isNum(epoch)) return "";
  return new Date(epoch * 1000).toLocaleString();
};

CF.fmtAgo = function (epoch) {
  if (!CF.isNum(epoch)) return "";
  const s = Date.now() / 1000 - epoch;
  if (s < 0) return "just now";
  if (s < 90) return Math.round(s) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  if (s < 86400 * 2) return Math.round(s / 3600) + " h ago";
  return new Date(epoch * 1000).toLocaleDateString();
};

CF.badge = (status) => CF.el("span", { class: "badge " + status, text: status });

CF.runLink = (id, text) => CF.el("a", { href: "/run?id=" + encodeURIComponent(id), text: text || id || "(root)" });

CF.header = function (active, root) {
  const nav = CF.el("nav", {});
  for (const [href, label] of [["/", "Runs"], ["/compare", "Compare"], ["/scaling", "Scaling"], ["/try", "Try it"]]) {
    nav.append(CF.el("a", { href, text: label, class: href === active ? "active" : null }));
  }
  const header = CF.el("header", {}, CF.el("span", { class: "brand", text: "clipforge" }), nav,
    CF.el("span", { class: "root", id: "root-path", text: root || "" }));
  document.body.prepend(header);
};

CF.setRoot = function (root) {
  const node = document.getElementById("root-path");
  if (node) node.textContent = root;
};

CF.showError = function (container, err) {
  container.replaceChildren(CF.el("p", { class: "error", text: String(err && err.message ? err.message : err) }));
};

// Every numeric key of a list of records (for metric pickers).
CF.numericKeys = function (records) {
  const keys = new Set();
  for (const r of records) for (const [k, v] of Object.entries(r)) if (CF.isNum(v)) keys.add(k);
  return [...keys].sort();
};

CF.palette = ["#2962ff", "#e65100", "#2e7d32", "#c62828", "#6a1b9a", "#00838f", "#ad1457", "#5d4037", "#455a64", "#9e9d24"];

// The parts of an eval metric key, "model label · dataset · task · metric" (the server's evals.eval_key).
CF.EVAL_KEY_SEP = " · ";
CF.evalKeyParts = function (key) {
  const parts = key.split(CF.EVAL_KEY_SEP);
  if (parts.length < 4) return { model: "", dataset: "", task: "", metric: parts[parts.length - 1] };
  const n = parts.length;
  return { model: parts.slice(0, n - 3).join(CF.EVAL_KEY_SEP), dataset: parts[n - 3], task: parts[n - 2], metric: parts[n - 1] };
};

// A table of eval scores, one row per {model, dataset, task, metric, value}, sorted by dataset, task, metric, model.
CF.evalScoreTable = function (entries, id) {
  const sorted = entries.slice().sort((a, b) => [a.dataset, a.task, a.metric, a.model].join("\u0000")
    .localeCompare([b.dataset, b.task, b.metric, b.model].join("\u0000")));
  const body = CF.el("tbody", {});
  for (const e of sorted) {
    body.append(CF.el("tr", {}, CF.el("td", { text: e.model }), CF.el("td", { text: e.dataset }), CF.el("td", { text: e.task }),
      CF.el("td", { text: e.metric }), CF.el("td", { class: "num", text: CF.fmt(e.value, 4) })));
  }
  const head = CF.el("tr", {}, ...["model label", "dataset", "task", "metric", "value"].map((t) => CF.el("th", { text: t })));
  return CF.el("table", { class: "data", id }, CF.el("thead", {}, head), body);
};
