"""Download one result file safely: stream it into a temp file beside its destination, hash it while it arrives,
check its length (and a zip's CRCs), then move it into place atomically.

Rules this module keeps:

- A server-given file name never escapes the result directory (`safe_relative_path`).
- A file appears under its final name only when it is complete and verified; every error path removes the partial.
  Partials live in `<result_dir>/.partial/` (same file system, so the final `os.replace` is atomic); a SIGKILL can
  leave some behind, which `remove_partials` clears at start-up.
- The download URL is never seen here (the caller hands an `open_stream` callable giving a `ByteStream`) and never
  appears in a message; nor is HTTP: the adapters map its statuses and failures to our errors.
- Each GET may spend one of the server's download counts (Cloudgene: 10 per file), so nothing here retries: the
  caller decides, counting attempts.

Errors: `Permanent(kind="unsafe_name")` for a hostile name; `BadDownload` (a `Transient`: the server served the
file, spending a download count, and what arrived is unusable) with kinds `truncated`, `length_mismatch`,
`timeout`/`connection` (mid-body), `bad_response` (garbled Content-Length or Content-Encoding), `corrupt_zip`,
`size_mismatch`/`checksum_mismatch` (not what the server `Published`: a WES size or checksum, a zip's `.md5`);
`Transient` with kinds `timeout`/`connection` (before an answer), `disk_full`, `interrupted` (`DownloadInterrupted`);
`Permanent(kind="zip_password")` when the job's password does not open the zip; the adapter's own errors (a
refusal, a failure before the answer) pass through. Other local `OSError`s (permissions, a read-only file system)
propagate unchanged: they need an operator, not another download.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import queue
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from daemon import results
from daemon.remote import ByteStream, Resume
from daemon.resultfiles import (
    DIR_MODE,
    FILE_MODE,
    NAME_MAX,
    PARTIAL_DIR,
    PARTIAL_SUFFIX,
    RESUME_DIR,
    fsync_dir,
    make_dirs,
    remove_partial_dir,
    safe_relative_path,
)
from daemon.services.errors import CutOff, Permanent, Transient
from daemon.text import printable

#: Longest path Linux takes in a system call (bytes, the terminating NUL included).
PATH_MAX = 4096
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


@dataclass(frozen=True)
class Downloaded:
    """A result file stored under its final name."""

    path: Path
    size: int
    sha256: str  # of the stored bytes, computed while streaming
    #: The server's Content-Length, or None when it sent none (then `size` could not be checked against anything).
    content_length: int | None = None
    #: For zips: True when every entry's CRC was checked, False when encrypted entries could only be checked for
    #: structure (no password known). None for other files.
    zip_crc_checked: bool | None = None


@dataclass(frozen=True)
class Published:
    """What the server published about a file's content: checked once the file has arrived, and a file that differs
    is a `BadDownload` (`kind` "size_mismatch" or "checksum_mismatch"), never verified."""

    size: int | None = None
    #: (algorithm, hex digest): md5 (Cloudgene's `.md5` files), sha1 (CWL), sha256, ... as `hashlib` names them.
    checksum: tuple[str, str] | None = None


class _Digests:
    """Feeds every chunk to several digests: SHA-256, which we record, and the one the server published."""

    def __init__(self, *digests: Any) -> None:
        self._digests = digests

    def update(self, data: Any) -> None:
        for digest in self._digests:
            digest.update(data)


class BadDownload(Transient):
    """The server answered 2xx, so this GET spent one of the file's download counts, and the body that came is
    unusable: cut off (by a close, a reset or a timeout), shorter or longer than announced, undecodable, a
    corrupt zip, or not the size or checksum the server published. The caller counts these against the file
    (`JobOutput.bad_downloads`) and gives it up after a few.

    A failure before the answer (refused, reset or timed out while waiting for it) is a plain `Transient`: it cannot
    be told apart from an outage, which must never fail a job."""


class DownloadInterrupted(Transient):
    """`should_stop()` turned true: the partial is gone, the file must be fetched again from byte zero."""

    kind = "interrupted"


def download(
    open_stream: Callable[[], AbstractContextManager[ByteStream]],
    name: str,
    *,
    result_dir: Path,
    password: str | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    chunk_size: int | None = None,
    keep_partial_dir: bool = False,
    published: Published | None = None,
    open_rest: Callable[[Resume], AbstractContextManager[ByteStream]] | None = None,
) -> Downloaded:
    """Fetch one result file into `result_dir/<name>` and return what was stored.

    `open_stream` opens the file's body (e.g. `lambda: adapter.stream_output(output)`, a `ByteStream`); it is called
    at most once, and not at all when `should_stop()` is already true. A refusal (any answer but a 2xx) is the
    adapter's error, raised as it opens, and passes through.

    The body is streamed (as sent when the transfer is not content-encoded, so the bytes stored are the bytes sent;
    in the pieces the connection delivers unless `chunk_size` asks for others), hashed with SHA-256 on the way
    (a big body is written and hashed on a helper thread, see `_ThreadedSink`), and its byte count must equal
    Content-Length: short → `Transient(kind="truncated")`, long → `Transient(kind="length_mismatch")`. A missing
    Content-Length is allowed and shows as `Downloaded.content_length is None`.

    What the server `published` about the file (its size, a checksum) must match what arrived: the checksum is
    computed in the same pass as the SHA-256.

    With `open_rest` (`lambda resume: adapter.stream_output(output, resume=resume)`) a download is resumable: a
    body cut off, stalled or stopped keeps what arrived in `result_dir/.resume/` (with where it came from), and the
    next call asks only for the rest (`Resume`, an HTTP Range). The bytes kept are hashed again from the disk
    before the rest is appended, so the SHA-256 (and a published checksum) is that of the whole file, as if it had
    come in one piece. A server that answers the Range with the whole file gets it stored from zero.

    A `*.zip` is then verified with `results.verify_zip` (every entry's CRC when `password` is known or entries are
    not encrypted; structure only for encrypted entries without a password). A corrupt zip is
    `Transient(kind="corrupt_zip")`: the bytes may have been damaged on the way, so another download may succeed,
    but each attempt spends one of the server's download counts — the caller counts attempts and gives the file
    up (fails it) after a few. A zip the job's password does not open is `Permanent(kind="zip_password")`: fetching
    it again would not help.

    `should_stop()` is checked before the request and between chunks (also during zip verification); when true,
    the partial is deleted and `DownloadInterrupted` raised. Cloudgene's workspace ignores Range, so a restart
    fetches from zero.

    On success the file is fsynced (a big one was mostly written back on the way and does not stay in the page
    cache, see `_WriteBehind`), made mode 0640, renamed into place (an existing file of that name is replaced) and
    its directory fsynced. On any failure no partial file remains. Its subfolders are created (0750) before the
    request: a folder that cannot be made must not cost a download.

    The partial file is written in `result_dir/.partial/`, created when missing and removed once empty, unless
    `keep_partial_dir`: a caller fetching several files into one directory keeps it for all of them and removes it
    with `remove_partial_dir` when done (making and removing the folder for every file cost two metadata updates).
    """
    rel = safe_relative_path(name)
    label = f"download {printable(name)}"
    if should_stop():
        raise DownloadInterrupted(f"{label}: stopped before it started", kind="interrupted")

    result_dir = Path(result_dir)
    with _no_space_is_transient(label):
        make_dirs(result_dir)
    final = result_dir.joinpath(*rel.parts)
    # Checked before the GET, which spends one of the server's download counts: a file that cannot be stored
    # would spend them all, one retry after another.
    _check_storable(result_dir, rel, final, label)
    # Only a subfolder can lead elsewhere (a symlink in the result directory); checked for those alone, as
    # resolving both paths costs two realpath walks per file.
    if len(rel.parts) > 1 and not final.parent.resolve().is_relative_to(result_dir.resolve()):
        raise Permanent(f"{label}: its folder leads out of the result directory (a symlink?)", kind="unsafe_name")
    with _no_space_is_transient(label):
        try:
            created = make_dirs(final.parent, base=result_dir) if len(rel.parts) > 1 else []
        except NotADirectoryError:
            raise Permanent(f"{label}: {_file_in_the_way(result_dir, rel)!r} is a file, so it cannot be a folder too",
                            kind="unsafe_name") from None

    kept, resume = _resumable(result_dir, rel) if open_rest is not None else (None, None)
    with _partial_file(result_dir, label, keep_dir=keep_partial_dir, adopt=kept) as temp:
        partial, fh = temp.path, temp.fh
        digest = hashlib.sha256()
        algorithm, published_digest = published.checksum if published and published.checksum else ("sha256", "")
        extra = None if algorithm == "sha256" else hashlib.new(algorithm)
        size = start = 0
        content_length: int | None = None
        came_from: tuple[str | None, str | None] = (None, None)
        try:
            with _opened(open_stream, open_rest, resume, fh) as (body, resume):
                # From here on the server has answered 2xx (the adapter raised any refusal on opening), so this GET
                # spent a download count: a body that fails to arrive whole is a bad download.
                try:
                    content_length = body.length
                    start = body.start
                except Transient as exc:  # garbled: still an answer that spent a count
                    raise BadDownload(exc.message, kind=exc.kind) from None
                came_from = body.source, body.validator
                offset = resume.offset if resume is not None else 0
                if start not in (0, offset):
                    raise BadDownload(f"{label}: the server sent the file from byte {start}, not {offset}",
                                      kind="bad_response")
                if start:
                    _rehash(partial, start, digest, extra)
                    size = start
                elif offset:  # the whole file came instead of the rest: what was kept goes
                    fh.seek(0)
                    fh.truncate()
                _check_free_space(partial.parent, content_length, label)
                threaded = content_length is None or content_length > _THREADED_FROM
                hashing = digest if extra is None else _Digests(digest, extra)
                sink = _ThreadedSink(fh, hashing) if threaded else _Sink(fh, hashing)
                with sink, _body_failures(label, lambda: size, content_length):
                    for chunk in body.chunks(chunk_size):
                        if should_stop():
                            raise DownloadInterrupted(
                                f"{label}: stopped after {size} bytes"
                                + ("; the next attempt asks for the rest" if open_rest else
                                   "; the next attempt starts from zero"),
                                kind="interrupted",
                            )
                        sink.write(chunk)
                        size += len(chunk)
                received = body.received
        except (BadDownload, DownloadInterrupted) as exc:
            # A body that had all its announced bytes leaves no rest to ask for (the server would answer 416).
            whole = content_length is not None and size - start >= content_length
            resumable = isinstance(exc, DownloadInterrupted) or exc.kind in _RESUMABLE
            if open_rest is not None and size > 0 and resumable and not whole:
                _keep_for_resume(temp, result_dir, rel, came_from)
            raise
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                raise Transient(
                    f"{label}: no space left for the download ({os.strerror(exc.errno)}) after {size} bytes",
                    kind="disk_full",
                ) from None
            raise

        if content_length is not None and received != content_length:
            if received < content_length:
                if open_rest is not None:
                    fh.flush()
                    _keep_for_resume(temp, result_dir, rel, came_from)
                raise BadDownload(
                    f"{label}: truncated: received {received} of {content_length} bytes", kind="truncated"
                )
            raise BadDownload(
                f"{label}: received {received} bytes but Content-Length said {content_length}",
                kind="length_mismatch",
            )

        if published is not None and published.size is not None and size != published.size:
            raise BadDownload(f"{label}: {size} bytes arrived, but the server published {published.size}",
                              kind="size_mismatch")
        if published_digest:
            got = (digest if extra is None else extra).hexdigest()
            if got != published_digest:
                raise BadDownload(f"{label}: its {algorithm} is {got}, not the {published_digest} the server published",
                                  kind="checksum_mismatch")

        try:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                raise Transient(f"{label}: no space left to finish the download", kind="disk_full") from None
            raise

        zip_crc_checked: bool | None = None
        if rel.name.lower().endswith(".zip"):
            zip_crc_checked = _verify(partial, password, label, should_stop)

        os.chmod(partial, FILE_MODE)
        with _no_space_is_transient(label):
            temp.place(final)
            _forget_resume(result_dir, rel)
            fsync_dir(final.parent)
            for directory in created:
                fsync_dir(directory.parent)

    return Downloaded(
        path=final,
        size=size,
        sha256=digest.hexdigest(),
        content_length=content_length,
        zip_crc_checked=zip_crc_checked,
    )


#: Bodies from this size on (or of unknown size) are written and hashed on a helper thread.
_THREADED_FROM = 4 << 20
#: The helper thread takes a body in blocks of this size...
_BLOCK = 1 << 20
#: ...from a ring of this many, allocated once per download: the memory a download holds, whatever the file's size.
_RING = 8


class _Sink:
    """Writes a small body's chunks to the partial file and feeds them to the digest, in the caller's thread."""

    def __init__(self, fh: BinaryIO, digest: Any) -> None:
        self._fh, self._digest = fh, digest

    def __enter__(self) -> _Sink:
        return self

    def write(self, chunk: bytes) -> None:
        self._fh.write(chunk)
        self._digest.update(chunk)

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        pass


class _ThreadedSink(_Sink):
    """Writes a big body to the partial file and feeds it to the digest on a helper thread, while the caller goes
    back to the socket: `write()` and SHA-256 release the GIL, so hashing (~1.8 GB/s, CPU-bound) and writing overlap
    receiving and parsing the next piece instead of adding to it.

    The caller copies the connection's pieces (64 KiB) into `_BLOCK`-sized blocks and hands over whole blocks. The
    helper takes the GIL a few times per hand-over (queue, write, hash), each time waiting while the receiving
    thread runs Python: handing over every 64 KiB piece cost far more than copying it does (bench/download.py, with
    `_WriteBehind` in both: 0.48 x curl's throughput piece by piece, 0.93 x in blocks). The blocks come from a ring
    allocated once per download and reused, so memory stays at `_RING` blocks whatever the file's size and no fresh
    memory is faulted in per block; when the helper falls a whole ring behind, the caller waits for a free block.

    An error of the helper (a full disk) is raised in the caller at its next `write()` or when the `with` block
    ends. When the block ends by another exception (the body stopped), what the helper still held is written all
    the same: a resumable download keeps every byte that arrived (at most `_RING` blocks more to write)."""

    def __init__(self, fh: BinaryIO, digest: Any) -> None:
        super().__init__(fh, digest)
        self._behind = _WriteBehind(fh)
        self._error: BaseException | None = None
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()  # blocks the caller may fill
        self._full: queue.SimpleQueue[tuple[memoryview, int] | None] = queue.SimpleQueue()  # the helper's; None: end
        for _ in range(_RING):
            self._free.put(memoryview(bytearray(_BLOCK)))
        self._block, self._filled = self._free.get(), 0  # the block being filled, and how far
        self._thread = threading.Thread(target=self._drain, name="imputationd-download-sink", daemon=True)

    def __enter__(self) -> _ThreadedSink:
        self._thread.start()
        return self

    def write(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        piece = memoryview(chunk)
        while piece:
            room = len(self._block) - self._filled
            if len(piece) < room:  # the usual case: it fits, and the block is not full yet
                self._block[self._filled:self._filled + len(piece)] = piece
                self._filled += len(piece)
                return
            self._block[self._filled:] = piece[:room]
            self._full.put((self._block, len(self._block)))
            self._block, self._filled = self._free.get(), 0  # waits while the helper is a whole ring behind
            piece = piece[room:]

    def _drain(self) -> None:
        while (item := self._full.get()) is not None:
            block, size = item
            if self._error is None:
                try:
                    self._store(block[:size])
                except BaseException as exc:  # handed to the caller
                    self._error = exc
            self._free.put(block)  # also after an error: the caller may be waiting for it

    def _store(self, data: memoryview) -> None:
        self._fh.write(data)
        self._digest.update(data)
        self._behind.wrote(len(data))

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if self._filled and self._error is None:
            self._full.put((self._block, self._filled))
        self._full.put(None)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error


#: A big body's dirty data is handed to the disk in windows of this size (see `_WriteBehind`).
_WRITEBACK_WINDOW = 8 << 20
_FADVISE = getattr(os, "posix_fadvise", None)  # Linux (and most Unixes); elsewhere the kernel decides alone


class _WriteBehind:
    """Keeps a big download from piling up in the page cache: every `_WRITEBACK_WINDOW` bytes, the window just
    written is handed to the disk and the window before it, on disk by then, is dropped from the cache.

    Left alone, a GiB of dirty pages would wait in the page cache (the kernel starts writing back at 10 % of RAM or
    after 30 s) and the final fsync would write it all while we wait (~0.35 s per GiB here). Worse, each of those
    pages is newly allocated page cache, and on a VM that hands freed memory back to the host (virtio-balloon free
    page reporting, as where bench/download.py ran) a page taken again must first be backed by the host: writing
    1 GiB into the cache cost 0.2 s of CPU right after another GiB was deleted but 1.4-1.7 s six seconds later,
    which made the download's CPU time swing from run to run. Recycling a few MiB of pages for the whole file
    costs ~0.35 s of CPU per GiB (writeback included), every time, and leaves the final fsync almost nothing to
    do. Nothing reads the file back soon: a zip is read once to verify it, from disk then.

    On Linux `POSIX_FADV_DONTNEED` starts writeback of the dirty pages in its range and drops the clean ones. It is
    advice, so a failure is ignored: the final fsync still writes whatever is left and reports any write error.
    """

    def __init__(self, fh: BinaryIO) -> None:
        self._fd = fh.fileno()
        self._written = 0  # bytes handed to the OS so far
        self._started = 0  # writeback was started for everything before this offset
        self._dropped = 0  # and everything before this one was dropped from the cache

    def wrote(self, size: int) -> None:
        self._written += size
        if self._written - self._started >= _WRITEBACK_WINDOW:
            self._advise(self._started, self._written)  # starts writing the window back
            self._advise(self._dropped, self._started)  # the window before is clean by now: dropped
            self._dropped, self._started = self._started, self._written

    def _advise(self, start: int, end: int) -> None:
        if _FADVISE is not None and end > start:
            with contextlib.suppress(OSError):
                _FADVISE(self._fd, start, end - start, os.POSIX_FADV_DONTNEED)


def check_room(result_dir: Path, name: str, size_text: str | None) -> None:
    """Before a download spends one of the server's download counts: `Transient(kind="disk_full")` when the file
    system that will hold `result_dir` has no free space at all, or may not have room for the size the server
    announced (`size_text`: Cloudgene's rounded-down "314 MB" means up to 315 MB; WES's "1234 bytes" is exact;
    missing or unreadable: only the "no space at all" check).

    A disk that stays full then costs retries, not downloads: each GET that fails for lack of space spends a count,
    and a counter used up fails the file for good."""
    needed = _size_upper_bound(size_text)
    directory = Path(result_dir)
    while True:  # the folder, or its nearest existing parent before its first download
        try:
            free = shutil.disk_usage(directory).free
            break
        except FileNotFoundError:
            if directory.parent == directory:
                raise
            directory = directory.parent
    if free == 0 or needed > free:
        raise Transient(
            f"download {printable(name)}: no space left for it ({free} bytes free, the file may need {needed}); "
            "not fetched, so no download is spent",
            kind="disk_full",
        )


def remove_partials(result_dir: Path) -> int:
    """Delete the partial files a killed daemon left under `result_dir` (searched recursively, symlinks not
    followed) and their empty `.partial` folders; return how many files went.

    Call it at start-up, before any download runs: it cannot tell a dead download's partial from a live one's.
    """
    result_dir = Path(result_dir)
    removed = 0
    if not result_dir.is_dir():
        return 0
    for top, dirs, _files in os.walk(result_dir):
        if PARTIAL_DIR not in dirs:
            continue
        dirs.remove(PARTIAL_DIR)  # handled here, not walked into
        partial_dir = Path(top, PARTIAL_DIR)
        if partial_dir.is_symlink():
            continue
        for entry in os.scandir(partial_dir):
            if entry.name.endswith(PARTIAL_SUFFIX) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
        remove_partial_dir(Path(top))
    return removed


def sha256_file(path: Path, *, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a stored file, streamed (constant memory), to re-verify a result against the recorded hash."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(chunk_size)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


# --- internals ----------------------------------------------------------------------------------------------------


def _of(content_length: int | None) -> str:
    return f" of {content_length}" if content_length is not None else ""


def _check_storable(result_dir: Path, rel: PurePosixPath, final: Path, label: str) -> None:
    """`Permanent(kind="unsafe_name")` when `final` cannot be stored: a path too long for the file system, or a
    folder where the file goes. (A file where one of its folders goes, say "data.txt" beside "data.txt/inner.txt",
    is found when the folders are made, also before the GET.)"""
    length = len(os.fsencode(final))
    if length >= PATH_MAX:
        raise Permanent(
            f"{label}: its path in the result directory is {length} bytes, longer than the file system allows "
            f"({PATH_MAX - 1})", kind="unsafe_name",
        )
    if final.is_dir():
        raise Permanent(f"{label}: a directory of that name is in the way", kind="unsafe_name")


def _file_in_the_way(result_dir: Path, rel: PurePosixPath) -> str:
    """The first of the file's folders (relative, printable) that exists as something else than a folder."""
    for depth in range(1, len(rel.parts)):
        if not result_dir.joinpath(*rel.parts[:depth]).is_dir():
            return printable("/".join(rel.parts[:depth]))
    return printable(rel.parent.as_posix())  # gone again meanwhile: name the whole folder


@contextlib.contextmanager
def _body_failures(label: str, size: Callable[[], int], content_length: int | None) -> Iterator[None]:
    """A body cut off, stalled or undecodable (the stream's errors, see `ByteStream`) is a `BadDownload`, saying how
    far it got; the caller's own errors (`DownloadInterrupted`, a full disk) pass."""
    try:
        yield
    except CutOff:
        raise BadDownload(
            f"{label}: truncated: the connection closed after {size()}{_of(content_length)} bytes", kind="truncated"
        ) from None
    except Transient as exc:
        if exc.kind not in ("timeout", "connection", "bad_response") or isinstance(exc, BadDownload):
            raise
        raise BadDownload(f"{exc.message} after {size()}{_of(content_length)} bytes", kind=exc.kind) from None


_SIZE_TEXT = re.compile(r"\s*(\d+)\s*(bytes?|[KMGTPE]B)\s*", re.IGNORECASE)
_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}


