/* massive-pipeline dashboard: live convexity heatmap + GEX by strike over SSE.
 *
 * Each panel subscribes to exactly the view it shows (heatmap: symbol, strategy, expiry,
 * right; GEX: symbol, all/0dte) and keeps a local copy of it: the "snapshot" event replaces
 * it, every "diff" must continue it (same epoch, prev_version == local version, prev_id ==
 * the id held) and is applied in place; anything else is a gap, answered by reconnecting
 * without Last-Event-ID, which makes the gateway send a fresh snapshot. On network errors
 * the browser's EventSource reconnects by itself with Last-Event-ID, and the gateway
 * replays the missed diffs. Changing the view re-subscribes; the previous view stays on
 * screen until the new snapshot arrives. Wire format: README "SSE wire format".
 * Plain JS, no build step, no external resources.
 */
"use strict";

const $ = (id) => document.getElementById(id);

// A gateway with bearer-token auth: open the page as /?access_token=<token>. EventSource
// cannot send headers, so streams carry the token in the query; fetches send it as a header.
const ACCESS_TOKEN = new URLSearchParams(location.search).get("access_token");
function withToken(url) {
  if (!ACCESS_TOKEN) return url;
  return url + (url.includes("?") ? "&" : "?") + "access_token=" + encodeURIComponent(ACCESS_TOKEN);
}
function apiFetch(url, init = {}) {
  const headers = Object.assign({}, init.headers || {});
  if (ACCESS_TOKEN) headers.Authorization = "Bearer " + ACCESS_TOKEN;
  return fetch(url, Object.assign({}, init, { headers }));
}

const ui = {
  symbol: new URLSearchParams(location.search).get("symbol") || "SPX",
  strategy: "butterfly",
  expiry: null,
  right: "C",
  metric: "debit",
  gexView: "split",
  gexScope: "all",
  gexUnit: "usd",
  gexRange: 5,
  scrollToAtm: true,
};

// --- formatting ---------------------------------------------------------------------------
function fmt(v, digits = 2) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "—";
  return v.toFixed(digits);
}
function fmtBig(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "—";
  const a = Math.abs(v);
  const s = v < 0 ? "-" : "";
  if (a >= 1e12) return s + (a / 1e12).toFixed(2) + "T";
  if (a >= 1e9) return s + (a / 1e9).toFixed(2) + "B";
  if (a >= 1e6) return s + (a / 1e6).toFixed(2) + "M";
  if (a >= 1e3) return s + (a / 1e3).toFixed(1) + "K";
  return s + a.toFixed(a >= 10 ? 0 : 2);
}
function fmtStrike(k) {
  return Number.isInteger(k) ? String(k) : k.toFixed(1);
}
function fmtAge(ms) {
  if (ms < 0 || !Number.isFinite(ms)) return "—";
  if (ms < 10000) return (ms / 1000).toFixed(1) + "s";
  if (ms < 120000) return Math.round(ms / 1000) + "s";
  return Math.round(ms / 60000) + "m";
}
function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// --- the compact wire format ----------------------------------------------------------------
// key -> item id: the key template kt has null where the key's ":"-parts go ("=" = whole id)
function fullKey(kt, k) {
  if (!kt) return k;
  if (k.charCodeAt(0) === 61) return k.slice(1);
  const p = k.split(":");
  let j = 0;
  return kt.map((x) => (x === null ? p[j++] : x)).join(":");
}
// "name" or "name.i.j" (element j of the i-th array of item[name])
function fieldSetters(names) {
  return names.map((n) => {
    const a = n.split(".");
    if (a.length === 1) return (it, v) => { it[n] = v; };
    const k = a[0], i = +a[1], j = +a[2];
    return (it, v) => {
      const arr = it[k] || (it[k] = []);
      while (arr.length <= i) arr.push([]);
      arr[i][j] = v;
    };
  });
}

// --- one live view over SSE ---------------------------------------------------------------
class ModelStream {
  constructor(name, statusEl, onChange) {
    this.name = name;
    this.statusEl = statusEl;
    this.onChange = onChange;
    this.es = null;
    this.model = null;
    this.head = null;
    this.kt = null;
    this.url = null;
    this.lastUpdate = 0;
    this.resyncs = 0;
    this.retryTimer = null;
    this.onGone = null; // the view no longer exists (HTTP error): pick another
  }

