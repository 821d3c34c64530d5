"""Golden-file and CLI tests of `runvisor export`.

The golden files live in tests/golden/export/CASE/FORMAT/. After an
intended change of the output, regenerate them and review the diff:

    RUNVISOR_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_export.py

Paths that depend on where the repository or the test folder is are
replaced by @ROOT@ in the golden files, and TZ=UTC makes a schedule without
a timezone deterministic.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config import load_config
from supervisor.errors import ExportError
from supervisor.export import FORMATS, ExportResult, export_config

REPOSITORY = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden" / "export"
UPDATE = os.environ.get("RUNVISOR_UPDATE_GOLDEN") == "1"

SECRET_LITERAL = "s3cr3t-literal-value"
# Projects of every-setting.toml that Kubernetes and Nomad can express.
PORTABLE_PROJECTS = ["report", "sweep", "api", "Checker_2", "once"]


@pytest.fixture(autouse=True)
def utc_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")


def make_every_setting_folder(folder: Path) -> Path:
    """Copy every-setting.toml into `folder` with its project folders, and
    return the config path."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "runvisor.toml"
    shutil.copy(GOLDEN / "every-setting.toml", config)
    scripts = {
        "report folder/run.sh": '#!/usr/bin/env bash\necho report "$@"\n',
        "report folder/notes.txt": "trailing spaces   \n\tand a tab\n",
        "report folder/data/blob.bin": "",
        "sweep/run.sh": "#!/usr/bin/env bash\necho sweep\n",
        "api/run.sh": "#!/usr/bin/env bash\nexec sleep 1000\n",
        "checker/run.sh": "#!/usr/bin/env bash\nexec sleep 1000\n",
        "checker/check.sh": "#!/usr/bin/env bash\nexit 0\n",
        "once/run.sh": "#!/usr/bin/env bash\necho once\n",
    }
    for relative, text in scripts.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if relative.endswith(".sh"):
            path.chmod(0o755)
    (folder / "report folder/data/blob.bin").write_bytes(b"\x00\xff binary\n")
    # Files that must never reach a ConfigMap.
    (folder / "report folder/.env.local").write_text(f"export X={SECRET_LITERAL}\n")
    (folder / "report folder/.git").mkdir(exist_ok=True)
    (folder / "report folder/.git/HEAD").write_text("ref: refs/heads/main\n")
    return config


def export_case(case: str, fmt: str, tmp_path: Path) -> tuple[ExportResult, Path]:
    """Export one golden case and return the result and the folder that
    @ROOT@ stands for."""
    if case == "example":
        # A copy without what runs leave behind (`make run` writes
        # examples/tick/ticks.log), which the ConfigMap would otherwise hold.
        root = tmp_path / "repository"
        root.mkdir()
        shutil.copy(REPOSITORY / "config.example.toml", root)
        shutil.copytree(
            REPOSITORY / "examples",
            root / "examples",
            ignore=shutil.ignore_patterns("*.log", ".env.local", "__pycache__"),
        )
        config = load_config(root / "config.example.toml")
        return export_config(config, fmt), root
    config = load_config(make_every_setting_folder(tmp_path))
    projects = None if fmt == "systemd" else PORTABLE_PROJECTS
    return export_config(config, fmt, projects=projects), tmp_path


def normalized(text: str, root: Path) -> str:
    return text.replace(str(root), "@ROOT@")


