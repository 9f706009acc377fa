"""API keys on real SQLite and PostgreSQL: shown once, stored as a keyed hash, revocable, expiring."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa

from app.db import make_engine
from security.api_keys import ApiKeyError, ApiKeyService

SECRET = b"s" * 32


@pytest.fixture
def keys(database_url: str) -> ApiKeyService:
    return ApiKeyService(make_engine(database_url), SECRET)


def test_create_authenticate_and_the_token_is_never_stored(keys: ApiKeyService):
    token, info = keys.create("helpdesk-bot", "service", ["support"], "faq")
    principal, seen = keys.authenticate(token)
    assert (principal.role, principal.groups, principal.knowledge_base) == ("service", ("support",), "faq")
    assert principal.subject == f"key:{info.key_id}" and seen.last_used_at is None
    with keys.engine.connect() as conn:
        dump = json.dumps([list(map(str, r)) for r in conn.execute(sa.text("SELECT * FROM sec_api_key")).all()])
    assert token not in dump and token.split("_", 2)[2] not in dump  # the secret (it may itself hold "_")
    assert keys.list()[0].last_used_at is not None


def test_wrong_secret_tampered_or_unknown_tokens_fail(keys: ApiKeyService):
    token, _ = keys.create("u", "user", ["staff"])
    assert keys.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert keys.authenticate("enc_000000000000_" + "x" * 43) is None
    assert keys.authenticate("Bearer nonsense") is None
    assert ApiKeyService(keys.engine, b"t" * 32).authenticate(token) is None  # hash is keyed


def test_revoke_and_expiry(keys: ApiKeyService):
    token, info = keys.create("temp", "user", [])
    keys.revoke(info.key_id)
    assert keys.authenticate(token) is None
    expired, _ = keys.create("old", "user", [], expires_in=timedelta(seconds=-1))
    assert keys.authenticate(expired) is None
    with pytest.raises(ApiKeyError, match="no API key"):
        keys.revoke("nope")
    with pytest.raises(ApiKeyError, match="role must be"):
        keys.create("x", "root")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        ApiKeyService(keys.engine, b"short")
