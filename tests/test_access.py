"""Identity and access on the real application (FastAPI app, real SQLite, real keys and tokens):
OIDC/JWT bearer tokens next to API keys, RBAC on every route, rate limits, the IP allowlist with
trusted proxies and the body cap. No model is loaded: every request here is decided before one is
needed (the lifespan that loads models is not run)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from app.api.app import create_app
from app.container import Container
from app.settings import Settings
from security.jwt_auth import OidcConfig, OidcValidator, TokenError
from security.rate_limit import RateLimiter

ISSUER = "https://idp.example.test/realms/acme"
AUDIENCE = "enclave"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwks() -> dict:
    rsa_jwk = RSAAlgorithm.to_jwk(RSA_KEY.public_key(), as_dict=True) | {"kid": "rsa-1", "use": "sig", "alg": "RS256"}
    ec_jwk = ECAlgorithm.to_jwk(EC_KEY.public_key(), as_dict=True) | {"kid": "ec-1", "use": "sig"}
    return {"keys": [rsa_jwk, ec_jwk]}


def token(key=RSA_KEY, alg="RS256", kid="rsa-1", **overrides) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "nbf": now, "exp": now + 300,
              "groups": ["hr", "staff"]}
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid} if kid else None)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(alg: str, secret: bytes | None) -> str:
    """A token PyJWT would refuse to produce: alg none, or HS256 keyed with the public key's PEM."""
    now = int(time.time())
    header = _b64(json.dumps({"alg": alg, "typ": "JWT", "kid": "rsa-1"}).encode())
    payload = _b64(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "iat": now, "exp": now + 300,
                               "groups": ["admins"]}).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = _b64(hmac.new(secret, signing_input, hashlib.sha256).digest()) if secret else ""
    return f"{header}.{payload}.{signature}"


@pytest.fixture(scope="module")
def jwks_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(json.dumps(_jwks()))
    return path


def make(tmp: Path, **security) -> tuple[Container, TestClient]:
    container = Container(Settings(data_dir=tmp / "var", security=security))
    return container, TestClient(create_app(container), client=("127.0.0.1", 40000))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, jwks_file: Path):
    tmp = tmp_path_factory.mktemp("access")
    oidc = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(jwks_file), "admin_groups": ["admins"],
            "service_groups": ["bots"]}
    container, client = make(tmp, oidc=oidc, rate_limit_per_minute=0, auth_failures_per_minute=0)
    keys = {
        "admin": container.api_keys.create("admin", "admin")[0],
        "user": container.api_keys.create("staff", "user", ["staff"])[0],
        "service": container.api_keys.create("bot", "service", [], "faq")[0],
    }
    return {"container": container, "client": client, "keys": keys, "tmp": tmp}


def get(client: TestClient, path: str, bearer: str | None, **kwargs):
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    return client.get(path, headers=headers, **kwargs)


def assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"], error


# --- OIDC/JWT bearer tokens --------------------------------------------------------------------

def test_valid_rs256_and_es256_tokens_sign_in_with_mapped_groups_and_roles(env):
    client = env["client"]
    assert get(client, "/v1/models", token()).status_code == 200
    assert get(client, "/v1/models", token(EC_KEY, "ES256", "ec-1")).status_code == 200
    assert get(client, "/v1/conversations", token()).json() == {"data": []}
    assert_error(get(client, "/v1/keys", token()), 403, "forbidden")  # groups hr, staff: a user
    assert get(client, "/v1/keys", token(groups=["admins"])).status_code == 200  # the configured admin group
    # A service token is pinned to the knowledge base its claim names, and only chats and searches.
    bot = token(sub="helpdesk", groups="bots", enclave_kb="faq")
    assert get(client, "/v1/models", bot).status_code == 200
    assert_error(get(client, "/v1/conversations", bot), 403, "forbidden")
    assert_error(get(client, "/v1/models", token(sub="helpdesk", groups="bots")), 401, "invalid_token")


