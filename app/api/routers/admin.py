"""Administration: knowledge bases, documents (upload goes through the ingestion pipeline), API keys."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from pydantic import Field

from app.api.audit import AuditTrail, actor, trail
from app.api.deps import KnowledgeBaseName, container, require, uploads
from app.api.errors import ApiError
from app.api.schemas import RequestBody
from app.container import Container
from app.uploads import Uploads, skipped
from ingest.loaders import file_type_for
from security.principal import Principal

router = APIRouter(tags=["admin"])
admin = require()  # administrators only
# File systems allow 255 bytes per name; the rest is room for the temporary name of an upload in progress.
MAX_NAME_BYTES = 200
_SAFE_NAME = re.compile(r"[^\w.\- ]+", re.UNICODE)


class KnowledgeBaseIn(RequestBody):
    name: KnowledgeBaseName


@router.get("/v1/knowledge_bases", summary="Knowledge bases with document and chunk counts")
async def list_kbs(c: Container = Depends(container), who: Principal = Depends(require("user"))) -> dict:
    names = await run_in_threadpool(c.kb_store.list_kbs)
    if who.knowledge_base is not None:
        names = [n for n in names if n == who.knowledge_base]
    if not who.is_admin:  # counts would tell non-admins how much they cannot see
        return {"data": [{"name": n} for n in names]}
    stats = [await run_in_threadpool(c.kb_store.stats, n) for n in names]
    return {"data": [{"name": s.name, "documents": s.documents, "chunks": s.chunks, "index_version": s.index_version}
                     for s in stats]}


@router.post("/v1/knowledge_bases", status_code=201, summary="Create a knowledge base")
async def create_kb(body: KnowledgeBaseIn, c: Container = Depends(container), _: Principal = Depends(admin),
                    audit: AuditTrail = Depends(trail)) -> dict:
    async with audit.action("kb.create", intent=True, knowledge_base=body.name):
        await run_in_threadpool(c.kb_store.ensure_kb, body.name)
    return {"name": body.name}


@router.delete("/v1/knowledge_bases/{name}", summary="Delete a knowledge base with all its documents")
async def delete_kb(name: KnowledgeBaseName, c: Container = Depends(container), _: Principal = Depends(admin),
                    audit: AuditTrail = Depends(trail)) -> dict:
    async with audit.action("kb.delete", intent=True, knowledge_base=name):
        await run_in_threadpool(c.kb_store.get_kb, name)
        await run_in_threadpool(c.kb_store.delete_kb, name)
        c.retriever.forget(name)
    return {"name": name, "deleted": True}


@router.get("/v1/knowledge_bases/{name}/documents", summary="Documents of a knowledge base")
async def list_documents(name: KnowledgeBaseName, c: Container = Depends(container), _: Principal = Depends(admin),
                         audit: AuditTrail = Depends(trail)) -> dict:
    async with audit.action("document.list", knowledge_base=name):
        await run_in_threadpool(c.kb_store.get_kb, name)
        docs = await run_in_threadpool(c.kb_store.documents, name)
    return {"data": [{"id": d.id, "source": d.source, "title": d.title, "file_type": d.file_type,
                      "groups": json.loads(d.groups), "chunks": d.chunk_count, "size": d.size,
                      "ingested_at": d.ingested_at.isoformat() if d.ingested_at else None} for d in docs]}


@router.post("/v1/knowledge_bases/{name}/documents", status_code=201, summary="Upload and ingest a document")
async def upload_document(
    name: KnowledgeBaseName, file: UploadFile = File(...), groups: str = Form(""),
    c: Container = Depends(container), _: Principal = Depends(admin), audit: AuditTrail = Depends(trail),
    files: Uploads = Depends(uploads),
) -> dict:
    filename = _SAFE_NAME.sub("_", Path(file.filename or "").name).strip(" .")
    async with audit.action("document.upload", intent=True, knowledge_base=name, detail=f"file {filename}") as act:
        doc, report = await _ingest_upload(name, file, filename, groups, c, files)
        act.update(detail=f"file {filename}; document {doc.id}; sha256 {doc.content_hash}; groups {doc.groups}")
    return {"id": doc.id, "source": doc.source, "chunks": doc.chunk_count, "groups": json.loads(doc.groups),
            "added": report.added, "updated": report.updated}


async def _ingest_upload(name: str, file: UploadFile, filename: str, groups: str, c: Container, files: Uploads):
    if not filename or file_type_for(Path(filename)) is None:
        raise ApiError(415, "unsupported or missing file name; supported: .txt .md .rst .html .pdf .docx .csv .xlsx .xlsm .pptx .eml .png .jpg .jpeg .tif .tiff",
                       "unsupported_file_type", "file")
    if len(filename.encode()) > MAX_NAME_BYTES:
        raise ApiError(400, f"file name too long: at most {MAX_NAME_BYTES} bytes (UTF-8)", "invalid_file_name", "file")
    limit = int(c.settings.ingest.max_file_mb * 1024 * 1024)  # the one file-size limit, as for `ingest run`
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, f"files may be at most {c.settings.ingest.max_file_mb:g} MiB (ingest.max_file_mb)",
                       "file_too_large", "file")
    await run_in_threadpool(c.kb_store.ensure_kb, name)
    group_list = [g.strip() for g in groups.split(",") if g.strip()] or None
    # Stored under a temporary name and swapped in only once ingested (app/uploads.py): a file that
    # fails leaves the stored file of that name, and its document, as they were.
    target, report = await run_in_threadpool(files.store, name, filename, data, group_list)
    if report.failed:
        raise ApiError(400, f"{filename}: {report.failures[0].reason}", "unreadable_document", "file")
    if (left := skipped(report, filename)) is not None:  # e.g. a scanned PDF while OCR is off
        raise ApiError(422, f"{filename}: not ingested: {left.reason}", "document_skipped", "file")
    docs = await run_in_threadpool(c.kb_store.documents, name, str(target.parent))
    doc = next(d for d in docs if d.source == filename)
    return doc, report


@router.delete("/v1/knowledge_bases/{name}/documents/{document_id}", summary="Remove a document")
async def delete_document(name: KnowledgeBaseName, document_id: int, request: Request,
                          c: Container = Depends(container), _: Principal = Depends(admin)) -> dict:
    await run_in_threadpool(c.documents.remove, actor(request), str(document_id), name)  # audited there
    return {"id": document_id, "deleted": True}


@router.get("/v1/ingest/runs", summary="Recent ingestion runs and their status")
async def ingest_runs(c: Container = Depends(container), _: Principal = Depends(admin),
                      audit: AuditTrail = Depends(trail)) -> dict:
    async with audit.action("ingest.runs"):
        runs = await run_in_threadpool(c.kb_store.recent_runs, 20)
    return {"data": [{**r, "started_at": str(r["started_at"]), "finished_at": str(r["finished_at"] or "")} for r in runs]}


class KeyIn(RequestBody):
    name: str = Field(..., min_length=1, max_length=128)
    role: str = Field("user", pattern="^(admin|user|service)$")
    groups: list[str] = Field(default_factory=list, max_length=50)
    knowledge_base: KnowledgeBaseName | None = None
    expires_days: int | None = Field(None, ge=1, le=3650)


@router.get("/v1/keys", summary="API keys (never the secrets)")
async def list_keys(request: Request, c: Container = Depends(container), _: Principal = Depends(admin)) -> dict:
    keys = await run_in_threadpool(c.keys.list, actor(request))
    return {"data": [_key(k) for k in keys]}


@router.post("/v1/keys", status_code=201, summary="Create an API key; the key is returned once")
async def create_key(body: KeyIn, request: Request, c: Container = Depends(container),
                     _: Principal = Depends(admin)) -> dict:
    token, info = await run_in_threadpool(c.keys.create, actor(request), body.name, body.role, body.groups,
                                          body.knowledge_base, body.expires_days)  # audited there
    return {"key": token, **_key(info)}


@router.delete("/v1/keys/{key_id}", summary="Revoke an API key")
async def revoke_key(key_id: str, request: Request, c: Container = Depends(container),
                     _: Principal = Depends(admin)) -> dict:
    info = await run_in_threadpool(c.keys.revoke, actor(request), key_id)  # audited there
    return _key(info)


@router.get("/v1/admin/audit/status", summary="Audit chain: length, last seq, verification, last signed checkpoint")
async def audit_status(c: Container = Depends(container), _: Principal = Depends(admin),
                       audit: AuditTrail = Depends(trail)) -> dict:
    async with audit.action("audit.status"):
        return await run_in_threadpool(c.audit_log.status)


def _key(info) -> dict:
    return {"id": info.key_id, "name": info.name, "role": info.role, "groups": info.groups,
            "knowledge_base": info.knowledge_base, "active": info.active,
            "created_at": info.created_at.isoformat(), "expires_at": info.expires_at.isoformat() if info.expires_at else None,
            "revoked_at": info.revoked_at.isoformat() if info.revoked_at else None}
