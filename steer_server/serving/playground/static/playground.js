// steer-server playground. Talks only to this server's public HTTP API, with the user's key.
"use strict";

const CONFIG = JSON.parse(document.getElementById("playground-config").textContent);
const KEY_COOKIE = "steer_api_key";
const VECTORS = "/v1/steering/vectors";
const SWEEPS = "/v1/steering/sweeps";
const $ = id => document.getElementById(id);
const state = {model: null, controller: null};

// ------------------------------------------------------------------ HTTP

function apiKey() {
  const entry = document.cookie.split("; ").find(c => c.startsWith(KEY_COOKIE + "="));
  return entry ? decodeURIComponent(entry.slice(KEY_COOKIE.length + 1)) : null;
}

function headers(extra = {}) {
  const key = apiKey();
  return {...extra, ...(key ? {Authorization: `Bearer ${key}`} : {})};
}

// The server's own words: OpenAI-style {"error": {"message"}}, vLLM's {"error": "..."}, FastAPI's {"detail"}.
async function errorText(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    const error = body.error ?? body.detail ?? body;
    const message = typeof error === "string" ? error : error.message ?? JSON.stringify(error);
    return `HTTP ${response.status}: ${message}`;
  } catch (_) {
    return `HTTP ${response.status}: ${text.slice(0, 500)}`;
  }
}

async function api(method, path, body, contentType = "application/json") {
  const init = {method, headers: headers(body === undefined ? {} : {"Content-Type": contentType})};
  if (body !== undefined) init.body = contentType === "application/json" ? JSON.stringify(body) : body;
  const response = await fetch(path, init);
  if (!response.ok) throw new Error(await errorText(response));
  return response.status === 204 ? null : response.json();
}

// Server-sent events from a fetch body: calls onEvent(eventName, dataText) per event.
async function readEvents(response, onEvent, signal) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  while (true) {
    if (signal && signal.aborted) { await reader.cancel(); return; }
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      let name = "message";
      const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(name, data.join("\n"));
    }
  }
}

// ------------------------------------------------------------------ the steering builder

const OPERATIONS = ["add", "ablate", "clamp"];
const SOURCES = {add: ["prompt", "vector", "pair"], ablate: ["vector"], clamp: ["vector"]};

function select(options, value) {
  const el = document.createElement("select");
  for (const option of options) el.add(new Option(option, option, false, option === value));
  return el;
}

function input(value, placeholder, cls) {
  const el = document.createElement("input");
  el.value = value ?? "";
  if (placeholder) el.placeholder = placeholder;
  if (cls) el.className = cls;
  return el;
}

// How an addition's number is read: a coefficient, a relative dose ‖Δh‖/‖h‖, or (a stored
// vector) none at all: the vector's calibrated default layer, dose and positions.
const STRENGTHS = ["coeff", "dose", "calibrated"];
// Measured on the default model, layer 12 of 30 (EVALUATION.md, "First try"); the same depth elsewhere.
const WEDDINGS = {layer: CONFIG.num_layers ? Math.round(CONFIG.num_layers * 0.4) : 12, dose: 0.075};

function addRow({op = "add", source = "prompt", text = "", negative = "", coeff = "1", layer = "",
                 strength = "coeff"} = {}) {
  const tr = document.createElement("tr");
  tr.className = "steering-row";
  const opSel = select(OPERATIONS, op);
  opSel.className = "row-op";
  const sourceSel = select(SOURCES[op], source);
  sourceSel.className = "row-source";
  const strengthSel = select(STRENGTHS, strength);
  strengthSel.className = "row-strength";
  const amount = document.createElement("span");
  amount.append(strengthSel, input(String(coeff), "coeff", "row-coeff"));
  const cells = [opSel, sourceSel, input(text, "text or vector name", "row-text"),
    input(negative, "negative prompt", "row-negative"), amount, input(String(layer), "layer", "row-layer")];
  const remove = document.createElement("button");
  remove.textContent = "×";
  remove.className = "secondary small row-remove";
  remove.onclick = () => { tr.remove(); renderCode(); };
  for (const el of [...cells, remove]) {
    const td = document.createElement("td");
    td.append(el);
    tr.append(td);
  }
  const sync = () => {
    const sources = SOURCES[opSel.value];
    if (!sources.includes(sourceSel.value)) {
      sourceSel.replaceChildren(...sources.map(s => new Option(s, s)));
    }
    tr.querySelector(".row-negative").hidden = sourceSel.value !== "pair";
    const adding = opSel.value === "add";
    strengthSel.hidden = !adding;
    strengthSel.options[2].disabled = sourceSel.value !== "vector";
    if (!adding || (strengthSel.value === "calibrated" && sourceSel.value !== "vector")) strengthSel.value = "coeff";
    tr.querySelector(".row-coeff").hidden = adding && strengthSel.value === "calibrated";
    renderCode();
  };
  opSel.onchange = sync;
  sourceSel.onchange = sync;
  strengthSel.onchange = sync;
  tr.addEventListener("input", renderCode);
  $("steering-rows").append(tr);
  sync();
}

