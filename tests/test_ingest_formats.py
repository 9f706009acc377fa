"""The new formats through the real pipeline and service: workbooks, decks, e-mails with
attachments, scanned PDFs and images are ingested, found by /v1/search with their pages, kept
incrementally (a scanned PDF is OCR'd once), and an e-mail's attachments follow the e-mail."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.api.app import create_app
from app.container import Container
from app.settings import Settings
from ingest.chunking import Chunker
from ingest.pipeline import IngestPipeline
from retrieval.store import KnowledgeBaseStore
from app.db import make_engine, upgrade
from tests.conftest import MemoEmbedder
from tests.scan_fixtures import CHINESE_LINES, ENGLISH_LINES, png_bytes, render_page, scanned_pdf
from tests.test_office_formats import docx_bytes, make_deck, make_mail, make_workbook

needs_tesseract = pytest.mark.skipif(
    shutil.which("tesseract") is None, reason="tesseract missing: run scripts/ensure-ocr.sh (make test does)"
)


class RecordingProgress:
    """Remembers the order of progress events: ("file", n) advances and ("note", text) notes."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def start(self, total_files: int) -> None:
        self.events.append(("start", total_files))

    def advance(self, files: int = 0, chunks: int = 0) -> None:
        self.events.append(("file", files))

    def note(self, text: str) -> None:
        self.events.append(("note", text))

    def finish(self) -> None:
        self.events.append(("finish", None))


def build_corpus(root: Path) -> Path:
    root.mkdir()
    (root / "readme.txt").write_text("Welcome to the operations folder.\n", encoding="utf-8")
    make_workbook(root / "price-list.xlsx")
    make_deck(root / "onboarding.pptx")
    (root / "mail").mkdir()
    make_mail(root / "mail" / "renewal.eml", attachments={
        "terms.docx": docx_bytes("The late delivery penalty is 4 percent per week."),
    })
    (root / "mail" / ".enclave-acl.yaml").write_text("rules:\n  - pattern: '**'\n    groups: [procurement]\n")
    scanned_pdf(root / "warehouse-rules.pdf", [render_page(ENGLISH_LINES)])
    scanned_pdf(root / "仓库规程.pdf", ["Cover page with a text layer: warehouse rules, Chinese edition.",
                                       render_page(CHINESE_LINES, cjk=True)])
    (root / "notice.png").write_bytes(png_bytes(render_page(["Fire drill on Thursday at 10:00 in Hall B."])))
    return root


@needs_tesseract
def test_new_formats_found_by_search_through_the_real_pipeline(tmp_path: Path, models_dir: Path):
    corpus = build_corpus(tmp_path / "ops")
    container = Container(Settings(data_dir=tmp_path / "var", models_dir=models_dir))
    progress = RecordingProgress()
    report = container.pipeline.run(corpus, "default", progress=progress)
    assert report.failures == [] and report.skipped_files == []
    assert report.added == 7  # the attachment is a document of its own, not a file of the folder

    # OCR waits until every other file is stored: the last plain file finishes before the first
    # OCR note, and each scanned page is announced.
    notes = [i for i, (kind, text) in enumerate(progress.events) if kind == "note" and text]
    files = [i for i, (kind, _) in enumerate(progress.events) if kind == "file"]
    assert len(files) == 7 and sum(1 for i in files if i < notes[0]) == 4
    assert ("note", "OCR 仓库规程.pdf page 1/1") in progress.events

    documents = {d.source: d for d in container.kb_store.documents("default")}
    assert documents["mail/renewal.eml#terms.docx"].file_type == "docx"
    assert documents["mail/renewal.eml#terms.docx"].groups == documents["mail/renewal.eml"].groups == '["procurement"]'

    admin = container.api_keys.create("admin", "admin")[0]
    buyer = container.api_keys.create("buyer", "user", ["procurement"])[0]
    staff = container.api_keys.create("staff", "user", [])[0]
    client = TestClient(create_app(container), client=("127.0.0.1", 40000))

    def search(key: str, query: str) -> list[dict]:
        response = client.post("/v1/search", headers={"Authorization": f"Bearer {key}"},
                               json={"query": query, "top_k": 3})
        assert response.status_code == 200, response.text
        return response.json()["results"]

    top = search(staff, "price of Widget X")[0]
    assert top["source"] == "price-list.xlsx" and "Product: Widget X | Price: 12.50" in top["text"]
    top = search(staff, "shift hours late shift")[0]
    assert (top["source"], top["page"]) == ("onboarding.pptx", 2)
    top = search(staff, "forklift licence renewal months")[0]
    assert (top["source"], top["page"]) == ("warehouse-rules.pdf", 1) and "every 24 months" in top["text"]
    top = search(staff, "液压油泄漏报告谁")[0]
    assert (top["source"], top["page"]) == ("仓库规程.pdf", 2)
    assert search(staff, "fire drill Thursday hall")[0]["source"] == "notice.png"
    # The attachment is found, with the e-mail's groups: only procurement reads it.
    assert search(buyer, "late delivery penalty percent per week")[0]["source"] == "mail/renewal.eml#terms.docx"
    assert all(r["source"].startswith("mail/") is False for r in search(staff, "late delivery penalty percent"))

    # An unchanged run reads nothing: no OCR, no embedding.
    progress = RecordingProgress()
    again = container.pipeline.run(corpus, "default", progress=progress)
    assert (again.unchanged, again.chunks, again.added, again.updated) == (7, 0, 0, 0)
    assert not [e for e in progress.events if e[0] == "note" and e[1]]

    # The upload API takes the new types.
    up = client.post("/v1/knowledge_bases/default/documents", headers={"Authorization": f"Bearer {admin}"},
                     files={"file": ("deck.pptx", (corpus / "onboarding.pptx").read_bytes())})
    assert up.status_code == 201, up.text

    # A scan uploaded while OCR is off is refused with the reason, and nothing is kept.
    container.pipeline.loader_options = replace(container.pipeline.loader_options, ocr=False)
    scan = client.post("/v1/knowledge_bases/default/documents", headers={"Authorization": f"Bearer {admin}"},
                       files={"file": ("late-scan.png", (corpus / "notice.png").read_bytes())})
    assert scan.status_code == 422 and scan.json()["error"]["code"] == "document_skipped", scan.text
    assert "OCR" in scan.json()["error"]["message"]
    assert not list((tmp_path / "var" / "uploads" / "default").glob("late-scan*"))


