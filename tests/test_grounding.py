"""Answer checks on real text: sentence splitting, evidence scoring and compression, the support
check (numbers, identifiers, Chinese without spaces), loop detection, the extractive answer, quotes,
and the decoding guards on logits. Pure functions: no model is loaded here."""

from __future__ import annotations

import torch

from llm.batching import guard_logits
from llm.evidence import PromptProfile, compress, score_sentences, split_sentences, terms
from llm.grounding import (
    check_answer, check_sentence, claims, extractive_answer, find_loop, is_abstention, supporting_quotes,
)
from tests.conftest import SAMPLES

LEAVE = (SAMPLES / "leave-policy.md").read_text(encoding="utf-8")
HOLIDAYS = (SAMPLES / "holiday-calendar-2026.md").read_text(encoding="utf-8")
LEAVE_ZH = (SAMPLES / "请假制度.md").read_text(encoding="utf-8")
LRU = ("@functools.lru_cache(maxsize=128, typed=False)\n"
       "Decorator to wrap a function with a memoizing callable that saves up to the maxsize most recent calls. "
       "If maxsize is set to None, the LRU feature is disabled and the cache can grow without bound. "
       "See e.g. os.path.join for details. Changed in version 3.8: Added the user_function option.")


def test_sentences_keep_offsets_and_do_not_cut_identifiers_or_versions():
    spans = split_sentences(LRU)
    assert [s.text for s in spans] == [
        "@functools.lru_cache(maxsize=128, typed=False)",
        "Decorator to wrap a function with a memoizing callable that saves up to the maxsize most recent calls.",
        "If maxsize is set to None, the LRU feature is disabled and the cache can grow without bound.",
        "See e.g. os.path.join for details.",
        "Changed in version 3.8: Added the user_function option.",
    ]
    assert all(LRU[s.start:s.end] == s.text for s in spans)
    chinese = split_sentences(LEAVE_ZH)
    assert len(chinese) > 5 and all(LEAVE_ZH[s.start:s.end] == s.text for s in chinese)
    assert any(s.text.endswith("。") for s in chinese)


def test_terms_stem_english_and_use_bigrams_for_chinese():
    assert terms("file recursive") <= terms("Find the files recursively")
    assert "the" not in terms("the file")
    assert {"年假", "天数"} <= terms("年假天数是多少")
    assert "多少" not in terms("年假天数是多少")  # a question word says nothing about the topic


def test_the_sentence_that_answers_scores_highest_and_compression_keeps_it():
    question = "How many days of paid annual leave do full-time employees get?"
    evidence = score_sentences(question, [HOLIDAYS, LEAVE], ["Holiday calendar 2026", "Leave Policy"])
    best = evidence.sentences[0]
    assert best.block == 1 and "22 days" in best.span.text
    blocks = compress([HOLIDAYS, LEAVE], evidence, PromptProfile(max_blocks=2, max_sentences=4, block_chars=400))
    kept = {b.block: b for b in blocks}
    assert "22 days" in kept[1].text
    assert all(len(b.text) <= 400 + 10 for b in blocks)
    assert sum(len(b.spans) for b in blocks) <= 4
    # Offsets point into the original chunk.
    assert all([HOLIDAYS, LEAVE][b.block][s.start:s.end] == s.text for b in blocks for s in b.spans)


def test_relevance_is_low_when_nothing_in_the_context_bears_on_the_question():
    relevant = score_sentences("How many days of sick leave do employees get?", [LEAVE])
    unrelated = score_sentences("What is the price of a Tesla Model 3 in Norway?", [LEAVE])
    assert relevant.relevance > 0.5 > unrelated.relevance


def test_claims_are_numbers_versions_identifiers_options_and_quotes():
    found = claims('Use `typed=True` or --no-cache with functools.lru_cache() in version 3.11 for "fast mode" [1].')
    assert {"typed=True", "--no-cache", "functools.lru_cache()", "3.11", "fast mode"} <= set(found)
    assert "1" not in found  # the citation is not a claim
    assert claims("Press Ctrl+Shift+F9 to recalculate.") == ["Ctrl+Shift+F9"]


