"""GET /logging, POST /logging: the log level, changed at runtime without a restart.

POST {"level": "debug"|"info"|"warning"|"error", "logger": "extproc.authz"} (logger optional:
the whole `extproc` tree by default) needs the admin bearer token. Under `--workers N` the
supervisor applies it to itself and hands it to every worker (a small file beside the process
plus SIGUSR1); a restarted worker starts from the configured level again.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def handoff_path(supervisor_pid: int) -> Path:
    return Path(tempfile.gettempdir()) / f"extproc-{supervisor_pid}.loglevel.json"


def apply(level: str, logger: str = "extproc") -> None:
    logging.getLogger(logger).setLevel(LEVELS[level])


def current() -> dict:
    out = {}
    for name in ("extproc", "extproc.authz", "extproc.processor", "extproc.cache", "extproc.breaker",
                 "extproc.ratelimit", "extproc.identity", "extproc.audit"):
        out[name] = logging.getLevelName(logging.getLogger(name).getEffectiveLevel()).lower()
    return out


def hand_to_workers(level: str, logger: str, signal_all: Callable[[int], None]) -> None:
    """Supervisor side: write the change where workers find it, then wake them."""
    path = handoff_path(os.getpid())
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"level": level, "logger": logger}))
    os.replace(tmp, path)
    signal_all(signal.SIGUSR1)


def take_from_supervisor() -> None:
    """Worker side (SIGUSR1): apply what the supervisor handed over."""
    try:
        doc = json.loads(handoff_path(os.getppid()).read_text())
        apply(doc["level"], doc.get("logger", "extproc"))
    except (OSError, ValueError, KeyError):
        logging.getLogger("extproc").warning("log level hand-off unreadable; level unchanged")


def add_routes(app: web.Application, authorized, audit: logging.Logger,
               on_change: Callable[[str, str], None] | None = None) -> None:
    async def show(request: web.Request) -> web.Response:
        return web.json_response({"levels": current()})

    async def change(request: web.Request) -> web.Response:
        denied = authorized(request)
        if denied is not None:
            return denied
        try:
            body = await request.json()
            level = body["level"]
            logger = body.get("logger", "extproc")
            if level not in LEVELS or not isinstance(logger, str) or not (logger == "extproc"
                                                                          or logger.startswith("extproc.")):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": 'expected {"level": "debug|info|warning|error", '
                                               '"logger": "extproc[.name]"}'}, status=400)
        apply(level, logger)
        if on_change is not None:
            on_change(level, logger)
        audit.info("log level changed", extra={"action": "logging.level", "level": level, "logger": logger})
        return web.json_response({"levels": current()})

    app.router.add_get("/logging", show)
    app.router.add_post("/logging", change)
