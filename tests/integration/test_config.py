"""load_config / check_runtime / format_problems: what operators see when they get the YAML right, and wrong."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.prerequisites import run_unprivileged, unprivileged_dir

from daemon.config import (
    DEFAULT_CONFIG_PATH,
    SUBMIT_ANSWER_TIMEOUT,
    Config,
    ConfigError,
    EmailConfig,
    NotificationsConfig,
    PanelConfig,
    SchedulerConfig,
    ServiceConfig,
    StorageConfig,
    WebhookConfig,
    WesConfig,
    check_runtime,
    find_config_path,
    format_problems,
    load_config,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "imputationd.example.yaml"
TOKEN = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXRva2VuLXZhbHVl.c2lnbmF0dXJl"
DELETE = object()  # in an override: remove this key from the base config

VALID: dict[str, Any] = {
    "services": {
        "michigan": {
            "type": "cloudgene",
            "base_url": "https://imputationserver.sph.umich.edu",
            "token_file": "michigan.token",
            "panels": {"hrc": {"id": "apps@hrc-r1.1@2.0.0"}},
        }
    }
}

WES_SERVICE: dict[str, Any] = {
    "type": "wes",
    "base_url": "https://wes.example.org",
    "token_env": "WES_TOKEN",
    "wes": {"workflow_url": "main.nf", "workflow_type": "NFL", "workflow_type_version": "22.10"},
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The defaults depend on systemd's variables: start every test without them."""
    for name in ("STATE_DIRECTORY", "CACHE_DIRECTORY", "CREDENTIALS_DIRECTORY", "IMPUTATIOND_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def write(tmp_path: Path, content: str | dict[str, Any], name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content), encoding="utf-8")
    return path


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(base)
    for key, value in override.items():
        if value is DELETE:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.problems


def michigan(**settings: Any) -> dict[str, Any]:
    return {"services": {"michigan": settings}}


def panel(**settings: Any) -> dict[str, Any]:
    return michigan(panels={"hrc": settings})


def as_wes(**wes: Any) -> dict[str, Any]:
    service = merged(WES_SERVICE, {"wes": wes})
    service["token_file"] = DELETE
    service["panels"] = DELETE
    return {"services": {"michigan": service}}


# --- files that load -------------------------------------------------------------------------------------------------


def test_full_file_loads_into_typed_objects(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
database:
  url: postgresql+psycopg://imputationd@db.example.org/imputationd
  pool_size: 10
  echo: true
storage:
  state_dir: /srv/imputationd
  results_dir: /srv/results
  temp_dir: /srv/results-tmp
  keep_days: 30
scheduler:
  workers: 16
  dispatch_interval: 2
  poll_tick_interval: 3.5
  download_interval: 4
  maintenance_interval: 120
  poll_interval: 30
  lease_seconds: 300
  backoff_initial: 5
  backoff_max: 600
  shutdown_timeout: 20
  batch_size: 50
logging:
  format: json
  level: DEBUG
metrics:
  listen: "[::1]:9478"
services:
  michigan:
    type: cloudgene
    base_url: https://imputationserver.sph.umich.edu/
    app: imputationserver2@2.0.7
    token_file: /etc/imputationd/michigan.token
    max_concurrent_jobs: 2
    poll_interval: 15
    timeout: 60
    max_upload_mb: 1000
    min_samples: 1
    max_samples: 100
    panels:
      1000g-phase-3-v5:
        id: apps@1000g-phase-3-v5@2.0.0
        builds: [hg38]
        populations: [eur, afr, "off"]
  wes-1:
    type: wes
    base_url: http://localhost:1122
    token_env: WES_TOKEN
    wes:
      workflow_url: https://example.org/main.nf
      workflow_type: NFL
      workflow_type_version: "22.10"
      engine: nextflow
      engine_version: "23.10.1"
      engine_parameters: {"-resume": ""}
      workflow_params: {files: "{files}", nested: {list: [1, 2.5, true, null]}}
      inputs_as: path
      page_size: 10
""",
    )
    config = load_config(path)

    assert config.source == path
    assert config.database.url == "postgresql+psycopg://imputationd@db.example.org/imputationd"
    assert (config.database.pool_size, config.database.echo) == (10, True)
    assert config.storage == StorageConfig(Path("/srv/imputationd"), Path("/srv/results"), Path("/srv/results-tmp"), 30)
    assert config.scheduler == SchedulerConfig(16, 2.0, 3.5, 4.0, 120.0, 30.0, 300.0, 5.0, 600.0, 20.0, 50)
    assert (config.logging.format, config.logging.level) == ("json", "debug")
    assert config.metrics.listen == "[::1]:9478"

    michigan = config.services["michigan"]
    assert michigan.base_url == "https://imputationserver.sph.umich.edu"  # trailing slash dropped
    assert michigan.app == "imputationserver2@2.0.7"
    assert michigan.token_file == Path("/etc/imputationd/michigan.token")
    assert (michigan.max_concurrent_jobs, michigan.poll_interval, michigan.timeout) == (2, 15.0, 60.0)
    assert (michigan.max_upload_mb, michigan.min_samples, michigan.max_samples) == (1000, 1, 100)
    assert michigan.panels == {
        "1000g-phase-3-v5": PanelConfig(
            "1000g-phase-3-v5", "apps@1000g-phase-3-v5@2.0.0", ("hg38",), ("eur", "afr", "off")
        )
    }
    assert michigan.wes is None

    wes = config.services["wes-1"]
    assert wes.type == "wes" and wes.token_env == "WES_TOKEN" and wes.token_file is None
    assert wes.poll_interval == 30.0  # from scheduler.poll_interval
    assert wes.wes == WesConfig(
        workflow_url="https://example.org/main.nf",
        workflow_type="NFL",
        workflow_type_version="22.10",
        engine="nextflow",
        engine_version="23.10.1",
        engine_parameters={"-resume": ""},
        workflow_params={"files": "{files}", "nested": {"list": [1, 2.5, True, None]}},
        inputs_as="path",
        page_size=10,
    )


def test_example_file_loads() -> None:
    config = load_config(EXAMPLE)
    assert set(config.services) == {"michigan", "topmed", "afrigen"}
    # Unversioned: the server resolves them to its newest panel, so an upgrade of the panel breaks nothing.
    assert config.services["michigan"].panels["1000g-phase-3-v5"].remote_id == "apps@1000g-phase-3-v5"
    assert config.services["michigan"].panels["hrc"].remote_id == "apps@hrc-r1.1"
    assert config.services["topmed"].panels["topmed-r3"].remote_id == "apps@topmed-r3"
    assert config.services["afrigen"].panels["h3africa"].remote_id == "apps@h3africa-v6hc-s"
    assert config.services["michigan"].panels["hrc"].phasing == ("eagle", "beagle", "no_phasing")
    assert config.services["topmed"].panels["topmed-r3"].phasing == ("eagle", "no_phasing")
    assert (config.services["michigan"].max_samples, config.services["topmed"].max_samples) == (110000, 199999)
    for service in config.services.values():
        assert service.type == "cloudgene"
        assert service.token_file is not None and service.token_env is None
        assert service.base_url.startswith("https://")


def test_example_wes_service_loads_once_uncommented(tmp_path: Path) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    block = text.split("# --- begin wes example ---\n")[1].split("# --- end wes example ---")[0]
    uncommented = "\n".join(line.replace("  # ", "  ", 1) for line in block.splitlines())
    config = load_config(write(tmp_path, "services:\n" + uncommented))
    service = config.services["my-wes"]
    assert service.type == "wes" and service.wes is not None
    assert service.wes.workflow_type_version == "22.10"


def test_example_documents_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    documented = {
        f.name
        for cls in (Config, SchedulerConfig, StorageConfig, ServiceConfig, PanelConfig, WesConfig,
                    NotificationsConfig, WebhookConfig, EmailConfig)
        for f in dataclasses.fields(cls)
    } - {"name", "source", "remote_id", "sender"}
    documented |= {"id", "url", "pool_size", "echo", "format", "level", "listen"}
    missing = sorted(key for key in documented if f"{key}:" not in text)
    assert missing == []


@pytest.mark.parametrize("content", ["", "# only a comment\n", "{}\n", "---\n"])
def test_empty_file_gives_defaults(tmp_path: Path, content: str) -> None:
    config = load_config(write(tmp_path, content))
    assert config.storage == StorageConfig(
        Path("/var/lib/imputationd"), Path("/var/lib/imputationd/results"), Path("/var/lib/imputationd/tmp"), None
    )
    assert config.database.url == "sqlite:////var/lib/imputationd/imputationd.db"
    assert config.scheduler == SchedulerConfig()
    assert config.logging.format == "auto" and config.logging.level == "info"
    assert config.metrics.listen is None
    assert config.services == {}


def test_empty_sections_give_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "database:\nstorage:\nscheduler:\nlogging:\nmetrics:\n"))
    assert config.scheduler == SchedulerConfig() and config.services == {}


def test_extraction_limits(tmp_path: Path) -> None:
    assert (StorageConfig.extract_max_gib, StorageConfig.extract_max_ratio) == (1024, 100)
    config = load_config(write(tmp_path, {"storage": {"extract_max_gib": 3, "extract_max_ratio": 20}}))
    assert (config.storage.extract_max_gib, config.storage.extract_max_ratio) == (3, 20)


def test_systemd_directories_are_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/imputationd-a:/var/lib/other")  # several: the first one
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/imputationd")
    config = load_config(write(tmp_path, ""))
    assert config.storage.state_dir == Path("/var/lib/imputationd-a")
    assert config.storage.results_dir == Path("/var/lib/imputationd-a/results")
    assert config.storage.temp_dir == Path("/var/cache/imputationd")
    assert config.database.url == "sqlite:////var/lib/imputationd-a/imputationd.db"


def test_explicit_storage_beats_systemd_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/imputationd")
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/imputationd")
    config = load_config(write(tmp_path, {"storage": {"state_dir": "/data", "temp_dir": "/data/partial"}}))
    assert config.storage.state_dir == Path("/data")
    assert config.storage.results_dir == Path("/data/results")
    assert config.storage.temp_dir == Path("/data/partial")


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    content = {
        "database": {"url": "sqlite:///db/jobs.db?timeout=30"},
        "storage": {"state_dir": "state", "results_dir": "../results", "temp_dir": "/abs/tmp"},
        "services": {"michigan": {**VALID["services"]["michigan"], "token_file": "secrets/michigan.token"}},
    }
    config = load_config(write(etc, content))
    assert config.storage.state_dir == etc / "state"
    assert config.storage.results_dir == tmp_path / "results"
    assert config.storage.temp_dir == Path("/abs/tmp")
    assert config.database.url == f"sqlite:///{etc}/db/jobs.db?timeout=30"
    assert config.services["michigan"].token_file == etc / "secrets" / "michigan.token"


def test_relative_token_file_lives_in_systemd_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/imputationd.service")
    config = load_config(write(tmp_path, VALID))
    assert config.services["michigan"].token_file == Path("/run/credentials/imputationd.service/michigan.token")


def test_service_poll_interval_defaults_to_the_scheduler(tmp_path: Path) -> None:
    content = merged(VALID, {"scheduler": {"poll_interval": 42}})
    content["services"]["other"] = {**VALID["services"]["michigan"], "poll_interval": 7}
    config = load_config(write(tmp_path, content))
    assert config.services["michigan"].poll_interval == 42.0
    assert config.services["other"].poll_interval == 7.0


def test_submit_settle_defaults_to_the_longest_wait_for_a_submit_answer(tmp_path: Path) -> None:
    content = merged(VALID, {})
    content["services"]["short"] = {**VALID["services"]["michigan"], "submit_settle": 45, "timeout": 45}
    content["services"]["slow"] = {**VALID["services"]["michigan"], "timeout": 3600}
    config = load_config(write(tmp_path, content))
    assert config.services["michigan"].submit_settle is None
    assert config.services["michigan"].settle_seconds == SUBMIT_ANSWER_TIMEOUT == 1800.0
    assert config.services["short"].settle_seconds == 45.0
    assert config.services["slow"].settle_seconds == 3600.0


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(SchedulerConfig)])
def test_every_scheduler_field_is_a_key(tmp_path: Path, name: str) -> None:
    default = getattr(SchedulerConfig(), name)
    config = load_config(write(tmp_path, {"scheduler": {name: default}}))
    assert getattr(config.scheduler, name) == default


def test_yaml_merge_keys_may_override_without_counting_as_duplicates(tmp_path: Path) -> None:
    text = """
services:
  a: &cloudgene
    type: cloudgene
    base_url: https://a.example.org
    token_file: a.token
  b:
    <<: *cloudgene
    base_url: https://b.example.org
    token_file: b.token
"""
    config = load_config(write(tmp_path, text))
    assert config.services["b"].base_url == "https://b.example.org"
    assert config.services["b"].token_file == tmp_path / "b.token"


# --- files that do not load ------------------------------------------------------------------------------------------

MALFORMED: list[tuple[str, dict[str, Any], str, str]] = [
    # (case id, override merged onto VALID, key path, fragment of the message)
    ("workers-text", {"scheduler": {"workers": "x"}}, "scheduler.workers", "must be an integer from 1 to 256, got 'x'"),
    ("workers-zero", {"scheduler": {"workers": 0}}, "scheduler.workers", "from 1 to 256, got 0"),
    ("workers-bool", {"scheduler": {"workers": True}}, "scheduler.workers", "got true"),
    ("workers-float", {"scheduler": {"workers": 8.0}}, "scheduler.workers", "got 8.0"),
    ("poll-zero", {"scheduler": {"poll_interval": 0}}, "scheduler.poll_interval", "greater than 0"),
    ("dispatch-negative", {"scheduler": {"dispatch_interval": -1}}, "scheduler.dispatch_interval", "greater than 0"),
    ("tick-too-long", {"scheduler": {"poll_tick_interval": 7200}}, "scheduler.poll_tick_interval", "at most 3600"),
    ("shutdown-inf", {"scheduler": {"shutdown_timeout": float("inf")}}, "scheduler.shutdown_timeout", "got inf"),
    ("probe-zero", {"scheduler": {"blocked_probe_initial": 0}}, "scheduler.blocked_probe_initial", "greater than 0"),
    ("probe-max-below-initial", {"scheduler": {"blocked_probe_initial": 60, "blocked_probe_max": 30}},
     "scheduler.blocked_probe_max", "at least blocked_probe_initial (60), got 30"),
    ("lease-short", {"scheduler": {"lease_seconds": 3}}, "scheduler.lease_seconds", "longer than every tick interval"),
    ("lease-vs-tick", {"scheduler": {"download_interval": 600}}, "scheduler.lease_seconds", "download_interval is 600"),
    ("backoff-order", {"scheduler": {"backoff_max": 5}}, "scheduler.backoff_max", "at least backoff_initial (10)"),
    ("batch-float", {"scheduler": {"batch_size": 2.5}}, "scheduler.batch_size", "integer"),
    ("scheduler-typo", {"scheduler": {"wokers": 4}}, "scheduler.wokers", "unknown key (did you mean 'workers'?)"),
    ("scheduler-list", {"scheduler": [1, 2]}, "scheduler", "must be a mapping, got a list"),
    ("log-format", {"logging": {"format": "xml"}}, "logging.format", "must be one of auto, json, console, got 'xml'"),
    ("log-level", {"logging": {"level": "verbose"}}, "logging.level", "debug, info, warning, error"),
    ("listen-int", {"metrics": {"listen": 9478}}, "metrics.listen", 'must be "host:port"'),
    ("listen-no-port", {"metrics": {"listen": "localhost"}}, "metrics.listen", "port from 1 to 65535"),
    ("listen-no-host", {"metrics": {"listen": ":9478"}}, "metrics.listen", "needs a host"),
    ("listen-ipv6", {"metrics": {"listen": "::1:9478"}}, "metrics.listen", "brackets"),
    ("listen-port-range", {"metrics": {"listen": "0.0.0.0:70000"}}, "metrics.listen", "1 to 65535"),
    ("db-postgresql", {"database": {"url": "postgresql://u@h/db"}}, "database.url", "use postgresql+psycopg://"),
    ("db-mysql", {"database": {"url": "mysql://u@h/db"}}, "database.url", "got mysql://"),
    ("db-memory", {"database": {"url": "sqlite://"}}, "database.url", "sqlite:///"),
    ("db-memory-explicit", {"database": {"url": "sqlite:///:memory:"}}, "database.url", "in-memory"),
    ("db-pool", {"database": {"pool_size": 0}}, "database.pool_size", "from 1 to 100"),
    ("db-echo-text", {"database": {"echo": "yes"}}, "database.echo", "must be true or false"),
    ("db-typo", {"database": {"uri": "sqlite:///x.db"}}, "database.uri", "did you mean 'url'?"),
    ("keep-days", {"storage": {"keep_days": 0}}, "storage.keep_days", "from 1 to 36500"),
    ("extract-ratio", {"storage": {"extract_max_ratio": 0}}, "storage.extract_max_ratio", "from 1 to 1048576"),
    ("extract-gib", {"storage": {"extract_max_gib": "1T"}}, "storage.extract_max_gib", "from 1 to 1048576"),
    ("state-dir-number", {"storage": {"state_dir": 5}}, "storage.state_dir", "must be text"),
    ("state-dir-empty", {"storage": {"state_dir": ""}}, "storage.state_dir", "non-empty"),
    ("temp-is-results", {"storage": {"results_dir": "/x", "temp_dir": "/x"}}, "storage.temp_dir", "must differ"),
    ("storage-text", {"storage": "/var/lib"}, "storage", "must be a mapping"),
    ("top-typo", {"servcies": {}}, "servcies", "did you mean 'services'?"),
    ("services-list", {"services": ["michigan"]}, "services", "must be a mapping of service name"),
    ("service-name", {"services": {"Michigan Server": VALID["services"]["michigan"]}}, "services.Michigan Server",
     "service names must be"),
    ("service-not-mapping", {"services": {"michigan": "https://x.org"}}, "services.michigan", "must be a mapping"),
    ("type-missing", michigan(type=DELETE), "services.michigan.type", "required"),
    ("type-bad", michigan(type="slurm"), "services.michigan.type", "must be one of cloudgene, wes"),
    ("url-missing", michigan(base_url=DELETE), "services.michigan.base_url", "required"),
    ("url-ftp", michigan(base_url="ftp://x.org"), "services.michigan.base_url",
     "not a URL (expected http:// or https://)"),
    ("url-bare-host", michigan(base_url="imputationserver.sph.umich.edu"), "services.michigan.base_url", "not a URL"),
    ("url-credentials", michigan(base_url="https://me:pw@x.org"), "services.michigan.base_url", "credentials"),
    ("url-query", michigan(base_url="https://x.org/?a=b"), "services.michigan.base_url", "query string"),
    ("url-port", michigan(base_url="https://x.org:99999"), "services.michigan.base_url", "invalid port"),
    ("url-plain-http", michigan(base_url="http://imputation.example.org"), "services.michigan.base_url",
     "plain http:// to imputation.example.org would send the token and the genotype files unencrypted; use https://, "
     "or set allow_plain_http: true if the network to it is trusted"),
    ("url-plain-http-ip", michigan(base_url="http://10.0.0.5:8080/api/v2"), "services.michigan.base_url",
     "plain http:// to 10.0.0.5"),
    ("allow-http-text", michigan(allow_plain_http="yes"), "services.michigan.allow_plain_http", "true or false"),
    ("no-credential", michigan(token_file=DELETE), "services.michigan", "needs token_file or token_env"),
    ("two-credentials", michigan(token_env="MICHIGAN_TOKEN"), "services.michigan", "exactly one of"),
    ("token-env-name", michigan(token_file=DELETE, token_env="my-token"), "services.michigan.token_env",
     "name of an environment variable"),
    ("token-file-empty", michigan(token_file=""), "services.michigan.token_file", "must be the path of a file"),
    ("token-file-is-token", michigan(token_file=TOKEN), "services.michigan.token_file", "holds a token"),
    ("app-bad", michigan(app="imputation server"), "services.michigan.app", "Cloudgene app id"),
    ("jobs-zero", michigan(max_concurrent_jobs=0), "services.michigan.max_concurrent_jobs", "from 1 to 1000"),
    ("workers-share-zero", michigan(max_workers=0), "services.michigan.max_workers", "from 1 to 256"),
    ("workers-share-text", michigan(max_workers="half"), "services.michigan.max_workers", "integer"),
    ("workers-share-above-pool", {**michigan(max_workers=3), "scheduler": {"workers": 2}},
     "services.michigan.max_workers", "must not exceed scheduler.workers (2), got 3"),
    ("timeout-units", michigan(timeout="30s"), "services.michigan.timeout", "number of seconds"),
    ("poll-text", michigan(poll_interval="fast"), "services.michigan.poll_interval", "number of seconds"),
    ("upload-negative", michigan(max_upload_mb=-1), "services.michigan.max_upload_mb", "integer"),
    ("samples-order", michigan(min_samples=100, max_samples=50), "services.michigan.min_samples",
     "must not exceed max_samples (50)"),
    ("samples-order-default", michigan(min_samples=60000), "services.michigan.min_samples", "max_samples (50000)"),
    ("service-typo", michigan(max_concurent_jobs=2), "services.michigan.max_concurent_jobs",
     "did you mean 'max_concurrent_jobs'?"),
    ("settle-zero", michigan(submit_settle=0), "services.michigan.submit_settle", "greater than 0"),
    ("settle-text", michigan(submit_settle="30m"), "services.michigan.submit_settle", "got '30m'"),
    ("settle-below-timeout", michigan(submit_settle=20, timeout=30), "services.michigan.submit_settle",
     "at least the service's timeout (30 s)"),
    ("resubmit-regex", michigan(resubmit_on=["Pipeline (failed"]), "services.michigan.resubmit_on",
     "'Pipeline (failed' is not a regular expression"),
    ("resubmit-text", michigan(resubmit_on="DEAD"), "services.michigan.resubmit_on", "must be a list of texts"),
    ("resubmit-max", michigan(resubmit_max=0), "services.michigan.resubmit_max", "from 1 to 20"),
    ("auth-bad", michigan(auth="basic"), "services.michigan.auth", "must be one of token, none, got 'basic'"),
    ("auth-none-cloudgene", michigan(auth="none", token_file=DELETE), "services.michigan.auth",
     "a Cloudgene server always takes a token"),
    ("auth-none-with-token", {"services": {"michigan": {**WES_SERVICE, "auth": "none"}}},
     "services.michigan.token_env", "not used with auth: none"),
    ("wes-outputs-as", as_wes(outputs_as="s3"), "services.michigan.wes.outputs_as", "must be one of url, path"),
    ("wes-outputs-root-missing", as_wes(outputs_as="path"), "services.michigan.wes.outputs_root",
     "required with outputs_as: path"),
    ("cancel-timeout-zero", michigan(cancel_timeout=0), "services.michigan.cancel_timeout", "greater than 0"),
    ("cancel-timeout-text", michigan(cancel_timeout="10m"), "services.michigan.cancel_timeout", "got '10m'"),
    ("panels-text", michigan(panels="hrc"), "services.michigan.panels", "must be a mapping of panel name"),
    ("panel-name", michigan(panels={"hrc panel!": {"id": "x"}}), "services.michigan.panels.hrc panel!",
     "panel names must be"),
    ("panel-id-empty", panel(id=""), "services.michigan.panels.hrc.id", "non-empty"),
    ("panel-id-missing", panel(id=DELETE, builds=["hg19"]), "services.michigan.panels.hrc.id",
     "required"),
    ("panel-build", panel(builds=["hg18"]), "services.michigan.panels.hrc.builds", "unknown 'hg18'"),
    ("panel-build-text", panel(builds="hg19"), "services.michigan.panels.hrc.builds", "must be a list"),
    ("panel-build-none", panel(builds=[]), "services.michigan.panels.hrc.builds", "at least one"),
    ("panel-build-twice", panel(builds=["hg19", "hg19"]), "services.michigan.panels.hrc.builds", "more than once"),
    ("panel-population", panel(populations=["EUR"]), "services.michigan.panels.hrc.populations", "unknown 'EUR'"),
    ("panel-population-off", panel(populations=[False]), "services.michigan.panels.hrc.populations", "quote 'off'"),
    ("panel-phasing", panel(phasing=["shapeit"]), "services.michigan.panels.hrc.phasing", "unknown 'shapeit'"),
    ("panel-phasing-none", panel(phasing=[]), "services.michigan.panels.hrc.phasing", "at least one"),
    ("panel-typo", panel(population=["eur"]), "services.michigan.panels.hrc.population", "did you mean"),
    ("wes-on-cloudgene", michigan(wes=WES_SERVICE["wes"]), "services.michigan.wes", "only for services of type wes"),
    ("wes-missing", michigan(type="wes"), "services.michigan.wes", "required for services of type wes"),
    ("app-on-wes", {"services": {"michigan": {**WES_SERVICE, "app": "imputationserver2"}}}, "services.michigan.app",
     "only used by cloudgene"),
    ("wes-url-missing", as_wes(workflow_url=DELETE), "services.michigan.wes.workflow_url", "required"),
    ("wes-version-number", as_wes(workflow_type_version=1.0), "services.michigan.wes.workflow_type_version",
     "quote it"),
    ("wes-inputs-as", as_wes(inputs_as="upload"), "services.michigan.wes.inputs_as", "attachment, path"),
    ("wes-page-size", as_wes(page_size=0), "services.michigan.wes.page_size", "from 1 to 1000"),
    ("wes-params-list", as_wes(engine_parameters=["-resume"]), "services.michigan.wes.engine_parameters",
     "must be a mapping"),
    ("wes-placeholder", as_wes(workflow_params={"vcfs": "{file}"}), "services.michigan.wes.workflow_params.vcfs",
     "unknown placeholder {file}"),
    ("wes-params-date", as_wes(workflow_params={"when": dt.date(2024, 1, 1)}), "services.michigan.wes.workflow_params",
     "JSON"),
    ("wes-not-mapping", michigan(type="wes", wes="main.nf"), "services.michigan.wes", "must be a mapping"),
]


@pytest.mark.parametrize(("override", "key_path", "fragment"), [case[1:] for case in MALFORMED],
                         ids=[case[0] for case in MALFORMED])
def test_malformed_config_names_the_key_path(tmp_path: Path, override: dict, key_path: str, fragment: str) -> None:
    problems = problems_of(write(tmp_path, merged(VALID, override)))
    assert any(p.startswith(f"{key_path}: ") and fragment in p for p in problems), problems


@pytest.mark.parametrize(
    ("workers", "services", "max_workers", "share"),
    [
        (2, 1, None, 2),  # alone: nobody to starve
        (2, 2, None, 1),  # with workers: 2, one service never takes both
        (8, 3, None, 7),
        (1, 3, None, 1),
        (8, 3, 2, 2),
        (8, 1, 3, 3),
    ],
)
def test_a_services_share_of_the_workers(tmp_path: Path, workers: int, services: int, max_workers: int | None,
                                         share: int) -> None:
    michigan_settings = VALID["services"]["michigan"] | ({"max_workers": max_workers} if max_workers else {})
    content = {"scheduler": {"workers": workers},
               "services": {f"s{n}" if n else "michigan": michigan_settings for n in range(services)}}
    config = load_config(write(tmp_path, content))
    assert config.worker_share("michigan") == share


def test_every_problem_is_reported_not_just_the_first(tmp_path: Path) -> None:
    content = merged(
        VALID,
        {
            "scheduler": {"workers": "x", "wokers": 3},
            "logging": {"level": "loud"},
            "database": {"url": "postgresql://u@h/db"},
            "services": {"michigan": {"base_url": "ftp://x", "panels": {"hrc": {"builds": ["hg18"]}}}},
        },
    )
    problems = problems_of(write(tmp_path, content))
    paths = sorted(p.split(": ", 1)[0] for p in problems)
    assert paths == [
        "database.url",
        "logging.level",
        "scheduler.wokers",
        "scheduler.workers",
        "services.michigan.base_url",
        "services.michigan.panels.hrc.builds",
    ]


def test_empty_service_reports_each_missing_key(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, "services:\n  michigan:\n"))
    assert "services.michigan.type: required" in problems
    assert "services.michigan.base_url: required" in problems
    assert any(p.startswith("services.michigan: needs token_file or token_env") for p in problems)


@pytest.mark.parametrize("content", ["services: {}\n", "services:\n  # michigan:\n  #   type: cloudgene\n"])
def test_an_empty_services_section_is_an_error(tmp_path: Path, content: str) -> None:
    # Left out it is not (test_empty_file_gives_defaults): commands such as `db upgrade` and `jobs` need no service.
    assert problems_of(write(tmp_path, content)) == [
        "services: no service configured; add one (type, base_url, token_file or token_env; see "
        "config/imputationd.example.yaml)"
    ]


@pytest.mark.parametrize(
    ("url", "allow"),
    [("http://localhost:8080", False), ("http://127.0.0.2", False), ("http://[::1]:1122", False),
     ("http://wes.localhost", False), ("http://wes.internal:1122", True), ("https://x.org", False)],
)
def test_plain_http_to_this_machine_or_when_allowed_loads(tmp_path: Path, url: str, allow: bool) -> None:
    config = load_config(write(tmp_path, merged(VALID, michigan(base_url=url, allow_plain_http=allow))))
    assert config.services["michigan"].base_url == url
    assert config.services["michigan"].allow_plain_http is allow


def test_a_wes_server_without_auth_needs_no_token_at_all(tmp_path: Path) -> None:
    service = {key: value for key, value in WES_SERVICE.items() if key != "token_env"} | {"auth": "none"}
    config = load_config(write(tmp_path, {"services": {"open-wes": service}}))
    assert config.services["open-wes"].auth == "none" and config.services["open-wes"].read_token() is None
    assert [p for p in check_runtime(config) if p.startswith("services.")] == []  # no credential to check
    # Without auth: none, the same service still needs one.
    problems = problems_of(write(tmp_path, {"services": {"open-wes": {k: v for k, v in service.items()
                                                                       if k != "auth"}}}))
    assert any(p.startswith("services.open-wes: needs token_file or token_env") for p in problems)


def test_did_you_mean_and_the_list_of_keys(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, {"scheduler": {"wokers": 4, "zzz": 1}}))
    assert "scheduler.wokers: unknown key (did you mean 'workers'?)" in problems
    expected = "scheduler.zzz: unknown key (expected one of: workers, dispatch_interval, poll_tick_interval"
    assert any(p.startswith(expected) for p in problems), problems


def test_bare_off_in_yaml_is_explained(tmp_path: Path) -> None:
    text = """
services:
  michigan:
    type: cloudgene
    base_url: https://imputationserver.sph.umich.edu
    token_file: michigan.token
    panels:
      hrc: {id: apps@hrc-r1.1@2.0.0, populations: [eur, off]}
"""
    problems = problems_of(write(tmp_path, text))
    assert any(p.startswith("services.michigan.panels.hrc.populations: quote 'off'") for p in problems), problems


# --- secrets ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key_path"),
    [
        (michigan(token=TOKEN), "services.michigan.token"),
        (michigan(password=TOKEN), "services.michigan.password"),
        (michigan(**{"API-Key": TOKEN}), "services.michigan.API-Key"),
        (michigan(secret=TOKEN), "services.michigan.secret"),
        (panel(id="apps@hrc-r1.1@2.0.0", password=TOKEN), "services.michigan.panels.hrc.password"),
        (as_wes(token=TOKEN), "services.michigan.wes.token"),
        (as_wes(workflow_params={"auth": {"api_key": TOKEN}}), "services.michigan.wes.workflow_params.auth.api_key"),
        (
            as_wes(engine_parameters={"list": [{"secret": TOKEN}]}),
            "services.michigan.wes.engine_parameters.list[0].secret",
        ),
    ],
)
def test_secrets_in_the_yaml_are_refused_without_echoing_them(tmp_path: Path, override: dict, key_path: str) -> None:
    path = write(tmp_path, merged(VALID, override))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"{key_path}: secrets are never stored in the YAML; use token_file or token_env" in caught.value.problems
    assert TOKEN not in str(caught.value)
    assert TOKEN not in format_problems(caught.value)


@pytest.mark.parametrize(
    "override",
    [
        michigan(token_file=DELETE, token_env=TOKEN),
        michigan(token_file=DELETE, token_env=123),
        michigan(token_file=TOKEN),
        michigan(token_file=12345678901234567890),
        michigan(base_url=f"https://user:{TOKEN}@x.org"),
        michigan(base_url=TOKEN),
        {"database": {"url": f"postgresql://user:{TOKEN}@db/imputationd"}},
        {"database": {"url": f"mysql://user:{TOKEN}@db/imputationd"}},
    ],
)
def test_values_that_may_hold_secrets_are_never_echoed(tmp_path: Path, override: dict) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, merged(VALID, override)))
    assert TOKEN not in str(caught.value)
    assert "12345678901234567890" not in str(caught.value)


# --- reading the file ------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path}: cannot read: No such file or directory"]
    assert format_problems(caught.value) == f"{path}: cannot read: No such file or directory"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert problems_of(tmp_path) == [f"{tmp_path}: cannot read: Is a directory"]


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"logging:\n  level: \xff\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: cannot read: not UTF-8")


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "scheduler:\n  workers: 4\n   batch_size: 10\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    [problem] = caught.value.problems
    assert problem.startswith("line 3, column ")
    assert caught.value.source == path
    assert format_problems(caught.value).startswith(f"{path}: line 3, column ")


def test_unclosed_bracket_is_a_syntax_error(tmp_path: Path) -> None:
    [problem] = problems_of(write(tmp_path, "services: {michigan: [1, 2\n"))
    assert problem.startswith("line ") and ", column " in problem


def test_duplicate_keys_are_an_error(tmp_path: Path) -> None:
    [problem] = problems_of(write(tmp_path, "scheduler:\n  workers: 4\nlogging: {}\nscheduler:\n  workers: 5\n"))
    assert problem.startswith("line 4, column 1: duplicate key 'scheduler' (first at line 1)")


def wes_with_params(params: str) -> str:
    """A WES service whose workflow_params (a free-form section: every value of it is walked) are `params`, YAML
    text indented to follow the key."""
    service = "services:\n  m:\n    type: wes\n    base_url: https://x.org\n    token_env: T\n    wes:\n"
    service += "      workflow_url: main.nf\n      workflow_type: NFL\n      workflow_type_version: '1'\n"
    return service + "      workflow_params: " + params + "\n"


def laughs(levels: int) -> str:
    """A "billion laughs" document: each anchor is a list of ten aliases of the one before (10^levels values)."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * 10)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return wes_with_params("\n" + "".join(f"        {line}\n" for line in lines))


@pytest.mark.parametrize("flow", [True, False], ids=["flow", "block"])
def test_deep_nesting_is_one_error_not_a_traceback(tmp_path: Path, flow: bool) -> None:
    if flow:
        text = "scheduler: " + "[" * 5000 + "]" * 5000 + "\n"
    else:
        text = "scheduler:\n" + "".join("  " * level + "- \n" for level in range(1, 5000))
    [problem] = problems_of(write(tmp_path, text))
    assert problem.startswith(("line 1, column ", "line 65, column ")) and problem.endswith(
        "nested more than 64 levels deep"), problem


def test_nesting_is_counted_through_aliases(tmp_path: Path) -> None:
    text = "x0: &x0 [1]\n" + "".join(f"x{i}: &x{i} {'[' * 40}*x{i - 1}{']' * 40}\n" for i in range(1, 200))
    [problem] = problems_of(write(tmp_path, text))
    assert problem == "line 2, column 5: nested more than 64 levels deep once its aliases are expanded"


@pytest.mark.parametrize(("brackets", "loads"), [(58, True), (59, False)])
def test_nesting_up_to_64_levels_loads(tmp_path: Path, brackets: int, loads: bool) -> None:
    # The file, services, m, wes and workflow_params are five levels, the lists 58 or 59, the innermost value one.
    line = "{deep: " + "[" * brackets + "1" + "]" * brackets + "}"
    text = wes_with_params(line)
    if loads:
        assert load_config(write(tmp_path, text)).services["m"].wes is not None
    else:
        column = len("      workflow_params: ") + line.index("1") + 1
        assert problems_of(write(tmp_path, text)) == [f"line 10, column {column}: nested more than 64 levels deep"]


@pytest.mark.parametrize("levels", [6, 9])
def test_an_alias_bomb_is_refused(tmp_path: Path, levels: int) -> None:
    # 10^6 values took a few seconds to check, 10^9 ("billion laughs") hung check-config and run.
    [problem] = problems_of(write(tmp_path, laughs(levels)))
    assert problem.startswith("line ")
    assert problem.endswith("holds more than 100000 values once its aliases are expanded (a configuration needs a "
                            "few hundred; is this a YAML alias bomb?)")


def test_a_merge_key_bomb_is_refused(tmp_path: Path) -> None:
    text = "a0: &a0 {k0: 1, k1: 2}\n" + "".join(
        f"a{i}: &a{i} {{<<: [*a{i - 1}, *a{i - 1}], x{i}: 1}}\n" for i in range(1, 40)
    )
    [problem] = problems_of(write(tmp_path, text))
    assert "holds more than 100000 values once its aliases are expanded" in problem


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    text = "services:\n  m: &m\n    type: wes\n    wes: {workflow_params: {again: [*m]}}\n"
    assert problems_of(write(tmp_path, text)) == [
        "line 2, column 6: an alias refers to a value that contains it (a recursive value)"
    ]


def test_small_anchors_shared_between_services_load(tmp_path: Path) -> None:
    params = "{" + ", ".join(f"p{i}: [{', '.join(str(n) for n in range(50))}]" for i in range(20)) + "}"
    text = wes_with_params("&params " + params)
    for name in ("n", "o", "p"):
        text += f"  {name}:\n    type: wes\n    base_url: https://{name}.org\n    token_env: T\n"
        text += "    wes: {workflow_url: main.nf, workflow_type: NFL, workflow_type_version: '1', "
        text += "workflow_params: *params}\n"
    config = load_config(write(tmp_path, text))
    assert {name: len(service.wes.workflow_params) for name, service in config.services.items()} == dict.fromkeys(
        "mnop", 20)


@pytest.mark.parametrize(("content", "got"), [("- a\n- b\n", "a list"), ("just text\n", "'just text'")])
def test_top_level_must_be_a_mapping(tmp_path: Path, content: str, got: str) -> None:
    assert problems_of(write(tmp_path, content)) == [f"(top level): must be a mapping of sections, got {got}"]


def test_format_problems_prefixes_each_line_with_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"scheduler": {"workers": 0}, "logging": {"level": "x"}})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    lines = format_problems(caught.value).splitlines()
    assert len(lines) == 2
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert lines[0] == f"{path}: scheduler.workers: must be an integer from 1 to 256, got 0"


