// Small SVG line/scatter charts with linear or log axes, confidence bands and a hover readout.
// No charting library: pages must work offline and stay light.
"use strict";
window.CF = window.CF || {};

(function () {
  const NS = "http://www.w3.org/2000/svg";
  const MAX_LINE_POINTS = 2000;

  function svg(tag, attrs) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }

  function niceStep(span, count) {
    const raw = span / Math.max(count, 1);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const norm = raw / mag;
    return (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
  }

  function linearTicks(lo, hi, count) {
    if (!(hi > lo)) return [lo];
    const step = niceStep(hi - lo, count);
    const ticks = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Math.abs(t) < step * 1e-9 ? 0 : t);
    return ticks;
  }

  function logTicks(lo, hi) {
    // lo, hi are log10 values. Decades when the range is wide, 1-2-5 steps when narrow.
    const span = hi - lo;
    const ticks = [];
    if (span > 6) {
      const step = Math.ceil(span / 6);
      for (let d = Math.ceil(lo); d <= hi; d += step) ticks.push(d);
      return ticks;
    }
    const mults = span > 2 ? [1] : span > 0.8 ? [1, 2, 5] : [1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9];
    for (let d = Math.floor(lo); d <= Math.ceil(hi); d++) {
      for (const m of mults) {
        const t = d + Math.log10(m);
        if (t >= lo - 1e-9 && t <= hi + 1e-9) ticks.push(t);
      }
    }
    if (ticks.length < 2) return linearTicks(Math.pow(10, lo), Math.pow(10, hi), 4).filter((v) => v > 0).map(Math.log10);
    return ticks;
  }

  function tickLabel(v) {
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e4 || a < 1e-3) {
      const e = Math.floor(Math.log10(a));
      const m = v / Math.pow(10, e);
      return (Math.abs(m - Math.round(m)) < 1e-6 ? String(Math.round(m)) : m.toFixed(1)) + "e" + e;
    }
    return String(parseFloat(v.toPrecision(3)));
  }

  // Labels of evenly spaced ticks: as many decimals as the spacing needs, so neighbours never read the same;
  // large values with an SI suffix (150k, 2.5M), tiny ones in e-notation.
  const SI = [[1e18, "E"], [1e15, "P"], [1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];
  function linearLabel(ticks) {
    if (ticks.length < 2) return tickLabel;
    const step = Math.abs(ticks[1] - ticks[0]);
    const big = Math.max(...ticks.map(Math.abs));
    const decimalsFor = (unitStep) => Math.max(0, Math.min(8, -Math.floor(Math.log10(unitStep) + 1e-9)));
    if (big >= 1e4 && big < 1e21) {
      const [scale, unit] = SI.find(([sc]) => big >= sc);
      const d = decimalsFor(step / scale);
      return (v) => (v === 0 ? "0" : (v / scale).toFixed(d) + unit);
    }
    if (big > 0 && (big < 1e-3 || big >= 1e21)) {
      const e = Math.floor(Math.log10(big));
      const d = Math.max(0, Math.min(6, e - Math.floor(Math.log10(step))));
      return (v) => (v === 0 ? "0" : (v / Math.pow(10, e)).toFixed(d) + "e" + e);
    }
    const d = decimalsFor(step);
    return (v) => v.toFixed(d);
  }

  function extent(values) {
    // A loop, not Math.min(...values): spreading long runs' curves overflows the call stack.
    let lo = Infinity, hi = -Infinity;
    for (const v of values) { if (v < lo) lo = v; if (v > hi) hi = v; }
    return [lo, hi];
  }

  function thin(points) {
    if (points.length <= MAX_LINE_POINTS) return points;
    const stride = Math.ceil(points.length / MAX_LINE_POINTS);
    const out = points.filter((_, i) => i % stride === 0);
    if (out[out.length - 1] !== points[points.length - 1]) out.push(points[points.length - 1]);
    return out;
  }

  // opts: {series: [{name, points: [[x, y]], color, mode: "line"|"markers"|"both", dash, width, radius, id}],
  //        bands: [{points: [[x, lo, hi]], color}], xlabel, ylabel, logx, logy, height, xfmt, yfmt}
  CF.drawChart = function (container, opts) {
    const width = Math.max(container.clientWidth || 0, 320);
    const height = opts.height || 240;
    const m = { l: 64, r: 14, t: 10, b: 38 };
    const fx = opts.logx ? (v) => (v > 0 ? Math.log10(v) : NaN) : (v) => v;
    const fy = opts.logy ? (v) => (v > 0 ? Math.log10(v) : NaN) : (v) => v;
    const ok = (v) => typeof v === "number" && isFinite(v);

    const series = (opts.series || []).map((s) => ({
      ...s,
      pts: (s.points || []).map((p) => [fx(p[0]), fy(p[1]), p]).filter((p) => ok(p[0]) && ok(p[1])),
    }));
    const bands = (opts.bands || []).map((b) => ({
      ...b,
      pts: (b.points || []).map((p) => [fx(p[0]), fy(p[1]), fy(p[2])]).filter((p) => ok(p[0]) && ok(p[1]) && ok(p[2])),
    }));
    const xs = [], ys = [];
    for (const s of series) for (const p of s.pts) { xs.push(p[0]); ys.push(p[1]); }
    for (const b of bands) for (const p of b.pts) { xs.push(p[0]); ys.push(p[1], p[2]); }

    container.replaceChildren();
    if (!xs.length) {
      container.append(Object.assign(document.createElement("div"), { className: "empty", textContent: opts.empty || "no data yet" }));
      return null;
    }
    let [x0, x1] = extent(xs);
    let [y0, y1] = extent(ys);
    if (x0 === x1) { x0 -= opts.logx ? 0.5 : Math.abs(x0) * 0.1 || 1; x1 += opts.logx ? 0.5 : Math.abs(x1) * 0.1 || 1; }
    if (y0 === y1) { y0 -= opts.logy ? 0.5 : Math.abs(y0) * 0.1 || 1; y1 += opts.logy ? 0.5 : Math.abs(y1) * 0.1 || 1; }
    const pad = (y1 - y0) * 0.05;
    y0 -= pad; y1 += pad;
    const W = width - m.l - m.r, H = height - m.t - m.b;
    const sx = (v) => m.l + ((v - x0) / (x1 - x0)) * W;
    const sy = (v) => m.t + H - ((v - y0) / (y1 - y0)) * H;

    const root = svg("svg", { class: "cf-chart", width, height, viewBox: `0 0 ${width} ${height}`,
      "data-series": String(series.length) });
    const grid = svg("g", { class: "grid" }), axis = svg("g", { class: "axis" });
    const xt = opts.logx ? logTicks(x0, x1) : linearTicks(x0, x1, Math.max(2, Math.floor(W / 90)));
    const yt = opts.logy ? logTicks(y0, y1) : linearTicks(y0, y1, Math.max(2, Math.floor(H / 45)));
    const xLabel = opts.logx ? (t) => tickLabel(Math.pow(10, t)) : linearLabel(xt);
    const yLabel = opts.logy ? (t) => tickLabel(Math.pow(10, t)) : linearLabel(yt);
    for (const t of xt) {
      grid.append(svg("line", { x1: sx(t), x2: sx(t), y1: m.t, y2: m.t + H }));
      const label = svg("text", { x: sx(t), y: m.t + H + 14, "text-anchor": "middle" });
      label.textContent = xLabel(t);
      axis.append(label);
    }
    for (const t of yt) {
      grid.append(svg("line", { x1: m.l, x2: m.l + W, y1: sy(t), y2: sy(t) }));
      const label = svg("text", { x: m.l - 6, y: sy(t) + 4, "text-anchor": "end" });
      label.textContent = yLabel(t);
      axis.append(label);
    }
    axis.append(svg("path", { d: `M${m.l},${m.t}V${m.t + H}H${m.l + W}`, fill: "none" }));
    if (opts.xlabel) {
      const t = svg("text", { x: m.l + W / 2, y: height - 4, "text-anchor": "middle" });
      t.textContent = opts.xlabel;
      axis.append(t);
    }
    if (opts.ylabel) {
      const t = svg("text", { x: 11, y: m.t + H / 2, "text-anchor": "middle", transform: `rotate(-90 11 ${m.t + H / 2})` });
      t.textContent = opts.ylabel;
      axis.append(t);
    }
    root.append(grid, axis);
    const clipId = "clip" + Math.random().toString(36).slice(2);
    const defs = svg("defs");
    const clip = svg("clipPath", { id: clipId });
    clip.append(svg("rect", { x: m.l, y: m.t, width: W, height: H }));
    defs.append(clip);
    root.append(defs);
    const plot = svg("g", { "clip-path": `url(#${clipId})` });

    for (const b of bands) {
      if (b.pts.length < 2) continue;
      const upper = b.pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[2]).toFixed(1)}`);
      const lower = b.pts.slice().reverse().map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`);
      plot.append(svg("polygon", { class: "cf-band", points: upper.concat(lower).join(" "), fill: b.color || "#2962ff",
        "fill-opacity": b.opacity || 0.15, stroke: "none", "data-points": String(b.pts.length) }));
    }
    series.forEach((s, i) => {
      const color = s.color || CF.palette[i % CF.palette.length];
      const mode = s.mode || "line";
      if (mode !== "markers" && s.pts.length) {
        const pts = thin(s.pts);
        const d = pts.map((p, j) => (j ? "L" : "M") + sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join("");
        plot.append(svg("path", { class: "cf-series", d, fill: "none", stroke: color, "stroke-width": s.width || 1.6,
          "stroke-dasharray": s.dash || "none", "data-name": s.name || "", "data-points": String(s.pts.length) }));
      }
      if (mode !== "line") {
        const g = svg("g", { class: "cf-markers", "data-name": s.name || "", "data-points": String(s.pts.length) });
        for (const p of s.pts) {
          const c = svg("circle", { cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: s.radius || 3.5, fill: color,
            "fill-opacity": s.opacity || 0.85, stroke: s.stroke || "none" });
          const title = svg("title");
          title.textContent = (p[2][2] ? p[2][2] + ": " : "") + `${tickLabel(p[2][0])}, ${tickLabel(p[2][1])}`;
          c.append(title);
          g.append(c);
        }
        plot.append(g);
      }
    });
    root.append(plot);
    container.append(root);
    addHover(container, root, series.filter((s) => (s.mode || "line") !== "markers"), { sx, sy, m, W, H, x0, x1, opts });
    if (series.length > 1 || opts.legend) {
      const legend = document.createElement("div");
      legend.className = "legend";
      series.forEach((s, i) => {
        if (s.legend === false) return;
        const item = document.createElement("span");
        const sw = document.createElement("i");
        sw.style.background = s.color || CF.palette[i % CF.palette.length];
        item.append(sw, document.createTextNode(s.name || "series " + (i + 1)));
        legend.append(item);
      });
      container.append(legend);
    }
    return root;
  };

  function nearest(pts, x) {
    let lo = 0, hi = pts.length - 1;
    while (hi - lo > 1) {
      const mid = (lo + hi) >> 1;
      if (pts[mid][0] < x) lo = mid; else hi = mid;
    }
    return Math.abs(pts[lo][0] - x) <= Math.abs(pts[hi][0] - x) ? pts[lo] : pts[hi];
  }

  function addHover(container, root, lines, g) {
    if (!lines.some((s) => s.pts.length)) return;
    const tip = document.createElement("div");
    tip.className = "tip";
    container.append(tip);
    const cross = svg("line", { y1: g.m.t, y2: g.m.t + g.H, stroke: "#9aa5b1", "stroke-dasharray": "3,3", visibility: "hidden" });
    root.append(cross);
    const overlay = svg("rect", { x: g.m.l, y: g.m.t, width: g.W, height: g.H, fill: "transparent" });
    root.append(overlay);
    const sorted = lines.map((s) => ({ name: s.name, pts: s.pts.slice().sort((a, b) => a[0] - b[0]) }));
    overlay.addEventListener("mousemove", (ev) => {
      const box = root.getBoundingClientRect();
      const px = ev.clientX - box.left;
      const x = g.x0 + ((px - g.m.l) / g.W) * (g.x1 - g.x0);
      const rows = [];
      let xv = null;
      for (const s of sorted) {
        if (!s.pts.length) continue;
        const p = nearest(s.pts, x);
        xv = xv === null ? p[2][0] : xv;
        rows.push(`${s.name || "y"}: ${tickLabel(p[2][1])}`);
      }
      cross.setAttribute("x1", px); cross.setAttribute("x2", px);
      cross.setAttribute("visibility", "visible");
      tip.textContent = "";
      tip.append(document.createTextNode(`${g.opts.xlabel || "x"}: ${tickLabel(xv)}`));
      for (const r of rows) { tip.append(document.createElement("br"), document.createTextNode(r)); }
      tip.style.display = "block";
      tip.style.left = Math.min(px + 12, box.width - 160) + "px";
      tip.style.top = "8px";
    });
    overlay.addEventListener("mouseleave", () => { tip.style.display = "none"; cross.setAttribute("visibility", "hidden"); });
  }
})();

