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
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

MANIFEST = "manifest.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    count: int
    dimension: int
    generation: int  # the database generation this index reflects

    @classmethod
    def read(cls, directory: Path) -> "Manifest | None":
        path = directory / MANIFEST
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))


class VectorIndex:
    """An inner-product FAISS index over normalised vectors (cosine similarity) with chunk ids."""

    def __init__(self, dimension: int, index: faiss.Index | None = None):
        self.dimension = dimension
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))

    def __len__(self) -> int:
        return self.index.ntotal

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

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

    def search(self, query: np.ndarray, k: int, allowed_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids); with ``allowed_ids`` the restriction is applied inside FAISS."""
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dimension)
        params = None
        if allowed_ids is not None:
            allowed = np.ascontiguousarray(allowed_ids, dtype=np.int64)
            if len(allowed) == 0:
                return np.empty(0, dtype=np.float32), np.empty(0, dtype=np.int64)
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(len(allowed), faiss.swig_ptr(allowed)))
        k = min(k, len(self))
        if k <= 0:
            return np.empty(0, dtype=np.float32), np.empty(0, dtype=np.int64)
        scores, ids = self.index.search(query, k, params=params)
        keep = ids[0] >= 0
        return scores[0][keep], ids[0][keep]

    def serialize(self) -> bytes:
        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def deserialize(cls, data: bytes, dimension: int) -> "VectorIndex":
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if index.d != dimension:
            raise ValueError(f"index dimension {index.d} does not match the embedder's {dimension}")
        return cls(dimension, index)


class IndexDirectory:
    """The published versions of one knowledge base's vector index."""

    def __init__(self, path: Path):
        self.path = path

    def manifest(self) -> Manifest | None:
        return Manifest.read(self.path)

    def load(self, dimension: int) -> tuple[VectorIndex, Manifest | None]:
        manifest = self.manifest()
        if manifest is None:
            return VectorIndex(dimension), None
        data = (self.path / manifest.vectors).read_bytes()
        return VectorIndex.deserialize(data, dimension), manifest

    def publish(self, index: VectorIndex, generation: int) -> Manifest:
        self.path.mkdir(parents=True, exist_ok=True)
        previous = self.manifest()
        version = (previous.version if previous else 0) + 1
        name = f"vectors-{version:06d}.faiss"
        write_atomic(self.path / name, index.serialize())
        manifest = Manifest(version, name, len(index), index.dimension, generation)
        write_atomic(self.path / MANIFEST, json.dumps(manifest.__dict__, indent=2).encode())
        self._prune(keep={name, previous.vectors if previous else name})
        return manifest

    def _prune(self, keep: set[str]) -> None:
        # Keep the previous version too: a reader may have read the old manifest a moment ago.
        for old in self.path.glob("vectors-*.faiss"):
            if old.name not in keep:
                old.unlink(missing_ok=True)
        for tmp in self.path.glob(".*.faiss.*"):
            tmp.unlink(missing_ok=True)

    def remove(self) -> None:
        if self.path.is_dir():
            for child in self.path.iterdir():
                child.unlink()
            self.path.rmdir()

    @contextmanager
    def writer_lock(self, blocking: bool = True) -> Iterator[None]:
        """One writer per knowledge base across processes (released by the OS if we are killed)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "a+") as handle:
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
