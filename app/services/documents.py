"""Knowledge bases and their documents: create and delete knowledge bases, ingest a folder, reindex,
list and remove documents; audited like every change.

The CLI (`ingest run`, `ingest reindex`, `ingest remove`) calls this service with the operator as actor; the admin
API calls it with the signed-in administrator, so both write the same records.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from app.services.audit import Actor, AuditService
from app.services.operations import audited
from app.uploads import Uploads, skipped
from ingest.loaders import file_type_for
from ingest.pipeline import IngestPipeline, IngestReport, Progress
from ingest.reindex import reindex
from retrieval.store import KnowledgeBaseStore, StoredDocument


class DocumentNotFound(LookupError):
    """No document matches the target."""

    http_status = 404
    error_code = "document_not_found"


class UploadRefused(ValueError):
    """An uploaded file that is not ingested; it carries its HTTP status and error code."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.http_status, self.error_code, self.param = status, code, "file"


# File systems allow 255 bytes per name; the rest is room for the temporary name of an upload in progress.
MAX_NAME_BYTES = 200
UPLOAD_TYPES = ".txt .md .rst .html .pdf .docx .csv .xlsx .xlsm .pptx .eml .png .jpg .jpeg .tif .tiff"


class DocumentService:
    def __init__(self, pipeline: IngestPipeline, store: KnowledgeBaseStore, audit: AuditService,
                 default_kb: str, max_file_mb: float, forget: Callable[[str], None] = lambda kb: None):
        self.pipeline = pipeline
        self.store = store
        self.audit = audit
        self.default_kb = default_kb
        self.max_file_bytes = int(max_file_mb * 1024 * 1024)
        self.forget = forget  # drops a deleted knowledge base's cached search snapshot

    def create_kb(self, actor: Actor, name: str) -> None:
        with audited(self.audit, actor, "kb.create", knowledge_base=name):
            self.store.ensure_kb(name)

    def delete_kb(self, actor: Actor, name: str) -> None:
        with audited(self.audit, actor, "kb.delete", knowledge_base=name):
            self.store.get_kb(name)  # KnowledgeBaseNotFound: 404
            self.store.delete_kb(name)
            self.forget(name)

    def list_documents(self, actor: Actor, kb: str) -> list[StoredDocument]:
        with audited(self.audit, actor, "document.list", intent=False, knowledge_base=kb):
            self.store.get_kb(kb)
            return self.store.documents(kb)

    def ingest_runs(self, actor: Actor, limit: int = 20) -> list[dict]:
        with audited(self.audit, actor, "ingest.runs", intent=False):
            return self.store.recent_runs(limit)

    def ingest(self, actor: Actor, path: Path, kb: str | None = None, groups: list[str] | None = None, *,
               delete_missing: bool = True, progress: Progress | None = None) -> IngestReport:
        kb = kb or self.default_kb
        where = f"path {Path(path).expanduser().resolve()}"
        with audited(self.audit, actor, "ingest.run", knowledge_base=kb, detail=where) as op:
            report = self.pipeline.run(path, kb, groups, delete_missing=delete_missing, progress=progress)
            op.update(detail=(f"{where}; added {report.added}, updated {report.updated}, deleted "
                              f"{report.deleted}, failed {report.failed}, skipped {report.skipped}"))
        return report

    def upload(self, actor: Actor, kb: str, filename: str, data: bytes, groups: list[str] | None,
               uploads: Uploads) -> tuple[StoredDocument, IngestReport]:
        """Store one uploaded file and ingest it. The file is written under a temporary name and
        swapped in only once ingested (app/uploads.py): a file that fails or is skipped leaves the
        stored file of that name, and its document, as they were."""
        with audited(self.audit, actor, "document.upload", knowledge_base=kb, detail=f"file {filename}") as op:
            if not filename or file_type_for(Path(filename)) is None:
                raise UploadRefused(415, "unsupported_file_type",
                                    f"unsupported or missing file name; supported: {UPLOAD_TYPES}")
            if len(filename.encode()) > MAX_NAME_BYTES:
                raise UploadRefused(400, "invalid_file_name", f"file name too long: at most {MAX_NAME_BYTES} bytes (UTF-8)")
            if len(data) > self.max_file_bytes:  # the one file-size limit, as for `ingest run`
                raise UploadRefused(413, "file_too_large",
                                    f"files may be at most {self.max_file_bytes / 1024 / 1024:g} MiB (ingest.max_file_mb)")
            self.store.ensure_kb(kb)
            target, report = uploads.store(kb, filename, data, groups)
            if report.failed:
                raise UploadRefused(400, "unreadable_document", f"{filename}: {report.failures[0].reason}")
            if (left := skipped(report, filename)) is not None:  # e.g. a scanned PDF while OCR is off
                raise UploadRefused(422, "document_skipped", f"{filename}: not ingested: {left.reason}")
            doc = next(d for d in self.store.documents(kb, str(target.parent)) if d.source == filename)
            op.update(detail=f"file {filename}; document {doc.id}; sha256 {doc.content_hash}; groups {doc.groups}")
        return doc, report

    def reindex(self, actor: Actor, kb: str | None = None, *, everything: bool = False,
                progress: Progress | None = None) -> IngestReport:
        """Re-chunk and re-embed the documents of ``kb`` indexed with another chunker/embedder."""
        kb = kb or self.default_kb
        with audited(self.audit, actor, "ingest.reindex", knowledge_base=kb,
                     detail="all documents" if everything else "stale documents") as op:
            report = reindex(self.pipeline, kb, everything=everything, progress=progress)
            op.update(detail=f"reindexed {report.updated}, failed {report.failed}, chunks {report.chunks}")
        return report

    def remove(self, actor: Actor, target: str, kb: str | None = None) -> list[StoredDocument]:
        kb = kb or self.default_kb
        with audited(self.audit, actor, "document.remove", knowledge_base=kb,
                     detail=f"target {target[:200]}") as op:
            self.store.get_kb(kb)
            removed = self.pipeline.remove(kb, target)
            if not removed:
                raise DocumentNotFound(f"no document matches {target!r} in {kb!r}")
            op.update(detail=f"removed documents {','.join(str(d.id) for d in removed)[:500]}")
        return removed