  connect(url) {
    this.close();
    this.url = url;
    // the previous view stays on screen until this one's snapshot arrives
    this.setState("connecting");
    const es = new EventSource(withToken(url));
    this.es = es;
    es.addEventListener("snapshot", (e) => this.onSnapshot(e));
    es.addEventListener("diff", (e) => this.onDiff(e));
    es.addEventListener("status", (e) => {
      const s = JSON.parse(e.data);
      if (s.state === "no_model") this.setState("waiting");
    });
    es.onerror = () => {
      if (es !== this.es) return;
      if (es.readyState === EventSource.CLOSED) {
        // the browser gave up (e.g. HTTP 404: an expiry that rolled off): retry from scratch
        this.setState("reconnecting");
        this.retryTimer = setTimeout(() => (this.onGone ? this.onGone() : this.connect(this.url)), 2000);
      } else {
        this.setState("reconnecting"); // auto-reconnect with Last-Event-ID
      }
    };
  }

  close() {
    clearTimeout(this.retryTimer);
    if (this.es) this.es.close();
    this.es = null;
  }

  resync(reason) {
    this.resyncs += 1;
    console.info(`${this.name}: ${reason}, reconnecting for a fresh snapshot`);
    this.connect(this.url);
  }

  onSnapshot(e) {
    const s = JSON.parse(e.data);
    const kt = s.kt || null;
    const set = fieldSetters(s.f);
    const items = {};
    for (const row of s.d) {
      const it = {};
      for (let i = 0; i < set.length; i++) set[i](it, row[i + 1]);
      items[fullKey(kt, row[0])] = it;
    }
    for (const k in s.o || {}) items[fullKey(kt, k)] = s.o[k];
    this.kt = kt;
    this.modelUrl = this.url; // the stream of the model on screen (url may be the next one)
    this.head = e.lastEventId || s.diff_id;
    this.model = { symbol: s.symbol, kind: s.kind, epoch: s.epoch, version: s.version,
      ts_ns: s.ts_ns, meta: s.meta || {}, view: s.view || {}, expiries: s.expiries || [], items };
    this.touch();
    this.onChange(this.model, null);
  }

  onDiff(e) {
    const d = JSON.parse(e.data);
    const m = this.model;
    if (!m) return;
    if (d.epoch === m.epoch && d.version <= m.version) return; // already applied
    if (d.epoch !== m.epoch || d.prev_version !== m.version ||
        (d.prev_id && this.head && d.prev_id !== this.head)) {
      this.resync(`gap: have ${m.epoch}/v${m.version}, got ${d.epoch}/v${d.version}`);
      return;
    }
    const items = m.items;
    const changed = [];
    for (const g of d.c || []) {
      const set = fieldSetters(g.f);
      for (const row of g.d) {
        const k = fullKey(this.kt, row[0]);
        const it = g.n ? {} : items[k];
        if (!it) {
          this.resync(`gap: fields of an unknown item ${k}`);
          return;
        }
        for (let i = 0; i < set.length; i++) set[i](it, row[i + 1]);
        items[k] = it;
        changed.push(k);
      }
    }
    for (const k in d.o || {}) {
      items[fullKey(this.kt, k)] = d.o[k];
      changed.push(fullKey(this.kt, k));
    }
    for (const k of d.r || []) delete items[fullKey(this.kt, k)];
    if (d.meta && Object.keys(d.meta).length) m.meta = d.meta;
    m.version = d.version;
    m.ts_ns = d.ts_ns;
    this.head = e.lastEventId;
    this.touch();
    this.onChange(m, changed);
  }

  touch() {
    this.lastUpdate = Date.now();
    this.setState("live");
  }

  setState(state) {
    const el = this.statusEl;
    el.dataset.state = state;
    el.querySelector(".state").textContent = state === "waiting" ? "no model yet" : state;
    const v = this.model ? this.model.version : null;
    el.dataset.version = v === null ? "" : String(v);
    el.querySelector(".ver").textContent = v === null ? "v—" : "v" + v;
  }

