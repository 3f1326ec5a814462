// sdmaker web UI: plain JavaScript, no build step. Every data call goes through api(), which sends the
// bearer token the user typed (kept in sessionStorage) when the daemon asks for one.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
};

const state = { fields: [], endpoints: [], models: [], schemaLoaded: false, timers: [] };

// -- API access -----------------------------------------------------------------------------------------

function authHeaders() {
  const token = sessionStorage.getItem("sdmaker-token");
  return token ? { Authorization: "Bearer " + token } : {};
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && (body.message || (body.error && body.error.message))) || ("HTTP " + status));
    this.status = status;
    this.body = body || {};
  }
}

async function api(path, opts = {}) {
  const headers = Object.assign({}, authHeaders(), opts.headers || {});
  let body = opts.body;
  if (opts.json !== undefined) {
    headers["Content-Type"] = headers["Content-Type"] || "application/json";
    body = JSON.stringify(opts.json);
  }
  const resp = await fetch(path, { method: opts.method || "GET", headers, body });
  if (resp.status === 401 || resp.status === 403) showAuth();
  if (opts.raw) return resp;
  let data = null;
  const text = await resp.text();
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = { message: text }; }
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

async function controlPlane(operation, body) {
  return api("/", { method: "POST", json: body,
    headers: { "X-Amz-Target": "SageMaker." + operation, "Content-Type": "application/x-amz-json-1.1" } });
}

// Images behind authentication: fetched with the token, shown through an object URL.
async function imageUrl(path) {
  const resp = await api(path, { raw: true });
  if (!resp.ok) throw new ApiError(resp.status, null);
  return URL.createObjectURL(await resp.blob());
}

function showAuth() {
  $("#auth").hidden = false;
  $("#auth-token").focus();
}

function notice(text) { $("#notice").textContent = text; }

// -- Server-Sent Events over fetch (EventSource cannot send the token), resuming with Last-Event-ID --------

async function followEvents(jobId, onEvent, signal) {
  let lastId = 0;
  for (let attempt = 0; attempt < 5 && !signal.aborted; attempt++) {
    let resp;
    try {
      const headers = Object.assign({ Accept: "text/event-stream" }, authHeaders());
      if (lastId) headers["Last-Event-ID"] = String(lastId);
      resp = await fetch("/sdmaker/v1/jobs/" + encodeURIComponent(jobId) + "/events", { headers, signal });
    } catch (e) {
      if (signal.aborted) return;
      await new Promise((r) => setTimeout(r, 300));
      continue;
    }
    if (!resp.ok || !resp.body) return; // no event stream on this daemon: results still arrive
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
          const ev = { id: null, type: "message", data: "" };
          for (const line of block.split(/\r?\n/)) {
            if (line.startsWith(":")) continue;
            const i = line.indexOf(":");
            const key = i < 0 ? line : line.slice(0, i);
            const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
            if (key === "id") ev.id = val;
            else if (key === "event") ev.type = val;
            else if (key === "data") ev.data += (ev.data ? "\n" : "") + val;
          }
          if (ev.id) lastId = parseInt(ev.id, 10) || lastId;
          if (!ev.data) continue;
          let data = {};
          try { data = JSON.parse(ev.data); } catch (e) { continue; }
          onEvent(ev.type, data);
          if (ev.type === "done" || ev.type === "error") return;
        }
      }
    } catch (e) {
      if (signal.aborted) return;
    }
  }
}

// -- Generate ------------------------------------------------------------------------------------------------

// Request fields that carry an input image (base64 PNG/JPEG/WebP): a file picker, not a text box.
const IMAGE_FIELDS = ["image", "mask_image"];
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp"];

