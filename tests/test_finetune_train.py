"""LoRA training, jobs, the evaluation gate and the registry, on a tiny llama built from a config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune import dataset as ds
from finetune.evaluate import VariantMetrics, decide
from finetune.jobs import JobConfig, JobLock, JobLocked, run_job
from finetune.registry import Registry, RegistryError
from finetune.train import (
    IGNORE,
    LLAMA_TARGETS,
    TrainConfig,
    TrainingError,
    pad_id_of,
    target_modules_for,
    tokenize,
    tokenize_all,
    train,
    wrap_lora,
)
from llm.chat_format import ChatFormat, GLM4_TEMPLATE, encode
from llm.engine import ChatMessage
from llm.loading import load
from tests.conftest import REPO
from tests.finetune_fixtures import colour_records, make_tiny_llama, one_thread, qa  # noqa: F401 (autouse)

FAST = TrainConfig(rank=8, alpha=16, dropout=0.0, learning_rate=2e-2, epochs=4, batch_size=4, max_length=96,
                   checkpoint_every=2, warmup_ratio=0.0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return load(tiny_dir, device="cpu", dtype="float32")


def examples_of(records: list[dict]) -> list[ds.Example]:
    return [ds.parse_record(r, f"t:{i}", 8000) for i, r in enumerate(records)]


def sqlite_registry(tmp_path: Path) -> Registry:
    from app.db import make_engine, upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'enclave.db'}")
    upgrade(engine)
    return Registry(engine)


# --- tokenisation --------------------------------------------------------------------------------


def test_loss_mask_covers_assistant_turns_only(tiny):
    tok = tiny.tokenizer
    example = ds.Example([
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What colour is the mug?"},
        {"role": "assistant", "content": "The mug is amber."},
        {"role": "user", "content": "And the badge?"},
        {"role": "assistant", "content": "The badge is blue."},
    ])
    t = tokenize(example, tok, tiny.chat, tiny.eos_token_ids, 512)
    assert len(t.input_ids) == len(t.labels)
    learnt = [i for i, label in enumerate(t.labels) if label != IGNORE]
    assert all(t.labels[i] == t.input_ids[i] for i in learnt)
    # Two contiguous assistant spans, each the answer plus the end-of-turn marker.
    spans = tok.decode([t.input_ids[i] for i in learnt])
    assert spans == "The mug is amber.<|im_end|>\nThe badge is blue.<|im_end|>\n"
    # Everything else (system, user, role headers) is masked; the prompt before the last answer is
    # token for token what the engine sends at inference time.
    prompt = encode(tok, tiny.chat, [ChatMessage(m["role"], m["content"]) for m in example.messages[:-1]])
    assert t.input_ids[:len(prompt)] == prompt
    assert all(label == IGNORE for label in t.labels[len(prompt) - 12:len(prompt)])
    assert tokenize(example, tok, tiny.chat, tiny.eos_token_ids, 20).startswith("too long")


def test_glm_template_gets_an_end_token(tiny):
    from tests.test_glm import build_tokenizer

    tok = build_tokenizer()
    fmt = ChatFormat(GLM4_TEMPLATE, family="glm4")
    eos = frozenset({tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|user|>")})
    t = tokenize(ds.Example(qa("Hello", "Hi there")["messages"]), tok, fmt, eos, 512)
    learnt = [t.input_ids[i] for i, label in enumerate(t.labels) if label != IGNORE]
    assert tok.decode(learnt) == "Hi there<|endoftext|>"  # GLM ends a turn with no marker: EOS is learnt


def test_target_modules_per_architecture(tiny):
    assert target_modules_for("llama") == LLAMA_TARGETS == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]
    assert target_modules_for("glm") == "all-linear"
    assert target_modules_for("chatglm") == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def test_glm_gets_lora_on_every_linear_layer(tmp_path):
    from tests.test_glm import build_tokenizer
    from transformers import GlmConfig, GlmForCausalLM

    tok = build_tokenizer()
    model = GlmForCausalLM(GlmConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                     pad_token_id=0))
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
    peft_model = wrap_lora(model, "glm", TrainConfig(rank=2, alpha=4))
    adapted = {n.rsplit(".", 3)[-3] for n, _ in peft_model.named_modules() if n.endswith("lora_A.default")}
    assert adapted == linear and {"q_proj", "gate_up_proj", "down_proj"} <= adapted


# --- training and resume ---------------------------------------------------------------------------


def fresh(tiny_dir):
    return load(tiny_dir, device="cpu", dtype="float32", shared=False)


def train_data(loaded):
    records, _ = colour_records()
    data, skipped = tokenize_all(examples_of(records), loaded.tokenizer, loaded.chat, loaded.eos_token_ids, 96)
    assert not skipped
    return data


def test_training_lowers_the_loss_and_saves_an_adapter(tiny_dir, tmp_path):
    loaded = fresh(tiny_dir)
    peft_model = wrap_lora(loaded.model, loaded.model_type, FAST)
    result = train(peft_model, train_data(loaded), FAST, tmp_path, pad_id=pad_id_of(loaded.tokenizer))
    assert result.steps == 16 and result.resumed_from == 0
    assert sum(result.losses[-4:]) < 0.95 * sum(result.losses[:4])
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["r"] == FAST.rank
    with pytest.raises(TrainingError, match="no training examples"):
        train(peft_model, [], FAST, tmp_path / "x", pad_id=0)


RESUME_SCRIPT = """
import sys, json
from pathlib import Path
from llm.loading import load
from finetune.train import TrainConfig, train, wrap_lora, pad_id_of, tokenize_all
from tests.finetune_fixtures import colour_records
from tests.test_finetune_train import FAST, examples_of
import time