  tick() {
    const age = this.lastUpdate ? Date.now() - this.lastUpdate : NaN;
    const el = this.statusEl.querySelector(".age");
    el.textContent = this.lastUpdate ? fmtAge(age) + " ago" : "—";
    if (this.model && this.model.ts_ns) {
      const dataAge = Date.now() - this.model.ts_ns / 1e6;
      el.title = `last update ${fmtAge(age)} ago; model published ${fmtAge(dataAge)} ago; ` +
        `resyncs ${this.resyncs}`;
    }
  }
}

// --- render scheduling -------------------------------------------------------------------------
const pending = { heat: false, gex: false, changed: new Set() };
function schedule(what, changed) {
  if (changed) for (const id of changed) pending.changed.add(id);
  if (pending[what]) return;
  pending[what] = true;
  requestAnimationFrame(() => {
    pending[what] = false;
    if (what === "heat") renderHeatmap();
    else renderGex();
  });
}

let epochShown = null;
const heat = new ModelStream("heatmap", $("status-heatmap"), (m, changed) => {
  schedule("heat", changed);
  if (m && m.epoch !== epochShown) {
    epochShown = m.epoch; // a new epoch was promoted: refresh the header
    refreshEpochs();
  }
});
const gex = new ModelStream("gex", $("status-gex"), () => {
  schedule("gex");
  schedule("heat"); // spot / ATM row come from the GEX model
});

// exactly the view on screen; "front" = the model's first expiry (the snapshot names it)
function connectHeat() {
  ui.scrollToAtm = true;
  const q = new URLSearchParams({ symbol: ui.symbol, expiry: ui.expiry || "front", right: ui.right });
  heat.connect(`/sse/heatmap/${ui.strategy}?${q}`);
}
heat.onGone = () => { ui.expiry = null; connectHeat(); };
function connectGex() {
  const q = new URLSearchParams({ symbol: ui.symbol, expiry: ui.gexScope });
  gex.connect(`/sse/gex?${q}`);
}

function spot() {
  const m = gex.model;
  const s = m && m.meta ? m.meta.spot : null;
  return Number.isFinite(s) ? s : null;
}

// --- heatmap -------------------------------------------------------------------------------------
// Palette (dark navy -> teal -> green -> yellow), perceptually ordered.
const STOPS = [
  [18, 32, 64], [27, 70, 120], [22, 121, 140], [33, 160, 120], [120, 200, 80], [240, 220, 60],
];
function color(t) {
  t = Math.min(1, Math.max(0, t));
  const x = t * (STOPS.length - 1);
  const i = Math.min(STOPS.length - 2, Math.floor(x));
  const f = x - i;
  const a = STOPS[i], b = STOPS[i + 1];
  return [0, 1, 2].map((j) => Math.round(a[j] + (b[j] - a[j]) * f));
}
(function legendBar() {
  const parts = [];
  for (let i = 0; i <= 10; i++) parts.push(`rgb(${color(i / 10).join(",")}) ${i * 10}%`);
  $("legend-bar").style.background = `linear-gradient(90deg, ${parts.join(",")})`;
})();

function rowStrike(t) {
  const s = t.strikes || [];
  const strat = t.strategy || ui.strategy;
  if (strat === "butterfly") return s[1];
  if (strat === "vertical") return t.right === "P" ? s[s.length - 1] : s[0];
  return s[0];
}
function metricOf(t) {
  if (ui.metric === "r2r") return t.r2r ?? t.reward_risk ?? null;
  if (ui.metric === "convexity") return t.convexity ?? null;
  return t.debit ?? null;
}
function isArb(t) {
  const f = t.flags || [];
  return t.arb_violation === true || f.includes("below_bound") || f.includes("above_bound");
}

let expiriesKey = "";
function syncExpiries(m) {
  if (m.view && m.view.expiry && !ui.expiry) ui.expiry = m.view.expiry; // "front" resolved
  const exps = m.expiries || [];
  const key = exps.join(",");
  if (key !== expiriesKey) {
    expiriesKey = key;
    const sel = $("expiry");
    sel.innerHTML = exps.map((e) => `<option value="${esc(e)}">${esc(e)}</option>`).join("");
    if (!exps.includes(ui.expiry)) ui.expiry = exps[0] || null;
    if (ui.expiry) sel.value = ui.expiry;
  }
}

