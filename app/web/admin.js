// The administration page: knowledge bases, documents (upload with access groups, list, remove),
// ingestion runs, API keys (create, shown once; list; revoke) and the audit-chain status.

import { api, formatDate, h, replaceChildren, setupAuth, showError } from "./common.js";

const $ = (id) => document.getElementById(id);
const KB_STORAGE = "enclave.admin.kb";

let knowledgeBases = [];

setupAuth({
  verify: async () => {
    knowledgeBases = (await api("/v1/knowledge_bases")).data;
  },
  onSignedIn: async () => {
    renderKnowledgeBases();
    await Promise.all([loadDocuments(), loadRuns(), loadKeys(), loadAudit()]);
  },
});

/** Run an action with its button disabled; show its error (the API's message) in `errorRegion`. */
async function guarded(button, errorRegion, action) {
  showError(errorRegion, "");
  if (button) button.disabled = true;
  try {
    return await action();
  } catch (err) {
    showError(errorRegion, err.message);
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

function pill(text, kind = text) {
  return h("span", { class: `status-pill ${kind}` }, text);
}

function emptyRow(columns, text) {
  return h("tr", {}, h("td", { colspan: columns, class: "muted" }, text));
}

// --- knowledge bases -----------------------------------------------------------------------------

async function loadKnowledgeBases() {
  await guarded($("kb-refresh"), $("kb-error"), async () => {
    knowledgeBases = (await api("/v1/knowledge_bases")).data;
    renderKnowledgeBases();
  });
}

function renderKnowledgeBases() {
  const count = (value) => (value === undefined || value === null ? "—" : String(value));
  const rows = knowledgeBases.map((kb) =>
    h("tr", { dataset: { kb: kb.name } },
      h("td", {}, kb.name),
      h("td", { class: "num" }, count(kb.documents)),
      h("td", { class: "num" }, count(kb.chunks)),
      h("td", { class: "num" }, count(kb.index_version)),
      h("td", {}, h("button", {
        type: "button", class: "danger small", "aria-label": `Delete knowledge base ${kb.name}`,
        onclick: (event) => deleteKnowledgeBase(kb, event.currentTarget),
      }, "Delete"))));
  replaceChildren($("kb-table").tBodies[0], rows.length ? rows : emptyRow(5, "No knowledge bases yet."));

  // The documents section's selector follows the list, keeping the current choice.
  const select = $("doc-kb");
  const current = select.value || sessionStorage.getItem(KB_STORAGE);
  const names = knowledgeBases.map((kb) => kb.name);
  replaceChildren(select, names.map((name) => h("option", { value: name }, name)));
  if (current && names.includes(current)) select.value = current;
  else if (names.includes("default")) select.value = "default";
}

$("kb-refresh").addEventListener("click", loadKnowledgeBases);

$("kb-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("kb-name");
  const name = input.value.trim();
  if (!name) return;
  const button = event.currentTarget.querySelector("button[type=submit]");
  await guarded(button, $("kb-error"), async () => {
    await api("/v1/knowledge_bases", { method: "POST", json: { name } });
    input.value = "";
    $("kb-status").textContent = `Knowledge base ${name} created.`;
    await loadKnowledgeBases();
  });
});

async function deleteKnowledgeBase(kb, button) {
  const documents = kb.documents === undefined ? "" : ` and its ${kb.documents} document(s)`;
  if (!window.confirm(`Delete the knowledge base “${kb.name}”${documents}? This cannot be undone.`)) return;
  await guarded(button, $("kb-error"), async () => {
    await api(`/v1/knowledge_bases/${encodeURIComponent(kb.name)}`, { method: "DELETE" });
    $("kb-status").textContent = `Knowledge base ${kb.name} deleted.`;
    await loadKnowledgeBases();
    await loadDocuments();
  });
}

// --- documents -----------------------------------------------------------------------------------

async function loadDocuments() {
  const kb = $("doc-kb").value;
  const body = $("doc-table").tBodies[0];
  if (!kb) {
    replaceChildren(body, emptyRow(8, "Create a knowledge base first."));
    return;
  }
  await guarded($("doc-refresh"), $("doc-error"), async () => {
    const docs = (await api(`/v1/knowledge_bases/${encodeURIComponent(kb)}/documents`)).data;
    const rows = docs.map((doc) =>
      h("tr", { dataset: { id: doc.id, source: doc.source } },
        h("td", { class: "num" }, String(doc.id)),
        h("td", { class: "mono" }, doc.source),
        h("td", {}, doc.title || ""),
        h("td", {}, doc.file_type || ""),
        h("td", {}, (doc.groups || []).join(", ")),
        h("td", { class: "num" }, String(doc.chunks)),
        h("td", {}, formatDate(doc.ingested_at)),
        h("td", {}, h("button", {
          type: "button", class: "danger small", "aria-label": `Remove ${doc.source}`,
          onclick: (event) => removeDocument(kb, doc, event.currentTarget),
        }, "Remove"))));
    replaceChildren(body, rows.length ? rows : emptyRow(8, "No documents in this knowledge base."));
  });
}

$("doc-kb").addEventListener("change", () => {
  sessionStorage.setItem(KB_STORAGE, $("doc-kb").value);
  $("doc-status").textContent = "";
  loadDocuments();
});
$("doc-refresh").addEventListener("click", loadDocuments);

async function removeDocument(kb, doc, button) {
  if (!window.confirm(`Remove “${doc.source}” from ${kb}? Its passages stop being searchable at once.`)) return;
  await guarded(button, $("doc-error"), async () => {
    await api(`/v1/knowledge_bases/${encodeURIComponent(kb)}/documents/${encodeURIComponent(doc.id)}`, { method: "DELETE" });
    $("doc-status").textContent = `Removed ${doc.source}.`;
    await Promise.all([loadDocuments(), loadKnowledgeBases()]);
  });
}

$("upload-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const kb = $("doc-kb").value;
  const fileInput = $("upload-file");
  const file = fileInput.files[0];
  if (!kb) {
    showError($("doc-error"), "Create a knowledge base first.");
    return;
  }
  if (!file) {
    showError($("doc-error"), "Choose a file to upload.");
    return;
  }
  const groups = $("upload-groups").value.split(",").map((g) => g.trim()).filter(Boolean);
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("groups", groups.join(","));
  const status = $("doc-status");
  status.textContent = `Uploading and ingesting ${file.name}…`;
  const result = await guarded($("upload-button"), $("doc-error"), () =>
    api(`/v1/knowledge_bases/${encodeURIComponent(kb)}/documents`, { method: "POST", form }));
  if (!result) {
    status.textContent = "";
    return;
  }
  const verb = result.added ? "Added" : result.updated ? "Updated" : "Unchanged:";
  status.textContent = `${verb} ${result.source} in ${kb}: ${result.chunks} passage(s), groups ${result.groups.join(", ")}.`;
  fileInput.value = "";
  await Promise.all([loadDocuments(), loadKnowledgeBases(), loadRuns()]);
});