def test_supported_answer_passes_and_an_invented_figure_fails():
    blocks = [HOLIDAYS, LEAVE]
    good = check_answer("Full-time employees receive 22 days of paid annual leave [2].", blocks)
    assert good.grounded and good.cited == [2]
    invented = check_answer("Full-time employees receive 30 days of paid annual leave [2].", blocks)
    assert not invented.grounded and invented.sentences[0].missing == ["30 days"]
    wrong_block = check_answer("Full-time employees receive 22 days of paid annual leave [1].", blocks)
    assert not wrong_block.grounded  # the holiday calendar does not say it
    no_such_block = check_answer("Employees receive 22 days of paid annual leave [7].", blocks)
    assert not no_such_block.grounded
    vague = check_answer("The answer is: 2 [2].", blocks)  # "2" is in the policy ("2 working days"), but says nothing
    assert not vague.grounded
    scattered = check_sentence("Employees receive 18 days of sick leave [2].", blocks)  # 18 is there, for parental leave
    assert not scattered.supported and scattered.missing == ["18 days"]
    off_topic = check_sentence("Employees should always wear a helmet on the construction site [2].", blocks)
    assert not off_topic.supported and off_topic.overlap < 0.5


def test_chinese_support_without_spaces():
    good = check_sentence("员工每年享有12天带薪病假 [1]。", [LEAVE_ZH])
    assert good.supported, good
    bad = check_sentence("员工每年享有45天带薪病假 [1]。", [LEAVE_ZH])
    assert not bad.supported and bad.missing == ["45天"]


def test_abstentions_are_recognised_and_never_unsupported():
    for text in ("I don't know.", "The context does not mention the price.", "文档中没有提到这个问题。", "不知道。"):
        assert is_abstention(text)
        assert check_sentence(text, [LEAVE]).supported
    assert check_answer("I don't know.", [LEAVE]).abstained
    assert not check_answer("I don't know.", [LEAVE]).grounded


def test_loops_are_found_and_cut_after_the_first_occurrence():
    assert find_loop("The answer is 1. 1. 1. 1. 1. 1.") == len("The answer is 1.")
    title = "Holiday calendar 2026\n"
    assert find_loop("Leave: " + title * 8) == len("Leave: " + title)
    assert find_loop("Leave: " + "a" * 30) == len("Leave: a")
    assert find_loop("Employees get 22 days [1]. Sick leave is 10 days [1].") is None
    assert find_loop("1. Annual leave: 22 days.\n2. Sick leave: 10 days.\n3. Parental leave: 18 weeks.") is None


def test_extractive_answer_quotes_the_best_sentence_with_its_number():
    evidence = score_sentences("How many days of paid annual leave do full-time employees get?", [HOLIDAYS, LEAVE])
    text, quotes = extractive_answer(evidence, "en")
    assert "22 days" in text and "[2]" in text and quotes[0].block == 2
    assert LEAVE[quotes[0].span.start:quotes[0].span.end] == quotes[0].span.text
    assert check_answer(text, [HOLIDAYS, LEAVE]).grounded  # a quote is supported by construction
    zh = score_sentences("病假有多少天？", [LEAVE_ZH])
    text_zh, _ = extractive_answer(zh, "zh")
    assert text_zh.startswith("文档中的相关内容") and "[1]" in text_zh


def test_supporting_quotes_point_at_the_cited_sentence():
    check = check_answer("Up to 5 unused days may be carried over [1].", [LEAVE])
    quotes = supporting_quotes(check, [LEAVE])
    assert quotes and "carried over" in quotes[0].span.text and quotes[0].block == 1


def test_decoding_guards_touch_generated_tokens_only():
    logits = torch.tensor([2.0, -1.0, 3.0, 0.5, 1.0])
    guard_logits(logits, [0, 1], penalty=2.0, ngram=0)
    assert logits.tolist() == [1.0, -2.0, 3.0, 0.5, 1.0]  # positive / 2, negative * 2, others untouched
    logits = torch.zeros(6)
    guard_logits(logits, [1, 2, 3, 1, 2], penalty=1.0, ngram=3)  # "1 2" was followed by 3: 3 is banned
    assert logits[3] == float("-inf") and torch.isfinite(logits[[0, 1, 2, 4, 5]]).all()
