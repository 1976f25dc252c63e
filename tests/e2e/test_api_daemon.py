"""The API served by the daemon process itself (`imputationd run` with api.listen) and alone (`imputationd api`):
a job created over HTTP is submitted with its owner's own token, followed to its end and its files downloaded, all
through the API."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import yaml
from support.api_support import free_port
from support.daemon_harness import PANEL, DaemonConfig, DaemonProcess, migrate, simulator

from daemon.db.engine import make_engine
from daemon.db.store import JobStore
from daemon.simulator import Timings, write_sample_vcf


def config_with_api(tmp_path: Path, db_url: str, sim) -> tuple[Path, str]:  # type: ignore[no-untyped-def]
    cfg = DaemonConfig(tmp_path, db_url, sim)
    data = cfg.data()
    listen = f"127.0.0.1:{free_port()}"
    data["api"] = {"listen": listen, "threads": 4}
    path = cfg.write()
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path, f"http://{listen}"


def token(db_url: str, owner: str, scope: str) -> str:
    engine = make_engine(db_url)
    try:
        return JobStore(engine).api_tokens.create(owner, scope)[1]
    finally:
        engine.dispose()


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"after {timeout:g} s: {what}")


def test_a_job_created_through_the_daemons_api_runs_with_its_owners_token(tmp_path: Path, sqlite_url: str) -> None:
    credentials = tmp_path / "credentials"
    (credentials / "bob").mkdir(parents=True)
    bob_account = f"tok-bob-{uuid.uuid4().hex}"
    (credentials / "bob" / "sim.token").write_text(bob_account + "\n")
    vcf = write_sample_vcf(tmp_path / "chr20.vcf.gz", chromosome="20", build="hg19", samples=25, variants=80)
    with simulator(timings=Timings(queue=0.2, run=0.2, export=0.2)) as sim:
        sim.add_token(bob_account, "bob")
        path, url = config_with_api(tmp_path, migrate(sqlite_url), sim)
        bob = {"Authorization": f"Bearer {token(sqlite_url, 'bob', 'submit')}"}
        with DaemonProcess(path, env={"CREDENTIALS_DIRECTORY": str(credentials)}) as daemon, \
                httpx.Client(base_url=url, headers=bob, timeout=30) as client:
            daemon.wait_for_event("api_listening")
            created = client.post("/api/v1/jobs", data={"service": "sim", "panel": PANEL, "build": "hg19"},
                                  files=[("file", ("chr20.vcf.gz", vcf.read_bytes(), "application/gzip"))],
                                  headers={"Idempotency-Key": "first-click"})
            assert created.status_code == 201, created.text
            job_id = created.json()["id"]
            job = wait_for(lambda: (j := client.get(f"/api/v1/jobs/{job_id}").json())["state"] == "completed" and j,
                           what="the job to complete")
            events = client.get(f"/api/v1/jobs/{job_id}/events").json()["events"]
            assert [e["to"] for e in events][-1] == "completed"
            zipped = next(o for o in job["outputs"] if o["name"].endswith(".zip"))
            part = client.get(f"/api/v1/jobs/{job_id}/files/{zipped['name']}", headers={"Range": "bytes=0-99"})
            assert part.status_code == 206 and len(part.content) == 100
            assert part.headers["etag"].strip('"') == zipped["sha256"]
            assert daemon.terminate() == 0
        daemon.assert_clean()
        [remote] = [j for j in sim.sim.jobs.values() if job_id in (j.raw_name or "")]
        assert remote.username == "bob"


def test_imputationd_api_serves_alone_and_stops_on_sigterm(tmp_path: Path, sqlite_url: str) -> None:
    with simulator() as sim:
        path, url = config_with_api(tmp_path, migrate(sqlite_url), sim)
        reader = {"Authorization": f"Bearer {token(sqlite_url, 'alice', 'read')}"}
        with DaemonProcess(path, command="api") as api:
            api.wait_for_event("api_listening")
            with httpx.Client(base_url=url, timeout=10) as client:
                assert client.get("/api/v1/openapi.json").json()["openapi"] == "3.1.0"
                assert client.get("/api/v1/jobs", headers=reader).json() == {"jobs": [], "next_cursor": None}
                assert client.get("/login").status_code == 200
            assert api.terminate() == 0
