"""Incremental ingestion: folder -> loaders -> chunker -> embedder -> knowledge-base store.

Per run over one root folder:
- every supported file is hashed (sha256); a file whose hash and groups match the stored document
  costs nothing more; a changed groups-only file is regrouped without re-embedding;
- new and changed files are processed in batches of ``batch_files``: parsed, chunked, embedded, then
  committed in one transaction per batch (old chunks of changed files are replaced);
- documents of this root whose file disappeared are deleted (deletion sync) unless disabled;
- a corrupt file is reported with its reason and skipped; its previously ingested version is kept;
- files that need OCR (images, scanned PDF pages) wait until every other file of the run is stored,
  then are OCR'd one per batch, so slow OCR never holds back the rest of the run;
- an e-mail's attachments of supported types are documents of their own (``mail.eml#name``), stored
  in the same transaction as the message, with its groups and its content hash; they go when the
  message goes, or when a new version of the message no longer carries them.
Memory is bounded by one batch of files and their chunks.
"""

from __future__ import annotations

import os
import stat
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from ingest.acl import ACL_FILE, AclResolver
from ingest.chunking import Chunker
from ingest.native_memory import limit_for_console_run, release_free_memory
from ingest.loaders import (
    FileSkipped,
    LoadedDocument,
    LoaderError,
    LoaderOptions,
    OcrNeeded,
    file_type_for,
    load_document,
)
from retrieval.embedder import Embedder
from retrieval.store import ChunkInput, DocumentInput, KnowledgeBaseStore, KnowledgeBaseWriter, StoredDocument
from retrieval.tables import encode_groups
from security.integrity import sha256_file


class IngestError(Exception):
    """The run cannot start (missing folder, bad ACL file, ...)."""


@dataclass
class FileFailure:
    source: str
    reason: str


@dataclass
class IngestReport:
    kb: str
    root: str
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    failed: int = 0
    skipped: int = 0  # unsupported file types, symbolic links, special files
    skipped_files: list[FileFailure] = field(default_factory=list)  # those skipped for a reason to show
    chunks: int = 0  # chunks embedded and stored by this run
    total_chunks: int = 0  # chunks in the knowledge base afterwards
    seconds: float = 0.0
    failures: list[FileFailure] = field(default_factory=list)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["seconds"] = round(self.seconds, 3)
        return data


class Progress(Protocol):
    def start(self, total_files: int) -> None: ...
    def advance(self, files: int = 0, chunks: int = 0) -> None: ...
    def finish(self) -> None: ...


class NoProgress:
    def start(self, total_files: int) -> None:
        pass

    def advance(self, files: int = 0, chunks: int = 0) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def finish(self) -> None:
        pass


def _note(progress: Progress, text: str) -> None:
    """Show what a long step is doing (e.g. "OCR scan.pdf page 3/40"); progress bars without a
    ``note`` method simply do not show it."""
    note = getattr(progress, "note", None)
    if note is not None:
        note(text)


# An attachment's source is its message's source, this marker, and the attachment's name.
ATTACHMENT_MARK = ".eml#"


def attachment_parent(source: str) -> str | None:
    """The message source an attachment document belongs to (None: not an attachment)."""
    at = source.lower().find(ATTACHMENT_MARK)
    return source[: at + len(ATTACHMENT_MARK) - 1] if at >= 0 else None


@dataclass
class _Pending:
    path: Path
    source: str
    content_hash: str
    size: int
    groups: list[str]
    existing: StoredDocument | None


def not_readable(file: Path) -> str | None:
    """Why a path found under the ingested folder is not read (None: a regular file, read it).

    Symbolic links are never followed: a link's target may lie outside the folder the user gave
    (``/etc/passwd``, the service's own secrets) or under other access rules (``pub/x.md ->
    ../hr/x.md`` would give HR's text the groups of ``pub/``). Special files are not read either: a
    FIFO would block the run, holding the knowledge base's write lock, forever. Checked with
    ``lstat`` (the link itself, not its target); os.walk does not descend into linked folders.
    """
    try:
        mode = os.lstat(file).st_mode
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if stat.S_ISLNK(mode):
        return "symbolic link, not followed (its target may be outside the folder or under other access rules)"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    return None


