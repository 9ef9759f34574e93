// qwenkit console: chat (streamed from /v1/chat/completions) and status (/metrics + /health?verbose=1).
// Model text is only ever inserted with textContent; the API key lives in sessionStorage (this tab) only.
"use strict";

const KEY_STORAGE = "qwenkit.apiKey";
const STATUS_EVERY_MS = 2000;
const $ = (id) => document.getElementById(id);

let conversation = [];        // the conversation as OpenAI messages
let attachments = [];    // data: URLs of the images for the next user message
let controller = null;   // AbortController of the generation in flight
let statusTimer = null;
let lastTokens = null;   // {tokens, at} of the previous /metrics read, for tokens/s

function apiKey() { return sessionStorage.getItem(KEY_STORAGE) || ""; }

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

class NeedKey extends Error {}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = apiKey();
  if (key) headers.set("Authorization", "Bearer " + key);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    askKey(key ? "That key was refused; enter another." : "");
    throw new NeedKey("an API key is needed");
  }
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (_) {
    return response.status + " " + response.statusText;
  }
}

// ---- API key -------------------------------------------------------------------------------------------
function askKey(message) {
  $("key-form").hidden = false;
  $("key-error").textContent = message || "";
  $("key-input").focus();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("key-input").value = "";
  $("key-form").hidden = true;
  loadModel();
  loadPresets();
});

let modelId = null;

async function loadModel() {
  try {
    const response = await api("/v1/models");
    if (!response.ok) throw new Error(await errorText(response));
    const body = await response.json();
    modelId = body.data.length ? body.data[0].id : null;
    $("model-name").textContent = modelId || "";
    // The image picker shows only for a model served with its vision projector.
    const modalities = (body.data.length && body.data[0].input_modalities) || ["text"];
    $("image-label").hidden = !modalities.includes("image");
  } catch (error) {
    if (!(error instanceof NeedKey)) $("chat-error").textContent = String(error.message || error);
  }
}

// ---- pages ---------------------------------------------------------------------------------------------
function showPage(page) {
  for (const name of ["chat", "status"]) {
    $("page-" + name).hidden = name !== page;
    $("tab-" + name).classList.toggle("active", name === page);
  }
  clearInterval(statusTimer);
  statusTimer = null;
  if (page === "status") {
    refreshStatus();
    statusTimer = setInterval(refreshStatus, STATUS_EVERY_MS);
  }
  if (location.hash !== "#" + page) setHash(page);
}

function setHash(page) { window.history.replaceState(null, "", "#" + page); }

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => showPage(tab.dataset.page));
}

// ---- chat ----------------------------------------------------------------------------------------------
function addMessage(role, text, images) {
  const box = el("div", "msg " + role);
  box.appendChild(el("div", "role", role));
  if (images && images.length) {
    const strip = el("div", "images");
    for (const url of images) {
      const img = el("img");
      img.src = url;  // a data: URL the user picked (CSP img-src allows data:)
      img.alt = "attached image";
      strip.appendChild(img);
    }
    box.appendChild(strip);
  }
  const reasoning = el("details", "reasoning");
  reasoning.appendChild(el("summary", "", "Reasoning"));
  const reasoningText = el("div", "reasoning-text");
  reasoning.appendChild(reasoningText);
  reasoning.hidden = true;
  box.appendChild(reasoning);
  const content = el("div", "content", text || "");
  box.appendChild(content);
  const tools = el("div", "tools");
  box.appendChild(tools);
  const finish = el("div", "finish");
  box.appendChild(finish);
  $("messages").appendChild(box);
  box.scrollIntoView({ block: "end" });
  return { box, reasoning, reasoningText, content, tools, finish };
}

// "name=value; name=value" → {name: value}; a part without "=" is an error shown before sending.
function presetArgs(text) {
  const args = {};
  for (const part of text.split(";")) {
    if (!part.trim()) continue;
    const at = part.indexOf("=");
    if (at < 1) throw new Error("preset arguments: write name=value; name=value");
    args[part.slice(0, at).trim()] = part.slice(at + 1).trim();
  }
  return args;
}

let presetCards = {};

async function loadPresets() {
  try {
    const response = await api("/v1/presets");
    if (!response.ok) return;
    const body = await response.json();
    presetCards = {};
    const options = [el("option", "", "none")];
    options[0].value = "";
    for (const card of body.data) {
      presetCards[card.id] = card;
      const option = el("option", "", card.id);
      option.value = card.id;
      options.push(option);
    }
    $("preset").replaceChildren(...options);
  } catch (error) {
    // NeedKey: asked already by loadModel; the list loads once a key is given.
  }
}

