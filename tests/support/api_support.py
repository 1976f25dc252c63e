"""An API server on loopback for tests: the real Flask application under cheroot, a migrated SQLite database, a
configured Cloudgene service (nothing is sent to it: the API only stores jobs), and tokens for a few owners."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.api import create_app
from daemon.api.server import ApiServer
from daemon.config import Config, parse_config
from daemon.crypto import PasswordCipher
from daemon.db.engine import make_engine
from daemon.db.store import JobStore
from daemon.simulator import write_sample_vcf

PANEL = "1000g-phase3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Api:
    url: str
    config: Config
    store: JobStore
    root: Path
    tokens: dict[str, str] = field(default_factory=dict)

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def as_(self, name: str) -> httpx.Client:
        return self.client(self.tokens[name])

    def vcf(self, name: str = "chr20.vcf.gz", **options: Any) -> Path:
        path = self.root / "inputs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_sample_vcf(path, **{"chromosome": "20", "build": "hg19", "samples": 25, "variants": 120,
                                         **options})

    def upload(self, client: httpx.Client, files: list[Path] | None = None, *, headers: dict[str, str] | None = None,
               **fields: Any) -> httpx.Response:
        data = {"service": "mis", "panel": PANEL, "build": "hg19", **fields}
        parts = [("file", (p.name, p.read_bytes(), "application/gzip")) for p in (files or [self.vcf()])]
        return client.post("/api/v1/jobs", data=data, files=parts, headers=headers or {})


def make_api(root: Path, db_url: str, *, max_upload_mb: int = 100) -> tuple[Api, ApiServer]:
    token_file = root / "mis.token"
    token_file.write_text("service-token-aaaaaaaa\n")
    token_file.chmod(0o600)
    config = parse_config({
        "storage": {"state_dir": str(root / "state")},
        "database": {"url": db_url},
        "api": {"listen": f"127.0.0.1:{free_port()}", "threads": 8, "max_upload_mb": max_upload_mb,
                "secure_cookie": False},
        "services": {"mis": {"type": "cloudgene", "base_url": "http://127.0.0.1:9", "token_file": str(token_file),
                             "panels": {PANEL: {"id": "1000g-phase-3-v5", "builds": ["hg19", "hg38"],
                                                "populations": ["eur", "all"]}}}},
    }, base_dir=root)
    store = JobStore(make_engine(db_url), sealer=PasswordCipher(config.storage.secret_key_path))
    assert config.api.listen is not None
    server = ApiServer(config.api.listen, create_app(config, store), threads=config.api.threads)
    server.start()
    host, port = server.address
    api = Api(f"http://{host}:{port}", config, store, root)
    for name, owner, scope in (("alice", "alice", "submit"), ("alice_read", "alice", "read"),
                               ("bob", "bob", "submit"), ("admin", "ops", "admin")):
        api.tokens[name] = store.api_tokens.create(owner, scope)[1]
    return api, server


@pytest.fixture
def api(tmp_path: Path, sqlite_url: str) -> Iterator[Api]:
    """The API on a SQLite database."""
    yield from _served(tmp_path, sqlite_url)


@pytest.fixture
def api_on_each_database(tmp_path: Path, db_url: str) -> Iterator[Api]:
    """The API on SQLite, then on PostgreSQL (`db_url` is parametrized over both)."""
    yield from _served(tmp_path, db_url)


def _served(root: Path, db_url: str) -> Iterator[Api]:
    made, server = make_api(root, db_url)
    try:
        yield made
    finally:
        server.close()
        made.store._db.engine.dispose()