def walk_files(root: Path) -> Iterator[Path]:
    """Files under root in a stable order; hidden files and folders (.git, ...) are ignored."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder) / name


class _Overlap:
    """Embeds one parsed batch in background threads while the caller parses the next one.

    Parsing (HTML, PDF, Office: mostly Python, holding the GIL) and embedding (torch, which releases
    the GIL in its kernels) then use the cores at once instead of taking turns. With ``workers`` > 1
    a batch's texts are split (interleaved by length, so the parts cost alike) over that many
    embedders, each its own model copy on its own thread with ``threads`` torch threads: on 2 cores
    two single-threaded forward passes did more than one pass on 2 threads (docs/benchmarks.md).
    At most one batch is being embedded and one waits parsed, so memory stays bounded by two
    batches. Storing stays in the calling thread (the one holding the knowledge base's writer), in
    batch order: ``submit`` stores the previous batch once its vectors are there, ``drain`` the last.
    """

    def __init__(self, embedders: list[Embedder], store: Callable[[list, object], None], threads: int | None = None,
                 texts: Callable[[list], list[str]] = lambda parsed: [], own_process: bool = False):
        self.embedders = embedders
        self.own_process = own_process  # a console run: may set process-wide memory limits
        self.store = store
        self.texts = texts  # what is embedded for each chunk of a parsed batch
        self.threads = threads
        self.saved_threads: int | None = None
        self.pending: tuple[list, list[tuple[list[int], Future]]] | None = None
        self.pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> "_Overlap":
        self.pool = ThreadPoolExecutor(max_workers=len(self.embedders), thread_name_prefix="ingest-embed")
        if self.own_process:
            limit_for_console_run()
        if self.threads is not None:
            import torch  # the embedder's: torch's thread count is process-wide, restored on exit

            self.saved_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        return self

    def submit(self, parsed: list) -> None:
        if not parsed:
            return
        assert self.pool is not None
        # Load every model copy here, before any of them runs: loading switches torch's default
        # dtype for a moment, which must not happen under another worker's forward pass.
        for embedder in self.embedders:
            embedder.model
        texts = self.texts(parsed)
        by_length = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        parts = [by_length[k :: len(self.embedders)] for k in range(len(self.embedders))]
        futures = [(part, self.pool.submit(embedder.embed_passages, [texts[i] for i in part]))
                   for part, embedder in zip(parts, self.embedders) if part]
        self._store_pending()
        self.pending = (parsed, futures)

    def drain(self) -> None:
        self._store_pending()

    def _store_pending(self) -> None:
        if self.pending is not None:
            parsed, futures = self.pending
            self.pending = None
            results = [(part, future.result()) for part, future in futures]
            vectors = np.empty((sum(len(part) for part, _ in results), results[0][1].shape[1]), dtype=np.float32)
            for part, part_vectors in results:
                vectors[part] = part_vectors
            self.store(parsed, vectors)
            release_free_memory()  # the batch's activations and parsed pages are gone now

    def __exit__(self, *exc) -> None:
        # On an error the batch being embedded is dropped (nothing of it was stored); wait for the
        # threads so that no embedding runs on after the run has ended.
        self.pending = None
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.saved_threads is not None:
            import torch

            torch.set_num_threads(self.saved_threads)


class IngestPipeline:
    def __init__(
        self,
        store: KnowledgeBaseStore,
        embedder: Embedder,
        chunker: Chunker,
        *,
        default_groups: list[str],
        batch_files: int = 32,
        checkpoint_seconds: float = 60.0,
        max_file_bytes: int = 100 * 1024 * 1024,
        on_report: Callable[[IngestReport, str], None] | None = None,
        redact: Callable[[str], str] | None = None,
        loader_options: LoaderOptions | None = None,
        embed_threads: int | None = None,
        embed_workers: int = 1,
    ):
        """``on_report(report, status)`` is called at the end of every run, status "finished" or
        "failed" (the service records metrics from it; it must not raise)."""
        self.on_report = on_report
        self.store = store
        self.embedder = embedder
        self.chunker = chunker
        self.default_groups = default_groups
        self.batch_files = batch_files
        self.checkpoint_seconds = checkpoint_seconds
        self.max_file_bytes = max_file_bytes
        self.redact = redact  # e.g. PII redaction, applied to the text before chunking
        self.loader_options = loader_options or LoaderOptions()
        # torch threads while a run embeds (parsing takes another core meanwhile); None: unchanged.
        self.embed_threads = embed_threads
        # Embedding threads, each with its own copy of the model (loaded on the first run).
        self.embed_workers = embed_workers
        self._replicas: list[Embedder] = []

    def run(
        self,
        path: Path,
        kb: str,
        groups: list[str] | None = None,
        *,
        delete_missing: bool = True,
        progress: Progress | None = None,
        own_process: bool = True,
    ) -> IngestReport:
        """``own_process``: the run may set torch's process-wide thread count (``embed_threads``) and
        load more model copies (``embed_workers``), as a console ``ingest run`` does. False inside the
        server (uploads): its generation engine shares torch's threads, and one small file gains
        nothing from a second model copy held for the server's lifetime."""
        started = time.perf_counter()
        progress = progress or NoProgress()
        path = Path(path).expanduser().resolve()
        if not path.exists():
            raise IngestError(f"no such file or folder: {path}")
        # A single file is ingested relative to its folder, and never triggers deletion sync.
        root, files = (path.parent, [path]) if path.is_file() else (path, list(walk_files(path)))
        delete_missing = delete_missing and path.is_dir()
        acl = AclResolver(root, groups, self.default_groups)
        report = IngestReport(kb=kb, root=str(root))
        self.store.ensure_kb(kb)
        run_id = self.store.start_run(kb, str(root))
        try:
            self._run(files, root, kb, acl, report, delete_missing, progress, own_process)
        except BaseException:
            self.store.finish_run(run_id, "failed", report.as_dict())
            report.seconds = time.perf_counter() - started
            if self.on_report is not None:
                self.on_report(report, "failed")
            raise
        finally:
            progress.finish()
        report.seconds = time.perf_counter() - started
        self.store.finish_run(run_id, "finished", report.as_dict())
        if self.on_report is not None:
            self.on_report(report, "finished")
        return report

    def _run(
        self, files: list[Path], root: Path, kb: str, acl: AclResolver, report: IngestReport,
        delete_missing: bool, progress: Progress, own_process: bool = True,
    ) -> None:
        stored_hash: dict[str, str] = {}  # message source -> hash of the version stored now
        stored_sources: set[str] = set()  # every document source this run stored
        with self.store.writer(kb, self.checkpoint_seconds) as writer, _Overlap(
            self._embedders() if own_process else [self.embedder],
            lambda parsed, vectors: self._store(parsed, vectors, writer, report, progress, (stored_hash, stored_sources)),
            self.embed_threads if own_process else None, self._embedding_texts, own_process,
        ) as overlap:
            existing: dict[str, StoredDocument] = {}
            attachments_of: dict[str, list[StoredDocument]] = {}
            for doc in self.store.documents(kb, root=str(root)):
                existing[doc.source] = doc
                if (parent := attachment_parent(doc.source)) is not None:
                    attachments_of.setdefault(parent, []).append(doc)
            seen: set[str] = set()
            ocr_queue: list[_Pending] = []
            progress.start(len(files))
            batch: list[_Pending] = []
            regroups: list[tuple[int, list[str]]] = []
            for file in files:
                source = file.relative_to(root).as_posix()
                reason = not_readable(file)
                if reason is not None:
                    report.skipped += 1
                    report.skipped_files.append(FileFailure(source, reason))
                    progress.advance(files=1)
                    continue
                if file.name == ACL_FILE or file_type_for(file) is None:
                    report.skipped += file.name != ACL_FILE
                    progress.advance(files=1)
                    continue
                seen.add(source)
                pending = self._inspect(file, source, acl, existing.get(source), report)
                if pending is None:
                    progress.advance(files=1)
                    continue
                previous = pending.existing
                if previous is not None and previous.content_hash == pending.content_hash:
                    if previous.groups != encode_groups(pending.groups):
                        regroups.append((previous.id, pending.groups))
                        # An e-mail's attachments carry its groups.
                        regroups.extend((a.id, pending.groups) for a in attachments_of.get(source, ()))
                        report.updated += 1
                    else:
                        report.unchanged += 1
                    progress.advance(files=1)
                    continue
                batch.append(pending)
                if len(batch) >= self.batch_files:
                    overlap.submit(self._parse(batch, report, progress, ocr_queue))
                    batch = []
            overlap.submit(self._parse(batch, report, progress, ocr_queue))
            # OCR last, one file per transaction: everything else of the run is stored first, and
            # each OCR'd file is stored before the next is read, so a crash loses at most the file
            # being read (no overlap here: OCR takes seconds per page, embedding a file far less).
            overlap.drain()
            for pending in ocr_queue:
                overlap.submit(self._parse([pending], report, progress, None))
                overlap.drain()
            _note(progress, "")
            writer.regroup(regroups)
            gone = []
            for source, doc in existing.items():
                parent = attachment_parent(source)
                if parent is None:
                    if delete_missing and source not in seen:
                        gone.append(doc)
                elif parent in seen:
                    # Kept while it belongs to the stored version of its message (a new version
                    # that no longer carries it, or was stored before a crash, drops it). The
                    # hashes read at the start are stale for what this run stored: look again.
                    current = stored_hash.get(parent) or (existing[parent].content_hash if parent in existing else None)
                    if doc.content_hash != current and source not in stored_sources:
                        writer.delete_documents([doc.id])
                elif delete_missing:
                    gone.append(doc)
            if delete_missing:
                writer.delete_documents([doc.id for doc in gone])
                report.deleted = sum(1 for doc in gone if attachment_parent(doc.source) is None)
            report.total_chunks = len(writer.index)

    def _embedders(self) -> list[Embedder]:
        while len(self._replicas) < self.embed_workers - 1:
            self._replicas.append(self.embedder.replica())
        return [self.embedder, *self._replicas]

    def _inspect(
        self, file: Path, source: str, acl: AclResolver, existing: StoredDocument | None, report: IngestReport
    ) -> _Pending | None:
        try:
            size = file.stat().st_size
            if size > self.max_file_bytes:
                raise LoaderError(f"file too large ({size / 2**20:.1f} MiB > {self.max_file_bytes / 2**20:.0f} MiB)")
            return _Pending(file, source, sha256_file(file), size, acl.groups_for(file), existing)
        except (OSError, LoaderError) as exc:
            self._fail(report, source, exc)
            return None

    def _parse(
        self, batch: list[_Pending], report: IngestReport, progress: Progress, ocr_queue: list[_Pending] | None,
    ) -> list[tuple[_Pending, list[tuple[DocumentInput, list[ChunkInput]]]]]:
        """Load and chunk ``batch`` (embedded and stored in one transaction by :meth:`_store`). With
        ``ocr_queue``, files that need OCR are put there instead of being read; without it, OCR runs now."""
        if not batch:
            return []
        parsed: list[tuple[_Pending, list[tuple[DocumentInput, list[ChunkInput]]]]] = []
        for item in batch:
            if ocr_queue is None:
                options = replace(
                    self.loader_options, defer_ocr=False,
                    on_ocr_page=lambda done, total, source=item.source: _note(
                        progress, f"OCR {source} page {done}/{total}"),
                )
                _note(progress, f"OCR {item.source}")
            else:
                options = replace(self.loader_options, defer_ocr=True)
            try:
                document = load_document(item.path, options)
                parts = [(item.source, document, item.size)]
                for attachment in document.attachments:
                    source = f"{item.source}#{attachment.name}"
                    if attachment.document is not None:
                        parts.append((source, attachment.document, attachment.size))
                    elif attachment.skipped:
                        report.skipped += 1
                        report.skipped_files.append(FileFailure(source, attachment.skipped))
                    else:
                        self._fail(report, source, LoaderError(attachment.error or "unreadable"))
                docs = []
                for source, loaded, size in parts:
                    chunks = self._chunks(loaded)
                    if not chunks and source != item.source:
                        self._fail(report, source, LoaderError("no text to index"))
                        continue
                    if not chunks:
                        raise LoaderError("no text to index")
                    doc = DocumentInput(
                        root=str(report.root), source=source, file_type=loaded.file_type,
                        title=loaded.title or Path(source).stem, content_hash=item.content_hash,
                        size=size, groups=item.groups,
                        modified_at=datetime.fromtimestamp(item.path.stat().st_mtime, timezone.utc),
                    )
                    docs.append((doc, chunks))
            except OcrNeeded:
                assert ocr_queue is not None  # only raised when OCR is deferred
                ocr_queue.append(item)
                continue
            except FileSkipped as exc:
                report.skipped += 1
                report.skipped_files.append(FileFailure(item.source, str(exc)))
                progress.advance(files=1)
                continue
            except (OSError, LoaderError) as exc:
                self._fail(report, item.source, exc)
                progress.advance(files=1)
                continue
            except Exception as exc:  # a parser bug on one odd file must not stop the run
                self._fail(report, item.source, exc, unexpected=True)
                progress.advance(files=1)
                continue
            parsed.append((item, docs))
        return parsed

    def _embedding_texts(self, parsed: list) -> list[str]:
        """What is embedded for each chunk of a parsed batch (the chunker may put its heading path first)."""
        return [self.chunker.embedding_text(doc.title, chunk.heading, chunk.text)
                for _, docs in parsed for doc, chunks in docs for chunk in chunks]

    def _process(self, batch: list[_Pending], writer: KnowledgeBaseWriter, report: IngestReport, progress: Progress,
                 stored: tuple[dict[str, str], set[str]], ocr_queue: list[_Pending] | None) -> None:
        """One batch parsed, embedded and stored now, without overlap (``ingest reindex``)."""
        parsed = self._parse(batch, report, progress, ocr_queue)
        if parsed:
            self._store(parsed, self.embedder.embed_passages(self._embedding_texts(parsed)), writer, report, progress,
                        stored)
            release_free_memory()

    def _store(
        self, parsed: list[tuple[_Pending, list[tuple[DocumentInput, list[ChunkInput]]]]], vectors,
        writer: KnowledgeBaseWriter, report: IngestReport, progress: Progress, stored: tuple[dict[str, str], set[str]],
    ) -> None:
        """Store one parsed batch with its vectors in one transaction."""
        items, offset = [], 0
        for _, docs in parsed:
            for doc, chunks in docs:
                items.append((doc, chunks, vectors[offset : offset + len(chunks)]))
                offset += len(chunks)
        report.chunks += writer.replace_documents(items)
        stored_hash, stored_sources = stored
        for item, docs in parsed:
            stored_hash[item.source] = item.content_hash
            stored_sources.update(doc.source for doc, _ in docs)
            if item.existing is None:
                report.added += 1
            else:
                report.updated += 1
            progress.advance(files=1, chunks=sum(len(chunks) for _, chunks in docs))

    def _chunks(self, document: LoadedDocument) -> list[ChunkInput]:
        if self.redact is not None:
            document.title = self.redact(document.title) if document.title else document.title
            for section in document.sections:
                section.text = self.redact(section.text)
        # The stored heading is the section's heading path ("Guide > Install"), shown with results.
        return [ChunkInput(c.ordinal, c.text, c.page, c.heading_path or c.heading) for c in self.chunker.split(document)]

    @staticmethod
    def _fail(report: IngestReport, source: str, exc: BaseException, unexpected: bool = False) -> None:
        reason = f"{type(exc).__name__}: {exc}" if unexpected or isinstance(exc, OSError) else str(exc)
        report.failed += 1
        report.failures.append(FileFailure(source, reason))

    # Removal --------------------------------------------------------------------------------
    def remove(self, kb: str, target: str) -> list[StoredDocument]:
        """Remove documents by id, by absolute/relative file path, or by a folder prefix."""
        documents = self.store.documents(kb)
        if target.isdigit():
            chosen = [d for d in documents if d.id == int(target)]
        else:
            wanted = Path(target).expanduser()
            absolute = wanted.resolve() if wanted.exists() or wanted.is_absolute() else None
            chosen = []
            for d in documents:
                full = Path(d.root) / d.source
                if absolute is not None and (full == absolute or absolute in full.parents):
                    chosen.append(d)
                elif absolute is None and (d.source == target or d.source.startswith(target.rstrip("/") + "/")):
                    chosen.append(d)
        chosen_sources = {d.source for d in chosen}
        chosen += [d for d in documents if d not in chosen and attachment_parent(d.source) in chosen_sources]
        if chosen:
            with self.store.writer(kb, self.checkpoint_seconds) as writer:
                writer.delete_documents([d.id for d in chosen])
        return chosen