function inputFor(f) {
  const id = "field-" + f.name;
  const common = { id, name: f.name, "aria-describedby": "help-" + f.name + " err-" + f.name };
  if (f.name === "prompt" || f.name === "negative_prompt") {
    return el("textarea", Object.assign(common, { rows: 2, required: f.required }));
  }
  if (f.choices) {
    const sel = el("select", common);
    if (!f.required && f.default === null) sel.append(el("option", { value: "", text: "(model default)" }));
    for (const c of f.choices) {
      if (f.name === "format" && c !== "png") continue; // the gallery keeps PNGs: they carry the recipe
      sel.append(el("option", { value: c, text: c, selected: c === (f.name === "preview" ? "approx" : f.default) }));
    }
    return sel;
  }
  if (f.type === "str") {
    return el("input", Object.assign(common, { type: "text", autocomplete: "off",
      placeholder: f.name === "loras" ? "name or name:scale, comma-separated" : "" }));
  }
  const attrs = Object.assign(common, { type: "number", inputmode: f.type === "int" ? "numeric" : "decimal",
    step: f.type === "int" ? (f.multiple_of || 1) : "any", placeholder: f.default === null ? "model default" : String(f.default) });
  if (f.minimum !== null) attrs.min = f.minimum;
  if (f.maximum !== null) attrs.max = f.maximum;
  return el("input", attrs);
}

// An input image field: a file input (and drop zone) that reads the file in the browser into the base64 the
// request carries, a thumbnail and the pixel size; the base64 text box stays, folded, as the advanced way in.
function imageFieldFor(f) {
  const n = f.name;
  const label = n.replace(/_/g, " ");
  const file = el("input", { type: "file", id: "field-" + n + "-file", accept: IMAGE_TYPES.join(","),
    "aria-describedby": "help-" + n + " size-" + n + " err-" + n,
    onchange: (e) => { if (e.target.files.length) chooseImageFile(n, e.target.files[0]); } });
  const drop = el("div", { class: "dropzone", id: "drop-" + n }, file,
    el("span", { class: "help", text: "or drop a PNG, JPEG or WebP file here" }));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("dragging"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("dragging");
    if (!e.dataTransfer || !e.dataTransfer.files.length) return;
    try { file.files = e.dataTransfer.files; } catch (err) { /* the picker then says "no file": the field has it */ }
    chooseImageFile(n, e.dataTransfer.files[0]);
  });
  const text = el("textarea", { id: "field-" + n, name: n, rows: 3, spellcheck: "false",
    "aria-describedby": "help-" + n + " err-" + n, oninput: () => imageTextChanged(n) });
  const info = el("div", { class: "image-info" },
    el("img", { id: "thumb-" + n, class: "thumb", alt: "Preview of the chosen " + label, hidden: true }),
    el("span", { id: "size-" + n, "aria-live": "polite" }),
    el("button", { type: "button", class: "secondary", id: "clear-" + n, text: "Remove", hidden: true,
      "aria-label": "Remove the " + label, onclick: () => { imageError(n, ""); setImageText(n, ""); $("#field-" + n + "-file").value = ""; } }));
  return el("div", { class: "field wide image-field" },
    el("label", { for: "field-" + n + "-file", text: label + " (PNG, JPEG or WebP file)" }),
    drop, info,
    el("details", {}, el("summary", { text: "Advanced: paste the " + label + " as base64" }),
      el("label", { for: "field-" + n, text: label + " as base64" }), text),
    el("p", { class: "help", id: "help-" + n, text: f.description }),
    el("p", { class: "field-error", id: "err-" + n, role: "alert" }));
}

// What each input image is, once decoded: {width, height} (null: none, or not an image). Pending reads are
// awaited before a request is sent, so the size check never runs on a half-read file.
state.imageSizes = {};
state.imagePending = {};

function imageError(name, message) {
  const err = $("#err-" + name);
  err.textContent = message;
  const input = $("#field-" + name + "-file");
  if (message) input.setAttribute("aria-invalid", "true"); else input.removeAttribute("aria-invalid");
}

