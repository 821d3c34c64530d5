"""The `runvisor export` command: export the config and print or write the
files, with warnings on stderr."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from supervisor.config import find_config_path, load_config
from supervisor.export import ExportOptions, export_config

EXIT_OK = 0


def run_export(args: argparse.Namespace) -> int:
    """Export the projects of the active config to `args.format`.

    Without `args.out`, every file goes to stdout after a `# ==> NAME <==`
    line. With it, each file is written into that folder, created if needed.
    Raises the ConfigError or ExportError that stops the export.
    """
    config = load_config(find_config_path(args.config))
    options = ExportOptions(
        k8s_source=args.k8s_source, image=args.image, k8s_secret=args.k8s_secret
    )
    result = export_config(config, args.format, options, args.project)
    for project, message in result.warnings:
        print(f"runvisor: warning: {project}: {message}", file=sys.stderr)

    if args.out is None:
        texts = [f"# ==> {file.name} <==\n{file.text}" for file in result.files]
        sys.stdout.write("\n".join(texts))
        return EXIT_OK

    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    for file in result.files:
        (folder / file.name).write_text(file.text, encoding="utf-8")
        print(folder / file.name)
    return EXIT_OK
