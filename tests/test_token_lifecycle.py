"""Token lifecycle: expiry closes open connections (4502) unless a refresh moved the deadline, a
token_expiring warning comes first, revocation (by jti or by user) closes live sockets on every node
within a second and refuses the token afterwards, key rotation by kid, token type separation, and the
forged-token list of issue 5."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from redis.asyncio import Redis
from redis.exceptions import RedisError
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from cli.main import cli
from hub.app import App
from hub.auth import TokenVerifier, VerifiedToken
from hub.config import AuthConfig, load_config
from hub.errors import AuthError, CloseCode, ConfigError
from hub.keys import Keys
from hub.protocol import iso_ms
from hub.rooms import Principal
from hub.tokens import Revocation, RevocationStore
from tests.conftest import SECRET, NodeFactory, hub_env, url_of
from tests.helpers import Client, connect, mint

# The test's own WebSocket client logs request lines (tokens included) at DEBUG; keep it quiet.
CLIENT_LOG = logging.getLogger("tests.token_lifecycle.client")
CLIENT_LOG.setLevel(logging.WARNING)
K1_SECRET = "k1-secret-0123456789abcdef0123456789abcdef"
K2_SECRET = "k2-secret-0123456789abcdef0123456789abcdef"
AUDIENCE = "hub"
ISSUER = "https://issuer.test"


# ---------------------------------------------------------------------- helpers


@dataclass
class Closed:
    code: int | None
    reason: str
    at: float  # time.time() when the close was seen
    frames: list[dict[str, Any]]  # frames received before it


async def until_closed(client: Client, timeout_s: float = 6.0) -> Closed:
    """Read frames until the server closes the connection; fail after ``timeout_s``."""
    frames = list(client.backlog)
    async with asyncio.timeout(timeout_s):
        try:
            while True:
                frames.append(orjson.loads(await client.ws.recv()))
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            reason = exc.rcvd.reason if exc.rcvd is not None else ""
            return Closed(code, reason, time.time(), frames)


async def assert_alive(client: Client) -> None:
    await client.send({"type": "ping", "request_id": "alive"})
    await client.expect("pong", request_id="alive")


def short_token(user_id: str, exp: int, **claims: Any) -> str:
    return jwt.encode({"sub": user_id, "iat": int(time.time()), "exp": exp, **claims}, SECRET, algorithm="HS256")


async def hubctl(prefix: str, *args: str) -> Result:
    """Run hubctl in a thread (it calls asyncio.run) while this loop keeps serving the clients."""
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, cli, list(args), env={"HUB_CONFIG": None, **hub_env(prefix)})


async def refused_status(base_url: str, token: str) -> tuple[int, dict[str, Any] | None]:
    """Attempt a connection that must be refused before the upgrade: (HTTP status, JSON body or None)."""
    with pytest.raises(InvalidStatus) as info:
        async with ws_connect(f"{base_url}/ws/connect?token={token}", open_timeout=10, logger=CLIENT_LOG):
            pass
    response = info.value.response
    try:
        body = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        body = None
    assert token.encode() not in response.body
    return response.status_code, body


async def refused_401(base_url: str, token: str) -> str:
    status, body = await refused_status(base_url, token)
    assert status == 401 and body is not None, (status, body)
    message = body["error"]["message"]
    assert isinstance(message, str)
    return message


# ---------------------------------------------------------------------- expiry


async def test_expiry_closes_the_connection_at_exp(nodes: NodeFactory, redis_client: Redis) -> None:
    """A connection whose token expires 2 s ahead is closed with 4502 "token expired" at exp, not before,
    and a token_expired audit event names the user."""
    app = await nodes.start()
    exp = int(time.time()) + 2
    client = await connect(url_of(app), "7", token=short_token("7", exp), logger=CLIENT_LOG)
    closed = await until_closed(client)
    assert closed.code == CloseCode.TOKEN_EXPIRED == 4502 and closed.reason == "token expired"
    assert exp - 0.05 <= closed.at <= exp + 1.0
    assert app.audit is not None
    await app.audit.flush()
    events = [fields for _, fields in await redis_client.xrange(app.keys.audit())]
    assert any(f[b"event"] == b"token_expired" and f[b"who"] == b"7" for f in events), events


async def test_token_expiring_warning_arrives_before_exp(nodes: NodeFactory) -> None:
    """With auth.expiry_warning_s=1.5, token_expiring (expires_at, in_s) arrives about 1.5 s before exp,
    then the connection closes with 4502."""
    app = await nodes.start(**{"auth.expiry_warning_s": 1.5})
    exp = int(time.time()) + 3
    client = await connect(url_of(app), "7", token=short_token("7", exp), logger=CLIENT_LOG)
    warning = await client.expect("token_expiring", timeout_s=5)
    warned_at = time.time()
    assert warning["expires_at"] == iso_ms(exp * 1000)
    assert warning["in_s"] in (0, 1)
    assert exp - 1.5 - 0.05 <= warned_at < exp
    closed = await until_closed(client)
    assert closed.code == CloseCode.TOKEN_EXPIRED


async def test_refresh_moves_the_deadline(nodes: NodeFactory) -> None:
    """A refresh with a newer token for the same user gets token_refreshed with the new expiry, and the
    connection stays open past the old exp."""
    app = await nodes.start(**{"auth.expiry_warning_s": 1.0})
    old_exp = int(time.time()) + 2
    client = await connect(url_of(app), "7", token=short_token("7", old_exp), logger=CLIENT_LOG)
    new_exp = int(time.time()) + 3600
    await client.send({"type": "refresh", "token": short_token("7", new_exp), "request_id": "r1"})
    refreshed = await client.expect("token_refreshed", request_id="r1")
    assert refreshed["expires_at"] == iso_ms(new_exp * 1000)
    await asyncio.sleep(max(0.0, old_exp + 0.5 - time.time()))  # the old deadline passes
    await assert_alive(client)
    await client.close()


async def test_refresh_with_another_sub_is_refused_and_the_old_deadline_holds(nodes: NodeFactory) -> None:
    """A refresh with a token for another user, or an invalid one, gets error invalid_token and the
    connection still closes with 4502 at the original exp."""
    app = await nodes.start()
    exp = int(time.time()) + 2
    client = await connect(url_of(app), "7", token=short_token("7", exp), logger=CLIENT_LOG)
    await client.send({"type": "refresh", "token": mint("8"), "request_id": "other"})
    error = await client.expect("error", request_id="other")
    assert error["code"] == "invalid_token" and error["request_type"] == "refresh"
    assert "another user" in error["message"]
    await client.send({"type": "refresh", "token": "not-a-jwt", "request_id": "garbage"})
    assert (await client.expect("error", request_id="garbage"))["code"] == "invalid_token"
    await client.send({"type": "refresh", "request_id": "missing"})
    assert (await client.expect("error", request_id="missing"))["code"] == "invalid_frame"
    closed = await until_closed(client)
    assert closed.code == CloseCode.TOKEN_EXPIRED and closed.at >= exp - 0.05


async def test_revoked_refresh_token_is_refused(nodes: NodeFactory, redis_client: Redis) -> None:
    """A refresh with a token whose jti was revoked gets invalid_token "token revoked"; the connection
    keeps its current token."""
    app = await nodes.start()
    client = await connect(url_of(app), "7", token=mint("7", jti="first"), logger=CLIENT_LOG)
    await RevocationStore(redis_client, app.keys).revoke_token("second", 60)
    await client.send({"type": "refresh", "token": mint("7", jti="second"), "request_id": "r"})
    error = await client.expect("error", request_id="r")
    assert error["code"] == "invalid_token" and error["message"] == "token revoked"
    await assert_alive(client)
    await client.close()


# ---------------------------------------------------------------------- revocation


async def test_revoke_token_by_jti_closes_live_sockets_on_every_node(nodes: NodeFactory, prefix: str,
                                                                     redis_client: Redis) -> None:
    """hubctl revoke-token --jti closes the sockets using that token on two nodes with 4503 within a
    second, the same token then gets 401 "token revoked", and another token of the user still connects."""
    a, b = await nodes.start(), await nodes.start()
    token = mint("5", jti="jti-to-revoke")
    on_a = await connect(url_of(a), "5", token=token, logger=CLIENT_LOG)
    on_b = await connect(url_of(b), "5", token=token, logger=CLIENT_LOG)
    other = await connect(url_of(b), "5", token=mint("5", jti="jti-kept"), logger=CLIENT_LOG)
    watchers = [asyncio.ensure_future(until_closed(c)) for c in (on_a, on_b)]
    result = await hubctl(prefix, "revoke-token", "--jti", "jti-to-revoke")
    done_at = time.time()
    assert result.exit_code == 0, result.output
    assert "2 node(s)" in result.output
    for closed in await asyncio.gather(*watchers):
        assert closed.code == CloseCode.TOKEN_REVOKED == 4503 and closed.reason == "token revoked"
        assert closed.at - done_at < 1.0
    assert await refused_401(url_of(a), token) == "token revoked"
    assert await refused_401(url_of(b), token) == "token revoked"
    assert 0 < await redis_client.ttl(Keys(prefix).revoked_token("jti-to-revoke")) <= 7 * 86_400
    await assert_alive(other)
    await other.close()


async def test_revoke_token_by_user_closes_every_older_token(nodes: NodeFactory, prefix: str,
                                                             redis_client: Redis) -> None:
    """hubctl revoke-token --user closes that user's sockets on two nodes (4503) and refuses their older
    tokens; other users stay connected, and a token issued after the revocation connects."""
    a, b = await nodes.start(), await nodes.start()
    old_tokens = [mint("5", jti="x1"), mint("5")]  # with and without a jti: a user revocation covers both
    victims = [await connect(url_of(a), "5", token=old_tokens[0], logger=CLIENT_LOG),
               await connect(url_of(b), "5", token=old_tokens[1], logger=CLIENT_LOG)]
    bystander = await connect(url_of(b), "6", logger=CLIENT_LOG)
    watchers = [asyncio.ensure_future(until_closed(c)) for c in victims]
    result = await hubctl(prefix, "revoke-token", "--user", "5")
    done_at = time.time()
    assert result.exit_code == 0, result.output
    for closed in await asyncio.gather(*watchers):
        assert closed.code == CloseCode.TOKEN_REVOKED
        assert closed.at - done_at < 1.0
    for token in old_tokens:
        assert await refused_401(url_of(a), token) == "token revoked"
    await assert_alive(bystander)
    before_ms = int(await redis_client.get(Keys(prefix).revoked_user("5")) or 0)
    # iat has second precision: a token counts as newer from the second after the revocation.
    await asyncio.sleep(max(0.0, math.ceil(before_ms / 1000) - time.time()))
    fresh = await connect(url_of(a), "5", logger=CLIENT_LOG)
    await assert_alive(fresh)
    await fresh.close()
    await bystander.close()


async def test_revoke_token_refuses_bad_arguments(prefix: str) -> None:
    """revoke-token needs exactly one of --jti and --user, and a valid user id; nothing is written."""
    for args in ([], ["--jti", "a", "--user", "b"], ["--user", "bad id"], ["--jti", "has space"]):
        result = await hubctl(prefix, "revoke-token", *args)
        assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output


async def test_a_session_set_up_during_a_revocation_is_closed(nodes: NodeFactory, redis_client: Redis) -> None:
    """A revocation announced after a handshake's Redis check but before its session starts still
    closes that session: the node remembers recent announcements."""
    app = await nodes.start()
    assert app.guard is not None
    token = mint("5", jti="racing")
    app.guard.watch.on_control(Revocation(jti="racing").encode())  # as if heard mid-handshake
    async with ws_connect(f"{url_of(app)}/ws/connect?token={token}", open_timeout=10, logger=CLIENT_LOG) as ws:
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 5)
    assert info.value.rcvd is not None and info.value.rcvd.code == CloseCode.TOKEN_REVOKED


def test_revocation_matching_and_wire_format() -> None:
    """A jti revocation matches that token only; a user revocation matches the user's tokens issued
    before it (and those without iat); control messages round-trip and garbage decodes to None."""
    def token(user: str, jti: str | None, iat: float | None) -> VerifiedToken:
        return VerifiedToken(Principal(user, frozenset(), frozenset()), time.time() + 60, jti, iat)

    by_jti = Revocation(jti="a")
    assert by_jti.matches(token("1", "a", 10)) and not by_jti.matches(token("1", "b", 10))
    by_user = Revocation(user_id="1", before_ms=10_500)
    assert by_user.matches(token("1", None, 10)) and by_user.matches(token("1", "z", None))
    assert not by_user.matches(token("1", None, 11)) and not by_user.matches(token("2", None, 10))
    for revocation in (by_jti, by_user):
        assert Revocation.decode(revocation.encode()) == revocation
    for garbage in (b"", b"[]", b'{"op":"other"}', b'{"op":"revoke"}', b'{"op":"revoke","user":"1","before_ms":"x"}'):
        assert Revocation.decode(garbage) is None


async def test_revocation_check_fails_open_or_closed_as_configured() -> None:
    """With Redis unreachable the revocation check admits the token (fail open) or raises (fail closed)."""
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    try:
        verified = VerifiedToken(Principal("1", frozenset(), frozenset()), time.time() + 60, "j", time.time())
        assert await RevocationStore(dead, Keys(), fail_open=True).is_revoked(verified) is False
        with pytest.raises(RedisError):
            await RevocationStore(dead, Keys(), fail_open=False).is_revoked(verified)
    finally:
        await dead.aclose()


# ---------------------------------------------------------------------- key rotation and token type


def kid_token(kid: str | None, secret: str, user_id: str = "1", **claims: Any) -> str:
    now = int(time.time())
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode({"sub": user_id, "iat": now, "exp": now + 3600, **claims}, secret, algorithm="HS256",
                      headers=headers)


async def test_kid_selects_the_key(nodes: NodeFactory) -> None:
    """With auth.keys k1 and k2, tokens with kid k1 and k2 connect, a token without kid uses auth.secret,
    an unknown kid gets 401 "unknown key id", and a kid naming the wrong key gets 401."""
    app = await nodes.start(**{"auth.keys": f"k1:{K1_SECRET},k2:{K2_SECRET}"})
    for kid, secret in (("k1", K1_SECRET), ("k2", K2_SECRET), (None, SECRET)):
        client = await connect(url_of(app), "1", token=kid_token(kid, secret), logger=CLIENT_LOG)
        await client.close()
    assert await refused_401(url_of(app), kid_token("k3", K1_SECRET)) == "unknown key id"
    assert await refused_401(url_of(app), kid_token("k1", K2_SECRET)) == "token signature invalid"


def test_key_ring_config_errors_name_the_key_and_hide_the_secret(tmp_path: Path) -> None:
    """Malformed, duplicate, short or missing-file auth.keys entries fail naming auth.keys (and the kid),
    never echoing a secret; a ring alone (no JWT_SECRET) is enough for HS256."""
    cases = [
        ({"HUB_AUTH_KEYS": "no-colon-here"}, "entry 1"),
        ({"HUB_AUTH_KEYS": f"k1:{K1_SECRET},k1:{K2_SECRET}"}, "'k1' appears twice"),
        ({"HUB_AUTH_KEYS": "k1:short-secret"}, "'k1'"),
        ({"HUB_AUTH_KEYS": "bad kid!:x" + "y" * 40}, "entry 1"),
        ({"HUB_AUTH_KEYS": f"k1:{tmp_path / 'missing.pem'}", "JWT_ALGORITHM": "RS256"}, "'k1'"),
    ]
    for environ, needle in cases:
        with pytest.raises(ConfigError) as info:
            load_config(None, {"JWT_SECRET": SECRET, **environ})
        assert "auth.keys" in info.value.message and needle in info.value.message, info.value.message
        assert K1_SECRET not in info.value.message and "short-secret" not in info.value.message
    config = load_config(None, {"HUB_AUTH_KEYS": f"k1:{K1_SECRET}"})
    verifier = TokenVerifier(config.auth)
    assert verifier.verify(kid_token("k1", K1_SECRET)).principal.user_id == "1"
    with pytest.raises(AuthError, match="kid"):
        verifier.verify(kid_token(None, K1_SECRET))


def test_token_type_accepts_token_use_or_typ() -> None:
    """With auth.token_type=access, token_use "access" or (without token_use) typ "Access"/"application/access"
    pass; another token_use, another typ, or neither is refused."""
    verifier = TokenVerifier(AuthConfig(secret=SECRET, token_type="access"))
    now = int(time.time())
    claims = {"sub": "1", "iat": now, "exp": now + 60}
    good = [jwt.encode({**claims, "token_use": "access"}, SECRET, algorithm="HS256"),
            jwt.encode(claims, SECRET, algorithm="HS256", headers={"typ": "Access"}),
            jwt.encode(claims, SECRET, algorithm="HS256", headers={"typ": "application/access"})]
    bad = [jwt.encode({**claims, "token_use": "refresh"}, SECRET, algorithm="HS256"),
           jwt.encode({**claims, "token_use": "refresh"}, SECRET, algorithm="HS256", headers={"typ": "access"}),
           jwt.encode(claims, SECRET, algorithm="HS256"),
           jwt.encode(claims, SECRET, algorithm="HS256", headers={"typ": "refresh+jwt"})]
    for token in good:
        assert verifier.verify(token).principal.user_id == "1"
    for token in bad:
        with pytest.raises(AuthError, match="token type not accepted"):
            verifier.verify(token)


# ---------------------------------------------------------------------- forged tokens (issue 5)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def forge(header: dict[str, Any], claims: dict[str, Any], hmac_key: bytes | None) -> str:
    """A JWT made by hand (pyjwt refuses to make hostile ones): HS256 over ``hmac_key``, or unsigned."""
    signing_input = f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(claims))}"
    signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest() if hmac_key else b""
    return f"{signing_input}.{b64url(signature)}"


def good_claims(**changes: Any) -> dict[str, Any]:
    """Claims the strict nodes accept; a change of None removes the claim."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "1", "iat": now, "exp": now + 3600, "aud": AUDIENCE, "iss": ISSUER,
                              "token_use": "access", "jti": "forged"}
    for name, value in changes.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def hs(claims: dict[str, Any], kid: str = "k1") -> str:
    return jwt.encode(claims, K1_SECRET, algorithm="HS256", headers={"kid": kid})


