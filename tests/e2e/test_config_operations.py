"""Validation of the operator sections: notifications (webhook, email, on), storage.extract/secret_key_file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon.config import (
    ConfigError,
    EmailConfig,
    NotificationsConfig,
    WebhookConfig,
    check_runtime,
    parse_config,
)


def parse(tmp_path: Path, **sections: Any):
    return parse_config({"storage": {"state_dir": str(tmp_path / "state")}, **sections}, base_dir=tmp_path)


def problems(tmp_path: Path, **sections: Any) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse(tmp_path, **sections)
    return raised.value.problems


def test_defaults(tmp_path: Path) -> None:
    config = parse(tmp_path)
    assert config.notifications == NotificationsConfig() and not config.notifications.enabled
    assert config.storage.extract is False and config.storage.secret_key_file is None
    assert config.storage.secret_key_path == tmp_path / "state" / "secret.key"


def test_a_full_notifications_section(tmp_path: Path) -> None:
    config = parse(tmp_path, storage={"state_dir": str(tmp_path), "extract": True, "secret_key_file": "k/secret"},
                   notifications={
                       "on": ["completed", "failed", "cancelled", "blocked"],
                       "give_up_after": 3600,
                       "webhook": {"url": "https://hooks.example.org/x/", "timeout": 5, "headers_file": "h"},
                       "email": {"host": "smtp.example.org", "port": 587, "from": "d@example.org",
                                 "to": "lab@example.org", "username": "d", "password_env": "SMTP_PASSWORD"},
                   })
    n = config.notifications
    assert n.enabled and n.on == ("completed", "failed", "cancelled", "blocked") and n.give_up_after == 3600
    assert n.webhook == WebhookConfig(url="https://hooks.example.org/x", timeout=5.0, headers_file=tmp_path / "h")
    assert n.email == EmailConfig(host="smtp.example.org", port=587, sender="d@example.org",
                                  to=("lab@example.org",), username="d", password_env="SMTP_PASSWORD")
    assert config.storage.extract is True and config.storage.secret_key_path == tmp_path / "k" / "secret"


def test_every_problem_at_its_key_path(tmp_path: Path) -> None:
    found = problems(tmp_path, storage={"extract": "yes", "secret_key_file": ""}, notifications={
        "on": ["completed", "exploded"],
        "give_up_after": -1,
        "webhok": {},
        "webhook": {"url": "ftp://x", "timeout": 0, "headers": "h", "password": "hunter2"},
        "email": {"host": "smtp.example.org", "from": "not an address", "to": [], "port": 0, "starttls": "no",
                  "username": "u", "password_file": "p", "password_env": "P"},
    })
    expected = [
        "storage.extract: must be true or false",
        "storage.secret_key_file: must be non-empty text",
        "notifications.on: unknown 'exploded'",
        "notifications.give_up_after: must be a number of seconds",
        "notifications.webhok: unknown key (did you mean 'webhook'?)",
        "notifications.webhook.url: not a URL",
        "notifications.webhook.timeout: must be a number of seconds",
        "notifications.webhook.headers: unknown key (did you mean 'headers_file'?)",
        "notifications.webhook.password: secrets are never stored in the YAML",
        "notifications.email.port: must be an integer from 1 to 65535",
        "notifications.email.starttls: must be true or false",
        "notifications.email.from: must be an e-mail address",
        "notifications.email.to: must be an e-mail address or a non-empty list",
        "notifications.email: give exactly one of password_file or password_env",
    ]
    for start in expected:
        assert any(p.startswith(start) for p in found), (start, found)
    assert not any("hunter2" in p for p in found)


def test_notifications_need_a_channel_and_emails_their_fields(tmp_path: Path) -> None:
    assert problems(tmp_path, notifications={"on": ["failed"]}) == [
        "notifications: needs webhook or email (or leave the section out)"]
    found = problems(tmp_path, notifications={"email": {"port": 25}})
    assert {"notifications.email.host: required", "notifications.email.from: required",
            "notifications.email.to: required"} <= set(found)
    found = problems(tmp_path, notifications={"webhook": {"timeout": 3}})
    assert found == ["notifications.webhook.url: required"]


def test_credentials_need_starttls_unless_the_server_is_local(tmp_path: Path) -> None:
    email = {"host": "smtp.example.org", "from": "a@b.org", "to": ["c@d.org"], "username": "u",
             "password_file": "p", "starttls": False}
    assert problems(tmp_path, notifications={"email": email}) == [
        "notifications.email.starttls: must be true when logging in to smtp.example.org (the password would "
        "travel in clear)"]
    parse(tmp_path, notifications={"email": {**email, "host": "localhost"}})
    assert problems(tmp_path, notifications={"email": {**email, "username": None, "starttls": True}}) == [
        "notifications.email.username: required with password_file"]
    assert problems(tmp_path, notifications={"email": {"host": "h", "from": "a@b.org", "to": "c@d.org",
                                                       "username": "u"}}) == [
        "notifications.email: username needs password_file or password_env (secrets are never stored in the "
        "YAML)"]


def test_runtime_checks_of_the_notification_credentials(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SMTP_PW_TEST", raising=False)
    headers = tmp_path / "hook.headers"
    headers.write_text("Authorization Bearer x\n")
    config = parse(tmp_path, notifications={
        "webhook": {"url": "https://h.example.org", "headers_file": str(headers)},
        "email": {"host": "localhost", "from": "a@b.org", "to": "c@d.org", "username": "u",
                  "password_env": "SMTP_PW_TEST"},
    })
    found = check_runtime(config)
    assert f"notifications.webhook.headers_file: {headers} line 1: expected 'Name: value'" in found
    assert "notifications.email.password_env: the environment variable it names is not set or empty" in found
    config = parse(tmp_path, notifications={"email": {"host": "localhost", "from": "a@b.org", "to": "c@d.org",
                                                      "username": "u", "password_file": "missing.pw"}})
    assert f"notifications.email.password_file: {tmp_path / 'missing.pw'} does not exist" in check_runtime(config)


def test_notification_secrets_open_to_every_user_are_reported(tmp_path: Path) -> None:
    headers, password = tmp_path / "hook.headers", tmp_path / "smtp.pw"
    headers.write_text("Authorization: Bearer abcdefgh\n")
    password.write_text("hunter2hunter2\n")
    headers.chmod(0o644)
    password.chmod(0o604)
    config = parse(tmp_path, notifications={
        "webhook": {"url": "https://h.example.org", "headers_file": str(headers)},
        "email": {"host": "localhost", "from": "a@b.org", "to": "c@d.org", "username": "u",
                  "password_file": str(password)},
    })
    assert check_runtime(config) == [
        f"notifications.webhook.headers_file: {headers} can be read by every user of this machine (mode 0644); "
        "chmod o-rwx it",
        f"notifications.email.password_file: {password} can be read by every user of this machine (mode 0604); "
        "chmod o-rwx it",
    ]
    headers.chmod(0o600)
    password.chmod(0o640)
    assert check_runtime(config) == []


def test_relative_credential_files_live_in_the_credentials_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    config = parse(tmp_path, notifications={
        "webhook": {"url": "https://h.example.org", "headers_file": "hook.headers"},
        "email": {"host": "localhost", "from": "a@b.org", "to": "c@d.org", "username": "u",
                  "password_file": "smtp.pw"},
    })
    assert config.notifications.webhook.headers_file == tmp_path / "creds" / "hook.headers"
    assert config.notifications.email.password_file == tmp_path / "creds" / "smtp.pw"
