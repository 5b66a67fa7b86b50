"""Encryption at rest for sensitive chat content (pure: no I/O beyond the OS random source).

Sensitive content is sealed with AES-256-GCM *before* it reaches Redis or PostgreSQL and opened again
only where members read it (relay fan-out, replays, history). The sealed form is an *envelope*, a
text-safe ASCII string that fits a Redis stream field and a PostgreSQL ``text`` column as is::

    enc:v1:<kid>:<base64url(nonce[12] | ciphertext | tag[16]), no padding>

- ``kid`` names the key that sealed it (1-32 of ``A-Z a-z 0-9 _ -``), so a :class:`KeyRing` holding
  several keys can open envelopes from before a rotation while sealing new ones with the current key.
- The nonce is 96 random bits, fresh for every message (``os.urandom``). With random nonces one key
  should seal well under 2**32 messages; rotate long before that.
- The associated data (AAD) binds an envelope to where it belongs: :func:`message_aad` is
  ``room \\x00 sender_id \\x00 created_at_ms``. Copying an envelope into another room (or under another
  sender or time) makes it fail to open with :class:`DecryptError`. The Redis stream id is *not* part
  of the AAD: XADD assigns it after the content is sealed, so it cannot be known in time. The cost:
  an attacker who can write to Redis or PostgreSQL could duplicate a sealed message inside the same
  room under the same sender and time; they can neither read it, alter it, nor move it elsewhere.

Keys are configured as strings (``encryption.key``, env ``WEBSOCKET_ENCRYPTION_KEY``, is the current
key; ``encryption.keys`` is the ring of older keys still accepted for decryption). See
:func:`parse_key` for the accepted formats. Nothing here ever puts key material or plaintext into an
exception message or a ``repr``.

:class:`SensitivityPolicy` decides which messages get sealed: room patterns, the per-message
``sensitive`` flag, and detectors for payment card numbers (Luhn) and IBANs (mod-97).
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import os
import re
from collections.abc import Iterable, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hub.errors import ConfigError, HubError

ENVELOPE_PREFIX = "enc:v1:"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # 96-bit GCM nonce
TAG_BYTES = 16
# HKDF-SHA256 "info" for keys given as passphrases (no salt). Changing it changes every derived key,
# so it is part of the stored format: never edit it, add a new prefix instead.
PASSPHRASE_HKDF_INFO = b"streamhub/encryption-at-rest/v1/passphrase"
PASSPHRASE_PREFIX = "passphrase:"
MIN_PASSPHRASE_CHARS = 16

_KID = re.compile(r"[A-Za-z0-9_-]{1,32}", re.ASCII)
# 12-byte nonce + 16-byte tag (empty plaintext) is 28 bytes, 38 base64url characters.
_ENVELOPE = re.compile(r"enc:v1:([A-Za-z0-9_-]{1,32}):([A-Za-z0-9_-]{38,})", re.ASCII)
_HEX_KEY = re.compile(r"[0-9A-Fa-f]{64}", re.ASCII)
_BASE64ISH = re.compile(r"[A-Za-z0-9+/_-]+={0,2}", re.ASCII)
# A base64 encoding of 32 bytes is 43 characters (44 padded). A value of nearly that length in the
# base64 alphabet that does not decode to 32 bytes is almost certainly a mistyped key, not a passphrase.
_NEAR_BASE64_KEY = range(40, 49)


class DecryptError(HubError):
    """An envelope could not be opened: malformed, unknown key id, tampered, or opened with associated
    data (room, sender, time) other than what it was sealed with. Never carries plaintext or keys."""

    code = "decrypt_failed"


# ====================================================================== keys


def parse_key(value: str, *, name: str = "encryption.key") -> bytes:
    """The 32-byte AES key a configured string stands for. Formats, tried in this order:

    - ``passphrase:TEXT``: TEXT (at least 16 characters) through HKDF-SHA256, no salt, info
      :data:`PASSPHRASE_HKDF_INFO`. Use this form for passphrases that contain ``:``.
    - 64 hex digits: the key itself (``openssl rand -hex 32``).
    - base64 or base64url of exactly 32 bytes, padding optional (``openssl rand -base64 32``,
      :func:`generate_key`).
    - anything else of at least 16 characters: a passphrase, as with the prefix. A value of 40-48
      base64-alphabet characters that does not decode to 32 bytes is refused as a mistyped key.

    HKDF does not slow down guessing; a passphrase must itself be high-entropy (128 bits or more).
    Raises :class:`ConfigError` naming ``name`` (never echoing the value).
    """
    text = value.strip()
    if not text:
        raise ConfigError(f"config {name}: is empty")
    if text.startswith(PASSPHRASE_PREFIX):
        return _from_passphrase(text[len(PASSPHRASE_PREFIX):], name)
    if _HEX_KEY.fullmatch(text):
        return bytes.fromhex(text)
    if _BASE64ISH.fullmatch(text):
        raw = _b64_any(text)
        if raw is not None and len(raw) == KEY_BYTES:
            return raw
        if len(text.rstrip("=")) in _NEAR_BASE64_KEY:
            got = "is not valid base64" if raw is None else f"decodes to {len(raw)} bytes"
            raise ConfigError(f"config {name}: looks like a base64 key but {got}; a key is 32 random bytes in "
                              f"base64 or hex (or prefix a passphrase with '{PASSPHRASE_PREFIX}')")
    return _from_passphrase(text, name)


def _from_passphrase(passphrase: str, name: str) -> bytes:
    if len(passphrase) < MIN_PASSPHRASE_CHARS:
        raise ConfigError(f"config {name}: a passphrase must be at least {MIN_PASSPHRASE_CHARS} characters "
                          "(better: 32 random bytes in base64)")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=PASSPHRASE_HKDF_INFO)
    return hkdf.derive(passphrase.encode("utf-8"))


def _b64_any(text: str) -> bytes | None:
    """Decode standard or URL-safe base64 with optional padding; None when it is not base64."""
    core = text.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(core + "=" * (-len(core) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def derive_kid(key: bytes) -> str:
    """The key id used when none is configured: the first 8 hex digits of SHA-256 of the raw key
    (padded base64 key: ``echo KEY | base64 -d | sha256sum | cut -c1-8``). 32 bits of its hash reveal nothing."""
    return hashlib.sha256(key).hexdigest()[:8]


def generate_key() -> str:
    """A fresh random key in the preferred configuration format (base64url of 32 bytes, no padding)."""
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode("ascii").rstrip("=")


def parse_key_entry(entry: str, *, name: str) -> tuple[str, bytes]:
    """``(kid, key)`` for one configured key: ``KID:KEY`` or a bare ``KEY`` (kid derived).

    ``KEY`` is any format :func:`parse_key` accepts; an entry starting with ``passphrase:`` has no kid
    (write ``KID:passphrase:TEXT`` to name one). Base64 and hex never contain ``:``, so the split is
    unambiguous for them.
    """
    text = entry.strip()
    kid: str | None = None
    value = text
    if not text.startswith(PASSPHRASE_PREFIX) and ":" in text:
        kid, value = text.split(":", 1)
        kid = kid.strip()
        if not _KID.fullmatch(kid):
            # The text before ':' is not echoed: it may be the start of a passphrase.
            raise ConfigError(f"config {name}: the key id before ':' must be 1-32 of A-Z a-z 0-9 _ - "
                              f"(passphrases containing ':' need the '{PASSPHRASE_PREFIX}' prefix)")
    key = parse_key(value, name=name)
    return (kid if kid is not None else derive_kid(key)), key


def load_keyring(key: str, keys: str | Iterable[str] = ()) -> KeyRing | None:
    """The key ring from configuration, or None when encryption is off (both settings empty).

    ``key`` (``encryption.key``, env ``WEBSOCKET_ENCRYPTION_KEY``) is the current key; ``keys``
    (``encryption.keys``) holds older keys, either a comma-separated string ``"k1:KEY,k2:KEY"`` or a
    sequence of entries (a YAML list). The current key may also appear in the ring. Raises
    :class:`ConfigError` naming ``encryption.key`` or ``encryption.keys``.
    """
    entries = [e for e in (keys.split(",") if isinstance(keys, str) else list(keys)) if e.strip()]
    if not key.strip():
        if entries:
            raise ConfigError("config encryption.key: must be set when encryption.keys is "
                              "(it is the key new messages are sealed with)")
        return None
    current_kid, current = parse_key_entry(key, name="encryption.key")
    ring: dict[str, bytes] = {current_kid: current}
    for i, entry in enumerate(entries):
        kid, material = parse_key_entry(entry, name=f"encryption.keys[{i}]")
        if ring.get(kid, material) != material:
            raise ConfigError(f"config encryption.keys[{i}]: key id {kid!r} is already used by a different key")
        ring[kid] = material
    return KeyRing(ring, current_kid)


class KeyRing:
    """Several AES-256-GCM keys by key id: one current key seals, every key opens.

    Immutable and safe to share between tasks and threads. Rotation is a configuration change: the
    new key becomes ``encryption.key`` and the old one moves to ``encryption.keys``; old envelopes keep
    opening, new ones use the new key, and :meth:`reencrypt` (``hubctl rotate-keys``) moves old ones over.
    """

    __slots__ = ("_aeads", "_current_kid")

    def __init__(self, keys: Mapping[str, bytes], current_kid: str) -> None:
        for kid, key in keys.items():
            if not _KID.fullmatch(kid):
                raise ValueError(f"key id {kid[:40]!r} must be 1-32 of A-Z a-z 0-9 _ -")
            if len(key) != KEY_BYTES:
                raise ValueError(f"key {kid!r} must be {KEY_BYTES} bytes")
        if current_kid not in keys:
            raise ValueError(f"current key id {current_kid!r} is not in the ring")
        # One AESGCM per key, built once: the key schedule is not redone per message.
        self._aeads: dict[str, AESGCM] = {kid: AESGCM(key) for kid, key in keys.items()}
        self._current_kid = current_kid

    def __repr__(self) -> str:
        return f"KeyRing(current={self._current_kid!r}, kids={sorted(self._aeads)!r})"

    @property
    def current_kid(self) -> str:
        return self._current_kid

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._aeads)

    def encrypt(self, plaintext: str, aad: bytes) -> str:
        """Seal ``plaintext`` (UTF-8; lone surrogates raise ``UnicodeEncodeError``) with the current key
        and a fresh random nonce. The envelope is ASCII and opens only with the same ``aad``."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aeads[self._current_kid].encrypt(nonce, plaintext.encode("utf-8"), aad)
        blob = base64.urlsafe_b64encode(nonce + sealed).decode("ascii").rstrip("=")
        return f"{ENVELOPE_PREFIX}{self._current_kid}:{blob}"

    def decrypt(self, envelope: str, aad: bytes) -> str:
        """Open an envelope sealed by any key in the ring. Raises :class:`DecryptError` when it is
        malformed, names an unknown key id, was altered in any character, or ``aad`` differs."""
        kid, raw = _split(envelope)
        aead = self._aeads.get(kid)
        if aead is None:
            raise DecryptError(f"unknown encryption key id {kid!r} (ring has {', '.join(sorted(self._aeads))}); "
                               "add the old key to encryption.keys")
        try:
            plain = aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], aad)
        except InvalidTag:
            raise DecryptError(f"envelope under key {kid!r} does not authenticate: tampered, or sealed for "
                               "another room, sender or time") from None
        try:
            return plain.decode("utf-8")
        except UnicodeDecodeError:  # only reachable if someone else sealed non-UTF-8 with our key
            raise DecryptError(f"envelope under key {kid!r} does not hold UTF-8 text") from None

    def reencrypt(self, envelope: str, aad: bytes) -> str:
        """The envelope sealed with the current key: returned unchanged (not even opened) when it already
        is, else opened with its own key and sealed again with a fresh nonce. Idempotent, so a rotation
        that stops half-way can simply run again."""
        if self.needs_reencrypt(envelope):
            return self.encrypt(self.decrypt(envelope, aad), aad)
        return envelope

    def needs_reencrypt(self, envelope: str) -> bool:
        """Whether the envelope was sealed by a key other than the current one (it must be well-formed)."""
        return envelope_kid(envelope) != self._current_kid


