"""The benchmark scripts still work: each one's core, run tiny (no targets checked — only that it runs and measures).

bench/ is not a package; its scripts import their helpers (`_common`) from their own folder, so it goes on sys.path.
The Celery comparison installs Redis and Celery on first use: here only its imputationd side and the old stack's
task module are exercised.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import celery_compare  # noqa: E402
import download  # noqa: E402
import memory  # noqa: E402
import scale  # noqa: E402
import throughput  # noqa: E402
from prerequisites import require_program  # noqa: E402


def test_scale_sqlite_ticks_and_plans(capsys: pytest.CaptureFixture[str]) -> None:
    results = scale.run(["sqlite"], [200, 400], iterations=2, workers=4, show_plans=True, warmup=1)
    subjects = results["sqlite"]
    assert set(subjects) == {200, 400}
    for s in subjects.values():
        assert all(len(s.times[t]) == 2 and all(x > 0 for x in s.times[t]) for t in scale.TICKS)
    out = capsys.readouterr().out
    assert "query plans at 400 jobs" in out and "ix_jobs_state_next_poll_at" in out
    assert "scale: targets" in out


@pytest.mark.postgres
def test_scale_postgres_ticks_and_explain_analyze(postgres_cluster, capsys: pytest.CaptureFixture[str]) -> None:
    results = scale.run(["postgres"], [100, 200], iterations=2, workers=4, show_plans=True, warmup=1,
                        cluster=postgres_cluster)
    assert set(results["postgres"]) == {100, 200}
    assert "Execution Time" in capsys.readouterr().out  # EXPLAIN ANALYZE ran


def test_throughput_small_run_completes_every_job() -> None:
    result = throughput.run(8, latency=0.005, workers=4, tick=0.2, poll_interval=0.2, timeout=60)
    assert result["calls_per_job"] >= 3  # submit, status, at least one download
    assert math.isfinite(result["ratio"]) and result["cpu_per_job"] > 0


def test_download_against_curl(tmp_path: Path) -> None:
    require_program("curl", "apt-get install curl")
    result = download.run(4 << 20, rounds=1, directory=tmp_path, chunk_size=None)
    assert result["ours"] > 0 and result["curl"] > 0 and result["rss_growth"] < 200


def test_memory_idle_and_active_from_the_project_venv() -> None:
    result = memory.run(jobs=30, duration=2, settle=1, poll_interval=5, project_venv=True)
    assert 10 < result["idle"] < 1000 and 10 < result["active"] < 1000


def test_celery_compare_imputationd_side_and_old_task_module(tmp_path: Path) -> None:
    compile(celery_compare.CELERY_APP, "oldstack_app.py", "exec")
    compile(celery_compare.REDIS_COUNTS, "counts.py", "exec")
    command = Path(sys.executable).with_name("imputationd")
    with _common.SimulatorProcess(timings={"queue": 0, "run": 1e9, "export": 0}, precreate=12) as sim:
        result = celery_compare.run_imputationd(tmp_path, command, sim, seconds=2, poll_interval=2)
    assert result["processes"] == 1 and result["rss"] > 10
    assert result["in_flight"] + result["waiting"] == 12
