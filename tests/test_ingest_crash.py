"""SIGKILL a real `ingest run` process mid-work, change the corpus, resume: the result must be exact."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from ingest.chunking import Chunker
from ingest.loaders import load_document
from retrieval.embedder import Embedder
from retrieval.vector_index import IndexDirectory
from tests.conftest import REPO

WORDS = (
    "invoice ledger audit vendor payroll budget forecast policy server backup network printer contract "
    "laptop badge visitor warehouse shipment customer refund warranty license training safety meeting"
).split()
CHUNK_SIZE, OVERLAP = 750, 150


def write_file(path: Path, rng: random.Random) -> None:
    paragraphs = []
    for _ in range(rng.randint(2, 5)):
        sentences = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + f" code {rng.randint(1000, 9999)}."
            for _ in range(rng.randint(3, 6))
        ]
        paragraphs.append(" ".join(sentences))
    path.write_text(f"# {path.stem}\n\n" + "\n\n".join(paragraphs) + "\n")


def ingest_process(corpus: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli.ingest_cli", "run", str(corpus), "--json"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def document_count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        try:
            return conn.execute(sa.text("SELECT count(*) FROM kb_document")).scalar_one()
        except sa.exc.DBAPIError:
            return 0


@pytest.mark.slow
def test_sigkill_then_resume_gives_exact_chunk_set(database_url: str, tmp_path: Path, models_dir: Path, embedder: Embedder):
    rng = random.Random(20261125)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(48):
        write_file(corpus / f"doc-{i:03d}.md", rng)
    env = {
        **os.environ,
        "ENCLAVE_DATA_DIR": str(tmp_path / "var"),
        "ENCLAVE_DATABASE_URL": database_url,
        "ENCLAVE_MODELS_DIR": str(models_dir),
        "ENCLAVE_CHUNKING__CHUNK_SIZE": str(CHUNK_SIZE),
        "ENCLAVE_CHUNKING__CHUNK_OVERLAP": str(OVERLAP),
        "ENCLAVE_INGEST__BATCH_FILES": "4",
        # The stored vectors are compared below with the float32 fixture's to 1e-4: pin the CLI to
        # float32 too (embedding.dtype auto picks bfloat16 on CPUs with AMX; cosine >= 0.9999,
        # covered by test_embedder_precision.py).
        "ENCLAVE_EMBEDDING__DTYPE": "float32",
    }
    engine = sa.create_engine(database_url)

    kills = 0
    for round_ in range(4):
        before = document_count(engine)
        # Odd rounds publish the index after every batch (so some kills land inside a publish);
        # even rounds only at the end (so a kill leaves committed rows ahead of the index).
        env["ENCLAVE_INGEST__CHECKPOINT_SECONDS"] = "0" if round_ % 2 else "3600"
        proc = ingest_process(corpus, env)
        if round_ == 0:
            time.sleep(rng.uniform(0.5, 3.0))  # somewhere in start-up: imports, migrations, model load
        else:
            deadline = time.monotonic() + 120
            while document_count(engine) == before and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)  # wait for the first committed batch of this run ...
            time.sleep(rng.uniform(0.0, 1.5))  # ... then die anywhere in the batches that follow
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate()
        # Between crashes the folder changes too: edits, deletions, additions.
        files = sorted(corpus.glob("*.md"))
        for path in rng.sample(files, 2):
            write_file(path, rng)
        rng.choice(files).unlink()
        write_file(corpus / f"new-{round_}.md", rng)
    assert kills >= 3, "the corpus was too small to interrupt the ingest"

    proc = ingest_process(corpus, env)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    report = json.loads(stdout)
    assert report["failed"] == 0

    # Exactly the chunks a clean ingest of the final folder would store, each once.
    chunker = Chunker(CHUNK_SIZE, OVERLAP)
    expected = {p.name: [c.text for c in chunker.split(load_document(p))] for p in sorted(corpus.glob("*.md"))}
    with engine.connect() as conn:
        docs = dict(conn.execute(sa.text("SELECT id, source FROM kb_document")).all())
        rows = conn.execute(sa.text("SELECT id, document_id, ordinal, text, embedding FROM kb_chunk ORDER BY document_id, ordinal")).all()
    stored: dict[str, list[str]] = {}
    for _id, document_id, _ordinal, text, _embedding in rows:
        stored.setdefault(docs[document_id], []).append(text)
    assert stored == expected
    assert report["total_chunks"] == len(rows) == sum(len(v) for v in expected.values())

    # The published index holds exactly those chunk ids, each with its own (fresh) vector.
    index, lexical, manifest = IndexDirectory(tmp_path / "var" / "indexes" / "default").load(embedder.dimension)
    assert manifest is not None
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    assert np.array_equal(np.sort(index.ids()), np.sort(ids))
    assert np.array_equal(np.sort(lexical.ids()), np.sort(ids))
    stored_vectors = np.stack([np.frombuffer(r[4], dtype=np.float32) for r in rows])
    indexed = np.stack([index.index.reconstruct(int(i)) for i in ids])
    np.testing.assert_allclose(indexed, stored_vectors, atol=1e-6)
    sample = rng.sample(range(len(rows)), 8)
    # What is embedded is the chunk with its contextual header (title > heading path) in front.
    with engine.connect() as conn:
        context = {r[0]: (r[1], r[2]) for r in conn.execute(sa.text(
            "SELECT c.id, d.title, c.heading FROM kb_chunk c JOIN kb_document d ON d.id = c.document_id")).all()}
    fresh = embedder.embed_passages([chunker.embedding_text(*context[rows[i][0]], rows[i][3]) for i in sample])
    np.testing.assert_allclose(fresh, stored_vectors[sample], atol=1e-4)

    # And a further run finds nothing to do.
    proc = ingest_process(corpus, env)
    stdout, stderr = proc.communicate(timeout=600)
    again = json.loads(stdout)
    assert (again["added"], again["updated"], again["deleted"], again["chunks"]) == (0, 0, 0, 0), stderr
    assert again["unchanged"] == len(expected)
