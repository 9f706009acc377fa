// The knowledge-search chat page: sign in, pick a knowledge base, ask, watch the answer stream in,
// read the cited passages, rate answers, and browse or continue past conversations.

import { ApiError, api, formatDate, h, replaceChildren, setupAuth, showError } from "./common.js";

const MAX_HISTORY_MESSAGES = 20; // earlier turns sent back with a follow-up question (the server trims to fit)
const CITATION = /\[(\d{1,2})\]/g; // the same pattern the server uses to mark sources as cited
const KB_STORAGE = "enclave.kb";
const SNIPPET_CHARS = 300; // the server's default snippet length for cited sources

const $ = (id) => document.getElementById(id);
const el = {
  kbSelect: $("kb-select"),
  maxTokens: $("max-tokens"),
  topK: $("top-k"),
  conversationState: $("conversation-state"),
  error: $("error"),
  thread: $("thread"),
  threadEmpty: $("thread-empty"),
  form: $("ask-form"),
  question: $("question"),
  askButton: $("ask-button"),
  searchButton: $("search-button"),
  stopButton: $("stop-button"),
  list: $("conversation-list"),
  historyError: $("history-error"),
  newConversation: $("new-conversation"),
  refreshConversations: $("refresh-conversations"),
  panel: $("citation-panel"),
  panelHeading: $("citation-heading"),
  panelTitle: $("citation-title"),
  panelSource: $("citation-source"),
  panelPage: $("citation-page"),
  panelPageLabel: $("citation-page-label"),
  panelSnippet: $("citation-snippet"),
  panelClose: $("close-citation"),
};

const state = {
  conversationId: null,
  conversationTitle: null,
  history: [], // [{role, content}] of the conversation shown
  controller: null, // AbortController of the request in flight
  knowledgeBases: null, // the first answer of /v1/knowledge_bases (it also verifies the key)
  lastTrigger: null, // the button that opened the passage panel (focus returns to it)
};

// --- start ---------------------------------------------------------------------------------------

setupAuth({
  verify: async () => {
    state.knowledgeBases = (await api("/v1/knowledge_bases")).data;
  },
  onSignedIn: async () => {
    fillKnowledgeBases(state.knowledgeBases);
    await loadConversations();
    el.question.focus();
  },
});

el.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const question = el.question.value.trim();
  if (question && !state.controller) ask(question);
});
el.question.addEventListener("keydown", (event) => {
  // Enter sends; Shift+Enter is a new line; never while an input method (Chinese, Japanese) composes.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
    event.preventDefault();
    el.form.requestSubmit();
  }
});
el.searchButton.addEventListener("click", () => {
  const query = el.question.value.trim();
  if (!query) {
    el.question.reportValidity();
    return;
  }
  if (!state.controller) searchPassages(query);
});
el.stopButton.addEventListener("click", () => state.controller && state.controller.abort());
el.newConversation.addEventListener("click", newConversation);
el.refreshConversations.addEventListener("click", loadConversations);
el.kbSelect.addEventListener("change", () => sessionStorage.setItem(KB_STORAGE, el.kbSelect.value));
el.panelClose.addEventListener("click", closePassage);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && !el.panel.hidden) closePassage();
});

// --- knowledge bases -----------------------------------------------------------------------------

function fillKnowledgeBases(kbs) {
  const names = kbs.map((kb) => kb.name);
  const wanted = sessionStorage.getItem(KB_STORAGE);
  replaceChildren(el.kbSelect, names.map((name) => h("option", { value: name }, name)));
  if (names.length === 0) {
    el.kbSelect.append(h("option", { value: "", disabled: true }, "(no knowledge bases)"));
    showError(el.error, "There is no knowledge base yet: an administrator can create one and upload documents on the Admin page.");
  }
  if (wanted && names.includes(wanted)) el.kbSelect.value = wanted;
  else if (names.includes("default")) el.kbSelect.value = "default";
}

function selectKnowledgeBase(name) {
  if (!name) return;
  if (![...el.kbSelect.options].some((o) => o.value === name)) el.kbSelect.append(h("option", { value: name }, name));
  el.kbSelect.value = name;
}