def is_envelope(value: object) -> bool:
    """Whether ``value`` is a string in the envelope format (says nothing about whether it opens)."""
    return isinstance(value, str) and _ENVELOPE.fullmatch(value) is not None


def envelope_kid(envelope: str) -> str:
    """The key id an envelope names; :class:`DecryptError` when it is not an envelope."""
    return _split(envelope)[0]


def _split(envelope: str) -> tuple[str, bytes]:
    match = _ENVELOPE.fullmatch(envelope) if isinstance(envelope, str) else None
    if match is None:
        raise DecryptError("not an encryption envelope")
    kid, blob = match.group(1), match.group(2)
    if len(blob) % 4 == 1:
        raise DecryptError("envelope body has an impossible length")
    raw = base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))
    # The decoder ignores the unused low bits of the last character; refusing non-canonical text makes
    # every character of the envelope significant (no two strings open to the same message).
    if base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=") != blob:
        raise DecryptError("envelope body is not canonical base64url")
    return kid, raw


def message_aad(room: str, sender_id: str, created_at_ms: int) -> bytes:
    """The associated data of a chat message's content: ``room \\x00 sender_id \\x00 created_at_ms``.

    These are exactly the values the stream entry (``sender_id``, ``created_at`` fields) and the
    ``messages`` row (``room``, ``sender_id``, ``created_at``) keep, so every reader can rebuild it.
    NUL is refused inside the parts, which keeps the encoding unambiguous. Another sealed field of the
    same message (e.g. metadata) must use different AAD, or the two ciphertexts could be swapped.
    """
    if "\x00" in room or "\x00" in sender_id:
        raise ValueError("room and sender_id must not contain NUL")
    if created_at_ms < 0:
        raise ValueError("created_at_ms must not be negative")
    return f"{room}\x00{sender_id}\x00{created_at_ms}".encode()


