"""Permission-aware hybrid retrieval: dense (FAISS) + BM25, fused by reciprocal rank.

The reader's groups and the metadata filters become one mask over the knowledge base's chunks
before anything is scored: FAISS only scores permitted ids (an ID selector) and BM25 only counts
permitted rows, statistics included. A principal therefore gets exactly the results, scores and
counts they would get from a knowledge base holding only the chunks they may read.

Each process loads a knowledge base once (indexes plus chunk metadata) and reloads it when an
ingest, possibly in another process, publishes a newer index version.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Literal

import numpy as np
from sqlmodel import Session, select

from retrieval.embedder import Embedder
from retrieval.names import is_kb_name
from retrieval.store import KnowledgeBaseNotFound, KnowledgeBaseStore
from retrieval.tables import ChunkRow, DocumentRow, decode_groups
from retrieval.text_analysis import mostly_cjk, tokenize
from retrieval.vector_index import IdFilter
from security.principal import Principal

Mode = Literal["hybrid", "dense", "bm25"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchFilters:
    source_prefix: str | None = None  # e.g. "hr/" (path relative to the ingested folder)
    document_ids: tuple[int, ...] | None = None
    file_types: tuple[str, ...] | None = None  # e.g. ("pdf", "docx")
    modified_after: datetime | None = None
    modified_before: datetime | None = None

    def is_empty(self) -> bool:
        return self == SearchFilters()


@dataclass
class RetrievedChunk:
    chunk_id: int
    document_id: int
    source: str
    title: str | None
    page: int | None
    heading: str | None  # the heading path within the document: "Section > Subsection > Entry"
    text: str
    dense_score: float | None  # cosine similarity, None if not among the dense candidates
    bm25_score: float | None  # BM25 over the reader's permitted chunks, None if no term matched
    fused_score: float  # reciprocal-rank fusion
    rerank_score: float | None = None


@dataclass(frozen=True)
class SearchStats:
    """What one search did, for an observer (the service turns it into metrics)."""

    kb: str
    mode: str
    seconds: float
    acl_filtered: int  # chunks of the knowledge base the reader's groups excluded
    results: int


@dataclass
class RetrievalConfig:
    dense_weight: float = 1.0
    bm25_weight: float = 1.0
    # BM25's weight for queries written mostly in Chinese/Japanese characters; None: bm25_weight.
    # An English-only embedder (the bundled all-MiniLM-L6-v2) ranks CJK text close to randomly, so
    # equal-weight fusion buries BM25's good hits (measured on the Chinese set: hybrid MRR@10 0.217
    # at weight 1, 0.442 at 5, 0.539 at 20, BM25 alone 0.564; docs/benchmarks.md). The app's
    # default is 20: BM25 leads, dense results still fill in where no query term matches. Set
    # None with a multilingual embedder.
    cjk_bm25_weight: float | None = None
    rrf_k: int = 60
    fusion: str = "rrf"  # "rrf": reciprocal rank fusion; "score": weighted sum of min-max scaled scores
    candidates: int = 50  # per retriever, before fusion
    mmr_lambda: float | None = None  # e.g. 0.7 for some diversity; None disables MMR
    rerank_top_n: int = 20
    query_cache_size: int = 1024
    # Reranking by document structure (no model): after fusion, each candidate gains
    # ``document_weight`` x the fused score of the best other candidate from its document (a
    # passage of the document the evidence points to beats an isolated match elsewhere), and each
    # of the ``neighbour_sources`` best candidates passes ``neighbour_weight`` x its fused score
    # to the chunks just before and after it in its document (the answer is often in the chunk
    # next to the one that shares the question's words), which may bring those in. 0 turns either
    # off. Measured in docs/benchmarks.md (Retrieval, ablation): neither helps on all three sets.
    document_weight: float = 0.0
    neighbour_weight: float = 0.0
    neighbour_sources: int = 10  # the top candidates (by fused score) that lend to their neighbours


class _Snapshot:
    """One published version of a knowledge base: indexes and per-chunk metadata arrays."""

    def __init__(self, store: KnowledgeBaseStore, kb: str):
        self.vectors, self.lexical, manifest = store.load_indexes(kb)
        self.version = manifest.version if manifest else None
        with Session(store.engine) as session:
            docs = session.exec(
                select(DocumentRow.id, DocumentRow.source, DocumentRow.file_type, DocumentRow.groups, DocumentRow.modified_at)
                .where(DocumentRow.kb == kb)
                .order_by(DocumentRow.id)
            ).all()
            chunks = session.exec(
                select(ChunkRow.id, ChunkRow.document_id, ChunkRow.ordinal).where(ChunkRow.kb == kb).order_by(ChunkRow.id)
            ).all()
        self.stale_documents = store.stale_documents(kb)
        if self.stale_documents:
            log.warning(
                "knowledge base %s: %d document(s) were indexed with another chunker or embedder (%s is current); "
                "their chunks are searched as they are: run `ingest reindex --kb %s` to rebuild them",
                kb, self.stale_documents, store.index_version, kb,
            )
        self.doc_ids = np.asarray([d[0] for d in docs], dtype=np.int64)
        self.doc_sources = [d[1] for d in docs]
        self.doc_types = np.asarray([d[2] for d in docs], dtype=object)
        self.doc_groups = [frozenset(decode_groups(d[3])) for d in docs]
        self.doc_modified = np.asarray(
            [_epoch(d[4]) if d[4] is not None else np.nan for d in docs], dtype=np.float64
        )
        # Canonical chunk order: sorted ids (the lexical rows and FAISS ids map onto it).
        self.chunk_ids = np.asarray([c[0] for c in chunks], dtype=np.int64)
        self.chunk_doc = np.searchsorted(self.doc_ids, np.asarray([c[1] for c in chunks], dtype=np.int64))
        self.chunk_ordinal = np.asarray([c[2] for c in chunks], dtype=np.int64)
        self.lexical_pos = self.lexical.row_positions(self.chunk_ids)
        self._masks: OrderedDict[tuple, _Permitted] = OrderedDict()
        self._lock = threading.Lock()

    def permitted(self, principal: Principal, filters: SearchFilters) -> "_Permitted":
        """What the principal may read and the filters keep, cached per (groups, filters)."""
        key = (principal.reads_everything(), frozenset(principal.groups), filters)
        with self._lock:
            if key in self._masks:
                self._masks.move_to_end(key)
                return self._masks[key]
        permitted = _Permitted(self, *self._mask(principal, filters))
        with self._lock:
            self._masks[key] = permitted
            while len(self._masks) > 256:
                self._masks.popitem(last=False)
        return permitted

    def _mask(self, principal: Principal, filters: SearchFilters) -> tuple[np.ndarray | None, int]:
        """Bool mask over chunks (None = everything) and how many chunks the groups alone excluded."""
        if principal.reads_everything() and filters.is_empty():
            return None, 0
        doc_mask = np.ones(len(self.doc_ids), dtype=bool)
        acl_filtered = 0
        if not principal.reads_everything():
            groups = set(principal.groups)
            doc_mask &= np.fromiter((not g.isdisjoint(groups) for g in self.doc_groups), dtype=bool, count=len(self.doc_groups))
            acl_filtered = int(len(self.chunk_doc) - np.count_nonzero(doc_mask[self.chunk_doc])) if len(self.chunk_doc) else 0
        if filters.source_prefix:
            doc_mask &= np.fromiter((s.startswith(filters.source_prefix) for s in self.doc_sources), dtype=bool, count=len(self.doc_sources))
        if filters.document_ids is not None:
            doc_mask &= np.isin(self.doc_ids, np.asarray(filters.document_ids, dtype=np.int64))
        if filters.file_types is not None:
            doc_mask &= np.isin(self.doc_types, list(filters.file_types))
        if filters.modified_after is not None:
            doc_mask &= self.doc_modified >= _epoch(filters.modified_after)
        if filters.modified_before is not None:
            doc_mask &= self.doc_modified < _epoch(filters.modified_before)
        return (doc_mask[self.chunk_doc] if len(self.chunk_doc) else np.zeros(0, dtype=bool)), acl_filtered


class _Permitted:
    """One reader's view of a snapshot: the chunk mask in the forms each index consumes."""

    def __init__(self, snapshot: _Snapshot, mask: np.ndarray | None, acl_filtered: int = 0):
        self.mask = mask
        self.acl_filtered = acl_filtered
        self.empty = mask is not None and not mask.any()
        self.id_filter = IdFilter(snapshot.chunk_ids[mask]) if mask is not None and not self.empty else None
        if mask is None:
            self.lexical_mask = snapshot.lexical_pos >= 0
        else:  # lexical rows that are not current chunks have position -1 -> False
            self.lexical_mask = np.append(mask, False)[snapshot.lexical_pos]