// --- conversations -------------------------------------------------------------------------------

async function loadConversations() {
  showError(el.historyError, "");
  let data;
  try {
    data = (await api("/v1/conversations")).data;
  } catch (err) {
    showError(el.historyError, err.message);
    return;
  }
  const items = data.map((c) =>
    h("li", {},
      h("button", {
        type: "button", class: "conversation", dataset: { id: c.id },
        "aria-current": c.id === state.conversationId ? "true" : null,
        onclick: () => openConversation(c),
      },
      h("span", { class: "conversation-title" }, c.title || "(untitled)"),
      h("span", { class: "conversation-meta" }, [c.knowledge_base, formatDate(c.updated_at)].filter(Boolean).join(" · ")))));
  if (items.length === 0) items.push(h("li", { class: "muted" }, "No conversations yet."));
  replaceChildren(el.list, items);
}

function markCurrentConversation() {
  for (const button of el.list.querySelectorAll("button.conversation")) {
    if (button.dataset.id === state.conversationId) button.setAttribute("aria-current", "true");
    else button.removeAttribute("aria-current");
  }
  el.conversationState.textContent = state.conversationId
    ? `Continuing: ${state.conversationTitle || state.conversationId}`
    : "New conversation";
}

function clearThread() {
  replaceChildren(el.thread, el.threadEmpty);
  el.threadEmpty.hidden = false;
  closePassage();
  showError(el.error, "");
}

function newConversation() {
  if (state.controller) state.controller.abort();
  state.conversationId = null;
  state.conversationTitle = null;
  state.history = [];
  clearThread();
  markCurrentConversation();
  el.question.focus();
}

async function openConversation(conversation) {
  if (state.controller) state.controller.abort();
  showError(el.error, "");
  let data;
  try {
    data = await api(`/v1/conversations/${encodeURIComponent(conversation.id)}`);
  } catch (err) {
    showError(el.error, err.message);
    return;
  }
  clearThread();
  el.threadEmpty.hidden = true;
  state.conversationId = conversation.id;
  state.conversationTitle = conversation.title;
  state.history = [];
  selectKnowledgeBase(conversation.knowledge_base);
  for (const message of data.messages) {
    if (message.role === "user") {
      el.thread.append(userMessage(message.content));
    } else if (message.role === "assistant") {
      const answer = new AnswerView();
      el.thread.append(answer.root);
      answer.completionId = message.completion_id;
      answer.setSources(message.sources || []);
      answer.appendText(message.content);
      answer.finish(message.created_at ? `Answered ${formatDate(message.created_at)}` : "Answered");
    }
    if (message.role === "user" || message.role === "assistant") {
      state.history.push({ role: message.role, content: message.content });
    }
  }
  markCurrentConversation();
  el.thread.lastElementChild?.scrollIntoView({ block: "end" });
}

// --- asking --------------------------------------------------------------------------------------

function readNumber(input, label, min, max) {
  const value = Number(input.value);
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new ApiError(0, `${label} must be a whole number from ${min} to ${max}.`);
  }
  return value;
}

function setBusy(controller) {
  state.controller = controller;
  const busy = controller !== null;
  el.askButton.disabled = busy;
  el.searchButton.disabled = busy;
  el.stopButton.hidden = !busy;
  el.thread.setAttribute("aria-busy", busy ? "true" : "false");
}

function userMessage(text) {
  return h("article", { class: "msg user", "aria-label": "Your question" },
    h("div", { class: "msg-meta" }, h("span", { class: "who" }, "You")),
    h("p", { class: "msg-text" }, text));
}

