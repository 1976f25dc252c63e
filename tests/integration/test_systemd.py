"""daemon.systemd (sd_notify over a real datagram socket) and the unit file: directives, systemd-analyze security
and verify, and our runtime stack under the unit's seccomp filter and MemoryDenyWriteExecute."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from support.prerequisites import require_tool
from support.tls_support import self_signed_certificate

from daemon import systemd
from daemon.config import SchedulerConfig
from daemon.services.http import ANSWER_LIMIT

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "imputationd.service"
DROPIN = REPO / "systemd" / "imputationd-postgresql.conf"
INSTALLED_EXEC = "/opt/imputationd/venv/bin/imputationd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.fixture
def _systemd_analyze() -> None:
    require_tool(SYSTEMD_ANALYZE is not None, "systemd-analyze", "apt-get install systemd")


needs_analyze = pytest.mark.usefixtures("_systemd_analyze")


# --- sd_notify -------------------------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(monkeypatch) -> Iterator[socket.socket]:
    """A real AF_UNIX datagram socket, bound in a short temp dir (sun_path holds 108 bytes), as $NOTIFY_SOCKET."""
    directory = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()
    shutil.rmtree(directory)


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_status_stopping_watchdog_reach_the_socket(notify_socket):
    assert systemd.ready("3 services, 0 jobs running")
    assert received(notify_socket) == ["READY=1", "STATUS=3 services, 0 jobs running"]
    assert systemd.status("2 jobs\nrunning")
    assert received(notify_socket) == ["STATUS=2 jobs running"]  # a newline would start a new assignment
    assert systemd.watchdog()
    assert received(notify_socket) == ["WATCHDOG=1"]
    assert systemd.stopping()
    assert received(notify_socket) == ["STOPPING=1"]
    assert systemd.notify("READY=1", "STATUS=x", "MAINPID=1")
    assert received(notify_socket) == ["READY=1", "STATUS=x", "MAINPID=1"]


def test_reloading_carries_a_monotonic_timestamp(notify_socket):
    assert systemd.reloading("reloading config")
    reloading, monotonic, status = received(notify_socket)
    assert reloading == "RELOADING=1" and status == "STATUS=reloading config"
    assert re.fullmatch(r"MONOTONIC_USEC=\d+", monotonic)


def test_abstract_namespace_socket(monkeypatch):
    name = f"imputationd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.ready()
        assert received(sock) == ["READY=1"]


def test_no_op_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready("x") is False
    assert systemd.watchdog() is False
    assert systemd.stopping() is False


@pytest.mark.parametrize("where", ["/nonexistent/dir/notify", "@imputationd-nobody-listens-here", "vsock:2:1234"])
def test_send_failure_never_raises_and_is_logged_once_at_debug(monkeypatch, where):
    monkeypatch.setenv("NOTIFY_SOCKET", where)
    monkeypatch.setattr(systemd, "_failure_logged", False)
    with structlog.testing.capture_logs() as logs:
        assert systemd.ready() is False
        assert systemd.watchdog() is False
    assert [(entry["event"], entry["log_level"]) for entry in logs] == [("sd_notify_failed", "debug")]
    assert logs[0]["error_kind"] == "sd_notify"


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "other", None),
        ("1000000", None, 0.5),
        (None, None, None),
        ("0", None, None),
        ("abc", None, None),
        ("-5", None, None),
        ("30000000", "xyz", None),
    ],
)
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(value, value)
            monkeypatch.setenv(name, value)
    assert systemd.watchdog_interval() == expected


# --- the unit file ---------------------------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value in order (systemd keys may repeat). No continuation lines are used."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"line {number}: continuation lines are not expected"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"line {number}: {raw!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|min|ms)?", value)
    assert match, value
    return float(match[1]) * {"s": 1, None: 1, "min": 60, "ms": 0.001}[match[2]]


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


REQUIRED_SERVICE = {
    "Type": "notify",
    "NotifyAccess": "main",
    "ExecStart": f"{INSTALLED_EXEC} run",
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "Restart": "on-failure",
    "TimeoutStopSec": "15s",
    "DynamicUser": "yes",
    "StateDirectory": "imputationd",
    "CacheDirectory": "imputationd",
    "ConfigurationDirectory": "imputationd",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "PrivateUsers": "yes",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "SystemCallArchitectures": "native",
    "SystemCallErrorNumber": "EPERM",
    "MemoryDenyWriteExecute": "yes",
    "LockPersonality": "yes",
    "RestrictRealtime": "yes",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "ProcSubset": "pid",
    "RemoveIPC": "yes",
    "UMask": "0027",
    "DevicePolicy": "closed",
    "KeyringMode": "private",
}


@pytest.mark.parametrize(("key", "value"), sorted(REQUIRED_SERVICE.items()))
def test_unit_has_required_directive(unit, key, value):
    assert unit["Service"].get(key) == [value]


def test_unit_restart_limits_watchdog_and_credentials(unit):
    assert int(unit["Unit"]["StartLimitBurst"][0]) >= 1
    assert seconds(unit["Unit"]["StartLimitIntervalSec"][0]) > 0
    assert unit["Service"]["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert "michigan.token:/etc/imputationd/credentials/michigan.token" in unit["Service"]["LoadCredential"]
    assert "LogsDirectory" not in unit["Service"]  # logs go to the journal
    assert "IPAddressAllow" not in unit["Service"]  # public servers behind CDNs: no allow list can name them
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def size(value: str) -> int:
    match = re.fullmatch(r"(\d+)([KMG]?)", value)
    assert match, value
    return int(match[1]) << {"": 0, "K": 10, "M": 20, "G": 30}[match[2]]


def test_unit_bounds_memory_with_a_margin_over_the_measured_figures(unit):
    # bench/README.md: 5,000 active jobs stay under 120 MB. Each worker may also parse one hostile API answer of at
    # most ANSWER_LIMIT bytes, which can take ~25 times that in memory.
    active_target = 120_000_000
    high, peak = size(unit["Service"]["MemoryHigh"][0]), size(unit["Service"]["MemoryMax"][0])
    assert high >= 2 * active_target  # normal operation, with its download page cache, is never throttled
    assert peak > high
    assert peak >= active_target + SchedulerConfig().workers * 25 * ANSWER_LIMIT


def test_unit_does_not_restart_on_an_invalid_configuration(unit):
    from daemon.cli import EXIT_USAGE  # the exit status of a configuration error

    assert unit["Service"]["RestartPreventExitStatus"] == [str(EXIT_USAGE)]


def test_unit_stop_budget_exceeds_the_daemons_shutdown_timeout(unit):
    assert seconds(unit["Service"]["TimeoutStopSec"][0]) >= SchedulerConfig().shutdown_timeout + 5


def test_watchdog_interval_from_the_units_watchdogsec(unit, monkeypatch):
    watchdog = seconds(unit["Service"]["WatchdogSec"][0])
    monkeypatch.setenv("WATCHDOG_USEC", str(int(watchdog * 1_000_000)))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() == watchdog / 2


def test_postgresql_dropin():
    dropin = parse_unit(DROPIN.read_text())
    assert dropin["Unit"] == {"Wants": ["postgresql.service"], "After": ["postgresql.service"]}
    assert dropin["Service"]["LoadCredential"] == ["pgpass:/etc/imputationd/credentials/pgpass"]
    assert dropin["Service"]["Environment"] == ["PGPASSFILE=%d/pgpass"]


def installable_copy(tmp_path: Path, *, with_dropin: bool = False) -> Path:
    """The unit with ExecStart pointed at a binary that exists here (verify checks that it is executable; the real
    path exists only on an installed host), optionally with the PostgreSQL drop-in beside it."""
    text = UNIT.read_text()
    assert INSTALLED_EXEC in text
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    copy = unit_dir / "imputationd.service"
    copy.write_text(text.replace(INSTALLED_EXEC, sys.executable))
    if with_dropin:
        (unit_dir / "imputationd.service.d").mkdir()
        shutil.copy(DROPIN, unit_dir / "imputationd.service.d" / "postgresql.conf")
    return copy


def analyze(*args: str, unit_dir: Path) -> subprocess.CompletedProcess[str]:
    # The trailing ":" keeps the default search path after ours; drop-ins are found beside the unit.
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:", "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""}
    return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True, env=env, timeout=60)


@needs_analyze
@pytest.mark.parametrize("with_dropin", [False, True], ids=["unit", "unit+postgresql-dropin"])
def test_systemd_analyze_verify_is_clean(tmp_path, with_dropin):
    copy = installable_copy(tmp_path, with_dropin=with_dropin)
    result = analyze("verify", str(copy), unit_dir=copy.parent)
    # verify exits 0 even for unknown keys or bad specifiers; those are warnings on stderr naming our files.
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "imputationd" in line]
    assert result.returncode == 0 and ours == [], result.stdout + result.stderr


@needs_analyze
@pytest.mark.parametrize("with_dropin", [False, True], ids=["unit", "unit+postgresql-dropin"])
def test_systemd_analyze_security_exposure_at_most_2(tmp_path, with_dropin):
    copy = installable_copy(tmp_path, with_dropin=with_dropin)
    result = analyze("security", "--offline=true", "--no-pager", str(copy), unit_dir=copy.parent)
    match = re.search(r"Overall exposure level for imputationd\.service: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= 2.0, result.stdout


# --- our stack inside the unit's seccomp filter ----------------------------------------------------------------


def syscall_group(group: str, seen: set[str] | None = None) -> set[str]:
    """Every system call in a systemd filter group, nested groups expanded (from systemd-analyze itself)."""
    seen = set() if seen is None else seen
    seen.add(group)
    out = subprocess.run([SYSTEMD_ANALYZE, "syscall-filter", group], capture_output=True, text=True, check=True)
    calls: set[str] = set()
    for line in out.stdout.splitlines()[1:]:
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name.startswith("@"):
            if name not in seen:
                calls |= syscall_group(name, seen)
        else:
            calls.add(name)
    return calls


def unit_allowed_syscalls(unit: dict[str, dict[str, list[str]]]) -> list[str]:
    allowed: set[str] = set()
    for entry in unit["Service"]["SystemCallFilter"]:
        deny = entry.startswith("~")
        names: set[str] = set()
        for item in entry.lstrip("~").split():
            names |= syscall_group(item) if item.startswith("@") else {item}
        allowed = allowed - names if deny else allowed | names
    return sorted(allowed)


#: Runs in a child process: installs the two filters systemd would (MemoryDenyWriteExecute=yes, then the
#: SystemCallFilter= allow list with SystemCallErrorNumber=EPERM) with libseccomp, checks they bite, then runs
#: what the daemon runs: logging, TLS over loopback with httpx, SQLite through SQLAlchemy, an AES zip,
#: psycopg's libpq, APScheduler's thread pool, the API's listener (Flask under cheroot), sd_notify.
SANDBOXED = r"""
import ctypes, errno, json, mmap, os, sys

lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
lib.seccomp_load.argtypes = [ctypes.c_void_p]

class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

ALLOW, EPERM, MASKED_EQ = 0x7FFF0000, 0x00050000 | errno.EPERM, 7

def rule(ctx, action, name, *cmps):
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:  # not a system call on this architecture
        return
    array = (Cmp * len(cmps))(*cmps) if cmps else None
    assert lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array) == 0, name

W, X = mmap.PROT_WRITE, mmap.PROT_EXEC
mdwe = lib.seccomp_init(ALLOW)
rule(mdwe, EPERM, "mmap", Cmp(2, MASKED_EQ, W | X, W | X))
rule(mdwe, EPERM, "mprotect", Cmp(2, MASKED_EQ, X, X))
rule(mdwe, EPERM, "pkey_mprotect", Cmp(2, MASKED_EQ, X, X))
rule(mdwe, EPERM, "shmat", Cmp(2, MASKED_EQ, 0o100000, 0o100000))  # SHM_EXEC
assert lib.seccomp_load(mdwe) == 0
allow_list = lib.seccomp_init(EPERM)
for name in json.loads(os.environ["ALLOWED_SYSCALLS"]):
    rule(allow_list, ALLOW, name)
assert lib.seccomp_load(allow_list) == 0

try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | W | X)
    raise SystemExit("MemoryDenyWriteExecute filter not active")
