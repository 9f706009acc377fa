"""Queries embedded through ONNX Runtime agree with torch, the graph is exported once into a private
cache, and a graph that cannot be used leaves queries to torch (the bundled MiniLM, really run)."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np

from retrieval.embedder import Embedder

QUERIES = ["How many days of paid annual leave do full-time employees get?", "病假需要提供什么证明？",
           "max_connections", ""]


def _embedder(model_path: Path, cache: Path, **kwargs) -> Embedder:
    return Embedder(model_path, name="all-minilm-l6-v2", cache_dir=cache, query_runtime="onnxruntime", **kwargs)


def test_onnx_queries_match_torch_and_the_graph_is_cached_privately(embedder, tmp_path: Path):
    cache = tmp_path / "cache" / "onnx"
    onnx = _embedder(embedder.model_path, cache, dtype="float32", query_weights="float32")
    assert onnx.prepare_queries() is not None
    torch_vectors = np.stack([embedder.embed_query(q) for q in QUERIES])  # the session's torch embedder
    onnx_vectors = np.stack([onnx.embed_query(q) for q in QUERIES])
    assert onnx_vectors.dtype == np.float32 and onnx_vectors.shape == torch_vectors.shape
    assert np.min(np.sum(onnx_vectors * torch_vectors, axis=1)) > 0.9999
    assert np.allclose(np.linalg.norm(onnx_vectors, axis=1), 1.0, atol=1e-5)

    graphs = list(cache.glob("*.onnx"))
    assert len(graphs) == 1 and not list(cache.glob("*.tmp"))
    assert stat.S_IMODE(graphs[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700 and stat.S_IMODE(cache.parent.stat().st_mode) == 0o700

    # A second embedder (another process, a restart) reuses the graph instead of exporting again.
    written = graphs[0].stat().st_mtime_ns
    again = _embedder(embedder.model_path, cache, dtype="bfloat16", query_weights="float32")
    assert np.allclose(again.embed_query(QUERIES[0]), onnx_vectors[0], atol=1e-6)
    assert graphs[0].stat().st_mtime_ns == written


def test_int8_query_graph_is_quantized_and_still_agrees_with_torch(embedder, tmp_path: Path):
    import onnx

    cache = tmp_path / "onnx"
    int8 = _embedder(embedder.model_path, cache)  # the default weights
    assert int8.query_weights == "int8" and int8.prepare_queries() is not None
    graph = next(cache.glob("*-int8.onnx"))
    model = onnx.load(str(graph))
    weights = {init.name for init in model.graph.initializer}
    nodes = model.graph.node
    assert sum(node.op_type == "MatMulNBits" for node in nodes) == 36  # 6 layers x (q, k, v, out, 2 feed-forward)
    # What stays float32 are the attention products between activations, never a weight.
    assert not [n.name for n in nodes if n.op_type == "MatMul" and weights.intersection(n.input)]
    assert stat.S_IMODE(graph.stat().st_mode) == 0o600
    torch_vectors = np.stack([embedder.embed_query(q) for q in QUERIES[:3]])
    vectors = np.stack([int8.embed_query(q) for q in QUERIES[:3]])
    cosine = np.sum(vectors * torch_vectors, axis=1)
    assert np.min(cosine) > 0.998 and np.max(cosine) < 0.99999  # close, and not the float32 graph


def test_int8_that_cannot_be_made_falls_back_to_float32(embedder, tmp_path: Path, monkeypatch):
    from retrieval import onnx_query

    def unavailable(path):
        raise ImportError("No module named 'onnx_ir'")  # as an install without the quantizer's needs

    monkeypatch.setattr(onnx_query, "_quantize_int8", unavailable)
    cache = tmp_path / "onnx"
    fallback = _embedder(embedder.model_path, cache)
    assert fallback.prepare_queries() is not None
    graphs = list(cache.glob("*.onnx"))
    assert len(graphs) == 1 and not graphs[0].name.endswith("-int8.onnx")  # the float32 graph serves
    assert not list(cache.glob("*.tmp"))
    assert float(fallback.embed_query(QUERIES[0]) @ embedder.embed_query(QUERIES[0])) > 0.9999


def test_a_broken_cached_graph_is_exported_again(embedder, tmp_path: Path):
    cache = tmp_path / "onnx"
    first = _embedder(embedder.model_path, cache, dtype="float32", query_weights="float32")
    first.prepare_queries()
    graph = next(cache.glob("*.onnx"))
    graph.write_bytes(b"not an onnx graph")
    broken = _embedder(embedder.model_path, cache, dtype="float32", query_weights="float32")
    assert broken.prepare_queries() is None  # this load falls back to torch...
    assert broken.embed_query(QUERIES[0]).shape == (384,)
    assert not graph.exists()  # ...and drops the bad file, so the next load exports a good one
    assert _embedder(embedder.model_path, cache, dtype="float32", query_weights="float32").prepare_queries() is not None


def test_torch_runtime_or_no_cache_exports_nothing(embedder, tmp_path: Path):
    plain = Embedder(embedder.model_path, cache_dir=tmp_path / "onnx", query_runtime="torch")
    uncached = Embedder(embedder.model_path, query_runtime="onnxruntime")
    assert plain.prepare_queries() is None and uncached.prepare_queries() is None
    assert not (tmp_path / "onnx").exists()