async function ask(question) {
  showError(el.error, "");
  let maxTokens, topK;
  try {
    maxTokens = readNumber(el.maxTokens, "Max answer tokens", 1, Number(el.maxTokens.max) || 8192);
    topK = readNumber(el.topK, "Passages", 1, 20);
  } catch (err) {
    showError(el.error, err.message);
    return;
  }
  const knowledgeBase = el.kbSelect.value;
  el.threadEmpty.hidden = true;
  el.thread.append(userMessage(question));
  const answer = new AnswerView();
  el.thread.append(answer.root);
  answer.root.scrollIntoView({ block: "end" });
  el.question.value = "";

  const controller = new AbortController();
  setBusy(controller);
  const body = {
    messages: [...state.history.slice(-MAX_HISTORY_MESSAGES), { role: "user", content: question }],
    stream: true,
    knowledge_base: knowledgeBase,
    max_tokens: maxTokens,
    top_k: topK,
  };
  if (state.conversationId) body.conversation_id = state.conversationId;

  let conversationId = null;
  let usage = null;
  let finishReason = null;
  let completed = false;
  try {
    const response = await api("/v1/chat/completions", { method: "POST", json: body, signal: controller.signal, raw: true });
    answer.setStatus("Writing…");
    for await (const event of readEvents(response.body)) {
      if (event === "[DONE]") {
        completed = true;
        break;
      }
      if (event.error) throw new ApiError(502, event.error.message || "generation failed", event.error.code);
      if (event.id) answer.completionId = event.id;
      if (Array.isArray(event.sources)) answer.setSources(event.sources);
      if (event.answer_mode) answer.setMode(event.answer_mode, event.grounded === true);
      const choice = event.choices && event.choices[0];
      if (choice && choice.delta && typeof choice.delta.content === "string") answer.appendText(choice.delta.content);
      if (choice && choice.finish_reason) finishReason = choice.finish_reason;
      if (event.usage) usage = event.usage;
      if (event.conversation_id) conversationId = event.conversation_id;
    }
    if (!completed) throw new ApiError(0, "The connection closed before the answer was complete.");
    const parts = ["Done"];
    if (usage) parts.push(`${usage.completion_tokens} tokens`);
    if (finishReason === "length") parts.push("stopped at the token limit");
    answer.finish(parts.join(" · "));
    state.history.push({ role: "user", content: question }, { role: "assistant", content: answer.text });
    if (conversationId) {
      if (!state.conversationId) state.conversationTitle = question.slice(0, 120);
      state.conversationId = conversationId;
    }
    await loadConversations();
    markCurrentConversation();
  } catch (err) {
    if (err && err.name === "AbortError") {
      answer.stop();
    } else {
      answer.fail(err.message);
      showError(el.error, err.message);
    }
  } finally {
    setBusy(null);
  }
}

