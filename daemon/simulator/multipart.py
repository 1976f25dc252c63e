"""Request bodies: a reader honouring Content-Length or chunked transfer encoding, and a streaming
multipart/form-data parser that writes file parts to disk instead of holding uploads in memory."""

from __future__ import annotations

import email.message
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

_CHUNK = 1 << 16
MAX_FIELD_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 10


class MalformedBody(ValueError):
    pass


class Body(Protocol):
    """What `parse_multipart` reads from: a `BodyReader`, or a wrapper of one."""

    def read(self, n: int) -> bytes: ...

    def drain(self, limit: int | None = None) -> bool: ...


class BodyReader:
    """The request body as a stream; `drain()` discards what is left so the connection can be reused."""

    def __init__(self, rfile: io.BufferedIOBase, headers: email.message.Message) -> None:
        self._rfile = rfile
        te = (headers.get("Transfer-Encoding") or "").lower()
        self.chunked = "chunked" in te
        length = headers.get("Content-Length")
        try:
            self.length = None if self.chunked else int(length or 0)
        except ValueError as exc:
            raise MalformedBody("bad Content-Length") from exc
        if self.length is not None and self.length < 0:
            raise MalformedBody("bad Content-Length")
        self._left = self.length or 0
        self._chunk_left = 0
        self._done = not self.chunked and self._left == 0
        self.consumed = 0

    def read(self, n: int = _CHUNK) -> bytes:
        if self._done:
            return b""
        try:
            return self._read(n)
        except OSError as exc:  # the client went away (or stalled past the socket timeout) mid-body
            raise MalformedBody(f"connection lost while reading the body ({exc.__class__.__name__})") from None

    def _read(self, n: int) -> bytes:
        if not self.chunked:
            data = self._rfile.read(min(n, self._left))
            if not data:
                raise MalformedBody("connection closed before the end of the body")
            self._left -= len(data)
            self._done = self._left == 0
            self.consumed += len(data)
            return data
        if self._chunk_left == 0:
            line = self._rfile.readline(1024)
            if not line:
                raise MalformedBody("connection closed inside a chunked body")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise MalformedBody("bad chunk size") from exc
            if size == 0:
                while True:  # trailers until the empty line
                    trailer = self._rfile.readline(1024)
                    if trailer in (b"\r\n", b"\n", b""):
                        break
                self._done = True
                return b""
            self._chunk_left = size
        data = self._rfile.read(min(n, self._chunk_left))
        if not data:
            raise MalformedBody("connection closed inside a chunk")
        self._chunk_left -= len(data)
        if self._chunk_left == 0:
            self._rfile.readline(16)  # CRLF after the chunk data
        self.consumed += len(data)
        return data

    def drain(self, limit: int | None = None) -> bool:
        """Discard the rest of the body; False (the connection cannot be reused) when more than `limit` bytes
        would have to be read or the body is broken."""
        read = 0
        try:
            while not self._done:
                data = self.read(_CHUNK)
                read += len(data)
                if limit is not None and read > limit:
                    return False
        except MalformedBody:
            self._done = True
            return False
        return True

    @property
    def done(self) -> bool:
        return self._done


@dataclass
class UploadedFile:
    field: str
    filename: str
    path: Path
    size: int


@dataclass
class Form:
    fields: list[tuple[str, str]]
    files: list[UploadedFile]


def boundary_of(content_type: str | None) -> str | None:
    if not content_type:
        return None
    msg = email.message.Message()
    msg["content-type"] = content_type
    if msg.get_content_type() != "multipart/form-data":
        return None
    boundary = msg.get_param("boundary")
    return boundary if isinstance(boundary, str) and 0 < len(boundary) <= 200 else None


def _safe_name(filename: str) -> str:
    base = filename.replace("\\", "/").rsplit("/", 1)[-1].strip() or "upload"
    if base in (".", ".."):
        base = "upload"
    return base


def parse_multipart(body: Body, boundary: str, dest: Path) -> Form:
    """Parse a multipart/form-data body; file parts go to `dest/<n>/<filename>`."""
    dash = b"--" + boundary.encode("latin-1")
    sep = b"\r\n" + dash
    buf = bytearray()
    fields: list[tuple[str, str]] = []
    files: list[UploadedFile] = []

    def fill(min_len: int) -> bool:
        while len(buf) < min_len:
            data = body.read(_CHUNK)
            if not data:
                return False
            buf.extend(data)
        return True

    # preamble up to the first boundary
    while True:
        idx = buf.find(dash)
        if idx >= 0:
            del buf[: idx + len(dash)]
            break
        if len(buf) > len(dash):
            del buf[: -len(dash)]
        data = body.read(_CHUNK)
        if not data:
            raise MalformedBody("no multipart boundary found")
        buf.extend(data)

    part_no = 0
    while True:
        if not fill(2):
            raise MalformedBody("body ends after a boundary")
        if buf[:2] == b"--":
            body.drain()  # epilogue
            return Form(fields, files)
        # tolerate transport padding before the CRLF
        while True:
            nl = buf.find(b"\r\n")
            if nl >= 0:
                if buf[:nl].strip(b" \t"):
                    raise MalformedBody("garbage after a boundary")
                del buf[: nl + 2]
                break
            if not fill(len(buf) + 1):
                raise MalformedBody("body ends after a boundary")
        # part headers
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > MAX_HEADER_BYTES or not fill(len(buf) + 1):
                raise MalformedBody("part headers too long or truncated")
        raw_headers = bytes(buf[:end]).decode("utf-8", "replace")
        del buf[: end + 4]
        msg = email.message.Message()
        for line in raw_headers.split("\r\n"):
            if ":" in line:
                k, v = line.split(":", 1)
                msg[k.strip()] = v.strip()
        if msg.get_content_disposition() != "form-data":
            raise MalformedBody("part without Content-Disposition: form-data")
        name = msg.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            raise MalformedBody("part without a name")
        filename = msg.get_filename()
        part_no += 1
        if filename is not None:
            safe = _safe_name(filename)
            target_dir = dest / f"{part_no:04d}"
            target_dir.mkdir(parents=True)
            target = target_dir / safe
            sink = open(target, "wb")  # noqa: SIM115
            size = 0
        else:
            sink = None
            value = bytearray()
        try:
            while True:
                idx = buf.find(sep)
                if idx >= 0:
                    chunk = bytes(buf[:idx])
                    del buf[: idx + len(sep)]
                    last = True
                else:
                    keep = len(sep) - 1
                    cut = max(0, len(buf) - keep)
                    chunk = bytes(buf[:cut])
                    del buf[:cut]
                    last = False
                if sink is not None:
                    sink.write(chunk)
                    size += len(chunk)
                else:
                    value.extend(chunk)
                    if len(value) > MAX_FIELD_BYTES:
                        raise MalformedBody(f"form field '{name}' is too large")
                if last:
                    break
                data = body.read(_CHUNK)
                if not data:
                    raise MalformedBody("body ends inside a part")
                buf.extend(data)
        finally:
            if sink is not None:
                sink.close()
        if sink is not None:
            files.append(UploadedFile(name, safe, target, size))
        else:
            fields.append((name, value.decode("utf-8", "replace")))
