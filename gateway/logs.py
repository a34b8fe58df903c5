"""Logging: readable text or one JSON object per line, and the canonical line per request.

Every request the gateway answers leaves exactly one ``cosigner.access``
line: request id, agent, method, canonical path, rule, decision, action id,
status, upstream status and latency. Nothing secret goes in it: the agent is
a name or a masked key fingerprint, the query string is left out, and the
token in a review link is replaced by ``***``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, Literal

from aiohttp import web

from gateway.keys import RequestInfo

access = logging.getLogger("cosigner.access")

LogFormat = Literal["text", "json"]
# Probes answered well are logged at DEBUG: a health check every few seconds would
# otherwise drown the lines an operator reads.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# SECURITY: a review link's token is a bearer secret; only its position is logged.
SECRET_PATH_PREFIXES = ("/review/",)
# Libraries whose DEBUG output carries data we do not control (SQL parameters, the SMTP
# conversation with its AUTH line): never below INFO, even when the gateway logs DEBUG.
QUIET_LIBRARIES = ("aiosqlite", "aiosmtplib", "asyncpg")
_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "fields"}


def _text_value(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    if text.isprintable() and not (" " in text or '"' in text or "=" in text) and text:
        return text
    return json.dumps(text, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``2024-11-19 10:00:00,123 INFO cosigner.access request request_id=req_… status=202``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self._stamp = (-1, "")  # (second, its date and time): one strftime a second

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """logging's default ``2024-11-19 10:00:00,123`` (local time), computed once a second."""
        second, text = self._stamp
        if int(record.created) != second:
            text = time.strftime(self.default_time_format, self.converter(record.created))
            self._stamp = (int(record.created), text)
        return f"{text},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        fields: Mapping[str, Any] | None = getattr(record, "fields", None)
        if not fields:
            return super().format(record)
        pairs = " ".join([f"{k}={_text_value(v)}" for k, v in fields.items()])
        if record.exc_info or record.exc_text or record.stack_info or record.args:
            head, sep, tail = super().format(record).partition("\n")  # a traceback stays below
            return f"{head} {pairs}{sep}{tail}"
        # The access line (once per request): the same text as the format string gives.
        record.message = str(record.msg)
        return (
            f"{self.formatTime(record)} {record.levelname} {record.name} {record.message} {pairs}"
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, then any structured fields."""

    def __init__(self) -> None:
        super().__init__()
        self._stamp = (-1, "")  # (second, its UTC date and time): one strftime a second

    def format(self, record: logging.LogRecord) -> str:
        second, stamp = self._stamp
        if int(record.created) != second:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            self._stamp = (int(record.created), stamp)
        out: dict[str, Any] = {
            "ts": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields: Mapping[str, Any] | None = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        for key, value in record.__dict__.items():
            if key not in _RESERVED and key not in out:
                out[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str = "INFO", fmt: LogFormat = "text") -> None:
    """Send every log record to stderr in the chosen format (replaces existing handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # No formatter here shows them, and every record (one per request) would look them up:
    # the logging HOWTO's "Optimization" switches.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    floor = max(root.level, logging.INFO)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(floor)


def loggable_path(path: str) -> str:
    """The path as it may be logged: review-link tokens masked."""
    for prefix in SECRET_PATH_PREFIXES:
        if path.startswith(prefix):
            _token, sep, rest = path[len(prefix) :].partition("/")
            return f"{prefix}***{sep}{rest}"
    return path


def log_request(info: RequestInfo, request: web.Request, status: int, started: float) -> None:
    """Emit the canonical line for one answered request (nothing is formatted when off).

    ``started``: ``time.perf_counter()`` when the request came in; its latency is only
    worked out for a line that is written.
    """
    if not access.isEnabledFor(logging.INFO):
        return  # nor for DEBUG, the probes' level: the usual case at WARNING costs one test
    path = info.path or request.rel_url.raw_path
    level = logging.DEBUG if path in PROBE_PATHS and status < 400 else logging.INFO
    if not access.isEnabledFor(level):
        return
    action_id = info.action_id
    if action_id == "-":
        # API and dashboard routes name the action in the path; the line carries it too.
        named = request.match_info.get("id", "")
        action_id = named if named.startswith("act_") else "-"
    fields = {
        "request_id": info.request_id,
        "agent": info.agent,
        "method": request.method,
        "path": loggable_path(path),
        "rule": info.rule,
        "decision": info.decision,
        "action_id": action_id,
        "status": status,
        "upstream_status": info.upstream_status,
        "latency_ms": round((time.perf_counter() - started) * 1000, 1),
    }
    # Made and handled directly: Logger.log would also walk the stack for a caller no
    # formatter here prints, on every request.
    access.handle(
        access.makeRecord(
            access.name, level, __file__, 0, "request", (), None, extra={"fields": fields}
        )
    )
