"""Job passwords at rest: sealed in the database, opened only with the key file, redacted from logs."""

from __future__ import annotations

import os
import stat
import threading
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from support.ops_support import PANEL, PANEL_ID, sample_vcf

from daemon.cli import main
from daemon.crypto import MAX_PASSWORD_LENGTH, PasswordCipher, SecretKeyError, is_sealed, load_or_create_key
from daemon.db.engine import make_engine
from daemon.db.models import Job
from daemon.logging import scrub
from daemon.pipeline import Pipeline
from daemon.services.errors import Transient
from daemon.simulator import SimulatedCloudgene, Timings


def test_seal_and_reveal(tmp_path: Path) -> None:
    cipher = PasswordCipher(tmp_path / "secret.key")
    sealed = cipher.seal("correct horse battery")
    assert is_sealed(sealed) and "correct horse" not in sealed and len(sealed) <= 200
    assert cipher.seal("correct horse battery") != sealed  # a fresh nonce every time
    assert cipher.reveal(sealed) == "correct horse battery"
    assert cipher.reveal("plain-old-password") == "plain-old-password"  # rows from before, or other writers
    assert cipher.reveal(None) is None and cipher.seal(None) is None
    assert len(cipher.seal("x" * MAX_PASSWORD_LENGTH)) <= 200
    with pytest.raises(ValueError):
        cipher.seal("x" * (MAX_PASSWORD_LENGTH + 1))


def test_revealed_passwords_are_redacted_from_logs(tmp_path: Path) -> None:
    cipher = PasswordCipher(tmp_path / "secret.key")
    sealed = PasswordCipher(tmp_path / "secret.key").seal("unique-zip-password-981")
    cipher.reveal(sealed)
    assert "unique-zip-password-981" not in scrub("opening with unique-zip-password-981")


def test_the_key_file_is_made_once_0600_even_under_a_race(tmp_path: Path) -> None:
    path = tmp_path / "state" / "secret.key"
    keys: list[bytes] = []
    barrier = threading.Barrier(8)

    def make() -> None:
        barrier.wait()
        keys.append(load_or_create_key(path))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and len(keys[0]) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["secret.key"]  # no temp files left


def test_another_key_or_a_damaged_value_says_so(tmp_path: Path) -> None:
    sealed = PasswordCipher(tmp_path / "a.key").seal("pw-123456")
    with pytest.raises(SecretKeyError, match="sealed with key .* holds key .*same storage.secret_key_file"):
        PasswordCipher(tmp_path / "b.key").reveal(sealed)
    damaged = sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")
    with pytest.raises(SecretKeyError, match="damaged"):
        PasswordCipher(tmp_path / "a.key").reveal(damaged)
    (tmp_path / "c.key").write_text("not hex")
    with pytest.raises(SecretKeyError, match="does not hold a key"):
        PasswordCipher(tmp_path / "c.key").reveal(sealed)


def test_a_pipeline_without_the_key_waits_instead_of_failing(tmp_path: Path) -> None:
    sealed = PasswordCipher(tmp_path / "a.key").seal("pw-123456")
    job = Job(id=uuid.uuid4(), service="s", password=sealed)

    def pipeline(passwords: PasswordCipher | None) -> Pipeline:
        return Pipeline(None, None, {}, None, owner="o", passwords=passwords)  # type: ignore[arg-type]

    with pytest.raises(Transient) as raised:
        pipeline(None)._password(job)
    assert raised.value.kind == "secret_key"
    with pytest.raises(Transient):
        pipeline(PasswordCipher(tmp_path / "b.key"))._password(job)
    assert pipeline(PasswordCipher(tmp_path / "a.key"))._password(job) == "pw-123456"


def test_submit_stores_the_password_sealed(tmp_path: Path, capsys) -> None:
    token = "crypto-token-" + "x" * 20
    (tmp_path / "sim.token").write_text(token)
    password_file = tmp_path / "zip.password"
    password_file.write_text("my-results-password\n")
    config = tmp_path / "config.yaml"
    with SimulatedCloudgene({token: "alice"}, timings=Timings(queue=5, run=5, export=5)) as sim:
        config.write_text(
            f"storage: {{state_dir: {tmp_path / 'state'}}}\n"
            f"services:\n  sim:\n    type: cloudgene\n    base_url: {sim.base_url}\n    token_file: sim.token\n"
            f"    panels:\n      {PANEL}: {{id: \"{PANEL_ID}\"}}\n"
        )
        from daemon.config import load_config
        from daemon.db.schema import upgrade

        url = load_config(config).database.url
        upgrade(make_engine(url))
        code = main(["submit", "-c", str(config), "--service", "sim", "--panel", PANEL, "--build", "hg19",
                     "--password-file", str(password_file), str(sample_vcf(tmp_path))])
        out, err = capsys.readouterr()
    assert code == 0, err
    engine = make_engine(url)
    with engine.connect() as conn:
        stored = conn.scalar(sa.select(Job.password))
    engine.dispose()
    assert is_sealed(stored) and "my-results-password" not in stored
    key_file = tmp_path / "state" / "secret.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert PasswordCipher(key_file).reveal(stored) == "my-results-password"


def test_a_too_long_password_is_refused_at_submit(tmp_path: Path) -> None:
    from daemon.config import parse_config
    from daemon.submission import Submission, validate

    config = parse_config({"storage": {"state_dir": str(tmp_path)}}, base_dir=tmp_path)
    problems = validate(config, Submission(services=[], panel="p", build="hg19", files=[],
                                           password="p" * (MAX_PASSWORD_LENGTH + 1)))
    assert any(p.startswith("--password: at most 100 characters") for p in problems)
    assert not any("ppppp" in p for p in problems)
