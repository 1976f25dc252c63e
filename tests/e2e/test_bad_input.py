"""Bad input, through the real console script and the real daemon.

- Malformed configs (`check-config`, `run`, `submit`) and bad command-line arguments: exit code 2, a clear error
  naming the key path or the argument, one line per problem, no traceback, no secret echoed.
- `submit` with input files a server would reject late (not VCF, not compressed, plain gzip, empty, missing, wrong
  `chr` prefix for the build, mixed chromosomes, too few samples, a huge sparse file over the upload limit, one bad
  file among good ones): exit 2 naming the file and the fix — and nothing stored in the database.
- Hostile result file names served by the simulator (`../x`, `/etc/x`, NUL, backslash, a control character): the
  file is refused with a clear error, nothing is written outside the job's result directory (the file system is
  checked), the daemon keeps running.

The CLI calls run a few at a time (each is a Python start-up); figures are printed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.server
import os
import ssl
import subprocess
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from support.chaos_support import partial_files, report, rows
from support.daemon_harness import (
    PANEL,
    PANEL_ID,
    DaemonConfig,
    DaemonProcess,
    JobDB,
    create_jobs,
    imputationd_command,
    migrate,
    sample_vcf,
    simulator,
)
from support.tls_support import self_signed_certificate

from daemon.config import ServiceConfig
from daemon.db.models import Job, JobEvent, JobInput, JobOutput
from daemon.services.cloudgene import CloudgeneAdapter
from daemon.services.errors import Transient
from daemon.simulator.results import ResultFile
from daemon.simulator.vcf import sample_records, write_sample_vcf, write_vcf

SECRET_IN_YAML = "yaml-secret-value-1234"
DB_PASSWORD = "db-password-5678"


@dataclass
class Run:
    argv: Sequence[str]
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"$ imputationd {' '.join(self.argv)}\n-> exit {self.code}\nstdout: {self.out}\nstderr: {self.err}"


def cli(argv: Sequence[str], cwd: Path) -> Run:
    env = {k: v for k, v in os.environ.items() if k not in ("IMPUTATIOND_CONFIG", "NOTIFY_SOCKET")}
    done = subprocess.run([*imputationd_command(), *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    return Run(list(argv), done.returncode, done.stdout, done.stderr)


def cli_many(calls: Sequence[Sequence[str]], cwd: Path) -> list[Run]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda argv: cli(argv, cwd), calls))


def assert_clear_usage_error(run: Run, *needles: str) -> None:
    """Exit 2; our errors are `imputationd: …` lines, argparse's end in one `error:` line; every needle is in
    the error text; no traceback; no secret."""
    assert run.code == 2, str(run)
    text = run.out + run.err
    assert "Traceback" not in text, str(run)
    assert SECRET_IN_YAML not in text and DB_PASSWORD not in text, str(run)
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert lines, str(run)
    if any(line.startswith("usage:") for line in lines):
        errors = [line for line in lines if ": error: " in line]
        assert len(errors) == 1, str(run)
    else:
        errors = lines
        assert all(line.startswith("imputationd: ") for line in lines), str(run)
    joined = "\n".join(errors)
    for needle in needles:
        assert needle in joined, f"{needle!r} not in the error:\n{run}"


# ---------------------------------------------------------------------------------------------------- configs


CONFIGS: dict[str, tuple[str | bytes | None, tuple[str, ...]]] = {
    # name: (file content (None: no file), what the error must name)
    "yaml_syntax": ("services: [\n", ("line 2, column 1",)),
    "unknown_key": ("scheduler:\n  wokers: 3\n", ("scheduler.wokers", "did you mean 'workers'")),
    "wrong_type": ("scheduler:\n  workers: many\n", ("scheduler.workers", "integer")),
    "lease_too_short": ("scheduler:\n  lease_seconds: 1\n", ("scheduler.lease_seconds",)),
    "service_incomplete": ("services:\n  m: {}\n", ("services.m.type: required", "services.m.base_url: required")),
    "secret_in_yaml": (f"services:\n  m:\n    type: cloudgene\n    base_url: https://x.org\n"
                       f"    token: {SECRET_IN_YAML}\n", ("services.m.token",)),
    "bad_values": ("services:\n  n:\n    type: cloudgene\n    base_url: ftp://x\n    token_file: t\n"
                   "    poll_interval: -1\nlogging: {level: loud}\n",
                   ("services.n.base_url", "services.n.poll_interval", "logging.level")),
    "plain_postgres_url": (f"database: {{url: 'postgresql://u:{DB_PASSWORD}@h/db'}}\n",
                           ("database.url", "postgresql+psycopg://")),
    "top_level_list": ("- a\n- b\n", ("(top level)",)),
    "duplicate_key": ("scheduler:\n  workers: 2\n  workers: 3\n", ("duplicate key 'workers'",)),
    "not_utf8": (b"scheduler: {workers: \xff}\n", ("not UTF-8",)),
    "missing_file": (None, ("cannot read", "No such file")),
    "no_service": ("services: {}\n", ("services: no service configured",)),
    "plain_http": ("services:\n  m:\n    type: cloudgene\n    base_url: http://imputation.example.org\n"
                   "    token_file: t\n", ("services.m.base_url: plain http:// to imputation.example.org",
                                          "allow_plain_http: true")),
    "deep_nesting": ("scheduler: " + "[" * 5000 + "]" * 5000 + "\n", ("line 1, column 75: nested more than 64",)),
    "alias_bomb": (
        "services:\n  m:\n    type: wes\n    base_url: https://x.org\n    token_env: T\n    wes:\n"
        "      {workflow_url: m, workflow_type: NFL, workflow_type_version: '1', workflow_params: {\n"
        + "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol],\n"
        + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}],\n" for i in range(1, 10)) + "}}\n",
        ("values once its aliases are expanded",),
    ),
}


def test_malformed_configs_exit_2_with_key_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    calls, expect = [], []
    for name, (content, needles) in CONFIGS.items():
        path = tmp_path / f"{name}.yaml"
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content, encoding="utf-8")
        commands = [["check-config"], ["run"]]
        if name in ("yaml_syntax", "unknown_key", "secret_in_yaml"):  # every command loads the config the same way
            commands.append(["submit", "--service", "m", "--panel", "p", "--build", "hg19", "x.vcf.gz"])
        for command in commands:
            calls.append([*command, "-c", str(path)])
            expect.append((name, needles))
    calls.append(["run", "-c", str(tmp_path)])  # a directory
    expect.append(("directory", ("Is a directory",)))
    runs = cli_many(calls, tmp_path)
    for run, (name, needles) in zip(runs, expect, strict=True):
        assert_clear_usage_error(run, *needles)
        assert run.out == "", f"{name}: nothing on stdout\n{run}"
    longest = max(len(line) for run in runs for line in run.err.splitlines())
    report("bad input: malformed configs", {
        "configs": len(CONFIGS) + 1,
        "CLI calls (check-config and run each; submit for 3)": len(runs),
        "exit codes": sorted({r.code for r in runs}),
        "error lines / longest (chars)": f"{sum(len(r.err.splitlines()) for r in runs)} / {longest}",
        "tracebacks": sum("Traceback" in r.out + r.err for r in runs),
    }, capsys)


def test_check_config_refuses_a_token_file_every_user_can_read(tmp_path: Path) -> None:
    token = tmp_path / "m.token"
    token.write_text(SECRET_IN_YAML + "\n", encoding="utf-8")
    token.chmod(0o644)
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{state_dir: {tmp_path / 'state'}}}\n"
                      "services:\n  m:\n    type: cloudgene\n    base_url: https://x.org\n    token_file: m.token\n")
    run = cli(["check-config", "-c", str(config)], tmp_path)
    assert_clear_usage_error(run, f"services.m.token_file: {token} can be read by every user of this machine "
                                  "(mode 0644); chmod o-rwx it")
    token.chmod(0o600)
    run = cli(["check-config", "-c", str(config)], tmp_path)
    assert run.code == 0 and run.out.startswith(f"{config}: OK"), str(run)


# ---------------------------------------------------------------------------------------------------- TLS


class _Empty(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def loopback_server(certificate: tuple[Path, Path] | None) -> Iterator[int]:
    """A server on 127.0.0.1 answering `{}` to every GET, over TLS with `certificate` when given; yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Empty)
    if certificate is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*certificate)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def status_error(base_url: str) -> str:
    adapter = CloudgeneAdapter(ServiceConfig(name="m", type="cloudgene", base_url=base_url, timeout=10.0),
                               token=lambda: "token-abcdefgh")
    try:
        with pytest.raises(Transient) as raised:
            adapter.status("job-1")
    finally:
        adapter.close()
    assert raised.value.kind == "connection"
    return raised.value.message


