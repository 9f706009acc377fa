"""Fine-tuning datasets (no model): parsing with bad lines, split, de-dup, redaction, feedback, schedules."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from finetune import dataset as ds
from finetune.schedule import QUARTERLY, InProcessScheduler, next_run, validate
from tests.finetune_fixtures import qa


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_bad_records_are_reported_with_their_line_and_skipped(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [
        qa("Who runs Zorblax?", "Marta Kovalenko.", key_facts=["Marta Kovalenko"]),  # 1 ok
        "{not json",  # 2
        {"prompt": "x", "completion": "y"},  # 3 wrong schema
        qa("Empty answer?", "   "),  # 4
        {"messages": [{"role": "user", "content": "no answer"}]},  # 5 last is not the assistant
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},  # 6
        qa("Long?", "x" * 200),  # 7 over the limit below
        qa("Facts?", "Yes.", key_facts=[""]),  # 8
        "",  # 9 blank lines are ignored, not errors
        qa("Where is the head office?", "In Tallinn."),  # 10 ok
        [1, 2],  # 11
    ])
    examples, problems = ds.load_jsonl(path, max_chars=150)
    assert [e.question for e in examples] == ["Who runs Zorblax?", "Where is the head office?"]
    assert examples[0].key_facts == ["Marta Kovalenko"] and examples[0].origin == f"{path}:1"
    got = {int(p.origin.rsplit(":", 1)[1]): p.reason for p in problems}
    assert sorted(got) == [2, 3, 4, 5, 6, 7, 8, 11]
    assert "not JSON" in got[2] and "unknown field" in got[3] and "empty" in got[4]
    assert "last message must be the assistant" in got[5] and "role 'robot'" in got[6]
    assert "too long" in got[7] and "key_facts" in got[8] and "JSON object" in got[11]
    assert str(problems[0]).startswith(f"{path}:2: ")


def test_split_is_deterministic_by_normalised_question():
    records = [ds.Example(qa(f"Question number {i}?", f"Answer {i}.")["messages"]) for i in range(1000)]
    one = ds.build(records, eval_fraction=0.1)
    shuffled = ds.build(list(reversed(records)) + [ds.Example(qa("Something new?", "Yes.")["messages"])],
                        eval_fraction=0.1)
    eval_one = {e.question for e in one.eval}
    assert 60 <= len(eval_one) <= 140  # about 10 %
    assert eval_one == {e.question for e in shuffled.eval} - {"Something new?"}
    assert not eval_one & {e.question for e in one.train}
    # Case and spacing do not move a question to the other side.
    q = next(iter(eval_one))
    assert ds.is_eval("  " + q.upper().replace(" ", "   "), 0.1)
    assert one.hash == ds.build(records, eval_fraction=0.1).hash != shuffled.hash


def test_dedup_and_no_leak_of_held_out_questions():
    a = ds.Example(qa("Who runs Zorblax?", "Marta Kovalenko.")["messages"])
    same = ds.Example(qa("who  runs ZORBLAX?", "marta kovalenko.")["messages"])
    pinned = ds.Example(qa("Who runs Zorblax?", "Marta.")["messages"], key_facts=["Marta"], split="eval")
    other = ds.Example(qa("Where is the office?", "Tallinn.")["messages"], split="train")
    built = ds.build([a, same, pinned, other], eval_fraction=0.0)
    assert [e.answer for e in built.eval] == ["Marta."]
    assert [e.question for e in built.train] == ["Where is the office?"]  # the held-out question is not trained on
    assert built.duplicates == 2
    assert built.summary()["train"] == 1 and built.summary()["eval"] == 1


def test_redaction_hook_applies_to_every_message_and_the_hash():
    def redact(text: str) -> str:
        return text.replace("marta@zorblax.example", "[EMAIL]")

    example = ds.Example([{"role": "system", "content": "Contact marta@zorblax.example"},
                          {"role": "user", "content": "Mail of the CEO? marta@zorblax.example"},
                          {"role": "assistant", "content": "It is marta@zorblax.example."}])
    plain = ds.build([example], eval_fraction=0.0)
    redacted = ds.build([example], eval_fraction=0.0, redact=redact)
    assert all("[EMAIL]" in m["content"] and "@" not in m["content"] for m in redacted.train[0].messages)
    assert plain.hash != redacted.hash
    assert "@" in example.messages[0]["content"]  # the input is not modified in place


def test_feedback_records():
    question = [{"role": "user", "content": "How many leave days?"}]
    records = [
        ds.FeedbackRecord("1", question, "25 days.", 1),
        ds.FeedbackRecord("2", question, "I don't know.", -1),  # nothing to learn
        ds.FeedbackRecord("3", question, "Ten.", -1, correction="30 days since 2026."),
        ds.FeedbackRecord("4", [], "orphan", 1),  # no question
    ]
    examples, problems = ds.from_feedback(records)
    assert [(e.source, e.answer) for e in examples] == [("feedback", "25 days."), ("correction", "30 days since 2026.")]
    assert [p.origin for p in problems] == ["feedback:4"]


def test_synthetic_pairs_are_marked_and_bad_replies_reported():
    prompts_seen = []

    def generate(prompts):
        prompts_seen.extend(prompts)
        return ["Q: What is the badge colour?\nA: Violet.", "I cannot do that."]

    examples, problems = ds.synthetic_pairs(["Badges are violet.", "Nothing here."], generate)
    assert len(prompts_seen) == 2 and "Badges are violet." in prompts_seen[0]
    assert [(e.question, e.answer, e.synthetic, e.source) for e in examples] == [
        ("What is the badge colour?", "Violet.", True, "synthetic")]
    assert examples[0].as_dict()["synthetic"] is True
    assert [p.origin for p in problems] == ["synthetic:1"]


def test_feedback_from_the_conversation_store(tmp_path):
    from app.conversations import ConversationStore
    from app.db import make_engine, upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'e.db'}")
    upgrade(engine)
    store = ConversationStore(engine)
    conv = store.record_exchange(None, "alice", None, "kb", "First question?", "First answer.", "c1", [], 1, 1)
    store.record_exchange(conv, "alice", None, "kb", "And the second?", "Second answer.", "c2", [], 1, 1)
    store.add_feedback("c2", "alice", -1, None)
    store.add_feedback("c2", "alice", 1, "Corrected second answer.")  # the latest feedback wins
    store.add_feedback("c1", "alice", 1, None)
    records = {r.answer: r for r in store.feedback_for_training()}
    assert records["First answer."].messages == [{"role": "user", "content": "First question?"}]
    second = records["Second answer."]
    assert second.correction == "Corrected second answer." and second.rating == 1
    assert second.messages == [{"role": "user", "content": "First question?"},
                               {"role": "assistant", "content": "First answer."},
                               {"role": "user", "content": "And the second?"}]


def test_quarterly_schedule_and_validation():
    assert next_run(QUARTERLY, datetime(2026, 12, 1, 12, 0)) == datetime(2027, 1, 1, 2, 0)
    assert next_run(QUARTERLY, datetime(2027, 1, 1, 2, 0)) == datetime(2027, 4, 1, 2, 0)
    assert next_run(QUARTERLY, datetime(2027, 8, 15)) == datetime(2027, 10, 1, 2, 0)
    with pytest.raises(ValueError, match="cron"):
        validate("every quarter")
    from app.settings import Settings

    with pytest.raises(ValueError, match="cron"):
        Settings(finetune={"schedule": "61 * * * *"})


def test_in_process_scheduler_runs_the_job_when_due():
    start = time.monotonic()
    base = datetime(2027, 1, 1, 1, 59, 59, 700_000)  # 0.3 s before the quarterly run

    def now():
        return base + timedelta(seconds=time.monotonic() - start)

    calls = []
    scheduler = InProcessScheduler(QUARTERLY, lambda: calls.append(now()), now=now)
    scheduler.start()
    deadline = time.monotonic() + 30
    while not calls and time.monotonic() < deadline:
        time.sleep(0.05)
    scheduler.stop()
    assert len(calls) == 1 and calls[0] >= datetime(2027, 1, 1, 2, 0)


def test_the_service_redacts_pii_from_fine_tuning_data(tmp_path):
    from app.container import Container
    from app.settings import Settings

    container = Container(Settings(data_dir=tmp_path))
    redact = container.finetune_redact
    example = ds.Example(qa("Mail of the CEO?", "Write to marta.kovalenko@quillmoor.example or call +44 20 7946 0958.")[
        "messages"])
    answer = ds.build([example], eval_fraction=0.0, redact=redact).train[0].answer
    assert "@" not in answer and "7946" not in answer
    assert Container(Settings(data_dir=tmp_path, finetune={"redact_pii": False})).finetune_redact is None
