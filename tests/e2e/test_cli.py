"""Each `imputationd` command, human and `--json` output, against a real SQLite database and the simulator."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from daemon.cli import PASSWORD_SHOWN, build_parser, main
from daemon.config import load_config
from daemon.db.admin import NewInput, NewJob
from daemon.db.engine import make_engine
from daemon.db.models import Job
from daemon.db.schema import alembic_config, upgrade_url
from daemon.db.store import JobStore
from daemon.simulator import SimulatedCloudgene, Timings, write_sample_vcf

TOKEN = "cli-test-token-0123456789"
PANEL = "apps@1000g-phase-3-v5@2.0.0"


@pytest.fixture
def simulator():
    with SimulatedCloudgene({TOKEN: "alice"}, timings=Timings(queue=0.1, run=0.1, export=0.1)) as sim:
        yield sim


def write_config(tmp_path: Path, base_url: str, *, migrate: bool = True) -> Path:
    for name in ("mis", "topmed"):
        (tmp_path / f"{name}.token").write_text(TOKEN)
        (tmp_path / f"{name}.token").chmod(0o600)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
storage: {{state_dir: {tmp_path / 'state'}}}
services:
  mis:
    type: cloudgene
    base_url: {base_url}
    token_file: mis.token
    panels:
      1000g: {{id: "{PANEL}", builds: [hg19, hg38], populations: [eur, afr, all]}}
  topmed:
    type: cloudgene
    base_url: {base_url}
    token_file: topmed.token
    max_concurrent_jobs: 2
    panels:
      1000g: {{id: "{PANEL}", builds: [hg38]}}
"""
    )
    if migrate:
        upgrade_url(load_config(config).database.url)
    return config


@pytest.fixture
def config(tmp_path: Path, simulator) -> Path:
    return write_config(tmp_path, simulator.base_url)


@pytest.fixture
def vcf(tmp_path: Path) -> Path:
    path = tmp_path / "chr20.vcf.gz"
    write_sample_vcf(path, chromosome="20", build="hg19", samples=25, variants=50)
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def submit(capsys, config: Path, vcf: Path, *extra: str) -> str:
    code, out, err = run(capsys, "submit", "-c", str(config), "--service", "mis", "--panel", "1000g",
                         "--build", "hg19", *extra, str(vcf))
    assert code == 0, err
    return out.strip()


def test_check_config_ok_and_broken(capsys, config: Path, tmp_path: Path) -> None:
    code, out, _ = run(capsys, "check-config", "-c", str(config))
    assert code == 0 and "OK (2 services: mis, topmed)" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheduler: {wokers: 3}\nservices: {x: {type: nope}}\n")
    code, _, err = run(capsys, "check-config", "-c", str(bad))
    assert code == 2
    assert "scheduler.wokers: unknown key (did you mean 'workers'?)" in err
    assert "services.x.type" in err and "Traceback" not in err


def test_check_config_reports_a_missing_token_file(capsys, config: Path, tmp_path: Path) -> None:
    (tmp_path / "mis.token").unlink()
    code, _, err = run(capsys, "check-config", "-c", str(config))
    assert code == 2 and "services.mis.token_file" in err


def test_a_new_sqlite_database_is_created_on_first_use(capsys, tmp_path: Path, simulator) -> None:
    config = write_config(tmp_path, simulator.base_url, migrate=False)
    code, out, err = run(capsys, "jobs", "-c", str(config), "--json")
    assert code == 0 and json.loads(out) == [], err
    code, out, _ = run(capsys, "db", "upgrade", "-c", str(config))
    assert code == 0 and "already at" in out


def test_first_use_of_a_new_sqlite_database_by_several_commands_at_once(tmp_path: Path, simulator) -> None:
    config = write_config(tmp_path, simulator.base_url, migrate=False)
    commands = [[sys.executable, "-m", "daemon", "jobs", "--json", "-c", str(config)] for _ in range(4)]
    running = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    done = [(p.wait(timeout=120), *p.communicate()) for p in running]
    for code, out, err in done:
        assert code == 0 and json.loads(out) == [], err
        assert "alembic" not in err.lower()


