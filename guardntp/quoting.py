"""Outside text made safe to echo in a one-line error or a log line.

Rule: a value that came from a peer, a file or a database row is shown escaped
(:func:`ascii`: no control characters, no terminal escapes) and cut short, so one
bad value cannot turn an error message into a flood or a forged log line.
"""

from __future__ import annotations


def shown(value: object) -> str:
    """``value`` escaped and at most 60 characters long."""
    text = ascii(value)
    return text if len(text) <= 60 else text[:57] + "..."


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """An error's text on one line (runs of white space made one space), cut at ``limit``."""
    return " ".join(str(error).split())[:limit]
