// The chat page's logic: see index.html.
"use strict";
const $ = (id) => document.getElementById(id);
const STORE = "starling.chat.v1";
const fields = ["system", "temperature", "top_p", "min_p", "max_tokens", "seed", "mode"];
// messages: [{role, content, stats?, error?}]
let state = { messages: [], settings: {} };
let controller = null;

const ROLES = ["user", "assistant"];
const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);

// What local storage holds is checked piece by piece: whatever does not fit
// (an older page, a hand edit) is dropped rather than breaking the page.
function load() {
  let saved = null;
  try { saved = JSON.parse(localStorage.getItem(STORE) || "null"); } catch (_) { /* corrupt: start afresh */ }
  const settings = isObject(saved) && isObject(saved.settings) ? saved.settings : {};
  const messages = isObject(saved) && Array.isArray(saved.messages) ? saved.messages : [];
  state = {
    settings: Object.fromEntries(fields.map((f) => [f, typeof settings[f] === "string" ? settings[f] : ""])),
    messages: messages
      .filter((m) => isObject(m) && ROLES.includes(m.role) && typeof m.content === "string")
      .map((m) => ({ role: m.role, content: m.content, error: m.error === true,
                     stats: isObject(m.stats) && typeof m.stats.tokens === "number" ? m.stats : undefined })),
  };
  for (const f of fields) $(f).value = state.settings[f];
  try { $("key").value = localStorage.getItem("starling.key") || ""; } catch (_) { /* no storage */ }
}

// Saving can fail (the browser's quota, storage off): the conversation
// goes on, and the page says it is not kept.
function save() {
  for (const f of fields) state.settings[f] = $(f).value;
  try {
    localStorage.setItem(STORE, JSON.stringify(state));
    localStorage.setItem("starling.key", $("key").value);
    $("saved").textContent = "";
  } catch (e) {
    $("saved").textContent = "This conversation is too large for the browser's storage: it will not survive a reload (Export keeps it).";
  }
}