function renderHeatmap() {
  const table = $("heatmap");
  const m = heat.model;
  const changed = pending.changed;
  pending.changed = new Set();
  if (!m) {
    table.innerHTML = "";
    $("heat-empty").hidden = false;
    $("heat-count").textContent = "";
    return;
  }
  // items carry no id (it is their key): attach it for the grid and the tooltip
  // items carry values only: the structure is in the id (see withStructure)
  // the model is the view on screen (or the previous one until the new snapshot arrives)
  const all = Object.entries(m.items).map(([id, t]) => withStructure(id, t));
  syncExpiries(m);
  const tiles = all;
  $("heat-empty").hidden = tiles.length > 0;
  $("heat-empty").textContent = all.length ? "No tiles for this selection" : "The model has no tiles yet";
  const widths = [...new Set(tiles.map((t) => t.width))].sort((a, b) => a - b);
  const strikes = [...new Set(tiles.map(rowStrike))].sort((a, b) => b - a);
  const cell = new Map();
  const vals = [];
  for (const t of tiles) {
    cell.set(rowStrike(t) + "|" + t.width, t);
    const v = metricOf(t);
    // colours rank what can be traded; untradable tiles are greyed (no two-sided fresh quote)
    if (v !== null && Number.isFinite(v) && t.tradable !== false) vals.push(v);
  }
  vals.sort((a, b) => a - b);
  // Colour by rank (robust to the heavy tail of reward/risk on near-free tiles).
  const rank = (v) => {
    let a = 0, b = vals.length;
    while (a < b) { const mid = (a + b) >> 1; if (vals[mid] < v) a = mid + 1; else b = mid; }
    return vals.length > 1 ? a / (vals.length - 1) : 0.5;
  };
  const lo = vals.length ? vals[0] : NaN, hi = vals.length ? vals[vals.length - 1] : NaN;
  $("legend-lo").textContent = fmt(lo);
  $("legend-hi").textContent = fmt(hi);
  const stale = tiles.filter((t) => t.stale).length;
  const arb = tiles.filter(isArb).length;
  const untradable = tiles.filter((t) => t.tradable === false).length;
  $("heat-count").textContent = `${tiles.length} tiles · ${untradable} untradable · ${stale} stale · ${arb} arb · v${m.version}`;

  const s = spot();
  let atm = null;
  if (s !== null && strikes.length) {
    atm = strikes.reduce((best, k) => (Math.abs(k - s) < Math.abs(best - s) ? k : best), strikes[0]);
  }
  const single = ui.strategy === "single";
  const head = widths.map((w) => `<th>${single ? "price" : "w " + fmtStrike(w)}</th>`).join("");
  const corner = single ? "strike" : ui.strategy === "vertical" ? "long strike \\ width" : "center \\ width";
  const rows = [`<thead><tr><th class="corner">${corner}</th>${head}</tr></thead><tbody>`];
  const digits = ui.metric === "convexity" ? 3 : 2;
  for (const k of strikes) {
    const cls = k === atm ? ' class="atm"' : "";
    const tds = [`<td class="strike">${fmtStrike(k)}</td>`];
    for (const w of widths) {
      const t = cell.get(k + "|" + w);
      if (!t) {
        tds.push('<td class="cell na"></td>');
        continue;
      }
      const v = metricOf(t);
      const c = ["cell"];
      let style = "";
      if (v === null || !Number.isFinite(v)) c.push("na");
      else {
        const rgb = color(rank(v));
        style = ` style="background-color:rgb(${rgb.join(",")})"`;
        if (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 120) c.push("dark");
      }
      if (t.stale) c.push("stale");
      if (t.tradable === false) c.push("untradable");
      if (isArb(t)) c.push("arb");
      if (changed.has(t.id)) c.push("flash");
      tds.push(`<td class="${c.join(" ")}" data-id="${esc(t.id)}"${style}>${fmt(v, digits)}</td>`);
    }
    rows.push(`<tr${cls} data-strike="${k}">${tds.join("")}</tr>`);
  }
  rows.push("</tbody>");
  table.innerHTML = rows.join("");
  if (changed.size) {
    setTimeout(() => {
      for (const el of table.querySelectorAll("td.flash")) el.classList.remove("flash");
    }, 60);
  }
  if (ui.scrollToAtm && atm !== null) {
    const row = table.querySelector("tr.atm");
    if (row) {
      const wrap = $("grid-wrap");
      wrap.scrollTop = row.offsetTop - wrap.clientHeight / 2;
      ui.scrollToAtm = false;
    }
  }
}

