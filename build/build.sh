#!/usr/bin/env bash
# Build the single runvisor executable, dist/runvisor (onefile, for the
# platform this runs on: Linux x86-64 here).
#
# PyInstaller's work files go to build/work/ and the result to dist/, both
# ignored by git. Uses $PYTHON (default .venv/bin/python), which needs the
# package and its `build` extra: pip install -e '.[build]'.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-.venv/bin/python}"
if ! "$python" -c 'import PyInstaller' 2>/dev/null; then
  echo "build.sh: PyInstaller is missing for $python; install it with:" >&2
  echo "  $python -m pip install -e '.[build]'" >&2
  exit 1
fi

"$python" -m PyInstaller --noconfirm --log-level WARN \
  --workpath build/work --distpath dist build/runvisor.spec

size=$(stat -c %s dist/runvisor)
echo "built dist/runvisor ($((size / 1024 / 1024)) MiB): $(dist/runvisor --version)"