// Markdown, safely: fenced code blocks (with a copy button), inline code,
// **bold** and paragraphs, all built as DOM nodes from text.
function render(target, text) {
  target.replaceChildren();
  const parts = text.split(/^```[^\n]*\n?/m);
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      code.textContent = part.replace(/\n$/, "");
      const copy = document.createElement("button");
      copy.type = "button";
      copy.textContent = "Copy";
      copy.onclick = () => navigator.clipboard?.writeText(code.textContent).then(() => { copy.textContent = "Copied"; });
      pre.append(code, copy);
      target.append(pre);
    } else {
      for (const para of part.split(/\n{2,}/)) {
        if (!para.trim()) continue;
        const p = document.createElement("p");
        para.split(/(`[^`\n]+`|\*\*[^*\n]+\*\*)/).forEach((span) => {
          if (/^`[^`]+`$/.test(span)) {
            const c = document.createElement("code");
            c.textContent = span.slice(1, -1);
            p.append(c);
          } else if (/^\*\*[^*]+\*\*$/.test(span)) {
            const b = document.createElement("strong");
            b.textContent = span.slice(2, -2);
            p.append(b);
          } else if (span) {
            p.append(document.createTextNode(span));
          }
        });
        target.append(p);
      }
    }
  });
}

function statsLine(s) {
  if (!s) return "";
  const parts = [`${s.tokens} tokens`];
  if (s.ttft != null) parts.push(`first token ${s.ttft.toFixed(2)} s`);
  if (s.tps != null) parts.push(`${s.tps.toFixed(1)} tok/s`);
  if (s.finish) parts.push(`finish: ${s.finish}`);
  if (s.cached != null) parts.push(`cached prompt tokens: ${s.cached}`);
  return parts.join(" · ");
}

function show() {
  const log = $("log");
  log.replaceChildren();
  state.messages.forEach((m, i) => {
    const div = document.createElement("div");
    div.className = "msg " + m.role + (m.error ? " error" : "");
    div.dataset.index = i;
    const role = document.createElement("div");
    role.className = "role";
    role.append(document.createTextNode(m.error ? "error" : m.role));
    if (m.role === "user") {
      const edit = document.createElement("button");
      edit.type = "button";
      edit.textContent = "Edit";
      edit.onclick = () => editMessage(i);
      role.append(edit);
    }
    const body = document.createElement("div");
    body.className = "body";
    render(body, m.content);
    const stats = document.createElement("div");
    stats.className = "stats";
    stats.textContent = statsLine(m.stats);
    div.append(role, body, stats);
    log.append(div);
  });
  log.scrollTop = log.scrollHeight;
}

function editMessage(i) {
  if (controller) return;
  $("input").value = state.messages[i].content;
  state.messages = state.messages.slice(0, i);
  save(); show();
  $("input").focus();
}

function busy(on) {
  for (const id of ["sendButton", "regenerate", "clear", "import"]) $(id).disabled = on;
  for (const b of document.querySelectorAll(".msg .role button")) b.disabled = on;
  $("stop").disabled = !on;
  if (!on) $("input").focus();
}

// The server's error, as a sentence a person can act on.
function explain(status, body) {
  let message = `the server answered something other than starling's JSON (${body.length} bytes)`;
  try { message = JSON.parse(body).error.message; } catch (_) { /* not JSON */ }
  if (status === 401) return "The server wants an API key (Settings → API key): " + message;
  if (status === 429) return "The server is busy (its queue is full); try again in a moment.";
  if (status === 503) return "The model is still loading (or the server is stopping); try again shortly.";
  return `HTTP ${status}: ${message}`;
}

// A number field as the API wants it: `null` when empty, an error when not
// a number (or not an integer where one is needed).
function setting(name, integer) {
  const text = state.settings[name].trim();
  if (text === "") return null;
  const value = Number(text);
  if (!Number.isFinite(value) || (integer && !Number.isSafeInteger(value)))
    throw new Error(`Settings: ${name.replace("_", " ")} must be ${integer ? "a whole number" : "a number"}, not "${text}".`);
  return value;
}

// Streams an answer to the conversation. `typed`: the text of a message
// just sent from the input box, which goes back there if the request fails.
async function answer(typed) {
  save();
  const s = state.settings;
  const history = state.messages.filter((m) => !m.error).map((m) => ({ role: m.role, content: m.content }));
  const request = { messages: (s.system ? [{ role: "system", content: s.system }] : []).concat(history),
                    stream: true, stream_options: { include_usage: true } };
  if (s.mode) request.chat_template_kwargs = { mode: s.mode };
  const reply = { role: "assistant", content: "", stats: { tokens: 0 } };
  let pieces = 0;
  state.messages.push(reply);
  show();
  const log = $("log");
  // Follow the answer only while the reader is at the bottom.
  let follow = true;
  log.onscroll = () => { follow = log.scrollTop + log.clientHeight >= log.scrollHeight - 40; };
  const body = $("log").lastChild.querySelector(".body");
  const statsEl = $("log").lastChild.querySelector(".stats");
  controller = new AbortController();
  busy(true);
  const start = performance.now();
  let first = null;
  try {
    for (const f of ["temperature", "top_p", "min_p"]) { const v = setting(f, false); if (v !== null) request[f] = v; }
    for (const f of ["max_tokens", "seed"]) { const v = setting(f, true); if (v !== null) request[f] = v; }
    const headers = { "content-type": "application/json" };
    if ($("key").value) headers.authorization = "Bearer " + $("key").value;
    const response = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(request), signal: controller.signal });
    if (!response.ok) throw new Error(explain(response.status, await response.text()));
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
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          let chunk;
          try { chunk = JSON.parse(data); } catch (_) { throw new Error("The server sent an event that is not JSON."); }
          if (chunk.error) throw new Error(chunk.error.message);
          for (const choice of chunk.choices || []) {
            if (choice.delta && choice.delta.content) {
              if (first === null) first = (performance.now() - start) / 1000;
              reply.content += choice.delta.content;
              pieces += 1;
              render(body, reply.content);
            }
            if (choice.finish_reason) reply.stats.finish = choice.finish_reason;
          }
          if (chunk.usage) {
            reply.stats.tokens = chunk.usage.completion_tokens;
            reply.stats.cached = chunk.usage.prompt_tokens_details?.cached_tokens ?? 0;
          }
        }
      }
      if (follow) log.scrollTop = log.scrollHeight;
    }
    if (!reply.stats.finish) throw new TypeError("the stream ended early");
  } catch (e) {
    if (e.name === "AbortError") {
      reply.stats.finish = "stopped";
    } else if (e instanceof TypeError && reply.content) {
      // The connection went (the server stopped?): keep what came.
      reply.stats.finish = "interrupted (lost the connection to the server)";
    } else {
      state.messages.pop();
      const message = e instanceof TypeError
        ? "Lost the connection to the server (is it still running?)."
        : String(e.message || e);
      // A message typed just now goes back to the input box, not into the log.
      if (typed !== undefined && state.messages.at(-1)?.content === typed) {
        state.messages.pop();
        $("input").value = typed;
      }
      state.messages.push({ role: "assistant", error: true, content: message });
    }
  }
  // Without the usage chunk (stopped, cut off), the pieces seen stand in.
  if (!reply.stats.tokens) reply.stats.tokens = pieces;
  const elapsed = (performance.now() - start) / 1000;
  if (!reply.error && first !== null) {
    reply.stats.ttft = first;
    if (reply.stats.tokens > 1 && elapsed > first) reply.stats.tps = (reply.stats.tokens - 1) / (elapsed - first);
  }
  statsEl.textContent = statsLine(reply.stats);
  controller = null;
  busy(false);
  save(); show();
}

