"""A service whose server drips its answers cannot starve the others: real `imputationd run` processes, the simulated
Cloudgene server, and loopback servers that answer every request one byte at a time (`hostile_server`).

Two rules make it so: no call lasts past its budget (`daemon.services.deadlines`), and one service's steps occupy at
most its share of the pool (`Config.worker_share`, `max_workers`)."""

from __future__ import annotations

import json

from support.daemon_harness import DaemonConfig, DaemonProcess, JobDB, create_jobs, simulator
from support.hostile_server import HostileServer, Request, drip, json_answer, with_cloudgene_app

SUBMIT = "POST /api/v2/jobs/submit/imputationserver2"


def dripping(request: Request):
    """Every answer a well-formed Cloudgene success, sent a byte every 0.1 s (each byte well within a read timeout)."""
    return drip(json_answer(json.dumps({"success": True, "id": "never", "pad": "x" * 5000}).encode()), 0.1)


def test_a_service_whose_server_drips_takes_at_most_its_share_of_the_workers(tmp_path, sqlite_url):
    # Two workers, two services: each may occupy one. The dripping service's calls are long (its timeout is 60 s,
    # so a call may take 120 s): while they last, the other service's job still runs on the other worker.
    with simulator() as sim, HostileServer(with_cloudgene_app(dripping)) as slow:
        cfg = DaemonConfig(tmp_path, sqlite_url, sim, scheduler={"workers": 2},
                           extra_services={"slow": (sim, {"base_url": slow.url, "timeout": 60})})
        db = JobDB(sqlite_url)
        try:
            stuck = create_jobs(cfg, 3, service="slow")
            with DaemonProcess(cfg.write()) as d:
                d.wait_for_event("daemon_started")
                [fine] = create_jobs(cfg, 1, db=db)
                db.wait_states([fine], {"completed"}, 60, also=d.require_alive)
                assert slow.answering[SUBMIT] == 1  # a submit of the slow service still in progress
                assert slow.most_answering[SUBMIT] == 1
                assert set(db.states(stuck).values()) == {"submitting"}
                # SIGTERM gives back the step in progress and the ones held for the share alike.
                assert d.terminate() == 0
            assert {owner for owner, _ in db.leases(stuck).values()} == {None}
        finally:
            db.close()
    d.assert_clean()


def test_two_dripping_services_cannot_starve_a_third(tmp_path, sqlite_url):
    # Two workers, and two services whose every answer drips: each call ends at its deadline (2 x the 1 s timeout),
    # so the workers come free again and the third service's job completes.
    with simulator() as sim, HostileServer(dripping) as first, HostileServer(dripping) as second:
        cfg = DaemonConfig(tmp_path, sqlite_url, sim, scheduler={"workers": 2},
                           extra_services={"drip1": (sim, {"base_url": first.url, "timeout": 1, "max_workers": 2}),
                                           "drip2": (sim, {"base_url": second.url, "timeout": 1, "max_workers": 2})})
        db = JobDB(sqlite_url)
        try:
            create_jobs(cfg, 3, service="drip1")
            create_jobs(cfg, 3, service="drip2")
            with DaemonProcess(cfg.write()) as d:
                d.wait_for_event("daemon_started")
                [fine] = create_jobs(cfg, 1, db=db)
                db.wait_states([fine], {"completed"}, 90, also=d.require_alive)
                d.terminate()
        finally:
            db.close()
        assert first.unfinished and second.unfinished  # the daemon hung up on the drips
        assert first.finished == second.finished == 0
    d.assert_clean()