/** Server-sent events from a fetch body: yields each `data:` payload parsed as JSON, or "[DONE]". */
async function* readEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  const boundary = /\r?\n\r?\n/;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      let match;
      while ((match = boundary.exec(buffer)) !== null) {
        const raw = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        const event = parseEvent(raw);
        if (event !== null) yield event;
      }
      if (done) {
        const event = parseEvent(buffer);
        if (event !== null) yield event;
        return;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function parseEvent(raw) {
  const data = raw
    .split(/\r?\n/)
    .filter((line) => line.startsWith("data:"))
    .map((line) => line.slice(5).replace(/^ /, ""))
    .join("\n");
  if (!data) return null; // a comment or keep-alive
  if (data === "[DONE]") return "[DONE]";
  try {
    return JSON.parse(data);
  } catch {
    throw new ApiError(0, "The server sent an unreadable event.");
  }
}

// --- retrieval only ------------------------------------------------------------------------------

async function searchPassages(query) {
  showError(el.error, "");
  let topK;
  try {
    topK = readNumber(el.topK, "Passages", 1, 20);
  } catch (err) {
    showError(el.error, err.message);
    return;
  }
  el.threadEmpty.hidden = true;
  const status = h("span", { class: "status" }, "Searching…");
  const list = h("ol", { class: "source-list" });
  const view = h("article", { class: "msg search", "aria-label": `Passages for ${query}`, dataset: { state: "searching" } },
    h("div", { class: "msg-meta" }, h("span", { class: "who" }, "Search"), status),
    h("p", { class: "msg-text" }, "Passages for “", h("strong", {}, query), "”"),
    list);
  el.thread.append(view);
  el.question.value = "";
  const controller = new AbortController();
  setBusy(controller);
  try {
    const data = await api("/v1/search", {
      method: "POST", signal: controller.signal,
      json: { query, knowledge_base: el.kbSelect.value, top_k: topK },
    });
    data.results.forEach((result, i) => {
      const passage = { index: i + 1, source: result.source, title: result.title, page: result.page, snippet: result.text, full: true };
      list.append(h("li", {},
        sourceButton(passage, `score ${result.score.toFixed(3)}`),
        h("p", { class: "passage-preview" }, preview(result.text))));
    });
    if (data.results.length === 0) list.replaceWith(h("p", { class: "muted" }, "No passages found."));
    status.textContent = `${data.results.length} passage${data.results.length === 1 ? "" : "s"}`;
    view.dataset.state = "done";
  } catch (err) {
    view.dataset.state = err && err.name === "AbortError" ? "stopped" : "error";
    status.textContent = err && err.name === "AbortError" ? "Stopped" : "Failed";
    if (!(err && err.name === "AbortError")) showError(el.error, err.message);
  } finally {
    setBusy(null);
    view.scrollIntoView({ block: "end" });
  }
}

function preview(text, limit = 240) {
  const flat = text.replace(/\s+/g, " ").trim();
  return flat.length > limit ? `${flat.slice(0, limit)}…` : flat;
}

// --- an answer -----------------------------------------------------------------------------------

let answerCount = 0;

/** One assistant message: streamed text with citation links, its sources, and the rating controls. */
class AnswerView {
  constructor() {
    this.number = ++answerCount;
    this.text = "";
    this.sources = [];
    this.completionId = null;
    this.pending = false;
    this.statusEl = h("span", { class: "status" }, "Searching the knowledge base…");
    this.textEl = h("div", { class: "msg-text answer" });
    this.sourcesEl = h("section", { class: "sources", "aria-label": "Sources", hidden: true });
    this.feedbackEl = h("div", { class: "feedback-slot" });
    this.root = h("article", { class: "msg assistant", "aria-label": `Answer ${this.number}`, "aria-busy": "true", dataset: { state: "streaming" } },
      h("div", { class: "msg-meta" }, h("span", { class: "who" }, "Enclave"), this.statusEl),
      this.textEl, this.sourcesEl, this.feedbackEl);
  }

  setStatus(text) {
    this.statusEl.textContent = text;
  }

  /** How the answer was made (the server's answer_mode and grounded), shown beside the status. */
  setMode(mode, grounded) {
    const labels = {
      generated: grounded ? "Checked against the sources" : "Not verified against the sources",
      extractive: "Quoted from the sources",
      abstained: "No answer in the documents",
    };
    this.root.dataset.mode = mode;
    this.root.dataset.grounded = String(grounded);
    const badge = h("span", { class: `badge mode-${mode}${grounded ? "" : " ungrounded"}`, dataset: { role: "answer-mode" } },
      labels[mode] || mode);
    this.statusEl.after(badge);
  }

  setSources(sources) {
    const follow = nearBottom();
    this.sources = sources;
    this.renderSources();
    this.renderText();
    if (follow) el.thread.scrollTop = el.thread.scrollHeight;
  }

  appendText(text) {
    this.text += text;
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => {
        this.pending = false;
        this.renderText();
      });
    }
  }

  renderText() {
    const follow = nearBottom(); // keep following the answer unless the reader scrolled up
    const byIndex = new Map(this.sources.map((s) => [Number(s.index), s]));
    const nodes = [];
    let last = 0;
    for (const match of this.text.matchAll(CITATION)) {
      const source = byIndex.get(Number(match[1]));
      if (!source) continue;
      if (match.index > last) nodes.push(this.text.slice(last, match.index));
      nodes.push(h("button", {
        type: "button", class: "cite", "aria-controls": "citation-panel", dataset: { index: source.index },
        title: `${sourceLabel(source)}${source.page ? `, page ${source.page}` : ""}`,
        onclick: (event) => showPassage(source, event.currentTarget),
      }, `[${source.index}]`));
      last = match.index + match[0].length;
    }
    nodes.push(this.text.slice(last));
    replaceChildren(this.textEl, nodes);
    if (follow) el.thread.scrollTop = el.thread.scrollHeight;
  }

  renderSources() {
    if (this.sources.length === 0) {
      replaceChildren(this.sourcesEl, h("p", { class: "muted" }, "No passages of this knowledge base matched the question."));
      this.sourcesEl.hidden = false;
      return;
    }
    const cited = this.citedIndexes();
    replaceChildren(this.sourcesEl,
      h("h3", {}, "Sources"),
      h("ol", { class: "source-list" }, this.sources.map((source) =>
        h("li", { class: cited.has(Number(source.index)) || source.cited ? "cited" : null },
          sourceButton(source, cited.has(Number(source.index)) || source.cited ? "cited" : null)))));
    this.sourcesEl.hidden = false;
  }

  citedIndexes() {
    return new Set([...this.text.matchAll(CITATION)].map((m) => Number(m[1])));
  }

  finish(status) {
    this.renderText();
    this.renderSources();
    if (!this.text.trim()) this.textEl.append(h("span", { class: "muted" }, "(The model returned an empty answer.)"));
    this.setStatus(status);
    this.root.dataset.state = "done";
    this.root.setAttribute("aria-busy", "false");
    if (this.completionId) replaceChildren(this.feedbackEl, feedbackControls(this.completionId, this.number));
  }

  stop() {
    this.renderText();
    this.setStatus("Stopped");
    this.root.dataset.state = "stopped";
    this.root.setAttribute("aria-busy", "false");
  }

  fail(message) {
    this.renderText();
    this.setStatus("Failed");
    this.textEl.append(h("p", { class: "error inline" }, message));
    this.root.dataset.state = "error";
    this.root.setAttribute("aria-busy", "false");
  }
}