// A number when the text is one; otherwise the text itself, so the server names what is wrong.
function numberOrText(text) {
  const trimmed = text.trim();
  const value = Number(trimmed);
  return trimmed !== "" && Number.isFinite(value) ? value : trimmed;
}

function steeringField() {
  const steering = {additions: [], ablate: [], clamp: []};
  const mode = $("mode").value;
  for (const tr of document.querySelectorAll("#steering-rows tr")) {
    const op = tr.querySelector(".row-op").value;
    const source = tr.querySelector(".row-source").value;
    const text = tr.querySelector(".row-text").value;
    const coeff = numberOrText(tr.querySelector(".row-coeff").value);
    const layerText = tr.querySelector(".row-layer").value.trim();
    const layer = layerText === "" ? undefined : numberOrText(layerText);
    if (op === "add") {
      const kind = tr.querySelector(".row-strength").value;
      const strength = kind === "calibrated" ? {} : {[kind]: coeff};
      const entry = source === "prompt" ? {prompt: text, ...strength, layer}
        : source === "pair" ? {positive: text, negative: tr.querySelector(".row-negative").value, ...strength, layer}
        : {vector: text, ...strength, ...(layer === undefined ? {} : {layer})};
      steering.additions.push(entry);
    } else if (op === "ablate") {
      steering.ablate.push({vector: text, ...(layer === undefined ? {} : {layers: [layer]})});
    } else {
      steering.clamp.push({vector: text, value: coeff, ...(layer === undefined ? {} : {layers: [layer]})});
    }
  }
  for (const key of ["additions", "ablate", "clamp"]) if (!steering[key].length) delete steering[key];
  if (!Object.keys(steering).length) return null;
  if (mode !== "actadd") steering.mode = mode;
  if (mode === "constant") steering.positions = $("positions").value;
  if (mode === "actadd" && $("pad").value !== "") steering.pad = $("pad").value;
  if ($("endpoint").value === "chat" && $("anchor").value !== "user") steering.anchor = $("anchor").value;
  if ($("receipt").checked) steering.receipt = true;
  return steering;
}

function requestBody(steering) {
  const chat = $("endpoint").value === "chat";
  const body = {model: state.model};
  if (chat) {
    const messages = [];
    if ($("system").value.trim()) messages.push({role: "system", content: $("system").value});
    messages.push({role: "user", content: $("prompt").value});
    body.messages = messages;
  } else {
    body.prompt = $("prompt").value;
  }
  body.max_tokens = numberOrText($("max-tokens").value);
  for (const [id, field] of [["temperature", "temperature"], ["top-p", "top_p"],
    ["repetition-penalty", "repetition_penalty"], ["seed", "seed"]]) {
    if ($(id).value.trim() !== "") body[field] = numberOrText($(id).value);
  }
  body.stream = true;
  if (steering) body.steering = steering;
  return body;
}

function endpointPath() {
  return $("endpoint").value === "chat" ? "/v1/chat/completions" : "/v1/completions";
}

// ------------------------------------------------------------------ copy as curl / Python

