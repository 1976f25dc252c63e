"""The `.md5` files imputationserver2 writes beside each result zip, read as `md5sum` writes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.resultfiles import MD5SUM_MAX, parse_md5sum, read_md5sum
from daemon.services.errors import Permanent

DIGEST = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("text", [
    f"{DIGEST}  chr_20.zip\n",  # md5sum's text mode
    f"{DIGEST} *chr_20.zip\n",  # its binary mode
    f"{DIGEST.upper()}  /data/jobs/job-1/local/chr_20.zip",  # a path as the server wrote it, upper-case hex
    f"{'f' * 32}  chr_21.zip\n{DIGEST}  chr_20.zip\n",  # several lines: the one for this file
])
def test_the_line_for_the_file_gives_its_md5(text: str) -> None:
    assert parse_md5sum(text, "chr_20.zip") == DIGEST


@pytest.mark.parametrize("text", ["", "not a checksum\n", f"{DIGEST}  chr_21.zip\n", f"{DIGEST[:-1]}  chr_20.zip"])
def test_a_file_without_the_line_is_refused_naming_it(text: str) -> None:
    with pytest.raises(Permanent, match=r"^chr_20\.zip\.md5: not an md5sum line for chr_20\.zip") as caught:
        parse_md5sum(text, "chr_20.zip")
    assert caught.value.kind == "bad_checksum"


def test_a_stored_md5_file_is_read_only_up_to_its_bound(tmp_path: Path) -> None:
    """A `.md5` the server lists is read after it was stored: never more of it than an md5sum file can hold."""
    md5 = tmp_path / "chr_20.zip.md5"
    md5.write_bytes(f"{DIGEST}  chr_20.zip\n".encode())
    assert read_md5sum(md5, "chr_20.zip") == DIGEST
    md5.write_bytes(f"{DIGEST}  chr_20.zip\n".encode().ljust(MD5SUM_MAX + 1, b" "))
    with pytest.raises(Permanent, match=rf"^chr_20\.zip\.md5: more than {MD5SUM_MAX} bytes") as caught:
        read_md5sum(md5, "chr_20.zip")
    assert caught.value.kind == "bad_checksum"
    md5.write_bytes(b"\xff\xfe" + f"{DIGEST}  chr_20.zip".encode())  # not text: still named, never a crash
    with pytest.raises(Permanent, match=r"^chr_20\.zip\.md5: not an md5sum line"):
        read_md5sum(md5, "chr_20.zip")
