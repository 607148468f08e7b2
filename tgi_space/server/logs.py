"""Logging set-up: plain text, or one JSON line per record in the format TGI's launcher parses.

The launcher reads the shard's stdout and re-emits every line shaped like
loguru's `serialize=True` output, reading only `text` and `record.level.name`.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

# --logger-level values the launcher sends (tracing names) -> Python levels.
LEVELS = {
    "TRACE": logging.DEBUG,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
    "OFF": logging.CRITICAL + 10,
}


def parse_level(name: str) -> int:
    """A Python level from a launcher/loguru level name (case-insensitive)."""
    try:
        return LEVELS[name.upper()]
    except KeyError:
        raise ValueError(f"--logger-level must be one of {', '.join(LEVELS)}, got {name!r}") from None


class LauncherJsonFormatter(logging.Formatter):
    """`{"text": ..., "record": {"level": {"name": ...}, ...}}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        level = "CRITICAL" if record.levelno >= logging.CRITICAL else record.levelname
        when = datetime.fromtimestamp(record.created, tz=timezone.utc)
        payload = {
            "text": text + "\n",
            "record": {
                "level": {"name": level, "no": record.levelno},
                "message": text,
                "name": record.name,
                "function": record.funcName,
                "line": record.lineno,
                "time": {"repr": when.isoformat(), "timestamp": record.created},
            },
        }
        return json.dumps(payload, ensure_ascii=False)


def setup_logging(level: str = "INFO", json_output: bool = False) -> None:
    """Send every log record to stdout, one flushed line each."""
    handler = logging.StreamHandler(sys.stdout)
    if json_output:
        handler.setFormatter(LauncherJsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(parse_level(level))
