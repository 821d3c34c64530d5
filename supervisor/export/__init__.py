"""Export of a runvisor config to systemd units, Kubernetes manifests or
Nomad jobs.

`export_config` returns the generated files and the warnings about what a
format does not map exactly. The same config always gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable

from supervisor.config import Config, ProjectConfig
from supervisor.export.common import (
    ExportedFile,
    ExportOptions,
    ExportResult,
    ProjectNotes,
    select_projects,
)

__all__ = ["FORMATS", "ExportOptions", "ExportResult", "ExportedFile", "export_config"]

FORMATS = ("systemd", "kubernetes", "nomad")

ProjectExporter = Callable[
    [Config, ProjectConfig, ExportOptions], tuple[list[ExportedFile], ProjectNotes]
]


def export_config(
    config: Config,
    fmt: str,
    options: ExportOptions | None = None,
    projects: list[str] | None = None,
) -> ExportResult:
    """Export the projects of a config (all, or those named) to one format.

    Raises:
        ExportError: a project cannot be exported exactly enough, or a named
            project is not in the config.
        ValueError: `fmt` is not one of FORMATS.
    """
    options = options or ExportOptions()
    exporter = _exporter(fmt)
    result = ExportResult()
    for project in select_projects(config, projects):
        files, notes = exporter(config, project, options)
        result.files += files
        result.warnings += [(project.name, message) for message in notes.messages]
    return result


def _exporter(fmt: str) -> ProjectExporter:
    if fmt == "systemd":
        from supervisor.export.systemd import export_project as export_systemd

        return lambda config, project, _: export_systemd(config, project)
    if fmt == "kubernetes":
        from supervisor.export.kubernetes import export_project as export_kubernetes

        return export_kubernetes
    if fmt == "nomad":
        from supervisor.export.nomad import export_project as export_nomad

        return export_nomad
    raise ValueError(f"unknown export format {fmt!r}: expected one of {FORMATS}")
