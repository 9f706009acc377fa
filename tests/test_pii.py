"""PII redaction: valid examples are redacted, checksum failures and look-alikes are left alone."""

from __future__ import annotations

import random

import pytest

from security.pii import PiiRedactor, luhn_valid, valid_cn_id

R = PiiRedactor()


def _id_with_check(first17: str) -> str:
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return first17 + "10X98765432"[sum(int(d) * w for d, w in zip(first17, weights)) % 11]


def test_resident_id_checksum():
    assert valid_cn_id("11010519491231002X") and valid_cn_id("11010519491231002x")  # GB 11643 example
    assert not valid_cn_id("110105194912310021")  # same digits, wrong check character
    assert valid_cn_id(_id_with_check("44030119900307123"))
    assert not valid_cn_id("4403011990030712")  # 16 characters


def test_luhn():
    for good in ("4111111111111111", "5555555555554444", "378282246310005", "6011111111111117", "6212345678901232"):
        assert luhn_valid(good), good
    for bad in ("4111111111111112", "5555555555554443", "123456789012", "41111111111111111111"):
        assert not luhn_valid(bad), bad


@pytest.mark.parametrize(
    "text, expected",
    [
        ("write to li.wei+hr@corp.example.cn today", "write to [EMAIL] today"),
        ("请联系 zhang_san@mail.example.com。", "请联系 [EMAIL]。"),
        ("手机 13812345678，或 +86 139 1234 5678", "手机 [PHONE]，或 [PHONE]"),
        ("call 0086-150-1234-5678 now", "call [PHONE] now"),
        ("London +44 20 7946 0958, US (415) 555-0100", "London [PHONE], US [PHONE]"),
        ("身份证 11010519491231002X 已登记", "身份证 [CN_ID] 已登记"),
        ("card 4111 1111 1111 1111 expires", "card [CARD] expires"),
        ("card 4111-1111-1111-1111, amex 3782 822463 10005", "card [CARD], amex [CARD]"),
        ("银行卡6212345678901232转账", "银行卡[CARD]转账"),
    ],
)
def test_valid_values_are_redacted(text, expected):
    assert R.redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "ID 110105194912310021 has a wrong check digit",  # fails MOD 11-2
        "card 4111 1111 1111 1112 fails Luhn",
        "order number 4111111111111112",
        "version 1.2.3, 25 days of leave, room 12345, year 2026",
        "12812345678 is not a mobile (second digit 2)",
        "user@localhost has no domain",
        "a 20-digit reference 12345678901234567890",
    ],
)
def test_invalid_or_look_alike_values_are_kept(text):
    assert R.redact(text) == text


def test_id_number_inside_a_longer_number_is_not_an_id():
    assert R.redact("x911010519491231002X") == "x911010519491231002X"


def test_streaming_redaction_equals_whole_text_redaction():
    pieces = ["Contact 138", "1234 5678 or li.wei@", "corp.example.cn; ID 1101051949", "1231002X card 4111 1111 ",
              "1111 1111. " + "filler text " * 80, "tail 13800138000"]
    whole = "".join(pieces)
    rng = random.Random(7)
    for _ in range(20):  # random cut points, down to one character per piece
        cuts = sorted(rng.sample(range(1, len(whole)), rng.randint(1, 60)))
        parts = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)])]
        stream = R.streaming()
        out = "".join(stream.feed(p) for p in parts) + stream.flush()
        assert out == R.redact(whole)
    assert "[PHONE]" in R.redact(whole) and "[CN_ID]" in R.redact(whole) and "[CARD]" in R.redact(whole)