@pytest.mark.parametrize("case", [
    "wrong audience", "wrong issuer", "expired", "not yet valid", "issued in the future", "bad signature",
    "unknown kid", "no exp", "alg none", "hs256 with the public key", "hs256 with the jwk modulus",
    "rs256 header on the ec key", "garbage",
])
def test_bad_tokens_are_refused_with_401_in_openai_format(env, case):
    now = int(time.time())
    public_pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    bad = {
        "wrong audience": lambda: token(aud="someone-else"),
        "wrong issuer": lambda: token(iss="https://evil.example.test"),
        "expired": lambda: token(exp=now - 120, iat=now - 600, nbf=now - 600),  # beyond the 30 s leeway
        "not yet valid": lambda: token(nbf=now + 600),
        "issued in the future": lambda: token(iat=now + 600),
        "bad signature": lambda: token(OTHER_RSA),  # right kid, another key
        "unknown kid": lambda: token(kid="rsa-2"),
        "no exp": lambda: token(exp=None),
        "alg none": lambda: forged("none", None),
        "hs256 with the public key": lambda: forged("HS256", public_pem),
        "hs256 with the jwk modulus": lambda: forged("HS256", _jwks()["keys"][0]["n"].encode()),
        "rs256 header on the ec key": lambda: token(OTHER_RSA, kid="ec-1"),
        "garbage": lambda: "not-a-jwt",
    }[case]()
    response = get(env["client"], "/v1/models", bad)
    assert_error(response, 401, "invalid_token")
    assert response.json()["error"]["type"] == "authentication_error"
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert bad not in response.text


def test_clock_skew_within_the_leeway_is_accepted(env):
    now = int(time.time())
    assert get(env["client"], "/v1/models", token(exp=now - 10, iat=now - 300, nbf=now + 10)).status_code == 200


def test_api_keys_keep_working_and_jwts_need_oidc(env, tmp_path: Path):
    client = env["client"]
    assert get(client, "/v1/models", env["keys"]["user"]).status_code == 200
    assert_error(get(client, "/v1/models", env["keys"]["user"][:-2] + "xx"), 401, "invalid_api_key")
    assert_error(get(client, "/v1/models", None), 401, "missing_api_key")
    container, plain = make(tmp_path)  # no issuer configured: a valid JWT is still no credential
    assert_error(get(plain, "/v1/models", token()), 401, "invalid_token")
    assert get(plain, "/v1/models", container.api_keys.create("u", "user")[0]).status_code == 200


def test_groups_claim_shapes_and_dotted_paths(jwks_file: Path):
    def validator(**kw):
        return OidcValidator(OidcConfig(issuer=ISSUER, audience=AUDIENCE, jwks_file=jwks_file, **kw))

    assert validator().validate(token(groups="hr  staff,finance")).groups == ("finance", "hr", "staff")
    keycloak = validator(groups_claim="realm_access.roles", admin_groups=("enclave-admin",))
    who = keycloak.validate(token(groups=None, realm_access={"roles": ["enclave-admin", "hr"]}))
    assert (who.subject, who.role, who.groups) == ("oidc:alice", "admin", ("enclave-admin", "hr"))
    assert validator().validate(token(groups=None)).groups == ()
    with pytest.raises(TokenError, match="neither a list nor a string"):
        validator().validate(token(groups={"hr": True}))
    with pytest.raises(ValueError, match="asymmetric"):
        validator(algorithms=("HS256",))
    with pytest.raises(ValueError, match="asymmetric"):
        validator(algorithms=("none",))
    with pytest.raises(TokenError, match="not accepted"):  # pinned to ES256: an RS256 token is refused
        validator(algorithms=("ES256",)).validate(token())
    with pytest.raises(ValueError, match="JWKS file"):
        OidcValidator(OidcConfig(issuer=ISSUER, audience=AUDIENCE, jwks_file=jwks_file.with_name("missing.json")))


