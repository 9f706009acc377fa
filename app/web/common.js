// Shared by the chat page and the admin page: the API key session, API calls, safe DOM building.
//
// Everything shown on these pages that comes from the server (documents, answers, titles, file names)
// is untrusted: it only ever reaches the DOM as text nodes or attribute values, never as HTML.

const KEY_STORAGE = "enclave.apiKey";

/** The API key of this browser tab (sessionStorage: gone when the tab closes; never in a URL). */
export function getKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function setKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
}

export function clearKey() {
  sessionStorage.removeItem(KEY_STORAGE);
}

/** An error answered by the API ({"error": {"message", "type", "param", "code"}}) or the network. */
export class ApiError extends Error {
  constructor(status, message, code = null, param = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

/** The API's own error message when it sent one, else the HTTP status. */
export async function errorFromResponse(response) {
  let message = `${response.status} ${response.statusText || "error"}`.trim();
  let code = null;
  let param = null;
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.message === "string") {
      message = body.error.message;
      code = body.error.code ?? null;
      param = body.error.param ?? null;
    }
  } catch {
    // not JSON (a proxy's error page): keep the status line
  }
  return new ApiError(response.status, message, code, param);
}

let onUnauthorized = () => {};

/** What to do when the server rejects the key (401): sign out and ask again. */
export function setUnauthorizedHandler(handler) {
  onUnauthorized = handler;
}

/**
 * Call the API with the session's key.
 * options: method, json (a body sent as JSON), form (a FormData), signal, raw (return the Response).
 */
export async function api(path, { method = "GET", json, form, signal, raw = false } = {}) {
  const headers = { Accept: raw ? "text/event-stream" : "application/json" };
  const key = getKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  let body;
  if (form !== undefined) {
    body = form; // the browser sets the multipart boundary
  } else if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, signal, cache: "no-store", credentials: "omit" });
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new ApiError(0, `Cannot reach the server (${err && err.message ? err.message : "network error"}).`);
  }
  if (!response.ok) {
    const error = await errorFromResponse(response);
    if (response.status === 401) onUnauthorized(error);
    throw error;
  }
  if (raw) return response;
  if (response.status === 204) return null;
  return response.json();
}

/**
 * Build an element. attrs: "class", "text" (textContent), "dataset" (object), "on<event>" handlers,
 * booleans as properties (hidden, disabled), anything else as an attribute. Children: nodes or
 * strings (added as text nodes), null/undefined/false skipped, arrays flattened.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "text") el.textContent = String(value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
}

/** Replace an element's children. */
export function replaceChildren(el, ...children) {
  el.replaceChildren();
  append(el, children);
}

/** Show a message in an error (role=alert) region, or hide it with an empty message. */
export function showError(region, message) {
  region.textContent = message || "";
  region.hidden = !message;
}

export function formatDate(value) {
  if (!value) return "";
  const date = new Date(value);
  if (Number.isNaN(date.getTime())) return String(value);
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

/**
 * The sign-in gate shared by both pages. `verify()` is called with the key in place and must throw
 * on a bad key; `onSignedIn()` then builds the page. A rejected key (401 at any time) signs out.
 */
export function setupAuth({ verify, onSignedIn }) {
  const signin = document.getElementById("signin");
  const form = document.getElementById("signin-form");
  const input = document.getElementById("api-key");
  const error = document.getElementById("signin-error");
  const workspace = document.getElementById("workspace");
  const session = document.getElementById("session");
  const signout = document.getElementById("signout");
  const submit = form.querySelector("button[type=submit]");

  function showSignin(message) {
    workspace.hidden = true;
    session.hidden = true;
    signin.hidden = false;
    showError(error, message);
    input.focus();
  }

  async function enter() {
    try {
      await verify();
    } catch (err) {
      clearKey();
      showSignin(err.status === 401 ? `Sign-in failed: ${err.message}` : err.message);
      return;
    }
    signin.hidden = true;
    showError(error, "");
    workspace.hidden = false;
    session.hidden = false;
    await onSignedIn();
  }

  setUnauthorizedHandler((err) => {
    if (!getKey()) return;
    clearKey();
    showSignin(`You have been signed out: ${err.message}`);
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) {
      showSignin("Enter an API key.");
      return;
    }
    input.value = "";
    setKey(key);
    submit.disabled = true;
    try {
      await enter();
    } finally {
      submit.disabled = false;
    }
  });

  signout.addEventListener("click", () => {
    clearKey();
    // A fresh page: nothing read while signed in stays in the DOM or in memory.
    window.location.replace(window.location.pathname);
  });

  if (getKey()) enter();
  else showSignin("");
}
