"""Query embedding through ONNX Runtime: the same float32 network as sentence-transformers, less overhead.

A search embeds one short query. In torch eager mode the per-operator overhead of a 6-layer MiniLM
dominates that: 7.6 ms per query through sentence-transformers on two threads here, 3.2 ms for the
same float32 graph on one ONNX Runtime thread, with vectors at cosine >= 0.99999 to torch's (docs/benchmarks.md,
"Search over HTTP"). Passages stay on torch (batched, bfloat16 where native), so nothing about the
index changes: only the query side moves.

The graph is exported once per model from its float32 weights (torch.onnx, about 2 s), cached in
a private folder under a key derived from the model's files, and checked against torch on probe
sentences every time it is loaded: a graph that disagrees is not used (torch answers instead, with
a warning). Written by hand because sentence-transformers' own ONNX backend needs `optimum`, whose
releases pin older transformers than llm/ requires.

``weights="int8"`` (the default) then stores the matrix weights in 8 bits, in blocks of 32 with a
scale each, and lets ONNX Runtime multiply in int8 (its ``MatMulNBits`` operator, accuracy level 4):
8.3 -> 7.0 ms a query on the AMD host, cosine >= 0.9992 to float32 torch over the 159 benchmark
questions, and passage-level hit@1/hit@5/MRR@10 within 0.004 of the float32 graph on all three
benchmark sets. The per-channel dynamic int8 of ``quantize_dynamic`` was faster (3.5 ms) but lost
a point of MRR and 3 of hit@5 on the Python-docs set, so it is not used. A graph that cannot be
quantized (an older ONNX Runtime) is used in float32, with a warning.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# English, Chinese, and a text longer than the model's window (truncation must agree too).
PROBES = (
    "How many days of paid annual leave do full-time employees get?",
    "默认的年假天数是多少？员工可以结转多少天？",
    " ".join(["The checkpointer writes dirty buffers to disk at regular intervals."] * 60),
)
# The least cosine to torch's float32 vectors on every probe: float32 graphs agree to rounding;
# int8 block weights measured 0.9992 at worst over the benchmark questions (per-channel dynamic int8,
# at 0.981, already retrieved measurably worse).
MIN_COSINE = {"float32": 0.9999, "int8": 0.998}
WEIGHTS = tuple(MIN_COSINE)
INT8_BLOCK = 32
_FILE_MODE = 0o600


def model_key(model_path: Path, max_seq_length: int) -> str:
    """Changes when any file of the model changes (weights, tokenizer, pooling config) or its window."""
    digest = hashlib.sha256(f"max_seq_length={max_seq_length}\n".encode())
    for path in sorted(p for p in Path(model_path).rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(model_path).as_posix()} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


class OnnxQueryEncoder:
    """``encode(texts)`` -> L2-normalised float32 vectors, from the exported graph of ``st_model``."""

    def __init__(self, session, tokenize, input_names: list[str]):
        self._session = session
        self._tokenize = tokenize
        self._inputs = input_names

    @classmethod
    def build(cls, model_path: Path, reference, cache_dir: Path, threads: int = 1,
              tokenize=None, weights: str = "int8") -> "OnnxQueryEncoder | None":
        """``reference``: the model as a float32 SentenceTransformer (exported if not cached, and the
        probes' reference); ``tokenize``: the serving model's tokenizer call (default: the
        reference's), so the reference copy need not stay in memory; ``weights``: int8 or float32
        (int8 falls back to float32 when it cannot be made). None when no graph can be made or it
        disagrees with torch."""
        if weights not in WEIGHTS:
            raise ValueError(f"query graph weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")
        if importlib.util.find_spec("onnxruntime") is None:
            log.warning("onnxruntime is not installed: queries are embedded with torch")
            return None
        encoder = cls._build(model_path, reference, cache_dir, threads, tokenize, weights)
        if encoder is None and weights != "float32":
            log.warning("int8 query graph for %s unavailable: trying float32", Path(model_path).name)
            encoder = cls._build(model_path, reference, cache_dir, threads, tokenize, "float32")
        if encoder is None:
            log.warning("queries for %s are embedded with torch", Path(model_path).name)
        return encoder

    @classmethod
    def _build(cls, model_path: Path, reference, cache_dir: Path, threads: int, tokenize,
               weights: str) -> "OnnxQueryEncoder | None":
        import onnxruntime as ort

        features = tokenizer_of(reference)([PROBES[0]])
        input_names = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in features]
        suffix = "" if weights == "float32" else f"-{weights}"
        path = Path(cache_dir) / f"{Path(model_path).name}-{model_key(model_path, reference.max_seq_length)}{suffix}.onnx"
        try:
            if not path.is_file():
                _export(reference, features, input_names, path, weights)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # No busy-waiting between queries: the cores are shared with the generator and with
            # other requests' searches.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # a broken cache file, an exporter that cannot handle the model
            log.warning("ONNX query graph for %s (%s) unavailable (%s: %s)", Path(model_path).name, weights,
                        type(exc).__name__, exc)
            path.unlink(missing_ok=True)
            return None
        encoder = cls(session, tokenize or tokenizer_of(reference), input_names)
        # No progress bar: sentence-transformers shows one at log level INFO, and a `serve --workers 2`
        # worker hung at start in tqdm's write lock (its main thread, collecting a bar, waited forever).
        expected = _normalise(np.asarray(reference.encode(list(PROBES), convert_to_numpy=True, show_progress_bar=False),
                                         dtype=np.float32))
        cosine = float(np.min(np.sum(encoder.encode(list(PROBES)) * expected, axis=1)))
        if cosine < MIN_COSINE[weights]:
            log.warning("ONNX query graph for %s (%s) disagrees with torch (cosine %.5f)", Path(model_path).name,
                        weights, cosine)
            path.unlink(missing_ok=True)
            return None
        return encoder

    def encode(self, texts: list[str]) -> np.ndarray:
        features = self._tokenize(texts)
        feed = {name: features[name].numpy().astype(np.int64) for name in self._inputs}
        return _normalise(self._session.run(None, feed)[0].astype(np.float32))


def tokenizer_of(model):
    """The model's text -> tensors step (``preprocess`` since sentence-transformers 6, ``tokenize`` before)."""
    return getattr(model, "preprocess", None) or model.tokenize


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


def _export(reference, features, input_names: list[str], path: Path, weights: str = "float32") -> None:
    import torch

    class Graph(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            return self.model(dict(zip(input_names, tensors)))["sentence_embedding"]

    from retrieval.vector_index import private_dirs

    private_dirs(path.parent)  # each missing folder 0700, whatever the umask
    axes = {name: {0: "batch", 1: "tokens"} for name in input_names}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")  # 0600; renamed once complete
    os.close(fd)
    try:
        # The tracer's warnings concern data-dependent branches; the probes in build() check the result.
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Graph(reference).eval(), tuple(features[name] for name in input_names), tmp, dynamo=False,
                input_names=input_names, output_names=["embedding"],
                dynamic_axes={**axes, "embedding": {0: "batch"}}, opset_version=17,
            )
        if weights == "int8":
            _quantize_int8(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)  # two processes exporting at once: either complete file wins
    finally:
        Path(tmp).unlink(missing_ok=True)
    log.info("exported the query graph of %s to %s", path.name, path)


def _quantize_int8(path: str) -> None:
    """Rewrite the float32 graph at ``path`` with 8-bit block-quantized MatMul weights, in place."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    chatter = logging.getLogger("onnxruntime.quantization")  # a line per node it skips, at INFO
    level = chatter.level
    chatter.setLevel(max(level, logging.WARNING))
    try:
        quantizer = MatMulNBitsQuantizer(onnx.load(path), bits=8, block_size=INT8_BLOCK, is_symmetric=True,
                                         accuracy_level=4)  # 4: int8 products, not float32 after dequantizing
        quantizer.process()
        quantizer.model.save_model_to_file(path, use_external_data_format=False)
    finally:
        chatter.setLevel(level)