@pytest.fixture
def pipeline(tmp_path: Path, memo_embedder: MemoEmbedder) -> IngestPipeline:
    url = f"sqlite:///{tmp_path / 'enclave.db'}"
    upgrade(make_engine(url))
    store = KnowledgeBaseStore(make_engine(url), tmp_path / "indexes", memo_embedder.name, memo_embedder.dimension)
    return IngestPipeline(store, memo_embedder, Chunker(400, 80), default_groups=["everyone"], batch_files=2)


def sources(pipeline: IngestPipeline) -> dict[str, str]:
    return {d.source: d.groups for d in pipeline.store.documents("kb")}


def test_attachments_follow_their_email(tmp_path: Path, pipeline: IngestPipeline):
    root = tmp_path / "inbox"
    root.mkdir()
    mail = make_mail(root / "renewal.eml", attachments={
        "terms.docx": docx_bytes("The late delivery penalty is 4 percent per week."),
        "prices.txt": b"Unit price 12.50 EUR.",
        "broken.pdf": b"%PDF-1.4 broken",
    })
    report = pipeline.run(root, "kb", ["buyers"])
    assert sources(pipeline) == {"renewal.eml": '["buyers"]', "renewal.eml#terms.docx": '["buyers"]',
                                 "renewal.eml#prices.txt": '["buyers"]'}
    assert [(f.source, f.reason.split(":")[0]) for f in report.failures] == [("renewal.eml#broken.pdf", "corrupt PDF")]

    # New groups reach the attachments without re-reading anything.
    report = pipeline.run(root, "kb", ["buyers", "legal"])
    assert report.updated == 1 and report.chunks == 0
    assert set(sources(pipeline).values()) == {'["buyers", "legal"]'}

    # A new version of the e-mail without one attachment drops that attachment's document.
    make_mail(mail, attachments={"terms.docx": docx_bytes("The penalty is now 5 percent per week.")})
    pipeline.run(root, "kb", ["buyers"])
    assert set(sources(pipeline)) == {"renewal.eml", "renewal.eml#terms.docx"}

    # A version that cannot be read keeps the stored message and its attachments.
    good = mail.read_bytes()
    mail.write_bytes(b"")
    report = pipeline.run(root, "kb", ["buyers"])
    assert [f.source for f in report.failures] == ["renewal.eml"]
    assert set(sources(pipeline)) == {"renewal.eml", "renewal.eml#terms.docx"}
    mail.write_bytes(good)

    # Removing the message by path removes its attachments; so does deleting the file.
    assert {d.source for d in pipeline.remove("kb", str(mail))} == {"renewal.eml", "renewal.eml#terms.docx"}
    pipeline.run(root, "kb", ["buyers"])
    assert len(sources(pipeline)) == 2
    mail.unlink()
    report = pipeline.run(root, "kb", ["buyers"])
    assert report.deleted == 1 and sources(pipeline) == {}


def test_ocr_switched_off_reports_skipped_files(tmp_path: Path, pipeline: IngestPipeline):

    root = tmp_path / "scans"
    root.mkdir()
    scanned_pdf(root / "scan.pdf", [render_page(ENGLISH_LINES)])
    (root / "note.txt").write_text("A note with text.", encoding="utf-8")
    pipeline.loader_options = replace(pipeline.loader_options, ocr=False)
    report = pipeline.run(root, "kb")
    assert [(s.source, s.reason) for s in report.skipped_files] == [
        ("scan.pdf", "scanned PDF: needs OCR, which is switched off (ingest.ocr)")
    ]
    assert report.added == 1 and report.failed == 0
    assert set(sources(pipeline)) == {"note.txt"}
