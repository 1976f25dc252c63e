"""Text from outside (a server's answer, a file name, a job name) made safe to show on a terminal or in a message."""

from __future__ import annotations

import re

#: Terminal escape sequences (ECMA-48): CSI (colours, cursor moves: ESC [ … or the 8-bit CSI), OSC (window titles,
#: hyperlinks: ESC ] … ended by BEL or ESC backslash), the other string controls (DCS, SOS, PM, APC), and the escapes of
#: one character after ESC (a reset, a saved cursor).
_ANSI = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"
    r"|\x1b[PX^_][^\x1b]*\x1b\\"
    r"|\x1b[0-~]"
)


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


def strip_ansi(text: str) -> str:
    """`text` without terminal escape sequences: a tool's coloured output (a workflow engine's stderr) stored and
    shown as the words it shows on a terminal. Stray control characters that are not part of a sequence stay, for
    `printable` to escape."""
    return _ANSI.sub("", text)


def counted(n: int, noun: str) -> str:
    """"1 file", "2 files": a count with its noun (a regular plural)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


__all__ = ["counted", "printable", "strip_ansi"]
