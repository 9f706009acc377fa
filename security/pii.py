"""PII redaction: e-mail addresses, phone numbers, Chinese resident ID numbers, bank card numbers.

Used for the query text kept in the audit log (by default), and optionally for ingested text and
generated answers. Written here because the libraries that do this (Presidio and the like) pull in
spaCy models and NER pipelines, while these four kinds are fixed formats best matched exactly, with
their checksums: only a resident ID number whose ISO 7064 MOD 11-2 check character is right, and
only a card number that passes Luhn, is redacted, so order numbers and other long digit runs stay.

Matches are replaced by a typed placeholder such as ``[EMAIL]`` so that a reader still sees what kind
of value was there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Digits next to a match would make it part of a longer number: not a match then.
_NOT_DIGIT_BEFORE = r"(?<![0-9A-Za-z])"
_NOT_DIGIT_AFTER = r"(?![0-9A-Za-z])"

EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}(?![\w-])"
)
# 18 characters: 6-digit area, birth date 19xx/20xx, 3-digit order, check digit or X.
CN_ID = re.compile(_NOT_DIGIT_BEFORE + r"[1-9]\d{5}(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[0-9Xx]" + _NOT_DIGIT_AFTER)
# 13-19 digits written together, or in the printed groups 4-4-4-4(-3) and 4-6-5 (spaces or dashes).
CARD = re.compile(
    _NOT_DIGIT_BEFORE + r"(?:\d{13,19}|\d{4}(?:[ -]\d{4}){3}(?:[ -]\d{3})?|\d{4}[ -]\d{6}[ -]\d{5})" + _NOT_DIGIT_AFTER
)
# Chinese mobiles: 1[3-9] + 9 digits, optionally +86/0086 and grouped 3-4-4.
CN_MOBILE = re.compile(
    r"(?<![\w+])(?:(?:\+|00)86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}" + _NOT_DIGIT_AFTER
)
# International numbers: + country code then 6-14 more digits in groups (E.164 allows 15 digits),
# and common national shapes with a parenthesised area code, e.g. (415) 555-0100.
INTL_PHONE = re.compile(
    r"(?<![\w+])(?:\+|00)[1-9]\d{0,2}(?:[ .-]?\(?\d{1,4}\)?){2,6}" + _NOT_DIGIT_AFTER
    + r"|(?<![\w(])\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,4}" + _NOT_DIGIT_AFTER
)

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def valid_cn_id(number: str) -> bool:
    """ISO 7064 MOD 11-2 check of an 18-character resident ID number (GB 11643-1999)."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS))
    return _ID_CHECK[total % 11] == number[17].upper()


def luhn_valid(digits: str) -> bool:
    if not digits.isdigit() or not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


@dataclass(frozen=True)
class Finding:
    kind: str  # email | cn_id | card | phone
    start: int
    end: int


class PiiRedactor:
    """``redact(text)`` replaces every finding by ``[KIND]``. Stateless and thread-safe."""

    PLACEHOLDERS = {"email": "[EMAIL]", "cn_id": "[CN_ID]", "card": "[CARD]", "phone": "[PHONE]"}
    # The longest text one finding can span (an e-mail address at most 64 + 1 + 8 * 63 + 24 characters
    # under the pattern above; the others are far shorter): used by the streaming redactor.
    MAX_SPAN = 600

    @staticmethod
    def _candidates(text: str):
        """Every pattern match, valid or not, in priority order: (kind, match, valid)."""
        for m in EMAIL.finditer(text):
            yield "email", m, True
        for m in CN_ID.finditer(text):
            yield "cn_id", m, valid_cn_id(m.group())
        for m in CARD.finditer(text):
            yield "card", m, luhn_valid(re.sub(r"[ -]", "", m.group()))
        for pattern in (CN_MOBILE, INTL_PHONE):
            for m in pattern.finditer(text):
                yield "phone", m, 7 <= len(re.sub(r"\D", "", m.group())) <= 15

    def find(self, text: str) -> list[Finding]:
        found: list[Finding] = []
        for kind, m, valid in self._candidates(text):
            # A span an earlier, more specific kind already covers is not reported twice.
            if valid and not any(m.start() < f.end and f.start < m.end() for f in found):
                found.append(Finding(kind, m.start(), m.end()))
        return sorted(found, key=lambda f: f.start)

    def redact(self, text: str) -> str:
        if not text:
            return text
        parts, last = [], 0
        for f in self.find(text):
            parts.append(text[last : f.start])
            parts.append(self.PLACEHOLDERS[f.kind])
            last = f.end
        parts.append(text[last:])
        return "".join(parts)

    def streaming(self) -> "StreamingRedactor":
        return StreamingRedactor(self)


class StreamingRedactor:
    """Redacts a text that arrives in pieces (a streamed answer) exactly as ``redact`` would redact the
    whole: text is held back until no finding can still reach into it, i.e. for ``MAX_SPAN``
    characters, and never released in the middle of a finding."""

    def __init__(self, redactor: PiiRedactor):
        self.redactor = redactor
        self._pending = ""

    def feed(self, piece: str) -> str:
        self._pending += piece
        safe = len(self._pending) - self.redactor.MAX_SPAN
        if safe <= 0:
            return ""
        spans = [(m.start(), m.end()) for _, m, _ in self.redactor._candidates(self._pending)]
        moved = True
        while moved and safe > 0:
            moved = False
            # Release only right after a whitespace character (every pattern's boundary checks then
            # see the same thing on both sides of the cut) and never inside any match, valid or not
            # (a match that reaches the cut could still grow with the text to come).
            while safe > 0 and not self._pending[safe - 1].isspace():
                safe -= 1
            for start, end in spans:
                if start < safe <= end:
                    safe, moved = start, True
        if safe <= 0:
            return ""
        released, self._pending = self._pending[:safe], self._pending[safe:]
        return self.redactor.redact(released)

    def flush(self) -> str:
        released, self._pending = self._pending, ""
        return self.redactor.redact(released)