function shellQuote(text) {
  return `'${text.replace(/'/g, `'\\''`)}'`;
}

function python(value, indent = "") {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return String(value);
  if (typeof value === "string") return JSON.stringify(value);
  const inner = indent + "    ";
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return "[\n" + value.map(v => inner + python(v, inner)).join(",\n") + ",\n" + indent + "]";
  }
  const keys = Object.keys(value);
  if (!keys.length) return "{}";
  return "{\n" + keys.map(k => `${inner}${JSON.stringify(k)}: ${python(value[k], inner)}`).join(",\n") + ",\n" + indent + "}";
}

// Arguments the openai SDK takes by name; every other field travels in extra_body.
const SDK_ARGS = {
  completion: ["model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stream"],
  chat: ["model", "messages", "max_tokens", "temperature", "top_p", "seed", "stream"],
};

function curlText(body) {
  return [`curl -sN ${location.origin}${endpointPath()}`,
    `  -H 'Content-Type: application/json'`,
    ...(CONFIG.keys ? [`  -H "Authorization: Bearer $STEER_API_KEY"`] : []),
    `  -d ${shellQuote(JSON.stringify(body))}`].join(" \\\n");
}

function pythonText(body) {
  const kind = $("endpoint").value;
  const named = SDK_ARGS[kind];
  const extra = Object.fromEntries(Object.entries(body).filter(([k]) => !named.includes(k)));
  const args = Object.entries(body).filter(([k]) => named.includes(k)).map(([k, v]) => `    ${k}=${python(v, "    ")},`);
  if (Object.keys(extra).length) args.push(`    extra_body=${python(extra, "    ")},`);
  const call = kind === "chat" ? "client.chat.completions.create" : "client.completions.create";
  const piece = kind === "chat" ? "(chunk.choices[0].delta.content or \"\")" : "chunk.choices[0].text";
  return [
    "import os",
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${JSON.stringify(location.origin + "/v1")}, api_key=os.environ.get("STEER_API_KEY", "-"))`,
    `stream = ${call}(`,
    ...args,
    ")",
    "for chunk in stream:",
    "    if chunk.choices:",
    `        print(${piece}, end="", flush=True)`,
    "print()",
  ].join("\n");
}

function renderCode() {
  const body = requestBody(steeringField());
  $("code-curl").textContent = curlText(body);
  $("code-python").textContent = pythonText(body);
}

async function copy(id) {
  const text = $(id).textContent;
  try {
    await navigator.clipboard.writeText(text);
    $("copy-status").textContent = "copied";
  } catch (_) {  // no clipboard permission (e.g. plain http on another host): select the text instead
    const range = document.createRange();
    range.selectNodeContents($(id));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    $("copy-status").textContent = "selected: press Ctrl+C";
  }
}

// ------------------------------------------------------------------ compare: two streams

function showError(id, message) {
  $(id).textContent = message;
  $(id).hidden = !message;
}

async function stream(body, outId, errorId, signal) {
  $(outId).textContent = "";
  showError(errorId, "");
  const chat = "messages" in body;
  let receipt = null;
  const response = await fetch(endpointPath(), {method: "POST", headers: headers({"Content-Type": "application/json"}),
    body: JSON.stringify(body), signal});
  if (!response.ok) {
    showError(errorId, await errorText(response));
    return null;
  }
  await readEvents(response, (_, data) => {
    if (data === "[DONE]") return;
    const chunk = JSON.parse(data);
    if (chunk.error) { showError(errorId, chunk.error.message ?? JSON.stringify(chunk.error)); return; }
    if (chunk.steering_receipt) receipt = chunk.steering_receipt;
    for (const choice of chunk.choices ?? []) {
      $(outId).textContent += chat ? (choice.delta?.content ?? "") : (choice.text ?? "");
    }
  }, signal);
  return receipt;
}

function renderReceipt(receipt) {
  $("receipt-view").hidden = !receipt;
  const rows = (receipt?.layers ?? []).map(layer => {
    const tr = document.createElement("tr");
    const dose = v => (v === null || v === undefined ? "—" : v.toFixed(3));
    for (const value of [layer.layer, layer.operations.join(", "), layer.prompt_tokens, layer.generated_tokens,
      dose(layer.dose_mean), dose(layer.dose_max)]) {
      const td = document.createElement("td");
      td.textContent = value;
      tr.append(td);
    }
    return tr;
  });
  $("receipt-rows").replaceChildren(...rows);
}

