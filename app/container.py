"""Composition root: builds every component from the one settings object, lazily and once."""

from __future__ import annotations

from functools import cached_property

from app.db import make_engine, upgrade
from app.settings import Settings
from ingest.chunking import Chunker
from ingest.pipeline import IngestPipeline
from llm.models import LocalModel, ModelStore
from retrieval.embedder import Embedder
from retrieval.retriever import RetrievalConfig, Retriever, make_reranker
from retrieval.store import KnowledgeBaseStore


class Container:
    def __init__(self, settings: Settings):
        self.settings = settings

    @cached_property
    def engine(self):
        engine = make_engine(self.settings.resolved_database_url)
        upgrade(engine)  # schema created on first start, migrated on upgrades
        return engine

    @cached_property
    def model_store(self) -> ModelStore:
        registered = {
            name: LocalModel(path=entry.path, kind=entry.kind, gguf_file=entry.gguf_file)
            for name, entry in self.settings.models.items()
        }
        return ModelStore(self.settings.resolved_models_dir, registered)

    @cached_property
    def embedder(self) -> Embedder:
        cfg = self.settings.embedding
        resolved = self.model_store.resolve(cfg.model)
        return Embedder(
            resolved.path, name=cfg.model, query_prefix=cfg.query_prefix, passage_prefix=cfg.passage_prefix,
            batch_size=cfg.batch_size, device=cfg.device,
        )

    @cached_property
    def kb_store(self) -> KnowledgeBaseStore:
        cfg = self.settings.retrieval
        return KnowledgeBaseStore(
            self.engine, self.settings.index_dir, self.embedder.name, self.embedder.dimension,
            approximate_from=cfg.approximate_from, nprobe=cfg.nprobe,
        )

    @cached_property
    def chunker(self) -> Chunker:
        return Chunker(self.settings.chunking.chunk_size, self.settings.chunking.chunk_overlap)

    @cached_property
    def pipeline(self) -> IngestPipeline:
        cfg = self.settings.ingest
        return IngestPipeline(
            self.kb_store, self.embedder, self.chunker, default_groups=cfg.default_groups,
            batch_files=cfg.batch_files, checkpoint_seconds=cfg.checkpoint_seconds,
            max_file_bytes=int(cfg.max_file_mb * 1024 * 1024),
        )

    @cached_property
    def retriever(self) -> Retriever:
        cfg = self.settings.retrieval
        reranker = None
        if cfg.reranker:
            reranker = make_reranker(str(self.model_store.resolve(cfg.reranker).path), self.settings.embedding.device)
        config = RetrievalConfig(
            dense_weight=cfg.dense_weight, bm25_weight=cfg.bm25_weight, rrf_k=cfg.rrf_k, candidates=cfg.candidates,
            mmr_lambda=cfg.mmr_lambda, rerank_top_n=cfg.rerank_top_n, query_cache_size=cfg.query_cache_size,
        )
        return Retriever(self.kb_store, self.embedder, config, reranker)
