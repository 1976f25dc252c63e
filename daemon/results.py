"""Result zips: verify them (structure, CRCs, password) and, optionally, extract them safely.

Cloudgene's `chr_N.zip` files are ZipCrypto-encrypted by default and AES-encrypted (WinZip AE-1/AE-2, compression
method 99) when the job asked for `aesEncryption`. The stdlib `zipfile` reads ZipCrypto; `pyzipper.AESZipFile`
reads both, and is used whenever a zip holds an AES entry.

Speed: the stdlib's ZipCrypto decryption is pure Python (about 1.5 MB/s on one core, holding the GIL), so ZipCrypto
entries are read by the system's libarchive instead (through libarchive-c: C, and ctypes lets go of the GIL for each
call), at about 60 MB/s, while `zipfile` still parses the zip, checks its structure, its names and each entry's
password. libarchive is loaded once, checked on a built-in ZipCrypto zip (it must decrypt it and must report a
damaged copy's CRC), and read in step with `zipfile`: the entries it sees must be the same, in the same order, of
the same sizes. Where it cannot be loaded (logged once, at warning) or disagrees about a zip (logged), the stdlib
reads it as before, slowly. AES (PyCryptodome, in C) and unencrypted entries run at zlib speed in any case.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import lzma
import os
import shutil
import stat
import struct
import sys
import threading
import uuid
import zipfile
import zlib
from collections.abc import Callable, Collection, Iterator
from itertools import pairwise
from pathlib import Path

import structlog

from daemon import resultfiles
from daemon.services.errors import Permanent


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


# libarchive-c loads the system's libarchive as it is imported, and fails where that library is missing or too old
# (not only with ImportError: a missing library or symbol is an OSError or AttributeError). Then ZipCrypto zips are
# read by zipfile, slowly, and `_load_libarchive` says why once, at the first zip. Importing it here costs an idle
# daemon ~3 MiB of RSS (measured), well within its budget.
_quiet_libarchive = _BelowWarning()  # it logs, at import, the optional functions this libarchive lacks
logging.getLogger("libarchive").addFilter(_quiet_libarchive)
try:
    import libarchive.read
    from libarchive import ffi as libarchive_ffi
except Exception as exc:  # whatever it is, the stdlib reads the zips instead
    libarchive_ffi = None
    _libarchive_import_error: Exception | None = exc
else:
    _libarchive_import_error = None
finally:
    logging.getLogger("libarchive").removeFilter(_quiet_libarchive)

log = structlog.get_logger("daemon.results")

#: Read size when checking or extracting an entry.
CHUNK = 1 << 20
_AES_METHOD = 99
_AES_EXTRA_ID = 0x9901
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # the 30-byte local file header
_LOCAL_SIGNATURE = b"PK\x03\x04"
#: Errors the zip readers raise for damaged data (bad CRC or HMAC, broken deflate stream, cut-off entry, …).
_DATA_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    NotImplementedError,
    struct.error,
    ValueError,
)


def _aes_zipfile() -> type:
    """pyzipper's AESZipFile, imported on first use: only AES-encrypted zips need it (with pycryptodomex, ~1.5 MiB a
    daemon that never meets one does not carry)."""
    import pyzipper

    opener: type = pyzipper.AESZipFile
    return opener


def _with_pyzipper(*errors: type[BaseException]) -> tuple[type[BaseException], ...]:
    """`errors` and pyzipper's own BadZipFile, once pyzipper is in use (before that nothing can raise it)."""
    module = sys.modules.get("pyzipper")
    return (*errors, module.BadZipFile) if module is not None else errors


class CorruptResult(ValueError):
    """A result file is damaged or unreadable: the message says which file, which entry and what is wrong."""


class WrongPassword(CorruptResult):
    """The password given does not open the zip (its first encrypted entry already fails the password check)."""


