"""Composition root: builds every component from the one settings object, lazily and once."""

from __future__ import annotations

import os
import secrets
from functools import cached_property
from pathlib import Path

from app import metrics
from app.conversations import ConversationStore
from app.db import make_engine, upgrade
from app.private import private_dir
from app.services.chat import AnswerOptions, ChatService
from app.services.operations import Later
from app.settings import Settings
from ingest.chunking import Chunker
from ingest.loaders import LoaderOptions
from ingest.pipeline import IngestPipeline
from llm.engine import Engine
from llm.models import LocalModel, ModelStore
from retrieval.embedder import Embedder
from retrieval.retriever import RetrievalConfig, Retriever, make_reranker
from retrieval.store import KnowledgeBaseStore
from security.api_keys import ApiKeyService
from security.audit import AuditLog, AuditSigner, load_public_key
from security.pii import PiiRedactor
from security.jwt_auth import OidcConfig, OidcValidator
from security.rate_limit import RateLimiter, SignInLimiter


class Container:
    def __init__(self, settings: Settings):
        self.settings = settings
        # Set by the API's lifespan once the generation engine has started (and cleared at shutdown);
        # /readyz reports "loading" until then.
        self.generation_ready = False

    @cached_property
    def engine(self):
        private_dir(self.settings.resolved_data_dir)
        engine = make_engine(self.settings.resolved_database_url)
        upgrade(engine)  # schema created on first start, migrated on upgrades
        return engine

    @cached_property
    def api_keys(self) -> ApiKeyService:
        return ApiKeyService(self.engine, self._api_key_secret())

    @cached_property
    def oidc(self) -> OidcValidator | None:
        """JWT bearer-token validation, or None when no issuer is configured."""
        cfg = self.settings.security.oidc
        if cfg.issuer is None:
            return None
        return OidcValidator(OidcConfig(
            issuer=cfg.issuer, audience=cfg.audience, jwks_url=cfg.jwks_url, jwks_file=cfg.jwks_file,
            algorithms=tuple(cfg.algorithms), leeway_seconds=cfg.leeway_seconds, subject_claim=cfg.subject_claim,
            groups_claim=cfg.groups_claim, admin_groups=tuple(cfg.admin_groups), service_groups=tuple(cfg.service_groups),
            knowledge_base_claim=cfg.knowledge_base_claim, jwks_cache_seconds=cfg.jwks_cache_seconds,
        ))

    @cached_property
    def rate_limiter(self) -> RateLimiter | None:
        cfg = self.settings.security
        if cfg.rate_limit_per_minute == 0:
            return None
        return RateLimiter(cfg.rate_limit_per_minute, cfg.rate_limit_burst, cfg.rate_limit_storage, "principal")

    @cached_property
    def auth_failure_limiter(self) -> SignInLimiter | None:
        cfg = self.settings.security
        if cfg.auth_failures_per_minute == 0:
            return None
        return SignInLimiter(cfg.auth_failures_per_minute, cfg.auth_failures_per_address_per_minute,
                             cfg.rate_limit_storage)

    def _api_key_secret(self) -> bytes:
        configured = self.settings.security.api_key_secret
        if configured is not None:
            return configured.get_secret_value().encode()
        path = self.settings.resolved_data_dir / "secrets" / "api-key.secret"
        if not path.exists():
            private_dir(path.parent)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never world-readable
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(48))
        return path.read_text().strip().encode()

    @cached_property
    def pii(self) -> PiiRedactor:
        return PiiRedactor()

    @cached_property
    def audit_log(self) -> AuditLog:
        cfg = self.settings.audit
        key_path = cfg.signing_key or self.settings.resolved_data_dir / "secrets" / "audit-signing.key"
        return AuditLog(
            self.engine, AuditSigner.from_file(Path(key_path).expanduser()), checkpoint_every=cfg.checkpoint_every,
            checkpoint_file=cfg.checkpoint_file,
            trusted_public_keys=[load_public_key(Path(p).expanduser().read_bytes()) for p in cfg.trusted_public_keys],
        )

    @cached_property
    def audit(self):
        from app.services.audit import AuditService

        gen = self.settings.generation
        return AuditService(
            self.audit_log, self.pii, query_policy=self.settings.audit.query_policy,
            max_query_chars=self.settings.audit.max_query_chars,
            model=gen.model if gen.engine == "transformers" else gen.openai_model,
            # The LoRA adapter in use, when the engine serves one (adapter hot-swap sets it).
            adapter=lambda: getattr(self.__dict__.get("generation_engine"), "adapter_version", None),
        )

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
            batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype,
            query_runtime=cfg.query_runtime, cache_dir=self.settings.resolved_data_dir / "cache" / "onnx",
            query_weights=cfg.query_weights,
        )

    @cached_property
    def readiness(self):
        from app.services.readiness import Readiness

        return Readiness(self.engine, self.kb_store)

    @cached_property
    def kb_store(self) -> KnowledgeBaseStore:
        cfg = self.settings.retrieval
        return KnowledgeBaseStore(
            self.engine, self.settings.index_dir, self.embedder.embedder_id, self.embedder.dimension,
            approximate_from=cfg.approximate_from, nprobe=cfg.nprobe,
            index_version=f"{self.embedder.name}|{self.chunker.version}", heading_weight=cfg.heading_weight,
        )

    @cached_property
    def chunker(self) -> Chunker:
        cfg = self.settings.chunking
        return Chunker(cfg.chunk_size, cfg.chunk_overlap, contextual_headers=cfg.contextual_headers)

    @cached_property
    def pipeline(self) -> IngestPipeline:
        cfg = self.settings.ingest
        return IngestPipeline(
            self.kb_store, self.embedder, self.chunker, default_groups=cfg.default_groups,
            batch_files=cfg.batch_files, checkpoint_seconds=cfg.checkpoint_seconds,
            embed_threads=self.settings.embedding.ingest_threads, embed_workers=self.settings.embedding.ingest_workers,
            max_file_bytes=int(cfg.max_file_mb * 1024 * 1024), on_report=metrics.observe_ingest,
            redact=self.pii.redact if cfg.redact_pii else None,
            loader_options=LoaderOptions(
                ocr=cfg.ocr, ocr_languages=cfg.ocr_languages, ocr_max_megapixels=cfg.ocr_max_megapixels,
                max_unzipped_mb=cfg.max_unzipped_mb, max_zip_ratio=cfg.max_zip_ratio, max_attachment_mb=cfg.max_file_mb,
            ),
        )

    @cached_property
    def retriever(self) -> Retriever:
        cfg = self.settings.retrieval
        reranker = None
        if cfg.reranker:
            reranker = make_reranker(str(self.model_store.resolve(cfg.reranker).path), self.settings.embedding.device)
        config = RetrievalConfig(
            dense_weight=cfg.dense_weight, bm25_weight=cfg.bm25_weight, cjk_bm25_weight=cfg.cjk_bm25_weight, rrf_k=cfg.rrf_k, candidates=cfg.candidates,
            mmr_lambda=cfg.mmr_lambda, rerank_top_n=cfg.rerank_top_n, query_cache_size=cfg.query_cache_size,
            document_weight=cfg.document_weight, neighbour_weight=cfg.neighbour_weight, fusion=cfg.fusion,
        )
        return Retriever(self.kb_store, self.embedder, config, reranker, observer=metrics.observe_search)

    @cached_property
    def conversations(self) -> ConversationStore:
        return ConversationStore(self.engine)

    @cached_property
    def chat_service(self) -> ChatService:
        # Built on first use: a request refused by its access check never loads a model.
        return ChatService(Later(lambda: self.retriever), Later(lambda: self.generation_engine), self.conversations,
                           answer_redactor=self.pii if self.settings.generation.redact_answers else None,
                           options=answer_options(self.settings), embed=self.embed_for_evidence,
                           audit=self.audit, default_kb=self.settings.default_kb,
                           default_groups=self.settings.ingest.default_groups,
                           max_new_tokens=self.settings.generation.max_new_tokens)

    def embed_for_evidence(self, texts: list[str]):
        """[question, sentence, ...] -> vectors (the question embedded as a query, the rest as passages)."""
        import numpy as np

        embedder = self.embedder
        return np.vstack([embedder.embed_query(texts[0])[None, :], embedder.embed_passages(texts[1:])])

    @cached_property
    def finetune_registry(self):
        from finetune.registry import Registry

        return Registry(self.engine)

    # Application services: one per feature, shared by the API routers and the CLI commands.
    @cached_property
    def documents(self):
        from app.services.documents import DocumentService

        return DocumentService(self.pipeline, self.kb_store, self.audit, self.settings.default_kb,
                               self.settings.ingest.max_file_mb,
                               forget=lambda kb: self.retriever.forget(kb))

    @cached_property
    def search_service(self):
        from app.services.search import SearchService

        return SearchService(Later(lambda: self.retriever), self.audit, self.settings.default_kb, self.settings.ingest.default_groups)

    @cached_property
    def keys(self):
        from app.services.keys import KeyService

        return KeyService(self.api_keys, self.audit)

    @cached_property
    def adapters(self):
        from app.services.adapters import AdapterService

        return AdapterService(self.finetune_registry, self.audit)

    @property
    def finetune_redact(self):
        """The PII redaction hook of fine-tuning datasets (``str -> str``), or None when turned off."""
        return self.pii.redact if self.settings.finetune.redact_pii else None

    def finetune_job_config(self, data_files: list | None = None, eval_files: list | None = None,
                            base_model: str | None = None):
        """The job configuration from settings; CLI options add data files or pick another base model."""
        from finetune.jobs import JobConfig
        from finetune.train import TrainConfig

        cfg = self.settings.finetune
        name = base_model or cfg.base_model or self.settings.generation.model
        resolved = self.model_store.resolve(name)
        if resolved.kind != "generation":
            raise ValueError(f"finetune base model {name!r} is a {resolved.kind} model, not a generation model")
        train = TrainConfig(
            rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.target_modules,
            learning_rate=cfg.learning_rate, epochs=cfg.epochs, batch_size=cfg.batch_size,
            grad_accum_steps=cfg.grad_accum_steps, max_length=cfg.max_length, warmup_ratio=cfg.warmup_ratio,
            gradient_checkpointing=cfg.gradient_checkpointing, seed=cfg.seed, checkpoint_every=cfg.checkpoint_every,
        )
        return JobConfig(
            data_dir=self.settings.resolved_data_dir, base_model=name, model_path=resolved.path,
            gguf_file=resolved.gguf_file, trust_remote_code=self.settings.generation.trust_remote_code,
            device=cfg.device, dtype=cfg.dtype, data_files=[*cfg.data_files, *(data_files or [])],
            eval_files=[*cfg.eval_files, *(eval_files or [])], eval_fraction=cfg.eval_fraction,
            max_record_chars=cfg.max_record_chars, train=train, gate_metric=cfg.gate_metric,
            gate_margin=cfg.gate_margin, auto_promote=cfg.auto_promote, eval_max_new_tokens=cfg.eval_max_new_tokens,
            threads=cfg.threads,
        )

    def finetune_synthetic_chunks(self) -> list[str] | None:
        """Chunk texts of ``finetune.synthetic_kb`` for synthetic Q/A pairs (None when off)."""
        cfg = self.settings.finetune
        if not cfg.synthetic_kb:
            return None
        ids = self.kb_store.chunk_ids(cfg.synthetic_kb)[: cfg.synthetic_max_chunks]
        rows = self.kb_store.chunks([int(i) for i in ids])
        return [rows[int(i)].text for i in ids if int(i) in rows]

    @cached_property
    def generation_engine(self) -> Engine:
        """The configured generation engine, not started yet (``await engine.start()`` loads the model
        or checks the server). Named ``generation_engine`` because ``engine`` is the SQL engine above."""
        cfg = self.settings.generation
        if cfg.engine == "openai":
            from llm.openai_engine import OpenAIEngine

            if not cfg.openai_base_url or not cfg.openai_model:
                raise ValueError("generation.engine is openai: set generation.openai_base_url and openai_model")
            return OpenAIEngine(
                base_url=cfg.openai_base_url, model=cfg.openai_model,
                api_key=cfg.openai_api_key.get_secret_value() if cfg.openai_api_key else None,
                context_window=cfg.context_window, timeout=cfg.timeout_seconds, max_retries=cfg.max_retries,
                max_new_tokens=cfg.max_new_tokens,
            )
        from llm.transformers_engine import TransformersEngine  # imports torch: only when generation is used

        resolved = self.model_store.resolve(cfg.model)
        if resolved.kind != "generation":
            raise ValueError(f"generation.model {cfg.model!r} is a {resolved.kind} model, not a generation model")
        return TransformersEngine(
            resolved.path, name=cfg.model, gguf_file=resolved.gguf_file, device=cfg.device, dtype=cfg.dtype,
            quantization=cfg.quantization, trust_remote_code=cfg.trust_remote_code,
            context_window=cfg.context_window, max_new_tokens=cfg.max_new_tokens,
            max_batch_size=cfg.max_batch_size, max_batch_tokens=cfg.max_batch_tokens, max_queue=cfg.max_queue,
            prefix_cache_tokens=cfg.prefix_cache_tokens, step_observer=metrics.observe_batch_step,
            prefill_observer=metrics.observe_prefill,
            threads=cfg.threads,
        )


def answer_options(settings: Settings) -> AnswerOptions:
    """The ``answer`` settings over the generation model's prompt profile (null fields keep the profile's)."""
    from dataclasses import replace

    from llm.evidence import profile_for

    a = settings.answer
    model = settings.generation.model if settings.generation.engine == "transformers" else (
        settings.generation.openai_model or settings.generation.model)
    profile = profile_for(model)
    overrides = {k: v for k, v in {
        "compress": a.compress, "max_blocks": a.max_blocks, "max_sentences": a.max_sentences,
        "block_chars": a.block_chars, "one_shot": a.one_shot, "repetition_penalty": a.repetition_penalty,
        "no_repeat_ngram": a.no_repeat_ngram}.items() if v is not None}
    return AnswerOptions(policy=a.policy or profile.policy, profile=replace(profile, **overrides), loop_guard=a.loop_guard,
                         min_relevance=a.min_relevance, min_relevance_zh=a.min_relevance_zh, min_overlap=a.min_overlap,
                         unknown_names=a.unknown_names)
