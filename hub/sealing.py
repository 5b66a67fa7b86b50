"""Encryption at rest, wired: seal sensitive chat content before it reaches Redis (and so
PostgreSQL, the dead-letter stream and logs), open it where members read it (live delivery, resume,
history). Policy and key ring come from :mod:`hub.crypto`; the AAD binds each ciphertext to its room,
sender and creation time, so a ciphertext moved to another room does not open."""

from __future__ import annotations

import logging

from hub.config import EncryptionConfig
from hub.crypto import DecryptError, KeyRing, SensitivityPolicy, envelope_kid, is_envelope, load_keyring, message_aad

log = logging.getLogger("hub.sealing")

# What members see in place of content that cannot be opened (a key missing from the ring, tampering).
UNREADABLE = "[encrypted message: cannot be decrypted with the configured keys]"


class Sealer:
    def __init__(self, config: EncryptionConfig) -> None:
        self.ring: KeyRing | None = load_keyring(config.key, config.keys)
        self.policy = SensitivityPolicy(config.sensitive_rooms, detect_cards=config.detect_cards,
                                        detect_ibans=config.detect_ibans)
        if self.ring is None and (config.sensitive_rooms or config.detect_cards or config.detect_ibans):
            log.warning("encryption at rest is OFF (no encryption.key / WEBSOCKET_ENCRYPTION_KEY): sensitive "
                        "content is stored in plaintext")

    def seal(self, room: str, sender_id: str, created_at_ms: int, content: str, flagged: bool) -> str:
        """The content to store: an envelope when the message is sensitive and a key is configured."""
        if self.ring is None or not self.policy.is_sensitive(room, content, flagged):
            return content
        return self.ring.encrypt(content, message_aad(room, sender_id, created_at_ms))

    def open(self, room: str, sender_id: str, created_at_ms: int, content: str) -> str:
        """The plaintext of stored content (unchanged when it is not an envelope)."""
        if not is_envelope(content):
            return content
        if self.ring is None:
            return UNREADABLE
        try:
            return self.ring.decrypt(content, message_aad(room, sender_id, created_at_ms))
        except (DecryptError, ValueError):
            log.warning("cannot open a sealed message in %s (key id %s)", room, _kid(content))
            return UNREADABLE


def _kid(envelope: str) -> str:
    try:
        return envelope_kid(envelope)
    except (DecryptError, ValueError):
        return "?"
