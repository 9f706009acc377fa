"""GET /v1/models and POST /v1/embeddings (OpenAI schema)."""

from __future__ import annotations

import base64
import time

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from pydantic import Field

from app.api.audit import AuditTrail, trail
from app.api.deps import container, require
from app.api.errors import ApiError
from app.api.responses import EmbeddingList, ModelList
from app.api.schemas import RequestBody
from app.container import Container
from security.principal import Principal

router = APIRouter(tags=["models"])
_CREATED = int(time.time())


@router.get("/v1/models", response_model=ModelList, summary="Models served here (OpenAI schema)")
async def list_models(c: Container = Depends(container), _: Principal = Depends(require("user", "service"))) -> dict:
    names = [c.settings.generation.model if c.settings.generation.engine == "transformers"
             else (c.settings.generation.openai_model or "remote"), c.settings.embedding.model]
    return {"object": "list", "data": [{"id": n, "object": "model", "created": _CREATED, "owned_by": "enclave"} for n in names]}


class EmbeddingRequest(RequestBody):
    input: str | list[str] = Field(..., description="Text or list of texts (at most 256, 8,000 characters each)")
    model: str | None = None
    encoding_format: str | None = Field(None, pattern="^(float|base64)$")
    user: str | None = None


@router.post("/v1/embeddings", response_model=EmbeddingList, summary="Embed texts with the knowledge-base embedder (OpenAI schema)")
async def embeddings(body: EmbeddingRequest, c: Container = Depends(container), _: Principal = Depends(require("user")),
                     audit: AuditTrail = Depends(trail)) -> dict:
    texts = [body.input] if isinstance(body.input, str) else body.input
    # Inputs are often whole documents: the record keeps their sha256 and count, not their text.
    async with audit.action("embeddings", query=texts, keep_query_text=False, model=c.settings.embedding.model,
                            detail=f"inputs={len(texts)}"):
        if not texts or len(texts) > 256 or any(not t or len(t) > 8000 for t in texts):
            raise ApiError(400, "input must be 1-256 non-empty texts of at most 8,000 characters", "invalid_input", "input")
        if body.model not in (None, c.settings.embedding.model):
            raise ApiError(404, f"model {body.model!r} not found; use {c.settings.embedding.model!r}", "model_not_found", "model")
        vectors = await run_in_threadpool(c.embedder.embed_passages, texts)
    tokens = sum(len(t.split()) for t in texts)

    def encode(vector):  # base64 of little-endian float32, what the openai client asks for by default
        return base64.b64encode(vector.astype("<f4").tobytes()).decode() if body.encoding_format == "base64" else vector.tolist()

    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
        "model": c.settings.embedding.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