async function runBoth() {
  const steering = steeringField();
  renderCode();
  state.controller = new AbortController();
  $("run").disabled = true;
  $("stop").disabled = false;
  $("run-status").textContent = "generating…";
  renderReceipt(null);
  const signal = state.controller.signal;
  const failed = error => (error.name === "AbortError" ? null : error);
  const [, steered] = await Promise.allSettled([
    stream(requestBody(null), "out-plain", "error-plain", signal).catch(e => { const f = failed(e); if (f) showError("error-plain", String(f)); }),
    stream(requestBody(steering), "out-steered", "error-steered", signal).catch(e => { const f = failed(e); if (f) showError("error-steered", String(f)); }),
  ]);
  if (!steering) showError("error-steered", "No steering given: add a row above. (This column ran unsteered.)");
  renderReceipt(steered.value ?? null);
  $("run").disabled = false;
  $("stop").disabled = true;
  $("run-status").textContent = signal.aborted ? "stopped" : "done";
}

// ------------------------------------------------------------------ the vector library

function cell(content, cls) {
  const td = document.createElement("td");
  if (cls) td.className = cls;
  if (content instanceof Node) td.append(content); else td.textContent = content;
  return td;
}

const LIBRARY_PAGE = 100;
let libraryCursor = null;  // where the next page of the library starts

// One page of the store (it may hold 100k vectors); "Show more" appends the next.
async function loadLibrary(more = false) {
  showError("library-error", "");
  $("library-status").textContent = "loading…";
  try {
    const query = new URLSearchParams({limit: String(LIBRARY_PAGE)});
    if ($("library-all").checked) query.set("all", "true");
    if (more) query.set("after", libraryCursor);
    const listing = await api("GET", `${VECTORS}?${query}`);
    const described = await Promise.all(listing.data.map(v => api("GET", `${VECTORS}/${v.id}`).catch(() => v)));
    if (more) $("vector-rows").append(...described.map(vectorRow));
    else $("vector-rows").replaceChildren(...described.map(vectorRow));
    libraryCursor = listing.next_cursor;
    $("library-more").hidden = !listing.has_more;
    const shown = $("vector-rows").children.length;
    $("library-status").textContent = `${shown} vector(s) of tenant ${CONFIG.tenant}` +
      (listing.has_more ? ", more in the store" : "");
  } catch (error) {
    $("library-status").textContent = "";
    showError("library-error", String(error.message ?? error));
  }
}

function vectorRow(vector) {
  const tr = document.createElement("tr");
  tr.className = "vector-row";
  tr.dataset.id = vector.id;
  const norms = vector.norm ? Object.entries(vector.norm).map(([layer, n]) => `${layer}: ${n.toFixed(2)}`).join(", ") : "";
  // Vectors made from pairs: how well each layer's direction separates its own examples.
  const fit = Object.entries(vector.stats ?? {}).map(([layer, s]) => `${layer}: ${s.separation.toFixed(2)}`
    + (s.explained_variance === undefined ? "" : ` / ${s.explained_variance.toFixed(2)}`)).join(", ");
  const model = vector.served_model ? "served model" : `other model (${String(vector.model).slice(0, 12)}…)`;
  const use = document.createElement("button");
  use.textContent = "use";
  use.className = "secondary small";
  use.onclick = () => {
    addRow({op: "add", source: "vector", text: vector.names[0] ?? vector.id, coeff: "4",
            strength: vector.calibration ? "calibrated" : "coeff"});
    setTab("compare");
  };
  const remove = document.createElement("button");
  remove.textContent = "delete";
  remove.className = "secondary small vector-delete";
  remove.onclick = async () => {
    if (remove.dataset.armed !== "yes") {  // two clicks, no dialog: a stray click deletes nothing
      remove.dataset.armed = "yes";
      remove.textContent = "confirm delete";
      return;
    }
    try {
      await api("DELETE", `${VECTORS}/${vector.id}`);
      await loadLibrary();
    } catch (error) {
      showError("library-error", String(error.message ?? error));
    }
  };
  const actions = document.createElement("span");
  actions.append(use, " ", remove);
  tr.append(cell(vector.names.length ? vector.names.join(", ") : "(unnamed)", "vector-names"),
    cell(vector.id.slice(0, 14) + "…", "mono"), cell(vector.kind), cell(vector.layers.join(", ")),
    cell(norms, "vector-norms"), cell(fit, "vector-fit"), cell(model), cell(actions));
  tr.children[1].title = vector.id;
  return tr;
}