function chooseImageFile(name, file) {
  imageError(name, "");
  if (!IMAGE_TYPES.includes(file.type)) { // nothing of it is kept: the field is empty, and says why
    setImageText(name, "");
    $("#field-" + name + "-file").value = "";
    imageError(name, name + ": " + (file.name || "the file") + " is " + (file.type || "not an image") +
      ": choose a PNG, JPEG or WebP file");
    return;
  }
  state.imagePending[name] = new Promise((resolve) => {
    const reader = new FileReader();
    reader.onload = () => {
      const url = String(reader.result);
      resolve(setImageText(name, url.slice(url.indexOf(",") + 1), file.name));
    };
    reader.onerror = () => { imageError(name, name + ": could not read " + file.name); resolve(null); };
    reader.readAsDataURL(file);
  });
}

function imageTextChanged(name) {
  imageError(name, "");
  state.imagePending[name] = showImage(name, $("#field-" + name).value);
}

// Put base64 ``b64`` in the field's text box (what the request sends) and show what it is.
function setImageText(name, b64, fileName) {
  $("#field-" + name).value = b64;
  return (state.imagePending[name] = showImage(name, b64, fileName));
}

function showImage(name, value, fileName) {
  const thumb = $("#thumb-" + name);
  const size = $("#size-" + name);
  const b64 = value.trim().replace(/^data:[^,]*,/, "").replace(/\s+/g, "");
  state.imageSizes[name] = null;
  $("#clear-" + name).hidden = !b64;
  if (!b64) {
    thumb.hidden = true;
    thumb.removeAttribute("src");
    size.textContent = "";
    return Promise.resolve(null);
  }
  return new Promise((resolve) => {
    const probe = new Image();
    const stale = () => $("#field-" + name).value.trim().replace(/^data:[^,]*,/, "").replace(/\s+/g, "") !== b64;
    probe.onload = () => {
      if (stale()) { resolve(null); return; } // replaced while it decoded
      const dims = { width: probe.naturalWidth, height: probe.naturalHeight };
      state.imageSizes[name] = dims;
      thumb.src = probe.src;
      thumb.hidden = false;
      size.textContent = (fileName ? fileName + ": " : "") + dims.width + " × " + dims.height + " px";
      resolve(dims);
    };
    probe.onerror = () => {
      if (stale()) { resolve(null); return; }
      thumb.hidden = true;
      size.textContent = "";
      imageError(name, name + ": " + (fileName || "the text") + " is not a PNG, JPEG or WebP image");
      resolve(null);
    };
    probe.src = "data:image/png;base64," + b64; // the browser reads the format from the bytes
  });
}

// The client-side checks of the input images: the mask must be the image's size (the server says so too,
// but nothing is sent when the page already knows).
async function checkImages() {
  await Promise.all(Object.values(state.imagePending));
  const image = state.imageSizes.image, mask = state.imageSizes.mask_image;
  if (image && mask && (image.width !== mask.width || image.height !== mask.height)) {
    return { field: "mask_image", message: "mask_image is " + mask.width + "x" + mask.height + " but image is " +
      image.width + "x" + image.height + ": the mask must be the same size as the image" };
  }
  return null;
}

function renderForm() {
  const box = $("#request-fields");
  box.replaceChildren();
  for (const f of state.fields) {
    if (IMAGE_FIELDS.includes(f.name)) { box.append(imageFieldFor(f)); continue; }
    const wide = f.name === "prompt" || f.name === "negative_prompt";
    const help = f.name === "format" ? "PNG: the gallery keeps PNGs, which carry their recipe."
      : f.description + (f.allowed ? " Allowed: " + f.allowed + "." : "");
    box.append(el("div", { class: "field" + (wide ? " wide" : "") },
      el("label", { for: "field-" + f.name, text: f.name.replace(/_/g, " ") + (f.required ? " (required)" : "") }),
      inputFor(f),
      el("p", { class: "help", id: "help-" + f.name, text: help }),
      el("p", { class: "field-error", id: "err-" + f.name, role: "alert" })));
  }
}

