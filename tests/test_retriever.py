"""Hybrid, permission-aware retrieval over real indexes, the real embedder and a real database."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.db import make_engine, upgrade
from ingest.chunking import Chunker
from ingest.pipeline import IngestPipeline
from retrieval.langchain import EnclaveRetriever
from retrieval.retriever import RetrievalConfig, Retriever, SearchFilters, make_reranker
from retrieval.store import ChunkInput, DocumentInput, KnowledgeBaseStore
from retrieval.vector_index import VectorIndex
from security.principal import Principal
from tests.conftest import REPO, SAMPLES, MemoEmbedder

ADMIN = Principal("admin", role="admin")
EVERYONE = Principal("reader", groups=("everyone",))


@pytest.fixture
def samples_kb(database_url: str, tmp_path: Path, memo_embedder: MemoEmbedder) -> tuple[KnowledgeBaseStore, Path]:
    corpus = tmp_path / "docs"
    shutil.copytree(SAMPLES, corpus)
    store = KnowledgeBaseStore(make_engine(database_url), tmp_path / "indexes", memo_embedder.name, memo_embedder.dimension)
    IngestPipeline(store, memo_embedder, Chunker(), default_groups=["everyone"]).run(corpus, "kb")
    return store, corpus


def test_hybrid_english_and_chinese(samples_kb, memo_embedder: MemoEmbedder):
    store, _ = samples_kb
    retriever = Retriever(store, memo_embedder)
    hits = retriever.search("How many days of paid annual leave do full-time employees get?", "kb", EVERYONE, top_k=3)
    assert hits[0].source == "leave-policy.md" and "22 days" in hits[0].text
    assert hits[0].dense_score is not None and hits[0].bm25_score is not None
    assert [h.fused_score for h in hits] == sorted((h.fused_score for h in hits), reverse=True)

    zh = retriever.search("年假没休完可以顺延几天？", "kb", EVERYONE, top_k=3)
    assert any(h.source == "请假制度.md" and "顺延" in h.text for h in zh)
    bm25_only = retriever.search("年假 顺延", "kb", EVERYONE, top_k=3, mode="bm25")
    assert bm25_only[0].source == "请假制度.md" and bm25_only[0].dense_score is None
    dense_only = retriever.search("VPN client setup", "kb", EVERYONE, top_k=2, mode="dense")
    assert dense_only[0].source == "it/vpn-setup.md" and dense_only[0].bm25_score is None


def test_chinese_queries_weigh_bm25_as_configured(samples_kb, memo_embedder: MemoEmbedder):
    from retrieval.text_analysis import mostly_cjk

    assert mostly_cjk("年假没休完可以顺延几天？") and mostly_cjk("VPN 客户端怎么安装和配置？")
    assert not mostly_cjk("How do I set up the VPN client?") and not mostly_cjk("VPN 2FA setup guide 指南")
    store, _ = samples_kb
    plain = Retriever(store, memo_embedder, RetrievalConfig())
    heavy = Retriever(store, memo_embedder, RetrievalConfig(cjk_bm25_weight=5.0))
    for query, scaled in (("年假没休完可以顺延几天？", True), ("How many days of annual leave?", False)):
        top = heavy.search(query, "kb", EVERYONE, top_k=1)[0]
        same = {h.chunk_id: h for h in plain.search(query, "kb", EVERYONE, top_k=50)}[top.chunk_id]
        # Only the BM25 share of the fused score changes, and only for the Chinese query.
        assert (top.fused_score > same.fused_score + 1e-9) == (scaled and top.bm25_score is not None)
        assert top.fused_score <= same.fused_score * 5 + 1e-9


def test_groups_apply_inside_the_search(samples_kb, memo_embedder: MemoEmbedder):
    store, _ = samples_kb
    retriever = Retriever(store, memo_embedder)
    query = "compensation salary bands and quarterly closing procedure"
    everyone = retriever.search(query, "kb", EVERYONE, top_k=100)
    assert everyone and not any(h.source.startswith(("hr/", "finance/")) for h in everyone)
    hr = retriever.search(query, "kb", Principal("h", groups=("hr",)), top_k=100)
    assert hr and all(h.source.startswith("hr/") for h in hr)
    managers = retriever.search(query, "kb", Principal("m", groups=("managers",)), top_k=100)
    assert {h.source.split("/")[0] for h in managers} == {"hr", "finance"}
    assert retriever.search(query, "kb", Principal("nobody", groups=("nobody",)), top_k=5) == []
    pinned = Principal("bot", role="service", groups=("everyone",), knowledge_base="other")
    assert retriever.search(query, "kb", pinned, top_k=5) == []


def test_metadata_filters(samples_kb, memo_embedder: MemoEmbedder):
    store, corpus = samples_kb
    retriever = Retriever(store, memo_embedder)
    assert {h.source for h in retriever.search("policy", "kb", ADMIN, 50, SearchFilters(source_prefix="it/"))} == {
        "it/vpn-setup.md", "it/password-policy.txt"}
    pdf = retriever.search("approval", "kb", ADMIN, 50, SearchFilters(file_types=("pdf",)))
    assert pdf and {h.source for h in pdf} == {"finance/procurement-approval-matrix.pdf"} and pdf[0].page
    doc_id = next(d.id for d in store.documents("kb") if d.source == "leave-policy.md")
    assert {h.document_id for h in retriever.search("leave", "kb", ADMIN, 50, SearchFilters(document_ids=(doc_id,)))} == {doc_id}
    now = datetime.now(timezone.utc)
    assert retriever.search("leave", "kb", ADMIN, 5, SearchFilters(modified_after=now + timedelta(days=1))) == []
    assert retriever.search("leave", "kb", ADMIN, 5, SearchFilters(modified_before=now + timedelta(days=1)))


def test_query_embeddings_are_cached(samples_kb, memo_embedder: MemoEmbedder):
    store, _ = samples_kb
    retriever = Retriever(store, memo_embedder)
    for _ in range(3):
        retriever.search("VPN setup", "kb", EVERYONE, top_k=2)
    assert memo_embedder.queries == 1


def test_new_version_published_by_another_process_is_picked_up(samples_kb, memo_embedder: MemoEmbedder, database_url, models_dir):
    store, corpus = samples_kb
    retriever = Retriever(store, memo_embedder)
    question = "Where is the new Lisbon office located?"
    assert not any(h.source == "lisbon.md" for h in retriever.search(question, "kb", EVERYONE, top_k=5))
    (corpus / "lisbon.md").write_text("# Lisbon office\n\nThe new Lisbon office is at Rua Augusta 100, opened in 2026.\n")
    env = {**os.environ, "ENCLAVE_DATABASE_URL": database_url, "ENCLAVE_DATA_DIR": str(store.index_root.parent),
           "ENCLAVE_MODELS_DIR": str(models_dir), "ENCLAVE_DEFAULT_KB": "kb"}
    subprocess.run([sys.executable, "-m", "app.cli.ingest_cli", "run", str(corpus)], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=600)
    assert retriever.search(question, "kb", EVERYONE, top_k=1)[0].source == "lisbon.md"


def test_langchain_adapter(samples_kb, memo_embedder: MemoEmbedder):
    store, _ = samples_kb
    lc = EnclaveRetriever(retriever=Retriever(store, memo_embedder), knowledge_base="kb", principal=EVERYONE, top_k=2)
    docs = lc.invoke("How do I set up the VPN?")
    assert len(docs) == 2 and docs[0].metadata["source"] == "it/vpn-setup.md"
    assert docs[0].page_content and docs[0].id == str(docs[0].metadata["chunk_id"])
    hr_only = lc.invoke("compensation bands")
    assert not any(d.metadata["source"].startswith("hr/") for d in hr_only)


def test_mmr_prefers_diverse_results(database_url: str, tmp_path: Path, memo_embedder: MemoEmbedder):
    store = KnowledgeBaseStore(make_engine(database_url), tmp_path / "ix", memo_embedder.name, memo_embedder.dimension)
    texts = ["The cafeteria serves lunch from noon.", "The cafeteria serves lunch from noon!",
             "The cafeteria serves lunch starting at noon.", "Parking permits are issued by facilities."]
    with store.writer("kb") as writer:
        for i, text in enumerate(texts):
            doc = DocumentInput("", f"d{i}.md", "md", None, f"h{i}", 1, ["everyone"])
            writer.replace_documents([(doc, [ChunkInput(0, text, None, None)], memo_embedder.embed_passages([text]))])
    query = "when does the cafeteria serve lunch"
    plain = Retriever(store, memo_embedder).search(query, "kb", EVERYONE, top_k=2)
    diverse = Retriever(store, memo_embedder, RetrievalConfig(mmr_lambda=0.3)).search(query, "kb", EVERYONE, top_k=2)
    assert all("cafeteria" in h.text for h in plain)
    assert "cafeteria" in diverse[0].text and "Parking" in diverse[1].text


def test_cross_encoder_reranking(samples_kb, memo_embedder: MemoEmbedder, tmp_path: Path):
    """A tiny cross-encoder built from a config: the reranked order is the model's score order."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder = tmp_path / "tiny-reranker"
    tokenizer = BertTokenizerFast.from_pretrained(str(memo_embedder.model_path))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    store, _ = samples_kb
    reranker = make_reranker(str(folder))
    hits = Retriever(store, memo_embedder, RetrievalConfig(rerank_top_n=8), reranker).search("annual leave", "kb", EVERYONE, 5)
    assert len(hits) == 5 and all(h.rerank_score is not None for h in hits)
    assert [h.rerank_score for h in hits] == sorted((h.rerank_score for h in hits), reverse=True)
    direct = reranker.predict([("annual leave", hits[0].text)])
    assert float(np.asarray(direct).reshape(-1)[0]) == pytest.approx(hits[0].rerank_score, rel=1e-4)