def golden_text(result: ExportResult, root: Path) -> dict[str, str]:
    files = {file.name: normalized(file.text, root) for file in result.files}
    warnings = "".join(
        f"{project}: {message}\n" for project, message in result.warnings
    )
    files["warnings.txt"] = normalized(warnings, root)
    return files


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", ["example", "every-setting"])
def test_export_matches_golden_files(case: str, fmt: str, tmp_path: Path) -> None:
    result, root = export_case(case, fmt, tmp_path)
    produced = golden_text(result, root)
    folder = GOLDEN / case / fmt

    if UPDATE:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, text in produced.items():
            (folder / name).write_text(text, encoding="utf-8")

    expected = {path.name: path.read_text("utf-8") for path in folder.iterdir()}
    assert sorted(produced) == sorted(expected)
    for name, text in produced.items():
        assert text == expected[name], f"{folder / name} differs"


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_is_deterministic(fmt: str, tmp_path: Path) -> None:
    first, _ = export_case("every-setting", fmt, tmp_path / "a")
    second, _ = export_case("every-setting", fmt, tmp_path / "a")

    assert [file.name for file in first.files] == [file.name for file in second.files]
    assert [file.text for file in first.files] == [file.text for file in second.files]


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_never_contains_secret_values(fmt: str, tmp_path: Path) -> None:
    result, _ = export_case("every-setting", fmt, tmp_path)

    for file in result.files:
        assert SECRET_LITERAL not in file.text, file.name
    for _, message in result.warnings:
        assert SECRET_LITERAL not in message


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_reports_warnings_in_files(fmt: str, tmp_path: Path) -> None:
    result, _ = export_case("every-setting", fmt, tmp_path)
    texts = "\n".join(file.text for file in result.files)

    assert result.warnings
    for _, message in result.warnings:
        first_words = " ".join(message.split()[:6])
        assert first_words in " ".join(texts.replace("#", " ").split())


@pytest.mark.parametrize("fmt", ["kubernetes", "nomad"])
def test_export_rejects_expression_without_exact_form(fmt: str) -> None:
    config = load_config(GOLDEN / "month-end.toml")

    with pytest.raises(ExportError) as caught:
        export_config(config, fmt)

    message = str(caught.value)
    assert "month-end" in message
    assert "'0 18 * * 5L'" in message
    assert "because it uses # or L in the day-of-week field" in message


def test_export_systemd_translates_last_weekday() -> None:
    config = load_config(GOLDEN / "month-end.toml")

    result = export_config(config, "systemd")

    timer = next(file for file in result.files if file.name.endswith(".timer"))
    assert "OnCalendar=Fri *-*~07/1 18:00:00 UTC\n" in timer.text


def test_export_rejects_unknown_project() -> None:
    config = load_config(REPOSITORY / "config.example.toml")

    with pytest.raises(ExportError, match="'nope' is not in the config"):
        export_config(config, "systemd", projects=["nope"])


def test_export_image_source_needs_image(tmp_path: Path) -> None:
    from supervisor.export import ExportOptions

    config = load_config(REPOSITORY / "config.example.toml")

    with pytest.raises(ExportError, match="--k8s-source image needs --image"):
        export_config(config, "kubernetes", ExportOptions(k8s_source="image"))


# The real command


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
        env={**os.environ, "TZ": "UTC"},
        timeout=60,
    )


def test_cli_prints_files_with_separators() -> None:
    done = run_cli("export", "systemd", "--config", "config.example.toml")

    assert done.returncode == 0, done.stderr
    assert "# ==> runvisor-hello.service <==\n" in done.stdout
    assert "# ==> runvisor-tick.timer <==\n" in done.stdout
    assert "runvisor: warning: web: systemd has no health probes" in done.stderr


def test_cli_writes_one_file_per_project_and_kind(tmp_path: Path) -> None:
    out = tmp_path / "out"

    done = run_cli(
        "export",
        "kubernetes",
        "--config",
        "config.example.toml",
        "--out",
        str(out),
        "--project",
        "tick",
        "web",
    )

    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in out.iterdir()) == [
        "tick-configmap.yaml",
        "tick-cronjob.yaml",
        "web-configmap.yaml",
        "web-deployment.yaml",
    ]


def test_cli_reports_untranslatable_project() -> None:
    done = run_cli("export", "nomad", "--config", str(GOLDEN / "month-end.toml"))

    assert done.returncode == 1
    assert done.stdout == ""
    assert "Project month-end: the cron expression '0 18 * * 5L'" in done.stderr
