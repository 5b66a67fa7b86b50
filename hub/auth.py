"""JWT verification at the handshake and for ``refresh`` frames (pyjwt). Pure: no I/O after start.

The algorithm is pinned by config, so ``alg: none`` and algorithm-confusion tokens are refused;
``exp`` and ``sub`` are required; ``aud``/``iss`` are checked when configured; ``nbf`` and ``iat`` in
the future (beyond ``auth.leeway_s``) are refused. With a key ring (``auth.keys``) the token's ``kid``
header picks the key, and an unknown ``kid`` is refused; tokens without ``kid`` use ``auth.secret`` /
``auth.public_key_file``. With ``auth.token_type`` set, a token's ``token_use`` claim (or, when it has
none, its ``typ`` header) must name that type, so refresh tokens and other services' tokens cannot open
a socket. Error messages never contain the token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson
from jwt.algorithms import HMACAlgorithm

from hub.config import AuthConfig
from hub.errors import AuthError, ConfigError
from hub.rooms import Principal, parse_room

KNOWN_ROLES = frozenset({"customer", "manufacturer", "support", "admin"})
# The user id is used in Redis keys and frames; keep it to a safe, printable alphabet.
_USER_ID = re.compile(r"[A-Za-z0-9_.@:-]{1,128}", re.ASCII)


def is_valid_user_id(value: str) -> bool:
    return _USER_ID.fullmatch(value) is not None


# A kid names a key in Redis-free config only, but keep it printable and short all the same.
_KID = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)


# The lean HMAC check (TokenVerifier._verified_hmac): the hashes of the HS* algorithms, a base64url segment
# without padding, and the only header parameters it accepts (anything else is left to pyjwt).
_HMAC_HASHES: dict[str, Callable[[], Any]] = {"HS256": hashlib.sha256, "HS384": hashlib.sha384,
                                              "HS512": hashlib.sha512}
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
_PLAIN_HEADER = frozenset({"alg", "typ", "kid"})
_NOT_HMAC_KEY = object()  # a key pyjwt would refuse as an HMAC secret: the lean check never uses it

# Interned role sets (subsets of KNOWN_ROLES, so few) and the shared empty room set for principals.
_ROLE_SETS: dict[frozenset[str], frozenset[str]] = {}
_NO_ROOMS: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    principal: Principal
    expires_at: float  # seconds since the epoch (the token's exp)
    token_id: str | None  # jti, when present
    issued_at: float | None = None  # seconds since the epoch (the token's iat), when present


def parse_key_ring(config: AuthConfig) -> dict[str, str]:
    """``auth.keys`` as kid -> secret (HS*) or public key file path (others). Raises
    :class:`ConfigError` naming ``auth.keys`` and the entry (never the secret)."""
    ring: dict[str, str] = {}
    for index, entry in enumerate(config.keys, 1):
        kid, sep, value = entry.partition(":")
        if not sep or not _KID.fullmatch(kid):
            raise ConfigError(f"config auth.keys: entry {index} must be KID:SECRET or KID:/path/to/key.pem "
                              "with KID 1-64 of A-Z a-z 0-9 _ . -")
        if kid in ring:
            raise ConfigError(f"config auth.keys: key id {kid!r} appears twice")
        if not value:
            raise ConfigError(f"config auth.keys: key id {kid!r} has no key")
        ring[kid] = value
    return ring


def check_key_material(config: AuthConfig) -> None:
    """Every key of the ring is usable with the pinned algorithm (secret length, file present)."""
    for kid, value in parse_key_ring(config).items():
        if config.algorithm.startswith("HS"):
            if len(value) < 32:
                raise ConfigError(f"config auth.keys: key id {kid!r}: the secret must be at least 32 characters")
        elif not Path(value).is_file():
            raise ConfigError(f"config auth.keys: key id {kid!r}: public key file not found: {value}")


class TokenVerifier:
    """Verifies tokens against one pinned algorithm and a pinned key set."""

    def __init__(self, config: AuthConfig, *, lean_hmac: bool = True) -> None:
        """``lean_hmac=False`` leaves every token to pyjwt (tests compare both paths)."""
        self._config = config
        self._algorithm = config.algorithm
        hmac = config.algorithm.startswith("HS")
        # The key of tokens without kid; None when only the key ring is configured (they are refused).
        self._key: Any = None
        if hmac and config.secret:
            self._key = config.secret
        elif not hmac and config.public_key_file:
            self._key = Path(config.public_key_file).read_text(encoding="utf-8")
        # kid -> key, read once (rotation means a restart with the new ring).
        self._ring: dict[str, Any] = {
            kid: value if hmac else Path(value).read_text(encoding="utf-8")
            for kid, value in parse_key_ring(config).items()
        }
        self._token_type = _normal_type(config.token_type) if config.token_type else None
        # The HS* keys as bytes, for the lean check; None for other algorithms (pyjwt verifies those).
        self._hash = _HMAC_HASHES.get(self._algorithm) if lean_hmac else None
        self._hmac_key = _hmac_key(self._key) if self._hash is not None and self._key is not None else None
        self._hmac_ring = {kid: _hmac_key(key) for kid, key in self._ring.items()} if self._hash is not None else {}

    def verify(self, token: str | None, now: float | None = None) -> VerifiedToken:
        """Return the verified identity or raise :class:`AuthError` (its message names no secret)."""
        if not token:
            raise AuthError("missing token")
        if len(token) > 8192:
            raise AuthError("token too long")
        lean = self._verified_hmac(token) if self._hash is not None else None
        header, claims = lean if lean is not None else self._decode(token)
        self._check_issued_at(claims, time.time() if now is None else now)
        self._check_type(header, claims)
        return _principal_from(claims)

    def _verified_hmac(self, token: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(header, claims) of an HS* token that passes every check pyjwt's decode makes here, without its
        generic machinery (a fifth of a connect's CPU went to pyjwt). None when anything is unusual
        (padding, an extra header parameter, a float or string time claim, unexpected JSON): pyjwt then
        decides, and words the refusal. So this path only ever accepts what pyjwt accepts."""
        parts = token.split(".")
        if len(parts) != 3:
            return None
        raw_header, raw_payload, signature = (_segment(part) for part in parts)
        if raw_header is None or raw_payload is None or signature is None:
            return None
        try:
            header, claims = orjson.loads(raw_header), orjson.loads(raw_payload)
        except orjson.JSONDecodeError:
            return None
        if type(header) is not dict or type(claims) is not dict:
            return None
        if header.get("alg") != self._algorithm or not header.keys() <= _PLAIN_HEADER:
            return None
        # As _key_for picks it (without a ring, any kid gets the one key); a kid that is present but not a
        # string (even null) is pyjwt's to refuse.
        kid = header.get("kid", ...)
        if kid is not ... and type(kid) is not str:
            return None
        key = self._hmac_key if kid is ... or not self._ring else self._hmac_ring.get(kid)
        if not isinstance(key, bytes) or self._hash is None:
            return None
        expected = hmac.new(key, f"{parts[0]}.{parts[1]}".encode("ascii"), self._hash).digest()
        if not hmac.compare_digest(expected, signature):
            return None
        return (header, claims) if self._claims_pass(claims) else None

    def _claims_pass(self, claims: dict[str, Any]) -> bool:
        """pyjwt's claim checks with our options (exp and sub required; iat, nbf, exp, iss, aud when
        configured, sub and jti types), for integer times only."""
        now, leeway = time.time(), self._config.leeway_s
        exp, sub = claims.get("exp"), claims.get("sub")
        if type(exp) is not int or exp <= now - leeway or type(sub) is not str:
            return False
        for name in ("iat", "nbf"):
            if name in claims and (type(claims[name]) is not int or claims[name] > now + leeway):
                return False
        if "jti" in claims and type(claims["jti"]) is not str:
            return False
        if self._config.issuer and claims.get("iss") != self._config.issuer:
            return False
        if self._config.audience:
            aud = claims.get("aud")
            if type(aud) is str:
                return aud == self._config.audience
            return type(aud) is list and all(type(a) is str for a in aud) and self._config.audience in aud
        return True

    def _decode(self, token: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """pyjwt's decode with our options: (header, claims), or :class:`AuthError` saying what failed."""
        key = self._key_for(token)
        options: Any = {"require": ["exp", "sub"], "verify_aud": bool(self._config.audience)}
        try:
            decoded = jwt.decode_complete(
                token,
                key,
                algorithms=[self._algorithm],
                audience=self._config.audience or None,
                issuer=self._config.issuer or None,
                leeway=self._config.leeway_s,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not yet valid (nbf or iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token issuer not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the {exc.claim} claim") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("token algorithm not accepted") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature invalid") from None
        except jwt.PyJWTError:
            raise AuthError("token invalid") from None
        claims: dict[str, Any] = decoded["payload"]
        header: dict[str, Any] = decoded["header"]
        return header, claims

    def _key_for(self, token: str) -> Any:
        """The key the token's kid names (with a key ring), else the default key."""
        if not self._ring:
            if self._key is None:
                raise AuthError("no key configured")
            return self._key
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            raise AuthError("token invalid") from None
        if kid is None:
            if self._key is None:
                raise AuthError("token lacks a key id (kid)")
            return self._key
        key = self._ring.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise AuthError("unknown key id")
        return key

    def _check_issued_at(self, claims: dict[str, Any], now: float) -> None:
        # pyjwt >= 2.10 refuses a future iat itself; older versions only check that it is a number.
        iat = claims.get("iat")
        if iat is None:
            return
        if isinstance(iat, bool) or not isinstance(iat, int | float):
            raise AuthError("token iat must be a number")
        if iat > now + self._config.leeway_s:
            raise AuthError("token not yet valid (nbf or iat in the future)")

    def _check_type(self, header: dict[str, Any], claims: dict[str, Any]) -> None:
        if self._token_type is None:
            return
        # token_use states the token's purpose explicitly; typ is the fallback when it is absent.
        declared = claims.get("token_use", header.get("typ"))
        if not isinstance(declared, str) or _normal_type(declared) != self._token_type:
            raise AuthError("token type not accepted")


def _segment(part: str) -> bytes | None:
    """A JWT segment's bytes: unpadded base64url in its one canonical spelling, else None."""
    if len(part) % 4 == 1 or not _SEGMENT.fullmatch(part):
        return None
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        return None
    # Unused low bits set in the last character spell the same bytes differently: pyjwt refuses those.
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != part.encode("ascii"):
        return None
    return raw


def _hmac_key(key: Any) -> bytes | object:
    """``key`` as HMAC secret bytes, or a marker when pyjwt would refuse it as one (a PEM, SSH or DER key,
    a JWK): the lean check then leaves those tokens to pyjwt, which refuses them."""
    try:
        prepared = HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(key)
    except jwt.PyJWTError:
        return _NOT_HMAC_KEY
    return prepared if isinstance(prepared, bytes) else _NOT_HMAC_KEY


def _normal_type(value: str) -> str:
    """typ values compare case-insensitively, with or without the ``application/`` prefix (RFC 7515)."""
    lowered = value.strip().lower()
    return lowered.removeprefix("application/")


def _principal_from(claims: dict[str, Any]) -> VerifiedToken:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not _USER_ID.fullmatch(sub):
        raise AuthError("token sub must be 1-128 of A-Z a-z 0-9 _ . @ : -")
    roles_claim = claims.get("roles", [])
    if isinstance(roles_claim, str):
        roles_claim = [roles_claim]
    if not isinstance(roles_claim, list) or not all(isinstance(r, str) for r in roles_claim):
        raise AuthError("token roles must be a list of strings")
    rooms_claim = claims.get("rooms", [])
    if not isinstance(rooms_claim, list) or not all(isinstance(r, str) for r in rooms_claim):
        raise AuthError("token rooms must be a list of room names")
    token_rooms: set[str] = set()
    for name in rooms_claim[:1000]:
        try:
            token_rooms.add(parse_room(name).name)
        except Exception:
            continue  # a malformed room in a claim grants nothing
    exp = claims["exp"]
    jti = claims.get("jti")
    iat = claims.get("iat")
    roles = frozenset(r for r in roles_claim if r in KNOWN_ROLES)
    # Every connection keeps its principal: share the few distinct role sets and the empty room set
    # (an empty frozenset alone is 216 bytes).
    roles = _ROLE_SETS.setdefault(roles, roles)
    return VerifiedToken(
        principal=Principal(sub, roles, frozenset(token_rooms) if token_rooms else _NO_ROOMS),
        expires_at=float(exp),
        token_id=jti if isinstance(jti, str) and 0 < len(jti) <= 256 else None,
        issued_at=float(iat) if isinstance(iat, int | float) and not isinstance(iat, bool) else None,
    )


def mint_token(config: AuthConfig, user_id: str, roles: list[str] | tuple[str, ...] = (),
               rooms: list[str] | tuple[str, ...] = (), ttl_s: int = 3600, private_key: str | None = None,
               now: float | None = None) -> str:
    """Make a token this hub accepts (development, tests, ``hubctl token``), with a random ``jti`` so
    it can be revoked on its own (``hubctl revoke-token --jti``)."""
    import secrets

    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": issued, "exp": issued + ttl_s,
                              "jti": secrets.token_urlsafe(12)}
    if config.token_type:
        claims["token_use"] = config.token_type
    if roles:
        claims["roles"] = list(roles)
    if rooms:
        claims["rooms"] = list(rooms)
    if config.audience:
        claims["aud"] = config.audience
    if config.issuer:
        claims["iss"] = config.issuer
    key = config.secret if config.algorithm.startswith("HS") else private_key
    if not key:
        raise AuthError(f"minting {config.algorithm} tokens needs the private key")
    return jwt.encode(claims, key, algorithm=config.algorithm)