// Grouped horizontal bars (no SVG needed): one group per name in `groups`, in it one bar per series, side by side
// in the series' colours; bar lengths are relative to the largest value shown. opts: {groups: [name...],
// series: [{name, values: {group name: number}}], digits}.
CF.drawBars = function (container, opts) {
  const series = opts.series || [];
  const max = Math.max(0, ...series.flatMap((s) => Object.values(s.values).filter(CF.isNum)));
  const colour = (i) => CF.palette[i % CF.palette.length];
  const box = CF.el("div", { class: "bars" });
  for (const group of opts.groups || []) {
    box.append(CF.el("div", { class: "bar-group", text: group }));
    series.forEach((s, i) => {
      const v = s.values[group];
      if (!CF.isNum(v)) return;
      const width = max > 0 ? Math.max(0, (100 * v) / max) : 0;
      box.append(CF.el("div", { class: "bar", "data-series": s.name, "data-group": group, "data-value": String(v) },
        CF.el("span", { class: "label", text: s.name }),
        CF.el("span", { class: "track" }, CF.el("span", { class: "fill", style: `width:${width.toFixed(1)}%;background:${colour(i)}` })),
        CF.el("span", { class: "num", text: CF.fmt(v, opts.digits || 4) })));
    });
  }
  container.replaceChildren(box);
};
