"""Context compression: keep only the sentences of the retrieved chunks that bear on the question.

Small generators answer far better from a few short, relevant sentences than from five 750-character
chunks (measured in docs/benchmarks.md, "Answer quality"). Before generation every retrieved chunk is
cut into sentences (with character offsets into the chunk, so that a sentence can later be quoted
and highlighted); each sentence is scored against the question; the best ones, within a per-model
budget (:class:`PromptProfile`), are kept in their chunk's order and the chunks re-numbered in rank
order. The same scores drive the extractive answer and the "is anything here relevant at all?"
decision (:func:`relevance`).

Scores (all in [0, 1]):

- lexical: the share of the question's content terms (English words, light-stemmed; Chinese
  character bigrams) that the sentence contains, each term weighted by its rarity among the
  candidate sentences (a term in every sentence says nothing);
- dense: cosine similarity of embedder vectors, when the caller passes an ``embed`` function (the
  retrieval embedder); the bundled MiniLM knows no Chinese, so ``dense_weight`` is language-dependent;
- rank prior: a small bonus for sentences of higher-ranked chunks (retrieval already ranked them);
- title: the chunk's title shares terms with the question (a page about the asked-for thing).

Everything here is a pure function of its inputs (no model, no I/O): the embedder is injected.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

Embed = Callable[[list[str]], "np.ndarray"]  # texts -> L2-normalised vectors, one row per text

# --- sentences ------------------------------------------------------------------------------------

# Hand-written because no maintained splitter fits: nltk's punkt needs downloaded data (no hub here),
# spaCy/pysbd do not keep offsets for mixed Chinese/English text with code identifiers such as
# ``os.path.join`` or versions such as ``3.11``, which must never be cut.
_ABBREVIATIONS = frozenset("e.g i.e etc vs cf no mr mrs dr st fig approx ca resp ex".split())
_END = re.compile(r"[.!?](?=[\"')\]]*\s+[\"'(\[]?[A-Z0-9])|[。！？；]|\n\s*\n|\n(?=\s*(?:[-*•·]|\d+[.)])\s)|\n")
MAX_SENTENCE_CHARS = 400  # longer runs (tables, code) are cut at "; " or ", " or a space
MIN_SENTENCE_CHARS = 3


@dataclass(frozen=True)
class Span:
    """A sentence of a text: ``text == source[start:end]``."""

    start: int
    end: int
    text: str


def split_sentences(text: str) -> list[Span]:
    """Sentences of ``text`` with their character offsets (whitespace-trimmed, empty ones dropped).

    Ends: ``. ! ?`` followed by space and an upper-case letter, digit or opening quote (so ``os.path``,
    ``3.11`` and ``e.g. this`` stay whole), the Chinese ``。！？；``, and line breaks (headings,
    list items, signature lines of API references are sentences of their own).
    """
    spans: list[Span] = []
    start = 0
    for match in _END.finditer(text):
        end = match.end()
        if match.group(0) in ".!?":
            word = re.search(r"(\w+)\.$", text[start:end])
            if word and word.group(1).lower() in _ABBREVIATIONS:
                continue
        _add(spans, text, start, end)
        start = end
    _add(spans, text, start, len(text))
    return spans


def _add(spans: list[Span], text: str, start: int, end: int) -> None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    while end - start > MAX_SENTENCE_CHARS:
        cut = _soft_cut(text, start, start + MAX_SENTENCE_CHARS)
        _add(spans, text, start, cut)
        start = cut
        while start < end and text[start].isspace():
            start += 1
    if end - start >= MIN_SENTENCE_CHARS and any(c.isalnum() for c in text[start:end]):
        spans.append(Span(start, end, text[start:end]))


def _soft_cut(text: str, start: int, limit: int) -> int:
    for sep in ("; ", "；", ", ", "，", " "):
        cut = text.rfind(sep, start + MAX_SENTENCE_CHARS // 2, limit)
        if cut > 0:
            return cut + len(sep)
    return limit


# --- terms ----------------------------------------------------------------------------------------

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_]*|\d+(?:\.\d+)*")
# Function words and question words: they match everywhere and must not make a sentence look relevant.
STOPWORDS = frozenset(
    """a an and are as at be been but by can could did do does doing for from had has have how i if in into is it
    its me my of on or our should so than that the their them then there these they this those to use used using
    was we were what when where which who whom why will with would you your about any some all also not no yes
    get gets set sets just only more most other such one may might must shall want need like make makes""".split()
)
CHINESE_STOP_BIGRAMS = frozenset(
    "什么 怎么 怎样 如何 哪个 哪些 多少 是否 可以 能否 为什么 请问 一下 时候 我的 我们 如果 这个 那个 需要 应该 一个 中的".split()
)
_CHINESE_STOP_CHARS = frozenset("的了是在和与及或也就都而被把对于之其这那有为以中上下吗呢吧啊我你他她它么什怎样哪请能会要")


# The Snowball English stemmer (PyStemmer), as retrieval's BM25 uses; made once, words cached.
_STEMMER: list = []


@lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    if not _STEMMER:
        import Stemmer

        _STEMMER.append(Stemmer.Stemmer("english"))
    return _STEMMER[0].stemWord(word)


def terms(text: str) -> set[str]:
    """Content terms: stemmed English words and numbers (stop words out), Chinese character bigrams
    (and single characters of one-character runs), all lower-case."""
    found: set[str] = set()
    for word in _WORD.findall(text):
        lower = word.lower()
        if lower in STOPWORDS or (len(lower) < 2 and not lower.isdigit()):
            continue
        found.add(_stem(lower))
        if "_" in lower:  # snake_case names also match their parts
            found.update(_stem(p) for p in lower.split("_") if len(p) > 2 and p not in STOPWORDS)
    for run in _HAN.findall(text):
        if len(run) == 1:
            if run not in _CHINESE_STOP_CHARS:
                found.add(run)
            continue
        for i in range(len(run) - 1):
            gram = run[i : i + 2]
            if gram in CHINESE_STOP_BIGRAMS or (gram[0] in _CHINESE_STOP_CHARS and gram[1] in _CHINESE_STOP_CHARS):
                continue
            found.add(gram)
    return found


# --- what kind of answer the question wants, and the names it mentions ------------------------------

# A question that asks for a figure or for a name is answered by a sentence holding one: such
# sentences get ``type_bonus`` (classic answer-type matching of extractive QA systems).
_WANTS_NUMBER = re.compile(
    r"\b(?:how\s+(?:many|much|long|large|big|old|often|fast|far)|what\s+(?:year|percentage|number)|which\s+(?:port|year)"
    r"|(?:default|maximum|minimum|largest|smallest|max|min)\b|limit|timeout|port\b|size\b|value\b)"
    r"|多少|几[个天年次位种]|多大|多长|多久|上限|下限|最大|最小|最多|最少|默认值|区间|范围|数值|代码",
    re.IGNORECASE,
)
_WANTS_NAME = re.compile(
    r"\b(?:which|what)\s+(?:\w+\s+){0,3}?(?:function|method|class|module|exception|error|constant|flag|option|"
    r"argument|parameter|attribute|variable|decorator|command|file|package|keyword|name|setting|extension|"
    r"protocol|mode|format|type|tool|menu|key|shortcut|library|field|object)s?\b|\bname\s+of\b"
    r"|函数|快捷键|组合键|菜单|选项|命令|扩展名|名称|名字|哪个|哪一|什么键|工具",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"(?<![A-Za-z_])\d")
_NAME_TOKEN = re.compile(
    r"`[^`]+`|\b[A-Za-z_]+\w*\.[A-Za-z_]\w*|\b[a-z]+_[a-z0-9_]+\b|\b[A-Z][a-z0-9]+[A-Z]\w*\b|\b[A-Z][A-Z0-9_]{2,}\b"
    r"|(?<![\w-])--?[A-Za-z][\w-]+|\b\w+\(\)|(?:Ctrl|Shift|Alt|Cmd)\s*\+|\S+\s+-\s+\S+|[「『][^」』]+[」』]"
)


def answer_type(question: str) -> str | None:
    """"number", "name" or None: what the question asks for, by its wording."""
    if _WANTS_NAME.search(question):
        return "name"
    if _WANTS_NUMBER.search(question):
        return "number"
    return None


def has_type(text: str, wanted: str | None) -> bool:
    if wanted == "number":
        return bool(_NUMBER.search(text))
    if wanted == "name":
        return bool(_NAME_TOKEN.search(text))
    return False


_LATIN_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.+:/-]*[A-Za-z0-9]")


def question_names(question: str) -> list[str]:
    """Names the question mentions (products, functions, settings): CamelCase or ALL-CAPS words,
    dotted or snake_case identifiers, capitalised words past the first, and any Latin word in a
    mostly-Chinese question. A name that no retrieved passage contains means the documents are
    about something else: the service then says it does not know."""
    names = []
    chinese = len(_HAN.findall(question)) > 0
    words = list(_LATIN_NAME.finditer(question))
    for i, m in enumerate(words):
        word = m.group(0).rstrip(".:/-")
        if len(word) < 2 or word.lower() in STOPWORDS:
            continue
        inner_upper = any(c.isupper() for c in word[1:])
        identifier = any(c in word for c in "._") or (any(c.isdigit() for c in word) and any(c.isalpha() for c in word))
        capitalised = word[0].isupper() and m.start() > 0 and question[: m.start()].rstrip()[-1:] not in ".?!"
        if chinese or inner_upper or identifier or capitalised:
            names.append(word)
    return names


def missing_names(question: str, texts: Sequence[str]) -> list[str]:
    """The question's names (:func:`question_names`) that occur in none of ``texts`` (any case)."""
    haystack = " ".join(texts).lower()
    missing = []
    for name in question_names(question):
        low = name.lower()
        if low in haystack:
            continue
        last = low.rsplit(".", 1)[-1]  # subprocess.run is documented as run(...) on its own page
        if "." in low and len(last) >= 3 and re.search(rf"(?<![\w]){re.escape(last)}\(", haystack):
            continue
        missing.append(name)
    return missing


