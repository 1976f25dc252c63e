"""Result zips: verify them (structure, CRCs, password) and, optionally, extract them safely.

Cloudgene's `chr_N.zip` files are ZipCrypto-encrypted by default and AES-encrypted (WinZip AE-1/AE-2, compression
method 99) when the job asked for `aesEncryption`. The stdlib `zipfile` reads ZipCrypto; `pyzipper.AESZipFile`
reads both, and is used whenever a zip holds an AES entry.

Speed: the stdlib's ZipCrypto decryption is pure Python (about 2 MB/s on one core), so checking the CRCs of a large
ZipCrypto zip takes minutes per GB; AES (PyCryptodome, in C) and unencrypted entries run at zlib speed.
"""

from __future__ import annotations

import contextlib
import lzma
import os
import struct
import uuid
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pyzipper

#: Read size when checking or extracting an entry.
CHUNK = 1 << 20
_AES_METHOD = 99
_AES_EXTRA_ID = 0x9901
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # the 30-byte local file header
_LOCAL_SIGNATURE = b"PK\x03\x04"
#: Errors the zip readers raise for damaged data (bad CRC or HMAC, broken deflate stream, cut-off entry, …).
_DATA_ERRORS = (
    zipfile.BadZipFile,
    pyzipper.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    NotImplementedError,
    struct.error,
    ValueError,
)


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
        opener = pyzipper.AESZipFile if aes else zipfile.ZipFile
        with opener(path) as zf:
            infos = sorted(zf.infolist(), key=lambda info: info.header_offset)
            _check_structure(path, infos, zf.start_dir)
            all_checked = True
            first_encrypted = True
            for info in infos:
                if info.is_dir() and info.file_size == 0:
                    continue
                encrypted = bool(info.flag_bits & 0x1)
                if encrypted and pwd is None:
                    all_checked = False
                    continue
                _check_entry(path, zf, info, pwd if encrypted else None, first_encrypted, checkpoint)
                first_encrypted = first_encrypted and not encrypted
    except (zipfile.BadZipFile, pyzipper.BadZipFile, zlib.error, EOFError, struct.error) as exc:
        raise CorruptResult(f"{path.name}: not a readable zip ({exc})") from None
    return all_checked


def extract_zip(path: Path, dest_dir: Path, password: str | None) -> list[Path]:
    """Extract every file of a result zip into `dest_dir` and return the paths written, in archive order.

    Member names go through `downloads.safe_relative_path`: an absolute name, `..`, a backslash or a control
    character makes the whole zip refused (`CorruptResult`) before anything is written, as do duplicate names.
    Each file is streamed into a temp file in `dest_dir/.partial/`, its CRC checked by the reader, fsynced, made
    0640 and renamed into place (folders 0750). On any failure the files this call wrote are removed again.
    Directory entries only create folders; symlink entries are written as plain files holding the link text.
    """
    from daemon import downloads  # downloads imports this module
    from daemon.services.errors import Permanent

    path = Path(path)
    dest_dir = Path(dest_dir)
    pwd = password.encode("utf-8") if password is not None else None
    opener = pyzipper.AESZipFile if is_aes(path) else zipfile.ZipFile
    written: list[Path] = []
    try:
        with opener(path) as zf:
            members = []
            seen: set[str] = set()
            for info in zf.infolist():
                name = info.orig_filename  # `filename` is silently cut at a NUL byte; the original is what we judge
                try:
                    rel = downloads.safe_relative_path(name[:-1] if info.is_dir() and name.endswith("/") else name)
                except Permanent as exc:
                    raise CorruptResult(f"{path.name}: refusing to extract: {exc}") from None
                key = rel.as_posix()
                if key in seen:
                    raise CorruptResult(f"{path.name}: refusing to extract: {key!r} appears twice")
                seen.add(key)
                members.append((info, rel))
            downloads._make_dirs(dest_dir)
            for info, rel in members:
                target = dest_dir.joinpath(*rel.parts)
                if not target.parent.resolve().is_relative_to(dest_dir.resolve()):
                    raise CorruptResult(f"{path.name}: refusing to extract {rel}: its folder leads out of {dest_dir}")
                if info.is_dir():
                    downloads._make_dirs(target, base=dest_dir)
                    continue
                encrypted = bool(info.flag_bits & 0x1)
                if encrypted and pwd is None:
                    raise CorruptResult(f"{path.name}: {info.filename} is encrypted and no password is known")
                _extract_member(path, zf, info, pwd if encrypted else None, dest_dir, target)
                written.append(target)
    except BaseException:
        for done in written:
            with contextlib.suppress(OSError):
                os.unlink(done)
        raise
    return written


# --- internals ----------------------------------------------------------------------------------------------------


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
) -> None:
    where = f"{path.name}: entry {info.filename!r}"
    size = 0
    try:
        with zf.open(info, pwd=pwd) as member:
            while chunk := member.read(CHUNK):
                size += len(chunk)
                if checkpoint is not None:
                    checkpoint()
    except RuntimeError as exc:
        if "password" not in str(exc).lower():
            raise
        if first_encrypted:
            raise WrongPassword(f"{path.name}: the password does not open it (entry {info.filename!r})") from None
        raise CorruptResult(f"{where}: fails the password check that earlier entries passed") from None
    except _DATA_ERRORS as exc:
        raise CorruptResult(f"{where}: {_describe(exc)}") from None
    if size != info.file_size:
        raise CorruptResult(f"{where}: {size} bytes instead of {info.file_size}")


def _extract_member(
    path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, pwd: bytes | None, dest_dir: Path, target: Path
) -> None:
    from daemon import downloads

    if target.is_dir():
        raise CorruptResult(f"{path.name}: cannot extract {info.filename!r}: a directory of that name is in the way")
    partial_dir = dest_dir / downloads.PARTIAL_DIR
    downloads._make_dirs(partial_dir, base=dest_dir)
    partial = partial_dir / f"{uuid.uuid4().hex}{downloads.PARTIAL_SUFFIX}"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with open(fd, "wb") as out:
            size = 0
            try:
                with zf.open(info, pwd=pwd) as member:
                    while chunk := member.read(CHUNK):
                        out.write(chunk)
                        size += len(chunk)
            except RuntimeError as exc:
                if "password" not in str(exc).lower():
                    raise
                raise WrongPassword(f"{path.name}: the password does not open {info.filename!r}") from None
            except _DATA_ERRORS as exc:
                raise CorruptResult(f"{path.name}: entry {info.filename!r}: {_describe(exc)}") from None
            if size != info.file_size:
                raise CorruptResult(f"{path.name}: entry {info.filename!r}: {size} bytes instead of {info.file_size}")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(partial, downloads.FILE_MODE)
        created = downloads._make_dirs(target.parent, base=dest_dir)
        os.replace(partial, target)
        downloads._fsync_dir(target.parent)
        for directory in created:
            downloads._fsync_dir(directory.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        with contextlib.suppress(OSError):
            os.rmdir(partial_dir)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, zlib.error):
        return f"compressed data is damaged ({text})"
    if isinstance(exc, EOFError):
        return "compressed data ends early"
    if isinstance(exc, NotImplementedError):
        return f"cannot be read: {text}"
    return text


__all__ = ["CorruptResult", "WrongPassword", "extract_zip", "is_aes", "verify_zip"]