def _size_upper_bound(size_text: str | None) -> int:
    """The most bytes a human size rounded down to whole units ("314 MB", 1024-based) can stand for ("418 bytes"
    is exact); 0 when there is none to read."""
    match = _SIZE_TEXT.fullmatch(size_text or "")
    if match is None:
        return 0
    unit = _SIZE_UNITS.get(match[2][0].upper())
    return int(match[1]) if unit is None else (int(match[1]) + 1) * unit - 1


def _check_free_space(directory: Path, content_length: int | None, label: str) -> None:
    """Fail fast (before streaming gigabytes) when the file cannot fit."""
    if content_length is None:
        return
    free = shutil.disk_usage(directory).free
    if content_length > free:
        raise Transient(
            f"{label}: needs {content_length} bytes but only {free} are free", kind="disk_full"
        )


def _verify(partial: Path, password: str | None, label: str, should_stop: Callable[[], bool]) -> bool:
    def checkpoint() -> None:
        if should_stop():
            raise DownloadInterrupted(
                f"{label}: stopped while verifying the zip; the next attempt starts from zero", kind="interrupted"
            )

    try:
        return results.verify_zip(partial, password, checkpoint=checkpoint)
    except results.WrongPassword as exc:
        raise Permanent(f"{label}: {exc}", kind="zip_password") from None
    except results.CorruptResult as exc:
        raise BadDownload(f"{label}: {exc}", kind="corrupt_zip") from None