$("send").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value;
  if (!text.trim() || controller) return;
  // A failed answer is not part of the conversation.
  state.messages = state.messages.filter((m) => !m.error);
  state.messages.push({ role: "user", content: text });
  $("input").value = "";
  answer(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("send").requestSubmit(); }
});
$("stop").onclick = () => controller && controller.abort();
$("regenerate").onclick = () => {
  while (state.messages.length && state.messages[state.messages.length - 1].role !== "user") state.messages.pop();
  if (state.messages.length) answer();
};
$("clear").onclick = () => { state.messages = []; save(); show(); };
$("toggle").onclick = () => $("settings").classList.toggle("open");
$("closeSettings").onclick = () => { $("settings").classList.remove("open"); $("toggle").focus(); };
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && $("settings").classList.contains("open")) $("closeSettings").click();
});
for (const f of fields.concat(["key"])) $(f).addEventListener("change", save);
$("export").onclick = () => {
  save();
  const s = state.settings;
  const messages = (s.system ? [{ role: "system", content: s.system }] : [])
    .concat(state.messages.filter((m) => !m.error).map((m) => ({ role: m.role, content: m.content })));
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([JSON.stringify(messages, null, 2)], { type: "application/json" }));
  a.download = "conversation.json";
  a.click();
  URL.revokeObjectURL(a.href);
};
$("import").onclick = () => $("importFile").click();
$("importFile").onchange = async () => {
  const file = $("importFile").files[0];
  if (!file) return;
  try {
    const messages = JSON.parse((await file.text()).replace(/^\uFEFF/, ""));
    if (!Array.isArray(messages) || messages.some((m) => typeof m.content !== "string" || !["system", "user", "assistant"].includes(m.role)))
      throw new Error("expected a JSON array of {\"role\", \"content\"}");
    if (state.messages.length && !confirm("Replace this conversation with the imported one?")) return;
    const system = messages.filter((m) => m.role === "system").map((m) => m.content).join("\n");
    $("system").value = system;
    state.messages = messages.filter((m) => m.role !== "system").map((m) => ({ role: m.role, content: m.content }));
    save(); show();
  } catch (e) {
    alert("Import failed: " + e.message);
  }
  $("importFile").value = "";
};

load();
show();
$("input").focus();
fetch("/v1/models", { headers: $("key").value ? { authorization: "Bearer " + $("key").value } : {} })
  .then((r) => r.ok ? r.json() : null)
  .then((m) => { if (m && m.data && m.data[0]) $("model").textContent = "Model: " + m.data[0].id; })
  .catch(() => {});
