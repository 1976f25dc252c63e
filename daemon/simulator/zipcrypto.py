"""Writing zip files with PKWARE "traditional" encryption (ZipCrypto), the default of Cloudgene result zips.

The standard library's `zipfile` decrypts ZipCrypto but cannot write it. This is the algorithm from the PKWARE
APPNOTE (section 6.1): three 32-bit keys initialised from the password, a 12-byte encryption header whose last byte
is the high byte of the entry's CRC-32, and every byte XORed with a keystream byte that depends on the plaintext so far.
It is weak cryptography; it is here only because the servers use it. Entries are deflated, then encrypted.

The cipher updates its keys byte by byte from the plaintext, so in Python it costs about 50 ns a byte: half of the
simulator's CPU time per job in bench/throughput.py, on the cores the daemon under test shares. The system's
libarchive (through libarchive-c, as the daemon reads these zips) writes them in C and is used when it loads; the
Python writer remains for machines without it and for a fixed encryption header (`random_bytes`).
"""

from __future__ import annotations

import functools
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 16


def _crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC = _crc_table()


class ZipCryptoEncrypter:
    """The traditional PKWARE stream cipher, encrypting direction."""

    def __init__(self, password: bytes) -> None:
        self.k0, self.k1, self.k2 = 0x12345678, 0x23456789, 0x34567890
        for b in password:
            self._update(b)

    def _update(self, b: int) -> None:
        self.k0 = (self.k0 >> 8) ^ _CRC[(self.k0 ^ b) & 0xFF]
        self.k1 = ((self.k1 + (self.k0 & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        self.k2 = (self.k2 >> 8) ^ _CRC[(self.k2 ^ (self.k1 >> 24)) & 0xFF]

    def encrypt(self, data: bytes) -> bytes:
        k0, k1, k2 = self.k0, self.k1, self.k2
        crc = _CRC
        out = bytearray(len(data))
        for i, p in enumerate(data):
            t = (k2 | 2) & 0xFFFF
            out[i] = p ^ (((t * (t ^ 1)) >> 8) & 0xFF)
            k0 = (k0 >> 8) ^ crc[(k0 ^ p) & 0xFF]
            k1 = ((k1 + (k0 & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
            k2 = (k2 >> 8) ^ crc[(k2 ^ (k1 >> 24)) & 0xFF]
        self.k0, self.k1, self.k2 = k0, k1, k2
        return bytes(out)


def _dos_datetime(ts: float) -> tuple[int, int]:
    t = time.localtime(ts)
    year = max(t.tm_year, 1980)
    return (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2), ((year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday


def _file_crc(path: Path) -> tuple[int, int]:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return crc & 0xFFFFFFFF, size


def write_zipcrypto(
    dest: str | Path,
    entries: Iterable[tuple[str, str | Path]],
    password: str | bytes,
    *,
    level: int = 6,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> Path:
    """Write `dest` holding each (archive name, file) of `entries`, deflated and ZipCrypto-encrypted.

    `random_bytes` makes the Python writer draw the encryption headers from it (tests fix them); by default the
    system's libarchive writes the zip when it is there (its entries carry a data descriptor, so their check byte
    is the high byte of the modification time rather than of the CRC: both are valid, and readers accept both)."""
    dest = Path(dest)
    pw = password.encode("utf-8") if isinstance(password, str) else password
    entries = list(entries)
    # libarchive stores an empty file unencrypted; a server's zip encrypts every entry.
    if random_bytes is os.urandom and all(Path(src).stat().st_size for _, src in entries) and (
        _libarchive_writes_zipcrypto()
    ):
        return _write_with_libarchive(dest, entries, pw, level)
    central: list[bytes] = []
    with open(dest, "wb") as out:
        for arcname, src in entries:
            central.append(_write_entry(out, arcname, Path(src), pw, level, random_bytes))
        cd_offset = out.tell()
        for record in central:
            out.write(record)
        cd_size = out.tell() - cd_offset
        if cd_offset > 0xFFFFFFFF or len(central) > 0xFFFF:
            raise ValueError("zip64 is not supported")
        out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), cd_size, cd_offset, 0))
    return dest


@functools.cache
def _libarchive_writes_zipcrypto() -> bool:
    """libarchive-c loads, and the zip its libarchive writes is one zipfile decrypts (checked once)."""
    import tempfile
    import zipfile

    try:
        with tempfile.TemporaryDirectory(prefix="imputationd-zipcrypto-") as tmp:
            src = Path(tmp, "src")
            src.write_bytes(b"imputationd\n" * 100)
            _write_with_libarchive(Path(tmp, "check.zip"), [("check", src)], b"pw", 6)
            with zipfile.ZipFile(Path(tmp, "check.zip")) as zf:
                info = zf.getinfo("check")
                return bool(info.flag_bits & 1) and zf.read(info, pwd=b"pw") == src.read_bytes()
    except Exception:  # no libarchive-c or libarchive, too old for passphrases, or it wrote something else
        return False


def _write_with_libarchive(dest: Path, entries: Iterable[tuple[str, str | Path]], pw: bytes, level: int) -> Path:
    import libarchive

    options = f"encryption=zipcrypt,compression=deflate,compression-level={level}"
    with libarchive.file_writer(str(dest), "zip", options=options, passphrase=pw) as archive:
        for arcname, src in entries:
            archive.add_files(str(src), pathname=arcname)
    return dest


def _write_entry(out: BinaryIO, arcname: str, src: Path, pw: bytes, level: int,
                 random_bytes: Callable[[int], bytes]) -> bytes:
    crc, size = _file_crc(src)
    mtime, mdate = _dos_datetime(src.stat().st_mtime)
    name = arcname.encode("utf-8")
    flags = 0x0001 | (0x0800 if not name.isascii() else 0)
    offset = out.tell()
    if offset > 0xFFFFFFFF or size > 0xFFFFFFFF:
        raise ValueError("zip64 is not supported")

    def local_header(csize: int) -> bytes:
        return struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 20, flags, 8, mtime, mdate, crc, csize, size, len(name), 0
        ) + name

    out.write(local_header(0))
    enc = ZipCryptoEncrypter(pw)
    # Without a data descriptor the check byte (last header byte) is the CRC's high byte.
    header = bytearray(random_bytes(11)) + bytes([crc >> 24])
    written = out.write(enc.encrypt(bytes(header)))
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    with open(src, "rb") as f:
        while chunk := f.read(_CHUNK):
            written += out.write(enc.encrypt(compressor.compress(chunk)))
    written += out.write(enc.encrypt(compressor.flush()))
    end = out.tell()
    out.seek(offset)
    out.write(local_header(written))
    out.seek(end)
    return struct.pack(
        "<IHHHHHHIIIHHHHHII",
        0x02014B50, 20, 20, flags, 8, mtime, mdate, crc, written, size, len(name), 0, 0, 0, 0, 0o100644 << 16, offset,
    ) + name