@contextlib.contextmanager
def _no_space_is_transient(label: str) -> Iterator[None]:
    """A full disk (no blocks, no inodes, quota) met while creating folders or files is `disk_full`, like one met
    while writing: the download is tried again later, not reported as a crash."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise Transient(f"{label}: no space left on the device ({os.strerror(exc.errno)})",
                            kind="disk_full") from None
        raise


#: Tries at creating the temp file while other downloads into the same folder remove `.partial` when they finish.
_PARTIAL_ATTEMPTS = 20


class _Partial:
    """A download's temp file, open for writing, until `place` renames it into place."""

    def __init__(self, path: Path, fh: BinaryIO) -> None:
        self.path, self.fh = path, fh
        self.placed = False

    def place(self, final: Path) -> None:
        os.replace(self.path, final)
        self.placed = True


#: Failures after which what arrived is kept for a resume: the body stopped, the bytes that came are sound.
_RESUMABLE = frozenset({"truncated", "timeout", "connection"})


def _resume_paths(result_dir: Path, rel: PurePosixPath) -> tuple[Path, Path]:
    key = hashlib.sha256(rel.as_posix().encode()).hexdigest()[:32]
    folder = result_dir / RESUME_DIR
    return folder / f"{key}{PARTIAL_SUFFIX}", folder / f"{key}.json"


