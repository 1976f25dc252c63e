"""pyproject.toml says only what is true: every package-data pattern ships a file, the license file it names
exists and says the license it declares, and no runtime dependency can jump to an untested major version."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_data_pattern_matches_a_file() -> None:
    unmatched = [
        f"{package}: {pattern}"
        for package, patterns in PROJECT["tool"]["setuptools"]["package-data"].items()
        for pattern in patterns
        if not list((REPO / package.replace(".", "/")).glob(pattern))
    ]
    assert unmatched == []


def test_the_license_file_exists_and_states_the_declared_license() -> None:
    project = PROJECT["project"]
    assert project["license"] == "MIT"
    [name] = project["license-files"]
    text = (REPO / name).read_text()
    assert text.startswith("MIT License\n") and "Copyright (c) 2026 the imputationd authors" in text


def test_every_runtime_dependency_has_an_upper_bound() -> None:
    unbounded = [
        spec
        for spec in PROJECT["project"]["dependencies"]
        if not any(s.operator in ("<", "<=", "==", "~=") for s in Requirement(spec).specifier)
    ]
    assert unbounded == []
