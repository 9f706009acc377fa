"""Search: the reader's access applied inside retrieval, one audit record; the same for API and CLI."""

from __future__ import annotations

from dataclasses import dataclass

from app.services.access import check_kb_access, readable_groups
from app.services.audit import Actor, AuditService
from app.services.operations import Later, audited, resolved
from retrieval.retriever import RetrievedChunk, Retriever, SearchFilters
from security.principal import Principal


@dataclass(frozen=True)
class SearchQuery:
    query: str
    knowledge_base: str | None = None  # None: the server's default_kb
    top_k: int = 5
    mode: str = "hybrid"  # hybrid | dense | bm25
    source_prefix: str | None = None
    file_types: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SearchResults:
    knowledge_base: str
    hits: list[RetrievedChunk]


class SearchService:
    def __init__(self, retriever: Retriever | Later[Retriever], audit: AuditService, default_kb: str,
                 default_groups: list[str]):
        self._retriever = retriever
        self.audit = audit
        self.default_kb = default_kb
        self.default_groups = list(default_groups)

    def search(self, actor: Actor, who: Principal, q: SearchQuery) -> SearchResults:
        """A read whose result can be held back: one record after the work, before the results leave
        (AuditUnavailable when it cannot be written: nothing is returned)."""
        kb = q.knowledge_base or self.default_kb
        with audited(self.audit, actor, "search", intent=False, query=q.query, knowledge_base=kb) as op:
            check_kb_access(who, kb)
            reader = readable_groups(who, self.default_groups)
            filters = SearchFilters(source_prefix=q.source_prefix, file_types=q.file_types or None)
            hits = resolved(self._retriever).search(q.query, kb, reader, q.top_k, filters, q.mode)
            op.update(chunk_ids=[h.chunk_id for h in hits])
        return SearchResults(kb, hits)