function readForm() {
  const request = {};
  for (const f of state.fields) {
    const node = $("#field-" + f.name);
    const raw = node.value.trim();
    if (raw === "") continue;
    if (f.type === "int") request[f.name] = /^-?\d+$/.test(raw) ? parseInt(raw, 10) : raw;
    else if (f.type === "float") request[f.name] = isNaN(Number(raw)) ? raw : Number(raw);
    else if (f.name === "loras") request[f.name] = raw.split(",").map((x) => x.trim()).filter((x) => x);
    else request[f.name] = raw;
  }
  return request;
}

function fillForm(request, target) {
  for (const f of state.fields) {
    const node = $("#field-" + f.name);
    if (!node) continue;
    const v = request[f.name];
    if (f.name === "loras") node.value = (v || []).map((a) => a.name + ":" + a.scale).join(", ");
    else node.value = v === null || v === undefined ? "" : (Array.isArray(v) ? v[0] : String(v));
    if (IMAGE_FIELDS.includes(f.name)) { $("#field-" + f.name + "-file").value = ""; setImageText(f.name, node.value); }
  }
  if (target) {
    const sel = $("#field-target");
    if (![...sel.options].some((o) => o.value === target)) sel.append(el("option", { value: target, text: target }));
    sel.value = target;
  }
}

function clearErrors() {
  for (const node of document.querySelectorAll("#generate-form .field-error")) node.textContent = "";
  for (const node of document.querySelectorAll("#generate-form [aria-invalid]")) node.removeAttribute("aria-invalid");
  $("#generate-error").textContent = "";
}

function showFieldError(field, message) {
  const err = field && $("#err-" + field);
  // an input image: the file picker is the field's control (its base64 box is folded away)
  const input = field && ($("#field-" + field + "-file") || $("#field-" + field));
  if (err && input) {
    err.textContent = message;
    input.setAttribute("aria-invalid", "true");
    input.focus();
  } else {
    $("#generate-error").textContent = message;
  }
}

async function loadTargets() {
  const sel = $("#field-target");
  const current = sel.value;
  const [eps, models] = await Promise.all([api("/sdmaker/v1/endpoints"), api("/sdmaker/v1/models")]);
  state.endpoints = eps.endpoints;
  state.models = models.models;
  sel.replaceChildren();
  const g1 = el("optgroup", { label: "Endpoints" });
  for (const e of state.endpoints) g1.append(el("option", { value: e.name, text: e.name + " (" + e.status + ")" }));
  const g2 = el("optgroup", { label: "Store models" });
  const served = new Set(state.endpoints.map((e) => e.name));
  for (const m of state.models) if (!served.has(m.name)) g2.append(el("option", { value: m.name, text: m.name }));
  if (g1.children.length) sel.append(g1);
  if (g2.children.length) sel.append(g2);
  if (current && [...sel.options].some((o) => o.value === current)) sel.value = current;
  const dl = $("#model-names");
  dl.replaceChildren(...state.models.map((m) => el("option", { value: m.name })));
}

function setProgress(text, fraction) {
  $("#progress-text").textContent = text;
  if (fraction !== null && fraction !== undefined) $("#progress").value = fraction;
}

