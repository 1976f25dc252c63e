"""`imputationd demo`: the whole pipeline with no account and no setup.

A temporary directory with a config file, a token file and a SQLite database; the simulated Cloudgene server on
loopback; a generated bgzipped VCF. The job goes through the same code as in production — config loader, migrations,
submission preflight, the daemon's ticks and pool, the Cloudgene adapter over real HTTP, streaming downloads with
verification — and the demo then checks every downloaded file against the bytes the simulator served.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

from daemon.config import LoggingConfig, load_config
from daemon.db.models import Job
from daemon.db.revision import upgrade_url
from daemon.logging import configure_logging
from daemon.scheduler import Daemon
from daemon.simulator import SimulatedCloudgene
from daemon.simulator.vcf import write_sample_vcf
from daemon.states import TERMINAL, JobState
from daemon.submission import Submission, submit

PANEL_ID = "apps@1000g-phase-3-v5@2.0.0"

CONFIG_TEMPLATE = """\
# Written by `imputationd demo`.
storage:
  state_dir: {state}
database:
  url: sqlite:///{state}/imputationd.db
logging:
  format: console
  level: warning
scheduler:
  workers: 4
  dispatch_interval: 0.5
  poll_tick_interval: 0.5
  download_interval: 0.5
  maintenance_interval: 30
  lease_seconds: 30
  backoff_initial: 0.5
  backoff_max: 5
services:
  demo:
    type: cloudgene
    base_url: {base_url}
    token_file: {token_file}
    poll_interval: 0.5
    panels:
      1000g-phase3:
        id: {panel}
        builds: [hg19, hg38]
        populations: [eur, afr, amr, eas, sas, all]
"""


def _say(text: str = "") -> None:
    print(text, flush=True)


def run_demo(*, keep: bool = False, timeout: float = 60.0) -> int:
    root = Path(tempfile.mkdtemp(prefix="imputationd-demo-"))
    try:
        return _run(root, timeout)
    finally:
        if keep:
            _say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _run(root: Path, timeout: float) -> int:
    token = secrets.token_urlsafe(24)
    token_file = root / "demo.token"
    token_file.write_text(token + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    state = root / "state"
    configure_logging(LoggingConfig(format="console", level="warning"), stream=sys.stderr)

    with SimulatedCloudgene(tokens={token: "demo"}) as server:
        config_path = root / "config.yaml"
        config_path.write_text(
            CONFIG_TEMPLATE.format(state=state, base_url=server.base_url, token_file=token_file, panel=PANEL_ID),
            encoding="utf-8",
        )
        config = load_config(config_path)
        _say(f"simulated Cloudgene server at {server.base_url}; working in {root}")

        upgrade_url(config.database.url)
        vcf = root / "inputs" / "chr20.vcf.gz"
        vcf.parent.mkdir()
        write_sample_vcf(vcf, chromosome="20", build="hg19", samples=25, variants=200)

        daemon = Daemon(config)
        [job] = submit(
            config,
            daemon.store,
            Submission(services=["demo"], panel="1000g-phase3", build="hg19", files=[vcf], name="demo job",
                       population="eur", phasing="eagle", r2_filter="0.3", mode="imputation"),
        )
        _say(f"submitted job {job.id}")
        started = time.monotonic()
        daemon.start()
        try:
            while time.monotonic() - started < timeout:
                current = daemon.store.admin.get(job.id)
                if current.state in TERMINAL:
                    break
                time.sleep(0.2)
        finally:
            daemon.request_stop()
            daemon.stop()
        elapsed = time.monotonic() - started
        job = daemon.store.admin.get(job.id, with_events=True)
        return _report(job, server, elapsed)


def _report(job: Job, server: SimulatedCloudgene, elapsed: float) -> int:
    _say()
    _say(f"job {job.id}: {job.state.value} after {elapsed:.1f} s (remote id {job.remote_id})")
    _say("history (UTC):")
    for event in job.events:
        _say(f"  {event.at:%H:%M:%S.%f}"[:-3] + f"  {event.from_state or '-':>11} -> {event.to_state:<11} "
             f"{event.reason or ''}")
    if job.state is not JobState.COMPLETED:
        _say(f"demo FAILED: the job ended {job.state.value}: {job.error or 'no reason recorded'}")
        return 1
    remote_id = job.remote_id
    assert remote_id is not None, "a completed job was submitted"
    served = {name: server.file_bytes(remote_id, name) for name in server.file_names(remote_id)}
    _say("files (sha256 computed while downloading, checked against what the server sent):")
    mismatched = 0
    for output in job.outputs:
        local = Path(output.local_path).read_bytes() if output.local_path else b""
        expected = served.get(output.name)
        ok = expected is not None and hashlib.sha256(expected).hexdigest() == output.sha256 == hashlib.sha256(
            local).hexdigest()
        mismatched += not ok
        _say(f"  {'ok ' if ok else 'BAD'} {output.name:<32} {output.size:>9} bytes  {output.sha256}")
    _say(f"results in {job.result_dir}")
    if mismatched:
        _say(f"demo FAILED: {mismatched} files differ from what the server sent")
        return 1
    _say("demo OK")
    return 0
