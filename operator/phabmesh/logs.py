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
WEBHOOK = "webhook"  # a PhabricatorWebhook's name
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
# Longest string value a log line carries; anything longer is cut (see :func:`clip`).
MAX_VALUE_CHARS = 8192
# Characters of a token, a JWT or base64 key material: a cut never leaves a piece of one.
_BASE64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.+/="
# Conduit tokens (api-, cli-, clr-): of any length after a word boundary, since Phorge echoes
# a wrong one, whatever its length, in its errors; and a whole one (28 characters) anywhere.
# Either way a search costs at most 32 steps per position, or consumes what it matched.
_CONDUIT_TOKEN = re.compile(r"\b(?:api|cli|clr)-[A-Za-z0-9]+|(?:api|cli|clr)-[a-z0-9]{28}")
# A maximal run of base64url characters and dots: each character is read once.
_DOTTED_RUN = re.compile(r"[A-Za-z0-9_.-]+")
_PEM_HEAD = re.compile(r"-----BEGIN [A-Z ]{0,40}PRIVATE KEY-----")
_PEM_TAIL = re.compile(r"-----END [A-Z ]{0,40}-----")
# Every scan here is linear in the text: each moves forward only, and no pattern can rescan
# an unbounded stretch from each of many starting points. Log values reach them clipped.


def clip(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, never ending in part of a token or key."""
    if len(text) <= limit:
        return text
    kept = text[:limit].rstrip(_BASE64_CHARS)
    return f"{kept}…[{len(text) - len(kept)} more characters]"


def _mask_jwts(text: str) -> str:
    """Mask from each ``eyJ`` to the end of its dotted run, if two dots follow (a JWS/JWT)."""
    out: list[str] = []
    pos = 0
    while (start := text.find("eyJ", pos)) >= 0:
        run = _DOTTED_RUN.match(text, start)
        assert run is not None  # "eyJ" itself is a run
        if text.count(".", start, run.end()) >= 2:
            out.append(text[pos:start])
            out.append(REDACTED)
            pos = run.end()
        else:
            out.append(text[pos : run.end()])
            pos = run.end()
    out.append(text[pos:])
    return "".join(out)


def _mask_private_keys(text: str) -> str:
    """Mask each PEM private key, from its BEGIN line through its END line (or to the end)."""
    out: list[str] = []
    pos = 0
    while (head := _PEM_HEAD.search(text, pos)) is not None:
        end = text.find("-----END ", head.end())
        if end < 0:  # a key without its END line is still a key
            stop = len(text)
        else:
            tail = _PEM_TAIL.match(text, end)
            stop = tail.end() if tail is not None else end + len("-----END ")
        out.append(text[pos : head.start()])
        out.append(REDACTED)
        pos = stop
    out.append(text[pos:])
    return "".join(out)


def _may_hold_secret(text: str) -> bool:
    """Whether any of the maskers below could match: each needs its own literal (a PEM
    private key's ``-----BEGIN ``, a Conduit token's ``api-``/``cli-``/``clr-``, a JWT's
    ``eyJ``). Most log values hold none, and are passed on after these few scans."""
    return (
        "eyJ" in text or "-----BEGIN " in text or "api-" in text or "cli-" in text or "clr-" in text
    )


def redact_text(text: str, *secrets: str | None) -> str:
    """``text`` with each of ``secrets`` (those known to the caller: the token it sent) and
    every token-, credential- or key-shaped substring masked, in linear time: Conduit tokens
    of any length, JWTs and PEM private keys. The one redaction of phabmesh, for log lines
    and for Phabricator's error messages passed on to callers alike."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    if not _may_hold_secret(text):
        return text
    text = _mask_private_keys(text)
    text = _CONDUIT_TOKEN.sub(REDACTED, text)
    return _mask_jwts(text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(clip(value))
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
    # No line shows where it was logged from, nor the thread or process: the standard
    # library need not find those out for each record (the logging HOWTO's "Optimization").
    logging._srcfile = None  # the documented way to skip the caller lookup
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log duplicates our own audit lines.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
