"""POST /v1/search: retrieval only, with the caller's access groups applied inside the search."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from app.api.audit import actor
from app.api.deps import KnowledgeBaseName, container, require
from app.api.schemas import RequestBody
from app.container import Container
from app.services.search import SearchQuery
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
async def search(body: SearchRequest, request: Request, c: Container = Depends(container),
                 who: Principal = Depends(require("user", "service"))) -> SearchResponse:
    query = SearchQuery(body.query, body.knowledge_base, body.top_k, body.mode, body.source_prefix,
                        tuple(body.file_types) if body.file_types else None)
    found = await run_in_threadpool(c.search_service.search, actor(request), who, query)  # access and audit there
    return SearchResponse(results=[
        SearchResult(chunk_id=h.chunk_id, document_id=h.document_id, source=h.source, title=h.title, page=h.page,
                     heading=h.heading, text=h.text, score=h.fused_score, dense_score=h.dense_score,
                     bm25_score=h.bm25_score)
        for h in found.hits
    ])
