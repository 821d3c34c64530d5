"""Runtime hook of the runvisor executable: load the unpacked files early.

A onefile executable unpacks its shared libraries, extension modules and
data files into `$TMPDIR/_MEIxxxxxx` at every start, and a temp cleaner
(systemd-tmpfiles, tmpwatch, tmpreaper) may delete that folder while a
long-running daemon still needs it. Pure Python modules are not affected:
they are read from the archive inside the executable itself.

For the daemon commands (`serve`, `up`) this hook therefore imports, at
start-up, every bundled extension module and every codec of the standard
library, and reads keyring's entry points once (keyring caches them), so
that nothing is read from the folder later. The other commands are
short-lived and skip this, to keep `runvisor --version` fast.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

DAEMON_COMMANDS = frozenset({"serve", "up"})

# `readline` sets up the terminal when imported and no daemon path uses it.
SKIPPED_MODULES = frozenset({"readline"})


def _extension_module_names(root: str) -> list[str]:
    """Return the dotted names of the extension modules unpacked under root."""
    names = []
    python = "python{}.{}".format(*sys.version_info[:2])
    dynload = os.path.join(python, "lib-dynload")
    for folder, _, files in os.walk(root):
        for file in files:
            is_extension = ".cpython-" in file or ".abi3." in file
            if not (file.endswith(".so") and is_extension):
                continue
            relative = os.path.relpath(os.path.join(folder, file), root)
            if relative.startswith(dynload + os.sep):
                relative = relative[len(dynload) + 1 :]
            module = relative.split(".", 1)[0].replace(os.sep, ".")
            names.append(module)
    return sorted(names)


def _codec_module_names(root: str) -> list[str]:
    import zipfile

    with zipfile.ZipFile(os.path.join(root, "base_library.zip")) as library:
        return sorted(
            "encodings." + name[len("encodings/") : -len(".pyc")]
            for name in library.namelist()
            if name.startswith("encodings/") and name.endswith(".pyc")
        )


def _preload(root: str) -> None:
    # Codecs for other platforms fail to import here, and an extension module
    # that needs a missing system library fails the same way from the folder
    # later: skipping it changes nothing for the daemon.
    for name in _extension_module_names(root) + _codec_module_names(root):
        if name in SKIPPED_MODULES or name in sys.modules:
            continue
        with contextlib.suppress(Exception):
            importlib.import_module(name)

    from keyring import backend

    backend._load_plugins()


if getattr(sys, "frozen", False) and DAEMON_COMMANDS.intersection(sys.argv[1:]):
    _preload(sys._MEIPASS)