// --- tooltip -------------------------------------------------------------------------------------
const tip = $("tooltip");
function showTip(html, ev) {
  tip.innerHTML = html;
  tip.hidden = false;
  moveTip(ev);
}
function moveTip(ev) {
  const pad = 14;
  const r = tip.getBoundingClientRect();
  let x = ev.clientX + pad, y = ev.clientY + pad;
  if (x + r.width > innerWidth - 4) x = ev.clientX - r.width - pad;
  if (y + r.height > innerHeight - 4) y = ev.clientY - r.height - pad;
  tip.style.left = Math.max(4, x) + "px";
  tip.style.top = Math.max(4, y) + "px";
}
function hideTip() {
  tip.hidden = true;
}
function row(k, v) {
  return `<tr><td>${k}</td><td class="num">${v}</td></tr>`;
}
// "<SYM>:<expiry>:<strategy>:<strike-strike..>:<C|P>" -> the tile's structure; the option
// root per expiry comes with the model (meta.roots)
const idCache = new Map();
function withStructure(id, t) {
  let st = idCache.get(id);
  if (st === undefined) {
    const p = id.split(":");
    const strikes = p[3].split("-").map(Number);
    st = { id, symbol: p[0], expiry: p[1], strategy: p[2], strikes, right: p[4],
      width: strikes.length > 1 ? strikes[1] - strikes[0] : 0 };
    if (idCache.size > 500000) idCache.clear();
    idCache.set(id, st);
  }
  const roots = (heat.model && heat.model.meta && heat.model.meta.roots) || {};
  return Object.assign(t, st, { root: roots[st.expiry] || "" });
}
function occTicker(t, k) {
  // O:<root><yymmdd><C|P><strike x 1000, 8 digits>: the leg's Massive option ticker
  if (!t.root || !t.expiry) return "";
  const ymd = t.expiry.slice(2).replaceAll("-", "");
  return `O:${t.root}${ymd}${t.right}${String(Math.round(k * 1000)).padStart(8, "0")}`;
}
function tileTip(t) {
  const strikes = t.strikes || [];
  const legs = (t.legs || []).map((l, i) => {
    const [qty, px, src] = l;
    const k = strikes[i];
    return row(`${qty > 0 ? "+" : ""}${qty} × ${fmtStrike(k)}`, `${fmt(px)} <span style="color:#8592a6">${esc(src)}</span>`) +
      `<tr><td colspan="2" style="color:#55617a;font-size:10px">${esc(occTicker(t, k))}</td></tr>`;
  }).join("");
  const flags = (t.flags || []).map((f) => `<span class="flag">${esc(f)}</span>`).join("") +
    (t.stale ? '<span class="flag stale">stale</span>' : "");
  const m = heat.model;
  return `<h4>${esc(t.id)}</h4><table>` +
    row("Debit (mid)", fmt(t.debit)) +
    row("Debit (natural)", fmt(t.debit_natural)) +
    row("Tradable", t.tradable === false ? "no" : t.tradable === true ? "yes" : "—") +
    row("Max profit", fmt(t.max_profit)) +
    row("Max loss", fmt(t.max_loss)) +
    row("Reward / risk", fmt(t.r2r ?? t.reward_risk)) +
    row("Convexity", fmt(t.convexity, 3)) +
    row("Price source", esc(t.px_src || "—") + " · " + esc(t.src || "—")) +
    row("Input age", t.age_s === null || t.age_s === undefined ? "—" : fmtAge(t.age_s * 1000)) +
    row("Model time", m && m.ts_ns ? new Date(m.ts_ns / 1e6).toLocaleTimeString() : "—") +
    `</table>${legs ? `<table class="legs">${legs}</table>` : ""}${flags ? `<div>${flags}</div>` : ""}`;
}
$("heatmap").addEventListener("mouseover", (ev) => {
  const td = ev.target.closest("td.cell[data-id]");
  if (!td || !heat.model) return hideTip();
  const t = heat.model.items[td.dataset.id];
  if (t) showTip(tileTip(withStructure(td.dataset.id, t)), ev);
});
$("heatmap").addEventListener("mousemove", (ev) => { if (!tip.hidden) moveTip(ev); });
$("heatmap").addEventListener("mouseleave", hideTip);