def _resumable(result_dir: Path, rel: PurePosixPath) -> tuple[Path | None, Resume | None]:
    """The kept bytes of a broken download of `rel` and where to resume it from; (None, None) when there are none
    (and anything half-kept is removed)."""
    part, meta = _resume_paths(result_dir, rel)
    try:
        state = json.loads(meta.read_text("utf-8"))
        offset = part.stat().st_size
    except (OSError, ValueError):
        _forget_resume(result_dir, rel)
        return None, None
    if not isinstance(state, dict) or state.get("name") != rel.as_posix() or offset <= 0:
        _forget_resume(result_dir, rel)
        return None, None
    source, validator, when = state.get("source"), state.get("validator"), state.get("source_at")
    return part, Resume(offset=offset, source=source if isinstance(source, str) else None,
                        source_at=float(when) if isinstance(when, (int, float)) else 0.0,
                        validator=validator if isinstance(validator, str) else None)


def _keep_for_resume(temp: _Partial, result_dir: Path, rel: PurePosixPath,
                     came_from: tuple[str | None, str | None]) -> None:
    """Move a broken download's partial to the resume folder, with where its bytes came from (the source may be a
    presigned URL, a secret: the file is the daemon's alone). Best effort: a resume is an optimisation."""
    part, meta = _resume_paths(result_dir, rel)
    with contextlib.suppress(OSError):
        make_dirs(part.parent, base=result_dir)
        temp.fh.flush()
        state = {"name": rel.as_posix(), "source": came_from[0], "validator": came_from[1],
                 "source_at": time.time()}
        fd = os.open(meta.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "w", encoding="utf-8") as out:
            json.dump(state, out)
        os.replace(meta.with_suffix(".tmp"), meta)
        temp.place(part)


