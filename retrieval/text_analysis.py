"""Tokens for BM25 in Chinese and English: jieba for CJK text, snowball stemming for English words.

The same function analyses chunks at ingest time and queries at search time, so both sides agree.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

_WORD = re.compile(r"[^\W_]+", re.UNICODE)  # letters and digits, no punctuation or underscores
_ASCII_WORD = re.compile(r"[a-z0-9]+")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_LATIN_LETTER = re.compile(r"[A-Za-z]")


def mostly_cjk(text: str) -> bool:
    """True when the text has at least as many CJK ideographs as English words (taken as 4 letters
    each), so a Chinese question that names an English product still counts as Chinese."""
    cjk = len(_CJK.findall(text))
    return cjk > 0 and cjk >= len(_LATIN_LETTER.findall(text)) / 4

# Small, conservative stop lists: frequent function words only, so that they neither dominate
# BM25 postings nor hide meaningful terms.
ENGLISH_STOPWORDS = frozenset(
    "a an and are as at be but by for from has have if in into is it its of on or that the their then there "
    "these they this to was were will with what which who how when where do does can i you we our your".split()
)
CHINESE_STOPWORDS = frozenset("的 了 是 在 和 与 及 或 也 就 都 而 被 把 对 于 之 其 这 那 有 为 以 中 上 下 吗 呢 吧 啊".split())


@lru_cache(maxsize=1)
def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading chatter goes to stderr otherwise
    jieba.initialize()
    return jieba


def prepare() -> None:
    """Load jieba's dictionary now (0.7 s, about 70 MiB): the server calls it at start, so that the
    first Chinese search does not pay for it."""
    _jieba()


@lru_cache(maxsize=1)
def _stemmer():
    import Stemmer  # PyStemmer: the snowball stemmers

    return Stemmer.Stemmer("english")


@lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    return _stemmer().stemWord(word)


def tokenize(text: str) -> list[str]:
    text = text.lower()
    if _CJK.search(text) is None:
        # No Chinese: a regex split is ~50x faster than jieba and gives the same words.
        pieces = _ASCII_WORD.findall(text) if text.isascii() else _WORD.findall(text)
    else:
        # cut_for_search also emits the shorter words inside long ones (十五天 -> 十五, 五天, 十五天),
        # which is what lets a query with either form match.
        pieces = [p for p in _jieba().cut_for_search(text) if _WORD.search(p)]
    tokens = []
    for piece in pieces:
        piece = piece.strip()
        if not piece:
            continue
        if piece.isascii():
            if piece in ENGLISH_STOPWORDS:
                continue
            tokens.append(_stem(piece))
        elif piece not in CHINESE_STOPWORDS:
            tokens.append(piece)
    return tokens


def chunk_header(title: str | None, heading: str | None) -> str:
    """The contextual header of a chunk: where it sits in its document, "Title > Section > Sub".

    Embedded in front of the chunk's text and indexed as BM25's heading field, so a passage that
    never repeats its subject ("Return the Python representation of s") is still found by the
    function or section it belongs to. The title is left out when the first heading already
    appears in it (a page's <h1> repeated in its <title>), so the header does not say it twice.
    """
    title = " ".join(title.split()) if title else ""
    heading = heading or ""
    first = heading.split(" > ", 1)[0]
    if title and heading and (first in title or title in first):
        return heading
    return " > ".join(part for part in (title, heading) if part)