// --- GEX ------------------------------------------------------------------------------------------
// the scope of the model on screen (until a re-subscription's snapshot arrives, the previous one)
function gexScope() {
  const v = gex.model && gex.model.view ? gex.model.view.expiry : null;
  return v === "0dte" || v === "all" ? v : ui.gexScope;
}
function gexField(base) {
  const scope = gexScope() === "0dte" ? "_0dte" : "";
  const unit = ui.gexUnit === "usd" ? "_usd" : "";
  return base + scope + unit;
}
function gexVal(it, base) {
  const v = it[gexField(base)];
  if (Number.isFinite(v)) return v;
  const fallback = it[base + (gexScope() === "0dte" ? "_0dte" : "")];
  return Number.isFinite(fallback) ? fallback : 0;
}
function levelsOf(meta) {
  if (!meta) return {};
  const L = meta.levels || {};
  if (L.all || L["0dte"]) return L[gexScope()] || {};
  if (gexScope() === "0dte") return meta.levels_0dte || {};
  return L;
}
const LEVELS = [
  ["spot", "Spot"],
  ["call_wall", "Call wall"],
  ["put_wall", "Put wall"],
  ["zero_gamma", "Zero γ"],
];
const SW = { spot: "#fff", call_wall: "#2ecc8f", put_wall: "#ff5d6c", zero_gamma: "#f5b84a" };

