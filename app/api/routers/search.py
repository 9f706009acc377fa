"""POST /v1/search: retrieval only, with the caller's access groups applied inside the search."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from app.api.audit import AuditTrail, trail
from app.api.deps import KnowledgeBaseName, check_kb_access, container, readable_groups, require
from app.api.schemas import RequestBody
from app.container import Container
from retrieval.retriever import SearchFilters
from security.principal import Principal

router = APIRouter(tags=["search"])


class SearchRequest(RequestBody):
    query: str = Field(..., min_length=1, max_length=4000)
    # None: the server's `default_kb`, as for the CLI.
    knowledge_base: KnowledgeBaseName | None = None
    top_k: int = Field(5, ge=1, le=50)
    mode: str = Field("hybrid", pattern="^(hybrid|dense|bm25)$")
    source_prefix: str | None = Field(None, max_length=1000)
    file_types: list[str] | None = Field(None, max_length=20)


class SearchResult(BaseModel):
    chunk_id: int
    document_id: int
    source: str
    title: str | None
    page: int | None
    heading: str | None = None  # where in the document: "Section > Subsection > Entry"
    text: str
    score: float
    dense_score: float | None = None
    bm25_score: float | None = None


class SearchResponse(BaseModel):
    results: list[SearchResult]


@router.post("/v1/search", response_model=SearchResponse, summary="Retrieve permitted chunks")
async def search(body: SearchRequest, c: Container = Depends(container), who: Principal = Depends(require("user", "service")),
                 audit: AuditTrail = Depends(trail)):
    body.knowledge_base = body.knowledge_base or c.settings.default_kb
    async with audit.action("search", query=body.query, knowledge_base=body.knowledge_base) as act:
        check_kb_access(who, body.knowledge_base)
        reader = readable_groups(who, c.settings.ingest.default_groups)
        filters = SearchFilters(source_prefix=body.source_prefix, file_types=tuple(body.file_types) if body.file_types else None)
        hits = await run_in_threadpool(c.retriever.search, body.query, body.knowledge_base, reader, body.top_k, filters, body.mode)
        act.update(chunk_ids=[h.chunk_id for h in hits])
    return SearchResponse(results=[
        SearchResult(chunk_id=h.chunk_id, document_id=h.document_id, source=h.source, title=h.title, page=h.page,
                     heading=h.heading, text=h.text, score=h.fused_score, dense_score=h.dense_score, bm25_score=h.bm25_score)
        for h in hits
    ])
