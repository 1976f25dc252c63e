"""Which token an owner's jobs are sent with (`daemon.credentials`): their own file, else the service's when the
service shares it (and always for the operator), else none, with the error saying where the file is expected."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from daemon.config import Config, DatabaseConfig, ServiceConfig, StorageConfig
from daemon.credentials import fingerprint, token_reader, token_source


def config(tmp_path: Path, *, shared: bool = False, auth: str = "token") -> Config:
    service_token = tmp_path / "service.token"
    service_token.write_text("service-token-aaaaaaaa\n")
    service = ServiceConfig(name="mis", type="wes", base_url="http://127.0.0.1:1", shared_token=shared,
                            token_file=service_token if auth == "token" else None, auth=auth)  # type: ignore[arg-type]
    storage = StorageConfig(state_dir=tmp_path, results_dir=tmp_path / "r", temp_dir=tmp_path / "t")
    return Config(DatabaseConfig(url="sqlite://"), storage, services={"mis": service},
                  credentials_dir=tmp_path / "credentials")


def own_token(tmp_path: Path, owner: str, token: str) -> Path:
    path = tmp_path / "credentials" / owner / "mis.token"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token + "\n")
    return path


def settle(path: Path) -> None:  # written a minute ago
    os.utime(path, ns=(time.time_ns() - 60 * 10**9,) * 2)


def test_an_owner_with_a_file_of_their_own_uses_it(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    own_token(tmp_path, "alice", "alice-token-bbbbbbbb")
    assert token_reader(cfg, "mis", "alice")() == "alice-token-bbbbbbbb"
    assert token_source(cfg, "mis", "alice").whose == "owner"  # type: ignore[union-attr]


def test_the_operator_uses_the_services_token_and_others_only_when_it_is_shared(tmp_path: Path) -> None:
    assert token_reader(config(tmp_path), "mis", "operator")() == "service-token-aaaaaaaa"
    assert token_reader(config(tmp_path, shared=True), "mis", "bob")() == "service-token-aaaaaaaa"
    with pytest.raises(FileNotFoundError) as raised:
        token_reader(config(tmp_path), "mis", "bob")()
    expected = tmp_path / "credentials" / "bob" / "mis.token"
    assert raised.value.strerror == f"owner bob has no token for mis: put it in {expected}"


def test_credentials_directory_from_systemd_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    systemd = tmp_path / "systemd"
    (systemd / "alice").mkdir(parents=True)
    (systemd / "alice" / "mis.token").write_text("from-systemd-cccccccc\n")
    # LoadCredential=bob:/etc/imputationd/owners/bob: systemd names the folder's files bob_<file>.
    (systemd / "bob_mis.token").write_text("bob-flat-dddddddd\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(systemd))
    own_token(tmp_path, "alice", "from-config-dddddddd")
    assert token_reader(config(tmp_path), "mis", "alice")() == "from-systemd-cccccccc"
    assert token_reader(config(tmp_path), "mis", "bob")() == "bob-flat-dddddddd"


def test_a_token_file_added_or_removed_later_takes_effect_at_the_next_call(tmp_path: Path) -> None:
    cfg = config(tmp_path, shared=True)
    read = token_reader(cfg, "mis", "alice")
    before = fingerprint(cfg, "mis", "alice")
    assert read() == "service-token-aaaaaaaa"
    path = own_token(tmp_path, "alice", "alice-token-eeeeeeee")
    assert read() == "alice-token-eeeeeeee"
    assert fingerprint(cfg, "mis", "alice") != before
    path.unlink()
    assert read() == "service-token-aaaaaaaa"


def test_a_settled_file_is_read_again_only_when_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path)
    path = own_token(tmp_path, "alice", "first-token-aaaaaaaa")
    settle(path)
    reads = []
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.append(self) or real(self, *a, **k))
    read = token_reader(cfg, "mis", "alice")
    assert [read(), read(), read()] == ["first-token-aaaaaaaa"] * 3
    assert len(reads) == 1

    replacement = path.with_suffix(".new")  # replaced the way an editor or a deployment tool does
    replacement.write_text("second-token-bbbbbbb\n")
    settle(replacement)
    replacement.replace(path)
    assert [read(), read()] == ["second-token-bbbbbbb"] * 2
    assert len(reads) == 2

    path.write_text("third-token-ccccccccc\n")  # rewritten in place, within the timestamp granularity
    assert [read(), read()] == ["third-token-ccccccccc"] * 2
    assert len(reads) == 4  # a file written in the last two seconds is read every time


def test_auth_none_needs_no_token(tmp_path: Path) -> None:
    assert token_reader(config(tmp_path, auth="none"), "mis", "bob")() is None
