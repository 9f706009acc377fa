"""The one typed settings object.

Sources, highest priority first: explicit init arguments, ``ENCLAVE_*`` environment variables
(nested with ``__``, e.g. ``ENCLAVE_CHUNKING__CHUNK_SIZE=500``), the YAML file named by
``--config`` or ``ENCLAVE_CONFIG``, then the defaults below. Only ``app`` reads settings; the
libraries receive plain values from it.
"""

from __future__ import annotations

import ipaddress
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, Field, PrivateAttr, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from retrieval.names import KB_NAME_PATTERN



# The YAML file of the Settings being built now (set only inside load_settings).
_config_file: ContextVar[str | None] = ContextVar("enclave_config_file", default=None)

class ModelEntry(BaseModel):
    """A model an operator registered: a local HF folder or a GGUF file."""

    path: Path
    kind: str = Field("generation", pattern="^(generation|embedding|reranker)$")
    gguf_file: str | None = None


class EmbeddingSettings(BaseModel):
    model: str = "all-minilm-l6-v2"
    query_prefix: str = ""
    passage_prefix: str = ""
    # Passages embedded per forward pass. 16, not 64: the attention buffers of a batch of long
    # (256-token) chunks dominate ingest memory - peak RSS 938 vs 1265 MiB on the same Chinese files,
    # docs/benchmarks.md - for ~11% more CPU time (1,000 files: 794 vs 707 CPU s).
    batch_size: int = Field(16, ge=1)
    device: str = "cpu"
    # Weights' precision. auto: bfloat16 where the CPU multiplies it natively (AMX or AVX512-BF16:
    # 3.3x less CPU per passage for MiniLM, cosine >= 0.9999 to float32, retrieval unchanged;
    # docs/benchmarks.md "Ingestion"), float32 elsewhere (emulated bfloat16 is slower there).
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # torch intra-op threads while an ingest runs (restored afterwards). Parsing runs beside the
    # embedding, so one embedding thread leaves the other core to it: on the 2-core host the same 60
    # pages took 23 s with 1 thread and 78 s with torch's default 2 (docs/benchmarks.md).
    ingest_threads: int | None = Field(1, ge=1, description="torch threads while `ingest run` runs (not uploads in the server); null: torch default")
    # Embedding threads while ingesting, each with its own model copy (+45 MiB in bfloat16) and
    # ingest_threads torch threads; a batch's passages are split between them.
    ingest_workers: int = Field(2, ge=1, description="parallel embedding workers of `ingest run` (uploads in the server use one)")
    # Queries (one short text per search) through ONNX Runtime: the same network exported once from
    # the model's weights, 3.2 ms a query in float32 instead of 7.6 through torch on the 2-core host
    # (cosine >= 0.99999 to torch; docs/benchmarks.md "Search over HTTP"). torch: no export.
    query_runtime: Literal["onnxruntime", "torch"] = "onnxruntime"
    # The ONNX query graph's matrix weights: int8 (8 bits in blocks of 32, int8 products; 8.3 -> 7.0 ms
    # a query on the AMD host, benchmark retrieval within 0.004 of float32) or float32.
    query_weights: Literal["int8", "float32"] = "int8"


class GenerationSettings(BaseModel):
    engine: Literal["transformers", "openai"] = "transformers"
    # transformers engine: a bundled or registered model name.
    model: str = "smollm2-135m-instruct"
    device: str = "auto"  # auto: CUDA when present, else CPU
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    quantization: Literal["none", "int8", "int4"] = "none"
    trust_remote_code: bool = False  # ChatGLM2/3 checkpoints ship their modelling code
    context_window: int | None = Field(None, ge=256, description="tokens; default from the model config")
    max_new_tokens: int = Field(512, ge=1, description="cap on any request's max_tokens")
    # continuous batching limits
    max_batch_size: int = Field(16, ge=1)
    max_batch_tokens: int = Field(16384, ge=256, description="prompt + generated tokens held in the running batch")
    max_queue: int = Field(64, ge=0, description="requests waiting for a slot; beyond it: busy")
    # Keys/values of recent prompt prefixes (system turn, RAG instructions) kept for reuse.
    prefix_cache_tokens: int = Field(4096, ge=0, description="tokens of prompt-prefix KV cache kept; 0: off")
    # CPU threads for the model's matmuls; null: torch's default (one per core). On a host whose
    # cores are shared with other work, 1 was 3x faster than 2 (docs/benchmarks.md).
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; null: one per core")
    # openai engine: any OpenAI-compatible server (vLLM, llama.cpp server, transformers serve)
    openai_base_url: str | None = None
    openai_api_key: SecretStr | None = None
    openai_model: str | None = None
    timeout_seconds: float = Field(120.0, gt=0)
    max_retries: int = Field(2, ge=0)
    # Redact e-mails, phone numbers, resident IDs and bank cards in answers (streamed ones too).
    redact_answers: bool = False


