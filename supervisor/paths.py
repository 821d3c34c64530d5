"""Where the config file is found.

Kept apart from the config loader so that the CLI's fast path (a status
request) finds the file without importing the loader.
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_ENV_VARIABLE = "RUNVISOR_CONFIG"
CONFIG_FILE_NAME = "runvisor.toml"

# Not platformdirs.site_config_dir, which follows $XDG_CONFIG_DIRS and
# gives /etc/xdg/runvisor: the unit and the install script use /etc/runvisor.
SYSTEM_CONFIG_DIR = Path("/etc/runvisor")


def find_config_path(cli_value: str | None) -> Path:
    """Return the config file to use, as an absolute path.

    The order is `--config PATH`, then `$RUNVISOR_CONFIG`, then
    `./runvisor.toml` when it exists, then `runvisor.toml` in the user config
    dir, then the system one (`/etc/runvisor/runvisor.toml`, where the
    install script puts the service's config) when only that one exists.
    The returned file may not exist.
    """
    for chosen in (cli_value, os.environ.get(CONFIG_ENV_VARIABLE)):
        if chosen:
            return Path(os.path.abspath(os.path.expanduser(chosen)))
    local = Path(CONFIG_FILE_NAME)
    if local.is_file():
        return local.absolute()
    import platformdirs

    user = Path(platformdirs.user_config_dir("runvisor")) / CONFIG_FILE_NAME
    system = SYSTEM_CONFIG_DIR / CONFIG_FILE_NAME
    if not user.is_file() and system.is_file():
        return system
    return user