function requestBody() {
  const body = {
    messages: conversation,
    stream: true,
    stream_options: { include_usage: true },
    chat_template_kwargs: { enable_thinking: $("thinking").checked },
  };
  if (modelId) body.model = modelId;
  const preset = $("preset").value;
  if (preset) {
    body.preset = preset;
    const args = presetArgs($("preset-args").value);
    if (Object.keys(args).length) body.preset_args = args;
  }
  const budget = parseInt($("budget").value, 10);
  if ($("thinking").checked && budget > 0) body.thinking_budget = budget;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const tools = $("tools").value.trim();
  if (tools) {
    body.tools = JSON.parse(tools);  // a parse error is shown before anything is sent
    body.tool_choice = $("tool-choice").value;
  }
  return body;
}

// One server-sent events stream: calls onData with each parsed `data:` JSON until [DONE].
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function generate() {
  $("chat-error").textContent = "";
  let body;
  try {
    body = requestBody();
  } catch (error) {
    const what = error instanceof SyntaxError ? "Tools are not valid JSON: " : "";
    $("chat-error").textContent = what + error.message;
    return;
  }
  const view = addMessage("assistant");
  const message = { role: "assistant", content: "", reasoning: "", tool_calls: [] };
  controller = new AbortController();
  setBusy(true);
  let finishReason = null;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        const reasoning = delta.reasoning_content || delta.reasoning;
        if (reasoning) {
          message.reasoning += reasoning;
          view.reasoning.hidden = false;
          view.reasoningText.textContent = message.reasoning;
        }
        if (delta.content) {
          message.content += delta.content;
          view.content.textContent = message.content;
        }
        for (const call of delta.tool_calls || []) {
          const slot = (message.tool_calls[call.index] ||= {
            id: "", type: "function", function: { name: "", arguments: "" },
          });
          if (call.id) slot.id = call.id;
          if (call.function && call.function.name) slot.function.name += call.function.name;
          if (call.function && call.function.arguments) slot.function.arguments += call.function.arguments;
        }
        if (choice.finish_reason) finishReason = choice.finish_reason;
      }
      view.box.scrollIntoView({ block: "end" });
    });
    view.finish.textContent = finishReason ? "finish: " + finishReason : "";
  } catch (error) {
    if (error.name === "AbortError") {
      view.finish.textContent = "stopped";
    } else if (!(error instanceof NeedKey)) {
      $("chat-error").textContent = String(error.message || error);
    }
  } finally {
    controller = null;
    setBusy(false);
  }
  const kept = { role: "assistant", content: message.content };
  if (message.tool_calls.length) {
    kept.tool_calls = message.tool_calls.filter(Boolean);
    showToolCalls(view, kept.tool_calls);
  }
  if (message.content || kept.tool_calls) conversation.push(kept);
}

function showToolCalls(view, calls) {
  for (const call of calls) {
    const box = el("div", "tool-call");
    box.appendChild(el("div", "", "Tool call: " + call.function.name));
    box.appendChild(el("pre", "", call.function.arguments));
    const result = el("textarea", "tool-result");
    result.rows = 3;
    result.placeholder = "Paste the result of " + call.function.name;
    box.appendChild(result);
    const send = el("button", "", "Send result");
    send.type = "button";
    send.addEventListener("click", () => {
      conversation.push({ role: "tool", tool_call_id: call.id, content: result.value });
      send.disabled = true;
      result.readOnly = true;
      const waiting = calls.filter((c) => !conversation.some((m) => m.role === "tool" && m.tool_call_id === c.id));
      if (!waiting.length) generate();  // every call of this turn answered: the model goes on
    });
    box.appendChild(send);
    view.tools.appendChild(box);
  }
}

// ---- images --------------------------------------------------------------------------------------------
function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function showAttachments() {
  const thumbs = attachments.map((url, i) => {
    const thumb = el("span", "thumb");
    const img = el("img");
    img.src = url;
    img.alt = "image " + (i + 1);
    thumb.appendChild(img);
    const remove = el("button", "", "×");
    remove.type = "button";
    remove.title = "Remove this image";
    remove.addEventListener("click", () => { attachments.splice(i, 1); showAttachments(); });
    thumb.appendChild(remove);
    return thumb;
  });
  $("attachments").replaceChildren(...thumbs);
}