async function createFromPairs() {
  showError("library-error", "");
  const pairs = $("pairs-text").value.split("\n").map(l => l.trim()).filter(Boolean).map(line => {
    const [positive, negative] = line.split("|").map(s => s.trim());
    return {positive, negative: negative ?? ""};
  });
  const layerText = $("pairs-layer").value.trim();
  const layer = numberOrText(layerText);
  // A constant vector may be made at several layers at once: "all", or a list with commas.
  const layers = layerText === "all" ? {layers: "all"}
    : layerText.includes(",") ? {layers: layerText.split(",").map(numberOrText)} : {layer};
  const body = $("pairs-kind").value === "constant" ? {...layers, pairs, method: $("pairs-method").value}
    : {layer, additions: pairs.flatMap(p => [{prompt: p.positive, coeff: 1}, {prompt: p.negative, coeff: -1}])};
  if ($("pairs-name").value.trim()) body.name = $("pairs-name").value.trim();
  try {
    await api("POST", VECTORS, body);
    await loadLibrary();
  } catch (error) {
    showError("library-error", String(error.message ?? error));
  }
}

async function importGguf() {
  showError("library-error", "");
  const file = $("gguf-file").files[0];
  if (!file) { showError("library-error", "choose a .gguf file first"); return; }
  const name = $("gguf-name").value.trim();
  try {
    await api("POST", `${VECTORS}/import/gguf${name ? "?name=" + encodeURIComponent(name) : ""}`,
      await file.arrayBuffer(), "application/octet-stream");
    await loadLibrary();
  } catch (error) {
    showError("library-error", String(error.message ?? error));
  }
}

// ------------------------------------------------------------------ sweeps

function list(text) {
  return text.split(",").map(s => s.trim()).filter(Boolean).map(numberOrText);
}

function sweepBody() {
  const kind = $("sweep-kind").value;
  const a = $("sweep-a").value, b = $("sweep-b").value;
  const steering = kind === "prompts" ? {prompts: [{prompt: a, weight: 1}, {prompt: b, weight: -1}]}
    : kind === "pairs" ? {pairs: [{positive: a, negative: b}]} : {vector: a};
  const body = {steering, layers: list($("sweep-layers").value), coeffs: list($("sweep-coeffs").value),
    prompts: $("sweep-prompts").value.split("\n").map(s => s.trim()).filter(Boolean),
    samples: numberOrText($("sweep-samples").value), max_tokens: numberOrText($("sweep-max-tokens").value),
    floor: $("sweep-floor").checked, stream: true};
  const words = $("sweep-lexicon").value.split(",").map(s => s.trim()).filter(Boolean);
  if (words.length) body.lexicon = words;
  return body;
}

async function runSweep() {
  showError("sweep-error", "");
  $("sweep-run").disabled = true;
  $("sweep-progress").textContent = "starting…";
  try {
    const response = await fetch(SWEEPS, {method: "POST", headers: headers({"Content-Type": "application/json"}),
      body: JSON.stringify(sweepBody())});
    if (!response.ok) throw new Error(await errorText(response));
    await readEvents(response, (name, data) => {
      const payload = JSON.parse(data);
      if (name === "progress") $("sweep-progress").textContent = `${payload.done} / ${payload.total} requests`;
      else if (name === "result") { state.sweep = payload; $("sweep-progress").textContent = "done"; renderHeatmap(); }
      else if (name === "error") showError("sweep-error", payload.error?.message ?? data);
    });
  } catch (error) {
    $("sweep-progress").textContent = "";
    showError("sweep-error", String(error.message ?? error));
  } finally {
    $("sweep-run").disabled = false;
  }
}

