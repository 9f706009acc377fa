"""The web pages in a real headless Chromium (Playwright) against a real `enclave serve` process.

Chat: sign in, ask, watch the answer stream, open a cited passage, rate the answer, find and continue
the conversation. Admin: upload a document with access groups, see it listed and ingested, find it
from the chat page, remove it; create, use and revoke an API key; the audit chain status is shown.

The bundled model is tiny, so assertions are about structure (streamed text, sources, the passage
panel), never about the wording of answers. Needs Debian's `chromium` (or ENCLAVE_TEST_CHROMIUM) and
the `playwright` Python package; a missing browser fails the test, it does not skip it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path

import pytest

from tests.server_fixture import EnclaveServer, enclave_server  # noqa: F401  (session fixture)

CHROMIUM = os.environ.get("ENCLAVE_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# Bounds against hangs only (the machine is shared and slow); nothing here measures speed.
UI_TIMEOUT_MS = 120_000
ANSWER_TIMEOUT_MS = 600_000
MAX_TOKENS = "32"  # set through the page's "Max answer tokens" field: short answers, same code path

QUESTION = "How many days of paid annual leave do full-time employees get?"
FOLLOW_UP = "How many unused days can be carried over into the next year?"

UPLOAD_NAME = "zephyr-cafeteria.md"
UPLOAD_TEXT = """# Zephyr Lighthouse cafeteria <script>window.__xss = 1</script> 灯塔食堂

The Zephyr Lighthouse cafeteria serves blueberry pancakes every Thursday morning.
灯塔食堂每周四早上供应蓝莓煎饼。

Markup inside documents is only text: <img src="x" onerror="window.__xss = 2"> <b>not bold</b>
"""
UPLOAD_QUERY = "Which day does the Zephyr Lighthouse cafeteria serve blueberry pancakes?"


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium from the system (no browser downloads). Missing: a failure, not a skip."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the `playwright` Python package is missing: pip install playwright (in the test extra)")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"Chromium is required for the browser tests and was not found at {CHROMIUM}: install it "
                    "with `apt-get install -y chromium` (Debian) or point ENCLAVE_TEST_CHROMIUM at a Chromium binary")
    with sync_playwright() as p:
        try:
            chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Exception as exc:  # a broken install: say which binary and why
            pytest.fail(f"Chromium at {CHROMIUM} did not start: {exc}")
        yield chromium
        chromium.close()


def page_state(page) -> str:
    """What a person would see that explains a stuck step: the URL and every visible error or status."""
    try:
        shown = page.evaluate("""() => [...document.querySelectorAll('[role=alert], .error, [id$=-status]')]
            .filter((el) => !el.hidden && el.textContent.trim())
            .map((el) => `#${el.id || el.className}: ${el.textContent.trim()}`)""")
    except Exception as exc:  # the page may be gone
        return f"(page state unavailable: {exc})"
    return f"{page.url}\n" + ("\n".join(shown) or "(no error shown)")


@pytest.fixture
def page_factory(browser, tmp_path: Path, request):
    """New pages, each in its own context (own sessionStorage), with page errors collected.

    When the test fails, each page's visible errors and the server log's tail are printed, so a
    timeout in CI says which request failed rather than only which element never appeared."""
    contexts, errors, pages = [], [], []

    def new_page(width: int = 1400, height: int = 900):
        context = browser.new_context(viewport={"width": width, "height": height}, locale="en-US")
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("dialog", lambda dialog: dialog.accept())  # the confirm() before removing or revoking
        pages.append(page)
        return page

    yield new_page
    call = getattr(request.node, "report_call", None)
    if call is not None and call.failed:
        for number, page in enumerate(pages, 1):
            print(f"--- page {number}: {page_state(page)}")
        if "enclave_server" in request.fixturenames:
            print("--- server log tail:\n" + request.getfixturevalue("enclave_server").log_tail(6000))
    for context in contexts:
        context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


def api(server: EnclaveServer, path: str, key: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, headers={"Authorization": f"Bearer {key or server.admin_key}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def sign_in(page, server: EnclaveServer, path: str, key: str) -> None:
    page.goto(server.url + path)
    page.get_by_label("API key", exact=True).fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.locator("#workspace").wait_for(state="visible")
    assert key not in page.url


def ask(page, question: str):
    """Ask through the page; returns the new answer's locator once it is complete."""
    answers = page.locator("article.msg.assistant")
    before = answers.count()
    page.get_by_label("Question", exact=True).fill(question)
    page.get_by_role("button", name="Ask", exact=True).click()
    answer = answers.nth(before)
    answer.wait_for(state="attached")
    page.wait_for_function(
        "i => document.querySelectorAll('article.msg.assistant')[i]?.dataset.state !== 'streaming'",
        arg=before, timeout=ANSWER_TIMEOUT_MS)
    state = answer.get_attribute("data-state")
    assert state == "done", f"answer ended as {state!r}: {answer.inner_text()}\nerror: {page.locator('#error').inner_text()}"
    return answer


