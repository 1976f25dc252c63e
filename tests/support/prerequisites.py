"""What a test needs from the machine, and how a test that needs root's absence runs as root.

    from support.prerequisites import require_program, require_tool, run_unprivileged   # tests/ is on sys.path

`require_tool(available, what, install)` skips the calling test (or fixture) on a developer machine that lacks
`what`, and FAILS it when $CI is set (anything but "", 0, false, no): CI installs everything (.ci/run), so a skip
there would only hide tests that never ran. Every test that depends on the machine goes through it.

`run_unprivileged(fn, *args)` calls `fn(*args)` as a user without root's power to ignore file permissions: directly
when the tests do not run as root, else in a forked child that dropped to `nobody` (no supplementary groups, no
capabilities left). Its return value comes back pickled; an exception in it fails the test with the child's
traceback. `unprivileged_dir()` makes a directory under /tmp that this user owns and can reach (pytest's tmp_path
sits in a 0700 directory of root's).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import pwd
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
UNPRIVILEGED_USER = "nobody"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_tool(available: bool, what: str, install: str) -> None:
    """Skip (fail under CI) the calling test unless `available`; `what` is missing, `install` says how to get it."""
    if available:
        return
    message = f"missing here: {what} ({install})"
    if in_ci():
        pytest.fail(f"{message}; CI is set, so this test must run, not skip", pytrace=False)
    pytest.skip(message)


def require_program(name: str, install: str) -> str:
    """The path of program `name` on PATH; skips (fails under CI) when there is none."""
    path = shutil.which(name)
    require_tool(path is not None, f"the program {name!r}", install)
    assert path is not None
    return path


def _unprivileged_ids() -> tuple[int, int] | None:
    """(uid, gid) to drop to, or None when the tests already run without root."""
    if os.geteuid() != 0:
        return None
    user = pwd.getpwnam(UNPRIVILEGED_USER)
    return user.pw_uid, user.pw_gid


@contextlib.contextmanager
def unprivileged_dir() -> Iterator[Path]:
    """A new directory the unprivileged user owns and can reach; removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="imputationd-unprivileged-"))
    try:
        ids = _unprivileged_ids()
        if ids is not None:
            os.chown(path, *ids)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_unprivileged(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` as a user that file permissions apply to (see the module docstring)."""
    ids = _unprivileged_ids()
    if ids is None:
        return fn(*args)
    uid, gid = ids
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)  # from root to a non-zero uid: every capability is gone, and setuid(0) cannot undo it
            try:
                outcome = ("ok", fn(*args))
            except BaseException:  # noqa: BLE001 - handed to the parent, which fails the test with it
                outcome = ("error", traceback.format_exc())
            with os.fdopen(write_end, "wb") as out:
                pickle.dump(outcome, out)
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as result:
        data = result.read()
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0 and data, f"the unprivileged child died ({wait_status=})"
    kind, value = pickle.loads(data)
    if kind == "error":
        pytest.fail(f"as {UNPRIVILEGED_USER} (uid {uid}):\n{value}", pytrace=False)
    return value
