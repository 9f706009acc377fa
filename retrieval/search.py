"""Dense search with the reader's groups applied inside FAISS (an ID selector over permitted chunks).

The permission filter never post-filters a global top-k: FAISS only ever scores chunks the reader
may see, so k permitted results come back whenever k permitted chunks exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlmodel import Session, select

from retrieval.embedder import Embedder
from retrieval.store import KnowledgeBaseStore
from retrieval.tables import ChunkRow, DocumentRow, decode_groups


@dataclass
class SearchHit:
    chunk_id: int
    document_id: int
    source: str
    title: str | None
    page: int | None
    heading: str | None
    text: str
    score: float


class DenseSearcher:
    def __init__(self, store: KnowledgeBaseStore, embedder: Embedder):
        self.store = store
        self.embedder = embedder

    def permitted_ids(self, kb: str, groups: list[str] | None) -> np.ndarray | None:
        """Chunk ids readable by ``groups``; ``None`` means unrestricted (administrators)."""
        if groups is None:
            return None
        wanted = set(groups)
        with Session(self.store.engine) as session:
            rows = session.exec(select(ChunkRow.id, ChunkRow.groups).where(ChunkRow.kb == kb)).all()
        return np.asarray([cid for cid, g in rows if wanted.intersection(decode_groups(g))], dtype=np.int64)

    def search(self, query: str, kb: str, *, groups: list[str] | None, top_k: int = 5) -> list[SearchHit]:
        index = self.store.load_index(kb)
        allowed = self.permitted_ids(kb, groups)
        scores, ids = index.search(self.embedder.embed_query(query), top_k, allowed_ids=allowed)
        rows = self.store.chunks(ids.tolist())
        with Session(self.store.engine) as session:
            doc_ids = {row.document_id for row in rows.values()}
            docs = {d.id: d for d in session.exec(select(DocumentRow).where(DocumentRow.id.in_(doc_ids)))} if doc_ids else {}
        hits = []
        for score, chunk_id in zip(scores.tolist(), ids.tolist()):
            row = rows.get(chunk_id)
            if row is None:  # removed between the index load and now
                continue
            doc = docs[row.document_id]
            hits.append(SearchHit(chunk_id, row.document_id, doc.source, doc.title, row.page, row.heading, row.text, score))
        return hits