@pytest.mark.slow
def test_chat_answers_cites_highlights_rates_and_continues(browser, enclave_server: EnclaveServer, page_factory, tmp_path: Path):
    server = enclave_server
    page = page_factory()

    # Sign-in: a wrong key shows the API's message; the right one is kept in sessionStorage only.
    page.goto(server.url + "/")
    page.get_by_label("API key", exact=True).fill("enc_wrong_key")
    page.get_by_role("button", name="Sign in").click()
    error = page.locator("#signin-error")
    error.wait_for(state="visible")
    assert "invalid, expired or revoked API key" in error.inner_text()
    page.get_by_label("API key", exact=True).fill(server.admin_key)
    page.get_by_role("button", name="Sign in").click()
    page.locator("#workspace").wait_for(state="visible")
    assert server.admin_key not in page.url
    assert page.evaluate("sessionStorage.getItem('enclave.apiKey')") == server.admin_key
    assert page.evaluate("localStorage.length") == 0

    # An API error is shown with the API's own message (the server caps max_tokens at 512).
    page.get_by_label("Knowledge base", exact=True).select_option("default")
    page.get_by_label("Max answer tokens").fill("5000")
    page.get_by_label("Question", exact=True).fill(QUESTION)
    page.get_by_role("button", name="Ask", exact=True).click()
    page.locator("#error", has_text="max_tokens may be at most").wait_for()
    assert page.locator("article.msg.assistant").get_attribute("data-state") == "error"
    page.get_by_role("button", name="New conversation").click()
    assert page.locator("#error").is_hidden() and page.locator("#thread article").count() == 0

    # Ask: the answer states the policy's figure, says how it was made, and lists its sources.
    # (Under the default verify policy it arrives a checked sentence at a time, or as a quote at
    # once: incremental streaming itself is covered through the API in test_api.py.)
    page.get_by_label("Max answer tokens").fill(MAX_TOKENS)
    answer = ask(page, QUESTION)
    assert "22 days" in answer.locator(".answer").inner_text()
    assert "Done" in answer.locator(".status").inner_text()
    mode = answer.locator("[data-role='answer-mode']")
    assert mode.inner_text() in ("Checked against the sources", "Quoted from the sources")
    assert answer.get_attribute("data-grounded") == "true"
    sources = answer.locator(".sources .source-link")
    assert sources.count() >= 1
    assert any("leave-policy.md" in sources.nth(i).inner_text() for i in range(sources.count()))

    # The cited passage: a [n] citation in the answer when the model wrote one, else the sources list.
    leave_index = next(i for i in range(sources.count()) if "leave-policy.md" in sources.nth(i).inner_text())
    number = sources.nth(leave_index).get_attribute("data-index")
    citation = answer.locator(f".answer .cite[data-index='{number}']")
    (citation.first if citation.count() else sources.nth(leave_index)).click()
    panel = page.locator("#citation-panel")
    panel.wait_for(state="visible")
    assert page.locator("#citation-source").inner_text() == "leave-policy.md"
    assert "leave" in page.locator("#citation-snippet").inner_text().lower()
    # The sentence that supports the answer is highlighted in the passage.
    assert "22 days" in page.locator("#citation-snippet mark.quote").first.inner_text()
    assert page.locator("#citation-title").inner_text().startswith("Leave Policy")
    page.screenshot(path=str(tmp_path / "chat-answer.png"), full_page=True)

    # Rate it, with a correction; the feedback row is in the database.
    answer.get_by_role("button", name="Helpful", exact=True).click()
    answer.get_by_label("Correction (optional)").fill("Full-time employees get 22 days of paid annual leave.")
    answer.get_by_role("button", name="Send feedback").click()
    answer.locator(".feedback-status", has_text="recorded as helpful").wait_for()
    with closing(sqlite3.connect(server.data_dir / "enclave.db")) as db:  # another process, as a CLI would be
        rows = db.execute("SELECT completion_id, rating, correction FROM app_feedback").fetchall()
    assert len(rows) == 1 and rows[0][1] == 1 and rows[0][2].startswith("Full-time employees get 22 days")
    completion_id = rows[0][0]

    # The conversation is listed (and current); a follow-up continues it instead of starting another.
    listed = page.locator("#conversation-list button.conversation", has_text=QUESTION[:40])
    listed.first.wait_for()
    assert listed.count() == 1 and listed.first.get_attribute("aria-current") == "true"
    ask(page, FOLLOW_UP)
    status, conversations = api(server, "/v1/conversations")
    assert status == 200 and len(conversations["data"]) == 1
    conversation_id = conversations["data"][0]["id"]
    status, detail = api(server, f"/v1/conversations/{conversation_id}")
    assert [m["role"] for m in detail["messages"]] == ["user", "assistant", "user", "assistant"]
    assert detail["messages"][1]["completion_id"] == completion_id
    assert page.locator("#conversation-list button.conversation").count() == 1

    # Browse: a new conversation empties the thread; opening the listed one restores it with sources.
    page.get_by_role("button", name="New conversation").click()
    assert page.locator("#thread article").count() == 0
    assert page.locator("#conversation-state").inner_text() == "New conversation"
    listed.first.click()
    page.locator("#thread article.msg.assistant").nth(1).wait_for()
    assert page.locator("#thread article.msg.user").count() == 2
    restored = page.locator("#thread article.msg.assistant").first
    assert restored.locator(".answer").inner_text().strip()
    restored.locator(".source-link", has_text="leave-policy.md").first.click()
    assert page.locator("#citation-source").inner_text() == "leave-policy.md"
    page.screenshot(path=str(tmp_path / "chat-conversation.png"), full_page=True)

    # Narrow screens: one column, nothing wider than the viewport.
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(tmp_path / "chat-mobile.png"))

    # Sign out: the key is forgotten and the sign-in form is back.
    page.set_viewport_size({"width": 1400, "height": 900})
    page.get_by_role("button", name="Sign out").click()
    page.locator("#signin").wait_for(state="visible")
    assert page.evaluate("sessionStorage.getItem('enclave.apiKey')") is None
    assert page.locator("#workspace").is_hidden()