def forget_resume(result_dir: Path, name: str) -> None:
    """Drop the kept bytes of a broken download of `name` (a file given up is not resumed)."""
    with contextlib.suppress(Permanent):
        _forget_resume(Path(result_dir), safe_relative_path(name))


def _forget_resume(result_dir: Path, rel: PurePosixPath) -> None:
    for path in _resume_paths(result_dir, rel):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    with contextlib.suppress(OSError):
        (result_dir / RESUME_DIR).rmdir()  # once empty


@contextlib.contextmanager
def _opened(
    open_stream: Callable[[], AbstractContextManager[ByteStream]],
    open_rest: Callable[[Resume], AbstractContextManager[ByteStream]] | None,
    resume: Resume | None,
    fh: BinaryIO,
) -> Iterator[tuple[ByteStream, Resume | None]]:
    """The body to store: the rest of the file when there is a `resume`, else the whole of it; and the resume it
    answers. A server with no rest to give (416: the file is not longer than what was kept, say it changed) gets
    the kept bytes dropped and the whole file asked for."""
    with contextlib.ExitStack() as opened:
        body: ByteStream | None = None
        if resume is not None and open_rest is not None:
            try:
                body = opened.enter_context(open_rest(resume))
            except Permanent as exc:
                if exc.kind != "http_416":
                    raise
                fh.seek(0)
                fh.truncate()
                resume = None
        else:
            resume = None
        if body is None:
            body = opened.enter_context(open_stream())
        yield body, resume


