"""Text from outside (a server's answer, a file name, a job name) made safe to show on a terminal or in a message."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from pathlib import Path
from typing import Any

#: Terminal escape sequences (ECMA-48), as a remote program's coloured log holds them: CSI `ESC [ … final` (colours,
#: cursor moves, line erases), the strings OSC `ESC ] …` (window titles, hyperlinks), DCS `ESC P …`, SOS `ESC X …`,
#: PM `ESC ^ …` and APC `ESC _ …` up to BEL or ST, the one-character C1 forms of these introducers, and the short
#: escapes (`ESC c`, `ESC 7`, `ESC ( B`). A string whose terminator never comes ends at the end of its line, so that a
#: cut-off sequence cannot swallow the rest of a log. A lone ESC goes as well.
_ANSI = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c\n]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]"
    r"|\x1b"
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
    """`text` without terminal escape sequences (see `_ANSI`): a tool's coloured output (a workflow engine's stderr)
    stored and shown as the words it shows on a terminal. Line breaks and the text between sequences stay;
    `printable` is still what makes the rest safe to show."""
    return _ANSI.sub("", text)


#: How a QC report's figures are named for people, in the order they are shown.
_QC_LABELS = (
    ("reference_overlap", "reference overlap {:g} %"),
    ("matched", "{:,} SNPs matched"),
    ("snps_excluded", "{:,} excluded"),
    ("allele_switches", "{:,} allele switches"),
    ("strand_flips", "{:,} strand flips"),
    ("strand_flips_and_allele_switches", "{:,} strand flips with allele switches"),
    ("chunks_excluded", "{:,} chunks excluded"),
    ("failed_step", "failed in {}"),
)


def qc_summary(qc: dict[str, Any] | None) -> str:
    """A QC report (`remote.QcReport.as_dict`) in one line for people; "-" when there is none."""
    if not qc:
        return "-"
    parts = [label.format(qc[key]) for key, label in _QC_LABELS if qc.get(key) is not None]
    warnings = qc.get("warnings") or []
    if warnings:
        parts.append(counted(len(warnings), "warning"))
    return ", ".join(parts) or "-"


def counted(n: int, noun: str) -> str:
    """"1 file", "2 files": a count with its noun (a regular plural)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


__all__ = ["counted", "json_default", "printable", "qc_summary", "strip_ansi"]


def json_default(value: Any) -> Any:
    """What `json.dumps` makes of the values our snapshots hold: times in ISO 8601, ids and paths as text."""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID | Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")