@dataclass(frozen=True)
class Keypair:
    private_pem: bytes
    public_pem: bytes


@pytest.fixture(scope="module")
def rsa_pair() -> Keypair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return Keypair(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()),
                   key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo))


ALG = "token algorithm not accepted"
TYPE = "token type not accepted"
EARLY = "token not yet valid (nbf or iat in the future)"

# name -> (node kind, maker of the forged token, the 401's message; None: refused by the HTTP layer).
# "hs": HS256 with a k1 key ring; "rs": RS256. Both want aud, iss and token_use "access".
FORGED: dict[str, tuple[str, Callable[[Keypair], str], str | None]] = {
    **{f"alg_{alg}": ("hs", lambda _k, alg=alg: forge({"alg": alg, "typ": "JWT", "kid": "k1"}, good_claims(), None),
                      ALG)
       for alg in ("none", "None", "NONE", "nOnE")},
    **{f"rs_alg_{alg}": ("rs", lambda _k, alg=alg: forge({"alg": alg, "typ": "JWT"}, good_claims(), None), ALG)
       for alg in ("none", "NONE")},
    "hs256_with_rsa_public_key": (
        "rs", lambda k: forge({"alg": "HS256", "typ": "JWT"}, good_claims(), k.public_pem), ALG),
    "hs256_with_rsa_public_key_stripped": (
        "rs", lambda k: forge({"alg": "HS256", "typ": "JWT"}, good_claims(), k.public_pem.strip()), ALG),
    "no_exp": ("hs", lambda _k: hs(good_claims(exp=None)), "token lacks the exp claim"),
    "future_nbf": ("hs", lambda _k: hs(good_claims(nbf=int(time.time()) + 600)), EARLY),
    "future_iat": ("hs", lambda _k: hs(good_claims(iat=int(time.time()) + 600)), EARLY),
    "wrong_aud": ("hs", lambda _k: hs(good_claims(aud="another-service")), "token audience not accepted"),
    "no_aud": ("hs", lambda _k: hs(good_claims(aud=None)), "token lacks the aud claim"),
    "wrong_iss": ("hs", lambda _k: hs(good_claims(iss="https://evil.test")), "token issuer not accepted"),
    "unknown_kid": ("hs", lambda _k: hs(good_claims(), kid="k9"), "unknown key id"),
    "token_type_refresh": ("hs", lambda _k: hs(good_claims(token_use="refresh")), TYPE),
    "token_type_missing": ("hs", lambda _k: hs(good_claims(token_use=None)), TYPE),
    "rs_wrong_aud": ("rs", lambda k: jwt.encode(good_claims(aud="x"), k.private_pem, algorithm="RS256"),
                     "token audience not accepted"),
    "huge_100kb": ("hs", lambda _k: hs(good_claims(pad="x" * 100_000)), None),
}


