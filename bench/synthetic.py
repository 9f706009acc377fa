"""Knowledge bases scaled up for the speed benchmarks: real chunk texts with noisy copies of their
real vectors, written straight through the store (bench/retrieval.py "Speed", bench/search_http.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import numpy as np

# Noise on the copied vectors: close enough to the originals that the index has realistic
# neighbourhoods, far enough that no two copies tie.
NOISE_SIGMA = 0.02
BATCH_CHUNKS = 2000  # chunks per replace_documents call


def noisy_copies(docs: list[tuple[str, list[tuple[str, bytes]]]], n_chunks: int, dimension: int,
                 seed: int) -> Iterator[tuple[str, list[tuple[str, bytes]], np.ndarray]]:
    """(name, [(text, embedding bytes)], vectors) per copied document, round after round over
    ``docs`` (source, chunks), until ``n_chunks`` chunks; names are ``copyNNN/<source>``."""
    rng = np.random.default_rng(seed)
    inserted = copy = 0
    while inserted < n_chunks:
        for source, chunks in docs:
            if inserted >= n_chunks:
                break
            chunks = chunks[: n_chunks - inserted]
            base = np.frombuffer(b"".join(e for _, e in chunks), dtype=np.float32).reshape(len(chunks), dimension)
            vectors = base + rng.normal(0.0, NOISE_SIGMA, size=base.shape).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            yield f"copy{copy:03d}/{source}", chunks, vectors
            inserted += len(chunks)
        copy += 1


def write_copies(writer, copies, groups_of: Callable[[str, int], list[str]]) -> tuple[int, int]:
    """Store ``noisy_copies`` output through a knowledge-base writer in batches; ``groups_of(name,
    chunk count)`` gives each document's access groups. Returns (documents, chunks)."""
    from retrieval.store import ChunkInput, DocumentInput

    documents = inserted = 0
    batch: list = []
    for name, chunks, vectors in copies:
        doc = DocumentInput(root="synthetic", source=name, file_type="html", title=name,
                            content_hash=hashlib.sha256(name.encode()).hexdigest(),
                            size=sum(len(t) for t, _ in chunks), groups=groups_of(name, len(chunks)))
        batch.append((doc, [ChunkInput(i, t, None, None) for i, (t, _) in enumerate(chunks)], vectors))
        documents += 1
        inserted += len(chunks)
        if sum(len(c) for _, c, _ in batch) >= BATCH_CHUNKS:
            writer.replace_documents(batch)
            batch = []
    if batch:
        writer.replace_documents(batch)
    return documents, inserted
