"""LangChain adapter: Enclave's permission-aware retriever as a ``BaseRetriever`` for LangChain chains."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict

from retrieval.retriever import Retriever, SearchFilters
from security.principal import Principal


class EnclaveRetriever(BaseRetriever):
    """Searches one knowledge base as one principal; each chunk becomes a LangChain ``Document``."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    retriever: Any  # retrieval.retriever.Retriever (Any: pydantic cannot introspect it)
    knowledge_base: str = "default"
    principal: Principal
    top_k: int = 5
    filters: SearchFilters | None = None
    mode: str = "hybrid"

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        retriever: Retriever = self.retriever
        hits = retriever.search(query, self.knowledge_base, self.principal, self.top_k, self.filters, self.mode)
        return [
            Document(
                page_content=hit.text,
                id=str(hit.chunk_id),
                metadata={
                    "chunk_id": hit.chunk_id, "document_id": hit.document_id, "source": hit.source,
                    "title": hit.title, "page": hit.page, "heading": hit.heading, "dense_score": hit.dense_score,
                    "bm25_score": hit.bm25_score, "fused_score": hit.fused_score, "rerank_score": hit.rerank_score,
                },
            )
            for hit in hits
        ]
