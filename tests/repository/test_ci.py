""".ci/run, dry: a copy of it runs with stand-ins for python3, dpkg-query and apt-get first on PATH (nothing is
installed, no venv made), to check what it installs, that it runs the README's test command and what it exits with."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CI_RUN = REPO / ".ci" / "run"

# Each stand-in logs its argv to $LOG. python3 -c (the venv check) fails when $NO_VENV is set; `python3 -m venv D`
# makes D/bin/pip (logs, succeeds) and D/bin/python (logs, exits $PYTEST_STATUS). dpkg-query calls the packages
# named in $MISSING not installed.
STANDINS = {
    "python3": r"""
echo "python3 $*" >>"$LOG"
if [ "$1" = -c ]; then [ -z "${NO_VENV:-}" ]; exit; fi
mkdir -p "$3/bin"
printf '#!/bin/sh\necho "pip $*" >>"$LOG"\n' >"$3/bin/pip"
printf '#!/bin/sh\necho "python $*" >>"$LOG"\nexit "$PYTEST_STATUS"\n' >"$3/bin/python"
chmod +x "$3/bin/pip" "$3/bin/python"
""",
    "dpkg-query": r"""
for package in $MISSING; do [ "$package" = "${@: -1}" ] && { echo "unknown"; exit 0; }; done
echo installed
""",
    "apt-get": r"""
echo "apt-get $* stdin=$(readlink /proc/self/fd/0)" >>"$LOG"
""",
}


def dry_run(tmp_path: Path, *, pytest_status: int = 0, missing: str = "", no_venv: bool = False
            ) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    repo, bin_dir, log = tmp_path / "repo", tmp_path / "bin", tmp_path / "log"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy2(CI_RUN, repo / ".ci" / "run")
    bin_dir.mkdir()
    for name, body in STANDINS.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    log.touch()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LOG": str(log), "PYTEST_STATUS": str(pytest_status),
           "MISSING": missing, "CI": "true", **({"NO_VENV": "1"} if no_venv else {})}
    result = subprocess.run([str(repo / ".ci" / "run")], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60)
    return result, log.read_text().splitlines()


def readme_test_command() -> str:
    readme = (REPO / "README.md").read_text()
    match = re.search(r"Run the whole test suite.*?```sh\n(.+?)\n```", readme, re.S)
    assert match, "README.md no longer shows the test command after 'Run the whole test suite'"
    return match[1]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    command = readme_test_command()
    assert any(line.startswith(command + " ||") for line in CI_RUN.read_text().splitlines()), command


def test_nothing_missing_installs_nothing_and_runs_the_suite(tmp_path: Path) -> None:
    result, log = dry_run(tmp_path)
    assert result.returncode == 0, result.stderr
    assert not [line for line in log if line.startswith("apt-get")]
    assert log[-3:] == ["python3 -m venv .venv", "pip install -e .[test,postgres]", "python -m pytest -n 2"]


def test_missing_packages_are_installed_with_one_update_and_no_stdin(tmp_path: Path) -> None:
    result, log = dry_run(tmp_path, missing="postgresql libarchive13 jq systemd", no_venv=True)
    assert result.returncode == 0, result.stderr
    apt = [line for line in log if line.startswith("apt-get")]
    assert apt == [
        "apt-get update -q stdin=/dev/null",
        "apt-get install -y -q --no-install-recommends python3-venv postgresql libarchive13 systemd jq "
        "stdin=/dev/null",
    ]
    assert log.index(apt[-1]) < log.index("python3 -m venv .venv")


@pytest.mark.parametrize("status", [1, 2, 5])
def test_a_failing_or_empty_test_run_fails_ci(tmp_path: Path, status: int) -> None:
    result, _ = dry_run(tmp_path, pytest_status=status)
    assert result.returncode == status
    assert ("pytest collected no tests: failing" in result.stderr) == (status == 5)


def test_the_packages_cover_every_program_the_tests_require() -> None:
    script = CI_RUN.read_text()
    [packages] = re.findall(r"^packages=\((.+)\)$", script, re.M)
    tests = "\n".join(p.read_text() for p in (REPO / "tests").rglob("*.py") if p.name != Path(__file__).name)
    hinted = set(re.findall(r"apt-get install ([a-z0-9 .+-]+)\"", tests))
    named = {name for hint in hinted for name in hint.split()}
    assert named and named <= set(packages.split()), named - set(packages.split())
    assert os.access(CI_RUN, os.X_OK)
