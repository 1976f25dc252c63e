"""`imputationd show GROUP_ID`: each child's state and the group's (completed, partly failed, in progress...)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from support.ops_support import PANEL, PANEL_ID, sample_vcf

from daemon.cli import main
from daemon.config import load_config
from daemon.db.admin import group_state
from daemon.db.engine import make_engine
from daemon.db.schema import upgrade
from daemon.db.store import JobStore
from daemon.outcome import Outcome
from daemon.states import JobState


@pytest.mark.parametrize(("states", "group"), [
    (["completed", "completed"], "completed"),
    (["completed", "failed"], "partly failed"),
    (["completed", "cancelled"], "partly failed"),
    (["failed", "cancelled"], "failed"),
    (["cancelled", "cancelled"], "cancelled"),
    (["completed", "running"], "in progress"),
    (["pending", "blocked"], "in progress"),
])
def test_group_state(states: list[str], group: str) -> None:
    assert group_state(states) == group


def test_show_group_lists_each_child_and_the_group_state(tmp_path: Path, capsys) -> None:
    for name in ("a", "b"):
        (tmp_path / f"{name}.token").write_text("token-" + "x" * 20)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"storage: {{state_dir: {tmp_path / 'state'}}}\nservices:\n"
        + "".join(f"  {name}:\n    type: cloudgene\n    base_url: http://127.0.0.1:9\n    token_file: {name}.token\n"
                  f"    panels:\n      {PANEL}: {{id: \"{PANEL_ID}\"}}\n" for name in ("a", "b"))
    )
    engine = make_engine(load_config(config).database.url)
    upgrade(engine)
    store = JobStore(engine)

    assert main(["submit", "-c", str(config), "--service", "a", "--service", "b", "--panel", PANEL,
                 "--build", "hg19", "--json", str(sample_vcf(tmp_path))]) == 0
    created = json.loads(capsys.readouterr().out)
    group_id = created["group_id"]
    child = {j["service"]: uuid.UUID(j["id"]) for j in created["jobs"]}

    # a completes, b fails: the group is partly failed.
    for state in (JobState.SUBMITTING, JobState.DOWNLOADING, JobState.COMPLETED):
        store.queue.claim_one(child["a"], "t", lease_seconds=30)
        store.queue.finish(child["a"], "t", Outcome(state=state, reason="test"))
    assert main(["show", "-c", str(config), group_id]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"group {group_id}: in progress")
    store.queue.claim_one(child["b"], "t", lease_seconds=30)
    store.queue.finish(child["b"], "t", Outcome(state=JobState.FAILED, reason="remote job failed"))

    assert main(["show", "-c", str(config), group_id[:8]]) == 0
    out = capsys.readouterr().out
    header = out.split("\n\n")[0].splitlines()
    assert header[0] == f"group {group_id}: partly failed"
    rows = {line.split()[1]: line.split()[2] for line in header[2:]}
    assert rows == {"a": "completed", "b": "failed"}

    assert main(["show", "-c", str(config), group_id, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "partly failed"
    assert {j["service"]: j["state"] for j in shown["jobs"]} == {"a": "completed", "b": "failed"}
    engine.dispose()
