"""Downloading one result file: names, streaming, length and zip checks, cleanup on every error path."""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.server
import io
import itertools
import os
import socket
import stat
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import httpx
import pytest
import pyzipper

from daemon import downloads, results
from daemon.downloads import (
    BadDownload,
    Downloaded,
    DownloadInterrupted,
    Published,
    download,
    remove_partials,
    safe_relative_path,
    sha256_file,
)
from daemon.services.deadlines import Budget
from daemon.services.errors import Blocked, Permanent, Transient
from daemon.services.http import open_body
from daemon.simulator import zipcrypto

SECRET = "a3f1c0ffee5ecret"
URL = f"https://imputation.example/share/results/{SECRET}/chr_20.zip?token=qs-secret"
#: How the adapter names the call in its messages (as Cloudgene's does).
CALL = "download of chr_20.zip"
BODY = os.urandom(300_000)


def opener(
    body: bytes | Callable[[], Iterator[bytes]] = BODY,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
    calls: list[int] | None = None,
) -> Callable[[], object]:
    """An `open_stream` over httpx's MockTransport: `body` as bytes (Content-Length set unless `headers` say
    otherwise) or as a chunk generator (no Content-Length unless given)."""

    def handler(request: httpx.Request) -> httpx.Response:
        if calls is not None:
            calls.append(1)
        if callable(body):
            return httpx.Response(status, headers=headers, stream=_Stream(body))
        all_headers = {"Content-Length": str(len(body)), **(headers or {})}
        return httpx.Response(status, headers=all_headers, stream=_Stream(lambda: iter([body])))

    client = httpx.Client(transport=httpx.MockTransport(handler))
    return lambda: open_body(client, URL, call=CALL, budget=Budget.transfer())


class _Stream(httpx.SyncByteStream):
    def __init__(self, chunks: Callable[[], Iterator[bytes]]) -> None:
        self._chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        yield from self._chunks()


def leftovers(result_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(result_dir)) for p in result_dir.rglob("*") if p.is_file())


def assert_clean(result_dir: Path) -> None:
    assert leftovers(result_dir) == []
    assert not (result_dir / downloads.PARTIAL_DIR).exists()


def assert_no_secret(exc: BaseException) -> None:
    text = str(exc)
    assert SECRET not in text and "qs-secret" not in text and "example" not in text


# --- safe_relative_path ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["chr_20.zip", "statistics/summary.txt", "qc_report.txt", "a/b/c.txt", "ünïcode-name.txt", "x..y.txt"]
)
def test_safe_names_are_kept(name: str) -> None:
    assert safe_relative_path(name) == PurePosixPath(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/etc/passwd",
        "../evil",
        "a/../../b",
        "a/..",
        "..",
        ".",
        "./x",
        "a//b",
        "dir/",
        "nul\x00byte",
        "new\nline",
        "esc\x1b[31m",
        "back\\slash",
        "..\\..\\evil",
        "C:evil",
        "c:/windows/x",
        ".partial/x.part",
        "x" * 256,
        "bad\udcffsurrogate",
    ],
)
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(Permanent) as info:
        safe_relative_path(name)
    assert info.value.kind == "unsafe_name"
    assert "\x00" not in str(info.value) and "\n" not in str(info.value) and "\x1b" not in str(info.value)


def test_unsafe_name_fails_before_any_request(tmp_path: Path) -> None:
    calls: list[int] = []
    with pytest.raises(Permanent, match="unsafe result file name '../x'"):
        download(opener(calls=calls), "../x", result_dir=tmp_path / "r")
    assert calls == []


# --- success --------------------------------------------------------------------------------------------------------


def test_download_stores_file_with_hash_and_modes(tmp_path: Path) -> None:
    result_dir = tmp_path / "results" / "job-1"
    got = download(opener(), "statistics/summary.txt", result_dir=result_dir, chunk_size=4096)
    target = result_dir / "statistics" / "summary.txt"
    assert got == Downloaded(
        path=target, size=len(BODY), sha256=hashlib.sha256(BODY).hexdigest(), content_length=len(BODY)
    )
    assert target.read_bytes() == BODY
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert stat.S_IMODE(result_dir.stat().st_mode) == 0o750
    assert stat.S_IMODE((result_dir / "statistics").stat().st_mode) == 0o750
    assert leftovers(result_dir) == ["statistics/summary.txt"]
    assert not (result_dir / downloads.PARTIAL_DIR).exists()
    assert sha256_file(target) == got.sha256


