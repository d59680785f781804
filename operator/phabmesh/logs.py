"""Structured logging: JSON lines in production, pretty output on a terminal.

Every process configures logging once with :func:`configure`. The standard
library's logging (which kopf and aiohttp use) is routed through the same
processor chain, so a redaction processor guards every line: values under
secret-sounding keys are dropped, and anything shaped like a Conduit API token,
a JWT or a PEM private key is masked wherever it appears.

Event names are snake_case facts in the past tense (``lease_issued``); the keys
below are the same everywhere.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import IO, Any

import structlog

# Log keys: one spelling everywhere.
NAMESPACE = "namespace"
POD = "pod"
POD_UID = "pod_uid"
BINDING = "binding"
BOT = "bot"
IDENTITY = "identity"
METHOD = "method"
REASON = "reason"
LEASE = "lease"
DECISION = "decision"
CREDENTIAL_FORMAT = "credential_format"  # "jwt" or "phorge-token" (never the credential)
ERROR = "error"

REDACTED = "[REDACTED]"
_SECRET_KEYS = frozenset(
    {
        "token",
        "api.token",
        "api_token",
        "credential",
        "authorization",
        "password",
        "secret",
        "private_key",
        "key_material",
        "bearer",
    }
)
_SECRET_PATTERNS = (
    re.compile(r"api-[a-z0-9]{28}"),  # Conduit API tokens
    re.compile(r"cli-[a-z0-9]{28}"),  # Conduit CLI tokens
    re.compile(r"eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*"),  # JWS/JWT
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S),
)


def redact_text(text: str) -> str:
    """Mask every token-, credential- or key-shaped substring of ``text``."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(REDACTED, text)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {
            k: REDACTED if str(k).lower() in _SECRET_KEYS else _redact_value(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def redact(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: never let a secret reach the output."""
    for key in list(event_dict):
        if key.lower() in _SECRET_KEYS:
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redact_value(event_dict[key])
    return event_dict


def _shared_processors() -> list[structlog.types.Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact,
    ]


def configure(
    level: str = "INFO", json_output: bool | None = None, stream: IO[str] | None = None
) -> None:
    """Configure structlog and the standard library's logging for this process."""
    stream = stream or sys.stderr
    if json_output is None:
        json_output = not stream.isatty()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    shared = _shared_processors()
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log duplicates our own audit lines.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