class AnswerSettings(BaseModel):
    """How answers are made and checked (docs/benchmarks.md, "Answer quality", backs the defaults).

    policy: generate (the model's answer as it is, checked and reported but not replaced), verify
    (the model's answer only where every sentence is supported by a cited block, else the extractive
    answer or "I don't know"), extractive (the best-supported sentences of the retrieved passages,
    quoted, no generation; the default for the bundled 135M model, see ``policy`` below). Prompt
    budget and decoding guards come from the model's profile
    (llm/evidence.py PROFILES); the fields left null here keep the profile's value.
    """

    # null: the generation model's profile decides (llm/evidence.py PROFILES): extractive for the
    # bundled SmolLM2-135M, whose checked answers were still wrong more often than the quotes;
    # verify for any other model.
    policy: Literal["generate", "verify", "extractive"] | None = None
    compress: bool | None = Field(None, description="keep only the relevant sentences of each chunk; null: profile")
    max_blocks: int | None = Field(None, ge=1, description="context blocks in the prompt; null: profile")
    max_sentences: int | None = Field(None, ge=1, description="sentences in all; null: profile")
    block_chars: int | None = Field(None, ge=50, description="characters per block; null: profile")
    one_shot: bool | None = Field(None, description="a worked citation example in the system prompt; null: profile")
    repetition_penalty: float | None = Field(None, ge=1.0, le=2.0, description="null: profile")
    no_repeat_ngram: int | None = Field(None, ge=0, le=16, description="0: off; null: profile")
    loop_guard: bool = Field(True, description="end a generation that repeats itself and cut the repetition")
    # Below this evidence score no sentence of the permitted context bears on the question: the
    # answer says so instead of guessing (English / mostly-Chinese questions).
    min_relevance: float = Field(0.30, ge=0, le=1)
    min_relevance_zh: float = Field(0.12, ge=0, le=1)
    min_overlap: float = Field(0.5, ge=0, le=1, description="share of a sentence's terms its cited blocks must hold")
    # A product, function or setting named in the question that no permitted passage mentions: the
    # documents are about something else, so the answer is "I don't know" (llm/evidence.py question_names).
    unknown_names: bool = True


class ChunkingSettings(BaseModel):
    chunk_size: int = Field(750, ge=50, description="characters per chunk")
    chunk_overlap: int = Field(150, ge=0)
    # Off: measured on three question sets (docs/benchmarks.md), embedding the path cost English
    # passage MRR@10 0.043 on the Python docs (sibling chunks of one page look alike to MiniLM) and
    # gained 0.007 on the PostgreSQL manual. The path is still indexed (BM25 heading field) and shown.
    contextual_headers: bool = Field(
        False, description="embed each chunk with its heading path (title > section > ...) in front; "
        "changing it (or the sizes) makes existing documents stale: `ingest reindex --kb NAME`")

    @model_validator(mode="after")
    def _overlap_smaller(self) -> "ChunkingSettings":
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError("chunking.chunk_overlap must be smaller than chunking.chunk_size")
        return self


class IngestSettings(BaseModel):
    default_groups: list[str] = Field(default_factory=lambda: ["everyone"])
    # Files per batch: parsed, chunked, embedded and committed together (bounds memory).
    batch_files: int = Field(32, ge=1)
    # How often (seconds) a running ingest publishes the vector index; the database is always
    # committed per batch and the index is reconciled from it after a crash.
    checkpoint_seconds: float = Field(60.0, ge=0)
    max_file_mb: float = Field(100.0, gt=0)
    # Redact e-mails, phone numbers, resident IDs and bank cards in the text before it is indexed.
    redact_pii: bool = False
    # OCR (Tesseract) of scanned PDF pages and images; off: such files are reported as skipped.
    ocr: bool = True
    ocr_languages: str = Field("eng+chi_sim", pattern=r"^[A-Za-z_]+(\+[A-Za-z_]+)*$",
                               description="Tesseract languages joined with +, each installed as tesseract-ocr-<lang>")
    ocr_max_megapixels: float = Field(60.0, gt=0, description="larger images are refused (memory)")
    # Zip-based Office files (docx, xlsx, xlsm, pptx) are refused before parsing beyond these.
    max_unzipped_mb: float = Field(512.0, gt=0, description="total uncompressed size of an Office file")
    max_zip_ratio: float = Field(200.0, gt=1, description="uncompressed/compressed size (checked past 16 MiB)")