# --- check_runtime ---------------------------------------------------------------------------------------------------


def runtime_config(tmp_path: Path, service: dict[str, Any]) -> Config:
    storage = {"state_dir": str(tmp_path / "state")}
    return load_config(write(tmp_path, {"storage": storage, "services": {"michigan": service}}))


def cloudgene(**credential: Any) -> dict[str, Any]:
    return {"type": "cloudgene", "base_url": "https://x.org", **credential}


def test_runtime_all_good(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "michigan.token").write_text(TOKEN + "\n")
    (tmp_path / "michigan.token").chmod(0o640)
    assert check_runtime(runtime_config(tmp_path, cloudgene(token_file="michigan.token"))) == []
    monkeypatch.setenv("MICHIGAN_TOKEN", TOKEN)
    assert check_runtime(runtime_config(tmp_path, cloudgene(token_env="MICHIGAN_TOKEN"))) == []


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        (lambda path: None, "does not exist"),
        (lambda path: path.write_text(" \n"), "is empty"),
        (lambda path: path.mkdir(), "is a directory"),
        (lambda path: path.write_text(f"{TOKEN}\n{TOKEN}\n"), "holds more than the token"),
        (lambda path: path.write_bytes(b"\xff\xfe"), "not UTF-8"),
    ],
    ids=["missing", "empty", "directory", "two-lines", "binary"],
)
def test_runtime_token_file_problems(tmp_path: Path, setup: Any, fragment: str) -> None:
    token_path = tmp_path / "michigan.token"
    setup(token_path)
    problems = check_runtime(runtime_config(tmp_path, cloudgene(token_file="michigan.token")))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"services.michigan.token_file: {token_path}")
    assert fragment in problems[0]
    assert TOKEN not in problems[0]