function renderGex() {
  const svg = $("gex");
  const m = gex.model;
  const s = spot();
  $("spot-value").textContent = s === null ? "—" : s.toFixed(2);
  if (!m) {
    svg.innerHTML = "";
    $("gex-empty").hidden = false;
    $("gex-levels").innerHTML = "";
    return;
  }
  const lv = levelsOf(m.meta);
  const vals = { spot: s, call_wall: lv.call_wall, put_wall: lv.put_wall, zero_gamma: lv.zero_gamma };
  const totals = m.meta && m.meta.totals ? m.meta.totals[gexScope()] : null;
  const netTotal = totals ? (ui.gexUnit === "usd" ? totals.net_usd : totals.net) : null;
  $("gex-levels").innerHTML = LEVELS.map(([k, label]) => {
    const v = vals[k];
    const txt = Number.isFinite(v) ? v.toFixed(k === "spot" || k === "zero_gamma" ? 2 : 0) : "—";
    const title = k === "zero_gamma" && lv.zero_gamma_reason ? ` title="${esc(lv.zero_gamma_reason)}"` : "";
    return `<span class="lv"${title}><span class="sw" style="background:${SW[k]}"></span><span class="k">${label}</span><span class="v">${txt}</span></span>`;
  }).join("") +
    `<span class="lv"><span class="k">Abs γ strike</span><span class="v">${Number.isFinite(lv.abs_gamma_strike) ? lv.abs_gamma_strike : "—"}</span></span>` +
    `<span class="lv"><span class="k">Net ${ui.gexUnit === "usd" ? "$ / 1%" : "shares"}</span><span class="v">${fmtBig(netTotal)}</span></span>`;

  let items = Object.values(m.items).filter((it) => Number.isFinite(it.strike));
  if (ui.gexRange > 0 && s !== null) {
    const r = ui.gexRange / 100;
    items = items.filter((it) => it.strike >= s * (1 - r) && it.strike <= s * (1 + r));
  }
  items.sort((a, b) => b.strike - a.strike);
  $("gex-empty").hidden = items.length > 0;
  $("gex-empty").textContent = "No strikes in range";
  const n = items.length;
  const wrap = $("chart-wrap");
  const W = Math.max(360, wrap.clientWidth);
  const rowH = Math.max(9, Math.min(20, Math.floor((wrap.clientHeight - 40) / Math.max(1, n))));
  const top = 26, left = 58, right = 96;
  const H = top + n * rowH + 10;
  const x0 = left, x1 = W - right;
  const split = ui.gexView === "split";
  let maxAbs = 0;
  for (const it of items) {
    if (split) maxAbs = Math.max(maxAbs, Math.abs(gexVal(it, "calls")), Math.abs(gexVal(it, "puts")));
    else maxAbs = Math.max(maxAbs, Math.abs(gexVal(it, "net")));
  }
  if (n && maxAbs === 0) {
    const today = m.meta && m.meta.today ? ` (no contracts expiring ${m.meta.today})` : "";
    $("gex-empty").hidden = false;
    $("gex-empty").textContent = gexScope() === "0dte" ? `No 0DTE exposure${today}` : "No exposure in range";
  }
  maxAbs = maxAbs || 1;
  const xm = (x0 + x1) / 2;
  const sx = (v) => xm + (v / maxAbs) * (x1 - x0) / 2;
  const yOf = (i) => top + i * rowH;
  const parts = [];
  // axis ticks
  for (const f of [-1, -0.5, 0, 0.5, 1]) {
    const x = sx(f * maxAbs);
    parts.push(`<line class="grid" x1="${x}" x2="${x}" y1="${top - 4}" y2="${H - 6}"/>`);
    parts.push(`<text x="${x}" y="${top - 10}" text-anchor="middle">${fmtBig(f * maxAbs)}</text>`);
  }
  const labelEvery = Math.max(1, Math.ceil(12 / rowH));
  items.forEach((it, i) => {
    const y = yOf(i), h = Math.max(2, rowH - 2);
    parts.push(`<rect class="row-hit" data-i="${i}" x="0" y="${y}" width="${W}" height="${rowH}"/>`);
    if (i % labelEvery === 0) {
      parts.push(`<text x="${left - 8}" y="${y + rowH / 2 + 3}" text-anchor="end">${fmtStrike(it.strike)}</text>`);
    }
    if (split) {
      const c = gexVal(it, "calls"), p = gexVal(it, "puts");
      parts.push(`<rect class="bar calls" data-i="${i}" x="${xm}" y="${y + 1}" width="${Math.max(0, sx(Math.abs(c)) - xm)}" height="${h}"/>`);
      parts.push(`<rect class="bar puts" data-i="${i}" x="${sx(-Math.abs(p))}" y="${y + 1}" width="${Math.max(0, xm - sx(-Math.abs(p)))}" height="${h}"/>`);
    } else {
      const v = gexVal(it, "net");
      const xa = Math.min(xm, sx(v)), w = Math.abs(sx(v) - xm);
      parts.push(`<rect class="bar ${v >= 0 ? "net-pos" : "net-neg"}" data-i="${i}" x="${xa}" y="${y + 1}" width="${w}" height="${h}"/>`);
    }
  });
  parts.push(`<line class="axis" x1="${xm}" x2="${xm}" y1="${top - 4}" y2="${H - 6}"/>`);
  // level lines at interpolated strike positions
  const ks = items.map((it) => it.strike);
  const yAt = (k) => {
    if (!Number.isFinite(k) || ks.length < 2 || k > ks[0] || k < ks[ks.length - 1]) return null;
    for (let i = 0; i < ks.length - 1; i++) {
      if (k <= ks[i] && k >= ks[i + 1]) {
        const f = ks[i] === ks[i + 1] ? 0 : (ks[i] - k) / (ks[i] - ks[i + 1]);
        return yOf(i) + rowH / 2 + f * rowH;
      }
    }
    return null;
  };
  const placed = [];
  for (const [k, label] of LEVELS) {
    const y = yAt(vals[k]);
    if (y === null) continue;
    let ly = y + 3;
    while (placed.some((p) => Math.abs(p - ly) < 11)) ly += 11;
    placed.push(ly);
    parts.push(`<line class="lvl ${k}" x1="${x0 - 4}" x2="${x1 + 4}" y1="${y}" y2="${y}"/>`);
    parts.push(`<text class="lvl-label ${k}" x="${x1 + 8}" y="${ly}">${label} ${vals[k].toFixed(k === "spot" || k === "zero_gamma" ? 1 : 0)}</text>`);
  }
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("height", H);
  svg.innerHTML = parts.join("");
  svg.dataset.version = String(m.version);
  svg._items = items;
}

