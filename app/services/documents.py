"""Documents of the knowledge bases: ingest a folder, reindex, remove documents; audited like every change.

The CLI (`ingest run`, `ingest reindex`, `ingest remove`) calls this service with the operator as actor; the admin
API calls it with the signed-in administrator, so both write the same records.
"""

from __future__ import annotations

from pathlib import Path

from app.services.audit import Actor, AuditService
from app.services.operations import audited
from ingest.pipeline import IngestPipeline, IngestReport, Progress
from ingest.reindex import reindex
from retrieval.store import KnowledgeBaseStore, StoredDocument


class DocumentNotFound(LookupError):
    """No document matches the target."""

    http_status = 404
    error_code = "document_not_found"


class DocumentService:
    def __init__(self, pipeline: IngestPipeline, store: KnowledgeBaseStore, audit: AuditService,
                 default_kb: str):
        self.pipeline = pipeline
        self.store = store
        self.audit = audit
        self.default_kb = default_kb

    def ingest(self, actor: Actor, path: Path, kb: str | None = None, groups: list[str] | None = None, *,
               delete_missing: bool = True, progress: Progress | None = None) -> IngestReport:
        kb = kb or self.default_kb
        where = f"path {Path(path).expanduser().resolve()}"
        with audited(self.audit, actor, "ingest.run", knowledge_base=kb, detail=where) as op:
            report = self.pipeline.run(path, kb, groups, delete_missing=delete_missing, progress=progress)
            op.update(detail=(f"{where}; added {report.added}, updated {report.updated}, deleted "
                              f"{report.deleted}, failed {report.failed}, skipped {report.skipped}"))
        return report

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
