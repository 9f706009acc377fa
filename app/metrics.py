"""Prometheus metrics of the service, all in prometheus_client's default registry.

The default registry is shared on purpose: other modules (the audit chain's write-failure counter,
for one) define their metrics there and appear on ``GET /metrics`` without any wiring.

The libraries know nothing of Prometheus: the batching scheduler calls a step observer, the
retriever a search observer, the ingestion pipeline a report callback; this module supplies those
callbacks. Values read at scrape time (queue depth, adapter version, GPU state) come from custom
collectors, so they are exact when scraped and cost nothing in between.

Names follow the Prometheus conventions: ``enclave_`` prefix, base units (``_seconds``,
``_bytes``, ``_ratio``), ``_total`` on counters (added by prometheus_client).
"""

from __future__ import annotations

import logging
import threading
import weakref

from prometheus_client import REGISTRY, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from ingest.pipeline import IngestReport
from retrieval.retriever import SearchStats

log = logging.getLogger(__name__)
# The *_created series double every counter and histogram for nothing Prometheus uses.
disable_created_metrics()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

HTTP_REQUEST_DURATION = Histogram(
    "enclave_http_request_duration_seconds",
    "HTTP requests by route template, method and status: time until the last byte of the response was sent",
    ["method", "route", "status"], buckets=_LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "enclave_generation_time_to_first_token_seconds",
    "Chat requests: time from the request reaching the chat service (retrieval included) to the first generated text",
    ["model"], buckets=(0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
)
INTER_TOKEN_LATENCY = Histogram(
    "enclave_generation_inter_token_latency_seconds",
    "Chat requests: mean time per generated token after the first (one observation per request)",
    ["model"], buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5),
)
PROMPT_TOKENS = Counter("enclave_generation_prompt_tokens", "Prompt tokens of finished generations", ["model"])
GENERATED_TOKENS = Counter("enclave_generation_generated_tokens", "Tokens generated", ["model"])
GENERATION_REQUESTS = Counter(
    "enclave_generation_requests", "Generations by outcome: stop, length, cancelled, error, rejected (queue full)",
    ["model", "outcome"],
)
GENERATION_LOOPS = Counter(
    "enclave_generation_loops", "Generations the loop guard ended because they repeated themselves", ["model"]
)
ANSWERS = Counter(
    "enclave_answers", "Answers by how they were made (generated, extractive, abstained) and whether every "
    "sentence was supported by a cited block", ["mode", "grounded"]
)
BATCH_SIZE = Histogram(
    "enclave_generation_batch_size", "Requests decoded together in one step of the in-process engine",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
PREFILL_TOKENS = Counter(
    "enclave_generation_prefill_tokens",
    "Prompt tokens prefilled by the in-process engine: computed, or cached (taken from a shared or cached prefix)",
    ["source"],
)
for _source in ("computed", "cached"):
    PREFILL_TOKENS.labels(_source)
RETRIEVAL_DURATION = Histogram(
    "enclave_retrieval_duration_seconds", "Searches (dense, BM25 and fusion, reranking when configured)", ["mode"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
RETRIEVAL_ACL_FILTERED = Histogram(
    "enclave_retrieval_acl_filtered_chunks",
    "Chunks of the knowledge base that the reader's access groups excluded, per search",
    buckets=(0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000),
)
INGEST_FILES = Counter("enclave_ingest_files", "Files seen by ingestion runs, by outcome", ["outcome"])
INGEST_RUNS = Counter("enclave_ingest_runs", "Ingestion runs by status (failed: the run itself aborted)", ["status"])

INGEST_OUTCOMES = ("added", "updated", "unchanged", "deleted", "failed", "skipped")
for _outcome in INGEST_OUTCOMES:  # present at 0 from the start, so increase() sees the first failure
    INGEST_FILES.labels(_outcome)
for _status in ("finished", "failed"):
    INGEST_RUNS.labels(_status)


# --- callbacks handed to the libraries ------------------------------------------------------------

def observe_batch_step(batch_size: int) -> None:
    """``llm.batching`` step observer."""
    BATCH_SIZE.observe(batch_size)


def observe_prefill(computed: int, cached: int) -> None:
    """``llm.batching`` prefill observer."""
    PREFILL_TOKENS.labels("computed").inc(computed)
    PREFILL_TOKENS.labels("cached").inc(cached)


def observe_search(stats: SearchStats) -> None:
    """``retrieval.retriever.Retriever`` observer."""
    RETRIEVAL_DURATION.labels(stats.mode).observe(stats.seconds)
    RETRIEVAL_ACL_FILTERED.observe(stats.acl_filtered)


def observe_ingest(report: IngestReport, status: str) -> None:
    """``ingest.pipeline.IngestPipeline`` report callback."""
    for outcome in INGEST_OUTCOMES:
        count = getattr(report, outcome)
        if count:
            INGEST_FILES.labels(outcome).inc(count)
    INGEST_RUNS.labels(status).inc()


def init_model(model: str) -> None:
    """Create a model's series at 0, so that rates and alerts see them before the first request."""
    for outcome in ("stop", "length", "cancelled", "error", "rejected"):
        GENERATION_REQUESTS.labels(model, outcome)
    PROMPT_TOKENS.labels(model)
    GENERATED_TOKENS.labels(model)
    GENERATION_LOOPS.labels(model)


# --- scrape-time collectors -------------------------------------------------------------------------

class EngineCollector(Collector):
    """Requests running and waiting, the limits they fill, and the active adapter version.

    The in-process engine reports its scheduler's queue (``queue_state()``); for a remote engine
    (vLLM, ...) the running count is the generations this process has in flight and the waiting
    queue is the server's own (vLLM exports it as ``vllm:num_requests_waiting``).
    """

    def __init__(self) -> None:
        self._engine: weakref.ReferenceType | None = None
        self._model = ""
        self._in_flight = 0
        self._lock = threading.Lock()

    def attach(self, engine: object, model: str) -> None:
        self._engine = weakref.ref(engine)
        self._model = model
        init_model(model)

    def detach(self, engine: object) -> None:
        if self._engine is not None and self._engine() is engine:
            self._engine = None

    def started(self) -> None:
        with self._lock:
            self._in_flight += 1

    def finished(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def describe(self):
        return [
            GaugeMetricFamily("enclave_generation_requests_running", ""),
            GaugeMetricFamily("enclave_generation_requests_waiting", ""),
            GaugeMetricFamily("enclave_generation_max_running", ""),
            GaugeMetricFamily("enclave_generation_max_waiting", ""),
            InfoMetricFamily("enclave_adapter", ""),
        ]

    def collect(self):
        engine = self._engine() if self._engine is not None else None
        if engine is None:
            return
        labels = ["model"]
        state = engine.queue_state()
        running = GaugeMetricFamily("enclave_generation_requests_running", "Generations being decoded", labels=labels)
        waiting = GaugeMetricFamily("enclave_generation_requests_waiting",
                                    "Generations queued for a batch slot (in-process engine)", labels=labels)
        if state is not None:
            running.add_metric([self._model], state["running"])
            waiting.add_metric([self._model], state["waiting"])
        else:
            running.add_metric([self._model], self._in_flight)
        yield running
        yield waiting
        if state is not None:
            yield self._gauge("enclave_generation_max_running", "Batch slots (generation.max_batch_size)",
                              state["max_running"])
            yield self._gauge("enclave_generation_max_waiting", "Waiting-queue capacity (generation.max_queue)",
                              state["max_waiting"])
        # The fine-tuning layer sets engine.adapter_version when a LoRA adapter is active.
        version = engine.adapter_version
        info = InfoMetricFamily("enclave_adapter", "The LoRA adapter the generation engine serves (none: base model)",
                                labels=labels)
        info.add_metric([self._model], {"version": str(version) if version is not None else "none"})
        yield info

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=["model"])
        family.add_metric([self._model], value)
        return family


class GpuCollector(Collector):
    """GPU utilisation, memory and temperature through NVML (nvidia-ml-py), per device.

    Without an NVIDIA driver (or without the package) it yields nothing: the series are absent,
    never zeros that would look like an idle GPU. NVML is initialised once, on the first scrape.
    """

    NAMES = ("enclave_gpu_utilization_ratio", "enclave_gpu_memory_used_bytes", "enclave_gpu_memory_total_bytes",
             "enclave_gpu_temperature_celsius")

    def __init__(self) -> None:
        self._nvml = None
        self._tried = False
        self._lock = threading.Lock()

    def _init(self):
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self._nvml = pynvml
                    log.info("NVML: %d GPU(s) found", pynvml.nvmlDeviceGetCount())
                except Exception as exc:  # no driver, no library, no device: no GPU metrics
                    log.info("no GPU metrics: %s", type(exc).__name__)
                    self._nvml = None
        return self._nvml

    def describe(self):
        return [GaugeMetricFamily(name, "") for name in self.NAMES]

    def collect(self):
        nvml = self._init()
        if nvml is None:
            return
        labels = ["gpu", "name"]
        util = GaugeMetricFamily(self.NAMES[0], "GPU busy fraction over the driver's last sample period (0-1)", labels=labels)
        used = GaugeMetricFamily(self.NAMES[1], "GPU memory in use", labels=labels)
        total = GaugeMetricFamily(self.NAMES[2], "GPU memory installed", labels=labels)
        temp = GaugeMetricFamily(self.NAMES[3], "GPU core temperature", labels=labels)
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = nvml.nvmlDeviceGetName(handle)
                name = name.decode() if isinstance(name, bytes) else str(name)
                key = [str(index), name]
                util.add_metric(key, nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric(key, float(memory.used))
                total.add_metric(key, float(memory.total))
                temp.add_metric(key, float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)))
        except Exception as exc:  # a device that fell off the bus: report what was read, log why
            log.warning("reading GPU metrics failed: %s", exc)
        yield from (util, used, total, temp)


ENGINE = EngineCollector()
GPU = GpuCollector()
REGISTRY.register(ENGINE)
REGISTRY.register(GPU)