// --- ingestion runs ------------------------------------------------------------------------------

function runSummary(report) {
  if (!report) return "";
  const parts = ["added", "updated", "unchanged", "deleted", "failed", "skipped"]
    .filter((k) => typeof report[k] === "number" && (report[k] > 0 || k === "added"))
    .map((k) => `${k} ${report[k]}`);
  if (typeof report.total_chunks === "number") parts.push(`${report.total_chunks} chunks in total`);
  if (typeof report.seconds === "number") parts.push(`${report.seconds.toFixed(1)} s`);
  return parts.join(" · ");
}

async function loadRuns() {
  await guarded($("runs-refresh"), $("runs-error"), async () => {
    const runs = (await api("/v1/ingest/runs")).data;
    const rows = runs.map((run) => {
      const failures = (run.report && run.report.failures) || [];
      return h("tr", { dataset: { id: run.id } },
        h("td", { class: "num" }, String(run.id)),
        h("td", {}, run.kb),
        h("td", { class: "mono" }, run.root),
        h("td", {}, pill(run.status)),
        h("td", {}, formatDate(run.started_at)),
        h("td", {}, formatDate(run.finished_at)),
        h("td", {}, runSummary(run.report),
          failures.length ? h("details", {},
            h("summary", {}, `${failures.length} file(s) failed`),
            h("ul", {}, failures.map((f) =>
              h("li", {}, `${f.path || f.source || f.file || "?"}: ${f.reason || f.error || JSON.stringify(f)}`)))) : null));
    });
    replaceChildren($("runs-table").tBodies[0], rows.length ? rows : emptyRow(7, "No ingestion runs yet."));
  });
}

$("runs-refresh").addEventListener("click", loadRuns);

// --- API keys ------------------------------------------------------------------------------------

