"""Secrets never reach a log, a record, a report or captured output.

A secret is the value of an environment variable that holds a credential: ``QMR_OPENAI_API_KEY``,
the judges' ``api_key_env`` variables (registered by name when a judge is built), and any
variable whose name says it is one (``*KEY*``, ``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``), plus
keys this process made itself (a started server's per-server key, registered by value).
Values shorter than :data:`MIN_LENGTH` are not treated as secrets (they would redact ordinary
text).

:func:`redact` replaces every secret in a text with ``***``. :func:`install` makes every log
record of the process pass through it (a logging record factory, so every handler — pytest's
capture, lm-eval's, a user's — sees the redacted text, traceback text included); the plugin and
the ``qmr`` CLI install it at start. Records and reports are written through :func:`redact_obj`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

MIN_LENGTH = 8
MIN_URL_PASSWORD = 4
MASK = "***"
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
ALWAYS = ("QMR_OPENAI_API_KEY", "QMR_SERVE_KEY")

URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<password>[^/@\s]+)@")

# The process-wide registry (logging is process-wide too): names of variables, and values made here.
_names: set[str] = set(ALWAYS)
_values: set[str] = set()
_url_passwords: set[str] = set()  # registered by register_url: masked at any length


def register_name(name: str | None) -> None:
    """Treat the environment variable ``name`` as holding a secret (e.g. a judge's api_key_env)."""
    if name:
        _names.add(name)


def register_value(value: str | None) -> None:
    """Treat ``value`` itself as a secret (a key generated in this process)."""
    if value and len(value) >= MIN_LENGTH:
        _values.add(value)


def url_password(url: str) -> str | None:
    """The (percent-decoded) password in a URL's userinfo, or None."""
    try:
        return unquote(urlsplit(url.strip()).password or "") or None
    except ValueError:
        return None


def register_url(url: str | None) -> None:
    """Treat the password in ``url``'s userinfo (if any) as a secret, whatever its length."""
    password = url_password(url or "")
    if password and len(password) >= MIN_URL_PASSWORD:
        _url_passwords.add(password)


def secrets_in(env: Mapping[str, str] | None = None) -> list[str]:
    """Every secret value known now, longest first (so a key containing another is masked whole)."""
    env = os.environ if env is None else env
    found = set(_values) | _url_passwords
    for name, value in env.items():
        if (name in _names or SECRET_NAME.search(name)) and value and len(value) >= MIN_LENGTH:
            found.add(value)
        if value and "://" in value and "@" in value:
            found.update(p for v in value.split(",") if len(p := url_password(v) or "") >= MIN_URL_PASSWORD)
    return sorted(found, key=len, reverse=True)


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    text = URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    for secret in secrets_in(env):
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact_obj(obj: Any) -> Any:
    """``obj`` (JSON-like) with every string redacted."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, Mapping):
        return {redact_obj(k): redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return obj


def _redact_record(record: logging.LogRecord) -> logging.LogRecord:
    secrets = secrets_in()
    if not secrets:
        return record
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a malformed record: leave it to logging's own error path
        return record
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, ()
    if record.exc_info and record.exc_info[0] is not None:
        text = logging.Formatter().formatException(record.exc_info)
        record.exc_text, record.exc_info = redact(text), None
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    return record


def install() -> None:
    """Route every log record created from now on through :func:`redact` (idempotent)."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "qmr_redacting", False):
        return

    def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return _redact_record(factory(*args, **kwargs))

    redacting_factory.qmr_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(redacting_factory)
