"""Handshake authentication: bad tokens get HTTP 401 before the upgrade, touch no Redis key, and never
reach a log line; good tokens (query string, Bearer header, RS256) connect."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.warnings import InsecureKeyLengthWarning
from redis.asyncio import Redis
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from hub.app import App
from hub.logs import RedactingFilter, redact
from tests.conftest import SECRET, NodeFactory, url_of
from tests.helpers import connect, mint

AUDIENCE = "hub"
# The test's own WebSocket client logs its request line (token included) at DEBUG; that is the test
# harness, not the hub, so it gets a logger that stays quiet while every other logger is at DEBUG.
CLIENT_LOG = logging.getLogger("tests.auth.client")
CLIENT_LOG.setLevel(logging.WARNING)


# ---------------------------------------------------------------------- token makers


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def hand_made(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """A JWT built without pyjwt (which refuses to make hostile ones): HS256 over ``hmac_key``, or an
    empty signature when it is None."""
    signing_input = f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(payload))}"
    signature = b""
    if hmac_key is not None:
        signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "1", "iat": now, "exp": now + 3600, **extra}


def tampered() -> str:
    """A valid token whose payload was swapped for one claiming admin; the signature no longer fits."""
    header, _payload, signature = mint("1").split(".")
    return f"{header}.{b64url(orjson.dumps(claims(roles=['admin'])))}.{signature}"


def other_hmac_algorithm() -> str:
    """HS512 with the right secret: the key is right, the algorithm is not the pinned one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)  # the test secret is short for HS512
        return mint("1", algorithm="HS512")


def without(*names: str) -> dict[str, Any]:
    values = claims()
    for name in names:
        values.pop(name)
    return values


# name -> a maker of a token the default node (HS256, no audience) must refuse; None means no token.
BAD_TOKENS: dict[str, Callable[[], str | None]] = {
    "missing": lambda: None,
    "empty": lambda: "",
    "garbage": lambda: "not-a-jwt",
    "garbage_jwt_shaped": lambda: "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.AAAA",
    "expired": lambda: mint("1", ttl_s=-60),
    "alg_none": lambda: hand_made({"alg": "none", "typ": "JWT"}, claims(), None),
    "alg_none_capitalised": lambda: hand_made({"alg": "None", "typ": "JWT"}, claims(), None),
    "wrong_key": lambda: mint("1", secret="another-secret-0123456789abcdef0123456789"),
    "other_hmac_algorithm": other_hmac_algorithm,
    "tampered_payload": tampered,
    "missing_exp": lambda: jwt.encode(without("exp"), SECRET, algorithm="HS256"),
    "missing_sub": lambda: jwt.encode(without("sub"), SECRET, algorithm="HS256"),
    "sub_with_space": lambda: mint("a b"),
    "sub_with_newline": lambda: mint("a\nb"),
    "sub_200_chars": lambda: mint("a" * 200),
    "sub_empty": lambda: mint(""),
    "sub_not_string": lambda: jwt.encode(claims(sub=42), SECRET, algorithm="HS256"),
    "roles_not_a_list": lambda: mint("1", roles={"admin": True}),  # type: ignore[arg-type]
}

# Tokens a node configured with auth.audience=hub must refuse.
BAD_AUDIENCE_TOKENS: dict[str, Callable[[], str | None]] = {
    "wrong_audience": lambda: mint("1", aud="other"),
    "audience_list_without_hub": lambda: mint("1", aud=["other", "hubx"]),
    "missing_audience": lambda: mint("1"),
}


async def refused(base_url: str, token: str | None, **kwargs: Any) -> dict[str, Any]:
    """Attempt a connection that must be refused with HTTP 401 before the upgrade; returns the body."""
    query = "" if token is None else f"?token={token}"
    with pytest.raises(InvalidStatus) as info:
        async with ws_connect(f"{base_url}/ws/connect{query}", open_timeout=10, logger=CLIENT_LOG, **kwargs):
            pass
    response = info.value.response
    assert response.status_code == 401, response
    body = orjson.loads(response.body)
    assert body["status"] == "error" and body["error"]["code"] == "unauthorized", body
    if token:
        assert token.encode() not in response.body
    return body