function formatEstimate(estimate) {
  if (!estimate || estimate.value === null) return "—";
  return estimate.value.toFixed(2);
}

function renderHeatmap() {
  const result = state.sweep;
  if (!result) return;
  const metric = $("sweep-metric").value;
  const arms = $("sweep-show-floor").checked ? ["steered", "random"] : ["steered"];
  const find = (arm, layer, coeff) => result.cells.find(c => c.arm === arm && c.layer === layer && c.coeff === coeff);
  const baseline = result.cells.find(c => c.arm === "unsteered");
  const values = result.cells.map(c => c.metrics[metric].value).filter(v => v !== null);
  const low = Math.min(...values), high = Math.max(...values);
  const shade = v => {
    if (v === null || !Number.isFinite(v)) return "#f0f0f0";
    const t = high > low ? (v - low) / (high - low) : 0.5;
    return `rgb(${Math.round(255 - 200 * t)}, ${Math.round(255 - 150 * t)}, 255)`;
  };
  const head = document.createElement("tr");
  head.append(cell("layer \\ coeff"));
  for (const arm of arms) for (const coeff of result.coeffs) head.append(cell(arms.length > 1 ? `${coeff} (${arm})` : String(coeff)));
  const rows = result.layers.map(layer => {
    const tr = document.createElement("tr");
    tr.append(cell(String(layer)));
    for (const arm of arms) {
      for (const coeff of result.coeffs) {
        const found = find(arm, layer, coeff);
        const estimate = found?.metrics[metric];
        const td = cell(formatEstimate(estimate), "heat");
        td.style.background = shade(estimate?.value ?? null);
        if (estimate && estimate.low !== null) td.title = `[${estimate.low.toFixed(2)}, ${estimate.high.toFixed(2)}], n=${estimate.n}`;
        tr.append(td);
      }
    }
    return tr;
  });
  $("sweep-heatmap").replaceChildren(head, ...rows);
  $("sweep-baseline").textContent = baseline
    ? `unsteered: ${formatEstimate(baseline.metrics[metric])} (n=${baseline.metrics[metric].n}) · ${result.steering}`
    : result.steering;
}

// ------------------------------------------------------------------ page wiring

function setTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  for (const panel of document.querySelectorAll(".panel")) panel.hidden = panel.id !== name;
  if (name === "library") loadLibrary();
}

function syncVisibility() {
  const chat = $("endpoint").value === "chat";
  const constant = $("mode").value === "constant";
  for (const el of document.querySelectorAll(".chat-only")) el.hidden = !chat;
  for (const el of document.querySelectorAll(".constant-only")) el.hidden = !constant;
  for (const el of document.querySelectorAll(".actadd-only")) el.hidden = constant;
  $("prompt-label").textContent = chat ? "User message" : "Prompt";
  const kind = $("sweep-kind").value;
  $("sweep-a-label").textContent = {prompts: "plus prompt", pairs: "positive", vector: "vector name or id"}[kind];
  $("sweep-b-label").textContent = kind === "pairs" ? "negative" : "minus prompt";
  $("sweep-b-wrap").hidden = kind === "vector";
  renderCode();
}

function preset(rows, mode = "actadd") {
  $("steering-rows").replaceChildren();
  $("mode").value = mode;
  for (const row of rows) addRow(row);
  syncVisibility();
}

// A vector made from one of the shipped pair datasets, on first use (then it is in the store).
async function shippedVector(name, file, query) {
  try {
    return await api("GET", `${VECTORS}/${name}`);
  } catch (_) {
    $("run-status").textContent = `making the ${name} vector from the shipped pairs…`;
    const pairs = await (await fetch(`/playground/data/${file}`, {headers: headers()})).text();
    return api("POST", `${VECTORS}?name=${name}&${query}`, pairs, "application/jsonl");
  }
}

