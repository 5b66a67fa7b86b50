"""One error root with stable codes.

Client-visible errors carry a ``code`` (stable, documented in README) and whether retrying the same
request can help. WebSocket close codes follow one rule: 4000-4499 mean "reconnect", 4500-4999 mean
"do not reconnect with the same credentials".
"""

from __future__ import annotations

from enum import IntEnum


class HubError(Exception):
    """Root of every error the hub raises on purpose."""

    code = "internal_error"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable


class ConfigError(HubError):
    code = "config_error"


class AuthError(HubError):
    """The handshake's credentials were refused (HTTP 401 before the upgrade)."""

    code = "unauthorized"


class ClientError(HubError):
    """A frame was refused; the connection stays open and gets an ``error`` frame."""

    code = "bad_request"
    # Filled in by the protocol layer when the offending frame could be read that far.
    request_type: str | None = None
    request_id: str | int | None = None


class InvalidFrame(ClientError):
    code = "invalid_frame"


class UnknownType(ClientError):
    code = "unknown_type"


class InvalidRoom(ClientError):
    code = "invalid_room"


class Forbidden(ClientError):
    code = "forbidden"


class NotJoined(ClientError):
    code = "not_joined"


class InvalidMessage(ClientError):
    code = "invalid_message"


class MessageTooLarge(ClientError):
    code = "message_too_large"


class RateLimited(ClientError):
    """Too many requests; nothing was done. Retry after ``retry_after_ms``."""

    code = "rate_limited"
    retryable = True

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class InvalidToken(ClientError):
    """A ``refresh`` token was refused; the connection keeps its current token and deadline."""

    code = "invalid_token"


class Unavailable(ClientError):
    """Redis could not be reached; nothing was stored. Retry with the same client_msg_id."""

    code = "unavailable"
    retryable = True


class CloseCode(IntEnum):
    """Close codes the hub sends. 4000-4499: reconnect. 4500-4999: do not reconnect as is."""

    SERVER_SHUTDOWN = 4001  # node draining (SIGTERM): reconnect, another node will take you
    IDLE_TIMEOUT = 4002  # no frame for server.connection_timeout_s
    SLOW = 4008  # the client did not read fast enough; reconnect and resume
    ROOM_DATA_LOST = 4010  # Redis lost a joined room's stream: reconnect and resume (recovered false: refetch)
    UNAUTHORIZED = 4501  # credentials no longer valid (reserved; expiry and revocation have their own codes)
    TOKEN_EXPIRED = 4502  # the token reached exp without a refresh frame: reconnect with a new token
    TOKEN_REVOKED = 4503  # the token (or every token of the user) was revoked: re-authenticate


# Every error code a client can see in an ``error`` frame, with its meaning (README's table is built
# from the same words).
ERROR_CODES: dict[str, str] = {
    "invalid_frame": "the frame is not a JSON object, is binary, or a field has the wrong type",
    "unknown_type": "the frame's type is not one the hub understands",
    "invalid_room": "the room name is not canonical (see room naming)",
    "forbidden": "you may not read (or write) this room",
    "not_joined": "the room must be joined first",
    "invalid_message": "a message field is missing or invalid",
    "message_too_large": "content exceeds server.max_content_bytes; nothing was stored",
    "rate_limited": "too many messages or typing events; nothing was stored; retry after retry_after_ms",
    "unavailable": "Redis could not be reached; nothing was stored; retry with the same client_msg_id",
    "invalid_token": "the refresh token was refused (invalid, revoked, another user); the current one still applies",
    "internal_error": "a bug; the connection stays open; please report it",
}
