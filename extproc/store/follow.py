"""Following fleet state kept in the store: subscribe, read the whole state, then apply messages.

Subscribing before the read leaves no gap (a change written before the subscription is in the
state read, one written after it is delivered). Any failure (the store unreachable, the
subscription lost, a bug) is reported once per outage, and the loop starts over every
`retry_seconds` until it is cancelled. Used by the cache's purge records and the circuit breakers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .base import Store, StoreError, Subscription


async def follow(store: Store, channel: str, *, resync: Callable[[], Awaitable[None]],
                 on_message: Callable[[bytes], None], on_state: Callable[[bool], None],
                 retry_seconds: float, what: str, lost: str, log: logging.Logger) -> None:
    """`on_state(True)` once subscribed and resynced, `on_state(False)` on every failure; `what`
    names the follower in its log lines, `lost` is the warning logged once per outage."""
    lost_logged = False
    while True:
        sub: Subscription | None = None
        try:
            sub = await store.subscribe(channel)
            await resync()
            on_state(True)
            if lost_logged:
                lost_logged = False
                log.info(f"{what} resynced")
            async for raw in sub:
                on_message(raw)
            raise StoreError(f"{what} subscription ended", transient=True)
        except Exception as exc:  # noqa: BLE001 - the follower must outlive any failure
            on_state(False)
            if not lost_logged:
                lost_logged = True
                if not isinstance(exc, StoreError):      # a bug, not an outage: keep the traceback
                    log.exception(f"{what} follower failed")
                log.warning(lost, extra={"error": str(exc), "retry_seconds": retry_seconds})
        finally:
            if sub is not None:
                await sub.close()
        await asyncio.sleep(retry_seconds)