# --- profiles and results -------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptProfile:
    """How much context a model is given, and how it is shown.

    ``max_blocks`` chunks at most, ``max_sentences`` sentences in all, ``block_chars`` characters per
    block; ``compress=False`` sends the retrieved chunks whole (large models). ``one_shot`` adds a
    worked example of the citation format to the fenced layout's system prompt (SmolLM2-135M copied
    the example's answer instead, so it is off for it).
    """

    compress: bool = True
    max_blocks: int = 3
    max_sentences: int = 6
    block_chars: int = 500
    one_shot: bool = False
    style: str = "fenced"  # fenced (<context> blocks, full rules) | plain ("[1] text", one-line task)
    # Decoding guards (applied to the generated tokens only, never to the prompt, so copying a
    # figure from the context is not penalised): HF-style repetition penalty and no-repeat n-grams.
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 0
    # How answers are made when ``answer.policy`` is not set: "verify" (the model's checked
    # sentences, else quotes) or "extractive" (quotes only), whichever measured better for the model.
    policy: str = "verify"


# Per-model defaults (docs/benchmarks.md, "Answer quality", backs each figure). A model not named
# here is taken to be large enough to read whole chunks (GLM-4, vLLM-served models).
PROFILES: dict[str, PromptProfile] = {
    # Measured on bench/answers.py (docs/benchmarks.md, "Answer quality"): compressed plain-layout
    # prompts doubled its correct answers, the repetition penalty and no-repeat n-grams cost 7 points
    # (loops are cut by the loop guard instead), and the quoted extractive answer still beat its
    # checked answers (English 86% vs 72% correct), so it answers by quoting unless configured.
    "smollm2-135m-instruct": PromptProfile(compress=True, max_blocks=3, max_sentences=5, block_chars=450,
                                           one_shot=False, style="plain", policy="extractive"),
}
DEFAULT_PROFILE = PromptProfile(compress=False, max_blocks=20, max_sentences=60, block_chars=4000, one_shot=False)


