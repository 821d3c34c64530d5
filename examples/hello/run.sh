#!/usr/bin/env bash
# A manual project: runs once when triggered, prints a few lines and exits.
set -euo pipefail
[ -f ./.env.local ] && source ./.env.local
echo "hello from run ${RUNVISOR_RUN_ID} of ${RUNVISOR_PROJECT} (trigger: ${RUNVISOR_TRIGGER})"
echo "GREETING is '${GREETING:-unset}'"
echo "this line goes to stderr" >&2
