"""The static checks configured in pyproject.toml, run as tests: the import layering (import-linter), lint (ruff)
and types (mypy, strict on daemon/). Each runs its tool from this interpreter's environment on this tree; a
missing tool skips the test, except under $CI, where it fails (`prerequisites.require_tool`)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from support.prerequisites import require_tool

REPO = Path(__file__).resolve().parents[2]
CONTRACTS = [c["id"] for c in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]]


def run_tool(module: str, package: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m module args` (`package` provides `module`) in the repository root, this tree first on the path."""
    require_tool(importlib.util.find_spec(module) is not None, f"the Python package {package!r}",
                 "pip install -e '.[test]'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    argv = ["-m", module, *args]
    if module == "importlinter":  # no __main__: its console script calls this
        argv = ["-c", "from importlinter.cli import lint_imports_command; lint_imports_command()", *args]
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, check=False)


@pytest.mark.parametrize("contract", CONTRACTS)
def test_import_contract_is_kept(contract: str) -> None:
    """The contracts of [tool.importlinter]: the simulator apart from the daemon, every module importing only
    downward, no cycles; function-level imports included."""
    result = run_tool("importlinter", "import-linter", "--no-cache", "--contract", contract)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_finds_nothing() -> None:
    result = run_tool("ruff", "ruff", "check", "--no-cache", "daemon", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing() -> None:
    result = run_tool("mypy", "mypy", "--no-incremental", "--cache-dir", os.devnull)
    assert result.returncode == 0, result.stdout + result.stderr