async def audience_node(nodes: NodeFactory) -> App:
    return await nodes.start(**{"auth.audience": AUDIENCE})


# ---------------------------------------------------------------------- refusals


@pytest.mark.parametrize("case", list(BAD_TOKENS))
async def test_bad_token_gets_401(node: App, case: str) -> None:
    """Each missing, malformed, expired, unsigned, mis-signed or badly-claimed token gets HTTP 401."""
    await refused(url_of(node), BAD_TOKENS[case]())
    assert node.node is not None and not node.node.registry.sessions


@pytest.mark.parametrize("case", list(BAD_AUDIENCE_TOKENS))
async def test_audience_is_enforced_when_configured(nodes: NodeFactory, case: str) -> None:
    """With auth.audience set, a token for another audience or for none gets HTTP 401."""
    app = await audience_node(nodes)
    await refused(url_of(app), BAD_AUDIENCE_TOKENS[case]())


async def test_token_for_configured_audience_connects(nodes: NodeFactory) -> None:
    """With auth.audience set, a token whose aud is that audience connects."""
    app = await audience_node(nodes)
    client = await connect(url_of(app), "1", token=mint("1", aud=AUDIENCE), logger=CLIENT_LOG)
    assert client.established["user_id"] == "1"
    await client.close()


async def test_oversized_token_refused_before_upgrade(node: App) -> None:
    """A token too large for a request line or header is refused before the upgrade, opening no session."""
    huge = mint("1", padding="x" * 9000)
    base = f"{url_of(node)}/ws/connect"
    for kwargs, url in (({}, f"{base}?token={huge}"),
                        ({"additional_headers": {"Authorization": f"Bearer {huge}"}}, base)):
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(url, open_timeout=10, logger=CLIENT_LOG, **kwargs):
                pass
        assert info.value.response.status_code in (401, 414, 431)
    assert node.node is not None and not node.node.registry.sessions


async def test_bad_bearer_header_gets_401(node: App) -> None:
    """A bad token in the Authorization header is refused like one in the query string."""
    await refused(url_of(node), None, additional_headers={"Authorization": "Bearer not-a-jwt"})
    await refused(url_of(node), None,
                  additional_headers={"Authorization": f"Bearer {mint('1', ttl_s=-60)}"})


async def test_refused_handshakes_write_nothing_to_redis(nodes: NodeFactory, redis_client: Redis,
                                                         prefix: str) -> None:
    """After every kind of refused handshake, the only keys under the prefix are the nodes' registrations and
    the audit stream."""
    plain = await nodes.start()
    strict = await audience_node(nodes)
    for make in BAD_TOKENS.values():
        await refused(url_of(plain), make())
    for make in BAD_AUDIENCE_TOKENS.values():
        await refused(url_of(strict), make())
    await refused(url_of(plain), None, additional_headers={"Authorization": "Bearer not-a-jwt"})
    for app in (plain, strict):
        assert app.audit is not None
        await app.audit.flush()

    found = {key.decode() async for key in redis_client.scan_iter(match=f"{prefix}*", count=1000)}
    expected = {plain.keys.nodes(), plain.keys.node(plain.node_id), strict.keys.node(strict.node_id),
                plain.keys.audit()}
    assert found == expected