def test_a_certificate_no_ca_vouches_for_is_named_a_tls_certificate_problem(tmp_path: Path) -> None:
    certificate = self_signed_certificate(tmp_path)
    with loopback_server(certificate) as port:
        # The server itself works: a client that trusts this certificate gets its answer.
        with httpx.Client(verify=ssl.create_default_context(cafile=str(certificate[0]))) as trusting:
            assert trusting.get(f"https://127.0.0.1:{port}/x").json() == {}
        message = status_error(f"https://127.0.0.1:{port}")
    assert message == ("GET /jobs/job-1/status: TLS certificate verification failed for 127.0.0.1: "
                       "self-signed certificate")


def test_https_to_a_plain_http_server_is_named_a_tls_problem(tmp_path: Path) -> None:
    with loopback_server(None) as port:
        message = status_error(f"https://127.0.0.1:{port}")
    assert message.startswith("GET /jobs/job-1/status: TLS handshake with 127.0.0.1 failed: "), message


# ---------------------------------------------------------------------------------------------------- arguments, files


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid config on a migrated SQLite database with one service `sim` (panel `1000g-phase3`, 20–50,000
    samples, 5000 MB upload limit), and a directory of input files."""
    root = tmp_path_factory.mktemp("site")
    (root / "sim.token").write_text("token\n", encoding="utf-8")
    (root / "config.yaml").write_text(
        f"storage: {{state_dir: {root / 'state'}}}\n"
        "services:\n  sim:\n    type: cloudgene\n    base_url: http://127.0.0.1:9\n    token_file: sim.token\n"
        f"    panels: {{{PANEL}: {{id: '{PANEL_ID}', builds: [hg19, hg38]}}}}\n",
        encoding="utf-8",
    )
    migrate(f"sqlite:///{root / 'state' / 'imputationd.db'}")
    return root


def _db_counts(site: Path) -> dict[str, int]:
    db = JobDB(f"sqlite:///{site / 'state' / 'imputationd.db'}")
    try:
        return {t.name: len(rows(db, t)) for t in (Job.__table__, JobInput.__table__, JobEvent.__table__,
                                                     JobOutput.__table__)}
    finally:
        db.close()


def test_bad_arguments_exit_2_naming_the_argument(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ["-c", str(site / "config.yaml")]
    good = str(sample_vcf(site / "inputs", samples=25))
    cases = [
        (["submit", *cfg, "--panel", PANEL, "--build", "hg19", good], ("--service",)),
        (["submit", *cfg, "--service", "sim", "--panel", PANEL, "--build", "hg20", good], ("--build", "hg20")),
        (["submit", *cfg, "--service", "sim", "--panel", PANEL, "--build", "hg19", "--r2-filter", "1.5", good],
         ("--r2-filter: must be a number from 0 to below 1", "got '1.5'")),
        (["submit", *cfg, "--service", "sim", "--panel", PANEL, "--build", "hg19", "--phasing", "beagle", good],
         ("--phasing beagle: panel '1000g-phase3' on 'sim' offers eagle, no_phasing",)),
        (["submit", *cfg, "--service", "sim", "--panel", PANEL, "--build", "hg19", "--password", "a",
          "--password-file", "f", good], ("--password-file", "not allowed with")),
        (["submit", *cfg, "--service", "sim", "--panel", PANEL, "--build", "hg19"], ("FILE",)),
        (["submit", *cfg, "--service", "nosuch", "--panel", PANEL, "--build", "hg19", good],
         ("--service nosuch", "not a configured service")),
        (["submit", *cfg, "--service", "sim", "--panel", "nosuch", "--build", "hg19", good], ("--panel nosuch",)),
        (["submit", *cfg, "--service", "sim", "--panel", PANEL, "--build", "hg19", "--password-file",
          str(site / "no-such-password"), good], ("--password-file", "No such file")),
        (["jobs", *cfg, "--limit", "abc"], ("--limit", "abc")),
        (["jobs", *cfg, "--status", "bogus"], ("--status bogus",)),
        (["show", *cfg], ("ID",)),
        (["frobnicate"], ("frobnicate",)),
    ]
    runs = cli_many([argv for argv, _ in cases], site)
    for run, (_, needles) in zip(runs, cases, strict=True):
        assert_clear_usage_error(run, *needles)
    counts = _db_counts(site)
    assert not any(counts.values()), counts
    report("bad input: command-line arguments", {
        "calls": len(runs), "exit codes": sorted({r.code for r in runs}), "rows stored": counts,
    }, capsys)


def test_submit_refuses_passwords_and_names_it_could_not_keep(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A password the Cloudgene adapter would refuse after the upload, a name that is not one printable line or
    does not fit its column: exit 2 at once, the password never echoed, nothing stored."""
    base = ["submit", "-c", str(site / "config.yaml"), "--service", "sim", "--panel", PANEL, "--build", "hg19"]
    good = str(sample_vcf(site / "inputs", samples=25))
    cases = {
        "ampersand": (["--password", "fish&chips"], ("--password", "& < >"), "fish&chips"),
        "quote": (["--password", 'say"cheese'], ("--password", "& < >"), 'say"cheese'),
        "non-ASCII": (["--password", "pässwört"], ("--password", "ASCII"), "pässwört"),
        "line break": (["--name", "batch 1\nrm -rf"], ("--name", "a line break"), None),
        "terminal escape": (["--name", "\x1b]0;owned\x07"], ("--name", "a terminal escape", "\\x1b"), None),
        "control character": (["--name", "bell\x07"], ("--name", "a control character"), None),
        "too long": (["--name", "n" * 201], ("--name", "at most 200 characters, got 201"), None),
    }
    runs = cli_many([[*base, *extra, good] for extra, _, _ in cases.values()], site)
    for run, (name, (_, needles, secret)) in zip(runs, cases.items(), strict=True):
        assert_clear_usage_error(run, *needles)
        assert run.out == "", f"{name}\n{run}"
        assert "\x1b" not in run.err and "\x07" not in run.err, f"{name}\n{run}"
        if secret is not None:
            assert secret not in run.err, f"{name}: the password is echoed\n{run}"
    counts = _db_counts(site)
    assert not any(counts.values()), counts