loaded = load(Path(sys.argv[1]), device="cpu", dtype="float32", shared=False)
records, _ = colour_records()
data, _ = tokenize_all(examples_of(records), loaded.tokenizer, loaded.chat, loaded.eos_token_ids, 96)
model = wrap_lora(loaded.model, loaded.model_type, FAST)

def progress(step, total, loss):
    print(f"step {step}", flush=True)
    time.sleep(0.3)  # slow enough for the test to kill it mid-run

train(model, data, FAST, Path(sys.argv[2]), pad_id=pad_id_of(loaded.tokenizer), progress=progress)
"""


def test_resume_after_a_kill_continues_from_the_last_checkpoint(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    work = tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, str(tiny_dir), str(work)], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # kill it (SIGKILL: no clean-up) once a checkpoint exists and it trains on
            if line.strip() == "step 7":
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    state = json.loads((work / "checkpoint" / "state.json").read_text())
    assert state["step"] in (6, 8) and not (work / "adapter").exists()

    loaded = fresh(tiny_dir)
    model = wrap_lora(loaded.model, loaded.model_type, FAST)
    steps_seen = []
    resumed = train(model, train_data(loaded), FAST, work, pad_id=pad_id_of(loaded.tokenizer),
                    progress=lambda s, t, l: steps_seen.append(s))
    assert resumed.resumed_from == state["step"] and steps_seen[0] == state["step"] + 1 and steps_seen[-1] == 16

    # The resumed run ends with exactly the weights of a run that was never interrupted.
    loaded = fresh(tiny_dir)
    model = wrap_lora(loaded.model, loaded.model_type, FAST)
    straight = train(model, train_data(loaded), FAST, tmp_path / "straight", pad_id=pad_id_of(loaded.tokenizer))
    a = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    b = load_file(straight.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.losses == straight.losses


# --- jobs: lock, idempotency, gate -----------------------------------------------------------------


def job_config(tmp_path: Path, tiny_dir: Path, files: list[Path], eval_files: list[Path], **kw) -> JobConfig:
    return JobConfig(data_dir=tmp_path / "data", base_model="tiny-llama", model_path=tiny_dir, device="cpu",
                     dtype="float32", data_files=files, eval_files=eval_files, eval_fraction=0.0, train=FAST,
                     eval_max_new_tokens=8, **kw)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_job_lock_is_exclusive(tmp_path, tiny_dir):
    registry = sqlite_registry(tmp_path)
    config = job_config(tmp_path, tiny_dir, [], [])
    with JobLock(tmp_path / "data" / "finetune" / "job.lock"):
        with pytest.raises(JobLocked, match=f"pid {os.getpid()}"):
            run_job(config, registry)
    assert registry.jobs() == []  # a refused run leaves no history row
    outcome = run_job(config, registry)  # free again: runs (nothing to train on)
    assert outcome.status == "no_new_data" and "no training examples" in outcome.message


def test_job_trains_gates_promotes_and_skips_unchanged_data(tmp_path, tiny_dir):
    registry = sqlite_registry(tmp_path)
    train_records, held_out = colour_records()
    files = [write_jsonl(tmp_path / "train.jsonl", train_records[:12])]
    files[0].write_text(files[0].read_text() + "{oops\n")  # line 13
    evals = [write_jsonl(tmp_path / "eval.jsonl", [{k: v for k, v in r.items() if k != "key_facts"}
                                                   for r in held_out])]
    messages = []
    config = job_config(tmp_path, tiny_dir, files, evals, gate_metric="eval_loss", gate_margin=0.05)
    first = run_job(config, registry, say=messages.append)
    assert first.status == "promoted" and first.version == "v0001"
    assert any("train.jsonl:13" in m and "not JSON" in m for m in messages)
    variants = first.metrics["variants"]
    assert variants["candidate:v0001"]["eval_loss"] < variants["base"]["eval_loss"] * 0.95
    folder = tmp_path / "data" / "adapters" / "v0001"
    report = json.loads((folder / "report.json").read_text())
    assert report["decision"]["promote"] is True and (folder / "report.md").read_text().startswith("# Fine-tuning")
    assert registry.active().version == "v0001" and (folder / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "data" / "finetune" / "work" / first.dataset["key"][:16]).exists()

    # Same data again (a scheduled run with nothing new): exits without loading or training.
    started = time.monotonic()
    again = run_job(config, registry, trigger="schedule")
    assert again.status == "no_new_data" and "no new data since adapter v0001" in again.message
    assert time.monotonic() - started < 5
    assert [(j.trigger, j.status) for j in registry.jobs()] == [("schedule", "no_new_data"), ("cli", "promoted")]

    # New data, but a gate margin the candidate cannot reach: kept as a candidate, v0001 stays active.
    files.append(write_jsonl(tmp_path / "more.jsonl", train_records[12:]))
    strict = job_config(tmp_path, tiny_dir, files, evals, gate_metric="eval_loss", gate_margin=0.99)
    second = run_job(strict, registry)
    assert second.status == "candidate" and second.version == "v0002" and "not promoted" in second.message
    assert second.metrics["decision"]["reference"] == "active:v0001"
    assert set(second.metrics["variants"]) == {"base", "active:v0001", "candidate:v0002"}
    assert registry.active().version == "v0001" and registry.get("v0002").status == "candidate"


def metrics(name, loss, recall, facts=10):
    found = round((recall or 0) * facts)
    return VariantMetrics(name, loss, None, recall, found, facts if recall is not None else 0)


def test_gate_decisions():
    base, active = metrics("base", 2.0, 0.10), metrics("active:v1", 1.5, 0.40)
    assert decide([base, active, metrics("candidate:v2", 1.4, 0.50)], margin=0.05).promote
    assert not decide([base, active, metrics("candidate:v2", 1.0, 0.43)], margin=0.05).promote  # recall decides
    assert not decide([base, active, metrics("candidate:v2", 1.0, 0.40)], margin=0.0).promote  # a tie is no win
    d = decide([base, metrics("candidate:v1", 1.9, 0.30)], margin=0.1)
    assert d.promote and d.reference == "base" and d.metric == "key_fact_recall"
    no_facts = [metrics("base", 2.0, None), metrics("candidate:v1", 1.8, None)]
    assert decide(no_facts, margin=0.05).metric == "eval_loss" and decide(no_facts, margin=0.05).promote
    assert not decide(no_facts, margin=0.2).promote
    forced = decide([base, metrics("candidate:v1", 1.0, 0.05)], margin=0.0, metric="eval_loss")
    assert forced.promote and forced.metric == "eval_loss"  # lower loss wins even though recall fell


# --- registry -------------------------------------------------------------------------------------


def test_registry_promote_and_rollback(database_url):
    from app.db import make_engine

    registry = Registry(make_engine(database_url))
    for i in (1, 2, 3):
        v = registry.next_version()
        assert v == f"v{i:04d}"
        registry.add(v, base_model="m", base_model_hash="h", dataset_hash=f"d{i}", path=f"/a/{v}",
                     hyperparameters={"rank": 16}, metrics={"x": i})
    assert registry.active() is None and registry.find_trained("d2", "h").version == "v0002"
    assert registry.find_trained("d2", "other-base") is None
    registry.promote("v0001")
    registry.promote("v0002")
    assert {a.version: a.status for a in registry.list()} == {"v0001": "retired", "v0002": "active",
                                                            "v0003": "candidate"}
    assert registry.get("v0002").previous_version == "v0001" and registry.get("v0002").hyperparameters == {"rank": 16}
    retired, now = registry.rollback()
    assert (retired.version, now.version) == ("v0002", "v0001") and registry.active_version() == "v0001"
    retired, now = registry.rollback()
    assert retired.version == "v0001" and now is None and registry.active_version() is None
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback()
    with pytest.raises(RegistryError, match="no adapter 'v9'"):
        registry.promote("v9")


def test_cli_list_promote_rollback(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from app.cli.finetune_cli import app

    monkeypatch.setenv("ENCLAVE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("ENCLAVE_CONFIG", raising=False)
    monkeypatch.delenv("ENCLAVE_DATABASE_URL", raising=False)
    # Each invocation builds its own container (app/cli/common.py CliSession): nothing an earlier
    # CLI test in this process did carries over.
    registry = sqlite_registry(tmp_path)
    registry.add("v0001", base_model="m", base_model_hash="h", dataset_hash="d", path="/a",
                 hyperparameters={}, metrics={"variants": {"candidate:v0001": {"key_fact_recall": 0.5,
                                                                               "eval_loss": 1.25}}})
    runner = CliRunner()
    listed = runner.invoke(app, ["list"])
    assert listed.exit_code == 0 and "v0001" in listed.stdout and "50.0%" in listed.stdout
    assert runner.invoke(app, ["promote", "v0001"]).exit_code == 0 and registry.active_version() == "v0001"
    out = runner.invoke(app, ["rollback"])
    assert out.exit_code == 0 and "now serving the base model" in out.stdout
    bad = runner.invoke(app, ["rollback"])
    assert bad.exit_code == 2 and "nothing to roll back" in bad.stderr


def test_loss_on_kept_logits_equals_the_full_model_loss(tiny_dir):
    from finetune.train import batch_loss, collate, collate_left, supports_logits_to_keep

    loaded = fresh(tiny_dir)
    model = wrap_lora(loaded.model, loaded.model_type, FAST)
    rows = train_data(loaded)[:5]
    pad = pad_id_of(loaded.tokenizer)
    assert supports_logits_to_keep(model)
    with torch.no_grad():
        reference = model(**collate(rows, pad, torch.device("cpu"))).loss  # right padding, full logits
        kept = batch_loss(model, collate_left(rows, pad, torch.device("cpu")), keep_logits=True)
        full = batch_loss(model, collate_left(rows, pad, torch.device("cpu")), keep_logits=False)
    assert torch.allclose(kept, reference, atol=1e-5) and torch.allclose(full, reference, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir):
    import dataclasses

    from finetune.train import batch_loss, collate_left

    grads = []
    for checkpointing in (False, True):
        loaded = fresh(tiny_dir)
        model = wrap_lora(loaded.model, loaded.model_type, dataclasses.replace(FAST, gradient_checkpointing=checkpointing))
        model.train()
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) is checkpointing
        batch_loss(model, collate_left(train_data(loaded)[:4], pad_id_of(loaded.tokenizer), torch.device("cpu")),
                   True).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