except PermissionError:
    pass
try:
    os.sched_setaffinity(0, {0})  # @resources
    raise SystemExit("system call filter not active")
except PermissionError:
    pass

import tempfile, threading
import httpx, psycopg, pyzipper, sqlalchemy as sa, structlog
from apscheduler.schedulers.background import BackgroundScheduler
from daemon import systemd
from daemon.config import LoggingConfig
from daemon.logging import bind_job, configure_logging

configure_logging(LoggingConfig(format="json"))
log = structlog.get_logger("sandbox")

with httpx.Client(verify=os.environ["CA_FILE"] or False) as client:
    assert client.get(os.environ["HTTP_URL"]).status_code == 200

tmp = tempfile.mkdtemp()
engine = sa.create_engine(f"sqlite:///{tmp}/jobs.db")
with engine.begin() as conn:
    conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
    conn.execute(sa.text("INSERT INTO t VALUES (1)"))
with engine.connect() as conn:
    assert conn.execute(sa.text("SELECT x FROM t")).scalar() == 1

with pyzipper.AESZipFile(f"{tmp}/chr_1.zip", "w", encryption=pyzipper.WZ_AES) as zf:
    zf.setpassword(b"job-password")
    zf.writestr("chr1.dose.vcf.gz", os.urandom(100_000))
