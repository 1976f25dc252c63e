"""The files and folders of a result directory, as both the downloader (`daemon.downloads`) and the zip extractor
(`daemon.results`) make them: server-given names kept inside the directory, exact modes (files 0640, folders
0750), temp files in `.partial/` beside their destination, and folders fsynced once something is renamed in."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from pathlib import Path, PurePosixPath

from daemon.services.errors import Permanent
from daemon.text import printable

#: Temp files of downloads and extractions in progress, inside each result directory.
PARTIAL_DIR = ".partial"
PARTIAL_SUFFIX = ".part"
#: Where the bytes of broken resumable downloads wait for the rest, in each result directory.
RESUME_DIR = ".resume"
FILE_MODE = 0o640
DIR_MODE = 0o750
#: Longest file-name component most file systems accept (bytes).
NAME_MAX = 255
_DRIVE = re.compile(r"^[A-Za-z]:")


def safe_relative_path(name: str) -> PurePosixPath:
    """The server-given `name` as a relative path that stays inside the result directory.

    Subfolders are kept ("statistics/summary.txt"). Rejected with `Permanent(kind="unsafe_name")`: empty names,
    absolute paths, `..`, `.` and empty components (also a trailing slash), backslashes, Windows drive letters,
    control characters (NUL included), names that are not valid Unicode, components longer than 255 bytes, and
    the reserved first components `.partial` and `.resume`.
    """

    def reject(why: str) -> Permanent:
        return Permanent(f"unsafe result file name {printable(name)!r}: {why}", kind="unsafe_name")

    if not isinstance(name, str) or not name:
        raise reject("empty")
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F for ch in name):
        raise reject("contains a control character")
    if "\\" in name:
        raise reject("contains a backslash")
    if _DRIVE.match(name):
        raise reject("starts with a drive letter")
    if name.startswith("/"):
        raise reject("absolute path")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise reject("not valid Unicode") from None
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise reject(f"has a {part or 'empty'!r} path component" if part else "has an empty path component")
        if len(part.encode("utf-8")) > NAME_MAX:
            raise reject(f"a path component is longer than {NAME_MAX} bytes")
    if parts[0] in (PARTIAL_DIR, RESUME_DIR):
        raise reject(f"{parts[0]!r} is reserved for downloads in progress")
    return PurePosixPath(*parts)


def remove_partial_dir(result_dir: Path) -> None:
    """Remove `result_dir/.partial/` if it is there and empty (another download may still be using it)."""
    with contextlib.suppress(OSError):
        os.rmdir(Path(result_dir) / PARTIAL_DIR)


def make_dirs(path: Path, *, base: Path | None = None) -> list[Path]:
    """Create `path` and its missing parents (below `base`, when given) with mode 0750; return what was created.

    Safe against a concurrent download creating the same folder. The `.partial` folder may vanish between its
    creation and use when another download removes it empty; `downloads` and `results` therefore create it right
    before use.
    """
    path = Path(path)
    with contextlib.suppress(OSError):
        if stat.S_ISDIR(os.stat(path).st_mode):  # the common case, in one system call
            return []
    missing: list[Path] = []
    current = path
    while not current.exists():
        if base is not None and current == base:
            break
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    created = []
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(directory, DIR_MODE)  # the umask may have narrowed or the mode; make it exactly 0750
        created.append(directory)
    if not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))
    return created


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "CHECKSUM_SUFFIX",
    "DIR_MODE",
    "FILE_MODE",
    "MD5SUM_MAX",
    "NAME_MAX",
    "PARTIAL_DIR",
    "PARTIAL_SUFFIX",
    "fsync_dir",
    "make_dirs",
    "parse_md5sum",
    "read_md5sum",
    "remove_partial_dir",
    "safe_relative_path",
]


#: What imputationserver2 writes beside each result zip: `md5sum`'s line for it ("HASH  NAME", or "HASH *NAME").
CHECKSUM_SUFFIX = ".md5"
_MD5SUM_LINE = re.compile(r"([0-9a-fA-F]{32}) [ *](.+)")
#: The most of a stored `.md5` file that is read: md5sum writes one short line per file.
MD5SUM_MAX = 64 * 1024


def parse_md5sum(text: str, name: str) -> str:
    """The MD5 (lower-case hex) that a `.md5` file publishes for the file `name`; `Permanent(kind="bad_checksum")`
    naming the `.md5` file when it holds no line for it."""
    for line in text.splitlines():
        match = _MD5SUM_LINE.fullmatch(line.strip())
        if match and PurePosixPath(match.group(2).strip()).name == PurePosixPath(name).name:
            return match.group(1).lower()
    shown = printable(name + CHECKSUM_SUFFIX)
    raise Permanent(f"{shown}: not an md5sum line for {printable(PurePosixPath(name).name)} (expected 'HASH  NAME')",
                    kind="bad_checksum")


def read_md5sum(path: Path, name: str) -> str:
    """`parse_md5sum` of the stored `.md5` file at `path`, of which at most MD5SUM_MAX bytes are read: a bigger one
    is no md5sum file (`Permanent(kind="bad_checksum")`), and is not read into memory whole. `OSError`s pass."""
    with open(path, "rb") as fh:
        data = fh.read(MD5SUM_MAX + 1)
    if len(data) > MD5SUM_MAX:
        raise Permanent(f"{printable(name + CHECKSUM_SUFFIX)}: more than {MD5SUM_MAX} bytes, not an md5sum file",
                        kind="bad_checksum")
    return parse_md5sum(data.decode("utf-8", "replace"), name)