$("gex").addEventListener("mouseover", (ev) => {
  const i = ev.target.dataset ? ev.target.dataset.i : undefined;
  const items = $("gex")._items;
  if (i === undefined || !items) return hideTip();
  const it = items[+i];
  const sc = gexScope() === "0dte" ? "_0dte" : "";
  showTip(`<h4>Strike ${fmtStrike(it.strike)}${sc ? " · 0DTE" : ""}</h4><table>` +
    row("Calls", `${fmtBig(it["calls" + sc])} sh · $${fmtBig(it["calls" + sc + "_usd"])}`) +
    row("Puts", `${fmtBig(it["puts" + sc])} sh · $${fmtBig(it["puts" + sc + "_usd"])}`) +
    row("Net", `${fmtBig(it["net" + sc])} sh · $${fmtBig(it["net" + sc + "_usd"])}`) +
    (it.n !== undefined ? row("Contracts", it.n) : "") +
    `</table><div style="color:#8592a6;margin-top:4px;font-size:11px">shares = γ·OI·100; $ per 1% move</div>`, ev);
});
$("gex").addEventListener("mousemove", (ev) => { if (!tip.hidden) moveTip(ev); });
$("gex").addEventListener("mouseleave", hideTip);

// --- controls ----------------------------------------------------------------------------------
function segmented(id, onPick) {
  const el = $(id);
  el.addEventListener("click", (ev) => {
    const b = ev.target.closest("button");
    if (!b) return;
    for (const x of el.querySelectorAll("button")) x.classList.toggle("on", x === b);
    onPick(b.dataset.v);
  });
}
segmented("strategy", (v) => { ui.strategy = v; connectHeat(); });
segmented("right", (v) => { ui.right = v; connectHeat(); });
segmented("metric", (v) => { ui.metric = v; schedule("heat"); });
segmented("gex-view", (v) => { ui.gexView = v; schedule("gex"); });
segmented("gex-scope", (v) => { ui.gexScope = v; connectGex(); schedule("gex"); });
segmented("gex-unit", (v) => { ui.gexUnit = v; schedule("gex"); });
segmented("gex-range", (v) => { ui.gexRange = +v; schedule("gex"); });
$("expiry").addEventListener("change", (ev) => { ui.expiry = ev.target.value; connectHeat(); });
$("symbol").addEventListener("change", (ev) => {
  ui.symbol = ev.target.value;
  const query = new URLSearchParams(location.search);
  query.set("symbol", ui.symbol);
  history.replaceState(null, "", "?" + query.toString());
  expiriesKey = "";
  ui.expiry = null;
  connectHeat();
  connectGex();
  refreshEpochs();
});
addEventListener("resize", () => schedule("gex"));

async function refreshEpochs() {
  try {
    const r = await apiFetch("/api/symbols", { cache: "no-store" });
    const info = await r.json();
    const syms = [...new Set([...(info.symbols || []), ...Object.keys(info.active || {}), ui.symbol])];
    const sel = $("symbol");
    if (sel.options.length !== syms.length) {
      sel.innerHTML = syms.map((s) => `<option>${esc(s)}</option>`).join("");
    }
    sel.value = ui.symbol;
    const a = (info.active || {})[ui.symbol];
    $("epoch").textContent = a ? `epoch ${a.epoch.slice(0, 10)} · ${a.state || "?"} · ${a.n_contracts || "?"} contracts` : "no active epoch";
  } catch (e) {
    $("epoch").textContent = "";
  }
}

// The page's live models in the published JSON shape, whatever it keeps internally: the
// one accessor tests read (tests/browser.py), e.g. to compare the page with /api. ``url`` is
// the stream the model comes from (its /api twin is the same path under /api/).
const STRUCTURE_KEYS = ["id", "symbol", "expiry", "strategy", "strikes", "right", "width", "root"];
window.__model = () => {
  const plain = (s, structure) => {
    const m = s.model;
    if (!m) return { url: s.modelUrl || s.url, model: null };
    const items = {};
    for (const [k, t] of Object.entries(m.items)) {
      const v = Object.assign({}, t);
      if (structure) for (const f of STRUCTURE_KEYS) delete v[f]; // added by withStructure
      items[k] = v;
    }
    return { url: s.modelUrl || s.url, model: { epoch: m.epoch, version: m.version, items } };
  };
  return { heatmap: plain(heat, true), gex: plain(gex, false) };
};

setInterval(() => { heat.tick(); gex.tick(); }, 250);
setInterval(refreshEpochs, 10000);
refreshEpochs();
connectHeat();
connectGex();
