#!/usr/bin/env bash
# Install the peers that the benchmark suite compares runvisor with, into
# bench-only places that nothing else uses:
#   bench/.peers/venv  supervisord, circus, and the profilers (py-spy, pyinstrument)
#   bench/.peers/npm   pm2
# Running it again installs only what is missing. A peer that fails to install
# is listed at the end, and the benchmark reports it as missing.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
peers="$here/.peers"
python="${PYTHON:-python3}"
failed=()

mkdir -p "$peers"

if [[ ! -x "$peers/venv/bin/python" ]]; then
    "$python" -m venv "$peers/venv" || failed+=("venv")
fi

install_pip() {
    local probe="$1"
    shift
    if [[ -x "$peers/venv/bin/$probe" ]]; then
        echo "present: $probe"
        return 0
    fi
    "$peers/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" \
        || failed+=("$probe")
}

if [[ -x "$peers/venv/bin/python" ]]; then
    install_pip supervisord "supervisor==4.3.0"
    install_pip circusd "circus==0.19.0"
    install_pip py-spy "py-spy==0.4.3"
    install_pip pyinstrument "pyinstrument==5.1.3"
fi

if [[ -x "$peers/npm/bin/pm2" ]]; then
    echo "present: pm2"
elif command -v npm >/dev/null; then
    npm install --silent --no-fund --no-audit --global --prefix "$peers/npm" pm2@7.0.4 \
        || failed+=("pm2")
else
    echo "npm is not installed, so pm2 cannot be installed." >&2
    failed+=("pm2")
fi

if ((${#failed[@]})); then
    echo "These could not be installed and will be reported as missing: ${failed[*]}" >&2
    exit 1
fi
echo "All peers are installed under $peers."
