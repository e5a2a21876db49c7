"""The demo IdP's opaque tokens: what each one means, for introspection (RFC 7662) and
revocation (RFC 7009).

With a state directory, every token is a small file, `<state-dir>/opaque-tokens/<sha256>.json`,
written atomically. The replicas of docker-compose and `scripts/stack` share that directory (the
signing key and the introspection secret live there too), so a token issued by one replica
introspects at any of them, and a revocation at one holds at all. The file name is the token's
digest, never the token. Without a directory (one replica), the tokens live in this process's
memory. Bounded either way: expired tokens are swept (in the directory every `SWEEP_EVERY` issues,
so it holds at most `max_tokens + SWEEP_EVERY` files), then those expiring first go.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

SWEEP_EVERY = 1000          # issues between two sweeps of the directory


class OpaqueTokens:
    def __init__(self, state_dir: Path | None, max_tokens: int) -> None:
        self.dir = state_dir / "opaque-tokens" if state_dir is not None else None
        self.max_tokens = max_tokens
        self._memory: dict[str, dict[str, Any]] = {}
        self._issued = 0

    def __contains__(self, token: object) -> bool:
        return isinstance(token, str) and self.get(token) is not None

    def __getitem__(self, token: str) -> dict[str, Any]:
        claims = self.get(token)
        if claims is None:
            raise KeyError("unknown token")
        return claims

    def _path(self, token: str) -> Path:
        assert self.dir is not None
        return self.dir / f"{hashlib.sha256(token.encode()).hexdigest()}.json"

    def get(self, token: str) -> dict[str, Any] | None:
        """The token's claims as issued (with `active`), or None for a token never issued here."""
        if self.dir is None:
            got = self._memory.get(token)
            return dict(got) if got is not None else None
        try:
            claims = json.loads(self._path(token).read_text())
        except (OSError, ValueError):
            return None
        return claims if isinstance(claims, dict) else None

    def issue(self, token: str, claims: dict[str, Any], now: float) -> None:
        if self.dir is None:
            if len(self._memory) >= self.max_tokens:
                self._memory = {t: c for t, c in self._memory.items() if c["exp"] > now}
                while len(self._memory) >= self.max_tokens:
                    del self._memory[next(iter(self._memory))]
            self._memory[token] = dict(claims)
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._issued % SWEEP_EVERY == 0:
            self._sweep(now)
        self._issued += 1
        self._write(self._path(token), claims)

    def deactivate(self, token: str) -> bool:
        """Mark the token inactive everywhere; False when it was never issued here."""
        if self.dir is None:
            got = self._memory.get(token)
            if got is not None:
                got["active"] = False
            return got is not None
        claims = self.get(token)
        if claims is None:
            return False
        claims["active"] = False
        self._write(self._path(token), claims)
        return True

    @staticmethod
    def _write(path: Path, claims: dict[str, Any]) -> None:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(claims, separators=(",", ":")))
        exp = float(claims.get("exp", 0))
        os.utime(tmp, (exp, exp))       # the file's mtime is the token's expiry: a sweep reads no file
        os.replace(tmp, path)           # readers see the old file or the new one, never half of one

    def _sweep(self, now: float) -> None:
        """Delete expired tokens' files (mtime = exp); past the bound, those expiring first."""
        assert self.dir is not None
        live: list[tuple[float, str]] = []
        for entry in os.scandir(self.dir):
            try:
                exp = entry.stat().st_mtime
                if exp <= now:
                    os.unlink(entry.path)
                elif entry.name.endswith(".json"):
                    live.append((exp, entry.path))
            except OSError:
                pass        # another replica swept it first
        if len(live) >= self.max_tokens:
            live.sort()
            for _, path in live[:len(live) - self.max_tokens + 1]:
                try:
                    os.unlink(path)
                except OSError:
                    pass
