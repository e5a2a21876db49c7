"""API keys: what a key looks like, how it is stored, and whether a presented key is good.

Theory of operation.

* **Format.** A key is `xp_` followed by 43 base64url characters: 32 random bytes (256 bits),
  unpadded. The prefix lets secret scanners and humans recognise a leaked key; the randomness
  is what makes it unguessable. `generate` takes the random bytes as an argument, so this module
  never draws randomness (the service passes `secrets.token_bytes(32)`) and tests are exact.
* **Digests only, never the key.** What is stored (extproc.yaml `api_keys.keys`, or the store)
  is `sha256:<64 hex>` of the key. A leaked config file or store dump yields no usable key, and
  nothing here keeps, returns or logs the presented key. A plain (unsalted, fast) hash is enough
  because the keys are 256-bit random values, not passwords: there is no dictionary to try.
* **Timing-safe lookup.** The presented key is hashed *first*, and only its digest meets stored
  data: the dict lookup by digest, then `hmac.compare_digest` of the full digest. Any timing an
  attacker can observe therefore depends on the digest of their own guess, never on how many
  leading characters of a real key they got right, so a key cannot be recovered byte by byte
  (learning a prefix of a SHA-256 output gives no preimage). The constant-time compare after the
  dict hit is defence in depth: it confirms the match without an early-exit string compare.
* **Absurd input is refused before hashing.** Empty, longer than `MAX_PRESENTED_CHARS`, or any
  character outside visible ASCII: rejected as `api_key_invalid` after a length check, so a huge
  header never costs a hash of all of it.
* **Expiry** is checked against the `now` passed in (epoch seconds); nothing here reads a clock.
  A key is expired from its `expires_at` on.
* **Rotation** needs nothing special: every key is an independent record, so an owner may hold
  several active keys at once; issue the new one, move clients, revoke the old one.

`lookup` returns `(record, Reason.OK)` for a good key and `(None, reason)` otherwise, so a
caller cannot mistake an expired key's record for a pass.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from .reasons import Reason

if TYPE_CHECKING:  # config imports pydantic and yaml; the core needs only the shape
    from ..config import ApiKey

PREFIX = "xp_"
RANDOM_BYTES = 32
KEY_CHARS = len(PREFIX) + 43           # 32 bytes -> 43 base64url characters without padding
MAX_PRESENTED_CHARS = 256
DIGEST_PREFIX = "sha256:"

_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def generate(random_bytes: bytes) -> str:
    """A new key from exactly `RANDOM_BYTES` random bytes (pass `secrets.token_bytes(32)`)."""
    if not isinstance(random_bytes, bytes) or len(random_bytes) != RANDOM_BYTES:
        raise ValueError(f"an API key needs exactly {RANDOM_BYTES} random bytes")
    return PREFIX + base64.urlsafe_b64encode(random_bytes).rstrip(b"=").decode("ascii")


def digest(raw: str) -> str:
    """`sha256:<hex>` of the key's UTF-8 bytes: the only form in which a key is stored."""
    return DIGEST_PREFIX + hashlib.sha256(raw.encode("utf-8")).hexdigest()


def digest_hex(d: str) -> str:
    """The 64 hex characters of a `sha256:<hex>` digest."""
    return d[len(DIGEST_PREFIX):]


def is_digest(value: str) -> bool:
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def plausible(raw: str) -> bool:
    """Could this be a key at all? Length is checked before the characters are looked at."""
    return (isinstance(raw, str) and 0 < len(raw) <= MAX_PRESENTED_CHARS
            and _VISIBLE_ASCII.fullmatch(raw) is not None)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One key as stored: everything but the key itself.

    `source` is "config" (extproc.yaml, revoked by editing it) or "store" (managed through the
    admin API). `expires_at` and `created_at` are epoch seconds.
    """

    id: str
    digest: str
    owner: str
    scopes: tuple[str, ...] = ()
    tier: str = "default"
    expires_at: float | None = None
    source: str = "config"
    created_at: float | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def epoch(dt: datetime | None) -> float | None:
    """A config datetime as epoch seconds; a datetime without a zone is taken as UTC."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def record_from_config(key: ApiKey) -> KeyRecord:
    return KeyRecord(id=key.id, digest=key.digest, owner=key.owner, scopes=tuple(key.scopes),
                     tier=key.tier, expires_at=epoch(key.expires_at), source="config")


def judge(record: KeyRecord, presented_digest: str, now: float) -> tuple[KeyRecord | None, Reason]:
    """The verdict for a record found under `presented_digest`: constant-time confirm, then expiry."""
    if not hmac.compare_digest(record.digest.encode("ascii"), presented_digest.encode("ascii")):
        return None, Reason.API_KEY_INVALID
    if record.expired(now):
        return None, Reason.API_KEY_EXPIRED
    return record, Reason.OK


class KeyTable:
    """Records by digest, for keys known without I/O (config keys, and any added at run time)."""

    def __init__(self, records: Iterable[KeyRecord] = ()):
        self._by_digest: dict[str, KeyRecord] = {}
        self._by_id: dict[str, KeyRecord] = {}
        for r in records:
            self.add(r)

    @classmethod
    def from_config(cls, keys: Iterable[ApiKey]) -> KeyTable:
        return cls(record_from_config(k) for k in keys)

    def add(self, record: KeyRecord) -> None:
        """Add a record; a digest or id already present is an error (one key, one record)."""
        if not is_digest(record.digest):
            raise ValueError(f"api key {record.id!r}: digest must be sha256:<64 lower-case hex>")
        if record.digest in self._by_digest:
            raise ValueError(f"api key {record.id!r} has the same digest as {self._by_digest[record.digest].id!r}")
        if record.id in self._by_id:
            raise ValueError(f"api key id {record.id!r} appears twice")
        self._by_digest[record.digest] = record
        self._by_id[record.id] = record

    def remove(self, key_id: str) -> KeyRecord | None:
        record = self._by_id.pop(key_id, None)
        if record is not None:
            del self._by_digest[record.digest]
        return record

    def by_id(self, key_id: str) -> KeyRecord | None:
        return self._by_id.get(key_id)

    def find(self, presented_digest: str) -> KeyRecord | None:
        """The record stored under this digest (no verdict yet: see `judge`)."""
        return self._by_digest.get(presented_digest)

    def records(self) -> list[KeyRecord]:
        return list(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._by_id

    def lookup(self, raw: str, now: float) -> tuple[KeyRecord | None, Reason]:
        """`(record, OK)` for a known, unexpired key; `(None, API_KEY_INVALID | API_KEY_EXPIRED)` else."""
        if not plausible(raw):
            return None, Reason.API_KEY_INVALID
        presented = digest(raw)
        record = self._by_digest.get(presented)
        if record is None:
            return None, Reason.API_KEY_INVALID
        return judge(record, presented, now)