@pytest.mark.parametrize(("mode", "can"), [(0o644, "read"), (0o604, "read"), (0o602, "changed"),
                                           (0o666, "read and changed")])
def test_runtime_token_file_open_to_every_user(tmp_path: Path, mode: int, can: str) -> None:
    token_path = tmp_path / "michigan.token"
    token_path.write_text(TOKEN)
    token_path.chmod(mode)
    problems = check_runtime(runtime_config(tmp_path, cloudgene(token_file="michigan.token")))
    assert problems == [f"services.michigan.token_file: {token_path} can be {can} by every user of this machine "
                        f"(mode {mode:04o}); chmod o-rwx it"]
    token_path.chmod(mode & 0o770)
    assert check_runtime(runtime_config(tmp_path, cloudgene(token_file="michigan.token"))) == []


def test_runtime_unreadable_token_file() -> None:
    def problems(directory: Path) -> list[str]:
        token_path = directory / "michigan.token"
        token_path.write_text(TOKEN)
        token_path.chmod(0)
        return check_runtime(runtime_config(directory, cloudgene(token_file="michigan.token")))

    with unprivileged_dir() as directory:  # root reads any file: the check runs as a user permissions apply to
        assert run_unprivileged(problems, directory) == [
            f"services.michigan.token_file: {directory / 'michigan.token'} cannot be read by this user "
            "(permission denied)"
        ]