def test_ivf_past_threshold_recall_and_tight_acl(tmp_path: Path):
    rng = np.random.default_rng(7)
    centers = rng.normal(size=(40, 64))
    data = centers[rng.integers(0, 40, 6000)] + 0.6 * rng.normal(size=(6000, 64))
    data = (data / np.linalg.norm(data, axis=1, keepdims=True)).astype(np.float32)
    ids = np.arange(1, 6001, dtype=np.int64)
    exact = VectorIndex(64)
    exact.add(ids, data)
    approx = VectorIndex(64, nprobe=16)
    approx.add(ids, data)
    assert approx.optimize(approximate_from=5000) and approx.kind == "ivf"
    queries = data[rng.choice(6000, 50, replace=False)] + 0.1 * rng.normal(size=(50, 64)).astype(np.float32)
    recall = np.mean([
        len(set(exact.search(q, 10)[1]) & set(approx.search(q, 10)[1])) / 10 for q in queries
    ])
    assert recall >= 0.95
    allowed = ids[rng.random(6000) < 0.01]  # 1% of chunks permitted: more lists are probed
    filtered_recall = []
    for q in queries:
        scores, found = approx.search(q, 10, allowed_ids=allowed)
        assert len(found) == 10 and set(found) <= set(allowed)
        filtered_recall.append(len(set(found) & set(exact.search(q, 10, allowed_ids=allowed)[1])) / 10)
    assert np.mean(filtered_recall) >= 0.95
    approx.remove(ids[:5000])  # shrinks below the threshold: back to an exact index
    assert approx.optimize(approximate_from=5000) and approx.kind == "flat" and len(approx) == 1000


