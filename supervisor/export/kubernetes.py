"""Export to Kubernetes manifests: a Deployment for always_running, a
CronJob for schedule and a Job for manual, each in its own YAML file.

The project folder reaches the pod in one of two ways. With the `configmap`
source, its files are embedded in a ConfigMap, and an init container copies
them into a writable `emptyDir`, because a run may write into its folder.
With the `image` source, the image named by `--image` holds the project,
and its working directory must be the project folder.

Secrets are `secretKeyRef`s into one Secret, which the operator creates; the
export never contains a value.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

from supervisor.config import Config, HealthConfig, ProjectConfig
from supervisor.errors import ExportError
from supervisor.export.calendar import (
    NoExactForm,
    clock_change_effects,
    portable_cron,
)
from supervisor.export.common import (
    ExportedFile,
    ExportOptions,
    ProjectNotes,
    comment_block,
    header_lines,
    one_line,
    plain_variables,
    schedule_zone,
    secret_variables,
    trigger_name,
    unique_secrets,
    untranslatable,
)
from supervisor.export.yaml_text import Document, yaml_document
from supervisor.model import OnUnhealthy, OverlapPolicy, RestartPolicy, TriggerMode

FORMAT = "kubernetes"
DEFAULT_IMAGE = "docker.io/library/python:3.11-slim"
PROJECT_DIR = "/runvisor/project"
SOURCE_DIR = "/runvisor/source"

# A ConfigMap holds at most 1 MiB, its keys and metadata included.
_CONFIGMAP_MAX_BYTES = 1_000_000
_SKIPPED_NAMES = {".env.local", ".git", "__pycache__"}
_KEY_CHARACTERS = re.compile(r"[^-._a-zA-Z0-9]")
_CONCURRENCY = {
    OverlapPolicy.SKIP: "Forbid",
    OverlapPolicy.REPLACE: "Replace",
    OverlapPolicy.ALLOW: "Allow",
    OverlapPolicy.QUEUE: "Forbid",
}
# Without a starting deadline, a CronJob also starts a run for a fire time
# missed long ago. The controller checks about every 10 seconds, so a
# shorter deadline could drop on-time runs.
_NO_CATCH_UP_DEADLINE = 60


def export_project(
    config: Config, project: ProjectConfig, options: ExportOptions
) -> tuple[list[ExportedFile], ProjectNotes]:
    """Return the manifests of one project and what they do not map exactly.

    Raises:
        ExportError: the project cannot be expressed as Kubernetes objects.
    """
    notes = ProjectNotes(project.name)
    name = object_name(project, notes)
    labels = {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/managed-by": "runvisor",
    }
    image = options.image or DEFAULT_IMAGE
    if options.k8s_source == "image" and options.image is None:
        raise ExportError(
            "--k8s-source image needs --image NAME: the image that holds the "
            "project folder as its working directory."
        )

    # The ConfigMap's file list is filled in last, so that a schedule with
    # no exact form is reported before any problem with the folder.
    items: list[Document] = []
    volumes: list[Document] = []
    if options.k8s_source == "configmap":
        volumes = [
            {
                "name": "source",
                "configMap": {"name": f"{name}-project", "items": items},
            },
            {"name": "project", "emptyDir": {}},
        ]
    pod = _pod_spec(project, name, image, options, volumes, notes)

    documents: list[tuple[str, Document]] = []
    if project.trigger == TriggerMode.ALWAYS_RUNNING:
        documents.append(("deployment", _deployment(project, name, labels, pod)))
    elif project.trigger == TriggerMode.SCHEDULE:
        documents.append(("cronjob", _cronjob(project, name, labels, pod, notes)))
    else:
        documents.append(("job", _job(project, name, labels, pod, notes)))
    if options.k8s_source == "configmap":
        configmap, file_items = _configmap(project, name, labels, notes)
        items += file_items
        documents.insert(0, ("configmap", configmap))

    header = header_lines(FORMAT, config, project)
    header += _secret_comment(project, options)
    if options.k8s_source == "configmap" and options.image is None:
        header += comment_block(
            f"The image {DEFAULT_IMAGE} is a default: pass --image with one "
            "that has what the project's command needs."
        )
    files = []
    for kind, document in documents:
        lines = [*header, *notes.comment_lines(), "---"]
        files.append(
            ExportedFile(
                f"{name}-{kind}.yaml", "\n".join(lines) + "\n" + yaml_document(document)
            )
        )
    return files, notes


def object_name(project: ProjectConfig, notes: ProjectNotes) -> str:
    """Return the project name as a Kubernetes object name: lowercase letters,
    digits and '-', starting and ending with a letter or digit."""
    name = re.sub(r"[^a-z0-9-]", "-", project.name.lower()).strip("-")
    name = name[:52].rstrip("-") or "project"
    if name != project.name:
        notes.warn(
            f"Kubernetes names allow only lowercase letters, digits and '-', so "
            f"the objects are named {name!r}."
        )
    return name


# Objects


def _metadata(name: str, labels: dict[str, str], project: ProjectConfig) -> Document:
    metadata: Document = {"name": name, "labels": dict(labels)}
    if project.description:
        metadata["annotations"] = {
            "runvisor/description": one_line(project.description)
        }
    return metadata


def _deployment(
    project: ProjectConfig, name: str, labels: dict[str, str], pod: Document
) -> Document:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(name, labels, project),
        "spec": {
            "replicas": 1,
            # runvisor never runs two copies of a project at once.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod},
        },
    }


def _job_spec(
    project: ProjectConfig, labels: dict[str, str], pod: Document, notes: ProjectNotes
) -> Document:
    spec: Document = {"backoffLimit": 0}
    if project.timeout is not None:
        spec["activeDeadlineSeconds"] = _whole_seconds(
            project.timeout, "timeout", notes, minimum=1
        )
    spec["template"] = {
        "metadata": {"labels": dict(labels)},
        "spec": {**pod, "restartPolicy": "Never"},
    }
    return spec


def _job(
    project: ProjectConfig,
    name: str,
    labels: dict[str, str],
    pod: Document,
    notes: ProjectNotes,
) -> Document:
    if project.overlap != OverlapPolicy.SKIP:
        notes.warn(
            f'overlap = "{project.overlap}" is not kept: a Job named {name} can '
            "exist only once, so creating it again while it runs fails, as "
            'with "skip".'
        )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(name, labels, project),
        "spec": _job_spec(project, labels, pod, notes),
    }


def _cronjob(
    project: ProjectConfig,
    name: str,
    labels: dict[str, str],
    pod: Document,
    notes: ProjectNotes,
) -> Document:
    assert project.cron is not None
    zone = schedule_zone(project, notes)
    try:
        schedule = portable_cron(project.cron)
    except NoExactForm as error:
        raise untranslatable(project, "a Kubernetes CronJob", error) from None
    for effect in clock_change_effects(project.cron, zone):
        notes.warn(
            f"in {zone}, {effect}; the CronJob controller may fire at other "
            "times on that day."
        )

    spec: Document = {
        "schedule": schedule,
        "timeZone": zone,
        "concurrencyPolicy": _CONCURRENCY[project.overlap],
    }
    if project.overlap == OverlapPolicy.QUEUE:
        notes.warn(
            'overlap = "queue" has no CronJob equivalent, so a fire while the '
            "previous run is still going is skipped (concurrencyPolicy: Forbid)."
        )
    if project.catch_up:
        notes.warn(
            "catch_up = true maps to no startingDeadlineSeconds, but the "
            "CronJob controller starts no run at all once more than 100 fire "
            "times were missed."
        )
    else:
        spec["startingDeadlineSeconds"] = _NO_CATCH_UP_DEADLINE
    if project.jitter > 0:
        notes.warn("jitter has no CronJob equivalent, so runs start at the fire time.")
    spec["jobTemplate"] = {"spec": _job_spec(project, labels, pod, notes)}
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": _metadata(name, labels, project),
        "spec": spec,
    }


# Pod


def _pod_spec(
    project: ProjectConfig,
    name: str,
    image: str,
    options: ExportOptions,
    volumes: list[Document],
    notes: ProjectNotes,
) -> Document:
    container: Document = {
        "name": name[:63].rstrip("-"),
        "image": image,
        "command": shlex.split(project.command),
    }
    if volumes:
        container["workingDir"] = PROJECT_DIR
        container["volumeMounts"] = [{"name": "project", "mountPath": PROJECT_DIR}]
    container["env"] = _environment(project, options)
    if project.trigger == TriggerMode.ALWAYS_RUNNING:
        _restart_notes(project, notes)
        if project.health is not None:
            probe = _probe(project.health, notes)
            if project.health.on_unhealthy == OnUnhealthy.RESTART:
                if project.health.success_threshold != 1:
                    notes.warn(
                        "Kubernetes requires successThreshold 1 for a liveness "
                        "probe, so health.success_threshold = "
                        f"{project.health.success_threshold} is not kept."
                    )
                    probe["successThreshold"] = 1
                container["livenessProbe"] = probe
            else:
                # A readiness probe reports health without restarting.
                container["readinessProbe"] = probe

    if project.stop_signal != "SIGTERM":
        notes.warn(
            f"Kubernetes stops containers with SIGTERM (or the image's "
            f"STOPSIGNAL), not stop_signal = {project.stop_signal}."
        )
    if project.keep_env_file:
        notes.warn(
            "keep_env_file = true has no effect: the container gets its "
            "variables from Kubernetes and no .env.local is written."
        )

    pod: Document = {
        "terminationGracePeriodSeconds": _whole_seconds(
            project.stop_timeout, "stop_timeout", notes, minimum=0
        ),
    }
    if volumes:
        pod["initContainers"] = [
            {
                "name": "copy-project",
                "image": image,
                "command": ["sh", "-c", _COPY_SCRIPT],
                "volumeMounts": [
                    {"name": "source", "mountPath": SOURCE_DIR, "readOnly": True},
                    {"name": "project", "mountPath": PROJECT_DIR},
                ],
            }
        ]
    pod["containers"] = [container]
    if volumes:
        pod["volumes"] = volumes
    return pod


# ConfigMap volumes hold each file as a symlink into a `..data` folder, and
# a run may write into its folder, so the files are copied, not mounted.
_COPY_SCRIPT = (
    f"cd {SOURCE_DIR} && for entry in * .[!.]*; do "
    f'[ -e "$entry" ] && cp -RL "$entry" {PROJECT_DIR}/; done; true'
)


def _environment(project: ProjectConfig, options: ExportOptions) -> list[Document]:
    env: list[Document] = [
        {"name": name, "value": value}
        for name, value in plain_variables(project, trigger_name(project))
    ]
    env.append(
        {
            "name": "RUNVISOR_RUN_ID",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}},
        }
    )
    for secret in secret_variables(project):
        env.append(
            {
                "name": secret.variable,
                "valueFrom": {
                    "secretKeyRef": {"name": options.k8s_secret, "key": secret.key}
                },
            }
        )
    return env


def _secret_comment(project: ProjectConfig, options: ExportOptions) -> list[str]:
    secrets = unique_secrets(secret_variables(project))
    if not secrets:
        return []
    lines = comment_block(
        f"Secrets come from the Secret {options.k8s_secret}, which this export "
        "does not contain. Create it once, for example with:"
    )
    lines.append(f"#   kubectl create secret generic {options.k8s_secret} \\")
    lines += [f"#     --from-file={secret.key}=PATH \\" for secret in secrets[:-1]]
    lines.append(f"#     --from-file={secrets[-1].key}=PATH")
    lines += [
        f"# {secret.variable} comes from the {secret.origin}."
        for secret in secret_variables(project)
    ]
    return lines


def _restart_notes(project: ProjectConfig, notes: ProjectNotes) -> None:
    if project.restart != RestartPolicy.ALWAYS:
        notes.warn(
            f'restart = "{project.restart}" is not kept: a Deployment restarts '
            "its container after every exit."
        )
    notes.warn(
        "Kubernetes restarts a crashed container after its own back-off "
        "(10s, doubling up to 5m, reset after 10m up), not after backoff."
    )
    notes.warn(
        f"Kubernetes never gives up restarting, so restart_limit = "
        f"{project.restart_limit} and max_retries = {project.max_retries} are "
        "not kept."
    )


def _probe(health: HealthConfig, notes: ProjectNotes) -> Document:
    probe: Document
    if health.exec is not None:
        probe = {"exec": {"command": shlex.split(health.exec)}}
    elif health.http is not None:
        url = urlsplit(health.http)
        path = url.path or "/"
        if url.query:
            path += f"?{url.query}"
        action: Document = {"path": path, "port": url.port or 80}
        _probe_host(url.hostname or "", action, notes)
        probe = {"httpGet": action}
    else:
        assert health.tcp is not None
        host, _, port = health.tcp.rpartition(":")
        action = {"port": int(port)}
        _probe_host(host.strip("[]"), action, notes)
        probe = {"tcpSocket": action}

    probe["initialDelaySeconds"] = _whole_seconds(
        health.start_period, "health.start_period", notes, minimum=0
    )
    probe["periodSeconds"] = _whole_seconds(
        health.interval, "health.interval", notes, minimum=1
    )
    probe["timeoutSeconds"] = _whole_seconds(
        health.timeout, "health.timeout", notes, minimum=1
    )
    probe["failureThreshold"] = health.failure_threshold
    probe["successThreshold"] = health.success_threshold
    return probe


def _probe_host(host: str, action: Document, notes: ProjectNotes) -> None:
    if _is_loopback(host):
        notes.warn(
            f"the kubelet probes the pod's IP address, not {host}, so the "
            "server must listen on every address (0.0.0.0) for the probe to "
            "pass."
        )
    else:
        action["host"] = host


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _whole_seconds(
    seconds: float, key: str, notes: ProjectNotes, *, minimum: int
) -> int:
    whole = max(minimum, math.ceil(seconds))
    if whole != seconds:
        notes.warn(
            f"Kubernetes counts {key} in whole seconds, at least {minimum}, so "
            f"{seconds:g}s becomes {whole}s."
        )
    return whole


# ConfigMap


def _configmap(
    project: ProjectConfig,
    name: str,
    labels: dict[str, str],
    notes: ProjectNotes,
) -> tuple[Document, list[Document]]:
    data: Document = {}
    binary: Document = {}
    items: list[Document] = []
    total = 0
    for relative, path in _project_files(project, notes):
        key = _unique_key(relative, data.keys() | binary.keys())
        content = path.read_bytes()
        total += len(content)
        try:
            data[key] = content.decode("utf-8")
        except UnicodeDecodeError:
            import base64

            binary[key] = base64.b64encode(content).decode("ascii")
        item: Document = {"key": key, "path": relative}
        if os.access(path, os.X_OK):
            item["mode"] = 0o755
        items.append(item)
    if total > _CONFIGMAP_MAX_BYTES:
        raise ExportError(
            f"Project {project.name}: the files of {project.path} take {total} "
            f"bytes, more than a ConfigMap holds (1 MiB). Build an image with "
            "the project and use --k8s-source image --image NAME."
        )

    configmap: Document = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-project", "labels": dict(labels)},
    }
    if data:
        configmap["data"] = data
    if binary:
        configmap["binaryData"] = binary
    return configmap, items


def _project_files(
    project: ProjectConfig, notes: ProjectNotes
) -> list[tuple[str, Path]]:
    folder = Path(project.path)
    if not folder.is_dir():
        raise ExportError(
            f"Project {project.name}: the project folder {project.path} does "
            "not exist, so its files cannot go into a ConfigMap. Create it, or "
            "use --k8s-source image --image NAME."
        )
    files = []
    for root, directories, names in os.walk(folder):
        directories[:] = sorted(d for d in directories if d not in _SKIPPED_NAMES)
        for file_name in sorted(names):
            path = Path(root) / file_name
            relative = path.relative_to(folder).as_posix()
            if file_name in _SKIPPED_NAMES:
                continue
            if path.is_symlink() or not path.is_file():
                notes.warn(
                    f"{relative} is a symlink or not a regular file, so it is "
                    "not in the ConfigMap."
                )
                continue
            files.append((relative, path))
    return sorted(files)


def _unique_key(relative: str, taken: object) -> str:
    base = _KEY_CHARACTERS.sub("_", relative.replace("/", "__"))
    key, number = base, 2
    while key in taken:  # type: ignore[operator]
        key, number = f"{base}-{number}", number + 1
    return key
