// relu-serve's web page: a small client of the public /v1 API, and an example of using it.
//
// Everything the page shows comes from four calls (README, "The service"):
//   GET  /v1/models                                   models, their versions, the latest
//   GET  /v1/models/{name}/versions/{v}               labels, preprocessing, activation layers
//   POST /v1/models/{name}/versions/{v}/predict       multipart `file`, ?stats=channels&top_k=k
//   GET  /v1/models/{name}/activations (+ POST .../activations/reset)   the live monitor
//        (the reset sends the management API key typed on the page: Authorization: Bearer)
// Errors come back as {"error": {"code", "message"}}; the page shows the message as it is.
// Plain JavaScript, no build step, no libraries: the charts are HTML bars and small SVGs.
"use strict";

(() => {
  const MONITOR_REFRESH_MS = 3000;
  const SVG_NS = "http://www.w3.org/2000/svg";

  // ---------------------------------------------------------------- the API, one function each

  /** An answer of the API that is not 2xx: its status, error code and message. */
  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  /** fetch() that returns the parsed JSON body, or throws ApiError with the API's message. */
  async function callApi(path, options = {}) {
    let response;
    try {
      response = await fetch(path, { headers: { Accept: "application/json" }, ...options });
    } catch (err) {
      throw new ApiError(0, "network", `could not reach the service (${err.message})`);
    }
    const text = await response.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch {
      // Not JSON (a proxy's HTML error page, say): fall through with the raw text.
    }
    if (!response.ok) {
      const error = body && body.error;
      const message =
        (error && (error.message || error)) || (body && body.detail) || text || response.statusText;
      throw new ApiError(response.status, (error && error.code) || "error", String(message));
    }
    return body;
  }

  const modelPath = (name) => `/v1/models/${encodeURIComponent(name)}`;
  const versionPath = (name, version) =>
    `${modelPath(name)}/versions/${encodeURIComponent(version)}`;

  const api = {
    listModels: () => callApi("/v1/models"),
    modelInfo: (name, version) => callApi(versionPath(name, version)),
    /** Classify one image (a File or Blob) and ask for per-channel statistics. */
    predict(name, version, image, filename, topK) {
      const form = new FormData();
      form.append("file", image, filename);
      const query = new URLSearchParams({ stats: "channels", top_k: String(topK) });
      return callApi(`${versionPath(name, version)}/predict?${query}`, {
        method: "POST",
        body: form,
      });
    },
    activations: (name) => callApi(`${modelPath(name)}/activations`),
    /** Empty the monitor's window; needs the management API key (none sent when empty). */
    resetActivations: (name, key) =>
      callApi(`${modelPath(name)}/activations/reset`, {
        method: "POST",
        headers: { Accept: "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) },
      }),
  };

  // ---------------------------------------------------------------- small helpers

  const $ = (id) => document.getElementById(id);

  /** An HTML element with attributes (class, text, or any attribute) and children. */
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : value);
    }
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  /** An SVG element with attributes and children. */
  function svg(tag, attrs = {}, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    node.append(...children);
    return node;
  }

  const percent = (x, digits = 1) =>
    x === null || x === undefined ? "–" : `${(100 * x).toFixed(digits)}%`;
  const fixed = (x, digits = 3) =>
    x === null || x === undefined ? "–" : Number(x).toFixed(digits);

  /** A horizontal bar: a track with a fill of `fraction` (0..1) of its width. */
  function bar(fraction, className = "") {
    const fill = el("span", { class: "bar-fill" });
    fill.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;
    return el("span", { class: `bar ${className}`.trim(), "aria-hidden": "true" }, fill);
  }

  /** A list of channel indices for reading: the first `limit`, then how many more. */
  function channelList(indices, limit = 12) {
    const shown = indices.slice(0, limit).join(", ");
    return indices.length > limit ? `${shown} and ${indices.length - limit} more` : shown;
  }

  /** Min, median and max of a list of numbers. */
  function spread(values) {
    const sorted = [...values].sort((a, b) => a - b);
    return {
      min: sorted[0],
      median: sorted[Math.floor((sorted.length - 1) / 2)],
      max: sorted[sorted.length - 1],
    };
  }

  /**
   * One bar per channel, in channel order, its height the channel's activity; dead
   * channels get a red mark under the baseline. Each bar has a tooltip; the whole strip has
   * a text summary for screen readers.
   */
  function channelStrip(activity, deadChannels) {
    const dead = new Set(deadChannels || []);
    const width = 300;
    const plot = 40; // bar area height; the dead marks go below it
    const step = width / Math.max(1, activity.length);
    const s = spread(activity);
    const summary =
      `${activity.length} channels, activity min ${percent(s.min, 0)}, ` +
      `median ${percent(s.median, 0)}, max ${percent(s.max, 0)}; ` +
      (dead.size ? `${dead.size} dead: ${channelList([...dead])}` : "no dead channels");
    const chart = svg("svg", {
      class: "channel-strip",
      viewBox: `0 0 ${width} ${plot + 8}`,
      preserveAspectRatio: "none",
      role: "img",
      "aria-label": summary,
    });
    chart.append(svg("rect", { class: "strip-bg", x: 0, y: 0, width, height: plot }));
    activity.forEach((rate, channel) => {
      const title = svg("title");
      title.textContent = `channel ${channel}: ${percent(rate)} active${dead.has(channel) ? " (dead)" : ""}`;
      const h = Math.max(rate * plot, rate > 0 ? 1 : 0);
      chart.append(
        svg(
          "rect",
          { class: "strip-bar", x: channel * step, y: plot - h, width: step * 0.85, height: h },
          title,
        ),
      );
      if (dead.has(channel)) {
        chart.append(
          svg("rect", { class: "dead-mark", x: channel * step, y: plot + 2, width: Math.max(step * 0.85, 2), height: 6 }),
        );
      }
    });
    return chart;
  }

  // ---------------------------------------------------------------- state and messages

  const state = {
    models: [], // [{name, versions, latest}] from GET /v1/models
    model: null, // the chosen model's name
    version: null, // the chosen version
    info: null, // GET /v1/models/{name}/versions/{v}
    predictSeq: 0, // answers to older requests are dropped
    monitorTimer: null,
  };

  function showStatus(id, message) {
    $(id).textContent = message;
  }

  /** Show the API's error (status, code, message as it came) in box `id`, with an optional
   * hint for the user after it; no error hides the box. */
  function showError(id, err, hint = "") {
    const box = $(id);
    if (!err) {
      box.hidden = true;
      box.textContent = "";
      return;
    }
    const where = err.status ? `Error ${err.status} (${err.code}): ` : "Error: ";
    const stop = /[.!?]$/.test(err.message) ? "" : "."; // the API's messages have none
    box.textContent = where + err.message + (hint ? `${stop} ${hint}` : "");
    box.hidden = false;
  }

  // ---------------------------------------------------------------- models and versions

  async function loadModels() {
    const select = $("model-select");
    try {
      state.models = (await api.listModels()).models;
    } catch (err) {
      select.replaceChildren(el("option", { text: "unavailable" }));
      showError("error", err);
      return;
    }
    if (!state.models.length) {
      select.replaceChildren(el("option", { text: "no models" }));
      showError("error", new ApiError(0, "empty", "the model repository has no models"));
      return;
    }
    select.replaceChildren(
      ...state.models.map((m) => el("option", { value: m.name, text: m.name })),
    );
    select.disabled = false;
    await chooseModel(state.models[0].name);
  }

  async function chooseModel(name) {
    const model = state.models.find((m) => m.name === name);
    state.model = name;
    $("model-select").value = name;
    const versions = $("version-select");
    versions.replaceChildren(
      ...model.versions.map((v) =>
        el("option", { value: v, text: v === model.latest ? `${v} (latest)` : v }),
      ),
    );
    versions.disabled = false;
    versions.value = model.latest;
    await chooseVersion(model.latest);
    if (!$("panel-monitor").hidden) refreshMonitor();
  }

  async function chooseVersion(version) {
    state.version = version;
    $("results").hidden = true;
    showError("error", null);
    try {
      state.info = await api.modelInfo(state.model, version);
    } catch (err) {
      state.info = null;
      showError("error", err);
      return;
    }
    describeModel(state.info);
    canvas.setBackground(state.info.preprocessing && state.info.preprocessing.background);
  }

  function describeModel(info) {
    const p = info.preprocessing;
    const parts = [info.architecture || "ONNX classifier"];
    if (p) parts.push(`input ${p.width}×${p.height}, ${p.channels} channel${p.channels > 1 ? "s" : ""}`);
    else if (info.input) parts.push(`input ${info.input.name} [${info.input.shape.join(", ")}]`);
    parts.push(`${info.labels ? info.labels.length : "?"} labels`);
    parts.push(`${(info.activation_layers || []).length} activation layers`);
    parts.push(`runs on ${(info.providers_used || []).join(", ")}`);
    if (info.fell_back) parts.push(`fell back: ${info.fallback_reason}`);
    $("model-info").textContent = parts.join(" · ");
  }

  // ---------------------------------------------------------------- predict and show

  async function predictImage(image, filename) {
    if (!state.model || !state.version) return;
    const seq = ++state.predictSeq;
    const topK = Math.max(1, Math.min(20, parseInt($("topk-input").value, 10) || 5));
    showError("error", null);
    showStatus("status", `Predicting ${filename} with ${state.model} version ${state.version}…`);
    const started = performance.now();
    try {
      const answer = await api.predict(state.model, state.version, image, filename, topK);
      if (seq !== state.predictSeq) return;
      renderPrediction(answer, filename, performance.now() - started);
      const best = answer.predictions[0].top_k[0];
      showStatus("status", `${filename}: ${best.label} (${percent(best.probability)})`);
    } catch (err) {
      if (seq !== state.predictSeq) return;
      $("results").hidden = true;
      showStatus("status", "");
      showError("error", err);
    }
  }

  function renderPrediction(answer, filename, elapsedMs) {
    const item = answer.predictions[0];
    $("result-meta").textContent =
      `${filename} · ${answer.model.name} v${answer.model.version} · ` +
      `${answer.provider}${answer.fell_back ? " (fell back)" : ""} · ${Math.round(elapsedMs)} ms`;
    $("topk").replaceChildren(
      ...item.top_k.map((entry) =>
        el(
          "li",
          { class: "bar-row" },
          el("span", { class: "bar-label", text: entry.label }),
          bar(entry.probability, "bar-prob"),
          el("span", { class: "bar-value", text: percent(entry.probability) }),
        ),
      ),
    );
    renderLayers(answer.stats);
    $("results").hidden = false;
  }

  function renderLayers(stats) {
    const summary = $("layer-summary");
    const cards = $("layers");
    if (!stats || !stats.layers.length) {
      const why = (state.info && state.info.statistics_error) || "it has no activation layers";
      summary.replaceChildren(el("p", { text: `This model reports no layer statistics: ${why}.` }));
      cards.replaceChildren();
      return;
    }
    // One bar per layer: the inactive fraction, with its dead units beside it.
    summary.replaceChildren(
      el("h3", { text: "Inactive fraction per layer" }),
      el(
        "ul",
        { class: "bars" },
        ...stats.layers.map((layer) =>
          el(
            "li",
            { class: "bar-row layer-row" },
            el("span", { class: "bar-label", text: layer.name }),
            bar(layer.inactive_fraction, "bar-inactive"),
            el("span", {
              class: "bar-value",
              text: `${percent(layer.inactive_fraction)} · ${layer.dead_units} dead`,
            }),
          ),
        ),
      ),
    );
    // Per layer: the numbers, and a strip of channel activity.
    cards.replaceChildren(...stats.layers.map(layerCard));
  }

  function layerCard(layer) {
    const dead = layer.dead_channels || [];
    const facts = [
      ["kind", layer.kind],
      ["channels", layer.channels],
      ["inactive", percent(layer.inactive_fraction)],
      ["dead units", dead.length ? `${layer.dead_units} (${channelList(dead)})` : String(layer.dead_units)],
      ["mean / max", `${fixed(layer.mean)} / ${fixed(layer.max)}`],
    ];
    if (layer.saturated_fraction !== null && layer.saturated_fraction !== undefined) {
      facts.push(["saturated", percent(layer.saturated_fraction)]);
    }
    return el(
      "article",
      { class: `layer-card${dead.length ? " has-dead" : ""}` },
      el("h3", { text: layer.name }),
      el("dl", {}, ...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v) })])),
      layer.channel_activity
        ? el(
            "figure",
            {},
            channelStrip(layer.channel_activity, dead),
            el("figcaption", { text: "Active rate per channel (red: dead)" }),
          )
        : null,
    );
  }

  // ---------------------------------------------------------------- upload and drag-and-drop

  function setUpUpload() {
    const input = $("file-input");
    const preview = $("file-preview");
    const zone = $("drop-zone");

    const showPreview = (file) => {
      if (preview.src) URL.revokeObjectURL(preview.src);
      if (file && file.type.startsWith("image/")) {
        preview.src = URL.createObjectURL(file);
        preview.alt = `preview of ${file.name}`;
        preview.hidden = false;
      } else {
        preview.removeAttribute("src");
        preview.hidden = true;
      }
    };

    input.addEventListener("change", () => {
      const file = input.files[0];
      showPreview(file);
      if (file) predictImage(file, file.name);
    });

    $("upload-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const file = input.files[0];
      if (!file) {
        showError("error", new ApiError(0, "no_file", "choose an image file first"));
        input.focus();
        return;
      }
      predictImage(file, file.name);
    });

    for (const type of ["dragenter", "dragover"]) {
      zone.addEventListener(type, (event) => {
        event.preventDefault();
        zone.classList.add("dragging");
      });
    }
    for (const type of ["dragleave", "drop"]) {
      zone.addEventListener(type, () => zone.classList.remove("dragging"));
    }
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      const files = event.dataTransfer.files;
      if (!files.length) return;
      input.files = files; // keeps the file input in step, so Predict sends it again
      showPreview(files[0]);
      predictImage(files[0], files[0].name);
    });
  }

  // ---------------------------------------------------------------- drawing canvas

  /**
   * A canvas to draw on with pointer events (mouse, touch and pen alike), and with the
   * keyboard. The drawing is sent as a PNG upload, light strokes on a dark background or
   * the opposite, following the model's training background (the service would invert a
   * mismatched one anyway: README, "Predict").
   */
  const canvas = (() => {
    const node = $("draw-canvas");
    const ctx = node.getContext("2d");
    let colours = { background: "#000", ink: "#fff" };
    let drawn = false;
    let last = null; // the previous point of the stroke in progress
    const pen = { x: node.width / 2, y: node.height / 2, down: false };

    function clear() {
      ctx.fillStyle = colours.background;
      ctx.fillRect(0, 0, node.width, node.height);
      drawn = false;
      drawPen();
    }

    function setBackground(background) {
      colours =
        background === "light"
          ? { background: "#fff", ink: "#000" }
          : { background: "#000", ink: "#fff" };
      if (!drawn) clear();
    }

    function line(from, to) {
      ctx.strokeStyle = colours.ink;
      ctx.fillStyle = colours.ink;
      ctx.lineWidth = node.width / 11; // thick: the digits model sees 8x8 pixels
      ctx.lineCap = "round";
      ctx.lineJoin = "round";
      ctx.beginPath();
      ctx.moveTo(from.x, from.y);
      ctx.lineTo(to.x, to.y);
      ctx.stroke();
      drawn = true;
    }

    /** Pointer position in canvas pixels (the canvas is scaled by CSS). */
    function point(event) {
      const box = node.getBoundingClientRect();
      return {
        x: ((event.clientX - box.left) * node.width) / box.width,
        y: ((event.clientY - box.top) * node.height) / box.height,
      };
    }

    node.addEventListener("pointerdown", (event) => {
      event.preventDefault();
      node.setPointerCapture(event.pointerId);
      last = point(event);
      line(last, last); // a dot for a tap
    });
    node.addEventListener("pointermove", (event) => {
      if (!last) return;
      const next = point(event);
      line(last, next);
      last = next;
    });
    const endStroke = () => {
      if (!last) return;
      last = null;
      predict(); // a prediction after every stroke
    };
    node.addEventListener("pointerup", endStroke);
    node.addEventListener("pointercancel", endStroke);

    // Keyboard drawing: a pen that the arrow keys move and Space puts down or lifts. Its
    // position is shown by the canvas's CSS outline colour and a cross on an overlay, so
    // the drawing itself stays clean.
    const overlay = el("canvas", { class: "pen-overlay", width: node.width, height: node.height, "aria-hidden": "true" });
    node.after(overlay);
    const octx = overlay.getContext("2d");

    function drawPen() {
      octx.clearRect(0, 0, overlay.width, overlay.height);
      if (document.activeElement !== node) return;
      octx.strokeStyle = pen.down ? "#e4572e" : "#3a86ff";
      octx.lineWidth = 3;
      octx.beginPath();
      octx.moveTo(pen.x - 10, pen.y);
      octx.lineTo(pen.x + 10, pen.y);
      octx.moveTo(pen.x, pen.y - 10);
      octx.lineTo(pen.x, pen.y + 10);
      octx.stroke();
    }

    node.addEventListener("focus", drawPen);
    node.addEventListener("blur", drawPen);
    node.addEventListener("keydown", (event) => {
      const step = event.shiftKey ? 30 : 10;
      const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
      if (event.key in moves) {
        event.preventDefault();
        const from = { x: pen.x, y: pen.y };
        const [dx, dy] = moves[event.key];
        pen.x = Math.max(0, Math.min(node.width, pen.x + dx));
        pen.y = Math.max(0, Math.min(node.height, pen.y + dy));
        if (pen.down) line(from, pen);
      } else if (event.key === " ") {
        event.preventDefault();
        pen.down = !pen.down;
        if (pen.down) line(pen, pen);
      } else if (event.key === "Enter") {
        event.preventDefault();
        predict();
      } else {
        return;
      }
      drawPen();
    });

    function predict() {
      if (!drawn) {
        showError("error", new ApiError(0, "empty_canvas", "the canvas is empty: draw something first"));
        return;
      }
      node.toBlob((blob) => predictImage(blob, "drawing.png"), "image/png");
    }

    $("clear-canvas").addEventListener("click", () => {
      clear();
      $("results").hidden = true;
      showStatus("status", "Canvas cleared.");
    });
    $("predict-canvas").addEventListener("click", predict);
    clear();
    return { setBackground };
  })();

  // ---------------------------------------------------------------- the live monitor

  async function refreshMonitor() {
    clearTimeout(state.monitorTimer);
    if (!state.model) return;
    const name = state.model;
    try {
      const snapshot = await api.activations(name);
      if (name === state.model) renderMonitor(snapshot);
      showError("monitor-error", null);
    } catch (err) {
      showError("monitor-error", err);
    }
    scheduleMonitor();
  }

  /** Poll while the monitor is visible, auto-refresh is on and the browser tab is shown. */
  function scheduleMonitor() {
    clearTimeout(state.monitorTimer);
    if ($("panel-monitor").hidden || !$("monitor-auto").checked) return;
    state.monitorTimer = setTimeout(() => {
      if (document.hidden) scheduleMonitor();
      else refreshMonitor();
    }, MONITOR_REFRESH_MS);
  }

  function renderMonitor(snap) {
    $("monitor-title").textContent = `Live activation monitor: ${snap.model} version ${snap.version}`;
    // The window is the last window_s seconds; it is "full" once it holds min_samples samples.
    const fill = $("monitor-fill");
    fill.max = snap.min_samples;
    fill.value = Math.min(snap.samples, snap.min_samples);
    $("monitor-fill-text").textContent =
      `${snap.samples} of ${snap.min_samples} samples (${percent(Math.min(snap.samples / snap.min_samples, 1), 0)})` +
      `${snap.window_full ? ", full" : ""} in the last ${snap.window_s} s · ${snap.samples_seen} seen since start or reset`;

    const drift = $("monitor-drift");
    drift.classList.toggle("drifted", Boolean(snap.drifted));
    if (!snap.has_reference) {
      drift.textContent =
        "No reference profile: drift is not measured. Measure one on typical images with " +
        `python -m service calibrate ${snap.model ?? "NAME"} --images DIR.`;
    } else if (snap.drift === null || snap.drift === undefined) {
      drift.textContent = "No traffic with statistics yet: predict something (the page asks for statistics).";
    } else {
      const verdict = snap.drifted
        ? "DRIFTED: a layer is above the threshold"
        : snap.window_full
          ? "within the threshold"
          : "not flagged until the window is full";
      drift.textContent = `Drift (largest layer): ${fixed(snap.drift)}, threshold ${fixed(snap.drift_threshold, 2)}: ${verdict}.`;
    }
    $("monitor-updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;

    // Chart: live inactive fraction against the reference, one pair of bars per layer.
    const chart = $("monitor-chart");
    if (!snap.layers.length) {
      chart.replaceChildren(el("p", { text: "This model has no activation layers to monitor." }));
    } else {
      chart.replaceChildren(
        el("h3", { text: "Inactive fraction: live (blue) against reference (grey)" }),
        el(
          "ul",
          { class: "bars" },
          ...snap.layers.map((layer) =>
            el(
              "li",
              { class: "bar-row monitor-row" },
              el("span", { class: "bar-label", text: layer.name }),
              el(
                "span",
                { class: "bar-pair" },
                bar(layer.samples ? layer.inactive_fraction : 0, "bar-inactive"),
                bar(layer.reference_inactive_fraction ?? 0, "bar-reference"),
              ),
              el("span", {
                class: "bar-value",
                text: `${layer.samples ? percent(layer.inactive_fraction) : "–"} / ${percent(layer.reference_inactive_fraction)}`,
              }),
            ),
          ),
        ),
      );
    }

    // Table: every number, with the drift scaled against the threshold.
    $("monitor-table").tBodies[0].replaceChildren(
      ...snap.layers.map((layer) => monitorRow(layer, snap.min_samples, snap.drift_threshold)),
    );
  }

  function monitorRow(layer, minSamples, threshold) {
    const cell = (label, ...content) =>
      el("td", { "data-label": label, class: label === "Drift" ? "drift-col" : null }, ...content);
    const dead =
      layer.dead_units === null || layer.dead_units === undefined
        ? el("span", { class: "muted", text: `window filling (${layer.samples}/${minSamples})` })
        : el("span", {
            class: layer.dead_units ? "dead" : "",
            text: layer.dead_units ? `${layer.dead_units} (${channelList(layer.dead_channels)})` : "0",
          });
    let drift;
    if (layer.drift === null || layer.drift === undefined) {
      drift = el("span", { class: "muted", text: "–" });
    } else {
      // The track spans twice the threshold, so the threshold tick sits in its middle.
      const track = bar(layer.drift / (2 * threshold), layer.drifted ? "bar-drift drifted" : "bar-drift");
      track.append(el("span", { class: "threshold-tick" }));
      drift = el(
        "span",
        { class: "drift-cell" },
        track,
        el("span", { text: `${fixed(layer.drift)}${layer.drifted ? " ⚑ drifted" : ""}` }),
      );
    }
    return el(
      "tr",
      { class: layer.drifted ? "drifted" : "" },
      el("th", { scope: "row", text: layer.name }),
      cell("Inactive (live)", layer.samples ? percent(layer.inactive_fraction) : "–"),
      cell("Inactive (reference)", percent(layer.reference_inactive_fraction)),
      cell("Dead units", dead),
      cell("Drift", drift),
      cell(
        "Channel activity",
        layer.samples && layer.channel_activity
          ? channelStrip(layer.channel_activity, layer.dead_channels)
          : el("span", { class: "muted", text: "–" }),
      ),
    );
  }

  // What to do about each refusal of a reset (service/api/auth.py), after the API's message.
  const RESET_HINTS = {
    unauthorized: "Type the management API key above.",
    invalid_api_key: "Check the management API key and try again.",
    management_disabled: "This service has no management API key, so its window cannot be reset.",
  };

  function setUpMonitor() {
    $("monitor-refresh").addEventListener("click", refreshMonitor);
    $("monitor-auto").addEventListener("change", scheduleMonitor);
    // Its own error box: the monitor's refreshes clear theirs every 3 s, and a refused reset
    // must stay on screen until the next try.
    $("reset-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const key = $("admin-key");
      showError("reset-error", null);
      key.removeAttribute("aria-invalid");
      try {
        await api.resetActivations(state.model, key.value.trim());
      } catch (err) {
        showError("reset-error", err, RESET_HINTS[err.code]);
        if (err.code === "unauthorized" || err.code === "invalid_api_key") {
          key.setAttribute("aria-invalid", "true");
          key.focus();
        }
        return;
      }
      showStatus("monitor-status", `Window of ${state.model} reset at ${new Date().toLocaleTimeString()}.`);
      refreshMonitor();
    });
  }

  // ---------------------------------------------------------------- tabs (WAI-ARIA pattern)

  function setUpTabs() {
    const tabs = [...document.querySelectorAll('[role="tab"]')];
    const select = (tab) => {
      for (const t of tabs) {
        const selected = t === tab;
        t.setAttribute("aria-selected", String(selected));
        t.tabIndex = selected ? 0 : -1;
        $(t.getAttribute("aria-controls")).hidden = !selected;
      }
      if (tab.id === "tab-monitor") refreshMonitor();
      else clearTimeout(state.monitorTimer);
    };
    tabs.forEach((tab, i) => {
      tab.addEventListener("click", () => select(tab));
      // Arrow keys move between tabs, Home/End to the ends; Tab leaves the tab list.
      tab.addEventListener("keydown", (event) => {
        const next = {
          ArrowRight: (i + 1) % tabs.length,
          ArrowLeft: (i - 1 + tabs.length) % tabs.length,
          Home: 0,
          End: tabs.length - 1,
        }[event.key];
        if (next === undefined) return;
        event.preventDefault();
        tabs[next].focus();
        select(tabs[next]);
      });
    });
  }

  // ---------------------------------------------------------------- start

  $("model-select").addEventListener("change", (event) => chooseModel(event.target.value));
  $("version-select").addEventListener("change", (event) => chooseVersion(event.target.value));
  setUpUpload();
  setUpMonitor();
  setUpTabs();
  loadModels();
})();