# --- The permission property ---------------------------------------------------------------

WORDS = "leave salary audit vpn laptop budget merger payroll visitor badge contract refund warranty forecast".split()
GROUPS = ["hr", "finance", "legal", "it", "everyone"]
_EXAMPLES = itertools.count()


@pytest.fixture(scope="module")
def property_env(tmp_path_factory: pytest.TempPathFactory, embedder):
    folder = tmp_path_factory.mktemp("property")
    engine = make_engine(f"sqlite:///{folder / 'db.sqlite'}")
    upgrade(engine)
    return engine, folder, MemoEmbedder(embedder)


documents_strategy = st.lists(
    st.tuples(
        st.lists(st.sampled_from(WORDS), min_size=3, max_size=10),  # text
        st.sets(st.sampled_from(GROUPS), min_size=1, max_size=2),  # groups
    ),
    min_size=1, max_size=14,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=documents_strategy, reader=st.sets(st.sampled_from(GROUPS), max_size=2),
       query=st.lists(st.sampled_from(WORDS), min_size=1, max_size=3), top_k=st.integers(1, 6))
def test_principal_sees_exactly_a_knowledge_base_of_permitted_chunks(property_env, docs, reader, query, top_k):
    """Searching the full KB as a principal == searching, as admin, a KB holding only the permitted
    chunks: same chunks, same order, same dense, BM25 and fused scores, same count."""
    engine, folder, embedder = property_env
    name = f"p{next(_EXAMPLES)}"
    store = KnowledgeBaseStore(engine, folder / "ix", embedder.name, embedder.dimension)
    permitted = [i for i, (_, groups) in enumerate(docs) if groups & reader]
    for kb, chosen in ((f"{name}-full", range(len(docs))), (f"{name}-only", permitted)):
        with store.writer(kb) as writer:
            for i in chosen:
                text = f"Document {i}: " + " ".join(docs[i][0]) + "."
                doc = DocumentInput("", f"doc{i}.md", "md", None, str(i), len(text), sorted(docs[i][1]))
                writer.replace_documents([(doc, [ChunkInput(0, text, None, None)], embedder.embed_passages([text]))])
    retriever = Retriever(store, embedder)
    question = " ".join(query)
    principal = Principal("p", groups=tuple(sorted(reader)))
    for mode in ("hybrid", "dense", "bm25"):
        seen = retriever.search(question, f"{name}-full", principal, top_k, mode=mode)
        truth = retriever.search(question, f"{name}-only", ADMIN, top_k, mode=mode)
        assert [h.source for h in seen] == [h.source for h in truth]
        for a, b in zip(seen, truth):
            assert a.dense_score == pytest.approx(b.dense_score, abs=1e-6) if b.dense_score is not None else a.dense_score is None
            assert a.bm25_score == pytest.approx(b.bm25_score, rel=1e-5) if b.bm25_score is not None else a.bm25_score is None
            assert a.fused_score == pytest.approx(b.fused_score)
        assert all(int(h.source[3:-3]) in permitted for h in seen)
        if mode != "bm25":  # dense (and so hybrid) returns k whenever k permitted chunks exist
            assert len(seen) == min(top_k, len(permitted))
