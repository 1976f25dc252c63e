"""Many owners on one daemon: each job goes out with its owner's own token, a bad token blocks only its owner, and
the server's "Only N jobs per user" is counted per owner (the simulator keeps one account per token)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from support.e2e_support import Harness

from daemon import cli
from daemon.states import JobState


def give_token(h: Harness, credentials: Path, owner: str, *, username: str | None = None) -> str:
    """A token of `owner`'s own account on the simulator, in the owner's folder of the credentials directory."""
    token = f"tok-{owner}-{uuid.uuid4().hex}"
    h.sim.add_token(token, username or owner)
    path = credentials / owner / "mis.token"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token + "\n", encoding="utf-8")
    path.chmod(0o600)
    return token


def remote_user(h: Harness, job_id: uuid.UUID) -> str:
    """The account the server's job for our job was created under."""
    with h.sim.sim.lock:
        [user] = [j.username for j in h.sim.sim.jobs.values() if str(job_id) in (j.raw_name or "")]
    return user


@pytest.fixture
def credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "credentials"
    directory.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(directory))  # as systemd's LoadCredential= provides it
    return directory


def test_each_owner_submits_with_their_own_token_and_a_revoked_one_blocks_only_its_owner(e2e, credentials, capsys):
    h = e2e()
    give_token(h, credentials, "bob")
    carol_token = give_token(h, credentials, "carol")
    [bob_job] = h.submit(owner="bob", name="bob's")
    [carol_job] = h.submit(owner="carol", name="carol's")
    [operator_job] = h.submit(name="the operator's")
    h.start()
    for job in (bob_job, carol_job, operator_job):
        h.wait_state(job.id, "completed")
    assert [remote_user(h, j.id) for j in (bob_job, carol_job, operator_job)] == ["bob", "carol", "alice"]

    h.sim.revoke_token(carol_token)
    [carol_late] = h.submit(owner="carol", name="carol's, after her token was revoked")
    [bob_late] = h.submit(owner="bob", name="bob's, meanwhile")
    h.wait_state(carol_late.id, "blocked")
    h.wait_state(bob_late.id, "completed")
    h.wait_ticks(2)
    [carol_later] = h.submit(owner="carol", name="submitted while she is blocked")
    h.wait_ticks(3)
    assert h.job(carol_later.id).state is JobState.PENDING  # waits; nothing is sent with a token known bad
    assert h.sim.submissions(str(carol_later.id)) == 0
    statuses = h.store.services.owner_statuses()
    assert "HTTP 403" in statuses[("mis", "carol")].blocked_reason  # a revoked token: 403
    assert statuses.get(("mis", "bob")) is None or statuses[("mis", "bob")].blocked_reason is None
    assert statuses.get(("mis", "operator")) is None or statuses[("mis", "operator")].blocked_reason is None
    capsys.readouterr()
    assert cli.main(["services", "-c", str(h.config_path), "--json"]) == 0
    [service] = json.loads(capsys.readouterr().out)
    owners = {o["owner"]: o for o in service["owners"]}
    assert service["blocked"] is None and owners["bob"]["blocked"] is None
    assert "HTTP 403" in owners["carol"]["blocked"] and owners["carol"]["jobs"]["blocked"] == 1
    assert cli.main(["services", "-c", str(h.config_path)]) == 0
    assert "blocked for carol: " in capsys.readouterr().out

    give_token(h, credentials, "carol")  # a new token in her file: probed at once, her jobs go on
    h.wait_state(carol_late.id, "completed", timeout=30)
    h.wait_state(carol_later.id, "completed", timeout=30)
    h.stop_daemon()
    blocked = h.logs.select(event="service_blocked")
    assert [(line["owner"], line["error_kind"]) for line in blocked] == [("carol", "forbidden")]


def test_an_owner_without_a_token_waits_blocked_and_is_never_sent_with_the_services(e2e, credentials):
    h = e2e()
    [job] = h.submit(owner="dave")
    h.start()
    job = h.wait_state(job.id, "blocked")
    assert h.sim.submissions(str(job.id)) == 0
    expected = credentials / "dave" / "mis.token"
    assert f"owner dave has no token for mis: put it in {expected}" in job.events[-1].reason
    give_token(h, credentials, "dave")
    job = h.wait_state(job.id, "completed", timeout=30)
    assert remote_user(h, job.id) == "dave"


def test_a_shared_token_serves_owners_without_one(e2e, credentials):
    h = e2e(service={"shared_token": True})
    [job] = h.submit(owner="erin")
    h.start()
    assert remote_user(h, h.wait_state(job.id, "completed").id) == "alice"


def test_the_servers_job_limit_is_counted_per_owner(e2e, credentials):
    """One slot per account on the server: bob's second job waits for his first, carol's goes out meanwhile."""
    h = e2e(sim_options={"max_jobs_per_user": 1}, service={"max_concurrent_jobs": 5})
    give_token(h, credentials, "bob")
    give_token(h, credentials, "carol")
    h.sim.faults.stall(times=None)
    bob_jobs = [h.submit(owner="bob")[0] for _ in range(2)]
    [carol_job] = h.submit(owner="carol")
    h.start()
    carol_remote = h.wait_remote_id(carol_job.id)
    h.wait_until(lambda: h.logs.select(event="service_job_limit"), what="bob's second job refused")
    h.wait_ticks(3)
    [sent] = [h.job(j.id) for j in bob_jobs if h.job(j.id).remote_id is not None]
    [waiting] = [h.job(j.id) for j in bob_jobs if h.job(j.id).remote_id is None]
    assert waiting.state is JobState.PENDING
    assert h.store.services.owner_statuses()[("mis", "bob")].effective_limit == 1
    assert h.store.services.owner_statuses()[("mis", "carol")].effective_limit is None
    assert [line["owner"] for line in h.logs.select(event="service_job_limit")] == ["bob"]
    h.sim.faults.clear()
    h.sim.release_job(sent.remote_id)
    h.sim.release_job(carol_remote)
    for job in (*bob_jobs, carol_job):
        h.wait_state(job.id, "completed", timeout=30)


def test_jobs_per_owner_keeps_an_owner_within_their_share_before_the_server_says_so(e2e, credentials):
    h = e2e(service={"max_concurrent_jobs": 5, "jobs_per_owner": 1})
    give_token(h, credentials, "bob")
    h.sim.faults.stall(times=None)
    bob_jobs = [h.submit(owner="bob")[0] for _ in range(3)]
    [operator_job] = h.submit()
    h.start()
    h.wait_remote_id(operator_job.id)
    h.wait_ticks(3)
    assert sum(h.job(j.id).remote_id is not None for j in bob_jobs) == 1
    assert sum(h.job(j.id).state is JobState.PENDING for j in bob_jobs) == 2
    assert not h.logs.select(event="service_job_limit")  # never had to be told by the server
