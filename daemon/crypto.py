"""Job passwords at rest: sealed with AES-256-GCM under a key file, so the database alone opens nobody's results.

A job's result-zip password must be read back (to submit, to check and to unpack the zips), so it cannot be hashed;
it is encrypted instead. The key is 32 random bytes, hex, in `storage.secret_key_file` (default
`<state_dir>/secret.key`), created 0600 by the first daemon or `imputationd submit` that needs it. Every process that
shares one database must have the same key file: copy it to each host.

Stored form: `aesgcm1:<key id>:<base64url(nonce | ciphertext | tag)>`, the key id being the first 8 hex digits of the
key's SHA-256, so a process holding another key says so instead of failing obscurely. A value without the prefix is
cleartext — rows written before encryption existed, or by an application that inserts jobs itself — and is used as
it is. The jobs.password column holds 200 characters: passwords up to `MAX_PASSWORD_LENGTH` fit sealed.

Every password revealed is registered with the log redaction first (`daemon.logging.register_secret`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import secrets
import threading
from pathlib import Path
from typing import Any

from Cryptodome.Cipher import AES

from daemon.logging import register_secret

PREFIX = "aesgcm1:"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
#: Longest password that still fits the 200-character column once sealed.
MAX_PASSWORD_LENGTH = 100


def _aes_gcm(key: bytes, nonce: bytes) -> Any:
    return AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_BYTES)


class SecretKeyError(Exception):
    """The key file cannot be read or created, or holds another key than the one a password was sealed with."""


def is_sealed(value: str | None) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:8]


def load_or_create_key(path: Path) -> bytes:
    """The key in `path`; a new random one written there (0600, atomically, never over another's) when missing."""
    path = Path(path)
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with open(fd, "w", encoding="ascii") as out:
                out.write(secrets.token_bytes(KEY_BYTES).hex() + "\n")
                out.flush()
                os.fsync(out.fileno())
            with contextlib.suppress(FileExistsError):  # another process made one first: use theirs
                os.link(temp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
    except OSError as exc:
        raise SecretKeyError(f"cannot create the key file {path}: {exc.strerror or exc}") from None
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretKeyError(f"cannot read the key file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise SecretKeyError(f"{path} does not hold a key ({KEY_BYTES * 2} hex digits)")
    return key


class PasswordCipher:
    """Seals and reveals job passwords with the key in `path`, read (or created) on first use. Thread-safe."""
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._key: bytes | None = None
        self._lock = threading.Lock()

    def key(self) -> bytes:
        with self._lock:
            if self._key is None:
                self._key = load_or_create_key(self.path)
            return self._key

    def seal(self, password: str | None) -> str | None:
        if password is None:
            return None
        if len(password) > MAX_PASSWORD_LENGTH:
            raise ValueError(f"a job password may have at most {MAX_PASSWORD_LENGTH} characters")
        register_secret(password)
        key = self.key()
        nonce = secrets.token_bytes(NONCE_BYTES)
        cipher = _aes_gcm(key, nonce)
        body, tag = cipher.encrypt_and_digest(password.encode("utf-8"))
        token = base64.urlsafe_b64encode(nonce + body + tag).decode("ascii").rstrip("=")
        return f"{PREFIX}{key_id(key)}:{token}"

    def reveal(self, stored: str | None) -> str | None:
        """The cleartext of a stored password (cleartext values pass through); raises `SecretKeyError`."""
        if not is_sealed(stored):
            register_secret(stored)
            return stored
        assert stored is not None
        kid, _, token = stored[len(PREFIX):].partition(":")
        key = self.key()
        if kid != key_id(key):
            raise SecretKeyError(
                f"the job's password was sealed with key {kid}, but {self.path} holds key {key_id(key)}: "
                "give every daemon and submitter sharing the database the same storage.secret_key_file"
            )
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            nonce, body, tag = raw[:NONCE_BYTES], raw[NONCE_BYTES:-TAG_BYTES], raw[-TAG_BYTES:]
            cipher = _aes_gcm(key, nonce)
            password: str = cipher.decrypt_and_verify(body, tag).decode("utf-8")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise SecretKeyError("the job's stored password is damaged (it does not decrypt)") from None
        register_secret(password)
        return password


__all__ = ["MAX_PASSWORD_LENGTH", "PasswordCipher", "SecretKeyError", "is_sealed", "key_id", "load_or_create_key"]