@pytest.mark.slow
def test_admin_upload_find_remove_and_keys(browser, enclave_server: EnclaveServer, page_factory, tmp_path: Path):
    server = enclave_server
    page = page_factory()
    sign_in(page, server, "/admin", server.admin_key)

    # Knowledge bases, ingestion runs, the audit chain (verified: the pill says yes).
    page.locator("#kb-table tbody tr[data-kb='default']").wait_for()
    page.locator("#runs-table tbody tr").first.wait_for()
    assert "finished" in page.locator("#runs-table tbody").inner_text()
    page.locator("#audit-body dt", has_text="verified").wait_for()
    assert page.locator("#audit-body .status-pill.ok").first.inner_text() == "yes"
    # The sections load in parallel: wait for the document table rather than assume it came first.
    sample = page.locator("#doc-table tbody tr[data-source='leave-policy.md']")
    sample.wait_for()
    assert sample.count() == 1

    # Upload a document with access groups; it is ingested and listed.
    page.get_by_label("Knowledge base", exact=True).select_option("default")
    page.locator("#upload-file").set_input_files(
        files=[{"name": UPLOAD_NAME, "mimeType": "text/markdown", "buffer": UPLOAD_TEXT.encode()}])
    page.locator("#upload-groups").fill("staff, managers")
    page.get_by_role("button", name="Upload and ingest").click()
    page.locator("#doc-status", has_text=f"Added {UPLOAD_NAME}").wait_for()
    row = page.locator(f"#doc-table tbody tr[data-source='{UPLOAD_NAME}']")
    row.wait_for()
    cells = row.locator("td")
    assert set(cells.nth(4).inner_text().split(", ")) == {"staff", "managers"}
    assert int(cells.nth(5).inner_text()) >= 1
    assert "灯塔食堂" in cells.nth(2).inner_text()  # Chinese title, as text
    assert "<script>" in cells.nth(2).inner_text()  # markup in a title is shown, never run
    page.locator("#runs-table tbody", has_text="uploads").wait_for()
    page.screenshot(path=str(tmp_path / "admin.png"), full_page=True)

    # API keys: create one (shown once), it works but is no admin; revoke it, it stops working.
    page.locator("#key-name").fill("web-user")
    page.locator("#key-role").select_option("user")
    page.locator("#key-groups").fill("hr")
    page.get_by_role("button", name="Create key").click()
    page.locator("#new-key").wait_for(state="visible")
    user_key = page.locator("#new-key-value").inner_text().strip()
    assert user_key.startswith("enc_")
    key_row = page.locator("#keys-table tbody tr", has_text="web-user")
    key_row.wait_for()
    assert "active" in key_row.inner_text() and "hr" in key_row.inner_text()
    page.get_by_role("button", name="I have saved it").click()
    assert page.locator("#new-key").is_hidden() and user_key not in page.content()

    other = page_factory()
    sign_in(other, server, "/admin", user_key)
    notice = other.locator("#role-notice")
    notice.wait_for(state="visible")
    assert "not an administrator key" in notice.inner_text()

    with page.expect_response(lambda r: r.request.method == "DELETE" and "/v1/keys/" in r.url) as revoked:
        key_row.get_by_role("button", name="Revoke").click()
    assert revoked.value.status == 200, revoked.value.text()
    key_row.locator(".status-pill", has_text="revoked").wait_for()
    assert api(server, "/v1/knowledge_bases", user_key)[0] == 401

    # Find the uploaded document from the chat page (same tab: still signed in).
    page.goto(server.url + "/")
    page.locator("#workspace").wait_for(state="visible")
    page.get_by_label("Knowledge base", exact=True).select_option("default")
    page.get_by_label("Question", exact=True).fill(UPLOAD_QUERY)
    page.get_by_role("button", name="Search documents").click()
    result = page.locator("article.msg.search[data-state='done']")
    result.wait_for()
    found = result.locator(".source-link", has_text=UPLOAD_NAME)
    assert found.count() >= 1, result.inner_text()
    found.first.click()
    assert page.locator("#citation-source").inner_text() == UPLOAD_NAME
    passage = page.locator("#citation-snippet").inner_text()
    assert "blueberry pancakes every Thursday" in passage
    assert "<img" in passage and "<b>not bold</b>" in passage  # shown as text
    assert page.locator("#citation-panel img, #citation-panel b, #thread script, #thread img").count() == 0
    assert page.evaluate("window.__xss") is None
    page.screenshot(path=str(tmp_path / "chat-found-upload.png"), full_page=True)

    # Remove it on the admin page; it is gone from the list and from search.
    page.goto(server.url + "/admin")
    row = page.locator(f"#doc-table tbody tr[data-source='{UPLOAD_NAME}']")
    row.wait_for()
    row.get_by_role("button", name=f"Remove {UPLOAD_NAME}").click()
    page.locator("#doc-status", has_text=f"Removed {UPLOAD_NAME}").wait_for()
    row.wait_for(state="detached")
    request = urllib.request.Request(
        server.url + "/v1/search", method="POST",
        data=json.dumps({"query": UPLOAD_QUERY, "knowledge_base": "default", "top_k": 10}).encode(),
        headers={"Authorization": f"Bearer {server.admin_key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert all(hit["source"] != UPLOAD_NAME for hit in json.loads(response.read())["results"])
