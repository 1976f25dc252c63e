"""The dashboard in a real headless browser: Debian's chromium driven through its chromedriver (never a browser
that downloads itself). A person logs in with a token, sees their own jobs and the counts by state, filters them,
opens a job's timeline (state, files, QC, history), looks at the services, and logs out."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.api_support import Api
from support.prerequisites import require_tool

from daemon.db.models import Job, JobEvent, JobOutput
from daemon.states import JobState, OutputState

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    require_tool(os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK),
                 "Debian's chromium and its driver", "apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                     f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900"):
        options.add_argument(argument)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # chromium refuses to run its sandbox as root
    # The explicit driver path keeps Selenium Manager from looking for (or downloading) a browser or driver.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER,
                                                               log_output=str(tmp_path / "chromedriver.log")))
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def finished_job(api: Api, owner: str) -> Job:
    job_id = uuid.uuid4()
    result_dir = api.root / "state" / "results" / str(job_id)
    result_dir.mkdir(parents=True)
    body = b"imputed dosages\n" * 100
    (result_dir / "chr_20.zip").write_bytes(body)
    with api.store._db.session() as session, session.begin():
        job = Job(id=job_id, group_id=job_id, service="mis", owner=owner, panel="1000g-phase3", build="hg19",
                  name="finished <b>study</b>", state=JobState.COMPLETED, result_dir=str(result_dir),
                  remote_id="job-20261205-1", remote_state="SUCCESS",
                  qc={"reference_overlap": 99.1, "matched": 1000, "warnings": ["12 duplicated sites"]})
        job.outputs = [JobOutput(name="chr_20.zip", url="https://server.example/share/secret-hash/chr_20.zip",
                                 remote_hash="secret-hash", state=OutputState.VERIFIED,
                                 local_path=str(result_dir / "chr_20.zip"), size=len(body),
                                 sha256=hashlib.sha256(body).hexdigest())]
        job.events = [JobEvent(from_state=None, to_state="pending", reason="submitted"),
                      JobEvent(from_state="pending", to_state="submitting", reason="slot free on service"),
                      JobEvent(from_state="submitting", to_state="queued", reason="submitted as job-20261205-1"),
                      JobEvent(from_state="queued", to_state="downloading", reason="remote job finished"),
                      JobEvent(from_state="downloading", to_state="completed", reason="1 file downloaded")]
        session.add(job)
    return api.store.admin.get(job_id, with_events=True)


def text_of(driver, css: str) -> str:  # type: ignore[no-untyped-def]
    """The text of the first element `css` finds, waiting for the page that has it (a click that submits a form
    returns before the next page is there)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 10).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css)))
    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def wait_for_url(driver, url: str) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 10).until(expected_conditions.url_to_be(url))


def rows(driver, css: str) -> list[list[str]]:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    return [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
            for row in driver.find_elements(By.CSS_SELECTOR, css)]


def log_in(driver, url: str, token: str) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    driver.get(url + "/login")
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()


def test_a_person_logs_in_sees_their_jobs_opens_one_and_logs_out(api: Api, browser) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = browser
    with api.as_("alice") as alice, api.as_("bob") as bob:
        pending = [api.upload(alice, name=f"alice study {i}").json() for i in range(2)]
        api.upload(bob, name="bob's secret study")
    done = finished_job(api, "alice")

    driver.get(api.url + "/")
    assert driver.current_url.startswith(api.url + "/login")  # nobody is logged in: the form, no jobs

    log_in(driver, api.url, "imd_0123456789ab_wrong")
    assert text_of(driver, "[role=alert]") == "That token is not valid."
    assert not driver.find_elements(By.ID, "jobs")

    log_in(driver, api.url, api.tokens["alice_read"])
    wait_for_url(driver, api.url + "/")
    table = rows(driver, "#jobs tbody tr[data-job]")
    names = [row[1] for row in table]
    assert sorted(names) == sorted(["alice study 0", "alice study 1", "finished <b>study</b>"])  # escaped, as typed
    assert "bob" not in driver.page_source
    assert {row[3] for row in table} == {"alice"}
    counts = text_of(driver, "#counts")
    assert "2 active" in counts and "pending: 2" in counts and "completed: 1" in counts
    assert driver.find_element(By.CSS_SELECTOR, "meta[http-equiv=refresh]").get_attribute("content") == "10"

    Select(driver.find_element(By.NAME, "state")).select_by_value("completed")
    driver.find_element(By.CSS_SELECTOR, "form.filters button").click()
    wait_for_url(driver, api.url + "/?state=completed&service=")
    assert [row[1] for row in rows(driver, "#jobs tbody tr[data-job]")] == ["finished <b>study</b>"]

    driver.find_element(By.CSS_SELECTOR, f"tr[data-job='{done.id}'] a").click()
    wait_for_url(driver, f"{api.url}/jobs/{done.id}")
    assert text_of(driver, "#state") == "completed"
    [file_row] = rows(driver, "#files tbody tr")
    assert file_row[:3] == ["chr_20.zip", "verified", str(done.outputs[0].size)]
    assert file_row[3] == done.outputs[0].sha256
    assert [row[2] for row in rows(driver, "#history tbody tr")] == [
        "pending", "submitting", "queued", "downloading", "completed"]
    assert text_of(driver, "#qc") == "reference overlap 99.1 %, 1,000 SNPs matched, 1 warning"
    assert "12 duplicated sites" in driver.page_source
    assert "secret-hash" not in driver.page_source and "server.example" not in driver.page_source

    driver.find_element(By.LINK_TEXT, "chr_20.zip").click()  # the file through the API, with the login cookie
    driver.get(f"{api.url}/jobs/{pending[0]['id']}")
    assert text_of(driver, "#state") == "pending"

    cookies = {c["name"]: c for c in driver.get_cookies()}
    assert cookies["imputationd_token"]["httpOnly"] is True
    assert cookies["imputationd_token"]["sameSite"] == "Strict"
    assert api.tokens["alice_read"] not in driver.page_source

    driver.get(api.url + "/services")
    [service] = rows(driver, "#services tbody tr")
    assert service[:3] == ["mis", "cloudgene", "ok"] and "pending 2" in service[4]

    with api.as_("bob") as bob:  # another owner's job is not found, exactly like no job at all
        theirs = bob.get("/api/v1/jobs").json()["jobs"][0]["id"]
    driver.get(f"{api.url}/jobs/{theirs}")
    assert "Not found" in driver.page_source and "bob" not in driver.page_source

    driver.get(api.url + "/")
    driver.find_element(By.CSS_SELECTOR, "header form button").click()
    wait_for_url(driver, api.url + "/login")
    driver.get(api.url + "/")
    assert driver.current_url.startswith(api.url + "/login")
