"""Text from outside (a server's answer, a file name, a job name) made safe to show on a terminal or in a message."""

from __future__ import annotations


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str, limit: int | None = 120) -> str:
    """`text` with every character that is not printable written as a Python escape (`\\x1b`, `\\u202e`): control
    characters, terminal escape sequences, line breaks, bidirectional overrides. Cut at `limit` characters (None:
    not cut), ending in "…" when it was."""
    shown = text if limit is None else text[:limit]
    out = "".join(ch if ch.isprintable() else _escape(ch) for ch in shown)
    return out + ("…" if limit is not None and len(text) > limit else "")


def counted(n: int, noun: str) -> str:
    """"1 file", "2 files": a count with its noun (a regular plural)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


__all__ = ["counted", "printable"]