function nearBottom() {
  const t = el.thread;
  return t.scrollHeight - t.scrollTop - t.clientHeight < 80;
}

/** A source's name; a source the reader may no longer read comes back without one (withheld). */
function sourceLabel(source) {
  return source.withheld ? "Withheld: you can no longer read this source" : source.title || source.source;
}

/** A clickable source line: [n] title — path · page (opens the passage panel). */
function sourceButton(source, note) {
  return h("button", {
    type: "button", class: "source-link", "aria-controls": "citation-panel", dataset: { index: source.index },
    onclick: (event) => showPassage(source, event.currentTarget),
  },
  h("span", { class: "source-num" }, `[${source.index}]`), " ",
  h("span", { class: "source-title" }, sourceLabel(source)), " ",
  h("span", { class: "source-path mono" }, source.source || ""),
  source.page ? h("span", { class: "source-page" }, ` · page ${source.page}`) : null,
  note ? h("span", { class: "badge" }, note) : null);
}

// --- the passage panel ---------------------------------------------------------------------------

function showPassage(source, trigger) {
  el.panelHeading.textContent = `Passage [${source.index}]`;
  el.panelTitle.textContent = sourceLabel(source);
  el.panelSource.textContent = source.source || "";
  const hasPage = source.page !== null && source.page !== undefined;
  el.panelPage.textContent = hasPage ? String(source.page) : "";
  el.panelPage.hidden = !hasPage;
  el.panelPageLabel.hidden = !hasPage;
  // The API cuts cited passages to a snippet (300 characters by default): say so when it probably did.
  const passage = source.snippet || source.text || "";
  const cut = !source.full && passage.length >= SNIPPET_CHARS;
  replaceChildren(el.panelSnippet, highlighted(passage, cut, source.quote));
  el.panel.hidden = false;
  document.body.classList.add("has-panel");
  for (const active of document.querySelectorAll(".source-link.active, .cite.active")) active.classList.remove("active");
  if (trigger) trigger.classList.add("active");
  state.lastTrigger = trigger || null;
  el.panelClose.focus();
}

/**
 * The passage with the sentences that support the answer marked. The quote's offsets index the
 * whole chunk; the API sends the first SNIPPET_CHARS of it, so a quoted sentence past the snippet is
 * shown, marked, after it.
 */