def test_an_old_sqlite_schema_waits_for_db_upgrade_named_with_the_config(capsys, tmp_path: Path, simulator) -> None:
    config = write_config(tmp_path, simulator.base_url, migrate=False)
    command.upgrade(alembic_config(url=load_config(config).database.url), "0001")
    code, out, err = run(capsys, "jobs", "-c", str(config))
    assert code == 3 and out == ""
    assert err.endswith(f": run `imputationd db upgrade -c {config}`\n"), err
    code, out, _ = run(capsys, "db", "upgrade", "-c", str(config))
    assert code == 0 and "upgraded from 0001" in out
    code, _, _ = run(capsys, "jobs", "-c", str(config))
    assert code == 0


def test_submit_prints_an_id_and_stores_a_pending_job(capsys, config: Path, vcf: Path) -> None:
    job_id = submit(capsys, config, vcf, "--population", "eur", "--name", "batch 1")
    code, out, _ = run(capsys, "show", "-c", str(config), job_id, "--json")
    data = json.loads(out)
    assert code == 0 and data["id"] == job_id and data["state"] == "pending"
    assert data["population"] == "eur" and data["name"] == "batch 1"
    assert data["inputs"][0]["path"] == str(vcf) and len(data["inputs"][0]["sha256"]) == 64
    assert "password" not in data and data["has_password"] is True
    assert [e["to"] for e in data["events"]] == ["pending"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--service", "nope", "--panel", "1000g", "--build", "hg19"], "--service nope: not a configured service"),
        (["--service", "mis", "--panel", "hrc", "--build", "hg19"], "--panel hrc: service 'mis' has no such panel"),
        (["--service", "topmed", "--panel", "1000g", "--build", "hg19"], "--build hg19: panel '1000g' on 'topmed'"),
        (["--service", "mis", "--panel", "1000g", "--build", "hg19", "--population", "sas"], "--population sas"),
    ],
)
def test_submit_rejects_what_the_config_does_not_offer(capsys, config, vcf, args, message) -> None:
    code, out, err = run(capsys, "submit", "-c", str(config), *args, str(vcf))
    assert code == 2 and message in err and out == ""
    code, out, _ = run(capsys, "jobs", "-c", str(config), "--json")
    assert json.loads(out) == []


