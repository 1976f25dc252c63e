"""SIGHUP's reload, in process: what it applies and what it says needs a restart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.ops_support import daemon_config, running_daemon
from support.pg import free_port

from daemon.logging import configure_logging


def restart_warnings(output: str) -> list[str]:
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return [line["reason"] for line in lines if line.get("event") == "config_reload_partial"]


def rewrite(path: Path, change: dict[str, Any]) -> None:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    for section, values in change.items():
        data[section] = {**data.get(section, {}), **values}
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


@pytest.mark.parametrize("section", ["metrics", "api"])
@pytest.mark.parametrize("changed", [True, False], ids=["listen-changed", "listen-kept"])
def test_a_reload_says_once_that_a_new_listen_needs_a_restart(tmp_path: Path, sqlite_url: str,
                                                              capsys: pytest.CaptureFixture[str],
                                                              changed: bool, section: str) -> None:
    # The service is never reached: nothing listens on port 9, and no job is submitted.
    config = daemon_config(tmp_path, sqlite_url, base_url="http://127.0.0.1:9", token="t0ken")
    assert config.source is not None and config.metrics.listen is None
    configure_logging(config.logging)  # JSON lines on stdout, where capsys reads them
    with running_daemon(config) as daemon:
        if changed:
            rewrite(config.source, {section: {"listen": f"127.0.0.1:{free_port()}"}})
        rewrite(config.source, {"scheduler": {"maintenance_interval": 7}})
        assert daemon.reload()
        # A second reload of the same file changes nothing that needs a restart: said once, not at every SIGHUP.
        assert daemon.reload()
        assert daemon.config.scheduler.maintenance_interval == 7
    warnings = restart_warnings(capsys.readouterr().out)
    expected = "metrics.listen changes need a restart" if section == "metrics" else "api changes need a restart"
    assert warnings == ([expected] if changed else [])
