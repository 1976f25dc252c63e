"""The HTTP API over real HTTP (cheroot on loopback, the real Flask application, SQLite): each route with its auth
rules, idempotent POSTs, uploads refused by the preflight, downloads with Range, and file names that try to leave the
job's folder."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import http.client
import re
import uuid
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs
from support.api_support import Api

from daemon.api import create_app
from daemon.api.dashboard import PAGE
from daemon.api.openapi import document
from daemon.db.models import Job, JobOutput
from daemon.states import JobState, OutputState

ROUTES = [("GET", "/api/v1/jobs"), ("POST", "/api/v1/jobs"), ("GET", "/api/v1/jobs/{id}"),
          ("GET", "/api/v1/jobs/{id}/events"), ("POST", "/api/v1/jobs/{id}/cancel"),
          ("POST", "/api/v1/jobs/{id}/retry"), ("GET", "/api/v1/jobs/{id}/files/{name}"),
          ("GET", "/api/v1/services")]


def created(api: Api, who: str = "alice", **fields: object) -> dict:
    response = api.upload(api.as_(who), **fields)
    assert response.status_code == 201, response.text
    return response.json()


def finished_job(api: Api, owner: str = "alice") -> tuple[Job, bytes]:
    """A completed job of `owner` with one verified file on disk, as the daemon leaves it."""
    job_id = uuid.uuid4()
    result_dir = api.root / "state" / "results" / str(job_id)
    (result_dir / "statistics").mkdir(parents=True)
    body = bytes(range(256)) * 64
    (result_dir / "chr_20.zip").write_bytes(body)
    (result_dir / "statistics" / "summary.txt").write_text("ok\n")
    with api.store._db.session() as session, session.begin():
        job = Job(id=job_id, group_id=job_id, service="mis", owner=owner, panel="p", build="hg19",
                  state=JobState.COMPLETED, result_dir=str(result_dir))
        job.outputs = [
            JobOutput(name="chr_20.zip", url="https://secret.example/share/abc", remote_hash="hash-secret",
                      state=OutputState.VERIFIED, local_path=str(result_dir / "chr_20.zip"), size=len(body),
                      sha256=hashlib.sha256(body).hexdigest()),
            JobOutput(name="statistics/summary.txt", url="u", state=OutputState.VERIFIED,
                      local_path=str(result_dir / "statistics" / "summary.txt"), size=3,
                      sha256=hashlib.sha256(b"ok\n").hexdigest()),
        ]
        session.add(job)
    return api.store.admin.get(job_id), body


# ------------------------------------------------------------------ auth


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_wants_a_valid_token(api: Api, method: str, path: str) -> None:
    url = path.replace("{id}", str(uuid.uuid4())).replace("{name}", "chr_20.zip")
    with api.client() as anonymous, api.client("imd_0123456789ab_not-the-secret") as forged, \
            api.client("garbage") as garbage:
        for client in (anonymous, forged, garbage):
            response = client.request(method, url)
            assert response.status_code == 401, (client.headers, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            assert response.headers["www-authenticate"].startswith("Bearer")
            problem = response.json()
            assert problem["status"] == 401 and problem["title"] and problem["detail"]


def test_a_failed_attempt_is_logged_without_the_token(api: Api) -> None:
    forged = "imd_0123456789ab_" + "s" * 43
    with capture_logs() as logs, api.client(forged) as client:
        client.get("/api/v1/jobs?secret=in-the-query")
    [line] = [entry for entry in logs if entry["event"] == "api_auth_failed"]
    assert line["path"] == "/api/v1/jobs" and forged not in repr(logs) and "in-the-query" not in repr(logs)


def test_scopes(api: Api) -> None:
    job = created(api)
    with api.as_("alice_read") as reader:
        assert reader.get(f"/api/v1/jobs/{job['id']}").status_code == 200
        for response in (api.upload(reader), reader.post(f"/api/v1/jobs/{job['id']}/cancel"),
                         reader.post(f"/api/v1/jobs/{job['id']}/retry")):
            assert response.status_code == 403, response.text
            assert "submit or admin scope" in response.json()["detail"]


def test_an_owner_never_learns_that_anothers_job_exists(api: Api) -> None:
    job = created(api, "alice")
    done, _ = finished_job(api, "alice")
    missing = str(uuid.uuid4())
    with api.as_("bob") as bob:
        for job_id in (job["id"], str(done.id)):
            for method, url in (("GET", f"/api/v1/jobs/{job_id}"), ("GET", f"/api/v1/jobs/{job_id}/events"),
                                ("POST", f"/api/v1/jobs/{job_id}/cancel"), ("POST", f"/api/v1/jobs/{job_id}/retry"),
                                ("GET", f"/api/v1/jobs/{job_id}/files/chr_20.zip")):
                theirs = bob.request(method, url)
                nobodys = bob.request(method, url.replace(job_id, missing))
                assert theirs.status_code == nobodys.status_code == 404
                assert theirs.json()["detail"].replace(job_id, "X") == nobodys.json()["detail"].replace(missing, "X")
        assert bob.get("/api/v1/jobs").json()["jobs"] == []
        assert bob.get("/api/v1/jobs", params={"owner": "alice"}).status_code == 403
        assert api.upload(bob, owner="alice").status_code == 403
    with api.as_("admin") as admin:
        assert admin.get(f"/api/v1/jobs/{job['id']}").status_code == 200
        assert {j["owner"] for j in admin.get("/api/v1/jobs").json()["jobs"]} == {"alice"}
        assert admin.get("/api/v1/jobs", params={"owner": "bob"}).json()["jobs"] == []
        made = api.upload(admin, owner="carol")
        assert made.status_code == 201 and made.json()["owner"] == "carol"


def test_a_revoked_token_is_refused_at_once(api: Api) -> None:
    [row] = [r for r in api.store.api_tokens.list() if r.owner == "bob"]
    with api.as_("bob") as bob:
        assert bob.get("/api/v1/jobs").status_code == 200
        assert api.store.api_tokens.revoke(row.id)
        assert bob.get("/api/v1/jobs").status_code == 401


# ------------------------------------------------------------------ creating jobs


def test_create_stores_the_job_as_show_prints_it(api: Api) -> None:
    job = created(api, name="from the portal", population="eur", password="Secret-pass-123")
    assert job["owner"] == "alice" and job["state"] == "pending" and job["name"] == "from the portal"
    assert job["has_password"] is True and "Secret-pass-123" not in repr(job) and "password" not in job
    [listed] = api.store.admin.list_jobs(owner="alice")
    stored = api.store.admin.get(listed.id)
    assert str(stored.id) == job["id"] and [Path(i.path).name for i in stored.inputs] == ["chr20.vcf.gz"]
    assert Path(stored.inputs[0].path).read_bytes() == (api.root / "inputs" / "chr20.vcf.gz").read_bytes()
    assert job["events"][0]["to"] == "pending"


def test_create_for_several_services_answers_the_group(api: Api) -> None:
    response = api.upload(api.as_("alice"), service=["mis", "mis"])
    assert response.status_code == 422 and "a service is named twice" in response.json()["detail"]


def test_a_bad_vcf_is_refused_with_the_preflights_message_and_nothing_is_stored(api: Api) -> None:
    bad = api.root / "inputs" / "broken.vcf.gz"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"not a vcf at all")
    response = api.upload(api.as_("alice"), [bad])
    assert response.status_code == 422
    problem = response.json()
    assert problem["errors"] and "broken.vcf.gz" in problem["detail"]
    assert problem["detail"] == "; ".join(problem["errors"])
    assert api.store.admin.list_jobs() == []
    assert list((api.root / "state" / "uploads").iterdir()) == []


def test_field_problems_name_the_apis_fields(api: Api) -> None:
    response = api.upload(api.as_("alice"), panel="nope", r2_filter="2")
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "panel nope" in detail and "r2_filter" in detail and "--" not in detail


def test_an_upload_over_the_limit_is_413(tmp_path: Path, sqlite_url: str) -> None:
    from support.api_support import make_api

    api, server = make_api(tmp_path, sqlite_url, max_upload_mb=1)
    try:
        big = api.root / "big.vcf.gz"
        big.write_bytes(b"\0" * (2 * 1024 * 1024))
        response = api.upload(api.as_("alice"), [big])
        assert response.status_code == 413 and response.json()["status"] == 413
        assert api.store.admin.list_jobs() == []
    finally:
        server.close()


def test_a_retried_post_returns_the_first_answer_and_makes_one_job(api_on_each_database: Api) -> None:
    api = api_on_each_database
    key = {"Idempotency-Key": "portal-request-1"}
    with api.as_("alice") as alice:
        first = api.upload(alice, headers=key)
        again = api.upload(alice, headers=key)
        assert first.status_code == again.status_code == 201
        assert first.text == again.text
        refused = api.upload(alice, headers={"Idempotency-Key": "portal-request-2"}, panel="nope")
        assert refused.status_code == 422
        assert api.upload(alice, headers={"Idempotency-Key": "portal-request-2"}).text == refused.text
    with api.as_("bob") as bob:  # keys are the owner's: bob's own key of the same name is a new job
        assert api.upload(bob, headers=key).json()["id"] != first.json()["id"]
    assert len(api.store.admin.list_jobs(owner="alice")) == 1


def test_concurrent_retries_make_one_job(api_on_each_database: Api) -> None:
    api = api_on_each_database
    key = {"Idempotency-Key": "same-click-twice"}

    def post() -> httpx.Response:
        with api.as_("alice") as alice:
            return api.upload(alice, headers=key)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: post(), range(6)))
    assert {a.status_code for a in answers} == {201}
    assert len({a.json()["id"] for a in answers}) == 1
    assert len(api.store.admin.list_jobs()) == 1


# ------------------------------------------------------------------ reading


def test_list_filters_and_pages_newest_first(api_on_each_database: Api) -> None:
    api = api_on_each_database
    ids = [created(api)["id"] for _ in range(5)]
    with api.as_("alice") as alice:
        seen, cursor = [], None
        while True:
            page = alice.get("/api/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
            seen += [j["id"] for j in page["jobs"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == ids[::-1]
        assert alice.get("/api/v1/jobs", params={"state": "completed"}).json()["jobs"] == []
        assert len(alice.get("/api/v1/jobs", params={"state": "pending,blocked", "service": "mis"}).json()["jobs"]) == 5
        assert alice.get("/api/v1/jobs", params={"group": ids[0]}).json()["jobs"][0]["id"] == ids[0]
        for bad in ({"limit": 501}, {"limit": 0}, {"state": "done"}, {"cursor": "!!"}, {"group": "x"}):
            assert alice.get("/api/v1/jobs", params=bad).status_code == 422, bad


def test_events_after_a_cursor(api: Api) -> None:
    job = created(api)
    with api.as_("alice") as alice:
        first = alice.get(f"/api/v1/jobs/{job['id']}/events").json()
        assert [e["to"] for e in first["events"]] == ["pending"]
        assert alice.get(f"/api/v1/jobs/{job['id']}/events", params={"after": first["next_cursor"]}).json() == {
            "events": [], "next_cursor": first["next_cursor"]}
        alice.post(f"/api/v1/jobs/{job['id']}/cancel")
        later = alice.get(f"/api/v1/jobs/{job['id']}/events", params={"after": first["next_cursor"]}).json()
        assert [(e["from"], e["to"]) for e in later["events"]] == [("pending", "cancelled")]


def test_cancel_and_retry_answer_409_when_the_state_does_not_allow_it(api: Api) -> None:
    job = created(api)
    done, _ = finished_job(api)
    with api.as_("alice") as alice:
        cancelled = alice.post(f"/api/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 202 and cancelled.json()["state"] == "cancelled"
        for url in (f"/api/v1/jobs/{job['id']}/cancel", f"/api/v1/jobs/{done.id}/cancel",
                    f"/api/v1/jobs/{done.id}/retry"):
            response = alice.post(url)
            assert response.status_code == 409, url
            assert response.headers["content-type"] == "application/problem+json"


def test_services_with_their_health_for_the_callers_owner(api: Api) -> None:
    api.store.services.ensure_services(["mis"])
    api.store.queue.block_owner("mis", "bob", "HTTP 401: token expired")
    with api.as_("alice") as alice, api.as_("bob") as bob:
        [mine] = alice.get("/api/v1/services").json()["services"]
        [bobs] = bob.get("/api/v1/services").json()["services"]
    assert (mine["name"], mine["owner"], mine["health"]) == ("mis", "alice", "ok")
    assert (bobs["health"], bobs["blocked"]) == ("blocked", "HTTP 401: token expired")


# ------------------------------------------------------------------ files


def test_a_file_is_streamed_with_its_sha256_as_etag_and_ranges(api: Api) -> None:
    job, body = finished_job(api)
    url = f"/api/v1/jobs/{job.id}/files/chr_20.zip"
    with api.as_("alice") as alice:
        whole = alice.get(url)
        assert whole.status_code == 200 and whole.content == body
        assert whole.headers["etag"].strip('"') == hashlib.sha256(body).hexdigest()
        part = alice.get(url, headers={"Range": "bytes=100-1099"})
        assert part.status_code == 206 and part.content == body[100:1100]
        assert part.headers["content-range"] == f"bytes 100-1099/{len(body)}"
        assert alice.get(url, headers={"If-None-Match": whole.headers["etag"]}).status_code == 304
        assert alice.get(url, headers={"Range": f"bytes={len(body) + 10}-"}).status_code == 416
        nested = alice.get(f"/api/v1/jobs/{job.id}/files/statistics/summary.txt")
        assert nested.status_code == 200 and nested.text == "ok\n"
        detail = alice.get(f"/api/v1/jobs/{job.id}").text  # the download URL and hash are the server's secrets
        assert "secret.example" not in detail and "hash-secret" not in detail and '"sha256"' in detail


@pytest.mark.parametrize("name", ["../../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd",
                                  "statistics/../../../../etc/hostname", "chr_20.zip/..", "CHR_20.ZIP",
                                  "escape.txt", "link.zip", "statistics%2F..%2F..%2F..%2Foutside.txt"])
def test_file_names_that_try_to_leave_the_jobs_folder_are_404(api: Api, name: str) -> None:
    job, _ = finished_job(api)
    result_dir = Path(job.result_dir)
    outside = api.root / "outside.txt"
    outside.write_text("secret outside\n")
    (result_dir / "link.zip").symlink_to(outside)
    with api.store._db.session() as session, session.begin():  # rows that point outside, however they got there
        session.add(JobOutput(job_id=job.id, name="escape.txt", url="u", state=OutputState.VERIFIED,
                              local_path=str(outside), sha256="0" * 64))
        session.add(JobOutput(job_id=job.id, name="link.zip", url="u", state=OutputState.VERIFIED,
                              local_path=str(result_dir / "link.zip"), sha256="0" * 64))
    # http.client sends the path as written: httpx would remove the dot segments before the server saw them.
    host, port = api.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", f"/api/v1/jobs/{job.id}/files/{name}",
                           headers={"Authorization": f"Bearer {api.tokens['alice']}"})
        response = connection.getresponse()
        text = response.read().decode("utf-8", "replace")
    finally:
        connection.close()
    assert response.status == 404, text
    assert "secret outside" not in text and "root:" not in text


# ------------------------------------------------------------------ the document


def test_the_openapi_document_lists_exactly_the_routes(api: Api) -> None:
    with api.client() as anonymous:
        served = anonymous.get("/api/v1/openapi.json")
    assert served.status_code == 200 and served.json() == document()
    app = create_app(api.config, api.store)
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/"):
            path = re.sub(r"<(?:\w+:)?(\w+)>", lambda m: "{id}" if m[1] == "job_id" else "{" + m[1] + "}", rule.rule)
            routes |= {(method.lower(), path) for method in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {(method, path) for path, item in document()["paths"].items() for method in item}
    assert documented == routes
    assert document()["openapi"] == "3.1.0"


def test_a_file_sent_where_none_is_taken_is_refused_and_nothing_is_written(api: Api) -> None:
    with api.client() as anonymous:
        response = anonymous.post("/login", files=[("token", ("x", b"y" * 1000))])
    assert response.status_code == 400
    assert not (api.root / "state" / "uploads").exists() or not any((api.root / "state" / "uploads").iterdir())


def test_the_dashboards_cookie_reads_but_never_acts(api: Api) -> None:
    job, body = finished_job(api)
    cookie = {"imputationd_token": api.tokens["alice"]}  # a submit token: only GETs may use it from the cookie
    with httpx.Client(base_url=api.url, cookies=cookie) as browser:
        assert browser.get(f"/api/v1/jobs/{job.id}/files/chr_20.zip").content == body
        assert browser.post(f"/api/v1/jobs/{job.id}/retry").status_code == 401
        assert api.upload(browser).status_code == 401


def test_a_file_many_times_the_decoders_chunk_is_streamed_to_disk(api: Api) -> None:
    vcf = api.vcf("chr20-big.vcf.gz", variants=60_000, seed=4)
    assert vcf.stat().st_size > 1024 * 1024  # many times the multipart decoder's read chunk (64 KiB)
    response = api.upload(api.as_("alice"), [vcf])
    assert response.status_code == 201, response.text
    [stored] = response.json()["inputs"]
    assert stored["size"] == vcf.stat().st_size
    assert stored["sha256"] == hashlib.sha256(vcf.read_bytes()).hexdigest()


def test_the_dashboards_jobs_list_says_when_it_shows_only_the_newest_and_links_to_the_older(api: Api) -> None:
    with api.store._db.session() as session, session.begin():
        for number in range(PAGE + 5):
            job_id = uuid.uuid4()
            session.add(Job(id=job_id, group_id=job_id, service="mis", owner="alice", panel="p", build="hg19",
                            name=f"job-{number:03}", state=JobState.FAILED))
        other = uuid.uuid4()
        session.add(Job(id=other, group_id=other, service="mis", owner="bob", panel="p", build="hg19",
                        state=JobState.FAILED))
    cookie = {"imputationd_token": api.tokens["alice_read"]}
    with httpx.Client(base_url=api.url, cookies=cookie) as browser:
        first = browser.get("/", params={"state": "failed"}).text
        rows = re.findall(r'data-job="([0-9a-f-]+)"', first)
        assert len(rows) == PAGE
        assert f"Showing {PAGE} of {PAGE + 5} jobs, the newest." in first
        older = re.search(r'<a href="\?([^"]+)" id="older">', first)
        assert older is not None and "state=failed" in older.group(1)
        second = browser.get("/?" + older.group(1).replace("&amp;", "&")).text
    rest = re.findall(r'data-job="([0-9a-f-]+)"', second)
    assert len(rest) == 5 and not set(rest) & set(rows)
    assert str(other) not in rows + rest
    assert 'id="older"' not in second and "← Newest jobs" in second


@pytest.mark.parametrize(("host", "forwarded", "logs_in"), [
    ("dash.example.org:8470", None, False),  # plain http to another machine: the Secure cookie would never return
    ("dash.example.org", "https", True),  # behind a TLS proxy
    ("127.0.0.1:8470", None, True),  # browsers send Secure cookies to loopback over http
    ("[::1]:8470", None, True),
    ("localhost:8470", None, True),
])
def test_a_login_whose_secure_cookie_would_never_come_back_says_so(api: Api, host: str, forwarded: str | None,
                                                                    logs_in: bool) -> None:
    secure = dataclasses.replace(api.config, api=dataclasses.replace(api.config.api, secure_cookie=True))
    browser = create_app(secure, api.store).test_client()
    headers = {"Host": host} | ({"X-Forwarded-Proto": forwarded} if forwarded else {})
    response = browser.post("/login", data={"token": api.tokens["alice_read"]}, headers=headers)
    if logs_in:
        assert response.status_code == 302
        assert "Secure" in response.headers["Set-Cookie"]
    else:
        assert response.status_code == 400 and "Set-Cookie" not in response.headers
        assert "sent over HTTPS only (api.secure_cookie)" in response.get_data(as_text=True)


@pytest.mark.parametrize(("hops", "logged"), [(0, "10.0.0.2"), (1, "203.0.113.9")])
def test_the_client_behind_a_configured_proxy_is_named_in_the_logs(api: Api, hops: int, logged: str) -> None:
    proxied = dataclasses.replace(api.config, api=dataclasses.replace(api.config.api, proxy_hops=hops,
                                                                      secure_cookie=True))
    proxy = create_app(proxied, api.store).test_client()
    forwarded = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https", "Host": "dash.example.org"}
    with capture_logs() as logs:
        proxy.get("/api/v1/jobs", headers={**forwarded, "Authorization": "Bearer imd_0_x"},
                  environ_base={"REMOTE_ADDR": "10.0.0.2"})
    [line] = [entry for entry in logs if entry["event"] == "api_auth_failed"]
    assert line["remote"] == logged  # without proxy_hops, a client's own X-Forwarded-For is not believed
    login = proxy.post("/login", data={"token": api.tokens["alice_read"]}, headers=forwarded,
                       environ_base={"REMOTE_ADDR": "10.0.0.2"})
    assert login.status_code == 302 and "Secure" in login.headers["Set-Cookie"]


def test_an_admin_picks_whose_services_the_dashboard_shows(api: Api) -> None:
    created(api, "alice")
    created(api, "bob")
    with httpx.Client(base_url=api.url, cookies={"imputationd_token": api.tokens["admin"]}) as admin:
        page = admin.get("/services").text
        assert re.findall(r'<option value="([^"]+)"', page) == ["alice", "bob", "ops"]
        assert "for bob" in admin.get("/services", params={"owner": "bob"}).text
    with httpx.Client(base_url=api.url, cookies={"imputationd_token": api.tokens["alice_read"]}) as alice:
        page = alice.get("/services", params={"owner": "bob"}).text
    assert "for alice" in page and "<option" not in page  # an owner sees only their own
