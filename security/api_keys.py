"""API keys: random tokens shown once, stored only as a keyed hash (HMAC-SHA256 with a server secret)."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from security.principal import Principal
from security.tables import ApiKeyRow, utcnow

LAST_USED_RESOLUTION = timedelta(minutes=1)  # how stale an API key's last_used_at may be

# The public prefix of every key (enc_<id>_<secret>), not a secret (bandit B105 false positive).
TOKEN_PREFIX = "enc"  # nosec B105
_TOKEN = re.compile(rf"{TOKEN_PREFIX}_([a-z0-9]{{12}})_([A-Za-z0-9_-]{{43}})")
_KEY_ID = re.compile(rf"{TOKEN_PREFIX}_([a-z0-9]{{12}})_")
ROLES = ("admin", "user", "service")
_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")


def presented_key_id(token: str) -> str | None:
    """The id part of a token shaped like an API key (``enc_<id>_...``), valid or not: public, not a secret."""
    match = _KEY_ID.match(token.strip())
    return match.group(1) if match else None


class ApiKeyError(Exception):
    """Invalid request about keys (unknown id, bad role, ...); never raised with a token in it."""


class ApiKeyNotFound(ApiKeyError):
    """No key with that id."""

    http_status = 404
    error_code = "key_not_found"


@dataclass
class ApiKeyInfo:
    key_id: str
    name: str
    role: str
    groups: list[str]
    knowledge_base: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def active(self) -> bool:
        now = utcnow()
        return self.revoked_at is None and (self.expires_at is None or _aware(self.expires_at) > now)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _info(row: ApiKeyRow) -> ApiKeyInfo:
    return ApiKeyInfo(row.key_id, row.name, row.role, json.loads(row.groups), row.knowledge_base, row.created_at,
                      row.expires_at, row.revoked_at, row.last_used_at)


class ApiKeyService:
    def __init__(self, engine: Engine, secret: bytes):
        if len(secret) < 32:
            raise ValueError("the API-key secret must be at least 32 bytes")
        self.engine = engine
        self._secret = secret

    def _hash(self, token: str) -> str:
        return hmac.new(self._secret, token.encode(), hashlib.sha256).hexdigest()

    def create(
        self,
        name: str,
        role: str = "user",
        groups: list[str] | tuple[str, ...] = (),
        knowledge_base: str | None = None,
        expires_in: timedelta | None = None,
    ) -> tuple[str, ApiKeyInfo]:
        """Returns (token, info). The token is not stored anywhere: show it once."""
        if role not in ROLES:
            raise ApiKeyError(f"role must be one of {', '.join(ROLES)}")
        bad = [g for g in groups if not _GROUP.fullmatch(g)]
        if bad:
            raise ApiKeyError(f"invalid group name {bad[0]!r}")
        if not name.strip() or len(name) > 128:
            raise ApiKeyError("a key needs a name of 1-128 characters")
        if role == "service" and not knowledge_base:
            raise ApiKeyError("a service key must be limited to one knowledge base (--kb)")
        key_id = secrets.token_hex(6)
        token = f"{TOKEN_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        row = ApiKeyRow(
            key_id=key_id, name=name.strip(), key_hash=self._hash(token), role=role,
            groups=json.dumps(sorted(set(groups))), knowledge_base=knowledge_base,
            expires_at=utcnow() + expires_in if expires_in else None,
        )
        with Session(self.engine) as session:
            session.add(row)
            session.commit()
            session.refresh(row)
            return token, _info(row)

    def authenticate(self, token: str) -> tuple[Principal, ApiKeyInfo] | None:
        """The principal for a valid, active token; None otherwise (no reason is leaked)."""
        match = _TOKEN.fullmatch(token.strip())
        if match is None:
            return None
        with Session(self.engine) as session:
            row = session.get(ApiKeyRow, match.group(1))
            expected = row.key_hash if row is not None else self._hash("absent")
            valid = hmac.compare_digest(expected, self._hash(token.strip())) and row is not None
            if not valid:
                return None
            info = _info(row)
            if not info.active:
                return None
            now = utcnow()
            last = row.last_used_at
            if last is not None and last.tzinfo is None:
                last = last.replace(tzinfo=timezone.utc)  # SQLite hands back naive UTC
            # Recorded at most once a minute per key: a write transaction on every request would
            # serialise all searches on the database's write lock (docs/benchmarks.md, "Search over HTTP").
            if last is None or now - last >= LAST_USED_RESOLUTION:
                row.last_used_at = now
                session.add(row)
                session.commit()
        principal = Principal(subject=f"key:{info.key_id}", role=info.role, groups=tuple(info.groups),
                              knowledge_base=info.knowledge_base)
        return principal, info

    def list(self) -> list[ApiKeyInfo]:
        with Session(self.engine) as session:
            return [_info(r) for r in session.exec(select(ApiKeyRow).order_by(ApiKeyRow.created_at))]

    def revoke(self, key_id: str) -> ApiKeyInfo:
        with Session(self.engine) as session:
            row = session.get(ApiKeyRow, key_id)
            if row is None:
                raise ApiKeyNotFound(f"no API key with id {key_id!r}")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
                session.add(row)
                session.commit()
                session.refresh(row)
            return _info(row)
