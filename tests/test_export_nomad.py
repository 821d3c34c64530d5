"""Nomad jobs parsed with python-hcl2, a maintained HCL2 parser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hcl2
import pytest

from supervisor.config import load_config
from supervisor.export import export_config
from tests.test_export import PORTABLE_PROJECTS, REPOSITORY, make_every_setting_folder


@pytest.fixture(autouse=True)
def utc_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")


def parse_job(text: str) -> tuple[str, dict[str, Any]]:
    [job] = hcl2.loads(text)["job"]
    [(name, body)] = job.items()
    return name.strip('"'), body


def unquote(value: str) -> str:
    """Decode an HCL2 string literal as python-hcl2 returns it."""
    import json

    return str(json.loads(value.replace("$${", "${").replace("%%{", "%{")))


def jobs(tmp_path: Path) -> dict[str, dict[str, Any]]:
    parsed = {}
    for config, projects in (
        (load_config(REPOSITORY / "config.example.toml"), None),
        (load_config(make_every_setting_folder(tmp_path)), PORTABLE_PROJECTS),
    ):
        for file in export_config(config, "nomad", projects=projects).files:
            name, body = parse_job(file.text)
            parsed[name] = body
    return parsed


def test_every_job_parses_with_its_type(tmp_path: Path) -> None:
    parsed = jobs(tmp_path)

    types = {name: unquote(body["type"]) for name, body in parsed.items()}
    assert types == {
        "hello": "batch",
        "tick": "batch",
        "web": "service",
        "report": "batch",
        "sweep": "batch",
        "api": "service",
        "Checker_2": "service",
        "once": "batch",
    }
    assert "periodic" in parsed["tick"]
    assert "parameterized" in parsed["once"]


def test_periodic_job_keeps_schedule_settings(tmp_path: Path) -> None:
    report = jobs(tmp_path)["report"]

    [periodic] = report["periodic"]
    assert [unquote(cron) for cron in periodic["crons"]] == ["30 2 * * 1-5"]
    assert periodic["prohibit_overlap"] is True
    assert unquote(periodic["time_zone"]) == "Europe/Paris"


def test_task_keeps_values_and_secret_references(tmp_path: Path) -> None:
    [group] = jobs(tmp_path)["report"]["group"]
    [task] = group['"report"']["task"]
    body = task['"report"']

    [env] = body["env"]
    assert unquote(env["QUOTED"]) == 'it\'s "quoted" $HOME ${HOME} %h \\ back'
    assert unquote(env["MULTI"]) == "line one\nline two"
    assert unquote(env["RUNVISOR_RUN_ID"]) == "${NOMAD_ALLOC_ID}"
    templates = [unquote(template["data"]) for template in body["template"]]
    assert templates == [
        '{{ with nomadVar "nomad/jobs/report" }}'
        '{{ index . "report.API_SECRET" }}{{ end }}',
        '{{ with nomadVar "nomad/jobs/report" }}{{ index . "my-notion" }}{{ end }}',
    ]


def test_service_job_has_restart_and_check(tmp_path: Path) -> None:
    [group] = jobs(tmp_path)["api"]["group"]
    body = group['"api"']

    [restart] = body["restart"]
    assert restart["attempts"] == 4
    assert unquote(restart["interval"]) == "10m"
    [service] = body["service"]
    [check] = service["check"]
    assert unquote(check["type"]) == "tcp"
    assert check["check_restart"][0]["limit"] == 5