$("image-input").addEventListener("change", async () => {
  const files = Array.from($("image-input").files || []);
  $("image-input").value = "";  // the same file can be picked again
  try {
    for (const file of files) attachments.push(await readAsDataURL(file));
  } catch (error) {
    $("chat-error").textContent = "Could not read the image: " + String(error && error.message || error);
  }
  showAttachments();
});

// A user message: its text, or (with images) image_url parts then the text, as OpenAI's API takes them.
function userContent(text, images) {
  if (!images.length) return text;
  const parts = images.map((url) => ({ type: "image_url", image_url: { url } }));
  if (text.trim()) parts.push({ type: "text", text });
  return parts;
}

$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value;
  if ((!text.trim() && !attachments.length) || controller) return;
  conversation.push({ role: "user", content: userContent(text, attachments) });
  addMessage("user", text, attachments);
  attachments = [];
  showAttachments();
  $("prompt").value = "";
  generate();
});

$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});

$("stop").addEventListener("click", () => { if (controller) controller.abort(); });

$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation = [];
  attachments = [];
  showAttachments();
  $("messages").replaceChildren();
  $("chat-error").textContent = "";
});

// ---- status --------------------------------------------------------------------------------------------
// Prometheus text format: the value of a series without labels (or with the given exact label text).
function metric(text, name) {
  for (const line of text.split("\n")) {
    if (line.startsWith(name + " ")) return parseFloat(line.slice(name.length + 1));
  }
  return null;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  return n >= 1024 ** 3 ? (n / 1024 ** 3).toFixed(1) + " GiB" : (n / 1024 ** 2).toFixed(0) + " MiB";
}

async function refreshStatus() {
  try {
    const [metricsResponse, healthResponse] = await Promise.all([api("/metrics"), api("/health?verbose=1")]);
    if (!metricsResponse.ok) throw new Error(await errorText(metricsResponse));
    const text = await metricsResponse.text();
    const now = performance.now();
    const tokens = metric(text, "qwenkit_generation_tokens_total");
    if (lastTokens && tokens !== null) {
      const rate = (tokens - lastTokens.tokens) / ((now - lastTokens.at) / 1000);
      $("s-tps").textContent = rate.toFixed(1);
    }
    if (tokens !== null) lastTokens = { tokens, at: now };
    $("s-running").textContent = metric(text, "qwenkit_running_sequences") ?? "–";
    $("s-waiting").textContent = metric(text, "qwenkit_waiting_sequences") ?? "–";
    const used = metric(text, "qwenkit_kv_cache_used_tokens");
    const total = metric(text, "qwenkit_kv_cache_total_tokens");
    $("s-kv").textContent = total ? `${used} / ${total} (${((100 * used) / total).toFixed(0)}%)` : "–";
    $("s-state").textContent = bytes(metric(text, "qwenkit_state_cache_bytes"));

    const health = await healthResponse.json();
    if (!healthResponse.ok && !health.status) throw new Error(await errorText(healthResponse));
    const measured = health.measured || {};
    $("s-memory").textContent = measured.memory_total
      ? `${bytes(measured.process_rss)} used, ${bytes(measured.memory_available)} free`
      : "–";
    const verdict = health.status === "draining" ? "draining" : health.verdict || health.status;
    $("s-verdict").textContent = verdict;
    $("s-verdict").className = "badge st-" + verdict;
    const rows = (health.checks || []).map((check) => {
      const row = el("tr");
      row.appendChild(el("td", "", check.name));
      row.appendChild(el("td", "st-" + check.status, check.status));
      row.appendChild(el("td", "", check.value + (check.detail ? " — " + check.detail : "")));
      row.appendChild(el("td", "", check.advice || ""));
      return row;
    });
    $("checks").tBodies[0].replaceChildren(...rows);
    $("s-updated").textContent = new Date().toLocaleTimeString();
    $("status-error").textContent = "";
  } catch (error) {
    if (!(error instanceof NeedKey)) $("status-error").textContent = String(error.message || error);
  }
}

// ---- start ---------------------------------------------------------------------------------------------
$("preset").addEventListener("change", () => {
  const card = presetCards[$("preset").value];
  if (card && card.enable_thinking !== null) $("thinking").checked = card.enable_thinking;
  $("preset-args").placeholder = card && card.args.length
    ? card.args.map((a) => a + "=" + (card.defaults[a] || "…")).join("; ") : "";
});
showPage(location.hash === "#status" ? "status" : "chat");
loadModel();
loadPresets();
