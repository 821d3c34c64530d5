#!/usr/bin/env bash
# A scheduled project: runs every minute, appends a line to ticks.log.
set -euo pipefail
now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
echo "tick at ${now} (run ${RUNVISOR_RUN_ID})" | tee -a ticks.log