def _epoch(value: datetime) -> float:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


@dataclass
class _Candidate:
    chunk_id: int
    dense: float | None = None
    bm25: float | None = None
    fused: float = 0.0


@dataclass
class Retriever:
    store: KnowledgeBaseStore
    embedder: Embedder
    config: RetrievalConfig = field(default_factory=RetrievalConfig)
    reranker: object | None = None  # a sentence_transformers CrossEncoder, when configured
    # Called after every search with its SearchStats (the service records metrics; keeps this
    # library free of any metrics backend). Exceptions from it are not caught: it must not raise.
    observer: Callable[[SearchStats], None] | None = None

    def __post_init__(self) -> None:
        self._snapshots: dict[str, _Snapshot] = {}
        self._query_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    # Knowledge-base snapshots ---------------------------------------------------------------
    def snapshot(self, kb: str) -> _Snapshot:
        """The loaded knowledge base, reloaded when a newer index version has been published."""
        if not is_kb_name(kb):  # before any path is built from it; answered like a missing one
            raise KnowledgeBaseNotFound(f"unknown knowledge base {kb!r}; ingest documents into it first")
        manifest = self.store.published(kb)
        version = manifest.version if manifest else None
        current = self._snapshots.get(kb)
        if current is not None and current.version == version:
            return current
        with self._lock:
            current = self._snapshots.get(kb)
            if current is None or current.version != version:
                self.store.get_kb(kb)  # clear error for an unknown knowledge base
                current = _Snapshot(self.store, kb)
                self._snapshots[kb] = current
        return current

    def forget(self, kb: str) -> None:
        """Drop a loaded knowledge base (after it was deleted)."""
        with self._lock:
            self._snapshots.pop(kb, None)

    def embed_query(self, query: str) -> np.ndarray:
        with self._lock:
            cached = self._query_cache.get(query)
            if cached is not None:
                self._query_cache.move_to_end(query)
                return cached
        vector = self.embedder.embed_query(query)
        with self._lock:
            self._query_cache[query] = vector
            while len(self._query_cache) > self.config.query_cache_size:
                self._query_cache.popitem(last=False)
        return vector

    # Search -----------------------------------------------------------------------------------
    def search(
        self,
        query: str,
        kb: str,
        principal: Principal,
        top_k: int = 5,
        filters: SearchFilters | None = None,
        mode: Mode = "hybrid",
        query_vector: np.ndarray | None = None,
    ) -> list[RetrievedChunk]:
        started = time.perf_counter()
        results, acl_filtered = self._search(query, kb, principal, top_k, filters, mode, query_vector)
        if self.observer is not None:
            self.observer(SearchStats(kb, mode, time.perf_counter() - started, acl_filtered, len(results)))
        return results

    def _search(
        self, query: str, kb: str, principal: Principal, top_k: int, filters: SearchFilters | None, mode: Mode,
        query_vector: np.ndarray | None,
    ) -> tuple[list[RetrievedChunk], int]:
        if principal.knowledge_base is not None and principal.knowledge_base != kb:
            return [], 0  # a service account pinned to another knowledge base sees nothing here
        filters = filters or SearchFilters()
        snap = self.snapshot(kb)
        permitted = snap.permitted(principal, filters)
        if permitted.empty or len(snap.chunk_ids) == 0 or not query.strip():
            return [], permitted.acl_filtered
        want = max(top_k, self.config.candidates)
        candidates: dict[int, _Candidate] = {}
        if mode in ("hybrid", "dense"):
            vector = query_vector if query_vector is not None else self.embed_query(query)
            scores, ids = snap.vectors.search(vector, want, allowed_ids=permitted.id_filter)
            self._fuse(candidates, ids, scores, "dense", self.config.dense_weight)
        if mode in ("hybrid", "bm25"):
            scores, ids = snap.lexical.search(tokenize(query), want, permitted.lexical_mask)
            weight = self.config.bm25_weight
            if self.config.cjk_bm25_weight is not None and mostly_cjk(query):
                weight = self.config.cjk_bm25_weight
            self._fuse(candidates, ids, scores, "bm25", weight)
        if self.config.document_weight or self.config.neighbour_weight:
            self._structure_rerank(candidates, snap, permitted)
        ranked = sorted(candidates.values(), key=lambda c: (-c.fused, c.chunk_id))
        pool = ranked[: max(top_k, self.config.rerank_top_n if self.reranker else top_k, want if self.config.mmr_lambda else 0)]
        results = self._materialise(pool, principal)
        if self.reranker is not None and results:
            results = self._rerank(query, results[: self.config.rerank_top_n])
        if self.config.mmr_lambda is not None and len(results) > top_k:
            results = self._mmr(results, snap, self.config.mmr_lambda, top_k)
        return results[:top_k], permitted.acl_filtered

    def _fuse(self, candidates: dict[int, _Candidate], ids: np.ndarray, scores: np.ndarray, kind: str, weight: float) -> None:
        if self.config.fusion == "score" and len(scores):
            # Convex combination of scores scaled to [0, 1] over this list (min-max), so a clear
            # winner keeps its margin where RRF would give it only 1/(k+1) vs 1/(k+2).
            values = np.asarray(scores, dtype=np.float64)
            low, high = float(values.min()), float(values.max())
            scaled = (values - low) / (high - low) if high > low else np.ones_like(values)
            for chunk_id, score, value in zip(ids.tolist(), scores.tolist(), scaled.tolist()):
                candidate = candidates.setdefault(chunk_id, _Candidate(chunk_id))
                setattr(candidate, kind, float(score))
                candidate.fused += weight * value
            return
        for rank, (chunk_id, score) in enumerate(zip(ids.tolist(), scores.tolist()), start=1):
            candidate = candidates.setdefault(chunk_id, _Candidate(chunk_id))
            setattr(candidate, kind, float(score))
            candidate.fused += weight / (self.config.rrf_k + rank)

    def _structure_rerank(self, candidates: dict[int, _Candidate], snap: _Snapshot, permitted: "_Permitted") -> None:
        """Document aggregation and neighbour expansion over the fused candidates (see
        RetrievalConfig.document_weight / neighbour_weight); neighbours must be permitted too."""
        ids = np.fromiter(candidates.keys(), dtype=np.int64, count=len(candidates))
        base = np.fromiter((c.fused for c in candidates.values()), dtype=np.float64, count=len(candidates))
        pos = np.searchsorted(snap.chunk_ids, ids)
        pos = np.minimum(pos, len(snap.chunk_ids) - 1)
        known = snap.chunk_ids[pos] == ids  # a chunk added after the snapshot was loaded is left as it is
        docs = np.where(known, snap.chunk_doc[pos], -1)
        if self.config.document_weight:
            # The best *other* candidate of the document: a sum would favour long documents with
            # many weak matches (measured: it pushed the right file out of the top 5).
            best: dict[int, list[float]] = {}
            for doc, score in zip(docs.tolist(), base.tolist()):
                if doc >= 0:
                    top = best.setdefault(doc, [0.0, 0.0])
                    if score > top[0]:
                        top[0], top[1] = score, top[0]
                    elif score > top[1]:
                        top[1] = score
            for candidate, doc, score in zip(candidates.values(), docs.tolist(), base.tolist()):
                if doc >= 0:
                    top = best[doc]
                    candidate.fused += self.config.document_weight * (top[1] if score >= top[0] else top[0])
        if self.config.neighbour_weight:
            last = len(snap.chunk_ids) - 1
            # Only the strongest candidates lend to their neighbours: from every candidate, runs of
            # weakly matching chunks in long pages lifted each other (measured).
            sources = set(np.argsort(-base, kind="stable")[: self.config.neighbour_sources].tolist())
            for i, (p, doc, score, ok) in enumerate(zip(pos.tolist(), docs.tolist(), base.tolist(), known.tolist())):
                if not ok or i not in sources:
                    continue
                for q in (p - 1, p + 1):
                    if not 0 <= q <= last or snap.chunk_doc[q] != doc:
                        continue
                    if abs(int(snap.chunk_ordinal[q]) - int(snap.chunk_ordinal[p])) != 1:
                        continue
                    if permitted.mask is not None and not permitted.mask[q]:
                        continue
                    neighbour = candidates.setdefault(int(snap.chunk_ids[q]), _Candidate(int(snap.chunk_ids[q])))
                    neighbour.fused += self.config.neighbour_weight * score

    def _materialise(self, pool: list[_Candidate], principal: Principal) -> list[RetrievedChunk]:
        readable = self.readable_chunks([c.chunk_id for c in pool], principal)
        results = []
        for candidate in pool:
            chunk = readable.get(candidate.chunk_id)
            if chunk is not None:
                results.append(replace(chunk, dense_score=candidate.dense, bm25_score=candidate.bm25,
                                       fused_score=candidate.fused))
        return results

    def readable_chunks(self, chunk_ids: list[int], principal: Principal) -> dict[int, RetrievedChunk]:
        """The chunks among ``chunk_ids`` that exist and that ``principal`` may read *now* (scores
        empty): the rows' current groups decide, and a pinned principal reads its knowledge base only."""
        # A chunk whose document an ingest removed since the snapshot was loaded has no row here.
        rows = self.store.chunks_with_documents(chunk_ids) if chunk_ids else []
        groups = set(principal.groups)
        readable = {}
        for row in rows:
            # Defence in depth: the row's current groups are checked again, so an ACL narrowed by
            # an ingest that has not yet published its index can never widen what is returned.
            if not principal.reads_everything() and groups.isdisjoint(decode_groups(row.groups)):
                continue
            if principal.knowledge_base is not None and row.kb != principal.knowledge_base:
                continue
            readable[row.id] = RetrievedChunk(
                chunk_id=row.id, document_id=row.document_id, source=row.source, title=row.title, page=row.page,
                heading=row.heading, text=row.text, dense_score=None, bm25_score=None, fused_score=0.0,
            )
        return readable

    def _rerank(self, query: str, results: list[RetrievedChunk]) -> list[RetrievedChunk]:
        scores = self.reranker.predict([(query, r.text) for r in results], show_progress_bar=False)
        for result, score in zip(results, np.asarray(scores, dtype=np.float32).reshape(-1).tolist()):
            result.rerank_score = float(score)
        return sorted(results, key=lambda r: (-r.rerank_score, r.chunk_id))

    def _mmr(self, results: list[RetrievedChunk], snap: _Snapshot, lam: float, top_k: int) -> list[RetrievedChunk]:
        """Maximal marginal relevance: trade relevance (rank order) against similarity to picks."""
        rows = self.store.chunks([r.chunk_id for r in results])
        vectors = np.stack([np.frombuffer(rows[r.chunk_id].embedding, dtype=np.float32) for r in results])
        relevance = np.linspace(1.0, 0.0, num=len(results), endpoint=False)  # rank-based, in [0, 1]
        chosen: list[int] = []
        remaining = list(range(len(results)))
        while remaining and len(chosen) < top_k:
            if chosen:
                similarity = (vectors[remaining] @ vectors[chosen].T).max(axis=1)
            else:
                similarity = np.zeros(len(remaining))
            best = remaining[int(np.argmax(lam * relevance[remaining] - (1 - lam) * similarity))]
            chosen.append(best)
            remaining.remove(best)
        return [results[i] for i in chosen]


def make_reranker(model_path: str, device: str = "cpu"):
    """A local cross-encoder folder (e.g. bge-reranker); loaded only when configured."""
    from sentence_transformers import CrossEncoder

    return CrossEncoder(model_path, device=device, local_files_only=True)

