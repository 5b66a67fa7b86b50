"""JWT verification at the handshake (pyjwt).

The algorithm is pinned by config, so ``alg: none`` and algorithm-confusion tokens are refused;
``exp`` and ``sub`` are required; ``aud``/``iss`` are checked when configured. Error messages never
contain the token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from hub.config import AuthConfig
from hub.errors import AuthError
from hub.rooms import Principal, parse_room

KNOWN_ROLES = frozenset({"customer", "manufacturer", "support", "admin"})
# The user id is used in Redis keys and frames; keep it to a safe, printable alphabet.
_USER_ID = re.compile(r"[A-Za-z0-9_.@:-]{1,128}", re.ASCII)


def is_valid_user_id(value: str) -> bool:
    return _USER_ID.fullmatch(value) is not None


@dataclass(frozen=True)
class VerifiedToken:
    principal: Principal
    expires_at: float  # seconds since the epoch (the token's exp)
    token_id: str | None  # jti, when present


class TokenVerifier:
    """Verifies tokens against one pinned algorithm and key."""

    def __init__(self, config: AuthConfig) -> None:
        self._config = config
        self._algorithm = config.algorithm
        if config.algorithm.startswith("HS"):
            self._key: Any = config.secret
        else:
            self._key = Path(config.public_key_file).read_text(encoding="utf-8")

    def verify(self, token: str | None) -> VerifiedToken:
        """Return the verified identity or raise :class:`AuthError` (its message names no secret)."""
        if not token:
            raise AuthError("missing token")
        if len(token) > 8192:
            raise AuthError("token too long")
        options: Any = {"require": ["exp", "sub"], "verify_aud": bool(self._config.audience)}
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self._algorithm],
                audience=self._config.audience or None,
                issuer=self._config.issuer or None,
                leeway=self._config.leeway_s,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
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
        return _principal_from(claims)


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
    roles = frozenset(r for r in roles_claim if r in KNOWN_ROLES)
    return VerifiedToken(
        principal=Principal(sub, roles, frozenset(token_rooms)),
        expires_at=float(exp),
        token_id=jti if isinstance(jti, str) else None,
    )


def mint_token(config: AuthConfig, user_id: str, roles: list[str] | tuple[str, ...] = (),
               rooms: list[str] | tuple[str, ...] = (), ttl_s: int = 3600, private_key: str | None = None,
               now: float | None = None) -> str:
    """Make a token this hub accepts (development, tests, ``hubctl token``)."""
    import time

    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": issued, "exp": issued + ttl_s}
    if roles:
        claims["roles"] = list(roles)
    if rooms:
        claims["rooms"] = list(rooms)
    if config.audience:
        claims["aud"] = config.audience
    if config.issuer:
        claims["iss"] = config.issuer
    key = config.secret if config.algorithm.startswith("HS") else private_key
    if key is None:
        raise AuthError(f"minting {config.algorithm} tokens needs the private key")
    return jwt.encode(claims, key, algorithm=config.algorithm)