def profile_for(model: str) -> PromptProfile:
    return PROFILES.get(model, DEFAULT_PROFILE)


@dataclass(frozen=True)
class ScoredSentence:
    block: int  # index of the chunk in the retrieved list (0-based, rank order)
    span: Span
    score: float
    lexical: float
    dense: float


@dataclass
class Evidence:
    """The scored sentences of the retrieved chunks (best first) and the language weights used."""

    sentences: list[ScoredSentence]
    question_terms: set[str]
    by_block: dict[int, list[ScoredSentence]] = field(default_factory=dict)
    dense_weight: float = 0.0
    question: str = ""

    @property
    def relevance(self) -> float:
        """How well the best sentence matches the question, without the rank and title bonuses: the
        service answers "I don't know" below ``answer.min_relevance``."""
        w = self.dense_weight
        return max(((1 - w) * s.lexical + w * s.dense for s in self.sentences), default=0.0)

def score_sentences(
    question: str,
    texts: Sequence[str],
    titles: Sequence[str | None] = (),
    embed: Embed | None = None,
    dense_weight: float = 0.5,
    rank_weight: float = 0.1,
    type_bonus: float = 0.15,
) -> Evidence:
    """Score every sentence of every retrieved chunk ``texts`` (rank order) against ``question``."""
    question_terms = terms(question)
    candidates: list[tuple[int, Span, set[str]]] = []
    typed: list[bool] = []
    wanted = answer_type(question)
    for block, text in enumerate(texts):
        spans = split_sentences(text)
        for i, span in enumerate(spans):
            label = label_before(text, spans, i)
            candidates.append((block, span, terms(span.text) | (terms(label.text) if label else set())))
            typed.append(has_type(span.text + (" " + label.text if label else ""), wanted))
    if not candidates:
        return Evidence([], question_terms, {}, dense_weight if embed is not None else 0.0, question)

    # Rarity among the candidates: idf = log(1 + N / df), so a term present everywhere weighs little.
    n = len(candidates)
    df = {t: sum(1 for _, _, ts in candidates if t in ts) for t in question_terms}
    weight = {t: math.log(1 + n / df[t]) if df[t] else math.log(1 + n) for t in question_terms}
    total = sum(weight.values()) or 1.0
    title_bonus = []
    for block in range(len(texts)):
        title = titles[block] if block < len(titles) else None
        shared = terms(title or "") & question_terms
        title_bonus.append(sum(weight[t] for t in shared) / total if shared else 0.0)

    dense = np.zeros(n, dtype=np.float32)
    if embed is None:
        dense_weight = 0.0
    if dense_weight > 0:
        vectors = embed([question] + [span.text for _, span, _ in candidates])
        dense = np.clip(vectors[1:] @ vectors[0], 0.0, 1.0)

    scored: list[ScoredSentence] = []
    blocks = max(1, len(texts))
    for i, (block, span, ts) in enumerate(candidates):
        lexical = sum(weight[t] for t in question_terms & ts) / total if question_terms else 0.0
        value = (1 - dense_weight) * lexical + dense_weight * float(dense[i])
        value += rank_weight * (1 - block / blocks) + 0.1 * title_bonus[block] + (type_bonus if typed[i] else 0.0)
        scored.append(ScoredSentence(block, span, value, lexical, float(dense[i])))
    scored.sort(key=lambda s: (-s.score, s.block, s.span.start))
    by_block: dict[int, list[ScoredSentence]] = {}
    for s in scored:
        by_block.setdefault(s.block, []).append(s)
    return Evidence(scored, question_terms, by_block, dense_weight if embed is not None else 0.0, question)


