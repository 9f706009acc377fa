"""One fine-tuning job, end to end: lock, data, idempotency, train, evaluate, register, promote.

Layout under the data directory::

    finetune/job.lock                 # fcntl lock: one job at a time (holds the pid)
    finetune/work/<key>/checkpoint    # resumable training state of an unfinished run
    adapters/<version>/adapter        # the peft adapter (adapter_config.json + safetensors)
    adapters/<version>/report.{json,md}
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from finetune import dataset as ds
from finetune.evaluate import decide, evaluate, generate_all, write_report
from finetune.registry import Registry
from finetune.train import TrainConfig, pad_id_of, tokenize_all, train, wrap_lora

log = logging.getLogger(__name__)


class JobLocked(RuntimeError):
    """Another fine-tuning job holds the lock."""


@dataclass
class JobConfig:
    data_dir: Path
    base_model: str  # the model's name (registry, reports)
    model_path: Path
    gguf_file: str | None = None
    trust_remote_code: bool = False
    device: str = "auto"
    dtype: str = "auto"
    data_files: list[Path] = field(default_factory=list)
    eval_files: list[Path] = field(default_factory=list)  # every record held out
    eval_fraction: float = 0.1
    max_record_chars: int = 8000
    train: TrainConfig = field(default_factory=TrainConfig)
    gate_metric: str = "auto"  # auto | key_fact_recall | eval_loss
    gate_margin: float = 0.02
    auto_promote: bool = True
    eval_max_new_tokens: int = 64
    threads: int = 0  # torch CPU threads for the job; 0: torch's default (one per core)


@dataclass
class JobOutcome:
    status: str  # promoted | candidate | no_new_data
    message: str
    version: str | None = None
    dataset: dict = field(default_factory=dict)
    report: Path | None = None
    metrics: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class JobLock:
    """An exclusive, non-blocking fcntl lock on a file in the data directory (released by the kernel on exit)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> "JobLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise JobLocked(f"another fine-tuning job is running (pid {holder}, lock {self.path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def model_hash(model_path: Path, gguf_file: str | None, cache_file: Path | None = None) -> str:
    """sha256 over the weight files (and config.json) of a checkpoint, cached by (size, mtime)."""
    if gguf_file:
        files = [model_path / gguf_file]
    else:
        files = sorted(p for p in model_path.iterdir()
                       if p.suffix in (".safetensors", ".bin", ".pt") or p.name == "config.json")
    if not files:
        raise FileNotFoundError(f"no weight files in {model_path}")
    cache = {}
    if cache_file is not None and cache_file.is_file():
        cache = json.loads(cache_file.read_text())
    stamp = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    value = digest.hexdigest()
    if cache_file is not None:
        cache[key] = value
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cache))
    return value


def collect(config: JobConfig, feedback: Iterable[ds.FeedbackRecord]) -> tuple[list[ds.Example], list[ds.Problem]]:
    """Every record of the configured files and the feedback; redaction happens in ``dataset.build``."""
    examples: list[ds.Example] = []
    problems: list[ds.Problem] = []
    for path in config.data_files:
        e, p = ds.load_jsonl(Path(path), max_chars=config.max_record_chars)
        examples += e
        problems += p
    for path in config.eval_files:
        e, p = ds.load_jsonl(Path(path), max_chars=config.max_record_chars, split="eval")
        examples += e
        problems += p
    e, p = ds.from_feedback(feedback, max_chars=config.max_record_chars)
    return examples + e, problems + p


def run_job(
    config: JobConfig,
    registry: Registry,
    *,
    feedback: Iterable[ds.FeedbackRecord] = (),
    synthetic_chunks: list[str] | None = None,
    redact: ds.Redactor | None = None,
    trigger: str = "cli",
    say: Callable[[str], None] = lambda _m: None,
    progress: Callable[[int, int, float], None] | None = None,
) -> JobOutcome:
    """Run one job under the lock; raises ``JobLocked`` if another one is running.

    Idempotent: when an adapter was already trained on exactly this dataset (same content hash,
    synthetic source chunks included) and base model, nothing is trained and the outcome is
    ``no_new_data``. A failure is recorded in the job history and re-raised.
    """
    data_dir = Path(config.data_dir)
    with JobLock(data_dir / "finetune" / "job.lock"):
        job_id = registry.start_job(trigger)
        try:
            outcome = _run(config, registry, feedback, synthetic_chunks, redact, say, progress)
        except BaseException as exc:
            registry.finish_job(job_id, "failed", f"{type(exc).__name__}: {exc}")
            raise
        registry.finish_job(job_id, outcome.status, outcome.message, version=outcome.version,
                            dataset_hash=outcome.dataset.get("key"))
        return outcome


