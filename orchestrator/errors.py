"""What the user sees when something goes wrong: one line, secrets redacted.

`redact_text` hides credentials anywhere in a text (a URI's user info and secret query
values, `secret_key=...` pairs, the values of the AWS credential variables of this
process); `install_redaction` applies it to every log record of the process, whichever
library logs it. `one_line` is the line printed for an error; the command's top-level
handler (orchestrator.cli) prints it and the traceback only when asked (`--debug` or
`hydra.verbose`).
"""
from __future__ import annotations

import logging
import os
import re

from orchestrator.uris import redact
from workers.settings import SettingError

# A URI inside a text: scheme://..., up to a space, a quote or a closing bracket.
_URI = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>\]\)]+")
# key=value pairs whose value is a secret, inside or outside a URI
_SECRET_PAIR = re.compile(r"(?i)\b(access_key|secret_key|session_token|password|passwd|token|sig|signature"
                          r"|aws_secret_access_key|aws_session_token)=([^&\s'\",\]\)]+)")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN")


def redact_text(text: str) -> str:
    """`text` with every credential it holds replaced by ***."""
    text = _URI.sub(lambda m: redact(m.group(0)), str(text))
    text = _SECRET_PAIR.sub(lambda m: f"{m.group(1)}=***", text)
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 6:
            text = text.replace(value, "***")
    return text


def one_line(err: BaseException) -> str:
    """The error as one line (its first non-empty line, whitespace collapsed), redacted."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    text = " ".join(lines[0].split()) if lines else type(err).__name__
    return redact_text(text)


_installed = False


def install_redaction() -> None:
    """Redact every log record of this process as it is made (its message with its arguments
    merged), whatever logger and handler it goes to: Hydra's, Ray's and MLflow's included."""
    global _installed
    if _installed:
        return
    _installed = True
    make = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's to report
            return record
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(factory)


class UserError(RuntimeError):
    """The base of every error the user sees as one line naming the thing and the fix; the
    command prints it and exits with `code`. Each layer has its own (StoreError, LedgerError,
    PoolError, ...); anything else that reaches the command is a bug, printed as one line too."""
    code = 1


class ConfigError(UserError, SettingError):
    """A user mistake in the config, or an output location that cannot be used: one line,
    naming the setting and the fix (exit code 2, before anything runs)."""
    code = 2
