"""Logging set-up for the command line, with secrets redacted from every record.

Debug logging of third-party clients (botocore logs request headers, session tokens included)
is useful when a run cannot reach its storage, so ``-v`` turns it on for everything; the filter
below replaces any known secret with ``***`` before a record is written anywhere.
"""

from __future__ import annotations

import logging

from mils_pipeline.settings import secret_from_env

# Environment variables whose values are credentials.
SECRET_VARIABLES = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "OPENAI_API_KEY",
    "MILS_GENERATOR_API_KEY",
)
_registered: set[str] = set()


def register_secret(value: str | None) -> None:
    """Redact ``value`` from every log record from now on (API keys read from a config)."""
    if value and len(value) >= 4:
        _registered.add(value)


def known_secrets() -> list[str]:
    values = {secret_from_env(name) for name in SECRET_VARIABLES} | _registered
    # longest first, so a secret that contains another is replaced whole
    return sorted((v for v in values if v and len(v) >= 4), key=len, reverse=True)


def redact(text: str) -> str:
    for secret in known_secrets():
        text = text.replace(secret, "***")
    return text


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            # formatters use exc_text when it is set: the traceback is redacted once, here
            record.exc_text = redact(_FORMATTER.formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


_FORMATTER = logging.Formatter()


def install_log_redaction(prefixes: tuple[str, ...] = ("prefect",)) -> None:
    """Put the redaction filter on every handler of the root logger and of the loggers under
    ``prefixes`` (Prefect configures its console and API handlers lazily, so flows call this
    when they start). Idempotent."""
    loggers = [logging.getLogger()] + [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if any(name == p or name.startswith(p + ".") for p in prefixes)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactSecrets) for f in handler.filters):
                handler.addFilter(RedactSecrets())


def setup_logging(verbose: bool) -> None:
    """Warnings only, or debug for everything with ``verbose``; secrets redacted either way."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