def label_before(text: str, spans: Sequence[Span], i: int) -> Span | None:
    """The line just before sentence ``i`` when it labels it: a short line of its own without closing
    punctuation (a signature, a term of a definition list, a heading, an option name). In reference
    documentation the name a question asks for is often there, and the sentence only describes it."""
    if i == 0:
        return None
    prev = spans[i - 1]
    if "\n" not in text[prev.end : spans[i].start] or len(prev.text) > 160:
        return None
    if prev.text[-1] in ".!?。！？；;,，":
        return None
    return prev


@dataclass(frozen=True)
class CompressedBlock:
    """A retrieved chunk reduced to its selected sentences (``spans`` index the original chunk)."""

    block: int  # index in the retrieved list
    text: str
    spans: tuple[Span, ...]


def compress(texts: Sequence[str], evidence: Evidence, profile: PromptProfile) -> list[CompressedBlock]:
    """The best sentences within the profile's budget, grouped by chunk, chunks in rank order.

    Sentences are taken best first until ``max_sentences``; a chunk joins while fewer than
    ``max_blocks`` chunks are in; each chunk's text stays under ``block_chars``. Within a chunk the
    sentences keep their original order; gaps between them are shown as " … ".
    """
    if not profile.compress:
        return [CompressedBlock(i, t, (Span(0, len(t), t),)) for i, t in enumerate(texts[: profile.max_blocks])]
    chosen: dict[int, list[Span]] = {}
    count = 0
    for s in evidence.sentences:
        if count >= profile.max_sentences:
            break
        if s.block not in chosen and len(chosen) >= profile.max_blocks:
            continue
        spans = chosen.get(s.block, [])
        if sum(len(sp.text) for sp in spans) + len(s.span.text) > profile.block_chars:
            continue  # this chunk is full (or the sentence alone is too long)
        chosen[s.block] = spans + [s.span]
        count += 1
    out = []
    for block in sorted(chosen):
        spans = tuple(sorted(chosen[block], key=lambda sp: sp.start))
        out.append(CompressedBlock(block, _join(spans), spans))
    return out


def _join(spans: Sequence[Span]) -> str:
    parts = [spans[0].text]
    for before, after in zip(spans, spans[1:]):
        parts.append((" " if after.start - before.end <= 2 else " … ") + after.text)
    return "".join(parts)
