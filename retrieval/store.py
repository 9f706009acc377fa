"""The knowledge-base store: chunk and document rows in SQL, vectors in a FAISS index per knowledge base.

Write path (one writer per knowledge base, see :class:`KnowledgeBaseWriter`): every change is one SQL
transaction (documents, their chunks with embeddings, a generation bump), then the same change is
applied to the in-memory FAISS index, which is published atomically at checkpoints and at the end.
A process killed anywhere leaves committed rows plus an older published index; the next open
reconciles the index with the rows by chunk id (ids are never reused), so nothing is lost twice or
kept as an orphan.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from retrieval.tables import ChunkRow, DocumentRow, IngestRunRow, KnowledgeBaseRow, encode_groups, utcnow
from retrieval.lexical import LexicalIndex
from retrieval.text_analysis import chunk_header, tokenize
from retrieval.vector_index import IndexCorrupted, IndexDirectory, Manifest, VectorIndex

_ID_BATCH = 1000
log = logging.getLogger(__name__)


class KnowledgeBaseError(Exception):
    """A user-facing problem with a knowledge base (unknown name, embedder mismatch, ...)."""

    http_status = 400


class KnowledgeBaseNotFound(KnowledgeBaseError):
    """No knowledge base of that name."""

    http_status = 404


class KnowledgeBaseUnavailable(KnowledgeBaseError):
    """The knowledge base's index files are damaged: it cannot be searched until they are rebuilt
    (the next ingest into it rebuilds them from the database). Other knowledge bases are unaffected."""

    http_status = 503
    error_code = "knowledge_base_unavailable"

    def __init__(self, kb: str, reason: str):
        super().__init__(f"knowledge base {kb!r} is unavailable: {reason}; an administrator can rebuild it "
                         f"with `ingest run PATH --kb {kb}` (the index is rebuilt from the database)")
        self.kb, self.reason = kb, reason


@dataclass
class DocumentInput:
    root: str
    source: str
    file_type: str
    title: str | None
    content_hash: str
    size: int
    groups: Sequence[str]
    modified_at: datetime | None = None


@dataclass
class ChunkInput:
    ordinal: int
    text: str
    page: int | None
    heading: str | None


@dataclass
class StoredDocument:
    id: int
    kb: str
    root: str
    source: str
    file_type: str
    title: str | None
    content_hash: str
    groups: str
    chunk_count: int
    size: int
    ingested_at: object = None
    index_version: str | None = None


@dataclass
class KnowledgeBaseStats:
    name: str
    embedder: str
    dimension: int
    documents: int
    chunks: int
    index_version: int | None
    index_vectors: int | None
    generation: int
    index_generation: int | None
    # Documents whose chunks were made by another chunker/embedder configuration than the running
    # one (index_version differs, or was not recorded): `ingest reindex --kb` rebuilds them.
    stale_documents: int = 0


_CHUNKS_WITH_DOCUMENTS = (
    sa.select(ChunkRow.id, ChunkRow.document_id, ChunkRow.page, ChunkRow.heading, ChunkRow.text, ChunkRow.groups,
              ChunkRow.kb, DocumentRow.source, DocumentRow.title)
    .join(DocumentRow, DocumentRow.id == ChunkRow.document_id)
    .where(ChunkRow.id.in_(sa.bindparam("ids", expanding=True)))
)


def _batched(items: Sequence[int], size: int = _ID_BATCH) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _as_document(row: DocumentRow) -> StoredDocument:
    return StoredDocument(
        id=row.id, kb=row.kb, root=row.root, source=row.source, file_type=row.file_type, title=row.title,
        content_hash=row.content_hash, groups=row.groups, chunk_count=row.chunk_count, size=row.size,
        ingested_at=row.ingested_at, index_version=row.index_version,
    )


class KnowledgeBaseStore:
    def __init__(
        self,
        engine: Engine,
        index_root: Path,
        embedder_name: str,
        dimension: int,
        *,
        approximate_from: int = 50_000,
        nprobe: int = 64,
        index_version: str | None = None,
        heading_weight: float = 0.0,
    ):
        """``index_version`` names what produces the chunks and vectors written through this store
        (embedder, chunker settings); it is recorded on every document written, and documents with
        another value are reported stale. ``heading_weight``: BM25 weight of a chunk's heading
        path (document title > section > ...) relative to its text; 0 leaves headings out."""
        self.engine = engine
        self.index_root = Path(index_root)
        self.embedder_name = embedder_name
        self.dimension = dimension
        self.approximate_from = approximate_from  # switch FAISS to IVF at this many chunks
        self.nprobe = nprobe
        self.index_version = index_version
        self.heading_weight = float(heading_weight)
        self._directories: dict[str, IndexDirectory] = {}

    # Knowledge bases -------------------------------------------------------------------------
    def directory(self, kb: str) -> IndexDirectory:
        if kb in self._directories:
            return self._directories[kb]
        directory = IndexDirectory(self.index_root / kb)
        if directory.path.is_dir():  # kept (it remembers the files it verified); not for any name asked
            self._directories[kb] = directory
        return directory

    def published(self, kb: str) -> Manifest | None:
        """The manifest in use, once its files pass their check; KnowledgeBaseUnavailable otherwise
        (also for files overwritten after a process loaded them: what it serves would not survive
        a restart, and readiness reports the knowledge base)."""
        directory = self.directory(kb)
        reason = directory.verify()
        if reason:
            raise KnowledgeBaseUnavailable(kb, reason)
        return directory.manifest()

    def damaged(self) -> dict[str, str]:
        """Knowledge bases whose published index files fail their check, with the reason."""
        return {kb: reason for kb in self.list_kbs() if (reason := self.directory(kb).verify())}

    def ensure_kb(self, kb: str) -> KnowledgeBaseRow:
        _check_name(kb)
        with Session(self.engine) as session:
            row = session.get(KnowledgeBaseRow, kb)
            if row is None:
                row = KnowledgeBaseRow(name=kb, embedder=self.embedder_name, dimension=self.dimension)
                session.add(row)
                try:
                    session.commit()
                except sa.exc.IntegrityError:  # created concurrently by another process
                    session.rollback()
                    row = session.get(KnowledgeBaseRow, kb)
                session.refresh(row)
            elif row.embedder != self.embedder_name or row.dimension != self.dimension:
                raise KnowledgeBaseError(
                    f"knowledge base {kb!r} was built with embedder {row.embedder!r} ({row.dimension} dims); "
                    f"the configured embedder is {self.embedder_name!r} ({self.dimension} dims). "
                    "Use another knowledge base name or delete and re-ingest this one."
                )
            return row

    def switch_embedder(self, kb: str) -> bool:
        """Make ``kb`` a knowledge base of the configured embedder (``ingest reindex`` after an
        embedder change; never implicit). Its documents stay stale until rebuilt: their old
        vectors (another model, maybe another width) are left out of the vector index, so until
        then they are found by BM25 only. True when the embedder changed."""
        row = self.get_kb(kb)
        if row.embedder == self.embedder_name and row.dimension == self.dimension:
            return False
        with self.directory(kb).writer_lock():
            with Session(self.engine) as session:
                session.exec(
                    sa.update(KnowledgeBaseRow).where(KnowledgeBaseRow.name == kb)
                    .values(embedder=self.embedder_name, dimension=self.dimension, generation=KnowledgeBaseRow.generation + 1)
                )
                session.commit()
        log.warning("knowledge base %s: embedder %s (%d dims) -> %s (%d dims); documents are rebuilt by reindex",
                    kb, row.embedder, row.dimension, self.embedder_name, self.dimension)
        return True

    def get_kb(self, kb: str) -> KnowledgeBaseRow:
        with Session(self.engine) as session:
            row = session.get(KnowledgeBaseRow, kb)
        if row is None:
            raise KnowledgeBaseNotFound(f"unknown knowledge base {kb!r}; ingest documents into it first")
        return row

    def list_kbs(self) -> list[str]:
        with Session(self.engine) as session:
            return list(session.exec(select(KnowledgeBaseRow.name).order_by(KnowledgeBaseRow.name)))

    def delete_kb(self, kb: str) -> None:
        directory = self.directory(kb)
        with directory.writer_lock():
            with Session(self.engine) as session:
                session.exec(sa.delete(ChunkRow).where(ChunkRow.kb == kb))
                session.exec(sa.delete(DocumentRow).where(DocumentRow.kb == kb))
                session.exec(sa.delete(KnowledgeBaseRow).where(KnowledgeBaseRow.name == kb))
                session.commit()
            directory.remove()

    def stats(self, kb: str) -> KnowledgeBaseStats:
        row = self.get_kb(kb)
        with Session(self.engine) as session:
            documents = session.exec(select(sa.func.count()).select_from(DocumentRow).where(DocumentRow.kb == kb)).one()
            chunks = session.exec(select(sa.func.count()).select_from(ChunkRow).where(ChunkRow.kb == kb)).one()
        manifest = self.directory(kb).manifest()
        return KnowledgeBaseStats(
            name=kb, embedder=row.embedder, dimension=row.dimension, documents=documents, chunks=chunks,
            index_version=manifest.version if manifest else None,
            index_vectors=manifest.count if manifest else None,
            generation=row.generation, index_generation=manifest.generation if manifest else None,
            stale_documents=self.stale_documents(kb),
        )

    def stale_documents(self, kb: str) -> int:
        """How many documents of ``kb`` were indexed under another index_version than this store's."""
        if self.index_version is None:
            return 0
        with Session(self.engine) as session:
            return session.exec(
                select(sa.func.count()).select_from(DocumentRow).where(
                    DocumentRow.kb == kb,
                    sa.or_(DocumentRow.index_version.is_(None), DocumentRow.index_version != self.index_version),
                )
            ).one()

    # Documents and chunks -------------------------------------------------------------------
    def documents(self, kb: str, root: str | None = None) -> list[StoredDocument]:
        with Session(self.engine) as session:
            query = select(DocumentRow).where(DocumentRow.kb == kb)
            if root is not None:
                query = query.where(DocumentRow.root == root)
            return [_as_document(row) for row in session.exec(query.order_by(DocumentRow.root, DocumentRow.source))]

    def chunk_ids(self, kb: str, vectors_only: bool = False) -> np.ndarray:
        """Chunk ids of ``kb``; with ``vectors_only``, those whose stored vector has this store's
        width (after an embedder switch, not-yet-reindexed chunks hold the old model's vectors)."""
        query = select(ChunkRow.id).where(ChunkRow.kb == kb)
        if vectors_only:
            query = query.where(sa.func.length(ChunkRow.embedding) == 4 * self.dimension)
        with Session(self.engine) as session:
            ids = session.exec(query).all()
        return np.asarray(sorted(ids), dtype=np.int64)

    def chunks(self, ids: Sequence[int]) -> dict[int, ChunkRow]:
        found: dict[int, ChunkRow] = {}
        with Session(self.engine) as session:
            for batch in _batched(list(ids)):
                for row in session.exec(select(ChunkRow).where(ChunkRow.id.in_(batch))):
                    session.expunge(row)
                    found[row.id] = row
        return found

    def chunks_with_documents(self, ids: Sequence[int]) -> list:
        """For each of ``ids`` that exists with its document: the chunk's id, document_id, page,
        heading, text, groups and kb, and the document's source and title (no vector). One cached
        statement per call instead of two ORM queries: the rows a search returns (a search's
        second-largest cost after the query embedding, docs/benchmarks.md "Search over HTTP")."""
        found = []
        with self.engine.connect() as conn:
            for batch in _batched(list(ids)):
                found += conn.execute(_CHUNKS_WITH_DOCUMENTS, {"ids": list(batch)}).all()
        return found

    # Ingest runs ----------------------------------------------------------------------------
    def start_run(self, kb: str, root: str) -> int:
        with Session(self.engine) as session:
            row = IngestRunRow(kb=kb, root=root)
            session.add(row)
            session.commit()
            return row.id

    def finish_run(self, run_id: int, status: str, report: dict | None) -> None:
        with Session(self.engine) as session:
            session.exec(
                sa.update(IngestRunRow)
                .where(IngestRunRow.id == run_id)
                .values(status=status, finished_at=utcnow(), report=json.dumps(report) if report else None)
            )
            session.commit()

    def recent_runs(self, limit: int = 10) -> list[dict]:
        """Latest runs; a 'running' run whose writer lock is free was killed: shown as interrupted."""
        with Session(self.engine) as session:
            rows = session.exec(select(IngestRunRow).order_by(IngestRunRow.id.desc()).limit(limit)).all()
        runs = []
        for row in rows:
            status = row.status
            if status == "running" and not self.directory(row.kb).is_locked():
                status = "interrupted"
            runs.append({"id": row.id, "kb": row.kb, "root": row.root, "started_at": row.started_at,
                         "finished_at": row.finished_at, "status": status,
                         "report": json.loads(row.report) if row.report else None})
        return runs

    # Index ----------------------------------------------------------------------------------
    def load_indexes(self, kb: str) -> tuple[VectorIndex, LexicalIndex, Manifest | None]:
        """A reader's view: the published indexes, brought up to date with the rows in memory."""
        row = self.get_kb(kb)
        try:
            vectors, lexical, manifest = self.directory(kb).load(self.dimension, self.nprobe)
        except IndexCorrupted as exc:
            raise KnowledgeBaseUnavailable(kb, str(exc)) from exc
        lexical, rebuilt = self._lexical_for_weight(lexical)
        if manifest is None or manifest.generation != row.generation or rebuilt:
            self._reconcile(kb, vectors, lexical)
        return vectors, lexical, manifest

    def _lexical_for_weight(self, lexical: LexicalIndex) -> tuple[LexicalIndex, bool]:
        """``lexical``, or an empty index to refill from the rows when it was built with another
        heading weight (the weight is folded into its counts)."""
        if lexical.field_weight == self.heading_weight:
            return lexical, False
        return LexicalIndex(self.heading_weight), True

    def chunk_tokens(self, title: str | None, texts: Sequence[str], headings: Sequence[str | None]) -> tuple[list, list | None]:
        """BM25 tokens of chunks: (body token lists, heading-field token lists or None)."""
        body = [tokenize(t) for t in texts]
        if not self.heading_weight:
            return body, None
        return body, [tokenize(chunk_header(title, h)) for h in headings]

    def load_index(self, kb: str) -> VectorIndex:
        return self.load_indexes(kb)[0]

    def _reconcile(self, kb: str, vectors: VectorIndex, lexical: LexicalIndex) -> bool:
        """Make both indexes hold exactly the chunk rows of ``kb`` (after a crash or a stale load)."""
        all_ids = self.chunk_ids(kb)
        changed = False
        for index in (vectors, lexical):
            db_ids = all_ids
            if index is vectors and self.stale_documents(kb):  # maybe vectors of another embedder
                db_ids = self.chunk_ids(kb, vectors_only=True)
            index_ids = index.ids()
            extra = np.setdiff1d(index_ids, db_ids)
            missing = np.setdiff1d(db_ids, index_ids)
            if len(extra):
                index.remove(extra.tolist())
            for batch in _batched(missing.tolist()):
                with Session(self.engine) as session:
                    if index is vectors:
                        rows = session.exec(select(ChunkRow.id, ChunkRow.embedding).where(ChunkRow.id.in_(batch))).all()
                        vectors.add([r[0] for r in rows], _vectors([r[1] for r in rows], self.dimension))
                    else:
                        rows = session.exec(
                            select(ChunkRow.id, ChunkRow.text, ChunkRow.heading, DocumentRow.title)
                            .join(DocumentRow, DocumentRow.id == ChunkRow.document_id)
                            .where(ChunkRow.id.in_(batch))
                        ).all()
                        fields = [tokenize(chunk_header(r[3], r[2])) for r in rows] if self.heading_weight else None
                        lexical.add([r[0] for r in rows], [tokenize(r[1]) for r in rows], fields)
            changed = changed or bool(len(extra) or len(missing))
        return changed

    @contextmanager
    def writer(self, kb: str, checkpoint_seconds: float = 60.0) -> Iterator["KnowledgeBaseWriter"]:
        self.ensure_kb(kb)
        directory = self.directory(kb)
        with directory.writer_lock():
            try:
                vectors, lexical, manifest = directory.load(self.dimension, self.nprobe)
            except IndexCorrupted as exc:  # rebuilt from the rows below (they hold every vector)
                log.warning("knowledge base %s: %s; rebuilding its index from the database", kb, exc)
                vectors, lexical, manifest = VectorIndex(self.dimension, nprobe=self.nprobe), LexicalIndex(), None
            lexical, rebuilt = self._lexical_for_weight(lexical)
            writer = KnowledgeBaseWriter(self, kb, vectors, lexical, directory, checkpoint_seconds)
            if self._reconcile(kb, vectors, lexical) or manifest is None or rebuilt:
                writer.dirty = True
            try:
                yield writer
            finally:
                # The in-memory indexes mirror only committed rows, so publishing after an error
                # is safe and saves the next reader a reconcile.
                writer.publish()