def test_runtime_token_file_in_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "michigan.token").write_text(TOKEN)
    (credentials / "michigan.token").chmod(0o400)  # as systemd makes it
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    config = runtime_config(tmp_path, cloudgene(token_file="michigan.token"))
    assert check_runtime(config) == []
    assert config.services["michigan"].read_token() == TOKEN

    # A service built in code with a relative path is looked up the same way read_token does.
    service = ServiceConfig(name="m", type="cloudgene", base_url="https://x.org", token_file=Path("michigan.token"))
    direct = dataclasses.replace(config, services={"m": service})
    assert check_runtime(direct) == []
    (credentials / "michigan.token").unlink()
    assert check_runtime(direct) == [f"services.m.token_file: {credentials / 'michigan.token'} does not exist"]


@pytest.mark.parametrize(("value", "fragment"), [(None, "is not set"), ("  ", "is empty")])
def test_runtime_token_env_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str | None,
                                    fragment: str) -> None:
    if value is None:
        monkeypatch.delenv("MICHIGAN_TOKEN", raising=False)
    else:
        monkeypatch.setenv("MICHIGAN_TOKEN", value)
    problems = check_runtime(runtime_config(tmp_path, cloudgene(token_env="MICHIGAN_TOKEN")))
    assert problems == [f"services.michigan.token_env: the environment variable it names {fragment}"]


