"""The lean HS* check of TokenVerifier decides exactly as pyjwt does: over a corpus of valid, hostile and odd
tokens, under several configurations, a verifier with it accepts the same tokens (with the same identity)
and refuses the same ones (with the same message) as a verifier that leaves everything to pyjwt."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import warnings
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from jwt.warnings import InsecureKeyLengthWarning

from hub.auth import TokenVerifier, VerifiedToken
from hub.config import AuthConfig
from hub.errors import AuthError

SECRET = "lean-check-secret-0123456789abcdef0123"
RING_SECRET = "ring-secret-k2-0123456789abcdef01234567"
CONFIGS = {
    "plain": AuthConfig(secret=SECRET),
    "leeway": AuthConfig(secret=SECRET, leeway_s=30),
    "audience_issuer": AuthConfig(secret=SECRET, audience="hub", issuer="https://idp.example"),
    "ring": AuthConfig(secret=SECRET, keys=(f"k2:{RING_SECRET}",)),
    "ring_only": AuthConfig(keys=(f"k2:{RING_SECRET}",)),
    "hs512": AuthConfig(algorithm="HS512", secret=SECRET * 2),
    "token_type": AuthConfig(secret=SECRET, token_type="access"),
}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def signed(header: Any, payload: Any, key: str = SECRET, digest: Callable[[], Any] = hashlib.sha256,
           raw_header: bytes | None = None, raw_payload: bytes | None = None) -> str:
    """A token signed by hand (pyjwt refuses to make hostile ones); raw_* replace the JSON encoding."""
    first = b64(raw_header if raw_header is not None else orjson.dumps(header))
    second = b64(raw_payload if raw_payload is not None else orjson.dumps(payload))
    signature = hmac.new(key.encode(), f"{first}.{second}".encode(), digest).digest()
    return f"{first}.{second}.{b64(signature)}"


def corpus() -> dict[str, str]:
    now = int(time.time())
    good = {"sub": "u1", "iat": now - 5, "exp": now + 600, "jti": "j1", "roles": ["support"], "rooms": ["order_1"]}
    hs = {"alg": "HS256", "typ": "JWT"}

    def claims(**changes: Any) -> dict[str, Any]:
        values = {**good, **changes}
        return {k: v for k, v in values.items() if v is not ...}

    tokens = {
        "good": signed(hs, good),
        "good_minimal": signed({"alg": "HS256"}, {"sub": "u1", "exp": now + 60}),
        "good_with_aud_iss": signed(hs, claims(aud="hub", iss="https://idp.example")),
        "good_aud_list": signed(hs, claims(aud=["x", "hub"], iss="https://idp.example")),
        "good_token_use": signed(hs, claims(token_use="access")),
        "typ_access": signed({"alg": "HS256", "typ": "application/Access"}, good),
        "kid_k2": signed({"alg": "HS256", "kid": "k2"}, good, key=RING_SECRET),
        "kid_k2_default_key": signed({"alg": "HS256", "kid": "k2"}, good),
        "kid_unknown": signed({"alg": "HS256", "kid": "k9"}, good),
        "kid_null": signed({"alg": "HS256", "kid": None}, good),
        "kid_int": signed({"alg": "HS256", "kid": 2}, good),
        "hs512": signed({"alg": "HS512"}, good, key=SECRET * 2, digest=hashlib.sha512),
        "alg_none": f"{b64(orjson.dumps({'alg': 'none'}))}.{b64(orjson.dumps(good))}.",
        "alg_missing": signed({"typ": "JWT"}, good),
        "alg_hs384": signed({"alg": "HS384"}, good, digest=hashlib.sha384),
        "crit_b64": signed({"alg": "HS256", "b64": False, "crit": ["b64"]}, good),
        "crit_unknown": signed({"alg": "HS256", "crit": ["exp"]}, good),
        "header_jku": signed({"alg": "HS256", "jku": "https://evil.example/keys"}, good),
        "header_list": signed(["HS256"], good),
        "header_not_json": signed(None, good, raw_header=b"{alg:HS256}"),
        "payload_list": signed(hs, [good]),
        "payload_not_json": signed(hs, None, raw_payload=b"sub=u1"),
        "payload_nan": signed(hs, None, raw_payload=b'{"sub":"u1","exp":NaN}'),
        "payload_bom": signed(hs, None, raw_payload=b"\xef\xbb\xbf" + orjson.dumps(good)),
        "payload_surrogate": signed(hs, None, raw_payload=orjson.dumps(good)[:-1] + b',"x":"\\ud800"}'),
        "payload_duplicate_sub": signed(hs, None, raw_payload=orjson.dumps(good)[:-1] + b',"sub":"admin"}'),
        "expired": signed(hs, claims(exp=now - 10)),
        "expired_long_ago": signed(hs, claims(exp=now - 3600)),
        "exp_float": signed(hs, claims(exp=now + 600.5)),
        "exp_string": signed(hs, claims(exp=str(now + 600))),
        "exp_bool": signed(hs, claims(exp=True)),
        "exp_null": signed(hs, claims(exp=None)),
        "exp_missing": signed(hs, claims(exp=...)),
        "exp_huge": signed(hs, None, raw_payload=b'{"sub":"u1","exp":123456789012345678901234567890}'),
        "nbf_future": signed(hs, claims(nbf=now + 10)),
        "nbf_past": signed(hs, claims(nbf=now - 10)),
        "nbf_float": signed(hs, claims(nbf=now - 10.5)),
        "iat_future": signed(hs, claims(iat=now + 10)),
        "iat_float": signed(hs, claims(iat=now - 10.5)),
        "iat_string": signed(hs, claims(iat=str(now))),
        "sub_missing": signed(hs, claims(sub=...)),
        "sub_null": signed(hs, claims(sub=None)),
        "sub_int": signed(hs, claims(sub=7)),
        "sub_bad_chars": signed(hs, claims(sub="a b")),
        "jti_int": signed(hs, claims(jti=5)),
        "jti_null": signed(hs, claims(jti=None)),
        "aud_wrong": signed(hs, claims(aud="other", iss="https://idp.example")),
        "aud_int": signed(hs, claims(aud=1, iss="https://idp.example")),
        "aud_list_mixed": signed(hs, claims(aud=["hub", 1], iss="https://idp.example")),
        "iss_wrong": signed(hs, claims(aud="hub", iss="https://evil.example")),
        "iss_int": signed(hs, claims(aud="hub", iss=1)),
        "roles_dict": signed(hs, claims(roles={"admin": True})),
        "wrong_key": signed(hs, good, key="another-secret-0123456789abcdef0123456"),
    }
    first, second, third = tokens["good"].split(".")
    flipped = third[:-1] + ("A" if third[-1] != "A" else "B")
    tokens |= {
        "tampered_signature": f"{first}.{second}.{flipped}",
        "tampered_payload": f"{first}.{b64(orjson.dumps(claims(roles=['admin'])))}.{third}",
        "signature_padded": f"{first}.{second}.{third}=",
        # The last character of a 43-character segment carries two unused bits: set them.
        "signature_non_canonical": f"{first}.{second}.{third[:-1]}{chr(ord(third[-1]) + 1)}",
        "four_segments": f"{first}.{second}.{third}.{third}",
        "two_segments": f"{first}.{second}",
        "empty_signature": f"{first}.{second}.",
        "non_ascii": f"{first}.{second}é.{third}",
        "garbage": "not-a-jwt",
    }
    return tokens


def outcome(verifier: TokenVerifier, token: str) -> tuple[str, VerifiedToken | str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InsecureKeyLengthWarning)
            return "accepted", verifier.verify(token)
    except AuthError as exc:
        return "refused", exc.message


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_lean_hmac_check_decides_exactly_as_pyjwt(config_name: str) -> None:
    """Same acceptances (same identity) and same refusals (same message) with and without the lean check;
    and the corpus exercises both outcomes under every configuration."""
    config = CONFIGS[config_name]
    lean, reference = TokenVerifier(config), TokenVerifier(config, lean_hmac=False)
    results = {}
    for name, token in corpus().items():
        results[name] = outcome(lean, token)
        assert results[name] == outcome(reference, token), name
    assert {verdict for verdict, _ in results.values()} == {"accepted", "refused"}


def test_lean_hmac_check_takes_the_common_tokens() -> None:
    """Tokens as the hub and usual issuers mint them go through the lean path (so pyjwt's generic work is
    skipped for them); hostile or odd ones are left to pyjwt."""
    tokens = corpus()
    plain, audience = TokenVerifier(CONFIGS["plain"]), TokenVerifier(CONFIGS["audience_issuer"])
    for name in ("good", "good_minimal", "kid_k2_default_key", "typ_access"):
        assert plain._verified_hmac(tokens[name]) is not None, name
    assert audience._verified_hmac(tokens["good_with_aud_iss"]) is not None
    for name in ("expired", "alg_none", "crit_b64", "kid_null", "exp_float", "signature_padded",
                 "signature_non_canonical", "tampered_payload", "payload_nan"):
        assert plain._verified_hmac(tokens[name]) is None, name