def _vectors(blobs: Iterable[bytes], dimension: int) -> np.ndarray:
    data = b"".join(blobs)
    return np.frombuffer(data, dtype=np.float32).reshape(-1, dimension)


def _check_name(kb: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", kb) or kb in {".", ".."}:
        raise KnowledgeBaseError(
            f"invalid knowledge base name {kb!r}: use letters, digits, '-', '_' or '.' (max 128 chars)"
        )


@dataclass
class KnowledgeBaseWriter:
    store: KnowledgeBaseStore
    kb: str
    index: VectorIndex
    lexical: LexicalIndex
    directory: IndexDirectory
    checkpoint_seconds: float
    dirty: bool = False
    _last_publish: float = field(default_factory=time.monotonic)

    @property
    def engine(self) -> Engine:
        return self.store.engine

    def _bump(self, session: Session) -> None:
        session.exec(
            sa.update(KnowledgeBaseRow)
            .where(KnowledgeBaseRow.name == self.kb)
            .values(generation=KnowledgeBaseRow.generation + 1)
        )

    def replace_documents(self, items: Sequence[tuple[DocumentInput, Sequence[ChunkInput], np.ndarray]]) -> int:
        """Insert or replace documents with their chunks and vectors in one transaction."""
        if not items:
            return 0
        removed: list[int] = []
        added_ids: list[int] = []
        added_vectors: list[np.ndarray] = []
        with Session(self.engine) as session:
            for doc, chunks, vectors in items:
                groups = encode_groups(doc.groups)
                row = session.exec(
                    select(DocumentRow).where(
                        DocumentRow.kb == self.kb, DocumentRow.root == doc.root, DocumentRow.source == doc.source
                    )
                ).first()
                if row is None:
                    row = DocumentRow(kb=self.kb, root=doc.root, source=doc.source, file_type=doc.file_type,
                                      content_hash=doc.content_hash, size=doc.size, groups=groups)
                    session.add(row)
                    session.flush()
                else:
                    removed.extend(session.exec(select(ChunkRow.id).where(ChunkRow.document_id == row.id)).all())
                    session.exec(sa.delete(ChunkRow).where(ChunkRow.document_id == row.id))
                row.file_type, row.title, row.content_hash = doc.file_type, doc.title, doc.content_hash
                row.size, row.groups, row.chunk_count, row.ingested_at = doc.size, groups, len(chunks), utcnow()
                row.modified_at = doc.modified_at
                row.index_version = self.store.index_version
                vectors = np.ascontiguousarray(vectors, dtype=np.float32)
                chunk_rows = [
                    ChunkRow(document_id=row.id, kb=self.kb, ordinal=c.ordinal, text=c.text, page=c.page,
                             heading=c.heading, groups=groups, embedding=vectors[i].tobytes())
                    for i, c in enumerate(chunks)
                ]
                session.add_all(chunk_rows)
                session.flush()
                added_ids.extend(r.id for r in chunk_rows)
                added_vectors.append(vectors.reshape(len(chunks), self.store.dimension))
            self._bump(session)
            session.commit()
        # The rows are durable; now mirror the change in the indexes (reconciled after a crash).
        self.index.remove(removed)
        self.lexical.remove(removed)
        if added_ids:
            self.index.add(added_ids, np.concatenate(added_vectors))
            bodies, fields = [], []
            for doc, chunks, _ in items:
                body, field_tokens = self.store.chunk_tokens(doc.title, [c.text for c in chunks], [c.heading for c in chunks])
                bodies.extend(body)
                fields.extend(field_tokens or [])
            self.lexical.add(added_ids, bodies, fields if self.store.heading_weight else None)
        self.dirty = True
        self.maybe_checkpoint()
        return len(added_ids)

    def regroup(self, updates: Sequence[tuple[int, Sequence[str]]]) -> None:
        """Change who may read documents whose content did not change (no re-embedding)."""
        if not updates:
            return
        with Session(self.engine) as session:
            for document_id, groups in updates:
                encoded = encode_groups(groups)
                session.exec(sa.update(DocumentRow).where(DocumentRow.id == document_id).values(groups=encoded))
                session.exec(sa.update(ChunkRow).where(ChunkRow.document_id == document_id).values(groups=encoded))
            self._bump(session)
            session.commit()
        self.dirty = True  # republish so the manifest names the current generation

    def delete_documents(self, document_ids: Sequence[int]) -> int:
        if not document_ids:
            return 0
        removed: list[int] = []
        with Session(self.engine) as session:
            for batch in _batched(list(document_ids)):
                removed.extend(session.exec(select(ChunkRow.id).where(ChunkRow.document_id.in_(batch))).all())
                session.exec(sa.delete(ChunkRow).where(ChunkRow.document_id.in_(batch)))
                session.exec(sa.delete(DocumentRow).where(DocumentRow.id.in_(batch)))
            self._bump(session)
            session.commit()
        self.index.remove(removed)
        self.lexical.remove(removed)
        self.dirty = True
        self.maybe_checkpoint()
        return len(removed)

    def maybe_checkpoint(self) -> None:
        if self.dirty and time.monotonic() - self._last_publish >= self.checkpoint_seconds:
            self.publish()

    def publish(self) -> None:
        if not self.dirty:
            return
        generation = self.store.get_kb(self.kb).generation
        self.index.optimize(self.store.approximate_from)
        self.directory.publish(self.index, self.lexical, generation)
        self.dirty = False
        self._last_publish = time.monotonic()