# Tuned on the English, second English and Chinese question sets (docs/benchmarks.md, Retrieval).
HEADING_WEIGHT = 3.0
DOCUMENT_WEIGHT = 0.0
NEIGHBOUR_WEIGHT = 0.0


class RetrievalSettings(BaseModel):
    dense_weight: float = Field(1.0, ge=0)
    bm25_weight: float = Field(1.0, ge=0)
    cjk_bm25_weight: float | None = Field(
        20.0, ge=0, description="BM25 weight for mostly-Chinese queries; null: bm25_weight. The bundled embedder "
        "is English-only, so Chinese relies on BM25; set null with a multilingual embedder (bge-m3)")
    # 10 rather than the customary 60: a top rank counts for more against a long tail (measured on
    # the three question sets, docs/benchmarks.md: MRR@10 +0.017 / +0.015 / +0.019 en / en2 / zh).
    rrf_k: int = Field(10, ge=1, description="reciprocal rank fusion constant")
    fusion: str = Field("rrf", pattern="^(rrf|score)$", description="rrf: reciprocal rank fusion; score: weighted "
                        "sum of min-max scaled dense and BM25 scores")
    candidates: int = Field(50, ge=1, description="candidates per retriever before fusion")
    mmr_lambda: float | None = Field(None, ge=0, le=1, description="MMR relevance/diversity trade-off; null: off")
    reranker: str | None = Field(None, description="registered cross-encoder model name; null: no reranking")
    rerank_top_n: int = Field(20, ge=1)
    approximate_from: int = Field(50_000, ge=1, description="chunks from which FAISS switches to IVF")
    nprobe: int = Field(64, ge=1, description="IVF lists probed per query (64 of ~1,264 at 100k chunks: recall@10 0.96)")
    query_cache_size: int = Field(1024, ge=0)
    heading_weight: float = Field(
        HEADING_WEIGHT, ge=0, description="BM25 weight of a chunk's heading path (title > section > ...) relative to "
        "its text; 0: headings not indexed. A change rebuilds the BM25 index from the database (no re-embedding)")
    document_weight: float = Field(
        DOCUMENT_WEIGHT, ge=0, description="rerank: share of the best other candidate's fused score from the same document "
        "added to a candidate's; 0: off")
    neighbour_weight: float = Field(
        NEIGHBOUR_WEIGHT, ge=0, description="rerank: share of a candidate's fused score given to the chunks just before "
        "and after it; 0: off")


_ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


class OidcSettings(BaseModel):
    """OIDC/JWT bearer tokens from the organisation's identity provider (off while issuer is null)."""

    issuer: str | None = Field(None, description="expected `iss`; null: JWT bearer tokens are not accepted")
    audience: str | None = Field(None, description="expected `aud` (required when issuer is set)")
    jwks_url: str | None = Field(None, description="the provider's JWKS endpoint (https)")
    jwks_file: Path | None = Field(None, description="a local JWKS JSON file (air-gapped sites)")
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"], min_length=1)
    leeway_seconds: int = Field(30, ge=0, le=300, description="clock skew allowed on exp/nbf/iat")
    subject_claim: str = "sub"
    groups_claim: str = Field("groups", description="claim holding groups (dotted path, e.g. realm_access.roles)")
    admin_groups: list[str] = Field(default_factory=list, description="members of these groups are admins")
    service_groups: list[str] = Field(default_factory=list, description="members of these groups are service accounts")
    knowledge_base_claim: str = Field("enclave_kb", description="claim pinning a service token to a knowledge base")
    jwks_cache_seconds: int = Field(300, ge=0)

    @model_validator(mode="after")
    def _pinned(self) -> "OidcSettings":
        bad = [a for a in self.algorithms if a not in _ASYMMETRIC]
        if bad:
            raise ValueError(f"security.oidc.algorithms: {bad[0]!r} is not allowed; use asymmetric algorithms "
                             f"({', '.join(_ASYMMETRIC)}), never 'none' or HS*")
        if self.issuer is not None:
            if not self.audience:
                raise ValueError("security.oidc.audience is required when security.oidc.issuer is set")
            if (self.jwks_url is None) == (self.jwks_file is None):
                raise ValueError("security.oidc: set exactly one of jwks_url and jwks_file")
            if self.jwks_url is not None:
                url = urlparse(self.jwks_url)
                if url.scheme != "https" and not (url.scheme == "http" and url.hostname in ("localhost", "127.0.0.1", "::1")):
                    raise ValueError("security.oidc.jwks_url must be https (plain http only on loopback): "
                                     "keys fetched in clear text could be swapped")
        return self


