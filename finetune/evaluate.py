"""The evaluation gate: held-out loss/perplexity and key-fact recall for base, active and candidate.

Answers are generated greedily through the serving engine itself (``TransformersEngine`` on the
same weights), so the gate scores exactly what users would get. Key-fact recall: the share of
all key facts of the eval items that appear in the answer, both sides case-, width- and
whitespace-normalised (``finetune.dataset.normalise``).

Decision: the metric is key-fact recall when any eval item lists key facts, else eval loss. The
candidate is promoted only if it beats the reference (the active adapter, or the base model when
none is active) by ``margin``: recall points (0.02 = two points) or a relative loss reduction.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from finetune.dataset import Example, normalise
from finetune.train import Tokenized, collate, pad_id_of, tokenize_all
from llm.engine import ChatMessage, GenerationRequest
from llm.loading import LoadedModel


@dataclass
class VariantMetrics:
    name: str  # "base", "active:<version>", "candidate:<version>"
    eval_loss: float | None
    perplexity: float | None
    key_fact_recall: float | None
    facts_found: int
    facts_total: int
    answers: list[dict] = field(default_factory=list)  # question, answer, facts found/missing


@dataclass
class GateDecision:
    metric: str  # "key_fact_recall" | "eval_loss"
    reference: str  # which variant the candidate had to beat
    reference_value: float | None
    candidate_value: float | None
    margin: float
    promote: bool
    reason: str


def eval_loss(model, data: list[Tokenized], pad_id: int, batch_size: int = 8) -> float | None:
    """Mean loss per assistant token on the eval split (token-weighted across batches)."""
    if not data:
        return None
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            batch = collate(data[start:start + batch_size], pad_id, device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((labels != -100).sum())
    return total / count if count else None


def generate_all(loaded: LoadedModel, conversations: list[list[dict]], max_new_tokens: int, batch_size: int = 16
                 ) -> list[str]:
    """Greedy replies to many conversations at once, through the serving engine (continuous batching)."""
    from llm.transformers_engine import TransformersEngine

    engine = TransformersEngine(Path("unused"), name="finetune-eval", max_batch_size=batch_size,
                                max_new_tokens=max_new_tokens)
    engine.start_sync(loaded)

    async def run_all() -> list[str]:
        requests = [GenerationRequest([ChatMessage(m["role"], m["content"]) for m in conv],
                                      max_new_tokens=max_new_tokens, temperature=0.0) for conv in conversations]
        results = await asyncio.gather(*(engine.generate(r) for r in requests))
        return [r.text for r in results]

    try:
        return asyncio.run(run_all())
    finally:
        asyncio.run(engine.close())


def answer_all(loaded: LoadedModel, examples: list[Example], max_new_tokens: int) -> list[str]:
    """Greedy answers to every eval question (the conversation without its final answer)."""
    return generate_all(loaded, [e.messages[:-1] for e in examples], max_new_tokens)


def key_fact_score(examples: list[Example], answers: list[str]) -> tuple[int, int, list[dict]]:
    found = total = 0
    details = []
    for e, answer in zip(examples, answers):
        said = normalise(answer)
        hits = [f for f in e.key_facts if normalise(f) in said]
        found += len(hits)
        total += len(e.key_facts)
        details.append({"question": e.question, "answer": answer, "expected": e.answer,
                        "facts_found": hits, "facts_missing": [f for f in e.key_facts if f not in hits]})
    return found, total, details


def evaluate_variant(name: str, loaded: LoadedModel, examples: list[Example], tokenized: list[Tokenized],
                     max_new_tokens: int) -> VariantMetrics:
    loss = eval_loss(loaded.model, tokenized, pad_id_of(loaded.tokenizer))
    with_facts = [e for e in examples if e.key_facts]
    answers = answer_all(loaded, with_facts, max_new_tokens) if with_facts else []
    found, total, details = key_fact_score(with_facts, answers)
    return VariantMetrics(
        name, loss, math.exp(loss) if loss is not None else None, found / total if total else None, found, total,
        details,
    )


def evaluate(
    loaded: LoadedModel,
    peft_model,
    examples: list[Example],
    *,
    candidate: str,
    active: tuple[str, Path] | None,
    max_length: int,
    max_new_tokens: int = 64,
) -> list[VariantMetrics]:
    """Score the base model, the active adapter (when there is one) and the candidate on one model object.

    ``peft_model`` holds the candidate as its "default" adapter; the active one is loaded beside it
    under the name "active", and the base is the model with adapters disabled.
    """
    tokenized, _ = tokenize_all(examples, loaded.tokenizer, loaded.chat, loaded.eos_token_ids, max_length)
    inner = peft_model.get_base_model()
    as_engine = LoadedModel(**{**loaded.__dict__, "model": inner})
    peft_model.eval()
    results = []
    with peft_model.disable_adapter():
        results.append(evaluate_variant("base", as_engine, examples, tokenized, max_new_tokens))
    if active is not None:
        version, path = active
        peft_model.load_adapter(str(path), adapter_name="active", is_trainable=False)
        peft_model.set_adapter("active")
        try:
            results.append(evaluate_variant(f"active:{version}", as_engine, examples, tokenized, max_new_tokens))
        finally:
            peft_model.set_adapter("default")
            peft_model.delete_adapter("active")
    results.append(evaluate_variant(f"candidate:{candidate}", as_engine, examples, tokenized, max_new_tokens))
    return results


def decide(results: list[VariantMetrics], margin: float, metric: str = "auto") -> GateDecision:
    candidate = results[-1]
    reference = results[-2]  # the active adapter when there is one, else the base model
    if metric == "auto":
        metric = "key_fact_recall" if candidate.facts_total else "eval_loss"
    if metric == "key_fact_recall":
        ref, cand = reference.key_fact_recall, candidate.key_fact_recall
        if ref is None or cand is None:
            return GateDecision(metric, reference.name, ref, cand, margin, False, "no eval item lists key facts")
        promote = cand >= ref + margin and cand > ref
        reason = (f"key-fact recall {cand:.1%} vs {ref:.1%} for {reference.name}: "
                  + ("better" if promote else "not better") + f" by the margin of {margin * 100:.1f} points")
        return GateDecision(metric, reference.name, ref, cand, margin, promote, reason)
    ref, cand = reference.eval_loss, candidate.eval_loss
    if ref is None or cand is None:
        return GateDecision(metric, reference.name, ref, cand, margin, False, "the eval split is empty")
    promote = cand <= ref * (1 - margin) and cand < ref
    reason = (f"eval loss {cand:.4f} vs {ref:.4f} for {reference.name}: "
              + ("lower" if promote else "not lower") + f" by the margin of {margin:.1%}")
    return GateDecision(metric, reference.name, ref, cand, margin, promote, reason)


def write_report(folder: Path, version: str, results: list[VariantMetrics], decision: GateDecision,
                 extra: dict) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    report = {"version": version, "decision": asdict(decision), "variants": [asdict(r) for r in results], **extra}
    json_path = folder / "report.json"
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    lines = [f"# Fine-tuning report: {version}", "", f"**Decision:** {'promote' if decision.promote else 'keep as candidate'}"
             f" — {decision.reason}", "", "| variant | eval loss | perplexity | key-fact recall |", "|---|---|---|---|"]
    for r in results:
        loss = f"{r.eval_loss:.4f}" if r.eval_loss is not None else "-"
        ppl = f"{r.perplexity:.2f}" if r.perplexity is not None else "-"
        recall = f"{r.key_fact_recall:.1%} ({r.facts_found}/{r.facts_total})" if r.key_fact_recall is not None else "-"
        lines.append(f"| {r.name} | {loss} | {ppl} | {recall} |")
    for key, value in extra.items():
        lines += ["", f"**{key}:** `{json.dumps(value, default=str, ensure_ascii=False)}`"]
    md_path = folder / "report.md"
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path
