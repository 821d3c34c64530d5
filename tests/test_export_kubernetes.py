"""Kubernetes manifests validated against the official schemas.

kubernetes-validate ships the JSON schemas generated from the Kubernetes
OpenAPI definitions, so the manifests are checked offline in strict mode
(unknown fields are errors).
"""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from supervisor.config import load_config
from supervisor.export import ExportOptions, export_config
from tests.test_export import PORTABLE_PROJECTS, REPOSITORY, make_every_setting_folder

# CronJob timeZone is stable from Kubernetes 1.27 on.
KUBERNETES_VERSIONS = ["1.27.0", kubernetes_validate.latest_version()]


@pytest.fixture(autouse=True)
def utc_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")


def manifests(tmp_path: Path, options: ExportOptions) -> list[dict[str, object]]:
    documents = []
    for config, projects in (
        (load_config(REPOSITORY / "config.example.toml"), None),
        (load_config(make_every_setting_folder(tmp_path)), PORTABLE_PROJECTS),
    ):
        for file in export_config(config, "kubernetes", options, projects).files:
            documents += [doc for doc in yaml.safe_load_all(file.text) if doc]
    return documents


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    "options",
    [
        ExportOptions(),
        ExportOptions(k8s_source="image", image="registry.example/app:1"),
    ],
    ids=["configmap", "image"],
)
def test_manifests_match_kubernetes_schemas(
    version: str, options: ExportOptions, tmp_path: Path
) -> None:
    documents = manifests(tmp_path, options)

    kinds = sorted({str(document["kind"]) for document in documents})
    expected = ["CronJob", "Deployment", "Job"]
    if options.k8s_source == "configmap":
        expected = ["ConfigMap", *expected]
    assert kinds == expected
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)


def test_configmap_holds_project_files_exactly(tmp_path: Path) -> None:
    import base64

    config = load_config(make_every_setting_folder(tmp_path))

    result = export_config(config, "kubernetes", projects=["report"])

    configmap = yaml.safe_load(result.files[0].text)
    folder = tmp_path / "report folder"
    assert configmap["data"]["run.sh"] == (folder / "run.sh").read_text()
    assert configmap["data"]["notes.txt"] == (folder / "notes.txt").read_text()
    blob = base64.b64decode(configmap["binaryData"]["data__blob.bin"])
    assert blob == (folder / "data/blob.bin").read_bytes()
    assert ".env.local" not in configmap["data"]
    assert not any(".git" in key for key in configmap["data"])


def test_secrets_are_secret_key_refs(tmp_path: Path) -> None:
    config = load_config(make_every_setting_folder(tmp_path))
    options = ExportOptions(k8s_secret="team-secrets")

    result = export_config(config, "kubernetes", options, projects=["report"])

    cronjob = yaml.safe_load(result.files[1].text)
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    env = {entry["name"]: entry for entry in pod["containers"][0]["env"]}
    assert env["API_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "team-secrets",
        "key": "report.API_SECRET",
    }
    assert env["NOTION_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "team-secrets",
        "key": "my-notion",
    }
    assert env["QUOTED"]["value"] == 'it\'s "quoted" $HOME ${HOME} %h \\ back'
