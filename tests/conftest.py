"""Shared fixtures: real models (loaded once per session) and real databases (SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import sqlalchemy as sa

from app.db import make_engine, upgrade
from llm.models import ModelStore
from retrieval.embedder import Embedder

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "docs"
MINILM = "all-minilm-l6-v2"


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The real bundled models, pulled (or re-verified) once per test session."""
    root = Path(os.environ.get("ENCLAVE_TEST_MODELS_DIR") or "/tmp/enclave-test-models")
    ModelStore(root).pull(log=lambda _msg: None)
    return root


class MemoEmbedder(Embedder):
    """The real embedder, counting the passages and queries it is asked for.

    Vectors are memoised across tests (same model, same text, same vector) so that the many
    ingests of the same small corpora do not each pay for the model again.
    """

    _memo: dict[str, np.ndarray] = {}

    def __init__(self, inner: Embedder):
        super().__init__(inner.model_path, name=inner.name)
        self._model = inner.model
        self.passages = 0
        self.queries = 0

    def _cached(self, texts: list[str]) -> np.ndarray:
        todo = [t for t in dict.fromkeys(texts) if t not in self._memo]
        for text, vector in zip(todo, super()._encode(todo)):
            self._memo[text] = vector
        return np.stack([self._memo[t] for t in texts]) if texts else super()._encode([])

    def embed_passages(self, texts: list[str]) -> np.ndarray:
        self.passages += len(texts)
        return self._cached([self.passage_prefix + t for t in texts])

    def embed_query(self, text: str) -> np.ndarray:
        self.queries += 1
        return self._cached([self.query_prefix + text])[0]


@pytest.fixture(scope="session")
def embedder(models_dir: Path) -> Embedder:
    resolved = ModelStore(models_dir).resolve(MINILM)
    return Embedder(resolved.path, name=MINILM)


@pytest.fixture
def memo_embedder(embedder: Embedder) -> MemoEmbedder:
    return MemoEmbedder(embedder)


def postgres_url() -> str:
    url = os.environ.get("ENCLAVE_TEST_DATABASE_URL")
    if not url:
        pytest.fail(
            "ENCLAVE_TEST_DATABASE_URL is not set: run the suite with `make test`, which starts PostgreSQL "
            "(scripts/ensure-postgres.sh) and points the tests at it"
        )
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database per test: a SQLite file, or a private PostgreSQL schema."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'enclave.db'}"
        upgrade(make_engine(url))
        yield url
        return
    base = sa.engine.make_url(postgres_url())
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    # libpq's `options` sets the search_path for every connection, subprocesses included.
    url = base.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    upgrade(make_engine(url))
    try:
        yield url
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test item, so a fixture can tell whether the test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)
