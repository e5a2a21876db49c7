"""Shared state behind one protocol: `Store`, its errors and its backends.

`MemoryStore` is the embedded default. `RedisStore` is imported lazily (module
`__getattr__`), so a process that never configures Redis never imports the driver.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from extproc.store.base import Store, StoreError, WindowResult
from extproc.store.memory import MemoryStore

if TYPE_CHECKING:
    from extproc.store.redis import RedisStore

__all__ = ["MemoryStore", "RedisStore", "Store", "StoreError", "WindowResult"]


def __getattr__(name: str) -> Any:
    if name == "RedisStore":
        from extproc.store.redis import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
