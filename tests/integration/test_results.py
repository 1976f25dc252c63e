"""Result zips: verification (structure, CRCs, passwords; ZipCrypto and AES) and safe extraction."""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import pyzipper
import structlog
from support.prerequisites import require_tool

from daemon import results
from daemon.results import CorruptResult, WrongPassword, extract_zip, is_aes, verify_zip

# --- a tiny zip writer: raw names, stored or deflated, optional ZipCrypto (the stdlib cannot write it) ---------------

_CRC_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0xEDB88320 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


class _ZipCrypto:
    def __init__(self, password: bytes) -> None:
        self.k0, self.k1, self.k2 = 305419896, 591751049, 878082192
        for byte in password:
            self._update(byte)

    def _update(self, byte: int) -> None:
        self.k0 = (self.k0 >> 8) ^ _CRC_TABLE[(self.k0 ^ byte) & 0xFF]
        self.k1 = ((self.k1 + (self.k0 & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        self.k2 = (self.k2 >> 8) ^ _CRC_TABLE[(self.k2 ^ (self.k1 >> 24)) & 0xFF]

    def encrypt(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            k = self.k2 | 2
            out.append(byte ^ (((k * (k ^ 1)) >> 8) & 0xFF))
            self._update(byte)
        return bytes(out)


def make_zip(
    path: Path,
    entries: list[tuple[str | bytes, bytes]],
    *,
    password: str | list[str | None] | None = None,
    deflate: bool = True,
) -> Path:
    """Write a zip whose member names are taken verbatim (hostile ones included)."""
    passwords = password if isinstance(password, list) else [password] * len(entries)
    out = bytearray()
    central = bytearray()
    for (name, data), pwd in zip(entries, passwords, strict=True):
        raw_name = name.encode() if isinstance(name, str) else name
        crc = zlib.crc32(data)
        if deflate:
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            body, method = c.compress(data) + c.flush(), 8
        else:
            body, method = data, 0
        flags = 0x800
        if pwd is not None:
            flags |= 0x1
            header = bytes(range(11)) + bytes([crc >> 24])  # fixed, so a wrong password fails the same way each run
            body = _ZipCrypto(pwd.encode()).encrypt(header + body)
        offset = len(out)
        fields = (20, flags, method, 0, 0x21, crc, len(body), len(data), len(raw_name), 0)
        out += b"PK\x03\x04" + struct.pack("<2H2HHLLLHH", *fields[:2], fields[2], *fields[3:5], *fields[5:]) + raw_name
        out += body
        central += (
            b"PK\x01\x02"
            + struct.pack("<4H2H3L5HLL", 20, 20, flags, method, 0, 0x21, crc, len(body), len(data), len(raw_name),
                          0, 0, 0, 0, 0o100644 << 16, offset)
            + raw_name
        )
    eocd = b"PK\x05\x06" + struct.pack("<4H2LH", 0, 0, len(entries), len(entries), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + eocd))
    return path


def make_aes_zip(path: Path, entries: list[tuple[str, bytes]], password: str) -> Path:
    with pyzipper.AESZipFile(path, "w", compression=pyzipper.ZIP_DEFLATED, encryption=pyzipper.WZ_AES) as zf:
        zf.setpassword(password.encode())
        for name, data in entries:
            zf.writestr(name, data)
    return path


DOSE = b"##fileformat=VCFv4.2\n" + b"20\t1\t.\tA\tG\t.\tPASS\t.\tGT\t0|1\n" * 5000
INFO = b"SNP\tREF(0)\tALT(1)\n" * 3000
ENTRIES = [("chr20.dose.vcf.gz", DOSE), ("chr20.info.gz", INFO)]


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x55
    path.write_bytes(bytes(data))


def data_offset(path: Path, index: int = 0) -> int:
    """Where entry `index`'s data starts, plus a bit (inside it)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[index]
    return info.header_offset + 30 + len(info.filename.encode()) + 40


def require_libarchive() -> None:
    require_tool(results._load_libarchive() is not None, "a loadable libarchive (the log says why it is not)",
                 "apt-get install libarchive13")


@pytest.fixture(params=["libarchive", "zipfile"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Who reads ZipCrypto entries: libarchive (the fast path) or, as where it cannot be loaded, zipfile."""
    if request.param == "zipfile":
        monkeypatch.setattr(results, "_load_libarchive", lambda: None)
    else:
        require_libarchive()
    return request.param


# --- the writer itself ------------------------------------------------------------------------------------------------


def test_test_writer_makes_zipcrypto_the_stdlib_reads(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "chr_20.zip", ENTRIES, password="s3cret")
    with zipfile.ZipFile(z) as zf:
        assert all(info.flag_bits & 1 for info in zf.infolist())
        assert zf.read("chr20.dose.vcf.gz", pwd=b"s3cret") == DOSE


# --- verify_zip -----------------------------------------------------------------------------------------------------


def test_unencrypted_zip_verifies(tmp_path: Path) -> None:
    z = tmp_path / "qc.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in ENTRIES:
            zf.writestr(name, data)
        zf.writestr("statistics/", b"")
    assert verify_zip(z, None) is True
    assert verify_zip(z, "unused") is True
    assert is_aes(z) is False


def test_zipcrypto_with_password_checks_every_crc(tmp_path: Path, reader: str) -> None:
    z = make_zip(tmp_path / "chr_20.zip", ENTRIES, password="s3cret")
    assert verify_zip(z, "s3cret") is True
    assert is_aes(z) is False


def test_zipcrypto_stored_entries(tmp_path: Path, reader: str) -> None:
    z = make_zip(tmp_path / "chr_20.zip", ENTRIES, password="s3cret", deflate=False)
    assert verify_zip(z, "s3cret") is True


def test_wrong_password(tmp_path: Path, reader: str) -> None:
    z = make_zip(tmp_path / "chr_20.zip", ENTRIES, password="s3cret")
    with pytest.raises(WrongPassword, match=r"chr_20.zip: the password does not open it"):
        verify_zip(z, "nope-but-long-enough")


def test_without_password_only_the_structure_is_checked(tmp_path: Path, reader: str) -> None:
    z = make_zip(tmp_path / "chr_20.zip", ENTRIES, password="s3cret")
    assert verify_zip(z, None) is False
    flip(z, data_offset(z))  # damage inside encrypted data cannot be seen without the password…
    assert verify_zip(z, None) is False
    with pytest.raises(CorruptResult) as info:  # …and is with it
        verify_zip(z, "s3cret")
    assert not isinstance(info.value, WrongPassword)
    assert "chr_20.zip: entry 'chr20.dose.vcf.gz'" in str(info.value)


def test_later_entry_failing_the_password_check_is_corruption(tmp_path: Path, reader: str) -> None:
    z = make_zip(tmp_path / "chr_20.zip", ENTRIES, password=["s3cret", "other"])
    with pytest.raises(CorruptResult) as info:
        verify_zip(z, "s3cret")
    assert not isinstance(info.value, WrongPassword)
    assert "fails the password check that earlier entries passed" in str(info.value)


@pytest.mark.parametrize("deflate", [True, False])
def test_flipped_byte_in_unencrypted_data_fails_the_crc(tmp_path: Path, deflate: bool) -> None:
    z = make_zip(tmp_path / "chr_20.zip", ENTRIES, deflate=deflate)
    flip(z, data_offset(z, 1))
    with pytest.raises(CorruptResult, match=r"chr_20.zip: entry 'chr20.info.gz'"):
        verify_zip(z, None)


def test_truncated_and_garbage_files(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "chr_20.zip", ENTRIES, password="s3cret")
    data = z.read_bytes()
    z.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptResult, match="not a readable zip"):
        verify_zip(z, "s3cret")
    z.write_bytes(b"<html>502 Bad Gateway</html>")
    with pytest.raises(CorruptResult, match="not a readable zip"):
        verify_zip(z, None)
    z.write_bytes(b"")
    with pytest.raises(CorruptResult):
        verify_zip(z, None)


def test_local_header_damage_is_found_without_password(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "chr_20.zip", ENTRIES, password="s3cret")
    with zipfile.ZipFile(z) as zf:
        second = zf.infolist()[1].header_offset
    flip(z, second)  # the "PK\3\4" signature of the second entry
    with pytest.raises(CorruptResult, match=r"entry 'chr20.info.gz': no local header at byte"):
        verify_zip(z, None)


def test_entry_data_overlapping_the_next_record_is_found(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "chr_20.zip", ENTRIES, password="s3cret")
    data = bytearray(z.read_bytes())
    cd = data.index(b"PK\x01\x02")
    struct.pack_into("<L", data, cd + 20, struct.unpack_from("<L", data, cd + 20)[0] + 100)  # compressed size
    z.write_bytes(bytes(data))
    with pytest.raises(CorruptResult, match="runs past byte"):
        verify_zip(z, None)


@pytest.mark.parametrize("deflate", [True, False])
def test_flipped_byte_in_zipcrypto_data_fails_the_crc(tmp_path: Path, reader: str, deflate: bool) -> None:
    z = make_zip(tmp_path / "chr_20.zip", ENTRIES, password="s3cret", deflate=deflate)
    with zipfile.ZipFile(z) as zf:
        info = zf.infolist()[0]
    flip(z, info.header_offset + 30 + len(info.filename) + info.compress_size - 5)  # near its end
    for attempt in (lambda: verify_zip(z, "s3cret"), lambda: extract_zip(z, tmp_path / "out", "s3cret")):
        with pytest.raises(CorruptResult) as caught:
            attempt()
        assert not isinstance(caught.value, WrongPassword)
        assert "chr_20.zip: entry 'chr20.dose.vcf.gz'" in str(caught.value)
        if not deflate:  # a stored entry decrypts fine: only its CRC tells
            assert "CRC" in str(caught.value)
    assert list((tmp_path / "out").rglob("*")) == []


def test_zipcrypto_and_plain_entries_in_one_zip(tmp_path: Path, reader: str) -> None:
    z = make_zip(tmp_path / "chr_20.zip", [("README", b"plain\n"), *ENTRIES], password=[None, "s3cret", "s3cret"])
    assert verify_zip(z, "s3cret") is True
    assert verify_zip(z, None) is False
    with pytest.raises(WrongPassword):  # the first encrypted entry decides, not the first entry
        verify_zip(z, "nope-but-long-enough")
    paths = extract_zip(z, tmp_path / "out", "s3cret")
    assert [p.read_bytes() for p in paths] == [b"plain\n", DOSE, INFO]


# --- libarchive -----------------------------------------------------------------------------------------------------


def test_libarchive_reads_the_zipcrypto_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_libarchive()
    z = make_zip(tmp_path / "chr_20.zip", ENTRIES, password="s3cret")

    def no_python_decryption(self: zipfile.ZipExtFile, n: int = -1) -> bytes:
        raise AssertionError("zipfile read an entry's data")

    monkeypatch.setattr(zipfile.ZipExtFile, "read", no_python_decryption)
    checkpoints = []
    assert verify_zip(z, "s3cret", checkpoint=lambda: checkpoints.append(1)) is True
    assert len(checkpoints) >= 2
    paths = extract_zip(z, tmp_path / "out", "s3cret")
    assert [p.read_bytes() for p in paths] == [DOSE, INFO]
    with pytest.raises(WrongPassword):  # zipfile still checks the password, from the entry's 12-byte header
        verify_zip(z, "nope-but-long-enough")


def test_checkpoint_is_called_between_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_libarchive()
    monkeypatch.setattr(results, "CHUNK", 16 * 1024)
    z = make_zip(tmp_path / "chr_20.zip", ENTRIES, password="s3cret")
    checkpoints = []
    assert verify_zip(z, "s3cret", checkpoint=lambda: checkpoints.append(1)) is True
    assert len(checkpoints) >= (len(DOSE) + len(INFO)) // (16 * 1024)


def test_an_entry_libarchive_sees_otherwise_is_read_by_zipfile(tmp_path: Path) -> None:
    require_libarchive()
    z = make_zip(tmp_path / "chr_20.zip", [ENTRIES[0], (b"nul\x00byte", INFO)], password="s3cret")
    with structlog.testing.capture_logs() as logs:
        assert verify_zip(z, "s3cret") is True  # libarchive cuts the name at the NUL: zipfile reads that entry
    [said] = [e for e in logs if e["event"] == "zipcrypto_native_reader_disagrees"]
    assert said["entry"] == "nul" and "b'nul'" in said["reason"]
    flip(z, data_offset(z, 1))
    with pytest.raises(CorruptResult, match="entry 'nul'"):
        verify_zip(z, "s3cret")


def test_without_libarchive_zipcrypto_is_read_by_zipfile_and_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cannot_load() -> None:
        raise OSError("libarchive.so.13: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(results, "_Libarchive", cannot_load)
    monkeypatch.setattr(results, "_libarchive", None)
    monkeypatch.setattr(results, "_libarchive_loaded", False)
    z = make_zip(tmp_path / "chr_20.zip", ENTRIES, password="s3cret")
    with structlog.testing.capture_logs() as logs:
        assert verify_zip(z, "s3cret") is True
        assert [p.name for p in extract_zip(z, tmp_path / "out", "s3cret")] == ["chr20.dose.vcf.gz", "chr20.info.gz"]
    [said] = [e for e in logs if e["event"] == "zipcrypto_slow_fallback"]
    assert said["log_level"] == "warning" and "cannot open shared object" in said["reason"]


def test_a_libarchive_failing_the_self_test_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    require_libarchive()
    monkeypatch.setattr(results._Libarchive, "read", lambda self, archive, buffer: 0)  # "reads" nothing, no error
    with pytest.raises(RuntimeError, match="self-test: libarchive does not decrypt ZipCrypto"):
        results._Libarchive()


def test_no_libarchive_library_at_all(tmp_path: Path) -> None:
    """The real failure: libarchive-c cannot load the shared library (here: told to load one that is not there)."""
    z = make_zip(tmp_path / "chr_20.zip", ENTRIES, password="s3cret")
    code = (
        "import sys; from daemon import results\n"
        f"assert results.verify_zip({str(z)!r}, 's3cret') is True\n"
        "assert results._load_libarchive() is None\n"
    )
    env = {**os.environ, "LIBARCHIVE": str(tmp_path / "no-such-libarchive.so")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "zipcrypto_slow_fallback" in done.stdout + done.stderr


def test_aes_zip(tmp_path: Path) -> None:
    z = make_aes_zip(tmp_path / "chr_20.zip", ENTRIES, "s3cret")
    assert is_aes(z) is True
    assert verify_zip(z, "s3cret") is True
    assert verify_zip(z, None) is False
    with pytest.raises(WrongPassword):
        verify_zip(z, "wrong")
    flip(z, data_offset(z) + 20)
    with pytest.raises(CorruptResult, match=r"entry 'chr20.dose.vcf.gz'"):
        verify_zip(z, "s3cret")


def test_checkpoint_can_abandon_the_check(tmp_path: Path, reader: str) -> None:
    z = make_zip(tmp_path / "chr_20.zip", ENTRIES, password="s3cret")

    class Stop(Exception):
        pass

    def checkpoint() -> None:
        raise Stop

    with pytest.raises(Stop):
        verify_zip(z, "s3cret", checkpoint=checkpoint)


# --- extract_zip ----------------------------------------------------------------------------------------------------


def test_extract_writes_files_with_modes(tmp_path: Path, reader: str) -> None:
    z = make_zip(tmp_path / "chr_20.zip", [*ENTRIES, ("statistics/summary.txt", b"ok\n")], password="s3cret")
    dest = tmp_path / "out"
    paths = extract_zip(z, dest, "s3cret")
    assert paths == [dest / "chr20.dose.vcf.gz", dest / "chr20.info.gz", dest / "statistics" / "summary.txt"]
    assert paths[0].read_bytes() == DOSE
    assert (dest / "statistics" / "summary.txt").read_bytes() == b"ok\n"
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == 0o640
    assert stat.S_IMODE((dest / "statistics").stat().st_mode) == 0o750
    assert stat.S_IMODE(dest.stat().st_mode) == 0o750
    assert sorted(os.listdir(dest)) == ["chr20.dose.vcf.gz", "chr20.info.gz", "statistics"]  # no .partial left


def test_extract_aes(tmp_path: Path) -> None:
    z = make_aes_zip(tmp_path / "chr_20.zip", ENTRIES, "s3cret")
    paths = extract_zip(z, tmp_path / "out", "s3cret")
    assert [p.read_bytes() for p in paths] == [DOSE, INFO]


@pytest.mark.parametrize(
    "hostile",
    ["../evil.txt", "/etc/evil", "a/../../b", "dir\\..\\evil", b"nul\x00byte", "C:evil", "a//b", ".partial/x.part"],
)
def test_extract_refuses_hostile_member_names(tmp_path: Path, hostile: str | bytes) -> None:
    z = make_zip(tmp_path / "chr_20.zip", [("good.txt", b"fine"), (hostile, b"evil")])
    dest = tmp_path / "out"
    with pytest.raises(CorruptResult, match="refusing to extract"):
        extract_zip(z, dest, None)
    assert not dest.exists() or list(dest.rglob("*")) == []
    assert not (tmp_path / "evil.txt").exists()


def test_extract_refuses_duplicate_names(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "chr_20.zip", [("a.txt", b"1"), ("a.txt", b"2")])
    with pytest.raises(CorruptResult, match="appears twice"):
        extract_zip(z, tmp_path / "out", None)


def test_extract_rolls_back_on_a_bad_entry(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "chr_20.zip", ENTRIES)
    flip(z, data_offset(z, 1))
    dest = tmp_path / "out"
    with pytest.raises(CorruptResult, match="chr20.info.gz"):
        extract_zip(z, dest, None)
    assert list(dest.rglob("*")) == []


def test_extract_encrypted_without_password_or_wrong_one(tmp_path: Path, reader: str) -> None:
    z = make_zip(tmp_path / "chr_20.zip", ENTRIES, password="s3cret")
    with pytest.raises(CorruptResult, match="no password is known"):
        extract_zip(z, tmp_path / "out", None)
    with pytest.raises(WrongPassword):
        extract_zip(z, tmp_path / "out", "wrong-password")
    assert list((tmp_path / "out").rglob("*")) == []


def test_extract_refuses_a_symlinked_folder_leading_out(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "chr_20.zip", [("statistics/x.txt", b"x")])
    dest = tmp_path / "out"
    dest.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (dest / "statistics").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CorruptResult, match="leads out of"):
        extract_zip(z, dest, None)
    assert list((tmp_path / "elsewhere").iterdir()) == []
