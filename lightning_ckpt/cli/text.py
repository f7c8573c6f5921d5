"""Text on its way to a terminal: what a checkpoint records (names, tags, metric names, hparams, run and branch names,
file names, error messages quoting them) is untrusted, and an ANSI escape sequence, a carriage return or a newline in
it could rewrite what the user sees. Every human-readable line the CLI prints goes through :func:`say`; ``--json``
output needs nothing (``json.dumps`` escapes control characters) and the HTML report escapes its own.
"""
from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings
from typing import Any, Iterator

# C0 and C1 controls (ESC starts every ANSI sequence; \r, \n, \b, \t), bidirectional and zero-width formatting marks
# (text that reads differently from what it is), line/paragraph separators, lone surrogates (unprintable)
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]")


_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match) -> str:
    ch = m.group()
    if ch in _SHORT:
        return _SHORT[ch]
    c = ord(ch)
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def shown(x: Any) -> str:
    """``x`` as text that cannot steer a terminal: each character above as ``\\n``, ``\\r``, ``\\t``, ``\\xNN``, ``\\uNNNN``."""
    return _UNSAFE.sub(_escape, x if isinstance(x, str) else str(x))


def say(text: Any = "", *, file: Any = None, lines: bool = False) -> None:
    """Print ``text`` escaped (:func:`shown`). ``lines``: keep its line breaks (a message of several lines that the
    package wrote; anything else in it is still escaped)."""
    text = "\n".join(shown(t) for t in str(text).split("\n")) if lines else shown(text)
    print(text, file=file if file is not None else sys.stdout)


class _EscapingHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            say(f"lightning-ckpt: {record.getMessage()}", file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging never fails the command
            self.handleError(record)


@contextlib.contextmanager
def escaped_diagnostics() -> Iterator[None]:
    """While a verb runs, its warnings and the package's log messages reach stderr escaped, one line each."""
    log = logging.getLogger("lightning_ckpt")
    handler = _EscapingHandler(logging.WARNING)
    log.addHandler(handler)

    def one_line(message: Any, category: type, filename: str, lineno: int, line: Any = None) -> str:
        return shown(f"lightning-ckpt: warning: {message}") + "\n"

    before = warnings.formatwarning  # (catch_warnings does not restore it)
    warnings.formatwarning = one_line  # how a shown warning reads; recorded ones (pytest.warns) are untouched
    try:
        yield
    finally:
        warnings.formatwarning = before
        log.removeHandler(handler)
