#!/usr/bin/env bash
# An always-running project: a small HTTP server on a loopback port.
set -euo pipefail
exec python3 -u server.py