def _rehash(partial: Path, length: int, digest: Any, extra: Any) -> None:
    """Feed the first `length` bytes already stored to the digests, as if they had just arrived."""
    with open(partial, "rb", buffering=0) as fh:
        left = length
        while left:
            block = fh.read(min(left, 1 << 20))
            if not block:
                raise BadDownload(f"{partial.name}: the kept part is shorter than {length} bytes", kind="truncated")
            digest.update(block)
            if extra is not None:
                extra.update(block)
            left -= len(block)


#: The temp file's write buffer, given explicitly: with the default, `open` asks whether the file is a terminal
#: (one more system call per file). Big bodies bypass it anyway (written in 64 KiB pieces or 1 MiB blocks).
_WRITE_BUFFER = io.DEFAULT_BUFFER_SIZE


@contextlib.contextmanager
def _partial_file(result_dir: Path, label: str, *, keep_dir: bool = False, adopt: Path | None = None
                  ) -> Iterator[_Partial]:
    """A new, exclusively created temp file in `result_dir/.partial/`; removed unless it was placed (renamed
    away). The folder is created when missing and, unless `keep_dir`, removed afterwards when empty. With `adopt`,
    that file (a resume's kept bytes) is moved there instead and opened to append."""
    partial_dir = result_dir / PARTIAL_DIR
    partial = partial_dir / f"{uuid.uuid4().hex}{PARTIAL_SUFFIX}"
    try:
        with _no_space_is_transient(label):
            for attempt in range(_PARTIAL_ATTEMPTS):
                try:
                    if attempt or not keep_dir:
                        make_dirs(partial_dir, base=result_dir)
                    if adopt is not None:
                        os.replace(adopt, partial)
                        fd = os.open(partial, os.O_RDWR | os.O_CLOEXEC)
                    else:
                        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                    break
                except (FileNotFoundError, NotADirectoryError):
                    # Another download removed the (empty) folder between its creation and our use of it: again.
                    # A file in the way stays in the way: that is raised at once.
                    if attempt == _PARTIAL_ATTEMPTS - 1 or partial_dir.exists() and not partial_dir.is_dir():
                        raise
    except Transient:
        remove_partial_dir(result_dir)
        raise
    try:
        fh = open(fd, "r+b" if adopt is not None else "wb", buffering=_WRITE_BUFFER)  # noqa: SIM115 - closed below
        if adopt is not None:
            fh.seek(0, os.SEEK_END)
    except BaseException:
        os.close(fd)
        os.unlink(partial)
        raise
    temp = _Partial(partial, fh)
    try:
        yield temp
    finally:
        with contextlib.suppress(OSError):
            fh.close()  # a failing flush here (disk full) must not hide the original error
        if not temp.placed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
        if not keep_dir:
            remove_partial_dir(result_dir)


__all__ = [
    "BadDownload",
    "Downloaded",
    "DIR_MODE",
    "DownloadInterrupted",
    "FILE_MODE",
    "NAME_MAX",
    "PARTIAL_DIR",
    "PARTIAL_SUFFIX",
    "check_room",
    "download",
    "remove_partial_dir",
    "remove_partials",
    "safe_relative_path",
    "sha256_file",
]
