/* GEX profile and levels history (issue 19). Self-contained: polls /api/gex (meta.profile)
   and /api/gex/history (spot, zero gamma, walls per publish) for the symbol picked in
   #symbol, and draws two small SVG line charts. */
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const NS = "http://www.w3.org/2000/svg";
  const POLL_MS = 4000;
  const st = { symbol: null, scope: "all", history: [], lastMs: null, profile: null, timer: null };

  function symbol() {
    const sel = $("symbol");
    return sel && sel.value ? sel.value : "SPX";
  }
  function fmtBig(v) {
    if (v === null || v === undefined || !Number.isFinite(v)) return "—";
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toFixed(2) + "B";
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e3) return (v / 1e3).toFixed(1) + "k";
    return v.toFixed(0);
  }
  function el(name, attrs, text) {
    const e = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function frame(svg, xs, ys) {
    const w = svg.clientWidth || 600, h = svg.clientHeight || 180;
    const pad = { l: 56, r: 10, t: 8, b: 22 };
    const [x0, x1] = xs, [y0, y1] = ys;
    const sx = (x) => pad.l + ((x - x0) / (x1 - x0 || 1)) * (w - pad.l - pad.r);
    const sy = (y) => h - pad.b - ((y - y0) / (y1 - y0 || 1)) * (h - pad.t - pad.b);
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    svg.replaceChildren();
    svg.append(el("line", { class: "axis", x1: pad.l, x2: w - pad.r, y1: h - pad.b, y2: h - pad.b }));
    return { w, h, pad, sx, sy };
  }
  function path(points) {
    return points.map(([x, y], i) => `${i ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`).join("");
  }

  function drawProfile() {
    const svg = $("gex-profile");
    const p = st.profile;
    const ys = p ? p[st.scope] : null;
    $("gex-profile-empty").hidden = !!(ys && ys.length);
    if (!ys || !ys.length) { svg.replaceChildren(); return; }
    const xs = p.spot;
    let lo = Math.min(0, ...ys), hi = Math.max(0, ...ys);
    if (lo === hi) hi = lo + 1;
    const f = frame(svg, [xs[0], xs[xs.length - 1]], [lo, hi]);
    svg.append(el("line", { class: "grid", x1: f.pad.l, x2: f.w - f.pad.r, y1: f.sy(0), y2: f.sy(0) }));
    svg.append(el("path", { class: "profile", d: path(xs.map((x, i) => [f.sx(x), f.sy(ys[i])])) }));
    const lv = st.levels || {};
    for (const [k, cls] of [["spot", "spot"], ["zero_gamma", "zero_gamma"]]) {
      const v = k === "spot" ? st.spot : lv[k];
      if (v === null || v === undefined || v < xs[0] || v > xs[xs.length - 1]) continue;
      svg.append(el("line", { class: `lvl ${cls}`, x1: f.sx(v), x2: f.sx(v), y1: f.pad.t, y2: f.h - f.pad.b }));
    }
    svg.append(el("text", { x: 4, y: f.sy(hi) + 8 }, fmtBig(hi)));
    svg.append(el("text", { x: 4, y: f.sy(lo) }, fmtBig(lo)));
    for (const x of [xs[0], xs[Math.floor(xs.length / 2)], xs[xs.length - 1]]) {
      svg.append(el("text", { x: f.sx(x) - 18, y: f.h - 6 }, x.toFixed(0)));
    }
  }

  const SERIES = [
    ["spot", "spot"], ["zero_gamma", "zero_gamma"], ["call_wall", "call_wall"], ["put_wall", "put_wall"],
  ];
  function seriesKey(k) {
    if (st.scope !== "0dte" || k === "spot") return k;
    return k + "_0dte";
  }
  function drawHistory() {
    const svg = $("gex-history");
    const h = st.history;
    $("gex-history-empty").hidden = h.length > 1;
    if (h.length < 2) { svg.replaceChildren(); return; }
    const t0 = h[0].ts_ns / 1e9, t1 = h[h.length - 1].ts_ns / 1e9;
    let lo = Infinity, hi = -Infinity;
    for (const e of h) for (const [k] of SERIES) {
      const v = e[seriesKey(k)];
      if (v !== null && v !== undefined && Number.isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    }
    if (!Number.isFinite(lo)) { svg.replaceChildren(); return; }
    const padv = Math.max(1, (hi - lo) * 0.05);
    const f = frame(svg, [t0, t1], [lo - padv, hi + padv]);
    for (const [k, cls] of SERIES) {
      const pts = [];
      for (const e of h) {
        const v = e[seriesKey(k)];
        if (v !== null && v !== undefined && Number.isFinite(v)) pts.push([f.sx(e.ts_ns / 1e9), f.sy(v)]);
      }
      if (pts.length) svg.append(el("path", { class: `hist ${cls}`, d: path(pts) }));
    }
    svg.append(el("text", { x: 4, y: f.sy(hi) + 4 }, hi.toFixed(0)));
    svg.append(el("text", { x: 4, y: f.sy(lo) }, lo.toFixed(0)));
    const fmtT = (s) => new Date(s * 1000).toLocaleTimeString();
    svg.append(el("text", { x: f.pad.l, y: f.h - 6 }, fmtT(t0)));
    svg.append(el("text", { x: f.w - f.pad.r - 60, y: f.h - 6 }, fmtT(t1)));
  }

  async function poll() {
    const sym = symbol();
    if (sym !== st.symbol) {
      st.symbol = sym; st.history = []; st.lastMs = null; st.profile = null;
    }
    try {
      const m = await apiFetch(`/api/gex?symbol=${encodeURIComponent(sym)}`, { cache: "no-store" });
      if (m.ok) {
        const model = await m.json();
        const meta = model.meta || {};
        st.profile = meta.profile || null;
        st.spot = meta.spot;
        st.levels = (meta.levels || {})[st.scope] || {};
      }
      const q = st.lastMs === null ? "" : `&since_ms=${st.lastMs}`;
      const r = await apiFetch(`/api/gex/history?symbol=${encodeURIComponent(sym)}${q}`, { cache: "no-store" });
      if (r.ok && sym === st.symbol) {
        const rows = await r.json();
        if (rows.length) {
          st.history = st.history.concat(rows).slice(-20000);
          st.lastMs = Math.floor(rows[rows.length - 1].ts_ns / 1e6);
        }
      }
    } catch (e) {
      /* the next poll retries; the SSE status badges show connectivity */
    }
    drawProfile();
    drawHistory();
  }

  function start() {
    if (!$("gex-profile")) return;
    for (const b of document.querySelectorAll("#gex-scope button")) {
      b.addEventListener("click", () => { st.scope = b.dataset.v; drawProfile(); drawHistory(); });
    }
    const sel = $("symbol");
    if (sel) sel.addEventListener("change", () => poll());
    poll();
    st.timer = setInterval(poll, POLL_MS);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
