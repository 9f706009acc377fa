"""FAISS vectors of one knowledge base, keyed by stable int64 chunk ids, published atomically.

Layout under ``<index_root>/<kb>/``::

    manifest.json            {"version": 7, "vectors": "vectors-000007.faiss", "count": ..., ...}
    vectors-000007.faiss     the index the manifest names (older versions are pruned)
    .lock                    held by the single writer (an ingest) of this knowledge base

A new version is written to a temporary file, fsynced and renamed; then the manifest is replaced the
same way. Readers follow the manifest, so they see either the old or the new version, never a torn
file. The SQL rows stay the source of truth: :meth:`reconcile` brings a stale index (an ingest killed
between its database commit and its publish) back in line.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from retrieval.lexical import LexicalIndex

MANIFEST = "manifest.json"


class IndexCorrupted(Exception):
    """A published index file is missing, differs from its sha256 in the manifest, or cannot be read."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents 0700: indexes hold every document's words."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Manifest:
    version: int
    vectors: str
    lexical: str
    count: int
    dimension: int
    generation: int  # the database generation this index reflects
    kind: str = "flat"  # flat (exact) | ivf (approximate)
    trained_size: int = 0  # IVF: vectors it was trained on
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> hash (absent in older manifests)

    @classmethod
    def read(cls, directory: Path) -> "Manifest | None":
        path = directory / MANIFEST
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise IndexCorrupted(f"{MANIFEST} cannot be read ({type(exc).__name__})") from None


class IdFilter:
    """A set of permitted ids in the form FAISS tests fastest, built once and reused per search.

    A bitmap over the id range answers membership with one shift and mask per scanned vector;
    building an ``IDSelectorBatch`` hash set for every query cost more than the search itself.
    """

    def __init__(self, ids: np.ndarray):
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)
        upper = int(self.ids.max()) + 1 if len(self.ids) else 1
        bits = np.zeros(upper, dtype=bool)
        bits[self.ids] = True
        self._bitmap = np.packbits(bits, bitorder="little")  # FAISS keeps a pointer: hold the array
        self.selector = faiss.IDSelectorBitmap(len(self._bitmap), faiss.swig_ptr(self._bitmap))

    def __len__(self) -> int:
        return len(self.ids)