class SecuritySettings(BaseModel):
    # Secret for the keyed hash of API keys. Default: generated once into
    # <data dir>/secrets/api-key.secret (mode 0600). Several replicas must share one value.
    api_key_secret: SecretStr | None = None
    oidc: OidcSettings = Field(default_factory=OidcSettings)
    # Per principal (API key or token subject): a moving window of requests_per_minute, and at
    # most `burst` requests in the time that many requests take to earn (token-bucket shape).
    rate_limit_per_minute: int = Field(300, ge=0, description="requests per minute per principal; 0: off")
    rate_limit_burst: int = Field(60, ge=1)
    auth_failures_per_minute: int = Field(30, ge=0, description="failed sign-ins per minute per key; 0: off")
    # Beyond this many failed sign-ins a minute an address is refused, except for keys that signed in
    # from it in the last hour (people behind the same proxy keep working); 0: no address limit.
    auth_failures_per_address_per_minute: int = Field(300, ge=0)
    # `limits` storage URI: memory:// is per process; redis://host:6379 shares limits between workers.
    rate_limit_storage: str = "memory://"


class AuditSettings(BaseModel):
    # Query text kept in audit records: none (as asked), redact (PII replaced), drop (sha256 only).
    query_policy: Literal["none", "redact", "drop"] = "redact"
    max_query_chars: int = Field(2000, ge=0, description="longer query text is cut in the record")
    checkpoint_every: int = Field(1000, ge=0, description="records between signed checkpoints; 0: on demand only")
    # Ed25519 checkpoint key; default <data dir>/secrets/audit-signing.key (created 0600).
    signing_key: Path | None = None
    # Append every checkpoint as a JSON line to this file too (e.g. a mount on another machine).
    checkpoint_file: Path | None = None
    # PEM public keys of earlier signing keys (after a rotation): their checkpoints stay verifiable.
    trusted_public_keys: list[Path] = Field(default_factory=list)


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, description="processes; each loads its own model copy")
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    tls_client_ca: Path | None = Field(None, description="CA bundle for client certificates: mutual TLS, required")
    max_body_mb: float = Field(60.0, gt=0, description="request body cap; uploads: ingest.max_file_mb + 1 MiB")
    # Client addresses (CIDR) allowed to connect; empty: every address. The default admits loopback only.
    ip_allowlist: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # Direct peers whose X-Forwarded-For is believed (CIDR), e.g. the nginx in front; empty: none.
    trusted_proxies: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _tls_and_networks(self) -> "ServerSettings":
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("server.tls_certfile and server.tls_keyfile go together")
        if self.tls_client_ca is not None and self.tls_certfile is None:
            raise ValueError("server.tls_client_ca (mutual TLS) needs server.tls_certfile and tls_keyfile")
        for name in ("ip_allowlist", "trusted_proxies"):
            for value in getattr(self, name):
                try:
                    ipaddress.ip_network(value, strict=False)
                except ValueError:
                    raise ValueError(f"server.{name}: {value!r} is not an IP address or CIDR network") from None
        return self


class LoggingSettings(BaseModel):
    format: Literal["json", "text"] = "json"  # json: one object per line, for log shippers
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class MetricsSettings(BaseModel):
    # GET /metrics (Prometheus text format) on the API port. Scrapers authenticate with an
    # administrator API key or with this dedicated token, which opens /metrics and nothing else.
    enabled: bool = True
    bearer_token: SecretStr | None = None  # prefer ENCLAVE_METRICS__BEARER_TOKEN