async def test_no_token_in_logs(nodes: NodeFactory, caplog: pytest.LogCaptureFixture) -> None:
    """With every logger at DEBUG, neither refused nor accepted tokens appear in any log record."""
    caplog.set_level(logging.DEBUG)
    for name in ("websockets", "websockets.server", "hub"):
        caplog.set_level(logging.DEBUG, logger=name)
    plain = await nodes.start()
    strict = await audience_node(nodes)
    secrets_seen: list[str] = []
    for make in BAD_TOKENS.values():
        token = make()
        if token:
            secrets_seen.append(token)
        await refused(url_of(plain), token)
    for make in BAD_AUDIENCE_TOKENS.values():
        token = make()
        assert token is not None
        secrets_seen.append(token)
        await refused(url_of(strict), token)

    good = mint("7", roles=["customer"])
    secrets_seen.append(good)
    client = await connect(url_of(plain), "7", token=good, logger=CLIENT_LOG)
    await client.join("channel_general")
    await client.close()

    bearer = mint("8")
    secrets_seen.append(bearer)
    async with ws_connect(f"{url_of(plain)}/ws/connect", open_timeout=10, logger=CLIENT_LOG,
                          additional_headers={"Authorization": f"Bearer {bearer}"}) as ws:
        assert orjson.loads(await ws.recv())["type"] == "connection_established"

    assert caplog.records, "nothing was logged; the capture is not working"
    leaks = [f"{record.name}: {record.getMessage()[:60]}" for record in caplog.records
             if any(token in record.getMessage() for token in secrets_seen)]
    assert leaks == [], f"{len(leaks)} log records carry a token: {leaks[:3]}"


# ---------------------------------------------------------------------- redaction helpers


def test_redact_query_parameter() -> None:
    """redact() replaces the value of a token= query parameter and keeps the rest of the line."""
    assert (redact("GET /ws/connect?token=abc.def.ghi&client_type=web HTTP/1.1")
            == "GET /ws/connect?token=[redacted]&client_type=web HTTP/1.1")
    assert (redact("GET /ws/connect?client_type=web&TOKEN=xyz")
            == "GET /ws/connect?client_type=web&TOKEN=[redacted]")


def test_redact_bearer_header() -> None:
    """redact() replaces the credential after 'Bearer', whatever its case."""
    assert redact("< Authorization: Bearer abc.def-ghi_jkl") == "< Authorization: Bearer [redacted]"
    assert redact("authorization: bearer s3cr3t/+=") == "authorization: bearer [redacted]"


def test_redact_bare_jwt() -> None:
    """redact() removes a JWT wherever it appears in free text."""
    token = mint("1", roles=["admin"])
    cleaned = redact(f"could not verify {token} for user 1")
    assert token not in cleaned
    assert cleaned == "could not verify [redacted-jwt] for user 1"


def test_redact_leaves_ordinary_text_alone() -> None:
    """redact() returns text without anything token-shaped unchanged."""
    text = "node n1 listening on 127.0.0.1:8000; room order_12 joined by user 5 (tokens: 3)"
    assert redact(text) == text


def test_redacting_filter_rewrites_records() -> None:
    """RedactingFilter keeps every record but rewrites a token-bearing message, merging its args."""
    token = mint("1")
    record = logging.LogRecord("websockets.server", logging.DEBUG, __file__, 1, "< %s %s %s",
                               ("GET", f"/ws/connect?token={token}", "HTTP/1.1"), None)
    assert RedactingFilter().filter(record) is True
    assert token not in record.getMessage()
    assert record.getMessage() == "< GET /ws/connect?token=[redacted] HTTP/1.1"
    assert record.args is None

    plain = logging.LogRecord("hub.node", logging.INFO, __file__, 1, "user %s joined %s", ("5", "order_1"),
                              None)
    assert RedactingFilter().filter(plain) is True
    assert plain.msg == "user %s joined %s" and plain.args == ("5", "order_1")


def test_redacting_filter_on_a_logger_protects_every_handler(caplog: pytest.LogCaptureFixture) -> None:
    """Attached to a logger, RedactingFilter cleans the record before any handler (here caplog's) sees it."""
    logger = logging.getLogger("tests.auth.redacted")
    filt = RedactingFilter()
    logger.addFilter(filt)
    try:
        token = mint("1")
        with caplog.at_level(logging.DEBUG, logger=logger.name):
            logger.debug("Authorization: Bearer %s", token)
        assert [r.getMessage() for r in caplog.records] == ["Authorization: Bearer [redacted]"]
    finally:
        logger.removeFilter(filt)


