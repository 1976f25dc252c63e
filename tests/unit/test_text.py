"""Text from outside made safe to show: terminal escapes removed or written as escapes."""

from __future__ import annotations

import pytest

from daemon.text import printable, strip_ansi


@pytest.mark.parametrize(("raw", "shown"), [
    ("\x1b[31mERROR\x1b[0m: x", "ERROR: x"),  # colours (CSI)
    ("\x1b[2J\x1b[1;1Hcleared", "cleared"),  # erase the screen, move the cursor
    ("\x9b1mbold", "bold"),  # the 8-bit CSI
    ("\x1b]8;;https://x.example\x07link\x1b]8;;\x07", "link"),  # a hyperlink (OSC, ended by BEL)
    ("\x1b]0;title\x1b\\after", "after"),  # a window title (OSC, ended by ESC backslash)
    ("\x1bP1$r\x1b\\done", "done"),  # a device control string
    ("reset\x1bc", "reset"),  # ESC and one character
    ("\x1b(Bascii", "ascii"),  # ESC, an intermediate, a final
    ("\x1b]0;cut off\nnext line", "\nnext line"),  # a string never terminated ends at its line
    ("\x9d0;c1 title\x9cshown", "shown"),  # the one-character C1 introducer and terminator
    ("tab\tand line\nbreak", "tab\tand line\nbreak"),  # plain text is left alone
])
def test_terminal_escape_sequences_are_removed(raw: str, shown: str) -> None:
    assert strip_ansi(raw) == shown


def test_a_lone_escape_goes_and_other_controls_are_left_for_printable() -> None:
    assert strip_ansi("end\x1b") == "end"
    assert printable(strip_ansi("bell\x07 and nul\x00")) == "bell\\x07 and nul\\x00"