class VectorIndex:
    """Inner-product search over normalised vectors (cosine similarity) keyed by chunk ids.

    Exact (``IndexIDMap2`` over ``IndexFlatIP``) for small knowledge bases; approximate
    (``IndexIVFFlat``) once :meth:`optimize` finds it past the configured size. IVF rather than HNSW
    because FAISS's HNSW cannot remove vectors, and ingestion removes the chunks of changed files.
    """

    def __init__(self, dimension: int, index: faiss.Index | None = None, nprobe: int = 64, trained_size: int = 0):
        self.dimension = dimension
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))
        self.nprobe = nprobe
        self.trained_size = trained_size  # vectors the IVF was trained on (0 for flat)

    @property
    def kind(self) -> str:
        return "ivf" if isinstance(self.index, faiss.IndexIVF) else "flat"

    def __len__(self) -> int:
        return self.index.ntotal

    def ids(self) -> np.ndarray:
        if self.kind == "flat":
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        invlists = self.index.invlists
        parts = [
            faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
            for i in range(self.index.nlist)
            if invlists.list_size(i)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """All (ids, vectors); used to convert between index kinds without re-embedding."""
        if self.kind == "flat":
            flat = faiss.downcast_index(self.index.index)
            data = faiss.rev_swig_ptr(flat.get_xb(), len(self) * self.dimension)
            return self.ids(), np.array(data, dtype=np.float32).reshape(len(self), self.dimension)
        invlists = self.index.invlists
        ids, vecs = [], []
        for i in range(self.index.nlist):
            size = invlists.list_size(i)
            if size:
                ids.append(faiss.rev_swig_ptr(invlists.get_ids(i), size).copy())
                codes = faiss.rev_swig_ptr(invlists.get_codes(i), size * self.dimension * 4)
                vecs.append(np.frombuffer(codes.tobytes(), dtype=np.float32).reshape(size, self.dimension))
        if not ids:
            return np.empty(0, dtype=np.int64), np.empty((0, self.dimension), dtype=np.float32)
        return np.concatenate(ids).astype(np.int64), np.concatenate(vecs)

    def add(self, ids: Iterable[int], vectors: np.ndarray) -> None:
        id_array = np.asarray(list(ids), dtype=np.int64)
        if len(id_array) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(id_array), self.dimension)
        self.index.add_with_ids(vectors, id_array)

    def remove(self, ids: Iterable[int]) -> int:
        id_array = np.asarray(list(ids), dtype=np.int64)
        if len(id_array) == 0:
            return 0
        # IDSelectorBatch is a hash set; IDSelectorArray would scan the id list per stored vector.
        return int(self.index.remove_ids(faiss.IDSelectorBatch(len(id_array), faiss.swig_ptr(id_array))))

    def search(
        self, query: np.ndarray, k: int, allowed_ids: np.ndarray | IdFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids); with ``allowed_ids`` the restriction is applied inside FAISS.

        On an IVF index a restrictive filter leaves fewer permitted vectors in each probed list, so
        ``nprobe`` grows with the inverse of the permitted fraction, and widens further until k
        permitted results are found or every list was scanned: k permitted chunks come back
        whenever k exist.
        """
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dimension)
        if allowed_ids is not None and not isinstance(allowed_ids, IdFilter):
            allowed_ids = IdFilter(allowed_ids)
        available = len(self) if allowed_ids is None else len(allowed_ids)
        k = min(k, len(self), available)
        if k <= 0:
            return np.empty(0, dtype=np.float32), np.empty(0, dtype=np.int64)
        selector = allowed_ids.selector if allowed_ids is not None else None
        if self.kind == "flat":
            params = faiss.SearchParameters(sel=selector) if selector is not None else None
            scores, ids = self.index.search(query, k, params=params)
        else:
            # Probe more lists the fewer vectors are permitted, so that about as many permitted
            # vectors are scanned as an unfiltered search scans (recall stays comparable).
            fraction = available / len(self)
            nprobe = min(self.index.nlist, int(np.ceil(self.nprobe / fraction)))
            while True:
                params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe) if selector is not None else (
                    faiss.SearchParametersIVF(nprobe=nprobe)
                )
                scores, ids = self.index.search(query, k, params=params)
                if (ids[0] >= 0).sum() >= k or nprobe >= self.index.nlist:
                    break
                nprobe = min(nprobe * 4, self.index.nlist)
        keep = ids[0] >= 0
        return scores[0][keep], ids[0][keep]

    def optimize(self, approximate_from: int) -> bool:
        """Switch to IVF past ``approximate_from`` vectors, retrain as it grows 4x; True if rebuilt."""
        n = len(self)
        if n < approximate_from:
            if self.kind == "ivf":  # shrank well below the threshold: exact is cheap again
                self._rebuild_flat()
                return True
            return False
        if self.kind == "ivf" and n < 4 * self.trained_size:
            return False
        ids, vectors = self.vectors()
        nlist = max(16, int(4 * np.sqrt(n)))
        quantizer = faiss.IndexFlatIP(self.dimension)
        index = faiss.IndexIVFFlat(quantizer, self.dimension, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = vectors[rng.choice(n, size=min(n, nlist * 64), replace=False)]
        index.train(sample)
        index.add_with_ids(vectors, ids)
        self.index, self.trained_size = index, n
        return True

    def _rebuild_flat(self) -> None:
        ids, vectors = self.vectors()
        self.index, self.trained_size = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dimension)), 0
        self.add(ids, vectors)

    def serialize(self) -> bytes:
        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def deserialize(cls, data: bytes, dimension: int, nprobe: int = 64, trained_size: int = 0) -> "VectorIndex":
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if index.d != dimension:
            raise ValueError(f"index dimension {index.d} does not match the embedder's {dimension}")
        return cls(dimension, index, nprobe, trained_size)


class IndexDirectory:
    """The published versions of one knowledge base's vector index."""

    def __init__(self, path: Path):
        self.path = path
        self._verified: set[tuple] = set()

    def manifest(self) -> Manifest | None:
        return Manifest.read(self.path)

    def _read_verified(self, manifest: Manifest, name: str) -> bytes:
        try:
            data = (self.path / name).read_bytes()
        except FileNotFoundError:
            raise IndexCorrupted(f"index file {name} is missing") from None
        expected = manifest.sha256.get(name)
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise IndexCorrupted(f"index file {name} does not match its sha256 in the manifest")
        return data

    def load(self, dimension: int, nprobe: int = 64) -> tuple[VectorIndex, LexicalIndex, Manifest | None]:
        """The published indexes, each file checked against its sha256; IndexCorrupted otherwise
        (an overwritten vector or id map would silently change scores or drop results)."""
        manifest = self.manifest()
        if manifest is None:
            return VectorIndex(dimension, nprobe=nprobe), LexicalIndex(), None
        raw_vectors = self._read_verified(manifest, manifest.vectors)
        raw_lexical = self._read_verified(manifest, manifest.lexical)
        try:
            vectors = VectorIndex.deserialize(raw_vectors, dimension, nprobe, manifest.trained_size)
            lexical = LexicalIndex.deserialize(raw_lexical)
        except Exception as exc:  # FAISS and numpy raise many kinds on damaged bytes
            raise IndexCorrupted(f"index files of version {manifest.version} cannot be read: {exc}") from exc
        return vectors, lexical, manifest

    def verify(self) -> str | None:
        """What is wrong with the published files, or None. Hashes are remembered per file size and
        modification time, so a readiness probe re-reads only files that changed."""
        try:
            manifest = self.manifest()
            if manifest is None:
                return None
            for name in (manifest.vectors, manifest.lexical):
                try:
                    info = (self.path / name).stat()
                except FileNotFoundError:
                    raise IndexCorrupted(f"index file {name} is missing") from None
                key = (name, info.st_size, info.st_mtime_ns, manifest.sha256.get(name))
                if key not in self._verified:
                    self._read_verified(manifest, name)
                    self._verified = {k for k in self._verified if k[0] != name} | {key}
        except IndexCorrupted as exc:
            return str(exc)
        return None

    def publish(self, vectors: VectorIndex, lexical: LexicalIndex, generation: int) -> Manifest:
        private_dirs(self.path)
        try:
            previous = self.manifest()
        except IndexCorrupted:  # replaced by this version
            previous = None
        version = (previous.version if previous else 0) + 1
        names = (f"vectors-{version:06d}.faiss", f"lexical-{version:06d}.npz")
        hashes = {}
        for name, data in zip(names, (vectors.serialize(), lexical.serialize())):
            write_atomic(self.path / name, data)
            hashes[name] = hashlib.sha256(data).hexdigest()
        manifest = Manifest(
            version, names[0], names[1], len(vectors), vectors.dimension, generation, vectors.kind, vectors.trained_size,
            hashes,
        )
        write_atomic(self.path / MANIFEST, json.dumps(manifest.__dict__, indent=2).encode())
        self._prune(keep={*names, *((previous.vectors, previous.lexical) if previous else ())})
        return manifest

    def _prune(self, keep: set[str]) -> None:
        # Keep the previous version too: a reader may have read the old manifest a moment ago.
        for old in [*self.path.glob("vectors-*.faiss"), *self.path.glob("lexical-*.npz")]:
            if old.name not in keep:
                old.unlink(missing_ok=True)
        for tmp in [*self.path.glob(".vectors-*"), *self.path.glob(".lexical-*"), *self.path.glob(f".{MANIFEST}.*")]:
            tmp.unlink(missing_ok=True)

    def remove(self) -> None:
        if self.path.is_dir():
            for child in self.path.iterdir():
                child.unlink()
            self.path.rmdir()

    @contextmanager
    def writer_lock(self, blocking: bool = True) -> Iterator[None]:
        """One writer per knowledge base across processes (released by the OS if we are killed)."""
        private_dirs(self.path)
        with os.fdopen(os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600), "a+") as handle:
            flags = fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB
            try:
                fcntl.flock(handle, flags)
            except BlockingIOError as exc:
                raise RuntimeError(f"another ingest is writing to {self.path.name}") from exc
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def is_locked(self) -> bool:
        if not (self.path / ".lock").exists():
            return False
        with open(self.path / ".lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
