"""Metrics and health over real HTTP: the listener alone, then a running daemon scraped while it works a job."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.ops_support import PANEL, daemon_config, running_daemon, sample_vcf, wait_until
from support.pg import free_port

from daemon import prometheus as metrics_module
from daemon.metrics import NO_METRICS, Metrics, health_report
from daemon.prometheus import MetricsServer, PrometheusMetrics
from daemon.simulator import SimulatedCloudgene, Timings
from daemon.states import JobState
from daemon.submission import Submission, submit


def get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


# ---------------------------------------------------------------------------------------------- the listener


# One call of each method of the `Metrics` interface.
INTERFACE_CALLS: dict[str, tuple[object, ...]] = {
    "submitted": ("s",),
    "polled": ("s",),
    "error": ("s", "timeout"),
    "downloaded": ("s", 10),
    "tick": ("poll", 0.1),
    "token_days_left": ("s", "operator", 3.0),
    "notification": ("webhook", "sent"),
}


def global_metric_names() -> set[str]:
    return {family.name for family in prometheus_client.REGISTRY.collect()}


def test_every_interface_method_is_called_here() -> None:
    interface = {name for name, member in vars(Metrics).items() if callable(member) and not name.startswith("_")}
    assert set(INTERFACE_CALLS) == interface


def test_the_no_op_metrics_accept_every_call_and_record_nowhere() -> None:
    before = global_metric_names()
    for name, args in INTERFACE_CALLS.items():
        assert getattr(NO_METRICS, name)(*args) is None
    assert vars(NO_METRICS) == {}
    assert global_metric_names() == before


def test_prometheus_metrics_record_every_interface_call_in_their_own_registry() -> None:
    metrics = PrometheusMetrics()
    for name, args in INTERFACE_CALLS.items():
        before = samples(metrics.render()[0].decode())
        getattr(metrics, name)(*args)
        assert samples(metrics.render()[0].decode()) != before, f"PrometheusMetrics.{name} recorded nothing"
    assert not {name for name in global_metric_names() if name.startswith("imputationd")}


def test_metrics_and_healthz_over_http() -> None:
    calls = []

    def counts() -> dict[str, dict[str, int]]:
        calls.append(1)
        return {"michigan": {"running": 2, "completed": 5}}

    metrics = PrometheusMetrics(counts, cache_seconds=60)
    metrics.submitted("michigan")
    metrics.polled("michigan")
    metrics.polled("michigan")
    metrics.error("michigan", "timeout")
    metrics.downloaded("michigan", 1234)
    metrics.tick("poll", 0.02)
    metrics.token_days_left("michigan", "alice", 6.5)
    metrics.notification("webhook", "sent")
    healthy = {"ok": True}

    def ping() -> None:
        if not healthy["ok"]:
            raise ConnectionError("database gone")

    server = MetricsServer(f"127.0.0.1:{free_port()}", metrics,
                           lambda: health_report(ping, lambda: True, describe_error=str))
    server.start()
    try:
        host, port = server.address
        base = f"http://{host}:{port}"
        status, content_type, text = get(base + "/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        assert value(text, "imputationd_jobs", service="michigan", state="running") == 2
        assert value(text, "imputationd_jobs", service="michigan", state="completed") == 5
        assert value(text, "imputationd_jobs", service="michigan", state="failed") == 0
        assert value(text, "imputationd_database_up") == 1
        assert value(text, "imputationd_submissions_total", service="michigan") == 1
        assert value(text, "imputationd_polls_total", service="michigan") == 2
        assert value(text, "imputationd_errors_total", service="michigan", kind="timeout") == 1
        assert value(text, "imputationd_download_bytes_total", service="michigan") == 1234
        assert value(text, "imputationd_tick_duration_seconds_count", tick="poll") == 1
        assert value(text, "imputationd_token_days_left", service="michigan", owner="alice") == 6.5
        assert value(text, "imputationd_notifications_total", channel="webhook", outcome="sent") == 1
        get(base + "/metrics")
        assert len(calls) == 1  # the second scrape used the cached counts

        status, content_type, text = get(base + "/metrics", accept="application/openmetrics-text; version=1.0.0")
        assert status == 200 and content_type.startswith("application/openmetrics-text") and "# EOF" in text

        status, content_type, body = get(base + "/healthz")
        assert (status, content_type) == (200, "application/json")
        assert json.loads(body) == {"status": "ok", "database": "ok", "scheduler": "ok"}
        healthy["ok"] = False
        status, _, body = get(base + "/healthz")
        assert status == 503 and json.loads(body)["database"] == "database gone"
        assert get(base + "/other")[0] == 404
    finally:
        server.close()
    with pytest.raises(OSError), socket.create_connection((host, port), timeout=1):
        pass  # closed on stop: nothing listens any more


def test_a_failing_jobs_query_is_database_up_0_not_a_failed_scrape() -> None:
    def counts() -> dict:
        raise ConnectionError("no database")

    metrics = PrometheusMetrics(counts, cache_seconds=0)
    body, _ = metrics.render()
    assert value(body.decode(), "imputationd_database_up") == 0


def test_two_metrics_objects_do_not_share_a_registry() -> None:
    a, b = PrometheusMetrics(), PrometheusMetrics()
    a.submitted("x")
    assert value(b.render()[0].decode(), "imputationd_submissions_total", service="x") is None
    assert value(a.render()[0].decode(), "imputationd_submissions_total", service="x") == 1


def test_a_taken_port_is_an_oserror_at_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = MetricsServer(f"127.0.0.1:{taken.getsockname()[1]}", PrometheusMetrics(),
                               lambda: (True, {}))
        with pytest.raises(OSError):
            server.start()
        server.close()


def test_many_idle_connections_hold_no_threads_and_the_listener_still_answers() -> None:
    # 400 idle connections once made 406 threads: each connection had a thread of its own, blocked reading.
    server = MetricsServer("127.0.0.1:0", PrometheusMetrics(), lambda: (True, {"status": "ok"}))
    server.start()
    before = threading.active_count()
    idle: list[socket.socket] = []
    try:
        for _ in range(400):
            idle.append(socket.create_connection(server.address, timeout=5))
        # Half of them start a request and never finish it: they hold a handler until their time runs out.
        for conn in idle[::2]:
            conn.sendall(b"GET /healthz HTTP/1.1\r\n")
        status, _, body = get("http://{}:{}/healthz".format(*server.address))
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        assert threading.active_count() - before <= metrics_module.MAX_HANDLERS + 1
    finally:
        for conn in idle:
            conn.close()
        server.close()


def test_an_idle_connection_is_closed_after_the_idle_timeout(monkeypatch) -> None:
    monkeypatch.setattr(metrics_module, "IDLE_TIMEOUT", 0.5)
    server = MetricsServer("127.0.0.1:0", PrometheusMetrics(), lambda: (True, {}))
    server.start()
    try:
        with socket.create_connection(server.address, timeout=10) as silent, \
                socket.create_connection(server.address, timeout=10) as slow:
            slow.sendall(b"GET /metrics HTTP/1.1\r\n")  # and nothing more
            assert silent.recv(1) == b""  # closed by the listener, well before our own 10 s
            assert slow.recv(1) == b""  # an unfinished request gets no answer, only the end of the connection
    finally:
        server.close()


def test_health_report_says_what_is_wrong() -> None:
    ok, report = health_report(lambda: None, lambda: False)
    assert not ok and report["scheduler"] == "ticks have not run for too long" and report["status"] == "unhealthy"
    ok, report = health_report(lambda: None, lambda: True, stopping=lambda: True)
    assert not ok and report["scheduler"] == "stopping"
    ok, report = health_report(lambda: None, lambda: True, extra=lambda: {"services": {"m": "blocked: token"}})
    assert ok and report["services"] == {"m": "blocked: token"}


# ------------------------------------------------------------------------------------------- a running daemon


def test_a_running_daemon_serves_metrics_and_health(db_url: str, tmp_path: Path, request) -> None:
    token = "metrics-token-" + "x" * 20
    port = free_port()
    with SimulatedCloudgene({token: "alice"}, timings=Timings(queue=0.1, run=0.1, export=0.1)) as sim:
        config = daemon_config(tmp_path, db_url, base_url=sim.base_url, token=token,
                               metrics={"listen": f"127.0.0.1:{port}"})
        base = f"http://127.0.0.1:{port}"
        with running_daemon(config) as daemon:
            [job] = submit(config, daemon.store, Submission(services=["sim"], panel=PANEL, build="hg19",
                                                            files=[sample_vcf(tmp_path)]))
            wait_until(lambda: daemon.store.admin.get(job.id).state is JobState.COMPLETED, 60)
            outputs = daemon.store.queue.outputs(job.id)

            ticks = ("dispatch", "poll", "download", "maintenance", "notify")

            def scraped() -> str | None:
                text = get(base + "/metrics")[2]
                counted = value(text, "imputationd_jobs", service="sim", state="completed") == 1
                # A tick's duration is recorded when its run ends: a first run still going under load has none yet.
                ran = all(value(text, "imputationd_tick_duration_seconds_count", tick=t) for t in ticks)
                return text if counted and ran else None

            text = wait_until(scraped, 15)  # the job counts are cached for a few seconds
            assert value(text, "imputationd_submissions_total", service="sim") == 1
            assert value(text, "imputationd_polls_total", service="sim") >= 1
            assert value(text, "imputationd_download_bytes_total", service="sim") == sum(o.size for o in outputs)
            for tick in ticks:
                assert value(text, "imputationd_tick_duration_seconds_count", tick=tick) >= 1, tick

            status, _, body = get(base + "/healthz")
            report = json.loads(body)
            assert status == 200, report
            assert report["database"] == "ok" and report["scheduler"] == "ok" and report["services"] == {"sim": "ok"}

            # As if the poll tick had hung for an hour. Paused, no new tick run can refresh the time; one already
            # running may still do so once, hence the second try.
            daemon.scheduler.pause()
            for _ in range(2):
                daemon._last_tick["poll"] = time.monotonic() - 3600
                status, _, body = get(base + "/healthz")
                if status == 503:
                    break
            assert status == 503 and json.loads(body)["scheduler"] == "ticks have not run for too long"
            daemon._last_tick["poll"] = time.monotonic()
            daemon.scheduler.resume()

            if "postgres" in request.node.callspec.id:
                cluster = request.getfixturevalue("postgres_cluster")
                cluster.stop("immediate")
                try:
                    status, _, body = get(base + "/healthz")
                    report = json.loads(body)
                    assert status == 503 and report["database"].startswith("cannot open database"), report
                finally:
                    cluster.start()
                wait_until(lambda: get(base + "/healthz")[0] == 200, 30)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