async function onGenerate(event) {
  event.preventDefault();
  clearErrors();
  const target = $("#field-target").value;
  if (!target) { showFieldError("target", "Choose an endpoint or a model."); return; }
  const bad = await checkImages();
  if (bad) { showFieldError(bad.field, bad.message); return; }
  const request = readForm();
  const button = $("#generate-button");
  button.disabled = true;
  $("#preview").hidden = true;
  $("#progress").removeAttribute("value");
  setProgress("Submitting…", null);
  let job;
  try {
    job = await api("/sdmaker/v1/ui/generate", { method: "POST", json: { target, request } });
  } catch (e) {
    button.disabled = false;
    setProgress("", 0);
    $("#progress").value = 0;
    showFieldError(e.body && e.body.field, e.message);
    return;
  }
  setProgress("Queued", 0);
  const abort = new AbortController();
  const events = followEvents(job.job_id, (type, data) => {
    if (type === "queued") setProgress("Queued (position " + data.position + ")", 0);
    else if (type === "started") setProgress("Started", 0);
    else if (type === "step") {
      const eta = data.eta_s === null || data.eta_s === undefined ? "" : ", ETA " + data.eta_s.toFixed(1) + " s";
      setProgress("Step " + data.step + " of " + data.total + eta, data.step / data.total);
    } else if (type === "preview" && (data.index || 0) === 0) {
      const img = $("#preview");
      img.src = "data:image/" + (data.format || "png") + ";base64," + data.image;
      img.hidden = false;
    }
  }, abort.signal);
  let result;
  try {
    for (;;) {
      result = await api("/sdmaker/v1/ui/generate/" + job.job_id);
      if (result.state !== "running") break;
    }
  } catch (e) {
    result = { state: "error", error: { message: e.message } };
  }
  abort.abort();
  await events.catch(() => {});
  button.disabled = false;
  if (result.state === "error") {
    setProgress("Failed", 0);
    showFieldError(result.error.field, result.error.message);
    return;
  }
  $("#progress").value = 1;
  $("#preview").hidden = true; // the result replaces the last preview
  setProgress("Done: " + result.items.length + " image(s)", 1);
  const box = $("#results");
  box.replaceChildren();
  for (const item of result.items) box.append(await figureFor(item, false));
}

async function figureFor(item, inGallery) {
  const src = await imageUrl(item.url);
  const recipe = item.recipe || {};
  const req = recipe.request || {};
  const img = el("img", { src, alt: "Generated image: " + (req.prompt || "(no recipe)") + ", seed " + (req.seed ?? item.seed) });
  const caption = el("figcaption", { text: (req.prompt || "") + " · seed " + (req.seed ?? item.seed) + " · " +
    (req.width || "?") + "x" + (req.height || "?") + " · " + (recipe.model || item.endpoint || "") });
  const buttons = el("div", { class: "buttons" },
    el("a", { href: src, download: item.id + ".png", class: "button", text: "Download" }),
    el("button", { type: "button", class: "secondary", text: "Copy recipe", onclick: () => copyRecipe(recipe) }));
  if (inGallery) {
    buttons.append(
      el("button", { type: "button", class: "secondary", text: "Regenerate", onclick: () => {
        fillForm(req, item.endpoint); go("generate");
        notice(recipe.inputs ? "Recipe loaded. Its input images are recorded by digest only: choose them again, then " +
          "press Generate." : "Recipe loaded: press Generate to make it again."); } }),
      el("button", { type: "button", class: "secondary", text: "Reuse seed", onclick: () => {
        $("#field-seed").value = req.seed ?? item.seed; go("generate"); notice("Seed " + (req.seed ?? item.seed) + " set."); } }),
      el("button", { type: "button", class: "secondary", text: "Delete", onclick: async () => {
        await api("/sdmaker/v1/gallery/" + item.id, { method: "DELETE" }); loadGallery(); } }));
  }
  return el("figure", { "data-id": item.id }, img, caption, buttons);
}

