// The reading station's front end: the reading view (index.html) and the admin view (admin.html).
// Plain JS, no build step, nothing fetched from elsewhere: the station must work on an offline machine.
// Every answer goes to the server as soon as it is made; the page holds no state the server lacks
// for longer than a short debounce, so a reload or a closed tab loses nothing.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
  // No answer at all, or the server failing: worth retrying. A 4xx is the server refusing: not.
  get retryable() { return this.status === 0 || this.status >= 500; }
}

function detailOf(body) {
  if (!body || body.detail === undefined) return "";
  if (Array.isArray(body.detail)) return body.detail.map((item) => item.msg || JSON.stringify(item)).join("; ");
  return String(body.detail);
}

async function api(method, url, body, { keepalive = false } = {}) {
  const init = { method, headers: { Accept: "application/json" }, credentials: "same-origin", keepalive };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (error) {
    throw new ApiError(0, "the server cannot be reached");
  }
  let data = null;
  try { data = await response.json(); } catch (error) { data = null; }
  if (!response.ok) throw new ApiError(response.status, detailOf(data) || `${response.status} ${response.statusText}`);
  return data;
}

function clock(date) {
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

// ---------------------------------------------------------------------------------------------
// Saving: one slot per answer (a case's value, a view's boxes). A newer value replaces a queued
// one, so only the last of a burst of slider moves is sent; failures to reach the server are
// retried until it answers (a restarted server gets everything), a refusal (4xx) is shown.

const saves = {
  queued: new Map(),   // key -> {url, body, onSaved, onRefused}
  sending: new Set(),
  timers: new Map(),
  retryDelay: new Map(),
  offline: false,
  lastSaved: null,
  lastError: "",
};

function queueSave(key, item, delay) {
  saves.queued.set(key, item);
  clearTimeout(saves.timers.get(key));
  saves.timers.set(key, setTimeout(() => sendSave(key), delay));
  showSaveStatus();
}

async function sendSave(key, keepalive = false) {
  clearTimeout(saves.timers.get(key));
  const item = saves.queued.get(key);
  if (!item || saves.sending.has(key)) return;
  saves.sending.add(key);
  showSaveStatus();
  try {
    const reply = await api("PUT", item.url, item.body, { keepalive });
    saves.offline = false;
    saves.retryDelay.delete(key);
    saves.lastSaved = new Date();
    saves.lastError = "";
    if (saves.queued.get(key) === item) saves.queued.delete(key);
    item.onSaved(reply);
  } catch (error) {
    if (error.retryable) {
      saves.offline = error.status === 0;
      const delay = Math.min(5000, (saves.retryDelay.get(key) || 500) * 2);
      saves.retryDelay.set(key, delay);
      saves.timers.set(key, setTimeout(() => sendSave(key), delay));
      saves.lastError = error.status === 0 ? "" : `The server failed to save (${error.message}); retrying.`;
    } else {
      if (saves.queued.get(key) === item) saves.queued.delete(key);
      saves.lastError = `Not saved: ${error.message}`;
      item.onRefused(error);
    }
  } finally {
    saves.sending.delete(key);
  }
  // a newer value arrived while this one was on its way
  if (saves.queued.has(key) && saves.queued.get(key) !== item) sendSave(key);
  showSaveStatus();
}

// Send everything queued now and wait until the queue is empty (or nothing more can be sent).
async function flushSaves(timeoutMs = 15000) {
  for (const key of Array.from(saves.queued.keys())) {
    clearTimeout(saves.timers.get(key));
    saves.timers.delete(key);
    sendSave(key);
  }
  const until = Date.now() + timeoutMs;
  while ((saves.queued.size || saves.sending.size) && Date.now() < until) {
    await new Promise((resolve) => setTimeout(resolve, 50));
    if (saves.offline && !saves.sending.size) break;
  }
  return saves.queued.size === 0 && saves.sending.size === 0;
}

function showSaveStatus() {
  const status = $("#save-status");
  if (!status) return;
  let state, text;
  if (saves.offline && saves.queued.size) {
    state = "offline";
    text = "Not saved yet: the server cannot be reached. Retrying…";
  } else if (saves.queued.size || saves.sending.size) {
    state = "saving";
    text = "Saving…";
  } else if (saves.lastError) {
    state = "error";
    text = "Last change not saved";
  } else if (saves.lastSaved) {
    state = "saved";
    text = `All changes saved · ${clock(saves.lastSaved)}`;
  } else {
    state = "idle";
    text = "Everything shown is saved";
  }
  status.dataset.state = state;
  status.textContent = text;
}

// ---------------------------------------------------------------------------------------------
// The reading view.

const CALLS = {
  probability: {
    question: "Probability of malignancy in each breast (0–100 %).",
  },
  binary: {
    question: "Is there a malignancy in this breast?",
    choices: [[0, "No malignancy"], [1, "Malignancy"]],
  },
  birads: {
    question: "BI-RADS assessment category for each breast.",
    choices: [[1, "1", "Negative"], [2, "2", "Benign"], [3, "3", "Probably benign"],
              [4, "4", "Suspicious"], [5, "5", "Highly suggestive", "Highly suggestive of malignancy"]],
  },
};

const reading = {
  worklist: null,
  exam: null,        // the server's exam, as last fetched
  values: {},        // case -> value shown (null: none yet)
  boxes: {},         // view id -> [[row0, col0, row1, col1], ...]
  views: [],         // the panes' state, in hanging order
  active: null,      // the pane the toolbar acts on
  roiMode: false,
  generation: 0,     // bumped per opened exam so late replies for a previous exam are ignored
};

function setError(message) {
  const box = $("#error");
  box.hidden = !message;
  box.textContent = message || "";
}

function showMessage(html) {
  const message = $("#message");
  message.hidden = !html;
  message.innerHTML = html || "";
}

async function startReading() {
  wireToolbar();
  window.addEventListener("hashchange", () => {
    const wanted = positionFromHash();
    if (wanted && (!reading.exam || wanted !== reading.exam.position) && canOpen(wanted)) openExam(wanted);
  });
  window.addEventListener("pagehide", () => {
    for (const key of saves.queued.keys()) sendSave(key, true);
  });
  window.addEventListener("beforeunload", (event) => {
    if (saves.queued.size || saves.sending.size) {
      event.preventDefault();
      event.returnValue = "";
    }
  });
  try {
    await loadWorklist();
  } catch (error) {
    document.body.dataset.ready = "error";
    if (error.status === 401 || error.status === 403) {
      showMessage("<h2>Not signed in</h2><p>Open your personal link again (the one the study team gave you).</p>");
    } else {
      showMessage(`<h2>The station cannot be reached</h2><p>${escapeHtml(error.message)}. Reload the page to try again.</p>`);
    }
    return;
  }
  $("#question").textContent = (CALLS[reading.worklist.calls] || CALLS.probability).question;
  showSaveStatus();
  $("#roi-mode").hidden = !reading.worklist.roi;
  const wanted = positionFromHash();
  const first = wanted && canOpen(wanted) ? wanted : reading.worklist.next;
  if (first) await openExam(first);
  else showAllDone();
  document.body.dataset.ready = "true";
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function positionFromHash() {
  const found = /exam=(\d+)/.exec(location.hash);
  return found ? Number(found[1]) : null;
}

// Exams are read in the reader's order: submitted ones can be looked at again, the next one read;
// later ones wait, so the randomised reading order of the design is kept.
function canOpen(position) {
  const entry = reading.worklist && reading.worklist.exams.find((exam) => exam.position === position);
  return Boolean(entry) && (entry.submitted || position === reading.worklist.next);
}

async function loadWorklist() {
  reading.worklist = await api("GET", "/api/worklist");
  renderWorklist();
}

let worklistRefresh = null;
function refreshWorklistSoon() {
  clearTimeout(worklistRefresh);
  worklistRefresh = setTimeout(() => loadWorklist().catch(() => {}), 600);
}

function renderWorklist() {
  const list = reading.worklist;
  $("#reader-name").textContent = list.reader;
  const progress = $("#progress");
  progress.dataset.done = list.done;
  progress.dataset.total = list.total;
  $("#progress-text").textContent = `${list.done} / ${list.total} exams`;
  $("#progress-fill").style.width = list.total ? `${(100 * list.done) / list.total}%` : "0";
  const items = list.exams.map((exam) => {
    const current = reading.exam && reading.exam.position === exam.position;
    const state = exam.submitted ? "submitted" : exam.position === list.next ? "next" : "waiting";
    const status = exam.submitted ? "submitted" : exam.answered ? `${exam.answered} / ${exam.cases} answered` : "";
    const button = element("button", {
      type: "button",
      disabled: !canOpen(exam.position),
      title: state === "waiting" ? "Exams are read in order: submit the current exam first" : null,
    }, element("span", { class: "position", text: exam.position }),
    element("span", { class: "exam-name", text: exam.exam }),
    element("span", { class: "exam-status", text: status }));
    button.addEventListener("click", () => openExam(exam.position));
    return element("li", {
      dataset: { position: exam.position, state },
      class: current ? "current" : null,
      "aria-current": current ? "true" : null,
    }, button);
  });
  $("#worklist").replaceChildren(...items);
}

async function openExam(position) {
  // answers still queued belong to the exam being left; they are sent now, not dropped
  flushSaves();
  const generation = ++reading.generation;
  let exam;
  try {
    exam = await api("GET", `/api/exams/${position}`);
  } catch (error) {
    setError(`Exam ${position} could not be opened: ${error.message}`);
    return;
  }
  if (generation !== reading.generation) return;
  setError("");
  showMessage("");
  reading.exam = exam;
  reading.values = Object.fromEntries(exam.cases.map((c) => [c.case, c.value]));
  reading.boxes = {};
  for (const view of exam.views) reading.boxes[view.id] = (exam.boxes && exam.boxes[String(view.id)]) || [];
  history.replaceState(null, "", `#exam=${position}`);
  document.body.dataset.exam = position;
  document.body.dataset.submitted = exam.submitted;
  document.body.dataset.allDone = "false";
  $("#exam-title").textContent = `Exam ${exam.exam} · ${position} of ${reading.worklist.total}`;
  buildViews();
  buildAnswers();
  renderBoxes();
  updateSubmit();
  renderWorklist();
}

function showAllDone() {
  reading.exam = null;
  reading.views = [];
  document.body.dataset.exam = "";
  document.body.dataset.allDone = "true";
  $("#views").replaceChildren();
  $("#answers").replaceChildren();
  $("#exam-title").textContent = "";
  $("#submit").disabled = true;
  $("#submit-note").textContent = "";
  $("#boxes-section").hidden = true;
  showMessage(`<h2>All ${reading.worklist.total} exams are submitted</h2>` +
              "<p>Thank you. Submitted exams can still be looked at from the worklist.</p>");
}

// ---- panes: window/level, zoom, pan, boxes ----------------------------------------------------

function defaultWindow(meta) {
  if (meta.window && Number.isFinite(meta.window.center) && meta.window.width > 0) return { ...meta.window };
  return { center: 2 ** (meta.bits - 1), width: 2 ** meta.bits };
}

function buildViews() {
  for (const view of reading.views) {
    view.alive = false;
    view.observer.disconnect();
  }
  const container = $("#views");
  container.style.setProperty("--columns", Math.min(4, Math.max(1, reading.exam.views.length)));
  reading.views = reading.exam.views.map((meta) => {
    const canvas = element("canvas", { "aria-label": `${meta.label} image` });
    const info = element("div", { class: "pane-info" });
    const pane = element("div", {
      class: "pane",
      dataset: { view: meta.id, label: meta.label, case: meta.case, imageRows: meta.height, imageColumns: meta.width,
                 loaded: "false" },
    }, canvas, element("div", { class: "pane-label", text: meta.label }), info);
    const window_ = defaultWindow(meta);
    const view = { meta, pane, canvas, info, center: window_.center, width: window_.width, zoom: 1, panX: 0, panY: 0,
                   fullRes: false, image: null, loadedUrl: null, loadingUrl: null, again: false, drawing: null,
                   highlight: null, alive: true };
    wirePane(view);
    return view;
  });
  container.replaceChildren(...reading.views.map((view) => view.pane));
  setActive(reading.views[0] || null);
  for (const view of reading.views) {
    view.observer = new ResizeObserver(() => { if (view.alive) { draw(view); fetchImage(view); } });
    view.observer.observe(view.canvas);
  }
}

function setActive(view) {
  reading.active = view;
  for (const other of reading.views) other.pane.classList.toggle("active", other === view);
  syncToolbar();
}

function geometry(view) {
  const width = view.canvas.clientWidth, height = view.canvas.clientHeight;
  const fit = Math.min(width / view.meta.width, height / view.meta.height);
  const scale = fit * view.zoom;
  return {
    width, height, fit, scale,
    x0: (width - view.meta.width * scale) / 2 + view.panX,
    y0: (height - view.meta.height * scale) / 2 + view.panY,
  };
}

// Canvas position (CSS pixels) -> image position (pixels, fractional).
function toImage(view, event) {
  const rect = view.canvas.getBoundingClientRect();
  const g = geometry(view);
  return { col: (event.clientX - rect.left - g.x0) / g.scale, row: (event.clientY - rect.top - g.y0) / g.scale };
}

function wantedMaxSide(view) {
  const longest = Math.max(view.meta.width, view.meta.height);
  if (view.fullRes) return null;
  const g = geometry(view);
  // as sharp as the pane shows it (zooming in asks for more pixels), rounded up to a step of 256 so
  // that nearby zooms and panes of similar size share the server's cached renderings
  const needed = Math.ceil((longest * g.scale * (window.devicePixelRatio || 1)) / 256) * 256;
  if (!Number.isFinite(needed) || needed <= 0) return 256;
  if (needed >= longest) return null;
  return Math.min(16384, Math.max(64, needed));
}

function imageUrl(view) {
  const params = new URLSearchParams({ center: Math.round(view.center), width: Math.max(1, Math.round(view.width)) });
  const side = wantedMaxSide(view);
  if (side !== null) params.set("max_side", side);
  return `/api/exams/${reading.exam.position}/views/${view.meta.id}/image?${params}`;
}

// One request per pane at a time: while one is on its way, further changes only mark the pane,
// and the newest window is fetched when it lands. Dragging the window thus runs at the server's pace.
function fetchImage(view) {
  if (!view.alive || view.canvas.clientWidth === 0) return;
  const url = imageUrl(view);
  if (url === view.loadedUrl) return;
  if (view.loadingUrl) {
    view.again = view.loadingUrl !== url;
    return;
  }
  view.loadingUrl = url;
  view.pane.dataset.loading = "true";
  const image = new Image();
  image.decoding = "async";
  const landed = (ok) => {
    if (!view.alive) return;
    view.loadingUrl = null;
    view.pane.dataset.loading = "false";
    if (ok) {
      view.image = image;
      view.loadedUrl = url;
      view.pane.dataset.loaded = "true";
      view.pane.dataset.src = url;
      view.pane.dataset.imageSide = Math.max(image.naturalWidth, image.naturalHeight);
      view.pane.classList.remove("failed");
    } else {
      view.pane.classList.add("failed");
      view.pane.dataset.loaded = view.image ? "true" : "error";
    }
    draw(view);
    if (view.again) {
      view.again = false;
      fetchImage(view);
    } else if (!ok) {
      setTimeout(() => { if (view.alive && !view.loadingUrl) { view.loadedUrl = null; fetchImage(view); } }, 3000);
    }
  };
  image.onload = () => landed(true);
  image.onerror = () => landed(false);
  image.src = url;
}

function draw(view) {
  const canvas = view.canvas;
  const ratio = window.devicePixelRatio || 1;
  const g = geometry(view);
  const pixelWidth = Math.round(g.width * ratio), pixelHeight = Math.round(g.height * ratio);
  if (canvas.width !== pixelWidth || canvas.height !== pixelHeight) {
    canvas.width = pixelWidth;
    canvas.height = pixelHeight;
  }
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  context.fillStyle = "#000";
  context.fillRect(0, 0, g.width, g.height);
  const w = view.meta.width * g.scale, h = view.meta.height * g.scale;
  if (view.image) {
    // past 1:1 on a full-resolution image, show the pixels as they are rather than blurred
    context.imageSmoothingEnabled = !(view.image.naturalWidth >= view.meta.width && g.scale * ratio > 2);
    context.imageSmoothingQuality = "high";
    context.drawImage(view.image, g.x0, g.y0, w, h);
  }
  const boxes = reading.boxes[view.meta.id] || [];
  context.lineWidth = 2;
  context.font = "600 13px system-ui, sans-serif";
  boxes.forEach((box, index) => {
    const [row0, col0, row1, col1] = box;
    const x = g.x0 + col0 * g.scale, y = g.y0 + row0 * g.scale;
    const highlighted = view.highlight === index;
    context.strokeStyle = highlighted ? "#ffd166" : "#4cc9f0";
    context.setLineDash([]);
    context.strokeRect(x, y, (col1 - col0) * g.scale, (row1 - row0) * g.scale);
    context.fillStyle = context.strokeStyle;
    context.fillText(String(index + 1), x + 4, y + 15);
  });
  if (view.drawing) {
    const d = normalisedRect(view.drawing);
    context.strokeStyle = "#ffd166";
    context.setLineDash([6, 4]);
    context.strokeRect(g.x0 + d.col0 * g.scale, g.y0 + d.row0 * g.scale, (d.col1 - d.col0) * g.scale,
                       (d.row1 - d.row0) * g.scale);
    context.setLineDash([]);
  }
  const zoom = Math.round(view.zoom * 100);
  const resolution = view.image && view.image.naturalWidth >= view.meta.width ? "full resolution" : "";
  view.info.textContent = [`${zoom} %`, `L ${Math.round(view.center)} W ${Math.round(view.width)}`, resolution]
    .filter(Boolean).join(" · ");
  view.pane.dataset.center = Math.round(view.center);
  view.pane.dataset.width = Math.round(view.width);
  view.pane.dataset.zoom = view.zoom.toFixed(3);
  view.pane.dataset.fullRes = view.fullRes;
}

function normalisedRect(drawing) {
  return {
    row0: Math.min(drawing.start.row, drawing.end.row), row1: Math.max(drawing.start.row, drawing.end.row),
    col0: Math.min(drawing.start.col, drawing.end.col), col1: Math.max(drawing.start.col, drawing.end.col),
  };
}

const clamp = (value, low, high) => Math.min(high, Math.max(low, value));

function wirePane(view) {
  const canvas = view.canvas;
  let gesture = null;
  canvas.addEventListener("contextmenu", (event) => event.preventDefault());
  canvas.addEventListener("pointerdown", (event) => {
    setActive(view);
    if (event.button === 2) {
      // window/level moves every pane together: the views of one exam are compared side by side
      gesture = { kind: "window", x: event.clientX, y: event.clientY,
                  start: reading.views.map((v) => ({ view: v, center: v.center, width: v.width })) };
    } else if (event.button === 0 && reading.roiMode && !reading.exam.submitted) {
      if ((reading.boxes[view.meta.id] || []).length >= reading.worklist.max_boxes) {
        setError(`At most ${reading.worklist.max_boxes} boxes per view: delete one before drawing another.`);
        return;
      }
      const point = toImage(view, event);
      const inside = { row: clamp(point.row, 0, view.meta.height), col: clamp(point.col, 0, view.meta.width) };
      gesture = { kind: "roi", x: event.clientX, y: event.clientY };
      view.drawing = { start: inside, end: inside };
    } else if (event.button === 0) {
      gesture = { kind: "pan", x: event.clientX, y: event.clientY, panX: view.panX, panY: view.panY };
    } else {
      return;
    }
    canvas.setPointerCapture(event.pointerId);
    event.preventDefault();
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!gesture) return;
    const dx = event.clientX - gesture.x, dy = event.clientY - gesture.y;
    if (gesture.kind === "pan") {
      view.panX = gesture.panX + dx;
      view.panY = gesture.panY + dy;
      draw(view);
    } else if (gesture.kind === "window") {
      for (const { view: v, center, width } of gesture.start) {
        const range = 2 ** v.meta.bits, step = range / 800;
        v.width = clamp(width + dx * step, 1, 2 * range);
        v.center = clamp(center + dy * step, -range, 2 * range);
        draw(v);
        fetchImage(v);
      }
      syncToolbar();
    } else if (gesture.kind === "roi") {
      const point = toImage(view, event);
      view.drawing.end = { row: clamp(point.row, 0, view.meta.height), col: clamp(point.col, 0, view.meta.width) };
      draw(view);
    }
  });
  const finish = (event) => {
    if (!gesture) return;
    if (gesture.kind === "roi") {
      const moved = Math.hypot(event.clientX - gesture.x, event.clientY - gesture.y);
      const rect = normalisedRect(view.drawing);
      view.drawing = null;
      // half-open pixel ranges covering every pixel the drawn rectangle touches
      const box = [Math.floor(rect.row0), Math.floor(rect.col0), Math.ceil(rect.row1), Math.ceil(rect.col1)];
      box[0] = clamp(box[0], 0, view.meta.height - 1);
      box[1] = clamp(box[1], 0, view.meta.width - 1);
      box[2] = clamp(box[2], box[0] + 1, view.meta.height);
      box[3] = clamp(box[3], box[1] + 1, view.meta.width);
      if (moved >= 4) {
        setBoxes(view, [...(reading.boxes[view.meta.id] || []), box]);
      }
      draw(view);
    }
    gesture = null;
  };
  canvas.addEventListener("pointerup", finish);
  canvas.addEventListener("pointercancel", finish);
  canvas.addEventListener("wheel", (event) => {
    event.preventDefault();
    setActive(view);
    const rect = canvas.getBoundingClientRect();
    const sx = event.clientX - rect.left, sy = event.clientY - rect.top;
    const before = geometry(view);
    const col = (sx - before.x0) / before.scale, row = (sy - before.y0) / before.scale;
    view.zoom = clamp(view.zoom * Math.exp(-event.deltaY * 0.0015), 0.5, 40);
    // the image point under the pointer stays under the pointer
    const scale = before.fit * view.zoom;
    view.panX = sx - col * scale - (before.width - view.meta.width * scale) / 2;
    view.panY = sy - row * scale - (before.height - view.meta.height * scale) / 2;
    draw(view);
    clearTimeout(view.sharpen);
    view.sharpen = setTimeout(() => fetchImage(view), 150);
  }, { passive: false });
  canvas.addEventListener("dblclick", () => {
    view.zoom = 1;
    view.panX = view.panY = 0;
    draw(view);
    fetchImage(view);
  });
}

function setBoxes(view, boxes) {
  const position = reading.exam.position, id = view.meta.id, generation = reading.generation;
  const previous = reading.boxes[id] || [];
  reading.boxes[id] = boxes;
  setError("");
  renderBoxes();
  draw(view);
  queueSave(`boxes:${position}:${id}`, {
    url: `/api/exams/${position}/views/${id}/boxes`,
    body: { boxes },
    onSaved: () => {
      if (generation === reading.generation) $("#boxes").dataset.saved = JSON.stringify(reading.boxes);
    },
    onRefused: (error) => {
      if (generation !== reading.generation) return;
      reading.boxes[id] = previous;
      renderBoxes();
      draw(view);
      setError(`The box was not saved: ${error.message}`);
    },
  }, 0);
}

function renderBoxes() {
  const section = $("#boxes-section");
  section.hidden = !reading.worklist.roi;
  if (!reading.worklist.roi) return;
  const locked = reading.exam.submitted;
  $("#boxes-note").textContent = locked ? "" :
    `Up to ${reading.worklist.max_boxes} boxes per view: press “Draw ROI”, then drag on an image.`;
  const items = [];
  for (const view of reading.views) {
    (reading.boxes[view.meta.id] || []).forEach((box, index) => {
      const [row0, col0, row1, col1] = box;
      const remove = element("button", { type: "button", class: "delete-box", hidden: locked,
                                         "aria-label": `Delete box ${index + 1} on ${view.meta.label}`, text: "Delete" });
      remove.addEventListener("click", () => {
        const kept = reading.boxes[view.meta.id].filter((_, i) => i !== index);
        view.highlight = null;
        setBoxes(view, kept);
      });
      const item = element("li", { dataset: { view: view.meta.id, box: index } },
        element("span", { class: "box-name", text: `${view.meta.label} #${index + 1}` }),
        element("span", { class: "box-extent", text: `rows ${row0}–${row1}, columns ${col0}–${col1}` }),
        remove);
      item.addEventListener("mouseenter", () => { view.highlight = index; draw(view); });
      item.addEventListener("mouseleave", () => { view.highlight = null; draw(view); });
      items.push(item);
    });
  }
  if (!items.length) items.push(element("li", { class: "empty", text: "No boxes drawn." }));
  $("#boxes").replaceChildren(...items);
}

// ---- toolbar -----------------------------------------------------------------------------------

function wireToolbar() {
  const center = $("#wl-center"), width = $("#wl-width");
  center.addEventListener("input", () => setWindowAll((v) => ({ center: Number(center.value), width: v.width })));
  width.addEventListener("input", () => setWindowAll((v) => ({ center: v.center, width: Math.max(1, Number(width.value)) })));
  for (const button of $$(".preset")) {
    button.addEventListener("click", () => applyPreset(button.dataset.preset));
  }
  $("#reset-view").addEventListener("click", resetViews);
  $("#full-resolution").addEventListener("click", toggleFullResolution);
  $("#roi-mode").addEventListener("click", () => setRoiMode(!reading.roiMode));
  $("#submit").addEventListener("click", submitExam);
  document.addEventListener("keydown", (event) => {
    if (event.target.closest && event.target.closest("input, textarea, select")) return;
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const key = event.key.toLowerCase();
    if (key === "r") resetViews();
    else if (key === "f") toggleFullResolution();
    else if (key === "d" && reading.worklist && reading.worklist.roi) setRoiMode(!reading.roiMode);
    else if (key === "escape" && reading.roiMode) setRoiMode(false);
  });
}

function setWindowAll(compute) {
  for (const view of reading.views) {
    Object.assign(view, compute(view));
    draw(view);
    fetchImage(view);
  }
  syncToolbar();
}

function applyPreset(name) {
  setWindowAll((view) => {
    const base = defaultWindow(view.meta), range = 2 ** view.meta.bits;
    if (name === "full") return { center: range / 2, width: range };
    if (name === "narrow") return { center: view.center, width: Math.max(1, view.width / 1.5) };
    if (name === "wide") return { center: view.center, width: Math.min(2 * range, view.width * 1.5) };
    return base;
  });
}

function resetViews() {
  for (const view of reading.views) {
    view.zoom = 1;
    view.panX = view.panY = 0;
    view.fullRes = false;
  }
  applyPreset("default");
}

function toggleFullResolution() {
  const view = reading.active;
  if (!view) return;
  view.fullRes = !view.fullRes;
  draw(view);
  fetchImage(view);
  syncToolbar();
}

function setRoiMode(on) {
  reading.roiMode = on && Boolean(reading.exam) && !reading.exam.submitted;
  const button = $("#roi-mode");
  button.setAttribute("aria-pressed", reading.roiMode);
  document.body.dataset.roiMode = reading.roiMode;
}

function syncToolbar() {
  const view = reading.active;
  const center = $("#wl-center"), width = $("#wl-width");
  if (!view) return;
  const range = 2 ** view.meta.bits;
  center.min = 0;
  center.max = range;
  width.min = 1;
  width.max = 2 * range;
  center.value = Math.round(view.center);
  width.value = Math.round(view.width);
  $("#wl-center-value").textContent = Math.round(view.center);
  $("#wl-width-value").textContent = Math.round(view.width);
  const full = $("#full-resolution");
  full.setAttribute("aria-pressed", view.fullRes);
  full.textContent = view.fullRes ? `Full resolution (${view.meta.label})` : "Full resolution";
}

// ---- answers -------------------------------------------------------------------------------------

function buildAnswers() {
  const calls = reading.worklist.calls;
  const locked = reading.exam.submitted;
  const blocks = reading.exam.cases.map((c) => {
    const status = element("span", { class: "case-state" });
    const block = element("div", { class: "case", dataset: { case: c.case, laterality: c.laterality } },
      element("div", { class: "case-head" }, element("span", { class: "case-label", text: c.label }), status));
    block.append(calls === "probability" ? probabilityControl(c, locked) : choiceControl(c, calls, locked));
    return block;
  });
  $("#answers").replaceChildren(...blocks);
  for (const c of reading.exam.cases) showCaseState(c.case, reading.values[c.case] === null ? "unanswered" : "saved");
  const banner = locked ? element("div", { class: "locked", id: "locked", text: "Submitted — read only." }) : null;
  if (banner) $("#answers").prepend(banner);
  setRoiMode(reading.roiMode);
  $("#roi-mode").disabled = locked;
}

function probabilityControl(c, locked) {
  const value = reading.values[c.case];
  const slider = element("input", { type: "range", min: 0, max: 100, step: 1, class: "probability-slider",
                                    "aria-label": `Probability of malignancy, ${c.label}`, disabled: locked });
  const number = element("input", { type: "number", min: 0, max: 100, step: "any", class: "probability-number",
                                    inputmode: "decimal", placeholder: "–", "aria-label": `${c.label}, percent`,
                                    disabled: locked });
  slider.value = value === null ? 50 : value;
  number.value = value === null ? "" : formatPercent(value);
  slider.classList.toggle("empty", value === null);
  slider.addEventListener("input", () => {
    slider.classList.remove("empty");
    number.value = slider.value;
    number.classList.remove("invalid");
    setValue(c.case, Number(slider.value));
  });
  number.addEventListener("input", () => {
    const text = number.value.trim();
    if (text === "") return;
    const parsed = Number(text);
    const valid = Number.isFinite(parsed) && parsed >= 0 && parsed <= 100;
    number.classList.toggle("invalid", !valid);
    if (!valid) {
      showCaseState(c.case, "invalid");
      return;
    }
    slider.classList.remove("empty");
    slider.value = parsed;
    setValue(c.case, parsed);
  });
  return element("div", { class: "probability" },
    element("div", { class: "probability-row" }, slider,
      element("label", { class: "probability-box" }, number, element("span", { text: "%" }))),
    element("div", { class: "scale" }, element("span", { text: "0 · certainly benign" }),
      element("span", { text: "100 · certainly malignant" })));
}

function formatPercent(value) {
  return Number.isInteger(value) ? String(value) : String(Math.round(value * 100) / 100);
}

function choiceControl(c, calls, locked) {
  const group = element("div", { class: `choices ${calls}`, role: "group", "aria-label": c.label });
  for (const [value, label, title, tooltip] of CALLS[calls].choices) {
    const button = element("button", { type: "button", class: "choice", dataset: { value }, title: tooltip || title || null,
                                       "aria-pressed": reading.values[c.case] === value, disabled: locked },
      element("span", { class: "choice-label", text: label }),
      title ? element("span", { class: "choice-title", text: title }) : null);
    button.addEventListener("click", () => {
      for (const other of $$(".choice", group)) other.setAttribute("aria-pressed", other === button);
      setValue(c.case, value);
    });
    group.append(button);
  }
  return group;
}

function showCaseState(caseId, state) {
  const block = $$(".case").find((node) => node.dataset.case === caseId);
  if (!block) return;
  block.dataset.state = state;
  const text = { unanswered: "not answered", saving: "saving…", saved: "saved ✓", invalid: "0–100 only",
                 refused: "not saved" }[state] || "";
  $(".case-state", block).textContent = text;
}

function setValue(caseId, value) {
  const position = reading.exam.position, generation = reading.generation;
  reading.values[caseId] = value;
  showCaseState(caseId, "saving");
  updateSubmit();
  setError("");
  queueSave(`case:${position}:${caseId}`, {
    url: `/api/exams/${position}/cases/${encodeURIComponent(caseId)}`,
    body: { value },
    onSaved: () => {
      if (generation === reading.generation && !saves.queued.has(`case:${position}:${caseId}`)) {
        showCaseState(caseId, "saved");
      }
      refreshWorklistSoon();
    },
    onRefused: (error) => {
      if (generation !== reading.generation) return;
      showCaseState(caseId, "refused");
      setError(`${labelOfCase(caseId)}: not saved — ${error.message}`);
      if (error.status === 409) reopenCurrent();
    },
  }, 300);
}

function labelOfCase(caseId) {
  const c = reading.exam.cases.find((item) => item.case === caseId);
  return c ? c.label : caseId;
}

// The server is the record: after a refusal that means the page is out of date (say the exam was
// submitted from another tab), show what the server holds.
async function reopenCurrent() {
  const message = $("#error").textContent;
  await loadWorklist().catch(() => {});
  if (reading.exam) await openExam(reading.exam.position);
  setError(message);
}

function updateSubmit() {
  const button = $("#submit"), note = $("#submit-note");
  if (!reading.exam) return;
  const missing = reading.exam.cases.filter((c) => reading.values[c.case] === null || reading.values[c.case] === undefined);
  if (reading.exam.submitted) {
    button.disabled = true;
    button.textContent = "Submitted";
    note.textContent = "";
  } else {
    button.disabled = missing.length > 0;
    button.textContent = "Submit exam";
    note.textContent = missing.length ? `Still to answer: ${missing.map((c) => c.label).join(", ")}.`
                                      : "Submitting locks this exam and opens the next.";
  }
}

async function submitExam() {
  const button = $("#submit");
  if (!reading.exam || reading.exam.submitted) return;
  const position = reading.exam.position;
  button.disabled = true;
  button.textContent = "Submitting…";
  const flushed = await flushSaves();
  if (!flushed) {
    setError("Some answers are not saved yet (is the server running?); the exam was not submitted.");
    updateSubmit();
    return;
  }
  try {
    await api("POST", `/api/exams/${position}/submit`);
  } catch (error) {
    setError(`Not submitted: ${error.message}`);
    updateSubmit();
    if (error.status === 409) reopenCurrent();
    return;
  }
  await loadWorklist();
  if (reading.worklist.next) await openExam(reading.worklist.next);
  else showAllDone();
}

// ---------------------------------------------------------------------------------------------
// The admin view: progress per reader, refreshed every few seconds.

const ADMIN_REFRESH_MS = 5000;

function relativeTime(text) {
  if (!text) return { short: "—", full: "" };
  const date = new Date(text);
  if (Number.isNaN(date.getTime())) return { short: text, full: text };
  const seconds = Math.max(0, (Date.now() - date.getTime()) / 1000);
  const short = seconds < 60 ? "just now" : seconds < 3600 ? `${Math.floor(seconds / 60)} min ago`
    : seconds < 86400 ? `${Math.floor(seconds / 3600)} h ago` : date.toLocaleDateString();
  return { short, full: date.toLocaleString() };
}

async function refreshAdmin() {
  let data;
  try {
    data = await api("GET", "/api/admin/progress");
  } catch (error) {
    const message = error.status === 401 || error.status === 403
      ? "Not signed in as the study administrator: open the admin link again."
      : `The station cannot be reached (${error.message}); retrying.`;
    $("#admin-error").textContent = message;
    $("#admin-error").hidden = false;
    document.body.dataset.ready = error.status === 401 || error.status === 403 ? "error" : document.body.dataset.ready;
    return;
  }
  $("#admin-error").hidden = true;
  let done = 0, total = 0, answered = 0, cases = 0;
  const rows = data.readers.map((reader) => {
    done += reader.done;
    total += reader.total;
    answered += reader.answered_cases;
    cases += reader.total_cases || 0;
    const share = reader.total ? reader.done / reader.total : 0;
    const saved = relativeTime(reader.last_saved);
    return element("tr", { dataset: { reader: reader.reader, done: reader.done, total: reader.total },
                           class: reader.total && reader.done === reader.total ? "complete" : null },
      element("th", { scope: "row", text: reader.reader }),
      element("td", { class: "bar-cell" },
        element("div", { class: "progress-bar" },
          element("div", { class: "progress-fill", style: `width: ${(100 * share).toFixed(1)}%` }))),
      element("td", { class: "num done", text: `${reader.done} / ${reader.total}` }),
      element("td", { class: "num answered", dataset: { answered: reader.answered_cases },
                      text: reader.total_cases ? `${reader.answered_cases} / ${reader.total_cases}` : reader.answered_cases }),
      element("td", { class: "last-saved", title: saved.full, text: saved.short }));
  });
  $("#admin-rows").replaceChildren(...rows);
  $("#admin-total").replaceChildren(
    element("th", { scope: "row", text: `${data.readers.length} readers` }),
    element("td", { class: "bar-cell" },
      element("div", { class: "progress-bar" },
        element("div", { class: "progress-fill", style: `width: ${total ? ((100 * done) / total).toFixed(1) : 0}%` }))),
    element("td", { class: "num", text: `${done} / ${total}` }),
    element("td", { class: "num", text: cases ? `${answered} / ${cases}` : answered }),
    element("td", { text: "" }));
  $("#updated").textContent = `Updated ${clock(new Date())} · refreshes every ${ADMIN_REFRESH_MS / 1000} s`;
  document.body.dataset.ready = "true";
}

function startAdmin() {
  refreshAdmin();
  setInterval(refreshAdmin, ADMIN_REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.body.classList.contains("admin")) startAdmin();
  else startReading();
});
