"""Answer checks: is a generated answer supported by the blocks it cites, does it loop, and the
extractive answer that replaces it when it is not.

All pure functions over strings (no model, no I/O), used by ``app/services/chat.py`` after and
while a generation streams, and by ``bench/answers.py``.

Support check (:func:`check_answer`): the answer is cut into sentences; each sentence's ``[n]``
citations name the blocks that must support it (a sentence without a citation is checked against
the blocks cited anywhere in the answer, and against every block when the answer cites none). A
sentence is *supported* when

1. every *claim* in it occurs in one of those blocks: numbers (with their decimals), versions,
   identifiers (``snake_case``, ``dotted.names``, ``CamelCase``, ``name()``), command-line options
   (``--flag``), key combinations, code in backticks and quoted phrases; and
2. most of its content terms occur there too (``min_overlap``, default 0.5; Chinese text is compared
   by character bigrams, so no word segmentation is needed).

Citations to block numbers that do not exist make a sentence unsupported. Abstentions ("I don't
know", "不知道") are recognised and never count as unsupported claims.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from dataclasses import dataclass, field

from llm.evidence import Evidence, Span, answer_type, has_type, label_before, split_sentences, terms

CITATION = re.compile(r"\[(\d{1,2})\]")
CITATION_RUN = re.compile(r"\s*(?:\[\d{1,2}\])+")  # "[1]", " [2][3]": citations, with the space before


def sentence_key(text: str) -> str:
    """A sentence without its citations, case and punctuation: the same sentence said again has the same key."""
    return re.sub(r"\W+", "", CITATION.sub("", text)).lower()

# --- claims ---------------------------------------------------------------------------------------

UNITS = [
    r"(?:milli|micro|nano)?seconds?", r"(?:ms|us|ns)", r"minutes?", r"hours?", r"days?", r"weeks?", r"months?",
    r"years?", r"(?:[KMGT]i?B|bytes?|bits?)", r"characters?", r"digits?", r"times", r"percent", r"pixels?", r"pt",
    r"points?", r"lines?", r"rows?", r"columns?", r"levels?", r"entries", r"items?", r"sheets?", r"pages?",
    r"个工作日", r"工作日", r"个月", r"小时", r"分钟", r"天", r"周", r"年", r"秒", r"次", r"位", r"字节", r"行", r"列",
    r"页", r"个", r"磅", r"种",
]
_UNIT_ONLY = re.compile(r"(\d[\d,]*(?:\.\d+)?)\s*(\D+)")

_CLAIM_PATTERNS = [
    re.compile(r"`([^`\n]{1,80})`"),  # code spans
    re.compile(r"[\"“「『]([^\"”」』\n]{2,80})[\"”」』]"),  # quoted phrases
    re.compile(r"(?<![\w.])--?[A-Za-z][\w-]*"),  # command-line options
    re.compile(r"\b(?:Ctrl|Shift|Alt|Cmd|Command|Option)(?:\s*\+\s*(?:Ctrl|Shift|Alt|Cmd|Command|Option|F\d{1,2}|"
               r"Enter|Tab|Space|Esc|Delete|Backspace|Home|End|Insert|Page\s?Up|Page\s?Down|Up|Down|Left|Right|"
               r"[A-Za-z0-9](?![A-Za-z0-9])|[^\sA-Za-z0-9]))+", re.IGNORECASE),  # key combinations
    re.compile(r"\b[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)+(?:\(\))?"),  # dotted names: os.path.join, json.dumps()
    re.compile(r"\b[A-Za-z_]\w*\(\)"),  # calls: print()
    re.compile(r"\b[a-z]+_[a-z0-9_]+\b"),  # snake_case
    re.compile(r"\b[A-Z][a-z0-9]+[A-Z]\w*\b"),  # CamelCase
    _QUANTITY := re.compile(  # a number with its unit: "18 days" is not supported by "18 weeks"
        r"(?<![A-Za-z0-9_.])\d[\d,]*(?:\.\d+)?\s*(?:" + "|".join(UNITS) + r")(?![A-Za-z])", re.IGNORECASE),
    # Versions, decimals and numbers; ASCII look-arounds, since Python's \w (and \b) count Chinese
    # characters as word characters and "享有45天" must still yield 45.
    re.compile(r"(?<![A-Za-z0-9_.])[vV]?\d+(?:\.\d+)+(?![A-Za-z0-9_])"),
    re.compile(r"(?<![A-Za-z0-9_.])\d[\d,]*(?:\.\d+)?%?"),
]
_ABSTAIN = re.compile(
    r"\b(?:i\s+(?:do\s+not|don['’]t)\s+know|(?:does|do)\s+not\s+(?:contain|mention|say|provide|include|cover)|"
    r"(?:no|not\s+enough)\s+information|cannot\s+(?:find|answer|be\s+answered)|can['’]t\s+(?:find|answer)|"
    r"not\s+(?:mentioned|stated|covered|specified)|unable\s+to\s+(?:find|answer))\b"
    r"|不知道|无法回答|没有(?:提到|提及|相关|找到)|未(?:提及|提到|找到|说明)|无法确定|不清楚",
    re.IGNORECASE,
)


def claims(sentence: str) -> list[str]:
    """The checkable facts a sentence states: numbers, versions, identifiers, options, quotes, code."""
    text = CITATION.sub(" ", sentence)
    found: list[str] = []
    taken: list[tuple[int, int]] = []
    for pattern in _CLAIM_PATTERNS:
        for m in pattern.finditer(text):
            if any(a <= m.start() < b or a < m.end() <= b for a, b in taken):
                continue  # inside a longer claim already taken (a number inside a quoted phrase)
            value = (m.group(1) if m.groups() else m.group(0)).strip().rstrip(".,;:")
            if value and not (value.isdigit() and len(value) == 1 and pattern is _CLAIM_PATTERNS[-1]):
                found.append(value)
                taken.append((m.start(), m.end()))
    return found


def _norm(text: str) -> str:
    text = text.replace("“", '"').replace("”", '"').replace("’", "'").replace("‘", "'")
    return re.sub(r"\s+", " ", text).strip().lower()


def occurs(claim: str, block: str) -> bool:
    """Whether ``claim`` (from :func:`claims`) is stated in ``block``: numbers whole, quantities with
    their unit, other claims as text (case, spacing and, for long phrases, punctuation aside)."""
    c, b = _norm(claim), _norm(block)
    if not c:
        return True
    quantity = _QUANTITY.fullmatch(c)
    if quantity:  # the number, then its unit within a few words ("3 consecutive working days")
        number, unit = _UNIT_ONLY.fullmatch(c).groups()
        stem = unit.strip().rstrip("s") if unit.strip().isascii() else unit.strip()
        plain = re.escape(number).replace(",", ",?")
        return bool(re.search(rf"(?<![a-z0-9_.]){plain}\W*(?:[a-z]+\W+){{0,2}}{re.escape(stem)}", b.replace(",", "")
                              if "," not in number else b))
    if re.fullmatch(r"[\d,]+(?:\.\d+)?%?", c):  # a number must match as a whole number, 1,000 == 1000
        plain = c.replace(",", "")
        numbers = {n.replace(",", "") for n in re.findall(r"(?<![A-Za-z0-9_.])\d[\d,]*(?:\.\d+)?%?", b)}
        return plain in numbers or plain.rstrip("%") in {n.rstrip("%") for n in numbers}
    if c in b or c.replace(" ", "") in b.replace(" ", ""):
        return True
    # A longer phrase (a quote) still matches when only punctuation and markup differ: Markdown's
    # "**22 days**", a heading joined to its line with a colon.
    return len(c) > 12 and re.sub(r"[\W_]+", "", c) in re.sub(r"[\W_]+", "", b)


def is_abstention(text: str) -> bool:
    return bool(_ABSTAIN.search(text))


# --- support check --------------------------------------------------------------------------------


@dataclass
class SentenceCheck:
    text: str
    cited: list[int]  # block numbers (1-based) cited by this sentence
    supported: bool
    missing: list[str] = field(default_factory=list)  # claims found in no cited block
    overlap: float = 1.0  # share of the sentence's content terms found in its blocks
    abstention: bool = False


@dataclass
class AnswerCheck:
    sentences: list[SentenceCheck]
    cited: list[int]  # every valid block number the answer cites, in order of first citation

    @property
    def grounded(self) -> bool:
        """Every sentence supported, and at least one sentence that states something with a citation."""
        stating = [s for s in self.sentences if not s.abstention]
        return bool(stating) and all(s.supported for s in stating) and bool(self.cited)

    @property
    def abstained(self) -> bool:
        return bool(self.sentences) and all(s.abstention for s in self.sentences[:1])

    @property
    def unsupported(self) -> list[SentenceCheck]:
        return [s for s in self.sentences if not s.supported]


def check_sentence(sentence: str, blocks: Sequence[str], fallback: Sequence[int] = (), min_overlap: float = 0.5
                   ) -> SentenceCheck:
    """Check one answer sentence against ``blocks`` (the context texts, numbered from 1).

    Support must be local: one sentence of a cited block, or two adjacent ones, has to hold every
    claim and at least ``min_overlap`` of the sentence's content terms. A figure found somewhere
    in a long chunk ("2" of "2 working days") does not support "The answer is 2". A sentence with
    fewer than two content words besides its figures states nothing checkable and is unsupported.
    """
    numbers = [int(n) for n in CITATION.findall(sentence)]
    if is_abstention(sentence):
        return SentenceCheck(sentence, numbers, True, abstention=True)
    if any(not 1 <= n <= len(blocks) for n in numbers):
        return SentenceCheck(sentence, numbers, False, missing=[f"[{n}]" for n in numbers if not 1 <= n <= len(blocks)])
    sources = numbers or list(fallback) or list(range(1, len(blocks) + 1))
    stated = claims(sentence)
    said = terms(CITATION.sub(" ", sentence))
    words = {t for t in said if not re.fullmatch(r"[\d.,%]+", t)}
    best_missing, best_overlap = stated, 0.0
    for n in sources:
        for window, window_terms in _windows(blocks[n - 1]):
            missing = [c for c in stated if not occurs(c, window)]
            overlap = len(said & window_terms) / len(said) if said else 1.0
            if (len(missing), -overlap) < (len(best_missing), -best_overlap):
                best_missing, best_overlap = missing, overlap
            if not missing and overlap >= min_overlap and len(words) >= 2:
                return SentenceCheck(sentence, numbers, True, [], overlap)
    return SentenceCheck(sentence, numbers, False, best_missing, best_overlap)


@lru_cache(maxsize=256)
def _windows(text: str) -> tuple[tuple[str, frozenset[str]], ...]:
    """Each sentence of ``text`` and each pair of adjacent sentences (a claim and its context), with
    their terms. Cached: a streamed answer checks every sentence against the same few chunks."""
    spans = split_sentences(text)
    out = [s.text for s in spans]
    out += [text[a.start : b.end] for a, b in zip(spans, spans[1:])]
    return tuple((w, frozenset(terms(w))) for w in (out or [text]))


def check_answer(answer: str, blocks: Sequence[str], min_overlap: float = 0.5) -> AnswerCheck:
    """Check every sentence of ``answer`` against the context ``blocks`` it cites (see module doc)."""
    spans = [s for s in split_sentences(answer) if not _is_only_citations(s.text)]
    cited: list[int] = []
    for n in (int(x) for x in CITATION.findall(answer)):
        if 1 <= n <= len(blocks) and n not in cited:
            cited.append(n)
    checks = [check_sentence(_attach_trailing(answer, s), blocks, cited, min_overlap) for s in spans]
    return AnswerCheck(checks, cited)


def _is_only_citations(text: str) -> bool:
    return not CITATION_RUN.sub("", text).strip(" .。")


def _attach_trailing(answer: str, span: Span) -> str:
    """A sentence with the citations that follow its full stop ("... 128. [1]") counted as its own."""
    tail = CITATION_RUN.match(answer, span.end)
    return span.text + (tail.group(0) if tail else "")


# --- loops ----------------------------------------------------------------------------------------


def find_loop(text: str, min_repeats: int = 3, max_unit: int = 80, min_chars: int = 12) -> int | None:
    """Where the repetition at the end of ``text`` starts (None when it does not loop).

    A loop is a unit of 1..``max_unit`` characters repeated back to back at the end of the text at
    least ``min_repeats`` times (a unit shorter than 4 characters at least 5 times, a single
    character at least 12 times), covering at least ``min_chars`` characters: "1. 1. 1. 1. 1.",
    "Holiday calendar\\nHoliday calendar\\n...", "aaaaaaaaaaaa". Returns the end of the unit's first
    occurrence, i.e. where the text should be cut to keep it once. Also catches a sentence or line
    said a third time anywhere in the text.
    """
    n = len(text)
    for unit in range(1, min(max_unit, n // 2) + 1):
        need = 12 if unit == 1 else 5 if unit < 4 else min_repeats
        if unit * need > n:
            break
        tail = text[n - unit :]
        if not tail.strip():
            continue
        repeats, pos = 1, n - unit
        while pos - unit >= 0 and text[pos - unit : pos] == tail:
            repeats += 1
            pos -= unit
        if repeats >= need and repeats * unit >= min_chars:
            return pos + unit
    seen: dict[str, int] = {}
    for span in split_sentences(text):
        key = sentence_key(span.text)
        if len(key) < 8:
            continue
        seen[key] = seen.get(key, 0) + 1
        if seen[key] >= 3:
            first = text.lower().find(span.text.lower())
            return first + len(span.text) if first >= 0 else span.start
    return None


# --- extractive answer and quotes -----------------------------------------------------------------

EXTRACTIVE_INTRO = {"zh": "文档中的相关内容：", "en": "From the documents:"}
NO_ANSWER = {
    "zh": "不知道：您有权查看的文档中没有找到这个问题的答案。",
    "en": "I don't know: the documents you may read do not answer this question.",
}
NO_CONTEXT = {
    "zh": "不知道：您有权查看的文档中没有与这个问题相关的内容。",
    "en": "I don't know: no document you may read matches this question.",
}


@dataclass(frozen=True)
class Quote:
    block: int  # 1-based block number (the source's index)
    span: Span  # offsets into that block's chunk text


def extractive_answer(evidence: Evidence, language: str | None, max_sentences: int = 2, ratio: float = 0.8,
                      max_chars: int = 420, texts: Sequence[str] = ()) -> tuple[str, list[Quote]]:
    """The best-supported sentence(s) of the retrieved chunks, quoted with their [n].

    The best sentence always; the next ones while their score is at least ``ratio`` of the best and
    the answer stays under ``max_chars``. ``evidence`` indexes blocks from 0 in the same order as
    the response's sources (numbered from 1). With the chunk ``texts``, a sentence is quoted with
    the line that labels it (:func:`llm.evidence.label_before`: the signature or term it describes).
    """
    picked = []
    for s in evidence.sentences:
        if len(picked) >= max_sentences:
            break
        if picked and (s.score < ratio * picked[0].score or
                       sum(len(p.span.text) for p in picked) + len(s.span.text) > max_chars):
            continue
        if any(p.block == s.block and p.span == s.span for p in picked):
            continue
        if picked and _similar(s.span.text, picked[0].span.text):
            continue  # the same sentence from another page says nothing new
        picked.append(s)
    if not picked:
        return NO_ANSWER["zh" if language == "zh" else "en"], []
    zh = language == "zh"
    open_q, close_q = ("“", "”")
    wanted = answer_type(evidence.question) if evidence.question else None
    spans = [_with_context(texts[s.block], s.span, wanted) if s.block < len(texts) else s.span for s in picked]
    parts = [f"{open_q}{_clean_quote(span.text)}{close_q} [{s.block + 1}]" for s, span in zip(picked, spans)]
    intro = EXTRACTIVE_INTRO["zh" if zh else "en"]
    return (intro + ("" if zh else " ") + ("" if zh else " ").join(parts)), [Quote(s.block + 1, sp) for s, sp in zip(picked, spans)]


def _with_context(text: str, span: Span, wanted: str | None) -> Span:
    """The sentence with the line that labels it, and with the next sentence when the question asks
    for a figure or a name that the sentence lacks and the next one holds ("The largest year
    allowed. MAXYEAR is 9999.")."""
    spans = split_sentences(text)
    at = next((i for i, sp in enumerate(spans) if sp.start == span.start), None)
    if at is None:
        return span
    label = label_before(text, spans, at)
    start, end = (label.start if label else span.start), span.end
    if wanted and not has_type(text[start:end], wanted) and at + 1 < len(spans):
        following = spans[at + 1]
        if has_type(following.text, wanted) and following.end - start <= 500:
            end = following.end
    return Span(start, end, text[start:end])


def _similar(a: str, b: str) -> bool:
    ta, tb = terms(a), terms(b)
    return bool(ta and tb) and len(ta & tb) / len(ta | tb) > 0.7


_MD_LINE = re.compile(r"^\s*(?:#{1,6}\s+|>\s*|[-*•]\s+(?!\S*\*))")
_MD_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")


def _clean_quote(text: str) -> str:
    """A quoted passage as a reader should see it: Markdown heading, list and bold markers dropped,
    a labelling line joined to what it labels with a colon ("Annual leave: Full-time employees ...")."""
    out = ""
    for line in text.splitlines():
        line = re.sub(r"\s+", " ", _MD_BOLD.sub(r"\1", _MD_LINE.sub("", line))).strip()
        if not line:
            continue
        if out:
            cjk = bool(re.search(r"[\u3400-\u9fff]", out[-1] + line[0]))
            if out[-1] not in ".!?。！？:：;；,，":
                out += "：" if cjk else ": "
            else:
                out += "" if cjk else " "
        out += line
    return out


def supporting_quotes(check: AnswerCheck, chunks: Sequence[str], max_per_block: int = 2) -> list[Quote]:
    """For a generated answer: in each cited chunk, the sentence(s) sharing most terms with the
    answer sentences that cite it (the evidence a reader should see highlighted)."""
    quotes: list[Quote] = []
    for number in check.cited:
        said: set[str] = set()
        for s in check.sentences:
            if number in s.cited or (not s.cited and not s.abstention):
                said |= terms(CITATION.sub(" ", s.text))
        chunk = chunks[number - 1]
        ranked = []
        for span in split_sentences(chunk):
            shared = len(terms(span.text) & said)
            if shared:
                ranked.append((shared, span.start, span))
        ranked.sort(key=lambda r: (-r[0], r[1]))
        for _, _, span in sorted(ranked[:max_per_block], key=lambda r: r[1]):
            quotes.append(Quote(number, span))
    return quotes


def best_block(sentence: str, chunks: Sequence[str]) -> int:
    """The chunk (1-based) that holds most of the sentence's terms: the citation it forgot."""
    said = terms(sentence)
    scores = [len(said & terms(c)) for c in chunks]
    return 1 + max(range(len(scores)), key=lambda i: (scores[i], -i)) if scores else 1


def add_citation(sentence: str, number: int) -> str:
    """Insert ``[n]`` before the sentence's closing punctuation."""
    m = re.search(r"[.。!?！？]+$", sentence)
    if m:
        return sentence[: m.start()] + f" [{number}]" + sentence[m.start():]
    return sentence + f" [{number}]"