async function copyRecipe(recipe) {
  const text = JSON.stringify(recipe, null, 2);
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {
    const area = el("textarea", { "aria-hidden": "true" });
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  notice("Recipe copied to the clipboard.");
}

// -- Gallery -------------------------------------------------------------------------------------------------

async function loadGallery() {
  const data = await api("/sdmaker/v1/gallery");
  const box = $("#gallery");
  box.replaceChildren();
  if (!data.items.length) box.append(el("p", { text: "No images yet: generate some." }));
  for (const item of data.items) box.append(await figureFor(item, true));
}

// -- Endpoints ----------------------------------------------------------------------------------------------

const fmt = (v, digits = 2) => (v === null || v === undefined ? "–" : (typeof v === "number" ? v.toFixed(digits) : String(v)));

async function loadEndpoints() {
  const data = await api("/sdmaker/v1/endpoints");
  const body = $("#endpoints-table tbody");
  body.replaceChildren();
  if (!data.endpoints.length) body.append(el("tr", {}, el("td", { colspan: 11, text: "No endpoints." })));
  for (const e of data.endpoints) {
    const workers = e.workers || [];
    const ready = workers.filter((w) => w.state === "Ready" || w.state === "Busy").length;
    body.append(el("tr", {},
      el("th", { scope: "row", text: e.name }),
      el("td", { text: e.status + (e.failure_reason ? ": " + e.failure_reason : "") }),
      el("td", { text: e.model_name || "–" }), el("td", { text: e.instance_type || "–" }),
      el("td", { text: ready + " / " + workers.length }), el("td", { text: fmt(e.invocations, 0) }),
      el("td", { text: fmt(e.errors, 0) }), el("td", { text: fmt(e.latency_p50_s) }), el("td", { text: fmt(e.latency_p95_s) }),
      el("td", { text: fmt(e.queue_depth, 0) }),
      el("td", {},
        el("button", { type: "button", class: "secondary", text: "Logs", "aria-label": "Logs of " + e.name,
          onclick: () => showLogs(e.name) }), " ",
        el("button", { type: "button", class: "secondary", text: "Delete", "aria-label": "Delete " + e.name,
          onclick: () => deleteEndpoint(e.name) }))));
  }
}

async function showLogs(name) {
  const data = await api("/sdmaker/v1/endpoints/" + encodeURIComponent(name) + "/logs?offset=-1");
  const pre = $("#endpoint-logs");
  pre.textContent = data.text || "(empty)";
  pre.scrollTop = pre.scrollHeight;
  $("#logs-title").textContent = "Log of " + name;
}

async function deleteEndpoint(name) {
  if (!confirm("Delete endpoint " + name + "?")) return;
  let config = null;
  try { config = (await controlPlane("DescribeEndpoint", { EndpointName: name })).EndpointConfigName; } catch (e) { /* gone */ }
  try { await controlPlane("DeleteEndpoint", { EndpointName: name }); } catch (e) { notice(e.message); }
  notice("Endpoint " + name + " deleted.");
  loadEndpoints();
  return config;
}

async function onCreate(event) {
  event.preventDefault();
  for (const id of ["create-name", "create-model", "create-count"]) {
    $("#err-" + id).textContent = "";
    $("#" + id).removeAttribute("aria-invalid");
  }
  $("#create-error").textContent = "";
  const name = $("#create-name").value.trim();
  const model = $("#create-model").value.trim();
  const count = parseInt($("#create-count").value, 10);
  const bad = (id, msg) => { $("#err-" + id).textContent = msg; $("#" + id).setAttribute("aria-invalid", "true"); $("#" + id).focus(); };
  if (!/^[a-zA-Z0-9](-*[a-zA-Z0-9])*$/.test(name) || name.length > 63) return bad("create-name", "Use letters, digits and hyphens (at most 63).");
  if (!model) return bad("create-model", "Give a store model name, a folder or an s3:// URI.");
  if (!(count >= 1 && count <= 8)) return bad("create-count", "Between 1 and 8.");
  const suffix = "-" + Date.now().toString(36);
  try {
    await controlPlane("CreateModel", { ModelName: name + suffix, ExecutionRoleArn: "arn:aws:iam::000000000000:role/sdmaker-ui",
      PrimaryContainer: { Image: "sdmaker", ModelDataUrl: model } });
    await controlPlane("CreateEndpointConfig", { EndpointConfigName: name + suffix, ProductionVariants: [{
      VariantName: "AllTraffic", ModelName: name + suffix, InitialInstanceCount: count, InstanceType: $("#create-instance").value }] });
    await controlPlane("CreateEndpoint", { EndpointName: name, EndpointConfigName: name + suffix });
  } catch (e) {
    $("#create-error").textContent = e.message;
    return;
  }
  notice("Endpoint " + name + " is being created.");
  loadEndpoints();
}

// -- Models ---------------------------------------------------------------------------------------------------

async function loadModels() {
  const data = await api("/sdmaker/v1/models");
  const body = $("#models-table tbody");
  body.replaceChildren();
  for (const m of data.models) {
    body.append(el("tr", {},
      el("th", { scope: "row", text: m.name }), el("td", { text: m.digest ? m.digest.slice(0, 12) : "–" }),
      el("td", { text: m.size ? (m.size / 1e6).toFixed(1) + " MB" : "–" }), el("td", { text: m.created || "–" }),
      el("td", { text: m.source || "–" }), el("td", { text: JSON.stringify(m.defaults || {}) }),
      el("td", {}, el("button", { type: "button", class: "secondary", text: "Generate", "aria-label": "Generate with " + m.name,
        onclick: () => { fillForm({}, m.name); go("generate"); } }))));
  }
}

// -- Runs ----------------------------------------------------------------------------------------------------

const COLORS = ["#1f5fbf", "#c2410c", "#15803d", "#7e22ce", "#be123c", "#0e7490"];

function plot(title, seriesByRun) {
  const w = 440, h = 190, pad = 58;
  const all = seriesByRun.flatMap((s) => s.points);
  if (!all.length) return null;
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs) || 1, y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = (x) => pad + ((x - x0) / ((x1 - x0) || 1)) * (w - pad - 8);
  const sy = (y) => h - pad / 1.5 - ((y - y0) / ((y1 - y0) || 1)) * (h - pad);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("class", "plot");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", title + " by step for " + seriesByRun.map((s) => s.name).join(", "));
  const text = (x, y, t, anchor = "start") => {
    const n = document.createElementNS(ns, "text");
    n.setAttribute("x", x); n.setAttribute("y", y); n.setAttribute("font-size", "10"); n.setAttribute("text-anchor", anchor);
    n.textContent = t; svg.append(n);
  };
  text(pad, 12, title);
  text(pad - 4, sy(y1) + 3, y1.toPrecision(3), "end");
  text(pad - 4, sy(y0), y0.toPrecision(3), "end");
  text(sx(x1), h - 4, "step " + x1, "end");
  seriesByRun.forEach((s, i) => {
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", COLORS[i % COLORS.length]);
    line.setAttribute("stroke-width", "1.5");
    line.setAttribute("points", s.points.map((p) => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" "));
    svg.append(line);
  });
  return svg;
}

