"""The webhook's `headers_file`: its format, read by the sender and checked by `check-config`. Below both `config`
and `notify`; imports nothing of the daemon."""

from __future__ import annotations

import re
from pathlib import Path

#: The header that carries a notification's idempotency key.
EVENT_HEADER = "X-Imputationd-Event"
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: Headers a headers_file may not set: the request's own framing and our idempotency key.
_RESERVED_HEADERS = frozenset({"content-type", "content-length", "host", "transfer-encoding", EVENT_HEADER.lower()})


class HeadersFileError(ValueError):
    pass


def parse_headers_file(path: Path) -> dict[str, str]:
    """Extra webhook headers: one "Name: value" per line; blank lines and lines starting with # are skipped.
    Values are secrets (Authorization): no message quotes one."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HeadersFileError(f"{path} does not exist") from None
    except PermissionError:
        raise HeadersFileError(f"{path} cannot be read by this user (permission denied)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HeadersFileError(f"cannot read {path}: {getattr(exc, 'strerror', None) or type(exc).__name__}") from None
    headers: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, colon, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if not colon or not _HEADER_NAME.fullmatch(name) or not value:
            raise HeadersFileError(f"{path} line {number}: expected 'Name: value'")
        if name.lower() in _RESERVED_HEADERS:
            raise HeadersFileError(f"{path} line {number}: {name} is set by imputationd itself")
        headers[name] = value
    return headers
