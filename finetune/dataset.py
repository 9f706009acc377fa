"""Fine-tuning datasets: curated chat JSONL, feedback, synthetic pairs; redaction, de-dup and a stable split.

A record is one conversation in the OpenAI messages format, ending with the assistant turn to learn::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}],
     "key_facts": ["Marta Kovalenko"]}            # optional: what a correct answer must contain

``key_facts`` feeds the evaluation gate (key-fact recall); ``split`` ("train" or "eval") pins a
record to one side, otherwise the side comes from a hash of the normalised question, so the same
question always lands on the same side whatever else the dataset holds.

Sources stay outside this package: feedback comes in as ``FeedbackRecord`` objects that the
application builds from its own tables, PII redaction is a ``redact(text) -> text`` callable the
application passes in, and synthetic pairs come from a ``generate(prompt) -> text`` callable.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("system", "user", "assistant")
Redactor = Callable[[str], str]


@dataclass
class Example:
    messages: list[dict]  # [{"role", "content"}...], the last one is the assistant answer to learn
    key_facts: list[str] = field(default_factory=list)
    source: str = "curated"  # curated | feedback | correction | synthetic
    synthetic: bool = False
    split: str | None = None  # "train" / "eval" when pinned by the record, else chosen by hash
    origin: str = ""  # file:line or feedback id, for reports

    @property
    def question(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"]

    def as_dict(self) -> dict:
        record = {"messages": self.messages}
        if self.key_facts:
            record["key_facts"] = self.key_facts
        if self.synthetic:
            record["synthetic"] = True
        record["source"] = self.source
        return record


@dataclass
class Problem:
    origin: str  # "path:line" or "feedback:id"
    reason: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.reason}"


@dataclass
class FeedbackRecord:
    """One rated answer, as the application reads it from its feedback table."""

    id: str
    messages: list[dict]  # the conversation up to and including the user's question
    answer: str  # what the assistant said
    rating: int  # +1 helpful, -1 not helpful
    correction: str | None = None  # the answer the user says it should have been


@dataclass
class Dataset:
    train: list[Example]
    eval: list[Example]
    problems: list[Problem]
    duplicates: int = 0

    @property
    def hash(self) -> str:
        """Content hash of both splits: a run with the same hash as the last adapter has nothing new to learn."""
        digest = hashlib.sha256()
        for name, part in (("train", self.train), ("eval", self.eval)):
            for example in part:
                digest.update(name.encode())
                digest.update(json.dumps(example.as_dict(), sort_keys=True, ensure_ascii=False).encode())
                digest.update(b"\n")
        return digest.hexdigest()

    def summary(self) -> dict:
        by_source: dict[str, int] = {}
        for e in self.train + self.eval:
            by_source[e.source] = by_source.get(e.source, 0) + 1
        return {"train": len(self.train), "eval": len(self.eval), "skipped": len(self.problems),
                "duplicates": self.duplicates, "by_source": by_source, "hash": self.hash}


def normalise(text: str) -> str:
    """Case-, width- and whitespace-insensitive form (NFKC, casefold, collapsed spaces)."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _check_messages(messages, max_chars: int) -> str | None:
    """Why a messages list is unusable, or None."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m or "content" not in m:
            return f"message {i} must be an object with 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}"
        if not isinstance(m["content"], str):
            return f"message {i}: 'content' must be a string"
        if not m["content"].strip():
            return f"message {i} is empty"
    if messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's answer"
    if not any(m["role"] == "user" for m in messages):
        return "no user message"
    total = sum(len(m["content"]) for m in messages)
    if total > max_chars:
        return f"too long: {total} characters (limit {max_chars})"
    return None


def parse_record(obj, origin: str, max_chars: int) -> Example | Problem:
    if not isinstance(obj, dict):
        return Problem(origin, "a record must be a JSON object")
    unknown = set(obj) - {"messages", "key_facts", "split", "synthetic", "source"}
    if unknown:
        return Problem(origin, f"unknown field(s): {', '.join(sorted(unknown))}")
    reason = _check_messages(obj.get("messages"), max_chars)
    if reason:
        return Problem(origin, reason)
    facts = obj.get("key_facts", [])
    if not isinstance(facts, list) or not all(isinstance(f, str) and f.strip() for f in facts):
        return Problem(origin, "'key_facts' must be a list of non-empty strings")
    split = obj.get("split")
    if split not in (None, "train", "eval"):
        return Problem(origin, "'split' must be 'train' or 'eval'")
    synthetic = bool(obj.get("synthetic", False))
    messages = [{"role": m["role"], "content": m["content"]} for m in obj["messages"]]
    return Example(messages, list(facts), "synthetic" if synthetic else "curated", synthetic, split, origin)


def load_jsonl(path: Path, *, max_chars: int = 8000, split: str | None = None) -> tuple[list[Example], list[Problem]]:
    """Read a chat JSONL file; bad lines are reported (file:line and why) and skipped, never fatal."""
    examples: list[Example] = []
    problems: list[Problem] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            origin = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(Problem(origin, f"not JSON ({exc.msg})"))
                continue
            parsed = parse_record(obj, origin, max_chars)
            if isinstance(parsed, Problem):
                problems.append(parsed)
                continue
            if split is not None:
                parsed.split = split
            examples.append(parsed)
    return examples, problems


def from_feedback(records: Iterable[FeedbackRecord], *, max_chars: int = 8000) -> tuple[list[Example], list[Problem]]:
    """Positively rated answers as they were, and corrections (of any rating) in place of the answer."""
    examples: list[Example] = []
    problems: list[Problem] = []
    for r in records:
        origin = f"feedback:{r.id}"
        if r.correction and r.correction.strip():
            answer, source = r.correction, "correction"
        elif r.rating > 0:
            answer, source = r.answer, "feedback"
        else:
            continue  # a thumbs-down without a correction says what not to say, not what to say
        messages = [{"role": m["role"], "content": m["content"]} for m in r.messages]
        messages.append({"role": "assistant", "content": answer})
        reason = _check_messages(messages, max_chars)
        if reason:
            problems.append(Problem(origin, reason))
            continue
        examples.append(Example(messages, [], source, False, None, origin))
    return examples, problems


SYNTHETIC_PROMPT = (
    "Read the passage and write one question a colleague might ask that the passage answers, then the "
    "short answer. Reply exactly in two lines:\nQ: <question>\nA: <answer>\n\nPassage:\n{chunk}"
)
_QA = re.compile(r"^\s*Q:\s*(?P<q>.+?)\s*\n\s*A:\s*(?P<a>.+?)\s*$", re.S)


def synthetic_pairs(chunks: list[str], generate: Callable[[list[str]], list[str]], *, max_chars: int = 8000
                    ) -> tuple[list[Example], list[Problem]]:
    """Question-answer pairs the model writes from ingested chunks, marked synthetic.

    ``generate(prompts) -> replies`` is the model itself (greedy). A reply that does not follow
    the ``Q: ... / A: ...`` shape is reported and dropped.
    """
    examples: list[Example] = []
    problems: list[Problem] = []
    replies = generate([SYNTHETIC_PROMPT.format(chunk=c) for c in chunks]) if chunks else []
    for i, reply in enumerate(replies):
        origin = f"synthetic:{i}"
        match = _QA.match(reply.strip())
        if not match:
            problems.append(Problem(origin, "the model's reply is not a 'Q: ... / A: ...' pair"))
            continue
        messages = [{"role": "user", "content": match["q"]}, {"role": "assistant", "content": match["a"]}]
        reason = _check_messages(messages, max_chars)
        if reason:
            problems.append(Problem(origin, reason))
            continue
        examples.append(Example(messages, [], "synthetic", True, None, origin))
    return examples, problems


def is_eval(question: str, eval_fraction: float) -> bool:
    """Deterministic side for a question: sha256 of its normalised text, as a fraction of 2^64."""
    digest = hashlib.sha256(normalise(question).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def redact_example(example: Example, redact: Redactor) -> Example:
    messages = [{"role": m["role"], "content": redact(m["content"])} for m in example.messages]
    return Example(messages, example.key_facts, example.source, example.synthetic, example.split, example.origin)


def build(
    examples: Iterable[Example],
    problems: Iterable[Problem] = (),
    *,
    eval_fraction: float = 0.1,
    redact: Redactor | None = None,
) -> Dataset:
    """Redact, de-duplicate and split.

    Duplicates are records with the same normalised conversation (question and answer); the first
    one wins. A question that lands on the eval side (pinned or by hash) is never also trained on,
    whatever its answer: otherwise the held-out score would measure memorisation of the same text.
    """
    problems = list(problems)
    seen: set[str] = set()
    kept: list[Example] = []
    duplicates = 0
    for example in examples:
        if redact is not None:
            example = redact_example(example, redact)
        key = "\x1f".join(f"{m['role']}:{normalise(m['content'])}" for m in example.messages)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        kept.append(example)
    eval_side = [e for e in kept if e.split == "eval" or (e.split is None and is_eval(e.question, eval_fraction))]
    eval_questions = {normalise(e.question) for e in eval_side}
    eval_ids = {id(e) for e in eval_side}
    train_side = []
    for e in kept:
        if id(e) in eval_ids:
            continue
        if normalise(e.question) in eval_questions:
            duplicates += 1  # the same question is held out: training on it would leak the answer
            continue
        train_side.append(e)
    return Dataset(train_side, eval_side, problems, duplicates)


def write_jsonl(examples: Iterable[Example], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for e in examples:
            handle.write(json.dumps(e.as_dict(), ensure_ascii=False) + "\n")