def test_missing_content_length_is_allowed_and_recorded(tmp_path: Path) -> None:
    got = download(opener(lambda: iter([BODY[:1000], BODY[1000:]])), "qc_report.txt", result_dir=tmp_path)
    assert (got.size, got.content_length) == (len(BODY), None)
    assert (tmp_path / "qc_report.txt").read_bytes() == BODY


@pytest.mark.parametrize("algorithm", ["md5", "sha1", "sha256"])
@pytest.mark.parametrize("big", [False, True], ids=["in-thread", "helper-thread"])
def test_a_published_checksum_and_size_are_checked(tmp_path: Path, algorithm: str, big: bool) -> None:
    """A WES File's checksum and size, a Cloudgene zip's .md5: computed in the one pass that stores the file."""
    body = BODY * 20 if big else BODY  # past the size from which a helper thread writes and hashes
    right = hashlib.new(algorithm, body).hexdigest()
    got = download(opener(body), "out.bin", result_dir=tmp_path, published=Published(len(body), (algorithm, right)))
    assert got.size == len(body) and got.sha256 == hashlib.sha256(body).hexdigest()
    wrong = "0" * len(right)
    refused = tmp_path / "refused"
    with pytest.raises(BadDownload) as caught:
        download(opener(body), "other.bin", result_dir=refused, published=Published(None, (algorithm, wrong)))
    assert caught.value.kind == "checksum_mismatch"
    assert str(caught.value) == f"download other.bin: its {algorithm} is {right}, not the {wrong} the server published"
    assert_clean(refused)  # nothing stored, no partial left


def test_a_published_size_that_differs_is_a_bad_download(tmp_path: Path) -> None:
    with pytest.raises(BadDownload) as caught:
        download(opener(BODY), "out.bin", result_dir=tmp_path, published=Published(size=len(BODY) + 1))
    assert caught.value.kind == "size_mismatch"
    assert str(caught.value) == f"download out.bin: {len(BODY)} bytes arrived, but the server published {len(BODY) + 1}"
    assert_clean(tmp_path)


