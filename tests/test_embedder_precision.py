"""The embedder's precision setting (embedding.dtype): bfloat16 vectors stand in for float32 ones."""

from __future__ import annotations

import numpy as np
import pytest

from app.container import Container
from app.settings import Settings
from retrieval.embedder import Embedder, native_bfloat16, resolve_dtype

TEXTS = [
    "Employees receive 25 days of annual leave per calendar year.",
    "The context manager suppresses the listed exceptions and resumes after the with statement.",
    "员工每年享有二十五天带薪年假。",
    "x" * 3000,  # longer than the model's 256 tokens: truncated the same way
]


def test_bfloat16_vectors_match_float32(embedder: Embedder):
    fp32 = Embedder(embedder.model_path, name=embedder.name, dtype="float32")
    bf16 = Embedder(embedder.model_path, name=embedder.name, dtype="bfloat16")
    assert bf16.dtype == "bfloat16" and str(next(bf16.model.parameters()).dtype) == "torch.bfloat16"
    a, b = fp32.embed_passages(TEXTS), bf16.embed_passages(TEXTS)
    assert b.dtype == np.float32 and b.shape == a.shape == (len(TEXTS), fp32.dimension)
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cosine = (a * b).sum(axis=1)
    assert cosine.min() > 0.995, cosine
    q = bf16.embed_query("how many days of leave?")
    assert q.shape == (fp32.dimension,) and q.dtype == np.float32
    # Same knowledge base identity: the vectors are interchangeable.
    assert bf16.embedder_id == fp32.embedder_id == embedder.name
    assert bf16.embed_passages([]).shape == (0, fp32.dimension)


def test_auto_follows_the_cpu():
    assert resolve_dtype("auto") == ("bfloat16" if native_bfloat16() else "float32")
    assert resolve_dtype("float32") == "float32" and resolve_dtype("bfloat16") == "bfloat16"
    with pytest.raises(ValueError):
        resolve_dtype("int4")


def test_container_builds_the_configured_precision(tmp_path, models_dir):
    settings = Settings(data_dir=tmp_path, models_dir=models_dir, embedding={"dtype": "bfloat16"})
    container = Container(settings)
    assert container.embedder.dtype == "bfloat16"
    assert container.kb_store.embedder_name == container.embedder.embedder_id
    assert Container(Settings(data_dir=tmp_path, models_dir=models_dir)).embedder.dtype == resolve_dtype("auto")


def test_two_embedding_workers_store_the_same_vectors(database_url, tmp_path, embedder: Embedder):
    """ingest_workers=2 splits each batch over two model copies: same chunks, same vectors, in
    order, and torch's thread count is restored after the run."""
    import shutil

    import torch
    from sqlmodel import Session, select

    from app.db import make_engine
    from ingest.chunking import Chunker
    from ingest.pipeline import IngestPipeline
    from retrieval.store import KnowledgeBaseStore
    from retrieval.tables import ChunkRow
    from tests.conftest import SAMPLES

    corpus = tmp_path / "corpus"
    shutil.copytree(SAMPLES, corpus)
    engine = make_engine(database_url)
    vectors = {}
    threads = torch.get_num_threads()
    for workers in (1, 2):
        store = KnowledgeBaseStore(engine, tmp_path / f"indexes{workers}", embedder.embedder_id, embedder.dimension)
        pipeline = IngestPipeline(store, embedder, Chunker(400, 80), default_groups=["everyone"], batch_files=2,
                                  embed_threads=1, embed_workers=workers)
        kb = f"workers{workers}"
        report = pipeline.run(corpus, kb)
        assert report.failed == 0 and report.chunks > 4
        assert torch.get_num_threads() == threads
        with Session(engine) as session:
            rows = session.exec(select(ChunkRow.text, ChunkRow.embedding).where(ChunkRow.kb == kb)).all()
        vectors[workers] = {text: np.frombuffer(emb, dtype=np.float32) for text, emb in rows}
    assert vectors[1].keys() == vectors[2].keys()
    for text, vector in vectors[1].items():
        assert float(vector @ vectors[2][text]) > 0.9999


def test_an_ingest_inside_the_server_leaves_torch_threads_and_model_copies_alone(embedder, tmp_path: Path,
                                                                                  database_url: str):
    """Uploads run in the serving process, whose generation shares torch's process-wide threads:
    there (own_process=False) the pipeline embeds on the caller's threads with its one model."""
    import torch

    from app.db import make_engine
    from ingest.chunking import Chunker
    from ingest.pipeline import IngestPipeline
    from retrieval.store import KnowledgeBaseStore
    from tests.conftest import SAMPLES

    threads = torch.get_num_threads()
    seen: list[int] = []
    embed = embedder.embed_passages

    def observed(texts):
        seen.append(torch.get_num_threads())
        return embed(texts)

    embedder.embed_passages = observed
    try:
        store = KnowledgeBaseStore(make_engine(database_url), tmp_path / "indexes", embedder.embedder_id,
                                   embedder.dimension)
        pipeline = IngestPipeline(store, embedder, Chunker(400, 80), default_groups=["everyone"],
                                  embed_threads=1, embed_workers=2)
        report = pipeline.run(SAMPLES / "leave-policy.md", "uploads", own_process=False)
    finally:
        embedder.embed_passages = embed
    assert report.added == 1 and seen and set(seen) == {threads}
    assert pipeline._replicas == []  # no second model copy loaded