def _bad_inputs(directory: Path) -> dict[str, tuple[list[str], str, tuple[str, ...]]]:
    """name -> (files, build, what the message must say besides the file's name)."""
    directory.mkdir(parents=True, exist_ok=True)
    good = write_sample_vcf(directory / "good-chr20.vcf.gz", chromosome="20", samples=25, variants=50)
    samples = [f"S{n}" for n in range(25)]
    (directory / "not-a-vcf.vcf.gz").write_text("hello, this is not a VCF\n", encoding="utf-8")
    (directory / "picture.vcf.gz").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    write_vcf(directory / "uncompressed.vcf", samples=samples, compression="none",
              records=sample_records("20", samples=25, variants=20))
    write_vcf(directory / "plain-gzip.vcf.gz", samples=samples, compression="gzip",
              records=sample_records("20", samples=25, variants=20))
    (directory / "empty.vcf.gz").write_bytes(b"")
    write_sample_vcf(directory / "hg19-style.vcf.gz", chromosome="21", build="hg19", samples=25, variants=20)
    write_vcf(directory / "mixed.vcf.gz", samples=samples, records=[
        *sample_records("21", samples=25, variants=10), *sample_records("22", samples=25, variants=10)])
    write_sample_vcf(directory / "few-samples.vcf.gz", chromosome="22", samples=5, variants=20)
    huge = write_sample_vcf(directory / "huge.vcf.gz", chromosome="19", samples=25, variants=20)
    os.truncate(huge, 5001 * 1024 * 1024)  # sparse: costs no disk
    return {
        "not a VCF": (["not-a-vcf.vcf.gz"], "hg19", ("bgzip",)),
        "binary": (["picture.vcf.gz"], "hg19", ("bgzip",)),
        "uncompressed": (["uncompressed.vcf"], "hg19", ("*.vcf.gz", "bgzip")),
        "plain gzip, not BGZF": (["plain-gzip.vcf.gz"], "hg19", ("plain gzip", "bgzip")),
        "empty": (["empty.vcf.gz"], "hg19", ("is empty",)),
        "missing": (["no-such-file.vcf.gz"], "hg19", ("no such file",)),
        "no chr prefix for hg38": (["hg19-style.vcf.gz"], "hg38", ("'chr' prefix", "bcftools annotate")),
        "mixed chromosomes": (["mixed.vcf.gz"], "hg19", ("one file per chromosome",)),
        "too few samples": (["few-samples.vcf.gz"], "hg19", ("5 samples", "20")),
        "over the upload limit (sparse 5001 MB)": (["huge.vcf.gz"], "hg19", ("5000 MB", "several jobs")),
        "one bad file among good ones": ([good.name, "mixed.vcf.gz"], "hg19", ("one file per chromosome",)),
    }


