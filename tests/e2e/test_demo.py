"""`imputationd demo` as a user runs it: the installed console script in a fresh process, no account, no setup."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)


def demo_command() -> list[str]:
    """The console script next to this interpreter (the venv's), else `python -m daemon`."""
    script = Path(sys.executable).with_name("imputationd")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), "demo"]
    return [sys.executable, "-m", "daemon", "demo"]


def test_demo_runs_the_whole_pipeline_and_says_ok(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("IMPUTATIOND_CONFIG", "CREDENTIALS_DIRECTORY")}
    env["TMPDIR"] = str(tmp_path)  # its temporary directory, removed by the demo itself
    started = time.monotonic()
    done = subprocess.run(demo_command(), capture_output=True, text=True, timeout=45, env=env, cwd=tmp_path,
                          stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "demo OK" in done.stdout, output
    assert elapsed < 30, f"the demo took {elapsed:.1f} s"
    # The summary it promises: the job's end, its history and every file checked against what the server sent.
    assert ": completed after" in done.stdout and "-> completed" in done.stdout
    file_lines = [line for line in done.stdout.splitlines() if line.strip().startswith(("ok ", "BAD"))]
    assert file_lines and all(line.strip().startswith("ok ") for line in file_lines), output
    assert any("chr_20.zip" in line for line in file_lines)
    assert "Traceback" not in output
    assert list(tmp_path.iterdir()) == [], "the demo left its temporary directory behind"

