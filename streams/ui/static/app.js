// driftline's page: three views over the JSON API under /ui/api (streams/ui/api.py).
// Plain ES2020, no build step; charts are uPlot (vendored, static/uPlot.iife.min.js).
// Times are event time in UTC. Test hooks: window.driftline (state, charts, renders).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const REFRESH_MS = 5000;
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
    "#7f7f7f", "#bcbd22"];
  const state = { view: "overview", range: null, keys: new Map(), busy: false, renders: 0, charts: [] };
  window.driftline = state;

  // -- formatting (the browser test compares these strings with SQL) ----------------------
  const dash = "–";
  const fmtInt = (x) => (x == null ? dash : String(Math.round(x)));
  const fmtMs = (x) => (x == null ? dash : x.toFixed(1));
  const fmtPct = (x) => (x == null ? dash : (x * 100).toFixed(2) + "%");
  const fmtUsd = (x) => (x == null ? dash : "$" + x.toFixed(4));
  const fmtP = (x) => (x == null ? dash : x < 0.001 ? x.toExponential(2) : x.toFixed(4));
  const iso = (ms) => new Date(ms).toISOString();
  const fmtTime = (ms) => iso(ms).slice(0, 19).replace("T", " ");
  const keyName = (k) => `${k.app} / ${k.model} / ${k.prompt_version}`;
  const el = (tag, attrs, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k.startsWith("data-")) e.setAttribute(k, v);
      else if (k === "onclick") e.addEventListener("click", v);
      else e[k] = v;
    }
    for (const kid of kids) if (kid != null) e.append(kid instanceof Node ? kid : String(kid));
    return e;
  };
  const table = (tbl, head, rows) => {
    tbl.replaceChildren(el("thead", {}, el("tr", {}, ...head.map(([h, c]) => el("th", { class: c || "" }, h)))),
      el("tbody", {}, ...rows));
  };

  // -- the API ------------------------------------------------------------------------------
  async function get(path, params) {
    const q = new URLSearchParams(params || {});
    const r = await fetch(`api/${path}?${q}`, { headers: { Accept: "application/json" }, cache: "no-store" });
    const body = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
    if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
    return body;
  }
  const filters = () => ({ app: $("app").value, model: $("model").value, prompt_version: $("prompt_version").value });

  // -- the range ------------------------------------------------------------------------------
  const toInput = (ms) => iso(ms).slice(0, 19);
  const fromInput = (v) => Date.parse(v + "Z");
  async function resolveRange() {
    const choice = $("range").value;
    if (choice === "custom") {
      const f = fromInput($("from").value), t = fromInput($("to").value);
      if (!(f < t)) throw new Error("custom range: 'from' must be before 'to'");
      return { from: f, to: t };
    }
    const ext = await get("extent");
    // the range ends at the newest data (live: about now), so a past replay shows too
    const end = ext.to == null ? ext.now : ext.to + 1;
    const from = choice === "all" ? (ext.from == null ? end - 3600000 : ext.from) : end - Number(choice);
    $("from").value = toInput(from);
    $("to").value = toInput(end);
    return { from, to: end };
  }

  // -- charts ---------------------------------------------------------------------------------
  function destroyCharts() {
    for (const c of state.charts) c.destroy();
    state.charts = [];
  }

  // series: [{label, xs (ms), ys, color, dash, width, points}] on one shared x axis
  function chart(parent, title, series, opts) {
    const box = el("div", { class: "chart", "data-title": title }, el("h3", {}, title));
    parent.append(box);
    const xsAll = [...new Set(series.flatMap((s) => s.xs))].sort((a, b) => a - b);
    if (!xsAll.length) {
      box.append(el("div", { class: "empty" }, "no data in this range"));
      return null;
    }
    const idx = new Map(xsAll.map((x, i) => [x, i]));
    const data = [xsAll.map((x) => x / 1000)];
    for (const s of series) {
      const ys = new Array(xsAll.length).fill(null);
      s.xs.forEach((x, i) => { ys[idx.get(x)] = s.ys[i]; });
      data.push(ys);
    }
    const fmt = (opts && opts.fmt) || ((v) => (v == null ? dash : +v.toPrecision(4)));
    const u = new uPlot({
      width: Math.max(300, box.clientWidth || 460), height: (opts && opts.height) || 190,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
      legend: { live: true },
      scales: { x: { time: true }, y: (opts && opts.y) || {} },
      axes: [{}, { size: 60, values: (u, vals) => vals.map((v) => fmt(v)) }],
      series: [{ value: (u, v) => (v == null ? dash : fmtTime(v * 1000)) }, ...series.map((s) => ({
        label: s.label, stroke: s.color, width: s.width || 1.5, dash: s.dash, spanGaps: false,
        points: s.points ? { show: true, size: 8, fill: s.color, stroke: s.color } : {},
        paths: s.points ? () => null : undefined, value: (u, v) => fmt(v),
      }))],
    }, data, box);
    state.charts.push(u);
    return u;
  }

  // -- overview -------------------------------------------------------------------------------
  function rememberKeys(keys) {
    for (const k of keys) state.keys.set(keyName(k), k);
    for (const name of ["app", "model", "prompt_version"]) {
      const sel = $(name), cur = sel.value;
      const vals = [...new Set([...state.keys.values()].map((k) => k[name]))].sort();
      sel.replaceChildren(el("option", { value: "" }, "all"), ...vals.map((v) => el("option", { value: v }, v)));
      sel.value = vals.includes(cur) ? cur : "";
    }
  }

  function renderOverview(ov) {
    const keys = ov.keys;
    table($("ov-keys"), [["app", "txt"], ["model", "txt"], ["prompt version", "txt"], ["events"], ["errors"],
      ["error rate"], ["max p95 ms"], ["tokens in"], ["tokens out"], ["cost"], ["guardrail hits"], ["windows"]],
    keys.map((k) => {
      const t = k.totals;
      return el("tr", { "data-key": keyName(k) }, el("td", { class: "txt" }, k.app),
        el("td", { class: "txt" }, k.model), el("td", { class: "txt" }, k.prompt_version),
        el("td", { "data-col": "events" }, fmtInt(t.events)), el("td", { "data-col": "errors" }, fmtInt(t.errors)),
        el("td", {}, fmtPct(t.error_rate)), el("td", { "data-col": "p95max" }, fmtMs(t.latency_p95_ms_max)),
        el("td", {}, fmtInt(t.input_tokens)), el("td", {}, fmtInt(t.output_tokens)),
        el("td", { "data-col": "cost" }, fmtUsd(t.cost_usd)), el("td", {}, fmtPct(t.guardrail_hit_rate)),
        el("td", {}, fmtInt(t.windows)));
    }));
    const box = $("ov-charts");
    box.replaceChildren();
    const per = (col, label, extra) => keys.map((k, i) => ({
      label: keys.length > 1 ? `${keyName(k)}${label ? " " + label : ""}` : label || col,
      xs: k.series.t, ys: k.series[col], color: COLORS[i % COLORS.length], ...(extra || {}),
    }));
    chart(box, "events / s", per("events_per_s"));
    chart(box, "error rate", per("error_rate"), { fmt: fmtPct });
    chart(box, "latency ms (p50 thin, p95, p99 dashed)", [
      ...per("latency_p50_ms", "p50", { width: 1 }), ...per("latency_p95_ms", "p95", { width: 2 }),
      ...per("latency_p99_ms", "p99", { dash: [5, 4] })]);
    chart(box, "TTFT p95 ms", per("ttft_p95_ms"));
    chart(box, "tokens per window (in solid, out dashed)", [
      ...per("input_tokens", "in"), ...per("output_tokens", "out", { dash: [5, 4] })]);
    chart(box, "cost USD / hour", per("cost_per_hour"), { fmt: (v) => (v == null ? dash : "$" + (+v.toPrecision(3))) });
    chart(box, "guardrail-hit rate", per("guardrail_hit_rate"), { fmt: fmtPct });
    const rows = [];
    keys.forEach((k) => k.series.t.forEach((t, i) => rows.push([t, k, i])));
    rows.sort((a, b) => b[0] - a[0] || keyName(a[1]).localeCompare(keyName(b[1])));
    table($("ov-windows"), [["window start (UTC)", "txt"], ["key", "txt"], ["events"], ["errors"], ["p50 ms"],
      ["p95 ms"], ["p99 ms"], ["TTFT p95 ms"], ["cost"], ["guardrail hits"], ["final"]],
    rows.slice(0, 200).map(([t, k, i]) => {
      const s = k.series;
      return el("tr", { "data-t": String(t), "data-key": keyName(k) }, el("td", { class: "txt" }, fmtTime(t)),
        el("td", { class: "txt" }, keyName(k)), el("td", { "data-col": "events" }, fmtInt(s.events[i])),
        el("td", {}, fmtInt(s.errors[i])), el("td", {}, fmtMs(s.latency_p50_ms[i])),
        el("td", { "data-col": "p95" }, fmtMs(s.latency_p95_ms[i])), el("td", {}, fmtMs(s.latency_p99_ms[i])),
        el("td", {}, fmtMs(s.ttft_p95_ms[i])), el("td", {}, fmtUsd(s.cost_usd[i])),
        el("td", {}, fmtPct(s.guardrail_hit_rate[i])), el("td", {}, s.final[i] ? "yes" : "open"));
    }));
  }

  // -- drift ----------------------------------------------------------------------------------
  function renderDrift(dr) {
    const box = $("dr-charts");
    box.replaceChildren();
    const groups = new Map();
    for (const s of dr.series) {
      const g = `${keyName(s)} — ${s.field}`;
      if (!groups.has(g)) groups.set(g, []);
      groups.get(g).push(s);
    }
    if (!groups.size) box.append(el("div", { class: "empty" }, "no drift tests in this range"));
    const floor = 1e-6;
    const clamp = (v) => (v == null ? null : Math.max(v, floor));
    for (const [g, ss] of groups) {
      const ref = dr.references.find((r) => r.in_force && keyName(r) === keyName(ss[0]) && r.field === ss[0].field);
      const series = [];
      ss.forEach((s, i) => {
        const color = COLORS[i % COLORS.length];
        series.push({ label: `${s.method} p`, xs: s.t, ys: s.p_value.map(clamp), color, width: 2 });
        series.push({ label: `${s.method} threshold`, xs: s.t, ys: s.threshold, color, dash: [4, 4], width: 1 });
        series.push({ label: `${s.method} flagged`, xs: s.t, ys: s.t.map((t, j) => (s.drifted[j] ? clamp(s.p_value[j]) : null)),
          color: "#c8372d", points: true });
      });
      const title = `${g}` + (ref ? ` · reference v${ref.version} (${ref.mode}, ${ref.n} samples)` : "");
      chart(box, title, series, {
        height: 230, fmt: fmtP,
        y: { distr: 3, log: 10, range: (u, min, max) => [Math.min(min == null ? 1e-4 : min, 1e-4) / 2, 1] },
      });
    }
    const fl = $("dr-flagged");
    fl.replaceChildren();
    if (!dr.flagged.length) fl.append(el("div", { class: "empty" }, "no test flagged drift in this range"));
    for (const f of dr.flagged) fl.append(flagged(f));
    table($("dr-refs"), [["key", "txt"], ["field", "txt"], ["version"], ["mode", "txt"], ["events from (UTC)", "txt"],
      ["to (UTC)", "txt"], ["samples"], ["made (UTC)", "txt"], ["note", "txt"], ["in force", "txt"]],
    dr.references.map((r) => el("tr", {}, el("td", { class: "txt" }, keyName(r)), el("td", { class: "txt" }, r.field),
      el("td", {}, r.version), el("td", { class: "txt" }, r.mode), el("td", { class: "txt" }, fmtTime(r.from)),
      el("td", { class: "txt" }, fmtTime(r.to)), el("td", {}, r.n), el("td", { class: "txt" }, fmtTime(r.created)),
      el("td", { class: "txt" }, r.note), el("td", { class: "txt" }, r.in_force ? "yes" : "rebased"))));
  }

  function flagged(f) {
    const d = el("div", { class: "flag", "data-t": String(f.t), "data-method": f.method },
      el("div", {}, el("b", {}, `${fmtTime(f.t)} UTC · ${keyName(f)} · ${f.field} · ${f.method}`), " p = ",
        el("span", { "data-col": "p" }, fmtP(f.p_value)), ` < threshold ${fmtP(f.threshold)} · statistic `,
        (+f.statistic.toPrecision(4)).toString(), ` · ${f.n_ref} reference vs ${f.n_cur} current samples`));
    const ex = f.explanation || {};
    if (Array.isArray(ex.clusters) && ex.clusters.length) {
      const grid = el("div", { class: "clusters" });
      for (const c of ex.clusters) {
        const grown = c.delta > 0;
        const texts = (grown ? c.cur_examples : c.examples) || c.cur_examples || c.examples || [];
        grid.append(el("div", {},
          el("div", { class: grown ? "grown" : "shrunk" },
            `topic ${c.cluster} ${grown ? "grew" : "shrank"}: ${fmtPct(c.ref_share)} → ${fmtPct(c.cur_share)}`),
          el("ul", {}, ...texts.map((t) => el("li", {}, t)))));
      }
      d.append(grid);
      if (ex.clusters_total > ex.clusters.length) d.append(el("div", { class: "muted" }, `${ex.clusters_total - ex.clusters.length} more topics unchanged or smaller changes`));
    } else if (ex.rule || ex.test) {
      d.append(el("div", { class: "muted" }, ex.test || ex.rule));
    }
    return d;
  }

  // -- alerts ---------------------------------------------------------------------------------
  function showKey(app, model) {
    $("app").value = app; $("model").value = model; $("prompt_version").value = "";
    switchView("overview");
  }

  function renderAlerts(al, range) {
    const tl = $("al-timeline");
    tl.replaceChildren();
    tl.className = "timeline";
    const span = range.to - range.from;
    const rows = new Map();
    for (const iv of al.intervals) {
      const k = `${iv.rule}|${iv.fingerprint}`;
      if (!rows.has(k)) rows.set(k, { iv, spans: [] });
      rows.get(k).spans.push(iv);
    }
    if (!rows.size) tl.append(el("div", { class: "empty" }, "no alert fired in this range"));
    for (const { iv, spans } of rows.values()) {
      const track = el("div", { class: "track" });
      for (const s of spans) {
        const a = Math.max(0, (s.start - range.from) / span), b = Math.min(1, ((s.end ?? range.to) - range.from) / span);
        const bar = el("div", { class: "bar" + (s.end == null ? " open" : ""), title: `${fmtTime(s.start)} – ${s.end == null ? "still firing" : fmtTime(s.end)}`,
          onclick: () => showKey(iv.app, iv.model) });
        bar.style.left = `${(a * 100).toFixed(3)}%`;
        bar.style.width = `${Math.max(0, (b - a) * 100).toFixed(3)}%`;
        track.append(bar);
      }
      tl.append(el("div", { class: "row", "data-rule": iv.rule },
        el("div", { class: "label", title: JSON.stringify(iv.labels) }, `${iv.rule} · ${iv.app}/${iv.model} (${iv.severity})`), track));
    }
    if (rows.size) tl.append(el("div", { class: "axis" }, el("span", {}, fmtTime(range.from)), el("span", {}, fmtTime(range.to))));
    table($("al-events"), [["time (UTC)", "txt"], ["rule", "txt"], ["state", "txt"], ["severity", "txt"], ["app", "txt"],
      ["model", "txt"], ["value"], ["summary", "txt"]],
    al.events.slice().reverse().map((e) => el("tr", { class: "click", "data-rule": e.rule, "data-t": String(e.t), onclick: () => showKey(e.app, e.model) },
      el("td", { class: "txt" }, fmtTime(e.t)), el("td", { class: "txt" }, e.rule),
      el("td", { class: `txt state-${e.state}` }, e.state), el("td", { class: "txt" }, e.severity),
      el("td", { class: "txt" }, e.app), el("td", { class: "txt" }, e.model),
      el("td", { "data-col": "value" }, (+e.value.toPrecision(4)).toString()),
      el("td", { class: "txt" }, e.annotations.summary || ""))));
  }

  // -- refresh --------------------------------------------------------------------------------
  async function refresh() {
    if (state.busy) return;
    state.busy = true;
    try {
      const range = await resolveRange();
      const params = { from: range.from, to: range.to, ...filters() };
      const [ov, dr, al] = await Promise.all([get("overview", params), get("drift", params), get("alerts", params)]);
      state.range = range;
      state.data = { overview: ov, drift: dr, alerts: al };
      rememberKeys(ov.keys);
      destroyCharts();
      // only the visible view has a width to draw in; the others are drawn when shown
      render();
      $("error").hidden = true;
      $("status").textContent = `${fmtTime(range.from)} – ${fmtTime(range.to)} UTC · updated ${fmtTime(Date.now())}`;
    } catch (e) {
      $("error").hidden = false;
      $("error").textContent = String(e.message || e);
    } finally {
      state.busy = false;
      state.renderedAt = performance.now();  // ms since navigation start (benchmarks/bench_ui.py)
      state.renders += 1;
      document.body.dataset.renders = String(state.renders);
    }
  }

  function render() {
    if (!state.data) return;
    destroyCharts();
    if (state.view === "overview") renderOverview(state.data.overview);
    if (state.view === "drift") renderDrift(state.data.drift);
    if (state.view === "alerts") renderAlerts(state.data.alerts, state.range);
    document.body.dataset.view = state.view;
  }

  function switchView(v) {
    state.view = v;
    for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.view === v);
    for (const s of ["overview", "drift", "alerts"]) $(`view-${s}`).hidden = s !== v;
    refresh();
  }
  state.switchView = switchView;
  state.refresh = refresh;

  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => switchView(b.dataset.view));
  for (const id of ["range", "app", "model", "prompt_version"]) $(id).addEventListener("change", refresh);
  for (const id of ["from", "to"]) $(id).addEventListener("change", () => { $("range").value = "custom"; refresh(); });
  setInterval(() => { if ($("live").checked && !document.hidden) refresh(); }, REFRESH_MS);
  refresh();
})();