function highlighted(passage, cut, quote) {
  const spans = quote && Array.isArray(quote.spans) ? quote.spans : [];
  const nodes = [];
  let last = 0;
  const outside = [];
  for (const span of spans) {
    if (span.end <= passage.length && span.start >= last) {
      nodes.push(passage.slice(last, span.start), h("mark", { class: "quote" }, passage.slice(span.start, span.end)));
      last = span.end;
    } else {
      outside.push(span);
    }
  }
  nodes.push(passage.slice(last) + (cut ? " …" : ""));
  if (outside.length && quote.text) {
    const inside = spans.filter((s) => !outside.includes(s)).length;
    const text = inside ? quote.text.split(" … ").slice(inside).join(" … ") : quote.text;
    nodes.push(h("span", { class: "quote-later" }, " ", h("mark", { class: "quote" }, text)));
  }
  return nodes;
}

function closePassage() {
  if (el.panel.hidden) return;
  el.panel.hidden = true;
  document.body.classList.remove("has-panel");
  for (const active of document.querySelectorAll(".source-link.active, .cite.active")) active.classList.remove("active");
  if (state.lastTrigger && state.lastTrigger.isConnected) state.lastTrigger.focus();
  state.lastTrigger = null;
}

// --- feedback ------------------------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";
const THUMB_PATH = "M2 21h4V9H2v12zm20-11a2 2 0 0 0-2-2h-6.3l1-4.6v-.3c0-.4-.2-.8-.4-1.1L13.2 1 6.6 7.6C6.2 8 6 8.5 6 9v10a2 2 0 0 0 2 2h9c.8 0 1.5-.5 1.8-1.2l3-7.1c.1-.2.2-.5.2-.7v-2z";

/** A thumbs-up (or, turned over, thumbs-down) icon drawn as SVG: no emoji font needed. */
function thumb(down) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("width", "16");
  svg.setAttribute("height", "16");
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("focusable", "false");
  svg.setAttribute("class", down ? "icon flip" : "icon");
  const path = document.createElementNS(SVG, "path");
  path.setAttribute("d", THUMB_PATH);
  path.setAttribute("fill", "currentColor");
  svg.appendChild(path);
  return svg;
}

function feedbackControls(completionId, number) {
  let rating = null;
  const correctionId = `correction-${number}`;
  const status = h("span", { class: "feedback-status", role: "status" });
  const correction = h("textarea", { id: correctionId, rows: 3, maxlength: 32000, placeholder: "What should the answer have said?" });
  const send = h("button", { type: "submit" }, "Send feedback");
  const form = h("form", { class: "feedback-form", hidden: true },
    h("label", { for: correctionId }, "Correction (optional)"), correction,
    h("div", { class: "row" }, send,
      h("button", { type: "button", class: "secondary", onclick: () => reset() }, "Cancel")));
  const up = h("button", { type: "button", class: "rate", "aria-pressed": "false", onclick: () => choose(1) }, thumb(false), "Helpful");
  const down = h("button", { type: "button", class: "rate", "aria-pressed": "false", onclick: () => choose(-1) }, thumb(true), "Not helpful");

  function choose(value) {
    rating = value;
    up.setAttribute("aria-pressed", String(value === 1));
    down.setAttribute("aria-pressed", String(value === -1));
    form.hidden = false;
    status.textContent = "";
    correction.focus();
  }

  function reset() {
    rating = null;
    up.setAttribute("aria-pressed", "false");
    down.setAttribute("aria-pressed", "false");
    form.hidden = true;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (rating === null) return;
    send.disabled = true;
    status.classList.remove("error");
    status.textContent = "Sending…";
    const body = { completion_id: completionId, rating };
    if (correction.value.trim()) body.correction = correction.value.trim();
    try {
      await api("/v1/feedback", { method: "POST", json: body });
      form.hidden = true;
      up.disabled = true;
      down.disabled = true;
      status.textContent = rating === 1 ? "Thanks: recorded as helpful." : "Thanks: recorded as not helpful.";
    } catch (err) {
      status.classList.add("error");
      status.textContent = `Feedback not recorded: ${err.message}`;
    } finally {
      send.disabled = false;
    }
  });

  return h("div", { class: "feedback", role: "group", "aria-label": "Rate this answer" },
    h("span", { class: "muted" }, "Was this helpful?"), up, down, status, form);
}