def test_submit_refuses_bad_input_files_and_stores_nothing(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = site / "bad-inputs"
    cases = _bad_inputs(inputs)
    calls = [["submit", "-c", str(site / "config.yaml"), "--service", "sim", "--panel", PANEL, "--build", build,
              *files] for files, build, _ in cases.values()]
    runs = cli_many(calls, inputs)
    figures = {}
    for run, (name, (files, _, needles)) in zip(runs, cases.items(), strict=True):
        assert_clear_usage_error(run, *needles)
        bad = files[-1]
        assert any(bad in line and any(n in line for n in needles) for line in run.err.splitlines()), \
            f"{name}: no line names {bad} with its fix\n{run}"
        line = next(line for line in run.err.splitlines() if bad in line and any(n in line for n in needles))
        figures[name] = f"exit {run.code}: " + line.removeprefix("imputationd: ").replace(f"{inputs}/", "")[:150]
    counts = _db_counts(site)
    figures["rows stored (jobs, inputs, events, outputs)"] = counts
    report("bad input: submit refuses bad files", figures, capsys)
    assert not any(counts.values()), counts


# ---------------------------------------------------------------------------------------------------- hostile names


HOSTILE = {
    "parent": "../x",
    "absolute": "/etc/x",
    "nul": "x\x00y",
    "backslash": "..\\x",
    "control": "stat\x01x.txt",
}


def test_hostile_remote_file_names_are_refused(tmp_path: Path, sqlite_url: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Each job's server answer lists one hostile file name beside the normal files. The adapter refuses the
    answer for `..`, absolute, NUL and backslash names (the job fails saying which name); the download step refuses
    names it cannot store safely (a control character): that file fails, the others are downloaded. Nothing is
    written outside the result directory."""
    etc_x_before = Path("/etc/x").exists()
    with simulator() as sim:
        cfg = DaemonConfig(tmp_path / "site", sqlite_url, sim, poll_interval=0.2)
        config_path = cfg.write()
        evil_payload = tmp_path / "payload.txt"
        evil_payload.write_bytes(b"written by a hostile server\n")
        ids = create_jobs(cfg, len(HOSTILE))
        hostile_of = dict(zip(ids, HOSTILE.values(), strict=True))

        # Every new remote job gets its hostile file before it can finish (the files are published at SUCCESS).
        original_add_job = sim.sim.add_job

        def add_job(**kwargs):  # type: ignore[no-untyped-def]
            job = original_add_job(**kwargs)
            name = hostile_of[uuid.UUID(kwargs["raw_name"])]
            job.results.append(ResultFile("statistics", name, evil_payload, evil_payload.stat().st_size,
                                          "0" * 64))
            return job

        sim.sim.add_job = add_job  # type: ignore[method-assign]
        with DaemonProcess(config_path, name="hostile") as daemon:
            db = JobDB(sqlite_url)
            try:
                db.wait_states(ids, {"failed", "completed"}, timeout=60, also=daemon.require_alive)
                assert daemon.terminate() == 0
                jobs = {j.id: j for j in db.jobs(ids)}
                outputs = {i: db.outputs(i) for i in ids}
            finally:
                db.close()
        figures = {}
        for job_id, name in hostile_of.items():
            job = jobs[job_id]
            shown = repr(name)[1:-1]
            assert job.state.value == "failed", (name, job.state, job.error)
            assert shown in (job.error or "") or any(shown in (o.error or "") for o in outputs[job_id]), \
                (name, job.error, [(o.name, o.error) for o in outputs[job_id]])
            texts = [job.error or "", *(o.error or "" for o in outputs[job_id])]
            assert not any(ch < " " for text in texts for ch in text), f"raw control characters stored: {texts}"
            stored = [o for o in outputs[job_id] if o.local_path]
            for output in stored:
                assert Path(output.local_path).resolve().is_relative_to(Path(job.result_dir).resolve())
            refused = [o for o in outputs[job_id] if o.state.value == "failed"]
            figures[repr(name)] = (f"job failed; {len(stored)} other files downloaded; error: "
                                   + (refused[0].error if refused else job.error or "")[:100])
        daemon.assert_clean(allow_errors={"job_state", "download_failed"})

    # Nothing was written outside the result directories: no file anywhere under the test's tree (or /etc/x) has a
    # hostile name's last component or the hostile file's bytes, and the result dirs hold only verified files.
    results = cfg.results_dir.resolve()
    payload = evil_payload.read_bytes()
    strays = [p for p in tmp_path.rglob("*") if p.is_file() and p != evil_payload
              and (p.name in ("x", "y", "x\x00y", "..\\x") or p.read_bytes() == payload)]
    assert not strays, strays
    assert Path("/etc/x").exists() == etc_x_before
    assert not partial_files(results)
    figures["hostile files written anywhere"] = len(strays)
    report("bad input: hostile remote file names", figures, capsys)