def test_runtime_storage_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("not a directory")
    problems = check_runtime(load_config(write(tmp_path, {"storage": {"state_dir": "state"}})))
    assert f"storage.state_dir: {tmp_path / 'state'} exists and is not a directory" in problems


def test_runtime_storage_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("")
    problems = check_runtime(load_config(write(tmp_path, {"storage": {"results_dir": "blocker/results"}})))
    assert f"storage.results_dir: {tmp_path / 'blocker'} exists and is not a directory" in problems


def test_runtime_storage_not_created_yet_is_fine(tmp_path: Path) -> None:
    storage = {"state_dir": "not/yet/there", "temp_dir": str(tmp_path)}
    assert check_runtime(load_config(write(tmp_path, {"storage": storage}))) == []


def test_runtime_storage_not_writable() -> None:
    def problems(directory: Path) -> list[str]:
        (directory / "state").mkdir(mode=0o500)
        return check_runtime(load_config(write(directory, {"storage": {"state_dir": "state"}})))

    with unprivileged_dir() as directory:  # root writes anywhere: the check runs as a user permissions apply to
        assert f"storage.state_dir: {directory / 'state'} is not writable by this user" in run_unprivileged(
            problems, directory
        )


# --- find_config_path ------------------------------------------------------------------------------------------------


def test_find_config_path_order(monkeypatch: pytest.MonkeyPatch) -> None:
    assert find_config_path(None) == DEFAULT_CONFIG_PATH == Path("/etc/imputationd/config.yaml")
    monkeypatch.setenv("IMPUTATIOND_CONFIG", "")
    assert find_config_path(None) == DEFAULT_CONFIG_PATH
    monkeypatch.setenv("IMPUTATIOND_CONFIG", "/srv/env.yaml")
    assert find_config_path(None) == Path("/srv/env.yaml")
    assert find_config_path("/srv/cli.yaml") == Path("/srv/cli.yaml")
    assert find_config_path(Path("cli.yaml")) == Path("cli.yaml")