# ====================================================================== what is sensitive

# Runs of digits separated by single spaces, dashes or no-break spaces ("4111 1111-1111 1111").
_DIGIT_RUN = re.compile(r"\d+(?:[ \u00a0-]\d+)*")
_SEPARATOR = re.compile(r"[ \u00a0-]")
CARD_MIN_DIGITS = 13
CARD_MAX_DIGITS = 19
# Digit strings Luhn-checked per message at most; a message with more card-shaped candidates than
# this (a wall of numbers) is treated as sensitive rather than spending more time on it.
MAX_CARD_CANDIDATES = 2048

_IBAN_NOT_ALNUM = re.compile(r"[ \u00a0]")
IBAN_MIN_CHARS = 15
IBAN_MAX_CHARS = 34
# IBAN candidates of a registered country mod-97-checked per message at most (then: sensitive).
MAX_IBAN_CANDIDATES = 1024
# Length of the IBAN per country, from the SWIFT IBAN registry (89 countries). Only these countries are
# detected: an unknown code would have to be tried at every length, and false positives are not free
# (sealed messages are left out of search). A country joining the registry needs a line here.
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21,
    "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28,
    "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22,
    "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}
# IBAN: registered country code + 2 check digits + BBAN, optionally in space-separated groups, any
# case; a lookahead so that overlapping candidates are all seen.
_IBAN_CANDIDATE = re.compile(
    r"(?<![A-Za-z0-9])(?=((?:" + "|".join(IBAN_LENGTHS) + r")[0-9]{2}(?:[ \u00a0]?[A-Za-z0-9]){11,30}))",
    re.IGNORECASE | re.ASCII)