async function loadRuns() {
  const data = await api("/sdmaker/v1/runs");
  const body = $("#runs-table tbody");
  body.replaceChildren();
  if (!data.runs.length) body.append(el("tr", {}, el("td", { colspan: 6, text: "No training runs in $SDMAKER_HOME/mlruns." })));
  data.runs.forEach((r, i) => {
    const box = el("input", { type: "checkbox", id: "run-" + r.run_id, "data-exp": r.experiment_id, "data-run": r.run_id,
      checked: i === 0, onchange: compareRuns });
    body.append(el("tr", {},
      el("td", {}, box, el("label", { for: "run-" + r.run_id, class: "visually-hidden", text: " compare" })),
      el("th", { scope: "row", text: r.name }), el("td", { text: r.experiment || r.experiment_id }),
      el("td", { text: r.status }), el("td", { text: r.start_time ? new Date(r.start_time).toLocaleString() : "–" }),
      el("td", { text: fmt(r.last_metrics.loss, 4) })));
  });
  compareRuns();
}

async function compareRuns() {
  const picked = [...document.querySelectorAll("#runs-table input:checked")].slice(0, 6);
  const runs = await Promise.all(picked.map((b) => api("/sdmaker/v1/runs/" + b.dataset.exp + "/" + b.dataset.run)));
  const out = $("#run-compare");
  out.replaceChildren();
  if (!runs.length) return;
  out.append(el("p", { class: "legend" }, ...runs.map((r, i) => el("span", { style: "color:" + COLORS[i % COLORS.length], text: "■ " + r.name }))));
  const charts = el("div", { class: "charts" });
  for (const metric of ["loss", "loss_smooth", "lr"]) {
    const chart = plot(metric, runs.map((r) => ({ name: r.name, points: r.metrics[metric] || [] })));
    if (chart) charts.append(chart);
  }
  out.append(charts);
  const metricNames = [...new Set(runs.flatMap((r) => Object.keys(r.metrics)))].sort();
  const paramNames = [...new Set(runs.flatMap((r) => Object.keys(r.params)))].sort();
  const table = (caption, names, value) => el("div", { class: "table-wrap" }, el("table", {},
    el("caption", { text: caption }),
    el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "" }), ...runs.map((r) => el("th", { scope: "col", text: r.name })))),
    el("tbody", {}, ...names.map((n) => el("tr", {}, el("th", { scope: "row", text: n }), ...runs.map((r) => el("td", { text: value(r, n) })))))));
  out.append(table("Final metrics (evaluation and training)", metricNames, (r, n) => {
    const s = r.metrics[n]; return s && s.length ? fmt(s[s.length - 1][1], 5) : "–"; }));
  out.append(table("Parameters", paramNames, (r, n) => r.params[n] ?? "–"));
  const samples = el("div", { class: "compare samples" });
  for (const r of runs) {
    const col = el("div", {}, el("h4", { text: "Samples: " + r.name }));
    for (const rel of r.images.slice(-3)) {
      try {
        col.append(el("img", { src: await imageUrl("/sdmaker/v1/runs/" + r.experiment_id + "/" + r.run_id + "/artifacts/" + rel),
          alt: "Sample grid " + rel + " of run " + r.name }));
      } catch (e) { /* skipped */ }
    }
    samples.append(col);
  }
  out.append(samples);
}

