"""Fine-tuning benchmark: a LoRA run on the bundled SmolLM2-135M teaches it a fictional company's facts.

Data (bench/data/finetune_{train,eval}.jsonl): 52 facts about "Quillmoor Robotics", a company
that does not exist, so the base model cannot know them. Each fact is asked three ways in the
training file (156 questions) and a fourth, different way in the held-out file (52 questions).
The held-out questions ask the SAME facts in other words: fine-tuning teaches facts, and no model
could recall a fact it was never shown, so what the held-out split measures is whether the
adapter learnt the fact rather than the wording of the training questions.

The run goes through the real job (``finetune.jobs.run_job``: dataset, LoRA training, evaluation
gate, registry in a throw-away SQLite database) and prints time, peak memory and the metrics of
the base model and the adapter: key-fact recall (greedy answers through the serving engine) and
eval loss / perplexity.

    .venv/bin/python bench/finetune.py                     # the benchmark (docs/benchmarks.md)
    .venv/bin/python bench/finetune.py --compare-trainer   # plain loop vs transformers.Trainer, s/step
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO / "bench" / "data"
MODEL = "smollm2-135m-instruct"


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_config(args):
    from finetune.train import TrainConfig

    return TrainConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, learning_rate=args.lr,
                       epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length,
                       warmup_ratio=0.05, seed=0, checkpoint_every=1000)


def benchmark(args) -> None:
    from app.db import make_engine, upgrade
    from finetune.jobs import JobConfig, run_job
    from finetune.registry import Registry
    from llm.models import ModelStore

    resolved = ModelStore(Path(args.models_dir)).resolve(MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{tmp}/bench.db")
        upgrade(engine)
        config = JobConfig(
            data_dir=Path(tmp), base_model=MODEL, model_path=resolved.path, gguf_file=resolved.gguf_file,
            device="cpu", dtype="float32", data_files=[DATA / "finetune_train.jsonl"],
            eval_files=[DATA / "finetune_eval.jsonl"], eval_fraction=0.0, train=train_config(args),
            gate_margin=0.0, eval_max_new_tokens=args.max_new_tokens,
        )
        print(f"load average before: {load_avg()}", flush=True)
        started = time.monotonic()
        outcome = run_job(config, Registry(engine), say=lambda m: print(m, flush=True),
                          progress=lambda s, t, loss: print(f"  step {s}/{t} loss {loss:.3f} "
                                                            f"({time.monotonic() - started:.0f} s)", flush=True)
                          if s % 5 == 0 or s == t else None)
        total = time.monotonic() - started
    v = outcome.metrics["variants"]
    base, cand = v["base"], v[f"candidate:{outcome.version}"]
    result = {
        "total_seconds": round(total, 1), "train_seconds": outcome.metrics["train"]["seconds"],
        "steps": outcome.metrics["train"]["steps"], "peak_rss_mib": round(peak_rss_mib()),
        "base": base, "adapter": cand,
        "recall_gain_points": round(100 * (cand["key_fact_recall"] - base["key_fact_recall"]), 1),
        "status": outcome.status, "threads": __import__("torch").get_num_threads(),
        "hyperparameters": train_config(args).as_dict(), "load_average_after": load_avg(),
    }
    print(json.dumps(result, indent=2))
    print(f"\nbase:    recall {base['key_fact_recall']:.1%} ({base['facts'][0]}/{base['facts'][1]}), "
          f"eval loss {base['eval_loss']:.3f}, perplexity {base['perplexity']:.1f}")
    print(f"adapter: recall {cand['key_fact_recall']:.1%} ({cand['facts'][0]}/{cand['facts'][1]}), "
          f"eval loss {cand['eval_loss']:.3f}, perplexity {cand['perplexity']:.1f}")
    print(f"gain {result['recall_gain_points']} points; {total / 60:.1f} min in all "
          f"({result['train_seconds'] / 60:.1f} min training), peak RSS {result['peak_rss_mib']} MiB, "
          f"load average after {result['load_average_after']}")


def compare_trainer(args) -> None:
    """Seconds per optimizer step: the plain loop vs transformers.Trainer on the same model, data,
    batches and loss (left-padded batches, output head over the answer columns only), and the plain
    loop with the full-vocabulary head over every column, to show what ``logits_to_keep`` saves."""
    import torch
    from transformers import Trainer, TrainingArguments

    import finetune.train as ft
    from finetune import dataset as ds
    from llm.loading import load
    from llm.models import ModelStore

    resolved = ModelStore(Path(args.models_dir)).resolve(MODEL)
    loaded = load(resolved.path, gguf_file=resolved.gguf_file, device="cpu", dtype="float32", shared=False)
    examples, _ = ds.load_jsonl(DATA / "finetune_train.jsonl")
    data, _ = ft.tokenize_all(examples, loaded.tokenizer, loaded.chat, loaded.eos_token_ids, args.max_length)
    steps, bs = args.compare_steps, args.batch_size
    data = data[: steps * bs]
    pad = ft.pad_id_of(loaded.tokenizer)
    cfg = ft.TrainConfig(rank=args.rank, alpha=args.alpha, dropout=0.0, learning_rate=args.lr, epochs=1,
                         batch_size=bs, max_length=args.max_length, warmup_ratio=0.0, checkpoint_every=10_000,
                         log_every=10_000)
    peft_model = ft.wrap_lora(loaded.model, loaded.model_type, cfg)
    initial = {k: v.detach().clone() for k, v in peft_model.named_parameters() if v.requires_grad}

    def reset():
        with torch.no_grad():
            for k, v in peft_model.named_parameters():
                if k in initial:
                    v.copy_(initial[k])

    def plain(keep: bool) -> float:
        reset()
        original = ft.supports_logits_to_keep
        ft.supports_logits_to_keep = lambda _m: keep
        try:
            with tempfile.TemporaryDirectory() as tmp:
                t = time.monotonic()
                ft.train(peft_model, data, cfg, Path(tmp), pad_id=pad)
                return time.monotonic() - t
        finally:
            ft.supports_logits_to_keep = original

    class SameLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return ft.batch_loss(model, inputs, True)

    def trainer() -> float:
        reset()
        # Trainer refuses a model loaded from GGUF ("quantization method GGUF does not support
        # training") although transformers dequantized it to plain fp32 tensors: drop the tag.
        inner = peft_model.get_base_model()
        inner.hf_quantizer = None
        if "is_quantized" in vars(inner):
            inner.is_quantized = False

        class Rows(torch.utils.data.Dataset):
            def __len__(self):
                return len(data)

            def __getitem__(self, i):
                return data[i]

        with tempfile.TemporaryDirectory() as tmp:
            targs = TrainingArguments(
                output_dir=tmp, per_device_train_batch_size=bs, max_steps=steps, learning_rate=args.lr,
                lr_scheduler_type="linear", warmup_steps=0, logging_steps=10_000, save_strategy="no", report_to=[],
                use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True, remove_unused_columns=False,
            )
            t = time.monotonic()
            SameLoss(model=peft_model, args=targs, train_dataset=Rows(),
                     data_collator=lambda rows: ft.collate_left(rows, pad, torch.device("cpu"))).train()
            return time.monotonic() - t

    print(f"load average before: {load_avg()}; {steps} steps of {bs} examples each, threads "
          f"{torch.get_num_threads()}", flush=True)
    runs = {"plain loop": lambda: plain(True), "Trainer": trainer, "plain loop, full head": lambda: plain(False)}
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.compare_rounds):  # interleaved, so load drift hits every variant alike
        for name, fn in runs.items():
            seconds = fn()
            timings[name].append(seconds)
            print(f"{name:22s} {seconds:7.1f} s  {seconds / steps:6.2f} s/step  (load {load_avg()})", flush=True)
    for name, values in timings.items():
        print(f"{name}: best {min(values) / steps:.2f} s/step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", default=os.environ.get("ENCLAVE_MODELS_DIR", str(REPO / "var" / "models")))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--compare-trainer", action="store_true")
    parser.add_argument("--compare-steps", type=int, default=3)
    parser.add_argument("--compare-rounds", type=int, default=2)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    compare_trainer(args) if args.compare_trainer else benchmark(args)


if __name__ == "__main__":
    main()