def _run(config, registry, feedback, synthetic_chunks, redact, say, progress) -> JobOutcome:
    from llm.loading import load

    data_dir = Path(config.data_dir)
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    examples, problems = collect(config, feedback)
    for p in problems:
        say(f"skipped {p}")
    built = ds.build(examples, problems, eval_fraction=config.eval_fraction, redact=redact)
    # The job's identity: the data, the synthetic sources (their text, not the model's replies,
    # which are only known after loading it), and what training would do with them.
    key_parts = [built.hash, json.dumps(config.train.as_dict(), sort_keys=True)]
    if synthetic_chunks:
        key_parts += [hashlib.sha256(c.encode()).hexdigest() for c in synthetic_chunks]
    key = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()
    summary = {**built.summary(), "key": key}
    say(f"dataset: {summary['train']} train, {summary['eval']} eval, {summary['skipped']} skipped, "
        f"{summary['duplicates']} duplicates (key {key[:12]})")
    base_hash = model_hash(Path(config.model_path), config.gguf_file, data_dir / "finetune" / "model-hashes.json")
    if not built.train and not synthetic_chunks:
        return JobOutcome("no_new_data", "no training examples: nothing to do", dataset=summary,
                          problems=[str(p) for p in problems])
    previous = registry.find_trained(key, base_hash)
    if previous is not None:
        return JobOutcome("no_new_data", f"no new data since adapter {previous.version} "
                          f"(dataset {key[:12]}, status {previous.status}): nothing to do",
                          version=previous.version, dataset=summary, problems=[str(p) for p in problems])

    say(f"loading {config.base_model} from {config.model_path}")
    loaded = load(Path(config.model_path), gguf_file=config.gguf_file, device=config.device, dtype=config.dtype,
                  trust_remote_code=config.trust_remote_code, shared=False)
    if synthetic_chunks:
        say(f"writing synthetic question-answer pairs from {len(synthetic_chunks)} chunks")
        extra, extra_problems = ds.synthetic_pairs(
            synthetic_chunks, lambda prompts: generate_all(loaded, [[{"role": "user", "content": p}] for p in prompts],
                                                           config.eval_max_new_tokens * 2),
            max_chars=config.max_record_chars)
        for p in extra_problems:
            say(f"skipped {p}")
        built = ds.build(examples + extra, problems + extra_problems, eval_fraction=config.eval_fraction,
                         redact=redact)
        summary = {**built.summary(), "key": key}
    tokenized, too_long = tokenize_all(built.train, loaded.tokenizer, loaded.chat, loaded.eos_token_ids,
                                       config.train.max_length)
    for p in too_long:
        say(f"skipped {p}")
    if not tokenized:
        return JobOutcome("no_new_data", "no usable training examples: nothing to do", dataset=summary,
                          problems=[str(p) for p in problems + too_long])

    work = data_dir / "finetune" / "work" / key[:16]
    peft_model = wrap_lora(loaded.model, loaded.model_type, config.train)
    say(f"training LoRA r={config.train.rank} on {len(tokenized)} examples for {config.train.epochs} epochs")
    result = train(peft_model, tokenized, config.train, work, pad_id=pad_id_of(loaded.tokenizer), progress=progress)
    if result.resumed_from:
        say(f"resumed from step {result.resumed_from}")

    version = registry.next_version()
    folder = data_dir / "adapters" / version
    folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.mkdir(exist_ok=True, mode=0o700)
    adapter_dir = folder / "adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    shutil.move(str(result.adapter_dir), adapter_dir)

    active = registry.active()
    reference = None
    if active is not None and active.base_model_hash == base_hash and Path(active.path).is_dir():
        reference = (active.version, Path(active.path))
    say(f"evaluating base{', ' + active.version if reference else ''} and {version} on {len(built.eval)} held-out items")
    variants = evaluate(loaded, peft_model, built.eval, candidate=version, active=reference,
                        max_length=config.train.max_length, max_new_tokens=config.eval_max_new_tokens)
    decision = decide(variants, config.gate_margin, config.gate_metric)
    metrics = {
        "variants": {v.name: {"eval_loss": v.eval_loss, "perplexity": v.perplexity,
                              "key_fact_recall": v.key_fact_recall, "facts": [v.facts_found, v.facts_total]}
                     for v in variants},
        "decision": decision.__dict__,
        "train": {"steps": result.steps, "final_loss": result.train_loss, "seconds": round(result.seconds, 1),
                  "resumed_from": result.resumed_from},
        "dataset": summary,
    }
    hyper = {**config.train.as_dict(), "base_model": config.base_model}
    _, report = write_report(folder, version, variants, decision,
                             {"dataset": summary, "hyperparameters": hyper, "train": metrics["train"]})
    registry.add(version, base_model=config.base_model, base_model_hash=base_hash, dataset_hash=key,
                 path=str(adapter_dir), hyperparameters=hyper, metrics=metrics)
    shutil.rmtree(work, ignore_errors=True)  # finished: the checkpoint is no longer needed
    if decision.promote and config.auto_promote:
        registry.promote(version)
        status, message = "promoted", f"{version} promoted: {decision.reason}"
    elif decision.promote:
        status, message = "candidate", f"{version} passed the gate ({decision.reason}); promote it with `finetune promote {version}`"
    else:
        status, message = "candidate", f"{version} kept as a candidate, not promoted: {decision.reason}"
    return JobOutcome(status, message, version, summary, report, metrics, [str(p) for p in problems + too_long])
