/* prunehub dashboard: a dependency-free single page over the REST API and the SSE event stream.
 *
 * Security: every user-supplied string (names, errors, context) reaches the DOM through textContent (el()), never
 * innerHTML. Auth: a key in sessionStorage is sent as "Authorization: Bearer <key>"; a 401 asks for one.
 */
"use strict";

(() => {
  const KEY_STORAGE = "prunehub.apiKey";
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];
  const app = document.getElementById("app");
  const charts = new Map(); // canvas id -> Chart
  let teardown = []; // callbacks that stop the current view's timers and streams

  // ---- DOM helpers (escaping by construction) -----------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  const fmt = (v, digits = 4) => (v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits));
  const pct = (v) => (v === null || v === undefined ? "–" : `${(100 * v).toFixed(1)}%`);
  const pctTick = (v) => `${+(v * 100).toFixed(1)}%`;
  const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 60) return `${seconds.toFixed(1)} s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
    return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
  }
  const badge = (status) => el("span", { class: `badge badge-${status}`, dataset: { status } }, status);

  function progressBar(progress, status) {
    const total = progress && progress.total;
    const done = (progress && progress.done) || 0;
    let fraction = total ? Math.min(1, done / total) : 0;
    if (status === "succeeded") fraction = 1;
    const label = total ? `${+done.toFixed(2)} / ${+total.toFixed(2)}` : `${+done.toFixed(2)}`;
    const fill = el("div", { class: `progress-fill progress-${status}` });
    // Through the CSSOM, not a style attribute: the Content-Security-Policy refuses inline styles.
    fill.style.width = `${(fraction * 100).toFixed(1)}%`;
    return el(
      "div",
      { class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
        "aria-valuenow": Math.round(fraction * 100) },
      fill,
      el("span", { class: "progress-label" }, label),
    );
  }

  // ---- API access -----------------------------------------------------------------------------------------------
  function authHeaders() {
    const key = sessionStorage.getItem(KEY_STORAGE);
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  function askForKey(reason) {
    const dialog = document.getElementById("key-dialog");
    document.getElementById("key-reason").textContent =
      reason || "This server asks for an API key. It is kept in this browser tab only (session storage).";
    const input = document.getElementById("key-input");
    input.value = "";
    return new Promise((resolve) => {
      dialog.addEventListener(
        "close",
        () => {
          if (dialog.returnValue === "save" && input.value.trim()) {
            sessionStorage.setItem(KEY_STORAGE, input.value.trim());
            resolve(true);
          } else if (dialog.returnValue === "retry") {
            resolve(true); // closed because a request with the stored key succeeded: retry with that key
          } else {
            if (dialog.returnValue === "clear") sessionStorage.removeItem(KEY_STORAGE);
            resolve(false);
          }
        },
        { once: true },
      );
      if (!dialog.open) dialog.showModal();
    });
  }

  class ApiError extends Error {
    constructor(status, detail) {
      super(typeof detail === "string" ? detail : (detail && detail.detail) || `HTTP ${status}`);
      this.status = status;
    }
  }

  // A request with a key succeeded, so the key is good: a dialog still asking for one (opened by a request that
  // went out before the key was saved) closes, and the requests waiting on it retry with the stored key.
  function keyAccepted() {
    const dialog = document.getElementById("key-dialog");
    if (dialog.open) dialog.close("retry");
  }

  async function request(path, options = {}, retried = false) {
    const sent = authHeaders();
    const response = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...sent } });
    if (response.status === 401 && !retried) {
      // Sent before a key was saved: retry with the key there is now instead of asking again.
      if (authHeaders().Authorization && authHeaders().Authorization !== sent.Authorization) return request(path, options, true);
      if (await askForKey("The server answered 401: enter an API key.")) return request(path, options, true);
    }
    if (response.ok && sent.Authorization) keyAccepted();
    if (!response.ok) {
      let detail;
      try { detail = await response.json(); } catch { detail = await response.text(); }
      throw new ApiError(response.status, detail);
    }
    return response;
  }
  const getJSON = async (path) => (await request(path)).json();

  async function allTrials(id) {
    const items = [];
    let cursor = null;
    do {
      const query = new URLSearchParams({ limit: "1000" });
      if (cursor) query.set("cursor", cursor);
      const page = await getJSON(`experiments/${id}/trials?${query}`);
      items.push(...page.items);
      cursor = page.next_cursor;
    } while (cursor);
    return items;
  }

  async function optional(promise) {
    try { return await promise; } catch (error) { if (error.status === 404) return null; throw error; }
  }

  /* Server-sent events over fetch (EventSource cannot send an Authorization header). Reconnects with
   * Last-Event-ID after a drop; resolves when the server ends the stream (the experiment is terminal). */
  function streamEvents(id, onEvent, onState) {
    const controller = new AbortController();
    let lastId = null;
    let retryMs = 2000;
    let stopped = false;
    async function connect() {
      while (!stopped) {
        try {
          const headers = lastId !== null ? { "Last-Event-ID": String(lastId) } : {};
          const response = await request(`experiments/${id}/events`, { headers, signal: controller.signal });
          onState("live");
          const reader = response.body.getReader();
          const decoder = new TextDecoder();
          let buffer = "";
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
            let cut;
            while ((cut = buffer.indexOf("\n\n")) >= 0) {
              const block = buffer.slice(0, cut);
              buffer = buffer.slice(cut + 2);
              const message = { id: null, event: "message", data: [] };
              for (const line of block.split("\n")) {
                if (!line || line.startsWith(":")) continue;
                const colon = line.indexOf(":");
                const field = colon < 0 ? line : line.slice(0, colon);
                const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
                if (field === "data") message.data.push(text);
                else if (field === "id") message.id = text;
                else if (field === "event") message.event = text;
                else if (field === "retry" && /^\d+$/.test(text)) retryMs = Number(text);
              }
              if (message.id !== null) lastId = Math.max(lastId ?? 0, Number(message.id));
              if (message.data.length) onEvent(message.event, JSON.parse(message.data.join("\n")));
            }
          }
          onState("ended");
          return; // the server ends the stream when the experiment is terminal
        } catch (error) {
          if (stopped || error.name === "AbortError") return;
          if (error.status && error.status !== 503) { onState("error"); return; }
          onState("reconnecting");
          await new Promise((resolve) => setTimeout(resolve, retryMs));
        }
      }
    }
    connect();
    return () => { stopped = true; controller.abort(); };
  }

  function setLive(state) {
    const node = document.getElementById("live");
    node.hidden = state === "ended" || state === "off";
    node.textContent = state === "live" ? "● live" : state === "reconnecting" ? "reconnecting…" : state;
    node.className = `live live-${state}`;
    document.body.dataset.stream = state;
  }

  // ---- charts ---------------------------------------------------------------------------------------------------
  if (window.Chart) {
    Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
    Chart.defaults.font.size = 12;
    Chart.defaults.color = "#475569";
    Chart.defaults.animation = false;
    Chart.defaults.maintainAspectRatio = false;
    Chart.defaults.plugins.legend.labels.boxWidth = 12;
  }

  function axis(title, extra = {}) {
    return { title: { display: true, text: title, font: { weight: "600" } }, grid: { color: "#eef2f7" }, ...extra };
  }

  function drawChart(canvasId, config) {
    const existing = charts.get(canvasId);
    if (existing) {
      existing.data = config.data;
      existing.options = config.options;
      existing.update("none");
      return existing;
    }
    const canvas = document.getElementById(canvasId);
    if (!canvas || !window.Chart) return null;
    const chart = new Chart(canvas, config);
    charts.set(canvasId, chart);
    return chart;
  }

  function chartCard(id, title, subtitle, wide = false) {
    return el(
      "section",
      { class: `card chart-card${wide ? " wide" : ""}`, id: `${id}-card` },
      el("header", { class: "card-head" }, el("h3", {}, title), el("p", { class: "muted", id: `${id}-subtitle` }, subtitle)),
      el("div", { class: "chart-box" }, el("canvas", { id, role: "img", "aria-label": title })),
      el("p", { class: "chart-empty muted", id: `${id}-empty`, hidden: true }, "no data yet"),
    );
  }
  function markEmpty(id, empty, text) {
    const note = document.getElementById(`${id}-empty`);
    if (note) { note.hidden = !empty; if (text) note.textContent = text; }
  }

  const tooltipLabel = (format) => ({ callbacks: { label: (ctx) => format(ctx.raw, ctx) } });

  function layersOf(best) {
    const requested = (best && (best.requested || best.distribution)) || {};
    const achieved = (best && best.achieved) || {};
    return { names: Object.keys(requested).length ? Object.keys(requested) : Object.keys(achieved), requested, achieved };
  }

  // Per-layer sparsity bars (one chart's options object each: Chart.js keeps and mutates it).
  const sparsityBarOptions = () => ({
    scales: { x: axis("layer"), y: axis("sparsity", { min: 0, max: 1, ticks: { callback: (v) => `${v * 100}%` } }) },
    plugins: { tooltip: tooltipLabel((v, ctx) => `${ctx.dataset.label}: ${pct(v)}`) },
  });

  function distributionChart(canvasId, best) {
    const { names, requested, achieved } = layersOf(best);
    markEmpty(canvasId, !names.length);
    return drawChart(canvasId, {
      type: "bar",
      data: {
        labels: names,
        datasets: [
          { label: "requested", data: names.map((n) => requested[n] ?? null), backgroundColor: "#93c5fd", borderColor: "#2563eb", borderWidth: 1 },
          { label: "achieved", data: names.map((n) => achieved[n] ?? null), backgroundColor: "#1d4ed8" },
        ],
      },
      options: sparsityBarOptions(),
    });
  }

  function isBest(trial, experiment) {
    return experiment && experiment.best && experiment.best.trial_id === trial.id;
  }

  function scatterSparsityChart(canvasId, trials, experiment) {
    const ok = trials.filter((t) => t.score !== null && t.overall_sparsity !== null);
    markEmpty(canvasId, !ok.length);
    const best = ok.filter((t) => isBest(t, experiment));
    const xs = ok.map((t) => t.overall_sparsity);
    const lo = xs.length ? Math.max(0, Math.min(...xs) - 0.05) : 0;
    const hi = xs.length ? Math.min(1, Math.max(...xs) + 0.05) : 1;
    return drawChart(canvasId, {
      type: "scatter",
      data: {
        datasets: [
          { label: "trials", data: ok.map((t) => ({ x: t.overall_sparsity, y: t.score, seq: t.seq })),
            backgroundColor: "rgba(37,99,235,0.55)", pointRadius: 4 },
          { label: "best", data: best.map((t) => ({ x: t.overall_sparsity, y: t.score, seq: t.seq })),
            backgroundColor: "#f59e0b", borderColor: "#92400e", pointRadius: 8, pointStyle: "rectRot", borderWidth: 1.5 },
        ],
      },
      options: {
        scales: {
          x: axis("overall sparsity", { min: lo, max: hi, ticks: { callback: pctTick } }),
          y: axis("score"),
        },
        plugins: { tooltip: tooltipLabel((p) => `trial ${p.seq}: score ${fmt(p.y)} at ${pct(p.x)}`) },
      },
    });
  }

  function paretoChart(canvasId, trials, pareto) {
    const ok = trials.filter((t) => t.score !== null && t.flops_ratio !== null);
    const front = ((pareto && pareto.flops) || []).filter((p) => p.flops_ratio !== null);
    markEmpty(canvasId, !ok.length);
    return drawChart(canvasId, {
      type: "scatter",
      data: {
        datasets: [
          { label: "Pareto front", data: front.map((p) => ({ x: p.flops_ratio, y: p.score, id: p.trial_id })),
            showLine: true, borderColor: "#dc2626", backgroundColor: "#dc2626", pointRadius: 5 },
          { label: "all trials", data: ok.map((t) => ({ x: t.flops_ratio, y: t.score, seq: t.seq })),
            backgroundColor: "rgba(100,116,139,0.35)", pointRadius: 3 },
        ],
      },
      options: {
        scales: {
          x: axis("FLOPs (shrunk / dense)", { ticks: { callback: pctTick } }),
          y: axis("score"),
        },
        plugins: { tooltip: tooltipLabel((p) => `${p.seq ? `trial ${p.seq}` : "front"}: score ${fmt(p.y)}, FLOPs ${pct(p.x)}`) },
      },
    });
  }

  const contextNumber = (t, key) => {
    const v = t.context ? t.context[key] : undefined;
    return typeof v === "number" ? v : v === undefined || v === null ? null : Number(v);
  };
  function residualOf(t) {
    const extra = t.extra || {};
    for (const v of [extra.residual, extra.primal_residual, t.context && t.context.residual, t.context && t.context.primal_residual]) {
      if (typeof v === "number") return v;
    }
    return null;
  }

  function contextText(context) {
    return Object.entries(context || {})
      .map(([k, v]) => `${k}=${typeof v === "number" && !Number.isInteger(v) ? +v.toPrecision(4) : JSON.stringify(v)}`)
      .join(" ");
  }

  /* The search's own curve: what the algorithm itself steers by. */
  function searchCurve(canvasId, trials, experiment) {
    const algorithm = experiment.algorithm;
    const done = trials.filter((t) => t.status === "succeeded" || t.status === "failed").sort((a, b) => a.seq - b.seq);
    const subtitle = document.getElementById(`${canvasId}-subtitle`) || { textContent: "" };
    const maximize = (experiment.config || {}).optimize_mode !== "minimize";
    let config;
    if (algorithm === "annealing" || done.some((t) => contextNumber(t, "temperature") !== null && !("round" in (t.context || {})))) {
      const rows = done.filter((t) => contextNumber(t, "temperature") !== null);
      let accepted = 0;
      let judged = 0;
      const rate = [];
      for (const t of rows) {
        if (t.context && typeof t.context.accepted === "boolean") {
          judged += 1;
          accepted += t.context.accepted ? 1 : 0;
        }
        rate.push(judged ? { x: t.seq, y: accepted / judged } : null);
      }
      subtitle.textContent = judged
        ? `simulated annealing: temperature and acceptance (${accepted}/${judged} accepted)`
        : "simulated annealing: temperature per trial";
      config = {
        type: "line",
        data: {
          datasets: [
            { label: "score", data: rows.map((t) => ({ x: t.seq, y: t.score })), yAxisID: "y", borderColor: COLORS[0],
              backgroundColor: rows.map((t) => (t.context.accepted === false ? "#fff" : COLORS[0])), pointRadius: 4, showLine: false },
            { label: "temperature", data: rows.map((t) => ({ x: t.seq, y: contextNumber(t, "temperature") })), yAxisID: "temperature",
              borderColor: COLORS[3], backgroundColor: COLORS[3], pointRadius: 0, borderWidth: 2 },
            ...(judged ? [{ label: "acceptance rate", data: rate.filter(Boolean), yAxisID: "rate", borderColor: COLORS[2],
              borderDash: [5, 4], pointRadius: 0, borderWidth: 2 }] : []),
          ],
        },
        options: {
          scales: {
            x: axis("trial", { type: "linear" }), y: axis("score"),
            temperature: axis("temperature", { position: "right", grid: { display: false } }),
            ...(judged ? { rate: axis("acceptance rate", { position: "right", min: 0, max: 1, grid: { display: false } }) } : {}),
          },
        },
      };
    } else if (algorithm === "netadapt") {
      const resource = (experiment.config || {}).resource === "flops" ? "flops_ratio" : "params_ratio";
      const rows = done.filter((t) => contextNumber(t, "iteration") !== null && t[resource] !== null);
      const bestPerIteration = new Map();
      for (const t of rows) {
        const i = contextNumber(t, "iteration");
        const current = bestPerIteration.get(i);
        if (t.score !== null && (!current || (maximize ? t.score > current.score : t.score < current.score))) bestPerIteration.set(i, t);
      }
      const chosen = [...bestPerIteration.entries()].sort((a, b) => a[0] - b[0]);
      subtitle.textContent = `NetAdapt: measured ${resource === "flops_ratio" ? "FLOPs" : "params"} per iteration`;
      config = {
        type: "scatter",
        data: {
          datasets: [
            { label: "candidates: resource", data: rows.map((t) => ({ x: contextNumber(t, "iteration"), y: t[resource] })),
              yAxisID: "y", backgroundColor: "rgba(37,99,235,0.45)", pointRadius: 4 },
            { label: "chosen: resource", data: chosen.map(([i, t]) => ({ x: i, y: t[resource] })), yAxisID: "y", showLine: true,
              borderColor: COLORS[0], backgroundColor: COLORS[0] },
            { label: "chosen: score", data: chosen.map(([i, t]) => ({ x: i, y: t.score })), yAxisID: "score", showLine: true,
              borderColor: COLORS[1], backgroundColor: COLORS[1], borderDash: [5, 4] },
          ],
        },
        options: {
          scales: {
            x: axis("iteration"),
            y: axis(`${resource === "flops_ratio" ? "FLOPs" : "params"} (shrunk / dense)`),
            score: axis("score", { position: "right", grid: { display: false } }),
          },
        },
      };
    } else if (algorithm === "admm" || done.some((t) => residualOf(t) !== null)) {
      const rows = done.filter((t) => residualOf(t) !== null);
      subtitle.textContent = "ADMM: primal residual ‖W − Z‖ per iteration";
      config = {
        type: "line",
        data: {
          datasets: [
            { label: "residual", data: rows.map((t) => ({ x: contextNumber(t, "iteration") ?? t.seq, y: residualOf(t) })),
              borderColor: COLORS[4], backgroundColor: COLORS[4], pointRadius: 4 },
            { label: "score", data: done.filter((t) => t.score !== null).map((t) => ({ x: contextNumber(t, "iteration") ?? t.seq, y: t.score })),
              yAxisID: "score", borderColor: COLORS[0], backgroundColor: COLORS[0], showLine: false, pointRadius: 3 },
          ],
        },
        options: {
          scales: {
            x: axis("iteration", { type: "linear" }), y: axis("residual ‖W − Z‖"),
            score: axis("score", { position: "right", grid: { display: false } }),
          },
        },
      };
    } else if (algorithm === "autocompress" || done.some((t) => contextNumber(t, "round") !== null)) {
      const rounds = new Map();
      for (const t of done) {
        const r = contextNumber(t, "round");
        if (r === null) continue;
        const entry = rounds.get(r) || { best: null, sparsity: null, count: 0 };
        entry.count += 1;
        if (t.score !== null && (entry.best === null || (maximize ? t.score > entry.best : t.score < entry.best))) {
          entry.best = t.score;
          entry.sparsity = t.overall_sparsity;
        }
        rounds.set(r, entry);
      }
      const keys = [...rounds.keys()].sort((a, b) => a - b);
      subtitle.textContent = `AutoCompress: best of each round (${keys.length} rounds)`;
      config = {
        type: "line",
        data: {
          labels: keys.map((k) => `round ${k}`),
          datasets: [
            { label: "best score", data: keys.map((k) => rounds.get(k).best), borderColor: COLORS[0], backgroundColor: COLORS[0] },
            { label: "overall sparsity", data: keys.map((k) => rounds.get(k).sparsity), yAxisID: "sparsity",
              borderColor: COLORS[2], backgroundColor: COLORS[2], borderDash: [5, 4] },
          ],
        },
        options: {
          scales: {
            x: axis("round"), y: axis("score"),
            sparsity: axis("overall sparsity", { position: "right", min: 0, max: 1, grid: { display: false } }),
          },
        },
      };
    } else {
      const rows = done.filter((t) => t.score !== null);
      let running = null;
      const best = rows.map((t) => {
        running = running === null ? t.score : maximize ? Math.max(running, t.score) : Math.min(running, t.score);
        return { x: t.seq, y: running };
      });
      subtitle.textContent = `${algorithm}: score per trial and best so far`;
      config = {
        type: "line",
        data: {
          datasets: [
            { label: "score", data: rows.map((t) => ({ x: t.seq, y: t.score })), showLine: false, borderColor: COLORS[0],
              backgroundColor: COLORS[0], pointRadius: 4 },
            { label: "best so far", data: best, borderColor: COLORS[1], backgroundColor: COLORS[1], stepped: true, pointRadius: 0 },
          ],
        },
        options: { scales: { x: axis("trial", { type: "linear", ticks: { precision: 0 } }), y: axis("score") } },
      };
    }
    const empty = config.data.datasets.every((d) => !d.data.filter((p) => p !== null && (p.y ?? p) !== null).length);
    markEmpty(canvasId, empty);
    return drawChart(canvasId, config);
  }

  /* A sensitivity experiment's curves: score vs sparsity of each unit pruned alone (from the dense baseline at 0),
   * one line per unit, and ◆ where the allocation put each unit on its own curve. */
  function curveScore(points, baseline, sparsity) {
    const xs = [{ sparsity: 0, score: baseline }, ...points];
    for (let i = 1; i < xs.length; i += 1) {
      const a = xs[i - 1];
      const b = xs[i];
      if (sparsity <= b.sparsity) return a.score + ((sparsity - a.sparsity) / (b.sparsity - a.sparsity)) * (b.score - a.score);
    }
    return xs[xs.length - 1].score;
  }

  function sensitivityChart(canvasId, report) {
    const units = (report && report.units) || [];
    markEmpty(canvasId, !units.some((u) => u.points.length), "no curves yet: the profile step has not finished");
    const subtitle = document.getElementById(`${canvasId}-subtitle`);
    if (subtitle && report) {
      const allocation = report.allocation;
      const cut = allocation && allocation.threshold !== null ? `, threshold ${fmt(allocation.threshold)} per unit saved` : "";
      const needed = allocation ? `; the budget removes ${pct(allocation.needed_saving)} of ${allocation.resource}${cut}` : "";
      subtitle.textContent = `each unit pruned alone, baseline ${fmt(report.baseline_score)}${report.reused ? " (reused curves)" : ""}${needed}`;
    }
    const baseline = report ? report.baseline_score : null;
    const lines = units.map((u, i) => ({
      label: u.name,
      data: [{ x: 0, y: baseline, ratio: 1 }, ...u.points.map((p) => ({ x: p.sparsity, y: p.score, ratio: p.ratio }))],
      showLine: true, borderColor: COLORS[i % COLORS.length], backgroundColor: COLORS[i % COLORS.length], pointRadius: 3,
    }));
    const allocated = units.filter((u) => u.allocated !== null && u.points.length).map((u) => ({
      x: u.allocated, y: curveScore(u.points, baseline, u.allocated), unit: u.name,
    }));
    return drawChart(canvasId, {
      type: "scatter",
      data: {
        datasets: [
          ...lines,
          { label: "allocation", data: allocated, pointStyle: "rectRot", pointRadius: 8, borderWidth: 1.5,
            backgroundColor: "#f59e0b", borderColor: "#92400e" },
        ],
      },
      options: {
        scales: { x: axis("sparsity of the unit", { min: 0, max: 1, ticks: { callback: pctTick } }), y: axis("score") },
        plugins: {
          tooltip: tooltipLabel((p, ctx) => (p.unit !== undefined
            ? `${p.unit}: allocated ${pct(p.x)} (score on its curve ${fmt(p.y)})`
            : `${ctx.dataset.label} at ${pct(p.x)}: score ${fmt(p.y)}${p.ratio !== null && p.ratio !== undefined ? `, ${report.resource} ${pct(p.ratio)}` : ""}`)),
        },
      },
    });
  }

  // ---- views ----------------------------------------------------------------------------------------------------
  function clearView() {
    for (const stop of teardown) stop();
    teardown = [];
    for (const chart of charts.values()) chart.destroy();
    charts.clear();
    app.replaceChildren();
    setLive("off");
  }

  function showError(error) {
    app.replaceChildren(el("section", { class: "card error-card" }, el("h2", {}, "Could not load"), el("pre", {}, String(error.message || error))));
  }

  function every(ms, fn) {
    const timer = setInterval(fn, ms);
    teardown.push(() => clearInterval(timer));
  }

  // Experiments list ---------------------------------------------------------------------------------------------
  async function listView() {
    const selected = new Set();
    const compareButton = el("button", { class: "btn btn-primary", type: "button", disabled: true,
      onclick: () => { location.hash = `#/compare/${[...selected].join(",")}`; } }, "Compare selected");
    const statusFilter = el("select", { "aria-label": "status filter", onchange: () => refresh() },
      ["", "queued", "running", "cancelling", "succeeded", "failed", "cancelled"].map((s) => el("option", { value: s }, s || "all statuses")));
    const body = el("tbody", { id: "experiments-body" });
    app.append(
      el("div", { class: "page-head" }, el("h1", {}, "Experiments"), el("span", { class: "spacer" }), statusFilter, compareButton),
      el("section", { class: "card" },
        el("table", { class: "table", id: "experiments" },
          el("thead", {}, el("tr", {}, ["", "ID", "Name", "Status", "Algorithm", "Progress", "Best score", "Trials", "Created"].map((h) => el("th", {}, h)))),
          body)),
    );
    async function refresh() {
      const query = new URLSearchParams({ limit: "200" });
      if (statusFilter.value) query.set("status", statusFilter.value);
      const page = await getJSON(`experiments?${query}`);
      body.replaceChildren(
        ...page.items.map((e) =>
          el("tr", { dataset: { id: e.id } },
            el("td", {}, el("input", { type: "checkbox", "aria-label": `select experiment ${e.id}`, checked: selected.has(e.id),
              onchange: (ev) => { ev.target.checked ? selected.add(e.id) : selected.delete(e.id); compareButton.disabled = selected.size < 2; } })),
            el("td", { class: "num" }, e.id),
            el("td", {}, el("a", { href: `#/experiments/${e.id}`, class: "exp-name" }, e.name)),
            el("td", {}, badge(e.status)),
            el("td", {}, e.algorithm),
            el("td", { class: "progress-cell" }, progressBar(e.progress, e.status), el("div", { class: "phase muted" }, e.progress.phase || "")),
            el("td", { class: "num" }, fmt(e.best_score)),
            el("td", { class: "num" }, e.trials_count || ""),
            el("td", { class: "muted" }, when(e.created_at)),
          )),
      );
      if (!page.items.length) body.append(el("tr", {}, el("td", { colspan: 9, class: "muted center" }, "No experiments yet: submit one with `prunehub submit spec.json`.")));
      document.body.dataset.ready = "list";
    }
    await refresh();
    every(3000, () => refresh().catch(() => {}));
  }

  // Experiment page ----------------------------------------------------------------------------------------------
  async function experimentView(id) {
    const state = { experiment: null, trials: [], best: null, pareto: null, sensitivity: null, sort: { key: "seq", dir: 1 }, filter: "", status: "" };
    const head = el("div", { class: "page-head" });
    const summary = el("section", { class: "card summary" });
    const errorBox = el("section", { class: "card error-card", id: "error", hidden: true });
    const filterInput = el("input", { type: "search", id: "trial-filter", placeholder: "filter trials (status, context, error…)",
      oninput: () => { state.filter = filterInput.value.toLowerCase(); renderTable(); } });
    const statusSelect = el("select", { id: "trial-status", "aria-label": "trial status", onchange: () => { state.status = statusSelect.value; renderTable(); } },
      ["", "succeeded", "failed", "running", "pending"].map((s) => el("option", { value: s }, s || "all statuses")));
    const tableCount = el("span", { class: "muted", id: "trial-count" });
    const columns = [
      ["seq", "#", (t) => t.seq, "num"],
      ["status", "Status", (t) => t.status, ""],
      ["score", "Score", (t) => t.score, "num"],
      ["overall_sparsity", "Sparsity", (t) => t.overall_sparsity, "num"],
      ["flops_ratio", "FLOPs", (t) => t.flops_ratio, "num"],
      ["params_ratio", "Params", (t) => t.params_ratio, "num"],
      ["latency_ms", "Latency ms", (t) => t.latency_ms, "num"],
      ["kind", "Kind", (t) => t.kind, ""],
      ["context", "Context", (t) => contextText(t.context), "mono"],
      ["duration_s", "Time", (t) => t.duration_s, "num"],
      ["error", "Error", (t) => t.error || "", "err"],
    ];
    const headRow = el("tr", {}, columns.map(([key, label]) =>
      el("th", { dataset: { key }, class: "sortable", tabindex: 0, onclick: () => sortBy(key),
        onkeydown: (ev) => { if (ev.key === "Enter") sortBy(key); } }, label)));
    const tbody = el("tbody", { id: "trials-body" });
    const grid = el("div", { class: "grid" },
        chartCard("chart-distribution", "Best distribution", "requested vs achieved sparsity per layer", true),
        chartCard("chart-sparsity", "Score vs overall sparsity", "every finished trial; ◆ is the best"),
        chartCard("chart-pareto", "Pareto front: score vs FLOPs", "non-dominated trials (fewer FLOPs, better score)"),
        chartCard("chart-search", "Search curve", "", true),
    );
    app.append(
      head, errorBox, summary, grid,
      el("section", { class: "card" },
        el("header", { class: "card-head row" }, el("h3", {}, "Trials"), el("span", { class: "spacer" }), tableCount, statusSelect, filterInput),
        el("div", { class: "table-wrap" }, el("table", { class: "table", id: "trials" }, el("thead", {}, headRow), tbody))),
    );

    function sortBy(key) {
      state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : key === "score" ? -1 : 1 };
      renderTable();
    }

    function renderTable() {
      const [, , get] = columns.find(([key]) => key === state.sort.key);
      const rows = state.trials
        .filter((t) => !state.status || t.status === state.status)
        .filter((t) => !state.filter || `${t.seq} ${t.status} ${t.kind} ${contextText(t.context)} ${t.error || ""}`.toLowerCase().includes(state.filter))
        .sort((a, b) => {
          const x = get(a); const y = get(b);
          if (x === y) return a.seq - b.seq;
          if (x === null || x === undefined) return 1;
          if (y === null || y === undefined) return -1;
          return (x < y ? -1 : 1) * state.sort.dir;
        });
      for (const th of headRow.children) {
        const active = th.dataset.key === state.sort.key;
        th.setAttribute("aria-sort", active ? (state.sort.dir > 0 ? "ascending" : "descending") : "none");
      }
      tbody.replaceChildren(
        ...rows.map((t) => el("tr", { dataset: { seq: t.seq, id: t.id }, class: isBest(t, state.experiment) ? "best-row" : "" },
          columns.map(([key, , get, cls]) => {
            const v = get(t);
            let text = v;
            if (key === "score") text = fmt(v);
            else if (["overall_sparsity", "flops_ratio", "params_ratio"].includes(key)) text = pct(v);
            else if (key === "latency_ms") text = fmt(v, 2);
            else if (key === "duration_s") text = duration(v);
            else if (key === "status") return el("td", {}, badge(v));
            return el("td", { class: cls, title: key === "error" || key === "context" ? String(v) : null }, text ?? "–");
          }))),
      );
      tableCount.textContent = `${rows.length} of ${state.trials.length} trials`;
    }

    function renderHead() {
      const e = state.experiment;
      const canCancel = !TERMINAL.has(e.status) && e.status !== "cancelling";
      const hasModel = Boolean(state.best && state.best.model_available);
      const download = el("a", {
        class: `btn${hasModel ? "" : " disabled"}`, id: "download", href: `experiments/${e.id}/model`,
        download: `experiment-${e.id}-model.zip`, onclick: downloadModel, "aria-disabled": hasModel ? null : "true",
        title: hasModel ? "the best pruned model (safetensors + recipe.json)" : "no pruned model stored for this experiment",
      }, "Download pruned model");
      head.replaceChildren(
        el("div", {}, el("div", { class: "crumbs muted" }, el("a", { href: "#/" }, "Experiments"), ` / #${e.id}`),
          el("h1", { id: "exp-title" }, e.name, " ", badge(e.status))),
        el("span", { class: "spacer" }),
        download,
        el("button", { class: "btn btn-danger", id: "cancel", type: "button", disabled: !canCancel, onclick: cancel }, "Cancel"),
      );
      const facts = [
        ["Algorithm", e.algorithm], ["Entrypoint", e.entrypoint],
        // An uploaded bundle's id (the code the entrypoint came from); installed code shows no row.
        ...(e.bundle ? [["Bundle", el("code", { id: "bundle", class: "bundle-id", title: "uploaded code (POST /bundles)" }, e.bundle)]] : []),
        ["Best score", fmt(e.best_score)],
        ["Best sparsity", e.best ? pct(e.best.overall_sparsity) : "–"], ["Trials", e.trials_count],
        ["Created", when(e.created_at)], ["Duration", duration(e.duration_s)], ["Attempts", e.attempts],
      ];
      summary.replaceChildren(
        el("div", { class: "progress-row" }, progressBar(e.progress, e.status), el("span", { class: "phase", id: "phase" }, e.progress.phase || "")),
        el("dl", { class: "facts" }, facts.map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {}, v)))),
      );
      errorBox.hidden = !e.error;
      if (e.error) {
        errorBox.replaceChildren(el("h3", {}, `Experiment ${e.status}`), el("pre", { id: "error-text" }, e.error));
        if (e.traceback) errorBox.append(el("details", {}, el("summary", {}, "traceback"), el("pre", { class: "traceback" }, e.traceback)));
      }
    }

    async function downloadModel(event) {
      if (!(state.best && state.best.model_available)) { event.preventDefault(); return; }
      if (!sessionStorage.getItem(KEY_STORAGE)) return; // plain link; the browser downloads it
      event.preventDefault();
      const blob = await (await request(`experiments/${id}/model`)).blob();
      const url = URL.createObjectURL(blob);
      el("a", { href: url, download: `experiment-${id}-model.zip` }).click();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    }

    async function cancel() {
      if (!confirm(`Cancel experiment ${id}?`)) return;
      try { state.experiment = await (await request(`experiments/${id}/cancel`, { method: "POST" })).json(); renderHead(); }
      catch (error) { alert(error.message); }
    }

    function renderCharts() {
      distributionChart("chart-distribution", state.best);
      scatterSparsityChart("chart-sparsity", state.trials, state.experiment);
      paretoChart("chart-pareto", state.trials, state.pareto);
      searchCurve("chart-search", state.trials, state.experiment);
      if (state.experiment.algorithm === "sensitivity") {
        // Only sensitivity experiments have curves: their card is added on the first load that knows the algorithm.
        if (!document.getElementById("chart-sensitivity")) {
          grid.append(chartCard("chart-sensitivity", "Sensitivity curves: score vs sparsity per unit", "", true));
        }
        sensitivityChart("chart-sensitivity", state.sensitivity);
      }
    }

    let alive = true;
    teardown.push(() => { alive = false; });
    async function load() {
      const [experiment, trials, best, pareto] = await Promise.all([
        getJSON(`experiments/${id}`), allTrials(id), optional(getJSON(`experiments/${id}/best`)), getJSON(`experiments/${id}/pareto`),
      ]);
      // The curves exist once the profile step has finished (404 before).
      const sensitivity = experiment.algorithm === "sensitivity" ? await optional(getJSON(`experiments/${id}/sensitivity`)) : null;
      if (!alive) return; // the user navigated away while this was loading
      Object.assign(state, { experiment, trials, best, pareto, sensitivity });
      renderHead(); renderTable(); renderCharts();
      document.body.dataset.trials = String(trials.length);
      document.body.dataset.status = experiment.status;
      document.body.dataset.ready = "experiment";
    }

    // Live updates: progress events patch the bar at once; the rest re-reads the REST view (coalesced).
    let pending = null;
    let inflight = false;
    function scheduleReload() {
      if (pending) return;
      pending = setTimeout(async () => {
        pending = null;
        if (inflight) { scheduleReload(); return; }
        inflight = true;
        try { await load(); } catch (error) { console.error(error); } finally { inflight = false; }
      }, 250);
    }
    function onEvent(kind, data) {
      document.body.dataset.lastEvent = String(data.id);
      if (kind === "progress" && state.experiment) {
        state.experiment.progress = { done: data.done, total: data.total, phase: data.phase };
        renderHead();
      }
      if (kind !== "progress" || !state.experiment || state.experiment.status !== "running") scheduleReload();
    }

    await load();
    const stop = streamEvents(id, onEvent, (s) => { setLive(s); if (s === "ended") scheduleReload(); });
    teardown.push(stop, () => clearTimeout(pending));
  }

  // Compare view -------------------------------------------------------------------------------------------------
  async function compareView(idsText) {
    const ids = (idsText || "").split(",").map((s) => Number(s.trim())).filter((n) => Number.isInteger(n) && n > 0);
    const page = await getJSON("experiments?limit=200");
    const chosen = new Set(ids);
    const picker = el("div", { class: "picker" },
      page.items.map((e) => el("label", { class: "pick" },
        el("input", { type: "checkbox", value: e.id, checked: chosen.has(e.id),
          onchange: (ev) => { ev.target.checked ? chosen.add(e.id) : chosen.delete(e.id); } }),
        ` #${e.id} `, el("span", {}, e.name), " ", badge(e.status))));
    app.append(
      el("div", { class: "page-head" }, el("h1", {}, "Compare experiments"), el("span", { class: "spacer" }),
        el("button", { class: "btn btn-primary", type: "button", onclick: () => { location.hash = `#/compare/${[...chosen].join(",")}`; } }, "Compare")),
      el("section", { class: "card" }, el("header", { class: "card-head" }, el("h3", {}, "Experiments"), el("p", { class: "muted" }, "pick two or more")), picker),
    );
    if (ids.length < 1) return;
    const rows = await Promise.all(ids.map(async (id) => ({
      experiment: await getJSON(`experiments/${id}`),
      best: await optional(getJSON(`experiments/${id}/best`)),
      pareto: await getJSON(`experiments/${id}/pareto`),
    })));
    app.append(el("div", { class: "grid" },
      chartCard("compare-distribution", "Best distributions", "achieved sparsity per layer (requested where not measured)", true),
      chartCard("compare-pareto", "Pareto fronts: score vs FLOPs", "one line per experiment", true)));
    const layerNames = [];
    for (const row of rows) for (const name of layersOf(row.best).names) if (!layerNames.includes(name)) layerNames.push(name);
    const label = (row) => `#${row.experiment.id} ${row.experiment.name}`;
    markEmpty("compare-distribution", !layerNames.length);
    drawChart("compare-distribution", {
      type: "bar",
      data: {
        labels: layerNames,
        datasets: rows.map((row, i) => {
          const { requested, achieved } = layersOf(row.best);
          return { label: label(row), data: layerNames.map((n) => achieved[n] ?? requested[n] ?? null), backgroundColor: COLORS[i % COLORS.length] };
        }),
      },
      options: sparsityBarOptions(),
    });
    const fronts = rows.map((row) => ((row.pareto && row.pareto.flops) || []).filter((p) => p.flops_ratio !== null));
    markEmpty("compare-pareto", fronts.every((f) => !f.length));
    drawChart("compare-pareto", {
      type: "scatter",
      data: {
        datasets: rows.map((row, i) => ({ label: label(row), data: fronts[i].map((p) => ({ x: p.flops_ratio, y: p.score })),
          showLine: true, borderColor: COLORS[i % COLORS.length], backgroundColor: COLORS[i % COLORS.length], pointRadius: 6,
          pointStyle: ["circle", "rect", "triangle", "rectRot", "star", "crossRot"][i % 6] })),
      },
      options: {
        scales: { x: axis("FLOPs (shrunk / dense)", { ticks: { callback: pctTick } }), y: axis("score") },
        plugins: { tooltip: tooltipLabel((p, ctx) => `${ctx.dataset.label}: score ${fmt(p.y)}, FLOPs ${pct(p.x)}`) },
      },
    });
    document.body.dataset.ready = "compare";
  }

  // ---- router ---------------------------------------------------------------------------------------------------
  async function route() {
    clearView();
    delete document.body.dataset.ready;
    const hash = location.hash || "#/";
    const experiment = hash.match(/^#\/experiments\/(\d+)/);
    const compare = hash.match(/^#\/compare\/?([\d,]*)/);
    for (const link of document.querySelectorAll("[data-nav]")) {
      link.classList.toggle("active", (link.dataset.nav === "compare") === Boolean(compare) && !experiment);
    }
    try {
      if (experiment) await experimentView(Number(experiment[1]));
      else if (compare) await compareView(compare[1]);
      else await listView();
    } catch (error) {
      showError(error);
    }
  }

  document.getElementById("key-button").addEventListener("click", async () => {
    if (await askForKey()) route();
  });
  window.addEventListener("hashchange", route);
  route();
})();