class RangeServer:
    """A file server for `download(open_rest=...)`: the first body stops after `cut` bytes (the connection closes),
    a Range is answered with 206 and the rest, or ignored (the whole file again) when `honours_range` is false."""

    def __init__(self, body: bytes, *, cut: int, honours_range: bool = True, shrunk: bool = False) -> None:
        self.body, self.cut, self.honours_range = body, cut, honours_range
        self.ranges: list[str | None] = []

        def handler(request: httpx.Request) -> httpx.Response:
            asked = request.headers.get("range")
            self.ranges.append(asked)
            headers = {"ETag": '"v1"'}
            if asked and shrunk:  # the file is now no longer than what was kept: no rest to give
                self.body = self.body[: self.cut // 2]
                return httpx.Response(416, headers={"Content-Range": f"bytes */{len(self.body)}"})
            if asked and self.honours_range:
                start = int(asked.removeprefix("bytes=").rstrip("-"))
                rest = self.body[start:]
                headers |= {"Content-Range": f"bytes {start}-{len(self.body) - 1}/{len(self.body)}",
                            "Content-Length": str(len(rest))}
                return httpx.Response(206, headers=headers, stream=_Stream(lambda: iter([rest])))
            headers["Content-Length"] = str(len(self.body))
            first = len(self.ranges) == 1
            chunks = [self.body[:self.cut]] if first else [self.body]

            def pieces() -> Iterator[bytes]:
                yield from chunks
                if first:
                    raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

            return httpx.Response(200, headers=headers, stream=_Stream(pieces))

        self.client = httpx.Client(transport=httpx.MockTransport(handler))

    def whole(self):  # type: ignore[no-untyped-def]
        return open_body(self.client, URL, call=CALL, budget=Budget.transfer())

    def rest(self, resume):  # type: ignore[no-untyped-def]
        return open_body(self.client, URL, call=CALL, budget=Budget.transfer(),
                         headers={"Range": f"bytes={resume.offset}-", "If-Range": resume.validator or ""})


@pytest.mark.parametrize("big", [False, True], ids=["in-thread", "helper-thread"])
def test_a_resumed_download_has_the_sha256_of_a_straight_one(tmp_path: Path, big: bool) -> None:
    """Cut off after a third, then resumed with a Range in a later call (as after a daemon restart: nothing but
    the disk is shared): the stored file and its SHA-256 (and a published MD5) are those of the whole file."""
    body = BODY * 20 if big else BODY
    server = RangeServer(body, cut=len(body) // 3)
    published = Published(len(body), ("md5", hashlib.md5(body).hexdigest()))
    with pytest.raises(BadDownload) as cut:
        download(server.whole, "chr_1.bin", result_dir=tmp_path, published=published, open_rest=server.rest)
    assert cut.value.kind == "truncated"
    assert [p.stat().st_size for p in (tmp_path / ".resume").glob("*.part")] == [len(body) // 3]
    got = download(server.whole, "chr_1.bin", result_dir=tmp_path, published=published, open_rest=server.rest)
    assert server.ranges == [None, f"bytes={len(body) // 3}-"]
    assert got.sha256 == hashlib.sha256(body).hexdigest() == sha256_file(tmp_path / "chr_1.bin")
    assert (tmp_path / "chr_1.bin").read_bytes() == body
    assert not (tmp_path / ".resume").exists() and not (tmp_path / ".partial").exists()


def test_a_range_the_server_cannot_serve_drops_what_was_kept_and_stores_the_file_anew(tmp_path: Path) -> None:
    server = RangeServer(BODY, cut=1000, shrunk=True)
    with pytest.raises(BadDownload):
        download(server.whole, "f.bin", result_dir=tmp_path, open_rest=server.rest)
    got = download(server.whole, "f.bin", result_dir=tmp_path, open_rest=server.rest)
    assert server.ranges == [None, "bytes=1000-", None]  # asked for the rest (416), then for the whole file
    assert (tmp_path / "f.bin").read_bytes() == BODY[:500] and got.sha256 == hashlib.sha256(BODY[:500]).hexdigest()
    assert not (tmp_path / ".resume").exists()


def test_a_server_that_ignores_the_range_gets_the_file_stored_from_zero(tmp_path: Path) -> None:
    server = RangeServer(BODY, cut=1000, honours_range=False)
    with pytest.raises(BadDownload):
        download(server.whole, "f.bin", result_dir=tmp_path, open_rest=server.rest)
    got = download(server.whole, "f.bin", result_dir=tmp_path, open_rest=server.rest)
    assert server.ranges == [None, "bytes=1000-"]  # asked, and given the whole file instead
    assert (tmp_path / "f.bin").read_bytes() == BODY and got.sha256 == hashlib.sha256(BODY).hexdigest()


def test_existing_file_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "qc_report.txt").write_bytes(b"old")
    download(opener(b"new"), "qc_report.txt", result_dir=tmp_path)
    assert (tmp_path / "qc_report.txt").read_bytes() == b"new"


def test_content_encoded_body_is_decoded_and_length_checked_on_the_wire(tmp_path: Path) -> None:
    wire = gzip.compress(BODY)
    got = download(opener(wire, headers={"Content-Encoding": "gzip"}), "qc_report.txt", result_dir=tmp_path)
    assert (tmp_path / "qc_report.txt").read_bytes() == BODY
    assert (got.size, got.content_length) == (len(BODY), len(wire))


def test_a_kept_partial_folder_serves_several_downloads_until_removed(tmp_path: Path) -> None:
    partial_dir = tmp_path / downloads.PARTIAL_DIR
    download(opener(b"one"), "a.txt", result_dir=tmp_path, keep_partial_dir=True)
    made = partial_dir.stat()
    assert stat.S_IMODE(made.st_mode) == 0o750 and list(partial_dir.iterdir()) == []
    with pytest.raises(Transient, match="truncated"):  # a failure leaves no partial file behind either
        download(opener(b"tw", headers={"Content-Length": "3"}), "b.txt", result_dir=tmp_path, keep_partial_dir=True)
    download(opener(b"three"), "c.txt", result_dir=tmp_path, keep_partial_dir=True)
    assert partial_dir.stat().st_ino == made.st_ino  # the same folder, not made again
    downloads.remove_partial_dir(tmp_path)
    downloads.remove_partial_dir(tmp_path)  # gone already: nothing to do
    assert leftovers(tmp_path) == ["a.txt", "c.txt"]
    assert not partial_dir.exists()


def test_concurrent_downloads_into_one_folder(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            for _ in range(10):
                download(opener(BODY[:5000]), f"f{i}.txt", result_dir=tmp_path)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert leftovers(tmp_path) == [f"f{i}.txt" for i in range(6)]


# --- big bodies: helper thread, blocks, write-behind ----------------------------------------------------------------


@pytest.fixture
def helper_sink(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every body goes through the helper thread, in 1000-byte blocks from a ring of 3, handed to the disk every
    2500 bytes: the paths a GiB takes, with a 300 kB body. Returns the (offset, length) of each page cache advice."""
    monkeypatch.setattr(downloads, "_THREADED_FROM", 0)
    monkeypatch.setattr(downloads, "_BLOCK", 1000)
    monkeypatch.setattr(downloads, "_RING", 3)
    monkeypatch.setattr(downloads, "_WRITEBACK_WINDOW", 2500)
    advised: list[tuple[int, int]] = []
    real = downloads._FADVISE

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append((offset, length))
        if real is not None:
            real(fd, offset, length, advice)

    monkeypatch.setattr(downloads, "_FADVISE", record)
    return advised


def helper_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "imputationd-download-sink"]


def pieces(body: bytes, sizes: list[int]) -> list[bytes]:
    """`body` cut into pieces of these sizes, the rest as the last piece."""
    out, at = [], 0
    for size in sizes:
        out.append(body[at:at + size])
        at += size
    return [*out, body[at:]]


def test_big_body_goes_through_the_helper_in_blocks(tmp_path: Path, helper_sink: list[tuple[int, int]]) -> None:
    # Pieces smaller than a block, exactly one, empty, spanning blocks, larger than the whole ring.
    chunks = pieces(BODY, [1, 999, 1000, 0, 2500, 7, 64 * 1024, 3, 1000])
    got = download(opener(lambda: iter(chunks), headers={"Content-Length": str(len(BODY))}), "chr_1.dose.vcf.gz",
                   result_dir=tmp_path)
    assert got == Downloaded(path=tmp_path / "chr_1.dose.vcf.gz", size=len(BODY),
                             sha256=hashlib.sha256(BODY).hexdigest(), content_length=len(BODY))
    assert got.path.read_bytes() == BODY
    assert helper_threads() == []
    assert not (tmp_path / downloads.PARTIAL_DIR).exists()


def test_write_behind_hands_each_window_to_the_disk_then_drops_it(
    tmp_path: Path, helper_sink: list[tuple[int, int]]
) -> None:
    download(opener(lambda: iter(pieces(BODY, [1000] * 299)), headers={"Content-Length": str(len(BODY))}),
             "chr_1.dose.vcf.gz", result_dir=tmp_path)
    windows = sorted(set(helper_sink))
    # Windows of at least 2500 bytes, back to back from the start, covering all but the last (unfinished) window.
    assert windows[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(windows))
    assert all(n >= 2500 for _, n in windows)
    assert len(BODY) - 2 * 2500 <= sum(n for _, n in windows) <= len(BODY)
    # Each window is advised twice: once written (starts its writeback), once more a window later (drops it).
    assert [helper_sink.count(w) for w in windows] == [2] * (len(windows) - 1) + [1]
    assert helper_sink[:3] == [windows[0], windows[1], windows[0]]


def test_big_zip_is_verified_after_write_behind(tmp_path: Path, helper_sink: list[tuple[int, int]]) -> None:
    data = _zip_bytes(ZIP_ENTRIES)
    got = download(opener(lambda: iter(pieces(data, [1000] * (len(data) // 1000))),
                          headers={"Content-Length": str(len(data))}), "chr_20.zip", result_dir=tmp_path)
    assert helper_sink  # most of it was handed to the disk and dropped from the cache before the zip was read back
    assert got.zip_crc_checked is True
    assert got.path.read_bytes() == data


def test_write_behind_advice_may_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      helper_sink: list[tuple[int, int]]) -> None:
    def refuse(fd: int, offset: int, length: int, advice: int) -> None:
        raise OSError(errno.EINVAL, "not here")

    monkeypatch.setattr(downloads, "_FADVISE", refuse)
    got = download(opener(), "chr_1.dose.vcf.gz", result_dir=tmp_path)
    assert got.path.read_bytes() == BODY


@pytest.mark.timeout(30)
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_helper_failure_reaches_the_caller_without_blocking_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, helper_sink: list[tuple[int, int]], err: int
) -> None:
    # The disk fills after 10 blocks of a slow disk; the caller, waiting a whole ring ahead, must be let go and told.
    monkeypatch.setattr(downloads, "open", lambda fd, mode, **_: _FullDisk(fd, 10_000, err, delay=0.005), raising=False)
    with pytest.raises((Transient, OSError)) as info:
        download(opener(lambda: iter(pieces(BODY, [500] * 500)), headers={"Content-Length": str(len(BODY))}),
                 "chr_1.dose.vcf.gz", result_dir=tmp_path)
    if err == errno.ENOSPC:
        assert isinstance(info.value, Transient) and info.value.kind == "disk_full"
    else:
        assert not isinstance(info.value, Transient) and info.value.errno == errno.EIO
    assert helper_threads() == []
    assert_clean(tmp_path)


@pytest.mark.timeout(30)
def test_big_body_stopped_or_cut_short_leaves_nothing(tmp_path: Path, helper_sink: list[tuple[int, int]]) -> None:
    checks = iter([False] * 21 + [True])  # one check before the request, then one per piece
    with pytest.raises(DownloadInterrupted, match="stopped after 20000 bytes"):
        download(opener(lambda: iter(pieces(BODY, [1000] * 300))), "chr_1.dose.vcf.gz", result_dir=tmp_path,
                 should_stop=lambda: next(checks))
    assert helper_threads() == []
    assert_clean(tmp_path)

    short = opener(lambda: iter(pieces(BODY[:123_456], [4000] * 30)), headers={"Content-Length": str(len(BODY))})
    with pytest.raises(Transient) as info:
        download(short, "chr_1.dose.vcf.gz", result_dir=tmp_path)
    assert info.value.kind == "truncated"
    assert f"received 123456 of {len(BODY)} bytes" in str(info.value)
    assert helper_threads() == []
    assert_clean(tmp_path)


# --- length and transport failures ----------------------------------------------------------------------------------


def test_short_body_is_truncated(tmp_path: Path) -> None:
    open_stream = opener(lambda: iter([BODY[:1000]]), headers={"Content-Length": str(len(BODY))})
    with pytest.raises(Transient) as info:
        download(open_stream, "chr_20.zip", result_dir=tmp_path)
    assert info.value.kind == "truncated"
    assert f"received 1000 of {len(BODY)} bytes" in str(info.value)
    assert_no_secret(info.value)
    assert_clean(tmp_path)


def test_long_body_is_a_length_mismatch(tmp_path: Path) -> None:
    open_stream = opener(lambda: iter([BODY]), headers={"Content-Length": "10"})
    with pytest.raises(Transient) as info:
        download(open_stream, "qc_report.txt", result_dir=tmp_path)
    assert info.value.kind == "length_mismatch"
    assert_clean(tmp_path)


def test_garbled_content_length(tmp_path: Path) -> None:
    open_stream = opener(lambda: iter([BODY]), headers={"Content-Length": "12, 13"})
    with pytest.raises(Transient) as info:
        download(open_stream, "qc_report.txt", result_dir=tmp_path)
    assert info.value.kind == "bad_response"
    assert_clean(tmp_path)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (httpx.ReadError("connection reset by peer"), "connection"),
        (httpx.ReadTimeout("read timed out"), "timeout"),
        (httpx.RemoteProtocolError("peer closed connection"), "truncated"),
    ],
)
def test_mid_stream_failure_is_a_bad_download(tmp_path: Path, error: Exception, kind: str) -> None:
    """The server answered and spent a download count; the body was cut off: counted against the file."""
    def chunks() -> Iterator[bytes]:
        yield BODY[:4096]
        raise error

    with pytest.raises(BadDownload) as info:
        download(
            opener(chunks, headers={"Content-Length": str(len(BODY))}), "chr_20.zip", result_dir=tmp_path,
            chunk_size=4096,
        )
    assert info.value.kind == kind
    assert f"after 4096 of {len(BODY)} bytes" in str(info.value)
    assert_no_secret(info.value)
    assert_clean(tmp_path)


@pytest.mark.parametrize("kind", ["connection", "timeout"])
def test_a_failure_before_the_answer_is_not_a_bad_download(tmp_path: Path, kind: str) -> None:
    """No answer, no download count spent: the file's integrity attempts are left alone."""
    def open_stream() -> object:
        raise Transient(f"download of chr_20.zip: {kind} failed before an answer", kind=kind)

    with pytest.raises(Transient) as info:
        download(open_stream, "chr_20.zip", result_dir=tmp_path)
    assert not isinstance(info.value, BadDownload) and info.value.kind == kind
    assert_clean(tmp_path)


def test_broken_content_encoding_is_transient(tmp_path: Path) -> None:
    wire = gzip.compress(BODY)[:-100] + b"garbage" * 20
    with pytest.raises(Transient) as info:
        download(opener(wire, headers={"Content-Encoding": "gzip"}), "qc_report.txt", result_dir=tmp_path)
    assert info.value.kind == "bad_response"
    assert_clean(tmp_path)


def test_a_subfolder_that_cannot_be_made_costs_no_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Made before the GET: a folder the daemon may not create fails without spending one of the server's
    download counts (it was made after the body arrived, so every retry spent one)."""
    real_mkdir = os.mkdir

    def mkdir(path, mode=0o777):  # type: ignore[no-untyped-def]
        if Path(path).name == "statistics":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real_mkdir(path, mode)

    monkeypatch.setattr(downloads.os, "mkdir", mkdir)
    calls: list[int] = []
    with pytest.raises(PermissionError):
        download(opener(calls=calls), "statistics/summary.txt", result_dir=tmp_path)
    assert calls == []
    assert_clean(tmp_path)


def test_connect_failure_is_transient(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    client = httpx.Client(transport=httpx.MockTransport(handler))
    with pytest.raises(Transient) as info:
        download(lambda: open_body(client, URL, call=CALL, budget=Budget.transfer()), "chr_20.zip", result_dir=tmp_path)
    assert info.value.kind == "connection"
    assert_no_secret(info.value)
    assert_clean(tmp_path)


@pytest.mark.parametrize(
    ("status", "body", "error", "kind"),
    [
        (400, b'{"success": false, "message": "number of max downloads exceeded."}', Permanent, "http_400"),
        (404, b"not found", Permanent, "http_404"),
        (503, b"maintenance", Transient, "unavailable"),
        (502, b"<html>bad gateway</html>", Transient, "server_error"),
        (401, b"", Blocked, "unauthorized"),
    ],
)
def test_http_errors(tmp_path: Path, status: int, body: bytes, error: type, kind: str) -> None:
    with pytest.raises(error) as info:
        download(opener(body, status=status), "chr_20.zip", result_dir=tmp_path)
    assert info.value.kind == kind
    assert_no_secret(info.value)
    assert_clean(tmp_path)


class _TruncatingHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY[:50_000])
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, *args: object) -> None:
        pass


def test_real_server_closing_early_is_truncated(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TruncatingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with httpx.Client() as client:
            url = f"http://127.0.0.1:{server.server_port}/share/results/{SECRET}/chr_20.zip"
            with pytest.raises(Transient) as info:
                download(lambda: open_body(client, url, call=CALL, budget=Budget.transfer()), "chr_20.zip",
                         result_dir=tmp_path, chunk_size=8192)
    finally:
        server.shutdown()
        server.server_close()
    assert info.value.kind == "truncated"
    assert f"of {len(BODY)} bytes" in str(info.value)
    assert_no_secret(info.value)
    assert_clean(tmp_path)


# --- disk full ------------------------------------------------------------------------------------------------------


class _FullDisk:
    """A file object that takes `room` bytes and then fails like a full disk; each write takes `delay` seconds."""

    def __init__(self, fd: int, room: int, err: int, delay: float = 0.0) -> None:
        self._real = open(fd, "wb")  # noqa: SIM115
        self._room = room
        self._err = err
        self._delay = delay

    def write(self, data: bytes) -> int:
        time.sleep(self._delay)
        if len(data) > self._room:
            raise OSError(self._err, os.strerror(self._err))
        self._room -= len(data)
        return self._real.write(data)

    def fileno(self) -> int:
        return self._real.fileno()

    def flush(self) -> None:
        self._real.flush()

    def close(self) -> None:
        self._real.close()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_mid_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    monkeypatch.setattr(downloads, "open", lambda fd, mode, **_: _FullDisk(fd, 10_000, err), raising=False)
    with pytest.raises(Transient) as info:
        download(opener(), "chr_20.zip", result_dir=tmp_path, chunk_size=4096)
    assert info.value.kind == "disk_full"
    assert_clean(tmp_path)


def test_disk_too_small_for_content_length_fails_before_streaming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(downloads.shutil, "disk_usage", lambda path: _Usage(100))
    streamed: list[int] = []

    def chunks() -> Iterator[bytes]:
        streamed.append(1)
        yield BODY

    with pytest.raises(Transient) as info:
        download(opener(chunks, headers={"Content-Length": str(len(BODY))}), "chr_20.zip", result_dir=tmp_path)
    assert info.value.kind == "disk_full"
    assert streamed == []
    assert_clean(tmp_path)


class _Usage:
    def __init__(self, free: int) -> None:
        self.free = free
        self.total = self.used = 0


def test_other_local_errors_propagate_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(downloads, "open", lambda fd, mode, **_: _FullDisk(fd, 10, errno.EIO), raising=False)
    with pytest.raises(OSError) as info:
        download(opener(), "chr_20.zip", result_dir=tmp_path)
    assert info.value.errno == errno.EIO
    assert_clean(tmp_path)


# --- stopping -------------------------------------------------------------------------------------------------------


def test_stop_before_start_spends_no_download(tmp_path: Path) -> None:
    calls: list[int] = []
    with pytest.raises(DownloadInterrupted):
        download(opener(calls=calls), "chr_20.zip", result_dir=tmp_path, should_stop=lambda: True)
    assert calls == []


def test_stop_between_chunks_leaves_nothing(tmp_path: Path) -> None:
    checks = iter([False, False, True])
    with pytest.raises(DownloadInterrupted) as info:
        download(opener(), "chr_20.zip", result_dir=tmp_path, should_stop=lambda: next(checks), chunk_size=1000)
    assert isinstance(info.value, Transient)
    assert info.value.kind == "interrupted"
    assert "stopped after 1000 bytes" in str(info.value)
    assert_clean(tmp_path)


# --- zips -----------------------------------------------------------------------------------------------------------


def _zip_bytes(entries: dict[str, bytes], *, aes_password: str | None = None) -> bytes:
    buf = io.BytesIO()
    if aes_password is None:
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in entries.items():
                zf.writestr(name, data)
    else:
        with pyzipper.AESZipFile(buf, "w", compression=pyzipper.ZIP_DEFLATED, encryption=pyzipper.WZ_AES) as zf:
            zf.setpassword(aes_password.encode())
            for name, data in entries.items():
                zf.writestr(name, data)
    return buf.getvalue()


ZIP_ENTRIES = {"chr20.dose.vcf.gz": BODY, "chr20.info.gz": b"info\n" * 1000}


def test_good_zip_is_verified(tmp_path: Path) -> None:
    got = download(opener(_zip_bytes(ZIP_ENTRIES)), "chr_20.zip", result_dir=tmp_path)
    assert got.zip_crc_checked is True
    with zipfile.ZipFile(got.path) as zf:
        assert zf.read("chr20.dose.vcf.gz") == BODY


def test_corrupt_zip_is_transient_and_removed(tmp_path: Path) -> None:
    data = bytearray(_zip_bytes(ZIP_ENTRIES))
    data[1000] ^= 0xFF
    with pytest.raises(Transient) as info:
        download(opener(bytes(data)), "chr_20.zip", result_dir=tmp_path)
    assert info.value.kind == "corrupt_zip"
    assert "chr20.dose.vcf.gz" in str(info.value)
    assert_no_secret(info.value)
    assert_clean(tmp_path)


def test_html_error_page_saved_as_zip_is_corrupt(tmp_path: Path) -> None:
    with pytest.raises(Transient) as info:
        download(opener(b"<html>Service Unavailable</html>"), "chr_20.zip", result_dir=tmp_path)
    assert info.value.kind == "corrupt_zip"
    assert_clean(tmp_path)


def test_aes_zip_with_password_without_and_wrong(tmp_path: Path) -> None:
    body = _zip_bytes(ZIP_ENTRIES, aes_password="pw-1234")
    assert download(opener(body), "chr_20.zip", result_dir=tmp_path, password="pw-1234").zip_crc_checked is True
    assert download(opener(body), "chr_21.zip", result_dir=tmp_path).zip_crc_checked is False
    with pytest.raises(Permanent) as info:
        download(opener(body), "chr_22.zip", result_dir=tmp_path, password="wrong")
    assert info.value.kind == "zip_password"
    assert "wrong" not in str(info.value) and "pw-1234" not in str(info.value)
    assert leftovers(tmp_path) == ["chr_20.zip", "chr_21.zip"]


def _zipcrypto_bytes(workdir: Path, entries: dict[str, bytes], password: str) -> bytes:
    workdir.mkdir()
    sources = []
    for i, (name, data) in enumerate(entries.items()):
        (workdir / f"src-{i}").write_bytes(data)
        sources.append((name, workdir / f"src-{i}"))
    # A fixed encryption header, so a wrong password fails its check the same way each run.
    zipcrypto.write_zipcrypto(workdir / "src.zip", sources, password, random_bytes=lambda n: bytes(n))
    return (workdir / "src.zip").read_bytes()


def test_zipcrypto_zip_with_password_without_wrong_and_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = _zipcrypto_bytes(tmp_path / "src", ZIP_ENTRIES, "pw-1234")
    result_dir = tmp_path / "r"
    assert download(opener(body), "chr_20.zip", result_dir=result_dir, password="pw-1234").zip_crc_checked is True
    assert download(opener(body), "chr_21.zip", result_dir=result_dir).zip_crc_checked is False
    with pytest.raises(Permanent) as info:
        download(opener(body), "chr_22.zip", result_dir=result_dir, password="wrong")
    assert info.value.kind == "zip_password"
    # A stop is seen while the entries are being decrypted, not only between them.
    monkeypatch.setattr(results, "CHUNK", 16 * 1024)
    chunks_before_verify = -(-len(body) // 4096)
    checks = iter([False] * (1 + chunks_before_verify + 3) + [True] * 100)
    with pytest.raises(DownloadInterrupted, match="while verifying"):
        download(
            opener(body), "chr_23.zip", result_dir=result_dir, password="pw-1234",
            should_stop=lambda: next(checks), chunk_size=4096,
        )
    assert leftovers(result_dir) == ["chr_20.zip", "chr_21.zip"]


def test_stop_during_zip_verification_leaves_nothing(tmp_path: Path) -> None:
    body = _zip_bytes(ZIP_ENTRIES)
    chunks_before_verify = -(-len(body) // 4096)
    checks = iter([False] * (1 + chunks_before_verify) + [True] * 100)  # one check before the request
    with pytest.raises(DownloadInterrupted, match="while verifying"):
        download(opener(body), "chr_20.zip", result_dir=tmp_path, should_stop=lambda: next(checks), chunk_size=4096)
    assert_clean(tmp_path)


def test_non_zip_names_are_not_verified(tmp_path: Path) -> None:
    got = download(opener(b"not a zip"), "qc_report.txt", result_dir=tmp_path)
    assert got.zip_crc_checked is None


def test_symlinked_subfolder_leading_out_is_refused(tmp_path: Path) -> None:
    result_dir = tmp_path / "r"
    result_dir.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (result_dir / "statistics").symlink_to(tmp_path / "elsewhere")
    calls: list[int] = []
    with pytest.raises(Permanent, match="leads out of the result directory"):
        download(opener(calls=calls), "statistics/x.txt", result_dir=result_dir)
    assert calls == []


# --- crash recovery and re-verification -----------------------------------------------------------------------------


def test_remove_partials(tmp_path: Path) -> None:
    for job in ("job-1", "job-2/sub"):
        partial_dir = tmp_path / job / downloads.PARTIAL_DIR
        partial_dir.mkdir(parents=True)
        (partial_dir / "a.part").write_bytes(b"x")
        (partial_dir / "b.part").write_bytes(b"y")
    (tmp_path / "job-1" / "chr_1.zip").write_bytes(b"kept")
    assert remove_partials(tmp_path) == 4
    assert leftovers(tmp_path) == ["job-1/chr_1.zip"]
    assert not (tmp_path / "job-1" / downloads.PARTIAL_DIR).exists()
    assert remove_partials(tmp_path) == 0
    assert remove_partials(tmp_path / "missing") == 0


def test_sha256_file_streams(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(BODY * 5)
    assert sha256_file(p, chunk_size=1000) == hashlib.sha256(BODY * 5).hexdigest()


def test_check_room_looks_at_the_nearest_existing_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[Path] = []
    real = downloads.shutil.disk_usage

    def usage(path: Path) -> object:
        asked.append(Path(path))
        return real(path)

    monkeypatch.setattr(downloads.shutil, "disk_usage", usage)
    downloads.check_room(tmp_path / "results" / "job", "chr_20.zip", "1 MB")  # before the job's first download
    assert asked[-1] == tmp_path

    monkeypatch.setattr(downloads.shutil, "disk_usage", lambda path: _Usage(10**6))
    with pytest.raises(Transient) as info:
        downloads.check_room(tmp_path, "chr_20.zip", "1 MB")  # "1 MB" may be up to 2 MB
    assert info.value.kind == "disk_full" and "no download is spent" in info.value.message
