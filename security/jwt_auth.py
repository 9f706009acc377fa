"""OIDC/JWT bearer tokens: signature, issuer, audience and lifetime checked with PyJWT.

Keys come from the identity provider's JWKS endpoint (PyJWKClient, cached) or from a local JWKS
file for air-gapped sites. Only asymmetric algorithms are accepted and the list is pinned by the
operator: ``alg: none`` and HS* (the classic "verify an HMAC with the public key" confusion) never
reach a key. Groups come from a configurable claim; the role is ``user`` unless the token carries
one of the configured admin (or service) groups.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jwt
from jwt import PyJWK, PyJWKClient, PyJWKSet

from security.principal import Principal

log = logging.getLogger("enclave.security")

ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"})
MAX_GROUPS = 256
MAX_TOKEN_CHARS = 16_384


class TokenError(Exception):
    """The token is not acceptable. The message names the reason for the server log, never the token."""


@dataclass(frozen=True)
class OidcConfig:
    issuer: str
    audience: str
    jwks_url: str | None = None
    jwks_file: Path | None = None
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway_seconds: int = 30
    subject_claim: str = "sub"
    groups_claim: str = "groups"
    admin_groups: tuple[str, ...] = ()
    service_groups: tuple[str, ...] = ()
    knowledge_base_claim: str = "enclave_kb"
    jwks_cache_seconds: int = 300
    required_claims: tuple[str, ...] = field(default=("exp", "iat", "iss", "aud"))

    def __post_init__(self) -> None:
        bad = [a for a in self.algorithms if a not in ASYMMETRIC_ALGORITHMS]
        if bad or not self.algorithms:
            raise ValueError(f"algorithm {bad[0] if bad else None!r} not allowed: only asymmetric JWT algorithms")
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError("give exactly one of jwks_url and jwks_file")
        if not self.issuer or not self.audience:
            raise ValueError("issuer and audience are required")


class OidcValidator:
    def __init__(self, config: OidcConfig):
        self.config = config
        self._client: PyJWKClient | None = None
        self._keys: PyJWKSet | None = None
        if config.jwks_url is not None:
            self._client = PyJWKClient(config.jwks_url, cache_jwk_set=True, lifespan=max(config.jwks_cache_seconds, 1),
                                       timeout=10)
        else:
            # Read at start: a missing or malformed file is a configuration error, not a 401 later.
            try:
                self._keys = PyJWKSet.from_dict(json.loads(Path(config.jwks_file).read_text()))
            except (OSError, ValueError, jwt.PyJWTError) as exc:
                raise ValueError(f"JWKS file {config.jwks_file}: {exc}") from None

    def _key(self, token: str, header: dict) -> PyJWK:
        kid = header.get("kid")
        if self._client is not None:
            try:
                return self._client.get_signing_key_from_jwt(token)
            except jwt.PyJWKClientError as exc:
                raise TokenError(f"no signing key: {exc}") from None
        keys = self._keys.keys
        if kid is None:
            if len(keys) != 1:
                raise TokenError("token has no 'kid' and the key set holds several keys")
            return keys[0]
        for key in keys:
            if key.key_id == kid:
                return key
        raise TokenError(f"unknown key id {kid!r}")

    def validate(self, token: str) -> Principal:
        """The principal for a valid token; raises TokenError otherwise."""
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenError("token too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenError(f"malformed token: {exc}") from None
        alg = header.get("alg")
        # Checked before any key is looked at: 'none', HS* and anything the operator did not pin.
        if alg not in self.config.algorithms:
            raise TokenError(f"algorithm {alg!r} not accepted (pinned: {', '.join(self.config.algorithms)})")
        key = self._key(token, header)
        if key.public_key_use not in (None, "sig"):
            raise TokenError(f"key {key.key_id!r} is not a signing key (use={key.public_key_use!r})")
        # Only an "alg" the JWK states itself binds it (PyJWK guesses one from kty otherwise).
        key_alg = getattr(key, "_jwk_data", {}).get("alg")
        if key_alg is not None and key_alg != alg:
            raise TokenError(f"token algorithm {alg!r} does not match the key's {key_alg!r}")
        family = {"R": "RSA", "P": "RSA", "E": "EC"}.get(alg[0], "OKP")  # RS*/PS*, ES*, EdDSA
        if key.key_type != family:
            raise TokenError(f"token algorithm {alg!r} does not fit the {key.key_type} key {key.key_id!r}")
        try:
            claims = jwt.decode(
                token, key.key, algorithms=[alg], audience=self.config.audience, issuer=self.config.issuer,
                leeway=self.config.leeway_seconds,
                options={"require": list(self.config.required_claims), "verify_signature": True},
            )
        except (jwt.PyJWTError, TypeError, ValueError) as exc:  # PyJWT raises TypeError for a key of the wrong kind
            raise TokenError(f"{type(exc).__name__}: {exc}") from None
        return self._principal(claims)

    def _principal(self, claims: dict) -> Principal:
        subject = claims.get(self.config.subject_claim)
        if not isinstance(subject, str) or not subject.strip():
            raise TokenError(f"claim {self.config.subject_claim!r} missing or not a string")
        groups = _groups(_claim(claims, self.config.groups_claim))
        role, knowledge_base = "user", None
        if set(groups) & set(self.config.admin_groups):
            role = "admin"
        elif set(groups) & set(self.config.service_groups):
            role = "service"
            knowledge_base = claims.get(self.config.knowledge_base_claim)
            if not isinstance(knowledge_base, str) or not knowledge_base:
                # Service accounts are always pinned to one knowledge base; refuse rather than widen.
                raise TokenError(f"service token without a {self.config.knowledge_base_claim!r} claim")
        return Principal(subject=f"oidc:{subject}", role=role, groups=groups, knowledge_base=knowledge_base)


def _claim(claims: dict, path: str):
    """A claim by name, or by dotted path into nested objects (Keycloak: realm_access.roles)."""
    if path in claims:
        return claims[path]
    value = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _groups(value) -> tuple[str, ...]:
    """A JSON list of names, or one space- or comma-separated string (OAuth `scope` style)."""
    if value is None:
        return ()
    if isinstance(value, str):
        items: Sequence = value.replace(",", " ").split()
    elif isinstance(value, list):
        items = [v for v in value if isinstance(v, str)]
    else:
        raise TokenError("groups claim is neither a list nor a string")
    names = sorted({v.strip() for v in items if v.strip() and len(v) <= 256})
    if len(names) > MAX_GROUPS:
        raise TokenError(f"more than {MAX_GROUPS} groups")
    return tuple(names)


def unverified_subject(token: str) -> str | None:
    """The ``sub`` a token claims, read without checking anything: only a name to count failed
    sign-ins under (security.rate_limit.SignInLimiter), never an identity."""
    try:
        sub = jwt.decode(token, options={"verify_signature": False}).get("sub")
    except (jwt.InvalidTokenError, AttributeError, ValueError):
        return None
    return sub[:128] if isinstance(sub, str) and sub else None
