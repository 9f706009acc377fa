"""Sentence-transformers embedder with configurable query/passage prefixes (e5/bge-style models)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class Embedder:
    """Loads the model lazily: an unchanged re-ingest or a status command never pays for it."""

    def __init__(
        self,
        model_path: Path | str,
        *,
        name: str | None = None,
        query_prefix: str = "",
        passage_prefix: str = "",
        batch_size: int = 16,
        device: str = "cpu",
    ):
        self.model_path = Path(model_path)
        self.name = name or self.model_path.name
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        self.batch_size = batch_size
        self.device = device
        self._model = None
        self._dimension: int | None = None

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(self.model_path), device=self.device, local_files_only=True)
        return self._model

    @property
    def dimension(self) -> int:
        """Read from the model's config when possible so callers need not load the weights."""
        if self._dimension is None:
            self._dimension = _dimension_from_config(self.model_path) or int(
                self.model.get_sentence_embedding_dimension()
            )
        return self._dimension

    def embed_passages(self, texts: list[str]) -> np.ndarray:
        return self._encode([self.passage_prefix + t for t in texts])

    def embed_query(self, text: str) -> np.ndarray:
        return self._encode([self.query_prefix + text])[0]

    def _encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dimension), dtype=np.float32)
        vectors = self.model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


def _dimension_from_config(path: Path) -> int | None:
    """Embedding width without loading weights: a Dense head's out_features, else the pooling config."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return None
    dimension = None
    for module in json.loads(modules_file.read_text()):
        config = path / module.get("path", "") / "config.json"
        if not module.get("path") or not config.is_file():
            continue
        data = json.loads(config.read_text())
        dimension = data.get("out_features") or data.get("word_embedding_dimension") or dimension
    return int(dimension) if dimension else None