async function loadKeys() {
  await guarded($("keys-refresh"), $("keys-error"), async () => {
    let keys;
    try {
      keys = (await api("/v1/keys")).data;
    } catch (err) {
      if (err.status === 403) {
        showError($("role-notice"), `This key is not an administrator key (${err.message}). Sign in with an admin key to manage Enclave; the chat page works with this one.`);
      }
      throw err;
    }
    showError($("role-notice"), "");
    const rows = keys.map((key) => {
      const state = key.revoked_at ? "revoked" : key.active ? "active" : "expired";
      return h("tr", { dataset: { id: key.id } },
        h("td", { class: "mono" }, key.id),
        h("td", {}, key.name),
        h("td", {}, key.role),
        h("td", {}, (key.groups || []).join(", ")),
        h("td", {}, key.knowledge_base || "all"),
        h("td", {}, pill(state)),
        h("td", {}, formatDate(key.created_at)),
        h("td", {}, key.expires_at ? formatDate(key.expires_at) : "never"),
        h("td", {}, state === "revoked" ? null : h("button", {
          type: "button", class: "danger small", "aria-label": `Revoke key ${key.name} (${key.id})`,
          onclick: (event) => revokeKey(key, event.currentTarget),
        }, "Revoke")));
    });
    replaceChildren($("keys-table").tBodies[0], rows.length ? rows : emptyRow(9, "No API keys."));
  });
}

$("keys-refresh").addEventListener("click", loadKeys);

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  const name = $("key-name").value.trim();
  if (!name) return;
  const expires = $("key-expires").value.trim();
  const body = {
    name,
    role: $("key-role").value,
    groups: $("key-groups").value.split(",").map((g) => g.trim()).filter(Boolean),
    knowledge_base: $("key-kb").value.trim() || null,
    expires_days: expires ? Number(expires) : null,
  };
  const button = form.querySelector("button[type=submit]");
  const created = await guarded(button, $("keys-error"), () => api("/v1/keys", { method: "POST", json: body }));
  if (!created) return;
  $("new-key-name").textContent = `${created.name} (${created.role}, id ${created.id})`;
  $("new-key-value").textContent = created.key;
  $("copy-status").textContent = "";
  $("new-key").hidden = false;
  form.reset();
  await loadKeys();
});

$("copy-key").addEventListener("click", async () => {
  const value = $("new-key-value").textContent;
  try {
    await navigator.clipboard.writeText(value);
    $("copy-status").textContent = "Copied.";
  } catch {
    const range = document.createRange();
    range.selectNodeContents($("new-key-value"));
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    $("copy-status").textContent = "Selected: press Ctrl+C (⌘C) to copy.";
  }
});

$("hide-key").addEventListener("click", () => {
  $("new-key-value").textContent = "";
  $("new-key").hidden = true;
});

async function revokeKey(key, button) {
  if (!window.confirm(`Revoke the key “${key.name}” (${key.id})? Programs using it stop working at once.`)) return;
  await guarded(button, $("keys-error"), async () => {
    await api(`/v1/keys/${encodeURIComponent(key.id)}`, { method: "DELETE" });
    await loadKeys();
  });
}

// --- audit chain ---------------------------------------------------------------------------------

function auditValue(value) {
  if (typeof value === "boolean") return pill(value ? "yes" : "no", value ? "ok" : "broken");
  if (value === null || value === undefined) return "—";
  if (typeof value === "object") return h("code", { class: "mono" }, JSON.stringify(value));
  return String(value);
}

async function loadAudit() {
  const body = $("audit-body");
  const button = $("audit-refresh");
  button.disabled = true;
  try {
    const status = await api("/v1/admin/audit/status");
    const entries = Object.entries(status || {});
    replaceChildren(body, entries.length
      ? h("dl", { class: "kv" }, entries.map(([k, v]) => [h("dt", {}, k.replace(/_/g, " ")), h("dd", {}, auditValue(v))]))
      : h("p", { class: "muted" }, "The server returned an empty status."));
  } catch (err) {
    if (err.status === 404) {
      replaceChildren(body, h("p", { class: "muted", dataset: { state: "unavailable" } },
        "Audit-chain status is not available on this server."));
    } else {
      replaceChildren(body, h("p", { class: "error", role: "alert" }, `Audit status could not be read: ${err.message}`));
    }
  } finally {
    button.disabled = false;
  }
}

$("audit-refresh").addEventListener("click", loadAudit);