// The shipped sentiment pairs as a vector, calibrated once (both stored): the preset then
// steers by name with no coefficient. The calibration's progress is shown.
async function presetSentiment() {
  const status = $("run-status");
  const vector = await shippedVector("sentiment", "sentiment_pairs.jsonl", "layers=all&position=mean");
  if (!vector.calibration) {
    const response = await fetch(`${VECTORS}/sentiment/calibrate`, {method: "POST",
      headers: headers({"Content-Type": "application/json"}), body: JSON.stringify({stream: true})});
    if (!response.ok) throw new Error(await errorText(response));
    let failure = null;
    await readEvents(response, (name, data) => {
      const body = JSON.parse(data);
      if (name === "progress") status.textContent = `calibrating sentiment: ${body.done} / ${body.total}`;
      else if (name === "error") failure = body.error.message;
    });
    if (failure) throw new Error(failure);
  }
  status.textContent = "sentiment: calibrated (layer, dose and positions are the vector's own)";
  preset([{source: "vector", text: "sentiment", strength: "calibrated"}]);
}

async function start() {
  for (const tab of document.querySelectorAll(".tab")) tab.onclick = () => setTab(tab.dataset.tab);
  for (const id of ["endpoint", "mode", "sweep-kind"]) $(id).onchange = syncVisibility;
  for (const id of ["prompt", "system", "max-tokens", "temperature", "top-p", "repetition-penalty", "seed", "pad",
    "positions", "anchor", "receipt"]) $(id).addEventListener("input", renderCode);
  $("add-row").onclick = () => addRow();
  // Starting points that worked on the default model (README): sentiment early, topic mid-depth.
  const early = CONFIG.num_layers ? Math.max(1, Math.round(CONFIG.num_layers / 12)) : 2;
  const middle = CONFIG.num_layers ? Math.round(CONFIG.num_layers / 2) : 6;
  $("preset-love-hate").onclick = () => preset([
    {source: "prompt", text: "Love", coeff: "5", layer: String(early)},
    {source: "prompt", text: "Hate", coeff: "-5", layer: String(early)}]);
  // The wedding pairs (each example's mean after its first token) at 0.075 of the stream's norm on
  // every position of layer 12: 85% of completions mention weddings at +0.51 nats/token on the
  // default model (EVALUATION.md).
  $("preset-weddings").onclick = () => shippedVector("weddings", "wedding_pairs.jsonl", `layers=${WEDDINGS.layer}&position=mean`)
    .then(() => {
      preset([{source: "vector", text: "weddings", strength: "dose", coeff: String(WEDDINGS.dose),
               layer: String(WEDDINGS.layer)}], "constant");
      $("run-status").textContent = "";
    })
    .catch(error => { $("run-status").textContent = String(error.message ?? error); });
  $("preset-sentiment").onclick = () => presetSentiment().catch(error => {
    $("run-status").textContent = String(error.message ?? error);
  });
  $("run").onclick = runBoth;
  $("stop").onclick = () => state.controller?.abort();
  $("copy-curl").onclick = () => copy("code-curl");
  $("copy-python").onclick = () => copy("code-python");
  $("library-refresh").onclick = () => loadLibrary();
  $("library-more").onclick = () => loadLibrary(true);
  $("library-all").onchange = () => loadLibrary();
  $("pairs-create").onclick = createFromPairs;
  $("pairs-kind").onchange = () => { $("pairs-method-label").hidden = $("pairs-kind").value !== "constant"; };
  $("gguf-import").onclick = importGguf;
  $("sweep-run").onclick = runSweep;
  $("sweep-metric").onchange = renderHeatmap;
  $("sweep-show-floor").onchange = renderHeatmap;
  if (CONFIG.num_layers) {
    $("pairs-layer").placeholder = `0..${CONFIG.num_layers}, a list or all`;
    $("pairs-layer").value = middle;
  }
  $("logout").hidden = !CONFIG.keys;
  $("logout").onclick = () => {
    document.cookie = `${KEY_COOKIE}=; path=/playground; max-age=0; SameSite=Strict`;
    location.reload();
  };
  try {
    const models = await api("GET", "/v1/models");
    state.model = models.data[0].id;
    $("model-name").textContent = `${state.model}` + (CONFIG.num_layers ? ` · layers 0..${CONFIG.num_layers}` : "");
  } catch (error) {
    $("model-name").textContent = String(error.message ?? error);
  }
  $("preset-love-hate").click();
  document.body.dataset.ready = "yes";  // for people and scripts: the page has its model and is wired
}

start();
