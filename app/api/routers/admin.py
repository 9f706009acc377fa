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
from app.api.responses import (AuditStatus, Deleted, DocumentList, DocumentUploaded, IngestRunList, KeyCreated,
                               KeyInfo, KeyList, KnowledgeBaseCreated, KnowledgeBaseList)
from app.api.schemas import RequestBody
from app.container import Container
from app.uploads import Uploads
from security.principal import Principal

router = APIRouter(tags=["admin"])
admin = require()  # administrators only
_SAFE_NAME = re.compile(r"[^\w.\- ]+", re.UNICODE)


class KnowledgeBaseIn(RequestBody):
    name: KnowledgeBaseName


@router.get("/v1/knowledge_bases", response_model=KnowledgeBaseList, response_model_exclude_none=True, summary="Knowledge bases with document and chunk counts")
async def list_kbs(c: Container = Depends(container), who: Principal = Depends(require("user"))) -> dict:
    names = await run_in_threadpool(c.kb_store.list_kbs)
    if who.knowledge_base is not None:
        names = [n for n in names if n == who.knowledge_base]
    if not who.is_admin:  # counts would tell non-admins how much they cannot see
        return {"data": [{"name": n} for n in names]}
    stats = [await run_in_threadpool(c.kb_store.stats, n) for n in names]
    return {"data": [{"name": s.name, "documents": s.documents, "chunks": s.chunks, "index_version": s.index_version}
                     for s in stats]}


@router.post("/v1/knowledge_bases", status_code=201, response_model=KnowledgeBaseCreated, summary="Create a knowledge base")
async def create_kb(body: KnowledgeBaseIn, request: Request, c: Container = Depends(container),
                    _: Principal = Depends(admin)) -> dict:
    await run_in_threadpool(c.documents.create_kb, actor(request), body.name)  # audited there
    return {"name": body.name}


@router.delete("/v1/knowledge_bases/{name}", response_model=Deleted, response_model_exclude_none=True, summary="Delete a knowledge base with all its documents")
async def delete_kb(name: KnowledgeBaseName, request: Request, c: Container = Depends(container),
                    _: Principal = Depends(admin)) -> dict:
    await run_in_threadpool(c.documents.delete_kb, actor(request), name)  # audited there
    return {"name": name, "deleted": True}


@router.get("/v1/knowledge_bases/{name}/documents", response_model=DocumentList, summary="Documents of a knowledge base")
async def list_documents(name: KnowledgeBaseName, request: Request, c: Container = Depends(container),
                         _: Principal = Depends(admin)) -> dict:
    docs = await run_in_threadpool(c.documents.list_documents, actor(request), name)  # audited there
    return {"data": [{"id": d.id, "source": d.source, "title": d.title, "file_type": d.file_type,
                      "groups": json.loads(d.groups), "chunks": d.chunk_count, "size": d.size,
                      "ingested_at": d.ingested_at.isoformat() if d.ingested_at else None} for d in docs]}


@router.post("/v1/knowledge_bases/{name}/documents", status_code=201, response_model=DocumentUploaded,
             summary="Upload and ingest a document")
async def upload_document(
    name: KnowledgeBaseName, request: Request, file: UploadFile = File(...), groups: str = Form(""),
    c: Container = Depends(container), _: Principal = Depends(admin), files: Uploads = Depends(uploads),
) -> dict:
    filename = _SAFE_NAME.sub("_", Path(file.filename or "").name).strip(" .")
    # One byte past the limit is enough to know the file is too large (the service refuses it).
    data = await file.read(int(c.settings.ingest.max_file_mb * 1024 * 1024) + 1)
    group_list = [g.strip() for g in groups.split(",") if g.strip()] or None
    doc, report = await run_in_threadpool(c.documents.upload, actor(request), name, filename, data, group_list,
                                          files)  # checked, stored, ingested and audited there
    return {"id": doc.id, "source": doc.source, "chunks": doc.chunk_count, "groups": json.loads(doc.groups),
            "added": report.added, "updated": report.updated}


@router.delete("/v1/knowledge_bases/{name}/documents/{document_id}", response_model=Deleted,
               response_model_exclude_none=True, summary="Remove a document")
async def delete_document(name: KnowledgeBaseName, document_id: int, request: Request,
                          c: Container = Depends(container), _: Principal = Depends(admin)) -> dict:
    await run_in_threadpool(c.documents.remove, actor(request), str(document_id), name)  # audited there
    return {"id": document_id, "deleted": True}


@router.get("/v1/ingest/runs", response_model=IngestRunList, summary="Recent ingestion runs and their status")
async def ingest_runs(request: Request, c: Container = Depends(container), _: Principal = Depends(admin)) -> dict:
    runs = await run_in_threadpool(c.documents.ingest_runs, actor(request), 20)  # audited there
    return {"data": [{**r, "started_at": str(r["started_at"]), "finished_at": str(r["finished_at"] or "")} for r in runs]}


class KeyIn(RequestBody):
    name: str = Field(..., min_length=1, max_length=128)
    role: str = Field("user", pattern="^(admin|user|service)$")
    groups: list[str] = Field(default_factory=list, max_length=50)
    knowledge_base: KnowledgeBaseName | None = None
    expires_days: int | None = Field(None, ge=1, le=3650)


@router.get("/v1/keys", response_model=KeyList, summary="API keys (never the secrets)")
async def list_keys(request: Request, c: Container = Depends(container), _: Principal = Depends(admin)) -> dict:
    keys = await run_in_threadpool(c.keys.list, actor(request))
    return {"data": [_key(k) for k in keys]}


@router.post("/v1/keys", status_code=201, response_model=KeyCreated, summary="Create an API key; the key is returned once")
async def create_key(body: KeyIn, request: Request, c: Container = Depends(container),
                     _: Principal = Depends(admin)) -> dict:
    token, info = await run_in_threadpool(c.keys.create, actor(request), body.name, body.role, body.groups,
                                          body.knowledge_base, body.expires_days)  # audited there
    return {"key": token, **_key(info)}


@router.delete("/v1/keys/{key_id}", response_model=KeyInfo, summary="Revoke an API key")
async def revoke_key(key_id: str, request: Request, c: Container = Depends(container),
                     _: Principal = Depends(admin)) -> dict:
    info = await run_in_threadpool(c.keys.revoke, actor(request), key_id)  # audited there
    return _key(info)


@router.get("/v1/admin/audit/status", response_model=AuditStatus, summary="Audit chain: length, last seq, verification, last signed checkpoint")
async def audit_status(c: Container = Depends(container), _: Principal = Depends(admin),
                       audit: AuditTrail = Depends(trail)) -> dict:
    async with audit.action("audit.status"):
        return await run_in_threadpool(c.audit_log.status)


def _key(info) -> dict:
    return {"id": info.key_id, "name": info.name, "role": info.role, "groups": info.groups,
            "knowledge_base": info.knowledge_base, "active": info.active,
            "created_at": info.created_at.isoformat(), "expires_at": info.expires_at.isoformat() if info.expires_at else None,
            "revoked_at": info.revoked_at.isoformat() if info.revoked_at else None}