def is_aes(path: Path) -> bool:
    """True when any entry is WinZip-AES encrypted (compression method 99 or an AE-x extra field)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(_entry_is_aes(info) for info in zf.infolist())
    except zipfile.BadZipFile as exc:
        raise CorruptResult(f"{Path(path).name}: not a readable zip ({exc})") from None


def verify_zip(
    path: Path,
    password: str | None,
    *,
    checkpoint: Callable[[], None] | None = None,
) -> bool:
    """Check a zip thoroughly; raise `CorruptResult` (or its subclass `WrongPassword`) saying what is wrong.

    Always: the central directory must be readable, and every entry's local header must be where the central
    directory says, name the same file, and its data must end before the next entry (or the central directory).
    Then every entry is read in full, streaming, so its CRC-32 (and, for AES, its HMAC) is checked — for
    unencrypted entries always, for encrypted ones when `password` is given. Encrypted entries without a password
    can only be checked for structure; the return value says which happened: True when every entry's contents
    were checked, False when some could only be checked for structure.

    `checkpoint`, when given, is called between chunks; it may raise to abandon the check (its exception passes
    through untouched).
    """
    path = Path(path)
    pwd = password.encode("utf-8") if password is not None else None
    try:
        aes = is_aes(path)
        opener = _aes_zipfile() if aes else zipfile.ZipFile
        with opener(path) as zf:
            infos = sorted(zf.infolist(), key=lambda info: info.header_offset)
            _check_structure(path, infos, zf.start_dir)
            all_checked = True
            first_encrypted = True
            with _native_reader(path, infos, pwd, aes) as native:
                for info in infos:
                    if info.is_dir() and info.file_size == 0:
                        continue
                    encrypted = bool(info.flag_bits & 0x1)
                    if encrypted and pwd is None:
                        all_checked = False
                        continue
                    _check_entry(path, zf, info, pwd if encrypted else None, first_encrypted, checkpoint, native)
                    first_encrypted = first_encrypted and not encrypted
    except _with_pyzipper(zipfile.BadZipFile, zlib.error, EOFError, struct.error) as exc:
        raise CorruptResult(f"{path.name}: not a readable zip ({exc})") from None
    return all_checked


def extract_zip(
    path: Path,
    dest_dir: Path,
    password: str | None,
    *,
    max_bytes: int | None = None,
    max_ratio: float | None = None,
    keep: Collection[Path] = (),
) -> list[Path]:
    """Extract every file of a result zip into `dest_dir` and return the paths written, in the order they are stored.

    Refused as a whole (`CorruptResult`) before anything is written: member names that `resultfiles.safe_relative_path`
    refuses (absolute, `..`, a backslash, a control character) or that appear twice; an entry that would replace
    one of the files in `keep` (the job's verified downloads); entries adding up to more than `max_bytes`, or to
    more than `max_ratio` times the zip's own size (a zip bomb), or to more than the free space of `dest_dir`.
    The sizes are the ones the zip declares, and no entry is written past its declared size.

    Each file is streamed into a temp file in `dest_dir/.partial/`, its CRC checked by the reader, fsynced, made
    0640 and renamed into place (folders 0750). On any failure the files this call wrote are removed again.
    Directory entries only create folders; symlink entries are not written at all.
    """
    path = Path(path)
    dest_dir = Path(dest_dir)
    pwd = password.encode("utf-8") if password is not None else None
    aes = is_aes(path)
    opener = _aes_zipfile() if aes else zipfile.ZipFile
    written: list[Path] = []
    try:
        with opener(path) as zf:
            infos = sorted(zf.infolist(), key=lambda info: info.header_offset)
            members = []
            seen: set[str] = set()
            kept = {Path(p).resolve() for p in keep}
            for info in infos:
                name = info.orig_filename  # `filename` is silently cut at a NUL byte; the original is what we judge
                try:
                    rel = resultfiles.safe_relative_path(name[:-1] if info.is_dir() and name.endswith("/") else name)
                except Permanent as exc:
                    raise CorruptResult(f"{path.name}: refusing to extract: {exc}") from None
                key = rel.as_posix()
                if key in seen:
                    raise CorruptResult(f"{path.name}: refusing to extract: {key!r} appears twice")
                seen.add(key)
                if stat.S_ISLNK(info.external_attr >> 16):
                    continue  # a link could lead anywhere; its text is no result
                if dest_dir.joinpath(*rel.parts).resolve() in kept:
                    raise CorruptResult(
                        f"{path.name}: refusing to extract: entry {key!r} would replace the downloaded result file "
                        "of that name"
                    )
                members.append((info, rel))
            resultfiles.make_dirs(dest_dir)
            _check_expansion(path, [info for info, _ in members], dest_dir, max_bytes, max_ratio)
            with _native_reader(path, infos, pwd, aes) as native:
                for info, rel in members:
                    target = dest_dir.joinpath(*rel.parts)
                    if not target.parent.resolve().is_relative_to(dest_dir.resolve()):
                        raise CorruptResult(
                            f"{path.name}: refusing to extract {rel}: its folder leads out of {dest_dir}"
                        )
                    if info.is_dir():
                        resultfiles.make_dirs(target, base=dest_dir)
                        continue
                    encrypted = bool(info.flag_bits & 0x1)
                    if encrypted and pwd is None:
                        raise CorruptResult(f"{path.name}: {info.filename} is encrypted and no password is known")
                    _extract_member(path, zf, info, pwd if encrypted else None, dest_dir, target, native)
                    written.append(target)
    except BaseException:
        for done in written:
            with contextlib.suppress(OSError):
                os.unlink(done)
        raise
    return written


# --- internals ----------------------------------------------------------------------------------------------------


def _check_expansion(
    path: Path, infos: list[zipfile.ZipInfo], dest_dir: Path, max_bytes: int | None, max_ratio: float | None
) -> None:
    """Refuse a zip whose entries would take more room than allowed or than there is."""
    total = sum(info.file_size for info in infos if not info.is_dir())
    size = path.stat().st_size
    where = f"{path.name}: refusing to extract"
    if max_bytes is not None and total > max_bytes:
        raise CorruptResult(f"{where}: its entries add up to {total} bytes, more than the {max_bytes} allowed "
                            "(storage.extract_max_gib)")
    if max_ratio is not None and total > max_ratio * size:
        raise CorruptResult(f"{where}: its {size} bytes would expand to {total} ({total / max(size, 1):.0f} times), "
                            f"more than the {max_ratio:g} times allowed (storage.extract_max_ratio)")
    free = shutil.disk_usage(dest_dir).free
    if total > free:
        raise CorruptResult(f"{where}: its entries need {total} bytes and only {free} are free")


def _entry_is_aes(info: zipfile.ZipInfo) -> bool:
    if info.compress_type == _AES_METHOD:
        return True
    extra = info.extra
    pos = 0
    while pos + 4 <= len(extra):
        header_id, size = struct.unpack_from("<HH", extra, pos)
        if header_id == _AES_EXTRA_ID:
            return True
        pos += 4 + size
    return False


def _check_structure(path: Path, infos: list[zipfile.ZipInfo], central_dir: int) -> None:
    """Every local header where the central directory says, naming the same file; no entry's data overlapping the
    next entry or the central directory."""
    with open(path, "rb") as fh:
        for i, info in enumerate(infos):
            where = f"{path.name}: entry {info.filename!r}"
            fh.seek(info.header_offset)
            raw = fh.read(_LOCAL_HEADER.size)
            if len(raw) < _LOCAL_HEADER.size:
                raise CorruptResult(f"{where}: local header cut off at byte {info.header_offset}")
            fields = _LOCAL_HEADER.unpack(raw)
            if fields[0] != _LOCAL_SIGNATURE:
                raise CorruptResult(f"{where}: no local header at byte {info.header_offset}")
            name_len, extra_len = fields[10], fields[11]
            name = fh.read(name_len)
            encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
            try:
                decoded = name.decode(encoding)
            except UnicodeDecodeError:
                decoded = None
            if decoded != info.orig_filename:
                raise CorruptResult(f"{where}: the local header names another file ({name[:80]!r})")
            data_end = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len + info.compress_size
            limit = infos[i + 1].header_offset if i + 1 < len(infos) else central_dir
            if data_end > limit:
                raise CorruptResult(
                    f"{where}: its data ({info.compress_size} bytes) runs past byte {limit} into the next record"
                )


def _check_entry(
    path: Path,
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    pwd: bytes | None,
    first_encrypted: bool,
    checkpoint: Callable[[], None] | None,
    native: _NativeZip | None = None,
) -> None:
    where = f"{path.name}: entry {info.filename!r}"
    size = 0
    try:
        for chunk in _member_chunks(zf, info, pwd, native):
            size += len(chunk)
            if checkpoint is not None:
                checkpoint()
    except _PasswordRefused:
        if first_encrypted:
            raise WrongPassword(f"{path.name}: the password does not open it (entry {info.filename!r})") from None
        raise CorruptResult(f"{where}: fails the password check that earlier entries passed") from None
    except _with_pyzipper(*_DATA_ERRORS, _NativeDataError) as exc:
        raise CorruptResult(f"{where}: {_describe(exc)}") from None
    if size != info.file_size:
        raise CorruptResult(f"{where}: {size} bytes instead of {info.file_size}")


class _PasswordRefused(Exception):
    """The entry's password check failed (zipfile's, from its 12-byte header, or libarchive's)."""


def _member_chunks(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, pwd: bytes | None, native: _NativeZip | None
) -> Iterator[bytes | memoryview]:
    """The entry's contents in chunks of at most `CHUNK` bytes, each to be used before the next is asked for; its
    CRC-32 is checked after the last (by zipfile, or by libarchive when `native` reads it)."""
    try:
        member = zf.open(info, pwd=pwd)  # for an encrypted entry, this is where zipfile checks the password
    except RuntimeError as exc:
        if "password" not in str(exc).lower():
            raise
        raise _PasswordRefused(str(exc)) from None
    with member:
        chunks = native.chunks(info) if native is not None else None
        if chunks is None:
            while chunk := member.read(CHUNK):
                yield chunk
        else:
            yield from chunks


def _extract_member(
    path: Path,
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    pwd: bytes | None,
    dest_dir: Path,
    target: Path,
    native: _NativeZip | None = None,
) -> None:
    if target.is_dir():
        raise CorruptResult(f"{path.name}: cannot extract {info.filename!r}: a directory of that name is in the way")
    partial_dir = dest_dir / resultfiles.PARTIAL_DIR
    resultfiles.make_dirs(partial_dir, base=dest_dir)
    partial = partial_dir / f"{uuid.uuid4().hex}{resultfiles.PARTIAL_SUFFIX}"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with open(fd, "wb") as out:
            size = 0
            try:
                for chunk in _member_chunks(zf, info, pwd, native):
                    size += len(chunk)
                    if size > info.file_size:  # what the size checks before extraction counted on
                        raise CorruptResult(
                            f"{path.name}: entry {info.filename!r}: more than the {info.file_size} bytes it declares"
                        )
                    out.write(chunk)
            except _PasswordRefused:
                raise WrongPassword(f"{path.name}: the password does not open {info.filename!r}") from None
            except _with_pyzipper(*_DATA_ERRORS, _NativeDataError) as exc:
                raise CorruptResult(f"{path.name}: entry {info.filename!r}: {_describe(exc)}") from None
            if size != info.file_size:
                raise CorruptResult(f"{path.name}: entry {info.filename!r}: {size} bytes instead of {info.file_size}")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(partial, resultfiles.FILE_MODE)
        created = resultfiles.make_dirs(target.parent, base=dest_dir)
        os.replace(partial, target)
        resultfiles.fsync_dir(target.parent)
        for directory in created:
            resultfiles.fsync_dir(directory.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        resultfiles.remove_partial_dir(dest_dir)


# --- libarchive: ZipCrypto in C ----------------------------------------------------------------------------------

#: libarchive decrypts ZipCrypto ("traditional PKWARE encryption") and takes passphrases since 3.3.0.
_LIBARCHIVE_MIN_VERSION = 3_003_000
_ARCHIVE_EOF = 1
_ARCHIVE_WARN = -20  # also how libarchive reports a bad CRC or a wrong size at the end of an entry
#: The built-in check: entry "self-test" holding b"imputationd\n", stored, ZipCrypto with password "pw"; its
#: encrypted data ends at byte 63.
_SELF_TEST_ZIP = bytes.fromhex(
    "504b030414000108000000002100d98c11d8180000000c0000000900000073656c662d74657374665b81bc0e49991fb977e4a4e243ced"
    "cb8536d583ec47810504b0102140014000108000000002100d98c11d8180000000c000000090000000000000000000000a48100000000"
    "73656c662d74657374504b05060000000001000100370000003f0000000000"
)
_SELF_TEST_DATA_END = 63


class _NativeDataError(Exception):
    """libarchive found an entry's data damaged (bad CRC, broken deflate stream, wrong size, …)."""


class _Libarchive:
    """The few libarchive calls needed here, through libarchive-c's loader and prototypes.

    `archive_read_next_header` and `archive_read_data` get prototypes of their own, without libarchive-c's error
    check, which only logs ARCHIVE_WARN (libarchive's way of reporting a bad CRC) and carries on: every return value
    is judged here.
    """

    def __init__(self) -> None:
        if _libarchive_import_error is not None:
            raise _libarchive_import_error
        ffi = libarchive_ffi
        version = ffi.version_number()
        self.version = f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"
        if version < _LIBARCHIVE_MIN_VERSION:
            raise RuntimeError(f"libarchive {self.version} is older than 3.3.0 and cannot decrypt ZipCrypto")
        self._ffi = ffi
        self._new_read = libarchive.read.new_archive_read
        self._next_header = ffi.libarchive["archive_read_next_header"]  # a new function object: ffi's is untouched
        self._next_header.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
        self._next_header.restype = ctypes.c_int
        self._read_data = ffi.libarchive["archive_read_data"]
        self._read_data.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        self._read_data.restype = ctypes.c_ssize_t
        # Fail here, not in the middle of a download, when libarchive-c or libarchive lacks something used below.
        for name in ("read_open_fd", "read_open_memory", "entry_size", "entry_size_is_set", "entry_pathname"):
            getattr(ffi, name)
        ffi.get_read_format_function("zip_seekable")
        self._self_test()

    @contextlib.contextmanager
    def open_fd(self, fd: int, pwd: bytes) -> Iterator[int]:
        """An archive reading the zip at `fd` through its central directory (seeking), nothing else."""
        with self._new_read("zip_seekable", "none", pwd) as archive:
            self._ffi.read_open_fd(archive, fd, CHUNK)
            yield archive

    def next_entry(self, archive: int) -> int | None:
        """The next entry (a pointer valid until the next call), None past the last; raises `_NativeDataError`."""
        entry = ctypes.c_void_p()
        status = self._next_header(archive, ctypes.byref(entry))
        if status == _ARCHIVE_EOF:
            return None
        if status < _ARCHIVE_WARN:  # a warning (e.g. a name this locale cannot show) still gives the entry
            raise _NativeDataError(self.error(archive))
        return entry.value

    def entry_size(self, entry: int) -> int | None:
        size: int | None = self._ffi.entry_size(entry) if self._ffi.entry_size_is_set(entry) else None
        return size

    def entry_name(self, entry: int) -> bytes | None:
        name: bytes | None = self._ffi.entry_pathname(entry)
        return name

    def read(self, archive: int, buffer: ctypes.Array[ctypes.c_char]) -> int:
        """Fill `buffer` with the current entry's next bytes: their count, 0 at its end, negative on an error."""
        count: int = self._read_data(archive, ctypes.addressof(buffer), len(buffer))
        return count

    def error(self, archive: int) -> str:
        message = self._ffi.error_string(archive)
        return message.decode("utf-8", "replace") if message else "unknown libarchive error"

    def _self_test(self) -> None:
        """Decrypt the built-in zip, and see a damaged copy of it fail; a libarchive that does not is not used."""
        damaged = bytearray(_SELF_TEST_ZIP)
        damaged[_SELF_TEST_DATA_END - 1] ^= 0x01  # the last plaintext byte changes: only the CRC can tell
        for data, expect in ((_SELF_TEST_ZIP, b"imputationd\n"), (bytes(damaged), None)):
            buffer = ctypes.create_string_buffer(64)
            with self._new_read("zip_seekable", "none", b"pw") as archive:
                self._ffi.read_open_memory(archive, ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p), len(data))
                if self.next_entry(archive) is None:
                    raise RuntimeError("self-test: libarchive finds no entry in a ZipCrypto zip")
                got, count = b"", 1
                while count > 0:
                    count = self.read(archive, buffer)
                    got += buffer.raw[: max(count, 0)]
                if expect is not None and (count < 0 or got != expect):
                    raise RuntimeError(f"self-test: libarchive does not decrypt ZipCrypto ({self.error(archive)})")
            if expect is None and count >= 0:
                raise RuntimeError("self-test: libarchive does not report a bad CRC in a ZipCrypto entry")


_libarchive_lock = threading.Lock()
_libarchive_loaded = False
_libarchive: _Libarchive | None = None


def _load_libarchive() -> _Libarchive | None:
    """libarchive, loaded and checked on first use; None (said once, at warning) when it cannot be used."""
    global _libarchive, _libarchive_loaded
    with _libarchive_lock:
        if not _libarchive_loaded:
            _libarchive_loaded = True
            try:
                _libarchive = _Libarchive()
            except Exception as exc:  # no libarchive-c, no libarchive.so, a missing symbol, a failed self-test
                log.warning(
                    "zipcrypto_slow_fallback",
                    reason=f"{type(exc).__name__}: {exc}",
                    detail="ZipCrypto zips are checked and extracted in pure Python (about 1.5 MB/s): install "
                    "libarchive (Debian: libarchive13) and libarchive-c",
                )
        return _libarchive


@contextlib.contextmanager
def _native_reader(
    path: Path, infos: list[zipfile.ZipInfo], pwd: bytes | None, aes: bool
) -> Iterator[_NativeZip | None]:
    """libarchive reading `path` in step with zipfile, for a ZipCrypto zip with a password; else None."""
    if (
        aes
        or not pwd
        or not any(info.flag_bits & 0x1 for info in infos)
        or any(a.header_offset >= b.header_offset for a, b in pairwise(infos))  # (overlaps: the structure check)
    ):
        yield None
        return
    lib = _load_libarchive()
    if lib is None:
        yield None
        return
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with contextlib.ExitStack() as stack:
            archive: int | None = None
            try:
                archive = stack.enter_context(lib.open_fd(fd, pwd))
            except Exception as exc:  # libarchive.ArchiveError: it does not take this file for a zip
                log.warning(
                    "zipcrypto_native_reader_disagrees",
                    file=path.name,
                    reason=f"libarchive cannot open it: {exc}",
                    detail="this zip is read in pure Python (slow)",
                )
            yield None if archive is None else _NativeZip(lib, archive, path, infos)
    finally:
        os.close(fd)


class _NativeZip:
    """libarchive's reading of a zip, entry by entry in the order they are stored, like `infos` (zipfile's view,
    sorted by offset). Each entry asked for must be the one libarchive reaches there: same name (compared when it is
    ASCII: libarchive converts others to the locale's charset) and same size. On the first disagreement, or a
    libarchive error in a header, it stands down for the rest of the zip (logged), and zipfile reads it."""

    def __init__(self, lib: _Libarchive, archive: int, path: Path, infos: list[zipfile.ZipInfo]) -> None:
        self._lib = lib
        self._archive = archive
        self._path = path
        self._infos = infos
        self._next = 0  # index in `infos` of the entry libarchive reaches next
        self._off = False
        self._buffer = (ctypes.c_char * CHUNK)()
        self._view = memoryview(self._buffer).cast("B")

    def chunks(self, info: zipfile.ZipInfo) -> Iterator[memoryview] | None:
        """`info`'s contents as views of one reused buffer, its CRC checked after the last; None: let zipfile read."""
        if self._off or not self._reach(info):
            return None
        return self._read()

    def _reach(self, info: zipfile.ZipInfo) -> bool:
        while self._next < len(self._infos):
            expected = self._infos[self._next]
            self._next += 1
            try:
                entry = self._lib.next_entry(self._archive)
            except _NativeDataError as exc:
                return self._stand_down(expected, f"libarchive cannot read its header: {exc}")
            if entry is None:
                return self._stand_down(expected, "libarchive finds no entry there")
            name = self._lib.entry_name(entry)
            if expected.orig_filename.isascii() and name != expected.orig_filename.encode("ascii"):
                return self._stand_down(expected, f"libarchive finds {name!r} there")
            size = self._lib.entry_size(entry)
            if size != expected.file_size:
                return self._stand_down(expected, f"libarchive finds {size} bytes instead of {expected.file_size}")
            if expected is info:
                return True
        return self._stand_down(info, "it was asked for out of order")

    def _read(self) -> Iterator[memoryview]:
        while (count := self._lib.read(self._archive, self._buffer)) > 0:
            yield self._view[:count]
        if count < 0:
            message = self._lib.error(self._archive)
            self._off = True  # after an error in the data, libarchive cannot be trusted to go on
            if "passphrase" in message.lower():  # "Incorrect passphrase"; zipfile's check passed it already
                raise _PasswordRefused(message)
            raise _NativeDataError(message)

    def _stand_down(self, info: zipfile.ZipInfo, why: str) -> bool:
        self._off = True
        log.warning(
            "zipcrypto_native_reader_disagrees",
            file=self._path.name,
            entry=info.filename,
            reason=why,
            detail="this zip is read in pure Python (slow)",
        )
        return False


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, _NativeDataError):
        return f"{text} (libarchive)"
    if isinstance(exc, zlib.error):
        return f"compressed data is damaged ({text})"
    if isinstance(exc, EOFError):
        return "compressed data ends early"
    if isinstance(exc, NotImplementedError):
        return f"cannot be read: {text}"
    return text


__all__ = ["CorruptResult", "WrongPassword", "extract_zip", "is_aes", "verify_zip"]