async def strict_node(nodes: NodeFactory, kind: str, keypair: Keypair, tmp_path: Path) -> App:
    common = {"auth.audience": AUDIENCE, "auth.issuer": ISSUER, "auth.token_type": "access"}
    if kind == "hs":
        return await nodes.start(**common, **{"auth.keys": f"k1:{K1_SECRET}"})
    path = tmp_path / "public.pem"
    path.write_bytes(keypair.public_pem)
    return await nodes.start(**common, **{"auth.algorithm": "RS256", "auth.public_key_file": str(path)})


@pytest.mark.parametrize("case", list(FORGED))
async def test_forged_token_is_refused_before_the_upgrade(nodes: NodeFactory, redis_client: Redis, prefix: str,
                                                          rsa_pair: Keypair, tmp_path: Path, case: str) -> None:
    """Each forged token of issue 5's list is refused before the upgrade for its own reason (401, or a 4xx
    from the HTTP layer for 100 KB), opens no session, and leaves nothing in Redis but registrations and the audit
    stream, which does not hold the token; the well-formed token connects to the same node."""
    kind, make, message = FORGED[case]
    app = await strict_node(nodes, kind, rsa_pair, tmp_path)
    token = make(rsa_pair)
    status, body = await refused_status(url_of(app), token)
    if message is None:
        assert 400 <= status < 500, status
    else:
        assert status == 401 and body is not None and body["error"]["message"] == message, (status, body)
    assert app.node is not None and not app.node.registry.sessions
    assert app.audit is not None
    await app.audit.flush()
    found = {key.decode() async for key in redis_client.scan_iter(match=f"{prefix}*", count=1000)}
    assert found <= {app.keys.nodes(), app.keys.node(app.node_id), app.keys.audit()}
    entries = await redis_client.xrange(app.keys.audit())
    pieces = [part.encode() for part in token.split(".")[1:] if len(part) > 8]  # payload, signature
    assert all(piece not in value for _, fields in entries for value in fields.values() for piece in pieces)

    good = (hs(good_claims()) if kind == "hs"
            else jwt.encode(good_claims(), rsa_pair.private_pem, algorithm="RS256"))
    client = await connect(url_of(app), "1", token=good, logger=CLIENT_LOG)
    await client.close()
