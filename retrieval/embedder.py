"""Sentence-transformers embedder with configurable query/passage prefixes (e5/bge-style models).

Precision: ``dtype="bfloat16"`` loads the weights in bfloat16, which CPUs with AMX or AVX512-BF16
(Intel Sapphire Rapids and later, AMD Zen 4 and later) multiply natively through oneDNN: all-MiniLM-L6-v2
spent 3.3x less CPU time per passage than in float32 on such a host, with cosine >= 0.9999 to the
float32 vectors (docs/benchmarks.md, "Ingestion"). Elsewhere bfloat16 is emulated and slower, so
``dtype="auto"`` picks it only where the CPU has it (:func:`native_bfloat16`).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

DTYPES = ("auto", "float32", "bfloat16")
QUERY_RUNTIMES = ("onnxruntime", "torch")
# Loading a model with a dtype switches torch's process-wide default dtype for a moment: two threads
# loading at once (the ingest's embedding workers) could build a model of mixed dtypes. One at a time.
_LOAD_LOCK = threading.Lock()


def native_bfloat16(device: str = "cpu") -> bool:
    """True when bfloat16 matmuls run natively: a CPU with AMX tiles or AVX512-BF16, or a CUDA
    device that supports bf16."""
    import torch

    if device.startswith("cuda"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device != "cpu":
        return False
    cpu = torch.cpu
    return any(bool(getattr(cpu, probe, lambda: False)()) for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """``auto`` -> bfloat16 where :func:`native_bfloat16`, else float32; others as given."""
    if dtype not in DTYPES:
        raise ValueError(f"embedding dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if dtype == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    return dtype


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
        dtype: str = "float32",
        query_runtime: str = "torch",
        cache_dir: Path | str | None = None,
        query_weights: str = "int8",
    ):
        self.model_path = Path(model_path)
        self.name = name or self.model_path.name
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        self.batch_size = batch_size
        self.device = device
        self.dtype = resolve_dtype(dtype, device)
        if query_runtime not in QUERY_RUNTIMES:
            raise ValueError(f"query runtime must be one of {', '.join(QUERY_RUNTIMES)}, not {query_runtime!r}")
        # ONNX Runtime for queries on CPU only, and only with somewhere to keep the exported graph.
        self.query_runtime = query_runtime if device == "cpu" and cache_dir is not None else "torch"
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.query_weights = query_weights  # of the ONNX query graph: int8 or float32 (retrieval.onnx_query)
        self._model = None
        self._dimension: int | None = None
        self._query_encoder = None
        self._query_encoder_ready = False
        self._query_lock = threading.Lock()

    @property
    def model(self):
        if self._model is None:
            with _LOAD_LOCK:
                if self._model is None:
                    self._model = self._load()
        return self._model

    def _load(self):
        from sentence_transformers import SentenceTransformer

        kwargs = {}
        if self.dtype == "bfloat16":
            import torch

            kwargs["model_kwargs"] = {"dtype": torch.bfloat16}
        return SentenceTransformer(str(self.model_path), device=self.device, local_files_only=True, **kwargs)

    def replica(self) -> "Embedder":
        """The same embedder with a model copy of its own (loaded lazily): for a second thread."""
        return Embedder(self.model_path, name=self.name, query_prefix=self.query_prefix,
                        passage_prefix=self.passage_prefix, batch_size=self.batch_size, device=self.device,
                        dtype=self.dtype, query_runtime=self.query_runtime, cache_dir=self.cache_dir,
                        query_weights=self.query_weights)

    @property
    def embedder_id(self) -> str:
        """What a knowledge base records as the embedder its vectors came from (checked on every
        ingest: ``KnowledgeBaseStore.ensure_kb`` refuses a different one). The model name alone:
        float32 and bfloat16 give interchangeable vectors (cosine >= 0.9999 measured), so a
        knowledge base built with one may be extended with the other. A backend whose vectors
        differ more (an int8 model, another model) must return a different id here."""
        return self.name

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
        encoder = self.prepare_queries()
        if encoder is not None:
            return encoder.encode([self.query_prefix + text])[0]
        return self._encode([self.query_prefix + text])[0]

    def prepare_queries(self):
        """Load (exporting once) the ONNX query graph when ``query_runtime`` is onnxruntime; the
        server calls it at start so the first search does not pay for it. None: torch embeds queries."""
        if self.query_runtime != "onnxruntime":
            return None
        if not self._query_encoder_ready:
            model = self.model  # loaded first: its lock is not the one held below
            with self._query_lock:
                if not self._query_encoder_ready:
                    self._query_encoder = self._build_query_encoder(model)
                    self._query_encoder_ready = True
        return self._query_encoder

    def _build_query_encoder(self, model):
        from sentence_transformers import SentenceTransformer

        from retrieval.onnx_query import OnnxQueryEncoder, tokenizer_of

        # The graph is float32 whatever the passages' precision: export from (and check against)
        # the float32 weights.
        reference = model if self.dtype == "float32" else SentenceTransformer(
            str(self.model_path), device="cpu", local_files_only=True)
        # One thread: 3.2 ms a query either way without busy-waiting (2 threads spinning: 2.2 ms, but
        # spinning takes the core from the generator and from concurrent searches).
        return OnnxQueryEncoder.build(self.model_path, reference, self.cache_dir, threads=1,
                                      tokenize=tokenizer_of(model), weights=self.query_weights)

    def _encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dimension), dtype=np.float32)
        if self.dtype == "float32":
            vectors = self.model.encode(
                texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
                show_progress_bar=False,
            )
            return np.ascontiguousarray(vectors, dtype=np.float32)
        # numpy has no bfloat16: take the tensors, widen, and normalise again in float32.
        tensor = self.model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=False, convert_to_tensor=True,
            show_progress_bar=False,
        )
        vectors = tensor.float().cpu().numpy()
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
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