// -- navigation ----------------------------------------------------------------------------------------------

const LOADERS = { generate: loadTargets, gallery: loadGallery, endpoints: loadEndpoints, models: loadModels, runs: loadRuns };

function go(page) {
  if (location.hash !== "#" + page) { location.hash = page; return; }
  show(page);
}

async function show(page) {
  if (!LOADERS[page]) page = "generate";
  for (const sec of document.querySelectorAll(".page")) sec.hidden = sec.id !== "page-" + page;
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.page === page) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  state.timers.forEach(clearInterval);
  state.timers = [];
  try {
    await LOADERS[page]();
    if (page === "endpoints") state.timers.push(setInterval(() => loadEndpoints().catch(() => {}), 5000));
  } catch (e) {
    notice("Could not load " + page + ": " + e.message);
  }
}

async function init() {
  $("#auth-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("sdmaker-token", $("#auth-token").value);
    $("#auth").hidden = true;
    start();
  });
  $("#generate-form").addEventListener("submit", onGenerate);
  $("#create-form").addEventListener("submit", onCreate);
  $("#gallery-refresh").addEventListener("click", () => loadGallery());
  $("#endpoints-refresh").addEventListener("click", () => loadEndpoints());
  window.addEventListener("hashchange", () => show(location.hash.slice(1)));
  start();
}

async function start() {
  try {
    if (!state.schemaLoaded) {
      state.fields = (await api("/sdmaker/v1/schema")).fields;
      renderForm();
      state.schemaLoaded = true;
    }
  } catch (e) {
    notice("Could not load the request schema: " + e.message);
    return;
  }
  await show(location.hash.slice(1) || "generate");
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", init);