with pyzipper.AESZipFile(f"{tmp}/chr_1.zip") as zf:
    zf.setpassword(b"job-password")
    assert zf.testzip() is None

try:
    psycopg.connect("host=127.0.0.1 port=1 dbname=x user=x connect_timeout=3").close()
except psycopg.OperationalError:
    pass  # libpq loaded and tried: that is all we ask here

ran = threading.Event()
scheduler = BackgroundScheduler()
scheduler.add_job(ran.set)
scheduler.start()
assert ran.wait(10)
scheduler.shutdown()

from daemon.api import create_app
from daemon.api.server import ApiServer
from daemon.config import parse_config
from daemon.db.schema import upgrade_url
from daemon.db.store import JobStore

api_config = parse_config({"storage": {"state_dir": tmp}, "database": {"url": f"sqlite:///{tmp}/api.db"},
                           }, base_dir=tmp)
upgrade_url(api_config.database.url)
server = ApiServer("127.0.0.1:0", create_app(api_config, JobStore(sa.create_engine(api_config.database.url))),
                   threads=2)
server.start()
host, port = server.address
with httpx.Client() as client:
    assert client.get(f"http://{host}:{port}/api/v1/openapi.json").json()["openapi"] == "3.1.0"
    assert client.get(f"http://{host}:{port}/api/v1/jobs").status_code == 401
server.close()

with bind_job("j1", "michigan", "r1"):
    log.info("sandbox_ok", psycopg_impl=psycopg.pq.__impl__)
assert systemd.ready("sandboxed")
"""


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


def _libseccomp_available() -> bool:
    try:
        import ctypes

        ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return False
    return True


@needs_analyze
def test_daemon_stack_runs_under_the_units_seccomp_filters(unit, tmp_path, notify_socket):
    require_tool(_libseccomp_available(), "libseccomp.so.2", "apt-get install libseccomp2")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    cert, key = self_signed_certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {
            **os.environ,
            "ALLOWED_SYSCALLS": json.dumps(unit_allowed_syscalls(unit)),
            "HTTP_URL": f"https://127.0.0.1:{server.server_address[1]}/",
            "CA_FILE": str(cert),
        }
        result = subprocess.run(
            [sys.executable, "-c", SANDBOXED], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = [json.loads(text) for text in result.stdout.splitlines() if '"sandbox_ok"' in text]
    assert (line["job_id"], line["service"], line["remote_id"]) == ("j1", "michigan", "r1")
    assert received(notify_socket) == ["READY=1", "STATUS=sandboxed"]