def luhn_valid(digits: str) -> bool:
    """Whether a string of decimal digits (any Unicode ``Nd`` digits) passes the Luhn check."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """Whether ``iban`` (spaces allowed, any case) is an IBAN of a registered country, of that country's
    length, with mod-97-valid check digits."""
    compact = _IBAN_NOT_ALNUM.sub("", iban).upper()
    if not (IBAN_MIN_CHARS <= len(compact) <= IBAN_MAX_CHARS and compact.isascii() and compact.isalnum()):
        return False
    if not (compact[:2].isalpha() and compact[2:4].isdigit()):
        return False
    return IBAN_LENGTHS.get(compact[:2]) == len(compact) and _mod97(compact) == 1


def _mod97(compact: str) -> int:
    # Move the first four characters to the end and read letters as 10..35 (ISO 13616).
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97


def contains_card_number(text: str) -> bool:
    """Whether ``text`` holds a Luhn-valid run of 13-19 digits, written contiguously or in groups
    separated by single spaces or dashes. Inside a longer grouped run (``"2024 4111 1111 1111 1111"``)
    every window of whole groups with 13-19 digits is checked; a single ungrouped run of 20 or more
    digits is a reference number, not a card. More than :data:`MAX_CARD_CANDIDATES` candidates: True."""
    budget = MAX_CARD_CANDIDATES
    for match in _DIGIT_RUN.finditer(text):
        run = match.group()
        if len(run) < CARD_MIN_DIGITS:
            continue
        groups = _SEPARATOR.split(run)
        for start in range(len(groups)):
            digits = ""
            for end in range(start, len(groups)):
                digits += groups[end]
                if len(digits) > CARD_MAX_DIGITS:
                    break
                if len(digits) >= CARD_MIN_DIGITS:
                    budget -= 1
                    if budget < 0 or luhn_valid(digits):
                        return True
    return False


def contains_iban(text: str) -> bool:
    """Whether ``text`` holds an IBAN (any case, compact or in space-separated groups) of a registered
    country, with that country's length and mod-97-valid check digits. More than
    :data:`MAX_IBAN_CANDIDATES` candidates of a registered country: True."""
    budget = MAX_IBAN_CANDIDATES
    for match in _IBAN_CANDIDATE.finditer(text):
        compact = _IBAN_NOT_ALNUM.sub("", match.group(1)).upper()
        length = IBAN_LENGTHS[compact[:2]]
        if len(compact) < length:
            continue
        budget -= 1
        if budget < 0 or _mod97(compact[:length]) == 1:
            return True
    return False


class SensitivityPolicy:
    """Which chat messages are sealed before they are stored. A message is sensitive when any holds:

    1. the sender flagged it (``"sensitive": true`` in the frame);
    2. its room matches one of ``room_patterns`` (fnmatch, case-sensitive: ``quote_*``, ``order_[0-9]*``);
    3. its content is itself in the envelope format, so that readers never mistake a plaintext for a
       sealed message (and try to open it);
    4. ``detect_cards`` and the content holds a Luhn-valid card number (:func:`contains_card_number`);
    5. ``detect_ibans`` and the content holds a mod-97-valid IBAN (:func:`contains_iban`).

    Detectors err towards sealing: a false positive only costs an unnecessary encryption.
    """

    __slots__ = ("_detect_cards", "_detect_ibans", "_rooms", "room_patterns")

    def __init__(self, room_patterns: Iterable[str] = (), *, detect_cards: bool = True,
                 detect_ibans: bool = True) -> None:
        patterns = tuple(room_patterns)
        for i, pattern in enumerate(patterns):
            if not pattern or pattern != pattern.strip():
                raise ConfigError(f"config encryption.sensitive_rooms[{i}]: {pattern!r} must be a non-empty "
                                  "pattern without surrounding spaces")
        self.room_patterns = patterns
        # All patterns compiled into one alternation, matched once per message.
        self._rooms = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)) if patterns else None
        self._detect_cards = detect_cards
        self._detect_ibans = detect_ibans

    def __repr__(self) -> str:
        return (f"SensitivityPolicy(room_patterns={self.room_patterns!r}, detect_cards={self._detect_cards}, "
                f"detect_ibans={self._detect_ibans})")

    def room_is_sensitive(self, room: str) -> bool:
        """Whether every message in ``room`` is sealed, whatever its content."""
        return self._rooms is not None and self._rooms.match(room) is not None

    def is_sensitive(self, room: str, content: str, flagged: bool) -> bool:
        """Whether this message's content must be sealed before it is stored."""
        return (flagged or self.room_is_sensitive(room) or is_envelope(content)
                or (self._detect_cards and contains_card_number(content))
                or (self._detect_ibans and contains_iban(content)))