def test_submit_rejects_bad_files_with_the_file_named(capsys, config: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.vcf.gz"
    plain = tmp_path / "plain.vcf"
    plain.write_text("##fileformat=VCFv4.2\n")
    code, _, err = run(capsys, "submit", "-c", str(config), "--service", "mis", "--panel", "1000g",
                       "--build", "hg19", str(missing), str(plain))
    assert code == 2 and "missing.vcf.gz" in err and "plain.vcf" in err


def test_submit_to_several_services_makes_a_group(capsys, config: Path, tmp_path: Path) -> None:
    vcf = tmp_path / "chr20.hg38.vcf.gz"
    write_sample_vcf(vcf, chromosome="20", build="hg38", samples=25, variants=50)
    code, out, err = run(capsys, "submit", "-c", str(config), "--service", "mis", "--service", "topmed",
                         "--panel", "1000g", "--build", "hg38", "--json", str(vcf))
    assert code == 0, err
    created = json.loads(out)
    assert [j["service"] for j in created["jobs"]] == ["mis", "topmed"]
    code, out, _ = run(capsys, "show", "-c", str(config), created["group_id"])
    assert code == 0 and "group " in out and "in progress" in out and "topmed" in out
    code, out, _ = run(capsys, "show", "-c", str(config), created["group_id"], "--json")
    group = json.loads(out)
    assert group["state"] == "in progress" and len(group["jobs"]) == 2


def test_jobs_table_json_and_filters(capsys, config: Path, vcf: Path) -> None:
    first = submit(capsys, config, vcf)
    code, out, _ = run(capsys, "jobs", "-c", str(config))
    header, row = out.splitlines()
    assert header.split()[:5] == ["ID", "GROUP", "SERVICE", "OWNER", "STATE"] and row.startswith(first[:8])
    code, out, _ = run(capsys, "jobs", "-c", str(config), "--status", "pending", "--service", "mis", "--json")
    assert [j["id"] for j in json.loads(out)] == [first]
    code, out, _ = run(capsys, "jobs", "-c", str(config), "--status", "completed", "--json")
    assert json.loads(out) == []
    code, _, err = run(capsys, "jobs", "-c", str(config), "--status", "done")
    assert code == 2 and "--status done" in err
    code, out, err = run(capsys, "jobs", "-c", str(config), "--service", "nope")
    assert code == 2 and out == "" and "--service nope: not a configured service (configured: mis, topmed)" in err
    text = config.read_text()
    config.write_text(text[:text.index("  mis:")] + text[text.index("  topmed:"):])
    code, out, err = run(capsys, "jobs", "-c", str(config), "--service", "mis", "--json")
    assert code == 0 and [j["id"] for j in json.loads(out)] == [first], err  # its jobs outlive its config
    code, out, err = run(capsys, "jobs", "-c", str(config), "--service", "nope")
    assert code == 2 and "(configured: topmed)" in err


def test_cancel_pending_and_retry_rules(capsys, config: Path, vcf: Path) -> None:
    job_id = submit(capsys, config, vcf)
    code, out, _ = run(capsys, "cancel", "-c", str(config), job_id[:8])
    assert code == 0 and out.strip() == f"{job_id}: cancelled"
    code, _, err = run(capsys, "retry", "-c", str(config), job_id)
    assert code == 1 and "only failed jobs can be retried" in err
    code, _, err = run(capsys, "show", "-c", str(config), "0000dead")
    assert code == 1 and "no job" in err


def test_services_table_json_and_check(capsys, config: Path) -> None:
    code, out, _ = run(capsys, "services", "-c", str(config))
    assert code == 0 and out.splitlines()[0].split()[:3] == ["SERVICE", "TYPE", "STATUS"]
    code, out, _ = run(capsys, "services", "-c", str(config), "--check", "--json")
    entries = {e["name"]: e for e in json.loads(out)}
    assert code == 0
    assert entries["mis"]["reachable"] is True and entries["mis"]["token_valid"] is True
    assert entries["mis"]["missing_panels"] == [] and PANEL in entries["mis"]["remote_panels"]
    assert TOKEN not in out


def test_services_check_flags_a_panel_the_server_does_not_offer(capsys, tmp_path: Path, simulator) -> None:
    config = write_config(tmp_path, simulator.base_url)
    config.write_text(config.read_text().replace('id: "apps@1000g-phase-3-v5@2.0.0", builds: [hg38]',
                                                 'id: "apps@renamed@9.9.9", builds: [hg38]'))
    code, out, _ = run(capsys, "services", "-c", str(config), "--check")
    assert code == 1 and "apps@renamed@9.9.9" in out


def test_console_script_usage_errors_exit_2_without_traceback() -> None:
    result = subprocess.run([sys.executable, "-m", "daemon", "submit", "--build", "hg17"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "--build" in result.stderr
    result = subprocess.run([sys.executable, "-m", "daemon", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("imputationd ")


def _insert_job(config: Path, **fields) -> str:
    """A job stored as an application inserting rows itself would (no CLI validation), with `fields` set after."""
    engine = make_engine(load_config(config).database.url)
    try:
        [job] = JobStore(engine).admin.create_group([NewJob(
            service="mis", panel="1000g", build="hg19", name=fields.pop("name", None),
            inputs=[NewInput(path="/data/chr20.vcf.gz", size=1, sha256="0" * 64)])])
        if fields:
            with engine.begin() as conn:
                conn.execute(sa.update(Job).where(Job.id == job.id).values(**fields))
        return str(job.id)
    finally:
        engine.dispose()


def test_jobs_and_show_print_no_raw_escape_sequence_from_names_or_server_text(capsys, config: Path) -> None:
    hostile = "\x1b]0;owned\x07\x1b[2J\rline\nbreak\u202etxt.exe"
    job_id = _insert_job(config, name=hostile, progress=hostile, remote_state="\x1b[31mRED",
                         error="oops\x1b[0m", remote_id="\x9b6n")
    for argv in (["jobs"], ["show", job_id]):
        code, out, _ = run(capsys, *argv, "-c", str(config))
        assert code == 0
        assert not any(ch in out for ch in "\x1b\x07\r\x9b\u202e"), out
        assert "\\x1b]0;owned\\x07" in out and "\\u202etxt.exe" in out
    code, out, _ = run(capsys, "jobs", "-c", str(config))
    assert len(out.splitlines()) == 2  # the header and one row: the name's line break is shown, not made


def test_show_password_prints_the_result_password_and_records_that_it_was_shown(
    capsys, config: Path, vcf: Path, tmp_path: Path
) -> None:
    invented = submit(capsys, config, vcf)
    code, out, _ = run(capsys, "show", "-c", str(config), invented)
    assert code == 0
    assert f"results are encrypted; `imputationd show {invented} --password -c {config}` prints the password" in out
    code, out, err = run(capsys, "show", "-c", str(config), invented[:8], "--password")
    assert code == 0, err
    password = out.strip()
    assert len(out.splitlines()) == 1 and len(password) >= 20
    engine = make_engine(load_config(config).database.url)
    try:
        with engine.connect() as conn:
            stored = conn.execute(sa.select(Job.password).where(Job.id == uuid.UUID(invented))).scalar_one()
    finally:
        engine.dispose()
    assert stored.startswith("aesgcm1:") and password not in stored  # sealed at rest, revealed through crypto
    code, out, _ = run(capsys, "show", "-c", str(config), invented, "--json")
    events = json.loads(out)["events"]
    assert [(e["from"], e["to"], e["reason"]) for e in events][-1] == ("pending", "pending", PASSWORD_SHOWN)
    assert password not in out

    chosen = tmp_path / "password.txt"
    chosen.write_text("Chosen-pass-123\n")
    mine = submit(capsys, config, vcf, "--password-file", str(chosen))
    code, out, _ = run(capsys, "show", "-c", str(config), mine, "--password")
    assert code == 0 and out == "Chosen-pass-123\n"

    bare = _insert_job(config)
    code, out, err = run(capsys, "show", "-c", str(config), bare, "--password")
    assert code == 1 and out == "" and "has no password; its results are not encrypted" in err
    code, out, _ = run(capsys, "show", "-c", str(config), bare)
    assert "--password" not in out


def test_services_check_fails_the_same_way_as_table_and_json_and_says_why(capsys, tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9")  # the discard port: nothing listens
    code, out, _ = run(capsys, "services", "-c", str(config), "--check", "--json")
    entries = {e["name"]: e for e in json.loads(out)}
    assert code == 1 and entries["mis"]["reachable"] is False and entries["mis"]["message"]
    code, out, _ = run(capsys, "services", "-c", str(config), "--check")
    assert code == 1
    header, *rows = out.splitlines()
    status = header.index("STATUS"), header.index("ACTIVE")
    for row in rows:
        assert row[status[0]:status[1]].strip() not in ("", "ok"), out
        assert "NO" in row[status[1]:].split()
    assert "127.0.0.1:9" in rows[0] or "connect" in rows[0].lower(), out


def test_cancel_keeps_stdout_for_its_result_and_refuses_a_finished_job(capsys, config: Path, vcf: Path) -> None:
    queued = _insert_job(config, state="queued", remote_id="job-20260101-000000-001")
    code, out, err = run(capsys, "cancel", "-c", str(config), queued)
    assert code == 0, err
    assert out.splitlines() == [f"{queued}: cancelled"], out  # logs (the remote cancel's) go to stderr
    assert "job-20260101-000000-001" in err
    code, out, err = run(capsys, "cancel", "-c", str(config), queued)
    assert code == 0 and out == f"{queued}: already cancelled\n"
    for state in ("completed", "failed"):
        done = _insert_job(config, state=state)
        code, out, err = run(capsys, "cancel", "-c", str(config), done)
        assert code == 1 and out == ""
        assert err == f"imputationd: {done}: the job is {state}; only an unfinished job can be cancelled\n"
        code, out, _ = run(capsys, "show", "-c", str(config), done, "--json")
        assert json.loads(out)["state"] == state


def test_the_config_option_goes_before_or_after_the_command(capsys, config: Path, vcf: Path, tmp_path: Path,
                                                            monkeypatch) -> None:
    monkeypatch.delenv("IMPUTATIOND_CONFIG", raising=False)
    job_id = submit(capsys, config, vcf)
    for argv in (["-c", str(config), "jobs", "--json"], ["jobs", "--json", "-c", str(config)],
                 ["--config", str(tmp_path / "nowhere.yaml"), "jobs", "--json", "--config", str(config)]):
        code, out, err = run(capsys, *argv)
        assert code == 0, (argv, err)
        assert [j["id"] for j in json.loads(out)] == [job_id]
    code, out, _ = run(capsys, "-c", str(config), "db", "upgrade")
    assert code == 0 and "already at" in out
    code, _, err = run(capsys, "-c", str(tmp_path / "nowhere.yaml"), "jobs")
    assert code == 2 and "nowhere.yaml" in err


def test_human_output_gives_times_with_their_zone(capsys, config: Path, vcf: Path) -> None:
    job_id = submit(capsys, config, vcf)
    code, out, _ = run(capsys, "jobs", "-c", str(config))
    assert code == 0 and re.search(r"  \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\b", out.splitlines()[1]), out
    code, out, _ = run(capsys, "show", "-c", str(config), job_id)
    created = next(line for line in out.splitlines() if line.startswith("created"))
    assert re.fullmatch(r"created +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", created), created
    history = out.split("\nhistory\n")[1].splitlines()[1]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC +pending", history), history


def test_counts_of_one_are_singular(capsys, tmp_path: Path, simulator) -> None:
    config = write_config(tmp_path, simulator.base_url)
    config.write_text(config.read_text().split("  topmed:")[0])
    code, out, err = run(capsys, "check-config", "-c", str(config))
    assert code == 0 and "OK (1 service: mis)" in out, err
    code, out, err = run(capsys, "cleanup", "-c", str(config), "--dry-run", "--keep-days", "1")
    assert code == 0 and out == "would delete 0 jobs finished more than 1 day ago (0 bytes of results)\n", err


def test_every_option_and_command_has_help_text() -> None:
    missing = []

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {choice.dest: choice.help for choice in action._choices_actions}
                missing.extend(f"{parser.prog} {name}" for name in action.choices if not helped.get(name))
                for sub in action.choices.values():
                    walk(sub)
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser())
    assert not missing, missing


def test_owner_is_stored_shown_and_filtered(capsys, config: Path, vcf: Path) -> None:
    alice = submit(capsys, config, vcf, "--owner", "alice")
    submit(capsys, config, vcf)
    code, out, _ = run(capsys, "jobs", "-c", str(config), "--owner", "alice", "--json")
    assert code == 0 and [(j["id"], j["owner"]) for j in json.loads(out)] == [(alice, "alice")]
    code, out, _ = run(capsys, "show", "-c", str(config), alice)
    assert re.search(r"^owner\s+alice$", out, re.M)
    code, out, _ = run(capsys, "jobs", "-c", str(config))
    assert "OWNER" in out.splitlines()[0] and "operator" in out
    code, _, err = run(capsys, "submit", "-c", str(config), "--service", "mis", "--panel", "1000g", "--build",
                       "hg19", "--owner", "../etc", str(vcf))
    assert code == 2 and "--owner: owner '../etc' is not a valid name" in err


def test_tokens_create_list_revoke(capsys, config: Path) -> None:
    code, out, err = run(capsys, "tokens", "create", "-c", str(config), "--owner", "alice", "--scope", "submit")
    assert code == 0 and "shown only now" in err
    token = out.strip().splitlines()[-1]
    token_id = token.split("_")[1]
    code, out, _ = run(capsys, "tokens", "list", "-c", str(config))
    [line] = out.splitlines()
    assert line.startswith(f"{token_id}  alice  submit") and "live" in line and token not in out
    code, out, _ = run(capsys, "tokens", "list", "-c", str(config), "--json")
    [listed] = json.loads(out)
    assert (listed["id"], listed["owner"], listed["scope"], listed["revoked_at"]) == (token_id, "alice", "submit", None)
    assert token not in out and token.split("_")[2] not in out
    store = JobStore(make_engine(load_config(config).database.url))
    assert store.api_tokens.authenticate(token).owner == "alice"
    assert run(capsys, "tokens", "revoke", "-c", str(config), token_id)[0] == 0
    assert store.api_tokens.authenticate(token) is None
    code, _, err = run(capsys, "tokens", "revoke", "-c", str(config), token_id)
    assert code == 1 and "no live token" in err
    with pytest.raises(SystemExit) as refused:
        run(capsys, "tokens", "create", "-c", str(config), "--owner", "alice", "--scope", "root")
    assert refused.value.code == 2