# ---------------------------------------------------------------------- accepted tokens


async def test_bearer_header_connects(node: App) -> None:
    """A valid token in an Authorization: Bearer header (no query string) connects as its subject."""
    token = mint("77", roles=["customer"])
    async with ws_connect(f"{url_of(node)}/ws/connect", open_timeout=10, logger=CLIENT_LOG,
                          additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        first = orjson.loads(await ws.recv())
        assert first["type"] == "connection_established" and first["user_id"] == "77"


async def test_connection_established_is_first_frame(node: App) -> None:
    """The first frame is connection_established with connection id, user id, server time and heartbeat."""
    before = datetime.now(UTC)
    one = await connect(url_of(node), "42", logger=CLIENT_LOG)
    two = await connect(url_of(node), "42", logger=CLIENT_LOG)
    after = datetime.now(UTC)
    frame = one.established
    assert frame["type"] == "connection_established"
    assert isinstance(frame["connection_id"], str) and frame["connection_id"]
    assert frame["connection_id"] != two.established["connection_id"]
    assert frame["user_id"] == "42"
    assert frame["server_time"].endswith("Z")
    server_time = datetime.fromisoformat(frame["server_time"])
    assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= server_time <= after
    assert frame["heartbeat_s"] == node.config.server.ping_interval_s
    await one.close()
    await two.close()


# ---------------------------------------------------------------------- RS256


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[bytes, bytes]:
    """A fresh RSA key pair: (private PEM, public PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return private_pem, public_pem


async def rs256_node(nodes: NodeFactory, public_pem: bytes, tmp_path: Path) -> App:
    path = tmp_path / "jwt-public.pem"
    path.write_bytes(public_pem)
    return await nodes.start(**{"auth.algorithm": "RS256", "auth.public_key_file": str(path)})


async def test_rs256_token_connects(nodes: NodeFactory, rsa_keys: tuple[bytes, bytes],
                                    tmp_path: Path) -> None:
    """With auth.algorithm=RS256, a token signed with the private key connects as its subject."""
    private_pem, public_pem = rsa_keys
    app = await rs256_node(nodes, public_pem, tmp_path)
    token = jwt.encode(claims(sub="55"), private_pem, algorithm="RS256")
    client = await connect(url_of(app), "55", token=token, logger=CLIENT_LOG)
    assert client.established["user_id"] == "55"
    await client.join("channel_general")
    await client.close()


async def test_rs256_refuses_algorithm_confusion(nodes: NodeFactory, rsa_keys: tuple[bytes, bytes],
                                                 tmp_path: Path) -> None:
    """With RS256 pinned, an HS256 token keyed with the public key's PEM text gets HTTP 401."""
    _private_pem, public_pem = rsa_keys
    app = await rs256_node(nodes, public_pem, tmp_path)
    confused = hand_made({"alg": "HS256", "typ": "JWT"}, claims(roles=["admin"]), public_pem)
    await refused(url_of(app), confused)
    # The same with the PEM's trailing newline stripped, as some attack tools do.
    await refused(url_of(app), hand_made({"alg": "HS256", "typ": "JWT"}, claims(), public_pem.strip()))


async def test_rs256_refuses_other_keys_and_algorithms(nodes: NodeFactory, rsa_keys: tuple[bytes, bytes],
                                                       tmp_path: Path) -> None:
    """With RS256 pinned, tokens signed by another RSA key, with the HS secret, or unsigned get HTTP 401."""
    _private_pem, public_pem = rsa_keys
    app = await rs256_node(nodes, public_pem, tmp_path)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    await refused(url_of(app), jwt.encode(claims(), other, algorithm="RS256"))
    await refused(url_of(app), mint("1"))  # HS256 with the JWT_SECRET the environment still carries
    await refused(url_of(app), hand_made({"alg": "none", "typ": "JWT"}, claims(), None))