def test_settings_refuse_unsafe_oidc_configuration(jwks_file: Path):
    with pytest.raises(ValueError, match="never 'none' or HS"):
        Settings(security={"oidc": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(jwks_file),
                                    "algorithms": ["HS256"]}})
    with pytest.raises(ValueError, match="audience is required"):
        Settings(security={"oidc": {"issuer": ISSUER, "jwks_file": str(jwks_file)}})
    with pytest.raises(ValueError, match="must be https"):
        Settings(security={"oidc": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": "http://idp.example.test/certs"}})
    with pytest.raises(ValueError, match="exactly one of"):
        Settings(security={"oidc": {"issuer": ISSUER, "audience": AUDIENCE}})
    assert Settings(security={"oidc": {"issuer": ISSUER, "audience": AUDIENCE,
                                       "jwks_url": "https://idp.example.test/certs"}}).security.oidc.jwks_url


def test_jwks_from_a_url_is_fetched_and_cached(jwks_file: Path):
    fetched = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            fetched.append(self.path)
            body = jwks_file.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/certs"
        validator = OidcValidator(OidcConfig(issuer=ISSUER, audience=AUDIENCE, jwks_url=url))
        assert validator.validate(token()).subject == "oidc:alice"
        assert validator.validate(token(EC_KEY, "ES256", "ec-1")).subject == "oidc:alice"
        assert len(fetched) == 1  # the key set is cached
        with pytest.raises(TokenError):
            validator.validate(token(OTHER_RSA, kid="rsa-9"))
    finally:
        httpd.shutdown()
        thread.join()


# --- RBAC on every route -----------------------------------------------------------------------

# The table in docs/security.md. A new route fails this test until it is added here (and there).
ROUTE_ROLES = {
    ("GET", "/v1/models"): {"admin", "user", "service"},
    ("POST", "/v1/embeddings"): {"admin", "user"},
    ("POST", "/v1/search"): {"admin", "user", "service"},
    ("POST", "/v1/chat/completions"): {"admin", "user", "service"},
    ("GET", "/v1/conversations"): {"admin", "user"},
    ("GET", "/v1/conversations/{conversation_id}"): {"admin", "user"},
    ("POST", "/v1/feedback"): {"admin", "user"},
    ("GET", "/v1/knowledge_bases"): {"admin", "user"},
    ("POST", "/v1/knowledge_bases"): {"admin"},
    ("DELETE", "/v1/knowledge_bases/{name}"): {"admin"},
    ("GET", "/v1/knowledge_bases/{name}/documents"): {"admin"},
    ("POST", "/v1/knowledge_bases/{name}/documents"): {"admin"},
    ("DELETE", "/v1/knowledge_bases/{name}/documents/{document_id}"): {"admin"},
    ("GET", "/v1/ingest/runs"): {"admin"},
    ("GET", "/v1/keys"): {"admin"},
    ("POST", "/v1/keys"): {"admin"},
    ("DELETE", "/v1/keys/{key_id}"): {"admin"},
    ("GET", "/v1/admin/audit/status"): {"admin"},
}
PUBLIC = {"/healthz", "/readyz", "/", "/admin", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/static"}
# Outside /v1 with an authorisation of its own (metrics token or an admin key): checked live below.
OWN_AUTH = {"/metrics"}


def _roles(dependant) -> set[str] | None:
    for dep in dependant.dependencies:
        if hasattr(dep.call, "roles"):
            return set(dep.call.roles)
        found = _roles(dep)
        if found is not None:
            return found
    return None


def _flat_routes(app) -> list:
    """Every route, those of included routers too (FastAPI >= 0.16x keeps those behind a wrapper)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: app.routes is already flat
        return list(app.routes)
    return [context.route for context in iter_route_contexts(app.routes)]


def test_every_v1_route_requires_an_explicit_role_set(env):
    app = env["client"].app
    seen = {}
    for route in _flat_routes(app):
        path = getattr(route, "path", "")
        if not path.startswith("/v1"):
            assert path in PUBLIC | OWN_AUTH, f"{path} is neither a /v1 route nor a known public page"
            continue
        assert isinstance(route, APIRoute), path
        roles = _roles(route.dependant)
        assert roles is not None, f"{route.methods} {path} has no authentication dependency"
        for method in route.methods:
            seen[(method, path)] = roles
    assert seen == ROUTE_ROLES
    client = env["client"]
    for path in OWN_AUTH:
        assert get(client, path, None).status_code == 401
        assert_error(get(client, path, env["keys"]["user"]), 403, "forbidden")
        assert get(client, path, env["keys"]["admin"]).status_code == 200


def _call(client: TestClient, method: str, path: str, bearer: str):
    concrete = path.replace("{conversation_id}", "c1").replace("{name}", "faq").replace("{document_id}", "1") \
                   .replace("{key_id}", "k1")
    return client.request(method, concrete, headers={"Authorization": f"Bearer {bearer}"}, json={})


@pytest.mark.parametrize("who", ["user", "service"])
def test_roles_outside_the_table_get_403_on_the_live_app(env, who):
    refused = [(m, p) for (m, p), roles in ROUTE_ROLES.items() if who not in roles]
    assert refused
    for method, path in refused:
        assert_error(_call(env["client"], method, path, env["keys"][who]), 403, "forbidden")


def test_service_accounts_stay_in_their_knowledge_base(env, tmp_path: Path):
    bot = {"Authorization": f"Bearer {env['keys']['service']}"}
    ask = {"messages": [{"role": "user", "content": "hi"}]}
    client = env["client"]
    assert_error(client.post("/v1/chat/completions", headers=bot, json={**ask, "knowledge_base": "other"}), 403, "forbidden")
    assert_error(client.post("/v1/chat/completions", headers=bot, json={**ask, "knowledge_base": "faq", "rag": False}),
                 403, "forbidden")
    assert_error(client.post("/v1/search", headers=bot, json={"query": "x", "knowledge_base": "default"}), 403, "forbidden")
    from security.api_keys import ApiKeyError

    with pytest.raises(ApiKeyError, match="one knowledge base"):
        env["container"].api_keys.create("unpinned", "service")


# --- rate limits -------------------------------------------------------------------------------

def test_per_principal_rate_limit_answers_429_with_retry_after(tmp_path: Path):
    container, client = make(tmp_path, rate_limit_per_minute=6, rate_limit_burst=3)
    first, second = container.api_keys.create("a", "user")[0], container.api_keys.create("b", "user")[0]
    assert [get(client, "/v1/models", first).status_code for _ in range(3)] == [200, 200, 200]
    limited = get(client, "/v1/models", first)
    assert_error(limited, 429, "rate_limit_exceeded")
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(limited.headers["retry-after"]) <= 30  # burst 3 of 6/min: a 30 s window
    assert get(client, "/v1/models", second).status_code == 200  # limits are per key


def test_rate_limiter_minute_window_and_burst():
    limiter = RateLimiter(4, None)
    assert [limiter.hit("k") for _ in range(4)] == [None] * 4
    wait = limiter.hit("k")
    assert wait is not None and 1 <= wait <= 60
    assert limiter.hit("other") is None
    burst = RateLimiter(600, 5)  # 10 per second, at most 5 at once
    assert [burst.hit("k") is None for _ in range(6)] == [True] * 5 + [False]


def test_failed_sign_ins_are_limited_per_key_and_per_address_without_locking_out_neighbours(tmp_path: Path):
    """Behind one proxy everyone shares an address: an attacker there must not lock out the others'
    valid keys, while brute force on one key is still throttled (even a right guess gets 429)."""
    container, _ = make(tmp_path, auth_failures_per_minute=3, auth_failures_per_address_per_minute=8)
    alice, bob, carol = (container.api_keys.create(n, "user")[0] for n in ("alice", "bob", "carol"))
    app = create_app(container)
    proxy = TestClient(app, client=("127.0.0.2", 1))  # the attacker and alice, bob, carol behind one proxy
    elsewhere = TestClient(app, client=("127.0.0.3", 1))
    assert get(proxy, "/v1/models", alice).status_code == 200  # alice's key is in use from the proxy

    def random_key() -> str:
        return f"enc_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"

    for _ in range(3):  # other keys' failures from the same address
        assert_error(get(proxy, "/v1/models", random_key()), 401, "invalid_api_key")
        assert_error(get(proxy, "/v1/models", "not-a-key"), 401, "invalid_token")
    for key in (alice, bob, carol):
        assert get(proxy, "/v1/models", key).status_code == 200

    carol_id = carol.split("_")[1]
    for _ in range(3):  # brute force on carol's key
        assert_error(get(proxy, "/v1/models", f"enc_{carol_id}_{secrets.token_urlsafe(32)}"), 401, "invalid_api_key")
    assert_error(get(proxy, "/v1/models", carol), 429, "rate_limit_exceeded")  # throttled, right guess included
    assert_error(get(elsewhere, "/v1/models", carol), 429, "rate_limit_exceeded")  # from anywhere
    assert get(proxy, "/v1/models", alice).status_code == 200 and get(proxy, "/v1/models", bob).status_code == 200

    for _ in range(8):  # now the address is clearly abusive
        get(proxy, "/v1/models", random_key())
    assert_error(get(proxy, "/v1/models", random_key()), 429, "rate_limit_exceeded")
    assert get(proxy, "/v1/models", alice).status_code == 200  # keys that signed in from it keep working
    assert get(proxy, "/v1/models", bob).status_code == 200
    dave = container.api_keys.create("dave", "user")[0]
    response = get(proxy, "/v1/models", dave)  # never signed in from there: waits like the attacker
    assert_error(response, 429, "rate_limit_exceeded")
    assert "address" in response.json()["error"]["message"] and response.headers["retry-after"]
    assert get(elsewhere, "/v1/models", dave).status_code == 200


def test_an_untrusted_proxy_sending_forwarded_for_is_warned_about_once(tmp_path: Path, caplog):
    settings = Settings(data_dir=tmp_path / "var", server={"ip_allowlist": [], "trusted_proxies": ["10.0.0.1"]})
    app = create_app(Container(settings))
    with caplog.at_level("WARNING", logger="enclave.security"):
        for _ in range(3):
            assert _from(app, "10.0.0.9", "203.0.113.7").status_code == 200  # a proxy nobody listed
        assert _from(app, "10.0.0.1", "203.0.113.7").status_code == 200  # the trusted one
        assert _from(app, "10.0.0.10").status_code == 200  # no X-Forwarded-For
        assert _from(app, "8.8.4.4", "198.51.100.1").status_code == 200  # a public address: not a proxy of ours
    warnings = [r.getMessage() for r in caplog.records if "trusted_proxies" in r.getMessage()]
    assert len(warnings) == 1 and "10.0.0.9" in warnings[0], warnings


# --- IP allowlist and X-Forwarded-For ----------------------------------------------------------

def _from(app, host: str, xff: str | None = None):
    headers = {"X-Forwarded-For": xff} if xff else {}
    return TestClient(app, client=(host, 1)).get("/healthz", headers=headers)


def test_default_allowlist_admits_loopback_only(tmp_path: Path):
    app = create_app(Container(Settings(data_dir=tmp_path / "var")))
    assert _from(app, "127.0.0.1").status_code == 200
    assert _from(app, "::1").status_code == 200
    assert_error(_from(app, "10.1.2.3"), 403, "ip_not_allowed")
    assert_error(_from(app, "10.1.2.3", xff="127.0.0.1"), 403, "ip_not_allowed")  # no trusted proxy: XFF ignored


def test_forwarded_for_is_believed_from_trusted_proxies_only(tmp_path: Path):
    settings = Settings(data_dir=tmp_path / "var", server={"ip_allowlist": ["192.168.0.0/16"],
                                                           "trusted_proxies": ["10.0.0.1", "10.9.0.0/16"]})
    app = create_app(Container(settings))
    assert _from(app, "10.0.0.1", "192.168.1.5").status_code == 200
    assert _from(app, "10.0.0.1", "1.2.3.4, 192.168.1.5").status_code == 200  # client-written entries ignored
    assert _from(app, "10.0.0.1", "1.2.3.4, 192.168.1.5, 10.9.3.3").status_code == 200  # two proxies
    assert_error(_from(app, "10.0.0.1", "192.168.1.5, 1.2.3.4"), 403, "ip_not_allowed")  # a spoofed left entry
    assert_error(_from(app, "10.0.0.1", "not-an-ip"), 403, "ip_not_allowed")
    assert_error(_from(app, "1.2.3.4", "192.168.1.5"), 403, "ip_not_allowed")  # untrusted peer: XFF ignored
    assert_error(_from(app, "10.0.0.1"), 403, "ip_not_allowed")  # the proxy itself is not in the allowlist
    with pytest.raises(ValueError, match="not an IP address or CIDR"):
        Settings(server={"ip_allowlist": ["everyone"]})


# --- request body cap --------------------------------------------------------------------------

def test_one_file_size_limit_for_uploads_and_ingest(env, tmp_path: Path, models_dir: Path):
    """Uploads follow ingest.max_file_mb (the limit `ingest run` applies), not the JSON body cap and
    not a constant of their own; the body cap of other routes stays server.max_body_mb."""
    container = Container(Settings(data_dir=tmp_path / "var", models_dir=models_dir, server={"max_body_mb": 0.01},
                                   ingest={"max_file_mb": 0.05}))
    client = TestClient(create_app(container), client=("127.0.0.1", 1))
    admin = {"Authorization": f"Bearer {container.api_keys.create('a', 'admin')[0]}"}
    fits = ("Parking is in bay C. " * 1200).encode()  # 25 KiB: over the body cap, under the file limit
    ok = client.post("/v1/knowledge_bases/default/documents", headers=admin, files={"file": ("p.txt", fits)})
    assert ok.status_code == 201, ok.text
    too_big = client.post("/v1/knowledge_bases/default/documents", headers=admin,
                          files={"file": ("q.txt", b"x" * 60_000)})
    assert_error(too_big, 413, "file_too_large")
    assert "ingest.max_file_mb" in too_big.json()["error"]["message"]


def test_body_cap_holds_with_and_without_content_length(env, tmp_path: Path):
    container = Container(Settings(data_dir=tmp_path / "var", server={"max_body_mb": 0.01}))  # 10 KiB
    client = TestClient(create_app(container), client=("127.0.0.1", 1))
    key = {"Authorization": f"Bearer {container.api_keys.create('u', 'user')[0]}",
           "Content-Type": "application/json"}
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 20_000}]}).encode()
    assert_error(client.post("/v1/chat/completions", headers=key, content=big), 413, "body_too_large")

    def chunks():
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    response = client.post("/v1/chat/completions", headers=key, content=chunks())
    assert_error(response, 413, "body_too_large")
    small = client.post("/v1/chat/completions", headers=key, content=iter([b'{"messages": []}']))
    assert_error(small, 400, "invalid_request")  # a small chunked body goes through to validation