class FinetuneSettings(BaseModel):
    """LoRA fine-tuning jobs (`finetune run`), the evaluation gate, schedules and adapter hot swap."""

    base_model: str | None = Field(None, description="model to adapt; null: generation.model")
    data_files: list[Path] = Field(default_factory=list, description="curated chat JSONL (OpenAI messages)")
    eval_files: list[Path] = Field(default_factory=list, description="chat JSONL held out entirely for the gate")
    include_feedback: bool = True  # positively rated answers and corrections from POST /v1/feedback
    redact_pii: bool = True  # e-mails, phone numbers, ID and card numbers replaced before training
    synthetic_kb: str | None = Field(None, description="knowledge base to write synthetic Q/A pairs from; null: off")
    synthetic_max_chunks: int = Field(50, ge=1)
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of questions held out (by hash)")
    max_record_chars: int = Field(8000, ge=100)
    # LoRA and training
    lora_rank: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="null: chosen per architecture")
    learning_rate: float = Field(2e-4, gt=0)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    max_length: int = Field(512, ge=16, description="tokens per example after templating; longer ones are skipped")
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between resumable checkpoints")
    device: str = "auto"  # auto: CUDA when present (bf16), else CPU (fp32)
    dtype: str = "auto"
    threads: int = Field(0, ge=0, description="CPU threads for training; 0: one per core")
    # evaluation gate
    gate_metric: Literal["auto", "key_fact_recall", "eval_loss"] = "auto"
    gate_margin: float = Field(0.02, ge=0, description="recall points (0.02 = 2) or relative loss reduction")
    auto_promote: bool = True
    eval_max_new_tokens: int = Field(64, ge=1)
    # schedules and serving
    schedule: str = Field("0 2 1 1,4,7,10 *", description="cron; quarterly at 02:00 by default")
    schedule_in_process: bool = False  # run the schedule inside `enclave serve` (single-box installs)
    hot_swap: bool = True  # the server follows the registry's active adapter
    poll_seconds: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _valid_schedule(self) -> "FinetuneSettings":
        from finetune.schedule import validate

        validate(self.schedule)
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ENCLAVE_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    data_dir: Path = Path("./var")
    models_dir: Path | None = None
    database_url: str | None = None
    default_kb: str = Field("default", pattern=f"^{KB_NAME_PATTERN}$")  # retrieval.names (".." is refused there)
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    answer: AnswerSettings = Field(default_factory=AnswerSettings)
    chunking: ChunkingSettings = Field(default_factory=ChunkingSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)
    models: dict[str, ModelEntry] = Field(default_factory=dict)
    # The YAML file these settings were read from (None: defaults and ENCLAVE_* only); handed to
    # child processes as their --config argument.
    _config_path: Path | None = PrivateAttr(default=None)

    @property
    def config_path(self) -> Path | None:
        return self._config_path

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _config_file.get() or os.environ.get("ENCLAVE_CONFIG")
        if config_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)

    # Derived locations -------------------------------------------------------------------
    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def resolved_models_dir(self) -> Path:
        base = self.models_dir if self.models_dir is not None else self.resolved_data_dir / "models"
        return Path(base).expanduser().resolve()

    @property
    def index_dir(self) -> Path:
        return self.resolved_data_dir / "indexes"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_data_dir / 'enclave.db'}"


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings; ``config_file`` (the ``--config`` option) wins over ``ENCLAVE_CONFIG``.

    The file is handed to this one construction only (a context variable read by
    ``settings_customise_sources``); the process environment is never written, so nothing leaks
    into later constructions, threads or child processes. Worker processes get the built Settings
    object itself (see app/api/asgi.py).
    """
    if config_file is None:
        env_file = os.environ.get("ENCLAVE_CONFIG")
        if env_file and not Path(env_file).is_file():
            raise FileNotFoundError(f"config file not found: {env_file}")
        settings = Settings(**overrides)
        settings._config_path = Path(env_file).resolve() if env_file else None
        return settings
    path = Path(config_file)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    token = _config_file.set(str(path))
    try:
        settings = Settings(**overrides)
    finally:
        _config_file.reset(token)
    settings._config_path = path.resolve()
    return settings
